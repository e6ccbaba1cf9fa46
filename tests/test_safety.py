"""Safety of the election state machine (docs/safety.md, rules 9-12), on every store.

Each test here reproduces one finding of the safety review (issue 10) and failed before its fix:

- a release in flight is finished, not killed, by a stop() (finding 1);
- every way out of a tenure steps down before the release request (finding 2);
- a forked child inherits no leadership (finding 4);
- a follower that cannot confirm the leader says it does not know (finding 7);
- a resign that races a store error does not end the next tenure (finding 9);
- stop() from an event subscriber does not wait for itself (finding 10).

The stores are real; :class:`greenleader.testing.FaultyStore` wraps them to inject the faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import gevent
import gevent.event
import gevent.os
import pytest
import zope.event
from gevent import GreenletExit

from greenleader import Backoff, Candidate, Follower
from greenleader.duties import Duties
from greenleader.errors import InvalidArgumentError, StoreUnavailableError
from greenleader.events import (
    EventPublisher,
    LeaderChanged,
    LeadershipAcquired,
    LeadershipEvent,
    LeadershipLost,
    LossReason,
)
from greenleader.testing import Call, FaultyStore
from tests.waiting import next_item, wait_until, wins

pytestmark = pytest.mark.timeout(180)



def holder(store, key: str) -> str | None:
    info = store.leader(key)
    return info.node if info is not None else None


class OverlapSampler:
    """Samples ``is_leader()`` of every candidate each millisecond; records any overlap."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        self.overlaps: list[tuple[float, list[str]]] = []
        self.last_leading: dict[str, float] = {}  # node -> the last sample that found it leading
        self.samples = 0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            leaders = [c.node for c in self.candidates if c.is_leader()]
            at = time.monotonic()
            for node in leaders:
                self.last_leading[node] = at
            if len(leaders) > 1:
                self.overlaps.append((at, leaders))
            self.samples += 1
            gevent.sleep(0.001)

    def stop(self, *, overlaps_allowed: bool = False) -> None:
        self._greenlet.kill()
        assert self.samples > 0, "the sampler never ran"
        if not overlaps_allowed:
            assert not self.overlaps, f"two leaders at once: {self.overlaps[:5]}"


# -- finding 1: a release in flight finishes -------------------------------------------------


def test_stop_right_after_resign_waits_for_the_release(make_store, key, ttl, stopping) -> None:
    """resign() returns at the step-down while the release is on the wire; a stop() right
    after must let it finish: once stop() returns, the store no longer names the resigner."""
    store = FaultyStore(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl)
    stopping.append(alice)
    wins(alice, 3 * ttl)
    store.delay_next("release", 0.3)  # a slow round trip keeps the release in flight
    alice.resign()
    alice.stop()
    releases = [call for call in store.history if call.primitive == "release"]
    assert releases and all(call.forwarded for call in releases), f"a release was cut short: {releases}"
    assert holder(make_store(), key) != "alice", "the store still names alice after stop() returned"


