"""The transparency checker: did the guest notice its migration?

It compares the guest-visible state (architecture.rst section 2) of the
source at pause with the destination's at resume (after the PV state is
imported and the backends reconnected, before the guest runs), and,
optionally, a later state of the destination after the guest has run, for
the continuation of I/O. Each item of :class:`~.base.Item` passes or
fails with a reason that names what differs. It knows nothing of any
particular host: only the types of ``host/base.py``.

It shares nothing with what it checks. :func:`snapshot` reads every
item itself: ``MEMORY`` by digesting every populated page
(:func:`read_memory`), not from the host's digest or log-dirty; every
other item by :func:`observe`, through the host's read-only
:class:`~.base.GuestProbe` (foreign reads of the guest's physmap,
EVTCHNOP_status, HVMOP_get_param, one HVM save record at a time,
xenstored read as dom0) and the
guest's own pages, parsed here by Xen's public ABI (shared_info,
vcpu_info and its vcpu_time_info, grant entries, ``*_sring`` headers,
the HVM save records), never from :meth:`~.base.HostDriver.guest_state`
or the migration's export and send paths. :func:`after_resume` judges
the guest after it ran on the destination from what it recorded in its
own RAM (:attr:`GuestState.frontends` and :attr:`GuestState.kernel`)
and from its pvclock on both hosts.

What :attr:`GuestState.items` should hold, per item (a host that cannot
give the detailed form may give any other value: it is then compared for
equality, and a difference is reported without detail):

``MEMORY``
    Page digests of every populated pfn: a ``Mapping[int, bytes | str]``
    pfn -> digest of the page's 4096 bytes (any fixed digest function),
    or a pair ``(pfns, digests)`` of a uint64 array and an array with one
    row (or one element) per pfn, as :func:`page_digests` makes it.
    Rule: identical, except the registered vcpu_info pages
    (``SHARED_INFO`` placements) when a port gained a pending event
    between pause and resume (delivery writes ``evtchn_upcall_pending``
    there; vouched for by ``EVENT_CHANNELS``). Ring pages are not
    exempt: the backends stay quiescent until the guest runs.
``PLATFORM``
    ``Mapping[str, object]``: one entry per HVM context record (suggested
    key ``"<TYPECODE name>:<instance>"``, value its bytes or digest) plus
    ``"tsc"`` (TSC mode, kHz and nsec; :func:`observe` asks for each
    record by itself, never for the whole-context save the migration
    sends), and ``"read_ns"``, the checker's wall time before and after
    its reads. Rule: equal key by key, except, when both sides carry
    ``"read_ns"``, the fields Xen drives by time (the CPU records' TSC,
    the PM timer, the RTC's time of day, the HPET's main counter, the
    TSC info's elapsed ns, the PIT's and RTC's ISA wires), which go
    forward by no more than the wall time between the reads
    (:func:`_platform`, record layouts of Xen 4.17's hvm/save.h);
    the TSC incarnation never goes back; with ``later``, time as Xen
    rebases it: each vCPU's clock (wallclock + pvclock, read from the
    guest's pages) goes forward, agrees with the destination's wall
    time, and across the migration steps forward by no more than the
    wall time between the reads (:func:`_pvclock_across`).
``DOMID``
    ``(domid, backend_domids)``: an int and a tuple of ints. Rule: equal.
``XENSTORE``
    A :class:`~.base.XenstoreState` (or the tuple ``(nodes, watches,
    tx_ids, store_port, store_gfn)`` with nodes as ``(path, value,
    perms)`` and watches as ``(path, token, depth)``). Rule: the same
    nodes with the same values and permissions, the same watches, the
    same open transactions (a transaction restored with no writes, to
    fail its commit with EAGAIN as xenstore.txt allows, passes), the same
    store port and pfn.
``EVENT_CHANNELS``
    An :class:`~.base.EventChannelState` (or ``(abi, ports)``). Rule: the
    same ABI and FIFO control blocks, every port with the same type,
    vCPU, binding (remote domid and port, VIRQ, PIRQ), mask bit and
    priority; a pending bit set at pause stays set, one may become set (an
    event raised after pause, such as a reconnected backend's
    notification, is delivered, not invented).
``GRANT_TABLE``
    A :class:`~.base.GrantTableState`. Rule: the same version, frame
    GFNs and status frame GFNs, every entry byte for byte (including
    GTF_reading/GTF_writing: the backends map the same references again),
    the same status frames.
``SHARED_INFO``
    A :class:`~.base.SharedInfoState` with ``content`` the raw x86_64
    ``struct shared_info`` page (xen.h). Rule: the same GFN and
    ``vcpu_info`` placements; in the page, the same wallclock
    (``wc_version``, ``wc_sec``, ``wc_nsec``, ``wc_sec_hi``), mask words,
    per-vCPU ``evtchn_upcall_mask`` and arch area; pending words,
    ``evtchn_pending_sel`` and ``evtchn_upcall_pending`` may gain bits but
    not lose them; ``vcpu_time_info`` is not compared (Xen rewrites it
    whenever a vCPU is scheduled).
``PV_DEVICES``
    As :func:`observe` reads it, a tuple of :class:`DeviceView`: each
    device's xenstore nodes (both ends' state, backend path and domid),
    its ports with the domain the hypervisor has them bound to, and its
    rings as the guest's RAM shows them (grant reference, page, req_prod
    and rsp_prod, the domain whose mapping the grant entry shows). Rule:
    the same devices, nodes, ports and rings at the same indices (the
    backends are quiescent until the guest runs), and at resume each
    connected device's ports bound to its backend's domain and its rings
    mapped by it; from pause to ``later``, indices never go back and
    never more responses than requests. Or, from a host's own report,
    the :class:`~.base.BackendState` of every device: at pause as the
    backend quiesced it; at resume as the destination's backend exports
    it after reconnecting. A tuple (or a mapping whose values are
    BackendState). Rule: the same devices, paths, backend domid, state
    (4 for a connected device), ring grant references and ports; since
    the backends are quiescent from pause until the guest runs, the
    same ring indices and the same requests in flight. From pause to
    the ``later`` state (and in :func:`after_resume`): ring indices
    never go back, and every request in flight at pause or taken off
    the ring since is answered or still in flight (none lost, none
    answered twice).
``HVM_PARAMS``
    ``Mapping[int, int]`` index -> value (or ``(index, value)`` pairs).
    Rule: equal, HVM_PARAM_CALLBACK_IRQ included.

:attr:`GuestState.frontends` maps a device key ``"<kind>/<devid>"``
(``"vbd/51712"``) to what the guest's frontend recorded in its RAM (the
simulated host's ``Frontend.observation()``): ``"states"``, a tuple of
``(who, state)`` with who ``"frontend"`` (a state it set) or
``"backend"`` (a backend state it saw), in order; the counters
``"next_seq"``, ``"last_rsp_seq"``, ``"sent"``, ``"completed"``,
``"lost"``, ``"duplicated"``, ``"reordered"``, ``"bad_payload"``; and
``"outstanding"``, the sequence numbers sent and not answered. Rule,
part of ``PV_DEVICES``: at resume and later the frontend saw no state it
had not seen at pause; later, no counter of damage grew, sequence numbers
continued, and every request outstanding at pause was answered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import struct
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import xxhash

from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import BackendState
from nova_xen_ncm.host.base import EventChannel
from nova_xen_ncm.host.base import EventChannelState
from nova_xen_ncm.host.base import EvtchnAbi
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import GrantTableState
from nova_xen_ncm.host.base import GuestPhysmap
from nova_xen_ncm.host.base import GuestProbe
from nova_xen_ncm.host.base import GuestRecords
from nova_xen_ncm.host.base import GuestState
from nova_xen_ncm.host.base import HostDriver
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.base import NotSupported
from nova_xen_ncm.host.base import SharedInfoState
from nova_xen_ncm.host.base import VcpuInfoPlacement
from nova_xen_ncm.host.base import XenstoreNode
from nova_xen_ncm.host.base import XenstoreReader
from nova_xen_ncm.host.base import XenstoreState
from nova_xen_ncm.host.base import XenstoreTransaction

# How many differences a reason lists before it summarises.
MAX_LISTED = 5

# HVM params by name (xen/include/public/hvm/params.h), for reasons.
HVM_PARAM_NAMES = {
    0: "CALLBACK_IRQ",
    1: "STORE_PFN",
    2: "STORE_EVTCHN",
    4: "PAE_ENABLED",
    5: "IOREQ_PFN",
    6: "BUFIOREQ_PFN",
    9: "VIRIDIAN",
    10: "TIMER_MODE",
    11: "HPET_ENABLED",
    12: "IDENT_PT",
    13: "DM_DOMAIN",
    14: "ACPI_S_STATE",
    15: "VM86_TSS",
    16: "VPT_ALIGN",
    17: "CONSOLE_PFN",
    18: "CONSOLE_EVTCHN",
    19: "ACPI_IOPORTS_LOCATION",
    24: "NESTEDHVM",
    26: "BUFIOREQ_EVTCHN",
    27: "PAGING_RING_PFN",
    28: "MONITOR_RING_PFN",
    29: "SHARING_RING_PFN",
    31: "TRIPLE_FAULT_REASON",
    32: "IOREQ_SERVER_PFN",
    33: "NR_IOREQ_SERVER_PAGES",
    34: "VM_GENERATION_ID_ADDR",
    35: "ALTP2M",
    36: "X87_FIP_WIDTH",
    37: "VM86_TSS_SIZED",
    38: "MCA_CAP",
}

# struct shared_info / vcpu_info, x86_64 (xen.h, arch-x86/xen.h).
XEN_LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64
VI_UPCALL_PENDING = 0
VI_UPCALL_MASK = 1
VI_PENDING_SEL = 8
VI_ARCH = 16
VI_TIME = 32
SHINFO_PENDING = 2048
SHINFO_MASK = 2560
SHINFO_WC = 3072  # wc_version, wc_sec, wc_nsec, wc_sec_hi
SHINFO_ARCH = 3088

# Grant entry sizes and the Xen-owned status bits of a v1 entry
# (grant_table.h).
GRANT_ENTRY_SIZE = {1: 8, 2: 16}
GTF_reading = 1 << 3
GTF_writing = 1 << 4

_MASK32 = 0xFFFFFFFF

# How far the guest's clock (its time of day from its pvclock and the
# wallclock) may be from the host's wall time once the destination wrote
# them: the TSC scale's rounding and the read's own time.
CLOCK_SLACK_NS = 250_000_000


@dataclasses.dataclass(frozen=True)
class ItemResult:
    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """The verdict per item of architecture.rst section 2."""

    results: Mapping[Item, ItemResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results.values())

    def failures(self) -> dict[Item, str]:
        return {i: r.reason for i, r in self.results.items() if not r.passed}

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {
            item.value: {"passed": r.passed, "reason": r.reason}
            for item, r in self.results.items()
        }

    def __str__(self) -> str:
        lines = [
            f"{item.value}: {'ok' if r.passed else 'FAILED'}"
            + (f" ({r.reason})" if r.reason else "")
            for item, r in self.results.items()
        ]
        return "\n".join(lines)


def check(
    paused: GuestState,
    resumed: GuestState,
    later: GuestState | None = None,
) -> CheckReport:
    """Check every item: ``paused`` is the source's state at pause,
    ``resumed`` the destination's at resume, ``later`` the destination's
    after some run time (optional: without it, I/O continuation is not
    checked)."""
    results: dict[Item, ItemResult] = {}
    for item in Item:
        if item not in paused.items or item not in resumed.items:
            state = paused if item not in paused.items else resumed
            side = "source" if state is paused else "destination"
            why = state.unread.get(item)
            results[item] = ItemResult(
                False,
                f"the {side} reported no value"
                + (f" (not readable there: {why})" if why else ""),
            )
            continue
        a, b = paused.items[item], resumed.items[item]
        if item is Item.MEMORY:
            problems = _memory(a, b, _rewritten_pfns(paused, resumed))
        elif item is Item.PV_DEVICES:
            problems = _pv_devices(a, b, paused, resumed, later)
        elif item is Item.PLATFORM:
            problems = _platform(a, b) + _incarnation(paused, resumed)
            if later is not None:
                problems += _clock(resumed, later)[0]
                problems += _pvclock_across(paused, later)
        else:
            problems = _CHECKS[item](a, b)
        results[item] = ItemResult(not problems, _reason(problems))
    return CheckReport(results)


def _reason(problems: list[str]) -> str:
    if len(problems) <= MAX_LISTED:
        return "; ".join(problems)
    shown = "; ".join(problems[:MAX_LISTED])
    return f"{shown}; and {len(problems) - MAX_LISTED} more"


def _opaque(a: object, b: object, what: str) -> list[str]:
    return [] if a == b else [f"{what} differs"]


def _listed(values: Iterable[object]) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:MAX_LISTED])
    if len(values) > MAX_LISTED:
        text += f" and {len(values) - MAX_LISTED} more"
    return text


# -- the oracle's own reading of the guest ----------------------------------

# Pages mapped at a time to digest them.
READ_BATCH = 4096


def read_memory(host: HostDriver, domid: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``MEMORY`` value of the guest as the checker reads it itself:
    a digest of every populated page, read now from the guest's RAM
    mapped read-only. Nothing of the host's own digest, its log-dirty
    bookkeeping or the migration's send path is used, so a write that
    escapes them all is still seen. XXH3-128 per page: it finds a page
    copied wrong, and reads a gigabyte in a fraction of a second. The
    reads are the host's :meth:`~.base.HostDriver.observing` calls: no
    injected fault fails them."""
    with host.observing():
        return _read_memory(host, domid)


