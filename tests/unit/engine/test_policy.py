"""Precopy policies as pure functions, on tables of statistics (the way
nova's test_migration.py tests its migration policy)."""

import dataclasses

import pytest

from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.errors import PolicyNotFound
from nova_xen_ncm.engine.policy import Action
from nova_xen_ncm.engine.policy import Decision
from nova_xen_ncm.engine.policy import PolicyParams
from nova_xen_ncm.engine.policy import TimeoutAction
from nova_xen_ncm.engine.stats import PrecopyStats
from nova_xen_ncm.engine.stats import RoundStats

GIB = 1024**3
MB = 1_000_000


def snap(
    iteration=1,
    dirty=1000,
    bandwidth=100 * MB,
    throttle=1.0,
    rounds=(),
    elapsed=1.0,
    memory=GIB,
):
    return PrecopyStats(
        iteration=iteration,
        dirty_count=dirty,
        total_written=0,
        bytes_sent=0,
        remaining_bytes=max(dirty, 0) * 4096,
        bandwidth=bandwidth,
        dirty_rate=0.0,
        elapsed=elapsed,
        expected_downtime=0.0,
        memory_bytes=memory,
        throttle=throttle,
        rounds=tuple(rounds),
    )


def rnd(n, sent_bytes, dirty_pages, duration=1.0):
    return RoundStats(
        round=n,
        pages_sent=sent_bytes // 4096,
        bytes_sent=sent_bytes,
        zero_pages=0,
        dirty_pages=dirty_pages,
        duration=duration,
    )


# Pages dirtied at 60% of the bytes sent: keeps pace at ratio 0.5.
HOT = 60 * MB // 4096
COLD = 10 * MB // 4096


@pytest.mark.parametrize(
    "iteration,dirty,expected",
    [
        (0, -1, Action.CONTINUE),  # unknown dirty count
        (1, 100_000, Action.CONTINUE),
        (1, 50, Action.CONTINUE),
        (1, 49, Action.STOP_AND_COPY),
        (1, 0, Action.STOP_AND_COPY),
        (4, 100_000, Action.CONTINUE),
        (5, 100_000, Action.STOP_AND_COPY),
        (9, 100_000, Action.STOP_AND_COPY),
    ],
)
def test_xen_simple(iteration, dirty, expected):
    assert policy.xen_simple(snap(iteration, dirty)).action is expected


PARAMS = PolicyParams(
    downtime_target=0.5,
    max_rounds=10,
    throttle_step=0.2,
    throttle_min=0.2,
    throttle_trigger_ratio=0.5,
    throttle_trigger_rounds=2,
)


