"""PostgreSQL-specific behaviour, against a real server (tests/servers.py runs initdb + postgres)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import gevent.queue
import pytest

from greenleader import Candidate, Follower
from greenleader.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidURLError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
)
from greenleader.retry import Backoff
from greenleader.stores import LeaderInfo, from_url, new_store
from greenleader.stores.postgres import PostgresStore
from tests import servers
from tests.faults import Proxy
from tests.support_postgres import FAST_TTL, TABLE, closed_port
from tests.waiting import next_item, wait_until

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent

SECRET = "pa55-w0rd-7f3d"


@pytest.fixture
def cluster(postgres_cluster):
    return postgres_cluster


@pytest.fixture
def key() -> str:
    return f"greenleader-test/pg-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stores(cluster) -> Iterator[list[PostgresStore]]:
    made: list[PostgresStore] = []
    yield made
    for store in made:
        store.close()


def _store(cluster, stores: list[PostgresStore], **options: object) -> PostgresStore:
    store = PostgresStore(cluster.addrs, user=cluster.SUPERUSER, dbname=cluster.DBNAME, timeout=5, **options)
    stores.append(store)
    return store


def test_the_database_url_form_is_accepted_and_its_password_never_shown(cluster, stores) -> None:
    for scheme in ("postgres", "postgresql"):
        store = from_url(f"{scheme}://{cluster.SUPERUSER}:{SECRET}@{cluster.addrs[0]}/{cluster.DBNAME}?timeout=3")
        stores.append(store)  # type: ignore[arg-type]
        assert isinstance(store, PostgresStore)
        assert (store.user, store.dbname, store.timeout) == (cluster.SUPERUSER, cluster.DBNAME, 3.0)
        assert SECRET not in repr(store) and cluster.SUPERUSER in repr(store)
    with pytest.raises(InvalidURLError) as raised:
        from_url(f"postgres://u:{SECRET}@{cluster.addrs[0]}/db?bogus=1")
    assert SECRET not in str(raised.value)
    with pytest.raises(InvalidURLError) as raised:  # the other stores still refuse credentials in URLs
        from_url(f"etcd://u:{SECRET}@127.0.0.1:2379")
    assert SECRET not in str(raised.value)


def test_a_password_file_is_read_and_new_store_knows_postgres(cluster, stores, tmp_path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    store = new_store("postgresql", cluster.addrs, user=cluster.SUPERUSER, dbname=cluster.DBNAME,
                      password_file=str(secret_file))
    stores.append(store)  # type: ignore[arg-type]
    assert store.client._password == SECRET and SECRET not in repr(store)
    with pytest.raises(InvalidArgumentError):
        new_store("postgres", cluster.addrs, password=SECRET, password_file=str(secret_file))
    with pytest.raises(InvalidArgumentError) as raised:
        new_store("postgres", cluster.addrs, sslmode="sometimes")
    assert "sslmode" in str(raised.value)


def test_the_password_is_in_no_error_log_or_status(cluster, key: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    store = PostgresStore([f"127.0.0.1:{closed_port()}"], user="someone", password=SECRET, timeout=1)
    candidate = Candidate(store, key, "alice", ttl=FAST_TTL, retry=Backoff(initial=0.1, maximum=0.2))
    candidate.run_for_election()
    try:
        wait_until(lambda: candidate.status().store.errors >= 2, 30, "two store errors")
        status = json.dumps(candidate.status().as_dict(), default=str)
        assert "cannot connect" in status
        assert SECRET not in status
        assert SECRET not in caplog.text
    finally:
        candidate.stop()
        store.close()


def test_terms_come_from_a_sequence_and_increase_across_deleted_rows(cluster, stores, key: str) -> None:
    store = _store(cluster, stores)
    terms = []
    for _ in range(3):
        lease = store.acquire(key, "alice", FAST_TTL)
        terms.append(lease.term)
        lease.release()
        assert cluster.sql(f"SELECT count(*) FROM {TABLE} WHERE key = %s", [key]) == [(0,)]  # deleted
    assert terms == sorted(set(terms)), terms


def test_a_renewal_that_updates_no_row_is_a_loss(cluster, stores, key: str) -> None:
    store = _store(cluster, stores)
    lease = store.acquire(key, "alice", 0.5)
    wait_until(lambda: cluster.sql(f"SELECT 1 FROM {TABLE} WHERE key = %s AND expires_at <= clock_timestamp()",
                                   [key]), 30, "the row to expire on the server's clock")
    with pytest.raises(LeadershipLostError):
        lease.renew()
    lease.release()


def test_a_release_wakes_a_waiter_by_notify_not_by_expiry(cluster, stores, key: str) -> None:
    """With a 60 s TTL, only the NOTIFY of the deleted row can let bob in before the test's bound."""
    alice_store, bob_store = _store(cluster, stores), _store(cluster, stores)
    lease = alice_store.acquire(key, "alice", 60.0)
    waiting = gevent.spawn(bob_store.acquire, key, "bob", 60.0)
    gevent.sleep(0.2)
    assert not waiting.ready()
    lease.release()
    bob = waiting.get(timeout=30)
    assert bob.term > lease.term
    bob.release()


