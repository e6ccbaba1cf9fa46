"""The one command: start the servers, run the benchmarks, print the table, write JSON,
plots and docs/benchmarks.md.

    python -m benchmarks                      # everything (about 15 minutes on 2 cores)
    python -m benchmarks --quick              # a smoke run of a minute or two (to a temp dir)
    python -m benchmarks handover failover --kinds etcd,zookeeper
    python -m benchmarks --report             # table, plots and page again from the JSON
    python -m benchmarks handover --passes 5  # the runners take turns: 5 passes, order rotated
    python -m benchmarks --report --before OLD/results.json   # the page with before/after columns

The machine is shared (2 cores): its load changes over the minutes a section takes. With
``--passes N`` the handover runners of a store take turns, N passes of trials/N handovers each,
in an order rotated every pass, so that greenleader and the peer it is compared with see the
same conditions; their samples are pooled.

A run of some sections merges them into the existing results.json, so the table always
shows the latest figures of every section (each says the commit it was measured at).

``--before FILE`` keeps FILE (the results.json of a run on an earlier commit, say a
worktree of the branch's first commit) as ``before.json`` next to results.json; the table
and the page then open with the goals of issue 11, before and after (benchmarks/goals.py).
``--reference FILE`` (kept as ``reference.json``) adds the run the issue quoted as a column.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .common import KINDS, REPO, Config, Stores, loadavg

log = logging.getLogger("benchmarks")

SECTIONS = ["handover", "failover", "followers", "cost", "idle", "fileidle", "contention"]


def _section_runner(name: str, passes: int = 1) -> Callable[[Config, Stores, Path], Any]:
    if name == "handover" and passes > 1:
        return lambda config, stores, workdir: _interleaved_handover(config, stores, workdir, passes)
    if name in ("handover", "failover"):
        from . import handover

        return handover.run_handover if name == "handover" else handover.run_failover
    if name == "followers":
        from . import followers

        return followers.run
    if name == "fileidle":
        from . import file_section

        return file_section.run
    if name in ("cost", "idle"):
        from . import cost

        return cost.run if name == "cost" else cost.run_idle
    from . import contention

    return contention.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"sections to run, in this order (default: all): {', '.join(SECTIONS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="stores to run on (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="few trials and short windows: a smoke run")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials of each figure (handovers, failovers, leader changes, contended handovers)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.json and the plots go (default: docs/benchmarks, or a "
                             "temporary directory with --quick)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots and no page")
    parser.add_argument("--report", action="store_true", help="run nothing: table, plots and page from the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs of every process)")
    parser.add_argument("--passes", type=int, default=1,
                        help="handover: the runners of a store take turns in this many passes, each in a rotated "
                             "order, and their samples are pooled (default: %(default)s, one runner after another)")
    parser.add_argument("--before", type=Path, default=None,
                        help="the results.json of a run on an earlier commit: kept as before.json in --out, "
                             "for the before/after table of issue 11's goals")
    parser.add_argument("--reference", type=Path, default=None,
                        help="the results.json the issue quoted: kept as reference.json in --out, a column of "
                             "that table")
    parser.add_argument("--against", type=Path, action="append", default=[], metavar="TREE",
                        help="handover: also run greenleader run from this source tree (a git worktree of "
                             "another commit) beside this tree's, taking turns with it (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # "connection pool is full" under load
    if set(args.sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(args.sections) - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    out = args.out or (Path(tempfile.gettempdir()) / "greenleader-bench-quick" if args.quick
                       else REPO / "docs" / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    results = report.load(out / "results.json")
    if args.before is not None:
        shutil.copyfile(args.before, out / "before.json")
    if args.reference is not None:
        shutil.copyfile(args.reference, out / "reference.json")
    before = report.load(out / "before.json") if (out / "before.json").exists() else None
    reference = report.load(out / "reference.json") if (out / "reference.json").exists() else None
    if not args.report:
        config = Config.quick_run(kinds) if args.quick else Config(kinds=kinds)
        if args.trials is not None:
            config.handover_trials = config.failover_trials = args.trials
            config.follower_changes = config.contention_handovers = args.trials
        if args.passes < 1:
            parser.error("--passes must be 1 or more")
        for tree in args.against:
            if not (tree / "greenleader" / "__init__.py").is_file():
                parser.error(f"--against {tree}: no greenleader package there")
        config.against = tuple(args.against)
        _run(config, args.sections or SECTIONS, results, out, args.keep, args.passes)
    print(report.table(results, before=before, reference=reference), flush=True)
    if not args.no_plots:
        report.plots(results, out)
        if out.resolve() == (REPO / "docs" / "benchmarks").resolve():
            report.page(results, REPO / "docs" / "benchmarks.md", before=before, reference=reference)
    print(f"results: {out / 'results.json'}", flush=True)
    return 0


def _run(config: Config, sections: list[str], results: dict[str, Any], out: Path, keep: bool,
         passes: int = 1) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="greenleader-bench-"))
    stores = Stores(workdir)
    ok = False
    try:
        results["environment"] = environment = report.environment()
        for name in dict.fromkeys(sections):  # in the order asked for: each is saved as it ends
            before, started = loadavg(), time.monotonic()
            print(f"== {name} (load average {' '.join(map(str, before))})", flush=True)
            data = _section_runner(name, passes)(config, stores, workdir / name)
            section = results["sections"].setdefault(name, {"data": {}})
            section["data"].update(data)  # other kinds keep their earlier figures
            section.update(quick=config.quick, passes=passes if name == "handover" else 1,
                           seconds=round(time.monotonic() - started, 1), load_before=before,
                           load_after=loadavg(), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                           servers=dict(stores.versions))
            section.setdefault("commits", {}).update(dict.fromkeys(data, environment["commit"]))
            report.save(results, out / "results.json")
            print(f"   {name} took {section['seconds']:.0f}s (load average {' '.join(map(str, loadavg()))})",
                  flush=True)
        ok = True
    finally:
        stores.close()
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"scratch directory (process logs): {workdir}", file=sys.stderr)


def _interleaved_handover(config: Config, stores: Stores, workdir: Path, passes: int) -> dict[str, Any]:
    """The handover section with the runners of each store taking turns (see the module doc)."""
    from . import handover
    from .common import summary

    per_pass = max(1, -(-config.handover_trials // passes))  # rounded up
    data: dict[str, Any] = {}
    for kind in config.kinds:
        runners = handover.handover_runners(kind, config.against)
        pooled: dict[str, dict[str, Any]] = {}
        load_before = loadavg()
        for number in range(passes):
            shift = number % len(runners)
            ctx = handover.Ctx(config, stores, workdir / f"{kind}-pass-{number + 1}")  # its FIFOs, its names
            try:
                for runner in runners[shift:] + runners[:shift]:
                    result = handover.handover(ctx, runner, per_pass)
                    into = pooled.setdefault(runner.label, {**result, "samples": [], "tenures": [], "errors": []})
                    for field in ("samples", "tenures", "errors"):
                        into[field] += result[field]
            finally:
                ctx.close()
        load = [load_before[0], loadavg()[0]]  # the 1-minute load average as this store began and ended
        for result in pooled.values():
            result["summary"] = summary(result["samples"])
            result["load"] = load
            log.info("handover %s %s over %d passes: %s", kind, result["label"], passes, result["summary"])
        data[kind] = [pooled[runner.label] for runner in runners]
    return data
