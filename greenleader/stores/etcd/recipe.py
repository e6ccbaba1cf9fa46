"""The election on etcd's primitives, read top-down like etcd's ``concurrency.Election``.

A candidate registers (a lease and, in one transaction, its key ``<key>/<lease hex>`` and the
key's twin ``<key>/<lease hex>/live``), waits for its predecessors to go, proves its win in
one transaction, claims its key once it has stepped up, and resigns by deleting its keys with a
release mark (so the next candidate needs no look at its lease), then revoking its lease.
docs/stores/etcd.md explains each step and why; the transport is in :mod:`.client`.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator
from typing import Any, ClassVar

import gevent
import gevent.event
import gevent.pool

from ...errors import InvalidArgumentError, InvalidKeyError, LeadershipLostError, StoreError, StoreUnavailableError
from ..base import LeaderInfo, Lease, SessionLost, Store, now
from .client import EtcdClient, WatchStream, etcdrpc, kv_pb2, prefix_range_end

__all__ = ["EtcdStore"]

log = logging.getLogger("greenleader.stores.etcd")

_MAX_KEY_BYTES = 512
#: A candidate key's version once its winner has claimed it (created: 1; claimed: 2).
_CLAIMED = 2
#: First and longest pause between two checks of a lease whose key was deleted from outside.
_GONE_POLL = (0.005, 0.25)
#: Suffix of a candidate key's twin, which shares its lease: ``<key>/<id>/live``.
_TWIN = b"/live"
#: Suffix of the mark ``<key>/<id>/done`` that a release writes, on its lease, in the transaction
#: that deletes the key and its twin: only a holder that has stepped down writes it, so the
#: waiter behind needs no look at the lease (an operator's deletion writes no mark). It sorts
#: before the twin, so a waiter's watch from ``<key>/<id>`` to it sees the key and the mark only.
_DONE = b"/done"
#: Seconds between a release's transaction and its lease revoke. The transaction hands the key
#: over; the revoke, a write, only tidies up (the lease and its release mark). Sent at once, it
#: reaches etcd with the successor's proof, a linearizable read that etcd answers only once the
#: writes before it are applied, and with its claim: on a loaded 2-core machine the proof then
#: took 3.1-3.3 ms instead of 2.1-2.9 and resign -> elected 9.8-11.4 ms instead of 7.7-8.3 (in
#: one process, benchmarks/etcd_handover.py). ``release()`` still returns only once revoked.
_REVOKE_AFTER = 0.05
#: Seconds before a watch stream that has done its job is cancelled: the waiter's watch on its
#: predecessor once the deletion came (its proof, step-up and new leader's start come first), and
#: a released holder's key watch, which hears of the release's own deletion while the successor
#: proves its win. A cancel costs gRPC Python about 0.5 ms of CPU in the caller and more in the
#: hops after it; on a 2-core machine that CPU is the successor's (docs/stores/etcd.md, "Where a
#: handover's time goes"). As long as the revoke's pause, so both land after the handover.
_CLOSE_AFTER = 0.05
#: Longest wait, in seconds, between a win and its claim for the winner's hub to have nothing
#: else ready to run (:func:`_spawn_when_idle`). The claim's request holds the hub for about 1 ms
#: of gRPC CPU; sent as the step-up wakes the leader's work, it came before that work (in
#: ``greenleader run``: the command's start, 1.8 ms later than on Consul). Idle, the hub has
#: started it. The bound keeps followers' news from waiting on a hub that stays busy: they name
#: a winner only once claimed.
_CLAIM_WITHIN = 0.005
#: The low bits of every lease id greenleader makes (so its keys ``<key>/<lease hex>`` end in
#: ``91ead``): followers tell its candidates, which are named only once claimed, from other
#: clients' (etcdctl elect), which never claim. 20 bits leave 41 random ones for the id.
_OWN_TAG, _OWN_TAG_BITS = 0x91EAD, 20
#: The Watch filter that leaves out puts: a guard or a waiter hears only deletions.
_NOPUT = etcdrpc.WatchCreateRequest.NOPUT
#: Watch event type of a deletion.
_DELETE = kv_pb2.Event.DELETE

def _is_direct_child(kv_key: bytes, prefix: bytes) -> bool:
    """True for ``<key>/<id>``, False for the keys of a nested election ``<key>/<x>/<id>``."""
    return kv_key.startswith(prefix) and b"/" not in kv_key[len(prefix):]


def _twin_of(kv_key: bytes) -> bytes:
    """The twin ``<key>/<id>/live`` of a candidate key ``<key>/<id>`` (see docs/stores/etcd.md)."""
    return kv_key + _TWIN


def _done_of(kv_key: bytes) -> bytes:
    """The release mark ``<key>/<id>/done`` of a candidate key ``<key>/<id>``."""
    return kv_key + _DONE


def _watched_with_mark(kv_key: bytes, prefix: bytes) -> tuple[bytes, bytes, bytes]:
    """For a waiter's predecessor ``<key>/<id>`` or its twin ``<key>/<id>/live``: its release
    mark ``<key>/<id>/done``, and the range (start, end) that holds both and nothing else of
    that candidate (the mark sorts between the key and the twin)."""
    rest = kv_key[len(prefix):]
    if rest.count(b"/") == 1 and rest.endswith(_TWIN):  # a twin
        mark = _done_of(kv_key[:-len(_TWIN)])
        return mark, mark, kv_key + b"\0"
    mark = _done_of(kv_key)
    return mark, kv_key, mark + b"\0"


def _is_registration(kv_key: bytes, prefix: bytes) -> bool:
    """True for a candidate key ``<key>/<id>`` or its twin ``<key>/<id>/live`` (ids are hex:
    never ``live``, so no nested election's key looks like a twin)."""
    rest = kv_key[len(prefix):] if kv_key.startswith(prefix) else b"/"
    return b"/" not in rest or (rest.endswith(_TWIN) and rest.count(b"/") == 1)


#: A candidate's key as a follower sees it: (create revision, version, value, lease).
_Seen = tuple[int, int, bytes, int]
#: A candidate's key as a waiter sees it: (create revision, key, lease).
_Candidate = tuple[int, bytes, int]


def _own_lease_id() -> int:
    """A new lease id for a candidate: random, positive, ending in :data:`_OWN_TAG`."""
    return (random.SystemRandom().getrandbits(61 - _OWN_TAG_BITS) << _OWN_TAG_BITS) | (1 << 61) | _OWN_TAG


def _is_own_lease(lease: int) -> bool:
    """True for a lease id greenleader made (:func:`_own_lease_id`), as a rule False for
    another client's (etcd numbers its leases in sequence: 1 in 2**20 ends in the tag)."""
    return (lease & ((1 << _OWN_TAG_BITS) - 1)) == _OWN_TAG


class _View:
    """The election as a follower sees it: the candidate keys ``<key>/<id>`` and the twins
    ``<key>/<id>/live``, kept up to date from a range and then from watch events.

    The first candidate is the leader, but a greenleader candidate only once it has claimed
    its key (version 2): before that it may not know that it leads (docs/stores/etcd.md). Other
    clients' candidates (``etcdctl elect``, Go's ``concurrency.Election`` and ``Mutex``) never
    claim: they lead as soon as they are first, with their value (the proposal) as the name.
    A candidate is greenleader's when its lease id carries greenleader's tag, or (keys made
    before the tag) when its twin, created in the same transaction, is there with the same
    create revision. Both are true from the key's first revision on, so a reader never takes
    an unclaimed greenleader key for another client's; the twin alone would not do, since an
    operator may delete it.
    """

    def __init__(self, prefix: bytes, kvs: Any) -> None:
        self.prefix = prefix
        self.candidates: dict[bytes, _Seen] = {}
        self.twins: dict[bytes, int] = {}  # twin key -> create revision
        for kv in kvs:
            self.put(kv)

    def put(self, kv: Any) -> None:
        """A key was created or rewritten (a new candidate, a twin, a winner's claim)."""
        if _is_direct_child(kv.key, self.prefix):
            self.candidates[kv.key] = (kv.create_revision, kv.version, kv.value, kv.lease)
        elif _is_registration(kv.key, self.prefix):
            self.twins[kv.key] = kv.create_revision

    def delete(self, kv_key: bytes) -> None:
        self.candidates.pop(kv_key, None)
        self.twins.pop(kv_key, None)

    def _first(self) -> tuple[_Seen, bool] | None:
        """The first candidate, and whether it still has to claim its win to be named."""
        if not self.candidates:
            return None
        key = min(self.candidates, key=self.candidates.__getitem__)
        seen = self.candidates[key]
        own = _is_own_lease(seen[3]) or self.twins.get(_twin_of(key)) == seen[0]
        return seen, own and seen[1] < _CLAIMED

    def awaits_claim(self) -> bool:
        """True when the first candidate is greenleader's and has not claimed its key yet."""
        first = self._first()
        return first is not None and first[1]

    def leader(self) -> LeaderInfo | None:
        """The first candidate, if it is named: claimed, or another client's; else None."""
        first = self._first()
        if first is None or first[1]:  # not stepped up yet (or not won: frozen, withdrawing)
            return None
        revision, _, value, _ = first[0]
        return LeaderInfo(value.decode("utf-8", errors="replace"), revision)


def _spawn_when_idle(run: Any, within: float) -> gevent.Greenlet:
    """A greenlet that starts ``run`` once this thread's hub has nothing else ready to run (a
    libev idle watcher; gevent's libuv loop runs it on the loop's next turn), or ``within``
    seconds from now if that comes first. Killed before it starts, it never starts.

    Either way it starts after every greenlet that was already due to run, as its start is one
    more callback queued behind theirs (no greenlet switch is made before the hub turns)."""
    glet = gevent.Greenlet(run)
    loop = gevent.get_hub().loop
    idle, timer = loop.idle(), loop.timer(within)

    def start() -> None:
        idle.close()
        timer.close()
        glet.start()  # does nothing once killed

    idle.start(start)
    timer.start(start)
    return glet


def _owns(key: bytes, create_revision: int) -> Any:
    """A transaction comparison: ``key`` exists with this create revision (is still ours)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                           create_revision=create_revision)

class _EtcdLease(Lease):
    """A won election: the key ``<key>/<lease id>`` on a lease that the candidate renews."""

    def __init__(self, store: EtcdStore, key: str, node: str, term: int, confirmed_at: float,
                 lease_id: int, own_key: bytes, keeper: gevent.Greenlet | None = None) -> None:
        super().__init__(key, node, term, confirmed_at)
        self.lease_id = lease_id
        self.own_key = own_key
        self.twin = _twin_of(own_key)
        self._store = store
        self._pid = os.getpid()
        self._released = False
        self._marked = self._revoked = False  # the release's two steps, each done once
        self._renewed = gevent.event.Event()  # set by each renewal: a failed claim or watch resumes then
        self._claim_tried = gevent.event.Event()  # the key watch is made once the claim is answered
        # Nothing of this runs before the candidate has stepped up and its leader's work has
        # started (see _claim_once_stepped_up): the waiting candidacy's keepalive greenlet,
        # stopped by the claimer; the key watch, started by it once the claim is answered; the
        # claimer itself, started when the hub is idle.
        self._keeper = keeper
        self._guard = gevent.Greenlet(self._guard_own_key, term)  # any deletion since its creation
        self._claimer = _spawn_when_idle(self._claim_once_stepped_up, _CLAIM_WITHIN)

    def __repr__(self) -> str:
        return f"<EtcdLease key={self.key!r} node={self.node!r} term={self.term} lease={self.lease_id:x}>"

    def renew(self) -> None:
        if self._released:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        started = now()
        if self._store.client.keepalive(self.lease_id) <= 0:
            raise SessionLost(f"etcd lease {self.lease_id:x} of {self.node!r} on {self.key!r} is gone")
        self.confirmed_at = started
        self._renewed.set()

    def release(self) -> None:
        """Delete the key and its twin and write the release mark, in one transaction: the
        next candidate wins on it without looking at our lease; then, :data:`_REVOKE_AFTER`
        later, revoke the lease, which takes the mark. Idempotent; a retry after a failure
        does what is left."""
        if not self._released:
            self._released = True  # from here on, the guard reports nothing and nothing is claimed
            self._claimer.kill(block=True, timeout=1)
            self._claim_tried.set()  # (a claimer killed before it ran never says so)
            self._stop_keeper()
        if self._pid != os.getpid() or self._revoked:
            return  # a forked child's copy: the lease is the parent's to release
        client = self._store.client
        try:
            if not self._marked:
                self._marked = self._mark_released()
                gevent.sleep(_REVOKE_AFTER)  # the waiter's proof and claim first (see the constant)
            client.revoke(self.lease_id)
            self._revoked = True
        finally:
            self._guard.kill(block=True, timeout=1)

    def _mark_released(self) -> bool:
        """The release's transaction (see :meth:`release`); True once sent, or once the lease
        is found gone (its keys went with it)."""
        request = etcdrpc.TxnRequest(success=[
            etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=self.own_key)),
            etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=self.twin)),
            etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=_done_of(self.own_key), lease=self.lease_id)),
        ])
        try:
            self._store.client.txn("release", request)
        except StoreError as exc:
            if "lease not found" not in str(exc):
                raise
        return True

    def _stop_keeper(self) -> None:
        """Stop the waiting candidacy's keepalive greenlet (the candidate renews a won lease)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.kill(block=False)

    def _start_guard(self) -> None:
        """Start the key watch (a second start, or one after a kill, does nothing), unless
        released: a released key is watched no more."""
        if not self._released and self._pid == os.getpid():
            self._guard.start()

    def _claim_once_stepped_up(self) -> None:
        """Claim the key for followers, retrying until claimed, released or lost.

        This greenlet is made as the lease is, in the greenlet that runs ``acquire``, and
        started once the hub is idle (:func:`_spawn_when_idle`), after every greenlet that was
        due to run then. The candidate is one, woken by ``acquire`` returning, and it steps up
        without yielding: so the claim goes out after the step-up, and a winner stopped just as
        it won (SIGSTOP, a blocked hub) is not named by followers until it knows that it leads.
        The readers of the candidate's ``elected`` queue, woken by the step-up, are others:
        the leader's work (``greenleader run``'s command) starts before the claim's request
        holds the hub (about 1 ms of gRPC CPU), and so do the win's chores, the keepalive
        greenlet's stop and the key watch.
        """
        self._stop_keeper()
        try:
            while not self._released and self._pid == os.getpid():
                self._renewed.clear()
                try:
                    if not self._claim():
                        self._notify_lost_once()  # the key is gone; the guard reports it too
                    return
                except (StoreError, InvalidArgumentError) as exc:
                    log.warning("etcd: %r could not claim %r yet (followers see no leader); trying again after "
                                "the next renewal: %s", self.node, self.own_key, exc)
                self._claim_tried.set()
                self._start_guard()
                self._renewed.wait()  # the candidate's renewals are paced by its own schedule
        finally:
            self._claim_tried.set()
            self._start_guard()

    def _claim(self) -> bool:
        """Rewrite our value on our lease, on our key and its twin, if both are still ours:
        version 1 -> 2. False if either is gone."""
        request = etcdrpc.TxnRequest(
            compare=[_owns(self.own_key, self.term), _owns(self.twin, self.term)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=kv_key, value=self.node.encode(),
                                                                      lease=self.lease_id))
                     for kv_key in (self.own_key, self.twin)],
        )
        claimed = bool(self._store.client.txn("claim", request).succeeded)
        if claimed:
            log.debug("etcd: %r claimed %r (term %d)", self.node, self.own_key, self.term)
        return claimed

    def _guard_own_key(self, revision: int) -> None:
        """Tell the candidate at once when its key or its twin disappears (lease revoked, or
        deleted from outside). One watch covers both: the range from the key to its twin."""
        store = self._store
        range_end = self.twin + b"\0"
        # Made once the claim is answered, so that neither delays the candidate's step-up nor
        # the first thing it does as leader. It misses nothing meanwhile: it watches from the
        # revision of the win, and the claim itself checks that the key and twin are there.
        self._claim_tried.wait()
        while not self._released and self._pid == os.getpid():
            self._renewed.clear()
            try:
                if revision == 0:
                    response = store.client.range("check own key", self.own_key, range_end, keys_only=True)
                    if not {self.own_key, self.twin} <= {kv.key for kv in response.kvs}:
                        break
                    revision = response.header.revision
                stream = store.client.watch(self.own_key, range_end, revision + 1, [_NOPUT])
                try:
                    for response in stream:
                        if response.events:  # a deletion (NOPUT: not our claim)
                            self._notify_lost_once()
                            return
                finally:
                    if self._released:  # our own release's deletion: the successor hurries now
                        stream.close_later(_CLOSE_AFTER)
                    else:
                        stream.close()
            except (StoreError, InvalidArgumentError) as exc:
                # No schedule of our own: the candidate renews (or gives up) on its own, and
                # the next renewal that gets through says etcd answers again.
                log.debug("etcd: watch on own key %r failed; watching again after the next renewal: %s",
                          self.own_key, exc)
                self._renewed.wait()
            revision = 0  # the stream ended: check the key again before watching anew
        if not self._released:
            self._notify_lost_once()

    def _notify_lost_once(self) -> None:
        if not self._released and self._pid == os.getpid():
            log.info("etcd: %r lost key %r", self.node, self.own_key)
            self.notify_lost()


