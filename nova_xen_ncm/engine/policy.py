"""Precopy policies: after each round, continue, stop, throttle or abort.

A policy is a pure function of :class:`~nova_xen_ncm.engine.stats.
PrecopyStats` returning a :class:`Decision`, as Xen's ``precopy_policy_t``
callback is of ``struct precopy_stats`` (tools/include/xenguest.h); the
loop that calls it lives in the sender. Policies are found by name through
the ``nova_xen_ncm.policies`` entry points (stevedore), each entry point a
factory taking :class:`PolicyParams`. The completion timeout follows
Nova's ``[libvirt] live_migration_completion_timeout`` and
``live_migration_timeout_action`` (nova/virt/libvirt/migration.py) and is
checked by the sender before the policy.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import stevedore
from oslo_config import cfg

from nova_xen_ncm.engine.errors import PolicyNotFound
from nova_xen_ncm.engine.stats import PrecopyStats
from nova_xen_ncm.host.base import PAGE_SIZE

NAMESPACE = "nova_xen_ncm.policies"

# Xen's simple_precopy_policy (tools/libs/guest/xg_sr_save.c).
SPP_MAX_ITERATIONS = 5
SPP_TARGET_DIRTY_COUNT = 50

# Nova counts at least 2 GiB of RAM when scaling the completion timeout
# (LibvirtDriver._live_migration_data_gb), so small guests get a usable
# budget too.
COMPLETION_TIMEOUT_MIN_GIB = 2.0

GIB = 1024**3
MIB = 1024**2


class Action(str, enum.Enum):
    CONTINUE = "continue"
    STOP_AND_COPY = "stop_and_copy"
    #: Continue precopy with the vCPUs limited to ``Decision.throttle``.
    THROTTLE = "throttle"
    ABORT = "abort"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    #: For THROTTLE: the share of time the vCPUs may run (0 < f < 1).
    throttle: float | None = None
    reason: str = ""
    #: The downtime target cannot be met without stopping the guest's
    #: progress (throttled to its floor, the pause still would not fit):
    #: the sender says so in a progress event.
    target_unmet: bool = False
    #: The pause a stop and copy now would take, in seconds, when the
    #: policy estimated it.
    expected_pause: float | None = None
    #: Its parts (:class:`PauseParts`), for the progress events and for
    #: the switch-over history to tell the fixed part from the rest.
    parts: PauseParts | None = None

    def __post_init__(self) -> None:
        if (self.action is Action.THROTTLE) != (self.throttle is not None):
            raise ValueError("a throttle fraction goes with THROTTLE only")
        if self.throttle is not None and not 0 < self.throttle <= 1:
            raise ValueError(f"throttle fraction {self.throttle} not in (0,1]")


Policy = Callable[[PrecopyStats], Decision]


class TimeoutAction(str, enum.Enum):
    """What is done when a migration cannot end as asked: on an expired
    completion timeout, or when the ``downtime`` policy's target is out
    of reach."""

    ABORT = "abort"
    FORCE_COMPLETE = "force_complete"


#: A pause within this share of its target keeps it: the ``downtime``
#: policy never stops and copies with a longer pause expected, unless
#: ``[xen_ncm] downtime_unmet_action`` is ``force_complete``.
DOWNTIME_TOLERANCE = 1.2


#: Before this migration measured a round of dirty pages, and no pause
#: to the destination measured a page's cost, a page left is counted at
#: this many times what a page took in round 0 (its bytes over round 0's
#: bandwidth): the last pages are scattered and each end reads and
#: digests the block around each, which round 0's long runs of pages do
#: not pay. Measured (benchmarks/README.rst, ninth pass): 0.8 to 3.7
#: times with one channel (12 to 56 us against 15), 0.75 to 3.35 with
#: four and lz4 (60 to 268 us against 80).
PRIOR_PAGE_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class PolicyParams:
    """The knobs of the policies, from [xen_ncm] options."""

    downtime_target: float = 0.5
    #: The fixed part of the pause ([xen_ncm] switchover_estimate).
    switchover_estimate: float = 0.0
    #: Seconds a page left costs in the pause, as measured on earlier
    #: pauses to the same destination (engine/switchover.py); 0: unknown.
    pause_page_cost: float = 0.0
    #: While neither ``pause_page_cost`` nor a round of dirty pages of
    #: this migration measured it, a page left is counted at this many
    #: times what a page took in round 0 (0: not at all);
    #: :data:`PRIOR_PAGE_FACTOR` from conf.
    prior_page_factor: float = 0.0
    max_rounds: int = 30
    throttle_step: float = 0.2
    throttle_min: float = 0.1
    throttle_trigger_ratio: float = 0.5
    throttle_trigger_rounds: int = 2
    #: The migration's bandwidth cap in bytes per second, 0 for none
    #: ([xen_ncm] max_bandwidth): the pause is estimated at no more.
    max_bandwidth: float = 0.0
    #: What the ``downtime`` policy does once its target is out of reach
    #: ([xen_ncm] downtime_unmet_action): roll back, or pause longer.
    unmet_action: TimeoutAction = TimeoutAction.ABORT

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> PolicyParams:
        group = conf.xen_ncm
        return cls(
            downtime_target=group.downtime_target,
            switchover_estimate=group.switchover_estimate,
            max_rounds=group.max_rounds,
            throttle_step=group.throttle_step,
            throttle_min=group.throttle_min,
            throttle_trigger_ratio=group.throttle_trigger_ratio,
            throttle_trigger_rounds=group.throttle_trigger_rounds,
            max_bandwidth=group.max_bandwidth * MIB,
            prior_page_factor=PRIOR_PAGE_FACTOR,
            # Unset, what the operator chose for a migration that
            # cannot end in time, as Nova's one timeout action decides.
            unmet_action=TimeoutAction(
                group.downtime_unmet_action or group.completion_timeout_action
            ),
        )


# -- xen-simple -------------------------------------------------------


def xen_simple(stats: PrecopyStats) -> Decision:
    """Xen's default: stop under 50 dirty pages or after 5 rounds."""
    if 0 <= stats.dirty_count < SPP_TARGET_DIRTY_COUNT:
        return Decision(
            Action.STOP_AND_COPY,
            reason=f"{stats.dirty_count} dirty pages left",
        )
    if stats.iteration >= SPP_MAX_ITERATIONS:
        return Decision(
            Action.STOP_AND_COPY,
            reason=f"{stats.iteration} rounds done",
        )
    return Decision(Action.CONTINUE)


