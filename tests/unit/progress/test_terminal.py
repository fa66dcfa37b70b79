"""The terminal display: live bars on a TTY, plain lines elsewhere."""

import io

import pytest

from nova_xen_ncm.progress import ProgressSink
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.terminal import Display
from nova_xen_ncm.progress.terminal import TerminalSink
from nova_xen_ncm.progress.terminal import bar_line
from nova_xen_ncm.progress.terminal import end_line
from nova_xen_ncm.progress.terminal import human_bytes
from nova_xen_ncm.progress.terminal import human_duration

MIB = 1 << 20


def running(mid="m-1", **kw):
    data = {
        "migration_id": mid,
        "role": "source",
        "phase": "precopy",
        "round": 3,
        "percent": 50.0,
        "bandwidth": 100.0 * MIB,
        "eta": 75.0,
        "expected_downtime": 0.25,
        "emitted_at": "2026-01-01T00:00:00.000000Z",
    }
    data.update(kw)
    return data


def ended(mid="m-1", outcome="done", **kw):
    data = running(mid, phase=outcome, outcome=outcome)
    data["statistics"] = {
        "rounds": 4,
        "bytes_sent": 3 * 1024 * MIB,
        "actual_downtime": 0.2,
        "retries": 1,
        "total_time": 62.0,
        "notifications": {"dropped": 2},
    }
    data.update(kw)
    return data


@pytest.mark.parametrize(
    "value,text",
    [
        (None, "?"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * MIB, "5.0 MiB"),
        (1 << 40, "1.0 TiB"),
        (1 << 50, "1024.0 TiB"),
    ],
)
def test_human_bytes(value, text):
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    "value,text",
    [(None, "?"), (7.4, "0:07"), (750, "12:30"), (3723, "1:02:03")],
)
def test_human_duration(value, text):
    assert human_duration(value) == text


def test_bar_line_shows_phase_round_percent_rate_eta_downtime():
    line = bar_line(running("5b9f0c1e-2f0b-4b55-9a8e-0c7e4f3d2a10"))
    assert line == (
        "5b9f0c1e src precopy r3 [############............]  50.0% "
        "100.0 MiB/s ETA 1:15 downtime 0.250s"
    )
    assert bar_line(running(role="destination")).startswith("m-1 dst ")


def test_bar_line_fits_the_terminal():
    data = running("5b9f0c1e-2f0b-4b55-9a8e-0c7e4f3d2a10")
    wide = bar_line(data, columns=200)
    assert "[" + "#" * 12 + "." * 12 + "]" in wide
    narrow = bar_line(data, columns=80)
    assert len(narrow) == 79
    assert "[" + "#" * 4 + "." * 5 + "]" in narrow
    # No room for a bar: the figures stay, the bar goes.
    tight = bar_line(data, columns=72)
    assert "[" not in tight and tight.endswith("downtime 0.250s")
    assert len(bar_line(data, columns=30)) == 29


def test_bar_line_with_nothing_known():
    line = bar_line({"migration_id": "m", "phase": "setup"})
    assert "r- [" + "." * 24 + "]   ?%" in line
    assert "ETA ?" in line


def test_end_line_summarises():
    line = end_line(ended())
    assert line == (
        "m-1 (source) DONE after 1:02: 4 rounds, 3.0 GiB sent, downtime "
        "0.200s, 1 retries, 2 notifications dropped"
    )
    failed = end_line(ended(outcome="failed", reason="no route"))
    assert "FAILED" in failed and failed.endswith(" - no route")


def test_plain_lines_one_per_notification():
    out = io.StringIO()
    display = Display(out)
    assert not display.tty
    display.show("xen_ncm.migration.progress", running())
    display.show(
        "xen_ncm.migration.error",
        running(fault={"phase": "precopy", "message": "lost"}),
    )
    display.show("xen_ncm.migration.end", ended())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "\x1b" not in out.getvalue()
    assert "progress precopy round 3 50.0%" in lines[0]
    assert lines[1].endswith("error in precopy: lost")
    assert "DONE" in lines[2]


