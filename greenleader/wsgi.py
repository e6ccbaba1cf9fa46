"""WSGI status of the election in this gunicorn worker, for Flask, Django or any WSGI app.

>>> app.wsgi_app = StatusMiddleware(app.wsgi_app)                # Flask
>>> application = StatusMiddleware(get_wsgi_application())       # Django, in wsgi.py

``GET /_greenleader`` answers 200 with JSON ``{"key", "leader", "node", "is_leader", "term"}``
(``term`` is the current leader's fencing term, ``null`` while unknown).
``GET /_greenleader/leader`` answers the same body with 200 on the leader and 503 on every
other worker: a load-balancer health check that routes to the leader.
Both answer 503 in a process where no election runs (the master, or outside gunicorn).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from . import gunicorn as _gunicorn

__all__ = ["StatusMiddleware", "status_app"]

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

_REASONS = {200: "200 OK", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


def status_app(election: Any = None, *, leader_only: bool = False) -> WSGIApp:
    """A WSGI app answering the status of ``election`` (default: this worker's, found per request).

    With ``leader_only``, non-leaders answer 503.
    """

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
        code = 503 if leader_only and not body["is_leader"] else 200
        return _respond(start_response, code, body, method)

    return app


class StatusMiddleware:
    """Wraps ``app``: answers ``path`` and ``path + "/leader"`` itself, passes the rest on."""

    def __init__(self, app: WSGIApp, path: str = "/_greenleader", *, election: Any = None) -> None:
        self.app = app
        self.path = "/" + path.strip("/")
        self._status = status_app(election)
        self._leader = status_app(election, leader_only=True)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").rstrip("/") or "/"
        if path == self.path:
            return self._status(environ, start_response)
        if path == self.path + "/leader":
            return self._leader(environ, start_response)
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
