"""Fault injection for tests: a TCP proxy on loopback, process pauses and hub blocks, store kills.

Everything here runs on the test machine itself (no external service):

- :class:`Proxy` sits between one client and one store endpoint. Each direction can pass
  traffic, be *partitioned* (nothing arrives, connections stay open), or be *delayed*; the
  proxy can also *reset* its connections (RST to both ends). A partition holds the bytes back
  rather than discarding them, as a real network does to a TCP stream (the sender's kernel
  retransmits; a byte stream never arrives with a hole in it): on heal they flow again, or
  the held connections are reset (``heal(reset=True)``, a TCP connection that gave up).
  New connections made during a partition are accepted (the kernel completes the handshake
  on the listening socket) but the upstream connection is only made once the partition heals.
- :class:`ClientProxies`: one proxy per (client, store node), so a fault can hit one client.
- :func:`pause` / :func:`resume` stop and continue a process (SIGSTOP / SIGCONT);
  :func:`block_hub` asks a candidate process started with ``--block-hub`` to run CPU-bound
  code that never yields, blocking its gevent hub (see :func:`install_hub_blocker`).
- :func:`kill_node`, :func:`restart_node`, :func:`kill_cluster`, :func:`restart_cluster`
  crash and restart store servers of a :class:`tests.servers.Cluster`.
- :func:`registrations` and :func:`delete_registration` find and delete a candidate's
  registration for a key from outside, as an operator or a cleaner would (Consul: the key or
  the session; etcd: the candidate's key; ZooKeeper: its node; file store: the lock file).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import time
import urllib.error
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.event import Event
from gevent.queue import Queue
from gevent.server import StreamServer

from tests import servers

log = logging.getLogger(__name__)

__all__ = [
    "ClientProxies", "Direction", "Proxy",
    "block_hub", "delete_registration", "install_hub_blocker", "kill_cluster", "kill_node", "pause",
    "registrations", "restart_cluster", "restart_node", "resume",
]

_CHUNK = 65536
#: Signal that makes a candidate process started with ``--block-hub`` block its hub.
BLOCK_HUB_SIGNAL = signal.SIGUSR1


# ---------------------------------------------------------------------------------------------
# the proxy


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0) rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class Direction:
    """One direction of a proxy (``up``: client to store, ``down``: store to client)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0  # seconds added to every chunk
        self._flowing = Event()
        self._flowing.set()

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def partition(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self.delay = 0.0
        self._flowing.set()

    def wait_flowing(self) -> None:
        self._flowing.wait()

    def __repr__(self) -> str:
        state = "partitioned" if self.partitioned else f"delay {self.delay:g}s" if self.delay else "pass"
        return f"{self.name}:{state}"


class _Connection:
    """A proxied connection: the client's socket, the upstream one, and a pump per direction."""

    def __init__(self, proxy: Proxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.greenlets: list[gevent.Greenlet] = []

    def run(self) -> None:
        proxy = self.proxy
        proxy.up.wait_flowing()  # a partitioned client's connection attempt reaches no one
        if self.closed:
            return
        try:
            self.upstream = socket.create_connection(proxy.upstream, timeout=5)
            self.upstream.settimeout(None)
        except OSError as exc:
            log.debug("%r: upstream connect failed: %s", proxy, exc)
            self.reset()  # the client sees the failure as a reset (the port refused it)
            return
        for src, dst, direction in ((self.client, self.upstream, proxy.up), (self.upstream, self.client, proxy.down)):
            chunks: Queue = Queue()
            self.greenlets += [gevent.spawn(self._read, src, direction, chunks),
                               gevent.spawn(self._write, dst, direction, chunks)]
        gevent.joinall(self.greenlets)
        self.close()

    def _read(self, src: socket.socket, direction: Direction, chunks: Queue) -> None:
        try:
            while True:
                direction.wait_flowing()  # partitioned: leave the bytes in the kernel's buffers
                data = src.recv(_CHUNK)
                chunks.put((time.monotonic(), data))
                if not data:
                    return
        except OSError:
            chunks.put((time.monotonic(), None))

    def _write(self, dst: socket.socket, direction: Direction, chunks: Queue) -> None:
        for arrived, data in chunks:
            while True:  # a chunk read just before a partition must not arrive during it
                direction.wait_flowing()
                wait = arrived + direction.delay - time.monotonic()
                if wait <= 0 and not direction.partitioned:
                    break
                gevent.sleep(max(wait, 0.0))
            try:
                if data is None:  # the source was reset: pass the reset on
                    self.reset()
                    return
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                self.reset()
                return

    def reset(self) -> None:
        """RST both ends and stop pumping."""
        self.closed = True
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)
        current = gevent.getcurrent()
        for greenlet in self.greenlets:
            if greenlet is not current:
                greenlet.kill(block=False)

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class Proxy:
    """A loopback TCP proxy to ``upstream`` ("host:port") with per-direction faults."""

    def __init__(self, upstream: str, name: str = "") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.name = name or upstream
        self.up = Direction("up")
        self.down = Direction("down")
        self.connections: set[_Connection] = set()
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.addr = f"127.0.0.1:{self._server.server_port}"

    def __repr__(self) -> str:
        return f"<Proxy {self.name} {self.addr}->{self.upstream[0]}:{self.upstream[1]} {self.up!r} {self.down!r}>"

    def _handle(self, client: socket.socket, _address: Any) -> None:
        connection = _Connection(self, client)
        self.connections.add(connection)
        try:
            connection.run()
        finally:
            self.connections.discard(connection)

    def _directions(self, direction: str) -> list[Direction]:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, not {direction!r}")
        return [d for d in (self.up, self.down) if direction in (d.name, "both")]

    def partition(self, direction: str = "both") -> None:
        """Nothing arrives in ``direction`` until :meth:`heal`; connections stay open."""
        for d in self._directions(direction):
            d.partition()

    def delay(self, seconds: float, direction: str = "both") -> None:
        """Every chunk in ``direction`` arrives ``seconds`` late (order is kept)."""
        for d in self._directions(direction):
            d.delay = seconds

    def heal(self, reset: bool = False) -> None:
        """Pass traffic again; with ``reset``, first reset the connections that were held."""
        if reset:
            self.reset()
        self.up.heal()
        self.down.heal()

    def reset(self) -> None:
        """Reset every open connection (both ends get an RST)."""
        for connection in list(self.connections):
            connection.reset()

    def close(self) -> None:
        self._server.stop(timeout=1)
        self.reset()
        self.heal()  # wakes connections still waiting to connect, which then see closed


class ClientProxies:
    """One :class:`Proxy` per (client, store node): a client's own way to each node.

    ``url(client)`` is the store URL that client uses: the cluster's scheme with the client's
    proxies in place of the nodes' addresses, plus ``query``.
    """

    def __init__(self, scheme: str, upstreams: list[str], query: str = "") -> None:
        self.scheme = scheme
        self.upstreams = upstreams
        self.query = query
        self.proxies: dict[str, list[Proxy]] = {}

    def add(self, client: str) -> list[Proxy]:
        if client not in self.proxies:
            self.proxies[client] = [Proxy(up, f"{client}->{up}") for up in self.upstreams]
        return self.proxies[client]

    def url(self, client: str) -> str:
        addrs = ",".join(p.addr for p in self.add(client))
        return f"{self.scheme}://{addrs}" + (f"?{self.query}" if self.query else "")

    def of(self, client: str, nodes: Iterable[int] | None = None) -> list[Proxy]:
        proxies = self.add(client)
        return proxies if nodes is None else [proxies[i] for i in nodes]

    def heal_all(self) -> None:
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.heal()

    def close(self) -> None:
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.close()


# ---------------------------------------------------------------------------------------------
# processes


def pause(pid: int) -> None:
    """SIGSTOP ``pid``: it runs nothing (no renewal, no timer) until :func:`resume`."""
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def block_hub(pid: int) -> None:
    """Make a candidate process started with ``--block-hub S`` block its hub for S seconds."""
    os.kill(pid, BLOCK_HUB_SIGNAL)


def install_hub_blocker(seconds: float, observe: Callable[[], None], on_done: Callable[[float, float], None]) -> None:
    """In a candidate process: on BLOCK_HUB_SIGNAL, run CPU-bound code for ``seconds`` that
    never yields to the gevent hub, as a duty stuck in a computation would.

    It calls ``observe()`` every few milliseconds meanwhile (a duty asking whether it still
    leads, which must turn False at the renew deadline although no greenlet runs), then
    ``on_done(start, end)``.
    """

    def block() -> None:
        start = time.monotonic()
        log.warning("blocking the hub for %gs", seconds)
        while time.monotonic() < start + seconds:
            observe()
            end = time.monotonic() + 0.005
            while time.monotonic() < end:
                pass
        on_done(start, time.monotonic())

    gevent.signal_handler(BLOCK_HUB_SIGNAL, block)


# ---------------------------------------------------------------------------------------------
# store servers


def kill_node(node: Any) -> None:
    """SIGKILL one store server (a tests.servers.Node): no goodbye to peers or clients."""
    node.kill()


def restart_node(node: Any, timeout: float = 60.0) -> None:
    """Start a killed node again with its ports and data directory; wait until it answers."""
    node.spawn()
    node.wait_answers(timeout)


def kill_cluster(cluster: Any) -> None:
    """SIGKILL every node of ``cluster``: a whole-store outage."""
    for node in cluster.nodes:
        node.kill()


def restart_cluster(cluster: Any, timeout: float = 60.0) -> None:
    """Start every node that is down; wait until the cluster has a leader and serves."""
    for node in cluster.nodes:
        node.spawn()
    for node in cluster.nodes:
        node.wait_answers(timeout)
    cluster.wait_ready(timeout)


# ---------------------------------------------------------------------------------------------
# a candidate's registration, deleted from outside


def registrations(backend: str, where: Any, key: str) -> list[tuple[str, str, bool]]:
    """``(node, handle, holds)`` of every candidate registered for ``key``, in queue order
    (Consul: the holder, then the other sessions named for greenleader, in no order); ``holds``:
    the store counts it as the key's holder now. ``where``: the
    store's addresses, or the file store's directory. Asks the store directly, not through a
    greenleader store (no proxy, no fault of the candidates' own)."""
    if backend == "consul":
        base = f"http://{where[0]}/v1"
        try:
            entry = json.loads(servers.http("GET", f"{base}/kv/{key}"))
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            entry = None  # nobody holds the key
        holder = entry[0].get("Session") if entry else None
        sessions = json.loads(servers.http("GET", f"{base}/session/list"))
        named = {s["ID"]: s["Name"].removeprefix("greenleader ") for s in sessions
                 if s["Name"].startswith("greenleader ")}
        found = [(named.get(holder, "?"), f"session:{holder}", True)] if holder else []
        return found + [(node, f"session:{sid}", False) for sid, node in named.items() if sid != holder]
    if backend == "etcd":
        prefix = (key + "/").encode()
        body = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + bytes([prefix[-1] + 1]))}
        kvs = json.loads(servers.http("POST", f"http://{where[0]}/v3/kv/range", json.dumps(body).encode()))
        children = [kv for kv in kvs.get("kvs", []) if b"/" not in base64.b64decode(kv["key"])[len(prefix):]]
        children.sort(key=lambda kv: int(kv["create_revision"]))
        return [(base64.b64decode(kv.get("value", "")).decode(), base64.b64decode(kv["key"]).decode(), i == 0)
                for i, kv in enumerate(children)]
    if backend == "zookeeper":
        from greenleader.stores.zookeeper import ZooKeeperStore
        from tests.support_zookeeper import admin_client, contenders

        path = ZooKeeperStore(where).path_for(key)
        with admin_client(where, timeout=5) as zk:
            found = []
            for name in contenders(zk, path):
                with contextlib.suppress(Exception):
                    found.append((zk.get(f"{path}/{name}")[0].decode(), f"{path}/{name}", not found))
            return found
    if backend == "postgres":  # no queue: the holder's row only (waiters keep nothing there)
        from tests.support_postgres import registrations_at

        return registrations_at(where[0], key)
    if backend == "file":  # only the holder has a registration: the lock file names it
        from greenleader.stores.file import FileStore

        path = FileStore(directory=where).path_for(key)
        try:
            node = json.loads(path.read_text() or "{}").get("node")
        except (OSError, ValueError):
            return []
        return [(node, str(path), True)] if node else []
    raise ValueError(f"unknown backend {backend!r}")


