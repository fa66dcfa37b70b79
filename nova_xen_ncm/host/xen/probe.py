"""Which items of the transparency invariant (architecture.rst section 2)
the running Xen can restore.

What a toolstack can put back into a domain from the outside is decided
by the hypervisor's control interfaces. Released Xen (up to 4.17 and
beyond) restores memory, the HVM context, HVM params and TSC, and libxl
creates a domain with a chosen domid (``LIBXL_HAVE_CREATEINFO_DOMID``,
Xen 4.14). The "domain context" interface of Xen's non-cooperative
migration design (``docs/designs/non-cooperative-migration.md``), with
which the toolstack would rebuild a guest's event channels, vcpu_info,
timers and xenstore connection, was never merged; without it those items
cannot be restored, so a guest that uses them (one with PV drivers,
HVM_PARAM_CALLBACK_IRQ non-zero) is refused.

This project's patch series (``xen/patches``) adds the hypervisor half as
the experimental ``XEN_DOMCTL_ncm_evtchn`` and ``XEN_DOMCTL_ncm_vcpu``.
Whether the running Xen has them is asked of Xen itself (:mod:`.context`),
never looked up by version. With both, event channels (2-level), shared
info with each vCPU's registrations and timers, and the grant table (v1)
are carried, and PV devices of dom0's kernel backends (blkback,
netback) when dom0's kernel attaches them to rings in use
(:mod:`.devices`, asked of dom0: its release and its backend modules),
by the restore in place (:mod:`.inplace`) and by the engine's streams
(a destination's backends are created with the domain, on the same
disk: storage both hosts reach, checked at SETUP). The series' xenstored
(``domain-export`` and ``domain-import``, :mod:`.xsmig`) carries a
domain's watches, open transactions and pending data; whether this
host's xenstored has them is asked of it by calling the command.
"""

from __future__ import annotations

import dataclasses

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item

# XEN_SYSCTL_PHYSCAP_* (xen/sysctl.h).
PHYSCAP_HVM = 1 << 0
PHYSCAP_HAP = 1 << 3

# The first Xen whose libxl creates a domain with a given domid
# (libxl_domain_create_info.domid).
DOMID_SINCE = (4, 14)

# Why stock Xen cannot restore each PV item: the hypercall a toolstack
# would need and that the hypervisor does not offer for a foreign domain.
STOCK_XEN_LIMITS: dict[Item, str] = {
    Item.EVENT_CHANNELS: (
        "stock Xen cannot rebuild VIRQ/IPI bindings or another domain's "
        "event channel layout: EVTCHNOP_bind_virq/bind_ipi act on the "
        "calling domain only and no hypercall allocates a chosen port "
        "number in a foreign domain's table; FIFO control blocks, event "
        "arrays and priorities and the per-vCPU upcall vector "
        "(HVMOP_set_evtchn_upcall_vector) are guest-only too"
    ),
    Item.GRANT_TABLE: (
        "stock Xen lets dom0 place and read a v1 grant table "
        "(XENMEM_add_to_physmap, XENMEM_acquire_resource) but not set "
        "its version (GNTTABOP_set_version is a guest call), and this "
        "driver does not carry grant frames"
    ),
    Item.SHARED_INFO: (
        "stock Xen cannot restore another domain's registered vcpu_info "
        "(VCPUOP_register_vcpu_info acts on the calling vCPU), PV timers "
        "(singleshot and periodic, VIRQ_TIMER), or runstate and time "
        "memory areas: none is in an HVM save record"
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


# What is still missing for event channels on the patched hypervisor.
PATCHED_EVTCHN_LIMIT = (
    "this Xen exports and imports 2-level event channels "
    "(XEN_DOMCTL_ncm_evtchn; FIFO ones not), but the per-vCPU upcall "
    "vector and the "
    "vcpu_info the ports are raised into would go with "
    "XEN_DOMCTL_ncm_vcpu, which this Xen does not answer"
)
PATCHED_VCPU_LIMIT = (
    "this Xen exports and imports each vCPU's vcpu_info placement, PV "
    "timers and runstate and time areas (XEN_DOMCTL_ncm_vcpu), but not "
    "the event channels raised into them: XEN_DOMCTL_ncm_evtchn does not "
    "answer"
)
# With both domctls, what is still missing (FIFO event channels and
# grant table v2 are optional features, refused from GuestFeature).
PATCHED_XENSTORE_LIMIT = (
    "this host's xenstored tells no toolstack a domain's watches or open "
    "transactions, nor takes them for another domain (it does not answer "
    "the domain-export control command of xen/patches' xenstored): a "
    "guest's xenbus would wait forever on a watch the destination never "
    "fires"
)
PATCHED_PV_DEVICES_LIMIT = (
    "dom0's backends cannot attach to the rings a restored frontend "
    "uses; they would reconnect through a new xenbus handshake the "
    "frontend would see"
)


@dataclasses.dataclass(frozen=True)
class HypervisorFacts:
    """What the probe reads from the running hypervisor."""

    major: int
    minor: int
    extra: str
    physcaps: int
    # XEN_DOMCTL_ncm_evtchn answered (the patched hypervisor).
    ncm_evtchn: bool = False
    # XEN_DOMCTL_ncm_vcpu answered, asked on its own.
    ncm_vcpu: bool = False
    # xenstored answered domain-export (the patched xenstored).
    xenstored_migration: bool = False
    # (device kind, why dom0's kernel backend of that kind cannot attach
    # to a ring in use), asked of dom0 (devices.backends_missing); None
    # when not asked.
    backends_missing: tuple[tuple[str, str], ...] | None = None

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
    if facts.ncm_evtchn and facts.ncm_vcpu:
        # Carried by the host driver's export and import (pvctx); the
        # grant table through stock calls, v1 only.
        out[Item.EVENT_CHANNELS] = None
        out[Item.SHARED_INFO] = None
        out[Item.GRANT_TABLE] = None
        out[Item.XENSTORE] = (
            None if facts.xenstored_migration else PATCHED_XENSTORE_LIMIT
        )
        # Carried in place (inplace) and in streams: the source's
        # backends are unbound at the pause and bound again on rollback,
        # the destination's created with the domain (devices).
        out[Item.PV_DEVICES] = devices_limit(facts)
    elif facts.ncm_evtchn:
        out[Item.EVENT_CHANNELS] = PATCHED_EVTCHN_LIMIT
    elif facts.ncm_vcpu:
        out[Item.SHARED_INFO] = PATCHED_VCPU_LIMIT
    return out


def devices_limit(facts: HypervisorFacts) -> str | None:
    """Why dom0's backends could not attach again to the rings a
    restored guest still uses (in place, :mod:`.inplace`, or on a
    destination of a stream), or None when they can (each device's kind
    is checked by :func:`.devices.check_devices` too)."""
    if not (facts.ncm_evtchn and facts.ncm_vcpu):
        return STOCK_XEN_LIMITS[Item.PV_DEVICES]
    if facts.backends_missing == ():
        return None
    if facts.backends_missing:
        return f"{PATCHED_PV_DEVICES_LIMIT}: " + "; ".join(
            f"{kind}: {why}" for kind, why in facts.backends_missing
        )
    return PATCHED_PV_DEVICES_LIMIT


def describe(caps: base.Capabilities) -> list[str]:
    """One line per item: what the host can restore and why not."""
    lines = []
    for item in Item:
        reason = caps.restore.get(item)
        verdict = "yes" if reason is None else f"no: {reason}"
        lines.append(f"{item.value}: {verdict}")
    return lines
