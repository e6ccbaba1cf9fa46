"""The file store's own guarantees: a lock file deleted or replaced from outside never gives
two leaders, and every I/O error is a store error that a retrying campaign outlives.

The file store runs in-process, so two candidates of one process (each with its own store
object, as two processes would have) stand for two processes; ``is_leader()`` is sampled
every millisecond in between. Faults are real ``OSError``s (with their errno), raised from
the store's own ``os``/``fcntl`` calls for the first few calls only.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest

import greenleader.stores._file_changes as file_changes
import greenleader.stores.file as file_store
from greenleader import Backoff, Candidate, Follower
from greenleader.errors import LeadershipLostError, PermissionDeniedError, StoreError, StoreUnavailableError
from greenleader.events import ElectionError, LeadershipEvent
from greenleader.stores.base import LeaderInfo
from greenleader.stores.file import FileStore
from tests.waiting import drain, next_item, wait_until

pytestmark = pytest.mark.timeout(120)

#: Bound of any wait for an election on a loaded 2-core machine; only a failure waits that long.
WAIT = 30.0
POLL = 0.01
#: With ttl 6 the holder renews every 1.33 s: a candidate that won at once after the deletion
#: would lead beside it for up to that long.
TTL = 6.0


def store_at(directory: Path) -> FileStore:
    return FileStore(directory=directory, poll_interval=POLL)


def win(candidate: Candidate) -> gevent.queue.Queue:
    elected, _ = candidate.run_for_election()
    assert next_item(elected, WAIT, f"{candidate.node}'s first item") is False
    assert next_item(elected, WAIT, f"{candidate.node} to be elected") is True
    return elected


class Sampler:
    """Samples ``is_leader()`` of every candidate every millisecond; remembers overlaps."""

    def __init__(self, *candidates: Candidate) -> None:
        self.candidates = candidates
        self.samples = 0
        self.overlaps: list[float] = []
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.check()
            gevent.sleep(0.001)

    def check(self) -> None:
        self.samples += 1
        if sum(c.is_leader() for c in self.candidates) > 1:
            self.overlaps.append(time.monotonic())

    def stop(self) -> None:
        self._greenlet.kill()
        self.check()

    def verdict(self) -> str:
        if not self.overlaps:
            return "no overlap"
        return (f"two leaders in {len(self.overlaps)} of {self.samples} samples, for "
                f"{(self.overlaps[-1] - self.overlaps[0]) * 1000:.0f} ms")


# -- finding 5: a lock file deleted or replaced while held -----------------------------------


def unlink(directory: Path, path: Path) -> None:
    os.unlink(path)


def replace(directory: Path, path: Path) -> None:
    other = directory / "other-file"
    other.write_text("not a lock file\n")
    os.replace(other, path)


def remove_tree(directory: Path, path: Path) -> None:
    shutil.rmtree(directory)


@pytest.fixture(params=["abstract", "fallback"])
def guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Linux guard (abstract socket names), and the portable fallback used elsewhere."""
    if request.param == "fallback":
        monkeypatch.setattr(file_store, "ABSTRACT_NAMES", False)
    return request.param


