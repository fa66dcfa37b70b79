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
    c = caps(probe.HypervisorFacts(4, 14, "", HVM_HAP))
    assert "4.15" in c.restore[Item.DOMID]


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
