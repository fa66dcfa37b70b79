"""A guest's PV devices on the patched host: dom0's kernel backends
attach again to the rings the restored frontend still uses.

Backends: Linux's blkback (``vbd``) and netback (``vif``) in dom0, not
QEMU's qdisk. Since Linux 5.6 both map a frontend's rings with
``BACK_RING_ATTACH``, taking the ring's own ``rsp_prod`` as where they
are: a request the guest produced and no backend answered (in flight
when the guest was saved, or answered by the old backend only after the
guest's memory was copied) is taken again and completed, and what was
answered is not taken twice. QEMU's qdisk starts its rings from zero and
would re-read answered requests. A backend is also created afresh by
libxl for the restored domain: what it must find is in xenstore and the
event channel table, and nothing else of the old one is needed.

The sequence that makes a new kernel backend connect without the
frontend changing state (drivers/block/xen-blkback/xenbus.c and
drivers/net/xen-netback/xenbus.c, ``frontend_changed``):

1. libxl creates the domain with its devices: the backend area (state 1,
   then the driver's probe writes its features and InitWait, 2; the
   hotplug script writes ``physical-device`` or adds the vif to its
   bridge) and a frontend area of state 1.
2. The guest's ports bound to a backend are laid out unbound for the
   backend's domain (the old backend's end is gone), under their
   numbers; the grant table goes back with no entry marked in use.
3. The guest's frontend nodes go back with ``state`` (4, Connected)
   written last: the backend's watch on it fires ``frontend_changed``
   with Connected while its own state is InitWait, and it connects:
   reads ``ring-ref``/``event-channel`` (blkback) or ``tx-ring-ref``,
   ``rx-ring-ref`` and the ``event-channel-tx``/``-rx`` pair (netback),
   maps the rings, binds the ports (Xen raises the backend's end once at
   bind, so requests already on the ring are seen) and writes its own
   state 4. The frontend's state never leaves 4.
4. The guest is unpaused only once every backend is Connected: before
   that its notifications would go to an unbound port.

The old backends run on while the guest is paused and its memory copied:
the save copies the rings first (an answer in the image has its data,
written before it, in the pages copied after; what is answered later is
taken again by the new backend), and the import raises each frontend's
port once, since the notification of an answer written after the export
was lost with the old domain and the new backend notifies again only
past the frontend's event index. Xen's log-dirty misses writes a backend
makes through a grant mapping until its unmap: a live save copies the
pages mapped writable (``GTF_writing``: the rings, blkback's persistent
grants) again with the guest paused.

A live migration to another host (the engine's stream) cannot let the
old backends run on: the pages are sent in no order the rings' answers
could follow. The source unbinds each backend device from its driver
once the guest is paused (:func:`unbind`): since Linux 5.6 blkback and
netback allow it with the backend area left Connected, unmap the rings
and every grant (Xen logs each page written through a mapping as dirty
at its unmap, so the last harvest holds what they wrote), and close
their end of each port, which Xen leaves unbound for dom0 (a frontend
notifying it is not told). A request taken and not answered is taken
again by the next backend from the ring's ``rsp_prod``. The destination
creates the backends with the domain (the same disk, on storage both
hosts reach, and a vif on the same bridge) and they attach as in place.
A rollback binds the source's devices to their drivers again
(:func:`bind`): they attach to the same rings the same way, and a vif,
whose network device netback freed at the unbind, is put back on its
bridge by its hotplug script as libxl did at its creation.

With stock xenstored the guest's watches are not carried (see
:mod:`.pvctx`): its frontends do not see their backend's new InitWait
and Connected. With the patched xenstored they are (:mod:`.xsmig`,
imported after the frontend nodes, so a backend may connect before or
after), and a frontend may see them: both ignore InitWait when they are
connected; on Connected blkfront only reads the size again and netfront
announces itself on the network.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from nova_xen_ncm.host import base

if TYPE_CHECKING:
    from nova_xen_ncm.host.xen.host import XenHost

# Device kinds whose dom0 kernel backend re-attaches, and the driver
# each is served by (/sys/bus/xen-backend/drivers/NAME, module).
REATTACHING = {"vbd": "xen-blkback", "vif": "xen-netback"}
# The first Linux whose blkback and netback attach to a ring in use
# (BACK_RING_ATTACH, "xen-blkback: support dynamic unbind/bind").
ATTACH_SINCE = (5, 6)
XENBUS_CONNECTED = 4
# Frontend nodes naming a port the backend binds.
PORT_NODES = ("event-channel", "event-channel-tx", "event-channel-rx")
# v1 grant entry flags (grant_table.h): set by Xen while the entry is
# mapped (GTF_reading, GTF_writing).
GTF_IN_USE = (1 << 3) | (1 << 4)
GTF_WRITING = 1 << 4
GTF_TYPE_MASK = 3
GTF_PERMIT_ACCESS = 1
GRANT_ENTRY_V1 = 8
# v1 grant entry: flags, domid, frame (grant_table.h, grant_entry_v1).
# Grant references below this are the toolstack's
# (GNTTAB_NR_RESERVED_ENTRIES, public/grant_table.h): the console's and
# xenstore's rings, which xenconsoled and xenstored keep mapped.
GNTTAB_NR_RESERVED_ENTRIES = 8
_GRANT_V1 = np.dtype([("flags", "<u2"), ("domid", "<u2"), ("frame", "<u4")])
# dom0's xenbus backend devices: KIND-DOMID-DEVID (xenbus_probe_backend).
XEN_BACKEND_DEVICES = "/sys/bus/xen-backend/devices"
# Their drivers (blkback's is "vbd", netback's "vif"), with the bind and
# unbind files of the driver core.
XEN_BACKEND_DRIVERS = "/sys/bus/xen-backend/drivers"
# Seconds a vif's hotplug script may run (libxl's own limit).
HOTPLUG_TIMEOUT = 10.0
# x86_64 shared_info: 32 legacy vcpu_info slots of 64 bytes, then the
# 2-level ABI's evtchn_pending bitmap; in a vcpu_info, the byte
# evtchn_upcall_pending and the word evtchn_pending_sel.
VCPU_INFO_SIZE = 64
LEGACY_VCPUS = 32
EVTCHN_PENDING_AT = LEGACY_VCPUS * VCPU_INFO_SIZE
PENDING_SEL_AT = 8


class DeviceError(base.HostError):
    """A PV device's backend cannot be attached to the guest again."""


