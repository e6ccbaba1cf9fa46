"""A typed user program over greenleader's public API, checked with ``mypy --strict`` by
tests/test_typing.py (never run). Every ``assert_type`` states what a user's type checker must
infer; an API that lost its annotations makes mypy fail here (an untyped call or an ``Any``).
"""

from __future__ import annotations

from typing import assert_type

import gevent
from apscheduler.schedulers.gevent import GeventScheduler

import greenleader
from greenleader import Backoff, Candidate, Follower, errors, from_url, new_store
from greenleader.contrib.apscheduler import LeaderScheduler, current_term
from greenleader.duties import Duties, DutyRunner, current_runner, duty
from greenleader.events import LeaderChanged, LeadershipAcquired, LeadershipLost, LossReason
from greenleader.gunicorn import WorkerElection, post_fork, worker_exit
from greenleader.stores import Store
from greenleader.wsgi import StatusMiddleware

assert_type(greenleader.__version__, str)

store: Store = from_url("file:///tmp/elections")
other_store = new_store("memory")
candidate = Candidate(store, "jobs/scheduler", "web-1", ttl=15.0, retry=Backoff(initial=0.5, maximum=30.0))
elected, campaign_errors = candidate.run_for_election()
for is_leader in elected:
    assert_type(is_leader, bool)
for error in campaign_errors:
    assert_type(error, BaseException)
assert_type(candidate.is_leader(), bool)
assert_type(candidate.term, int | None)

with Follower(other_store, "jobs/scheduler") as follower:
    leaders, follow_errors = follower.follow_election()
    for node in leaders:
        assert_type(node, str | None)
    assert_type(follower.leader(), str | None)


# A duty gets its election without an Optional: current_runner() never returns None.
@duty
def scheduler_duty(term: int) -> None:
    runner = current_runner()
    assert_type(runner, DutyRunner)
    while runner.leads(term):
        node: str = runner.candidate.node
        print(node, term)
        gevent.sleep(1)


registry = Duties(on_error="resign")


@registry(name="reports", on_error="stop")
def reports(term: int) -> None:
    if not current_runner().leads(term):
        return


runner: DutyRunner = registry.run(candidate)
runner.stop()

# gunicorn hooks, as in a gunicorn.conf.py.
election = WorkerElection("consul://127.0.0.1:8500", "myapp/scheduler", ttl=15)
hooks = (election.post_fork, election.worker_exit, post_fork, worker_exit)
assert_type(election.is_leader(), bool)
assert_type(election.term, int | None)


def hello(environ: dict[str, object], start_response: object) -> list[bytes]:
    return [b"hello"]


app = StatusMiddleware(hello)

# APScheduler: the jobs run on the leader only, each with its fencing term.
aps = GeventScheduler()
leader_jobs = LeaderScheduler(aps, on_loss="pause")


def report() -> None:
    term = current_term()
    assert_type(term, int)
    if leader_jobs.leads(term):
        print("report for term", term)


aps.add_job(report, "interval", seconds=10)


def on_event(event: LeadershipAcquired | LeadershipLost | LeaderChanged) -> None:
    if isinstance(event, LeadershipLost):
        assert_type(event.reason, LossReason)
        assert_type(event.term, int)


try:
    Candidate(store, "", "web-1")
except errors.InvalidArgumentError as exc:
    assert_type(exc, errors.InvalidArgumentError)
