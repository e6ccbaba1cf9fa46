"""The behavioural contract (docs/safety.md "The contract", and the README's "What the Go library
got wrong"), written once and run on every store."""

from __future__ import annotations

import time

import gevent
import pytest
import zope.event

from greenleader import Backoff, Candidate, Follower
from greenleader.errors import GreenleaderError, InvalidArgumentError, InvalidKeyError, StoppedError, StoreError
from greenleader.events import (
    ElectionError,
    LeaderChanged,
    LeadershipAcquired,
    LeadershipLost,
    LossReason,
)
from tests.waiting import drain, next_item, wait_until

pytestmark = pytest.mark.timeout(180)



@pytest.fixture
def candidates(make_store, key, ttl):
    """Factory of candidates on ``key``, each on its own store client; all stopped at the end."""
    made: list[Candidate] = []

    def make(node: str, **options) -> Candidate:
        candidate = Candidate(make_store(), key, node, ttl=options.pop("ttl", ttl), **options)
        made.append(candidate)
        return candidate

    yield make
    for candidate in made:
        candidate.stop()


def win(candidate: Candidate, timeout: float) -> gevent.queue.Queue:
    """Run ``candidate`` and wait for it to lead; return its elected queue."""
    elected, _ = candidate.run_for_election()
    assert next_item(elected, timeout, f"{candidate.node}'s first item") is False
    assert next_item(elected, timeout, f"{candidate.node} to be elected") is True
    return elected


def only_leader(*candidates: Candidate) -> Candidate:
    leaders = [c for c in candidates if c.is_leader()]
    assert len(leaders) == 1, f"expected exactly one leader, got {[c.node for c in leaders]}"
    return leaders[0]


# -- campaigning ----------------------------------------------------------------------------


def test_first_item_is_false_then_true_when_alone(candidates, ttl):
    alice = candidates("alice")
    assert not alice.is_leader() and alice.term is None
    win(alice, ttl * 3)
    assert alice.is_leader()
    assert isinstance(alice.term, int) and alice.term > 0


def test_exactly_one_of_several_leads(candidates, ttl):
    crowd = [candidates(f"node-{i}") for i in range(4)]
    queues = [c.run_for_election()[0] for c in crowd]
    for c, q in zip(crowd, queues, strict=False):
        assert next_item(q, ttl, f"{c.node}'s first item") is False
    wait_until(lambda: any(c.is_leader() for c in crowd), ttl * 3, "someone leads")
    leader = only_leader(*crowd)
    assert next_item(queues[crowd.index(leader)], ttl, "the leader's True") is True
    for c, q in zip(crowd, queues, strict=False):
        if c is not leader:
            assert q.qsize() == 0, f"{c.node} got {q.peek()!r} while {leader.node} leads"


def test_stop_hands_over_to_a_waiter_with_a_higher_term(candidates, ttl):
    alice, bob = candidates("alice"), candidates("bob")
    alice_elected = win(alice, ttl * 3)
    first_term = alice.term
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    alice.stop()
    assert not alice.is_leader() and alice.term is None
    assert drain(alice_elected, ttl, "alice's elected queue") == [False]
    assert next_item(bob_elected, ttl * 2, "bob to take over (graceful handover)") is True
    assert bob.term > first_term


def test_stop_releases_the_key(candidates, store, key, ttl):
    alice = candidates("alice")
    win(alice, ttl * 3)
    info = store.leader(key)
    assert info is not None and info.node == "alice" and info.term == alice.term
    alice.stop()
    assert store.leader(key) is None


def test_resign_steps_down_and_campaigns_again(candidates, ttl, events):
    alice, bob = candidates("alice", resign_holdoff=0.2), candidates("bob")
    alice_elected = win(alice, ttl * 3)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    alice.resign()
    assert not alice.is_leader(), "is_leader() must be False once resign() returns"
    assert next_item(alice_elected, ttl, "alice's False after resigning") is False
    assert next_item(bob_elected, ttl * 2, "bob to take over") is True
    bob.stop()
    assert next_item(alice_elected, ttl * 3, "alice to win again after bob stops") is True
    wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
    lost = [e for e in events if isinstance(e, LeadershipLost) and e.node == "alice"]
    assert lost and lost[0].reason is LossReason.RESIGNED


def test_resign_when_not_leading_does_nothing(candidates, ttl):
    alice, bob = candidates("alice"), candidates("bob")
    bob.resign()  # not even running
    win(alice, ttl * 3)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    bob.resign()
    assert alice.is_leader() and not bob.is_leader()
    assert bob_elected.qsize() == 0


def test_stop_is_idempotent_and_ends_both_queues(candidates, ttl):
    alice = candidates("alice")
    win(alice, ttl * 3)
    elected, errors = alice.run_for_election()
    alice.stop()
    alice.stop()
    assert drain(elected, ttl, "elected") == [False]
    assert drain(errors, ttl, "errors") == []
    with pytest.raises(StoppedError):
        alice.run_for_election()


