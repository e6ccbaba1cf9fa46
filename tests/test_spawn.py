"""greenleader._spawn's shortcut: after the command's exit, its group is ended without scanning
/proc only when the command left nothing running. Run in a process of its own, since adopting
orphans (``PR_SET_CHILD_SUBREAPER``) is process-wide and would stay with the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # CI runs on Linux: never skip there
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux") and not _IN_CI,
                                 reason="PR_SET_CHILD_SUBREAPER is Linux's (fails under CI=true)")]

SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, os, sys
    import gevent
    from greenleader import _spawn

    def zombie(pid):
        try:
            with open(f"/proc/{pid}/stat") as file:
                stat = file.read()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2] == "Z"

    report = {"adopting": _spawn.adopt_orphans(), "runs": []}
    for command in sys.argv[1:]:
        group = _spawn.CommandGroup()
        group.start(["sh", "-c", command], dict(os.environ))
        code = group.wait()
        left_nothing = group._left_nothing()
        group.end(10)
        with gevent.Timeout(30, False):  # the watchdog and what was adopted are reaped (gevent SIGCHLD handler)
            while any(zombie(pid) or pid == group.pgid for pid in _spawn._children()):
                gevent.sleep(0.01)
        report["runs"].append({"code": code, "left_nothing": left_nothing, "children": sorted(_spawn._children()),
                               "pipes closed": group._lifeline is None and group._ready is None})
    print(json.dumps(report))
""")


def test_the_group_is_ended_without_a_scan_only_when_the_command_left_nothing(tmp_path):
    termed, trapping, detached = tmp_path / "termed", tmp_path / "trapping", tmp_path / "detached"
    commands = [
        "exit 3",  # nothing left: the shortcut
        "sleep 60 & exit 4",  # a process left in the group: SIGTERM, then the scans
        # a subshell that cleans up on SIGTERM (once its trap is set: the file)
        f"(trap 'touch {termed}; exit 0' TERM; touch {trapping}; sleep 60 & wait) & "
        f"until [ -e {trapping} ]; do sleep 0.01; done; exit 0",
        # a process that left the group (once it has: the file): adopted, so no shortcut; not ended
        f"setsid sh -c 'touch {detached}; exec sleep 60' >/dev/null 2>&1 & "
        f"until [ -e {detached} ]; do sleep 0.01; done; exit 5",
    ]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *commands], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["adopting"]
    codes = [run["code"] for run in report["runs"]]
    shortcut = [run["left_nothing"] for run in report["runs"]]
    assert codes == [3, 4, 0, 5]
    assert shortcut == [True, False, False, False]
    assert [run["children"] for run in report["runs"][:3]] == [[], [], []], "an adopted orphan was not reaped"
    assert termed.exists(), "the subshell left behind got no SIGTERM"
    assert [run["pipes closed"] for run in report["runs"]] == [True] * 4
    escaped = report["runs"][3]["children"]
    assert len(escaped) == 1  # the setsid sleep: not in the group, so left alone (and adopted)
    subprocess.run(["kill", str(escaped[0])], check=False)


SPARING = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, os, sys
    import gevent
    from greenleader import _spawn

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as file:
                stat = file.read()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2] != "Z"

    _spawn.adopt_orphans()
    report = {}
    group = _spawn.CommandGroup()
    group.start(["sh", "-c", "exit 0"], dict(os.environ))
    group.wait()
    report["ended"] = group.end_if_left_nothing(spare_watchdog=True)
    report["ended again"] = group.end_if_left_nothing(spare_watchdog=True)
    group.end(10)  # ended already: leaves the spared watchdog alone
    gevent.sleep(0.2)
    report["spared watchdog alive"] = alive(group.pgid)
    report["lifeline open"] = group._lifeline is not None
    group.dismiss()
    with gevent.Timeout(30, False):
        while alive(group.pgid) or group._lifeline is not None:
            gevent.sleep(0.01)
    report["dismissed watchdog alive"] = alive(group.pgid)
    report["pipes closed"] = group._lifeline is None and group._ready is None
    report["lost"] = group.watchdog_lost.is_set()
    # last: the orphan it leaves is this process's child until reaped, which would make an
    # emptied group above look as if something were left
    left = _spawn.CommandGroup()
    left.start(["sh", "-c", "sleep 60 & exit 0"], dict(os.environ))
    left.wait()
    report["left something: ended"] = left.end_if_left_nothing(spare_watchdog=True)
    left.end(10)
    print(json.dumps(report))
