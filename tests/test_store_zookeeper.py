"""ZooKeeper store specifics, against real servers: chroot URLs, path rules, czxid terms,
FIFO queue with predecessor watches, SUSPENDED and LOST sessions, dead endpoints, a killed
candidate process, and a 3-node ensemble losing servers under a running election."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.monkey
import gevent.socket
import pytest
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, READ_ACL_UNSAFE

from greenleader import Candidate, Follower
from greenleader.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidURLError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from greenleader.events import LeadershipLost, LossReason
from greenleader.stores import LeaderInfo, from_url, new_store
from greenleader.stores.zookeeper import ZooKeeperStore
from tests import servers
from tests.support_zookeeper import FAST_TTL, admin_client, closed_port, contenders, expire_sessions
from tests.waiting import drain, next_item, wait_until

log = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(120)

TTL = FAST_TTL
#: Bound of a wait for something expected within a few round trips: generous, as a loaded
#: 2-core CI machine can stall any process for seconds; only failures wait that long.
WAIT = 20.0


@pytest.fixture
def stores(zookeeper_cluster) -> Iterator[Callable[..., ZooKeeperStore]]:
    """Factory of stores on the shared server (each its own client/session); closed at the end."""
    made: list[ZooKeeperStore] = []

    def make(**options) -> ZooKeeperStore:
        store = ZooKeeperStore(zookeeper_cluster.addrs, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[servers.Cluster]:
    """A ZooKeeper server of this test's own, for tests that stop it."""
    try:
        cluster = servers.start("zookeeper", tmp_path / "zk")
    except servers.ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def events() -> Iterator[list]:
    import zope.event

    seen: list = []
    zope.event.subscribers.append(seen.append)
    yield seen
    zope.event.subscribers.remove(seen.append)


class Sampler:
    """Samples ``is_leader()`` of candidates every ``period`` seconds and records every
    instant at which more than one of them believed it led.

    How often it got to run depends on the machine's load, so nothing is asserted about
    that (a loaded 2-core CI ran it only 10 times in one test): it only adds evidence to
    the checks the tests make themselves at each step. :meth:`stop` takes one last sample
    itself, and fails if the sampling greenlet died instead of sampling.
    """

    def __init__(self, candidates: list[Candidate], period: float = 0.003) -> None:
        self.candidates = candidates
        self.period = period
        self.samples = 0
        self.overlaps: list[tuple[float, list[str]]] = []
        self.history: list[tuple[float, str | None]] = []  # (time, leader) at each change
        self._greenlet = gevent.spawn(self._run)

    def sample(self) -> None:
        leaders = [c.node for c in self.candidates if c.is_leader()]
        now = time.monotonic()
        self.samples += 1
        if len(leaders) > 1:
            self.overlaps.append((now, leaders))
        current = leaders[0] if leaders else None
        if not self.history or self.history[-1][1] != current:
            self.history.append((now, current))

    def _run(self) -> None:
        while True:
            self.sample()
            gevent.sleep(self.period)

    def stop(self) -> None:
        died = self._greenlet.dead and not self._greenlet.successful()
        self._greenlet.kill()
        self.sample()
        log.info("sampler: %d samples", self.samples)
        assert not died, f"the sampler died: {self._greenlet.exception!r}"
        assert not self.overlaps, f"two candidates believed they led at once: {self.overlaps[:5]}"


def leader_of(candidates: list[Candidate]) -> Candidate | None:
    leaders = [c for c in candidates if c.is_leader()]
    assert len(leaders) <= 1, f"two leaders: {[c.node for c in leaders]}"
    return leaders[0] if leaders else None


def wait_leader(candidates: list[Candidate], timeout: float, what: str) -> Candidate:
    wait_until(lambda: leader_of(candidates) is not None, timeout, what, interval=0.005)
    leader = leader_of(candidates)
    assert leader is not None
    return leader


# -- URLs, options, keys ----------------------------------------------------------------------


def test_from_url_with_chroot(zookeeper_cluster, key) -> None:
    hosts = ",".join(zookeeper_cluster.addrs)
    chroot = f"/greenleader-chroot/{key.replace('/', '-')}"
    store = from_url(f"zookeeper://{hosts}{chroot}?timeout=3")
    try:
        assert isinstance(store, ZooKeeperStore)
        assert store.root == chroot and store.timeout == 3.0
        assert store.path_for(key) == f"{chroot}/{key}"
        assert store.path_for("/" + key) == f"{chroot}/{key}"
        with Candidate(store, key, "alice", ttl=TTL) as alice:
            elected, _ = alice.run_for_election()
            assert next_item(elected, WAIT, "False first") is False
            assert next_item(elected, WAIT, "alice elected") is True
            with admin_client(zookeeper_cluster.addrs) as zk:
                (name,) = contenders(zk, f"{chroot}/{key}")  # the chroot was created on first use
                data, stat = zk.get(f"{chroot}/{key}/{name}")
                assert data == b"alice" and stat.czxid == alice.term and stat.ephemeralOwner != 0
                assert not zk.exists(f"/{key}"), "a chrooted store must not write outside its chroot"
            assert store.leader(key).node == "alice"
    finally:
        store.close()
    # the same through new_store() and the zk alias, and the chroot as a keyword
    with new_store("zk", zookeeper_cluster.addrs, chroot=chroot) as again:
        assert again.leader(key) is None


