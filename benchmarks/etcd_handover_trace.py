"""Where an etcd handover between processes spends its time, step by step, against ``etcdctl lock``.

    python -m benchmarks.etcd_handover_trace [--handovers 10] [--waiters 2] [--raw] [--etcdctl] [--fine]

As the handover benchmark does, with one holder and ``--waiters`` waiting processes on one key:
each contender is a process of its own (this module with ``--child``) that waits to lead, then
runs a ``bash`` child (``os.posix_spawn``, awaited with a gevent child watcher, as
benchmarks/library_runner.py does) and stops its Candidate when the child exits. The child marks
its own start and end; the driver ends the holder's child. Every contender marks each request its
etcd client sends and each answer, each watch response it reads, the win, the step-up, the read
of ``elected``, the child's spawn and exit, the release. The figure of each step is the time from
the holder's child's end (the benchmark's start) to that step, in the holder's and the winner's
process, with each process's CPU time spent since its first step of the handover. An
``etcdctl watch`` on the election's keys marks when etcd sent the release's deletion ("etcd:
deletion sent", as a Go client sees it and the driver reads it).
Timestamps are the wall clock (``time.time()``, bash's ``$EPOCHREALTIME``), one clock for all.

With ``--etcdctl`` the contenders are ``etcdctl lock KEY bash child`` instead: only the children's
start and end are seen, which gives the peer's figure on the same children in the same conditions.
Prints one JSON document: the median and max of each step (ms).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--child" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

CHILD = """\
echo "[\\"$BENCH_ID\\", \\"child start\\", $EPOCHREALTIME, -1]"
read line < "$BENCH_DIR/go-$BENCH_ID"
echo "[\\"$BENCH_ID\\", \\"child end\\", $EPOCHREALTIME, -1]"
"""


def _mark(name: str) -> Any:
    def mark(what: str) -> None:
        os.write(1, (json.dumps([name, what, time.time(), time.process_time()]) + "\n").encode())
    return mark


def _trace(mark: Any) -> None:
    """Mark every request of the etcd client, every watch response read, the win and the step-up."""
    from greenleader.candidate import Candidate
    from greenleader.stores.etcd import client, recipe

    call = client.EtcdClient.call

    def traced_call(self: Any, what: str, request: Any, **kwargs: Any) -> Any:
        mark(f"{what} sent")
        try:
            return call(self, what, request, **kwargs)
        finally:
            mark(f"{what} answered")

    client.EtcdClient.call = traced_call  # type: ignore[method-assign]
    iterate = client.WatchStream.__iter__

    def traced_iter(self: Any) -> Any:
        for response in iterate(self):
            mark("watch response")
            yield response

    client.WatchStream.__iter__ = traced_iter  # type: ignore[method-assign]
    close = client.WatchStream.close

    def traced_close(self: Any) -> None:
        mark("watch close begins")
        close(self)
        mark("watch closed")

    client.WatchStream.close = traced_close  # type: ignore[method-assign]
    acquire = recipe.EtcdStore.acquire

    def traced_acquire(self: Any, *args: Any) -> Any:
        lease = acquire(self, *args)
        mark("acquire returned")
        return lease

    recipe.EtcdStore.acquire = traced_acquire  # type: ignore[method-assign]
    if os.environ.get("BENCH_FINE"):  # --fine: the waiter's steps between its watch and its win
        for name in ("_prove", "_await_gone", "_fresh_lease", "_won"):
            def fine(method: Any, name: str = name) -> Any:
                def traced(self: Any, *args: Any) -> Any:
                    mark(f"{name} in")
                    try:
                        return method(self, *args)
                    finally:
                        mark(f"{name} out")
                return traced
            setattr(recipe._Candidacy, name, fine(getattr(recipe._Candidacy, name)))
    step_up, step_down, release = Candidate._step_up, Candidate._step_down, Candidate._release
    Candidate._step_up = lambda self, lease: (mark("stepped up"), step_up(self, lease))[1]  # type: ignore[method-assign]
    Candidate._step_down = lambda self, *args: (mark("step-down"), step_down(self, *args))[1]  # type: ignore[method-assign]
    Candidate._release = lambda self, lease: (  # type: ignore[method-assign]
        mark("release begins"), release(self, lease), mark("released"))[1]


def child(url: str, key: str, name: str, workdir: str) -> None:
    import gevent

    from greenleader import Candidate
    from greenleader.stores import from_url

    mark = _mark(name)
    _trace(mark)
    os.environ.update(BENCH_ID=name, BENCH_DIR=workdir)
    store = from_url(url)
    candidate = Candidate(store, key, name, ttl=15)
    bash = shutil.which("bash")  # found beforehand, as benchmarks/library_runner.py and run do
    elected, _ = candidate.run_for_election()
    for is_leader in elected:
        if is_leader:
            mark("elected read")
            hub = gevent.get_hub()
            hub.loop.install_sigchld()
            argv = ["bash", str(Path(workdir) / "child.sh")]
            pid = os.posix_spawn(bash, argv, os.environ)  # as benchmarks/library_runner.py
            mark("child spawned")
            hub.wait(hub.loop.child(pid, False))
            mark("child exited")
            break
    mark("stop")
    candidate.stop()
    mark("stopped")
    store.close()
    gevent.sleep(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handovers", type=int, default=10)
    parser.add_argument("--waiters", type=int, default=2)
    parser.add_argument("--raw", action="store_true", help="print each handover's steps to stderr")
    parser.add_argument("--etcdctl", action="store_true", help="run etcdctl lock contenders instead")
    parser.add_argument("--fine", action="store_true",
                        help="also mark the waiter's steps between its watch response and its win (each mark "
                             "costs its process about 0.05 ms of CPU)")
    parser.add_argument("--url", help="an etcd:// URL (default: start a single member)")
    parser.add_argument("--child", nargs=4, metavar=("URL", "KEY", "NAME", "DIR"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from benchmarks.common import brief

    with tempfile.TemporaryDirectory() as tmp:
        cluster = None
        url = args.url
        if url is None:
            from tests import servers
            cluster = servers.start("etcd", Path(tmp) / "etcd", 1)
            url = cluster.url
        addr = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        (Path(tmp) / "child.sh").write_text(CHILD)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        marks: list[tuple[str, str, float, float]] = []
        lock = threading.Lock()
        key = f"bench/trace-{uuid.uuid4().hex[:8]}"

        def start(name: str) -> None:
            os.mkfifo(Path(tmp) / f"go-{name}")
            if args.etcdctl:
                argv = ["etcdctl", f"--endpoints={addr}", "lock", "--ttl=15", key, "bash", str(Path(tmp) / "child.sh")]
            else:
                argv = [sys.executable, "-m", "benchmarks.etcd_handover_trace", "--child", url, key, name, tmp]
            proc = procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                  env={**os.environ, "BENCH_ID": name, "BENCH_DIR": tmp,
                                                       **({"BENCH_FINE": "1"} if args.fine else {})})

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    try:
                        entry = tuple(json.loads(line))
                    except ValueError:
                        continue  # etcdctl lock's own output (the key it holds)
                    with lock:
                        marks.append(entry)  # type: ignore[arg-type]
            threading.Thread(target=read, daemon=True).start()

        def observe(addr: str, key: str) -> None:
            """``etcdctl watch`` on the election's keys: when etcd sends each deletion (a Go
            client's view, which the driver times on arrival)."""
            proc = procs["observer"] = subprocess.Popen(
                ["etcdctl", f"--endpoints={addr}", "watch", "--prefix", key + "/"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.strip() == b"DELETE":
                        with lock:
                            marks.append(("etcd", "deletion sent", time.time(), -1.0))
            threading.Thread(target=read, daemon=True).start()

        def wait_for(predicate: Any, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not predicate():
                time.sleep(0.005)

        def seen(name: str, what: str, after: int = 0) -> bool:
            with lock:
                return any(n == name and w == what for n, w, *_ in marks[after:])

        try:
            if not args.etcdctl:
                observe(addr, key)
            for i in range(args.waiters + 1):
                start(f"c{i}")
                time.sleep(0.5)
            wait_for(lambda: any(w == "child start" for _, w, *_ in marks))
            steps: dict[str, list[float]] = {}
            cpu_steps: dict[str, list[float]] = {}
            count = args.waiters + 1
            for _ in range(args.handovers):
                time.sleep(1.5)  # every waiter at its watch
                with lock:
                    holder = [n for n, w, *_ in marks if w == "child start"][-1]
                    first = len(marks)
                with open(Path(tmp) / f"go-{holder}", "w") as go:
                    go.write("go\n")
                wait_for(lambda h=holder, f=first: any(w == "child start" and n != h for n, w, *_ in marks[f:]), 30)
                time.sleep(0.2)
                with lock:
                    window = marks[first:]
                end_at = next(t for n, w, t, _ in window if w == "child end" and n == holder)
                winner = next(n for n, w, *_ in window if w == "child start" and n != holder)
                cpu_from: dict[str, float] = {}
                labels: set[str] = set()
                for n, what, t, cpu in window:
                    if n not in (holder, winner, "etcd"):
                        continue
                    role = {holder: "holder", winner: "winner"}.get(n, n)
                    label = f"{role}: {what}"
                    while label in labels:
                        label += " (again)"
                    labels.add(label)
                    steps.setdefault(label, []).append((t - end_at) * 1000)
                    spent = (cpu - cpu_from.setdefault(role, cpu)) * 1000 if cpu >= 0 else 0.0
                    cpu_steps.setdefault(label, []).append(spent)
                    if args.raw:
                        print(f"{(t - end_at) * 1000:8.2f} {spent:6.2f} {label}", file=sys.stderr)
                if args.raw:
                    print("--", file=sys.stderr)
                procs.pop(holder).wait(timeout=30)
                start(f"c{count}")
                count += 1
            order = sorted(steps, key=lambda label: statistics.median(steps[label]))
            print(json.dumps({"load": os.getloadavg()[0], "handovers": args.handovers, "etcdctl": args.etcdctl,
                              "ms_from_child_end": {label: brief(steps[label]) for label in order},
                              "process_cpu_ms_from_first_mark": {
                                  label: f"{statistics.median(cpu_steps[label]):.2f} median" for label in order}},
                             indent=1))
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
            if cluster is not None:
                cluster.stop()


if __name__ == "__main__":
    main()
