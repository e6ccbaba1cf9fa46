"""TLS, authentication, least privilege and secrecy, against real servers configured for them.

The servers (tests.servers.start_secure): Consul serving HTTPS only, with client certificates
required and ACLs on (default deny); etcd with client TLS, --client-cert-auth and
authentication enabled; ZooKeeper on a secure client port only (client certificates required),
with digest authentication. Certificates come from tests/certs.py. Each test provisions, as
an administrator would, exactly the access docs/security.md tells users to grant, and checks
that a client with it works and that one without it gets a PermissionDeniedError, at once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import gevent
import gevent.queue
import pytest
import zope.event
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.handlers.gevent import SequentialGeventHandler
from kazoo.security import OPEN_ACL_UNSAFE, READ_ACL_UNSAFE, make_digest_acl

from greenleader import Backoff, Candidate, Follower
from greenleader.errors import (
    GreenleaderError,
    InvalidArgumentError,
    InvalidURLError,
    PermissionDeniedError,
    StoreUnavailableError,
)
from greenleader.events import ElectionError
from greenleader.stores import Store, from_url, new_store
from tests import servers
from tests.certs import CLIENT_CN, Certs
from tests.waiting import drain, next_item

REPO = Path(__file__).resolve().parents[1]
KINDS = ["consul", "etcd", "zookeeper"]
#: The stores whose secrets the per-store tests below check without an administrator of the
#: secure server (PostgreSQL's TLS and least privilege are in tests/test_store_postgres.py).
SECRET_KINDS = [*KINDS, "postgres"]
BOUND = 5.0  # seconds: every refusal must be reported within this


# -- per-store administration, as docs/security.md describes it ---------------------------------


class _Admin:
    """What an operator does on one secure server: grant exactly the documented access."""

    kind = ""
    ttl = 0.0

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.certs: Certs = cluster.certs

    def grant(self, prefix: str) -> dict[str, str]:
        """Credentials (store options) with exactly the documented access to ``prefix``."""
        raise NotImplementedError

    def grant_read(self, prefix: str) -> dict[str, str]:
        """Credentials with the documented access of a follower of keys under ``prefix``."""
        raise NotImplementedError

    def unreadable_key(self, prefix: str) -> str:
        """A key under ``prefix`` that a client without access to ``prefix`` cannot read."""
        return f"{prefix}/election"

    def url(self, **options: str) -> str:
        """The secure server's URL (TLS options included) plus ``options``."""
        return f"{self.cluster.url}&{urlencode(options)}" if options else self.cluster.url


class _ConsulAdmin(_Admin):
    kind = "consul"
    ttl = 10.0
    POLICY = 'key_prefix "{prefix}/" {{ policy = "write" }}\nsession "{agent}" {{ policy = "write" }}\n'

    def grant(self, prefix: str) -> dict[str, str]:
        rules = self.POLICY.format(prefix=prefix, agent=self.cluster.nodes[0].name)
        return {"token": self.cluster.create_token(rules)}

    def grant_read(self, prefix: str, *, sessions: bool = False) -> dict[str, str]:
        rules = f'key_prefix "{prefix}/" {{ policy = "read" }}\n'
        if sessions:
            rules += f'session "{self.cluster.nodes[0].name}" {{ policy = "write" }}\n'
        return {"token": self.cluster.create_token(rules)}


class _EtcdAdmin(_Admin):
    kind = "etcd"
    ttl = 2.0

    def role(self, prefix: str, permission: str = "readwrite") -> str:
        role = f"greenleader-{uuid.uuid4().hex[:10]}"
        self.cluster.etcdctl("role", "add", role)
        self.cluster.etcdctl("role", "grant-permission", role, permission, "--prefix=true", f"{prefix}/")
        return role

    def grant(self, prefix: str, permission: str = "readwrite") -> dict[str, str]:
        user, password = f"app-{uuid.uuid4().hex[:10]}", secrets.token_hex(16)
        self.cluster.etcdctl("user", "add", user, "--interactive=false", input=password + "\n")
        self.cluster.etcdctl("user", "grant-role", user, self.role(prefix, permission))
        return {"user": user, "password": password}

    def grant_read(self, prefix: str) -> dict[str, str]:
        return self.grant(prefix, "read")

    def holder(self, key: str) -> tuple[str, str]:
        """The leading candidate's own key and its lease (hex), as etcdctl shows them."""
        found = json.loads(self.cluster.etcdctl("get", "--prefix", f"{key}/", "--order=ASCEND",
                                                "--sort-by=CREATE", "-w", "json"))["kvs"][0]
        return base64.b64decode(found["key"]).decode(), f"{found['lease']:x}"

    def grant_certificate(self, prefix: str) -> None:
        """Give the etcd user named like the client certificate's CN the role for ``prefix``."""
        with contextlib.suppress(RuntimeError):  # made by an earlier test
            self.cluster.etcdctl("user", "add", CLIENT_CN, "--no-password")
        self.cluster.etcdctl("user", "grant-role", CLIENT_CN, self.role(prefix))


