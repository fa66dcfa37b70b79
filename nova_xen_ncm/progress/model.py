"""The progress model: what a migration reports and who listens.

A migration emits :class:`ProgressEvent` values to :class:`ProgressSink`
objects (the bus notifier, the Nova Migration record, a terminal line).
The engine knows only this module; sinks live beside it. Event types are
named like Nova's versioned notifications
(``xen_ncm.migration.<kind>``) so the bus sink can publish them as they
are.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import Protocol
from typing import runtime_checkable

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

EVENT_PREFIX = "xen_ncm.migration"


class EventKind(str, enum.Enum):
    #: The migration entered a phase (the state machine's transitions).
    STATE = "state"
    #: A precopy round finished; ``detail`` holds its statistics.
    ROUND = "round"
    #: Periodic progress inside a phase (every progress_interval).
    PROGRESS = "progress"
    #: A failed step is being retried.
    RETRY = "retry"


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One progress report of one migration.

    ``phase`` is the phase the migration is in after the event (a
    ``Phase`` value); ``previous`` the phase it left, for STATE events.
    The memory fields follow Nova's Migration object (memory_total,
    memory_processed, memory_remaining) and are None where not known.
    """

    migration_id: str
    kind: EventKind
    phase: str
    timestamp: float
    role: str = "source"
    previous: str | None = None
    reason: str | None = None
    memory_total: int | None = None
    memory_processed: int | None = None
    memory_remaining: int | None = None
    detail: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )

    @property
    def event_type(self) -> str:
        return f"{EVENT_PREFIX}.{self.kind.value}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable payload (bus notifications, logs)."""
        return {
            "event_type": self.event_type,
            "migration_id": self.migration_id,
            "kind": self.kind.value,
            "phase": self.phase,
            "previous": self.previous,
            "reason": self.reason,
            "role": self.role,
            "timestamp": self.timestamp,
            "memory_total": self.memory_total,
            "memory_processed": self.memory_processed,
            "memory_remaining": self.memory_remaining,
            "detail": dict(self.detail),
        }


@runtime_checkable
class ProgressSink(Protocol):
    """Receives progress events; must return quickly and not block.

    The engine calls :meth:`emit` from its own threads, in event order;
    a sink that needs I/O queues the event and does it elsewhere.
    """

    def emit(self, event: ProgressEvent) -> None: ...


class Broadcast:
    """Hands each event to every sink, in registration order.

    A failing sink is logged and skipped: a progress report must never
    fail a migration.
    """

    def __init__(self, sinks: Iterable[ProgressSink] = ()) -> None:
        self._sinks: list[ProgressSink] = list(sinks)

    def add(self, sink: ProgressSink) -> None:
        self._sinks.append(sink)

    def remove(self, sink: ProgressSink) -> None:
        self._sinks.remove(sink)

    def __len__(self) -> int:
        return len(self._sinks)

    def emit(self, event: ProgressEvent) -> None:
        for sink in list(self._sinks):
            try:
                sink.emit(event)
            except Exception:
                LOG.exception(
                    "Progress sink %r failed on %s of migration %s",
                    sink,
                    event.event_type,
                    event.migration_id,
                )