@pytest.mark.parametrize(
    "stats,expected,fraction",
    [
        # 100 MB/s x 0.5 s = 50 MB: 12207 pages fit, 12208 do not.
        (snap(dirty=12207), Action.STOP_AND_COPY, None),
        (snap(dirty=12208), Action.CONTINUE, None),
        # No bandwidth measured yet: only an empty remainder fits.
        (snap(dirty=1, bandwidth=0.0), Action.CONTINUE, None),
        (snap(dirty=0, bandwidth=0.0), Action.STOP_AND_COPY, None),
        # The round bound: the target is kept by throttling to the share
        # of time under which the rest fits (half the 0.5 s budget over
        # the 1 s that 24414 pages take at 100 MB/s)...
        (snap(iteration=10, dirty=24414), Action.THROTTLE, 0.25),
        (snap(iteration=10, dirty=12500), Action.THROTTLE, 0.488),
        # ... no lower than the floor...
        (snap(iteration=10, dirty=10**6), Action.THROTTLE, 0.2),
        (snap(iteration=11, dirty=10**6, throttle=0.4), Action.THROTTLE, 0.2),
        # ... where rounds go on while they converge ...
        (
            snap(iteration=12, dirty=10**6, throttle=0.2),
            Action.CONTINUE,
            None,
        ),
        (
            snap(
                iteration=12,
                dirty=10**6,
                throttle=0.2,
                rounds=[rnd(i, 100 * MB, 20_000) for i in range(3)]
                + [rnd(3, 100 * MB, 10_000)],
            ),
            Action.CONTINUE,
            None,
        ),
        # ... and, the pause still 80 times the target, abort once they
        # no longer do, or after 2 x max_rounds (downtime_unmet_action's
        # default): never a longer pause than asked.
        (
            snap(
                iteration=12,
                dirty=10**6,
                throttle=0.2,
                rounds=[rnd(i, 100 * MB, 10_000) for i in range(4)],
            ),
            Action.ABORT,
            None,
        ),
        (
            snap(iteration=20, dirty=10**6, throttle=0.2),
            Action.ABORT,
            None,
        ),
        (snap(iteration=9, dirty=10**6), Action.CONTINUE, None),
        # One hot round is not a trend.
        (
            snap(
                dirty=10**6,
                rounds=[rnd(0, 100 * MB, COLD), rnd(1, 100 * MB, HOT)],
            ),
            Action.CONTINUE,
            None,
        ),
        # Two in a row: throttle one step.
        (
            snap(
                dirty=10**6,
                rounds=[rnd(0, 100 * MB, HOT), rnd(1, 100 * MB, HOT)],
            ),
            Action.THROTTLE,
            0.8,
        ),
        # A third: wait for the next pair (QEMU resets its counter).
        (
            snap(
                dirty=10**6,
                throttle=0.8,
                rounds=[rnd(i, 100 * MB, HOT) for i in range(3)],
            ),
            Action.CONTINUE,
            None,
        ),
        (
            snap(
                dirty=10**6,
                throttle=0.8,
                rounds=[rnd(i, 100 * MB, HOT) for i in range(4)],
            ),
            Action.THROTTLE,
            0.6,
        ),
        # Stepping stops at the floor.
        (
            snap(
                dirty=10**6,
                throttle=0.3,
                rounds=[rnd(i, 100 * MB, HOT) for i in range(2)],
            ),
            Action.THROTTLE,
            0.2,
        ),
        (
            snap(
                dirty=10**6,
                throttle=0.2,
                rounds=[rnd(i, 100 * MB, HOT) for i in range(2)],
            ),
            Action.CONTINUE,
            None,
        ),
        # Fitting the target wins over throttling.
        (
            snap(dirty=100, rounds=[rnd(i, 100 * MB, HOT) for i in range(2)]),
            Action.STOP_AND_COPY,
            None,
        ),
    ],
)
def test_downtime(stats, expected, fraction):
    decision = policy.downtime(stats, PARAMS)
    assert decision.action is expected
    if fraction is None:
        assert decision.throttle is None
    else:
        assert decision.throttle == pytest.approx(fraction, abs=1e-3)


@pytest.mark.parametrize(
    "switchover,dirty,expected",
    [
        # 100 MB/s x (0.5 - 0.1) s = 40 MB: 9765 pages fit, 9766 do not.
        (0.1, 9765, Action.STOP_AND_COPY),
        (0.1, 9766, Action.CONTINUE),
        # A switch-over as long as the target leaves room for no page:
        # the guest is throttled for the shortest pause there is.
        (0.5, 1, Action.THROTTLE),
        (0.5, 0, Action.STOP_AND_COPY),
        (0.6, 1, Action.THROTTLE),
        # Over 120 % of the target nothing helps: aborted at once.
        (0.61, 1, Action.ABORT),
        (0.7, 0, Action.STOP_AND_COPY),
    ],
)
def test_downtime_leaves_the_switchover_out_of_the_target(
    switchover, dirty, expected
):
    params = dataclasses.replace(PARAMS, switchover_estimate=switchover)
    decision = policy.downtime(snap(dirty=dirty), params)
    assert decision.action is expected