def xen_simple_factory(params: PolicyParams) -> Policy:
    return xen_simple


# -- downtime ---------------------------------------------------------


def effective_bandwidth(stats: PrecopyStats, cap: float = 0.0) -> float:
    """The bandwidth the rest will be sent at: the measured one, no more
    than the migration's cap (``cap`` 0: none)."""
    if cap > 0:
        return min(stats.bandwidth, cap)
    return stats.bandwidth


def measured_pace(stats: PrecopyStats) -> bool:
    """Whether a round after round 0 sent pages: the pace of scattered
    dirty pages of this migration, measured (:func:`transfer_time`)."""
    return any(
        r.round > 0 and (r.pages_sent or r.zero_pages) and r.duration > 0
        for r in stats.rounds
    )


def prior_page_cost(stats: PrecopyStats, factor: float) -> float:
    """Seconds a page left is counted at in the pause before anything
    measured it: ``factor`` times a page's bytes over round 0's
    bandwidth; 0 without round 0 or factor, or once a later round of
    this migration measured the pace of its dirty pages (that, not a
    guess from round 0, then tells the pause: on a slow host round 0's
    bandwidth times the factor priced the pages far above what they
    took)."""
    if factor <= 0 or not stats.rounds or measured_pace(stats):
        return 0.0
    first = stats.rounds[0].bandwidth
    return factor * PAGE_SIZE / first if first > 0 else 0.0


def page_cost(stats: PrecopyStats, params: PolicyParams) -> float:
    """The cost of a page left in the pause the policy counts: the one
    measured on earlier pauses, else the prior (:func:`prior_page_cost`)
    until this migration's rounds measure the pace."""
    if params.pause_page_cost > 0:
        return params.pause_page_cost
    return prior_page_cost(stats, params.prior_page_factor)


