"""Keep-alive HTTP connections to one Consul agent, on the standard library's ``http.client``.

The Consul store's transport (:mod:`.client`) sends py-consul's requests through a
:class:`Pool` per agent and kind of request. A waiter's requests come after a pause (it waits
on a blocking query, then locks at once), when caches have gone cold: there a request costs
about 0.5 ms less CPU through ``http.client`` than through urllib3, whose pool, retry,
timeout and response objects wrap the same ``http.client`` (docs/stores/consul.md). This
module keeps only what the store needs of urllib3's pool:

- connections are kept alive, up to ``size`` idle ones (the most recently used first: its
  memory is the warmest); past that a request opens a connection and closes it after use;
- an idle connection the agent has closed (readable while idle: an end of file) is dropped
  before use, and a request on a reused connection that the agent closed before answering is
  sent once more on a new connection (a keep-alive closed as the request went out);
- a connect timeout (TCP and the TLS handshake) and a read timeout, raised as
  :class:`ConnectTimeout` and :class:`ReadTimeout`; other errors are the standard library's
  (``OSError``, ``ssl.SSLError``, ``http.client.HTTPException``);
- TLS from a CA file (or the system's), an optional client certificate, or no verification;
- in a forked child, /dev/null takes the place of every socket the parent opened (idle, busy
  or still connecting), before any greenlet runs there: a child's copy of a request in flight
  then fails in the child, and can neither read the parent's answer nor send the parent's
  request a second time on the shared connection (:mod:`greenleader._inherited_sockets`, each
  socket registered before it connects).

Sockets are gevent's once gevent has monkey-patched ``socket`` (the store warns otherwise).
"""

from __future__ import annotations

import http.client
import select
import ssl
from typing import NamedTuple

from gevent import monkey

from ... import _inherited_sockets

__all__ = ["Answer", "ConnectTimeout", "Pool", "ReadTimeout"]

#: The unpatched ``select.poll``: a poll with a timeout of 0 never blocks, so it needs no hub.
_poll = monkey.get_original("select", "poll")


class ConnectTimeout(Exception):
    """No connection (or no TLS handshake) within the connect timeout."""


class ReadTimeout(Exception):
    """The agent did not answer within the read timeout."""


class Answer(NamedTuple):
    status: int
    headers: http.client.HTTPMessage  # case-insensitive, as py-consul's callbacks read them
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
        self._tls = tls
        self._context: ssl.SSLContext | None = None  # made at the first connection (file errors are a request's)
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str], *,
                connect_timeout: float, read_timeout: float) -> Answer:
        """Send one request and read its whole answer."""
        sent = dict(self.headers, **headers) if headers else self.headers
        connection = self._reusable()
        if connection is not None:
            try:
                return self._exchange(connection, method, target, body, sent, read_timeout)
            except _Unanswered:
                pass  # the agent closed it as the request went out: once more, on a new connection
        connection = self._connect(connect_timeout)
        try:
            return self._exchange(connection, method, target, body, sent, read_timeout)
        except _Unanswered as unanswered:
            raise unanswered.error from None

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def forget(self) -> None:
        """Drop the idle connections without closing them (after a fork: the parent still uses
        them; the child's copies of the sockets close when collected, which sends nothing)."""
        self._idle = []

    def _reusable(self) -> http.client.HTTPConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.sock is not None and not _readable(connection.sock):
                return connection
            connection.close()  # an end of file (or stray bytes): the agent closed it
        return None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._tls is None:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        else:
            connection = _HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls_context())
        connection._create_connection = _inherited_sockets.create_connection  # type: ignore[attr-defined]
        try:
            connection.connect()
        except TimeoutError:
            connection.close()
            raise ConnectTimeout(f"connect timed out after {timeout:g}s") from None
        except BaseException:
            connection.close()
            raise
        return connection

    def _exchange(self, connection: http.client.HTTPConnection, method: str, target: str, body: bytes | None,
                  headers: dict[str, str], timeout: float) -> Answer:
        """The request on ``connection``, which goes back to the idle ones if the answer
        leaves it open; any failure closes it (its state is unknown)."""
        answered = False
        try:
            assert connection.sock is not None
            connection.sock.settimeout(timeout)
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            answered = True
            data = response.read()
        except TimeoutError:
            connection.close()
            raise ReadTimeout("read timed out") from None
        except ConnectionError as exc:  # reset, broken pipe, closed without an answer
            connection.close()
            if answered:
                raise
            raise _Unanswered(exc) from None
        except BaseException:  # another error, a deadline, a kill
            connection.close()
            raise
        if response.will_close or connection.sock is None or self._closed or len(self._idle) >= self.size:
            connection.close()
        else:
            self._idle.append(connection)
        return Answer(response.status, response.headers, data.decode("utf-8", "replace"))

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


class _HTTPSConnection(http.client.HTTPSConnection):
    """``HTTPSConnection`` whose TLS socket is registered before its handshake.

    The standard library's ``connect`` wraps the connected socket and shakes hands in one
    call; the TLS socket takes over the plain one's descriptor (the plain one then reports
    -1), so until the handshake ends a fork would leave the child a live copy. Here the
    wrap does not shake hands: the TLS socket is registered, then shakes hands (the same
    certificate and host name checks, within the connection's timeout)."""

    def __init__(self, host: str, port: int, *, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (its socket registered before it connects), no delay
        self.sock = _inherited_sockets.register(self._tls_context.wrap_socket(
            self.sock, server_hostname=self.host, do_handshake_on_connect=False))
        self.sock.do_handshake()


class _Unanswered(Exception):
    """The connection failed before an answer began: ``error``, the standard library's."""

    def __init__(self, error: ConnectionError) -> None:
        super().__init__(str(error))
        self.error = error


def _readable(sock: object) -> bool:
    """Whether an idle connection has something to read: the agent closed it (or sent stray
    bytes); either way it cannot carry a request."""
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
