"""Bounded waits with clear failure messages, for tests."""

from __future__ import annotations

from collections.abc import Callable

import gevent
from gevent.queue import Empty, Queue


def next_item(queue: Queue, timeout: float, what: str) -> object:
    """The next item of ``queue``, or fail saying what did not arrive."""
    try:
        return queue.get(timeout=timeout)
    except Empty:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None


def drain(queue: Queue, timeout: float, what: str) -> list[object]:
    """Every item until the queue is closed (StopIteration), or fail."""
    items: list[object] = []
    with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout:g}s waiting for {what} to end")):
        for item in queue:
            items.append(item)
    return items


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate`` until true; for state that has no event to wait on."""
    with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout:g}s waiting until {what}")):
        while not predicate():
            gevent.sleep(interval)


def wins(candidate, timeout: float) -> None:
    """Run ``candidate`` for election and wait for its first item (False) and its win."""
    elected, _ = candidate.run_for_election()
    assert next_item(elected, timeout, f"{candidate.node}'s first item") is False
    assert next_item(elected, timeout, f"{candidate.node} to win") is True
