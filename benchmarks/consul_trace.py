"""Where a Consul handover's time goes: one process, two store objects, timestamps per step.

    python -m benchmarks.consul_trace [--handovers 10]

On a single-node Consul agent started for the run (tests/servers.py), alice leads a key and
bob waits for it, each on a store object of its own; alice resigns, bob wins; then they swap.
Each handover is timed from the resign (t = 0) through: the release request sent and answered,
the waiter's blocking query answered, its lock transaction sent and answered, and the instant
the new leader steps up. Prints one JSON document: the median and max of each step (ms).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from greenleader import Candidate  # noqa: E402
from greenleader.stores import from_url  # noqa: E402
from greenleader.stores.consul.client import ConsulClient  # noqa: E402
from tests import servers  # noqa: E402

MARKS: list[tuple[str, float]] = []


def _traced(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def traced(self: ConsulClient, *args: Any, **kwargs: Any) -> Any:
        MARKS.append((f"{name} sent", time.perf_counter()))
        try:
            return method(self, *args, **kwargs)
        finally:
            MARKS.append((f"{name} answered", time.perf_counter()))
    return traced


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handovers", type=int, default=10)
    args = parser.parse_args()
    for name in ("release", "lock", "get", "renew_session"):
        setattr(ConsulClient, name, _traced(name, getattr(ConsulClient, name)))
    with tempfile.TemporaryDirectory() as tmp:
        cluster = servers.start("consul", Path(tmp), 1)
        try:
            url = f"consul://{cluster.addrs[0]}"
            key = f"bench/trace-{uuid.uuid4().hex[:8]}"
            stores = [from_url(url), from_url(url)]
            candidates: list[Candidate] = []
            stepped: list[float] = []
            for i, store in enumerate(stores):
                candidate = Candidate(store, key, ["alice", "bob"][i], ttl=15, resign_holdoff=0.5)
                original = candidate._step_up

                def step_up(lease: object, original: Callable[[object], None] = original) -> None:
                    stepped.append(time.perf_counter())
                    original(lease)

                candidate._step_up = step_up  # type: ignore[method-assign]
                candidates.append(candidate)
                candidate.run_for_election()
                time.sleep(0.5)
            steps: dict[str, list[float]] = {}
            for _ in range(args.handovers):
                leader = next(c for c in candidates if c.is_leader())
                time.sleep(1.0)  # the resigner campaigns again: its blocking query is in place
                MARKS.clear()
                count = len(stepped)
                started = time.perf_counter()
                leader.resign()
                while len(stepped) == count:
                    time.sleep(0.001)
                seen: set[str] = set()
                for name, at in MARKS:
                    if name not in seen and at >= started:
                        seen.add(name)
                        steps.setdefault(name, []).append((at - started) * 1000)
                steps.setdefault("stepped up", []).append((stepped[-1] - started) * 1000)
                time.sleep(0.3)
            for candidate in candidates:
                candidate.stop()
            for store in stores:
                store.close()
            order = sorted(steps, key=lambda name: statistics.median(steps[name]))
            print(json.dumps({"load": os.getloadavg()[0], "handovers": args.handovers,
                              "ms_from_resign": {name: {"median": round(statistics.median(steps[name]), 2),
                                                        "max": round(max(steps[name]), 2),
                                                        "count": len(steps[name])} for name in order}}, indent=1))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
