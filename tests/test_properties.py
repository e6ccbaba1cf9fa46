"""The election contract, checked on random sequences of events (Hypothesis stateful testing).

A :class:`~hypothesis.stateful.RuleBasedStateMachine` runs 2-4 Candidates (each with its duties,
run by ``greenleader.duties.Duties().run``) and 1-2 Followers on one key of a memory store or of
a file store, each through a :class:`greenleader.testing.FaultyStore` of its own. Its rules are
the things that happen to a real fleet, in any order: start, resign, stop, a killed campaign
greenlet, a hub blocked past the renew deadline, a fork, the key expiring, the lock file deleted
or replaced from outside, any store primitive raising any exception (the store's own errors,
``OSError``, ``RuntimeError``, ``GreenletExit``) or being slow, and time passing.

What must hold (docs/safety.md, "The contract"), checked after every step and by a sampler greenlet
every millisecond in between:

- never two Candidates with ``is_leader()`` True at once (rule 1);
- a duty runs only inside its tenure: it starts while its candidate leads with its term, and no
  other candidate leads or runs a duty while it runs;
- step down before you let go (rule 9): when the lease's ``release()`` is entered, the candidate
  says it does not lead, its duties are dead, False was put on ``elected`` and its
  ``LeadershipLost`` was handed to the event publisher; and no release is killed half-way;
- terms strictly increase across wins (rule 2); a follower names only a node that has won;
- ``is_leader()`` is False right after the hub was blocked past the deadline, and after stop();
- a follower that the store has not answered for longer than its ``unknown_after`` (the
  candidates' renew deadline) does not claim to know who leads, and soon says so with ``None``
  on its queue (rule 12);
- a campaign reports only the errors it was given (never, say, an AttributeError of its own);
- ``stop()`` returns within ``2 x ttl + 5 s`` (rule 6);
- a forked child inherits no leadership: its Candidates say they do not lead and nothing in it
  calls the store (rule 11);
- teardown leaks nothing: no greenlet, no lease left in the store, no file descriptor (rule 6).

When this finds a failure, Hypothesis prints the shortest sequence of steps it found; each such
example is also kept as a plain test in tests/test_property_regressions.py.

Profiles (tests/conftest.py): "ci" when CI is set (20 examples of 25 steps per store,
derandomized: about 2 minutes on 2 busy cores while nothing fails; a failure is shrunk for up to
5 minutes more), "dev" otherwise (the same bounds, new random examples each run, failures saved
in .hypothesis/ and replayed first). The long run, outside CI, after any change to
candidate.py, follower.py, duties.py or a store (500 examples of 50 steps per store, about
1.5 hours on 2 cores):

    python3 -m pytest tests/test_properties.py --hypothesis-profile=long -p no:randomly -q

The memory store's ``expire()`` hands a held key to a waiter before the holder can know, as a
server's deletion of a held key would: that holder's tenure is exempt from the overlap checks
(it must still step down within a TTL). The file store gets no such exemption.

These tests reach into a few private attributes, only to observe (named where they are used):
``Candidate._greenlet`` (to kill it, as a user's ``gevent.killall`` would), and the instant a
candidate hands an event to its publisher or an item to its ``elected`` queue.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass

import gevent
import greenlet
import pytest
from gevent import GreenletExit, monkey
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from greenleader import Backoff, Candidate, Follower
from greenleader.duties import Duties, DutyRunner
from greenleader.errors import (
    InvalidArgumentError,
    LeadershipLostError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
)
from greenleader.events import ElectionError, LeadershipAcquired, LeadershipEvent, LeadershipLost
from greenleader.stores.base import LeaderInfo, Store, now
from greenleader.stores.file import FileStore
from greenleader.stores.memory import MemoryStore
from greenleader.testing import Call, FaultyStore

# Generous: a failure is shrunk for up to 5 minutes; the long profile has no limit.
pytestmark = pytest.mark.timeout(0 if settings().max_examples > 100 else 900)

#: The OS's own sleep: blocks the whole hub, as CPU-bound code would.
blocking_sleep = monkey.get_original("time", "sleep")

TTLS = (0.6, 0.8, 1.0)
RETRY = Backoff(initial=0.02, maximum=0.2)
SAMPLE_EVERY = 0.001
#: Every exception class a store primitive may raise, by name (names shrink and print well).
ERRORS = {
    "StoreUnavailableError": lambda: StoreUnavailableError("injected: store unavailable"),
    "LeadershipLostError": lambda: LeadershipLostError("injected: leadership lost"),
    "InvalidArgumentError": lambda: InvalidArgumentError("injected: invalid argument"),
    "PermissionDeniedError": lambda: PermissionDeniedError("injected: permission denied"),
    "OSError": lambda: OSError(errno.EIO, "injected I/O error"),
    "RuntimeError": lambda: RuntimeError("injected: unexpected error"),
    "GreenletExit": lambda: GreenletExit(),
}
SEAT = st.integers(0, 3)  # taken modulo the seats that the rule applies to


def stop_bound(ttl: float) -> float:
    return 2 * ttl + 5


@dataclass
class DutyRun:
    """One run of a contender's duty in tenure ``term``."""

    contender: Contender
    term: int
    started: float
    ended: float | None = None


