"""The keepalive's renewal, on every store: it runs in the campaign greenlet, yet nothing waits
for a renewal that hangs.

A renewal on the wire when the candidate resigns, is stopped or hears from the store that its
hold is gone is abandoned at once: the tenure ends for that reason (RESIGNED, STOPPED, EXPIRED),
not at the renew deadline for a "renewal timed out" (STORE_ERROR), and the store's call ends
then, not when its reply comes. The renewal here hangs for an hour and the renew deadline is
20 s away, so the reason alone tells the two apart: no wall-clock margin is asserted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import gevent
import pytest
import zope.event

from greenleader import Candidate
from greenleader.events import LeadershipLost, LossReason
from greenleader.stores.base import Lease
from greenleader.testing import Fault, FaultyStore
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(300)

#: Long enough that the renew deadline (two thirds of it) is far beyond any wait below.
TTL = 30.0
#: A renewal every 2 s: one is soon on the wire.
RENEW_INTERVAL = 2.0


@pytest.fixture
def losses(key: str) -> Iterator[list[LeadershipLost]]:
    found: list[LeadershipLost] = []

    def record(event: object) -> None:
        if isinstance(event, LeadershipLost) and event.key == key:
            found.append(event)

    zope.event.subscribers.append(record)
    yield found
    zope.event.subscribers.remove(record)


def _keeping_leases(inner: object) -> tuple[FaultyStore, list[Lease]]:
    """A FaultyStore over ``inner`` and the list of every lease its acquire returns."""
    store = FaultyStore(inner)  # type: ignore[arg-type]
    leases: list[Lease] = []
    acquire = store.acquire

    def acquire_and_keep(*args: object) -> Lease:
        lease = acquire(*args)  # type: ignore[arg-type]
        leases.append(lease)
        return lease

    store.acquire = acquire_and_keep  # type: ignore[method-assign]
    return store, leases


@pytest.mark.parametrize("how, reason", [("resign", LossReason.RESIGNED), ("stop", LossReason.STOPPED),
                                         ("loss", LossReason.EXPIRED)])
def test_a_hanging_renewal_does_not_delay_a_resign_stop_or_loss(make_store, key, how, reason, losses) -> None:
    store, leases = _keeping_leases(make_store())
    alice = Candidate(store, key, "alice", ttl=TTL, renew_interval=RENEW_INTERVAL, resign_holdoff=3600)
    try:
        elected, _ = alice.run_for_election()
        assert next_item(elected, 60, "alice's first item") is False
        assert next_item(elected, 60, "alice to win") is True
        store.add_fault(Fault("renew", None, times=1, delay=3600.0))
        wait_until(lambda: any(c.primitive == "renew" and c.ended is None for c in store.history), 30,
                   "a renewal to hang")
        if how == "resign":
            alice.resign()
        elif how == "stop":
            alice.stop()
        else:
            leases[-1].notify_lost()  # what a store does when its watch sees the hold go
        assert not alice.is_leader()
        wait_until(lambda: losses, 10, "alice's LeadershipLost")
        assert [e.reason for e in losses] == [reason], (
            f"the tenure ended by {[e.reason for e in losses]}, not {reason}: the hanging renewal was waited for")
        wait_until(lambda: all(c.ended is not None for c in store.history if c.primitive == "renew"), 10,
                   "the hanging renewal to be abandoned")
    finally:
        alice.stop()


def test_a_renewal_that_comes_back_past_its_deadline_still_ends_the_tenure(make_store, key, ttl, losses) -> None:
    """A store that swallows the candidate's Timeout (a bug the store contract forbids, made
    here on purpose) and then renews: the renewal comes back after the renew deadline, when
    is_leader() has already turned False. The tenure must end ("renewal timed out"), not come
    back to life: is_leader() never turns True again without a new win (review: a PostgreSQL
    reconnect that caught every Timeout revived a deposed leader 20 ms after its deadline)."""
    store, leases = _keeping_leases(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl)
    revived: list[float] = []
    sampler = None
    try:
        elected, _ = alice.run_for_election()
        assert next_item(elected, 3 * ttl, "alice's first item") is False
        assert next_item(elected, 3 * ttl, "alice to win") is True
        lease = leases[-1]
        renew = lease.renew

        def swallowing_renew() -> None:
            lease.renew = renew  # type: ignore[method-assign]  # once
            with contextlib.suppress(gevent.Timeout):  # the bug: the candidate's deadline swallowed
                gevent.sleep(3 * ttl)
            renew()

        lease.renew = swallowing_renew  # type: ignore[method-assign]

        def sample() -> None:
            was = True
            while True:
                leading = alice.is_leader()
                if leading and not was:
                    revived.append(time.monotonic())
                was = leading
                gevent.sleep(0.001)

        sampler = gevent.spawn(sample)
        assert next_item(elected, 3 * ttl, "alice to step down") is False
        assert not alice.is_leader()
        wait_until(lambda: losses, 10, "alice's LeadershipLost")
        assert [e.reason for e in losses] == [LossReason.STORE_ERROR], losses
        assert not revived, "is_leader() turned True again after the renew deadline, with no new win"
    finally:
        if sampler is not None:
            sampler.kill()
        alice.stop()
