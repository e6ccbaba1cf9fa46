"""etcd v3 store: elections the way etcd's own ``concurrency.Election`` runs them.

Each candidate grants a lease and creates the key ``<key>/<lease id in hex>`` (value: its
node name) in a transaction, if absent. The candidate whose key has the lowest create
revision under ``<key>/`` leads; the create revision of its key is its fencing term. Every
other candidate watches only the deletion of its predecessor (the key created just before
its own), so a release wakes exactly one waiter. Releasing revokes the lease, which deletes
the key (and its twin, below) in the same step; a crashed holder's lease expires after the
TTL and takes its keys with it.

**A key deleted from outside is not a release.** An operator's ``etcdctl del`` of the leader's
key (``<key>/<lease hex>``) leaves its lease alive, and its holder leads on until its own key
watch reports the deletion (before the two rules below, the nemesis found two leaders for
2-886 ms after such deletions). So:

- Each candidate key has a *twin* ``<key>/<lease hex>/live`` on the same lease, created in the
  same transaction and gone with the lease. A candidate queues behind every older key *or
  twin*, so a twin whose key was deleted keeps everyone, newcomers included, from winning
  until its holder has noticed and revoked its lease (or the lease expired). Deleting either
  of a holder's keys ends its tenure; a waiter whose key or twin is gone campaigns anew.
- A candidate never wins while the lease of an older greenleader candidate that it saw lives
  on: when such a key is gone, it asks etcd for the lease (LeaseTimeToLive) and, while that
  lease lives, waits for it to go, polling with a backoff. This covers a key deleted with its
  twin (``etcdctl del --prefix``), and a key deleted after its twin. greenleader's candidates
  are told by the tag in their lease ids (or a twin); ``etcdctl elect`` and Go sessions are not
  waited for so, as they keep their lease after resigning (docs/safety.md). A release
  revokes the lease, so the check finds it gone at once: a handover costs that one extra
  round trip. The leases seen are remembered across a candidate's campaigns, until they are
  found gone or a predecessor that saw them is found to have won (the deletion of a claimed
  key, below): that winner had checked them.

The limit: a candidate that starts after *both* keys of a live leader were deleted cannot know
of that leader, and wins; the two lead together until the old leader's key watch reports the
deletion.

A win proves itself (DESIGN.md rule 10): the round trip that makes a candidate leader is a
transaction that compares its own key's (and twin's) create revision, so a waiter whose key
was deleted (say, by an operator's ``etcdctl del``) while its lease lived never wins with it:
it campaigns again with a new key. The same transaction lists the older candidates still there.

A winner then *claims* its key by writing the same value again, on the same lease, which
takes the key's version from 1 to 2 (the create revision, the term, is unchanged). The claim
is sent only once the candidate has stepped up, so followers, which name only a claimed
first key (an unclaimed one reads as vacant), never name a candidate before it can know
that it leads: not a winner frozen just as it won, nor a waiter that comes first while it
withdraws. So during a handover a follower reports a vacancy for about one round trip.
Candidates of ``etcdctl elect`` on the same key exclude greenleader's and are excluded by
them (same keys, same order). They never claim, so followers name another client's first
candidate at once, with its value (the proposal): greenleader's own keys are told apart by a
tag in their lease ids (:class:`_View`).

The client is ``etcd-sdk-python`` (module ``pyetcd``), the maintained fork of ``etcd3`` with
current protobuf stubs; ``etcd3`` is used if it is what the environment has. It speaks
gRPC, which only cooperates with gevent after ``grpc.experimental.gevent.init_gevent()``:
this module calls it once, before it makes its first channel, when gevent has patched the
socket module. Channels are made lazily and never used across ``fork()``. Importing this
module sets ``GRPC_POLL_STRATEGY=poll`` (unless set): with gRPC's default poller, children
that gevent's ``subprocess`` forks while a gRPC call is in flight may abort before ``exec``.

Nested elections (``a`` and ``a/b``) share the range ``a/``: only direct children
``<key>/<id>`` count as candidates of ``key``, so ranges read the whole prefix, not one key.

Watches (the waiters' and the followers') run on gRPC streams of their own, made with the
client's stubs, rather than on the library's shared watcher thread: one stream per watch can
be cancelled cleanly, and survives the library swapping its watcher when an endpoint fails.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import gevent
import gevent.pool
from gevent import monkey
from gevent.queue import Queue

from ..errors import (
    InvalidArgumentError,
    InvalidKeyError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from ._security import pick, read_secret, tls_options, warn_plaintext_secret
from .base import LeaderInfo, Lease, Store, check_bool, check_float, check_text, now

# gRPC's default poller (epoll1) makes forked children abort before they exec (SIGABRT,
# "epoll_wait error: Bad file descriptor"): gevent's subprocess forks in Python, gRPC's fork
# handler restarts its poller in the child, and the child then closes every descriptor. With
# the poll poller, subprocesses and forked workers are safe. gRPC reads it when imported.
_GRPC_PREIMPORTED = "grpc" in sys.modules and "GRPC_POLL_STRATEGY" not in os.environ
os.environ.setdefault("GRPC_POLL_STRATEGY", "poll")

import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402

try:
    import pyetcd as etcd_client
    from pyetcd import etcdrpc
    from pyetcd import exceptions as etcd_exceptions
    from pyetcd.etcdrpc import kv_pb2
except ImportError:  # the original package, where protobuf < 4 still allows it to import
    import etcd3 as etcd_client  # type: ignore[no-redef]
    from etcd3 import etcdrpc  # type: ignore[no-redef]
    from etcd3 import exceptions as etcd_exceptions  # type: ignore[no-redef]
    from etcd3.etcdrpc import kv_pb2  # type: ignore[no-redef]

__all__ = ["EtcdStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379
_MAX_KEY_BYTES = 512
#: Seconds a failed endpoint is skipped while others remain (when all have failed, all are tried).
_ENDPOINT_RETRY = 5.0
#: gRPC keepalive pings find a dead peer under a stream that would otherwise hang forever.
#: etcd refuses pings more frequent than its --grpc-keepalive-min-time (5 s by default).
_PING_INTERVAL_MS = 10_000
#: Longest slice of gRPC's blocking waits once gevent runs it (gRPC's own is 0.1 s).
_GRPC_WAIT_SLICE = 5.0

_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
_AUTH_DETAILS = ("permission denied", "user name is empty", "authentication failed", "invalid auth token")

#: A candidate key's version once its winner has claimed it (created: 1; claimed: 2).
_CLAIMED = 2
#: First and longest pause between two checks of a lease whose key was deleted from outside.
_GONE_POLL = (0.005, 0.25)
#: Suffix of a candidate key's twin, which shares its lease: ``<key>/<id>/live``.
_TWIN = b"/live"
#: The low bits of every lease id greenleader makes (so its keys ``<key>/<lease hex>`` end in
#: ``91ead``): followers tell its candidates, which are named only once claimed, from other
#: clients' (etcdctl elect), which never claim. 20 bits leave 41 random ones for the id.
_OWN_TAG, _OWN_TAG_BITS = 0x91EAD, 20

_grpc_gevent_ready = False
#: Clients inherited across fork(): their channels belong to the parent and are never touched.
_inherited_clients: list[Any] = []


def _init_grpc_gevent() -> None:
    """Make gRPC cooperate with gevent, once per process, before the first channel is made."""
    global _grpc_gevent_ready
    if _grpc_gevent_ready or not monkey.is_module_patched("socket"):
        return
    grpc.experimental.gevent.init_gevent()
    # gRPC's blocking waits (a stream's next message) wake every 0.1 s so that a blocked main
    # thread can run signal handlers; under gevent the hub runs them, and each idle watch
    # stream would wake 10 times a second (half the CPU of idle leaders; benchmarks/).
    if isinstance(getattr(grpc._common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        grpc._common.MAXIMUM_WAIT_TIMEOUT = _GRPC_WAIT_SLICE
    _grpc_gevent_ready = True


def _parse_addr(addr: object) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` (an ``http://`` prefix is tolerated) -> (host, port)."""
    if not isinstance(addr, str) or not addr.strip():
        raise InvalidArgumentError(f"an etcd address must be a 'host:port' string, not {addr!r}")
    text = addr.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest:
            raise InvalidArgumentError(f"malformed etcd address {addr!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host or "/" in host or any(ch.isspace() for ch in host):
        raise InvalidArgumentError(f"malformed etcd address {addr!r}")
    if ":" in host:
        host = f"[{host}]"  # gRPC's form of an IPv6 address
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgumentError(f"etcd address {addr!r} has an invalid port")
    return host, int(port_text)


def _read_file(path: object) -> bytes | None:
    """The contents of a TLS file given as an option (None for None)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InvalidArgumentError(f"a TLS file option must be a path, not {path!r}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read TLS file {path}: {exc.strerror}") from None


def _rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind ``exc`` (the library re-raises some as bare exceptions)."""
    seen = exc
    for _ in range(3):
        if isinstance(seen, grpc.RpcError) and hasattr(seen, "code"):
            return seen
        if seen.__context__ is None:
            return None
        seen = seen.__context__
    return None


def _translate(exc: BaseException, what: str, where: str) -> StoreError | InvalidArgumentError:
    """A greenleader error for a client-library exception (never carrying credentials)."""
    rpc = _rpc_error(exc)
    if rpc is not None:
        code, details = rpc.code(), rpc.details() or ""
        message = f"etcd {what} at {where} failed: {code.name}: {details}{_hint(details)}"
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or any(
            text in details for text in _AUTH_DETAILS
        ):
            return PermissionDeniedError(message)
        if code in _UNAVAILABLE_CODES:
            return StoreUnavailableError(message)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            return InvalidArgumentError(message)
        return StoreError(message)
    if isinstance(exc, etcd_exceptions.NoServerAvailableError):
        return StoreUnavailableError(f"etcd {what} failed: no endpoint available")
    if isinstance(exc, (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError)):
        return StoreUnavailableError(f"etcd {what} at {where} failed: {exc}")
    return StoreError(f"etcd {what} at {where} failed: {type(exc).__name__}: {exc}")


_HINTS = (
    ("user name is empty", "etcd has authentication enabled: give user and password, or a client "
                           "certificate (cert_file) whose CN is an etcd user"),
    ("authentication failed", "wrong user or password"),
    ("permission denied", "the user (or the client certificate's CN) lacks a role granting this key "
                          "range; see the role in greenleader's docs/security.md"),
    ("Hostname Verification", "TLS failed: the server's certificate does not name the host connected to; "
                              "connect by a name the certificate has"),
    ("handshake", "TLS failed: check ca_file, cert_file and key_file, and that the server's certificate "
                  "names the host connected to"),
    ("TSI_", "TLS failed: the server may have refused the client certificate (cert_file, key_file)"),
    ("Socket closed", "if the server wants TLS, give ca_file (or tls=true)"),
)


def _hint(details: str) -> str:
    """What the user can do about an etcd error, if we can tell."""
    return next((f" ({hint})" for text, hint in _HINTS if text in details), "")


def _is_direct_child(kv_key: bytes, prefix: bytes) -> bool:
    """True for ``<key>/<id>``, False for the keys of a nested election ``<key>/<x>/<id>``."""
    return kv_key.startswith(prefix) and b"/" not in kv_key[len(prefix):]


def _twin_of(kv_key: bytes) -> bytes:
    """The twin ``<key>/<id>/live`` of a candidate key ``<key>/<id>`` (see the module docstring)."""
    return kv_key + _TWIN


def _is_registration(kv_key: bytes, prefix: bytes) -> bool:
    """True for a candidate key ``<key>/<id>`` or its twin ``<key>/<id>/live`` (ids are hex:
    never ``live``, so no nested election's key looks like a twin)."""
    rest = kv_key[len(prefix):] if kv_key.startswith(prefix) else b"/"
    return b"/" not in rest or (rest.endswith(_TWIN) and rest.count(b"/") == 1)


#: A candidate's key as a follower sees it: (create revision, version, value, lease).
_Seen = tuple[int, int, bytes, int]
#: A candidate's key as a waiter sees it: (create revision, key, lease).
_Candidate = tuple[int, bytes, int]


def _own_lease_id() -> int:
    """A new lease id for a candidate: random, positive, ending in :data:`_OWN_TAG`."""
    return (random.SystemRandom().getrandbits(61 - _OWN_TAG_BITS) << _OWN_TAG_BITS) | (1 << 61) | _OWN_TAG


def _is_own_lease(lease: int) -> bool:
    """True for a lease id greenleader made (:func:`_own_lease_id`), as a rule False for
    another client's (etcd numbers its leases in sequence: 1 in 2**20 ends in the tag)."""
    return (lease & ((1 << _OWN_TAG_BITS) - 1)) == _OWN_TAG


class _View:
    """The election as a follower sees it: the candidate keys ``<key>/<id>`` and the twins
    ``<key>/<id>/live``, kept up to date from a range and then from watch events.

    The first candidate is the leader, but a greenleader candidate only once it has claimed
    its key (version 2): before that it may not know that it leads (module docstring). Other
    clients' candidates (``etcdctl elect``, Go's ``concurrency.Election`` and ``Mutex``) never
    claim: they lead as soon as they are first, with their value (the proposal) as the name.
    A candidate is greenleader's when its lease id carries greenleader's tag, or (keys made
    before the tag) when its twin, created in the same transaction, is there with the same
    create revision. Both are true from the key's first revision on, so a reader never takes
    an unclaimed greenleader key for another client's; the twin alone would not do, since an
    operator may delete it.
    """

    def __init__(self, prefix: bytes, kvs: Any) -> None:
        self.prefix = prefix
        self.candidates: dict[bytes, _Seen] = {}
        self.twins: dict[bytes, int] = {}  # twin key -> create revision
        for kv in kvs:
            self.put(kv)

    def put(self, kv: Any) -> None:
        """A key was created or rewritten (a new candidate, a twin, a winner's claim)."""
        if _is_direct_child(kv.key, self.prefix):
            self.candidates[kv.key] = (kv.create_revision, kv.version, kv.value, kv.lease)
        elif _is_registration(kv.key, self.prefix):
            self.twins[kv.key] = kv.create_revision

    def delete(self, kv_key: bytes) -> None:
        self.candidates.pop(kv_key, None)
        self.twins.pop(kv_key, None)

    def _first(self) -> tuple[_Seen, bool] | None:
        """The first candidate, and whether it still has to claim its win to be named."""
        if not self.candidates:
            return None
        key = min(self.candidates, key=self.candidates.__getitem__)
        seen = self.candidates[key]
        own = _is_own_lease(seen[3]) or self.twins.get(_twin_of(key)) == seen[0]
        return seen, own and seen[1] < _CLAIMED

    def awaits_claim(self) -> bool:
        """True when the first candidate is greenleader's and has not claimed its key yet."""
        first = self._first()
        return first is not None and first[1]

    def leader(self) -> LeaderInfo | None:
        """The first candidate, if it is named: claimed, or another client's; else None."""
        first = self._first()
        if first is None or first[1]:  # not stepped up yet (or not won: frozen, withdrawing)
            return None
        revision, _, value, _ = first[0]
        return LeaderInfo(value.decode("utf-8", errors="replace"), revision)


def _owns(key: bytes, create_revision: int) -> Any:
    """A transaction comparison: ``key`` exists with this create revision (is still ours)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                           create_revision=create_revision)


class _WatchStream:
    """One gRPC watch stream of its own: created (or failed) within the timeout, closed once."""

    def __init__(self, store: EtcdStore, key: bytes, range_end: bytes | None, start_revision: int,
                 filters: list[int] | None = None, prev_kv: bool = False) -> None:
        self._store = store
        client = store._client()
        try:
            channel = client.channel  # may fail over: read the endpoint after it
        except etcd_exceptions.Etcd3Exception as exc:
            raise _translate(exc, "watch", "?") from exc
        self._endpoint = client.endpoint_in_use
        self.where = self._endpoint.netloc
        create = etcdrpc.WatchCreateRequest(key=key, start_revision=start_revision, filters=filters or [],
                                            prev_kv=prev_kv)
        if range_end is not None:
            create.range_end = range_end
        self._requests: Queue = Queue()
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        store.requests["watch"] += 1
        self._closed = False
        # Making a streaming call yields (gRPC starts a request-feeding thread, a greenlet
        # here); killed there, we would never learn of the call, and etcd keeps a stream that
        # the client only half-closes. So a helper makes it, and cancels it if we are gone.
        maker = gevent.spawn(etcdrpc.WatchStub(channel).Watch, iter(self._requests.get, None),
                             metadata=client.metadata)
        try:
            self._call = maker.get()
        except BaseException as exc:
            self._closed = True
            self._requests.put(None)
            maker.link_value(lambda made: made.value.cancel())
            if isinstance(exc, Exception):
                raise self._error(exc) from exc
            raise
        try:
            with gevent.Timeout(store.timeout, StoreUnavailableError(
                    f"etcd watch at {self.where} was not created within {store.timeout:g}s")):
                first = next(self._call, None)
            if first is None or not first.created or first.canceled:
                reason = first.cancel_reason if first is not None else "stream ended"
                refusal = f"etcd watch at {self.where} was refused: {reason or 'canceled'}"
                if "permission denied" in reason:
                    raise PermissionDeniedError(f"{refusal}{_hint(reason)}")
                raise StoreError(refusal)
            #: The store's revision when the watch was made; a watch from "now" (start_revision 0)
            #: sees every change after it.
            self.revision: int = first.header.revision
        except BaseException as exc:
            self.close()
            if isinstance(exc, grpc.RpcError):
                raise self._error(exc) from exc
            raise

    def _error(self, exc: BaseException) -> StoreError | InvalidArgumentError:
        error = _translate(exc, "watch", self.where)
        if isinstance(error, StoreUnavailableError):
            self._endpoint.fail()  # the next request tries another endpoint
        return error

    def __iter__(self) -> Iterator[Any]:
        """Watch responses until the stream ends (also when closed); StoreError on failure."""
        try:
            for response in self._call:
                if response.canceled or response.compact_revision:
                    return
                yield response
        except grpc.RpcError as exc:
            if self._closed:
                return
            raise self._error(exc) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put(None)
            self._call.cancel()


class _EtcdLease(Lease):
    """A won election: the key ``<key>/<lease id>`` on a lease that the candidate renews."""

    def __init__(self, store: EtcdStore, key: str, node: str, term: int, confirmed_at: float,
                 lease_id: int, own_key: bytes) -> None:
        super().__init__(key, node, term, confirmed_at)
        self.lease_id = lease_id
        self.own_key = own_key
        self.twin = _twin_of(own_key)
        self._store = store
        self._pid = os.getpid()
        self._released = False
        self._guard = gevent.spawn(self._guard_own_key, term)  # any deletion since its creation
        self._claimer = gevent.spawn(self._claim_once_stepped_up)

    def __repr__(self) -> str:
        return f"<EtcdLease key={self.key!r} node={self.node!r} term={self.term} lease={self.lease_id:x}>"

    def renew(self) -> None:
        if self._released:
            raise LeadershipLostError(f"{self.node!r} released {self.key!r}")
        started = now()
        if self._store._keepalive(self.lease_id) <= 0:
            raise LeadershipLostError(f"etcd lease {self.lease_id:x} of {self.node!r} on {self.key!r} is gone")
        self.confirmed_at = started

    def release(self) -> None:
        if self._released:
            return
        self._released = True  # from here on, the guard reports nothing and nothing is claimed
        self._claimer.kill(block=True, timeout=1)
        if self._pid != os.getpid():
            return  # a forked child's copy: the lease is the parent's to release
        try:  # the key goes with the lease, in one step: the next candidate finds both gone
            self._store._revoke(self.lease_id)
        finally:
            self._guard.kill(block=True, timeout=1)

    def _claim_once_stepped_up(self) -> None:
        """Claim the key for followers, retrying until claimed, released or lost.

        This greenlet is spawned as the lease is made, in the greenlet that runs ``acquire``;
        it first lets every greenlet already due to run go first. Among them is the
        candidate, woken by ``acquire`` returning, which steps up without yielding: so the
        claim goes out after the step-up, and a winner stopped just as it won (SIGSTOP, a
        blocked hub) is not named by followers until it knows that it leads.
        """
        gevent.sleep(0)
        failures = 0
        while not self._released and self._pid == os.getpid():
            try:
                if self._claim():
                    return
                self._notify_lost_once()  # the key is gone; the guard reports it too
                return
            except (StoreError, InvalidArgumentError) as exc:
                failures += 1
                log.warning("etcd: %r could not claim %r yet (followers see no leader): %s",
                            self.node, self.own_key, exc)
                gevent.sleep(min(2.0, 0.05 * 2**failures))

    def _claim(self) -> bool:
        """Rewrite our value on our lease, on our key and its twin, if both are still ours:
        version 1 -> 2. False if either is gone."""
        request = etcdrpc.TxnRequest(
            compare=[_owns(self.own_key, self.term), _owns(self.twin, self.term)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=kv_key, value=self.node.encode(),
                                                                      lease=self.lease_id))
                     for kv_key in (self.own_key, self.twin)],
        )
        claimed = bool(self._store._txn("claim", request).succeeded)
        if claimed:
            log.debug("etcd: %r claimed %r (term %d)", self.node, self.own_key, self.term)
        return claimed

    def _guard_own_key(self, revision: int) -> None:
        """Tell the candidate at once when its key or its twin disappears (lease revoked, or
        deleted from outside). One watch covers both: the range from the key to its twin."""
        store, failures = self._store, 0
        range_end = self.twin + b"\0"
        while not self._released and self._pid == os.getpid():
            try:
                if revision == 0:
                    response = store._call("check own key", lambda client: client.kvstub.Range(
                        etcdrpc.RangeRequest(key=self.own_key, range_end=range_end, keys_only=True), store.timeout,
                        credentials=client.call_credentials, metadata=client.metadata))
                    if not {self.own_key, self.twin} <= {kv.key for kv in response.kvs}:
                        break
                    revision = response.header.revision
                stream = _WatchStream(store, self.own_key, range_end, revision + 1,
                                      [etcdrpc.WatchCreateRequest.NOPUT])
                try:
                    for response in stream:
                        failures = 0
                        if response.events:  # a deletion (NOPUT: not our claim)
                            self._notify_lost_once()
                            return
                finally:
                    stream.close()
            except (StoreError, InvalidArgumentError) as exc:
                failures += 1
                log.debug("watch on own key %r failed: %s", self.own_key, exc)
                gevent.sleep(min(2.0, 0.05 * 2**failures))
            revision = 0  # the stream ended: check the key again before watching anew
        if not self._released:
            self._notify_lost_once()

    def _notify_lost_once(self) -> None:
        if not self._released and self._pid == os.getpid():
            log.info("etcd: %r lost key %r", self.node, self.own_key)
            self.notify_lost()


class _Candidacy:
    """A candidate's lease and key while it waits, with the greenlet that keeps the lease alive.

    The lease is renewed every ``ttl / 8`` while waiting, so that a win can usually be taken
    on the last renewal (no further round trip) and still leave the candidate most of its
    renew deadline.

    ``older`` maps the lease of every older candidate seen by this ``acquire()`` (its
    candidacies share it) to its create revision, until that lease is known to be gone, or a
    younger candidate that saw it is known to have won (a winner has checked every older
    lease it saw): see the module docstring on keys deleted from outside.
    """

    def __init__(self, store: EtcdStore, key: str, node: str, ttl: float, older: dict[int, int]) -> None:
        self.store = store
        self.older = older
        self.listed: set[int] = set()  # leases of the older candidates this candidacy has listed
        self.key = key
        self.ttl = ttl
        self.prefix = (key + "/").encode()
        self.lease_id = _own_lease_id()  # chosen here: a grant
        self.own_key = self.prefix + f"{self.lease_id:x}".encode()  # cut short leaves no orphan
        self.node = node
        self.pid = os.getpid()
        self.lost = False
        self.term = 0
        self.confirmed_at = 0.0
        self.stream: _WatchStream | None = None
        self._keeper: gevent.Greenlet | None = None

    def start(self) -> tuple[int, list[_Candidate]]:
        """Grant the lease, keep it alive, create the key if absent (learning the term).

        Returns the revision and the (create revision, key, lease) of every candidate, oldest first.
        """
        store, seconds = self.store, max(1, math.ceil(self.ttl))
        attempts = 0

        def grant(client: Any) -> None:
            nonlocal attempts
            attempts += 1
            try:
                client.lease(seconds, lease_id=self.lease_id)
            except etcd_exceptions.PreconditionFailedError:
                if attempts == 1:  # "lease already exists", and not from our own lost attempt
                    raise

        started = now()
        store._call("lease grant", grant)
        self.confirmed_at = started
        self._keeper = gevent.spawn(self._keep_alive)
        txn, range_end = store.transactions, etcd_client.utils.prefix_range_end(self.prefix)
        _, responses = store._call("transaction", lambda client: client.transaction(
            compare=[txn.create(self.own_key) == 0],
            success=[txn.put(self.own_key, self.node, lease=self.lease_id),
                     txn.put(_twin_of(self.own_key), self.node, lease=self.lease_id), txn.get(self.prefix, range_end)],
            failure=[txn.get(self.prefix, range_end)],
        ))
        found = responses[-1]
        mine = [meta for _, meta in found if meta.key == self.own_key]
        if not mine:
            raise StoreError(f"etcd did not keep candidate key {self.own_key!r}")
        self.term = mine[0].create_revision
        log.debug("etcd: %r campaigns with %r (revision %d)", self.node, self.own_key, self.term)
        return mine[0].response_header.revision, sorted(
            (meta.create_revision, meta.key, meta.lease_id) for _, meta in found
            if _is_registration(meta.key, self.prefix))

    def _keep_alive(self) -> None:
        interval = self.ttl / 8
        while True:
            gevent.sleep(interval)
            if self.pid != os.getpid():
                return  # a forked child's copy: the lease is the parent's
            started = now()
            try:
                remaining = self.store._keepalive(self.lease_id)
            except (StoreError, InvalidArgumentError) as exc:
                log.warning("etcd: keepalive of waiting candidate %r failed: %s", self.node, exc)
                self._interrupt()  # its watch may hang on the same dead endpoint
                interval = self.ttl / 16
                continue
            interval = self.ttl / 8
            if remaining <= 0:
                log.info("etcd: the lease of waiting candidate %r expired", self.node)
                self.lost = True
                self._interrupt()
                return
            self.confirmed_at = started

    def _interrupt(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def stop_keepalive(self, block: bool = True) -> None:
        if self._keeper is not None:
            self._keeper.kill(block=block, timeout=1)
            self._keeper = None

    def withdraw(self) -> None:
        """Stop keeping the lease and revoke it, which deletes the key: leaves nothing behind."""
        self.stop_keepalive()
        if self.pid != os.getpid():
            return  # a forked child's copy: the parent withdraws (or wins) on its own
        try:
            self.store._revoke(self.lease_id)
        except (StoreError, InvalidArgumentError) as exc:
            log.warning("etcd: could not revoke lease %x of %r (it expires in %gs): %s",
                        self.lease_id, self.node, self.ttl, exc)

    def wait_turn(self, revision: int, keys: list[_Candidate]) -> _EtcdLease | None:
        """Block until this candidate's key is the oldest; None if the candidacy was lost.

        ``keys`` are the candidates at ``revision``, oldest first, as the transaction that
        created our key read them; after that, each wake-up asks :meth:`_prove` afresh. A win
        also needs every older candidate's lease gone (:meth:`_await_gone`), checked before
        the proof, which stays the last request before a win.
        """
        store, failures = self.store, 0
        snapshot: tuple[int, list[_Candidate]] | None = (revision, keys)
        gone: set[int] = set()  # leases of older candidates whose keys are gone
        while not self.lost:
            try:
                if snapshot is None:
                    if not self._await_gone(gone) or not self._fresh_lease():
                        return None
                    snapshot = self._prove()  # the last request before a win: nothing yields after it
                    if snapshot is None:
                        log.info("etcd: candidate key %r of %r was deleted; campaigning anew", self.own_key, self.node)
                        return None
                revision, keys = snapshot
                snapshot = None
                position = next((i for i, (_, kv_key, _) in enumerate(keys) if kv_key == self.own_key), None)
                if position is None:
                    log.info("etcd: candidate key %r of %r disappeared", self.own_key, self.node)
                    return None
                # Only greenleader candidates (a tagged lease, or a twin) are waited for by
                # lease: one never keeps its lease after its candidacy, while a Go/etcdctl
                # session does. The tag also marks a key whose twin was deleted from outside.
                own = {lease for _, kv_key, lease in keys if kv_key.endswith(_TWIN) or _is_own_lease(lease)}
                self.older.update((lease, created) for created, _, lease in keys[:position] if lease in own)
                self.listed.update(lease for _, _, lease in keys[:position])
                if position == 0:  # the read that says so also showed our key
                    if not self.older:
                        return self._won()
                    gone.update(self.older)  # every older key is gone: are their leases too?
                    continue
                created, predecessor, predecessor_lease = keys[position - 1]
                # Watching from "now" rather than from the snapshot: etcd syncs a watch that
                # starts in the past only every 100 ms, which would delay a handover.
                self.stream = _WatchStream(store, predecessor, None, 0, [etcdrpc.WatchCreateRequest.NOPUT],
                                           prev_kv=True)
                try:
                    if self.stream.revision > revision:  # the predecessor may have gone meanwhile
                        found = store._call("recheck", lambda client, key=predecessor: client.get_response(key))
                        # Gone, or made anew since (a session that resigned and campaigned again
                        # under the same name): either way not the predecessor we listed.
                        if not found.kvs or found.kvs[0].create_revision != created:
                            if predecessor_lease in self.older:
                                gone.add(predecessor_lease)
                            continue
                    for response in self.stream:
                        failures = 0
                        if response.events:  # the predecessor went: prove our turn, or wait on
                            if predecessor_lease in self.older:
                                gone.add(predecessor_lease)
                            if any(event.prev_kv.version >= _CLAIMED for event in response.events):
                                self._forget_checked_by(created)
                            break
                finally:
                    self.stream.close()
                    self.stream = None
            except StoreUnavailableError as exc:
                failures += 1
                if now() > self.confirmed_at + self.ttl:
                    raise StoreUnavailableError(f"lost etcd for longer than the {self.ttl:g}s TTL: {exc}") from exc
                log.warning("etcd: %r waits on, after: %s", self.node, exc)
                gevent.sleep(min(self.ttl / 4, 0.02 * 2**failures))
        return None

    def _forget_checked_by(self, winner: int) -> None:
        """Our predecessor, created at revision ``winner``, had won (it claimed its key): it
        checked the leases of every older candidate it saw, and it saw every one that this
        candidacy listed older than it (they were there before us, and so when it came)."""
        for lease, created in list(self.older.items()):
            if created < winner and lease in self.listed:
                del self.older[lease]

    def _await_gone(self, leases: set[int]) -> bool:
        """Return once etcd has none of ``leases`` (older candidates' whose keys are gone);
        False if our own lease is lost meanwhile.

        A key deleted from outside leaves its lease, and its holder may lead until it hears
        of the deletion and revokes the lease (or the lease expires): wait for that, polling
        with a backoff bounded by what is left of the lease. A released key's lease is gone
        already: one round trip.
        """
        delay = _GONE_POLL[0]
        while leases:
            remaining = self._lease_ttls(sorted(leases))
            for lease, ttl in remaining.items():
                if ttl < 0:
                    leases.discard(lease)
                    self.older.pop(lease, None)
            if not leases:
                break
            if delay == _GONE_POLL[0]:
                log.info("etcd: %r waits for lease(s) %s of older candidates whose keys were deleted: their "
                         "holders may still lead", self.node, ", ".join(f"{lease:x}" for lease in leases))
            if self.lost:
                return False
            gevent.sleep(min(delay, max(_GONE_POLL[0], min(remaining[lease] for lease in leases))))
            delay = min(delay * 2, _GONE_POLL[1])
        return not self.lost

    def _lease_ttls(self, leases: list[int]) -> dict[int, int]:
        """The remaining TTL of each lease (-1: gone), asked at once (at most 32 in flight)."""
        def ask(lease: int) -> int | StoreError | InvalidArgumentError:
            try:
                return self.store._lease_ttl(lease)
            except (StoreError, InvalidArgumentError) as exc:  # raised below, in the caller
                return exc

        pool = gevent.pool.Pool(32)
        try:
            answers = dict(zip(leases, pool.map(ask, leases), strict=True))
        finally:
            pool.kill(block=False)
        for answer in answers.values():
            if isinstance(answer, Exception):
                raise answer
        return answers  # type: ignore[return-value]

    def _prove(self) -> tuple[int, list[_Candidate]] | None:
        """One transaction: is our key still ours, and which candidates are older?

        None when our key is gone (deleted from outside, or expired with the lease): the
        candidacy is lost and must never win. Otherwise the revision and the (create
        revision, key, lease) of every older candidate and of ours, oldest first; ours first
        is a win proven by the same round trip.
        """
        request = etcdrpc.TxnRequest(
            compare=[_owns(self.own_key, self.term), _owns(_twin_of(self.own_key), self.term)],
            success=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=self.prefix, range_end=etcd_client.utils.prefix_range_end(self.prefix),
                keys_only=True, max_create_revision=self.term - 1))],
        )
        response = self.store._txn("prove", request)
        if not response.succeeded:
            return None
        older = sorted((kv.create_revision, kv.key, kv.lease) for kv in response.responses[0].response_range.kvs
                       if _is_registration(kv.key, self.prefix))
        return response.header.revision, [*older, (self.term, self.own_key, self.lease_id)]

    def _fresh_lease(self) -> bool:
        """Renew the lease now if its last renewal is old, so that a win leaves the candidate
        most of its renew deadline; False if the lease is gone."""
        if now() - self.confirmed_at > self.ttl / 6:
            started = now()
            if self.store._keepalive(self.lease_id) <= 0:
                self.lost = True
                return False
            self.confirmed_at = started
        return True

    def _won(self) -> _EtcdLease:
        self.stop_keepalive(block=False)  # not yielding here lets the candidate step up at once
        return _EtcdLease(self.store, self.key, self.node, self.term, self.confirmed_at, self.lease_id, self.own_key)


class EtcdStore(Store):
    """Elections on an etcd v3 cluster, through its gRPC API.

    :param addrs: ``host:port`` client endpoints of one cluster (default ``127.0.0.1:2379``);
        requests go to one of them and fail over to the next on connection errors.
    :param timeout: seconds for each request and for connecting.
    :param user, password: user name and password, when etcd has authentication enabled
        (``password_file``: read the password from that file). Without them, an etcd with
        ``--client-cert-auth`` takes the client certificate's CN as the user name.
    :param tls: connect with TLS (on by default when ``ca_file`` or ``cert_file`` is given).
    :param ca_file: CA bundle that signs the servers' certificates (default: the system's).
    :param cert_file, key_file: client certificate and its key. gRPC always checks the
        server's certificate and that it names the host connected to (``verify=false`` is
        refused). Older names: ``ca_cert``, ``cert_cert``, ``cert_key``.
    """

    backend: ClassVar[str] = "etcd"
    min_ttl: ClassVar[float] = 1.0  # etcd leases have whole seconds; a fraction is rounded up

    def __init__(
        self,
        addrs: list[str] | None = None,
        *,
        timeout: float | str = 5.0,
        user: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
        tls: bool | str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify: bool | str | None = None,
        ca_cert: str | None = None,
        cert_cert: str | None = None,
        cert_key: str | None = None,
    ) -> None:
        if isinstance(addrs, str):
            addrs = [addrs]
        self.addrs = list(addrs) if addrs else [f"127.0.0.1:{DEFAULT_PORT}"]
        self._hosts = list(dict.fromkeys(_parse_addr(addr) for addr in self.addrs))
        self.timeout = check_float("timeout", timeout, minimum=0.0, maximum=3600.0, inclusive=False)
        password = read_secret("password", password, "password_file", password_file)
        if (user is None) != (password is None):
            raise InvalidArgumentError("etcd authentication needs both user and password")
        self.user = check_text("user", user) if user is not None else None
        self._password = password
        if verify is not None and not check_bool("verify", verify):
            raise InvalidArgumentError("the etcd store cannot skip checking the server's certificate "
                                       "(gRPC always checks it): give ca_file instead of verify=false")
        self.tls = tls_options(
            "etcd", tls=tls, verify=verify,
            ca_file=pick("ca_file", ca_file, "ca_cert", ca_cert),
            cert_file=pick("cert_file", cert_file, "cert_cert", cert_cert),
            key_file=pick("key_file", key_file, "cert_key", cert_key),
        )
        self._tls = tuple(_read_file(path) for path in (self.tls.ca_file, self.tls.key_file, self.tls.cert_file))
        self.secure = self.tls.enabled
        if self.user is not None and not self.secure:
            warn_plaintext_secret("etcd", "password", [host for host, _ in self._hosts])
        self._etcd: Any = None
        self._pid = 0
        self._closed = False
        #: Requests sent, by kind: lets tests check that a release wakes only one waiter.
        self.requests: Counter[str] = Counter()
        if _GRPC_PREIMPORTED:
            warnings.warn(
                "grpc was imported before greenleader.stores.etcd, so its epoll poller is in use and "
                "subprocesses may abort; set GRPC_POLL_STRATEGY=poll in the environment",
                RuntimeWarning,
                stacklevel=2,
            )
        if not monkey.is_module_patched("socket"):
            warnings.warn(
                "gevent has not monkey-patched this process: the etcd store's gRPC calls will block "
                "the gevent hub; call gevent.monkey.patch_all() first, before importing anything else "
                "(harmless in a gunicorn --preload master that only makes the store for its workers)",
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        user = f" user={self.user!r}" if self.user else ""
        return f"<EtcdStore addrs={self.addrs!r}{user}{' tls' if self.secure else ''}>"

    # -- connections ------------------------------------------------------------------------

    def _client(self) -> Any:
        """This process's client, made on first use (and anew in a forked child)."""
        client = self._etcd
        if self._closed:
            raise StoreError(f"{self!r} was closed")
        if client is not None and self._pid == os.getpid():
            if all(endpoint.is_failed() for endpoint in client.endpoints.values()):
                for endpoint in client.endpoints.values():
                    endpoint.last_failed = 0  # all failed: try them all again rather than none
            return client
        return self._new_client()

    def _new_client(self) -> Any:
        if self._etcd is not None:
            log.debug("etcd store used in a new process (fork): making a fresh client")
            _inherited_clients.append(self._etcd)
            self._etcd = None
        _init_grpc_gevent()
        options = [
            ("grpc.keepalive_time_ms", _PING_INTERVAL_MS),
            ("grpc.keepalive_timeout_ms", int(self.timeout * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        credentials = self._credentials()
        endpoints = [
            etcd_client.Endpoint(host, port, secure=self.secure, creds=credentials,
                                 time_retry=_ENDPOINT_RETRY, opts=options)
            for host, port in self._hosts
        ]
        client = etcd_client.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=self.timeout, failover=True)
        self._etcd, self._pid = client, os.getpid()
        if self.user is not None:
            try:
                self._authenticate(client)
            except BaseException:
                self._etcd = None
                client.close()
                raise
        return client

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        ca, key, cert = self._tls
        return grpc.ssl_channel_credentials(ca, key, cert)

    def _authenticate(self, client: Any) -> None:
        """Get a token; the library's own way sends it as call credentials, which gRPC refuses
        on a plain-text channel, so it goes in the metadata of every request instead."""
        request = etcdrpc.AuthenticateRequest(name=self.user, password=self._password)
        client.metadata = None
        response = self._call("authenticate", lambda c: c.authstub.Authenticate(request, self.timeout), auth=False)
        client.metadata = (("token", response.token),)
        client.call_credentials = None

    @staticmethod
    def _where(client: Any) -> str:
        try:
            return str(client.endpoint_in_use.netloc)
        except (KeyError, AttributeError):
            return "?"

    def _call(self, what: str, request: Callable[[Any], T], *, auth: bool = True) -> T:
        """Send ``request(client)``; on a connection error retry once on each other endpoint.

        Translates every client-library exception into a greenleader error.
        """
        self.requests[what] += 1
        attempts = len(self._hosts)
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            client = self._client()
            try:
                return request(client)
            except (etcd_exceptions.Etcd3Exception, grpc.RpcError, ValueError) as exc:
                error = _translate(exc, what, self._where(client))
                rpc = _rpc_error(exc)
                if rpc is not None and rpc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    client.endpoint_in_use.fail()  # the library does not for every call
                if isinstance(error, StoreUnavailableError) and attempt < attempts:
                    log.info("%s; trying another endpoint", error)
                    continue
                if (auth and self.user is not None and not reauthenticated
                        and "invalid auth token" in str(error)):
                    reauthenticated = True
                    self._authenticate(client)
                    attempt -= 1
                    continue
                raise error from exc

    @property
    def transactions(self) -> Any:
        return self._client().transactions

    def _txn(self, what: str, request: Any) -> Any:
        """Send a raw ``TxnRequest`` (the client's own builder drops range filters)."""
        return self._call(what, lambda client: client.kvstub.Txn(
            request, self.timeout, credentials=client.call_credentials, metadata=client.metadata))

    def _range_prefix(self, prefix: bytes) -> Any:
        return self._call("range", lambda client: client.get_prefix_response(
            prefix, sort_order="ascend", sort_target="create"))

    def _keepalive(self, lease_id: int) -> int:
        """One keepalive; the lease's remaining TTL (0 if it is gone)."""
        responses = self._call("keepalive", lambda client: list(client.refresh_lease(lease_id)))
        return responses[0].TTL if responses else 0

    def _lease_ttl(self, lease_id: int) -> int:
        """The lease's remaining TTL in whole seconds (it may read 0 while it lives); -1 once
        etcd no longer has it (revoked, or expired and collected)."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = self._call("lease info", lambda client: client.leasestub.LeaseTimeToLive(
            request, self.timeout, credentials=client.call_credentials, metadata=client.metadata))
        return int(response.TTL)

    def _revoke(self, lease_id: int) -> None:
        try:
            self._call("revoke", lambda client: client.revoke_lease(lease_id))
        except StoreError as exc:
            if "lease not found" not in str(exc):
                raise

    def close(self) -> None:
        self._closed = True
        client, self._etcd = self._etcd, None
        if client is not None and self._pid == os.getpid():
            client.close()

    # -- the store contract -----------------------------------------------------------------

    def validate_key(self, key: str) -> str:
        """Also rejects a trailing ``/``: candidates live under ``<key>/``, so ``a/`` would make
        the prefix ``a//``, a different election from ``a`` that looks the same."""
        key = super().validate_key(key)
        if key.endswith("/"):
            raise InvalidKeyError(f"etcd election key {key!r} must not end with '/' "
                                  f"(candidates are kept under '<key>/')")
        try:
            size = len(key.encode())
        except UnicodeEncodeError:  # a lone surrogate: not text etcd could store
            raise InvalidKeyError(f"etcd election key {key!r} is not valid Unicode text") from None
        if size > _MAX_KEY_BYTES:
            raise InvalidKeyError(f"etcd election key is {size} bytes long; the limit is {_MAX_KEY_BYTES}")
        return key

    def acquire(self, key: str, node: str, ttl: float) -> Lease:
        node = check_text("node", node)
        key = self.validate_key(key)
        older: dict[int, int] = {}  # kept across candidacies: a new key must not forget them
        while True:
            candidacy = _Candidacy(self, key, node, ttl, older)
            try:
                lease = candidacy.wait_turn(*candidacy.start())
            except BaseException:
                candidacy.withdraw()
                raise
            if lease is not None:
                log.debug("etcd: %r won %r with term %d", node, key, lease.term)
                return lease
            candidacy.withdraw()  # lost while waiting (expired, deleted): campaign anew

    def leader(self, key: str) -> LeaderInfo | None:
        prefix = (self.validate_key(key) + "/").encode()
        deadline, delay = now() + self.timeout, 0.005
        while True:
            view = _View(prefix, self._range_prefix(prefix).kvs)
            if not view.awaits_claim() or now() >= deadline:
                return view.leader()
            # A winner claims its key one round trip after it learnt it won: wait for that
            # (bounded: the first may be a waiter that is frozen, or lost) rather than report
            # a vacancy. Polled rather than watched: it also runs where gevent has not patched.
            gevent.sleep(min(delay, max(0.0, deadline - now())))
            delay = min(delay * 2, 0.25)

    def watch(self, key: str) -> Iterator[LeaderInfo | None]:
        prefix = (self.validate_key(key) + "/").encode()
        range_end = etcd_client.utils.prefix_range_end(prefix)
        last: object = object()
        failures = 0
        while True:
            response = self._range_prefix(prefix)  # a failure here ends the watch
            view = _View(prefix, response.kvs)
            current = view.leader()
            if current != last:
                last = current
                yield current
            try:
                stream = _WatchStream(self, prefix, range_end, response.header.revision + 1)
                try:
                    for watch_response in stream:
                        failures = 0
                        # All the events of one revision come in one response: a new key
                        # and its twin (one transaction) are seen together.
                        for event in watch_response.events:
                            if event.type == kv_pb2.Event.DELETE:
                                view.delete(event.kv.key)
                            else:  # a new candidate or twin, or a winner's claim
                                view.put(event.kv)
                        current = view.leader()
                        if current != last:
                            last = current
                            yield current
                finally:
                    stream.close()
            except StoreUnavailableError as exc:
                failures += 1
                log.warning("etcd: watch on %r broke, resuming: %s", key, exc)
                gevent.sleep(min(1.0, 0.02 * 2**failures))
