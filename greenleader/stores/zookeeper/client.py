"""The ZooKeeper client adapter: kazoo sessions under gevent, and what kazoo needs help with.

One kazoo client (one ZooKeeper session) per TTL, made lazily, whose negotiated session
timeout is checked against the TTL (:class:`_Session`, hooking kazoo's handshake); TLS, digest
authentication and the ACL of created nodes; kazoo's errors translated into greenleader's (a
refusal explained from the readable ACLs); the workarounds for kazoo under gevent: its wake-up
socket and its handler's select (:mod:`.transport`), the watchdog on unanswered requests
(:meth:`_Session._expect_answer`), a forked child's copy left inert. Nothing here knows about
elections: that is :mod:`.recipe`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket
from gevent.event import Event
from gevent.lock import BoundedSemaphore

from ... import _fork, _outcome
from ...errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from .._security import check_secret, pick, read_secret, tls_options, warn_plaintext_secret
from ..base import check_float, check_text, now

try:
    from kazoo.client import KazooClient
    from kazoo.exceptions import (
        AuthFailedError,
        ConnectionClosedError,
        ConnectionLoss,
        KazooException,
        NoAuthError,
        NodeExistsError,
        NoNodeError,
        OperationTimeoutError,
        RolledBackError,
        SessionExpiredError,
    )
    from kazoo.hosts import collect_hosts
    from kazoo.protocol.serialization import Auth, Connect
    from kazoo.protocol.states import KazooState, KeeperState, WatchedEvent
    from kazoo.retry import KazooRetry
    from kazoo.security import ACL, OPEN_ACL_UNSAFE, READ_ACL_UNSAFE, make_digest_acl
    from kazoo.security import Permissions as ACL_PERMS
except ImportError as exc:  # new_store() turns this into MissingDependencyError
    raise ImportError(str(exc), name="kazoo") from exc

from .transport import GeventHandler, WakeSocket

if TYPE_CHECKING:
    from .recipe import _ZooKeeperLease

__all__ = ["ZooKeeperClient"]

log = logging.getLogger(__name__)

#: A renewal may reuse a confirmation of its session (an answered ``sync``) begun at most this
#: fraction of the session timeout ago (0.5 s for a 15 s TTL): leaders of one session then
#: renew together, one round trip per batch instead of three requests per leader (1,000
#: leaders with a 15 s TTL sent 900 requests a second), at the price of a confirmed_at older
#: by at most that much.
_CONFIRM_REUSE = 1 / 30
ORPHAN_RETRY_DELAY = 0.1  # first pause before leftover nodes are deleted again (doubling)
ORPHAN_RETRY_MAX = 1.0  # at most this long: a close() waits for the cleaner to see it
_READER_SESSION_MS = 10_000  # session of a store that only reads (leader, watch)
#: Candidacies of one session that register at once (the others wait their turn): each then
#: lists the queue, arms its watches and claims, about 7 requests, so at most ~400 wait in
#: kazoo's queue, under half a second of the server's answers on a loaded 2-core box. Without
#: it 1,000 candidates starting at once queued ~4,000 requests, the last ones answered after
#: the 5 s timeout, whose retries kept the queue full.
REGISTERING_MAX = 64
#: Seconds a session's close waits after its last release, so that ending the session (kazoo's
#: shutdown, about 1.2 ms of CPU, and the server's session close) stays off the next leader's
#: first milliseconds when it runs on the same host: `greenleader run` releases and then exits,
#: while the winner, woken by the release, starts its command. Consul's and etcd's stores
#: defer their session's end in the same way. Only a session that holds no lease waits: its
#: nodes are gone; a lease still held is lost with the session, at once.
CLOSE_AFTER_RELEASE = 0.05
# ZooKeeper's PathUtils.validatePath refuses these code points in node names.
_BAD_PATH_CHARS = re.compile("[\u0000-\u001f\u007f-\u009f\ud800-\uf8ff\ufff0-\uffff]")
_CONNECTION_ERRORS = (ConnectionLoss, OperationTimeoutError, SessionExpiredError)
# A TLS handshake the server's or the client's certificate decided against: an untrusted or
# misnamed server certificate, a refused client certificate, TLS to a plain port. Retrying
# the same handshake within the connect timeout cannot succeed (a dropped connection, an
# EOF in the handshake, can: those are not matched).
_TLS_REFUSAL = re.compile(r"(?i)certificate|hostname mismatch|unknown.ca|wrong.version.number|handshake.failure")
_TLS_HINT = "; check ca_file, cert_file and key_file, and that the server's certificate names the host connected to"
_ACL_DIAGNOSIS_TIMEOUT = 2.0  # seconds for each getACL explaining a refusal: a message, not worth more
_PERMS = ((ACL_PERMS.CREATE, "c"), (ACL_PERMS.DELETE, "d"), (ACL_PERMS.READ, "r"), (ACL_PERMS.WRITE, "w"),
          (ACL_PERMS.ADMIN, "a"))  # in zkCli's order: cdrwa



class _ConnectionLost(StoreUnavailableError):
    """A request failed because the connection dropped; worth retrying once reconnected."""


def _ttl_ms(ttl: float) -> int:
    """A TTL as ZooKeeper's integer milliseconds, rounded up (never shorter than asked)."""
    return math.ceil(round(ttl * 1000, 6))


