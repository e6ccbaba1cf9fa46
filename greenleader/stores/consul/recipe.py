"""The election on Consul's primitives: shared sessions, the lock, the wait, the release.

One :class:`Election` per store object. Read top-down:

1. :meth:`Election.acquire` -- take this store object's turn for the key (its candidates for
   one key queue locally, since they share one session and Consul would let the same session
   lock a key twice), join the shared session of the TTL, then :class:`_Campaign` waits on the
   key's shared blocking query and locks the key when it is free.
2. :class:`ConsulLease` -- renewing a hold is one confirmation round of the shared session;
   releasing is one ``?release=`` request: the session lives on for the others.
3. :class:`SharedSession` -- one Consul session per TTL, renewed in rounds that every lease
   and waiter of the TTL share; when Consul loses it, every tenure it carried ends.
4. :class:`KeyWatch` -- one blocking query per key, fanned out to the waiters and followers
   of that key in this process.

Retries are not decided here: a failing request raises to the caller (the Candidate or
Follower decides with its Backoff); the shared greenlets only resume their own requests.
See docs/stores/consul.md for why each step is safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore

from ... import _fork
from ..._outcome import outcome
from ...errors import LeadershipLostError, StoreError
from ..base import LeaderInfo, Lease, now
from .client import ConsulClient, SessionGone, holder_of

__all__ = ["ConsulLease", "Election", "KeyWatch", "SharedSession"]

log = logging.getLogger("greenleader.stores.consul")

#: A confirmation round's answer: when it started, and the entries of the keys it read.
Confirmation = tuple[float, dict[str, Any]]
#: First and largest pause between lock attempts while Consul enforces a lock-delay on a vacant
#: key: no event marks its end, so poll briefly (Consul's own lock retries every 5 s).
LOCK_DELAY_RETRY = (0.05, 0.25)
#: Seconds a confirmation round waits for more leases to join it: one session renewal and one
#: read per 64 keys then confirm them all (1,000 leases: ~12 requests/s, not ~600); renewals
#: are seconds apart, so 0.2 s of gathering costs nothing.
GATHER = 0.2
#: Largest age, as a share of the TTL, of the session's last renewal that a win may date from;
#: an older one is renewed alongside the lock, so a new leader has most of its renew deadline.
FRESH_AT_WIN = 0.1
#: Keys read per transaction in a confirmation round (Consul's limit of operations per txn).
KEYS_PER_TXN = 64
#: Seconds the session's destroy waits after its last user's release, so that the waiters'
#: locks (sent as soon as the release shows) reach Raft before it rather than queue behind its
#: write: in a handover between processes the winner's lock took 7-8 ms instead of 10-14 ms
#: (benchmarks/consul_handover_trace.py, load 5-7). The release itself is not delayed.
DESTROY_AFTER_RELEASE = 0.05


class Election:
    """The election recipe of one store object: its shared sessions, key watches and turns."""

    def __init__(self, client: ConsulClient, *, lock_delay: float, wait: float,
                 read: Callable[..., tuple[int, dict[str, Any] | None]] | None = None) -> None:
        self.client = client
        #: How a key is read: ``read(key, index=None, wait=None)`` (the store's, which tests hook)
        self.read = read or (lambda key, index=None, wait=None: client.get(key, index, wait or 0.0))
        self.lock_delay = lock_delay
        self.wait = wait
        self._sessions: dict[float, SharedSession] = {}
        self._watches: dict[str, KeyWatch] = {}
        self._turns: dict[str, list[Any]] = {}  # key -> [semaphore, users]

    # -- 1. acquire -----------------------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> ConsulLease:
        self._take_turn(key)
        campaign = None
        try:
            campaign = _Campaign(self, key, node, self.join(ttl, node))
            lease = campaign.run()
        except BaseException:
            if campaign is None or not campaign.handed_off:  # else _give_back gives them back
                if campaign is not None:
                    self.leave(campaign.session)
                self._give_turn(key)
            raise
        return lease  # no yield since the win: a kill now would lose the lease

    def _take_turn(self, key: str) -> None:
        turn = self._turns.setdefault(key, [BoundedSemaphore(1), 0])
        turn[1] += 1
        try:
            turn[0].acquire()
        except BaseException:
            self._drop_turn(key, turn)
            raise

    def _give_turn(self, key: str) -> None:
        turn = self._turns[key]
        turn[0].release()
        self._drop_turn(key, turn)

    def _drop_turn(self, key: str, turn: list[Any]) -> None:
        turn[1] -= 1
        if turn[1] == 0:
            del self._turns[key]

    # -- sessions ---------------------------------------------------------------------------

    def join(self, ttl: float, node: str) -> SharedSession:
        """The live shared session of ``ttl`` (made now if there is none), counting one user."""
        session = self._sessions.get(ttl)
        if session is None or session.lost:
            session = self._sessions[ttl] = SharedSession(self, ttl, node)
        session.users += 1
        try:
            session.ready.get()
        except BaseException:
            self.leave(session)
            raise
        return session

    def leave(self, session: SharedSession, *, close_later: bool = False, released: bool = False) -> None:
        """One user fewer; the last one destroys the session (in a new greenlet with
        ``close_later``: then this never switches; :data:`DESTROY_AFTER_RELEASE` later if
        that user has just ``released`` its key)."""
        session.users -= 1
        if session.users == 0:
            if self._sessions.get(session.ttl) is session:
                del self._sessions[session.ttl]
            if close_later:
                gevent.spawn(session.close)
            else:
                session.close(DESTROY_AFTER_RELEASE if released else 0.0)

    def forget(self, session: SharedSession) -> None:
        if self._sessions.get(session.ttl) is session:
            del self._sessions[session.ttl]

    # -- reading and watching -------------------------------------------------------------------

    def leader(self, key: str) -> LeaderInfo | None:
        return _info(self.read(key)[1])

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        watch = self.subscribe(key)
        try:
            version, (_, entry) = watch.next(-1)
            last = _info(entry)
            yield last
            while True:
                version, (_, entry) = watch.next(version)
                # Compare values, not indexes: a restarted server may reuse an old index.
                current = _info(entry)
                if current != last:
                    last = current
                    yield current
        finally:
            self.unsubscribe(watch)

    def subscribe(self, key: str) -> KeyWatch:
        watch = self._watches.get(key)
        if watch is None or watch.error is not None:
            watch = self._watches[key] = KeyWatch(self, key)
        watch.users += 1
        return watch

    def unsubscribe(self, watch: KeyWatch, *, wait: bool = True) -> None:
        """One user fewer; the last one ends the watch (``wait``: until its greenlet is gone)."""
        watch.users -= 1
        if watch.users == 0:
            if self._watches.get(watch.key) is watch:
                del self._watches[watch.key]
            watch.close(wait=wait)

    def close(self) -> None:
        for watch in list(self._watches.values()):
            watch.close()
        self._watches.clear()
        for session in list(self._sessions.values()):
            session.close()
        self._sessions.clear()

    def after_fork_in_child(self) -> None:
        """Everything here is the parent's: forget it without a word to Consul."""
        for session in self._sessions.values():
            session.abandon()
        for watch in self._watches.values():
            watch.greenlet.kill(block=False)
        self._sessions.clear()
        self._watches.clear()
        self._turns.clear()


