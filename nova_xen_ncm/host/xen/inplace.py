"""Save a running guest with PV drivers and put it back on the same
patched Xen host under the same domid, without its cooperation.

The guest's memory, HVM context, HVM parameters and TSC are what
:mod:`nova_xen_ncm.engine.savefile` carries for a guest without PV
drivers; its PV state is read and put back by the host driver's
:meth:`~.XenHost.export_pv_state` and :meth:`~.XenHost.import_pv_state`,
the calls the engine's save, migrate and receive make (:mod:`.pvctx`):
event channels, shared_info, vcpu_info placement, per-vCPU upcall
vector, timers and runstate and time areas, the grant table (v1), the
guest's xenstore nodes and, with the patched xenstored, its xenstore
connection: watches with their tokens, open transactions (whose commit
then answers EAGAIN) and the data xenstored had not processed or written.

PV devices served by dom0's kernel (blkback ``vbd``, netback ``vif``)
are carried by :mod:`.devices`: libxl creates their backends again with
the domain, and they attach to the rings the guest still uses once its
frontend nodes are back; the guest runs again only when every backend is
Connected. What a new backend opens (the vbd's medium, the vif's bridge)
is checked before the old domain is destroyed: a host that lacks it
leaves the guest running where it was, devices connected.

What it does not carry: with stock xenstored, the xenstore connection
(xenstored tells no one a domain's, and forgets it with the old domain;
this restore keeps host and domid and accepts that loss knowingly, the
engine refuses such guests at SETUP); FIFO event channels and grant
table v2 (refused by the export) and devices of other backends (qdisk, a
driver domain's: refused).

``save(..., live=True)`` copies the memory while the guest runs (Xen's
log-dirty mode, rounds until few pages are dirtied) and pauses it only
for the last dirty pages and the state.
"""

from __future__ import annotations

import binascii
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
from nova_xen_ncm.host.xen import devices as devices_mod
from nova_xen_ncm.host.xen import libs
from nova_xen_ncm.host.xen import probe

if TYPE_CHECKING:
    from nova_xen_ncm.host.xen.host import XenHost

_BATCH = 1024
# Live save: copy rounds while the guest runs, until a round leaves at
# most STOP_PAGES dirty (or LIVE_ROUNDS rounds were made).
LIVE_ROUNDS = 8
STOP_PAGES = 512
# Live save: pages the log says were not written since their copy that
# are read again with the guest paused, to check the log.
LOG_CHECK_PAGES = 1024
# Where the image waits between the old domain's destroy and the new one
# running: a restore that fails, or a service that dies, leaves it there.
IMAGE_DIR = Path("/var/lib/nova-xen-ncm/inplace")
# Creating the domain again: a failure after the destroy is retried from
# the image (the guest exists nowhere else).
RESTORE_ATTEMPTS = 3
_IMAGE_FORMAT = 4

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
    pv: base.PvState
    #: Live save: pages copied in each round while the guest ran, and
    #: those copied with it paused.
    rounds: tuple[int, ...] = ()
    paused_pages: int = 0
    #: The PV devices whose backends attach again (vbd, vif).
    devices: tuple[devices_mod.Device, ...] = ()


