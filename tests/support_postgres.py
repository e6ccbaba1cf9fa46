"""PostgreSQL test support for the contract suite (see tests/backends.py)."""

from __future__ import annotations

from typing import Any

from greenleader.stores.postgres import PostgresStore
from tests.backends import BackendEnv
from tests.servers import PostgresCluster, closed_port

#: The store's rows expire on the server's clock; 2 s leaves the candidates' renew deadline
#: (2/3 of it) a margin of several renewals on a loaded CI machine, as for etcd.
FAST_TTL = 2.0
TABLE = "greenleader_leases"


def make_store(env: BackendEnv) -> PostgresStore:
    return PostgresStore(env.cluster.addrs, user=env.cluster.SUPERUSER, dbname=env.cluster.DBNAME, timeout=5)


def force_expire(store: PostgresStore, key: str) -> None:
    """Delete the holder's row out of band, as its expiry would end it (the trigger NOTIFYs).

    As greenleader deletes (the statement sets ``greenleader.client``), which the trigger lets
    free the key at once (another client's deletion leaves the row revoked until its expiry, see
    test_store_postgres)."""
    admin = PostgresStore(store.addrs, user=store.user, dbname=store.dbname, timeout=5)
    try:
        rows = admin.client.query("force expire", "WITH own AS (SELECT set_config('greenleader.client', 'on', true)"
                                  f" AS flag) DELETE FROM {TABLE} WHERE key = %s AND (SELECT flag FROM own) = 'on'"
                                  " RETURNING term", [key])
        assert rows, f"nobody holds {key!r}"
    finally:
        admin.close()



def unreachable_store(env: BackendEnv) -> PostgresStore:
    return PostgresStore([f"127.0.0.1:{closed_port()}"], user="postgres", timeout=1)


def leftovers(env: BackendEnv, key: str) -> list[str]:
    """Every live (unexpired) lease row of ``key``."""
    rows = env.cluster.sql(f"SELECT key FROM {TABLE} WHERE key = %s AND expires_at > clock_timestamp()", [key])
    return [row[0] for row in rows]


def registrations(env: BackendEnv, key: str) -> list[tuple[str, int, bool]]:
    """``(node, term, holds)`` of the key's row as the server has it (no queue: waiters keep
    nothing in the database); ``holds``: live, not revoked. For tests/faults.py's table."""
    rows = env.cluster.sql(f"SELECT node, term, NOT revoked AND expires_at > clock_timestamp() FROM {TABLE} "
                           "WHERE key = %s", [key])
    return [(node, int(term), bool(holds)) for node, term, holds in rows]


def sql_at(addr: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement as the test servers' superuser (trust login) on the server at
    ``addr``, as psql would; its rows. For the fault tables, which know addresses only."""
    import psycopg

    host, port = addr.rsplit(":", 1)
    with psycopg.connect(host=host, port=int(port), user=PostgresCluster.SUPERUSER, dbname=PostgresCluster.DBNAME,
                         connect_timeout=5, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description is not None else []


def registrations_at(addr: str, key: str) -> list[tuple[str, str, bool]]:
    """``(node, handle, holds)`` of the key's row (the handle ``term:<term>``), for
    tests/faults.py's table: as :func:`registrations`, through an address."""
    rows = sql_at(addr, f"SELECT node, term, NOT revoked AND expires_at > clock_timestamp() FROM {TABLE} "
                        "WHERE key = %s", [key])
    return [(node, f"term:{term}", bool(holds)) for node, term, holds in rows]


def delete_row_at(addr: str, key: str, handle: str) -> str:
    """Delete the key's row of that term as an operator would (psql); LookupError if the key
    has another row by now (the registration went on its own)."""
    term = int(handle.removeprefix("term:"))
    if not sql_at(addr, f"DELETE FROM {TABLE} WHERE key = %s AND term = %s RETURNING node", [key, term]):
        raise LookupError("has no row now")
    return "postgres DELETE of the candidate's row"


def delete_row(env: BackendEnv, key: str) -> str:
    """Delete the key's row as an operator would (psql): its holder loses at once, the key
    stays taken until the row's expiry (the table's trigger). Returns what was done."""
    deleted = env.cluster.sql(f"DELETE FROM {TABLE} WHERE key = %s RETURNING node", [key])
    assert deleted, f"nobody held {key!r}"
    return f"postgres DELETE of {deleted[0][0]}'s row"
