"""Consul client adapter: HTTP transport, agents, TLS, the ACL token, timeouts, error translation.

The recipe (:mod:`.recipe`) calls the few Consul endpoints an election needs through
:class:`ConsulClient`, whose methods answer in greenleader's terms: an entry or ``None``, a
session id, :class:`SessionGone`, or a :mod:`greenleader.errors` exception.

Requests go through urllib3 (the transport under requests and py-consul), two connection
pools per agent: one for short requests, bounded, and one for blocking queries, sized for the
keys watched. A request costs ~1.6 ms of CPU this way against ~3 ms through py-consul or
requests (docs/stores/consul.md); py-consul supplies nothing the few endpoints below need.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import gevent
import urllib3
from gevent.lock import BoundedSemaphore

from ...errors import InvalidArgumentError, PermissionDeniedError, StoreError, StoreUnavailableError
from .._security import check_secret, read_secret

__all__ = ["DEFAULT_ADDR", "LOCK_FLAG", "POOL_SIZE", "ConsulClient", "SessionGone", "holder_of", "parse_addr",
           "resolve_token"]

log = logging.getLogger("greenleader.stores.consul")

DEFAULT_ADDR = "127.0.0.1:8500"
#: Flags of every key greenleader locks: Consul's Go ``api.LockFlagValue``, which ``consul lock``
#: (``api.Lock``) requires of an existing lock key before it waits for it (docs/interop.md).
LOCK_FLAG = 0x2DDCCBC058A50C18
#: Connections for blocking queries, per agent. Each holds one while it waits: one per key
#: waited on or followed, one per shared session; past this urllib3 opens extra connections and
#: closes them after use. Consul agents accept 200 connections per client address
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


class _Answer(Exception):
    """An HTTP answer that is not a success: its status and body."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


def holder_of(entry: dict[str, Any] | None) -> tuple[str, int] | None:
    """``(node, term)`` of a locked entry, or None when it is vacant (absent or unlocked)."""
    if entry is None or not entry.get("Session"):
        return None
    value = entry.get("Value") or ""
    node = base64.b64decode(value).decode("utf-8", "replace") if value else ""
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
        raise InvalidArgumentError(f"bad Consul address {text[:80]!r}: not a valid host name")  # urllib3 would raise
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
              cert: str | tuple[str, str] | None, *, size: int) -> urllib3.HTTPConnectionPool:
    """A connection pool to one agent: ``size`` connections kept, no retries, no redirects."""
    headers = {"X-Consul-Token": token} if token else {}
    host = host.strip("[]")
    if scheme == "http":
        return urllib3.HTTPConnectionPool(host, port, maxsize=size, headers=headers, retries=False)
    cert_file, key_file = (cert if isinstance(cert, tuple) else (cert, None))
    return urllib3.HTTPSConnectionPool(
        host, port, maxsize=size, headers=headers, retries=False,
        cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
        ca_certs=verify if isinstance(verify, str) else None,
        assert_hostname=None if verify else False,
        cert_file=cert_file, key_file=key_file,
    )


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

    def close(self) -> None:
        self.http.close()
        self.long.close()

    def reconnect_after_fork(self) -> None:
        """Use new connections: the pooled ones are shared with the parent. Dropping them only
        closes this process's descriptors, which sends nothing while the parent has its own."""
        self.http = _new_pool(*self._settings, size=SHORT_POOL_SIZE)
        self.long = _new_pool(*self._settings, size=POOL_SIZE)


