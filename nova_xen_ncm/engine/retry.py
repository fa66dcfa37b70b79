"""The one retry helper of the engine, on tenacity.

Three steps of a migration are retried (architecture.rst section 5): the
connection setup, a precopy round's transfer after the connection dropped,
and the commit query after COMMIT went unacknowledged. Each has a budget of
attempts and seconds from [xen_ncm] options; stop-and-copy passes an
absolute deadline instead (the moment the downtime budget is spent), after
which the migration rolls back. Every retry is logged and reported to a
callback, which the sender turns into a progress RETRY event and a count
in the statistics.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine.errors import RetryExhausted
from nova_xen_ncm.engine.errors import TransportError

LOG = logging.getLogger(__name__)

T = TypeVar("T")


class Step(str, enum.Enum):
    CONNECT = "connect"
    TRANSFER = "transfer"
    COMMIT_QUERY = "commit_query"


@dataclasses.dataclass(frozen=True)
class RetryBudget:
    """At most ``attempts`` calls within ``seconds`` (0: one attempt's
    worth, no waiting), waiting ``initial_delay`` doubling up to
    ``max_delay`` between them."""

    attempts: int
    seconds: float
    initial_delay: float = 0.5
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry budget allows at least one attempt")
        if self.seconds < 0 or self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("retry budget times must not be negative")

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, step: Step) -> RetryBudget:
        group = conf.xen_ncm
        attempts, seconds = _BUDGET_OPTIONS[Step(step)]
        return cls(
            attempts=getattr(group, attempts),
            seconds=getattr(group, seconds),
            initial_delay=group.retry_initial_delay,
            max_delay=group.retry_max_delay,
        )


# Step -> the [xen_ncm] options of its attempts and seconds.
_BUDGET_OPTIONS = {
    Step.CONNECT: ("connect_retry_attempts", "connect_retry_timeout"),
    Step.TRANSFER: ("transfer_retry_attempts", "transfer_retry_timeout"),
    Step.COMMIT_QUERY: ("commit_query_attempts", "commit_query_timeout"),
}


def resume_wait(opts: cfg.ConfigOpts.GroupAttr, stopping: bool) -> float:
    """Seconds a dropped channel has to be resumed, the one figure both
    ends use: the source's retries end within it and the destination
    waits for the source as long. ``transfer_retry_timeout``, and from
    the source's STOPPING on (capability ``stop-notice``; the guest is
    about to pause or paused) no more than ``downtime_budget``."""
    wait = float(opts.transfer_retry_timeout)
    if stopping:
        wait = min(wait, float(opts.downtime_budget))
    return wait


@dataclasses.dataclass(frozen=True)
class RetryEvent:
    """A failed attempt about to be retried after ``delay`` seconds."""

    what: str
    attempt: int
    delay: float
    elapsed: float
    error: BaseException


def call(
    fn: Callable[[], T],
    *,
    what: str,
    budget: RetryBudget,
    deadline: float | None = None,
    retry_on: tuple[type[BaseException], ...] = (TransportError,),
    on_retry: Callable[[RetryEvent], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it returns, retrying the ``retry_on`` errors.

    Stops at ``budget.attempts`` calls, or when the next wait would end
    at or past ``budget.seconds`` since the first call or ``deadline`` (an
    absolute ``clock()`` time), and raises :class:`RetryExhausted` from
    the last error. Other errors propagate at once. A deadline already
    past still allows the first attempt, so a step is never skipped
    silently. The helper does not interrupt an attempt: under a deadline
    ``fn`` bounds its own I/O (socket timeouts) by the time left.
    """
    start = clock()
    limit = start + budget.seconds
    if deadline is not None:
        limit = min(limit, deadline)
    reasons: list[str] = []

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= budget.attempts:
            reasons.append(f"{budget.attempts} attempts allowed")
            return True
        # An attempt that could only start at or past the limit is
        # pointless, and waiting for it wastes downtime.
        if clock() + (state.upcoming_sleep or 0.0) >= limit:
            reasons.append(
                "deadline reached"
                if limit == deadline
                else f"{budget.seconds}s allowed"
            )
            return True
        return False

    wait_exponential = tenacity.wait_exponential(
        multiplier=budget.initial_delay,
        min=budget.initial_delay,
        max=budget.max_delay,
        exp_base=2,
    )

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        event = RetryEvent(
            what=what,
            attempt=state.attempt_number,
            delay=state.upcoming_sleep,
            elapsed=clock() - start,
            error=error,
        )
        LOG.warning(
            "%s failed (attempt %d): %s; retrying in %.2fs",
            what,
            event.attempt,
            error,
            event.delay,
        )
        if on_retry is not None:
            on_retry(event)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        stop=stop,
        wait=wait_exponential,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=False,
    )
    try:
        return retrying(fn)
    except tenacity.RetryError as exc:
        last = exc.last_attempt
        raise RetryExhausted(
            what,
            last.attempt_number,
            clock() - start,
            reasons[-1] if reasons else "stopped",
        ) from last.exception()
