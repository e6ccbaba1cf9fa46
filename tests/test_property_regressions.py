"""Failures that tests/test_properties.py found, each replayed as a plain test.

Each test replays the shrunk example Hypothesis printed (the same steps of the same state
machine, with the same checks: see tests/test_properties.py), with ``allow_time_to_pass`` standing in
for steps that only let time pass. The docstring says which rule of docs/safety.md ("The contract") it broke
and on which code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.test_properties import ElectionMachine, FileElection, MemoryElection

pytestmark = pytest.mark.timeout(60)

MACHINES = {"memory": MemoryElection, "file": FileElection}


@contextlib.contextmanager
def election(kind: str) -> Iterator[ElectionMachine]:
    """The state machine of tests/test_properties.py, checked at the end and torn down."""
    state = MACHINES[kind]()
    try:
        yield state
        state.contract_holds()
    finally:
        state.teardown()


@pytest.mark.parametrize("kind", MACHINES)
def test_a_renewal_raising_greenlet_exit_steps_down_before_the_release(kind):
    """Rule 9. On 130ad3a: c0 released term 1 before stepping down: is_leader() still True,
    its duty still running, no False on elected, no LeadershipLost (finding 2)."""
    with election(kind) as state:
        state.setup(candidates=[False, False], followers=[False], ttl=0.6)
        state.allow_time_to_pass(0.3)  # c0 wins
        state.fail_candidate_call(after=False, error="GreenletExit", primitive="renew", seat=0, times=1)
        state.allow_time_to_pass(0.6)  # its next renewal raises


@pytest.mark.parametrize("kind", MACHINES)
@pytest.mark.parametrize("error", ["InvalidArgumentError", "RuntimeError"])
def test_a_renewal_raising_an_unexpected_error_steps_down_before_the_release(kind, error):
    """Rule 9. On 130ad3a: the release came while c0 still led (finding 2)."""
    with election(kind) as state:
        state.setup(candidates=[False, True], followers=[True], ttl=0.6)
        state.allow_time_to_pass(0.3)
        state.fail_candidate_call(after=False, error=error, primitive="renew", seat=0, times=1)
        state.allow_time_to_pass(0.6)


@pytest.mark.parametrize("kind", MACHINES)
def test_a_candidate_resigned_directly_kills_its_duties_before_the_release(kind):
    """Rule 9. On 130ad3a: c0 released term 1 while its duty still ran (the DutyRunner killed
    it only when it read False from the queue), and c1's tenure began beside it."""
    with election(kind) as state:
        state.setup(candidates=[False, False], followers=[False], ttl=0.8)
        state.allow_time_to_pass(0.3)
        state.resign(seat=0, via_runner=False)
        state.allow_time_to_pass(0.3)


@pytest.mark.parametrize("kind", MACHINES)
def test_a_candidate_stopped_directly_kills_its_duties_before_the_release(kind):
    """Rule 9. On 130ad3a: c0 released term 1 while its duty still ran."""
    with election(kind) as state:
        state.setup(candidates=[False, False, True], followers=[False], ttl=0.8)
        state.allow_time_to_pass(0.3)
        state.stop(seat=0, via_runner=False)
        state.allow_time_to_pass(0.3)


@pytest.mark.parametrize("kind", MACHINES)
def test_a_forked_child_inherits_no_leadership(kind):
    """Rule 11. On 130ad3a, in the child: c0 said it leads and renewed (finding 4)."""
    with election(kind) as state:
        state.setup(candidates=[False, False], followers=[False], ttl=0.6)
        state.allow_time_to_pass(0.3)
        state.fork()


def test_a_forked_child_does_not_run_the_wake_ups_pending_at_the_fork():
    """Rule 11. Found on 55394d1: the key expires (which wakes the waiting c1 and the follower)
    and the process forks before the hub runs. In the child, the inherited greenlets are killed
    with ``kill(block=False)``, which lands after the wake-ups already queued: c1 won the key
    there and the follower read the change and watched again. A queued wake-up still completes
    the wait it was for; the inert owners now ignore the outcome (a lease won so is abandoned,
    the follower asks nothing more)."""
    with election("memory") as state:
        state.setup(candidates=[False, False], followers=[False], ttl=0.6)
        state.allow_time_to_pass(0.3)
        state.expire_key()
        state.fork()


def test_an_acquire_raising_greenlet_exit_is_not_taken_for_a_lease():
    """Found on 130ad3a and 55394d1: the acquiring greenlet's GreenletExit was returned as if it
    were the lease; the campaign then failed with "AttributeError: 'GreenletExit' object has no
    attribute 'confirmed_at'" and tried to release it. A GreenletExit from the store's acquire
    (not a kill of the campaign) is a store failure like any other."""
    with election("memory") as state:
        state.setup(candidates=[True, True], followers=[False], ttl=0.6)
        state.fail_candidate_call(after=False, error="GreenletExit", primitive="acquire", seat=0, times=1)
        state.allow_time_to_pass(0.3)


def test_a_follower_whose_leader_read_raises_greenlet_exit_still_reports_unknown():
    """Rule 12. Found on 55394d1: the follower's guard greenlet (which reads the leader when the
    watch is quiet) re-raised a GreenletExit that came out of ``store.leader()`` and died, as if it
    had been killed. ``known`` still turned False on time (it reads the clock), but the queue
    kept saying the old leader: "f4 has not known who leads for 0.5s but its queue still says
    c0.1", and a stale watch was never resynced again."""
    with election("memory") as state:
        state.setup(candidates=[False, False], followers=[False], ttl=0.6)
        state.fail_follower_call(after=False, error="GreenletExit", index=0, primitive="leader", times=1)
        state.allow_time_to_pass(0.6)  # the guard's read raises at unknown_after / 2 = 0.2 s
        state.allow_time_to_pass(0.6)  # unknown from 0.4 s on: None is due on the queue


@pytest.mark.parametrize("outside", ["expire_key", "replace_lock_file"])
def test_a_lock_file_removed_or_replaced_while_held_gives_no_second_leader(outside):
    """Rule 1, finding 5 (file store). On 130ad3a: a candidate started after the holder's lock
    file was deleted or replaced locked a fresh file and led beside the holder until the
    holder's next renewal."""
    with election("file") as state:
        state.setup(candidates=[False, False, False], followers=[False], ttl=0.8)
        state.allow_time_to_pass(0.3)  # c0 wins
        state.stop(seat=2, via_runner=True)
        if outside == "expire_key":
            state.expire_key()
        else:
            state.replace_lock_file(content="")
        state.start(seat=2, retry=False)  # a new candidate opens the new file
        state.allow_time_to_pass(0.6)