def test_past_max_rounds_the_reasons_say_the_target_is_not_met():
    throttled = policy.downtime(snap(iteration=10, dirty=10**6), PARAMS)
    assert "downtime target 0.5s not met after 10 rounds" in (throttled.reason)
    # 10**6 pages at 100 MB/s.
    assert "take 40.960s" in throttled.reason
    assert "throttled to 0.2" in throttled.reason
    assert not throttled.target_unmet
    assert throttled.expected_pause == pytest.approx(40.96)
    going = policy.downtime(
        snap(iteration=14, dirty=10**6, throttle=0.2), PARAMS
    )
    assert going.action is Action.CONTINUE
    assert going.target_unmet
    assert "cannot be met without stopping the guest's progress" in (
        going.reason
    )
    assert "throttle floor 0.2 a pause would take 40.960s" in going.reason
    aborted = policy.downtime(
        snap(iteration=20, dirty=10**6, throttle=0.2), PARAMS
    )
    assert aborted.action is Action.ABORT
    assert aborted.target_unmet
    assert "expected pause 40.960s over 0.600s" in aborted.reason
    assert "downtime_unmet_action is abort" in aborted.reason
    forced = policy.downtime(
        snap(iteration=20, dirty=10**6, throttle=0.2),
        dataclasses.replace(PARAMS, unmet_action=TimeoutAction.FORCE_COMPLETE),
    )
    assert forced.action is Action.STOP_AND_COPY
    assert forced.target_unmet
    assert "expected pause 40.960s over the 0.5s target" in forced.reason
    assert "force_complete" in forced.reason


def test_a_pause_that_fits_is_not_reported_unmet():
    decision = policy.downtime(snap(dirty=100), PARAMS)
    assert decision.action is Action.STOP_AND_COPY
    assert not decision.target_unmet
    assert decision.expected_pause == pytest.approx(100 * 4096 / (100 * MB))


@pytest.mark.parametrize(
    "last,dirty,expected",
    [
        # The last round sent 1000 pages in 0.1 s: 10000 pages/s, far
        # below the 100 MB/s (24414 pages/s) smoothed over the first
        # rounds. 0.5 s is 5000 pages at that pace, not 12207.
        (rnd(3, 1000 * 4096, 5000, duration=0.1), 5000, Action.STOP_AND_COPY),
        (rnd(3, 1000 * 4096, 5001, duration=0.1), 5001, Action.CONTINUE),
        (rnd(3, 1000 * 4096, 12207, duration=0.1), 12207, Action.CONTINUE),
        # A last round faster than the smoothed bandwidth does not make
        # the estimate lower than the bandwidth's.
        (
            rnd(3, 1000 * 4096, 12207, duration=0.01),
            12207,
            Action.STOP_AND_COPY,
        ),
        (rnd(3, 1000 * 4096, 12208, duration=0.01), 12208, Action.CONTINUE),
    ],
)
def test_the_pause_is_estimated_at_the_pace_of_the_last_round(
    last, dirty, expected
):
    stats = snap(dirty=dirty, rounds=[rnd(0, 1000 * MB, 0, 10.0), last])
    assert policy.downtime(stats, PARAMS).action is expected


def test_zero_pages_do_not_make_the_pace_look_faster():
    # Round 0 of a fresh guest: 1000 pages with content and 9000 zero
    # ones in 0.1 s. The 1000 dirty pages left go at the pace of the
    # pages with content, 0.1 s, not of all 10000 (0.01 s).
    first = RoundStats(
        round=0,
        pages_sent=1000,
        bytes_sent=1000 * 4096,
        zero_pages=9000,
        dirty_pages=1000,
        duration=0.1,
    )
    stats = snap(dirty=1000, bandwidth=1000 * MB, rounds=[first])
    assert policy.transfer_time(stats) == pytest.approx(0.1)
    params = dataclasses.replace(PARAMS, downtime_target=0.05)
    assert policy.downtime(stats, params).action is Action.CONTINUE


