"""Arguments checked once, where they enter greenleader.

A key, a node name or a TTL comes from the application through :class:`~greenleader.Candidate`,
:class:`~greenleader.Follower` (and the integrations built on them), which check it here when
they are made. A store's ``acquire``, ``leader`` and ``watch`` are then only ever called with
checked values, and do not check them again (see :class:`~greenleader.stores.base.Store`).

What is valid may depend on the store (a ZooKeeper key is a path, a TTL must lie in the
store's range), so the key and TTL checks ask the store: :meth:`Store.validate_key` and
:meth:`Store.validate_ttl`, which a store overrides to add its own rules.

Store options (timeouts, flags) are checked by the store's constructor with the same
:func:`check_float`, :func:`check_bool` and :func:`check_text`, re-exported here.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from .base import Store, check_bool, check_float, check_text

__all__ = ["check_bool", "check_candidacy", "check_float", "check_key", "check_node", "check_store",
           "check_text", "check_ttl"]


def check_store(store: object) -> Store:
    """``store`` if it is a greenleader store, else InvalidArgumentError."""
    if not isinstance(store, Store):
        raise InvalidArgumentError(f"store must be a greenleader Store, not {type(store).__name__}")
    return store


def check_key(store: Store, key: object) -> str:
    """An election key valid in ``store``, else InvalidKeyError."""
    return store.validate_key(key)  # type: ignore[arg-type]


def check_node(node: object) -> str:
    """A node name: a non-empty str of at most 512 characters, without control characters."""
    return check_text("node", node)


def check_ttl(store: Store, ttl: object) -> float:
    """A TTL, in seconds, that ``store`` honours, else InvalidArgumentError."""
    return store.validate_ttl(ttl)  # type: ignore[arg-type]


def check_candidacy(store: object, key: object, node: object, ttl: object) -> tuple[Store, str, str, float]:
    """Everything a store's ``acquire`` is called with, checked: ``(store, key, node, ttl)``."""
    checked = check_store(store)
    return checked, check_key(checked, key), check_node(node), check_ttl(checked, ttl)
