"""Nemesis runs: candidate processes on a real 3-node store cluster under a seeded random
schedule of faults, judged by the split-brain checker of :mod:`tests.history`.

    python -m tests.nemesis --backend etcd --duration 600 --seed 7
    python -m tests.nemesis --backend etcd --duration 600 --ttl 1 --profile resign-heavy --spacing 0.1 0.4

Five candidate processes (``retry`` on, as a service that must outlive outages runs them) and
one follower campaign on one key; three ``greenleader run`` processes (runners, restarted
whenever they exit, as by systemd) campaign on a second key, each running a witness command
(:mod:`tests.run_witness`) that records whether two commands' process trees ever lived at
once. Each client talks to every store node through proxies of its own
(:class:`tests.faults.ClientProxies`), so a network fault can hit one client. The schedule is
drawn from the seed before the run and printed; faults start in ``[0, duration)``, ``--spacing``
TTLs apart, at most two lasting ones at a time (at most one of them on the store):

- ``partition``: a client's connections to every node go silent (both ways, or one way),
  for 0.5-2.5 TTL; a third of the heals also reset the held connections;
- ``partition-node``: a client is cut off from one node only;
- ``delay``: a client's traffic is delayed (small or large latency) for 1-3 TTL;
- ``reset``: every connection of a client is reset;
- ``pause``: SIGSTOP a candidate process for 1.2-2.5 TTL (longer than the TTL), then SIGCONT;
- ``block``: a candidate runs CPU-bound code that blocks its gevent hub for 1.5 TTL;
- ``crash``: SIGKILL a candidate process, start a new one 0.2-2 TTL later;
- ``kill-node``: SIGKILL one store node (its Raft/Zab leader half of the time), restart it;
- ``freeze``: on a one-server store (PostgreSQL), in place of ``kill-node``: SIGSTOP the server
  and every backend for 0.5-3 TTL (nothing answers, connections stay open), then SIGCONT;
- ``outage``: SIGKILL every store node, restart them 0.5-2 TTL later;
- ``delete-key``: delete the leader's or a waiter's registration from outside, as an
  operator would (Consul: the key itself or the session; etcd: the candidate's key;
  ZooKeeper: its node; PostgreSQL: the holder's row, as psql would), or the leading runner's;
- ``inject``: for 1-3 TTL, the candidate's store calls fail at random (``--inject-rate``)
  with injected exceptions of any class (:class:`greenleader.testing.FaultyStore`); a
  campaign ended by one (a bug-like exception) has its process restarted;
- ``fork``: the leading process forks; the child must stay inert for 1.5 TTL (it must never
  say it leads, renew, release or win), then stops its candidate and exits;
- ``resign``: the leader resigns (a graceful handover; sent to every candidate, as the nemesis
  learns of a new leader a moment late);
- ``hup-run``, ``quit-run``, ``kill-run``: SIGHUP, SIGQUIT or SIGKILL to the leading runner.

``--backend file`` runs the same on the file store (one host's directory): without network
or store faults, and ``delete-key`` removes the lock file or moves a copy over it.

Most client faults target whoever leads when the fault starts (targets are named when the
schedule runs, so a replay with the same seed injects the same faults at the same times,
though the processes they hit may differ if the leadership went differently).

After the last fault heals the run waits for a leader, for the follower to name it and for a
runner's command, stops every process gracefully and checks the histories: no two tenures may
overlap, terms must increase, a duty must never be told it leads outside its tenure, a release
must never be sent while the candidate still says it leads, a forked child must never lead or
touch the store, no two commands' process trees may live at once, and none may outlive its
runner. It reports the faults, leadership changes, and the time without a leader after each heal.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

from tests import faults, servers
from tests.candidate_process import (
    FORK_SIGNAL,
    INJECT_OFF_SIGNAL,
    INJECT_ON_SIGNAL,
    REPO,
    RESIGN_SIGNAL,
    ElectionProcess,
    ProcessGroup,
    _die_with_parent,
)
from tests.history import Verdict, check, load

log = logging.getLogger(__name__)

BACKENDS = ("consul", "etcd", "zookeeper", "postgres")
#: Stores that run on one server here (no replication): ``kill-node`` freezes that server
#: instead (the whole-store ``outage`` kills it).
SINGLE_SERVER = ("postgres",)
#: Options each client's URL needs besides its proxies' addresses (the role and the database).
CLIENT_QUERY = {"postgres": f"user={servers.PostgresCluster.SUPERUSER}&dbname={servers.PostgresCluster.DBNAME}"}
#: The file store runs too, on one host's directory: no network and no store server, so no
#: network or store faults (the others apply; delete-key removes or replaces the lock file).
ALL_BACKENDS = (*BACKENDS, "file")
#: TTL per backend: Consul's minimum; 2 s elsewhere (many renewals per TTL on a loaded machine).
DEFAULT_TTL = {"consul": 10.0, "etcd": 2.0, "zookeeper": 2.0, "postgres": 2.0, "file": 1.0}
#: First retry delay of the candidates' and follower's Backoff (up to 4 times as much).
RETRY = 0.25
STARTUP = 150.0  # seconds for the processes to start and elect a first leader (up to 50 s seen at load 8-13)
#: kind -> weight in the random schedule
WEIGHTS = {
    "partition": 3, "partition-node": 1, "delay": 2, "reset": 2, "pause": 2, "block": 2,
    "crash": 2, "kill-node": 2, "outage": 1,
    "delete-key": 2, "inject": 2, "fork": 1, "resign": 1, "hup-run": 1, "quit-run": 1, "kill-run": 1,
}
#: Weights for long runs that need many leadership changes: mostly graceful handovers and
#: deletions (each a change within round trips), every other kind now and then.
RESIGN_HEAVY = {
    "resign": 20, "delete-key": 4, "inject": 2, "kill-run": 1, "hup-run": 1, "quit-run": 1,
    "partition": 1, "reset": 1, "delay": 1, "pause": 1, "block": 1, "crash": 1, "fork": 1,
    "partition-node": 0.5, "kill-node": 0.5, "outage": 0.2,
}
PROFILES = {"mixed": WEIGHTS, "resign-heavy": RESIGN_HEAVY}
#: Seconds between two fault starts, as fractions of the TTL (drawn uniformly).
SPACING = (0.3, 1.0)
STORE_FAULTS = ("kill-node", "outage", "freeze")
NETWORK_FAULTS = ("partition", "partition-node", "delay", "reset")
#: Faults that signal a candidate process, which must have installed its handlers (it has
#: once it printed ``campaigning``): their default action would kill it.
SIGNALLED = ("block", "fork", "inject", "resign")
#: Faults on the ``greenleader run`` processes (runners), and the signal each sends.
RUN_FAULTS = {"hup-run": signal.SIGHUP, "quit-run": signal.SIGQUIT, "kill-run": signal.SIGKILL}
#: What a fault occupies on its target: a slot takes at most one fault of each category.
CATEGORY = {"pause": "process", "block": "process", "crash": "process", "fork": "process",
            "inject": "errors", "delete-key": "key", "resign": "key", **dict.fromkeys(RUN_FAULTS, "process")}
#: Stores where deleting a live holder's registration from outside lets a waiter in before the
#: holder hears of it (docs/safety.md, "Limits that remain": Consul's session destroy or key
#: delete; its lock-delay covers only a holder that hears within it). ``delete-key`` leaves such
#: a holder alone while a network or process fault cuts it off, since the overlap then lasts
#: until its renew deadline by design (CI nemesis, Consul, seed 764989: a session destroyed
#: 1.7 s into a partition of its holder, 3.1 s of overlap). etcd waiters wait for the deleted
#: key's lease, and PostgreSQL keeps a deleted row's hold (its trigger), cut off or not.
CUT_OFF_DELETION_UNGUARDED = ("consul",)
#: Faults over at once (they count for no slot, and not towards the two at a time).
INSTANT = ("reset", "delete-key", "resign", *RUN_FAULTS)
LAST_HEAL = "all healed"
STORE_RESTART = 5.0  # seconds a store node or cluster may take to restart (JVMs on a busy machine)
#: Probability of a store call failing while an ``inject`` fault is on.
INJECT_RATE = 0.3
#: Seconds a supervisor waits before restarting a process that exited (systemd's RestartSec).
RESTART_DELAY = (0.2, 1.0)


def recovery_bound(backend: str, ttl: float) -> float:
    """Seconds after the last heal within which a leader must be back: the backend's
    crash-failover bound (Consul: 2 x TTL + lock-delay), the longest backoff, and slack for a
    store cluster electing its own leader on a loaded machine."""
    failover = 2 * ttl + 1.0 if backend == "consul" else ttl
    return failover + 4 * RETRY + 20.0


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: ``at`` seconds after the start, lasting ``duration`` seconds."""

    at: float
    kind: str
    #: "leader", a candidate slot "c3", "waiter" (a candidate that does not lead), "follower",
    #: "run-leader" (the runner whose command runs), a runner slot "r2", "node2",
    #: "store-leader", "store"
    target: str
    duration: float
    direction: str = "both"  # partitions and delays
    latency: float = 0.0  # delays
    reset_on_heal: bool = False  # partitions
    node: int = 0  # partition-node
    whole_key: bool = False  # delete-key on Consul: the key itself, not the holder's session

    def __str__(self) -> str:
        return f"{self.at:7.2f}s {self.what()}"

    def what(self) -> str:
        extra = ""
        if self.kind == "partition":
            extra = f" {self.direction}" + (" (reset on heal)" if self.reset_on_heal else "")
        elif self.kind == "partition-node":
            extra = f" from node{self.node + 1}"
        elif self.kind == "delay":
            extra = f" {self.direction} by {self.latency:.3f}s"
        elif self.kind == "delete-key" and self.whole_key:
            extra = " (the key)"
        return f"{self.kind:<14} {self.target:<12} for {self.duration:5.2f}s{extra}"


