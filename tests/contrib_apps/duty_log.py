"""The duty the framework test apps run, writing the duty log tests.gunicorn_apps.harness reads.

Each line is ``{"event": "start"|"tick"|"stop", "node", "term", "t"}`` (``t``: time.monotonic(),
system-wide on Linux); a tick is written only after checking that the tenure still holds.
Environment: ``DUTY_LOG``, ``DUTY_TICK`` (seconds between ticks, default 0.05).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import gevent


def append(path: str, **line: object) -> None:
    data = (json.dumps({**line, "t": time.monotonic(), "pid": os.getpid()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one short write to an O_APPEND file: lines never interleave
    finally:
        os.close(fd)


def run_duty(election: Any, term: int) -> None:
    """The duty's body: start, a tick while ``election.leads(term)``, stop when killed."""
    path, tick = os.environ["DUTY_LOG"], float(os.environ.get("DUTY_TICK", "0.05"))
    append(path, event="start", node=election.node, term=term)
    try:
        while True:
            gevent.sleep(tick)
            if not election.leads(term):
                return
            append(path, event="tick", node=election.node, term=term)
    finally:
        append(path, event="stop", node=election.node, term=term)
