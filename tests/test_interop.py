"""greenleader next to the tools users already run, on the same keys (docs/interop.md).

Against the real servers of the fixtures and the real clients: ``etcdctl elect`` (etcd's own
election, the Go ``concurrency.Election``), kazoo's ``Lock`` recipe, and ``consul lock``.
Each test checks what docs/interop.md promises: the two sides exclude each other on the
mapped key, hand over when one side lets go, and see each other's holder where the tool can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.queue import Empty, Queue
from kazoo.client import KazooClient
from kazoo.handlers.gevent import SequentialGeventHandler

from greenleader import Candidate, Follower
from greenleader.stores import Store, new_store
from tests.waiting import next_item, wait_until

BOUND = 10.0  # seconds: generous for a busy 2-core machine; each step takes well under 1 s


def _tool(name: str) -> str:
    """The path of a command-line tool; a missing tool fails the test (CI must run it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-servers.sh", pytrace=False)
    return path


class _Process:
    """A tool run in the background, its stdout lines on a queue with their arrival time."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.lines: Queue = Queue()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.rstrip("\n")))

    def line(self, what: str) -> tuple[float, str]:
        return next_item(self.lines, BOUND, what)  # type: ignore[return-value]

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send ``sig`` (the tool's own clean exit) and wait; kill if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(BOUND)
        self._reader.join(BOUND)
        return self.proc.returncode

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def background() -> Iterator[list[_Process]]:
    """Processes a test starts; killed at the end whatever happened."""
    started: list[_Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(BOUND)


@pytest.fixture
def name() -> str:
    return f"interop/{uuid.uuid4().hex[:12]}"


def _waits(elected: Queue, what: str, window: float = 1.0) -> None:
    """``elected`` brings no win within ``window`` (a wrong win comes at once; a right one never)."""
    try:
        item = elected.get(timeout=window)
    except Empty:
        return
    raise AssertionError(f"{what}: got {item!r} instead of waiting")


def _elected(candidate: Candidate, what: str) -> float:
    """Wait until ``candidate`` leads; the time it learnt so."""
    elected, _ = candidate.run_for_election()
    while not next_item(elected, BOUND, what):
        pass
    return time.monotonic()


# -- etcd: etcdctl elect ------------------------------------------------------------------------


@pytest.fixture
def etcd(etcd_cluster: Any) -> Iterator[tuple[Store, dict[str, str]]]:
    """A greenleader etcd store and the environment for etcdctl, on the fixtures' etcd."""
    _tool("etcdctl")
    store = new_store("etcd", etcd_cluster.addrs)
    env = dict(os.environ, ETCDCTL_API="3", ETCDCTL_ENDPOINTS=",".join(etcd_cluster.addrs))
    yield store, env
    store.close()


def _etcd_candidates(env: dict[str, str], name: str) -> list[str]:
    """The candidate keys ``NAME/<lease hex>`` of the election, as etcdctl lists them (without
    greenleader's twins ``NAME/<lease hex>/live``)."""
    keys = subprocess.run(["etcdctl", "get", "--prefix", "--keys-only", f"{name}/"], env=env,
                          capture_output=True, text=True, check=True, timeout=BOUND).stdout.split()
    return [key for key in keys if not key.endswith("/live")]


def test_greenleader_waits_for_etcdctl_elect_and_leads_when_it_exits(etcd: tuple[Store, dict[str, str]], name: str,
                                                                     background: list[_Process]) -> None:
    """``etcdctl elect NAME PROPOSAL`` leads: a greenleader candidate for NAME waits, ``etcdctl
    elect -l`` names the proposal; etcdctl exits (Ctrl-C resigns): greenleader leads at once,
    and ``etcdctl elect -l`` names greenleader's node."""
    store, env = etcd
    holder = _Process(["etcdctl", "elect", name, "go-proposal"], env)
    background.append(holder)
    assert holder.line("etcdctl elect to win")[1].startswith(f"{name}/")  # its key: NAME/<lease hex>
    assert holder.line("etcdctl elect's proposal")[1] == "go-proposal"
    observer = _Process(["etcdctl", "elect", "-l", name], env)
    background.append(observer)
    assert observer.line("the observed key")[1].startswith(f"{name}/")
    assert observer.line("the observed value")[1] == "go-proposal"
    with Candidate(store, name, "alice", ttl=2.0) as alice:
        elected, _ = alice.run_for_election()
        assert next_item(elected, BOUND, "alice's first item") is False
        wait_until(lambda: len(_etcd_candidates(env, name)) == 2, BOUND, "alice to queue behind etcdctl",
                   interval=0.05)
        _waits(elected, "alice while etcdctl elect leads")
        resigned = time.monotonic()
        assert holder.stop() == 0, holder.stderr()
        while not next_item(elected, BOUND, "alice to lead once etcdctl elect exited"):
            pass
        print(f"greenleader led {1000 * (time.monotonic() - resigned):.0f} ms after etcdctl elect was told to exit")
        observed = [observer.line("the new observed key")[1], observer.line("the new observed value")[1]]
        assert observed[1] == "alice", observed
        assert alice.is_leader()


def test_etcdctl_elect_waits_for_greenleader(etcd: tuple[Store, dict[str, str]], name: str,
                                             background: list[_Process]) -> None:
    """greenleader leads: ``etcdctl elect`` queues behind it, and wins only once it resigned."""
    store, env = etcd
    with Candidate(store, name, "alice", ttl=2.0) as alice:
        _elected(alice, "alice to lead")
        waiter = _Process(["etcdctl", "elect", name, "go-proposal"], env)
        background.append(waiter)
        wait_until(lambda: len(_etcd_candidates(env, name)) == 2, BOUND, "etcdctl elect to queue", interval=0.05)
        assert alice.is_leader() and store.leader(name).node == "alice"
        resigned = time.monotonic()
        alice.resign()
        won_at, line = waiter.line("etcdctl elect to win after alice resigned")
        assert line.startswith(f"{name}/") and won_at > resigned


def test_greenleader_and_etcdctl_lock_exclude_each_other(etcd: tuple[Store, dict[str, str]], name: str,
                                                        tmp_path: Path, background: list[_Process]) -> None:
    """``etcdctl lock NAME cmd`` (Go's ``concurrency.Mutex``: the same ``NAME/<lease hex>`` keys)
    waits while greenleader leads and runs once it resigned; greenleader waits while it runs."""
    store, env = etcd
    lease = store.acquire(name, "alice", 2.0)
    locker = _Process(["etcdctl", "lock", name, "--", "sh", "-c", "echo \"$ETCD_LOCK_KEY\""], env)
    background.append(locker)
    wait_until(lambda: len(_etcd_candidates(env, name)) == 2, BOUND, "etcdctl lock to queue", interval=0.05)
    assert locker.lines.empty() and locker.proc.poll() is None, "etcdctl lock ran while greenleader held the key"
    released = time.monotonic()
    lease.release()
    ran_at, key = locker.line("etcdctl lock's command once alice released")
    assert key.startswith(f"{name}/") and ran_at > released
    assert locker.proc.wait(BOUND) == 0

    finish = tmp_path / "finish"
    holder = _Process(["etcdctl", "lock", name, "--", "sh", "-c",
                       f"echo holding; while [ ! -e {finish} ]; do sleep 0.05; done"], env)
    background.append(holder)
    assert holder.line("etcdctl lock to run its command")[1] == "holding"
    campaign = gevent.spawn(store.acquire, name, "bob", 2.0)
    campaign.join(timeout=1.0)  # a window for a wrong win; a right one never comes before finish
    assert not campaign.ready(), "greenleader won while etcdctl lock ran its command"
    finish.touch()
    campaign.get(timeout=BOUND).release()
    assert holder.proc.wait(BOUND) == 0


def test_a_greenleader_follower_names_etcdctl_elects_proposal(etcd: tuple[Store, dict[str, str]], name: str,
                                                              background: list[_Process]) -> None:
    """``etcdctl elect NAME PROPOSAL`` leads: greenleader's ``leader()`` and a ``Follower`` name
    the proposal at once, though an etcdctl winner never claims its key as greenleader's do.
    (Before: ``leader()`` waited its 5 s timeout, then said None, and the follower said None.)"""
    store, env = etcd
    holder = _Process(["etcdctl", "elect", name, "go-proposal"], env)
    background.append(holder)
    holder.line("etcdctl elect to win")
    assert store.leader(name).node == "go-proposal"
    with Follower(store, name) as follower:
        leaders, _ = follower.follow_election()
        assert next_item(leaders, BOUND, "the follower's first answer") == "go-proposal"
        assert holder.stop() == 0, holder.stderr()  # Ctrl-C resigns: the election is vacant
        assert next_item(leaders, BOUND, "the follower to see etcdctl resign") is None


# -- ZooKeeper: kazoo's Lock recipe ----------------------------------------------------------------


@pytest.fixture
def kazoo_client(zookeeper_cluster: Any) -> Iterator[KazooClient]:
    client = KazooClient(hosts=",".join(zookeeper_cluster.addrs), handler=SequentialGeventHandler(), timeout=5)
    client.start(timeout=BOUND)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def zk_store(zookeeper_cluster: Any) -> Iterator[Store]:
    store = new_store("zookeeper", zookeeper_cluster.addrs)
    yield store
    store.close()


def test_greenleader_and_a_kazoo_lock_exclude_each_other(kazoo_client: KazooClient, zk_store: Store,
                                                         name: str) -> None:
    """The greenleader key ``a/b`` is kazoo's ``Lock(client, "/a/b")``: each waits for the
    other, both ways, and ``Lock.contenders()`` lists both (greenleader's node name)."""
    lock = kazoo_client.Lock("/" + name, "kazoo-holder")
    assert lock.acquire(timeout=BOUND)
    with Candidate(zk_store, name, "alice", ttl=2.0) as alice:
        elected, _ = alice.run_for_election()
        assert next_item(elected, BOUND, "alice's first item") is False
        wait_until(lambda: lock.contenders() == ["kazoo-holder", "alice"], BOUND, "alice to queue behind kazoo")
        _waits(elected, "alice while kazoo holds the lock")
        lock.release()
        while not next_item(elected, BOUND, "alice to lead once the kazoo lock was released"):
            pass
        assert not lock.acquire(blocking=False)  # greenleader holds: kazoo does not get it
        assert lock.contenders() == ["alice"]
        waiting = gevent.spawn(lock.acquire, timeout=BOUND)
        wait_until(lambda: lock.contenders() == ["alice", "kazoo-holder"], BOUND, "kazoo to queue")
        assert alice.is_leader() and not waiting.ready()
        alice.resign()
        assert waiting.get(timeout=BOUND + 1) is True, "kazoo's Lock did not get the key once alice resigned"
        lock.release()


def test_a_greenleader_follower_names_a_kazoo_lock_holders_identifier(kazoo_client: KazooClient, zk_store: Store,
                                                                      name: str) -> None:
    """A kazoo ``Lock`` (or ``Election``) holder never claims its node as greenleader's winners
    do: ``leader()`` and a ``Follower`` name its identifier at once, and the vacancy when it
    releases. (Before: ``leader()`` waited its 5 s timeout, then said None, like the follower.)"""
    lock = kazoo_client.Lock("/" + name, "kazoo-holder")
    assert lock.acquire(timeout=BOUND)
    try:
        assert zk_store.leader(name).node == "kazoo-holder"
        with Follower(zk_store, name) as follower:
            leaders, _ = follower.follow_election()
            assert next_item(leaders, BOUND, "the follower's first answer") == "kazoo-holder"
            lock.release()
            assert next_item(leaders, BOUND, "the follower to see kazoo release") is None
    finally:
        lock.release()


# -- Consul: consul lock -------------------------------------------------------------------------


@pytest.fixture
def consul(consul_cluster: Any, tmp_path: Path) -> Iterator[tuple[Store, dict[str, str]]]:
    _tool("consul")
    store = new_store("consul", consul_cluster.addrs)
    env = dict(os.environ, CONSUL_HTTP_ADDR=consul_cluster.addrs[0])
    env.pop("CONSUL_HTTP_TOKEN", None)
    yield store, env
    store.close()


def test_greenleader_waits_for_consul_lock(consul: tuple[Store, dict[str, str]], name: str, tmp_path: Path,
                                           background: list[_Process]) -> None:
    """``consul lock PREFIX cmd`` holds ``PREFIX/.lock``: a greenleader candidate for that key
    waits, and leads once the command ended and consul lock let go."""
    store, env = consul
    finish = tmp_path / "finish"
    script = f"echo started; while [ ! -e {finish} ]; do sleep 0.05; done"
    holder = _Process(["consul", "lock", name, script], env)
    background.append(holder)
    assert holder.line("consul lock to run its command")[1] == "started"
    held = store.leader(f"{name}/.lock")
    assert held is not None and held.node == "", held  # consul lock's key has no value: no name
    campaign = gevent.spawn(store.acquire, f"{name}/.lock", "alice", 10.0)
    campaign.join(timeout=1.0)  # a window for a wrong win; a right one never comes before finish
    assert not campaign.ready(), "greenleader won the key consul lock holds"
    finish.touch()
    lease = campaign.get(timeout=BOUND)
    try:
        assert holder.proc.wait(BOUND) == 0, holder.stderr()
        assert store.leader(f"{name}/.lock").node == "alice"
    finally:
        lease.release()


def test_consul_lock_waits_for_greenleader_and_runs_once_it_released(consul: tuple[Store, dict[str, str]], name: str,
                                                                     background: list[_Process]) -> None:
    """greenleader holds ``PREFIX/.lock``: ``consul lock PREFIX cmd`` waits without running
    ``cmd``, and runs it once greenleader released the key. (With flags 0 on greenleader's key,
    consul lock exited 1 at once: "Existing key does not match lock use", docs/interop.md.)"""
    store, env = consul
    lease = store.acquire(f"{name}/.lock", "alice", 10.0)
    try:
        waiter = _Process(["consul", "lock", name, "echo ran"], env)
        background.append(waiter)
        # a window for a wrong run or a refusal; a right run never comes before the release
        with contextlib.suppress(subprocess.TimeoutExpired):
            waiter.proc.wait(timeout=2.0)
        assert waiter.proc.poll() is None and waiter.lines.empty(), \
            f"consul lock did not wait for greenleader: rc {waiter.proc.returncode}, {waiter.stderr()!r}"
        released = time.monotonic()
    finally:
        lease.release()
    ran_at, line = waiter.line("consul lock's command once alice released")
    assert line == "ran" and ran_at > released
    assert waiter.proc.wait(BOUND) == 0, waiter.stderr()
    print(f"consul lock ran its command {1000 * (ran_at - released):.0f} ms after greenleader released")
