"""What a Candidate or Follower is doing, for status pages and metrics: a read-only view.

:meth:`Candidate.status() <greenleader.Candidate.status>` and
:meth:`Follower.status() <greenleader.Follower.status>` return frozen snapshots. The
observations behind them (last successful store contact, last error, counters) are recorded by
the campaign and watch greenlets themselves as plain attribute writes: no I/O, no switch to
another greenlet, no user code, so recording cannot delay a renewal. Library observers
(:mod:`greenleader.metrics`) are called at the same points under the same rules.

States of a candidate:

- ``waiting``: not campaigning for now: not started yet, or standing aside after a resign
  (``resign_holdoff``). A :class:`~greenleader.gunicorn.WorkerElection` also reports a
  campaigning worker as ``waiting`` while it knows another node leads (a standby).
- ``campaigning``: waiting in the store for the key.
- ``leading``: holds the key and its renew deadline has not passed.
- ``backing off``: a store error interrupted the campaign; it campaigns again after a backoff.
- ``stopped``: stopped, or the campaign ended on an error (see ``store.last_error``).

Error texts are redacted by :func:`redact` before they are kept: greenleader's stores never put
a secret in a message (docs/security.md), and this is the second line of defence for messages
that come from client libraries.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .stores import _redacted
from .stores.base import now

__all__ = ["STATES", "CandidateStatus", "FollowerStatus", "StoreHealth", "redact", "status_document"]

log = logging.getLogger(__name__)

STATES = ("waiting", "campaigning", "leading", "backing off", "stopped")
#: Longest error text kept: enough for any store's message, short enough for a status page.
MAX_ERROR_LENGTH = 500

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_ASSIGNED = re.compile(
    r"(?i)\b(token|password|passwd|pwd|secret|auth|authorization|x-consul-token|api[_-]?key|credentials?|digest)"
    r"(\s*[=:]\s*)(?:(bearer|basic|digest)\s+)?['\"]?[^\s'\",;&)]+"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def redact(error: BaseException | str) -> str:
    """``Type: message`` of ``error`` (or the text itself), with credentials hidden: URL user
    info and query values, ``token=…``/``password: …`` style assignments, bearer and basic
    credentials; cut to ``MAX_ERROR_LENGTH`` characters."""
    if isinstance(error, str):
        text = error
    else:
        try:
            text = f"{type(error).__name__}: {error}"
        except Exception:  # an exception whose __str__ fails still gets recorded
            text = f"{type(error).__name__} (unprintable)"
    text = _URL.sub(lambda match: _redacted(match.group(0)), text)
    text = _ASSIGNED.sub(lambda match: f"{match.group(1)}{match.group(2)}***", text)
    text = _BEARER.sub(lambda match: f"{match.group(1)} ***", text)
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


@dataclass(frozen=True)
class StoreHealth:
    """How this process's last dealings with the store went.

    ``reachable``: True when the last store call this process could judge succeeded (and, for
    a follower, within its ``unknown_after``), False after an error or a silence that long,
    None before any contact. ``last_contact_age`` and ``last_error_age`` are seconds ago on
    the monotonic clock (None: never). ``errors`` counts the store errors seen.
    """

    backend: str
    reachable: bool | None
    last_contact_age: float | None
    last_error: str | None
    last_error_age: float | None
    errors: int


@dataclass(frozen=True)
class CandidateStatus:
    """A candidate's state (one of :data:`STATES`), its tenure and its store's health.

    ``transitions`` counts its wins and step-downs; ``losses`` its step-downs by
    :class:`~greenleader.events.LossReason` value.
    """

    key: str
    node: str
    state: str
    is_leader: bool
    term: int | None
    transitions: int
    losses: dict[str, int]
    store: StoreHealth

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FollowerStatus:
    """A follower's view: ``state`` is ``waiting`` (not started), ``following``,
    ``backing off`` or ``stopped``; ``leader``/``term`` as :meth:`Follower.leader_info` would
    answer without reading the store; ``leader_changes`` counts the different leaders (a
    vacancy included) it reported after the first."""

    key: str
    state: str
    leader: str | None
    term: int | None
    known: bool
    leader_changes: int
    store: StoreHealth

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Library observers (greenleader.metrics): ``observer(event, record, *args)``; they must not
#: block or switch greenlets. Events: "new" (a record was made), "contact", "error",
#: "renewed" (seconds), "up" (term), "down" (term, LossReason).
OBSERVERS: list[Callable[..., None]] = []

_NEVER = object()


@dataclass
class Record:
    """The observations a Candidate, Follower or WorkerElection keeps about itself.

    Written only by the greenlets that do the store calls, read by ``status()``.
    """

    backend: str
    key: str
    node: str | None = None
    role: str = "candidate"
    contact_at: float | None = None
    error: str | None = None
    error_at: float | None = None
    errors: int = 0
    transitions: int = 0
    losses: dict[str, int] = field(default_factory=dict)
    leader_changes: int = 0
    pause: str | None = None  # "backing off" or "waiting" while the campaign or watch pauses
    last_leader: object = _NEVER

    def __post_init__(self) -> None:
        self._notify("new")

    def contact(self) -> None:
        """A store call succeeded now."""
        self.contact_at = now()
        self._notify("contact")

    def failed(self, error: BaseException | str) -> None:
        """A store call failed now with ``error``."""
        self.error = redact(error)
        self.error_at = now()
        self.errors += 1
        self._notify("error")

    def renewed(self, seconds: float) -> None:
        """A renewal that took ``seconds`` succeeded."""
        self.contact_at = now()
        self._notify("renewed", seconds)

    def stepped_up(self, term: int) -> None:
        self.transitions += 1
        self._notify("up", term)

    def stepped_down(self, term: int, reason: Any) -> None:
        self.transitions += 1
        name = getattr(reason, "value", str(reason))
        self.losses[name] = self.losses.get(name, 0) + 1
        self._notify("down", term, reason)

    def leader_seen(self, node: str | None) -> None:
        """A follower reported ``node`` (None: vacant) as the leader."""
        if self.last_leader is not _NEVER and node != self.last_leader:
            self.leader_changes += 1
        self.last_leader = node

    def paused(self, what: str | None) -> None:
        """The campaign or watch pauses (``backing off``, ``waiting``), or goes on (None)."""
        self.pause = what

    def health(self, window: float | None = None) -> StoreHealth:
        """The store's health from these observations (``window``: longest silence that is healthy)."""
        return combined_health(self.backend, [self], window)

    def _notify(self, event: str, *args: Any) -> None:
        for observer in list(OBSERVERS):
            try:
                observer(event, self, *args)
            except Exception:
                log.exception("observer %r failed on %s", observer, event)


