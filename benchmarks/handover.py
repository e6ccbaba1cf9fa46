"""Graceful handover and crash failover, through command-line runners, against the peers.

Every contender is a process that waits to lead and then runs the same child, a ``bash``
script: ``greenleader run`` (any store), ``consul lock``, ``etcdctl lock``, or kazoo's
``Election`` recipe (:mod:`benchmarks.kazoo_peer`). The child writes ``start ID TIME`` to a
FIFO the driver reads, waits until the driver tells it to end (a line on its own FIFO), writes
``end ID TIME`` and exits. TIME is bash's ``$EPOCHREALTIME`` (the wall clock in microseconds,
read without a fork), so the figures do not depend on when the driver gets to read the lines.

- **Handover**: three contenders on one key. Once every waiter is registered in the store,
  the holder's child is told to end; the figure is from its ``end`` line to the next child's
  ``start`` line. A new contender then joins, so two always wait.
- **Failover**: pairs (holder, waiter) on keys of their own, run side by side; each holder's
  whole process group (runner and child) is SIGKILLed at a random instant, and the figure is
  from the kill to the waiter's child's ``start`` line.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.os

from .common import (
    Config,
    Proc,
    Stores,
    ZooKeeperProbe,
    changes,
    child_env,
    consul_sessions,
    etcd_count,
    loadavg,
    stop_all,
    summary,
    unique_key,
)
from .report import commit_of

log = logging.getLogger(__name__)

CHILD = """\
echo "start $BENCH_ID $EPOCHREALTIME" > "$BENCH_FIFO"
read line < "$BENCH_DIR/go-$BENCH_ID"
echo "end $BENCH_ID $EPOCHREALTIME" > "$BENCH_FIFO"
"""
SETTLE = 0.25  # seconds between "every waiter is registered" and ending the holder's child
STARTUP = 60.0  # seconds a contender may take to start and register (Python, a loaded machine)
CONSUL_LOCK_TTL = 15.0  # consul lock's session TTL (api.DefaultLockSessionTTL); it has no flag
CONSUL_DEFAULT_LOCK_DELAY = 15.0  # Consul's lock-delay for sessions that do not set one
CONSUL_LOCK_RETRY = 5.0  # consul lock retries every 5 s while a lock-delay holds (DefaultLockRetryTime)
#: Added to a bound before judging a failover: the figure also holds the waiter's wake-up and
#: its child's start, and etcd revokes expired leases in 500 ms rounds.
ALLOWANCE = 0.5


@dataclass
class Event:
    index: int  # order of arrival
    t: float  # the child's wall clock
    word: str
    ident: str


class EventPipe:
    """The FIFO every child writes its ``start``/``end`` lines to, timed on arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._wfd = os.open(path, os.O_WRONLY)  # a writer of our own: reads never see EOF
        self.events: list[Event] = []
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        buf = b""
        while True:
            buf += gevent.os.nb_read(self._rfd, 65536)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                word, ident, t = line.decode().split(" ")
                self.events.append(Event(len(self.events), float(t), word, ident))
            changes.notify()

    def mark(self) -> int:
        """The index the next event will have: ``wait(after=...)`` finds only later events."""
        return len(self.events)

    def find(self, word: str, after: int = 0, ident: str | None = None,
             exclude: frozenset[str] = frozenset()) -> Event | None:
        return next((e for e in self.events[after:] if e.word == word and e.ident not in exclude
                     and (ident is None or e.ident == ident)), None)

    def wait(self, word: str, timeout: float, *, after: int = 0, ident: str | None = None,
             exclude: frozenset[str] = frozenset()) -> Event:
        what = f"{word!r} from {ident or 'anyone'} after event {after}"
        return changes.wait_for(what, lambda: self.find(word, after, ident, exclude), timeout)

    def close(self) -> None:
        self._reader.kill()
        os.close(self._rfd)
        os.close(self._wfd)


class Ctx:
    """What the runners of one benchmark run share: servers, the FIFO, a ZooKeeper probe."""

    def __init__(self, config: Config, stores: Stores, workdir: Path) -> None:
        self.config = config
        self.stores = stores
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.child = workdir / "child.sh"
        self.child.write_text(CHILD)
        self.pipe = EventPipe(workdir / "events.fifo")
        self._zk: ZooKeeperProbe | None = None

    def zk(self) -> ZooKeeperProbe:
        if self._zk is None:
            self._zk = ZooKeeperProbe(self.stores.addr("zookeeper"))
        return self._zk

    def close(self) -> None:
        self.pipe.close()
        if self._zk is not None:
            self._zk.close()


# ---------------------------------------------------------------------------------------------
# the runners


