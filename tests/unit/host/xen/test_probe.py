"""The capability probe's answer for what a hypervisor reports."""

from __future__ import annotations

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.xen import probe

HVM_HAP = probe.PHYSCAP_HVM | probe.PHYSCAP_HAP


def caps(facts: probe.HypervisorFacts) -> base.Capabilities:
    return base.Capabilities(
        host="h", hypervisor="x", restore=probe.restore_items(facts)
    )


def test_stock_417_migrates_plain_guests_only() -> None:
    c = caps(probe.HypervisorFacts(4, 17, ".7", HVM_HAP))
    assert c.missing(pv_drivers=False) == {}
    missing = c.missing(pv_drivers=True)
    assert set(missing) == {
        Item.XENSTORE,
        Item.EVENT_CHANNELS,
        Item.GRANT_TABLE,
        Item.SHARED_INFO,
        Item.PV_DEVICES,
    }
    assert "VIRQ/IPI" in missing[Item.EVENT_CHANNELS]
    assert c.restore[Item.DOMID] is None


def test_old_xen_cannot_choose_domids() -> None:
    c = caps(probe.HypervisorFacts(4, 13, "", HVM_HAP))
    assert "before 4.14" in c.restore[Item.DOMID]
    # libxl_domain_create_info.domid arrived in 4.14.
    assert (
        caps(probe.HypervisorFacts(4, 14, "", HVM_HAP)).restore[Item.DOMID]
        is None
    )


def test_stock_reasons_name_every_guest_only_interface() -> None:
    missing = caps(probe.HypervisorFacts(4, 17, "", HVM_HAP)).missing(True)
    evtchn = missing[Item.EVENT_CHANNELS]
    for what in ("VIRQ/IPI", "FIFO", "HVMOP_set_evtchn_upcall_vector"):
        assert what in evtchn
    shared = missing[Item.SHARED_INFO]
    for what in ("vcpu_info", "singleshot", "periodic", "runstate"):
        assert what in shared
    assert "GNTTABOP_set_version" in missing[Item.GRANT_TABLE]
    assert "watches" in missing[Item.XENSTORE]


def test_patched_xen_still_refuses_pv_guests_with_what_is_left() -> None:
    stock = caps(probe.HypervisorFacts(4, 17, "", HVM_HAP))
    patched = caps(probe.HypervisorFacts(4, 17, "", HVM_HAP, ncm_evtchn=True))
    reason = patched.missing(True)[Item.EVENT_CHANNELS]
    assert reason != stock.missing(True)[Item.EVENT_CHANNELS]
    assert "XEN_DOMCTL_ncm_evtchn" in reason
    assert "FIFO" in reason and "upcall vector" in reason
    # Without an answer from XEN_DOMCTL_ncm_vcpu the upcall vector is
    # said to be missing; vCPU state keeps the stock reason.
    assert "XEN_DOMCTL_ncm_vcpu, which this Xen does not answer" in reason
    assert (
        patched.missing(True)[Item.SHARED_INFO]
        == stock.missing(True)[Item.SHARED_INFO]
    )
    # Nothing else changes, and plain guests are unaffected.
    assert set(patched.missing(True)) == set(stock.missing(True))
    assert patched.missing(False) == {}


def test_each_patched_domctl_is_reported_on_its_own() -> None:
    vcpu_only = caps(
        probe.HypervisorFacts(4, 17, "", HVM_HAP, ncm_vcpu=True)
    ).missing(True)
    shared = vcpu_only[Item.SHARED_INFO]
    assert "XEN_DOMCTL_ncm_vcpu" in shared
    assert "XEN_DOMCTL_ncm_evtchn does not answer" in shared
    assert "VIRQ/IPI" in vcpu_only[Item.EVENT_CHANNELS]


def test_both_domctls_leave_xenstore_watches_and_devices() -> None:
    c = caps(
        probe.HypervisorFacts(
            4, 17, "", HVM_HAP, ncm_evtchn=True, ncm_vcpu=True
        )
    )
    for item in (Item.EVENT_CHANNELS, Item.SHARED_INFO, Item.GRANT_TABLE):
        assert c.restore[item] is None, item
    missing = c.missing(True)
    # Still refused, and said why: xenstored and the backends.
    assert set(missing) == {Item.XENSTORE, Item.PV_DEVICES}  # not asked
    assert "watches" in missing[Item.XENSTORE]
    assert "xenstored" in missing[Item.XENSTORE]
    assert "backends" in missing[Item.PV_DEVICES]
    assert c.missing(False) == {}


def test_no_hap_refuses_every_guest() -> None:
    c = caps(probe.HypervisorFacts(4, 17, "", probe.PHYSCAP_HVM))
    assert "hardware-assisted paging" in c.missing(False)[Item.MEMORY]
    c = caps(probe.HypervisorFacts(4, 17, "", 0))
    assert "cannot run HVM" in c.missing(False)[Item.PLATFORM]


def test_describe() -> None:
    lines = probe.describe(caps(probe.HypervisorFacts(4, 17, "", HVM_HAP)))
    assert lines[0] == "memory: yes"
    assert any(line.startswith("event_channels: no: ") for line in lines)
    assert len(lines) == len(Item)


def test_devices_carried_when_dom0s_backends_attach() -> None:
    def facts(missing, xenstored=False):
        return probe.HypervisorFacts(
            4, 17, "", HVM_HAP, ncm_evtchn=True, ncm_vcpu=True,
            xenstored_migration=xenstored, backends_missing=missing,
        )  # fmt: skip

    # The restore in place carries them.
    assert probe.devices_limit(facts(())) is None
    old = facts((("vbd", "dom0's Linux 5.4 xen-blkback maps ..."),))
    reason = probe.devices_limit(old)
    assert reason is not None and "vbd: dom0's Linux 5.4" in reason
    assert caps(old).restore[Item.PV_DEVICES] == reason
    # Not asked of dom0: not carried.
    assert probe.devices_limit(facts(None)) == (probe.PATCHED_PV_DEVICES_LIMIT)
    # The engine's streams carry them too: nothing a PV guest needs is
    # missing with the patched xenstored; without it, only xenstore.
    for xenstored in (False, True):
        missing = caps(facts((), xenstored)).missing(True)
        assert Item.PV_DEVICES not in missing
        assert (Item.XENSTORE in missing) is not xenstored
    # Stock Xen keeps its own reason whatever dom0's kernel can do.
    stock = probe.HypervisorFacts(4, 17, "", HVM_HAP, backends_missing=())
    limit = probe.STOCK_XEN_LIMITS[Item.PV_DEVICES]
    assert probe.devices_limit(stock) == limit
    assert caps(stock).restore[Item.PV_DEVICES] == limit
