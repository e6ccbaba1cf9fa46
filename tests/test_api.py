"""The public surface: names, store registry, URLs and bad input that needs no server."""

from __future__ import annotations

import pytest

import greenleader
from greenleader import Candidate, Follower
from greenleader.errors import (
    GreenleaderError,
    InvalidArgumentError,
    MissingDependencyError,
    StoppedError,
    UnknownBackendError,
)
from greenleader.stores import from_url, new_store
from greenleader.stores.file import FileStore, default_directory

pytestmark = pytest.mark.timeout(30)


def test_public_names():
    assert {"Candidate", "Follower", "Backoff", "new_store", "from_url", "errors", "events"} <= set(greenleader.__all__)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, GreenleaderError)


@pytest.mark.parametrize("backend", ["nope", "", "Consul2", 5, None, b"file"])
def test_unknown_backends_are_rejected(backend):
    with pytest.raises(UnknownBackendError):
        new_store(backend)


@pytest.mark.parametrize(
    "url",
    [
        "",
        5,
        None,
        "no scheme",
        "127.0.0.1:8500",
        "bogus://127.0.0.1:8500",
        "://127.0.0.1",
        "consul://h1:8500,,h2:8500",
        "consul://h1:8500?lock_delay=1&lock_delay=2",
        "consul://h1:8500?no_such_option=1",
        "file://somehost/dir",
        "memory://a/b",
        "etcd://h1:2379?timeout=soon",
        "zookeeper://h1:2181?timeout=-1",
    ],
)
def test_malformed_urls_are_rejected_with_a_clear_error(url):
    with pytest.raises(InvalidArgumentError) as raised:
        from_url(url)
    assert str(raised.value)


def test_bad_store_arguments_are_rejected(tmp_path):
    with pytest.raises(InvalidArgumentError):
        new_store("file", 42)
    with pytest.raises(InvalidArgumentError):
        new_store("file", [str(tmp_path), str(tmp_path)])
    with pytest.raises(InvalidArgumentError):
        new_store("file", str(tmp_path), colour="blue")
    with pytest.raises(InvalidArgumentError):
        FileStore(directory=tmp_path, poll_interval=0)


@pytest.mark.parametrize("backend", ["memory", "file", "consul", "etcd", "zookeeper", "postgres"])
def test_each_backend_resolves_to_its_class_whether_module_or_package(backend):
    """A store may be one module (stores/file.py) or a package (stores/consul/ with its recipe
    and client): the class comes from its top level either way."""
    from greenleader.stores import BACKENDS, _store_class
    module_name, class_name, _ = BACKENDS[backend]
    cls = _store_class(backend)
    assert cls.__name__ == class_name and cls.backend == backend
    assert cls.__module__.startswith(f"greenleader.stores.{module_name}")


def test_a_broken_store_module_is_not_taken_for_a_missing_dependency(monkeypatch):
    """An ImportError of a third-party client is a missing extra (with the pip command); one
    inside greenleader's own store package is a bug, raised as it is."""
    import greenleader.stores as stores

    def missing(name: str) -> None:
        raise ImportError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(stores.importlib, "import_module", lambda _: missing("consul"))
    with pytest.raises(MissingDependencyError, match=r'"consul" extra \(in a clone: pip install -e "\.\[consul\]"\)'):
        new_store("consul")
    monkeypatch.setattr(stores.importlib, "import_module", lambda _: missing("greenleader.stores.consul.recipe"))
    with pytest.raises(ImportError) as raised:
        new_store("consul")
    assert not isinstance(raised.value, MissingDependencyError)


def test_candidate_and_follower_need_a_store():
    for store in (None, "file:///tmp/x", object()):
        with pytest.raises(InvalidArgumentError):
            Candidate(store, "key", "node")
        with pytest.raises(InvalidArgumentError):
            Follower(store, "key")


def test_retry_must_be_a_bool_or_backoff(tmp_path):
    store = new_store("file", str(tmp_path))
    with pytest.raises(InvalidArgumentError):
        Candidate(store, "key", "node", retry="forever")
    with pytest.raises(InvalidArgumentError):
        greenleader.Backoff(initial=0)


def test_a_stopped_follower_cannot_start_again(tmp_path):
    follower = Follower(new_store("file", str(tmp_path)), "key")
    follower.stop()
    with pytest.raises(StoppedError):
        follower.follow_election()


def test_file_store_defaults_to_the_runtime_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_directory() == tmp_path / "greenleader"
    assert new_store("file").directory == tmp_path / "greenleader"


def test_file_store_encodes_unsafe_keys(tmp_path):
    store = FileStore(directory=tmp_path)
    names = {store.path_for(key).name for key in ("a/b", "a%2Fb", "..", ".", "x" * 500, "x" * 501, "ü/ß")}
    assert len(names) == 7
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) < 255


@pytest.mark.parametrize(
    "url",
    [
        "consul://h:8500?token=s3cret&token=s3cret",
        "consul://user:s3cret@h,,x?token=s3cret",
        "bogus://user:s3cret@h?password=s3cret",
        "nohost?token=s3cret",
        "etcd://h:2379?password=s3cret&timeout=never",
        "postgres://app:s3cret@h:5432/db?password=s3cret",
        "postgres://app:s3cret@h:5432/db?timeout=never",
        "postgres://app:s3cret@h:5432/a/b",
    ],
)
def test_url_errors_never_show_secrets(url):
    with pytest.raises(InvalidArgumentError) as raised:
        from_url(url)
    assert "s3cret" not in str(raised.value)
