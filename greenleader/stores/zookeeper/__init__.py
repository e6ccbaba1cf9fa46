"""ZooKeeper store: kazoo's Lock recipe, made session-aware.

How it meets the safety contract (docs/safety.md; the full account is docs/stores/zookeeper.md):
each candidate queues an ephemeral sequential node ``<key>/<uid>__lock__<n>`` with an ephemeral
twin ``<uid>__live__`` made in the same transaction; the lowest sequence leads, its ``czxid`` is
the term, and each waiter watches only its predecessor. The session timeout *is* the TTL (one
kazoo session per TTL, the negotiated timeout checked), so a crashed holder's nodes go after the
TTL; a renewal is a round trip on the session with the watches on its nodes still armed. A
waiter never wins while an older candidate's orphaned twin lives; a winner claims its node only
after stepping up, and followers name only claimed nodes (or kazoo's, which never claim).
Deleting either node of a holder ends its tenure. A forked child's copy is inert.

:mod:`.recipe` is the election; :mod:`.client` is kazoo's sessions under gevent, TLS and ACLs.
"""

from __future__ import annotations

from .recipe import ZooKeeperStore

__all__ = ["ZooKeeperStore"]
