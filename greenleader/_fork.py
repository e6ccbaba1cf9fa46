"""Fork safety: a forked child inherits no leadership (docs/safety.md, rule 11).

``os.fork()`` copies every Candidate, Follower and duty runner of the parent, with their
greenlets, open lock files and store connections. Left alone, the child's copy of a leading
candidate would keep renewing the parent's lock (two leaders) or release it (no leader). So
right after a fork, in the child only, every registered object turns inert: it reports
nothing, leads nothing, renews and releases nothing, and its greenlets are killed before
the child's hub runs them again.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["register"]

log = logging.getLogger(__name__)


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None:
        """Become inert in a forked child. Must not switch greenlets or touch the store."""


_registered: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    """Make ``obj`` inert in any child forked from this process from now on."""
    _registered.add(obj)


def _after_fork_in_child() -> None:
    inherited = list(_registered)
    _registered.clear()
    for obj in inherited:
        try:
            obj._after_fork_in_child()
        except Exception:  # a fork must never fail because of us
            log.exception("could not make %r inert after fork", obj)


os.register_at_fork(after_in_child=_after_fork_in_child)