def make_schedule(seed: int, duration: float, ttl: float, candidates: int = 5, nodes: int = 3, *,
                  runners: int = 3, weights: dict[str, float] | None = None,
                  spacing: tuple[float, float] = SPACING, delete_holders: bool = True,
                  freeze: bool = False) -> list[Fault]:
    """A random schedule of faults starting in ``[0, duration)``, drawn from ``seed`` alone.

    The first faults are one of each kind in a random order, aimed at the leader, so that
    even a short run tries them all; the rest are drawn by ``weights`` (default WEIGHTS).
    Faults start ``spacing`` TTLs apart; at most two lasting faults act at once (at most one
    on the store): a lasting fault drawn when two act is replaced by an instant one (one of the
    first round waits instead). Without ``delete_holders``, ``delete-key`` hits waiters only.
    Without runners there are no runner faults; without store nodes (the file store) no
    network or store faults. With ``freeze`` (a one-server store), ``kill-node`` freezes the
    server instead of becoming a partition.
    """
    rng = random.Random(seed)
    weights = {k: w for k, w in (weights or WEIGHTS).items()
               if w > 0 and (runners or k not in RUN_FAULTS) and (nodes or k not in (*STORE_FAULTS, *NETWORK_FAULTS))}
    kinds, values = list(weights), list(weights.values())
    first_round = rng.sample(kinds, len(kinds))
    schedule: list[Fault] = []
    active: list[float] = []  # end times of the lasting faults running at ``at``
    store_free_at = 0.0
    at = 0.0
    while True:
        at += rng.uniform(*spacing) * ttl
        store_ok = at >= store_free_at
        pending = [kind for kind in first_round if store_ok or kind not in STORE_FAULTS]
        if pending:
            kind = pending[0]
            first_round.remove(kind)
        else:
            kind = rng.choices(kinds, values)[0]
        active = [end for end in active if end > at]
        if kind not in INSTANT and len(active) >= 2:
            instant = [k for k in (pending or kinds) if k in INSTANT]
            if not instant:  # a lasting fault waits for a free place
                at = min(active)
                active = [end for end in active if end > at]
            elif pending:  # the first round's next instant kind takes its turn
                first_round.append(kind)
                kind = instant[0]
                first_round.remove(kind)
            else:  # an instant fault takes its turn
                kind = rng.choices(instant, [weights[k] for k in instant])[0]
        if at >= duration:
            return schedule
        if kind in STORE_FAULTS and (not store_ok or (nodes < 3 and kind == "kill-node" and not freeze)):
            kind = "partition"
        target = "leader" if pending or rng.random() < 0.7 else f"c{rng.randint(1, candidates)}"
        fault: Fault
        if kind == "partition":
            if not pending and runners and rng.random() < 0.15:
                target = "run-leader"
            elif not pending and rng.random() < 0.15:
                target = "follower"
            fault = Fault(at, kind, target, rng.uniform(0.5, 2.5) * ttl, direction=rng.choice(["both", "up", "down"]),
                          reset_on_heal=rng.random() < 1 / 3)
        elif kind == "partition-node":
            fault = Fault(at, kind, target, rng.uniform(1.0, 3.0) * ttl, node=rng.randrange(nodes))
        elif kind == "delay":
            latency = rng.uniform(0.01, 0.1) * ttl if rng.random() < 0.5 else rng.uniform(0.2, 0.6) * ttl
            fault = Fault(at, kind, target, rng.uniform(1.0, 3.0) * ttl, direction=rng.choice(["both", "up", "down"]),
                          latency=latency)
        elif kind == "reset":
            if not pending and rng.random() < 0.15:
                target = "follower"
            fault = Fault(at, kind, target, 0.0)
        elif kind == "pause":
            fault = Fault(at, kind, target, rng.uniform(1.2, 2.5) * ttl)
        elif kind == "block":
            fault = Fault(at, kind, target, block_seconds(ttl))
        elif kind == "crash":
            fault = Fault(at, kind, target, rng.uniform(0.2, 2.0) * ttl)
        elif kind == "delete-key":
            roll = rng.random()
            target = "leader" if pending or roll < 0.5 else "waiter" if roll < 0.8 or not runners else "run-leader"
            if not delete_holders:
                target = "waiter"
            fault = Fault(at, kind, target, 0.0, whole_key=rng.random() < 0.5)
        elif kind == "inject":
            fault = Fault(at, kind, target, rng.uniform(1.0, 3.0) * ttl)
        elif kind == "fork":
            fault = Fault(at, kind, target, fork_seconds(ttl))
        elif kind == "resign":
            fault = Fault(at, kind, "leader", 0.0)
        elif kind in RUN_FAULTS:
            target = "run-leader" if pending or rng.random() < 0.8 else f"r{rng.randint(1, runners)}"
            fault = Fault(at, kind, target, 0.0)
        elif kind == "kill-node" and freeze and nodes < 3:
            fault = Fault(at, "freeze", "store", rng.uniform(0.5, 3.0) * ttl)
        elif kind == "kill-node":
            node_target = "store-leader" if rng.random() < 0.5 else f"node{rng.randint(1, nodes)}"
            fault = Fault(at, kind, node_target, rng.uniform(0.5, 3.0) * ttl)
        else:  # outage
            fault = Fault(at, kind, "store", rng.uniform(0.5, 2.0) * ttl)
        if kind in STORE_FAULTS:  # restarting takes a few seconds; then let the cluster settle
            store_free_at = at + fault.duration + STORE_RESTART + 2 * ttl
        schedule.append(fault)
        if kind not in INSTANT:
            active.append(at + fault.duration)


