"""Per-backend test support: how the contract tests make, break and expire each store.

Each backend module (``tests/support_<kind>.py`` for the real stores) provides:

- ``FAST_TTL``: the smallest TTL the contract tests use there;
- ``make_store(env)``: a new store client (as another process would have);
- ``force_expire(store, key)``: make the store drop the holder of ``key`` out of band,
  as if its TTL ran out (deleting the session, lease or node);
- ``unreachable_store(env)``: a store whose server does not answer; creating it may
  raise StoreUnavailableError, else its operations must.

``env`` is a :class:`BackendEnv`: the kind, a scratch directory and, for a real store,
its running cluster.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from greenleader.stores import Store
from greenleader.stores.file import FileStore
from greenleader.stores.memory import MemoryStore

KINDS = ["memory", "file", "consul", "etcd", "zookeeper"]
REAL_KINDS = ["consul", "etcd", "zookeeper"]
#: The stores every behavioural test (the ``kind`` fixture) runs on: KINDS and the stores that
#: have joined that fixture before every suite that lists KINDS or REAL_KINDS itself (status,
#: gunicorn) has cases for them. Appended, so the test ids of the other stores do not change.
STORE_KINDS = [*KINDS, "postgres"]
#: Stores whose tests need a running server (the ``<kind>_cluster`` fixture); the suites with
#: per-store cases that PostgreSQL has joined (external deletion, recovery, processes) list these.
SERVER_KINDS = [*REAL_KINDS, "postgres"]


@dataclass
class BackendEnv:
    kind: str
    workdir: Path
    cluster: Any = None  # tests.servers.Cluster for a real store
    shared: Any = None  # state a backend keeps per test (the memory store itself)


class _Memory:
    FAST_TTL = 1.0

    @staticmethod
    def make_store(env: BackendEnv) -> Store:
        if env.shared is None:
            env.shared = MemoryStore()
        return env.shared

    @staticmethod
    def force_expire(store: MemoryStore, key: str) -> None:
        assert store.expire(key), f"nobody held {key!r}"

    @staticmethod
    def unreachable_store(env: BackendEnv) -> Store:
        store = MemoryStore()
        store.fail()
        return store


class _File:
    FAST_TTL = 1.0

    @staticmethod
    def make_store(env: BackendEnv) -> Store:
        return FileStore(directory=env.workdir / "elections", poll_interval=0.01)

    @staticmethod
    def force_expire(store: FileStore, key: str) -> None:
        os.unlink(store.path_for(key))

    @staticmethod
    def unreachable_store(env: BackendEnv) -> Store:
        directory = env.workdir / "broken"
        store = FileStore(directory=directory)
        shutil.rmtree(directory)
        directory.write_text("not a directory")  # every open() below it now fails with ENOTDIR
        return store


def support(kind: str) -> Any:
    """The support module (or class) for ``kind``."""
    if kind == "memory":
        return _Memory
    if kind == "file":
        return _File
    module: ModuleType = importlib.import_module(f"tests.support_{kind}")
    return module
