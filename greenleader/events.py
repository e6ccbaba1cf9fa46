"""Leadership events, published with :func:`zope.event.notify`.

Subscribe with ``zope.event.classhandler.handler(LeadershipAcquired, func)``. Subscribers
run in a dedicated greenlet per candidate or follower, never on the keepalive path: a
slow subscriber delays only the events after it, and one that raises is logged under its own
qualified name while the others still run. That holds for plain ``zope.event.subscribers``
and for each ``classhandler`` handler alike: zope's own ``classhandler.dispatch`` stops at the
first handler that raises, so greenleader calls the class handlers one by one itself.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import gevent
import zope.event
import zope.event.classhandler
from gevent.event import Event
from gevent.queue import Queue

__all__ = [
    "ElectionError",
    "LeaderChanged",
    "LeadershipAcquired",
    "LeadershipEvent",
    "LeadershipLost",
    "LossReason",
]

log = logging.getLogger(__name__)


class LossReason(str, enum.Enum):
    """Why a candidate stopped leading."""

    RESIGNED = "resigned"
    STOPPED = "stopped"
    EXPIRED = "expired"  # the store dropped the key (TTL ran out, session lost, key taken)
    DEADLINE = "deadline"  # the renew deadline passed without a confirmed renewal (e.g. hub blocked)
    STORE_ERROR = "store error"


@dataclass(frozen=True)
class LeadershipEvent:
    """Base class: ``source`` is the Candidate or Follower, ``key`` the election key."""

    source: Any
    key: str


@dataclass(frozen=True)
class LeadershipAcquired(LeadershipEvent):
    """``node`` won the election for ``key`` with fencing ``term``."""

    node: str
    term: int


@dataclass(frozen=True)
class LeadershipLost(LeadershipEvent):
    """``node`` stopped leading ``key`` (tenure ``term``) for ``reason``."""

    node: str
    term: int
    reason: LossReason


@dataclass(frozen=True)
class LeaderChanged(LeadershipEvent):
    """A follower saw a new ``leader``: ``None`` when the key is vacant, or, with ``known``
    False, when the follower could not confirm any leader for its ``unknown_after`` seconds."""

    leader: str | None
    term: int | None
    known: bool = True


@dataclass(frozen=True)
class ElectionError(LeadershipEvent):
    """A campaign or watch hit ``error``: it ended if ``fatal``, else it retries after a backoff."""

    error: BaseException
    fatal: bool = True


class EventPublisher:
    """Publishes events in order from a greenlet of its own, so subscribers never block the caller."""

    def __init__(self) -> None:
        self._pending: Queue = Queue()
        self._greenlet: gevent.Greenlet | None = None

    def publish(self, event: LeadershipEvent) -> Event:
        """Queue ``event`` for every subscriber; the returned Event is set once they all ran.

        With nothing queued or being delivered and no subscriber for ``event``, there is
        nobody to run: the Event comes back set, with no greenlet started. This is the
        common case on a handover's critical path (a step-down waits for this Event before
        the release; a step-up publishes just before the new leader's code runs), where a
        greenlet spawned and switched to for nothing cost about a tenth of a millisecond.
        """
        delivered = Event()
        if self._pending.empty() and (self._greenlet is None or self._greenlet.dead) and not _handlers(event):
            delivered.set()
            return delivered
        self._pending.put((event, delivered))
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._drain)
        return delivered

    def _drain(self) -> None:
        while not self._pending.empty():
            event, delivered = self._pending.get()
            try:
                # zope.event.notify() would skip the remaining subscribers after one raises.
                for handler in _handlers(event):
                    try:
                        handler(event)
                    except (Exception, gevent.Timeout):  # a Timeout is no reason to stop publishing
                        log.exception("event handler %s raised on %r", _name(handler), event)
            finally:
                delivered.set()

    def is_current(self) -> bool:
        """True when called from a subscriber, i.e. from this publisher's own greenlet."""
        return self._greenlet is not None and self._greenlet is gevent.getcurrent()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every published event has been delivered (or ``timeout``).

        From a subscriber it returns at once: the publisher cannot wait for itself.
        """
        if self._greenlet is not None and not self.is_current():
            self._greenlet.join(timeout)

    def discard(self) -> None:
        """Drop undelivered events and stop delivering (a forked child's copy publishes nothing)."""
        self._pending = Queue()
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None


def _handlers(event: LeadershipEvent) -> list[Any]:
    """Every subscriber of ``event``, in zope's order, with ``classhandler.dispatch`` expanded
    into the class handlers it would call (in the event class's MRO, then registration order)."""
    handlers: list[Any] = []
    for subscriber in list(zope.event.subscribers):
        if subscriber is zope.event.classhandler.dispatch:
            registry = zope.event.classhandler.registry
            for event_class in type(event).__mro__:
                handlers.extend(registry.get(event_class, ()))
        else:
            handlers.append(subscriber)
    return handlers


def _name(handler: Any) -> str:
    """``module.QualifiedName`` of a handler, for the log; its repr if it has no name."""
    qualname = getattr(handler, "__qualname__", None)
    if not isinstance(qualname, str):
        return repr(handler)
    module = getattr(handler, "__module__", None)
    return f"{module}.{qualname}" if module else qualname
