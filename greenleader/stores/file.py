"""Single-host store: elections between processes of one machine, with no server.

Each key is a lock file in a directory. The holder keeps an OS file lock (``flock``) on
it, so the kernel releases the lock the instant a holder process dies, however it dies:
crash failover takes one poll interval, not a TTL. The file also records the last term
and the holder's node name, for followers and for the next term. Terms are the previous
term plus one, floored at the wall clock in milliseconds, so they keep increasing even
when the lock file is removed (a holder whose file was removed steps down at its next renewal).

Local filesystems only: ``flock`` is not reliable over NFS or other network filesystems.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import gevent

from ..errors import InvalidArgumentError, LeadershipLostError, StoreUnavailableError
from .base import LeaderInfo, Lease, Store, check_float, check_text, now

__all__ = ["FileStore", "default_directory"]

log = logging.getLogger(__name__)

_MAX_NAME = 200  # stays well under the usual 255-byte file name limit


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


def _read_record(fd: int) -> tuple[int, str | None] | None:
    """The (term, node) record in a lock file, or None while it is being rewritten."""
    data = os.pread(fd, 4096, 0)
    if not data:
        return 0, None
    line, newline, _ = data.partition(b"\n")
    if not newline:
        return None
    try:
        record = json.loads(line)
        return int(record["term"]), record["node"]
    except (ValueError, KeyError, TypeError):
        return None


def _write_record(fd: int, term: int, node: str | None) -> None:
    data = json.dumps({"term": term, "node": node}).encode() + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


class _FileLease(Lease):
    def __init__(self, store: FileStore, key: str, node: str, term: int, fd: int, path: Path) -> None:
        super().__init__(key, node, term, now())
        self._store = store
        self._fd: int | None = fd
        self._path = path

    def renew(self) -> None:
        started = now()
        if self._fd is None:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        try:
            same_file = os.fstat(self._fd).st_ino == os.stat(self._path).st_ino
        except FileNotFoundError:
            same_file = False
        except OSError as exc:
            raise StoreUnavailableError(f"cannot check lock file {self._path}: {exc}") from exc
        if not same_file:
            raise LeadershipLostError(f"lock file {self._path} was removed or replaced")
        self.confirmed_at = started

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _write_record(fd, self.term, None)
        except OSError as exc:
            log.warning("could not clear the leader record in %s: %s", self._path, exc)
        finally:
            os.close(fd)  # closing the descriptor drops the flock


class FileStore(Store):
    """Elections between processes of one host, on lock files in ``directory``."""

    backend: ClassVar[str] = "file"

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        poll_interval: float = 0.02,
    ) -> None:
        if addrs:
            if directory is not None or len(addrs) != 1:
                raise InvalidArgumentError("the file store takes one directory")
            directory = addrs[0]
        self.poll_interval = check_float("poll_interval", poll_interval, minimum=0.001, maximum=10.0)
        if directory is None:
            directory = default_directory()
        elif not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
            raise InvalidArgumentError(f"directory must be a path, not {directory!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the file store directory {self.directory}: {exc}") from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"the file store directory {self.directory} is not writable")

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> FileStore:
        if addrs and addrs != ["localhost"]:
            raise InvalidArgumentError(f"a file store URL names no host (file:///dir), got {addrs!r}")
        return cls(directory=path or None, **options)

    def __repr__(self) -> str:
        return f"<FileStore directory={str(self.directory)!r}>"

    def path_for(self, key: str) -> Path:
        """The lock file that holds ``key``."""
        return self.directory / _file_name(key)

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        node = check_text("node", node)
        path = self.path_for(key)
        while True:
            fd = self._open(path, os.O_RDWR | os.O_CREAT)
            try:
                self._lock_exclusive(fd)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)  # the file was replaced while we waited: lock the new one
                    continue
                previous = _read_record(fd)
                # The wall-clock floor keeps terms increasing even if the file was deleted
                # (e.g. by a temporary-file cleaner) and the count started over.
                term = max((previous[0] if previous else 0) + 1, time.time_ns() // 1_000_000)
                _write_record(fd, term, node)
            except BaseException:
                os.close(fd)
                raise
            return _FileLease(self, key, node, term, fd, path)

    def _open(self, path: Path, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open lock file {path}: {exc}") from exc

    def _lock_exclusive(self, fd: int) -> None:
        # flock() without LOCK_NB would block the hub, so poll cooperatively.
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                gevent.sleep(self.poll_interval)

    def leader(self, key: str) -> LeaderInfo | None:
        path = self.path_for(key)
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise StoreUnavailableError(f"cannot open lock file {path}: {exc}") from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise StoreUnavailableError(f"cannot lock {path}: {exc}") from exc
                else:
                    return None  # nobody holds the lock: vacant, whatever the file says
                record = _read_record(fd)
            finally:
                os.close(fd)
            if record is not None and record[1] is not None:
                return LeaderInfo(record[1], record[0])
            gevent.sleep(self.poll_interval)  # a new holder is writing its record

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        last: object = object()
        while True:
            current = self.leader(key)
            if current != last:
                last = current
                yield current
            gevent.sleep(self.poll_interval)
