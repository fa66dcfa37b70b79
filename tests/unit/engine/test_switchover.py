"""The fixed part of the pause, as measured on earlier migrations."""

import pytest

from nova_xen_ncm.engine.switchover import SwitchoverHistory


def test_nothing_measured_is_no_fixed_part():
    assert SwitchoverHistory().estimate("192.0.2.1") == 0.0


def test_the_fixed_part_is_the_downtime_less_the_expected_transfer():
    history = SwitchoverHistory(window=1)
    assert history.record("192.0.2.1", 0.120, 0.020) == pytest.approx(0.1)
    assert history.estimate("192.0.2.1") == pytest.approx(0.1)
    # A transfer expected longer than the pause itself tells nothing of
    # the fixed part: not remembered.
    assert history.record("192.0.2.1", 0.050, 0.080) is None
    assert history.record("192.0.2.1", 0.050, 0.050) is None
    assert history.estimate("192.0.2.1") == pytest.approx(0.1)


def test_one_stalled_pause_is_not_the_estimate():
    # The first pause to a destination stalled (a reconnection in the
    # stop and copy): neither alone nor with one more is it the fixed
    # part of the next migrations'.
    history = SwitchoverHistory()
    history.record("192.0.2.1", 5.0, 0.0)
    assert history.estimate("192.0.2.1") == 0.0
    history.record("192.0.2.1", 0.05, 0.0)
    assert history.estimate("192.0.2.1") == 0.0
    history.record("192.0.2.1", 0.06, 0.0)
    assert history.estimate("192.0.2.1") == pytest.approx(0.06)


def test_the_estimate_of_three_is_their_median_per_destination():
    history = SwitchoverHistory(window=3)
    for downtime in (0.1, 0.1, 0.9):
        history.record("192.0.2.1", downtime, 0.0)
    # One stalled pause does not decide.
    assert history.estimate("192.0.2.1") == pytest.approx(0.1)
    history.record("192.0.2.1", 0.3, 0.0)
    history.record("192.0.2.1", 0.3, 0.0)
    # The first two fell out of the window of 3.
    assert history.estimate("192.0.2.1") == pytest.approx(0.3)
    # Another destination has its own.
    assert history.estimate("192.0.2.9") == 0.0


@pytest.mark.parametrize(
    "downtime,transfer,pages", [(-0.1, 0.0, 0), (0.1, -0.1, 0), (0.1, 0, -1)]
)
def test_negative_times_are_refused(downtime, transfer, pages):
    with pytest.raises(ValueError, match="must not be negative"):
        SwitchoverHistory().record("192.0.2.1", downtime, transfer, pages)


def test_a_pause_of_many_pages_measures_their_cost():
    history = SwitchoverHistory()
    # No fixed part known yet: a fixed part, as before.
    assert history.record("192.0.2.1", 0.5, 0.2, pages=4000) == pytest.approx(
        0.3
    )
    assert history.page_cost("192.0.2.1") == 0.0
    for _ in range(3):
        history.record("192.0.2.1", 0.05, 0.0)
    assert history.estimate("192.0.2.1") == pytest.approx(0.05)
    # 4000 pages expected to take 0.02 s of a 0.45 s pause: not a fixed
    # part of 0.43 s (it would grow with the pages' cost misjudged), but
    # 0.4 s for 4000 pages after the 0.05 s known, 100 us a page.
    assert history.record("192.0.2.1", 0.45, 0.02, pages=4000) is None
    assert history.estimate("192.0.2.1") == pytest.approx(0.05)
    # Used once three were measured, as the fixed part.
    assert history.page_cost("192.0.2.1") == 0.0
    for _ in range(2):
        history.record("192.0.2.1", 0.45, 0.02, pages=4000)
    assert history.page_cost("192.0.2.1") == pytest.approx(100e-6)
    # Too few pages for their cost to stand out of the fixed part's
    # noise: a fixed part.
    assert history.record("192.0.2.1", 0.08, 0.02, pages=511) == pytest.approx(
        0.06
    )
    # A pause no longer than the fixed part: nothing of pages.
    assert history.record("192.0.2.1", 0.04, 0.02, pages=4000) is None
    assert history.page_cost("192.0.2.1") == pytest.approx(100e-6)
    # Per destination, and the second highest of the last ones (after
    # the fixed part known now, the second longest of 0.3, 0.05, 0.05,
    # 0.05 and 0.06).
    assert history.page_cost("192.0.2.9") == 0.0
    assert history.estimate("192.0.2.1") == pytest.approx(0.06)
    history.record("192.0.2.1", 0.86, 0.5, pages=4000)
    history.record("192.0.2.1", 2.06, 0.5, pages=4000)
    # Of 100, 100, 100, 200 and 500 us.
    assert history.page_cost("192.0.2.1") == pytest.approx(200e-6)


