"""stop() of a leader waiting for its next renewal ends the tenure from the caller (or, for
``greenleader run``, from the hub) without waking the campaign greenlet first; on every store.

That shortcut must keep the contract of every other way out of a tenure (docs/safety.md): at
the instant the release request leaves, the candidate no longer leads, False is on ``elected``,
its duties are dead and every LeadershipLost subscriber has returned; the key is released
once, and the campaign and its queues end.
"""

from __future__ import annotations

import gevent
import gevent.monkey
import pytest
import zope.event

from greenleader import Candidate
from greenleader.duties import Duties
from greenleader.events import LeadershipLost, LossReason
from greenleader.stores.base import now
from greenleader.testing import Call, FaultyStore
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(180)

SLOW_SUBSCRIBER = 0.2  # seconds a LeadershipLost subscriber takes: the release must wait for it


class Witness:
    """Checks, when the release request is entered, that the step-down is complete."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.candidate: Candidate | None = None
        self.elected_seen: list[bool] = []
        self.duty_alive = False
        self.subscriber_returned: list[int] = []  # terms whose slow subscriber returned
        self.releases = 0
        self.violations: list[str] = []

    def on_call(self, call: Call) -> None:
        if call.primitive != "release" or self.candidate is None:
            return
        self.releases += 1
        if self.candidate.is_leader():
            self.violations.append("released while is_leader() was True")
        if self.duty_alive:
            self.violations.append("released while the duty ran")
        if call.term not in self.subscriber_returned:
            self.violations.append("released before the LeadershipLost subscriber returned")

    def subscriber(self, event: object) -> None:
        if isinstance(event, LeadershipLost) and event.key == self.key:
            gevent.sleep(SLOW_SUBSCRIBER)
            self.subscriber_returned.append(event.term)

    def duties(self) -> Duties:
        registry = Duties()

        @registry
        def duty(term: int) -> None:
            self.duty_alive = True
            try:
                while True:
                    gevent.sleep(0.01)
            finally:
                self.duty_alive = False

        return registry


def _sleeping_leader(make_store, key: str, ttl: float, witness: Witness, with_duty: bool):
    store = FaultyStore(make_store(), on_call=witness.on_call)
    alice = Candidate(store, key, "alice", ttl=ttl)
    witness.candidate = alice
    runner = witness.duties().run(alice) if with_duty else None
    elected, errors = alice.run_for_election()
    if with_duty:  # the runner reads elected
        wait_until(lambda: witness.duty_alive, 3 * ttl, "alice's duty to start")
    else:
        assert next_item(elected, 10, "alice's first item") is False
        assert next_item(elected, 3 * ttl, "alice's win") is True
    wait_until(lambda: alice._sleeping is not None, 10, "alice to wait for her next renewal")
    return alice, runner, elected, errors


@pytest.mark.parametrize("how", ["stop", "from the hub"])
@pytest.mark.parametrize("with_duty", [False, True], ids=["no duty", "a duty"])
def test_stop_of_a_waiting_leader_steps_down_and_waits_for_subscribers_before_it_releases(
        make_store, key, ttl, stopping, how, with_duty) -> None:
    witness = Witness(key)
    zope.event.subscribers.append(witness.subscriber)
    try:
        alice, runner, elected, errors = _sleeping_leader(make_store, key, ttl, witness, with_duty)
        if runner is not None:
            stopping.append(runner)
        stopping.append(alice)
        if how == "from the hub":  # as greenleader run does on its command's exit
            gevent.get_hub().loop.run_callback(alice._stop_soon)
            wait_until(lambda: not alice.is_leader(), 10, "alice to step down")
        alice.stop()
        assert not alice.is_leader()
        assert witness.releases == 1, f"{witness.releases} releases"
        assert not witness.violations, witness.violations
        if runner is None:
            assert list(elected) == [False]  # the step-down's False, then the end of the queue
        assert list(errors) == []
        assert alice._greenlet is not None and alice._greenlet.dead
        assert alice.status().losses == {LossReason.STOPPED.value: 1}
        assert make_store().leader(key) is None
    finally:
        zope.event.subscribers.remove(witness.subscriber)


def test_stop_of_a_waiting_leader_lets_the_next_candidate_win(make_store, key, ttl, stopping) -> None:
    witness = Witness(key)
    zope.event.subscribers.append(witness.subscriber)
    try:
        alice, _, _, _ = _sleeping_leader(make_store, key, ttl, witness, with_duty=False)
        bob = Candidate(make_store(), key, "bob", ttl=ttl)
        stopping.extend([alice, bob])
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, 10, "bob's first item") is False
        alice.stop()
        # The release, not the TTL, lets bob in (Consul's lock-delay spares released locks).
        assert next_item(bob_elected, 30, "bob to win after alice's release") is True
        assert not witness.violations, witness.violations
    finally:
        zope.event.subscribers.remove(witness.subscriber)


@pytest.mark.parametrize("how", ["lost", "past the deadline"])
def test_stop_of_a_tenure_already_lost_reports_why_it_ended(make_store, key, ttl, stopping, how) -> None:
    """The shortcut ends only a sound tenure as STOPPED: one the store reported lost, or past its
    renew deadline (a blocked hub), still steps down as EXPIRED or DEADLINE, which the losses
    and the LeadershipLost event report to operators."""
    witness = Witness(key)
    alice, _, _, _ = _sleeping_leader(make_store, key, ttl, witness, with_duty=False)
    stopping.append(alice)
    reasons: list[LossReason] = []
    zope.event.subscribers.append(lambda event: isinstance(event, LeadershipLost) and reasons.append(event.reason))
    try:
        if how == "lost":
            alice._lease.notify_lost()  # as a store reports a loss (the callback runs at once)
            expected = LossReason.EXPIRED
        else:
            lease = alice._lease
            blocking_sleep = gevent.monkey.get_original("time", "sleep")
            blocking_sleep(max(0.0, lease.confirmed_at + alice.renew_deadline - now()) + 0.1)  # the hub blocked
            expected = LossReason.DEADLINE
        assert not alice.is_leader()
        alice.stop()
        wait_until(lambda: reasons, 10, "the LeadershipLost event")
        assert reasons == [expected]
        assert alice.status().losses == {expected.value: 1}
    finally:
        zope.event.subscribers.pop()


def test_a_step_down_that_fails_in_stop_neither_escapes_nor_releases(make_store, key, ttl, stopping) -> None:
    """stop() of a waiting leader steps down in the caller (from the hub, for greenleader run):
    a step-down that raises (a publisher failing, here) is logged, never raised into the caller,
    and no release goes out after a step-down that did not finish; the campaign still ends."""
    witness = Witness(key)
    alice, _, _, _ = _sleeping_leader(make_store, key, ttl, witness, with_duty=False)
    stopping.append(alice)
    publish = alice._publisher.publish

    def failing(event: object) -> object:
        if isinstance(event, LeadershipLost):
            raise RuntimeError("a publisher that fails")
        return publish(event)

    alice._publisher.publish = failing
    alice.stop()
    assert not alice.is_leader()
    assert witness.releases == 0, "released after a step-down that did not finish"
    assert alice._greenlet is not None and alice._greenlet.dead
