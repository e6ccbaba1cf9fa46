"""Stores that elections run on, and the two ways to make one.

>>> store = new_store("consul", ["10.0.0.1:8500", "10.0.0.2:8500"], lock_delay=1)
>>> store = from_url("etcd://10.0.0.1:2379,10.0.0.2:2379?timeout=5")
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import InvalidArgumentError, InvalidURLError, MissingDependencyError, UnknownBackendError
from .base import LeaderInfo, Lease, Store

__all__ = ["BACKENDS", "LeaderInfo", "Lease", "Store", "from_url", "new_store"]

#: backend name -> (module or package under greenleader.stores, class, pip extra that installs
#: its client library). A store may be one module (``file.py``) or a package (``consul/`` with
#: its recipe and client apart); either way the class is imported from its top level.
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("memory", "MemoryStore", None),
    "file": ("file", "FileStore", None),
    "consul": ("consul", "ConsulStore", "consul"),
    "etcd": ("etcd", "EtcdStore", "etcd"),
    "zookeeper": ("zookeeper", "ZooKeeperStore", "zookeeper"),
    "postgres": ("postgres", "PostgresStore", "postgres"),
}
_ALIASES = {"zk": "zookeeper", "etcd3": "etcd", "postgresql": "postgres"}
#: Backends whose URLs may carry ``user:password@`` before the host, as the DATABASE_URL that
#: users of PostgreSQL already hold does (dj-database-url's form).
_CREDENTIALS_IN_URL = ("postgres",)


def _store_class(backend: object) -> type[Store]:
    if not isinstance(backend, str):
        raise UnknownBackendError(f"backend must be a str, not {type(backend).__name__}")
    name = _ALIASES.get(backend.lower(), backend.lower())
    if name not in BACKENDS:
        known = ", ".join(sorted([*BACKENDS, *_ALIASES]))
        raise UnknownBackendError(f"unknown store backend {backend!r}; known: {known}")
    module_name, class_name, extra = BACKENDS[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] == __name__.partition(".")[0] and exc.name != f"{__name__}.{module_name}":
            raise  # a module of greenleader's own is broken: not a dependency to install
        hint = f'install greenleader\'s "{extra}" extra (in a clone: pip install -e ".[{extra}]")' if extra \
            else "reinstall greenleader"
        raise MissingDependencyError(f"the {name} store needs {exc.name or exc}: {hint}") from exc
    return getattr(module, class_name)


def new_store(backend: str, addrs: Sequence[str] | str | None = None, **options: Any) -> Store:
    """Create a store: ``backend`` is memory, file, consul, etcd, zookeeper (alias zk) or
    postgres (alias postgresql).

    ``addrs`` lists "host:port" endpoints of one cluster (a single string is one endpoint;
    for the file store, the directory). ``options`` are the backend's keyword options.
    """
    cls = _store_class(backend)
    if isinstance(addrs, str):
        addrs = [addrs]
    if addrs is not None:
        if not isinstance(addrs, Sequence) or not all(isinstance(a, str) and a.strip() for a in addrs):
            raise InvalidArgumentError(f"addrs must be a list of 'host:port' strings, not {addrs!r}")
        addrs = list(addrs)
    try:
        return cls(addrs, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"bad options for the {cls.backend} store: {exc}") from None


def from_url(url: str) -> Store:
    """Create a store from a URL such as ``consul://h1:8500,h2:8500?lock_delay=1``,
    ``etcd://h1:2379``, ``zookeeper://h1:2181,h2:2181/chroot``, ``file:///run/elections``,
    ``postgres://user:password@h1:5432/db`` or ``memory://`` (options go in the query string)."""
    if not isinstance(url, str):
        raise InvalidURLError(f"store URL must be a str, not {type(url).__name__}")
    if "://" not in url:
        raise InvalidURLError(f"store URL {_redacted(url)!r} has no scheme; expected e.g. consul://127.0.0.1:8500")
    shown = _redacted(url)
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidURLError(f"malformed store URL {shown!r}") from None
    try:
        cls = _store_class(parts.scheme)
    except UnknownBackendError as exc:
        raise InvalidURLError(f"store URL {shown!r}: {exc}") from None
    options: dict[str, Any] = {}
    for name, value in query:
        if name in options:
            raise InvalidURLError(f"store URL {shown!r} repeats option {name!r}")
        options[name] = value
    if "@" in parts.netloc and cls.backend in _CREDENTIALS_IN_URL:
        credentials, _, host_part = parts.netloc.rpartition("@")
        user, colon, password = credentials.partition(":")
        for name, value in (("user", unquote(user)), ("password", unquote(password) if colon else "")):
            if value:
                if name in options:
                    raise InvalidURLError(f"store URL {shown!r} gives {name} twice")
                options[name] = value
        parts = parts._replace(netloc=host_part)
    if "@" in parts.netloc:
        raise InvalidURLError(
            f"store URL {shown!r} has credentials before the host; give them as options instead: "
            "?user=...&password_file=... (etcd, zookeeper) or ?token_file=... (consul)"
        )
    hosts = unquote(parts.netloc)
    addrs = [h for h in hosts.split(",") if h] if hosts else None
    if hosts and (len(addrs or []) != hosts.count(",") + 1):
        raise InvalidURLError(f"store URL {shown!r} has an empty host")
    path = unquote(parts.path)
    try:
        return cls.from_url_parts(addrs, path, options)
    except TypeError as exc:
        raise InvalidURLError(f"bad options in store URL {shown!r}: {exc}") from None


def _redacted(url: str) -> str:
    """``url`` with credentials and option values hidden, fit for messages and logs."""
    head, _, query = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    names = [item.partition("=")[0] for item in query.split("&")] if query else []
    return scheme + sep + rest + ("?" + "&".join(f"{name}=***" for name in names) if names else "")