class Contender:
    """A Candidate with its duties, on a FaultyStore of its own, and what it did when."""

    def __init__(self, machine: ElectionMachine, node: str, retry: bool) -> None:
        self.machine = machine
        self.node = node
        self.store = FaultyStore(machine.inner, on_call=self._store_called)
        self.candidate = Candidate(
            self.store, machine.key, node, ttl=machine.ttl, retry=RETRY if retry else None, resign_holdoff=0.05
        )
        self.runner: DutyRunner | None = None
        self.stopped = False
        self.duty_runs: list[DutyRun] = []
        self.published: list[tuple[float, LeadershipEvent]] = []  # handed to the publisher
        self.elected: list[tuple[float, bool]] = []  # put on the elected queue

    def __repr__(self) -> str:
        return self.node

    def start(self) -> None:
        # Observation only: record the instant each event is handed to the publisher greenlet.
        publisher = self.candidate._publisher
        publish = publisher.publish

        def recording_publish(event: LeadershipEvent) -> object:
            self.published.append((now(), event))
            return publish(event)

        publisher.publish = recording_publish  # type: ignore[method-assign]
        duties = Duties()
        duties.register(self._duty, name=f"duty of {self.node}")
        self.runner = duties.run(self.candidate)
        # Observation only: record each item put on the elected queue (made by run_for_election).
        channels = self.candidate._channels
        assert channels is not None
        put = channels.put

        def recording_put(item: object) -> None:
            self.elected.append((now(), item))  # type: ignore[arg-type]
            put(item)

        channels.put = recording_put  # type: ignore[method-assign]

    @property
    def campaigning(self) -> bool:
        greenlet_ = self.candidate._greenlet
        return not self.stopped and greenlet_ is not None and not greenlet_.dead

    def live_duties(self) -> list[DutyRun]:
        return [run for run in self.duty_runs if run.ended is None]

    def published_term(self, kind: type, term: int | None) -> bool:
        return any(isinstance(event, kind) and event.term == term for _, event in self.published)

    def _duty(self, term: int) -> None:
        run = DutyRun(self, term, started=now())
        self.duty_runs.append(run)
        self.machine.duty_started(run)
        try:
            gevent.sleep(3600)  # the duty's work; it ends only when killed
        finally:
            run.ended = now()

    def _store_called(self, call: Call) -> None:
        if call.primitive == "release":
            self.machine.release_entered(self, call)


