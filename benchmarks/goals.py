"""The goals of issue 11 (store layer v2), before and after: one row per goal and store,
read from two results.json files (a run on the branch's first commit and one on its head).

Every figure comes from a section of ``python -m benchmarks``:

- *handover*: the library's graceful handover (``greenleader library``) against the peer of
  its store in the same run (median ratio); on the file store, the median itself; and issue
  12's row, the same for ``greenleader run`` (the CLI), with the median, p95 and max of both;
- *followers*: p95 of elected -> notified over 100 followers in one process;
- *idle*: 1,000 idle candidates in one process: how many lead, errors, CPU % of a core
  (results of runs before the section existed kept it under ``cost``);
- *cost*: the file store's idle waiter and follower, CPU seconds an hour each and lock
  attempts a minute (10 of each in a process, less an empty process);
- *fileidle*: the same from the file store's own benchmark (benchmarks/file_idle.py), and its
  store-level handover and crash failover, which must not get slower;

A goal is judged on the after column; "no slower than before" allows 10 % for the noise of a
shared machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import KINDS

Results = dict[str, Any]


def _data(results: Results | None, section: str) -> dict[str, Any]:
    if not results:
        return {}
    return results.get("sections", {}).get(section, {}).get("data") or {}


def _commit(results: Results | None, section: str, kind: str) -> str | None:
    if not results:
        return None
    found = results.get("sections", {}).get(section, {})
    return found.get("commits", {}).get(kind) or results.get("environment", {}).get("commit")


def idle_run(results: Results | None, kind: str) -> dict[str, Any] | None:
    """The 1,000-idle-candidates figures of ``kind``: the idle section's, or the older cost one's."""
    found = _data(results, "idle").get(kind)
    return found or (_data(results, "cost").get(kind) or {}).get("big")


def _handover(results: Results | None, kind: str,
              label: str) -> tuple[dict[str, Any], dict[str, Any] | None, str | None] | None:
    """(summary of the runner ``label``, the peer's summary, the peer's label) of ``kind``."""
    runs = _data(results, "handover").get(kind) or []
    ours = next((r for r in runs if r["label"] == label and r["summary"]["n"]), None)
    peer = next((r for r in runs if r["peer"] and r["summary"]["n"]), None)
    if ours is None:
        return None
    return ours["summary"], peer["summary"] if peer else None, peer["label"] if peer else None


Figure = Callable[["Results | None", str], tuple["float | None", str]]


def _ms(summary: dict[str, Any]) -> str:
    return " / ".join(f"{summary[k] * 1000:.1f}" for k in ("median", "p95", "max"))


def _handover_figure(label: str, spread: bool = False) -> Figure:
    """The median handover of the runner ``label`` against the peer's (the ratio is judged);
    ``spread``: median / p95 / max of both in the text, as issue 12 asks its row to be reported."""
    def figure(results: Results | None, kind: str) -> tuple[float | None, str]:
        found = _handover(results, kind, label)
        if found is None:
            return None, "-"
        ours, theirs, peer = found
        if theirs is None:
            return ours["median"] * 1000, f"{ours['median'] * 1000:.1f} ms"
        ratio = ours["median"] / theirs["median"]
        if spread:
            return ratio, f"{ratio:.2f}x ({_ms(ours)} ms; {peer} {_ms(theirs)} ms)"
        return ratio, f"{ratio:.2f}x ({ours['median'] * 1000:.1f} ms; {peer} {theirs['median'] * 1000:.1f} ms)"
    return figure


def _followers_figure(results: Results | None, kind: str) -> tuple[float | None, str]:
    found = _data(results, "followers").get(kind)
    if found and found.get("failure"):
        return math.inf, f"failed: {found['failure'][:100]}"
    if not found or not found["summary_elected"]["n"]:
        return None, "-"
    p95 = found["summary_elected"]["p95"] * 1000
    return p95, f"{p95:.1f} ms ({found['followers']} followers, {found['changes']} changes)"


def _idle_leaders_figure(results: Results | None, kind: str) -> tuple[float | None, str]:
    found = idle_run(results, kind)
    if not found:
        return None, "-"
    held = found.get("held_end", found["n"])
    when = f"all within {found['startup_s']:.1f} s" if found.get("startup_s") is not None else "never all"
    errors = f"{found.get('errors', 0)} errors in the {found['window_s']:.0f} s window"
    return held / found["n"], f"{held} of {found['n']} lead ({when}); {errors} ({found.get('errors_before', 0)} before)"


def _idle_cpu_figure(results: Results | None, kind: str) -> tuple[float | None, str]:
    found = idle_run(results, kind)
    if not found or math.isnan(found["cpu_percent"]):
        return None, "-"
    return found["cpu_percent"], f"{found['cpu_percent']:.1f} % ({found['n']} candidates)"


def _file_role_figure(role: str, section: str) -> Figure:
    """Each idle waiter's or follower's CPU on the file store, from the cost section (10 in a
    process, less an empty process) or the fileidle section (benchmarks/file_idle.py)."""
    def figure(results: Results | None, kind: str) -> tuple[float | None, str]:
        if section == "fileidle":
            found = ((_data(results, "fileidle").get(kind) or {}).get("idle") or {}).get(role + "s")
            if not found:
                return None, "-"
            cpu, attempts = found["cpu_s_per_hour_each"], found["flocks_per_min_each"]
        else:
            found = ((_data(results, "cost").get(kind) or {}).get("roles") or {}).get(role)
            if not found:
                return None, "-"
            cpu, attempts = found["cpu_s_per_hour"], found["requests_per_min"]
        return cpu, f"{cpu:.2f} CPU s/hour; {attempts:.0f} lock attempts/min"
    return figure


def _file_change_figure(name: str) -> Figure:
    """The file store's store-level handover or failover median (benchmarks/file_idle.py)."""
    def figure(results: Results | None, kind: str) -> tuple[float | None, str]:
        found = (_data(results, "fileidle").get(kind) or {}).get(name)
        if not found:
            return None, "-"
        return found["median_ms"], f"{found['median_ms']:.1f} ms (p95 {found['p95_ms']:.1f}, max {found['max_ms']:.1f})"
    return figure


