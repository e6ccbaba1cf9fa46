"""How long the gevent hub was kept from running, measured so that machine load does not count.

A greenlet that sleeps a few milliseconds in a loop and records the longest gap between its
wake-ups sees a blocked hub (a blocking call, CPU-bound code), but it also sees the whole
process waiting for a CPU, which on a loaded 2-core CI machine reaches hundreds of
milliseconds. Linux counts, per thread, the time spent runnable but waiting for a CPU
(``/proc/thread-self/schedstat``, second field, nanoseconds). :class:`HubWatch` subtracts the
run-queue time of the hub's thread from each gap: what is left is the time that thread spent
running other code or sleeping in a syscall, which is what a blocked hub costs whatever the
load. Where schedstat is missing, the gaps are raw wall-clock gaps.

It does not patch anything, so a script run without monkey patching can use it too.
"""

from __future__ import annotations

import os
import time

import gevent
from gevent.event import Event

_SCHEDSTAT = "/proc/thread-self/schedstat"


class _RunQueueClock:
    """Seconds the calling thread has spent waiting for a CPU while runnable (0 if unknown).

    Must be created in the thread it measures (the hub's): the file names the thread that
    opened it.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open(_SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self._fd = None
        self.available = self._fd is not None and self() >= 0.0

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class HubWatch:
    """A greenlet ticking every ``tick`` seconds. ``max_blocked``: the longest a tick came
    late for reasons other than waiting for a CPU; ``max_gap``: the longest raw gap."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.max_gap = 0.0
        self.max_blocked = 0.0
        self.ticks = 0
        self._run_queue = _RunQueueClock()
        self._ticked = Event()
        self._greenlet = gevent.spawn(self._run)

    @property
    def load_aware(self) -> bool:
        """Whether the machine's load is discounted (schedstat readable)."""
        return self._run_queue.available

    def _run(self) -> None:
        last, waited = time.monotonic(), self._run_queue()
        while True:
            gevent.sleep(self.tick)
            now, waiting = time.monotonic(), self._run_queue()
            gap = now - last
            self.max_gap = max(self.max_gap, gap)
            self.max_blocked = max(self.max_blocked, gap - (waiting - waited))
            self.ticks += 1
            last, waited = now, waiting
            ticked, self._ticked = self._ticked, Event()
            ticked.set()

    def wait_ticks(self, count: int, timeout: float) -> None:
        """Wait until ``count`` more ticks happened, so the figures cover everything up to now."""
        target = self.ticks + count
        deadline = time.monotonic() + timeout
        while self.ticks < target:
            remaining = max(0.0, deadline - time.monotonic())
            assert self._ticked.wait(remaining), f"the hub watch stopped ticking for {timeout:g}s"

    def describe(self) -> str:
        how = "not counting time waiting for a CPU" if self.load_aware else "wall clock: schedstat unavailable"
        return (f"longest hub stall {self.max_blocked * 1000:.0f} ms ({how}; raw gap "
                f"{self.max_gap * 1000:.0f} ms, {self.tick * 1000:g} ms ticks)")

    def stop(self) -> None:
        self._greenlet.kill()
        self._run_queue.close()