class Watcher:
    """A Follower on a FaultyStore of its own, and a greenlet that reads what it reports.

    ``unknown_after`` is the candidates' renew deadline, as the Follower's docs advise.
    """

    def __init__(self, machine: ElectionMachine, name: str, retry: bool) -> None:
        self.name = name
        self.store = FaultyStore(machine.inner)
        self.follower = Follower(
            self.store, machine.key, retry=RETRY if retry else None, unknown_after=machine.ttl * 2 / 3
        )
        self._answered = now()
        self._seen = 0
        self._running: list[Call] = []
        self.following = True  # until its leaders queue ends
        self.flagged = False  # reported once as claiming to know without an answer
        self.reported: str | None = None  # the last leader it put on its queue
        self.unknown_since: tuple[float, int] | None = None  # (when, sampler count) known turned False
        self.stopped = False
        leaders, _ = self.follower.follow_election()
        self.reader = gevent.spawn(self._read, machine, leaders)

    def __repr__(self) -> str:
        return self.name

    def _read(self, machine: ElectionMachine, leaders: object) -> None:
        try:
            for node in leaders:  # type: ignore[attr-defined]
                self.reported = node
                machine.follower_reported(self, node)
        finally:
            self.following = False

    def last_answer(self) -> float:
        """When the store last answered this follower (a watch value or a leader read).

        Called every millisecond: it looks only at the calls made or still running since the
        previous look (a watch step can wait long and answer after many reads).
        """
        new = len(self.store.history) - self._seen
        self._seen = len(self.store.history)
        self._running.extend(reversed(list(itertools.islice(reversed(self.store.history), new))))
        for call in self._running:
            if call.ended is not None and call.outcome == "returned":
                self._answered = max(self._answered, call.ended)
        self._running = [call for call in self._running if call.ended is None]
        return self._answered