#: Issue 12's open row, measured by the same handover section: the CLI beside the library and the peer.
ISSUE_12_ROW = "Graceful handover through `greenleader run` (issue 12), ratio of medians (median / p95 / max)"


@dataclass
class Goal:
    """One row of the issue's table, for some stores."""

    what: str
    section: str  # the section of python -m benchmarks it reads
    kinds: list[str]
    figure: Figure  # (results, kind) -> (the number judged, the text shown); (None, "-") if not measured
    goal: str
    met: Callable[[float, float | None], bool]  # (after, before) -> met?


GOALS = [
    Goal("Graceful handover through the library, median (ratio to the peer)", "handover",
         ["consul", "etcd", "zookeeper"], _handover_figure("greenleader library"), "<= 1.0x the peer (aim 0.8x)",
         lambda after, before: after <= 1.0),
    Goal("Graceful handover through the library, median", "handover", ["file"],
         _handover_figure("greenleader library"), "no slower than before (10 % allowed for noise)",
         lambda after, before: before is None or after <= before * 1.1),
    Goal(ISSUE_12_ROW, "handover", ["consul", "etcd", "zookeeper"],
         _handover_figure("greenleader run", spread=True), "<= 1.0x the peer (issue 12)",
         lambda after, before: after <= 1.0),
    Goal("100 followers in one process, p95 of elected -> notified", "followers", ["etcd", "zookeeper", "file"],
         _followers_figure, "<= 20 ms", lambda after, before: after <= 20),
    Goal("100 followers in one process, p95 of elected -> notified", "followers", ["consul"],
         _followers_figure, "<= 50 ms", lambda after, before: after <= 50),
    Goal("1,000 idle candidates in one process: leading, errors", "idle", list(KINDS), _idle_leaders_figure,
         "all lead", lambda after, before: after >= 1.0),
    Goal("1,000 idle candidates in one process: CPU of a core", "idle", list(KINDS), _idle_cpu_figure,
         "<= 5 %", lambda after, before: after <= 5.0),
    Goal("File store, each idle waiter (cost section)", "cost", ["file"], _file_role_figure("waiter", "cost"),
         "<= 0.5 CPU s/hour", lambda after, before: after <= 0.5),
    Goal("File store, each idle follower (cost section)", "cost", ["file"], _file_role_figure("follower", "cost"),
         "<= 0.5 CPU s/hour", lambda after, before: after <= 0.5),
    Goal("File store, each idle waiter (file_idle)", "fileidle", ["file"], _file_role_figure("waiter", "fileidle"),
         "<= 0.5 CPU s/hour", lambda after, before: after <= 0.5),
    Goal("File store, each idle follower (file_idle)", "fileidle", ["file"],
         _file_role_figure("follower", "fileidle"), "<= 0.5 CPU s/hour", lambda after, before: after <= 0.5),
    Goal("File store, release -> waiter's win, median (file_idle)", "fileidle", ["file"],
         _file_change_figure("graceful_handover"), "no slower than before (10 % allowed for noise)",
         lambda after, before: before is None or after <= before * 1.1),
    Goal("File store, SIGKILL -> waiter's win, median (file_idle)", "fileidle", ["file"],
         _file_change_figure("crash_failover"), "no slower than before (about 20 ms)",
         lambda after, before: before is None or after <= max(before * 1.1, 25)),
]


def rows(before: Results | None, after: Results, reference: Results | None = None) -> list[list[str]]:
    """[what, store, (reference,) before, after, goal, met] for every goal a run has figures
    for; ``reference``: the run the issue quoted, for a column of its own."""
    out = []
    for goal in GOALS:
        for kind in goal.kinds:
            b_value, b_text = goal.figure(before, kind)
            a_value, a_text = goal.figure(after, kind)
            if b_value is None and a_value is None:
                continue
            verdict = "-" if a_value is None else ("yes" if goal.met(a_value, b_value) else "**no**")
            quoted = [_with_commit(goal.figure(reference, kind)[1], reference, goal.section, kind)] if reference else []
            out.append([goal.what, kind, *quoted, _with_commit(b_text, before, goal.section, kind),
                        _with_commit(a_text, after, goal.section, kind), goal.goal, verdict])
    return out


def _with_commit(text: str, results: Results | None, section: str, kind: str) -> str:
    if text == "-":
        return text
    commit = _commit(results, section, kind)
    return f"{text} [{commit}]" if commit else text


def describe(results: Results | None) -> str:
    """The commit and date of a run, and the range of the 1-minute load average over its sections."""
    env = (results or {}).get("environment", {})
    if not env:
        return "none"
    loads = [load[0] for section in (results or {}).get("sections", {}).values()
             for load in (section.get("load_before"), section.get("load_after")) if load]
    span = (f", 1-minute load average {min(loads):.1f} to {max(loads):.1f} as its sections began and ended"
            if loads else "")
    return f"{env.get('commit', '?')} ({env.get('date', '?')}{span})"
