"""Run for election: hold a key while alive, renew it, and report leadership.

One greenlet per candidate campaigns (waits for the key), then keeps it alive. It never
runs user code: results go on a queue and events are published from another greenlet,
so a slow or failing consumer cannot delay a renewal.

Leadership is judged on this process's monotonic clock: the candidate leads only until
``confirmed_at + renew_deadline``, where ``confirmed_at`` is no later than the store's last
confirmation of the hold and ``renew_deadline < ttl``. :meth:`Candidate.is_leader` checks
that deadline itself, so it turns False on time even if the hub was blocked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import gevent
from gevent import Greenlet, GreenletExit
from gevent.event import Event
from gevent.hub import Waiter
from gevent.queue import Queue

from . import _fork
from ._channels import Channels
from ._outcome import abandon, spawn
from .errors import (
    GreenleaderError,
    InvalidArgumentError,
    LeadershipLostError,
    PermissionDeniedError,
    StoppedError,
    StoreError,
    StoreUnavailableError,
)
from .events import ElectionError, EventPublisher, LeadershipAcquired, LeadershipLost, LossReason
from .retry import Backoff, as_backoff
from .status import CandidateStatus, Record
from .stores._checks import check_candidacy, check_float
from .stores.base import Lease, Store, now

__all__ = ["Candidate"]

log = logging.getLogger(__name__)

#: Seconds a release may take before it is abandoned: the store then frees the key by TTL.
RELEASE_TIMEOUT = 10.0
#: First pause before a failed release is tried again (doubling up to RELEASE_RETRY_MAX): a
#: transient refusal is retried within a few round trips, while the next winner waits.
RELEASE_RETRY_DELAY = 0.05
RELEASE_RETRY_MAX = 1.0
#: Seconds a step-down waits for duties to die and LeadershipLost subscribers to return
#: before the key is released anyway (a stuck duty is logged as such).
STEP_DOWN_GRACE = 5.0
#: Seconds stop() waits for the campaign to step down and release before killing it.
STOP_TIMEOUT = STEP_DOWN_GRACE + RELEASE_TIMEOUT + 5.0


class _Woken(BaseException):
    """Thrown into a renewal in flight when the candidate is woken (stop, resign, loss)."""


class Candidate:
    """Runs ``node`` for election on ``key`` in ``store``.

    :param ttl: seconds the store keeps the key after the last renewal; a crashed leader is
        replaced after about this long.
    :param renew_deadline: seconds after the last confirmed renewal at which this candidate
        stops considering itself leader; default two thirds of ``ttl``.
    :param renew_interval: seconds between renewals; default a third of ``renew_deadline``.
        Failed renewals are retried every ``renew_interval / 4`` until the deadline.
    :param resign_holdoff: seconds to stand aside after :meth:`resign` before campaigning
        again, so that a waiting candidate takes over.
    :param retry: campaign forever: on a store error, step down if leading, publish a
        non-fatal :class:`~greenleader.events.ElectionError`, wait a jittered exponential
        backoff (``True`` for the default :class:`~greenleader.retry.Backoff`) and campaign
        again. Without it, the first store error ends the campaign (on ``errors``).
        Permission errors always end it: retrying cannot fix them.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        node: str,
        ttl: float = 15.0,
        *,
        renew_deadline: float | None = None,
        renew_interval: float | None = None,
        resign_holdoff: float = 0.5,
        retry: Backoff | bool | None = None,
    ) -> None:
        # Checked once, here: the store's acquire() is called with these values and does not check.
        self.store, self.key, self.node, self.ttl = check_candidacy(store, key, node, ttl)
        if renew_deadline is None:
            renew_deadline = self.ttl * 2 / 3
        self.renew_deadline = check_float("renew_deadline", renew_deadline, minimum=0.0, inclusive=False)
        if self.renew_deadline >= self.ttl:
            raise InvalidArgumentError(
                f"renew_deadline ({self.renew_deadline:g}s) must be shorter than ttl ({self.ttl:g}s)"
            )
        if renew_interval is None:
            renew_interval = self.renew_deadline / 3
        self.renew_interval = check_float("renew_interval", renew_interval, minimum=0.0, inclusive=False)
        if self.renew_interval >= self.renew_deadline:
            raise InvalidArgumentError(
                f"renew_interval ({self.renew_interval:g}s) must be shorter than "
                f"renew_deadline ({self.renew_deadline:g}s), or a single late renewal loses leadership"
            )
        self.resign_holdoff = check_float("resign_holdoff", resign_holdoff, minimum=0.0, maximum=3600.0)
        self.retry = as_backoff(retry)

        self._channels: Channels | None = None
        self._greenlet: Greenlet | None = None
        self._publisher = EventPublisher()
        self._not_leading = Event()
        self._not_leading.set()
        self._stopping = Event()  # set by stop(): ends every wait of the campaign
        self._acquiring: Greenlet | None = None
        self._teardowns: set[Greenlet] = set()  # step-downs and releases in flight
        #: Called in the teardown greenlet after each step-down, before the release (duties).
        self._step_down_hooks: list[Callable[[], None]] = []
        self._lease: Lease | None = None
        self._ended: Lease | None = None  # the last lease whose tenure _end_tenure ended
        #: When the store may give the last tenure's key to another (its last confirmation + ttl,
        #: on this process's monotonic clock; never, for a store that holds until the release):
        #: a step-down hook's work must be over by then.
        self._held_until = 0.0
        # Where the keepalive waits, for _wake_up: the next renewal (a waiter), or a renewal.
        self._woken = False
        self._sleeping: Waiter | None = None
        self._renewing = False
        self._leading = False
        self._deadline = 0.0
        self._lost = False
        self._resigning = False
        self._stopped = False
        self._inert = False  # a forked child's copy
        #: Observations for status() and metrics only: nothing in the campaign reads them.
        self._record = Record(store.backend, self.key, self.node)
        _fork.register(self)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "leader" if self.is_leader() else "candidate"
        return f"<Candidate key={self.key!r} node={self.node!r} {state}>"

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- public API ---------------------------------------------------------------------

    def run_for_election(self) -> tuple[Queue[bool], Queue[BaseException]]:
        """Start campaigning; return the ``(elected, errors)`` queues.

        ``elected`` gets ``False`` first, then ``True`` on each win and ``False`` on each
        step-down (resign, stop, loss). ``errors`` gets the error that ended the campaign.
        Both queues end (``StopIteration``) when the campaign ends. Calling this again while
        running returns the same queues.
        """
        if self._stopped:
            raise StoppedError(f"{self!r} was stopped; make a new Candidate")
        if self._channels is None:
            self._channels = Channels()
            self._channels.put(False)
            self._greenlet = gevent.spawn(self._campaign)
        return self._channels.results, self._channels.errors

    def is_leader(self) -> bool:
        """True while this candidate leads and its renew deadline has not passed."""
        return self._leading and now() < self._deadline

    @property
    def term(self) -> int | None:
        """Fencing term of the current tenure (increases with every win on this key), or None."""
        lease = self._lease
        return lease.term if lease is not None and self.is_leader() else None

    def status(self) -> CandidateStatus:
        """What this candidate is doing: its state (see :mod:`greenleader.status`), tenure,
        counters and the store's health as its own store calls saw it. Read-only; never blocks."""
        record = self._record
        if self._stopped or (self._greenlet is not None and self._greenlet.dead):
            state = "stopped"
        elif self._channels is None:
            state = "waiting"
        elif self.is_leader():
            state = "leading"
        else:
            state = record.pause or "campaigning"
        return CandidateStatus(self.key, self.node, state, self.is_leader(), self.term, record.transitions,
                               dict(record.losses), record.health())

    def resign(self) -> None:
        """Step down now and campaign again after ``resign_holdoff``. Does nothing when not leading.

        Returns once this candidate no longer leads; the key is released right after, from a
        greenlet that :meth:`stop` waits for.
        """
        if not self._leading or self._stopped:
            return
        self._resigning = True
        self._wake_up()
        if gevent.getcurrent() is not self._greenlet:
            self._not_leading.wait(timeout=self.ttl)

    def stop(self) -> None:
        """Stop campaigning, step down, release the key and end both queues. Idempotent.

        Waits (bounded) until the release has finished; so does every concurrent call. Called from this candidate's own
        event subscriber or duty-teardown path it cannot wait for itself: it then returns at
        once and the step-down and release complete in the background.
        """
        greenlet = self._greenlet
        current = gevent.getcurrent()
        if greenlet is None or current is greenlet or current in self._teardowns or self._publisher.is_current():
            self._stopped = True
            self._stopping.set()
            self._wake_up()
            return
        self._stop_soon()
        greenlet.join(timeout=STOP_TIMEOUT)
        if not greenlet.dead:
            log.warning("%r: the campaign did not end within %gs; killing it", self, STOP_TIMEOUT)
            greenlet.kill(block=True, timeout=1)
        gevent.joinall(list(self._teardowns), timeout=RELEASE_TIMEOUT + STEP_DOWN_GRACE)
        if self._channels is not None:
            self._channels.close()  # in case the greenlet was killed before it ever ran
        self._publisher.join(timeout=1)

    # -- the campaign greenlet ------------------------------------------------------------

    def _campaign(self) -> None:
        channels = self._channels
        assert channels is not None
        error: BaseException | None = None
        delays = self.retry.delays() if self.retry else None
        try:
            while not self._stopped:
                try:
                    lease = self._acquire()
                    if lease is None:
                        break  # stopped while waiting
                    if self.retry:
                        delays = self.retry.delays()
                    reason = self._hold(lease)
                except StoreError as exc:
                    self._record.failed(exc)
                    if delays is None or isinstance(exc, PermissionDeniedError):
                        raise
                    delay = next(delays)
                    log.warning("%r: store error, campaigning again in %.1fs: %s", self, delay, exc)
                    self._publisher.publish(ElectionError(self, self.key, exc, fatal=False))
                    self._record.paused("backing off")
                    self._stopping.wait(delay)
                    self._record.paused(None)
                    continue
                if reason is LossReason.RESIGNED:
                    self._record.paused("waiting")
                    self._stopping.wait(self.resign_holdoff)
                    self._record.paused(None)
        except GreenletExit:
            self._stopped = True  # killed from outside: the campaign is over
        except GreenleaderError as exc:
            error = exc
        except Exception as exc:
            log.exception("%r: unexpected error", self)
            error = StoreError(f"unexpected error from the {self.store.backend} store: {exc!r}")
            error.__cause__ = exc
            self._record.failed(error)
        finally:
            if not self._inert:
                if error is not None:
                    log.error("%r: campaign ended: %s", self, error)
                    channels.fail(error)
                    self._publisher.publish(ElectionError(self, self.key, error))
                channels.close()

    def _acquire(self) -> Lease | None:
        """Wait for the key, or for stop(); None when stopped first.

        The store's ``acquire`` runs in a greenlet of its own, so that a stop() or a kill
        landing just as the store hands over a lease cannot lose it: a lease won by then is
        released, not leaked.
        """
        self._acquiring = acquiring = spawn(self.store.acquire, self.key, self.node, self.ttl)
        try:
            gevent.wait([acquiring, self._stopping], count=1)
        except BaseException:
            self._withdraw(acquiring)
            raise
        if self._stopped:
            self._withdraw(acquiring)
            return None
        self._acquiring = None
        result = acquiring.value
        if isinstance(result, Lease):
            self._record.contact()
            return result
        if isinstance(result, Exception):
            raise result
        # The store let a GreenletExit (or the like) out without being stopped: a lost wait.
        raise StoreUnavailableError(f"waiting for the key was interrupted: {result!r}")

    def _withdraw(self, acquiring: Greenlet) -> None:
        """Stop waiting for the key (killed, the store's acquire withdraws the candidacy); end
        the tenure, releasing the key, if it was won meanwhile."""
        abandon(acquiring, lambda won: self._end_tenure(won, LossReason.STOPPED),
                is_product=lambda value: isinstance(value, Lease))
        self._acquiring = None

    def _hold(self, lease: Lease) -> LossReason:
        """Lead with ``lease`` until resign, stop, loss or the deadline; return why it ended.

        Every way out, an exception or a kill included, goes through :meth:`_end_tenure`:
        step down first, release after.
        """
        self._lease = lease
        self._lost = False
        self._resigning = False
        lease.on_lost = lambda: self._on_lost(lease)
        if lease.lost_reported:  # lost between the win and now
            self._on_lost(lease)
        reason = LossReason.STOPPED
        try:
            reason = self._keep_alive(lease)
        except GreenletExit:
            reason = LossReason.STOPPED
            raise
        except BaseException:
            reason = LossReason.STORE_ERROR
            raise
        finally:
            self._end_tenure(lease, reason)
        return reason

    def _keep_alive(self, lease: Lease) -> LossReason:
        """Renew ``lease`` on schedule while leading; raise StoreError past the deadline."""
        self._deadline = lease.confirmed_at + self.renew_deadline
        if self._lost:
            return LossReason.EXPIRED  # lost between the win and now
        if now() >= self._deadline:
            return LossReason.DEADLINE  # the win is already stale; campaign again
        self._step_up(lease)
        next_renewal = lease.confirmed_at + self.renew_interval
        while True:
            self._sleep(next_renewal - now())
            self._woken = False
            if self._lease is not lease:  # the tenure was ended by stop() (_end_tenure_here)
                return LossReason.STOPPED
            if self._lost:  # (the loss also zeroed the deadline)
                return LossReason.EXPIRED
            if now() >= self._deadline:  # checked first: after a blocked hub, nothing else may run
                return LossReason.DEADLINE
            if self._stopped:
                return LossReason.STOPPED
            if self._resigning:
                return LossReason.RESIGNED
            if now() < next_renewal:
                continue
            started = now()
            try:
                if not self._renew(lease, self._deadline - started):
                    continue  # woken during the renewal: stop, resign or loss comes first
            except LeadershipLostError as exc:
                self._record.contact()  # the store answered: the loss shows in the losses
                log.info("%r: lost the key: %s", self, exc)
                return LossReason.EXPIRED
            except StoreError as exc:
                self._record.failed(exc)
                retry_at = now() + self.renew_interval / 4
                if retry_at >= self._deadline:
                    raise
                log.warning("%r: renewal failed, retrying until the deadline: %s", self, exc)
                next_renewal = retry_at
                continue
            self._record.renewed(now() - started)
            if self._lost:
                continue
            self._deadline = lease.confirmed_at + self.renew_deadline
            next_renewal = started + self.renew_interval

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` for the next renewal, or until woken (:meth:`_wake_up`).

        A loop timer switches back here; an ``Event.wait(timeout)`` would raise a Timeout into
        the wait instead, which costs 3 to 5 times as much (36 against 7-12 us on a loaded
        2-core box), and 1,000 leaders wait 300 times a second at the default TTL."""
        if self._woken:
            return
        hub = gevent.get_hub()
        waiter = Waiter(hub)
        timer = hub.loop.timer(max(0.0, seconds))
        timer.start(waiter.switch, None)
        self._sleeping = waiter
        try:
            waiter.get()
        finally:
            self._sleeping = None
            timer.close()

    def _renew(self, lease: Lease, timeout: float) -> bool:
        """Renew ``lease`` within ``timeout``; False if woken first (the renewal is abandoned).

        The renewal runs here, in the campaign greenlet, with no greenlet of its own (a spawn
        and a wait per renewal were half the cost of 1,000 idle leaders). A loss reported
        meanwhile, a stop or a resign still does not wait for its round trip:
        :meth:`_wake_up` throws :class:`_Woken` into it, as the timeout throws a
        :class:`gevent.Timeout` at ``timeout``: either ends the store's call where it waits,
        as a kill would."""
        timer = gevent.Timeout(max(0.0, timeout))
        started = now()
        self._renewing = True
        timer.start()
        try:
            lease.renew()
        except _Woken:
            return False
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise StoreError("renewal timed out") from None
        finally:
            self._renewing = False  # (no switch from the call's end to here: nothing is thrown in after it)
            timer.close()
        if now() - started >= timeout:
            # A store swallowed the timeout (stores/base.py forbids it) and came back late:
            # is_leader() turned False at the deadline, and no renewal may turn it back.
            raise StoreError("renewal timed out")
        return True

    def _wake_up(self) -> None:
        """Wake the campaign greenlet (a stop, resign or loss): out of its wait for the next
        renewal, or out of a renewal in flight, which is abandoned."""
        self._woken = True
        if (self._sleeping is not None or self._renewing) and gevent.getcurrent() is not self._greenlet:
            gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self) -> None:
        """In the hub: resume the campaign greenlet if it still waits where it was woken."""
        greenlet = self._greenlet
        if greenlet is None or greenlet.dead:
            return
        if self._sleeping is not None:
            self._sleeping.switch(None)
        elif self._renewing:  # still in that renewal: it clears the flag as it ends, without a switch
            self._renewing = False  # thrown once
            greenlet.throw(_Woken)

    def _on_lost(self, lease: Lease) -> None:
        """The store says ``lease`` is gone: stop leading at once, without a greenlet switch.

        ``is_leader()`` turns False here; the step-down (events, duties) follows as soon as the
        campaign greenlet runs, even if a renewal is on the wire."""
        if lease is not self._lease:
            return  # news of an earlier tenure
        self._lost = True
        self._deadline = 0.0
        self._wake_up()

    def _stop_soon(self) -> None:
        """What :meth:`stop` does before it waits; never blocks, so that ``greenleader run``
        calls it from the hub (its command's exit) and then :meth:`stop` to wait. Not from the
        campaign, a teardown or a subscriber (stop() handles those)."""
        self._stopped = True
        self._stopping.set()
        if self._sleeping is not None:
            try:
                self._end_tenure_here()
            except Exception:  # (a failing step-down: the campaign's own path reports it no better)
                log.exception("%r: stepping down on stop failed; the key is left to its TTL", self)
        self._wake_up()

    def _end_tenure_here(self) -> None:
        """stop() while the campaign waits for its next renewal: end the tenure from the caller.

        The step-down and the start of the release are the campaign greenlet's own
        (:meth:`_end_tenure`), in the same order, just run here, without waking the campaign
        greenlet first: on the path of a handover that wake-up (a hub callback, a switch into
        the campaign and back out of its wait, then a switch into the teardown) cost ~0.1-0.2
        ms of a cold process's CPU. The campaign greenlet, woken next, finds its tenure over.

        Only a tenure that is still sound ends here as STOPPED: one already lost, or past its
        renew deadline, is left to the campaign greenlet, which reports why (EXPIRED, DEADLINE)."""
        lease = self._lease
        if lease is not None and self.is_leader() and not self._inert:  # (a loss zeroes the deadline)
            self._end_tenure(lease, LossReason.STOPPED, join=False)

    def _step_up(self, lease: Lease) -> None:
        self._leading = True
        self._not_leading.clear()
        log.info("%r: elected with term %d", self, lease.term)
        assert self._channels is not None
        self._channels.put(True)
        self._publisher.publish(LeadershipAcquired(self, self.key, self.node, lease.term))
        self._record.stepped_up(lease.term)

    def _end_tenure(self, lease: Lease, reason: LossReason, join: bool = True) -> None:
        """Step down, then release ``lease`` from a greenlet that nothing kills half-way; with
        ``join``, wait for it. Once per lease: a tenure already ended is left alone.

        The step-down never yields to other greenlets, so no kill can land in its middle:
        when it returns, ``is_leader()`` is False, False is on ``elected`` and
        ``LeadershipLost`` is queued. The teardown greenlet then stops the duties and waits
        for the event's subscribers (both bounded), and only then releases the key.

        The teardown greenlet is spawned just before the step-down (nothing yields in between,
        so it cannot start before the step-down is done): it then runs before the greenlets
        that the step-down wakes (the readers of ``elected``), which saved ~0.1-0.2 ms before
        the release request on the path of a handover.
        """
        self._resigning = False
        if lease is self._ended:
            return  # ended by stop() (_end_tenure_here), whose teardown releases it
        self._ended = lease
        if self._inert:
            lease.abandon()  # won in a forked child by a wake-up pending at the fork
            return
        delivery: list[Event | None] = []  # the LeadershipLost delivery, once stepped down
        teardown = gevent.spawn(self._teardown, lease, delivery)
        self._teardowns.add(teardown)
        teardown.link(self._teardowns.discard)
        delivery.append(self._step_down(lease, reason))
        if join:
            teardown.join()

    def _step_down(self, lease: Lease, reason: LossReason) -> Event | None:
        """Stop leading at once (no greenlet switch); return the LeadershipLost delivery."""
        self._lease = None
        if not self._leading:
            return None
        self._leading = False
        self._deadline = 0.0
        self._held_until = math.inf if self.store.holds_until_released else lease.confirmed_at + self.ttl
        log.info("%r: stepped down from term %d: %s", self, lease.term, reason.value)
        assert self._channels is not None
        self._channels.put(False)
        delivered = self._publisher.publish(LeadershipLost(self, self.key, self.node, lease.term, reason))
        self._not_leading.set()
        self._record.stepped_down(lease.term, reason)
        return delivered

    def _teardown(self, lease: Lease, delivery: list[Event | None]) -> None:
        if not delivery:  # the step-down raised: no release without it (the store's TTL frees the key)
            log.error("%r: the step-down from term %d failed; the key is not released", self, lease.term)
            return
        lost_delivered = delivery[0]
        if lost_delivered is not None:
            for hook in list(self._step_down_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("%r: step-down hook %r failed", self, hook)
            if not lost_delivered.wait(timeout=STEP_DOWN_GRACE):
                log.error("%r: LeadershipLost subscribers still running after %gs; releasing anyway",
                          self, STEP_DOWN_GRACE)
        if not self._inert:
            self._release(lease)

    def _release(self, lease: Lease) -> None:
        """Give the key up, bounded in time. A failed release is tried again (releases are
        idempotent) until the bound; a lease that still could not be released is abandoned, so
        that nothing local (a lock file's descriptor, a ZooKeeper session's node) keeps holding
        the key for as long as this process lives: the store frees it by its TTL at the latest."""
        deadline = now() + min(self.ttl, RELEASE_TIMEOUT)
        delay = RELEASE_RETRY_DELAY
        released = False
        try:
            while True:
                try:
                    with gevent.Timeout(max(deadline - now(), 0.001), StoreError("release timed out")):
                        lease.release()
                except PermissionDeniedError as exc:  # trying again would be refused again
                    self._record.failed(exc)
                    log.warning("%r: could not release the key: %s", self, exc)
                    break
                except (StoreError, GreenleaderError) as exc:
                    self._record.failed(exc)
                    log.warning("%r: could not release the key: %s", self, exc)
                except GreenletExit:
                    # Out of the store's call: nothing kills a teardown greenlet but a fork,
                    # which leaves this candidate inert.
                    if self._inert:
                        raise
                    self._record.failed(StoreError("the release was interrupted"))
                    log.warning("%r: the release was interrupted (GreenletExit out of the store)", self)
                except Exception as exc:
                    self._record.failed(exc)
                    log.exception("%r: unexpected error releasing the key", self)
                else:
                    self._record.contact()
                    released = True
                    return
                if now() + delay >= deadline:
                    break
                gevent.sleep(delay)
                delay = min(delay * 2, RELEASE_RETRY_MAX)
            log.warning("%r: giving the release up; the key is freed by the store's TTL at the latest", self)
        finally:
            if not released and not self._inert:
                lease.abandon()  # local, never switches: safe however this greenlet is leaving

    # -- fork ---------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child: lead nothing, report nothing, renew and release nothing."""
        self._inert = True
        self._stopped = True
        self._sleeping, self._renewing = None, False
        self._leading = False
        self._deadline = 0.0
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.abandon()
        self._publisher.discard()
        for greenlet in (self._greenlet, self._acquiring, *self._teardowns):
            if greenlet is not None:
                greenlet.kill(block=False)
        if self._channels is not None:
            self._channels.close()
        self._not_leading.set()
