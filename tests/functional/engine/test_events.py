"""Events and writes across a real migration, as Xen delivers and
tracks them: the upcall is level-triggered (an event raised while the
guest is paused is taken after resume, on the destination), every port
the drivers use delivers events after the migration, and a write that
the guest marks nowhere is carried."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.hypervisor import Hypervisor

from .conftest import DEVICES
from .conftest import MiB
from .conftest import guest_config


def _wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _counts(host, domid):
    """The guest's own per-port event counts, in its RAM."""
    mem = host.hv.domains[domid].mem
    return mem.ram[kernel.COUNTERS_PFN].view(np.uint32)


def _unmasked(host, domid, port):
    dom = host.hv.domains[domid]
    return not host.evtchn.status(dom, base.DOMID_SELF, port).masked


def _event_between_pause_and_quiesce(
    source, destination, migration, monkeypatch, after="pause"
):
    """Migrate a 1-vCPU guest; dom0 signals its console port after the
    pause and before the quiesce (``after`` "pause"), or after the
    quiesce and before the export ("quiesce_backends"). Returns the
    destination's per-port counts, the console port and its count when
    raised."""
    domid = source.create_domain(
        base.DomainConfig(
            name="one-vcpu",
            memory_bytes=8 * MiB,
            vcpus=1,
            workload={"dirty_rate": 256 * 1024},
        )
    )
    console = source.get_hvm_params(domid)[hvm.HVM_PARAM_CONSOLE_EVTCHN]
    assert _wait_for(lambda: _unmasked(source, domid, console))
    step = getattr(source, after)
    raised = []

    def pause_then_event(d):
        step(d)
        dom = source.hv.domains[d]
        # dom0 signals the guest after its vCPUs stopped (and, for
        # "quiesce_backends", its backends were quiesced).
        source.services.dom0_notify(dom.ports[console].remote_port)
        with dom.mem_lock():
            raised.append(
                (
                    int(_counts(source, d)[console]),
                    dom.bits.upcall_pending(0),
                )
            )

    monkeypatch.setattr(source, after, pause_then_event)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert raised, f"the migration never called {after}"
    seen, pending = raised[0]
    assert pending, "the upcall flag is set in vcpu_info, not taken"
    return domid, _counts(destination, domid), console, seen


def test_event_between_pause_and_quiesce_reaches_one_vcpu_guest(
    source, destination, migration, monkeypatch
):
    domid, counts, console, seen = _event_between_pause_and_quiesce(
        source, destination, migration, monkeypatch
    )
    assert _wait_for(lambda: int(counts[console]) == seen + 1), (
        f"console port: {int(counts[console])} events, expected {seen + 1}"
    )
    # And the guest goes on taking events.
    dom = destination.hv.domains[domid]
    destination.services.dom0_notify(dom.ports[console].remote_port)
    assert _wait_for(lambda: int(counts[console]) == seen + 2)


def test_event_while_quiesced_reaches_one_vcpu_guest_on_the_destination(
    source, destination, migration, monkeypatch
):
    """An event raised after the backends were quiesced and before the
    export: nothing holds it on the source (it would be lost when the
    migration commits); it is pending in the guest's memory, carried,
    and the destination's hypervisor asserts the vector at resume."""
    domid, counts, console, seen = _event_between_pause_and_quiesce(
        source, destination, migration, monkeypatch, "quiesce_backends"
    )
    assert _wait_for(lambda: int(counts[console]) == seen + 1), (
        f"console port: {int(counts[console])} events, expected {seen + 1}"
    )


