"""The ``greenleader`` command, run as real processes on the file store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import gevent
import pytest

from greenleader.stores.file import FileStore
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

GREENLEADER = [sys.executable, "-m", "greenleader"]


def start(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([*GREENLEADER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'elections'}"


def test_demo_runs_without_options_and_reports_its_figures():
    code, out, err = finish(start("demo", "--rounds", "1"), timeout=90)
    assert code == 0, err
    assert "crash failover: median" in out and "graceful handover: median" in out, out


def test_run_passes_the_command_exit_status_through(url):
    code, out, _ = finish(start("run", "--store", url, "--key", "job", "--", "sh", "-c", "echo ran; exit 7"))
    assert (code, out) == (7, "ran\n")


def test_run_gives_the_command_its_key_node_and_fencing_term(url):
    command = ["sh", "-c", 'echo "$GREENLEADER_KEY $GREENLEADER_NODE $GREENLEADER_TERM"']
    code, out, err = finish(start("run", "--store", url, "--key", "job", "--node", "a", "--", *command))
    key, node, term = out.split()
    assert (code, key, node) == (0, "job", "a") and int(term) > 0, err


def test_run_lets_one_command_run_at_a_time(url, tmp_path):
    log = tmp_path / "log"
    release = tmp_path / "release"
    script = f'echo "$0 start" >> {log}; while [ ! -e {release} ]; do sleep 0.02; done; echo "$0 end" >> {log}'
    first = start("run", "--store", url, "--key", "job", "--node", "a", "--", "sh", "-c", script, "a")
    wait_until(lambda: log.exists(), 30, "the first command to start")
    second = start("run", "--store", url, "--key", "job", "--node", "b", "--", "sh", "-c", script, "b")
    code, out, err = finish(start("leader", "--store", url, "--key", "job"))
    assert (code, out) == (0, "a\n"), err
    assert log.read_text() == "a start\n"
    release.touch()
    assert finish(first)[0] == 0
    assert finish(second)[0] == 0
    assert log.read_text() == "a start\na end\nb start\nb end\n"


def test_run_forwards_sigterm_to_the_command(url, tmp_path):
    started = tmp_path / "started"
    script = f"trap 'exit 42' TERM; touch {started}; while :; do sleep 0.02; done"
    runner = start("run", "--store", url, "--key", "job", "--", "sh", "-c", script)
    wait_until(started.exists, 30, "the command to start")
    runner.send_signal(signal.SIGTERM)
    assert finish(runner)[0] == 42


def test_run_interrupted_while_waiting_exits_128_plus_signal(url, tmp_path):
    started = tmp_path / "started"
    holder = start("run", "--store", url, "--key", "job", "--", "sh", "-c", f"touch {started}; exec sleep 60")
    wait_until(started.exists, 30, "the holder's command to start")
    waiter = start("-v", "run", "--store", url, "--key", "job", "--", "touch", str(tmp_path / "ran"))
    with gevent.Timeout(30, AssertionError("the waiter did not start campaigning")):
        while "campaigning" not in waiter.stderr.readline():
            pass
    assert waiter.poll() is None and not (tmp_path / "ran").exists(), "the waiter ran while another process led"
    waiter.send_signal(signal.SIGTERM)
    assert finish(waiter)[0] == 128 + signal.SIGTERM
    holder.send_signal(signal.SIGTERM)
    assert finish(holder)[0] == 128 + signal.SIGTERM  # sleep dies of the forwarded SIGTERM


def test_run_terminates_the_command_when_leadership_is_lost(url, tmp_path):
    started = tmp_path / "started"
    command = ["sh", "-c", f"touch {started}; exec sleep 60"]
    runner = start("run", "--store", url, "--key", "job", "--ttl", "1", "--", *command)
    wait_until(started.exists, 30, "the command to start")
    os.unlink(FileStore(directory=url[len("file://"):]).path_for("job"))  # the lock file vanishes
    code, _, err = finish(runner)
    assert code == 3, err
    assert "leadership lost" in err


def test_run_restart_runs_the_command_again(url, tmp_path):
    count = tmp_path / "count"
    runner = start("run", "--restart", "--store", url, "--key", "job", "--", "sh", "-c", f"echo x >> {count}")
    wait_until(lambda: count.exists() and count.read_text().count("x") >= 3, 60, "the command to run three times")
    runner.send_signal(signal.SIGTERM)
    code, _, err = finish(runner)
    # Interrupted between runs, or its command was; or the command ended on its own just before
    # the forwarded SIGTERM reached it (its status is then 0), and run did not restart it.
    assert code in (0, 128 + signal.SIGTERM), err


# -- the command's whole process tree never outlives `greenleader run` (DESIGN.md §2 rule 13) ----------

#: These tests find processes through /proc. Without it they skip locally, but fail under CI=true:
#: CI runs on Linux, where a skip would hide a guarantee that went untested.
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/environ") and not _IN_CI,
                                reason="finds processes through /proc")

#: A command that leaves grandchildren: two sleeps in the background, one in the foreground.
TREE = "sleep 60 & sleep 60 & touch {started}; sleep 60; echo the command ran to its end"


def marked(marker: str) -> set[int]:
    """Live processes whose environment carries ``marker`` (a zombie's environment reads empty)."""
    needle = f"GREENLEADER_TEST_TREE={marker}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                if entry.isdigit() and needle in file.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            pass  # not a process, or gone meanwhile
    return found


def start_marked(marker: str, *args: str) -> subprocess.Popen:
    """``greenleader run`` whose whole tree carries ``marker``, with default signal dispositions (a
    test runner started in the background or under nohup would pass on ignored SIGINT/SIGQUIT/SIGHUP),
    and with the output discarded: a tree left behind must not hold the test's pipes open."""

    def default_signals() -> None:
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)

    return subprocess.Popen(
        [*GREENLEADER, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GREENLEADER_TEST_TREE": marker},
        preexec_fn=default_signals,
    )


def start_tree(url: str, tmp_path: Path, marker: str) -> subprocess.Popen:
    """A runner whose command tree is up: the shell and its three sleeps."""
    started = tmp_path / f"started-{marker}"
    command = ["sh", "-c", TREE.format(started=started)]
    runner = start_marked(marker, "run", "--store", url, "--key", "job", "--node", "a", "--", *command)
    wait_until(started.exists, 30, "the command to start")
    programs = ["sh", "sleep", "sleep", "sleep"]  # and no `touch` on its way out
    wait_until(lambda: sorted(cmdline(pid).split(" ")[0] for pid in tree(runner, marker)) == programs, 30,
               "the shell and its three sleeps to run")
    return runner


def tree(runner: subprocess.Popen, marker: str) -> set[int]:
    """The processes of the runner's command: marked, but neither the runner nor its watchdog."""
    return {pid for pid in marked(marker) - {runner.pid} if "greenleader-watchdog" not in cmdline(pid)}


def wait_for_no_tree(marker: str, what: str) -> None:
    """Every process of the command's tree ends, within a generous bound."""
    try:
        wait_until(lambda: not marked(marker), 30, what)
    except AssertionError:
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in marked(marker)}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{what}: still running after 30 s: {left}") from None


