"""Bad input, tried widely: every entry of the tables below must fail with a clear
``greenleader.errors`` exception (or, for the command line, a one-line message and exit status)
within a bounded time, and leave nothing behind: no greenlet, no descriptor, nothing in a store.

The cases complement tests/test_api.py, tests/test_contract.py (bad keys and candidate
arguments common to every store) and tests/test_cli.py: here are wrong types, empty and
oversized values, keys invalid for one backend only, TTLs out of one backend's range (one of
them learnt from the server), store options, unreachable and non-listening addresses, and a
server of another kind on the port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest

from greenleader import Backoff, Candidate, Follower
from greenleader.duties import Duties
from greenleader.errors import (
    GreenleaderError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidURLError,
    StoreUnavailableError,
)
from greenleader.stores import Store, from_url, new_store
from tests.backends import BackendEnv
from tests.candidate_process import REPO
from tests.support_zookeeper import leftovers
from tests.test_hygiene import assert_no_greenlet_left, live_greenlets, open_fds
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

#: Descriptors a case may leave open: client libraries keep a few for good once first used
#: (gRPC's poller and wake-up pipes, requests' pools are per store and closed with it).
FD_ALLOWANCE = 4
#: Seconds bad input may take to be refused. Validation needs no server, and the stores it is
#: given wait OFFLINE_TIMEOUT on a server that never answers, so a refusal that went to the
#: network would take longer: the bound is generous (a loaded machine, a first import of
#: grpc) without timing anything close.
FAST = 10.0
OFFLINE_TIMEOUT = 30
#: Seconds an unreachable or wrong store may take to be reported, with ``timeout=1``.
UNREACHABLE = 5.0
#: Seconds a store may take to close after such a failure. kazoo cannot interrupt a connection
#: handshake: closing waits for it to time out (max(10 s, session timeout) against a silent peer).
CLOSE_BOUND = 15.0


class Env:
    """What the cases need: stores (closed afterwards), addresses of servers, a scratch dir."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.stores: list[Store] = []
        self.sockets: list[socket.socket] = []

    def store(self, url: str) -> Store:
        made = from_url(url)
        self.stores.append(made)
        return made

    def server(self, kind: str) -> str:
        """The client address of a running ``kind`` server (the session's one-node cluster)."""
        return self.request.getfixturevalue(f"{kind}_cluster").addrs[0]

    def closed(self) -> str:
        """A loopback address nothing listens on: connections are refused at once."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{sock.getsockname()[1]}"

    def silent(self) -> str:
        """A loopback address that accepts connections (the kernel completes the handshake)
        and never answers: a hung server, or a partition after connecting."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.sockets.append(sock)
        return f"127.0.0.1:{sock.getsockname()[1]}"

    def close(self) -> float:
        """Close every store; return how long it took."""
        started = time.monotonic()
        for made in reversed(self.stores):
            made.close()
        for sock in self.sockets:
            sock.close()
        return time.monotonic() - started


def campaign(store: Store, key: str = "bad-input/key", ttl: float = 10.0) -> None:
    """Run a candidate until its campaign ends; raise the error that ended it."""
    candidate = Candidate(store, key, "alice", ttl=ttl)
    try:
        elected, errors = candidate.run_for_election()
        assert list(elected) in ([False], [False, True, False]), "the campaign ended, never leading"
        found = list(errors)
    finally:
        candidate.stop()
    assert found, "the campaign ended without an error"
    raise found[0]


def follow(store: Store, key: str = "bad-input/key") -> None:
    """Follow until the watch ends; raise the error that ended it."""
    follower = Follower(store, key)
    try:
        leaders, errors = follower.follow_election()
        assert list(leaders) == [], "a broken store named a leader"
        found = list(errors)
    finally:
        follower.stop()
    assert found, "the watch ended without an error"
    raise found[0]


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Env], Any]
    error: type[GreenleaderError]
    says: str  # part of the message
    bound: float = FAST  # seconds for the error to come
    servers: tuple[str, ...] = ()  # the running servers it uses (started before the clock starts)


def file_store(env: Env) -> Store:
    return new_store("file", str(env.tmp_path / "elections"))


def offline(kind: str) -> Callable[[Env], Store]:
    """A store of ``kind`` on a server that never answers (validation needs no server)."""
    return lambda env: env.store(f"{kind}://{env.silent()}?timeout={OFFLINE_TIMEOUT}")


