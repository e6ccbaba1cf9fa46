"""The ``greenleader`` command: demo, run a command as leader, show or watch the leader.

``greenleader run`` never lets its command outlive its leadership (DESIGN.md §2 rule 13). The
command runs in a process group of its own, led by a watchdog that SIGKILLs the group as soon as
``greenleader run`` dies in any way, SIGKILL included (see ``greenleader._spawn``), and every way
out of ``run`` ends the whole group first, then releases the key:

- the command's exit: what it left running in its group gets SIGTERM, then SIGKILL after
  ``--grace`` seconds;
- loss of leadership, a store error, an internal error: the group gets SIGTERM, then SIGKILL after
  ``--grace`` seconds;
- the signals in ``FORWARDED`` (HUP, INT, QUIT, TERM, USR1, USR2, ALRM, VTALRM, PROF, XCPU, IO,
  PWR, STKFLT: all that end a process by default, but faults): passed on to the whole group;
  ``run`` ends when the command does (``--restart`` does not restart it), with its status. A
  command that handles the signal and goes on (a reload on SIGHUP) keeps running, still as leader.
  Before the command starts, they end ``run`` at once. A signal ignored when ``run`` started
  (``nohup``, a background job) stays ignored, by ``run`` and by the command;
- SIGTSTP (Ctrl-Z): the group is stopped, then ``run`` (as a shell job would be); on SIGCONT the
  command continues only if ``run`` still leads, else it is ended as on a loss;
- anything else that ends ``run`` (SIGKILL, a fault, a real-time signal): the watchdog SIGKILLs the
  group. SIGPIPE and SIGXFSZ are ignored by ``run`` (as by any Python program).

The command's environment gets ``GREENLEADER_KEY``, ``GREENLEADER_NODE`` and ``GREENLEADER_TERM``
(the fencing term of this tenure). Limits: a process that leaves the group (``setsid``, a daemon
that detaches) escapes it; a SIGSTOP of ``run`` (or a paused VM) freezes its renewals but not the
command: that is what the fencing term is for.

Exit codes of ``greenleader run``: the command's own exit status when it ran to its end
(128+N when it died of signal N); 1 when the store failed or an internal error ended the
command; 2 for bad usage or arguments; 3 when leadership was lost and the command was
terminated; 126 when the command could not be executed, 127 when it was not found (as in
shells); 128+N when signal N arrived before the command started. ``greenleader leader`` exits
0 when there is a leader, 1 when the key is vacant.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent import subprocess  # noqa: E402
from gevent.queue import Queue  # noqa: E402

from . import __version__  # noqa: E402
from ._spawn import CommandGroup  # noqa: E402
from .candidate import Candidate  # noqa: E402
from .errors import GreenleaderError, InvalidArgumentError  # noqa: E402
from .follower import Follower  # noqa: E402
from .stores import Store, from_url, new_store  # noqa: E402
from .stores.base import check_float  # noqa: E402

log = logging.getLogger("greenleader.cli")

EXIT_STORE_ERROR = 1
EXIT_USAGE = 2
EXIT_LEADERSHIP_LOST = 3
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

#: Signals that ``greenleader run`` passes on to the command's process group, ending when it does.
FORWARDED = tuple(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                 "SIGPROF", "SIGXCPU", "SIGIO", "SIGPWR", "SIGSTKFLT")
    if hasattr(signal, name)
)


def _store(url: str | None) -> Store:
    """The store of ``--store``, else of ``$GREENLEADER_STORE`` (which keeps credentials off the
    command line, where any user can read them), else the file store."""
    url = url or os.environ.get("GREENLEADER_STORE", "").strip() or None
    return from_url(url) if url else new_store("file")


def _seconds(text: str) -> float:
    """argparse type: a finite, non-negative number of seconds."""
    try:
        return check_float("seconds", text, minimum=0.0, maximum=86400.0)
    except GreenleaderError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    """argparse type: a whole number from 1 to 100."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= number <= 100:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100, not {number}")
    return number


def _default_node() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _say(*parts: object) -> None:
    print(*parts, flush=True)


# -- greenleader run ----------------------------------------------------------------------


def _handle(signum: int, handler, *args) -> None:
    """Handle ``signum`` unless it was ignored when this process started (``nohup``, a background
    job): then it stays ignored, here and in the command."""
    if signal.getsignal(signum) is not signal.SIG_IGN:
        gevent.signal_handler(signum, handler, *args)


