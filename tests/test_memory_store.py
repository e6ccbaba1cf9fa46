"""The memory store's own features: failure injection and expiry, for application tests."""

from __future__ import annotations

import pytest

from greenleader import Backoff, Candidate, Follower
from greenleader.errors import InvalidArgumentError, StoreUnavailableError
from greenleader.stores import from_url, new_store
from greenleader.stores.memory import MemoryStore
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(60)


def test_memory_urls_name_shared_stores():
    assert from_url("memory://app") is from_url("memory://app")
    assert from_url("memory://app") is not from_url("memory://other")
    assert isinstance(new_store("memory"), MemoryStore)
    with pytest.raises(InvalidArgumentError):
        from_url("memory://app?x=1")


def test_fail_makes_operations_raise_until_recover(key):
    store = MemoryStore()
    store.fail()
    with pytest.raises(StoreUnavailableError):
        store.leader(key)
    store.recover()
    assert store.leader(key) is None


def test_a_retrying_candidate_and_follower_recover_after_an_outage(key):
    store = MemoryStore()
    candidate = Candidate(store, key, "alice", ttl=1, retry=Backoff(initial=0.05, maximum=0.2))
    follower = Follower(store, key, retry=Backoff(initial=0.05, maximum=0.2))
    elected, _ = candidate.run_for_election()
    leaders, _ = follower.follow_election()
    assert next_item(elected, 1, "first item") is False
    assert next_item(elected, 2, "election") is True
    assert next_item(leaders, 2, "the leader") in (None, "alice")
    first_term = candidate.term
    store.fail()
    assert next_item(elected, 3, "step-down during the outage") is False
    store.recover()
    assert next_item(elected, 5, "re-election after the outage") is True
    assert candidate.term > first_term

    def follower_caught_up() -> bool:
        info = follower.leader_info()
        return info is not None and info.node == "alice" and info.term == candidate.term

    wait_until(follower_caught_up, 5, "the follower to see alice's new term after the outage")
    candidate.stop()
    follower.stop()


def test_expire_drops_the_holder(key):
    store = MemoryStore()
    assert store.expire(key) is False
    candidate = Candidate(store, key, "alice", ttl=1)
    elected, _ = candidate.run_for_election()
    assert next_item(elected, 1, "first item") is False
    assert next_item(elected, 2, "election") is True
    assert store.expire(key) is True
    assert next_item(elected, 2, "the loss") is False
    candidate.stop()