def test_without_the_hypervisor_reasserting_the_event_is_lost(
    source, destination, migration, monkeypatch
):
    """Mutation: the hypervisor's re-assertion at resume (level-triggered
    vector) is what delivers the event; nothing else does."""
    monkeypatch.setattr(
        Hypervisor, "reassert_upcalls", staticmethod(lambda dom: None)
    )
    domid, counts, console, seen = _event_between_pause_and_quiesce(
        source, destination, migration, monkeypatch
    )
    assert not _wait_for(lambda: int(counts[console]) > seen, timeout=2.0)
    # A 1-vCPU guest whose flag stays set is never kicked again (no 0->1
    # edge): a new event is not taken either.
    dom = destination.hv.domains[domid]
    destination.services.dom0_notify(dom.ports[console].remote_port)
    assert not _wait_for(lambda: int(counts[console]) > seen, timeout=1.0)


def _ipi_ports(host, domid):
    """Each vCPU's IPI port, as the guest kernel keeps it in its RAM."""
    page = host.hv.domains[domid].mem.ram[kernel.HEADER_PFN]
    nr = kernel.read_header(bytes(page))["nr_vcpus"]
    return [kernel.read_vcpu(page, v)["ipi_port"] for v in range(nr)]


def _ipi_to_vcpu1_while_paused(
    source, destination, migration, devices=DEVICES
):
    """Migrate a 2-vCPU guest; vCPU 0's IPI to vCPU 1 is raised after
    the pause (the guest's own EVTCHNOP_send, as one it made as it was
    stopped), so that only vCPU 1's evtchn_upcall_pending is set when
    the destination resumes it. Returns the destination's counts, the
    IPI ports, vCPU 1's IPI count when raised, and the at-pause state."""
    domid = source.create_domain(
        guest_config(devices=devices, io_rate=50, dirty_rate=256 * 1024)
    )
    assert _wait_for(
        lambda: len(source.guest_state(domid).frontends) == len(devices)
    )
    assert _wait_for(lambda: all(_ipi_ports(source, domid)))
    ipis = _ipi_ports(source, domid)
    assert _wait_for(lambda: all(_counts(source, domid)[ipis] > 0))
    pause = source.pause
    raised = []

    def pause_then_ipi(d):
        pause(d)
        dom = source.hv.domains[d]
        with source.hv.locked():
            source.hv.evtchn.send(dom, ipis[1])
        with dom.mem_lock():
            raised.append(
                (
                    int(_counts(source, d)[ipis[1]]),
                    dom.bits.upcall_pending(1),
                )
            )
        with source.observing():
            raised.append(source.guest_state(d))

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(source, "pause", pause_then_ipi)
    try:
        m = migration(source, domid, destination)
        assert m.run() is Phase.DONE, m.sender.error
    finally:
        monkeypatch.undo()
    assert raised, "the migration never paused the guest"
    (seen, pending), at_pause = raised
    assert pending, "vCPU 1's upcall flag is set in its vcpu_info"
    return domid, _counts(destination, domid), ipis, seen, at_pause


def test_an_event_for_the_second_vcpu_reaches_it_after_resume(
    source, destination, migration
):
    """Level-triggered per vCPU: the destination asserts the vector on
    vCPU 1, whose flag is set, and vCPU 1 takes its own IPI (and goes
    on taking them)."""
    domid, counts, ipis, seen, _ = _ipi_to_vcpu1_while_paused(
        source, destination, migration
    )
    assert _wait_for(lambda: int(counts[ipis[1]]) > seen + 1), (
        f"vCPU 1's IPI port {ipis[1]}: {int(counts[ipis[1]])} events, "
        f"{seen} at pause"
    )


