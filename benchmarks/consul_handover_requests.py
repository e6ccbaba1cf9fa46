"""A handover's requests as the Consul agent saw them: greenleader's library beside ``consul lock``.

    python -m benchmarks.consul_handover_requests [--handovers 8] [--runner library|peer|both]

Runs the handover benchmark (:func:`benchmarks.handover.handover`: three contenders on one key,
the holder's child ends, the next child starts) on a single-node agent logging at DEBUG, which
logs every HTTP request it finished with its latency. Each handover is split on the wall clock
(the children's ``$EPOCHREALTIME`` and the agent's log, to the millisecond) into: the holder's
child ending -> its release answered; the release -> the winner's lock answered (the waiters'
blocking queries return, the lock goes out); the lock -> the next child starting (stepping up
and spawning it). Prints the medians of each part, and the requests of the second handover
in the agent's order (its log has millisecond timestamps).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks import handover as h  # noqa: E402
from benchmarks.common import Config, Stores  # noqa: E402
from tests import servers  # noqa: E402

_FINISHED = re.compile(r"^\s*(\S+) \[DEBUG\] agent\.http: Request finished: method=(\w+) url=(\S+) "
                       r"from=\S+:(\d+) latency=(\S+)")
_SESSION = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}")


def _debug_agents() -> None:
    """Start the benchmark's Consul agent at log level DEBUG (it logs each request it serves)."""
    argv = servers.ConsulCluster._argv

    def debug_argv(self: servers.ConsulCluster, node: servers.Node) -> list[str]:
        args = argv(self, node)
        args[args.index("-log-level") + 1] = "debug"
        return args

    servers.ConsulCluster._argv = debug_argv  # type: ignore[method-assign]


def _requests(log: Path) -> list[tuple[float, str, str, str, str]]:
    """``(time, method, url, client port, latency)`` of each request the agent finished."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = _FINISHED.search(line)
        if match and "/v1/status/" not in match.group(3) and "/v1/session/list" not in match.group(3):
            when = datetime.datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
            found.append((when, *match.group(2, 3, 4, 5)))
    return found


def _kind(url: str) -> str | None:
    if "release=" in url:
        return "release"
    if "acquire=" in url or url.startswith("/v1/txn"):
        return "lock"
    return None


def run(runner: h.Runner, handovers: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="greenleader-requests-"))
    stores = Stores(workdir)
    ctx = h.Ctx(Config(kinds=["consul"]), stores, workdir / "handover")
    try:
        samples = h.handover(ctx, runner, handovers)["samples"]
        events = list(ctx.pipe.events)
        log = stores.clusters["consul"].nodes[0].log_path
        requests = _requests(log)
    finally:
        ctx.close()
        stores.close()
        shutil.rmtree(workdir, ignore_errors=True)
    parts: list[tuple[float, float, float]] = []
    shown: list[str] = []
    for end in (e for e in events if e.word == "end"):
        start = next((e for e in events if e.word == "start" and e.index > end.index), None)
        release = next((r for r in requests if _kind(r[2]) == "release" and r[0] >= end.t - 0.001), None)
        if start is None or release is None:
            continue
        lock = next((r for r in requests if _kind(r[2]) == "lock" and r[0] >= release[0]), None)
        if lock is None:
            continue
        parts.append((release[0] - end.t, lock[0] - release[0], start.t - lock[0]))
        if len(parts) == 2:  # the second handover: settled, and not the last (the field's end follows it)
            shown = [f"{(t - end.t) * 1000:+7.1f} ms  {method:6s} {_SESSION.sub('<session>', url)[:90]}"
                     f"  (client :{port}, {latency})"
                     for t, method, url, port, latency in requests if end.t - 0.001 <= t <= start.t + 0.06]
    names = ("child end -> release answered", "release -> lock answered", "lock answered -> next child starts")
    return {
        "runner": runner.label,
        "handover ms (median, max)": [round(statistics.median(samples) * 1000, 1), round(max(samples) * 1000, 1)],
        "median ms of each part": {name: round(statistics.median(p[i] for p in parts) * 1000, 1)
                                   for i, name in enumerate(names)} if parts else {},
        "requests of the second handover (agent's clock, to the ms, from the child's end)": shown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consul_handover_requests",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--handovers", type=int, default=8)
    parser.add_argument("--runner", choices=("library", "peer", "both"), default="both")
    args = parser.parse_args()
    _debug_agents()
    runners: list[h.Runner] = []
    if args.runner in ("library", "both"):
        runners.append(h.LibraryRunner("greenleader library", "consul", ttl=15.0))
    if args.runner in ("peer", "both"):
        runners.append(h.ConsulLock("consul lock", "consul", ttl=h.CONSUL_LOCK_TTL, peer=True))
    for runner in runners:
        result = run(runner, args.handovers)
        print(f"== {result.pop('runner')} (load {os.getloadavg()[0]:.1f})")
        for name, value in result.items():
            if isinstance(value, list) and value and isinstance(value[0], str):
                print(f"{name}:")
                print("\n".join(f"  {line}" for line in value))
            else:
                print(f"{name}: {value}")


if __name__ == "__main__":
    main()
