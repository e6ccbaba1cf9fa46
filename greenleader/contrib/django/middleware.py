"""The status endpoints as Django middleware; put it first in ``MIDDLEWARE``::

    MIDDLEWARE = ["greenleader.contrib.django.middleware.StatusMiddleware", ...]

It answers ``/_greenleader`` and ``/_greenleader/leader``, ``/leader-master``, ``/store`` and
``/metrics`` (``GREENLEADER["STATUS_PATH"]`` moves them) exactly as :mod:`greenleader.wsgi` does, before
any other middleware runs: a load balancer's health check needs no session, no login and no
allowed Host header. Point the load balancer at ``/_greenleader/leader-master``: it answers
200 on every worker of the leader's master (``/leader`` answers 200 only in the one worker
that leads, so it flaps when a master has several).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from ...wsgi import StatusMiddleware as WSGIStatusMiddleware
from ...wsgi import status_app
from .._election import current
from .conf import status_path

__all__ = ["StatusMiddleware"]


class StatusMiddleware:
    """Django middleware serving greenleader's status endpoints (greenleader.wsgi's, whatever
    they are: ``/leader``, ``/leader-master``, ``/store``, ``/metrics``...); every other path
    passes on."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.endpoints = WSGIStatusMiddleware(_not_ours, status_path())

    def __call__(self, request: HttpRequest) -> HttpResponse:
        environ = {**request.META, "PATH_INFO": request.path_info, "REQUEST_METHOD": request.method or "GET"}
        started: list[Any] = []
        body = self.endpoints(environ, lambda status, headers: started.append((status, headers)))
        if body is _NOT_OURS:
            return self.get_response(request)
        return _response(b"".join(body), *started[0])


_NOT_OURS: list[bytes] = []


def _not_ours(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    return _NOT_OURS


def status_response(request: HttpRequest, mode: str = "status") -> HttpResponse:
    """greenleader.wsgi's answer for ``mode``, as a Django response, whatever the request's method
    (a @leader_only POST view answers 503 elsewhere too, not the endpoints' 405)."""
    method = "HEAD" if request.method == "HEAD" else "GET"
    started: list[Any] = []
    body = b"".join(status_app(current(), mode)({"REQUEST_METHOD": method},
                                                lambda status, headers: started.append((status, headers))))
    return _response(body, *started[0])


def _response(body: bytes, status: str, headers: list[tuple[str, str]]) -> HttpResponse:
    response = HttpResponse(body, status=int(status.split()[0]))
    for name, value in headers:
        response[name] = value
    # A 503 here is an answer (not the leader), not a failure: keep it out of django.request's
    # ERROR log, which a health check every few seconds would flood.
    response._has_been_logged = True
    return response
