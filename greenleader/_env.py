"""Which store the ``greenleader`` command uses when ``--store`` is not given.

Operators of ``consul lock`` and ``etcdctl lock`` have their stores in the environment already,
and kazoo users a connection string. The command looks, in this order, at:

1. ``--store URL``: given explicitly, it always wins;
2. ``$GREENLEADER_STORE``: a store URL (it keeps credentials off the command line);
3. the environment of one store's own tools, selected by its address variable:

   - Consul, by ``CONSUL_HTTP_ADDR`` (``[http[s]://]host:port``), with ``CONSUL_HTTP_SSL``,
     ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``;
     the ACL token comes from ``CONSUL_HTTP_TOKEN`` or ``CONSUL_HTTP_TOKEN_FILE`` (every Consul
     store reads them, as Consul's own tools do);
   - etcd, by ``ETCDCTL_ENDPOINTS`` (comma-separated ``[http[s]://]host:port``), with
     ``ETCDCTL_CACERT``, ``ETCDCTL_CERT``, ``ETCDCTL_KEY``, ``ETCDCTL_USER`` (``user:password``,
     or ``user`` with ``ETCDCTL_PASSWORD``), ``ETCDCTL_INSECURE_SKIP_TLS_VERIFY``;
   - ZooKeeper, by ``ZOOKEEPER_HOSTS``: kazoo's ``hosts`` string, ``h1:2181,h2:2181[/chroot]``.
     ZooKeeper's own tools read no variable; the name is kazoo's parameter, so the value a
     kazoo application is configured with can be used as it is.

   If the address variables of two stores are set, nothing is guessed: that is a usage error
   (two hosts whose environments differ would elect leaders on different stores);
4. else the file store in the user's runtime directory.

Every value is checked here so that an error names the variable; no error or log line ever
shows a password or token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgumentError
from .stores import Store, from_url, new_store
from .stores import _redacted as redacted_url

__all__ = ["ADDRESS_VARIABLES", "StoreChoice", "choose_store"]

log = logging.getLogger(__name__)

#: The variable that selects each store, in the order they are listed in messages.
ADDRESS_VARIABLES = {"CONSUL_HTTP_ADDR": "consul", "ETCDCTL_ENDPOINTS": "etcd", "ZOOKEEPER_HOSTS": "zookeeper"}
#: Every variable read here, by the store it configures (for --help and the "ignored" log line).
VARIABLES = {
    "consul": ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY", "CONSUL_CACERT",
               "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"),
    "etcd": ("ETCDCTL_ENDPOINTS", "ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY", "ETCDCTL_USER",
             "ETCDCTL_PASSWORD", "ETCDCTL_INSECURE_SKIP_TLS_VERIFY"),
    "zookeeper": ("ZOOKEEPER_HOSTS",),
}
#: Read by the Consul store itself (greenleader.stores.consul), whatever chose it.
_READ_BY_THE_STORE = {"CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"}
#: Go's strconv.ParseBool, which Consul's and etcd's tools use for their boolean variables.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True)
class StoreChoice:
    """The store to use and where it came from: ``source`` is ``--store``, ``GREENLEADER_STORE``,
    an address variable, or ``default``; ``shown`` is a secret-free description."""

    source: str
    shown: str
    used: tuple[str, ...] = ()  # every environment variable that went into it
    ignored: tuple[str, ...] = ()  # store variables that are set but were not used
    url: str | None = None
    backend: str | None = None
    addrs: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold a password

    def describe(self) -> str:
        """One line for --help and the log: the store, and which variables chose it."""
        if self.source == "default":
            return f"{self.shown} (no --store, no store variable set)"
        where = self.source if self.source == "--store" else ", ".join(self.used)
        return f"{self.shown}, from {where}"

    def make(self) -> Store:
        """Create the store; logs (INFO) which one and why, and what was set but ignored."""
        log.info("store: %s", self.describe())
        if self.ignored:
            log.info("store: ignoring %s (%s wins)", ", ".join(self.ignored), self.source)
        if self.url is not None:
            return from_url(self.url)
        assert self.backend is not None
        return new_store(self.backend, list(self.addrs) if self.addrs else None, **self.options)


def choose_store(explicit: str | None, environ: Mapping[str, str] | None = None) -> StoreChoice:
    """The store for ``--store explicit`` (None when not given) in ``environ`` (default: this
    process's). InvalidArgumentError, naming the variable, for a value that cannot be used."""
    env = {name: value.strip() for name, value in (os.environ if environ is None else environ).items()
           if name.startswith(("GREENLEADER_STORE", "CONSUL_", "ETCDCTL_", "ZOOKEEPER_")) and value.strip()}
    # The token variables are read by every Consul store, given explicitly or not: never "ignored".
    store_variables = [name for names in VARIABLES.values() for name in names
                       if name in env and name not in _READ_BY_THE_STORE]
    if explicit is not None:
        ignored = tuple(name for name in ("GREENLEADER_STORE", *store_variables) if name in env)
        return StoreChoice("--store", redacted_url(explicit), ignored=ignored, url=explicit)
    if "GREENLEADER_STORE" in env:
        url = env["GREENLEADER_STORE"]
        return StoreChoice("GREENLEADER_STORE", redacted_url(url), used=("GREENLEADER_STORE",),
                           ignored=tuple(store_variables), url=url)
    selected = [name for name in ADDRESS_VARIABLES if name in env]
    if len(selected) > 1:
        raise InvalidArgumentError(
            f"{' and '.join(selected)} are both set: choose the store with --store or GREENLEADER_STORE "
            "(unset the other variable), so that every node elects on the same one"
        )
    if not selected:
        return StoreChoice("default", "the file store", backend="file")
    backend = ADDRESS_VARIABLES[selected[0]]
    addrs, options, shown = _READERS[backend](env)
    used = tuple(name for name in VARIABLES[backend] if name in env)
    ignored = tuple(name for name in store_variables if name not in used)
    return StoreChoice(selected[0], shown, used=used, ignored=ignored, backend=backend, addrs=tuple(addrs),
                       options=options)


# -- one reader per store: (addrs, options, shown) -------------------------------------------------


def _consul(env: Mapping[str, str]) -> tuple[list[str], dict[str, Any], str]:
    scheme, addrs = _addresses("CONSUL_HTTP_ADDR", env["CONSUL_HTTP_ADDR"])
    if len(addrs) != 1:
        raise InvalidArgumentError(f"CONSUL_HTTP_ADDR={env['CONSUL_HTTP_ADDR']!r} must name one agent (host:port)")
    options: dict[str, Any] = {}
    tls = scheme == "https"
    if "CONSUL_HTTP_SSL" in env:
        tls = _bool("CONSUL_HTTP_SSL", env["CONSUL_HTTP_SSL"])
        if scheme == "https" and not tls:
            raise InvalidArgumentError("CONSUL_HTTP_ADDR says https but CONSUL_HTTP_SSL is false")
    if tls:
        options["tls"] = True
    if "CONSUL_HTTP_SSL_VERIFY" in env:
        options["verify"] = _bool("CONSUL_HTTP_SSL_VERIFY", env["CONSUL_HTTP_SSL_VERIFY"])
    _files(env, options, ca_file="CONSUL_CACERT", cert_file="CONSUL_CLIENT_CERT", key_file="CONSUL_CLIENT_KEY")
    return addrs, options, _shown("consul", addrs, options)


def _etcd(env: Mapping[str, str]) -> tuple[list[str], dict[str, Any], str]:
    scheme, addrs = _addresses("ETCDCTL_ENDPOINTS", env["ETCDCTL_ENDPOINTS"])
    options: dict[str, Any] = {"tls": True} if scheme == "https" else {}
    _files(env, options, ca_file="ETCDCTL_CACERT", cert_file="ETCDCTL_CERT", key_file="ETCDCTL_KEY")
    if "ETCDCTL_INSECURE_SKIP_TLS_VERIFY" in env:
        options["verify"] = not _bool("ETCDCTL_INSECURE_SKIP_TLS_VERIFY", env["ETCDCTL_INSECURE_SKIP_TLS_VERIFY"])
    if "ETCDCTL_USER" in env:
        user, colon, password = env["ETCDCTL_USER"].partition(":")
        if not user:
            raise InvalidArgumentError("ETCDCTL_USER names no user (expected user:password)")
        if colon and "ETCDCTL_PASSWORD" in env:
            raise InvalidArgumentError("ETCDCTL_USER holds a password and ETCDCTL_PASSWORD is set too: give one")
        password = password if colon else env.get("ETCDCTL_PASSWORD", "")
        if not password:
            raise InvalidArgumentError(
                "ETCDCTL_USER names no password: set it to user:password, or set ETCDCTL_PASSWORD "
                "(greenleader cannot prompt for it as etcdctl does)"
            )
        options.update(user=user, password=password)
    elif "ETCDCTL_PASSWORD" in env:
        raise InvalidArgumentError("ETCDCTL_PASSWORD is set without ETCDCTL_USER")
    return addrs, options, _shown("etcd", addrs, options)


def _zookeeper(env: Mapping[str, str]) -> tuple[list[str], dict[str, Any], str]:
    value = env["ZOOKEEPER_HOSTS"]
    hosts, slash, chroot = value.partition("/")
    if "://" in value:
        raise InvalidArgumentError(f"ZOOKEEPER_HOSTS={value!r} takes host:port,host:port[/chroot], no scheme")
    addrs = [host.strip() for host in hosts.split(",")]
    if not all(addrs):
        raise InvalidArgumentError(f"ZOOKEEPER_HOSTS={value!r} has an empty host")
    options: dict[str, Any] = {"chroot": slash + chroot} if chroot else {}
    return addrs, options, _shown("zookeeper", addrs, options)


_READERS = {"consul": _consul, "etcd": _etcd, "zookeeper": _zookeeper}


def _addresses(name: str, value: str) -> tuple[str, list[str]]:
    """The scheme (``http`` when there is none) and the ``host:port`` list of an address variable."""
    schemes, addrs = set(), []
    for item in value.split(","):
        item = item.strip()
        scheme, sep, rest = item.rpartition("://")
        scheme = scheme.lower() if sep else "http"
        if scheme not in ("http", "https"):
            raise InvalidArgumentError(f"{name}={value!r}: the scheme {scheme!r} is not supported (http or https)")
        rest = rest.rstrip("/")
        if not rest or "/" in rest or "@" in rest:
            raise InvalidArgumentError(f"{name}={value!r}: expected [http[s]://]host:port, comma-separated")
        schemes.add(scheme)
        addrs.append(rest)
    if len(schemes) > 1:
        raise InvalidArgumentError(f"{name}={value!r} mixes http and https")
    return schemes.pop(), addrs


def _bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidArgumentError(f"{name}={value!r} is not a boolean (true or false)")


def _files(env: Mapping[str, str], options: dict[str, Any], **variables: str) -> None:
    """Options ``option=path`` from the variables named, each checked to be a readable file."""
    for option, name in variables.items():
        if name in env:
            path = env[name]
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise InvalidArgumentError(f"{name}={path!r} is not a readable file")
            options[option] = path


def _shown(backend: str, addrs: list[str], options: Mapping[str, Any]) -> str:
    """A URL-like, secret-free description: ``etcd://h1:2379,h2:2379 (tls, user root)``."""
    notes = ["tls"] if options.get("tls") or "ca_file" in options or "cert_file" in options else []
    if options.get("verify") is False:
        notes.append("no verify")
    if "user" in options:
        notes.append(f"user {options['user']}")
    return f"{backend}://{','.join(addrs)}{options.get('chroot', '')}" + (f" ({', '.join(notes)})" if notes else "")