def test_compressed_rounds_are_paced_in_pages_not_octets():
    # 1000 pages went as 400 KB in 0.1 s (lz4): 4 MB/s on the wire, yet
    # 10000 pages/s. 1000 pages left take 0.1 s, which fits 0.5 s.
    compressed = RoundStats(
        round=1,
        pages_sent=1000,
        bytes_sent=400_000,
        zero_pages=0,
        dirty_pages=1000,
        duration=0.1,
    )
    stats = snap(dirty=1000, bandwidth=4 * MB, rounds=[compressed])
    assert policy.transfer_time(stats) == pytest.approx(1.024)
    params = dataclasses.replace(PARAMS, downtime_target=0.2)
    # The octets left over the wire's bandwidth would call it 1 s: the
    # smoothed bandwidth holds it there (never faster than measured).
    assert policy.downtime(stats, params).action is Action.CONTINUE
    # Pace of the guest against the wire, in pages: 1000 dirtied for 1000
    # sent keeps pace at ratio 1, although 4 MB of pages against 400 KB
    # of octets would look ten times as fast.
    assert policy.rounds_at_pace(stats, 1.0) == 1
    assert policy.rounds_at_pace(stats, 1.01) == 0


@pytest.mark.parametrize(
    "cap,dirty,expected",
    [
        # No cap: 100 MB/s x 0.5 s, 12207 pages fit.
        (0.0, 12207, Action.STOP_AND_COPY),
        # Capped at 10 MB/s: 5 MB, 1220 pages fit, 1221 do not.
        (10 * MB, 1220, Action.STOP_AND_COPY),
        (10 * MB, 1221, Action.CONTINUE),
        # A cap above the measured bandwidth changes nothing.
        (1000 * MB, 12207, Action.STOP_AND_COPY),
        (1000 * MB, 12208, Action.CONTINUE),
    ],
)
def test_downtime_estimates_the_pause_at_the_bandwidth_cap(
    cap, dirty, expected
):
    params = dataclasses.replace(PARAMS, max_bandwidth=cap)
    assert policy.downtime(snap(dirty=dirty), params).action is expected


def test_rounds_at_pace_counts_the_tail():
    rounds = [rnd(0, 100 * MB, HOT), rnd(1, 100 * MB, COLD)] + [
        rnd(i, 100 * MB, HOT) for i in range(2, 5)
    ]
    assert policy.rounds_at_pace(snap(rounds=rounds), 0.5) == 3
    assert policy.rounds_at_pace(snap(rounds=rounds), 0.7) == 0
    assert policy.rounds_at_pace(snap(rounds=[rnd(0, 0, HOT)]), 0.5) == 0


def test_decision_checks_throttle():
    with pytest.raises(ValueError):
        Decision(Action.THROTTLE)
    with pytest.raises(ValueError):
        Decision(Action.CONTINUE, throttle=0.5)
    with pytest.raises(ValueError):
        Decision(Action.THROTTLE, throttle=0.0)


@pytest.mark.parametrize(
    "memory,per_gib,expected",
    [
        (8 * GIB, 800, 6400.0),
        (GIB, 800, 1600.0),  # at least 2 GiB counted, like Nova
        (512 * 1024**2, 100, 200.0),
        (3 * GIB, 10, 30.0),
        (64 * GIB, 0, 0.0),  # disabled
    ],
)
def test_completion_timeout(memory, per_gib, expected):
    assert policy.completion_timeout(memory, per_gib) == expected


@pytest.mark.parametrize(
    "elapsed,timeout,action,expected",
    [
        (99.0, 100.0, TimeoutAction.ABORT, None),
        (100.0, 100.0, TimeoutAction.ABORT, None),
        (100.5, 100.0, TimeoutAction.ABORT, Action.ABORT),
        (100.5, 100.0, TimeoutAction.FORCE_COMPLETE, Action.STOP_AND_COPY),
        (10**6, 0.0, TimeoutAction.ABORT, None),
        (100.5, 100.0, "force_complete", Action.STOP_AND_COPY),
    ],
)
def test_timeout_decision(elapsed, timeout, action, expected):
    decision = policy.timeout_decision(snap(elapsed=elapsed), timeout, action)
    if expected is None:
        assert decision is None
    else:
        assert decision.action is expected
        assert "completion timeout" in decision.reason


