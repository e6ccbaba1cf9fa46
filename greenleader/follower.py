"""Follow an election: report each new leader of a key, without running for it.

A follower believes what the store's watch last told it only while it can confirm it: each
value the watch yields confirms the leader, and a watch that stays quiet is checked with a
read of the leader. Once nothing has been confirmed for ``unknown_after`` seconds (a store
outage, a silent partition, a blocked hub), the follower says it does not know: ``None`` on
the channel, :meth:`Follower.leader` ``None`` and :attr:`Follower.known` ``False``, since the
last leader seen may have stepped down meanwhile (see docs/safety.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import ClassVar

import gevent
import zope.event
from gevent import Greenlet, GreenletExit
from gevent.event import Event
from gevent.queue import Queue

from . import _fork
from ._channels import Channels
from ._outcome import spawn
from .errors import GreenleaderError, PermissionDeniedError, StoppedError, StoreError, StoreUnavailableError
from .events import ElectionError, EventPublisher, LeaderChanged
from .retry import Backoff, as_backoff
from .status import FollowerStatus, Record
from .stores._checks import check_float, check_key, check_store
from .stores.base import LeaderInfo, Store, now

__all__ = ["Follower"]

log = logging.getLogger(__name__)

#: Seconds without a confirmed leader after which a follower reports "unknown": the renew
#: deadline of a default candidate (two thirds of the default 15 s TTL), past which a leader
#: that could not reach the store has stepped down.
UNKNOWN_AFTER = 10.0
#: Longest pause between checks of an unreachable store: after an outage, the follower
#: catches up within this plus one round trip, whatever its retry backoff says.
RECHECK_MAX = 1.0

_UNSEEN = object()  # nothing reported yet
_UNKNOWN = object()  # reported as unknown


class _Resync(BaseException):
    """Raised into the watch to restart it: a check found a leader the watch did not show."""


class Follower:
    """Watches who leads ``key`` in ``store``.

    :param retry: keep following through store outages: on a store error, publish a non-fatal
        :class:`~greenleader.events.ElectionError`, wait a jittered exponential backoff
        (``True`` for the default :class:`~greenleader.retry.Backoff`), watch again and report
        the leader found if it changed. Without it, the first store error ends the watch.
        A retrying follower checks the store at least every ``RECHECK_MAX`` seconds while it
        is unreachable, so it catches up soon after the store returns.
    :param unknown_after: seconds without confirming the leader after which the follower
        reports that it does not know who leads (``None``, with :attr:`known` False). Set it
        to the candidates' ``renew_deadline``; the default suits the default TTL.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        retry: Backoff | bool | None = None,
        unknown_after: float = UNKNOWN_AFTER,
    ) -> None:
        # Checked once, here: the store's leader() and watch() are called with it and do not check.
        self.store = check_store(store)
        self.key = check_key(store, key)
        self.retry = as_backoff(retry)
        self.unknown_after = check_float("unknown_after", unknown_after, minimum=0.0, maximum=86400.0,
                                         inclusive=False)
        self._channels: Channels | None = None
        self._greenlet: Greenlet | None = None
        self._guard: Greenlet | None = None
        self._publisher = EventPublisher()
        self._current: LeaderInfo | object | None = _UNSEEN
        self._confirmed_at = 0.0
        self._watch_yielded = False  # True once the running watch gave a value: it may be resynced
        self._watch_share: _Subscription | None = None  # this follower's share of the store's watch
        self._reachable = Event()  # set by a successful check: ends a retry backoff early
        self._stopped = False
        self._inert = False  # a forked child's copy
        #: Observations for status() and metrics only: nothing in the watch reads them.
        self._record = Record(store.backend, self.key, role="follower")
        _fork.register(self)

    def __repr__(self) -> str:
        return f"<Follower key={self.key!r}>"

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def follow_election(self) -> tuple[Queue[str | None], Queue[BaseException]]:
        """Start following; return the ``(leaders, errors)`` queues.

        ``leaders`` gets the current leader's node name first (``None`` if the key is vacant
        or does not exist yet), then each different leader as it changes, ``None`` for each
        vacancy and ``None`` when the leader becomes unknown (tell the two apart with
        :attr:`known`). Both queues end when the watch ends; ``errors`` gets the error that
        ended it.
        """
        if self._stopped:
            raise StoppedError(f"{self!r} was stopped; make a new Follower")
        if self._channels is None:
            self._channels = Channels()
            self._confirmed_at = now()
            self._greenlet = gevent.spawn(self._follow)
            self._guard = gevent.spawn(self._check_quiet_watch)
        return self._channels.results, self._channels.errors

    @property
    def known(self) -> bool:
        """False while following without a leader confirmed in the last ``unknown_after`` seconds
        (then :meth:`leader` is None although the key may have a leader). True otherwise."""
        if self._channels is None or self._stopped:
            return True
        return self._current is not _UNKNOWN and now() - self._confirmed_at <= self.unknown_after

    def leader(self) -> str | None:
        """The current leader's node name, or None when vacant or unknown (see :attr:`known`).

        While following, this is the last leader the watch reported; otherwise the store is read.
        """
        info = self.leader_info()
        return info.node if info is not None else None

    def leader_info(self) -> LeaderInfo | None:
        """Like :meth:`leader`, with the leader's fencing term."""
        if self._current is not _UNSEEN and not self._stopped:
            if not self.known:
                return None
            return self._current  # type: ignore[return-value]
        try:
            return self.store.leader(self.key)
        except GreenleaderError:
            raise
        except Exception as exc:
            raise StoreError(f"reading the leader from the {self.store.backend} store failed: {exc!r}") from exc

    def status(self) -> FollowerStatus:
        """What this follower is doing: its state (``waiting`` before :meth:`follow_election`,
        ``following``, ``backing off``, ``stopped``), the leader it reports, and the store's
        health as its watch and checks saw it (silent for ``unknown_after``: unreachable).
        Read-only: it never reads the store."""
        record = self._record
        if self._stopped or (self._greenlet is not None and self._greenlet.dead):
            state = "stopped"
        elif self._channels is None:
            state = "waiting"
        else:
            state = record.pause or "following"
        current = self._current
        info = current if isinstance(current, LeaderInfo) and state != "stopped" and self.known else None
        return FollowerStatus(self.key, state, info.node if info else None, info.term if info else None,
                              self.known, record.leader_changes, record.health(self.unknown_after))

    def stop(self) -> None:
        """Stop following and end both queues. Idempotent; may be called from a subscriber."""
        if self._stopped:
            return
        self._stopped = True
        current = gevent.getcurrent()
        for greenlet in (self._guard, self._greenlet):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=True, timeout=5)
        if self._channels is not None:
            self._channels.close()
        self._publisher.join(timeout=1)

    # -- the watch greenlet ---------------------------------------------------------------

    def _follow(self) -> None:
        channels = self._channels
        assert channels is not None
        delays = self.retry.delays() if self.retry else None
        error: BaseException | None = None
        try:
            while not self._inert:
                try:
                    self._watch(channels)
                except _Resync:
                    continue
                except StoreError as exc:
                    self._record.failed(exc)
                    if delays is None or isinstance(exc, PermissionDeniedError):
                        raise
                    delay = next(delays)
                    log.warning("%r: store error, watching again in %.1fs: %s", self, delay, exc)
                    self._publisher.publish(ElectionError(self, self.key, exc, fatal=False))
                    self._reachable.clear()
                    self._record.paused("backing off")
                    with contextlib.suppress(_Resync):
                        self._reachable.wait(timeout=delay)
                    self._record.paused(None)
        except GreenletExit:
            pass
        except GreenleaderError as exc:
            error = exc
        except Exception as exc:
            log.exception("%r: unexpected error", self)
            error = StoreError(f"unexpected error from the {self.store.backend} store: {exc!r}")
            error.__cause__ = exc
            self._record.failed(error)
        finally:
            if self._guard is not None and self._guard is not gevent.getcurrent():
                self._guard.kill(block=False)
            if not self._inert:
                self._current = _UNSEEN
                if error is not None:
                    log.error("%r: watch ended: %s", self, error)
                    channels.fail(error)
                    self._publisher.publish(ElectionError(self, self.key, error))
                channels.close()

    def _watch(self, channels: Channels) -> None:
        """Report each change the store's watch shows, until it fails.

        The store's watch is shared with every follower of the key on this store object."""
        self._watch_share = share = _SharedWatch.subscribe(self.store, self.key, self.unknown_after / 2)
        share.on_confirmed = self._confirmed_by_peer
        share.on_repeat = self._receive_again
        try:
            share.follow(self._receive)
        except _Resync:
            share.shared.restart()
            raise
        finally:
            self._watch_yielded = False
            self._watch_share = None
            share.close()

    def _receive(self, info: LeaderInfo | None, received_at: float) -> None:
        """A value of the watch, received at ``received_at``: it confirms the leader, and is
        reported if it is a change. Called from the shared watch's greenlet: never blocks."""
        if self._inert or self._stopped:
            return  # a forked child's copy, or a stopped follower whose watch is being closed
        self._confirmed_at = max(self._confirmed_at, received_at)
        self._record.contact()
        self._watch_yielded = True
        self._report(info)

    def _receive_again(self, info: LeaderInfo | None, received_at: float) -> None:
        """The watch yielded the value it yielded last (ZooKeeper reads again after each event,
        etcd and the memory store yield after each wake-up): a confirmation only, if this
        follower reports exactly that; a value otherwise (e.g. it reported "unknown" meanwhile)."""
        if self._inert or self._stopped:
            return
        if self._current is not _UNKNOWN and self._current == info:
            self._confirmed_at = max(self._confirmed_at, received_at)
            self._record.contact()
        else:
            self._receive(info, received_at)

    def _confirmed_by_peer(self, info: LeaderInfo | None, at: float) -> None:
        """Another follower of the shared watch read ``info`` at ``at``: a confirmation for this
        one too, if it reports the same leader."""
        if self._current not in (_UNSEEN, _UNKNOWN) and self._current_node() == _node(info):
            self._confirmed_at = max(self._confirmed_at, at)

    def _report(self, info: LeaderInfo | None) -> None:
        node = info.node if info is not None else None
        self._record.leader_seen(node)
        if self._current not in (_UNSEEN, _UNKNOWN) and self._current_node() == node:
            self._current = info  # same leader; keep the newest term
            return
        self._current = info
        assert self._channels is not None
        self._channels.put(node)
        if zope.event.subscribers:  # (nobody listens: no greenlet to spawn, 100 followers' worth per change)
            self._publisher.publish(LeaderChanged(self, self.key, node, info.term if info else None))

    def _current_node(self) -> str | None:
        current = self._current
        return current.node if isinstance(current, LeaderInfo) else None

    # -- the guard greenlet: confirm a quiet watch, report "unknown" ------------------------

    def _check_quiet_watch(self) -> None:
        """Read the leader whenever the watch has been quiet for half of ``unknown_after``
        (every ``RECHECK_MAX`` at most while that fails), and report "unknown" when nothing
        confirmed the leader in time."""
        quiet = self.unknown_after / 2
        recheck = min(quiet, RECHECK_MAX)
        while True:
            if self._current is not _UNKNOWN:
                if now() > self._confirmed_at + self.unknown_after:
                    self._report_unknown()
                    continue
                due = self._confirmed_at + quiet
                if now() < due:
                    gevent.sleep(due - now())
                    continue
            if self._check():
                continue
            wake = now() + recheck
            if self._current is not _UNKNOWN:
                wake = min(wake, self._confirmed_at + self.unknown_after + 0.001)
            gevent.sleep(max(0.0, wake - now()))

    def _check(self) -> bool:
        """Read the leader; True if it confirms what the follower reported."""
        share = self._watch_share
        if share is not None:  # one read in flight per shared watch, however many followers check
            reading, started = share.shared.reading()
        else:
            started = now()
            # In a greenlet of its own: a GreenletExit out of the store is a failed read, not a kill.
            reading = spawn(self.store.leader, self.key)
        try:
            reading.join(timeout=min(self.unknown_after / 2, 10.0))
        finally:
            if not reading.ready():
                reading.kill(block=False)
        info = reading.value if reading.successful() else None
        if not reading.ready() or isinstance(info, BaseException):
            log.debug("%r: could not confirm the leader: %s", self, info or "no answer in time")
            self._record.failed(info if isinstance(info, BaseException) else
                                f"no answer from the {self.store.backend} store to a leader read in time")
            return False
        self._record.contact()
        self._reachable.set()  # a retry backoff ends: watch again now
        node = info.node if info is not None else None
        if self._current not in (_UNSEEN, _UNKNOWN) and self._current_node() == node:
            self._confirmed_at = max(self._confirmed_at, started)  # as of the read, not the reply
            if share is not None:
                share.shared.confirm(info, started)  # the followers sharing the watch need not read too
            return True
        if self._watch_yielded and self._greenlet is not None:
            # The watch went quiet on a stale value: watch again from what the store holds now.
            # (A watch still setting up is left alone: its first value is on its way.)
            self._greenlet.kill(_Resync, block=False)
        return False

    def _report_unknown(self) -> None:
        log.warning("%r: leader unconfirmed for over %gs; reporting it unknown", self, self.unknown_after)
        self._current = _UNKNOWN
        assert self._channels is not None
        self._channels.put(None)
        self._publisher.publish(LeaderChanged(self, self.key, None, None, known=False))

    # -- fork ---------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child: follow nothing and report nothing."""
        self._inert = True
        self._stopped = True
        self._current = _UNSEEN
        self._publisher.discard()
        for greenlet in (self._guard, self._greenlet):
            if greenlet is not None:
                greenlet.kill(block=False)
        if self._channels is not None:
            self._channels.close()