@dataclass
class Runner:
    """One way to run the child while leading; ``label`` names it in the table."""

    label: str
    kind: str
    ttl: float
    peer: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # greenleader store URL options
    lock_delay: float | None = None  # Consul only

    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        raise NotImplementedError

    def registered(self, ctx: Ctx, key: str, idents: list[str]) -> int:
        """How many of ``idents`` the store shows as contenders for ``key``."""
        if self.kind == "consul":
            names = {s.get("Name") for s in consul_sessions(ctx.stores.addr("consul"))}
            return sum(self.session_name(i) in names for i in idents)
        if self.kind == "etcd":
            return etcd_count(ctx.stores.addr("etcd"), key + "/")
        if self.kind == "zookeeper":
            return ctx.zk().count("/" + key)
        raise NotImplementedError

    def session_name(self, ident: str) -> str:
        return ident

    def bound(self) -> float | None:
        """The crash-failover bound of the contract (docs/safety.md, rule 4) for these settings (None: no bound)."""
        return None


@dataclass
class GreenleaderRun(Runner):
    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        url = ctx.stores.url(self.kind, **self.options)
        verbose = ["-v"] if self.kind == "file" else []  # its "campaigning" line marks readiness
        return [sys.executable, "-m", "greenleader", *verbose, "run", "--store", url, "--key", key,
                "--ttl", f"{self.ttl:g}", "--node", ident, "--", "bash", str(ctx.child)]

    def session_name(self, ident: str) -> str:
        return f"greenleader {ident}"

    def registered(self, ctx: Ctx, key: str, idents: list[str]) -> int:
        if self.kind != "file":
            return super().registered(ctx, key, idents)
        # flock waiters are invisible from outside: trust the runner's own log line
        return sum("campaigning for" in (ctx.workdir / f"{i}.stderr").read_text(errors="replace") for i in idents)

    def bound(self) -> float | None:
        if self.kind == "consul":
            return 2 * self.ttl + (self.lock_delay if self.lock_delay is not None else 1.0)
        if self.kind == "file":
            return 0.1  # the kernel drops the dead holder's flock at once; waiters poll every 20 ms
        return self.ttl


@dataclass
class LibraryRunner(GreenleaderRun):
    """The library with the fast spawn of benchmarks/library_runner.py."""

    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        url = ctx.stores.url(self.kind, **self.options)
        return [sys.executable, "-m", "benchmarks.library_runner", "--url", url, "--key", key,
                "--ttl", f"{self.ttl:g}", "--id", ident, "--", "bash", str(ctx.child)]


#: ``python -m greenleader`` from the tree given first: ``-m`` would put the working directory
#: (this repository, where contenders run) ahead of ``PYTHONPATH``.
_RUN_FROM_TREE = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                  "runpy.run_module('greenleader', run_name='__main__', alter_sys=True)")


@dataclass
class OtherTreeRun(GreenleaderRun):
    """``greenleader run`` from another source tree (``--against``), so that a change is
    measured beside its parent in one run, where the machine's state is the same for both
    (single runs move by 10-15 %)."""

    tree: Path = Path()

    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        python, _, _, *rest = super().argv(ctx, ident, key)  # python -m greenleader ...
        return [python, "-c", _RUN_FROM_TREE, str(self.tree), *rest]


def tree_label(tree: Path) -> str:
    """``greenleader run @<commit>`` (``+uncommitted`` if its library has changes)."""
    return f"greenleader run @{commit_of(tree) or tree.name}"


@dataclass
class ConsulLock(Runner):
    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        return ["consul", "lock", f"-http-addr={ctx.stores.addr('consul')}", f"-name={ident}", "-shell=false",
                key, "bash", str(ctx.child)]

    def bound(self) -> float | None:
        return 2 * self.ttl + (self.lock_delay or 0.0) + CONSUL_LOCK_RETRY


@dataclass
class EtcdctlLock(Runner):
    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        return ["etcdctl", f"--endpoints={ctx.stores.addr('etcd')}", "lock", f"--ttl={round(self.ttl)}", key,
                "bash", str(ctx.child)]

    def bound(self) -> float | None:
        return self.ttl


@dataclass
class KazooElection(Runner):
    def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
        return [sys.executable, "-m", "benchmarks.kazoo_peer", "--hosts", ctx.stores.addr("zookeeper"),
                "--path", "/" + key, "--ttl", f"{self.ttl:g}", "--id", ident, "--", "bash", str(ctx.child)]

    def bound(self) -> float | None:
        return self.ttl