@pytest.mark.parametrize(
    "url, error",
    [
        ("zookeeper://127.0.0.1:2181/a//b", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181/a/", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181/zookeeper", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?timeout=soon", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?timeout=0", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?use_ssl=maybe", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?auth=nocolon", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?chroot=/x", InvalidArgumentError),
        ("zookeeper://127.0.0.1:2181?no_such_option=1", InvalidURLError),
        ("zookeeper://127.0.0.1:notaport", InvalidArgumentError),
    ],
)
def test_bad_urls_are_rejected(url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        from_url(url)


@pytest.mark.parametrize(
    "bad_key",
    ["a//b", "a/", "a/./b", "a/../b", "..", ".", "zookeeper", "/zookeeper/quota",
     "a\u0085b", "a\ud800b", "a\ufff0b", "a\x7fb"],
)
def test_keys_must_be_zookeeper_paths(stores, bad_key: str) -> None:
    store = stores()
    with pytest.raises(InvalidKeyError):
        Candidate(store, bad_key, "alice", ttl=TTL)
    with pytest.raises(InvalidKeyError):
        Follower(store, bad_key)
    with pytest.raises(InvalidKeyError):
        store.leader(bad_key)


def test_valid_keys(stores, key) -> None:
    store, chrooted = stores(), stores(chroot="/greenleader-chroot")
    for good in [key, "/" + key, f"{key}/a.b", f"{key}/..a", f"{key}/zookeeper", f"{key}/ünïcödé"]:
        assert store.validate_key(good) == good
        assert store.leader(good) is None
    assert chrooted.validate_key("zookeeper/x") == "zookeeper/x"  # reserved only at the real root
    assert chrooted.path_for("zookeeper/x") == "/greenleader-chroot/zookeeper/x"


def test_ttl_the_server_will_not_keep_is_refused(stores, key) -> None:
    """The fixture server grants 0.4 s to 60 s: a TTL outside is refused, clearly, and the
    limit learnt is then checked when the candidate is made."""
    store = stores()
    for ttl, limit in ((120.0, "at most 60s"), (0.2, "at least 0.4s")):
        candidate = Candidate(store, key, "alice", ttl=ttl)
        elected, errors = candidate.run_for_election()
        assert drain(elected, 10, "elected") == [False]
        (error,) = drain(errors, 5, "errors")
        assert isinstance(error, InvalidArgumentError) and limit in str(error), error
        with pytest.raises(InvalidArgumentError, match=limit):
            Candidate(store, key, "alice", ttl=ttl)
    with Candidate(store, key, "alice", ttl=TTL) as fine:  # the store still works
        elected, _ = fine.run_for_election()
        assert next_item(elected, WAIT, "False") is False
        assert next_item(elected, WAIT, "elected with a TTL the server keeps") is True
    with admin_client(store.hosts) as zk:
        cons = zk.command(b"cons")
    assert f"to={int(TTL * 1000)}" in cons, f"no session with a {TTL}s timeout in:\n{cons}"


def test_digest_auth_owns_the_nodes(zookeeper_cluster, stores) -> None:
    """With ``auth``, every node the store creates belongs to that identity: the candidates'
    nodes, the key's node and the ancestors it had to create (``digest:<user>:cdrwa,
    world:anyone:r``). Anyone may read (follow); a store with other credentials, or none, is
    refused with PermissionDeniedError (not a kazoo error) when it tries to join, to create
    a sibling key under those ancestors, or to delete and remake the key's empty node.

    Ancestors are restricted on purpose, not left open: under an open parent anyone may
    delete the key's node between elections (ZooKeeper checks DELETE on the parent) and remake
    it with an ACL that keeps the owner out, or change the parent's ACL. An operator who wants
    several identities under one prefix makes that prefix first, with the rights they need
    (docs/security.md, and the next test). The key is under a top-level prefix of this
    test's own, so the store creates every ancestor here, whatever ran before.
    """
    prefix = f"/greenleader-acl-{uuid.uuid4().hex[:12]}"
    key = f"{prefix}/app/leader"
    alice_store = from_url(f"{zookeeper_cluster.url}?auth=alice:secret")
    mallory_store, anonymous = stores(auth="mallory:guess"), stores()
    try:
        lease = alice_store.acquire(key, "alice", TTL)
        assert anonymous.leader(key).node == "alice"  # no credentials needed to follow
        for store, other_key in [(mallory_store, key), (mallory_store, f"{prefix}/app/sibling"),
                                 (anonymous, f"{prefix}/sibling")]:
            with pytest.raises(PermissionDeniedError):
                store.acquire(other_key, "mallory", TTL)
        path = alice_store.path_for(key)
        with admin_client(alice_store.hosts) as zk:
            with pytest.raises(NoAuthError):
                zk.delete(lease.path)  # type: ignore[attr-defined]
            for node in (path, f"{prefix}/app", prefix):
                acls = zk.get_acls(node)[0]  # the server stores the digest identity as given
                assert [(a.perms, a.id.scheme) for a in acls] == [(31, "digest"), (1, "world")], (node, acls)
                assert acls[0].id.id.startswith("alice:") and acls[1:] == READ_ACL_UNSAFE, (node, acls)
        lease.release()
        assert alice_store.leader(key) is None
        with admin_client(alice_store.hosts) as zk:
            assert zk.get_children(path) == []
            with pytest.raises(NoAuthError):
                zk.delete(path)  # empty now, but its parent is alice's
            with pytest.raises(NoAuthError):
                zk.set_acls(f"{prefix}/app", OPEN_ACL_UNSAFE)
        with pytest.raises(PermissionDeniedError):  # and the key stays closed to mallory
            mallory_store.acquire(key, "mallory", TTL)
    finally:
        alice_store.close()


def test_digest_auth_keeps_the_acl_of_a_prefix_made_beforehand(zookeeper_cluster, stores) -> None:
    """The store never changes the ACL of a node it did not create: under a prefix an
    operator made open to all beforehand, two identities each own the key they created."""
    prefix = f"/greenleader-acl-{uuid.uuid4().hex[:12]}"
    with admin_client(zookeeper_cluster.addrs) as zk:
        zk.create(prefix, b"", acl=OPEN_ACL_UNSAFE)
    alice_store, bob_store = stores(auth="alice:secret"), stores(auth="bob:secret")
    alice_lease = alice_store.acquire(f"{prefix}/a", "alice", TTL)
    bob_lease = bob_store.acquire(f"{prefix}/b", "bob", TTL)
    with admin_client(zookeeper_cluster.addrs) as zk:
        assert zk.get_acls(prefix)[0] == OPEN_ACL_UNSAFE
        for owner in ("alice", "bob"):
            acls = zk.get_acls(f"{prefix}/{owner[0]}")[0]
            assert acls[0].id.scheme == "digest" and acls[0].id.id.startswith(f"{owner}:"), acls
    with pytest.raises(PermissionDeniedError):
        bob_store.acquire(f"{prefix}/a", "bob", TTL)
    alice_lease.release()
    bob_lease.release()


# -- election on nodes -------------------------------------------------------------------------


def test_term_is_the_czxid_and_increases(stores, key) -> None:
    store = stores()
    path = store.path_for(key)
    terms = []
    with admin_client(store.hosts) as zk:
        for node in ("alice", "bob", "carol"):
            with Candidate(stores(), key, node, ttl=TTL) as candidate:
                elected, _ = candidate.run_for_election()
                assert next_item(elected, WAIT, "False") is False
                assert next_item(elected, WAIT, f"{node} elected") is True
                (name,) = contenders(zk, path)
                data, stat = zk.get(f"{path}/{name}")
                assert data == node.encode()
                assert stat.ephemeralOwner != 0, "the leader's node must be ephemeral"
                assert candidate.term == stat.czxid
                assert store.leader(key).term == stat.czxid
                terms.append(candidate.term)
    assert terms == sorted(terms) and len(set(terms)) == 3, terms


def test_stop_and_release_leave_no_node(stores, key) -> None:
    store = stores()
    path = store.path_for(key)
    alice, bob = Candidate(stores(), key, "alice", ttl=TTL), Candidate(stores(), key, "bob", ttl=TTL)
    with admin_client(store.hosts) as zk:
        alice_elected, _ = alice.run_for_election()
        assert next_item(alice_elected, WAIT, "False") is False
        assert next_item(alice_elected, WAIT, "alice elected") is True
        bob.run_for_election()
        wait_until(lambda: len(contenders(zk, path)) == 2, WAIT, "bob to queue up")
        bob.stop()  # withdraws while waiting
        assert len(contenders(zk, path)) == 1, "bob's node must be gone when stop() returns"
        alice.stop()
        assert contenders(zk, path) == [], "alice's node must be gone when stop() returns"
        # killing a greenlet blocked in acquire() withdraws too
        blocker = Candidate(stores(), key, "blocker", ttl=TTL)
        blocker.run_for_election()
        wait_until(blocker.is_leader, WAIT, "blocker leads")
        waiter_store = stores()
        waiting = gevent.spawn(waiter_store.acquire, key, "killed", TTL)
        wait_until(lambda: len(contenders(zk, path)) == 2, WAIT, "the raw acquire to queue up")
        waiting.kill()
        assert len(contenders(zk, path)) == 1, "a killed acquire() must delete its node"
        blocker.stop()
        assert contenders(zk, path) == []
        # a lease released by hand, twice
        lease = waiter_store.acquire(key, "direct", TTL)
        assert contenders(zk, path) != []
        lease.release()
        lease.release()
        assert contenders(zk, path) == []
        assert store.leader(key) is None


def test_waiters_queue_in_order_and_each_watches_only_its_predecessor(stores, key) -> None:
    """Five candidates queue up; each watches its predecessor's node and its own (and its own
    twin; the second also the leader's twin), nobody watches the key's children (no thundering
    herd); releasing the leader wakes only the next one, so the winners come in queue order."""
    store = stores()
    path = store.path_for(key)
    crowd = []
    with admin_client(store.hosts) as zk:
        for i in range(5):
            candidate = Candidate(stores(), key, f"node{i}", ttl=TTL * 5)
            crowd.append(candidate)
            candidate.run_for_election()
            wait_until(lambda n=i: len(contenders(zk, path)) == n + 1, WAIT, f"node{i} to queue up")
        wait_leader(crowd, WAIT, "node0 leads")
        queue = contenders(zk, path)
        owners = [zk.exists(f"{path}/{name}").ephemeralOwner for name in queue]
        assert [zk.get(f"{path}/{name}")[0].decode() for name in queue] == [c.node for c in crowd]
        expected = {
            f"{path}/{name}": {owners[i]} | ({owners[i + 1]} if i + 1 < len(queue) else set())
            for i, name in enumerate(queue)
        }
        # a twin is watched by its owner, and the first one also by the second in line, which
        # then needs no listing once the first releases
        expected.update({f"{path}/{name.partition('__lock__')[0]}__live__":
                         {owners[i]} | ({owners[1]} if i == 0 else set()) for i, name in enumerate(queue)})
        seen: dict[str, set[int]] = {}

        def watched_as_expected() -> bool:
            # A waiter re-arms its watch on its predecessor when the leader's claim (a write to
            # its node) fires it, so a listing taken in between may miss it for a moment.
            nonlocal seen
            seen = _watches_by_path(zk.command(b"wchp"))
            assert path not in seen, f"someone watches the key's children: {seen[path]}"
            return {p: w for p, w in seen.items() if p.startswith(f"{path}/")} == expected

        try:
            wait_until(watched_as_expected, WAIT, "each node is watched by itself and its successor only")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; expected watchers {expected}, seen {seen}") from None
        sampler = Sampler(crowd)
        order = []
        for _ in range(5):
            leader = wait_leader(crowd, WAIT, "the next leader")
            order.append(leader.node)
            leader.stop()
        sampler.stop()
    assert order == [f"node{i}" for i in range(5)], f"winners came out of queue order: {order}"


def _watches_by_path(wchp: str) -> dict[str, set[int]]:
    """Parse the ``wchp`` four-letter command: path lines, then tab-indented session ids."""
    watches: dict[str, set[int]] = {}
    current = None
    for line in wchp.splitlines():
        if line.startswith("/"):
            current = line.strip()
            watches[current] = set()
        elif line.strip().startswith("0x") and current is not None:
            watches[current].add(int(line.strip(), 16))
    return watches


def test_follower_names_only_claimed_leaders(stores, key) -> None:
    """A follower reports a node only once the candidate that won it leads (its claim)."""
    crowd = [Candidate(stores(), key, f"node{i}", ttl=TTL) for i in range(3)]
    with Follower(stores(), key) as follower:
        leaders, _ = follower.follow_election()
        assert next_item(leaders, WAIT, "the vacancy") is None
        for candidate in crowd:
            candidate.run_for_election()
        for _ in range(3):
            node = next_item(leaders, WAIT, "a leader")
            while node is None:
                node = next_item(leaders, WAIT, "a leader")
            leader = next(c for c in crowd if c.node == node)
            assert leader.is_leader(), f"the follower named {node} before it knew it led"
            leader.stop()
        assert next_item(leaders, WAIT, "the final vacancy") is None


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged-uid", "twin-only"])
def test_an_unclaimed_greenleader_node_first_in_line_is_never_named(stores, key, tagged) -> None:
    """A greenleader node first in line that has not been claimed (its candidate may not know
    it leads, rule 10) is not named, unlike a kazoo Lock's node: it is told by its uid's tag,
    which stays when an operator deletes its twin (tagged-uid), or, for a node made before
    the tag, by its twin (twin-only). Once claimed, it is named."""
    from greenleader.stores.zookeeper import recipe as zookeeper

    store = stores()
    path = store.path_for(key)
    session = store._lease_session(store.validate_ttl(TTL * 5))
    store._ensure_key(session, path)
    uid = zookeeper._new_uid() if tagged else uuid.uuid4().hex[:-5] + "00000"  # "00000": not the tag
    node = ZooKeeperStore._register(session, path, uid, "frozen")  # node and twin, never claimed
    reader = stores(timeout=0.5)
    with admin_client(store.hosts) as zk:
        if tagged:
            zk.delete(f"{path}/{uid}__live__")  # the twin deleted from outside
        assert reader.leader(key) is None
        watch = reader.watch(key)
        assert next(watch) is None
        zk.set(node, b"frozen")  # the claim (version 1): now it is named
        assert next(watch) == LeaderInfo("frozen", zk.exists(node).czxid)
        watch.close()


def test_a_watch_names_the_successor_at_its_claim_never_before(stores, key) -> None:
    """The watch on a claimed leader also watches the next in line; when the leader's nodes go,
    the successor is named once it claims, never while unclaimed (rule 10): first a successor
    that claims only after the grace (the watch reports the vacancy meanwhile), then one that
    claims at once."""
    store = stores()
    path = store.path_for(key)
    session = store._lease_session(store.validate_ttl(TTL * 5))
    store._ensure_key(session, path)
    from greenleader.stores.zookeeper import recipe as zookeeper

    uids = [zookeeper._new_uid() for _ in range(3)]
    nodes = [ZooKeeperStore._register(session, path, uid, f"n{i}") for i, uid in enumerate(uids)]
    reader = stores()
    with admin_client(store.hosts) as zk:
        zk.set(nodes[0], b"n0")  # n0 claims: it leads
        watch = reader.watch(key)
        assert next(watch) == LeaderInfo("n0", zk.exists(nodes[0]).czxid)
        transaction = zk.transaction()  # a release: node and twin in one transaction
        transaction.delete(nodes[0])
        transaction.delete(f"{path}/{uids[0]}__live__")
        transaction.commit()
        assert next(watch) is None, "an unclaimed successor was named"
        zk.set(nodes[1], b"n1")  # n1 claims, late
        assert next(watch) == LeaderInfo("n1", zk.exists(nodes[1]).czxid)

        def hand_over() -> None:
            transaction = zk.transaction()
            transaction.delete(nodes[1])
            transaction.delete(f"{path}/{uids[1]}__live__")
            transaction.commit()
            zk.set(nodes[2], b"n2")  # the winner claims at once

        handover = gevent.spawn(hand_over)
        named = next(watch)
        while named is None or named.node == "n1":  # n1 read again; a vacancy if n2 claimed late
            named = next(watch)
        handover.join()
        assert named == LeaderInfo("n2", zk.exists(nodes[2]).czxid)
        assert zk.exists(nodes[2]).version == 1
        watch.close()


def test_a_watch_on_a_lone_leader_watches_a_successor_that_queues_later(stores, key) -> None:
    """A claimed leader alone in line: the watch also watches the key's children, so a
    candidate that queues behind it later is read (the leader is named again) and watched as
    the successor, and the leader's going names it at its claim. Without that, the next
    handover would first read the queue again: 2 more round trips between the claim and the
    followers (11-27 ms under load in ``benchmarks.followers_trace``)."""
    from greenleader.stores.zookeeper import recipe as zookeeper

    store = stores()
    path = store.path_for(key)
    session = store._lease_session(store.validate_ttl(TTL * 5))
    store._ensure_key(session, path)
    uids = [zookeeper._new_uid() for _ in range(2)]
    reader = stores()
    with admin_client(store.hosts) as zk:
        first = ZooKeeperStore._register(session, path, uids[0], "n0")
        zk.set(first, b"n0")  # n0 claims: it leads, alone
        watch = reader.watch(key)
        leader = LeaderInfo("n0", zk.exists(first).czxid)
        assert next(watch) == leader
        second = ZooKeeperStore._register(session, path, uids[1], "n1")  # n1 queues behind it
        assert gevent.spawn(next, watch).get(timeout=WAIT) == leader, "the newcomer was not read"
        reader_session = reader._session().client.client_id[0]
        wait_until(lambda: reader_session in _watches_by_path(zk.command(b"wchp")).get(second, set()),
                   WAIT, "the reader to watch the newcomer's node")
        transaction = zk.transaction()  # n0's release, then n1's claim
        transaction.delete(first)
        transaction.delete(f"{path}/{uids[0]}__live__")
        transaction.commit()
        zk.set(second, b"n1")
        named = gevent.spawn(next, watch).get(timeout=WAIT)
        if named is None:  # the claim came after the grace (a loaded machine): the vacancy first
            named = gevent.spawn(next, watch).get(timeout=WAIT)
        assert named == LeaderInfo("n1", zk.exists(second).czxid)
        watch.close()


def test_candidates_of_new_keys_under_a_missing_prefix_all_lead(stores) -> None:
    """Many candidates starting at once on keys whose common parent does not exist yet: the
    parent is made once for all of them (shared), every key is made, and all lead."""
    store = stores()
    prefix = f"new-{uuid.uuid4().hex[:8]}/deeper"
    crowd = [Candidate(store, f"{prefix}/k{i}", f"c{i}", ttl=TTL * 5) for i in range(40)]
    try:
        for candidate in crowd:
            candidate.run_for_election()
        wait_until(lambda: all(c.is_leader() for c in crowd), WAIT, "every candidate to lead")
        with admin_client(store.hosts) as zk:
            assert sorted(zk.get_children(f"/{prefix}")) == sorted(f"k{i}" for i in range(40))
    finally:
        gevent.joinall([gevent.spawn(c.stop) for c in crowd], timeout=WAIT)


def test_kazoos_select_answers_at_once_what_is_ready_and_waits_otherwise() -> None:
    """The handler's select (transport.GeventHandler) returns what is ready without waiting,
    waits for the timeout when nothing is, lets other greenlets run during a long run of
    ready answers, and refuses a closed socket as kazoo's own handler does."""
    from kazoo.handlers.gevent import SequentialGeventHandler

    from greenleader.stores.zookeeper.transport import FAST_STREAK, GeventHandler

    handler = GeventHandler()
    reader, writer = gevent.socket.socketpair()
    try:
        started = time.monotonic()
        assert handler.select([reader], [], [], 0.2) == ([], [], [])
        assert time.monotonic() - started >= 0.19, "nothing was ready, yet it did not wait"
        writer.send(b"x")
        assert handler.select([reader], [writer], [], WAIT) == ([reader], [writer], [])
        ran = gevent.spawn(lambda: None)
        for _ in range(FAST_STREAK + 1):
            assert handler.select([reader], [], [], WAIT)[0] == [reader]
        assert ran.dead, "a run of ready selects never let another greenlet run"
    finally:
        reader.close()
        writer.close()
    errors = []
    for each in (handler, SequentialGeventHandler()):
        with pytest.raises(Exception) as refused:
            each.select([reader], [], [], 0.1)
        errors.append(type(refused.value))
    assert errors[0] is errors[1]


# -- sessions: SUSPENDED and LOST ------------------------------------------------------------------


def test_suspended_connection_ends_leadership_by_the_renew_deadline(own_server, key, events) -> None:
    """Stop the server under a leader: is_leader() turns False by the renew deadline, never
    later; once the server is back (the session survives a standalone restart) the candidate
    campaigns again, and two candidates never lead at once."""
    ttl = 6.0
    alice = Candidate(ZooKeeperStore(own_server.addrs, timeout=5), key, "alice", ttl=ttl, retry=True)
    bob = Candidate(ZooKeeperStore(own_server.addrs, timeout=5), key, "bob", ttl=ttl, retry=True)
    sampler = Sampler([alice, bob])
    try:
        alice_elected, _ = alice.run_for_election()
        assert next_item(alice_elected, ttl, "False") is False
        assert next_item(alice_elected, ttl * 3, "alice elected") is True
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, ttl, "bob's False") is False
        with admin_client(own_server.addrs) as zk:
            wait_until(lambda: len(contenders(zk, alice.store.path_for(key))) == 2, ttl, "bob to queue up")
        alice_store: ZooKeeperStore = alice.store  # type: ignore[assignment]
        (session,) = alice_store._sessions.values()
        session_id = session.session_id

        own_server.nodes[0].stop()
        down = time.monotonic()  # the server process is gone: no renewal is confirmed after this
        # is_leader() checks the renew deadline itself, so once the deadline has passed it
        # must say False, however late a loaded machine lets this greenlet ask.
        gevent.sleep(max(0.0, down + alice.renew_deadline - time.monotonic()))
        assert not alice.is_leader(), f"alice still leads {alice.renew_deadline:.2f}s (her renew deadline) " \
                                      "after the server stopped"
        log.info("past alice's renew deadline (%.2fs) after the server stopped: she no longer leads",
                 alice.renew_deadline)
        assert next_item(alice_elected, WAIT, "alice's False") is False
        wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
        lost = [e for e in events if isinstance(e, LeadershipLost) and e.node == "alice"]
        assert lost and lost[0].reason in (LossReason.DEADLINE, LossReason.STORE_ERROR), lost

        own_server.nodes[0].start()
        back = time.monotonic()
        leader = wait_leader([alice, bob], ttl * 3, "a leader once the server is back")
        log.info("%s leads %.3fs after the server came back", leader.node, time.monotonic() - back)
        assert session.session_id == session_id, "the session should have survived the restart"
        bob.stop()  # alice campaigns again: she leads, or wins once bob is gone
        wait_until(alice.is_leader, ttl * 3, "alice to lead again")
        with admin_client(own_server.addrs) as zk:
            path = alice_store.path_for(key)
            queue = contenders(zk, path)
            assert [zk.get(f"{path}/{name}")[0] for name in queue] == [b"alice"], (
                f"only alice's new node should be left (her pre-outage node deleted): {queue}"
            )
    finally:
        sampler.stop()
        alice.stop()
        bob.stop()
        alice.store.close()
        bob.store.close()


def test_expired_session_reports_the_loss_at_once(stores, key, events) -> None:
    """LOST: the session is expired on the server; the lease's loss is reported promptly
    (reason expired), without waiting for the renew deadline, and the candidate wins again
    on a new session with a higher term."""
    # Long TTL and renewal interval, so that only the session event can explain a step-down
    # within ``prompt``, with seconds to spare for a loaded machine.
    ttl, renew_interval, prompt = 30.0, 15.0, 10.0
    alice = Candidate(stores(), key, "alice", ttl=ttl, renew_interval=renew_interval)
    try:
        elected, _ = alice.run_for_election()
        assert next_item(elected, WAIT, "False") is False
        assert next_item(elected, WAIT, "alice elected") is True
        first_term = alice.term
        started = time.monotonic()
        (old_session,) = expire_sessions(alice.store)  # type: ignore[arg-type]
        assert next_item(elected, prompt, "alice to notice the expiry (before any renewal)") is False
        noticed = time.monotonic() - started
        log.info("session expiry reported %.3fs after it happened", noticed)
        wait_until(lambda: any(isinstance(e, LeadershipLost) for e in events), 5, "a LeadershipLost event")
        lost = [e for e in events if isinstance(e, LeadershipLost)]
        assert lost[0].reason is LossReason.EXPIRED, lost
        assert next_item(elected, WAIT, "alice to win again on a new session") is True
        assert alice.term > first_term
        (session,) = alice.store._sessions.values()  # type: ignore[attr-defined]
        assert session.session_id not in (None, old_session)
    finally:
        alice.stop()


def _twin(name: str) -> str:
    """The twin ``<uuid>__live__`` of a candidate's node ``<uuid>__lock__<sequence>``."""
    return name.partition("__lock__")[0] + "__live__"


def test_a_waiter_never_wins_while_a_deleted_leaders_twin_lives(stores, key) -> None:
    """An operator deletes leader a's node while a's session lives: a leads until it hears of
    it, so waiter b must not win while a's twin node (deleted by a's release, or with its
    session) is there. Once a releases, b wins. (Before the twin, b won at once: with a 50 ms
    slower to hear of it, two leaders for 20-186 ms.)"""
    store = stores()
    path = store.path_for(key)
    a = store.acquire(key, "a", TTL * 5)
    lost = gevent.event.Event()
    a.on_lost = lost.set
    b = gevent.spawn(stores().acquire, key, "b", TTL * 5)
    try:
        with admin_client(store.hosts) as zk:
            wait_until(lambda: len(contenders(zk, path)) == 2, WAIT, "b to queue up")
            a_node, b_node = contenders(zk, path)
            assert zk.exists(f"{path}/{_twin(a_node)}") and zk.exists(f"{path}/{_twin(b_node)}")
            zk.delete(f"{path}/{a_node}")
            assert lost.wait(WAIT), "a never heard that its node was deleted"
            b.join(timeout=1.0)
            assert not b.ready(), f"b won while a's twin lived: {b.value or b.exception!r}"
            assert zk.exists(f"{path}/{_twin(a_node)}")
            a.release()
            won = b.get(timeout=WAIT)
            assert won.node == "b" and won.term > a.term
            won.release()
            assert zk.get_children(path) == []
    finally:
        b.kill()
        a.release()


@pytest.mark.parametrize("which", ["node", "twin", "node written then deleted"])
def test_deleting_either_node_of_a_leader_ends_its_tenure(stores, key, which) -> None:
    """Either of the leader's two nodes deleted from outside ends the lease at once; its
    release then deletes the other, and the next candidate wins. Also when the node is written,
    then deleted (one multi): the write's event takes the watch, so the deletion sends none,
    and kazoo keeps the watch armed again on the missing node as one for its creation (the
    review of issue 12 found the leader leading on without its node)."""
    store = stores()
    path = store.path_for(key)
    alice = Candidate(store, key, "alice", ttl=TTL * 5)
    bob = Candidate(stores(), key, "bob", ttl=TTL * 5)
    try:
        elected, _ = alice.run_for_election()
        assert next_item(elected, WAIT, "alice's first item") is False
        assert next_item(elected, WAIT, "alice to win") is True
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, WAIT, "bob's first item") is False
        with admin_client(store.hosts) as zk:
            wait_until(lambda: len(contenders(zk, path)) == 2, WAIT, "bob to queue up")
            node = contenders(zk, path)[0]
            if which == "node written then deleted":
                written_then_deleted = zk.transaction()
                written_then_deleted.set_data(f"{path}/{node}", b"operator")
                written_then_deleted.delete(f"{path}/{node}")
                results = written_then_deleted.commit()
                assert not any(isinstance(result, Exception) for result in results), results
            else:
                zk.delete(f"{path}/{node if which == 'node' else _twin(node)}")
            assert next_item(elected, WAIT, "alice to step down") is False
            assert next_item(bob_elected, WAIT, "bob to win") is True
            assert not zk.exists(f"{path}/{node}") and not zk.exists(f"{path}/{_twin(node)}")
    finally:
        bob.stop()
        alice.stop()


