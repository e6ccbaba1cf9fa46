"""In-process store: elections between greenlets of one process.

Meant for the tests of applications that use greenleader, and for trying the API. It
honours TTLs like a real store, and offers :meth:`MemoryStore.fail`,
:meth:`MemoryStore.recover` and :meth:`MemoryStore.expire` to make it misbehave on demand.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import ClassVar

import gevent
from gevent.event import Event

from ..errors import InvalidArgumentError, LeadershipLostError, StoreUnavailableError
from .base import LeaderInfo, Lease, Store, now

__all__ = ["MemoryStore"]

log = logging.getLogger(__name__)


class _Slot:
    """State of one key: its holder, its last term, its waiters, and a change signal."""

    def __init__(self) -> None:
        self.holder: _MemoryLease | None = None
        self.term = 0
        self.waiters: collections.deque[object] = collections.deque()
        self.changed = Event()

    def signal(self) -> None:
        changed, self.changed = self.changed, Event()
        changed.set()


class _MemoryLease(Lease):
    def __init__(self, store: MemoryStore, key: str, node: str, term: int, ttl: float) -> None:
        super().__init__(key, node, term, now())
        self._store = store
        self._ttl = ttl
        self._expires_at = 0.0
        self._expiry: gevent.Greenlet | None = None
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        """Push the expiry back to a TTL from now. One timer greenlet per hold, which sleeps
        again when it wakes before the (moved) expiry: a renewal only moves a number."""
        self._expires_at = now() + self._ttl
        if self._expiry is None or self._expiry.dead:
            self._expiry = gevent.spawn(self._expire_when_due)

    def _expire_when_due(self) -> None:
        while (left := self._expires_at - now()) > 0:
            gevent.sleep(left)
        self._store._drop(self, lost=True)

    @property
    def held(self) -> bool:
        return self._store._slots[self.key].holder is self

    def renew(self) -> None:
        started = now()
        self._store._check_available()
        if not self.held:
            raise LeadershipLostError(f"{self.node!r} no longer holds {self.key!r}")
        self.confirmed_at = started
        self._schedule_expiry()

    def release(self) -> None:
        if self._expiry is not None:
            self._expiry.kill(block=False)
        self._store._drop(self, lost=False)


class MemoryStore(Store):
    """Elections among greenlets of this process. ``memory://NAME`` URLs share one store per name."""

    backend: ClassVar[str] = "memory"
    _named: ClassVar[dict[str, MemoryStore]] = {}

    def __init__(self, addrs: list[str] | None = None) -> None:
        if addrs:
            raise InvalidArgumentError("the memory store takes no addresses")
        self._slots: collections.defaultdict[str, _Slot] = collections.defaultdict(_Slot)
        self._failure: BaseException | None = None

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> MemoryStore:
        if options or path not in ("", "/") or (addrs and len(addrs) > 1):
            raise InvalidArgumentError("a memory store URL is memory:// or memory://NAME, nothing more")
        name = addrs[0] if addrs else ""
        if name not in cls._named:
            cls._named[name] = cls()
        return cls._named[name]

    # -- failure injection, for tests of code that uses greenleader --------------------

    def fail(self, error: BaseException | None = None) -> None:
        """Make every operation raise ``error`` (a StoreUnavailableError by default) until
        :meth:`recover`. Holders are not renewed meanwhile, so their keys expire by TTL."""
        self._failure = error or StoreUnavailableError("memory store made to fail")
        for slot in self._slots.values():
            slot.signal()

    def recover(self) -> None:
        """Undo :meth:`fail`."""
        self._failure = None
        for slot in self._slots.values():
            slot.signal()

    def expire(self, key: str) -> bool:
        """Drop the holder of ``key`` now, as if its TTL ran out. True if there was one."""
        holder = self._slots[key].holder
        if holder is None:
            return False
        self._drop(holder, lost=True)
        return True

    # -- the store contract -----------------------------------------------------------

    def _check_available(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _drop(self, lease: _MemoryLease, *, lost: bool) -> None:
        slot = self._slots[lease.key]
        if slot.holder is lease:
            slot.holder = None
            slot.signal()
            if lost:
                log.debug("memory store: %r lost %r", lease.node, lease.key)
                lease.notify_lost()

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        slot = self._slots[key]
        ticket = object()
        slot.waiters.append(ticket)
        try:
            while True:
                self._check_available()
                if slot.holder is None and slot.waiters[0] is ticket:
                    slot.term += 1
                    slot.holder = _MemoryLease(self, key, node, slot.term, ttl)
                    slot.signal()
                    return slot.holder
                slot.changed.wait()
        finally:
            slot.waiters.remove(ticket)
            slot.signal()

    def leader(self, key: str) -> LeaderInfo | None:
        self._check_available()
        holder = self._slots[key].holder
        return None if holder is None else LeaderInfo(holder.node, holder.term)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        slot = self._slots[key]
        while True:
            changed = slot.changed
            yield self.leader(key)
            changed.wait()