def delete_registration(backend: str, where: Any, key: str, handle: str, *, whole_key: bool = False,
                        behind: str | None = None) -> str:
    """Delete one registration found by :func:`registrations`; return what was done.
    ``whole_key``: Consul: delete the key itself rather than the holder's session; file store:
    move a copy over the lock file rather than remove it. ``behind``: the registration just
    before it in the queue (etcd, ZooKeeper): delete only while that one still exists, in one
    transaction, so a waiter is never deleted just as it becomes the holder (LookupError)."""
    if backend == "consul":
        base = f"http://{where[0]}/v1"
        if whole_key:
            servers.http("DELETE", f"{base}/kv/{key}")
            return "consul kv delete of the key"
        servers.http("PUT", f"{base}/session/destroy/{handle.removeprefix('session:')}")
        return "consul session destroy"
    if backend == "etcd":
        delete = {"request_delete_range": {"key": _b64(handle.encode())}}
        compare = [] if behind is None else [
            {"key": _b64(behind.encode()), "target": "CREATE", "result": "GREATER", "create_revision": "0"}]
        body = {"compare": compare, "success": [delete]}
        answer = json.loads(servers.http("POST", f"http://{where[0]}/v3/kv/txn", json.dumps(body).encode()))
        if not answer.get("succeeded"):
            raise LookupError("it leads now")
        return "etcd delete of the candidate's key"
    if backend == "zookeeper":
        from kazoo.exceptions import NoNodeError

        from tests.support_zookeeper import admin_client

        with admin_client(where, timeout=5) as zk:
            if behind is None:
                with contextlib.suppress(NoNodeError):
                    zk.delete(handle)
            else:
                ahead = zk.exists(behind)
                transaction = zk.transaction()
                if ahead is not None:
                    transaction.check(behind, ahead.version)
                transaction.delete(handle)
                if ahead is None or any(isinstance(result, Exception) for result in transaction.commit()):
                    raise LookupError("it leads now")
        return "zookeeper delete of the candidate's node"
    if backend == "postgres":  # whole_key or not: the row is the registration
        from tests.support_postgres import delete_row_at

        return delete_row_at(where[0], key, handle)
    if backend == "file":
        if whole_key:  # a copy moved over it: same name and content, another inode
            with contextlib.suppress(FileNotFoundError):
                copy = f"{handle}.nemesis"
                with open(handle, "rb") as original, open(copy, "wb") as replacement:
                    replacement.write(original.read())
                os.replace(copy, handle)
            return "file store lock file replaced"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle)
        return "file store lock file removed"
    raise ValueError(f"unknown backend {backend!r}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