def test_a_waiter_whose_twin_was_deleted_queues_anew(stores, key) -> None:
    """A waiter whose twin node is deleted from outside never wins with its node: it deletes
    it and queues anew, behind the candidates that came after it."""
    store = stores()
    path = store.path_for(key)
    a = store.acquire(key, "a", TTL * 5)
    b = gevent.spawn(stores().acquire, key, "b", TTL * 5)
    c = None
    try:
        with admin_client(store.hosts) as zk:
            wait_until(lambda: len(contenders(zk, path)) == 2, WAIT, "b to queue up")
            b_node = contenders(zk, path)[1]
            c = gevent.spawn(stores().acquire, key, "c", TTL * 5)
            wait_until(lambda: len(contenders(zk, path)) == 3, WAIT, "c to queue up")
            zk.delete(f"{path}/{_twin(b_node)}")
            wait_until(lambda: b_node not in contenders(zk, path) and len(contenders(zk, path)) == 3, WAIT,
                       "b to queue anew")
            a.release()
            won = c.get(timeout=WAIT)
            assert won.node == "c"
            won.release()
            b_won = b.get(timeout=WAIT)
            assert b_won.node == "b"
            b_won.release()
    finally:
        b.kill()
        if c is not None:
            c.kill()
        a.release()



@contextlib.contextmanager
def _second_in_line(stores, key: str, ttl: float) -> Iterator[tuple[Any, gevent.Greenlet, ZooKeeperStore, Any]]:
    """Leader a, and b's acquire() waiting right behind it with its watches on a's node and
    twin armed (so that a's release is all b needs): (a's lease, b's greenlet, b's store, an
    admin client)."""
    store = stores()
    a = store.acquire(key, "a", ttl)
    b_store = stores()
    b = gevent.spawn(b_store.acquire, key, "b", ttl)
    try:
        with admin_client(store.hosts) as zk:
            wait_until(lambda: _watchers_of_twin(zk, a) == 2, WAIT, "b to queue up and watch a's twin as well as a")
            yield a, b, b_store, zk
    finally:
        b.kill()
        a.release()


