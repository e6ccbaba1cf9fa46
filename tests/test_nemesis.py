"""Safety under faults: the fault harness, the split-brain checker, and a short nemesis run per
real backend (5 candidate processes on a 3-node cluster, one PostgreSQL server, under a random schedule of faults).

The runs include key deletions from outside, injected client errors, forks of a leading
process and HUP/QUIT/KILL of ``greenleader run``. The seed of each run is printed; set
``NEMESIS_SEED`` to replay one. ``NEMESIS_DURATION``
(seconds of faults; defaults below) lengthens the runs; longer ones run on demand with
``python -m tests.nemesis --backend etcd --duration 600 --seed N``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from tests import nemesis
from tests.faults import Proxy
from tests.history import check, load

#: Seconds during which faults start, per backend: every fault kind at least once (Consul's
#: 10 s minimum TTL makes its faults five times longer, so they start closer together).
CI_DURATION = {"consul": 90.0, "etcd": 30.0, "zookeeper": 30.0, "postgres": 30.0, "file": 30.0}
CI_SPACING = {"consul": (0.15, 0.5), "etcd": nemesis.SPACING, "zookeeper": nemesis.SPACING,
              "postgres": nemesis.SPACING, "file": nemesis.SPACING}


# -- the proxy ------------------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[str]:
    """A TCP echo server: the proxy's upstream in these tests."""

    def serve(sock: socket.socket, _address: object) -> None:
        try:
            while data := sock.recv(4096):
                sock.sendall(data)
        except OSError:
            pass

    server = StreamServer(("127.0.0.1", 0), serve)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop(timeout=1)


def connect(proxy: Proxy) -> socket.socket:
    host, _, port = proxy.addr.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=2)
    sock.settimeout(0.5)
    return sock


def silent(sock: socket.socket) -> bool:
    try:
        sock.recv(100)
    except TimeoutError:
        return True
    return False


@pytest.mark.timeout(30)
def test_proxy_passes_partitions_delays_and_resets(echo: str) -> None:
    proxy = Proxy(echo)
    try:
        sock = connect(proxy)
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"

        proxy.partition()  # both ways: the bytes are held, the connection stays open
        sock.sendall(b"b")
        assert silent(sock)
        proxy.heal()
        sock.settimeout(2)
        assert sock.recv(10) == b"b"

        proxy.partition("down")  # the request arrives, the answer does not
        sock.sendall(b"c")
        sock.settimeout(0.5)
        assert silent(sock)
        proxy.partition("up")
        proxy.heal()
        sock.settimeout(2)
        assert sock.recv(10) == b"c"

        proxy.delay(0.3, "up")
        started = time.monotonic()
        sock.sendall(b"d")
        assert sock.recv(10) == b"d"
        assert time.monotonic() - started >= 0.3
        proxy.heal()

        proxy.partition()  # a new connection during a partition gets no answer until healed
        late = connect(proxy)
        late.sendall(b"e")
        assert silent(late)
        proxy.heal(reset=True)  # ... and then a reset, like TCP that gave up
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        late.settimeout(2)
        with pytest.raises(ConnectionResetError):
            late.recv(10)

        fresh = connect(proxy)
        fresh.sendall(b"f")
        assert fresh.recv(10) == b"f"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            fresh.recv(10)
    finally:
        proxy.close()


@pytest.mark.timeout(30)
def test_proxy_resets_clients_when_the_upstream_is_down() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    proxy = Proxy(f"127.0.0.1:{port}")
    try:
        sock = connect(proxy)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(10)
    finally:
        proxy.close()


# -- the checker ------------------------------------------------------------------------------------


def write_history(path: Path, proc: str, *records: dict) -> Path:
    path.write_text("".join(json.dumps({"proc": proc, **record}) + "\n" for record in records))
    return path


