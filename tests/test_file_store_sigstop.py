"""File store: a SIGSTOPped holder keeps the key until something kills it (docs/safety.md,
"Limits that remain"; the README's guarantees say the same).

The kernel drops a ``flock`` only when its holder process dies, and a stopped process is alive,
so no other candidate wins however long the holder stays stopped (the network stores hand the
key on after the TTL instead). Once the holder is killed, a waiter wins within a poll.
"""

from __future__ import annotations

import time
from pathlib import Path

import gevent
import pytest

from tests import faults
from tests.backends import BackendEnv, support
from tests.candidate_process import FAILOVER_MARGIN, ProcessGroup, process_url

#: Seconds for freshly started processes to import and campaign.
STARTUP = 30.0
#: How long the holder stays stopped, in TTLs: a network store would have handed the key on
#: after one (two on Consul).
STOPPED_TTLS = 4

pytestmark = pytest.mark.timeout(120)


def test_a_sigstopped_holder_keeps_the_key_until_it_is_killed(key: str, tmp_path: Path) -> None:
    ttl = support("file").FAST_TTL
    url = process_url(BackendEnv(kind="file", workdir=tmp_path))
    with ProcessGroup(url, key, ttl, tmp_path / "procs") as group:
        holder = group.start("holder")
        first = group.wait_elected(STARTUP)
        assert first.proc == "holder", group.report()
        waiter = group.start("waiter")
        group.wait_for("the waiter to campaign", lambda: waiter.events("campaigning"), STARTUP)

        faults.pause(holder.popen.pid)
        stopped_at = time.monotonic()
        # The claim is an absence over a stretch of time: that stretch has to pass.
        gevent.sleep(STOPPED_TTLS * ttl)
        won = [line for line in waiter.events("elected") if line.t > stopped_at]
        assert not won, f"the waiter won while the holder was stopped (a file-store lock held)\n{group.report()}"

        killed_at = holder.kill()
        successor = group.wait_elected(FAILOVER_MARGIN + 10, after=killed_at, exclude=("holder",))
        assert successor.proc == "waiter", group.report()
        assert holder.wait_exit(10) < 0
        group.check_history()
