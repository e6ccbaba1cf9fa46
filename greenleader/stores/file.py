"""Single-host store: elections between processes of one machine, with no server.

Each key is a lock file in a directory. The holder keeps an OS file lock (``flock``) on
it, so the kernel releases the lock the instant a holder process dies, however it dies:
crash failover is immediate, not a TTL. The file also records the last term and the
holder's node name, for followers and for the next term.

**Waiting without polling.** On Linux, waiters and followers sleep until the lock file
changes (:mod:`._file_changes`: one inotify instance per process, one watch per
directory): a holder's last close, which its death or its release makes, wakes them, and
so does a new leader's record. At rest they make no system call at all. Elsewhere, or where
inotify is out of instances or watches, they look every ``poll_interval`` (20 ms by
default, so crash failover takes one interval there).

**A lock file removed while held.** ``flock`` guards an inode, not a name. Once the file is
deleted (``rm``, a temporary-file cleaner, ``rm -rf`` of the directory) or another file is
moved over it, a new candidate would lock a new inode at once and lead beside the holder
until the holder's next renewal notices (3.1 s at TTL 15). Files cannot be made
undeletable, so a win also needs a lock that no file operation can remove:

- On Linux, the holder also binds two *abstract* unix socket names made from the key and
  the directory: one from the directory's device and inode (one directory reached by two
  paths, e.g. one volume mounted in two containers, gets one name), one from its parent's
  device and inode and its name (it survives ``rm -rf`` and re-creation of the directory).
  Binding a bound name fails, no file cleaner can remove one, and the kernel drops it the
  instant the holder's process dies, so crash failover stays immediate. A holder
  whose file went away keeps its names until its next renewal reports the loss and the
  candidate steps down; only then can anyone else win.
- Elsewhere (no abstract names), a candidate that locks a file whose record was not written
  into that very file, for that key, by greenleader (a new file, or one moved or copied
  there) waits one TTL before it claims the win: a holder of a removed file reports the
  loss within its renew deadline, which is shorter than its TTL, the argument the server
  stores rest on. This costs one TTL on the first election of a key in a fresh directory,
  and assumes that the candidates of a key use the same TTL.

Abstract names are preferred to that wait everywhere because the wait would delay every
first election (each boot, for a directory on a tmpfs) by a TTL; watching the file with
inotify only narrows the window, since the newcomer cannot know that a holder exists.

Limits, stated in the README: abstract names belong to a network namespace, so candidates
in different network namespaces that share one directory (containers that share a volume
but not the network) are kept apart by ``flock`` alone, and deleting a held lock file can
still give two leaders there until the holder's next renewal (as it can after ``rm -rf``
of the directory's parent too, which changes both names). Any local process in the
same network namespace that binds a key's name can block that key (never take it). Local
filesystems only: ``flock`` is not reliable over NFS or other network filesystems.

A holder touches its file at every renewal, so age-based cleaners (systemd-tmpfiles,
tmpreaper) never find it old. The default directory (it may fall back to the shared
temporary directory) must belong to this user and be writable by nobody else.

Terms are the previous term plus one, floored at the wall clock in milliseconds, so they
keep increasing even when the lock file is removed and the count starts over (unless the
wall clock steps back past the last term at that moment).

Every ``OSError`` of the store's I/O becomes a :class:`StoreUnavailableError`, which a
retrying campaign or watch outlives (ENOSPC, EIO, a file removed mid-call, ...), except
EACCES/EPERM: a :class:`PermissionDeniedError`, which retrying cannot fix.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import gevent
import gevent.monkey

from ..errors import (
    InvalidArgumentError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from . import _file_changes
from .base import LeaderInfo, Lease, Store, check_float, check_text, now

__all__ = ["FileStore", "default_directory"]

log = logging.getLogger(__name__)

_MAX_NAME = 200  # stays well under the usual 255-byte file name limit
_MAX_RECORD = 65536  # a record with the longest key and node names, JSON-escaped, fits
# The standard functions even where gevent patched them: gevent's os.close() defers closing
# a socket to the next loop iteration, and a name must be free the moment we let it go (nothing
# here ever waits on these descriptors, which is what gevent's deferral protects).
_Socket = gevent.monkey.get_original("socket", "socket")
_close = gevent.monkey.get_original("os", "close")
#: After a wake-up (and at the start), look again after these delays before waiting for the
#: next change: the kernel announces a holder's last close a moment before it drops the lock
#: (both in the close's final step, in that order), and a change can land just before a
#: subscription is armed. Six more looks over 88 ms per change; none at rest.
RECHECKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
#: What stopped a look at the key (see FileStore._try_hold).
_HELD, _LOCKED, _NAMED = "held", "locked", "named"
#: Whether wins also take the key's abstract unix socket names (Linux only; see above).
ABSTRACT_NAMES = sys.platform.startswith("linux")


def default_directory() -> Path:
    """``$XDG_RUNTIME_DIR/greenleader``, else ``/run/user/UID/greenleader``, else a
    per-user directory under the system temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    if os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "greenleader"
    return Path(tempfile.gettempdir()) / f"greenleader-{os.getuid()}"


