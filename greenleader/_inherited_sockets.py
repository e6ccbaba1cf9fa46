"""A forked child's copies of the parent's store connections go dead at the fork (rule 11).

``os.fork()`` gives the child a copy of every socket of the parent, and of the greenlets
using them. Those copies are the same connections: a child's copy of a request in flight
could read the parent's answer (the parent then waits for it in vain), send the parent's
queued request a second time, or end the parent's session when closed through its library.
Killing the child's greenlets is not enough: one that the hub had already scheduled to run
(its answer arrived in the same poll as the fork) runs once more before its kill.

So every store transport registers each socket here, before it connects (a fork during the
connect must not leave the child a live copy either), and right after a fork, in the child
only and before any greenlet runs there, /dev/null takes the place of each registered
descriptor (``dup2``): the child's copies read an end of file and write into nothing, and
its libraries see a dropped connection. The parent's connections are untouched: nothing is
sent on them, nothing is shut down. A connection still being set up is registered too: the
TLS socket of Consul's transport before its handshake, and libpq's socket at each step of its
connect (a holder whose ``fileno()`` follows it, -1 once the attempt ends).

One gap remains: kazoo wraps a ZooKeeper TLS socket before connecting it, inside its own
``create_tcp_connection``, with no hook, so a ZooKeeper connection over TLS that is still
connecting or shaking hands at a fork is registered only once kazoo returns it. The child's
copy then may send or read handshake bytes on it: the parent's handshake fails and kazoo
connects again (within the session's timeout: a reconnect, not the session).
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from types import ModuleType
from typing import Any, Protocol, TypeVar

__all__ = ["create_connection", "register"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


_Registered = TypeVar("_Registered", bound=_HasFileno)

#: Every registered socket or connection of this process, weakly: a collected socket is closed.
_registered: weakref.WeakSet[Any] = weakref.WeakSet()


def register(sock: _Registered) -> _Registered:
    """Make ``sock`` (anything with a ``fileno()``, weakly referenced) /dev/null in any child
    forked from now on; returns it. A closed one is skipped (``fileno()`` -1 or an error)."""
    _registered.add(sock)
    return sock


def create_connection(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                      source_address: Any = None, *, module: ModuleType = socket) -> socket.socket:
    """``module.create_connection`` (``module``: ``socket``, or ``gevent.socket``), each socket
    registered before it connects."""
    host, port = address
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in module.getaddrinfo(host, port, 0, module.SOCK_STREAM):
        sock = register(module.socket(family, kind, proto))
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            errors.append(exc)
            sock.close()
    raise errors[0] if errors else OSError(f"getaddrinfo returned no address for {host!r}")


def _after_fork_in_child() -> None:
    """Put /dev/null in place of every registered descriptor, in the child only. Never
    switches greenlets, and never fails the fork."""
    inherited = list(_registered)
    _registered.clear()
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    try:
        for sock in inherited:
            with contextlib.suppress(Exception):  # closed: OSError, ValueError, a library's own error
                fd = sock.fileno()
                if fd >= 0:  # (-1: closed, or handed over to the TLS socket registered beside it)
                    os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
