"""The PNG plots of docs/benchmarks/ (matplotlib, Agg backend; the ``bench`` extra)."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from .common import KINDS

OURS, PEER = "#2a7ab0", "#d9822b"
COLORS = {"file": "#7f7f7f", "consul": "#c2185b", "etcd": "#2e7d32", "zookeeper": "#6a1b9a"}


def _kinds(data: dict[str, Any]) -> list[str]:
    return [k for k in KINDS if k in data]


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _strips(ax: Any, groups: list[tuple[str, list[float], bool]], unit: str, bounds: list[float | None] | None = None
            ) -> None:
    """Each group's samples as jittered dots with a median bar; optional bound lines."""
    rng = random.Random(1)
    for x, (_label, values, peer) in enumerate(groups):
        color = PEER if peer else OURS
        ax.scatter([x + rng.uniform(-0.15, 0.15) for _ in values], values, s=12, alpha=0.7, color=color)
        if values:
            median = sorted(values)[len(values) // 2]
            ax.hlines(median, x - 0.3, x + 0.3, color="black", linewidth=2)
        if bounds and bounds[x] is not None:
            ax.hlines(bounds[x], x - 0.4, x + 0.4, color="red", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([textwrap.fill(g[0], 13) for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)


def handover(sections: dict[str, Any], path: Path) -> bool:
    data = sections.get("handover", {}).get("data")
    if not data:
        return False
    kinds = _kinds(data)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        _strips(ax, [(r["label"], [v * 1000 for v in r["samples"]], r["peer"]) for r in data[kind]], "ms")
        ax.set_title(kind)
    fig.suptitle("Graceful handover (dots: trials, bar: median)", fontsize=10)
    return _save(fig, path)


def failover(sections: dict[str, Any], path: Path) -> bool:
    data = sections.get("failover", {}).get("data")
    if not data:
        return False
    kinds = _kinds(data)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        runs = data[kind]
        _strips(ax, [(r["label"], r["samples"], r["peer"]) for r in runs], "s", [r.get("bound") for r in runs])
        ax.set_title(kind)
    fig.suptitle("Crash failover after SIGKILL (red dashes: the bound of docs/safety.md rule 4)", fontsize=10)
    return _save(fig, path)


def leadership(sections: dict[str, Any], path: Path) -> bool:
    """Who leads when, in the failover runs: the holder until its kill, the gap, the successor."""
    data = sections.get("failover", {}).get("data")
    if not data:
        return False
    kinds = _kinds(data)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 1.2 + 0.9 * len(kinds) * 2), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        lane, labels = 0, []
        for run in data[kind]:
            for _holder, start, killed, successor in run["tenures"]:
                color = PEER if run["peer"] else OURS
                ax.broken_barh([(start, killed - start)], (lane - 0.35, 0.7), color=color, alpha=0.6)
                ax.broken_barh([(killed, successor - killed)], (lane - 0.35, 0.7), color="red", alpha=0.35)
                ax.broken_barh([(successor, 2.0)], (lane - 0.35, 0.7), color=color)
                labels.append(run["label"])
                lane += 1
        ax.set_yticks(range(lane))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_title(f"{kind}: leader over time (red: no leader after the SIGKILL)", fontsize=9)
        ax.set_xlabel("s since the run began")
    return _save(fig, path)


def followers(sections: dict[str, Any], path: Path) -> bool:
    data = sections.get("followers", {}).get("data")
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind in _kinds(data):
        values = sorted(v * 1000 for v in data[kind].get("from_elected", []))
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=kind, color=COLORS[kind])
    ax.axhline(0.95, color="grey", linestyle="dotted", linewidth=1)
    ax.set_xlabel("ms from the new leader's win to a follower's notification")
    ax.set_ylabel("fraction of notifications")
    ax.set_title(f"Follower latency ({next(iter(data.values()))['followers']} followers in one process)",
                 fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def cost(sections: dict[str, Any], path: Path) -> bool:
    data = sections.get("cost", {}).get("data")
    if not data:
        return False
    kinds = _kinds(data)
    roles = ["leader", "waiter", "follower"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(roles)
    for ax, metric, title in ((axes[0], "requests_per_min", "store requests / minute"),
                              (axes[1], "cpu_s_per_hour", "CPU seconds / hour")):
        for i, role in enumerate(roles):
            values = [max(0.0, data[k]["roles"].get(role, {}).get(metric, 0.0)) for k in kinds]
            ax.bar([x + i * width for x in range(len(kinds))], values, width, label=role)
        ax.set_xticks([x + width for x in range(len(kinds))])
        ax.set_xticklabels(kinds)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"{title}, per idle participant (ttl 15 s)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def contention(sections: dict[str, Any], path: Path) -> bool:
    data = sections.get("contention", {}).get("data")
    if not data:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in _kinds(data):
        runs = data[kind]
        sizes = [r["candidates"] for r in runs]
        axes[0].plot(sizes, [r["summary"]["median"] * 1000 for r in runs], marker="o", label=kind, color=COLORS[kind])
        if runs and runs[0].get("req_summary", {}).get("n"):
            axes[1].plot(sizes, [max(1.0, r["req_summary"]["median"]) for r in runs], marker="o", label=kind,
                         color=COLORS[kind])
    axes[0].set_title("median handover (release -> next win), ms", fontsize=9)
    axes[1].set_title("store requests per handover (median)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("candidates on the key")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    return _save(fig, path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], bool]] = {
    "handover": handover, "failover": failover, "leadership": leadership, "followers": followers,
    "cost": cost, "contention": contention,
}