class _Candidacy:
    """A candidate's lease and key while it waits, with the greenlet that keeps the lease alive.

    The lease is renewed every ``ttl / 8`` while waiting, so that a win can usually be taken
    on the last renewal (no further round trip) and still leave the candidate most of its
    renew deadline.

    ``older`` maps the lease of every older candidate seen by this ``acquire()`` (its
    candidacies share it) to its create revision, until that lease is known to be gone, or a
    younger candidate that saw it is known to have won (a winner has checked every older
    lease it saw): see docs/stores/etcd.md on keys deleted from outside.
    """

    def __init__(self, store: EtcdStore, key: str, node: str, ttl: float, older: dict[int, int]) -> None:
        self.store = store
        self.older = older
        self.listed: set[int] = set()  # leases of the older candidates this candidacy has listed
        self.key = key
        self.ttl = ttl
        self.prefix = (key + "/").encode()
        self.lease_id = _own_lease_id()  # chosen here: a grant
        self.own_key = self.prefix + f"{self.lease_id:x}".encode()  # cut short leaves no orphan
        self.node = node
        self.pid = os.getpid()
        self.lost = False
        self.term = 0
        self.confirmed_at = 0.0
        self.stream: WatchStream | None = None
        self._keeper: gevent.Greenlet | None = None

    def start(self) -> tuple[int, list[_Candidate]]:
        """Grant the lease, keep it alive, create the key if absent (learning the term).

        Returns the revision and the (create revision, key, lease) of every candidate, oldest first.
        """
        client = self.store.client
        started = now()
        client.grant(max(1, math.ceil(self.ttl)), self.lease_id)
        self.confirmed_at = started
        self._keeper = gevent.spawn(self._keep_alive)
        # Key and twin in one transaction, if absent (a retry finds them made), with the range:
        # who else is there, and when our key was made (its create revision is our term).
        everyone = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
            key=self.prefix, range_end=prefix_range_end(self.prefix), keys_only=True))
        response = client.txn("transaction", etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=self.own_key, target=etcdrpc.Compare.CREATE,
                                     result=etcdrpc.Compare.EQUAL, create_revision=0)],
            success=[*(etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=kv_key, value=self.node.encode(),
                                                                        lease=self.lease_id))
                       for kv_key in (self.own_key, _twin_of(self.own_key))), everyone],
            failure=[everyone],
        ))
        found = response.responses[-1].response_range.kvs
        mine = [kv for kv in found if kv.key == self.own_key]
        if not mine:
            raise StoreError(f"etcd did not keep candidate key {self.own_key!r}")
        self.term = mine[0].create_revision
        log.debug("etcd: %r campaigns with %r (revision %d)", self.node, self.own_key, self.term)
        return response.header.revision, sorted(
            (kv.create_revision, kv.key, kv.lease) for kv in found if _is_registration(kv.key, self.prefix))

    def _keep_alive(self) -> None:
        while True:
            gevent.sleep(self.ttl / 8)
            if self.pid != os.getpid():
                return  # a forked child's copy: the lease is the parent's
            started = now()
            try:
                remaining = self.store.client.keepalive(self.lease_id)
            except (StoreError, InvalidArgumentError) as exc:
                log.warning("etcd: keepalive of waiting candidate %r failed: %s", self.node, exc)
                self._interrupt()  # its watch may hang on the same dead endpoint: the wait checks anew
                continue
            if remaining <= 0:
                log.info("etcd: the lease of waiting candidate %r expired", self.node)
                self.lost = True
                self._interrupt()
                return
            self.confirmed_at = started

    def _interrupt(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def stop_keepalive(self, block: bool = True) -> None:
        if self._keeper is not None:
            self._keeper.kill(block=block, timeout=1)
            self._keeper = None

    def withdraw(self) -> None:
        """Stop keeping the lease and revoke it, which deletes the key: leaves nothing behind."""
        self.stop_keepalive()
        if self.pid != os.getpid():
            return  # a forked child's copy: the parent withdraws (or wins) on its own
        try:
            self.store.client.revoke(self.lease_id)
        except (StoreError, InvalidArgumentError) as exc:
            log.warning("etcd: could not revoke lease %x of %r (it expires in %gs): %s",
                        self.lease_id, self.node, self.ttl, exc)

    def wait_turn(self, revision: int, keys: list[_Candidate]) -> _EtcdLease | None:
        """Block until this candidate's key is the oldest; None if the candidacy was lost.

        ``keys`` are the candidates at ``revision``, oldest first, as the transaction that
        created our key read them; after that, each wake-up asks :meth:`_prove` afresh. A win
        also needs every older candidate's lease gone (:meth:`_await_gone`), checked before
        the proof, which stays the last request before a win.
        """
        store, resumed = self.store, False
        snapshot: tuple[int, list[_Candidate]] | None = (revision, keys)
        gone: set[int] = set()  # leases of older candidates whose keys are gone
        claimed: tuple[int, _Candidate] | None = None  # our predecessor's claim: its revision, the key
        while not self.lost:
            try:
                if claimed is not None:  # our predecessor won: wait right behind it
                    won, claimed = self._await_release(*claimed, replay=True), None
                    if won is not None or self.lost:
                        return won
                if snapshot is None:
                    if not self._await_gone(gone) or not self._fresh_lease():
                        return None
                    snapshot = self._prove()  # the last request before a win: nothing yields after it
                    if snapshot is None:
                        log.info("etcd: candidate key %r of %r was deleted; campaigning anew", self.own_key, self.node)
                        return None
                revision, keys = snapshot
                snapshot = None
                position = next((i for i, (_, kv_key, _) in enumerate(keys) if kv_key == self.own_key), None)
                if position is None:
                    log.info("etcd: candidate key %r of %r disappeared", self.own_key, self.node)
                    return None
                # Only greenleader candidates (a tagged lease, or a twin) are waited for by
                # lease: one never keeps its lease after its candidacy, while a Go/etcdctl
                # session does. The tag also marks a key whose twin was deleted from outside.
                own = {lease for _, kv_key, lease in keys if kv_key.endswith(_TWIN) or _is_own_lease(lease)}
                self.older.update((lease, created) for created, _, lease in keys[:position] if lease in own)
                self.listed.update(lease for _, _, lease in keys[:position])
                if position == 0:  # the read that says so also showed our key
                    if not self.older:
                        return self._won()
                    gone.update(self.older)  # every older key is gone: are their leases too?
                    continue
                if self._behind_first(keys, position):
                    won = self._await_release(revision, keys[0])
                    if won is not None or self.lost:
                        return won
                    continue  # anything else: the proof decides
                created, predecessor, predecessor_lease = keys[position - 1]
                # Watching from "now" rather than from the snapshot: etcd syncs a watch that
                # starts in the past only every 100 ms, which would delay a handover. The
                # predecessor is a key or (listed after its key) a twin; the range watched
                # holds it and its release mark.
                mark, start, end = _watched_with_mark(predecessor, self.prefix)
                self.stream = store.client.watch(start, end, 0, prev_kv=True)
                try:
                    if self.stream.revision > revision:  # the predecessor may have gone meanwhile
                        found = store.client.range("recheck", predecessor)
                        # Gone, or made anew since (a session that resigned and campaigned again
                        # under the same name): either way not the predecessor we listed.
                        if not found.kvs or found.kvs[0].create_revision != created:
                            if predecessor_lease in self.older:
                                gone.add(predecessor_lease)
                            continue
                    for response in self.stream:
                        resumed = False
                        deleted = [event for event in response.events
                                   if event.type == _DELETE and event.kv.key == predecessor]
                        # A greenleader predecessor (its twin: other clients' keys have none,
                        # and may rewrite their value) that claims has won, so it is first, and
                        # we are right behind it: wait as the second in line, on the release
                        # itself, with a watch that replays everything after the claim.
                        claim = next((event.kv.mod_revision for event in response.events
                                      if event.type != _DELETE and event.kv.key == predecessor
                                      and predecessor.endswith(_TWIN) and event.kv.version >= _CLAIMED), None)
                        if not deleted and claim is not None:
                            self._forget_checked_by(created)
                            if not set(self.older) <= {predecessor_lease}:
                                continue  # another older lease to see gone first: the proof's way
                            self.stream.close_later(_CLOSE_AFTER)
                            self.stream = None
                            gevent.sleep(_CLOSE_AFTER)  # off the new leader's first milliseconds
                            claimed = claim, (created, predecessor[:-len(_TWIN)], predecessor_lease)
                            break
                        if not deleted:
                            continue  # a write of its value: wait on
                        # The predecessor went: prove our turn, or wait on. Its release mark,
                        # written in the same transaction (same revision, on the predecessor's
                        # lease), says that its holder stepped down: no need to see its lease
                        # go. One response may carry several revisions, so both are compared.
                        revision_deleted = deleted[0].kv.mod_revision
                        if any(event.type != _DELETE and event.kv.key == mark
                               and event.kv.mod_revision == revision_deleted and event.kv.lease == predecessor_lease
                               for event in response.events):
                            self.older.pop(predecessor_lease, None)
                        elif predecessor_lease in self.older:
                            gone.add(predecessor_lease)
                        if any(event.prev_kv.version >= _CLAIMED for event in deleted):
                            self._forget_checked_by(created)
                        # Cancelling the stream costs about 0.5 ms of CPU: done after the
                        # proof, and after the step-up if it wins (see the constant).
                        self.stream.close_later(_CLOSE_AFTER)
                        self.stream = None
                        break
                finally:
                    if self.stream is not None:
                        self.stream.close()
                        self.stream = None
            except StoreUnavailableError as exc:
                # The transport is resumed once, at once (the proof fails over and waits for a
                # server within its own deadline); a second failure before the watch has told
                # us anything goes to the candidate, whose Backoff decides.
                if resumed:
                    raise
                resumed = True
                log.info("etcd: %r resumes its wait after: %s", self.node, exc)
        return None

    def _behind_first(self, keys: list[_Candidate], position: int) -> bool:
        """True when everything older than us in ``keys`` is the first candidate's key and
        twin, a greenleader candidate, and no other older lease is waited for."""
        if position != 2:
            return False
        (created, first, lease), (twin_created, twin, twin_lease) = keys[:2]
        return twin == _twin_of(first) and (twin_created, twin_lease) == (created, lease) \
            and set(self.older) <= {lease}

    def _await_release(self, revision: int, first: _Candidate, *, replay: bool = False) -> _EtcdLease | None:
        """Wait right behind ``first``, the oldest candidate at ``revision``, on one watch of
        the whole election; won if ``first`` released: its key and twin deleted with its
        release mark, in one revision (only a holder that stepped down writes it). None
        otherwise, and then the proof decides; our candidacy is lost (``self.lost``) if our own
        key or twin was deleted.

        Nothing older than ``first`` can join later (create revisions only grow), and one
        watch delivers every change of its range in revision order, our key's and twin's
        included: so at the release we hold the oldest key, which is what the proof would
        say, one round trip sooner. The watch covers the whole election (the mark is a put:
        no filter) but only the second in line makes one, so a change wakes one waiter more.

        The watch starts "now", and if that is after ``revision`` (any write to etcd moves it),
        the four keys are read once first. With ``replay`` (``revision`` is our predecessor's
        claim, seen on a watch that did not cover our own keys), the watch starts right after
        ``revision`` instead, so that a release since then is seen with its mark, and only our
        own keys are read first.
        """
        created, first_key, first_lease = first
        wanted, mark = {first_key, _twin_of(first_key)}, _done_of(first_key)
        mine = {self.own_key, _twin_of(self.own_key)}
        deleted: dict[bytes, int] = {}  # first's key and twin -> the revision that deleted each
        marked: set[int] = set()  # revisions that wrote first's release mark
        try:
            stream = self.stream = self.store.client.watch(self.prefix, prefix_range_end(self.prefix),
                                                           revision + 1 if replay else 0, prev_kv=True)
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # refused: a revision compacted meanwhile, say
            log.info("etcd: %r could not watch the election: %s", self.node, exc)
            return None
        try:
            if replay:  # every change after the claim comes on the watch; our keys before it, not
                found = self.store.client.range("recheck", self.own_key, _twin_of(self.own_key) + b"\0",
                                                keys_only=True)
                if {kv.key: kv.create_revision for kv in found.kvs if kv.key in mine} != dict.fromkeys(mine, self.term):
                    log.info("etcd: candidate key %r of %r was deleted; campaigning anew", self.own_key, self.node)
                    self.lost = True
                    return None
            elif stream.revision > revision:  # etcd's revision moved (any write): are the four still there?
                found = self.store.client.range("recheck", self.prefix, prefix_range_end(self.prefix), keys_only=True)
                present = {kv.key: kv.create_revision for kv in found.kvs}
                expected = {key: created for key in wanted} | {key: self.term for key in mine}
                if any(present.get(key) != revision_made for key, revision_made in expected.items()):
                    return None  # changed between the snapshot and the watch: the proof decides
            for response in stream:
                for event in response.events:
                    if event.kv.key in mine and event.type == _DELETE:
                        log.info("etcd: candidate key %r of %r was deleted; campaigning anew", event.kv.key, self.node)
                        self.lost = True
                        return None
                    if event.kv.key in wanted and event.type == _DELETE:
                        deleted[event.kv.key] = event.kv.mod_revision
                        if event.prev_kv.version >= _CLAIMED:
                            self._forget_checked_by(created)
                    elif event.kv.key == mark and event.type != _DELETE and event.kv.lease == first_lease:
                        marked.add(event.kv.mod_revision)
                if len(deleted) < len(wanted):
                    continue
                released = len(set(deleted.values())) == 1 and set(deleted.values()) <= marked
                if released:  # it stepped down: its lease need not be seen gone
                    self.older.pop(first_lease, None)
                if not released or now() - self.confirmed_at > self.ttl / 6:
                    return None  # deleted from outside (the proof waits for its lease), or a stale lease
                self.stream = None
                stream.close_later(_CLOSE_AFTER)  # not among the handover's steps (see the constant)
                return self._won()
            return None  # the stream ended (our keepalive failed, a server went)
        finally:
            if self.stream is stream:
                self._interrupt()
                self.stream = None

    def _forget_checked_by(self, winner: int) -> None:
        """Our predecessor, created at revision ``winner``, had won (it claimed its key): it
        checked the leases of every older candidate it saw, and it saw every one that this
        candidacy listed older than it (they were there before us, and so when it came)."""
        for lease, created in list(self.older.items()):
            if created < winner and lease in self.listed:
                del self.older[lease]

    def _await_gone(self, leases: set[int]) -> bool:
        """Return once etcd has none of ``leases`` (older candidates' whose keys are gone);
        False if our own lease is lost meanwhile.

        A key deleted from outside leaves its lease, and its holder may lead until it hears
        of the deletion and revokes the lease (or the lease expires): wait for that, polling
        with a backoff bounded by what is left of the lease. A released key's lease is gone
        already: one round trip.
        """
        delay = _GONE_POLL[0]
        while leases:
            remaining = self._lease_ttls(sorted(leases))
            for lease, ttl in remaining.items():
                if ttl < 0:
                    leases.discard(lease)
                    self.older.pop(lease, None)
            if not leases:
                break
            if delay == _GONE_POLL[0]:
                log.info("etcd: %r waits for lease(s) %s of older candidates whose keys were deleted: their "
                         "holders may still lead", self.node, ", ".join(f"{lease:x}" for lease in leases))
            if self.lost:
                return False
            gevent.sleep(min(delay, max(_GONE_POLL[0], min(remaining[lease] for lease in leases))))
            delay = min(delay * 2, _GONE_POLL[1])
        return not self.lost

    def _lease_ttls(self, leases: list[int]) -> dict[int, int]:
        """The remaining TTL of each lease (-1: gone), asked at once (at most 32 in flight)."""
        def ask(lease: int) -> int | StoreError | InvalidArgumentError:
            try:
                return self.store.client.lease_ttl(lease)
            except (StoreError, InvalidArgumentError) as exc:  # raised below, in the caller
                return exc

        pool = gevent.pool.Pool(32)
        try:
            answers = dict(zip(leases, pool.map(ask, leases), strict=True))
        finally:
            pool.kill(block=False)
        for answer in answers.values():
            if isinstance(answer, Exception):
                raise answer
        return answers  # type: ignore[return-value]

    def _prove(self) -> tuple[int, list[_Candidate]] | None:
        """One transaction: is our key still ours, and which candidates are older?

        None when our key is gone (deleted from outside, or expired with the lease): the
        candidacy is lost and must never win. Otherwise the revision and the (create
        revision, key, lease) of every older candidate and of ours, oldest first; ours first
        is a win proven by the same round trip.
        """
        request = etcdrpc.TxnRequest(
            compare=[_owns(self.own_key, self.term), _owns(_twin_of(self.own_key), self.term)],
            success=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=self.prefix, range_end=prefix_range_end(self.prefix),
                keys_only=True, max_create_revision=self.term - 1))],
        )
        response = self.store.client.txn("prove", request)
        if not response.succeeded:
            return None
        older = sorted((kv.create_revision, kv.key, kv.lease) for kv in response.responses[0].response_range.kvs
                       if _is_registration(kv.key, self.prefix))
        return response.header.revision, [*older, (self.term, self.own_key, self.lease_id)]

    def _fresh_lease(self) -> bool:
        """Renew the lease now if its last renewal is old, so that a win leaves the candidate
        most of its renew deadline; False if the lease is gone."""
        if now() - self.confirmed_at > self.ttl / 6:
            started = now()
            if self.store.client.keepalive(self.lease_id) <= 0:
                self.lost = True
                return False
            self.confirmed_at = started
        return True

    def _won(self) -> _EtcdLease:
        # The keepalive greenlet is the lease's to stop, after the step-up: a kill here (a
        # greenlet switch and an exception) would come before it. A renewal meanwhile is harmless.
        keeper, self._keeper = self._keeper, None
        return _EtcdLease(self.store, self.key, self.node, self.term, self.confirmed_at, self.lease_id, self.own_key,
                          keeper)


