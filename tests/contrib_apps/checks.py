"""What the Django and Flask tests check alike, on a tests.gunicorn_apps.harness Fleet."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.gunicorn_apps.harness import REPO, Fleet

CONF = REPO / "tests" / "contrib_apps" / "conf.py"

#: Seconds for fresh masters to boot and elect someone on a loaded 2-core CI machine.
STARTUP = 30.0
#: SIGTERM to the leader's master -> the duty runs elsewhere; the plain hooks' bound (test_gunicorn).
HANDOVER_BOUND = 1.0
#: Seconds a manage.py or flask command may take (Django, Flask and gevent import in a second or
#: two; CI is slow).
COMMAND_TIMEOUT = 60.0


def app_env(url: str, key: str, ttl: float, **extra: str) -> dict[str, str]:
    """The test apps' settings come from APP_*; greenleader's own variables are blanked, so that
    the election can only have its settings from the framework's."""
    return {"GREENLEADER_STORE": "", "GREENLEADER_KEY": "", "GREENLEADER_TTL": "",
            "APP_STORE": url, "APP_KEY": key, "APP_TTL": str(ttl), **extra}


def leader_only_answers(fleet: Fleet, node: str, timeout: float) -> None:
    """GET /leader-only until the leader answered 200 with its node, and another worker 503
    with the status (is_leader false)."""
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


def run_command(command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)


def deployment(tmp_path: Path, env: dict[str, str], key: str, app: str, command: list[str]) -> float:
    """A site as its users deploy it: 2 masters x 2 workers with the contrib hooks (one of them
    with --preload), and a
    ``<command> greenleader run`` worker process next to them. One duty at a time fleet-wide;
    the status endpoints and a @leader_only view answer as the duty log says; ``greenleader
    status`` names the leader; the leader master's SIGTERM hands over within HANDOVER_BOUND;
    the worker process leads once the masters are gone and stops its duty on SIGTERM.
    Returns the handover's seconds."""
    with Fleet(tmp_path / "fleet", "", "", float(env["APP_TTL"])) as fleet:
        env = {**fleet.env, **env}
        # NODE names the host part: site-a:master-pid:worker-pid. site-b loads the app in the
        # master (--preload): the settings registered there reach the forked workers.
        for name, args in (("site-a", ()), ("site-b", ("--preload",))):
            fleet.start(workers=2, app=app, conf=CONF, args=args, env={**env, "APP_NODE": name})
        first = fleet.current(STARTUP)
        assert first.node.startswith(("site-a:", "site-b:")), first
        fleet.wait_for("every worker to campaign", lambda: all(m.campaigning() >= 2 for m in fleet.masters), STARTUP)
        fleet.scan_status(first, STARTUP)  # /_greenleader/leader and /leader-master
        leader_only_answers(fleet, first.node, STARTUP)
        for master in fleet.masters:  # greenleader.wsgi's other endpoints, through the integration
            code, body = master.get("/_greenleader/store")
            assert code == 200 and body["store"]["reachable"] is True, (code, body)
            code, text = master.get("/_greenleader/metrics")
            assert code == 200 and "greenleader_" in text, (code, text)

        status = run_command(command, env, "greenleader", "status")
        assert status.returncode == 0, status
        assert f"leader: {first.node}\n" in status.stdout and f"key:    {key}\n" in status.stdout, status.stdout
        assert "duties: tick" in status.stdout, status.stdout

        run_out = tmp_path / "run.out"
        with run_out.open("w") as out:
            worker = subprocess.Popen([*command, "greenleader", "run"], cwd=REPO,
                                      env={**env, "APP_NODE": "worker-process"}, stdout=out, stderr=subprocess.STDOUT)
        try:
            fleet.wait_for("the greenleader run command to campaign",
                           lambda: "campaigning for" in run_out.read_text(), STARTUP)
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
            status = run_command(command, env, "greenleader", "status", "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["leader"] == "worker-process", status
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0, run_out.read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
        tenures = fleet.check_history()
        assert tenures[-1].node == "worker-process" and tenures[-1].stopped, fleet.report()
        status = run_command(command, env, "greenleader", "status")
        assert status.returncode == 1 and "leader: (none)" in status.stdout, status
        for master in fleet.masters:  # a non-leader's 503 is an answer, not an error to log
            assert "Service Unavailable" not in master.log_text(), master.tail()
    assert handover <= HANDOVER_BOUND, f"handover took {handover:.3f}s, bound {HANDOVER_BOUND:g}s"
    return handover
