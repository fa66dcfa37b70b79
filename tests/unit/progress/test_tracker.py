"""Translation of engine events into the notifications of a migration."""

import json

import pytest

from nova_xen_ncm.engine.state import TERMINAL
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.tracker import OUTCOMES
from nova_xen_ncm.progress.tracker import Notice
from nova_xen_ncm.progress.tracker import ProgressTranslator
from nova_xen_ncm.progress.tracker import envelope
from nova_xen_ncm.progress.tracker import unwrap

GIB = 1 << 30
MIB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ev(kind, phase, *, at=1000.0, mid="m-1", role="source", **kw):
    return ProgressEvent(
        migration_id=mid,
        kind=kind,
        phase=phase,
        timestamp=at,
        role=role,
        **kw,
    )


def state(new, old, *, at=1000.0, reason=None, **kw):
    return ev(EventKind.STATE, new, previous=old, at=at, reason=reason, **kw)


def round_event(n, *, at=1000.0, sent=256 * MIB, remaining=64 * MIB, **kw):
    detail = {
        "round": n,
        "pages_sent": sent // 4096,
        "bytes_sent": sent,
        "zero_pages": 10,
        "dirty_pages": remaining // 4096,
        "duration": 1.0,
        "bandwidth": 128.0 * MIB,
        "dirty_rate": 32.0 * MIB,
    }
    detail.update(kw.pop("detail", {}))
    return ev(
        EventKind.ROUND,
        "precopy",
        at=at,
        memory_total=GIB,
        memory_processed=sent * (n + 1),
        memory_remaining=remaining,
        detail=detail,
        **kw,
    )


def translator(interval=5.0):
    clock = Clock()
    return ProgressTranslator("src", interval, clock=clock), clock


def test_outcomes_are_the_engines_terminal_phases():
    assert OUTCOMES == {phase.value for phase in TERMINAL}


def test_a_successful_migration_reads_start_phase_progress_end():
    tr, _ = translator()
    notes = []
    for event in (
        state("precopy", "setup", at=1000.0),
        round_event(0, at=1002.0),
        state("stop_and_copy", "precopy", at=1003.0, reason="fits"),
        state("restore", "stop_and_copy", at=1003.5),
        state("commit", "restore", at=1004.0),
        state("cleanup", "commit", at=1004.1),
        state("done", "cleanup", at=1004.5),
    ):
        notes += tr.translate(event)
    assert [n.notice for n in notes] == [
        Notice.START,
        Notice.PHASE,
        Notice.PROGRESS,
        Notice.PHASE,
        Notice.PHASE,
        Notice.PHASE,
        Notice.PHASE,
        Notice.END,
    ]
    assert [n.data["sequence"] for n in notes] == list(range(1, 9))
    assert [n.event_type for n in notes][-1] == "xen_ncm.migration.end"
    end = notes[-1].data
    assert end["outcome"] == "done"
    assert end["percent"] == 100.0
    stats = end["statistics"]
    assert stats["rounds"] == 1
    assert stats["bytes_sent"] == 256 * MIB
    assert stats["total_time"] == 4.5
    assert stats["phase_durations"] == pytest.approx(
        {
            "setup": 0.0,
            "precopy": 3.0,
            "stop_and_copy": 0.5,
            "restore": 0.5,
            "commit": 0.1,
            "cleanup": 0.4,
        }
    )
    # The payload survives JSON, as it must on the bus.
    assert json.loads(json.dumps(notes[-1].payload()))


def test_start_context_and_host_defaults():
    tr, _ = translator()
    (start,) = tr.translate(state("precopy", "setup"))[:1]
    assert start.data["source_host"] == "src"
    assert start.data["destination_host"] is None
    tr.start("m-2", instance_uuid="uuid-2", destination_host="dst")
    (phase,) = tr.translate(state("precopy", "setup", mid="m-2"))
    assert phase.data["instance_uuid"] == "uuid-2"
    assert phase.data["destination_host"] == "dst"
    assert phase.data["source_host"] == "src"
    (dest_start, _) = tr.translate(
        state("precopy", "setup", mid="m-2", role="destination")
    )
    assert dest_start.data["destination_host"] == "src"
    assert dest_start.data["role"] == "destination"


def test_start_twice_announces_once_but_adds_context():
    tr, _ = translator()
    assert len(tr.start("m-1")) == 1
    assert tr.start("m-1", instance_uuid="u") == []
    (note,) = tr.translate(state("precopy", "setup"))
    assert note.data["instance_uuid"] == "u"


