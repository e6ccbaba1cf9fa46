"""The file store at rest and at a change: idle cost, graceful handover, crash failover.

    python -m benchmarks.file_idle [--participants 10] [--window 60] [--trials 20] [--json out.json]

Three figures, each between real processes on one lock directory (a fresh temporary one):

- **Idle cost.** One process holds the key. Another runs ``--participants`` waiters (each
  ``FileStore.acquire`` on its own store object, as separate processes would), a third as
  many followers (``FileStore.watch``). After a settling second, each process's CPU time
  (``resource.getrusage``) and its ``flock`` calls are counted over ``--window`` seconds:
  reported as CPU seconds per hour and lock attempts per minute, per participant.
- **Graceful handover.** A holder process releases (``Lease.release``); a waiter process,
  waiting for a while already, wins. The time is from just before the release to just after
  ``acquire`` returns, both read on the system-wide ``CLOCK_MONOTONIC``.
- **Crash failover.** The same, but the holder is killed with SIGKILL: from just before
  ``kill`` to the waiter's win.

Median, p95 and max over ``--trials`` trials each. The store is the one on ``PYTHONPATH``,
so the same script measures a before and an after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = "bench/file-idle"
SETTLE = 1.0  # lets every waiter and follower reach its resting state before the count starts
_ROOT = Path(__file__).resolve().parent.parent  # where ``-m benchmarks.file_idle`` resolves
WAITER_START = 0.3  # a waiter has begun waiting well within this after it says so


def _store(directory: str) -> Any:
    from greenleader.stores.file import FileStore

    return FileStore(directory=directory)


def _count_flocks() -> list[int]:
    """Counts every ``fcntl.flock`` call of this process from now on."""
    import fcntl

    calls = [0]
    original = fcntl.flock

    def counting(fd: int, operation: int) -> None:
        calls[0] += 1
        original(fd, operation)

    fcntl.flock = counting  # type: ignore[assignment]
    return calls


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the roles, each run in its own process ----------------------------------------------------

def _role_holder(directory: str) -> None:
    """Hold the key; on a line "release" on stdin, print the time and release."""
    lease = _store(directory).acquire(KEY, "holder", 15.0)
    print("held", flush=True)
    if sys.stdin.readline().strip() == "release":
        print(time.monotonic(), flush=True)
        lease.release()
        print("released", flush=True)


def _role_waiter(directory: str) -> None:
    """Wait for the key; print the time of the win."""
    store = _store(directory)
    print("waiting", flush=True)
    lease = store.acquire(KEY, "waiter", 15.0)
    print(time.monotonic(), flush=True)
    lease.release()


def _role_idle(directory: str, kind: str, participants: int, window: float) -> None:
    """Run idle waiters or followers; print the CPU and flock calls over the window."""
    import gevent

    calls = _count_flocks()
    stores = [_store(directory) for _ in range(participants)]
    if kind == "waiters":
        greenlets = [gevent.spawn(store.acquire, KEY, f"w{i}", 15.0) for i, store in enumerate(stores)]
    else:
        greenlets = [gevent.spawn(lambda s=store: [None for _ in s.watch(KEY)]) for store in stores]
    gevent.sleep(SETTLE)
    if any(g.dead for g in greenlets):
        raise SystemExit(f"an idle {kind[:-1]} ended: {[g.exception for g in greenlets if g.dead]}")
    cpu0, calls0, t0 = _cpu(), calls[0], time.monotonic()
    gevent.sleep(window)
    cpu, flocks, elapsed = _cpu() - cpu0, calls[0] - calls0, time.monotonic() - t0
    print(json.dumps({"cpu_s": cpu, "flocks": flocks, "elapsed_s": elapsed}), flush=True)
    # Stay until told: the exit closes this process's lock files, a change that would wake
    # the other idle process, still counting.
    sys.stdin.read()


# -- the orchestration -------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.file_idle", "--role", *args], cwd=_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _expect(process: subprocess.Popen[str], word: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != word:
        raise RuntimeError(f"expected {word!r} from a benchmark process, got {line!r}")


def idle(directory: str, participants: int, window: float) -> dict[str, Any]:
    holder = _spawn("holder", directory)
    try:
        _expect(holder, "held")
        processes = {kind: _spawn("idle", directory, kind, str(participants), str(window))
                     for kind in ("waiters", "followers")}
        lines = {kind: process.stdout.readline() for kind, process in processes.items()}  # type: ignore[union-attr]
        for process in processes.values():
            process.communicate(timeout=60)
        results = {}
        for kind, line in lines.items():
            if not line:
                raise RuntimeError(f"the idle {kind} process ended without its figures")
            measured = json.loads(line)
            per_hour = 3600 / measured["elapsed_s"] / participants
            results[kind] = {
                "cpu_s_per_hour_each": round(measured["cpu_s"] * per_hour, 3),
                "flocks_per_min_each": round(measured["flocks"] * per_hour / 60, 1),
                "process_cpu_s": round(measured["cpu_s"], 3),
                "window_s": round(measured["elapsed_s"], 1),
            }
        return results
    finally:
        holder.kill()
        holder.wait()


def _trial(directory: str, crash: bool) -> float:
    holder = _spawn("holder", directory)
    waiter = None
    try:
        _expect(holder, "held")
        waiter = _spawn("waiter", directory)
        _expect(waiter, "waiting")
        time.sleep(WAITER_START)
        assert holder.stdin is not None and holder.stdout is not None and waiter.stdout is not None
        if crash:
            started = time.monotonic()
            holder.send_signal(signal.SIGKILL)
        else:
            holder.stdin.write("release\n")
            holder.stdin.flush()
            started = float(holder.stdout.readline())
        won = float(waiter.stdout.readline())
        return won - started
    finally:
        for process in (holder, waiter):
            if process is not None:
                process.kill()
                process.wait()


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2),
            "trials": len(ordered)}


def run(participants: int = 10, window: float = 60.0, trials: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="greenleader-file-idle-") as directory:
        return {
            "idle": idle(directory, participants, window),
            "graceful_handover": _summary([_trial(directory, crash=False) for _ in range(trials)]),
            "crash_failover": _summary([_trial(directory, crash=True) for _ in range(trials)]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, directory, *rest = args.role
        if role == "holder":
            _role_holder(directory)
        elif role == "waiter":
            _role_waiter(directory)
        else:
            _role_idle(directory, rest[0], int(rest[1]), float(rest[2]))
        return
    results = run(args.participants, args.window, args.trials)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
