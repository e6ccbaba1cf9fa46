"""Wake-ups when a lock file changes, so the file store's waiters and followers need not poll.

One inotify instance per gevent hub (so one per process in a gevent app) watches each lock
directory in use, once, whatever the number of waiters and followers on it; the kernel's
events for a file name wake only the subscriptions of that name. Reading the events is a
callback of the hub's loop on the inotify descriptor: nothing runs while nothing changes.

The events that matter for a lock file:

- ``IN_CLOSE_WRITE``: the last close of a descriptor opened for writing. A holder's lock goes
  with its last close, whether it released or died (a killed process's files are closed by
  the kernel, and this event is sent for them too).
- ``IN_MODIFY``: a new leader's record was written (or a released one cleared).
- ``IN_CREATE``, ``IN_DELETE``, ``IN_MOVED_TO``, ``IN_MOVED_FROM``: the file was created,
  removed or replaced.
- The directory's own removal or move (``IN_DELETE_SELF``, ``IN_MOVE_SELF``, ``IN_IGNORED``)
  and a lost event queue (``IN_Q_OVERFLOW``) wake every subscription; each then watches its
  directory's path again before it looks.

Followers open lock files read-only: their closes (``IN_CLOSE_NOWRITE``) are not watched, or
every follower's read would wake every other follower.

Linux only; where inotify is missing (or its per-user limit of instances is reached),
:func:`subscribe` returns None and the store polls.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import sys
import weakref

import gevent
import gevent.event

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
#: What a directory is watched for (see the module docstring).
MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 65536  # holds over 2,000 events: one read empties the queue in any real case
_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC  # IN_NONBLOCK and IN_CLOEXEC are these on Linux


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC = _libc()


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class Subscription:
    """The wake-ups for one file name in one directory, for one waiter or follower.

    Use: :meth:`arm`, then look at the file, then :meth:`wait`; a change after ``arm`` is
    never missed, since ``arm`` clears the flag that the change sets. :meth:`close` when done.
    """

    def __init__(self, watcher: _Watcher, directory: str, name: str) -> None:
        self._watcher: _Watcher | None = watcher
        self.directory = directory
        self.name = name
        self.wd: int | None = None  # None until watched, and again once the watch is gone
        self._changed = gevent.event.Event()

    def arm(self) -> None:
        """Watch the directory (again, if it was removed or moved), and forget past wake-ups.

        Raises OSError, e.g. FileNotFoundError if the directory does not exist.
        """
        assert self._watcher is not None, "closed"
        if self.wd is None:
            self._watcher.add(self)
        self._changed.clear()

    def wait(self, timeout: float | None) -> bool:
        """Wait for a change since :meth:`arm`; False if ``timeout`` came first."""
        return self._changed.wait(timeout)

    def wake(self) -> None:
        self._changed.set()

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.remove(self)


class _Watcher:
    """One inotify descriptor and the subscriptions of each watched directory; it lives
    while it has subscriptions, so that a process at rest keeps no descriptor open."""

    def __init__(self, hub: object, fd: int) -> None:
        self._hub = hub
        self.fd = fd
        self.subscriptions = 0
        self._broken: OSError | None = None
        self._by_wd: dict[int, dict[str, set[Subscription]]] = {}
        # The hub's loop reads the events (an active watcher keeps the loop running, as a
        # waiting acquire or watch should).
        self._io = gevent.get_hub().loop.io(fd, 1)
        self._io.start(self._read)

    def add(self, subscription: Subscription) -> None:
        if self._broken is not None:
            raise OSError(self._broken.errno, f"lock file changes cannot be read: {self._broken}")
        wd = _check(_LIBC.inotify_add_watch(self.fd, os.fsencode(subscription.directory), MASK),
                    f"cannot watch {subscription.directory}")
        self._by_wd.setdefault(wd, {}).setdefault(subscription.name, set()).add(subscription)
        subscription.wd = wd

    def remove(self, subscription: Subscription) -> None:
        wd, subscription.wd = subscription.wd, None
        names = self._by_wd.get(wd) if wd is not None else None
        if names is not None:
            subscribers = names.get(subscription.name, set())
            subscribers.discard(subscription)
            if not subscribers:
                names.pop(subscription.name, None)
            if not names:  # the directory's last subscription: stop watching it
                del self._by_wd[wd]
                _LIBC.inotify_rm_watch(self.fd, wd)  # EINVAL if already gone: nothing to do
        self.subscriptions -= 1
        if self.subscriptions <= 0:
            self.close()

    def close(self) -> None:
        if _watchers.get(self._hub) is self:
            del _watchers[self._hub]
        fd, self.fd = self.fd, -1
        if fd < 0:  # closed already (e.g. in a forked child): the number may be another file's now
            return
        self._io.stop()
        self._io.close()
        self._by_wd.clear()
        with contextlib.suppress(OSError):
            os.close(fd)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # not expected from inotify: let every subscription poll
                log.warning("cannot read lock file changes: %s", exc)
                self._broken = exc
                self._io.stop()
                if _watchers.get(self._hub) is self:
                    del _watchers[self._hub]  # new subscriptions get a new instance
                for wd in list(self._by_wd):
                    self._forget_directory(wd, gone=True)  # their next arm() fails: they poll
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self._wake_all()
            elif name:
                self._wake_name(wd, os.fsdecode(name))
            else:  # the directory itself went (or moved): watch its path again
                self._forget_directory(wd, gone=bool(mask & IN_IGNORED))

    def _wake_name(self, wd: int, name: str) -> None:
        for subscription in list(self._by_wd.get(wd, {}).get(name, ())):
            subscription.wake()

    def _forget_directory(self, wd: int, gone: bool) -> None:
        names = self._by_wd.pop(wd, {})
        if not gone and names:
            _LIBC.inotify_rm_watch(self.fd, wd)
        for subscribers in names.values():
            for subscription in subscribers:
                subscription.wd = None
                subscription.wake()

    def _wake_all(self) -> None:
        for names in self._by_wd.values():
            for subscribers in names.values():
                for subscription in subscribers:
                    subscription.wake()


_watchers: weakref.WeakKeyDictionary[object, _Watcher] = weakref.WeakKeyDictionary()
_unavailable_logged = False


def subscribe(directory: str, name: str) -> Subscription | None:
    """A subscription to changes of ``name`` in ``directory`` (not yet armed), or None where
    this process cannot have one (no inotify, or no instance left): then poll."""
    global _unavailable_logged
    if _LIBC is None:
        return None
    hub = gevent.get_hub()
    watcher = _watchers.get(hub)
    if watcher is None:
        try:
            watcher = _watchers[hub] = _Watcher(hub, _check(_LIBC.inotify_init1(_NONBLOCK_CLOEXEC), "inotify_init1"))
        except OSError as exc:
            if not _unavailable_logged:
                _unavailable_logged = True
                hint = " (fs.inotify.max_user_instances)" if exc.errno == errno.EMFILE else ""
                log.warning("lock file changes cannot be watched, the file store polls: %s%s", exc, hint)
            return None
    watcher.subscriptions += 1
    return Subscription(watcher, directory, name)


def _forget_in_child() -> None:
    """A forked child makes its own inotify instance if it needs one; the copy of the
    parent's descriptor (and its queue, shared with the parent) is closed."""
    for watcher in list(_watchers.values()):
        watcher.close()


os.register_at_fork(after_in_child=_forget_in_child)