def test_the_estimate_is_the_second_longest_of_the_window():
    history = SwitchoverHistory()
    for downtime in (0.05, 0.2, 0.06, 0.07, 0.08):
        history.record("192.0.2.1", downtime, 0.0)
    # Of five, the 80th percentile: one stalled pause (0.2) does not
    # decide, and four of five pauses were within the estimate.
    assert history.estimate("192.0.2.1") == pytest.approx(0.08)


def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window 0"):
        SwitchoverHistory(window=0)


def test_the_destinations_remembered_are_bounded():
    history = SwitchoverHistory(window=1, destinations=2)
    for address in ("192.0.2.1", "192.0.2.2"):
        history.record(address, 0.2, 0.0)
    # Recorded again: the most recent, kept over 192.0.2.2.
    history.record("192.0.2.1", 0.2, 0.0)
    history.record("192.0.2.3", 0.3, 0.0)
    assert history.estimate("192.0.2.2") == 0.0
    assert history.estimate("192.0.2.1") == pytest.approx(0.2)
    assert history.estimate("192.0.2.3") == pytest.approx(0.3)
    # The page costs of a destination forgotten go with it.
    history = SwitchoverHistory(window=1, destinations=1)
    history.record("192.0.2.1", 0.05, 0.0)
    history.record("192.0.2.1", 0.45, 0.02, pages=4000)
    assert history.page_cost("192.0.2.1") == pytest.approx(100e-6)
    history.record("192.0.2.2", 0.05, 0.0)
    assert history.page_cost("192.0.2.1") == 0.0
    with pytest.raises(ValueError, match="destinations 0"):
        SwitchoverHistory(destinations=0)


def test_a_refusal_forgets_the_longest_so_the_pause_is_measured_again():
    # Three pauses of a loaded moment: 1 s of fixed part, and a page
    # cost. A migration refused for them measures nothing; each refusal
    # forgets the longest, and once fewer than three are left, nothing
    # learned is used: the next migration measures again.
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 1.0, 0.0)
    for downtime in (2.0, 1.5, 1.5):
        history.record("192.0.2.1", downtime, 0.0, pages=1000)
    assert history.estimate("192.0.2.1") == pytest.approx(1.0)
    assert history.page_cost("192.0.2.1") == pytest.approx(500e-6)
    history.refused("192.0.2.1")
    assert history.estimate("192.0.2.1") == 0.0
    assert history.page_cost("192.0.2.1") == 0.0
    # Nothing left, or nothing known of a destination: nothing to do.
    history.refused("192.0.2.1")
    history.refused("192.0.2.1")
    history.refused("192.0.2.9")
    assert history.estimate("192.0.2.1") == 0.0


def test_one_stalled_pause_of_many_pages_is_not_the_page_cost():
    # A fixed part known, then one pause of many pages stalled by a
    # reconnection: 5 s for 1000 pages would price each page left 5 ms
    # and have the next migrations refused. Not used alone.
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 0.05, 0.0)
    history.record("192.0.2.1", 5.05, 0.0, pages=1000)
    assert history.page_cost("192.0.2.1") == 0.0
    history.record("192.0.2.1", 0.15, 0.0, pages=1000)
    history.record("192.0.2.1", 0.15, 0.0, pages=1000)
    assert history.page_cost("192.0.2.1") == pytest.approx(100e-6)


