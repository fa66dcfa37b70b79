"""Save a running guest with PV drivers and put it back on the same
patched Xen host under the same domid, without its cooperation.

The guest's memory, HVM context, HVM parameters and TSC are what
:mod:`nova_xen_ncm.engine.savefile` carries for a guest without PV
drivers; beyond those this carries what only the patched hypervisor
(``xen/patches``, :mod:`.context`) can read and set: the event channels
the guest bound (VIRQs, IPIs, interdomain ports), and per vCPU the
vcpu_info placement, the upcall vector, the singleshot and periodic
timers and the runstate and time areas. The shared_info frame goes back
to the GFN the guest mapped it at (XENMEM_add_to_physmap from dom0), its
content (the 2-level pending and mask bits) with the guest's memory.

What it does not carry yet, and a guest using it would miss: the grant
table's placement (the frames' content is copied as ordinary memory),
xenstore watches and transactions (xenstored forgets them with the old
domain), FIFO event channels (refused by :meth:`.DomainContext.
get_event_channels`) and PV devices' backends (refused: the guest must
have none).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import time
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.xen import context as ctx_mod
from nova_xen_ncm.host.xen import libs

if TYPE_CHECKING:
    from nova_xen_ncm.host.xen.host import XenHost

XENMAPSPACE_SHARED_INFO = 0
# getdomaininfo's shared_info_frame before the guest placed it: the M2P
# has no entry for the frame (INVALID_M2P_ENTRY, truncated or not).
_UNPLACED = (2**64 - 1, 2**32 - 1, 2**63 - 1)
_BATCH = 1024


class InPlaceError(base.HostError):
    """The guest cannot be saved or put back in place."""


@dataclasses.dataclass
class Snapshot:
    """A paused guest's whole state, held in memory."""

    domid: int
    libxl_config: dict[str, Any]
    pfns: np.ndarray
    memory: bytearray
    hvm_context: bytes
    hvm_params: dict[int, int]
    tsc: base.TscInfo
    shared_info_gfn: int | None
    event_channels: list[ctx_mod.EventChannel]
    vcpus: list[ctx_mod.VcpuState]


def save(host: XenHost, ctx: ctx_mod.DomainContext, domid: int) -> Snapshot:
    """Pause ``domid`` and read its state; it stays paused."""
    info = host.domain_info(domid)
    # The PV console's backend is xenconsoled, which libxl connects to
    # the new domain again and which keeps no state of the ring's.
    devices = [
        b for b in host._backends(domid) if "/backend/console/" not in b
    ]
    if devices:
        raise InPlaceError(
            f"domain {domid} has PV devices ({', '.join(devices)}), whose "
            "backends cannot be carried yet",
            call="inplace.save",
        )
    config = host.libxl_config(domid)
    if config is None:
        raise InPlaceError(
            f"xl keeps no configuration of domain {domid}: it cannot be "
            "created again",
            call="inplace.save",
        )
    if info.state != base.DomainState.PAUSED:
        host.pause(domid)
    # Read before the memory: both are guest-only state the pause froze.
    chans = ctx.get_event_channels(domid)
    vcpus = [ctx.get_vcpu_state(domid, v) for v in range(info.vcpus)]
    for vcpu in vcpus:
        if vcpu.compat:
            raise InPlaceError(
                f"domain {domid} is a 32-bit guest", call="inplace.save"
            )
    raw = host._raw_info(domid, "inplace.save")
    gfn = int(raw.shared_info_frame)
    pfns = host.populated_pfns(domid)
    memory = bytearray(len(pfns) * PAGE_SIZE)
    for start in range(0, len(pfns), _BATCH):
        chunk = pfns[start : start + _BATCH]
        with host.map_pages(domid, chunk) as mapping:
            for i, page in enumerate(mapping.pages):
                at = (start + i) * PAGE_SIZE
                memory[at : at + PAGE_SIZE] = page
    return Snapshot(
        domid=domid,
        libxl_config=config,
        pfns=pfns,
        memory=memory,
        hvm_context=host.get_hvm_context(domid),
        hvm_params=host.get_hvm_params(domid),
        tsc=host.get_tsc_info(domid),
        shared_info_gfn=None if gfn in _UNPLACED else gfn,
        event_channels=chans,
        vcpus=vcpus,
    )


