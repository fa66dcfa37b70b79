"""The hypervisor boundary: what a Xen host can do for a migration.

This module is the one place that says what a host offers. The engine, the
Nova driver and the console commands use a :class:`HostDriver` and the state
types below and nothing else of ``nova_xen_ncm.host``; the simulated host
(``host/sim``) and the real Xen host (``host/xen``) implement it.

The state types describe what the guest can see (architecture.rst section 2),
in host terms. They are not the wire format: ``nova_xen_ncm.stream`` owns the
byte layouts and the engine translates between the two.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import dataclasses
import enum
import os
import threading
import weakref
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import xxhash

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# Domain ids (xen/include/public/xen.h).
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_INVALID = 0x7FF4


# -- errors ---------------------------------------------------------------


class HostError(Exception):
    """A host operation failed; ``call`` names it, ``errno`` if known."""

    def __init__(
        self,
        message: str,
        *,
        call: str | None = None,
        errno: int | None = None,
    ) -> None:
        self.call = call
        self.errno = errno
        text = f"{call}: {message}" if call else message
        if errno is not None:
            text += f" (errno {errno})"
        super().__init__(text)


class DomainNotFound(HostError):
    """No domain with that domid (or name) exists on this host."""


class DomidInUse(HostError):
    """A domain was to be created with a domid another domain holds."""


class InsufficientMemory(HostError):
    """The host cannot give the domain the memory it needs."""


class NotSupported(HostError):
    """This host cannot do what was asked; the message says why."""


# -- domain lifecycle -----------------------------------------------------


class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    DYING = "dying"


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """A PV device of a guest: ``kind`` is "vif" or "vbd"."""

    kind: str
    devid: int
    backend_domid: int = 0
    mac: str | None = None
    disk_bytes: int | None = None
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DirectBoot:
    """A kernel the firmware boots instead of a disk (xl.cfg's
    ``kernel``, ``ramdisk`` and ``cmdline`` of an HVM guest): paths in
    the host's own filesystem."""

    kernel: str
    ramdisk: str | None = None
    cmdline: str | None = None

    @classmethod
    def of_libxl(cls, b_info: Mapping[str, Any]) -> DirectBoot | None:
        """The kernel in libxl's build info (libxl_domain_build_info's
        ``kernel``, ``ramdisk``, ``cmdline``), None without one."""
        if b_info.get("kernel") is None:
            return None
        fields = {}
        for key in ("kernel", "ramdisk", "cmdline"):
            value = b_info.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"b_info {key} {value!r} is not a string")
            if key != "cmdline" and value is not None:
                # Another host would resolve it against another cwd.
                if not os.path.isabs(value):
                    raise ValueError(
                        f"b_info {key} {value!r} is not an absolute path"
                    )
            fields[key] = value
        return cls(**fields)

    def confined(self, dirs: Sequence[str]) -> DirectBoot:
        """This boot with its files' real paths (symbolic links
        followed), each a regular file under one of ``dirs``: the device
        model serves their contents to the guest. Raises ValueError
        naming a file that is not; whether a file outside ``dirs``
        exists is not told."""
        roots = [os.path.realpath(d) for d in dirs if d]
        real = {}
        for key in ("kernel", "ramdisk"):
            path = getattr(self, key)
            if path is None:
                continue
            if not os.path.isabs(path):
                raise ValueError(f"{key} {path!r} is not an absolute path")
            real[key] = os.path.realpath(path)
            if not any(
                os.path.commonpath([real[key], root]) == root for root in roots
            ):
                raise ValueError(
                    f"{key} {path!r} is outside the directories boot "
                    f"files may come from ({', '.join(roots) or 'none'})"
                )
            if not os.path.isfile(real[key]):
                raise ValueError(f"{key} {path!r} is not a file on this host")
        return dataclasses.replace(self, **real)


@dataclasses.dataclass(frozen=True)
class DomainConfig:
    """What a guest is made of.

    ``pv_drivers`` says whether the guest's OS runs PV frontends (it sets
    HVM_PARAM_CALLBACK_IRQ, connects its devices through xenstore). The
    ``workload`` mapping is host-specific (the simulated host reads dirty
    rate, pattern and fill from it; real Xen ignores it). ``boot`` is
    part of the machine: on Xen the device model holds the kernel for
    the firmware, so a restored guest's device model needs it again to
    load the saved one's state (the simulated host boots no firmware and
    ignores it).
    """

    name: str
    memory_bytes: int
    vcpus: int = 1
    uuid: str | None = None
    devices: tuple[DeviceConfig, ...] = ()
    pv_drivers: bool = True
    workload: Mapping[str, object] = dataclasses.field(default_factory=dict)
    boot: DirectBoot | None = None


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    domid: int
    name: str
    uuid: str
    state: DomainState
    memory_bytes: int
    vcpus: int
    # Pages actually populated (RAM the guest was given plus special pages).
    populated_pages: int
    pv_drivers: bool
    cpu_time_ns: int = 0
    # Why a SHUTDOWN or CRASHED domain stopped, by Xen's name of its
    # shutdown code (poweroff, reboot, suspend, crash, watchdog,
    # soft_reset): an HVM guest's triple fault is a reboot. None for a
    # domain that did not stop, or where the host cannot tell.
    shutdown_reason: str | None = None


# -- platform state -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TscInfo:
    """XEN_DOMCTL_{get,set}tscinfo (libxc-migration-stream X86_TSC_INFO)."""

    mode: int
    khz: int
    nsec: int
    incarnation: int


# -- PV state (architecture.rst section 2, items 3 to 8) -------------------


class EvtchnType(enum.IntEnum):
    """EVTCHNSTAT_* of xen/include/public/event_channel.h."""

    CLOSED = 0
    UNBOUND = 1
    INTERDOMAIN = 2
    PIRQ = 3
    VIRQ = 4
    IPI = 5


class EvtchnAbi(enum.IntEnum):
    TWO_LEVEL = 2
    FIFO = 3


@dataclasses.dataclass(frozen=True)
class EventChannel:
    """One port of the guest's table, as EVTCHNOP_status reports it plus
    the pending and mask bits (and FIFO priority where the ABI is FIFO)."""

    port: int
    type: EvtchnType
    vcpu: int = 0
    # UNBOUND: the domid allowed to bind; INTERDOMAIN: the peer.
    remote_domid: int = 0
    remote_port: int = 0
    virq: int = 0
    pirq: int = 0
    pending: bool = False
    masked: bool = False
    priority: int = 7


