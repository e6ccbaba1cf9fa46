"""The gevent queues that Candidate and Follower report on ("channels" in the Go seed)."""

from __future__ import annotations

from gevent.queue import Queue


class Channels:
    """A results queue and an errors queue that end together.

    Closing puts ``StopIteration`` on both, which ends a ``for`` loop over either, so a
    caller that reads only one of them never hangs.
    """

    def __init__(self) -> None:
        self.results: Queue = Queue()
        self.errors: Queue = Queue()
        self.closed = False

    def put(self, item: object) -> None:
        if not self.closed:
            self.results.put(item)

    def fail(self, error: BaseException) -> None:
        if not self.closed:
            self.errors.put(error)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.results.put(StopIteration)
            self.errors.put(StopIteration)
