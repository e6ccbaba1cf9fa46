"""kazoo's connection loop under gevent: what it needs to stay cheap and never block.

kazoo runs one connection greenlet per session that sends one queued request, or reads one
answer, per turn of its loop, and asks its handler's ``select`` before every turn, every read
and every write: four selects a request. gevent's select registers watchers, waits on the hub
and closes them each time (most of kazoo's CPU: about 0.45 ms a request on this 2-core box,
so 1,000 candidates starting at once spent seconds in it). :class:`GeventHandler` asks the
kernel first, without waiting, and only waits through gevent when nothing is ready.
:class:`WakeSocket` is kazoo's wake-up socket written without ever blocking the writer.
The handler also registers every socket kazoo opens with :mod:`greenleader._inherited_sockets`
(a forked child's copies go dead at the fork).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select as _select
from typing import Any

import gevent
import gevent.socket
from gevent import monkey

from ... import _inherited_sockets

try:
    from kazoo.handlers import utils as kazoo_utils
    from kazoo.handlers.gevent import SequentialGeventHandler
except ImportError as exc:  # new_store() turns this into MissingDependencyError
    raise ImportError(str(exc), name="kazoo") from exc

__all__ = ["GeventHandler", "WakeSocket"]

log = logging.getLogger(__name__)

_poll = monkey.get_original("select", "poll")  # the kernel's poll: with a zero timeout it never waits
_READABLE = _select.POLLIN | _select.POLLPRI | _select.POLLERR | _select.POLLHUP
_WRITABLE = _select.POLLOUT | _select.POLLERR | _select.POLLHUP
#: Selects answered at once in a row before the connection greenlet yields to the hub anyway:
#: a long queue of requests and answers must not keep the waiting greenlets (or timers) from
#: running for its whole length; 32 turns are a few milliseconds of kazoo's work.
FAST_STREAK = 32


class GeventHandler(SequentialGeventHandler):
    """kazoo's gevent handler whose ``select`` returns at once what is ready now (a poll with
    a zero timeout), and waits through gevent's selector only when nothing is: a busy
    connection then costs a system call a turn instead of a set of hub watchers."""

    def __init__(self) -> None:
        super().__init__()
        self._streak = 0

    def select(self, rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None,
               ) -> tuple[list[Any], list[Any], list[Any]]:
        if not xlist and self._streak < FAST_STREAK:
            ready = _ready_now(rlist, wlist)
            if ready is not None:
                self._streak += 1
                return ready
        if self._streak >= FAST_STREAK:
            self._streak = 0
            gevent.sleep(0)  # let the greenlets woken by the answers run
            ready = _ready_now(rlist, wlist) if not xlist else None
            if ready is not None:
                return ready
        self._streak = 0
        return super().select(rlist, wlist, xlist, timeout)

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        """kazoo's connection to a server (plain or TLS), its socket registered with
        :mod:`greenleader._inherited_sockets` before it connects.

        After a fork, the child's copy of kazoo's connection greenlet may run one more turn
        before its kill (the hub had scheduled it already): on the shared socket it would read
        the parent's answer (the parent then times out and its session's leaders lose their
        keys) or send a request of the parent's a second time (a duplicated answer, on which
        kazoo's loop dies for good). With /dev/null in the child, that turn sees a dropped
        connection of the child's own."""
        sock = kazoo_utils.create_tcp_connection(_REGISTERING_SOCKETS, *args, **kwargs)
        return _inherited_sockets.register(sock)  # (TLS: the SSL socket, which took the plain one's descriptor)

    def create_socket_pair(self) -> tuple[Any, Any]:
        """kazoo's wake-up socketpair, registered too: a child's copy of the loop must not
        take the parent's wake-up bytes (each sends one queued request of the parent's)."""
        read, write = super().create_socket_pair()
        return _inherited_sockets.register(read), _inherited_sockets.register(write)

    def dispatch_callback(self, callback: Any) -> None:
        """Run a watch's callback at once, in the connection greenlet that read its event.

        kazoo queues it for a callback greenlet instead, which runs only once the connection
        greenlet waits again: a hop that cost a waiter 0.3-2 ms between its predecessor's
        deletion event and its next request, at every handover on a loaded machine. The
        store's callbacks never block (they set events, put on unbounded queues, or queue a
        request), and running them as the event is read keeps ZooKeeper's order: each runs
        before the answer to any later request is read."""
        try:
            callback.func(*callback.args)
        except Exception:
            log.exception("ZooKeeper watch callback %r failed", callback.func)