def test_a_crashed_holder_is_replaced_after_its_expiry(cluster, stores, key: str) -> None:
    """The waiter has no NOTIFY to wake it: it wakes when the holder's expiry passes."""
    store = _store(cluster, stores)
    crashed = store.acquire(key, "alice", 1.0)
    crashed.abandon()  # as a dead process: never renewed, never released
    bob = _store(cluster, stores).acquire(key, "bob", 1.0)
    assert bob.term > crashed.term
    bob.release()


def test_a_row_deleted_from_outside_ends_the_tenure_at_once_but_frees_the_key_at_its_expiry(
        cluster, stores, key: str) -> None:
    """The holder hears of the deletion by NOTIFY and steps down; since it may lead until it
    hears, the key stays taken (the row revoked) until the expiry of its last renewal."""
    store = _store(cluster, stores)
    lease = store.acquire(key, "alice", 60.0)
    lost = gevent.event.Event()
    lease.on_lost = lost.set
    cluster.sql(f"DELETE FROM {TABLE} WHERE key = %s", [key])
    assert lost.wait(30), "the holder did not hear of its deleted row"
    with pytest.raises(LeadershipLostError):
        lease.renew()
    assert cluster.sql(f"SELECT revoked, expires_at > clock_timestamp() FROM {TABLE} WHERE key = %s",
                       [key]) == [(True, True)]
    assert store.leader(key) is None
    newcomer = {"key": key, "node": "bob", "owner": uuid.uuid4().hex, "ttl": 60.0}
    assert store.client.query("take", store.sql.take, newcomer)[0][0] is None  # not before the expiry
    lease.release()


def test_followers_hear_of_changes_through_notify(cluster, stores, key: str) -> None:
    store = _store(cluster, stores)
    seen: gevent.queue.Queue = gevent.queue.Queue()
    watch = _store(cluster, stores).watch(key)
    reader = gevent.spawn(lambda: [seen.put(info) for info in watch])
    try:
        assert next_item(seen, 30, "the vacancy") is None
        lease = store.acquire(key, "alice", 60.0)
        wait_until(lambda: seen.get(timeout=30) == LeaderInfo("alice", lease.term), 30, "alice named by the watch")
        lease.release()
        wait_until(lambda: seen.get(timeout=30) is None, 30, "the vacancy after the release")
    finally:
        reader.kill()
        watch.close()


def test_a_follower_names_the_winner_only_once_claimed(cluster, stores, key: str) -> None:
    store = _store(cluster, stores)
    lease = store.acquire(key, "alice", 60.0)
    assert store.leader(key) == LeaderInfo("alice", lease.term)  # claimed by the lease's greenlet
    assert cluster.sql(f"SELECT claimed FROM {TABLE} WHERE key = %s", [key]) == [(True,)]
    # The NOTIFYs of its own take and claim did not make the holder check its row.
    assert store.requests.get("check own row", 0) == 0, store.requests
    lease.release()


def test_without_create_a_missing_table_is_a_clear_error(cluster, stores, key: str) -> None:
    store = _store(cluster, stores, table=f"missing_{uuid.uuid4().hex[:8]}", create=False)
    with pytest.raises(StoreError) as raised:
        store.leader(key)
    assert "create" in str(raised.value)


