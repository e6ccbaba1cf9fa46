"""A loopback TCP proxy that counts the requests clients send to a store server.

Each protocol gets a small frame parser on the client-to-server stream:

- ``http`` (Consul): one request per ``HTTP/1.1`` request line.
- ``grpc`` (etcd): one request per HTTP/2 HEADERS frame, that is per gRPC call started (a
  unary call, a keepalive stream, a watch stream); client PING frames are counted apart.
- ``zookeeper``: one request per length-prefixed packet, except pings (xid -2), counted apart,
  and the session's connect packet.

The counts are for the benchmark only: the proxy adds one loopback hop, so it is used for
the cost and contention figures, never for handover or failover latencies.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from typing import Protocol

import gevent
from gevent.server import StreamServer

log = logging.getLogger(__name__)

_CHUNK = 65536


class _Parser(Protocol):
    def feed(self, data: bytes) -> None: ...


class Http1Parser:
    PATTERN = b" HTTP/1.1\r\n"

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.tail = b""

    def feed(self, data: bytes) -> None:
        buf = self.tail + data
        self.counts["requests"] += buf.count(self.PATTERN)
        self.tail = buf[-(len(self.PATTERN) - 1):]


class Http2Parser:
    PREFACE = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    HEADERS, PING = 0x1, 0x6

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.preface = self.PREFACE
        self.head = b""
        self.skip = 0

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        if self.preface:
            taken = min(self.preface, size)
            self.preface -= taken
            pos = taken
        while pos < size:
            if self.skip:
                taken = min(self.skip, size - pos)
                self.skip -= taken
                pos += taken
                continue
            need = 9 - len(self.head)
            self.head += data[pos:pos + need]
            pos += min(need, size - pos)
            if len(self.head) < 9:
                return
            length, kind, flags = int.from_bytes(self.head[:3], "big"), self.head[3], self.head[4]
            if kind == self.HEADERS:
                self.counts["requests"] += 1
            elif kind == self.PING and not flags & 0x1:
                self.counts["pings"] += 1
            self.head, self.skip = b"", length


class ZooKeeperParser:
    PING_XID = -2

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.buf = b""
        self.skip = 0
        self.connected = False

    def feed(self, data: bytes) -> None:
        if self.skip:
            taken = min(self.skip, len(data))
            self.skip -= taken
            data = data[taken:]
        self.buf += data
        while len(self.buf) >= 4:
            length = int.from_bytes(self.buf[:4], "big", signed=True)
            if not self.connected:
                if len(self.buf) < 4 + length:
                    return
                self.connected = True
                self.counts["connects"] += 1
                self.buf = self.buf[4 + length:]
                continue
            if len(self.buf) < 8:
                return
            xid = int.from_bytes(self.buf[4:8], "big", signed=True)
            self.counts["pings" if xid == self.PING_XID else "requests"] += 1
            available = len(self.buf) - 4
            if available >= length:
                self.buf = self.buf[4 + length:]
            else:
                self.skip = length - available
                self.buf = b""
                return


PARSERS = {"consul": Http1Parser, "etcd": Http2Parser, "zookeeper": ZooKeeperParser}


class CountingProxy:
    """Listens on a free loopback port (:attr:`addr`) and forwards to ``upstream``."""

    def __init__(self, kind: str, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.parser = PARSERS[kind]
        self.counts: Counter[str] = Counter()
        self._greenlets: set[gevent.Greenlet] = set()
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.addr = f"127.0.0.1:{self._server.server_port}"

    def __repr__(self) -> str:
        return f"<CountingProxy {self.addr} -> {self.upstream[0]}:{self.upstream[1]} {dict(self.counts)}>"

    def snapshot(self) -> Counter[str]:
        return Counter(self.counts)

    def _handle(self, client: socket.socket, _address: object) -> None:
        self._greenlets.add(gevent.getcurrent())
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError as exc:
            log.warning("%r: upstream connect failed: %s", self, exc)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counts["connections"] += 1
        parser = self.parser(self.counts)
        pumps = [gevent.spawn(self._pump, client, upstream, parser), gevent.spawn(self._pump, upstream, client, None)]
        try:
            gevent.joinall(pumps, count=1)
        finally:
            gevent.killall(pumps)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
            self._greenlets.discard(gevent.getcurrent())

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, parser: _Parser | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_CHUNK):
                if parser is not None:
                    parser.feed(data)
                dst.sendall(data)

    def close(self) -> None:
        self._server.stop(timeout=1)
        gevent.killall(list(self._greenlets), timeout=2)
