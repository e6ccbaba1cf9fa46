"""Prometheus metrics of the elections in this process (extra ``greenleader[metrics]``).

Modelled on client-go's ``leader_election_master_status`` (a 0/1 gauge per lock and
identity) and on Patroni's (``patroni_primary``, ``patroni_dcs_last_seen``, the timeline)::

    greenleader_is_leader{key,node}                        1 while node leads key, else 0
    greenleader_term{key,node}                             fencing term of node's tenure, 0 when not leading
    greenleader_store_last_contact_timestamp_seconds{key,node}  last successful store call (Unix time)
    greenleader_transitions_total{key}                     wins and step-downs
    greenleader_losses_total{key,reason}                   step-downs by LossReason
    greenleader_store_errors_total{key,role}               store errors seen (role: candidate, follower, worker)
    greenleader_renewal_duration_seconds{key}              histogram of successful renewals' round trips

Call :func:`install` once per process before the candidates start (greenleader's gunicorn
hooks do it in each worker); :class:`~greenleader.wsgi.StatusMiddleware` serves
:func:`exposition` at ``/_greenleader/metrics``.

gunicorn runs several worker processes behind one port: set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory of its own for each master (before it starts), and add the ``child_exit`` hook
(``from greenleader.gunicorn import child_exit``). Every worker then answers with the whole
master's metrics: counters and the histogram summed over workers (dead ones included, as
counters must), and the gauges over live workers only (``livesum``/``livemax``), the hook
dropping a dead worker's gauges, so that ``sum(greenleader_is_leader)`` over the fleet is 1.

The metrics are updated from the greenlets that make the store calls, the way
:mod:`greenleader.status` records them: memory writes only (an mmap'd file in multiprocess
mode), never I/O that waits and never user code. Without prometheus_client installed this
module still imports: :func:`available` is False, :func:`install` and :func:`exposition` raise
:class:`~greenleader.errors.MissingDependencyError`.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

from . import status
from .errors import MissingDependencyError
from .events import LossReason

try:
    import prometheus_client
except ImportError:  # the metrics extra is not installed
    prometheus_client = None  # type: ignore[assignment]

__all__ = ["MULTIPROC_ENV", "available", "exposition", "install", "mark_process_dead", "multiprocess"]

log = logging.getLogger(__name__)

#: The variable prometheus_client reads (at import) to keep each process's values in files there.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Renewal round trips (seconds): 1 ms (memory, file) to 10 s (the longest store timeout);
#: a renewal is abandoned at the renew deadline anyway.
RENEWAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Bytes of a value file's header (used size and padding): a shorter file is being created.
_HEADER_SIZE = 8
MISSING = ('greenleader metrics need prometheus_client: install greenleader\'s "metrics" extra '
           '(in a clone: pip install -e ".[metrics]")')

_metrics: dict[str, Any] | None = None


def available() -> bool:
    """True when prometheus_client is installed."""
    return prometheus_client is not None


def multiprocess() -> bool:
    """True in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()))


def _require() -> None:
    if prometheus_client is None:
        raise MissingDependencyError(MISSING)


def install(registry: Any = None) -> None:
    """Create the metrics (in ``registry``, default prometheus_client's) and start counting
    every Candidate and Follower of this process. Idempotent; the first registry wins."""
    global _metrics
    _require()
    if _metrics is not None:
        return
    p = prometheus_client
    kwargs = {} if registry is None else {"registry": registry}
    _metrics = {
        "is_leader": p.Gauge("greenleader_is_leader", "1 while this node leads the key, else 0",
                             ["key", "node"], multiprocess_mode="livesum", **kwargs),
        "term": p.Gauge("greenleader_term", "Fencing term of this node's tenure; 0 while it does not lead",
                        ["key", "node"], multiprocess_mode="livemax", **kwargs),
        "contact": p.Gauge("greenleader_store_last_contact_timestamp_seconds",
                           "Unix time of this node's last successful store call for the key",
                           ["key", "node"], multiprocess_mode="livemax", **kwargs),
        "transitions": p.Counter("greenleader_transitions", "Leadership transitions (wins and step-downs)",
                                 ["key"], **kwargs),
        "losses": p.Counter("greenleader_losses", "Step-downs by reason", ["key", "reason"], **kwargs),
        "errors": p.Counter("greenleader_store_errors", "Store errors seen", ["key", "role"], **kwargs),
        "renewal": p.Histogram("greenleader_renewal_duration_seconds", "Round trip of successful renewals",
                               ["key"], buckets=RENEWAL_BUCKETS, **kwargs),
    }
    status.OBSERVERS.append(_observe)


def _observe(event: str, record: status.Record, *args: Any) -> None:
    """Called by greenleader.status at each observation; memory writes only."""
    m = _metrics
    if m is None:
        return
    node = record.node or ""
    if event == "new":
        # Every series of the key exists from the start, at 0 (Prometheus practice; in
        # multiprocess mode this also grows the mmap'd files here, not on the keepalive path).
        m["errors"].labels(record.key, record.role)
        if record.role == "candidate":
            m["is_leader"].labels(record.key, node).set(0)
            m["term"].labels(record.key, node).set(0)
            m["transitions"].labels(record.key)
            m["renewal"].labels(record.key)
            for reason in LossReason:
                m["losses"].labels(record.key, reason.value)
    elif event == "up":
        m["is_leader"].labels(record.key, node).set(1)
        m["term"].labels(record.key, node).set(args[0])
        m["transitions"].labels(record.key).inc()
    elif event == "down":
        m["is_leader"].labels(record.key, node).set(0)
        m["term"].labels(record.key, node).set(0)
        m["transitions"].labels(record.key).inc()
        m["losses"].labels(record.key, getattr(args[1], "value", str(args[1]))).inc()
    elif event in ("contact", "renewed"):
        m["contact"].labels(record.key, node).set(time.time())
        if event == "renewed":
            m["renewal"].labels(record.key).observe(args[0])
    elif event == "error":
        m["errors"].labels(record.key, record.role).inc()


def exposition() -> tuple[str, bytes]:
    """``(content_type, body)`` of the Prometheus text exposition: this process's metrics, or in
    multiprocess mode every process's that shares ``PROMETHEUS_MULTIPROC_DIR``."""
    _require()
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    if multiprocess():
        registry = CollectorRegistry()
        registry.register(_MultiProcessCollector(_multiproc_dir()))
        return CONTENT_TYPE_LATEST, generate_latest(registry)
    return CONTENT_TYPE_LATEST, generate_latest()


def _multiproc_dir() -> str:
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or ""


class _MultiProcessCollector:
    """prometheus_client's MultiProcessCollector, minus the files another process is creating.

    A process creates its file empty and sizes it right after; a scrape that reads it in
    between failed with ``struct.error`` (seen as a 500 while gunicorn booted its workers).
    A file that is still empty holds no value yet, so leaving it out loses nothing.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(name) >= _HEADER_SIZE:
                    files.append(name)
            except FileNotFoundError:  # a dead worker's live gauges, just dropped
                continue
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """In multiprocess mode, drop the live gauges of the dead process ``pid`` (gunicorn's
    ``child_exit``). Does nothing otherwise, or without prometheus_client."""
    if prometheus_client is None or not multiprocess():
        return
    from prometheus_client import multiprocess as mp

    try:
        mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.warning("could not drop the metrics of dead worker %d: %s", pid, exc)