def test_stop_while_waiting_withdraws_the_candidacy(candidates, store, key, ttl):
    alice, bob, carol = candidates("alice"), candidates("bob"), candidates("carol")
    win(alice, ttl * 3)
    bob_elected, bob_errors = bob.run_for_election()
    assert next_item(bob_elected, ttl, "bob's first item") is False
    bob.stop()
    assert drain(bob_elected, ttl, "bob's queue") == []
    assert drain(bob_errors, ttl, "bob's errors") == []
    alice.stop()
    assert store.leader(key) is None, "bob must not take the key after he stopped"
    win(carol, ttl * 3)
    assert not bob.is_leader()


def test_stop_before_running_and_as_context_manager(candidates, make_store, key, ttl):
    idle = candidates("idle")
    idle.stop()
    with Candidate(make_store(), key, "ctx", ttl=ttl) as ctx:
        win(ctx, ttl * 3)
    assert not ctx.is_leader()
    later = candidates("later")
    win(later, ttl * 3)


def test_store_failure_is_reported_then_both_queues_end(backend, backend_env, key, ttl, events):
    try:
        broken = backend.unreachable_store(backend_env)
    except StoreError:
        return  # refusing to make a store for an unreachable server is the clear error we want
    candidate = Candidate(broken, key, "alice", ttl=ttl)
    elected, errors = candidate.run_for_election()
    # A caller reading only `elected` must not hang.
    assert drain(elected, 60, "elected to end after a store failure") == [False]
    reported = drain(errors, 5, "errors to end")
    assert len(reported) == 1 and isinstance(reported[0], StoreError), reported
    wait_until(lambda: any(isinstance(e, ElectionError) for e in events), 5, "an ElectionError event")
    candidate.stop()
    broken.close()


def test_retry_campaigns_through_store_errors_until_stopped(backend, backend_env, key, ttl, events):
    try:
        broken = backend.unreachable_store(backend_env)
    except StoreError:
        return
    candidate = Candidate(broken, key, "alice", ttl=ttl, retry=Backoff(initial=0.05, maximum=0.1))
    elected, errors = candidate.run_for_election()

    def retried() -> bool:
        return sum(isinstance(e, ElectionError) and not e.fatal for e in events) >= 2

    wait_until(retried, 60, "two non-fatal ElectionError events")
    assert elected.get() is False and elected.qsize() == 0 and errors.qsize() == 0
    candidate.stop()
    assert drain(elected, 10, "elected") == []
    assert drain(errors, 10, "errors") == []
    broken.close()


def test_follower_retry_watches_through_store_errors_until_stopped(backend, backend_env, key, events):
    try:
        broken = backend.unreachable_store(backend_env)
    except StoreError:
        return
    follower = Follower(broken, key, retry=Backoff(initial=0.05, maximum=0.1))
    leaders, errors = follower.follow_election()

    def retried() -> bool:
        return sum(isinstance(e, ElectionError) and not e.fatal for e in events) >= 2

    wait_until(retried, 60, "two non-fatal ElectionError events")
    follower.stop()
    assert drain(leaders, 10, "leaders") == []
    assert drain(errors, 10, "errors") == []
    broken.close()


def test_lost_key_steps_down_then_campaigns_again(candidates, backend, store, key, ttl, events):
    alice = candidates("alice")
    elected = win(alice, ttl * 3)
    first_term = alice.term
    backend.force_expire(store, key)
    assert next_item(elected, ttl * 2, "alice to notice the loss") is False
    assert next_item(elected, ttl * 4, "alice to win again") is True
    assert alice.term > first_term
    wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
    lost = [e for e in events if isinstance(e, LeadershipLost)]
    assert lost[0].reason is LossReason.EXPIRED and lost[0].term == first_term


def test_blocked_hub_ends_leadership_at_the_renew_deadline(candidates, ttl, events):
    alice = candidates("alice", renew_deadline=ttl / 4, renew_interval=ttl / 10)
    elected = win(alice, ttl * 3)
    end = time.monotonic() + ttl / 4 + 0.2
    while time.monotonic() < end:  # CPU-bound code that never yields to the hub
        pass
    assert not alice.is_leader(), "is_leader() must turn False at the deadline, before any greenlet runs"
    assert alice.term is None
    assert next_item(elected, ttl, "False after the blocked hub") is False
    wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
    lost = [e for e in events if isinstance(e, LeadershipLost)]
    assert lost[0].reason is LossReason.DEADLINE
    assert next_item(elected, ttl * 3, "alice to campaign again and win") is True


def test_slow_consumers_and_failing_subscribers_do_not_delay_renewals(candidates, ttl):
    def raising(event: object) -> None:
        raise RuntimeError("subscriber bug")

    def slow(event: object) -> None:
        if isinstance(event, LeadershipAcquired):
            gevent.sleep(ttl * 3)

    zope.event.subscribers[:0] = [raising, slow]
    try:
        alice, bob = candidates("alice"), candidates("bob")
        alice.run_for_election()  # nobody ever reads alice's queues
        wait_until(alice.is_leader, ttl * 3, "alice leads")
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's first item") is False
        # Longer than the TTL: without renewals alice's key would expire and bob would win.
        with pytest.raises(gevent.queue.Empty):
            bob_elected.get(timeout=ttl * 1.5)
        assert alice.is_leader()
    finally:
        zope.event.subscribers.remove(raising)
        zope.event.subscribers.remove(slow)


