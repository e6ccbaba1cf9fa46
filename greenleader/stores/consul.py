"""Consul store: elections on a Consul KV key locked by a session.

A candidate creates a session (``ttl``, ``behavior=delete``, no health checks, an explicit
lock-delay) and locks the key with it (``PUT ?acquire=``); the key's value is the node name
and its flags Consul's lock flag (below).
Waiters block on the key with blocking queries and try again when it changes. The session is
renewed while waiting and, once won, by :meth:`Lease.renew`; a blocking query on the held key
tells the candidate at once when the hold is gone. Releasing deletes the key if this session
still holds it (one transaction), then destroys the session: nothing is left behind.

**Fencing term**: the key's ``ModifyIndex`` when the lock was won. It is a Raft index, so it
increases strictly across winners, even though the key is deleted between tenures (the
``LockIndex`` restarts at 1 after each deletion, so it cannot be the term).

**Sessions carry no health checks** (``checks=[]``), only the TTL. With the default
``serfHealth`` check, the death of the agent a session was created on destroys the session at
a moment the holder cannot know, so a waiter could win while the holder still believes it leads;
and failing over to another agent of the cluster would lose the election. Without checks a
session ends only by TTL (which the candidate's ``renew_deadline < ttl`` already stays inside)
or by an explicit destroy (which the holder's blocking query reports within a round trip).

**Crash failover**: Consul treats the TTL as a lower bound and may take up to ``2 x ttl`` to
expire a session (Consul 1.8 arms its timer at exactly twice the TTL after each renewal); it then
refuses the lock for ``lock_delay``. A crashed leader is therefore replaced after at most
``2 x ttl + lock_delay``, in practice ``2 x ttl + lock_delay`` minus the time since its last
renewal: about 19-21 s at the minimum TTL with the default lock-delay, not the ~40 s of the Go
seed (TTL doubling plus Consul's 15 s default lock-delay).

**lock_delay defaults to 1 s.** Lock-delay only applies when a session is invalidated while it
holds the key. On TTL expiry the holder has already stepped down on its own clock (at
``confirmed_at + renew_deadline``, at least ``ttl - renew_deadline`` earlier), so there it only
adds margin for a paused process; on an explicit destroy (an operator, ``consul lock`` cleanup)
it gives the holder time to hear of the loss (one blocking-query round trip) before anyone else
can win. One second covers both with a wide margin while adding only 1 s to crash failover;
Consul's 15 s default would dominate failover for no extra safety. Set ``lock_delay=0`` to trade
that margin for speed, or more for slower networks (Consul caps it at 60 s).

**A key deleted from outside is not a release.** ``consul kv delete`` of a held key leaves the
holder's session alive, and the holder leads on until its blocking query on the key reports the
deletion. So a waiter remembers every session it saw hold the key and, finding the key vacant,
locks it only once Consul no longer knows those sessions (a blocking query on the session):
the holder has stepped down and destroyed its session, or the session expired. A release
deletes the key and then destroys the session at once, so a handover waits for that second
request. (Before this check, a holder that heard of the deletion 50 ms late led beside the
next one for 17-35 ms.) A destroyed session is safe already: Consul deletes its key and enforces
the lock-delay. A candidate that finds the key vacant without having seen who held it (it
started after the deletion, or the deletion fell between its refused lock and its read) cannot
know of it: for one blocking-query round trip of the old holder the two can overlap. Reading
a session needs ``session:read`` on the agent node that made it; Consul hides a session the
token may not read, and then it counts as gone.

**Waiters**: Consul keeps no queue of lock waiters, so every waiter wakes when the key is
released and one of them wins (N waiters cost N lock attempts per handover; no FIFO order).
While Consul enforces a lock-delay nothing changes that a blocking query could wait for, so
waiters retry every 50-250 ms until it ends (Consul's own lock retries every 5 s).

**The lock flag**: every lock of the key writes the flags ``0x2ddccbc058a50c18``, the value
Consul's Go client (``api.LockFlagValue``) writes on its lock keys and requires of an existing
one. With it, ``consul lock P cmd`` on the key ``P/.lock`` waits while greenleader holds it and
runs once greenleader released it; with flags 0 it exited 1 at once ("Existing key does not match
lock use"). greenleader ignores flags when it reads a key (docs/interop.md).

**Endpoints**: several ``host:port`` addresses are agents of one cluster; the store uses the first
that answers and fails over to the next on connection errors, timeouts and 5xx answers.

**Timeouts**: every request has a connect and a read timeout (``timeout``); a blocking query
gets ``timeout + wait + wait/16`` (Consul adds up to ``wait/16`` of jitter), so a partition can
never hang a waiter or a follower.

**Token**: an explicit ``token`` (or ``token_file``) wins; otherwise ``CONSUL_HTTP_TOKEN``, then
the file named by ``CONSUL_HTTP_TOKEN_FILE``, from the environment, as Consul's own tools do
(python-consul 1.1 let the environment override the argument; here it never does). The source is
logged at INFO and kept in ``token_source``. The token travels in the ``X-Consul-Token`` header
only (never in a URL) and never appears in ``repr()``, logs or error messages.
``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_SSL`` and ``CONSUL_HTTP_SSL_VERIFY`` are ignored: the
store's arguments decide (``tls``, ``ca_file``, ``cert_file``, ``key_file``, ``verify``).

Client: ``py-consul`` (or its predecessor ``python-consul`` 1.1; both are ``import consul``).
They speak HTTP through ``requests``, whose sockets block the gevent hub unless gevent has
monkey-patched ``socket`` first; the constructor warns when it has not.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import consul
import gevent
import requests
from gevent import monkey
from requests.adapters import HTTPAdapter

from .. import _fork
from ..errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidURLError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from ._security import check_secret, read_secret, tls_options, warn_plaintext_secret
from .base import LeaderInfo, Lease, Store, check_bool, check_float, check_text, now

try:  # py-consul
    from consul.callback import CB as _CB
except ImportError:  # python-consul 1.1
    from consul.base import CB as _CB  # type: ignore[no-redef,attr-defined]

__all__ = ["DEFAULT_LOCK_DELAY", "ConsulStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ADDR = "127.0.0.1:8500"
DEFAULT_LOCK_DELAY = 1.0
MAX_LOCK_DELAY = 60.0  # Consul silently caps lock-delay here
_LOCK_DELAY_RETRY = (0.05, 0.25)  # first and largest pause while Consul enforces a lock-delay
#: Flags of every key greenleader locks: Consul's Go ``api.LockFlagValue``, which ``consul lock``
#: (``api.Lock``) requires of an existing lock key before it waits for it (docs/interop.md).
LOCK_FLAG = 0x2DDCCBC058A50C18
_ERROR_RETRY = (0.1, 1.0)  # first and largest pause between retries of a failing store
_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")\]]*")
_SSL_REASON = re.compile(r"\[SSL: \w+\].*?\(_ssl\.c:\d+\)")
_GO_DURATION = re.compile(r"([\d.]+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _SessionGone(StoreError):
    """Consul no longer knows the session (renew answered 404, a lock said "invalid session")."""


class _Deadline(Exception):
    """A request outlived its hard time limit (a backstop behind the socket timeouts)."""


def _go_duration(text: str) -> float:
    return sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION.findall(text))


class _HTTPSession(requests.Session):
    """A requests session that sends the token as a header and times out every request.

    The Consul clients set no timeout at all (python-consul 1.1) or their own; this one
    decides, from the query it sends: a blocking query (``index=``) may take its ``wait``.
    """

    def __init__(self, connect_timeout: float, read_timeout: float, token: str | None) -> None:
        super().__init__()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        if token:
            self.headers["X-Consul-Token"] = token
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=64)  # one long poll per waiter
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["timeout"] = (self.connect_timeout, self.read_timeout + _blocking_time(url))
        return super().request(method, url, *args, **kwargs)


def _blocking_time(url: str) -> float:
    """How long Consul may hold ``url`` before answering: its wait plus jitter, or 0."""
    query = dict(parse_qsl(urlsplit(url).query))
    if "index" not in query:
        return 0.0
    wait = _go_duration(query.get("wait", "5m")) or 300.0
    return wait + wait / 16


def _parse_addr(addr: object) -> tuple[str, int]:
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


def _seconds(value: float) -> int | float:
    """Whole seconds as an int, so the library sends "10s" rather than "10.0s"."""
    return int(value) if float(value).is_integer() else value


def _outcome(function: Callable[[], object]) -> object:
    """Call ``function``; return its result or the StoreError it raised (for a helper greenlet)."""
    try:
        return function()
    except StoreError as exc:
        return exc


def _holds(entry: dict[str, Any] | None, session_id: str) -> bool:
    return entry is not None and entry.get("Session") == session_id


def _leader_info(entry: dict[str, Any] | None) -> LeaderInfo | None:
    if entry is None or not entry.get("Session"):
        return None
    value = entry.get("Value") or b""
    node = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return LeaderInfo(node, int(entry["ModifyIndex"]))


def _txn_callback(response: Any) -> Any:
    """The library's JSON callback, except that 409 (a failed check) is an answer: None."""
    if response.code == 409:
        return None
    return _CB.json()(response)