def _watchers_of_twin(zk: Any, lease: Any) -> int:
    """How many sessions watch the twin of ``lease``'s node."""
    return len(_watches_by_path(zk.command(b"wchp")).get(lease.twin, set()))


def test_the_second_in_line_wins_a_release_without_reading_the_queue(stores, key) -> None:
    """b waits right behind leader a, which was first in b's listing: nothing older can queue
    later, so once a's node and twin are deleted by its release, b has won, with no listing of
    the queue in between (a round trip less on a handover)."""
    with _second_in_line(stores, key, TTL * 5) as (a, b, b_store, _):
        (session,) = b_store._sessions.values()
        listings = []
        get_children_async = session.client.get_children_async
        session.client.get_children_async = lambda *args, **kw: listings.append(args) or get_children_async(*args, **kw)
        a.release()
        won = b.get(timeout=WAIT)
        assert won.node == "b" and won.term > a.term
        assert listings == [], f"b read the queue after a's release: {listings}"
        won.release()


def test_the_third_in_line_wins_a_release_made_just_after_its_predecessors_claim(stores, key) -> None:
    """c waits behind b, b behind leader a. a releases; b wins and claims, which wakes c, and
    releases at once. c reads the queue again a moment after the claim (RELIST_AFTER_CLAIM),
    so it must find b gone then and win, long before any TTL could free the key."""
    ttl = 60.0  # a release missed would show as a wait of the whole TTL
    with _second_in_line(stores, key, ttl) as (a, b, b_store, zk):
        c = gevent.spawn(stores().acquire, key, "c", ttl)
        try:
            wait_until(lambda: len(contenders(zk, b_store.path_for(key))) == 3, WAIT, "c to queue up")
            a.release()
            won = b.get(timeout=WAIT)
            wait_until(lambda: zk.exists(won.path).version > 0, WAIT, "b's claim")
            released = time.monotonic()
            won.release()
            third = c.get(timeout=WAIT)
            assert third.node == "c" and third.term > won.term
            assert time.monotonic() - released < ttl / 4, "c waited for a TTL, not for b's release"
            third.release()
        finally:
            c.kill()