@pytest.mark.parametrize("deletion", [unlink, replace, remove_tree], ids=["rm", "replace", "rm-rf"])
def test_a_lock_file_removed_while_held_never_gives_two_leaders(
    tmp_path: Path, key: str, deletion: Callable[[Path, Path], None], guard: str
) -> None:
    """Finding 5: the file is deleted (or another file moved over it, or the whole directory
    removed) while alice leads; bob, started afterwards, must not lead while alice does.
    Alice reports the loss at her next renewal; then the key can be won again (by alice,
    campaigning again at once, or by bob), and bob leads once alice is gone."""
    ttl = TTL if guard == "abstract" else TTL / 3  # the fallback waits a TTL on a fresh file
    directory = tmp_path / "elections"
    store = store_at(directory)
    alice = Candidate(store, key, "alice", ttl=ttl)
    bob: Candidate | None = None
    if guard == "fallback":  # alice's fresh file costs her a TTL first: leave that out of the test
        store.acquire(key, "setup", ttl).release()
    try:
        alice_elected = win(alice)
        alice_term = alice.term
        deletion(directory, store.path_for(key))
        bob = Candidate(store_at(directory), key, "bob", ttl=ttl)  # a new process would make its store now
        sampler = Sampler(alice, bob)
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, WAIT, "bob's first item") is False
        assert next_item(alice_elected, WAIT + 2 * ttl, "alice to report the loss") is False
        wait_until(lambda: alice.is_leader() or bob.is_leader(), WAIT + 2 * ttl, "a leader after alice's loss")
        if alice.is_leader():  # she campaigned again at once and won the race: hand over to bob
            assert alice.term is not None and alice_term is not None and alice.term > alice_term
            alice.stop()
        assert next_item(bob_elected, WAIT + 2 * ttl, "bob to be elected") is True
        gevent.sleep(0.1)  # and sample a little longer
        sampler.stop()
        assert not sampler.overlaps, sampler.verdict()
        assert sampler.samples > 0
        assert bob.term is not None and alice_term is not None and bob.term > alice_term
    finally:
        alice.stop()
        if bob is not None:
            bob.stop()


def test_a_held_lock_file_removed_is_reported_lost_at_the_next_renewal(tmp_path: Path, key: str) -> None:
    store = store_at(tmp_path)
    lease = store.acquire(key, "alice", TTL)
    lease.renew()
    os.unlink(store.path_for(key))
    with pytest.raises(LeadershipLostError):
        lease.renew()
    lease.release()
    store.acquire(key, "bob", TTL).release()  # the key is free again at once


_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.mark.skipif(not sys.platform.startswith("linux") and not _IN_CI,
                    reason="abstract socket names are Linux only (under CI=true it runs, and fails, anywhere)")
def test_a_release_or_a_stop_unbinds_the_abstract_names_at_once(tmp_path: Path, key: str) -> None:
    """The names must go with the lock file's descriptor: a socket that outlived its
    os.close() (gevent's socket class keeps a second reference) would hold the key."""
    store = store_at(tmp_path)
    names = store._names(key)
    assert names
    bound = lambda: [line for line in Path("/proc/net/unix").read_text().splitlines()  # noqa: E731
                     if any(line.endswith(" @" + name[1:].decode()) for name in names)]
    assert bound() == []
    lease = store.acquire(key, "alice", TTL)
    assert len(bound()) == len(names)
    lease.release()
    assert bound() == []
    candidate = Candidate(store, key, "bob", ttl=TTL)
    win(candidate)
    assert len(bound()) == len(names)
    candidate.stop()
    assert bound() == []


def test_acquire_recreates_a_removed_directory(tmp_path: Path, key: str) -> None:
    directory = tmp_path / "elections"
    store = store_at(directory)
    first = store.acquire(key, "alice", TTL)
    first.release()
    shutil.rmtree(directory)
    with gevent.Timeout(WAIT, AssertionError("acquire did not recreate the directory")):
        second = store.acquire(key, "alice", TTL)
    assert second.term > first.term
    second.release()


