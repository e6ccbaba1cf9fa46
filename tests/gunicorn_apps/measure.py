"""Measure handover and failover between real gunicorn masters, over several trials.

    python -m tests.gunicorn_apps.measure file consul etcd zookeeper --trials 5

Per store: two masters of three gevent workers on loopback (a server of its own for Consul,
etcd and ZooKeeper, started like the test fixtures do). ``SIGTERM`` trials terminate the
leader's master (and start a replacement); ``SIGKILL`` trials kill the leader's worker (its
master starts a replacement). Times run from the signal to the first line of the next leader's
duty; the duty log is checked for overlaps at the end.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from tests import servers  # noqa: E402
from tests.backends import BackendEnv, support  # noqa: E402
from tests.candidate_process import crash_bound, process_url  # noqa: E402
from tests.gunicorn_apps.harness import Fleet, worker_pid  # noqa: E402

STARTUP = 60.0


def _summary(values: list[float]) -> str:
    ms = [round(v * 1000) for v in values]
    return f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms ({ms})"


def measure(kind: str, trials: int, workdir: Path) -> tuple[list[float], list[float], float]:
    cluster = servers.start(kind, workdir / "server") if kind != "file" else None
    try:
        env = BackendEnv(kind=kind, workdir=workdir, cluster=cluster)
        ttl = 1.0 if kind == "file" else support(kind).FAST_TTL
        bound = crash_bound(env, ttl)
        url = process_url(env) if kind != "file" else f"file://{workdir / 'elections'}?poll_interval=0.01"
        handovers: list[float] = []
        failovers: list[float] = []
        with Fleet(workdir / "fleet", url, f"measure/{uuid.uuid4().hex[:8]}", ttl) as fleet:
            for _ in range(2):
                fleet.start()
            fleet.wait_for("every worker to campaign", lambda: all(m.campaigning() >= 3 for m in fleet.masters),
                           STARTUP)
            for _ in range(trials):
                leader = fleet.current(STARTUP)
                master = fleet.master_of(leader.node)
                sent = master.send(signal.SIGTERM)
                successor = fleet.wait_tenure(STARTUP, after=sent,
                                              where=lambda t, m=master: fleet.master_of(t.node) != m)
                handovers.append(successor.start - sent)
                master.wait_exit(30)
                new = fleet.start()
                fleet.wait_for("the new master's workers to campaign", lambda m=new: m.campaigning() >= 3, STARTUP)
            for _ in range(trials):
                leader = fleet.current(STARTUP)
                sent = time.monotonic()
                os.kill(worker_pid(leader.node), signal.SIGKILL)
                successor = fleet.wait_tenure(bound + 30, after=sent, exclude=leader.node)
                failovers.append(successor.start - sent)
            fleet.check_history()
        return handovers, failovers, bound
    finally:
        if cluster is not None:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kinds", nargs="+", choices=["file", "consul", "etcd", "zookeeper"])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    for kind in args.kinds:
        tmp = tempfile.mkdtemp(prefix=f"gl-measure-{kind}-")  # kept, with the logs, for a look afterwards
        handovers, failovers, bound = measure(kind, args.trials, Path(tmp))
        print(f"{kind}: logs in {tmp}")
        print(f"{kind}: master SIGTERM handover: {_summary(handovers)}", flush=True)
        print(f"{kind}: worker SIGKILL failover (bound {bound:g} s): {_summary(failovers)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
