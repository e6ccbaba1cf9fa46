"""greenleader.contrib.django as a user deploys it: real ``gunicorn -k gevent`` masters serving a
Django site (tests/contrib_apps/djsite) whose settings.GREENLEADER configure the election, whose
AppConfig declares the duty, with the status middleware, a ``@leader_only`` view and command, and
``manage.py greenleader status`` / ``run`` next to them.

The election's settings reach the site as APP_STORE/APP_KEY/APP_TTL while greenleader's own
GREENLEADER_* variables are blanked: the workers can only have them from settings.GREENLEADER.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from gevent import GreenletExit

from greenleader.contrib import ElectionConfig
from greenleader.contrib._election import run_as_leader
from greenleader.errors import InvalidArgumentError
from greenleader.stores.memory import MemoryStore
from tests.backends import BackendEnv
from tests.candidate_process import process_url
from tests.contrib_apps.checks import COMMAND_TIMEOUT, CONF, STARTUP, app_env, deployment, run_command
from tests.gunicorn_apps.harness import REPO, Fleet, Master

SITE = REPO / "tests" / "contrib_apps" / "djsite"
APP = "tests.contrib_apps.djsite.wsgi"


@pytest.fixture(params=["file", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    """The file store, and one network store (the hooks are the same for every store)."""
    return request.param


def manage(fleet: Fleet, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SITE / "manage.py"), *args], cwd=REPO, env={**fleet.env, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_django_under_gunicorn(kind: str, backend_env: BackendEnv, key: str, tmp_path: Path) -> None:
    """2 masters x 2 workers and a ``manage.py greenleader run`` worker process: one duty at a
    time fleet-wide; the middleware's and the view's answers; ``status``; handover on the leader
    master's SIGTERM, then to the worker process, which stops its duty on SIGTERM."""
    command = [sys.executable, str(SITE / "manage.py")]
    handover = deployment(tmp_path, app_env(process_url(backend_env), key, 2.0), key, APP, command)
    print(f"\n[figures] {kind}: Django, master SIGTERM handover {handover * 1000:.0f} ms")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_leader_only_command(tmp_path: Path, key: str) -> None:
    """The same @leader_only command started on two hosts (by cron) while one runs it: the other
    skips it (exit 0, and says who holds the command's key); later, with the key free again, it
    runs again with a higher term."""
    once, done = tmp_path / "once.log", tmp_path / "done"
    env = {**Fleet(tmp_path / "fleet", "", "", 2.0).env,
           **app_env(f"file://{tmp_path / 'elections'}?poll_interval=0.01", key, 2.0, ONCE_LOG=str(once))}
    command = [sys.executable, str(SITE / "manage.py"), "once"]
    running = subprocess.Popen([*command, "--until", str(done)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not once.exists() and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert once.exists(), running.communicate(timeout=5) if running.poll() is not None else "not started"
        skipped = run_command(command, env)
        assert skipped.returncode == 0, skipped
        assert skipped.stdout.startswith("skipped: ") and f"holds {key}/commands/once" in skipped.stdout, skipped
        assert len(once.read_text().splitlines()) == 1, once.read_text()
        done.touch()
        out, err = running.communicate(timeout=COMMAND_TIMEOUT)
        assert running.returncode == 0 and out.strip() == "done", (out, err)
    finally:
        if running.poll() is None:
            running.kill()
    again = run_command(command, env)
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



@pytest.mark.slow
@pytest.mark.timeout(60)
def test_outside_any_election(tmp_path: Path, key: str) -> None:
    """In a process without an election (``manage.py shell``, Django's test client): the
    middleware's endpoints and a @leader_only view answer 503 with the status, for a POST too
    (not the endpoints' 405); other paths reach the site."""
    script = (
        "import json; from django.test import Client; c = Client(HTTP_HOST='127.0.0.1'); "
        "print(json.dumps({p: [r.status_code, r.json() if r['Content-Type'] == 'application/json' else None] "
        "for p, r in [('post', c.post('/leader-only')), ('get', c.get('/leader-only')), "
        "('status', c.get('/_greenleader')), ('store', c.get('/_greenleader/store/')), ('index', c.get('/'))]}))"
    )
    env = {**Fleet(tmp_path / "fleet", "", "", 2.0).env, **app_env(f"file://{tmp_path / 'elections'}", key, 2.0)}
    result = run_command([sys.executable, str(SITE / "manage.py")], env, "shell", "-v", "0", "-c", script)
    assert result.returncode == 0, result
    answers = json.loads(result.stdout)
    for name in ("post", "get", "status", "store"):
        code, body = answers[name]
        assert code == 503 and body["is_leader"] is False, (name, answers)
    assert answers["index"] == [200, {"pid": answers["index"][1]["pid"], "node": None}], answers


def test_run_as_leader_on_loss(key: str) -> None:
    """The mechanism of @leader_only commands, on the memory store: the function runs with the
    term; a tenure lost under it kills it before the key is released (``lost``), after which it
    runs again with a higher term; an exception it raises comes out after the release."""
    memory = MemoryStore()
    config = ElectionConfig(store="memory://", key=key, ttl=1.0)
    seen: list[tuple[str, int, bool]] = []

    def lose(term: int) -> None:
        seen.append(("start", term, False))
        try:
            memory.expire(key)
            gevent.sleep(30)
        except GreenletExit:
            seen.append(("killed", term, memory.leader(key) is None))
            raise

    try:
        outcome = run_as_leader(lose, config, store=memory)
        assert outcome.ran and outcome.lost and seen == [("start", outcome.term, False), ("killed", outcome.term, True)]
        again = run_as_leader(lambda term: term, config, store=memory)
        assert again.ran and not again.lost and again.value == again.term and again.term > outcome.term
        with pytest.raises(ValueError, match="boom"):
            run_as_leader(lambda term: int("boom"), config, store=memory)
        assert memory.leader(key) is None
    finally:
        memory.close()