class ElectionMachine(RuleBasedStateMachine):
    """Candidates and Followers on one key, driven at random; see the module docstring."""

    kind = ""  # "memory" or "file", set by the subclasses

    def __init__(self) -> None:
        super().__init__()
        _warm_up_fork()
        self.fds_before = _open_fds()
        self.greenlets_before = _live_greenlets()
        self.key = f"properties/{uuid.uuid4().hex[:12]}"
        self.directory = tempfile.mkdtemp(prefix="greenleader-properties-") if self.kind == "file" else None
        self.inner: Store = FileStore(directory=self.directory) if self.kind == "file" else MemoryStore()
        self.ttl = TTLS[0]
        self.seats: list[Contender] = []
        self.contenders: list[Contender] = []  # every one ever made, for the checks
        self.watchers: list[Watcher] = []
        self.names = itertools.count(1)
        self.violations: list[str] = []
        self.injected: list[BaseException] = []  # every exception a rule made a primitive raise
        #: (node, term) whose key a rule took away: (when, sampler count then)
        self.forced_out: dict[tuple[str, int], tuple[float, int]] = {}
        self.overlap_since: float | None = None
        self.started_at = now()
        self.sampler: gevent.Greenlet | None = None
        self.samples = 0
        self.failed = False

    # -- setting up --------------------------------------------------------------------

    @initialize(
        candidates=st.lists(st.booleans(), min_size=2, max_size=4),
        followers=st.lists(st.booleans(), min_size=1, max_size=2),
        ttl=st.sampled_from(TTLS),
    )
    def setup(self, candidates: list[bool], followers: list[bool], ttl: float) -> None:
        """``candidates``/``followers``: one each per item, retrying on store errors if True."""
        self.ttl = ttl
        for seat, retry in enumerate(candidates):
            self.seats.append(self._new_contender(seat, retry))
        for retry in followers:
            self.watchers.append(Watcher(self, f"f{next(self.names)}", retry))
        self.sampler = gevent.spawn(self._sample_forever)

    def _new_contender(self, seat: int, retry: bool) -> Contender:
        contender = Contender(self, f"c{seat}.{next(self.names)}", retry)
        self.contenders.append(contender)
        contender.start()
        return contender

    # -- rules -------------------------------------------------------------------------

    # Every rule can run at every step, whatever the timing did: Hypothesis needs the same
    # draws to lead to the same steps when it replays and shrinks an example.

    @rule(seconds=st.sampled_from([0.001, 0.02, 0.1, 0.3, 0.6]))
    def allow_time_to_pass(self, seconds: float) -> None:
        """Named to sort first: Hypothesis shrinks toward the first rule by name, so the steps
        that do not matter to a failure shrink to this harmless one."""
        gevent.sleep(seconds)

    def _seat(self, seat: int) -> Contender:
        return self.seats[seat % len(self.seats)]

    @rule(seat=SEAT, retry=st.booleans())
    def start(self, seat: int, retry: bool) -> None:
        """A new Candidate in the seat, if the campaign there has ended (stopped, killed, failed)."""
        index = seat % len(self.seats)
        if not self.seats[index].campaigning:
            self.stop_and_check(self.seats[index], via_runner=True)  # whatever remains of the old one
            self.seats[index] = self._new_contender(index, retry)

    @rule(seat=SEAT, via_runner=st.booleans())
    def resign(self, seat: int, via_runner: bool) -> None:
        contender = self._seat(seat)
        if via_runner:
            contender.runner.resign()  # type: ignore[union-attr]
        else:
            contender.candidate.resign()

    @rule(seat=SEAT, via_runner=st.booleans())
    def stop(self, seat: int, via_runner: bool) -> None:
        self.stop_and_check(self._seat(seat), via_runner)

    @rule(seat=SEAT)
    def kill_campaign(self, seat: int) -> None:
        """Kill the campaign greenlet, as ``gevent.killall`` of the app's greenlets would."""
        greenlet_ = self._seat(seat).candidate._greenlet
        if greenlet_ is not None:
            greenlet_.kill(block=True, timeout=stop_bound(self.ttl))

    @rule(extra=st.sampled_from([0.05, 0.3]))
    def block_hub(self, extra: float) -> None:
        """Block the hub past every renew deadline (CPU-bound code that never yields)."""
        leaders = [c for c in self.contenders if c.candidate.is_leader()]
        blocking_sleep(max(c.candidate.renew_deadline for c in self.contenders) + extra)
        for contender in leaders:  # before any greenlet could run
            if contender.candidate.is_leader():
                self.violation(f"{contender} says it leads after the hub was blocked past its renew deadline")

    @rule()
    def fork(self) -> None:
        """Fork; the child checks that what it inherited neither leads nor calls the store."""
        seconds = self.ttl  # longer than a renew deadline, several renew intervals
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            report = "the child's check crashed"
            try:
                os.close(read_end)
                report = self._inherited_activity(seconds)
            finally:
                try:
                    os.write(write_end, report[:4000].encode())
                finally:
                    os._exit(0)
        os.close(write_end)
        try:
            with gevent.Timeout(seconds + 30, AssertionError("the forked child did not report in time")):
                os.waitpid(pid, 0)
                pid = 0
            report = os.read(read_end, 8192).decode()
        finally:
            os.close(read_end)
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        if report:
            self.violation(f"in a forked child: {report}")

    @rule()
    def expire_key(self) -> None:
        """The key is taken away from outside: dropped by the memory store, or its lock file
        deleted (file).

        The memory store hands the key to a waiter in the same call, before the holder can
        know: no client can avoid that overlap (it is a server's deletion of a held key), so
        the holder's tenure is exempt from the overlap checks; it must still step down within
        a TTL. The file store must make the overlap impossible (finding 5 of the issue-10 table in docs/safety.md).
        """
        if isinstance(self.inner, MemoryStore):
            holder = self.inner.leader(self.key)
            if holder is not None:
                self.forced_out[(holder.node, holder.term)] = (now(), self.samples)
            self.inner.expire(self.key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.inner.path_for(self.key))  # type: ignore[attr-defined]

    @precondition(lambda self: self.kind == "file")
    @rule(content=st.sampled_from(["", '{"term": 1, "node": "restored"}\n']))
    def replace_lock_file(self, content: str) -> None:
        """Someone replaces the lock file (restored from a backup, rewritten by a tool)."""
        path = self.inner.path_for(self.key)  # type: ignore[attr-defined]
        fresh = f"{path}.new"
        with open(fresh, "w") as file:
            file.write(content)
        os.replace(fresh, path)

    @rule(
        seat=SEAT,
        primitive=st.sampled_from(["acquire", "renew", "release"]),
        error=st.sampled_from(sorted(ERRORS)),
        after=st.booleans(),
        times=st.integers(1, 3),
    )
    def fail_candidate_call(self, seat: int, primitive: str, error: str, after: bool, times: int) -> None:
        """Make a candidate's next calls of a primitive raise: before reaching the store, or
        ``after`` it did the work (a lost reply)."""
        if primitive == "acquire":
            after = False  # a won but unreported lease would stay held until its TTL: not a fault to test
        if primitive == "release" and self.kind == "file":
            after = True  # a file lease's release cannot fail before closing its descriptor
        self._seat(seat).store.fail_next(primitive, self.inject(error), times=times, after=after)

    @rule(
        seat=SEAT,
        primitive=st.sampled_from(["acquire", "renew", "release"]),
        seconds=st.sampled_from([0.05, 0.2, 0.5]),
    )
    def slow_candidate_call(self, seat: int, primitive: str, seconds: float) -> None:
        """Make a candidate's next call of a primitive take longer (a slow round trip)."""
        self._seat(seat).store.delay_next(primitive, seconds)

    @rule(
        index=st.integers(0, 1),
        primitive=st.sampled_from(["watch", "leader"]),
        error=st.sampled_from(sorted(ERRORS)),
        after=st.booleans(),
        times=st.integers(1, 3),
    )
    def fail_follower_call(self, index: int, primitive: str, error: str, after: bool, times: int) -> None:
        """Make a follower's next watch steps or leader reads (its checks of a quiet watch) raise."""
        store = self.watchers[index % len(self.watchers)].store
        store.fail_next(primitive, self.inject(error), times=times, after=after)

    def inject(self, name: str) -> BaseException:
        self.injected.append(ERRORS[name]())
        return self.injected[-1]

    @rule(index=st.integers(0, 1), retry=st.booleans())
    def restart_follower(self, index: int, retry: bool) -> None:
        index %= len(self.watchers)
        self.stop_watcher(self.watchers[index])
        self.watchers[index] = Watcher(self, f"f{next(self.names)}", retry)


    # -- invariants --------------------------------------------------------------------

    @invariant()
    def contract_holds(self) -> None:
        self.sample()
        self.check_history()
        if self.violations:
            self.failed = True
            shown = "\n  ".join(self.violations[:10])
            raise AssertionError(f"{len(self.violations)} violations of the contract:\n  {shown}")

    def violation(self, message: str) -> None:
        self.violations.append(f"at {now() - self.started_at:.3f}s: {message}")

    def _sample_forever(self) -> None:
        while True:
            self.sample()
            self.samples += 1
            gevent.sleep(SAMPLE_EVERY)

    def sample(self) -> None:
        """The checks that hold at every instant."""
        leaders = [
            c for c in self.contenders
            if c.candidate.is_leader() and (c.node, c.candidate.term) not in self.forced_out
        ]
        if len(leaders) > 1:
            if self.overlap_since is None:
                self.overlap_since = now()
                self.violation(f"two leaders at once: {leaders}")
        elif self.overlap_since is not None:
            self.violation(f"the two leaders overlapped for {(now() - self.overlap_since) * 1000:.0f} ms")
            self.overlap_since = None
        running = {
            run.contender for c in self.contenders for run in c.live_duties()
            if (c.node, run.term) not in self.forced_out
        }
        if len(running) > 1:
            self.violation(f"duties of {sorted(running, key=str)} run at once")
        if leaders and running - {leaders[0]}:
            self.violation(f"a duty of {sorted(running - {leaders[0]}, key=str)} runs while {leaders[0]} leads")
        for (node, term), (at, samples) in self.forced_out.items():
            if now() - at > self.ttl and self.samples - samples > 50:  # a TTL while the hub ran
                contender = next(c for c in self.contenders if c.node == node)
                if contender.candidate.term == term or any(run.term == term for run in contender.live_duties()):
                    self.violation_once(f"{node} still leads or runs duties in term {term}, over a TTL "
                                        f"after the store dropped its key")
        for watcher in self.watchers:
            self.check_follower(watcher)

    def check_follower(self, watcher: Watcher) -> None:
        """Rule 12: without an answer from the store, a follower does not claim to know who
        leads (``known`` False), and says so on its queue (``None``) soon after."""
        if not watcher.following or watcher.stopped or watcher.flagged:
            return
        known = watcher.follower.known
        quiet = now() - watcher.last_answer()
        if known and quiet > watcher.follower.unknown_after + 0.05:
            watcher.flagged = True
            self.violation(f"{watcher} still claims to know who leads, {quiet:.2f}s after the store last "
                           f"answered it (unknown_after={watcher.follower.unknown_after:g}s)")
        # "Soon": 0.5 s during which the hub ran (the sampler took 50 samples), not a blocked hub.
        if known:
            watcher.unknown_since = None
        elif watcher.unknown_since is None:
            watcher.unknown_since = (now(), self.samples)
        elif (now() - watcher.unknown_since[0] > 0.5 and self.samples - watcher.unknown_since[1] > 50
              and watcher.reported is not None):
            watcher.flagged = True
            self.violation(f"{watcher} has not known who leads for 0.5s but its queue still says {watcher.reported}")

    def duty_started(self, run: DutyRun) -> None:
        contender, candidate = run.contender, run.contender.candidate
        if not (candidate.is_leader() and candidate.term == run.term):
            self.violation(f"a duty of {contender} started for term {run.term}, which it does not lead")
        if not contender.published_term(LeadershipAcquired, run.term):
            self.violation(f"a duty of {contender} started before LeadershipAcquired(term {run.term})")
        others = [
            c for c in self.contenders
            if c is not contender and (c.node, c.candidate.term) not in self.forced_out
            and (c.candidate.is_leader() or any((c.node, r.term) not in self.forced_out for r in c.live_duties()))
        ]
        if others:
            self.violation(f"a duty of {contender} started while {others} still lead or run duties")

    def release_entered(self, contender: Contender, call: Call) -> None:
        """Rule 9: at the release request, the tenure has fully ended."""
        late = []
        if contender.candidate.is_leader():
            late.append("is_leader() is still True")
        if any(run.term == call.term for run in contender.live_duties()):
            late.append("its duty still runs")
        if contender.published_term(LeadershipAcquired, call.term):  # the lease began a tenure
            if not contender.elected or contender.elected[-1][1] is not False:
                late.append("False is not yet on elected")
            if not contender.published_term(LeadershipLost, call.term):
                late.append("LeadershipLost is not yet published")
        if late:
            self.violation(f"{contender} released term {call.term} before stepping down: {', '.join(late)}")

    def follower_reported(self, watcher: Watcher, node: str | None) -> None:
        """Rule 10, as far as this process can see: a follower names only a node that has won."""
        if node is None:
            return
        won = any(
            call.primitive == "acquire" and call.outcome == "returned"
            for c in self.contenders if c.node == node for call in c.store.history
        )
        if not won:
            self.violation(f"{watcher} named {node}, which has not won")

    def violation_once(self, message: str) -> None:
        if not any(seen.endswith(message) for seen in self.violations):
            self.violation(message)

    def explained(self, error: BaseException) -> bool:
        """True if ``error`` comes from an injected exception, or is greenleader's own StoreError
        (a timed-out call): not from a bug such as an AttributeError."""
        chain = [error, error.__cause__, error.__context__]
        if any(any(seen is injected for injected in self.injected) for seen in chain):
            return True
        return isinstance(error, StoreError) and error.__cause__ is None

    def check_history(self) -> None:
        """Terms strictly increase across wins; no release was killed half-way; a campaign
        reports only the errors it was given."""
        wins = sorted(
            ((at, event.term, contender)
             for contender in self.contenders
             for at, event in contender.published
             if isinstance(event, LeadershipAcquired)),
            key=lambda win: win[0],
        )
        for (_, before, who_before), (_, after, who) in itertools.pairwise(wins):
            if after <= before:
                self.violation_once(f"term {after} of {who} does not increase on term {before} of {who_before}")
        for contender in self.contenders:
            for call in contender.store.history:
                if call.primitive == "release" and isinstance(call.error, GreenletExit) and call.outcome != "injected":
                    self.violation_once(f"the release of term {call.term} by {contender} was killed half-way")
            for _, event in contender.published:
                if isinstance(event, ElectionError) and not self.explained(event.error):
                    self.violation_once(
                        f"{contender} reported an error nobody injected: {event.error!r}, "
                        f"caused by {event.error.__cause__!r}"
                    )

    # -- stopping and teardown ------------------------------------------------------------

    def stop_and_check(self, contender: Contender, via_runner: bool) -> None:
        """Stop ``contender`` (its DutyRunner, or the Candidate itself); check rule 6's bound."""
        started = now()
        try:
            with gevent.Timeout(stop_bound(self.ttl) * 2):
                if via_runner and contender.runner is not None:
                    contender.runner.stop()
                else:
                    contender.candidate.stop()
        except gevent.Timeout:
            self.violation(f"{contender}.stop() hung (over {stop_bound(self.ttl) * 2:g}s)")
        took = now() - started
        contender.stopped = True
        if took > stop_bound(self.ttl):
            self.violation(f"{contender}.stop() took {took:.1f}s, over the bound of {stop_bound(self.ttl):g}s")
        if contender.candidate.is_leader():
            self.violation(f"{contender} still says it leads after stop()")

    def stop_watcher(self, watcher: Watcher) -> None:
        started = now()
        watcher.stopped = True  # first: a stopping follower says it knows (it reads the store then)
        watcher.follower.stop()
        if now() - started > stop_bound(self.ttl):
            self.violation(f"{watcher}.stop() took {now() - started:.1f}s")

    def teardown(self) -> None:
        try:
            for contender in self.contenders:
                self.stop_and_check(contender, via_runner=True)
            for watcher in self.watchers:
                self.stop_watcher(watcher)
            if self.sampler is not None:
                self.sampler.kill()
            if not self.failed and self.contenders:
                self.contract_holds()
                self.check_nothing_left()
                self.contract_holds()
        finally:
            if self.sampler is not None:
                self.sampler.kill()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def check_nothing_left(self) -> None:
        """No lease in the store, no greenlet alive, no descriptor open that the example made."""
        granted: set[tuple[str, int]] = set()
        released: set[tuple[str, int]] = set()
        failed_releases = False
        for contender in self.contenders:
            for call in contender.store.history:
                if call.primitive == "acquire" and call.outcome == "returned":
                    granted.add((contender.node, call.term))  # type: ignore[arg-type]
                elif call.primitive == "release" and call.forwarded:
                    released.add((contender.node, call.term))  # type: ignore[arg-type]
                elif call.primitive == "release" and call.outcome == "injected":
                    failed_releases = True
        if not failed_releases and granted - released:
            self.violation(f"leases never released after stop(): {sorted(granted - released)}")
        # A release that failed leaves the key to its TTL, as on a real store.
        if not _wait_for(lambda: self.inner.leader(self.key) is None, self.ttl + 2 if failed_releases else 1):
            self.violation(f"the store still holds the key after every stop(): {self.inner.leader(self.key)}")
        if not _wait_for(lambda: not _live_greenlets() - self.greenlets_before, 3):
            left = [repr(g) for g in _live_greenlets() - self.greenlets_before]
            self.violation(f"greenlets left alive: {left[:5]}")
        # Counted, not compared by number: gevent replaces a pipe of its own on each fork. And
        # waited for: gevent's os.close() closes a descriptor once the hub has run.
        if not _wait_for(lambda: len(_open_fds()) <= len(self.fds_before), 2):
            fds = _open_fds()
            opened = [fds[fd] for fd in sorted(fds.keys() - self.fds_before.keys())]
            self.violation(f"{len(fds) - len(self.fds_before)} more file descriptors open than before: {opened}")

    # -- the forked child's view -----------------------------------------------------------

    def _inherited_activity(self, seconds: float) -> str:
        """In a forked child: what inherited Candidates and Followers did for ``seconds``."""
        forked_at = now()
        leaders: set[str] = set()
        while now() < forked_at + seconds:
            leaders.update(c.node for c in self.contenders if c.candidate.is_leader())
            gevent.sleep(SAMPLE_EVERY)
        calls = []
        for owner, store in [(c, c.store) for c in self.contenders] + [(w, w.store) for w in self.watchers]:
            for call in list(store.history):
                if call.started >= forked_at:
                    calls.append(f"{owner} called {call.primitive}")
                elif (call.ended is not None and call.ended >= forked_at and call.outcome == "returned"
                      and call.primitive in ("renew", "release")):
                    # A wait in flight at the fork (acquire, watch) may take its last step in the
                    # child if its wake-up was already queued; the inert owner ignores the outcome.
                    calls.append(f"{owner} completed a {call.primitive} begun before the fork")
        problems = []
        if leaders:
            problems.append(f"{sorted(leaders)} said they lead")
        if calls:
            problems.append(f"inherited objects used the store: {sorted(set(calls))}")
        return "; ".join(problems)


