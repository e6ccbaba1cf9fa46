"""Consul-specific behaviour, against real Consul agents (tests/servers.py)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings

import gevent
import gevent.event
import pytest
import zope.event

from greenleader import Backoff, Candidate, Follower
from greenleader.errors import InvalidArgumentError, InvalidKeyError, InvalidURLError, StoreUnavailableError
from greenleader.events import LeadershipLost, LossReason
from greenleader.stores import LeaderInfo, from_url, new_store
from greenleader.stores.consul import DEFAULT_LOCK_DELAY, LOCK_FLAG, ConsulStore
from tests import servers
from tests.faults import Proxy
from tests.support_consul import FAST_TTL, closed_port, consul_client
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(180)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "s3cr3t-t0ken-4b1d"


@pytest.fixture
def cluster(consul_cluster):
    return consul_cluster


@pytest.fixture
def stores(cluster):
    """Factory of stores on the shared agent; all closed afterwards."""
    made: list[ConsulStore] = []

    def make(**options) -> ConsulStore:
        store = ConsulStore(options.pop("addrs", cluster.addrs), **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def key() -> str:
    return f"greenleader-test/consul/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tag() -> str:
    """A node-name prefix unique to this test, to find its sessions."""
    return f"t{uuid.uuid4().hex[:8]}"


def sessions_named(addr: str, prefix: str) -> list[dict]:
    """Sessions whose name starts with ``greenleader <prefix>``, via the HTTP API."""
    listed = json.loads(servers.http("GET", f"http://{addr}/v1/session/list"))
    return [s for s in listed if s.get("Name", "").startswith(f"greenleader {prefix}")]


def raw_entry(addr: str, key: str) -> dict | None:
    return consul_client(addr).kv.get(key)[1]


def vacant(entry: dict | None) -> bool:
    """No session holds the key (it may be there: a release unlocks it and leaves it)."""
    return entry is None or not entry.get("Session")


def win(candidate: Candidate, timeout: float = FAST_TTL * 3):
    elected, _ = candidate.run_for_election()
    assert next_item(elected, timeout, f"{candidate.node}'s first item") is False
    assert next_item(elected, timeout, f"{candidate.node} to be elected") is True
    return elected


# -- construction, URLs, options ------------------------------------------------------------


def test_from_url_forms_and_options():
    store = from_url(
        "consul://127.0.0.1:8500,h2.example:8501?token=" + SECRET
        + "&lock_delay=2.5&scheme=https&timeout=2&wait=7&retry_for=3&dc=dc1&verify=false"
    )
    assert isinstance(store, ConsulStore)
    assert store.addrs == ["127.0.0.1:8500", "h2.example:8501"]
    assert (store.scheme, store.lock_delay, store.timeout, store.wait, store.retry_for, store.dc) == (
        "https", 2.5, 2.0, 7.0, 3.0, "dc1")
    assert SECRET not in repr(store) and "token=***" in repr(store)

    assert from_url("consul://").addrs == ["127.0.0.1:8500"]
    assert from_url("consul://10.0.0.7").addrs == ["10.0.0.7:8500"]
    assert from_url("consul://[::1]:8600").addrs == ["[::1]:8600"]
    assert from_url("consul://127.0.0.1:8500").lock_delay == DEFAULT_LOCK_DELAY == 1.0
    assert new_store("consul", "127.0.0.1:8500", lock_delay=0).lock_delay == 0.0
    assert "token" not in repr(new_store("consul"))


@pytest.mark.parametrize(
    "url",
    [
        "consul://127.0.0.1:8500?lock_delay=soon",
        "consul://127.0.0.1:8500?lock_delay=61",
        "consul://127.0.0.1:8500?lock_delay=-1",
        "consul://127.0.0.1:8500?timeout=0",
        "consul://127.0.0.1:8500?scheme=ftp",
        "consul://127.0.0.1:8500?verify=maybe",
        "consul://127.0.0.1:8500?ca_file=/nonexistent/ca.pem",
        "consul://127.0.0.1:8500?key_file=/etc/hostname",
        "consul://127.0.0.1:8500/some/path",
        "consul://127.0.0.1:8500?bogus=1",
        "consul://127.0.0.1:notaport",
        "consul://127.0.0.1:0",
    ],
)
def test_bad_urls_and_options_are_rejected_without_echoing_the_token(url):
    with pytest.raises(InvalidArgumentError) as caught:
        from_url(url + ("&" if "?" in url else "?") + "token=" + SECRET)
    assert SECRET not in str(caught.value)


def test_unknown_url_option_is_an_invalid_url():
    with pytest.raises(InvalidURLError, match="bogus"):
        from_url("consul://127.0.0.1:8500?bogus=1")


def test_ttl_below_ten_seconds_is_rejected(stores, key):
    store = stores()
    for ttl in (9.99, 5, "5", 1):
        with pytest.raises(InvalidArgumentError, match="at least 10s"):
            Candidate(store, key, "alice", ttl=ttl)
    with pytest.raises(InvalidArgumentError):
        Candidate(store, key, "alice", ttl=86401)
    assert Candidate(store, key, "alice", ttl=10).ttl == 10.0
    assert Candidate(store, key, "alice", ttl="86400").ttl == 86400.0


@pytest.mark.parametrize("bad_key", ["/leader", "a//b", "a/./b", "a/../b", "./a", "..", "a/\udc80"])
def test_keys_invalid_for_consul_are_rejected(stores, bad_key):
    store = stores()
    with pytest.raises(InvalidKeyError):
        Candidate(store, bad_key, "alice", ttl=FAST_TTL)
    with pytest.raises(InvalidKeyError):
        Follower(store, bad_key)
    with pytest.raises(InvalidKeyError):
        store.leader(bad_key)


def test_unusual_but_valid_keys_work(stores, key):
    store = stores()
    odd = f"{key}/sp ace/ü?q#f%41/"
    with Candidate(store, odd, "alice", ttl=FAST_TTL) as alice:
        win(alice)
        assert store.leader(odd) == LeaderInfo("alice", alice.term)
        assert raw_entry(store.addrs[0], odd)["Key"] == odd


# -- what the store writes --------------------------------------------------------------------


def test_session_has_ttl_delete_behaviour_lock_delay_and_no_checks(stores, key, tag, cluster):
    """Also: the key carries Consul's lock flag, which ``consul lock`` requires (docs/interop.md)."""
    with Candidate(stores(lock_delay=2), key, f"{tag}-alice", ttl=12) as alice:
        win(alice)
        entry = raw_entry(cluster.addrs[0], key)
        info = consul_client(cluster.addrs[0]).session.info(entry["Session"])[1]
        assert info["Behavior"] == "delete"
        assert info["TTL"] == "12s"
        assert info["LockDelay"] == 2_000_000_000  # nanoseconds
        assert not info.get("NodeChecks") and not info.get("Checks")
        assert entry["Value"] == f"{tag}-alice".encode()
        assert entry["Flags"] == LOCK_FLAG == 0x2DDCCBC058A50C18