@dataclasses.dataclass(frozen=True)
class EventChannelState:
    abi: EvtchnAbi
    ports: tuple[EventChannel, ...]
    # FIFO control block GFN and offset per vCPU (empty for 2-level).
    fifo_control_blocks: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class GrantTableState:
    """The guest's grant table: version, where its frames sit in the
    guest's physmap, and their content (v1 or v2 entries, raw)."""

    version: int
    frame_gfns: tuple[int, ...]
    # Raw content of every grant frame, PAGE_SIZE each, in frame order.
    frames: tuple[bytes, ...]
    status_gfns: tuple[int, ...] = ()
    status_frames: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True)
class VcpuInfoPlacement:
    """Where a vCPU's vcpu_info lives: the legacy slot in shared info
    (``gfn`` None) or a page registered with VCPUOP_register_vcpu_info."""

    vcpu: int
    gfn: int | None = None
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class SharedInfoState:
    gfn: int | None
    content: bytes
    vcpu_info: tuple[VcpuInfoPlacement, ...] = ()


@dataclasses.dataclass(frozen=True)
class VcpuPvState:
    """What a guest registered for one vCPU besides vcpu_info: the
    per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector, 0 none), the
    runstate and time areas (guest virtual addresses, 0 none) and the PV
    timers: ``singleshot_ns`` is the time left until the armed singleshot
    deadline when the guest was paused (None: not armed), which another
    host can re-arm; ``periodic_ns`` the periodic timer's period (0
    stopped)."""

    vcpu: int
    upcall_vector: int = 0
    runstate_va: int = 0
    time_va: int = 0
    singleshot_ns: int | None = None
    periodic_ns: int = 0


@dataclasses.dataclass(frozen=True)
class XenstoreNode:
    """A node with its permissions in xs_wire form: the first entry is the
    owner with the default access for everybody else, then the ACL."""

    path: str
    value: bytes
    # (access, domid): access is one of "r", "w", "b" (both), "n" (none).
    perms: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class XenstoreWatch:
    path: str
    token: str
    depth: int = -1  # -1: no depth limit


@dataclasses.dataclass(frozen=True)
class XenstoreTransaction:
    """A transaction the guest had open at pause time.

    ``tx_id`` keeps its number; ``writes`` are the changes it had made
    (value None for a removal). A host that cannot carry the content may
    restore it marked so that its commit fails with EAGAIN, which the
    xenstore protocol allows.
    """

    tx_id: int
    base_generation: int
    writes: tuple[XenstoreNode | tuple[str, None], ...] = ()


@dataclasses.dataclass(frozen=True)
class XenstoreState:
    """Everything of the guest's xenstore connection: its nodes (the
    guest's own tree and its device areas), the watches it registered, the
    transactions it had open, and the store ring's event channel and pfn."""

    nodes: tuple[XenstoreNode, ...]
    watches: tuple[XenstoreWatch, ...]
    transactions: tuple[XenstoreTransaction, ...]
    store_port: int
    store_gfn: int
    #: Watch events xenstored queued for the guest and has not yet written
    #: to its ring (xenstore-migration.md CONNECTION_DATA ``data``), as
    #: XS_WATCH_EVENT messages; a message partly written comes first, by
    #: its remaining octets.
    pending_output: bytes = b""
    #: How many octets at the start of ``pending_output`` are the rest of
    #: a partly written response (CONNECTION_DATA ``out-resp-len``).
    pending_resp_len: int = 0
    #: Requests xenstored read from the ring and had not processed, the
    #: last possibly partly read (CONNECTION_DATA ``in-data``).
    pending_input: bytes = b""


@dataclasses.dataclass(frozen=True)
class InflightRequest:
    """A request the backend had taken off a ring and not yet answered."""

    ring: str
    id: int
    request: bytes


@dataclasses.dataclass(frozen=True)
class BackendState:
    """A PV backend's connection to one frontend, as quiesced at pause.

    The destination backend reconnects with these: it maps the same ring
    grant references, binds the same ports, continues from the same ring
    indices and completes the in-flight requests.
    """

    kind: str
    devid: int
    backend_domid: int
    frontend_path: str
    backend_path: str
    state: int
    ring_refs: tuple[int, ...]
    event_channels: tuple[int, ...]
    # ring name -> (req_cons, rsp_prod_pvt) the backend had reached.
    ring_indices: Mapping[str, tuple[int, int]]
    inflight: tuple[InflightRequest, ...] = ()


@dataclasses.dataclass(frozen=True)
class PvState:
    """All PV state of a guest that a non-cooperative migration carries."""

    domid: int
    backend_domids: tuple[int, ...]
    event_channels: EventChannelState
    grant_table: GrantTableState
    shared_info: SharedInfoState
    xenstore: XenstoreState
    backends: tuple[BackendState, ...]
    #: Per-vCPU registrations and timers, one per vCPU in order; empty
    #: when the host does not model them (the simulated one).
    vcpus: tuple[VcpuPvState, ...] = ()
    #: The domain's HYPERVISOR_vm_assist bits.
    vm_assist: int = 0


# -- the transparency checker's read path -----------------------------------


@dataclasses.dataclass(frozen=True)
class GuestPhysmap:
    """Where the hypervisor placed what it shares with the guest: the
    shared info frame, the grant frames and each vCPU's vcpu_info (the
    guest chose them with XENMEM_add_to_physmap and
    VCPUOP_register_vcpu_info; Xen writes there), and the event channel
    ABI and grant table version in use."""

    shared_info_gfn: int | None
    grant_version: int
    # One per grant frame, in frame order; None for a frame not mapped in
    # the guest's physmap.
    grant_frame_gfns: tuple[int | None, ...]
    vcpu_info: tuple[VcpuInfoPlacement, ...]
    evtchn_abi: EvtchnAbi = EvtchnAbi.TWO_LEVEL


