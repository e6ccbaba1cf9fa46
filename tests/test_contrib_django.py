"""greenleader.contrib.django as a user deploys it: real ``gunicorn -k gevent`` masters serving a
Django site (tests/contrib_apps/djsite) whose settings.GREENLEADER configure the election, whose
AppConfig declares the duty, with the status middleware, a ``@leader_only`` view and command, and
``manage.py greenleader status`` / ``run`` next to them.

The election's settings reach the site as APP_STORE/APP_KEY/APP_TTL while greenleader's own
GREENLEADER_* variables are blanked: the workers can only have them from settings.GREENLEADER.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from greenleader.contrib import ElectionConfig
from greenleader.errors import InvalidArgumentError
from tests.backends import BackendEnv
from tests.candidate_process import process_url
from tests.gunicorn_apps.harness import REPO, Fleet, Master

SITE = REPO / "tests" / "contrib_apps" / "djsite"
CONF = REPO / "tests" / "contrib_apps" / "conf.py"
APP = "tests.contrib_apps.djsite.wsgi"
#: Seconds for fresh masters to boot and elect someone on a loaded 2-core CI machine.
STARTUP = 30.0
#: SIGTERM to the leader's master -> the duty runs elsewhere; the plain hooks' bound (test_gunicorn).
HANDOVER_BOUND = 1.0
#: Seconds a manage.py command may take (Django and gevent import in a second or two; CI is slow).
COMMAND_TIMEOUT = 60.0


@pytest.fixture(params=["file", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    """The file store, and one network store (the hooks are the same for every store)."""
    return request.param


def app_env(url: str, key: str, ttl: float, **extra: str) -> dict[str, str]:
    return {"GREENLEADER_STORE": "", "GREENLEADER_KEY": "", "GREENLEADER_TTL": "",
            "APP_STORE": url, "APP_KEY": key, "APP_TTL": str(ttl), **extra}


def manage(fleet: Fleet, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SITE / "manage.py"), *args], cwd=REPO, env={**fleet.env, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def leader_only_answers(fleet: Fleet, node: str, timeout: float) -> None:
    """GET /leader-only until the leader answered 200 with its node and another worker 503."""
    seen: set[int] = set()

    def check() -> bool:
        for master in fleet.masters:
            if not master.running():
                continue
            code, body = master.get("/leader-only")
            assert code in (200, 503), f"{master!r}: /leader-only answered {code} {body!r}"
            if code == 200:
                assert body["node"] == node, f"/leader-only ran in {body}, the duty runs in {node}\n{fleet.report()}"
            else:
                assert body["is_leader"] is False and body["node"] != node, body
            seen.add(code)
        return seen == {200, 503}

    fleet.wait_for("/leader-only answers from the leader (200) and from another worker (503)", check, timeout)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_django_under_gunicorn(kind: str, backend_env: BackendEnv, key: str, tmp_path: Path) -> None:
    """2 masters x 2 workers and a ``manage.py greenleader run`` worker process: one duty at a
    time fleet-wide; the middleware's and the view's answers; ``status``; handover on the leader
    master's SIGTERM, then to the worker process, which stops its duty on SIGTERM."""
    ttl = 2.0
    env = app_env(process_url(backend_env), key, ttl)
    with Fleet(tmp_path / "fleet", "", "", ttl) as fleet:
        for name in ("site-a", "site-b"):  # NODE names the host part: site-a:master-pid:worker-pid
            fleet.start(workers=2, app=APP, conf=CONF, env={**env, "APP_NODE": name})
        first = fleet.current(STARTUP)
        assert first.node.startswith(("site-a:", "site-b:")), first
        fleet.scan_status(first, STARTUP)  # /_greenleader/leader and /leader-master, from the middleware
        leader_only_answers(fleet, first.node, STARTUP)

        status = manage(fleet, env, "greenleader", "status")
        assert status.returncode == 0, status.stderr
        assert f"leader: {first.node}\n" in status.stdout and f"key:    {key}\n" in status.stdout, status.stdout
        assert "duties: tick" in status.stdout, status.stdout

        out = (tmp_path / "run.out").open("w")
        worker = subprocess.Popen([sys.executable, str(SITE / "manage.py"), "greenleader", "run"], cwd=REPO,
                                  env={**fleet.env, **env, "APP_NODE": "worker-process"}, stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            fleet.wait_for("manage.py greenleader run to campaign",
                           lambda: "campaigning for" in (tmp_path / "run.out").read_text(), STARTUP)
            master = fleet.master_of(first.node)
            sent = master.send(signal.SIGTERM)
            second = fleet.wait_tenure(HANDOVER_BOUND + 10, after=sent, exclude=first.node)
            handover = second.start - sent
            assert master.wait_exit(20) == 0, master.tail()
            for other in fleet.masters:  # then the worker process alone is left to lead
                if other.running():
                    other.send(signal.SIGTERM)
                    assert other.wait_exit(20) == 0, other.tail()
            last = fleet.current(STARTUP)
            assert last.node == "worker-process", fleet.report()
            status = manage(fleet, env, "greenleader", "status", "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["leader"] == "worker-process", status

            worker.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0, (tmp_path / "run.out").read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
            out.close()
        tenures = fleet.check_history()
        assert tenures[-1].node == "worker-process" and tenures[-1].stopped, fleet.report()
        status = manage(fleet, env, "greenleader", "status")
        assert status.returncode == 1 and "leader: (none)" in status.stdout, status
    print(f"\n[figures] {kind}: Django master SIGTERM handover {handover * 1000:.0f} ms")
    assert handover <= HANDOVER_BOUND, f"handover took {handover:.3f}s, bound {HANDOVER_BOUND:g}s"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_leader_only_command(tmp_path: Path, key: str) -> None:
    """Two hosts' cron start the same @leader_only command at once: one runs it, the other skips;
    later, with the key free again, it runs again with a higher term."""
    once = tmp_path / "once.log"
    env = app_env(f"file://{tmp_path / 'elections'}?poll_interval=0.01", key, 2.0, ONCE_LOG=str(once))
    fleet = Fleet(tmp_path / "fleet", "", "", 2.0)
    argv = [sys.executable, str(SITE / "manage.py"), "once", "--sleep", "3"]
    procs = [subprocess.Popen(argv, cwd=REPO, env={**fleet.env, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=COMMAND_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = once.read_text().splitlines()
    assert len(ran) == 1, (ran, outputs)
    skipped = [out for out, _ in outputs if out.startswith("skipped: ")]
    assert len(skipped) == 1 and f"holds {key}/commands/once" in skipped[0], outputs
    again = manage(fleet, env, "once")
    assert again.returncode == 0 and again.stdout.strip() == "done", again
    terms = [json.loads(line)["term"] for line in once.read_text().splitlines()]
    assert len(terms) == 2 and terms[1] > terms[0], terms


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_settings_fail_the_boot(tmp_path: Path, key: str) -> None:
    """A bad settings.GREENLEADER stops the master with the reason, like an app that does not load."""
    env = app_env(f"file://{tmp_path / 'elections'}", key, 2.0)
    env["APP_TTL"] = "soon"
    with Fleet(tmp_path / "fleet", "", "", 2.0) as fleet:
        master: Master = fleet.start(workers=1, app=APP, conf=CONF, env=env)
        code = master.wait_exit(STARTUP)
        text = master.log_text()
        assert code != 0 and "Worker failed to boot" in text, text
        assert "settings.GREENLEADER['TTL']" in text, text
        check = manage(fleet, env, "check")
        assert check.returncode != 0 and "greenleader.E001" in check.stderr, check


def test_settings_validation() -> None:
    """Unknown names, missing STORE/KEY and bad values are InvalidArgumentErrors naming the setting;
    missing names fall back to greenleader's environment variables."""
    env = {"GREENLEADER_STORE": "file:///tmp/x", "GREENLEADER_KEY": "env/key", "GREENLEADER_TTL": "7"}
    config = ElectionConfig.from_settings({"KEY": "app/jobs", "RESIGN_HOLDOFF": 1}, where="S", env=env)
    assert (config.store, config.key, config.ttl, config.candidate_options) == (
        "file:///tmp/x", "app/jobs", 7.0, {"resign_holdoff": 1.0})
    assert config.status_path == "/_greenleader" and "file" not in repr(config)
    for values, message in [
        ({"STORE": "file:///x", "KEY": "k", "TIMEOUT": 1}, "unknown settings TIMEOUT"),
        ({"KEY": "k"}, "no STORE"),
        ({"STORE": "file:///x"}, "no KEY"),
        ({"STORE": "localhost:8500", "KEY": "k"}, "not a store URL"),
        ({"STORE": "file:///x", "KEY": "k", "TTL": -1}, "S['TTL']"),
        ({"STORE": "file:///x", "KEY": "k", "STATUS_PATH": "status"}, "STATUS_PATH"),
        ("file:///x", "must be a dict"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ElectionConfig.from_settings(values, where="S", env={})  # type: ignore[arg-type]

