"""Where ``greenleader run`` spends a handover, step by step, beside the library runner.

    python -m benchmarks.run_trace [--kind consul] [--handovers 10] [--passes 2] [--only run|library] [--each]

The handover benchmark's field (three contenders on one key, the same ``bash`` child, the same
FIFOs; see :mod:`benchmarks.handover`), with each contender wrapped by this module
(``--wrap run|library``), which timestamps the steps of ``greenleader run`` (greenleader/cli.py,
greenleader/_spawn.py) or of benchmarks/library_runner.py before calling its ``main``. Each mark
is the wall clock (``time.time()``, the clock of the child's ``$EPOCHREALTIME``) and the
process's CPU time, appended to a file per contender. For each handover, every step of the
holder and of the winner is given in ms from the holder's child's ``end`` line; the holder's CPU
from its first mark after that line. The runners take turns in ``--passes`` passes.
Prints one JSON document: median and max of each step, per runner.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

_MARKS: list[int] = []  # the marks file's descriptor, once opened


def mark(what: str) -> None:
    """Append ``what`` with the wall clock and this process's CPU time to the marks file."""
    if _MARKS:
        os.write(_MARKS[0], f"{time.time()!r} {time.process_time()!r} {what}\n".encode())


def _around(owner: Any, name: str, label: str | None = None) -> None:
    """Mark the call and the return of ``owner.name``."""
    original = getattr(owner, name)
    label = label or name

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        mark(f"{label} begin")
        try:
            return original(*args, **kwargs)
        finally:
            mark(f"{label} end")

    setattr(owner, name, call)