def _txn_errors_callback(response: Any) -> Any:
    """Like :func:`_txn_callback`, but a 409 answers with Consul's ``Errors`` (a list)."""
    if response.code == 409:
        return json.loads(response.body).get("Errors") or [{"What": "transaction refused"}]
    return _CB.json()(response)


class _Endpoint:
    """One agent: its address and a client whose HTTP goes through :class:`_HTTPSession`."""

    def __init__(self, addr: str, store: ConsulStore, token: str | None, verify: bool | str,
                 cert: str | tuple[str, str] | None) -> None:
        host, port = _parse_addr(addr)
        self.addr = f"{host}:{port}"
        try:
            client = consul.Consul(host=host, port=port, scheme=store.scheme, dc=store.dc, verify=verify, cert=cert)
        except consul.ConsulException as exc:  # python-consul 1.1 parses CONSUL_HTTP_ADDR even so
            raise InvalidArgumentError(f"cannot make a Consul client for {self.addr}: {exc}") from None
        # python-consul 1.1 lets CONSUL_HTTP_ADDR/SSL/SSL_VERIFY override the arguments: rebuild
        # its HTTP client from ours. The token goes in our session's header; the library would
        # prefer CONSUL_HTTP_TOKEN and (1.1) put it in the URL.
        connect = getattr(client, "http_connect", None) or client.connect  # type: ignore[attr-defined]
        client.http = connect(host, port, store.scheme, verify, cert)
        client.token = None
        client.http.session = _HTTPSession(store.timeout, store.timeout, token)
        self.client = client

    def close(self) -> None:
        self.client.http.session.close()

    def reconnect_after_fork(self, store: ConsulStore) -> None:
        """Use new connections: the pooled ones are shared with the parent. Dropping them only
        closes this process's descriptors, which sends nothing while the parent has its own."""
        old = self.client.http.session
        self.client.http.session = _HTTPSession(store.timeout, store.timeout, old.headers.get("X-Consul-Token"))