def _check_path(what: str, path: str, error: type[InvalidArgumentError]) -> str:
    """``path`` as an absolute ZooKeeper path ('/a/b'), or ``error`` saying what is wrong."""
    absolute = path if path.startswith("/") else "/" + path
    if absolute != "/" and absolute.endswith("/"):
        raise error(f"{what} {path!r} must not end with '/'")
    if match := _BAD_PATH_CHARS.search(absolute):
        raise error(f"{what} {path!r} contains {match.group()!r}, which ZooKeeper paths may not")
    for part in absolute.split("/")[1:]:
        if part in ("", ".", ".."):
            raise error(f"{what} {path!r} has an empty, '.' or '..' component")
    return absolute


def _blocking_calls(hosts: list[tuple[str, int]], use_ssl: bool) -> str | None:
    """What kazoo would block the hub on when gevent has not patched the process, if anything.

    kazoo's gevent handler uses gevent sockets and selectors, so plain connections never
    block. But it resolves host names with the standard library's getaddrinfo (IP literals
    and localhost never wait), and wraps TLS sockets with the standard library's ssl, whose
    connect and handshake block.
    """
    if use_ssl:
        return "TLS connects and handshakes"
    for host, _ in hosts:
        if host == "localhost":
            continue
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"host name lookups ({host})"
    return None