def combined_health(backend: str, records: list[Record], window: float | None = None) -> StoreHealth:
    """One health from several records of one process (a worker's candidate and follower)."""
    at = now()
    contacts = [r.contact_at for r in records if r.contact_at is not None]
    failures = [r for r in records if r.error_at is not None]
    contact_at = max(contacts) if contacts else None
    latest = max(failures, key=lambda r: r.error_at or 0.0) if failures else None
    error_at = latest.error_at if latest is not None else None
    if error_at is not None and (contact_at is None or error_at > contact_at):
        reachable: bool | None = False
    elif contact_at is None:
        reachable = None
    else:
        reachable = window is None or at - contact_at <= window
    return StoreHealth(
        backend=backend,
        reachable=reachable,
        last_contact_age=None if contact_at is None else round(at - contact_at, 3),
        last_error=latest.error if latest is not None else None,
        last_error_age=None if error_at is None else round(at - error_at, 3),
        errors=sum(r.errors for r in records),
    )


def status_document(
    *,
    key: str | None,
    node: str | None,
    leader: str | None,
    term: int | None,
    is_leader: bool,
    candidate: Any,
    follower: Any,
    backend: str,
    stopped: bool = False,
    boot: Record | None = None,
) -> dict[str, Any]:
    """The JSON status of an election made of a ``candidate`` and a ``follower`` (either may be
    None before they exist), as ``/_greenleader`` shows it (see docs/observability.md).

    ``leader``/``term`` are the leader as the election knows it; ``stopped`` says the election
    was left; ``boot`` records the attempts at making the store. A campaigning candidate that
    knows another leader is reported ``waiting``; one that cannot make its store, ``backing off``.
    """
    mine = candidate.status() if candidate is not None else None
    theirs = follower.status() if follower is not None else None
    if stopped:
        state = "stopped"
    elif mine is None:
        state = "backing off" if boot is not None and boot.error is not None else "waiting"
    elif mine.state == "campaigning" and leader is not None and leader != node:
        state = "waiting"
    else:
        state = mine.state
    records = [r for r in (boot, getattr(candidate, "_record", None), getattr(follower, "_record", None))
               if isinstance(r, Record)]
    health = combined_health(backend, records, follower.unknown_after if follower is not None else None)
    return {
        "key": key, "leader": leader, "node": node, "is_leader": is_leader, "term": term,
        "state": state,
        "transitions": mine.transitions if mine is not None else 0,
        "losses": mine.losses if mine is not None else {},
        "leader_changes": theirs.leader_changes if theirs is not None else None,
        "store": asdict(health),
    }