def _instrument_store(make: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a store factory: mark ``acquire`` returning and each lease's ``release``."""

    def made(*args: Any, **kwargs: Any) -> Any:
        store = make(*args, **kwargs)
        acquire = store.acquire

        def timed_acquire(*a: Any, **k: Any) -> Any:
            lease = acquire(*a, **k)
            mark("acquire returned")
            release = lease.release

            def timed_release() -> None:
                mark("release begin")
                try:
                    release()
                finally:
                    mark("release end")

            lease.release = timed_release
            return lease

        store.acquire = timed_acquire
        return store

    return made


def wrapped(kind: str, marks: str, argv: list[str]) -> int:
    """Run ``greenleader run`` (``kind`` "run") or the library runner with marks."""
    _MARKS.append(os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    gc.callbacks.append(lambda phase, info: mark(f"gc{info['generation']} {phase}"))
    import greenleader._spawn as spawn
    from greenleader.candidate import Candidate

    _around(Candidate, "stop")
    _around(Candidate, "_step_up")
    for owner, name in [(Candidate, n) for n in os.environ.get("RUN_TRACE_MORE", "").split(",") if n]:
        if hasattr(owner, name):
            _around(owner, name)
    _around(spawn.CommandGroup, "_on_watchdog_exit")
    try:
        from greenleader.stores.consul.client import ConsulClient
    except ImportError:
        pass
    else:
        for name in ("release", "lock", "destroy_session"):
            _around(ConsulClient, name, f"consul {name}")
    import benchmarks.library_runner as runner

    for name in ("posix_spawn", "posix_spawnp"):
        for module in (os, spawn, runner):  # (_spawn and the runner keep their own, unpatched)
            for attribute in (name, f"_{name}"):
                if hasattr(module, attribute):
                    _around(module, attribute, name)
    to_code = os.waitstatus_to_exitcode

    def waitstatus_to_exitcode(status: int) -> int:
        mark("child exit seen")
        return to_code(status)

    os.waitstatus_to_exitcode = waitstatus_to_exitcode
    if kind == "run":
        import greenleader.cli as cli

        for name in ("start", "_wait_ready", "wait", "end", "_members", "_kill", "signal"):
            _around(spawn.CommandGroup, name)
        _around(cli, "_command_env")
        cli._store = _instrument_store(cli._store)
        try:
            code = cli._main(["run", *argv])
        finally:
            mark("exit")
        cli._exit_at_once(code)  # as the command does
    _around(runner, "spawn_and_wait")
    runner.from_url = _instrument_store(runner.from_url)
    try:
        return runner.main(argv)
    finally:
        mark("exit")


# -- the driver ------------------------------------------------------------------------------


def _read_marks(path: Path) -> list[tuple[float, float, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        t, cpu, what = line.split(" ", 2)
        out.append((float(t), float(cpu), what))
    return out


def _steps(marks: list[tuple[float, float, str]], since: float,
           until: float) -> tuple[dict[str, float], dict[str, float]]:
    """The first time of each step in ``[since, until]`` (ms from ``since``), and the CPU from
    the first of them (ms)."""
    times: dict[str, float] = {}
    cpus: dict[str, float] = {}
    cpu0: float | None = None
    counts: dict[str, int] = {}
    for t, cpu, what in marks:
        if not since <= t <= until:
            continue
        counts[what] = counts.get(what, 0) + 1
        label = what if counts[what] == 1 else f"{what} #{counts[what]}"
        if cpu0 is None:
            cpu0 = cpu
        times[label] = (t - since) * 1000
        cpus[label] = (cpu - cpu0) * 1000
    return times, cpus


def drive(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import Stores, loadavg
    from benchmarks.handover import SETTLE, STARTUP, Ctx, Field, GreenleaderRun, LibraryRunner

    class Traced:
        wrap = "run"

        def argv(self, ctx: Ctx, ident: str, key: str) -> list[str]:
            inner = super().argv(ctx, ident, key)  # type: ignore[misc]
            start = inner.index("run") + 1 if self.wrap == "run" else inner.index("benchmarks.library_runner") + 1
            return [sys.executable, "-m", "benchmarks.run_trace", "--wrap", self.wrap, "--marks",
                    str(ctx.workdir / f"{ident}.marks"), "--", *inner[start:]]

    class TracedRun(Traced, GreenleaderRun):
        wrap = "run"

    class TracedLibrary(Traced, LibraryRunner):
        wrap = "library"

    runners = {"run": TracedRun("greenleader run", args.kind, ttl=15.0),
               "library": TracedLibrary("greenleader library", args.kind, ttl=15.0)}
    if args.only:
        runners = {args.only: runners[args.only]}
    results: dict[str, dict[str, Any]] = {name: {"holder": {}, "winner": {}, "holder CPU": {}, "winner CPU": {},
                                                 "handover": [], "each": []} for name in runners}
    load = [loadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stores = Stores(workdir)
        ctx = Ctx(None, stores, workdir / "run")  # type: ignore[arg-type]
        try:
            for pass_ in range(args.passes):
                order = list(runners) if pass_ % 2 == 0 else list(reversed(runners))
                for name in order:
                    runner = runners[name]
                    from benchmarks.common import unique_key

                    field_ = Field(ctx, runner, unique_key(f"trace-{name}"), prefix=f"t{pass_}{name[:3]}-")
                    pipe = ctx.pipe
                    try:
                        first_mark = pipe.mark()
                        for _ in range(3):
                            field_.add()
                        started = pipe.wait("start", STARTUP, after=first_mark)
                        holder = started.ident
                        for _ in range(args.handovers):
                            field_.wait_ready(holder)
                            time.sleep(SETTLE)
                            field_.end(holder)
                            ended = pipe.wait("end", 10.0, ident=holder, after=started.index)
                            successor = pipe.wait("start", 30.0, after=ended.index, exclude=frozenset({holder}))
                            field_.reap(holder)
                            out = results[name]
                            out["handover"].append((successor.t - ended.t) * 1000)
                            steps = {}
                            for role, ident in (("holder", holder), ("winner", successor.ident)):
                                times, cpus = _steps(_read_marks(ctx.workdir / f"{ident}.marks"), ended.t,
                                                     successor.t + 0.5)
                                steps[role], steps[f"{role} CPU"] = times, cpus
                                for label, value in times.items():
                                    out[role].setdefault(label, []).append(value)
                                for label, value in cpus.items():
                                    out[f"{role} CPU"].setdefault(label, []).append(value)
                            out["each"].append(steps)
                            holder, started = successor.ident, successor
                            field_.add()
                    finally:
                        field_.close()
        finally:
            ctx.close()
            stores.close()
    load.append(loadavg()[0])

    def brief(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} / {max(values):.2f} (n={len(values)})"

    report: dict[str, Any] = {"load": load, "kind": args.kind}
    for name, out in results.items():
        report[name] = {"handover ms (median / max)": brief(out["handover"])}
        if args.each:
            report[name]["each"] = out["each"]
        for section in ("holder", "winner", "holder CPU", "winner CPU"):
            order = sorted(out[section], key=lambda label: statistics.median(out[section][label]))
            report[name][section] = {label: brief(out[section][label]) for label in order}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_trace", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="consul")
    parser.add_argument("--handovers", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--only", choices=("run", "library"))
    parser.add_argument("--each", action="store_true", help="also give every handover's steps (as \"each\")")
    parser.add_argument("--wrap", choices=("run", "library"), help=argparse.SUPPRESS)
    parser.add_argument("--marks", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wrap:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        sys.exit(wrapped(args.wrap, args.marks, rest))
    print(json.dumps(drive(args), indent=1))


if __name__ == "__main__":
    main()
