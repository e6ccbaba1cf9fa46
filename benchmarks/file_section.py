"""The ``fileidle`` section: the file store's own benchmark (benchmarks/file_idle.py) run
inside ``python -m benchmarks``, so its figures land in results.json and on the page.

It measures, between real processes on one lock directory: the CPU seconds an hour and lock
attempts a minute of each idle waiter and follower (``getrusage``, no proxy, no baseline:
a process with nobody in it costs nothing on this store), and the store-level graceful
handover (release -> the waiter's ``acquire`` returns) and crash failover (SIGKILL of the
holder -> the waiter's win). Only on the file store; other kinds are skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .common import Config, Stores

log = logging.getLogger(__name__)


def run(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    if "file" not in config.kinds:
        return {}
    try:
        from . import file_idle
    except ImportError:  # a checkout from before the file store's benchmark existed
        log.warning("fileidle: no benchmarks/file_idle.py in this checkout; skipped")
        return {}

    result = file_idle.run(participants=config.file_idle_participants, window=config.file_idle_window,
                           trials=config.file_idle_trials)
    result["participants"] = config.file_idle_participants
    log.info("fileidle: %s", result)
    return {"file": result}
