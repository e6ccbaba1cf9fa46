"""Pytest fixtures with real servers; load with ``pytest_plugins = ["tests.server_fixtures"]``.

``consul_cluster``, ``etcd_cluster``, ``zookeeper_cluster``, ``postgres_cluster``: one node each, shared by the
whole session and started on first use. ``consul_cluster3``, ``etcd_cluster3``,
``zookeeper_cluster3``: fresh 3-node clusters for one test. A missing server binary fails the
test (it never skips): install the servers with ``scripts/install-servers.sh``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers
from tests.certs import Certs, make_certs


def _cluster(kind: str, workdir: Path, nodes: int) -> Iterator[servers.Cluster]:
    try:
        cluster = servers.start(kind, workdir, nodes)
    except servers.ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def consul_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Cluster]:
    """One Consul dev agent for the session (in memory: a restart loses its data)."""
    yield from _cluster("consul", tmp_path_factory.mktemp("consul"), 1)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Cluster]:
    """One etcd member for the session."""
    yield from _cluster("etcd", tmp_path_factory.mktemp("etcd"), 1)


@pytest.fixture(scope="session")
def zookeeper_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Cluster]:
    """One standalone ZooKeeper server for the session."""
    yield from _cluster("zookeeper", tmp_path_factory.mktemp("zookeeper"), 1)


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Cluster]:
    """One PostgreSQL server for the session (run as ``nobody`` when the tests run as root)."""
    yield from _cluster("postgres", tmp_path_factory.mktemp("postgres"), 1)


@pytest.fixture
def consul_cluster3(tmp_path: Path) -> Iterator[servers.Cluster]:
    """A fresh 3-server Consul cluster for this test."""
    yield from _cluster("consul", tmp_path, 3)


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[servers.Cluster]:
    """A fresh 3-member etcd cluster for this test."""
    yield from _cluster("etcd", tmp_path, 3)


@pytest.fixture
def zookeeper_cluster3(tmp_path: Path) -> Iterator[servers.Cluster]:
    """A fresh 3-peer ZooKeeper ensemble for this test."""
    yield from _cluster("zookeeper", tmp_path, 3)


# -- secure servers (TLS and access control; tests/test_security.py) ------------------------------


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, server and client certificates (and untrusted ones) in a temporary directory."""
    return make_certs(tmp_path_factory.mktemp("certs"))


def _secure(kind: str, workdir: Path, certs: Certs, **options: object) -> Iterator[servers.Cluster]:
    try:
        cluster = servers.start_secure(kind, workdir, certs, **options)
    except servers.ServerBinaryMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def consul_secure(tmp_path_factory: pytest.TempPathFactory, tls_certs: Certs) -> Iterator[servers.Cluster]:
    """One Consul agent for the session: HTTPS only with client certificates, ACLs default deny."""
    yield from _secure("consul", tmp_path_factory.mktemp("consul-secure"), tls_certs)


@pytest.fixture(scope="session")
def etcd_secure(tmp_path_factory: pytest.TempPathFactory, tls_certs: Certs) -> Iterator[servers.Cluster]:
    """One etcd member for the session: TLS with --client-cert-auth, authentication enabled."""
    yield from _secure("etcd", tmp_path_factory.mktemp("etcd-secure"), tls_certs)


@pytest.fixture(scope="session")
def zookeeper_secure(tmp_path_factory: pytest.TempPathFactory, tls_certs: Certs) -> Iterator[servers.Cluster]:
    """One ZooKeeper server for the session, on a TLS port only, with a super digest user."""
    yield from _secure("zookeeper", tmp_path_factory.mktemp("zookeeper-secure"), tls_certs)


@pytest.fixture(scope="session")
def postgres_secure(tmp_path_factory: pytest.TempPathFactory, tls_certs: Certs) -> Iterator[servers.Cluster]:
    """One PostgreSQL server for the session: TLS only, SCRAM passwords, a client certificate
    required of role ``greenleader``."""
    yield from _secure("postgres", tmp_path_factory.mktemp("postgres-secure"), tls_certs)