class ConsulClient:
    """The Consul endpoints of an election, on agents ``addrs`` of one cluster.

    Requests go to the agent that last answered; connection errors, timeouts and 5xx answers
    fail over to the next. Every request has a connect and read timeout (``timeout``); a
    blocking query also gets its ``wait`` plus Consul's jitter (``wait/16``), and a hard
    deadline backs both, so a partition never hangs a caller.
    """

    def __init__(self, addrs: list[str], *, scheme: str, dc: str | None, timeout: float, token: str | None,
                 token_source: str | None, verify: bool | str, cert: str | tuple[str, str] | None) -> None:
        self.dc = dc
        self.timeout = timeout
        self.token_source = token_source
        self._token = token
        self.endpoints = [_Endpoint(addr, scheme, token, verify, cert) for addr in addrs]
        self._current = 0

    @property
    def active_addr(self) -> str:
        return self.endpoints[self._current].addr

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()

    def after_fork_in_child(self) -> None:
        for endpoint in self.endpoints:
            endpoint.reconnect_after_fork()

    # -- the endpoints an election uses --------------------------------------------------------

    def create_session(self, name: str, ttl: float, lock_delay: float) -> str:
        """A session with ``ttl``, ``behavior=delete``, ``lock_delay`` and no health checks."""
        body = {"Name": name[:200], "TTL": f"{_seconds(ttl)}s", "LockDelay": f"{_seconds(lock_delay)}s",
                "Behavior": "delete", "Checks": [], "NodeChecks": []}
        answer = self._call("create a session", "PUT", "/v1/session/create", data=json.dumps(body))
        if not isinstance(answer, dict) or not isinstance(answer.get("ID"), str):
            raise StoreUnavailableError(f"{self.active_addr} did not create a Consul session (is it a Consul agent?)")
        return answer["ID"]

    def renew_session(self, session_id: str) -> None:
        """Extend the session by its TTL; SessionGone if Consul no longer has it."""
        self._call("renew the session", "PUT", f"/v1/session/renew/{session_id}", gone_on_404=True)

    def destroy_session(self, session_id: str) -> None:
        self._call("destroy the session", "PUT", f"/v1/session/destroy/{session_id}")

    def session_exists(self, session_id: str, index: int | None = None, wait: float = 0.0) -> tuple[int, bool]:
        """``(index, whether Consul knows the session)``; with ``index``, a blocking query that
        returns when the session changes (or after ``wait``). Consul hides a session the token
        may not read (``session:read``): it then counts as gone."""
        answer, new_index = self._read(f"/v1/session/info/{session_id}", index, wait, "read a session")
        return new_index, bool(answer)

    def get(self, key: str, index: int | None = None, wait: float = 0.0) -> tuple[int, dict[str, Any] | None]:
        """``(index, entry or None)`` of ``key``; with ``index``, a blocking query."""
        answer, new_index = self._read(f"/v1/kv/{quote(key)}", index, wait, "read the key" if index is None
                                       else "watch the key")
        entry = answer[0] if isinstance(answer, list) and answer else None
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
        answer = self._call("lock the key", "PUT", "/v1/txn", data=json.dumps(ops), txn=True)
        if isinstance(answer, list):  # the transaction's Errors
            reasons = "; ".join(str(error.get("What")) for error in answer)
            if "invalid session" in reasons:
                raise SessionGone(f"Consul refused to lock {key!r}: {reasons}")
            if "Permission denied" in reasons:  # Consul 1.8 answers 403, but a txn may say it so
                raise PermissionDeniedError(f"Consul refused to lock {key!r}: {reasons}")
            return None
        if not isinstance(answer, dict) or not isinstance(answer.get("Results"), list):
            raise StoreUnavailableError(f"{self.active_addr} did not answer a Consul transaction (not a Consul agent?)")
        return answer["Results"][1]["KV"]

    def read_many(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        """The entries of up to 64 keys (Consul's limit per transaction), in one request."""
        ops = [{"KV": {"Verb": "get", "Key": key}} for key in keys]
        # A get of a missing key fails the transaction; check-not-exists cannot be or-ed, so a
        # refused batch is read again key by key (rare: it takes a key deleted from outside).
        answer = self._call("read the keys", "PUT", "/v1/txn", data=json.dumps(ops), txn=True)
        if isinstance(answer, dict) and isinstance(answer.get("Results"), list):
            return {result["KV"]["Key"]: result["KV"] for result in answer["Results"]}
        return {key: self.get(key)[1] for key in keys}

    def release(self, key: str, session_id: str) -> bool:
        """Unlock ``key`` if the session holds it (``?release=``); the key stays, vacant, and
        Consul applies no lock-delay. False if the session did not hold it."""
        return self._call("release the key", "PUT", f"/v1/kv/{quote(key)}",
                          params={"release": session_id, "flags": str(LOCK_FLAG)}) is True

    def put_vacant_if_absent(self, key: str) -> bool:
        """Create ``key`` vacant (no session, the lock flag) unless it exists (``?cas=0``)."""
        return self._call("write the key", "PUT", f"/v1/kv/{quote(key)}",
                          params={"cas": "0", "flags": str(LOCK_FLAG)}) is True

    # -- transport ------------------------------------------------------------------------------

    def _read(self, path: str, index: int | None, wait: float, what: str) -> tuple[Any, int]:
        params: dict[str, str] = {}
        blocking = 0.0
        if index is not None:
            # Consul answers an index of 0 at once; never loop on it.
            params = {"index": str(max(index, 1)), "wait": f"{math.ceil(wait * 1000)}ms"}
            blocking = wait + wait / 16
        return self._call(what, "GET", path, params=params, blocking=blocking, with_index=True)

    def _call(self, what: str, method: str, path: str, *, params: dict[str, str] | None = None,
              data: str | None = None, blocking: float = 0.0, gone_on_404: bool = False, txn: bool = False,
              with_index: bool = False) -> Any:
        """Send one request to the current agent, failing over to the next on connection
        errors, timeouts and 5xx answers; translate every error."""
        if self.dc:
            params = {**(params or {}), "dc": self.dc}
        failures: list[str] = []
        limit = 2 * self.timeout + blocking + 1.0
        count = len(self.endpoints)
        first = self._current
        for attempt in range(count):
            position = (first + attempt) % count
            endpoint = self.endpoints[position]
            target = path + ("?" + urlencode(params) if params else "")
            try:
                if blocking:
                    with gevent.Timeout(limit, _Deadline(f"no answer within {limit:g}s")):
                        response = endpoint.long.urlopen(method, target, timeout=urllib3.Timeout(
                            connect=self.timeout, read=self.timeout + blocking), redirect=False)
                else:
                    with endpoint.short_slots, gevent.Timeout(limit, _Deadline(f"no answer within {limit:g}s")):
                        response = endpoint.http.urlopen(method, target, body=data, timeout=urllib3.Timeout(
                            connect=self.timeout, read=self.timeout), redirect=False)
                status, body = response.status, response.data.decode("utf-8", "replace")
                index = int(response.headers.get("X-Consul-Index") or 0)
                if status == 200 or (txn and status == 409) or (with_index and status == 404):
                    answer = json.loads(body) if status != 404 and body else None
                    if txn and status == 409:
                        answer = (answer or {}).get("Errors") or [{"What": "transaction refused"}]
                    result = (answer, index) if with_index else answer
                else:
                    self._raise_for(what, endpoint, _Answer(status, body.strip()), gone_on_404)
                    failures.append(f"{endpoint.addr}: {status} {body.strip()[:200]}")
                    continue
            except (urllib3.exceptions.HTTPError, _Deadline, OSError, ValueError) as exc:
                failures.append(f"{endpoint.addr}: {self._describe(exc)}")
                log.debug("consul: could not %s: %s", what, failures[-1])
                continue
            if position != self._current:
                log.warning("consul: now using agent %s (after: %s)", endpoint.addr, "; ".join(failures))
                self._current = position
            return result
        raise StoreUnavailableError(f"could not {what} on Consul: {'; '.join(failures)}")

    def _raise_for(self, what: str, endpoint: _Endpoint, answer: _Answer, gone_on_404: bool) -> None:
        """Raise the greenleader error for a Consul answer; return for one worth failing over."""
        message = f"Consul agent {endpoint.addr} refused to {what}: {self._hide(str(answer))[:400]}"
        if answer.status == 404:
            if gone_on_404:
                raise SessionGone(message)
            raise StoreUnavailableError(f"{message} (is it a Consul agent?)")
        if answer.status in (401, 403):
            token = f"the ACL token (from {self.token_source})" if self._token else "the anonymous token (none given)"
            if "ACL not found" in answer.body:
                raise PermissionDeniedError(f"{message}: Consul does not know {token}")
            raise PermissionDeniedError(f"{message}: {token} lacks the permission (see the ACL policy "
                                        "in greenleader's docs/security.md)")
        if "invalid session" in answer.body.lower():
            raise SessionGone(message)
        if answer.status == 429:
            raise StoreUnavailableError(message)
        if 400 <= answer.status < 500:
            if answer.status == 400:
                if "HTTPS server" in answer.body:
                    message += "; this agent serves HTTPS: give ca_file (or tls=true)"
                raise InvalidArgumentError(message)
            raise StoreError(message)
        # 5xx (no cluster leader, RPC failure): try another agent

    def _describe(self, exc: BaseException) -> str:
        errors = urllib3.exceptions
        if isinstance(exc, errors.NewConnectionError) and (errno := _ERRNO.search(str(exc))):
            text = f"connection failed: {errno.group(0)}"  # a subclass of ConnectTimeoutError
        elif isinstance(exc, errors.ConnectTimeoutError):
            text = f"connect timed out after {self.timeout:g}s"
        elif isinstance(exc, errors.ReadTimeoutError):
            text = "read timed out"
        elif isinstance(exc, errors.SSLError) or "[SSL" in str(exc):
            reason = _SSL_REASON.search(str(exc))
            text = (f"TLS failed: {reason.group(0) if reason else exc}; check ca_file, cert_file and key_file, "
                    "that the agent serves HTTPS on this port, and that its certificate names the host connected to")
        elif isinstance(exc, (errors.NewConnectionError, errors.ProtocolError, OSError)) and (
                errno := _ERRNO.search(str(exc))):
            text = f"connection failed: {errno.group(0)}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self._hide(" ".join(text.split()))[:400]

    def _hide(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def _seconds(value: float) -> int | float:
    """Whole seconds as an int, so Consul gets "10s" rather than "10.0s"."""
    return int(value) if float(value).is_integer() else value

