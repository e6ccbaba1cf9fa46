"""Consul store, in one process: followers' notification latency and 1,000 idle candidates.

    python -m benchmarks.consul_shared [--followers 100] [--changes 10] [--candidates 1000]

On a single-node Consul agent started for the run (tests/servers.py):

- *followers*: 100 followers on one store object watch a key; two candidates on stores of their
  own hand it over by resigning, ``--changes`` times. Each follower's notification is timed
  from the moment the new leader's ``elected`` queue said True (one clock: one process).
- *idle*: ``--candidates`` candidates on as many keys, all on one store object: the time until
  all lead, the errors they reported, then the process's CPU (user + system) over a window of
  ``--window`` seconds in which they only renew.

Prints one JSON document. Handover against ``consul lock`` is ``python -m benchmarks handover
--kinds consul``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from benchmarks.common import summary  # noqa: E402
from greenleader import Candidate, Follower  # noqa: E402
from greenleader.events import ElectionError  # noqa: E402
from greenleader.stores import from_url  # noqa: E402
from tests import servers  # noqa: E402


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def followers(url: str, count: int, changes: int) -> dict:
    key = f"bench/followers-{uuid.uuid4().hex[:8]}"
    store = from_url(url)
    seen: dict[str, list[float]] = {}
    watchers = [Follower(store, key) for _ in range(count)]

    def consume(follower: Follower) -> None:
        leaders, _ = follower.follow_election()
        for leader in leaders:
            if leader:
                seen.setdefault(leader, []).append(time.monotonic())

    greenlets = [gevent.spawn(consume, f) for f in watchers]
    samples: list[float] = []
    stores = [from_url(url), from_url(url)]
    names = ["alice", "bob"]
    try:
        for change in range(changes + 1):
            node = f"{names[change % 2]}{change}"
            candidate = Candidate(stores[change % 2], key, node, ttl=10, resign_holdoff=0)
            stepped_up: list[float] = []
            original = candidate._step_up

            def step_up(lease: object, original=original, stepped_up=stepped_up) -> None:
                stepped_up.append(time.monotonic())  # the instant it leads, not when its queue is read
                original(lease)

            candidate._step_up = step_up  # type: ignore[method-assign]
            elected, _ = candidate.run_for_election()
            while not elected.get(timeout=60):
                pass
            at = stepped_up[0]
            deadline = at + 30
            while len(seen.get(node, ())) < count and time.monotonic() < deadline:
                gevent.sleep(0.01)
            if change:  # the first leader is found by the followers' first read, not a change
                samples += [t - at for t in seen.get(node, ())]
            if change < changes:
                candidate.stop()
        candidate.stop()
    finally:
        for follower in watchers:
            follower.stop()
        gevent.killall(greenlets, timeout=5)
        for s in [*stores, store]:
            s.close()
    return {"followers": count, "changes": changes, "elected_to_notified": summary(samples),
            "missing": changes * count - len(samples)}


def idle(url: str, count: int, window: float) -> dict:
    store = from_url(url)
    prefix = f"bench/idle-{uuid.uuid4().hex[:8]}"
    errors: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, ElectionError):
            errors.append(repr(event.error)[:200])

    import zope.event
    zope.event.subscribers.append(on_event)
    started = time.monotonic()
    candidates = [Candidate(store, f"{prefix}/{i}", f"n{i}", ttl=15) for i in range(count)]
    for candidate in candidates:
        candidate.run_for_election()
    deadline = started + 120
    while time.monotonic() < deadline and sum(c.is_leader() for c in candidates) < count:
        gevent.sleep(0.1)
    leading = sum(c.is_leader() for c in candidates)
    all_lead = time.monotonic() - started
    gevent.sleep(2)
    cpu0, t0 = _cpu(), time.monotonic()
    gevent.sleep(window)
    cpu = (_cpu() - cpu0) / (time.monotonic() - t0)
    still = sum(c.is_leader() for c in candidates)
    gevent.joinall([gevent.spawn(c.stop) for c in candidates], timeout=60)
    store.close()
    zope.event.subscribers.remove(on_event)
    return {"candidates": count, "leading": leading, "seconds_to_all_lead": round(all_lead, 2),
            "still_leading_after_window": still, "errors": len(errors), "first_errors": errors[:3],
            "cpu_share_of_a_core": round(cpu, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--only", choices=["followers", "idle"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = servers.start("consul", Path(tmp), 1)
        try:
            url = f"consul://{cluster.addrs[0]}"
            result = {}
            if args.only in (None, "followers"):
                result["followers"] = followers(url, args.followers, args.changes)
            if args.only in (None, "idle"):
                result["idle"] = idle(url, args.candidates, args.window)
            print(json.dumps(result, indent=1))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
