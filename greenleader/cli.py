"""The ``greenleader`` command: run a command as leader, show or watch the leader, demo.

``greenleader run`` never lets its command outlive its leadership (docs/safety.md, rule 13). The
command runs in a process group of its own, led by a watchdog that SIGKILLs the group as soon as
``greenleader run`` dies in any way, SIGKILL included (see ``greenleader._spawn``), and every way
out of ``run`` ends the whole group first, then releases the key (a watchdog left alone in its
group, which runs nothing, is SIGKILLed once the key is released):

- the command's exit: what it left running in its group gets SIGTERM, then SIGKILL after
  ``--grace`` seconds. On Linux ``run`` adopts (and reaps) what its command leaves behind
  (a child subreaper), so that when the command left nothing it knows so without a scan of /proc;
- loss of leadership, a store error, an internal error: the group gets SIGTERM, then SIGKILL after
  ``--grace`` seconds, or sooner once the tenure is over: by ``KILL_MARGIN`` before the store may
  give the key to another (the last renewal + TTL), however long ``--grace``;
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

The exit codes of every subcommand are in ``EXIT_CODES``; which store is used when ``--store`` is
not given is decided by ``greenleader._env``. docs/cli.md is the operator's guide.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
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
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from typing import NoReturn  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import zope.event  # type: ignore[import-untyped]  # noqa: E402
from gevent import subprocess  # noqa: E402
from gevent.queue import Empty, Queue  # noqa: E402

from . import __version__  # noqa: E402
from ._env import VARIABLES, choose_store  # noqa: E402
from ._spawn import CommandGroup, adopt_orphans  # noqa: E402
from .candidate import Candidate  # noqa: E402
from .errors import GreenleaderError, InvalidArgumentError, MissingDependencyError  # noqa: E402
from .events import LeaderChanged  # noqa: E402
from .follower import Follower  # noqa: E402
from .retry import Backoff  # noqa: E402
from .stores import Store  # noqa: E402
from .stores.base import check_float  # noqa: E402

log = logging.getLogger(__name__)

EXIT_STORE_ERROR = 1
EXIT_USAGE = 2
EXIT_LEADERSHIP_LOST = 3
EXIT_NO_LEADER = 3
EXIT_TIMEOUT = 4
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

#: Exit codes by subcommand, as --help lists them.
EXIT_CODES: dict[str, list[tuple[str, str]]] = {
    "run": [
        ("N", "the command's own exit status when it ran to its end (128+N if it died of signal N)"),
        ("1", "the store failed (unreachable, refused) or an internal error ended the command"),
        ("2", "bad usage: arguments, store URL or environment; a missing extra (pip install -e '.[EXTRA]' in a clone)"),
        ("3", "leadership was lost: the command was terminated"),
        ("4", "not elected within --timeout: the command never ran"),
        ("126", "the command is not executable"),
        ("127", "the command was not found"),
        ("128+N", "signal N arrived before the command started"),
    ],
    "leader": [
        ("0", "a node leads (its name is printed); with --json: the JSON answer, leader or none"),
        ("1", "the store could not be read (unreachable, refused)"),
        ("2", "bad usage, as for run"),
        ("3", "no node leads (without --json)"),
    ],
    "watch": [
        ("0", "interrupted (SIGINT or SIGTERM)"),
        ("1", "the store failed (without --retry)"),
        ("2", "bad usage, as for run"),
    ],
    "demo": [("0", "the demo ran"), ("1", "a demo process failed"), ("2", "bad usage")],
}

DEFAULT_TTL = 15.0  # seconds: the library's default; a crashed leader is replaced after about this long
DEFAULT_GRACE = 10.0  # seconds between SIGTERM and SIGKILL: systemd's and docker's habit is 10 s or more
#: Seconds before a lost tenure's hold on the key ends (its last renewal + TTL) at which its
#: command gets SIGKILL, whatever is left of --grace: room for the kill to land and the
#: processes to exit on a busy host before the store may give the key to another. At most half
#: the time from the renew deadline to the TTL, so that a short TTL still leaves a loss at the
#: deadline some SIGTERM grace (a third of a second at --ttl 1 leaves it 1/6 s).
KILL_MARGIN = 1.0
DEMO_TTL = 5.0  # seconds: a demo candidate's TTL (the file store frees a crashed holder at once anyway)
DEMO_WAIT = 30.0  # seconds a demo waits for a process to start or win, on a loaded machine
#: ``--restart`` waits this backoff before campaigning again after the command exits: from 0.5-1 s,
#: doubling, to 15-30 s (jittered, so that a fleet does not restart in step). A crash loop starts
#: the command at most about twice a minute once the cap is reached.
RESTART_BACKOFF = Backoff(initial=1.0, maximum=30.0, multiplier=2.0, jitter=0.5)
#: A run of the command at least this long resets the backoff: it started well, so its next
#: exit is news, not a crash loop (systemd judges restarts over 10 s, too).
RESTART_RESET_AFTER = 10.0

#: Signals that ``greenleader run`` passes on to the command's process group, ending when it does.
FORWARDED = tuple(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                 "SIGPROF", "SIGXCPU", "SIGIO", "SIGPWR", "SIGSTKFLT")
    if hasattr(signal, name)
)


def _store(args: argparse.Namespace) -> Store:
    """The store of ``--store``, else the one the environment names (see greenleader._env)."""
    return choose_store(args.store).make()


def _seconds(text: str) -> float:
    """argparse type: a finite, non-negative number of seconds."""
    try:
        return check_float("seconds", text, minimum=0.0, maximum=86400.0)
    except GreenleaderError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0."""
    try:
        return check_float("seconds", text, minimum=0.0, maximum=86400.0, inclusive=False)
    except GreenleaderError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(low: int) -> Callable[[str], int]:
    """argparse type: a whole number from ``low`` to 100."""

    def count(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= number <= 100:
            raise argparse.ArgumentTypeError(f"must be from {low} to 100, not {number}")
        return number

    return count


def _default_node() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _say_error(message: str) -> None:
    print(f"greenleader: {message}", file=sys.stderr, flush=True)


# -- greenleader run ----------------------------------------------------------------------


def _handle(signum: int, handler, *args) -> None:
    """Handle ``signum`` unless it was ignored when this process started (``nohup``, a background
    job): then it stays ignored, here and in the command."""
    if signal.getsignal(signum) is not signal.SIG_IGN:
        gevent.signal_handler(signum, handler, *args)


def _loss_kill_by(candidate: Candidate) -> float:
    """When a lost tenure's command must get SIGKILL: before the store may give the key away."""
    return candidate._held_until - min(KILL_MARGIN, (candidate.ttl - candidate.renew_deadline) / 2)


def _command_env(environ: dict[str, str], candidate: Candidate) -> dict[str, str]:
    """The command's environment: ``environ`` (this one, copied before the election: copying
    ``os.environ`` takes ~0.1 ms, on the new leader's path), plus the key, node and fencing term
    it leads with."""
    return {**environ, "GREENLEADER_KEY": candidate.key, "GREENLEADER_NODE": candidate.node,
            "GREENLEADER_TERM": str(candidate.term)}


class _Restarts:
    """When ``--restart`` campaigns again: a jittered exponential backoff, reset by a long run."""

    def __init__(self, backoff: Backoff = RESTART_BACKOFF, reset_after: float = RESTART_RESET_AFTER) -> None:
        self.backoff = backoff
        self.reset_after = reset_after
        self._delays: Iterator[float] = backoff.delays()

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.reset_after:
            self._delays = self.backoff.delays()
        return next(self._delays)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise InvalidArgumentError("no command given: greenleader run --key K -- CMD ...")
    store = _store(args)
    node = args.node if args.node is not None else _default_node()
    candidate = Candidate(store, args.key, node, ttl=args.ttl, retry=args.retry)
    # The candidate's own queue of elections is the loop's inbox (a win then reaches the loop with
    # no greenlet in between: ~0.1 ms of the new leader's path): True or False from the candidate,
    # StopIteration when its campaign ended, and the tuples ("exit", code) | ("signal", n) |
    # ("watchdog", group) | ("timeout", wait number) from the rest.
    inbox: Queue
    restarts = _Restarts()
    collecting = gc.isenabled()
    environ = dict(os.environ)
    executable = shutil.which(args.command[0])  # found now, not on the way to the command's start
    adopt_orphans()  # the command's exit then ends its group without scanning /proc (see _spawn)

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

    def exited(code: int) -> None:
        """In the hub (the child watcher's callback): the command exited. Unless ``--restart``
        or a loss is being handled, that ends ``run``: when the command left nothing running,
        the group is ended and the candidate starts to step down and release right here,
        before the loop wakes (the loop's turn and the wake-up of the campaign greenlet were
        ~0.2-0.4 ms of CPU on the path of a handover). The loop then waits for the release."""
        nonlocal running, stopping
        if not args.restart:
            gc.disable()  # run ends within moments: no collection (0.3-0.8 ms each) on the release's path
            if not lost and group.end_if_left_nothing(spare_watchdog=True):  # dismissed after the release
                running = False  # so the loop takes the step-down's False, before ("exit"), for no loss
                stopping = True  # and starts no command on a True it had not read yet
                candidate._stop_soon()
        inbox.put(("exit", code))

    def end_before_release() -> None:
        """A step-down hook (in the teardown greenlet, before the release): whatever ended the
        tenure (a loss, the renew deadline after a pause, a stop), the key is released only
        once the running command's group is gone, so that no next leader's command starts
        beside it. The loop ends the group too, on the step-down's False; both wait.

        Renewals have stopped, so the store keeps the key only until the last one's hold ends:
        the group gets SIGKILL before then (:data:`KILL_MARGIN`), however long ``--grace``."""
        if running:
            group.end(args.grace, kill_by=_loss_kill_by(candidate))

    candidate._step_down_hooks.append(end_before_release)
    waits = itertools.count(1)

    def start_waiting(after: float = 0.0) -> tuple[int, gevent.Greenlet | None]:
        """A new wait to lead; with --timeout, a timer that ends it unless elected first."""
        number = next(waits)
        if args.timeout is None:
            return number, None
        return number, gevent.spawn_later(after + args.timeout, inbox.put, ("timeout", number))

    group = new_group()  # (its watchdog_lost callback runs in the hub, once the loop waits on inbox)
    running = lost = stopping = False
    started_at = 0.0
    timer: gevent.Greenlet | None = None
    try:
        # Nothing yields before the loop's first get(): the campaign starts there, once the
        # signal handlers are in place.
        inbox, errors = candidate.run_for_election()
        for signum in FORWARDED:
            _handle(signum, inbox.put, ("signal", signum))
        _handle(signal.SIGTSTP, suspend)
        wait, timer = start_waiting()
        log.info("campaigning for %r as %r", candidate.key, candidate.node)
        while True:
            item = inbox.get()
            kind, value = item if isinstance(item, tuple) else ("elected", item) if isinstance(item, bool) \
                else ("ended", None)
            if kind == "elected" and value and not running and not stopping:
                term = candidate.term
                try:
                    # The watchdog may still be starting (start waits for it): a loss meanwhile
                    # releases the key, and then this tenure's command must not start. The
                    # check and the spawn have no yield between them.
                    if group.start(args.command, _command_env(environ, candidate), executable,
                                   allowed=lambda term=term: candidate.is_leader() and candidate.term == term) is None:
                        continue  # the step-down's False follows
                except OSError as exc:
                    _say_error(f"cannot run {args.command[0]}: {exc.strerror or exc}")
                    return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
                if timer is not None:
                    timer.kill(block=False)
                    timer = None
                started_at = time.monotonic()
                log.info("elected (term %s): started %s (pid %s)", candidate.term, " ".join(args.command), group.pid)
                running = True
                group.on_exit(exited)
            elif kind == "elected" and not value and running:
                log.warning("leadership lost: terminating the command")
                lost = True
                group.end(args.grace, kill_by=_loss_kill_by(candidate))
            elif kind == "exit":
                group.end(args.grace)  # what the command left running in its group
                running = False
                if lost and not args.restart:
                    return EXIT_LEADERSHIP_LOST
                if args.restart and not stopping:
                    ran_for = time.monotonic() - started_at
                    delay = restarts.next_delay(ran_for)
                    level = logging.WARNING if value != 0 or lost else logging.INFO
                    how = "was terminated on the loss of leadership" if lost else f"exited with status {value}"
                    log.log(level, "the command %s after %.1f s; campaigning again in %.1f s (--restart)",
                            how, ran_for, delay if not lost else 0.0)
                    group = new_group()
                    if not lost:  # after a loss the campaign is already on
                        candidate.resign_holdoff = delay
                        candidate.resign()
                    lost = False
                    wait, timer = start_waiting(after=delay)
                    continue
                return value
            elif kind == "timeout" and value == wait and not running:
                _say_error(f"not elected for {args.key!r} within {args.timeout:g} s (--timeout)")
                return EXIT_TIMEOUT
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
        if timer is not None:
            timer.kill(block=False)
        try:
            group.end(args.grace)  # whatever ends run ends the command first...
        finally:
            candidate.stop()  # ...and only then releases the key
            group.dismiss()  # a watchdog spared by exited(), if any
            store.close()
            if collecting:
                gc.enable()  # (main() called from Python goes on)


# -- greenleader leader / watch -------------------------------------------------------------


def cmd_leader(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        info = Follower(store, args.key).leader_info()
    finally:
        store.close()
    if args.json:
        _say(json.dumps({"key": args.key, "leader": info.node if info else None, "term": info.term if info else None}))
        return 0
    if info is None:
        return EXIT_NO_LEADER
    _say(info.node)
    return 0


def _watch_line(event: LeaderChanged, as_json: bool) -> str:
    if as_json:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return json.dumps({"time": stamp, "key": event.key, "leader": event.leader, "term": event.term,
                           "known": event.known})
    stamp = time.strftime("%H:%M:%S")
    if event.leader is not None:
        return f"{stamp} {event.leader} (term {event.term})"
    return f"{stamp} {'(no leader)' if event.known else '(leader unknown: the store cannot confirm it)'}"


def cmd_watch(args: argparse.Namespace) -> int:
    store = _store(args)
    follower = Follower(store, args.key, retry=args.retry)

    def show(event: object) -> None:
        if isinstance(event, LeaderChanged) and event.source is follower:
            _say(_watch_line(event, args.json))

    zope.event.subscribers.append(show)
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, follower.stop)
    try:
        leaders, errors = follower.follow_election()
        for _ in leaders:
            pass  # each change is printed by show(), with its term
        follower.stop()  # delivers the events still pending
        for error in errors:
            _say_error(f"store error: {error}")
            return EXIT_STORE_ERROR
        return 0
    finally:
        follower.stop()
        zope.event.subscribers.remove(show)
        store.close()


# -- greenleader demo -------------------------------------------------------------------------


def cmd_candidate(args: argparse.Namespace) -> int:
    """Hidden helper of the demo: a candidate process reporting JSON lines on stdout."""
    store = _store(args)
    candidate = Candidate(store, args.key, args.node, ttl=DEMO_TTL)
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


def _next_win(wins: Queue) -> tuple[_DemoNode, int, float]:
    try:
        return wins.get(timeout=DEMO_WAIT)
    except Empty:
        raise GreenleaderError(f"no demo process won within {DEMO_WAIT:g} s") from None


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
        leader, term, _ = _next_win(wins)
        _say(f"  {leader.name} (pid {leader.process.pid}) leads with term {term}")
        for _ in range(args.rounds):
            for signum, kind in ((signal.SIGKILL, "crash failover"), (signal.SIGTERM, "graceful handover")):
                for node in nodes:
                    if not node.ready.wait(timeout=DEMO_WAIT):
                        raise GreenleaderError(f"{node.name} did not start")
                start = time.monotonic()
                leader.signal(signum)
                nodes.remove(leader)
                successor, term, won_at = _next_win(wins)
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


# -- the parser -------------------------------------------------------------------------------


def _exit_codes(*commands: str) -> str:
    lines = []
    for command in commands:
        if len(commands) > 1:
            lines.append(f"  {command}:")
        indent = "    " if len(commands) > 1 else "  "
        lines += [f"{indent}{code:<6} {meaning}" for code, meaning in EXIT_CODES[command]]
    return "exit status:\n" + "\n".join(lines)


def _environment(choice: str) -> str:
    families = "\n".join(textwrap.fill(f"{backend}: {', '.join(names)}", 94, initial_indent="  ",
                                       subsequent_indent="    ") for backend, names in VARIABLES.items())
    return f"""\
store: --store URL wins; else $GREENLEADER_STORE (a URL); else the environment of the store's
own tools, selected by CONSUL_HTTP_ADDR, ETCDCTL_ENDPOINTS or ZOOKEEPER_HOSTS (kazoo's
hosts string, h1:2181,h2:2181[/chroot]; two of them set is a usage error); else the file
store. Variables read:
{families}
Now: {choice}"""


def _current_choice() -> str:
    """Which store a command without --store would use now, for --help."""
    try:
        return choose_store(None).describe()
    except GreenleaderError as exc:
        return f"none: {exc}"


_RUN_EPILOG = """\
The command never outlives the leadership: it runs in a process group of its own, which gets
SIGTERM (then SIGKILL after --grace) when leadership is lost, on a store or internal error and
after the command exits (for what it left running), and SIGKILL from a watchdog if greenleader
itself dies (SIGKILL included). On a loss, SIGKILL comes sooner if --grace would outlast the
store's hold of the key: a second before it may go to another (the last renewal + --ttl).
SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM and the other signals that end a
process are passed on to the whole group, and greenleader then exits when the command does;
signals ignored at start stay ignored. SIGTSTP stops the group too. The key is released only
once every process of the command is gone.

The command's environment gets GREENLEADER_KEY, GREENLEADER_NODE and GREENLEADER_TERM, the
fencing term to pass to the systems it writes to.

--restart: after the command exits, greenleader stands aside for a jittered backoff (0.5-1 s,
doubling up to 15-30 s; back to the start after a run of {reset:g} s or more), logs the exit
status and the delay, then campaigns again and reruns the command once elected."""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The public parser, and the hidden ``_candidate`` one (kept out of the public choices)."""
    choice = _current_choice()
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log what happens (INFO), each line naming its logger")
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="greenleader", description="Leader election for gevent applications.", formatter_class=raw,
        epilog=f"{_exit_codes('run', 'leader', 'watch', 'demo')}\n\n{_environment(choice)}\n\n"
               "greenleader COMMAND --help tells more. docs/cli.md is the operator's guide.",
    )
    parser.add_argument("--version", action="version", version=f"greenleader {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what happens (INFO), each line naming its logger")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    def with_store(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--key", required=True, help="election key (required)")
        sub.add_argument("--store", metavar="URL",
                         help="store URL, with TLS and credential options in its query "
                              f"(default: see below; now {choice})")
        return sub

    def subcommand(name: str, summary: str, epilog: str = "") -> argparse.ArgumentParser:
        text = "\n\n".join(part for part in (epilog, _exit_codes(name),
                                             _environment(choice) if name != "demo" else "") if part)
        return commands.add_parser(name, help=summary, description=summary, epilog=text, formatter_class=raw,
                                   parents=[verbose])

    demo = subcommand("demo", "show elections, failover and handover between local processes")
    demo.add_argument("--nodes", type=_count(2), default=3, metavar="N",
                      help="candidate processes, from 2 (default: %(default)s)")
    demo.add_argument("--rounds", type=_count(1), default=3, metavar="N",
                      help="kill and stop rounds (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    run = with_store(subcommand("run", "wait to lead, then run a command while leading",
                                _RUN_EPILOG.format(reset=RESTART_RESET_AFTER)))
    run.add_argument("--node", help="this candidate's name (default: HOSTNAME-PID)")
    run.add_argument("--ttl", type=float, default=DEFAULT_TTL, metavar="SECONDS",
                     help="seconds before a crashed leader is replaced (default: %(default)g; Consul: 10 at least)")
    run.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                     help="seconds between SIGTERM and SIGKILL to the command's process group when it must end "
                          "(default: %(default)g); on a loss, cut short a second before the store may give the "
                          "key away")
    run.add_argument("--timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                     help="give up (exit 4) if not elected within SECONDS; with --restart, each wait to lead "
                          "again after the backoff (default: wait as long as it takes)")
    run.add_argument("--retry", action="store_true",
                     help="campaign through store outages with jittered backoff instead of exiting 1 (default: off)")
    run.add_argument("--restart", action="store_true",
                     help="campaign again after a backoff and rerun the command when it exits (default: off)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=cmd_run)

    leader = with_store(subcommand("leader", "print the current leader (exit 3 if none)"))
    leader.add_argument("--json", action="store_true",
                        help='print {"key", "leader", "term"} as JSON, "leader": null when none (exit 0 both ways)')
    leader.set_defaults(func=cmd_leader)

    watch = with_store(subcommand("watch", "print each change of leader, with its term, until interrupted"))
    watch.add_argument("--json", action="store_true",
                       help='print one JSON object per change: {"time", "key", "leader", "term", "known"}')
    watch.add_argument("--retry", action="store_true",
                       help="keep watching through store outages (printing the leader as unknown) instead of "
                            "exiting 1 (default: off)")
    watch.set_defaults(func=cmd_watch)

    hidden = argparse.ArgumentParser(prog="greenleader _candidate", parents=[verbose])
    with_store(hidden).add_argument("--node", required=True)
    hidden.set_defaults(func=cmd_candidate, subcommand="_candidate")
    return parser, hidden


def main(argv: Sequence[str] | None = None) -> int:
    """The ``greenleader`` command; its exit status. Called with ``argv`` None (the command
    line), it leaves the process at once when the command is done (see :func:`_exit_at_once`)."""
    if argv is None:
        _exit_at_once(_main(sys.argv[1:]))
    return _main(list(argv))


def _exit_at_once(code: int) -> NoReturn:
    """Leave without the interpreter's teardown: by now the command's group is gone, the key
    released and the store closed, and the teardown (a full garbage collection of ~35-60 ms of
    CPU with gRPC or kazoo loaded, plus their shutdown: ~150 ms in all) would compete for the CPU
    with the next leader starting its command on the same host."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _main(argv: list[str]) -> int:
    parser, hidden = _parser()
    args = hidden.parse_args(argv[1:]) if argv[:1] == ["_candidate"] else parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except (InvalidArgumentError, MissingDependencyError) as exc:
        _say_error(str(exc))
        return EXIT_USAGE
    except GreenleaderError as exc:
        _say_error(str(exc))
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_STORE_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


__all__ = ["EXIT_CODES", "main"]
