"""Start a command whose whole process tree cannot outlive this process (docs/safety.md, rule 13).

``greenleader run`` must never leave its command running once it stops leading, whatever ends
it. "The command" is its whole process tree, so it runs in a process group of its own and is
signalled as a group. The group's leader is not the command but a **watchdog**: a one-line
``/bin/sh``, started before it is needed, which

- ignores every catchable signal, so that signals sent to the group act on the command only;
- blocks reading a pipe, the *lifeline*, whose only writer is this process. The pipe closes when
  this process dies in any way (SIGKILL, a crash, an abort: the kernel closes its descriptors),
  and the watchdog then sends SIGKILL to its whole group, itself included;
- being the group's leader, keeps the group's id allocated while it lives, so no kill can reach
  a recycled group.

This covers the whole tree, which ``PR_SET_PDEATHSIG`` (direct child only) does not, and works on
any POSIX system. It costs nothing at the command's start: the watchdog is spawned ahead of time,
and the command is started with one ``os.posix_spawnp`` (vfork + exec in C) that joins the group
(``setpgroup``): no ``preexec_fn``, no Python code in the child.

Ending the group after the command's own exit costs little when the command left nothing
behind: ``greenleader run`` calls :func:`adopt_orphans` (Linux's ``PR_SET_CHILD_SUBREAPER``), so
every process the command leaves running is re-parented to ``greenleader run`` rather than to
init. Once the command has exited and been reaped, a process of its tree that is still alive has
a live ancestor among this process's own children; so if this process has no child but the
watchdog, nothing of the tree is left, and the group is ended without the two scans of /proc
(each 0.2-0.6 ms with ~100 processes on the host, 2-3.5 ms with ~500): one re-read of the
main thread's list of children, ~0.03 ms, from a descriptor kept open.
Orphans adopted this way are reaped by gevent's SIGCHLD handler (libev's ``waitpid(-1)``).

Limits: a process that leaves the group (``setsid`` or ``setpgid``, as daemons that detach do)
escapes it; run such commands in the foreground, or under a cgroup (systemd
``KillMode=control-group``). The command is not in the terminal's foreground group, so if it
reads the terminal it is stopped by SIGTTIN, as under ``timeout``. File descriptors that this
process inherited as inheritable are passed on to the command, as ``exec`` would; greenleader's
own descriptors are close-on-exec.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.os
from gevent import monkey

from .errors import GreenleaderError

log = logging.getLogger(__name__)

SHELL = "/bin/sh"

_UNTRAPPED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT}
#: The watchdog: ignore every signal that can be ignored, say it is ready, wait for the lifeline to
#: close, then SIGKILL the group. ``read`` returns at end of file (or on a line, never written).
_WATCHDOG = (
    f"trap '' {' '.join(str(int(s)) for s in sorted(signal.valid_signals()) if s not in _UNTRAPPED)}; "
    "echo; read -r line; kill -s KILL 0"
)
#: Signals this process ignores that the command should get at their default (as CPython's
#: ``restore_signals``); any other signal ignored when ``greenleader run`` started stays ignored.
_RESTORED = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))
_PR_SET_CHILD_SUBREAPER = 36  # prctl option, <linux/prctl.h> (Linux 3.4)
_READY_TIMEOUT = 10.0  # seconds for a /bin/sh to start and run `trap`
_KILL_TIMEOUT = 10.0  # seconds for SIGKILLed processes to be gone
#: The unpatched ``os.posix_spawn(p)``: gevent's own (after ``monkey.patch_all``) adds a second
#: child watcher per process, for its ``os.waitpid``, which nothing here calls; that watcher's
#: bookkeeping ran on both ends of a handover (after the new command's start, and when the
#: command's exit is seen). A group's processes are watched by its own child watchers only.
_posix_spawn = monkey.get_original("os", "posix_spawn")
_posix_spawnp = monkey.get_original("os", "posix_spawnp")


_adopting = False  # whether adopt_orphans() made this process its descendants' reaper
_children_file: tuple[int, int] | None = None  # (pid, descriptor of its main thread's children list)


def adopt_orphans() -> bool:
    """Make this process the reaper of the orphans of its descendants (Linux only; True if it
    is). :meth:`CommandGroup.end` then knows without a scan of /proc whether the command left
    anything running. Process-wide and not inherited by children: for ``greenleader run``, not
    for a library's host process."""
    global _adopting, _children_file
    if not _adopting and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _adopting = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            if _adopting:
                pid = os.getpid()
                _children_file = (pid, os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC))
        except (OSError, AttributeError):
            pass  # without the list of children, CommandGroup.end scans /proc
    return _adopting


