"""PostgreSQL client adapter: psycopg 3 connections under gevent, TLS, credentials, timeouts,
error translation, and the one LISTEN connection a store shares among its waiters and followers.

The recipe (:mod:`.recipe`) runs its few statements through :meth:`PostgresClient.query`, which
answers with rows or raises a :mod:`greenleader.errors` exception, and learns of changes to a key
through :meth:`PostgresClient.subscribe`.

psycopg 3 (from 3.1.14) waits on its socket through ``select``, which ``gevent.monkey`` makes
cooperative: a query in flight lets the hub run. That choice is made when psycopg is imported,
so psycopg must be imported after patching (as gunicorn's gevent worker does); the store warns
when it finds psycopg's blocking C wait in a patched process. Host names are resolved here with
gevent's resolver and handed to libpq as ``hostaddr``, since libpq's own lookup would block.
Every statement has a hard deadline (``timeout``): a server that stops answering (SIGSTOP, a
partition) costs the connection, never a hung greenlet.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket
import psycopg
import psycopg.errors
import psycopg.waiting
from psycopg import sql

from ... import _inherited_sockets
from ...errors import InvalidArgumentError, PermissionDeniedError, StoreError, StoreUnavailableError
from .._security import read_secret, tls_options, warn_plaintext_secret
from ..base import check_float, check_text

__all__ = ["DEFAULT_ADDR", "PostgresClient", "Subscription"]

log = logging.getLogger("greenleader.stores.postgres")

DEFAULT_ADDR = "127.0.0.1:5432"
#: Default seconds for connecting and for each statement: a lease statement takes a millisecond
#: on a healthy server, so 5 s only ever expires on a server that has stopped answering.
DEFAULT_TIMEOUT = 5.0
#: Statement connections per store object (besides its LISTEN connection): two keep a renewal
#: from waiting behind a burst of takes, and a process's whole use of the server small (each
#: gunicorn worker has its own store; servers allow 100 connections by default).
DEFAULT_POOL_SIZE = 2
#: Seconds between two liveness checks of the LISTEN connection while nothing is heard: a
#: half-open connection (server stopped, partition) is found within this plus ``timeout``.
LISTEN_HEARTBEAT = 2.0
#: Seconds between two looks of a waiter, follower or holder when notifications do not arrive
#: (PgBouncer's transaction pooling): a handover then takes up to this, and each waiting or
#: following store object reads its key this often.
POLL_INTERVAL = 1.0
#: libpq sslmode values (https://www.postgresql.org/docs/current/libpq-ssl.html).
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SQLSTATE_PERMISSION = ("42501", "28000", "28P01")  # insufficient privilege, invalid authorization, password
_UNAVAILABLE_SQLSTATES = ("57P01", "57P02", "57P03", "53300", "08")  # shutdown, too many connections, connection


def _check_blocking_wait() -> None:
    """Warn when gevent has patched ``select`` but psycopg chose its blocking C wait (imported first)."""
    monkey = __import__("sys").modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select") and \
            psycopg.waiting.wait is getattr(psycopg.waiting, "wait_c", None):
        log.warning("postgres store: psycopg was imported before gevent.monkey.patch_all(), so its queries "
                    "block the gevent hub; patch first (gunicorn's gevent worker does)")


def _parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or (addr.count(":") > 1 and not addr.startswith("[")):  # a bare host or IPv6 literal
        host, port = addr, "5432"
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise InvalidArgumentError(f"postgres address {addr!r} has a bad port") from None
    if not host or not 0 < number < 65536:
        raise InvalidArgumentError(f"postgres address {addr!r} needs a host and a port in 1..65535")
    return host, number


class Subscription:
    """One waiter's or follower's interest in a key: ``changed`` is set by each NOTIFY about it,
    and by every reconnection of the LISTEN connection (a notification may have been missed)."""

    def __init__(self, client: PostgresClient, key: str) -> None:
        self.client = client
        self.key = key
        self.changed = gevent.event.Event()
        self.error: StoreError | None = None
        #: A holder's term (:meth:`hold`): a NOTIFY that the key is live with this term (its own
        #: take or claim) does not wake it.
        self.own_term: int | None = None
        self._heard: list[tuple[bool, int | None]] = []  # since the last wake: (live, term)
        self.listened = False  # True once a LISTEN connection served it (set by subscribe)

    def notify(self, live: bool, term: int | None) -> None:
        """The key changed: it names a live holder with ``term`` (``live``), or none; (False,
        None): something may have changed."""
        self._heard.append((live, term))
        if not self._own(live, term):
            self.changed.set()

    def hold(self, term: int) -> None:
        """From now on the subscriber holds the key with ``term``: what it heard of its own
        take meanwhile (the NOTIFY may come before the take's answer) wakes it no more."""
        self.own_term = term
        if self._heard and all(self._own(*heard) for heard in self._heard):
            self._heard.clear()
            self.changed.clear()

    def _own(self, live: bool, term: int | None) -> bool:
        return live and term is not None and term == self.own_term

    def wait(self, timeout: float | None) -> None:
        """Until a change (or ``timeout``); raises StoreUnavailableError when LISTEN is broken.
        Without notifications (:attr:`PostgresClient.notifications` false), at most POLL_INTERVAL."""
        if not self.client.notifications:
            timeout = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
        self.changed.wait(timeout)
        self.changed.clear()
        self._heard.clear()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        self.client._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Connecting:
    """The socket of a libpq connect in progress, for :mod:`greenleader._inherited_sockets`:
    the descriptor libpq waits on now, -1 once the attempt ends (its number may then be reused)."""

    def __init__(self) -> None:
        self.fd = -1

    def fileno(self) -> int:
        return self.fd


class _RegisteredConnection(psycopg.Connection[Any]):
    """A connection that a forked child cannot use, from its first socket on.

    A forked child's copy must not read this session's answers and notifications, send its
    requests (a startup packet of its own on the parent's socket: the server drops the
    session), nor end it (libpq's Terminate when closed): /dev/null takes its place there.
    libpq's connect (TCP, TLS, startup, authentication) takes several hub turns, so the
    socket is registered from the first one: psycopg's connect generator yields
    ``(fileno, wait)`` at each, and this one follows it (psycopg's private
    ``Connection._connect_gen``, as in psycopg 3.3; tests/test_inherited_sockets.py fails
    loudly if it goes or changes shape).
    """

    @classmethod
    def _connect_gen(cls, conninfo: str = "") -> Any:
        connecting = _inherited_sockets.register(_Connecting())
        attempt = super()._connect_gen(conninfo)
        try:
            try:
                fileno, wait = next(attempt)
                while True:
                    connecting.fd = fileno  # before the hub runs anything else: libpq waits on it now
                    fileno, wait = attempt.send((yield fileno, wait))
            except StopIteration as done:
                conn = done.value
        finally:
            connecting.fd = -1  # before libpq may close it (the attempt closed below, or collected)
            attempt.close()
        return _inherited_sockets.register(conn)


class PostgresClient:
    """Connections to one PostgreSQL database, their options checked once.

    :param addrs: ``host:port`` of the server (one; more are tried in order when connecting).
    """

    def __init__(self, addrs: Sequence[str] | None = None, *, dbname: object = None, user: object = None,
                 password: object = None, password_file: object = None, timeout: object = DEFAULT_TIMEOUT,
                 sslmode: object = None, sslrootcert: object = None, sslcert: object = None,
                 sslkey: object = None, tls: object = None, ca_file: object = None, cert_file: object = None,
                 key_file: object = None, verify: object = None, pool_size: object = DEFAULT_POOL_SIZE,
                 channel: str = "greenleader",
                 application_name: object = "greenleader") -> None:
        _check_blocking_wait()
        self.addrs = [_format(*_parse_addr(a)) for a in (addrs or [DEFAULT_ADDR])]
        self.timeout = check_float("timeout", timeout, minimum=0.0, inclusive=False)
        self.dbname = None if dbname in (None, "") else check_text("dbname", dbname, max_length=63)
        self.user = None if user in (None, "") else check_text("user", user, max_length=63)
        self._password = read_secret("password", password, "password_file", password_file)
        self.application_name = check_text("application_name", application_name, max_length=63)
        self.channel = channel
        self._ssl = _ssl_options(sslmode=sslmode, sslrootcert=sslrootcert, sslcert=sslcert, sslkey=sslkey,
                                 tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file, verify=verify)
        self.secure = self._ssl.get("sslmode") in ("require", "verify-ca", "verify-full")
        if self._password is not None and not self.secure:
            warn_plaintext_secret("postgres", "password", [_parse_addr(a)[0] for a in self.addrs])
        self.pool_size = int(check_float("pool_size", pool_size, minimum=1, maximum=64))
        self._slots = gevent.lock.BoundedSemaphore(self.pool_size)  # statements in flight at most
        self._idle: list[psycopg.Connection[Any]] = []  # statement connections not in use
        self._open: set[psycopg.Connection[Any]] = set()  # every statement connection, in use or not
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._listener: gevent.Greenlet | None = None
        self._listening = gevent.event.Event()
        self._listen_error: StoreError | None = None
        #: False when a NOTIFY sent on another connection did not reach the LISTEN connection
        #: (PgBouncer's transaction pooling): waits then poll every POLL_INTERVAL.
        self.notifications = True
        self._closed = False
        self.requests: dict[str, int] = {}

    def describe(self) -> str:
        """Secret-free, for ``repr()``."""
        parts = [f"addrs={self.addrs!r}"]
        if self.dbname:
            parts.append(f"dbname={self.dbname!r}")
        if self.user:
            parts.append(f"user={self.user!r}")
        if self.secure:
            parts.append("tls")
        return " ".join(parts)

    # -- connections ----------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection (the first address that answers), or StoreError."""
        last: BaseException | None = None
        for addr in self.addrs:
            host, port = _parse_addr(addr)
            params: dict[str, Any] = {"host": host, "port": port, "autocommit": True,
                                      "connect_timeout": max(1, round(self.timeout)),
                                      "application_name": self.application_name, **self._ssl}
            try:
                params["hostaddr"] = _resolve(host, port, self.timeout)
            except OSError as exc:
                last = exc
                continue
            if self.dbname:
                params["dbname"] = self.dbname
            if self.user:
                params["user"] = self.user
            if self._password is not None:
                params["password"] = self._password
            timer = gevent.Timeout(self.timeout + 1)  # behind libpq's connect_timeout (whole seconds)
            try:
                with timer:
                    # Registered while it connects and once connected (_RegisteredConnection).
                    conn = _RegisteredConnection.connect(**params)
                    conn.prepare_threshold = None  # never prepared: a pooler may change the server connection
                    return conn
            except gevent.Timeout as exc:
                if exc is not timer:
                    raise
                last = TimeoutError(f"no answer in {self.timeout:g}s")
            except psycopg.Error as exc:
                if _sqlstate(exc) in _SQLSTATE_PERMISSION or "password" in str(exc).lower():
                    raise PermissionDeniedError(f"postgres at {addr} refused the connection: {_message(exc)}") \
                        from None
                last = exc
        raise StoreUnavailableError(f"cannot connect to postgres at {', '.join(self.addrs)}: {_message(last)}")

    def query(self, name: str, statement: Any, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) on one of the store's statement connections; its rows.

        Waits for a free connection first (``pool_size`` of them): that wait is not the
        server's, and does not count against ``timeout``. Raises StoreUnavailableError when the
        server does not answer within ``timeout`` (the connection is then dropped: its state is
        unknown), PermissionDeniedError when refused.
        """
        if self._closed:
            raise StoreUnavailableError("the postgres store is closed")
        self.requests[name] = self.requests.get(name, 0) + 1
        with self._slots:
            conn = self._idle.pop() if self._idle else None
            timer = gevent.Timeout(self.timeout)
            timer.start()
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self.connect()
                    self._open.add(conn)
                try:
                    cursor = conn.execute(statement, params or None)  # None: no placeholders
                    rows = cursor.fetchall() if cursor.description is not None else []
                except psycopg.Error as exc:
                    if conn.closed or conn.broken or _sqlstate(exc) is None:
                        self._drop(conn)
                    else:
                        self._give_back(conn)
                    raise _translate(name, exc) from None
                except BaseException:  # timed out, or killed mid-statement: its state is unknown
                    self._drop(conn)
                    raise
                self._give_back(conn)
                return rows
            except gevent.Timeout as exc:
                if exc is not timer:
                    raise
                raise StoreUnavailableError(f"postgres did not answer {name} within {self.timeout:g}s") from None
            finally:
                timer.close()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        if self._closed:
            self._drop(conn)
        else:
            self._idle.append(conn)

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        self._open.discard(conn)
        _close_quietly(conn)

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.kill(block=True, timeout=self.timeout)
        while self._idle:
            self._drop(self._idle.pop())

    # -- LISTEN/NOTIFY --------------------------------------------------------------------------

    def subscribe(self, key: str) -> Subscription:
        """Be told of changes to ``key``. Returns once the LISTEN connection listens (so no NOTIFY
        sent after this returns is missed), or raises StoreUnavailableError."""
        subscription = Subscription(self, key)
        self._subscriptions.setdefault(key, set()).add(subscription)
        try:
            if self._listener is None or self._listener.dead:
                self._listening.clear()
                self._listen_error = None
                self._listener = gevent.spawn(self._listen)
            if not self._listening.wait(self.timeout + 1):
                raise StoreUnavailableError(f"postgres LISTEN did not start within {self.timeout:g}s")
            if self._listen_error is not None and not self._listening.is_set():
                raise self._listen_error
        except BaseException:
            self._unsubscribe(subscription)
            raise
        subscription.listened = True
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscriptions.get(subscription.key)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscriptions[subscription.key]

    def _listen(self) -> None:
        """The LISTEN connection's greenlet: deliver notifications by key; on a failure tell every
        subscriber and end (the next subscription starts a new one). Ends when nobody listens."""
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._listen_conn = self.connect()
            with gevent.Timeout(self.timeout, StoreUnavailableError(f"postgres LISTEN took over {self.timeout:g}s")):
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._probe(conn)
            self._listening.set()
            for subscribers in list(self._subscriptions.values()):
                for subscription in subscribers:
                    if subscription.listened:  # served by a LISTEN before: it may have missed a NOTIFY
                        subscription.notify(False, None)
            while self._subscriptions and not self._closed:
                heard = False
                for notify in conn.notifies(timeout=LISTEN_HEARTBEAT):
                    heard = True
                    self._deliver(notify.payload)
                if not heard:  # quiet: is the server still there?
                    with gevent.Timeout(self.timeout, StoreUnavailableError(
                            f"postgres did not answer the LISTEN connection's check within {self.timeout:g}s")):
                        conn.execute("SELECT 1")
        except StoreError as exc:
            self._fail_listeners(exc)
        except psycopg.Error as exc:
            self._fail_listeners(_translate("listen", exc))
        finally:
            self._listening.clear()
            self._listen_conn = None
            if conn is not None:
                _close_quietly(conn)

    def _deliver(self, payload: str) -> None:
        """Wake the subscribers of the key a NOTIFY names (``<l|x><term> <key>``, the table's
        trigger)."""
        head, _, key = payload.partition(" ")
        try:
            live, term = head[:1] == "l", int(head[1:])
        except ValueError:  # not the trigger's: wake everyone of that key
            live, term = False, None
        for subscription in list(self._subscriptions.get(key, ())):
            subscription.notify(live, term)

    def _probe(self, conn: psycopg.Connection[Any]) -> None:
        """NOTIFY our own channel from the statement connection and wait for it on the LISTEN
        one: it does not come through a pooler that shares server connections between
        transactions (PgBouncer's transaction pooling), which keeps no LISTEN. Then every wait
        polls (POLL_INTERVAL), and a warning says why."""
        token = "\x01probe " + uuid.uuid4().hex  # a key has no control characters: never a key
        self.query("notify probe", "SELECT pg_notify(%s, %s)", [self.channel, token])
        for notify in conn.notifies(timeout=self.timeout):
            if notify.payload == token:
                if not self.notifications:
                    log.info("postgres: notifications arrive again; waits no longer poll")
                self.notifications = True
                return
            self._deliver(notify.payload)
        if self.notifications:
            log.warning("postgres: a NOTIFY did not reach the LISTEN connection within %gs (PgBouncer in "
                        "transaction pooling?): waiters and followers poll every %gs, so a handover takes "
                        "up to that; use session pooling or a direct connection", self.timeout, POLL_INTERVAL)
        self.notifications = False

    def _fail_listeners(self, error: StoreError) -> None:
        log.info("postgres: the LISTEN connection failed: %s", error)
        self._listen_error = error
        for subscribers in list(self._subscriptions.values()):
            for subscription in subscribers:
                subscription.error = StoreUnavailableError(str(error))
                subscription.changed.set()
        self._listening.set()  # wakes a subscribe() that waits for it: it finds the error


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int, timeout: float) -> str:
    """The first address of ``host``, looked up cooperatively (gevent's resolver)."""
    with gevent.Timeout(timeout, OSError(f"cannot resolve {host!r} within {timeout:g}s")):
        infos = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    return str(infos[0][4][0])


def _ssl_options(**given: object) -> dict[str, str]:
    """libpq's ssl* parameters from either spelling: libpq's own (``sslmode``, ``sslrootcert``,
    ``sslcert``, ``sslkey``) or the other stores' (``tls``, ``ca_file``, ``cert_file``,
    ``key_file``, ``verify``). A CA file means ``verify-full`` unless ``verify`` is false."""

    def either(name: str, alias: str) -> object:
        if given[name] is not None and given[alias] is not None:
            raise InvalidArgumentError(f"give {name} or {alias}, not both")
        return given[name] if given[name] is not None else given[alias]

    options = tls_options("postgres", tls=given["tls"], ca_file=either("sslrootcert", "ca_file"),
                          cert_file=either("sslcert", "cert_file"), key_file=either("sslkey", "key_file"),
                          verify=given["verify"])
    mode = given["sslmode"]
    if mode is not None:
        if not isinstance(mode, str) or mode not in SSLMODES:
            raise InvalidArgumentError(f"sslmode must be one of {', '.join(SSLMODES)}, not {mode!r}")
    elif options.enabled:
        mode = ("verify-full" if options.ca_file else "require") if options.verify else "require"
    else:
        mode = "disable"  # plain text unless asked: libpq's "prefer" would hide a downgrade
    if mode in ("disable", "allow", "prefer") and (options.ca_file or options.cert_file):
        raise InvalidArgumentError(f"sslmode={mode} does not check certificates; use verify-full with a CA file")
    ssl: dict[str, str] = {"sslmode": mode}
    if options.ca_file:
        ssl["sslrootcert"] = options.ca_file
    elif mode in ("verify-ca", "verify-full"):
        ssl["sslrootcert"] = "system"  # libpq 16+: the system's CAs; older libpq needs a file
    if options.cert_file:
        ssl["sslcert"], ssl["sslkey"] = options.cert_file, options.key_file or ""
    return ssl


def _sqlstate(exc: BaseException | None) -> str | None:
    return getattr(exc, "sqlstate", None)


def _message(exc: BaseException | None) -> str:
    """An error's first line, without anything that could hold a secret (libpq never echoes one)."""
    if exc is None:
        return "no address"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _translate(name: str, exc: psycopg.Error) -> StoreError:
    state = _sqlstate(exc)
    if state in _SQLSTATE_PERMISSION:
        return PermissionDeniedError(f"postgres refused {name}: {_message(exc)}")
    if state is None or state.startswith(_UNAVAILABLE_SQLSTATES) or isinstance(exc, psycopg.OperationalError):
        return StoreUnavailableError(f"postgres failed {name}: {_message(exc)}")
    return StoreError(f"postgres failed {name}: {_message(exc)}")


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.close()
    except Exception:  # closing a broken connection: nothing to do about it
        log.debug("postgres: closing a connection failed", exc_info=True)