@dataclasses.dataclass(frozen=True)
class Device:
    """One PV device of a guest, as xenstore describes it."""

    kind: str
    devid: int
    backend_domid: int
    frontend: str
    backend: str
    # vbd: the medium the backend opens (``params``); vif: its bridge.
    medium: str | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Device:
        return cls(**d)  # type: ignore[arg-type]


def _text(host: XenHost, path: str) -> str | None:
    value = host._xs_read(path)
    return None if value is None else value.decode(errors="replace")


def list_devices(host: XenHost, domid: int) -> list[Device]:
    """The guest's frontends of every kind but the console, with their
    backends."""
    from nova_xen_ncm.host.xen import pvctx

    found = []
    root = f"/local/domain/{domid}/device"
    for kind in pvctx._xs_directory(host, root):
        if kind == "suspend":
            continue  # libxl's suspend event channel node, no device
        for devid in pvctx._xs_directory(host, f"{root}/{kind}"):
            front = f"{root}/{kind}/{devid}"
            backend = _text(host, f"{front}/backend")
            backend_id = _text(host, f"{front}/backend-id")
            if backend is None or backend_id is None:
                continue
            medium = None
            if kind == "vbd":
                medium = _text(host, f"{backend}/params")
            elif kind == "vif":
                medium = _text(host, f"{backend}/bridge")
            found.append(
                Device(
                    kind=kind,
                    devid=int(devid),
                    backend_domid=int(backend_id),
                    frontend=front,
                    backend=backend,
                    medium=medium,
                )
            )
    return found


