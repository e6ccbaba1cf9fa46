"""1,000 idle etcd candidates in one process (one key each): the process's CPU at rest.

    python -m benchmarks.etcd_idle [--candidates 1000] [--window 30] [--ttl 15] [--renew-interval S]
                                   [--url etcd://...]
                                   [--profile out.pstats] [--sample]

Starts a single etcd member (tests/servers.py) unless ``--url`` is given, runs the candidates
on one store object with the cost benchmark's TTL (15 s, or ``--ttl``) and retries, waits until all lead (or
``STARTUP`` seconds pass), then measures this process's CPU over ``--window`` seconds
(optionally under cProfile, which slows it down: compare profiles with profiles only; or with
``--sample``, a light stack sampler), and prints the keepalives' round trips (median / p99 /
max) and how many were in flight at most. Run it
with ``PYTHONPATH`` pointing at another checkout to measure that checkout's store (before/after).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import cProfile
import tempfile
import time
import uuid

import gevent

from greenleader import Candidate
from greenleader.stores import from_url

TTL = 15.0  # benchmarks/cost.py's TTL for the big case
STARTUP = 180.0  # seconds for all to lead before the run is called failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--ttl", type=float, default=TTL, help="the candidates' TTL: renewals come every 2/9 of it")
    parser.add_argument("--renew-interval", type=float, help="the candidates' renew_interval (default theirs)")
    parser.add_argument("--url")
    parser.add_argument("--profile")
    parser.add_argument("--sample", action="store_true", help="sample the stack every 2 ms (benchmarks.zookeeper_idle)")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from tests import servers
        cluster = servers.start("etcd", tempfile.mkdtemp(prefix="etcd-idle-"))
        url = cluster.url
    store = from_url(url)
    latencies: list[float] = []
    in_flight = [0, 0]  # now, most
    keepalive = store.client.keepalive

    def timed_keepalive(lease_id: int) -> int:
        started = time.monotonic()
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            return keepalive(lease_id)
        finally:
            in_flight[0] -= 1
            latencies.append(time.monotonic() - started)

    store.client.keepalive = timed_keepalive
    prefix = f"bench/idle-{uuid.uuid4().hex[:6]}"
    candidates = [Candidate(store, f"{prefix}/{i}", f"c{i}", ttl=args.ttl, retry=True,
                            renew_interval=args.renew_interval) for i in range(args.candidates)]
    started = time.monotonic()
    for candidate in candidates:
        candidate.run_for_election()
    while sum(c.is_leader() for c in candidates) < len(candidates):
        gevent.sleep(0.2)
        if time.monotonic() - started > STARTUP:
            break  # measured all the same: how many lead is part of the figure
    leading = sum(c.is_leader() for c in candidates)
    print(f"{leading} of {len(candidates)} lead after {time.monotonic() - started:.1f} s", flush=True)
    gevent.sleep(3.0)
    profiler = cProfile.Profile() if args.profile else None
    sampler = None
    if args.sample:
        from benchmarks.zookeeper_idle import _Sampler
        sampler = _Sampler()
    del latencies[:]
    in_flight[1] = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    if profiler:
        profiler.enable()
    gevent.sleep(args.window)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, elapsed = time.process_time() - cpu0, time.monotonic() - t0
    leading = sum(c.is_leader() for c in candidates)
    print(f"cpu {cpu / elapsed * 100:.1f} % of a core over {elapsed:.0f} s; {leading} lead", flush=True)
    if latencies:
        ordered = sorted(latencies)
        print(f"{len(ordered)} keepalives, round trip ms: median {ordered[len(ordered) // 2] * 1000:.1f}, "
              f"p99 {ordered[int(len(ordered) * 0.99)] * 1000:.1f}, max {ordered[-1] * 1000:.1f}; "
              f"at most {in_flight[1]} in flight", flush=True)
    if sampler:
        sampler.report()
    gevent.joinall([gevent.spawn(c.stop) for c in candidates], timeout=60)
    store.close()
    if cluster is not None:
        cluster.stop()


if __name__ == "__main__":
    main()
