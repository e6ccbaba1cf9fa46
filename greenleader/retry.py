"""Jittered exponential backoff, for campaigns and watches that must outlive store outages."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import InvalidArgumentError
from .stores.base import check_float

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays of ``initial * multiplier**n`` capped at ``maximum``, each drawn at random from
    ``[delay * (1 - jitter), delay]`` so that a fleet does not retry in lockstep."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier", "jitter"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), minimum=0.0, maximum=86400.0))
        if not 0 < self.initial <= self.maximum:
            raise InvalidArgumentError("Backoff needs 0 < initial <= maximum")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise InvalidArgumentError("Backoff needs multiplier >= 1 and 0 <= jitter <= 1")

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1 - self.jitter * random.random())
            delay = min(delay * self.multiplier, self.maximum)


def as_backoff(retry: Backoff | bool | None) -> Backoff | None:
    """The ``retry`` argument of Candidate and Follower: True means the default Backoff."""
    if retry is None or retry is False:
        return None
    if retry is True:
        return Backoff()
    if isinstance(retry, Backoff):
        return retry
    raise InvalidArgumentError(f"retry must be a bool or a Backoff, not {type(retry).__name__}")
