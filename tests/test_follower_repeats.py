"""A store's watch that yields the leader it yielded last (a repeat) confirms the followers
sharing it without reporting anything, except to a follower that said it does not know (rule 12).

The stores whose watch repeats a value: memory (a waiter withdrawing wakes the watch), etcd
(each watch event: a waiter's keys), ZooKeeper (a candidate queueing behind a leader that has
no successor is read at once). Consul and the file store compare values before yielding.
"""

from __future__ import annotations

import pytest

from greenleader import Candidate, Follower
from greenleader.errors import StoreUnavailableError
from greenleader.testing import FaultyStore
from tests.waiting import next_item, wait_until, wins

REPEATING = ["memory", "etcd", "zookeeper"]


def _repeats(store: FaultyStore, node: str) -> int:
    """How many values naming ``node`` the store's watch has yielded."""
    return sum(1 for call in store.history if call.primitive == "watch" and call.node == node)


def _queue_and_withdraw(kind: str, make_store, key: str, ttl: float, watched: FaultyStore, stopping: list) -> None:
    """bob queues behind the leader, then withdraws: the watch on ``watched`` yields the leader
    again (on etcd and ZooKeeper when bob queues, on the memory store when he withdraws)."""
    before = _repeats(watched, "alice")
    bobs = FaultyStore(make_store())
    bob = Candidate(bobs, key, "bob", ttl=ttl)
    stopping.append(bob)
    bob.run_for_election()
    wait_until(lambda: any(call.primitive == "acquire" for call in bobs.history), 30, "bob to queue")
    if kind != "memory":
        wait_until(lambda: _repeats(watched, "alice") > before, 30, "the watch to yield alice again")
    bob.stop()
    wait_until(lambda: _repeats(watched, "alice") > before, 30, "the watch to yield alice again")


@pytest.mark.parametrize("kind", REPEATING)
def test_a_repeated_leader_brings_back_a_follower_that_reported_unknown(kind, make_store, key, ttl,
                                                                        stopping) -> None:
    """A follower that cannot confirm the leader reports it unknown; the watch then yields the
    same leader again: that repeat is news to this follower, which names alice again."""
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    faulty = FaultyStore(make_store())
    follower = Follower(faulty, key, unknown_after=0.5)
    stopping.extend([alice, follower])
    wins(alice, 3 * ttl)
    leaders, _ = follower.follow_election()
    assert next_item(leaders, 3 * ttl, "the follower to name alice") == "alice"

    faulty.fail_when("leader", StoreUnavailableError("reads fail"), lambda call: True)  # the watch stays
    assert next_item(leaders, 30, "the follower to report the leader unknown") is None
    assert not follower.known

    _queue_and_withdraw(kind, make_store, key, ttl, faulty, stopping)
    assert next_item(leaders, 30, "the follower to name alice again") == "alice"
    assert follower.known and follower.leader() == "alice"


@pytest.mark.parametrize("kind", REPEATING)
def test_a_repeated_leader_confirms_the_followers_without_a_report(kind, make_store, key, ttl, stopping) -> None:
    """Repeats of the leader report nothing more to the followers sharing the watch, and keep
    them following alice."""
    alice = Candidate(make_store(), key, "alice", ttl=ttl)
    shared = FaultyStore(make_store())
    followers = [Follower(shared, key) for _ in range(3)]
    stopping.append(alice)
    stopping.extend(followers)
    wins(alice, 3 * ttl)
    queues = [follower.follow_election()[0] for follower in followers]
    for leaders in queues:
        assert next_item(leaders, 3 * ttl, "each follower to name alice") == "alice"
    _queue_and_withdraw(kind, make_store, key, ttl, shared, stopping)
    assert alice.is_leader()
    for follower, leaders in zip(followers, queues, strict=True):
        assert leaders.empty(), f"a repeat was reported: {list(leaders.queue)}"
        assert follower.known and follower.leader() == "alice"
