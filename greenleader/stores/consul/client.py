"""Consul client adapter: py-consul on a transport of greenleader's; agents, TLS, the ACL token,
timeouts, error translation.

The recipe (:mod:`.recipe`) calls the few Consul endpoints an election needs through
:class:`ConsulClient`, whose methods call py-consul's API (``session``, ``kv``, ``txn``) and
answer in greenleader's terms: an entry or ``None``, a session id, :class:`SessionGone`, or a
:mod:`greenleader.errors` exception translated from py-consul's (``ConsulException``,
``NotFound``, ``ACLPermissionDenied``, ``Timeout``...).

py-consul lets a client bring its transport, as its own ``std`` (requests) and ``aio``
(aiohttp) modules do: :class:`_Transport` is a ``consul.base.HTTPClient`` over keep-alive
``http.client`` connections (:mod:`.connections`), two pools per agent (short requests,
bounded; blocking queries, sized for the keys watched), and :class:`_Consul`'s
``http_connect`` returns it. A request costs less CPU this way than over urllib3, most after a
pause (a waiter's requests), and a third of what py-consul's std client over requests costs
(docs/stores/consul.md). What py-consul's callbacks cannot express, the transport does before
it calls them:

- it fails over to the next agent on connection errors, timeouts and 5xx answers (a callback
  sees one answer), and raises ``consul.Timeout`` or ``ConsulException`` naming every failure;
- every request has a connect and read timeout, a blocking query its ``wait`` plus Consul's
  jitter on top (read from the request's ``index`` and ``wait``), and a hard deadline;
- the ACL token is a header of the pools, sent with every request; the ``Consul`` object has
  none, so py-consul neither omits it (``txn.put`` sends no headers) nor lets
  ``CONSUL_HTTP_TOKEN`` (read by its constructor) override an explicit token;
- ``dc`` is added to a request that lacks it (``txn.put`` sends none);
- a transaction refused with 409 raises :class:`_TxnRefused` with the errors of its body
  (py-consul's callback would raise a ClientError with the body as text);
- an answer the callback cannot read (not JSON, no ``X-Consul-Index``) is a ConsulException.

py-consul 1.6 to 1.8 share this API. 1.5 does not fit: its constructor parses
``CONSUL_HTTP_ADDR`` even when an address is given (and raises on ``https://host:port``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import ssl
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import consul
import consul.base
import gevent
from consul.exceptions import BadRequest, ClientError
from gevent.lock import BoundedSemaphore

from ...errors import InvalidArgumentError, PermissionDeniedError, StoreError, StoreUnavailableError
from .._security import check_secret, read_secret
from .connections import ConnectTimeout, Pool, ReadTimeout

__all__ = ["DEFAULT_ADDR", "LOCK_FLAG", "POOL_SIZE", "ConsulClient", "SessionGone", "holder_of", "parse_addr",
           "resolve_token"]

log = logging.getLogger("greenleader.stores.consul")

DEFAULT_ADDR = "127.0.0.1:8500"
#: Flags of every key greenleader locks: Consul's Go ``api.LockFlagValue``, which ``consul lock``
#: (``api.Lock``) requires of an existing lock key before it waits for it (docs/interop.md).
LOCK_FLAG = 0x2DDCCBC058A50C18
#: Connections for blocking queries, per agent. Each holds one while it waits: one per key
#: waited on or followed, one per shared session; past this a request opens an extra connection
#: and closes it after use. Consul agents accept 200 connections per client address
#: (``limits.http_max_conns_per_client``), which bounds the keys one process can watch at once.
POOL_SIZE = 128
#: Connections for short requests, per agent; a burst waits for a free one (1,000 candidates
#: starting at once sent 1,000 requests on 1,000 connections, and the agent closed ~800 of them).
SHORT_POOL_SIZE = 16
_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")\]]*")
_SSL_REASON = re.compile(r"\[SSL: \w+\].*?\(_ssl\.c:\d+\)")


class SessionGone(StoreError):
    """Consul no longer knows the session (renew answered 404, a lock said "invalid session")."""


class _Deadline(Exception):
    """A request outlived its hard time limit (a backstop behind the socket timeouts)."""


class _TxnRefused(consul.ConsulException):
    """Consul refused a transaction (409): the ``What`` of each of its errors."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def holder_of(entry: dict[str, Any] | None) -> tuple[str, int] | None:
    """``(node, term)`` of a locked entry, or None when it is vacant (absent or unlocked).
    The entry's ``Value`` is bytes, as py-consul's ``kv.get`` gives it."""
    if entry is None or not entry.get("Session"):
        return None
    node = (entry.get("Value") or b"").decode("utf-8", "replace")
    return node, int(entry["ModifyIndex"])


