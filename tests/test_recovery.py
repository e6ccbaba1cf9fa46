"""Recovery: followers (and candidates) with ``retry`` outlive store outages and partitions,
re-establish their watch, and report the leader they find, on every real store.

- a store server restart while the leadership moves: followers that were watching, and one
  started during the outage, all end up naming the new leader;
- a silent partition between a follower and the store (the follower's connections stay open
  and nothing arrives) while the leadership moves; healed with the held bytes delivered, or
  with the connections reset: the follower names the new leader soon after the heal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zope.event

from greenleader import Backoff, Candidate, Follower
from greenleader.events import ElectionError
from greenleader.stores import Store, from_url
from tests import servers
from tests.backends import SERVER_KINDS
from tests.faults import Proxy
from tests.waiting import next_item, wait_until

log = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(180)

#: Quick retries, so that recovery is measured rather than the backoff.
RETRY = Backoff(initial=0.1, maximum=0.5)
#: Short client timeouts, so that a silent partition is noticed within seconds.
OPTIONS = {"consul": "timeout=2&wait=2&retry_for=2", "etcd": "timeout=2", "zookeeper": "timeout=2",
           "postgres": "timeout=2&user=postgres&dbname=postgres"}
#: TTLs: Consul's minimum; 2 s elsewhere.
TTL = {"consul": 10.0, "etcd": 2.0, "zookeeper": 2.0, "postgres": 2.0}


@pytest.fixture(params=SERVER_KINDS)
def real_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def stores() -> Iterator[Callable[[str], Store]]:
    """Factory of stores from URLs; all closed at the end."""
    made: list[Store] = []

    def make(url: str) -> Store:
        store = from_url(url)
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        store.close()


@pytest.fixture
def runners() -> Iterator[list]:
    """Candidates and followers to stop at the end, whatever happened."""
    made: list = []
    yield made
    for runner in made:
        runner.stop()


@pytest.fixture
def outlived() -> Iterator[list[ElectionError]]:
    """The non-fatal errors followers and candidates published (each one an outlived outage)."""
    seen: list[ElectionError] = []

    def record(event: object) -> None:
        if isinstance(event, ElectionError):
            assert not event.fatal, f"a retrying campaign or watch ended: {event.error!r}"
            seen.append(event)

    zope.event.subscribers.append(record)
    yield seen
    zope.event.subscribers.remove(record)


def url(kind: str, addrs: list[str]) -> str:
    return f"{kind}://{','.join(addrs)}?{OPTIONS[kind]}"


def reports(leaders, who: str, timeout: float, what: str) -> None:
    """Read ``leaders`` until it names ``who`` (None and other leaders may come first)."""
    while (item := next_item(leaders, timeout, what)) != who:
        log.info("%s: got %r first", what, item)


def test_followers_rewatch_after_a_store_restart_and_name_the_new_leader(
        real_kind: str, tmp_path: Path, stores, runners, outlived, key: str) -> None:
    """The store goes down while alice leads; alice goes away during the outage, bob campaigns;
    once the store is back, bob leads, and both the follower that watched all along and one
    started during the outage name him."""
    kind, ttl = real_kind, TTL[real_kind]
    try:
        cluster = servers.start(kind, tmp_path / "server")
    except servers.ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        store_url = url(kind, cluster.addrs)
        alice = Candidate(stores(store_url), key, "alice", ttl=ttl, retry=RETRY)
        watching = Follower(stores(store_url), key, retry=RETRY)
        runners.extend([alice, watching])
        elected, _ = alice.run_for_election()
        assert next_item(elected, ttl, "alice's first item") is False
        assert next_item(elected, 3 * ttl, "alice to win") is True
        leaders, _ = watching.follow_election()
        reports(leaders, "alice", 3 * ttl, "the follower to name alice")

        cluster.nodes[0].stop()
        assert next_item(elected, 2 * ttl, "alice to step down in the outage") is False
        alice.stop()  # gone during the outage: its release fails, its hold expires
        late = Follower(stores(store_url), key, retry=RETRY)
        bob = Candidate(stores(store_url), key, "bob", ttl=ttl, retry=RETRY)
        runners.extend([late, bob])
        late_leaders, _ = late.follow_election()
        bob_elected, _ = bob.run_for_election()
        wait_until(lambda: {e.source for e in outlived} >= {watching, late, bob}, 4 * ttl + 10,
                   "both followers and bob to report the outage")

        cluster.nodes[0].start()
        bound = 2 * ttl + 15  # alice's hold expiring (Consul: twice the TTL) and the backoff
        assert next_item(bob_elected, bound, "bob's first item") is False
        assert next_item(bob_elected, bound, "bob to win once the store is back") is True
        reports(leaders, "bob", bound, "the watching follower to name bob")
        reports(late_leaders, "bob", bound, "the follower started during the outage to name bob")
        assert watching.leader() == late.leader() == "bob"
    finally:
        cluster.stop()


@pytest.mark.parametrize("reset", [False, True], ids=["held-bytes-delivered", "connections-reset"])
def test_partitioned_follower_catches_up_with_the_new_leader(
        real_kind: str, request: pytest.FixtureRequest, stores, runners, outlived, key: str, reset: bool) -> None:
    """The follower's connections go silent while alice hands over to bob. Healed at once, the
    held bytes flow again; healed after the follower noticed the partition (a store error it
    outlives), every connection is reset. Either way the follower then names bob."""
    kind, ttl = real_kind, TTL[real_kind]
    cluster = request.getfixturevalue(f"{kind}_cluster")
    proxy = Proxy(cluster.addrs[0])
    try:
        direct = url(kind, cluster.addrs)
        alice = Candidate(stores(direct), key, "alice", ttl=ttl, retry=RETRY)
        bob = Candidate(stores(direct), key, "bob", ttl=ttl, retry=RETRY)
        follower = Follower(stores(url(kind, [proxy.addr])), key, retry=RETRY)
        runners.extend([follower, alice, bob])
        elected, _ = alice.run_for_election()
        assert next_item(elected, ttl, "alice's first item") is False
        assert next_item(elected, 3 * ttl, "alice to win") is True
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's first item") is False
        leaders, _ = follower.follow_election()
        reports(leaders, "alice", 3 * ttl, "the follower to name alice")

        proxy.partition()
        alice.stop()  # a graceful handover the follower cannot see
        assert next_item(bob_elected, 3 * ttl, "bob to win") is True
        if reset:  # a long partition: the follower gives up on its connections, then they reset
            wait_until(lambda: any(e.source is follower for e in outlived), 30, "the follower to notice the partition")
        proxy.heal(reset=reset)
        reports(leaders, "bob", 30, "the follower to name bob after the heal")
        assert follower.leader() == "bob"
    finally:
        proxy.close()


def test_a_follower_confirming_often_still_notices_a_silent_partition(
        real_kind: str, request: pytest.FixtureRequest, stores, runners, outlived, key: str) -> None:
    """A follower whose guard confirms a quiet watch every second sends requests more often
    than its client would ping. Through a silent partition those requests go unanswered; the
    store must still give up on the connection (kazoo counts every request sent as a ping,
    so the ZooKeeper store has to notice this itself), and after the heal name the leader."""
    kind, ttl = real_kind, TTL[real_kind]
    cluster = request.getfixturevalue(f"{kind}_cluster")
    proxy = Proxy(cluster.addrs[0])
    try:
        alice = Candidate(stores(url(kind, cluster.addrs)), key, "alice", ttl=ttl, retry=RETRY)
        follower = Follower(stores(url(kind, [proxy.addr])), key, retry=RETRY, unknown_after=2.0)
        runners.extend([follower, alice])
        elected, _ = alice.run_for_election()
        assert next_item(elected, ttl, "alice's first item") is False
        assert next_item(elected, 3 * ttl, "alice to win") is True
        leaders, _ = follower.follow_election()
        reports(leaders, "alice", 3 * ttl, "the follower to name alice")

        proxy.partition()
        reports(leaders, None, 30, "the follower to report the leader unknown")
        assert not follower.known
        wait_until(lambda: any(e.source is follower for e in outlived), 30,
                   "the follower's store to give up on its silent connection")
        proxy.heal(reset=False)
        reports(leaders, "alice", 30, "the follower to name alice after the heal")
        assert follower.known
    finally:
        proxy.close()
