"""The app the gunicorn tests serve: a leader duty that logs its tenure, event handlers, and
endpoints to inspect and upset a worker.

Environment: ``DUTY_LOG`` (the duty's log, JSON lines), ``EVENT_LOG`` (zope.event handlers'
log), ``DUTY_TICK`` (seconds between the duty's lines, default 0.05).

Each duty line is ``{"event": "start"|"tick"|"stop", "node", "term", "t"}``, ``t`` being
``time.monotonic()`` (system-wide on Linux, so the test compares it with its own clock). A
``tick`` is written only after checking that the tenure still holds, as a duty with side
effects should; ``stop`` is written when the duty is killed at the end of its tenure.
"""

from __future__ import annotations

import json
import os
import signal
import time

import gevent
import zope.event.classhandler
from gevent import monkey

from greenleader import gunicorn
from greenleader.events import LeadershipAcquired, LeadershipEvent, LeadershipLost
from greenleader.wsgi import StatusMiddleware

DUTY_LOG = os.environ["DUTY_LOG"]
EVENT_LOG = os.environ["EVENT_LOG"]
TICK = float(os.environ.get("DUTY_TICK", "0.05"))


def _append(path: str, **line: object) -> None:
    data = (json.dumps({**line, "t": time.monotonic(), "pid": os.getpid()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write of a short line to an O_APPEND file: never interleaved
    finally:
        os.close(fd)


@gunicorn.duty
def tick(term: int) -> None:
    election = gunicorn.current()
    assert election is not None
    _append(DUTY_LOG, event="start", node=election.node, term=term)
    try:
        while True:
            gevent.sleep(TICK)
            if not election.leads(term):
                return
            _append(DUTY_LOG, event="tick", node=election.node, term=term)
    finally:
        _append(DUTY_LOG, event="stop", node=election.node, term=term)


@gunicorn.duty(on_error="stop")
def fails_once(term: int) -> None:
    raise RuntimeError("a duty that fails must not take the worker or the candidate down")


def log_event(event: LeadershipEvent) -> None:
    _append(EVENT_LOG, event=type(event).__name__, node=event.node, term=event.term)


def raising_handler(event: LeadershipEvent) -> None:
    raise ValueError("an event handler that raises must not take the worker down")


# Not stacked as decorators: zope.event's decorator returns its own function, not the handler.
# (zope's dispatch stops at the first handler that raises, so the raising one goes last.)
zope.event.classhandler.handler(LeadershipAcquired, log_event)
zope.event.classhandler.handler(LeadershipLost, log_event)
zope.event.classhandler.handler(LeadershipAcquired, raising_handler)


def _hang() -> None:
    """Block the hub the way a runaway C call does: the arbiter's SIGABRT stays pending, so
    only its SIGKILL ends this worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
    monkey.get_original("time", "sleep")(3600)


def _app(environ: dict, start_response) -> list[bytes]:
    path = environ.get("PATH_INFO", "/")
    election = gunicorn.current()
    if path == "/hang-if-leader":
        if election is None or not election.is_leader():
            start_response("409 Conflict", [("Content-Type", "text/plain")])
            return [b"not the leader\n"]
        _hang()
    body = json.dumps({"pid": os.getpid(), "node": election.node if election else None}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


app = StatusMiddleware(_app)