def parse_addr(addr: object) -> tuple[str, int]:
    if not isinstance(addr, str) or not addr.strip():
        raise InvalidArgumentError(f"a Consul address must be a 'host:port' string, not {addr!r}")
    text = addr.strip()
    if "://" in text:
        raise InvalidArgumentError(f"give Consul addresses as host:port, not {text!r}; set scheme='https' for TLS")
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"bad Consul address {text!r}: {exc}") from None
    if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidArgumentError(f"bad Consul address {text!r}; expected host:port")
    if port == 0:
        raise InvalidArgumentError(f"bad port in Consul address {text!r}")
    labels = parts.hostname.rstrip(".").split(".")
    if len(parts.hostname) > 253 or not all(0 < len(label) <= 63 for label in labels):
        raise InvalidArgumentError(f"bad Consul address {text[:80]!r}: not a valid host name")  # idna would raise
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port or 8500


def resolve_token(token: object, token_file: object) -> tuple[str | None, str | None]:
    """``(token, source)``: the explicit token, else ``CONSUL_HTTP_TOKEN``, else the file named by
    ``CONSUL_HTTP_TOKEN_FILE``, else none. The environment never overrides an explicit token."""
    env = {name: os.environ.get(name) or None for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")}
    explicit = read_secret("token", token or None, "token_file", token_file)
    if explicit is not None:
        source = "token" if token_file is None else "token_file"
        ignored = [name for name, value in env.items() if value]
        if ignored:
            log.info("consul: %s set but ignored: the %s option was given", " and ".join(ignored), source)
        return explicit, source
    secret: str | None
    if env["CONSUL_HTTP_TOKEN"]:
        source = "CONSUL_HTTP_TOKEN"
        secret = check_secret("CONSUL_HTTP_TOKEN", env["CONSUL_HTTP_TOKEN"])
    elif env["CONSUL_HTTP_TOKEN_FILE"]:
        source = "CONSUL_HTTP_TOKEN_FILE"
        secret = read_secret("token", None, "CONSUL_HTTP_TOKEN_FILE", env["CONSUL_HTTP_TOKEN_FILE"])
    else:
        return None, None
    log.info("consul: using the ACL token from %s (no token or token_file option was given)", source)
    return secret, source


def _new_pool(scheme: str, host: str, port: int, token: str | None, verify: bool | str,
              cert: str | tuple[str, str] | None, *, size: int) -> Pool:
    """A connection pool to one agent: ``size`` connections kept; the token in a header."""
    headers = {"X-Consul-Token": token} if token else {}
    return Pool(host, port, headers, None if scheme == "http" else (verify, cert), size=size)


class _Endpoint:
    """One agent: its address and two connection pools: ``http`` for short requests, ``long``
    for blocking queries, so that waiting queries never hold up a renewal."""

    def __init__(self, addr: str, scheme: str, token: str | None, verify: bool | str,
                 cert: str | tuple[str, str] | None) -> None:
        host, port = parse_addr(addr)
        self.addr = f"{host}:{port}"
        self._settings = (scheme, host, port, token, verify, cert)
        self.http = _new_pool(*self._settings, size=SHORT_POOL_SIZE)
        self.long = _new_pool(*self._settings, size=POOL_SIZE)
        self.short_slots = BoundedSemaphore(SHORT_POOL_SIZE)  # short requests in flight

    def slots(self, blocking: float) -> AbstractContextManager[Any]:
        """What a request holds while it is sent: a short request, one of the short slots."""
        return nullcontext() if blocking else self.short_slots

    def close(self) -> None:
        self.http.close()
        self.long.close()

    def reconnect_after_fork(self) -> None:
        """Use new connections: the pooled ones are shared with the parent. Dropping them only
        closes this process's descriptors, which sends nothing while the parent has its own."""
        self.http.forget()
        self.long.forget()


class _Transport(consul.base.HTTPClient):
    """py-consul's HTTP client interface over connection pools to the agents ``endpoints``.

    Requests go to the agent that last answered; connection errors, timeouts and 5xx answers
    fail over to the next. Every request has a connect and read timeout (``timeout``); a
    blocking query also gets its ``wait`` plus Consul's jitter (``wait/16``), and a hard
    deadline backs both, so a partition never hangs a caller.
    """

    def __init__(self, endpoints: list[_Endpoint], *, scheme: str, timeout: float, dc: str | None,
                 token: str | None) -> None:
        host, port = parse_addr(endpoints[0].addr)
        super().__init__(host, port, scheme)
        self.endpoints = endpoints
        self.timeout = timeout
        self.dc = dc
        self.current = 0
        self._token = token

    def get(self, callback: Callable[[Any], Any], path: str, params: Any = None,
            headers: dict[str, str] | None = None, **_: Any) -> Any:
        return self._send(callback, "GET", path, params, None, headers)

    def put(self, callback: Callable[[Any], Any], path: str, params: Any = None, data: str | bytes | None = "",
            headers: dict[str, str] | None = None, **_: Any) -> Any:
        return self._send(callback, "PUT", path, params, data, headers)

    def delete(self, callback: Callable[[Any], Any], path: str, params: Any = None, data: str | bytes | None = "",
               headers: dict[str, str] | None = None, **_: Any) -> Any:
        return self._send(callback, "DELETE", path, params, data, headers)

    def post(self, callback: Callable[[Any], Any], path: str, params: Any = None, data: str | bytes | None = "",
             headers: dict[str, str] | None = None, **_: Any) -> Any:
        return self._send(callback, "POST", path, params, data, headers)

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()

    def _send(self, callback: Callable[[Any], Any], method: str, path: str, params: Any,
              data: str | bytes | None, headers: dict[str, str] | None) -> Any:
        payload = (data.encode("utf-8") if isinstance(data, str) else data) or None  # py-consul's "": none
        params = list(params or ())
        names = {name for name, _ in params}
        if self.dc and "dc" not in names:
            params.append(("dc", self.dc))
        blocking = _blocking(params) if "index" in names else 0.0
        target = quote(path, safe="/:") + ("?" + urlencode(params) if params else "")
        limit = 2 * self.timeout + blocking + 1.0
        failures: list[str] = []
        timeouts = 0
        count = len(self.endpoints)
        first = self.current
        for attempt in range(count):
            position = (first + attempt) % count
            endpoint = self.endpoints[position]
            pool = endpoint.long if blocking else endpoint.http
            try:
                with endpoint.slots(blocking), gevent.Timeout(limit, _Deadline(f"no answer within {limit:g}s")):
                    answer = pool.request(method, target, payload, headers or {}, connect_timeout=self.timeout,
                                          read_timeout=self.timeout + blocking)
                status, body = answer.status, answer.body
            except (ConnectTimeout, ReadTimeout, _Deadline, OSError, HTTPException) as exc:
                timeouts += _timed_out(exc)
                failures.append(f"{endpoint.addr}: {self.describe(exc)}")
                log.debug("consul: %s %s failed: %s", method, path, failures[-1])
                continue
            if status >= 500 and "invalid session" not in body.lower():  # no leader, RPC failure: another agent
                failures.append(f"{endpoint.addr}: {status} {self.hide(body.strip())[:200]}")
                continue
            if position != self.current:
                log.warning("consul: now using agent %s (after: %s)", endpoint.addr, "; ".join(failures))
                self.current = position
            if status == 409 and path == "/v1/txn":
                raise _TxnRefused(_txn_errors(body))
            try:
                return callback(consul.base.Response(status, answer.headers, body))
            except (ValueError, KeyError, TypeError, IndexError) as exc:  # py-consul 1.6 lets these out
                raise consul.ConsulException(f"{status} unreadable answer ({type(exc).__name__}: {exc})") from None
        error = consul.Timeout if timeouts == count else consul.ConsulException
        raise error("; ".join(failures))

    def describe(self, exc: BaseException) -> str:
        if isinstance(exc, (ConnectTimeout, ReadTimeout)):
            text = str(exc)
        elif isinstance(exc, ssl.SSLError) or "[SSL" in str(exc):
            reason = _SSL_REASON.search(str(exc))
            text = (f"TLS failed: {reason.group(0) if reason else exc}; check ca_file, cert_file and key_file, "
                    "that the agent serves HTTPS on this port, and that its certificate names the host connected to")
        elif isinstance(exc, OSError) and (errno := _ERRNO.search(str(exc))):
            text = f"connection failed: {errno.group(0)}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self.hide(" ".join(text.split()))[:400]

    def hide(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


class _Consul(consul.base.Consul):
    """py-consul's API on :class:`_Transport`. Every argument is explicit, so py-consul reads
    nothing from the environment; the token is the transport's (the pools' header)."""

    def __init__(self, transport: _Transport, dc: str | None) -> None:
        self._transport = transport
        super().__init__(host=transport.host, port=transport.port, scheme=transport.scheme, dc=dc, verify=True)
        self.token = None  # the constructor read CONSUL_HTTP_TOKEN; the pools send the resolved token

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        return self._transport


class ConsulClient:
    """The Consul endpoints of an election, on agents ``addrs`` of one cluster, through
    py-consul on :class:`_Transport` (which fails over between the agents)."""

    def __init__(self, addrs: list[str], *, scheme: str, dc: str | None, timeout: float, token: str | None,
                 token_source: str | None, verify: bool | str, cert: str | tuple[str, str] | None) -> None:
        self.dc = dc
        self.timeout = timeout
        self.token_source = token_source
        self._token = token
        self.endpoints = [_Endpoint(addr, scheme, token, verify, cert) for addr in addrs]
        self._transport = _Transport(self.endpoints, scheme=scheme, timeout=timeout, dc=dc, token=token)
        self.consul = _Consul(self._transport, dc)

    @property
    def active_addr(self) -> str:
        return self.endpoints[self._transport.current].addr

    def close(self) -> None:
        self._transport.close()

    def after_fork_in_child(self) -> None:
        for endpoint in self.endpoints:
            endpoint.reconnect_after_fork()

    # -- the endpoints an election uses --------------------------------------------------------

    def create_session(self, name: str, ttl: float, lock_delay: float) -> str:
        """A session with ``ttl``, ``behavior=delete``, ``lock_delay`` and no health checks."""
        session_id = self._call("create a session", self.consul.session.create, name=name[:200], checks=[],
                                lock_delay=_seconds(lock_delay), behavior="delete", ttl=_seconds(ttl))
        if not isinstance(session_id, str):
            raise StoreUnavailableError(f"{self.active_addr} did not create a Consul session (is it a Consul agent?)")
        return session_id

    def renew_session(self, session_id: str) -> None:
        """Extend the session by its TTL; SessionGone if Consul no longer has it."""
        self._call("renew the session", self.consul.session.renew, session_id, gone_on_404=True)

    def destroy_session(self, session_id: str) -> None:
        self._call("destroy the session", self.consul.session.destroy, session_id)

    def session_exists(self, session_id: str, index: int | None = None, wait: float = 0.0) -> tuple[int, bool]:
        """``(index, whether Consul knows the session)``; with ``index``, a blocking query that
        returns when the session changes (or after ``wait``). Consul hides a session the token
        may not read (``session:read``): it then counts as gone."""
        new_index, answer = self._read("read a session", self.consul.session.info, session_id, index, wait)
        return new_index, bool(answer)

    def get(self, key: str, index: int | None = None, wait: float = 0.0) -> tuple[int, dict[str, Any] | None]:
        """``(index, entry or None)`` of ``key``; with ``index``, a blocking query."""
        new_index, entry = self._read("read the key" if index is None else "watch the key", self.consul.kv.get,
                                      key, index, wait)
        if index is not None and new_index < index:
            new_index = 0  # the index went backwards (a restored snapshot): start over
        return new_index, entry

    def lock(self, key: str, node: str, session_id: str) -> dict[str, Any] | None:
        """Lock ``key`` for the session (with :data:`LOCK_FLAG`) and read it back, in one
        transaction: the entry if locked, None if refused (held, or a lock-delay);
        SessionGone if Consul no longer knows the session."""
        value = base64.b64encode(node.encode("utf-8")).decode("ascii")
        ops = [{"KV": {"Verb": "lock", "Key": key, "Value": value, "Flags": LOCK_FLAG, "Session": session_id}},
               {"KV": {"Verb": "get", "Key": key}}]
        try:
            answer = self._call("lock the key", self.consul.txn.put, ops)
        except _TxnRefused as refused:
            reasons = str(refused)
            if "invalid session" in reasons:
                raise SessionGone(f"Consul refused to lock {key!r}: {reasons}") from None
            if "Permission denied" in reasons:  # Consul 1.8 answers 403, but a txn may say it so
                raise PermissionDeniedError(f"Consul refused to lock {key!r}: {reasons}") from None
            return None
        return _decoded(self._results(answer)[1]["KV"])

    def read_many(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        """The entries of up to 64 keys (Consul's limit per transaction), in one request."""
        ops = [{"KV": {"Verb": "get", "Key": key}} for key in keys]
        # A get of a missing key fails the transaction; check-not-exists cannot be or-ed, so a
        # refused batch is read again key by key (rare: it takes a key deleted from outside).
        try:
            answer = self._call("read the keys", self.consul.txn.put, ops)
        except _TxnRefused:
            return {key: self.get(key)[1] for key in keys}
        return {result["KV"]["Key"]: _decoded(result["KV"]) for result in self._results(answer)}

    def release(self, key: str, session_id: str) -> bool:
        """Unlock ``key`` if the session holds it (``?release=``); the key stays, vacant, and
        Consul applies no lock-delay. False if the session did not hold it."""
        return self._call("release the key", self.consul.kv.put, key, None, release=session_id,
                          flags=LOCK_FLAG) is True

    def put_vacant_if_absent(self, key: str) -> bool:
        """Create ``key`` vacant (no session, the lock flag) unless it exists (``?cas=0``)."""
        return self._call("write the key", self.consul.kv.put, key, None, cas=0, flags=LOCK_FLAG) is True

    # -- py-consul's answers and errors in greenleader's terms ---------------------------------

    def _read(self, what: str, request: Callable[..., Any], name: str, index: int | None,
              wait: float) -> tuple[int, Any]:
        """A read through py-consul: ``(index, answer)``; with ``index``, a blocking query."""
        if index is None:
            new_index, answer = self._call(what, request, name)
        else:  # Consul answers an index of 0 at once; never loop on it
            new_index, answer = self._call(what, request, name, index=max(index, 1),
                                           wait=f"{math.ceil(wait * 1000)}ms")
        try:
            return int(new_index or 0), answer
        except ValueError:
            raise StoreUnavailableError(f"{self.active_addr} answered a bad X-Consul-Index "
                                        f"{str(new_index)[:40]!r} (is it a Consul agent?)") from None

    def _results(self, answer: Any) -> list[dict[str, Any]]:
        if not isinstance(answer, dict) or not isinstance(answer.get("Results"), list):
            raise StoreUnavailableError(f"{self.active_addr} did not answer a Consul transaction (not a Consul agent?)")
        return answer["Results"]

    def _call(self, what: str, request: Callable[..., Any], *args: Any, gone_on_404: bool = False,
              **kwargs: Any) -> Any:
        """``request(*args, **kwargs)``, py-consul's exceptions translated (a refused
        transaction, :class:`_TxnRefused`, is the caller's to read)."""
        try:
            return request(*args, **kwargs)
        except _TxnRefused:
            raise
        except consul.ConsulException as exc:
            raise self._translate(what, exc, gone_on_404) from None

    def _translate(self, what: str, exc: consul.ConsulException, gone_on_404: bool) -> StoreError:
        text = self._transport.hide(str(exc))
        message = f"Consul agent {self.active_addr} refused to {what}: {text[:400]}"
        if isinstance(exc, consul.NotFound):  # where a 404 is no answer (a renewal)
            return SessionGone(message) if gone_on_404 else StoreUnavailableError(f"{message} (is it a Consul agent?)")
        if isinstance(exc, (consul.ACLPermissionDenied, consul.ACLDisabled)):  # 403, 401
            token = f"the ACL token (from {self.token_source})" if self._token else "the anonymous token (none given)"
            if "ACL not found" in text:
                return PermissionDeniedError(f"{message}: Consul does not know {token}")
            return PermissionDeniedError(f"{message}: {token} lacks the permission (see the ACL policy "
                                         "in greenleader's docs/security.md)")
        if "invalid session" in text.lower():
            return SessionGone(message)
        if isinstance(exc, BadRequest):
            if "HTTPS server" in text:
                message += "; this agent serves HTTPS: give ca_file (or tls=true)"
            return InvalidArgumentError(message)
        if isinstance(exc, ClientError):  # another 4xx: "<status> <body>"
            return StoreUnavailableError(message) if text.startswith("429") else StoreError(message)
        # every agent failed (connection, timeout, 5xx), or an answer py-consul could not read
        return StoreUnavailableError(f"could not {what} on Consul: {text[:800]}")


def _blocking(params: list[tuple[str, Any]]) -> float:
    """Seconds a blocking query may wait: its ``wait`` (Consul's default: 5 minutes) plus
    Consul's jitter of up to ``wait/16``."""
    wait = 300.0
    for name, value in params:
        if name == "wait" and (match := _DURATION.fullmatch(str(value))):
            wait = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return wait + wait / 16


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (_Deadline, ReadTimeout, ConnectTimeout))


def _txn_errors(body: str) -> list[str]:
    """The ``What`` of each error in a refused transaction's body."""
    try:
        errors = json.loads(body).get("Errors") or []
        return [str(error.get("What")) for error in errors] or ["transaction refused"]
    except (ValueError, AttributeError, TypeError):
        return [f"transaction refused: {body.strip()[:200]}"]


def _decoded(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A transaction's entry as ``kv.get`` gives it: ``Value`` base64-decoded to bytes."""
    if entry is not None and isinstance(entry.get("Value"), str):
        entry["Value"] = base64.b64decode(entry["Value"])
    return entry


def _seconds(value: float) -> int | float:
    """Whole seconds as an int, so Consul gets "10s" rather than "10.0s"."""
    return int(value) if float(value).is_integer() else value