def transfer_time(
    stats: PrecopyStats, cap: float = 0.0, page_cost: float = 0.0
) -> float:
    """Seconds to send the pages left, in the pause.

    At the pace of the last round, page for page, when it sent any: a
    small round over scattered pages pays its fixed costs (a flush's
    round trip, the harvest) and its per-page ones at the rate the final
    copy, as small and as scattered, pays them, which a bandwidth
    smoothed over the big first rounds does not tell; and pages, not
    octets, because compression shrinks what was sent but not what is
    left. Never faster than the smoothed bandwidth nor the migration's
    ``cap`` allow, nor than ``page_cost`` seconds a page (what a page
    cost in earlier pauses, where each end also reads and digests the
    blocks around it)."""
    if stats.remaining_bytes == 0:
        return 0.0
    bandwidth = effective_bandwidth(stats, cap)
    by_bandwidth = max(
        stats.remaining_bytes / bandwidth if bandwidth > 0 else float("inf"),
        max(stats.dirty_count, 0) * page_cost,
    )
    if not stats.rounds:
        return by_bandwidth
    last = stats.rounds[-1]
    # Pages with content: a zero page costs a test, not a send, and the
    # pages a guest dirties are seldom zero (round 0 of a fresh guest is
    # mostly zero pages, which made its pace look twice what it is).
    pages = last.pages_sent or last.zero_pages
    if pages <= 0 or last.duration <= 0:
        return by_bandwidth
    by_pace = stats.dirty_count * last.duration / pages
    if cap > 0 and last.pages_sent > 0:
        # What each page left costs on the wire, as the last round sent.
        wire = stats.dirty_count * last.bytes_sent / last.pages_sent
        by_pace = max(by_pace, wire / cap)
    return max(by_pace, by_bandwidth)


@dataclasses.dataclass(frozen=True)
class PauseParts:
    """The pause a stop and copy now would take, in seconds, by part."""

    #: The switch-over's fixed part (history or switchover_estimate).
    fixed: float
    #: The transfer of the pages left (:func:`transfer_time`).
    transfer: float
    #: The transfer without the prior page cost (:func:`prior_page_cost`,
    #: None: the prior not counted): what the switch-over history takes
    #: off the pause measured, as a guess four times the pace would make
    #: the fixed part learned short, and the next pauses long.
    paced: float | None = None

    @property
    def measured_transfer(self) -> float:
        """The transfer by what this migration and the history measured."""
        return self.transfer if self.paced is None else self.paced

    @property
    def total(self) -> float:
        return self.fixed + self.transfer

    def describe(self) -> str:
        return (
            f"{self.total:.3f}s: fixed {self.fixed:.3f}s, transfer "
            f"{self.transfer:.3f}s"
        )

    def to_dict(self) -> dict[str, float]:
        return {"fixed": self.fixed, "transfer": self.transfer}


def pause_parts(stats: PrecopyStats, params: PolicyParams) -> PauseParts:
    """The parts of the pause a stop and copy now would take."""
    paced = None
    if page_cost(stats, params) > 0 and params.pause_page_cost <= 0:
        paced = transfer_time(stats, params.max_bandwidth)
    return PauseParts(
        fixed=params.switchover_estimate,
        transfer=_transfer(stats, params),
        paced=paced,
    )


def expected_pause(stats: PrecopyStats, params: PolicyParams) -> float:
    """The pause a stop and copy now would take, in seconds: the fixed
    part of the switch-over and the transfer of the pages left
    (:func:`pause_parts`)."""
    return pause_parts(stats, params).total


def _transfer(stats: PrecopyStats, params: PolicyParams) -> float:
    return transfer_time(stats, params.max_bandwidth, page_cost(stats, params))


def fits_downtime(
    stats: PrecopyStats,
    downtime_target: float,
    switchover: float = 0.0,
    cap: float = 0.0,
    page_cost: float = 0.0,
) -> bool:
    """QEMU's switch-over rule, remaining <= bandwidth x downtime, with
    the fixed part of the pause (``switchover``) taken off the target,
    the transfer timed as :func:`transfer_time` does, held to the
    migration's ``cap`` and to ``page_cost`` a page."""
    budget = downtime_target - switchover
    if budget <= 0:
        return stats.remaining_bytes == 0
    return transfer_time(stats, cap, page_cost) <= budget