def _kernel_release() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return (0, 0)


def _module_available(module: str) -> bool:
    """Loaded, or in this kernel's module tree to be loaded."""
    name = module.replace("-", "_")
    if os.path.isdir(f"/sys/module/{name}"):
        return True
    dep = f"/lib/modules/{os.uname().release}/modules.dep"
    try:
        with open(dep) as f:
            return any(f"/{module}.ko" in line.split(":")[0] for line in f)
    except OSError:
        return False


def backends_missing() -> dict[str, str]:
    """Kind -> why dom0's kernel backend of that kind cannot re-attach
    (empty when both can)."""
    missing = {}
    release = _kernel_release()
    for kind, module in REATTACHING.items():
        if release < ATTACH_SINCE:
            missing[kind] = (
                f"dom0's Linux {release[0]}.{release[1]} {module} maps a "
                "frontend's rings from index zero (ring attach since "
                f"{ATTACH_SINCE[0]}.{ATTACH_SINCE[1]})"
            )
        elif not _module_available(module):
            missing[kind] = f"dom0's kernel has no {module}"
    return missing


def check_devices(host: XenHost, domid: int, devs: Iterable[Device]) -> None:
    """Refuse, naming why, a device the host cannot attach again."""
    missing = backends_missing()
    for dev in devs:
        if dev.kind not in REATTACHING:
            raise DeviceError(
                f"domain {domid}: {dev.kind} device {dev.devid} "
                f"({dev.backend}) has no backend that re-attaches (only "
                f"{', '.join(sorted(REATTACHING))} of dom0's kernel)"
            )
        if dev.kind in missing:
            raise DeviceError(
                f"domain {domid}: {dev.kind} {dev.devid}: {missing[dev.kind]}"
            )
        if dev.backend_domid != 0:
            raise DeviceError(
                f"domain {domid}: {dev.kind} {dev.devid} is served by "
                f"domain {dev.backend_domid}, not dom0"
            )


def check_media(devs: Iterable[Device]) -> None:
    """What a new backend of each device opens is on this host: the
    vbd's medium, the vif's bridge. Checked before the guest's domain is
    destroyed, so that a host that could not attach them leaves the
    guest where it runs."""
    for dev in devs:
        if dev.kind == "vbd":
            if not dev.medium or not os.path.exists(dev.medium):
                raise DeviceError(
                    f"vbd {dev.devid}: its medium {dev.medium!r} is not "
                    "on this host: its backend could not attach again"
                )
        elif dev.kind == "vif" and dev.medium:
            if not os.path.isdir(f"/sys/class/net/{dev.medium}/bridge"):
                raise DeviceError(
                    f"vif {dev.devid}: bridge {dev.medium!r} does not "
                    "exist: its backend could not attach again"
                )


def check_configs(configs: Iterable[base.DeviceConfig]) -> None:
    """Refuse (NotSupported, naming it) a device a domain created here
    could not have: a vbd whose disk this host does not reach, a vif on
    a bridge it does not have, a kind without a re-attaching backend."""
    devs = []
    for cfg in configs:
        if cfg.kind not in REATTACHING:
            raise base.NotSupported(
                f"{cfg.kind} {cfg.devid}: no backend of this host attaches "
                f"again (only {', '.join(sorted(REATTACHING))})",
                call="create_empty_domain",
            )
        medium = (
            cfg.extra.get("target")
            if cfg.kind == "vbd"
            else cfg.extra.get("bridge")
        )
        devs.append(Device(cfg.kind, cfg.devid, cfg.backend_domid, "", "",
                           medium))  # fmt: skip
    try:
        check_media(devs)
    except DeviceError as exc:
        raise base.NotSupported(
            f"{exc} (the disk must be on storage both hosts reach)",
            call="create_empty_domain",
        ) from exc