def _read_memory(
    host: HostDriver, domid: int
) -> tuple[np.ndarray, np.ndarray]:
    pfns = np.sort(np.asarray(host.populated_pfns(domid), dtype=np.uint64))
    digests = np.empty((len(pfns), 16), dtype=np.uint8)
    digest = xxhash.xxh3_128_digest
    for start in range(0, len(pfns), READ_BATCH):
        part = pfns[start : start + READ_BATCH]
        out = []
        with host.map_pages(domid, part, writable=False) as mapping:
            for _, run in mapping.runs():
                out += [
                    digest(run[off : off + PAGE_SIZE])
                    for off in range(0, len(run), PAGE_SIZE)
                ]
        digests[start : start + len(part)] = np.frombuffer(
            b"".join(out), dtype=np.uint8
        ).reshape(len(part), 16)
    return pfns, digests


def snapshot(
    host: HostDriver, domid: int, items: Iterable[Item] | None = None
) -> GuestState:
    """The guest's state for :func:`check`, read by the checker itself:
    memory by :func:`read_memory`, every other item by :func:`observe`
    (the guest's RAM and the host's read-only :class:`~.base.GuestProbe`
    queries), nothing from :meth:`~.base.HostDriver.guest_state` or the
    migration's export and send paths."""
    wanted = set(Item if items is None else items)
    state = observe(host, domid, wanted - {Item.MEMORY})
    if Item.MEMORY not in wanted:
        return state
    return dataclasses.replace(
        state,
        items={**state.items, Item.MEMORY: read_memory(host, domid)},
    )


# -- the oracle's own reading of the rest ------------------------------------

# xen/include/public/hvm/params.h
HVM_NR_PARAMS = 39
# The HVM save typecodes' names (public/arch-x86/hvm/save.h).
HVM_SAVE_NAMES = {
    1: "HEADER",
    2: "CPU",
    3: "PIC",
    4: "IOAPIC",
    5: "LAPIC",
    6: "LAPIC_REGS",
    7: "PCI_IRQ",
    8: "ISA_IRQ",
    9: "PCI_LINK",
    10: "PIT",
    11: "RTC",
    12: "HPET",
    13: "PMTIMER",
    14: "MTRR",
    15: "VIRIDIAN_DOMAIN",
    16: "CPU_XSAVE",
    17: "VIRIDIAN_VCPU",
    18: "VMCE_VCPU",
    19: "TSC_ADJUST",
    20: "CPU_MSR",
}
# HVM_SAVE_CODE_MAX (public/arch-x86/hvm/save.h)
HVM_SAVE_CODE_MAX = 20
# struct vcpu_time_info (xen.h): version, pad0, tsc_timestamp,
# system_time, tsc_to_system_mul, tsc_shift, flags, pad1[2].
VCPU_TIME_INFO = struct.Struct("<IIQQIbB2x")
# A pvclock or wallclock whose version stays odd this many reads is
# being written by nobody that finishes: reported, not waited for.
VERSION_TRIES = 1000
# struct *_sring (io/ring.h): req_prod, req_event, rsp_prod, rsp_event.
SRING_HEADER = struct.Struct("<IIII")
GRANT_ENTRY_V1 = struct.Struct("<HHI")  # flags, domid, frame
GTF_type_mask = 3
GTF_permit_access = 1
# xenbus states (io/xenbus.h)
XENBUS_CONNECTED = 4


@dataclasses.dataclass(frozen=True)
class SharedRing:
    """A PV ring as an outside observer sees it: the frontend's grant
    reference and the page it grants, the shared ring's producer indices
    in that page, and whether the grant entry shows it mapped by the
    backend's domain (Xen sets GTF_reading/GTF_writing while it is)."""

    ref: int
    gfn: int | None
    req_prod: int
    rsp_prod: int
    mapped_by: int | None


@dataclasses.dataclass(frozen=True)
class DeviceView:
    """A PV device as the checker reads it: the xenstore nodes of both
    ends (as dom0 reads them), the frontend's event channel port and the
    domain the hypervisor has it bound to, and its rings in guest RAM."""

    kind: str
    devid: int
    frontend_path: str
    backend_path: str
    backend_domid: int
    frontend_state: int
    backend_state: int
    # (port, the domid at its other end, or None when not interdomain)
    ports: tuple[tuple[int, int | None], ...]
    rings: tuple[tuple[str, SharedRing], ...]


def observe(
    host: HostDriver, domid: int, items: Iterable[Item] | None = None
) -> GuestState:
    """Every item but memory (and the guest's records), as an outside
    observer reads them: pages of the guest's physmap (shared info,
    vcpu_info, grant frames, rings) parsed here by Xen's public ABI;
    EVTCHNOP_status per port, HVMOP_get_param per index, the HVM context
    and TSC info as Xen returns them (parsed here, not by the send path's
    decoder), xenstored's nodes read as dom0; the guest's own records of
    what it observed. All through :meth:`HostDriver.probe`, queries
    apart from the migration's export and from
    :meth:`HostDriver.guest_state`. Raises NotSupported when the host
    has no probe."""
    wanted = set(Item if items is None else items) - {Item.MEMORY}
    with host.observing():
        probe = host.probe(domid)
        return _Observer(host, domid, probe).state(wanted)


