"""TLS and credential options, spelt and checked the same way by the Consul, etcd and ZooKeeper stores.

Every network store takes ``tls``, ``ca_file``, ``cert_file``, ``key_file`` and ``verify``
(keyword arguments, or ``from_url`` query parameters). TLS is on when ``tls`` is true or when
``ca_file`` or ``cert_file`` is given; ``verify`` (default true) checks the server's
certificate chain *and* that it names the host connected to. Secrets (``password``, ``token``)
may instead be read from a file (``password_file``, ``token_file``), which keeps them out of
URLs, command lines and environment variables. No function here ever puts a secret's value in
an exception message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .base import check_bool

__all__ = ["TLSOptions", "check_secret", "is_loopback", "pick", "read_secret", "tls_options", "warn_plaintext_secret"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSOptions:
    """What a store's client needs for TLS: ``enabled`` False means plain connections."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def describe(self) -> str:
        """Short and secret-free, for ``repr()``: ``tls``, ``tls(no verify)`` or ``""``."""
        if not self.enabled:
            return ""
        return "tls" if self.verify else "tls(no verify)"


def pick(name: str, value: object, old_name: str, old_value: object) -> object:
    """The value of option ``name``, which may also be given by its older name ``old_name``."""
    if old_value is None:
        return value
    if value is not None:
        raise InvalidArgumentError(f"give {name} or its older name {old_name}, not both")
    return old_value


def _check_file(name: str, path: object) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidArgumentError(f"{name} must be a file path, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{name} must be a str path")
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise InvalidArgumentError(f"{name} {text!r} is not a readable file")
    return text


def tls_options(
    backend: str,
    *,
    tls: object = None,
    ca_file: object = None,
    cert_file: object = None,
    key_file: object = None,
    verify: object = None,
    key_file_required: bool = True,
) -> TLSOptions:
    """Check and combine the TLS options of a store; InvalidArgumentError on a contradiction.

    ``key_file_required`` False lets ``cert_file`` alone name a file holding both the
    certificate and its key (the Consul store's HTTP client reads such files).
    """
    explicit = None if tls is None else check_bool("tls", tls)
    ca = None if ca_file is None else _check_file("ca_file", ca_file)
    cert = None if cert_file is None else _check_file("cert_file", cert_file)
    key = None if key_file is None else _check_file("key_file", key_file)
    if key is not None and cert is None:
        raise InvalidArgumentError("key_file needs cert_file (the client certificate)")
    if cert is not None and key is None and key_file_required:
        raise InvalidArgumentError(f"cert_file needs key_file (the client certificate's key) for the {backend} store")
    checked = True if verify is None else check_bool("verify", verify)
    enabled = explicit if explicit is not None else (ca is not None or cert is not None)
    if not enabled and (ca is not None or cert is not None):
        raise InvalidArgumentError("ca_file and cert_file need TLS, but tls is off")
    if not enabled and verify is not None and not checked:
        raise InvalidArgumentError("verify=false means nothing without TLS")
    if enabled and not checked:
        log.warning("%s store: TLS certificate verification is OFF: anyone on the network path can "
                    "pose as the store; give ca_file instead of verify=false", backend)
    return TLSOptions(enabled, ca, cert, key, checked)


def check_secret(name: str, value: object) -> str:
    """A non-empty str without control characters; the error never shows the value."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(f"{name} must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidArgumentError(f"{name} contains control characters")
    return value


def read_secret(name: str, value: object, file_name: str, path: object) -> str | None:
    """The secret given directly as ``name`` or in the file ``file_name`` (its first line), or None."""
    if path is None:
        return None if value is None else check_secret(name, value)
    if value is not None:
        raise InvalidArgumentError(f"give {name} or {file_name}, not both")
    text = _check_file(file_name, path)
    try:
        with open(text, encoding="utf-8") as stream:
            secret = stream.read().strip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read {file_name} {text!r}: {type(exc).__name__}") from None
    return check_secret(f"the secret in {file_name} {text!r}", secret)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (where plain text cannot be overheard)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_plaintext_secret(backend: str, what: str, hosts: list[str]) -> None:
    """Log a warning when ``what`` (a credential) would cross a network in plain text."""
    remote = [h for h in hosts if not is_loopback(h)]
    if remote:
        log.warning("%s store: the %s goes to %s without TLS, readable by anyone on the network path; "
                    "set ca_file (or tls=true)", backend, what, ", ".join(remote))
