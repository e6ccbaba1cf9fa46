"""What every benchmark shares: settings, statistics, child processes, servers, store probes.

The driver (``python -m benchmarks``) is monkey-patched by gevent before this module is
imported, so sockets, subprocesses and sleeps here are cooperative.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import itertools
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402

log = logging.getLogger("benchmarks")

KINDS = ["file", "consul", "etcd", "zookeeper"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    """How much of each benchmark to run; ``quick()`` is the smoke-run variant."""

    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    handover_trials: int = 15
    failover_trials: int = 5
    follower_changes: int = 10
    followers: int = 100
    cost_participants: int = 10
    cost_window: float = 45.0
    big_candidates: int = 1000
    big_window: float = 20.0
    big_startup: float = 60.0  # seconds the 1,000 may take to all lead before the window opens anyway
    contention_sizes: tuple[tuple[int, int], ...] = ((10, 1), (10, 10))  # (processes, candidates each)
    contention_handovers: int = 10
    contention_idle: float = 7.5  # one renewal period of a waiting etcd candidate at the TTL of 60 s
    file_idle_participants: int = 10  # idle file-store waiters (and as many followers) in a process
    file_idle_window: float = 45.0  # seconds: 10 x 45 participant-seconds resolve 0.5 CPU s/hour well
    file_idle_trials: int = 10  # store-level handovers and failovers on the file store (not --trials)
    quick: bool = False
    #: Other source trees (git worktrees of other commits) whose ``greenleader run`` joins the
    #: handover section beside this tree's, in the same run (--against).
    against: tuple[Path, ...] = ()

    @classmethod
    def quick_run(cls, kinds: list[str]) -> Config:
        return cls(
            kinds=kinds, handover_trials=3, failover_trials=1, follower_changes=2, followers=10,
            cost_participants=2, cost_window=5.0, big_candidates=50, big_window=3.0, big_startup=30.0,
            contention_sizes=((2, 1), (2, 3)), contention_handovers=2, contention_idle=1.0,
            file_idle_participants=2, file_idle_window=2.0, file_idle_trials=2, quick=True,
        )


# ---------------------------------------------------------------------------------------------
# statistics


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Count, median, p95, max (and min) of ``values``; NaN when there are none."""
    data = list(values)
    if not data:
        return {"n": 0, "median": math.nan, "p95": math.nan, "max": math.nan, "min": math.nan}
    return {"n": len(data), "median": statistics.median(data), "p95": percentile(data, 95),
            "max": max(data), "min": min(data)}


def brief(values: list[float]) -> str:
    """``"<median> median, <max> max (<count>)"`` in ms, as the trace scripts print a step."""
    return f"{statistics.median(values):.2f} median, {max(values):.2f} max ({len(values)})"


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs and not math.isnan(theirs) and not math.isnan(ours) else math.nan


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# waiting on changes


class Changes:
    """Wakes every waiter whenever something it may wait for has changed."""

    def __init__(self) -> None:
        self._event = Event()

    def notify(self) -> None:
        event, self._event = self._event, Event()
        event.set()

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, poll: float | None = None) -> Any:
        """Wait until ``check()`` returns something true and return it; TimeoutError after
        ``timeout``. ``poll``: also look again this often (for state outside this process)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self._event
            result = check()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            event.wait(min(remaining, poll) if poll else remaining)


changes = Changes()


# ---------------------------------------------------------------------------------------------
# child processes


def _die_with_parent() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


@dataclass
class Line:
    """A JSON line a worker printed, with the driver's time of arrival."""

    event: str
    data: dict[str, Any]
    arrived: float


