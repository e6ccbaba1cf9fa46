"""Cost at rest: store requests and CPU of idle candidates and followers, and of 1,000 idle
candidates in one process.

Per store, four worker processes (benchmarks/worker.py), each behind a counting proxy of its
own (benchmarks/proxy.py), run side by side for one window:

- *leader*: N candidates on N keys of their own, so each leads and renews;
- *waiter*: N candidates on N keys that a fifth process (not measured) holds;
- *follower*: N followers on those held keys;
- *baseline*: the same process with its store connected and no participant.

Figures per participant are (role - baseline) / N; CPU is the process's user + system time
from the worker's own ``getrusage`` (exact to the microsecond: /proc's 10 ms ticks are too
coarse for a file-store waiter's fraction of a CPU second an hour). All use the library's
default TTL of 15 s. On the file store, "requests" are lock attempts (``flock`` calls),
counted inside the worker.

The *idle* section (:func:`run_idle`), one store at a time: a process runs 1,000 candidates on
1,000 keys on one store object (so they share what the store shares: Consul's session,
etcd's lease, ZooKeeper's session), with retries on, as a long-running application runs
them: the time until all lead, then how many lead, step-downs, errors, requests, CPU and
resident memory over an idle window. The Consul agent has Consul's default limits (200
connections per client address).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from .common import Config, Proc, Stores, changes, rss_mb, stop_all
from .proxy import CountingProxy

log = logging.getLogger(__name__)

TTL = 15.0
SETTLE = 3.0  # seconds after setup before a window opens: waiters are registered by then
STARTUP = 120.0
ROLES = ("baseline", "leader", "waiter", "follower")


def _worker(url: str, name: str, workdir: Path, *args: str) -> Proc:
    argv = [sys.executable, "-m", "benchmarks.worker", "--url", url, "--name", name, "--ttl", f"{TTL:g}", *args]
    return Proc(argv, workdir, name, json_lines=True, stdin=True)


def _wait_lines(proc: Proc, event: str, count: int, timeout: float) -> None:
    def enough() -> bool:
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited: {proc.stderr_tail()}")
        return len(proc.events(event)) >= count

    changes.wait_for(f"{count} {event!r} lines from {proc.name}", enough, timeout)


def _stats(proc: Proc) -> dict[str, Any]:
    """Ask a worker for its figures so far: ``cpu_s`` (getrusage), ``flock`` (the file store's
    lock attempts), ``rss_mb``, ``t`` (its clock when it answered)."""
    before = len(proc.events("stats"))
    proc.send("stats")
    changes.wait_for(f"stats from {proc.name}", lambda: len(proc.events("stats")) > before, 30)
    return proc.events("stats")[-1].data


class _Setup:
    """The workers (and proxies) of one store."""

    def __init__(self, kind: str, stores: Stores, n: int, workdir: Path) -> None:
        self.kind = kind
        self.n = n
        self.proxies: dict[str, CountingProxy] = {}
        self.procs: dict[str, Proc] = {}
        tag = uuid.uuid4().hex[:6]
        held, lead = f"bench/cost-{tag}/held", f"bench/cost-{tag}/lead"
        direct = stores.url(kind)

        def url(role: str) -> str:
            if kind == "file":
                return direct
            self.proxies[role] = CountingProxy(kind, stores.addr(kind))
            return stores.url(kind, addr=self.proxies[role].addr)

        self.holder = _worker(direct, f"{kind}-holder", workdir, "--candidates", str(n), "--keys", held)
        try:
            self._start(url, n, held, lead, workdir)
        except BaseException:
            self.close()
            raise

    def _start(self, url: Callable[[str], str], n: int, held: str, lead: str, workdir: Path) -> None:
        kind = self.kind
        _wait_lines(self.holder, "elected", n, STARTUP)
        args = {"baseline": ["--connect", "--keys", held], "leader": ["--candidates", str(n), "--keys", lead],
                "waiter": ["--candidates", str(n), "--keys", held], "follower": ["--followers", str(n), "--keys", held]}
        for role in ROLES:
            self.procs[role] = _worker(url(role), f"{kind}-{role}", workdir, *args[role])
        _wait_lines(self.procs["leader"], "elected", n, STARTUP)
        _wait_lines(self.procs["waiter"], "campaigning", n, STARTUP)
        for role in ("baseline", "follower"):
            _wait_lines(self.procs[role], "started", 1, STARTUP)

    def sample(self) -> dict[str, dict[str, float]]:
        out = {}
        for role, proc in self.procs.items():
            counts = self.proxies[role].snapshot() if role in self.proxies else {}
            stats = _stats(proc)
            requests = stats["flock"] if self.kind == "file" else counts.get("requests", 0)
            out[role] = {"cpu": stats["cpu_s"], "requests": requests, "pings": counts.get("pings", 0),
                         "connections": counts.get("connections", 0), "t": time.monotonic()}
        return out

    def close(self) -> None:
        stop_all([self.holder, *self.procs.values()], grace=30)
        for proxy in self.proxies.values():
            proxy.close()


def _per_participant(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], n: int
                     ) -> dict[str, Any]:
    def delta(role: str, what: str) -> float:
        return after[role][what] - before[role][what]

    window = after["baseline"]["t"] - before["baseline"]["t"]
    roles: dict[str, Any] = {"baseline": {
        "cpu_s_per_hour": delta("baseline", "cpu") / window * 3600,
        "requests_per_min": delta("baseline", "requests") / window * 60,
        "process_pings_per_min": delta("baseline", "pings") / window * 60,
    }}
    for role in ("leader", "waiter", "follower"):
        roles[role] = {
            "n": n,
            "requests_per_min": (delta(role, "requests") - delta("baseline", "requests")) / n / window * 60,
            "cpu_s_per_hour": (delta(role, "cpu") - delta("baseline", "cpu")) / n / window * 3600,
            "process_pings_per_min": delta(role, "pings") / window * 60,
            "raw": {"requests": delta(role, "requests"), "cpu_s": delta(role, "cpu"), "window_s": window},
        }
    return roles


def _leading(proc: Proc) -> int:
    return len(proc.events("elected")) - len(proc.events("deposed"))


def _big(kind: str, stores: Stores, n: int, window: float, startup: float, workdir: Path) -> dict[str, Any]:
    """``n`` candidates on ``n`` keys with retries (as a long-running application runs them):
    until all lead or ``startup`` seconds pass, then a window; what it holds, costs and loses."""
    proxy = CountingProxy(kind, stores.addr(kind)) if kind != "file" else None
    url = stores.url(kind, addr=proxy.addr) if proxy else stores.url(kind)
    proc = _worker(url, f"{kind}-big", workdir, "--candidates", str(n), "--retry",
                   "--keys", f"bench/big-{uuid.uuid4().hex[:6]}")
    try:
        _wait_lines(proc, "boot", 1, STARTUP)
        boot = proc.events("boot")[0]
        all_elected: float | None = None
        try:
            changes.wait_for(f"{n} leaders in {proc.name}", lambda: _leading(proc) >= n, startup)
            all_elected = proc.events("elected")[-1].data["t"] - boot.data["t"]
        except TimeoutError:
            log.warning("big %s: only %d of %d candidates lead after %gs", kind, _leading(proc), n, startup)
        gevent.sleep(SETTLE)
        stats0 = _stats(proc)
        req0 = stats0["flock"] if proxy is None else proxy.snapshot()["requests"]
        lines0 = {e: len(proc.events(e)) for e in ("deposed", "error")}
        held0 = _leading(proc)
        gevent.sleep(window)
        stats1 = _stats(proc)
        req1 = stats1["flock"] if proxy is None else proxy.snapshot()["requests"]
        rss = rss_mb(proc.pid)
        cpu0, cpu1 = stats0["cpu_s"], stats1["cpu_s"]
        elapsed = stats1["t"] - stats0["t"]
        errors = proc.events("error")
        result = {"n": n, "ttl": TTL, "startup_s": all_elected, "window_s": elapsed,
                  "held_start": held0, "held_end": _leading(proc),
                  "stepdowns": len(proc.events("deposed")) - lines0["deposed"],
                  "errors": len(errors) - lines0["error"], "errors_before": lines0["error"],
                  "error_sample": errors[-1].data.get("error") if errors else None,
                  "cpu_percent": (cpu1 - cpu0) / elapsed * 100, "cpu_s_per_hour": (cpu1 - cpu0) / elapsed * 3600,
                  "requests_per_min": (req1 - req0) / elapsed * 60, "rss_mb": rss, "rss_base_mb": boot.data["rss_mb"],
                  "kb_per_candidate": (rss - boot.data["rss_mb"]) * 1024 / n,
                  "connections": proxy.snapshot()["connections"] if proxy else None}
        log.info("big %s: %s", kind, result)
        return result
    finally:
        stop_all([proc], grace=60)
        if proxy is not None:
            proxy.close()


def run(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    n = config.cost_participants
    setups: list[_Setup] = []
    results: dict[str, Any] = {}
    try:
        for kind in config.kinds:
            setups.append(_Setup(kind, stores, n, workdir))
        gevent.sleep(SETTLE)
        before = {s.kind: s.sample() for s in setups}
        gevent.sleep(config.cost_window)
        after = {s.kind: s.sample() for s in setups}
        for setup in setups:
            results[setup.kind] = {"ttl": TTL, "window_s": config.cost_window,
                                   "roles": _per_participant(before[setup.kind], after[setup.kind], n)}
    finally:
        for setup in setups:
            setup.close()
    return results


def run_idle(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    """The idle section: ``config.big_candidates`` idle candidates in one process, per store."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {kind: _big(kind, stores, config.big_candidates, config.big_window, config.big_startup, workdir)
            for kind in config.kinds}
