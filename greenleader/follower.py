"""Follow an election: report each new leader of a key, without running for it."""

from __future__ import annotations

import logging

import gevent
from gevent import Greenlet, GreenletExit
from gevent.queue import Queue

from ._channels import Channels
from .errors import GreenleaderError, InvalidArgumentError, PermissionDeniedError, StoppedError, StoreError
from .events import ElectionError, EventPublisher, LeaderChanged
from .retry import Backoff, as_backoff
from .stores.base import LeaderInfo, Store

__all__ = ["Follower"]

log = logging.getLogger(__name__)

_UNSEEN = object()


class Follower:
    """Watches who leads ``key`` in ``store``.

    :param retry: keep following through store outages: on a store error, publish a non-fatal
        :class:`~greenleader.events.ElectionError`, wait a jittered exponential backoff
        (``True`` for the default :class:`~greenleader.retry.Backoff`), watch again and report
        the leader found if it changed. Without it, the first store error ends the watch.
    """

    def __init__(self, store: Store, key: str, *, retry: Backoff | bool | None = None) -> None:
        if not isinstance(store, Store):
            raise InvalidArgumentError(f"store must be a greenleader Store, not {type(store).__name__}")
        self.store = store
        self.key = store.validate_key(key)
        self.retry = as_backoff(retry)
        self._channels: Channels | None = None
        self._greenlet: Greenlet | None = None
        self._publisher = EventPublisher()
        self._current: LeaderInfo | object | None = _UNSEEN
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Follower key={self.key!r}>"

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def follow_election(self) -> tuple[Queue, Queue]:
        """Start following; return the ``(leaders, errors)`` queues.

        ``leaders`` gets the current leader's node name first (``None`` if the key is vacant
        or does not exist yet), then each different leader as it changes, ``None`` for each
        vacancy. Both queues end when the watch ends; ``errors`` gets the error that ended it.
        """
        if self._stopped:
            raise StoppedError(f"{self!r} was stopped; make a new Follower")
        if self._channels is None:
            self._channels = Channels()
            self._greenlet = gevent.spawn(self._follow)
        return self._channels.results, self._channels.errors

    def leader(self) -> str | None:
        """The current leader's node name, or None when vacant.

        While following, this is the last leader the watch reported; otherwise the store is read.
        """
        info = self.leader_info()
        return info.node if info is not None else None

    def leader_info(self) -> LeaderInfo | None:
        """Like :meth:`leader`, with the leader's fencing term."""
        if self._current is not _UNSEEN and not self._stopped:
            return self._current  # type: ignore[return-value]
        try:
            return self.store.leader(self.key)
        except GreenleaderError:
            raise
        except Exception as exc:
            raise StoreError(f"reading the leader from the {self.store.backend} store failed: {exc!r}") from exc

    def stop(self) -> None:
        """Stop following and end both queues. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._greenlet is not None and self._greenlet is not gevent.getcurrent():
            self._greenlet.kill(block=True, timeout=5)
        if self._channels is not None:
            self._channels.close()
        self._publisher.join(timeout=1)

    def _follow(self) -> None:
        channels = self._channels
        assert channels is not None
        delays = self.retry.delays() if self.retry else None
        error: BaseException | None = None
        try:
            while True:
                try:
                    self._watch(channels)
                except StoreError as exc:
                    if delays is None or isinstance(exc, PermissionDeniedError):
                        raise
                    delay = next(delays)
                    log.warning("%r: store error, watching again in %.1fs: %s", self, delay, exc)
                    self._publisher.publish(ElectionError(self, self.key, exc, fatal=False))
                    gevent.sleep(delay)
        except GreenletExit:
            pass
        except GreenleaderError as exc:
            error = exc
        except Exception as exc:
            log.exception("%r: unexpected error", self)
            error = StoreError(f"unexpected error from the {self.store.backend} store: {exc!r}")
            error.__cause__ = exc
        finally:
            self._current = _UNSEEN
            if error is not None:
                log.error("%r: watch ended: %s", self, error)
                channels.fail(error)
                self._publisher.publish(ElectionError(self, self.key, error))
            channels.close()

    def _watch(self, channels: Channels) -> None:
        """Report each change the store's watch shows, until it fails."""
        watch = self.store.watch(self.key)
        try:
            for info in watch:
                node = info.node if info is not None else None
                if self._current is not _UNSEEN and self._current_node() == node:
                    self._current = info  # same leader; keep the newest term
                    continue
                self._current = info
                channels.put(node)
                self._publisher.publish(LeaderChanged(self, self.key, node, info.term if info else None))
        finally:
            watch.close()

    def _current_node(self) -> str | None:
        current = self._current
        return current.node if isinstance(current, LeaderInfo) else None
