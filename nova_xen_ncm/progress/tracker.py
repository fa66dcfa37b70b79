"""From engine progress events to the notifications a migration reports.

The engine emits :class:`~nova_xen_ncm.progress.model.ProgressEvent`
values as things happen (phase changes, precopy rounds, periodic
progress, retries). Operators want fewer, richer reports: one
``xen_ncm.migration.start``, a ``.phase`` per phase change, ``.progress``
at most every ``[xen_ncm] progress_interval``, ``.retry`` per retry, an
``.error`` when the migration fails or ends in doubt and always a last
``.end`` with the outcome and the statistics. :class:`ProgressTranslator`
does that translation once and :class:`NotificationSink` drives it, for
the bus sink and the terminal sink alike; the payloads are versioned like
Nova's versioned notifications and are documented in
``doc/source/progress.rst``.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import datetime
import enum
import numbers
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from nova_xen_ncm.progress.model import EVENT_PREFIX
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.ratelimit import RateLimiter

#: Key prefix of the versioned payload envelope (Nova: ``nova_object``).
OBJECT_PREFIX = "nova_xen_ncm_object"
PAYLOAD_NAMESPACE = "nova_xen_ncm"
#: 1.1 added ``downtime_target_unmet``.
PAYLOAD_VERSION = "1.1"

# Phases a migration ends in. They mirror engine.state.TERMINAL, which
# this package may not import (the engine sits above progress).
OUTCOMES = frozenset({"done", "failed", "cancelled", "in_doubt"})
# Outcomes that also get an .error notification: something went wrong,
# as opposed to an operator's cancel.
ERROR_OUTCOMES = frozenset({"failed", "in_doubt"})

# Statistics the engine may give in a terminal event's
# detail["statistics"] to replace what was accumulated from events.
_OVERRIDABLE = frozenset(
    {
        "pages_sent",
        "zero_pages",
        "bytes_sent",
        "dirty_pages",
        "bandwidth",
        "dirty_rate",
        "expected_downtime",
        "actual_downtime",
        "retries",
        "total_time",
    }
)

# Migrations that ended are remembered this long (in number) so that a
# straggling event does not start them again.
_ENDED_MEMORY = 1024


class Notice(str, enum.Enum):
    """The notifications a migration produces (the event type's tail)."""

    START = "start"
    PHASE = "phase"
    PROGRESS = "progress"
    RETRY = "retry"
    ERROR = "error"
    END = "end"


PAYLOAD_NAMES: Mapping[Notice, str] = {
    Notice.START: "MigrationPayload",
    Notice.PHASE: "MigrationPayload",
    Notice.PROGRESS: "MigrationPayload",
    Notice.RETRY: "MigrationRetryPayload",
    Notice.ERROR: "MigrationErrorPayload",
    Notice.END: "MigrationEndPayload",
}

_PRIORITIES: Mapping[Notice, str] = {
    Notice.RETRY: "warn",
    Notice.ERROR: "error",
}


def envelope(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A versioned payload, in the layout of Nova's notification objects."""
    return {
        f"{OBJECT_PREFIX}.name": name,
        f"{OBJECT_PREFIX}.namespace": PAYLOAD_NAMESPACE,
        f"{OBJECT_PREFIX}.version": PAYLOAD_VERSION,
        f"{OBJECT_PREFIX}.data": dict(data),
    }


def unwrap(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The data of a versioned payload; raises ValueError if it is not one
    of ours or its major version is not understood."""
    try:
        namespace = payload[f"{OBJECT_PREFIX}.namespace"]
        version = str(payload[f"{OBJECT_PREFIX}.version"])
        data = payload[f"{OBJECT_PREFIX}.data"]
    except (KeyError, TypeError):
        raise ValueError("not a nova-xen-ncm versioned payload") from None
    if namespace != PAYLOAD_NAMESPACE:
        raise ValueError(f"payload of namespace {namespace!r}")
    if version.split(".")[0] != PAYLOAD_VERSION.split(".")[0]:
        raise ValueError(f"payload version {version} is not understood")
    return dict(data)


def isotime(timestamp: float) -> str:
    return (
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


class MigrationTracker:
    """What is known of one migration on one side (role), from its events.

    Not thread-safe: the sink that owns it serialises access. The
    counters of notifications (``published``, ``dropped``) are kept here
    for the sink; they end up in the end notification's statistics.
    """

    def __init__(
        self,
        migration_id: str,
        role: str,
        *,
        started_at: float,
        instance_uuid: str | None = None,
        source_host: str | None = None,
        destination_host: str | None = None,
    ) -> None:
        self.migration_id = migration_id
        self.role = role
        self.instance_uuid = instance_uuid
        self.source_host = source_host
        self.destination_host = destination_host
        self.started_at = started_at
        self.last_at = started_at
        self.phase = "setup"
        self.previous: str | None = None
        self.reason: str | None = None
        self.round: int | None = None
        self.bytes_total: int | None = None
        self.bytes_sent: int | None = None
        self.bytes_remaining: int | None = None
        self._remaining_measured = False
        self.bandwidth: float | None = None
        self.dirty_rate: float | None = None
        self.expected_downtime_given: float | None = None
        self.eta_given: float | None = None
        # Once the source's policy said its downtime target cannot be
        # met, every later payload says so: progress notifications are
        # rate-limited, and the one that said it may have been merged.
        self.downtime_target_unmet = False
        self.retries = 0
        self.retry: dict[str, Any] = {}
        # Accumulated statistics.
        self.rounds = 0
        self.pages_sent = 0
        self.zero_pages = 0
        self.round_bytes = 0
        self.dirty_pages: int | None = None
        self.phase_durations: dict[str, float] = {}
        self._phase_entered = started_at
        self.failed_phase: str | None = None
        self.statistics_given: dict[str, Any] = {}
        # Notifications: produced (numbered), rate-limited (never
        # produced), and what became of the produced ones.
        self.sequence = 0
        self.rate_limited = 0
        self.published = 0
        self.dropped = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.migration_id, self.role)

    # -- reading events --

    def observe(self, event: ProgressEvent) -> None:
        """Fold one engine event into what is known."""
        detail = event.detail
        self.last_at = event.timestamp
        self._context(detail)
        measured = event.kind in (EventKind.ROUND, EventKind.PROGRESS)
        for name in ("memory_total", "memory_processed", "memory_remaining"):
            value = getattr(event, name)
            if value is None:
                continue
            if name == "memory_remaining" and not measured:
                # Before a round or progress report measured it, the
                # engine's remainder is a placeholder zero.
                if not self._remaining_measured:
                    continue
            setattr(self, _BYTES_FIELDS[name], int(value))
        if measured and event.memory_remaining is not None:
            self._remaining_measured = True
        for name in ("bandwidth", "dirty_rate"):
            value = _number(detail.get(name))
            if value is not None:
                setattr(self, name, value)
        downtime = _number(detail.get("expected_downtime"))
        if downtime is None:
            # The policy's own estimate of the pause.
            downtime = _number(detail.get("expected_pause"))
        if detail.get("downtime_target_unmet") is True:
            self.downtime_target_unmet = True
        if downtime is not None:
            self.expected_downtime_given = downtime
        eta = _number(detail.get("eta"))
        if eta is not None:
            self.eta_given = eta
        if event.kind is EventKind.STATE:
            self._enter(event)
        elif event.kind is EventKind.ROUND:
            self._round(detail)
        elif event.kind is EventKind.PROGRESS:
            # The round in progress.
            number = _integer(detail.get("round"))
            if number is not None:
                self.round = number
        elif event.kind is EventKind.RETRY:
            self.retries += 1
            self.retry = {
                "retry_what": _text(detail.get("what")),
                "retry_attempt": _integer(detail.get("attempt")),
                "retry_delay": _number(detail.get("delay")),
                "retry_error": _text(detail.get("error") or event.reason),
            }
        if event.kind is not EventKind.STATE and event.phase != self.phase:
            # A report stamped with a phase whose STATE event this sink
            # did not see (it was attached late): trust the report.
            self.phase = event.phase

    def _context(self, detail: Mapping[str, Any]) -> None:
        for name in ("instance_uuid", "source_host", "destination_host"):
            value = detail.get(name)
            if value:
                setattr(self, name, str(value))

    def _enter(self, event: ProgressEvent) -> None:
        self.phase_durations[self.phase] = self.phase_durations.get(
            self.phase, 0.0
        ) + max(0.0, event.timestamp - self._phase_entered)
        self._phase_entered = event.timestamp
        self.previous = event.previous
        self.reason = event.reason
        if event.phase == "rollback" or (
            event.phase in ERROR_OUTCOMES and self.failed_phase is None
        ):
            self.failed_phase = event.previous
        self.phase = event.phase
        given = event.detail.get("statistics")
        if isinstance(given, Mapping):
            self.statistics_given = {
                k: _plain(v)
                for k, v in given.items()
                if k in _OVERRIDABLE
                and (v is None or isinstance(v, numbers.Real))
            }

    def _round(self, detail: Mapping[str, Any]) -> None:
        self.rounds += 1
        number = _integer(detail.get("round"))
        self.round = number if number is not None else self.rounds - 1
        self.pages_sent += _integer(detail.get("pages_sent")) or 0
        self.zero_pages += _integer(detail.get("zero_pages")) or 0
        self.round_bytes += _integer(detail.get("bytes_sent")) or 0
        dirty = _integer(detail.get("dirty_pages"))
        if dirty is not None:
            self.dirty_pages = dirty

    # -- derived values --

    @property
    def expected_downtime(self) -> float | None:
        """Seconds the guest will be paused: what is left to send at the
        measured bandwidth (QEMU's expected_downtime)."""
        if self.expected_downtime_given is not None:
            return self.expected_downtime_given
        if self.bytes_remaining is None or not self.bandwidth:
            return None
        return self.bytes_remaining / self.bandwidth

    @property
    def eta(self) -> float | None:
        """Seconds until switch-over. In precopy the guest keeps dirtying
        while we send, so the remainder shrinks at bandwidth minus dirty
        rate; a guest that dirties as fast as we send has no ETA."""
        if self.eta_given is not None:
            return self.eta_given
        if self.phase in OUTCOMES:
            return 0.0 if self.phase == "done" else None
        if self.bytes_remaining is None or not self.bandwidth:
            return None
        if self.phase == "precopy":
            net = self.bandwidth - (self.dirty_rate or 0.0)
            return self.bytes_remaining / net if net > 0 else None
        if self.phase == "stop_and_copy":
            return self.bytes_remaining / self.bandwidth
        return None

    @property
    def percent(self) -> float | None:
        if self.phase == "done":
            return 100.0
        if not self.bytes_total:
            return None
        if self.bytes_remaining is not None:
            done = self.bytes_total - self.bytes_remaining
        elif self.bytes_sent is not None:
            done = self.bytes_sent
        else:
            return None
        return max(0.0, min(100.0, 100.0 * done / self.bytes_total))

    # -- payloads --

    def data(self) -> dict[str, Any]:
        """The fields every payload of this migration carries."""
        return {
            "migration_id": self.migration_id,
            "instance_uuid": self.instance_uuid,
            "role": self.role,
            "source_host": self.source_host,
            "destination_host": self.destination_host,
            "phase": self.phase,
            "previous_phase": self.previous,
            "reason": self.reason,
            "round": self.round,
            "bytes_total": self.bytes_total,
            "bytes_sent": self.bytes_sent,
            "bytes_remaining": self.bytes_remaining,
            "percent": _rounded(self.percent),
            "dirty_rate": self.dirty_rate,
            "bandwidth": self.bandwidth,
            "expected_downtime": self.expected_downtime,
            "downtime_target_unmet": self.downtime_target_unmet,
            "eta": self.eta,
            "retries": self.retries,
            "sequence": self.sequence,
            "emitted_at": isotime(self.last_at),
        }

    def statistics(self) -> dict[str, Any]:
        """The end notification's statistics; ``notifications`` is added
        by the sink when it publishes."""
        # Microseconds: the timestamps are not finer than that.
        durations = {
            phase: round(seconds, 6)
            for phase, seconds in self.phase_durations.items()
        }
        stats: dict[str, Any] = {
            "rounds": self.rounds,
            "pages_sent": self.pages_sent,
            "zero_pages": self.zero_pages,
            "bytes_sent": self.round_bytes,
            "bytes_total": self.bytes_total,
            "dirty_pages": self.dirty_pages,
            "bandwidth": self.bandwidth,
            "dirty_rate": self.dirty_rate,
            "expected_downtime": self.expected_downtime,
            "actual_downtime": None,
            "retries": self.retries,
            "total_time": round(max(0.0, self.last_at - self.started_at), 6),
            "phase_durations": durations,
        }
        stats.update(self.statistics_given)
        return stats

    def notification(self, notice: Notice) -> Notification:
        """The next notification of this migration (numbered)."""
        self.sequence += 1
        data = self.data()
        if notice is Notice.RETRY:
            data.update(self.retry)
        elif notice is Notice.ERROR:
            data["fault"] = {
                "message": self.reason,
                "phase": self.failed_phase,
            }
        elif notice is Notice.END:
            data["outcome"] = self.phase
            data["statistics"] = self.statistics()
        return Notification(notice, data, self)


_BYTES_FIELDS = {
    "memory_total": "bytes_total",
    "memory_processed": "bytes_sent",
    "memory_remaining": "bytes_remaining",
}


@dataclasses.dataclass
class Notification:
    """One notification ready to publish or show."""

    notice: Notice
    data: dict[str, Any]
    tracker: MigrationTracker

    @property
    def event_type(self) -> str:
        return f"{EVENT_PREFIX}.{self.notice.value}"

    @property
    def priority(self) -> str:
        """The oslo.messaging Notifier method to publish with."""
        return _PRIORITIES.get(self.notice, "info")

    @property
    def final(self) -> bool:
        """Error and end notifications are never refused by a full queue:
        they carry the outcome an operator is waiting for."""
        return self.notice in (Notice.ERROR, Notice.END)

    def payload(self) -> dict[str, Any]:
        return envelope(PAYLOAD_NAMES[self.notice], self.data)


class ProgressTranslator:
    """Turns engine events into notifications, per (migration, role).

    ``host`` is the host the sink runs on: the source host of migrations
    it reports as source, the destination of those it reports as
    destination, unless :meth:`start` or an event's detail says better.
    Progress (ROUND and PROGRESS events) is limited to one notification
    per ``interval`` seconds per migration; everything else always goes
    out. Not thread-safe: callers serialise.
    """

    def __init__(
        self,
        host: str,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.limiter = RateLimiter(interval, clock=clock)
        self._wallclock = wallclock
        self._active: dict[tuple[str, str], MigrationTracker] = {}
        self._ended: collections.OrderedDict[tuple[str, str], None] = (
            collections.OrderedDict()
        )

    @property
    def active(self) -> list[MigrationTracker]:
        return list(self._active.values())

    def start(
        self,
        migration_id: str,
        *,
        role: str = "source",
        instance_uuid: str | None = None,
        source_host: str | None = None,
        destination_host: str | None = None,
        timestamp: float | None = None,
    ) -> list[Notification]:
        """Announce a migration with what the caller knows of it; returns
        the start notification (none if it was already announced)."""
        key = (migration_id, role)
        if key in self._active:
            tracker = self._active[key]
            for name, value in (
                ("instance_uuid", instance_uuid),
                ("source_host", source_host),
                ("destination_host", destination_host),
            ):
                if value:
                    setattr(tracker, name, value)
            return []
        self._ended.pop(key, None)
        tracker = MigrationTracker(
            migration_id,
            role,
            started_at=(
                timestamp if timestamp is not None else self._wallclock()
            ),
            instance_uuid=instance_uuid,
            source_host=source_host
            or (self.host if role == "source" else None),
            destination_host=destination_host
            or (self.host if role == "destination" else None),
        )
        self._active[key] = tracker
        return [tracker.notification(Notice.START)]

    def translate(self, event: ProgressEvent) -> list[Notification]:
        """The notifications ``event`` causes, in publishing order."""
        key = (event.migration_id, event.role)
        if key in self._ended:
            return []
        out: list[Notification] = []
        if key not in self._active:
            out += self.start(
                event.migration_id,
                role=event.role,
                instance_uuid=_text(event.detail.get("instance_uuid")),
                source_host=_text(event.detail.get("source_host")),
                destination_host=_text(event.detail.get("destination_host")),
                timestamp=event.timestamp,
            )
        tracker = self._active[key]
        tracker.observe(event)
        if event.kind is EventKind.STATE:
            if event.phase in OUTCOMES:
                if event.phase in ERROR_OUTCOMES:
                    out.append(tracker.notification(Notice.ERROR))
                out.append(tracker.notification(Notice.END))
                self._end(key)
            else:
                out.append(tracker.notification(Notice.PHASE))
        elif event.kind is EventKind.RETRY:
            out.append(tracker.notification(Notice.RETRY))
        elif self.limiter.allow(key):
            out.append(tracker.notification(Notice.PROGRESS))
        else:
            tracker.rate_limited += 1
        return out

    def _end(self, key: tuple[str, str]) -> None:
        del self._active[key]
        self.limiter.forget(key)
        self._ended[key] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)


class NotificationSink(abc.ABC):
    """A ProgressSink that reports notifications: :meth:`start` and
    :meth:`emit` translate with ``translator`` and hand what comes out, in
    order, to :meth:`_deliver`. Both hold ``_lock`` throughout, so the
    translator is serialised and deliveries keep the events' order."""

    def __init__(self, translator: ProgressTranslator) -> None:
        self._translator = translator
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _deliver(self, notifications: list[Notification]) -> None:
        """Publish or show ``notifications``; called with ``_lock`` held."""

    def start(
        self,
        migration_id: str,
        *,
        role: str = "source",
        instance_uuid: str | None = None,
        source_host: str | None = None,
        destination_host: str | None = None,
    ) -> None:
        """Announce a migration (``xen_ncm.migration.start``)."""
        with self._lock:
            self._deliver(
                self._translator.start(
                    migration_id,
                    role=role,
                    instance_uuid=instance_uuid,
                    source_host=source_host,
                    destination_host=destination_host,
                )
            )

    def emit(self, event: ProgressEvent) -> None:
        with self._lock:
            self._deliver(self._translator.translate(event))


# numbers.Real, not (int, float): the engine's figures may be numpy scalars.
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    # JSON has no infinity; "not known" is null.
    return value if value == value and abs(value) != float("inf") else None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value)


def _plain(value: Any) -> int | float | None:
    """A JSON number (or null) for a figure of the engine."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return _number(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
