"""What one unary etcd request costs this process under gevent, blocking call against future.

    python -m benchmarks.etcd_call_cost [--calls 80]

Sends a one-put transaction through the store's gRPC channel, one call at a time, and prints
the median of: how long the calling greenlet keeps the hub before it first switches out (no
other greenlet runs meanwhile), the round trip, and the main thread's CPU per call. Under
gevent, gRPC waits for each call's completion in gevent's threadpool, so a call costs thread
hand-offs as well as gRPC's own Python. Starts a single etcd member (tests/servers.py).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import statistics
import tempfile
import time

import gevent
import greenlet

from greenleader.stores import from_url
from greenleader.stores.etcd.client import etcdrpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=80)
    args = parser.parse_args()
    from tests import servers

    cluster = servers.start("etcd", tempfile.mkdtemp(prefix="etcd-call-cost-"))
    store = from_url(cluster.url)
    library = store.client.library()
    put = etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=b"x", value=b"y"))])
    caller = gevent.getcurrent()
    try:
        for mode in ("blocking", "future", "blocking", "future"):
            held, trips, cpus = [], [], []
            for i in range(args.calls + 10):
                switched: list[float] = []

                def trace(event: str, between: tuple[object, object], switched: list[float] = switched) -> None:
                    if event in ("switch", "throw") and between[0] is caller and not switched:
                        switched.append(time.perf_counter())

                greenlet.settrace(trace)
                started, cpu = time.perf_counter(), time.thread_time()
                if mode == "blocking":
                    library.kvstub.Txn(put, 5)
                else:
                    future = library.kvstub.Txn.future(put, 5)
                    if not switched:
                        switched.append(time.perf_counter())
                    future.result()
                ended, cpu = time.perf_counter(), time.thread_time() - cpu
                greenlet.settrace(None)
                if i >= 10:  # the first calls warm the channel up
                    held.append((switched[0] - started) * 1000)
                    trips.append((ended - started) * 1000)
                    cpus.append(cpu * 1000)
                gevent.sleep(0.01)
            print(f"{mode:>8}: caller holds the hub {statistics.median(held):.2f} ms, round trip "
                  f"{statistics.median(trips):.2f} ms, main thread CPU {statistics.median(cpus):.2f} ms (medians)")
    finally:
        store.close()
        cluster.stop()


if __name__ == "__main__":
    main()