class _Session:
    """A Consul session of one candidacy, and when it was last confirmed alive."""

    def __init__(self, store: ConsulStore, session_id: str, node: str, ttl: float, confirmed_at: float) -> None:
        self.store = store
        self.id = session_id
        self.node = node
        self.ttl = ttl
        self.confirmed_at = confirmed_at
        self.lost = False
        self.pid = os.getpid()

    @property
    def inherited(self) -> bool:
        """True in a forked child: the session is the parent's, to be left alone."""
        return self.pid != os.getpid()

    def renew(self) -> None:
        """Extend the session by its TTL; LeadershipLostError if Consul no longer has it."""
        if self.inherited:
            raise LeadershipLostError(f"the Consul session of {self.node!r} belongs to the parent process")
        started = now()
        try:
            self.store._call("renew the session", lambda c: c.session.renew(self.id))
        except _SessionGone:
            self.lost = True
            raise LeadershipLostError(f"the Consul session of {self.node!r} has expired or was destroyed") from None
        self.confirmed_at = started

    def keep_alive(self) -> None:
        """Renew every third of the TTL until killed or lost (runs while the candidate waits)."""
        retry = _ERROR_RETRY[0]
        while not self.lost:
            gevent.sleep(max(0.0, self.confirmed_at + self.ttl / 3 - now()))
            try:
                self.renew()
                retry = _ERROR_RETRY[0]
            except LeadershipLostError:
                log.info("consul: the waiting session of %r is gone; a new one will be made", self.node)
                return
            except StoreError as exc:
                log.warning("consul: renewing the waiting session of %r failed, retrying: %s", self.node, exc)
                gevent.sleep(retry)
                retry = min(retry * 2, _ERROR_RETRY[1])

    def destroy(self) -> None:
        if self.inherited:
            return
        self.store._call("destroy the session", lambda c: c.session.destroy(self.id))