def fork_seconds(ttl: float) -> float:
    """How long a forked child lives, checking that it does not lead: past a renew deadline."""
    return 1.5 * ttl


def block_seconds(ttl: float) -> float:
    """How long a ``block`` fault blocks a hub: longer than the TTL."""
    return 1.5 * ttl


@dataclass
class Injected:
    index: int
    fault: Fault
    target: str  # what it hit
    started: float
    healed: float | None = None
    skipped: str = ""
    detail: str = ""  # how it was done, when that varies (deletions)

    @property
    def label(self) -> str:
        return f"#{self.index} {self.fault.kind} {self.target}"


@dataclass
class Runs:
    """What the ``greenleader run`` processes (runners) did, from the commands' witness log."""

    runners: int = 0
    commands: int = 0  # commands started
    overlaps: list[dict[str, Any]] = field(default_factory=list)  # a command started while another tree lived
    exits: collections.Counter[int] = field(default_factory=collections.Counter)  # runner exit statuses
    outlived: bool = False  # a command tree still lived after every runner had exited

    @property
    def ok(self) -> bool:
        return not self.overlaps and not self.outlived

    def summary(self) -> str:
        if not self.runners:
            return "  greenleader run: none"
        exits = ", ".join(f"{_status(code)} x{n}" for code, n in sorted(self.exits.items()))
        return (f"  greenleader run ({self.runners} runners on a key of their own): {self.commands} commands started; "
                f"runner exits: {exits or 'none'}; commands alive at once: {len(self.overlaps)}; "
                f"a command tree outlived its runner at the end: {self.outlived}")


