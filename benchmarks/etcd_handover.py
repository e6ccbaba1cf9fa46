"""Graceful handover between two etcd candidates in one process, traced request by request.

    python -m benchmarks.etcd_handover [--handovers 20] [--url etcd://...]

Two candidates on two store objects (two gRPC channels, as two processes would have) hand one
key back and forth: each round, the leader resigns and the waiter's ``elected`` says True.
Prints the median / p95 / max of resign -> elected, and the median time from the resign to
the end of each request of the handover (by kind, both candidates' requests), so that a change
to the release or the win path shows where its round trips went. Starts a single etcd member
(tests/servers.py) unless ``--url`` is given. The figure the issue compares with ``etcdctl lock``
is ``python -m benchmarks handover --kinds etcd`` (processes and children); this one is its core.
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
from collections import defaultdict
from typing import Any

import gevent

from greenleader import Candidate
from greenleader.stores import from_url

TTL = 15.0  # the handover benchmark's TTL: no renewal falls inside a handover


def _traced(store: Any, log: list[tuple[str, float]]) -> None:
    """Record (kind, time of answer) of every request the store's client sends."""
    client = store.client
    call = client.call

    def traced_call(what: str, request: Any, **kwargs: Any) -> Any:
        log.append((f"{what} sent", time.perf_counter()))
        try:
            return call(what, request, **kwargs)
        finally:
            log.append((what, time.perf_counter()))

    client.call = traced_call
    watch = client.watch

    def traced_watch(*args: Any, **kwargs: Any) -> Any:
        log.append(("watch sent", time.perf_counter()))
        try:
            return watch(*args, **kwargs)
        finally:
            log.append(("watch", time.perf_counter()))

    client.watch = traced_watch


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handovers", type=int, default=20)
    parser.add_argument("--url")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from tests import servers
        cluster = servers.start("etcd", tempfile.mkdtemp(prefix="etcd-handover-"))
        url = cluster.url
    log: list[tuple[str, float]] = []
    stores = [from_url(url), from_url(url)]
    for store in stores:
        _traced(store, log)
    key = f"bench/handover-{uuid.uuid4().hex[:6]}"
    candidates = [Candidate(store, key, name, ttl=TTL, resign_holdoff=0.05)
                  for store, name in zip(stores, ("alice", "bob"), strict=True)]
    channels = [candidates[0].run_for_election()[0]]
    while channels[0].get(timeout=30) is not True:
        pass
    channels.append(candidates[1].run_for_election()[0])
    leader = 0
    durations: list[float] = []
    steps: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.handovers):
        waiter = 1 - leader
        gevent.sleep(0.1)  # the waiter watches its predecessor
        del log[:]
        started = time.perf_counter()
        candidates[leader].resign()
        while channels[waiter].get(timeout=30) is not True:
            pass
        elected = time.perf_counter()
        durations.append((elected - started) * 1000)
        gevent.sleep(0.1)  # the winner's claim and the holder's revoke are answered by then
        for what, at in log:
            steps[what].append((at - started) * 1000)
        leader = waiter
    print(f"resign -> elected over {len(durations)} handovers, ms: median {statistics.median(durations):.1f}, "
          f"p95 {_percentile(durations, 0.95):.1f}, max {max(durations):.1f}")
    for what, times in sorted(steps.items(), key=lambda item: statistics.median(item[1])):
        print(f"  {what:<12} answered at {statistics.median(times):6.1f} ms (median; {len(times)} in "
              f"{len(durations)} handovers)")
    gevent.joinall([gevent.spawn(candidate.stop) for candidate in candidates], timeout=30)
    for store in stores:
        store.close()
    if cluster is not None:
        cluster.stop()


if __name__ == "__main__":
    main()
