"""A leader duty that fences its writes with the election's term.

``is_leader()`` turns False at the renew deadline even while CPU-bound code blocks the gevent
hub, but it cannot take back a write that was decided before the deadline and made after it:
a duty that checked, then got stuck (a long computation, a SIGSTOP, a VM pause), then wrote,
writes as a leader that no longer is. The fencing term closes that gap. Every write carries the
tenure's term, and the system written to accepts it only if no higher term has written before,
checking and writing in one transaction. A stale leader's late write is then refused instead of
clobbering its successor's.

Demonstration (two processes; etcd, ZooKeeper or Consul, whose keys expire while a holder is
stuck — with Consul use ``--ttl 10``)::

    python examples/fencing.py --store etcd://127.0.0.1:2379

Process ``a`` wins, writes twice, then blocks its hub with CPU-bound work for three TTLs; its
key expires, ``b`` wins and writes with a higher term; when ``a`` comes back, its duty's
pending write reaches the ledger before anything else runs in ``a``, and is refused.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from greenleader import Candidate  # noqa: E402
from greenleader.duties import Duties  # noqa: E402
from greenleader.stores import from_url  # noqa: E402

KEY = "examples/fencing"


class Ledger:
    """The system the duty writes to (a SQLite file here; any database with transactions will do).

    It remembers the highest term that has written and refuses writes with a lower one.
    """

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS fence (id INTEGER PRIMARY KEY CHECK (id = 0), term INTEGER)")
        self.db.execute("INSERT OR IGNORE INTO fence VALUES (0, 0)")
        self.db.execute("CREATE TABLE IF NOT EXISTS entries (term INTEGER, node TEXT, text TEXT)")

    def append(self, term: int, node: str, text: str) -> bool:
        """Write ``text`` as ``node`` in tenure ``term``; False if a newer term has written."""
        self.db.execute("BEGIN IMMEDIATE")  # the check and the write are one transaction
        try:
            (highest,) = self.db.execute("SELECT term FROM fence").fetchone()
            if term < highest:
                return False
            self.db.execute("UPDATE fence SET term = ?", (term,))
            self.db.execute("INSERT INTO entries VALUES (?, ?, ?)", (term, node, text))
            return True
        finally:
            self.db.execute("COMMIT")


def crunch(seconds: float) -> None:
    """CPU-bound work that never yields to the gevent hub."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def worker(args: argparse.Namespace) -> None:
    """One candidate process whose duty appends to the ledger while it leads."""
    ledger = Ledger(args.db)
    candidate = Candidate(from_url(args.store), KEY, args.node, ttl=args.ttl)
    duties = Duties()

    @duties
    def write_entries(term: int) -> None:
        for number in range(1, 6):
            if number == 3 and args.block:
                print(f"{args.node}: term {term}: blocking the hub for {args.block:g}s", flush=True)
                crunch(args.block)  # the tenure ends meanwhile; is_leader() is False after it
            accepted = ledger.append(term, args.node, f"entry {number}")
            print(f"{args.node}: term {term}: entry {number} {'accepted' if accepted else 'REFUSED'}"
                  f" (is_leader() {candidate.is_leader()})", flush=True)
            if not accepted:
                return  # a newer leader exists: stop this tenure's work
            gevent.sleep(0.3)

    runner = duties.run(candidate)
    gevent.sleep(args.seconds)
    runner.stop()


def demo(args: argparse.Namespace) -> int:
    """Run processes ``a`` (which blocks its hub) and ``b``; show the refused stale write."""
    db = os.path.join(tempfile.mkdtemp(prefix="fencing-"), "ledger.sqlite3")
    Ledger(db)
    common = [sys.executable, __file__, "--store", args.store, "--ttl", str(args.ttl), "--db", db,
              "--seconds", str(4 * args.ttl + 3)]
    a = subprocess.Popen([*common, "--node", "a", "--block", str(3 * args.ttl)], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def relay(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            print(line, end="", flush=True)

    readers = [gevent.spawn(relay, a)]
    with gevent.Timeout(60, RuntimeError("a did not start leading")):
        while not any(line.startswith("a:") for line in lines):
            gevent.sleep(0.05)
    b = subprocess.Popen([*common, "--node", "b"], stdout=subprocess.PIPE, text=True)
    readers.append(gevent.spawn(relay, b))
    for proc in (a, b):
        proc.wait(timeout=12 * args.ttl + 60)
    gevent.joinall(readers, timeout=5)
    ledger = Ledger(db)
    rows = ledger.db.execute("SELECT term, node, text FROM entries ORDER BY rowid").fetchall()
    print("ledger:", ", ".join(f"{node}:{term}:{text}" for term, node, text in rows))
    terms = [term for term, _, _ in rows]
    refused = any("REFUSED" in line for line in lines)
    print("the stale leader's write was refused" if refused else "no stale write was refused")
    return 0 if refused and terms == sorted(terms) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="etcd://127.0.0.1:2379", help="store URL (keys must expire: not file)")
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--node", help=argparse.SUPPRESS)  # set for the worker processes
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        worker(args)
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
