"""Leader election in ``gunicorn -k gevent`` workers: hooks for a ``gunicorn.conf.py``.

Every worker of every master runs for election on one key; the winner runs the leader duties
(:mod:`greenleader.duties`), and every worker knows who leads (:mod:`greenleader.wsgi` shows it).
The smallest ``gunicorn.conf.py``, with the store, key and TTL in ``GREENLEADER_STORE``,
``GREENLEADER_KEY`` and ``GREENLEADER_TTL`` (seconds, default 15)::

    from greenleader.gunicorn import post_fork, worker_exit  # noqa: F401
    worker_class = "gevent"

(add ``child_exit`` to the import for Prometheus metrics in multiprocess mode: see
:mod:`greenleader.metrics`.)

The store URL carries TLS and credential options in its query (``ca_file``, ``cert_file``,
``key_file``, ``token_file``, ``user``, ``password_file``...; see docs/security.md); greenleader
never logs it or shows it on the status endpoint. Or with arguments (which take precedence over
the environment)::

    from greenleader.gunicorn import WorkerElection
    election = WorkerElection("consul://10.0.0.1:8500,10.0.0.2:8500", "myapp/scheduler", ttl=15)
    post_fork, worker_exit = election.post_fork, election.worker_exit

How it fits gunicorn's process model:

- ``post_fork`` runs in the new worker *before* the gevent worker monkey-patches, so it only
  checks the configuration and arranges for the campaign to start from a greenlet once the
  worker's loop runs (after patching, after the app is loaded). Nothing is started in the
  master, with or without ``--preload``, so no store connection is ever shared across fork.
- A worker that cannot reach the store keeps serving requests and campaigns again with
  jittered backoff (:class:`~greenleader.retry.Backoff`). A configuration error (bad URL,
  key or TTL, missing client library) makes the worker exit as one that failed to boot, so the
  master halts with the error in its log, as for an app that does not import.
- On SIGTERM (master shutdown, HUP reload, scale-down) the worker stops its duties and releases
  the key at once, while it finishes its requests: another worker takes over in a few store
  round trips. ``worker_exit`` does the same for the other ways out (``max_requests``
  recycling, SIGQUIT, a lost master) and closes the store; when the arbiter calls it for a
  worker that had already died, it does nothing. A worker killed by the arbiter's timeout
  (SIGKILL) is replaced after the store's TTL.

Node names are ``host:master-pid:worker-pid``. Handlers subscribed with ``zope.event`` to
:mod:`greenleader.events` get this worker's election events, in a greenlet of their own (one
that raises is logged); the duty runner reads the candidate's ``elected`` queue itself.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import gevent
from gevent import Greenlet

from ._election_view import ElectionView
from .candidate import Candidate
from .duties import Duties, DutyRunner, duty
from .duties import duties as default_duties
from .errors import GreenleaderError, InvalidArgumentError, StoreError
from .follower import Follower
from .retry import Backoff
from .status import Record, status_document
from .stores import Store, _redacted, from_url
from .stores.base import check_float, check_text

__all__ = [
    "ENV_KEY", "ENV_STORE", "ENV_TTL", "WorkerElection", "child_exit", "current", "duty", "election", "post_fork",
    "worker_exit",
]

log = logging.getLogger(__name__)

ENV_STORE = "GREENLEADER_STORE"
ENV_KEY = "GREENLEADER_KEY"
ENV_TTL = "GREENLEADER_TTL"
DEFAULT_TTL = 15.0
#: gunicorn's Arbiter.WORKER_BOOT_ERROR: a worker exiting with it makes the master halt.
WORKER_BOOT_ERROR = 3

_active: WorkerElection | None = None


def current() -> WorkerElection | None:
    """The election running in this worker process, or None (in the master, or outside gunicorn)."""
    return _active


class WorkerElection(ElectionView):
    """One candidate per gunicorn gevent worker, running ``duties`` while it leads.

    :param store: a store URL (``consul://...``, ``file:///...``) or a function that makes the
        store; it is called in each worker after monkey-patching. Default: ``$GREENLEADER_STORE``.
    :param key: the election key. Default: ``$GREENLEADER_KEY``.
    :param ttl: seconds; a killed leader is replaced after about this long (Consul: 10 s at
        least). Default: ``$GREENLEADER_TTL``, else 15.
    :param duties: the registry of leader duties; default the module-level one (``@duty``).
    :param retry: the jittered backoff between attempts after store errors (making the store,
        campaigning, following); default :class:`~greenleader.retry.Backoff()`. A worker
        always retries: it must outlive store outages.
    :param follow: also follow the election, so that every worker knows the current leader.
    :param candidate_options: ``renew_deadline``, ``renew_interval``, ``resign_holdoff`` for
        :class:`~greenleader.Candidate`.
    """

    def __init__(
        self,
        store: str | Callable[[], Store] | None = None,
        key: str | None = None,
        ttl: float | None = None,
        *,
        duties: Duties | None = None,
        retry: Backoff | None = None,
        follow: bool = True,
        **candidate_options: Any,
    ) -> None:
        if isinstance(store, Store):
            raise InvalidArgumentError(
                "pass a store URL or a function that makes the store, not a Store: a store made in "
                "the gunicorn master would be shared by every forked worker"
            )
        if store is not None and not isinstance(store, str) and not callable(store):
            raise InvalidArgumentError(f"store must be a URL or a callable, not {type(store).__name__}")
        unknown = set(candidate_options) - {"renew_deadline", "renew_interval", "resign_holdoff"}
        if unknown:
            raise InvalidArgumentError(f"unknown options: {', '.join(sorted(unknown))}")
        self._store_arg = store
        self._key_arg = key
        self._ttl_arg = check_float("ttl", ttl, minimum=0.0, inclusive=False) if ttl is not None else None
        self.duties = duties if duties is not None else default_duties
        if retry is not None and not isinstance(retry, Backoff):
            raise InvalidArgumentError(f"retry must be a greenleader.Backoff, not {type(retry).__name__}")
        self.retry = retry or Backoff()
        self.follow = follow
        self.candidate_options = candidate_options

        # Set in the worker only.
        self.store_spec: str | Callable[[], Store] | None = None
        self.key: str | None = None
        self.ttl: float | None = None
        self.node: str | None = None
        self.store: Store | None = None
        self.candidate: Candidate | None = None
        self.follower: Follower | None = None
        self.runner: DutyRunner | None = None
        self._pid: int | None = None
        self._starter: Greenlet | None = None
        self._leaving = False
        self._stopped = False
        #: Observations of making the store (before any candidate exists), for status().
        self._boot: Record | None = None

    def __repr__(self) -> str:
        return f"<WorkerElection key={self.key or self._key_arg!r} node={self.node!r}>"

    # -- gunicorn hooks ----------------------------------------------------------------------

    def post_fork(self, server: Any, worker: Any) -> None:
        """gunicorn ``post_fork`` hook: configure this worker's candidate, start it once the
        worker loop runs. Raises InvalidArgumentError (the worker fails to boot) on bad settings."""
        global _active
        from gunicorn.workers.ggevent import GeventWorker

        if not isinstance(worker, GeventWorker):
            raise InvalidArgumentError(
                f"greenleader.gunicorn needs gevent workers (worker_class = 'gevent' or -k gevent), "
                f"not {type(worker).__name__}"
            )
        if _active is not None and _active._pid == os.getpid():
            raise InvalidArgumentError("only one greenleader WorkerElection can run in a gunicorn worker")
        self._configure({**os.environ, **(worker.cfg.env or {})})
        self._pid = worker.pid
        self.node = f"{socket.gethostname()}:{server.pid}:{worker.pid}"
        _active = self

        run, handle_exit = worker.run, worker.handle_exit

        def run_with_election() -> None:
            # Called by the worker after monkey-patching, hub.reinit() and loading the app.
            self._starter = gevent.spawn(self._start)
            run()

        def handle_exit_and_leave(sig: int, frame: Any) -> None:
            handle_exit(sig, frame)
            gevent.spawn(self.leave)  # hand over now, while requests finish

        worker.run = run_with_election
        worker.handle_exit = handle_exit_and_leave  # installed by init_signals(), after this hook

    def worker_exit(self, server: Any, worker: Any) -> None:
        """gunicorn ``worker_exit`` hook: stop duties, release the key, close the store.

        Does nothing when the arbiter calls it for a worker that had already died."""
        if _active is not self or worker.pid != os.getpid() or self._pid != os.getpid():
            return
        self.stop()

    def child_exit(self, server: Any, worker: Any) -> None:
        """gunicorn ``child_exit`` hook (in the master, after a worker died, however it died):
        in Prometheus multiprocess mode, drop the dead worker's live gauges (``is_leader``...),
        so that a killed leader's 1 does not stay in the fleet's sum."""
        from . import metrics

        metrics.mark_process_dead(worker.pid)

    # -- state, for the app and the status endpoint ------------------------------------------

    def leader_in_this_master(self) -> bool:
        """True while the leader is a worker of this worker's gunicorn master (maybe this one)."""
        leader, _ = self.leader()
        return leader is not None and self.node is not None and _master(leader) == _master(self.node)

    def status(self) -> dict[str, Any]:
        """``{key, leader, node, is_leader, term}`` (``term`` is the leader's), and how the
        election goes in this worker: ``state`` (see :mod:`greenleader.status`; a campaigning
        worker that knows another leader is ``waiting``), ``transitions`` (its wins and
        step-downs), ``losses`` (by reason), ``leader_changes`` (new leaders its follower saw)
        and ``store``: ``backend``, ``reachable``, ``last_contact_age`` and ``last_error_age``
        (seconds), ``last_error`` (redacted) and ``errors``, from every store call this worker
        made (a follower's silence past its ``unknown_after`` counts as unreachable)."""
        leader, term = self.leader()
        backend = self.store.backend if self.store is not None else _scheme(self.store_spec)
        return status_document(key=self.key, node=self.node, leader=leader, term=term, is_leader=self.is_leader(),
                               candidate=self.candidate, follower=self.follower, backend=backend,
                               stopped=self._stopped or (self.candidate is None and self._leaving), boot=self._boot)

    def resign(self) -> None:
        """Stop the duties and let another worker lead; this one campaigns again later."""
        if self.runner is not None:
            self.runner.resign()

    # -- lifecycle ---------------------------------------------------------------------------

    def leave(self) -> None:
        """Stop the duties and the campaign (releasing the key); keep following. Idempotent."""
        self._leaving = True
        starter = self._starter
        if starter is not None and starter is not gevent.getcurrent():
            starter.kill()
        if self.runner is not None:
            self.runner.stop()
        elif self.candidate is not None:
            self.candidate.stop()

    def stop(self) -> None:
        """Leave the election, stop following and close the store. Idempotent."""
        global _active
        if self._stopped:
            return
        self.leave()
        self._stopped = True
        self._stop_following_and_close()
        if _active is self:
            _active = None

    def _configure(self, env: Mapping[str, str]) -> None:
        store = self._store_arg if self._store_arg is not None else env.get(ENV_STORE, "").strip() or None
        key = self._key_arg if self._key_arg is not None else env.get(ENV_KEY, "").strip() or None
        if store is None:
            raise InvalidArgumentError(f"greenleader: no store; pass store= or set {ENV_STORE} (e.g. file:///tmp/x)")
        if key is None:
            raise InvalidArgumentError(f"greenleader: no election key; pass key= or set {ENV_KEY}")
        if isinstance(store, str) and "://" not in store:
            raise InvalidArgumentError(
                f"greenleader: store URL {_redacted(store)!r} has no scheme, e.g. consul://127.0.0.1:8500"
            )
        ttl = self._ttl_arg
        if ttl is None:
            ttl = check_float(ENV_TTL, env.get(ENV_TTL) or DEFAULT_TTL, minimum=0.0, inclusive=False)
        self.store_spec, self.key, self.ttl = store, check_text("key", key), ttl

    def _make_store(self) -> Store:
        spec = self.store_spec
        store = from_url(spec) if isinstance(spec, str) else spec()  # type: ignore[misc]
        if not isinstance(store, Store):
            raise InvalidArgumentError(f"the store function returned {type(store).__name__}, not a Store")
        return store

    def _start(self) -> None:
        """The starter greenlet: make the store (retrying through outages), then campaign."""
        delays = self.retry.delays()
        assert self.key is not None
        _install_metrics()
        boot = self._boot = Record(_scheme(self.store_spec), self.key, self.node, role="worker")
        try:
            while self.store is None:
                try:
                    self.store = self._make_store()
                except StoreError as exc:
                    boot.failed(exc)
                    delay = next(delays)
                    log.warning("%r: cannot make the store, trying again in %.1fs: %s", self, delay, exc)
                    gevent.sleep(delay)
            assert self.key is not None and self.node is not None and self.ttl is not None
            candidate = Candidate(self.store, self.key, self.node, self.ttl, retry=self.retry,
                                  **self.candidate_options)
            follower = Follower(self.store, self.key, retry=self.retry) if self.follow else None
            if follower is not None:
                follower._record.node = self.node  # labels its metrics
        except GreenleaderError as exc:  # a configuration error: fail like an app that does not load
            log.critical("%r: %s", self, exc)
            raise SystemExit(WORKER_BOOT_ERROR) from exc
        if self._leaving:
            return
        self.candidate, self.follower = candidate, follower
        if follower is not None:
            follower.follow_election()
        self.runner = self.duties.run(candidate)
        log.info("%r: campaigning on the %s store with ttl %gs", self, self.store.backend, self.ttl)


def _scheme(spec: object) -> str:
    """The backend named by a store URL, without anything else of it (``?`` for a function)."""
    return spec.partition("://")[0] if isinstance(spec, str) else "?"


def _install_metrics() -> None:
    """Count this worker's election in Prometheus metrics when prometheus_client is installed."""
    from . import metrics

    if metrics.available():
        metrics.install()


def _master(node: str) -> str:
    """``host:master-pid`` of a node name ``host:master-pid:worker-pid``."""
    return node.rsplit(":", 1)[0]


#: The default election, configured from the environment; its hooks are below.
election = WorkerElection()
post_fork = election.post_fork
worker_exit = election.worker_exit
child_exit = election.child_exit
