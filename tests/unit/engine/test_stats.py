"""Per-migration statistics and the snapshot handed to policies."""

import dataclasses
import json

import pytest

from nova_xen_ncm.engine import stats as stats_mod
from nova_xen_ncm.engine.stats import MigrationStats
from nova_xen_ncm.engine.stats import RoundStats
from nova_xen_ncm.host.base import PAGE_SIZE


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_round_rates():
    rnd = RoundStats(
        round=0,
        pages_sent=100,
        bytes_sent=1_000_000,
        zero_pages=5,
        dirty_pages=50,
        duration=2.0,
    )
    assert rnd.bandwidth == 500_000
    assert rnd.dirty_rate == 50 * PAGE_SIZE / 2.0
    zero = dataclasses.replace(rnd, duration=0.0)
    assert zero.bandwidth == 0.0
    assert zero.dirty_rate == 0.0


def test_rounds_smoothing_and_expected_downtime():
    clock = FakeClock()
    st = MigrationStats("m", 1 << 30, clock=clock)
    st.record_round(
        pages_sent=1000,
        bytes_sent=4_000_000,
        zero_pages=10,
        dirty_pages=200,
        duration=1.0,
    )
    assert st.bandwidth == 4_000_000
    st.record_round(
        pages_sent=200,
        bytes_sent=800_000,
        zero_pages=0,
        dirty_pages=100,
        duration=0.4,
    )
    # 0.5 x 2 MB/s + 0.5 x 4 MB/s
    alpha = stats_mod.BANDWIDTH_SMOOTHING
    assert st.bandwidth == pytest.approx(
        alpha * 2_000_000 + (1 - alpha) * 4_000_000
    )
    assert st.expected_downtime == pytest.approx(
        100 * PAGE_SIZE / st.bandwidth
    )
    assert st.dirty_rate == pytest.approx(100 * PAGE_SIZE / 0.4)
    assert [r.round for r in st.rounds] == [0, 1]


def test_precopy_snapshot_is_by_value():
    clock = FakeClock()
    st = MigrationStats("m", 1 << 30, clock=clock)
    st.record_round(
        pages_sent=10,
        bytes_sent=40960,
        zero_pages=0,
        dirty_pages=3,
        duration=0.5,
    )
    st.record_throttle(0.8)
    clock.now = 7.0
    snap = st.precopy_stats()
    assert snap.iteration == 1
    assert snap.dirty_count == 3
    assert snap.remaining_bytes == 3 * PAGE_SIZE
    assert snap.total_written == 10
    assert snap.elapsed == 7.0
    assert snap.throttle == 0.8
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.dirty_count = 0
    st.record_round(
        pages_sent=3,
        bytes_sent=12288,
        zero_pages=0,
        dirty_pages=0,
        duration=0.1,
    )
    assert snap.iteration == 1
    assert len(snap.rounds) == 1


def test_no_bandwidth_means_unknown_downtime():
    st = MigrationStats("m", 4096)
    assert st.precopy_stats().expected_downtime == float("inf")
    assert st.expected_downtime is None


def test_downtime_retries_total_time_and_dict():
    clock = FakeClock()
    st = MigrationStats("m", 1 << 20, clock=clock)
    st.record_round(
        pages_sent=256,
        bytes_sent=1 << 20,
        zero_pages=2,
        dirty_pages=1,
        duration=1.0,
    )
    clock.now = 3.0
    st.paused()
    clock.now = 3.25
    st.resumed()
    st.record_retry()
    st.record_retry()
    clock.now = 4.0
    st.finish()
    clock.now = 99.0
    d = st.to_dict()
    assert d["actual_downtime"] == 0.25
    assert d["retries"] == 2
    assert d["total_time"] == 4.0
    assert d["pages_sent"] == 256
    assert d["zero_pages"] == 2
    assert d["rounds"][0]["bandwidth"] == 1 << 20
    json.dumps(d)


def test_stats_are_per_migration():
    a = MigrationStats("a", 1)
    b = MigrationStats("b", 1)
    a.record_retry()
    assert b.retries == 0
    assert a.rounds is not b.rounds


def test_memory_progress_for_nova():
    st = MigrationStats("m", 1000 * PAGE_SIZE)
    st.record_round(
        pages_sent=900,
        bytes_sent=900 * PAGE_SIZE,
        zero_pages=100,
        dirty_pages=40,
        duration=1.0,
    )
    assert st.memory_progress() == {
        "memory_total": 1000 * PAGE_SIZE,
        "memory_processed": 1000 * PAGE_SIZE,
        "memory_remaining": 40 * PAGE_SIZE,
    }


def test_stats_are_a_dataclass_per_migration():
    clock = FakeClock()
    st = MigrationStats("m", 4096, clock=clock)
    assert dataclasses.is_dataclass(st)
    names = {f.name for f in dataclasses.fields(st)}
    assert {"rounds", "bandwidth", "actual_downtime", "retries"} <= names
    assert st.started == 0.0


def test_unfinished_round_counts_in_the_totals():
    # A migration cancelled in round 0 has sent pages all the same.
    st = MigrationStats("m", 1 << 30, clock=FakeClock())
    st.record_sent(pages=10, nbytes=10 * PAGE_SIZE + 40)
    st.record_sent(pages=5, nbytes=5 * PAGE_SIZE + 20)
    out = st.to_dict()
    assert out["bytes_sent"] == 15 * PAGE_SIZE + 60
    assert out["pages_sent"] == 15
    # Nova's figures count the round under way from the sender's own
    # count of pages done (no double count here).
    assert st.memory_progress()["memory_processed"] == 0
    # Once the round is recorded its own figures replace the running ones.
    st.record_round(
        pages_sent=15,
        bytes_sent=15 * PAGE_SIZE + 60,
        zero_pages=0,
        dirty_pages=0,
        duration=1.0,
    )
    assert st.to_dict()["bytes_sent"] == 15 * PAGE_SIZE + 60
    assert st.precopy_stats().bytes_sent == 15 * PAGE_SIZE + 60
