"""The checker's read-only probe of a simulated guest answers as dom0's
queries would, from the hypervisor's tables and the guest's pages, and
changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO

from .conftest import empty

SHINFO_GFN = layout.PLATFORM_BAR_PFN
GRANT_GFN = layout.PLATFORM_BAR_PFN + 1


@pytest.fixture
def guest(host):
    dom = empty(host, 1)
    host.populate(1, np.arange(0x100, 0x140, dtype=np.uint64))
    hc = host.hv.hypercall
    hc(
        dom,
        "add_to_physmap",
        {"space": "shared_info", "idx": 0, "gfn": SHINFO_GFN},
    )
    hc(
        dom,
        "add_to_physmap",
        {"space": "grant_table", "idx": 0, "gfn": GRANT_GFN},
    )
    hc(dom, "register_vcpu_info", {"vcpu": 1, "gfn": 0x120, "offset": 64})
    return dom


def test_physmap_is_where_the_guest_put_things(host, guest):
    pm = host.probe(1).physmap()
    assert pm.shared_info_gfn == SHINFO_GFN
    assert pm.grant_frame_gfns == (GRANT_GFN,)
    assert pm.vcpu_info == (
        base.VcpuInfoPlacement(0),
        base.VcpuInfoPlacement(1, 0x120, 64),
    )


def test_frames_are_the_guests_pages_and_xens_frames_there(host, guest):
    probe = host.probe(1)
    guest.mem.xen_pages[XENPAGE_SHARED_INFO][3000] = 0x5A
    guest.mem.ram[0x130][7] = 0x33
    assert probe.frame(SHINFO_GFN)[3000] == 0x5A
    assert probe.shared_info()[3000] == 0x5A
    assert probe.frame(0x130)[7] == 0x33
    with pytest.raises(base.HostError, match="not in dom1's physmap"):
        probe.frame(0x200)


def test_ports_and_params_as_the_hypervisor_answers(host, guest):
    with host.hv.locked():
        port = host.evtchn.alloc_unbound(host.dom0, 1, 0)
    host.set_hvm_params(1, {hvm.HVM_PARAM_TIMER_MODE: 2})
    probe = host.probe(1)
    st = probe.evtchn_status(port)
    assert (st.type, st.remote_domid) == (EvtchnType.UNBOUND, 0)
    assert probe.evtchn_status(port + 1).type == EvtchnType.CLOSED
    assert probe.evtchn_status(0) is None
    assert probe.evtchn_status(1 << 20) is None
    assert probe.hvm_param(hvm.HVM_PARAM_TIMER_MODE) == 2
    assert probe.hvm_param(hvm.HVM_PARAM_STORE_PFN) == 0


def test_observe_reads_the_items_of_an_empty_guest(host, guest):
    with host.hv.locked():
        port = host.evtchn.alloc_unbound(host.dom0, 1, 0)
    state = checker.observe(host, 1)
    # Not introduced to xenstored: no xenstore and no devices to read.
    assert Item.XENSTORE not in state.items
    assert Item.PV_DEVICES not in state.items
    assert state.items[Item.SHARED_INFO].gfn == SHINFO_GFN
    assert [p.port for p in state.items[Item.EVENT_CHANNELS].ports] == [port]
    assert state.items[Item.GRANT_TABLE].frame_gfns == (GRANT_GFN,)
    # No kernel record in RAM: the guest's records are empty.
    assert state.frontends == {} and state.kernel == {}


def test_the_probe_changes_nothing(host, guest):
    before = checker.read_memory(host, 1)
    shinfo = bytes(guest.mem.xen_pages[XENPAGE_SHARED_INFO])
    checker.observe(host, 1)
    after = checker.read_memory(host, 1)
    assert np.array_equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert bytes(guest.mem.xen_pages[XENPAGE_SHARED_INFO]) == shinfo


def test_hvm_records_are_asked_for_one_at_a_time(host, guest, monkeypatch):
    """XEN_DOMCTL_gethvmcontext_partial: the hypervisor's own record,
    None where there is none, refused while the vCPUs run. The checker's
    PLATFORM item is built from these, not from the whole-context save
    the send path encodes: with that encoder broken, every record the
    domain holds is still read."""
    probe = host.probe(1)
    cpu1 = next(
        r for r in guest.records if r.typecode == hvm.CODE_CPU and r.instance
    )
    assert probe.hvm_record(hvm.CODE_CPU, 1) == cpu1.data
    assert probe.hvm_record(hvm.CODE_CPU, 2) is None
    assert probe.hvm_record(hvm.CODE_HEADER, 1) is None

    def broken(records):
        raise AssertionError("the checker used the send path's encoder")

    monkeypatch.setattr(hvm, "encode", broken)
    platform = checker.observe(host, 1, [Item.PLATFORM]).items[Item.PLATFORM]
    held = {
        f"{checker.HVM_SAVE_NAMES[r.typecode]}:{r.instance}": r.data
        for r in guest.records
    }
    assert {
        k: v
        for k, v in platform.items()
        if k not in ("tsc", checker.PLATFORM_READ_NS)
    } == held
    # A record the whole-context save would leave out is still seen.
    guest.records = [r for r in guest.records if r.typecode != hvm.CODE_MTRR]
    again = checker.observe(host, 1, [Item.PLATFORM]).items[Item.PLATFORM]
    assert "MTRR:0" in platform and "MTRR:0" not in again

    state = guest.state
    guest.state = base.DomainState.RUNNING
    try:
        with pytest.raises(base.HostError, match="dom1 is running"):
            probe.hvm_record(hvm.CODE_CPU, 0)
    finally:
        guest.state = state
