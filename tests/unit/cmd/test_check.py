"""``nova-xen-ncm check``: the checker's verdict on the snapshots the two
ends wrote and the guest as it is now, and its exit status."""

from __future__ import annotations

import argparse
import contextlib
import json

import pytest

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.cmd import check
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host import snapshotfile
from nova_xen_ncm.host.base import EvtchnAbi
from nova_xen_ncm.host.base import Item


def _state(**changed: object) -> base.GuestState:
    items = {
        Item.MEMORY: {0x10: b"a" * 16, 0x11: b"b" * 16},
        Item.PLATFORM: {"CPU:0": b"cpu", "tsc": (0, 2_000_000, 0)},
        Item.DOMID: (7, (0,)),
        Item.XENSTORE: ((("/local/domain/7", b"", (("n", 0),)),), (), (),
                        1, 0xFEFFE),
        Item.EVENT_CHANNELS: (EvtchnAbi.TWO_LEVEL, ()),
        Item.GRANT_TABLE: ("v1", ()),
        Item.SHARED_INFO: (None, b"", ()),
        Item.PV_DEVICES: (),
        Item.HVM_PARAMS: ((1, 0xFEFFE),),
    }  # fmt: skip
    items.update({Item(k): v for k, v in changed.items()})
    return base.GuestState(items=items)


@pytest.fixture
def judge(tmp_path, monkeypatch, capsys):
    now: list[base.GuestState] = []
    monkeypatch.setattr(migrate, "open_host", lambda args, conf: object())
    monkeypatch.setattr(
        migrate, "closing_host", lambda host: contextlib.nullcontext(host)
    )
    monkeypatch.setattr(
        migrate,
        "find_domain",
        lambda host, name: base.DomainInfo(
            7, "g", "u", base.DomainState.RUNNING, 1 << 25, 1, 8192, False
        ),
    )
    monkeypatch.setattr(checker, "snapshot", lambda host, domid: now[0])

    def run(paused, resumed, later, json_out=False) -> str:
        snapshotfile.write(str(tmp_path / "p"), paused)
        snapshotfile.write(str(tmp_path / "r"), resumed)
        now[:] = [later]
        args = argparse.Namespace(
            domain="g", paused=str(tmp_path / "p"),
            resumed=str(tmp_path / "r"), json=json_out,
            host_driver="sim", hostname="h",
        )  # fmt: skip
        try:
            assert check.run_check(args) == 0
        finally:
            run.out = capsys.readouterr().out
        return run.out

    return run


def test_a_transparent_guest_passes(judge) -> None:
    out = judge(_state(), _state(), _state())
    assert "memory: ok" in out and "every item passed" in out


def test_a_page_changed_between_pause_and_resume_fails(judge) -> None:
    changed = _state(memory={0x10: b"a" * 16, 0x11: b"c" * 16})
    with pytest.raises(CommandFailed, match="1 of 9 items"):
        judge(_state(), changed, changed)


def test_an_item_the_host_could_not_read_fails_with_its_reason(
    judge,
) -> None:
    paused = _state()
    items = dict(paused.items)
    del items[Item.XENSTORE]
    unread = base.GuestState(
        items=items, unread={Item.XENSTORE: "no listing of watches"}
    )
    with pytest.raises(CommandFailed, match="1 of 9 items"):
        judge(unread, _state(), _state(), json_out=True)
    verdict = json.loads(judge.out)
    assert verdict["xenstore"] == {
        "passed": False,
        "reason": "the source reported no value (not readable there: no "
        "listing of watches)",
    }
    assert verdict["memory"]["passed"]


def test_a_file_that_is_no_snapshot_is_named(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("{}")
    args = argparse.Namespace(paused=str(bad), resumed=str(bad))
    with pytest.raises(CommandError, match="bad: not a guest state"):
        check.run_check(args)


class _Event:
    def __init__(self, kind, phase) -> None:
        self.kind, self.phase = kind, phase


def test_the_sink_snapshots_once_at_its_phase(monkeypatch, tmp_path) -> None:
    from nova_xen_ncm.progress.model import EventKind

    taken = []
    monkeypatch.setattr(
        checker,
        "snapshot",
        lambda host, domid: taken.append(domid) or _state(),
    )
    sink = check.CheckSnapshot(object(), lambda: 7, "restore")
    sink.emit(_Event(EventKind.STATE, "pre_copy"))
    sink.emit(_Event(EventKind.ROUND, "restore"))
    assert taken == []
    sink.emit(_Event(EventKind.STATE, "restore"))
    assert taken == [7]
    sink.write(str(tmp_path / "s"))
    assert snapshotfile.read(str(tmp_path / "s")) == _state()


def test_a_sink_that_took_nothing_says_why(monkeypatch, tmp_path) -> None:
    from nova_xen_ncm.progress.model import EventKind

    def refuse(host, domid):
        raise base.NotSupported("no probe", call="probe")

    monkeypatch.setattr(checker, "snapshot", refuse)
    sink = check.CheckSnapshot(object(), lambda: 7, "commit")
    with pytest.raises(CommandFailed, match="never entered commit"):
        sink.write(str(tmp_path / "s"))
    sink.emit(_Event(EventKind.STATE, "commit"))
    with pytest.raises(CommandFailed, match=r"no probe \(probe\)"):
        sink.write(str(tmp_path / "s"))


def test_the_demo_reports_why_its_snapshot_was_not_taken(monkeypatch) -> None:
    """The demo's hosts take their snapshots with the same sink: a
    failed snapshot leaves the migration going and the report says why
    (the host's error and call), item by item and in the verdict."""
    from nova_xen_ncm.cmd import demo
    from nova_xen_ncm.progress.model import EventKind

    def refuse(host, domid):
        raise base.HostError("vcpu 1 context unreadable", call="guest_state")

    monkeypatch.setattr(checker, "snapshot", refuse)
    sent = check.CheckSnapshot(object(), lambda: 7, "restore")
    sent.emit(_Event(EventKind.STATE, "restore"))
    received = check.CheckSnapshot(object(), lambda: 7, "commit")
    sent_result = demo.snapshot_result(sent)
    received_result = demo.snapshot_result(received)
    assert sent_result["state"] is None
    assert "vcpu 1 context unreadable" in sent_result["snapshot_error"]
    assert received_result["snapshot_error"] == (
        "the migration never entered commit"
    )
    why = (sent_result["snapshot_error"], received_result["snapshot_error"])
    checks = demo.compare(None, _state(), why=why)
    assert {c["reason"] for c in checks.values()} == {
        "no state was captured on the source at pause: "
        + sent_result["snapshot_error"]
    }
    verdict = demo.judge_after_resume(None, 7, _state(), None, why)
    assert verdict == {
        "passed": False,
        "reason": "no state was captured on the destination: "
        "the migration never entered commit",
    }


def test_the_demo_names_both_sides_when_neither_captured() -> None:
    """Neither snapshot taken: the report gives each side's reason, not
    the source's alone."""
    from nova_xen_ncm.cmd import demo

    why = ("vcpu 1 context unreadable (guest_state)", "no probe (probe)")
    reason = (
        "no state was captured on the source at pause: "
        "vcpu 1 context unreadable (guest_state); "
        "no state was captured on the destination: no probe (probe)"
    )
    checks = demo.compare(None, None, why=why)
    assert {c["reason"] for c in checks.values()} == {reason}
    verdict = demo.judge_after_resume(None, 7, None, None, why)
    assert verdict == {"passed": False, "reason": reason}
