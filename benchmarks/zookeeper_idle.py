"""1,000 idle ZooKeeper candidates in one process (one key each): the process's CPU at rest.

    python -m benchmarks.zookeeper_idle [--candidates 1000] [--window 30] [--profile out.pstats]

Starts a single ZooKeeper server (tests/servers.py) unless ``--url`` is given, runs the
candidates on one store object with the cost benchmark's TTL (15 s) and retries, waits until
all lead, then measures the CPU of this process over ``--window`` seconds (optionally under
cProfile, which slows it down: compare profiles with profiles only).
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


class _Sampler:
    """Where the process is, every 2 ms, from an OS thread: ``file:function`` frames counted
    (innermost and anywhere on the stack), the idle hub's wait excluded."""

    def __init__(self) -> None:
        import collections
        import sys
        import threading

        from gevent import monkey

        self.inner: collections.Counter[str] = collections.Counter()
        self.anywhere: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = False
        self._main = threading.main_thread().ident
        self._frames = sys._current_frames
        sleep = monkey.get_original("time", "sleep")
        start = monkey.get_original("_thread", "start_new_thread")

        def run() -> None:
            while not self._stop:
                sleep(0.002)
                frame = self._frames().get(self._main)
                names = []
                while frame is not None:
                    names.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_code.co_name}")
                    frame = frame.f_back
                self.samples += 1
                if names and names[0] != "hub.py:run":
                    self.inner[names[0]] += 1
                    for name in set(names):
                        self.anywhere[name] += 1

        start(run, ())

    def report(self) -> None:
        self._stop = True
        busy = sum(self.inner.values())
        print(f"{busy} of {self.samples} samples busy")
        for title, counter in (("innermost", self.inner), ("on the stack", self.anywhere)):
            print(f"-- {title}")
            for name, count in counter.most_common(25):
                print(f"{count / max(1, self.samples) * 100:6.2f} %  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--url")
    parser.add_argument("--profile")
    parser.add_argument("--sample", action="store_true",
                        help="sample the stack every 2 ms from a real thread (light, unlike cProfile)")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from tests import servers
        cluster = servers.start("zookeeper", tempfile.mkdtemp(prefix="zk-idle-"))
        url = cluster.url
    store = from_url(url)
    prefix = f"bench/idle-{uuid.uuid4().hex[:6]}"
    candidates = [Candidate(store, f"{prefix}/{i}", f"c{i}", ttl=TTL, retry=True) for i in range(args.candidates)]
    started = time.monotonic()
    for candidate in candidates:
        candidate.run_for_election()
    while sum(c.is_leader() for c in candidates) < len(candidates):
        gevent.sleep(0.2)
        if time.monotonic() - started > 120:
            raise SystemExit(f"only {sum(c.is_leader() for c in candidates)} lead after 120 s")
    print(f"all {len(candidates)} lead after {time.monotonic() - started:.1f} s", flush=True)
    gevent.sleep(3.0)
    profiler = cProfile.Profile() if args.profile else None
    cpu0, t0 = time.process_time(), time.monotonic()
    if profiler:
        profiler.enable()
    sampler = _Sampler() if args.sample else None
    gevent.sleep(args.window)
    if sampler:
        sampler.report()
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, elapsed = time.process_time() - cpu0, time.monotonic() - t0
    leading = sum(c.is_leader() for c in candidates)
    print(f"cpu {cpu / elapsed * 100:.1f} % of a core over {elapsed:.0f} s; {leading} lead", flush=True)
    gevent.joinall([gevent.spawn(c.stop) for c in candidates], timeout=60)
    store.close()
    if cluster is not None:
        cluster.stop()


if __name__ == "__main__":
    main()
