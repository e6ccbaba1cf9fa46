"""scripts/test's two pytest processes (scripts/run_shards.py, tests/sharding.py): every test runs
exactly once, a test file whole in one process, a failure fails the run; the processes of one run
never hand out the same server port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import servers

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = 'pytest_plugins = ["tests.sharding"]\n'

#: Each test notes its id and its process in the file RUN_LOG names, and waits a little (a sleep,
#: so the suite's length does not depend on the machine's load), so that both processes are
#: running while files are being taken.
TEST_FILE = '''
import os, time, pytest

@pytest.mark.parametrize("n", range({count}))
def test_it(request, n):
    with open(os.environ["RUN_LOG"], "a") as log:
        log.write(f"{{request.node.nodeid}} {{os.getpid()}}\\n")
    time.sleep(0.2)
    assert not {fail} or n != 1
'''


def _suite(directory: Path, failing: str | None = None) -> dict[str, int]:
    """Write a small suite of test files; return the number of tests in each."""
    counts = {f"test_{name}.py": count for name, count in zip("abcdef", (3, 5, 2, 4, 1, 6), strict=True)}
    (directory / "conftest.py").write_text(CONFTEST)
    for name, count in counts.items():
        (directory / name).write_text(TEST_FILE.format(count=count, fail=name == failing))
    return counts


def _run(directory: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, str]]]:
    log = directory / "run.log"
    env = dict(os.environ, RUN_LOG=str(log), PYTHONPATH=str(ROOT), TEST_SHARDS="2")
    env.pop("GREENLEADER_TEST_SHARD", None)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_shards.py"), "-q", "-p", "no:cacheprovider",
                             *args, str(directory)],
                            cwd=directory, env=env, capture_output=True, text=True, timeout=120)
    ran = [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []
    return result, ran


def test_every_test_runs_once_and_each_file_in_one_process(tmp_path: Path) -> None:
    counts = _suite(tmp_path)
    result, ran = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [nodeid for nodeid, _ in ran]
    assert len(ids) == len(set(ids)) == sum(counts.values()), ids
    for name in counts:
        assert len({pid for nodeid, pid in ran if nodeid.startswith(name)}) == 1, (name, ran)
    assert result.stdout.count("process ") >= 2 and "2 pytest processes" in result.stdout


def test_a_failing_test_fails_the_run(tmp_path: Path) -> None:
    _suite(tmp_path, failing="test_d.py")
    result, ran = _run(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "test_d.py::test_it[1]" in result.stdout
    assert "test_d.py::test_it[1]" in [nodeid for nodeid, _ in ran]


def test_exitfirst_stops_every_process_taking_files(tmp_path: Path) -> None:
    counts = _suite(tmp_path, failing="test_a.py")  # taken first; the other files take 3.4 s
    result, ran = _run(tmp_path, "-x")
    assert result.returncode == 1, result.stdout + result.stderr
    started = {nodeid.split("::")[0] for nodeid, _ in ran}
    assert len(started) < len(counts), f"the processes went on taking files after -x failed: {sorted(started)}"


def test_the_processes_of_one_run_hand_out_different_ports(monkeypatch) -> None:
    handed: dict[int, set[int]] = {}
    for index in range(2):
        monkeypatch.setenv("GREENLEADER_TEST_SHARD", f"{index}/2")
        monkeypatch.setattr(servers, "_handed_out", set())
        handed[index] = set(servers.free_ports(20)) | {servers.closed_port() for _ in range(5)}
        assert all(port in servers.PORT_RANGE for port in handed[index])
    assert not handed[0] & handed[1]
    assert {port % 2 for port in handed[0]} == {0} and {port % 2 for port in handed[1]} == {1}