CASES = [
    # -- API: wrong types, empty, oversized, out of range ------------------------------------------
    Case("candidate node oversized", lambda env: Candidate(file_store(env), "k", "n" * 513), InvalidArgumentError,
         "limit is 512"),
    Case("candidate node with a tab", lambda env: Candidate(file_store(env), "k", "a\tb"), InvalidArgumentError,
         "control characters"),
    Case("candidate node bytes", lambda env: Candidate(file_store(env), "k", b"alice"), InvalidArgumentError,
         "must be a str"),
    Case("candidate ttl list", lambda env: Candidate(file_store(env), "k", "a", [15]), InvalidArgumentError,
         "must be a number"),
    Case("candidate ttl infinite", lambda env: Candidate(file_store(env), "k", "a", float("inf")),
         InvalidArgumentError, "finite"),
    Case("candidate resign_holdoff negative", lambda env: Candidate(file_store(env), "k", "a", resign_holdoff=-1),
         InvalidArgumentError, "resign_holdoff"),
    Case("candidate resign_holdoff text", lambda env: Candidate(file_store(env), "k", "a", resign_holdoff="soon"),
         InvalidArgumentError, "resign_holdoff"),
    Case("candidate retry int", lambda env: Candidate(file_store(env), "k", "a", retry=5), InvalidArgumentError,
         "retry must be"),
    Case("follower retry text", lambda env: Follower(file_store(env), "k", retry="yes"), InvalidArgumentError,
         "retry must be"),
    Case("backoff maximum below initial", lambda env: Backoff(initial=2, maximum=1), InvalidArgumentError,
         "initial <= maximum"),
    Case("backoff jitter above 1", lambda env: Backoff(jitter=2), InvalidArgumentError, "jitter"),
    Case("duty policy unknown", lambda env: Duties(on_error="explode"), InvalidArgumentError, "on_error"),
    Case("duty not callable", lambda env: Duties().register(5), InvalidArgumentError, "callable"),
    # -- keys invalid for one backend --------------------------------------------------------------
    Case("consul key with leading slash", lambda env: Follower(offline("consul")(env), "/a"), InvalidKeyError,
         "must not start with '/'"),
    Case("consul key with empty segment", lambda env: Follower(offline("consul")(env), "a//b"), InvalidKeyError,
         "empty"),
    Case("consul key lone surrogate", lambda env: Follower(offline("consul")(env), "a\ud800"), InvalidKeyError,
         "Unicode"),
    Case("etcd key trailing slash", lambda env: Follower(offline("etcd")(env), "a/"), InvalidKeyError,
         "must not end with '/'"),
    Case("etcd key over 512 bytes", lambda env: Follower(offline("etcd")(env), "é" * 300), InvalidKeyError,
         "600 bytes"),
    Case("etcd key lone surrogate", lambda env: Follower(offline("etcd")(env), "a\ud800"), InvalidKeyError,
         "Unicode"),
    Case("zookeeper key reserved", lambda env: Follower(offline("zookeeper")(env), "zookeeper/x"), InvalidKeyError,
         "reserves"),
    Case("zookeeper key dot-dot", lambda env: Follower(offline("zookeeper")(env), "a/../b"), InvalidKeyError,
         "'..'"),
    Case("zookeeper key bad code point", lambda env: Follower(offline("zookeeper")(env), "a\ufff0"),
         InvalidKeyError, "ZooKeeper paths may not"),
    Case("postgres key lone surrogate", lambda env: Follower(offline("postgres")(env), "a\ud800"), InvalidKeyError,
         "Unicode"),
    # -- TTLs out of a backend's range ----------------------------------------------------------------
    Case("consul ttl below 10 s", lambda env: Candidate(offline("consul")(env), "k", "a", ttl=5),
         InvalidArgumentError, "at least 10s"),
    Case("consul ttl above a day", lambda env: Candidate(offline("consul")(env), "k", "a", ttl=86401),
         InvalidArgumentError, "86400"),
    Case("etcd ttl below 1 s", lambda env: Candidate(offline("etcd")(env), "k", "a", ttl=0.5),
         InvalidArgumentError, "range"),
    Case("zookeeper ttl below 0.1 s", lambda env: Candidate(offline("zookeeper")(env), "k", "a", ttl=0.05),
         InvalidArgumentError, "range"),
    Case("zookeeper ttl above the server's maximum",  # learnt from the server: a 60 s maximum
         lambda env: campaign(env.store(f"zookeeper://{env.server('zookeeper')}?timeout=5"), ttl=61),
         InvalidArgumentError, "at most 60s", bound=UNREACHABLE, servers=("zookeeper",)),
    Case("postgres ttl below 0.5 s", lambda env: Candidate(offline("postgres")(env), "k", "a", ttl=0.1),
         InvalidArgumentError, "range"),
    Case("postgres ttl above a day", lambda env: Candidate(offline("postgres")(env), "k", "a", ttl=86401),
         InvalidArgumentError, "86400"),
    # -- store options and URLs --------------------------------------------------------------------------
    Case("consul lock_delay above 60 s", lambda env: new_store("consul", lock_delay=61), InvalidArgumentError,
         "lock_delay"),
    Case("consul wait too short", lambda env: from_url("consul://h:8500?wait=0.01"), InvalidArgumentError, "wait"),
    Case("consul scheme ftp", lambda env: new_store("consul", scheme="ftp"), InvalidArgumentError, "scheme"),
    Case("consul ca_file missing", lambda env: from_url("consul://h:8500?ca_file=/nonexistent"),
         InvalidArgumentError, "ca_file"),
    Case("consul token with a newline", lambda env: new_store("consul", token="s3cret\n"), InvalidArgumentError,
         "control characters"),
    Case("consul token outside ASCII", lambda env: new_store("consul", token="s\u00e9cret\u2013"),
         InvalidArgumentError, "must be ASCII"),
    Case("consul host label too long", lambda env: new_store("consul", ["a" * 64 + ".example:8500"]),
         InvalidArgumentError, "not a valid host name"),
    Case("consul url port out of range", lambda env: from_url("consul://h:99999"), InvalidArgumentError, "99999"),
    Case("etcd user without password", lambda env: from_url("etcd://h:2379?user=root"), InvalidArgumentError,
         "needs both user and password"),
    Case("etcd port zero", lambda env: new_store("etcd", ["h:0"]), InvalidArgumentError, "invalid port"),
    Case("etcd client cert without its key", lambda env: new_store("etcd", cert_file="/etc/hostname"),
         InvalidArgumentError, "needs key_file"),
    Case("etcd url unclosed bracket", lambda env: from_url("etcd://[::1"), InvalidURLError, "malformed"),
    Case("zookeeper auth without colon", lambda env: new_store("zookeeper", auth="nocolon"), InvalidArgumentError,
         "user:password"),
    Case("zookeeper address with a path", lambda env: new_store("zookeeper", ["h:2181/x"]), InvalidArgumentError,
         "not 'host:port'"),
    Case("zookeeper chroot reserved", lambda env: from_url("zookeeper://h:2181/zookeeper/x"), InvalidArgumentError,
         "reserves"),
    Case("zookeeper chroot as option", lambda env: from_url("zookeeper://h:2181?chroot=/x"), InvalidArgumentError,
         "URL path"),
    Case("zookeeper host too long", lambda env: new_store("zookeeper", ["h" * 300 + ":2181"]),
         InvalidArgumentError, "not a valid host name"),
    Case("postgres unknown option", lambda env: from_url("postgres://h:5432/db?bogus=1"), InvalidURLError,
         "bad options"),
    Case("postgres sslmode unknown", lambda env: from_url("postgres://h:5432/db?sslmode=maybe"),
         InvalidArgumentError, "sslmode must be one of"),
    Case("postgres sslmode empty", lambda env: new_store("postgres", sslmode=""), InvalidArgumentError, "sslmode"),
    Case("postgres database path with a slash", lambda env: from_url("postgres://h:5432/a/b"), InvalidArgumentError,
         "database name"),
    Case("postgres database given twice", lambda env: from_url("postgres://h:5432/a?dbname=b"),
         InvalidArgumentError, "not both"),
    Case("postgres table name too long", lambda env: new_store("postgres", table="t" * 51), InvalidArgumentError,
         "limit is 50"),
    Case("postgres pool_size zero", lambda env: from_url("postgres://h:5432/db?pool_size=0"), InvalidArgumentError,
         "pool_size"),
    Case("postgres timeout text", lambda env: from_url("postgres://h:5432/db?timeout=soon"), InvalidArgumentError,
         "timeout"),
    Case("postgres sslrootcert missing", lambda env: from_url("postgres://h:5432/db?sslrootcert=/nonexistent"),
         InvalidArgumentError, "not a readable file"),
    Case("postgres url password, port out of range", lambda env: from_url("postgres://u:s3cret@h:99999/db"),
         InvalidArgumentError, "99999"),
    Case("postgres url password, unknown option", lambda env: from_url("postgres://u:s3cret@h:5432/db?bogus=1"),
         InvalidURLError, "bad options"),
    Case("postgres url password, sslmode unknown",
         lambda env: from_url("postgres://u:s3cret@h:5432/db?sslmode=maybe"), InvalidArgumentError, "sslmode"),
    Case("memory store with addresses", lambda env: new_store("memory", ["h:1"]), InvalidArgumentError,
         "no addresses"),
    # -- unreachable, not listening, silent, another server on the port ----------------------------------
    Case("consul refused", lambda env: env.store(f"consul://{env.closed()}?timeout=1").leader("k"),
         StoreUnavailableError, "refused", bound=UNREACHABLE),
    Case("etcd refused", lambda env: campaign(env.store(f"etcd://{env.closed()}?timeout=1")),
         StoreUnavailableError, "etcd", bound=UNREACHABLE),
    Case("zookeeper refused", lambda env: follow(env.store(f"zookeeper://{env.closed()}?timeout=1")),
         StoreUnavailableError, "cannot connect", bound=UNREACHABLE),
    Case("consul silent", lambda env: campaign(env.store(f"consul://{env.silent()}?timeout=1&retry_for=1")),
         StoreUnavailableError, "timed out", bound=UNREACHABLE),
    Case("etcd silent", lambda env: follow(env.store(f"etcd://{env.silent()}?timeout=1")),
         StoreUnavailableError, "etcd", bound=UNREACHABLE),
    Case("zookeeper silent", lambda env: env.store(f"zookeeper://{env.silent()}?timeout=1").leader("k"),
         StoreUnavailableError, "cannot connect", bound=UNREACHABLE),
    Case("postgres refused, password in the url",
         lambda env: campaign(env.store(f"postgres://u:s3cret@{env.closed()}/db?timeout=1")),
         StoreUnavailableError, "cannot connect", bound=UNREACHABLE),
    Case("postgres silent, password in the url",
         lambda env: follow(env.store(f"postgres://u:s3cret@{env.silent()}/db?timeout=1")),
         StoreUnavailableError, "did not answer", bound=UNREACHABLE),
    Case("etcd name does not resolve", lambda env: env.store("etcd://no-such-host.invalid:2379?timeout=1")
         .leader("k"), StoreUnavailableError, "etcd", bound=UNREACHABLE),
    Case("etcd store on the consul port", lambda env: campaign(env.store(f"etcd://{env.server('consul')}?timeout=1")),
         StoreUnavailableError, "HTTP/2", bound=UNREACHABLE, servers=("consul",)),
    Case("consul store on the zookeeper port",
         lambda env: follow(env.store(f"consul://{env.server('zookeeper')}?timeout=1&retry_for=1")),
         StoreUnavailableError, "Consul", bound=UNREACHABLE, servers=("zookeeper",)),
    Case("consul store on the etcd port",
         lambda env: campaign(env.store(f"consul://{env.server('etcd')}?timeout=1&retry_for=1")),
         StoreUnavailableError, "Consul", bound=UNREACHABLE, servers=("etcd",)),
    Case("zookeeper store on the etcd port",
         lambda env: campaign(env.store(f"zookeeper://{env.server('etcd')}?timeout=1"), ttl=2),
         StoreUnavailableError, "cannot connect", bound=UNREACHABLE, servers=("etcd",)),
    Case("postgres store on the consul port",
         lambda env: campaign(env.store(f"postgres://{env.server('consul')}/db?timeout=1")),
         StoreUnavailableError, "postgres", bound=UNREACHABLE, servers=("consul",)),
    Case("consul store on the postgres port",
         lambda env: follow(env.store(f"consul://{env.server('postgres')}?timeout=1&retry_for=1")),
         StoreUnavailableError, "Consul", bound=UNREACHABLE, servers=("postgres",)),
    Case("etcd store on the zookeeper port", lambda env: env.store(f"etcd://{env.server('zookeeper')}?timeout=1")
         .leader("k"), StoreUnavailableError, "etcd", bound=UNREACHABLE, servers=("zookeeper",)),
]


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    made = Env(request, tmp_path)
    yield made
    made.close()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_fast_and_clearly(case: Case, env: Env, request: pytest.FixtureRequest) -> None:
    for kind in case.servers:  # started before the clock starts
        env.server(kind)
    greenlets, fds = live_greenlets(), open_fds()
    started = time.monotonic()
    limit = gevent.Timeout(case.bound + 30, AssertionError(f"no error within {case.bound + 30:g}s"))
    with limit, pytest.raises(case.error) as raised:
        case.call(env)
    took = time.monotonic() - started
    message = str(raised.value)
    assert case.says in message, f"{type(raised.value).__name__}: {message!r} does not say {case.says!r}"
    assert "Traceback" not in message and len(message) < 1000, message
    assert "s3cret" not in message, "a secret was echoed"
    assert took <= case.bound, f"the error took {took:.2f}s, bound {case.bound:g}s: {message}"

    closing = env.close()
    assert closing <= CLOSE_BOUND, f"closing the stores took {closing:.2f}s"
    assert_no_greenlet_left(greenlets, "after the error")
    wait_until(lambda: open_fds() <= fds + FD_ALLOWANCE, 5, f"descriptors to close ({fds} before the case)")