# -- one store watch per (store object, key), shared by its followers ---------------------------


class _Restart(BaseException):
    """Raised into a shared watch's greenlet to open the store's watch anew."""


class _SharedWatch:
    """One ``store.watch(key)`` for every follower of ``key`` on one store object, fanned out
    in-process: a change costs one notification, however many followers there are.

    The first subscriber opens it, each subscriber gets every value (with the time it was
    received), an error ends it for every subscriber (each then retries on its own terms), and
    the last one to leave closes it. A subscriber that joins late first gets the value the watch
    last yielded, if it is fresh enough for it, else a read of its own.
    """

    _open: ClassVar[dict[tuple[int, str], _SharedWatch]] = {}

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key
        self.subscribers: set[_Subscription] = set()
        self.last: LeaderInfo | object | None = _UNSEEN  # _UNSEEN before the first value, and while restarting
        self.confirmed_at = 0.0  # when ``last`` was last confirmed (received, or read by a subscriber)
        self._inert = False  # a forked child's copy
        self._reading: Greenlet | None = None  # the subscribers' leader read in flight
        self._read_started = 0.0
        self._greenlet = gevent.spawn(self._run)
        _fork.register(self)

    @classmethod
    def subscribe(cls, store: Store, key: str, max_age: float) -> _Subscription:
        shared = cls._open.get((id(store), key))
        if shared is None:
            shared = cls._open[(id(store), key)] = cls(store, key)
        subscription = _Subscription(shared)
        shared.subscribers.add(subscription)
        if shared.last is not _UNSEEN:
            if now() - shared.confirmed_at <= max_age:
                subscription.queue.put((shared.last, shared.confirmed_at))
            else:
                subscription.read_first = True
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        self.subscribers.discard(subscription)
        if not self.subscribers:
            self._close()
            self._greenlet.kill(block=True, timeout=5)  # the store's watch is closed when this returns

    def restart(self) -> None:
        """Open the store's watch anew (for every subscriber): it went quiet on a stale value.
        A restart already under way (no value since) is not repeated."""
        if self.last is not _UNSEEN and not self._greenlet.dead:
            self.last = _UNSEEN
            self._greenlet.kill(_Restart, block=False)

    def reading(self) -> tuple[Greenlet, float]:
        """The leader read in flight for this key, started if there is none, and when it began:
        subscribers that check the leader at the same moment share one read."""
        if self._reading is None or self._reading.ready():
            self._read_started = now()
            self._reading = spawn(self.store.leader, self.key)
        return self._reading, self._read_started

    def confirm(self, info: LeaderInfo | None, at: float) -> None:
        """A subscriber read ``info`` from the store at ``at``: it confirms every subscriber
        that reports the same leader, so one read per quiet period serves them all."""
        if self.last is not _UNSEEN and _node(self.last) == _node(info):
            self.confirmed_at = max(self.confirmed_at, at)
        for subscription in list(self.subscribers):
            subscription.on_confirmed(info, at)

    def _close(self) -> None:
        if self._open.get((id(self.store), self.key)) is self:
            del self._open[(id(self.store), self.key)]

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while self.subscribers and not self._inert:
                try:
                    self._fan_out()
                except _Restart:
                    continue
        except GreenletExit:
            return  # the last subscriber left (or a fork)
        except Exception as exc:
            error = exc
        finally:
            self._close()
        for subscription in list(self.subscribers):  # (no switch since _close: nobody joined meanwhile)
            subscription.deliver(error or StoreUnavailableError(
                f"the {self.store.backend} watch of {self.key!r} ended"))

    def _fan_out(self) -> None:
        """Give every subscriber each value of one store watch, until it ends or fails."""
        watch = self.store.watch(self.key)
        try:
            for info in watch:
                if self._inert:
                    return  # a forked child's copy, woken by what was pending at the fork
                again = info == self.last  # (same leader, same term; never so for the first value)
                self.last, self.confirmed_at = info, now()
                for subscription in list(self.subscribers):
                    subscription.deliver((info, self.confirmed_at), again=again)
        finally:
            watch.close()

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's watch is not the child's."""
        self._inert = True
        self.subscribers.clear()
        self._close()
        for greenlet in (self._greenlet, self._reading):
            if greenlet is not None:
                greenlet.kill(block=False)


class _Subscription:
    """One follower's share of a :class:`_SharedWatch`: :meth:`follow` it."""

    def __init__(self, shared: _SharedWatch) -> None:
        self.shared = shared
        #: What the follower has not handled yet: the values before it began to follow, and the end.
        self.queue: Queue[tuple[LeaderInfo | None, float] | BaseException] = Queue()
        self.read_first = False  # joined a quiet watch: read the leader rather than trust its last value
        self.on_confirmed: Callable[[LeaderInfo | None, float], None] = lambda info, at: None
        #: Takes a value equal to the last one while following (a confirmation, as a rule).
        self.on_repeat: Callable[[LeaderInfo | None, float], None] | None = None
        self._receive: Callable[[LeaderInfo | None, float], None] | None = None  # set while following

    def deliver(self, item: tuple[LeaderInfo | None, float] | BaseException, *, again: bool = False) -> None:
        """A value ``(info, received_at)`` of the watch, or the error that ended it. While the
        follower follows, a value is handed to it here, in the shared watch's greenlet: a
        change costs no greenlet switch per follower (``again``: the watch yielded it last
        time too, for :attr:`on_repeat`). Otherwise (and for the end) it is queued."""
        receive = self._receive
        if receive is None or isinstance(item, BaseException):
            self.queue.put(item)
            return
        if again and self.on_repeat is not None:
            receive = self.on_repeat
        try:
            receive(*item)
        except Exception as exc:  # a bug in one follower ends its watch, not its peers'
            log.exception("follower of %r failed to take a value", self.shared.key)
            self._receive = None
            self.queue.put(exc)

    def follow(self, receive: Callable[[LeaderInfo | None, float], None]) -> None:
        """Hand every value of the watch to ``receive(info, received_at)`` (which must not block),
        until the watch ends: then raise why. Returns only if ``receive`` raised (its error is raised)."""
        try:
            if self.read_first:
                started = now()
                info = self.shared.store.leader(self.shared.key)
                if self.queue.empty():  # else the watch has news since: the read may be older than it
                    receive(info, started)
            while True:
                while not self.queue.empty():  # what came before following (a late joiner's value)
                    item = self.queue.get_nowait()
                    if isinstance(item, BaseException):
                        raise item
                    receive(*item)
                self._receive = receive  # (no switch since the queue was seen empty: nothing is lost)
                item = self.queue.get()  # the end, or a value that came while receive was unset
                self._receive = None
                if isinstance(item, BaseException):
                    raise item
                receive(*item)
        finally:
            self._receive = None

    def close(self) -> None:
        self.shared.unsubscribe(self)


def _node(info: object) -> str | None:
    return info.node if isinstance(info, LeaderInfo) else None