def _file_name(key: str) -> str:
    """A safe, reversible-looking file name for any key; long keys end in a hash."""
    name = quote(key, safe="").replace(".", "%2E")
    if len(name) > _MAX_NAME:
        name = name[:100] + "~" + hashlib.sha256(key.encode()).hexdigest()[:40]
    return name + ".lock"


def _store_error(what: str, exc: OSError) -> StoreError:
    """The store error for ``exc``: permission errors cannot be retried away, the rest can."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(f"{what}: {exc}")
    return StoreUnavailableError(f"{what}: {exc}")


def _abstract_name(*parts: object) -> bytes:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]
    return b"\0greenleader/" + digest.encode()


def _bind(name: bytes) -> int | None:
    """A socket descriptor bound to abstract ``name``, or None if another socket holds it."""
    sock = _Socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(name)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock.detach()


def _try_flock(fd: int, operation: int) -> bool:
    """``flock`` without blocking the hub: False if another holder has a conflicting lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    held = os.fstat(fd)
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _read_record(fd: int) -> dict[str, Any] | None:
    """The record in a lock file (``{}`` if empty), or None if it is not a whole record
    (being rewritten, or not a lock file at all)."""
    data = os.pread(fd, _MAX_RECORD, 0)
    if not data:
        return {}
    line, newline, _ = data.partition(b"\n")
    if not newline:
        return None
    try:
        record = json.loads(line)
        if isinstance(record["term"], int) and isinstance(record["node"], (str, type(None))):
            return record
    except (ValueError, KeyError, TypeError):
        pass
    return None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode() + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


_all_held: weakref.WeakSet[_Held] = weakref.WeakSet()


#: The last term this process issued per lock file path (see _claim).
_last_terms: dict[str, int] = {}


