"""Run a store call in a greenlet of its own and keep what it raised as its value."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gevent import GreenletExit

T = TypeVar("T")


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
