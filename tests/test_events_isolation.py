"""One failing event handler must not silence the others, and its log line names it.

zope.event's ``classhandler.dispatch`` calls every handler of an event class in a plain loop,
so before greenleader delivered to each class handler itself, the first one that raised
stopped the ones after it, and the log named ``dispatch`` instead of the user's function.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import zope.event
import zope.event.classhandler

from greenleader import Candidate
from greenleader.events import LeadershipAcquired, LeadershipEvent
from greenleader.stores.memory import MemoryStore
from tests.waiting import next_item

pytestmark = pytest.mark.timeout(30)


class Boom(Exception):
    pass


def first_raises(event: LeadershipEvent) -> None:
    raise Boom("the first handler fails")


@pytest.fixture
def class_handlers() -> Iterator[list]:
    """Registers class handlers for the test and removes them afterwards (the registry is global)."""
    added: list[tuple[type, object]] = []

    def add(event_class: type, handler: object) -> None:
        zope.event.classhandler.handler(event_class, handler)
        added.append((event_class, handler))

    yield add  # type: ignore[misc]
    for event_class, handler in added:
        zope.event.classhandler.registry[event_class].remove(handler)


def _elect(key: str) -> Candidate:
    candidate = Candidate(MemoryStore(), key, "n1", ttl=1.0)
    elected, _ = candidate.run_for_election()
    assert next_item(elected, 5, "the initial False") is False
    assert next_item(elected, 5, "the win") is True
    candidate._publisher.join(timeout=5)
    return candidate


def test_a_raising_class_handler_does_not_stop_the_next(class_handlers, key: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    seen: list[LeadershipEvent] = []

    def second_records(event: LeadershipEvent) -> None:
        if event.key == key:
            seen.append(event)

    class_handlers(LeadershipAcquired, first_raises)
    class_handlers(LeadershipAcquired, second_records)
    class_handlers(LeadershipEvent, second_records)  # a base-class handler runs too, after
    with caplog.at_level(logging.ERROR, logger="greenleader.events"):
        candidate = _elect(key)
        candidate.stop()
    acquired = [e for e in seen if isinstance(e, LeadershipAcquired)]
    assert len(acquired) == 2, f"the handlers after the raising one did not all run: {seen}"
    messages = [r.getMessage() for r in caplog.records if r.name == "greenleader.events"]
    assert any(f"{__name__}.first_raises" in m for m in messages), messages
    assert not any("dispatch" in m for m in messages), messages


def test_a_raising_subscriber_does_not_stop_the_next(key: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[LeadershipEvent] = []

    def record(event: object) -> None:
        if isinstance(event, LeadershipAcquired) and event.key == key:
            seen.append(event)

    zope.event.subscribers.extend([first_raises, record])
    try:
        with caplog.at_level(logging.ERROR, logger="greenleader.events"):
            candidate = _elect(key)
            candidate.stop()
    finally:
        zope.event.subscribers.remove(first_raises)
        zope.event.subscribers.remove(record)
    assert len(seen) == 1, seen
    messages = [r.getMessage() for r in caplog.records if r.name == "greenleader.events"]
    assert any(f"{__name__}.first_raises" in m for m in messages), messages
