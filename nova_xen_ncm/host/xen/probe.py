"""Which items of the transparency invariant (architecture.rst section 2)
the running Xen can restore.

What a toolstack can put back into a domain from the outside is decided
by the hypervisor's control interfaces. Released Xen (up to 4.17 and
beyond) restores memory, the HVM context, HVM params and TSC, and libxl
creates a domain with a chosen domid (``LIBXL_HAVE_CREATEINFO_DOMID``,
Xen 4.15). The "domain context" interface of Xen's non-cooperative
migration design (``docs/designs/non-cooperative-migration.md``), with
which the toolstack would rebuild a guest's event channels, grant table,
shared info and xenstore connection, was never merged; without it those
items cannot be restored, so a guest that uses them (one with PV
drivers, HVM_PARAM_CALLBACK_IRQ non-zero) is refused.
"""

from __future__ import annotations

import dataclasses

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item

# XEN_SYSCTL_PHYSCAP_* (xen/sysctl.h).
PHYSCAP_HVM = 1 << 0
PHYSCAP_HAP = 1 << 3

# The first Xen whose libxl creates a domain with a given domid.
DOMID_SINCE = (4, 15)

# Why stock Xen cannot restore each PV item: the hypercall a toolstack
# would need and that the hypervisor does not offer for a foreign domain.
STOCK_XEN_LIMITS: dict[Item, str] = {
    Item.EVENT_CHANNELS: (
        "stock Xen cannot rebuild VIRQ/IPI bindings or another domain's "
        "event channel layout: EVTCHNOP_bind_virq/bind_ipi act on the "
        "calling domain only and no hypercall allocates a chosen port "
        "number in a foreign domain's table"
    ),
    Item.GRANT_TABLE: (
        "stock Xen cannot place another domain's grant table: its version "
        "and frame GFNs are set by the guest's own GNTTABOP_set_version "
        "and XENMAPSPACE_grant_table calls"
    ),
    Item.SHARED_INFO: (
        "stock Xen cannot place another domain's shared info page or "
        "registered vcpu_info (XENMAPSPACE_shared_info and "
        "VCPUOP_register_vcpu_info are guest calls)"
    ),
    Item.XENSTORE: (
        "stock xenstored cannot be given a guest's watches and open "
        "transactions, nor bind its store ring to a chosen event channel "
        "port (no domain context records in released Xen)"
    ),
    Item.PV_DEVICES: (
        "stock backends cannot rejoin existing rings: without the event "
        "channels and grants above, netback and blkback reconnect only "
        "through a new xenbus handshake the frontend would see"
    ),
}


@dataclasses.dataclass(frozen=True)
class HypervisorFacts:
    """What the probe reads from the running hypervisor."""

    major: int
    minor: int
    extra: str
    physcaps: int

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}{self.extra}"


def restore_items(facts: HypervisorFacts) -> dict[Item, str | None]:
    """Item -> None when this hypervisor can restore it, else why not."""
    out: dict[Item, str | None] = {}
    platform = None
    if not facts.physcaps & PHYSCAP_HVM:
        platform = "this Xen cannot run HVM guests (no VT-x/SVM)"
    elif not facts.physcaps & PHYSCAP_HAP:
        platform = (
            "this Xen has no hardware-assisted paging; the driver "
            "supports HAP guests only"
        )
    out[Item.MEMORY] = platform
    out[Item.PLATFORM] = platform
    out[Item.HVM_PARAMS] = platform
    if (facts.major, facts.minor) < DOMID_SINCE:
        out[Item.DOMID] = (
            f"Xen {facts.version}: libxl cannot create a domain with a "
            f"chosen domid before {DOMID_SINCE[0]}.{DOMID_SINCE[1]}"
        )
    else:
        out[Item.DOMID] = None
    out.update(STOCK_XEN_LIMITS)
    return out


def describe(caps: base.Capabilities) -> list[str]:
    """One line per item: what the host can restore and why not."""
    lines = []
    for item in Item:
        reason = caps.restore.get(item)
        verdict = "yes" if reason is None else f"no: {reason}"
        lines.append(f"{item.value}: {verdict}")
    return lines