def test_context_from_event_detail():
    tr, _ = translator()
    notes = tr.translate(
        state(
            "precopy",
            "setup",
            detail={"instance_uuid": "u-9", "destination_host": "d9"},
        )
    )
    assert notes[0].notice is Notice.START
    assert notes[0].data["instance_uuid"] == "u-9"
    assert notes[0].data["destination_host"] == "d9"


def test_progress_is_rate_limited_phase_changes_are_not():
    tr, clock = translator(interval=5.0)
    tr.translate(state("precopy", "setup"))
    assert len(tr.translate(round_event(0))) == 1
    clock.now += 1.0
    assert tr.translate(round_event(1)) == []
    assert tr.translate(ev(EventKind.PROGRESS, "precopy")) == []
    # A phase change goes out at once, with the latest counters.
    (phase,) = tr.translate(state("stop_and_copy", "precopy"))
    assert phase.data["round"] == 1
    clock.now += 5.0
    (rollback,) = tr.translate(state("rollback", "stop_and_copy"))
    assert rollback.notice is Notice.PHASE
    (last,) = tr.translate(state("cancelled", "rollback", reason="abort"))
    assert last.notice is Notice.END
    assert last.data["statistics"]["rounds"] == 2
    assert last.tracker.rate_limited == 2


def test_failure_sends_error_then_end():
    tr, _ = translator()
    tr.translate(state("precopy", "setup"))
    tr.translate(state("rollback", "precopy", reason="connection lost"))
    notes = tr.translate(state("failed", "rollback", reason="conn lost"))
    assert [n.notice for n in notes] == [Notice.ERROR, Notice.END]
    assert notes[0].priority == "error"
    assert notes[0].data["fault"] == {
        "message": "conn lost",
        "phase": "precopy",
    }
    assert notes[1].data["outcome"] == "failed"
    assert notes[1].priority == "info"


def test_in_doubt_is_an_error_cancel_is_not():
    tr, _ = translator()
    tr.translate(state("cleanup", "commit"))
    notes = tr.translate(state("in_doubt", "commit", mid="m-3"))
    assert [n.notice for n in notes] == [
        Notice.START,
        Notice.ERROR,
        Notice.END,
    ]
    assert notes[1].data["fault"]["phase"] == "commit"
    notes = tr.translate(state("cancelled", "rollback", mid="m-4"))
    assert Notice.ERROR not in [n.notice for n in notes]


def test_events_after_the_end_are_ignored():
    tr, _ = translator()
    tr.translate(state("done", "cleanup"))
    assert tr.translate(ev(EventKind.PROGRESS, "done")) == []
    assert tr.active == []


def test_retry_payload_and_count():
    tr, _ = translator()
    tr.translate(state("precopy", "setup"))
    (note,) = tr.translate(
        ev(
            EventKind.RETRY,
            "precopy",
            detail={
                "what": "transfer",
                "attempt": 2,
                "delay": 1.0,
                "error": "reset by peer",
            },
        )
    )
    assert note.priority == "warn"
    assert note.data["retries"] == 1
    assert note.data["retry_what"] == "transfer"
    assert note.data["retry_attempt"] == 2
    assert note.data["retry_error"] == "reset by peer"
    assert note.payload()["nova_xen_ncm_object.name"] == (
        "MigrationRetryPayload"
    )


def test_derived_figures():
    tr, _ = translator(interval=0.0)
    tr.translate(state("precopy", "setup"))
    (note,) = tr.translate(round_event(0))
    data = note.data
    assert data["bytes_total"] == GIB
    assert data["bytes_remaining"] == 64 * MIB
    assert data["percent"] == 93.75
    assert data["expected_downtime"] == 0.5
    # 64 MiB left, sent at 128 MiB/s while 32 MiB/s are dirtied again.
    assert abs(data["eta"] - 64 / 96) < 1e-9
    # A guest dirtying as fast as we send has no ETA.
    (note,) = tr.translate(round_event(1, detail={"dirty_rate": 200.0 * MIB}))
    assert note.data["eta"] is None
    # Paused: nothing is dirtied any more.
    (note,) = tr.translate(state("stop_and_copy", "precopy"))
    assert note.data["eta"] == 0.5


def test_percent_unknown_before_anything_is_known():
    tr, _ = translator()
    (start, phase) = tr.translate(state("precopy", "setup"))
    assert phase.data["percent"] is None
    assert phase.data["eta"] is None
    assert phase.data["expected_downtime"] is None


def test_engine_statistics_replace_numbers_but_not_our_shape():
    tr, _ = translator()
    tr.translate(round_event(0))
    (end,) = tr.translate(
        state(
            "done",
            "cleanup",
            detail={
                "statistics": {
                    "actual_downtime": 0.25,
                    "bytes_sent": 999,
                    "rounds": [{"round": 0}],
                    "phase_durations": "nonsense",
                }
            },
        )
    )
    stats = end.data["statistics"]
    assert stats["actual_downtime"] == 0.25
    assert stats["bytes_sent"] == 999
    assert stats["rounds"] == 1
    assert isinstance(stats["phase_durations"], dict)


