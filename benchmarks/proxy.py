"""A loopback TCP proxy that counts the requests clients send to a store server.

Each protocol gets a small frame parser on the client-to-server stream:

- Consul: one request per ``HTTP/1.1`` request line; session renewals are also counted as
  ``keepalives``.
- etcd: one request per gRPC message the client sends (an HTTP/2 DATA frame with a payload:
  a unary call's request, each message on a stream), so that a keepalive sent on a long-lived
  ``LeaseKeepAlive`` stream counts as much as one sent on a stream of its own (one call each,
  as python-etcd3 did); lease keepalives are also counted as ``keepalives`` (the ``:path`` of
  their stream, decoded with hpack); client PING frames are counted apart (``pings``).
- ZooKeeper: one request per length-prefixed packet, except pings (xid -2), counted apart
  (``pings``), and the session's connect packet.

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

try:
    import hpack  # the bench extra; without it etcd keepalives are not told apart
except ImportError:  # pragma: no cover
    hpack = None

log = logging.getLogger(__name__)

_CHUNK = 65536


class _Parser(Protocol):
    def feed(self, data: bytes) -> None: ...


class Http1Parser:
    """Consul: requests, and session renewals among them (``keepalives``)."""

    PATTERN = b" HTTP/1.1\r\n"
    RENEWAL = b"PUT /v1/session/renew/"
    TAIL = max(len(PATTERN), len(RENEWAL)) - 1

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.tail = b""

    def feed(self, data: bytes) -> None:
        buf = self.tail + data
        # a pattern found wholly in the tail was counted with the previous chunk
        self.counts["requests"] += buf.count(self.PATTERN) - self.tail.count(self.PATTERN)
        self.counts["keepalives"] += buf.count(self.RENEWAL) - self.tail.count(self.RENEWAL)
        self.tail = buf[-self.TAIL:]


class Http2Parser:
    """etcd: gRPC messages (DATA frames with a payload), lease keepalives among them
    (``keepalives``, from their stream's ``:path``, decoded with hpack when it is installed),
    and client PINGs."""

    PREFACE = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    DATA, HEADERS, PING, CONTINUATION = 0x0, 0x1, 0x6, 0x9
    KEEPALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.preface = self.PREFACE
        self.buf = b""
        self.block = b""
        self.block_stream = 0
        self.keepalive_streams: set[int] = set()
        self.decoder = hpack.Decoder() if hpack is not None else None

    def feed(self, data: bytes) -> None:
        if self.preface:
            taken = min(self.preface, len(data))
            self.preface -= taken
            data = data[taken:]
        self.buf += data
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags, payload = self.buf[3], self.buf[4], self.buf[9:9 + length]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            self.buf = self.buf[9 + length:]
            if kind == self.DATA and payload:
                self.counts["requests"] += 1
                self.counts["keepalives"] += stream in self.keepalive_streams
            elif kind == self.HEADERS:
                if flags & 0x8:  # PADDED
                    payload = payload[1:len(payload) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                self.block, self.block_stream = payload, stream
            elif kind == self.CONTINUATION:
                self.block += payload
            elif kind == self.PING and not flags & 0x1:
                self.counts["pings"] += 1
            if kind in (self.HEADERS, self.CONTINUATION) and flags & 0x4:  # END_HEADERS
                self._headers()

    def _headers(self) -> None:
        block, self.block = self.block, b""
        if self.decoder is None:
            return
        try:
            headers = self.decoder.decode(block)
        except hpack.HPACKError:
            log.warning("cannot decode an HTTP/2 header block; no more keepalive counts on this connection")
            self.decoder = None
            return
        path = next((value for name, value in headers if name in (":path", b":path")), "")
        if (path.decode() if isinstance(path, bytes) else path) == self.KEEPALIVE:
            self.keepalive_streams.add(self.block_stream)


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