class Proc:
    """A child process in its own process group (so a SIGKILL takes its children too).

    With ``json_lines`` its stdout is read as JSON lines into :attr:`lines`; stderr goes to a
    file in ``workdir``.
    """

    _names = itertools.count(1)

    def __init__(self, argv: list[str], workdir: Path, name: str | None = None, *, env: dict[str, str] | None = None,
                 json_lines: bool = False, stdin: bool = False) -> None:
        self.name = name or f"p{next(self._names)}"
        self.argv = argv
        self.stderr_path = Path(workdir) / f"{self.name}.stderr"
        self.lines: list[Line] = []
        with open(self.stderr_path, "ab") as stderr:
            self.popen = subprocess.Popen(
                argv, cwd=REPO, env=env or child_env(), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if json_lines else subprocess.DEVNULL, stderr=stderr,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.pid = self.popen.pid
        self._reader = gevent.spawn(self._read) if json_lines else None
        self._watcher = gevent.spawn(self._watch_exit)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            arrived = time.monotonic()
            try:
                data = json.loads(raw)
                self.lines.append(Line(data.pop("event"), data, arrived))
            except (ValueError, KeyError):
                log.warning("%s printed %r", self.name, raw[:200])
                continue
            changes.notify()

    def _watch_exit(self) -> None:
        self.popen.wait()
        changes.notify()

    def events(self, kind: str) -> list[Line]:
        return [line for line in self.lines if line.event == kind]

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> float:
        """Signal the whole process group; return when it was sent."""
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)
        return sent

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} did not exit within {timeout:g}s; stderr:\n{self.stderr_tail()}") from None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds."""
        if self.running():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %gs; killing it", self.name, grace)
        self.signal_group(signal.SIGKILL)
        self.popen.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no stderr: {exc})"


def stop_all(procs: Iterable[Proc], grace: float = 5.0) -> None:
    procs = [p for p in procs if p.running()]
    for proc in procs:
        proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        proc.stop(grace=0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


# ---------------------------------------------------------------------------------------------
# servers


class Stores:
    """One single-node server per kind, started on first use (tests/servers.py), and the
    file store's directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.clusters: dict[str, servers.Cluster] = {}
        self.versions: dict[str, str] = {}

    def cluster(self, kind: str) -> servers.Cluster:
        if kind not in self.clusters:
            started = time.monotonic()
            self.clusters[kind] = servers.start(kind, self.workdir / "servers", 1)
            log.info("started %s in %.1fs", self.clusters[kind], time.monotonic() - started)
            self.versions[kind] = _server_version(kind)
        return self.clusters[kind]

    def addr(self, kind: str) -> str:
        return self.cluster(kind).addrs[0]

    def url(self, kind: str, addr: str | None = None, **options: Any) -> str:
        """A greenleader store URL; ``addr`` replaces the server's (a proxy in front of it)."""
        query = "&".join(f"{k}={v}" for k, v in options.items())
        if kind == "file":
            directory = self.workdir / "file-store"
            directory.mkdir(parents=True, exist_ok=True)
            return f"file://{directory}" + (f"?{query}" if query else "")
        return f"{kind}://{addr or self.addr(kind)}" + (f"?{query}" if query else "")

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.stop()
        self.clusters.clear()


def _server_version(kind: str) -> str:
    argv = {"consul": ["consul", "version"], "etcd": ["etcd", "--version"],
            "zookeeper": ["dpkg-query", "-W", "-f=${Version}", "zookeeper"]}[kind]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def unique_key(label: str) -> str:
    return f"bench/{label}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# looking at the store from outside: how many contenders wait on a key


def consul_sessions(addr: str) -> list[dict[str, Any]]:
    return json.loads(servers.http("GET", f"http://{addr}/v1/session/list"))


def etcd_count(addr: str, prefix: str) -> int:
    """How many candidates are registered under ``prefix`` (the election's key and a slash): keys
    right under it, one per candidate, and not their ``<id>/live`` twins or ``<id>/done`` release
    marks (a greenleader candidate has a twin: counting every key called three contenders
    registered while only two were, so a handover began beside a third still starting up)."""
    raw = prefix.encode()
    end = bytearray(raw)
    end[-1] += 1
    body = json.dumps({"key": base64.b64encode(raw).decode(), "range_end": base64.b64encode(bytes(end)).decode(),
                       "keys_only": True}).encode()
    kvs = json.loads(servers.http("POST", f"http://{addr}/v3/kv/range", body)).get("kvs", [])
    return sum(b"/" not in base64.b64decode(kv["key"])[len(raw):] for kv in kvs)


class ZooKeeperProbe:
    """A kazoo client of the driver's own, to count contender nodes."""

    def __init__(self, addr: str) -> None:
        from kazoo.client import KazooClient
        from kazoo.handlers.gevent import SequentialGeventHandler

        self.client = KazooClient(hosts=addr, timeout=10.0, handler=SequentialGeventHandler())
        self.client.start(timeout=15)

    def count(self, path: str) -> int:
        from kazoo.exceptions import NoNodeError

        try:
            return sum("__lock__" in child for child in self.client.get_children(path))
        except NoNodeError:
            return 0

    def close(self) -> None:
        self.client.stop()
        self.client.close()
