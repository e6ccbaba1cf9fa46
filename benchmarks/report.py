"""Results: the JSON file, the table, the PNG plots and the docs/benchmarks.md page."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .common import KINDS, REPO, loadavg, ratio

PEER_OF = {"consul": "consul lock", "etcd": "etcdctl lock", "zookeeper": "kazoo Election"}


# ---------------------------------------------------------------------------------------------
# JSON


def load(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results.setdefault("sections", {})
    return results


def save(results: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def commit_of(tree: Path) -> str | None:
    """The short commit of the source tree ``tree``, ``+uncommitted`` when its library differs
    from it; None if git cannot tell (not a repository, no git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--", "greenleader"):  # the library measured is not the commit's
            commit += "+uncommitted"
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def environment() -> dict[str, Any]:
    versions = {}
    for dist in ("gevent", "kazoo", "py-consul", "etcd-sdk-python", "grpcio", "requests"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    commit = commit_of(REPO) or "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "cpus": os.cpu_count(),
            "load_average": loadavg(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions}


# ---------------------------------------------------------------------------------------------
# the table


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _triple(summary: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not summary or not summary.get("n"):
        return "-"
    return " / ".join(_f(summary[k] * scale, digits) for k in ("median", "p95", "max"))


def _ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, key: str = "median") -> str:
    if not ours or not theirs or not ours.get("n") or not theirs.get("n"):
        return "-"
    return _f(ratio(ours[key], theirs[key]), 2)


def _md(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def _kinds(data: dict[str, Any]) -> list[str]:
    return [k for k in KINDS if k in data]


def handover_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        peer = next((r for r in data[kind] if r["peer"]), None)
        for ours in [r for r in data[kind] if not r["peer"]]:
            load = " -> ".join(_f(x) for x in ours["load"]) if ours.get("load") else "-"
            rows.append([kind, ours["label"], _triple(ours["summary"], 1000), peer["label"] if peer else "-",
                         _triple(peer and peer["summary"], 1000), _ratio(ours["summary"], peer and peer["summary"]),
                         _ratio(ours["summary"], peer and peer["summary"], "p95"), load])
    return _md(["store", "greenleader", "ms (median / p95 / max)", "peer", "peer ms (median / p95 / max)",
                "ratio median", "ratio p95", "load (1 min), begin -> end"], rows)


def failover_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        peers = [r for r in data[kind] if r["peer"]]
        peer = peers[0] if peers else None
        for ours in [r for r in data[kind] if not r["peer"]]:
            settings = f"ttl {ours['ttl']:g} s" + (f", lock-delay {ours['lock_delay']:g} s"
                                                   if ours.get("lock_delay") is not None else "")
            peer_settings = ""
            if peer:
                peer_settings = f"{peer['label']} (ttl {peer['ttl']:g} s" + (
                    f", lock-delay {peer['lock_delay']:g} s)" if peer.get("lock_delay") is not None else ")")
            rows.append([kind, f"{ours['label']} ({settings})", _triple(ours["summary"], 1, 2),
                         _f(ours.get("bound"), 1), _within(ours),
                         peer_settings or "-", _triple(peer and peer["summary"], 1, 2),
                         _ratio(ours["summary"], peer and peer["summary"])])
    return _md(["store", "greenleader", "s (median / p95 / max)", "bound s", "max within bound", "peer",
                "peer s (median / p95 / max)", "ratio median"], rows)


def _within(run: dict[str, Any]) -> str:
    if run.get("within_strict_bound"):
        return "yes"
    if run.get("within_bound"):
        return f"+{run['summary']['max'] - run['bound']:.2f} s (allowance {run.get('allowance', 0):g} s)"
    return "NO"


def followers_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        d = data[kind]
        if d.get("failure"):
            rows.append([kind, str(d["followers"]), str(d["changes"]), f"failed: {d['failure'][:120]}", "-", "-"])
            continue
        rows.append([kind, str(d["followers"]), str(d["changes"]), _triple(d["summary_elected"], 1000),
                     _triple(d["summary_release"], 1000), _f(d["summary_all_notified"]["p95"] * 1000)
                     if d.get("summary_all_notified") else "-"])
    return _md(["store", "followers", "changes", "elected -> notified, ms (median / p95 / max)",
                "release -> notified, ms (median / p95 / max)", "last follower p95, ms"], rows)


def cost_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        roles = data[kind]["roles"]
        for role in ("leader", "waiter", "follower"):
            r = roles.get(role)
            if not r:
                continue
            rows.append([kind, role, _f(r["requests_per_min"]), _f(r["cpu_s_per_hour"], 2),
                         _f(roles.get("baseline", {}).get("cpu_s_per_hour"), 2),
                         _f(r.get("process_pings_per_min"))])
    return _md(["store", "role (ttl 15 s)", "requests/min each", "CPU s/hour each", "idle process CPU s/hour",
                "pings/min per process"], rows)


def big_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        b = data[kind] if "cpu_percent" in data[kind] else data[kind].get("big")  # idle, or an older cost
        if not b:
            continue
        held = f"{b.get('held_start', b['n'])} -> {b.get('held_end', b['n'])}"
        rows.append([kind, str(b["n"]), _f(b["startup_s"]) if b["startup_s"] is not None else "never",
                     held, f"{b.get('stepdowns', 0)} / {b.get('errors', 0)}", _f(b["requests_per_min"], 0),
                     _f(b["cpu_percent"]), _f(b["cpu_s_per_hour"], 0),
                     f"{_f(b['rss_mb'], 0)} (+{_f(b['rss_mb'] - b['rss_base_mb'], 0)})",
                     _f(b.get("kb_per_candidate"), 1)])
    return _md(["store", "idle candidates (1 key each)", "all lead after s", "leading (window start -> end)",
                "step-downs / errors in window", "requests/min", "CPU %", "CPU s/hour", "RSS MB (+ for candidates)",
                "KB each"], rows)


def file_idle_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        d = data[kind]
        idle = d.get("idle", {})
        cells = [kind, str(d.get("participants", "-"))]
        for role in ("waiters", "followers"):
            r = idle.get(role, {})
            cells += [_f(r.get("cpu_s_per_hour_each"), 3), _f(r.get("flocks_per_min_each"), 1)]
        for figure in ("graceful_handover", "crash_failover"):
            f = d.get(figure) or {}
            cells.append(" / ".join(_f(f.get(k), 1) for k in ("median_ms", "p95_ms", "max_ms")) if f else "-")
        rows.append(cells)
    return _md(["store", "participants", "waiter CPU s/hour each", "waiter lock attempts/min each",
                "follower CPU s/hour each", "follower lock attempts/min each",
                "release -> win, ms (median / p95 / max)", "SIGKILL -> win, ms (median / p95 / max)"], rows)


def contention_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in _kinds(data):
        runs = data[kind]
        base = runs[0]["req_summary"]["median"] if runs and runs[0].get("req_summary", {}).get("n") else None
        for run in runs:
            req = run.get("req_summary") or {}
            growth = "-" if base is None or not req.get("n") else _f(ratio(req["median"], base), 2)
            handover = "never settled" if run.get("failure") else _triple(run["summary"], 1000)
            rows.append([kind, f"{run['candidates']} in {run['processes']}", handover,
                         _f(req.get("median")) if req.get("n") else "-", growth, str(run.get("errors", 0))])
    return _md(["store", "candidates in processes", "handover ms (median / p95 / max)", "requests per handover",
                "growth vs fewest", "store errors"], rows)


TABLES = {
    "handover": ("Graceful handover: holder's work ends -> next holder's work starts", handover_table),
    "failover": ("Crash failover: SIGKILL of the holder -> next holder's work starts", failover_table),
    "followers": ("Follower latency: change of leader -> followers in one process notified", followers_table),
    "cost": ("Cost at rest, per idle participant", cost_table),
    "idle": ("Idle candidates in one process", big_table),
    "fileidle": ("File store at rest and at a change, between processes (benchmarks/file_idle.py)",
                 file_idle_table),
    "contention": ("Contention: candidates on one key, resigning in turn", contention_table),
}


def goals_table(before: dict[str, Any] | None, after: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    """Issue 11's goals, before and after (benchmarks/goals.py); ``reference``: the run the
    issue quoted, in a column of its own."""
    from . import goals

    rows = goals.rows(before, after, reference)
    if not rows:
        return ""
    runs = [f"- before: {goals.describe(before)}", f"- after: {goals.describe(after)}"]
    if reference:
        runs.insert(0, f"- quoted by the issue: {goals.describe(reference)}")
    header = ["what was measured", "store", *(["quoted by the issue [commit]"] if reference else []),
              "before [commit]", "after [commit]", "goal", "met?"]
    return "\n".join(runs) + "\n\n" + _md(header, rows)


def _section(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The section a table reads: 1,000 idle candidates were once part of the cost section."""
    section = results["sections"].get(name)
    if name == "idle" and not section:
        cost = results["sections"].get("cost") or {}
        if any(d.get("big") for d in (cost.get("data") or {}).values()):
            return cost
    return section


def table(results: dict[str, Any], headings: bool = False, before: dict[str, Any] | None = None,
          reference: dict[str, Any] | None = None) -> str:
    """Every section's table; ``headings``: titles as Markdown headings (for the page);
    ``before``: a run on an earlier commit, for the table of issue 11's goals first
    (``reference``: the run the issue quoted, a column of that table)."""
    out = []
    env = results.get("environment", {})
    if env:
        out.append(f"greenleader {env.get('commit')} on {env.get('cpus')} CPUs, {env.get('date')}")
    if before is not None and (goals := goals_table(before, results, reference)):
        title = "Issue 11's goals, before and after, and issue 12's `greenleader run` handover"
        out.append(f"\n{'### ' if headings else ''}{title}\n\n{goals}")
    for name, (title, render) in TABLES.items():
        section = _section(results, name)
        if not section or not section.get("data"):
            continue
        data = section["data"]
        commits = sorted(set((section.get("commits") or {}).values()))
        at = f"at {', '.join(commits)}, " if commits else ""
        load = f"{at}load average {section.get('load_before')} -> {section.get('load_after')}"
        quick = ", QUICK RUN" if section.get("quick") else ""
        passes = f", {section['passes']} passes" if section.get("passes", 1) > 1 else ""
        out.append(f"\n{'### ' if headings else ''}{title}\n\n({load}{quick}{passes})\n\n{render(data)}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw every plot the results allow into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots as drawing

    made = []
    for name, draw in drawing.PLOTS.items():
        path = out / f"{name}.png"
        if draw(results["sections"], path):
            made.append(path)
    return made


# ---------------------------------------------------------------------------------------------
# the page


def page(results: dict[str, Any], path: Path, before: dict[str, Any] | None = None,
         reference: dict[str, Any] | None = None) -> None:
    template = (Path(__file__).parent / "page.md").read_text()
    env = results.get("environment", {})
    loads = {name: f"{s.get('load_before')} -> {s.get('load_after')}" for name, s in results["sections"].items()}
    text = template.replace("{{TABLES}}", table(results, headings=True, before=before, reference=reference))
    text = text.replace("{{ENVIRONMENT}}", json.dumps(env, indent=1))
    text = text.replace("{{LOADS}}", json.dumps(loads, indent=1))
    before_loads = {name: f"{s.get('load_before')} -> {s.get('load_after')}"
                    for name, s in (before or {}).get("sections", {}).items()}
    text = text.replace("{{BEFORE}}", json.dumps({"environment": (before or {}).get("environment"),
                                                   "load_average": before_loads}, indent=1))
    path.write_text(text)
