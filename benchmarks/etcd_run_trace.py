"""What an etcd ``greenleader run`` does between its win and its command's start, mark by mark.

    python -m benchmarks.etcd_run_trace [--handovers 12] [--switches] [--sequences 3]

:mod:`benchmarks.run_trace` (``--kind etcd --only run``) with more marks in each contender: every
request of the etcd client (sent, answered), every watch stream made, cancelled or put off for
cancelling, the win (``_won``), the lease's making, its claim, its key watch (the guard); with
``--switches``, every greenlet switch too (the greenlet switched to, by the function it runs), so
that what runs on the hub between the step-up and the command's start is seen by name. Prints
run_trace's JSON (median / max of each step, ms from the holder's child's ``end`` line, and the
CPU from the first step), then the winner's marks from its first after the holder's child's end
(with ``--switches``, the wake-up that reads the watch response) to the command's start in
``--sequences`` handovers, and the holder's from ``release begin`` to its release's answer,
one line each: wall ms and CPU ms since the first of them.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import benchmarks.run_trace as run_trace  # noqa: E402

mark = run_trace.mark


_around = run_trace._around  # mark the call and the return of owner.name


def _greenlet_name(glet: Any) -> str:
    import gevent.hub

    if isinstance(glet, gevent.hub.Hub):
        return "hub"
    run = getattr(glet, "_run", None) or getattr(glet, "run", None)
    run = getattr(run, "func", run)  # a functools.partial
    name = getattr(run, "__qualname__", None)
    return name or type(glet).__name__


def _etcd_marks(switches: bool) -> None:
    """Mark the etcd store's requests, streams and a win's steps (and greenlet switches)."""
    from greenleader.stores.etcd import client, recipe

    call = client.EtcdClient.call

    def traced_call(self: Any, what: str, request: Any, **kwargs: Any) -> Any:
        mark(f"etcd {what} sent")
        try:
            return call(self, what, request, **kwargs)
        finally:
            mark(f"etcd {what} answered")

    client.EtcdClient.call = traced_call  # type: ignore[method-assign]
    _around(client.WatchStream, "__init__", "watch make")
    _around(client.WatchStream, "close", "watch close")
    _around(client.WatchStream, "close_later", "watch close_later")
    _around(recipe._Candidacy, "_won", "_won")
    _around(recipe._EtcdLease, "_claim", "claim")
    _around(recipe._EtcdLease, "_guard_own_key", "guard")
    _around(recipe._EtcdLease, "_claim_once_stepped_up", "claimer")
    if switches:
        import greenlet

        def trace(event: str, args: Any) -> None:
            if event in ("switch", "throw"):
                mark(f"{event} -> {_greenlet_name(args[1])}")

        greenlet.settrace(trace)


_SEQUENCES: dict[str, list[list[tuple[float, float, str]]]] = {"winner": [], "holder": []}


def _keep_sequences() -> None:
    """Keep, for each handover, the winner's marks from its first after the holder's child's end
    to ``start end``, and the holder's from ``release begin`` to its release transaction's answer."""
    steps = run_trace._steps

    def kept(marks: list[tuple[float, float, str]], since: float, until: float) -> Any:
        window = [m for m in marks if since <= m[0] <= until]
        labels = [what for _, _, what in window]
        if "acquire returned" in labels:
            end = labels.index("start end") if "start end" in labels else len(window) - 1
            _SEQUENCES["winner"].append(window[:end + 1])
        elif "release begin" in labels:
            begin = labels.index("release begin")
            last = "etcd release answered"
            end = labels.index(last, begin) if last in labels[begin:] else len(window) - 1
            _SEQUENCES["holder"].append(window[begin:end + 1])
        return steps(marks, since, until)

    run_trace._steps = kept


def _retarget_contenders() -> None:
    """Start each contender with this module (its marks) instead of benchmarks.run_trace."""
    import benchmarks.handover as handover

    proc = handover.Proc

    class Proc(proc):  # type: ignore[misc, valid-type]
        def __init__(self, argv: list[str], *args: Any, **kwargs: Any) -> None:
            argv = ["benchmarks.etcd_run_trace" if part == "benchmarks.run_trace" else part for part in argv]
            super().__init__(argv, *args, **kwargs)

    handover.Proc = Proc  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.etcd_run_trace", description=__doc__.split("\n")[0])
    parser.add_argument("--handovers", type=int, default=12)
    parser.add_argument("--switches", action="store_true", help="mark every greenlet switch")
    parser.add_argument("--sequences", type=int, default=3, help="winner's sequences printed")
    parser.add_argument("--wrap", choices=("run",), help=argparse.SUPPRESS)
    parser.add_argument("--marks", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.wrap:
        import os

        _etcd_marks(os.environ.get("ETCD_RUN_TRACE_SWITCHES") == "1")
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        sys.exit(run_trace.wrapped(args.wrap, args.marks, rest))
    import os

    os.environ["ETCD_RUN_TRACE_SWITCHES"] = "1" if args.switches else "0"
    _retarget_contenders()
    _keep_sequences()
    report = run_trace.drive(argparse.Namespace(kind="etcd", handovers=args.handovers, passes=1, only="run",
                                                    each=False))
    print(json.dumps(report, indent=1))
    for role, sequences in _SEQUENCES.items():
        for sequence in sequences[:args.sequences]:
            t0, cpu0 = sequence[0][0], sequence[0][1]
            print(f"{role}: " + " | ".join(f"{(t - t0) * 1000:.2f}/{(cpu - cpu0) * 1000:.2f} {what}"
                                          for t, cpu, what in sequence))
            print()


if __name__ == "__main__":
    main()
