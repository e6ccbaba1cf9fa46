"""A candidate (or follower) in a process of its own, and the driver that runs a few of them.

Run as ``python -m tests.candidate_process --url URL --key K --node N --ttl S [--follower]``:
the child monkey-patches gevent first, runs a :class:`~greenleader.Candidate` (or a
:class:`~greenleader.Follower`) on ``greenleader.stores.from_url(URL)`` and prints one JSON
line per change on stdout, flushed::

    {"event": "campaigning" | "elected" | "deposed" | "leader" | "error",
     "node": ..., "term": ..., "t": time.monotonic()}

``node`` is this process's node name, except on ``leader`` lines where it is the leader a
follower saw (``null`` when vacant). ``campaigning`` is printed each time the candidate enters
the store's ``acquire``. CLOCK_MONOTONIC is system-wide on Linux, so the parent compares
``t`` with its own clock. The times of ``elected`` and ``deposed`` are taken at the store
boundary, so a tenure printed here always contains the candidate's real one: ``elected`` is
when ``acquire`` returned (the candidate steps up after it), ``deposed`` is no later than when
the lease's ``release`` began (the candidate steps down before it).

SIGTERM stops the candidate gracefully (releasing the key) and the process exits 0. A campaign
(or watch) ended by an error prints its ``error`` line (``"fatal": true``) and exits 3. With
``--retry SECONDS`` the candidate (or follower) uses the library's own retry
(``Backoff(initial=SECONDS, maximum=4 * SECONDS)``): each store error it outlives is printed
as an ``error`` line with ``"fatal": false``. With ``--history FILE`` a candidate also appends
its tenures to FILE for the split-brain checker (``tests.history``), and with ``--block-hub S``
it blocks its gevent hub for S seconds on SIGUSR1 (``tests.faults``).

The nemesis's other controls, all by signal (see ``tests.faults`` for the senders):

- ``RESIGN_SIGNAL`` (SIGUSR2): the candidate resigns (if it leads).
- ``--inject-rate P``: the store is wrapped in :class:`greenleader.testing.FaultyStore`;
  between ``INJECT_ON_SIGNAL`` and ``INJECT_OFF_SIGNAL`` each call of a store primitive
  raises an injected exception with probability P (a random class among
  ``INJECTED_ERRORS``, before the call reaches the store or, except for ``acquire``, after it
  did its work, as a lost reply would); an ``injected`` line names each one.
- ``--fork-for S`` (with ``--history``): on ``FORK_SIGNAL`` the process forks. The child, a
  copy of a process whose candidate may be leading, must stay inert: for S seconds it
  records every ``is_leader()`` that says True into a history file of its own (any is a
  violation: the checker finds no tenure of the child's), then stops its inherited
  candidate and closes its store, as a worker shutting down would, and exits. The parent
  prints a ``forked`` line.

:class:`ProcessGroup` is the parent side: it starts such processes, collects their lines and
waits for them with bounded timeouts.
"""

if __name__ == "__main__":  # the child: patch before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import ctypes
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
_ANY = object()
EXIT_ERROR = 3  # the campaign (or watch) ended with an error
RESIGN_SIGNAL = signal.SIGUSR2
FORK_SIGNAL = signal.SIGRTMIN
INJECT_ON_SIGNAL = signal.SIGRTMIN + 1
INJECT_OFF_SIGNAL = signal.SIGRTMIN + 2
#: Exception classes ``--inject-rate`` raises, and their weights: mostly the store errors a
#: candidate must outlive, sometimes what only a bug would raise (which may end a campaign).
INJECTED_ERRORS = {
    "StoreUnavailableError": 6, "StoreError": 3, "LeadershipLostError": 2, "InvalidArgumentError": 1,
    "OSError": 1, "RuntimeError": 1, "GreenletExit": 1,
}
#: Seconds between two samples of ``is_leader()`` in a forked child.
FORK_SAMPLE = 0.005
#: In a forked child, the greenlet that checks it and then ends the process.
_fork_child: list[Any] = []


