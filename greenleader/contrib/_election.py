"""The election outside gunicorn (a ``manage.py`` worker process, a one-off command), and
:func:`current`, the election of this process wherever it runs.

Under gunicorn the election is the worker's :class:`greenleader.gunicorn.WorkerElection`; a
worker process that runs the duties by itself (``manage.py greenleader run``) has a
:class:`ProcessElection`, which offers the same questions (``is_leader``, ``leads(term)``,
``status()``...), so that a duty or a view works unchanged in either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import GreenletExit
from gevent.event import AsyncResult, Event

from .. import gunicorn as _gunicorn
from .._election_view import ElectionView
from ..candidate import Candidate
from ..duties import Duties, DutyRunner
from ..duties import duties as default_duties
from ..errors import StoreError
from ..follower import Follower
from ..retry import Backoff
from ..status import status_document
from ..stores import Store, _redacted, from_url
from ._config import ElectionConfig

__all__ = ["LeaderOnlyOutcome", "ProcessElection", "current", "patch_gevent", "read_status", "run_as_leader"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a one-off command waits for a vacant key to be won (a few store round trips, with
#: room for a slow store) before it gives up as if another process held it.
ACQUIRE_GRACE = 10.0

_process: ProcessElection | None = None


def current() -> Any:
    """This process's election: the gunicorn worker's, else a running :class:`ProcessElection`,
    else None. Both answer ``is_leader()``, ``term``, ``leads(term)``, ``leader()``,
    ``leader_in_this_master()`` and ``status()``."""
    election = _gunicorn.current()
    return election if election is not None else _process


class ProcessElection(ElectionView):
    """Runs ``duties`` while this process leads ``config.key``: the worker-process counterpart of
    a gunicorn worker's election. Needs gevent's monkey-patching, as every greenleader process.

    :meth:`start` makes the store (retrying through outages), campaigns and follows; :meth:`stop`
    stops the duties, releases the key and closes the store.
    """

    def __init__(self, config: ElectionConfig, duties: Duties | None = None, *, retry: Backoff | None = None) -> None:
        self.config = config
        self.duties = duties if duties is not None else default_duties
        self.retry = retry or Backoff()
        self.key = config.key
        self.node = config.process_node()
        self.store: Store | None = None
        self.candidate: Candidate | None = None
        self.follower: Follower | None = None
        self.runner: DutyRunner | None = None
        self.stopping = Event()  #: set by stop(); also ends a start() that retries the store

    def __repr__(self) -> str:
        return f"<ProcessElection key={self.key!r} node={self.node!r}>"

    def start(self) -> None:
        """Make the store, campaign and follow; returns once campaigning (or stopped first).
        Raises InvalidArgumentError for bad settings; store outages are retried."""
        global _process
        delays = self.retry.delays()
        while self.store is None:
            try:
                self.store = from_url(self.config.store)
            except StoreError as exc:
                delay = next(delays)
                log.warning("%r: cannot make the store, trying again in %.1fs: %s", self, delay, exc)
                if self.stopping.wait(delay):
                    return
        self.candidate = Candidate(self.store, self.key, self.node, self.config.ttl, retry=self.retry,
                                   **self.config.candidate_options)
        self.follower = Follower(self.store, self.key, retry=self.retry)
        self.follower.follow_election()
        self.runner = self.duties.run(self.candidate)
        _process = self
        log.info("%r: campaigning on the %s store with ttl %gs; duties: %s", self, self.store.backend,
                 self.config.ttl, ", ".join(d.name for d in self.duties) or "none")

    def stop(self) -> None:
        """Stop the duties, then release the key; stop following and close the store. Idempotent."""
        global _process
        self.stopping.set()
        if self.runner is not None:
            self.runner.stop()
        elif self.candidate is not None:
            self.candidate.stop()
        self._stop_following_and_close()
        if _process is self:
            _process = None

    def leader_in_this_master(self) -> bool:
        """A worker process is its own "master": True while it leads."""
        return self.is_leader()

    def status(self) -> dict[str, Any]:
        """The same document as a gunicorn worker's ``/_greenleader``, store health included."""
        leader, term = self.leader()
        return status_document(key=self.key, node=self.node, leader=leader, term=term, is_leader=self.is_leader(),
                               candidate=self.candidate, follower=self.follower,
                               backend=self.store.backend if self.store is not None else "?",
                               stopped=self.stopping.is_set())