def _status(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


@dataclass
class Result:
    backend: str
    seed: int
    duration: float
    ttl: float
    schedule: list[Fault]
    injected: list[Injected]
    verdict: Verdict
    recovery: float | None  # seconds from the last heal to a leader (None: no leader came)
    follower_ok: bool
    elapsed: float
    workdir: Path
    errors: list[str] = field(default_factory=list)
    runs: Runs = field(default_factory=Runs)
    #: exception class -> how many calls the candidates' stores failed with it (``inject``)
    injected_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    #: candidate processes that ended on their own (an injected error ended the campaign)
    exits: list[str] = field(default_factory=list)
    options: str = ""  # the command-line options beyond backend, duration and seed

    @property
    def ok(self) -> bool:
        return (self.verdict.ok and self.runs.ok and self.follower_ok and self.recovery is not None
                and not self.errors)

    def replay(self) -> str:
        return (f"python -m tests.nemesis --backend {self.backend} --duration {self.duration:g} "
                f"--seed {self.seed} --ttl {self.ttl:g}{self.options}")

    def active_at(self, instant: float) -> bool:
        """True if a fault was still acting at ``instant`` (one healing exactly then is not)."""
        return any(i.started < instant < (i.healed or i.started) for i in self.injected if not i.skipped)

    def done(self) -> list[Injected]:
        return [i for i in self.injected if not i.skipped]

    def summary(self) -> str:
        done = self.done()
        kinds = collections.Counter(i.fault.kind for i in done)
        deletions = collections.Counter(i.detail for i in done if i.fault.kind == "delete-key")
        verdict = self.verdict
        gaps = [(label, gap) for label, _, gap in verdict.gaps if gap != 0.0]
        longest = max(gaps, key=lambda pair: pair[1] if pair[1] is not None else float("inf"), default=None)
        quiet = [gap for _, healed, gap in verdict.gaps if gap is not None and not self.active_at(healed)]
        lines = [
            f"nemesis {self.backend}: seed {self.seed}, {self.duration:g}s of faults, ttl {self.ttl:g}s, "
            f"{self.elapsed:.0f}s in all",
            f"  faults injected: {len(done)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
            f"skipped {len(self.injected) - len(done)}",
            f"  deletions from outside: {', '.join(f'{k} {n}' for k, n in sorted(deletions.items())) or 'none'}",
            f"  store calls failed by injection: {sum(self.injected_errors.values())} "
            f"({', '.join(f'{k} {n}' for k, n in sorted(self.injected_errors.items()))}); "
            f"campaigns they ended (process restarted): {len(self.exits)}",
            f"  forked children: {verdict.forks}; told they lead: {len(verdict.fork_leads)}; "
            f"renewed, released or won: {len(verdict.fork_violations)}",
            f"  leadership changes: {verdict.leadership_changes} tenures",
            f"  overlaps: {len(verdict.overlaps)}; term errors: {len(verdict.term_errors)}; "
            f"duty told it leads outside its tenure: {len(verdict.stray_observations)}; "
            f"releases sent while still leading: {len(verdict.early_releases)}",
            self.runs.summary(),
            "  longest leaderless gap after a heal: "
            + (f"{longest[1]:.2f}s (after {longest[0]})" if longest and longest[1] is not None
               else "none" if not longest else f"NO LEADER after {longest[0]}"),
            f"  longest leaderless gap after a heal that left no fault active: {max(quiet, default=0.0):.2f}s "
            f"({len(quiet)} such heals)",
            "  leader back after the last heal: "
            + (f"{self.recovery:.2f}s" if self.recovery is not None else "NEVER")
            + f"; the follower named it: {self.follower_ok}",
        ]
        lines += [f"  ERROR: {error}" for error in self.errors]
        if not verdict.ok:
            lines.append(verdict.problems())
        lines += [f"  two commands alive at once: {overlap}" for overlap in self.runs.overlaps[:10]]
        lines.append(f"  replay: {self.replay()}")
        return "\n".join(lines)


class _Direct:
    """What stands for :class:`tests.faults.ClientProxies` where there is no network (the
    file store): every client uses the store's own URL."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, client: str) -> str:
        return self._url

    def of(self, client: str) -> list[Any]:
        return []

    def heal_all(self) -> None:
        pass

    def close(self) -> None:
        pass


class Runner:
    """A ``greenleader run`` slot: the process of its current generation, restarted by
    :meth:`Nemesis.supervise_runner` whenever it exits (as systemd's ``Restart=always``)."""

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self.name = slot
        self.generation = 0
        self.popen: Any = None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Nemesis:
    """One run: a cluster, the processes, the schedule, the verdict."""

    def __init__(self, backend: str, seed: int, duration: float, workdir: Path, *, ttl: float | None = None,
                 candidates: int = 5, nodes: int = 3, runners: int = 3, weights: dict[str, float] | None = None,
                 spacing: tuple[float, float] = SPACING, inject_rate: float = INJECT_RATE, delete_holders: bool = True,
                 options: str = "", say: Callable[[str], None] = print) -> None:
        if backend not in ALL_BACKENDS:
            raise ValueError(f"backend must be one of {ALL_BACKENDS}")
        self.backend = backend
        self.seed = seed
        self.duration = duration
        self.workdir = Path(workdir)
        self.ttl = ttl or DEFAULT_TTL[backend]
        self.candidates = candidates
        self.nodes = 0 if backend == "file" else 1 if backend in SINGLE_SERVER else nodes
        self.inject_rate = inject_rate
        self.delete_holders = delete_holders
        self.options = options
        self.say = say
        self.schedule = make_schedule(seed, duration, self.ttl, candidates, self.nodes, runners=runners,
                                      weights=weights, spacing=spacing, delete_holders=delete_holders,
                                      freeze=backend in SINGLE_SERVER)
        self.rng = random.Random(f"{seed}-targets")
        self.key = f"nemesis/{seed}"
        self.run_key = f"nemesis/{seed}-run"  # not under the candidates' key: etcd ranges would nest
        self.cluster: Any = None
        self.proxies: faults.ClientProxies | _Direct | None = None
        self.group: ProcessGroup | None = None
        self.slots: dict[str, ElectionProcess] = {}  # "c1".. -> its current process
        self.runners = {f"r{i}": Runner(f"r{i}") for i in range(1, runners + 1)}
        self.runs = Runs(runners=runners)
        self.generation: collections.Counter[str] = collections.Counter()
        #: (slot, category) a fault is acting on (see CATEGORY; "network" otherwise), and
        #: ("store", "store"): a slot takes at most one fault of each category at once
        self.busy: set[tuple[str, str]] = set()
        self.injected: list[Injected] = []
        self.errors: list[str] = []
        self.exits: list[str] = []
        self.stopping = False
        self.t0 = 0.0

    # -- setup ---------------------------------------------------------------------------

    def history_path(self, name: str) -> Path:
        return self.workdir / "history" / f"{name}.jsonl"

    @property
    def witness_log(self) -> Path:
        return self.workdir / "history" / "commands.jsonl"

    def start_candidate(self, slot: str) -> ElectionProcess:
        assert self.group is not None and self.proxies is not None
        self.generation[slot] += 1
        name = slot if self.generation[slot] == 1 else f"{slot}.{self.generation[slot]}"
        proc = self.group.start(name, retry=RETRY, url=self.proxies.url(slot), extra_args=[
            "--history", str(self.history_path(name)), "--block-hub", str(block_seconds(self.ttl)),
            "--inject-rate", str(self.inject_rate), "--fork-for", str(fork_seconds(self.ttl))])
        self.slots[slot] = proc
        gevent.spawn(self.supervise_candidate, slot, proc)
        return proc

    def supervise_candidate(self, slot: str, proc: ElectionProcess) -> None:
        """Restart a candidate process that ended on its own (an injected error that ends a
        campaign, as a real bug would), as a service manager would."""
        code = proc.popen.wait()
        if self.stopping or proc.killed_at is not None or self.slots.get(slot) is not proc:
            return
        fatal = [line.extra.get("error") for line in proc.events("error") if line.extra.get("fatal")]
        self.exits.append(f"{proc.name} exit {code}: {fatal[-1] if fatal else 'no error line'}")
        self.say(f"  {time.monotonic() - self.t0:7.2f}s {proc.name} exited ({code}) on its own: "
                 f"{fatal[-1] if fatal else '?'}; restarting it")
        gevent.sleep(self.rng.uniform(*RESTART_DELAY))
        if not self.stopping and self.slots.get(slot) is proc:
            self.start_candidate(slot)

    def start_runner(self, runner: Runner) -> None:
        assert self.proxies is not None
        runner.generation += 1
        runner.name = runner.slot if runner.generation == 1 else f"{runner.slot}.{runner.generation}"
        argv = [sys.executable, "-m", "greenleader", "-v", "run", "--store", self.proxies.url(runner.slot),
                "--key", self.run_key, "--ttl", str(self.ttl), "--node", runner.name, "--retry", "--grace", "2",
                "--", sys.executable, "-m", "tests.run_witness", "--witness", str(self.workdir / "witness.lock"),
                "--log", str(self.witness_log), "--node", runner.name]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        with open(self.workdir / "procs" / f"{runner.slot}.stderr", "ab") as output:
            runner.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=output, preexec_fn=_die_with_parent)

    def supervise_runner(self, runner: Runner) -> None:
        """Run ``greenleader run`` in this slot until the end, restarting it whenever it exits."""
        while not self.stopping:
            self.start_runner(runner)
            code = runner.popen.wait()
            self.runs.exits[code] += 1
            if not self.stopping:
                gevent.sleep(self.rng.uniform(*RESTART_DELAY))

    def witness_records(self) -> list[dict[str, Any]]:
        try:
            text = self.witness_log.read_text()
        except FileNotFoundError:
            return []
        records = []
        for raw in text.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(raw))
        return records

    def stop_runners(self) -> None:
        """SIGTERM every runner (the command ends first, then the key is released); then the
        witness lock must come free: no process of any command's tree may be left."""
        for runner in self.runners.values():
            if runner.running():
                runner.popen.send_signal(signal.SIGTERM)
        for runner in self.runners.values():
            if runner.popen is None:
                continue
            try:
                runner.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.errors.append(f"runner {runner.name} did not exit within 20s of SIGTERM")
                runner.popen.kill()
                runner.popen.wait()
        deadline = time.monotonic() + 10
        with open(self.workdir / "witness.lock", "a+b") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self.runs.outlived = True
                        self.errors.append("a command's process tree outlived every greenleader run (the witness "
                                           "lock was still held 10s after they had all exited)")
                        break
                    gevent.sleep(0.1)

    # -- targets -------------------------------------------------------------------------

    def leader_slot(self) -> str | None:
        """The slot whose process last printed ``elected`` without a later ``deposed``."""
        for slot, proc in self.slots.items():
            events = proc.events("elected", "deposed")
            if events and events[-1].event == "elected" and proc.running():
                return slot
        return None

    def runner_leader(self) -> str | None:
        """The runner slot whose command started last, if that runner still runs."""
        starts = [r for r in self.witness_records() if r.get("ev") == "start"]
        if not starts:
            return None
        name = starts[-1]["node"]
        return next((r.slot for r in self.runners.values() if r.name == name and r.running()), None)

    def resolve(self, fault: Fault) -> str | None:
        """The slot a fault hits now, or None if every possible target is busy."""
        category = CATEGORY.get(fault.kind, "network")
        if fault.target == "follower":
            return None if ("follower", category) in self.busy else "follower"
        if fault.kind in RUN_FAULTS or fault.target in ("run-leader", *self.runners):
            free = [slot for slot, runner in self.runners.items()
                    if (slot, category) not in self.busy and runner.running()]
            wanted = self.runner_leader() if fault.target == "run-leader" else fault.target
        else:
            free = [slot for slot in self.slots if (slot, category) not in self.busy and self.slots[slot].running()
                    # a signal that arrives before the process installed its handler (it has once it
                    # campaigns) would kill it
                    and (fault.kind not in SIGNALLED or self.slots[slot].events("campaigning"))]
            leader = self.leader_slot()
            if fault.target == "waiter":
                free = [slot for slot in free if slot != leader]
                wanted = None
            else:
                wanted = leader if fault.target == "leader" else fault.target
        if wanted in free:
            return wanted
        return self.rng.choice(free) if free else None

    # -- faults --------------------------------------------------------------------------

    def run_fault(self, index: int, fault: Fault) -> None:
        gevent.sleep(max(0.0, self.t0 + fault.at - time.monotonic()))
        if fault.kind in STORE_FAULTS:
            self.store_fault(index, fault)
            return
        slot = self.resolve(fault)
        record = Injected(index, fault, slot or "-", time.monotonic())
        self.injected.append(record)
        if slot is None:
            record.skipped = "no free target"
            self.say(f"  {record.started - self.t0:7.2f}s skip   #{index} {fault.what()} (no free target)")
            return
        busy = (slot, CATEGORY.get(fault.kind, "network"))
        self.busy.add(busy)
        try:
            self.say(f"  {record.started - self.t0:7.2f}s inject #{index} {fault.what()} -> {slot}")
            record.skipped = self.client_fault(slot, fault, record)
            if record.skipped:
                self.say(f"  {time.monotonic() - self.t0:7.2f}s skip   #{index} {fault.kind} {slot} ({record.skipped})")
                return
            record.healed = time.monotonic()
            self.say(f"  {record.healed - self.t0:7.2f}s healed #{index} {fault.kind} {slot}"
                     + (f": {record.detail}" if record.detail else ""))
        finally:
            self.busy.discard(busy)

    def _signal(self, pid: int, signum: int) -> bool:
        """Send a signal; False if the process is gone already (it ended, or was restarted)."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def client_fault(self, slot: str, fault: Fault, record: Injected) -> str:
        """Inject ``fault`` on ``slot``; return why it was skipped, or ""."""
        assert self.proxies is not None
        proxies = self.proxies.of(slot)
        proc = self.slots.get(slot)
        pid = proc.popen.pid if proc is not None else 0
        if fault.kind == "partition":
            for proxy in proxies:
                proxy.partition(fault.direction)
            gevent.sleep(fault.duration)
            for proxy in proxies:
                proxy.heal(reset=fault.reset_on_heal)
        elif fault.kind == "partition-node":
            proxies[fault.node].partition()
            gevent.sleep(fault.duration)
            proxies[fault.node].heal()
        elif fault.kind == "delay":
            for proxy in proxies:
                proxy.delay(fault.latency, fault.direction)
            gevent.sleep(fault.duration)
            for proxy in proxies:
                proxy.heal()
        elif fault.kind == "reset":
            for proxy in proxies:
                proxy.reset()
        elif fault.kind == "pause":
            if not self._signal(pid, signal.SIGSTOP):
                return "the process is gone"
            try:
                gevent.sleep(fault.duration)
            finally:
                self._signal(pid, signal.SIGCONT)
        elif fault.kind == "block":
            if not self._signal(pid, faults.BLOCK_HUB_SIGNAL):
                return "the process is gone"
            gevent.sleep(fault.duration)
        elif fault.kind == "crash":
            assert proc is not None
            proc.freeze_and_kill()
            gevent.sleep(fault.duration)
            self.start_candidate(slot)
        elif fault.kind == "fork":
            if not self._signal(pid, FORK_SIGNAL):
                return "the process is gone"
            gevent.sleep(fault.duration)
        elif fault.kind == "inject":
            if not self._signal(pid, INJECT_ON_SIGNAL):
                return "the process is gone"
            try:
                gevent.sleep(fault.duration)
            finally:
                self._signal(pid, INJECT_OFF_SIGNAL)
        elif fault.kind == "resign":  # to every candidate: whoever leads by now resigns, the others
            # ignore it (the nemesis learns of a new leader from its output, a moment late)
            sent = [other.name for other in self.slots.values()
                    if other.running() and other.events("campaigning") and self._signal(other.popen.pid, RESIGN_SIGNAL)]
            if not sent:
                return "no candidate to resign"
        elif fault.kind in RUN_FAULTS:
            runner = self.runners[slot]
            if not self._signal(runner.popen.pid, RUN_FAULTS[fault.kind]):
                return "the runner is gone"
            record.detail = runner.name
        elif fault.kind == "delete-key":
            return self.delete_key(slot, fault, record)
        else:
            raise ValueError(f"unknown fault {fault.kind}")
        return ""

    def cut_off(self, slot: str) -> bool:
        """Whether ``slot`` cannot hear from the store now: a network or process fault acts on it."""
        return (slot, "network") in self.busy or (slot, "process") in self.busy

    def delete_key(self, slot: str, fault: Fault, record: Injected) -> str:
        """Delete ``slot``'s registration from outside, through a live store node."""
        runner = self.runners.get(slot)
        key, name = (self.run_key, runner.name) if runner else (self.key, self.slots[slot].name)
        places = ([(str(self.workdir / "elections"), "the directory")] if self.cluster is None
                  else [([node.client_addr], node.name) for node in self.cluster.running()])
        for where, through in places:
            try:
                queue = faults.registrations(self.backend, where, key)
                position = next((i for i, (node_name, _, _) in enumerate(queue) if node_name == name), None)
                if position is None:
                    return f"{name} has no registration now"
                holder = queue[position][2]
                if holder and not self.delete_holders:
                    return f"{name} leads now (--no-holder-deletion)"
                if holder and self.backend in CUT_OFF_DELETION_UNGUARDED and self.cut_off(slot):
                    return f"{name} leads cut off from the store (a deletion it cannot hear: a documented limit)"
                # a waiter is deleted only while its predecessor lives (etcd, ZooKeeper: in one
                # transaction), never just as it becomes the holder
                behind = None if holder or self.backend not in ("etcd", "zookeeper") else queue[position - 1][1]
                how = faults.delete_registration(self.backend, where, key, queue[position][1],
                                                 whole_key=fault.whole_key and holder, behind=behind)
            except LookupError as exc:
                return f"{name} {exc}"
            except (Exception, gevent.Timeout) as exc:  # that node is down or refuses (OSError; kazoo's
                # connection time-out is a gevent.Timeout, not an Exception): try another
                log.info("deleting %s's registration through %s failed: %s", name, through, exc)
                continue
            record.detail = f"{how} ({'holder' if holder else 'waiter'})"
            return ""
        return "no store node answered"

    def store_fault(self, index: int, fault: Fault) -> None:
        cluster = self.cluster
        record = Injected(index, fault, fault.target, time.monotonic())
        self.injected.append(record)
        if ("store", "store") in self.busy:  # the previous store fault is still restarting nodes
            record.skipped = "the store is still restarting"
            self.say(f"  {record.started - self.t0:7.2f}s skip   #{index} {fault.what()} ({record.skipped})")
            return
        self.busy.add(("store", "store"))
        try:
            if fault.kind == "outage":
                self.say(f"  {record.started - self.t0:7.2f}s inject #{index} {fault.what()}")
                faults.kill_cluster(cluster)
                gevent.sleep(fault.duration)
                faults.restart_cluster(cluster, timeout=90)
            elif fault.kind == "freeze":
                self.say(f"  {record.started - self.t0:7.2f}s inject #{index} {fault.what()}")
                cluster.pause()
                try:
                    gevent.sleep(fault.duration)
                finally:
                    cluster.resume()
            else:
                node = None
                if fault.target == "store-leader":
                    try:
                        node = cluster.leader_node()
                    except RuntimeError:
                        node = None
                if node is None:
                    number = int(fault.target[4:]) if fault.target.startswith("node") else 1
                    node = cluster.nodes[number - 1]
                record.target = node.name
                self.say(f"  {record.started - self.t0:7.2f}s inject #{index} {fault.what()} -> {node.name}")
                faults.kill_node(node)
                gevent.sleep(fault.duration)
                faults.restart_node(node, timeout=90)
            record.healed = time.monotonic()
            self.say(f"  {record.healed - self.t0:7.2f}s healed #{index} {fault.kind} {record.target}")
        except RuntimeError as exc:
            self.errors.append(f"{record.label}: the store did not come back: {exc}")
            raise
        finally:
            self.busy.discard(("store", "store"))

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        self.say(f"nemesis {self.backend}: seed {self.seed}, {self.duration:g}s, ttl {self.ttl:g}s, "
                 f"{self.candidates} candidates, {len(self.runners)} runners, {self.nodes} store nodes; schedule:")
        for index, fault in enumerate(self.schedule):
            self.say(f"  #{index:<3} {fault}")
        (self.workdir / "history").mkdir(parents=True, exist_ok=True)
        (self.workdir / "procs").mkdir(parents=True, exist_ok=True)
        if self.backend == "file":
            url = f"file://{self.workdir / 'elections'}?poll_interval=0.01"
        else:
            self.cluster = servers.start(self.backend, self.workdir / "server", self.nodes)
            url = self.cluster.url
        recovery: float | None = None
        follower_ok = False
        supervisors: list[gevent.Greenlet] = []
        try:
            self.proxies = (_Direct(url) if self.cluster is None
                            else faults.ClientProxies(self.backend, self.cluster.addrs,
                                                      CLIENT_QUERY.get(self.backend, "")))
            with ProcessGroup(url, self.key, self.ttl, self.workdir / "procs") as group:
                self.group = group
                follower = group.start("follower", follower=True, retry=RETRY, url=self.proxies.url("follower"))
                for number in range(1, self.candidates + 1):
                    self.start_candidate(f"c{number}")
                supervisors = [gevent.spawn(self.supervise_runner, runner) for runner in self.runners.values()]
                group.wait_elected(STARTUP)
                if self.runners:
                    group.wait_for("a greenleader run command to start", self.runner_leader, STARTUP)
                self.t0 = time.monotonic()
                self.say(f"  first leader elected; faults start (t0 = {self.t0:.3f})")
                workers = [gevent.spawn(self.run_fault, i, fault) for i, fault in enumerate(self.schedule)]
                longest = max((f.at + f.duration for f in self.schedule), default=0.0)
                limit = longest + 300.0  # restarts of store nodes on a loaded machine
                gevent.joinall(workers, timeout=max(0.0, self.t0 + limit - time.monotonic()))
                for worker in workers:
                    if not worker.dead:
                        self.errors.append(f"a fault did not finish within {limit:g}s")
                        worker.kill()
                    elif worker.exception is not None and not isinstance(worker.exception, RuntimeError):
                        self.errors.append(f"a fault failed: {worker.exception!r}")
                healed = max([i.healed or i.started for i in self.injected] + [self.t0])
                follower_ok = self.recover(group, follower)
                self.stopping = True
                self.stop_runners()
                gevent.joinall(supervisors, timeout=30)
                running = [proc for proc in group.procs.values() if proc.running()]
                group.close()
                for proc in running:
                    if proc.popen.returncode == -signal.SIGKILL:
                        self.errors.append(f"{proc.name} did not stop within 15s of SIGTERM (stop() hung)")
                ended = time.monotonic()
            verdict = self.judge(healed, ended)
            recovery = next(gap for label, _, gap in verdict.gaps if label == LAST_HEAL)
            self.judge_runs()
            injected_errors = collections.Counter(line.extra.get("error", "?") for line in group.lines("injected"))
        finally:
            self.stopping = True
            for greenlet in supervisors:
                greenlet.kill()
            for runner in self.runners.values():
                if runner.running():
                    runner.popen.kill()
            if self.proxies is not None:
                self.proxies.close()
            if self.cluster is not None:
                self.cluster.stop()
        result = Result(self.backend, self.seed, self.duration, self.ttl, self.schedule, self.injected, verdict,
                        recovery, follower_ok, time.monotonic() - started, self.workdir, self.errors, self.runs,
                        injected_errors, self.exits, self.options)
        self.say(result.summary())
        return result

    def recover(self, group: ProcessGroup, follower: ElectionProcess) -> bool:
        """Heal everything; wait until a candidate leads, the follower names it, and a
        ``greenleader run`` command runs."""
        assert self.proxies is not None
        self.proxies.heal_all()
        bound = recovery_bound(self.backend, self.ttl)

        def settled() -> bool:
            slot = self.leader_slot()
            lines = follower.events("leader")
            return (slot is not None and bool(lines) and lines[-1].node == self.slots[slot].name
                    and (not self.runners or self.runner_leader() is not None))

        try:
            group.wait_for("a leader that the follower names, and a running command", settled, bound)
        except AssertionError:
            slot = self.leader_slot()
            lines = follower.events("leader")
            self.errors.append(f"{bound:g}s after the last heal: leader {self.slots[slot].name if slot else None}, "
                               f"the follower names {lines[-1].node if lines else None}, "
                               f"command of runner {self.runner_leader()}")
            return False
        return True

    def judge(self, healed: float, until: float) -> Verdict:
        paths = sorted(p for p in (self.workdir / "history").glob("*.jsonl") if p != self.witness_log)
        heals = [(i.label, i.healed) for i in self.injected if i.healed is not None]
        frozen = {proc.name: proc.frozen_at for proc in self.group.procs.values() if proc.frozen_at is not None}
        return check(load(paths, frozen), [*heals, (LAST_HEAL, healed)], until=until)

    def judge_runs(self) -> None:
        records = self.witness_records()
        self.runs.commands = sum(1 for r in records if r.get("ev") == "start")
        self.runs.overlaps = [r for r in records if r.get("ev") == "overlap"]