class _Campaign:
    """One acquire(): wait on the key's shared watch and lock the key when it is free."""

    def __init__(self, election: Election, key: str, node: str, session: SharedSession) -> None:
        self.election = election
        self.key = key
        self.node = node
        self.session = session
        #: Sessions seen holding the key, to wait out if the key then vanishes (deleted from
        #: outside while its holder may still lead: docs/stores/consul.md).
        self.holders: set[str] = set()
        #: Killed with a lock on the wire: :meth:`_give_back` owns the key's turn and our share
        #: of the session until the lock's answer is in (and the key given back if it locked).
        self.handed_off = False

    def run(self) -> ConsulLease:
        lease = self._try_lock()  # first, without reading: a vacant key is won in one request
        if lease is not None:
            return lease
        watch = self.election.subscribe(self.key)
        try:
            version, (_, entry) = watch.next(-1)
            pause = LOCK_DELAY_RETRY[0]
            while True:
                holder = entry.get("Session") if entry else None
                if holder and holder != self.session.id:  # held by another: wait for a change
                    self.holders.add(holder)
                    version, (_, entry) = watch.next(version)
                    continue
                if entry is None and not self._holders_gone():  # re-checked at least every `wait`
                    version, (_, entry) = watch.next(version, timeout=self.election.wait)
                    continue
                self.holders.clear()  # released (the key is there, vacant), or its holders are gone
                with watch.held():  # no new blocking query while the lock is on the wire
                    lease = self._try_lock()
                if lease is not None:
                    return lease
                # Refused: someone else won (the watch will show it), or a lock-delay runs.
                changed, (_, new_entry) = watch.next(version, timeout=pause)
                pause = min(pause * 2, LOCK_DELAY_RETRY[1]) if changed == version else LOCK_DELAY_RETRY[0]
                version, entry = changed, new_entry
        finally:
            # A win returns without a yield (a kill then would leave the key locked with no
            # lease to release it): the watch ends after, in the hub's next turn, without
            # having asked again (it was held for the lock).
            self.election.unsubscribe(watch, wait=lease is None)

    def _try_lock(self) -> ConsulLease | None:
        """One lock transaction: the lease if won, None if refused (or the session was lost, or
        this is a forked child's copy of the campaign, which locks nothing)."""
        if self.session.inherited:
            return None
        if self.session.lost:
            self._new_session()
        renewal = self._renew_alongside()
        # The lock runs in a greenlet of its own, which a kill of this one does not cut short:
        # Consul may apply a lock whose answer we never read, and the shared session, kept alive
        # by its other users, would then hold the key for nobody.
        locking = gevent.spawn(outcome, self.election.client.lock, self.key, self.node, self.session.id)
        try:
            locked = locking.get()
            if isinstance(locked, BaseException):
                raise locked
            if renewal is not None:
                renewal.join()
        except SessionGone:
            self.session.lose("Consul refused it for a lock")
            return None
        except BaseException:
            if not self.session.inherited and not (locking.ready() and not self._ours(locking.value)):
                self.handed_off = True
                gevent.spawn(self._give_back, locking)
            raise
        if not self._ours(locked):
            return None
        if renewal is not None and isinstance(renewal.value, BaseException):
            self._unlock_unconfirmed()  # a win it cannot date: give it back
            if isinstance(renewal.value, LeadershipLostError):
                return None
            raise renewal.value
        return ConsulLease(self.election, self.key, self.node, int(locked["ModifyIndex"]), self.session)

    def _renew_alongside(self) -> gevent.Greenlet | None:
        """A win dates from the session's last renewal: if that is older than
        :data:`FRESH_AT_WIN`, renew it alongside the lock attempt (no extra round trip)."""
        if now() - self.session.confirmed_at < FRESH_AT_WIN * self.session.ttl:
            return None
        return gevent.spawn(outcome, self.session.confirm_now)

    def _ours(self, answer: object) -> bool:
        """Whether a lock's answer says the key is locked by our session."""
        return isinstance(answer, dict) and answer.get("Session") == self.session.id

    def _give_back(self, locking: gevent.Greenlet) -> None:
        """After a kill with the lock on the wire: wait for its answer, unlock the key if it
        locked it, then give back the key's turn (no other candidate of ours may lock it with
        the same session before the unlock) and our share of the session."""
        session = self.session
        try:
            if self._ours(locking.get()) and not session.inherited:
                try:
                    self.election.client.release(self.key, session.id)
                except StoreError as exc:
                    log.warning("consul: could not give back %r after a kill: %s", self.key, exc)
                    if session.users > 1 and not session.lost:  # others keep the session: retry
                        session.users += 1
                        gevent.spawn(_release_later, self.election, self.key, session)
        finally:
            if not self.session.inherited:
                self.election._give_turn(self.key)
                self.election.leave(self.session)

    def _unlock_unconfirmed(self) -> None:
        try:
            self.election.client.release(self.key, self.session.id)
        except StoreError as exc:  # the session's end releases it (or a later release of ours)
            log.warning("consul: could not give back %r: %s", self.key, exc)

    def _new_session(self) -> None:
        old = self.session
        self.session = self.election.join(old.ttl, self.node)
        self.election.leave(old)

    def _holders_gone(self) -> bool:
        """Drop the holders Consul no longer knows; True if none is left."""
        for holder in sorted(self.holders):
            _, alive = self.election.client.session_exists(holder)
            if alive:
                log.debug("consul: %r waits: session %s held %r, which vanished; its holder may still lead",
                          self.node, holder, self.key)
                return False
            self.holders.discard(holder)
        return True