def test_a_long_wait_behind_the_leader_leaves_the_winner_its_renew_deadline(stores, key) -> None:
    """b waits behind a for longer than the TTL, then wins without a listing: its session was
    confirmed while it waited, so the win's renew deadline runs from a recent confirmation, not
    from the listing made when it queued (which would leave it stale: the winner would step
    down at once)."""
    ttl = 4.0
    with _second_in_line(stores, key, ttl) as (a, b, _, _):
        gevent.sleep(ttl)  # the scenario: a long tenure (not a synchronisation)
        released = time.monotonic()
        a.release()
        won = b.get(timeout=WAIT)
        assert won.confirmed_at >= released - ttl / 2, (
            f"the win's confirmation is {released - won.confirmed_at:.2f}s older than the release")
        won.release()


def test_a_write_to_the_leaders_node_is_not_taken_for_a_release(stores, key) -> None:
    """An operator's write to leader a's node fires b's watch on it: b reads the queue again
    and waits on, and wins only at a's release."""
    with _second_in_line(stores, key, TTL * 5) as (a, b, _, zk):
        zk.set(a.path, b"operator")
        b.join(timeout=1.0)
        assert not b.ready(), f"b won while a led: {b.value or b.exception!r}"
        wait_until(lambda: _watchers_of_twin(zk, a) == 2, WAIT, "b to watch a's twin again")
        a.release()
        won = b.get(timeout=WAIT)
        assert won.node == "b" and won.term > a.term
        won.release()



