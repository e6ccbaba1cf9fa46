"""The election on PostgreSQL's primitives: a lease row per key, read top-down.

A candidate takes the key's row when it is absent or expired, in one statement that draws
its fencing term from a sequence and proves the win by its ``RETURNING``; the row's expiry is
the server's ``clock_timestamp()`` plus the TTL. It renews by moving the expiry of its own
unexpired row (no row updated: the key is lost), claims the row for followers once it has
stepped up, and resigns by deleting the row. A trigger NOTIFYs every change of holder, claim or
deletion, which wakes waiters, followers and a holder whose row was deleted from outside;
waiters and followers also wake when the holder's expiry passes, so a crash costs one TTL.
Waiting candidates hold nothing in the database. docs/stores/postgres.md explains each step;
the transport is in :mod:`.client`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import gevent
import gevent.event
from psycopg import sql

from ...errors import InvalidArgumentError, InvalidKeyError, LeadershipLostError, StoreError
from ..base import LeaderInfo, Lease, SessionLost, Store, check_bool, check_text, now
from .client import PostgresClient, Subscription

__all__ = ["PostgresStore"]

log = logging.getLogger("greenleader.stores.postgres")

#: Seconds added to a holder's remaining time before a waiter looks again: its row has expired
#: by then on the server's clock even if the two clocks' rates differ slightly.
_EXPIRY_SLACK = 0.01
#: First and longest pause of ``leader()`` while the first holder has not claimed its row yet.
_CLAIM_POLL = (0.005, 0.25)
#: Takes a transaction-scoped advisory lock while creating the schema: several processes
#: starting at once would otherwise race on CREATE ... IF NOT EXISTS (a unique violation).
_SCHEMA_LOCK = 0x91EAD

_SCHEMA = """
BEGIN;
SELECT pg_advisory_xact_lock({lock});
CREATE SEQUENCE IF NOT EXISTS {sequence};
CREATE TABLE IF NOT EXISTS {table} (
    key text PRIMARY KEY,
    node text NOT NULL,
    term bigint NOT NULL,
    owner text NOT NULL,
    expires_at timestamptz NOT NULL,
    claimed boolean NOT NULL DEFAULT false,
    revoked boolean NOT NULL DEFAULT false
);
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A live row deleted by anyone but greenleader: its holder loses at once (the row comes back
    -- revoked), but the key stays taken until the row's expiry, since the holder may lead until
    -- it hears of the deletion. TRUNCATE fires no row trigger (docs/stores/postgres.md).
    IF TG_OP = 'DELETE' AND OLD.expires_at > clock_timestamp() AND NOT OLD.revoked
            AND current_setting('greenleader.client', true) IS DISTINCT FROM 'on' THEN
        EXECUTE format('INSERT INTO %I.%I (key, node, term, owner, expires_at, claimed, revoked) '
                       'VALUES ($1, $2, $3, $4, $5, false, true) ON CONFLICT (key) DO NOTHING',
                       TG_TABLE_SCHEMA, TG_TABLE_NAME)
            USING OLD.key, OLD.node, OLD.term, OLD.owner, OLD.expires_at;
    END IF;
    -- "<l|x><term> <key>": l, the row now names a live holder with that term; x, it names none
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(TG_ARGV[0], 'x' || OLD.term || ' ' || OLD.key);
    ELSE
        PERFORM pg_notify(TG_ARGV[0], CASE WHEN NEW.revoked THEN 'x' ELSE 'l' END || NEW.term || ' ' || NEW.key);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS greenleader_notify_change ON {table};
CREATE TRIGGER greenleader_notify_change AFTER INSERT OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}({channel});
DROP TRIGGER IF EXISTS greenleader_notify_holder ON {table};
CREATE TRIGGER greenleader_notify_holder AFTER UPDATE ON {table} FOR EACH ROW
    WHEN (OLD.term IS DISTINCT FROM NEW.term OR OLD.claimed IS DISTINCT FROM NEW.claimed
          OR OLD.revoked IS DISTINCT FROM NEW.revoked)
    EXECUTE FUNCTION {function}({channel});
COMMIT;
"""

# Take the row if absent or expired; the term comes from the sequence (terms strictly increase,
# deleted rows or not). The outer SELECT sees the row as it was before: the holder's remaining time.
_TAKE = """
WITH won AS (
    INSERT INTO {table} AS held (key, node, term, owner, expires_at, claimed, revoked)
    VALUES (%(key)s, %(node)s, nextval({sequence}), %(owner)s,
            clock_timestamp() + make_interval(secs => %(ttl)s), false, false)
    ON CONFLICT (key) DO UPDATE
        SET node = EXCLUDED.node, term = EXCLUDED.term, owner = EXCLUDED.owner,
            expires_at = EXCLUDED.expires_at, claimed = false, revoked = false
        WHERE held.expires_at <= clock_timestamp()
    RETURNING held.term)
