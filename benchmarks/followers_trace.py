"""Where the follower benchmark's time goes, round by round (a tracing form of ``followers``).

    python -m benchmarks.followers_trace [--kinds file,consul,etcd,zookeeper] [--changes 10]
                                         [--followers 100]

Runs :func:`benchmarks.followers.bench` (candidates in processes of their own, 100 followers
on one store object in this process) with timestamps added in this process only:

- ``event``: the store's news reached the store object (ZooKeeper: kazoo fired the watch;
  etcd: a watch response came off the gRPC stream; Consul: the key's blocking query
  answered; file: a leader read began after inotify woke the watch);
- ``yield``: the store's watch yielded the value (the shared watch then hands it to every
  follower inline);
- ``fanned``: the shared watch asked the store's watch for the next value, i.e. every
  follower had taken this one;
- ``first``/``median``/``last``: followers' queues delivered the successor's name;
- ``gc``: milliseconds of garbage collection inside the round's window.

All from the successor's ``elected`` instant (its ``acquire`` returned; it steps up and, on
etcd and ZooKeeper, claims its key after that). Prints a table per store, then p95 figures.
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import followers
from .common import Config, Stores

MARKS: list[tuple[str, float, Any]] = []  # (what, when, detail)
GC: list[tuple[float, float]] = []  # (start, end) of each collection
_gc_started = 0.0


def _on_gc(phase: str, _info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.monotonic()
    else:
        GC.append((_gc_started, time.monotonic()))


def _mark(what: str, detail: Any = None) -> None:
    MARKS.append((what, time.monotonic(), detail))


def _traced_watch(watch: Callable[[str], Iterator[Any]]) -> Callable[[str], Iterator[Any]]:
    def traced(key: str) -> Iterator[Any]:
        values = watch(key)
        try:
            for info in values:
                cpu = time.thread_time()
                _mark("yield", getattr(info, "node", None))
                yield info
                _mark("fanned", f"{getattr(info, 'node', None)} cpu {(time.thread_time() - cpu) * 1000:.1f}")
        finally:
            values.close()
    return traced


def _patch_store_events() -> None:
    """Mark where each store's news reaches the store object (before the recipe reads it)."""
    from greenleader.stores.consul.recipe import KeyWatch
    from greenleader.stores.etcd.client import EtcdClient
    from greenleader.stores.file import FileStore
    from greenleader.stores.zookeeper.recipe import ZooKeeperStore

    read_leader = ZooKeeperStore._read_leader

    def zk_read_leader(self: Any, session: Any, path: str, watch: Any = None, successor: Any = None) -> Any:
        if watch is not None:
            inner = watch
            def watch(event: Any) -> None:
                _mark("event", (getattr(event, "type", None), getattr(event, "path", "")[-12:]))
                inner(event)
        _mark("read")
        info = read_leader(self, session, path, watch, successor)
        if watch is not None:
            _mark("read done", (type(info).__name__, [s.path[-12:] for s in successor or ()]))
        return info
    ZooKeeperStore._read_leader = zk_read_leader  # type: ignore[method-assign]
    from greenleader.stores.zookeeper import recipe
    next_event = recipe._next

    def zk_next(fired: Any, timeout: float | None, **options: Any) -> Any:
        _mark("next?", timeout)
        event = next_event(fired, timeout, **options)
        _mark("next", event and (event.type, event.path[-12:]))
        return event
    recipe._next = zk_next

    etcd_watch = EtcdClient.watch

    def traced_etcd_watch(self: Any, *args: Any, **kwargs: Any) -> Any:
        stream = etcd_watch(self, *args, **kwargs)
        iterate = stream.__iter__

        class Stream:
            def __iter__(self) -> Iterator[Any]:
                for response in iterate():
                    _mark("event")
                    yield response

            def close(self) -> None:
                stream.close()
        return Stream()
    EtcdClient.watch = traced_etcd_watch  # type: ignore[method-assign]

    next_ = KeyWatch.next

    def consul_next(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = next_(self, *args, **kwargs)
        _mark("event")
        return result
    KeyWatch.next = consul_next  # type: ignore[method-assign]

    leader = FileStore.leader

    def file_leader(self: Any, key: str) -> Any:
        _mark("event")
        return leader(self, key)
    FileStore.leader = file_leader  # type: ignore[method-assign]


def _first(what: str, after: float, before: float) -> float | None:
    return next((t for w, t, _ in MARKS if w == what and after <= t <= before), None)


def analyse(kind: str, result: dict[str, Any], detail: bool = False) -> None:
    count = result["followers"]
    rows = []
    for i, elected in enumerate(result["elected_at"]):
        lat = sorted(result["from_elected"][i * count:(i + 1) * count])
        notified = [elected + x for x in lat]
        start = elected - 0.2
        yielded = max((t for w, t, _ in MARKS if w == "yield" and start <= t <= notified[0]), default=None)
        fanned = _first("fanned", yielded, notified[-1] + 1) if yielded else None
        event = max((t for w, t, _ in MARKS if w == "event" and start <= t <= (yielded or notified[0])),
                    default=None)
        gc_ms = sum(min(e, notified[-1]) - max(s, elected) for s, e in GC if e > elected and s < notified[-1])
        rel = {name: (t - elected) * 1000 if t is not None else float("nan") for name, t in
               (("event", event), ("yield", yielded), ("fanned", fanned))}
        rows.append((rel["event"], rel["yield"], rel["fanned"], lat[0] * 1000, statistics.median(lat) * 1000,
                     lat[-1] * 1000, gc_ms * 1000))
    print(f"\n{kind}: ms after the successor's elected instant, per round")
    print(f"{'event':>8} {'yield':>8} {'fanned':>8} {'first':>8} {'median':>8} {'last':>8} {'gc':>6}")
    for row in rows:
        print(" ".join(f"{x:8.1f}" for x in row[:-1]) + f" {row[-1]:6.1f}")
    if detail:
        for elected in result["elected_at"]:
            print("  " + "; ".join(f"{(t - elected) * 1000:.1f} {w} {d or ''}" for w, t, d in MARKS
                                   if elected - 0.03 <= t <= elected + 0.06))
    lats = sorted(x * 1000 for x in result["from_elected"])
    print(f"{kind}: elected -> notified median {statistics.median(lats):.1f} / p95 "
          f"{lats[int(len(lats) * 0.95) - 1]:.1f} / max {lats[-1]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="file,consul,etcd,zookeeper")
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--detail", action="store_true", help="print every mark near each round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _patch_store_events()
    from greenleader import follower
    open_watch = follower._SharedWatch._fan_out

    def fan_out(self: Any) -> None:
        if not getattr(self.store, "_traced", False):
            self.store.watch = _traced_watch(self.store.watch)
            self.store._traced = True
        open_watch(self)
    follower._SharedWatch._fan_out = fan_out  # type: ignore[method-assign]
    gc.callbacks.append(_on_gc)
    workdir = Path(tempfile.mkdtemp(prefix="followers-trace-"))
    stores = Stores(workdir)
    config = Config(kinds=tuple(args.kinds.split(",")), follower_changes=args.changes, followers=args.followers)
    try:
        for kind in config.kinds:
            MARKS.clear()
            GC.clear()
            analyse(kind, followers.bench(kind, stores.url(kind), config, workdir / kind), args.detail)
    finally:
        stores.close()


if __name__ == "__main__":
    main()