def handover_runners(kind: str, against: tuple[Path, ...] = ()) -> list[Runner]:
    """greenleader run (and that of each tree in ``against``), the library runner and the peer
    on ``kind``, with the library's default TTL (15 s)."""
    ours: list[Runner] = [GreenleaderRun("greenleader run", kind, ttl=15.0),
                          *(OtherTreeRun(tree_label(tree), kind, ttl=15.0, tree=tree.resolve()) for tree in against),
                          LibraryRunner("greenleader library", kind, ttl=15.0)]
    peers: dict[str, Runner] = {
        "consul": ConsulLock("consul lock", kind, ttl=CONSUL_LOCK_TTL, peer=True),
        "etcd": EtcdctlLock("etcdctl lock", kind, ttl=15.0, peer=True),
        "zookeeper": KazooElection("kazoo Election", kind, ttl=15.0, peer=True),
    }
    return ours + ([peers[kind]] if kind in peers else [])


def failover_runners(kind: str, quick: bool = False) -> list[Runner]:
    """Equal TTLs: Consul at consul lock's fixed 15 s (with greenleader's default lock-delay
    and with Consul's 15 s one, which consul lock gets), etcd and ZooKeeper at 3 s. A quick
    run takes Consul's shortest TTL and no peer there (consul lock's failover takes ~45 s)."""
    if kind == "consul" and quick:
        return [GreenleaderRun("greenleader run", kind, ttl=10.0, options={"lock_delay": 0}, lock_delay=0.0)]
    if kind == "consul":
        return [
            GreenleaderRun("greenleader run", kind, ttl=CONSUL_LOCK_TTL, lock_delay=1.0),
            GreenleaderRun("greenleader run, lock-delay 15 s", kind, ttl=CONSUL_LOCK_TTL,
                           options={"lock_delay": 15}, lock_delay=15.0),
            ConsulLock("consul lock", kind, ttl=CONSUL_LOCK_TTL, peer=True, lock_delay=CONSUL_DEFAULT_LOCK_DELAY),
        ]
    if kind == "etcd":
        return [GreenleaderRun("greenleader run", kind, ttl=3.0), EtcdctlLock("etcdctl lock", kind, ttl=3.0, peer=True)]
    if kind == "zookeeper":
        return [GreenleaderRun("greenleader run", kind, ttl=3.0),
                KazooElection("kazoo Election", kind, ttl=3.0, peer=True)]
    return [GreenleaderRun("greenleader run", kind, ttl=3.0)]


# ---------------------------------------------------------------------------------------------
# a field of contenders on one key


class Field:
    """The contender processes of one runner on one key."""

    def __init__(self, ctx: Ctx, runner: Runner, key: str, prefix: str) -> None:
        self.ctx = ctx
        self.runner = runner
        self.key = key
        self.prefix = prefix
        self.procs: dict[str, Proc] = {}
        self.count = 0
        self.exit_codes: dict[str, int] = {}

    def add(self) -> str:
        self.count += 1
        ident = f"{self.prefix}{self.count}"
        os.mkfifo(self.ctx.workdir / f"go-{ident}")
        env = child_env(BENCH_ID=ident, BENCH_FIFO=str(self.ctx.pipe.path), BENCH_DIR=str(self.ctx.workdir))
        self.procs[ident] = Proc(self.runner.argv(self.ctx, ident, self.key), self.ctx.workdir, ident, env=env)
        return ident

    def live(self) -> list[str]:
        return [i for i, p in self.procs.items() if p.running()]

    def wait_ready(self, holder: str, timeout: float = STARTUP) -> None:
        """Until the holder's child runs and every live contender is registered in the store."""
        def ready() -> bool:
            live = self.live()
            if holder not in live:
                raise RuntimeError(f"the holder {holder} exited: {self.procs[holder].stderr_tail()}")
            return self.runner.registered(self.ctx, self.key, live) >= len(live)

        try:
            changes.wait_for(f"{len(self.live())} contenders of {self.runner.label} on {self.key}",
                             ready, timeout, poll=0.02)
        except TimeoutError as exc:
            tails = "\n".join(f"--- {i}:\n{p.stderr_tail(5)}" for i, p in self.procs.items() if p.running())
            raise TimeoutError(f"{exc}\n{tails}") from None

    def end(self, ident: str, timeout: float = 10.0) -> None:
        """Tell ``ident``'s child to end (its FIFO must have a reader: retry until it has)."""
        path = self.ctx.workdir / f"go-{ident}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                gevent.sleep(0.001)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    def reap(self, ident: str, timeout: float = 30.0) -> int:
        code = self.procs[ident].wait_exit(timeout)
        self.exit_codes[ident] = code
        return code

    def close(self) -> None:
        stop_all(self.procs.values())


# ---------------------------------------------------------------------------------------------
# the benchmarks