class GuestProbe(abc.ABC):
    """Read-only queries about one guest, as a tool in dom0 makes them:
    foreign reads of the guest's physmap, EVTCHNOP_status, HVMOP_get_param,
    reads of xenstored as dom0. The transparency checker builds its view
    of the guest from these and from the guest's own RAM, never from
    :meth:`HostDriver.guest_state` or the migration's export and send
    paths, so that what it checks cannot vouch for itself. Nothing here
    changes the guest."""

    @abc.abstractmethod
    def physmap(self) -> GuestPhysmap: ...

    @abc.abstractmethod
    def frame(self, gfn: int) -> bytes:
        """A copy of the page at ``gfn`` of the guest's physmap, RAM or a
        frame of Xen's mapped there (xc_map_foreign_range, PROT_READ)."""

    @abc.abstractmethod
    def shared_info(self) -> bytes:
        """A copy of the guest's shared info page, wherever it is."""

    @abc.abstractmethod
    def evtchn_status(self, port: int) -> EventChannel | None:
        """EVTCHNOP_status of ``port`` (its binding; pending and mask
        bits are the shared info page's); None beyond the guest's ports."""

    @abc.abstractmethod
    def hvm_param(self, index: int) -> int:
        """HVMOP_get_param: what the guest would read (0 when unset)."""

    @abc.abstractmethod
    def hvm_record(self, typecode: int, instance: int) -> bytes | None:
        """One record of the HVM context, as
        XEN_DOMCTL_gethvmcontext_partial (hvm_save_one) returns it: the
        record's bytes, without its descriptor; None where the domain
        has no such record. Not the whole-context save the migration
        sends. Raises HostError for a running domain (its vCPU state is
        in its vCPUs until they stop)."""

    @abc.abstractmethod
    def guest_tsc(self) -> int:
        """The guest's TSC now: what RDTSC in the guest would return."""

    @abc.abstractmethod
    def xenstore(self) -> XenstoreReader:
        """A dom0 connection to xenstored for reads."""

    @abc.abstractmethod
    def xenstore_connection(
        self,
    ) -> tuple[tuple[XenstoreWatch, ...], tuple[int, ...], int, int]:
        """xenstored's record of the guest's connection: its watches, its
        open transactions' ids, its store port and gfn (what xenstored's
        control interface shows, not the migration's record)."""

    @abc.abstractmethod
    def guest_records(self) -> GuestRecords:
        """What the guest's own kernel and frontends recorded in its RAM
        (a format of the guest's, not the host's)."""


class XenstoreReader(abc.ABC):
    """The read requests of docs/misc/xenstore.txt."""

    @abc.abstractmethod
    def read(self, path: str, tx: int = 0) -> bytes: ...

    @abc.abstractmethod
    def directory(self, path: str, tx: int = 0) -> list[str]: ...

    @abc.abstractmethod
    def get_perms(self, path: str, tx: int = 0) -> list[tuple[str, int]]: ...


@dataclasses.dataclass(frozen=True)
class GuestRecords:
    """The guest's own records, read from its RAM: per frontend what it
    observed (:attr:`GuestState.frontends`); events counted per port
    (ports below ``len(port_counts)``); per vCPU the work it did; the
    rate its vCPUs write RAM (0: idle vCPUs make no progress)."""

    frontends: Mapping[str, Mapping[str, object]]
    port_counts: tuple[int, ...]
    vcpu_progress: tuple[int, ...]
    dirty_rate: int


# -- what a host can do ---------------------------------------------------


class GuestFeature(str, enum.Enum):
    """Optional PV features a guest may use, which a destination must be
    able to restore: named in SETUP (with the items) and checked against
    :attr:`Capabilities.features` before anything moves."""

    #: The FIFO event channel ABI (EVTCHNOP_init_control; Linux's default).
    EVTCHN_FIFO = "evtchn-fifo"
    #: Grant table v2 (GNTTABOP_set_version), with status frames.
    GNTTAB_V2 = "gnttab-v2"
    #: Interdomain or unbound event channels naming a domain other than
    #: the guest, dom0 and its devices' backend domains (vchan and the
    #: like).
    EVTCHN_DOMU_PEER = "evtchn-domu-peer"
    #: Xenstore nodes whose permissions (owner, default access or an ACL
    #: entry) reach a domain other than the guest, dom0 and its devices'
    #: backend domains, whoever set them.
    XENSTORE_FOREIGN_PERMS = "xenstore-foreign-perms"
    #: Grant entries in use that name a domain other than the guest, dom0
    #: and its devices' backend domains (a page shared with another
    #: guest); that domain is another one, or none, on the destination.
    GNTTAB_FOREIGN_DOMAIN = "gnttab-foreign-domain"


def multi_queue_refusal(
    kind: str, devid: int, area: Mapping[str, str]
) -> str | None:
    """Why a device whose frontend area (node name relative to the area
    -> value) is ``area`` cannot be carried, or None: a frontend that
    switched to several queues (``multi-queue-num-queues`` above 1, or
    ``queue-N`` subdirectories; netfront and blkfront may do it whenever
    they reconnect) has rings a stream's device record has no room for.
    One predicate for the check at SETUP, the one before the pause and
    the export."""
    queues = area.get("multi-queue-num-queues", "1")
    if queues == "1" and not any(k.startswith("queue-") for k in area):
        return None
    return (
        f"{kind} {devid}: its frontend uses {queues} queues; "
        "a migration stream carries one queue per device"
    )


def feature_uses(
    domid: int,
    abi: EvtchnAbi,
    grant_version: int,
    ports: Sequence[EventChannel],
    nodes: Sequence[XenstoreNode],
    backend_domids: Collection[int],
    grants: Sequence[tuple[int, int]] = (),
) -> dict[GuestFeature, str]:
    """The optional features PV state of guest ``domid`` uses, each with
    the first thing that uses it. ``backend_domids`` are the domains
    running the guest's device backends (dom0 runs xenstored and is
    always one). ``grants`` are (reference, domid) of the grant entries
    in use (:func:`grant_domains`). The one predicate both the SETUP report
    (:func:`features_of`) and a destination's import apply, so that what
    the import would refuse is known, and refused, at SETUP."""
    found: dict[GuestFeature, str] = {}
    if abi == EvtchnAbi.FIFO:
        found[GuestFeature.EVTCHN_FIFO] = "FIFO event channel ABI"
    if grant_version != 1:
        found[GuestFeature.GNTTAB_V2] = f"grant table v{grant_version}"
    peers = set(backend_domids) | {domid, 0}
    for p in ports:
        if (
            p.type in (EvtchnType.INTERDOMAIN, EvtchnType.UNBOUND)
            and p.remote_domid not in peers
        ):
            found[GuestFeature.EVTCHN_DOMU_PEER] = (
                f"port {p.port} ({p.type.name.lower()}) names domain "
                f"{p.remote_domid}"
            )
            break
    for ref, granted in grants:
        if granted not in peers:
            found[GuestFeature.GNTTAB_FOREIGN_DOMAIN] = (
                f"grant reference {ref} grants to domain {granted}"
            )
            break
    for node in nodes:
        why = _foreign_perm(node.perms, peers)
        if why:
            found[GuestFeature.XENSTORE_FOREIGN_PERMS] = f"{node.path}: {why}"
            break
    return found


