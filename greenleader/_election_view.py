"""What an election of this process knows, read the same way by a gunicorn worker's election
(:class:`greenleader.gunicorn.WorkerElection`) and a worker process's
(:class:`greenleader.contrib._election.ProcessElection`): both hold a ``candidate`` and a
``follower`` (either None before they exist) and this process's ``node`` name."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import GreenleaderError

if TYPE_CHECKING:
    from .candidate import Candidate
    from .follower import Follower
    from .stores import Store

log = logging.getLogger(__name__)


class ElectionView:
    """``is_leader``, ``term``, ``leads`` and ``leader``, from ``candidate`` and ``follower``; and
    the end of leaving, shared by both."""

    candidate: Candidate | None
    follower: Follower | None
    store: Store | None
    node: str | None

    def is_leader(self) -> bool:
        """True while this process leads."""
        return self.candidate is not None and self.candidate.is_leader()

    @property
    def term(self) -> int | None:
        """This process's fencing term while it leads, else None."""
        return self.candidate.term if self.candidate is not None else None

    def leads(self, term: int) -> bool:
        """True while this process still leads in tenure ``term``: check it before a side effect."""
        return self.candidate is not None and self.candidate.is_leader() and self.candidate.term == term

    def leader(self) -> tuple[str | None, int | None]:
        """The current leader's node name and term, as far as this process knows."""
        term = self.term
        if term is not None:
            return self.node, term
        if self.follower is None:
            return None, None
        try:
            info = self.follower.leader_info()
        except GreenleaderError:
            return None, None
        if info is None or info.node == self.node:  # not us: we know we do not lead
            return None, None
        return info.node, info.term

    def _stop_following_and_close(self) -> None:
        """The end of leaving: stop the follower, then close the store (a failure is logged)."""
        if self.follower is not None:
            self.follower.stop()
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                log.exception("%r: closing the store failed", self)
