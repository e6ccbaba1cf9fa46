"""The contract of sharing, on every store: what many candidates and followers on ONE store
object may and may not do to each other.

A store object may carry many candidacies on one session (Consul), lease (etcd) or kazoo
session (ZooKeeper), and many followers of a key on one watch. Whatever it shares:

(a) one candidate's ``resign()`` releases only its own key: another candidate keeps leading
    (no loss, the same term, still renewing three TTLs later);
(b) one candidate's ``stop()`` likewise;
(c) the loss of one key (deleted from outside, as an operator would) ends only that key's
    tenure;
(d) a session or lease that is lost ends every tenure it carried, each candidate reporting
    its own ``LeadershipLost`` with a ``LossReason``, and each campaigns again and wins; a
    tenure it did not carry goes on;
(e) followers of one key on one store object all name the new leader after a handover, and
    stopping one of them leaves the others following.

Which keys a session carried is read from the server (the session or lease that holds each
key, the ephemeral owner of each node), so the same test holds whether a store shares one
session between its candidates or gives each its own. Everything done "from outside" goes
through a client of its own (py-consul, ``etcdctl``, kazoo), never through the store object.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator

import gevent
import pytest
import zope.event

from greenleader import Candidate, Follower
from greenleader.events import LeaderChanged, LeadershipAcquired, LeadershipEvent, LeadershipLost, LossReason
from greenleader.stores import Store
from tests.backends import STORE_KINDS, BackendEnv
from tests.waiting import drain, next_item, wait_until

pytestmark = pytest.mark.timeout(300)

#: How many candidates (each for a key of its own) share one store object in these tests: one
#: resigns, one stops, one loses its key, one is left alone (see test_leaving_or_losing_...).
CANDIDATES = 4


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def keys(key: str) -> list[str]:
    """One key per candidate, none a prefix of another's path (``a`` and ``a/b`` share etcd's
    range ``a/``: that nesting is tested elsewhere)."""
    return [f"{key}-{i}" for i in range(CANDIDATES)]


@pytest.fixture
def seen(key: str, keys: list[str]) -> Iterator[list[LeadershipEvent]]:
    """Every greenleader event about this test's keys, in delivery order."""
    events: list[LeadershipEvent] = []
    mine = {key, *keys}

    def record(event: object) -> None:
        if isinstance(event, LeadershipEvent) and event.key in mine:
            events.append(event)

    zope.event.subscribers.append(record)
    yield events
    zope.event.subscribers.remove(record)


class Campaign:
    """A candidate, its ``elected`` queue and the term of its current tenure."""

    def __init__(self, store: Store, key: str, node: str, ttl: float) -> None:
        self.candidate = Candidate(store, key, node, ttl=ttl)
        self.key = key
        self.elected, self.errors = self.candidate.run_for_election()
        assert next_item(self.elected, 3 * ttl, f"{node}'s first item") is False
        self.term: int | None = None

    def wins(self, timeout: float) -> int:
        assert next_item(self.elected, timeout, f"{self.candidate.node} to win") is True
        wait_until(self.candidate.is_leader, timeout, f"{self.candidate.node} to lead")
        term = self.candidate.term
        assert term is not None
        if self.term is not None:
            assert term > self.term, f"{self.candidate.node} won again with term {term}, not above {self.term}"
        self.term = term
        return term


def campaigns(store: Store, keys: list[str], ttl: float, stopping: list) -> list[Campaign]:
    """A leading candidate for each key, all on ``store``."""
    made = []
    for i, key in enumerate(keys):
        campaign = Campaign(store, key, f"node-{i}", ttl)
        stopping.append(campaign.candidate)
        made.append(campaign)
    for campaign in made:
        campaign.wins(3 * ttl + 10)
    return made


def losses(seen: list[LeadershipEvent], candidate: Candidate) -> list[LeadershipLost]:
    return [e for e in seen if isinstance(e, LeadershipLost) and e.source is candidate]


