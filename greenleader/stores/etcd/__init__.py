"""etcd v3 store: elections the way etcd's own ``concurrency.Election`` runs them.

How it meets the safety contract (docs/safety.md; the full account is docs/stores/etcd.md):
each candidate holds a lease and a key ``<key>/<lease hex>`` with a twin ``.../live`` made in
the same transaction; the oldest key leads and its create revision is the term. Holders are
kept out of each other's way by that order alone; a crashed holder's lease expires after the
TTL and takes its keys. A win is proven by the transaction that checks our own key and twin;
a waiter never wins while an older greenleader candidate's lease lives; a winner claims its
key only after stepping up, and followers name only claimed keys (or other clients' keys,
which never claim). Deleting either key of a holder ends its tenure. A forked child's copy
never renews, claims or releases.

:mod:`.recipe` is the election; :mod:`.client` is the gRPC transport under gevent.
"""

from __future__ import annotations

from .recipe import EtcdStore

__all__ = ["EtcdStore"]
