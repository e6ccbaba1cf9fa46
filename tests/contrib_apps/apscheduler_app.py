"""The app of the APScheduler gunicorn test: a GeventScheduler in every worker, whose job runs
only in the leader worker (greenleader.contrib.apscheduler).

Environment: ``APSCHEDULER_LOG``, the job's log (JSON lines ``{"event": "run"|"done"|"stopped",
"term", "pid", "master", "t"}``, ``t`` being ``time.monotonic()``, system-wide on Linux). Each run
takes ``RUN_FOR`` seconds and starts every ``EVERY`` seconds, so a run is almost always going: a
loss finds one to stop (its ``stopped`` line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from apscheduler.schedulers.gevent import GeventScheduler
from gevent import GreenletExit

from greenleader.contrib.apscheduler import LeaderScheduler, current_term

LOG = os.environ["APSCHEDULER_LOG"]
EVERY = 1.0  # seconds between run starts
RUN_FOR = 0.95  # seconds a run takes, unless stopped: long enough for a SIGTERM on a loaded machine to find it running

scheduler = GeventScheduler()
leader_jobs = LeaderScheduler(scheduler)  # in greenleader.duties.duties, which greenleader.gunicorn runs


def _append(**line: object) -> None:
    data = (json.dumps({**line, "t": time.monotonic(), "pid": os.getpid(), "master": os.getppid()}) + "\n")
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())  # one short write to an O_APPEND file: never interleaved
    finally:
        os.close(fd)


@scheduler.scheduled_job("interval", seconds=EVERY, max_instances=1, coalesce=True, id="work")
def work() -> None:
    term = current_term()
    _append(event="run", term=term)
    try:
        gevent.sleep(RUN_FOR)
    except GreenletExit:
        _append(event="stopped", term=term)
        raise
    _append(event="done", term=term)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
