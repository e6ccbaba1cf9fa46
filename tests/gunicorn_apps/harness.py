"""Real gunicorn masters for the tests, and the duty's log they are judged by.

:class:`Fleet` starts ``gunicorn -k gevent`` masters serving :mod:`tests.gunicorn_apps.app` on
loopback ports, all on one store and key, and reads the duty log the app writes. Every wait is
bounded and fails with the duty log and the masters' log tails.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent

from tests import servers

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONF = Path(__file__).with_name("conf.py")
APP = "tests.gunicorn_apps.app:app"
POLL = 0.02  # seconds between reads of the duty log (written by other processes)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A free loopback port that tests.servers will not hand to a store server either."""
    return servers.free_ports(1)[0]


def worker_pid(node: str) -> int:
    """The worker pid in a node name ``host:master-pid:worker-pid``."""
    return int(node.rsplit(":", 1)[1])


def master_pid(node: str) -> int:
    return int(node.rsplit(":", 2)[1])


@dataclass
class Tenure:
    """One worker's run of the duty, from the duty's own lines."""

    node: str
    term: int
    start: float
    end: float  # the last line's time
    stopped: bool  # the duty wrote its stop line (it was killed at the end of its tenure)


class Master:
    """One gunicorn master and its workers, serving the test app on ``port``."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], *, workers: int = 3,
                 args: tuple[str, ...] = (), app: str = APP, conf: Path = CONF, cwd: Path = REPO) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "-w", str(workers),
                "-b", f"127.0.0.1:{self.port}", *args, app]
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<Master {self.name} pid={self.pid} port={self.port} rc={self.popen.returncode}>"

    def send(self, sig: int) -> float:
        """Send ``sig`` to the master; return when it was sent (monotonic)."""
        sent = time.monotonic()
        self.popen.send_signal(sig)
        return sent

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET ``path`` on a new connection; (status, JSON body or text). OSError if unreachable."""
        try:
            with _opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                status, data = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def campaigning(self) -> int:
        """How many of this master's workers (so far, counting replaced ones) started campaigning."""
        return self.log_text().count("campaigning on the")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self!r} did not exit within {timeout:g}s\n{self.tail()}") from None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return f"--- {self!r} log tail:\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%r ignored SIGTERM for %gs; killing it (its workers follow)", self, timeout)
            self.popen.kill()
            self.popen.wait()