@pytest.mark.parametrize("devices", [DEVICES, ()], ids=["pv", "no-pv"])
def test_an_upcall_not_reasserted_on_one_vcpu_is_caught(
    source, destination, migration, monkeypatch, devices
):
    """Mutation: the destination's hypervisor re-asserts the vector on
    vCPU 0 only. Each vCPU handles only its own vcpu_info (as Linux
    does), so vCPU 0's upcalls never take vCPU 1's event: vCPU 1, its
    flag stuck, is never kicked again (no 0->1 edge), its IPI port goes
    silent while vCPU 0's goes on, and the after-resume verdict, read
    from the guest's RAM, names the port (with PV frontends or
    without)."""

    def vcpu0_only(dom):
        if not dom.params.get(hvm.HVM_PARAM_CALLBACK_IRQ):
            return
        with dom.mem_lock():
            pending = dom.bits.upcall_pending(0)
        if pending:
            dom.kick(0)

    monkeypatch.setattr(
        Hypervisor, "reassert_upcalls", staticmethod(vcpu0_only)
    )
    domid, counts, ipis, seen, at_pause = _ipi_to_vcpu1_while_paused(
        source, destination, migration, devices
    )
    vcpu0 = int(counts[ipis[0]])
    with destination.observing():
        resumed = destination.guest_state(domid, checker.AFTER_RESUME_ITEMS)
    later, raised = checker.run_after_resume(destination, domid, seconds=1.0)
    verdict = checker.after_resume(at_pause, resumed, later, raised)
    assert int(counts[ipis[1]]) == seen, (
        f"vCPU 1 took {int(counts[ipis[1]]) - seen} IPIs with its upcall "
        "never re-asserted"
    )
    assert int(counts[ipis[0]]) > vcpu0, "vCPU 0 goes on taking events"
    assert verdict.passed is False
    assert verdict.ports_silent == (ipis[1],), verdict.problems