class _ZooKeeperAdmin(_Admin):
    kind = "zookeeper"
    ttl = 1.0

    def __init__(self, cluster: Any) -> None:
        super().__init__(cluster)
        if not getattr(cluster, "root_locked", False):  # once per server, as an administrator would
            self.lock_root()
            cluster.root_locked = True

    def lock_root(self) -> None:
        """What docs/security.md tells the administrator to do first: ``/`` readable by all and
        changed by the administrator only (ZooKeeper leaves it open to all: anyone could make
        a top-level node, or delete an empty one and make it anew with an ACL of their own)."""
        with self.client(self.cluster.super_auth) as admin:
            admin.set_acls("/", self.ancestor_acl)

    @contextlib.contextmanager
    def client(self, auth: tuple[str, str] | None = None) -> Iterator[KazooClient]:
        """A raw kazoo client over TLS with the test client certificate, as ``auth``."""
        client = KazooClient(
            hosts=",".join(self.cluster.addrs), handler=SequentialGeventHandler(), timeout=5,
            use_ssl=True, ca=str(self.certs.ca), certfile=str(self.certs.client.cert),
            keyfile=str(self.certs.client.key), auth_data=[auth] if auth else None,
        )
        client.start(timeout=10)
        try:
            yield client
        finally:
            client.stop()
            client.close()

    def grant(self, prefix: str) -> dict[str, str]:
        user, password = f"app-{uuid.uuid4().hex[:10]}", secrets.token_hex(16)
        with self.client(self.cluster.super_auth) as admin:
            if "/" in prefix:
                admin.ensure_path("/" + prefix.rsplit("/", 1)[0], acl=self.ancestor_acl)
            admin.create("/" + prefix, b"", acl=[*self.ancestor_acl, make_digest_acl(user, password, create=True)])
        return {"user": user, "password": password}

    def grant_read(self, prefix: str) -> dict[str, str]:
        return {}  # greenleader's nodes are readable by anyone

    @property
    def ancestor_acl(self) -> list[Any]:
        """Readable by all, changed by the administrator only (else anyone could delete an
        empty prefix node and make it anew with an ACL of their own)."""
        return [make_digest_acl("super", self.cluster.super_password, all=True), *READ_ACL_UNSAFE]

    def holder_path(self, key: str) -> str:
        with self.client(self.cluster.super_auth) as admin:
            return f"/{key}/{sorted(admin.get_children('/' + key), key=lambda n: n[-10:])[0]}"

    def unreadable_key(self, prefix: str) -> str:
        # Nodes greenleader makes are readable by anyone (followers need no credentials):
        # this key's node is the administrator's alone.
        key = f"{prefix}/private"
        with self.client(self.cluster.super_auth) as admin:
            admin.ensure_path("/" + prefix, acl=self.ancestor_acl)
            admin.create("/" + key, b"", acl=[make_digest_acl("super", self.cluster.super_password, all=True)])
        return key


class _PostgresAdmin(_Admin):
    """The secure PostgreSQL server's owner: makes the schema, then a login role per grant
    with only the election's privileges (docs/stores/postgres.md). Access is per table, not
    per key: ``prefix`` only names the role. For the secret checks (SECRET_KINDS) only; the
    store's least privilege and TLS are tested in tests/test_store_postgres.py.

    Access is per table, not per key: the first prefix granted (the test's) gets the table's
    privileges, a later, other prefix a role with none (a client with valid credentials and
    no access to the key, as a token for another prefix is elsewhere)."""

    kind = "postgres"
    ttl = 2.0
    TABLE = "greenleader_leases"
    PRIVILEGES = (f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {{role}}",
                  f"GRANT USAGE ON SEQUENCE {TABLE}_term TO {{role}}")

    def __init__(self, cluster: Any) -> None:
        super().__init__(cluster)
        self.prefix: str | None = None
        owner = new_store("postgres", cluster.addrs, user=cluster.SUPERUSER, password=cluster.admin_password,
                          dbname=cluster.DBNAME, ca_file=str(cluster.certs.ca), timeout=5)
        try:
            owner.leader("secure-tests/schema")  # creates the table, sequence and trigger
        finally:
            owner.close()

    def _role(self, privileges: tuple[str, ...]) -> dict[str, str]:
        from psycopg import sql

        role, password = f"app_{uuid.uuid4().hex[:10]}", secrets.token_hex(16)
        self.cluster.add_role(role, password)
        for grant in privileges:
            self.cluster.sql(sql.SQL(grant.replace("{role}", "{}")).format(sql.Identifier(role)))
        return {"user": role, "password": password}

    def grant(self, prefix: str) -> dict[str, str]:
        self.prefix = self.prefix or prefix
        return self._role(self.PRIVILEGES if prefix == self.prefix else ())

    def grant_read(self, prefix: str) -> dict[str, str]:
        return self._role((f"GRANT SELECT ON {self.TABLE} TO {{role}}",))

    def url(self, **options: str) -> str:
        """The server's URL, its TLS options and the database, as ``options``' role if given."""
        query = {**self.cluster.tls_options, "create": "false", **options}
        return f"postgres://{','.join(self.cluster.addrs)}?{urlencode(query)}"


