"""Consul store: elections on a Consul KV key locked by a session.

How it meets the contract (docs/safety.md; the reasoning is in docs/stores/consul.md):
one session per TTL per store object (``behavior=delete``, no health checks, lock-delay 1 s)
is shared by its candidates, like etcd's concurrency.Session; a win is one transaction that
locks the key (flags ``0x2ddccbc058a50c18``, as ``consul lock``) and reads it back, so it
proves the session (rule 10); the term is the key's ModifyIndex (rule 2). A renewal confirms
the session and re-reads the key; a release unlocks the key in one request (rule 3) and the
last user destroys the session (rule 6). A session Consul drops ends every tenure it carried
(rule 1); a waiter that saw a key deleted from outside waits for its holder to step down.
The recipe is :mod:`.recipe`; HTTP, TLS, the token and errors are :mod:`.client`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

from gevent import monkey

from ... import _fork
from ...errors import InvalidArgumentError, InvalidKeyError, InvalidURLError
from .._security import tls_options, warn_plaintext_secret
from ..base import LeaderInfo, Lease, Store, check_bool, check_float, check_text
from .client import DEFAULT_ADDR, LOCK_FLAG, ConsulClient, resolve_token
from .recipe import Election

__all__ = ["DEFAULT_LOCK_DELAY", "LOCK_FLAG", "ConsulStore"]

log = logging.getLogger(__name__)

#: Lock-delay of greenleader's sessions: Consul refuses a key this long after the session that
#: held it is invalidated (destroyed, expired), so the holder hears of it first (one blocking
#: query); 1 s covers that widely, where Consul's 15 s default would dominate crash failover.
DEFAULT_LOCK_DELAY = 1.0
MAX_LOCK_DELAY = 60.0  # Consul silently caps lock-delay here
_URL_OPTIONS = ("token", "token_file", "tls", "scheme", "lock_delay", "timeout", "wait", "retry_for", "dc",
                "verify", "ca_file", "cert_file", "key_file")


class ConsulStore(Store):
    """Elections on Consul agents ``addrs`` (``host:port``; default ``127.0.0.1:8500``).

    :param token: ACL token (``token_file``: read it from that file). Without either, the
        token is ``CONSUL_HTTP_TOKEN`` from the environment, else the content of the file
        named by ``CONSUL_HTTP_TOKEN_FILE``, else none (Consul's anonymous token). The
        environment never overrides an explicit token; which one is used is logged (INFO)
        and shown by ``token_source``.
    :param tls: use HTTPS (on by default when ``ca_file`` or ``cert_file`` is given);
        ``scheme="https"`` is the older spelling.
    :param lock_delay: seconds Consul refuses the key after a holder's session is invalidated
        (default 1 s, see :data:`DEFAULT_LOCK_DELAY`).
    :param timeout: connect and read timeout of every request, in seconds.
    :param wait: longest wait of one blocking query, in seconds.
    :param retry_for: accepted for compatibility and ignored: how long to ride out an outage is
        the Candidate's and Follower's ``retry`` (a Backoff).
    :param dc: datacenter; default the agent's.
    :param ca_file: CA bundle that signs the agents' certificates (default: the system's).
    :param cert_file: client certificate, for agents with ``verify_incoming_https``;
        ``key_file`` is its key (omit it if ``cert_file`` holds both).
    :param verify: check the agent's certificate and that it names the host connected to
        (default true).
    """

    backend: ClassVar[str] = "consul"
    min_ttl: ClassVar[float] = 10.0
    max_ttl: ClassVar[float] = 86400.0

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        tls: bool | str | None = None,
        scheme: str | None = None,
        lock_delay: float | str = DEFAULT_LOCK_DELAY,
        timeout: float | str = 5.0,
        wait: float | str = 10.0,
        retry_for: float | str = 15.0,
        dc: str | None = None,
        verify: bool | str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if isinstance(addrs, str):
            addrs = [addrs]
        addrs = list(addrs) if addrs else [DEFAULT_ADDR]
        if scheme is not None:
            if scheme not in ("http", "https"):
                raise InvalidArgumentError(f"scheme must be 'http' or 'https', not {scheme!r}")
            if tls is not None and check_bool("tls", tls) != (scheme == "https"):
                raise InvalidArgumentError(f"tls={tls} contradicts scheme={scheme!r}")
            tls = scheme == "https"
        self.tls = tls_options("consul", tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                               verify=verify, key_file_required=False)
        self.scheme = "https" if self.tls.enabled else "http"
        self.lock_delay = check_float("lock_delay", lock_delay, minimum=0.0, maximum=MAX_LOCK_DELAY)
        self.timeout = check_float("timeout", timeout, minimum=0.0, maximum=600.0, inclusive=False)
        self.wait = check_float("wait", wait, minimum=0.1, maximum=600.0)
        self.retry_for = check_float("retry_for", retry_for, minimum=0.0, maximum=86400.0)
        self.dc = None if dc is None else check_text("dc", dc, max_length=128)
        tls_verify: bool | str = (self.tls.ca_file or True) if self.tls.verify else False
        cert: str | tuple[str, str] | None = self.tls.cert_file
        if self.tls.cert_file is not None and self.tls.key_file is not None:
            cert = (self.tls.cert_file, self.tls.key_file)
        self._token, source = resolve_token(token, token_file)
        if self._token is not None and not self._token.isascii():
            # It travels in the X-Consul-Token header, which HTTP/1.1 encodes as Latin-1; Consul's
            # tokens are UUIDs, so anything else is a mistake best named here, not on each request.
            raise InvalidArgumentError(f"the Consul ACL token (from {source}) must be ASCII text")
        #: Where the ACL token came from: "token", "token_file", "CONSUL_HTTP_TOKEN",
        #: "CONSUL_HTTP_TOKEN_FILE", or None (no token: Consul's anonymous token).
        self.token_source: str | None = source
        self._client = ConsulClient(addrs, scheme=self.scheme, dc=self.dc, timeout=self.timeout, token=self._token,
                                    token_source=source, verify=tls_verify, cert=cert)
        self._election = Election(self._client, lock_delay=self.lock_delay, wait=self.wait,
                                  read=lambda key, index=None, wait=None: self._get(key, index=index, wait=wait))
        _fork.register(self)
        if self._token and not self.tls.enabled:
            warn_plaintext_secret("consul", "ACL token", [e.addr.rpartition(":")[0] for e in self._client.endpoints])
        if not monkey.is_module_patched("socket"):
            warnings.warn(
                "greenleader's Consul store talks to Consul through http.client, whose sockets block "
                "the gevent hub because gevent has not monkey-patched socket: "
                "call gevent.monkey.patch_all() first, before importing anything else",
                RuntimeWarning,
                stacklevel=2,
            )

    @classmethod
    def from_url_parts(cls, addrs: list[str] | None, path: str, options: dict[str, str]) -> ConsulStore:
        if path not in ("", "/"):
            raise InvalidURLError(f"a consul store URL takes no path, got {path!r}")
        try:
            return cls(addrs, **options)  # type: ignore[arg-type]
        except TypeError:
            unknown = sorted(set(options) - set(_URL_OPTIONS))
            raise InvalidURLError(
                f"unknown consul store URL option(s) {unknown}; known: {', '.join(_URL_OPTIONS)}"
            ) from None

    def __repr__(self) -> str:
        token = f" token=***({self.token_source})" if self._token else ""
        dc = f" dc={self.dc!r}" if self.dc else ""
        verify = "" if self.tls.verify or not self.tls.enabled else " tls(no verify)"
        return f"<ConsulStore {self.scheme}://{','.join(self.addrs)}{dc}{token}{verify}>"

    @property
    def addrs(self) -> list[str]:
        """The agents' ``host:port`` addresses, in order of preference."""
        return [e.addr for e in self._client.endpoints]

    @property
    def active_addr(self) -> str:
        """The agent requests go to now (the last one that answered)."""
        return self._client.active_addr

    # -- validation -----------------------------------------------------------------------

    def validate_key(self, key: str) -> str:
        key = super().validate_key(key)
        if key.startswith("/"):
            raise InvalidKeyError(f"Consul keys must not start with '/': {key!r}")
        segments = key.rstrip("/").split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise InvalidKeyError(f"Consul key {key!r} has an empty, '.' or '..' segment (HTTP would rewrite it)")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKeyError(f"Consul key {key!r} is not valid Unicode text") from None
        return key

    def validate_ttl(self, ttl: float) -> float:
        value = check_float("ttl", ttl, minimum=0.0, inclusive=False)
        if value < self.min_ttl:
            raise InvalidArgumentError(
                f"ttl={value:g}s is too short for Consul: session TTLs must be at least "
                f"{self.min_ttl:g}s (Consul's own limit)"
            )
        return super().validate_ttl(value)

    # -- the store contract: the recipe -------------------------------------------------------

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        return self._election.acquire(self.validate_key(key), check_text("node", node), self.validate_ttl(ttl))

    def leader(self, key: str) -> LeaderInfo | None:
        return self._election.leader(self.validate_key(key))

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        return self._election.watch(self.validate_key(key))

    def _get(self, key: str, *, index: int | None = None, wait: float | None = None) -> tuple[int, Any]:
        """Read ``key``: ``(index, entry or None)``; with ``index``, a blocking query."""
        return self._client.get(key, index, self.wait if wait is None else wait)

    def close(self) -> None:
        self._election.close()
        self._client.close()

    def _after_fork_in_child(self) -> None:
        self._election.after_fork_in_child()
        self._client.after_fork_in_child()
