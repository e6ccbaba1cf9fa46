"""Keep-alive HTTP/1.1 connections to one Consul agent, on gevent's sockets.

The Consul store's transport (:mod:`.client`) sends py-consul's requests through a
:class:`Pool` per agent and kind of request. A waiter's requests come after a pause (it waits
on a blocking query, then locks at once), when caches have gone cold: there a request costs
about 1.0 ms of CPU through ``http.client`` and 1.5 through urllib3 (which wraps
``http.client``), against 0.3-0.4 ms for the bytes alone on a socket: ``http.client`` builds a
response object, a file on the socket and an ``email`` message of the headers for each
answer (docs/stores/consul.md). The agent's answers are plain HTTP/1.1 (a status line,
headers, a body of ``Content-Length`` bytes or chunked), so this module reads them itself,
and keeps only what the store needs of a connection pool:

- connections are kept alive, up to ``size`` idle ones (the most recently used first: its
  memory is the warmest); past that a request opens a connection and closes it after use;
- an idle connection the agent has closed (readable while idle: an end of file) is dropped
  before use, and a request on a reused connection that the agent closed before answering is
  sent once more on a new connection (a keep-alive closed as the request went out);
- a connect timeout (TCP and the TLS handshake) and a read timeout, raised as
  :class:`ConnectTimeout` and :class:`ReadTimeout`; an answer that is not HTTP raises
  :class:`BadAnswer`; other errors are the standard library's (``OSError``, ``ssl.SSLError``);
- TLS from a CA file (or the system's), an optional client certificate, or no verification.

Sockets are gevent's once gevent has monkey-patched ``socket`` (the store warns otherwise).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
from typing import NamedTuple

from gevent import monkey

__all__ = ["Answer", "BadAnswer", "ConnectTimeout", "Headers", "Pool", "ReadTimeout"]

#: The unpatched ``select.poll``: a poll with a timeout of 0 never blocks, so it needs no hub.
_poll = monkey.get_original("select", "poll")
#: Bytes asked of the socket at a time: Consul's answers to an election's requests are well
#: under a kilobyte, so one read usually holds the whole answer.
_CHUNK = 65536
#: The most bytes of status line and headers accepted: a Consul agent sends a few hundred; more
#: is not an agent (and must not grow without bound).
_MAX_HEAD = 65536


class ConnectTimeout(Exception):
    """No connection (or no TLS handshake) within the connect timeout."""


class ReadTimeout(Exception):
    """The agent did not answer within the read timeout."""


class BadAnswer(http.client.HTTPException):
    """The other end's answer is not HTTP/1.x (not a Consul agent), or it stopped mid-answer."""


