"""Live migration between two simulated hosts over loopback TCP."""

from __future__ import annotations

import socket
import sys
import threading

import pytest

from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .conftest import DEVICES
from .conftest import guest_config


def never_stop(stats):
    """Precopy forever: only cancel or force-complete can end it."""
    return policy.Decision(policy.Action.CONTINUE)


def running_on(host, domid):
    try:
        return host.domain_info(domid).state == base.DomainState.RUNNING
    except base.DomainNotFound:
        return False


def test_completed_migration_is_transparent(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    seen = {}
    paused_for_save = []
    real_pause_for_save = source.pause_for_save

    def pause_for_save(d):
        paused_for_save.append(d)
        real_pause_for_save(d)

    monkeypatch.setattr(source, "pause_for_save", pause_for_save)

    def at_source_restore(event):
        # All was sent; the source copy is paused as the guest last ran.
        seen["paused"] = checker.snapshot(source, domid)

    def at_destination_commit(event):
        # Restored and reconnected, not running yet.
        seen["resumed"] = checker.snapshot(destination, domid)

    m = migration(
        source,
        domid,
        destination,
        source_hooks={("state", "restore"): at_source_restore},
        destination_hooks={("state", "commit"): at_destination_commit},
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    # Stopped for the copy as for a save (no I/O request left in flight
    # to a device model on a Xen host), once.
    assert paused_for_save == [domid]

    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    # Exactly one copy, running, on the destination, with the same domid.
    assert not running_on(source, domid)
    assert [d.domid for d in source.list_domains()] == []
    assert running_on(destination, domid)
    assert destination.domain_info(domid).name == "guest"

    assert m.source_events.phases() == [
        "precopy",
        "stop_and_copy",
        "restore",
        "commit",
        "cleanup",
        "done",
    ]
    assert m.destination_events.phases() == m.source_events.phases()
    rounds = [e for e in m.source_events.events if e.kind.value == "round"]
    assert rounds and rounds[0].detail["pages_sent"] > 0
    stats = m.sender.stats.to_dict()
    assert stats["zero_pages"] > 0
    assert stats["actual_downtime"] is not None


def test_the_allocator_is_trimmed_after_each_round_never_in_the_pause(
    source, destination, migration, monkeypatch
):
    from nova_xen_ncm.engine import sender as sending

    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    trims = []

    def release() -> None:
        caller = sys._getframe(1).f_code
        if caller.co_filename == sending.__file__:
            # The rounds recorded so far and the guest's state then.
            trims.append(
                (
                    caller.co_name,
                    len(m.sender.stats.rounds),
                    source.domain_info(domid).state,
                )
            )

    monkeypatch.setattr(base, "release_freed_memory", release)
    assert m.run() is Phase.DONE, m.sender.error
    rounds = len(m.sender.stats.rounds)
    # One a round, once its duration is recorded (the policy reads the
    # link's rate from it), the guest still running: none in the
    # downtime.
    assert trims == [
        ("_precopy", n, base.DomainState.RUNNING) for n in range(1, rounds + 1)
    ]


def test_setup_refused_when_domid_taken(source, destination, migration):
    domid = source.create_domain(guest_config())
    taken = destination.create_domain(guest_config("occupant"))
    assert taken == domid

    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, Refused)
    assert m.sender.error.code == "domid-taken"
    assert m.source_events.phases() == ["rollback", "failed"]
    # Nothing moved: the guest runs on, the occupant is untouched.
    assert running_on(source, domid)
    assert destination.domain_info(taken).name == "occupant"
    assert m.receiver.state.phase is Phase.FAILED


def test_setup_refused_without_memory(conf, source, destination, migration):
    domid = source.create_domain(guest_config())
    # An empty domain holds the memory without running a guest.
    destination.create_empty_domain(
        base.DomainConfig(name="big", memory_bytes=124 << 20), 50
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "not-enough-memory"
    assert running_on(source, domid)


def test_cancel_in_precopy_rolls_back(source, destination, migration):
    domid = source.create_domain(guest_config())
    first_round = threading.Event()
    holder = {}

    def cancel_from_elsewhere():
        first_round.wait()
        holder["accepted"] = holder["migration"].sender.cancel()

    m = migration(
        source,
        domid,
        destination,
        policy=never_stop,
        source_hooks={("round", "precopy"): lambda e: first_round.set()},
    )
    holder["migration"] = m
    canceller = threading.Thread(target=cancel_from_elsewhere)
    canceller.start()
    try:
        assert m.run() is Phase.CANCELLED
    finally:
        first_round.set()
        canceller.join()
    assert holder["accepted"] is True
    assert m.receiver.state.phase is Phase.CANCELLED
    # Back to how it was: running on the source, log-dirty off, no
    # domain left on the destination.
    assert running_on(source, domid)
    with pytest.raises(base.HostError, match="log-dirty"):
        source.harvest_dirty(domid)
    assert destination.list_domains() == []
    phases = m.source_events.phases()
    assert phases[-2:] == ["rollback", "cancelled"]
    assert "stop_and_copy" not in phases


def test_force_complete_ends_precopy(source, destination, migration):
    domid = source.create_domain(guest_config())
    first_round = threading.Event()
    holder = {}

    def force_from_elsewhere():
        first_round.wait()
        holder["accepted"] = holder["migration"].sender.force_complete()

    m = migration(
        source,
        domid,
        destination,
        policy=never_stop,
        source_hooks={("round", "precopy"): lambda e: first_round.set()},
    )
    holder["migration"] = m
    forcer = threading.Thread(target=force_from_elsewhere)
    forcer.start()
    try:
        assert m.run() is Phase.DONE, m.sender.error
    finally:
        first_round.set()
        forcer.join()
    assert holder["accepted"] is True
    assert running_on(destination, domid)
    assert not running_on(source, domid)
    assert m.sender.state.reason(Phase.STOP_AND_COPY) == "force-complete"
    assert m.sender.cancel() is False


def test_dropped_connection_in_precopy_is_resumed(
    source, destination, migration
):
    domid = source.create_domain(guest_config())
    holder = {}

    def two_rounds(stats):
        if stats.iteration >= 2:
            return policy.Decision(policy.Action.STOP_AND_COPY, reason="2")
        return policy.Decision(policy.Action.CONTINUE)

    def drop_after_first_round(event):
        if event.detail["round"] == 0:
            # The network breaks under the sender.
            holder["migration"].sender.data.control.sock.shutdown(
                socket.SHUT_RDWR
            )

    m = migration(
        source,
        domid,
        destination,
        policy=two_rounds,
        source_hooks={("round", "precopy"): drop_after_first_round},
    )
    holder["migration"] = m
    assert m.run() is Phase.DONE, m.sender.error
    assert m.sender.stats.retries == 1
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert retries and "precopy round 1" in retries[0].detail["what"]
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_guest_with_pv_devices_migrates_transparently(
    source, destination, migration
):
    domid = source.create_domain(guest_config(devices=DEVICES))
    seen = {}
    m = migration(
        source,
        domid,
        destination,
        source_hooks={
            ("state", "restore"): lambda e: seen.setdefault(
                "paused", checker.snapshot(source, domid)
            )
        },
        destination_hooks={
            ("state", "commit"): lambda e: seen.setdefault(
                "resumed", checker.snapshot(destination, domid)
            )
        },
    )
    assert m.run() is Phase.DONE, m.sender.error
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_lz4_compressed_migration(conf, source, destination, migration):
    conf.set_override("compression", "lz4", group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    stats = m.sender.stats.to_dict()
    page_bytes = stats["pages_sent"] * 4096
    # Bytes on the wire: the guest's pages compress.
    assert stats["bytes_sent"] < page_bytes
    assert running_on(destination, domid)


def test_dropped_connection_in_stop_and_copy_is_resumed(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    flush = m.sender.data.flush
    dropped = []

    def drop_before_final_flush():
        if m.sender.state.phase is Phase.STOP_AND_COPY and not dropped:
            dropped.append(True)
            m.sender.data.control.sock.shutdown(socket.SHUT_RDWR)
        flush()

    monkeypatch.setattr(m.sender.data, "flush", drop_before_final_flush)
    assert m.run() is Phase.DONE, m.sender.error
    assert dropped
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["stop-and-copy transfer"]
    assert running_on(destination, domid)
    assert not running_on(source, domid)


class GivesUpOnDrop(Receiver):
    """Does not wait for the source to resume a dropped connection."""

    def _await_resume(self, cause):
        raise cause


def test_unresumable_stop_and_copy_rolls_back(
    conf, source, destination, migration, monkeypatch
):
    conf.set_override("downtime_budget", 0.5, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, receiver_class=GivesUpOnDrop)
    flush = m.sender.data.flush

    def drop_before_final_flush():
        if m.sender.state.phase is Phase.STOP_AND_COPY:
            m.sender.data.control.sock.shutdown(socket.SHUT_RDWR)
        flush()

    monkeypatch.setattr(m.sender.data, "flush", drop_before_final_flush)
    assert m.run() is Phase.FAILED
    # Out of budget, or told by the destination that it is over.
    assert "stop-and-copy transfer" in str(
        m.sender.error
    ) or "is over here (failed)" in str(m.sender.error)
    assert m.receiver.state.phase is Phase.FAILED
    # The downtime budget was spent: the guest runs on the source again.
    assert running_on(source, domid)
    assert destination.list_domains() == []
    assert m.sender.stats.actual_downtime is not None


def test_a_directly_booted_kernel_travels_with_setup(
    monkeypatch, tmp_path, conf, source, destination, migration
):
    # On Xen the destination's device model must be given the kernel
    # the source's was started with, or it cannot load its state; it
    # gets the files' real paths.
    boot_dir = tmp_path / "boot"
    boot_dir.mkdir()
    (boot_dir / "vmlinuz-6.1").write_bytes(b"k")
    (boot_dir / "vmlinuz").symlink_to("vmlinuz-6.1")
    (boot_dir / "i.gz").write_bytes(b"i")
    conf.set_override("direct_boot_dirs", [str(boot_dir)], group="xen_ncm")
    domid = source.create_domain(guest_config())
    boot = {
        "kernel": f"{boot_dir}/vmlinuz",
        "ramdisk": f"{boot_dir}/i.gz",
        "cmdline": "nopv",
    }
    monkeypatch.setattr(
        source,
        "libxl_config",
        lambda d: {"b_info": boot} if d == domid else None,
    )
    made = []
    create = destination.create_empty_domain

    def recording(config, want):
        made.append(config)
        return create(config, want)

    monkeypatch.setattr(destination, "create_empty_domain", recording)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert [c.boot for c in made] == [
        base.DirectBoot(f"{boot_dir}/vmlinuz-6.1", f"{boot_dir}/i.gz", "nopv")
    ]