def test_checker_accepts_a_clean_history_and_measures_gaps(tmp_path: Path) -> None:
    a = write_history(tmp_path / "a", "a", {"ev": "won", "term": 5, "t": 1.0, "deadline": 2.0},
                      {"ev": "renewed", "term": 5, "deadline": 3.0}, {"ev": "end", "term": 5, "t": 2.5},
                      {"ev": "lead", "term": 5, "t0": 2.0, "t1": 2.01})
    b = write_history(tmp_path / "b", "b", {"ev": "won", "term": 9, "t": 4.0, "deadline": 5.0},
                      {"ev": "renewed", "term": 9, "deadline": 6.0})  # died while leading
    verdict = check(load([a, b]), [("fault", 3.0), ("other", 4.5), ("late", 7.0)], until=10.0)
    assert verdict.ok, verdict.problems()
    assert [(t.proc, t.start, t.end, t.ended) for t in verdict.tenures] == [("a", 1.0, 2.5, True),
                                                                            ("b", 4.0, 6.0, False)]
    assert [gap for _, _, gap in verdict.gaps] == [1.0, 0.0, None]


def test_checker_finds_overlaps_term_regressions_and_stray_duties(tmp_path: Path) -> None:
    a = write_history(tmp_path / "a", "a", {"ev": "won", "term": 7, "t": 1.0, "deadline": 3.0},
                      {"ev": "end", "term": 7, "t": 3.0},
                      {"ev": "lead", "term": 7, "t0": 3.5, "t1": 3.6})  # told it leads after its end
    b = write_history(tmp_path / "b", "b", {"ev": "won", "term": 6, "t": 2.0, "deadline": 4.0},
                      {"ev": "end", "term": 6, "t": 4.0})
    verdict = check(load([a, b]))
    assert not verdict.ok
    assert [(x.proc, y.proc) for x, y in verdict.overlaps] == [("a", "b")]
    assert [(x.term, y.term) for x, y in verdict.term_errors] == [(7, 6)]
    assert [o.t0 for o in verdict.stray_observations] == [3.5]
    assert "two leaders at once" in verdict.problems()


def test_checker_ignores_a_win_that_was_stale_on_arrival(tmp_path: Path) -> None:
    """A candidate resumed after its lease expired gets a win whose deadline has passed: it
    never steps up, so the tenure is empty and cannot overlap (its term is older)."""
    a = write_history(tmp_path / "a", "a", {"ev": "won", "term": 3, "t": 5.0, "deadline": 1.0},
                      {"ev": "end", "term": 3, "t": 1.0})  # the recorder caps ends at the deadline
    b = write_history(tmp_path / "b", "b", {"ev": "won", "term": 4, "t": 4.0, "deadline": 6.0},
                      {"ev": "end", "term": 4, "t": 6.0})
    assert check(load([a, b])).ok


def test_checker_finds_early_releases_and_forked_children_that_lead(tmp_path: Path) -> None:
    """A release sent while is_leader() said True (rule 9), and a forked child that was told it
    leads or touched the store (rule 11), fail the run even when no tenures overlap."""
    a = write_history(tmp_path / "a.jsonl", "a", {"ev": "won", "term": 5, "t": 1.0, "deadline": 3.0},
                      {"ev": "release", "term": 5, "t": 2.0, "leading": True}, {"ev": "end", "term": 5, "t": 2.0})
    child = write_history(tmp_path / "a.fork9.jsonl", "a/fork9", {"ev": "start", "pid": 9, "t": 1.5},
                          {"ev": "lead", "term": 5, "t0": 1.6, "t1": 1.61},
                          {"ev": "fork-violation", "what": "renewed", "term": 5, "t": 1.7})
    verdict = check(load([a, child]))
    assert not verdict.ok and not verdict.overlaps and not verdict.stray_observations
    assert verdict.early_releases == [("a", 5, 2.0)]
    assert [o.proc for o in verdict.fork_leads] == ["a/fork9"] and verdict.forks == 1
    assert verdict.fork_violations == [("a/fork9", "renewed", 1.7)]
    assert "while is_leader() still said True" in verdict.problems()
    clean = write_history(tmp_path / "b.jsonl", "b", {"ev": "won", "term": 6, "t": 4.0, "deadline": 5.0},
                          {"ev": "release", "term": 6, "t": 4.5, "leading": False}, {"ev": "end", "term": 6, "t": 4.5})
    assert check(load([clean])).ok