def test_a_waiter_whose_node_is_written_then_deleted_never_wins_with_it(stores, key) -> None:
    """An operator writes b's node, then deletes it (one multi): the write's event takes b's
    watch, so the deletion sends b none, and kazoo keeps the watch b arms again on the missing
    node as one for its creation. b must still learn that its node is gone and queue anew,
    never win with it. (Reproduced by the review of issue 12: b won with a deleted node.)"""
    with _second_in_line(stores, key, TTL * 5) as (a, b, _, zk):
        path = a.path.rsplit("/", 1)[0]
        _, b_node = contenders(zk, path)
        written_then_deleted = zk.transaction()
        written_then_deleted.set_data(f"{path}/{b_node}", b"operator")
        written_then_deleted.delete(f"{path}/{b_node}")
        results = written_then_deleted.commit()
        assert not any(isinstance(result, Exception) for result in results), results
        wait_until(lambda: len(contenders(zk, path)) == 2 and contenders(zk, path)[1] != b_node, WAIT,
                   "b to queue anew with a new node")
        a.release()
        won = b.get(timeout=WAIT)
        assert won.path != f"{path}/{b_node}" and zk.exists(won.path), f"b won with {won.path}"
        won.release()



def test_writes_to_the_leaders_node_leave_no_watches_behind(stores, key) -> None:
    """Each write to leader a's node sends b, right behind it, back to the listing, and b then
    watches a's nodes again: with one callback each, not one more per write."""
    with _second_in_line(stores, key, TTL * 5) as (a, b, b_store, zk):
        (session,) = b_store._sessions.values()
        watchers = session.client._data_watchers
        for n in range(20):
            zk.set(a.path, f"write {n}".encode())
            wait_until(lambda: watchers.get(a.path), WAIT, "b to watch a's node again")
        assert [len(watchers.get(path, ())) for path in (a.path, a.twin)] == [1, 1], dict(watchers)
        a.release()
        won = b.get(timeout=WAIT)
        assert won.node == "b"
        won.release()

def test_a_close_just_after_a_release_ends_a_session_that_still_holds_a_lease_at_once(stores, key) -> None:
    """A session's close waits CLOSE_AFTER_RELEASE after a release only when it holds nothing:
    with another lease still held, the session is taken down before the close first yields
    (no renewal may succeed while the store closes), and that lease is reported lost."""
    store = stores()
    held = store.acquire(key + "-held", "b", TTL * 5)
    store.acquire(key, "a", TTL * 5).release()
    (session,) = store._sessions.values()
    closing = gevent.spawn(session.close)
    gevent.sleep(0)  # the close runs until it first yields
    assert not session.connected.is_set(), "the close paused with a lease still held"
    closing.join(WAIT)
    with pytest.raises((LeadershipLostError, StoreUnavailableError)):
        held.renew()


def test_a_close_paused_after_a_release_ends_nothing_in_a_forked_child(stores, key) -> None:
    """A close pauses CLOSE_AFTER_RELEASE after a release; a fork during the pause leaves the
    child a copy of it, which must not end the parent's session when it wakes."""
    store = stores()
    store.acquire(key, "a", TTL * 5).release()
    (session,) = store._sessions.values()
    closing = gevent.spawn(session.close)
    gevent.sleep(0)  # the close runs until its pause
    parent = session.pid
    session.pid = parent - 1  # what the child's copy of the session sees after a fork now
    try:
        closing.join(WAIT)
        assert closing.dead
        assert session.client.connected, "the copy of the close ended the parent's session"
    finally:
        session.pid = parent


def test_first_endpoint_dead_still_works(zookeeper_cluster, key) -> None:
    """Whichever order kazoo tries the endpoints in, a dead one is skipped."""
    for i in range(4):
        addrs = [f"127.0.0.1:{closed_port()}", *zookeeper_cluster.addrs]
        # a long connect timeout: the election must not need it to run out on the dead endpoint
        with ZooKeeperStore(addrs, timeout=60) as store, Candidate(store, key, f"n{i}", ttl=TTL) as candidate:
            elected, _ = candidate.run_for_election()
            assert next_item(elected, WAIT, "False") is False
            assert next_item(elected, WAIT, "elected through the live endpoint") is True
            assert store.leader(key).node == f"n{i}"


