"""Run a store call in a greenlet of its own, and clean up what it made if its caller gives up.

A call that makes something in the store (a lease, a session, a candidate key) must not leak
it when its caller is killed, times out or is stopped just as the answer arrives. The pattern,
written once here:

>>> making = spawn(store.acquire, key, node, ttl)     # the call runs in a greenlet of its own
>>> try:
...     lease = result(making, timeout=5)             # its value, or what it raised
... except BaseException:                             # killed, timed out: hand the lease back
...     abandon(making, lambda lease: lease.release())
...     raise

or, for the whole of it, ``lease = made(lambda lease: lease.release(), store.acquire, key, node, ttl)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import Greenlet, GreenletExit

T = TypeVar("T")

__all__ = ["abandon", "made", "outcome", "result", "spawn"]


def outcome(func: Callable[..., T], *args: object) -> T | BaseException:
    """``func(*args)``, or the exception it raised (GreenletExit included), as a value.

    A greenlet dying of an exception would have gevent print its traceback though the caller
    handles it; and a GreenletExit out of a store call must not pass for a kill of the caller.
    A kill of the greenlet running this leaves its GreenletExit as the value too.
    """
    try:
        return func(*args)
    except (Exception, GreenletExit) as exc:
        return exc


def spawn(func: Callable[..., Any], *args: object) -> Greenlet:
    """``func(*args)`` in a new greenlet whose value is its :func:`outcome`."""
    return gevent.spawn(outcome, func, *args)


def result(greenlet: Greenlet, timeout: float | None = None) -> Any:
    """Wait for ``greenlet`` (from :func:`spawn`); its value, or raise what the call raised.

    Raises :class:`gevent.Timeout` if it has not finished within ``timeout`` (it runs on)."""
    value = greenlet.get(timeout=timeout)
    if isinstance(value, BaseException):
        raise value
    return value


def _is_product(value: object) -> bool:
    return value is not None and not isinstance(value, BaseException)


def abandon(greenlet: Greenlet, discard: Callable[[Any], object], *, kill: bool = True,
            is_product: Callable[[object], bool] = _is_product) -> None:
    """Give up on ``greenlet`` (from :func:`spawn`); whatever it made goes to ``discard``.

    ``kill=True`` kills the call and waits for it to die: for a call that undoes its own work
    when killed (a waiting ``acquire`` withdraws). If it had finished first, its product is
    discarded here, in the caller. ``kill=False`` lets the call finish: for a call that must not
    be cut short (creating a session); its product is then discarded, from a greenlet of its
    own, once it exists. A product is a value that is not None nor an exception (``is_product``).
    """
    def discard_when_made(finished: Greenlet) -> None:
        if is_product(finished.value):
            discard(finished.value)

    if kill and not greenlet.ready():
        try:
            greenlet.kill(block=True)
        except BaseException:  # killed again while waiting: clean up behind us
            greenlet.link_value(discard_when_made)
            raise
    if greenlet.ready():
        value = greenlet.value if greenlet.successful() else None
        if is_product(value):
            discard(value)
    else:
        greenlet.link_value(discard_when_made)


def made(discard: Callable[[T], object], func: Callable[..., T], *args: object,
         timeout: float | None = None, kill: bool = False) -> T:
    """``func(*args)`` run kill-safe: its value; but if the caller is killed or ``timeout``
    passes first, the call's product (if any, now or later) goes to ``discard`` (see
    :func:`abandon` for ``kill``) and the kill or :class:`gevent.Timeout` goes on."""
    making = spawn(func, *args)
    try:
        return result(making, timeout)
    except BaseException:  # (an exception the call returned is no product: nothing to discard)
        abandon(making, discard, kill=kill)
        raise
