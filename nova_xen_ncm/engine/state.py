"""The phases of a migration and the one function that changes them.

Everything that affects the phase state machine and its transitions lives
in this module (h11 ``_state.py``): the phases, the transition table, which
phases are terminal, which may still roll back, and
:meth:`MigrationState.transition`, the only way to change phase. Like QEMU's
``migrate_set_state(old, new)`` it is a compare-and-set: the caller says
which phase it believes the migration is in, so two threads racing (the
migration thread failing while an operator cancels) cannot both win.

Phases (architecture.rst section 5)::

    SETUP -> PRECOPY -> STOP_AND_COPY -> RESTORE -> COMMIT -> CLEANUP
      |         |             |              |          |         |
      +---------+-------------+--------------+          |         v
      |                                                 v       DONE
      v                                              IN_DOUBT
    ROLLBACK -> FAILED | CANCELLED

COMMIT is entered when the commit decision is made: the source enters it
just before it sends COMMIT, the destination when COMMIT arrives. From
then on the guest must not be resumed on the source on a guess, so COMMIT
leads forward (CLEANUP, DONE), to ROLLBACK only on the destination's
authenticated word that it never unpaused the guest (the commit
coordinator, commit.py), or to IN_DOUBT, where the guest stays paused
until recovery learns the outcome or an operator settles it.

A journal (``journal`` hook of :class:`MigrationState`) is written as part
of each transition, before the phase changes: a journal that cannot be
written stops the transition, so no side effect runs unrecorded.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from oslo_log import log as logging

from nova_xen_ncm.engine.errors import CancelRequested
from nova_xen_ncm.engine.errors import IllegalTransition
from nova_xen_ncm.engine.errors import StateConflict
from nova_xen_ncm.progress.model import Broadcast
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.model import ProgressSink

LOG = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    SETUP = "setup"
    PRECOPY = "precopy"
    STOP_AND_COPY = "stop_and_copy"
    RESTORE = "restore"
    COMMIT = "commit"
    CLEANUP = "cleanup"
    DONE = "done"
    ROLLBACK = "rollback"
    FAILED = "failed"
    CANCELLED = "cancelled"
    IN_DOUBT = "in_doubt"

    def __str__(self) -> str:
        return self.name


class Role(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


# The transition table. A failure before COMMIT always goes through
# ROLLBACK, whose outcome is FAILED (an error) or CANCELLED (an abort
# request); after COMMIT only the forward path or IN_DOUBT remain.
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.SETUP: frozenset({Phase.PRECOPY, Phase.ROLLBACK}),
    Phase.PRECOPY: frozenset({Phase.STOP_AND_COPY, Phase.ROLLBACK}),
    Phase.STOP_AND_COPY: frozenset({Phase.RESTORE, Phase.ROLLBACK}),
    Phase.RESTORE: frozenset({Phase.COMMIT, Phase.ROLLBACK}),
    # ROLLBACK only when the destination said it never unpaused.
    Phase.COMMIT: frozenset({Phase.CLEANUP, Phase.ROLLBACK, Phase.IN_DOUBT}),
    Phase.CLEANUP: frozenset({Phase.DONE}),
    Phase.ROLLBACK: frozenset({Phase.FAILED, Phase.CANCELLED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
    # The guest is paused on the source and the destination did not say
    # whether it runs: only an operator who has looked may settle it.
    Phase.IN_DOUBT: frozenset(),
}

TERMINAL: frozenset[Phase] = frozenset(
    phase for phase, targets in TRANSITIONS.items() if not targets
)

# Phases in which nothing is committed yet: a failure rolls back
# (destination destroyed, source unpaused, log-dirty off).
ROLLBACK_ALLOWED: frozenset[Phase] = frozenset(
    phase
    for phase, targets in TRANSITIONS.items()
    if Phase.ROLLBACK in targets and phase is not Phase.COMMIT
)


def is_legal(old: Phase, new: Phase) -> bool:
    return new in TRANSITIONS[old]


@dataclasses.dataclass
class PhaseTiming:
    """When a phase was entered and left (monotonic seconds)."""

    entered: float
    left: float | None = None
    #: Wall-clock time of entering, for reports.
    entered_at: float = 0.0

    def duration(self, now: float) -> float:
        return (self.left if self.left is not None else now) - self.entered


class MigrationState:
    """The phase of one migration, on one side, shared between threads.

    ``sinks`` receive a STATE progress event for every transition, in
    transition order (the event is emitted while the state lock is held,
    so sinks must not block; they may read this object).
    """

    def __init__(
        self,
        migration_id: str,
        role: Role = Role.SOURCE,
        sinks: Iterable[ProgressSink] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        journal: Callable[[Phase, Phase, Mapping[str, Any]], None]
        | None = None,
    ) -> None:
        self.migration_id = migration_id
        # Called with (old, new, detail) before the phase changes; what it
        # raises leaves the migration in ``old``.
        self.journal = journal
        self.role = Role(role)
        self.progress = Broadcast(sinks)
        self._clock = clock
        self._wallclock = wallclock
        # Re-entrant: a sink may read the state from inside emit().
        self._lock = threading.RLock()
        self._phase = Phase.SETUP
        self._cancel_requested = False
        self._cancel_reason: str | None = None
        self._history: list[tuple[Phase, PhaseTiming]] = [
            (Phase.SETUP, PhaseTiming(clock(), entered_at=wallclock()))
        ]
        self._reasons: dict[Phase, str] = {}
        #: The migration's statistics, attached to the event of the
        #: terminal transition (the end notification reports them).
        self.statistics: Callable[[], Mapping[str, Any]] | None = None

    @property
    def phase(self) -> Phase:
        with self._lock:
            return self._phase

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def cancel_requested(self) -> bool:
        with self._lock:
            return self._cancel_requested

    @property
    def cancel_reason(self) -> str | None:
        """What the canceller said, if anything."""
        with self._lock:
            return self._cancel_reason

    def request_cancel(self, reason: str | None = None) -> bool:
        """Ask the migration to cancel; True if it still can be.

        Atomic against entering COMMIT: either this returns True and the
        transition to COMMIT raises :class:`CancelRequested`, or COMMIT
        was entered first and this returns False (too late: QEMU refuses
        migrate_cancel past the point of no return the same way).
        """
        with self._lock:
            if self._phase not in ROLLBACK_ALLOWED:
                return False
            self._cancel_requested = True
            if self._cancel_reason is None:
                self._cancel_reason = reason
            return True

    def transition(
        self,
        old: Phase,
        new: Phase,
        *,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Move from ``old`` to ``new``, or raise.

        Raises :class:`IllegalTransition` if the table has no such edge,
        :class:`StateConflict` if the migration is no longer in ``old``,
        and :class:`CancelRequested` when entering COMMIT after a cancel
        request. ``reason`` says why (kept per phase and reported).
        """
        old = Phase(old)
        new = Phase(new)
        with self._lock:
            if not is_legal(old, new):
                raise IllegalTransition(old, new, self._phase)
            if self._phase is not old:
                raise StateConflict(old, new, self._phase)
            if new is Phase.COMMIT and self._cancel_requested:
                raise CancelRequested(old, new, self._phase)
            if self.journal is not None:
                self.journal(old, new, detail or {})
            now = self._clock()
            wall = self._wallclock()
            self._history[-1][1].left = now
            self._history.append((new, PhaseTiming(now, entered_at=wall)))
            self._phase = new
            if reason is not None:
                self._reasons[new] = reason
            LOG.info(
                "Migration %s (%s): %s -> %s%s",
                self.migration_id,
                self.role.value,
                old,
                new,
                f": {reason}" if reason else "",
            )
            detail = dict(detail or {})
            if new in TERMINAL and self.statistics is not None:
                detail.setdefault("statistics", self.statistics())
            self.progress.emit(
                ProgressEvent(
                    migration_id=self.migration_id,
                    kind=EventKind.STATE,
                    phase=new.value,
                    previous=old.value,
                    reason=reason,
                    role=self.role.value,
                    timestamp=wall,
                    detail=detail,
                )
            )

    def report(
        self,
        kind: EventKind,
        *,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
        memory: Mapping[str, int | None] | None = None,
    ) -> None:
        """Emit a ROUND, PROGRESS or RETRY event stamped with the current
        phase (STATE events come from :meth:`transition` only).
        ``memory`` gives memory_total/processed/remaining (see
        ``MigrationStats.memory_progress``)."""
        kind = EventKind(kind)
        if kind is EventKind.STATE:
            raise ValueError("state events come from transition() only")
        with self._lock:
            self.progress.emit(
                ProgressEvent(
                    migration_id=self.migration_id,
                    kind=kind,
                    phase=self._phase.value,
                    reason=reason,
                    role=self.role.value,
                    timestamp=self._wallclock(),
                    detail=dict(detail or {}),
                    **dict(memory or {}),
                )
            )

    def reason(self, phase: Phase) -> str | None:
        with self._lock:
            return self._reasons.get(phase)

    def history(self) -> list[tuple[Phase, PhaseTiming]]:
        """Every phase entered, in order, with its timing (copies)."""
        with self._lock:
            return [
                (phase, dataclasses.replace(timing))
                for phase, timing in self._history
            ]

    def durations(self) -> dict[str, float]:
        """Seconds spent per phase (summed; the current one so far)."""
        now = self._clock()
        result: dict[str, float] = {}
        for phase, timing in self.history():
            result[phase.value] = result.get(
                phase.value, 0.0
            ) + timing.duration(now)
        return result