def frontend_ports(
    nodes: Iterable[base.XenstoreNode], domid: int
) -> dict[int, int]:
    """Port -> backend domid of the ports the guest's frontends gave
    their backends (from the saved frontend nodes)."""
    prefix = f"/local/domain/{domid}/device/"
    values = {n.path: n.value for n in nodes}
    out = {}
    for path, value in values.items():
        if not path.startswith(prefix) or path.count("/") < 6:
            continue
        name = path.rsplit("/", 1)[1]
        if name not in PORT_NODES:
            continue
        # .../device/KIND/ID[/queue-N]/event-channel*
        front = "/".join(path.split("/")[:7])
        backend_id = values.get(f"{front}/backend-id")
        if kind_of(path, domid) == "console" or backend_id is None:
            continue
        try:
            out[int(value)] = int(backend_id)
        except ValueError:
            continue
    return out


def kind_of(path: str, domid: int) -> str | None:
    prefix = f"/local/domain/{domid}/device/"
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].split("/", 1)[0]


def is_frontend_state(path: str, domid: int) -> bool:
    """A frontend's ``state`` node, which the import writes last."""
    kind = kind_of(path, domid)
    return (
        kind is not None and path.endswith("/state") and path.count("/") == 7
    )


def clear_grants_in_use(frame: bytes) -> bytes:
    """A v1 grant frame with no entry marked mapped: the restored domain
    is new to Xen, nothing maps its grants, and a frontend ending access
    to an entry still marked so would take it for its backend's."""
    out = bytearray(frame)
    for at in range(0, len(out) - GRANT_ENTRY_V1 + 1, GRANT_ENTRY_V1):
        out[at] &= ~GTF_IN_USE & 0xFF
    return bytes(out)