def test_term_is_the_modify_index_and_increases(stores, key, cluster):
    store = stores()
    terms = []
    for node in ("alice", "bob", "alice"):
        with Candidate(stores(), key, node, ttl=FAST_TTL) as candidate:
            win(candidate)
            entry = raw_entry(cluster.addrs[0], key)
            assert candidate.term == entry["ModifyIndex"]
            assert entry["LockIndex"] >= 1  # the key outlives releases, but not deletions: not a term
            assert store.leader(key) == LeaderInfo(node, entry["ModifyIndex"])
            terms.append(candidate.term)
    assert terms == sorted(terms) and len(set(terms)) == 3, terms


def test_stop_and_release_leave_no_session_and_no_key(stores, key, tag, cluster):
    addr = cluster.addrs[0]
    alice = Candidate(stores(), key, f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(stores(), key, f"{tag}-bob", ttl=FAST_TTL)
    win(alice)
    bob_elected, _ = bob.run_for_election()
    assert next_item(bob_elected, FAST_TTL, "bob's first item") is False
    wait_until(lambda: len(sessions_named(addr, tag)) == 2, FAST_TTL, "bob's waiting session to exist")
    bob.stop()  # withdraws while waiting
    # (A stop that lands while bob's lock is on the wire leaves the destroy to the greenlet that
    # waits for the lock's answer: a round trip later, well inside the session's TTL.)
    wait_until(lambda: [s["Name"] for s in sessions_named(addr, tag)] == [f"greenleader {tag}-alice"],
               FAST_TTL / 2, "bob's session destroyed, alice's kept")
    alice.resign()
    wait_until(lambda: alice.is_leader(), FAST_TTL * 2, "alice to lead again after resigning")
    alice.stop()
    assert sessions_named(addr, tag) == []
    assert vacant(raw_entry(addr, key))  # released with ?release=: the key stays, locked by nobody


def test_a_waiter_never_locks_a_key_deleted_from_outside_while_its_holders_session_lives(stores, key, tag, cluster):
    """``consul kv delete`` of the held key leaves alice's session alive, and alice leads until
    she hears of it: bob, who saw her hold the key, must not lock it until her session is gone.
    Once she releases (destroys her session), he wins. (Before the fix he locked it at once:
    with alice 50 ms slower to hear of it, two leaders for 17-35 ms.)"""
    client = consul_client(cluster.addrs[0])
    alice = stores().acquire(key, f"{tag}-alice", FAST_TTL)
    bob_store = stores()
    blocking = gevent.event.Event()
    read = bob_store._get

    def get(key_, *, index=None, wait=None):
        if index is not None:
            blocking.set()  # bob read the key held by alice, and now waits for it to change
        return read(key_, index=index, wait=wait)

    bob_store._get = get
    bob = gevent.spawn(bob_store.acquire, key, f"{tag}-bob", FAST_TTL)
    try:
        assert blocking.wait(FAST_TTL), "bob never waited on the key"
        assert client.kv.delete(key)
        bob.join(timeout=1.0)
        assert not bob.ready(), f"bob locked the key while alice's session lived: {bob.value or bob.exception!r}"
        assert client.session.info(alice._session.id)[1] is not None
        alice.release()
        won = bob.get(timeout=FAST_TTL)
        assert won.node == f"{tag}-bob" and won.term > alice.term
        won.release()
    finally:
        bob.kill()
        alice.release()


def test_killing_an_acquiring_greenlet_leaves_nothing(stores, key, tag, cluster):
    """A kill that lands while the lock request is on the wire hands the session's share to a
    greenlet that waits for the lock's answer, so the destroy may come a round trip after the
    kill: waited for, but well within the session's TTL (Consul keeps a session up to 2 x TTL),
    so only a destroy, never an expiry, passes."""
    addr = cluster.addrs[0]
    destroyed_within = FAST_TTL / 2
    with Candidate(stores(), key, f"{tag}-alice", ttl=FAST_TTL) as alice:
        win(alice)
        store = stores()
        for _ in range(3):
            waiting = gevent.spawn(store.acquire, key, f"{tag}-bob", FAST_TTL)
            wait_until(lambda: len(sessions_named(addr, f"{tag}-bob")) == 1, FAST_TTL, "bob's session")
            waiting.kill(timeout=FAST_TTL)
            assert waiting.dead
            wait_until(lambda: sessions_named(addr, f"{tag}-bob") == [], destroyed_within, "bob's session destroyed")
        for _ in range(5):
            killed_early = gevent.spawn(store.acquire, key, f"{tag}-carol", FAST_TTL)
            gevent.sleep(0)  # let it send its session request, then kill it mid-request
            killed_early.kill(timeout=FAST_TTL)
            assert killed_early.dead
            wait_until(lambda: sessions_named(addr, f"{tag}-carol") == [], destroyed_within,
                       "carol's session destroyed")


@pytest.mark.parametrize("vacant", [True, False], ids=["vacant-key", "waiting"])
def test_a_kill_while_the_lock_is_on_the_wire_leaves_no_lock_on_the_shared_session(stores, key, tag, cluster,
                                                                                    vacant):
    """bob leads another key on the same store object, so the session stays alive after alice
    goes. alice's acquire is killed (a stop) after her lock request went out and before its
    answer: Consul applies the lock for the shared session, so it must be given back, or the
    key stays locked, by nobody, for as long as bob leads (review: 2 of 24 rounds left it so,
    and a follower named alice, who never led, for good)."""
    addr = cluster.addrs[0]
    store = stores()
    bob = Candidate(store, key + "/other", f"{tag}-bob", ttl=FAST_TTL)
    holder = None if vacant else stores().acquire(key, f"{tag}-holder", FAST_TTL)
    try:
        win(bob)
        client = store._election.client
        lock = client.lock
        sent = gevent.event.Event()

        def slow_answer(*args):
            answer = lock(*args)  # applied by Consul
            sent.set()
            gevent.sleep(0.5)  # and its answer late
            return answer

        client.lock = slow_answer
        alice = gevent.spawn(store.acquire, key, f"{tag}-alice", FAST_TTL)
        if holder is not None:
            gevent.sleep(0.5)  # alice waits on the holder's lock
            holder.release()
        assert sent.wait(3 * FAST_TTL), "alice's lock never went out"
        alice.kill(timeout=FAST_TTL)
        assert alice.dead
        client.lock = lock
        wait_until(lambda: not (raw_entry(addr, key) or {}).get("Session"), 3 * FAST_TTL,
                   "the key given back by the killed acquire")
        carol = stores().acquire(key, f"{tag}-carol", FAST_TTL)
        assert carol.node == f"{tag}-carol"
        carol.release()
        assert bob.is_leader(), "bob's tenure ended with alice's abandoned lock"
    finally:
        bob.stop()
        if holder is not None:
            holder.release()


# -- one session per TTL, shared by the candidates of one store object ---------------------------


def test_two_candidates_for_two_keys_on_one_store_share_one_session(stores, key, tag, cluster):
    addr = cluster.addrs[0]
    store = stores()
    alice = Candidate(store, key + "/a", f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(store, key + "/b", f"{tag}-bob", ttl=FAST_TTL)
    try:
        win(alice)
        win(bob)
        (shared,) = sessions_named(addr, tag)
        assert raw_entry(addr, key + "/a")["Session"] == raw_entry(addr, key + "/b")["Session"] == shared["ID"]
    finally:
        alice.stop()
        bob.stop()
    assert sessions_named(addr, tag) == []  # its last user gone, the session is destroyed


def test_one_resigns_and_the_other_leads_on_and_renews(stores, key, tag, cluster):
    """bob's resign() releases only his key (no destroy, so no lock-delay for anybody): alice
    leads on through renewals of the shared session for longer than its TTL."""
    addr = cluster.addrs[0]
    store = stores()
    alice = Candidate(store, key + "/a", f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(store, key + "/b", f"{tag}-bob", ttl=FAST_TTL, resign_holdoff=FAST_TTL * 10)
    try:
        alice_elected, bob_elected = win(alice), win(bob)
        (shared,) = sessions_named(addr, tag)
        bob.resign()
        assert next_item(bob_elected, FAST_TTL, "bob's step-down") is False
        wait_until(lambda: vacant(raw_entry(addr, key + "/b")), FAST_TTL, "bob's key to be released")
        deadlines = [alice._deadline]  # advanced by each confirmed renewal

        def renewed_three_times() -> bool:
            if alice._deadline != deadlines[-1]:
                deadlines.append(alice._deadline)
            return len(deadlines) > 3

        wait_until(renewed_three_times, FAST_TTL * 2, "alice to renew three times")
        assert alice.is_leader() and alice_elected.qsize() == 0
        assert raw_entry(addr, key + "/a")["Session"] == shared["ID"]
        assert [s["ID"] for s in sessions_named(addr, tag)] == [shared["ID"]]
    finally:
        alice.stop()
        bob.stop()


def test_the_shared_session_destroyed_from_outside_ends_both_tenures(stores, key, tag, cluster):
    addr = cluster.addrs[0]
    store = stores()
    seen: list[LeadershipLost] = []

    def record(event: object) -> None:
        if isinstance(event, LeadershipLost) and event.node.startswith(tag):
            seen.append(event)

    zope.event.subscribers.append(record)
    alice = Candidate(store, key + "/a", f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(store, key + "/b", f"{tag}-bob", ttl=FAST_TTL)
    try:
        alice_elected, bob_elected = win(alice), win(bob)
        (shared,) = sessions_named(addr, tag)
        terms = {alice.node: alice.term, bob.node: bob.term}
        assert consul_client(addr).session.destroy(shared["ID"])
        assert next_item(alice_elected, FAST_TTL, "alice's loss") is False
        assert next_item(bob_elected, FAST_TTL, "bob's loss") is False
        wait_until(lambda: len(seen) == 2, FAST_TTL, "a LeadershipLost for each")
        assert {(e.node, e.term, e.reason) for e in seen} == {
            (node, term, LossReason.EXPIRED) for node, term in terms.items()}
        # Both campaign again, on one new session, and win.
        assert next_item(alice_elected, FAST_TTL * 3, "alice to win again") is True
        assert next_item(bob_elected, FAST_TTL * 3, "bob to win again") is True
        (again,) = sessions_named(addr, tag)
        assert again["ID"] != shared["ID"]
    finally:
        zope.event.subscribers.remove(record)
        alice.stop()
        bob.stop()


def test_two_candidates_for_one_key_on_one_store_take_turns(stores, key, tag, cluster):
    """They share the session, and Consul lets a session lock a key it holds: the store's own
    turn keeps the second from "winning" beside the first."""
    store = stores()
    alice = Candidate(store, key, f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(store, key, f"{tag}-bob", ttl=FAST_TTL)
    try:
        win(alice)
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, FAST_TTL, "bob's first item") is False
        gevent.sleep(0.5)  # not a synchronisation: bob had a chance to win wrongly
        assert bob_elected.qsize() == 0 and not bob.is_leader()
        alice.stop()
        assert next_item(bob_elected, FAST_TTL, "bob to win after alice") is True
        assert store.leader(key).node == f"{tag}-bob"
    finally:
        alice.stop()
        bob.stop()


def test_a_waiter_s_lock_goes_out_before_its_next_blocking_query(stores, key, tag):
    """After the key's watch answers a release, the waiter's lock goes out before the watch
    asks again: a winner alone on its store object then ends the watch without another query,
    and a follower sharing the watch with a winner still hears the win."""
    sent: list[str] = []
    bob_store, carol_store = stores(), stores()
    get, lock = bob_store._get, bob_store._client.lock

    def traced_get(key_, index=None, wait=None):
        if index is None:
            return get(key_)
        sent.append("query")
        answer = get(key_, index=index, wait=wait)
        sent.append("answer")
        return answer

    def traced_lock(*args):
        sent.append("lock")
        return lock(*args)

    bob_store._get = traced_get
    bob_store._client.lock = traced_lock
    alice = Candidate(stores(), key, f"{tag}-alice", ttl=FAST_TTL)
    bob = Candidate(bob_store, key, f"{tag}-bob", ttl=FAST_TTL)
    carol = Candidate(carol_store, key, f"{tag}-carol", ttl=FAST_TTL)
    try:
        win(alice)
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, FAST_TTL, "bob's first item") is False
        wait_until(lambda: "query" in sent, FAST_TTL, "bob to wait on the key's blocking query")
        watch = bob_store._election._watches[key]
        alice.stop()
        assert next_item(bob_elected, FAST_TTL, "bob to win after alice") is True
        watch.greenlet.join(timeout=FAST_TTL)
        assert watch.greenlet.dead, "the watch outlived bob's win"
        assert sent[-2:] == ["answer", "lock"], f"a blocking query went out after the release showed: {sent}"

        with Follower(carol_store, key) as follower:
            leaders, _ = follower.follow_election()
            wait_until(lambda: (info := carol_store.leader(key)) and info.node == f"{tag}-bob", FAST_TTL,
                       "the store to name bob")
            carol_elected, _ = carol.run_for_election()
            assert next_item(carol_elected, FAST_TTL, "carol's first item") is False
            bob.stop()
            assert next_item(carol_elected, FAST_TTL, "carol to win after bob") is True
            wait_until(lambda: _drain_to(leaders, f"{tag}-carol"), FAST_TTL,
                       "the follower sharing carol's watch to name her")
    finally:
        alice.stop()
        bob.stop()
        carol.stop()


def _drain_to(leaders, node: str) -> bool:
    """Read ``leaders`` without waiting; True once it named ``node`` (then the rest is left)."""
    while not leaders.empty():
        if leaders.get() == node:
            return True
    return False


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def _live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)


def test_killed_waits_leak_no_socket_and_no_greenlet(stores, key, tag):
    store = stores()
    with Candidate(stores(), key, f"{tag}-alice", ttl=FAST_TTL) as alice:
        win(alice)
        store.leader(key)  # warm the connection pool
        sockets, greenlets = _open_sockets(), _live_greenlets()
        for _ in range(10):
            watch = store.watch(key)
            assert next(watch).node == f"{tag}-alice"
            watching = gevent.spawn(next, watch)
            acquiring = gevent.spawn(store.acquire, key, f"{tag}-bob", FAST_TTL)
            watching.join(timeout=0.05)
            acquiring.join(timeout=0.05)
            watching.kill(timeout=FAST_TTL)
            acquiring.kill(timeout=FAST_TTL)
            watch.close()
        assert _live_greenlets() <= greenlets, "greenlets left behind"
        assert _open_sockets() <= sockets + 2, "sockets left behind"  # the pool may keep an idle one


# -- timeouts, failover -------------------------------------------------------------------------


def test_blocking_query_outlives_the_read_timeout(stores, key):
    store = stores(timeout=0.5, wait=1.0)
    watch = store.watch(key)
    try:
        assert next(watch) is None
        waiting = gevent.spawn(next, watch)
        # Three times the read timeout and more than one full wait: no error, still waiting.
        waiting.join(timeout=1.5 + 1.0 + 1.0 / 16 + 0.5)
        assert not waiting.ready(), f"the watch ended early: {waiting.exception or waiting.value!r}"
        with Candidate(stores(), key, "alice", ttl=FAST_TTL) as alice:
            win(alice)
            assert waiting.get(timeout=FAST_TTL) == LeaderInfo("alice", alice.term)
    finally:
        watch.close()


def test_a_hung_agent_fails_a_blocking_query_in_bounded_time(tmp_path, key):
    """SIGSTOP the agent (as a partition would leave it): the watch must not hang."""
    own = servers.start("consul", tmp_path, 1)
    node = own.nodes[0]
    store = ConsulStore(own.addrs, timeout=0.5, wait=1.0, retry_for=0)
    watch = store.watch(key)
    try:
        assert next(watch) is None
        os.kill(node.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="timed out"):
            gevent.spawn(next, watch).get(timeout=10)
        elapsed = time.monotonic() - started
        # wait + its jitter + timeout, and 3 s of slack for a loaded machine: without the
        # read timeout the query would hang until SIGCONT (the get() above gives up at 10 s)
        assert elapsed < 0.5 + 1.0 + 1.0 / 16 + 3.0, f"took {elapsed:.2f}s"
    finally:
        os.kill(node.pid, signal.SIGCONT)
        watch.close()
        store.close()
        own.stop()


def test_the_datacenter_goes_with_every_request_the_win_s_transaction_included(stores, key, tag):
    """py-consul's ``txn.put`` sends no ``dc``: the store's transport adds it, so a store bound to
    another datacenter never locks a key in its agent's own."""
    local = stores()
    session = local._client.create_session(f"greenleader {tag}", FAST_TTL, 0)
    try:
        elsewhere = stores(dc="nowhere", timeout=2.0)
        with pytest.raises(StoreUnavailableError, match="datacenter"):
            elsewhere._client.lock(key, f"{tag}-alice", session)
        assert raw_entry(local.addrs[0], key) is None
    finally:
        local._client.destroy_session(session)


def test_a_refused_lock_transaction_is_told_apart_by_its_errors(stores, key, tag):
    """Consul answers a refused transaction 409 with its errors (py-consul would raise them as
    text): a key held by another session is a plain refusal (None), an unknown session is
    SessionGone."""
    from greenleader.stores.consul.client import SessionGone

    client = stores()._client
    holder = client.create_session(f"greenleader {tag}-holder", FAST_TTL, 0)
    other = client.create_session(f"greenleader {tag}-other", FAST_TTL, 0)
    try:
        assert client.lock(key, f"{tag}-holder", holder)["Session"] == holder
        assert client.lock(key, f"{tag}-other", other) is None
        client.destroy_session(other)
        with pytest.raises(SessionGone, match="invalid session"):
            client.lock(key, f"{tag}-other", other)
    finally:
        client.destroy_session(holder)
        client.destroy_session(other)


def test_a_dead_first_endpoint_is_skipped(stores, key, cluster):
    dead = f"127.0.0.1:{closed_port()}"
    store = stores(addrs=[dead, *cluster.addrs], timeout=1.0)
    assert store.active_addr == dead
    with Candidate(store, key, "alice", ttl=FAST_TTL) as alice:
        win(alice)
        assert store.active_addr == cluster.addrs[0]
        assert store.leader(key) == LeaderInfo("alice", alice.term)
    with Follower(stores(addrs=[dead, *cluster.addrs]), key) as follower:
        assert follower.leader() is None


def test_connections_are_kept_alive_and_a_dropped_one_is_replaced(stores, key, cluster):
    """Requests in turn reuse one connection to the agent; a kept connection reset while idle
    (an agent restarted, a middlebox) is replaced, so the next request succeeds with one agent."""
    proxy = Proxy(cluster.addrs[0], "store->agent")
    try:
        store = stores(addrs=[proxy.addr], timeout=2.0)
        for _ in range(5):
            assert store.leader(key) is None
        assert len(proxy.connections) == 1, proxy.connections
        for _ in range(3):
            proxy.reset()
            assert store.leader(key) is None
    finally:
        proxy.close()


def test_unreachable_agents_fail_fast(key):
    store = ConsulStore([f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="could not read the key"):
        store.leader(key)
    with pytest.raises(StoreUnavailableError, match="could not create a session"):
        store.acquire(key, "alice", FAST_TTL)
    assert time.monotonic() - started < 5


# -- the token ----------------------------------------------------------------------------------


def test_the_token_never_shows_in_repr_logs_or_errors(caplog, key):
    caplog.set_level(logging.DEBUG)
    store = ConsulStore([f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"], token=SECRET, timeout=0.5)
    with pytest.raises(StoreUnavailableError) as caught:
        store.leader(key)
    with pytest.raises(StoreUnavailableError) as caught_acquire:
        store.acquire(key, "alice", FAST_TTL)
    texts = [repr(store), str(caught.value), str(caught_acquire.value), caplog.text]
    assert not [t for t in texts if SECRET in t]


def test_explicit_token_wins_over_the_environment(monkeypatch, caplog, stores, key):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-" + SECRET)
    caplog.set_level(logging.DEBUG, logger="greenleader")
    explicit = stores(token=SECRET)
    assert [r for r in caplog.records if "CONSUL_HTTP_TOKEN" in r.getMessage() and r.levelno == logging.INFO]
    from_env = stores()
    headers = [s._client.endpoints[0].http.headers.get("X-Consul-Token") for s in (explicit, from_env)]
    assert headers == [SECRET, "env-" + SECRET]
    assert explicit.leader(key) is None and from_env.leader(key) is None  # ACLs off: tokens ignored
    assert SECRET not in caplog.text


# -- processes, crashes, clusters ----------------------------------------------------------------

CHILD = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from greenleader import Candidate
from greenleader.stores.consul import ConsulStore
store = ConsulStore(sys.argv[1].split(","))
candidate = Candidate(store, sys.argv[2], sys.argv[3], ttl=float(sys.argv[4]))
elected, _ = candidate.run_for_election()
for is_leader in elected:
    print("LEADER" if is_leader else "FOLLOWER", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_crash_failover_after_sigkill_is_bounded(stores, key, cluster, record_property):
    ttl = FAST_TTL
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, ",".join(cluster.addrs), key, "child", str(ttl)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        lines = gevent.spawn(lambda: [child.stdout.readline().strip() for _ in range(2)])
        assert lines.get(timeout=ttl * 3) == ["FOLLOWER", "LEADER"], "the child never led"
        store = stores()
        assert store.leader(key).node == "child"
        with Candidate(store, key, "parent", ttl=ttl) as parent:
            elected, _ = parent.run_for_election()
            assert next_item(elected, ttl, "parent's first item") is False
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            # Consul expires the session 2 x ttl after its last renewal, then holds the key for
            # lock_delay; the slack covers the waiter's lock-delay retry pause and round trips.
            bound = 2 * ttl + store.lock_delay + 2.0
            assert next_item(elected, bound, f"parent to lead within 2*ttl + lock_delay (+2s): {bound:g}s") is True
            failover = time.monotonic() - killed
            record_property("consul_crash_failover_s", round(failover, 3))
            logging.getLogger(__name__).warning("consul crash failover: %.2fs", failover)
            assert failover >= ttl, f"the crashed leader's session expired after only {failover:.2f}s"
    finally:
        child.kill()
        child.wait()


def _leader_of(candidates: list[Candidate]) -> Candidate | None:
    leading = [c for c in candidates if c.is_leader()]
    return leading[0] if len(leading) == 1 else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cluster_loses_the_leaders_agent_then_the_raft_leader(consul_cluster3, key, tag):
    cluster = consul_cluster3
    addrs = cluster.addrs
    stores = [ConsulStore(addrs[i:] + addrs[:i], timeout=1.0, wait=3.0) for i in range(3)]
    # The Candidates ride out the raft election (the store does not retry: retries have one owner).
    crowd = [Candidate(store, key, f"{tag}-{i}", ttl=FAST_TTL, retry=Backoff(initial=0.1, maximum=0.5))
             for i, store in enumerate(stores)]
    overlaps: list[tuple[float, list[str]]] = []

    def monitor() -> None:
        while True:
            leading = [c.node for c in crowd if c.is_leader()]
            if len(leading) > 1:
                overlaps.append((time.monotonic(), leading))
            gevent.sleep(0.002)

    watcher = gevent.spawn(monitor)
    queues = [c.run_for_election()[0] for c in crowd]
    try:
        wait_until(lambda: _leader_of(crowd), FAST_TTL * 3, "a leader on the 3-node cluster")
        leader = _leader_of(crowd)
        assert leader is not None
        queue = queues[crowd.index(leader)]
        assert [queue.get(timeout=1) for _ in range(2)] == [False, True]

        # 1. Kill the agent the leader's client talks to: it fails over and keeps leading.
        victim = next(n for n in cluster.nodes if n.client_addr == leader.store.active_addr)
        victim.kill()
        killed = time.monotonic()
        wait_until(lambda: leader.store.active_addr != victim.client_addr and leader.is_leader()
                   and time.monotonic() > killed + leader.renew_deadline + 0.5,
                   FAST_TTL * 3, f"{leader.node} to keep leading through another agent")
        assert queue.qsize() == 0, f"{leader.node} stepped down when its agent died: {queue.peek()!r}"
        victim.start()
        cluster.wait_ready()

        # 2. Kill Consul's raft leader: after the raft election the campaign carries on.
        raft_leader = cluster.leader_node()
        raft_leader.kill()
        killed = time.monotonic()
        wait_until(lambda: (current := _leader_of(crowd)) is not None
                   and time.monotonic() > killed + current.renew_deadline + 0.5,
                   FAST_TTL * 4, "one candidate to lead (with a renewal) after the raft leader died")
        survivors = [n.client_addr for n in cluster.running()]
        assert all(c.store.active_addr in survivors for c in crowd if c.is_leader())
    finally:
        for candidate in crowd:
            candidate.stop()
        watcher.kill()
        for store in stores:
            store.close()
    assert overlaps == [], f"two candidates believed they led at once: {overlaps[:5]}"
    running = cluster.running()[0].client_addr
    # A session whose destroy failed in the outage is destroyed once Consul answers again; one
    # whose create timed out during the raft election but was applied expires (up to 2 x TTL).
    wait_until(lambda: sessions_named(running, tag) == [], FAST_TTL * 2 + 5, "every session to be gone")
    assert vacant(raw_entry(running, key))


# -- gevent hygiene ------------------------------------------------------------------------------

WARN_PROBE = """
import warnings
{patch}
from greenleader.stores.consul import ConsulStore
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ConsulStore(["127.0.0.1:1"])
for warning in caught:
    print(warning.category.__name__, warning.message)
"""


@pytest.mark.parametrize("patched", [False, True])
def test_unpatched_process_gets_a_warning(patched):
    patch = "from gevent import monkey; monkey.patch_all()" if patched else ""
    result = subprocess.run(
        [sys.executable, "-c", WARN_PROBE.format(patch=patch)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    if patched:
        assert "RuntimeWarning" not in result.stdout, result.stdout
    else:
        assert "RuntimeWarning" in result.stdout and "gevent.monkey.patch_all()" in result.stdout, result.stdout


def test_no_warning_in_this_patched_process(stores):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stores()


# -- fork: the parent's requests in flight stay the parent's --------------------------------------


def test_a_request_in_flight_at_a_fork_is_answered_to_the_parent_only(stores, key):
    """A blocking query is waiting for its answer when the process forks, and the answer comes
    while the parent's hub is busy: the child's copy of the request must not read it from the
    shared connection (before the fix it did, and the parent waited out its read timeout, 15 s).
    The child's copies of the parent's sockets are /dev/null from the fork on."""
    store, writer = stores(), stores()
    client = store._client
    index, _ = client.get(key)  # leaves an idle kept-alive connection: the next request reuses it
    reading = gevent.spawn(client.get, key, index, 10.0)
    for _ in range(3):  # (a reused connection: no connect to wait for; the send does not yield)
        gevent.sleep(0)
    assert not reading.ready(), f"the blocking query returned at once: {reading.value or reading.exception!r}"
    writer._client.put_vacant_if_absent(key)  # the change the blocking query waits for
    pid = os.fork()
    if pid == 0:  # the child: let its copies of the parent's greenlets run, then leave
        try:
            gevent.sleep(0.5)
        finally:
            os._exit(0)
    try:
        gevent.monkey.get_original("time", "sleep")(0.3)  # the parent's hub waits: only the child could read
        new_index, entry = reading.get(timeout=5)
        assert new_index > index and entry is not None, (new_index, entry)
    finally:
        os.waitpid(pid, 0)