def save(host: XenHost, domid: int, *, live: bool = False) -> Snapshot:
    """Read ``domid``'s state and leave it paused; ``live`` copies its
    memory while it still runs first."""
    if not host.reuses_domids:
        # Refused before anything: the domid could not be taken again.
        raise InPlaceError(
            f"domain {domid} could not be created again under its domid: "
            f"{_host_mod().DOMID_REUSE_REASON}",
            call="inplace.save",
        )
    info = host.domain_info(domid)
    _refuse_stopped(domid, info.state, "before the save")
    devs = _devices(host, domid)
    config = host.libxl_config(domid)
    if config is None:
        raise InPlaceError(
            f"xl keeps no configuration of domain {domid}: it cannot be "
            "created again",
            call="inplace.save",
        )
    # What the export would refuse, refused while the guest runs: not
    # after a live copy, nor with it paused.
    host.check_pv_exportable(domid)
    paused_here = info.state != base.DomainState.PAUSED
    logging_dirty = live and paused_here
    try:
        pre = None
        rounds: list[int] = []
        if logging_dirty:
            host.enable_log_dirty(domid)
            pre = _precopy(host, domid, rounds)
        if paused_here:
            # A plain pause, not the save's suspend (pause_for_save),
            # which was not shown to work in place on the rig. The plain
            # pause can leave a port I/O to QEMU in flight, which the new
            # QEMU does not answer: a known limit of the in-place save.
            host.pause(domid)
            # A guest that stopped on its own during the copy (crashed,
            # rebooted, shut down) is left as Xen keeps it: its vCPUs'
            # context is where it stopped, and a restore would start it
            # there again.
            _refuse_stopped(
                domid, host.domain_info(domid).state, "during the save"
            )
        snap = _read(host, domid, config, pre)
        snap.rounds = tuple(rounds)
        snap.devices = tuple(devs)
        return snap
    except BaseException:
        # Nothing was destroyed: the guest carries on where it was, its
        # xenstore connection (frozen by the export) served again.
        with contextlib.suppress(base.HostError):
            host.thaw_xenstore(domid)
        if paused_here:
            with contextlib.suppress(base.HostError):
                host.unpause(domid)
        raise
    finally:
        if logging_dirty:
            with contextlib.suppress(base.HostError):
                host.disable_log_dirty(domid)


_STOPPED = (
    base.DomainState.SHUTDOWN,
    base.DomainState.CRASHED,
    base.DomainState.DYING,
)


def _refuse_stopped(domid: int, state: base.DomainState, when: str) -> None:
    if state in _STOPPED:
        raise InPlaceError(
            f"domain {domid} is {state.value} {when}: a guest that "
            "stopped running is not saved; it is left as it is",
            call="inplace.save",
        )


def _devices(host: XenHost, domid: int) -> list[devices_mod.Device]:
    """The guest's PV devices, refused unless the host's probe says
    dom0's backends re-attach and each is of a kind that does. The PV
    console's backend is xenconsoled, which libxl connects to the new
    domain again and which keeps no state of the ring's: not one."""
    if not [b for b in host._backends(domid) if "/backend/console/" not in b]:
        return []
    devs = [d for d in devices_mod.list_devices(host, domid)
            if d.kind != "console"]  # fmt: skip
    # Asked of the hypervisor and dom0 now, not of the cached report.
    reason = probe.devices_limit(host.hypervisor_facts())
    if reason is not None:
        names = ", ".join(d.backend for d in devs)
        raise InPlaceError(
            f"domain {domid} has PV devices ({names}), whose backends "
            f"cannot be carried: {reason}",
            call="inplace.save",
        )
    try:
        devices_mod.check_devices(host, domid, devs)
    except devices_mod.DeviceError as exc:
        raise InPlaceError(str(exc), call="inplace.save") from exc
    return devs


def _copy(
    host: XenHost,
    domid: int,
    pfns: np.ndarray,
    memory: bytearray,
    slots: np.ndarray,
) -> None:
    """Copy pages ``pfns`` into ``memory`` at page slots ``slots``."""
    for start in range(0, len(pfns), _BATCH):
        chunk = pfns[start : start + _BATCH]
        with host.map_pages(domid, chunk) as mapping:
            for i, page in enumerate(mapping.pages):
                at = int(slots[start + i]) * PAGE_SIZE
                memory[at : at + PAGE_SIZE] = page


def _precopy(
    host: XenHost, domid: int, rounds: list[int]
) -> tuple[np.ndarray, bytearray, np.ndarray]:
    """Copy the running guest's memory in rounds: (pfns, their pages,
    pfns written since their last copy)."""
    pfns = host.populated_pfns(domid)
    memory = bytearray(len(pfns) * PAGE_SIZE)
    host.harvest_dirty(domid)  # from here on, every write is seen
    _copy(host, domid, pfns, memory, np.arange(len(pfns)))
    rounds.append(len(pfns))
    dirty = np.intersect1d(host.harvest_dirty(domid), pfns)
    while len(dirty) > STOP_PAGES and len(rounds) < LIVE_ROUNDS:
        _copy(host, domid, dirty, memory, np.searchsorted(pfns, dirty))
        rounds.append(len(dirty))
        dirty = np.intersect1d(host.harvest_dirty(domid), pfns)
    return pfns, memory, dirty


