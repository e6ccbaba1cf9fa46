"""Store health in status(): Candidate, Follower, WorkerElection and the WSGI status document.

Before, a worker whose store was down answered ``/_greenleader`` with 200 and ``leader: null``,
exactly like a vacancy. Now every status says what the election is doing (state), when the
store last answered, its last error (redacted) and how many leadership changes there were;
``/_greenleader/store`` answers 503 while the store is unreachable. The "store down" case runs
on every store: the memory store made to fail, the file store's directory replaced by a file,
and a real Consul, etcd or ZooKeeper server of the test's own, stopped mid-test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from greenleader import Backoff, Candidate, Follower
from greenleader.errors import LeadershipLostError, StoreUnavailableError
from greenleader.gunicorn import WorkerElection
from greenleader.status import STATES, redact
from greenleader.stores.memory import MemoryStore
from greenleader.testing import FaultyStore
from greenleader.wsgi import StatusMiddleware
from tests import servers
from tests.backends import KINDS, REAL_KINDS, BackendEnv, support
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(90)

#: Seconds for anything the store or a renewal deadline decides (Consul's TTL is 10 s).
BOUND = 30.0
SECRET = "s3cr3t-t0ken-value"


def test_status_through_a_tenure(store, key: str, ttl: float) -> None:
    """waiting -> leading -> stopped, with contact ages, counters and the follower's view."""
    candidate = Candidate(store, key, "n1", ttl)
    follower = Follower(store, key)
    assert candidate.status().state == "waiting" and follower.status().state == "waiting"
    assert candidate.status().store.reachable is None  # no store call yet
    elected, _ = candidate.run_for_election()
    follower.follow_election()
    assert next_item(elected, 5, "the initial False") is False
    assert next_item(elected, BOUND, "the win") is True
    wait_until(lambda: follower.status().leader == "n1", BOUND, "the follower names n1")
    status = candidate.status()
    assert status.state == "leading" and status.is_leader and status.term == candidate.term, status
    assert status.transitions == 1 and status.losses == {}, status
    assert status.store.reachable is True and status.store.last_error is None, status
    assert 0 <= status.store.last_contact_age < BOUND, status
    seen = follower.status()
    assert seen.state == "following" and seen.term == status.term and seen.known, seen
    assert seen.store.reachable is True and seen.store.last_contact_age is not None, seen
    candidate.stop()
    wait_until(lambda: follower.status().leader is None, BOUND, "the follower sees the vacancy")
    status = candidate.status()
    assert status.state == "stopped" and not status.is_leader and status.term is None, status
    assert status.transitions == 2 and status.losses == {"stopped": 1}, status
    assert follower.status().leader_changes >= 1
    follower.stop()
    assert follower.status().state == "stopped"
    assert candidate.status().state in STATES


def test_store_errors_are_counted_redacted_and_clear_on_recovery(key: str) -> None:
    """On a FaultyStore: failed renewals make the store unreachable and the leader back off;
    the error text keeps no secret; a success makes it reachable again."""
    faulty = FaultyStore(MemoryStore())
    candidate = Candidate(faulty, key, "n1", 1.0, retry=Backoff(initial=0.1, maximum=0.2))
    elected, _ = candidate.run_for_election()
    assert next_item(elected, 5, "the initial False") is False
    assert next_item(elected, 5, "the win") is True
    error = StoreUnavailableError(f"consul://10.0.0.1:8500?token={SECRET} refused; token={SECRET}")
    fault = faulty.fail_when("renew", error, lambda call: True)
    acquire_fault = faulty.fail_when("acquire", error, lambda call: True)
    assert next_item(elected, 5, "the step-down past the renew deadline") is False
    wait_until(lambda: candidate.status().state == "backing off", 5, "the candidate backs off")
    status = candidate.status()
    assert status.store.reachable is False and status.store.errors >= 2, status
    # "store error" when the last retry is refused; "deadline" if a busy machine woke it too late.
    assert sum(status.losses.values()) == 1 and set(status.losses) <= {"store error", "deadline"}, status
    assert status.transitions == 2, status
    assert SECRET not in status.store.last_error and "token=***" in status.store.last_error, status
    assert status.store.last_error.startswith("StoreUnavailableError: consul://10.0.0.1:8500?token=***")
    faulty.remove_fault(fault)
    faulty.remove_fault(acquire_fault)
    assert next_item(elected, 5, "the win after recovery") is True
    status = candidate.status()
    assert status.state == "leading" and status.store.reachable is True, status
    candidate.stop()


def test_a_loss_the_store_reports_is_not_an_outage(key: str) -> None:
    """A renewal answered "you lost the key" is a store answer: reachable, no store error."""
    faulty = FaultyStore(MemoryStore())
    candidate = Candidate(faulty, key, "n1", 1.0)
    elected, _ = candidate.run_for_election()
    assert next_item(elected, 5, "the initial False") is False
    assert next_item(elected, 5, "the win") is True
    faulty.fail_next("renew", LeadershipLostError("the key was taken"))
    assert next_item(elected, 5, "the step-down") is False
    status = candidate.status()
    assert status.losses == {"expired": 1} and status.store.reachable is True, status
    assert status.store.errors == 0 and status.store.last_error is None, status
    candidate.stop()


