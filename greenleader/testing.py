"""Test helpers for applications that use greenleader: a store that misbehaves on demand.

:class:`FaultyStore` wraps a real store (memory, file, or any other) and forwards every
primitive to it. It is not a mock: elections really happen in the inner store. On top, it can
make any primitive fail (raise any exception) or be slow at chosen calls, and it keeps a history
of every call, so a test can check how the application copes with store trouble::

    from greenleader import Candidate
    from greenleader.errors import StoreUnavailableError
    from greenleader.stores.memory import MemoryStore
    from greenleader.testing import FaultyStore

    store = FaultyStore(MemoryStore())
    candidate = Candidate(store, "jobs/leader", "web-1", ttl=1)
    elected, errors = candidate.run_for_election()
    ...
    store.fail_next("renew", StoreUnavailableError("network down"), times=3)  # three failed renewals
    store.fail_next("release", OSError(5, "EIO"), after=True)   # released, but the reply was lost
    store.fail_when("acquire", RuntimeError("bug"), lambda call: call.node == "web-1")
    store.delay_next("release", 0.2)                             # a release that takes 200 ms
    renewals = [call for call in store.history if call.primitive == "renew"]

The primitives are ``acquire``, ``leader`` and ``watch`` of the store, and ``renew`` and
``release`` of the leases it returns. A watch counts one call per value it yields: a fault
"before" hits when the caller asks for the next value, one ``after=True`` when the value arrives.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent

from .errors import InvalidArgumentError
from .stores.base import LeaderInfo, Lease, Store, now

__all__ = ["PRIMITIVES", "Call", "Fault", "FaultyLease", "FaultyStore"]

#: The primitives a fault can target.
PRIMITIVES = ("acquire", "renew", "release", "leader", "watch")


@dataclass
class Call:
    """One call of a primitive, as :attr:`FaultyStore.history` records it.

    ``node`` is the candidate's node for ``acquire``/``renew``/``release``, the leader a
    ``watch`` yielded (``None`` when vacant) and ``None`` for ``leader``. ``term`` is the
    lease's term (for ``acquire``, once won). ``outcome`` is ``"running"``, ``"returned"``,
    ``"raised"`` (the inner store raised, or the call was killed) or ``"injected"``.
    ``forwarded`` tells whether the inner store's primitive completed (for ``release``: the key
    was given up). Times are :func:`time.monotonic` instants.
    """

    primitive: str
    key: str
    node: str | None
    term: int | None
    started: float
    ended: float | None = None
    outcome: str = "running"
    error: BaseException | None = None
    forwarded: bool = False


@dataclass
class Fault:
    """A rule: calls of ``primitive`` for which ``predicate(call)`` holds (every call when it is
    None) wait ``delay`` seconds, then raise ``error`` (if any): before reaching the inner store,
    or ``after`` it did its work (a lost reply). ``times`` calls at most (None: until removed)."""

    primitive: str
    error: BaseException | type[BaseException] | None = None
    predicate: Callable[[Call], bool] | None = None
    times: int | None = 1
    after: bool = False
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.primitive not in PRIMITIVES:
            raise InvalidArgumentError(f"primitive must be one of {', '.join(PRIMITIVES)}, not {self.primitive!r}")

    def exception(self, call: Call) -> BaseException | None:
        if isinstance(self.error, type):
            return self.error(f"injected into {call.primitive} of {call.key!r}")
        return self.error


class FaultyStore(Store):
    """Forwards every primitive to ``inner``, failing or slowing the calls its faults match.

    :param on_call: called with each :class:`Call` as the primitive is entered, in the calling
        greenlet and before any fault applies: a place to check the state of the application at
        that instant (for example, that a candidate says it no longer leads when it releases).
        It must not block.
    :param history_size: how many calls :attr:`history` keeps (the oldest are dropped).
    """

    def __init__(
        self,
        inner: Store,
        *,
        on_call: Callable[[Call], None] | None = None,
        history_size: int = 100_000,
    ) -> None:
        self.inner = inner
        self.backend = inner.backend  # type: ignore[misc]
        self.min_ttl = inner.min_ttl  # type: ignore[misc]
        self.max_ttl = inner.max_ttl  # type: ignore[misc]
        self.on_call = on_call
        self.faults: list[Fault] = []
        self.history: collections.deque[Call] = collections.deque(maxlen=history_size)

    def __repr__(self) -> str:
        return f"<FaultyStore of {self.inner!r}>"

    # -- telling it what to do -----------------------------------------------------------

    def add_fault(self, fault: Fault) -> Fault:
        """Apply ``fault`` from the next call on; faults are tried in the order they were added."""
        self.faults.append(fault)
        return fault

    def fail_next(
        self, primitive: str, error: BaseException | type[BaseException], *, times: int = 1, after: bool = False
    ) -> Fault:
        """Make the next ``times`` calls of ``primitive`` raise ``error``."""
        return self.add_fault(Fault(primitive, error, times=times, after=after))

    def fail_when(
        self,
        primitive: str,
        error: BaseException | type[BaseException],
        predicate: Callable[[Call], bool],
        *,
        times: int | None = None,
        after: bool = False,
    ) -> Fault:
        """Make the calls of ``primitive`` for which ``predicate(call)`` holds raise ``error``."""
        return self.add_fault(Fault(primitive, error, predicate, times=times, after=after))

    def delay_next(self, primitive: str, seconds: float, *, times: int = 1) -> Fault:
        """Make the next ``times`` calls of ``primitive`` take ``seconds`` longer (a slow round trip)."""
        return self.add_fault(Fault(primitive, None, times=times, delay=seconds))

    def remove_fault(self, fault: Fault) -> None:
        if fault in self.faults:
            self.faults.remove(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    # -- the store contract -----------------------------------------------------------

    def validate_key(self, key: str) -> str:
        return self.inner.validate_key(key)

    def validate_ttl(self, ttl: float) -> float:
        return self.inner.validate_ttl(ttl)

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        call = self._enter("acquire", key, node, None)
        lease = self._run(call, lambda: FaultyLease(self, self.inner.acquire(key, node, ttl)))
        call.term = lease.term
        return lease

    def leader(self, key: str) -> LeaderInfo | None:
        call = self._enter("leader", key, None, None)
        return self._run(call, lambda: self.inner.leader(key))

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        inner = self.inner.watch(key)
        try:
            while True:
                call = self._enter("watch", key, None, None)
                info = self._run(call, lambda: next(inner, StopIteration))
                if info is StopIteration:
                    return
                call.node = info.node if info is not None else None
                yield info
        finally:
            inner.close()

    def close(self) -> None:
        """Close the inner store."""
        self.inner.close()

    # -- internals ----------------------------------------------------------------------

    def _enter(self, primitive: str, key: str, node: str | None, term: int | None) -> Call:
        call = Call(primitive, key, node, term, started=now())
        self.history.append(call)
        if self.on_call is not None:
            self.on_call(call)
        return call

    def _matching_fault(self, call: Call) -> Fault | None:
        for fault in self.faults:
            if fault.primitive == call.primitive and (fault.predicate is None or fault.predicate(call)):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _run(self, call: Call, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` (the inner primitive) for ``call``, applying the first matching fault."""
        fault = self._matching_fault(call)
        error = fault.exception(call) if fault is not None else None
        try:
            if fault is not None and fault.delay:
                gevent.sleep(fault.delay)
            if error is not None and not fault.after:  # type: ignore[union-attr]
                raise error
            result = forward()
            call.forwarded = True
            if error is not None:
                raise error
        except BaseException as exc:
            call.outcome = "injected" if exc is error else "raised"
            call.error = exc
            raise
        else:
            call.outcome = "returned"
            return result
        finally:
            call.ended = now()


class FaultyLease(Lease):
    """The lease a :class:`FaultyStore` returns: ``renew`` and ``release`` go through its faults."""

    def __init__(self, store: FaultyStore, inner: Lease) -> None:
        self.inner = inner
        super().__init__(inner.key, inner.node, inner.term, inner.confirmed_at)
        self._store = store
        inner.on_lost = self.notify_lost  # a loss the inner store learns of reaches the candidate
        self.lost_reported = inner.lost_reported

    @property  # type: ignore[override]
    def confirmed_at(self) -> float:
        return self.inner.confirmed_at

    @confirmed_at.setter
    def confirmed_at(self, value: float) -> None:
        self.inner.confirmed_at = value

    def renew(self) -> None:
        call = self._store._enter("renew", self.key, self.node, self.term)
        self._store._run(call, self.inner.renew)

    def release(self) -> None:
        call = self._store._enter("release", self.key, self.node, self.term)
        self._store._run(call, self.inner.release)

    def abandon(self) -> None:
        """A forked child's copy: forgotten without telling the store (no fault applies)."""
        self.inner.abandon()