@needs_proc
@pytest.mark.parametrize(
    "signum", [signal.SIGQUIT, signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM], ids=lambda s: s.name
)
def test_run_ended_by_a_signal_leaves_no_process_of_the_command(url, tmp_path, signum):
    marker = uuid.uuid4().hex
    runner = start_tree(url, tmp_path, marker)
    runner.send_signal(signum)
    with gevent.Timeout(60, AssertionError(f"greenleader run did not end after {signum!r}")):
        code = runner.wait()
    wait_for_no_tree(marker, f"the command's tree to end after {signum!r} to greenleader run")
    if signum != signal.SIGKILL:
        assert code == 128 + signum, f"exit status {code}: the command should have died of the forwarded {signum!r}"


@needs_proc
def test_run_sighup_ends_the_command_tree_before_another_runner_starts_its_command(url, tmp_path):
    marker = uuid.uuid4().hex
    first = start_tree(url, tmp_path, marker)
    survivors = tmp_path / "survivors"  # the first tree's processes alive when the second command starts
    probe = f'grep -las "GREENLEADER_TEST_TREE={marker}" /proc/[0-9]*/environ > {survivors}; true'
    second = start("-v", "run", "--store", url, "--key", "job", "--node", "b", "--", "sh", "-c", probe)
    with gevent.Timeout(30, AssertionError("the second runner did not start campaigning")):
        while "campaigning" not in second.stderr.readline():
            pass
    first.send_signal(signal.SIGHUP)  # what systemd and supervisord send on reload
    with gevent.Timeout(60, AssertionError("greenleader run did not end after SIGHUP")):
        code = first.wait()
    assert finish(second)[0] == 0
    alive = {int(path.split("/")[2]) for path in survivors.read_text().split()} - {first.pid}  # run may be exiting
    assert not alive, f"the first command's tree was still running when the second started: {alive}"
    assert code == 128 + signal.SIGHUP, f"exit status {code}: the command should have died of the forwarded SIGHUP"
    wait_for_no_tree(marker, "the first command's tree to end after SIGHUP")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def state(pid: int) -> str:
    """The process's state letter (S sleeping, T stopped, Z zombie...), '' once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2]


@needs_proc
def test_run_ends_what_the_command_left_running_when_it_exits(url, tmp_path):
    marker = uuid.uuid4().hex
    command = ["sh", "-c", "sleep 60 & sleep 60 & exit 5"]
    runner = start_marked(marker, "run", "--store", url, "--key", "job", "--", *command)
    with gevent.Timeout(60, AssertionError("greenleader run did not end after its command exited")):
        code = runner.wait()
    assert code == 5
    wait_for_no_tree(marker, "the processes the command left behind to end")


@needs_proc
@pytest.mark.parametrize("ignores_term", [False, True], ids=["tree", "tree-ignoring-sigterm"])
def test_run_ends_the_command_tree_when_leadership_is_lost(url, tmp_path, ignores_term):
    """On a loss the tree gets SIGTERM, and SIGKILL after --grace if it ignores SIGTERM."""
    marker = uuid.uuid4().hex
    started = tmp_path / "started"
    if ignores_term:
        script = f"trap '' TERM; sleep 60 & sleep 60 & touch {started}; sleep 60"  # all ignore TERM
    else:
        script = TREE.format(started=started)
    runner = start_marked(marker, "run", "--store", url, "--key", "job", "--ttl", "1", "--grace", "1",
                          "--", "sh", "-c", script)
    wait_until(started.exists, 30, "the command to start")
    os.unlink(FileStore(directory=url[len("file://"):]).path_for("job"))  # the lock file vanishes
    with gevent.Timeout(60, AssertionError("greenleader run did not end after losing leadership")):
        assert runner.wait() == 3
    wait_for_no_tree(marker, "the command's tree to end after the loss")


@needs_proc
def test_run_ends_the_command_when_its_watchdog_dies(url, tmp_path):
    """Without its watchdog nothing would end the command if run were SIGKILLed: an internal error."""
    marker = uuid.uuid4().hex
    runner = start_tree(url, tmp_path, marker)
    (watchdog,) = [pid for pid in marked(marker) if "greenleader-watchdog" in cmdline(pid)]
    os.kill(watchdog, signal.SIGKILL)
    with gevent.Timeout(60, AssertionError("greenleader run did not end after its watchdog died")):
        assert runner.wait() == 1
    wait_for_no_tree(marker, "the command's tree to end after its watchdog died")


@needs_proc
def test_run_replaces_a_watchdog_that_dies_while_it_waits_to_lead(url, tmp_path):
    holder = start_tree(url, tmp_path, uuid.uuid4().hex)
    marker = uuid.uuid4().hex
    ran = tmp_path / "ran"
    waiter = start_marked(marker, "run", "--store", url, "--key", "job", "--node", "b", "--", "touch", str(ran))

    def watchdogs() -> set[int]:
        return {pid for pid in marked(marker) if "greenleader-watchdog" in cmdline(pid)}

    wait_until(watchdogs, 30, "the waiter's watchdog to start")
    (first,) = watchdogs()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: watchdogs() - {first}, 30, "another watchdog to replace the one killed")
    holder.send_signal(signal.SIGTERM)
    with gevent.Timeout(60, AssertionError("the runners did not end")):
        assert (holder.wait(), waiter.wait()) == (128 + signal.SIGTERM, 0)
    assert ran.exists()
    wait_for_no_tree(marker, "the waiter's processes to end")


@needs_proc
def test_run_sigtstp_stops_the_command_and_sigcont_resumes_it(url, tmp_path):
    marker = uuid.uuid4().hex
    runner = start_tree(url, tmp_path, marker)
    (watchdog,) = [pid for pid in marked(marker) if "greenleader-watchdog" in cmdline(pid)]
    command = tree(runner, marker)
    runner.send_signal(signal.SIGTSTP)
    wait_until(lambda: {state(pid) for pid in command | {runner.pid}} == {"T"}, 30, "run and its command to stop")
    assert state(watchdog) != "T", "the watchdog must stay awake while the command is stopped"
    runner.send_signal(signal.SIGCONT)
    wait_until(lambda: "T" not in {state(pid) for pid in command | {runner.pid}}, 30, "run and its command to go on")
    runner.send_signal(signal.SIGTERM)
    with gevent.Timeout(60, AssertionError("greenleader run did not end after SIGTERM")):
        assert runner.wait() == 128 + signal.SIGTERM
    wait_for_no_tree(marker, "the command's tree to end after SIGTERM")


@needs_proc
def test_run_leaves_a_signal_ignored_at_start_ignored_by_itself_and_its_command(url, tmp_path):
    """As under ``nohup``: SIGHUP ignored when run starts stays ignored, in run and in the command."""
    started = tmp_path / "started"
    runner = subprocess.Popen(
        [*GREENLEADER, "run", "--store", url, "--key", "job", "--", "sh", "-c", f"touch {started}; exec sleep 60"],
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    wait_until(started.exists, 30, "the command to start")

    def ignores_sighup(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        return bool(ignored & (1 << (signal.SIGHUP - 1)))

    (command,) = [int(pid) for pid in Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()
                  if "greenleader-watchdog" not in cmdline(int(pid))]
    assert ignores_sighup(runner.pid) and ignores_sighup(command)
    runner.send_signal(signal.SIGTERM)
    with gevent.Timeout(60, AssertionError("greenleader run did not end after SIGTERM")):
        assert runner.wait() == 128 + signal.SIGTERM


def test_run_reports_a_command_it_cannot_run(url, tmp_path):
    code, _, err = finish(start("run", "--store", url, "--key", "job", "--", str(tmp_path / "no-such-command")))
    assert code == 127 and "cannot run" in err and "Traceback" not in err, err
    (tmp_path / "not-executable").write_text("")
    code, _, err = finish(start("run", "--store", url, "--key", "job", "--", str(tmp_path / "not-executable")))
    assert code == 126 and "cannot run" in err and "Traceback" not in err, err


def test_leader_exit_status_says_whether_there_is_one(url):
    code, out, _ = finish(start("leader", "--store", url, "--key", "nobody", "--json"))
    assert code == 1 and '"leader": null' in out


def test_watch_prints_each_change(url):
    watcher = start("watch", "--store", url, "--key", "job")
    assert watcher.stdout is not None

    def next_line() -> str:
        with gevent.Timeout(30, AssertionError("watch printed nothing for 30 s")):
            return watcher.stdout.readline().split(" ", 1)[1].strip()

    assert next_line() == "(no leader)"
    holder = start("run", "--store", url, "--key", "job", "--node", "solo", "--", "sh", "-c", "sleep 0.5")
    assert next_line() == "solo"
    assert finish(holder)[0] == 0
    assert next_line() == "(no leader)"
    watcher.send_signal(signal.SIGINT)
    assert finish(watcher)[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--key", "job"], "no command given"),
        (["run", "--key", "job", "--ttl", "0", "--", "true"], "ttl must be > 0"),
        (["run", "--key", "job", "--ttl", "nan", "--", "true"], "ttl must be finite"),
        (["run", "--key", "", "--", "true"], "key must not be empty"),
        (["run", "--key", "job", "--node", "", "--", "true"], "node must not be empty"),
        (["leader", "--key", "job", "--store", "bogus://x"], "unknown store backend"),
        (["leader", "--key", "job", "--store", "not a url"], "has no scheme"),
        (["leader", "--key", "job", "--store", "file:///tmp/x?poll_interval=fast"], "poll_interval must be a number"),
        (["watch"], "--key"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(args, message):
    code, _, err = finish(start(*args), timeout=30)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--rounds", "0"], "must be from 1 to 100"),
        (["run", "--key", "job", "--grace", "-1", "--", "true"], "seconds must be >= 0"),
        (["run", "--key", "job", "--grace", "nan", "--", "true"], "seconds must be finite"),
    ],
)
def test_bad_numbers_exit_2(args, message):
    code, _, err = finish(start(*args), timeout=30)
    assert code == 2 and message in err, err
