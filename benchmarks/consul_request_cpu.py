"""CPU per Consul request: greenleader's client against py-consul's own (requests) client.

    python -m benchmarks.consul_request_cpu [--requests 500] [--pause 0.3 --requests 40]

On a single-node Consul agent started for the run (tests/servers.py), one greenlet sends
``--requests`` requests of each kind in turn, and the process's CPU time (user + system) is
divided by the count: a key read, a session renewal, the win's lock transaction, a release.
py-consul's std client (``consul.Consul``, over requests) reads the same key for comparison.
Prints one JSON document (milliseconds of CPU per request; the least of ``--repeat`` runs).
With ``--pause``, each request follows a sleep of that many seconds (a waiter's request comes
after such a pause, with caches gone cold), and the figure is the median of the requests' CPU.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import consul  # noqa: E402
import gevent  # noqa: E402

from greenleader.stores.consul.client import ConsulClient  # noqa: E402
from tests import servers  # noqa: E402


def _cpu() -> float:
    return time.process_time()  # user + system, at the clock's resolution (os.times: 10 ms ticks)


def per_request(send: Callable[[], object], count: int, repeat: int) -> float:
    """The least, over ``repeat`` runs, of the CPU milliseconds per call of ``send`` (the run
    least disturbed by the rest of a loaded machine)."""
    send()  # connect first
    runs = []
    for _ in range(repeat):
        started = _cpu()
        for _ in range(count):
            send()
        runs.append((_cpu() - started) / count * 1000)
    return round(min(runs), 3)


def after_pause(send: Callable[[], object], count: int, pause: float) -> float:
    """The median CPU milliseconds of ``count`` calls of ``send``, each after ``pause`` seconds."""
    send()
    costs = []
    for _ in range(count):
        gevent.sleep(pause)
        started = _cpu()
        send()
        costs.append((_cpu() - started) * 1000)
    return round(statistics.median(costs), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of sleep before each request")
    args = parser.parse_args()

    def measure(send: Callable[[], object]) -> float:
        if args.pause:
            return after_pause(send, args.requests, args.pause)
        return per_request(send, args.requests, args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        cluster = servers.start("consul", Path(tmp), 1)
        try:
            addr = cluster.addrs[0]
            client = ConsulClient([addr], scheme="http", dc=None, timeout=5.0, token=None, token_source=None,
                                  verify=True, cert=None)
            key = f"bench/cpu-{uuid.uuid4().hex[:8]}"
            session = client.create_session("bench", 30, 1)
            client.lock(key, "n", session)
            host, port = addr.rsplit(":", 1)
            std = consul.Consul(host=host, port=int(port))
            result = {
                "load": os.getloadavg()[0],
                "pause": args.pause,
                "greenleader_get": measure(lambda: client.get(key)),
                "greenleader_renew": measure(lambda: client.renew_session(session)),
                "greenleader_lock": measure(lambda: client.lock(key, "n", session)),
                "greenleader_release": measure(lambda: client.release(key, session)),
                "py_consul_std_get": measure(lambda: std.kv.get(key)),
            }
            client.destroy_session(session)
            client.close()
            print(json.dumps(result, indent=1))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
