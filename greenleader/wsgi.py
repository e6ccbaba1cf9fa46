"""WSGI status of the election in this gunicorn worker, for Flask, Django or any WSGI app.

>>> app.wsgi_app = StatusMiddleware(app.wsgi_app)                # Flask
>>> application = StatusMiddleware(get_wsgi_application())       # Django, in wsgi.py

``GET /_greenleader`` answers 200 with JSON ``{"key", "leader", "node", "is_leader", "term"}``
(``term`` is the current leader's fencing term, ``null`` while unknown), and how the election
goes in this worker: ``state`` (waiting, campaigning, leading, backing off, stopped),
``transitions``, ``losses``, ``leader_changes`` and ``store`` (``reachable``,
``last_contact_age``, ``last_error`` redacted, ``last_error_age``, ``errors``): see
:meth:`greenleader.gunicorn.WorkerElection.status`. It answers 200 even when the store is
unreachable, like Patroni's ``/patroni`` document: it is a report, readable by anything, and a
probe pointed at it must not take every worker out of service during a store outage while
they go on serving; the body tells an outage (``store.reachable`` false, ``state`` backing off)
from a vacancy. ``GET /_greenleader/store`` is the check to alert on: 200 while this worker's
last store call succeeded (and its follower heard from the store within ``unknown_after``),
503 otherwise, with the same body.
``GET /_greenleader/leader`` answers the same body with 200 on the leader and 503 on every
other worker. ``GET /_greenleader/leader-master`` answers 200 on every worker of the gunicorn
master whose worker leads, 503 elsewhere: that is the health check for a load balancer that
routes to the leader, since it sends each request to a master (an address), and the master to
any of its workers (``/_greenleader/leader`` would flap there when a master has several workers).
All answer 503 in a process where no election runs (the master, or outside gunicorn).

``GET /_greenleader/metrics`` answers the Prometheus text exposition of :mod:`greenleader.metrics`
(every worker of the master in prometheus_client's multiprocess mode), or 503 with a one-line
reason when prometheus_client is not installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from . import gunicorn as _gunicorn
from .errors import MissingDependencyError

__all__ = ["MODES", "StatusMiddleware", "metrics_app", "status_app"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_REASONS = {200: "200 OK", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


MODES = ("status", "leader", "leader-master", "store")


def status_app(election: Any = None, mode: str = "status") -> WSGIApp:
    """A WSGI app answering the status of ``election`` (default: this worker's, found per request).

    ``mode`` "status" always answers 200; "leader" answers 503 unless this worker leads;
    "leader-master" answers 503 unless a worker of this gunicorn master leads; "store" answers
    503 unless this worker's store calls succeed (``store.reachable`` in the body).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, 405, {"error": "use GET or HEAD"}, method, [("Allow", "GET, HEAD")])
        current = election if election is not None else _gunicorn.current()
        if current is None:
            body: dict[str, Any] = {"key": None, "leader": None, "node": None, "is_leader": False, "term": None,
                                    "error": "no greenleader election runs in this process"}
            return _respond(start_response, 503, body, method)
        body = current.status()
        healthy: bool
        if mode == "status":
            healthy = True
        elif mode == "leader":
            healthy = bool(body["is_leader"])
        elif mode == "leader-master":
            healthy = bool(current.leader_in_this_master())
        else:
            healthy = body.get("store", {}).get("reachable") is True
        return _respond(start_response, 200 if healthy else 503, body, method)

    return app


def metrics_app() -> WSGIApp:
    """A WSGI app answering the Prometheus metrics of this process (or, in multiprocess mode, of
    every worker of the master); 503 with a one-line reason without prometheus_client."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, 405, {"error": "use GET or HEAD"}, method, [("Allow", "GET, HEAD")])
        from . import metrics as _metrics  # here: prometheus_client is imported on first use only

        try:
            _metrics.install()  # idempotent; greenleader's gunicorn hooks already did it
            content_type, data = _metrics.exposition()
        except MissingDependencyError as exc:
            content_type, data, code = "text/plain; charset=utf-8", f"{exc}\n".encode(), 503
        else:
            code = 200
        start_response(_REASONS[code], [("Content-Type", content_type), ("Content-Length", str(len(data))),
                                        ("Cache-Control", "no-store")])
        return [] if method == "HEAD" else [data]

    return app


class StatusMiddleware:
    """Wraps ``app``: answers ``path``, ``path/leader``, ``path/leader-master``, ``path/store``
    and ``path/metrics`` itself, and passes every other request on."""

    def __init__(self, app: WSGIApp, path: str = "/_greenleader", *, election: Any = None) -> None:
        self.app = app
        root = "/" + path.strip("/")
        self._routes = {root: status_app(election)}
        for mode in MODES[1:]:
            self._routes[f"{root}/{mode}"] = status_app(election, mode)
        self._routes[f"{root}/metrics"] = metrics_app()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = self._routes.get(environ.get("PATH_INFO", "").rstrip("/"))
        if route is not None:
            return route(environ, start_response)
        return self.app(environ, start_response)


def _respond(start_response: Callable[..., Any], code: int, body: dict[str, Any], method: str,
             headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(_REASONS[code], [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *(headers or []),
    ])
    return [] if method == "HEAD" else [data]