def test_two_tables_hold_separate_elections(cluster, stores, key: str) -> None:
    table = f"other_{uuid.uuid4().hex[:8]}"
    one, other = _store(cluster, stores), _store(cluster, stores, table=table)
    first = one.acquire(key, "alice", 60.0)
    second = other.acquire(key, "bob", 60.0)
    assert one.leader(key) == LeaderInfo("alice", first.term)
    assert other.leader(key) == LeaderInfo("bob", second.term)
    first.release()
    second.release()
    cluster.sql(f'DROP TABLE "{table}"; DROP SEQUENCE "{table}_term"; DROP FUNCTION "{table}_notify"')


def test_a_killed_server_is_survived_by_candidates_and_followers(tmp_path, key: str) -> None:
    """SIGKILL and restart of the server: the LISTEN connection breaks, the candidate leads
    again (or still) and the follower names it again."""
    own = servers.start("postgres", tmp_path, 1)
    made = [PostgresStore(own.addrs, user=own.SUPERUSER, timeout=2) for _ in range(2)]
    alice = Candidate(made[0], key, "alice", ttl=FAST_TTL, retry=Backoff(initial=0.1, maximum=0.5))
    follower = Follower(made[1], key, retry=Backoff(initial=0.1, maximum=0.5))
    try:
        alice.run_for_election()
        follower.follow_election()
        # status(), not leader(): leader() reads the store itself until the watch has reported,
        # and the watch (LISTEN, then its NOTIFY probe) must be up before the kill.
        wait_until(lambda: follower.status().leader == "alice", 30, "the follower's watch to name alice")
        own.nodes[0].kill()
        wait_until(lambda: follower.leader() is None, 30, "the follower to stop naming alice")
        own.nodes[0].start()
        wait_until(lambda: alice.is_leader() and follower.leader() == "alice", 60, "alice leads again, named")
    finally:
        follower.stop()
        alice.stop()
        for store in made:
            store.close()
        own.stop()


# -- PgBouncer in transaction pooling: no LISTEN, so the store polls -----------------------------


@pytest.fixture(scope="module")
def pgbouncer(postgres_cluster, tmp_path_factory) -> Iterator[servers.Cluster]:
    bouncer = servers.start_pgbouncer(tmp_path_factory.mktemp("pgbouncer"), postgres_cluster)
    yield bouncer
    bouncer.stop()


def test_through_pgbouncer_transaction_pooling_the_store_detects_no_notify_and_polls(
        pgbouncer, cluster, stores, key: str, caplog) -> None:
    """Alice holds with a 60 s TTL: bob gets the key well before it only because his wait polls
    (POLL_INTERVAL, 1 s) once the store found that its NOTIFY probe never arrives."""
    direct = _store(cluster, stores)
    pooled = [PostgresStore(pgbouncer.addrs, user=pgbouncer.SUPERUSER, dbname=pgbouncer.DBNAME, timeout=2)
              for _ in range(2)]
    stores.extend(pooled)
    alice = pooled[0].acquire(key, "alice", 60.0)
    waiting = gevent.spawn(pooled[1].acquire, key, "bob", 60.0)
    wait_until(lambda: not pooled[1].client.notifications, 30, "bob's store to find that NOTIFY does not arrive")
    assert "PgBouncer" in caplog.text
    assert direct.leader(key) == LeaderInfo("alice", alice.term)
    alice.renew()  # many statements through the pool: nothing is prepared, nothing lives in a session
    alice.release()
    bob = waiting.get(timeout=30)
    assert bob.term > alice.term and direct.leader(key) == LeaderInfo("bob", bob.term)
    bob.release()
    assert direct.client.notifications is True
    with direct.client.subscribe(key):  # a direct connection hears its probe
        assert direct.client.notifications is True


# -- TLS and least privilege (a server on hostssl only, SCRAM passwords) ------------------------

#: Exactly what the election needs of a role (docs/stores/postgres.md): the table's rows and
#: the sequence's next value. No CREATE anywhere, no other table.
LEAST_PRIVILEGES = [
    f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {{role}}",
    f"GRANT USAGE ON SEQUENCE {TABLE}_term TO {{role}}",
]


@pytest.fixture(scope="module")
def least_privileged(postgres_secure) -> tuple[object, str]:
    """The secure server, with the schema made by its owner and role ``greenleader`` granted
    only :data:`LEAST_PRIVILEGES`; returns (cluster, the role's password)."""
    cluster = postgres_secure
    password = uuid.uuid4().hex
    cluster.add_role(cluster.ROLE, password)
    owner = PostgresStore(cluster.addrs, user=cluster.SUPERUSER, password=cluster.admin_password,
                          dbname=cluster.DBNAME, ca_file=str(cluster.certs.ca), timeout=5)
    try:
        owner.leader("greenleader-test/schema")  # creates the table, sequence and trigger
    finally:
        owner.close()
    for grant in LEAST_PRIVILEGES:
        cluster.sql(grant.format(role=cluster.ROLE))
    return cluster, password


