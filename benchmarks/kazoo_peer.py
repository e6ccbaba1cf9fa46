"""The peer of ``greenleader run`` on ZooKeeper: kazoo's Election recipe running a command.

    python -m benchmarks.kazoo_peer --hosts H:P --path /election --ttl 3 --id NAME -- CMD ...

Waits to be elected with ``kazoo.recipe.election.Election.run`` and runs the command while
elected; the election ends (its node is deleted) when the command exits, and so does this
process, with the command's exit status. kazoo's default (threading) handler, as its users
get it; the session timeout is ``--ttl``. SIGTERM ends it cleanly (the session is closed).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from kazoo.client import KazooClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kazoo_peer", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--ttl", type=float, required=True, help="session timeout in seconds")
    parser.add_argument("--id", required=True, help="this contender's identifier")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    client = KazooClient(hosts=args.hosts, timeout=args.ttl)
    client.start(timeout=15)
    status: list[int] = []
    try:
        client.Election(args.path, args.id).run(lambda: status.append(subprocess.call(command)))
    finally:
        client.stop()
        client.close()
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
