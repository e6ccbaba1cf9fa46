"""gunicorn hooks for apps that keep the election's settings in their framework's settings.

The plain hooks (:mod:`greenleader.gunicorn`) read the store, key and TTL from the environment
when the worker forks, before the app is loaded. A Django or Flask app keeps them in
``settings.GREENLEADER`` or ``app.config``, which exist only once the app has loaded in the
worker (and Django's settings module must not be imported before gevent patches the worker:
settings modules start clients and threads). These hooks fork the worker exactly as the plain
ones do, then take the settings from the framework integration once the app has loaded, before
the election starts::

    # gunicorn.conf.py
    from greenleader.contrib.gunicorn import post_fork, worker_exit  # noqa: F401
    worker_class = "gevent"

(and ``child_exit`` for Prometheus metrics in multiprocess mode, as with greenleader.gunicorn.)

The integration registers its settings when the app loads: Django when
``greenleader.contrib.django`` is in ``INSTALLED_APPS``, Flask in ``GreenLeader(app)``. Bad
settings make the worker exit as one that failed to boot (the master halts with the reason).
Everything else (node names, SIGTERM handover, ``current()``) is greenleader.gunicorn's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import gunicorn as _gunicorn
from ..duties import Duties
from ..errors import GreenleaderError, InvalidArgumentError
from ..stores import Store
from ._config import ElectionConfig

__all__ = ["child_exit", "post_fork", "use_settings", "worker_exit"]

log = logging.getLogger(__name__)

_settings: Callable[[], ElectionConfig] | None = None
_duties: Duties | None = None
#: The election key given to greenleader.gunicorn at fork, replaced before the campaign starts.
_PENDING_KEY = "greenleader/pending-app-settings"


def use_settings(settings: Callable[[], ElectionConfig], duties: Duties | None = None) -> None:
    """Called by a framework integration as the app loads: ``settings()`` gives the election's
    settings to the worker's election when it starts, which runs ``duties`` (default:
    greenleader's own registry)."""
    global _settings, _duties
    _settings, _duties = settings, duties


def _unconfigured_store() -> Store:  # never called: the settings replace it before the start
    raise InvalidArgumentError("greenleader.contrib.gunicorn: the app's settings were never applied")


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn ``post_fork`` hook: the plain hook, with the settings applied once the app loaded."""
    election = _gunicorn.WorkerElection(_unconfigured_store, _PENDING_KEY, _gunicorn.DEFAULT_TTL)
    election.post_fork(server, worker)  # checks the worker class, names the node, wraps run/exit
    run_with_election = worker.run

    def run_configured() -> None:  # after monkey-patching and loading the app
        try:
            _apply(election)
        except GreenleaderError as exc:
            log.critical("%r: %s", election, exc)
            election.stop()
            raise SystemExit(_gunicorn.WORKER_BOOT_ERROR) from exc
        run_with_election()

    worker.run = run_configured


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn ``worker_exit`` hook: stop duties, release the key, close the store."""
    election = _gunicorn.current()
    if election is not None:
        election.worker_exit(server, worker)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook (in the master): greenleader.gunicorn's, for Prometheus
    metrics in multiprocess mode (see :mod:`greenleader.metrics`)."""
    _gunicorn.child_exit(server, worker)


def _apply(election: _gunicorn.WorkerElection) -> None:
    if _settings is None:
        raise InvalidArgumentError(
            "no framework settings for greenleader: add 'greenleader.contrib.django' to INSTALLED_APPS, "
            "or call GreenLeader(app) (greenleader.contrib.flask) when the app is made; "
            "or use greenleader.gunicorn's hooks with the environment instead"
        )
    config = _settings()
    election.store_spec = config.store
    election.key = config.key
    election.ttl = config.ttl
    election.candidate_options = dict(config.candidate_options)
    if _duties is not None:
        election.duties = _duties
    if config.node is not None and election.node is not None:
        # host:master-pid:worker-pid -> NODE:master-pid:worker-pid (the master part still tells
        # the leader's master apart, for /_greenleader/leader-master)
        election.node = config.node + ":" + election.node.split(":", 1)[1]