def test_registry_loads_by_name():
    assert {"xen-simple", "downtime"} <= set(policy.available_policies())
    simple = policy.load_policy("xen-simple", PARAMS)
    assert simple(snap(dirty=10)).action is Action.STOP_AND_COPY
    down = policy.load_policy("downtime", PARAMS)
    assert down(snap(iteration=10, dirty=100)).action is (Action.STOP_AND_COPY)
    assert down(snap(iteration=3, dirty=10**6)).action is Action.CONTINUE


def test_registry_unknown_name():
    with pytest.raises(PolicyNotFound, match="downtime"):
        policy.load_policy("no-such-policy", PARAMS)


def test_params_from_conf():
    from oslo_config import cfg

    from nova_xen_ncm.conf import xen_ncm

    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    conf.set_override("downtime_target", 0.25, group="xen_ncm")
    conf.set_override("max_rounds", 7, group="xen_ncm")
    conf.set_override("switchover_estimate", 0.008, group="xen_ncm")
    conf.set_override("max_bandwidth", 100, group="xen_ncm")
    params = PolicyParams.from_conf(conf)
    assert params.max_bandwidth == 100 * 1024 * 1024
    assert params.downtime_target == 0.25
    assert params.switchover_estimate == 0.008
    assert params.max_rounds == 7
    assert params.throttle_trigger_rounds == 2


def test_decide_checks_the_timeout_before_the_policy():
    late = snap(elapsed=500.0, dirty=10)
    assert policy.decide(late, policy.xen_simple).action is (
        Action.STOP_AND_COPY
    )
    assert policy.decide(late, policy.xen_simple, 100.0).action is (
        Action.ABORT
    )
    early = snap(elapsed=5.0, dirty=10**6, iteration=1)
    assert (
        policy.decide(
            early, policy.xen_simple, 100.0, TimeoutAction.FORCE_COMPLETE
        ).action
        is Action.CONTINUE
    )


def test_a_fixed_part_as_long_as_the_target_is_said_unmet_at_once():
    params = dataclasses.replace(PARAMS, switchover_estimate=0.5)
    # Throttled to the floor at once, for the shortest pause there is.
    first = policy.downtime(snap(iteration=1, dirty=1000), params)
    assert first.action is Action.THROTTLE
    assert first.throttle == pytest.approx(0.2)
    assert first.target_unmet
    assert "fixed part of the pause alone takes 0.500s" in first.reason
    # At the floor, rounds go on while they shrink what is left...
    going = policy.downtime(
        snap(
            iteration=4,
            dirty=1000,
            throttle=0.2,
            rounds=[rnd(i, MB, 2000) for i in range(3)] + [rnd(3, MB, 1000)],
        ),
        params,
    )
    assert going.action is Action.CONTINUE
    assert going.target_unmet
    # ... and once they no longer do, or after twice max_rounds, the
    # pause expected decides: rounds of 244 pages a second leave 1000
    # pages for 4.1 s, over 120 % of the target (aborted) ...
    flat = policy.downtime(
        snap(
            iteration=4,
            dirty=1000,
            throttle=0.2,
            rounds=[rnd(i, MB, 1000) for i in range(4)],
        ),
        params,
    )
    assert flat.action is Action.ABORT
    assert flat.target_unmet
    assert "no longer converging" in flat.reason
    # ... at 100 MB/s, 0.541 s, within 0.6 s: taken.
    last = policy.downtime(snap(iteration=20, dirty=1000), params)
    assert last.action is Action.STOP_AND_COPY
    assert last.target_unmet
    assert "within 0.600s" in last.reason
    # 5000 pages: 0.705 s, over 120 %: aborted.
    over = policy.downtime(snap(iteration=20, dirty=5000), params)
    assert over.action is Action.ABORT
    assert over.expected_pause == pytest.approx(0.5 + 5000 * 4096 / MB / 100)


