"""Pytest plugin: several pytest processes share one run of the suite, a test file each at a time.

``scripts/test`` starts ``TEST_SHARDS`` pytest processes (see ``scripts/run_shards.py``), each
with ``--shard-claims DIR`` on the same directory. Every process collects the whole suite, then
takes test files one by one, the longest first: a file is its process's once that process has
created the file's claim in DIR (``O_CREAT | O_EXCL``, which exactly one process wins), so every
file runs exactly once, whole, in one process. Taking files as a process becomes free (instead
of a fixed split) keeps the processes busy to the end whatever the machine's load does to the
files' durations. Without ``--shard-claims`` the plugin does nothing.

Why processes at all: most of the suite's time is spent waiting (for TTLs to run out, servers to
start, elections to settle), not computing, so two processes finish the suite in about half the
time on two cores. Why not pytest-xdist: its workers hand tests over through threading
primitives that gevent's monkey-patching (which the whole suite runs under) turns into
greenlet ones, and the workers die at their first test.

A whole file stays in one process, so module-scoped fixtures are set up once, as in a plain run;
each process starts its own session servers. ``-x`` in one process stops the others from taking
more files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Seconds each test file took in a two-process run of the whole suite (2 shared cores, load
#: 1.5-3.3; the nemesis runs alone take 12 minutes), to start the long files first so that no
#: process is left with a long file at the end. Only the order depends on these: a wrong figure
#: costs time, never a test.
SECONDS = {
    "test_nemesis.py": 732, "test_safety.py": 169, "test_cli.py": 130, "test_properties.py": 129,
    "test_contract.py": 88, "test_recovery.py": 86, "test_processes.py": 83, "test_bad_input.py": 82,
    "test_gunicorn.py": 81, "test_store_consul.py": 78, "test_external_deletion.py": 74,
    "test_shared_session.py": 69, "test_store_postgres.py": 53, "test_security.py": 52,
    "test_keepalive.py": 48, "test_benchmarks_smoke.py": 42, "test_store_zookeeper.py": 40,
    "test_store_etcd.py": 40, "test_contrib_django.py": 29, "test_hygiene.py": 23,
    "test_store_file.py": 22, "test_servers.py": 21, "test_status.py": 19, "test_contrib_flask.py": 18,
    "test_property_regressions.py": 16, "test_contrib_apscheduler.py": 15,
}
#: A file not in the table: the rest took under 15 seconds each.
DEFAULT_SECONDS = 10

#: The name of the marker a process leaves when it stops at a failure under -x.
STOP = "STOP"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("greenleader").addoption(
        "--shard-claims", metavar="DIR", default=None,
        help="run only the test files this process claims in DIR, shared with other pytest "
             "processes of the same run (scripts/test sets this)")


def _claim_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(path))


class _Claims:
    """The test files this process wins in the shared directory, longest first."""

    def __init__(self, directory: Path, groups: dict[Path, list[pytest.Item]]) -> None:
        self.directory = directory
        self.order = sorted(groups, key=lambda path: -SECONDS.get(path.name, DEFAULT_SECONDS))
        self.groups = groups

    def __iter__(self) -> Iterator[list[pytest.Item]]:
        for path in self.order:
            if (self.directory / STOP).exists():
                return
            try:
                os.close(os.open(self.directory / _claim_name(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            yield self.groups[path]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """Pytest's own test loop, over the claimed files only (None: pytest's loop runs)."""
    directory = session.config.getoption("shard_claims")
    if directory is None:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    if session.config.option.collectonly:
        return True

    groups: dict[Path, list[pytest.Item]] = {}
    for item in session.items:
        groups.setdefault(item.path, []).append(item)
    claims = iter(_Claims(Path(directory), groups))
    current = next(claims, None)
    while current is not None:
        following = None
        for index, item in enumerate(current):
            if index + 1 < len(current):
                nextitem = current[index + 1]
            else:  # claim the next file first: its first test decides which fixtures end here
                following = next(claims, None)
                nextitem = following[0] if following else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if session.shouldfail or session.shouldstop:
                Path(directory, STOP).touch()
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        current = following
    return True