class _Held:
    """The descriptors of one hold: the locked file and the bound socket names."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.sockets: list[int] = []
        self.inherited = False  # a forked child's copy: closed, and never to be taken again
        _all_held.add(self)

    def close(self) -> None:
        """Close every descriptor: the kernel drops the flock and unbinds the names."""
        fd, self.fd = self.fd, None
        if fd is not None:
            _close_quietly(fd)
        self.close_sockets()

    def close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        for fd in sockets:
            _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        _close(fd)
    except OSError as exc:
        log.warning("could not close a lock descriptor: %s", exc)


def _forget_holds_in_child() -> None:
    """A forked child closes its copies of every hold's descriptors: the parent's locks stay
    (they belong to the shared open files), but they no longer outlive the parent."""
    for held in list(_all_held):
        held.inherited = True
        held.close()


os.register_at_fork(after_in_child=_forget_holds_in_child)


class _FileLease(Lease):
    def __init__(self, key: str, node: str, term: int, held: _Held, path: Path, inode: int) -> None:
        super().__init__(key, node, term, now())
        self._held = held
        self._path = path
        self._inode = inode

    def renew(self) -> None:
        started = now()
        fd = self._held.fd
        if fd is None:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        try:
            if not _same_file(fd, self._path):
                raise LeadershipLostError(f"lock file {self._path} was removed or replaced")
            os.utime(fd)  # a fresh file is never old enough for a temporary-file cleaner
        except OSError as exc:
            raise _store_error(f"cannot check lock file {self._path}", exc) from exc
        self.confirmed_at = started

    def release(self) -> None:
        fd = self._held.fd
        if fd is None:
            return
        try:
            _write_record(fd, {"term": self.term, "node": None, "key": self.key, "inode": self._inode})
        except OSError as exc:
            log.warning("could not clear the leader record in %s: %s", self._path, exc)
        finally:
            self._held.close()

    def abandon(self) -> None:
        """A forked child's copy: close this process's descriptors, write nothing."""
        self._held.close()


class FileStore(Store):
    """Elections between processes of one host, on lock files in ``directory``."""

    backend: ClassVar[str] = "file"
    holds_until_released: ClassVar[bool] = True  # the kernel drops a flock only when its descriptor goes

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        poll_interval: float = 0.02,  # where changes cannot be watched: failover in 20 ms for 50 looks/s
    ) -> None:
        if addrs:
            if directory is not None or len(addrs) != 1:
                raise InvalidArgumentError("the file store takes one directory")
            directory = addrs[0]
        self.poll_interval = check_float("poll_interval", poll_interval, minimum=0.001, maximum=10.0)
        chosen = directory is None
        if directory is None:
            directory = default_directory()
        elif not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
            raise InvalidArgumentError(f"directory must be a path, not {directory!r}")
        self.directory = Path(directory)
        try:
            self._make_directory()
            if chosen:
                self._check_owner()
            self._real_directory = os.path.realpath(self.directory)
        except OSError as exc:
            raise _store_error(f"cannot create the file store directory {self.directory}", exc) from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"the file store directory {self.directory} is not writable")

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> FileStore:
        from ..errors import InvalidURLError

        if addrs and addrs != ["localhost"]:
            raise InvalidArgumentError(f"a file store URL names no host (file:///dir), got {addrs!r}")
        known = ("poll_interval",)  # the directory is the URL's path
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidURLError(f"unknown file store URL option(s) {unknown}; known: {', '.join(known)}")
        return cls(directory=path or None, **options)

    def __repr__(self) -> str:
        return f"<FileStore directory={str(self.directory)!r}>"

    def path_for(self, key: str) -> Path:
        """The lock file that holds ``key``."""
        return self.directory / _file_name(key)

    def _make_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _check_owner(self) -> None:
        """A directory we did not choose could be someone else's (a squatted /tmp name)."""
        info = os.stat(self.directory)
        if info.st_uid != os.geteuid():
            raise PermissionDeniedError(f"the file store directory {self.directory} belongs to uid "
                                        f"{info.st_uid}, not to this user: remove it or pass a directory")
        if info.st_mode & 0o022:
            raise PermissionDeniedError(f"the file store directory {self.directory} is writable by others "
                                        f"(mode {info.st_mode & 0o777:o}): chmod 700 it or pass a directory")

    # -- acquire ----------------------------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        node = check_text("node", node)
        path = self.path_for(key)
        held = _Held()
        changes = _file_changes.subscribe(str(self.directory), path.name)
        try:
            rechecks = iter(RECHECKS)
            while True:
                if held.inherited:
                    # Begun before a fork, woken in the child: winning here would write a
                    # record naming a node that never leads (the child's candidate is inert).
                    raise StoreUnavailableError(f"an acquire of {key!r} begun before a fork does not go on "
                                                "in the forked child")
                try:
                    changes = self._arm(changes)
                    outcome = self._try_hold(held, key, path)
                    if outcome is _HELD:
                        lease = self._claim(held, key, node, ttl, path)
                        if lease is not None:
                            return lease
                        held.close()  # replaced during the fallback's wait: lock the new one
                        continue
                except OSError as exc:
                    raise _store_error(f"cannot lock {path}", exc) from exc
                if outcome is _NAMED or changes is None:
                    gevent.sleep(self.poll_interval)
                elif changes.wait(next(rechecks, None)):
                    rechecks = iter(RECHECKS)
        except BaseException:
            held.close()
            raise
        finally:
            if changes is not None:
                changes.close()

    def _arm(self, changes: _file_changes.Subscription | None) -> _file_changes.Subscription | None:
        """Arm ``changes`` before a look at the lock file, making the directory again if it
        was removed; None, to poll instead, if the directory cannot be watched."""
        if changes is None:
            return None
        try:
            changes.arm()
            return changes
        except FileNotFoundError:
            pass
        except OSError as exc:
            return self._poll_instead(changes, exc)
        self._make_directory()  # removed (rm -rf): an OSError here is the caller's store error
        try:
            changes.arm()
            return changes
        except OSError as exc:
            return self._poll_instead(changes, exc)

    def _poll_instead(self, changes: _file_changes.Subscription, exc: OSError) -> None:
        """E.g. fs.inotify.max_user_watches reached: this call polls, as on other systems."""
        log.warning("cannot watch %s, polling it every %gs: %s", self.directory, self.poll_interval, exc)
        changes.close()

    def _names(self, key: str) -> list[bytes] | None:
        """The key's abstract socket names (none where there are no abstract names), or
        None if the directory had gone (it is made again: try again).

        One name comes from the directory's device and inode: the same whatever path or
        mount namespace reaches it. The other from its parent's device and inode and its
        name: the same after ``rm -rf`` and re-creation of the directory, yet different
        for look-alike paths in containers that have their own file systems.
        """
        if not ABSTRACT_NAMES:
            return []
        try:
            directory = os.stat(self._real_directory)
            parent = os.stat(os.path.dirname(self._real_directory))
        except FileNotFoundError:  # removed (rm -rf)
            self._make_directory()
            return None
        return [_abstract_name("directory", directory.st_dev, directory.st_ino, key),
                _abstract_name("entry", parent.st_dev, parent.st_ino, os.path.basename(self._real_directory), key)]

    def _try_hold(self, held: _Held, key: str, path: Path) -> str:
        """Take everything a win needs, without waiting: :data:`_HELD`; else what stopped it,
        keeping only the open file, unlocked.

        :data:`_LOCKED`: another candidate holds the lock file (a change to the file will
        say when to look again). If that file is no longer the key's (removed or replaced),
        it is closed, so that the next look locks the key's current file.
        :data:`_NAMED`: the names are bound by the holder of a removed file, until its next
        renewal reports the loss; no change to the key's file announces that (poll).
        """
        if held.fd is None:
            held.fd = self._open_lock_file(path)
        if not _try_flock(held.fd, fcntl.LOCK_EX):
            if not _same_file(held.fd, path):
                held.close()
            return _LOCKED
        if not _same_file(held.fd, path):  # removed or replaced while we waited
            held.close()
            return _LOCKED
        names = self._names(key)
        for name in names or []:
            fd = _bind(name)
            if fd is None:
                names = None
                break
            held.sockets.append(fd)
        if names is None:
            held.close_sockets()
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            return _NAMED
        return _HELD

    def _open_lock_file(self, path: Path) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            self._make_directory()
            return os.open(path, flags, 0o600)

    def _claim(self, held: _Held, key: str, node: str, ttl: float, path: Path) -> _FileLease | None:
        """Write this tenure's record into the held file; None if the file was replaced
        during the fallback's wait."""
        assert held.fd is not None
        record = _read_record(held.fd) or {}
        inode = os.fstat(held.fd).st_ino
        previous = record.get("term", 0)
        if not ABSTRACT_NAMES and (record.get("key"), record.get("inode")) != (key, inode):
            # No proof that nobody leads through a removed file: outwait its holder's TTL.
            # Meanwhile the record names nobody and is not trusted by the next candidate.
            _write_record(held.fd, {"term": previous, "node": None})
            log.info("%s is new to greenleader: waiting %gs before the first win", path, ttl)
            gevent.sleep(ttl)
            if held.fd is None or not _same_file(held.fd, path):  # forked meanwhile, or replaced
                return None
        # The wall-clock floor keeps terms increasing even if the file was deleted
        # (e.g. by a temporary-file cleaner) and the count started over.
        # The wall-clock floor can repeat within a millisecond once the record is lost: the
        # last term this process issued for the path keeps it increasing here at least.
        term = max(previous + 1, time.time_ns() // 1_000_000, _last_terms.get(str(path), 0) + 1)
        _last_terms[str(path)] = term
        _write_record(held.fd, {"term": term, "node": node, "key": key, "inode": inode})
        return _FileLease(key, node, term, held, path, inode)

    # -- leader and watch -------------------------------------------------------------------

    def leader(self, key: str) -> LeaderInfo | None:
        path = self.path_for(key)
        try:
            return self._leader(path)
        except OSError as exc:
            raise _store_error(f"cannot read lock file {path}", exc) from exc

    def _leader(self, path: Path) -> LeaderInfo | None:
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                if _try_flock(fd, fcntl.LOCK_SH):
                    return None  # nobody holds the lock: vacant, whatever the file says
                record = _read_record(fd)
            finally:
                _close(fd)
            if record is not None:
                node = record.get("node")
                return LeaderInfo(node, record["term"]) if node is not None else None
            gevent.sleep(self.poll_interval)  # a new holder is writing its record
        raise StoreUnavailableError(f"{path} is held but holds no leader record")

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        path = self.path_for(key)
        changes = _file_changes.subscribe(str(self.directory), path.name)
        try:
            last: object = object()
            rechecks = iter(RECHECKS)
            while True:
                try:
                    changes = self._arm(changes)
                except OSError as exc:  # making the removed directory again
                    raise _store_error(f"cannot watch {path}", exc) from exc
                current = self.leader(key)
                if current != last:
                    last = current
                    yield current
                if changes is None:
                    gevent.sleep(self.poll_interval)
                elif changes.wait(next(rechecks, None)):
                    rechecks = iter(RECHECKS)
        finally:
            if changes is not None:
                changes.close()
