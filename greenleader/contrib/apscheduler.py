"""Run an APScheduler ``GeventScheduler``'s jobs on the leader only.

APScheduler's FAQ tells gunicorn users that a scheduler in every worker runs every job once per
worker, and that the only way out is a single dedicated process. With greenleader, every worker
keeps its own scheduler, and only the worker that leads runs it::

    from apscheduler.schedulers.gevent import GeventScheduler
    from greenleader.contrib.apscheduler import LeaderScheduler, current_term

    scheduler = GeventScheduler()
    leader_jobs = LeaderScheduler(scheduler)   # a duty in greenleader.duties.duties

    @scheduler.scheduled_job("interval", seconds=10)
    def report() -> None:
        send_report(fencing_token=current_term())  # the store rejects writes of older terms

What it does, tenure by tenure:

- **On a win** the duty starts the scheduler (``start()``, the first time) or resumes it.
- **On a loss** (expiry, deadline, store error, resign, stop, SIGTERM), the duty is killed
  *before the key is released*, like every duty (see docs/safety.md): it pauses the scheduler
  (or shuts it down, ``on_loss="shutdown"``), then kills the jobs still running with
  :class:`gevent.GreenletExit` and waits for them (up to ``JOB_KILL_GRACE``). Only then does the
  candidate release the key and let another worker win.
- **Each job knows its tenure**: :func:`current_term` is the fencing term of the tenure the job
  started in, and :meth:`LeaderScheduler.leads` tells whether that tenure still holds.
- **No job starts outside a tenure**, whatever happens to the scheduler: the jobs run in a
  :class:`LeaderExecutor`, which runs a job only while its term still leads (a scheduler that
  someone resumed by hand, or a due job submitted while the loss was on its way, is skipped).

The scheduler's executors must all be :class:`LeaderExecutor` (a thread or process pool could
not be stopped at a loss): ``LeaderScheduler`` installs one as ``"default"`` unless the scheduler
already has a ``"default"`` executor, and refuses any other kind. Job stores are the
scheduler's business: with the default memory store each worker keeps its own copy of the
schedule; with a shared store (SQLAlchemy, Redis) only the leader's scheduler touches it, and
``on_loss="shutdown"`` closes its connections between tenures.
Outside gunicorn, run the registry with a candidate of your own: ``duties.run(candidate)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import gevent
from gevent import Greenlet
from gevent.event import Event

from ..duties import Duties, DutyRunner, current_runner
from ..duties import duties as default_duties
from ..errors import InvalidArgumentError, MissingDependencyError

try:
    from apscheduler.executors.base import run_job
    from apscheduler.executors.gevent import GeventExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING, STATE_STOPPED
    from apscheduler.schedulers.gevent import GeventScheduler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "greenleader.contrib.apscheduler needs APScheduler 3: pip install 'APScheduler>=3.10,<4'"
    ) from exc

if TYPE_CHECKING:
    _Greenlet = Greenlet[..., Any]  # generic in gevent's stubs only
else:
    _Greenlet = Greenlet

__all__ = ["JOB_KILL_GRACE", "ON_LOSS", "LeaderExecutor", "LeaderScheduler", "current_term"]

log = logging.getLogger(__name__)

#: What a loss does to the scheduler: ``"pause"`` keeps its state for the next win (cheap);
#: ``"shutdown"`` also shuts its executors and job stores down, closing their connections (for a
#: persistent job store: APScheduler's MemoryJobStore forgets its jobs at a shutdown).
ON_LOSS = ("pause", "shutdown")
#: Seconds the jobs running at a loss get to end after GreenletExit before they are reported as
#: stuck; shorter than the duty runner's own KILL_GRACE (5 s), so the report names the job,
#: not just this duty, and the key is released right after either way.
JOB_KILL_GRACE = 4.0

#: Job greenlet -> the term it was started in (for current_term()).
_job_terms: WeakKeyDictionary[Any, int] = WeakKeyDictionary()


def current_term() -> int:
    """The fencing term of the tenure in which the calling job started.

    Works in a job run by a :class:`LeaderExecutor` and in the greenlets it spawned; raises
    :class:`~greenleader.errors.InvalidArgumentError` anywhere else. Pass it to the systems the
    job writes to, so that they refuse a write of an older term than one they have seen.
    """
    greenlet: Any = gevent.getcurrent()
    while greenlet is not None:
        term = _job_terms.get(greenlet)
        if term is not None:
            return term
        spawned_by = getattr(greenlet, "spawning_greenlet", None)  # a weak reference, or None
        greenlet = spawned_by() if spawned_by is not None else None
    raise InvalidArgumentError("current_term() is called from a job that a LeaderScheduler runs, not from here")


class LeaderExecutor(GeventExecutor):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """A ``GeventExecutor`` that runs a job only while its :class:`LeaderScheduler` leads.

    Each job run gets the term of the tenure at its submission (:func:`current_term`), and is
    skipped if that tenure no longer holds when it would start; :meth:`stop_jobs` kills the
    runs still going. Made by :class:`LeaderScheduler`.
    """

    def __init__(self, leader: LeaderScheduler) -> None:
        super().__init__()
        self.leader = leader
        self._jobs: set[_Greenlet] = set()

    @property
    def running(self) -> int:
        """How many job runs are going now."""
        return sum(1 for greenlet in self._jobs if not greenlet.dead)

    def _do_submit_job(self, job: Any, run_times: list[Any]) -> None:
        term = self.leader.term
        greenlet = Greenlet(self._run, job, run_times, term)
        greenlet.name = f"job {job.id} (term {term})"
        if term is not None:
            _job_terms[greenlet] = term
        self._jobs.add(greenlet)

        def finished(greenlet: _Greenlet) -> None:  # the scheduler's bookkeeping, as GeventExecutor's
            self._jobs.discard(greenlet)
            try:
                events = greenlet.get()
            except BaseException:
                self._run_job_error(job.id, *sys.exc_info()[1:])
            else:  # a run killed before it started returns its GreenletExit
                self._run_job_success(job.id, events if isinstance(events, list) else [])

        greenlet.link(finished)
        greenlet.start()

    def _run(self, job: Any, run_times: list[Any], term: int | None) -> list[Any]:
        events: list[Any] = []
        for run_time in run_times:
            # Checked before each run: APScheduler's run_job() catches GreenletExit like any error
            # and would go on to the next missed run time of a killed job.
            if term is None or not self.leader.leads(term):
                log.warning("job %s due at %s not run: this process does not lead (term %s)", job.id, run_time, term)
                break
            events.extend(run_job(job, job._jobstore_alias, [run_time], self._logger.name))
        return events

    def stop_jobs(self, timeout: float = JOB_KILL_GRACE) -> list[str]:
        """Kill the job runs still going and wait up to ``timeout`` seconds for them; return the
        names of those still running then (which ignored GreenletExit)."""
        running = [greenlet for greenlet in self._jobs if not greenlet.dead]
        for greenlet in running:
            greenlet.kill(block=False)
        if running:
            gevent.joinall(running, timeout=timeout)
        return [greenlet.name for greenlet in running if not greenlet.dead]


class LeaderScheduler:
    """Runs ``scheduler`` only while this process leads, as a duty in ``duties``.

    :param scheduler: a ``GeventScheduler`` that is not running yet (the duty starts it).
    :param duties: the registry to run in; default :data:`greenleader.duties.duties`, the one
        :mod:`greenleader.gunicorn` runs in every worker.
    :param on_loss: ``"pause"`` (default) or ``"shutdown"`` (see :data:`ON_LOSS`).
    :param name: the duty's name in logs.
    """

    def __init__(self, scheduler: GeventScheduler, *, duties: Duties | None = None, on_loss: str = "pause",
                 name: str = "apscheduler") -> None:
        if not isinstance(scheduler, GeventScheduler):
            raise InvalidArgumentError(
                f"LeaderScheduler needs an APScheduler GeventScheduler, not {type(scheduler).__name__}"
            )
        if scheduler.state != STATE_STOPPED:
            raise InvalidArgumentError("the scheduler is already running: let LeaderScheduler start it on a win")
        if on_loss not in ON_LOSS:
            raise InvalidArgumentError(f"on_loss must be one of {', '.join(ON_LOSS)}, not {on_loss!r}")
        if on_loss == "shutdown":
            jobstores: dict[str, Any] = scheduler._jobstores  # no public accessor in APScheduler 3
            if "default" not in jobstores or any(type(js) is MemoryJobStore for js in jobstores.values()):
                raise InvalidArgumentError(
                    'on_loss="shutdown" needs persistent job stores: a MemoryJobStore (the default) '
                    'forgets its jobs at a shutdown; use on_loss="pause"'
                )
        if duties is not None and not isinstance(duties, Duties):
            raise InvalidArgumentError(f"duties must be a greenleader Duties registry, not {type(duties).__name__}")
        self.scheduler = scheduler
        self.on_loss = on_loss
        self.duties = duties if duties is not None else default_duties
        self._runner: DutyRunner | None = None
        self._term: int | None = None
        if "default" not in self._executors():
            scheduler.add_executor(LeaderExecutor(self), "default")
        self._check_executors()
        self.duty: Callable[[int], None] = self._lead
        self.duties.register(self.duty, name=name)

    def __repr__(self) -> str:
        return f"<LeaderScheduler {self.scheduler!r} term={self.term}>"

    @property
    def term(self) -> int | None:
        """The term of the tenure the scheduler runs for now, or None when not leading."""
        term = self._term
        return term if term is not None and self.leads(term) else None

    def leads(self, term: int) -> bool:
        """True while this process still leads in tenure ``term``: check before a side effect."""
        return self._runner is not None and self._runner.leads(term)

    # -- the duty ------------------------------------------------------------------------------

    def _executors(self) -> dict[str, Any]:
        # APScheduler 3 has no public accessor for its executors.
        executors: dict[str, Any] = self.scheduler._executors
        return executors

    def _check_executors(self) -> None:
        others = sorted(alias for alias, ex in self._executors().items()
                        if not isinstance(ex, LeaderExecutor) or ex.leader is not self)
        if others:
            raise InvalidArgumentError(
                f"executors {', '.join(others)} are not this LeaderScheduler's LeaderExecutor: their jobs "
                "could not be stopped when leadership ends"
            )

    def _lead(self, term: int) -> None:
        """The duty: run the scheduler for tenure ``term`` until the duty is killed."""
        self._runner, self._term = current_runner(), term
        try:
            self._check_executors()
            if self.scheduler.state == STATE_STOPPED:
                self.scheduler.start()
            elif self.scheduler.state == STATE_PAUSED:
                self.scheduler.resume()
            log.info("%r: running the scheduler's jobs in term %d", self, term)
            Event().wait()  # until the step-down kills this duty
        finally:
            self._term = None
            self._stand_down(term)

    def _stand_down(self, term: int) -> None:
        """Stop submitting jobs, kill those running, then pause or shut down: all before the
        duty runner lets the candidate release the key."""
        scheduler = self.scheduler
        if scheduler.state == STATE_RUNNING:
            scheduler.pause()  # does not yield: no job is submitted after this
        executors = [ex for ex in self._executors().values() if isinstance(ex, LeaderExecutor)]
        stuck = [name for executor in executors for name in executor.stop_jobs(JOB_KILL_GRACE)]
        if stuck:
            log.error("%r: jobs %s ignored GreenletExit for %gs and may still be running",
                      self, ", ".join(stuck), JOB_KILL_GRACE)
        if self.on_loss == "shutdown" and scheduler.state != STATE_STOPPED:
            scheduler.shutdown(wait=False)
        log.info("%r: scheduler %s at the end of term %d", self,
                 "shut down" if self.on_loss == "shutdown" else "paused", term)