# -- 2. the lease ---------------------------------------------------------------------------------


class ConsulLease(Lease):
    """A key locked by a shared session. ``term`` is the key's ModifyIndex at the win."""

    def __init__(self, election: Election, key: str, node: str, term: int, session: SharedSession) -> None:
        super().__init__(key, node, term, session.confirmed_at)
        self._election = election
        self._session = session
        self._released = False
        session.leases.add(self)
        _fork.register(self)

    @property
    def session_id(self) -> str:
        return self._session.id

    def _after_fork_in_child(self) -> None:
        self._released = True  # the parent's hold: renew nothing, release nothing

    def abandon(self) -> None:
        """Give the hold up without waiting: its release kept failing (or never went out). The
        shared session would keep the key locked for as long as its other users keep it
        renewed, so the key is released again in the background while they do (for as long
        as Consul refuses that release and they lead, the key stays held: a limit of sharing),
        and this lease's share of the session is given back (the last user destroys it, which
        frees the key). Never switches greenlets: the network work runs in spawned greenlets."""
        if self._released:
            return
        self._released = True
        session = self._session
        session.leases.discard(self)
        if session.inherited:
            return
        self._election._give_turn(self.key)
        if not session.lost and session.users > 1:  # others keep the session alive: release again
            session.users += 1
            gevent.spawn(_release_later, self._election, self.key, session)
        self._election.leave(session, close_later=True)  # the last user destroys the session

    def renew(self) -> None:
        """Join the session's next confirmation round: the session renewed, the key read."""
        if self._released or self._session.inherited:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        started, entries = self._session.confirm(self.key)
        if (entries.get(self.key) or {}).get("Session") != self._session.id:
            raise LeadershipLostError(f"{self.key!r} is no longer locked by the session of {self.node!r}")
        self.confirmed_at = started

    def release(self) -> None:
        """Unlock the key (one request); the shared session lives on for the others."""
        if self._released:
            return
        self._released = True
        session, client = self._session, self._election.client
        session.leases.discard(self)
        released = False
        try:
            if not session.lost and not session.inherited:
                unlocked = client.release(self.key, session.id)
                if not unlocked and not session.inherited:  # (a fork during the release: the child writes nothing)
                    # Not ours any more: deleted from outside. Put it back vacant, so that waiters
                    # who saw us hold it know we have stepped down (docs/stores/consul.md).
                    client.put_vacant_if_absent(self.key)
            released = True
        except StoreError:
            if session.users > 1 and not session.inherited:  # others keep the session (and so the key) alive: retry
                session.users += 1
                gevent.spawn(_release_later, self._election, self.key, session)
            raise
        finally:
            self._election._give_turn(self.key)
            self._election.leave(session, released=released)  # the last user destroys the session

    def lost_with_session(self) -> None:
        if not self._released:
            self.notify_lost()