def test_every_driver_port_delivers_after_migration(
    source, destination, migration
):
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=200))
    dom = source.hv.domains[domid]
    params = source.get_hvm_params(domid)
    console = params[hvm.HVM_PARAM_CONSOLE_EVTCHN]

    def driver_ports(d):
        return sorted(
            p
            for p, ch in d.ports.items()
            if ch.type == EvtchnType.INTERDOMAIN and p != console
        )

    # The store port and one port per frontend, all busy.
    assert _wait_for(lambda: len(driver_ports(dom)) == 1 + len(DEVICES))
    ports = driver_ports(dom)
    assert _wait_for(lambda: all(_counts(source, domid)[ports] > 0))
    at_pause = {}

    def record(event):
        at_pause["counts"] = _counts(source, domid)[ports].copy()
        at_pause["completed"] = {
            k: fe["completed"]
            for k, fe in source.guest_state(domid).frontends.items()
        }

    m = migration(
        source,
        domid,
        destination,
        source_hooks={("state", "restore"): record},
    )
    assert m.run() is Phase.DONE, m.sender.error
    restored = destination.hv.domains[domid]
    assert driver_ports(restored) == ports
    # xenstored has something to say: a watched node is rewritten (a
    # watch event on the store port).
    store_pfn = params[hvm.HVM_PARAM_STORE_PFN]
    store = restored.mem.ram[store_pfn].view(np.uint32)
    prod = int(store[xs_wire.RSP_PROD // 4])
    for be in list(restored.backends.values()):
        path = f"{be.backend_path}/state"
        destination.services.xs.write(path, destination.services.xs.read(path))
    counts = _counts(destination, domid)
    assert _wait_for(lambda: all(counts[ports] > at_pause["counts"])), (
        f"ports {ports}: {counts[ports].tolist()} events after resume, "
        f"{at_pause['counts'].tolist()} at pause"
    )

    # Progress only events make: the guest reads the watch events from
    # the store ring when the store port fires, and a frontend takes
    # responses (and issues more) when its port fires.
    def consumed():
        return (
            int(store[xs_wire.RSP_CONS // 4])
            == int(store[xs_wire.RSP_PROD // 4])
            > prod
        )

    assert _wait_for(consumed), "watch events left in the store ring"

    def completed():
        now = destination.guest_state(domid).frontends
        return all(
            now[k]["completed"] > done
            for k, done in at_pause["completed"].items()
        )

    assert at_pause["completed"]
    assert _wait_for(completed), "a frontend completed nothing after resume"


def test_write_the_guest_marks_nowhere_is_carried(
    source, destination, migration
):
    domid = source.create_domain(guest_config(dirty_rate=0))
    pfn = layout.KERNEL_AREA_PFN + layout.KERNEL_AREA_PAGES + 7
    data = os.urandom(256)

    def write_after_round_0(event):
        if event.detail["round"] == 0:
            # A store of the guest's, through its own mapping: nothing
            # but the hypervisor's write tracking sees it.
            source.guest_command(
                domid, "write", pfn=pfn, offset=1024, data=data.hex()
            )

    m = migration(
        source,
        domid,
        destination,
        source_hooks={("round", "precopy"): write_after_round_0},
    )
    assert m.run() is Phase.DONE, m.sender.error
    ram = destination.hv.domains[domid].mem.ram
    assert bytes(ram[pfn][1024 : 1024 + len(data)]) == data


def test_dom0_ports_renumbered_on_the_destination(
    source, destination, migration
):
    """Only the guest's port numbers are kept: dom0's ends take others
    when their numbers are taken, and I/O goes on."""
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=200))
    dom = source.hv.domains[domid]
    assert _wait_for(
        lambda: (
            sum(ch.type == EvtchnType.INTERDOMAIN for ch in dom.ports.values())
            == 2 + len(DEVICES)
        )
    )
    dom0_ends = {
        ch.remote_port
        for ch in dom.ports.values()
        if ch.type == EvtchnType.INTERDOMAIN
    }
    # Dom0 on the destination already uses those numbers.
    while not dom0_ends <= set(destination.dom0.ports):
        destination.evtchn.alloc_unbound(
            destination.dom0, base.DOMID_SELF, base.DOMID_SELF
        )
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    restored = destination.hv.domains[domid]
    moved = {
        p: ch.remote_port
        for p, ch in restored.ports.items()
        if ch.type == EvtchnType.INTERDOMAIN
    }
    assert not set(moved.values()) & dom0_ends
    # The frontends' ports go on delivering the backends' responses.
    ports = sorted(moved)
    counts = _counts(destination, domid)
    before = counts[ports].copy()
    assert _wait_for(lambda: (counts[ports] > before).sum() >= len(DEVICES)), (
        f"ports {ports}: {counts[ports].tolist()}, {before.tolist()} before"
    )


def test_a_port_left_masked_stalls_io(source, destination, migration):
    """Frontends act on events only: with their ports masked on the
    destination no response is consumed (nothing polls the rings), and
    unmasking lets the pending events through."""
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=200))
    assert _wait_for(
        lambda: (
            all(
                f["completed"] > 0
                for f in source.guest_state(domid).frontends.values()
            )
            and len(source.guest_state(domid).frontends) == len(DEVICES)
        )
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    dom = destination.hv.domains[domid]
    ports = [be.frontend_port for be in list(dom.backends.values())]
    assert len(ports) == len(DEVICES)
    with dom.mem_lock():
        for port in ports:
            dom.bits.test_and_set(evtchn.SHINFO_MASK, port)

    def completed():
        fronts = destination.guest_state(domid).frontends.values()
        return sorted(f["completed"] for f in fronts)

    time.sleep(0.5)  # what was under way settles
    stalled = completed()
    time.sleep(1.0)
    assert completed() == stalled
    for port in ports:
        destination.guest_command(
            domid, "hypercall", op="evtchn_unmask", args={"port": port}
        )
    assert _wait_for(
        lambda: all(a > b for a, b in zip(completed(), stalled, strict=True))
    )


def test_a_port_rebound_wrong_on_the_destination_stalls_io_and_is_caught(
    source, destination, migration, monkeypatch
):
    """Dom0's end of the vbd's channel rebound, at import, to the guest's
    console port: the backend's responses (and the checker's raise)
    signal a port no driver serves. Nothing polls a ring and no timer
    answers for dom0, so the vbd frontend completes nothing after resume
    and the guest's own RAM says so: the after-resume verdict names the
    vbd and its silent port; the vif, bound right, goes on."""
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=200))
    assert _wait_for(
        lambda: (
            len(source.guest_state(domid).frontends) == len(DEVICES)
            and all(
                f["completed"] > 0
                for f in source.guest_state(domid).frontends.values()
            )
        )
    )
    at_pause = {}

    def record(event):
        with source.observing():
            at_pause["state"] = source.guest_state(domid)

    imported = destination.import_pv_state
    rebound = {}

    def import_then_rebind(d, state):
        imported(d, state)
        dom = destination.hv.domains[d]
        (vbd,) = [b for b in dom.backends.values() if b.kind == "vbd"]
        console = dom.params[hvm.HVM_PARAM_CONSOLE_EVTCHN]
        with destination.hv.locked():
            destination.dom0.ports[vbd.local_port].remote_port = console
        rebound["port"] = vbd.frontend_port

    monkeypatch.setattr(destination, "import_pv_state", import_then_rebind)
    m = migration(
        source,
        domid,
        destination,
        source_hooks={("state", "restore"): record},
    )
    assert m.run() is Phase.DONE, m.sender.error
    with destination.observing():
        resumed = destination.guest_state(domid, checker.AFTER_RESUME_ITEMS)
    later, raised = checker.run_after_resume(destination, domid, seconds=1.0)
    verdict = checker.after_resume(at_pause["state"], resumed, later, raised)
    assert verdict.passed is False
    # What the guest took on its way out of the pause (events counted
    # before it, the in-flight requests answered at unpause) may end in
    # one read; then nothing, so no read checks data of before the pause.
    assert [p for p in verdict.problems if p.startswith("vbd/51712: no ")]
    assert rebound["port"] in verdict.ports_silent
    assert not [p for p in verdict.problems if p.startswith("vif/")]
    # The stall lasts: nothing but an event moves the vbd's ring.
    vbd = later.frontends["vbd/51712"]["completed"]
    time.sleep(0.5)
    now = destination.guest_state(domid).frontends
    assert now["vbd/51712"]["completed"] == vbd
    assert now["vif/0"]["completed"] > later.frontends["vif/0"]["completed"]


def _export_then(host, monkeypatch, after):
    export = host.export_pv_state

    def export_then(d):
        state = export(d)
        after(d)
        return state

    monkeypatch.setattr(host, "export_pv_state", export_then)


def test_dom0_event_after_export_is_not_lost(
    source, destination, migration, monkeypatch
):
    """An event dom0 raises after the export is pending in the guest's
    memory on the source (nothing holds it elsewhere), so the state the
    destination restored is not the source's any more: the digests find
    it before COMMIT and the migration rolls back, and the guest takes
    the event on the source. It is never silently lost."""
    domid = source.create_domain(guest_config())
    console = source.get_hvm_params(domid)[hvm.HVM_PARAM_CONSOLE_EVTCHN]
    assert _wait_for(lambda: _unmasked(source, domid, console))
    dom = source.hv.domains[domid]
    seen = []

    def notify(d):
        seen.append(int(_counts(source, d)[console]))
        source.services.dom0_notify(dom.ports[console].remote_port)

    _export_then(source, monkeypatch, notify)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "differs on the destination" in str(m.sender.error)
    counts = _counts(source, domid)
    assert _wait_for(lambda: int(counts[console]) == seen[0] + 1), (
        f"console port: {int(counts[console])} events, expected {seen[0] + 1}"
    )


def test_events_while_quiesced_are_in_memory_and_reach_the_guest_on_rollback(
    source, destination, migration, monkeypatch
):
    """An event raised while the backends are quiesced is where Xen
    puts it: the port's bit in shared info and evtchn_upcall_pending in
    the vCPU's vcpu_info (guest RAM), not in a set of the host's. On
    rollback the vector is asserted again when the vCPU runs."""
    domid = source.create_domain(
        base.DomainConfig(
            name="one-vcpu",
            memory_bytes=8 * MiB,
            vcpus=1,
            workload={"dirty_rate": 256 * 1024},
        )
    )
    console = source.get_hvm_params(domid)[hvm.HVM_PARAM_CONSOLE_EVTCHN]
    assert _wait_for(lambda: _unmasked(source, domid, console))
    dom = source.hv.domains[domid]
    seen = []

    def event_then_fail(d):
        seen.append(int(_counts(source, d)[console]))
        source.services.dom0_notify(dom.ports[console].remote_port)
        with dom.mem_lock():
            assert dom.bits.test(evtchn.SHINFO_PENDING, console)
            assert dom.bits.upcall_pending(0)
        raise base.HostError("injected after export", call="test")

    _export_then(source, monkeypatch, event_then_fail)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "injected after export" in str(m.sender.error)
    counts = _counts(source, domid)
    assert _wait_for(lambda: int(counts[console]) == seen[0] + 1), (
        f"console port: {int(counts[console])} events, expected {seen[0] + 1}"
    )


def test_a_backend_write_after_export_is_refused_not_lost(
    source, destination, migration, monkeypatch
):
    """dom0 writing into the guest's backend area after the export (a
    backend during the downtime): the write would not reach the copy
    that goes on on the destination, so the source's xenstored refuses
    it (EAGAIN) instead of taking it and losing it at commit. The
    destination's store is the guest's own at once; on the source a
    rollback thaws it (test_xenstore)."""
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=50))
    assert _wait_for(
        lambda: len(source.guest_state(domid).frontends) == len(DEVICES)
    )
    dom = source.hv.domains[domid]
    (vbd,) = [b for b in dom.backends.values() if b.kind == "vbd"]
    path = f"{vbd.backend_path}/written-in-downtime"
    refused = []

    def write_after_export(d):
        try:
            source.services.xs.write(path, b"1")
        except xs_wire.XenstoreError as exc:
            refused.append(exc.name)

    _export_then(source, monkeypatch, write_after_export)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert refused == ["EAGAIN"]
    with pytest.raises(xs_wire.XenstoreError, match="ENOENT"):
        destination.services.xs.read(path)
    destination.services.xs.write(path, b"2")
    assert destination.services.xs.read(path) == b"2"