class _RegisteringSocketModule:
    """``gevent.socket`` as kazoo's ``create_tcp_connection`` uses it, but each socket it
    makes is registered with :mod:`greenleader._inherited_sockets` before it connects."""

    create_connection = staticmethod(functools.partial(_inherited_sockets.create_connection, module=gevent.socket))

    def __getattr__(self, name: str) -> Any:
        return getattr(gevent.socket, name)

    @staticmethod
    def socket(*args: Any, **kwargs: Any) -> Any:  # kazoo's TLS path: wrapped, then connected
        return _inherited_sockets.register(gevent.socket.socket(*args, **kwargs))


_REGISTERING_SOCKETS = _RegisteringSocketModule()


def _ready_now(rlist: list[Any], wlist: list[Any]) -> tuple[list[Any], list[Any], list[Any]] | None:
    """``(readable, writable, [])`` among the objects, if any is ready now; None if none is or
    a descriptor is not valid (then gevent's selector answers, or raises, as kazoo expects)."""
    poller = _poll()
    fds: dict[int, int] = {}
    try:
        for objects, mask in ((rlist, _READABLE), (wlist, _WRITABLE)):
            for obj in objects:
                fd = obj if isinstance(obj, int) else obj.fileno()
                fds[fd] = fds.get(fd, 0) | mask
        for fd, mask in fds.items():
            poller.register(fd, mask)
        events = dict(poller.poll(0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not events or any(revents & _select.POLLNVAL for revents in events.values()):
        return None
    readable = [obj for obj in rlist if events.get(_fd(obj), 0) & _READABLE]
    writable = [obj for obj in wlist if events.get(_fd(obj), 0) & _WRITABLE]
    return (readable, writable, []) if readable or writable else None


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


class WakeSocket:
    """kazoo's wake-up socket, written without ever blocking the writer.

    kazoo queues each request and writes one byte to a socketpair to wake its connection
    greenlet, which sends one queued request per byte. A Unix socket charges every 1-byte
    write a whole buffer, so about 280 requests queued at once fill it (1,000 candidates
    starting in one process do). A writer would then wait in send(), which gevent refuses
    to a second greenlet (ConcurrentObjectUseError) and to the hub's callbacks (kazoo queues
    requests from result callbacks); kazoo reports ConnectionClosedError yet leaves the
    request queued without its byte, never to be sent. Here a byte that does not fit is
    owed, and one helper greenlet pays what is owed as room appears: bytes are all alike.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._owed = 0
        self._payer: gevent.Greenlet | None = None
        self.pid = os.getpid()

    def send(self, data: bytes) -> int:
        if self.pid != os.getpid():
            return len(data)  # a forked child's copy: the socketpair wakes the parent's kazoo
        if not self._owed:
            try:
                return os.write(self._sock.fileno(), data)
            except BlockingIOError:
                pass
        self._owed += len(data)
        if self._payer is None:
            self._payer = gevent.spawn(self._pay)
        return len(data)

    def _pay(self) -> None:
        try:
            while self._owed:
                gevent.socket.wait_write(self._sock.fileno())
                with contextlib.suppress(BlockingIOError):
                    self._owed -= os.write(self._sock.fileno(), b"\0" * self._owed)
        except (OSError, ValueError):  # closed by kazoo: its connection is gone anyway
            self._owed = 0
        finally:
            self._payer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
