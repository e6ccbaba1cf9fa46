"""Self-test of tests/servers.py against the real servers, using raw protocol calls."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests import servers

KINDS = ["consul", "etcd", "zookeeper"]
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None) -> bytes:
    with _opener.open(urllib.request.Request(url, data=body, method=method), timeout=5) as resp:
        return resp.read()


def _zk(addr: str, word: str) -> str:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(word.encode())
        return b"".join(iter(lambda: sock.recv(4096), b"")).decode()


def serves(kind: str, addr: str) -> bool:
    """One raw client call through ``addr`` that needs a working store."""
    if kind == "consul":
        _http("PUT", f"http://{addr}/v1/kv/servers-selftest", b"hello")
        (entry,) = json.loads(_http("GET", f"http://{addr}/v1/kv/servers-selftest"))
        return json.loads(_http("GET", f"http://{addr}/v1/status/leader")) != "" and entry["Value"]
    if kind == "etcd":
        return json.loads(_http("GET", f"http://{addr}/health")) == {"health": "true"}
    return _zk(addr, "ruok") == "imok" and "Mode: " in _zk(addr, "srvr")


def claims_leadership(kind: str, node: servers.Node) -> bool:
    """Whether ``node`` itself says it is the consensus leader."""
    addr = node.client_addr
    if kind == "consul":
        return json.loads(_http("GET", f"http://{addr}/v1/agent/self"))["Stats"]["raft"]["state"] == "Leader"
    if kind == "etcd":
        status = json.loads(_http("POST", f"http://{addr}/v3/maintenance/status", b"{}"))
        return status["leader"] == status["header"]["member_id"]
    return "Mode: leader" in _zk(addr, "srvr")


def test_missing_binary_names_install_script() -> None:
    with pytest.raises(servers.ServerBinaryMissing, match=r"scripts/install-servers\.sh"):
        servers._require("greenleader-no-such-server")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_single_node_stop_and_restart(kind: str, tmp_path) -> None:
    cluster = servers.start(kind, tmp_path)
    try:
        (node,) = cluster.nodes
        addr = node.client_addr
        assert cluster.addrs == [addr]
        assert cluster.url == f"{kind}://{addr}"
        assert cluster.leader_node() is node
        assert node.is_running() and node.pid
        assert serves(kind, addr)

        node.stop()
        assert not node.is_running() and node.pid is None
        with pytest.raises(OSError):
            serves(kind, addr)

        node.start()
        assert node.client_addr == addr
        assert serves(kind, addr)
        assert node.log_path.stat().st_size > 0
    finally:
        cluster.stop()
    assert not node.is_running()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_session_cluster_fixture(kind: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue(f"{kind}_cluster")
    assert cluster.kind == kind and len(cluster.nodes) == 1
    assert serves(kind, cluster.addrs[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_three_nodes_survive_losing_a_follower_then_the_leader(kind: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue(f"{kind}_cluster3")
    assert len(cluster.nodes) == 3 and len(set(cluster.addrs)) == 3
    assert cluster.url == f"{kind}://" + ",".join(cluster.addrs)

    leader = cluster.leader_node()
    assert [n for n in cluster.nodes if claims_leadership(kind, n)] == [leader]
    assert all(serves(kind, addr) for addr in cluster.addrs)

    follower = next(n for n in cluster.nodes if n is not leader)
    follower.kill()
    assert not follower.is_running()
    cluster.wait_ready()
    assert cluster.leader_node().is_running()
    assert all(serves(kind, n.client_addr) for n in cluster.running())

    follower.start()  # back with the same ports and data, so the quorum is 3 again
    cluster.wait_ready()

    old_leader = cluster.leader_node()
    old_leader.kill()
    cluster.wait_ready()
    new_leader = cluster.leader_node()
    assert new_leader is not old_leader and new_leader.is_running()
    survivors = cluster.running()
    assert len(survivors) == 2
    assert [n for n in survivors if claims_leadership(kind, n)] == [new_leader]
    assert all(serves(kind, n.client_addr) for n in survivors)