@pytest.mark.parametrize(
    "fixed,action,expected",
    [
        # The fixed part alone is over 120 % of the target: nothing will
        # make it fit. Aborted after the first round (the guest is not
        # throttled for nothing) ...
        (0.7, TimeoutAction.ABORT, Action.ABORT),
        # ... or throttled to its floor for the shortest pause there is,
        # if the operator chose a longer pause over none.
        (0.7, TimeoutAction.FORCE_COMPLETE, Action.THROTTLE),
        # Within 120 %: worth trying whatever the choice.
        (0.55, TimeoutAction.ABORT, Action.THROTTLE),
    ],
)
def test_a_fixed_part_out_of_reach_follows_the_operators_choice(
    fixed, action, expected
):
    params = dataclasses.replace(
        PARAMS, switchover_estimate=fixed, unmet_action=action
    )
    decision = policy.downtime(snap(iteration=1, dirty=1000), params)
    assert decision.action is expected
    assert decision.target_unmet
    if expected is Action.ABORT:
        assert "no throttle helps" in decision.reason
        assert "guest keeps running on the source" in decision.reason


@pytest.mark.parametrize(
    "dirty,action,expected",
    [
        # Past 2 x max_rounds at the floor: 14648 pages at 100 MB/s are
        # 0.600 s, 120 % of the target: taken whatever the choice.
        (14648, TimeoutAction.ABORT, Action.STOP_AND_COPY),
        (14649, TimeoutAction.ABORT, Action.ABORT),
        (14649, TimeoutAction.FORCE_COMPLETE, Action.STOP_AND_COPY),
    ],
)
def test_a_pause_is_never_longer_than_120_percent_unless_chosen(
    dirty, action, expected
):
    params = dataclasses.replace(PARAMS, unmet_action=action)
    stats = snap(iteration=20, dirty=dirty, throttle=0.2)
    decision = policy.downtime(stats, params)
    assert decision.action is expected
    assert decision.target_unmet


@pytest.mark.parametrize(
    "page_cost,dirty,expected",
    [
        # Without a page cost, 12207 pages at 100 MB/s fit 0.5 s.
        (0.0, 12207, Action.STOP_AND_COPY),
        # Pages that cost 100 us each in earlier pauses: 5000 fit ...
        (100e-6, 5000, Action.STOP_AND_COPY),
        # ... 5001 do not, although the precopy's pace says they would.
        (100e-6, 5001, Action.CONTINUE),
        # A page cost below the pace measured changes nothing.
        (1e-6, 12207, Action.STOP_AND_COPY),
        (1e-6, 12208, Action.CONTINUE),
    ],
)
def test_the_pause_counts_what_a_page_cost_in_earlier_pauses(
    page_cost, dirty, expected
):
    params = dataclasses.replace(PARAMS, pause_page_cost=page_cost)
    decision = policy.downtime(snap(dirty=dirty), params)
    assert decision.action is expected
    assert decision.expected_pause == pytest.approx(
        max(dirty * 4096 / (100 * MB), dirty * page_cost)
    )


def test_the_throttle_to_fit_counts_the_page_cost():
    # 24414 pages at 100 MB/s take 1 s: half the 0.5 s budget over it
    # is 0.25; at 100 us a page they take 2.44 s: 0.102.
    stats = snap(iteration=10, dirty=24414)
    assert policy.throttle_to_fit(stats, PARAMS) == pytest.approx(
        0.25, abs=1e-3
    )
    params = dataclasses.replace(
        PARAMS, pause_page_cost=100e-6, throttle_min=0.01
    )
    assert policy.throttle_to_fit(stats, params) == pytest.approx(
        0.5 * 0.5 / 2.4414, abs=1e-3
    )