def _foreign_perm(
    perms: Sequence[tuple[str, int]], peers: Collection[int]
) -> str | None:
    """What in a node's permissions reaches a domain outside ``peers``:
    its owner, its default access (every domain), or an ACL entry; by
    whoever set it (guest or toolstack), the destination must be able to
    grant it."""
    if not perms:
        return None
    access, owner = perms[0]
    if owner not in peers:
        return f"owned by domain {owner}"
    if access != "n":
        return f"default access {access!r} for every domain"
    for access, who in perms[1:]:
        if access != "n" and who not in peers:
            return f"grants {access!r} to domain {who}"
    return None


def features_of(
    domid: int,
    abi: EvtchnAbi,
    grant_version: int,
    ports: Sequence[EventChannel],
    nodes: Sequence[XenstoreNode],
    backend_domids: Collection[int],
    grants: Sequence[tuple[int, int]] = (),
) -> frozenset[GuestFeature]:
    """The optional features PV state of guest ``domid`` uses
    (:func:`feature_uses`)."""
    return frozenset(
        feature_uses(
            domid, abi, grant_version, ports, nodes, backend_domids, grants
        )
    )


# The type bits of a grant entry's flags (grant_table.h GTF_type_mask):
# 0 is GTF_invalid, an entry not in use.
_GTF_TYPE_MASK = 3


