"""Consul test support for the contract suite (see tests/backends.py).

Stores are made with the default lock-delay (1 s), so the contract tests exercise what users
get; crash-failover bounds in the tests add it explicitly.
"""

from __future__ import annotations

import consul

from greenleader.stores.consul import ConsulStore
from tests.backends import BackendEnv
from tests.servers import closed_port

FAST_TTL = 10.0  # Consul's minimum session TTL


def make_store(env: BackendEnv) -> ConsulStore:
    return ConsulStore(env.cluster.addrs, timeout=5.0)


def consul_client(addr: str) -> consul.Consul:
    """A plain Consul client, independent of any store (for out-of-band checks)."""
    host, _, port = addr.rpartition(":")
    return consul.Consul(host=host, port=int(port))


def force_expire(store: ConsulStore, key: str) -> None:
    """Destroy the session that holds ``key``, through a client of its own."""
    client = consul_client(store.addrs[0])
    _, entry = client.kv.get(key)
    assert entry is not None and entry.get("Session"), f"nobody holds {key!r}"
    assert client.session.destroy(entry["Session"])



def unreachable_store(env: BackendEnv) -> ConsulStore:
    return ConsulStore([f"127.0.0.1:{closed_port()}"], timeout=0.5, retry_for=1.0)
