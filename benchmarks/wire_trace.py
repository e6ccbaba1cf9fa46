"""Where a handover's time goes on the wire: the handover benchmark under ``tcpdump``.

    python -m benchmarks.wire_trace [--kind etcd] [--trials 15] [--passes 1]

Runs :mod:`benchmarks.handover`'s handover section for one store (every runner, the peer's
too) while ``tcpdump`` records the loopback's packets that carry data to or from the store's
client port, then splits each handover at two packets: the release (the first request on the
wire after the holder's child's ``end`` line) and the wake-up (the store's first message after
it on another connection: the event that wakes the successor). Prints, per runner, the median
of each segment in ms: child's end -> release, release -> wake-up, wake-up -> next child's
start. The split is a heuristic that holds on an otherwise quiet store (a renewal sent in the
window would pass for the release); it was written for etcd, where each segment was checked by
hand against the packets. Needs ``tcpdump`` and the right to capture (root).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

#: Seconds tcpdump may take to start capturing (it prints "listening on" first).
_CAPTURE_START = 10.0
#: Fewest payload bytes of a packet that counts as a request or an event: HTTP/2's control
#: frames (a SETTINGS ack, a WINDOW_UPDATE, a PING) and ZooKeeper's pings are shorter.
_MESSAGE_BYTES = 40
_PACKET = re.compile(r"(\d+\.\d+) IP6? [\d.:a-f]+?\.(\d+) > [\d.:a-f]+?\.(\d+): .*length (\d+)")


def _capture(port: int, out: Path) -> subprocess.Popen[bytes]:
    """Start tcpdump on the loopback for data-carrying packets of ``port`` (epoch timestamps)."""
    if shutil.which("tcpdump") is None:
        sys.exit("benchmarks.wire_trace needs tcpdump (apt-get install tcpdump)")
    errors = out.with_suffix(".err")
    proc = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-n", "-tt", "-l", f"tcp port {port} and (tcp[tcpflags] & tcp-push != 0)"],
        stdout=out.open("wb"), stderr=errors.open("wb"))
    deadline = time.monotonic() + _CAPTURE_START
    while "listening on" not in errors.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"tcpdump did not start: {errors.read_text(errors='replace').strip()}")
        time.sleep(0.05)
    return proc


def _packets(path: Path, port: int) -> list[tuple[float, int, int, int]]:
    """(time, source port, destination port, payload length) of each packet captured."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        match = _PACKET.match(line)
        if match and int(match[4]) >= _MESSAGE_BYTES:
            found.append((float(match[1]), int(match[2]), int(match[3]), int(match[4])))
    return [p for p in found if port in (p[1], p[2])]


def segments(events: list[tuple[float, str, str]], packets: list[tuple[float, int, int, int]],
             port: int) -> dict[str, dict[str, list[float]]]:
    """For each handover (an ``end`` line, then the next ``start``): the three segments in ms,
    keyed by the runner's part of the contenders' names (see :func:`benchmarks.handover.handover`)."""
    out: dict[str, dict[str, list[float]]] = {}
    for index, (ended, word, ident) in enumerate(events):
        if word != "end":
            continue
        started = next((t for t, w, _ in events[index + 1:] if w == "start"), None)
        if started is None:
            continue
        window = [p for p in packets if ended <= p[0] <= started]
        release = next((p for p in window if p[2] == port), None)
        if release is None:
            continue
        wake = next((p for p in window if p[1] == port and p[0] >= release[0] and p[2] != release[1]), None)
        if wake is None:
            continue
        runner = ident.split("-")[2] if ident.count("-") >= 3 else ident
        steps = out.setdefault(runner, {})
        for name, value in (("child's end -> release", release[0] - ended),
                            ("release -> wake-up", wake[0] - release[0]),
                            ("wake-up -> next child's start", started - wake[0]),
                            ("handover", started - ended)):
            steps.setdefault(name, []).append(value * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wire_trace", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="etcd", choices=("consul", "etcd", "zookeeper"))
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()

    import benchmarks.handover as handover
    from benchmarks.cli import _interleaved_handover
    from benchmarks.common import Config, Stores

    events: list[tuple[float, str, str]] = []

    class Recorded(list):  # type: ignore[type-arg]
        def append(self, event: Any) -> None:
            events.append((event.t, event.word, event.ident))
            super().append(event)

    made = handover.EventPipe.__init__

    def recording(self: Any, path: Path) -> None:
        made(self, path)
        self.events = Recorded()

    handover.EventPipe.__init__ = recording  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="greenleader-wire-") as tmp:
        workdir = Path(tmp)
        stores = Stores(workdir)
        try:
            port = int(stores.addr(args.kind).rsplit(":", 1)[1])
            capture = _capture(port, workdir / "packets.txt")
            try:
                config = Config(kinds=[args.kind], handover_trials=args.trials)
                _interleaved_handover(config, stores, workdir / "handover", max(1, args.passes))
            finally:
                capture.terminate()
                capture.wait()
            found = segments(events, _packets(workdir / "packets.txt", port), port)
        finally:
            stores.close()
    labels = {re.sub(r"[^a-z]+", "", runner.label.lower())[:12]: runner.label
              for runner in handover.handover_runners(args.kind)}
    print(f"{args.kind}, ms, median (n):")
    for runner, steps in found.items():
        runner = labels.get(runner, runner)
        line = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in steps.items())
        print(f"  {runner}: {line} (n={len(next(iter(steps.values())))})")


if __name__ == "__main__":
    main()
