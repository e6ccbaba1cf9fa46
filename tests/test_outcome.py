"""The kill-safe call helper (greenleader._outcome): what a call made is never lost when its
caller gives up, whether the caller is killed, times out, or the call is killed itself."""

from __future__ import annotations

import gevent
import gevent.event
import pytest
from gevent import GreenletExit

from greenleader._outcome import abandon, made, result, spawn
from greenleader.errors import StoreUnavailableError

pytestmark = pytest.mark.timeout(30)


class Maker:
    """A store call that makes a numbered thing once ``go`` is set, and the things discarded."""

    def __init__(self) -> None:
        self.go = gevent.event.Event()
        self.made: list[int] = []
        self.discarded: list[int] = []
        self.undone = 0  # killed while waiting: it withdrew

    def make(self) -> int:
        try:
            self.go.wait()
        except GreenletExit:
            self.undone += 1
            raise
        self.made.append(len(self.made) + 1)
        return self.made[-1]

    def discard(self, thing: int) -> None:
        self.discarded.append(thing)


def test_the_value_or_the_error_of_the_call_reaches_the_caller() -> None:
    maker = Maker()
    maker.go.set()
    assert made(maker.discard, maker.make) == 1
    assert maker.discarded == []

    def failing() -> None:
        raise StoreUnavailableError("down")

    with pytest.raises(StoreUnavailableError, match="down"):
        made(maker.discard, failing)
    assert result(spawn(lambda: 7)) == 7


def test_a_caller_killed_mid_call_leaves_the_product_to_discard() -> None:
    """kill=False: the call finishes after its caller was killed; what it made is discarded."""
    maker = Maker()
    caller = gevent.spawn(made, maker.discard, maker.make)
    gevent.sleep(0.01)
    caller.kill()
    assert maker.discarded == [] and maker.undone == 0
    maker.go.set()
    with gevent.Timeout(5, AssertionError("the product was never discarded")):
        while not maker.discarded:
            gevent.sleep(0.01)
    assert maker.discarded == maker.made == [1]


def test_a_caller_that_times_out_leaves_the_product_to_discard() -> None:
    maker = Maker()
    with pytest.raises(gevent.Timeout):
        made(maker.discard, maker.make, timeout=0.05)
    maker.go.set()
    with gevent.Timeout(5, AssertionError("the product was never discarded")):
        while not maker.discarded:
            gevent.sleep(0.01)
    assert maker.discarded == [1]


def test_kill_true_withdraws_the_call_and_discards_only_a_product_it_had() -> None:
    """kill=True: a call still waiting is killed (and undoes itself), nothing to discard; a call
    that had finished has its product discarded at once, in the caller."""
    waiting = Maker()
    call = spawn(waiting.make)
    gevent.sleep(0.01)
    abandon(call, waiting.discard)
    assert call.ready() and waiting.undone == 1 and waiting.discarded == []

    finished = Maker()
    finished.go.set()
    call = spawn(finished.make)
    call.join()
    abandon(call, finished.discard)
    assert finished.discarded == [1]


def test_an_error_or_a_greenlet_exit_out_of_the_call_is_no_product() -> None:
    discarded: list[object] = []

    def exits() -> None:
        raise GreenletExit

    call = spawn(exits)
    call.join()
    assert isinstance(call.value, GreenletExit), "a GreenletExit out of the call is its value, not a kill"
    abandon(call, discarded.append)
    assert discarded == []
