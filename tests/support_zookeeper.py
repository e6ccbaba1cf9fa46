"""ZooKeeper support for the contract tests (see tests/backends.py), plus helpers that act
on the server from outside a store, as an operator or another process would."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from kazoo.client import KazooClient
from kazoo.handlers.gevent import SequentialGeventHandler

from greenleader.stores.zookeeper import ZooKeeperStore
from tests.backends import BackendEnv
from tests.servers import closed_port

# The fixture servers run with tickTime=200 ms, so they grant session timeouts of 0.4 s to
# 60 s. kazoo pings every third of the session timeout and drops a connection after two
# thirds of it without an answer: at 1 s that is a ping every ~0.33 s and 0.67 s of slack,
# which held in repeated runs of the contract, hygiene, process and store tests on a 2-core
# machine at load average 4-6 (test_blocked_hub's 0.45 s hub block included). Below that
# the slack shrinks to a couple of ticks.
FAST_TTL = 1.0

_CONTENDER_RE = re.compile(r"__lock__(-?\d{10})$")
_TWIN_RE = re.compile(r"__live__$")  # the ephemeral twin beside each contender's node


def make_store(env: BackendEnv) -> ZooKeeperStore:
    return ZooKeeperStore(env.cluster.addrs, timeout=5.0)


@contextlib.contextmanager
def admin_client(hosts: str | list[str], timeout: float = 10.0) -> Iterator[KazooClient]:
    """A separate kazoo client (its own session), stopped on exit."""
    if isinstance(hosts, list):
        hosts = ",".join(hosts)
    client = KazooClient(hosts=hosts, timeout=timeout, handler=SequentialGeventHandler())
    client.start(timeout=timeout)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def contenders(client: KazooClient, path: str) -> list[str]:
    """Contender node names under ``path``, lowest sequence (the leader) first."""
    children = client.get_children(path) if client.exists(path) else []
    found = [(int(m.group(1)), c) for c in children if (m := _CONTENDER_RE.search(c))]
    return [name for _, name in sorted(found)]


def force_expire(store: ZooKeeperStore, key: str) -> None:
    """Delete the holder's ephemeral node from another session: what a session expiry does
    to it, and how an operator evicts a ZooKeeper lock holder."""
    path = store.path_for(key)
    with admin_client(store.hosts) as client:
        queue = contenders(client, path)
        assert queue, f"nobody holds {key!r} ({path} has no contender node)"
        client.delete(f"{path}/{queue[0]}")


def expire_sessions(store: ZooKeeperStore) -> list[int]:
    """Expire every session of ``store`` for real, the way kazoo's own tests do it: another
    client attaches to the same session (same id and password) and closes it, so the server
    ends the session and deletes its ephemeral nodes; the store's client then finds its
    session expired when it reconnects. Returns the session ids."""
    expired = []
    for session in list(store._sessions.values()):
        client_id = session.client.client_id
        if client_id is None:
            continue
        twin = KazooClient(
            hosts=store.hosts, client_id=client_id, timeout=session.requested_ms / 1000,
            handler=SequentialGeventHandler(),
        )
        twin.start(timeout=10)
        twin.stop()
        twin.close()
        expired.append(client_id[0])
    return expired



def unreachable_store(env: BackendEnv) -> ZooKeeperStore:
    return ZooKeeperStore([f"127.0.0.1:{closed_port()}"], timeout=1.0)


def leftovers(env: BackendEnv, key: str) -> list[str]:
    """Every contender node left anywhere under ``key`` (empty persistent parents are fine)."""
    root = ZooKeeperStore(env.cluster.addrs).path_for(key)
    found: list[str] = []
    with admin_client(env.cluster.addrs) as client:
        pending = [root]
        while pending:
            path = pending.pop()
            if not client.exists(path):
                continue
            for child in client.get_children(path):
                (found if _CONTENDER_RE.search(child) or _TWIN_RE.search(child) else pending).append(f"{path}/{child}")
    return found