def test_unreachable_store_fails_within_its_timeout(key) -> None:
    store = ZooKeeperStore([f"127.0.0.1:{closed_port()}"], timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            store.leader(key)
        took = time.monotonic() - started
        # 1 s asked; the slack is for a loaded machine, and still far below the defaults
        # (5 s store timeout, 10 s reader session) or an endless wait
        assert took < 4.0, f"gave up after {took:.2f}s with timeout=1"
        with pytest.raises(StoreUnavailableError):
            store.acquire(key, "alice", TTL)
    finally:
        store.close()


def test_close_after_a_silent_server_is_prompt(key) -> None:
    """A server that accepts connections and never answers: the store gives up within its
    timeout, and close() does not wait for kazoo's unanswered handshake (was 9.1 s)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[Any] = []

    def accept() -> None:
        while True:
            accepted.append(listener.accept()[0])

    acceptor = gevent.spawn(accept)
    store = ZooKeeperStore([f"127.0.0.1:{listener.getsockname()[1]}"], timeout=1.0)
    try:
        with pytest.raises(StoreUnavailableError):
            store.leader(key)
        started = time.monotonic()
        store.close()
        took = time.monotonic() - started
        assert took < 4.0, f"close() took {took:.2f}s with timeout=1"
    finally:
        acceptor.kill()
        for sock in accepted:
            sock.close()
        listener.close()


UNPATCHED = """
import sys, time, warnings
import gevent
from gevent import monkey
from greenleader import Candidate, Follower
from greenleader.stores.zookeeper import ZooKeeperStore

assert not monkey.is_module_patched("socket")
addrs, key = sys.argv[1].split(","), sys.argv[2]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    store = ZooKeeperStore(addrs)
    assert not caught, [str(w.message) for w in caught]
    ZooKeeperStore(["zk1.example.invalid:2181"])
    ZooKeeperStore(addrs, use_ssl="true")
    assert [w.category for w in caught] == [RuntimeWarning] * 2, caught
    assert all("gevent.monkey.patch_all()" in str(w.message) for w in caught)

from tests.hub_watch import HubWatch
watch = HubWatch()
gevent.sleep(0.05)
follower = Follower(ZooKeeperStore(addrs), key)
leaders, _ = follower.follow_election()
assert leaders.get(timeout=10) is None
alice, bob = Candidate(store, key, "alice", ttl=2), Candidate(ZooKeeperStore(addrs), key, "bob", ttl=2)
elected, _ = alice.run_for_election()
assert elected.get(timeout=10) is False and elected.get(timeout=10) is True
bob_elected, _ = bob.run_for_election()
assert bob_elected.get(timeout=10) is False
assert leaders.get(timeout=10) == "alice"
alice.stop()
assert bob_elected.get(timeout=10) is True
assert leaders.get(timeout=10) in ("bob", None)
bob.stop()
follower.stop()
watch.wait_ticks(3, timeout=10)
print(watch.describe())
print("max-blocked", watch.max_blocked)
"""


def test_cooperative_without_monkey_patching(zookeeper_cluster, key, tmp_path) -> None:
    """kazoo's gevent handler never blocks the hub in an unpatched process (given IP
    addresses), so the store warns only when host names would need the blocking resolver."""
    import subprocess

    script = tmp_path / "unpatched.py"
    script.write_text(UNPATCHED)
    result = subprocess.run(
        [sys.executable, str(script), ",".join(zookeeper_cluster.addrs), key],
        capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    *_, described, blocked = result.stdout.decode().splitlines()
    log.info("unpatched process: %s", described)
    # time waiting for a CPU (a loaded machine) is not counted: see tests/hub_watch.py
    assert float(blocked.split()[1]) < 0.1, f"the hub was blocked in an unpatched process: {described}"


def test_interrupted_release_still_frees_the_key(stores, key) -> None:
    """A release cut short (the candidate's own timeout, a kill) still deletes the node."""
    store = stores()
    lease = store.acquire(key, "alice", TTL)
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.0001):
        lease.release()
    wait_until(lambda: store.leader(key) is None, 2, "the node to go after an interrupted release")
    lease.release()  # idempotent, even then


def test_use_after_fork_is_refused(stores, key) -> None:
    """A store connected in a parent must not be used in a forked child: it would share
    (and could close) the parent's session."""
    store = stores()
    assert store.leader(key) is None  # connects
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            store.leader(key)
        except StoreError as exc:
            os._exit(0 if "fork" in str(exc) else 2)
        except BaseException:
            os._exit(3)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert store.leader(key) is None  # the parent's store still works


@pytest.mark.parametrize("moment", ["queued", "sent"])
def test_a_request_in_flight_at_a_fork_is_answered_to_the_parent_only(stores, key, moment) -> None:
    """The process forks while a request of its session is in flight, from a greenlet that
    the hub woke in the same turn as kazoo's connection greenlet: the child's copy of that
    greenlet then runs once more before its kill. It must neither take the parent's wake-up
    byte and send the queued request again ("queued": a duplicated answer killed kazoo's loop
    for good) nor read the parent's answer ("sent": the parent timed out, dropped the
    connection and its leaders lost their keys). The parent keeps its connection and session."""
    store = stores()
    assert store.leader(key) is None  # connects
    session = next(iter(store._sessions.values()))
    client, session_id = session.client, session.session_id
    states: list[str] = []
    client.add_listener(states.append)
    for _ in range(3):  # the race is the hub's order of two ready greenlets: a few tries
        request = client.exists_async("/")  # queued, its wake-up byte written
        if moment == "sent":
            _wait_sent(client, request)
        pid = _fork_in_the_same_turn()
        try:
            assert request.get(timeout=WAIT) is not None  # "/" exists
            assert store.leader(key) is None  # a round trip after it: a duplicated answer would be read by now
        finally:
            os.waitpid(pid, 0)
        assert states == [], f"the parent's connection changed state: {states}"
        assert session.session_id == session_id and session.connected.is_set()
        assert not client._connection._connection_routine.dead, "kazoo's connection loop died"


def _wait_sent(client: Any, request: Any) -> None:
    """Until kazoo has sent ``request`` (kazoo internals: its requests sent, unanswered);
    polled at every turn of the hub, since the answer follows within a millisecond. (On a
    loaded machine kazoo may read the answer in the same turn: then the fork that follows
    finds the request answered, and the round tests less.)"""
    deadline = time.monotonic() + WAIT
    while not any(pending[1] is request for pending in client._pending) and not request.ready():
        assert time.monotonic() < deadline, "kazoo did not send the request"
        gevent.sleep(0)


def _fork_in_the_same_turn() -> int:
    """Fork from a greenlet woken by a timer while the hub was blocked, so that the hub finds
    it ready in the same turn as whatever else became ready meanwhile (an answer, a wake-up
    byte); then keep the parent's hub blocked a while: only the child's copies can run. The
    child lets its copies of the parent's greenlets run, then exits. Returns its pid."""
    hub_busy = gevent.monkey.get_original("time", "sleep")

    def fork() -> int:
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery from here on
            try:
                gevent.sleep(0.5)
            finally:
                os._exit(0)
        hub_busy(0.3)
        return pid

    forker = gevent.spawn_later(0.001, fork)
    hub_busy(0.05)  # the timer expires, and the answer or wake-up byte arrives, meanwhile
    return forker.get(timeout=WAIT)


# -- processes and ensembles --------------------------------------------------------------------