class LeaderOnlyOutcome:
    """What :func:`run_as_leader` did: ``ran`` (with ``value`` and ``term``; ``lost`` if the tenure
    ended under it), or not, and who ``leader`` was then."""

    def __init__(self, ran: bool, *, value: Any = None, term: int | None = None, leader: str | None = None,
                 lost: bool = False) -> None:
        self.ran, self.value, self.term, self.leader, self.lost = ran, value, term, leader, lost


def run_as_leader(func: Callable[[int], T], config: ElectionConfig, *, wait: float = 0.0,
                  store: Store | None = None) -> LeaderOnlyOutcome:
    """Run ``func(term)`` once, only while this process leads ``config.key``, then release it.

    If another process leads the key, wait up to ``wait`` seconds for it to step down, then give
    up without running (``ran`` False, ``leader`` naming the holder). ``func`` runs as a duty:
    killed with GreenletExit if the tenure ends under it (``lost`` True), always before the key is
    released. An exception from ``func`` is raised here, after the release. ``store``: use this
    store (left open) instead of making one from ``config.store``.
    """
    own_store = store is None
    store = from_url(config.store) if store is None else store
    try:
        holder = store.leader(config.key)
        if holder is not None and wait <= 0:
            return LeaderOnlyOutcome(False, leader=holder.node)
        started: AsyncResult[int] = AsyncResult()
        finished: AsyncResult[tuple[bool, Any]] = AsyncResult()
        registry = Duties(on_error="stop")

        @registry(name=getattr(func, "__qualname__", "leader-only"))
        def once(term: int) -> None:
            started.set(term)
            try:
                finished.set((True, func(term)))
            except GreenletExit:
                finished.set((False, None))
                raise
            except BaseException as exc:  # re-raised in the caller, after the release
                finished.set((False, exc))

        candidate = Candidate(store, config.key, config.process_node(), config.ttl, **config.candidate_options)
        runner = registry.run(candidate)
        try:
            try:
                term = started.get(timeout=max(wait, 0.0) + ACQUIRE_GRACE)
            except gevent.Timeout:
                info = store.leader(config.key)
                return LeaderOnlyOutcome(False, leader=info.node if info is not None else None)
            result = finished.get()
            assert result is not None
            completed, value = result
        finally:
            runner.stop()  # kills func if still running, then releases the key
        if not completed and isinstance(value, BaseException):
            raise value
        return LeaderOnlyOutcome(True, value=value, term=term, lost=not completed)
    finally:
        if own_store:
            store.close()


def patch_gevent() -> None:
    """Monkey-patch this process for gevent unless it is already (a ``manage.py`` or ``flask``
    command runs after the app was imported, as gunicorn's ``--preload`` does)."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        log.debug("monkey-patching the process for gevent")
        monkey.patch_all()


def read_status(config: ElectionConfig, duty_names: list[str], *, as_json: bool) -> tuple[str | None, str]:
    """Who leads ``config.key`` now, read from the store: ``(leader or None, text)``, the text for
    a ``status`` command (JSON, or one ``name: value`` line each). Raises StoreError when the
    store cannot be reached, another GreenleaderError for bad settings."""
    store = from_url(config.store)
    try:
        info = Follower(store, config.key).leader_info()
    finally:
        store.close()
    leader, term = (info.node, info.term) if info is not None else (None, None)
    if as_json:
        return leader, json.dumps({"key": config.key, "leader": leader, "term": term, "duties": duty_names})
    return leader, "\n".join([
        f"key:    {config.key}",
        f"store:  {_redacted(config.store)}",
        f"leader: {leader or '(none)'}",
        f"term:   {term if term is not None else '-'}",
        f"duties: {', '.join(duty_names) or '(none registered)'}",
    ])