def reported_loss(seen: list[LeadershipEvent], c: Campaign, timeout: float) -> LeadershipLost:
    """The one LeadershipLost of ``c``'s tenure (events are delivered from another greenlet)."""
    wait_until(lambda: losses(seen, c.candidate), timeout, f"{c.candidate.node}'s LeadershipLost")
    lost = losses(seen, c.candidate)
    assert len(lost) == 1, f"{c.candidate!r} reported {len(lost)} losses: {lost}"
    assert lost[0].term == c.term and isinstance(lost[0].reason, LossReason), lost
    return lost[0]


def keeps_leading(campaigns_: list[Campaign], seen: list[LeadershipEvent], ttl: float) -> None:
    """Each candidate leads throughout the next three TTLs (it is still renewing), with the
    same term, without a loss event since its last win and without a new item on ``elected``."""
    lost_before = {c.candidate: len(losses(seen, c.candidate)) for c in campaigns_}
    held_until = time.monotonic() + 3 * ttl
    while time.monotonic() < held_until:
        for c in campaigns_:
            assert c.candidate.is_leader(), f"{c.candidate!r} stopped leading"
        gevent.sleep(0.05)
    for c in campaigns_:
        assert c.candidate.term == c.term, f"{c.candidate!r}'s term changed from {c.term}"
        lost = losses(seen, c.candidate)[lost_before[c.candidate]:]
        assert not lost, f"{c.candidate!r} reported a loss: {lost}"
        assert c.elected.qsize() == 0, f"{c.candidate!r} has a new item on elected: {c.elected.peek()}"
        assert c.errors.qsize() == 0, f"{c.candidate!r} reported an error: {c.errors.peek()}"


# -- out of band: the store's server, through a client of its own ----------------------------------


def _etcdctl(env: BackendEnv, *args: str) -> str:
    endpoints = ",".join(f"http://{addr}" for addr in env.cluster.addrs)
    done = subprocess.run(["etcdctl", "--endpoints", endpoints, *args], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}"
    return done.stdout


def _etcd_leader_kv(env: BackendEnv, key: str) -> dict:
    """The leading candidate key ``<key>/<lease hex>`` (the oldest), as etcdctl shows it."""
    reply = json.loads(_etcdctl(env, "get", "--prefix", f"{key}/", "-w", "json"))
    prefix = f"{key}/"
    candidates = []
    for kv in reply.get("kvs", []):
        name = base64.b64decode(kv["key"]).decode()
        if "/" not in name[len(prefix):]:  # not a twin <key>/<lease hex>/live
            candidates.append({**kv, "name": name})
    assert candidates, f"nobody holds {key!r}"
    return min(candidates, key=lambda kv: int(kv["create_revision"]))


def _consul_client(env: BackendEnv):
    from tests import support_consul
    return support_consul.consul_client(env.cluster.addrs[0])


def _zookeeper_owner(store: Store, key: str) -> int:
    from tests import support_zookeeper
    path = store.path_for(key)  # type: ignore[attr-defined]
    with support_zookeeper.admin_client(store.hosts) as client:  # type: ignore[attr-defined]
        queue = support_zookeeper.contenders(client, path)
        assert queue, f"nobody holds {key!r}"
        _, stat = client.get(f"{path}/{queue[0]}")
        return stat.ephemeralOwner