def _read(
    host: XenHost,
    domid: int,
    config: dict[str, Any],
    pre: tuple[np.ndarray, bytearray, np.ndarray] | None,
) -> Snapshot:
    # The PV state first, as the engine reads it: guest-only state the
    # pause froze.
    pv = host.export_pv_state(domid)
    pfns = host.populated_pfns(domid)
    memory = bytearray(len(pfns) * PAGE_SIZE)
    # dom0's backends still answer while the guest is paused: the
    # frontends' rings are copied first, so that every answer the image
    # holds has its data (written before it) in the pages copied after.
    # What is answered after goes to the new backend, which takes the
    # ring's own rsp_prod as where it is.
    rings = np.intersect1d(
        devices_mod.ring_gfns(pv.xenstore.nodes, pv.grant_table, domid), pfns
    )
    todo = pfns
    if pre is not None:
        old_pfns, old_memory, dirty = pre
        # Pages copied while it ran and not written since are kept; not
        # those a backend maps writable, nor those Xen writes itself,
        # whose writes the log misses.
        written = np.concatenate(
            [
                dirty,
                host.harvest_dirty(domid),
                devices_mod.mapped_writable(pv.grant_table),
                rings,
                xen_written(pv),
                store_ring(pv),
            ]
        )
        kept = np.setdiff1d(np.intersect1d(pfns, old_pfns), written)
        if not _log_held(host, domid, kept, old_pfns, old_memory):
            kept = kept[:0]
        src = np.searchsorted(old_pfns, kept).tolist()
        dst = np.searchsorted(pfns, kept).tolist()
        for a, b in zip(src, dst, strict=True):
            memory[b * PAGE_SIZE : (b + 1) * PAGE_SIZE] = old_memory[
                a * PAGE_SIZE : (a + 1) * PAGE_SIZE
            ]
        todo = np.setdiff1d(pfns, kept)
    rest = np.setdiff1d(todo, rings)
    for part in (rings, rest):
        _copy(host, domid, part, memory, np.searchsorted(pfns, part))
    return Snapshot(
        domid=domid,
        libxl_config=config,
        pfns=pfns,
        memory=memory,
        hvm_context=host.get_hvm_context(domid),
        hvm_params=host.get_hvm_params(domid),
        tsc=host.get_tsc_info(domid),
        pv=pv,
        paused_pages=len(todo),
    )


def xen_written(pv: base.PvState) -> np.ndarray:
    """The guest pages Xen writes through a mapping of its own, which
    log-dirty does not see: each vCPU's registered vcpu_info (event
    pending bits and the time record Xen updates while the vCPU runs)
    and the shared_info page. A live copy of them is stale; they are
    copied again with the guest paused."""
    gfns = [v.gfn for v in pv.shared_info.vcpu_info if v.gfn is not None]
    if pv.shared_info.gfn is not None:
        gfns.append(pv.shared_info.gfn)
    return np.unique(np.array(gfns, dtype=np.uint64))


def store_ring(pv: base.PvState) -> np.ndarray:
    """The xenstore ring's page: xenstored writes its answers and watch
    events there through its own mapping, which log-dirty does not see.
    A xenstored that carries connections is frozen once the state is
    exported: the page copied with the guest paused then agrees with the
    connection carried over."""
    gfn = pv.xenstore.store_gfn
    return np.array([gfn] if gfn else [], dtype=np.uint64)