def _command_env(candidate: Candidate) -> dict[str, str]:
    """The command's environment: this one, plus the key, node and fencing term it leads with."""
    return {**os.environ, "GREENLEADER_KEY": candidate.key, "GREENLEADER_NODE": candidate.node,
            "GREENLEADER_TERM": str(candidate.term)}


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise InvalidArgumentError("no command given: greenleader run --key K -- CMD ...")
    store = _store(args.store)
    node = args.node if args.node is not None else _default_node()
    candidate = Candidate(store, args.key, node, ttl=args.ttl, retry=args.retry)
    # ("elected", bool) | ("ended", None) | ("exit", code) | ("signal", n) | ("watchdog", group)
    inbox: Queue = Queue()

    def pump_elections(elected: Queue) -> None:
        for is_leader in elected:
            inbox.put(("elected", is_leader))
        inbox.put(("ended", None))

    def new_group() -> CommandGroup:
        """A group for the next run of the command; its watchdog starts now, off the path from
        election to the command's start."""
        made = CommandGroup()
        made.watchdog_lost.rawlink(lambda _: inbox.put(("watchdog", made)))
        return made

    def suspend() -> None:
        """SIGTSTP: stop the command, then this process; once continued, let the command go on
        only while this process still leads (else the loss ends it)."""
        if running:
            group.pause()
        os.kill(os.getpid(), signal.SIGSTOP)
        if running and candidate.is_leader():
            group.signal(signal.SIGCONT)

    group = new_group()
    running = lost = stopping = False
    for signum in FORWARDED:
        _handle(signum, inbox.put, ("signal", signum))
    _handle(signal.SIGTSTP, suspend)
    try:
        elected, errors = candidate.run_for_election()
        gevent.spawn(pump_elections, elected)
        log.info("campaigning for %r as %r", candidate.key, candidate.node)
        while True:
            kind, value = inbox.get()
            if kind == "elected" and value and not running and not stopping:
                log.info("elected (term %s): starting %s", candidate.term, " ".join(args.command))
                try:
                    group.start(args.command, _command_env(candidate))
                except OSError as exc:
                    _say_error(f"cannot run {args.command[0]}: {exc.strerror or exc}")
                    return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
                running = True
                gevent.spawn(lambda g=group: inbox.put(("exit", g.wait())))
            elif kind == "elected" and not value and running:
                log.warning("leadership lost: terminating the command")
                lost = True
                group.end(args.grace)
            elif kind == "exit":
                group.end(args.grace)  # what the command left running in its group
                running = False
                if lost and not args.restart:
                    return EXIT_LEADERSHIP_LOST
                if args.restart and not stopping:
                    lost = False
                    group = new_group()
                    candidate.resign()
                    continue
                return value
            elif kind == "signal":
                stopping = True
                if not running:
                    return 128 + value
                group.signal(value)  # the command's exit ends the loop
            elif kind == "watchdog" and value is group:
                if not running:
                    log.warning("the watchdog of the command's process group died; starting another")
                    group.end(args.grace)
                    group = new_group()
                    continue
                _say_error("the watchdog of the command's process group died: ending the command")
                return EXIT_STORE_ERROR
            elif kind == "ended":
                for error in errors:
                    _say_error(f"store error: {error}")
                return EXIT_STORE_ERROR
    finally:
        try:
            group.end(args.grace)  # whatever ends run ends the command first...
        finally:
            candidate.stop()  # ...and only then releases the key
            store.close()


# -- greenleader leader / watch -------------------------------------------------------------


def cmd_leader(args: argparse.Namespace) -> int:
    store = _store(args.store)
    try:
        info = Follower(store, args.key).leader_info()
    finally:
        store.close()
    if args.json:
        _say(json.dumps({"key": args.key, "leader": info.node if info else None, "term": info.term if info else None}))
    elif info is not None:
        _say(info.node)
    return 0 if info is not None else 1


def cmd_watch(args: argparse.Namespace) -> int:
    store = _store(args.store)
    follower = Follower(store, args.key)
    leaders, errors = follower.follow_election()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, follower.stop)
    try:
        for leader in leaders:
            stamp = time.strftime("%H:%M:%S")
            _say(f"{stamp} {leader}" if leader is not None else f"{stamp} (no leader)")
        for error in errors:
            _say_error(f"store error: {error}")
            return EXIT_STORE_ERROR
        return 0
    finally:
        follower.stop()
        store.close()


# -- greenleader demo -------------------------------------------------------------------------


def cmd_candidate(args: argparse.Namespace) -> int:
    """Hidden helper of the demo: a candidate process reporting JSON lines on stdout."""
    store = _store(args.store)
    candidate = Candidate(store, args.key, args.node, ttl=args.ttl)
    gevent.signal_handler(signal.SIGTERM, candidate.stop)
    elected, errors = candidate.run_for_election()
    for is_leader in elected:
        _say(json.dumps({"node": args.node, "leader": is_leader, "term": candidate.term, "t": time.monotonic()}))
    for error in errors:
        _say_error(str(error))
        return EXIT_STORE_ERROR
    return 0


