"""Where a Consul handover between processes spends its time, step by step.

    python -m benchmarks.consul_handover_trace [--handovers 10] [--waiters 2]

As the handover benchmark does, with one holder and ``--waiters`` waiting processes on one key:
each contender is a process of its own (this module with ``--child``) running a Candidate on a
Consul store whose client requests are timestamped. The driver tells the holder to stop (as
when its work ends) and the holder exits; the figure of each step is the time from that stop
to: the holder's release sent and answered, its session destroyed, each waiter's blocking
query answered and lock transaction sent and answered, the new leader stepping up and its
``elected`` queue read, and a Follower in a process of its own hearing of no leader, then of
the winner. Timestamps are ``time.monotonic()``, one clock for all processes.
Each process's CPU time is read at each step too, so the CPU a handover costs each contender
(from its first step in the handover) is measured apart from the machine's load.
Prints one JSON document: the median and max of each step (ms).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.os  # noqa: E402

from benchmarks.common import brief  # noqa: E402


def follower(url: str, key: str) -> None:
    """A follower of the key in a process of its own: marks "saw NODE" at each change."""
    from greenleader import Follower
    from greenleader.stores import from_url

    leaders, _ = Follower(from_url(url), key).follow_election()
    for leader in leaders:
        print(json.dumps(["follower", f"saw {leader}", time.monotonic(), time.process_time()]), flush=True)


def child(url: str, key: str, name: str) -> None:
    """One contender: print ``mark`` lines; on a line from the driver, stop and exit."""
    from greenleader import Candidate
    from greenleader.stores import from_url
    from greenleader.stores.consul.client import ConsulClient
    from greenleader.stores.consul.recipe import Election

    def mark(what: str) -> None:
        print(json.dumps([name, what, time.monotonic(), time.process_time()]), flush=True)

    def traced(label: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: ConsulClient, *args: Any, **kwargs: Any) -> Any:
            mark(f"{label} sent")
            try:
                return method(self, *args, **kwargs)
            finally:
                mark(f"{label} answered")
        return call

    for label in ("release", "lock", "get", "destroy_session", "renew_session", "read_many"):
        setattr(ConsulClient, label, traced(label, getattr(ConsulClient, label)))
    election_acquire = Election.acquire

    def acquire(self: Election, *args: Any, **kwargs: Any) -> Any:
        lease = election_acquire(self, *args, **kwargs)
        mark("acquire returned")
        return lease

    Election.acquire = acquire  # type: ignore[method-assign]
    candidate = Candidate(from_url(url), key, name, ttl=15)
    original = candidate._step_up

    def step_up(lease: object) -> None:
        mark("stepped up")
        original(lease)

    candidate._step_up = step_up  # type: ignore[method-assign]
    elected, _ = candidate.run_for_election()
    stop = gevent.spawn(lambda: (gevent.os.tp_read(0, 100), mark("stop"), candidate.stop(), mark("stopped")))
    for is_leader in elected:
        if is_leader:
            mark("elected read")
    stop.join()
    mark("exit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handovers", type=int, default=10)
    parser.add_argument("--waiters", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("URL", "KEY", "NAME"))
    args = parser.parse_args()
    if args.child:
        if args.child[2] == "follower":
            follower(*args.child[:2])
        else:
            child(*args.child)
        return
    from tests import servers

    with tempfile.TemporaryDirectory() as tmp:
        cluster = servers.start("consul", Path(tmp), 1)
        procs: dict[str, subprocess.Popen[str]] = {}
        marks: list[tuple[str, str, float, float]] = []

        def start(name: str) -> None:
            proc = procs[name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.consul_handover_trace", "--child", url, key, name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    marks.append(tuple(json.loads(line)))  # type: ignore[arg-type]
            gevent.spawn(read)

        try:
            url = f"consul://{cluster.addrs[0]}"
            key = f"bench/trace-{uuid.uuid4().hex[:8]}"
            for i in range(args.waiters + 1):
                start(f"c{i}")
                gevent.sleep(0.5)
            start("follower")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sum(what == "get answered" for _, what, *_ in marks) < args.waiters:
                gevent.sleep(0.05)  # the first leader elected, every waiter at its blocking query
            steps: dict[str, list[float]] = {}
            cpu_steps: dict[str, list[float]] = {}
            winner_order = {"lock before next query": 0, "handovers": 0}  # the winner's lock, its next query
            count = args.waiters + 1
            for _ in range(args.handovers):
                gevent.sleep(1.5)  # every waiter's blocking query in place
                leaders = [n for n, what, *_ in marks if what == "stepped up"]
                holder = leaders[-1]
                first = len(marks)
                procs[holder].stdin.write("stop\n")  # type: ignore[union-attr]
                procs[holder].stdin.flush()  # type: ignore[union-attr]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(
                        what == "elected read" and n != holder for n, what, *_ in marks[first:]):
                    gevent.sleep(0.005)
                gevent.sleep(0.2)
                window = marks[first:]
                stop_at = next(t for n, what, t, _ in window if what == "stop" and n == holder)
                winner = next(n for n, what, *_ in window if what == "elected read" and n != holder)
                seen: set[str] = set()
                cpu_from: dict[str, float] = {}  # each process's CPU time at its first mark of the handover
                for n, what, _, cpu in window:
                    role = "holder" if n == holder else "winner" if n == winner else "loser" if n != "follower" else n
                    cpu_from.setdefault(role, cpu)
                    if what in ("exit", "elected read", "lock answered", "lock sent", "acquire returned", "stepped up"):
                        cpu_label = f"{role} CPU to {what}"
                        if cpu_label not in seen:
                            seen.add(cpu_label)
                            cpu_steps.setdefault(cpu_label, []).append((cpu - cpu_from[role]) * 1000)
                for n, what, t, _ in window:
                    role = "holder" if n == holder else "winner" if n == winner else "loser"
                    if n == "follower":
                        role, what = n, {f"saw {winner}": "saw the winner", "saw None": "saw no leader"}.get(what, what)
                    label = f"{role}: {what}"
                    if label not in seen:
                        seen.add(label)
                        steps.setdefault(label, []).append((t - stop_at) * 1000)
                winner_steps = [what for n, what, *_ in window if n == winner]
                if "lock sent" in winner_steps and "get sent" in winner_steps:
                    first_lock = winner_steps.index("lock sent") < winner_steps.index("get sent")
                    winner_order["lock before next query"] += first_lock
                    winner_order["handovers"] += 1
                procs.pop(holder).wait(timeout=30)
                newcomer = f"c{count}"
                start(newcomer)
                count += 1
                deadline = time.monotonic() + 60  # the newcomer waits at its blocking query
                while time.monotonic() < deadline and not any(
                        n == newcomer and what == "get sent" for n, what, *_ in marks):
                    gevent.sleep(0.05)
            order = sorted(steps, key=lambda label: statistics.median(steps[label]))
            print(json.dumps({"load": os.getloadavg()[0], "handovers": args.handovers, "waiters": args.waiters,
                              "winner's order": winner_order,
                              "ms_from_stop": {label: brief(steps[label]) for label in order},
                              "cpu_ms_from_first_mark": {label: brief(values)
                                                         for label, values in sorted(cpu_steps.items())}},
                             indent=1))
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
            cluster.stop()


if __name__ == "__main__":
    main()