def test_tty_redraws_one_line_per_running_migration():
    out = io.StringIO()
    display = Display(out, tty=True, columns=120)
    display.show("xen_ncm.migration.progress", running("a", percent=10.0))
    display.show("xen_ncm.migration.progress", running("b", percent=20.0))
    first = out.getvalue()
    assert first.count("\n") == 1 + 2
    out.seek(0)
    out.truncate()
    display.show("xen_ncm.migration.progress", running("a", percent=30.0))
    again = out.getvalue()
    # Up two lines, then both bars again.
    assert again.startswith("\x1b[2F")
    assert again.count("\n") == 2
    assert " 30.0%" in again and " 20.0%" in again
    out.seek(0)
    out.truncate()
    display.show("xen_ncm.migration.end", ended("a", percent=100.0))
    last = out.getvalue()
    lines = last.split("\n")
    # The finished bar, full, and its summary take the top; only b
    # stays live.
    assert lines[0].startswith("\x1b[2F\x1b[2Ka src done")
    assert "[" + "#" * 24 + "] 100.0%" in lines[0]
    assert "a (source) DONE" in lines[1]
    assert lines[2].startswith("\x1b[2Kb src precopy")
    assert last.endswith("\x1b[J")
    out.seek(0)
    out.truncate()
    display.show("xen_ncm.migration.progress", running("b", percent=40.0))
    assert out.getvalue().startswith("\x1b[1F")


def test_destination_end_line_counts_what_arrived():
    data = ended("a", role="destination", bytes_sent=64 * MIB)
    data["bytes_total"] = 64 * MIB
    line = end_line(data)
    assert "64.0 MiB of 64.0 MiB guest memory arrived" in line
    assert "rounds" not in line and "sent" not in line


def test_an_unfinished_migration_says_how_far_it_got():
    data = ended("a", outcome="cancelled", percent=47.3)
    assert "CANCELLED after" in end_line(data)
    assert "47.3% copied when it stopped" in end_line(data)
    assert "copied when it stopped" not in end_line(ended("a"))


def test_terminal_sink_is_a_progress_sink():
    out = io.StringIO()
    sink = TerminalSink(out, host="h", interval=0.0)
    assert isinstance(sink, ProgressSink)
    sink.start("m-1", destination_host="d")
    for event in (
        ProgressEvent(
            "m-1", EventKind.STATE, "precopy", 1.0, previous="setup"
        ),
        ProgressEvent(
            "m-1",
            EventKind.ROUND,
            "precopy",
            2.0,
            memory_total=100 * MIB,
            memory_processed=100 * MIB,
            memory_remaining=25 * MIB,
            detail={"round": 0, "bytes_sent": 100 * MIB},
        ),
        ProgressEvent("m-1", EventKind.STATE, "done", 3.0, previous="cleanup"),
    ):
        sink.emit(event)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("start: h -> d, instance -")
    assert "phase setup -> precopy" in lines[1]
    assert "75.0%" in lines[2]
    assert "DONE" in lines[3] and "100.0 MiB sent" in lines[3]


def test_terminal_sink_interval_from_options():
    from nova_xen_ncm.conf import CONF

    sink = TerminalSink(io.StringIO(), host="h", conf=CONF)
    assert sink.interval == CONF.xen_ncm.progress_interval
    tty = TerminalSink(io.StringIO(), host="h", tty=True)
    assert tty.interval == 0.5


def test_the_destination_shows_what_arrived():
    data = running("a", role="destination", percent=40.0)
    data.update(bytes_sent=40 * MIB, bytes_total=100 * MIB, round=None)
    line = bar_line(data, 120)
    assert line.startswith("a dst precopy r- [")
    assert line.endswith(" 40.0% arrived 40.0 MiB")
    assert "ETA" not in line and "/s" not in line
    display_out = io.StringIO()
    Display(display_out, tty=False).show("xen_ncm.migration.progress", data)
    shown = display_out.getvalue().rstrip()
    assert shown.endswith(
        "(destination) progress precopy 40.0% arrived 40.0 MiB of 100.0 MiB"
    )


def test_an_unmet_downtime_target_is_shown():
    out = io.StringIO()
    display = Display(out)
    display.show(
        "xen_ncm.migration.progress", running(downtime_target_unmet=True)
    )
    display.show("xen_ncm.migration.progress", running())
    unmet, met = out.getvalue().splitlines()
    assert unmet.endswith("(downtime target unmet)")
    assert "unmet" not in met
    assert bar_line(running(downtime_target_unmet=True)).endswith(
        "(target unmet)"
    )
    assert "unmet" not in bar_line(running())