class CommandGroup:
    """A process group guarded by a watchdog, for one run of one command.

    Create it ahead of time (the watchdog starts at once), :meth:`start` the command when it is
    needed, and :meth:`end` it, always: ``end`` leaves no process of the group behind.
    ``watchdog_lost`` is set if the watchdog died while the group was in use: nothing then
    guards the command against a SIGKILL of this process.
    """

    def __init__(self) -> None:
        self.pid: int | None = None  # the command's own process, once started
        self.watchdog_lost = gevent.event.Event()
        self._exit: gevent.event.AsyncResult[int] = gevent.event.AsyncResult()
        self._exit_callbacks: list[Callable[[int], object]] = []
        self._ended = False
        self._ending = False  # end() is ending the group the long way (SIGTERM, grace, SIGKILL)
        self._end_done = gevent.event.Event()  # ...and is done
        self._kill_by = float("inf")  # SIGKILL by then at the latest (see end)
        self._hastened = gevent.event.Event()  # _kill_by was brought forward
        self._settled = False  # ended when only the watchdog was left (see end)
        self._spared = False  # ...and the watchdog not killed yet (see end_if_left_nothing)
        self._watchdog_gone = gevent.event.Event()
        loop = gevent.get_hub().loop
        loop.install_sigchld()
        lifeline_read, lifeline = _pipe()
        self._lifeline: int | None = lifeline  # None once closed
        ready_read, ready_write = _pipe()
        self._ready: int | None = ready_read  # None once the watchdog said it is ready
        try:
            self.pgid = _posix_spawn(
                SHELL,
                [SHELL, "-c", _WATCHDOG, "greenleader-watchdog"],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, lifeline_read, 0), (os.POSIX_SPAWN_DUP2, ready_write, 1)],
                setpgroup=0,
                setsigmask=(),
            )
        except BaseException:
            os.close(lifeline)
            os.close(ready_read)
            raise
        finally:
            os.close(lifeline_read)
            os.close(ready_write)
        self._watchers = [loop.child(self.pgid, False)]
        self._watchers[0].start(self._on_watchdog_exit)
        # The watchdog's "ready" is read when it comes, in the hub, so that start() finds it
        # read (checking it there, with a Timeout and a read, took ~0.1 ms of the new leader's).
        self._ready_watcher = loop.io(ready_read, 1, ref=False)
        self._ready_watcher.start(self._on_ready)

    def _on_ready(self) -> None:
        """In the hub: the watchdog wrote its line, or ended (end of file: start() says so)."""
        self._ready_watcher.stop()
        if self._ready is not None and os.read(self._ready, 1) == b"\n":
            os.close(self._ready)
            self._ready = None

    def _on_watchdog_exit(self) -> None:
        self._watchdog_gone.set()
        if not self._ended:
            self.watchdog_lost.set()
        elif self._settled:
            self._close()

    def _close_pipes(self) -> None:
        self._ready_watcher.stop()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None

    def _close(self) -> None:
        """Close the pipes and stop the child watchers: the group is over."""
        self._close_pipes()
        for watcher in self._watchers:
            watcher.stop()

    def start(self, argv: list[str], env: dict[str, str], executable: str | None = None,
              allowed: Callable[[], bool] = lambda: True) -> int | None:
        """Start ``argv`` in the group once the watchdog is ready; its pid. ``OSError`` if the
        command cannot be run (``FileNotFoundError``, ``PermissionError``...). ``executable``:
        the program's path, found beforehand (else ``argv[0]`` is searched for in ``PATH`` now,
        which took 0.9 ms against 0.4 with bash in the seventh directory of ``PATH``).

        ``allowed`` is asked once the watchdog is ready, with nothing yielding from there to
        the spawn: None, and nothing started, if it says no (a tenure lost meanwhile)."""
        self._wait_ready()
        if not allowed():
            return None
        spawn = _posix_spawnp if executable is None else _posix_spawn
        self.pid = spawn(executable or argv[0], argv, env, setpgroup=self.pgid, setsigdef=_RESTORED, setsigmask=())
        watcher = gevent.get_hub().loop.child(self.pid, False)
        watcher.start(lambda: self._exited(_exit_code(watcher.rstatus)))
        self._watchers.append(watcher)
        return self.pid

    def _wait_ready(self) -> None:
        if self._ready is None:
            return
        self._ready_watcher.stop()  # (stopped already if it saw the end of the pipe)
        gevent.os.make_nonblocking(self._ready)
        with gevent.Timeout(_READY_TIMEOUT, False):  # type: ignore[arg-type]  # False: no exception
            if gevent.os.nb_read(self._ready, 1) == b"\n":
                os.close(self._ready)
                self._ready = None
                return
        raise GreenleaderError(f"the watchdog ({SHELL}) of the command's process group did not start")

    def on_exit(self, callback: Callable[[int], object]) -> None:
        """Call ``callback`` with the command's status (as :meth:`wait` returns it) once its own
        process has exited: from the child watcher's callback in the hub, without a greenlet or
        a loop iteration of its own (it is on the path of a handover), so it must not block."""
        if self._exit.ready():
            callback(self.wait())  # ready: does not block
        else:
            self._exit_callbacks.append(callback)

    def _exited(self, code: int) -> None:
        self._exit.set(code)
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            callback(code)

    def wait(self) -> int:
        """Wait for the command's own process to exit; its status (128+N if signal N killed it)."""
        code = self._exit.get()
        return 128 + signal.SIGKILL if code is None else code  # (never None: set only with a status)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the group (the watchdog ignores it)."""
        if self._watchdog_gone.is_set() and (self.pid is None or self._exit.ready()):
            return  # neither the watchdog nor the command holds the group's id: it may be recycled
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def pause(self) -> None:
        """Stop every process of the command (SIGSTOP), but not the watchdog."""
        self.signal(signal.SIGSTOP)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pgid, signal.SIGCONT)

    def end(self, grace: float, kill_by: float | None = None) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds if anything of it is left, and
        return once every process of it is gone. Idempotent; safe before :meth:`start`.

        ``kill_by``: a :func:`time.monotonic` instant by which SIGKILL is sent, whatever is left
        of ``grace`` (at once if it is past): a lost tenure's command must be gone before the
        store may give the key to another. A call made while another is ending the group
        brings that one's SIGKILL forward to its own ``kill_by``."""
        if kill_by is not None and kill_by < self._kill_by:
            self._kill_by = kill_by
            self._hastened.set()
        if self._ending:  # another greenlet is ending it (or has): return once the group is gone,
            self._end_done.wait()  # not as soon as it is marked ended (before its SIGKILL has landed)
            return
        if self._ended or self.end_if_left_nothing():
            return
        self._ending = True
        try:
            if self.pid is not None and time.monotonic() < self._kill_by and self._members() != set():
                self.signal(signal.SIGTERM)
                self.signal(signal.SIGCONT)  # a stopped process gets its SIGTERM
                if not self._gone_within(grace):
                    if time.monotonic() >= self._kill_by:
                        log.warning("the command is still running after SIGTERM and the store may soon give "
                                    "the key to another; sending SIGKILL before --grace (%gs) is over", grace)
                    else:
                        log.warning("the command ignored SIGTERM for %gs; sending SIGKILL", grace)
        finally:
            self._ended = True
            try:
                self._kill()
            finally:
                self._end_done.set()

    def end_if_left_nothing(self, spare_watchdog: bool = False) -> bool:
        """End the group at once if the command has exited leaving nothing running (see
        :meth:`_left_nothing`); whether this call ended it (not if :meth:`end` has begun or
        done so). Never blocks: for the hub too.

        Only the watchdog is left, and it gets SIGKILL; with ``spare_watchdog``, not yet: it
        guards an empty group and runs nothing, and :meth:`dismiss` (or this process's exit,
        which closes its lifeline) ends it later, so that neither the signal nor its exit is on
        the path of the key's release (~0.1-0.2 ms of CPU there)."""
        if self._ended or self._ending:
            return False
        if self.pid is None or not self._left_nothing():
            return False
        self._ended = self._settled = True
        if spare_watchdog:
            self._spared = True
        else:
            self._kill_watchdog()
        return True

    def dismiss(self) -> None:
        """End the watchdog that :meth:`end_if_left_nothing` spared, if any. Idempotent."""
        if self._spared:
            self._spared = False
            self._kill_watchdog()

    def _kill_watchdog(self) -> None:
        """SIGKILL the watchdog, alone in its group, and close the group once it has exited."""
        self.signal(signal.SIGKILL)  # only the watchdog is left: nothing else to kill or wait for
        if self._watchdog_gone.is_set():
            self._close()  # else once it has exited (SIGKILLed, it runs nothing): off the key's path

    def _gone_within(self, grace: float) -> bool:
        """Whether the command, then every other process of the group, ended within ``grace``
        (cut short at ``self._kill_by``, which another end() may bring forward meanwhile)."""
        deadline = time.monotonic() + grace

        def left() -> float:
            return min(deadline, self._kill_by) - time.monotonic()

        while not self._exit.ready() and left() > 0:
            self._hastened.clear()
            gevent.wait([self._exit, self._hastened], timeout=left(), count=1)
        interval = 0.005
        while self._exit.ready():
            members = self._members()
            if not members:  # None: no /proc, what is left of the group gets SIGKILL at once
                return True
            if left() <= 0:
                break
            self._hastened.clear()
            self._hastened.wait(min(interval, left()))  # nothing signals that the last process left a group: poll
            interval = min(interval * 2, 0.1)
        return False

    def _left_nothing(self) -> bool:
        """Whether the command has exited (and been reaped) leaving no process of its tree alive.

        Only known when this process adopts orphans (:func:`adopt_orphans`): then every process
        of the tree still alive descends from a child of this process, and only this process's
        hub reaps its children, so a child list holding nothing but this group's watchdog means
        that the tree is gone. A child in any state (a zombie orphan not yet reaped, a
        previous group's watchdog, a process that left the group) answers False, and the scans
        of /proc decide. False where the kernel does not list children."""
        if not _adopting or not self._exit.ready():
            return False
        children = _children()
        return children is not None and children <= {self.pgid}

    def _kill(self) -> None:
        """SIGKILL the group, the watchdog included, and return once no process of it is left."""
        self.signal(signal.SIGKILL)  # the watchdog included
        self._close_pipes()  # were it alive still, the watchdog would SIGKILL the group
        if self.pid is not None and not self._exit.wait(_KILL_TIMEOUT) and not self._exit.ready():
            log.error("the command (pid %d) did not end after SIGKILL", self.pid)
            self._exited(128 + signal.SIGKILL)  # so that nothing waits for it forever
        deadline = time.monotonic() + _KILL_TIMEOUT
        members = self._members()
        while members and time.monotonic() < deadline:
            gevent.sleep(0.01)  # SIGKILLed processes take a moment to exit
            members = self._members()
        if members is None:  # no /proc: the watchdog's end is the only sign that the SIGKILL landed
            self._reap_watchdog()
        else:  # the command's processes are gone: the key may go without waiting to reap the
            gevent.spawn(self._reap_watchdog)  # watchdog (SIGKILLed, it runs nothing; not the command)

    def _reap_watchdog(self) -> None:
        if not self._watchdog_gone.wait(_KILL_TIMEOUT):
            log.error("the watchdog (pid %d) of the command's process group did not end", self.pgid)
        self._close()

    def _members(self) -> set[int] | None:
        """Live processes of the group other than the watchdog; None if /proc cannot tell."""
        members = _group_members(self.pgid)
        return None if members is None else members - {self.pgid}


