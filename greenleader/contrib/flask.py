"""Flask integration: the ``GreenLeader`` extension.

::

    app = Flask(__name__)
    app.config["GREENLEADER_STORE"] = "consul://10.0.0.1:8500"   # else $GREENLEADER_STORE
    app.config["GREENLEADER_KEY"] = "myapp/jobs"                 # else $GREENLEADER_KEY
    leader = GreenLeader(app)        # or leader = GreenLeader(); leader.init_app(app) in a factory

    @leader.duty                     # runs in the one process that leads, with the fencing term
    def send_reminders(term): ...

    @app.post("/run-now")
    @leader_only                     # 503 (or leader_only(response=...)) on every other worker
    def run_now(): ...

and in ``gunicorn.conf.py``: ``from greenleader.contrib.gunicorn import post_fork, worker_exit``.

Settings (``app.config``): ``GREENLEADER_STORE``, ``GREENLEADER_KEY``, ``GREENLEADER_TTL``,
``GREENLEADER_NODE``, ``GREENLEADER_RENEW_DEADLINE``, ``GREENLEADER_RENEW_INTERVAL``,
``GREENLEADER_RESIGN_HOLDOFF``, ``GREENLEADER_STATUS_PATH``; checked by ``init_app``
(InvalidArgumentError). The status endpoints (``/_greenleader``, ``/leader``,
``/leader-master``, see :mod:`greenleader.wsgi`) wrap ``app.wsgi_app``, ahead of Flask's
``before_request`` hooks: a load balancer's health check needs no login. ``flask greenleader
status`` shows who leads; ``flask greenleader run`` runs the duties in a worker process of its own.
See docs/integrations.md.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import gevent
from flask import Flask, Response, request
from flask.cli import AppGroup

from ..duties import Duties, DutyFunction
from ..duties import duties as default_duties
from ..errors import GreenleaderError, InvalidArgumentError, StoreError
from ..wsgi import StatusMiddleware, status_app
from . import gunicorn as _contrib_gunicorn
from ._config import ElectionConfig
from ._election import ProcessElection, current, patch_gevent, read_status

__all__ = ["GreenLeader", "current", "leader_only"]

F = TypeVar("F", bound=Callable[..., Any])

#: ``flask greenleader status`` exit codes: a leader (0), none (1), store unreachable (69, EX_UNAVAILABLE).
EXIT_NO_LEADER = 1
EXIT_STORE_UNAVAILABLE = 69


class GreenLeader:
    """The extension; ``app.extensions["greenleader"]`` once initialised.

    :param duties: the registry the duties go in; default greenleader's own (``greenleader.duties``),
        which the gunicorn hooks run.
    """

    def __init__(self, app: Flask | None = None, *, duties: Duties | None = None) -> None:
        self.duties = duties if duties is not None else default_duties
        self.config: ElectionConfig | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and check ``app.config``; serve the status endpoints; add ``flask greenleader``;
        hand the settings to the gunicorn hooks. Raises InvalidArgumentError on bad settings."""
        if not isinstance(app, Flask):
            raise InvalidArgumentError(f"GreenLeader.init_app needs a Flask app, not {type(app).__name__}")
        config = ElectionConfig.from_settings(app.config.get_namespace("GREENLEADER_", lowercase=False),
                                              where="app.config", prefix="GREENLEADER_")
        self.config = config
        app.extensions["greenleader"] = self
        # (greenleader.wsgi's endpoints: only gunicorn workers serve HTTP and run an election at once)
        app.wsgi_app = StatusMiddleware(app.wsgi_app, config.status_path)  # type: ignore[method-assign]
        app.cli.add_command(_cli(self))
        _contrib_gunicorn.use_settings(lambda: config, self.duties)

    def duty(self, func: DutyFunction | None = None, /, *, name: str | None = None,
             on_error: str | None = None) -> Any:
        """Register a leader duty, called with the fencing term: ``@leader.duty`` or
        ``@leader.duty(on_error="resign")`` (see :mod:`greenleader.duties`)."""
        if func is None:
            return self.duties(name=name, on_error=on_error)
        return self.duties.register(func, name=name, on_error=on_error)

    @staticmethod
    def leader_only(view: F | None = None, *, response: Callable[[], Any] | None = None) -> Any:
        """:func:`leader_only`."""
        return leader_only(view, response=response)


def leader_only(view: F | None = None, *, response: Callable[[], Any] | None = None) -> Any:
    """Run the view only in the process that leads; elsewhere answer ``response()`` (any Flask
    return value), default 503 with the election's status as JSON.

    Behind a load balancer routed by ``/_greenleader/leader-master``, a request reaches the
    leader's master but any of its workers: retry on 503, or keep such views off it."""
    if view is None:
        return lambda func: leader_only(func, response=response)
    if not callable(view):
        raise InvalidArgumentError(f"leader_only decorates views, not {type(view).__name__}")

    @functools.wraps(view)
    def leader_view(*args: Any, **kwargs: Any) -> Any:
        election = current()
        if election is not None and election.is_leader():
            return view(*args, **kwargs)
        if response is not None:
            return response()
        return _status_response("leader", "HEAD" if request.method == "HEAD" else "GET")

    return leader_view


def _status_response(mode: str, method: str) -> Response:
    """greenleader.wsgi's status answer for ``mode``, as a Flask response (``method``: GET or HEAD)."""
    started: list[Any] = []
    body = b"".join(status_app(current(), mode)({"REQUEST_METHOD": method},
                                                lambda status, headers: started.append((status, headers))))
    status, headers = started[0]
    return Response(body, status=int(status.split()[0]), headers=headers)


def _cli(ext: GreenLeader) -> AppGroup:
    group = AppGroup("greenleader", help="greenleader's election, from app.config['GREENLEADER_*'].")

    @group.command("status")
    @click.option("--json", "as_json", is_flag=True, help="one JSON object: key, leader, term, duties")
    def status(as_json: bool) -> None:
        """Who leads: exit 0; 1 when nobody does; 69 when the store cannot be reached."""
        config = ext.config
        assert config is not None
        try:
            leader, text = read_status(config, [d.name for d in ext.duties], as_json=as_json)
        except StoreError as exc:
            click.echo(f"Error: the store is unreachable: {exc}", err=True)
            sys.exit(EXIT_STORE_UNAVAILABLE)
        except GreenleaderError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(text)
        if leader is None:
            sys.exit(EXIT_NO_LEADER)

    @group.command("run")
    def run() -> None:
        """Run the leader duties under election in this process until SIGTERM or SIGINT."""
        config = ext.config
        assert config is not None
        patch_gevent()
        election = ProcessElection(config, ext.duties)
        handlers = [gevent.signal_handler(signum, election.stopping.set) for signum in (signal.SIGTERM, signal.SIGINT)]
        try:
            click.echo(f"{election.node}: campaigning for {config.key}; duties: "
                       f"{', '.join(d.name for d in ext.duties) or '(none registered)'}")
            sys.stdout.flush()
            election.start()
            election.stopping.wait()
        finally:
            election.stop()  # the duties stop before the key is released
            for handler in handlers:
                handler.cancel()
        click.echo(f"{election.node}: stopped")

    return group