_ADMINS = {"consul": _ConsulAdmin, "etcd": _EtcdAdmin, "zookeeper": _ZooKeeperAdmin, "postgres": _PostgresAdmin}


@pytest.fixture(params=KINDS)
def admin(request: pytest.FixtureRequest) -> _Admin:
    return _ADMINS[request.param](request.getfixturevalue(f"{request.param}_secure"))


@pytest.fixture(params=SECRET_KINDS)
def secret_admin(request: pytest.FixtureRequest) -> _Admin:
    """As ``admin``, on the stores whose secrets are checked (PostgreSQL too)."""
    return _ADMINS[request.param](request.getfixturevalue(f"{request.param}_secure"))


@pytest.fixture
def prefix() -> str:
    return f"secure-tests/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stores() -> Iterator[Callable[[str], Store]]:
    """from_url(), closing every store at the end."""
    made: list[Store] = []

    def make(url: str) -> Store:
        store = from_url(url)
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        store.close()


def elected_within(candidate: Candidate, timeout: float) -> None:
    elected, _ = candidate.run_for_election()
    while True:
        if next_item(elected, timeout, f"{candidate.node} to be elected"):
            return


# -- least privilege ------------------------------------------------------------------------------


def test_least_privilege_is_enough(admin: _Admin, prefix: str, stores: Callable[[str], Store]) -> None:
    """Two candidates and a follower with exactly the documented access: win, follow, hand over."""
    url = admin.url(**admin.grant(prefix))
    key = f"{prefix}/election"
    with Candidate(stores(url), key, "alice", ttl=admin.ttl) as alice, \
            Candidate(stores(url), key, "bob", ttl=admin.ttl) as bob, \
            Follower(stores(url), key) as follower:
        leaders, _ = follower.follow_election()
        assert next_item(leaders, BOUND, "the vacancy") is None
        elected_within(alice, BOUND)
        assert next_item(leaders, BOUND, "alice") == "alice"
        first = alice.term
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, BOUND, "bob's first item") is False
        alice.resign()
        while not next_item(bob_elected, BOUND, "bob to take over"):
            pass
        assert bob.term is not None and first is not None and bob.term > first
        assert next_item(leaders, BOUND, "bob") in ("bob", None)


def test_read_access_follows_but_cannot_campaign(admin: _Admin, prefix: str,
                                                stores: Callable[[str], Store]) -> None:
    """A follower's access: it sees the leader, and a campaign is refused at once, on a held
    key and on a vacant one (where Consul's refusal to lock must not pass for a lock-delay)."""
    key = f"{prefix}/election"
    owner = admin.url(**admin.grant(prefix))
    readers = [stores(admin.url(**admin.grant_read(prefix)))]
    if isinstance(admin, _ConsulAdmin):  # one that may make sessions, so that it tries to lock
        readers.append(stores(admin.url(**admin.grant_read(prefix, sessions=True))))
    with Candidate(stores(owner), key, "alice", ttl=admin.ttl) as alice:
        elected_within(alice, BOUND)
        for reader in readers:
            assert reader.leader(key).node == "alice"
            watch = reader.watch(key)
            assert next(watch).node == "alice"
            watch.close()
            with gevent.Timeout(BOUND, AssertionError("a refused campaign waited")), \
                    pytest.raises(PermissionDeniedError):
                reader.acquire(key, "mallory", admin.ttl)
    for reader in readers:
        with gevent.Timeout(BOUND, AssertionError("a refused campaign on a vacant key waited")), \
                pytest.raises(PermissionDeniedError):
            reader.acquire(key, "mallory", admin.ttl)


def test_etcd_client_certificate_authentication(etcd_secure: Any, prefix: str, stores: Callable[[str], Store]) -> None:
    """No user and password: etcd takes the client certificate's CN as the user name."""
    admin = _EtcdAdmin(etcd_secure)
    key = f"{prefix}/election"
    denied = stores(admin.url())
    with pytest.raises(PermissionDeniedError, match="permission denied"):
        denied.leader(key)
    admin.grant_certificate(prefix)
    store = stores(admin.url())
    with Candidate(store, key, "by-certificate", ttl=admin.ttl) as candidate:
        elected_within(candidate, BOUND)
        assert store.leader(key).node == "by-certificate"


