"""Prometheus metrics (greenleader.metrics) in-process, without prometheus_client, and under a
real ``gunicorn -k gevent`` fleet in multiprocess mode, where the fleet's is-leader sum must be
exactly 1, also after the leader worker is SIGKILLed (the child_exit hook drops its gauges)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from greenleader import Backoff, Candidate, metrics
from greenleader.errors import StoreUnavailableError
from greenleader.stores.memory import MemoryStore
from greenleader.testing import FaultyStore
from greenleader.wsgi import StatusMiddleware
from tests.gunicorn_apps.harness import REPO, Fleet, Master, worker_pid
from tests.waiting import next_item, wait_until

#: Seconds for fresh masters to boot their workers and elect someone (a loaded CI machine).
STARTUP = 30.0
CONF = Path(__file__).with_name("gunicorn_apps") / "conf_metrics.py"


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.timeout(30)
def test_metrics_follow_a_tenure_in_process(key: str) -> None:
    metrics.install()
    faulty = FaultyStore(MemoryStore())
    candidate = Candidate(faulty, key, "n1", 1.0, renew_interval=0.05, retry=Backoff(initial=0.1, maximum=0.2))
    assert _value("greenleader_is_leader", key=key, node="n1") == 0.0
    elected, _ = candidate.run_for_election()
    assert next_item(elected, 5, "the initial False") is False
    assert next_item(elected, 5, "the win") is True
    assert _value("greenleader_is_leader", key=key, node="n1") == 1.0
    assert _value("greenleader_term", key=key, node="n1") == candidate.term
    wait_until(lambda: _value("greenleader_renewal_duration_seconds_count", key=key) >= 2, 10, "two renewals")
    assert _value("greenleader_store_last_contact_timestamp_seconds", key=key, node="n1") > time.time() - 10

    fault = faulty.fail_when("renew", StoreUnavailableError("down"), lambda call: True)
    assert next_item(elected, 5, "the step-down past the renew deadline") is False
    assert _value("greenleader_is_leader", key=key, node="n1") == 0.0
    assert _value("greenleader_term", key=key, node="n1") == 0.0
    # "store error" when the last retry is refused; "deadline" if a busy machine woke it too late.
    reasons = ("store error", "deadline")
    assert sum(_value("greenleader_losses_total", key=key, reason=reason) for reason in reasons) == 1
    assert _value("greenleader_store_errors_total", key=key, role="candidate") >= 2.0
    faulty.remove_fault(fault)
    assert next_item(elected, 5, "the win after recovery") is True
    candidate.stop()
    assert _value("greenleader_transitions_total", key=key) == 4.0
    assert _value("greenleader_losses_total", key=key, reason="stopped") == 1.0

    statuses: list[str] = []
    app = StatusMiddleware(lambda environ, start_response: [])
    body = b"".join(app({"PATH_INFO": "/_greenleader/metrics", "REQUEST_METHOD": "GET"},
                        lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"]
    assert f'greenleader_transitions_total{{key="{key}"}} 4.0' in body.decode(), body.decode()[:2000]


def test_without_prometheus_client() -> None:
    """greenleader imports, and /_greenleader/metrics says what to install."""
    script = """
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
import greenleader, greenleader.gunicorn, greenleader.metrics
from greenleader.errors import MissingDependencyError
from greenleader.wsgi import StatusMiddleware
assert not greenleader.metrics.available()
try:
    greenleader.metrics.install()
except MissingDependencyError as exc:
    print("install:", exc)
statuses = []
app = StatusMiddleware(lambda environ, start_response: [])
body = b"".join(app({"PATH_INFO": "/_greenleader/metrics", "REQUEST_METHOD": "GET"},
                    lambda status, headers: statuses.append(status)))
print(statuses[0], body.decode().strip())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    hint = 'install greenleader\'s "metrics" extra (in a clone: pip install -e ".[metrics]")'
    assert f"install: greenleader metrics need prometheus_client: {hint}" in done.stdout, done.stdout
    assert f"503 Service Unavailable greenleader metrics need prometheus_client: {hint}" in done.stdout, done.stdout


