"""A process hosting many candidates and/or followers on one store, for the cost and
contention benchmarks.

    python -m benchmarks.worker --url URL --name W --ttl 15 --candidates N [--followers M]
                                [--keys PREFIX] [--same-key] [--connect] [--retry]

Candidates campaign on ``PREFIX/0`` .. ``PREFIX/N-1`` (all on ``PREFIX`` with ``--same-key``),
named ``W-0`` .. ``W-N-1``; followers follow the same keys. ``--connect`` reads the leader of
``PREFIX`` once, so that the store's connection is open even with no participant.
``--retry``: candidates and followers ride out store errors (the library's default backoff).

Prints JSON lines on stdout: ``boot`` (RSS before any participant), ``campaigning`` (a candidate
entered ``acquire``), ``elected`` (``acquire`` returned), ``deposed`` (``release`` began),
``error`` (an election error, ``fatal`` or retried), ``stats`` (answer to the ``stats``
command: the file store's lock attempts so far, and this process's CPU seconds from
``getrusage``, exact to the microsecond where /proc/PID/stat counts 10 ms ticks). Each line
has ``t``, this process's ``time.monotonic()`` (system-wide, comparable with the driver's).
Commands on stdin: ``resign NODE``, ``stats``. SIGTERM stops everything and exits.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import fcntl
import json
import logging
import resource
import signal
import sys
import time
from collections import Counter
from typing import Any

import gevent
import gevent.event
import gevent.fileobject

COUNTS: Counter[str] = Counter()


def emit(event: str, **data: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **data}) + "\n")
    sys.stdout.flush()


def _count_flock() -> None:
    """Count the file store's lock attempts (its "requests"): it calls ``fcntl.flock``."""
    flock = fcntl.flock

    def counting(fd: Any, operation: int) -> None:
        COUNTS["flock"] += 1
        flock(fd, operation)

    fcntl.flock = counting


def _instrument(store: Any) -> None:
    """Print when each candidate enters and leaves ``acquire``, and when it begins ``release``."""
    acquire = store.acquire

    def timed_acquire(key: str, node: str, ttl: float) -> Any:
        emit("campaigning", node=node)
        lease = acquire(key, node, ttl)
        emit("elected", node=node, term=lease.term)
        release = lease.release
        released = []

        def timed_release() -> None:
            if not released:
                released.append(True)
                emit("deposed", node=node)
            release()

        lease.release = timed_release
        return lease

    store.acquire = timed_acquire


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--ttl", type=float, default=15.0)
    parser.add_argument("--candidates", type=int, default=0)
    parser.add_argument("--followers", type=int, default=0)
    parser.add_argument("--keys", default="bench/worker")
    parser.add_argument("--same-key", action="store_true")
    parser.add_argument("--connect", action="store_true")
    parser.add_argument("--retry", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if args.url.startswith("file:"):
        _count_flock()

    import zope.event

    from greenleader import Candidate, Follower
    from greenleader.events import ElectionError
    from greenleader.stores import from_url

    def on_event(event: object) -> None:
        if isinstance(event, ElectionError):
            emit("error", node=getattr(event.source, "node", None), fatal=event.fatal, error=str(event.error)[:200])

    zope.event.subscribers.append(on_event)

    store = from_url(args.url)
    _instrument(store)
    emit("boot", rss_mb=_rss_mb())
    if args.connect:
        store.leader(args.keys)

    def key(i: int) -> str:
        return args.keys if args.same_key else f"{args.keys}/{i}"

    retry = True if args.retry else None
    candidates = {f"{args.name}-{i}": Candidate(store, key(i), f"{args.name}-{i}", ttl=args.ttl, retry=retry)
                  for i in range(args.candidates)}
    followers = [Follower(store, key(i), retry=retry) for i in range(args.followers)]
    drains = [gevent.spawn(_drain, c.run_for_election()) for c in candidates.values()]
    drains += [gevent.spawn(_drain, f.follow_election()) for f in followers]
    emit("started", candidates=len(candidates), followers=len(followers), rss_mb=_rss_mb())

    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.spawn(_commands, candidates, stopping)
    stopping.wait()
    gevent.joinall([gevent.spawn(c.stop) for c in candidates.values()], timeout=30)
    for follower in followers:
        follower.stop()
    gevent.killall(drains, timeout=5)
    store.close()
    return 0


def _drain(queues: tuple[Any, Any]) -> None:
    for _ in queues[0]:
        pass


def _commands(candidates: dict[str, Any], stopping: Any) -> None:
    for line in gevent.fileobject.FileObject(sys.stdin.fileno(), "r"):
        word, _, arg = line.strip().partition(" ")
        if word == "resign":
            gevent.spawn(candidates[arg].resign)
        elif word == "stats":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            emit("stats", flock=COUNTS["flock"], rss_mb=_rss_mb(), cpu_s=usage.ru_utime + usage.ru_stime)
    stopping.set()  # stdin closed: the driver is gone


if __name__ == "__main__":
    sys.exit(main())