class _ConsulLease(Lease):
    def __init__(self, store: ConsulStore, key: str, node: str, term: int, session: _Session) -> None:
        super().__init__(key, node, term, session.confirmed_at)
        self._store = store
        self._session = session
        self._released = False
        self._watcher = gevent.spawn(self._watch_for_loss)
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self._released = True  # the parent's hold: renew nothing, release nothing
        self._watcher.kill(block=False)

    def renew(self) -> None:
        if self._released:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        started = now()
        self._session.renew()
        _, entry = self._store._get(self.key)
        if not _holds(entry, self._session.id):
            raise LeadershipLostError(f"{self.key!r} is no longer locked by the session of {self.node!r}")
        self.confirmed_at = started

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._watcher.kill()
        try:
            self._store._delete_if_held(self.key, self._session.id)
        except StoreError as exc:  # destroying the session below deletes the key anyway
            log.warning("consul: could not delete %r on release: %s", self.key, exc)
        self._session.destroy()

    def _watch_for_loss(self) -> None:
        """Block on the key; tell the candidate as soon as this session no longer holds it."""
        index, retry = self.term, _ERROR_RETRY[0]
        while True:
            try:
                index, entry = self._store._get(self.key, index=index, wait=self._store.wait)
                retry = _ERROR_RETRY[0]
            except StoreError as exc:  # renewals judge store trouble; this only hurries loss news
                log.debug("consul: watching the held key %r failed: %s", self.key, exc)
                gevent.sleep(retry)
                retry = min(retry * 2, _ERROR_RETRY[1])
                continue
            if not _holds(entry, self._session.id):
                log.info("consul: %r no longer holds %r", self.node, self.key)
                self.notify_lost()
                return


class _Campaign:
    """One acquire(): a session kept alive by its own greenlet while waiting for the key."""

    def __init__(self, store: ConsulStore, key: str, node: str, ttl: float) -> None:
        self.store = store
        self.key = key
        self.node = node
        self.ttl = ttl
        self.session = store._open_session(node, ttl)
        self.keeper = gevent.spawn(self.session.keep_alive)
        self.won = False
        #: Sessions seen holding the key and not yet known to be gone (see the module docstring).
        self.holders: set[str] = set()
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self.keeper.kill(block=False)  # the session is the parent's: its cleanup skips it

    def close(self) -> None:
        """Stop the keepalive; destroy the session unless a lease now owns it."""
        # Never yield once won: a kill landing between the win and the return would lose the lease.
        self.keeper.kill(block=False)
        if not self.won:
            self.store._discard(self.session)

    def run(self) -> Lease:
        failing_since: float | None = None
        retry = _ERROR_RETRY[0]
        while True:
            try:
                if self.session.lost:
                    self._new_session()
                lease = self._try_to_win()
                if lease is not None:
                    return lease
                failing_since, retry = None, _ERROR_RETRY[0]
            except _SessionGone:
                self.session.lost = True
            except StoreUnavailableError as exc:
                failing_since = failing_since or now()
                if now() - failing_since >= self.store.retry_for:
                    raise
                log.warning("consul: waiting for %r: %s; retrying", self.key, exc)
                gevent.sleep(retry)
                retry = min(retry * 2, _ERROR_RETRY[1])

    def _new_session(self) -> None:
        old = self.session
        self.keeper.kill()
        self.store._discard(old)
        self.session = self.store._open_session(self.node, self.ttl)
        self.keeper = gevent.spawn(self.session.keep_alive)

    def _try_to_win(self) -> Lease | None:
        """Try to lock the key; if it is held, block until it changes. A lease if won."""
        store, key, session = self.store, self.key, self.session
        if not self._await_holders_gone():
            return None
        # Renew alongside the lock attempt, so that a win comes with a fresh confirmation
        # (the hold dates from the session's renewal) without another round trip.
        renewal = gevent.spawn(_outcome, session.renew)
        try:
            entry = store._lock(key, self.node, session.id)
            renewal.join()
        finally:
            renewal.kill()
        if entry is not None:
            if isinstance(renewal.value, LeadershipLostError):
                return None  # the session is gone (and with it the key): start over
            if isinstance(renewal.value, BaseException):
                raise renewal.value
            if _holds(entry, session.id):
                assert entry is not None
                self.won = True
                return _ConsulLease(store, key, self.node, int(entry["ModifyIndex"]), session)
            return None
        index, entry = self._read(key)
        if entry is None or not entry.get("Session"):
            # Vacant yet refused: Consul enforces the lock-delay of an invalidated holder (or
            # the holder's key was deleted from outside meanwhile). No event marks the end of
            # a lock-delay, so retry after short pauses (as Consul's own lock does).
            pause = _LOCK_DELAY_RETRY[0]
            while True:
                gevent.sleep(pause)
                if not self._await_holders_gone():
                    return None
                if store._call("lock the key", lambda c: c.kv.put(key, self.node, acquire=session.id,
                                                                 flags=LOCK_FLAG)):
                    return self._try_to_win()  # confirms the win (the re-lock is idempotent)
                index, entry = self._read(key)
                if entry is not None and entry.get("Session"):
                    break
                pause = min(pause * 2, _LOCK_DELAY_RETRY[1])
        while entry is not None and entry.get("Session") and not session.lost:
            index, entry = self._read(key, index=index)
        return None

    def _read(self, key: str, index: int | None = None) -> tuple[int, Any]:
        """Read the key (blocking when ``index`` is given), noting who holds it."""
        index, entry = self.store._get(key, index=index, wait=self.store.wait if index is not None else None)
        holder = entry.get("Session") if entry is not None else None
        if holder and holder != self.session.id:
            self.holders.add(holder)
        return index, entry

    def _await_holders_gone(self) -> bool:
        """Return once Consul knows none of the sessions seen holding the key; False if our
        own session is lost meanwhile.

        A key deleted from outside leaves its holder's session, and the holder may lead until
        it hears of the deletion and destroys its session (or the session expires): a blocking
        query on each such session waits for that. A released key's session is destroyed by
        the release's next request.
        """
        for holder in sorted(self.holders):
            index, info = self.store._read_session(holder)
            if info is not None:  # as a rule, a release's destroy on its way: hence not INFO
                log.debug("consul: %r waits for session %s, which held %r, to end: its holder may still lead",
                          self.node, holder, self.key)
            while info is not None:
                if self.session.lost:
                    return False
                index, info = self.store._read_session(holder, index=index)
            self.holders.discard(holder)
        return not self.session.lost