SELECT (SELECT term FROM won),
       (SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM {table} WHERE key = %(key)s)
"""
_RENEW = """
UPDATE {table} SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
WHERE key = %(key)s AND term = %(term)s AND expires_at > clock_timestamp() AND NOT revoked RETURNING term
"""
_CLAIM = """
UPDATE {table} SET claimed = true
WHERE key = %(key)s AND term = %(term)s AND expires_at > clock_timestamp() AND NOT revoked RETURNING term
"""
_HOLDS = """
SELECT term FROM {table} WHERE key = %(key)s AND term = %(term)s AND expires_at > clock_timestamp() AND NOT revoked
"""
# greenleader's own deletions say so to the trigger, for this statement's transaction only (so
# that it holds through a pooler too): the CTE is evaluated before any row goes.
_OWN = "WITH own AS (SELECT set_config('greenleader.client', 'on', true) AS flag) "
_RELEASE = _OWN + "DELETE FROM {table} WHERE key = %(key)s AND term = %(term)s AND (SELECT flag FROM own) = 'on'"
_WITHDRAW = _OWN + "DELETE FROM {table} WHERE key = %(key)s AND owner = %(owner)s AND (SELECT flag FROM own) = 'on'"
# A revoked row names nobody, but its expiry is when the key comes free.
_READ = """
SELECT node, term, claimed AND NOT revoked, revoked, extract(epoch FROM expires_at - clock_timestamp())::float8
FROM {table} WHERE key = %(key)s AND expires_at > clock_timestamp()
"""
_EXISTS = "SELECT to_regclass(%(table)s) IS NOT NULL AND to_regclass(%(sequence)s) IS NOT NULL"


class _Sql:
    """The statements above, with the table, sequence and channel names filled in and quoted."""

    def __init__(self, schema: str | None, table: str) -> None:
        def name(text: str) -> sql.Composable:
            return sql.Identifier(schema, text) if schema else sql.Identifier(text)

        names = {"table": name(table), "sequence": sql.Literal(_qualified(schema, f"{table}_term")),
                 "function": name(f"{table}_notify"), "channel": sql.Literal(_channel(schema, table)),
                 "lock": sql.Literal(_SCHEMA_LOCK)}
        self.schema = sql.SQL(_SCHEMA).format(**{**names, "sequence": name(f"{table}_term")})
        self.take, self.renew, self.claim, self.holds, self.release, self.withdraw, self.read = (
            sql.SQL(text).format(**names)
            for text in (_TAKE, _RENEW, _CLAIM, _HOLDS, _RELEASE, _WITHDRAW, _READ))
        self.exists = _EXISTS
        self.table_name = _qualified(schema, table)
        self.sequence_name = _qualified(schema, f"{table}_term")


def _qualified(schema: str | None, name: str) -> str:
    quoted = '"' + name.replace('"', '""') + '"'
    return f'"{schema}".{quoted}' if schema else quoted


def _channel(schema: str | None, table: str) -> str:
    """The NOTIFY channel of a table: its name, which keeps two tables' elections apart."""
    return f"greenleader:{schema or ''}.{table}"[:63]


