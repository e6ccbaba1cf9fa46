"""Many idle candidates in one process on one PostgreSQL store object: how long until all
lead, how many statements, and the CPU they cost at rest.

    python -m benchmarks.postgres_idle [--candidates 1000] [--ttl 15] [--window 20]

Starts its own server (tests/servers.py). Each candidate has a key of its own, so all lead;
at rest each renews every 2/9 of the TTL (the candidate's default schedule), one statement
each, on the store's one statement connection.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import loadavg  # noqa: E402
from greenleader import Candidate  # noqa: E402
from greenleader.stores.postgres import PostgresStore  # noqa: E402
from tests import servers  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=20.0, help="seconds at rest measured")
    args = parser.parse_args()
    cluster = servers.start("postgres", Path(tempfile.mkdtemp(prefix="greenleader-bench-pg-")), 1)
    try:
        store = PostgresStore(cluster.addrs, user=cluster.SUPERUSER, timeout=5)
        store.leader("bench/warm-up")  # the schema, made once
        candidates = [Candidate(store, f"bench/idle/{i}", f"node-{i}", ttl=args.ttl)
                      for i in range(args.candidates)]
        started = time.monotonic()
        for candidate in candidates:
            candidate.run_for_election()
        while time.monotonic() - started < 60 and not all(c.is_leader() for c in candidates):
            gevent.sleep(0.1)
        all_lead = time.monotonic() - started
        cpu, wall = _cpu(), time.monotonic()
        gevent.sleep(args.window)
        cpu, wall = _cpu() - cpu, time.monotonic() - wall
        leading = sum(c.is_leader() for c in candidates)
        errors = sum(c.status().store.errors for c in candidates)
        kinds = sorted({str(c.status().store.last_error)[:90] for c in candidates if c.status().store.errors})
        print("errors seen:", kinds[:5])
        print(f"load {' '.join(f'{x:.2f}' for x in loadavg())}, {time.strftime('%H:%M UTC', time.gmtime())}: "
              f"{leading} of {args.candidates} lead ({all_lead:.2f} s until all did), {errors} errors, "
              f"{cpu / wall * 100:.1f} % of a core at rest; statements {dict(store.requests)}")
        for candidate in candidates:
            candidate.stop()
        store.close()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