class _Session:
    """One kazoo client (one ZooKeeper session) with a fixed requested session timeout."""

    def __init__(self, store: ZooKeeperClient, timeout_ms: int) -> None:
        self.store = store
        self.requested_ms = timeout_ms
        self.negotiated_ms: int | None = None
        self.session_id: int | None = None
        self.pid = os.getpid()
        self.connected = Event()
        self.settled = Event()  # set once the first connection attempt ended either way
        self.error: StoreError | None = None
        self.leases: set[_ZooKeeperLease] = set()
        self.orphans: set[tuple[str, str]] = set()  # (parent path, node name prefix) to delete
        self._cleaner: gevent.Greenlet | None = None  # see clean_up_orphans
        self.tls_refused: set[str] = set()  # addresses whose TLS handshake failed before the first connection
        self.log = _KazooLog(self._on_tls_refusal)
        self._answer_timer: Any = None  # see _expect_answer
        self._ensuring: dict[str, Any] = {}  # path -> kazoo's ensure_path in flight (see ensure_path)
        self.registering = BoundedSemaphore(REGISTERING_MAX)  # held by acquire() while it registers
        #: Counts connection drops: kazoo forgets every watch with its connection.
        self.generation = 0
        self._confirming: tuple[float, int, Any] | None = None  # the sync in flight: started, generation
        self._confirmed: tuple[float, int] | None = None  # the last answered one
        self.released_at = float("-inf")  # when the last release's deletion was answered
        self.client = KazooClient(
            hosts=store.hosts,
            timeout=timeout_ms / 1000.0,
            handler=GeventHandler(),
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=0.5, sleep_func=gevent.sleep),
            logger=self.log,
            **store._client_options,
        )
        self._hook_negotiation()
        self.client.add_listener(self._on_state)
        self.client.start_async()
        connection = self.client._connection
        if connection._write_sock is not None:  # made by start_async (kazoo >= 2.10 internals)
            connection._write_sock = WakeSocket(connection._write_sock)
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """The session is the parent's: stop this copy of kazoo's connection loop (killing it
        only closes this process's descriptors). One that the hub had scheduled already runs
        once more first, on /dev/null (the transport's sockets go dead at the fork): it then
        sees a dropped connection, which must not make it reconnect with the parent's session
        id (``_stopped``), report states to this copy's leases, or log about the parent's
        session."""
        self.connected.clear()
        self.client._stopped.set()
        self.log.silent = True
        routine = getattr(self.client._connection, "_connection_routine", None)
        if routine is not None:
            routine.kill(block=False)

    def __repr__(self) -> str:
        return f"<ZooKeeper session {self.session_id or 0:#x} timeout={self.negotiated_ms or self.requested_ms}ms>"

    def _hook_negotiation(self) -> None:
        """Record the session timeout the server negotiates.

        kazoo reads it from the ConnectResponse but does not keep it, so wrap the
        connection's handshake call (kazoo >= 2.10 internals; checked by the tests).
        """
        connection = getattr(self.client, "_connection", None)
        invoke = getattr(connection, "_invoke", None)
        if invoke is None:
            raise StoreError("this kazoo version hides the negotiated session timeout; use kazoo 2.10 or 2.11")

        def _invoke(timeout: float, request: Any, xid: int | None = None) -> Any:
            result = invoke(timeout, request, xid)
            if isinstance(request, Connect):
                self.negotiated_ms = result[0].time_out
            return result

        connection._invoke = _invoke

    # -- connection state (kazoo calls these from its connection greenlet: never block) ----

    def _on_state(self, state: str) -> None:
        if self.pid != os.getpid():
            return  # a forked child's copy of the loop ending (see _after_fork_in_child)
        if state == KazooState.CONNECTED:
            client_id = self.client.client_id
            session_id = client_id[0] if client_id else None
            if self.session_id is not None and session_id != self.session_id:
                self._lose_leases("the session changed")
            self.session_id = session_id
            log.debug("%r connected", self)
            if self.negotiated_ms is not None and self.negotiated_ms < self.requested_ms and self.leases:
                self._lose_leases(f"the server now grants only {self.negotiated_ms}ms", gone=False)
            self.connected.set()
            self.settled.set()
            if self.orphans:
                self.clean_up_orphans()
        elif state == KazooState.SUSPENDED:
            self.connected.clear()
            self.generation += 1
            if self.leases:
                log.warning("%r: connection lost; leadership is uncertain until it returns", self)
        else:  # LOST: the session expired or was closed, and every ephemeral node with it
            self.connected.clear()
            self.generation += 1
            self.session_id = None
            self.orphans.clear()
            if self.client.client_state == KeeperState.AUTH_FAILED:
                self.error = PermissionDeniedError(f"ZooKeeper at {self.store.hosts} refused authentication")
                self.settled.set()
            self._lose_leases("the ZooKeeper session expired")

    def _on_tls_refusal(self, address: str, error: str) -> None:
        """kazoo failed a TLS handshake with ``address`` (from its connection greenlet: never blocks).

        Before the session ever connected, a handshake refused by every server ends the
        attempt at once with a StoreUnavailableError saying so, instead of kazoo retrying
        until the connect timeout: a wrong CA or client certificate does not fix itself in
        seconds, and callers that retry (a Candidate with ``retry=``) still pick up a
        certificate rotated on the servers. Once connected, kazoo keeps retrying as for any
        lost connection: the session may live on.
        """
        if self.settled.is_set():
            return
        self.tls_refused.add(address)
        if len(self.tls_refused) >= self.store._address_count:
            self.error = StoreUnavailableError(f"TLS failed with ZooKeeper at {self.store.hosts}: {error[:300]}"
                                               f"{_TLS_HINT}")
            self.settled.set()

    def _lose_leases(self, why: str, *, gone: bool = True) -> None:
        for lease in list(self.leases):
            lease.lost(why, gone=gone)

    def clean_up_orphans(self) -> None:
        """Start, unless it runs, a greenlet of the store that deletes the orphans, trying again
        with backoff while some remain and the session is connected: a deletion that fails
        without the connection dropping would otherwise leave them, and the key held, for as
        long as the session lives. Never switches greenlets (kazoo's callbacks call it)."""
        if self.pid != os.getpid() or (self._cleaner is not None and not self._cleaner.dead):
            return
        self._cleaner = self.store._spawn(self._clean_orphans)

    def _clean_orphans(self) -> None:
        delay = ORPHAN_RETRY_DELAY
        while self.orphans and self.connected.is_set() and not self.store._closed:
            self.delete_orphans()
            if not self.orphans:
                return
            gevent.sleep(delay)
            delay = min(delay * 2, ORPHAN_RETRY_MAX)

    def delete_orphans(self) -> None:
        """One attempt at deleting every orphan (failures are logged and the orphans kept)."""
        for parent, prefix in list(self.orphans):
            try:
                self._remove(parent, prefix)
            except StoreError as exc:
                log.warning("%r: could not delete leftover node %s/%s*: %s", self, parent, prefix, exc)

    # -- requests -----------------------------------------------------------------------------

    def wait_connected(self, timeout: float) -> None:
        """Return once connected; StoreUnavailableError if not within ``timeout``."""
        if self.store._closed:
            raise StoreUnavailableError("the ZooKeeper store is closed")
        if self.connected.wait(timeout):
            return
        if self.error is not None:
            raise self.error
        raise StoreUnavailableError(f"no ZooKeeper session with {self.store.hosts} within {timeout:g}s"
                                    f"{self.last_error()}")

    def last_error(self) -> str:
        """``" (last error: ...)"`` from kazoo's last failed connection attempt, or ``""``."""
        error = self.log.last_error
        if error is None:
            return ""
        hint = ""
        if "SSL" in error:
            error, hint = f"TLS failed: {error}", _TLS_HINT
        elif "connection broken" in error and not self.store.tls.enabled:
            hint = "; does the server want TLS (tls=true, ca_file)?"
        return f" (last error: {error[:300]}{hint})"

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one kazoo ``*_async`` request and return its result.

        kazoo's own exceptions for node states (NoNodeError, ...) pass through; connection
        trouble, timeouts and permission refusals become greenleader errors.
        """
        if self.pid != os.getpid():
            raise StoreUnavailableError("this ZooKeeper session belongs to the parent process")
        path = args[0] if args and isinstance(args[0], str) else None
        return self.result(method(*args, **kwargs), path=path)

    def result(self, async_result: Any, timeout: float | None = None, path: str | None = None) -> Any:
        """The result of a kazoo request, as :meth:`call` describes; ``path``, the node it
        concerns, only explains a refusal."""
        timeout = self.store.timeout if timeout is None else timeout
        started = now()
        try:
            async_result.wait(timeout)  # gevent's AsyncResult.wait never raises
        finally:
            if not async_result.ready():  # timed out, or the waiting greenlet was killed
                self._expect_answer(async_result, waited=now() - started)
        if not async_result.ready():
            raise StoreUnavailableError(f"ZooKeeper at {self.store.hosts} did not answer within {timeout:g}s")
        try:
            return async_result.get(block=False)
        except KazooException as exc:
            raise self._error(exc, path) from exc

    def confirm(self, after: float) -> tuple[float, int]:
        """``(started, generation)`` of a round trip (a ``sync``) that this session's server
        answered, begun after ``after`` and at most :data:`_CONFIRM_REUSE` of the session
        timeout ago, or in flight and joined: the session lived when it was begun.

        Leaders of one session that renew close together share one round trip, and then
        renew together from there on.
        """
        last = self._confirmed
        reuse = self.requested_ms / 1000.0 * _CONFIRM_REUSE
        if last is not None and last[1] == self.generation and after < last[0] and now() - last[0] <= reuse:
            return last
        flight = self._confirming
        if flight is None or flight[1] != self.generation or flight[0] <= after:
            flight = self._confirming = (now(), self.generation, self.client.sync_async("/"))
        started, generation, request = flight
        try:
            self.result(request, max(0.0, self.store.timeout - (now() - started)))
        finally:
            if self._confirming is flight and request.ready():
                self._confirming = None
        if self._confirmed is None or self._confirmed[0] < started:
            self._confirmed = (started, generation)
        return started, generation

    def watching(self, path: str, callback: Callable[[WatchedEvent], None]) -> bool:
        """True while ``callback`` is armed on ``path``: kazoo removes a watch when it reads
        its event (in the connection greenlet, before any later answer is read) or drops
        the connection (kazoo >= 2.10 internals, checked by the tests)."""
        return callback in self.client._data_watchers.get(path, ())

    def _expect_answer(self, async_result: Any, waited: float) -> None:
        """Drop the connection if ``async_result`` stays unanswered as long as kazoo waits for
        a ping's answer (two thirds of the session timeout).

        kazoo counts every request it sends as a ping, so a client that sends more often than
        kazoo would ping (a follower confirming a quiet watch every second does) never has a
        ping outstanding, and a connection that stopped answering, silently partitioned, is
        never noticed: kazoo neither reconnects nor moves to another server. Shutting the
        socket down makes kazoo take its own dropped-connection path at once.
        """
        connection = self.client._connection
        sock = connection._socket
        if sock is None or self._answer_timer is not None:
            return
        limit = (self.negotiated_ms or self.requested_ms) / 1000.0 * 2 / 3
        timer = self._answer_timer = gevent.get_hub().loop.timer(max(0.0, limit - waited))

        def check() -> None:
            timer.close()
            self._answer_timer = None
            if self.pid != os.getpid() or async_result.ready() or connection._socket is not sock:
                return
            log.warning("%r: no answer to a request for %.1fs; dropping the connection", self, limit)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        timer.start(gevent.spawn, check)  # a greenlet, not the hub: logging may switch

    def _error(self, exc: KazooException, path: str | None = None) -> Exception:
        """The exception to raise for a kazoo one: NoNodeError and NodeExistsError as they are."""
        if isinstance(exc, (NoAuthError, AuthFailedError)):
            where = f" on {path}" if path else ""
            return PermissionDeniedError(
                f"ZooKeeper refused the request{where} ({type(exc).__name__}): {self._diagnose(path)}; "
                "see the ACL in greenleader's docs/security.md"
            )
        if isinstance(exc, ConnectionClosedError):
            return StoreUnavailableError("the ZooKeeper connection is closed")
        if isinstance(exc, _CONNECTION_ERRORS):
            return _ConnectionLost(f"ZooKeeper connection lost ({type(exc).__name__})")
        if isinstance(exc, (NoNodeError, NodeExistsError)):
            return exc
        return StoreError(f"ZooKeeper request failed: {exc!r}")

    def _diagnose(self, path: str | None) -> str:
        """Why ZooKeeper refused a request on ``path``, as far as its readable ACLs tell.

        ZooKeeper accepts any digest password when a client authenticates: it only derives
        the identity ``user:hash(password)`` and compares it with the ACLs. So a wrong
        password shows only as a refusal, like a missing right. The ACL of ``path`` and of
        its parent (a create or a delete is checked on the parent), when readable, tell them
        apart: an entry for the user with another hash means a wrong password.
        """
        user = self.store.user
        if user is None:
            return "the node's ACL does not allow a client without digest auth (no user)"
        own = self.store._acl[0].id.id if self.store._acl else None
        nodes = [path, path.rsplit("/", 1)[0] or "/"] if path and path != "/" else [path] if path else []
        readable: list[tuple[str, list[ACL]]] = []
        for node in nodes:
            request = self.client.get_acls_async(node)
            request.wait(_ACL_DIAGNOSIS_TIMEOUT)
            if not request.ready() or not request.successful():
                continue  # unanswered, unreadable or gone: it tells nothing
            acls, _ = request.get(block=False)
            readable.append((node, acls))
        for node, acls in readable:
            mine = [a for a in acls if a.id.scheme == "digest" and a.id.id.split(":", 1)[0] == user]
            if any(a.id.id == own for a in mine):
                return (f"digest user {user!r} has too few rights here (the ACL of {node} is "
                        f"{_describe_acl(acls)})")
            if mine:
                return (f"wrong password for digest user {user!r}: the ACL of {node} names that user "
                        "with another password")
        if readable:
            node, acls = readable[-1]
            return f"the ACL of {node} ({_describe_acl(acls)}) has no entry for digest user {user!r}"
        return (f"the ACL does not allow digest user {user!r} with this password (a wrong password looks "
                "the same to ZooKeeper, which compares the password's hash with the ACLs only, and "
                "these ACLs are not readable to tell)")

    def multi(self, build: Callable[[Any], None]) -> list[Any]:
        """Run a transaction that ``build`` fills in: all its operations or none. Its results,
        or the error of the operation that failed (as :meth:`call` raises them)."""
        if self.pid != os.getpid():
            raise StoreUnavailableError("this ZooKeeper session belongs to the parent process")
        transaction = self.client.transaction()
        build(transaction)
        path = next((op.path for op in transaction.operations if hasattr(op, "path")), None)
        results = self.result(transaction.commit_async(), path=path)
        failed = next((r for r in results if isinstance(r, KazooException) and not isinstance(r, RolledBackError)),
                      None)
        if failed is not None:
            raise self._error(failed, path)
        return results

    def children(self, path: str) -> list[str]:
        """The children of ``path`` ([] if it does not exist)."""
        try:
            return self.call(self.client.get_children_async, path)
        except NoNodeError:
            return []

    def ensure_path(self, path: str, acl: list[ACL]) -> None:
        """Create ``path`` and its missing ancestors with ``acl``. Callers that ask for the same
        path meanwhile share the requests (1,000 candidates of new keys under one new prefix
        would otherwise send 2,000 requests for it, at once)."""
        flight = self._ensuring.get(path)
        if flight is None or flight.ready():
            flight = self._ensuring[path] = self.client.ensure_path_async(path, acl)
        self.result(flight, path=path)

    def discard(self, parent: str, prefix: str, names: tuple[str, ...] = ()) -> None:
        """Delete our nodes under ``parent``: ``names`` if given, else every ``prefix*``.

        The nodes are first recorded as orphans (``parent/prefix*``), and deleted by a greenlet
        of the store's, so a caller killed or timed out meanwhile cannot leave them in the
        queue for good: orphans are deleted on the next (re)connection, or at the next acquire().
        """
        if self.pid != os.getpid():
            return  # a forked child's copy: the node is the parent's
        self.orphans.add((parent, prefix))
        if not self.connected.is_set():
            raise StoreUnavailableError(f"cannot delete {parent}/{prefix}* now; they go when the session reconnects")
        try:
            _outcome.result(self.store._spawn(_outcome.outcome, self._remove, parent, prefix, names))
        except StoreError:
            self.clean_up_orphans()
            raise

    def _remove(self, parent: str, prefix: str, names: tuple[str, ...] = ()) -> None:
        # Requests of one session are served in order, so the listing sees the nodes of any
        # create this session sent before, even one whose answer was lost.
        found = list(names) or [c for c in self.children(parent) if c.startswith(prefix)]
        if not found:
            self.orphans.discard((parent, prefix))
            return
        try:  # a candidate's node and its twin go together: no waiter sees one without the other
            self.multi(lambda transaction: [transaction.delete(f"{parent}/{name}") for name in found])
            self.released_at = now()
        except NoNodeError:  # one was gone already (deleted from outside): delete the others
            for name in found:
                with contextlib.suppress(NoNodeError):
                    self.call(self.client.delete_async, f"{parent}/{name}")
        self.orphans.discard((parent, prefix))

    def close(self) -> None:
        """End the session (its ephemeral nodes go at once) and free the connection."""
        if not self.leases and self.pid == os.getpid():  # a lease still held ends with the session, at once
            gevent.sleep(max(0.0, self.released_at + CLOSE_AFTER_RELEASE - now()))
        self.connected.clear()
        if self.pid != os.getpid():  # (checked after the pause too: a fork may come during it)
            return  # inherited across fork: closing would end the parent's session
        if self.session_id is None:
            # No session to end: kazoo may be waiting for a handshake's answer from a silent
            # server, without watching its stop signal, for max(10 s, session timeout).
            with contextlib.suppress(OSError, AttributeError):
                self.client._connection._socket.shutdown(socket.SHUT_RDWR)
        try:
            self.client.stop()
            self.client.close()
        except (KazooException, OSError) as exc:
            log.warning("%r: error while closing: %s", self, exc)


class ZooKeeperClient:
    """The connection side of :class:`~greenleader.stores.zookeeper.ZooKeeperStore`: its
    options (addresses, chroot, timeout, TLS, digest identity and ACL) and its sessions,
    one per TTL (see the store for the parameters)."""

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        chroot: str | None = None,
        timeout: float | str = 5.0,
        user: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
        tls: bool | str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify: bool | str | None = None,
        auth: str | None = None,
        use_ssl: bool | str | None = None,
        ca: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        verify_certs: bool | str | None = None,
    ) -> None:
        if isinstance(addrs, str):
            addrs = [addrs]
        addrs = list(addrs) if addrs else ["127.0.0.1:2181"]
        for addr in addrs:
            if not isinstance(addr, str) or not addr.strip() or any(c in addr for c in ",/ "):
                raise InvalidArgumentError(f"ZooKeeper address {addr!r} is not 'host:port'")
        self.hosts = ",".join(addrs)
        try:
            parsed, _ = collect_hosts(self.hosts)
        except ValueError as exc:
            raise InvalidArgumentError(f"bad ZooKeeper addresses {addrs!r}: {exc}") from None
        for host, _ in parsed:  # else kazoo's connection greenlet dies of a UnicodeError
            if len(host) > 253 or not all(0 < len(label) <= 63 for label in host.rstrip(".").split(".")):
                raise InvalidArgumentError(f"ZooKeeper address {host[:80]!r} is not a valid host name")
        self.timeout = check_float("timeout", timeout, minimum=0.0, maximum=3600.0, inclusive=False)
        self.root = ""
        if chroot not in (None, "", "/"):
            self.root = _check_path("chroot", check_text("chroot", chroot), InvalidArgumentError)
            if self.root == "/zookeeper" or self.root.startswith("/zookeeper/"):
                raise InvalidArgumentError(f"chroot {chroot!r} is in /zookeeper, which ZooKeeper reserves")
        self.tls = tls_options(
            "zookeeper",
            tls=pick("tls", tls, "use_ssl", use_ssl),
            ca_file=pick("ca_file", ca_file, "ca", ca),
            cert_file=pick("cert_file", cert_file, "certfile", certfile),
            key_file=pick("key_file", key_file, "keyfile", keyfile),
            verify=pick("verify", verify, "verify_certs", verify_certs),
        )
        # Private: with ``user`` it carries the digest password (kazoo's auth_data).
        self._client_options: dict[str, Any] = {
            "use_ssl": self.tls.enabled,
            "verify_certs": self.tls.verify,
            "check_hostname": self.tls.enabled and self.tls.verify,
            "ca": self.tls.ca_file,
            "certfile": self.tls.cert_file,
            "keyfile": self.tls.key_file,
        }
        self.user, secret = _digest_identity(user, read_secret("password", password, "password_file", password_file),
                                             auth)
        #: The ACL of every node the store creates (None: kazoo's default, open to all).
        self._acl: list[ACL] | None = None
        if self.user is not None:
            assert secret is not None
            self._client_options["auth_data"] = [("digest", f"{self.user}:{secret}")]
            # Named explicitly rather than "auth" (CREATOR_ALL_ACL): over TLS, ZooKeeper also
            # authenticates the client certificate, and "auth" would grant every client with
            # a certificate of the same name the right to delete a leader's node.
            self._acl = [make_digest_acl(self.user, secret, all=True), *READ_ACL_UNSAFE]
            self._client_options["default_acl"] = self._acl
            if not self.tls.enabled:
                warn_plaintext_secret("zookeeper", "digest password", [host for host, _ in parsed])
        self._address_count = len(set(parsed))  # a TLS failure is final once each has refused
        self._sessions: dict[int, _Session] = {}
        self._greenlets: set[gevent.Greenlet] = set()
        self._root_ready = not self.root
        self._min_ms: int | None = None  # session timeout limits learnt from the server
        self._max_ms: int | None = None
        self._closed = False
        blocking = _blocking_calls(parsed, self.tls.enabled)
        if blocking and not _patched():
            warnings.warn(
                f"gevent has not monkey-patched this process, so kazoo's {blocking} will block "
                "the gevent hub: call gevent.monkey.patch_all() first",
                RuntimeWarning,
                stacklevel=2,
            )

    def _range_message(self, ttl: float, negotiated_ms: int | None = None) -> str:
        limits = [f"at least {self._min_ms / 1000:g}s" if self._min_ms else "",
                  f"at most {self._max_ms / 1000:g}s" if self._max_ms else ""]
        got = f" (it granted {negotiated_ms / 1000:g}s)" if negotiated_ms is not None else ""
        return (
            f"ttl={ttl:g}s is not a session timeout the ZooKeeper server at {self.hosts} keeps{got}: "
            f"use a ttl of {' and '.join(filter(None, limits))}, or change the server's "
            "minSessionTimeout/maxSessionTimeout (by default 2 and 20 times tickTime)"
        )

    # -- sessions (one per TTL) -----------------------------------------------------------------

    def _spawn(self, func: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """``func(*args)`` in a greenlet that close() waits for."""
        greenlet = gevent.spawn(func, *args)
        self._greenlets.add(greenlet)
        greenlet.link(self._greenlets.discard)
        return greenlet

    def _session(self, timeout_ms: int | None = None) -> _Session:
        """A connected session with that requested timeout (None: any session, for reading)."""
        if self._closed:
            raise StoreUnavailableError("the ZooKeeper store is closed")
        for session in self._sessions.values():
            if session.pid != os.getpid():
                raise StoreError(
                    "this ZooKeeper store was connected before a fork: create the store (or use it "
                    "first) in each worker process"
                )
        if timeout_ms is None:
            live = [s for s in self._sessions.values() if s.connected.is_set()]
            session = live[0] if live else next(iter(self._sessions.values()), None)
            timeout_ms = session.requested_ms if session else _READER_SESSION_MS
        session = self._sessions.get(timeout_ms)
        if session is None:
            session = self._sessions[timeout_ms] = _Session(self, timeout_ms)
        if not session.settled.wait(self.timeout) or (session.error and not session.connected.is_set()):
            if self._sessions.get(timeout_ms) is session:  # never connected: start afresh next time
                del self._sessions[timeout_ms]
                self._spawn(session.close)
            if session.error is not None:
                raise session.error
            raise StoreUnavailableError(f"cannot connect to ZooKeeper at {self.hosts} within {self.timeout:g}s"
                                        f"{session.last_error()}")
        session.wait_connected(self.timeout)
        if not self._root_ready:
            self._ensure_root(session)
        return session

    def _ensure_root(self, session: _Session) -> None:
        parent = ""
        for part in self.root.split("/")[1:]:
            parent += "/" + part
            if session.call(session.client.exists_async, parent) is None:
                with contextlib.suppress(NodeExistsError):  # a concurrent creator won
                    session.call(session.client.create_async, parent, b"", self._acl or OPEN_ACL_UNSAFE)
        self._root_ready = True

    def _lease_session(self, ttl: float) -> _Session:
        ms = _ttl_ms(ttl)
        session = self._session(ms)
        negotiated = session.negotiated_ms
        if negotiated is None:
            raise StoreError("could not read the session timeout the ZooKeeper server negotiated")
        if negotiated != ms:
            if negotiated > ms:
                self._min_ms = negotiated
            else:
                self._max_ms = negotiated
            raise InvalidArgumentError(self._range_message(ttl, negotiated))
        return session

    def close(self) -> None:
        """End every session (deleting any node still held) and stop kazoo's greenlets."""
        if self._closed:
            return
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            self._spawn(session.close)
        gevent.joinall(list(self._greenlets), timeout=self.timeout + 10)


