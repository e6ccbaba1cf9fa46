"""The CPU one lease keepalive costs this process, by the ways gRPC Python can send it.

    python -m benchmarks.etcd_keepalive_cost [--leases 250] [--url etcd://...]

Starts a single etcd member (tests/servers.py) unless ``--url`` is given, grants ``--leases``
leases, and renews each of them, several times over, in three ways:

- ``unary``: one unary ``LeaseKeepAlive`` call per lease, as the store sends it;
- ``stream``: one streaming ``LeaseKeepAlive`` call carrying a request per lease, half-closed
  after the last (what gathering renewals into rounds would send);
- ``thread``: unary calls made one after another in one OS thread of gevent's threadpool, so
  that gRPC's waits do not hop to that pool and back for each call.

Prints each way's CPU per lease (this process's, all threads) and wall time per lease. It says
whether gathering renewals could cut the cost of 1,000 idle leaders (docs/stores/etcd.md).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gevent

from greenleader.stores import from_url
from greenleader.stores.etcd.client import etcdrpc

METHOD = "/etcdserverpb.Lease/LeaseKeepAlive"
ROUNDS = 3  # each way renews every lease this many times; the median round is printed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leases", type=int, default=250)
    parser.add_argument("--url")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from tests import servers
        cluster = servers.start("etcd", tempfile.mkdtemp(prefix="etcd-keepalive-"))
        url = cluster.url
    store = from_url(url)
    client = store.client
    leases = [(0x7EA5E << 20) + n for n in range(args.leases)]
    for lease_id in leases:
        client.grant(60, lease_id)
    library = client.library()
    options = {"metadata": library.metadata}
    serialize = etcdrpc.LeaseKeepAliveRequest.SerializeToString
    deserialize = etcdrpc.LeaseKeepAliveResponse.FromString
    unary = library.channel.unary_unary(METHOD, request_serializer=serialize, response_deserializer=deserialize)
    stream = library.channel.stream_stream(METHOD, request_serializer=serialize, response_deserializer=deserialize)

    def one_by_one() -> list[int]:
        return [unary(etcdrpc.LeaseKeepAliveRequest(ID=lease_id), 10.0, **options).TTL for lease_id in leases]

    def streamed() -> list[int]:
        requests = iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id) for lease_id in leases])
        return [response.TTL for response in stream(requests, 10.0, **options)]

    def in_thread() -> list[int]:
        return gevent.get_hub().threadpool.apply(one_by_one)

    ways: dict[str, Callable[[], Any]] = {"unary": one_by_one, "stream": streamed, "thread": in_thread}
    for name, way in ways.items():
        figures = []
        for _ in range(ROUNDS):
            cpu, wall = time.process_time(), time.monotonic()
            ttls = way()
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            if len(ttls) != len(leases) or min(ttls) <= 0:
                raise SystemExit(f"{name}: {len(ttls)} answers for {len(leases)} leases, some gone")
            figures.append((cpu / len(leases), wall / len(leases)))
        cpu, wall = sorted(figures)[len(figures) // 2]
        print(f"{name:6}: {cpu * 1000:.3f} ms of CPU and {wall * 1000:.3f} ms of wall time per lease", flush=True)
    for lease_id in leases:
        client.revoke(lease_id)
    store.close()
    if cluster is not None:
        cluster.stop()


if __name__ == "__main__":
    main()