def delete_key(kind: str, env: BackendEnv, store: Store, key: str) -> None:
    """Delete the holder's registration of ``key`` from outside, leaving its session or lease
    alive: ``consul kv delete``, ``etcdctl del <key>/<lease hex>``, a kazoo ``delete`` of its
    node, an unlinked lock file, a DELETE of its row; the memory store drops the one holder."""
    if kind == "memory":
        assert store.expire(key), f"nobody held {key!r}"  # type: ignore[attr-defined]
    elif kind == "file":
        os.unlink(store.path_for(key))  # type: ignore[attr-defined]
    elif kind == "consul":
        client = _consul_client(env)
        _, entry = client.kv.get(key)
        assert entry is not None and entry.get("Session"), f"nobody holds {key!r}"
        assert client.kv.delete(key)
    elif kind == "etcd":
        _etcdctl(env, "del", _etcd_leader_kv(env, key)["name"])
    elif kind == "postgres":
        from tests import support_postgres
        support_postgres.force_expire(store, key)  # deletes the holder's row from a connection of its own
    else:
        from tests import support_zookeeper
        support_zookeeper.force_expire(store, key)  # deletes the holder's node from another session


def carriers(kind: str, env: BackendEnv, store: Store, keys: list[str]) -> dict[str, object]:
    """For each key, the session or lease that holds it, as the server tells."""
    if kind == "consul":
        client = _consul_client(env)
        return {key: client.kv.get(key)[1]["Session"] for key in keys}
    if kind == "etcd":
        return {key: int(_etcd_leader_kv(env, key)["lease"]) for key in keys}
    return {key: _zookeeper_owner(store, key) for key in keys}


def lose_carrier(kind: str, env: BackendEnv, store: Store, carrier: object) -> set[object]:
    """End ``carrier`` from outside, as the server would on a missed TTL: Consul's session
    destroy, etcd's lease revoke, ZooKeeper's session expiry. Returns what was ended."""
    if kind == "consul":
        assert _consul_client(env).session.destroy(carrier)
        return {carrier}
    if kind == "etcd":
        _etcdctl(env, "lease", "revoke", f"{carrier:x}")
        return {carrier}
    from tests import support_zookeeper
    # Only the session's own id and password can end it: every session of this store object is
    # expired (its candidates here all have one TTL, so that is the one that carries their keys).
    expired = set(support_zookeeper.expire_sessions(store))
    assert carrier in expired, f"session {carrier:#x} is not one of the store's {sorted(expired)}"
    return expired


# -- (a), (b), (c): one candidate leaves, another loses its key; the others lead on ---------------------


def test_leaving_or_losing_one_key_ends_only_that_tenure(kind, backend_env, store, keys, ttl, seen,
                                                         stopping) -> None:
    """On one store object, one candidate resigns (a), another stops (b), and the key of a third
    is deleted from outside (c): each of those tenures ends, with its own LeadershipLost and
    reason, and nothing else does. The resigner and the third campaign again on the same store
    object and win their keys back; the candidate left alone leads on with its term; all three
    are still renewing three TTLs later.

    The three cases share that one window of three TTLs (30 s on Consul, whose sessions may
    outlive their TTL twice over): a leaving or a loss that took the shared session, lease or
    renewal with it shows there, as the loss of every key it carried."""
    resigner, stopper, deleted, bystander = campaigns(store, keys, ttl, stopping)

    def bystander_leads(after: str) -> None:
        assert bystander.candidate.is_leader() and bystander.candidate.term == bystander.term, (
            f"the bystander stopped leading (or changed term) after {after}")

    resigner.candidate.resign()
    assert not resigner.candidate.is_leader()
    assert reported_loss(seen, resigner, 3 * ttl).reason is LossReason.RESIGNED
    bystander_leads("a resign")
    stopper.candidate.stop()
    assert not stopper.candidate.is_leader()
    assert reported_loss(seen, stopper, 3 * ttl).reason is LossReason.STOPPED
    bystander_leads("a stop")
    delete_key(kind, backend_env, store, deleted.key)
    assert next_item(deleted.elected, 3 * ttl + 10, "the step-down of the deleted key's holder") is False
    lost = reported_loss(seen, deleted, 3 * ttl)
    assert lost.reason not in (LossReason.RESIGNED, LossReason.STOPPED), lost
    bystander_leads("the deletion of another key")
    assert next_item(resigner.elected, 3 * ttl, "the resigner's step-down") is False
    resigner.wins(3 * ttl + 10)
    deleted.wins(3 * ttl + 10)
    keeps_leading([bystander, resigner, deleted], seen, ttl)


