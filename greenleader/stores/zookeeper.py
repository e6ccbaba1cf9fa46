"""ZooKeeper store, on kazoo with its gevent handler.

Election (kazoo's Lock recipe, made session-aware): each candidate creates an ephemeral
sequential node ``<key>/<uuid>__lock__<sequence>`` whose data is the candidate's node name,
so the leader's name lives and dies with its session. The lowest sequence leads; every
other candidate watches only its predecessor (no thundering herd), so winners come in the
order they queued up. The fencing term is the winner node's ``czxid``: later winners' nodes
were created later. The node names follow kazoo's Lock recipe, so kazoo ``Lock`` holders on
the same path and greenleader candidates exclude each other.

**Each candidate has a twin node** ``<key>/<uuid>__live__``, ephemeral too, created and deleted
with its node in one transaction (so nobody ever sees one without the other), and invisible to
kazoo's Lock recipe. It is there for a node deleted from outside: an operator's ``delete`` of the
leader's node leaves its session alive, and the leader leads on until its watch on the node
reports the deletion. Its twin stays until then: the holder, hearing of it, steps down and its
release deletes the twin (or the twin goes when the session expires). A candidate that comes
first in the queue wins only when no twin of an older candidate is left without its node
(one more request, only when there is such a twin, to learn its age), so no one wins beside a
leader whose node was deleted (before the twin: two leaders for up to 186 ms when the holder
heard of it 50 ms late). Deleting either of a candidate's nodes ends its tenure, or sends it to
the back of the queue. A graceful release deletes both at once: handover costs nothing more. The
limit: deleting *both* nodes of a live leader (say, ``deleteall`` of the key) looks to everyone
else exactly like its session's expiry, and ZooKeeper offers no way to ask whether another
session lives, so the next candidate can then win before the old leader hears of it (one
watch notification).

A winner *claims* its node by writing the same data again (version 0 -> 1), queued as it
returns from :meth:`ZooKeeperStore.acquire`, so sent only after the candidate stepped up.
Followers name only a claimed first node: never a candidate that has not learnt it leads
yet, nor a waiter that happens to be first while it withdraws. kazoo's ``Lock`` and ``Election``
never claim: followers name their first node at once, with its data (the identifier). The uids
of greenleader's nodes end in a tag that tells them apart (:func:`_claims`).

Sessions and TTLs, the safety property: the server deletes a session's ephemeral nodes
only after the negotiated session timeout passes without hearing from the client. A
lease is confirmed by a round trip that touches the session (``sync`` + ``exists`` of the
node), and ``confirmed_at`` is taken before it is sent, so no one else can win before
``confirmed_at + session timeout``. The store therefore keeps one kazoo client (one
session) per distinct TTL, created lazily, whose session timeout *is* the TTL, and it
checks the timeout the server actually negotiated: servers clamp it to
``[minSessionTimeout, maxSessionTimeout]`` (2 and 20 ``tickTime`` by default), and a TTL
the server would not keep exactly is refused with InvalidArgumentError (a shorter session
would break safety, a longer one would make crash failover slower than the TTL). Limits
learnt that way are also checked by :meth:`ZooKeeperStore.validate_ttl`.

Connection states: SUSPENDED (connection lost, session may live) makes renewals fail with
StoreUnavailableError, so the candidate leads only until its renew deadline unless the
connection returns first. LOST (session expired or closed: every ephemeral node is gone)
reports every live lease of that session lost at once. A watch on the leader's own node
reports its deletion (say, by an operator evicting a stuck holder) the
same way. Listener and watch callbacks only set flags or spawn.

Release deletes the candidate's node and its twin (one round trip; the next waiter's watch
fires). When the connection is down the nodes are remembered and deleted as soon as the
session reconnects (or vanish with it). The key's persistent parent nodes are left in place:
they hold no data, so they never show a stale leader, and never deleting them means a
concurrent candidate's create never races a delete.

Access control (digest ``user``): every node the store creates gets the ACL
``digest:<user>:cdrwa, world:anyone:r``, the missing ancestors of the key (and of the
chroot) included. Ancestors are restricted rather than left open on purpose: ZooKeeper
checks the right to delete a node on its parent, so under an open parent anyone could
delete the key's node between elections and remake it with an ACL that shuts the owner
out, or change the parent's ACL itself. The price: another identity cannot add a sibling
key under ancestors this store created. To share a prefix, an operator creates it first
with the rights each identity needs (docs/security.md); the store never changes the ACL of
a node that already exists. Without ``user``, nodes are open to all (kazoo's default).
ZooKeeper's root is open to all too, so confining an identity to its prefix takes the
administrator's lock on ``/`` (docs/security.md); a refusal names the node and, from the
ACLs it can read, tells a wrong digest password from a missing right.

Connections are made lazily, on first use, so a store may be created before a fork (a
gunicorn master) as long as it is first used after; a store used before a fork refuses to
be used in the child (it would share the parent's session). kazoo's gevent handler uses
gevent sockets, so it is cooperative even without monkey patching; only its host name
lookups and TLS handshakes use blocking standard library calls, hence the warning for
unpatched processes given host names or TLS.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import gevent
import gevent.socket
from gevent.event import Event

from .. import _fork
from ..errors import (
    InvalidArgumentError,
    InvalidKeyError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from ._security import check_secret, pick, read_secret, tls_options, warn_plaintext_secret
from .base import LeaderInfo, Lease, Store, check_float, check_text, now

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
    from kazoo.handlers.gevent import SequentialGeventHandler
    from kazoo.hosts import collect_hosts
    from kazoo.protocol.serialization import Auth, Connect
    from kazoo.protocol.states import EventType, KazooState, KeeperState, WatchedEvent, ZnodeStat
    from kazoo.retry import KazooRetry
    from kazoo.security import ACL, OPEN_ACL_UNSAFE, READ_ACL_UNSAFE, make_digest_acl
    from kazoo.security import Permissions as ACL_PERMS
except ImportError as exc:  # new_store() turns this into MissingDependencyError
    raise ImportError(str(exc), name="kazoo") from exc

__all__ = ["ZooKeeperStore"]

log = logging.getLogger(__name__)

_CONTENDER = "__lock__"  # kazoo's Lock recipe names its nodes <uuid>__lock__<sequence>
_CONTENDER_RE = re.compile(r"__lock__(-?\d{10})$")
_LIVE = "__live__"  # <uuid>__live__: the twin of a candidate's node <uuid>__lock__<sequence>
#: The end of every uid greenleader gives its nodes (32 hex digits, like kazoo's uuid4 hex):
#: followers tell its candidates, which are named only once claimed, from kazoo's, which never
#: claim. A kazoo uid ends so by chance once in 2**20: then it is named once its data changes.
_OWN_UID_TAG = "91ead"
ORPHAN_RETRY_DELAY = 0.1  # first pause before leftover nodes are deleted again (doubling)
ORPHAN_RETRY_MAX = 1.0  # at most this long: a close() waits for the cleaner to see it
_READER_SESSION_MS = 10_000  # session of a store that only reads (leader, watch)
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


@dataclass(frozen=True)
class _Unclaimed:
    """The first node in the queue, whose candidate has not claimed the win yet."""

    path: str


class _ConnectionLost(StoreUnavailableError):
    """A request failed because the connection dropped; worth retrying once reconnected."""


def _contenders(children: list[str]) -> list[str]:
    """Contender node names (kazoo Lock format), lowest sequence first."""
    found = [(m.group(1), c) for c in children if (m := _CONTENDER_RE.search(c))]
    return [name for _, name in sorted(found, key=lambda pair: int(pair[0]))]


def _new_uid() -> str:
    """A uid for a candidate's nodes: random, 32 hex digits, ending in :data:`_OWN_UID_TAG`."""
    return uuid.uuid4().hex[:-len(_OWN_UID_TAG)] + _OWN_UID_TAG