def _release_later(election: Election, key: str, session: SharedSession) -> None:
    """Resume a failed release while the session lives (holding it as one more user), until
    it succeeds or this retry is the session's last user: then leaving destroys the session,
    which frees the key, rather than this retry keeping it renewed for as long as Consul
    refuses the release."""
    try:
        while not session.lost and not session.closed:
            gevent.sleep(session.ttl / 10)
            try:
                if election._turns.get(key) is None:  # no candidate of ours has locked it since
                    election.client.release(key, session.id)
                return
            except StoreError as exc:
                log.debug("consul: releasing %r again failed: %s", key, exc)
                if session.users <= 1:
                    return
    finally:
        election.leave(session)


# -- 3. the shared session ----------------------------------------------------------------------


class SharedSession:
    """One Consul session of one TTL (``behavior=delete``, explicit lock-delay, no checks).

    Renewed in confirmation rounds: a lease's renewal joins the next round, which starts
    :data:`GATHER` seconds after the first joiner, renews the session once and reads every
    joiner's key. While nobody asks, a keeper starts a round every third of the TTL. A
    blocking query on the session tells at once when Consul drops it.
    """

    def __init__(self, election: Election, ttl: float, node: str) -> None:
        self.election = election
        self.ttl = ttl
        self.node = node
        self.id = ""
        self.users = 0
        self.lost = False
        self.closed = False
        self.confirmed_at = 0.0
        self.leases: set[ConsulLease] = set()
        self.pid = os.getpid()
        self.ready: AsyncResult = AsyncResult()
        self._round: _Round | None = None  # gathering joiners
        self._running: _Round | None = None  # on the wire
        self._greenlets: list[gevent.Greenlet] = []
        self._destroyed = False
        self._creating = gevent.spawn(self._create)

    @property
    def inherited(self) -> bool:
        return self.pid != os.getpid()

    def _create(self) -> None:
        started = now()
        try:
            session_id = self.election.client.create_session(
                f"greenleader {self.node}", self.ttl, self.election.lock_delay)
        except (Exception, gevent.GreenletExit) as exc:
            self.lost = True
            self.election.forget(self)
            self.ready.set_exception(exc if isinstance(exc, StoreError) else StoreError(f"{exc!r}"))
            return
        self.id, self.confirmed_at = session_id, started
        log.debug("consul: session %s (ttl %gs) for %r", session_id, self.ttl, self.node)
        if self.closed:  # every user left while it was being made
            self._destroy()
            return
        self._greenlets = [gevent.spawn(self._keep_alive), gevent.spawn(self._monitor)]
        self.ready.set(self)

    def confirm(self, key: str | None = None, *, at_once: bool = False) -> tuple[float, dict[str, Any]]:
        """Join the next round: ``(its start, the entries of the keys read)``. Raises
        LeadershipLostError if the session is gone, StoreError if the round failed."""
        if self.lost:
            raise LeadershipLostError(f"the Consul session of {self.node!r} has expired or was destroyed")
        round_ = self._round
        if round_ is None:
            round_ = self._round = _Round()
            gevent.spawn_later(GATHER, self._run_round, round_)
        if key is not None:
            round_.keys.add(key)
        if at_once:
            gevent.spawn(self._run_round, round_)
        return cast(Confirmation, round_.result.get())

    def confirm_now(self) -> tuple[float, dict[str, Any]]:
        """A renewal for a win: the round on the wire if there is one (it started moments ago),
        else the next one, started at once."""
        if self._running is not None:
            return cast(Confirmation, self._running.result.get())
        return self.confirm(None, at_once=True)

    def _run_round(self, round_: _Round) -> None:
        if round_.started:
            return
        round_.started = True
        if self._round is round_:
            self._round = None  # whoever asks from now on joins the next round
        self._running = round_
        try:
            self._confirm(round_)
        finally:
            if self._running is round_:
                self._running = None

    def _confirm(self, round_: _Round) -> None:
        started = now()
        client = self.election.client
        try:
            client.renew_session(self.id)
            self.confirmed_at = started
            keys = sorted(round_.keys)
            entries: dict[str, Any] = {}
            for first in range(0, len(keys), KEYS_PER_TXN):
                entries.update(client.read_many(keys[first:first + KEYS_PER_TXN]))
        except SessionGone:
            self.lose("Consul no longer knows it")
            round_.result.set_exception(
                LeadershipLostError(f"the Consul session of {self.node!r} has expired or was destroyed"))
        except (Exception, gevent.GreenletExit) as exc:
            round_.result.set_exception(exc if isinstance(exc, StoreError) else StoreError(f"{exc!r}"))
        else:
            round_.result.set((started, entries))

    def _keep_alive(self) -> None:
        """Renew when no lease has for a third of the TTL (renewals failing); with waiters only,
        often enough that a win needs no renewal beside its lock (:data:`FRESH_AT_WIN`)."""
        while not self.lost:
            period = self.ttl / 3 if self.leases else self.ttl * FRESH_AT_WIN * 0.8
            gevent.sleep(max(period / 4, self.confirmed_at + period - now()))
            if now() - self.confirmed_at < period:
                continue
            try:
                self.confirm(at_once=not self.leases)  # waiters only: no renewals to gather
            except LeadershipLostError:
                return
            except StoreError as exc:  # resume: the candidates' deadlines decide what it costs
                log.warning("consul: renewing the session of %r failed: %s", self.node, exc)

    def _monitor(self) -> None:
        """Block on the session; end every tenure it carries as soon as Consul drops it."""
        client, index = self.election.client, 1
        while not self.lost:
            try:
                index, alive = client.session_exists(self.id, index=index, wait=self.election.wait)
            except StoreError as exc:  # resume: renewals judge store trouble, this only hurries news
                log.debug("consul: watching the session of %r failed: %s", self.node, exc)
                gevent.sleep(self.ttl / 10)
                continue
            if not alive:
                self.lose("Consul dropped it (expired or destroyed)")

    def lose(self, why: str) -> None:
        """The session is gone: every tenure it carried ends, each reported with its loss."""
        if self.lost:
            return
        self.lost = True
        self.election.forget(self)
        log.info("consul: the session of %r is gone (%s); %d tenure(s) end", self.node, why, len(self.leases))
        for lease in list(self.leases):
            lease.lost_with_session()
        for greenlet in self._greenlets:
            if greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)

    def close(self, delay: float = 0.0) -> None:
        """The last user left: stop renewing and destroy the session (its keys are released),
        ``delay`` seconds from now. Returns once destroyed; if the caller is killed meanwhile,
        the destroy still goes out (a greenlet of its own)."""
        self.closed = True
        if not self._creating.ready():
            self._creating.join(timeout=2 * self.election.client.timeout + 1.0)
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        if self.id and not self.lost:
            if delay:
                gevent.spawn_later(delay, self._destroy).join()
            else:
                self._destroy()

    def _destroy(self) -> None:
        if self._destroyed or self.inherited:
            return
        self._destroyed = True
        try:
            self.election.client.destroy_session(self.id)
        except StoreError as exc:
            log.warning("consul: could not destroy a session of %r (trying again until its TTL ends it): %s",
                        self.node, exc)
            gevent.spawn(self._destroy_later)

    def _destroy_later(self) -> None:
        """Resume a failed destroy (an outage), until Consul would have expired the session."""
        give_up = now() + 2 * self.ttl
        while now() < give_up and not self.inherited:
            gevent.sleep(self.ttl / 20)
            try:
                self.election.client.destroy_session(self.id)
                return
            except StoreError:
                continue

    def abandon(self) -> None:
        """In a forked child: the parent's session, left alone."""
        self.closed = True
        self._creating.kill(block=False)
        for greenlet in self._greenlets:
            greenlet.kill(block=False)