def handover(ctx: Ctx, runner: Runner, trials: int) -> dict[str, Any]:
    key = unique_key(f"handover-{runner.kind}")
    slug = re.sub(r"[^a-z]+", "", runner.label.lower())[:12] + format(zlib.crc32(runner.label.encode()), "x")[:4]
    field_ = Field(ctx, runner, key, prefix=f"h-{runner.kind[:2]}-{slug}-")
    pipe = ctx.pipe
    samples: list[float] = []
    tenures: list[tuple[str, float, float]] = []
    errors: list[str] = []
    t0, mark = time.time(), pipe.mark()
    try:
        for _ in range(3):
            field_.add()
        first = pipe.wait("start", STARTUP, after=mark)
        holder, started = first.ident, first
        for _ in range(trials):
            field_.wait_ready(holder)
            gevent.sleep(SETTLE)
            field_.end(holder)
            ended = pipe.wait("end", 10.0, ident=holder, after=started.index)
            successor = pipe.wait("start", 30.0, after=ended.index, exclude=frozenset({holder}))
            samples.append(successor.t - ended.t)
            tenures.append((holder, started.t - t0, ended.t - t0))
            code = field_.reap(holder)
            if code != 0:
                errors.append(f"{holder} exited with status {code}: {field_.procs[holder].stderr_tail(3)}")
            holder, started = successor.ident, successor
            field_.add()
    finally:
        field_.close()
    log.info("handover %s %s: %s", runner.kind, runner.label, summary(samples))
    return {"label": runner.label, "peer": runner.peer, "ttl": runner.ttl, "samples": samples,
            "summary": summary(samples), "tenures": tenures, "errors": errors}


def failover(ctx: Ctx, runners: list[Runner], pairs: int) -> list[dict[str, Any]]:
    """``pairs`` failovers per runner, all runners' pairs side by side."""
    fields: list[tuple[Runner, Field]] = []
    results: dict[str, dict[str, Any]] = {
        r.label: {"label": r.label, "peer": r.peer, "ttl": r.ttl, "lock_delay": r.lock_delay, "bound": r.bound(),
                  "samples": [], "tenures": [], "errors": []}
        for r in runners
    }
    t0, mark = time.time(), ctx.pipe.mark()
    try:
        for runner in runners:
            for j in range(pairs):
                key = unique_key(f"failover-{runner.kind}")
                fld = Field(ctx, runner, key, prefix=f"f{runners.index(runner)}{j}-{runner.kind[:2]}-")
                fld.add()
                fields.append((runner, fld))
        holders = {}
        for _runner, fld in fields:  # the first of a pair leads, then its waiter joins
            holders[id(fld)] = ctx.pipe.wait("start", STARTUP, after=mark, ident=f"{fld.prefix}1")
            fld.add()

        def trial(runner: Runner, fld: Field) -> None:
            holder = holders[id(fld)]
            fld.wait_ready(holder.ident)
            # a random instant within the slowest renewal period, so kills fall anywhere
            gevent.sleep(SETTLE + random.uniform(0, runner.ttl / 2))
            killed = time.time()  # the children's clock
            fld.procs[holder.ident].signal_group(signal.SIGKILL)
            timeout = (runner.bound() or runner.ttl) + 30
            successor = ctx.pipe.wait("start", timeout, after=mark, ident=f"{fld.prefix}2")
            result = results[runner.label]
            result["samples"].append(successor.t - killed)
            result["tenures"].append((holder.ident, holder.t - t0, killed - t0, successor.t - t0))

        jobs = [gevent.spawn(trial, runner, fld) for runner, fld in fields]
        gevent.joinall(jobs)
        for job in jobs:
            if not job.successful():
                raise job.exception
    finally:
        stop_all(p for _, fld in fields for p in fld.procs.values())
    out = []
    for result in results.values():
        result["summary"] = summary(result["samples"])
        bound = result["bound"]
        result["allowance"] = ALLOWANCE
        result["within_bound"] = (bool(result["samples"]) and bound is not None
                                  and result["summary"]["max"] <= bound + ALLOWANCE)
        result["within_strict_bound"] = (bool(result["samples"]) and bound is not None
                                         and result["summary"]["max"] <= bound)
        log.info("failover %s: %s", result["label"], result["summary"])
        out.append(result)
    return out


def run_handover(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    ctx = Ctx(config, stores, workdir)
    data: dict[str, Any] = {}
    try:
        for kind in config.kinds:
            load_before = loadavg()
            data[kind] = [handover(ctx, runner, config.handover_trials)
                          for runner in handover_runners(kind, config.against)]
            for result in data[kind]:  # the 1-minute load average as this store began and ended
                result["load"] = [load_before[0], loadavg()[0]]
        return data
    finally:
        ctx.close()


def run_failover(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    ctx = Ctx(config, stores, workdir)
    try:
        return {kind: failover(ctx, failover_runners(kind, config.quick), config.failover_trials)
                for kind in config.kinds}
    finally:
        ctx.close()