# ---------------------------------------------------------------------------------------------
# the child


def _emit(event: str, node: str | None, term: int | None = None, t: float | None = None, **extra: Any) -> None:
    line = {"event": event, "node": node, "term": term, "t": time.monotonic() if t is None else t, **extra}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class _Tenure:
    """One won lease, timed at the store boundary: when ``acquire`` returned, when ``release``
    began, and whether its ``elected``/``deposed`` lines are out."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease
        self.acquired_at = time.monotonic()
        self.released_at: float | None = None
        self.announced = False
        self.ended = False


def _instrument(store: Any, node: str, tenures: list[_Tenure], is_leader: Callable[[], bool]) -> None:
    """Wrap this store object's ``acquire`` (and each lease's ``release``) to time them."""
    acquire = store.acquire

    def timed_acquire(key: str, name: str, ttl: float) -> Any:
        _emit("campaigning", node)
        lease = acquire(key, name, ttl)
        tenure = _Tenure(lease)
        tenures.append(tenure)
        release = lease.release

        def timed_release() -> None:
            if tenure.released_at is None:
                tenure.released_at = time.monotonic()
                if is_leader():
                    _emit("error", node, lease.term, error="released the key while still leading")
            release()

        lease.release = timed_release
        return lease

    store.acquire = timed_acquire


def _report(node: str, source: Any, tenures: list[_Tenure] | None = None) -> None:
    """Print what ``source`` publishes: wins and losses (matched to their lease by term) and
    the errors it outlives (fatal ones come on its errors queue)."""
    import zope.event

    from greenleader.events import ElectionError, LeadershipAcquired, LeadershipLost

    def on_event(event: object) -> None:
        if getattr(event, "source", None) is not source:
            return
        if isinstance(event, ElectionError) and not event.fatal:
            _emit("error", node, error=f"{type(event.error).__name__}: {event.error}", fatal=False)
        elif isinstance(event, LeadershipAcquired) and tenures is not None:
            tenure = next(t for t in tenures if t.lease.term == event.term and not t.announced)
            tenure.announced = True
            _emit("elected", node, event.term, tenure.acquired_at)
        elif isinstance(event, LeadershipLost) and tenures is not None:
            tenure = next(t for t in tenures if t.lease.term == event.term and t.announced and not t.ended)
            tenure.ended = True
            t = time.monotonic()
            _emit("deposed", node, event.term, t if tenure.released_at is None else min(t, tenure.released_at))

    zope.event.subscribers.append(on_event)


def _error_class(name: str) -> type[BaseException]:
    import builtins

    import greenleader.errors

    if name == "GreenletExit":
        return gevent.GreenletExit
    return getattr(greenleader.errors, name, None) or getattr(builtins, name)


def _faulty(store: Any, node: str, rate: float) -> Any:
    """``store`` in a FaultyStore that, while switched on by INJECT_ON_SIGNAL (until
    INJECT_OFF_SIGNAL), fails each call with probability ``rate``."""
    import random
    from dataclasses import dataclass

    from greenleader.testing import PRIMITIVES, Call, Fault, FaultyStore

    rng = random.Random()
    on = [False]
    names, weights = list(INJECTED_ERRORS), list(INJECTED_ERRORS.values())

    @dataclass
    class RandomError(Fault):
        def exception(self, call: Call) -> BaseException:
            name = rng.choices(names, weights)[0]
            _emit("injected", node, call.term, error=name, primitive=call.primitive, after=self.after)
            return _error_class(name)(f"injected into {call.primitive} of {call.key!r}")

    def hit(_call: Call) -> bool:
        return on[0] and rng.random() < rate / 2

    faulty = FaultyStore(store, history_size=1000)
    for primitive in PRIMITIVES:
        # Not after a won acquire: the lease would be lost to the candidate (nothing could ever
        # release it), which no store does: an acquire that raises leaves nothing behind.
        for after in (False,) if primitive == "acquire" else (False, True):
            faulty.add_fault(RandomError(primitive, RuntimeError, hit, times=None, after=after))

    def switch(value: bool) -> None:
        on[0] = value
        _emit("inject", node, on=value)

    gevent.signal_handler(INJECT_ON_SIGNAL, switch, True)
    gevent.signal_handler(INJECT_OFF_SIGNAL, switch, False)
    return faulty


def _fork(candidate: Any, store: Any, recorder: Any, node: str, seconds: float) -> None:
    """FORK_SIGNAL: fork; the child checks that it inherited no leadership (see the module doc)."""
    pid = os.fork()
    if pid:
        _emit("forked", node, child=pid)
        _, status = os.waitpid(pid, 0)  # gevent's waitpid: only this greenlet waits
        _emit("fork-reaped", node, child=pid, status=os.waitstatus_to_exitcode(status))
        return
    _fork_child.append(gevent.getcurrent())  # main() waits for it: the child ends here
    try:  # the child: nothing of the parent's may print, release or renew from here on
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        recorder.become_fork_child()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            recorder.observe()
            gevent.sleep(FORK_SAMPLE)
        with gevent.Timeout(10):
            candidate.stop()
            recorder.observe()
            store.close()
        recorder.write("fork-exit", t=time.monotonic())
    except BaseException as exc:  # report anything, then leave without any cleanup
        with contextlib.suppress(BaseException):
            recorder.write("fork-error", error=repr(exc), t=time.monotonic())
    finally:
        os._exit(0)


def _campaign(store: Any, args: argparse.Namespace, stopping: Event, current: list[Any]) -> bool:
    """Run the candidate until stopped; True if its campaign ended because of an error."""
    from greenleader import Candidate

    candidate = Candidate(store, args.key, args.node, args.ttl, retry=args.retry)
    gevent.signal_handler(RESIGN_SIGNAL, candidate.resign)
    if args.history:  # tests.history: tenures with their deadlines, for the split-brain checker
        from tests.faults import install_hub_blocker
        from tests.history import Recorder

        recorder = Recorder(args.history, args.node)
        recorder.attach(candidate, store)
        if args.block_hub:
            install_hub_blocker(args.block_hub, recorder.observe, recorder.blocked)
        if args.fork_for:
            gevent.signal_handler(FORK_SIGNAL, _fork, candidate, store, recorder, args.node, args.fork_for)
    tenures: list[_Tenure] = []
    _instrument(store, args.node, tenures, candidate.is_leader)
    current[:] = [candidate]
    _report(args.node, candidate, tenures)
    if stopping.is_set():
        return False
    elected, errors = candidate.run_for_election()
    for _ in elected:  # wins and losses are printed from the events, which carry the term
        pass
    candidate.stop()  # after an error: waits until every event has been delivered
    failed = False
    for error in errors:
        failed = True
        _emit("error", args.node, error=f"{type(error).__name__}: {error}", fatal=True)
    return failed


def _follow(store: Any, args: argparse.Namespace, stopping: Event, current: list[Any]) -> bool:
    """Follow the election until stopped; True if the watch ended because of an error."""
    from greenleader import Follower

    follower = Follower(store, args.key, retry=args.retry)
    current[:] = [follower]
    _report(args.node, follower)
    if stopping.is_set():
        return False
    leaders, errors = follower.follow_election()
    for leader in leaders:
        info = follower.leader_info()
        term = info.term if info is not None and info.node == leader else None
        _emit("leader", leader, term)
    failed = False
    for error in errors:
        failed = True
        _emit("error", args.node, error=f"{type(error).__name__}: {error}", fatal=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.candidate_process", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="store URL for greenleader.stores.from_url")
    parser.add_argument("--key", required=True, help="election key")
    parser.add_argument("--node", required=True, help="this process's node name")
    parser.add_argument("--ttl", type=float, required=True, help="candidate TTL in seconds")
    parser.add_argument("--follower", action="store_true", help="follow the election instead of running")
    parser.add_argument("--retry", type=float, default=None, metavar="SECONDS",
                        help="outlive store errors, retrying after a backoff starting at SECONDS")
    parser.add_argument("--history", metavar="FILE", help="append tenures to FILE (tests.history.Recorder)")
    parser.add_argument("--block-hub", type=float, default=0.0, metavar="SECONDS",
                        help="with --history: on SIGUSR1, block the gevent hub for SECONDS (tests.faults)")
    parser.add_argument("--inject-rate", type=float, default=0.0, metavar="P",
                        help="wrap the store in FaultyStore; while switched on, fail calls with probability P")
    parser.add_argument("--fork-for", type=float, default=0.0, metavar="SECONDS",
                        help="with --history: on FORK_SIGNAL, fork a child that must stay inert for SECONDS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.node} %(name)s %(levelname)s %(message)s")

    stopping = Event()
    current: list[Any] = []  # the running Candidate or Follower

    def on_sigterm() -> None:
        stopping.set()
        for runner in current:
            runner.stop()

    gevent.signal_handler(signal.SIGTERM, on_sigterm)

    from greenleader import Backoff
    from greenleader.errors import GreenleaderError
    from greenleader.stores import from_url

    if args.retry is not None:
        args.retry = Backoff(initial=args.retry, maximum=4 * args.retry)
    store = None
    try:
        store = from_url(args.url)
        if args.inject_rate:
            store = _faulty(store, args.node, args.inject_rate)
        failed = (_follow if args.follower else _campaign)(store, args, stopping, current)
    except GreenleaderError as exc:  # the store could not be made, or refused the key
        _emit("error", args.node, error=f"{type(exc).__name__}: {exc}", fatal=True)
        failed = True
    finally:
        if store is not None:
            store.close()
        if _fork_child:  # a forked child: its inherited campaign ended at once (inert); the
            _fork_child[0].join()  # checks go on until that greenlet ends the process
    return EXIT_ERROR if failed and not stopping.is_set() else 0


# ---------------------------------------------------------------------------------------------
# the parent


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


#: Slack on top of a backend's documented crash-failover bound (scheduling, expiry rounding).
FAILOVER_MARGIN = 2.0


def process_url(env: Any) -> str:
    """The URL a candidate process gives ``from_url`` for a store like ``make_store(env)``'s
    (``env`` is a tests.backends.BackendEnv)."""
    if env.kind == "file":
        return f"file://{env.workdir / 'elections'}?poll_interval=0.01"
    from tests.backends import support

    store_url = getattr(support(env.kind), "store_url", None)
    return store_url(env) if store_url is not None else env.cluster.url


def crash_bound(env: Any, ttl: float) -> float:
    """The backend's documented crash-failover bound plus FAILOVER_MARGIN.

    file: the kernel drops the dead holder's flock at once, waiters poll; etcd, ZooKeeper:
    the TTL; Consul: up to twice the session TTL (lazy expiry) plus the lock-delay.
    """
    if env.kind == "file":
        return FAILOVER_MARGIN
    if env.kind == "consul":
        from tests.backends import support

        store = support("consul").make_store(env)
        try:
            lock_delay = float(getattr(store, "lock_delay", 15.0))
        finally:
            store.close()
        return 2 * ttl + lock_delay + FAILOVER_MARGIN
    return ttl + FAILOVER_MARGIN


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T, Z...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


@dataclass
class Line:
    """One JSON line printed by a process, with the name of the process that printed it."""

    proc: str
    event: str
    node: str | None
    term: int | None
    t: float
    extra: dict[str, Any] = field(default_factory=dict)


class ElectionProcess:
    """One child process; its lines are read by a greenlet into ``lines``."""

    def __init__(self, group: "ProcessGroup", name: str, follower: bool, retry: float | None,
                 url: str | None = None, extra_args: Sequence[str] = ()) -> None:
        self.group = group
        self.name = name
        self.follower = follower
        self.lines: list[Line] = []
        self.stderr_path = group.workdir / f"{name}.stderr"
        self.killed_at: float | None = None  # SIGKILL sent
        self.frozen_at: float | None = None  # seen stopped, by freeze_and_kill()
        self.terminated_at: float | None = None  # SIGTERM sent
        argv = [
            sys.executable, "-m", "tests.candidate_process", "--url", url or group.url, "--key", group.key,
            "--node", name, "--ttl", str(group.ttl),
        ]
        if follower:
            argv.append("--follower")
        if retry is not None:
            argv += ["--retry", str(retry)]
        argv += extra_args
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        with open(self.stderr_path, "ab") as stderr:
            self.popen = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        self._reader = gevent.spawn(self._read)

    def __repr__(self) -> str:
        return f"<ElectionProcess {self.name} pid={self.popen.pid} rc={self.popen.returncode}>"

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                data = json.loads(raw)
                line = Line(self.name, data.pop("event"), data.pop("node"), data.pop("term"), data.pop("t"), data)
            except (ValueError, KeyError) as exc:
                log.warning("%s printed a line that is not an event (%s): %r", self.name, exc, raw)
                continue
            log.debug("%s: %s", self.name, line)
            self.lines.append(line)
            self.group._changed()
        self.popen.stdout.close()
        self.group._changed()

    def events(self, *kinds: str) -> list[Line]:
        return [line for line in self.lines if not kinds or line.event in kinds]

    def running(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> float:
        """Send SIGTERM; return the instant it was sent."""
        self.terminated_at = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        return self.terminated_at

    def kill(self) -> float:
        """Send SIGKILL; return the instant it was sent."""
        self.killed_at = time.monotonic()
        self.popen.kill()
        return self.killed_at

    def freeze_and_kill(self) -> float:
        """Crash the process in a way whose instant is known: SIGSTOP it, wait until the kernel
        reports it stopped (it runs no more code after that), then SIGKILL it. Returns the
        instant it was seen stopped: it can have believed it led no later than that, which a
        checker may use as the end of its last tenure (a SIGKILL alone takes effect some time
        after ``kill()`` returns, while another candidate may win at once, as on the file
        store, where the kernel drops a dead holder's lock)."""
        self.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _state(self.popen.pid) not in ("T", "Z", "X", None):
            gevent.sleep(0.001)
        self.frozen_at = time.monotonic()
        self.popen.kill()
        return self.frozen_at

    def wait_exit(self, timeout: float) -> int:
        """The exit status, waiting up to ``timeout`` seconds (AssertionError after)."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g}s\n{self.group.report()}") from None
        self._reader.join(timeout=timeout)
        return code

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no stderr: {exc})"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Tenure:
    """One process's time as leader, from its own lines; ``end`` is None while it still leads."""

    proc: str
    term: int | None
    start: float
    end: float | None


class ProcessGroup:
    """Candidate and follower processes on one key of one store, and waits on their lines."""

    def __init__(self, url: str, key: str, ttl: float, workdir: Path) -> None:
        self.url = url
        self.key = key
        self.ttl = ttl
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, ElectionProcess] = {}
        self._change = Event()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, name: str, *, follower: bool = False, retry: float | None = None, url: str | None = None,
              extra_args: Sequence[str] = ()) -> ElectionProcess:
        """Start a process; ``url`` (default the group's) and ``extra_args`` are its own."""
        assert name not in self.procs, f"a process named {name} exists already"
        proc = ElectionProcess(self, name, follower, retry, url, extra_args)
        self.procs[name] = proc
        return proc

    def _changed(self) -> None:
        change, self._change = self._change, Event()
        change.set()

    def lines(self, *kinds: str) -> list[Line]:
        """Every process's lines of these kinds, in order of their times."""
        found = [line for proc in self.procs.values() for line in proc.events(*kinds)]
        return sorted(found, key=lambda line: line.t)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``check()`` returns something true (returned); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            change = self._change
            result = check()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{self.report()}")
            change.wait(remaining)

    def wait_elected(self, timeout: float, after: float = 0.0, exclude: tuple[str, ...] = ()) -> Line:
        """The first ``elected`` line later than ``after`` by a process not in ``exclude``."""
        def found() -> Line | None:
            return next((line for line in self.lines("elected") if line.t > after and line.proc not in exclude), None)

        return self.wait_for(f"a new leader after t={after:.3f} (not {', '.join(exclude) or '-'})", found, timeout)

    def wait_line(self, proc: ElectionProcess, event: str, timeout: float, after: float = 0.0,
                  node: Any = _ANY) -> Line:
        """The first ``event`` line of ``proc`` later than ``after`` (and naming ``node``, if given)."""
        def found() -> Line | None:
            return next((line for line in proc.events(event)
                         if line.t > after and (node is _ANY or line.node == node)), None)

        return self.wait_for(f"{event!r} from {proc.name}" + ("" if node is _ANY else f" naming {node}"),
                             found, timeout)

    def tenures(self) -> list[Tenure]:
        """Each process's tenures; a killed process's last tenure ends at its kill."""
        found: list[Tenure] = []
        for proc in self.procs.values():
            open_tenure: Tenure | None = None
            for line in proc.events("elected", "deposed"):
                if line.event == "elected":
                    assert open_tenure is None, f"{proc.name} elected twice without deposed\n{self.report()}"
                    open_tenure = Tenure(proc.name, line.term, line.t, None)
                    found.append(open_tenure)
                else:
                    assert open_tenure is not None, f"{proc.name} deposed while not elected\n{self.report()}"
                    open_tenure.end = line.t
                    open_tenure = None
            if open_tenure is not None and proc.killed_at is not None:
                open_tenure.end = proc.killed_at
        return sorted(found, key=lambda tenure: tenure.start)

    def check_history(self, terms_reset_at: float | None = None) -> list[Tenure]:
        """Assert that no two tenures overlapped and that terms strictly increased; return them.

        ``terms_reset_at``: the store lost its data then (a restarted in-memory server), so
        terms are compared only between tenures on the same side of that instant.
        """
        tenures = self.tenures()
        for before, after in itertools.pairwise(tenures):
            assert before.end is not None and before.end <= after.start, (
                f"two leaders at once: {before} and {after}\n{self.report()}"
            )
            if terms_reset_at is not None and before.start < terms_reset_at <= after.start:
                continue
            assert before.term is not None and after.term is not None and after.term > before.term, (
                f"fencing term did not increase: {before} then {after}\n{self.report()}"
            )
        return tenures

    def unexpected_errors(self) -> list[Line]:
        return self.lines("error")

    def close(self, timeout: float = 15.0) -> None:
        """SIGTERM every process still running, then SIGKILL those that do not exit in time."""
        running = [proc for proc in self.procs.values() if proc.running()]
        for proc in running:
            proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %gs; killing it", proc.name, timeout)
                proc.popen.kill()
                proc.popen.wait()
        for proc in self.procs.values():
            proc._reader.join(timeout=5)

    def report(self) -> str:
        """Every line so far and the stderr tail of each process, for failure messages."""
        t0 = min((line.t for line in self.lines()), default=0.0)
        out = [f"store {self.url} key {self.key}; times relative to the first line:"]
        for line in self.lines():
            out.append(f"  {line.t - t0:8.3f} {line.proc:>10} {line.event:<11} node={line.node} "
                       f"term={line.term} {line.extra or ''}")
        for proc in self.procs.values():
            out.append(f"--- {proc!r} stderr:\n{proc.stderr_tail()}")
        return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
