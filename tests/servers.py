"""Real Consul, etcd and ZooKeeper servers for tests, on free loopback ports.

Each server runs as a child process in its own process group, with its data and log in a fresh
directory under ``workdir``. Servers are stopped by :meth:`Cluster.stop`, at interpreter exit
(atexit) and, if the test process dies abruptly, by the kernel (``PR_SET_PDEATHSIG``; it fires
when the *thread* that started the server exits, so start servers from the main thread).

Install the binaries with ``scripts/install-servers.sh`` (Debian packages: etcd 3.4, ZooKeeper
3.8, Consul 1.8 from bullseye).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

__all__ = [
    "Cluster", "Node", "ServerBinaryMissing",
    "start", "start_consul", "start_etcd", "start_pgbouncer", "start_postgres", "start_secure", "start_zookeeper",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `sudo bash scripts/install-servers.sh` (Debian bookworm)"
READY_TIMEOUT = 30.0  # seconds: default bound of every wait in this module
POLL = 0.05  # seconds between readiness polls
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
# Explicit jars rather than /usr/share/java/*: that directory holds half a dozen slf4j bindings,
# so which one wins (and whether ZooKeeper logs at all) would depend on directory order.
ZK_JARS = [
    "/usr/share/java/zookeeper.jar",  # its manifest Class-Path pulls in the other dependencies
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
]
ZK_LOG4J = """\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n
"""


class ServerBinaryMissing(RuntimeError):
    """A server binary or jar is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# helpers

_handed_out: set[int] = set()

#: Where test servers' ports come from: below Linux's ephemeral range (32768-60999), so no
#: connect() or bind() to port 0, of this process or any other, takes a port between the check
#: that it is free and the server's own bind, nor while a stopped server waits for its restart.
PORT_RANGE = range(20000, 32768)
_pick = random.Random()  # seeded from the system: the tests' seeding of ``random`` leaves it alone


def _shard() -> tuple[int, int]:
    """This process's (index, count) among the pytest processes of one run (scripts/test sets
    GREENLEADER_TEST_SHARD=index/count); (0, 1) when it runs alone."""
    index, _, count = os.environ.get("GREENLEADER_TEST_SHARD", "0/1").partition("/")
    return int(index), int(count)


def _free(port: int) -> bool:
    """Nothing uses ``port`` on the loopback for TCP (listening, connected or in TIME_WAIT) or UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):  # consul serf uses UDP too
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _new_port() -> int:
    """A free port of PORT_RANGE that this process has never handed out. The processes of one
    run take ports of different remainders, so that one never takes a port another holds for a
    stopped server's restart."""
    index, count = _shard()
    while True:
        port = _pick.randrange(PORT_RANGE.start + index, PORT_RANGE.stop, count)
        if port not in _handed_out and _free(port):
            _handed_out.add(port)
            return port


def closed_port() -> int:
    """A loopback port nothing listens on (and that no server of this process will get)."""
    return _new_port()


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports, each free for both TCP and UDP right now.

    A port is never handed out twice by this process, so the ports of a stopped server stay
    reserved for its restart, and the many ports of a cluster never collide with each other.
    """
    return [_new_port() for _ in range(count)]


def _require(name: str) -> str:
    """Full path of an executable on PATH or of an absolute file, else ServerBinaryMissing."""
    found = name if os.path.isabs(name) else shutil.which(name)
    if not found or not os.path.exists(found):
        raise ServerBinaryMissing(f"{name} is not installed; {INSTALL_HINT}")
    return found


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never use a proxy


def http(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> bytes:
    """One HTTP request; returns the body, raises OSError (incl. HTTPError) on failure."""
    req = urllib.request.Request(url, data=body, method=method)
    with _opener.open(req, timeout=timeout) as resp:
        return resp.read()


def four_letter_word(addr: str, word: str, timeout: float = 2.0) -> str:
    """Send a ZooKeeper four-letter command (``ruok``, ``srvr``, ...) and return the reply."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _recv_packet(sock: socket.socket) -> bytes:
    """One length-prefixed ZooKeeper packet."""
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by zookeeper")
            buf += chunk
        return buf

    (length,) = struct.unpack(">i", exact(4))
    return exact(length)