class _PostgresLease(Lease):
    """A won election: the key's row, with our term, renewed by moving its expiry."""

    def __init__(self, store: PostgresStore, key: str, node: str, term: int, confirmed_at: float,
                 ttl: float, subscription: Subscription) -> None:
        super().__init__(key, node, term, confirmed_at)
        self.ttl = ttl
        self._store = store
        self._pid = os.getpid()
        self._released = False
        self._deleted = False
        self._renewed = gevent.event.Event()  # set by each renewal: a failed claim or guard resumes then
        self._subscription = subscription
        subscription.hold(term)  # our own take and claim need no check
        self._guard = gevent.spawn(self._guard_row)
        self._claimer = gevent.spawn(self._claim_once_stepped_up)

    def _params(self) -> dict[str, Any]:
        return {"key": self.key, "term": self.term, "ttl": self.ttl}

    def renew(self) -> None:
        if self._released:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        started = now()
        if not self._store.client.query("renew", self._store.sql.renew, self._params()):
            raise SessionLost(f"the postgres row of {self.node!r} on {self.key!r} (term {self.term}) "
                              "expired or was deleted")
        self.confirmed_at = started
        self._renewed.set()

    def release(self) -> None:
        """Delete our row (the trigger's NOTIFY wakes the waiters). A failed deletion raises and
        is done again by the next call: the candidate retries a release within its bound."""
        if self._deleted:
            return
        if not self._released:
            self._released = True  # from here on, the guard reports nothing and nothing is claimed
            self._claimer.kill(block=True, timeout=1)
            self._guard.kill(block=True, timeout=1)
            self._subscription.close()
        if self._pid != os.getpid():
            self._deleted = True  # a forked child's copy: the row is the parent's to release
            return
        self._store.client.query("release", self._store.sql.release, self._params())
        self._deleted = True

    def abandon(self) -> None:
        """The row expires after its TTL. No I/O and no switch (a forked child calls this): the
        greenlets are only told to die, and the subscription is dropped in memory."""
        self._released = self._deleted = True
        self._claimer.kill(block=False)
        self._guard.kill(block=False)
        self._subscription.close()

    def _claim_once_stepped_up(self) -> None:
        """Mark the row claimed, so that followers name us: retried until claimed, released or lost.

        Spawned as the lease is made, in the greenlet that runs ``acquire``; it first lets every
        greenlet already due to run go first, among them the candidate, which steps up without
        yielding: so followers never name a winner that does not know yet that it leads.
        """
        gevent.sleep(0)
        while not self._released and self._pid == os.getpid():
            self._renewed.clear()
            try:
                if not self._store.client.query("claim", self._store.sql.claim, self._params()):
                    self._notify_lost_once()
                return
            except (StoreError, InvalidArgumentError) as exc:
                log.warning("postgres: %r could not claim %r yet (followers see no leader); trying again "
                            "after the next renewal: %s", self.node, self.key, exc)
            self._renewed.wait()

    def _guard_row(self) -> None:
        """Tell the candidate at once when our row changes hands or goes (deleted from outside):
        each NOTIFY about the key but our own take and claim is checked against our term."""
        subscription = self._subscription
        while not self._released and self._pid == os.getpid():
            try:
                subscription.wait(None)
                if self._released:
                    return
                if not self._store.client.query("check own row", self._store.sql.holds, self._params()):
                    self._notify_lost_once()
                    return
            except StoreError as exc:
                # The candidate renews (or gives up) on its own; watch again after it got through.
                log.debug("postgres: the guard of %r on %r failed; again after the next renewal: %s",
                          self.node, self.key, exc)
                self._renewed.clear()
                self._renewed.wait()
                try:
                    fresh = self._store.client.subscribe(self.key)
                except StoreError:
                    continue
                subscription.close()
                subscription = self._subscription = fresh
                fresh.hold(self.term)
                fresh.notify(False, None)  # a deletion may have been missed meanwhile

    def _notify_lost_once(self) -> None:
        if not self._released and self._pid == os.getpid():
            log.info("postgres: %r lost %r (term %d)", self.node, self.key, self.term)
            self.notify_lost()