class _Observer:
    def __init__(self, host: HostDriver, domid: int, probe: GuestProbe):
        self.host = host
        self.domid = domid
        self.probe = probe
        self._read: dict[str, object] = {}
        self._bindings: tuple[EventChannel, ...] | None = None
        self._ports: tuple[EventChannel, ...] | None = None
        self._grant_frames: tuple[bytes, ...] | None = None
        # Read first, as before any item: a host error other than a
        # refusal fails the whole observation, not an item silently.
        for name, read in (
            ("physmap", probe.physmap),
            ("shared_info", probe.shared_info),
        ):
            with contextlib.suppress(NotSupported):
                self._once(name, read)

    def _once(self, name: str, read: Callable[[], object]) -> object:
        # Read once; a refusal (NotSupported) is kept and raised again to
        # every item that needs the read, which is then reported unread.
        if name not in self._read:
            try:
                self._read[name] = read()
            except NotSupported as exc:
                self._read[name] = exc
        value = self._read[name]
        if isinstance(value, NotSupported):
            raise value
        return value

    @property
    def physmap(self) -> GuestPhysmap:
        return self._once("physmap", self.probe.physmap)  # type: ignore[return-value]

    @property
    def shinfo(self) -> bytes:
        return self._once("shared_info", self.probe.shared_info)  # type: ignore[return-value]

    def state(self, wanted: set[Item]) -> GuestState:
        items: dict[Item, object] = {}
        unread: dict[Item, str] = {}
        records = self.probe.guest_records()
        for item, read in (
            (Item.PLATFORM, self.platform),
            (Item.DOMID, self.domid_item),
            (Item.HVM_PARAMS, self.hvm_params),
            (Item.EVENT_CHANNELS, self.event_channels),
            (Item.GRANT_TABLE, self.grant_table),
            (Item.SHARED_INFO, self.shared_info),
            (Item.XENSTORE, self.xenstore),
            (Item.PV_DEVICES, self.devices),
        ):
            if item in wanted:
                try:
                    items[item] = read()
                except NotSupported as exc:
                    # The host cannot give what the item needs (stock
                    # Xen: what only the guest or a patched hypervisor
                    # knows): reported missing, saying why.
                    unread[item] = str(exc)
                except HostError:
                    # Not there to read (no xenstore connection for a
                    # guest without PV drivers): the item is then
                    # reported missing by check().
                    continue
        return GuestState(
            items=items,
            frontends=dict(records.frontends),
            kernel=self.kernel(records),
            unread=unread,
        )

    # -- event channels, from EVTCHNOP_status and the shared info page --

    def bindings(self) -> tuple[EventChannel, ...]:
        # The bindings are the hypervisor's alone (nothing in guest RAM
        # says which domain a port is bound to): asked port by port with
        # EVTCHNOP_status, the query a guest or lsevtchn makes, which is
        # independent of the toolstack's table export the migration
        # sends.
        if self._bindings is None:
            out = []
            port = 1
            while (st := self.probe.evtchn_status(port)) is not None:
                if st.type != EvtchnType.CLOSED:
                    remote_port = st.remote_port
                    if (
                        st.type == EvtchnType.INTERDOMAIN
                        and st.remote_domid != self.domid
                    ):
                        # The other end's number is that domain's to give
                        # (a restore may renumber dom0's end): not the
                        # guest's to see.
                        remote_port = 0
                    out.append(
                        dataclasses.replace(st, remote_port=remote_port)
                    )
                port += 1
            self._bindings = tuple(out)
        return self._bindings

    def ports(self) -> tuple[EventChannel, ...]:
        # Pending and mask bits come from the shared info page.
        if self._ports is None:
            pending = _u64s(self.shinfo, SHINFO_PENDING, 64)
            mask = _u64s(self.shinfo, SHINFO_MASK, 64)
            self._ports = tuple(
                dataclasses.replace(
                    st,
                    pending=_bit(pending, st.port),
                    masked=_bit(mask, st.port),
                )
                for st in self.bindings()
            )
        return self._ports

    def event_channels(self) -> EventChannelState:
        if self.physmap.evtchn_abi != EvtchnAbi.TWO_LEVEL:
            raise NotSupported(
                "the checker reads the 2-level event channel ABI only",
                call="observe",
            )
        return EventChannelState(EvtchnAbi.TWO_LEVEL, self.ports())

    # -- grant table and shared info: pages of the physmap --

    def grant_frames(self) -> tuple[bytes, ...]:
        if self._grant_frames is None:
            self._grant_frames = tuple(
                b"" if gfn is None else self.probe.frame(gfn)
                for gfn in self.physmap.grant_frame_gfns
            )
        return self._grant_frames

    def grant_table(self) -> GrantTableState:
        return GrantTableState(
            version=self.physmap.grant_version,
            frame_gfns=tuple(
                -1 if g is None else g for g in self.physmap.grant_frame_gfns
            ),
            frames=self.grant_frames(),
        )

    def grant_entry(self, ref: int) -> tuple[int, int, int] | None:
        if self.physmap.grant_version != 1:
            return None
        raw = b"".join(self.grant_frames())
        off = ref * GRANT_ENTRY_V1.size
        if ref < 0 or off + GRANT_ENTRY_V1.size > len(raw):
            return None
        return GRANT_ENTRY_V1.unpack_from(raw, off)

    def shared_info(self) -> SharedInfoState:
        return SharedInfoState(
            gfn=self.physmap.shared_info_gfn,
            content=self.shinfo,
            vcpu_info=self.physmap.vcpu_info,
        )

    # -- HVM params, platform, domid --

    def hvm_params(self) -> tuple[tuple[int, int], ...]:
        # An unset param reads 0 to the guest: only the others count.
        values = ((i, self.probe.hvm_param(i)) for i in range(HVM_NR_PARAMS))
        return tuple((i, v) for i, v in values if v)

    def platform(self) -> dict[str, object]:
        # Each HVM save record asked for by itself
        # (XEN_DOMCTL_gethvmcontext_partial, hvm_save_one), every
        # typecode of save.h for every vCPU: not the whole-context save
        # (get_hvm_context) that the send path encodes and streams, so
        # a record that save leaves out is still found here. The TSC
        # info has one source, the hypervisor (XEN_DOMCTL_gettscinfo).
        out: dict[str, object] = {}
        # The checker's own wall time around the reads: what bounds how
        # far Xen's time-driven fields may move between two snapshots.
        start_ns = time.time_ns()
        try:
            vcpus = len(self.physmap.vcpu_info)
        except NotSupported:
            # No placements to count: the vCPUs as the domain has them.
            vcpus = self.host.domain_info(self.domid).vcpus
        for code in range(1, HVM_SAVE_CODE_MAX + 1):
            name = HVM_SAVE_NAMES.get(code, f"TYPE{code}")
            for instance in range(max(1, vcpus)):
                record = self.probe.hvm_record(code, instance)
                if record is not None:
                    out[f"{name}:{instance}"] = record
        tsc = self.host.get_tsc_info(self.domid)
        # Not the incarnation: every restore adds one (_incarnation).
        out["tsc"] = (tsc.mode, tsc.khz, tsc.nsec)
        out[PLATFORM_READ_NS] = (start_ns, time.time_ns())
        return out

    def domid_item(self) -> tuple[int, tuple[int, ...]]:
        ids = set()
        with contextlib.suppress(HostError):
            ids |= {v.backend_domid for v in self.devices()}
        ids |= {
            p.remote_domid
            for p in self.bindings()
            if p.type in (EvtchnType.INTERDOMAIN, EvtchnType.UNBOUND)
            and p.remote_domid != self.domid
        }
        return self.domid, tuple(sorted(ids))

    # -- xenstore, as dom0 reads it --

    def home(self) -> str:
        return f"/local/domain/{self.domid}"

    def xenstore(self) -> XenstoreState:
        watches, txs, port, gfn = self.probe.xenstore_connection()
        xs = self.probe.xenstore()
        nodes = []
        todo = [self.home()]
        while todo:
            path = todo.pop()
            try:
                value = xs.read(path)
                perms = tuple(tuple(p) for p in xs.get_perms(path))
                children = xs.directory(path)
            except Exception as exc:  # noqa: BLE001 - xenstored's errors
                if _xs_gone(exc):
                    continue  # removed while walking
                raise
            nodes.append(XenstoreNode(path, value, perms))
            todo += [f"{path}/{c}" for c in children]
        return XenstoreState(
            nodes=tuple(sorted(nodes, key=lambda n: n.path)),
            watches=tuple(sorted(watches, key=dataclasses.astuple)),
            transactions=tuple(XenstoreTransaction(t, 0) for t in txs),
            store_port=port,
            store_gfn=gfn,
        )

    # -- PV devices: xenstore, the port's binding, the rings in RAM --

    def devices(self) -> tuple[DeviceView, ...]:
        xs = self.probe.xenstore()
        # HostError when not introduced; a xenstored that does not list
        # the connection's watches still serves the device nodes.
        with contextlib.suppress(NotSupported):
            self.probe.xenstore_connection()
        out = []
        base_path = f"{self.home()}/device"
        kinds = _xs_list(xs, base_path)
        for kind in sorted(kinds):
            for devid in sorted(_xs_list(xs, f"{base_path}/{kind}")):
                if devid.isdigit():
                    out.append(self.device(xs, kind, int(devid)))
        return tuple(out)

    def device(self, xs: XenstoreReader, kind: str, devid: int) -> DeviceView:
        fe = f"{self.home()}/device/{kind}/{devid}"
        be = _xs_text(xs, f"{fe}/backend")
        backend_domid = _xs_int(xs, f"{fe}/backend-id")
        names = _xs_list(xs, fe)
        bound = {p.port: p for p in self.bindings()}
        ports = []
        for name in sorted(n for n in names if n.endswith("event-channel")):
            port = _xs_int(xs, f"{fe}/{name}")
            st = bound.get(port)
            peer = (
                st.remote_domid
                if st is not None and st.type == EvtchnType.INTERDOMAIN
                else None
            )
            ports.append((port, peer))
        rings = []
        for name in sorted(n for n in names if n.endswith("ring-ref")):
            ref = _xs_int(xs, f"{fe}/{name}")
            rings.append((name[: -len("-ref")], self.ring(ref)))
        return DeviceView(
            kind=kind,
            devid=devid,
            frontend_path=fe,
            backend_path=be,
            backend_domid=backend_domid,
            frontend_state=_xs_int(xs, f"{fe}/state"),
            backend_state=_xs_int(xs, f"{be}/state") if be else -1,
            ports=tuple(ports),
            rings=tuple(rings),
        )

    def ring(self, ref: int) -> SharedRing:
        entry = self.grant_entry(ref)
        if entry is None or entry[0] & GTF_type_mask != GTF_permit_access:
            return SharedRing(ref, None, 0, 0, None)
        flags, grantee, gfn = entry
        try:
            page = self.probe.frame(gfn)
        except HostError:
            return SharedRing(ref, gfn, 0, 0, None)
        req_prod, _, rsp_prod, _ = SRING_HEADER.unpack_from(page, 0)
        mapped = grantee if flags & (GTF_reading | GTF_writing) else None
        return SharedRing(ref, gfn, req_prod, rsp_prod, mapped)

    # -- the guest's records and its clock --

    def kernel(self, records: GuestRecords) -> dict[str, object]:
        if not records.vcpu_progress:
            return {}
        counts = records.port_counts
        ports = {
            p.port: counts[p.port]
            for p in self.ports()
            if p.port < len(counts)
        }
        vcpus = []
        for v, progress in enumerate(records.vcpu_progress):
            info = self.pvclock(v)
            vcpus.append({"progress": progress, **info})
        wallclock, wc_version = self.wallclock()
        # The guest's TSC and the wall time, read right after its time
        # info: what its clock reads now, and what it should read.
        guest_tsc = self.probe.guest_tsc()
        wall_ns = time.time_ns()
        return {
            "ports": ports,
            "vcpus": tuple(vcpus),
            "dirty_rate": records.dirty_rate,
            "wallclock_ns": wallclock,
            "wc_version": wc_version,
            "guest_tsc": guest_tsc,
            "host_wall_ns": wall_ns,
            "tsc_incarnation": self.host.get_tsc_info(self.domid).incarnation,
        }

    def _vcpu_info(self, vcpu: int) -> bytes:
        placed = next(
            (p for p in self.physmap.vcpu_info if p.vcpu == vcpu), None
        )
        if placed is None or placed.gfn is None:
            page = self.probe.shared_info()
            off = vcpu * VCPU_INFO_SIZE
        else:
            page = self.probe.frame(placed.gfn)
            off = placed.offset
        return page[off : off + VCPU_INFO_SIZE]

    def pvclock(self, vcpu: int) -> dict[str, int]:
        """vcpu_time_info read with its version protocol (Linux's
        pvclock_read_begin/retry): even, and the same before and after
        the fields were read; a read never consistent in VERSION_TRIES
        is marked unstable and reported (_pvclock_across)."""
        stable = False
        for _ in range(VERSION_TRIES):
            first = VCPU_TIME_INFO.unpack_from(self._vcpu_info(vcpu), VI_TIME)
            if first[0] & 1:
                continue
            again = VCPU_TIME_INFO.unpack_from(self._vcpu_info(vcpu), VI_TIME)
            if again == first:
                stable = True
                break
        (
            version,
            _,
            tsc_timestamp,
            system_time,
            mul,
            shift,
            _,
        ) = first
        return {
            "pvclock_version": version,
            "pvclock_stable": stable,
            "system_time": system_time,
            "tsc_timestamp": tsc_timestamp,
            "tsc_to_system_mul": mul,
            "tsc_shift": shift,
        }

    def wallclock(self) -> tuple[int, int]:
        """shared_info's wallclock, ns, by its wc_version protocol; the
        version, odd when no read was consistent (reported)."""
        for _ in range(VERSION_TRIES):
            raw = self.probe.shared_info()
            version, sec, nsec, sec_hi = struct.unpack_from(
                "<IIII", raw, SHINFO_WC
            )
            if version & 1:
                continue
            if (
                struct.unpack_from("<I", self.probe.shared_info(), SHINFO_WC)[
                    0
                ]
                == version
            ):
                break
        else:
            version |= 1
        return ((sec_hi << 32 | sec) * 1_000_000_000 + nsec, version)


