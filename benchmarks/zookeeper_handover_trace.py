"""Where a ZooKeeper handover between processes spends its time, request by request: the
library's against kazoo's ``Election`` recipe.

    python -m benchmarks.zookeeper_handover_trace [--handovers 10] [--waiters 2] [--kazoo]

As the handover benchmark does, with one holder and ``--waiters`` waiting processes on one key:
each contender is a process of its own (this module with ``--child``), whose kazoo connection
marks every request it writes, every answer and every watch event it reads. Without
``--kazoo`` the contenders are :class:`greenleader.Candidate`s on a ZooKeeperStore under gevent;
with it, kazoo's ``Election`` recipe under kazoo's default (threading) handler, as
benchmarks/kazoo_peer.py runs it. The driver tells the holder to stop (as when its work ends);
the figure of each step is the time from that stop to the step, in the holder's and the
winner's process. Timestamps are ``time.monotonic()``, one clock for all processes.
Prints one JSON document: the median and max of each step (ms).
"""

from __future__ import annotations

import sys

if "--kazoo" not in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any


def _mark(name: str) -> Any:
    lock = threading.Lock()

    def mark(what: str) -> None:
        with lock:
            sys.stdout.write(json.dumps([name, what, time.monotonic(), time.process_time()]) + "\n")
            sys.stdout.flush()
    return mark


def _trace_kazoo(mark: Any) -> None:
    """Mark each request kazoo writes, each answer and watch event it reads."""
    from kazoo.protocol import connection
    from kazoo.protocol.serialization import Ping

    handler = connection.ConnectionHandler
    submit, response, watch = handler._submit, handler._read_response, handler._read_watch_event

    def _submit(self: Any, request: Any, timeout: float, xid: int | None = None) -> Any:
        if not isinstance(request, Ping):
            mark(f"sent {type(request).__name__}")
        return submit(self, request, timeout, xid)

    def _read_response(self: Any, header: Any, buffer: Any, offset: int) -> Any:
        request = self.client._pending[0][0] if self.client._pending else None
        result = response(self, header, buffer, offset)
        mark(f"answer {type(request).__name__}")
        return result

    def _read_watch_event(self: Any, buffer: Any, offset: int) -> Any:
        mark("watch event read")
        return watch(self, buffer, offset)

    handler._submit, handler._read_response, handler._read_watch_event = _submit, _read_response, _read_watch_event


def child_library(hosts: str, key: str, name: str) -> None:
    import gevent
    import gevent.os

    from greenleader import Candidate
    from greenleader.stores import from_url
    from greenleader.stores.zookeeper import recipe

    mark = _mark(name)
    _trace_kazoo(mark)
    acquire = recipe.ZooKeeperStore.acquire

    def traced_acquire(self: Any, *args: Any) -> Any:
        lease = acquire(self, *args)
        mark("acquire returned")
        return lease

    recipe.ZooKeeperStore.acquire = traced_acquire  # type: ignore[method-assign]
    waker = recipe._waker

    def traced_waker(event: Any) -> Any:
        wake = waker(event)
        return lambda watched: (mark("watch callback"), wake(watched))

    recipe._waker = traced_waker
    candidate = Candidate(from_url(f"zookeeper://{hosts}"), key, name, ttl=15)
    step_up, release = candidate._step_up, candidate._release
    candidate._step_up = lambda lease: (mark("stepped up"), step_up(lease))  # type: ignore[method-assign]
    candidate._release = lambda lease: (mark("release begins"), release(lease),  # type: ignore[method-assign]
                                        mark("released"))
    elected, _ = candidate.run_for_election()
    stop = gevent.spawn(lambda: (gevent.os.tp_read(0, 100), mark("stop"), candidate.stop(), mark("stopped")))
    for is_leader in elected:
        if is_leader:
            mark("elected")
    stop.join()


