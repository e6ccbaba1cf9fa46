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
from collections.abc import Callable

import gevent
from gevent import Greenlet, GreenletExit
from gevent.event import Event
from gevent.queue import Queue

from ._channels import Channels
from .errors import (
    GreenleaderError,
    InvalidArgumentError,
    LeadershipLostError,
    PermissionDeniedError,
    StoppedError,
    StoreError,
)
from .events import ElectionError, EventPublisher, LeadershipAcquired, LeadershipLost, LossReason
from .retry import Backoff, as_backoff
from .stores.base import Lease, Store, check_float, check_text, now

__all__ = ["Candidate"]

log = logging.getLogger(__name__)


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
        if not isinstance(store, Store):
            raise InvalidArgumentError(f"store must be a greenleader Store, not {type(store).__name__}")
        self.store = store
        self.key = store.validate_key(key)
        self.node = check_text("node", node)
        self.ttl = store.validate_ttl(ttl)
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
        self._wake = Event()
        self._not_leading = Event()
        self._not_leading.set()
        self._lease: Lease | None = None
        self._leading = False
        self._deadline = 0.0
        self._holding = False  # True while keeping a won key alive (not campaigning)
        self._lost = False
        self._resigning = False
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "leader" if self.is_leader() else "candidate"
        return f"<Candidate key={self.key!r} node={self.node!r} {state}>"

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- public API ---------------------------------------------------------------------

    def run_for_election(self) -> tuple[Queue, Queue]:
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

    def resign(self) -> None:
        """Step down now and campaign again after ``resign_holdoff``. Does nothing when not leading."""
        if not self._leading or self._stopped:
            return
        self._resigning = True
        self._wake.set()
        if gevent.getcurrent() is not self._greenlet:
            self._not_leading.wait(timeout=self.ttl)

    def stop(self) -> None:
        """Stop campaigning, release the key and end both queues. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        greenlet = self._greenlet
        if greenlet is None or greenlet is gevent.getcurrent():
            return
        if not self._holding:
            greenlet.kill(block=False)  # withdraw from a campaign that is still waiting
        greenlet.join(timeout=self.ttl)
        if not greenlet.dead:
            log.warning("%r: releasing took over %gs; abandoning it", self, self.ttl)
            greenlet.kill(block=True, timeout=1)
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
                    self._lease = self._acquire()
                    if self.retry:
                        delays = self.retry.delays()
                    self._hold(self._lease)
                except StoreError as exc:
                    if delays is None or isinstance(exc, PermissionDeniedError):
                        raise
                    self._step_down(LossReason.STORE_ERROR)
                    delay = next(delays)
                    log.warning("%r: store error, campaigning again in %.1fs: %s", self, delay, exc)
                    self._publisher.publish(ElectionError(self, self.key, exc, fatal=False))
                    gevent.sleep(delay)
                    continue
                finally:
                    self._lease = None
                if self._resigning and not self._stopped:
                    self._resigning = False
                    gevent.sleep(self.resign_holdoff)
        except GreenletExit:
            pass
        except GreenleaderError as exc:
            error = exc
        except Exception as exc:
            log.exception("%r: unexpected error", self)
            error = StoreError(f"unexpected error from the {self.store.backend} store: {exc!r}")
            error.__cause__ = exc
        finally:
            self._step_down(LossReason.STORE_ERROR if error else LossReason.STOPPED)
            if error is not None:
                log.error("%r: campaign ended: %s", self, error)
                channels.fail(error)
                self._publisher.publish(ElectionError(self, self.key, error))
            channels.close()

    def _acquire(self) -> Lease:
        """Wait for the key in a greenlet of its own, so that a stop() landing just as the store
        hands over a lease cannot lose it: the won lease is then released, not leaked."""
        acquiring = gevent.spawn(_outcome, self.store.acquire, self.key, self.node, self.ttl)
        try:
            outcome = acquiring.get()
        except BaseException:
            acquiring.kill()
            if acquiring.successful() and isinstance(acquiring.value, Lease):
                self._release(acquiring.value)
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive until resign, stop or loss; raise StoreError past the deadline.

        The key is released on every way out, even a loss: the store may still hold it.
        """
        self._holding = True
        self._lost = False
        lease.on_lost = self._on_lost
        try:
            self._deadline = lease.confirmed_at + self.renew_deadline
            if now() >= self._deadline:
                return  # the win is already stale; campaign again
            self._step_up(lease)
            next_renewal = lease.confirmed_at + self.renew_interval
            while True:
                self._wake.wait(timeout=max(0.0, next_renewal - now()))
                self._wake.clear()
                if now() >= self._deadline:  # checked first: after a blocked hub, nothing else may run
                    self._step_down(LossReason.DEADLINE)
                    return
                if self._stopped or self._resigning:
                    self._step_down(LossReason.STOPPED if self._stopped else LossReason.RESIGNED)
                    return
                if self._lost:
                    self._step_down(LossReason.EXPIRED)
                    return
                if now() < next_renewal:
                    continue
                started = now()
                try:
                    with gevent.Timeout(self._deadline - started, StoreError("renewal timed out")):
                        lease.renew()
                except LeadershipLostError as exc:
                    log.info("%r: lost the key: %s", self, exc)
                    self._step_down(LossReason.EXPIRED)
                    return
                except StoreError as exc:
                    retry_at = now() + self.renew_interval / 4
                    if retry_at >= self._deadline:
                        self._step_down(LossReason.STORE_ERROR)
                        raise
                    log.warning("%r: renewal failed, retrying until the deadline: %s", self, exc)
                    next_renewal = retry_at
                    continue
                self._deadline = lease.confirmed_at + self.renew_deadline
                next_renewal = started + self.renew_interval
        finally:
            self._holding = False
            self._release(lease)

    def _on_lost(self) -> None:
        self._lost = True
        self._wake.set()

    def _step_up(self, lease: Lease) -> None:
        self._leading = True
        self._not_leading.clear()
        log.info("%r: elected with term %d", self, lease.term)
        assert self._channels is not None
        self._channels.put(True)
        self._publisher.publish(LeadershipAcquired(self, self.key, self.node, lease.term))

    def _step_down(self, reason: LossReason) -> None:
        if not self._leading:
            return
        self._leading = False
        term = self._lease.term if self._lease is not None else 0
        log.info("%r: stepped down from term %d: %s", self, term, reason.value)
        assert self._channels is not None
        self._channels.put(False)
        self._publisher.publish(LeadershipLost(self, self.key, self.node, term, reason))
        self._not_leading.set()

    def _release(self, lease: Lease) -> None:
        """Give the key up, bounded in time; a failure only delays the next winner by the TTL."""
        try:
            with gevent.Timeout(min(self.ttl, 10.0), StoreError("release timed out")):
                lease.release()
        except (StoreError, GreenleaderError) as exc:
            log.warning("%r: could not release the key: %s", self, exc)
        except GreenletExit:
            raise
        except Exception:
            log.exception("%r: unexpected error releasing the key", self)


def _outcome(func: Callable[..., Lease], *args: object) -> Lease | Exception:
    """``func(*args)``, or the exception it raised: a greenlet dying of an exception would have
    gevent print its traceback, though the caller handles it."""
    try:
        return func(*args)
    except Exception as exc:
        return exc
