"""Contention: many candidates in several processes on one key, handing over in turn.

Each worker process (benchmarks/worker.py) runs its share of the candidates on one key,
all through one counting proxy (benchmarks/proxy.py), with the library's retries on (store
errors are counted: a Consul agent closes the connections of one client address beyond its
``http_max_conns_per_client``, 200 by default, and every waiting candidate holds a long poll).
Once every candidate is registered in the store, an idle window measures the background
rate of requests (waiters keeping their sessions or leases alive). Then, repeatedly, the
leader is told to resign (it stands aside for the library's 0.5 s holdoff and campaigns
again, so the field keeps its size); the handover is from the leader's ``release`` to the
successor's ``acquire`` returning. The requests of a handover are those counted from the
resign until the field is complete again, keepalives left out (etcd lease keepalives, Consul
session renewals, ZooKeeper pings: periodic, counted under cost at rest, and in step across
candidates that started together, so no average rate could be subtracted), less the
background rate of the other requests (Consul's waiters renew their blocking queries). Goal: on
etcd and ZooKeeper they do not grow with the number of candidates (each waiter watches only
its predecessor). Consul keeps no queue: every waiter tries for the key on every change, so
there they grow.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import gevent

from tests import servers

from .common import (
    Config,
    Proc,
    Stores,
    ZooKeeperProbe,
    changes,
    consul_sessions,
    etcd_count,
    stop_all,
    summary,
)
from .proxy import CountingProxy

log = logging.getLogger(__name__)

#: Long, so that the waiters' keepalives (the background the handovers are measured against)
#: are rare: a TTL plays no part in a graceful handover.
TTL = 60.0
CONSUL_CONNECTIONS = 1000  # the contention agent's http_max_conns_per_client (Consul's default: 200)
SETTLE = 0.5  # seconds for the field to quiet down after it is complete again
STARTUP = 120.0


class _Field:
    """``processes`` workers of ``per_process`` candidates each, on one key."""

    def __init__(self, kind: str, stores: Stores, addr: str, processes: int, per_process: int, workdir: Path) -> None:
        self.kind = kind
        self.stores = stores
        self.addr = addr
        self.n = processes * per_process
        self.key = f"bench/contention-{uuid.uuid4().hex[:8]}"
        self.proxy = CountingProxy(kind, addr) if kind != "file" else None
        url = stores.url(kind, addr=self.proxy.addr) if self.proxy else stores.url(kind)
        self.zk = ZooKeeperProbe(addr) if kind == "zookeeper" else None
        self.procs: dict[str, Proc] = {}
        self.tag = uuid.uuid4().hex[:4]
        for i in range(processes):
            name = f"w{self.tag}{i}"
            argv = [sys.executable, "-m", "benchmarks.worker", "--url", url, "--name", name, "--ttl", f"{TTL:g}",
                    "--candidates", str(per_process), "--keys", self.key, "--same-key", "--retry"]
            self.procs[name] = Proc(argv, workdir, name, json_lines=True, stdin=True)

    def lines(self, event: str) -> list[tuple[float, str, str]]:
        """(t, process, node) of every ``event`` line, in order of time."""
        found = [(line.data["t"], name, line.data.get("node", "")) for name, proc in self.procs.items()
                 for line in proc.events(event)]
        return sorted(found)

    def registered(self) -> int:
        try:
            return self._registered()
        except OSError as exc:  # Consul closes connections beyond its per-client limit (see docs)
            log.info("probe failed: %s", exc)
            return 0

    def _registered(self) -> int:
        if self.kind == "consul":
            # A process's candidates share one session (named after the candidate that made it),
            # and a waiter leaves no other trace in Consul: the field is complete once every
            # process has its session and every candidate is in acquire (as on the file store).
            # Distinct processes: a session whose destroy failed lingers.
            with_session = {str(s.get("Name")).removeprefix("greenleader ").rsplit("-", 1)[0]
                            for s in consul_sessions(self.addr)
                            if str(s.get("Name", "")).startswith(f"greenleader w{self.tag}")}
            return min(len(with_session) * self.n // len(self.procs), self._campaigning())
        if self.kind == "etcd":
            return etcd_count(self.addr, self.key + "/")
        if self.kind == "zookeeper":
            assert self.zk is not None
            return self.zk.count("/" + self.key)
        # file: flock waiters are invisible; every candidate in acquire (and a little time) will do
        return self._campaigning()

    def _campaigning(self) -> int:
        """Candidates in acquire, and the leader: every win ends one campaign."""
        return len(self.lines("campaigning")) - len(self.lines("elected")) + 1

    def wait_complete(self) -> None:
        def complete() -> bool:
            for proc in self.procs.values():
                if not proc.running():
                    raise RuntimeError(f"{proc.name} exited: {proc.stderr_tail()}")
            return self.registered() >= self.n

        changes.wait_for(f"{self.n} candidates registered on {self.key}", complete, STARTUP, poll=0.02)

    def requests(self) -> int:
        """Requests so far, less keepalives (etcd lease keepalives, Consul session renewals;
        ZooKeeper pings are never counted as requests)."""
        if self.proxy is None:
            return 0
        counts = self.proxy.snapshot()
        return counts["requests"] - counts["keepalives"]

    def close(self) -> None:
        stop_all(self.procs.values(), grace=30)
        if self.proxy is not None:
            self.proxy.close()
        if self.zk is not None:
            self.zk.close()


def bench(kind: str, stores: Stores, addr: str, processes: int, per_process: int, config: Config, workdir: Path
          ) -> dict[str, Any]:
    field = _Field(kind, stores, addr, processes, per_process, workdir)
    latencies: list[float] = []
    per_handover: list[float] = []
    failure = None
    try:
        try:
            field.wait_complete()
        except TimeoutError as exc:
            failure = f"the field never completed: {exc}"
            log.warning("contention %s %d: %s", kind, field.n, failure)
            config = dataclasses.replace(config, contention_handovers=0)
        gevent.sleep(SETTLE)
        c0, t0 = field.requests(), time.monotonic()
        gevent.sleep(config.contention_idle)
        idle_rate = (field.requests() - c0) / (time.monotonic() - t0)
        for _ in range(config.contention_handovers):
            elected = field.lines("elected")
            t_win, proc, node = elected[-1]
            start_count, started = field.requests(), time.monotonic()
            field.procs[proc].send(f"resign {node}")
            count = len(elected)
            successor = changes.wait_for(
                f"a successor of {node}",
                lambda n=count: field.lines("elected")[n] if len(field.lines("elected")) > n else None, 30)
            released = changes.wait_for(
                f"{node} to release",
                lambda t=t_win, n=node: next((x for x in field.lines("deposed") if x[2] == n and x[0] > t), None), 30)
            latencies.append(successor[0] - released[0])
            changes.wait_for(  # the resigned candidate campaigns again after its holdoff
                f"{node} to campaign again",
                lambda t=released[0], n=node: any(x[2] == n and x[0] > t for x in field.lines("campaigning")), 30)
            field.wait_complete()
            gevent.sleep(SETTLE)
            spent = time.monotonic() - started
            if field.proxy is not None:
                per_handover.append(field.requests() - start_count - idle_rate * spent)
    finally:
        field.close()
    errors = [line.data.get("error") for proc in field.procs.values() for line in proc.events("error")]
    result = {"processes": processes, "candidates": processes * per_process, "ttl": TTL, "failure": failure,
              "errors": len(errors), "error_sample": errors[-1] if errors else None,
              "latency": latencies, "summary": summary(latencies),
              "idle_requests_per_s": idle_rate if field.proxy else None,
              "requests_per_handover": per_handover, "req_summary": summary(per_handover)}
    log.info("contention %s %d: %s, requests %s", kind, result["candidates"], result["summary"],
             result["req_summary"])
    return result


class _RoomyConsul(servers.ConsulCluster):
    """A Consul agent that lets one client address hold CONSUL_CONNECTIONS connections."""

    def _argv(self, node: servers.Node) -> list[str]:
        return [*super()._argv(node), "-hcl", f"limits {{ http_max_conns_per_client = {CONSUL_CONNECTIONS} }}"]


def run(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    """Every kind on the benchmark's servers, except Consul: an agent of its own whose limit
    of connections per client address is raised (all candidates here share one address)."""
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in config.kinds:
        roomy = _RoomyConsul(workdir / "consul", 1).start_all() if kind == "consul" else None
        try:
            addr = roomy.addrs[0] if roomy else (stores.addr(kind) if kind != "file" else "")
            results[kind] = [bench(kind, stores, addr, processes, per_process, config, workdir)
                             for processes, per_process in config.contention_sizes]
            for result in results[kind]:
                result["consul_http_max_conns_per_client"] = CONSUL_CONNECTIONS if roomy else None
        finally:
            if roomy is not None:
                roomy.stop()
    return results
