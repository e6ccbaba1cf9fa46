"""greenleader.contrib.apscheduler: a GeventScheduler's jobs run on the leader only.

In-process, two candidates on one key, each with its own GeventScheduler and LeaderScheduler
(as two gunicorn workers have), on the memory and file stores and on etcd (the real stores
share the duty machinery; one real store checks it over the wire); then under real
``gunicorn -k gevent`` masters (tests/contrib_apps/apscheduler_app.py), on the file store.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from apscheduler.events import EVENT_SCHEDULER_PAUSED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.base import STATE_PAUSED, STATE_STOPPED
from apscheduler.schedulers.gevent import GeventScheduler
from gevent import GreenletExit
from gevent.queue import Queue

from greenleader import Candidate
from greenleader.contrib.apscheduler import LeaderScheduler, current_term
from greenleader.duties import Duties, DutyRunner
from greenleader.errors import InvalidArgumentError
from greenleader.stores import Store
from tests.backends import BackendEnv
from tests.candidate_process import process_url
from tests.gunicorn_apps.harness import Fleet
from tests.waiting import next_item, wait_until

#: Seconds between a job's runs: short, so that a test sees several runs per tenure.
EVERY = 0.05
#: Bound on anything that should happen within a few store round trips (a loaded 2-core CI).
SOON = 15.0


@pytest.fixture(params=["memory", "file", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


class KeptJobStore(MemoryJobStore):
    """A job store whose jobs outlive a shutdown (MemoryJobStore's do not)."""

    def shutdown(self) -> None:
        pass


class Node:
    """One process's worth: a candidate, a duty registry, a scheduler and its LeaderScheduler."""

    def __init__(self, name: str, store: Store, key: str, ttl: float, log: Queue[tuple[Any, ...]], *,
                 job: Callable[[Node], None] | None = None, on_loss: str = "pause") -> None:
        self.name = name
        self.log = log
        self.candidate = Candidate(store, key, name, ttl, resign_holdoff=0.5)
        self.duties = Duties()
        # With on_loss="shutdown", a job store that keeps its jobs through a shutdown, as a
        # persistent one (SQLAlchemy, Redis...) does.
        self.scheduler = GeventScheduler(jobstores={"default": KeptJobStore()} if on_loss == "shutdown" else {})
        self.leader = LeaderScheduler(self.scheduler, duties=self.duties, on_loss=on_loss)
        self.scheduler.add_job((job or Node.tick), "interval", args=(self,), seconds=EVERY, id="tick",
                               max_instances=1, coalesce=True)
        self.runner: DutyRunner | None = None

    def tick(self) -> None:
        self.log.put(("tick", self.name, current_term(), time.monotonic()))

    def run(self) -> DutyRunner:
        self.runner = self.duties.run(self.candidate)
        return self.runner

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.scheduler.state != STATE_STOPPED:
            self.scheduler.shutdown(wait=False)


def until_tick(log: Queue[tuple[Any, ...]], name: str, what: str) -> tuple[Any, ...]:
    """The next tick of ``name``, failing on a tick of any other node first."""
    item = next_item(log, SOON, what)
    assert item[0] == "tick" and item[1] == name, f"{item} while waiting for {what}"
    return item


@pytest.fixture
def nodes(make_store: Callable[[], Store], key: str, ttl: float) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str, log: Queue[tuple[Any, ...]], **options: Any) -> Node:
        node = Node(name, make_store(), key, ttl, log, **options)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.mark.parametrize("on_loss", ["pause", "shutdown"])