def _claims(contender: str, children: list[str]) -> bool:
    """True if ``contender`` (a node name among ``children``) is greenleader's, which claims
    its win, rather than kazoo's ``Lock``/``Election``'s, which never does: its uid carries the
    tag, or (a node made before the tag) its twin is there. Node and twin are made in one
    transaction, and the tag stays when an operator deletes the twin: so an unclaimed
    greenleader node never passes for kazoo's."""
    uid = contender.partition(_CONTENDER)[0]
    return uid.endswith(_OWN_UID_TAG) or f"{uid}{_LIVE}" in children


def _orphaned_twins(children: list[str], contenders: list[str]) -> list[str]:
    """The twin nodes ``<uuid>__live__`` among ``children`` whose ``<uuid>__lock__<n>`` is gone."""
    queued = {name.partition(_CONTENDER)[0] for name in contenders}
    return [name for name in children if name.endswith(_LIVE) and name[:-len(_LIVE)] not in queued]


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


class _WakeSocket:
    """kazoo's wake-up socket, written without ever blocking the writer.

    kazoo queues each request and writes one byte to a socketpair to wake its connection
    greenlet, which sends one queued request per byte. A Unix socket charges every 1-byte
    write a whole buffer, so about 280 requests queued at once fill it (1,000 candidates
    starting in one process do). A writer would then wait in send(), which gevent refuses
    to a second greenlet (ConcurrentObjectUseError) and to the hub's callbacks (kazoo queues
    requests from result callbacks); kazoo reports ConnectionClosedError yet leaves the
    request queued without its byte, never to be sent. Here a byte that does not fit is
    owed, and one helper greenlet pays what is owed as room appears: bytes are all alike.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._owed = 0
        self._payer: gevent.Greenlet | None = None
        self.pid = os.getpid()

    def send(self, data: bytes) -> int:
        if self.pid != os.getpid():
            return len(data)  # a forked child's copy: the socketpair wakes the parent's kazoo
        if not self._owed:
            try:
                return os.write(self._sock.fileno(), data)
            except BlockingIOError:
                pass
        self._owed += len(data)
        if self._payer is None:
            self._payer = gevent.spawn(self._pay)
        return len(data)

    def _pay(self) -> None:
        try:
            while self._owed:
                gevent.socket.wait_write(self._sock.fileno())
                with contextlib.suppress(BlockingIOError):
                    self._owed -= os.write(self._sock.fileno(), b"\0" * self._owed)
        except (OSError, ValueError):  # closed by kazoo: its connection is gone anyway
            self._owed = 0
        finally:
            self._payer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Session:
    """One kazoo client (one ZooKeeper session) with a fixed requested session timeout."""

    def __init__(self, store: ZooKeeperStore, timeout_ms: int) -> None:
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
        self.client = KazooClient(
            hosts=store.hosts,
            timeout=timeout_ms / 1000.0,
            handler=SequentialGeventHandler(),
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=0.5, sleep_func=gevent.sleep),
            logger=self.log,
            **store._client_options,
        )
        self._hook_negotiation()
        self.client.add_listener(self._on_state)
        self.client.start_async()
        connection = self.client._connection
        if connection._write_sock is not None:  # made by start_async (kazoo >= 2.10 internals)
            connection._write_sock = _WakeSocket(connection._write_sock)
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """The session is the parent's: stop this copy of kazoo's connection loop before it
        reads the parent's replies (killing it only closes this process's descriptors)."""
        self.connected.clear()
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
            if self.leases:
                log.warning("%r: connection lost; leadership is uncertain until it returns", self)
        else:  # LOST: the session expired or was closed, and every ephemeral node with it
            self.connected.clear()
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
        error = self.store._spawn(self._removal, parent, prefix, names).get()
        if error is not None:
            self.clean_up_orphans()
            raise error

    def _removal(self, parent: str, prefix: str, names: tuple[str, ...]) -> StoreError | None:
        """:meth:`_remove` for a greenlet: the error is returned, as a greenlet that dies of
        it gets its traceback printed by the hub."""
        try:
            self._remove(parent, prefix, names)
        except StoreError as exc:
            return exc
        return None

    def _remove(self, parent: str, prefix: str, names: tuple[str, ...] = ()) -> None:
        # Requests of one session are served in order, so the listing sees the nodes of any
        # create this session sent before, even one whose answer was lost.
        found = list(names) or [c for c in self.children(parent) if c.startswith(prefix)]
        if not found:
            self.orphans.discard((parent, prefix))
            return
        try:  # a candidate's node and its twin go together: no waiter sees one without the other
            self.multi(lambda transaction: [transaction.delete(f"{parent}/{name}") for name in found])
        except NoNodeError:  # one was gone already (deleted from outside): delete the others
            for name in found:
                with contextlib.suppress(NoNodeError):
                    self.call(self.client.delete_async, f"{parent}/{name}")
        self.orphans.discard((parent, prefix))

    def close(self) -> None:
        """End the session (its ephemeral nodes go at once) and free the connection."""
        self.connected.clear()
        if self.pid != os.getpid():
            return  # inherited across fork: closing would end the parent's session
        try:
            self.client.stop()
            self.client.close()
        except (KazooException, OSError) as exc:
            log.warning("%r: error while closing: %s", self, exc)


class _ZooKeeperLease(Lease):
    """A candidate's node and its twin: its place in the queue while it waits, its lease once
    it leads."""

    def __init__(self, session: _Session, key: str, node: str, path: str, twin: str) -> None:
        super().__init__(key, node, 0, 0.0)
        self.path = path
        self.twin = twin
        self.woken = Event()  # set by the watches acquire() waits on
        self._session = session
        self._session_id: int | None = None  # set once it leads
        self._released = False
        self._lost: str | None = None
        self._gone = False
        self._deleted: set[str] = set()  # our nodes known to be deleted from outside

    def won(self, stat: ZnodeStat, confirmed_at: float) -> None:
        self.term = stat.czxid
        self.confirmed_at = confirmed_at
        self._session_id = stat.ephemeralOwner
        self._session.leases.add(self)

    def claim(self) -> None:
        """Mark the node as a leader's: the same data again, so its version goes 0 -> 1.

        Followers report a node as leader only once it is claimed, so they never name a
        candidate that has not yet learnt it leads, nor a waiter that is withdrawing. The
        request is only queued here: kazoo sends it once the calling greenlet yields, that
        is after the candidate has stepped up. A claim lost with the connection is made
        again by the next renewal.
        """
        self._session.client.set_async(self.path, self.node.encode())

    def lost(self, why: str, *, gone: bool = True) -> None:
        """The hold is lost (session expired, node deleted): tell the candidate at once.

        ``gone``: none of its nodes exists any more (the session ended), so release() has
        nothing to delete.
        """
        if self._released or self._lost:
            return
        self._lost = why
        self._gone = gone
        log.info("%r lost: %s", self, why)
        self._session.leases.discard(self)
        self.notify_lost()

    def on_node_event(self, event: WatchedEvent) -> None:
        """kazoo watch on our own node and its twin: the deletion of either ends the lease (or
        the wait) at once."""
        if event.type == EventType.DELETED:
            self._deleted.add(event.path)
            self.woken.set()
            if self._session_id is not None:
                self.lost(f"its node {event.path} was deleted", gone=False)
        elif event.type == EventType.CHANGED and not self._released:  # our claim: watch on
            self._session.client.exists_async(self.path, self.on_node_event)

    def renew(self) -> None:
        started = now()
        session = self._session
        if self._released:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        if self._lost:
            raise LeadershipLostError(f"{self.node!r} lost {self.key!r}: {self._lost}")
        if not session.connected.is_set():
            raise StoreUnavailableError("the ZooKeeper connection is down; the session may survive")
        if session.session_id != self._session_id:
            raise LeadershipLostError("the ZooKeeper session that held the key has ended")
        # sync brings the server we talk to up to date with the ensemble's leader, so exists
        # sees any deletion committed before; both are pipelined in one round trip.
        synced = session.client.sync_async(self.path)
        exists = session.client.exists_async(self.path, self.on_node_event)
        twin = session.client.exists_async(self.twin, self.on_node_event)
        try:
            session.result(synced)
            stat = session.result(exists, max(0.0, session.store.timeout - (now() - started)))
            twin_stat = session.result(twin, max(0.0, session.store.timeout - (now() - started)))
        except _ConnectionLost as exc:
            raise StoreUnavailableError(f"renewal failed: {exc}") from exc
        if stat is None or twin_stat is None or stat.ephemeralOwner != self._session_id:
            self._deleted.update(path for path, found in ((self.path, stat), (self.twin, twin_stat)) if found is None)
            self.lost("its node or its twin was deleted", gone=False)
            raise LeadershipLostError(f"{self.node!r} no longer holds {self.key!r}: its node or its twin is gone")
        if stat.version == 0:
            self.claim()
        self.confirmed_at = started

    def abandon(self) -> None:
        """Give the hold up without waiting: a forked child's copy (its session is inert), or
        a hold whose release kept failing. The nodes are recorded as orphans, which a greenlet
        of the store deletes now if connected, else on the next (re)connection or acquire(),
        rather than keeping them for as long as the session lives."""
        session = self._session
        if not self._released:
            self._released = True
            session.leases.discard(self)
            session.orphans.add(self._orphan)
        if self._orphan in session.orphans and session.connected.is_set():
            session.clean_up_orphans()  # spawned, not run: no switch here

    @property
    def _orphan(self) -> tuple[str, str]:
        """How this candidacy's nodes are recorded as orphans: (parent path, name prefix)."""
        return self.path.rsplit("/", 1)[0], self.twin.rsplit("/", 1)[1].removesuffix(_LIVE)

    def release(self) -> None:
        session = self._session
        if self._released:
            # Released before: a release that failed left its nodes recorded as orphans; try
            # their deletion again (StoreUnavailableError while disconnected).
            if self._orphan in session.orphans and session.pid == os.getpid():
                session.discard(*self._orphan)
            return
        self._released = True
        session.leases.discard(self)
        if self._gone or session.session_id not in (None, self._session_id) or session.store._closed:
            return  # its session has ended and the nodes with it
        left = tuple(path.rsplit("/", 1)[1] for path in (self.path, self.twin) if path not in self._deleted)
        if left:  # both, as a rule; only the other one when one was deleted from outside
            session.discard(*self._orphan, left)