def rounds_at_pace(stats: PrecopyStats, ratio: float) -> int:
    """How many of the last rounds in a row the guest dirtied memory at
    ``ratio`` or more of the rate the wire carried it away (both in
    pages: compression shrinks the one, not the other)."""
    count = 0
    for rnd in reversed(stats.rounds):
        sent = rnd.pages_sent + rnd.zero_pages
        if sent <= 0 or rnd.dirty_pages < ratio * sent:
            break
        count += 1
    return count


def next_throttle(current: float, params: PolicyParams) -> float | None:
    """The next step down from ``current``, or None at the floor."""
    if current <= params.throttle_min:
        return None
    return max(params.throttle_min, round(current - params.throttle_step, 6))


#: Share of the transfer budget the throttle aims the next round's
#: transfer at: the dirty rate of a throttled guest is not exactly
#: proportional to its share of time, nor the pace of the wire steady.
THROTTLE_MARGIN = 0.5


def throttle_to_fit(stats: PrecopyStats, params: PolicyParams) -> float | None:
    """The throttle under which the pages dirtied in a round fit the
    pause: the current one scaled by the share of the transfer budget
    the pages left would take (with :data:`THROTTLE_MARGIN`), at least a
    step down, no lower than ``throttle_min``; None at the floor."""
    step = next_throttle(stats.throttle, params)
    if step is None:
        return None
    budget = params.downtime_target - params.switchover_estimate
    needed = _transfer(stats, params)
    if budget > 0 and needed > 0 and needed != float("inf"):
        scaled = stats.throttle * THROTTLE_MARGIN * budget / needed
    else:
        scaled = params.throttle_min
    return max(params.throttle_min, round(min(step, scaled), 6))


#: Rounds in which a throttled migration that cannot meet its target
#: must leave fewer pages than ever before to go on.
CONVERGE_ROUNDS = 3


def _converging(stats: PrecopyStats) -> bool:
    """Whether one of the last :data:`CONVERGE_ROUNDS` rounds left fewer
    pages than any round before them: rounds that cannot meet the target
    go on only while they still shrink what the pause will send (one
    round's noise on a loaded host does not end them)."""
    dirty = [r.dirty_pages for r in stats.rounds]
    if len(dirty) <= CONVERGE_ROUNDS:
        return True
    return min(dirty[-CONVERGE_ROUNDS:]) < min(dirty[:-CONVERGE_ROUNDS])


def downtime(stats: PrecopyStats, params: PolicyParams) -> Decision:
    """Stop when the rest fits the downtime target; else throttle a step
    each time the dirty rate kept pace with the bandwidth for
    ``throttle_trigger_rounds`` rounds (QEMU's auto-converge trigger).

    After ``max_rounds`` the target is not given up for a longer pause:
    each round the guest is throttled to the share of time under which
    what it dirties fits the target (:func:`throttle_to_fit`), saying so
    in the decision's reason (the sender's progress events carry it).
    Throttled to ``throttle_min`` and still not fitting, the target
    cannot be met without stopping the guest's progress: the decision
    says so (``target_unmet``, the sender's progress event reports it),
    and rounds go on at the floor while they still leave fewer pages.
    Once they no longer do (or after twice ``max_rounds``) the pause
    expected decides (:func:`_out_of_reach`): within
    :data:`DOWNTIME_TOLERANCE` of the target it is taken; longer, the
    migration is aborted, or with ``unmet_action`` ``force_complete``
    the guest is stopped for it, the reason saying how long.

    The pause expected has two parts (:class:`PauseParts`, in the
    decision and its reason): the fixed part and the pages left."""
    parts = pause_parts(stats, params)
    decision = _downtime(stats, params, parts)
    if (
        decision.action is Action.ABORT
        and params.pause_page_cost <= 0
        and prior_page_cost(stats, params.prior_page_factor) > 0
    ):
        # The prior only delays a stop until a round measured the pace;
        # a guess never cancels a migration that would go on without it.
        unguessed = dataclasses.replace(params, prior_page_factor=0.0)
        parts = pause_parts(stats, unguessed)
        decision = _downtime(stats, unguessed, parts)
    if decision.expected_pause is not None and decision.parts is None:
        decision = dataclasses.replace(decision, parts=parts)
    return decision