def test_schedules_are_reproducible_and_bounded() -> None:
    first = nemesis.make_schedule(11, 30.0, 2.0)
    assert first == nemesis.make_schedule(11, 30.0, 2.0)
    assert first != nemesis.make_schedule(12, 30.0, 2.0)
    assert {fault.kind for fault in first} == set(nemesis.WEIGHTS)  # every kind in a short run
    assert all(0 <= fault.at < 30.0 and fault.duration <= 6.0 for fault in first)
    lasting = [f for f in first if f.kind not in nemesis.INSTANT]
    for fault in lasting:  # at most two lasting faults at once
        running = [f for f in lasting if f.at <= fault.at < f.at + f.duration]
        assert len(running) <= 2, [str(f) for f in running]
    store = [f for f in first if f.kind in nemesis.STORE_FAULTS]
    for before, after in itertools.pairwise(store):
        assert after.at >= before.at + before.duration, "store faults never overlap"
    # without runners there is nothing to signal; Consul's CI spacing still tries every kind
    assert not {f.kind for f in nemesis.make_schedule(11, 30.0, 2.0, runners=0)} & set(nemesis.RUN_FAULTS)
    consul = nemesis.make_schedule(11, CI_DURATION["consul"], 10.0, spacing=CI_SPACING["consul"])
    assert len({fault.kind for fault in consul}) >= len(nemesis.WEIGHTS) - 1
    heavy = nemesis.make_schedule(11, 600.0, 1.0, weights=nemesis.RESIGN_HEAVY, spacing=(0.1, 0.4))
    assert sum(f.kind == "resign" for f in heavy) > len(heavy) / 2, "resign-heavy: mostly graceful handovers"


# -- nemesis runs ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", nemesis.ALL_BACKENDS)
def test_nemesis(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request) -> None:
    """Five candidates under a short random schedule of every fault: never two leaders."""
    seed = int(os.environ.get("NEMESIS_SEED") or random.SystemRandom().randrange(1_000_000))
    duration = float(os.environ.get("NEMESIS_DURATION") or CI_DURATION[backend])
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        with capsys.disabled():
            print(text, flush=True)

    limit = duration + 360.0  # setup, restarts of store nodes, recovery, on a loaded machine
    with gevent.Timeout(limit, AssertionError(f"the nemesis run took over {limit:g}s (seed {seed})")):
        spacing = CI_SPACING[backend]
        replay = f" --spacing {spacing[0]:g} {spacing[1]:g}" if tuple(spacing) != nemesis.SPACING else ""
        result = nemesis.run(backend, seed, duration, tmp_path, spacing=spacing, options=replay, say=say)
    record = request.node.user_properties
    record.append(("nemesis", result.summary()))
    assert result.ok, "\n".join(lines[-60:]) + f"\nhistories in {tmp_path}\n{result.summary()}"
    assert not result.verdict.overlaps and not result.runs.overlaps
    done = {i.fault.kind for i in result.done()}
    possible = {f.kind for f in result.schedule}
    assert len(done) >= len(possible) - 3, f"only {sorted(done)} of {sorted(possible)} were injected"


# -- the fencing example ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fencing_example_refuses_the_stale_leaders_write(etcd_cluster) -> None:
    """examples/fencing.py: a leader whose hub was blocked past its deadline writes late, and the
    ledger refuses the write because a newer term has written (docs/safety.md shows its output)."""
    from tests.candidate_process import REPO

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "examples/fencing.py", "--store", etcd_cluster.url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    refused = [line for line in lines if "REFUSED" in line]
    assert refused and refused[0].startswith("a: ") and "is_leader() False" in refused[0], done.stdout
    assert "the stale leader's write was refused" in lines[-1]
