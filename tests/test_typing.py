"""Typing of the public API: ``mypy --strict`` on a typed user program, and what it relies on.

tests/typing_samples/public_api.py uses the public API as a user would, with ``assert_type``
on what matters (the ``elected`` queue yields ``bool``, a follower's yields ``str | None``, a
duty reaches its election without an ``Optional``); mypy checks it in strict mode, with
greenleader's own modules followed silently, as for an installed package. The queues' item
types come from gevent's stubs (``types-gevent``, in the test extra).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from greenleader import Candidate
from greenleader.duties import Duties, DutyRunner, current_runner
from greenleader.errors import InvalidArgumentError
from greenleader.stores.memory import MemoryStore
from tests.gunicorn_apps.harness import REPO
from tests.waiting import next_item

SAMPLES = Path(__file__).with_name("typing_samples")

#: mypy settings of a strict user: the untyped third-party libraries are ignored, not greenleader.
CONFIG = """\
[mypy]
strict = True
follow_imports = silent
[mypy-apscheduler.*,celery.*,kombu.*,zope.*,kazoo.*,consul.*,etcd3.*,gunicorn.*,prometheus_client.*,grpc.*]
ignore_missing_imports = True
"""


def mypy(tmp_path: Path, *targets: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mypy.ini"
    config.write_text(CONFIG)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
         *targets], cwd=cwd, capture_output=True, text=True, timeout=300,
    )


#: greenleader's modules that pass mypy --strict themselves (the others are followed silently;
#: their internals have missing generic arguments): add a module here once it passes.
STRICT_MODULES = ["greenleader/duties.py", "greenleader/contrib/apscheduler.py"]


@pytest.mark.timeout(300)
def test_public_api_passes_mypy_strict(tmp_path: Path) -> None:
    result = mypy(tmp_path, str(SAMPLES), *STRICT_MODULES, cwd=REPO)
    assert result.returncode == 0, (
        f"mypy --strict on {SAMPLES.name}/ and {', '.join(STRICT_MODULES)} failed (a queue typed Any means "
        f"types-gevent is missing):\n{result.stdout}{result.stderr}"
    )


@pytest.mark.timeout(300)
def test_editable_install_is_visible_to_mypy(tmp_path: Path) -> None:
    """From another directory, mypy finds the installed greenleader (py.typed) and its types."""
    program = tmp_path / "user.py"
    program.write_text("from greenleader.duties import DutyRunner, current_runner\n"
                       "runner: DutyRunner = current_runner()\n")
    result = mypy(tmp_path, str(program), cwd=tmp_path)
    assert result.returncode == 0, f"mypy does not see the installed greenleader:\n{result.stdout}{result.stderr}"


def test_current_runner_in_duties_and_outside() -> None:
    """current_runner() gives a duty (and the greenlets it spawns) its runner; elsewhere it
    raises InvalidArgumentError."""
    store = MemoryStore()
    registry = Duties()
    seen: gevent.queue.Queue[object] = gevent.queue.Queue()

    @registry
    def record(term: int) -> None:
        runner = current_runner()
        seen.put((runner, runner.leads(term)))
        seen.put(gevent.spawn(current_runner).get())
        gevent.sleep(60)

    candidate = Candidate(store, "typing", "one", ttl=1.0)
    runner = registry.run(candidate)
    try:
        assert next_item(seen, 10, "the duty's runner") == (runner, True)
        assert next_item(seen, 10, "the runner in a greenlet the duty spawned") is runner
        with pytest.raises(InvalidArgumentError, match="duty"):
            current_runner()
        with pytest.raises(InvalidArgumentError, match="duty"):
            gevent.spawn(current_runner).get()
        assert isinstance(runner, DutyRunner)
    finally:
        runner.stop()
        store.close()