class MemoryElection(ElectionMachine):
    kind = "memory"


class FileElection(ElectionMachine):
    kind = "file"


TestMemoryElection = MemoryElection.TestCase
TestFileElection = FileElection.TestCase


# -- the FaultyStore itself ---------------------------------------------------------------------


def test_faulty_store_forwards_every_primitive_and_records_it():
    inner = MemoryStore()
    store = FaultyStore(inner)
    assert (store.backend, store.min_ttl, store.validate_ttl(1)) == ("memory", inner.min_ttl, 1.0)
    watch = store.watch("k")
    assert next(watch) is None
    lease = store.acquire("k", "a", 5)
    assert inner.leader("k") == store.leader("k") == next(watch) == LeaderInfo("a", lease.term)
    lease.renew()
    lease.release()
    assert next(watch) is None
    watch.close()
    assert inner.leader("k") is None
    assert [(c.primitive, c.node, c.outcome, c.forwarded) for c in store.history] == [
        ("watch", None, "returned", True),
        ("acquire", "a", "returned", True),
        ("leader", None, "returned", True),
        ("watch", "a", "returned", True),
        ("renew", "a", "returned", True),
        ("release", "a", "returned", True),
        ("watch", None, "returned", True),
    ]
    assert all(c.ended >= c.started for c in store.history)


