"""greenleader._inherited_sockets: in a forked child, /dev/null takes the place of every
registered socket, before any greenlet runs there; the parent's sockets are untouched."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest

from greenleader import _inherited_sockets
from tests.faults import Proxy
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def _is_devnull(fd: int) -> bool:
    return os.path.samestat(os.fstat(fd), os.stat(os.devnull))


def _in_child(check) -> int:
    """The exit code of a forked child that runs ``check()`` (True: 0) at once, no hub turn first."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_registered_sockets_are_dev_null_in_a_child_only() -> None:
    registered, peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    closed, closed_peer = socket.socketpair()
    _inherited_sockets.register(registered)
    _inherited_sockets.register(closed)
    closed.close()  # skipped quietly: fileno() is -1
    try:
        assert _in_child(lambda: _is_devnull(registered.fileno()) and not _is_devnull(other.fileno())) == 0
        assert not _is_devnull(registered.fileno())
        peer.sendall(b"x")  # the parent's socket still carries its bytes
        assert registered.recv(1) == b"x"
    finally:
        for sock in (registered, peer, other, other_peer, closed_peer):
            sock.close()


def test_a_closed_socket_s_number_reused_by_a_file_is_left_alone(tmp_path) -> None:
    """The registry holds sockets, not numbers: once a registered socket is closed, the file
    that takes its number is the child's own, and must not become /dev/null there."""
    closed, closed_peer = socket.socketpair()
    number = closed.fileno()
    _inherited_sockets.register(closed)
    closed.close()
    closed_peer.close()
    gevent.sleep(0.05)  # let gevent's deferred close of the descriptor run first
    file = os.open(tmp_path / "reuses-the-number", os.O_RDWR | os.O_CREAT)
    if file != number:  # (as a rule it is the lowest free number: the socket's)
        os.dup2(file, number)
        os.close(file)
    try:
        assert _in_child(lambda: not _is_devnull(number)) == 0, "a reused number was put to /dev/null"
    finally:
        os.close(number)


def test_create_connection_registers_its_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = _inherited_sockets.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
        try:
            assert _in_child(lambda: _is_devnull(sock.fileno())) == 0
            accepted.sendall(b"y")
            assert sock.recv(1) == b"y"
        finally:
            sock.close()
            accepted.close()


# -- connections still being set up: a fork then leaves the child no live copy either ------------


def _live_copies(port: int) -> list[int]:
    """This process's descriptors that are sockets connected to ``port`` (on the loopback)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.getpeername()[1] == port:
                    found.append(int(name))
            except (OSError, IndexError, TypeError):
                pass
    return found


def _copies_in_a_child(port: int) -> list[int]:
    """The live copies of connections to ``port`` that a child forked now holds, before any
    greenlet runs there."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os.write(write, json.dumps(_live_copies(port)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        return json.loads(answer.read())


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: a TLS handshake stays pending."""
    with gevent.socket.create_server(("127.0.0.1", 0)) as server:
        accepted: list[socket.socket] = []

        def accept() -> None:
            while True:
                accepted.append(server.accept()[0])

        acceptor = gevent.spawn(accept)
        yield server.getsockname()[1]
        acceptor.kill()
        for sock in accepted:
            sock.close()


def test_a_consul_tls_handshake_in_progress_is_dead_in_a_child(silent_server: int) -> None:
    from greenleader.stores.consul.connections import Pool

    pool = Pool("127.0.0.1", silent_server, {}, (False, None), size=1)
    request = gevent.spawn(pool.request, "GET", "/v1/status/leader", None, {}, connect_timeout=30, read_timeout=30)
    try:
        # connected, its ClientHello sent, the server silent: the handshake is pending
        wait_until(lambda: _live_copies(silent_server), 10, "the TLS connection to be made")
        assert not request.dead, request.exception
        assert _copies_in_a_child(silent_server) == []
        assert not request.dead, request.exception  # the parent's handshake goes on
    finally:
        request.kill()


def test_a_postgres_connect_in_progress_is_dead_in_a_child(postgres_cluster) -> None:
    """libpq's connect (startup, authentication) takes several hub turns; a fork during them
    leaves the child nothing that could send on, or read from, the parent's connection. Also
    fails loudly if psycopg's private ``Connection._connect_gen`` (greenleader's hook) is
    gone or changed shape: the connection in progress is then not registered."""
    from greenleader.stores.postgres.client import PostgresClient

    proxy = Proxy(postgres_cluster.addrs[0])
    proxy.partition("down")  # the server's answers are held: the connect stays in progress
    port = int(proxy.addr.rpartition(":")[2])
    client = PostgresClient([proxy.addr], user=postgres_cluster.SUPERUSER, dbname=postgres_cluster.DBNAME,
                            timeout=30)
    connect = gevent.spawn(client.connect)
    try:
        wait_until(lambda: _live_copies(port), 10, "the connection to the proxy to be made")
        assert not connect.dead, connect.exception
        assert _copies_in_a_child(port) == []
        proxy.heal()
        conn = connect.get(timeout=30)  # the parent's connect completes, untouched by the fork
        try:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert _in_child(lambda: _is_devnull(conn.fileno())) == 0
        finally:
            conn.close()
    finally:
        connect.kill()
        proxy.close()