# -- (d): the shared session or lease lost -----------------------------------------------------------


#: The stores whose holds share a session or lease. The others (memory: each hold its own expiry
#: timer; file: a lock on its own file; postgres: a row of its own with its own expiry) have no
#: session to lose: the loss of one key (test_leaving_or_losing_one_key_ends_only_that_tenure)
#: is all there is to lose, so this test is not theirs (rather than skipped on them).
SESSION_KINDS = [kind for kind in STORE_KINDS if kind in ("consul", "etcd", "zookeeper")]


@pytest.mark.parametrize("kind", SESSION_KINDS)
def test_a_lost_session_ends_every_tenure_it_carried(kind, backend_env, store, keys, ttl, seen,
                                                     stopping) -> None:
    """The session (or lease) holding one key ends from outside: each tenure it carried ends,
    each with a LeadershipLost of its own and a LossReason; each candidate campaigns again and
    wins; a tenure on another session leads on."""
    everyone = campaigns(store, keys, ttl, stopping)
    held_by = carriers(kind, backend_env, store, keys)
    ended = lose_carrier(kind, backend_env, store, held_by[keys[0]])
    carried = [c for c in everyone if held_by[c.key] in ended]
    spared = [c for c in everyone if held_by[c.key] not in ended]
    assert everyone[0] in carried
    for c in carried:
        assert next_item(c.elected, 3 * ttl + 10, f"{c.candidate.node} to step down") is False
        lost = reported_loss(seen, c, 3 * ttl)
        assert lost.reason not in (LossReason.RESIGNED, LossReason.STOPPED), lost
    for c in carried:
        c.wins(3 * ttl + 15)
    if spared:
        keeps_leading(spared, seen, ttl)


# -- (e): followers of one key on one store object ----------------------------------------------------


def names_until(leaders, node: str | None, timeout: float, what: str) -> list:
    """Items of a follower's ``leaders`` queue up to and including ``node``."""
    items = []
    with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                                f"saw {items}")):
        while True:
            item = leaders.get()
            items.append(item)
            if item == node:
                return items


def assert_deduplicated(items: list) -> None:
    """A follower names each leader once per change: never the same node twice in a row."""
    repeats = [a for a, b in itertools.pairwise(items) if a is not None and a == b]
    assert not repeats, f"a follower reported {repeats} twice in a row: {items}"


def test_followers_on_one_store_all_name_the_new_leader(make_store, key, ttl, stopping, seen) -> None:
    """Three followers of one key on one store object (one starting once the key is held)
    each name the leader, then the next one after a handover, then a vacancy; stopping one of
    them leaves the others following. Each publishes its own LeaderChanged for each change it
    names (the watch is shared, the events are not)."""
    shared, reader = make_store(), make_store()
    followers = [Follower(shared, key) for _ in range(2)]
    stopping.extend(followers)
    queues = [f.follow_election()[0] for f in followers]
    named: list[list] = [[] for _ in followers]
    alice = Campaign(make_store(), key, "alice", ttl)
    stopping.append(alice.candidate)
    alice.wins(3 * ttl + 10)
    bob = Campaign(make_store(), key, "bob", ttl)  # waits behind alice
    stopping.append(bob.candidate)
    wait_until(lambda: reader.leader(key) is not None, 3 * ttl, "the store to name alice")
    late = Follower(shared, key)
    stopping.append(late)
    followers.append(late)
    queues.append(late.follow_election()[0])
    named.append([])
    # It hears what its shared watch last showed (a vacancy, if the watch has not yet caught up
    # with the read above), then alice.
    named[-1] += names_until(queues[-1], "alice", 3 * ttl, "the late follower to name alice")
    assert named[-1] in (["alice"], [None, "alice"]), named[-1]
    for i, leaders in enumerate(queues[:-1]):
        named[i] += names_until(leaders, "alice", 3 * ttl, f"follower {i} to name alice")

    alice.candidate.stop()  # bob waits behind her: the handover
    bob.wins(3 * ttl + 10)
    for i, leaders in enumerate(queues):
        named[i] += names_until(leaders, "bob", 3 * ttl + 10, f"follower {i} to name bob")
        assert followers[i].leader() == "bob"

    followers[0].stop()  # the others follow on
    drain(queues[0], 5, "the stopped follower's queue")
    bob.candidate.stop()
    for i, leaders in enumerate(queues[1:], start=1):
        named[i] += names_until(leaders, None, 3 * ttl + 10, f"follower {i} to report the vacancy")
        assert followers[i].leader() is None and followers[i].known
    for items in named:
        assert_deduplicated(items)
    def published(follower: Follower) -> list:
        return [e.leader for e in seen if isinstance(e, LeaderChanged) and e.source is follower]

    for i, (follower, names) in enumerate(zip(followers, named, strict=True)):
        wait_until(lambda f=follower, n=names: published(f) == n, 10,
                   f"follower {i}'s LeaderChanged events, one per name on its queue ({names})")