def test_without_access_every_operation_is_refused_at_once(
    admin: _Admin, prefix: str, stores: Callable[[str], Store]
) -> None:
    """A client with access to another prefix only: acquire, leader, watch, and campaigns and
    follows with retry on, all end with PermissionDeniedError within seconds, never retried."""
    admin.grant(prefix)  # the prefix has its owner (ZooKeeper: its node exists, with its ACL)
    store = stores(admin.url(**admin.grant(f"{prefix}-other")))
    key, unreadable = f"{prefix}/election", admin.unreadable_key(prefix)
    started = time.monotonic()
    with pytest.raises(PermissionDeniedError):
        store.acquire(key, "mallory", admin.ttl)
    with pytest.raises(PermissionDeniedError):
        store.leader(unreadable)
    watch = store.watch(unreadable)
    with pytest.raises(PermissionDeniedError):
        next(watch)
    assert time.monotonic() - started < BOUND

    events: list[ElectionError] = []
    zope.event.subscribers.append(lambda e: events.append(e) if isinstance(e, ElectionError) else None)
    retry = Backoff(initial=0.01, maximum=0.05)
    try:
        for runner, what in ((Candidate(store, key, "mallory", ttl=admin.ttl, retry=retry), "campaign"),
                             (Follower(store, unreadable, retry=retry), "follow")):
            results, errors = runner.run_for_election() if what == "campaign" else runner.follow_election()
            error = next_item(errors, BOUND, f"the {what}'s error")
            assert isinstance(error, PermissionDeniedError), repr(error)
            drain(results, BOUND, f"the {what}")  # it ends: the runner gave up
            runner.stop()
    finally:
        zope.event.subscribers.pop()
    assert [e.fatal for e in events] == [True, True], f"retried before giving up: {events}"


def test_access_is_confined_to_the_prefix(admin: _Admin, stores: Callable[[str], Store]) -> None:
    """Credentials for a top-level prefix of one's own: a campaign for a key under another
    top-level prefix is refused at once and leaves nothing behind (on ZooKeeper this needs the
    root locked, as docs/security.md says: left open, the campaign made the prefix and won)."""
    run = uuid.uuid4().hex[:10]
    mine, other = f"confined-{run}", f"outside-{run}"
    store = stores(admin.url(**admin.grant(mine)))
    store.acquire(f"{mine}/scheduler", "alice", admin.ttl).release()  # its own prefix: fine
    started = time.monotonic()
    with gevent.Timeout(BOUND, AssertionError("a campaign outside the prefix waited")), \
            pytest.raises(PermissionDeniedError) as caught:
        store.acquire(f"{other}/scheduler", "alice", admin.ttl)
    assert time.monotonic() - started < BOUND
    if isinstance(admin, _ZooKeeperAdmin):  # it says where, and why
        assert f"on /{other}" in str(caught.value) and "the ACL of / " in str(caught.value), caught.value
        with admin.client(admin.cluster.super_auth) as root:
            assert root.exists("/" + other) is None


def test_zookeeper_prefix_nodes_and_the_root_belong_to_the_administrator(zookeeper_secure: Any,
                                                                         stores: Callable[[str], Store]) -> None:
    """Another identity (the same client certificate) can neither delete an empty prefix node
    to make it anew, nor make a top-level node, nor open the root; a chroot in the URL
    confines the application's keys to its prefix node."""
    admin = _ZooKeeperAdmin(zookeeper_secure)
    run = uuid.uuid4().hex[:10]
    creds = admin.grant(f"empty-{run}")
    with admin.client(("digest", f"intruder-{run}:{secrets.token_hex(8)}")) as intruder:
        for attempt in (lambda: intruder.delete(f"/empty-{run}"), lambda: intruder.create(f"/taken-{run}"),
                        lambda: intruder.set_acls("/", OPEN_ACL_UNSAFE)):
            with pytest.raises(NoAuthError):
                attempt()
    chrooted = stores(admin.url(**creds).replace("?", f"/empty-{run}?", 1))
    chrooted.acquire("scheduler", "alice", admin.ttl).release()
    assert stores(admin.url(**creds)).leader(f"empty-{run}/scheduler") is None
    with admin.client(admin.cluster.super_auth) as root:
        assert root.get_children(f"/empty-{run}") == ["scheduler"]


def test_a_wrong_zookeeper_password_is_told_from_a_missing_right(zookeeper_secure: Any,
                                                                 stores: Callable[[str], Store]) -> None:
    """ZooKeeper accepts any digest password and refuses requests later; the readable ACLs
    tell a wrong password from an identity the ACL does not name, and no hash is shown."""
    admin = _ZooKeeperAdmin(zookeeper_secure)
    prefix = f"secure-tests/{uuid.uuid4().hex[:12]}"
    creds = admin.grant(prefix)
    wrong = stores(admin.url(**dict(creds, password=secrets.token_hex(16))))
    for key in (f"{prefix}/new", f"{prefix}/new"):  # the key's node missing, then made by the owner
        with pytest.raises(PermissionDeniedError, match=f"wrong password for digest user '{creds['user']}'"):
            wrong.acquire(key, "alice", admin.ttl)
        stores(admin.url(**creds)).acquire(key, "alice", admin.ttl).release()
    stranger = stores(admin.url(user=f"stranger-{uuid.uuid4().hex[:6]}", password=secrets.token_hex(16)))
    with pytest.raises(PermissionDeniedError, match="has no entry for digest user 'stranger-") as caught:
        stranger.acquire(f"{prefix}/new", "mallory", admin.ttl)
    assert f"digest:{creds['user']}:cdrwa, world:anyone:r" in str(caught.value), caught.value  # no hash