def zk_session_roundtrip(addr: str, timeout: float = 2.0) -> None:
    """Open and close a real ZooKeeper session (needs a quorum); raises OSError if refused."""
    host, port = addr.rsplit(":", 1)
    # ConnectRequest: protocolVersion, lastZxidSeen, timeOut, sessionId, passwd, readOnly
    connect = struct.pack(">iqiqi16s?", 0, 0, 4000, 0, 16, b"\0" * 16, False)
    close = struct.pack(">ii", 1, -11)  # RequestHeader(xid=1, type=closeSession)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(connect)) + connect)
        _, _, session_id = struct.unpack(">iiq", _recv_packet(sock)[:16])
        if not session_id:
            raise ConnectionError("zookeeper refused the session")
        sock.sendall(struct.pack(">i", len(close)) + close)
        _recv_packet(sock)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _poll(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    """Call ``check`` every POLL seconds until it is true; RuntimeError after ``timeout``.

    OSError/ValueError/KeyError from ``check`` mean "not yet"; RuntimeError aborts at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        except RuntimeError as exc:
            raise RuntimeError(f"{what}: {exc}\n{logs()}") from None
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what}: not ready after {timeout:g}s (last error: {last_error!r})\n{logs()}"
            )
        time.sleep(POLL)


# ---------------------------------------------------------------------------------------------
# nodes and clusters

_live: set[Node] = set()


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_live):
        node.kill()


class Node:
    """One server process; keeps its ports and data directory across restarts."""

    def __init__(self, cluster: Cluster, name: str, ports: dict[str, int]) -> None:
        self.cluster = cluster
        self.name = name
        self.ports = ports  # every port this node listens on, by role; "client" is the API
        self.client_addr = f"127.0.0.1:{ports['client']}"
        self.dir = cluster.dir / name
        self.dir.mkdir(parents=True)
        self.log_path = self.dir / "server.log"
        self.argv: list[str] = []  # filled in by the cluster
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"<Node {self.cluster.kind}/{self.name} {self.client_addr} pid={self.pid}>"

    def start(self) -> None:
        """(Re)start with the same ports and data dir; wait until it answers.

        For a one-node cluster this waits until the store serves clients; for a cluster member
        only until the process answers on its client port (Cluster.wait_ready waits for quorum).
        """
        self.spawn()
        self.wait_answers()
        if len(self.cluster.nodes) == 1:
            self.cluster.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting for it (no-op if it is running)."""
        if self.is_running():
            return
        with open(self.log_path, "ab") as logf:
            self._log_offset = logf.tell()
            logf.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            logf.flush()
            options: dict[str, Any] = {"cwd": self.dir, **self.cluster._popen_options()}
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_set_pdeathsig, **options,
            )
        self.pid = self._proc.pid
        _live.add(self)
        log.info("started %r", self)

    def wait_answers(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the process answers a basic client request (no quorum needed)."""
        def check() -> bool:
            if not self.is_running():
                code = self._proc.returncode if self._proc else None
                raise RuntimeError(f"process exited with status {code}")
            return self.cluster._answers(self)

        _poll(repr(self), check, timeout, self.log_tail)

    def stop(self) -> None:
        """The kind's stop signal (SIGTERM) to the process group, wait up to STOP_GRACE seconds,
        then SIGKILL."""
        self._signal(self.cluster.stop_signal)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the process group now."""
        self._signal(signal.SIGKILL)
        self._reap()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines logged since the latest start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- tail of {self.log_path} ---\n{tail}"

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("%r ignored SIGTERM for %gs, killing it", self, STOP_GRACE)
            self._signal(signal.SIGKILL)
            self._proc.wait()
        if self.pid is not None:
            log.info("stopped %r (exit %s)", self, self._proc.returncode)
        self.pid = None
        _live.discard(self)


class Cluster:
    """1 or 3 nodes of one kind; ``url`` is the greenleader URL naming all of them."""

    kind = ""
    port_roles: tuple[str, ...] = ("client",)
    binary = ""
    #: What asks the server to stop (then SIGKILL after STOP_GRACE).
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: pathlib.Path, nodes: int) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        _require(self.binary)
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.kind}{nodes}-", dir=workdir))
        self.token = uuid.uuid4().hex[:12]  # keeps clusters with recycled ports apart
        self.nodes: list[Node] = []
        for i, ports in enumerate(self._allocate(nodes), 1):
            self.nodes.append(Node(self, f"n{i}", ports))
        for node in self.nodes:
            node.argv = self._argv(node)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @property
    def addrs(self) -> list[str]:
        return [n.client_addr for n in self.nodes]

    @property
    def url(self) -> str:
        return f"{self.kind}://{','.join(self.addrs)}"

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.is_running()]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the running nodes agree on a running leader and each serves clients."""
        def check() -> bool:
            nodes = self.running()
            if not nodes:
                raise RuntimeError("no node is running")
            return self._agreed_leader(nodes) is not None and all(self._serves(n) for n in nodes)

        _poll(repr(self), check, timeout, self._log_tails)

    def leader_node(self) -> Node:
        """The store's own raft/zab leader, once the running nodes agree on it (bounded wait)."""
        found: list[Node] = []

        def check() -> bool:
            leader = self._agreed_leader(self.running())
            if leader is not None:
                found.append(leader)
            return leader is not None

        _poll(f"{self!r} leader", check, READY_TIMEOUT, self._log_tails)
        return found[0]

    def stop(self) -> None:
        """Stop all nodes (SIGTERM, SIGKILL after STOP_GRACE): followers first, then the leader.

        Followers first, because a terminating etcd leader spends ~5 s trying to hand its
        leadership to a follower that is itself shutting down.
        """
        try:
            leader = self._agreed_leader(self.running()) if len(self.nodes) > 1 else None
        except (OSError, ValueError, KeyError):
            leader = None
        for group in ([n for n in self.nodes if n is not leader], [leader] if leader else []):
            for node in group:
                node._signal(self.stop_signal)
            for node in group:
                node._reap()

    def start_all(self, timeout: float = READY_TIMEOUT) -> Cluster:
        """Start every node in parallel and wait until the cluster serves; stop it on failure."""
        t0 = time.monotonic()
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_answers(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("%r ready in %.2fs", self, time.monotonic() - t0)
        return self

    def _allocate(self, nodes: int) -> list[dict[str, int]]:
        ports = iter(free_ports(nodes * len(self.port_roles)))
        return [{role: next(ports) for role in self.port_roles} for _ in range(nodes)]

    def _log_tails(self) -> str:
        return "\n".join(n.log_tail(20) for n in self.nodes)

    # per-kind protocol ---------------------------------------------------------------------
    def _popen_options(self) -> dict[str, Any]:
        """Extra ``subprocess.Popen`` options of this kind's server processes (user, cwd)."""
        return {}

    def _argv(self, node: Node) -> list[str]:
        raise NotImplementedError

    def _answers(self, node: Node) -> bool:
        """True if the process answers on its client port (no quorum needed)."""
        raise NotImplementedError

    def _agreed_leader(self, nodes: list[Node]) -> Node | None:
        """The leader all ``nodes`` report, if they agree and it is one of them."""
        raise NotImplementedError

    def _serves(self, node: Node) -> bool:
        """True if a client request through ``node`` that needs quorum succeeds."""
        raise NotImplementedError


class ConsulCluster(Cluster):
    """Consul 1.8 agents; all are servers.

    One node runs ``agent -dev``: its data is in memory, so a restarted dev node comes back
    empty (no keys, no sessions). Three nodes run ``agent -server -bootstrap-expect 3`` with
    data dirs, ``raft_multiplier = 1`` (1 s election timeout) and autopilot's dead-server
    cleanup off, so a killed server stays a voter and comes back on restart.
    DNS and gRPC are disabled (port -1), so no default port (8600, 8502) is ever taken.
    """

    kind = "consul"
    binary = "consul"
    port_roles = ("client", "server", "serf_lan", "serf_wan")

    def _argv(self, node: Node) -> list[str]:
        p = node.ports
        argv = [
            self.binary, "agent", "-node", node.name, "-bind", "127.0.0.1",
            "-client", "127.0.0.1", "-http-port", str(p["client"]),
            "-server-port", str(p["server"]), "-serf-lan-port", str(p["serf_lan"]),
            "-serf-wan-port", str(p["serf_wan"]), "-dns-port", "-1", "-grpc-port", "-1",
            "-log-level", "info",
        ]
        hcl = ["disable_update_check = true", "connect { enabled = false }",
               "performance { raft_multiplier = 1 }"]
        if len(self.nodes) == 1:
            argv.append("-dev")
        else:
            others = [f"127.0.0.1:{n.ports['serf_lan']}" for n in self.nodes if n is not node]
            argv += ["-server", "-bootstrap-expect", str(len(self.nodes)),
                     "-data-dir", str(node.dir / "data"), "-retry-interval", "200ms"]
            for other in others:
                argv += ["-retry-join", other]
            hcl += ['autopilot { cleanup_dead_servers = false, server_stabilization_time = "1s" }',
                    "leave_on_terminate = false"]
        for line in hcl:
            argv += ["-hcl", line]
        return argv

    def _get(self, node: Node, path: str) -> bytes:
        return http("GET", f"http://{node.client_addr}{path}")

    def _answers(self, node: Node) -> bool:
        self._get(node, "/v1/status/leader")
        return True

    def _agreed_leader(self, nodes: list[Node]) -> Node | None:
        leaders = {json.loads(self._get(n, "/v1/status/leader")) for n in nodes}
        if len(leaders) != 1:
            return None
        addr = leaders.pop()
        return next((n for n in nodes if addr == f"127.0.0.1:{n.ports['server']}"), None)

    def _serves(self, node: Node) -> bool:
        base = f"http://{node.client_addr}/v1"
        key = f"{base}/kv/greenleader-test-servers/ready-{node.name}"
        http("PUT", key, b"1")
        http("DELETE", key)
        # a session needs the agent's node registered in the catalog with serfHealth passing
        session = json.loads(http("PUT", f"{base}/session/create", b"{}"))["ID"]
        http("PUT", f"{base}/session/destroy/{session}")
        return True


class EtcdCluster(Cluster):
    """etcd 3.4 members with ``--unsafe-no-fsync`` and a 50 ms heartbeat / 500 ms election."""

    kind = "etcd"
    binary = "etcd"
    port_roles = ("client", "peer")

    def _argv(self, node: Node) -> list[str]:
        client = f"http://127.0.0.1:{node.ports['client']}"
        peer = f"http://127.0.0.1:{node.ports['peer']}"
        initial = ",".join(f"{n.name}=http://127.0.0.1:{n.ports['peer']}" for n in self.nodes)
        return [
            self.binary, "--name", node.name, "--data-dir", str(node.dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--unsafe-no-fsync", "--logger", "zap", "--log-outputs", "stderr",
        ]

    def _answers(self, node: Node) -> bool:
        http("GET", f"http://{node.client_addr}/version")
        return True

    def _status(self, node: Node) -> dict:
        return json.loads(http("POST", f"http://{node.client_addr}/v3/maintenance/status", b"{}"))

    def _agreed_leader(self, nodes: list[Node]) -> Node | None:
        statuses = {n.name: self._status(n) for n in nodes}
        leaders = {s.get("leader", "0") for s in statuses.values()}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        return next((n for n in nodes if statuses[n.name]["header"]["member_id"] == leader), None)

    def _serves(self, node: Node) -> bool:
        base = f"http://{node.client_addr}"
        if json.loads(http("GET", f"{base}/health"))["health"] != "true":
            return False
        key = base64.b64encode(f"greenleader-test-servers/ready-{node.name}".encode()).decode()
        http("POST", f"{base}/v3/kv/put", json.dumps({"key": key, "value": ""}).encode())
        http("POST", f"{base}/v3/kv/deleterange", json.dumps({"key": key}).encode())
        return True


class ZooKeeperCluster(Cluster):
    """ZooKeeper 3.8: one standalone server, or a quorum of QuorumPeerMain peers.

    ``tickTime=200`` with ``minSessionTimeout=400`` (and ``maxSessionTimeout=60000``), so tests
    may use short session timeouts; ``forceSync=no`` for speed; logs go to ``server.log``.
    """

    kind = "zookeeper"
    binary = "java"
    port_roles = ("client", "quorum", "election")

    def __init__(self, workdir: pathlib.Path, nodes: int) -> None:
        for jar in ZK_JARS:
            _require(jar)
        super().__init__(workdir, nodes)

    def _argv(self, node: Node) -> list[str]:
        cfg = [
            "tickTime=200", "initLimit=50", "syncLimit=10",
            "minSessionTimeout=400", "maxSessionTimeout=60000",
            f"dataDir={node.dir / 'data'}", "clientPortAddress=127.0.0.1",
            f"clientPort={node.ports['client']}", "admin.enableServer=false",
            "4lw.commands.whitelist=*", "forceSync=no", "preAllocSize=1024",
            "maxClientCnxns=0", "reconfigEnabled=false",
        ]
        main = "org.apache.zookeeper.server.ZooKeeperServerMain"
        (node.dir / "data").mkdir(exist_ok=True)
        if len(self.nodes) > 1:
            main = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
            for i, n in enumerate(self.nodes, 1):
                cfg.append(f"server.{i}=127.0.0.1:{n.ports['quorum']}:{n.ports['election']}")
            (node.dir / "data" / "myid").write_text(f"{self.nodes.index(node) + 1}\n")
        (node.dir / "zoo.cfg").write_text("\n".join(cfg) + "\n")
        (node.dir / "log4j.properties").write_text(ZK_LOG4J)
        return [
            # C1 only (TieredStopAtLevel=1): the JVM starts about twice as fast on a busy box
            _require("java"), "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j.configuration=file:{node.dir / 'log4j.properties'}",
            f"-Dzookeeper.log.dir={node.dir}",
            "-Dzookeeper.fastleader.maxNotificationInterval=1000",  # default 60 s backoff
            "-Dzookeeper.cnxTimeout=1000",
            "-cp", ":".join(ZK_JARS), main, str(node.dir / "zoo.cfg"),
        ]

    def _answers(self, node: Node) -> bool:
        return four_letter_word(node.client_addr, "ruok") == "imok"

    def _mode(self, node: Node) -> str | None:
        for line in four_letter_word(node.client_addr, "srvr").splitlines():
            if line.startswith("Mode: "):
                return line.split(":", 1)[1].strip()
        return None  # "not currently serving requests"

    def _agreed_leader(self, nodes: list[Node]) -> Node | None:
        modes = {n.name: self._mode(n) for n in nodes}
        leaders = [n for n in nodes if modes[n.name] in ("leader", "standalone")]
        others_follow = all(modes[n.name] == "follower" for n in nodes if n not in leaders)
        return leaders[0] if len(leaders) == 1 and others_follow else None

    def _serves(self, node: Node) -> bool:
        zk_session_roundtrip(node.client_addr)
        return True


class PostgresCluster(Cluster):
    """One PostgreSQL server (Debian's ``postgresql`` package): ``initdb`` once, then ``postgres``
    on a loopback port, with ``fsync=off`` (a killed server keeps its commits in the page cache;
    ``synchronous_commit`` stays on, so no acknowledged commit is lost to a SIGKILL).

    The server refuses to run as root: then it runs as ``nobody``, with its data in a directory of
    its own under the system's temporary directory (pytest's, under root's 0700 one, is out of
    its reach). The superuser ``postgres`` connects without a password (``trust``), over TCP.
    """

    kind = "postgres"
    binary = "postgres"
    port_roles = ("client",)
    #: Fast shutdown: SIGTERM (smart) waits for every client to disconnect.
    stop_signal = signal.SIGINT
    SUPERUSER = "postgres"
    DBNAME = "postgres"

    def __init__(self, workdir: pathlib.Path, nodes: int) -> None:
        if nodes != 1:
            raise ValueError("postgres clusters have one node (no replication in tests)")
        self.binary = _postgres_binary("postgres")
        self._account = _unprivileged_account()
        self.data_root = pathlib.Path(tempfile.mkdtemp(prefix="greenleader-pg-"))
        if self._account is not None:
            os.chown(self.data_root, *self._account)
        super().__init__(workdir, nodes)

    def _popen_options(self) -> dict[str, Any]:
        if self._account is None:
            return {"cwd": self.data_root}
        uid, gid = self._account
        return {"cwd": self.data_root, "user": uid, "group": gid, "extra_groups": []}

    def _initdb(self, data: pathlib.Path) -> None:
        argv = [_postgres_binary("initdb"), "-D", str(data), "-U", self.SUPERUSER, "--auth=trust",
                "--no-sync", "-E", "UTF8", "--locale=C"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **self._popen_options())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def _argv(self, node: Node) -> list[str]:
        data = self.data_root / node.name
        if not data.exists():
            self._initdb(data)
        return [
            self.binary, "-D", str(data), "-p", str(node.ports["client"]),
            "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=300",
            "-c", "shared_buffers=32MB", "-c", "log_min_messages=warning",
            *self._extra_settings(node),
        ]

    def _extra_settings(self, node: Node) -> list[str]:
        return []

    @property
    def url(self) -> str:
        """The greenleader URL, with the superuser and the database."""
        return f"postgres://{self.SUPERUSER}@{self.addrs[0]}/{self.DBNAME}"

    def connect(self, node: Node | None = None, **options: Any) -> Any:
        """A psycopg connection (autocommit) as the superuser, unless ``options`` say otherwise."""
        import psycopg

        host, port = (node or self.nodes[0]).client_addr.rsplit(":", 1)
        params = {"host": host, "port": int(port), "user": self.SUPERUSER, "dbname": self.DBNAME,
                  "connect_timeout": 2, "autocommit": True, **options}
        return psycopg.connect(**params)

    def sql(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; its rows."""
        with self.connect() as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []

    def processes(self, node: Node | None = None) -> list[int]:
        """The postmaster's pid and its children's: each backend calls setsid(), so a signal
        to the postmaster's process group reaches the postmaster alone."""
        postmaster = (node or self.nodes[0]).pid
        if postmaster is None:
            return []
        children = []
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rpartition(")")[2].split()[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def pause(self, node: Node | None = None) -> None:
        """SIGSTOP the server and every backend: nothing answers, connections stay open."""
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self, node: Node | None = None) -> None:
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _answers(self, node: Node) -> bool:
        import psycopg

        try:
            with self.connect(node) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            raise OSError(str(exc)) from None
        return True

    def _agreed_leader(self, nodes: list[Node]) -> Node | None:
        return nodes[0] if nodes else None

    def _serves(self, node: Node) -> bool:
        return self._answers(node)

    def stop(self) -> None:
        super().stop()
        if not self.running():
            shutil.rmtree(self.data_root, ignore_errors=True)


class PgBouncerCluster(Cluster):
    """PgBouncer (Debian's ``pgbouncer``) in front of a :class:`PostgresCluster`, in
    ``pool_mode`` (default ``transaction``: a server connection per transaction, so LISTEN
    does not work through it). Any user name logs in as the server's superuser."""

    kind = "postgres"  # its URL is a postgres:// one
    binary = "pgbouncer"
    port_roles = ("client",)
    SUPERUSER = PostgresCluster.SUPERUSER
    DBNAME = PostgresCluster.DBNAME

    def __init__(self, workdir: pathlib.Path, server: PostgresCluster, pool_mode: str = "transaction") -> None:
        self.server, self.pool_mode = server, pool_mode
        self._account = _unprivileged_account()  # PgBouncer refuses root too
        self.data_root = pathlib.Path(tempfile.mkdtemp(prefix="greenleader-pgbouncer-"))
        if self._account is not None:
            os.chown(self.data_root, *self._account)
        super().__init__(workdir, 1)

    _popen_options = PostgresCluster._popen_options
    connect = PostgresCluster.connect
    _answers = PostgresCluster._answers
    _serves = PostgresCluster._serves
    _agreed_leader = PostgresCluster._agreed_leader
    url = PostgresCluster.url

    def _argv(self, node: Node) -> list[str]:
        host, port = self.server.addrs[0].rsplit(":", 1)
        ini = self.data_root / "pgbouncer.ini"
        ini.write_text("\n".join([
            "[databases]",
            f"{self.DBNAME} = host={host} port={port} dbname={self.DBNAME} user={self.SUPERUSER}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1", f"listen_port = {node.ports['client']}", "unix_socket_dir =",
            "auth_type = any", f"pool_mode = {self.pool_mode}", "default_pool_size = 4",
            "max_client_conn = 200", "server_reset_query =", "",
        ]))
        if self._account is not None:
            os.chown(ini, *self._account)
        return [_require(self.binary), str(ini)]

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.data_root, ignore_errors=True)


def start_pgbouncer(workdir: pathlib.Path | str, server: PostgresCluster, pool_mode: str = "transaction") -> Cluster:
    """PgBouncer in front of ``server`` on a free loopback port, ready to serve."""
    return PgBouncerCluster(pathlib.Path(workdir), server, pool_mode).start_all()


def _postgres_binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(pathlib.Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not versions:
        raise ServerBinaryMissing(f"{name} (PostgreSQL) is not installed; {INSTALL_HINT}")
    return str(versions[-1])


def _unprivileged_account() -> tuple[int, int] | None:
    """(uid, gid) of ``nobody`` when running as root (PostgreSQL refuses root), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


# ---------------------------------------------------------------------------------------------
# public entry points

_CLASSES: dict[str, type[Cluster]] = {
    "consul": ConsulCluster, "etcd": EtcdCluster, "zookeeper": ZooKeeperCluster, "postgres": PostgresCluster,
}


def start(kind: str, workdir: pathlib.Path | str, nodes: int = 1) -> Cluster:
    """Start a ``kind`` cluster of ``nodes`` nodes in a new directory under ``workdir``.

    Returns once the cluster has a leader and every node serves clients; raises
    ServerBinaryMissing if the server is not installed, RuntimeError (with log tails) if it
    does not become ready within READY_TIMEOUT seconds.
    """
    try:
        cls = _CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_CLASSES)}") from None
    return cls(pathlib.Path(workdir), nodes).start_all()


def start_consul(workdir: pathlib.Path, nodes: int = 1) -> Cluster:
    """Consul cluster (``agent -dev`` for one node: in-memory, data lost on restart)."""
    return start("consul", workdir, nodes)


def start_etcd(workdir: pathlib.Path, nodes: int = 1) -> Cluster:
    """etcd cluster."""
    return start("etcd", workdir, nodes)


def start_zookeeper(workdir: pathlib.Path, nodes: int = 1) -> Cluster:
    """ZooKeeper ensemble (standalone ZooKeeperServerMain for one node)."""
    return start("zookeeper", workdir, nodes)


def start_postgres(workdir: pathlib.Path, nodes: int = 1) -> Cluster:
    """One PostgreSQL server (a restart keeps its data)."""
    return start("postgres", workdir, nodes)


# ---------------------------------------------------------------------------------------------
# secure servers: TLS everywhere and access control on (tests/test_security.py)
#
# One node each. Consul serves HTTPS only, requires client certificates and runs ACLs with
# default deny (management token in ``cluster.management_token``). etcd serves gRPC over TLS
# with --client-cert-auth, then gets a root user and ``auth enable`` (``cluster.etcdctl(...)``
# runs etcdctl as root). ZooKeeper serves only a secureClientPort (Netty, PEM key and trust
# stores, client certificates required) and knows a ``super`` digest user for the tests'
# administration (``cluster.super_auth``). ``server_cert`` replaces the server's certificate
# (tests of host name checking start one with a certificate for another name).

ZK_TLS_JARS = [  # NettyServerCnxnFactory needs these besides what zookeeper.jar's manifest lists
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
]


def tls_context(ca: str | os.PathLike, cert: str | os.PathLike | None = None,
                key: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (host names checked), with an optional client cert."""
    context = ssl.create_default_context(cafile=os.fspath(ca))
    if cert is not None:
        context.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    return context


def https(method: str, url: str, body: bytes | None = None, *, context: ssl.SSLContext,
          headers: dict[str, str] | None = None, timeout: float = 2.0) -> bytes:
    """One HTTPS request with ``context``; returns the body, raises OSError on failure."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    with opener.open(req, timeout=timeout) as resp:
        return resp.read()


def _tls_connection(addr: str, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def four_letter_word_tls(addr: str, word: str, context: ssl.SSLContext, timeout: float = 2.0) -> str:
    """:func:`four_letter_word` on a ZooKeeper secure client port."""
    with _tls_connection(addr, context, timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        with contextlib.suppress(ssl.SSLError):  # the server may close without close_notify
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def zk_session_roundtrip_tls(addr: str, context: ssl.SSLContext, timeout: float = 2.0) -> None:
    """:func:`zk_session_roundtrip` on a ZooKeeper secure client port."""
    connect = struct.pack(">iqiqi16s?", 0, 0, 4000, 0, 16, b"\0" * 16, False)
    close = struct.pack(">ii", 1, -11)
    with _tls_connection(addr, context, timeout) as sock:
        sock.sendall(struct.pack(">i", len(connect)) + connect)
        _, _, session_id = struct.unpack(">iiq", _recv_packet(sock)[:16])  # type: ignore[arg-type]
        if not session_id:
            raise ConnectionError("zookeeper refused the session")
        sock.sendall(struct.pack(">i", len(close)) + close)
        _recv_packet(sock)  # type: ignore[arg-type]


class _SecureMixin:
    """What the three secure clusters share: the certificates, a client TLS context."""

    certs: Any
    server_cert: Any
    addrs: list[str]
    kind: str

    def _setup_tls(self, certs: Any, server_cert: Any) -> None:
        self.certs = certs
        self.server_cert = server_cert or certs.server
        self.client_tls = tls_context(certs.ca, certs.client.cert, certs.client.key)
        # A replaced certificate may name another host (on purpose): the fixtures' own checks
        # still verify its chain, not its name.
        self.client_tls.check_hostname = server_cert in (None, certs.server)

    @property
    def tls_options(self) -> dict[str, str]:
        """The greenleader store options (new names) that connect with the test client cert."""
        return {"ca_file": str(self.certs.ca), "cert_file": str(self.certs.client.cert),
                "key_file": str(self.certs.client.key)}

    @property
    def url(self) -> str:
        """The greenleader URL with TLS options (no credentials)."""
        query = "&".join(f"{k}={v}" for k, v in self.tls_options.items())
        return f"{self.kind}://{','.join(self.addrs)}?{query}"


class SecureConsulCluster(_SecureMixin, ConsulCluster):
    """One Consul dev agent: HTTPS only (client certificates verified), ACLs default deny."""

    def __init__(self, workdir: pathlib.Path, nodes: int, certs: Any, server_cert: Any = None) -> None:
        if nodes != 1:
            raise ValueError("secure clusters have one node")
        self._setup_tls(certs, server_cert)
        self.management_token = str(uuid.uuid4())
        super().__init__(workdir, nodes)

    def _argv(self, node: Node) -> list[str]:
        argv = super()._argv(node)
        at = argv.index("-http-port")
        argv[at + 1] = "-1"  # no plain HTTP at all
        argv[at:at] = ["-https-port", str(node.ports["client"])]
        hcl = [
            f'ca_file = "{self.certs.ca}"',
            f'cert_file = "{self.server_cert.cert}"',
            f'key_file = "{self.server_cert.key}"',
            "verify_incoming_https = true",
            # master: the management token; agent: lets the agent update its own node entry
            f'acl {{ enabled = true, default_policy = "deny", down_policy = "extend-cache", '
            f'tokens {{ master = "{self.management_token}", agent = "{self.management_token}" }} }}',
        ]
        for line in hcl:
            argv += ["-hcl", line]
        return argv

    def api(self, method: str, path: str, body: object = None, token: str | None = None) -> Any:
        """A Consul HTTP API call as ``token`` (default: the management token); JSON answer."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        answer = https(method, f"https://{self.nodes[0].client_addr}{path}", data, context=self.client_tls,
                       headers={"X-Consul-Token": token or self.management_token})
        return json.loads(answer) if answer.strip() else None

    def create_token(self, rules: str, name: str | None = None) -> str:
        """A new ACL token whose only policy has ``rules``; returns its secret."""
        policy = self.api("PUT", "/v1/acl/policy", {"Name": name or f"p-{uuid.uuid4().hex[:12]}", "Rules": rules})
        token = self.api("PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
        return token["SecretID"]

    def _get(self, node: Node, path: str) -> bytes:
        return https("GET", f"https://{node.client_addr}{path}", context=self.client_tls)

    def _serves(self, node: Node) -> bool:
        key = f"/v1/kv/greenleader-test-servers/ready-{node.name}"
        self.api("PUT", key, b"1")
        self.api("DELETE", key)
        session = self.api("PUT", "/v1/session/create", {})["ID"]
        self.api("PUT", f"/v1/session/destroy/{session}")
        return True


class SecureEtcdCluster(_SecureMixin, EtcdCluster):
    """One etcd member: client TLS with --client-cert-auth; auth enabled with a root user."""

    def __init__(self, workdir: pathlib.Path, nodes: int, certs: Any, server_cert: Any = None) -> None:
        if nodes != 1:
            raise ValueError("secure clusters have one node")
        self._setup_tls(certs, server_cert)
        self.root_password = uuid.uuid4().hex
        self.auth_enabled = False
        super().__init__(workdir, nodes)

    def _argv(self, node: Node) -> list[str]:
        argv = super()._argv(node)
        client = f"https://127.0.0.1:{node.ports['client']}"
        for flag in ("--listen-client-urls", "--advertise-client-urls"):
            argv[argv.index(flag) + 1] = client
        return [
            *argv, "--cert-file", str(self.server_cert.cert), "--key-file", str(self.server_cert.key),
            "--trusted-ca-file", str(self.certs.ca), "--client-cert-auth",
        ]

    def _answers(self, node: Node) -> bool:
        https("GET", f"https://{node.client_addr}/version", context=self.client_tls)
        return True

    def _status(self, node: Node) -> dict:
        return json.loads(https("POST", f"https://{node.client_addr}/v3/maintenance/status", b"{}",
                                context=self.client_tls))

    def _serves(self, node: Node) -> bool:
        health = https("GET", f"https://{node.client_addr}/health", context=self.client_tls)
        return json.loads(health)["health"] == "true"

    def etcdctl(self, *args: str, user: str | None = "root", input: str | None = None) -> str:
        """Run ``etcdctl`` over TLS with the test client certificate, as ``user`` (default root;
        None: no user, so etcd takes the certificate's CN); returns its output."""
        argv = [_require("etcdctl"), "--endpoints", ",".join(f"https://{a}" for a in self.addrs),
                "--cacert", str(self.certs.ca), "--cert", str(self.certs.client.cert),
                "--key", str(self.certs.client.key), "--dial-timeout", "5s", "--command-timeout", "10s"]
        if not self.client_tls.check_hostname:
            argv.append("--insecure-skip-tls-verify")
        if user is not None and self.auth_enabled:
            argv += ["--user", f"{user}:{self.root_password}" if user == "root" else user]
        done = subprocess.run([*argv, *args], input=input, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "ETCDCTL_API": "3"})
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def enable_auth(self) -> None:
        """Create the root user and turn authentication on."""
        self.etcdctl("user", "add", "root", "--interactive=false", input=self.root_password + "\n")
        self.etcdctl("auth", "enable")
        self.auth_enabled = True


class SecureZooKeeperCluster(_SecureMixin, ZooKeeperCluster):
    """One ZooKeeper server on a secure client port only (Netty, PEM stores, client certs
    required), with a ``super`` digest user for administration."""

    def __init__(self, workdir: pathlib.Path, nodes: int, certs: Any, server_cert: Any = None) -> None:
        if nodes != 1:
            raise ValueError("secure clusters have one node")
        for jar in ZK_TLS_JARS:
            _require(jar)
        self._setup_tls(certs, server_cert)
        self.super_password = uuid.uuid4().hex
        super().__init__(workdir, nodes)

    @property
    def super_auth(self) -> tuple[str, str]:
        """kazoo ``auth_data`` entry of the ZooKeeper super user (bypasses every ACL)."""
        return ("digest", f"super:{self.super_password}")

    def _argv(self, node: Node) -> list[str]:
        argv = super()._argv(node)
        digest = base64.b64encode(hashlib.sha1(f"super:{self.super_password}".encode()).digest()).decode()
        cfg = [line for line in (node.dir / "zoo.cfg").read_text().splitlines()
               if not line.startswith(("clientPort=", "clientPortAddress="))]
        cfg += [
            "secureClientPortAddress=127.0.0.1", f"secureClientPort={node.ports['client']}",
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            f"ssl.keyStore.location={self.server_cert.bundle}", "ssl.keyStore.type=PEM",
            f"ssl.trustStore.location={self.certs.ca}", "ssl.trustStore.type=PEM",
            "ssl.clientAuth=need",
            f"DigestAuthenticationProvider.superDigest=super:{digest}",
        ]
        (node.dir / "zoo.cfg").write_text("\n".join(cfg) + "\n")
        at = argv.index("-cp") + 1
        argv[at] = ":".join([*ZK_JARS, *ZK_TLS_JARS])
        return argv

    def _answers(self, node: Node) -> bool:
        return four_letter_word_tls(node.client_addr, "ruok", self.client_tls) == "imok"

    def _mode(self, node: Node) -> str | None:
        for line in four_letter_word_tls(node.client_addr, "srvr", self.client_tls).splitlines():
            if line.startswith("Mode: "):
                return line.split(":", 1)[1].strip()
        return None

    def _serves(self, node: Node) -> bool:
        zk_session_roundtrip_tls(node.client_addr, self.client_tls)
        return True


class SecurePostgresCluster(_SecureMixin, PostgresCluster):
    """One PostgreSQL server on TLS only (``hostssl``), passwords checked with SCRAM.

    The superuser ``postgres`` logs in with :attr:`admin_password`. Role ``greenleader`` (the
    test client certificate's CN, once :meth:`add_role` made it) needs its password *and* a
    client certificate naming it (``clientcert=verify-full``); other roles need a password.
    """

    ROLE = "greenleader"

    def __init__(self, workdir: pathlib.Path, nodes: int, certs: Any, server_cert: Any = None) -> None:
        self._setup_tls(certs, server_cert)
        self.admin_password = uuid.uuid4().hex
        super().__init__(workdir, nodes)

    def _initdb(self, data: pathlib.Path) -> None:
        pwfile = self.data_root / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        argv = [_postgres_binary("initdb"), "-D", str(data), "-U", self.SUPERUSER, "--auth=scram-sha-256",
                "--pwfile", str(pwfile), "--no-sync", "-E", "UTF8", "--locale=C"]
        if self._account is not None:
            os.chown(pwfile, *self._account)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **self._popen_options())
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        (data / "pg_hba.conf").write_text(
            f"hostssl all {self.ROLE} 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n")
        for name, source in (("server.crt", self.server_cert.cert), ("server.key", self.server_cert.key),
                             ("ca.crt", self.certs.ca)):
            target = data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self._account is not None:
                os.chown(target, *self._account)

    def _extra_settings(self, node: Node) -> list[str]:
        return ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key",
                "-c", "ssl_ca_file=ca.crt", "-c", "password_encryption=scram-sha-256"]

    def connect(self, node: Node | None = None, **options: Any) -> Any:
        params = {"password": self.admin_password, "sslmode": "verify-ca", "sslrootcert": str(self.certs.ca),
                  **options}
        return super().connect(node, **params)

    @property
    def tls_options(self) -> dict[str, str]:
        return {**super().tls_options, "user": self.SUPERUSER, "dbname": self.DBNAME}

    def add_role(self, name: str, password: str) -> None:
        """A login role with ``password`` and no privileges beyond PUBLIC's."""
        from psycopg import sql

        with self.connect() as conn:
            create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
            conn.execute(create.format(sql.Identifier(name), sql.Literal(password)))


_SECURE_CLASSES: dict[str, type[Cluster]] = {
    "consul": SecureConsulCluster, "etcd": SecureEtcdCluster, "zookeeper": SecureZooKeeperCluster,
    "postgres": SecurePostgresCluster,
}


def start_secure(kind: str, workdir: pathlib.Path | str, certs: Any, *, server_cert: Any = None) -> Cluster:
    """Start a one-node ``kind`` server with TLS and access control (see above).

    ``certs`` is a :class:`tests.certs.Certs`; ``server_cert`` (a ``KeyPair``) replaces the
    server's certificate. etcd comes back with authentication already enabled.
    """
    try:
        cls = _SECURE_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_SECURE_CLASSES)}") from None
    cluster = cls(pathlib.Path(workdir), 1, certs, server_cert).start_all()  # type: ignore[call-arg]
    if isinstance(cluster, SecureEtcdCluster):
        try:
            cluster.enable_auth()
        except BaseException:
            cluster.stop()
            raise
    return cluster
