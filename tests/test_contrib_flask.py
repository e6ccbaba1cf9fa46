"""greenleader.contrib.flask as a user deploys it: real ``gunicorn -k gevent`` masters serving a
Flask app (tests/contrib_apps/flaskapp.py) whose ``app.config`` configures the election through
``GreenLeader(app)``, with a duty, a ``@leader_only`` view, the status endpoints, and
``flask greenleader status`` / ``run`` next to them. In-process: the extension's settings
checks, on the memory store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flask import Flask

from greenleader.contrib.flask import GreenLeader, leader_only
from greenleader.errors import InvalidArgumentError
from tests.backends import BackendEnv
from tests.candidate_process import process_url
from tests.contrib_apps.checks import CONF, STARTUP, app_env, deployment
from tests.gunicorn_apps.harness import Fleet

APP = "tests.contrib_apps.flaskapp:app"
COMMAND = [sys.executable, "-m", "flask", "--app", "tests.contrib_apps.flaskapp"]


@pytest.fixture(params=["file", "zookeeper"])
def kind(request: pytest.FixtureRequest) -> str:
    """The file store, and one network store (the hooks are the same for every store)."""
    return request.param


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flask_under_gunicorn(kind: str, backend_env: BackendEnv, key: str, tmp_path: Path) -> None:
    """2 masters x 2 workers and a ``flask greenleader run`` worker process (see
    tests.contrib_apps.checks.deployment)."""
    handover = deployment(tmp_path, app_env(process_url(backend_env), key, 2.0), key, APP, COMMAND)
    print(f"\n[figures] {kind}: Flask, master SIGTERM handover {handover * 1000:.0f} ms")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_config_fails_the_boot(tmp_path: Path, key: str) -> None:
    """A bad app.config stops the master with the reason, like an app that does not load."""
    env = app_env(f"file://{tmp_path / 'elections'}", key, 2.0)
    env["APP_TTL"] = "soon"
    with Fleet(tmp_path / "fleet", "", "", 2.0) as fleet:
        master = fleet.start(workers=1, app=APP, conf=CONF, env=env)
        code = master.wait_exit(STARTUP)
        text = master.log_text()
        assert code != 0 and "Worker failed to boot" in text, text
        assert "app.config['GREENLEADER_TTL'] must be a number" in text, text


def test_extension_in_process(tmp_path: Path) -> None:
    """init_app checks app.config (names with the prefix); outside any election the status
    endpoints and a @leader_only view answer 503; other paths reach the app."""
    app = Flask(__name__)
    with pytest.raises(InvalidArgumentError, match=r"unknown settings GREENLEADER_TIMEOUT"):
        app.config.update(GREENLEADER_STORE="memory://", GREENLEADER_KEY="k", GREENLEADER_TIMEOUT=3)
        GreenLeader(app)
    app = Flask(__name__)
    app.config.update(GREENLEADER_STORE="memory://", GREENLEADER_KEY="k", GREENLEADER_STATUS_PATH="/health/gl/")
    leader = GreenLeader()
    leader.init_app(app)
    assert app.extensions["greenleader"] is leader and leader.config is not None
    assert leader.config.status_path == "/health/gl"

    @app.route("/only")
    @leader_only
    def only() -> str:
        return "ran"

    @app.post("/only-post")
    @leader_only
    def only_post() -> str:
        return "ran"

    @app.route("/custom")
    @leader.leader_only(response=lambda: ("elsewhere", 409))
    def custom() -> str:
        return "ran"

    @app.route("/")
    def index() -> str:
        return "index"

    client = app.test_client()
    for path in ("/health/gl", "/health/gl/leader", "/health/gl/leader-master", "/health/gl/store", "/only"):
        resp = client.get(path)
        assert resp.status_code == 503 and resp.json["is_leader"] is False, (path, resp.data)
    resp = client.post("/only-post")  # 503 for any method, not the status endpoints' 405
    assert resp.status_code == 503 and resp.json["is_leader"] is False, resp.data
    assert client.get("/custom").status_code == 409
    assert client.get("/").data == b"index"
    with pytest.raises(InvalidArgumentError):
        GreenLeader(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(("url", "code", "output"), [
    ("memory://", 1, "leader: (none)"),
    ("consul://127.0.0.1:1", 69, "the store is unreachable"),  # nothing listens on port 1
], ids=["vacant", "unreachable"])
def test_status_command_exit_codes(url: str, code: int, output: str) -> None:
    """``flask greenleader status`` tells a vacancy (1) from an unreachable store (69)."""
    app = Flask(__name__)
    app.config.update(GREENLEADER_STORE=url, GREENLEADER_KEY="k")
    GreenLeader(app)
    result = app.test_cli_runner().invoke(args=["greenleader", "status"])
    assert result.exit_code == code and output in result.output, (result.exit_code, result.output)