def test_no_state_is_left_in_the_stores(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The cases that reached a real server of the right kind left no session, lease or node:
    a refused TTL is refused before the candidate joins the queue."""
    env = Env(request, tmp_path)
    try:
        with pytest.raises(InvalidArgumentError):
            campaign(env.store(f"zookeeper://{env.server('zookeeper')}?timeout=5"), key="bad-input/leftover", ttl=61)
    finally:
        env.close()
    cluster = request.getfixturevalue("zookeeper_cluster")
    assert leftovers(BackendEnv("zookeeper", tmp_path, cluster), "bad-input/leftover") == []


# -- the command line ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    id: str
    args: Callable[[Env], list[str]]
    code: int
    says: str


CLI_CASES = [
    CliCase("leader on a refused consul", lambda env: ["leader", "--key", "job", "--store",
                                                         f"consul://{env.closed()}?timeout=1"], 1, "refused"),
    CliCase("run on the consul port as etcd", lambda env: ["run", "--key", "job", "--store",
                                                             f"etcd://{env.server('consul')}?timeout=1", "--", "true"],
            1, "store error"),
    CliCase("watch on a silent zookeeper", lambda env: ["watch", "--key", "job", "--store",
                                                          f"zookeeper://{env.silent()}?timeout=1"], 1, "store error"),
    CliCase("run with a consul ttl below 10 s", lambda env: ["run", "--key", "job", "--ttl", "5", "--store",
                                                               f"consul://{env.closed()}", "--", "true"],
            2, "too short for Consul"),
    CliCase("leader with a consul key starting with /", lambda env: ["leader", "--key", "/job", "--store",
                                                                       f"consul://{env.closed()}"],
            2, "must not start with '/'"),
    CliCase("leader with an oversized key", lambda env: ["leader", "--key", "k" * 600], 2, "limit is 512"),
    CliCase("leader with etcd user but no password", lambda env: ["leader", "--key", "job", "--store",
                                                                    "etcd://h:2379?user=root"],
            2, "needs both user and password"),
    CliCase("leader in the reserved zookeeper chroot", lambda env: ["leader", "--key", "job", "--store",
                                                                      "zookeeper://h:2181/zookeeper"], 2, "reserves"),
    CliCase("run with a ttl of 1e308", lambda env: ["run", "--key", "job", "--ttl", "1e308", "--store",
                                                      f"file://{env.tmp_path}", "--", "true"], 2, "outside"),
    CliCase("leader in an impossible directory", lambda env: ["leader", "--key", "job", "--store",
                                                                "file:///proc/greenleader"], 1,
            "cannot create the file store directory"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_bad_command_lines_exit_with_a_clear_message(case: CliCase, env: Env) -> None:
    args = case.args(env)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "greenleader", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    took = time.monotonic() - started
    assert done.returncode == case.code, f"exit {done.returncode}, stderr: {done.stderr}"
    said = [line for line in done.stderr.splitlines() if line.startswith("greenleader: ")]  # the rest is logging
    assert len(said) == 1 and case.says in said[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert took < 20, f"took {took:.1f}s"
