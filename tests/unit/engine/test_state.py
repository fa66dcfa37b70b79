"""The phase state machine: the table, compare-and-set, events, timing."""

import itertools
import threading

import pytest

from nova_xen_ncm.engine import state
from nova_xen_ncm.engine.errors import CancelRequested
from nova_xen_ncm.engine.errors import IllegalTransition
from nova_xen_ncm.engine.errors import StateConflict
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.progress import EventKind

LEGAL = sorted(
    (old, new) for old, targets in state.TRANSITIONS.items() for new in targets
)
ILLEGAL = sorted(
    (old, new)
    for old, new in itertools.product(Phase, Phase)
    if new not in state.TRANSITIONS[old]
)

# A shortest path of legal transitions from SETUP to each phase.
PATHS = {
    Phase.SETUP: [],
    Phase.PRECOPY: [Phase.PRECOPY],
    Phase.STOP_AND_COPY: [Phase.PRECOPY, Phase.STOP_AND_COPY],
    Phase.RESTORE: [Phase.PRECOPY, Phase.STOP_AND_COPY, Phase.RESTORE],
    Phase.COMMIT: [
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.COMMIT,
    ],
    Phase.CLEANUP: [
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.COMMIT,
        Phase.CLEANUP,
    ],
    Phase.DONE: [
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.COMMIT,
        Phase.CLEANUP,
        Phase.DONE,
    ],
    Phase.ROLLBACK: [Phase.ROLLBACK],
    Phase.FAILED: [Phase.ROLLBACK, Phase.FAILED],
    Phase.CANCELLED: [Phase.ROLLBACK, Phase.CANCELLED],
    Phase.IN_DOUBT: [
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.COMMIT,
        Phase.IN_DOUBT,
    ],
}


class Recorder:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def machine_in(phase, **kwargs):
    sm = state.MigrationState("mig-1", **kwargs)
    current = Phase.SETUP
    for nxt in PATHS[phase]:
        sm.transition(current, nxt)
        current = nxt
    assert sm.phase is phase
    return sm


def test_every_phase_is_reachable():
    assert set(PATHS) == set(Phase)


@pytest.mark.parametrize("old,new", LEGAL)
def test_legal_transition(old, new):
    rec = Recorder()
    sm = machine_in(old, sinks=[rec])
    sm.transition(old, new, reason="test")
    assert sm.phase is new
    last = rec.events[-1]
    assert last.kind is EventKind.STATE
    assert (last.previous, last.phase) == (old.value, new.value)
    assert last.reason == "test"
    assert last.migration_id == "mig-1"


@pytest.mark.parametrize("old,new", ILLEGAL)
def test_illegal_transition_raises(old, new):
    sm = machine_in(old)
    with pytest.raises(IllegalTransition):
        sm.transition(old, new)
    assert sm.phase is old


def test_stale_old_phase_is_a_conflict():
    sm = machine_in(Phase.PRECOPY)
    with pytest.raises(StateConflict):
        sm.transition(Phase.SETUP, Phase.ROLLBACK)
    assert sm.phase is Phase.PRECOPY


def test_terminal_phases_have_no_exit():
    assert state.TERMINAL == {
        Phase.DONE,
        Phase.FAILED,
        Phase.CANCELLED,
        Phase.IN_DOUBT,
    }
    for phase in state.TERMINAL:
        assert machine_in(phase).terminal


def test_rollback_only_before_commit():
    assert state.ROLLBACK_ALLOWED == {
        Phase.SETUP,
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
    }
    # After COMMIT the ways out are the forward path, IN_DOUBT, and a
    # rollback on the destination's word that it never unpaused; a
    # cancel can no longer cause it.
    assert state.TRANSITIONS[Phase.COMMIT] == {
        Phase.CLEANUP,
        Phase.ROLLBACK,
        Phase.IN_DOUBT,
    }
    assert Phase.COMMIT not in state.ROLLBACK_ALLOWED
    reachable = set()
    todo = [Phase.COMMIT]
    while todo:
        phase = todo.pop()
        for nxt in state.TRANSITIONS[phase]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert reachable == {
        Phase.CLEANUP,
        Phase.DONE,
        Phase.IN_DOUBT,
        Phase.ROLLBACK,
        Phase.FAILED,
        Phase.CANCELLED,
    }