""")


def test_a_spared_watchdog_guards_the_empty_group_until_it_is_dismissed():
    """greenleader run spares the watchdog of a group whose command left nothing (so that its
    SIGKILL and exit are off the release's path): it lives, its lifeline open, until dismissed."""
    out = subprocess.run([sys.executable, "-c", SPARING], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "left something: ended": False, "ended": True, "ended again": False, "spared watchdog alive": True,
        "lifeline open": True, "dismissed watchdog alive": False, "pipes closed": True, "lost": False,
    }


def test_an_end_called_while_another_is_killing_the_group_returns_once_the_command_is_gone():
    """Two greenlets end one group (``greenleader run``'s loop on a loss, and its step-down hook
    before the release): the second, come while the first is past its grace and killing the
    group, returns only once the command has exited, so that the key is not released beside it."""
    import gevent

    from greenleader import _spawn

    group = _spawn.CommandGroup()
    group.start(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], dict(os.environ))
    first = gevent.spawn(group.end, 0.2)
    with gevent.Timeout(30, AssertionError("the first end() never reached its SIGKILL")):
        while not group._ended:  # marked ended as its grace runs out, just before its SIGKILL
            gevent.sleep(0)
    group.end(0.2)
    exited = group._exit.ready()
    first.join(30)
    assert exited, "end() returned while another end() was still killing the group"
    assert first.successful(), first.exception