def _log_held(
    host: XenHost,
    domid: int,
    kept: np.ndarray,
    old_pfns: np.ndarray,
    old_memory: bytearray,
) -> bool:
    """Whether a sample of the pages the log says were not written since
    their copy are, with the guest paused, as copied. A log that missed
    the guest's writes would give a restored guest stale memory; when one
    sampled page differs, every page is copied again with it paused. A
    sample finds a log that missed many pages, not one that missed a
    few."""
    if not len(kept):
        return True
    rng = np.random.default_rng()
    sample = np.sort(
        rng.choice(kept, size=min(LOG_CHECK_PAGES, len(kept)), replace=False)
    )
    now = bytearray(len(sample) * PAGE_SIZE)
    _copy(host, domid, sample, now, np.arange(len(sample)))
    for i, at in enumerate(np.searchsorted(old_pfns, sample).tolist()):
        if (
            now[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            != old_memory[at * PAGE_SIZE : (at + 1) * PAGE_SIZE]
        ):
            LOG.warning(
                "Domain %d: page %#x changed while Xen's log-dirty said "
                "it had not; copying all of its memory with it paused",
                domid,
                int(sample[i]),
            )
            return False
    return True


def write_image(snap: Snapshot, path: Path) -> None:
    """Write ``snap`` to ``path`` (NumPy's npz: the pages and a JSON
    header), whole or not at all."""
    head = {
        "format": _IMAGE_FORMAT,
        "domid": snap.domid,
        "libxl_config": snap.libxl_config,
        "hvm_params": {str(k): v for k, v in snap.hvm_params.items()},
        "tsc": dataclasses.asdict(snap.tsc),
        "pv": pv_to_json(snap.pv),
        "devices": [d.to_json() for d in snap.devices],
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
        return Snapshot(
            domid=head["domid"],
            libxl_config=head["libxl_config"],
            pfns=z["pfns"].copy(),
            memory=bytearray(z["memory"].tobytes()),
            hvm_context=z["hvm_context"].tobytes(),
            hvm_params={int(k): v for k, v in head["hvm_params"].items()},
            tsc=base.TscInfo(**head["tsc"]),
            pv=pv_from_json(head["pv"]),
            devices=tuple(
                devices_mod.Device.from_json(d) for d in head["devices"]
            ),
        )


def _hex(data: bytes) -> str:
    return binascii.hexlify(data).decode()


def pv_to_json(pv: base.PvState) -> dict[str, Any]:
    """``pv`` as JSON values: what the Xen host exports and no more (no
    transaction's writes, no backends, no FIFO control blocks)."""
    xs = pv.xenstore
    if (
        any(t.writes for t in xs.transactions)
        or pv.backends
        or pv.event_channels.fifo_control_blocks
    ):
        raise InPlaceError(
            f"domain {pv.domid}: writes of open xenstore transactions, PV "
            "devices or FIFO control blocks cannot be written to an "
            "in-place image",
            call="inplace.write_image",
        )
    gt, si = pv.grant_table, pv.shared_info
    return {
        "domid": pv.domid,
        "backend_domids": list(pv.backend_domids),
        "abi": int(pv.event_channels.abi),
        "ports": [
            {**dataclasses.asdict(p), "type": int(p.type)}
            for p in pv.event_channels.ports
        ],
        "grant_table": {
            "version": gt.version,
            "frame_gfns": list(gt.frame_gfns),
            "frames": [_hex(f) for f in gt.frames],
            "status_gfns": list(gt.status_gfns),
            "status_frames": [_hex(f) for f in gt.status_frames],
        },
        "shared_info": {
            "gfn": si.gfn,
            "content": _hex(si.content),
            "vcpu_info": [[v.vcpu, v.gfn, v.offset] for v in si.vcpu_info],
        },
        "xenstore": {
            "nodes": [
                [n.path, _hex(n.value), [list(p) for p in n.perms]]
                for n in xs.nodes
            ],
            "watches": [[w.path, w.token, w.depth] for w in xs.watches],
            "transactions": [t.tx_id for t in xs.transactions],
            "store_port": xs.store_port,
            "store_gfn": xs.store_gfn,
            "pending_output": _hex(xs.pending_output),
            "pending_resp_len": xs.pending_resp_len,
            "pending_input": _hex(xs.pending_input),
        },
        "vcpus": [dataclasses.asdict(v) for v in pv.vcpus],
        "vm_assist": pv.vm_assist,
    }


def pv_from_json(d: dict[str, Any]) -> base.PvState:
    """The PvState :func:`pv_to_json` wrote."""
    gt, si, xs = d["grant_table"], d["shared_info"], d["xenstore"]
    return base.PvState(
        domid=d["domid"],
        backend_domids=tuple(d["backend_domids"]),
        event_channels=base.EventChannelState(
            base.EvtchnAbi(d["abi"]),
            tuple(
                base.EventChannel(**{**p, "type": base.EvtchnType(p["type"])})
                for p in d["ports"]
            ),
        ),
        grant_table=base.GrantTableState(
            version=gt["version"],
            frame_gfns=tuple(gt["frame_gfns"]),
            frames=tuple(bytes.fromhex(f) for f in gt["frames"]),
            status_gfns=tuple(gt["status_gfns"]),
            status_frames=tuple(bytes.fromhex(f) for f in gt["status_frames"]),
        ),
        shared_info=base.SharedInfoState(
            gfn=si["gfn"],
            content=bytes.fromhex(si["content"]),
            vcpu_info=tuple(
                base.VcpuInfoPlacement(*v) for v in si["vcpu_info"]
            ),
        ),
        xenstore=base.XenstoreState(
            nodes=tuple(
                base.XenstoreNode(
                    path, bytes.fromhex(value), tuple(tuple(p) for p in perms)
                )
                for path, value, perms in xs["nodes"]
            ),
            watches=tuple(base.XenstoreWatch(*w) for w in xs["watches"]),
            transactions=tuple(
                base.XenstoreTransaction(tx_id=t, base_generation=0)
                for t in xs["transactions"]
            ),
            store_port=xs["store_port"],
            store_gfn=xs["store_gfn"],
            pending_output=bytes.fromhex(xs["pending_output"]),
            pending_resp_len=xs["pending_resp_len"],
            pending_input=bytes.fromhex(xs["pending_input"]),
        ),
        backends=(),
        vcpus=tuple(base.VcpuPvState(**v) for v in d["vcpus"]),
        vm_assist=d["vm_assist"],
    )


def image_path(domid: int, image_dir: Path | None = None) -> Path:
    return (image_dir or IMAGE_DIR) / f"domain-{domid}.npz"


def restore(
    host: XenHost,
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
        # Before anything is undone: the guest stays where it runs, its
        # devices connected, when their backends could not attach again.
        devices_mod.check_media(snap.devices)
    except devices_mod.DeviceError as exc:
        _leave_in_place(host, domid, unpause=unpause)
        raise InPlaceError(
            f"domain {domid} left running in place: {exc}",
            call="inplace.restore",
        ) from exc
    try:
        write_image(snap, path)
    except BaseException as exc:
        _leave_in_place(host, domid, unpause=unpause)
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
            _leave_in_place(host, domid, unpause=unpause)
            raise
    _recreate(host, snap, path, unpause=unpause, attempts=attempts)


def _leave_in_place(host: XenHost, domid: int, *, unpause: bool) -> None:
    """The saved guest keeps its domain: its xenstore connection, frozen
    by the export, is served again (paused or not: no later unpause
    would thaw it), and it runs again if asked to."""
    with contextlib.suppress(base.HostError):
        host.thaw_xenstore(domid)
    if unpause:
        host.unpause(domid)


def restore_image(
    host: XenHost,
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
    _recreate(host, snap, path, unpause=unpause, attempts=attempts)


def _recreate(
    host: XenHost,
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
        retrying(_create_once, host, snap, unpause=unpause)
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
    # The new backends must be the kernel's new devices, not the
    # destroyed domain's (of the save's destroy, or of a failed attempt).
    devices_mod.wait_backends_gone(
        domid, snap.devices, timeout=host.opts.backend_gone_timeout
    )
    created = host._libxl_create(json.dumps(config), "inplace.restore")
    try:
        if created != domid:
            raise InPlaceError(
                f"libxl created domain {created}, not {domid}",
                call="inplace.restore",
            )
        _put_back(host, snap)
        # The frontends' notifications would go to unbound ports until
        # their backends bound them.
        devices_mod.wait_connected(
            host,
            domid,
            snap.devices,
            timeout=host.opts.backend_connect_timeout,
        )
        if unpause:
            host.unpause(domid)
    except BaseException:
        host._best_effort_destroy(created)
        raise


def _put_back(host: XenHost, snap: Snapshot) -> None:
    domid = snap.domid
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
    # As a stream's receiver does, after the memory and HVM context.
    host.import_pv_state(domid, snap.pv)


def _host_mod() -> Any:
    from nova_xen_ncm.host.xen import host as host_mod

    return host_mod


def _fn() -> Any:
    return _host_mod().FN
