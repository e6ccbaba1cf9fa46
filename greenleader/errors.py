"""Exceptions raised by greenleader.

Every error greenleader raises at its API boundary is a :class:`GreenleaderError`,
so callers can catch one class and never see a raw client-library traceback.
"""

from __future__ import annotations

__all__ = [
    "GreenleaderError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidURLError",
    "LeadershipLostError",
    "MissingDependencyError",
    "PermissionDeniedError",
    "StoppedError",
    "StoreError",
    "StoreUnavailableError",
    "UnknownBackendError",
]


class GreenleaderError(Exception):
    """Base class of every greenleader error."""


class InvalidArgumentError(GreenleaderError, ValueError):
    """An argument has the wrong type or a value out of range."""


class InvalidKeyError(InvalidArgumentError):
    """An election key is empty or not valid for the chosen backend."""


class InvalidURLError(InvalidArgumentError):
    """A store URL could not be parsed."""


class UnknownBackendError(InvalidArgumentError):
    """No store backend of that name exists."""


class MissingDependencyError(GreenleaderError, ImportError):
    """The client library a backend needs is not installed (install the extra it names)."""


class StoreError(GreenleaderError):
    """The store failed an operation."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or did not answer in time."""


class PermissionDeniedError(StoreError):
    """The store refused the operation for lack of permission."""


class LeadershipLostError(StoreError):
    """The store no longer holds the key for this candidate (expired or taken)."""


class StoppedError(GreenleaderError):
    """The candidate or follower was stopped and cannot be started again."""
