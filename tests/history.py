"""Tenure histories of candidate processes, and the checker that finds two leaders at once.

**Recording** (in each candidate process, :class:`Recorder`): one JSON line per fact, appended
to the process's own file with a single ``write(2)`` each, on the host's ``CLOCK_MONOTONIC``
(system-wide on Linux, so all processes share one clock; SIGSTOP does not stop it):

- ``won``: ``acquire`` returned a lease (``t``), with the renew deadline it gives
  (``confirmed_at + renew_deadline``). The candidate steps up after this instant, so the
  recorded start is never later than the real one.
- ``renewed``: a renewal succeeded; the new deadline. Written before the candidate itself
  learns of the renewal, so a process killed at any point has a recorded deadline at least
  as late as the one it went by.
- ``end``: the tenure ended: the earliest of the step-down being published, the release
  starting and the last deadline (``is_leader()`` turns False at the deadline even while the
  hub is blocked or the process is paused).
- ``lead``: a duty's sample: ``candidate.term`` was not None (so ``is_leader()`` was True) at
  an instant between ``t0`` and ``t1``. Taken every 0.1 s by a greenlet, and every few
  milliseconds while a hub-blocking fault runs CPU-bound code.
- ``blocked``: the hub was blocked from ``t0`` to ``t1``.
- ``release``: the candidate sent the release of a won lease; ``leading`` is what
  ``is_leader()`` said then (it must say False: every way out of a tenure steps down before
  it releases, docs/safety.md rule 9).

A forked child of a candidate process (``tests.candidate_process --fork-for``) records into a
file of its own, as process ``<proc>/fork<pid>``: its ``lead`` samples (there must be none,
rule 11), and ``fork-violation`` if its inherited candidate won, renewed or released anything.

**Checking** (in the test, :func:`load` and :func:`check`): a tenure runs from ``won`` to
``end``, or, for a process killed while leading, to its last recorded deadline (or to the
instant it was seen frozen before the kill, if earlier: it ran no code after that). Every bound is
conservative (a tenure is recorded no shorter than it really was), so the checks can only err
towards reporting an overlap. It fails on two tenures that overlap, on a term that does not
increase from one tenure to the next, on a ``lead`` sample outside its own tenure (a
duty told it leads when the history says it did not), on a release sent while the candidate
still said it led, and on a forked child that led or touched the store. It reports, for each
instant a fault healed, how long the key then stayed without a leader.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

__all__ = ["History", "Observation", "Recorder", "Tenure", "Verdict", "check", "load"]

#: Seconds between two samples of ``is_leader()`` by the recording duty.
SAMPLE_INTERVAL = 0.1


# ---------------------------------------------------------------------------------------------
# recording, in the candidate process


class _Open:
    def __init__(self, term: int, deadline: float) -> None:
        self.term = term
        self.deadline = deadline
        self.ended = False


class Recorder:
    """Appends one candidate process's tenures to ``path`` (see the module documentation)."""

    def __init__(self, path: str | os.PathLike[str], proc: str) -> None:
        self.proc = proc
        self.path = Path(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tenures: list[_Open] = []
        self.candidate: Any = None
        self.forked = False
        self.write("start", pid=os.getpid(), t=time.monotonic())

    def become_fork_child(self) -> None:
        """In a forked child: record into a file of its own, as ``<proc>/fork<pid>``; from now
        on a win, renewal or release by the inherited candidate is a ``fork-violation``."""
        pid = os.getpid()
        os.close(self._fd)
        self._fd = os.open(self.path.with_name(f"{self.path.stem}.fork{pid}.jsonl"),
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.proc = f"{self.proc}/fork{pid}"
        self.forked = True
        self.write("start", pid=pid, t=time.monotonic())

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ev": event, "proc": self.proc, **fields}) + "\n"
        os.write(self._fd, line.encode())  # one write(2): whole lines even if we die right after

    def attach(self, candidate: Any, store: Any) -> None:
        """Record ``candidate``'s tenures on ``store`` (wraps this store object's ``acquire``,
        and each lease's ``renew`` and ``release``) and sample ``is_leader()`` meanwhile."""
        import zope.event

        from greenleader.events import LeadershipLost

        self.candidate = candidate
        acquire = store.acquire

        def recorded_acquire(key: str, node: str, ttl: float) -> Any:
            lease = acquire(key, node, ttl)
            won_at = time.monotonic()
            if self.forked:
                self.write("fork-violation", what="won", term=lease.term, t=won_at)
            tenure = _Open(lease.term, lease.confirmed_at + candidate.renew_deadline)
            self._tenures.append(tenure)
            self.write("won", term=lease.term, t=won_at, deadline=tenure.deadline)
            renew, release = lease.renew, lease.release

            def recorded_renew() -> None:
                if self.forked:
                    self.write("fork-violation", what="renewed", term=lease.term, t=time.monotonic())
                renew()
                tenure.deadline = lease.confirmed_at + candidate.renew_deadline
                self.write("renewed", term=lease.term, deadline=tenure.deadline)

            def recorded_release() -> None:
                at = time.monotonic()
                if self.forked:
                    self.write("fork-violation", what="released", term=lease.term, t=at)
                self.write("release", term=lease.term, t=at, leading=candidate.is_leader())
                self._end(tenure, at)
                release()

            lease.renew, lease.release = recorded_renew, recorded_release
            return lease

        def on_event(event: object) -> None:
            if isinstance(event, LeadershipLost) and event.source is candidate:
                for tenure in self._tenures:
                    if tenure.term == event.term:
                        self._end(tenure, time.monotonic())

        store.acquire = recorded_acquire
        zope.event.subscribers.append(on_event)
        gevent.spawn(self._sample_forever)

    def _end(self, tenure: _Open, at: float) -> None:
        if not tenure.ended:
            tenure.ended = True
            self.write("end", term=tenure.term, t=min(at, tenure.deadline))

    def observe(self) -> None:
        """One sample of the duty's view: does the candidate lead, with which term?"""
        t0 = time.monotonic()
        term = self.candidate.term  # None unless is_leader()
        t1 = time.monotonic()
        if term is not None:
            self.write("lead", term=term, t0=t0, t1=t1)

    def blocked(self, t0: float, t1: float) -> None:
        self.write("blocked", t0=t0, t1=t1)

    def _sample_forever(self) -> None:
        while True:
            self.observe()
            gevent.sleep(SAMPLE_INTERVAL)


# ---------------------------------------------------------------------------------------------
# checking, in the test


@dataclass
class Tenure:
    """One win: ``start`` when acquire returned, ``end`` (see the module documentation)."""

    proc: str
    term: int
    start: float
    end: float
    ended: bool  # False: the process died leading; ``end`` is its last recorded deadline

    @property
    def empty(self) -> bool:
        """A win already stale when it came (the candidate never stepped up)."""
        return self.end <= self.start

    def __str__(self) -> str:
        how = "" if self.ended else " (died; last deadline)"
        return f"{self.proc} term {self.term} [{self.start:.3f}, {self.end:.3f}]{how}"


@dataclass
class Observation:
    proc: str
    term: int
    t0: float
    t1: float


@dataclass
class History:
    tenures: list[Tenure] = field(default_factory=list)  # sorted by start
    observations: list[Observation] = field(default_factory=list)
    blocks: list[tuple[str, float, float]] = field(default_factory=list)
    #: (proc, term, t) of each release sent while ``is_leader()`` still said True
    early_releases: list[tuple[str, int, float]] = field(default_factory=list)
    #: (proc, what, t): a forked child's inherited candidate won, renewed or released
    fork_violations: list[tuple[str, str, float]] = field(default_factory=list)
    forks: int = 0  # forked children that recorded a history


def load(paths: Iterable[str | os.PathLike[str]], frozen: dict[str, float] | None = None) -> History:
    """Read the history files of every process. ``frozen``: process -> an instant after which
    it ran no more code (seen stopped before it was killed); a tenure it died in ends then,
    if that comes before its last recorded deadline."""
    frozen = frozen or {}
    history = History()
    for path in paths:
        text = Path(path).read_text()
        open_tenures: dict[int, dict[str, Any]] = {}
        for raw in text.splitlines():
            record = None
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
            if not isinstance(record, dict):
                continue
            event, proc = record.get("ev"), record.get("proc")
            if event == "won":
                open_tenures[record["term"]] = {"proc": proc, "term": record["term"], "start": record["t"],
                                                "deadline": record["deadline"]}
            elif event == "renewed" and record["term"] in open_tenures:
                open_tenures[record["term"]]["deadline"] = record["deadline"]
            elif event == "end" and record["term"] in open_tenures:
                won = open_tenures.pop(record["term"])
                history.tenures.append(Tenure(proc, won["term"], won["start"], record["t"], True))
            elif event == "lead":
                history.observations.append(Observation(proc, record["term"], record["t0"], record["t1"]))
            elif event == "blocked":
                history.blocks.append((proc, record["t0"], record["t1"]))
            elif event == "release" and record.get("leading"):
                history.early_releases.append((proc, record["term"], record["t"]))
            elif event == "fork-violation":
                history.fork_violations.append((proc, record["what"], record["t"]))
            elif event == "start" and "/fork" in str(proc):
                history.forks += 1
        for won in open_tenures.values():
            end = min(won["deadline"], frozen.get(won["proc"], won["deadline"]))
            history.tenures.append(Tenure(won["proc"], won["term"], won["start"], end, False))
    history.tenures.sort(key=lambda tenure: tenure.start)
    return history


@dataclass
class Verdict:
    tenures: list[Tenure]
    overlaps: list[tuple[Tenure, Tenure]]
    term_errors: list[tuple[Tenure, Tenure]]
    stray_observations: list[Observation]
    #: (label, healed at, seconds without a leader after it; None if no leader came by ``until``)
    gaps: list[tuple[str, float, float | None]]
    early_releases: list[tuple[str, int, float]] = field(default_factory=list)
    #: ``lead`` samples taken in forked children (each one a child that believed it led)
    fork_leads: list[Observation] = field(default_factory=list)
    fork_violations: list[tuple[str, str, float]] = field(default_factory=list)
    forks: int = 0

    @property
    def ok(self) -> bool:
        return not (self.overlaps or self.term_errors or self.stray_observations or self.early_releases
                    or self.fork_leads or self.fork_violations)

    @property
    def leadership_changes(self) -> int:
        return len(self.tenures)

    @property
    def longest_gap(self) -> float | None:
        """The longest time without a leader after a heal (None: a heal nobody recovered from)."""
        values = [gap for _, _, gap in self.gaps]
        if any(gap is None for gap in values):
            return None
        return max(values, default=0.0)  # type: ignore[type-var]

    def problems(self) -> str:
        lines = [f"two leaders at once: {a} and {b} (overlap {a.end - b.start:.3f}s)" for a, b in self.overlaps]
        lines += [f"fencing term did not increase: {a} then {b}" for a, b in self.term_errors]
        lines += [f"{o.proc} was told it leads with term {o.term} at [{o.t0:.3f}, {o.t1:.3f}], outside its tenure"
                  for o in self.stray_observations[:20]]
        lines += [f"{proc} released term {term} at {t:.3f} while is_leader() still said True"
                  for proc, term, t in self.early_releases[:20]]
        lines += [f"forked child {o.proc} was told it leads with term {o.term} at {o.t0:.3f}"
                  for o in self.fork_leads[:20]]
        lines += [f"forked child {proc} {what} at {t:.3f}" for proc, what, t in self.fork_violations[:20]]
        return "\n".join(lines)


def check(history: History, heals: Iterable[tuple[str, float]] = (), until: float | None = None) -> Verdict:
    """Judge ``history``; ``heals`` are (label, instant a fault healed) for the gap report, and
    ``until`` the end of the run (a heal with no leader after it by then has gap None)."""
    tenures = [t for t in history.tenures if not t.empty]
    overlaps: list[tuple[Tenure, Tenure]] = []
    latest: Tenure | None = None  # the tenure reaching furthest so far
    for tenure in tenures:
        if latest is not None and tenure.start < latest.end:
            overlaps.append((latest, tenure))
        if latest is None or tenure.end > latest.end:
            latest = tenure
    term_errors = [(a, b) for a, b in itertools.pairwise(tenures) if b.term <= a.term]
    by_proc_term = {(t.proc, t.term): t for t in history.tenures}
    stray = []
    fork_leads = [obs for obs in history.observations if "/fork" in obs.proc]
    for obs in history.observations:
        if "/fork" in obs.proc:
            continue
        tenure = by_proc_term.get((obs.proc, obs.term))
        if tenure is None or not (tenure.start <= obs.t1 and obs.t0 < tenure.end):
            stray.append(obs)
    gaps: list[tuple[str, float, float | None]] = []
    for label, healed in heals:
        if any(t.start <= healed < t.end for t in tenures):
            gaps.append((label, healed, 0.0))
            continue
        after = [t.start for t in tenures if t.start >= healed and (until is None or t.start <= until)]
        gaps.append((label, healed, min(after) - healed if after else None))
    return Verdict(tenures, overlaps, term_errors, stray, gaps, history.early_releases, fork_leads,
                   history.fork_violations, history.forks)


def leader_at(history: History, instant: float) -> Tenure | None:
    """The tenure covering ``instant``, if any."""
    return next((t for t in history.tenures if not t.empty and t.start <= instant < t.end), None)
