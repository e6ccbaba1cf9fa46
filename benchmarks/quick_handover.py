"""Graceful handover and crash failover between candidate processes, repeated per store.

    python benchmarks/quick_handover.py [--kinds file,consul,etcd,zookeeper] [--trials 5] [--modes handover,failover]

Each store gets its own fresh single-node server (tests/servers.py). Three candidate processes
(tests/candidate_process.py) campaign on one key; each trial SIGTERMs (handover) or SIGKILLs
(failover) the leader's process, times it until another process prints ``elected``, and starts
a replacement so that two candidates always wait. Times are from the signal to the successor's
``elected`` line (taken when its ``acquire`` returned), on the system-wide monotonic clock.
At the end the tenures are checked: never two leaders at once, terms strictly increasing.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import servers  # noqa: E402
from tests.backends import BackendEnv, support  # noqa: E402
from tests.candidate_process import ProcessGroup, crash_bound, process_url  # noqa: E402

log = logging.getLogger("quick_handover")

STARTUP = 30.0


def trials(group: ProcessGroup, count: int, crash: bool, timeout: float) -> list[float]:
    """``count`` successions on ``group``'s key, each started by SIGTERM or SIGKILL."""
    names = (f"{'k' if crash else 'h'}{i}" for i in itertools.count(1))
    procs = [group.start(next(names)) for _ in range(3)]
    first = group.wait_elected(STARTUP)
    leader = group.procs[first.proc]
    times: list[float] = []
    for _ in range(count):
        group.wait_for("every candidate to campaign",
                       lambda: all(p.events("campaigning") for p in procs if p.running()), STARTUP)
        sent = leader.kill() if crash else leader.terminate()
        successor = group.wait_elected(timeout, after=sent, exclude=(leader.name,))
        times.append(successor.t - sent)
        leader.wait_exit(15)
        leader = group.procs[successor.proc]
        procs.append(group.start(next(names)))
    group.check_history()
    errors = group.lines("error")
    if errors:
        raise AssertionError(f"processes reported errors: {errors}\n{group.report()}")
    return times


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"median {statistics.median(ms):7.1f} ms  max {max(ms):7.1f} ms  ({', '.join(f'{v:.1f}' for v in ms)})"


def bench(kind: str, count: int, workdir: Path, modes: list[str]) -> dict[str, list[float]]:
    cluster = servers.start(kind, workdir / "server") if kind != "file" else None
    try:
        env = BackendEnv(kind=kind, workdir=workdir, cluster=cluster)
        ttl = support(kind).FAST_TTL
        url = process_url(env)
        results = {}
        for name, crash, timeout in (("handover", False, 10.0), ("failover", True, crash_bound(env, ttl) + 10)):
            if name not in modes:
                continue
            key = f"greenleader-bench/{uuid.uuid4().hex[:8]}"
            with ProcessGroup(url, key, ttl, workdir / f"{name}-procs") as group:
                results[name] = trials(group, count, crash, timeout)
            print(f"{kind:>10} {name:<9} ttl={ttl:g}s  {summary(results[name])}", flush=True)
        return results
    finally:
        if cluster is not None:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="file,consul,etcd,zookeeper")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--modes", default="handover,failover", help="handover (SIGTERM), failover (SIGKILL)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="greenleader-bench-") as tmp:
        for kind in args.kinds.split(","):
            bench(kind, args.trials, Path(tmp) / kind, args.modes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