def test_a_page_costs_what_the_pause_took_beyond_the_fixed_part_counted():
    # The operator's switchover_estimate (0.25 s) is over the 0.05 s
    # measured: the policy counted 0.25 s, so a page's cost is what the
    # pause took beyond it, else the 0.2 s between them would be counted
    # again for the pages of the next pauses.
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 0.05, 0.0)
    for _ in range(3):
        history.record("192.0.2.1", 0.45, 0.02, pages=4000, fixed_floor=0.25)
    assert history.page_cost("192.0.2.1") == pytest.approx(50e-6)
    # Below what was measured, the floor changes nothing.
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 0.05, 0.0)
    for _ in range(3):
        history.record("192.0.2.1", 0.45, 0.02, pages=4000, fixed_floor=0.01)
    assert history.page_cost("192.0.2.1") == pytest.approx(100e-6)


def test_refusals_at_a_short_target_leave_a_longer_one_its_fixed_part():
    # Warm-ups measured 18 ms; two migrations at a 10 ms target were
    # refused for it. At 10 ms (and shorter) the history forgets as
    # before and the next migration measures the pause again; a 50 ms
    # target, which it never refused, still counts the 18 ms.
    history = SwitchoverHistory()
    for downtime in (0.017, 0.018, 0.019):
        history.record("192.0.2.1", downtime, 0.0)
    history.refused("192.0.2.1", 0.01)
    assert history.estimate("192.0.2.1", 0.01) == 0.0
    assert history.estimate("192.0.2.1", 0.005) == 0.0
    assert history.estimate("192.0.2.1") == 0.0
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.018)
    assert history.estimate("192.0.2.1", 0.011) == pytest.approx(0.018)
    history.refused("192.0.2.1", 0.01)
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.018)
    # A pause measured: the refusals apply to every target from then on,
    # but leave an estimate: the longest forgotten down to two, with the
    # new one three ...
    history.record("192.0.2.1", 0.016, 0.0)
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.017)
    assert history.estimate("192.0.2.1", 0.01) == pytest.approx(0.017)
    # ... and are not applied twice.
    history.record("192.0.2.1", 0.015, 0.0)
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.017)


def test_pauses_of_a_loaded_moment_drain_through_refusals():
    # Three pauses of 1 s learned; a 50 ms target refused until it
    # counts none, measures 20 ms; the loaded pauses go one by one.
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 1.0, 0.0)
    estimates = []
    for _ in range(5):
        refusals = 0
        while history.estimate("192.0.2.1", 0.05) >= 0.05:
            history.refused("192.0.2.1", 0.05)
            refusals += 1
            assert refusals <= 5, "refused for good"
        history.record("192.0.2.1", 0.02, 0.0)
        estimates.append(history.estimate("192.0.2.1", 0.05))
    assert estimates[-1] == pytest.approx(0.02)


def test_a_target_longer_than_the_fixed_part_is_not_refused_for_good():
    # 18 ms learned at a loaded moment; a 20 ms target is longer, but
    # its pages do not fit the 2 ms left and it is refused: each refusal
    # at 20 ms forgets the longest for it, until it counts none and
    # measures the pause again.
    history = SwitchoverHistory()
    for downtime in (0.017, 0.018, 0.019):
        history.record("192.0.2.1", downtime, 0.0)
    history.refused("192.0.2.1", 0.02)
    assert history.estimate("192.0.2.1", 0.02) == 0.0
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.018)
    # A refusal at a longer target also forgets for a shorter one.
    history = SwitchoverHistory()
    for downtime in (0.01, 0.017, 0.018, 0.019, 0.02):
        history.record("192.0.2.1", downtime, 0.0)
    history.refused("192.0.2.1", 0.05)
    history.refused("192.0.2.1", 0.01)
    assert history.estimate("192.0.2.1", 0.01) == pytest.approx(0.017)
    assert history.estimate("192.0.2.1", 0.05) == pytest.approx(0.018)
    assert history.estimate("192.0.2.1", 0.1) == pytest.approx(0.019)


def test_refusals_count_no_more_than_the_fixed_parts_known():
    history = SwitchoverHistory()
    for _ in range(3):
        history.record("192.0.2.1", 0.1, 0.0)
    for _ in range(10):
        history.refused("192.0.2.1")
    for target in (0.001, 0.002, 0.003, 0.5):
        history.refused("192.0.2.1", target)
    for _ in range(3):
        history.record("192.0.2.1", 0.2, 0.0)
    assert history.estimate("192.0.2.1") == pytest.approx(0.2)