def _role_store(cluster, role_password: str, **options: object) -> PostgresStore:
    certs = cluster.certs
    given: dict[str, object] = {"user": cluster.ROLE, "password": role_password, "dbname": cluster.DBNAME,
                                "ca_file": str(certs.ca), "cert_file": str(certs.client.cert),
                                "key_file": str(certs.client.key), "create": False, "timeout": 3, **options}
    return PostgresStore(cluster.addrs, **{k: v for k, v in given.items() if v is not None})


def test_a_least_privileged_role_elects_over_tls_with_its_client_certificate(least_privileged, key: str) -> None:
    cluster, password = least_privileged
    alice_store, bob_store = _role_store(cluster, password), _role_store(cluster, password)
    try:
        assert alice_store.secure and "tls" in repr(alice_store) and password not in repr(alice_store)
        alice = alice_store.acquire(key, "alice", 60.0)
        waiting = gevent.spawn(bob_store.acquire, key, "bob", 60.0)
        assert bob_store.leader(key) == LeaderInfo("alice", alice.term)
        alice.renew()
        alice.release()
        bob = waiting.get(timeout=30)
        assert bob.term > alice.term
        bob.release()
    finally:
        alice_store.close()
        bob_store.close()


def test_a_least_privileged_role_cannot_create_the_schema(least_privileged, key: str) -> None:
    cluster, password = least_privileged
    store = _role_store(cluster, password, table=f"new_{uuid.uuid4().hex[:8]}", create=True)
    try:
        with pytest.raises(PermissionDeniedError) as raised:
            store.leader(key)
        assert password not in str(raised.value)
    finally:
        store.close()


@pytest.mark.parametrize("change", ["no client certificate", "another client's certificate", "a rogue CA",
                                    "a wrong password", "no TLS"])
def test_the_secure_server_refuses_what_it_should(least_privileged, key: str, change: str) -> None:
    cluster, password = least_privileged
    certs = cluster.certs
    options: dict[str, object] = {
        "no client certificate": {"cert_file": None, "key_file": None},
        "another client's certificate": {"cert_file": str(certs.other_client.cert),
                                         "key_file": str(certs.other_client.key)},
        "a rogue CA": {"ca_file": str(certs.rogue_ca)},
        "a wrong password": {"password": SECRET},
        "no TLS": {"ca_file": None, "cert_file": None, "key_file": None},
    }[change]
    store = _role_store(cluster, password, **options)
    try:
        with pytest.raises(StoreError) as raised:
            store.leader(key)
        assert password not in str(raised.value) and SECRET not in str(raised.value)
        if change == "a wrong password":
            assert isinstance(raised.value, PermissionDeniedError)
    finally:
        store.close()


# -- a row deleted from outside never gives two leaders (as tests/test_external_deletion.py) -------


def _deletion_round(cluster, proxy: Proxy, key: str, bob_comes: str, holder_delay: float) -> float:
    """Alice (through ``proxy``) leads, bob waits or arrives, an operator deletes alice's row:
    the time both said they lead, in ms (0: never)."""
    alice_store = PostgresStore([proxy.addr], user=cluster.SUPERUSER, dbname=cluster.DBNAME, timeout=5)
    bob_store = PostgresStore(cluster.addrs, user=cluster.SUPERUSER, dbname=cluster.DBNAME, timeout=5)
    alice = Candidate(alice_store, key, "alice", ttl=FAST_TTL)
    bob = Candidate(bob_store, key, "bob", ttl=FAST_TTL)
    both: list[float] = []

    def sample() -> None:
        while True:
            if alice.is_leader() and bob.is_leader():
                both.append(time.monotonic())
            gevent.sleep(0.001)

    sampler = None
    try:
        alice_elected, _ = alice.run_for_election()
        assert next_item(alice_elected, 3 * FAST_TTL, "alice's first item") is False
        assert next_item(alice_elected, 3 * FAST_TTL, "alice to win") is True
        if bob_comes == "waits":
            bob.run_for_election()
            # bob tried the key once and found alice's row: he waits for a NOTIFY or its expiry
            wait_until(lambda: bob_store.requests.get("take", 0) >= 1, 3 * FAST_TTL, "bob to wait behind alice")
        proxy.delay(holder_delay, "down")
        sampler = gevent.spawn(sample)
        cluster.sql(f"DELETE FROM {TABLE} WHERE key = %s", [key])
        if bob_comes == "arrives":
            bob.run_for_election()
        assert next_item(alice_elected, 3 * FAST_TTL, "alice to step down") is False
        wait_until(lambda: bob.is_leader() or alice.is_leader(), 3 * FAST_TTL + 10, "a new leader", interval=0.001)
    finally:
        if sampler is not None:
            sampler.kill()
        proxy.heal()
        bob.stop()
        alice.stop()
        alice_store.close()
        bob_store.close()
    return (both[-1] - both[0]) * 1000 + 1 if both else 0.0