def test_next_candidate_wins_after_resign_then_stop(make_store, key, ttl, stopping) -> None:
    """The waiting candidate wins once alice resigns and stops, well before alice's hold
    could have expired (the release, not the TTL, lets bob in)."""
    alice = Candidate(FaultyStore(make_store()), key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    stopping.extend([alice, bob])
    wins(alice, 3 * ttl)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    alice.store.delay_next("release", 0.3)
    alice.resign()
    alice.stop()
    assert holder(make_store(), key) in (None, "bob")
    # Consul's lock-delay does not apply to a released lock; a TTL expiry would take ≥ ttl.
    assert next_item(bob_elected, 30, "bob to win after alice's release") is True


# -- finding 2: step down before the release, whatever ends the tenure -----------------------


class ReleaseWitness:
    """Checks, at the instant a release request is entered, that its candidate has already
    stepped down: is_leader() False, duties dead, False queued, LeadershipLost delivered."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.candidates: dict[str, Candidate] = {}
        self.duty_alive: dict[str, bool] = {}
        self.lost_delivered: dict[str, int] = {}
        self.violations: list[str] = []
        self.releases = 0

    def on_call(self, call: Call) -> None:
        if call.primitive != "release" or call.node not in self.candidates:
            return
        self.releases += 1
        candidate = self.candidates[call.node]
        if candidate.is_leader():
            self.violations.append(f"{call.node} released term {call.term} while is_leader() was True")
        if self.duty_alive.get(call.node):
            self.violations.append(f"{call.node} released term {call.term} while its duty ran")
        if self.lost_delivered.get(call.node) != call.term:
            self.violations.append(f"{call.node} released term {call.term} before LeadershipLost was delivered")

    def subscriber(self, event: object) -> None:
        if isinstance(event, LeadershipLost) and event.key == self.key:
            self.lost_delivered[event.node] = event.term

    def duties_for(self, node: str) -> Duties:
        registry = Duties()

        @registry
        def duty(term: int) -> None:
            self.duty_alive[node] = True
            try:
                while True:
                    gevent.sleep(0.01)
            finally:
                self.duty_alive[node] = False

        return registry


@pytest.mark.parametrize("error", [
    RuntimeError("a bug in the client"),
    InvalidArgumentError("the server refused the request (HTTP 400)"),
    OSError(5, "Input/output error"),
    StoreUnavailableError("the store went away"),
    GreenletExit(),
], ids=lambda e: type(e).__name__)
def test_a_failed_renewal_steps_down_before_it_releases(make_store, key, ttl, stopping, error) -> None:
    """Whatever a renewal raises, alice stops leading (and her duty dies, and her step-down is
    reported) before the release request leaves; bob, waiting, never leads at the same time."""
    witness = ReleaseWitness(key)
    zope.event.subscribers.append(witness.subscriber)
    try:
        store = FaultyStore(make_store(), on_call=witness.on_call)
        alice = Candidate(store, key, "alice", ttl=ttl, renew_interval=min(0.2, ttl / 5))
        bob = Candidate(make_store(), key, "bob", ttl=ttl)
        witness.candidates["alice"] = alice
        runner = witness.duties_for("alice").run(alice)
        stopping.extend([bob, runner])
        wait_until(alice.is_leader, 3 * ttl, "alice to lead")
        wait_until(lambda: witness.duty_alive.get("alice"), 10, "alice's duty to start")
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's first item") is False
        sampler = OverlapSampler([alice, bob])
        store.delay_next("release", 0.2)
        store.fail_next("renew", error)
        if isinstance(error, StoreUnavailableError):  # transient: retried until the deadline
            store.fail_when("renew", error, lambda call: True)
        wait_until(lambda: witness.releases > 0, 3 * ttl, "alice's release")
        assert next_item(bob_elected, 30, "bob to win") is True
        sampler.stop()
        assert not witness.violations, witness.violations
    finally:
        zope.event.subscribers.remove(witness.subscriber)


def test_killing_the_campaign_greenlet_steps_down_before_it_releases(make_store, key, ttl, stopping) -> None:
    witness = ReleaseWitness(key)
    zope.event.subscribers.append(witness.subscriber)
    try:
        store = FaultyStore(make_store(), on_call=witness.on_call)
        alice = Candidate(store, key, "alice", ttl=ttl)
        witness.candidates["alice"] = alice
        runner = witness.duties_for("alice").run(alice)
        stopping.append(runner)
        wait_until(lambda: witness.duty_alive.get("alice"), 3 * ttl, "alice's duty to start")
        store.delay_next("release", 0.2)
        alice._greenlet.kill(block=True, timeout=30)
        assert not alice.is_leader()
        assert witness.releases == 1, "the kill did not release the key"
        assert not witness.violations, witness.violations
        assert holder(make_store(), key) is None
    finally:
        zope.event.subscribers.remove(witness.subscriber)


# -- finding 4: fork ------------------------------------------------------------------------


def test_a_forked_child_inherits_no_leadership(kind, make_store, key, ttl, stopping) -> None:
    """The child of a process where alice leads and bob waits never leads, renews, withdraws or
    releases anything: alice keeps leading throughout, and once she stops, bob (in the parent)
    wins while the child still lives."""
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    follower = Follower(make_store(), key)
    stopping.extend([alice, bob, follower])
    wins(alice, 3 * ttl)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, 3 * ttl, "bob's first item") is False
    leaders, _ = follower.follow_election()
    assert next_item(leaders, 3 * ttl, "the follower to name alice") == "alice"
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: sample what the inherited objects say, until told to stop
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            report = {"leads": []}
            for _ in range(20):
                report["leads"].append(alice.is_leader() or bob.is_leader())
                gevent.sleep(alice.renew_interval / 4)
            report["terms"] = [alice.term, bob.term]
            os.write(to_parent_w, json.dumps(report).encode() + b"\n")
            _read_line(to_child_r)  # the parent stopped alice and bob won meanwhile
            code = 0
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    try:
        parent_samples = []
        reader = gevent.spawn(_read_line, to_parent_r)
        while not reader.ready():
            parent_samples.append(alice.is_leader())
            gevent.sleep(0.005)
        child = json.loads(reader.get(timeout=60))
        assert not any(child["leads"]), "an inherited candidate said it leads in the forked child"
        assert child["terms"] == [None, None]
        assert all(parent_samples) and alice.is_leader(), "the parent lost leadership to its child"
        alice.stop()
        # The child still lives: it must hold nothing that keeps the key, nor have withdrawn bob.
        assert next_item(bob_elected, 30, "bob to win in the parent") is True
        assert next_item(leaders, 30, "the follower to see the handover") in (None, "bob")
    finally:
        os.write(to_child_w, b"\n")
        _, status = os.waitpid(pid, 0)
        os.close(to_child_w)
        os.close(to_parent_r)
    assert os.waitstatus_to_exitcode(status) == 0


def _read_line(fd: int) -> str:
    """Read up to a newline without blocking the hub."""
    gevent.os.make_nonblocking(fd)
    data = b""
    while not data.endswith(b"\n"):
        chunk = gevent.os.nb_read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


# -- finding 7: unknown is not the last leader -----------------------------------------------


def test_a_follower_that_cannot_confirm_the_leader_says_it_does_not_know(
        make_store, key, ttl, stopping, events) -> None:
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    faulty = FaultyStore(make_store())
    follower = Follower(faulty, key, retry=Backoff(initial=30.0, maximum=60.0), unknown_after=0.5)
    stopping.extend([alice, follower])
    wins(alice, 3 * ttl)
    leaders, _ = follower.follow_election()
    assert next_item(leaders, 3 * ttl, "the follower to name alice") == "alice"
    assert follower.known

    outage = faulty.fail_when("leader", StoreUnavailableError("partitioned"), lambda call: True)
    watch_outage = faulty.fail_when("watch", StoreUnavailableError("partitioned"), lambda call: True)
    assert next_item(leaders, 30, "the follower to report the leader unknown") is None
    assert not follower.known
    assert follower.leader() is None
    assert follower.leader_info() is None
    wait_until(lambda: any(isinstance(e, LeaderChanged) and e.source is follower and not e.known for e in events),
               30, "a LeaderChanged event with known=False")

    faulty.remove_fault(outage)
    faulty.remove_fault(watch_outage)
    # The backoff is 15 s or more; the follower catches up sooner, through its checks.
    with gevent.Timeout(12.0, AssertionError("the follower did not catch up once the store answered")):
        while leaders.get() != "alice":  # a repeated None (still unknown) may come first
            pass
    assert follower.known and follower.leader() == "alice"


def test_a_quiet_watch_is_not_unknown(make_store, key, ttl, stopping) -> None:
    """A healthy store with nothing happening: the follower's checks keep confirming the leader."""
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    follower = Follower(make_store(), key, unknown_after=2.0)
    stopping.extend([alice, follower])
    wins(alice, 3 * ttl)
    leaders, _ = follower.follow_election()
    assert next_item(leaders, 3 * ttl, "the follower to name alice") == "alice"
    deadline = time.monotonic() + 3 * follower.unknown_after
    while time.monotonic() < deadline:
        assert follower.known and follower.leader() == "alice", "a quiet, healthy watch was reported unknown"
        gevent.sleep(0.05)
    assert leaders.empty(), f"the follower reported more: {list(leaders.queue)}"


# -- finding 9: a stale resign ---------------------------------------------------------------


def test_a_resign_that_races_a_store_error_does_not_end_the_next_tenure(make_store, key, ttl, stopping, events) -> None:
    store = FaultyStore(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl, retry=Backoff(initial=0.05, maximum=0.1), resign_holdoff=0)
    stopping.append(alice)
    wins(alice, 3 * ttl)
    # The next renewal hangs; resign meanwhile. (The campaign used to wait for the renewal to
    # time out at the deadline, a store error that skipped resetting the resign request.)
    store.add_fault(_hang("renew"))
    wait_until(lambda: any(c.primitive == "renew" and c.ended is None for c in store.history), 3 * ttl,
               "a renewal to hang")
    alice.resign()
    wait_until(lambda: len([e for e in events if isinstance(e, LeadershipAcquired)]) >= 2, 10 * ttl,
               "alice to win again after the store error")
    second = [e for e in events if isinstance(e, LeadershipAcquired)][1].term
    alice.stop()
    wait_until(lambda: any(isinstance(e, LeadershipLost) and e.term == second for e in events), 30,
               "the second tenure's LeadershipLost")
    ended = [e.reason for e in events if isinstance(e, LeadershipLost) and e.term == second]
    assert ended == [LossReason.STOPPED], f"the second tenure ended by {ended}: the stale resign request"


def _hang(primitive: str):
    from greenleader.testing import Fault
    return Fault(primitive, None, times=1, delay=3600.0)


# -- finding 10: stop() from a subscriber -----------------------------------------------------


def test_a_publisher_joined_from_its_own_subscriber_returns() -> None:
    publisher = EventPublisher()
    joined = gevent.event.Event()

    def subscriber(event: object) -> None:
        if getattr(event, "key", None) == "self-join":
            publisher.join()  # no timeout: waiting for itself would hang
            joined.set()

    zope.event.subscribers.append(subscriber)
    try:
        publisher.publish(LeadershipEvent(None, "self-join"))
        assert joined.wait(timeout=30), "a publisher joined from its subscriber waited for itself"
    finally:
        zope.event.subscribers.remove(subscriber)


def test_stop_from_a_subscriber_returns_and_the_key_is_released(make_store, key, ttl, stopping) -> None:
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    stopping.append(alice)
    stopped = gevent.event.Event()

    def subscriber(event: object) -> None:
        if isinstance(event, LeadershipAcquired) and event.source is alice:
            alice.stop()
            stopped.set()

    zope.event.subscribers.append(subscriber)
    try:
        alice.run_for_election()
        assert stopped.wait(timeout=3 * ttl + 10), "alice.stop() from her subscriber did not return"
        wait_until(lambda: holder(make_store(), key) is None, 30, "alice's key to be released")
    finally:
        zope.event.subscribers.remove(subscriber)


def test_follower_stop_from_a_subscriber_returns(make_store, key, ttl, stopping) -> None:
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    follower = Follower(make_store(), key)
    stopping.extend([alice, follower])
    stopped = gevent.event.Event()

    def subscriber(event: object) -> None:
        if isinstance(event, LeaderChanged) and event.source is follower and event.leader == "alice":
            follower.stop()
            stopped.set()

    zope.event.subscribers.append(subscriber)
    try:
        wins(alice, 3 * ttl)
        leaders, _ = follower.follow_election()
        assert stopped.wait(timeout=30), "follower.stop() from its subscriber did not return"
        assert list(leaders) == ["alice"]
    finally:
        zope.event.subscribers.remove(subscriber)


# -- found by the adversarial review of the fixes ---------------------------------------------


def test_a_loss_reported_during_a_renewal_ends_leadership_at_once(backend, make_store, key, ttl, stopping) -> None:
    """The store reports the loss (alice's lease or session is ended from outside) while a slow
    renewal is on the wire: alice stops leading when she hears of it, not when the renewal
    returns (before the fix, up to 290 ms beside bob).

    Ending a live holder's lease from outside is not an expiry: bob may win as soon as it is
    gone, and alice hears of it by her own watch, so the two may overlap for as long as that
    news takes to reach her (docs/safety.md, "Limits that remain"; CI saw it on etcd under
    load). What must not happen is alice leading on until the renewal's answer or her deadline."""
    inner = make_store()
    store = FaultyStore(inner)
    alice = Candidate(store, key, "alice", ttl=ttl, renew_interval=min(0.2, ttl / 5))
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    stopping.extend([alice, bob])
    wins(alice, 3 * ttl)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    sampler = OverlapSampler([alice, bob])
    delay = alice.renew_deadline * 0.9
    store.delay_next("renew", delay)
    wait_until(lambda: any(c.primitive == "renew" and c.ended is None for c in store.history), 3 * ttl,
               "a slow renewal to start")
    slow = next(c for c in store.history if c.primitive == "renew" and c.ended is None)
    # alice's next campaign waits, so that bob, not alice again, wins the key after its loss
    # (on Consul both wait out the lock-delay, and alice could win the race).
    store.delay_next("acquire", 120)
    backend.force_expire(inner, key)
    assert next_item(bob_elected, 3 * ttl + 30, "bob to win once alice's key was taken") is True
    wait_until(lambda: not any(c.primitive == "renew" and c.ended is None for c in store.history), 3 * ttl,
               "the slow renewal to end")
    sampler.stop(overlaps_allowed=True)
    losses = alice.status().losses
    if losses == {LossReason.EXPIRED.value: 1}:
        return  # ended by the store's news (any overlap was that news on its way to her)
    # The store sent no news (the file store: alice finds the loss at her next renewal), so her
    # deadline must have ended her tenure before bob could win.
    assert not sampler.overlaps, (
        f"alice's tenure ended as {losses}, not by the store's news of the loss, and she led beside "
        f"bob: {sampler.overlaps[:5]} ({sampler.last_leading['alice'] - slow.started:.3f}s into a renewal "
        f"delayed {delay:.3f}s)")


def test_a_duty_that_resigns_is_dead_before_the_release(make_store, key, ttl, stopping) -> None:
    witness = ReleaseWitness(key)
    zope.event.subscribers.append(witness.subscriber)
    try:
        store = FaultyStore(make_store(), on_call=witness.on_call)
        alice = Candidate(store, key, "alice", ttl=ttl, resign_holdoff=30)
        witness.candidates["alice"] = alice
        registry = Duties()
        runner = None

        @registry
        def resigning_duty(term: int) -> None:
            witness.duty_alive["alice"] = True
            try:
                runner.resign()
                gevent.sleep(3600)  # never reached: resigning from the duty ends it
            finally:
                witness.duty_alive["alice"] = False

        runner = registry.run(alice)
        stopping.append(runner)
        wait_until(lambda: witness.releases > 0, 3 * ttl + 10, "the resign's release")
        assert not witness.violations, witness.violations
        assert runner.running == []
    finally:
        zope.event.subscribers.remove(witness.subscriber)


def test_a_subscriber_that_lets_a_timeout_escape_does_not_stop_the_events(
        make_store, key, ttl, stopping, events, monkeypatch) -> None:
    """A subscriber lets a gevent.Timeout out: the others still get every event, and the release
    does not wait for a delivery that would never be confirmed."""
    from greenleader import candidate as candidate_module
    monkeypatch.setattr(candidate_module, "STEP_DOWN_GRACE", 60.0)  # a stall would be obvious
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    stopping.extend([alice, bob])

    def rude(event: object) -> None:
        if isinstance(event, (LeadershipAcquired, LeadershipLost)) and event.source is alice:
            raise gevent.Timeout(1)

    zope.event.subscribers.insert(0, rude)
    try:
        wins(alice, 3 * ttl)
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's first item") is False
        alice.resign()
        assert next_item(bob_elected, 30, "bob to win without waiting out the step-down grace") is True
        wait_until(lambda: any(isinstance(e, LeadershipLost) and e.source is alice for e in events), 30,
                   "LeadershipLost to reach the subscribers after the rude one")
    finally:
        zope.event.subscribers.remove(rude)


def test_runner_stop_from_a_subscriber_does_not_wait_for_its_own_event(
        make_store, key, ttl, stopping, monkeypatch) -> None:
    """alice's own LeadershipAcquired subscriber stops her duty runner: the stop must not wait
    for the delivery of the very event it runs in, so bob takes over at once."""
    from greenleader import candidate as candidate_module
    from greenleader import duties as duties_module
    monkeypatch.setattr(candidate_module, "STEP_DOWN_GRACE", 60.0)  # a stall would be obvious
    monkeypatch.setattr(duties_module, "KILL_GRACE", 60.0)
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    bob_waits = gevent.event.Event()
    runners: list = []
    stopping.append(bob)

    def stopper(event: object) -> None:
        if isinstance(event, LeadershipAcquired) and event.source is alice:
            assert bob_waits.wait(timeout=30)
            runners[0].stop()

    zope.event.subscribers.append(stopper)
    try:
        runners.append(Duties().run(alice))
        stopping.append(runners[0])
        wait_until(alice.is_leader, 3 * ttl, "alice to lead")
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's first item") is False
        bob_waits.set()
        assert next_item(bob_elected, 30, "bob to win after alice's runner stopped") is True
    finally:
        zope.event.subscribers.remove(stopper)


def test_every_concurrent_stop_waits_for_the_release(make_store, key, ttl, stopping) -> None:
    store = FaultyStore(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl)
    stopping.append(alice)
    wins(alice, 3 * ttl)
    store.delay_next("release", 0.5)
    first = gevent.spawn(alice.stop)
    gevent.sleep(0)
    alice.stop()
    releases = [call for call in store.history if call.primitive == "release"]
    assert releases and all(call.forwarded for call in releases), "the second stop() returned before the release"
    first.get(timeout=30)


def test_a_follower_whose_watch_is_slow_to_start_still_learns_the_leader(make_store, key, ttl, stopping) -> None:
    from greenleader.testing import Fault
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    faulty = FaultyStore(make_store())
    stopping.append(alice)
    wins(alice, 3 * ttl)
    faulty.add_fault(Fault("watch", None, times=None, delay=0.8))  # each watch value takes 0.8 s
    follower = Follower(faulty, key, unknown_after=1.0)
    stopping.append(follower)
    leaders, _ = follower.follow_election()
    seen = []
    with gevent.Timeout(30, AssertionError(f"the follower never named alice: {seen}")):
        while (item := leaders.get()) != "alice":
            seen.append(item)


def test_a_greenlet_exit_out_of_acquire_is_retried(make_store, key, ttl, stopping) -> None:
    store = FaultyStore(make_store())
    store.fail_next("acquire", GreenletExit)
    alice = Candidate(store, key, "alice", ttl=ttl, retry=Backoff(initial=0.05, maximum=0.1))
    stopping.append(alice)
    elected, errors = alice.run_for_election()
    assert next_item(elected, ttl, "alice's first item") is False
    assert next_item(elected, 30, "alice to win on the next attempt") is True
    assert errors.empty()


def test_a_loss_reported_between_the_win_and_the_hold_is_not_missed(stopping, events, key) -> None:
    """The store drops the key right after acquire() returned, before the candidate listens for
    losses: the candidate must not step up on the lost lease (review 2)."""
    from greenleader.stores.memory import MemoryStore

    class LosesTheFirstWin(FaultyStore):
        armed = True

        def acquire(self, key: str, node: str, ttl: float):
            lease = super().acquire(key, node, ttl)
            if self.armed:
                self.armed = False
                self.inner.expire(key)  # reported to a lease nobody listens to yet
            return lease

    alice = Candidate(LosesTheFirstWin(MemoryStore()), key, "alice", ttl=1.0)
    stopping.append(alice)
    wins(alice, 10)
    wait_until(lambda: [e.term for e in events if isinstance(e, LeadershipAcquired)], 10, "LeadershipAcquired")
    acquired = [e.term for e in events if isinstance(e, LeadershipAcquired)]
    assert acquired == [2], f"stepped up on the lost first lease: terms {acquired}"


def test_a_duty_that_ignores_its_kill_delays_the_release_only_by_the_grace(make_store, key, ttl, stopping,
                                                                          monkeypatch, caplog) -> None:
    """A duty that swallows GreenletExit must not keep the key forever: after the kill grace the
    step-down logs it as stuck and releases anyway, so bob wins (rule 3 over a broken duty)."""
    from greenleader import duties as duties_module
    monkeypatch.setattr(duties_module, "KILL_GRACE", 0.5)
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    registry = Duties()

    stubborn_until_released = [True]

    @registry
    def stubborn(term: int) -> None:
        while stubborn_until_released[0]:
            with contextlib.suppress(GreenletExit):  # ignores its kill
                gevent.sleep(3600)

    runner = registry.run(alice)
    stopping.extend([bob])
    wait_until(alice.is_leader, 3 * ttl, "alice to lead")
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    alice.resign()
    assert next_item(bob_elected, 30, "bob to win although alice's duty ignored its kill") is True
    assert any("ignored GreenletExit" in record.getMessage() for record in caplog.records)
    stubborn_until_released[0] = False  # end the stubborn duty for good
    gevent.killall(list(runner._dying), timeout=10)
    runner.stop()


# -- a release that fails ----------------------------------------------------------------------


def test_a_failed_release_is_tried_again(make_store, key, ttl, stopping) -> None:
    """A release refused once (a transient store error) is tried again at once, so the next
    candidate is let in by the release, not by the TTL."""
    store = FaultyStore(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl)
    stopping.append(alice)
    wins(alice, 3 * ttl)
    store.fail_next("release", StoreUnavailableError("injected: the release is refused once"))
    alice.resign()
    alice.stop()
    releases = [call for call in store.history if call.primitive == "release"]
    assert len(releases) >= 2 and releases[-1].forwarded, f"the refused release was not tried again: {releases}"
    assert holder(make_store(), key) != "alice", "the store still names alice after stop() returned"


@pytest.mark.parametrize("error", [StoreUnavailableError("injected: every release is refused"), GreenletExit()],
                         ids=["store-error", "greenlet-exit"])
def test_a_release_that_keeps_failing_does_not_hold_the_key_while_the_process_lives(
        make_store, key, ttl, stopping, error) -> None:
    """Every release refused: the candidate gives the lease up after its bound, and nothing
    local (a lock file's descriptor, a ZooKeeper session's node) keeps the key held for as
    long as the process lives; the waiting candidate wins (by the TTL at the latest)."""
    store = FaultyStore(make_store())
    alice = Candidate(store, key, "alice", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    stopping.extend([alice, bob])
    wins(alice, 3 * ttl)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    store.fail_when("release", error, lambda call: True)
    alice.stop()
    assert all(not call.forwarded for call in store.history if call.primitive == "release")
    assert next_item(bob_elected, 3 * ttl + 30, "bob to win though alice's release never went out") is True


def test_a_release_that_keeps_failing_on_a_shared_store_frees_the_key_and_spares_the_other_leader(
        make_store, key, ttl, stopping) -> None:
    """Two leaders of two keys on one store object (on Consul they share one session): every
    release of alice's key is refused, so alice gives her lease up. The key must still be freed
    while the process lives, though carol keeps the shared session renewed, and carol's tenure
    must not end with it (losing or releasing one key never ends another's tenure)."""
    store = FaultyStore(make_store())
    other_key = f"{key}-other"
    alice = Candidate(store, key, "alice", ttl=ttl)
    carol = Candidate(store, other_key, "carol", ttl=ttl)
    bob = Candidate(make_store(), key, "bob", ttl=ttl)
    stopping.extend([alice, carol, bob])
    wins(alice, 3 * ttl)
    carol_elected, _ = carol.run_for_election()
    assert next_item(carol_elected, 3 * ttl, "carol's first item") is False
    assert next_item(carol_elected, 3 * ttl, "carol to win") is True
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    store.fail_when("release", StoreUnavailableError("injected: alice's releases are refused"),
                    lambda call: call.key == key)
    alice.stop()
    assert all(not call.forwarded for call in store.history if call.primitive == "release" and call.key == key)
    assert next_item(bob_elected, 3 * ttl + 30, "bob to win though alice's release never went out") is True
    assert carol.is_leader(), "carol's tenure ended with alice's abandoned lease"
    assert holder(make_store(), other_key) == "carol"
    assert carol_elected.empty(), f"carol's election reported a change: {carol_elected.peek()}"
