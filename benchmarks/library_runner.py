"""greenleader's library in the smallest runner: the like-for-like peer of kazoo_peer.py.

    python -m benchmarks.library_runner --url URL --key K --ttl 15 --id NAME -- CMD ...

A :class:`greenleader.Candidate` waits to lead, then runs the command and resigns when it
exits, like ``greenleader run`` without its options. The command is started with
``os.posix_spawnp`` (vfork + exec in C, as CPython's own subprocess and the Go peers do) and
awaited with a gevent child watcher, rather than with gevent's ``subprocess.Popen``, which
forks and runs Python code in the child before exec (about 20-30 ms in a process of this
size; see docs/benchmarks.md). Exits with the command's status.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent import monkey  # noqa: E402

from greenleader import Candidate  # noqa: E402
from greenleader.stores import from_url  # noqa: E402

#: The unpatched ``os.posix_spawn(p)``, as greenleader._spawn uses: gevent's adds a second child
#: watcher per process for its ``os.waitpid``, which nothing here calls.
_posix_spawn = monkey.get_original("os", "posix_spawn")
_posix_spawnp = monkey.get_original("os", "posix_spawnp")


def spawn_and_wait(argv: list[str], executable: str | None) -> int:
    """Run ``argv`` (found beforehand at ``executable``, as ``greenleader run`` does) to its end
    without blocking the hub; its exit status (128+N for signal N)."""
    hub = gevent.get_hub()
    hub.loop.install_sigchld()
    pid = _posix_spawnp(argv[0], argv, os.environ) if executable is None else \
        _posix_spawn(executable, argv, os.environ)
    watcher = hub.loop.child(pid, False)
    hub.wait(watcher)
    code = os.waitstatus_to_exitcode(watcher.rstatus)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.library_runner", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ttl", type=float, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    executable = shutil.which(command[0])
    store = from_url(args.url)
    candidate = Candidate(store, args.key, args.id, ttl=args.ttl)
    gevent.signal_handler(signal.SIGTERM, candidate.stop)
    status = 128 + signal.SIGTERM
    try:
        elected, _errors = candidate.run_for_election()
        print(f"campaigning for {args.key!r} as {args.id!r}", file=sys.stderr, flush=True)
        for is_leader in elected:
            if is_leader:
                status = spawn_and_wait(command, executable)
                break
    finally:
        candidate.stop()
        store.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