@pytest.mark.parametrize("holder_delay", [0.0, 0.05], ids=["prompt_holder", "slow_holder"])
@pytest.mark.parametrize("bob_comes", ["waits", "arrives"])
def test_deleting_the_leaders_row_never_gives_two_leaders(cluster, key: str, bob_comes: str,
                                                          holder_delay: float) -> None:
    """An operator deletes alice's row while bob waits (or just after it, bob arrives); what the
    server sends alice may come late. Bob may lead only once alice has stepped down."""
    proxy = Proxy(cluster.addrs[0], "alice->postgres")
    try:
        overlaps = [_deletion_round(cluster, proxy, f"{key}-{n}", bob_comes, holder_delay) for n in range(3)]
    finally:
        proxy.close()
    assert not any(overlaps), f"two leaders at once: overlaps {overlaps} ms"


# -- the server frozen, the holder cut off ----------------------------------------------------------


def test_a_holder_cut_off_steps_down_before_a_waiter_wins(cluster, key: str) -> None:
    """A partition between alice and the server: her renewals get no answer, she steps down at
    her renew deadline, and bob wins once her row has expired on the server's clock; never both."""
    proxy = Proxy(cluster.addrs[0], "alice->postgres")
    alice_store = PostgresStore([proxy.addr], user=cluster.SUPERUSER, dbname=cluster.DBNAME, timeout=1)
    bob_store = PostgresStore(cluster.addrs, user=cluster.SUPERUSER, dbname=cluster.DBNAME, timeout=5)
    alice = Candidate(alice_store, key, "alice", ttl=FAST_TTL, retry=Backoff(initial=0.1, maximum=0.5))
    bob = Candidate(bob_store, key, "bob", ttl=FAST_TTL)
    both: list[float] = []

    def sample() -> None:
        while True:
            if alice.is_leader() and bob.is_leader():
                both.append(time.monotonic())
            gevent.sleep(0.001)

    sampler = gevent.spawn(sample)
    try:
        alice_elected, _ = alice.run_for_election()
        assert next_item(alice_elected, 3 * FAST_TTL, "alice's first item") is False
        assert next_item(alice_elected, 3 * FAST_TTL, "alice to win") is True
        bob_elected, _ = bob.run_for_election()
        assert next_item(bob_elected, 3 * FAST_TTL, "bob's first item") is False
        proxy.partition("both")
        assert next_item(alice_elected, 3 * FAST_TTL, "alice to step down") is False
        assert next_item(bob_elected, 3 * FAST_TTL + 10, "bob to win after alice's expiry") is True
        proxy.heal()
        assert not alice.is_leader()
    finally:
        sampler.kill()
        proxy.close()
        bob.stop()
        alice.stop()
        alice_store.close()
        bob_store.close()
    assert not both, f"two leaders for {(both[-1] - both[0]) * 1000 + 1:.0f} ms"


def test_a_frozen_server_ends_the_tenure_and_the_election_resumes(tmp_path, key: str) -> None:
    """SIGSTOP of the server: nothing answers, the leader steps down at its renew deadline (no
    hung greenlet); after SIGCONT a leader is elected again."""
    own = servers.start("postgres", tmp_path, 1)
    store = PostgresStore(own.addrs, user=own.SUPERUSER, timeout=1)
    alice = Candidate(store, key, "alice", ttl=FAST_TTL, retry=Backoff(initial=0.1, maximum=0.5))
    try:
        elected, _ = alice.run_for_election()
        assert next_item(elected, 3 * FAST_TTL, "alice's first item") is False
        assert next_item(elected, 3 * FAST_TTL, "alice to win") is True
        own.pause()
        try:
            assert next_item(elected, 3 * FAST_TTL, "alice to step down while the server is frozen") is False
        finally:
            own.resume()
        assert next_item(elected, 30, "alice to lead again after SIGCONT") is True
    finally:
        alice.stop()
        store.close()
        own.stop()