def test_consul_renewal_with_a_deleted_token_is_refused(consul_secure: Any, prefix: str,
                                                        stores: Callable[[str], Store]) -> None:
    admin = _ConsulAdmin(consul_secure)
    token = admin.grant(prefix)["token"]
    store = stores(admin.url(token=token))
    lease = store.acquire(f"{prefix}/election", "alice", admin.ttl)
    lease.renew()
    accessor = consul_secure.api("GET", "/v1/acl/token/self", token=token)["AccessorID"]
    consul_secure.api("DELETE", f"/v1/acl/token/{accessor}")
    with pytest.raises(PermissionDeniedError, match="does not know the ACL token"):
        lease.renew()
    with pytest.raises(PermissionDeniedError):
        lease.release()
    session = consul_secure.api("GET", f"/v1/kv/{prefix}/election")[0]["Session"]
    consul_secure.api("PUT", f"/v1/session/destroy/{session}")


# -- nobody else may delete the leader's node -----------------------------------------------------


def test_other_clients_cannot_delete_the_leaders_hold(admin: _Admin, prefix: str,
                                                      stores: Callable[[str], Store]) -> None:
    """Clients without write access to the prefix cannot delete what holds the leadership
    (Consul: the key and the session; etcd: the candidate key and its lease; ZooKeeper: the
    leader's node and the key's node, not even with the same client certificate)."""
    key = f"{prefix}/election"
    owner = admin.url(**admin.grant(prefix))
    outsider = admin.grant(f"{prefix}-other")
    with Candidate(stores(owner), key, "alice", ttl=admin.ttl) as alice:
        elected_within(alice, BOUND)
        if isinstance(admin, _ConsulAdmin):
            cluster = admin.cluster
            session = cluster.api("GET", f"/v1/kv/{key}")[0]["Session"]
            reader = cluster.create_token(f'key_prefix "{prefix}/" {{ policy = "read" }}')
            for token in (outsider["token"], reader):
                with pytest.raises(OSError, match="403"):
                    cluster.api("DELETE", f"/v1/kv/{key}", token=token)
            with pytest.raises(OSError, match="403"):  # session rights are per agent: see the docs
                cluster.api("PUT", f"/v1/session/destroy/{session}", token=reader)
        elif isinstance(admin, _EtcdAdmin):
            own_key, lease = admin.holder(key)
            as_outsider = ("--user", f"{outsider['user']}:{outsider['password']}")
            for command in (("del", own_key), ("lease", "revoke", lease)):
                with pytest.raises(RuntimeError, match="permission denied"):
                    admin.cluster.etcdctl(*as_outsider, *command, user=None)
        else:
            assert isinstance(admin, _ZooKeeperAdmin)
            path = admin.holder_path(key)
            for auth in (("digest", f"{outsider['user']}:{outsider['password']}"), None):  # same client cert
                with admin.client(auth) as client:
                    acls = {(a.id.scheme, a.perms) for a in client.get_acls(path)[0]}
                    assert acls == {("digest", 31), ("world", 1)}, acls  # ALL for the owner, READ for all
                    for node in (path, "/" + key):
                        with pytest.raises(NoAuthError):
                            client.delete(node)
        assert alice.is_leader()
        assert stores(owner).leader(key).node == "alice"


# -- TLS ----------------------------------------------------------------------------------------


def _tls_url(cluster: Any, *, ca: Path | None = None, cert: Any = "default", **options: str) -> str:
    certs: Certs = cluster.certs
    query: dict[str, str] = {"ca_file": str(ca or certs.ca)}
    pair = certs.client if cert == "default" else cert
    if pair is not None:
        query.update(cert_file=str(pair.cert), key_file=str(pair.key))
    query.update(options)
    return f"{cluster.kind}://{','.join(cluster.addrs)}?{urlencode(query)}"


SLOW = "30"  # seconds of store timeout: a TLS failure must be reported long before it, at once