class ZooKeeperStore(Store):
    """Elections on a ZooKeeper ensemble.

    :param addrs: "host:port" endpoints (default ``["127.0.0.1:2181"]``).
    :param chroot: path prefix for every key, like a ZooKeeper chroot (created if missing).
    :param timeout: seconds to wait for a connection, and for each request.
    :param user, password: ZooKeeper digest authentication (``password_file``: read the
        password from that file). Every node the store creates then gets the ACL
        ``digest:<user>:<hash>:cdrwa, world:anyone:r``, the key's missing ancestors
        included: only this identity may join, leave or delete (so no other client can
        delete a leader's node, or the key's node), anyone may read (followers need no
        credentials). Nodes that already exist keep their ACL. The older ``auth="user:password"`` still works.
    :param tls: connect with TLS (on by default when ``ca_file`` or ``cert_file`` is given).
    :param ca_file: CA bundle that signs the servers' certificates (kazoo also trusts the
        system's CAs).
    :param cert_file, key_file: client certificate and its key (ZooKeeper's secure port
        requires one by default).
    :param verify: check the server's certificate and that it names the host connected to
        (default true). Older names: ``use_ssl``, ``ca``, ``certfile``, ``keyfile``,
        ``verify_certs``.
    """

    backend: ClassVar[str] = "zookeeper"
    # Below 0.1 s kazoo's pings (every third of the session timeout) cannot keep up.
    min_ttl: ClassVar[float] = 0.1

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

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> ZooKeeperStore:
        """``zookeeper://h1:2181,h2:2181/chroot?timeout=5``: the path is the chroot."""
        if "chroot" in options:
            raise InvalidArgumentError("give the chroot as the URL path, not as an option")
        return cls(addrs, chroot=path or None, **options)

    def __repr__(self) -> str:
        user = f" user={self.user!r}" if self.user else ""
        tls = f" {self.tls.describe()}" if self.tls.enabled else ""
        return f"<ZooKeeperStore {self.hosts}{self.root}{user}{tls}>"

    # -- validation ---------------------------------------------------------------------------

    def validate_key(self, key: str) -> str:
        """A ZooKeeper path below the chroot: no empty, '.' or '..' components, no trailing
        '/', no characters ZooKeeper refuses; the leading '/' is optional."""
        key = super().validate_key(key)
        path = _check_path("key", key, InvalidKeyError)
        if not self.root and (path == "/zookeeper" or path.startswith("/zookeeper/")):
            raise InvalidKeyError(f"key {key!r} is in /zookeeper, which ZooKeeper reserves")
        return key

    def validate_ttl(self, ttl: float) -> float:
        ttl = super().validate_ttl(ttl)
        ms = _ttl_ms(ttl)
        if (self._min_ms is not None and ms < self._min_ms) or (self._max_ms is not None and ms > self._max_ms):
            raise InvalidArgumentError(self._range_message(ttl))
        return ttl

    def _range_message(self, ttl: float, negotiated_ms: int | None = None) -> str:
        limits = [f"at least {self._min_ms / 1000:g}s" if self._min_ms else "",
                  f"at most {self._max_ms / 1000:g}s" if self._max_ms else ""]
        got = f" (it granted {negotiated_ms / 1000:g}s)" if negotiated_ms is not None else ""
        return (
            f"ttl={ttl:g}s is not a session timeout the ZooKeeper server at {self.hosts} keeps{got}: "
            f"use a ttl of {' and '.join(filter(None, limits))}, or change the server's "
            "minSessionTimeout/maxSessionTimeout (by default 2 and 20 times tickTime)"
        )

    def path_for(self, key: str) -> str:
        """The absolute ZooKeeper path (chroot included) under which ``key``'s candidates queue."""
        return self.root + _check_path("key", self.validate_key(key), InvalidKeyError)

    # -- sessions -------------------------------------------------------------------------------

    def _spawn(self, func: Callable[..., None], *args: Any) -> gevent.Greenlet:
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

    # -- the store contract -------------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        node = check_text("node", node)
        path = self.path_for(key)
        session = self._lease_session(self.validate_ttl(ttl))
        if session.orphans:  # left by a release or withdrawal that was cut short
            session.delete_orphans()
        client = session.client
        uid = _new_uid()  # our nodes: <uid>__lock__<sequence> and its twin <uid>__live__
        lease: _ZooKeeperLease | None = None  # our nodes, once created
        sent = False  # a create request went out, so nodes of ours may exist
        try:
            while True:
                try:
                    session.wait_connected(self.timeout)
                    if lease is None and sent:  # a create whose answer was lost may have worked
                        name = next((c for c in session.children(path) if c.startswith(uid + _CONTENDER)), None)
                        lease = _ZooKeeperLease(session, key, node, f"{path}/{name}", f"{path}/{uid}{_LIVE}") \
                            if name else None
                    if lease is None:
                        sent = True
                        try:
                            created = self._register(session, path, uid, node)
                        except NoNodeError:
                            self._ensure_key(session, path)
                            continue
                        lease = _ZooKeeperLease(session, key, node, created, f"{path}/{uid}{_LIVE}")
                    lease.woken.clear()
                    # One round trip: the queue, and watches on our own nodes (re-armed on each
                    # pass, as kazoo drops watches when the connection drops), so a win needs
                    # no further request and a deletion of our nodes wakes us up.
                    started = now()
                    listing = client.get_children_async(path)
                    own = client.exists_async(lease.path, lease.on_node_event)
                    own_twin = client.exists_async(lease.twin, lease.on_node_event)
                    try:
                        children = session.result(listing)
                    except NoNodeError:
                        children = []
                    contenders = _contenders(children)
                    stat, twin_stat = session.result(own), session.result(own_twin)
                    name = lease.path.rsplit("/", 1)[1]
                    if stat is None or twin_stat is None or name not in contenders:
                        # deleted from outside, or gone with its session: never win with it
                        log.info("%s: its node or its twin in %s is gone; queueing anew", node, path)
                        session.discard(path, uid)
                        uid, lease, sent = _new_uid(), None, False
                        continue
                    position = contenders.index(name)
                    if position == 0:
                        if self._older_orphans(session, path, _orphaned_twins(children, contenders), stat.czxid,
                                               lease.woken):
                            lease.woken.wait()
                            continue
                        lease.won(stat, started)
                        lease.claim()
                        log.debug("%s won %s with term %d", node, key, lease.term)
                        return lease
                    predecessor = f"{path}/{contenders[position - 1]}"
                    # kazoo also fires this watch when the connection drops or the session ends
                    if session.call(client.exists_async, predecessor, _waker(lease.woken)) is not None:
                        lease.woken.wait()
                except _ConnectionLost:
                    continue  # wait_connected bounds how long a dead connection is retried
        except BaseException:
            if sent:
                self._withdraw(session, path, uid, lease)
            raise

    @staticmethod
    def _register(session: _Session, path: str, uid: str, node: str) -> str:
        """Create our node and its twin, in one transaction; the node's path."""
        def build(transaction: Any) -> None:
            transaction.create(f"{path}/{uid}{_CONTENDER}", node.encode(), ephemeral=True, sequence=True)
            transaction.create(f"{path}/{uid}{_LIVE}", b"", ephemeral=True)

        return str(session.multi(build)[0])

    @staticmethod
    def _older_orphans(session: _Session, path: str, orphans: list[str], czxid: int,
                       watch: Event) -> list[str]:
        """The twins among ``orphans`` created before our node (``czxid``), watched: their
        candidates' nodes were deleted from outside while their sessions live, and the first
        of them may still lead until it hears of it and deletes its twin (or its session
        expires). Younger ones were never first: they do not matter."""
        pending = [(twin, session.client.exists_async(f"{path}/{twin}", _waker(watch))) for twin in orphans]
        older = [twin for twin, request in pending
                 if (stat := session.result(request)) is not None and stat.czxid < czxid]
        if older:
            log.info("ZooKeeper: a candidate waits for %s in %s to go: their nodes were deleted from outside, "
                     "and the first may still lead", ", ".join(older), path)
        return older

    def _ensure_key(self, session: _Session, path: str) -> None:
        """Create the key's node and its missing ancestors, all with the store's ACL: with a
        digest ``user``, nothing the store creates can be deleted, joined or re-permissioned
        by anyone else, ancestors included (see "Access control" in the module docstring);
        ancestors that already exist keep their ACL."""
        parent = path.rsplit("/", 1)[0]
        if parent:
            session.call(session.client.ensure_path_async, parent, self._acl or OPEN_ACL_UNSAFE)
        with contextlib.suppress(NodeExistsError):
            session.call(session.client.create_async, path, b"")

    def _withdraw(self, session: _Session, path: str, uid: str, lease: _ZooKeeperLease | None) -> None:
        """Delete our nodes after a cancelled or failed acquire (or leave them to reconnection)."""
        names = (lease.path.rsplit("/", 1)[1], f"{uid}{_LIVE}") if lease is not None else ()
        try:
            session.discard(path, uid, names)
        except StoreError as exc:
            log.info("could not withdraw from %s now (%s); retrying on reconnection", path, exc)

    def leader(self, key: str) -> LeaderInfo | None:
        path = self.path_for(key)
        while True:
            try:
                session = self._session()
                info = self._read_leader(session, path)
                if isinstance(info, _Unclaimed):
                    # A winner claims its node one round trip after it learnt it won; wait
                    # for that (bounded: a winner may die before claiming) rather than
                    # report a vacancy. Only here is a watch set, so calling leader() often
                    # leaves no watches behind.
                    claimed = Event()
                    stat = session.call(session.client.exists_async, info.path, _waker(claimed))
                    if stat is not None and stat.version == 0:
                        claimed.wait(self.timeout)
                    info = self._read_leader(session, path)
                return None if isinstance(info, _Unclaimed) else info
            except _ConnectionLost:
                continue

    def _read_leader(
        self, session: _Session, path: str, watch: Callable[[Any], None] | None = None
    ) -> LeaderInfo | _Unclaimed | None:
        """The leader of ``path``; with ``watch``, arm it on what would change the answer."""
        client = session.client
        while True:
            try:
                children = session.call(client.get_children_async, path)
                contenders = _contenders(children)
                if not contenders and watch is not None:  # vacant: wake up when someone joins
                    children = session.call(client.get_children_async, path, watch)
                    contenders = _contenders(children)
            except NoNodeError:
                if session.call(client.exists_async, path, watch) is None:
                    return None  # the key does not exist yet: wake up when it is created
                continue
            if not contenders:
                return None
            first = f"{path}/{contenders[0]}"
            try:  # the leader stays leader until its node goes: watch only that node
                data, stat = session.call(client.get_async, first, watch)
            except NoNodeError:
                continue
            if stat.version == 0 and _claims(contenders[0], children):
                return _Unclaimed(first)  # the claim (or the node's deletion) fires the watch
            # a claimed greenleader node, or kazoo's: named at once (it never claims)
            return LeaderInfo(data.decode("utf-8", "replace"), stat.czxid)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        path = self.path_for(key)
        while True:
            changed = Event()
            try:
                info = self._read_leader(self._session(), path, _waker(changed))
            except _ConnectionLost:
                continue
            yield None if isinstance(info, _Unclaimed) else info
            changed.wait()  # kazoo also fires watches when the connection drops

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

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
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
