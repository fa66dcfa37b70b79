"""``nova-xen-ncm demo``: the real command, run as a user runs it, and
the logic that turns checker verdicts into its exit status."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import pytest

from nova_xen_ncm.cmd import demo
from nova_xen_ncm.host import base

ITEMS = {item.value for item in base.Item}


def nova_xen_ncm(*args, check_json=False):
    script = shutil.which("nova-xen-ncm")
    if script is None:
        pytest.fail("the nova-xen-ncm console script is not installed")
    return subprocess.run(
        [script, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_json_migrates_transparently():
    result = nova_xen_ncm("demo", "--memory", "48M", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["completed"] is True
    assert report["transparent"] is True
    after = report["after_resume"]
    assert after["passed"] is True, after
    assert after["requests_completed"] > 0
    assert after["lost"] == after["duplicated"] == after["bad_payloads"] == 0
    assert after["ports_silent"] == []
    assert after["vbd_reads_checked"] > 0
    # Each vCPU's pvclock, read by the checker from the guest's RAM on
    # both hosts, stepped forward across the migration, and not by more
    # than the whole run took.
    steps = after["clock_steps_ms"]
    assert len(steps) == 2, after
    assert all(-1.0 <= s <= report["total_ms"] + 250 for s in steps), steps
    # The vbd was on the storage both hosts share.
    assert report["vbd_disks"] == [f"{report['instance_uuid']}-51712.disk"]
    assert set(report["checks"]) == ITEMS
    for item, verdict in report["checks"].items():
        assert verdict == {"passed": True, "reason": ""}, item
    assert report["rounds"] >= 1
    # Round 0 carries at least the pages the guest filled at boot.
    assert report["bytes_sent"] > 4 << 20
    assert report["downtime_ms"] > 0
    assert report["total_ms"] >= report["downtime_ms"]
    # The checker's snapshots of the paused guest are inside the
    # downtime; the report gives it without them too.
    assert report["downtime_without_checker_ms"] == pytest.approx(
        report["downtime_ms"] - report["checker_snapshot_ms"]
    )
    assert report["policy"] == "downtime"
    # Exactly one copy of the guest: gone from the source, running on
    # the destination.
    assert report["source_domains"] == []
    assert [state for _, state in report["destination_domains"]] == ["running"]
    # --json keeps stdout for the report; progress went to stderr.
    assert "phase setup -> precopy" in result.stderr


def test_demo_paused_with_options_in_text():
    result = nova_xen_ncm(
        "demo",
        "--memory",
        "32M",
        "--paused",
        "--policy",
        "xen-simple",
        "--channels",
        "2",
        "--compress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "migration: completed" in out
    assert "=> transparent" in out
    assert "policy:       xen-simple" in out
    assert "2 channel(s), lz4" in out
    assert "migrated paused" in out
    # A guest that never ran during the migration had no downtime.
    assert "downtime:     n/a" in out
    for item in ITEMS:
        assert f"  {item:<15} passed" in out


def test_demo_paused_guest_arrives_paused():
    result = nova_xen_ncm("demo", "--memory", "32M", "--paused", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["completed"] and report["transparent"]
    assert report["downtime_ms"] is None
    assert [state for _, state in report["destination_domains"]] == ["paused"]


def test_demo_save_and_restore_with_pv_drivers(tmp_path):
    path = tmp_path / "guest.xl"
    result = nova_xen_ncm(
        "demo", "--memory", "32M", "--save", str(path), "--json"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "save"
    assert report["completed"] and report["transparent"]
    assert set(report["checks"]) == ITEMS
    assert report["bytes_sent"] == path.stat().st_size


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "12x"], "'12x' is not a size"),
        (["--memory", "1000K"], "whole number of MiB"),
        (["--dirty-rate", "fast"], "'fast' is not a dirty rate"),
        (["--channels", "0"], "channels must be"),
        (["--downtime-ms", "1"], "downtime must be"),
        (["--xen-compatible"], "--xen-compatible goes with --save"),
        (["--policy", "nope"], "unknown policy 'nope'"),
    ],
)
def test_demo_rejects_bad_input(args, message):
    result = nova_xen_ncm("demo", *args)
    assert result.returncode == 2
    assert message in result.stderr


# -- option values and the exit status, without hosts ------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("64k", 64 << 10),
        ("4096", 4096),
    ],
)
def test_parse_size(text, size):
    assert demo.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5", "2X", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        demo.parse_size(text)


def test_dirty_rate_bytes_or_percent():
    assert demo.parse_dirty_rate("64M") == demo.DirtyRate(64 << 20)
    assert demo.parse_dirty_rate("1K") == demo.DirtyRate(1024)
    assert demo.parse_dirty_rate("100B") == demo.DirtyRate(100)
    assert demo.parse_dirty_rate("0") == demo.DirtyRate(0)
    assert demo.parse_dirty_rate("50%") == demo.DirtyRate(fraction=0.5)
    assert demo.parse_dirty_rate("100%") == demo.DirtyRate(fraction=1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        # A bare number reads as bytes or as MiB equally well.
        ("2", "'2' has no unit"),
        ("0.5", "'0.5' has no unit"),
        ("1.5", "'1.5' has no unit"),
        ("150%", "more than 100%"),
        ("fast", "'fast' is not a dirty rate"),
    ],
)
def test_dirty_rate_refuses_what_is_ambiguous(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        demo.parse_dirty_rate(text)

    def measured():
        return 1000.0

    rate, how = demo.DirtyRate(fraction=0.25).resolve(measured)
    assert rate == 250 and "0.25 x loopback bandwidth" in how
    assert demo.DirtyRate(64).resolve(measured) == (64, "given")


def test_loopback_bandwidth_is_measured():
    assert demo.measure_loopback_bandwidth(0.05) > 0


def report(checks, completed=True, after_resume=None):
    return demo.DemoReport(
        mode="migrate",
        completed=completed,
        checks=checks,
        policy="x",
        after_resume=after_resume or {"passed": True},
    )


PASSED = {item: {"passed": True, "reason": ""} for item in ITEMS}


def test_exit_status_zero_only_when_complete_and_every_item_passed():
    assert demo.exit_status(report(PASSED)) == 0
    failed = dict(PASSED, memory={"passed": False, "reason": "pfn 7"})
    bad = report(failed)
    assert not bad.transparent
    assert demo.exit_status(bad) == 1
    assert "memory          FAILED: pfn 7" in bad.as_text()
    assert bad.as_dict()["transparent"] is False
    assert demo.exit_status(report(PASSED, completed=False)) == 1
    # No verdict at all is no proof of transparency.
    assert demo.exit_status(report({})) == 1
    # Nine items passed are not enough: the guest must also have found
    # nothing wrong when it ran on the destination.
    after = {"passed": False, "reason": "vbd/51712: 3 lost responses"}
    bad = report(PASSED, after_resume=after)
    assert not bad.transparent and demo.exit_status(bad) == 1
    assert bad.as_dict()["after_resume"] == after
    assert "after resume    FAILED" in bad.as_text()
    # Never judged is no proof either.
    unjudged = demo.DemoReport(
        mode="migrate", completed=True, checks=PASSED, policy="x"
    )
    assert not unjudged.transparent


def test_incomplete_migration_fails_every_item():
    checks = demo.not_checked("the migration did not complete")
    assert set(checks) == ITEMS
    assert not report(checks).transparent
    assert demo.compare(None, None)["memory"]["passed"] is False


def test_after_resume_text_shows_each_vcpus_clock_step():
    after = {
        "passed": True,
        "requests_completed": 9,
        "lost": 0,
        "duplicated": 0,
        "bad_payloads": 0,
        "vbd_reads_checked": 2,
        "ports_silent": [],
        "clock_steps_ms": [212.5, 212.25],
        "reason": "",
    }
    text = report(PASSED, after_resume=after).as_text()
    assert (
        "each vCPU's clock (its pvclock in RAM) stepped across the "
        "migration by +212.5, +212.2 ms" in text
    ), text


def test_a_send_without_the_snapshot_says_it_was_not_asked_for():
    # A benchmark of the engine sends without the checker's snapshot:
    # the report says so, not that the migration never reached it.
    conf = {
        "xen_ncm": {"listen_address": "127.0.0.1"},
        "xen_ncm_sim": {"host_memory_mb": 128},
    }
    source = demo.HostProcess("source", [], conf)
    destination = demo.HostProcess("destination", [], conf)
    source.peers = [destination]
    destination.peers = [source]
    try:
        domid = source.call(
            "create",
            base.DomainConfig(name="nosnap", memory_bytes=64 << 20, vcpus=1),
        )
        source.call("pause", domid)
        token, endpoint = destination.call("listen", "m-nosnap", domid, False)
        sent = source.call("send", domid, endpoint, "m-nosnap", token, False)
        received = destination.call("wait_incoming")
        assert (sent["phase"], received["phase"]) == ("done", "done")
        assert sent["state"] is None
        assert sent["snapshot_error"] == "not asked for"
    finally:
        source.close()
        destination.close()
