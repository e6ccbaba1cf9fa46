"""WSGI status of the election in this gunicorn worker, for Flask, Django or any WSGI app.

>>> app.wsgi_app = StatusMiddleware(app.wsgi_app)                # Flask
>>> application = StatusMiddleware(get_wsgi_application())       # Django, in wsgi.py

``GET /_greenleader`` answers 200 with JSON ``{"key", "leader", "node", "is_leader", "term"}``
(``term`` is the current leader's fencing term, ``null`` while unknown).
``GET /_greenleader/leader`` answers the same body with 200 on the leader and 503 on every
other worker. ``GET /_greenleader/leader-master`` answers 200 on every worker of the gunicorn
master whose worker leads, 503 elsewhere: that is the health check for a load balancer that
routes to the leader, since it sends each request to a master (an address), and the master to
any of its workers (``/_greenleader/leader`` would flap there when a master has several workers).
All answer 503 in a process where no election runs (the master, or outside gunicorn).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from . import gunicorn as _gunicorn

__all__ = ["MODES", "StatusMiddleware", "status_app"]

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

_REASONS = {200: "200 OK", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


MODES = ("status", "leader", "leader-master")


def status_app(election: Any = None, mode: str = "status") -> WSGIApp:
    """A WSGI app answering the status of ``election`` (default: this worker's, found per request).

    ``mode`` "status" always answers 200; "leader" answers 503 unless this worker leads;
    "leader-master" answers 503 unless a worker of this gunicorn master leads.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")

    def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, 405, {"error": "use GET or HEAD"}, method, [("Allow", "GET, HEAD")])
        current = election if election is not None else _gunicorn.current()
        if current is None:
            body = {"key": None, "leader": None, "node": None, "is_leader": False, "term": None,
                    "error": "no greenleader election runs in this process"}
            return _respond(start_response, 503, body, method)
        body = current.status()
        healthy = {"status": True, "leader": body["is_leader"], "leader-master": current.leader_in_this_master()}
        return _respond(start_response, 200 if healthy[mode] else 503, body, method)

    return app


class StatusMiddleware:
    """Wraps ``app``: answers ``path``, ``path/leader`` and ``path/leader-master`` itself,
    and passes every other request on."""

    def __init__(self, app: WSGIApp, path: str = "/_greenleader", *, election: Any = None) -> None:
        self.app = app
        root = "/" + path.strip("/")
        self._routes = {root: status_app(election)}
        for mode in MODES[1:]:
            self._routes[f"{root}/{mode}"] = status_app(election, mode)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = self._routes.get(environ.get("PATH_INFO", "").rstrip("/"))
        if route is not None:
            return route(environ, start_response)
        return self.app(environ, start_response)


def _respond(start_response: Callable[..., Any], code: int, body: dict, method: str,
             headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(_REASONS[code], [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *(headers or []),
    ])
    return [] if method == "HEAD" else [data]