def grant_domains(gt: GrantTableState) -> list[tuple[int, int]]:
    """(reference, domid) of every grant entry in use, from the table's
    raw frames: a v1 entry (8 bytes) and a v2 entry's header (16 bytes)
    both begin with the u16 flags and the u16 domid (grant_table.h)."""
    size = 8 if gt.version == 1 else 16
    raw = b"".join(gt.frames)
    raw = raw[: len(raw) - len(raw) % size]
    if not raw:
        return []
    head = np.frombuffer(raw, dtype="<u2").reshape(-1, size // 2)[:, :2]
    used = np.flatnonzero(head[:, 0] & _GTF_TYPE_MASK)
    return [(int(r), int(head[r, 1])) for r in used]


def state_feature_uses(state: PvState) -> dict[GuestFeature, str]:
    """:func:`feature_uses` of exported PV state: its nodes and the nodes
    its open transactions write, its devices' backend domains."""
    xs = state.xenstore
    nodes = list(xs.nodes)
    for tx in xs.transactions:
        nodes += [w for w in tx.writes if isinstance(w, XenstoreNode)]
    return feature_uses(
        state.domid,
        state.event_channels.abi,
        state.grant_table.version,
        state.event_channels.ports,
        nodes,
        {b.backend_domid for b in state.backends},
        grant_domains(state.grant_table),
    )


class Item(str, enum.Enum):
    """The items of the transparency invariant (architecture.rst section 2)."""

    MEMORY = "memory"
    PLATFORM = "platform"
    DOMID = "domid"
    XENSTORE = "xenstore"
    EVENT_CHANNELS = "event_channels"
    GRANT_TABLE = "grant_table"
    SHARED_INFO = "shared_info"
    PV_DEVICES = "pv_devices"
    HVM_PARAMS = "hvm_params"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this host can save and restore.

    ``restore`` maps each invariant item to None when the host can restore
    it, or to the reason it cannot. A guest with PV drivers needs every
    item; a guest without PV drivers needs MEMORY, PLATFORM and HVM_PARAMS.
    """

    host: str
    hypervisor: str
    restore: Mapping[Item, str | None]
    log_dirty: bool = True
    preserve_domid: bool = True
    vcpu_throttle: bool = True
    max_vcpus: int = 128
    free_memory_bytes: int = 0
    # Physical CPUs the hypervisor runs guests on (xl info nr_cpus);
    # 0 when the driver does not report them.
    pcpus: int = 0
    #: The optional guest features (GuestFeature) it can restore.
    features: frozenset[GuestFeature] = frozenset()
    #: The name of its memory digest's definition
    #: (HostDriver.memory_digest): a migration's two hosts must digest
    #: alike, or equal memory compares unequal in the downtime ("": the
    #: host names none).
    memory_digest: str = ""
    #: PV devices are restored only with the devices SETUP names
    #: (protocol version 3), whose backends this host creates with the
    #: domain: a source of an earlier version, which cannot name them,
    #: is refused a guest with PV drivers at SETUP.
    devices_named_at_setup: bool = False

    def missing(self, pv_drivers: bool) -> dict[Item, str]:
        """The items a guest would need that this host cannot restore."""
        needed = (
            list(Item)
            if pv_drivers
            else [Item.MEMORY, Item.PLATFORM, Item.HVM_PARAMS]
        )
        return {
            item: self.restore[item]
            for item in needed
            if self.restore.get(item) is not None
        }


@dataclasses.dataclass(frozen=True)
class GuestState:
    """The guest-visible state of architecture.rst section 2 at an instant,
    for the transparency checker: per item a comparable value (digests and
    small tuples) and, for PV devices, what the frontends observed."""

    items: Mapping[Item, object]
    # Per device: the xenbus states the frontend ever saw and its I/O
    # sequence counters (host-specific; empty where unknown).
    frontends: Mapping[str, Mapping[str, object]] = dataclasses.field(
        default_factory=dict
    )
    # What the guest's kernel recorded in its RAM (host-specific; empty
    # where unknown): "ports", events received per port; "vcpus", per
    # vCPU a mapping with "progress" (work done) and its vcpu_time_info
    # ("system_time", ns, 0 where not kept; "tsc_timestamp",
    # "tsc_to_system_mul", "tsc_shift"); "dirty_rate", bytes per second
    # its vCPUs write (0: idle vCPUs make no progress); "wallclock_ns",
    # shared info's wallclock; "guest_tsc" and "host_wall_ns", the
    # guest's TSC and the host's wall time when the record was read;
    # "tsc_incarnation", the TSC info's incarnation.
    kernel: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # Items the host could not read, each with its reason (the
    # checker's NotSupported answers): reported, never guessed.
    unread: Mapping[Item, str] = dataclasses.field(default_factory=dict)


class PageMapping(AbstractContextManager):
    """Guest pages mapped into this process, one ``memoryview`` each.

    Views are valid until :meth:`close`; writable when mapped so. The
    engine writes them to sockets (vectored) and receives into them, so a
    view must be the guest's memory itself, not a copy.
    """

    pfns: np.ndarray
    pages: Sequence[memoryview]

    def runs(self) -> list[tuple[int, memoryview]]:
        """The pages as runs adjacent in this process's memory: (index of
        the run's first page, one view of the whole run), in order. A
        socket call or a hash update then covers a run, not a page."""
        return list(enumerate(self.pages))

    def close(self) -> None:  # pragma: no cover - trivial default
        pass

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostDriver(abc.ABC):
    """A Xen host as the migration engine sees it.

    All calls are synchronous and safe to make from one thread at a time per
    domain. Errors are :class:`HostError` subclasses.
    """

    #: The host's name, as the stream and progress report it.
    hostname: str

    # -- lifecycle --

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def boot_id(self) -> str:
        """An id of this boot of the host: domids restart after a
        reboot, so a journalled domid means nothing under another."""

    @abc.abstractmethod
    def list_domains(self) -> list[DomainInfo]:
        """Every guest domain (not dom0 or service domains)."""

    @abc.abstractmethod
    def domain_info(self, domid: int) -> DomainInfo: ...

    @abc.abstractmethod
    def find_domain(self, name_or_uuid: str) -> DomainInfo: ...

    @abc.abstractmethod
    def create_domain(self, config: DomainConfig) -> int:
        """Build and start a new guest; returns its domid."""

    @abc.abstractmethod
    def create_empty_domain(self, config: DomainConfig, domid: int) -> int:
        """Create a paused domain with exactly ``domid`` and no memory
        populated, to restore a guest into. Raises DomidInUse or
        InsufficientMemory before anything is created."""

    @abc.abstractmethod
    def destroy_domain(self, domid: int, delete_disks: bool = False) -> None:
        """Destroy the domain. ``delete_disks`` (Nova's destroy_disks):
        also delete the disks the host made for it, if the guest did not
        leave this host; a host whose disks are the cloud's volumes and
        images makes none."""

    def disk_path(self, uuid: str, devid: int) -> str | None:
        """The file of a guest's vbd ``devid`` when the host places its
        disks itself, on storage the hosts share; None when the caller
        names the file (the device's ``extra['target']``)."""
        return None

    @abc.abstractmethod
    def pause(self, domid: int) -> None:
        """Stop the guest's vCPUs; when this returns, nothing in the
        guest writes its memory."""

    def pause_for_save(self, domid: int) -> None:
        """Pause the guest for a save or a migration's stop-and-copy: as
        :meth:`pause`, and with no vCPU left waiting on its device model
        (whose state is taken next and replaced on restore). Undone by
        :meth:`unpause`."""
        self.pause(domid)

    @abc.abstractmethod
    def unpause(self, domid: int) -> None: ...

    def shutdown(self, domid: int, reboot: bool = False) -> None:
        """Ask the guest to shut down (or reboot), as ``xl shutdown``
        without ``-w``: "poweroff" (or "reboot") written to its xenstore
        ``control/shutdown``, which its PV drivers act on; returns at
        once. A guest that obeys ends in DomainState.SHUTDOWN (the
        domain is kept until destroyed, as libxl keeps it for its
        on_poweroff action); one that does not keeps running. Raises
        NotSupported when the guest cannot be asked (no PV control)."""
        raise NotSupported(
            f"{type(self).__name__} cannot ask a guest to "
            f"{'reboot' if reboot else 'shut down'}",
            call="shutdown",
        )

    @abc.abstractmethod
    def free_memory(self) -> int:
        """Bytes of memory a new domain could still be given."""

    @abc.abstractmethod
    def console_output(self, domid: int) -> str: ...

    # -- memory --

    @abc.abstractmethod
    def populated_pfns(self, domid: int) -> np.ndarray:
        """Sorted uint64 array of the guest's populated pfns."""

    def populated_runs(self, domid: int) -> PfnRuns:
        """The guest's populated pfns as runs (a guest's RAM is a few:
        as pfns it is 8 octets a page, 16 MiB at 8 GiB). The same object
        while the physmap stands, so that a caller may tell a change by
        identity. By default made from populated_pfns and kept while it
        gives the same read-only array (the Xen host keeps its array,
        read-only, while the p2m stands): a writable one may have been
        changed in place since, and is read again."""
        pfns = self.populated_pfns(domid)
        kept: dict[int, tuple[weakref.ref[np.ndarray], PfnRuns]] = vars(
            self
        ).setdefault("_populated_runs", {})
        held = kept.get(domid)
        if held is not None and held[0]() is pfns:
            return held[1]
        runs = PfnRuns.of(pfns)
        if isinstance(pfns, np.ndarray) and not pfns.flags.writeable:
            # By weak reference: the array the host dropped (a domain
            # gone, a p2m changed) is not kept here, 8 octets a page.
            kept[domid] = (weakref.ref(pfns), runs)
        else:
            kept.pop(domid, None)
        return runs

    @abc.abstractmethod
    def populate(self, domid: int, pfns: np.ndarray) -> None:
        """Populate ``pfns`` in an empty (restoring) domain."""

    @abc.abstractmethod
    def map_pages(
        self, domid: int, pfns: np.ndarray, writable: bool = False
    ) -> PageMapping: ...

    def written_pages(self, domid: int, pfns: np.ndarray) -> np.ndarray:
        """Which of the RAM pages ``pfns`` may hold data (bool, in the
        order given): False only for a page the host knows was never
        written since the domain was created, whose content is zero (as
        Xen knows a pfn it never populated), so that a migration sends
        it as zero without reading it. A host that cannot tell says
        True for every page."""
        return np.ones(len(pfns), dtype=bool)

    @abc.abstractmethod
    def enable_log_dirty(self, domid: int) -> None: ...

    @abc.abstractmethod
    def harvest_dirty(self, domid: int) -> np.ndarray:
        """Return (sorted uint64) and clear the pfns written since the
        previous harvest or enable; a write racing the harvest is in this
        result or the next, never lost."""

    @abc.abstractmethod
    def disable_log_dirty(self, domid: int) -> None: ...

    def settle_digest(self, domid: int) -> None:
        """Bring what the host keeps of the guest's memory digest up to
        date while the guest still runs, just before a migration pauses
        it, so that the digest taken while it is paused reads only the
        pages written since. A host that keeps nothing does nothing."""
        return None

    def settle_digest_part(self, domid: int, pages: int) -> bool:
        """Part of :meth:`settle_digest`, about ``pages`` pages of it, on a
        domain being restored while pages still arrive (a migration's
        destination between rounds, called until it says nothing is
        left or the last pages come): whether any is left. A host that
        keeps nothing, or keeps a destination's digest by itself, does
        nothing."""
        return False

    @abc.abstractmethod
    def set_vcpu_throttle(self, domid: int, fraction: float) -> None:
        """Let the guest's vCPUs run only ``fraction`` (0 < f <= 1) of
        the time; 1.0 removes the throttle."""

    # -- platform state --

    @abc.abstractmethod
    def get_hvm_context(self, domid: int) -> bytes:
        """The HVM context blob in Xen's save-descriptor framing."""

    @abc.abstractmethod
    def set_hvm_context(self, domid: int, blob: bytes) -> None: ...

    @abc.abstractmethod
    def get_hvm_params(self, domid: int) -> dict[int, int]: ...

    @abc.abstractmethod
    def set_hvm_params(
        self, domid: int, params: Mapping[int, int]
    ) -> None: ...

    @abc.abstractmethod
    def get_tsc_info(self, domid: int) -> TscInfo: ...

    @abc.abstractmethod
    def set_tsc_info(self, domid: int, info: TscInfo) -> None: ...

    # Hosts whose guests have a device model and a CPU policy (real Xen)
    # carry them in Xen's own records; the defaults say there are none.

    def set_cpu_policy(self, domid: int, leaves: bytes, msrs: bytes) -> None:
        """Apply X86_CPUID_POLICY (``leaves``) or X86_MSR_POLICY
        (``msrs``), xen_cpuid_leaf_t and xen_msr_entry_t arrays, to a
        restoring domain; the other may be empty."""
        raise NotSupported(
            "this host cannot apply a CPU policy", call="set_cpu_policy"
        )

    def get_emulator_context(self, domid: int) -> tuple[int, bytes] | None:
        """The paused guest's device model state as (libxl emulator id,
        blob) for EMULATOR_CONTEXT, or None when it has no device model."""
        return None

    def set_emulator_context(
        self, domid: int, emulator_id: int, blob: bytes
    ) -> None:
        """Load EMULATOR_CONTEXT into a restoring domain's device model."""
        raise NotSupported(
            "this host has no device model to load EMULATOR_CONTEXT into",
            call="set_emulator_context",
        )

    def libxl_config(self, domid: int) -> dict | None:
        """The guest's libxl domain configuration for a save file's xl
        header, or None to describe it from :meth:`domain_info`."""
        return None

    def direct_boot(self, domid: int) -> DirectBoot | None:
        """The kernel the guest's firmware booted directly (part of its
        machine, which a destination builds again), None when it boots
        from a disk. Raises HostError for a configuration that names one
        wrongly."""
        config = self.libxl_config(domid)
        try:
            return DirectBoot.of_libxl((config or {}).get("b_info", {}))
        except ValueError as exc:
            raise HostError(
                f"domain {domid}'s configuration: {exc}", call="direct_boot"
            ) from None

    # -- PV state --

    def guest_devices(self, domid: int) -> tuple[DeviceConfig, ...]:
        """The guest's PV devices a migration's destination creates with
        the domain (named in SETUP), whose backends then attach to the
        rings the PV state carries. A host whose streams carry the
        backends themselves (the simulated one) names none. Raises
        NotSupported for a device that cannot be carried."""
        return ()

    def check_devices(self, domid: int) -> None:
        """Raise NotSupported, as :meth:`guest_devices` does, if a PV
        device of the running guest can no longer be carried (a frontend
        switched to several queues). Asked again right before the pause,
        so a host answers from what it reads cheaply, without building
        the devices' configuration."""
        self.guest_devices(domid)

    @abc.abstractmethod
    def quiesce_backends(self, domid: int) -> None:
        """Stop the guest's backends taking new requests (at pause);
        what they had in flight stays recorded for export."""

    @abc.abstractmethod
    def resume_backends(self, domid: int) -> None:
        """Undo :meth:`quiesce_backends` (rollback on the source)."""

    def guest_features(self, domid: int) -> frozenset[GuestFeature]:
        """The optional PV features the running guest uses (at SETUP, to
        be refused there if the destination cannot restore them)."""
        raise NotSupported(
            "this host cannot report the guest's PV features",
            call="guest_features",
        )

    @abc.abstractmethod
    def export_pv_state(self, domid: int) -> PvState:
        """The guest's PV state; the guest must be paused and its
        backends quiesced."""

    @abc.abstractmethod
    def import_pv_state(self, domid: int, state: PvState) -> None:
        """Rebuild the PV state in a restoring domain and reconnect its
        backends (state 4, same rings mapped, same ports bound), which
        fails here if a backend cannot. The backends stay quiescent (no
        storage write, no response) until :meth:`unpause`, which has
        them complete the requests in flight. Validates first: nothing
        is applied if any of it is refused."""

    # -- observation --

    @abc.abstractmethod
    def guest_state(
        self,
        domid: int,
        items: Collection[Item] | None = None,
        *,
        guest_records: bool = True,
    ) -> GuestState:
        """The guest-visible state as this host reads it: the engine
        digests its items on both sides before COMMIT. Only ``items`` of
        it if given (memory is costly to digest). ``guest_records``
        adds what the guest recorded in its RAM
        (:attr:`GuestState.frontends` and :attr:`GuestState.kernel`)
        where the host reads it; false leaves them out, as the engine's
        digests, in the pause, read the items only. The transparency
        checker reads none of this: it reads the guest itself
        (:class:`GuestProbe`)."""

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        """The calls made in this thread inside the block are the
        transparency checker's reads. A host that injects faults into
        its calls (the simulated host) leaves these alone, so that the
        oracle neither fails nor changes the faults the migration
        meets; any other host has nothing to do."""
        yield

    def probe(self, domid: int) -> GuestProbe:
        """The transparency checker's read-only queries about the guest
        (:class:`GuestProbe`)."""
        raise NotSupported(
            "this host offers no read-only probe of its guests", call="probe"
        )

    def raise_guest_events(self, domid: int) -> tuple[int, ...]:
        """Raise an event on each bound port of the guest from its other
        end (the peer of an interdomain channel, the VIRQ, the IPI), as
        the transparency checker's probe that every port still delivers;
        returns the ports raised."""
        raise NotSupported(
            "this host cannot raise the guest's events",
            call="raise_guest_events",
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the driver holds (not the guests)."""


def memory_hasher(data: bytes = b"") -> xxhash.xxh3_128:
    """The hash of :meth:`HostDriver.memory_digest`: XXH3-128. The digest
    catches a copy that went wrong (a page missed, misplaced or torn); it
    is no authenticator (the stream is authenticated frame by frame), and
    a cryptographic hash of all RAM would cost more than moving it."""
    return xxhash.xxh3_128(data)


def nonzero_pages(
    pages: np.ndarray | memoryview | bytes, rows: np.ndarray | None = None
) -> np.ndarray:
    """Which of the whole pages in ``pages`` (or of those at indices
    ``rows`` only) hold a non-zero octet.

    A page whose first word is non-zero is settled by that word alone:
    guest memory is mostly such pages, and reading every word of every
    page would pull all of it through the cache before it is sent.
    Only the pages that begin with a zero word are read whole."""
    if isinstance(pages, np.ndarray):
        words = pages.view(np.uint64)
    else:
        words = np.frombuffer(pages, dtype=np.uint64)
    words = words.reshape(-1, PAGE_SIZE // 8)
    first = words[:, 0] if rows is None else words[rows, 0]
    nonzero = first != 0
    maybe = np.flatnonzero(~nonzero)
    if not len(maybe):
        return nonzero
    which = maybe if rows is None else rows[maybe]
    # Read in place, a stretch of consecutive pages at a time (zero
    # memory comes in stretches); gathering them would copy them, which
    # for a zero guest is all of its RAM.
    cuts = np.flatnonzero(np.diff(which) != 1) + 1
    if len(cuts) <= len(which) // 8:
        los = [0, *cuts.tolist()]
        his = [*cuts.tolist(), len(which)]
        for lo, hi in zip(los, his, strict=True):
            page = int(which[lo])
            nonzero[maybe[lo:hi]] = (
                words[page : page + hi - lo].max(axis=1) != 0
            )
    else:
        for lo in range(0, len(which), _GATHER):
            part = which[lo : lo + _GATHER]
            nonzero[maybe[lo : lo + _GATHER]] = words[part].max(axis=1) != 0
    return nonzero


# Pages gathered at a time by nonzero_pages: small enough for the
# allocator to reuse the buffer rather than map fresh memory for each.
_GATHER = 16


# Pfn sets up to this bound go through a bitmap over the pfn space
# (1 octet per pfn): numpy's sort-based set operations cost tens of
# milliseconds per hundred thousand pfns, which a downtime cannot spare.
PFN_BITMAP_LIMIT = 1 << 26


def _as_pfns(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.uint64).ravel() for a in arrays]


def _index(pfns: np.ndarray) -> np.ndarray:
    """uint64 ``pfns`` as an index: numpy would copy them into intp
    (8 octets a pfn) to index with them; a pfn is far below 2**63."""
    return pfns.view(np.int64)


def _bitmap_size(arrays: Sequence[np.ndarray]) -> int | None:
    top = max((int(a.max()) + 1 for a in arrays if len(a)), default=0)
    return top if top <= PFN_BITMAP_LIMIT else None


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, musl's
    has none; or no C library to open: ``CDLL(None)`` is a TypeError
    where there is no dlopen)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the C allocator's free pages back to the system. glibc keeps
    what arrays freed in a thread's arena (once a large array is freed,
    arrays up to its size come from the arenas, not from mappings of
    their own) until its top is free; a migration's rounds free arrays
    in the guest's size (a harvest, a first scan) that would otherwise
    stay resident. About a millisecond: called between rounds, never
    per batch."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def expand_runs(first: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The pfns of the runs ``[first[i], end[i])`` (ascending, disjoint)
    as one sorted uint64 array, built in that array alone: a scan of a
    guest that wrote all of its RAM lists every page, and each temporary
    the size of the result would be 8 octets a page more."""
    lengths = end - first
    keep = lengths > 0
    if not keep.all():
        first, end, lengths = first[keep], end[keep], lengths[keep]
    total = int(lengths.sum())
    out = np.ones(total, dtype=np.int64)
    if not total:
        return out.view(np.uint64)
    # Each run's first slot holds the step from the previous run's last
    # pfn (from -1 for the first); the running sum is then the pfns.
    starts = np.cumsum(lengths) - lengths
    out[starts[0]] = first[0]
    out[starts[1:]] = first[1:] - end[:-1] + 1
    np.cumsum(out, out=out)
    return out.view(np.uint64)


@dataclasses.dataclass(frozen=True, eq=False)
class PfnRuns:
    """Sorted distinct pfns as runs: the pfns ``[first[i], end[i])``,
    int64, ascending, disjoint and not adjacent, read-only."""

    first: np.ndarray
    end: np.ndarray

    def __post_init__(self) -> None:
        for runs in (self.first, self.end):
            runs.flags.writeable = False

    @classmethod
    def of(cls, pfns: np.ndarray) -> PfnRuns:
        """The runs of ``pfns`` (sorted and distinct mostly: others are
        made so first)."""
        p = np.asarray(pfns)
        if not len(p):
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty.copy())
        if not _strictly_increasing(p):
            # A duplicate would make the one-run test below take in a
            # pfn not given, and a descent overlapping, unsorted runs
            # in which members() misses pfns: pages left unsent.
            p = pfn_union(p)
        # Read through a view: a copy would be 8 octets a pfn.
        p = p.view(np.int64) if p.dtype == np.uint64 else p.astype(np.int64)
        low, high = int(p[0]), int(p[-1])
        if high - low + 1 == len(p):
            # One run (a batch of round 0, mostly): nothing to look at.
            return cls(
                np.array([low], dtype=np.int64),
                np.array([high + 1], dtype=np.int64),
            )
        cuts = np.flatnonzero(p[1:] - p[:-1] != 1) + 1
        first = p[np.concatenate(([0], cuts))]
        end = p[np.concatenate((cuts - 1, [len(p) - 1]))] + 1
        return cls(first, end)

    @classmethod
    def merged(cls, first: np.ndarray, end: np.ndarray) -> PfnRuns:
        """Runs ``[first[i], end[i])`` (ascending, disjoint, maybe empty
        or adjacent), the empty ones left out and the adjacent joined."""
        first = np.asarray(first, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        keep = end > first
        first, end = first[keep], end[keep]
        if len(first) > 1:
            join = first[1:] == end[:-1]
            first = first[np.concatenate(([True], ~join))]
            end = end[np.concatenate((~join, [True]))]
        return cls(first.copy(), end.copy())

    def __len__(self) -> int:
        """How many pfns."""
        return int((self.end - self.first).sum())

    def pfns(self) -> np.ndarray:
        """The pfns, sorted uint64 (8 octets a page)."""
        return expand_runs(self.first, self.end)

    def members(self, pfns: np.ndarray) -> np.ndarray:
        """The sorted distinct ``pfns`` that are in the runs: a binary
        search of the few runs each, in time of ``pfns``' count."""
        pfns = pfn_union(np.asarray(pfns, dtype=np.uint64))
        if not len(pfns) or not len(self.first):
            return np.zeros(0, dtype=np.uint64)
        signed = pfns.view(np.int64)
        at = np.searchsorted(self.first, signed, side="right") - 1
        inside = (at >= 0) & (signed < self.end[np.maximum(at, 0)])
        return pfns[inside]

    def difference(self, other: PfnRuns) -> PfnRuns:
        """The runs of the pfns here that are not in ``other``, in time
        of the runs' count."""
        if not len(self.first) or not len(other.first):
            return self
        edges = np.unique(
            np.concatenate((self.first, self.end, other.first, other.end))
        )

        def covered(runs: PfnRuns) -> np.ndarray:
            # Whether each elementary span [edges[k], edges[k + 1]) is
            # in ``runs``: a run opened and not yet closed at its start.
            opened = np.searchsorted(runs.first, edges[:-1], side="right")
            closed = np.searchsorted(runs.end, edges[:-1], side="right")
            return opened > closed

        keep = covered(self) & ~covered(other)
        return PfnRuns.merged(edges[:-1][keep], edges[1:][keep])


_scratch = threading.local()


@contextlib.contextmanager
def _bitmaps(size: int, count: int) -> Iterator[list[np.ndarray]]:
    """``count`` all-false bitmaps of ``size`` pfns, this thread's own,
    reused from call to call: a fresh megabyte is faulted in page by
    page, which in a downtime costs more than the set operation. The
    caller clears what it set before it leaves."""
    masks: list[np.ndarray] = getattr(_scratch, "masks", [])
    if len(masks) < count or len(masks[0]) < size:
        length = max(size, len(masks[0]) if masks else 0)
        masks = [
            # Two: the most any set operation takes.
            np.zeros(length, dtype=bool)
            for _ in range(max(count, 2))
        ]
        _scratch.masks = masks
    # Taken while in use, so that a nested call gets masks of its own;
    # given back only if left clean (no exception on the way).
    _scratch.masks = []
    yield [m[:size] for m in masks[:count]]
    _scratch.masks = masks


def marked(mask: np.ndarray) -> np.ndarray:
    """The indices of the non-zero octets of ``mask`` (bool or uint8),
    as uint64 pfns: np.flatnonzero, but eight octets at a time while few
    are set (a dirty map of a mostly idle guest is scanned in the
    downtime, a byte at a time it costs milliseconds)."""
    octets = mask.view(np.uint8)
    whole = len(octets) // 8 * 8
    words = np.flatnonzero(octets[:whole].view(np.uint64))
    if len(words) > whole // 64:
        # The indices reinterpreted, not copied: for a guest's every
        # page that is 8 octets a page less at the peak.
        return np.flatnonzero(octets).view(np.uint64)
    rows, cols = np.nonzero(octets[:whole].reshape(-1, 8)[words])
    out = (words[rows] * 8 + cols).astype(np.uint64)
    if whole < len(octets):
        tail = np.flatnonzero(octets[whole:]).astype(np.uint64) + whole
        out = np.concatenate((out, tail))
    return out


# A handful is sorted faster than a bitmap over the pfn space is read.
_FEW = 256
# Up to a sixteenth of the pfn space, pfns are sorted rather than set
# in a bitmap of it: faster (at 2.3 Mi pfns, best of 7: 4096 pfns 0.02
# ms against 0.6, 64 Ki 0.7 against 5.0; even at a quarter), and what
# is held is the sort's copy, 8 octets a pfn given, while it runs, not
# a bitmap of the space (an octet a pfn, 2 MiB at 8 GiB) that the
# thread keeps resident from call to call.
_SORTED = 16


def _sorted_is_smaller(count: int, size: int) -> bool:
    return count <= max(_FEW, size // _SORTED)


def _strictly_increasing(pfns: np.ndarray) -> bool:
    return bool(np.all(pfns[1:] > pfns[:-1]))


def _distinct(pfns: np.ndarray) -> np.ndarray:
    """np.unique of a handful of pfns. np.unique itself imports numpy.ma
    on its first call, which in a fresh process's downtime costs tens of
    milliseconds."""
    out = np.sort(pfns)
    if len(out) > 1:
        out = out[np.concatenate(([True], out[1:] != out[:-1]))]
    return out


def _collect(mask: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """Set ``pfns`` in the all-false ``mask``; the sorted distinct pfns;
    ``mask`` all false again."""
    if _sorted_is_smaller(len(pfns), len(mask)):
        return _distinct(pfns)
    mask[_index(pfns)] = True
    out = marked(mask)
    mask[_index(out)] = False
    return out


def pfn_union(*arrays: np.ndarray) -> np.ndarray:
    """The sorted distinct pfns of all ``arrays``."""
    parts = _as_pfns(arrays)
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    if len(parts) == 1 and _strictly_increasing(parts[0]):
        # Already a set (a batch of a round): checked faster than made.
        return parts[0].copy()
    size = _bitmap_size(parts)
    if size is None:
        return np.unique(np.concatenate(parts))
    # One array is not copied (a block index per page of a guest is
    # 8 octets a page): _collect only reads it.
    pfns = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if _sorted_is_smaller(len(pfns), size):
        # No bitmap of the space made or touched.
        return _distinct(pfns)
    with _bitmaps(size, 1) as (mask,):
        return _collect(mask, pfns)


def pfn_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted distinct pfns of ``a`` not in ``b``."""
    a, b = _as_pfns((a, b))
    size = _bitmap_size((a, b))
    if size is None:
        return np.setdiff1d(a, b)
    with _bitmaps(size, 2) as (out, other):
        other[_index(b)] = True
        try:
            return _collect(out, a[~other[_index(a)]])
        finally:
            other[_index(b)] = False


def iter_batches(pfns: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split a pfn array into batches of at most ``size``."""
    for start in range(0, len(pfns), size):
        yield pfns[start : start + size]