# -- bad input and unreachable servers (as tests/test_bad_input.py's table asks of the others) ------


def _silent(sockets: list) -> str:
    """A loopback address that accepts connections and never answers."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sockets.append(sock)
    return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("case", ["refused", "silent", "name does not resolve", "an etcd-like HTTP port"])
def test_an_unreachable_or_wrong_server_is_reported_within_its_timeout(case: str, key: str) -> None:
    sockets: list = []
    addr = {"refused": lambda: f"127.0.0.1:{closed_port()}", "silent": lambda: _silent(sockets),
            "name does not resolve": lambda: "no-such-host.invalid:5432",
            "an etcd-like HTTP port": lambda: _http_port(sockets)}[case]()
    store = from_url(f"postgres://app:{SECRET}@{addr}/db?timeout=1")
    started = time.monotonic()
    try:
        with pytest.raises(StoreError) as raised:
            store.leader(key)
        assert time.monotonic() - started < 10, "not reported within a bounded time"
        assert "postgres" in str(raised.value) and SECRET not in str(raised.value)
    finally:
        store.close()
        for sock in sockets:
            sock.close()


def _http_port(sockets: list) -> str:
    """A server that answers anything with an HTTP error and closes (not PostgreSQL)."""
    addr = _silent(sockets)
    listener = sockets[-1]

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    sockets.append(_Killer(gevent.spawn(serve)))
    return addr


class _Killer:
    def __init__(self, greenlet: gevent.Greenlet) -> None:
        self.greenlet = greenlet

    def close(self) -> None:
        self.greenlet.kill()


@pytest.mark.parametrize("make, error, says", [
    (lambda: new_store("postgres", ["h:0"]), InvalidArgumentError, "port"),
    (lambda: new_store("postgres", sslmode="sometimes"), InvalidArgumentError, "sslmode"),
    (lambda: new_store("postgres", cert_file="/etc/hostname"), InvalidArgumentError, "key_file"),
    (lambda: new_store("postgres", timeout=0), InvalidArgumentError, "timeout"),
    (lambda: new_store("postgres", table=""), InvalidArgumentError, "table"),
    (lambda: new_store("postgres", create="perhaps"), InvalidArgumentError, "create"),
    (lambda: from_url("postgres://[::1"), InvalidURLError, "malformed"),
    (lambda: from_url("postgres://h/db/extra"), InvalidArgumentError, "database"),
    (lambda: from_url(f"postgres://u:{SECRET}@h/db?user=v"), InvalidURLError, "twice"),
    (lambda: Candidate(new_store("postgres"), "k", "a", ttl=0.1), InvalidArgumentError, "ttl"),
    (lambda: Follower(new_store("postgres"), "a\ud800"), InvalidKeyError, "Unicode"),
], ids=["port zero", "bad sslmode", "cert without key", "zero timeout", "empty table", "bad create",
        "unclosed bracket", "path with two parts", "user twice", "ttl below 0.5 s", "lone surrogate"])
def test_bad_options_fail_fast_and_clearly(make, error, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(error) as raised:
        made = make()
        getattr(made, "close", lambda: None)()
    assert says in str(raised.value) and SECRET not in str(raised.value)
    assert time.monotonic() - started < 5


def test_the_benchmarks_run(tmp_path) -> None:
    """benchmarks/postgres_handover.py and postgres_idle.py in their smallest form (figures are
    printed, not judged: speed is measured in benchmarks/, not asserted)."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    runs = {"advisory-lock loop failover, holder frozen": ["benchmarks.postgres_handover", "--rounds", "2",
                                                           "--crashes", "1", "--ttl", "1", "--poll", "0.2",
                                                           "--bound", "5"],
            "of 20 lead": ["benchmarks.postgres_idle", "--candidates", "20", "--ttl", "2", "--window", "1"]}
    for printed, argv in runs.items():
        done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=150)
        assert done.returncode == 0, done.stderr[-2000:]
        assert printed in done.stdout, done.stdout