def test_candidates_and_followers_on_one_store_object(store, key, ttl, stopping, seen) -> None:
    """Two candidates of one key and a follower, all on one store object: one leads, the other
    waits; the leader's stop() hands the key to the waiter, which the follower then names."""
    alice = Campaign(store, key, "alice", ttl)
    stopping.append(alice.candidate)
    alice.wins(3 * ttl + 10)
    bob = Campaign(store, key, "bob", ttl)
    follower = Follower(store, key)
    stopping.extend([bob.candidate, follower])
    leaders, _ = follower.follow_election()
    names_until(leaders, "alice", 3 * ttl, "the follower to name alice")
    assert not bob.candidate.is_leader()
    alice.candidate.stop()
    bob.wins(3 * ttl + 10)
    names_until(leaders, "bob", 3 * ttl + 10, "the follower to name bob")
    assert not alice.candidate.is_leader()
    def acquired() -> list[str]:
        return [e.node for e in seen if isinstance(e, LeadershipAcquired)]

    wait_until(lambda: len(acquired()) >= 2, 3 * ttl, "bob's LeadershipAcquired")
    assert acquired() == ["alice", "bob"], acquired()



def test_followers_of_one_key_share_one_store_watch(make_store, key, ttl, stopping) -> None:
    """Five followers of one key on one store object open one ``store.watch(key)`` between them
    (a change costs one notification, not five); it stays open while any of them follows and
    is closed when the last one stops. A follower of another key has a watch of its own."""
    store = make_store()
    opened: list[str] = []
    closed: list[str] = []
    watch = store.watch

    def counting_watch(watched: str):
        opened.append(watched)
        inner = watch(watched)
        try:
            yield from inner
        finally:
            inner.close()
            closed.append(watched)

    store.watch = counting_watch  # type: ignore[method-assign]
    alice = Campaign(make_store(), key, "alice", ttl)
    stopping.append(alice.candidate)
    alice.wins(3 * ttl + 10)
    followers = [Follower(store, key) for _ in range(5)]
    other = Follower(store, key + "-other")
    stopping.extend([*followers, other])
    queues = [f.follow_election()[0] for f in followers]
    other_leaders, _ = other.follow_election()
    for i, leaders in enumerate(queues):
        names_until(leaders, "alice", 3 * ttl, f"follower {i} to name alice")
    assert next_item(other_leaders, 3 * ttl, "the other key's follower's first item") is None
    assert sorted(opened) == [key, key + "-other"], opened
    for follower in followers[:-1]:
        follower.stop()
    assert closed == [], "the shared watch closed while a follower still followed"
    alice.candidate.stop()
    names_until(queues[-1], None, 3 * ttl + 10, "the last follower to report the vacancy")
    followers[-1].stop()
    assert closed == [key], closed
    assert sorted(opened) == [key, key + "-other"], opened