def start_ignoring_sigterm(group, tmp_path):
    """Start a command that ignores SIGTERM (its sleeps inherit that) and wait until it does."""
    import gevent

    ready = tmp_path / f"ignoring-{group.pgid}"
    group.start(["sh", "-c", f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done"], dict(os.environ))
    with gevent.Timeout(30, AssertionError("the command did not start")):
        while not ready.exists():
            gevent.sleep(0.01)


def test_end_sends_sigkill_by_its_kill_by_however_long_the_grace(tmp_path):
    """A lost tenure's command must be gone before the store may give the key away: ``kill_by``
    cuts the grace short (a grace of 10 minutes here); one already past kills at once."""
    import time

    import gevent

    from greenleader import _spawn

    for kill_in in (0.3, -5.0):
        group = _spawn.CommandGroup()
        start_ignoring_sigterm(group, tmp_path)
        ending = gevent.spawn(group.end, 600, time.monotonic() + kill_in)
        ending.join(60)
        assert ending.dead and ending.successful(), f"end() did not return with kill_by in {kill_in}s"
        assert group.wait() == 128 + 9, "the command should have died of SIGKILL"
        assert group._members() == set()


def test_a_stopped_command_past_its_kill_by_gets_sigkill_alone(tmp_path):
    """With ``kill_by`` past, end() sends SIGKILL at once: no SIGTERM and no SIGCONT first,
    which let a command stopped by SIGTSTP run on for a moment beside the next leader's."""
    import signal
    import time

    from greenleader import _spawn

    group = _spawn.CommandGroup()
    start_ignoring_sigterm(group, tmp_path)
    group.pause()
    sent = []
    signal_group = group.signal
    group.signal = lambda signum: (sent.append(signum), signal_group(signum))[1]
    group.end(600, kill_by=time.monotonic() - 1)
    assert group.wait() == 128 + 9 and group._members() == set()
    assert sent == [signal.SIGKILL], f"signals sent: {[signal.Signals(s).name for s in sent]}"


def test_an_end_with_an_earlier_kill_by_hastens_one_already_under_way(tmp_path):
    """run's loop ends the group on a loss while its step-down hook ends it too: whichever comes
    second with an earlier ``kill_by`` brings the SIGKILL forward, and both return once it landed."""
    import time

    import gevent

    from greenleader import _spawn

    group = _spawn.CommandGroup()
    start_ignoring_sigterm(group, tmp_path)
    first = gevent.spawn(group.end, 600)
    with gevent.Timeout(30, AssertionError("the first end() never sent SIGTERM")):
        while not group._ending:
            gevent.sleep(0.01)
    second = gevent.spawn(group.end, 600, time.monotonic() + 0.3)
    finished = gevent.joinall([first, second], timeout=60)
    assert len(finished) == 2, "the earlier kill_by did not bring the first end()'s SIGKILL forward"
    assert first.successful() and second.successful(), (first.exception, second.exception)
    assert group.wait() == 128 + 9 and group._members() == set()


#: A script's start: greenleader's CLI whose candidates are recorded in ``made``.
RECORDING = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys
    import gevent
    from greenleader import cli

    made = []

    class Recorded(cli.Candidate):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    cli.Candidate = Recorded
""")

QUEUED_NEWS = RECORDING + textwrap.dedent("""
    on_exit = cli.CommandGroup.on_exit

    def on_exit_after_news(self, callback):
        def exited(code):
            made[0]._channels.put(False)  # a loss and a re-win, queued and not read yet by run's loop
            made[0]._channels.put(True)
            callback(code)
        on_exit(self, exited)

    cli.CommandGroup.on_exit = on_exit_after_news
    sys.exit(cli._main(["run", "--store", "memory://", "--key", "queued", "--",
                        "sh", "-c", f"echo ran >> {sys.argv[1]}"]))
""")


def test_run_starts_no_command_on_an_election_it_had_not_read_when_its_command_exited(tmp_path):
    """``greenleader run`` without ``--restart`` ends when its command exits: an elected True
    still queued then (a loss and a re-win its loop had not read) starts no second command
    (the exit path marks run as stopping; without it the command ran twice and run reported a loss)."""
    ran = tmp_path / "ran"
    done = subprocess.run([sys.executable, "-c", QUEUED_NEWS, str(ran)], capture_output=True, text=True,
                          timeout=60)
    assert ran.read_text().splitlines() == ["ran"], f"the command ran again:\n{done.stderr}"
    assert done.returncode == 0, done.stderr


LOST_WHILE_STARTING = RECORDING + textwrap.dedent("""
    wait_ready = cli.CommandGroup._wait_ready
    losses = []

    def wait_ready_through_a_loss(self):
        if not losses:  # the first win: the tenure is lost (and released) while the watchdog starts
            candidate = made[0]
            losses.append(candidate.term)
            candidate._on_lost(candidate._lease)
            with gevent.Timeout(30, AssertionError("no step-down after the loss")):
                candidate._not_leading.wait()
            gevent.sleep(0.1)  # the teardown releases the key meanwhile
        wait_ready(self)

    cli.CommandGroup._wait_ready = wait_ready_through_a_loss
    code = cli._main(["run", "--store", "memory://", "--key", "starting", "--",
                      "sh", "-c", f"echo $GREENLEADER_TERM >> {sys.argv[1]}"])
    print(losses[0])
    sys.exit(code)
""")


def test_run_starts_no_command_for_a_tenure_lost_while_its_watchdog_was_starting(tmp_path):
    """The command's start waits for the group's watchdog to be ready (up to seconds on a loaded
    host); a tenure lost meanwhile has released its key, so its command must not start then
    (it did, beside the next leader's). run starts the command on its next win instead, with
    that win's term."""
    ran = tmp_path / "ran"
    done = subprocess.run([sys.executable, "-c", LOST_WHILE_STARTING, str(ran)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lost_term = int(done.stdout.split()[-1])
    terms = [int(line) for line in ran.read_text().splitlines()]
    assert len(terms) == 1 and terms[0] > lost_term, f"ran with terms {terms}, the lost one {lost_term}:\n{done.stderr}"
