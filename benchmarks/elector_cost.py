"""The elector's own CPU, on the stores that cost nothing: idle leaders, and a follower fan-out.

    python -m benchmarks.elector_cost idle [--store memory|file] [--candidates 1000] [--window 20]
    python -m benchmarks.elector_cost fanout [--store memory|file] [--followers 100] [--changes 30]

``idle``: ``--candidates`` leaders (one key each) on one store object in this process, with the
cost benchmark's TTL (15 s) and retries; once all lead, this process's CPU over ``--window``
seconds, as a percentage of a core. On the memory store a renewal moves a number, so what is
measured is the Candidate's keepalive itself (the idle section of ``python -m benchmarks`` has
no memory store: its worker runs in a process of its own).

``fanout``: ``--followers`` followers of one key on one store object; the key changes hands
``--changes`` times between holders in this process (the store's own ``acquire``), and for each
change this process's CPU and the time until the last follower's queue delivered the new leader.
On the memory store the store's delivery is a few microseconds: what is measured is the
follower layer's fan-out (one shared watch, each value handed to every follower, each
follower's queue and events).

Run it with ``PYTHONPATH`` pointing at another checkout to measure that checkout (before/after).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import resource
import statistics
import tempfile
import time

import gevent
from gevent.event import Event

from greenleader import Candidate, Follower
from greenleader.stores import Store, from_url

TTL = 15.0  # benchmarks/cost.py's TTL for the big case
STARTUP = 60.0  # seconds for all to lead before the run is called failed


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _store(kind: str) -> Store:
    return from_url("memory://" if kind == "memory" else f"file://{tempfile.mkdtemp(prefix='elector-cost-')}")


def idle(kind: str, count: int, window: float) -> None:
    store = _store(kind)
    candidates = [Candidate(store, f"bench/idle-{i}", f"node-{i}", ttl=TTL, retry=True) for i in range(count)]
    for candidate in candidates:
        candidate.run_for_election()
    started = time.monotonic()
    while sum(c.is_leader() for c in candidates) < count:
        if time.monotonic() - started > STARTUP:
            raise SystemExit(f"only {sum(c.is_leader() for c in candidates)} of {count} lead after {STARTUP:g}s")
        gevent.sleep(0.1)
    print(f"{count} lead after {time.monotonic() - started:.1f}s")
    gevent.sleep(3.0)  # past the first renewals
    cpu0, t0 = _cpu(), time.monotonic()
    gevent.sleep(window)
    cpu1, t1 = _cpu(), time.monotonic()
    leading = sum(c.is_leader() for c in candidates)
    print(f"{kind}: {count} idle leaders: {100 * (cpu1 - cpu0) / (t1 - t0):.2f} % of a core over "
          f"{t1 - t0:.1f}s; {leading} leading at the end")
    for candidate in candidates:
        candidate.stop()
    store.close()


def fanout(kind: str, count: int, changes: int) -> None:
    store = _store(kind)
    key = "bench/fanout"
    wanted: list[str | None] = [None]
    heard = [0]
    everyone_heard = Event()
    arrived: list[float] = []

    def consume(follower: Follower) -> None:
        leaders, _errors = follower.follow_election()
        for leader in leaders:
            if leader == wanted[0]:
                arrived.append(time.monotonic())
                heard[0] += 1
                if heard[0] == count:
                    everyone_heard.set()

    followers = [Follower(store, key) for _ in range(count)]
    consumers = [gevent.spawn(consume, follower) for follower in followers]
    gevent.sleep(0.5)
    cpu: list[float] = []
    last: list[float] = []
    lease = None
    for change in range(changes):
        if lease is not None:
            lease.release()
        gevent.sleep(0.05)  # the vacancy's fan-out is over
        wanted[0], heard[0] = f"node-{change}", 0
        everyone_heard.clear()
        arrived.clear()
        cpu0, t0 = _cpu(), time.monotonic()
        lease = store.acquire(key, f"node-{change}", TTL)
        if not everyone_heard.wait(30):
            raise SystemExit(f"{heard[0]} of {count} followers heard of node-{change} in 30 s")
        cpu.append(_cpu() - cpu0)
        last.append(max(arrived) - t0)
    if lease is not None:
        lease.release()
    ordered = [1000 * t for t in sorted(last)]
    print(f"{kind}: {count} followers, {changes} changes: CPU per change median "
          f"{1000 * statistics.median(cpu):.2f} ms; last follower notified median {statistics.median(ordered):.2f} / "
          f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} / max {ordered[-1]:.2f} ms")
    for follower in followers:
        follower.stop()
    gevent.killall(consumers, timeout=5)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["idle", "fanout"])
    parser.add_argument("--store", choices=["memory", "file"], default="memory")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    if args.what == "idle":
        idle(args.store, args.candidates, args.window)
    else:
        fanout(args.store, args.followers, args.changes)


if __name__ == "__main__":
    main()