def test_without_abstract_names_a_fresh_lock_file_is_won_only_after_a_ttl(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portable fallback: nothing tells a candidate that created the lock file whether a
    holder of a deleted one still leads, so it waits out that holder's TTL first."""
    monkeypatch.setattr(file_store, "ABSTRACT_NAMES", False)
    store = store_at(tmp_path)
    ttl = 1.0
    started = time.monotonic()
    lease = store.acquire(key, "alice", ttl)
    assert time.monotonic() - started >= ttl
    lease.release()
    started = time.monotonic()
    store.acquire(key, "bob", ttl).release()  # the file now carries a record it can trust
    assert time.monotonic() - started < WAIT


def test_a_forked_child_does_not_keep_the_key_after_its_parent_dies(tmp_path: Path, key: str) -> None:
    """A child forked from a holder inherits its descriptors; it must close them, or the key
    stays held (flock, socket names) until the child exits, long after the parent died."""
    script = (
        "import os, sys, time\n"
        "from greenleader.stores.file import FileStore\n"
        "lease = FileStore(directory=sys.argv[1]).acquire(sys.argv[2], 'parent', 5)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), key], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent)
    child = 0
    try:
        assert parent.stdout is not None
        with gevent.Timeout(WAIT, AssertionError("the parent did not report its child")):
            child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        with gevent.Timeout(WAIT / 3, AssertionError("the forked child still holds the key")):
            store_at(tmp_path).acquire(key, "next", TTL).release()
    finally:
        parent.kill()
        parent.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def test_the_default_directory_must_be_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback under the shared temporary directory is refused if someone else could
    have made it (another user could then delete or forge the lock files)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(file_store.tempfile, "gettempdir", lambda: str(tmp_path))
    squatted = file_store.default_directory()
    assert squatted.parent == tmp_path
    squatted.mkdir()
    squatted.chmod(0o777)
    with pytest.raises(PermissionDeniedError, match="writable by others"):
        FileStore()
    squatted.chmod(0o700)
    assert FileStore().directory == squatted


# -- finding 6: I/O errors are store errors ---------------------------------------------------


class Faults:
    """Makes the file store's ``module.func`` raise ``OSError(code)`` for its next ``count``
    calls, through a stand-in for the module in the file store's namespace only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: str, func: str, code: int, count: int) -> None:
        real_module = getattr(file_store, module)
        real = getattr(real_module, func)
        self.left = count
        self.raised = 0

        def faulty(*args: object, **kwargs: object) -> object:
            if self.left > 0:
                self.left -= 1
                self.raised += 1
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)

        stand_in = SimpleNamespace(**{name: getattr(real_module, name) for name in dir(real_module)
                                      if not name.startswith("__")})
        setattr(stand_in, func, faulty)
        monkeypatch.setattr(file_store, module, stand_in)


#: Each fault hits acquire() on a path of its own: the inode check, the record's write and
#: read, and the lock itself.
ACQUIRE_FAULTS = [
    ("os", "stat", errno.EIO),
    ("os", "pwrite", errno.ENOSPC),
    ("os", "pread", errno.EIO),
    ("fcntl", "flock", errno.ENOLCK),
]



@pytest.mark.parametrize(("module", "func", "code"), ACQUIRE_FAULTS, ids=[f[1] for f in ACQUIRE_FAULTS])
def test_a_retrying_campaign_outlives_io_errors(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch, events: list[LeadershipEvent],
    module: str, func: str, code: int,
) -> None:
    """Finding 6: an OSError in acquire() is a StoreUnavailableError, retried like any outage."""
    store = store_at(tmp_path)
    store.acquire(key, "setup", TTL).release()  # the lock file exists: every fault is on its path
    faults = Faults(monkeypatch, module, func, code, count=3)
    candidate = Candidate(store, key, "alice", ttl=TTL, retry=Backoff(initial=0.05, maximum=0.2))
    try:
        win(candidate)
        assert faults.raised == 3
        retried = [e for e in events if isinstance(e, ElectionError)]
        assert retried and all(not e.fatal and isinstance(e.error, StoreUnavailableError) for e in retried), retried
        assert os.strerror(code) in str(retried[0].error)
    finally:
        candidate.stop()


@pytest.mark.parametrize(("module", "func", "code"), ACQUIRE_FAULTS, ids=[f[1] for f in ACQUIRE_FAULTS])
def test_without_retry_an_io_error_ends_the_campaign_as_store_unavailable(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch, module: str, func: str, code: int
) -> None:
    store = store_at(tmp_path)
    store.acquire(key, "setup", TTL).release()
    Faults(monkeypatch, module, func, code, count=1)
    candidate = Candidate(store, key, "alice", ttl=TTL)
    elected, errors = candidate.run_for_election()
    assert drain(elected, WAIT, "elected") == [False]
    reported = drain(errors, 5, "errors")
    assert len(reported) == 1 and isinstance(reported[0], StoreUnavailableError), reported
    assert "unexpected" not in str(reported[0])
    candidate.stop()


def test_a_file_or_directory_vanishing_during_acquire_is_no_error(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOENT from os.stat in acquire() (the file, or the directory, removed under it) used to
    end the campaign as an "unexpected" error; now acquire() just tries again."""
    store = store_at(tmp_path)
    store.acquire(key, "setup", TTL).release()
    faults = Faults(monkeypatch, "os", "stat", errno.ENOENT, count=2)
    candidate = Candidate(store, key, "alice", ttl=TTL)
    try:
        win(candidate)
        assert faults.raised == 2
    finally:
        candidate.stop()


def test_permission_errors_end_even_a_retrying_campaign(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES cannot be retried away: the campaign ends with PermissionDeniedError."""
    store = store_at(tmp_path)
    Faults(monkeypatch, "os", "open", errno.EACCES, count=1000)
    candidate = Candidate(store, key, "alice", ttl=TTL, retry=Backoff(initial=0.05, maximum=0.2))
    elected, errors = candidate.run_for_election()
    assert drain(elected, WAIT, "elected") == [False]
    reported = drain(errors, 5, "errors")
    assert len(reported) == 1 and isinstance(reported[0], PermissionDeniedError), reported
    candidate.stop()


@pytest.mark.parametrize(("func", "code"), [("pread", errno.EIO), ("open", errno.EMFILE)])
def test_leader_and_watch_report_io_errors_as_store_errors(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch, func: str, code: int
) -> None:
    store = store_at(tmp_path)
    lease = store.acquire(key, "alice", TTL)
    try:
        Faults(monkeypatch, "os", func, code, count=2)
        with pytest.raises(StoreUnavailableError):
            store.leader(key)
        with pytest.raises(StoreUnavailableError):
            next(iter(store.watch(key)))
        assert store.leader(key) == LeaderInfo("alice", lease.term)
    finally:
        lease.release()


def test_a_retrying_follower_outlives_io_errors(tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_at(tmp_path)
    lease = store.acquire(key, "alice", TTL)
    faults = Faults(monkeypatch, "os", "pread", errno.EIO, count=3)
    follower = Follower(store, key, retry=Backoff(initial=0.05, maximum=0.2))
    try:
        leaders, errors = follower.follow_election()
        while (leader := next_item(leaders, WAIT, "the follower to name alice")) is None:
            pass
        assert leader == "alice"
        assert faults.raised == 3 and errors.qsize() == 0
    finally:
        follower.stop()
        lease.release()


def test_renewal_io_errors_are_store_unavailable(tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_at(tmp_path)
    lease = store.acquire(key, "alice", TTL)
    try:
        Faults(monkeypatch, "os", "fstat", errno.EIO, count=1)
        with pytest.raises(StoreUnavailableError):
            lease.renew()
        lease.renew()
    finally:
        lease.release()
    with pytest.raises(StoreError):
        lease.renew()  # released: LeadershipLostError


# -- waiting without polling ------------------------------------------------------------------


class Parked:
    """Records each wait of the store's change subscriptions: which subscriptions wait with
    no deadline (parked until the lock file changes), and every lock attempt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.deadlines: dict[int, float | None] = {}
        self.flocks = 0
        real_wait = file_changes.Subscription.wait
        real_try_flock = file_store._try_flock

        def wait(subscription: file_changes.Subscription, timeout: float | None) -> bool:
            self.deadlines[id(subscription)] = timeout
            try:
                return real_wait(subscription, timeout)
            finally:
                self.deadlines[id(subscription)] = 0.0  # looking again

        def try_flock(fd: int, operation: int) -> bool:
            self.flocks += 1
            return real_try_flock(fd, operation)

        monkeypatch.setattr(file_changes.Subscription, "wait", wait)
        monkeypatch.setattr(file_store, "_try_flock", try_flock)

    def count(self) -> int:
        """How many subscriptions wait for a change with no deadline now."""
        return sum(timeout is None for timeout in self.deadlines.values())


@pytest.mark.skipif(file_changes._LIBC is None and not _IN_CI, reason="no inotify (fails under CI=true)")
def test_an_idle_waiter_and_follower_wait_for_a_change_and_never_poll(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the holder holds, a waiter and a follower each block on a change to the lock
    file: no deadline, and not one lock attempt between changes. A release wakes both."""
    parked = Parked(monkeypatch)
    lease = store_at(tmp_path).acquire(key, "alice", TTL)
    waiter = gevent.spawn(store_at(tmp_path).acquire, key, "bob", TTL)
    seen: gevent.queue.Queue = gevent.queue.Queue()
    follower = gevent.spawn(lambda: [seen.put(info) for info in store_at(tmp_path).watch(key)])
    try:
        assert next_item(seen, WAIT, "the follower's first value") == LeaderInfo("alice", lease.term)
        wait_until(lambda: parked.count() == 2, WAIT, "the waiter and the follower to park")
        flocks = parked.flocks
        gevent.sleep(2.0)  # a window to observe: nothing may happen in it
        assert (parked.flocks - flocks, parked.count()) == (0, 2)
        lease.release()
        with gevent.Timeout(WAIT, AssertionError("the release did not wake the waiter")):
            won = waiter.get()
        assert won.node == "bob" and won.term > lease.term
        while (info := next_item(seen, WAIT, "the follower to name bob")) != LeaderInfo("bob", won.term):
            assert info is None, info  # vacant for a moment in between, at most
        won.release()
    finally:
        waiter.kill()
        follower.kill()
        lease.release()


@pytest.mark.skipif(file_changes._LIBC is None and not _IN_CI, reason="no inotify (fails under CI=true)")
def test_a_holder_killed_wakes_a_parked_waiter_and_follower(tmp_path: Path, key: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL: the kernel closes the holder's lock file, which is the change that wakes them
    (the close is announced a moment before the lock is dropped: they look again)."""
    parked = Parked(monkeypatch)
    script = ("import sys\nfrom greenleader.stores.file import FileStore\n"
              "FileStore(directory=sys.argv[1]).acquire(sys.argv[2], 'doomed', 60)\n"
              "print('held', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), key], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    waiter = follower = None
    try:
        assert holder.stdout is not None
        with gevent.Timeout(WAIT, AssertionError("the holder process did not take the key")):
            assert holder.stdout.readline() == b"held\n"
        waiter = gevent.spawn(store_at(tmp_path).acquire, key, "bob", TTL)
        seen: gevent.queue.Queue = gevent.queue.Queue()
        follower = gevent.spawn(lambda: [seen.put(info) for info in store_at(tmp_path).watch(key)])
        assert next_item(seen, WAIT, "the follower's first value").node == "doomed"
        wait_until(lambda: parked.count() == 2, WAIT, "the waiter and the follower to park")
        holder.kill()
        with gevent.Timeout(WAIT, AssertionError("the holder's death did not wake the waiter")):
            won = waiter.get()
        assert won.node == "bob"
        while (info := next_item(seen, WAIT, "the follower to name bob")) != LeaderInfo("bob", won.term):
            assert info is None, info
        won.release()
    finally:
        for greenlet in (waiter, follower):
            if greenlet is not None:
                greenlet.kill()
        holder.kill()
        holder.wait()


@pytest.fixture(params=["inotify", "polling"])
def changes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Waiting for lock file changes (Linux), and polling: no inotify, or no watch left."""
    if request.param == "polling":
        monkeypatch.setattr(file_changes, "_LIBC", None)
    elif file_changes._LIBC is None and not _IN_CI:
        pytest.skip("no inotify")
    return request.param


def test_handover_and_following_whether_changes_are_watched_or_polled(
    tmp_path: Path, key: str, changes: str
) -> None:
    stores = [store_at(tmp_path) for _ in range(3)]
    seen: gevent.queue.Queue = gevent.queue.Queue()
    follower = gevent.spawn(lambda: [seen.put(info) for info in stores[2].watch(key)])
    try:
        assert next_item(seen, WAIT, "vacant at first") is None
        first = stores[0].acquire(key, "alice", TTL)
        assert next_item(seen, WAIT, "alice") == LeaderInfo("alice", first.term)
        waiter = gevent.spawn(stores[1].acquire, key, "bob", TTL)
        first.release()
        with gevent.Timeout(WAIT, AssertionError("bob did not win")):
            second = waiter.get()
        while (info := next_item(seen, WAIT, "bob")) != LeaderInfo("bob", second.term):
            assert info is None, info
        second.release()
        assert next_item(seen, WAIT, "vacant again") is None
    finally:
        follower.kill()


def test_a_directory_that_cannot_be_watched_is_polled(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No inotify watch left for this user (fs.inotify.max_user_watches): poll, and say so."""
    if file_changes._LIBC is None and not _IN_CI:
        pytest.skip("no inotify")

    def no_watch(watcher: object, subscription: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file_changes._Watcher, "add", no_watch)
    lease = store_at(tmp_path).acquire(key, "alice", TTL)
    waiter = gevent.spawn(store_at(tmp_path).acquire, key, "bob", TTL)
    try:
        lease.release()
        with gevent.Timeout(WAIT, AssertionError("bob did not win by polling")):
            waiter.get().release()
        assert "polling it every" in caplog.text
    finally:
        waiter.kill()


def test_a_change_queue_that_cannot_be_read_makes_its_waiters_poll(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if file_changes._LIBC is None and not _IN_CI:
        pytest.skip("no inotify")
    parked = Parked(monkeypatch)

    def failing_read(fd: int, size: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    stand_in = SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    stand_in.read = failing_read
    monkeypatch.setattr(file_changes, "os", stand_in)
    lease = store_at(tmp_path).acquire(key, "alice", TTL)
    waiter = gevent.spawn(store_at(tmp_path).acquire, key, "bob", TTL)
    try:
        wait_until(lambda: parked.count() == 1, WAIT, "the waiter to park")
        lease.release()  # a change the waiter cannot read of
        with gevent.Timeout(WAIT, AssertionError("bob did not win by polling")):
            waiter.get().release()
        assert "cannot read lock file changes" in caplog.text and "polling it every" in caplog.text
    finally:
        waiter.kill()


@pytest.mark.skipif(file_changes._LIBC is None and not _IN_CI, reason="no inotify (fails under CI=true)")
def test_an_acquire_woken_in_a_forked_child_never_wins(tmp_path: Path, key: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter whose wake-up was pending at a fork runs once more in the child: it must not
    lock the file and write a record naming a node that never leads (a follower would name
    it). Here the child's fork hook is run in place, on the waiter's hold and the holder's."""
    parked = Parked(monkeypatch)
    lease = store_at(tmp_path).acquire(key, "alice", TTL)
    waiter = gevent.spawn(store_at(tmp_path).acquire, key, "bob", TTL)
    try:
        wait_until(lambda: parked.count() == 1, WAIT, "the waiter to park")
        file_store._forget_holds_in_child()  # what a fork does in the child; the lock file is free now
        with gevent.Timeout(WAIT, AssertionError("the inherited acquire neither won nor ended")), \
                pytest.raises(StoreUnavailableError, match="fork"):
            waiter.get()
        assert store_at(tmp_path).leader(key) is None
        assert b"bob" not in (tmp_path / file_store._file_name(key)).read_bytes()
    finally:
        waiter.kill()
        lease.release()