def _downtime(
    stats: PrecopyStats, params: PolicyParams, parts: PauseParts
) -> Decision:
    pause = parts.total
    budget = params.downtime_target - parts.fixed
    if stats.remaining_bytes == 0 if budget <= 0 else parts.transfer <= budget:
        return Decision(
            Action.STOP_AND_COPY,
            reason=(
                f"{stats.remaining_bytes} bytes fit "
                f"{params.downtime_target}s (expected pause "
                f"{parts.describe()})"
            ),
            expected_pause=pause,
            parts=parts,
        )
    if params.switchover_estimate >= params.downtime_target:
        return _fixed_part_too_long(stats, params, pause)
    if stats.iteration >= params.max_rounds:
        fraction = throttle_to_fit(stats, params)
        if fraction is not None:
            return Decision(
                Action.THROTTLE,
                throttle=fraction,
                reason=(
                    f"downtime target {params.downtime_target}s not met "
                    f"after {stats.iteration} rounds (a pause now would "
                    f"take {pause:.3f}s): guest throttled to {fraction}"
                ),
                expected_pause=pause,
            )
        unmet = (
            f"downtime target {params.downtime_target}s cannot be met "
            "without stopping the guest's progress: at its throttle "
            f"floor {params.throttle_min} a pause would take {pause:.3f}s"
        )
        if stats.iteration < 2 * params.max_rounds and _converging(stats):
            return Decision(
                Action.CONTINUE,
                reason=f"{unmet}; rounds go on while they converge",
                target_unmet=True,
                expected_pause=pause,
            )
        return _out_of_reach(
            params,
            pause,
            f"{unmet}; {stats.iteration} rounds done, no longer converging",
        )
    return _auto_converge(stats, params, pause) or Decision(
        Action.CONTINUE, expected_pause=pause
    )


def _out_of_reach(params: PolicyParams, pause: float, why: str) -> Decision:
    """The decision once rounds can no longer bring the pause down to
    the target: a pause ``pause`` within :data:`DOWNTIME_TOLERANCE` of
    the target is taken; a longer one only if the operator chose to
    (``unmet_action`` ``force_complete``), else the migration aborts
    and the guest keeps running on the source."""
    limit = DOWNTIME_TOLERANCE * params.downtime_target
    if pause <= limit:
        return Decision(
            Action.STOP_AND_COPY,
            reason=(
                f"{why}: the expected pause {pause:.3f}s is within "
                f"{limit:.3f}s, {DOWNTIME_TOLERANCE:.0%} of the target"
            ),
            target_unmet=True,
            expected_pause=pause,
        )
    if params.unmet_action is TimeoutAction.FORCE_COMPLETE:
        return Decision(
            Action.STOP_AND_COPY,
            reason=(
                f"{why}: expected pause {pause:.3f}s over the "
                f"{params.downtime_target}s target, taken as "
                "downtime_unmet_action is force_complete"
            ),
            target_unmet=True,
            expected_pause=pause,
        )
    return Decision(
        Action.ABORT,
        reason=(
            f"{why}: expected pause {pause:.3f}s over {limit:.3f}s "
            f"({DOWNTIME_TOLERANCE:.0%} of the {params.downtime_target}s "
            "target); aborted as downtime_unmet_action is abort, the "
            "guest keeps running on the source"
        ),
        target_unmet=True,
        expected_pause=pause,
    )


def _auto_converge(
    stats: PrecopyStats,
    params: PolicyParams,
    pause: float,
) -> Decision | None:
    """A step of throttle once the dirty rate kept pace with the wire for
    ``throttle_trigger_rounds`` rounds, else None."""
    pace = rounds_at_pace(stats, params.throttle_trigger_ratio)
    if not pace or pace % params.throttle_trigger_rounds:
        return None
    fraction = next_throttle(stats.throttle, params)
    if fraction is None:
        return None
    return Decision(
        Action.THROTTLE,
        throttle=fraction,
        reason=f"dirty rate kept pace for {pace} rounds",
        expected_pause=pause,
    )


