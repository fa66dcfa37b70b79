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

import contextlib
import ctypes
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import tenacity
from oslo_log import log as logging

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
# Where the image waits between the old domain's destroy and the new one
# running: a restore that fails, or a service that dies, leaves it there.
IMAGE_DIR = Path("/var/lib/nova-xen-ncm/inplace")
# Creating the domain again: a failure after the destroy is retried from
# the image (the guest exists nowhere else).
RESTORE_ATTEMPTS = 3
_IMAGE_FORMAT = 1

LOG = logging.getLogger(__name__)


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
    paused_here = info.state != base.DomainState.PAUSED
    if paused_here:
        host.pause(domid)
    try:
        return _read(host, ctx, domid, info, config)
    except BaseException:
        # Nothing was destroyed: the guest carries on where it was.
        if paused_here:
            host.unpause(domid)
        raise


def _read(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    domid: int,
    info: base.DomainInfo,
    config: dict[str, Any],
) -> Snapshot:
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


def write_image(snap: Snapshot, path: Path) -> None:
    """Write ``snap`` to ``path`` (NumPy's npz: the pages and a JSON
    header), whole or not at all."""
    head = {
        "format": _IMAGE_FORMAT,
        "domid": snap.domid,
        "libxl_config": snap.libxl_config,
        "hvm_params": {str(k): v for k, v in snap.hvm_params.items()},
        "tsc": dataclasses.asdict(snap.tsc),
        "shared_info_gfn": snap.shared_info_gfn,
        "event_channels": [dataclasses.asdict(c) for c in snap.event_channels],
        "vcpus": [dataclasses.asdict(v) for v in snap.vcpus],
    }
    # The guest's memory: for root's eyes only.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            np.savez(
                f,
                head=np.frombuffer(json.dumps(head).encode(), dtype=np.uint8),
                pfns=np.asarray(snap.pfns, dtype=np.uint64),
                memory=np.frombuffer(snap.memory, dtype=np.uint8),
                hvm_context=np.frombuffer(snap.hvm_context, dtype=np.uint8),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_image(path: Path) -> Snapshot:
    """The snapshot :func:`write_image` wrote to ``path``."""
    with np.load(path, allow_pickle=False) as z:
        head = json.loads(z["head"].tobytes())
        if head.get("format") != _IMAGE_FORMAT:
            raise InPlaceError(
                f"{path} is not an in-place image of format "
                f"{_IMAGE_FORMAT} (format {head.get('format')!r})",
                call="inplace.read_image",
            )
        vcpus = []
        for v in head["vcpus"]:
            if v["vcpu_info"] is not None:
                v["vcpu_info"] = tuple(v["vcpu_info"])
            vcpus.append(ctx_mod.VcpuState(**v))
        return Snapshot(
            domid=head["domid"],
            libxl_config=head["libxl_config"],
            pfns=z["pfns"].copy(),
            memory=bytearray(z["memory"].tobytes()),
            hvm_context=z["hvm_context"].tobytes(),
            hvm_params={int(k): v for k, v in head["hvm_params"].items()},
            tsc=base.TscInfo(**head["tsc"]),
            shared_info_gfn=head["shared_info_gfn"],
            event_channels=[
                ctx_mod.EventChannel(**c) for c in head["event_channels"]
            ],
            vcpus=vcpus,
        )


def image_path(domid: int, image_dir: Path | None = None) -> Path:
    return (image_dir or IMAGE_DIR) / f"domain-{domid}.npz"


def restore(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    snap: Snapshot,
    *,
    unpause: bool = True,
    image_dir: Path | None = None,
    attempts: int = RESTORE_ATTEMPTS,
) -> None:
    """Destroy the saved domain and create it again under its domid with
    the saved state.

    The snapshot is written to disk first (a failure there leaves the
    saved domain as it was); after the destroy a failed creation is
    destroyed and tried again from the snapshot, up to ``attempts`` times.
    When every attempt failed the image stays on disk, named in the error,
    for :func:`restore_image`; it is removed once the guest runs again."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    domid = snap.domid
    path = image_path(domid, image_dir)
    try:
        write_image(snap, path)
    except BaseException as exc:
        if unpause:
            host.unpause(domid)
        if isinstance(exc, OSError):
            raise InPlaceError(
                f"could not write domain {domid}'s image to {path}: {exc}; "
                "the domain was left in place",
                call="inplace.restore",
            ) from exc
        raise
    try:
        host.destroy_domain(domid)
    except base.HostError:
        try:
            host.domain_info(domid)
        except base.DomainNotFound:
            pass  # gone all the same: create it again below
        else:
            # Still there: the guest keeps its domain, the image goes.
            path.unlink(missing_ok=True)
            if unpause:
                host.unpause(domid)
            raise
    _recreate(host, ctx, snap, path, unpause=unpause, attempts=attempts)


def restore_image(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    path: Path,
    *,
    unpause: bool = True,
    attempts: int = RESTORE_ATTEMPTS,
) -> None:
    """Create the guest whose image a failed :func:`restore` left at
    ``path``; its domain must not exist any more."""
    snap = read_image(path)
    try:
        host.domain_info(snap.domid)
    except base.DomainNotFound:
        pass
    else:
        raise InPlaceError(
            f"domain {snap.domid} exists: {path} is not a lost guest's",
            call="inplace.restore_image",
        )
    _recreate(host, ctx, snap, path, unpause=unpause, attempts=attempts)


def _recreate(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    snap: Snapshot,
    path: Path,
    *,
    unpause: bool,
    attempts: int,
) -> None:
    def log_retry(state: tenacity.RetryCallState) -> None:
        LOG.warning(
            "Restoring domain %d in place failed (attempt %d of %d): %s",
            snap.domid,
            state.attempt_number,
            attempts,
            state.outcome.exception() if state.outcome else None,
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        retry=tenacity.retry_if_exception_type(base.HostError),
        wait=tenacity.wait_fixed(1),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        retrying(_create_once, host, ctx, snap, unpause=unpause)
    except Exception as exc:
        # Xen's refusals were retried; anything else would fail again.
        tried = retrying.statistics.get("attempt_number", 1)
        raise InPlaceError(
            f"domain {snap.domid} could not be created again ({tried} "
            f"attempts; {type(exc).__name__}: {exc}); its image is kept "
            f"in {path} for inplace.restore_image",
            call="inplace.restore",
        ) from exc
    path.unlink(missing_ok=True)


def _create_once(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    snap: Snapshot,
    *,
    unpause: bool,
) -> None:
    domid = snap.domid
    config = json.loads(json.dumps(snap.libxl_config))
    config.setdefault("c_info", {})["domid"] = domid
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