class PostgresStore(Store):
    """Elections on a PostgreSQL database: a lease row per key in one table.

    :param addrs: ``host:port`` of the server (default ``127.0.0.1:5432``).
    :param dbname, user: the database and the role to connect as (libpq's defaults otherwise).
    :param password, password_file: the role's password, or a file whose first line is it.
    :param timeout: seconds for connecting and for each statement (default 5).
    :param pool_size: statement connections (default 2), besides the one LISTEN connection.
    :param sslmode, sslrootcert, sslcert, sslkey: libpq's TLS parameters; or the other stores'
        names ``tls``, ``ca_file``, ``cert_file``, ``key_file``, ``verify`` (a CA file means
        ``verify-full``: the chain and the host name are checked).
    :param schema, table: where the lease rows live (default ``greenleader_leases`` in the
        search path); the sequence ``<table>_term`` and the function ``<table>_notify`` beside it.
    :param create: create the table, sequence and trigger on first use when missing (default
        true); false for a role that may only use them (docs/stores/postgres.md lists the grants).
    """

    backend: ClassVar[str] = "postgres"
    #: A statement and its NOTIFY take milliseconds; below half a second a loaded machine's
    #: renewals could not keep up with the renew deadline (2/3 of the TTL).
    min_ttl: ClassVar[float] = 0.5

    def __init__(self, addrs: list[str] | None = None, *, table: object = "greenleader_leases",
                 schema: object = None, create: object = True, **options: Any) -> None:
        self.table = check_text("table", table, max_length=50)  # + "_notify" stays within 63
        self.schema = None if schema in (None, "") else check_text("schema", schema, max_length=63)
        self.create = check_bool("create", create)
        self.sql = _Sql(self.schema, self.table)
        #: The transport (:class:`~greenleader.stores.postgres.client.PostgresClient`): it checks the options.
        self.client = PostgresClient(addrs, channel=_channel(self.schema, self.table), **options)
        self.addrs, self.timeout, self.user = self.client.addrs, self.client.timeout, self.client.user
        self.dbname, self.secure = self.client.dbname, self.client.secure
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"<PostgresStore {self.client.describe()} table={self.sql.table_name}>"

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> Store:
        """``postgres://user:password@host:port/dbname?...``: the path names the database."""
        dbname = path.strip("/")
        if "/" in dbname:
            raise InvalidArgumentError(f"the postgres store URL's path is a database name, got {path!r}")
        if dbname:
            if "dbname" in options:
                raise InvalidArgumentError("give the database in the URL's path or as dbname, not both")
            options = {**options, "dbname": dbname}
        return cls(addrs, **options)

    @property
    def requests(self) -> dict[str, int]:
        """Statements sent, by kind."""
        return self.client.requests

    def close(self) -> None:
        self.client.close()

    def validate_key(self, key: str) -> str:
        key = super().validate_key(key)
        try:
            key.encode()
        except UnicodeEncodeError:  # a lone surrogate: not text PostgreSQL could store
            raise InvalidKeyError(f"postgres election key {key!r} is not valid Unicode text") from None
        return key

    # -- the store contract -----------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        """Take the key's row when it is free; else wait for a NOTIFY about it or for the
        holder's expiry, and try again. A waiting candidate has nothing in the database."""
        self._ensure_schema()
        subscription = self.client.subscribe(key)  # first: no NOTIFY after the next try is missed
        try:
            while True:
                owner = uuid.uuid4().hex
                started = now()
                params = {"key": key, "node": node, "owner": owner, "ttl": ttl}
                try:
                    term, remaining = self.client.query("take", self.sql.take, params)[0]
                except BaseException:
                    self._withdraw_later(key, owner)  # cut short: the row may have been taken
                    raise
                if term is not None:
                    log.debug("postgres: %r won %r with term %d", node, key, term)
                    return _PostgresLease(self, key, node, int(term), started, ttl, subscription)
                subscription.wait(ttl if remaining is None else max(0.0, remaining) + _EXPIRY_SLACK)
        except BaseException:
            subscription.close()
            raise

    def leader(self, key: str) -> LeaderInfo | None:
        self._ensure_schema()
        deadline, delay = now() + self.timeout, _CLAIM_POLL[0]
        while True:
            info, unclaimed, _ = self._read(key)
            if not unclaimed or now() >= deadline:
                return info
            # A winner claims its row one round trip after it learnt it won: wait for that
            # (bounded: it may be frozen, or lost) rather than report a vacancy.
            gevent.sleep(min(delay, max(0.0, deadline - now())))
            delay = min(delay * 2, _CLAIM_POLL[1])

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        """The leader now, then after each NOTIFY about the key and whenever the holder's expiry
        passes (a crashed holder sends nothing). A broken LISTEN connection raises."""
        self._ensure_schema()
        with self.client.subscribe(key) as subscription:
            while True:
                info, _, remaining = self._read(key)
                yield info
                subscription.wait(None if remaining is None else max(0.0, remaining) + _EXPIRY_SLACK)

    # -- helpers ----------------------------------------------------------------------------

    def _read(self, key: str) -> tuple[LeaderInfo | None, bool, float | None]:
        """(the named leader, whether an unclaimed holder is there, the holder's remaining seconds)."""
        rows = self.client.query("read", self.sql.read, {"key": key})
        if not rows:
            return None, False, None
        node, term, named, revoked, remaining = rows[0]
        return (LeaderInfo(node, int(term)) if named else None), not (named or revoked), float(remaining)

    def _withdraw_later(self, key: str, owner: str) -> None:
        """Delete a row this candidacy may have taken just as it was cut short (killed, timed out)."""
        def withdraw() -> None:
            try:
                self.client.query("withdraw", self.sql.withdraw, {"key": key, "owner": owner})
            except StoreError as exc:
                log.info("postgres: could not withdraw a cut-short try on %r (it expires after its TTL): %s",
                         key, exc)

        gevent.spawn(withdraw)

    def _ensure_schema(self) -> None:
        """Create the table, sequence and trigger when missing and allowed; once per store."""
        if self._schema_ready:
            return
        params = {"table": self.sql.table_name, "sequence": self.sql.sequence_name}
        if not self.client.query("check schema", self.sql.exists, params)[0][0]:
            if not self.create:
                raise StoreError(f"the postgres table {self.sql.table_name} or its sequence is missing and "
                                 "create=false: create them as docs/stores/postgres.md shows")
            log.info("postgres: creating %s", self.sql.table_name)
            self.client.query("create schema", self.sql.schema)
        self._schema_ready = True