def _fixed_part_too_long(
    stats: PrecopyStats, params: PolicyParams, pause: float
) -> Decision:
    """The fixed part of the pause alone takes the whole target: no
    throttle makes anything but an empty remainder fit, so the target is
    said to be unmet from the first round. Over
    :data:`DOWNTIME_TOLERANCE` of the target nothing can help, and with
    ``unmet_action`` ``abort`` the migration ends at once; else the
    guest is throttled to ``throttle_min`` for the shortest pause there
    is, and rounds go on while they still shrink what is left (at most
    twice ``max_rounds``) before :func:`_out_of_reach` decides."""
    unmet = (
        f"downtime target {params.downtime_target}s cannot be met: the "
        f"fixed part of the pause alone takes "
        f"{params.switchover_estimate:.3f}s (a pause now: {pause:.3f}s)"
    )
    hopeless = (
        params.switchover_estimate
        > DOWNTIME_TOLERANCE * params.downtime_target
    )
    if hopeless and params.unmet_action is TimeoutAction.ABORT:
        return _out_of_reach(params, pause, f"{unmet}; no throttle helps")
    if stats.iteration < 2 * params.max_rounds and _converging(stats):
        fraction = throttle_to_fit(stats, params)
        if fraction is not None:
            return Decision(
                Action.THROTTLE,
                throttle=fraction,
                reason=f"{unmet}; guest throttled to {fraction}",
                target_unmet=True,
                expected_pause=pause,
            )
        return Decision(
            Action.CONTINUE,
            reason=f"{unmet}; rounds go on while they converge",
            target_unmet=True,
            expected_pause=pause,
        )
    return _out_of_reach(
        params,
        pause,
        f"{unmet}; {stats.iteration} rounds done, no longer converging",
    )


def downtime_factory(params: PolicyParams) -> Policy:
    def policy(stats: PrecopyStats) -> Decision:
        return downtime(stats, params)

    return policy


# -- completion timeout -----------------------------------------------


def completion_timeout(memory_bytes: int, per_gib: float) -> float:
    """Seconds a migration may take, scaled by guest memory like Nova's
    ``live_migration_completion_timeout``; 0 means no limit."""
    if per_gib <= 0:
        return 0.0
    gib = max(memory_bytes / GIB, COMPLETION_TIMEOUT_MIN_GIB)
    return per_gib * gib


def timeout_decision(
    stats: PrecopyStats, timeout: float, action: TimeoutAction
) -> Decision | None:
    """The decision forced by an expired completion timeout, or None."""
    if timeout <= 0 or stats.elapsed <= timeout:
        return None
    reason = f"completion timeout {timeout:.0f}s exceeded"
    if TimeoutAction(action) is TimeoutAction.FORCE_COMPLETE:
        return Decision(Action.STOP_AND_COPY, reason=reason)
    return Decision(Action.ABORT, reason=reason)


def decide(
    stats: PrecopyStats,
    policy: Policy,
    timeout: float = 0.0,
    action: TimeoutAction = TimeoutAction.ABORT,
    *,
    force: bool = False,
) -> Decision:
    """The decision after a round: an operator's force-complete, then an
    expired completion timeout (Nova checks it before anything else),
    then the policy."""
    if force:
        return Decision(Action.STOP_AND_COPY, reason="force-complete")
    forced = timeout_decision(stats, timeout, action)
    return forced if forced is not None else policy(stats)


# -- registry ---------------------------------------------------------


def load_policy(name: str, params: PolicyParams) -> Policy:
    """The policy registered as ``name`` under ``nova_xen_ncm.policies``."""
    try:
        manager = stevedore.DriverManager(
            NAMESPACE, name, invoke_on_load=False
        )
    except stevedore.exception.NoMatches as exc:
        raise PolicyNotFound(
            f"no precopy policy {name!r}; known: "
            f"{', '.join(available_policies()) or 'none'}"
        ) from exc
    return manager.driver(params)


def available_policies() -> list[str]:
    return sorted(
        stevedore.ExtensionManager(NAMESPACE, invoke_on_load=False).names()
    )