def _refused(store: Store, key: str, match: str) -> StoreUnavailableError:
    """The TLS failure, reported within BOUND whatever the store's timeout, saying "TLS failed"
    (as docs/security.md quotes it) and why."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=match) as caught:
        store.leader(key)
    assert time.monotonic() - started < BOUND, f"reported after {time.monotonic() - started:.1f}s"
    assert "TLS failed" in str(caught.value), caught.value
    return caught.value


def test_an_untrusted_server_is_refused(admin: _Admin, prefix: str, stores: Callable[[str], Store]) -> None:
    store = stores(_tls_url(admin.cluster, ca=admin.certs.rogue_ca, timeout=SLOW))
    _refused(store, f"{prefix}/election", "CERTIFICATE_VERIFY_FAILED")


def test_the_server_must_accept_the_client_certificate(admin: _Admin, prefix: str,
                                                       stores: Callable[[str], Store]) -> None:
    for cert in (None, admin.certs.rogue_client):
        _refused(stores(_tls_url(admin.cluster, cert=cert, timeout=SLOW)), f"{prefix}/election", "TLS|SSL")


def test_a_tls_failure_is_retried_by_a_candidate_with_retry(zookeeper_secure: Any, prefix: str,
                                                            stores: Callable[[str], Store]) -> None:
    """Reported at once, yet not final: a candidate with retry= reports it and tries again,
    as after any outage (a certificate rotated on the servers needs no client restart)."""
    store = stores(_tls_url(zookeeper_secure, ca=zookeeper_secure.certs.rogue_ca, timeout=SLOW))
    candidate = Candidate(store, f"{prefix}/election", "alice", ttl=1.0, retry=Backoff(initial=0.01, maximum=0.05))
    reported: gevent.queue.Queue[ElectionError] = gevent.queue.Queue()

    def record(event: object) -> None:
        if isinstance(event, ElectionError) and event.key == candidate.key:
            reported.put(event)

    zope.event.subscribers.append(record)
    try:
        candidate.run_for_election()
        for attempt in ("a TLS failure", "the same TLS failure, retried"):
            event = next_item(reported, BOUND, attempt)
            assert not event.fatal and isinstance(event.error, StoreUnavailableError), event
            assert "TLS failed" in str(event.error), event.error
    finally:
        zope.event.subscribers.remove(record)
        candidate.stop()


def test_plain_connections_to_a_tls_server_say_so(admin: _Admin, prefix: str) -> None:
    store = new_store(admin.kind, admin.cluster.addrs, timeout=1)
    try:
        with pytest.raises(GreenleaderError, match=r"(?i)tls") as caught:
            store.leader(f"{prefix}/election")
        assert isinstance(caught.value, (StoreUnavailableError, InvalidArgumentError))
    finally:
        store.close()


@pytest.fixture
def wrong_host_server(admin: _Admin, tmp_path: Path) -> Iterator[Any]:
    """A second server of the kind whose certificate (from the trusted CA) names another host."""
    cluster = servers.start_secure(admin.kind, tmp_path, admin.certs, server_cert=admin.certs.wrong_host)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_server_name_is_checked_by_default(admin: _Admin, wrong_host_server: Any,
                                               stores: Callable[[str], Store]) -> None:
    names = "Hostname mismatch|Hostname Verification|not valid for"
    _refused(stores(_tls_url(wrong_host_server, timeout=SLOW)), "election", names)
    if admin.kind == "etcd":  # gRPC cannot skip the check, and the store says so
        with pytest.raises(InvalidArgumentError, match="cannot skip"):
            from_url(_tls_url(wrong_host_server, verify="false"))
        return
    unchecked = stores(_tls_url(wrong_host_server, verify="false", timeout="2"))
    try:
        assert unchecked.leader("election") is None  # ZooKeeper: TLS and reads work
    except PermissionDeniedError:
        assert admin.kind == "consul"  # TLS worked; the anonymous token may read nothing


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tls_options_are_spelt_alike_and_old_names_still_work(kind: str, tls_certs: Certs) -> None:
    new = {"ca_file": str(tls_certs.ca), "cert_file": str(tls_certs.client.cert),
           "key_file": str(tls_certs.client.key)}
    old = {"consul": {}, "etcd": {"ca_cert": "ca_file", "cert_cert": "cert_file", "cert_key": "key_file"},
           "zookeeper": {"ca": "ca_file", "certfile": "cert_file", "keyfile": "key_file"}}[kind]
    stores = [new_store(kind, ["127.0.0.1:1"], **new),
              new_store(kind, ["127.0.0.1:1"], **{o: new[n] for o, n in old.items()} if old else new),
              from_url(f"{kind}://127.0.0.1:1?{urlencode(new)}")]
    try:
        assert len({s.tls for s in stores}) == 1, [s.tls for s in stores]  # type: ignore[attr-defined]
        assert stores[0].tls.enabled and stores[0].tls.verify  # type: ignore[attr-defined]
    finally:
        for store in stores:
            store.close()
    for name, value in old.items():
        with pytest.raises(InvalidArgumentError, match="not both"):
            new_store(kind, ["127.0.0.1:1"], **{value: new[value], name: new[value]})
    with pytest.raises(InvalidArgumentError, match="key_file needs cert_file"):
        new_store(kind, ["127.0.0.1:1"], key_file=new["key_file"])
    with pytest.raises(InvalidArgumentError, match="need TLS"):
        new_store(kind, ["127.0.0.1:1"], tls=False, ca_file=new["ca_file"])
    with pytest.raises(InvalidArgumentError, match="not a readable file"):
        new_store(kind, ["127.0.0.1:1"], ca_file="/nonexistent/ca.pem")


def test_credentials_before_the_host_are_refused_without_showing_them() -> None:
    secret = secrets.token_hex(8)
    with pytest.raises(InvalidURLError) as caught:
        from_url(f"etcd://bob:{secret}@127.0.0.1:2379")
    assert secret not in str(caught.value) and "password_file" in str(caught.value)


def _password_of(store: Store) -> str:
    """The password a store holds, wherever its client keeps it (a private attribute)."""
    if store.backend == "etcd":
        return store._password  # type: ignore[attr-defined]
    if store.backend == "postgres":
        return store.client._password  # type: ignore[attr-defined]
    return store._client_options["auth_data"][0][1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["etcd", "zookeeper", "postgres"])
def test_password_file(kind: str, tmp_path: Path) -> None:
    secret = secrets.token_hex(8)
    path = tmp_path / "password"
    path.write_text(secret + "\n")
    store = from_url(f"{kind}://127.0.0.1:1?{urlencode({'user': 'app', 'password_file': str(path)})}")
    try:
        assert _password_of(store) in (secret, f"app:{secret}")
        assert secret not in repr(store)
    finally:
        store.close()
    with pytest.raises(InvalidArgumentError, match="not both"):
        new_store(kind, ["127.0.0.1:1"], user="app", password="x", password_file=str(path))
    path.write_text(secret + "\x01\n")
    with pytest.raises(InvalidArgumentError, match="control characters") as caught:
        new_store(kind, ["127.0.0.1:1"], user="app", password_file=str(path))
    assert secret not in str(caught.value)


@pytest.mark.parametrize("kind", SECRET_KINDS)
def test_no_secret_in_public_attributes_or_repr(kind: str) -> None:
    """What a store exposes (its repr, and every public attribute, followed into the objects
    they hold) never shows its password or token: they end up in debuggers, error reports
    and ``vars()`` dumps (the ZooKeeper store once kept its password in ``client_options``)."""
    secret = secrets.token_hex(16)
    store = new_store(kind, ["127.0.0.1:1"], **({"token": secret} if kind == "consul" else
                                                 {"user": "app", "password": secret}))
    try:
        seen: set[int] = set()

        def public(value: object, where: str, depth: int = 0) -> Iterator[str]:
            if id(value) in seen or depth > 4:
                return
            seen.add(id(value))
            if secret in repr(value):
                yield where
            children: dict[str, object] = {}
            if isinstance(value, dict):
                children = {f"[{k!r}]": v for k, v in value.items()}
            elif isinstance(value, (list, tuple, set, frozenset)):
                children = {f"[{i}]": v for i, v in enumerate(value)}
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                children = {f".{k}": v for k, v in vars(value).items() if not k.startswith("_")}
            for name, child in children.items():
                yield from public(child, where + name, depth + 1)

        leaks = list(public(store, "store"))
        assert not leaks, f"the secret shows in {leaks}"
    finally:
        store.close()


def test_consul_token_sources_are_explicit(consul_secure: Any, prefix: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                           stores: Callable[[str], Store]) -> None:
    """An explicit token (or token_file) wins over CONSUL_HTTP_TOKEN and says so; without one
    the environment's is used, and says so too."""
    admin = _ConsulAdmin(consul_secure)
    token = admin.grant(prefix)["token"]
    key = f"{prefix}/election"
    caplog.set_level(logging.INFO, logger="greenleader")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", str(uuid.uuid4()))  # a token Consul does not know
    with pytest.raises(PermissionDeniedError, match=r"does not know the ACL token \(from CONSUL_HTTP_TOKEN\)"):
        stores(admin.url()).leader(key)
    assert "using the ACL token from CONSUL_HTTP_TOKEN" in caplog.text
    explicit = stores(admin.url(token=token))
    assert explicit.leader(key) is None and explicit.token_source == "token"  # type: ignore[attr-defined]
    assert "CONSUL_HTTP_TOKEN set but ignored: the token option was given" in caplog.text
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    path = tmp_path / "token"
    path.write_text(token + "\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(path))
    from_env_file = stores(admin.url())
    assert from_env_file.leader(key) is None and from_env_file.token_source == "CONSUL_HTTP_TOKEN_FILE"  # type: ignore[attr-defined]
    monkeypatch.delenv("CONSUL_HTTP_TOKEN_FILE")
    from_file = stores(admin.url(token_file=str(path)))
    assert from_file.leader(key) is None and from_file.token_source == "token_file"  # type: ignore[attr-defined]
    assert token not in caplog.text


# -- no secret leaks ------------------------------------------------------------------------------


def _texts_of(exc: BaseException) -> list[str]:
    return ["".join(traceback.format_exception(exc)), repr(exc)]


def test_secrets_never_leak_into_logs_errors_reprs_or_events(
    secret_admin: _Admin, prefix: str, stores: Callable[[str], Store], caplog: pytest.LogCaptureFixture
) -> None:
    """Everything a store touches, at the most verbose log level of every library: a working
    client's campaign, renewal, watch and release, and the errors of a wrong secret."""
    admin = secret_admin
    caplog.set_level(1)  # below DEBUG: kazoo logs its session password at level 5
    creds = admin.grant(prefix)
    secret = creds.get("password") or creds["token"]
    key = f"{prefix}/election"
    texts: list[str] = []
    events: list[Any] = []
    zope.event.subscribers.append(events.append)
    try:
        store = stores(admin.url(**creds))
        texts.append(repr(store))
        with Candidate(store, key, "alice", ttl=admin.ttl) as alice, Follower(store, key) as follower:
            leaders, _ = follower.follow_election()
            elected_within(alice, BOUND)
            assert next_item(leaders, BOUND, "alice") in ("alice", None)
            lease = store.acquire(f"{key}-2", "alice", admin.ttl)
            lease.renew()
            texts.append(repr(lease))
            lease.release()
        wrong = dict(creds, **({"password": secrets.token_hex(16)} if "password" in creds else
                               {"token": str(uuid.uuid4())}))
        wrong_secret = wrong.get("password") or wrong["token"]
        for url in (admin.url(**wrong), admin.url(**admin.grant(f"{prefix}-other"))):
            other = stores(url)
            texts.append(repr(other))
            for operation in (lambda s=other: s.acquire(key, "mallory", admin.ttl),
                              lambda s=other: s.leader(admin.unreadable_key(f"{prefix}-{uuid.uuid4().hex[:6]}"))):
                try:
                    operation()
                except GreenleaderError as exc:
                    texts.extend(_texts_of(exc))
            candidate = Candidate(other, key, "mallory", ttl=admin.ttl)
            _, errors = candidate.run_for_election()
            with contextlib.suppress(AssertionError):
                texts.extend(_texts_of(next_item(errors, BOUND, "mallory's error")))
            candidate.stop()
        gevent.sleep(0.1)
    finally:
        zope.event.subscribers.remove(events.append)
    texts += [repr(event) for event in events]
    texts += [caplog.text] + [record.getMessage() for record in caplog.records]
    leaks = [text for text in texts if secret in text or wrong_secret in text]
    assert not leaks, leaks[0][:2000]
    if admin.kind == "zookeeper":  # the scan saw kazoo's request log, which shows Auth requests
        assert any("Auth(" in r.getMessage() for r in caplog.records if r.name.startswith("kazoo"))


def _cli(env_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GREENLEADER_STORE=env_url, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "greenleader", "-v", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_the_cli_takes_the_store_from_the_environment_and_never_shows_secrets(
    secret_admin: _Admin, prefix: str, stores: Callable[[str], Store]
) -> None:
    admin = secret_admin
    creds = admin.grant(prefix)
    secret = creds.get("password") or creds["token"]
    key = f"{prefix}/election"
    with Candidate(stores(admin.url(**creds)), key, "alice", ttl=admin.ttl) as alice:
        elected_within(alice, BOUND)
        done = _cli(admin.url(**creds), "leader", "--key", key, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["leader"] == "alice"
        denied = _cli(admin.url(**admin.grant(f"{prefix}-other")), "run", "--key", key, "--ttl", str(admin.ttl),
                      "--", "true")
        assert denied.returncode == 1 and "greenleader:" in denied.stderr, denied.stderr
    for finished in (done, denied):
        assert secret not in finished.stdout + finished.stderr


def test_gunicorn_workers_and_the_status_endpoint_never_show_secrets(consul_secure: Any, prefix: str,
                                                                    tmp_path: Path) -> None:
    """GREENLEADER_STORE carries the TLS options and the token; one master leads, one has a
    token Consul does not know; neither their logs nor the status endpoint show a token."""
    from tests.gunicorn_apps.harness import Fleet

    admin = _ConsulAdmin(consul_secure)
    token, unknown = admin.grant(prefix)["token"], str(uuid.uuid4())
    with Fleet(tmp_path / "fleet", admin.url(token=token), f"{prefix}/election", admin.ttl) as fleet:
        good = fleet.start(workers=2)
        bad = fleet.start(workers=1, env={"GREENLEADER_STORE": admin.url(token=unknown)})
        leader = fleet.current(30)
        fleet.wait_for("the bad master to log the refusal", lambda: "does not know the ACL token" in bad.log_text(), 30)
        bodies = [good.get("/_greenleader")[1], bad.get("/_greenleader")[1]]
        assert any(body["leader"] == leader.node for body in bodies), bodies
        outputs = [json.dumps(bodies), good.log_text(), bad.log_text()]
    assert not [text for text in outputs if token in text or unknown in text]