def _ram_digest(host, domid):
    """Every populated page, read from the guest's RAM now: no cache, no
    dirty map, nothing of the migration's."""
    ram = host.hv.domains[domid].mem.ram
    pfns = host.populated_pfns(domid)
    digest = hashlib.sha256()
    digest.update(pfns.tobytes())
    for pfn in pfns.tolist():
        digest.update(ram[pfn].tobytes())
    return digest.hexdigest()


def test_many_vcpus_writing_raw_during_harvests_are_all_carried(
    source, destination, migration, monkeypatch
):
    """Four vCPU threads store into guest RAM through the guest
    process's mapping while pre-copy harvests round after round; the
    destination's RAM at unpause equals the source's at the export."""
    domid = source.create_domain(
        base.DomainConfig(
            name="writers",
            memory_bytes=16 * MiB,
            vcpus=4,
            workload={"dirty_rate": 16 * MiB, "pattern": "uniform"},
        )
    )
    digests = {}
    export = source.export_pv_state

    def export_and_digest(d):
        state = export(d)
        digests["source"] = _ram_digest(source, d)
        return state

    unpause = destination.unpause

    def digest_and_unpause(d):
        digests["destination"] = _ram_digest(destination, d)
        unpause(d)

    monkeypatch.setattr(source, "export_pv_state", export_and_digest)
    monkeypatch.setattr(destination, "unpause", digest_and_unpause)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    rounds = [e for e in m.source_events.events if e.kind.value == "round"]
    assert len(rounds) > 1, "no harvest ran while the guest wrote"
    assert digests["destination"] == digests["source"]
