"""The store contract: the few primitives a backend implements.

All election logic (deadlines, retries, queues, events) lives in
:mod:`greenleader.candidate` and :mod:`greenleader.follower`. A backend only knows how to
hold a key for a node, confirm and give up that hold, and read and watch who holds it.

Every method must cooperate with gevent (never block the hub) and must tolerate the
calling greenlet being killed with :class:`gevent.GreenletExit` at any blocking point,
leaving nothing behind in the store (:mod:`greenleader._outcome` has the helper for a call
that makes something: ``made()``, or ``spawn()``/``result()``/``abandon()``).

A renewal runs in the candidate's keepalive greenlet, under the candidate's own
:class:`gevent.Timeout` (its renew deadline) and wake-up signal (a resign, a stop, a loss):
both are raised inside ``renew`` at any blocking point. A store must let every exception it
did not raise itself pass through: an ``except gevent.Timeout`` or ``except BaseException``
that swallows the candidate's would let a renewal outlive its deadline (compare
``timeout is mine`` before handling a Timeout of the store's own).

What a store does not do, because the layer above does it once for every store:

- check its arguments: ``acquire``, ``leader`` and ``watch`` get a key, node and TTL already
  checked by :mod:`greenleader.stores._checks` (through ``validate_key``/``validate_ttl``,
  which a store overrides to add its rules);
- retry: how long to ride out an outage is the Candidate's and Follower's decision (with
  :class:`~greenleader.retry.Backoff`); a store raises StoreUnavailableError and, at most,
  resumes its transport;
- de-duplicate watch values: the Follower does;
- share a watch between followers of one key: the Follower does (one ``watch(key)`` per
  store object and key, fanned out in-process).

Names every store uses for the same things:

- :meth:`Lease.notify_lost` is *the* loss signal: the one way a store tells the candidate,
  outside a renewal, that a hold is gone (a watch saw the key go, a shared session or lease
  ended). A shared session that ends calls it on every lease it carried.
- :class:`SessionLost` is what ``renew`` raises when the session or lease that carried the
  hold has ended (a :class:`~greenleader.errors.LeadershipLostError`: the tenure is over).
- ``_Candidacy`` is a store's waiting candidacy for one key: its registration in the store
  from ``acquire`` until it wins (and becomes the :class:`Lease`) or is withdrawn.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidArgumentError, InvalidKeyError, LeadershipLostError

__all__ = ["LeaderInfo", "Lease", "SessionLost", "Store", "check_bool", "check_float", "check_text"]


class SessionLost(LeadershipLostError):
    """The session or lease that carried a hold has ended (expired, destroyed, revoked):
    every tenure it carried is over. Raised by ``Lease.renew``; see also :meth:`Lease.notify_lost`."""


@dataclass(frozen=True)
class LeaderInfo:
    """Who holds a key: the leader's node name and its fencing term (``None`` if unknown)."""

    node: str
    term: int | None = None


class Lease(abc.ABC):
    """A won tenure of ``key`` by ``node``, with its fencing ``term``.

    ``confirmed_at`` is a :func:`time.monotonic` instant no later than the moment the store
    last confirmed the hold; the store will not hand the key to anyone else before
    ``confirmed_at + ttl``. The candidate leads only until ``confirmed_at + renew_deadline``.
    """

    def __init__(self, key: str, node: str, term: int, confirmed_at: float) -> None:
        self.key = key
        self.node = node
        self.term = term
        self.confirmed_at = confirmed_at
        #: Set by the candidate; a backend that learns of a loss asynchronously (a watch, a
        #: session event) calls it. It must not block and may be called from any greenlet.
        self.on_lost: Callable[[], None] | None = None
        self.lost_reported = False

    def notify_lost(self) -> None:
        """For backends: tell the candidate that the hold is gone, without waiting for a renewal.

        A loss reported before the candidate set ``on_lost`` is remembered (``lost_reported``)."""
        self.lost_reported = True
        if self.on_lost is not None:
            self.on_lost()

    @abc.abstractmethod
    def renew(self) -> None:
        """Confirm the hold and advance ``confirmed_at``.

        Raises :class:`~greenleader.errors.LeadershipLostError` when the store no longer
        holds the key for this lease, or :class:`~greenleader.errors.StoreUnavailableError`
        on a failure that may be transient.
        """

    @abc.abstractmethod
    def release(self) -> None:
        """Give the key up at once so a waiter can win. Idempotent; raises only StoreError."""

    def abandon(self) -> None:
        """Forget the hold without telling the store: a forked child's copy of the lease, or a
        hold whose release kept failing (the candidate gave up on it).

        Called right after ``fork()`` in the child, so it must not switch greenlets or do
        network I/O. Close local resources that would otherwise keep the hold alive for as long
        as this process lives (a lock file's descriptor), so that the store frees the key by its
        TTL at the latest; the parent's own copy is untouched.
        """
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key={self.key!r} node={self.node!r} term={self.term}>"