def test_concurrent_transitions_exactly_one_wins():
    sm = machine_in(Phase.PRECOPY)
    targets = [Phase.STOP_AND_COPY, Phase.ROLLBACK] * 8
    barrier = threading.Barrier(len(targets))
    won, lost = [], []

    def attempt(target):
        barrier.wait()
        try:
            sm.transition(Phase.PRECOPY, target)
        except StateConflict:
            lost.append(target)
        else:
            won.append(target)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert len(lost) == len(targets) - 1
    assert sm.phase is won[0]


def test_cancel_before_commit_blocks_commit():
    sm = machine_in(Phase.RESTORE)
    assert sm.request_cancel()
    with pytest.raises(CancelRequested):
        sm.transition(Phase.RESTORE, Phase.COMMIT)
    assert sm.phase is Phase.RESTORE
    sm.transition(Phase.RESTORE, Phase.ROLLBACK)
    sm.transition(Phase.ROLLBACK, Phase.CANCELLED)


def test_cancel_after_commit_is_refused():
    sm = machine_in(Phase.COMMIT)
    assert not sm.request_cancel()
    assert not sm.cancel_requested
    assert sm.phase is Phase.COMMIT


def test_timestamps_per_phase():
    clock = FakeClock()
    sm = state.MigrationState("mig-2", clock=clock, wallclock=lambda: 5.0)
    clock.now += 2
    sm.transition(Phase.SETUP, Phase.PRECOPY)
    clock.now += 10
    sm.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
    clock.now += 0.5
    durations = sm.durations()
    assert durations == {
        "setup": 2.0,
        "precopy": 10.0,
        "stop_and_copy": 0.5,
    }
    history = sm.history()
    assert [p for p, _ in history] == [
        Phase.SETUP,
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
    ]
    assert history[1][1].entered == 102.0
    assert history[1][1].left == 112.0
    assert history[2][1].left is None


def test_failing_sink_does_not_break_transition():
    class Broken:
        def emit(self, event):
            raise RuntimeError("bus down")

    rec = Recorder()
    sm = state.MigrationState("mig-3", sinks=[Broken(), rec])
    sm.transition(Phase.SETUP, Phase.PRECOPY)
    assert sm.phase is Phase.PRECOPY
    assert len(rec.events) == 1


def test_sink_may_read_state_while_emitting():
    seen = []

    class Reader:
        def emit(self, event):
            seen.append(sm.phase)

    sm = state.MigrationState("mig-4", role=state.Role.DESTINATION)
    sm.progress.add(Reader())
    sm.transition(Phase.SETUP, Phase.PRECOPY)
    assert seen == [Phase.PRECOPY]


def test_report_stamps_the_current_phase():
    rec = Recorder()
    sm = machine_in(Phase.PRECOPY, sinks=[rec])
    sm.report(
        EventKind.RETRY,
        reason="reconnect",
        detail={"attempt": 1},
        memory={"memory_total": 8, "memory_remaining": 2},
    )
    event = rec.events[-1]
    assert event.kind is EventKind.RETRY
    assert event.phase == "precopy"
    assert event.detail == {"attempt": 1}
    assert (event.memory_total, event.memory_remaining) == (8, 2)
    with pytest.raises(ValueError):
        sm.report(EventKind.STATE)


def test_terminal_transition_carries_the_statistics():
    rec = Recorder()
    sm = machine_in(Phase.PRECOPY, sinks=[rec])
    sm.statistics = lambda: {"actual_downtime": 0.25}
    sm.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
    assert "statistics" not in rec.events[-1].detail
    sm.transition(Phase.STOP_AND_COPY, Phase.ROLLBACK)
    sm.transition(Phase.ROLLBACK, Phase.CANCELLED)
    assert rec.events[-1].detail["statistics"] == {"actual_downtime": 0.25}


def test_the_journal_is_written_before_the_phase_changes():
    seen = []

    def journal(old, new, detail):
        seen.append((old, new))
        if new is Phase.STOP_AND_COPY:
            raise OSError("disk full")

    sm = state.MigrationState("m", journal=journal)
    sm.transition(Phase.SETUP, Phase.PRECOPY)
    with pytest.raises(OSError):
        sm.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
    # The failed write left the migration where it was.
    assert sm.phase is Phase.PRECOPY
    assert seen == [
        (Phase.SETUP, Phase.PRECOPY),
        (Phase.PRECOPY, Phase.STOP_AND_COPY),
    ]
