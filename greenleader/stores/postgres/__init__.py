"""PostgreSQL store: elections on the database a Flask or Django app already has.

How it meets the safety contract (docs/safety.md; the full account is docs/stores/postgres.md):
each key has one lease row whose expiry the server computes (``clock_timestamp()`` plus the
TTL); a candidate takes the row only when it is absent or expired, drawing its fencing term from
a sequence, in one statement whose ``RETURNING`` proves the win. A renewal moves the expiry of
its own unexpired row only, and a renewal that updates no row is a loss. A winner claims its row
after stepping up, and followers name only claimed rows. A release deletes the row; a trigger
NOTIFYs each change, which wakes waiters and followers (LISTEN), and waiters also wake when the
holder's expiry passes, so crash failover is bounded by the TTL. A forked child's copy never
renews, claims or releases.

:mod:`.recipe` is the election; :mod:`.client` is psycopg 3 under gevent.
"""

from __future__ import annotations

from .recipe import PostgresStore

__all__ = ["PostgresStore"]