def test_a_watch_error_reaches_every_follower_sharing_it(key, stopping) -> None:
    """The memory store made to fail: the error of the one shared watch ends every follower
    (none retries), each with the error on its own queue."""
    from greenleader.stores.memory import MemoryStore
    store = MemoryStore()
    followers = [Follower(store, key) for _ in range(3)]
    stopping.extend(followers)
    channels = [f.follow_election() for f in followers]
    for i, (leaders, _) in enumerate(channels):
        assert next_item(leaders, 5, f"follower {i}'s first item") is None
    store.fail()
    for i, (leaders, errors) in enumerate(channels):
        drain(leaders, 5, f"follower {i}'s leaders")
        assert [type(e).__name__ for e in drain(errors, 5, f"follower {i}'s errors")] == ["StoreUnavailableError"]


def test_followers_sharing_a_quiet_watch_share_its_leader_checks(key, stopping) -> None:
    """A quiet watch is confirmed by a read of the leader every ``unknown_after / 2``: twenty
    followers sharing it share the read and its confirmation (one read per quiet period, not
    twenty), and all keep knowing the leader."""
    from greenleader.stores.memory import MemoryStore
    store = MemoryStore()
    alice = Campaign(store, key, "alice", 5.0)
    stopping.append(alice.candidate)
    alice.wins(10)
    reads: list[float] = []
    leader = store.leader

    def counting_leader(read_key: str):
        reads.append(time.monotonic())
        return leader(read_key)

    store.leader = counting_leader  # type: ignore[method-assign]
    followers = [Follower(store, key, unknown_after=1.0) for _ in range(20)]
    stopping.extend(followers)
    for i, follower in enumerate(followers):
        names_until(follower.follow_election()[0], "alice", 5, f"follower {i} to name alice")
    started, before = time.monotonic(), len(reads)
    while time.monotonic() < started + 3.0:
        assert all(f.known and f.leader() == "alice" for f in followers), "a follower lost track of alice"
        gevent.sleep(0.05)
    # Unshared, each follower reads every 0.5 s: about 120 reads in these 3 s.
    assert len(reads) - before < 20, f"{len(reads) - before} leader reads in 3 s for 20 followers"


def test_a_follower_that_fails_on_a_value_ends_only_its_own_watch(key, stopping) -> None:
    """Values of a shared watch are handed to its followers in one greenlet: one follower
    failing on a value (a bug) ends that follower's watch with an error, while the others
    sharing the watch go on and name the next leader."""
    from greenleader.stores.memory import MemoryStore
    store = MemoryStore()
    followers = [Follower(store, key) for _ in range(3)]
    stopping.extend(followers)
    channels = [f.follow_election() for f in followers]
    for i, (leaders, _) in enumerate(channels):
        assert next_item(leaders, 5, f"follower {i}'s first item") is None

    def broken(info: object) -> None:
        raise RuntimeError("a bug in reporting")

    followers[1]._report = broken  # type: ignore[method-assign]
    alice = Campaign(store, key, "alice", 5.0)
    stopping.append(alice.candidate)
    alice.wins(10)
    for i in (0, 2):
        assert names_until(channels[i][0], "alice", 5, f"follower {i} to name alice") == ["alice"]
    drain(channels[1][0], 5, "the failed follower's leaders")
    errors = drain(channels[1][1], 5, "the failed follower's errors")
    assert [type(e).__name__ for e in errors] == ["StoreError"] and "a bug in reporting" in str(errors[0]), errors
    alice.candidate.stop()
    for i in (0, 2):
        assert names_until(channels[i][0], None, 10, f"follower {i} to report the vacancy") == [None]