def run(backend: str, seed: int, duration: float, workdir: Path, **options: Any) -> Result:
    return Nemesis(backend, seed, duration, workdir, **options).run()


def _weights(text: str) -> dict[str, float]:
    """``--weights resign=10,crash=0``: the profile's weights, some replaced."""
    weights: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        kind, _, value = item.partition("=")
        if kind not in WEIGHTS:
            raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r} (kinds: {', '.join(WEIGHTS)})")
        weights[kind] = float(value)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=[*ALL_BACKENDS, "all"], default="all",
                        help="all: the server stores, one after the other")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which faults start")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    parser.add_argument("--ttl", type=float, default=None, help="candidate TTL (default: per backend)")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--runners", type=int, default=3, help="greenleader run processes on a key of their own")
    parser.add_argument("--profile", choices=list(PROFILES), default="mixed",
                        help="fault weights: mixed (every kind), resign-heavy (many leadership changes)")
    parser.add_argument("--weights", type=_weights, default={}, metavar="KIND=W,...",
                        help="override some weights of the profile (0 leaves a kind out)")
    parser.add_argument("--spacing", type=float, nargs=2, default=SPACING, metavar=("MIN", "MAX"),
                        help=f"seconds between fault starts, in TTLs (default {SPACING[0]:g} {SPACING[1]:g})")
    parser.add_argument("--inject-rate", type=float, default=INJECT_RATE,
                        help="probability that a store call fails while an inject fault is on")
    parser.add_argument("--no-holder-deletion", dest="delete_holders", action="store_false",
                        help="delete-key hits waiters only (deleting the leader's registration from outside "
                             "gives two leaders on the server stores: docs/safety.md)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp dir, "
                        "removed if the run passes)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    weights = {**PROFILES[args.profile], **args.weights}
    options = "".join([
        f" --candidates {args.candidates}" if args.candidates != 5 else "",
        f" --runners {args.runners}" if args.runners != 3 else "",
        f" --profile {args.profile}" if args.profile != "mixed" else "",
        f" --weights {','.join(f'{k}={v:g}' for k, v in args.weights.items())}" if args.weights else "",
        f" --spacing {args.spacing[0]:g} {args.spacing[1]:g}" if tuple(args.spacing) != SPACING else "",
        f" --inject-rate {args.inject_rate:g}" if args.inject_rate != INJECT_RATE else "",
        "" if args.delete_holders else " --no-holder-deletion",
    ])
    failed = False
    results = []
    for backend in backends:
        workdir = args.workdir / backend if args.workdir else Path(tempfile.mkdtemp(prefix=f"nemesis-{backend}-"))
        result = run(backend, seed, args.duration, workdir, ttl=args.ttl, candidates=args.candidates,
                     runners=args.runners, weights=weights, spacing=tuple(args.spacing), inject_rate=args.inject_rate,
                     delete_holders=args.delete_holders, options=options, say=lambda text: print(text, flush=True))
        results.append(result)
        if result.ok and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not result.ok:
            print(f"  histories and logs kept in {workdir}", flush=True)
            failed = True
    if len(results) > 1:
        print("\n".join(r.summary() for r in results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