# -- gunicorn multiprocess mode ------------------------------------------------------------------


def test_multiprocess_scrape_skips_a_file_being_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker creates its value file empty and sizes it just after: a scrape in between got
    a struct.error (a 500 while gunicorn booted its workers) before the collector skipped it."""
    writer = "\n".join([
        "from prometheus_client import Gauge",
        "Gauge('greenleader_is_leader', 'x', ['key', 'node'], multiprocess_mode='livesum')"
        ".labels('k', 'n').set(1)",
    ])
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True, timeout=60)
    (tmp_path / "gauge_livesum_999999.db").touch()  # another worker's file, just created
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _, body = metrics.exposition()
    assert 'greenleader_is_leader{key="k",node="n"} 1.0' in body.decode(), body.decode()



def _scrape(master: Master, key: str) -> dict[str, Any]:
    """is_leader per node, and the counters, as one of the master's workers answers for all."""
    code, text = master.get("/_greenleader/metrics")
    assert code == 200 and isinstance(text, str), f"{master!r} answered {code}: {text!r}\n{master.tail(60)}"
    leaders: dict[str, float] = {}
    found: dict[str, Any] = {"is_leader": leaders, "transitions": 0.0, "renewals": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("key") != key:
                continue
            if sample.name == "greenleader_is_leader":
                leaders[sample.labels["node"]] = sample.value
            elif sample.name == "greenleader_transitions_total":
                found["transitions"] += sample.value
            elif sample.name == "greenleader_renewal_duration_seconds_count":
                found["renewals"] += sample.value
    return found


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_gunicorn_multiprocess_fleet_sums_to_one_leader(tmp_path: Path, key: str) -> None:
    """2 masters x 3 gevent workers, each master with its own PROMETHEUS_MULTIPROC_DIR: every
    worker of a master reports all its workers, and the two masters' is-leader gauges sum to
    exactly 1, before and after the leading worker is killed with SIGKILL."""
    url = f"file://{tmp_path / 'elections'}?poll_interval=0.01"
    with Fleet(tmp_path / "fleet", url, key, 1.0) as fleet:
        masters = []
        for name in ("a", "b"):
            directory = tmp_path / f"prometheus-{name}"
            directory.mkdir()
            masters.append(fleet.start(workers=3, conf=CONF, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}))

        def settled(expect_nodes: int, exclude: str | None = None) -> dict[str, float] | None:
            """Three scrapes in a row of each master agree: 1 leader in the fleet, every live worker seen."""
            views = []
            for _ in range(3):
                views.append({node: value for master in masters
                              for node, value in _scrape(master, key)["is_leader"].items()})
            first = views[0]
            if any(view != first for view in views) or len(first) != expect_nodes or exclude in first:
                return None
            return first if sum(first.values()) == 1 else None

        first = fleet.current(STARTUP)
        gauges = fleet.wait_for("the fleet's is-leader gauges to sum to 1 over 6 workers",
                                lambda: settled(6), STARTUP)
        assert gauges[first.node] == 1, (gauges, first)
        leading = fleet.master_of(first.node)
        assert _scrape(leading, key)["transitions"] >= 1

        killed = time.monotonic()
        os.kill(worker_pid(first.node), signal.SIGKILL)
        second = fleet.wait_tenure(STARTUP, after=killed, exclude=first.node)
        fleet.wait_for("the leading master to replace the killed worker",
                       lambda: leading.campaigning() >= 4, STARTUP)
        gauges = fleet.wait_for("the is-leader gauges to sum to 1 again, without the killed worker",
                                lambda: settled(6, exclude=first.node), STARTUP)
        assert gauges[second.node] == 1, (gauges, second)
        totals = [_scrape(master, key) for master in masters]
        assert sum(t["transitions"] for t in totals) >= 2, totals  # the dead worker's win still counts
        assert sum(t["renewals"] for t in totals) >= 1, totals