def child_kazoo(hosts: str, key: str, name: str) -> None:
    from kazoo.client import KazooClient

    mark = _mark(name)
    _trace_kazoo(mark)
    client = KazooClient(hosts=hosts, timeout=15)
    client.start(timeout=15)

    def lead() -> None:
        mark("elected")
        sys.stdin.readline()
        mark("stop")

    client.Election("/" + key, name).run(lead)
    mark("released")
    client.stop()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handovers", type=int, default=10)
    parser.add_argument("--waiters", type=int, default=2)
    parser.add_argument("--kazoo", action="store_true", help="trace kazoo's Election recipe instead")
    parser.add_argument("--raw", action="store_true", help="print each handover's steps to stderr")
    parser.add_argument("--child", nargs=3, metavar=("HOSTS", "KEY", "NAME"))
    args = parser.parse_args()
    if args.child:
        (child_kazoo if args.kazoo else child_library)(*args.child)
        return
    from tests import servers

    with tempfile.TemporaryDirectory() as tmp:
        cluster = servers.start("zookeeper", Path(tmp), 1)
        procs: dict[str, subprocess.Popen[str]] = {}
        marks: list[tuple[str, str, float, float]] = []

        def start(name: str) -> None:
            argv = [sys.executable, "-m", "benchmarks.zookeeper_handover_trace", "--child", cluster.addrs[0], key, name]
            proc = procs[name] = subprocess.Popen(argv + (["--kazoo"] if args.kazoo else []), stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, text=True, env=os.environ.copy())

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    marks.append(tuple(json.loads(line)))  # type: ignore[arg-type]
            threading.Thread(target=read, daemon=True).start()

        def wait_for(predicate: Any, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not predicate():
                time.sleep(0.01)

        try:
            key = f"bench/trace-{uuid.uuid4().hex[:8]}"
            for i in range(args.waiters + 1):
                start(f"c{i}")
                time.sleep(0.5)
            wait_for(lambda: any(what == "elected" for _, what, *_ in marks))
            steps: dict[str, list[float]] = {}
            cpu_steps: dict[str, list[float]] = {}  # CPU time of the process since the role's first mark
            count = args.waiters + 1
            for _ in range(args.handovers):
                time.sleep(1.5)  # every waiter at its watch
                holder = [n for n, what, *_ in marks if what == "elected"][-1]
                first = len(marks)
                procs[holder].stdin.write("stop\n")  # type: ignore[union-attr]
                procs[holder].stdin.flush()  # type: ignore[union-attr]
                wait_for(lambda h=holder, f=first: any(what == "elected" and n != h for n, what, *_ in marks[f:]), 30)
                time.sleep(0.2)
                window = marks[first:]
                stop_at = next(t for n, what, t, _ in window if what == "stop" and n == holder)
                winner = next(n for n, what, *_ in window if what == "elected" and n != holder)
                cpu_from: dict[str, float] = {}
                seen: set[str] = set()
                for n, what, t, cpu in window:
                    if n not in (holder, winner):
                        continue
                    role = "holder" if n == holder else "winner"
                    label = f"{role}: {what}"
                    while label in seen:
                        label += " (again)"
                    seen.add(label)
                    steps.setdefault(label, []).append((t - stop_at) * 1000)
                    spent = (cpu - cpu_from.setdefault(role, cpu)) * 1000
                    cpu_steps.setdefault(label, []).append(spent)
                    if args.raw:
                        print(f"{(t - stop_at) * 1000:8.2f} {spent:6.2f} {label}", file=sys.stderr)
                if args.raw:
                    print("--", file=sys.stderr)
                procs.pop(holder).wait(timeout=30)
                start(f"c{count}")
                count += 1
            order = sorted(steps, key=lambda label: statistics.median(steps[label]))
            from benchmarks.common import brief  # (here: the --kazoo peer process imports no more than it needs)
            print(json.dumps({"load": os.getloadavg()[0], "handovers": args.handovers, "kazoo": args.kazoo,
                              "ms_from_stop": {label: brief(steps[label]) for label in order},
                              "process_cpu_ms_from_first_mark": {
                                  label: f"{statistics.median(cpu_steps[label]):.2f} median" for label in order}},
                             indent=1))
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
            cluster.stop()


if __name__ == "__main__":
    main()