@pytest.mark.parametrize("text", [
    "bad URL zookeeper://myapp:hunter2@h1:2181/app?password=hunter2",
    "Authorization: Bearer hunter2hunter2",
    "password: hunter2",
    "X-Consul-Token=hunter2",
    "etcd://h1:2379?token_file=/run/hunter2",
])
def test_redact_hides_credentials(text: str) -> None:
    shown = redact(StoreUnavailableError(text))
    assert "hunter2" not in shown and "***" in shown, shown
    assert shown.startswith("StoreUnavailableError: ")


# -- the store goes down under a worker: every store ----------------------------------------


class _Outage:
    """A store for ``kind`` that the test can take down: ``make()`` and ``down()``."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.cluster = servers.start(kind, workdir / "server", 1) if kind in REAL_KINDS else None
        self.env = BackendEnv(kind=kind, workdir=workdir, cluster=self.cluster)
        self.support = support(kind)
        self.made: list[Any] = []

    def make(self) -> Any:
        store = self.support.make_store(self.env)
        self.made.append(store)
        return store

    def down(self) -> None:
        if self.kind == "memory":
            self.env.shared.fail()
        elif self.kind == "file":
            directory = self.env.workdir / "elections"
            shutil.rmtree(directory)
            directory.write_text("not a directory")  # every open() below it now fails
        else:
            self.cluster.stop()

    def close(self) -> None:
        for store in self.made:
            store.close()
        if self.cluster is not None:
            self.cluster.stop()


@pytest.fixture(params=KINDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Outage]:
    """A store of its own for each kind (a real server is started for this test only)."""
    try:
        made = _Outage(request.param, tmp_path)
    except servers.ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield made
    made.close()


def _worker(outage: _Outage, key: str) -> WorkerElection:
    """A WorkerElection started as a gunicorn worker would start it (without gunicorn)."""
    ttl = support(outage.kind).FAST_TTL
    election = WorkerElection(outage.make, key, ttl, retry=Backoff(initial=0.2, maximum=1.0))
    election._configure({})
    election.node = f"host:1:{outage.kind}"
    gevent.spawn(election._start)
    return election


def _get(app: Any, path: str) -> tuple[int, dict[str, Any]]:
    statuses: list[str] = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, h: statuses.append(s)))
    return int(statuses[0].split()[0]), json.loads(body)


@pytest.mark.timeout(120)
def test_store_down_is_not_a_vacancy(outage: _Outage, key: str) -> None:
    """A leading worker whose store goes down: /_greenleader still answers 200, but says the
    store is unreachable, with the error and the age of the last contact, and steps down;
    /_greenleader/store answers 503; /leader turns 503 once it no longer leads."""
    election = _worker(outage, key)
    app = StatusMiddleware(lambda environ, start_response: [], election=election)
    try:
        wait_until(lambda: election.is_leader(), BOUND, "the worker to lead")
        wait_until(lambda: _get(app, "/_greenleader/store")[0] == 200, BOUND, "the store to be reachable")
        code, body = _get(app, "/_greenleader")
        assert code == 200 and body["state"] == "leading" and body["leader"] == election.node, body
        assert body["store"]["reachable"] is True and body["store"]["backend"] == outage.kind, body
        assert body["transitions"] == 1 and body["store"]["last_contact_age"] < BOUND, body

        outage.down()
        wait_until(lambda: _get(app, "/_greenleader/store")[0] == 503, BOUND, "the store check to answer 503")
        wait_until(lambda: not election.is_leader(), BOUND, "the worker to step down")
        code, body = _get(app, "/_greenleader")
        assert code == 200, body
        assert body["state"] in ("backing off", "campaigning"), body
        # is_leader() turns False at the renew deadline, on the clock; the keepalive greenlet
        # records the step-down when it next runs (later on a busy machine).
        wait_until(lambda: _get(app, "/_greenleader")[1]["transitions"] == 2, BOUND, "the step-down to be counted")
        code, body = _get(app, "/_greenleader")
        assert body["store"]["reachable"] is False and body["store"]["last_error"], body
        assert body["store"]["errors"] >= 1 and body["store"]["last_error_age"] is not None, body
        assert body["leader"] is None and body["is_leader"] is False, body
        assert body["transitions"] == 2 and sum(body["losses"].values()) == 1, body
        assert _get(app, "/_greenleader/leader")[0] == 503
        wait_until(lambda: _get(app, "/_greenleader")[1]["state"] == "backing off", BOUND,
                   "the worker to back off between campaigns")
    finally:
        election.stop()
    assert _get(app, "/_greenleader")[1]["state"] == "stopped"


def test_store_not_made_yet_is_backing_off(tmp_path: Path, key: str) -> None:
    """A worker that cannot even make its store reports it (the file store's directory is a file)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store directory should be")
    election = WorkerElection(f"file://{blocker / 'elections'}", key, 1.0, retry=Backoff(initial=0.2, maximum=1.0))
    election._configure({})
    election.node = "host:1:2"
    starter = gevent.spawn(election._start)
    app = StatusMiddleware(lambda environ, start_response: [], election=election)
    try:
        wait_until(lambda: _get(app, "/_greenleader")[1]["state"] == "backing off", BOUND, "backing off")
        code, body = _get(app, "/_greenleader")
        assert code == 200 and body["store"]["reachable"] is False and body["store"]["backend"] == "file", body
        assert body["store"]["last_error"] and body["store"]["last_contact_age"] is None, body
        assert _get(app, "/_greenleader/store")[0] == 503
    finally:
        starter.kill()
        election.stop()