def _bit(words: np.ndarray, port: int) -> bool:
    return bool(int(words[port // 64]) >> (port % 64) & 1)


def _xs_gone(exc: BaseException) -> bool:
    return "ENOENT" in str(getattr(exc, "name", "")) or "ENOENT" in str(exc)


def _xs_list(xs: XenstoreReader, path: str) -> list[str]:
    try:
        return xs.directory(path)
    except Exception as exc:  # noqa: BLE001 - xenstored's errors
        if _xs_gone(exc):
            return []
        raise


def _xs_text(xs: XenstoreReader, path: str) -> str:
    try:
        return xs.read(path).decode()
    except Exception as exc:  # noqa: BLE001 - xenstored's errors
        if _xs_gone(exc):
            return ""
        raise


def _xs_int(xs: XenstoreReader, path: str) -> int:
    text = _xs_text(xs, path)
    return int(text) if text.strip().lstrip("-").isdigit() else -1


# -- memory -----------------------------------------------------------------


def page_digests(
    pfns: np.ndarray, pages: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``MEMORY`` value of a GuestState: ``pages`` is an (n, 4096)
    uint8 array of the pages at ``pfns``; returns (pfns, digests) with a
    16-byte BLAKE2b digest per page."""
    digests = np.empty((len(pfns), 16), dtype=np.uint8)
    for i in range(len(pfns)):
        digests[i] = np.frombuffer(
            hashlib.blake2b(pages[i].tobytes(), digest_size=16).digest(),
            dtype=np.uint8,
        )
    return np.asarray(pfns, dtype=np.uint64), digests


def _page_digests(value: object) -> tuple[np.ndarray, np.ndarray] | None:
    """Either MEMORY form as (sorted uint64 pfns, one digest row each)."""
    if isinstance(value, Mapping):
        pfns = np.array(sorted(int(k) for k in value), dtype=np.uint64)
        rows = [_as_bytes(value[int(p)]) for p in pfns]
    elif (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], np.ndarray)
    ):
        pfns = np.asarray(value[0], dtype=np.uint64)
        digests = np.asarray(value[1])
        if len(digests) != len(pfns):
            return None
        order = np.argsort(pfns, kind="stable")
        pfns = pfns[order]
        if digests.dtype == np.uint8 and digests.ndim == 2:
            return pfns, digests[order]
        rows = [_as_bytes(digests[i]) for i in order]
    else:
        return None
    width = max((len(r) for r in rows), default=0)
    table = np.zeros((len(rows), width + 1), dtype=np.uint8)
    for i, r in enumerate(rows):
        # The length goes in too, so digests of different sizes differ.
        table[i, 0] = len(r) & 0xFF
        table[i, 1 : 1 + len(r)] = np.frombuffer(r, dtype=np.uint8)
    return pfns, table


def _as_bytes(v: object) -> bytes:
    if isinstance(v, np.ndarray):
        return v.tobytes()
    if isinstance(v, str):
        return v.encode()
    return bytes(v)  # type: ignore[arg-type]


def _memory(a: object, b: object, exempt: set[int]) -> list[str]:
    da, db = _page_digests(a), _page_digests(b)
    if da is None or db is None:
        return _opaque(a, b, "memory digest")
    (pa, ta), (pb, tb) = da, db
    problems = []
    missing = np.setdiff1d(pa, pb)
    extra = np.setdiff1d(pb, pa)
    if len(missing):
        problems.append(
            f"{len(missing)} pfns not populated on the destination: "
            + _listed(hex(int(p)) for p in missing)
        )
    if len(extra):
        problems.append(
            f"{len(extra)} pfns populated only on the destination: "
            + _listed(hex(int(p)) for p in extra)
        )
    common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
    if ta.shape[1:] != tb.shape[1:]:
        differ = np.ones(len(common), dtype=bool)
    else:
        differ = (ta[ia] != tb[ib]).reshape(len(common), -1).any(axis=1)
    changed = [int(p) for p in common[differ] if int(p) not in exempt]
    if changed:
        problems.append(
            f"{len(changed)} pages differ: pfn "
            + _listed(hex(p) for p in changed)
        )
    return problems


def _rewritten_pfns(paused: GuestState, resumed: GuestState) -> set[int]:
    """Pages written on the guest's behalf between pause and resume: the
    registered vcpu_info areas if an event was delivered meanwhile (Xen
    sets evtchn_upcall_pending and evtchn_pending_sel there). Ring pages
    are not among them: the backends are quiescent until the guest
    runs, so nothing answers on a ring in between."""
    return _notified_vcpu_info_pfns(paused, resumed)


def _notified_vcpu_info_pfns(
    paused: GuestState, resumed: GuestState
) -> set[int]:
    ea = _evtchn_view(paused.items.get(Item.EVENT_CHANNELS))
    eb = _evtchn_view(resumed.items.get(Item.EVENT_CHANNELS))
    if ea is None or eb is None:
        return set()
    was_pending = {p.port for p in ea[1] if p.pending}
    if not any(p.pending and p.port not in was_pending for p in eb[1]):
        return set()
    si = paused.items.get(Item.SHARED_INFO)
    if isinstance(si, SharedInfoState):
        placements = si.vcpu_info
    elif isinstance(si, tuple) and len(si) == 3:
        placements = si[2]
    else:
        return set()
    return {
        v.gfn
        for v in placements
        if isinstance(v, VcpuInfoPlacement) and v.gfn is not None
    }


# -- platform, domid, HVM params ---------------------------------------------


# The platform item's entry of the checker's wall time (ns) before and
# after it read the records (:meth:`_Observer.platform`).
PLATFORM_READ_NS = "read_ns"
# Xen's emulated PM timer ticks at 3.579545 MHz (ACPI); its TMR_STS bit
# is set by the counter's carry, as time passes.
PMTIMER_HZ = 3_579_545
PM1A_TMR_STS = 0x0001
# struct hvm_hw_cpu (x86_64, Xen 4.17 hvm/save.h): size, offset of tsc.
HVM_CPU_SIZE = 1032
HVM_CPU_TSC = 1008
# struct hvm_hw_rtc: cmos_data[14], cmos_index, pad0, int64 rtc_offset.
HVM_RTC_SIZE = 24
# CMOS registers that are the time of day, in the order seconds,
# minutes, hours, day of month, month, year; the day of week.
RTC_TIME_REGS = (0, 2, 4, 7, 8, 9)
RTC_DOW = 6
RTC_REG_A, RTC_REG_B, RTC_REG_C = 10, 11, 12
RTC_A_UIP = 0x80
RTC_B_24H, RTC_B_BINARY = 0x02, 0x04
# struct hvm_hw_hpet: size, capability at 0 (the counter's period in
# femtoseconds in its high half), mc64 the main counter.
HVM_HPET_SIZE = 1048
HVM_HPET_MC64 = 240
# struct hvm_hw_pmtimer: tmr_val, pm1a_sts, pm1a_en.
HVM_PMTIMER_SIZE = 8


def _platform(a: object, b: object) -> list[str]:
    """Every HVM record byte for byte, except the fields Xen drives by
    time, which move while the guest is paused (Xen computes them when
    asked): the vCPUs' TSC, the PM timer's counter (and its carry bit),
    the RTC's time of day (and its update and flag bits), the HPET's
    main counter, the TSC info's elapsed ns; the ISA wires of the PIT
    and RTC follow their timers. Each must move forward by no more than
    the wall time the checker measured from its first read on one host
    to its last on the other (with the clock slack); every other byte of
    the record is equal (the PIT's, naming the field that differs)."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return _opaque(a, b, "platform state")
    a, b = dict(a), dict(b)
    ra, rb = a.pop(PLATFORM_READ_NS, None), b.pop(PLATFORM_READ_NS, None)
    if ra is None or rb is None:
        # Not read by observe() on both sides: nothing bounds time.
        return _mapping_diff(a, b, "platform record", str)
    elapsed = max(0, int(rb[1]) - int(ra[0])) + CLOCK_SLACK_NS
    tsc = a.get("tsc")
    khz = int(tsc[1]) if isinstance(tsc, tuple) and len(tsc) > 1 else 0
    problems = []
    if "tsc" in a and "tsc" in b and a["tsc"] != b["tsc"]:
        moved = _tsc_info(a["tsc"], b["tsc"], elapsed)
        if moved is not None:
            problems += moved
            b["tsc"] = a["tsc"]  # judged here
    for key in sorted(set(a) & set(b), key=str):
        ka, kb = a[key], b[key]
        rule = _TIME_RULES.get(str(key).split(":")[0])
        if rule is None or not isinstance(ka, bytes) or ka == kb:
            continue
        if not isinstance(kb, bytes):
            continue
        moved = rule(ka, kb, elapsed, khz)
        if moved is None:
            continue  # not the layout this rule knows: byte for byte
        problems += [f"platform record {key}: {p}" for p in moved]
        b[key] = ka  # judged here
    return _mapping_diff(a, b, "platform record", str) + problems


def _forward(name: str, a: int, b: int, most: int, modulo: int) -> list[str]:
    step = (b - a) % modulo
    if b != a and step > most:
        if most < modulo // 2 and step > modulo // 2:
            return [f"{name} went back from {a} to {b}"]
        return [
            f"{name} moved {step} from {a} to {b}, more than the {most} "
            "of the wall time between the reads"
        ]
    return []


def _cpu_time(a: bytes, b: bytes, elapsed: int, khz: int) -> list[str] | None:
    if len(a) != HVM_CPU_SIZE or len(b) != HVM_CPU_SIZE:
        return None
    t = slice(HVM_CPU_TSC, HVM_CPU_TSC + 8)
    problems = []
    if a[: t.start] + a[t.stop :] != b[: t.start] + b[t.stop :]:
        problems.append("changed outside its TSC")
    (ta,), (tb,) = struct.unpack("<Q", a[t]), struct.unpack("<Q", b[t])
    if tb < ta:
        problems.append(f"TSC went back from {ta} to {tb}")
    elif khz and tb - ta > elapsed * khz // 1_000_000:
        problems.append(
            f"TSC moved {tb - ta} ticks, more than the "
            f"{elapsed / 1e9:.3f} s at {khz} kHz between the reads"
        )
    return problems


def _pmtimer_time(
    a: bytes, b: bytes, elapsed: int, khz: int
) -> list[str] | None:
    if len(a) != HVM_PMTIMER_SIZE or len(b) != HVM_PMTIMER_SIZE:
        return None
    va, sa, ea = struct.unpack("<IHH", a)
    vb, sb, eb = struct.unpack("<IHH", b)
    problems = _forward(
        "the counter", va, vb, elapsed * PMTIMER_HZ // 1_000_000_000, 1 << 32
    )
    if ea != eb:
        problems.append(f"PM1a_EN changed from {ea:#x} to {eb:#x}")
    if (sa | PM1A_TMR_STS) != (sb | PM1A_TMR_STS) or (sa & ~sb & 1):
        problems.append(f"PM1a_STS changed from {sa:#x} to {sb:#x}")
    return problems


def _rtc_seconds(cmos: bytes) -> int | None:
    """The RTC's time of day in seconds (years 2000-2099), decoded by
    register B's binary and 24-hour bits; None when not a valid time."""
    reg_b = cmos[RTC_REG_B]

    def val(v: int) -> int:
        if reg_b & RTC_B_BINARY:
            return v
        if (v & 0xF) > 9 or (v >> 4) > 9:
            raise ValueError(v)
        return (v >> 4) * 10 + (v & 0xF)

    try:
        sec, mins, hour, day, month, year = (cmos[r] for r in RTC_TIME_REGS)
        pm = not reg_b & RTC_B_24H and hour & 0x80
        h = val(hour & 0x7F)
        if not reg_b & RTC_B_24H:
            h = h % 12 + (12 if pm else 0)
        when = datetime.datetime(
            2000 + val(year), val(month), val(day), h, val(mins), val(sec)
        )
    except ValueError:
        return None
    return int(when.replace(tzinfo=datetime.timezone.utc).timestamp())


def _rtc_time(a: bytes, b: bytes, elapsed: int, khz: int) -> list[str] | None:
    if len(a) != HVM_RTC_SIZE or len(b) != HVM_RTC_SIZE:
        return None
    fixed = [
        i
        for i in range(HVM_RTC_SIZE)
        if i not in RTC_TIME_REGS + (RTC_DOW, RTC_REG_A, RTC_REG_C)
    ]
    problems = [
        f"CMOS octet {i} changed from {a[i]:#04x} to {b[i]:#04x}"
        for i in fixed
        if a[i] != b[i]
    ]
    if (a[RTC_REG_A] ^ b[RTC_REG_A]) & ~RTC_A_UIP:
        problems.append(
            f"register A changed from {a[RTC_REG_A]:#04x} to "
            f"{b[RTC_REG_A]:#04x}"
        )
    if a[RTC_REG_C] & ~b[RTC_REG_C]:
        # Flags are set by time and cleared only by the guest's read.
        problems.append(
            f"register C lost bits: {a[RTC_REG_C]:#04x} to {b[RTC_REG_C]:#04x}"
        )
    sa, sb = _rtc_seconds(a), _rtc_seconds(b)
    if sa is None or sb is None:
        if any(a[r] != b[r] for r in RTC_TIME_REGS + (RTC_DOW,)):
            problems.append("time of day changed and is not a valid time")
        return problems
    if sb < sa:
        problems.append(f"time of day went back by {sa - sb} s")
    elif sb - sa > elapsed // 1_000_000_000 + 1:
        problems.append(
            f"time of day moved {sb - sa} s, more than the "
            f"{elapsed / 1e9:.3f} s between the reads"
        )
    elif sa == sb and a[RTC_DOW] != b[RTC_DOW]:
        problems.append("day of week changed with the time of day")
    return problems


def _hpet_time(a: bytes, b: bytes, elapsed: int, khz: int) -> list[str] | None:
    if len(a) != HVM_HPET_SIZE or len(b) != HVM_HPET_SIZE:
        return None
    m = slice(HVM_HPET_MC64, HVM_HPET_MC64 + 8)
    problems = []
    if a[: m.start] + a[m.stop :] != b[: m.start] + b[m.stop :]:
        problems.append("changed outside its main counter")
    (ma,), (mb,) = struct.unpack("<Q", a[m]), struct.unpack("<Q", b[m])
    period_fs = struct.unpack_from("<Q", a, 0)[0] >> 32
    if mb < ma:
        problems.append(f"main counter went back from {ma} to {mb}")
    elif period_fs and mb - ma > elapsed * 1_000_000 // period_fs:
        problems.append(
            f"main counter moved {mb - ma}, more than the "
            f"{elapsed / 1e9:.3f} s between the reads"
        )
    return problems


# struct hvm_hw_pit: three 16-octet channels, speaker_data_on, pad0.
HVM_PIT_SIZE = 56
PIT_CHANNEL_FIELDS = (
    ("count", "I"),
    ("latched_count", "H"),
    ("count_latched", "B"),
    ("status_latched", "B"),
    ("status", "B"),
    ("read_state", "B"),
    ("write_state", "B"),
    ("write_latch", "B"),
    ("rw_mode", "B"),
    ("mode", "B"),
    ("bcd", "B"),
    ("gate", "B"),
)


def _pit_fields(
    a: bytes, b: bytes, elapsed: int, khz: int
) -> list[str] | None:
    """No field of the PIT's record is driven by time in Xen 4.17's save
    (a channel's count is its reload value): byte for byte, naming the
    fields that differ."""
    if len(a) != HVM_PIT_SIZE or len(b) != HVM_PIT_SIZE:
        return None
    fmt = "<" + "".join(f for _, f in PIT_CHANNEL_FIELDS) * 3 + "II"
    names = [
        f"channel {c} {n}" for c in range(3) for n, _ in PIT_CHANNEL_FIELDS
    ] + ["speaker_data_on", "pad0"]
    va, vb = struct.unpack(fmt, a), struct.unpack(fmt, b)
    return [
        f"{n} changed from {x} to {y}"
        for n, x, y in zip(names, va, vb, strict=True)
        if x != y
    ]


# struct hvm_hw_isa_irqs: the ISA wires' levels, one bit per IRQ.
HVM_ISA_IRQ_SIZE = 8
# The wires the timers drive (PIT on IRQ 0, RTC on IRQ 8): their level
# follows the timer's output as time passes.
TIMER_IRQ_LINES = (1 << 0) | (1 << 8)


def _isa_irq_lines(
    a: bytes, b: bytes, elapsed: int, khz: int
) -> list[str] | None:
    if len(a) != HVM_ISA_IRQ_SIZE or len(b) != HVM_ISA_IRQ_SIZE:
        return None
    (la,), (lb,) = struct.unpack("<Q", a), struct.unpack("<Q", b)
    moved = (la ^ lb) & ~TIMER_IRQ_LINES
    return [
        f"ISA IRQ {irq} line changed" for irq in range(64) if moved >> irq & 1
    ]


def _tsc_info(a: object, b: object, elapsed: int) -> list[str] | None:
    """The TSC info (mode, kHz, elapsed ns): Xen's elapsed ns runs with
    time (and a restore continues it), so it goes forward by no more
    than the wall time between the reads; mode and kHz are equal."""
    if not (
        isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 3
    ):
        return None
    problems = [
        f"TSC {what} changed from {x} to {y}"
        for what, x, y in (("mode", a[0], b[0]), ("kHz", a[1], b[1]))
        if x != y
    ]
    step = int(b[2]) - int(a[2])
    if step < 0:
        problems.append(f"TSC elapsed ns went back from {a[2]} to {b[2]}")
    elif step > elapsed:
        problems.append(
            f"TSC elapsed ns moved {step / 1e9:.3f} s, more than the "
            f"{elapsed / 1e9:.3f} s between the reads"
        )
    return problems


_TimeRule = Callable[[bytes, bytes, int, int], "list[str] | None"]
_TIME_RULES: dict[str, _TimeRule] = {
    "CPU": _cpu_time,
    "PMTIMER": _pmtimer_time,
    "RTC": _rtc_time,
    "HPET": _hpet_time,
    "PIT": _pit_fields,
    "ISA_IRQ": _isa_irq_lines,
}


def _incarnation(paused: GuestState, resumed: GuestState) -> list[str]:
    """Xen counts a domain's restores in its TSC info's incarnation
    (tsc_set_info: the saved one + 1), which a guest reads to see it
    moved: it never goes back. It may stay: a rollback resumes the
    paused domain itself, and the state says nothing of which host ran
    it, so a restore that forgot to count is not found here."""
    a = paused.kernel.get("tsc_incarnation")
    b = resumed.kernel.get("tsc_incarnation")
    if a is None or b is None or (b - a) & _MASK32 < 1 << 31:
        return []
    return [f"TSC incarnation went back from {a} to {b}"]


def guest_clock(kernel: Mapping[str, object], vcpu: int) -> int | None:
    """The guest's time of day, ns, as vCPU ``vcpu`` reads it when the
    record was taken: the wallclock plus its pvclock (system_time, then
    the TSC since tsc_timestamp scaled as vcpu_time_info says; Linux's
    pvclock_clocksource_read). None where the record does not have it
    (a host that keeps no time info)."""
    vcpus = kernel.get("vcpus", ())
    wallclock = kernel.get("wallclock_ns")
    tsc = kernel.get("guest_tsc")
    if wallclock is None or tsc is None or vcpu >= len(vcpus):
        return None
    info = vcpus[vcpu]
    if not info.get("system_time") or "tsc_timestamp" not in info:
        return None
    delta = int(tsc) - int(info["tsc_timestamp"])
    sign, delta = (-1, -delta) if delta < 0 else (1, delta)
    shift = int(info["tsc_shift"])
    delta = delta << shift if shift >= 0 else delta >> -shift
    ns = (delta * int(info["tsc_to_system_mul"])) >> 32
    return int(wallclock) + int(info["system_time"]) + sign * ns


def _clock(resumed: GuestState, later: GuestState) -> tuple[list[str], bool]:
    """Time as Xen keeps it for an HVM guest: the destination rebases
    system_time on its own NOW() and the wallclock on its own boot, so
    raw system time may jump either way; what the guest sees, its time
    of day, goes forward and, once the destination wrote the time info,
    agrees with the host's wall time. Returns the problems and whether
    the clock could be judged."""
    problems: list[str] = []
    vcpus = later.kernel.get("vcpus", ())
    wall = later.kernel.get("host_wall_ns")
    judged = False
    for v in range(len(vcpus)):
        before, after = (
            guest_clock(resumed.kernel, v),
            guest_clock(later.kernel, v),
        )
        if after is None or wall is None:
            continue
        judged = True
        if before is not None and after <= before:
            problems.append(
                f"vcpu {v}'s clock did not move forward: "
                f"{before} ns at resume, {after} ns after running"
            )
        off = after - int(wall)
        if abs(off) > CLOCK_SLACK_NS:
            problems.append(
                f"vcpu {v}'s clock is {off / 1e9:+.3f} s off the "
                "destination's wall time (time info not rebased)"
            )
    return problems, judged


# How far apart two pvclocks of one guest may read at the same TSC when
# nothing jumped: the TSC scales' rounding (mul_frac is 32-bit).
PVCLOCK_SLACK_NS = 1_000_000


def _pvclock_time(kernel: Mapping[str, object], vcpu: int, tsc: int) -> int:
    """The time of day vCPU ``vcpu``'s pvclock gives at guest TSC
    ``tsc``: wallclock + system_time + the scaled TSC since the stamp
    (pvclock_clocksource_read; the stamp and scale from the guest's
    vcpu_time_info in its RAM)."""
    info = kernel["vcpus"][vcpu]
    delta = tsc - int(info["tsc_timestamp"])
    sign, delta = (-1, -delta) if delta < 0 else (1, delta)
    shift = int(info["tsc_shift"])
    delta = delta << shift if shift >= 0 else delta >> -shift
    ns = (delta * int(info["tsc_to_system_mul"])) >> 32
    return int(kernel["wallclock_ns"]) + int(info["system_time"]) + sign * ns


def _pvclock_across(paused: GuestState, later: GuestState) -> list[str]:
    """Each vCPU's pvclock across the migration, from the guest's RAM
    alone: the source's vcpu_time_info at pause and the destination's
    after the guest ran (both read by the checker, version protocol
    kept). At the destination's TSC stamp, the source's clock
    (extrapolated by its own scale) and the destination's, rebased on
    another host's system time and wallclock, may differ only by a jump
    forward no longer than the wall time between the two reads (the
    downtime): never back, never ahead of real time. The guest's TSC
    goes forward between the stamps. Not judged where the source kept
    no time info (system_time 0); time info the source had and the
    destination did not write is a problem."""
    va, vb = paused.kernel.get("vcpus", ()), later.kernel.get("vcpus", ())
    if "wallclock_ns" not in paused.kernel or "wallclock_ns" not in (
        later.kernel
    ):
        return []
    wall = int(later.kernel["host_wall_ns"]) - int(
        paused.kernel["host_wall_ns"]
    )
    problems = []
    for side, state in (("source", paused), ("destination", later)):
        if int(state.kernel.get("wc_version", 0)) & 1:
            problems.append(
                f"the wallclock on the {side} is mid-update (wc_version "
                f"{state.kernel['wc_version']} odd)"
            )
    for v in range(min(len(va), len(vb))):
        a, b = va[v], vb[v]
        if not a.get("system_time"):
            continue  # the source keeps no time info: nothing to carry
        if not b.get("system_time"):
            # The guest would read wallclock + 0: its clock back by the
            # source's uptime. Xen writes it at every schedule-in.
            problems.append(
                f"vcpu {v}'s time info was not written on the destination "
                f"(system_time 0, {a['system_time']} on the source)"
            )
            continue
        for side, info in (("source", a), ("destination", b)):
            if int(info.get("pvclock_version", 0)) & 1:
                problems.append(
                    f"vcpu {v}'s time info on the {side} is mid-update "
                    f"(version {info['pvclock_version']} odd)"
                )
            elif not info.get("pvclock_stable", True):
                problems.append(
                    f"vcpu {v}'s time info on the {side} never read the "
                    f"same twice in {VERSION_TRIES} tries"
                )
        stamp = int(b["tsc_timestamp"])
        if _idx64(stamp - int(a["tsc_timestamp"])) >= 1 << 63:
            problems.append(
                f"vcpu {v}'s TSC went back across the migration: stamp "
                f"{a['tsc_timestamp']} at pause, {stamp} after resume"
            )
            continue
        jump = _pvclock_jump(paused, later, v)
        if jump < -PVCLOCK_SLACK_NS:
            problems.append(
                f"vcpu {v}'s pvclock went back {-jump / 1e9:.3f} s across "
                "the migration (time info not offset-corrected)"
            )
        elif jump > wall + CLOCK_SLACK_NS:
            problems.append(
                f"vcpu {v}'s pvclock jumped {jump / 1e9:.3f} s forward "
                f"across the migration, {wall / 1e9:.3f} s of wall time "
                "passed"
            )
    return problems


def _pvclock_jump(paused: GuestState, later: GuestState, vcpu: int) -> int:
    """How far vCPU ``vcpu``'s clock stepped across the migration, ns:
    the destination's pvclock minus the source's, both at the
    destination's TSC stamp."""
    stamp = int(later.kernel["vcpus"][vcpu]["tsc_timestamp"])
    return _pvclock_time(later.kernel, vcpu, stamp) - _pvclock_time(
        paused.kernel, vcpu, stamp
    )


def clock_steps_ms(paused: GuestState, later: GuestState) -> list[float]:
    """Per vCPU, the step of its clock across the migration in ms (the
    guest sees its time jump forward by about the downtime); empty where
    a side keeps no time info."""
    va, vb = paused.kernel.get("vcpus", ()), later.kernel.get("vcpus", ())
    if "wallclock_ns" not in paused.kernel or not va or len(va) != len(vb):
        return []
    if not all(a.get("system_time") for a in va) or not all(
        b.get("system_time") for b in vb
    ):
        return []
    return [
        round(_pvclock_jump(paused, later, v) / 1e6, 3) for v in range(len(va))
    ]


def _idx64(n: int) -> int:
    return n & ((1 << 64) - 1)


def _mapping_diff(
    a: Mapping, b: Mapping, what: str, name: Callable[[object], str]
) -> list[str]:
    problems = []
    for key in sorted(set(a) | set(b), key=str):
        if key not in b:
            problems.append(f"{what} {name(key)} missing on the destination")
        elif key not in a:
            problems.append(f"{what} {name(key)} appeared on the destination")
        elif a[key] != b[key]:
            problems.append(
                f"{what} {name(key)} changed from {_short(a[key])} to "
                f"{_short(b[key])}"
            )
    return problems


def _short(v: object) -> str:
    text = v.hex() if isinstance(v, bytes) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _domid(a: object, b: object) -> list[str]:
    if not (
        isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2
    ):
        return _opaque(a, b, "domid")
    problems = []
    if a[0] != b[0]:
        problems.append(f"domid changed from {a[0]} to {b[0]}")
    if tuple(a[1]) != tuple(b[1]):
        problems.append(
            f"backend domids changed from {tuple(a[1])} to {tuple(b[1])}"
        )
    return problems


def _hvm_param_name(index: int) -> str:
    name = HVM_PARAM_NAMES.get(index)
    return f"{index} ({name})" if name else str(index)


def _hvm_params(a: object, b: object) -> list[str]:
    try:
        pa, pb = dict(a), dict(b)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return _opaque(a, b, "HVM params")
    return _mapping_diff(pa, pb, "HVM param", _hvm_param_name)


# -- xenstore ---------------------------------------------------------------


@dataclasses.dataclass
class _Xs:
    nodes: dict[str, tuple[bytes, tuple]]
    watches: set[tuple[str, str, int]]
    txs: dict[int, tuple | None]
    port: int
    gfn: int


def _xenstore_view(value: object) -> _Xs | None:
    if isinstance(value, XenstoreState):
        return _Xs(
            {n.path: (n.value, tuple(n.perms)) for n in value.nodes},
            {(w.path, w.token, w.depth) for w in value.watches},
            {t.tx_id: tuple(t.writes) for t in value.transactions},
            value.store_port,
            value.store_gfn,
        )
    if isinstance(value, tuple) and len(value) == 5:
        nodes, watches, txs, port, gfn = value
        return _Xs(
            {p: (v, tuple(perms)) for p, v, perms in nodes},
            {tuple(w) for w in watches},
            {t: None for t in txs},
            port,
            gfn,
        )
    return None


def _xenstore(a: object, b: object) -> list[str]:
    xa, xb = _xenstore_view(a), _xenstore_view(b)
    if xa is None or xb is None:
        return _opaque(a, b, "xenstore state")
    problems = []
    for path in sorted(set(xa.nodes) | set(xb.nodes)):
        if path not in xb.nodes:
            problems.append(f"node {path} missing")
        elif path not in xa.nodes:
            problems.append(f"node {path} appeared")
        else:
            (va, pa), (vb, pb) = xa.nodes[path], xb.nodes[path]
            if va != vb:
                problems.append(f"node {path} changed from {va!r} to {vb!r}")
            if pa != pb:
                problems.append(
                    f"node {path} permissions changed from {pa} to {pb}"
                )
    for w in sorted(xa.watches - xb.watches):
        problems.append(f"watch {w[0]} token {w[1]!r} depth {w[2]} missing")
    for w in sorted(xb.watches - xa.watches):
        problems.append(f"watch {w[0]} token {w[1]!r} appeared")
    for tx in sorted(set(xa.txs) | set(xb.txs)):
        if tx not in xb.txs:
            problems.append(f"transaction {tx} missing")
        elif tx not in xa.txs:
            problems.append(f"transaction {tx} appeared")
        elif xa.txs[tx] != xb.txs[tx] and xb.txs[tx] != ():
            problems.append(f"transaction {tx} has other writes")
    if xa.port != xb.port:
        problems.append(f"store port renumbered from {xa.port} to {xb.port}")
    if xa.gfn != xb.gfn:
        problems.append(f"store pfn moved from {xa.gfn:#x} to {xb.gfn:#x}")
    return problems


# -- event channels ---------------------------------------------------------


def _evtchn_view(value: object) -> tuple | None:
    if isinstance(value, EventChannelState):
        return value.abi, value.ports, tuple(value.fifo_control_blocks)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(p, EventChannel) for p in value[1])
    ):
        return value[0], tuple(value[1]), ()
    return None


def _binding(p: EventChannel) -> tuple:
    return (
        int(p.type),
        p.vcpu,
        p.remote_domid,
        p.remote_port,
        p.virq,
        p.pirq,
        p.masked,
        p.priority,
    )


def _describe(p: EventChannel) -> str:
    text = f"{p.type.name.lower()}"
    if p.type.name in ("INTERDOMAIN", "UNBOUND"):
        text += f" dom{p.remote_domid}"
        if p.type.name == "INTERDOMAIN":
            text += f":{p.remote_port}"
    elif p.type.name == "VIRQ":
        text += f" {p.virq}"
    elif p.type.name == "PIRQ":
        text += f" {p.pirq}"
    return text + f" vcpu {p.vcpu}"


def _event_channels(a: object, b: object) -> list[str]:
    va, vb = _evtchn_view(a), _evtchn_view(b)
    if va is None or vb is None:
        return _opaque(a, b, "event channel state")
    problems = []
    if va[0] != vb[0]:
        problems.append(f"ABI changed from {va[0]!r} to {vb[0]!r}")
    if va[2] != vb[2]:
        problems.append("FIFO control blocks moved")
    pa = {p.port: p for p in va[1] if p.type != 0}
    pb = {p.port: p for p in vb[1] if p.type != 0}
    new_ports = {port: p for port, p in pb.items() if port not in pa}
    for port in sorted(pa):
        p = pa[port]
        q = pb.get(port)
        if q is None:
            twin = next(
                (
                    n
                    for n, c in new_ports.items()
                    if _binding(c)[:6] == _binding(p)[:6]
                ),
                None,
            )
            if twin is not None:
                problems.append(
                    f"port {port} ({_describe(p)}) renumbered to {twin}"
                )
                del new_ports[twin]
            else:
                problems.append(f"port {port} ({_describe(p)}) missing")
            continue
        if _binding(p) != _binding(q):
            problems.append(
                f"port {port} changed from {_describe(p)} "
                f"(masked {p.masked}) to {_describe(q)} (masked {q.masked})"
            )
        if p.pending and not q.pending:
            problems.append(f"port {port} lost its pending event")
    for port, q in sorted(new_ports.items()):
        problems.append(f"port {port} ({_describe(q)}) appeared")
    return problems


# -- grant table ------------------------------------------------------------


def _grant_entry_text(version: int, raw: bytes) -> str:
    flags, domid = struct.unpack_from("<HH", raw)
    if version == 1:
        frame = struct.unpack_from("<I", raw, 4)[0]
    else:
        frame = struct.unpack_from("<Q", raw, 8)[0]
    return f"(flags {flags:#x}, dom{domid}, frame {frame:#x})"


def _grant_table(a: object, b: object) -> list[str]:
    if not isinstance(a, GrantTableState) or not isinstance(
        b, GrantTableState
    ):
        return _opaque(a, b, "grant table")
    problems = []
    if a.version != b.version:
        problems.append(f"version changed from {a.version} to {b.version}")
        return problems
    if tuple(a.frame_gfns) != tuple(b.frame_gfns):
        problems.append(
            f"frames moved from gfns {_listed(hex(g) for g in a.frame_gfns)}"
            f" to {_listed(hex(g) for g in b.frame_gfns)}"
        )
    if tuple(a.status_gfns) != tuple(b.status_gfns):
        problems.append("status frames moved")
    if tuple(a.status_frames) != tuple(b.status_frames):
        problems.append("status frames differ")
    size = GRANT_ENTRY_SIZE.get(a.version, 8)
    ea = b"".join(a.frames)
    eb = b"".join(b.frames)
    n = max(len(ea), len(eb)) // size
    for ref in range(n):
        ra = ea[ref * size : (ref + 1) * size]
        rb = eb[ref * size : (ref + 1) * size]
        if ra == rb:
            continue
        if not rb.strip(b"\0") and ra.strip(b"\0"):
            problems.append(
                f"grant ref {ref} {_grant_entry_text(a.version, ra)} lost"
            )
        elif not ra.strip(b"\0"):
            problems.append(
                f"grant ref {ref} {_grant_entry_text(a.version, rb)} appeared"
            )
        else:
            problems.append(
                f"grant ref {ref} changed from "
                f"{_grant_entry_text(a.version, ra)} to "
                f"{_grant_entry_text(a.version, rb)}"
            )
    return problems


# -- shared info ------------------------------------------------------------


def _u64s(raw: bytes, off: int, n: int) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u8", count=n, offset=off)


def _shared_info(a: object, b: object) -> list[str]:
    if isinstance(a, SharedInfoState) and isinstance(b, SharedInfoState):
        problems = _placements(a, b)
        if len(a.content) == len(b.content) == PAGE_SIZE:
            problems += _shared_info_page(a.content, b.content)
        elif a.content != b.content:
            problems.append("shared info content differs")
        return problems
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 3:
        # (gfn, content digest, placements)
        problems = []
        if a[0] != b[0]:
            problems.append(f"shared info moved from gfn {a[0]} to {b[0]}")
        if a[2] != b[2]:
            problems.append(f"vcpu_info placement changed: {a[2]} -> {b[2]}")
        if a[1] != b[1]:
            problems.append("shared info content differs")
        return problems
    return _opaque(a, b, "shared info")


def _placements(a: SharedInfoState, b: SharedInfoState) -> list[str]:
    problems = []
    if a.gfn != b.gfn:
        problems.append(f"shared info moved from gfn {a.gfn} to {b.gfn}")
    pa = {v.vcpu: v for v in a.vcpu_info}
    pb = {v.vcpu: v for v in b.vcpu_info}
    for vcpu in sorted(set(pa) | set(pb)):
        va, vb = pa.get(vcpu), pb.get(vcpu)
        if va == vb:
            continue

        problems.append(
            f"vcpu {vcpu}'s vcpu_info moved from {_where(va)} to {_where(vb)}"
        )
    return problems


def _where(v: VcpuInfoPlacement | None) -> str:
    if v is None:
        return "nowhere"
    if v.gfn is None:
        return "the legacy slot"
    return f"gfn {v.gfn:#x}+{v.offset:#x}"


def _shared_info_page(ra: bytes, rb: bytes) -> list[str]:
    problems = []
    if ra[SHINFO_WC:SHINFO_ARCH] != rb[SHINFO_WC:SHINFO_ARCH]:
        wa = struct.unpack_from("<IIII", ra, SHINFO_WC)
        wb = struct.unpack_from("<IIII", rb, SHINFO_WC)
        problems.append(f"wallclock changed from {wa} to {wb}")
    if ra[SHINFO_ARCH:] != rb[SHINFO_ARCH:]:
        problems.append("arch_shared_info differs")
    ma, mb = _u64s(ra, SHINFO_MASK, 64), _u64s(rb, SHINFO_MASK, 64)
    if not np.array_equal(ma, mb):
        ports = _bit_ports(ma ^ mb)
        problems.append(f"mask bits of ports {_listed(ports)} changed")
    pa, pb = _u64s(ra, SHINFO_PENDING, 64), _u64s(rb, SHINFO_PENDING, 64)
    lost = pa & ~pb
    if lost.any():
        problems.append(
            f"pending events of ports {_listed(_bit_ports(lost))} lost"
        )
    for v in range(XEN_LEGACY_MAX_VCPUS):
        base = v * VCPU_INFO_SIZE
        if ra[base + VI_UPCALL_MASK] != rb[base + VI_UPCALL_MASK]:
            problems.append(f"vcpu {v} evtchn_upcall_mask changed")
        if ra[base + VI_UPCALL_PENDING] and not rb[base + VI_UPCALL_PENDING]:
            problems.append(f"vcpu {v} evtchn_upcall_pending lost")
        sa = struct.unpack_from("<Q", ra, base + VI_PENDING_SEL)[0]
        sb = struct.unpack_from("<Q", rb, base + VI_PENDING_SEL)[0]
        if sa & ~sb:
            problems.append(f"vcpu {v} evtchn_pending_sel lost bits")
        if (
            ra[base + VI_ARCH : base + VI_TIME]
            != rb[base + VI_ARCH : base + VI_TIME]
        ):
            problems.append(f"vcpu {v} arch_vcpu_info changed")
    return problems


def _bit_ports(words: np.ndarray) -> list[int]:
    ports = []
    for w, word in enumerate(words.tolist()):
        while word:
            bit = (word & -word).bit_length() - 1
            word &= word - 1
            ports.append(w * 64 + bit)
    return ports


# -- PV devices ---------------------------------------------------------------


def _idx_diff(a: int, b: int) -> int:
    return (a - b) & _MASK32


def _backends(value: object) -> dict[str, BackendState] | None:
    if isinstance(value, Mapping):
        value = tuple(value.values())
    if isinstance(value, tuple) and all(
        isinstance(v, BackendState) for v in value
    ):
        return {b.frontend_path: b for b in value}
    return None


def _device_key(b: BackendState) -> str:
    return f"{b.kind}/{b.devid}"


def _pv_devices(
    a: object,
    b: object,
    paused: GuestState,
    resumed: GuestState,
    later: GuestState | None,
) -> list[str]:
    va, vb = _views(a), _views(b)
    ba, bb = _backends(a), _backends(b)
    if va is not None and vb is not None:
        problems = _device_views(va, vb)
    elif ba is None or bb is None:
        problems = _opaque(a, b, "PV device state")
    else:
        problems = []
        for path in sorted(set(ba) | set(bb)):
            if path not in bb:
                problems.append(f"device {path} has no backend")
            elif path not in ba:
                problems.append(f"device {path} appeared")
            else:
                problems += _backend(ba[path], bb[path])
    problems += _frontends(paused, resumed, later)
    return problems


def _backend(a: BackendState, b: BackendState) -> list[str]:
    key = _device_key(a)
    problems = []
    for field in ("kind", "devid", "backend_domid", "backend_path"):
        if getattr(a, field) != getattr(b, field):
            problems.append(
                f"{key}: {field} changed from {getattr(a, field)!r} to "
                f"{getattr(b, field)!r}"
            )
    if a.state != b.state:
        problems.append(
            f"{key}: backend state changed from {a.state} to {b.state}"
        )
    if tuple(a.ring_refs) != tuple(b.ring_refs):
        problems.append(
            f"{key}: ring grant references changed from "
            f"{tuple(a.ring_refs)} to {tuple(b.ring_refs)}"
        )
    if tuple(a.event_channels) != tuple(b.event_channels):
        problems.append(
            f"{key}: event channel ports changed from "
            f"{tuple(a.event_channels)} to {tuple(b.event_channels)}"
        )
    # The backends are quiescent from pause until the guest runs on the
    # destination: at resume each ring is where it was, with the same
    # requests in flight (answered later, after_resume judges that).
    for ring in sorted(set(a.ring_indices) | set(b.ring_indices)):
        if ring not in b.ring_indices or ring not in a.ring_indices:
            problems.append(f"{key}: ring {ring} not on both sides")
        elif tuple(a.ring_indices[ring]) != tuple(b.ring_indices[ring]):
            problems.append(
                f"{key}: ring {ring} indices (req_cons, rsp_prod) moved "
                f"from {tuple(a.ring_indices[ring])} to "
                f"{tuple(b.ring_indices[ring])} before the guest ran"
            )
    fa = sorted((r.ring, r.id, r.request) for r in a.inflight)
    fb = sorted((r.ring, r.id, r.request) for r in b.inflight)
    if fa != fb:
        lost = len([r for r in fa if r not in fb])
        new = len([r for r in fb if r not in fa])
        problems.append(
            f"{key}: requests in flight changed before the guest ran: "
            f"{lost} of the {len(fa)} in flight at pause gone, {new} new"
        )
    return problems


def _views(value: object) -> dict[str, DeviceView] | None:
    if isinstance(value, tuple) and all(
        isinstance(v, DeviceView) for v in value
    ):
        return {v.frontend_path: v for v in value}
    return None


def _device_views(
    va: Mapping[str, DeviceView], vb: Mapping[str, DeviceView]
) -> list[str]:
    """Pause against resume: the same devices, xenstore nodes, ports and
    rings; the rings where they were (the backends are quiescent until
    the guest runs); and at resume each connected device's port bound
    to its backend's domain and each ring mapped by it."""
    problems = []
    for path in sorted(set(va) | set(vb)):
        if path not in vb:
            problems.append(f"device {path} missing")
        elif path not in va:
            problems.append(f"device {path} appeared")
        else:
            problems += _device_view(va[path], vb[path])
            problems += _device_health(vb[path])
    return problems


def _view_key(v: DeviceView) -> str:
    return f"{v.kind}/{v.devid}"


def _device_view(a: DeviceView, b: DeviceView) -> list[str]:
    key = _view_key(a)
    problems = []
    for field in (
        "backend_path",
        "backend_domid",
        "frontend_state",
        "backend_state",
    ):
        if getattr(a, field) != getattr(b, field):
            problems.append(
                f"{key}: {field.replace('_', ' ')} changed from "
                f"{getattr(a, field)!r} to {getattr(b, field)!r}"
            )
    if [p for p, _ in a.ports] != [p for p, _ in b.ports]:
        problems.append(
            f"{key}: event channel ports changed from "
            f"{[p for p, _ in a.ports]} to {[p for p, _ in b.ports]}"
        )
    ra, rb = dict(a.rings), dict(b.rings)
    if set(ra) != set(rb):
        problems.append(
            f"{key}: rings changed from {sorted(ra)} to {sorted(rb)}"
        )
    for name in sorted(set(ra) & set(rb)):
        x, y = ra[name], rb[name]
        if (x.ref, x.gfn) != (y.ref, y.gfn):
            problems.append(
                f"{key}: ring {name} moved from grant ref {x.ref} "
                f"(gfn {x.gfn}) to {y.ref} (gfn {y.gfn})"
            )
        elif (x.req_prod, x.rsp_prod) != (y.req_prod, y.rsp_prod):
            problems.append(
                f"{key}: ring {name} indices (req_prod, rsp_prod) moved "
                f"from {(x.req_prod, x.rsp_prod)} to "
                f"{(y.req_prod, y.rsp_prod)} before the guest ran"
            )
    return problems


def _device_health(v: DeviceView) -> list[str]:
    """A connected device's backend holds its end: the frontend's ports
    bound to the backend's domain and its rings mapped by it, as the
    hypervisor's port table and grant entries show."""
    if v.backend_state != XENBUS_CONNECTED:
        return []
    key = _view_key(v)
    problems = []
    for port, peer in v.ports:
        if peer != v.backend_domid:
            problems.append(
                f"{key}: port {port} not bound to the backend's "
                f"dom{v.backend_domid}"
                + ("" if peer is None else f" (bound to dom{peer})")
            )
    for name, ring in v.rings:
        if ring.mapped_by != v.backend_domid:
            problems.append(
                f"{key}: ring {name} (grant ref {ring.ref}) not mapped by "
                f"the backend's dom{v.backend_domid}"
            )
    return problems


def _rings_observed(
    va: Mapping[str, DeviceView], vb: Mapping[str, DeviceView]
) -> list[str]:
    """From pause to later, as the guest's RAM shows the rings: the same
    pages; producer indices never go back; never more responses than
    requests; the backend still connected and holding its ends."""
    problems = []
    for path, a in sorted(va.items()):
        b = vb.get(path)
        key = _view_key(a)
        if b is None:
            problems.append(f"device {path} gone after resume")
            continue
        rb = dict(b.rings)
        for name, x in a.rings:
            y = rb.get(name)
            if y is None or (x.ref, x.gfn) != (y.ref, y.gfn):
                problems.append(f"{key}: ring {name} not where it was")
                continue
            for what, old, new in (
                ("req_prod", x.req_prod, y.req_prod),
                ("rsp_prod", x.rsp_prod, y.rsp_prod),
            ):
                if _idx_diff(new, old) >= 1 << 31:
                    problems.append(
                        f"{key}: ring {name} {what} went back from {old} "
                        f"to {new}"
                    )
            if _idx_diff(y.req_prod, y.rsp_prod) >= 1 << 31:
                problems.append(
                    f"{key}: ring {name} has more responses "
                    f"({y.rsp_prod}) than requests ({y.req_prod})"
                )
        problems += _device_health(b)
    return problems


def _ring(key: str, ring: str, a: BackendState, b: BackendState) -> list[str]:
    (req_a, rsp_a), (req_b, rsp_b) = a.ring_indices[ring], b.ring_indices[ring]
    took = _idx_diff(req_b, req_a)
    answered = _idx_diff(rsp_b, rsp_a)
    if took >= 1 << 31 or answered >= 1 << 31:
        return [
            f"{key}: ring {ring} indices went back from "
            f"{(req_a, rsp_a)} to {(req_b, rsp_b)}"
        ]
    inflight_a = [r.request for r in a.inflight if r.ring == ring]
    inflight_b = [r.request for r in b.inflight if r.ring == ring]
    # A request in flight at pause is answered by the destination before
    # resume, or carried over and still in flight (the later state then
    # shows its answer); anything else is lost.
    n = len(inflight_a)
    carried = len(set(inflight_a) & set(inflight_b))
    owed = n + took
    have = answered + len(inflight_b)
    problems = []
    if have < owed:
        # Answers go to the oldest requests first: those in flight.
        from_inflight = max(0, n - carried - answered)
        if from_inflight:
            problems.append(
                f"{key}: {from_inflight} of the {n} requests in flight at "
                f"pause lost (neither answered nor in flight at the "
                f"destination)"
            )
        rest = owed - have - from_inflight
        if rest:
            problems.append(
                f"{key}: {rest} requests taken off ring {ring} lost"
            )
    elif have > owed:
        problems.append(
            f"{key}: {have - owed} requests answered more than once"
        )
    return problems


DAMAGE = ("lost", "duplicated", "reordered", "bad_payload")


def _frontends(
    paused: GuestState, resumed: GuestState, later: GuestState | None
) -> list[str]:
    problems = []
    for key, fa in sorted(paused.frontends.items()):
        states = tuple(fa.get("states", ()))
        for when, gs in (("resume", resumed), ("later", later)):
            if gs is None:
                continue
            fb = gs.frontends.get(key)
            if fb is None:
                problems.append(f"{key}: frontend not reported at {when}")
                continue
            seen = tuple(fb.get("states", ()))
            if seen[: len(states)] != states:
                problems.append(
                    f"{key}: frontend state history rewritten by {when}"
                )
            elif len(seen) > len(states):
                new = ", ".join(
                    f"{who} {state}" for who, state in seen[len(states) :]
                )
                problems.append(
                    f"{key}: frontend saw a state change after pause: {new}"
                )
        if later is not None and key in later.frontends:
            problems += _io_continues(key, fa, later.frontends[key])
    return problems


def _io_continues(
    key: str, fa: Mapping[str, object], fb: Mapping[str, object]
) -> list[str]:
    problems = []
    for name in DAMAGE:
        before, after = int(fa.get(name, 0)), int(fb.get(name, 0))
        if after > before:
            problems.append(
                f"{key}: {after - before} {name.replace('_', ' ')} "
                f"responses since pause"
            )
    for name in ("next_seq", "last_rsp_seq", "sent", "completed"):
        before, after = int(fa.get(name, 0)), int(fb.get(name, 0))
        if after < before:
            problems.append(
                f"{key}: I/O sequence discontinuity: {name} went from "
                f"{before} to {after}"
            )
    outstanding_after = set(fb.get("outstanding", ()))
    unanswered = sorted(
        s for s in fa.get("outstanding", ()) if s in outstanding_after
    )
    if unanswered:
        problems.append(
            f"{key}: requests outstanding at pause never answered: seq "
            + _listed(unanswered)
        )
    return problems


_CHECKS = {
    Item.PLATFORM: _platform,
    Item.DOMID: _domid,
    Item.XENSTORE: _xenstore,
    Item.EVENT_CHANNELS: _event_channels,
    Item.GRANT_TABLE: _grant_table,
    Item.SHARED_INFO: _shared_info,
    Item.HVM_PARAMS: _hvm_params,
}


# -- after resume -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AfterResume:
    """What the guest found when it ran on the destination, read from its
    own RAM: the frontends' records and the kernel's counters."""

    requests_completed: int
    lost: int
    duplicated: int
    reordered: int
    bad_payloads: int
    # Requests in flight at pause that were never answered, "key:seq".
    unanswered: tuple[str, ...]
    # Reads after resume that checked data written before the pause.
    vbd_reads_checked: int
    ports_silent: tuple[int, ...]
    vcpus_stalled: tuple[int, ...]
    problems: tuple[str, ...]
    # Why the guest could not be judged at all (no frontend, no kernel
    # record in its RAM): then passed is None.
    not_judged: str = ""
    # Whether vCPU time was judged: not when the host writes no time
    # (system_time 0 at both snapshots).
    time_judged: bool = True
    # Per vCPU, how far its pvclock stepped across the migration, ms.
    clock_steps_ms: tuple[float, ...] = ()

    @property
    def passed(self) -> bool | None:
        if self.not_judged:
            return None
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "requests_completed": self.requests_completed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "bad_payloads": self.bad_payloads,
            "unanswered": list(self.unanswered),
            "vbd_reads_checked": self.vbd_reads_checked,
            "ports_silent": list(self.ports_silent),
            "vcpus_stalled": list(self.vcpus_stalled),
            "time_judged": self.time_judged,
            "clock_steps_ms": list(self.clock_steps_ms),
            "reason": self.not_judged
            or _reason(
                list(self.problems)
                + ([] if self.time_judged else ["time not judged"])
            ),
        }


# What after_resume reads of the destination's state.
AFTER_RESUME_ITEMS = (Item.EVENT_CHANNELS, Item.PV_DEVICES)


def run_after_resume(
    host: HostDriver,
    domid: int,
    seconds: float = 1.0,
    delivery_timeout: float = 3.0,
) -> tuple[GuestState, dict[int, int]]:
    """Let the guest run on ``host`` for ``seconds``, raise one event on
    each of its bound ports (:meth:`HostDriver.raise_guest_events`) and
    wait until the guest counted each of them, at most
    ``delivery_timeout``: the ``later`` state and the ``raised`` ports of
    :func:`after_resume`, each with the guest's count of its events just
    before the raise."""
    time.sleep(seconds)
    before = observe(host, domid, ()).kernel.get("ports", {})
    with host.observing():
        raised = {
            p: int(before.get(p, 0)) for p in host.raise_guest_events(domid)
        }
    deadline = time.monotonic() + delivery_timeout
    while True:
        later = observe(host, domid, AFTER_RESUME_ITEMS)
        counts = later.kernel.get("ports", {})
        waiting = [p for p, n in raised.items() if counts.get(p, 0) <= n]
        if not waiting or time.monotonic() > deadline:
            return later, raised
        time.sleep(0.02)


def after_resume(
    paused: GuestState,
    resumed: GuestState,
    later: GuestState,
    raised: Mapping[int, int] = MappingProxyType({}),
) -> AfterResume:
    """Judge the guest's run on the destination: ``paused`` is the source
    at pause, ``resumed`` the destination before the guest ran,
    ``later`` the destination after it ran for a while and the ports of
    ``raised`` were raised (:func:`run_after_resume`: port -> the
    guest's count of its events just before the raise).

    Every request in flight at pause is answered exactly once; no
    response is lost, duplicated, out of order or wrong; I/O completed
    after resume with sequence numbers continuing; a vbd read after
    resume checked data written before the pause; every port bound and
    unmasked at pause (the source's event channel table, so a port the
    destination lost counts) was raised and its count went up after the
    raise; every vCPU made progress and its system time moved forward
    (not judged when the host writes no time: 0 at both snapshots).
    A guest whose RAM holds no kernel record is not judged: ``passed``
    is None. One without PV frontends is judged on the rest (its bound
    ports, its vCPUs): an IPI or VIRQ port that went silent on one vCPU
    fails it as it fails a guest with frontends."""
    if not paused.kernel or not later.kernel:
        return AfterResume(
            requests_completed=0,
            lost=0,
            duplicated=0,
            reordered=0,
            bad_payloads=0,
            unanswered=(),
            vbd_reads_checked=0,
            ports_silent=(),
            vcpus_stalled=(),
            problems=(),
            not_judged="not judged: the guest's RAM holds no kernel record",
            time_judged=False,
        )
    problems: list[str] = []
    totals = dict.fromkeys(
        ("completed", "lost", "duplicated", "reordered", "bad_payload"), 0
    )
    unanswered: list[str] = []
    checked = 0
    for key, fa in sorted(paused.frontends.items()):
        fb = later.frontends.get(key)
        if fb is None:
            problems.append(f"{key}: frontend not found after resume")
            continue
        for name in totals:
            grew = int(fb.get(name, 0)) - int(fa.get(name, 0))
            totals[name] += grew
            if name != "completed" and grew:
                problems.append(
                    f"{key}: {grew} {name.replace('_', ' ')} responses "
                    f"after resume"
                )
        done = int(fb.get("completed", 0)) - int(fa.get("completed", 0))
        owed = len(tuple(fa.get("outstanding", ())))
        if done <= 0:
            problems.append(f"{key}: no request completed after resume")
        elif done <= owed:
            # Answering what was in flight at pause is not I/O going on:
            # a backend that stalls after that is found here.
            problems.append(
                f"{key}: no request issued after the pause completed "
                f"({done} completed, {owed} were in flight at pause)"
            )
        for name in ("next_seq", "last_rsp_seq", "sent"):
            if int(fb.get(name, 0)) < int(fa.get(name, 0)):
                problems.append(
                    f"{key}: {name} went back from {fa.get(name)} to "
                    f"{fb.get(name)}"
                )
        still = set(fb.get("outstanding", ()))
        lost = sorted(s for s in fa.get("outstanding", ()) if s in still)
        unanswered += [f"{key}:{s}" for s in lost]
        if lost:
            problems.append(
                f"{key}: requests in flight at pause never answered: seq "
                + _listed(lost)
            )
        if "verified_write" in fa:
            n = _reads_checked(fa, fb)
            checked += n
            if not n:
                problems.append(
                    f"{key}: no read after resume checked data written "
                    f"before the pause"
                )
    problems += _rings_after(paused, later)
    silent = _silent_ports(paused, later, raised)
    if silent:
        problems.append(
            f"bound ports with no event after resume: {_listed(silent)}"
        )
    stalled, time_judged = _vcpus(resumed, later, problems)
    problems += _pvclock_across(paused, later)
    return AfterResume(
        requests_completed=totals["completed"],
        lost=totals["lost"],
        duplicated=totals["duplicated"],
        reordered=totals["reordered"],
        bad_payloads=totals["bad_payload"],
        unanswered=tuple(unanswered),
        vbd_reads_checked=checked,
        ports_silent=tuple(silent),
        vcpus_stalled=tuple(stalled),
        problems=tuple(problems),
        time_judged=time_judged,
        clock_steps_ms=tuple(clock_steps_ms(paused, later)),
    )


def _reads_checked(fa: Mapping[str, object], fb: Mapping[str, object]) -> int:
    """Writes issued before the pause whose data a read after it found
    (``verified_write``: the latest write a read found intact; reads
    find writes in order, and each is a write request, odd seq)."""
    before = int(fa.get("verified_write", 0))
    issued = int(fa.get("next_seq", 0))  # requests up to this one
    after = min(int(fb.get("verified_write", 0)), issued - 1)
    return max(0, (after - before + 1) // 2)


def _rings_after(paused: GuestState, later: GuestState) -> list[str]:
    """The backends' ring rules from pause to the later state."""
    va = _views(paused.items.get(Item.PV_DEVICES))
    vb = _views(later.items.get(Item.PV_DEVICES))
    if va is not None and vb is not None:
        return _rings_observed(va, vb)
    ba = _backends(paused.items.get(Item.PV_DEVICES))
    bb = _backends(later.items.get(Item.PV_DEVICES))
    if ba is None or bb is None:
        return []
    problems = []
    for path, a in sorted(ba.items()):
        b = bb.get(path)
        if b is None:
            problems.append(f"device {path} has no backend after resume")
            continue
        for ring in sorted(set(a.ring_indices) & set(b.ring_indices)):
            problems += _ring(_device_key(a), ring, a, b)
    return problems


def _silent_ports(
    paused: GuestState, later: GuestState, raised: Mapping[int, int]
) -> list[int]:
    """Ports bound and unmasked at pause (the source's table) that the
    guest counts, and that were not raised or whose count did not go up
    after the raise."""
    view = _evtchn_view(paused.items.get(Item.EVENT_CHANNELS))
    if view is None:
        return []
    counted = paused.kernel.get("ports", {})
    counts_after = later.kernel.get("ports", {})
    silent = []
    for p in view[1]:
        if p.type in (EvtchnType.CLOSED, EvtchnType.UNBOUND) or p.masked:
            continue
        if p.port not in counted:
            continue  # the guest does not count it
        if p.port not in raised:
            silent.append(p.port)
        elif counts_after.get(p.port, 0) <= raised[p.port]:
            silent.append(p.port)
    return silent


def _vcpus(
    resumed: GuestState, later: GuestState, problems: list[str]
) -> tuple[list[int], bool]:
    """vCPUs that made no progress, and whether time was judged."""
    before = resumed.kernel.get("vcpus", ())
    after = later.kernel.get("vcpus", ())
    if len(before) != len(after):
        problems.append(
            f"{len(before)} vCPUs at resume, {len(after)} after running"
        )
        return [], False
    stalled = []
    working = int(resumed.kernel.get("dirty_rate", 0)) > 0
    # The guest's clock, offset-corrected, where the host reports what
    # it needs (_clock); else each vCPU's system time must go forward.
    clock_problems, clock_judged = _clock(resumed, later)
    problems += clock_problems
    # The host writes vcpu_time_info (Xen: at schedule-in); a host that
    # writes none leaves system_time 0, and time is then not judged.
    time_judged = clock_judged or any(
        a["system_time"] or b["system_time"]
        for a, b in zip(before, after, strict=True)
    )
    for v, (a, b) in enumerate(zip(before, after, strict=True)):
        if working and b["progress"] <= a["progress"]:
            stalled.append(v)
        if (
            time_judged
            and not clock_judged
            and b["system_time"] <= a["system_time"]
        ):
            problems.append(
                f"vcpu {v}'s system time did not move forward: "
                f"{a['system_time']} at resume, {b['system_time']} after "
                f"running"
            )
    if stalled:
        problems.append(
            f"vCPUs {_listed(stalled)} made no progress after resume"
        )
    return stalled, time_judged