class _Round:
    def __init__(self) -> None:
        self.started = False
        self.keys: set[str] = set()
        self.result: AsyncResult = AsyncResult()


# -- 4. the shared watch of a key ---------------------------------------------------------------


class KeyWatch:
    """One blocking query on ``key``, shared by this store object's waiters and followers.

    ``next(version)`` returns the first state newer than ``version``: ``(version, (index,
    entry))``. A failed request fails every subscriber (their owners decide on retries) and
    ends the watch; the next subscriber starts a new one.

    After a change, the next blocking query waits while a subscriber :meth:`held` the watch
    (a waiter's lock on the wire): a winner then ends the watch without one more query, and
    a refused waiter lets it ask again from the same index, so nothing is missed (issue 11:
    the query sent before the lock cost the winner 0.3-0.5 ms of CPU on the handover's path,
    and a request killed after the win).
    """

    def __init__(self, election: Election, key: str) -> None:
        self.election = election
        self.key = key
        self.users = 0
        self.version = -1
        self.state: tuple[int, dict[str, Any] | None] = (0, None)
        self.error: BaseException | None = None
        self.closed = False
        self._changed = Event()
        self._holds = 0
        self._unheld = Event()
        self._unheld.set()
        self.greenlet = gevent.spawn(self._run)

    def next(self, version: int, timeout: float | None = None) -> tuple[int, tuple[int, dict[str, Any] | None]]:
        if self.version == version and self.error is None:
            self._changed.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.version, self.state

    def _run(self) -> None:
        read = self.election.read
        try:
            index, entry = read(self.key)
            self._publish(index, entry)
            while True:
                index, entry = read(self.key, index=index, wait=self.election.wait)
                if entry != self.state[1]:
                    self._publish(index, entry)
                    gevent.sleep(0)  # the subscribers first (a waiter's lock), then the next query
                    self._unheld.wait()  # (a kill ends this wait: the finally of held() unholds)
                    if self.closed:
                        return
        except StoreError as exc:
            self.error = exc
            self._wake()

    def _publish(self, index: int, entry: dict[str, Any] | None) -> None:
        self.state = (index, entry)
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, Event()
        changed.set()

    @contextmanager
    def held(self) -> Iterator[None]:
        """No new blocking query while the block runs (see the class docstring)."""
        self._holds += 1
        self._unheld.clear()
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._unheld.set()

    def close(self, *, wait: bool = True) -> None:
        self.closed = True
        self.greenlet.kill(block=wait)


def _info(entry: dict[str, Any] | None) -> LeaderInfo | None:
    held = holder_of(entry)
    return None if held is None else LeaderInfo(*held)
