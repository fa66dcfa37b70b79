"""Statistics of one migration (never global: QEMU migration-stats.c).

:class:`MigrationStats` accumulates what the sender measures: one
:class:`RoundStats` per precopy round, the smoothed bandwidth, the dirty
rate, the downtime expected and the downtime that happened, retries.
After each round it hands the policy a :class:`PrecopyStats`, an immutable
snapshot passed by value like Xen's ``struct precopy_stats``
(tools/include/xenguest.h), so a policy cannot change what it is shown.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from nova_xen_ncm.host.base import PAGE_SIZE

# Weight of the newest round in the bandwidth average. Rounds shrink as
# precopy converges; a small last round over a warm connection must not
# alone decide the switch-over, nor an old round linger.
BANDWIDTH_SMOOTHING = 0.5


@dataclasses.dataclass(frozen=True)
class RoundStats:
    """One precopy round (round 0 sends every populated page)."""

    round: int
    #: Pages whose content went on the wire.
    pages_sent: int
    #: Bytes put on the wire this round, framing included.
    bytes_sent: int
    #: Pages found all zero: announced, their content not sent.
    zero_pages: int
    #: Pages found dirty by the harvest that ended this round.
    dirty_pages: int
    duration: float

    @property
    def bandwidth(self) -> float:
        """Bytes per second this round achieved on the wire."""
        return self.bytes_sent / self.duration if self.duration > 0 else 0.0

    @property
    def dirty_rate(self) -> float:
        """Bytes per second the guest dirtied during this round."""
        if self.duration <= 0:
            return 0.0
        return self.dirty_pages * PAGE_SIZE / self.duration

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "pages_sent": self.pages_sent,
            "bytes_sent": self.bytes_sent,
            "zero_pages": self.zero_pages,
            "dirty_pages": self.dirty_pages,
            "duration": self.duration,
            "bandwidth": self.bandwidth,
            "dirty_rate": self.dirty_rate,
        }


@dataclasses.dataclass(frozen=True)
class PrecopyStats:
    """What a precopy policy sees after a round, by value.

    ``iteration`` is the number of rounds done and ``dirty_count`` the
    pages left to send (Xen's fields); the rest is what the downtime
    rule needs. ``rounds`` is the history, oldest first.
    """

    iteration: int
    dirty_count: int
    total_written: int
    bytes_sent: int
    remaining_bytes: int
    bandwidth: float
    dirty_rate: float
    elapsed: float
    expected_downtime: float
    memory_bytes: int
    throttle: float = 1.0
    rounds: tuple[RoundStats, ...] = ()


@dataclasses.dataclass(eq=False)
class MigrationStats:
    """The statistics of one migration; safe to read from other threads.

    Built as ``MigrationStats(migration_id, memory_bytes)``; every other
    field is measured.
    """

    migration_id: str
    memory_bytes: int
    clock: Callable[[], float] = dataclasses.field(
        default=time.monotonic, kw_only=True, repr=False
    )
    started: float = dataclasses.field(init=False)
    finished: float | None = dataclasses.field(init=False, default=None)
    rounds: list[RoundStats] = dataclasses.field(
        init=False, default_factory=list
    )
    #: Bytes per second, smoothed over rounds.
    bandwidth: float = dataclasses.field(init=False, default=0.0)
    #: Bytes per second the guest dirtied in the last round.
    dirty_rate: float = dataclasses.field(init=False, default=0.0)
    expected_downtime: float | None = dataclasses.field(
        init=False, default=None
    )
    actual_downtime: float | None = dataclasses.field(init=False, default=None)
    remaining_pages: int = dataclasses.field(init=False, default=0)
    throttle: float = dataclasses.field(init=False, default=1.0)
    retries: int = dataclasses.field(init=False, default=0)
    #: What the round under way has put on the wire so far: counted in
    #: the totals, so a migration cancelled or rolled back mid-round
    #: still reports what the destination received.
    unfinished_pages: int = dataclasses.field(init=False, default=0)
    unfinished_bytes: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._paused_at: float | None = None
        self.started = self.clock()

    # -- recording --

    def record_sent(self, *, pages: int, nbytes: int) -> None:
        """Add a batch of the round under way (any channel's thread)."""
        with self._lock:
            self.unfinished_pages += pages
            self.unfinished_bytes += nbytes

    def record_round(
        self,
        *,
        pages_sent: int,
        bytes_sent: int,
        zero_pages: int,
        dirty_pages: int,
        duration: float,
    ) -> RoundStats:
        """Add the round just finished; ``dirty_pages`` is what the
        harvest at its end returned, i.e. the next round's work."""
        with self._lock:
            stats = RoundStats(
                round=len(self.rounds),
                pages_sent=pages_sent,
                bytes_sent=bytes_sent,
                zero_pages=zero_pages,
                dirty_pages=dirty_pages,
                duration=duration,
            )
            self.rounds.append(stats)
            self.unfinished_pages = 0
            self.unfinished_bytes = 0
            if stats.bandwidth > 0:
                self.bandwidth = (
                    stats.bandwidth
                    if self.bandwidth == 0
                    else BANDWIDTH_SMOOTHING * stats.bandwidth
                    + (1 - BANDWIDTH_SMOOTHING) * self.bandwidth
                )
            self.dirty_rate = stats.dirty_rate
            self.remaining_pages = dirty_pages
            self.expected_downtime = self._expected_downtime()
            return stats

    def _expected_downtime(self) -> float | None:
        # QEMU's expected_downtime: what is left to send at the rate the
        # wire sustains.
        if self.bandwidth <= 0:
            return None
        return self.remaining_pages * PAGE_SIZE / self.bandwidth

    def record_throttle(self, fraction: float) -> None:
        with self._lock:
            self.throttle = fraction

    def record_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def paused(self, at: float | None = None) -> None:
        """The guest was paused on the source (downtime starts), ``at``
        the moment the pause was asked for (its vCPUs stop inside the
        call, before the host's last look at what they wrote)."""
        with self._lock:
            self._paused_at = self.clock() if at is None else at

    def resumed(self) -> None:
        """The guest runs again, on either side (downtime ends)."""
        with self._lock:
            if self._paused_at is not None:
                self.actual_downtime = self.clock() - self._paused_at
                self._paused_at = None

    def finish(self) -> None:
        with self._lock:
            self.finished = self.clock()

    # -- reading --

    @property
    def total_time(self) -> float:
        end = self.finished if self.finished is not None else self.clock()
        return end - self.started

    def precopy_stats(self) -> PrecopyStats:
        """The snapshot the policy decides on."""
        with self._lock:
            rounds = tuple(self.rounds)
            return PrecopyStats(
                iteration=len(rounds),
                dirty_count=self.remaining_pages,
                total_written=sum(r.pages_sent for r in rounds),
                bytes_sent=sum(r.bytes_sent for r in rounds),
                remaining_bytes=self.remaining_pages * PAGE_SIZE,
                bandwidth=self.bandwidth,
                dirty_rate=self.dirty_rate,
                elapsed=self.clock() - self.started,
                expected_downtime=(
                    self.expected_downtime
                    if self.expected_downtime is not None
                    else float("inf")
                ),
                memory_bytes=self.memory_bytes,
                throttle=self.throttle,
                rounds=rounds,
            )

    def memory_progress(self) -> dict[str, int]:
        """Nova's Migration fields: memory_total, memory_processed (bytes
        of pages sent, zero pages counted as done) and memory_remaining
        (the dirty pages still to send)."""
        with self._lock:
            processed = sum(
                (r.pages_sent + r.zero_pages) * PAGE_SIZE for r in self.rounds
            )
            return {
                "memory_total": self.memory_bytes,
                "memory_processed": processed,
                "memory_remaining": self.remaining_pages * PAGE_SIZE,
            }

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            rounds = [r.to_dict() for r in self.rounds]
            result = {
                "migration_id": self.migration_id,
                "memory_bytes": self.memory_bytes,
                "rounds": rounds,
                "pages_sent": sum(r["pages_sent"] for r in rounds)
                + self.unfinished_pages,
                "bytes_sent": sum(r["bytes_sent"] for r in rounds)
                + self.unfinished_bytes,
                "zero_pages": sum(r["zero_pages"] for r in rounds),
                "remaining_pages": self.remaining_pages,
                "bandwidth": self.bandwidth,
                "dirty_rate": self.dirty_rate,
                "expected_downtime": self.expected_downtime,
                "actual_downtime": self.actual_downtime,
                "throttle": self.throttle,
                "retries": self.retries,
            }
        result["total_time"] = self.total_time
        return result
