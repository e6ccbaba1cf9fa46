"""Nemesis runs: candidate processes on a real 3-node store cluster under a seeded random
schedule of faults, judged by the split-brain checker of :mod:`tests.history`.

    python -m tests.nemesis --backend etcd --duration 600 --seed 7

Five candidate processes (``retry`` on, as a service that must outlive outages runs them) and
one follower campaign on one key. Each talks to every store node through proxies of its own
(:class:`tests.faults.ClientProxies`), so a network fault can hit one client. The schedule is
drawn from the seed before the run and printed; faults start in ``[0, duration)``, at most two
at a time (at most one of them on the store), each lasting a few TTLs:

- ``partition``: a client's connections to every node go silent (both ways, or one way),
  for 0.5-2.5 TTL; a third of the heals also reset the held connections;
- ``partition-node``: a client is cut off from one node only;
- ``delay``: a client's traffic is delayed (small or large latency) for 1-3 TTL;
- ``reset``: every connection of a client is reset;
- ``pause``: SIGSTOP a candidate process for 1.2-2.5 TTL (longer than the TTL), then SIGCONT;
- ``block``: a candidate runs CPU-bound code that blocks its gevent hub for 1.5 TTL;
- ``crash``: SIGKILL a candidate process, start a new one 0.2-2 TTL later;
- ``kill-node``: SIGKILL one store node (its Raft/Zab leader half of the time), restart it;
- ``outage``: SIGKILL every store node, restart them 0.5-2 TTL later.

Most client faults target whoever leads when the fault starts (targets are named when the
schedule runs, so a replay with the same seed injects the same faults at the same times,
though the processes they hit may differ if the leadership went differently).

After the last fault heals the run waits for a leader and for the follower to name it, stops
every process gracefully and checks the histories: no two tenures may overlap, terms must
increase, and a duty must never be told it leads outside its tenure. It reports the faults,
leadership changes, and the time without a leader after each heal.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

from tests import faults, servers
from tests.candidate_process import ElectionProcess, ProcessGroup
from tests.history import Verdict, check, load

log = logging.getLogger(__name__)

BACKENDS = ("consul", "etcd", "zookeeper")
#: TTL per backend: Consul's minimum; 2 s elsewhere (many renewals per TTL on a loaded machine).
DEFAULT_TTL = {"consul": 10.0, "etcd": 2.0, "zookeeper": 2.0}
#: First retry delay of the candidates' and follower's Backoff (up to 4 times as much).
RETRY = 0.25
STARTUP = 60.0  # seconds for the processes to start and elect a first leader
#: kind -> weight in the random schedule
WEIGHTS = {
    "partition": 3, "partition-node": 1, "delay": 2, "reset": 2, "pause": 2, "block": 2,
    "crash": 2, "kill-node": 2, "outage": 1,
}
STORE_FAULTS = ("kill-node", "outage")
LAST_HEAL = "all healed"
STORE_RESTART = 5.0  # seconds a store node or cluster may take to restart (JVMs on a busy machine)
PROCESS_FAULTS = ("pause", "block", "crash")


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
    target: str  # "leader", a candidate slot "c3", "follower", "node2", "store-leader", "store"
    duration: float
    direction: str = "both"  # partitions and delays
    latency: float = 0.0  # delays
    reset_on_heal: bool = False  # partitions
    node: int = 0  # partition-node

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
        return f"{self.kind:<14} {self.target:<12} for {self.duration:5.2f}s{extra}"


def make_schedule(seed: int, duration: float, ttl: float, candidates: int = 5, nodes: int = 3) -> list[Fault]:
    """A random schedule of faults starting in ``[0, duration)``, drawn from ``seed`` alone.

    The first faults are one of each kind in a random order, aimed at the leader, so that
    even a short run tries them all; the rest are drawn by WEIGHTS.
    """
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    first_round = rng.sample(kinds, len(kinds))
    schedule: list[Fault] = []
    active: list[float] = []  # end times of the faults running at ``at``
    store_free_at = 0.0
    at = 0.0
    while True:
        at += rng.uniform(0.3, 1.0) * ttl
        active = [end for end in active if end > at]
        if len(active) >= 2:
            at = min(active)
            active = [end for end in active if end > at]
        if at >= duration:
            return schedule
        store_ok = at >= store_free_at
        pending = [kind for kind in first_round if store_ok or kind not in STORE_FAULTS]
        if pending:
            kind = pending[0]
            first_round.remove(kind)
        else:
            kind = rng.choices(kinds, weights)[0]
        if kind in STORE_FAULTS and (not store_ok or (nodes < 3 and kind == "kill-node")):
            kind = "partition"
        target = "leader" if pending or rng.random() < 0.7 else f"c{rng.randint(1, candidates)}"
        fault: Fault
        if kind == "partition":
            if not pending and rng.random() < 0.15:
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
        elif kind == "kill-node":
            node_target = "store-leader" if rng.random() < 0.5 else f"node{rng.randint(1, nodes)}"
            fault = Fault(at, kind, node_target, rng.uniform(0.5, 3.0) * ttl)
        else:  # outage
            fault = Fault(at, kind, "store", rng.uniform(0.5, 2.0) * ttl)
        if kind in STORE_FAULTS:  # restarting takes a few seconds; then let the cluster settle
            store_free_at = at + fault.duration + STORE_RESTART + 2 * ttl
        schedule.append(fault)
        active.append(at + fault.duration)


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

    @property
    def label(self) -> str:
        return f"#{self.index} {self.fault.kind} {self.target}"


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

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.follower_ok and self.recovery is not None and not self.errors

    def replay(self) -> str:
        return (f"python -m tests.nemesis --backend {self.backend} --duration {self.duration:g} "
                f"--seed {self.seed} --ttl {self.ttl:g}")

    def active_at(self, instant: float) -> bool:
        """True if a fault was still acting at ``instant`` (one healing exactly then is not)."""
        return any(i.started < instant < (i.healed or i.started) for i in self.injected if not i.skipped)

    def summary(self) -> str:
        done = [i for i in self.injected if not i.skipped]
        kinds = collections.Counter(i.fault.kind for i in done)
        verdict = self.verdict
        gaps = [(label, gap) for label, _, gap in verdict.gaps if gap != 0.0]
        longest = max(gaps, key=lambda pair: pair[1] if pair[1] is not None else float("inf"), default=None)
        quiet = [gap for _, healed, gap in verdict.gaps if gap is not None and not self.active_at(healed)]
        lines = [
            f"nemesis {self.backend}: seed {self.seed}, {self.duration:g}s of faults, ttl {self.ttl:g}s, "
            f"{self.elapsed:.0f}s in all",
            f"  faults injected: {len(done)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
            f"skipped {len(self.injected) - len(done)}",
            f"  leadership changes: {verdict.leadership_changes} tenures",
            f"  overlaps: {len(verdict.overlaps)}; term errors: {len(verdict.term_errors)}; "
            f"duty told it leads outside its tenure: {len(verdict.stray_observations)}",
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
        lines.append(f"  replay: {self.replay()}")
        return "\n".join(lines)


class Nemesis:
    """One run: a cluster, the processes, the schedule, the verdict."""

    def __init__(self, backend: str, seed: int, duration: float, workdir: Path, *, ttl: float | None = None,
                 candidates: int = 5, nodes: int = 3, say: Callable[[str], None] = print) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        self.backend = backend
        self.seed = seed
        self.duration = duration
        self.workdir = Path(workdir)
        self.ttl = ttl or DEFAULT_TTL[backend]
        self.candidates = candidates
        self.nodes = nodes
        self.say = say
        self.schedule = make_schedule(seed, duration, self.ttl, candidates, nodes)
        self.rng = random.Random(f"{seed}-targets")
        self.cluster: Any = None
        self.proxies: faults.ClientProxies | None = None
        self.group: ProcessGroup | None = None
        self.slots: dict[str, ElectionProcess] = {}  # "c1".. -> its current process
        self.generation: collections.Counter[str] = collections.Counter()
        #: (slot, "process" | "network") a fault is acting on, and ("store", "store"): a slot may
        #: take a process fault and a network fault at once, never two of one kind
        self.busy: set[tuple[str, str]] = set()
        self.injected: list[Injected] = []
        self.errors: list[str] = []
        self.t0 = 0.0

    # -- setup ---------------------------------------------------------------------------

    def history_path(self, name: str) -> Path:
        return self.workdir / "history" / f"{name}.jsonl"

    def start_candidate(self, slot: str) -> ElectionProcess:
        assert self.group is not None and self.proxies is not None
        self.generation[slot] += 1
        name = slot if self.generation[slot] == 1 else f"{slot}.{self.generation[slot]}"
        proc = self.group.start(name, retry=RETRY, url=self.proxies.url(slot), extra_args=[
            "--history", str(self.history_path(name)), "--block-hub", str(block_seconds(self.ttl))])
        self.slots[slot] = proc
        return proc

    # -- targets -------------------------------------------------------------------------

    def leader_slot(self) -> str | None:
        """The slot whose process last printed ``elected`` without a later ``deposed``."""
        for slot, proc in self.slots.items():
            events = proc.events("elected", "deposed")
            if events and events[-1].event == "elected" and proc.running():
                return slot
        return None

    def resolve(self, fault: Fault) -> str | None:
        """The client slot a fault hits now, or None if every candidate is busy."""
        category = "process" if fault.kind in PROCESS_FAULTS else "network"
        if fault.target == "follower":
            return None if ("follower", category) in self.busy else "follower"
        wanted = self.leader_slot() if fault.target == "leader" else fault.target
        free = [slot for slot in self.slots if (slot, category) not in self.busy and self.slots[slot].running()
                # SIGUSR1 kills a process that has not installed its hub blocker yet (it does before campaigning)
                and (fault.kind != "block" or self.slots[slot].events("campaigning"))]
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
        busy = (slot, "process" if fault.kind in PROCESS_FAULTS else "network")
        self.busy.add(busy)
        try:
            self.say(f"  {record.started - self.t0:7.2f}s inject #{index} {fault.what()} -> {slot}")
            self.client_fault(slot, fault)
            record.healed = time.monotonic()
            self.say(f"  {record.healed - self.t0:7.2f}s healed #{index} {fault.kind} {slot}")
        finally:
            self.busy.discard(busy)

    def client_fault(self, slot: str, fault: Fault) -> None:
        assert self.proxies is not None
        proxies = self.proxies.of(slot)
        proc = self.slots.get(slot)
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
            assert proc is not None
            faults.pause(proc.popen.pid)
            try:
                gevent.sleep(fault.duration)
            finally:
                faults.resume(proc.popen.pid)
        elif fault.kind == "block":
            assert proc is not None
            faults.block_hub(proc.popen.pid)
            gevent.sleep(fault.duration)
        elif fault.kind == "crash":
            assert proc is not None
            proc.kill()
            gevent.sleep(fault.duration)
            self.start_candidate(slot)
        else:
            raise ValueError(f"unknown fault {fault.kind}")

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
                 f"{self.candidates} candidates, {self.nodes} store nodes; schedule:")
        for index, fault in enumerate(self.schedule):
            self.say(f"  #{index:<3} {fault}")
        (self.workdir / "history").mkdir(parents=True, exist_ok=True)
        self.cluster = servers.start(self.backend, self.workdir / "server", self.nodes)
        recovery: float | None = None
        follower_ok = False
        try:
            self.proxies = faults.ClientProxies(self.backend, self.cluster.addrs)
            with ProcessGroup(self.cluster.url, f"nemesis/{self.seed}", self.ttl, self.workdir / "procs") as group:
                self.group = group
                follower = group.start("follower", follower=True, retry=RETRY, url=self.proxies.url("follower"))
                for number in range(1, self.candidates + 1):
                    self.start_candidate(f"c{number}")
                group.wait_elected(STARTUP)
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
                group.close()
                ended = time.monotonic()
            verdict = self.judge(healed, ended)
            recovery = next(gap for label, _, gap in verdict.gaps if label == LAST_HEAL)
        finally:
            if self.proxies is not None:
                self.proxies.close()
            self.cluster.stop()
        result = Result(self.backend, self.seed, self.duration, self.ttl, self.schedule, self.injected, verdict,
                        recovery, follower_ok, time.monotonic() - started, self.workdir, self.errors)
        self.say(result.summary())
        return result

    def recover(self, group: ProcessGroup, follower: ElectionProcess) -> bool:
        """Heal everything; wait until a candidate leads and the follower names it."""
        assert self.proxies is not None
        self.proxies.heal_all()
        bound = recovery_bound(self.backend, self.ttl)

        def settled() -> bool:
            slot = self.leader_slot()
            lines = follower.events("leader")
            return slot is not None and bool(lines) and lines[-1].node == self.slots[slot].name

        try:
            group.wait_for("a leader that the follower names", settled, bound)
        except AssertionError:
            slot = self.leader_slot()
            lines = follower.events("leader")
            self.errors.append(f"{bound:g}s after the last heal: leader {self.slots[slot].name if slot else None}, "
                               f"the follower names {lines[-1].node if lines else None}")
            return False
        return True

    def judge(self, healed: float, until: float) -> Verdict:
        paths = sorted((self.workdir / "history").glob("*.jsonl"))
        heals = [(i.label, i.healed) for i in self.injected if i.healed is not None]
        return check(load(paths), [*heals, (LAST_HEAL, healed)], until=until)


def run(backend: str, seed: int, duration: float, workdir: Path, **options: Any) -> Result:
    return Nemesis(backend, seed, duration, workdir, **options).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which faults start")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    parser.add_argument("--ttl", type=float, default=None, help="candidate TTL (default: per backend)")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp dir, "
                        "removed if the run passes)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    failed = False
    results = []
    for backend in backends:
        workdir = args.workdir / backend if args.workdir else Path(tempfile.mkdtemp(prefix=f"nemesis-{backend}-"))
        result = run(backend, seed, args.duration, workdir, ttl=args.ttl, candidates=args.candidates,
                     say=lambda text: print(text, flush=True))
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