def test_jobs_run_on_the_leader_only(nodes: Callable[..., Node], on_loss: str) -> None:
    """Only the leader's jobs run, with its term; on a handover the old scheduler is paused
    (or shut down) and the new leader's starts; back again, the first one resumes."""
    log: Queue[tuple[Any, ...]] = Queue()
    one = nodes("one", log, on_loss=on_loss)
    one.run()
    first = until_tick(log, "one", "the first leader's job")
    term = first[2]
    assert term == one.candidate.term and one.leader.term == term
    other = nodes("other", log, on_loss=on_loss)
    other.run()
    for _ in range(3):
        assert until_tick(log, "one", "more of the leader's jobs")[2] == term  # never "other"'s

    assert one.runner is not None
    one.runner.resign()  # returns once "one" no longer leads; its jobs are stopped before the release
    expected = STATE_PAUSED if on_loss == "pause" else STATE_STOPPED
    assert one.scheduler.state == expected, f"scheduler state {one.scheduler.state} after the loss"
    while (item := next_item(log, SOON, "the new leader's job"))[1] == "one":
        assert item[2] == term, f"a run of 'one' after its tenure: {item}"
    second_term = item[2]
    assert item[1] == "other" and second_term > term, item
    until_tick(log, "other", "the new leader's jobs go on")

    assert other.runner is not None
    other.runner.resign()  # "one" campaigns again after its holdoff and wins
    while (item := next_item(log, SOON, "the first scheduler to resume"))[1] == "other":
        assert item[2] == second_term, item
    assert item[1] == "one" and item[2] > second_term, item


def test_a_running_job_is_stopped_before_the_release(nodes: Callable[..., Node]) -> None:
    """A job running at the loss gets GreenletExit once the scheduler is paused, and its
    cleanup (slow on purpose) ends before another candidate can win."""
    log: Queue[tuple[Any, ...]] = Queue()

    def long_job(node: Node) -> None:
        term = current_term()
        node.log.put(("running", node.name, term, time.monotonic()))
        try:
            gevent.sleep(60)
        except GreenletExit:
            gevent.sleep(0.5)  # a slow cleanup: the release must wait for it
            node.log.put(("stopped", node.name, term, node.scheduler.state))
            raise

    one = nodes("one", log, job=long_job)
    one.run()
    _, _, term, _ = next_item(log, SOON, "the long job to start")
    other = nodes("other", log, job=long_job)
    other.run()
    wait_until(lambda: not other.candidate.is_leader(), SOON, "the other candidate to campaign")
    assert one.runner is not None
    gevent.spawn(one.runner.resign)
    stopped = next_item(log, SOON, "the job to be stopped")
    assert stopped == ("stopped", "one", term, STATE_PAUSED), f"{stopped}: the job was not stopped first"
    started = next_item(log, SOON, "the new leader's job")
    assert started[:2] == ("running", "other") and started[2] > term, started


def test_a_loss_the_store_reports_pauses_the_scheduler(nodes: Callable[..., Node], backend: Any, key: str) -> None:
    """The key dropped out of band (as at a TTL expiry): the scheduler is paused and no job of
    that term runs afterwards; the jobs resume with a new term when the node wins again."""
    log: Queue[tuple[Any, ...]] = Queue()
    one = nodes("one", log)
    one.scheduler.add_listener(lambda event: log.put(("paused",)), EVENT_SCHEDULER_PAUSED)
    one.run()
    term = until_tick(log, "one", "the leader's job")[2]
    backend.force_expire(one.candidate.store, key)
    while (item := next_item(log, SOON, "the scheduler to be paused"))[0] == "tick":
        assert item[2] == term, item
    assert item == ("paused",), item
    item = until_tick(log, "one", "a job run in the next tenure")
    assert item[2] > term, f"a run of term {term} after the pause: {item}"


def test_no_job_starts_outside_a_tenure(nodes: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    """A scheduler resumed by hand after the loss submits its due jobs, which are skipped."""
    log: Queue[tuple[Any, ...]] = Queue()
    one = nodes("one", log)
    runner = one.run()
    until_tick(log, "one", "the leader's job")
    runner.stop()
    assert one.scheduler.state == STATE_PAUSED
    while not log.empty():
        log.get()
    one.scheduler.resume()
    wait_until(lambda: "not run: this process does not lead" in caplog.text, SOON, "a skipped job run")
    assert log.empty(), f"a job ran without leadership: {log.get()}"


def test_bad_use() -> None:
    """Errors from greenleader.errors, each saying what is wrong."""
    with pytest.raises(InvalidArgumentError, match="GeventScheduler"):
        LeaderScheduler(object(), duties=Duties())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="on_loss"):
        LeaderScheduler(GeventScheduler(), duties=Duties(), on_loss="kill")
    with pytest.raises(InvalidArgumentError, match="persistent job stores"):
        LeaderScheduler(GeventScheduler(), duties=Duties(), on_loss="shutdown")
    with pytest.raises(InvalidArgumentError, match="could not be stopped"):
        LeaderScheduler(GeventScheduler(executors={"default": ThreadPoolExecutor(2)}), duties=Duties())
    running = GeventScheduler()
    running.start()
    try:
        with pytest.raises(InvalidArgumentError, match="already running"):
            LeaderScheduler(running, duties=Duties())
    finally:
        running.shutdown(wait=False)
    with pytest.raises(InvalidArgumentError, match="current_term"):
        current_term()