CHILD = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from greenleader import Candidate
from greenleader.stores import from_url
candidate = Candidate(from_url(sys.argv[1]), sys.argv[2], "child", ttl=float(sys.argv[3]))
elected, _ = candidate.run_for_election()
for is_elected in elected:
    if is_elected:
        print("elected", flush=True)
gevent.sleep(3600)
"""


def test_crash_failover_after_sigkill(zookeeper_cluster, stores, key, tmp_path, record_property) -> None:
    """A leader in another process is killed with SIGKILL: its session expires after the
    TTL and the waiting candidate takes over within the TTL plus a tick and a round trip.

    The TTL is long enough that the slack a loaded machine needs (``margin``) still tells
    a failover bounded by the TTL from one that takes twice the TTL."""
    import subprocess

    ttl, margin = 4.0, 1.5
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), zookeeper_cluster.url, key, str(ttl)],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        with gevent.Timeout(30, AssertionError("the child process was not elected within 30s")):
            line = child.stdout.readline()
        assert line.strip() == b"elected", line
        bob = Candidate(stores(), key, "bob", ttl=ttl)
        with bob:
            elected, _ = bob.run_for_election()
            assert next_item(elected, WAIT, "False") is False
            with admin_client(zookeeper_cluster.addrs) as zk:
                wait_until(lambda: len(contenders(zk, bob.store.path_for(key))) == 2, WAIT, "bob to queue")
            killed = time.monotonic()
            child.kill()
            assert next_item(elected, ttl + WAIT, "bob to take over after the crash") is True
            failover = time.monotonic() - killed
            record_property("failover_s", failover)
            log.info("crash failover: %.3fs (ttl %gs)", failover, ttl)
            print(f"\n[figures] zookeeper crash failover {failover * 1000:.0f} ms (ttl {ttl:g} s)")
            assert failover <= ttl + margin, f"failover took {failover:.2f}s with ttl {ttl:g}s"
    finally:
        child.kill()
        child.wait()


@pytest.mark.timeout(240)
def test_three_node_ensemble_loses_servers(zookeeper_cluster3, key) -> None:
    """Candidates on a 3-node ensemble. Kill the server the leader's client is connected to,
    then (after it is back) the ensemble's leader: the election carries on, and at no sampled
    instant do two candidates believe they lead."""
    cluster = zookeeper_cluster3
    ttl = 4.0
    crowd = [
        Candidate(ZooKeeperStore(cluster.addrs, timeout=10), key, f"node{i}", ttl=ttl, retry=True)
        for i in range(3)
    ]
    sampler = Sampler(crowd)
    try:
        for candidate in crowd:
            candidate.run_for_election()
        leader = wait_leader(crowd, ttl * 3, "a first leader")

        # 1. the server the leader's session is connected to
        server = _server_of(cluster, leader.store.path_for(key))  # type: ignore[attr-defined]
        log.info("killing %r, which serves the leader %s", server, leader.node)
        server.kill()
        gevent.sleep(ttl)  # past every renew deadline: whoever leads now renewed after the kill
        new_leader = wait_leader(crowd, ttl * 4, "a leader after the leader's server died")
        log.info("%s leads after the first kill", new_leader.node)
        server.start()
        cluster.wait_ready()

        # 2. the ensemble's own leader
        ensemble_leader = cluster.leader_node()
        log.info("killing the ensemble leader %r", ensemble_leader)
        ensemble_leader.kill()
        gevent.sleep(ttl)  # past every renew deadline again
        final = wait_leader(crowd, ttl * 6, "a leader after the ensemble leader died")
        log.info("%s leads after the second kill; leadership history: %s", final.node,
                 [(round(t - sampler.history[0][0], 3), n) for t, n in sampler.history])
        # and the election still hands over
        final.stop()
        wait_leader([c for c in crowd if c is not final], ttl * 3, "a handover on the damaged ensemble")
    finally:
        sampler.stop()
        for candidate in crowd:
            candidate.stop()
            candidate.store.close()


def _server_of(cluster: servers.Cluster, path: str) -> servers.Node:
    """The ensemble member serving the session of the first contender under ``path`` (the
    leader's), found with the ``cons`` four-letter command."""
    with admin_client(cluster.addrs) as zk:
        owner = zk.exists(f"{path}/{contenders(zk, path)[0]}").ephemeralOwner
    for node in cluster.running():
        if f"sid=0x{owner:x}," in servers.four_letter_word(node.client_addr, "cons"):
            return node
    raise AssertionError(f"no server lists session 0x{owner:x}")


# -- a release whose delete fails on a live connection -------------------------------------------


@pytest.mark.parametrize("failing", ["once", "past-the-release-bound"])
def test_a_release_that_fails_on_a_live_connection_is_finished_later(stores, key, failing: str) -> None:
    """The release's delete fails without the connection dropping (an answer later than the
    store's timeout, say): the candidate tries again, and what it could not delete before
    giving up is deleted by the session once the server answers; the key is never held for
    as long as the session lives."""
    alice_store = stores()
    alice, bob = Candidate(alice_store, key, "alice", ttl=TTL), Candidate(stores(), key, "bob", ttl=TTL)
    try:
        alice_elected, _ = alice.run_for_election()
        assert next_item(alice_elected, WAIT, "False") is False
        assert next_item(alice_elected, WAIT, "alice elected") is True
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, WAIT, "bob's False") is False
        session = next(iter(alice_store._sessions.values()))
        refusals = {"left": 1 if failing == "once" else 10**6}
        real_multi = session.multi

        def failing_multi(build):
            if refusals["left"] > 0:
                refusals["left"] -= 1
                raise StoreUnavailableError("injected: the delete went unanswered within the timeout")
            return real_multi(build)

        session.multi = failing_multi
        alice.stop()  # the candidate gives up within its release bound when every delete fails
        refusals["left"] = 0  # the server answers again; the connection never dropped
        assert session.connected.is_set()
        assert next_item(bob_elected, 3 * TTL + WAIT, "bob to win once alice's nodes are deleted") is True
    finally:
        alice.stop()
        bob.stop()


def test_cleaning_up_an_abandoned_release_leaves_the_sessions_other_leader_alone(stores, key) -> None:
    """alice's release fails past its bound and her nodes are deleted later by the session's
    clean-up; dave, leading another key on the same session, keeps leading and keeps his nodes."""
    store = stores()
    other = f"{key}-other"
    alice, dave = Candidate(store, key, "alice", ttl=TTL), Candidate(store, other, "dave", ttl=TTL)
    try:
        for candidate in (alice, dave):
            elected, _ = candidate.run_for_election()
            assert next_item(elected, WAIT, "False") is False
            assert next_item(elected, WAIT, f"{candidate.node} elected") is True
        session = next(iter(store._sessions.values()))
        refusing = {"on": True}
        real_multi = session.multi

        def failing_multi(build):
            if refusing["on"]:
                raise StoreUnavailableError("injected: the delete went unanswered within the timeout")
            return real_multi(build)

        session.multi = failing_multi
        alice.stop()  # gives up on her release; her nodes stay recorded as orphans
        refusing["on"] = False
        with admin_client(store.hosts) as zk:
            wait_until(lambda: not contenders(zk, store.path_for(key)), WAIT, "alice's nodes to be deleted")
            assert len(contenders(zk, store.path_for(other))) == 1, "dave's node went with alice's"
        assert dave.is_leader(), "dave stopped leading when alice's nodes were cleaned up"
    finally:
        alice.stop()
        dave.stop()
