"""The tiny Celery app of the Celery beat test: a beat schedule that sends ``tick`` every
``TICK`` seconds to a broker that needs no server (kombu's ``filesystem://`` transport, in
``$CELERY_BROKER_DIR``).

Every task the process publishes is logged to ``$CELERY_TICK_LOG`` (JSON lines ``{"task",
"node", "term", "pid", "t"}``), with the ``GREENLEADER_NODE`` and ``GREENLEADER_TERM`` that
``greenleader run`` gave the beat, so the test sees which beat sent what, in which tenure.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery.signals import after_task_publish

BROKER_DIR = os.environ["CELERY_BROKER_DIR"]
TICK_LOG = os.environ["CELERY_TICK_LOG"]
TICK = 0.2  # seconds between beats: several per second, so a takeover shows quickly

app = Celery("celery_app")
app.conf.update(
    broker_url="filesystem://",
    # control_folder too: kombu otherwise makes ./control in the working directory (the repository)
    broker_transport_options={"data_folder_in": BROKER_DIR, "data_folder_out": BROKER_DIR,
                              "control_folder": os.path.join(BROKER_DIR, "control")},
    beat_schedule={"tick": {"task": "celery_app.tick", "schedule": TICK}},
    beat_max_loop_interval=TICK,
    timezone="UTC",
)


@app.task(name="celery_app.tick")
def tick() -> None:
    """Never run here: the test has no worker; it reads what beat sent."""


@after_task_publish.connect
def _log_publish(sender: str | None = None, **_: Any) -> None:
    line = {"task": sender, "node": os.environ.get("GREENLEADER_NODE"),
            "term": int(os.environ.get("GREENLEADER_TERM", "0")), "pid": os.getpid(), "t": time.monotonic()}
    fd = os.open(TICK_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())  # one short O_APPEND write: never interleaved
    finally:
        os.close(fd)