class EtcdStore(Store):
    """Elections on an etcd v3 cluster, through its gRPC API.

    :param addrs: ``host:port`` client endpoints of one cluster (default ``127.0.0.1:2379``);
        requests go to one of them and fail over to the next on connection errors.
    :param timeout: seconds for each request and for connecting.
    :param user, password: user name and password, when etcd has authentication enabled
        (``password_file``: read the password from that file). Without them, an etcd with
        ``--client-cert-auth`` takes the client certificate's CN as the user name.
    :param tls: connect with TLS (on by default when ``ca_file`` or ``cert_file`` is given).
    :param ca_file: CA bundle that signs the servers' certificates (default: the system's).
    :param cert_file, key_file: client certificate and its key. gRPC always checks the
        server's certificate and that it names the host connected to (``verify=false`` is
        refused). Older names: ``ca_cert``, ``cert_cert``, ``cert_key``.
    """

    backend: ClassVar[str] = "etcd"
    min_ttl: ClassVar[float] = 1.0  # etcd leases have whole seconds; a fraction is rounded up

    def __init__(self, addrs: list[str] | None = None, **options: Any) -> None:
        #: The transport (:class:`~greenleader.stores.etcd.client.EtcdClient`): it checks the options.
        self.client = EtcdClient(addrs, **options)
        self.addrs, self.timeout, self.user = self.client.addrs, self.client.timeout, self.client.user
        self.tls, self.secure = self.client.tls, self.client.secure

    def __repr__(self) -> str:
        user = f" user={self.user!r}" if self.user else ""
        return f"<EtcdStore addrs={self.addrs!r}{user}{' tls' if self.secure else ''}>"

    @property
    def requests(self) -> Any:
        """Requests sent, by kind (the client's count)."""
        return self.client.requests

    # Older names, kept for tools and tests that act on the store as an operator would.
    def _client(self) -> Any:
        """The client library's instance."""
        return self.client.library()

    def _range_prefix(self, prefix: bytes) -> Any:
        return self.client.range_prefix(prefix)

    @property
    def _password(self) -> str | None:
        return self.client._password

    def close(self) -> None:
        self.client.close()

    # -- the store contract -----------------------------------------------------------------

    def validate_key(self, key: str) -> str:
        """Also rejects a trailing ``/``: candidates live under ``<key>/``, so ``a/`` would make
        the prefix ``a//``, a different election from ``a`` that looks the same."""
        key = super().validate_key(key)
        if key.endswith("/"):
            raise InvalidKeyError(f"etcd election key {key!r} must not end with '/' "
                                  f"(candidates are kept under '<key>/')")
        try:
            size = len(key.encode())
        except UnicodeEncodeError:  # a lone surrogate: not text etcd could store
            raise InvalidKeyError(f"etcd election key {key!r} is not valid Unicode text") from None
        if size > _MAX_KEY_BYTES:
            raise InvalidKeyError(f"etcd election key is {size} bytes long; the limit is {_MAX_KEY_BYTES}")
        return key

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        older: dict[int, int] = {}  # kept across candidacies: a new key must not forget them
        while True:
            candidacy = _Candidacy(self, key, node, ttl, older)
            try:
                lease = candidacy.wait_turn(*candidacy.start())
            except BaseException:
                candidacy.withdraw()
                raise
            if lease is not None:
                log.debug("etcd: %r won %r with term %d", node, key, lease.term)
                return lease
            candidacy.withdraw()  # lost while waiting (expired, deleted): campaign anew

    def leader(self, key: str) -> LeaderInfo | None:
        return self._settled((key + "/").encode())[0].leader()

    def _settled(self, prefix: bytes) -> tuple[_View, int]:
        """The election under ``prefix`` and the revision it was read at, once its first
        candidate has claimed its key (or the store's timeout has passed)."""
        deadline, delay = now() + self.timeout, 0.005
        while True:
            response = self.client.range_prefix(prefix)
            view = _View(prefix, response.kvs)
            if not view.awaits_claim() or now() >= deadline:
                return view, response.header.revision
            # A winner claims its key one round trip after it learnt it won: wait for that
            # (bounded: the first may be a waiter that is frozen, or lost) rather than report
            # a vacancy. Polled rather than watched: it also runs where gevent has not patched.
            gevent.sleep(min(delay, max(0.0, deadline - now())))
            delay = min(delay * 2, 0.25)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        """The leader after a range of ``<key>/`` (waiting, as :meth:`leader` does, for a
        winner's claim), then after each change a watch from that revision reports (repeats
        included: the follower de-duplicates). A broken stream is resumed once, at once, with
        a fresh range; a second break before any news, or a failed range, raises (the
        follower's Backoff decides)."""
        prefix = (key + "/").encode()
        range_end = prefix_range_end(prefix)
        resumed = False
        while True:
            view, revision = self._settled(prefix)  # a winner about to claim is not a vacancy
            yield view.leader()
            try:
                stream = self.client.watch(prefix, range_end, revision + 1)
                try:
                    for watch_response in stream:
                        resumed = False
                        # All the events of one revision come in one response: a new key
                        # and its twin (one transaction) are seen together.
                        for event in watch_response.events:
                            if event.type == _DELETE:
                                view.delete(event.kv.key)
                            else:  # a new candidate or twin, or a winner's claim
                                view.put(event.kv)
                        yield view.leader()
                finally:
                    stream.close()
            except StoreUnavailableError as exc:
                if resumed:
                    raise
                resumed = True
                log.info("etcd: watch on %r broke, resuming: %s", key, exc)
