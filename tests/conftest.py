"""Shared fixtures. The whole suite runs monkey-patched, as a gunicorn gevent worker does."""

from gevent import monkey

monkey.patch_all()

import itertools  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import zope.event  # noqa: E402

from greenleader.events import LeadershipEvent  # noqa: E402
from greenleader.stores import Store  # noqa: E402
from tests.backends import SERVER_KINDS, STORE_KINDS, BackendEnv, support  # noqa: E402

pytest_plugins = ["tests.server_fixtures", "tests.sharding"]


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Every behavioural test runs once per store backend."""
    return request.param


@pytest.fixture
def backend_env(request: pytest.FixtureRequest, kind: str, tmp_path) -> BackendEnv:
    cluster = request.getfixturevalue(f"{kind}_cluster") if kind in SERVER_KINDS else None
    return BackendEnv(kind=kind, workdir=tmp_path, cluster=cluster)


@pytest.fixture
def backend(kind: str):
    """The backend's support module: FAST_TTL, make_store, force_expire, unreachable_store."""
    return support(kind)


@pytest.fixture
def make_store(backend, backend_env: BackendEnv) -> Iterator[Callable[[], Store]]:
    """Factory of store clients for this test's backend; all are closed afterwards."""
    made: list[Store] = []

    def make() -> Store:
        store = backend.make_store(backend_env)
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        store.close()


@pytest.fixture
def store(make_store) -> Store:
    return make_store()


_counter = itertools.count()


@pytest.fixture
def key() -> str:
    """A key no other test uses."""
    return f"greenleader-test/{uuid.uuid4().hex[:12]}-{next(_counter)}"


@pytest.fixture
def ttl(backend) -> float:
    return backend.FAST_TTL


@pytest.fixture
def stopping() -> Iterator[list]:
    """Candidates and followers to stop at the end of the test, whatever happened."""
    made: list = []
    yield made
    for obj in reversed(made):
        obj.stop()


@pytest.fixture
def events(key: str) -> Iterator[list[LeadershipEvent]]:
    """Every greenleader event about this test's key, in delivery order (late events of earlier
    tests are not)."""
    seen: list[LeadershipEvent] = []

    def record(event: object) -> None:
        if isinstance(event, LeadershipEvent) and event.key == key:
            seen.append(event)

    zope.event.subscribers.append(record)
    yield seen
    zope.event.subscribers.remove(record)


@pytest.fixture(autouse=True)
def _no_greenlet_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let stray greenlets from one test not leak into the next (failures show in logs)."""
    yield
    gevent.sleep(0)


# Hypothesis profiles for the stateful property tests (tests/test_properties.py). "ci" is bounded
# and derandomized (the same examples on every run); "dev", the default outside CI, has the same
# bounds but new random examples each run, and replays saved failures first; "long" is the run to
# do by hand: pytest tests/test_properties.py --hypothesis-profile=long
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

_bounded = dict(max_examples=20, stateful_step_count=25, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, **_bounded)
settings.register_profile("dev", **_bounded)
settings.register_profile("long", max_examples=500, stateful_step_count=50, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")
