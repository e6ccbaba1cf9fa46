"""Follower latency: a change of leader -> 100 followers in one process notified.

The followers are :class:`greenleader.Follower` objects in the driver process, all on one
store object (as an application would share it), with the library's retries (as a
long-running application runs them: on a loaded machine a server may miss a deadline). The
candidates are separate processes (tests/candidate_process.py) that print when ``acquire``
returned (``elected``) and when ``release`` began (``deposed``). Each change SIGTERMs the
leader's process; each follower's latency is counted from the successor's ``elected``
instant (and, second figure, from the predecessor's release) to the moment the follower's
queue delivered the successor's name. A follower may hear of the new leader before the
winner's ``acquire`` returns (the store shows the win to both at once), so the first figure
can be slightly negative. At the end the tenures are checked: never two leaders at once,
terms strictly increasing.

Where the time goes: ``store_delivery`` is the successor's ``elected`` -> the first follower's
queue (the store's watch and its client, plus one hand-off: the same for one follower or a
hundred); ``fan_out`` is the first follower's queue -> each follower's (the follower layer's
part: the shared watch handing the value to every follower, their queues and events, and the
consumers' turns on the hub).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import gevent

from greenleader import Follower
from greenleader.stores import from_url
from tests.candidate_process import ProcessGroup

from .common import Config, Stores, changes, summary

log = logging.getLogger(__name__)

STARTUP = 60.0
TTL = {"consul": 10.0, "etcd": 5.0, "zookeeper": 5.0, "file": 5.0}


class _Followers:
    """``count`` followers on ``key``; each records (leader, time) for every report."""

    def __init__(self, url: str, key: str, count: int) -> None:
        self.store = from_url(url)
        self.followers = [Follower(self.store, key, retry=True) for _ in range(count)]
        self.seen: list[list[tuple[str | None, float]]] = [[] for _ in range(count)]
        self.greenlets = [gevent.spawn(self._consume, f, seen) for f, seen in zip(self.followers, self.seen,
                                                                                   strict=True)]

    @staticmethod
    def _consume(follower: Follower, seen: list[tuple[str | None, float]]) -> None:
        leaders, _errors = follower.follow_election()
        for leader in leaders:
            seen.append((leader, time.monotonic()))
            changes.notify()

    def first_sight(self, node: str, after: float) -> list[float] | None:
        """When each follower first reported ``node`` after ``after``; None until all have."""
        times = []
        for seen in self.seen:
            t = next((t for leader, t in seen if leader == node and t > after), None)
            if t is None:
                return None
            times.append(t)
        return times

    def close(self) -> None:
        for follower in self.followers:
            follower.stop()
        gevent.killall(self.greenlets, timeout=5)
        self.store.close()


def bench(kind: str, url: str, config: Config, workdir: Path) -> dict[str, Any]:
    key = f"bench/followers-{uuid.uuid4().hex[:8]}"
    ttl = TTL[kind]
    from_elected: list[float] = []
    from_release: list[float] = []
    all_notified: list[float] = []
    handovers: list[float] = []
    store_delivery: list[float] = []
    fan_out: list[float] = []
    elected_at: list[float] = []  # each successor's ``elected`` instant (a trace aligns its marks with them)
    names = (f"c{i}" for i in itertools.count(1))
    followers = _Followers(url, key, config.followers)
    try:
        with ProcessGroup(url, key, ttl, workdir / "procs") as group:
            procs = [group.start(next(names)) for _ in range(3)]
            first = group.wait_elected(STARTUP)
            leader = group.procs[first.proc]
            changes.wait_for("every follower to see the first leader",
                             lambda: followers.first_sight(first.node, 0.0), STARTUP)
            for _ in range(config.follower_changes):
                group.wait_for("every candidate to campaign",
                               lambda: all(p.events("campaigning") for p in procs if p.running()), STARTUP)
                sent = leader.terminate()
                successor = group.wait_elected(30, after=sent, exclude=(leader.name,))
                released = group.wait_line(leader, "deposed", 30, after=0.0)
                times = changes.wait_for(f"{config.followers} followers to see {successor.node}",
                                         lambda s=successor, t=sent: followers.first_sight(s.node, t), 30)
                from_elected += [t - successor.t for t in times]
                from_release += [t - released.t for t in times]
                all_notified.append(max(times) - successor.t)
                store_delivery.append(min(times) - successor.t)
                fan_out += [t - min(times) for t in times]
                handovers.append(successor.t - released.t)
                elected_at.append(successor.t)
                leader.wait_exit(15)
                leader = group.procs[successor.proc]
                procs.append(group.start(next(names)))
            group.check_history()
            errors = [f"{line.proc}: {line.extra}" for line in group.lines("error")]
    finally:
        followers.close()
    log.info("followers %s: elected->notified %s; store delivery %s; fan-out %s", kind, summary(from_elected),
             summary(store_delivery), summary(fan_out))
    return {"followers": config.followers, "changes": config.follower_changes, "ttl": ttl,
            "from_elected": from_elected, "from_release": from_release, "all_notified": all_notified,
            "handovers": handovers, "summary_elected": summary(from_elected),
            "summary_release": summary(from_release), "summary_all_notified": summary(all_notified),
            "store_delivery": store_delivery, "fan_out": fan_out, "elected_at": elected_at,
            "summary_store_delivery": summary(store_delivery), "summary_fan_out": summary(fan_out),
            "history_checked": True, "errors": errors}


def run(config: Config, stores: Stores, workdir: Path) -> dict[str, Any]:
    """Every kind; one that fails is recorded as ``{"failure": ...}`` and the others still run."""
    results: dict[str, Any] = {}
    for kind in config.kinds:
        try:
            results[kind] = bench(kind, stores.url(kind), config, workdir / kind)
        except (TimeoutError, RuntimeError, AssertionError) as exc:
            log.warning("followers %s failed: %s", kind, exc)
            results[kind] = {"failure": f"{type(exc).__name__}: {exc}"[:300], "followers": config.followers,
                             "changes": config.follower_changes}
    return results
