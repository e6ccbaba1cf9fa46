"""Graceful handover and crash failover on PostgreSQL: greenleader's store beside the
``pg_try_advisory_lock`` loop that users copy today.

    python -m benchmarks.postgres_handover [--rounds 20] [--crashes 3] [--ttl 2] [--poll 0.5]

Starts its own server (tests/servers.py: initdb + postgres on a free loopback port). Measures:

- handover: the holder gives the key up (greenleader: ``release``, which deletes the row and
  NOTIFYs; the loop: ``pg_advisory_unlock``) while a waiter waits; from the give-up to the
  waiter's win.
- crash failover: the holder is a process of its own, waited on by this one. "killed": SIGKILL,
  so the kernel closes its connection; "frozen": SIGSTOP, as a host that hangs or is cut off,
  whose connection the server keeps (TCP keepalive: hours by default). From the signal to the
  waiter's win, bounded by ``--bound`` (a round that reaches it is reported as "none").

The loop polls every ``--poll`` seconds (the snippets sleep between tries); greenleader's waiter
wakes on NOTIFY or at the holder's expiry (``--ttl``). Prints one Markdown table.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import loadavg, summary  # noqa: E402
from greenleader.stores import from_url  # noqa: E402
from tests import servers  # noqa: E402

#: The advisory lock's key (any bigint the application picks).
LOCK_ID = 913_000_013

_GREENLEADER_HOLDER = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from greenleader import Candidate
from greenleader.stores import from_url
candidate = Candidate(from_url(sys.argv[1]), sys.argv[2], "holder", ttl=float(sys.argv[3]))
elected, _ = candidate.run_for_election()
while elected.get() is not True:
    pass
print("held", flush=True)
gevent.sleep(3600)
"""

_ADVISORY_HOLDER = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
assert conn.execute("SELECT pg_try_advisory_lock(%s)", [int(sys.argv[2])]).fetchone()[0]
print("held", flush=True)
time.sleep(3600)
"""


def advisory_wait(dsn: str, poll: float) -> float:
    """The loop users copy: try the lock, sleep, try again. Returns when it got the lock."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_ID]).fetchone()[0]:
            gevent.sleep(poll)
        won = time.monotonic()
        conn.execute("SELECT pg_advisory_unlock(%s)", [LOCK_ID])
        return won
    finally:
        conn.close()


def greenleader_handover(url: str, rounds: int, ttl: float) -> list[float]:
    holder_store, waiter_store = from_url(url), from_url(url)
    figures = []
    try:
        for _ in range(rounds):
            key = f"bench/{uuid.uuid4().hex[:8]}"
            lease = holder_store.acquire(key, "alice", ttl)
            waiting = gevent.spawn(lambda k=key: (waiter_store.acquire(k, "bob", ttl), time.monotonic()))
            gevent.sleep(0.05)  # bob is waiting
            started = time.monotonic()
            lease.release()
            bob, won = waiting.get(timeout=ttl * 5)
            figures.append((won - started) * 1000)
            bob.release()
    finally:
        holder_store.close()
        waiter_store.close()
    return figures


def advisory_handover(dsn: str, rounds: int, poll: float) -> list[float]:
    figures = []
    holder = psycopg.connect(dsn, autocommit=True)
    try:
        for _ in range(rounds):
            assert holder.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_ID]).fetchone()[0]
            waiting = gevent.spawn(advisory_wait, dsn, poll)
            gevent.sleep(0.05 + random.uniform(0, poll))  # the release falls anywhere in the loop's sleep
            started = time.monotonic()
            holder.execute("SELECT pg_advisory_unlock(%s)", [LOCK_ID])
            figures.append((waiting.get(timeout=poll * 10 + 10) - started) * 1000)
    finally:
        holder.close()
    return figures


def _holder(script: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "held":
        proc.kill()
        raise RuntimeError(f"the holder did not take the key: {line!r}")
    return proc


def crash(kind: str, how: signal.Signals, url: str, dsn: str, ttl: float, poll: float, bound: float) -> float | None:
    """Milliseconds from the signal to the waiter's win, or None if it did not win within ``bound``."""
    key = f"bench/{uuid.uuid4().hex[:8]}"
    if kind == "greenleader":
        proc = _holder(_GREENLEADER_HOLDER, url, key, str(ttl))
        store = from_url(url)
        waiting = gevent.spawn(lambda: (store.acquire(key, "bob", ttl), time.monotonic()))
    else:
        proc = _holder(_ADVISORY_HOLDER, dsn, str(LOCK_ID))
        store = None
        waiting = gevent.spawn(lambda: (None, advisory_wait(dsn, poll)))
    try:
        gevent.sleep(0.2)  # the waiter waits
        started = time.monotonic()
        os.kill(proc.pid, how)
        try:
            lease, won = waiting.get(timeout=bound)
        except gevent.Timeout:
            return None
        if lease is not None:
            lease.release()
        return (won - started) * 1000
    finally:
        waiting.kill()
        proc.kill()
        proc.wait()
        if store is not None:
            store.close()


def _row(name: str, figures: list[float | None], bound: float) -> str:
    done = [f for f in figures if f is not None]
    missed = len(figures) - len(done)
    if not done:
        return f"| {name} | none within {bound:g} s ({missed} of {len(figures)}) | | |"
    s = summary(done)
    tail = f" ({missed} of {len(figures)}: none within {bound:g} s)" if missed else ""
    return f"| {name} | {s['median']:.1f}{tail} | {s['p95']:.1f} | {s['max']:.1f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="handover rounds (default %(default)s)")
    parser.add_argument("--crashes", type=int, default=3, help="crash rounds per signal (default %(default)s)")
    parser.add_argument("--ttl", type=float, default=2.0, help="greenleader's TTL, s (default %(default)s)")
    parser.add_argument("--poll", type=float, default=0.5, help="the loop's sleep, s (default %(default)s)")
    parser.add_argument("--bound", type=float, default=15.0, help="longest crash wait, s (default %(default)s)")
    args = parser.parse_args()
    cluster = servers.start("postgres", Path(tempfile.mkdtemp(prefix="greenleader-bench-pg-")), 1)
    try:
        url, dsn = cluster.url + "?timeout=5", cluster.url
        rows = [
            _row("greenleader handover", greenleader_handover(url, args.rounds, args.ttl), args.bound),
            _row(f"advisory-lock loop handover (poll {args.poll:g} s)",
                 advisory_handover(dsn, args.rounds, args.poll), args.bound),
        ]
        for how, label in ((signal.SIGKILL, "killed"), (signal.SIGSTOP, "frozen")):
            rows.append(_row(f"greenleader failover, holder {label} (TTL {args.ttl:g} s)",
                             [crash("greenleader", how, url, dsn, args.ttl, args.poll, args.bound)
                              for _ in range(args.crashes)], args.bound))
            rows.append(_row(f"advisory-lock loop failover, holder {label}",
                             [crash("advisory", how, url, dsn, args.ttl, args.poll, args.bound)
                              for _ in range(args.crashes)], args.bound))
    finally:
        cluster.stop()
    print(f"PostgreSQL {servers._postgres_binary('postgres')}, load {' '.join(f'{x:.2f}' for x in loadavg())}, "
          f"{time.strftime('%H:%M UTC', time.gmtime())}\n")
    print("| ms | median | p95 | max |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