def _children() -> set[int] | None:
    """This process's children in any state (zombies included) on its main thread's list, read
    from a descriptor opened by :func:`adopt_orphans` (a re-read is ~0.03 ms, an open of /proc
    ~0.2 ms); None if it cannot tell. The kernel puts the orphans a subreaper adopts on its first
    live thread, the main one, whichever thread started their ancestor."""
    if _children_file is None or _children_file[0] != os.getpid():
        return None
    fd = _children_file[1]
    try:
        listing = os.pread(fd, 65536, 0)
        while listing and len(listing) % 65536 == 0 and (more := os.pread(fd, 65536, len(listing))):
            listing += more
    except OSError:
        return None
    return {int(pid) for pid in listing.split()}


def _group_members(pgid: int) -> set[int] | None:
    """Processes of group ``pgid`` that have not exited (zombies excluded), from /proc (Linux).
    One ``getpgid`` per process, and a read of /proc/PID/stat only for the group's: a scan of
    ~125 processes takes about 0.3 ms (reading every stat file took 6 ms)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = set()
    for entry in entries:
        try:
            if not entry.isdigit() or os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue  # gone meanwhile
        if stat[stat.rfind(b")") + 2 :][:1] != b"Z":
            members.add(int(entry))
    return members


def _pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose ends are above 0-2 (a dup2 onto itself would keep close-on-exec)."""
    return tuple(fd if fd > 2 else _moved_up(fd) for fd in os.pipe())  # type: ignore[return-value]


def _moved_up(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
