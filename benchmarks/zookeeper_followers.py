"""100 followers of one key in one process: elected -> notified, on ZooKeeper (a small form).

    python -m benchmarks.zookeeper_followers [--followers 100] [--rounds 10] [--url URL]

Two candidates take turns on the key, each on its own store object (its own session), in
this process; the followers share a third store object. Each round the leader resigns; the
latency of each follower is counted from the moment the successor's ``acquire`` returned
(its Candidate reports it elected) to the follower's queue delivering the successor's name.
The full benchmark (separate candidate processes) is ``python -m benchmarks followers``.
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import statistics
import tempfile
import time
import uuid

import gevent

from greenleader import Candidate, Follower
from greenleader.stores import from_url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--url")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from tests import servers
        cluster = servers.start("zookeeper", tempfile.mkdtemp(prefix="zk-followers-"))
        url = cluster.url
    key = f"bench/followers-{uuid.uuid4().hex[:6]}"
    shared = from_url(url)
    seen: list[list[tuple[str | None, float]]] = [[] for _ in range(args.followers)]
    followers = [Follower(shared, key) for _ in range(args.followers)]

    def consume(follower: Follower, log: list[tuple[str | None, float]]) -> None:
        leaders, _ = follower.follow_election()
        for leader in leaders:
            log.append((leader, time.monotonic()))

    consumers = [gevent.spawn(consume, f, log) for f, log in zip(followers, seen, strict=True)]
    latencies: list[float] = []
    elected_at: dict[str, float] = {}
    previous: Candidate | None = None
    for round_ in range(args.rounds + 1):
        name = f"c{round_}"
        candidate = Candidate(from_url(url), key, name, ttl=5.0)
        elected, _ = candidate.run_for_election()
        if previous is not None:
            previous.resign()
        while not elected.get(timeout=30):
            pass
        elected_at[name] = time.monotonic()
        deadline = time.monotonic() + 30
        while not all(any(leader == name for leader, _ in log) for log in seen):
            if time.monotonic() > deadline:
                raise SystemExit(f"round {round_}: not every follower named {name} within 30 s")
            gevent.sleep(0.01)
        if round_:  # the first round only sets the scene
            latencies += [next(t for leader, t in log if leader == name) - elected_at[name] for log in seen]
        if previous is not None:
            previous.stop()
            previous.store.close()
        previous = candidate
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[int(len(ms) * 0.95) - 1]
    print(f"{args.followers} followers, {args.rounds} changes: elected -> notified ms "
          f"median {statistics.median(ms):.1f} / p95 {p95:.1f} / max {ms[-1]:.1f}", flush=True)
    if previous is not None:
        previous.stop()
    for follower in followers:
        follower.stop()
    gevent.killall(consumers)
    shared.close()
    if cluster is not None:
        cluster.stop()


if __name__ == "__main__":
    main()