def raise_ports(content: bytes, ports: Iterable[int]) -> bytes:
    """A shared_info page with ``ports`` pending (2-level ABI)."""
    out = bytearray(content)
    for port in ports:
        out[EVTCHN_PENDING_AT + port // 8] |= 1 << (port % 8)
    return bytes(out)


def mark_all_pending(buf: bytearray | memoryview, at: int) -> None:
    """Make the vcpu_info at ``at`` in ``buf`` scan every pending word,
    with an upcall pending: what stock Xen does when a vCPU's vcpu_info
    is placed, here for a restored one. Only those bytes are written (Xen
    may write the time info beside them).

    The saved shared_info (read at the pause) and the vcpu_info pages
    (guest memory, copied after it, or during a live copy) can disagree:
    Xen sets a vcpu_info's pending word and upcall through its own
    mapping, which log-dirty does not see, so a live copy can hold a
    vcpu_info older than the pause; and a port raised between the
    export and the copy is pending in neither saved copy in full. A port
    pending with its word not marked is never delivered again (Xen only
    raises a port that was not pending). The guest then scans every
    word once: a spurious scan finds nothing."""
    buf[at] = 1
    buf[at + PENDING_SEL_AT : at + PENDING_SEL_AT + 8] = b"\xff" * 8


def _grant_entries(gt: base.GrantTableState) -> np.ndarray:
    if gt.version != 1 or not gt.frames:
        return np.zeros(0, dtype=_GRANT_V1)
    return np.frombuffer(b"".join(gt.frames), dtype=_GRANT_V1)


def mapped_writable(gt: base.GrantTableState) -> np.ndarray:
    """GFNs of the guest's pages a backend has mapped writable, as its
    grant entries said (GTF_writing, set by Xen while mapped). Xen's
    log-dirty sees a backend's writes through a mapping only at its
    unmap: blkback's persistent grants and every ring stay mapped, so a
    live save copies these again with the guest paused, whatever the
    log says."""
    entries = _grant_entries(gt)
    used = (entries["flags"] & GTF_TYPE_MASK) == GTF_PERMIT_ACCESS
    writing = (entries["flags"] & GTF_WRITING) != 0
    return np.unique(entries["frame"][used & writing].astype(np.uint64))


def ring_gfns(
    nodes: Iterable[base.XenstoreNode],
    gt: base.GrantTableState,
    domid: int,
) -> np.ndarray:
    """GFNs of the shared rings of the guest's frontends (``ring-ref*``,
    ``tx-ring-ref``, ``rx-ring-ref`` nodes: grant references), the
    console's aside (its ``ring-ref`` is a frame, mapped by xenconsoled
    and carried by libxl)."""
    entries = _grant_entries(gt)
    found = set()
    for n in nodes:
        name = n.path.rsplit("/", 1)[1]
        kind = kind_of(n.path, domid)
        if kind in (None, "console"):
            continue
        if not (name.startswith("ring-ref") or name.endswith("-ring-ref")):
            continue
        try:
            ref = int(n.value)
        except ValueError:
            continue
        if 0 <= ref < len(entries):
            found.add(int(entries["frame"][ref]))
    return np.array(sorted(found), dtype=np.uint64)


def wait_connected(
    host: XenHost,
    domid: int,
    devs: Iterable[Device],
    *,
    timeout: float,
    call: str = "inplace.restore",
) -> None:
    """Every backend in state 4 (Connected), or DeviceError naming the
    first that is not, with what its driver reported; at once for one
    whose hotplug script failed (it will not connect)."""
    devs = list(devs)
    deadline = time.monotonic() + timeout
    while True:
        waiting = [d for d in devs if _text(host, f"{d.backend}/state") != "4"]
        if not waiting:
            return
        for dev in waiting:
            if _text(host, f"{dev.backend}/hotplug-status") == "error":
                err = _text(host, f"{dev.backend}/hotplug-error")
                raise DeviceError(
                    f"domain {domid}: {dev.kind} {dev.devid}'s hotplug "
                    f"script failed, its backend is not Connected"
                    + (f" ({err})" if err else ""),
                    call=call,
                )
        if time.monotonic() > deadline:
            dev = waiting[0]
            state = _text(host, f"{dev.backend}/state")
            err = _text(
                host,
                f"/local/domain/{dev.backend_domid}/error"
                + dev.backend[len(f"/local/domain/{dev.backend_domid}") :]
                + "/error",
            )
            raise DeviceError(
                f"domain {domid}: {dev.kind} {dev.devid}'s backend is in "
                f"state {state} after {timeout:.0f}s, not Connected"
                + (f" ({err})" if err else ""),
                call=call,
            )
        time.sleep(0.2)


def _backend_type(dev: Device) -> str:
    """The type of the device's backend area (``backend/TYPE/DOMID/DEVID``),
    which its frontend's kind does not fix: a vbd's may be qdisk."""
    parts = dev.backend.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-4] == "backend":
        return parts[-3]
    return dev.kind


def wait_backends_gone(
    domid: int,
    devs: Iterable[Device],
    *,
    timeout: float,
    root: str = XEN_BACKEND_DEVICES,
) -> None:
    """Return once dom0's kernel has removed the backend devices of the
    destroyed domain ``domid``, or DeviceError naming those left.

    ``xl destroy`` returns once it removed the backend areas; the kernel
    drops its devices later, from its xenwatch thread. A backend area
    written again under the same domid before that (the domain created
    again at once) is taken by the old device (the bus finds it by name
    and probes nothing): the old netback, whose vif the hotplug script
    took off its bridge, would serve the new domain."""
    names = [f"{_backend_type(d)}-{domid}-{d.devid}" for d in devs]
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in names if os.path.lexists(f"{root}/{n}")]
        if not left:
            return
        if time.monotonic() > deadline:
            raise DeviceError(
                f"domain {domid}: dom0's kernel still has the destroyed "
                f"domain's backend devices {', '.join(left)} after "
                f"{timeout:.0f}s",
                call="inplace.restore",
            )
        time.sleep(0.1)


def backend_name(domid: int, dev: Device) -> str:
    """The backend's device in dom0's xen-backend bus: KIND-DOMID-DEVID."""
    return f"{_backend_type(dev)}-{domid}-{dev.devid}"


