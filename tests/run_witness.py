"""The command the nemesis gives ``greenleader run``: it proves that no two commands' process
trees ever live at once.

    python -m tests.run_witness --witness FILE --log FILE --node NAME

It takes an exclusive ``flock`` on the witness file, on a descriptor that its own child (a
``sleep``) inherits. The kernel drops that lock only when every process holding the
descriptor is gone, however they died (SIGKILL included), so the lock is held exactly as long
as some process of this command's tree lives. A command that finds the lock taken records an
``overlap`` (with the instant), waits for the lock and records how long the overlap lasted.
Each line of the log is one JSON record written with a single ``write(2)``, on the host's
``CLOCK_MONOTONIC``: ``start`` (lock taken; with the pids of the tree), ``overlap``,
``overlap-end``. The command runs until a signal ends it; SIGHUP, SIGQUIT and SIGTERM keep
their default action (the process dies, as most commands would).

No gevent here: the command is a plain process, as ``greenleader run`` users' commands are.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time


def _write(fd: int, event: str, **fields: object) -> None:
    os.write(fd, (json.dumps({"ev": event, "t": time.monotonic(), **fields}) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.run_witness", description=__doc__.split("\n")[0])
    parser.add_argument("--witness", required=True, help="the lock file every command of one key shares")
    parser.add_argument("--log", required=True, help="JSON lines: start, overlap, overlap-end")
    parser.add_argument("--node", required=True, help="the greenleader run that started this command")
    args = parser.parse_args(argv)
    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = os.open(args.witness, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _write(log, "overlap", node=args.node, pid=os.getpid())
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write(log, "overlap-end", node=args.node, pid=os.getpid())
    child = subprocess.Popen(["sleep", "3600"], pass_fds=(lock,), stdin=subprocess.DEVNULL)
    _write(log, "start", node=args.node, pid=os.getpid(), child=child.pid, pgid=os.getpgid(0))
    child.wait()  # a signal ends this process first
    return 0


if __name__ == "__main__":
    sys.exit(main())