def test_params_take_the_unmet_action_from_conf():
    from oslo_config import cfg

    from nova_xen_ncm.conf import xen_ncm

    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    assert PolicyParams.from_conf(conf).unmet_action is TimeoutAction.ABORT
    conf.set_override(
        "downtime_unmet_action", "force_complete", group="xen_ncm"
    )
    assert (
        PolicyParams.from_conf(conf).unmet_action
        is TimeoutAction.FORCE_COMPLETE
    )
    with pytest.raises(ValueError):
        conf.set_override("downtime_unmet_action", "pause", group="xen_ncm")


def test_an_unset_unmet_action_is_the_completion_timeout_action():
    # An operator who asked for migrations to complete at the timeout
    # (as Nova's live_migration_timeout_action = force_complete) does
    # not have them cancelled before it for their target; set, the
    # option decides.
    from oslo_config import cfg

    from nova_xen_ncm.conf import xen_ncm

    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    conf.set_override(
        "completion_timeout_action", "force_complete", group="xen_ncm"
    )
    assert (
        PolicyParams.from_conf(conf).unmet_action
        is TimeoutAction.FORCE_COMPLETE
    )
    conf.set_override("downtime_unmet_action", "abort", group="xen_ncm")
    assert PolicyParams.from_conf(conf).unmet_action is TimeoutAction.ABORT


# -- the pause's parts, and a prior page cost ------------------------------

# Round 0 sent 1000 MB in 10 s: 100 MB/s, 40.96 us a page.
ROUND_0 = rnd(0, 1000 * MB, 0, 10.0)


@pytest.mark.parametrize(
    "factor,measured,dirty,expected",
    [
        # No prior: 12207 pages at round 0's pace fit 0.5 s.
        (0.0, 0.0, 12207, Action.STOP_AND_COPY),
        # Nothing measured yet: each page counts four times round 0's
        # 40.96 us, 163.84 us: 3051 pages fit 0.5 s, 3052 do not.
        (4.0, 0.0, 3051, Action.STOP_AND_COPY),
        (4.0, 0.0, 3052, Action.CONTINUE),
        # A cost measured on earlier pauses replaces the prior, lower or
        # higher: 100 us a page, 5000 fit.
        (4.0, 100e-6, 5000, Action.STOP_AND_COPY),
        (4.0, 100e-6, 5001, Action.CONTINUE),
    ],
)
def test_before_any_pause_measured_a_page_costs_the_prior(
    factor, measured, dirty, expected
):
    params = dataclasses.replace(
        PARAMS, prior_page_factor=factor, pause_page_cost=measured
    )
    stats = snap(dirty=dirty, rounds=[ROUND_0])
    decision = policy.downtime(stats, params)
    assert decision.action is expected
    cost = measured or factor * 4096 / (100 * MB)
    assert decision.parts.transfer == pytest.approx(
        max(dirty * 4096 / (100 * MB), dirty * cost), rel=1e-4
    )


def test_the_prior_needs_round_0():
    assert policy.prior_page_cost(snap(), 4.0) == 0.0
    assert policy.prior_page_cost(snap(rounds=[ROUND_0]), 0.0) == 0.0
    assert policy.prior_page_cost(
        snap(rounds=[ROUND_0]), 4.0
    ) == pytest.approx(4 * 40.96e-6)


def test_the_conf_counts_the_prior():
    from oslo_config import cfg

    from nova_xen_ncm.conf import xen_ncm

    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    params = PolicyParams.from_conf(conf)
    assert params.prior_page_factor == policy.PRIOR_PAGE_FACTOR > 0