class Fleet:
    """Masters on one store and key, the duty log their workers write, and waits on it."""

    def __init__(self, workdir: Path, store_url: str, key: str, ttl: float, *, tick: float = 0.05) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.duty_log = self.workdir / "duty.log"
        self.event_log = self.workdir / "events.log"
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            GREENLEADER_STORE=store_url, GREENLEADER_KEY=key, GREENLEADER_TTL=str(ttl),
            DUTY_LOG=str(self.duty_log), EVENT_LOG=str(self.event_log), DUTY_TICK=str(tick),
        )
        self.masters: list[Master] = []
        self._names = itertools.count(1)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for master in self.masters:
            master.stop()

    def start(self, *, workers: int = 3, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
              **kwargs: Any) -> Master:
        master = Master(f"master{next(self._names)}", self.workdir, {**self.env, **(env or {})},
                        workers=workers, args=args, **kwargs)
        self.masters.append(master)
        return master

    def master_of(self, node: str) -> Master:
        pid = master_pid(node)
        return next(m for m in self.masters if m.pid == pid)

    # -- the duty log -------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        # A line may be half-written while we read: only complete lines count.
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def duty_lines(self) -> list[dict[str, Any]]:
        return self._read(self.duty_log)

    def event_lines(self) -> list[dict[str, Any]]:
        return self._read(self.event_log)

    def tenures(self) -> list[Tenure]:
        """Each (node, term) run of the duty, in order of start."""
        found: dict[tuple[str, int], Tenure] = {}
        for line in self.duty_lines():
            ident = (line["node"], line["term"])
            tenure = found.get(ident)
            if tenure is None:
                tenure = found[ident] = Tenure(line["node"], line["term"], line["t"], line["t"], False)
                assert line["event"] == "start", f"{ident} wrote {line['event']} before start\n{self.report()}"
            tenure.end = max(tenure.end, line["t"])
            tenure.stopped = tenure.stopped or line["event"] == "stop"
        return sorted(found.values(), key=lambda t: t.start)

    def check_history(self) -> list[Tenure]:
        """No two workers ran the duty at once, and terms strictly increased; returns the tenures."""
        tenures = self.tenures()
        for before, after in itertools.pairwise(tenures):
            assert before.end <= after.start, f"two workers ran the duty at once: {before} and {after}\n{self.report()}"
            assert after.term > before.term, f"the term did not increase: {before} then {after}\n{self.report()}"
        return tenures

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll ``check()`` until it returns something true (returned); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{self.report()}")
            gevent.sleep(POLL)

    def wait_tenure(self, timeout: float, *, after: float = 0.0, exclude: str | None = None,
                    where: Callable[[Tenure], bool] = lambda tenure: True) -> Tenure:
        """The first tenure that started after ``after``, in a worker other than ``exclude``
        (and for which ``where`` holds)."""
        def found() -> Tenure | None:
            return next((t for t in self.tenures() if t.start > after and t.node != exclude and where(t)), None)

        return self.wait_for(f"a worker to start the duty after t={after:.3f}", found, timeout)

    def current(self, timeout: float) -> Tenure:
        """The running tenure (the latest one, not stopped), waiting for a tick after now."""
        now = time.monotonic()

        def found() -> Tenure | None:
            tenures = self.tenures()
            last = tenures[-1] if tenures else None
            return last if last is not None and not last.stopped and last.end > now else None

        return self.wait_for("a worker running the duty", found, timeout)

    def report(self) -> str:
        lines = self.duty_lines()
        t0 = lines[0]["t"] if lines else 0.0
        out = ["duty log (start/stop lines, and the ticks around them), t relative to the first line:"]
        for i, line in enumerate(lines):
            near_change = (line["event"] != "tick" or i + 1 == len(lines)
                           or lines[i + 1]["event"] != "tick" or lines[i - 1]["event"] != "tick")
            if near_change:
                out.append(f"  {line['t'] - t0:9.3f} {line['event']:5} {line['node']} term={line['term']}")
        out += [master.tail() for master in self.masters]
        return "\n".join(out)

    def scan_status(self, leader: Tenure, timeout: float, masters: list[Master] | None = None) -> dict[str, Any]:
        """Query ``/_greenleader/leader`` on new connections until a leader and a non-leader
        answered, checking each answer against the duty log, and ``/_greenleader/leader-master``
        (200 in every worker of the leader's master only); returns {node: body}."""
        seen: dict[str, Any] = {}

        def check() -> bool:
            for master in masters or self.masters:
                code, body = master.get("/_greenleader/leader")
                assert isinstance(body, dict), f"{master!r} answered {code} {body!r}"
                assert code == (200 if body["is_leader"] else 503), f"{master!r} answered {code} with {body}"
                assert not body["is_leader"] or (body["node"] == leader.node and body["term"] == leader.term), (
                    f"{body} claims to lead, the duty runs in {leader}\n{self.report()}"
                )
                if body["leader"] == leader.node and body["term"] == leader.term:
                    seen[body["node"]] = body
                code, body = master.get("/_greenleader/leader-master")
                if body["leader"] == leader.node:
                    hosts_leader = master_pid(leader.node) == master.pid
                    assert code == (200 if hosts_leader else 503), f"{master!r} leader-master: {code} {body}"
            leaders = [b for b in seen.values() if b["is_leader"]]
            return bool(leaders) and len(seen) > len(leaders)

        self.wait_for("status answers from the leader and from a non-leader", check, timeout)
        return seen
