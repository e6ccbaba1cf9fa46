"""etcd test support for the contract suite (see tests/backends.py)."""

from __future__ import annotations

from greenleader.stores.etcd import EtcdStore
from tests.backends import BackendEnv
from tests.servers import closed_port

#: etcd leases have whole seconds and the test cluster's minimum lease TTL is 1 s
#: (1.5 x its 500 ms election timeout, rounded up); 2 s leaves the candidates' renew
#: deadline (2/3 of it) a margin of several renewals on a loaded CI machine.
FAST_TTL = 2.0


def make_store(env: BackendEnv) -> EtcdStore:
    return EtcdStore(env.cluster.addrs, timeout=5)


def force_expire(store: EtcdStore, key: str) -> None:
    """Revoke the leader's lease through a client of its own, as an expiry would end it."""
    admin = EtcdStore(store.addrs, timeout=5)
    try:
        prefix = (key + "/").encode()
        response = admin.client.range_prefix(prefix)
        held = [kv for kv in response.kvs if kv.key.startswith(prefix)]
        assert held, f"nobody holds {key!r}"
        admin.client.revoke(held[0].lease)  # sorted by create revision: the first one leads
    finally:
        admin.close()



def unreachable_store(env: BackendEnv) -> EtcdStore:
    return EtcdStore([f"127.0.0.1:{closed_port()}"], timeout=1)


def leftovers(env: BackendEnv, key: str) -> list[str]:
    """Every etcd key at or under ``key`` (candidate keys live under ``key/``)."""
    store = EtcdStore(env.cluster.addrs, timeout=5)
    try:
        response = store.client.range_prefix(key.encode())
        return [kv.key.decode() for kv in response.kvs]
    finally:
        store.close()
