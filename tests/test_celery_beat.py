"""``greenleader run -- celery beat``: exactly one Celery beat across hosts.

Two ``greenleader run`` processes (as on two hosts) each wrap ``celery -A <app> beat`` on one
key; the app (tests/contrib_apps/celery_app.py) sends a tick every 0.2 s to kombu's
``filesystem://`` broker and logs each one it sends, with the node and term ``greenleader run``
gave it. Only the leader's beat sends; when the leading ``greenleader run`` is terminated or
killed, its beat is gone and the other one takes over with a higher term.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gunicorn_apps.harness import REPO, Fleet
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: Bound on a beat process starting (celery's imports on a loaded 2-core CI) or a takeover.
SOON = 30.0


class Beat:
    """``greenleader run ... -- celery -A tests.contrib_apps.celery_app beat`` as node ``node``."""

    def __init__(self, node: str, store: str, workdir: Path, env: dict[str, str]) -> None:
        self.node = node
        self.stderr_path = workdir / f"{node}.log"
        argv = [sys.executable, "-m", "greenleader", "-v", "run", "--store", store, "--key", "celery/beat",
                "--node", node, "--ttl", "2", "--",
                sys.executable, "-m", "celery", "-A", "tests.contrib_apps.celery_app", "beat",
                "--schedule", str(workdir / f"{node}-schedule"), "--loglevel", "INFO"]
        with open(self.stderr_path, "wb") as out:
            self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def ticks(path: Path) -> list[dict[str, Any]]:
    return Fleet._read(path)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_one_beat_across_hosts(tmp_path: Path, signum: int) -> None:
    broker = tmp_path / "broker"
    broker.mkdir()
    log = tmp_path / "ticks.log"
    env = dict(os.environ, CELERY_BROKER_DIR=str(broker), CELERY_TICK_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    store = f"file://{tmp_path / 'elections'}?poll_interval=0.01"
    beats: list[Beat] = []
    try:
        started = time.monotonic()
        a = Beat("a", store, tmp_path, env)
        beats.append(a)
        wait_until(lambda: len(ticks(log)) >= 2, SOON, f"the first beat to send\n{a.log()}")
        startup = ticks(log)[0]["t"] - started  # from greenleader run's start to its beat's first tick
        b = Beat("b", store, tmp_path, env)
        beats.append(b)
        # Had the second runner started its beat, that beat would have sent within about the
        # first one's startup: watch the first one tick for twice as long.
        watch_until = time.monotonic() + 2 * startup
        wait_until(lambda: ticks(log)[-1]["t"] > watch_until, 2 * startup + SOON, "the first beat to go on")
        assert "campaigning" in b.log(), f"the second runner did not campaign\n{b.log()}"
        before = ticks(log)
        senders = {(t["node"], t["pid"], t["term"]) for t in before}
        assert senders == {("a", before[0]["pid"], before[0]["term"])}, (
            f"a beat other than the leader's sent ticks: {sorted(senders)}\n{b.log()}"
        )
        first = before[0]

        a.popen.send_signal(signum)
        wait_until(lambda: sum(t["node"] == "b" for t in ticks(log)) >= 3, SOON,
                   f"the second beat to take over\n{a.log()}\n{b.log()}")
        wait_until(lambda: a.popen.poll() is not None, SOON, "the first greenleader run to exit")
        wait_until(lambda: not alive(first["pid"]), SOON, f"the first beat (pid {first['pid']}) to end")

        after = ticks(log)
        report = "\n".join(f"{t['t']:.3f} {t['node']} pid={t['pid']} term={t['term']}" for t in after)
        takeover = next(t for t in after if t["node"] == "b")
        assert max(t["t"] for t in after if t["node"] == "a") < takeover["t"], f"two beats sent at once:\n{report}"
        assert {(t["node"], t["pid"], t["term"]) for t in after if t["node"] == "b"} == {
            ("b", takeover["pid"], takeover["term"])}, report
        assert takeover["term"] > first["term"], report
        assert len(list(broker.glob("*.msg"))) == len(after), "every tick logged should be in the broker"
        if signum == signal.SIGTERM:
            assert a.popen.returncode in (0, 128 + signum), f"rc {a.popen.returncode}\n{a.log()}"
    finally:
        for beat in beats:
            beat.stop()