class Headers(dict[str, str]):
    """An answer's headers, their names lower-cased; looked up in any case (py-consul asks for
    ``X-Consul-Index``)."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


class Answer(NamedTuple):
    status: int
    headers: Headers
    body: str


class Pool:
    """Connections to the agent at ``host:port``; ``headers`` go with every request (the ACL
    token). ``tls`` is None for plain HTTP, else ``(verify, cert)``: ``verify`` True (the
    system's CAs), a CA file, or False; ``cert`` a certificate file (with its key), a
    ``(cert_file, key_file)`` pair, or None."""

    def __init__(self, host: str, port: int, headers: dict[str, str],
                 tls: tuple[bool | str, str | tuple[str, str] | None] | None, *, size: int) -> None:
        self.headers = headers
        self.size = size
        self._host = host.strip("[]")
        self._port = port
        self._host_header = f"{host}:{port}"  # host as given: an IPv6 address in brackets
        self._tls = tls
        self._context: ssl.SSLContext | None = None  # made at the first connection (file errors are a request's)
        self._idle: list[socket.socket] = []
        self._closed = False

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str], *,
                connect_timeout: float, read_timeout: float) -> Answer:
        """Send one request and read its whole answer."""
        message = self._message(method, target, body, headers)
        sock = self._reusable()
        if sock is not None:
            try:
                return self._exchange(sock, message, read_timeout)
            except _Unanswered:
                pass  # the agent closed it as the request went out: once more, on a new connection
        sock = self._connect(connect_timeout)
        try:
            return self._exchange(sock, message, read_timeout)
        except _Unanswered as unanswered:
            raise unanswered.error from None

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def forget(self) -> None:
        """Drop the idle connections without closing them (after a fork: the parent still uses
        them; the child's copies of the sockets close when collected, which sends nothing)."""
        self._idle = []

    def _message(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        if body or method != "GET":
            lines.append(f"Content-Length: {len(body or b'')}")
        for name, value in (dict(self.headers, **headers) if headers else self.headers).items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"invalid header {name!r}")  # never sent; the token is checked before
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def _reusable(self) -> socket.socket | None:
        while self._idle:
            sock = self._idle.pop()
            if not _readable(sock):
                return sock
            sock.close()  # an end of file (or stray bytes): the agent closed it
        return None

    def _connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection((self._host, self._port), timeout)
        except TimeoutError:
            raise ConnectTimeout(f"connect timed out after {timeout:g}s") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self._host)
        except TimeoutError:
            sock.close()
            raise ConnectTimeout(f"connect timed out after {timeout:g}s") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _exchange(self, sock: socket.socket, message: bytes, timeout: float) -> Answer:
        """The request on ``sock``, which goes back to the idle ones if the answer leaves it
        open; any failure closes it (its state is unknown)."""
        reader = _Reader(sock)
        try:
            sock.settimeout(timeout)
            sock.sendall(message)
            status, headers, keep = reader.head()
            data = b"" if status in (204, 304) or status < 200 else reader.body(headers)
            keep = keep and reader.delimited
        except TimeoutError:
            sock.close()
            raise ReadTimeout("read timed out") from None
        except ConnectionError as exc:  # reset, broken pipe
            sock.close()
            if reader.received:
                raise
            raise _Unanswered(exc) from None
        except BaseException:  # not HTTP, a deadline, a kill
            sock.close()
            raise
        if not keep or reader.left or self._closed or len(self._idle) >= self.size:
            sock.close()
        else:
            self._idle.append(sock)
        return Answer(status, headers, data.decode("utf-8", "replace"))

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            assert self._tls is not None
            verify, cert = self._tls
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if isinstance(cert, tuple):
                context.load_cert_chain(cert[0], cert[1])
            elif cert:
                context.load_cert_chain(cert)
            self._context = context
        return self._context


class _Reader:
    """One HTTP/1.x answer read from a socket: the status line and headers, then the body (by
    ``Content-Length``, chunked, or up to the end of the connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.received = False  # any byte of an answer: a failure after it is not "unanswered"
        self.delimited = True  # the body's end was told (a length, chunks): the connection can go on

    @property
    def left(self) -> bool:
        """Bytes past the answer (nothing was asked for them): the connection is not reused."""
        return bool(self.buffer)

    def head(self) -> tuple[int, Headers, bool]:
        """``(status, headers, whether the connection stays open)``."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise BadAnswer(f"no end of the answer's headers within {_MAX_HEAD} bytes")
            if not self._fill():
                if self.received:
                    raise BadAnswer("the connection closed mid-answer")
                raise http.client.RemoteDisconnected("Remote end closed connection without response")
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        del self.buffer[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise BadAnswer(f"not an HTTP answer: {lines[0][:80]!r}")
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise BadAnswer(f"bad header line in the answer: {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        return int(code), headers, keep

    def body(self, headers: Headers) -> bytes:
        """The body: chunked, of ``Content-Length`` bytes, or else up to the end of the
        connection (then not :attr:`delimited`)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._chunked()
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadAnswer(f"bad Content-Length in the answer: {length[:40]!r}")
            return self._exactly(int(length))
        self.delimited = False
        while self._fill():
            pass
        data, self.buffer = bytes(self.buffer), bytearray()
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size_line = self._line()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadAnswer(f"bad chunk size in the answer: {size_line[:40]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to an empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._line():
                raise BadAnswer("a chunk of the answer is longer than it said")

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise BadAnswer(f"no end of line within {_MAX_HEAD} bytes")
            if not self._fill():
                raise BadAnswer("the connection closed mid-answer")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        return line

    def _exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill():
                raise BadAnswer("the connection closed mid-answer")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def _fill(self) -> bool:
        """Read what the socket has into the buffer; False at the end of the connection."""
        data = self.sock.recv(_CHUNK)
        if not data:
            return False
        self.received = True
        self.buffer += data
        return True


class _Unanswered(Exception):
    """The connection failed before an answer began: ``error``, the standard library's."""

    def __init__(self, error: ConnectionError) -> None:
        super().__init__(str(error))
        self.error = error


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: the agent closed it (or sent stray
    bytes); either way it cannot carry a request."""
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
