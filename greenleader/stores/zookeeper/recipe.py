"""The ZooKeeper election, on kazoo's Lock recipe made session-aware.

Read :meth:`ZooKeeperStore.acquire` top-down: register a node and its twin in one
transaction, list the queue, win when first (after proving no older candidate's orphaned
twin lives), else watch the predecessor and wait. A win is then claimed (:meth:`_ZooKeeperLease.claim`)
once the candidate stepped up; :meth:`ZooKeeperStore.leader` and :meth:`ZooKeeperStore.watch`
name only claimed nodes (or kazoo's, which never claim). docs/stores/zookeeper.md says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from gevent.event import Event
from gevent.queue import Empty, Queue

from ...errors import (
    InvalidArgumentError,
    InvalidKeyError,
    LeadershipLostError,
    StoreError,
    StoreUnavailableError,
)
from ..base import LeaderInfo, Lease, Store, now

try:
    from kazoo.exceptions import NodeExistsError, NoNodeError
    from kazoo.protocol.states import EventType, WatchedEvent, ZnodeStat
    from kazoo.security import OPEN_ACL_UNSAFE
except ImportError as exc:  # new_store() turns this into MissingDependencyError
    raise ImportError(str(exc), name="kazoo") from exc

from .client import ZooKeeperClient, _check_path, _ConnectionLost, _Session, _ttl_ms, _waker

__all__ = ["ZooKeeperStore"]

log = logging.getLogger(__name__)

_CONTENDER = "__lock__"  # kazoo's Lock recipe names its nodes <uuid>__lock__<sequence>
_CONTENDER_RE = re.compile(r"__lock__(-?\d{10})$")
_LIVE = "__live__"  # <uuid>__live__: the twin of a candidate's node <uuid>__lock__<sequence>
#: The end of every uid greenleader gives its nodes (32 hex digits, like kazoo's uuid4 hex):
#: followers tell its candidates, which are named only once claimed, from kazoo's, which never
#: claim. A kazoo uid ends so by chance once in 2**20: then it is named once its data changes.
_OWN_UID_TAG = "91ead"
#: Seconds a watch waits for the first node's claim before reporting a vacancy: a winner
#: claims one round trip after its win (a few ms; tens on a loaded machine). Only a first
#: node that is never claimed (a waiter withdrawing, a winner gone before it claimed) waits
#: it out, and then its followers name the previous leader that much longer.
CLAIM_GRACE = 0.1
#: Seconds a waiter woken by its predecessor's claim waits before reading the queue again:
#: the claim comes just as the new leader starts its work (`greenleader run` starts its
#: command then), and the listing (a round trip, ~0.5 ms of our CPU and the server's) would
#: compete with it for the CPU on a shared host. The waiter becomes second in line that much
#: later; only a leader that releases within it hands over that much more slowly.
RELIST_AFTER_CLAIM = 0.05


@dataclass(frozen=True)
class _Unclaimed:
    """The first node in the queue, whose candidate has not claimed the win yet: once it
    does, ``leader`` (its data, the candidate's node name) leads."""

    path: str
    leader: LeaderInfo


def _contenders(children: list[str]) -> list[str]:
    """Contender node names (kazoo Lock format), lowest sequence first."""
    found = [(m.group(1), c) for c in children if (m := _CONTENDER_RE.search(c))]
    return [name for _, name in sorted(found, key=lambda pair: int(pair[0]))]


def _new_uid() -> str:
    """A uid for a candidate's nodes: random, 32 hex digits, ending in :data:`_OWN_UID_TAG`."""
    return uuid.uuid4().hex[:-len(_OWN_UID_TAG)] + _OWN_UID_TAG


def _claim_waker(woken: Event, claimed: list[bool]) -> Callable[[WatchedEvent], None]:
    """A watch on a waiter's predecessor: sets ``woken``, and records in ``claimed`` a write
    (the predecessor's claim of its win) rather than its deletion."""

    def wake(event: WatchedEvent) -> None:
        if event.type == EventType.CHANGED:
            claimed.append(True)
        woken.set()

    return wake


def _claims(contender: str, children: list[str]) -> bool:
    """True if ``contender`` (a node name among ``children``) is greenleader's, which claims
    its win, rather than kazoo's ``Lock``/``Election``'s, which never does: its uid carries the
    tag, or (a node made before the tag) its twin is there. Node and twin are made in one
    transaction, and the tag stays when an operator deletes the twin: so an unclaimed
    greenleader node never passes for kazoo's."""
    uid = contender.partition(_CONTENDER)[0]
    return uid.endswith(_OWN_UID_TAG) or f"{uid}{_LIVE}" in children


def _twin_of(contender: str) -> str:
    """The twin of a contender node (a name or a path)."""
    return contender.rsplit(_CONTENDER, 1)[0] + _LIVE


def _orphaned_twins(children: list[str], contenders: list[str]) -> list[str]:
    """The twin nodes ``<uuid>__live__`` among ``children`` whose ``<uuid>__lock__<n>`` is gone."""
    queued = {name.partition(_CONTENDER)[0] for name in contenders}
    return [name for name in children if name.endswith(_LIVE) and name[:-len(_LIVE)] not in queued]


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
        self.created: ZnodeStat | None = None  # our node's stat, as acquire() first found it
        self.watched_in: int | None = None  # the session generation in which acquire() armed its watches
        self._armed: int | None = None  # session generation whose watches on our nodes proved them claimed
        self._claim: Any = None  # the claim's re-arming read, once sent (see claim)
        self.writes = 0  # writes to our node seen by its watch (our claim; anything else is from outside)
        # What the watches on the first candidate's nodes reported (see ZooKeeperStore._await_release)
        self.first_deleted: set[str] = set()
        self.first_written = False

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

        The claim fires the watch on our node; the read queued right behind it arms the watch
        again and proves the node claimed (ZooKeeper answers a session's requests in order,
        and sends the watch's event before the next answer), so renewals may rely on the
        watches from then on (:meth:`_rearmed`) without a request of their own.
        """
        session = self._session
        generation = session.generation
        session.client.set_async(self.path, self.node.encode())
        self._claim = session.client.exists_async(self.path, self.on_node_event)
        self._claim.rawlink(lambda request: self._rearmed(request, generation))

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
        elif event.type == EventType.CHANGED and not self._released:  # our claim, or a write: watch on
            self.writes += 1
            if self._claim is not None and not self._claim.ready():
                return  # the claim's own read, sent after it, arms the watch again
            generation = self._session.generation
            self._session.client.exists_async(self.path, self.on_node_event).rawlink(
                lambda request: self._rearmed(request, generation))

    def on_first_event(self, event: WatchedEvent) -> None:
        """kazoo watch on the first candidate's node and twin, while we wait right behind it;
        one bound method, so that arming it again on a node adds no second watch."""
        if event.type == EventType.DELETED:
            self.first_deleted.add(event.path)
        else:
            self.first_written = True
        self.woken.set()

    def _rearmed(self, request: Any, generation: int) -> None:
        """The watch on our node is armed again after a write to it (our claim): renewals may
        rely on it (and on the twin's watch, still armed if :meth:`_Session.watching` says so).

        An answer that finds no node means it was deleted after the write, whose event took
        the watch (a write then a delete, from outside): no event tells of the deletion, and
        kazoo keeps the new watch as one for the node's creation, so it is recorded here.
        """
        stat = request.value if request.successful() else None
        if request.successful() and stat is None:
            self._deleted.add(self.path)
            self.woken.set()
            if self._session_id is not None:
                self.lost(f"its node {self.path} was deleted", gone=False)
        elif stat is not None and stat.version > 0 and stat.ephemeralOwner == self._session_id:
            self._armed = generation

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
        claim = self._claim
        if self._armed != session.generation and claim is not None and not claim.ready():
            # the first renewal of a tenure: the claim's read, sent before anything it sends,
            # is answered first (and arms the watches); wait for it rather than check anew
            with contextlib.suppress(StoreError):
                session.result(claim, max(0.0, session.store.timeout - (now() - started)))
        if self._armed == session.generation and self._renew_by_session():
            return
        # sync brings the server we talk to up to date with the ensemble's leader, so exists
        # sees any deletion committed before; both are pipelined in one round trip.
        generation = session.generation
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
        else:  # claimed, and watched since these answers on this connection
            self._armed = generation
        self.confirmed_at = started

    def watched(self) -> bool:
        """True while the watches on our node and its twin are armed and have not fired, and
        neither node is known to be deleted."""
        return not self._deleted and all(self._session.watching(path, self.on_node_event)
                                         for path in (self.path, self.twin))

    def _renew_by_session(self) -> bool:
        """Renew with a confirmation of the session shared by its leaders (see
        :meth:`_Session.confirm`): the session lived when it was begun, and our nodes were
        not deleted, since the watches on them have not fired. ZooKeeper sends a watch's
        event before the answer to any later request on the connection, and ``sync`` makes
        the server catch up with the ensemble first. False if the watches are not armed
        on this connection: then the full check runs."""
        session = self._session
        try:
            started, generation = session.confirm(self.confirmed_at)
        except _ConnectionLost as exc:
            raise StoreUnavailableError(f"renewal failed: {exc}") from exc
        if self._lost:
            raise LeadershipLostError(f"{self.node!r} lost {self.key!r}: {self._lost}")
        if generation != self._armed or session.generation != generation or not self.watched():
            return False
        self.confirmed_at = started
        return True

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


class ZooKeeperStore(ZooKeeperClient, Store):
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

    def path_for(self, key: str) -> str:
        """The absolute ZooKeeper path (chroot included) under which ``key``'s candidates queue."""
        return self.root + _check_path("key", self.validate_key(key), InvalidKeyError)

    # -- the store contract -------------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
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
                        with session.registering:  # a crowd of candidates registers in turn
                            try:
                                created = self._register(session, path, uid, node)
                            except NoNodeError:  # the transaction failed whole: nothing of ours exists
                                sent = False
                                self._ensure_key(session, path)
                                continue
                        lease = _ZooKeeperLease(session, key, node, created, f"{path}/{uid}{_LIVE}")
                    lease.woken.clear()
                    # One round trip: the queue, and (once per connection: kazoo drops watches
                    # with it) watches on our own nodes, so a win needs no further request and
                    # a deletion of our nodes wakes us up.
                    started = now()
                    generation = session.generation
                    armed = lease.created is not None and lease.watched_in == generation
                    listing = client.get_children_async(path)
                    if not armed:
                        own = client.exists_async(lease.path, lease.on_node_event)
                        own_twin = client.exists_async(lease.twin, lease.on_node_event)
                    try:
                        children = session.result(listing)
                    except NoNodeError:
                        children = []
                    contenders = _contenders(children)
                    if armed:  # our nodes live if their watches, armed on this connection, never fired
                        if session.generation != generation or not lease.watched():
                            lease.watched_in = None
                            continue
                        stat, twin_stat = lease.created, True
                    else:
                        stat, twin_stat = session.result(own), session.result(own_twin)
                        if stat is not None and twin_stat is not None:
                            lease.created, lease.watched_in = stat, generation
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
                    behind_first = position == 1 and _twin_of(contenders[0]) in children
                    if behind_first and not _orphaned_twins(children, contenders):
                        confirmed_at = self._await_release(session, lease, predecessor, started, ttl)
                        if confirmed_at is not None:  # a win, proven by the watches (see there)
                            lease.won(stat, confirmed_at)
                            lease.claim()
                            log.debug("%s won %s with term %d, on its predecessor's release", node, key, lease.term)
                            return lease
                        continue
                    # kazoo also fires this watch when the connection drops or the session ends
                    claimed: list[bool] = []
                    if session.call(client.exists_async, predecessor, _claim_waker(lease.woken, claimed)) is not None:
                        lease.woken.wait()
                        if claimed:  # its win: read the queue again once its leader has started
                            lease.woken.clear()
                            lease.woken.wait(RELIST_AFTER_CLAIM)  # our own nodes' events end it
                except _ConnectionLost:
                    continue  # wait_connected bounds how long a dead connection is retried
        except BaseException:
            if sent:
                self._withdraw(session, path, uid, lease)
            raise

    @staticmethod
    def _await_release(session: _Session, lease: _ZooKeeperLease, first: str, listed_at: float,
                       ttl: float) -> float | None:
        """Wait behind ``first``, the oldest candidate in a listing (sent at ``listed_at``) that
        showed it just before us and no orphaned twin; return when something happens.

        Nothing older than ``first`` can join the queue (sequence numbers only grow), so once
        its node and its twin are both deleted, which is how a candidate releases (one
        ``multi``) or how its session ends, we are first: the same conclusion a new listing
        would reach, one round trip sooner. Our own nodes still exist if their watches,
        armed on this connection, have not fired: ZooKeeper sends a session its watch events
        in order, so the deletion of our nodes before ``first``'s would have come first.

        Returns when our session was last known alive (a round trip begun then was answered;
        the win's renew deadline runs from it) if that is what happened; None if anything else
        woke us (``first`` written, say, as by its claim; one of its nodes gone before it was
        watched; a deletion of ours, or a write to our node, which only we make once we lead;
        a new connection): then the queue is read again. While
        waiting, the session is confirmed every ``ttl / 8``, so that a win leaves most of the
        renew deadline, as the slow path's listing would (a win on an older confirmation, the
        confirms failing, goes back to the listing).
        """
        client, generation, twin = session.client, session.generation, _twin_of(first)
        writes = lease.writes
        lease.first_deleted.clear()
        lease.first_written = False
        lease.woken.clear()
        watches = {path: client.exists_async(path, lease.on_first_event) for path in (first, twin)}
        gone = [path for path, request in watches.items() if session.result(request) is None]
        if gone:  # released meanwhile, or deleted from outside: the listing tells which
            for path in gone:  # a watch for its creation: never made again (unique names)
                client._data_watchers.get(path, set()).discard(lease.on_first_event)
            return None
        confirmed_at = listed_at
        while True:
            if not lease.woken.wait(ttl / 8):
                try:
                    confirmed_at, confirmed_in = session.confirm(confirmed_at)
                except StoreUnavailableError as exc:  # a slow server: the win, if any, reads the queue
                    log.debug("ZooKeeper: a waiter could not confirm its session: %s", exc)
                    continue
                if confirmed_in != generation:
                    return None
                continue
            if lease.first_written or lease.writes != writes or session.generation != generation \
                    or not lease.watched():
                return None
            if lease.first_deleted >= {first, twin}:
                return confirmed_at if now() - confirmed_at <= ttl / 6 else None  # stale: the listing proves it
            lease.woken.clear()  # one of the two: the other follows (a release deletes both at once)

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
        by anyone else, ancestors included (see "Access control" in docs/stores/zookeeper.md);
        ancestors that already exist keep their ACL."""
        try:  # the parent is usually there (keys share a prefix): one request, not three
            with contextlib.suppress(NodeExistsError):
                session.call(session.client.create_async, path, b"")
            return
        except NoNodeError:
            pass
        parent = path.rsplit("/", 1)[0]
        if parent:
            session.ensure_path(parent, self._acl or OPEN_ACL_UNSAFE)
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
        self, session: _Session, path: str, watch: Callable[[Any], None] | None = None,
        successor: list[_Unclaimed] | None = None,
    ) -> LeaderInfo | _Unclaimed | None:
        """The leader of ``path``; with ``watch``, arm it on what would change the answer, and
        on the key's children: a candidate joining a vacant key, or queueing behind a leader
        with no successor yet (:meth:`watch` ignores the children's events otherwise). With
        ``successor``, a claimed leader's next in line, if it is greenleader's, is read in the
        same round trip, watched, and appended to that list: its claim names it."""
        client = session.client
        while True:
            try:
                children = session.call(client.get_children_async, path, watch)
                contenders = _contenders(children)
            except NoNodeError:
                if session.call(client.exists_async, path, watch) is None:
                    return None  # the key does not exist yet: wake up when it is created
                continue
            if not contenders:
                return None
            first = f"{path}/{contenders[0]}"
            second = f"{path}/{contenders[1]}" if successor is not None and len(contenders) > 1 \
                and _claims(contenders[1], children) else None
            ahead = client.get_async(second, watch) if second else None
            try:  # the leader stays leader until its node goes: watch only that node
                data, stat = session.call(client.get_async, first, watch)
            except NoNodeError:
                continue
            info = LeaderInfo(data.decode("utf-8", "replace"), stat.czxid)
            if stat.version == 0 and _claims(contenders[0], children):
                return _Unclaimed(first, info)  # the claim (or the node's deletion) fires the watch
            if ahead is not None and successor is not None:
                with contextlib.suppress(NoNodeError, StoreError):  # gone, or the connection with it
                    next_data, next_stat = session.result(ahead, path=second)
                    if second is not None and next_stat.version == 0:
                        name = next_data.decode("utf-8", "replace")
                        successor.append(_Unclaimed(second, LeaderInfo(name, next_stat.czxid)))
            return info  # a claimed greenleader node, or kazoo's: named at once (it never claims)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        path = self.path_for(key)
        waited: str | None = None  # a successor whose claim was waited for already, in vain
        while True:
            fired: Queue[WatchedEvent] = Queue()
            successor: list[_Unclaimed] = []
            try:
                info = self._read_leader(self._session(), path, fired.put, successor)
            except _ConnectionLost:
                continue
            if isinstance(info, _Unclaimed):
                # The first node is not claimed yet: as a rule the winner of a handover, which
                # claims it a round trip after its win. Wait that long before reporting a
                # vacancy, so that followers hear of a handover once, with the new name (the
                # vacancy first cost every follower a notification right before it, 30 ms for
                # 100 followers on a loaded box).
                event = _next(fired, 0.0 if info.path == waited else CLAIM_GRACE)
                waited = None
                if not _claimed(info, event):
                    yield None
                    event = event or _next(fired, None)  # kazoo also fires watches when the connection drops
                if _claimed(info, event):
                    # The first node was claimed (its version left 0): its candidate leads, under
                    # the name its node was created with. Named at once, then read again.
                    yield info.leader
                continue
            yield info
            # The children matter while the key is vacant, or while the leader has no successor
            # watched: a candidate queueing behind it is read (and watched) at once, so that the
            # leader's going names it at its claim, without reading the queue first.
            event = _next(fired, None, children=info is None or not successor)
            if successor and event.type == EventType.DELETED and event.path != successor[0].path:
                # The leader's node went: its successor, next in line and watched, wins and
                # claims a round trip later. Named at its claim, without reading the queue first.
                following = successor[0]
                if _claimed(following, _next(fired, CLAIM_GRACE)):
                    yield following.leader
                else:
                    waited = following.path


def _next(fired: Queue[WatchedEvent], timeout: float | None, *, children: bool = False) -> WatchedEvent | None:
    """The next event of a watch within ``timeout`` seconds (None: however long it takes), or
    None. Without ``children``, the key's children changing is no news: skipped."""
    deadline = None if timeout is None else now() + timeout
    while True:
        try:
            if deadline is None:
                event = fired.get()
            elif deadline > now():
                event = fired.get(timeout=deadline - now())
            else:
                event = fired.get_nowait()
        except Empty:
            return None
        if children or event.type != EventType.CHILD:
            return event


def _claimed(unclaimed: _Unclaimed, event: WatchedEvent | None) -> bool:
    """True if ``event``, from a watch on ``unclaimed``, is its claim (its data written)."""
    return event is not None and event.type == EventType.CHANGED and event.path == unclaimed.path