def test_a_round_of_dirty_pages_replaces_the_prior():
    # Round 1 sent 100 scattered pages in 1 ms, 10 us a page: that pace,
    # not four times round 0's 40.96 us, now tells the pause.
    round_1 = rnd(1, 100 * 4096, 3052, 0.001)
    params = dataclasses.replace(PARAMS, prior_page_factor=4.0)
    stats = snap(iteration=2, dirty=3052, rounds=[ROUND_0, round_1])
    assert policy.measured_pace(stats)
    assert policy.prior_page_cost(stats, 4.0) == 0.0
    decision = policy.downtime(stats, params)
    assert decision.action is Action.STOP_AND_COPY
    # A round that sent nothing measured nothing: the prior stays.
    empty = rnd(1, 0, 3052, 0.001)
    stats = snap(iteration=2, dirty=3052, rounds=[ROUND_0, empty])
    assert not policy.measured_pace(stats)
    assert policy.downtime(stats, params).action is Action.CONTINUE


def test_the_prior_never_makes_a_migration_abort():
    # Rounds done, the guest at its throttle floor: the pages left at
    # four times round 0's pace (0.82 s) are over 120 % of the 0.5 s
    # target, at round 0's pace (0.2 s) within it. The guess does not
    # cancel what would have gone on: the pause of the pace is taken.
    params = dataclasses.replace(
        PARAMS, prior_page_factor=4.0, max_rounds=1, throttle_min=1.0
    )
    stats = snap(iteration=2, dirty=5000, rounds=[ROUND_0])
    decision = policy.downtime(stats, params)
    assert decision.action is Action.STOP_AND_COPY
    assert decision.parts.transfer == pytest.approx(5000 * 40.96e-6, rel=1e-4)
    without = dataclasses.replace(params, prior_page_factor=0.0)
    assert policy.downtime(stats, without).action is Action.STOP_AND_COPY
    # Over the tolerance even at the pace: aborted, as without a prior.
    stats = snap(iteration=2, dirty=20_000, rounds=[ROUND_0])
    assert policy.downtime(stats, params).action is Action.ABORT


def test_a_stop_says_the_parts_of_the_pause_it_expects():
    params = dataclasses.replace(PARAMS, switchover_estimate=0.1)
    decision = policy.downtime(snap(dirty=1000), params)
    assert decision.action is Action.STOP_AND_COPY
    assert "expected pause 0.141s: fixed 0.100s, transfer 0.041s" in (
        decision.reason
    )
    assert decision.parts.to_dict() == {
        "fixed": pytest.approx(0.1),
        "transfer": pytest.approx(1000 * 4096 / (100 * MB)),
    }


def test_an_unmet_target_carries_the_parts_of_the_pause():
    # Past max_rounds at the throttle floor: each decision that says the
    # target is unmet gives the pause expected by part.
    params = dataclasses.replace(PARAMS, switchover_estimate=0.01)
    stats = snap(iteration=20, dirty=100_000, throttle=0.2)
    decision = policy.downtime(stats, params)
    assert decision.target_unmet
    assert decision.parts.fixed == pytest.approx(0.01)
    assert decision.expected_pause == pytest.approx(decision.parts.total)


def test_the_parts_keep_the_transfer_without_the_prior():
    # What the history takes off the pause measured is the transfer at
    # the pace measured: taking the prior's off would learn a fixed part
    # short by the guess.
    params = dataclasses.replace(PARAMS, prior_page_factor=4.0)
    parts = policy.pause_parts(snap(dirty=1000, rounds=[ROUND_0]), params)
    assert parts.transfer == pytest.approx(1000 * 4 * 40.96e-6, rel=1e-4)
    assert parts.paced == pytest.approx(1000 * 40.96e-6, rel=1e-4)
    assert parts.measured_transfer == parts.paced
    assert parts.to_dict() == {"fixed": 0.0, "transfer": parts.transfer}
    # Measured on earlier pauses, the page cost is no guess.
    measured = dataclasses.replace(params, pause_page_cost=100e-6)
    parts = policy.pause_parts(snap(dirty=1000, rounds=[ROUND_0]), measured)
    assert parts.paced is None
    assert parts.measured_transfer == parts.transfer