def test_infinite_figures_become_null():
    tr, _ = translator()
    notes = tr.translate(
        ev(
            EventKind.PROGRESS,
            "precopy",
            detail={"expected_downtime": float("inf"), "bandwidth": 0},
        )
    )
    assert notes[-1].data["expected_downtime"] is None
    json.dumps(notes[-1].payload(), allow_nan=False)


def test_envelope_round_trip_and_refusals():
    payload = envelope("MigrationPayload", {"a": 1})
    assert payload["nova_xen_ncm_object.version"] == "1.1"
    assert unwrap(payload) == {"a": 1}
    newer = dict(payload)
    newer["nova_xen_ncm_object.version"] = "1.7"
    assert unwrap(newer) == {"a": 1}
    for bad in (
        {},
        {"a": 1},
        dict(payload, **{"nova_xen_ncm_object.version": "2.0"}),
        dict(payload, **{"nova_xen_ncm_object.namespace": "nova"}),
    ):
        try:
            unwrap(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_phase_enum_values_are_what_the_tracker_names():
    # The tracker names phases by value; a renamed phase must fail here.
    for name in ("setup", "precopy", "stop_and_copy", "rollback"):
        assert Phase(name)


def test_progress_inside_a_round_and_placeholder_remainders():
    tr, _ = translator(interval=0.0)
    # A retry while connecting: the engine's remainder is still 0.
    notes = tr.translate(
        ev(
            EventKind.RETRY,
            "setup",
            memory_total=GIB,
            memory_processed=0,
            memory_remaining=0,
        )
    )
    assert notes[-1].data["percent"] == 0.0
    assert notes[-1].data["bytes_remaining"] is None
    tr.translate(state("precopy", "setup"))
    # Halfway through round 0: the round in progress and what it has left.
    (note,) = tr.translate(
        ev(
            EventKind.PROGRESS,
            "precopy",
            memory_total=GIB,
            memory_processed=GIB // 2,
            memory_remaining=GIB // 2,
            detail={"round": 0, "pages_sent": 131072},
        )
    )
    assert note.data["round"] == 0
    assert note.data["percent"] == 50.0
    # Progress reports do not count as rounds in the statistics.
    (end,) = tr.translate(state("cancelled", "rollback"))
    assert end.data["statistics"]["rounds"] == 0
    assert end.data["statistics"]["pages_sent"] == 0


def test_numpy_figures_become_plain_json_numbers():
    import numpy as np

    tr, _ = translator(interval=0.0)
    tr.translate(state("precopy", "setup"))
    (note,) = tr.translate(
        round_event(
            0,
            detail={
                "round": np.int64(0),
                "pages_sent": np.int64(7),
                "bandwidth": np.float32(2.0),
            },
        )
    )
    assert note.data["bandwidth"] == 2.0
    (end,) = tr.translate(
        state(
            "done",
            "cleanup",
            detail={"statistics": {"retries": np.int64(2)}},
        )
    )
    stats = end.data["statistics"]
    assert stats["pages_sent"] == 7
    assert stats["retries"] == 2 and type(stats["retries"]) is int
    json.dumps(end.payload(), allow_nan=False)


def test_an_unmet_downtime_target_reaches_every_later_payload():
    # Progress is rate-limited: the event that said the target cannot be
    # met is merged away, yet the notification that does go out, and the
    # end, still say so, with the policy's expected pause.
    tr, clock = translator(interval=5.0)
    tr.translate(state("precopy", "setup"))
    tr.translate(round_event(0))
    merged = tr.translate(
        ev(
            EventKind.PROGRESS,
            "precopy",
            detail={
                "round": 1,
                "downtime_target_unmet": True,
                "expected_pause": 1.25,
            },
            reason="downtime target 0.3s cannot be met",
        )
    )
    assert merged == []
    clock.now += 10.0
    (note,) = tr.translate(round_event(2))
    assert note.data["downtime_target_unmet"] is True
    assert note.data["expected_downtime"] == 1.25
    (*_, end) = tr.translate(state("done", "cleanup"))
    assert end.data["downtime_target_unmet"] is True


def test_a_met_target_is_not_said_unmet():
    tr, _ = translator(interval=0.0)
    tr.translate(state("precopy", "setup"))
    (note,) = tr.translate(
        round_event(0, detail={"downtime_target_unmet": False})
    )
    assert note.data["downtime_target_unmet"] is False