# -- under real gunicorn masters ----------------------------------------------------------------

APP = "tests.contrib_apps.apscheduler_app:app"
#: Bound for fresh masters to boot and elect (loaded CI), and for a SIGTERM handover to show.
STARTUP = 30.0


def job_runs(path: Path) -> list[dict[str, Any]]:
    """Each job run in the app's log: {pid, master, term, start, end, how} (how: done, stopped
    or running), in order of start."""
    runs: dict[tuple[int, float], dict[str, Any]] = {}
    open_run: dict[int, dict[str, Any]] = {}
    for line in Fleet._read(path):
        if line["event"] == "run":
            run = dict(pid=line["pid"], master=line["master"], term=line["term"], start=line["t"], end=line["t"],
                       how="running")
            runs[(line["pid"], line["t"])] = open_run[line["pid"]] = run
        else:
            run = open_run.pop(line["pid"])
            run.update(end=line["t"], how=line["event"])
    return sorted(runs.values(), key=lambda r: r["start"])


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["file"], indirect=True)
def test_gunicorn_two_masters(backend_env: BackendEnv, key: str, tmp_path: Path) -> None:
    """2 masters x 2 workers, each worker with a LeaderScheduler: the job (which logs its term
    and pid) runs in the leader worker only, never in two at once; the leader master's SIGTERM
    stops the job running there before the key is released, and the jobs resume in the other
    master with a higher term."""
    with Fleet(tmp_path / "fleet", process_url(backend_env), key, 1.0) as fleet:
        path = fleet.workdir / "jobs.log"
        for _ in range(2):
            fleet.start(workers=2, app=APP, env={"APSCHEDULER_LOG": str(path)})

        def report() -> str:
            return "\n".join(f"{r['start']:.3f}-{r['end']:.3f} pid={r['pid']} master={r['master']} "
                             f"term={r['term']} {r['how']}" for r in job_runs(path))

        def running() -> dict[str, Any] | None:  # a job run under way, after a completed one
            runs = job_runs(path)
            return runs[-1] if len(runs) >= 2 and runs[-1]["how"] == "running" else None

        first = fleet.wait_for("a job running after a completed one", running, STARTUP)
        leader = next(m for m in fleet.masters if m.pid == first["master"])
        sent = leader.send(signal.SIGTERM)
        second = fleet.wait_for(
            "a job run in the other master",
            lambda: next((r for r in job_runs(path) if r["start"] > sent and r["master"] != leader.pid), None),
            STARTUP,
        )
        assert leader.wait_exit(20) == 0, leader.tail()

        runs = job_runs(path)
        history = report()
        stopped = next((r for r in runs if r["start"] == first["start"]), None)
        assert stopped is not None and stopped["how"] == "stopped", (
            f"the job running at the SIGTERM was not stopped:\n{history}"
        )
        for before, after in itertools.pairwise(runs):
            assert before["end"] <= after["start"], f"two jobs ran at once:\n{history}\n{fleet.report()}"
            assert after["term"] >= before["term"], f"a job of an older term ran later:\n{history}"
        assert stopped["end"] < second["start"] and second["term"] > first["term"], history
        pids = {r["pid"] for r in runs}
        assert len(pids) <= 3, f"jobs ran in more workers than the leaders:\n{history}"