def _driver_file(dev: Device, what: str, root: str) -> str:
    return f"{root}/{_backend_type(dev)}/{what}"


def bound(domid: int, dev: Device, root: str | None = None) -> bool:
    """Whether the backend device has a driver (``driver`` link)."""
    root = root or XEN_BACKEND_DEVICES
    return os.path.lexists(f"{root}/{backend_name(domid, dev)}/driver")


def _write_sysfs(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def unbind(
    domid: int,
    devs: Iterable[Device],
    done: list[Device],
    *,
    drivers: str | None = None,
    devices_root: str | None = None,
) -> list[Device]:
    """Unbind each backend device from its driver, appending each to
    ``done`` (the caller's: what a rollback binds again, a vif's hotplug
    script run, also when this fails half way); returns ``done``. One
    that cannot be unbound is named by DeviceError, the others left
    unbound for the caller's rollback."""
    drivers = drivers or XEN_BACKEND_DRIVERS
    for dev in devs:
        try:
            _write_sysfs(
                _driver_file(dev, "unbind", drivers), backend_name(domid, dev)
            )
        except OSError as exc:
            if not bound(domid, dev, devices_root):
                # Already without a driver: nothing of it runs, and the
                # destination's backend attaches to its rings as well.
                done.append(dev)
                continue
            raise DeviceError(
                f"domain {domid}: {dev.kind} {dev.devid}'s backend could "
                f"not be unbound from its driver: {exc}",
                call="quiesce_backends",
            ) from exc
        done.append(dev)
    return done


def bind(
    domid: int,
    devs: Iterable[Device],
    *,
    drivers: str | None = None,
    devices_root: str | None = None,
) -> None:
    """Bind each backend device to its driver again (those already bound
    are left); DeviceError names the first that could not be, after
    trying them all."""
    drivers = drivers or XEN_BACKEND_DRIVERS
    failed = []
    for dev in devs:
        if bound(domid, dev, devices_root):
            continue
        try:
            _write_sysfs(
                _driver_file(dev, "bind", drivers), backend_name(domid, dev)
            )
        except OSError as exc:
            failed.append(f"{dev.kind} {dev.devid} ({exc})")
    if failed:
        raise DeviceError(
            f"domain {domid}: backends not bound to their driver again: "
            + ", ".join(failed),
            call="resume_backends",
        )


def grants_in_use(gt: base.GrantTableState, domids: Iterable[int]) -> int:
    """How many of the guest's v1 grant entries to ``domids`` Xen marks
    mapped (GTF_reading or GTF_writing), but the toolstack's reserved
    ones (the console's and xenstore's rings: their daemons are not
    quiesced and keep them mapped)."""
    entries = _grant_entries(gt)[GNTTAB_NR_RESERVED_ENTRIES:]
    if not len(entries):
        return 0
    used = (entries["flags"] & GTF_TYPE_MASK) == GTF_PERMIT_ACCESS
    mapped = (entries["flags"] & GTF_IN_USE) != 0
    to = np.isin(entries["domid"], np.array(sorted(set(domids)), np.uint16))
    return int(np.count_nonzero(used & mapped & to))


def wait_unmapped(
    read_grants: Callable[[], base.GrantTableState],
    domid: int,
    devs: Iterable[Device],
    *,
    timeout: float,
) -> None:
    """Return once no grant of the guest's to its devices' backend
    domains is mapped: an unbound backend has ended its requests in
    flight (blkback answers them before it unmaps its ring) and writes
    the guest's memory no more. DeviceError after ``timeout``."""
    backends = {d.backend_domid for d in devs}
    if not backends:
        return
    deadline = time.monotonic() + timeout
    while True:
        left = grants_in_use(read_grants(), backends)
        if not left:
            return
        if time.monotonic() > deadline:
            raise DeviceError(
                f"domain {domid}: {left} grants are still mapped by the "
                f"unbound backends after {timeout:.0f}s",
                call="quiesce_backends",
            )
        time.sleep(0.05)


# struct {blkif,netif_tx,netif_rx}_sring (io/ring.h): req_prod,
# req_event, rsp_prod, rsp_event (32 bits each) open the ring's page.
_SRING_HEAD = struct.Struct("<IIII")


def ring_rsp_prod(page: bytes | memoryview) -> int:
    """The answers the ring's backend produced (``rsp_prod``): where a
    backend attaching to the ring starts (BACK_RING_ATTACH)."""
    return _SRING_HEAD.unpack_from(page)[2]


@dataclasses.dataclass(frozen=True)
class FrontendRings:
    """A frontend's rings as its nodes give them: ring name ("ring" for
    a vbd's one ring, "tx" and "rx" for a vif's) -> grant references,
    and its ports in ring order (one shared by all rings, or one each)."""

    rings: dict[str, tuple[int, ...]]
    ports: tuple[int, ...]


def frontend_rings(
    nodes: Iterable[base.XenstoreNode], dev: Device
) -> FrontendRings:
    """What the device's frontend gave its backend, from its nodes; a
    multi-queue frontend (``multi-queue-num-queues`` above 1) is refused
    by name: the stream's device record carries one queue."""
    area = {
        n.path[len(dev.frontend) + 1 :]: n.value.decode(errors="replace")
        for n in nodes
        if n.path.startswith(dev.frontend + "/")
    }
    refusal = base.multi_queue_refusal(dev.kind, dev.devid, area)
    if refusal is not None:
        raise DeviceError(refusal, call="export_pv_state")

    def number(name: str) -> int:
        try:
            return int(area[name])
        except (KeyError, ValueError):
            raise DeviceError(
                f"{dev.kind} {dev.devid}: its frontend's {name} is "
                f"{area.get(name)!r}, not a number",
                call="export_pv_state",
            ) from None

    if dev.kind == "vbd":
        if "ring-ref" in area:
            refs: tuple[int, ...] = (number("ring-ref"),)
        else:
            # A multi-page ring: ring-ref0 .. ring-ref(2**order - 1).
            order = number("ring-page-order")
            refs = tuple(number(f"ring-ref{i}") for i in range(1 << order))
        return FrontendRings({"ring": refs}, (number("event-channel"),))
    if dev.kind == "vif":
        rings = {
            "tx": (number("tx-ring-ref"),),
            "rx": (number("rx-ring-ref"),),
        }
        if "event-channel" in area:
            return FrontendRings(rings, (number("event-channel"),))
        return FrontendRings(
            rings, (number("event-channel-tx"), number("event-channel-rx"))
        )
    raise DeviceError(
        f"{dev.kind} {dev.devid}: no backend of that kind attaches again",
        call="export_pv_state",
    )


def run_hotplug(domid: int, dev: Device, script: str | None) -> None:
    """Put an unbound and bound again vif back on its bridge with its
    hotplug script's ``online``, as libxl ran it at the vif's creation
    (netback frees the network device at an unbind); the script writes
    ``hotplug-status`` itself, which netback waits for."""
    if dev.kind != "vif" or not script:
        return
    if not script.startswith("/"):
        script = f"/etc/xen/scripts/{script}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "script": script,
        "XENBUS_TYPE": "vif",
        "XENBUS_PATH": dev.backend,
        "XENBUS_BASE_PATH": "backend",
        "vif": f"vif{domid}.{dev.devid}",
        "netdev": "",
        "type_if": "vif",
    }
    try:
        done = subprocess.run(
            [script, "online"],
            env=env,
            capture_output=True,
            text=True,
            timeout=HOTPLUG_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeviceError(
            f"domain {domid}: vif {dev.devid}'s hotplug script {script}: "
            f"{exc}",
            call="resume_backends",
        ) from exc
    if done.returncode:
        raise DeviceError(
            f"domain {domid}: vif {dev.devid}'s hotplug script {script} "
            f"failed ({done.returncode}): {done.stderr.strip()[-400:]}",
            call="resume_backends",
        )