def restore(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    snap: Snapshot,
    *,
    unpause: bool = True,
) -> None:
    """Destroy the saved domain and create it again under its domid with
    the saved state; on failure the new domain is destroyed."""
    domid = snap.domid
    config = json.loads(json.dumps(snap.libxl_config))
    config.setdefault("c_info", {})["domid"] = domid
    host.destroy_domain(domid)
    # libxl takes a domid destroyed in the current second for a recent
    # one even with no reuse delay (its history has whole seconds).
    time.sleep(1.1)
    created = host._libxl_create(json.dumps(config), "inplace.restore")
    try:
        if created != domid:
            raise InPlaceError(
                f"libxl created domain {created}, not {domid}",
                call="inplace.restore",
            )
        _put_back(host, ctx, snap)
        if unpause:
            host.unpause(domid)
    except BaseException:
        host._best_effort_destroy(created)
        raise


def _put_back(
    host: XenHost, ctx: ctx_mod.DomainContext, snap: Snapshot
) -> None:
    domid = snap.domid
    # Ports the new domain's toolstack bound itself (xenstore, console)
    # must be where the guest had them: the guest will not ask again.
    fresh = {c.port: c for c in ctx.get_event_channels(domid)}
    saved = {c.port: c for c in snap.event_channels}
    # (A daemon may not have bound its end yet: unbound or interdomain.)
    linked = (ctx_mod.EVTCHNSTAT_UNBOUND, ctx_mod.EVTCHNSTAT_INTERDOMAIN)
    for port, chan in fresh.items():
        old = saved.get(port)
        if (
            old is None
            or old.remote_dom != chan.remote_dom
            or {old.status, chan.status} - set(linked)
        ):
            raise InPlaceError(
                f"the new domain's port {port} ({chan.status_name}) is not "
                "the guest's",
                call="inplace.restore",
            )
    if snap.shared_info_gfn is not None:
        libs.check(
            "xc_domain_add_to_physmap",
            _fn().xc_domain_add_to_physmap(
                host._xch,
                domid,
                XENMAPSPACE_SHARED_INFO,
                0,
                snap.shared_info_gfn,
            ),
            domid=domid,
        )
    now = host.populated_pfns(domid)
    host.populate(domid, np.setdiff1d(snap.pfns, now))
    # Pages the new domain has and the guest had not (what libxl's
    # build put where the guest had a hole) go back to Xen.
    extra = np.setdiff1d(now, snap.pfns)
    for start in range(0, len(extra), _BATCH):
        chunk = extra[start : start + _BATCH]
        arr = (ctypes.c_ulong * len(chunk))(*chunk.tolist())
        libs.check(
            "xc_domain_decrease_reservation_exact",
            _fn().xc_domain_decrease_reservation_exact(
                host._xch, domid, len(chunk), 0, arr
            ),
            domid=domid,
        )
    for start in range(0, len(snap.pfns), _BATCH):
        chunk = snap.pfns[start : start + _BATCH]
        with host.map_pages(domid, chunk, writable=True) as mapping:
            for i, page in enumerate(mapping.pages):
                at = (start + i) * PAGE_SIZE
                page[:] = snap.memory[at : at + PAGE_SIZE]
    host.set_tsc_info(domid, snap.tsc)
    host.set_hvm_params(domid, snap.hvm_params)
    host.set_hvm_context(domid, snap.hvm_context)
    ctx.set_event_channels(
        domid, [c for c in snap.event_channels if c.port not in fresh]
    )
    for vcpu in snap.vcpus:
        ctx.set_vcpu_state(domid, vcpu)


def _fn() -> Any:
    from nova_xen_ncm.host.xen import host as host_mod

    return host_mod.FN