def test_faulty_store_fails_the_calls_it_is_told_to_before_or_after_the_inner_store():
    inner = MemoryStore()
    store = FaultyStore(inner)
    lease = store.acquire("k", "a", 5)
    store.fail_next("renew", StoreUnavailableError("down"), times=2)
    for _ in range(2):
        with pytest.raises(StoreUnavailableError):
            lease.renew()
    lease.renew()  # the rule is used up
    store.fail_next("release", OSError(errno.EIO, "lost reply"), after=True)
    with pytest.raises(OSError):
        lease.release()
    assert inner.leader("k") is None  # released all the same: only the reply was lost
    assert [(c.primitive, c.outcome, c.forwarded) for c in store.history][-4:] == [
        ("renew", "injected", False), ("renew", "injected", False), ("renew", "returned", True),
        ("release", "injected", True),
    ]
    store.fail_when("acquire", RuntimeError, lambda call: call.node == "b")
    assert store.acquire("k", "a", 5).node == "a"
    with pytest.raises(RuntimeError, match="injected into acquire"):
        store.acquire("k", "b", 5)


def test_faulty_store_slows_calls_and_tells_the_application_when_each_one_starts():
    entered = []
    store = FaultyStore(MemoryStore(), on_call=lambda call: entered.append((call.primitive, call.outcome)))
    store.delay_next("leader", 0.2)
    started = now()
    assert store.leader("k") is None
    assert now() - started >= 0.2
    assert entered == [("leader", "running")]
    store.fail_next("watch", GreenletExit(), after=True)
    with pytest.raises(GreenletExit):
        next(store.watch("k"))


# -- helpers ----------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float) -> bool:
    deadline = now() + timeout
    while not predicate():
        if now() >= deadline:
            return False
        gevent.sleep(0.01)
    return True


def _live_greenlets() -> set[greenlet.greenlet]:
    return {g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and not g.dead}


def _open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each refers to."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used is closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


_forked_once = False


def _warm_up_fork() -> None:
    """Fork once before any baseline is taken: gevent sets up its child watcher on first use."""
    global _forked_once
    if not _forked_once:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        _forked_once = True
