"""gevent and resource hygiene, on every store: the hub is never blocked, and starting and
stopping many candidates and followers leaves no greenlet, no descriptor and no key behind.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterator

import gevent
import greenlet
import pytest
from gevent.queue import Queue

from greenleader import Candidate, Follower
from greenleader.stores import Store
from tests.hub_watch import HubWatch
from tests.waiting import next_item, wait_until

log = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(120)

#: Bound of a wait for an election event expected within round trips: generous, for a loaded
#: 2-core CI machine; only a failure waits that long.
WAIT = 30.0
TICK = 0.01  # the ticker's period
MAX_GAP = 0.1  # the longest stall of the ticker (CPU waits left out) that still means "never blocked"
BATCHES = 4  # batches of BATCH candidates and followers: BATCHES * BATCH = 200
SHARED_CANDIDATES, OWN_CANDIDATES, SHARED_FOLLOWERS, OWN_FOLLOWERS = 10, 20, 10, 10
BATCH = SHARED_CANDIDATES + OWN_CANDIDATES + SHARED_FOLLOWERS + OWN_FOLLOWERS
#: While the stores are open, their connection pools may keep this many more idle connections
#: than after a first batch (their size follows the peak concurrency); a descriptor leaked per
#: candidate or follower would add 200.
OPEN_FD_SLACK = BATCH // 2
#: Once the stores are closed, the descriptors the process may hold beyond what it held after
#: closing the warm-up's stores.
FD_ALLOWANCE = 2


@pytest.fixture
def ticker() -> Iterator[HubWatch]:
    """Ticks every TICK; the stalls it reports leave out time spent waiting for a CPU, so a
    loaded machine does not pass for a blocked hub (tests/hub_watch.py)."""
    ticking = HubWatch(TICK)
    yield ticking
    ticking.stop()


def next_leader(leaders: Queue, timeout: float, other_than: str | None = None) -> str:
    """The next leader a follower reports that is not None (and not ``other_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        node = next_item(leaders, max(0.0, deadline - time.monotonic()), f"a leader other than {other_than}")
        if node is not None and node != other_than:
            return node


def wait_elected(elected: Queue, timeout: float, node: str) -> None:
    """Read ``elected`` until True: the candidate the follower named has stepped up too."""
    deadline = time.monotonic() + timeout
    while next_item(elected, max(0.0, deadline - time.monotonic()), f"{node} to be elected") is not True:
        pass


def test_hub_never_blocked(ticker: HubWatch, make_store: Callable[[], Store], key: str, ttl: float) -> None:
    """A 10 ms ticker keeps ticking while three candidates campaign (two wait), a follower
    watches, and leadership changes hands twice (stop, then resign)."""
    stores = [make_store() for _ in range(4)]  # stores connect inside the window too
    candidates = {f"node{i}": Candidate(stores[i], key, f"node{i}", ttl) for i in range(3)}
    follower = Follower(stores[3], key)
    try:
        leaders, _ = follower.follow_election()
        elected = {node: candidate.run_for_election()[0] for node, candidate in candidates.items()}
        first = next_leader(leaders, WAIT)
        wait_elected(elected[first], WAIT, first)
        candidates[first].stop()
        second = next_leader(leaders, WAIT, other_than=first)
        wait_elected(elected[second], WAIT, second)
        candidates[second].resign()  # stands aside for resign_holdoff; the third must take over
        third = next_leader(leaders, WAIT, other_than=second)
        assert third not in (first, second), f"leaders went {first} -> {second} -> {third}"
        wait_elected(elected[third], WAIT, third)
    finally:
        for candidate in candidates.values():
            candidate.stop()
        follower.stop()
    ticker.wait_ticks(3, timeout=30)
    log.info("%s: %s", key, ticker.describe())
    assert ticker.max_blocked < MAX_GAP, f"the hub was blocked: {ticker.describe()}"


def _root(glet: greenlet.greenlet) -> greenlet.greenlet:
    while glet.parent is not None:
        glet = glet.parent
    return glet


def live_greenlets() -> set[greenlet.greenlet]:
    """Every greenlet (gevent's or raw) of this thread that is running or scheduled to run.

    Greenlets of other threads are gevent's own threadpool (DNS resolution runs there); its
    idle workers stay around by design.
    """
    gc.collect()
    main = _root(greenlet.getcurrent())
    return {obj for obj in gc.get_objects()
            if isinstance(obj, greenlet.greenlet) and not obj.dead and _root(obj) is main}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def churn(store: Store, follow_store: Store, key: str, ttl: float, batch: str, scale: int = 1) -> list[str]:
    """Start one batch of candidates and followers (``1/scale`` of a full one), wait until they
    are under way, stop them all; return the keys used."""
    shared = f"{key}/shared-{batch}"
    own = [f"{key}/own-{batch}-{i}" for i in range(OWN_CANDIDATES // scale)]
    candidates = [Candidate(store, shared, f"s{batch}-{i}", ttl) for i in range(SHARED_CANDIDATES // scale)]
    candidates += [Candidate(store, k, f"o{batch}-{i}", ttl) for i, k in enumerate(own)]
    followers = [Follower(follow_store, shared) for _ in range(SHARED_FOLLOWERS // scale)]
    followers += [Follower(follow_store, k) for k in own[:OWN_FOLLOWERS // scale]]
    alone = len(candidates) - len(own)
    try:
        elected = [candidate.run_for_election()[0] for candidate in candidates]
        leaders = [follower.follow_election()[0] for follower in followers]
        for queue in elected[alone:]:  # alone on their keys: each must win
            assert next_item(queue, WAIT, "the first item") is False
            assert next_item(queue, WAIT, "a lone candidate to be elected") is True
        for queue in leaders:
            next_leader(queue, WAIT)
        # A follower may name the winner a moment before the winner's own acquire() returns.
        wait_until(lambda: sum(c.is_leader() for c in candidates[:alone]) == 1, WAIT, "one shared-key leader")
    finally:
        for candidate in candidates:  # the shared key's leader may hand over to a waiter meanwhile
            candidate.stop()
        for follower in followers:
            follower.stop()
    return [shared, *own]


def assert_no_greenlet_left(before: set[greenlet.greenlet], when: str) -> None:
    left = live_greenlets() - before
    gevent.joinall([g for g in left if isinstance(g, gevent.Greenlet)], timeout=5)
    left = live_greenlets() - before
    assert not left, f"{len(left)} greenlets left running {when}: {sorted(map(repr, left))[:10]}"


def test_no_greenlet_descriptor_or_key_left(backend, backend_env, key: str, ttl: float) -> None:
    """Start and stop 200 candidates and followers: nothing is left behind, neither while the
    stores stay open (as in a long-running worker) nor once they are closed."""
    def make_stores() -> tuple[Store, Store]:
        return backend.make_store(backend_env), backend.make_store(backend_env)

    store, follow_store = make_stores()  # warm-up: client libraries set up their global state
    churn(store, follow_store, f"{key}/warm-up", ttl, "w", scale=5)
    store.close()
    follow_store.close()
    greenlets_closed, fds_closed = live_greenlets(), open_fds()

    store, follow_store = make_stores()
    try:
        churn(store, follow_store, key, ttl, "0")  # lets the stores' connection pools fill up
        greenlets_open, fds_open = live_greenlets(), open_fds()
        started = time.monotonic()
        keys: list[str] = []
        for batch in range(1, BATCHES + 1):
            keys += churn(store, follow_store, key, ttl, str(batch))
        log.info("%s: %d candidates and followers started and stopped in %.2fs",
                 backend_env.kind, BATCHES * BATCH, time.monotonic() - started)

        assert_no_greenlet_left(greenlets_open, "while the stores are open")
        fds = open_fds()
        assert fds <= fds_open + OPEN_FD_SLACK, (
            f"{fds - fds_open} more descriptors open after the churn than before ({fds_open} -> {fds}), "
            f"with the stores open: {sorted(os.listdir('/proc/self/fd'), key=int)}"
        )
        held = {k: info for k in keys if (info := store.leader(k)) is not None}
        assert not held, f"keys still held after every candidate stopped: {held}"
        leftovers = getattr(backend, "leftovers", None)  # the backend's own listing, if offered
        if leftovers is not None:
            found = leftovers(backend_env, key)
            assert not found, f"left in the {backend_env.kind} store under {key!r}: {found}"
    finally:
        store.close()
        follow_store.close()

    assert_no_greenlet_left(greenlets_closed, "once the stores are closed")
    fds = open_fds()
    assert fds <= fds_closed + FD_ALLOWANCE, (
        f"{fds - fds_closed} more descriptors open once the stores are closed ({fds_closed} -> {fds}): "
        f"{sorted(os.listdir('/proc/self/fd'), key=int)}"
    )