def test_events_carry_source_key_node_term_and_reason(candidates, key, ttl, events):
    alice = candidates("alice")
    win(alice, ttl * 3)
    term = alice.term
    alice.stop()
    wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
    acquired = [e for e in events if isinstance(e, LeadershipAcquired)]
    lost = [e for e in events if isinstance(e, LeadershipLost)]
    assert acquired == [LeadershipAcquired(alice, key, "alice", term)]
    assert lost == [LeadershipLost(alice, key, "alice", term, LossReason.STOPPED)]


# -- following --------------------------------------------------------------------------------


def test_follower_reports_vacancy_first_and_waits_for_a_missing_key(make_store, candidates, key, ttl):
    with Follower(make_store(), key) as follower:
        assert follower.leader() is None
        leaders, _ = follower.follow_election()
        assert next_item(leaders, ttl, "the vacancy first") is None
        win(candidates("alice"), ttl * 3)
        assert next_item(leaders, ttl * 2, "the first leader") == "alice"
        assert follower.leader() == "alice"


def test_follower_reports_current_leader_first_then_changes_in_order(make_store, candidates, key, ttl, events):
    alice, bob = candidates("alice"), candidates("bob")
    win(alice, ttl * 3)
    follower = Follower(make_store(), key)
    assert follower.leader() == "alice"
    leaders, errors = follower.follow_election()
    assert next_item(leaders, ttl, "the current leader") == "alice"
    bob.run_for_election()
    alice.stop()
    seen = [next_item(leaders, ttl * 2, "the next leader")]
    if seen[-1] is None:  # the vacancy may or may not be observed between the two
        seen.append(next_item(leaders, ttl * 2, "bob"))
    assert seen[-1] == "bob"
    bob.stop()
    assert next_item(leaders, ttl * 2, "the vacancy") is None
    follower.stop()
    follower.stop()
    assert drain(leaders, ttl, "leaders") == []
    assert drain(errors, ttl, "errors") == []
    changes = [e.leader for e in events if isinstance(e, LeaderChanged)]
    assert [c for c in changes if c is not None] == ["alice", "bob"]
    assert changes[0] == "alice" and changes[-1] is None


def test_follower_does_not_repeat_an_unchanged_leader(make_store, candidates, key, ttl):
    alice = candidates("alice")
    win(alice, ttl * 3)
    with Follower(make_store(), key) as follower:
        leaders, _ = follower.follow_election()
        assert next_item(leaders, ttl, "the current leader") == "alice"
        with pytest.raises(gevent.queue.Empty):  # renewals are not changes
            leaders.get(timeout=alice.renew_interval * 2.5)


def test_follower_store_failure_is_reported_then_queues_end(backend, backend_env, key, ttl):
    try:
        broken = backend.unreachable_store(backend_env)
    except StoreError:
        return
    follower = Follower(broken, key)
    leaders, errors = follower.follow_election()
    assert drain(leaders, 60, "leaders to end after a store failure") == []
    reported = drain(errors, 5, "errors")
    assert len(reported) == 1 and isinstance(reported[0], StoreError)
    with pytest.raises(StoreError):
        follower.leader()
    follower.stop()
    broken.close()


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_key", ["", "/", None, 42, b"bytes", "x" * 5000, "a\x00b", "line\nbreak"])
def test_bad_keys_are_rejected(store, bad_key, ttl):
    with pytest.raises(InvalidKeyError):
        Candidate(store, bad_key, "alice", ttl=ttl)
    with pytest.raises(InvalidKeyError):
        Follower(store, bad_key)


@pytest.mark.parametrize(
    "options",
    [
        {"node": ""},
        {"node": "   "},
        {"node": None},
        {"node": 7},
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": "soon"},
        {"ttl": float("nan")},
        {"ttl": True},
        {"ttl": 10**9},
        {"renew_deadline": 0},
        {"renew_deadline": "LARGE"},
        {"renew_interval": -1},
    ],
)
def test_bad_candidate_arguments_are_rejected(store, key, ttl, options):
    arguments = {"node": "alice", "ttl": ttl, **options}
    with pytest.raises(InvalidArgumentError):
        Candidate(store, key, **arguments)


def test_renew_period_must_fit_inside_the_ttl(store, key, ttl):
    with pytest.raises(InvalidArgumentError, match="renew_deadline"):
        Candidate(store, key, "alice", ttl=ttl, renew_deadline=ttl)
    with pytest.raises(InvalidArgumentError, match="renew_interval"):
        Candidate(store, key, "alice", ttl=ttl, renew_deadline=ttl / 2, renew_interval=ttl / 2)
    with pytest.raises(GreenleaderError):
        Candidate(store, key, "alice", ttl=ttl, renew_interval=ttl * 2)
