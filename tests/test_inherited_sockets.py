"""greenleader._inherited_sockets: in a forked child, /dev/null takes the place of every
registered socket, before any greenlet runs there; the parent's sockets are untouched."""

from __future__ import annotations

import os
import socket

import pytest

from greenleader import _inherited_sockets

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