class _DemoNode:
    """One demo candidate process, reporting its elections on ``wins``."""

    def __init__(self, name: str, url: str, key: str, wins: Queue) -> None:
        self.name = name
        command = [sys.executable, "-m", "greenleader", "_candidate", "--store", url, "--key", key, "--node", name]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.ready = gevent.event.Event()  # set once it campaigns (its first report)
        self.reader = gevent.spawn(self._read, wins)

    def _read(self, wins: Queue) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            report = json.loads(line)
            self.ready.set()
            if report["leader"]:
                wins.put((self, report["term"], report["t"]))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)
        self.process.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    directory = tempfile.mkdtemp(prefix="greenleader-demo-")
    url, key = f"file://{directory}", "demo/leader"
    wins: Queue = Queue()
    names = (f"node-{number}" for number in itertools.count(1))
    nodes: list[_DemoNode] = []
    figures: dict[str, list[float]] = {"crash failover": [], "graceful handover": []}
    _say(f"greenleader demo: {args.nodes} candidate processes on the file store in {directory}")
    try:
        nodes = [_DemoNode(next(names), url, key, wins) for _ in range(args.nodes)]
        leader, term, _ = wins.get(timeout=30)
        _say(f"  {leader.name} (pid {leader.process.pid}) leads with term {term}")
        for _ in range(args.rounds):
            for signum, kind in ((signal.SIGKILL, "crash failover"), (signal.SIGTERM, "graceful handover")):
                for node in nodes:
                    if not node.ready.wait(timeout=30):
                        raise GreenleaderError(f"{node.name} did not start")
                start = time.monotonic()
                leader.signal(signum)
                nodes.remove(leader)
                successor, term, won_at = wins.get(timeout=30)
                figures[kind].append(won_at - start)
                _say(
                    f"  {signal.Signals(signum).name} {leader.name}: {successor.name} leads with term {term} "
                    f"after {(won_at - start) * 1000:.1f} ms ({kind})"
                )
                leader = successor
                nodes.append(_DemoNode(next(names), url, key, wins))  # keep the field full
        for kind, values in figures.items():
            _say(_summary(kind, values))
        return 0
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _summary(label: str, figures: Sequence[float]) -> str:
    millis = [f * 1000 for f in figures]
    return f"{label}: median {statistics.median(millis):.1f} ms, max {max(millis):.1f} ms over {len(millis)} trials"


# -- entry point ------------------------------------------------------------------------------


def _say_error(message: str) -> None:
    print(f"greenleader: {message}", file=sys.stderr, flush=True)


_RUN_EPILOG = """\
The command never outlives the leadership: it runs in a process group of its own, which gets
SIGTERM (then SIGKILL after --grace) when leadership is lost, on a store or internal error and
after the command exits (for what it left running), and SIGKILL from a watchdog if greenleader
itself dies (SIGKILL included). SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM and
the other signals that end a process are passed on to the whole group, and greenleader then
exits when the command does; signals ignored at start stay ignored. SIGTSTP stops the group too.

The command's environment gets GREENLEADER_KEY, GREENLEADER_NODE and GREENLEADER_TERM, the
fencing term to pass to the systems it writes to.

exit status: the command's (128+N if it died of signal N); 1 store or internal error; 2 bad
usage; 3 leadership lost; 126/127 command not executable/not found; 128+N signal N arrived
before the command started."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greenleader", description="Leader election for gevent applications.")
    parser.add_argument("--version", action="version", version=f"greenleader {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    def with_store(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--key", required=True, help="election key")
        sub.add_argument("--store", help="store URL, with TLS and credential options in its query (default: "
                         "$GREENLEADER_STORE, else the file store in the user's runtime directory)")
        return sub

    demo = commands.add_parser("demo", help="show elections, failover and handover between local processes")
    demo.add_argument("--nodes", type=_count, default=3, help=argparse.SUPPRESS)
    demo.add_argument("--rounds", type=_count, default=3, help="kill/stop rounds (default 3)")
    demo.set_defaults(func=cmd_demo)

    run = with_store(commands.add_parser(
        "run", help="wait to lead, then run a command while leading", epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    run.add_argument("--node", help="this candidate's name (default: HOSTNAME-PID)")
    run.add_argument("--ttl", type=float, default=15.0, help="seconds before a crashed leader is replaced")
    run.add_argument("--grace", type=_seconds, default=10.0,
                     help="seconds between SIGTERM and SIGKILL to the command's process group when it must end")
    run.add_argument("--retry", action="store_true",
                     help="campaign through store outages with jittered backoff instead of exiting 1")
    run.add_argument("--restart", action="store_true", help="campaign again and rerun the command when it exits")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=cmd_run)

    leader = with_store(commands.add_parser("leader", help="print the current leader (exit 1 if none)"))
    leader.add_argument("--json", action="store_true", help="print key, leader and term as JSON")
    leader.set_defaults(func=cmd_leader)

    watch = with_store(commands.add_parser("watch", help="print each change of leader until interrupted"))
    watch.set_defaults(func=cmd_watch)

    candidate = with_store(commands.add_parser("_candidate"))
    candidate.add_argument("--node", required=True)
    candidate.add_argument("--ttl", type=float, default=5.0)
    candidate.set_defaults(func=cmd_candidate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s greenleader %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except GreenleaderError as exc:
        _say_error(str(exc))
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_STORE_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