class Store(abc.ABC):
    """A key/value store that elections can run on."""

    #: Backend name, as used by ``new_store()`` and as the ``from_url()`` scheme.
    backend: ClassVar[str] = ""
    #: Whether a won key stays held until its release or this process's death, whatever the
    #: renewals (a lock file): then no TTL bounds the hold once the candidate steps down.
    holds_until_released: ClassVar[bool] = False
    #: Smallest and largest TTL, in seconds, that the backend honours.
    min_ttl: ClassVar[float] = 0.0
    max_ttl: ClassVar[float] = 86400.0

    def validate_key(self, key: str) -> str:
        """Return ``key`` if it is a valid election key here, else raise InvalidKeyError."""
        if not isinstance(key, str):
            raise InvalidKeyError(f"key must be a str, not {type(key).__name__}")
        if not key or not key.strip("/"):
            raise InvalidKeyError("key must not be empty")
        if len(key) > 512:
            raise InvalidKeyError(f"key is {len(key)} characters long; the limit is 512")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
            raise InvalidKeyError(f"key {key!r} contains control characters")
        return key

    def validate_ttl(self, ttl: float) -> float:
        """Return ``ttl`` as a float if the backend honours it, else raise InvalidArgumentError."""
        ttl = check_float("ttl", ttl, minimum=0.0, inclusive=False)
        if ttl < self.min_ttl or ttl > self.max_ttl:
            raise InvalidArgumentError(
                f"ttl={ttl:g}s is outside the {self.backend} store's range "
                f"of {self.min_ttl:g}s to {self.max_ttl:g}s"
            )
        return ttl

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> Store:
        """Build the store from a parsed URL. Backends that use the path (a ZooKeeper chroot,
        a directory) override this; the default rejects a path."""
        if path not in ("", "/"):
            raise InvalidArgumentError(f"the {cls.backend} store URL takes no path, got {path!r}")
        return cls(addrs, **options)

    @abc.abstractmethod
    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        """Block cooperatively until ``node`` holds ``key``; return the lease.

        Killing the calling greenlet while it waits must withdraw the candidacy. The
        arguments are checked by the caller (:mod:`._checks`).
        """

    @abc.abstractmethod
    def leader(self, key: str) -> LeaderInfo | None:
        """Who holds ``key`` now, or ``None`` when it is vacant (``key`` checked by the caller)."""

    @abc.abstractmethod
    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        """Yield who holds ``key`` now, then again after each change (``None`` = vacant).

        A key that does not exist yet is vacant, not an error. Values may repeat; the
        follower de-duplicates, and shares one watch among its followers of ``key`` on this
        store object. Closing the generator releases what the watch holds.
        """

    def close(self) -> None:
        """Release connections held by the store. Leases must be released first."""
        return None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def now() -> float:
    """The monotonic clock every deadline in greenleader is measured on."""
    return time.monotonic()


def check_text(name: str, value: object, *, max_length: int = 512) -> str:
    """A non-empty str without control characters, or InvalidArgumentError."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(f"{name} must not be empty")
    if len(value) > max_length:
        raise InvalidArgumentError(f"{name} is {len(value)} characters long; the limit is {max_length}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidArgumentError(f"{name} {value!r} contains control characters")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive: bool = True,
) -> float:
    """A finite number (a numeric string is accepted, for URL options), or InvalidArgumentError."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a number, not bool")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{name} must be a number, not {value!r}") from None
    if not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be finite, not {number}")
    if minimum is not None and (number < minimum or (not inclusive and number == minimum)):
        bound = ">=" if inclusive else ">"
        raise InvalidArgumentError(f"{name} must be {bound} {minimum:g}, not {number:g}")
    if maximum is not None and number > maximum:
        raise InvalidArgumentError(f"{name} must be <= {maximum:g}, not {number:g}")
    return number


def check_bool(name: str, value: object) -> bool:
    """A bool (or a URL-style string such as "true"/"0"), or InvalidArgumentError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise InvalidArgumentError(f"{name} must be a bool, not {value!r}")