class ConsulStore(Store):
    """Elections on Consul agents ``addrs`` (``host:port``; default ``127.0.0.1:8500``).

    :param token: ACL token (``token_file``: read it from that file). Without either, the
        token is ``CONSUL_HTTP_TOKEN`` from the environment, else the content of the file
        named by ``CONSUL_HTTP_TOKEN_FILE``, else none (Consul's anonymous token). The
        environment never overrides an explicit token; which one is used is logged (INFO)
        and shown by ``token_source``.
    :param tls: use HTTPS (on by default when ``ca_file`` or ``cert_file`` is given);
        ``scheme="https"`` is the older spelling.
    :param lock_delay: seconds Consul refuses the key after a holder's session is invalidated
        (see the module documentation for the default of 1 s).
    :param timeout: connect and read timeout of every request, in seconds.
    :param wait: longest wait of one blocking query, in seconds.
    :param retry_for: seconds a waiting candidate or a watch rides out an unavailable store
        (a Consul leader election, an agent restart) before reporting the error.
    :param dc: datacenter; default the agent's.
    :param ca_file: CA bundle that signs the agents' certificates (default: the system's).
    :param cert_file: client certificate, for agents with ``verify_incoming_https``;
        ``key_file`` is its key (omit it if ``cert_file`` holds both).
    :param verify: check the agent's certificate and that it names the host connected to
        (default true).
    """

    backend: ClassVar[str] = "consul"
    min_ttl: ClassVar[float] = 10.0
    max_ttl: ClassVar[float] = 86400.0

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        tls: bool | str | None = None,
        scheme: str | None = None,
        lock_delay: float | str = DEFAULT_LOCK_DELAY,
        timeout: float | str = 5.0,
        wait: float | str = 10.0,
        retry_for: float | str = 15.0,
        dc: str | None = None,
        verify: bool | str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if isinstance(addrs, str):
            addrs = [addrs]
        addrs = list(addrs) if addrs else [DEFAULT_ADDR]
        if scheme is not None:
            if scheme not in ("http", "https"):
                raise InvalidArgumentError(f"scheme must be 'http' or 'https', not {scheme!r}")
            if tls is not None and check_bool("tls", tls) != (scheme == "https"):
                raise InvalidArgumentError(f"tls={tls} contradicts scheme={scheme!r}")
            tls = scheme == "https"
        self.tls = tls_options("consul", tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                               verify=verify, key_file_required=False)
        self.scheme = "https" if self.tls.enabled else "http"
        self.lock_delay = check_float("lock_delay", lock_delay, minimum=0.0, maximum=MAX_LOCK_DELAY)
        self.timeout = check_float("timeout", timeout, minimum=0.0, maximum=600.0, inclusive=False)
        self.wait = check_float("wait", wait, minimum=0.1, maximum=600.0)
        self.retry_for = check_float("retry_for", retry_for, minimum=0.0, maximum=86400.0)
        self.dc = None if dc is None else check_text("dc", dc, max_length=128)
        tls_verify: bool | str = (self.tls.ca_file or True) if self.tls.verify else False
        cert: str | tuple[str, str] | None = self.tls.cert_file
        if self.tls.cert_file is not None and self.tls.key_file is not None:
            cert = (self.tls.cert_file, self.tls.key_file)
        #: Where the ACL token came from: "token", "token_file", "CONSUL_HTTP_TOKEN",
        #: "CONSUL_HTTP_TOKEN_FILE", or None (no token: Consul's anonymous token).
        self.token_source: str | None = None
        self._token = self._resolve_token(token, token_file)
        self._endpoints = [_Endpoint(addr, self, self._token, tls_verify, cert) for addr in addrs]
        _fork.register(self)
        self._current = 0
        if self._token and not self.tls.enabled:
            warn_plaintext_secret("consul", "ACL token", [e.addr.rpartition(":")[0] for e in self._endpoints])
        if not monkey.is_module_patched("socket"):
            warnings.warn(
                "greenleader's Consul store talks to Consul through requests, whose sockets block "
                "the gevent hub because gevent has not monkey-patched socket: "
                "call gevent.monkey.patch_all() first, before importing anything else",
                RuntimeWarning,
                stacklevel=2,
            )

    def _resolve_token(self, token: object, token_file: object) -> str | None:
        """The explicit token, else the environment's (see the class docstring); never logged."""
        env = {name: os.environ.get(name) or None for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")}
        explicit = read_secret("token", token or None, "token_file", token_file)
        if explicit is not None:
            self.token_source = "token" if token_file is None else "token_file"
            ignored = [name for name, value in env.items() if value]
            if ignored:
                log.info("consul: %s set but ignored: the %s option was given", " and ".join(ignored),
                         self.token_source)
            return explicit
        if env["CONSUL_HTTP_TOKEN"]:
            self.token_source = "CONSUL_HTTP_TOKEN"
            secret = check_secret("CONSUL_HTTP_TOKEN", env["CONSUL_HTTP_TOKEN"])
        elif env["CONSUL_HTTP_TOKEN_FILE"]:
            self.token_source = "CONSUL_HTTP_TOKEN_FILE"
            secret = read_secret("token", None, "CONSUL_HTTP_TOKEN_FILE", env["CONSUL_HTTP_TOKEN_FILE"])
        else:
            return None
        log.info("consul: using the ACL token from %s (no token or token_file option was given)", self.token_source)
        return secret

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> ConsulStore:
        if path not in ("", "/"):
            raise InvalidURLError(f"a consul store URL takes no path, got {path!r}")
        try:
            return cls(addrs, **options)  # type: ignore[arg-type]
        except TypeError:
            known = ("token", "token_file", "tls", "scheme", "lock_delay", "timeout", "wait", "retry_for", "dc",
                     "verify", "ca_file", "cert_file", "key_file")
            unknown = sorted(set(options) - set(known))
            raise InvalidURLError(
                f"unknown consul store URL option(s) {unknown}; known: {', '.join(known)}"
            ) from None

    def __repr__(self) -> str:
        token = f" token=***({self.token_source})" if self._token else ""
        dc = f" dc={self.dc!r}" if self.dc else ""
        verify = "" if self.tls.verify or not self.tls.enabled else " tls(no verify)"
        return f"<ConsulStore {self.scheme}://{','.join(e.addr for e in self._endpoints)}{dc}{token}{verify}>"

    @property
    def addrs(self) -> list[str]:
        """The agents' ``host:port`` addresses, in order of preference."""
        return [e.addr for e in self._endpoints]

    @property
    def active_addr(self) -> str:
        """The agent requests go to now (the last one that answered)."""
        return self._endpoints[self._current].addr

    # -- validation -----------------------------------------------------------------------

    def validate_key(self, key: str) -> str:
        key = super().validate_key(key)
        if key.startswith("/"):
            raise InvalidKeyError(f"Consul keys must not start with '/': {key!r}")
        segments = key.rstrip("/").split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise InvalidKeyError(f"Consul key {key!r} has an empty, '.' or '..' segment (HTTP would rewrite it)")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKeyError(f"Consul key {key!r} is not valid Unicode text") from None
        return key

    def validate_ttl(self, ttl: float) -> float:
        value = check_float("ttl", ttl, minimum=0.0, inclusive=False)
        if value < self.min_ttl:
            raise InvalidArgumentError(
                f"ttl={value:g}s is too short for Consul: session TTLs must be at least "
                f"{self.min_ttl:g}s (Consul's own limit)"
            )
        return super().validate_ttl(value)

    # -- the store contract -----------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        key = self.validate_key(key)
        node = check_text("node", node)
        ttl = self.validate_ttl(ttl)
        campaign = _Campaign(self, key, node, ttl)
        try:
            return campaign.run()
        finally:
            campaign.close()

    def leader(self, key: str) -> LeaderInfo | None:
        _, entry = self._get(self.validate_key(key))
        return _leader_info(entry)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        key = self.validate_key(key)
        index, entry = self._get(key)  # a store that cannot be read at all fails at once
        last = _leader_info(entry)
        yield last
        failing_since: float | None = None
        retry = _ERROR_RETRY[0]
        while True:
            try:
                new_index, entry = self._get(key, index=index, wait=self.wait)
            except StoreUnavailableError as exc:
                failing_since = failing_since or now()
                if now() - failing_since >= self.retry_for:
                    raise
                log.warning("consul: watching %r: %s; retrying", key, exc)
                gevent.sleep(retry)
                retry = min(retry * 2, _ERROR_RETRY[1])
                continue
            failing_since, retry = None, _ERROR_RETRY[0]
            index = new_index
            # Compare values, not only indexes: a restarted server may reuse an old index.
            current = _leader_info(entry)
            if current != last:
                last = current
                yield current

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.close()

    def _after_fork_in_child(self) -> None:
        for endpoint in self._endpoints:
            endpoint.reconnect_after_fork(self)

    # -- helpers ------------------------------------------------------------------------------

    def _get(self, key: str, *, index: int | None = None, wait: float | None = None) -> tuple[int, Any]:
        """Read ``key``: ``(index, entry or None)``; with ``index``, a blocking query."""
        if index is None:
            found = self._call("read the key", lambda c: c.kv.get(key))
        else:
            # Consul answers an index of 0 at once; never loop on it.
            params = {"index": str(max(index, 1)), "wait": f"{math.ceil((wait or self.wait) * 1000)}ms"}
            blocking = _blocking_time("?index=1&wait=" + params["wait"])
            found = self._call("watch the key", lambda c: c.kv.get(key, **params), blocking=blocking)
        new_index = int(found[0])
        if index is not None and new_index < index:
            new_index = 0  # the index went backwards (a restored snapshot): start over
        return new_index, found[1]

    def _read_session(self, session_id: str, *, index: int | None = None) -> tuple[int, Any]:
        """Read a session: ``(index, its info or None once it is gone)``; with ``index``, a
        blocking query that returns when the sessions change (or after ``wait``)."""
        if index is None:
            found = self._call("read a session", lambda c: c.session.info(session_id))
        else:
            params = {"index": str(max(index, 1)), "wait": f"{math.ceil(self.wait * 1000)}ms"}
            blocking = _blocking_time("?index=1&wait=" + params["wait"])
            found = self._call("wait for a session to end", lambda c: c.session.info(session_id, **params),
                               blocking=blocking)
        return int(found[0]), found[1]

    def _open_session(self, node: str, ttl: float) -> _Session:
        """Create a session; if the caller is killed meanwhile, destroy it once created."""
        started = now()
        # _outcome: a greenlet that dies of an exception gets its traceback printed by the hub
        creating = gevent.spawn(_outcome, lambda: self._call(
            "create a session",
            lambda c: c.session.create(
                name=f"greenleader {node}"[:200], checks=[], behavior="delete",
                lock_delay=_seconds(self.lock_delay), ttl=_seconds(ttl),
            ),
        ))
        try:
            session_id = creating.get()
        except BaseException:  # killed while (or just after) the session was made: destroy it
            try:
                if not creating.ready():
                    creating.join(timeout=2 * self.timeout + 1.0)
            finally:
                if creating.successful() and isinstance(creating.value, str):
                    self._discard(_Session(self, creating.value, node, ttl, started))
                elif not creating.ready():  # killed again meanwhile: clean up behind us
                    creating.link_value(lambda g: isinstance(g.value, str) and self._discard(
                        _Session(self, g.value, node, ttl, started)))
            raise
        if isinstance(session_id, StoreError):
            raise session_id
        if not isinstance(session_id, str):  # the library's answer to a 404
            raise StoreUnavailableError(f"{self.active_addr} did not create a Consul session (is it a Consul agent?)")
        log.debug("consul: session %s for %r", session_id, node)
        return _Session(self, session_id, node, ttl, started)

    def _discard(self, session: _Session) -> None:
        try:
            session.destroy()
        except StoreError as exc:
            log.warning("consul: could not destroy a session of %r (it expires after its TTL): %s",
                        session.node, exc)

    def _lock(self, key: str, node: str, session_id: str) -> dict[str, Any] | None:
        """Lock ``key`` for the session (with :data:`LOCK_FLAG`) and read it back, in one
        transaction (one round trip per win, not two): its entry if the lock was taken, None if refused (held, or a
        lock-delay); _SessionGone if Consul no longer knows the session."""
        value = base64.b64encode(node.encode("utf-8")).decode("ascii")
        ops = [{"KV": {"Verb": "lock", "Key": key, "Value": value, "Flags": LOCK_FLAG, "Session": session_id}},
               {"KV": {"Verb": "get", "Key": key}}]
        params = [("dc", self.dc)] if self.dc else []
        body = json.dumps(ops)
        result = self._call("lock the key", lambda c: c.http.put(_txn_errors_callback, "/v1/txn", params=params,
                                                                  data=body))
        if isinstance(result, list):
            reasons = "; ".join(str(error.get("What")) for error in result)
            if "invalid session" in reasons:
                raise _SessionGone(f"Consul refused to lock {key!r}: {reasons}")
            if "Permission denied" in reasons:  # Consul 1.8 answers 403, but a txn may say it so
                raise PermissionDeniedError(f"Consul refused to lock {key!r}: {reasons}")
            return None
        if not isinstance(result, dict) or not isinstance(result.get("Results"), list):  # a 404: not Consul
            raise StoreUnavailableError(f"{self.active_addr} did not answer a Consul transaction (not a Consul agent?)")
        return result["Results"][1]["KV"]

    def _delete_if_held(self, key: str, session_id: str) -> bool:
        """Delete ``key`` if ``session_id`` locks it, atomically. True if deleted."""
        ops = [{"KV": {"Verb": "check-session", "Key": key, "Session": session_id}},
               {"KV": {"Verb": "delete", "Key": key}}]
        params = [("dc", self.dc)] if self.dc else []
        body = json.dumps(ops)
        result = self._call("release the key", lambda c: c.http.put(_txn_callback, "/v1/txn", params=params, data=body))
        return result is not None

    def _call(self, what: str, operation: Callable[[consul.Consul], T], *, blocking: float = 0.0) -> T:
        """Run ``operation`` on the current agent, failing over to the next on connection
        errors, timeouts and 5xx answers; translate every client error."""
        failures: list[str] = []
        limit = 2 * self.timeout + blocking + 1.0
        count = len(self._endpoints)
        first = self._current
        for attempt in range(count):
            position = (first + attempt) % count
            endpoint = self._endpoints[position]
            try:
                with gevent.Timeout(limit, _Deadline(f"no answer within {limit:g}s")):
                    result = operation(endpoint.client)
            except (requests.RequestException, _Deadline, OSError) as exc:
                failures.append(f"{endpoint.addr}: {self._describe(exc)}")
            except consul.ConsulException as exc:
                self._raise_for(what, endpoint, exc)
                failures.append(f"{endpoint.addr}: {self._describe(exc)}")
            else:
                if position != self._current:
                    log.warning("consul: now using agent %s (after: %s)", endpoint.addr, "; ".join(failures))
                    self._current = position
                return result
            log.debug("consul: could not %s: %s", what, failures[-1])
        raise StoreUnavailableError(f"could not {what} on Consul: {'; '.join(failures)}")

    def _raise_for(self, what: str, endpoint: _Endpoint, exc: consul.ConsulException) -> None:
        """Raise the greenleader error for a Consul answer; return for one worth failing over."""
        message = f"Consul agent {endpoint.addr} refused to {what}: {self._describe(exc)}"
        if isinstance(exc, consul.NotFound):
            raise _SessionGone(message)
        if isinstance(exc, (consul.ACLPermissionDenied, consul.ACLDisabled)):
            token = f"the ACL token (from {self.token_source})" if self._token else "the anonymous token (none given)"
            if "ACL not found" in str(exc):
                raise PermissionDeniedError(f"{message}: Consul does not know {token}")
            raise PermissionDeniedError(f"{message}: {token} lacks the permission (see the ACL policy "
                                        "in greenleader's docs/security.md)")
        if "invalid session" in str(exc):
            raise _SessionGone(message)
        code = str(exc)[:3]
        if code == "429":
            raise StoreUnavailableError(message)
        if code.startswith("4"):
            if code == "400":
                if "HTTPS server" in str(exc):
                    message += "; this agent serves HTTPS: give ca_file (or tls=true)"
                raise InvalidArgumentError(message)
            raise StoreError(message)
        # 5xx (no cluster leader, RPC failure) or an unreadable answer: try another agent

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, requests.ConnectTimeout):
            text = f"connect timed out after {self.timeout:g}s"
        elif isinstance(exc, requests.ReadTimeout):
            text = "read timed out"
        elif isinstance(exc, requests.exceptions.SSLError):
            reason = _SSL_REASON.search(str(exc))
            text = (f"TLS failed: {reason.group(0) if reason else exc}; check ca_file, cert_file and key_file, "
                    "that the agent serves HTTPS on this port, and that its certificate names the host connected to")
        elif isinstance(exc, requests.ConnectionError) and (errno := _ERRNO.search(str(exc))):
            text = f"connection failed: {errno.group(0)}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        text = " ".join(text.split())
        if self._token:
            text = text.replace(self._token, "***")
        return text[:400]

