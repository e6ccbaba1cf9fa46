"""Leader duties: functions that run as greenlets only while a candidate leads.

>>> from greenleader.duties import duty
>>> @duty
... def scheduler(term: int) -> None:
...     while True:
...         run_due_jobs(fencing_token=term)  # downstream rejects writes of older terms
...         gevent.sleep(1)

Each registered duty is started in a greenlet of its own on every win, called with the
tenure's fencing term, and killed with :class:`gevent.GreenletExit` when the tenure ends
(loss, deadline, store error, resign or stop). Every step-down, whatever its cause, kills the
duties *before* the key is released (docs/safety.md): the candidate stops leading at once,
then waits up to ``STEP_DOWN_GRACE`` (5 s) for the duties to die, and only then lets a waiting
candidate in. A duty that ignores ``GreenletExit`` longer than that is logged as stuck and the key
is released anyway; a duty whose side effects must never outlive the tenure checks
:meth:`DutyRunner.leads` (or fences with the term) right before each of them, since a tenure can
also end by the renew deadline while the hub was blocked.

Error policy (``on_error``), for a duty that raises anything but ``GreenletExit``; the error is
always logged with its traceback and never reaches the candidate or the process:

- ``"restart"`` (default): run the duty again after a jittered exponential backoff (1 s, 2 s,
  ... up to 60 s) while the same tenure lasts;
- ``"resign"``: stop every duty and resign, so that another candidate (perhaps on a healthier
  host) takes over; this one campaigns again after the candidate's ``resign_holdoff``;
- ``"stop"``: leave this duty stopped until the next tenure; the other duties keep running.

A duty that returns is done for this tenure: it is not restarted until the next win.

In gunicorn, :mod:`greenleader.gunicorn` runs the default registry (``@duty``) in every worker;
elsewhere, ``runner = duties.run(candidate)`` campaigns and runs them, ``runner.stop()`` ends both.

A duty reaches its election with :func:`current_runner`, which never returns None (so a typed
duty needs no ``Optional`` check): ``current_runner().leads(term)`` before each side effect,
``current_runner().candidate.node`` for its name, ``current_runner().resign()`` to hand over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import gevent
from gevent import Greenlet, GreenletExit
from gevent.lock import Semaphore

from . import _fork
from .candidate import Candidate
from .errors import InvalidArgumentError
from .retry import Backoff

if TYPE_CHECKING:
    from gevent.queue import Queue

    _Greenlet = Greenlet[..., Any]  # generic in gevent's stubs only: not subscriptable at run time
else:
    _Greenlet = Greenlet

__all__ = ["ON_ERROR", "Duties", "Duty", "DutyFunction", "DutyRunner", "current_runner", "duties", "duty"]

log = logging.getLogger(__name__)

#: The error policies a duty can have (see the module docstring).
ON_ERROR = ("restart", "resign", "stop")
#: Seconds a killed duty gets to finish its ``finally`` blocks before it is reported as stuck.
KILL_GRACE = 5.0

DutyFunction = Callable[[int], Any]


@dataclass(frozen=True)
class Duty:
    """A registered duty: ``func(term)`` runs while leading; ``on_error`` is its error policy."""

    func: DutyFunction
    name: str
    on_error: str = "restart"


def _check_policy(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise InvalidArgumentError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    return on_error


class Duties:
    """A registry of duties; call it as a decorator, with or without options.

    :param on_error: the default error policy of the duties registered here.
    :param backoff: delays between restarts of a failing duty (policy ``"restart"``).
    """

    def __init__(self, *, on_error: str = "restart", backoff: Backoff | None = None) -> None:
        self.on_error = _check_policy(on_error)
        self.backoff = backoff or Backoff(initial=1.0, maximum=60.0)
        self._duties: list[Duty] = []
        self._runners: list[DutyRunner] = []

    def __iter__(self) -> Iterator[Duty]:
        return iter(list(self._duties))

    def __len__(self) -> int:
        return len(self._duties)

    @overload
    def __call__(self, func: DutyFunction, /) -> DutyFunction: ...

    @overload
    def __call__(
        self, func: None = None, /, *, name: str | None = None, on_error: str | None = None
    ) -> Callable[[DutyFunction], DutyFunction]: ...

    def __call__(
        self, func: DutyFunction | None = None, /, *, name: str | None = None, on_error: str | None = None
    ) -> DutyFunction | Callable[[DutyFunction], DutyFunction]:
        """Register ``func`` as a duty: ``@duty`` or ``@duty(name=..., on_error="resign")``."""
        if func is None:
            return lambda f: self.register(f, name=name, on_error=on_error)
        return self.register(func, name=name, on_error=on_error)

    def register(self, func: DutyFunction, *, name: str | None = None, on_error: str | None = None) -> DutyFunction:
        """Register ``func`` (called with the term); return it unchanged.

        Registering the same function twice replaces the first registration. A duty
        registered while a runner leads starts at once, for the current tenure.
        """
        if not callable(func):
            raise InvalidArgumentError(f"a duty must be callable, not {type(func).__name__}")
        entry = Duty(func, name or str(getattr(func, "__qualname__", repr(func))),
                     _check_policy(on_error or self.on_error))
        self._duties = [d for d in self._duties if d.func is not func] + [entry]
        for runner in list(self._runners):
            runner._registered(entry)
        return func

    def unregister(self, func: DutyFunction) -> None:
        """Forget ``func``; a running instance of it runs on until the tenure ends."""
        self._duties = [d for d in self._duties if d.func is not func]

    def clear(self) -> None:
        """Forget every duty (running instances run on until their tenure ends)."""
        self._duties = []

    def run(self, candidate: Candidate) -> DutyRunner:
        """Start ``candidate``'s campaign and run these duties during each of its tenures.

        The runner reads the candidate's ``elected`` queue; observe the election through
        :mod:`greenleader.events` instead.
        """
        runner = DutyRunner(self, candidate)
        self._runners.append(runner)
        runner._start()
        return runner


class DutyRunner:
    """Runs a registry's duties while ``candidate`` leads. Made by :meth:`Duties.run`."""

    def __init__(self, duties: Duties, candidate: Candidate) -> None:
        self.duties = duties
        self.candidate = candidate
        self._term: int | None = None  # the tenure the duties run for, or None
        self._running: dict[_Greenlet, Duty] = {}
        self._dying: set[_Greenlet] = set()  # killed, not yet dead
        self._reader: _Greenlet | None = None
        self._stopping = False
        self._stopped = False
        self._stop_lock = Semaphore()

    def __repr__(self) -> str:
        return f"<DutyRunner {self.candidate!r} term={self._term}>"

    def leads(self, term: int) -> bool:
        """True while the candidate still leads in tenure ``term``: check before a side effect."""
        return self.candidate.is_leader() and self.candidate.term == term

    @property
    def running(self) -> list[str]:
        """Names of the duties running now."""
        return [d.name for g, d in self._running.items() if not g.dead]

    def resign(self) -> None:
        """Stop the duties, then resign, so that another candidate takes over.

        Called from one of the duties, it ends that duty too: the resign goes on in a greenlet
        of its own and the call does not return (GreenletExit)."""
        if self._stopping:
            return
        self._leave_duty(self.resign)
        self._end_tenure()
        self.candidate.resign()

    def stop(self) -> None:
        """Stop the duties, then the candidate (which releases the key). Idempotent; a
        concurrent call waits for the first one to finish. Called from one of the duties, it
        ends that duty too (see :meth:`resign`)."""
        self._leave_duty(self.stop)
        with self._stop_lock:
            if self._stopped:
                return
            self._stopping = True
            self._end_tenure()
            self.candidate.stop()
            # From an event subscriber, the reader waits for the very event being delivered.
            if (self._reader is not None and self._reader is not gevent.getcurrent()
                    and not self.candidate._publisher.is_current()):
                self._reader.join(timeout=KILL_GRACE)
            if self in self.duties._runners:
                self.duties._runners.remove(self)
            if self._end_tenure in self.candidate._step_down_hooks:
                self.candidate._step_down_hooks.remove(self._end_tenure)
            self._stopped = True

    def _leave_duty(self, then: Callable[[], None]) -> None:
        """From a duty's own greenlet: run ``then`` elsewhere and end this duty, since a step-down
        cannot kill the greenlet that asked for it and wait for it at the same time."""
        if gevent.getcurrent() in self._running:
            gevent.spawn(then)
            raise GreenletExit

    def _after_fork_in_child(self) -> None:
        """In a forked child: the inherited duties never run there."""
        self._stopping = self._stopped = True
        self._term = None
        running, self._running = list(self._running), {}
        for greenlet in [*running, self._reader]:
            if greenlet is not None:
                greenlet.kill(block=False)

    # -- internals ----------------------------------------------------------------------

    def _start(self) -> None:
        self.candidate._step_down_hooks.append(self._end_tenure)
        _fork.register(self)
        elected, _ = self.candidate.run_for_election()
        self._reader = gevent.spawn(self._read, elected)

    def _read(self, elected: Queue[bool]) -> None:
        try:
            for is_elected in elected:
                if is_elected:
                    term = self.candidate.term
                    if term is not None and term != self._term:  # None: lost already, False follows
                        self._begin_tenure(term)
                else:
                    self._end_tenure()
        finally:
            self._end_tenure()

    def _begin_tenure(self, term: int) -> None:
        self._end_tenure()
        if self._stopping:
            return
        self._term = term
        log.info("%r: leading with term %d; starting %d duties", self.candidate, term, len(self.duties))
        for entry in self.duties:
            self._spawn(entry, term)

    def _registered(self, entry: Duty) -> None:
        term = self._term
        if term is not None and not self._stopping and self.leads(term):
            self._spawn(entry, term)

    def _spawn(self, entry: Duty, term: int) -> None:
        greenlet = _DutyGreenlet(self, self._run_duty, entry, term)
        greenlet.name = f"duty {entry.name} (term {term})"
        self._running[greenlet] = entry
        greenlet.start()

    def _end_tenure(self) -> None:
        """Kill the running duties and wait (bounded) until they, and any duty another caller
        is killing at the same time, are dead."""
        self._term = None
        current = gevent.getcurrent()
        running, self._running = list(self._running), {}
        for greenlet in running:
            if not greenlet.dead and greenlet is not current:
                greenlet.kill(block=False)
                self._dying.add(greenlet)
        dying = [g for g in self._dying if not g.dead and g is not current]
        if dying:
            gevent.joinall(dying, timeout=KILL_GRACE)
        for greenlet in dying:
            if not greenlet.dead:
                log.error("%s ignored GreenletExit for %gs and may still be running", greenlet.name, KILL_GRACE)
        self._dying = {g for g in self._dying if not g.dead}

    def _run_duty(self, entry: Duty, term: int) -> None:
        delays = self.duties.backoff.delays()
        while self.leads(term):
            try:
                entry.func(term)
            except GreenletExit:
                raise
            except Exception:
                log.exception("duty %s failed in term %d (policy: %s)", entry.name, term, entry.on_error)
            else:
                log.info("duty %s finished for term %d", entry.name, term)
                return
            if entry.on_error == "stop":
                return
            if entry.on_error == "resign":
                gevent.spawn(self.resign)
                return
            gevent.sleep(next(delays))


class _DutyGreenlet(_Greenlet):
    """A duty's greenlet, which knows its runner (for :func:`current_runner`)."""

    def __init__(self, runner: DutyRunner, run: Callable[..., Any], *args: Any) -> None:
        super().__init__(run, *args)
        self.runner = runner


def current_runner() -> DutyRunner:
    """The :class:`DutyRunner` of the calling duty: its election, never None.

    Works in a duty's greenlet and in the greenlets it spawned (gevent tracks who spawned
    whom). Elsewhere (the master, a request handler, a thread) it raises
    :class:`~greenleader.errors.InvalidArgumentError`: outside a duty there is no tenure to ask about.
    """
    greenlet: Any = gevent.getcurrent()
    while greenlet is not None:
        if isinstance(greenlet, _DutyGreenlet):
            return greenlet.runner
        spawned_by = getattr(greenlet, "spawning_greenlet", None)  # a weak reference, or None
        greenlet = spawned_by() if spawned_by is not None else None
    raise InvalidArgumentError("current_runner() is called from a leader duty (or a greenlet it spawned), "
                               "not from here")


#: The default registry; ``@duty`` registers into it (greenleader.gunicorn runs it).
duties = Duties()
duty = duties