def _digest_identity(user: object, password: str | None, auth: object) -> tuple[str | None, str | None]:
    """``(user, password)`` for digest authentication, or ``(None, None)``; errors never show
    the password."""
    if auth is not None:
        if user is not None or password is not None:
            raise InvalidArgumentError("give user and password, or the older auth='user:password', not both")
        user, _, password = check_secret("auth", auth).partition(":")
        if not password:
            raise InvalidArgumentError("auth must be 'user:password'")
    if user is None and password is None:
        return None, None
    if user is None or password is None:
        raise InvalidArgumentError("ZooKeeper digest authentication needs both user and password")
    name = check_text("user", user)
    if ":" in name:
        raise InvalidArgumentError("a ZooKeeper digest user name cannot contain ':'")
    return name, password


def _describe_acl(acls: list[ACL]) -> str:
    """An ACL without its password hashes: ``digest:admin:cdrwa, world:anyone:r``."""
    def rights(perms: int) -> str:
        return "".join(letter for bit, letter in _PERMS if perms & bit) or "-"

    return ", ".join(f"{a.id.scheme}:{a.id.id.split(':', 1)[0]}:{rights(a.perms)}" for a in acls)


class _KazooLog(logging.LoggerAdapter):
    """The logger kazoo gets for one session: ``kazoo.client``, minus secrets.

    At DEBUG level kazoo logs every request it sends, its Auth request (the digest password)
    and its Connect request (the session password) included, and the session password again
    below DEBUG; those values are replaced by ``***`` here. It also keeps the last connection
    error, which kazoo only logs, for the store's error messages, and tells ``on_tls_refusal``
    of each TLS handshake the certificates decided against, with the address tried.
    """

    def __init__(self, on_tls_refusal: Callable[[str, str], None]) -> None:
        super().__init__(logging.getLogger("kazoo.client"), {})
        self.last_error: str | None = None
        self._on_tls_refusal = on_tls_refusal
        self._address = ""  # the address kazoo last said it connects to
        self.silent = False  # set in a forked child: its copy of kazoo speaks of the parent's session

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.silent:
            return
        if level < logging.INFO and not self.logger.isEnabledFor(level):
            return  # kazoo's two lines a request, unread: the errors kept below are WARNINGs
        text = str(msg)
        if text.startswith("Connecting to") and len(args) >= 3:
            self._address = f"{args[0]}:{args[2]}"
        if text.startswith(("Connection dropped", "Connection time-out", "Cannot resolve")) and args:
            self.last_error = " ".join(str(args[-1]).split())
            if text.startswith("Connection dropped") and "SSL" in self.last_error \
                    and _TLS_REFUSAL.search(self.last_error):
                self._on_tls_refusal(self._address, self.last_error)
        if "session_passwd" in text:
            args = tuple("***" if isinstance(arg, (bytes, str)) else arg for arg in args)
        args = tuple(_redacted(arg) for arg in args)
        kwargs.setdefault("stacklevel", 2)  # show the line in kazoo, not this one
        super().log(level, msg, *args, **kwargs)


def _redacted(arg: object) -> object:
    """kazoo's Auth and Connect requests (and responses) with their secret field hidden."""
    if isinstance(arg, Auth):
        return f"Auth(auth_type={arg.auth_type}, scheme={arg.scheme!r}, auth='***')"
    if isinstance(arg, tuple) and hasattr(arg, "_fields") and "passwd" in arg._fields:
        return f"{type(arg).__name__}(passwd=***)"
    return arg


def _waker(event: Event) -> Callable[[WatchedEvent], None]:
    """A kazoo watch callback that only sets ``event``."""
    return lambda _watched: event.set()


def _patched() -> bool:
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))
