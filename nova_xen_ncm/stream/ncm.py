"""Non-cooperative migration records: the PV state Xen's stream lacks.

The byte layouts, type numbers, limits and validation rules implemented here
are specified in ``doc/source/specs/non-cooperative-records.rst`` (cited
below as "spec"); section names in docstrings refer to that page. Every
record is mandatory (type bit 31 clear): a receiver that does not know one
must fail, because a guest whose PV state was dropped is broken.

Hypervisor state travels in the libxc stream (shared info and vcpu_info
placement, per-vCPU runstate/time areas and PV timers, event channels,
grant table); the domid, xenstore and PV backend state travel in the libxl
stream. The xenstore bodies are those of Xen's
``docs/designs/xenstore-migration.md`` (version 2), byte for byte.

Every decoder checks each count against its limit and against the octets
left in the body *before* it allocates anything, and every encoder runs the
same validation as the decoder, so that ``encode`` never writes what
``decode`` would refuse and ``encode(decode(b)) == b`` for every valid body.
All integers are little-endian, as in every x86 stream.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Buffers
from nova_xen_ncm.stream.records import RecordType

# -- Versions (spec "Versioning") --------------------------------------------

# First field of every body this project defines.
RECORD_VERSION = 1
# Version of xenstore-migration.md whose bodies the XS_* records carry
# (WATCH_DATA_EXTENDED exists from version 2); stated in NCM_DOMAIN.
XENSTORE_FORMAT_VERSION = 2

# -- Type numbers (spec "Type numbers") --------------------------------------

# 'N' 'C' in the high octets, the layer in the third: far from Xen's
# sequential allocations (libxc 0x13.., libxl 0x06..) and bit 31 clear.
NCM_TYPE_BASE = 0x4E430000
LIBXC_TYPE_BASE = NCM_TYPE_BASE | 0x0100
LIBXL_TYPE_BASE = NCM_TYPE_BASE | 0x0200

REC_TYPE_NCM_SHARED_INFO = LIBXC_TYPE_BASE | 0x01
REC_TYPE_NCM_EVENT_CHANNELS = LIBXC_TYPE_BASE | 0x02
REC_TYPE_NCM_GRANT_TABLE = LIBXC_TYPE_BASE | 0x03
REC_TYPE_NCM_VCPU_PV = LIBXC_TYPE_BASE | 0x04

REC_TYPE_NCM_DOMAIN = LIBXL_TYPE_BASE | 0x01
REC_TYPE_NCM_XS_CONNECTION = LIBXL_TYPE_BASE | 0x02
REC_TYPE_NCM_XS_WATCH = LIBXL_TYPE_BASE | 0x03
REC_TYPE_NCM_XS_TRANSACTION = LIBXL_TYPE_BASE | 0x04
REC_TYPE_NCM_XS_NODE = LIBXL_TYPE_BASE | 0x05
REC_TYPE_NCM_PV_DEVICE = LIBXL_TYPE_BASE | 0x06

# -- Xen ABI constants (public headers, cited in the spec) -------------------

PAGE_SIZE = 4096
DOMID_FIRST_RESERVED = 0x7FF0  # xen.h
DOMID_INVALID = 0x7FF4  # xen.h
INVALID_GFN = 0xFFFFFFFFFFFFFFFF
MAX_GFN = (1 << 52) - 1  # libxc PAGE_DATA pfn field, bits 51-0
HVM_MAX_VCPUS = 128  # hvm/hvm_info_table.h
XEN_LEGACY_MAX_VCPUS = 32  # arch-x86/xen.h
VCPU_INFO_SIZE = 64  # xen.h struct vcpu_info (x86)
NR_VIRQS = 24  # xen.h
EVTCHN_2L_NR_CHANNELS = 4096  # event_channel.h, 64-bit xen_ulong_t
EVTCHN_FIFO_NR_CHANNELS = 1 << 17  # event_channel.h
EVTCHN_FIFO_MAX_QUEUES = 16  # event_channel.h
EVTCHN_FIFO_PRIORITY_MIN = 15  # event_channel.h
EVTCHN_FIFO_CONTROL_BLOCK_SIZE = 72  # struct evtchn_fifo_control_block
EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES = EVTCHN_FIFO_NR_CHANNELS * 4 // PAGE_SIZE
GNTTAB_V1_PER_FRAME = PAGE_SIZE // 8  # grant_entry_v1_t
GNTTAB_V2_PER_FRAME = PAGE_SIZE // 16  # grant_entry_v2_t
GNTTAB_STATUS_PER_FRAME = PAGE_SIZE // 2  # grant_status_t
XENSTORE_PAYLOAD_MAX = 4096  # io/xs_wire.h
XENSTORE_ABS_PATH_MAX = 3072  # io/xs_wire.h
XENSTORE_REL_PATH_MAX = 2048  # io/xs_wire.h
XSD_SOCKMSG_SIZE = 16  # io/xs_wire.h struct xsd_sockmsg
SRING_HEADER_SIZE = 64  # io/ring.h: offsetof(struct *_sring, ring)
RUNSTATE_INFO_MIN_SIZE = 44  # vcpu.h vcpu_runstate_info, 32-bit layout
VCPU_TIME_INFO_SIZE = 32  # xen.h struct vcpu_time_info
HVM_VM_ASSIST_MASK = 1 << 5  # VMASST_TYPE_runstate_update_flag, only HVM one
STIME_DELTA_MAX = (1 << 64) - 1 >> 2  # xen/time.h, timer bounds
MILLISECS = 1_000_000

# -- Project limits (spec "Limits") ------------------------------------------

MAX_GRANT_FRAMES = 1024
MAX_GRANT_STATUS_FRAMES = -(-MAX_GRANT_FRAMES // 8)
MAX_BACKEND_DOMAINS = 256
MAX_XS_IN_DATA = XSD_SOCKMSG_SIZE + XENSTORE_PAYLOAD_MAX
MAX_XS_OUT_DATA = 1 << 20
MAX_XS_PERMS = 1024
MAX_XS_TOKEN = XENSTORE_PAYLOAD_MAX
MAX_XS_VALUE = XENSTORE_PAYLOAD_MAX
MAX_PV_RINGS = 64
MAX_RING_REFS = 16
MAX_SLOT_SIZE = 512

# -- Enumerations -------------------------------------------------------------


class EvtchnAbi(enum.IntEnum):
    """Event channel ABI in use (spec "NCM_EVENT_CHANNELS")."""

    TWO_LEVEL = 0
    FIFO = 1


class EvtchnType(enum.IntEnum):
    """Port type, numbered as EVTCHNSTAT_* (event_channel.h)."""

    UNBOUND = 1
    INTERDOMAIN = 2
    PIRQ = 3
    VIRQ = 4
    IPI = 5


PORT_PENDING = 0x1
PORT_MASKED = 0x2
PORT_LINKED = 0x4  # FIFO only
PORT_FLAGS = PORT_PENDING | PORT_MASKED | PORT_LINKED


class VcpuInfoKind(enum.IntEnum):
    """Where a vCPU's vcpu_info lives (spec "NCM_SHARED_INFO")."""

    NONE = 0
    LEGACY = 1
    REGISTERED = 2


SHARED_INFO_COMPAT = 0x1  # 32-bit shared info layout latched by Xen


class GuestAreaKind(enum.IntEnum):
    """How a runstate or time area was registered (vcpu.h)."""

    NONE = 0
    VIRTUAL = 1  # VCPUOP_register_{runstate,vcpu_time}_memory_area
    PHYSICAL = 2  # VCPUOP_register_{runstate,vcpu_time}_phys_area


VCPU_SINGLESHOT_ARMED = 0x1
UPCALL_VECTOR_MIN = 0x10  # hvm.c hvmop_set_evtchn_upcall_vector


class XenbusState(enum.IntEnum):
    """io/xenbus.h enum xenbus_state."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class DeviceKind(enum.IntEnum):
    """PV device class (spec "NCM_PV_DEVICE")."""

    VIF = 1
    VBD = 2
    CONSOLE = 3


class RingKind(enum.IntEnum):
    """Shared ring protocol of one ring of a PV device."""

    BLKIF = 1
    NETIF_TX = 2
    NETIF_RX = 3
    CONSOLE = 4


DEVICE_RINGS = {
    DeviceKind.VIF: frozenset({RingKind.NETIF_TX, RingKind.NETIF_RX}),
    DeviceKind.VBD: frozenset({RingKind.BLKIF}),
    DeviceKind.CONSOLE: frozenset({RingKind.CONSOLE}),
}

XS_ACCESS_READ = 0x1
XS_ACCESS_WRITTEN = 0x2
XS_PERM_STALE = 0x01
XS_PERM_LETTERS = "wrbn"
XS_WATCH_DEPTH_UNLIMITED = 0xFFFF
XS_CONN_SHARED_RING = 0x0000
XS_CONN_FIELD_UNIQUE_ID = 0x0001

# -- Struct formats (spec, one per layout table) ------------------------------

DOMAIN_HEADER = struct.Struct("<IIHHHH16s")
SHARED_INFO_HEADER = struct.Struct("<IHHQ")
VCPU_INFO_ENTRY = struct.Struct("<IHHQ")
VCPU_PV_HEADER = struct.Struct("<IIQ")
VCPU_PV_ENTRY = struct.Struct("<IBBBBQQQQ")
EVTCHN_HEADER = struct.Struct("<IBBHIIII")
FIFO_VCPU_ENTRY = struct.Struct("<IIQ16I")
PORT_ENTRY_FORMAT = "<IIIHBBBBHI"
GNTTAB_HEADER = struct.Struct("<IBBHII")
XS_CONNECTION_HEADER = struct.Struct("<IHHHHIHHI")
XS_WATCH_HEADER = struct.Struct("<IHHHH")
XS_TRANSACTION_BODY = struct.Struct("<II")
XS_NODE_HEADER = struct.Struct("<IIHHHH")
XS_PERM = struct.Struct("<BBH")
PV_DEVICE_HEADER = struct.Struct("<IIHHBBBBHHHH")
PV_RING_HEADER = struct.Struct("<BBHHHIIIIII")
PV_INFLIGHT_HEADER = struct.Struct("<IIQ")
GFN = struct.Struct("<Q")
U64 = struct.Struct("<Q")

# One event channel port (spec "Port entry"), as a numpy record.
PORT_DTYPE = np.dtype(
    [
        ("port", "<u4"),
        ("vcpu", "<u4"),
        ("binding", "<u4"),
        ("remote_domid", "<u2"),
        ("type", "u1"),
        ("flags", "u1"),
        ("priority", "u1"),
        ("last_priority", "u1"),
        ("reserved", "<u2"),
        ("last_vcpu", "<u4"),
    ]
)
# grant_entry_v1_t (grant_table.h).
GNT_V1_DTYPE = np.dtype([("flags", "<u2"), ("domid", "<u2"), ("frame", "<u4")])
# grant_entry_v2_t: header, then the union's second word (full_page pad0,
# sub_page page_off | length << 16, transitive trans_domid | pad0 << 16)
# and third (full_page/sub_page frame, transitive gref in the low half).
GNT_V2_DTYPE = np.dtype(
    [("flags", "<u2"), ("domid", "<u2"), ("ext", "<u4"), ("frame", "<u8")]
)
GNT_STATUS_DTYPE = np.dtype("<u2")
U16_DTYPE = np.dtype("<u2")
U32_DTYPE = np.dtype("<u4")
U64_DTYPE = np.dtype("<u8")

# -- Helpers ------------------------------------------------------------------


def _pad8(size: int) -> bytes:
    return bytes(-size % 8)


class _Reader:
    """Walks a body; every length is checked against what is left."""

    def __init__(self, body: memoryview) -> None:
        if body.ndim != 1 or body.format != "B":
            body = body.cast("B")
        self.body = body
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.body) - self.pos

    def take(self, size: int, field: str) -> memoryview:
        if size > self.left:
            raise BodyError(
                f"{field}: needs {size} octets at body offset {self.pos}, "
                f"only {self.left} left"
            )
        view = self.body[self.pos : self.pos + size]
        self.pos += size
        return view

    def unpack(self, layout: struct.Struct, field: str) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size, field))

    def array(self, dtype: np.dtype, count: int, field: str) -> np.ndarray:
        # take() refuses a count the body cannot hold, so nothing is
        # allocated for a hostile count; frombuffer itself does not copy.
        view = self.take(count * dtype.itemsize, field)
        return np.frombuffer(view, dtype=dtype)

    def pad(self, field: str) -> None:
        if any(self.take(-self.pos % 8, field)):
            raise BodyError(f"{field}: padding must be zero")

    def end(self) -> None:
        if self.left:
            raise BodyError(
                f"{self.left} octets after the last field "
                f"(body offset {self.pos})"
            )


def _check_bytes(value: Any, field: str) -> None:
    # bytes only: a str would encode to other octets than it compares as.
    if not isinstance(value, bytes):
        raise BodyError(f"{field}: must be bytes, not {type(value).__name__}")


def _check_version(version: int) -> None:
    if version != RECORD_VERSION:
        raise BodyError(
            f"version: {version} is not supported (this reader knows "
            f"version {RECORD_VERSION})"
        )


def _check_zero(value: int, field: str) -> None:
    if value:
        raise BodyError(f"{field}: must be zero, is {value:#x}")


def _check_limit(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise BodyError(f"{field}: {count} exceeds the limit {limit}")


def _check_range(value: int, low: int, high: int, field: str) -> None:
    """``low <= value < high``."""
    if not low <= value < high:
        raise BodyError(f"{field}: {value:#x} outside {low:#x}..{high - 1:#x}")


def _check_domid(domid: int, field: str, *, guest: bool = False) -> None:
    # A guest is never domain 0; a service domain may be.
    _check_range(domid, 1 if guest else 0, DOMID_FIRST_RESERVED, field)


def _check_port(port: int, field: str) -> None:
    _check_range(port, 1, EVTCHN_FIFO_NR_CHANNELS, field)


def _check_gfn(gfn: int, field: str, *, unmapped_ok: bool) -> None:
    if unmapped_ok and gfn == INVALID_GFN:
        return
    _check_range(gfn, 0, MAX_GFN + 1, field)


def _check_enum(enum_type: type[enum.IntEnum], value: int, field: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        raise BodyError(
            f"{field}: {value} is not a valid {enum_type.__name__}"
        ) from None


def _check_ascending(values: list[int], field: str) -> None:
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise BodyError(
                f"{field}[{i}]: {values[i]} not above the previous "
                f"{values[i - 1]} (must be strictly ascending)"
            )


_XS_PATH_OCTETS = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@"
)


def _cstring(raw: memoryview, field: str) -> bytes:
    """The content of a NUL-terminated string field, without the NUL."""
    if not len(raw) or raw[-1] != 0:
        raise BodyError(f"{field}: not NUL-terminated")
    data = bytes(raw[:-1])
    if 0 in data:
        raise BodyError(
            f"{field}: NUL at position {data.index(0)} before the end"
        )
    return data


def _check_xs_path(path: str, field: str, *, absolute: bool) -> None:
    """A xenstore path as xenstored accepts it (docs/misc/xenstore.txt,
    tools/xenstored/core.c valid_chars() and canonicalize())."""
    if not isinstance(path, str):
        raise BodyError(f"{field}: must be a str")
    data = path.encode("ascii", "replace")
    if not data:
        raise BodyError(f"{field}: empty path")
    bad = set(data) - _XS_PATH_OCTETS
    if bad:
        raise BodyError(f"{field}: invalid character {chr(min(bad))!r}")
    if absolute and data[:1] != b"/":
        raise BodyError(f"{field}: {path!r} is not an absolute path")
    # xenstored's canonicalize() refuses these too.
    if b"//" in data:
        raise BodyError(f"{field}: {path!r} has an empty element")
    if data.endswith(b"/") and data != b"/":
        raise BodyError(f"{field}: {path!r} ends with '/'")
    limit = (
        XENSTORE_ABS_PATH_MAX if data[:1] == b"/" else XENSTORE_REL_PATH_MAX
    )
    _check_limit(len(data), limit, f"{field} length")


def _xs_path(raw: memoryview, field: str, *, absolute: bool) -> str:
    data = _cstring(raw, field)
    bad = set(data) - _XS_PATH_OCTETS
    if bad:
        raise BodyError(f"{field}: invalid character {chr(min(bad))!r}")
    path = data.decode("ascii")
    _check_xs_path(path, field, absolute=absolute)
    return path


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _check_array(array: Any, dtype: np.dtype, field: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        raise BodyError(f"{field}: must be a numpy array of {dtype}")
    if array.ndim != 1:
        raise BodyError(f"{field}: must be one-dimensional")
    return array


def _array_bytes(array: np.ndarray) -> memoryview:
    """The octets of an array, without a copy when it is contiguous."""
    return memoryview(np.ascontiguousarray(array).view(np.uint8))


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.all(a == b))


# -- NCM_DOMAIN (libxl) -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NcmDomain:
    """Guest identity that must survive (spec "NCM_DOMAIN").

    ``uuid`` is the domain handle (XENVER_guest_handle is guest-visible);
    ``backend_domids`` are the service domains of the guest's PV devices,
    strictly ascending.
    """

    domid: int
    uuid: uuid.UUID
    store_domid: int
    console_domid: int
    backend_domids: tuple[int, ...] = ()

    def validate(self) -> None:
        _check_domid(self.domid, "domid", guest=True)
        if not isinstance(self.uuid, uuid.UUID):
            raise BodyError("uuid: must be a uuid.UUID")
        _check_domid(self.store_domid, "store_domid")
        _check_domid(self.console_domid, "console_domid")
        _check_limit(
            len(self.backend_domids), MAX_BACKEND_DOMAINS, "nr_backends"
        )
        for i, domid in enumerate(self.backend_domids):
            _check_domid(domid, f"backend_domids[{i}]")
            if domid == self.domid:
                raise BodyError(
                    f"backend_domids[{i}]: {domid} is the guest itself"
                )
        _check_ascending(list(self.backend_domids), "backend_domids")

    def summary(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "uuid": str(self.uuid),
            "store_domid": self.store_domid,
            "console_domid": self.console_domid,
            "backend_domids": list(self.backend_domids),
        }


class NcmDomainCodec:
    """Spec "NCM_DOMAIN"."""

    def decode(self, body: memoryview) -> NcmDomain:
        r = _Reader(body)
        version, xs_version, domid, store, console, count, handle = r.unpack(
            DOMAIN_HEADER, "header"
        )
        _check_version(version)
        if xs_version != XENSTORE_FORMAT_VERSION:
            raise BodyError(
                f"xenstore_version: {xs_version} is not supported "
                f"(XS_* bodies are version {XENSTORE_FORMAT_VERSION})"
            )
        _check_limit(count, MAX_BACKEND_DOMAINS, "nr_backends")
        backends = r.array(U16_DTYPE, count, "backend_domids")
        r.end()
        value = NcmDomain(
            domid=domid,
            uuid=uuid.UUID(bytes=handle),
            store_domid=store,
            console_domid=console,
            backend_domids=tuple(int(d) for d in backends),
        )
        value.validate()
        return value

    def encode(self, value: NcmDomain) -> Buffers:
        value.validate()
        head = DOMAIN_HEADER.pack(
            RECORD_VERSION,
            XENSTORE_FORMAT_VERSION,
            value.domid,
            value.store_domid,
            value.console_domid,
            len(value.backend_domids),
            value.uuid.bytes,
        )
        tail = struct.pack(
            f"<{len(value.backend_domids)}H", *value.backend_domids
        )
        return [head + tail]


# -- NCM_SHARED_INFO (libxc) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VcpuInfoPlacement:
    """Where one vCPU's vcpu_info is (VCPUOP_register_vcpu_info)."""

    vcpu: int
    kind: VcpuInfoKind
    gfn: int = 0
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class SharedInfo:
    """The shared info page and vcpu_info placement (spec
    "NCM_SHARED_INFO").

    ``gfn`` is where the guest mapped the page (XENMAPSPACE_shared_info) or
    INVALID_GFN; ``page`` is its full content, carried verbatim (wallclock,
    2-level pending and mask words, legacy vcpu_info slots). Entry *i* of
    ``vcpu_info`` describes vCPU *i*.
    """

    gfn: int
    page: bytes
    vcpu_info: tuple[VcpuInfoPlacement, ...]
    compat_layout: bool = False

    def validate(self) -> None:
        _check_gfn(self.gfn, "gfn", unmapped_ok=True)
        _check_bytes(self.page, "page")
        if len(self.page) != PAGE_SIZE:
            raise BodyError(
                f"page: must be {PAGE_SIZE} octets, has {len(self.page)}"
            )
        if not self.vcpu_info:
            raise BodyError("nr_vcpus: a domain has at least one vCPU")
        _check_limit(len(self.vcpu_info), HVM_MAX_VCPUS, "nr_vcpus")
        # Xen requires xen_ulong_t alignment (common/domain.c
        # map_guest_area), 4 octets with the 32-bit layout.
        align = 4 if self.compat_layout else 8
        for i, entry in enumerate(self.vcpu_info):
            field = f"vcpu_info[{i}]"
            if entry.vcpu != i:
                raise BodyError(f"{field}.vcpu: is {entry.vcpu}, must be {i}")
            kind = _check_enum(VcpuInfoKind, entry.kind, f"{field}.kind")
            if kind is VcpuInfoKind.REGISTERED:
                _check_gfn(entry.gfn, f"{field}.gfn", unmapped_ok=False)
                _check_range(
                    entry.offset,
                    0,
                    PAGE_SIZE - VCPU_INFO_SIZE + 1,
                    f"{field}.offset",
                )
                if entry.offset % align:
                    raise BodyError(
                        f"{field}.offset: {entry.offset} not aligned to "
                        f"{align}"
                    )
                continue
            _check_zero(entry.gfn, f"{field}.gfn")
            _check_zero(entry.offset, f"{field}.offset")
            # Only the first XEN_LEGACY_MAX_VCPUS have a slot in the page.
            legacy = i < XEN_LEGACY_MAX_VCPUS
            if legacy != (kind is VcpuInfoKind.LEGACY):
                raise BodyError(
                    f"{field}.kind: {kind.name} impossible for vCPU {i}"
                )

    def summary(self) -> dict[str, Any]:
        registered = [
            e.vcpu for e in self.vcpu_info if e.kind == VcpuInfoKind.REGISTERED
        ]
        return {
            "gfn": None if self.gfn == INVALID_GFN else self.gfn,
            "nr_vcpus": len(self.vcpu_info),
            "registered_vcpu_info": registered,
            "compat_layout": self.compat_layout,
        }


class SharedInfoCodec:
    """Spec "NCM_SHARED_INFO"."""

    def decode(self, body: memoryview) -> SharedInfo:
        r = _Reader(body)
        version, flags, count, gfn = r.unpack(SHARED_INFO_HEADER, "header")
        _check_version(version)
        _check_zero(flags & ~SHARED_INFO_COMPAT, "flags (undefined bits)")
        _check_range(count, 1, HVM_MAX_VCPUS + 1, "nr_vcpus")
        page = bytes(r.take(PAGE_SIZE, "page"))
        entries = []
        for i in range(count):
            vcpu, kind, offset, vgfn = r.unpack(
                VCPU_INFO_ENTRY, f"vcpu_info[{i}]"
            )
            kind = _check_enum(VcpuInfoKind, kind, f"vcpu_info[{i}].kind")
            entries.append(VcpuInfoPlacement(vcpu, kind, vgfn, offset))
        r.end()
        value = SharedInfo(
            gfn=gfn,
            page=page,
            vcpu_info=tuple(entries),
            compat_layout=bool(flags & SHARED_INFO_COMPAT),
        )
        value.validate()
        return value

    def encode(self, value: SharedInfo) -> Buffers:
        value.validate()
        flags = SHARED_INFO_COMPAT if value.compat_layout else 0
        head = SHARED_INFO_HEADER.pack(
            RECORD_VERSION, flags, len(value.vcpu_info), value.gfn
        )
        entries = b"".join(
            VCPU_INFO_ENTRY.pack(e.vcpu, e.kind, e.offset, e.gfn)
            for e in value.vcpu_info
        )
        return [head, memoryview(value.page), entries]


# -- NCM_VCPU_PV (libxc) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VcpuPvState:
    """One vCPU's PV registrations other than vcpu_info, and its PV timers.

    ``runstate_addr``/``time_addr`` are guest virtual addresses (VIRTUAL)
    or guest physical ones (PHYSICAL). ``singleshot_ns`` is the time left
    at pause until the VCPUOP_set_singleshot_timer deadline, or None if no
    timer is armed; ``periodic_ns`` the VCPUOP_set_periodic_timer period
    (0: stopped); ``upcall_vector`` the vector of
    HVMOP_set_evtchn_upcall_vector (0: none, the callback of
    HVM_PARAM_CALLBACK_IRQ is used).
    """

    vcpu: int
    runstate_kind: GuestAreaKind = GuestAreaKind.NONE
    runstate_addr: int = 0
    time_kind: GuestAreaKind = GuestAreaKind.NONE
    time_addr: int = 0
    singleshot_ns: int | None = None
    periodic_ns: int = 0
    upcall_vector: int = 0


def _check_guest_area(
    kind: int, addr: int, size: int, field: str
) -> GuestAreaKind:
    kind = _check_enum(GuestAreaKind, kind, f"{field}_kind")
    if kind is GuestAreaKind.NONE:
        _check_zero(addr, f"{field}_addr")
    elif kind is GuestAreaKind.VIRTUAL:
        _check_range(addr, 0, 1 << 64, f"{field}_addr")
    else:
        # Xen maps a physical area only if it fits in one page and is
        # aligned (common/domain.c map_guest_area).
        _check_gfn(addr >> 12, f"{field}_addr", unmapped_ok=False)
        if addr % 4 or (addr & (PAGE_SIZE - 1)) + size > PAGE_SIZE:
            raise BodyError(
                f"{field}_addr: {addr:#x} is unaligned or crosses a page"
            )
    return kind


@dataclasses.dataclass(frozen=True)
class VcpuPv:
    """Per-vCPU PV state besides vcpu_info (spec "NCM_VCPU_PV").

    Entry *i* of ``vcpus`` describes vCPU *i*. ``vm_assist`` is the
    domain's HYPERVISOR_vm_assist bitmap.
    """

    vm_assist: int
    vcpus: tuple[VcpuPvState, ...]

    def validate(self) -> None:
        _check_range(self.vm_assist, 0, 1 << 64, "vm_assist")
        _check_zero(
            self.vm_assist & ~HVM_VM_ASSIST_MASK,
            "vm_assist (not valid for HVM)",
        )
        if not self.vcpus:
            raise BodyError("nr_vcpus: a domain has at least one vCPU")
        _check_limit(len(self.vcpus), HVM_MAX_VCPUS, "nr_vcpus")
        for i, entry in enumerate(self.vcpus):
            field = f"vcpus[{i}]"
            if entry.vcpu != i:
                raise BodyError(f"{field}.vcpu: is {entry.vcpu}, must be {i}")
            _check_guest_area(
                entry.runstate_kind,
                entry.runstate_addr,
                RUNSTATE_INFO_MIN_SIZE,
                f"{field}.runstate",
            )
            _check_guest_area(
                entry.time_kind,
                entry.time_addr,
                VCPU_TIME_INFO_SIZE,
                f"{field}.time",
            )
            if entry.singleshot_ns is not None:
                _check_range(
                    entry.singleshot_ns,
                    0,
                    STIME_DELTA_MAX + 1,
                    f"{field}.singleshot_ns",
                )
            # HVMOP_set_evtchn_upcall_vector refuses vectors below 0x10.
            if entry.upcall_vector:
                _check_range(
                    entry.upcall_vector,
                    UPCALL_VECTOR_MIN,
                    0x100,
                    f"{field}.upcall_vector",
                )
            # VCPUOP_set_periodic_timer's bounds (common/domain.c).
            if entry.periodic_ns:
                _check_range(
                    entry.periodic_ns,
                    MILLISECS,
                    STIME_DELTA_MAX + 1,
                    f"{field}.periodic_ns",
                )

    def summary(self) -> dict[str, Any]:
        return {
            "nr_vcpus": len(self.vcpus),
            "vm_assist": self.vm_assist,
            "runstate_areas": sum(
                1 for v in self.vcpus if v.runstate_kind != GuestAreaKind.NONE
            ),
            "time_areas": sum(
                1 for v in self.vcpus if v.time_kind != GuestAreaKind.NONE
            ),
            "singleshot_armed": [
                v.vcpu for v in self.vcpus if v.singleshot_ns is not None
            ],
            "upcall_vectors": [v.vcpu for v in self.vcpus if v.upcall_vector],
        }


class VcpuPvCodec:
    """Spec "NCM_VCPU_PV"."""

    def decode(self, body: memoryview) -> VcpuPv:
        r = _Reader(body)
        version, count, vm_assist = r.unpack(VCPU_PV_HEADER, "header")
        _check_version(version)
        _check_range(count, 1, HVM_MAX_VCPUS + 1, "nr_vcpus")
        entries = []
        for i in range(count):
            (vcpu, rkind, tkind, flags, vector, raddr, taddr, single,
             period) = r.unpack(VCPU_PV_ENTRY, f"vcpus[{i}]")  # fmt: skip
            _check_zero(
                flags & ~VCPU_SINGLESHOT_ARMED,
                f"vcpus[{i}].flags (undefined bits)",
            )
            if not flags & VCPU_SINGLESHOT_ARMED:
                _check_zero(single, f"vcpus[{i}].singleshot_ns (not armed)")
            entries.append(
                VcpuPvState(
                    vcpu=vcpu,
                    runstate_kind=_check_enum(
                        GuestAreaKind, rkind, f"vcpus[{i}].runstate_kind"
                    ),
                    runstate_addr=raddr,
                    time_kind=_check_enum(
                        GuestAreaKind, tkind, f"vcpus[{i}].time_kind"
                    ),
                    time_addr=taddr,
                    singleshot_ns=(
                        single if flags & VCPU_SINGLESHOT_ARMED else None
                    ),
                    periodic_ns=period,
                    upcall_vector=vector,
                )
            )
        r.end()
        value = VcpuPv(vm_assist, tuple(entries))
        value.validate()
        return value

    def encode(self, value: VcpuPv) -> Buffers:
        value.validate()
        parts = [
            VCPU_PV_HEADER.pack(
                RECORD_VERSION, len(value.vcpus), value.vm_assist
            )
        ]
        for v in value.vcpus:
            armed = v.singleshot_ns is not None
            parts.append(
                VCPU_PV_ENTRY.pack(
                    v.vcpu,
                    v.runstate_kind,
                    v.time_kind,
                    VCPU_SINGLESHOT_ARMED if armed else 0,
                    v.upcall_vector,
                    v.runstate_addr,
                    v.time_addr,
                    v.singleshot_ns if armed else 0,
                    v.periodic_ns,
                )
            )
        return [b"".join(parts)]


# -- NCM_EVENT_CHANNELS (libxc) -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class FifoVcpu:
    """One vCPU's FIFO control block (EVTCHNOP_init_control) and the
    hypervisor's tail of each of its 16 priority queues."""

    vcpu: int
    control_gfn: int
    offset: int
    tails: tuple[int, ...] = (0,) * EVTCHN_FIFO_MAX_QUEUES


def port_array(rows: list[tuple[int, ...]] | None = None) -> np.ndarray:
    """An array of PORT_DTYPE; each row is a tuple in field order."""
    return np.array(rows or [], dtype=PORT_DTYPE)


@dataclasses.dataclass(frozen=True, eq=False)
class EventChannels:
    """Every open event channel of the guest (spec "NCM_EVENT_CHANNELS").

    ``ports`` is an array of PORT_DTYPE, strictly ascending by port; closed
    ports are absent. For FIFO, ``fifo_vcpus`` lists the control blocks
    (ascending vCPU) and ``event_array_gfns`` the event array pages in
    EVTCHNOP_expand_array order.
    """

    abi: EvtchnAbi
    ports: np.ndarray
    fifo_vcpus: tuple[FifoVcpu, ...] = ()
    event_array_gfns: tuple[int, ...] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventChannels):
            return NotImplemented
        return (
            self.abi == other.abi
            and self.fifo_vcpus == other.fifo_vcpus
            and self.event_array_gfns == other.event_array_gfns
            and _arrays_equal(self.ports, other.ports)
        )

    __hash__ = None  # type: ignore[assignment]

    def validate(self) -> None:
        abi = _check_enum(EvtchnAbi, self.abi, "abi")
        fifo = abi is EvtchnAbi.FIFO
        limit = EVTCHN_FIFO_NR_CHANNELS if fifo else EVTCHN_2L_NR_CHANNELS
        ports = _check_array(self.ports, PORT_DTYPE, "ports")
        _check_limit(len(ports), limit - 1, "nr_ports")
        _check_limit(len(self.fifo_vcpus), HVM_MAX_VCPUS, "nr_fifo_vcpus")
        _check_limit(
            len(self.event_array_gfns),
            EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES,
            "nr_event_array_pages",
        )
        if not fifo and (self.fifo_vcpus or self.event_array_gfns):
            raise BodyError(
                "nr_fifo_vcpus, nr_event_array_pages: must be 0 with the "
                "2-level ABI"
            )
        if fifo and not self.fifo_vcpus:
            raise BodyError(
                "nr_fifo_vcpus: the FIFO ABI needs a control "
                "block on at least one vCPU"
            )
        for i, gfn in enumerate(self.event_array_gfns):
            _check_gfn(gfn, f"event_array_gfns[{i}]", unmapped_ok=False)
        for i, blk in enumerate(self.fifo_vcpus):
            field = f"fifo_vcpus[{i}]"
            _check_range(blk.vcpu, 0, HVM_MAX_VCPUS, f"{field}.vcpu")
            _check_gfn(
                blk.control_gfn, f"{field}.control_gfn", unmapped_ok=False
            )
            # event_fifo.c evtchn_fifo_init_control's checks.
            _check_range(
                blk.offset,
                0,
                PAGE_SIZE - EVTCHN_FIFO_CONTROL_BLOCK_SIZE + 1,
                f"{field}.offset",
            )
            if blk.offset % 8:
                raise BodyError(f"{field}.offset: {blk.offset} not 8-aligned")
            if len(blk.tails) != EVTCHN_FIFO_MAX_QUEUES:
                raise BodyError(
                    f"{field}.tails: needs {EVTCHN_FIFO_MAX_QUEUES} entries"
                )
            for q, tail in enumerate(blk.tails):
                _check_range(
                    tail, 0, EVTCHN_FIFO_NR_CHANNELS, f"{field}.tails[{q}]"
                )
        _check_ascending([b.vcpu for b in self.fifo_vcpus], "fifo_vcpus")
        self._validate_ports(ports, fifo, limit)

    @staticmethod
    def _validate_ports(ports: np.ndarray, fifo: bool, limit: int) -> None:
        def reject(mask: np.ndarray, field: str, why: str) -> None:
            i = _first(mask)
            if i is not None:
                value = int(ports[field][i])
                raise BodyError(f"ports[{i}].{field}: {value:#x} {why}")

        port = ports["port"].astype(np.int64)
        kind = ports["type"]
        reject(port == 0, "port", "port 0 is never valid")
        reject(port >= limit, "port", f"not below {limit:#x} for this ABI")
        if len(port) > 1:
            i = _first(np.diff(port) <= 0)
            if i is not None:
                raise BodyError(
                    f"ports[{i + 1}].port: not above ports[{i}] (ports "
                    "must be strictly ascending)"
                )
        reject(
            (kind < EvtchnType.UNBOUND) | (kind > EvtchnType.IPI),
            "type",
            "is not a valid EvtchnType",
        )
        reject(ports["reserved"] != 0, "reserved", "must be zero")
        reject(
            ports["flags"] & (0xFF ^ PORT_FLAGS) != 0,
            "flags",
            "undefined bits",
        )
        reject(ports["vcpu"] >= HVM_MAX_VCPUS, "vcpu", "no such vCPU")
        if fifo:
            reject(
                ports["priority"] > EVTCHN_FIFO_PRIORITY_MIN,
                "priority",
                "is not a FIFO priority",
            )
            reject(
                ports["last_priority"] > EVTCHN_FIFO_PRIORITY_MIN,
                "last_priority",
                "is not a FIFO priority",
            )
            reject(
                ports["last_vcpu"] >= HVM_MAX_VCPUS,
                "last_vcpu",
                "no such vCPU",
            )
        else:
            reject(
                ports["flags"] & PORT_LINKED != 0,
                "flags",
                "LINKED only exists with FIFO",
            )
            for name in ("priority", "last_priority", "last_vcpu"):
                reject(ports[name] != 0, name, "must be zero with 2-level")
        remote = (kind == EvtchnType.UNBOUND) | (
            kind == EvtchnType.INTERDOMAIN
        )
        reject(
            remote & (ports["remote_domid"] >= DOMID_FIRST_RESERVED),
            "remote_domid",
            "is not a domain",
        )
        reject(
            ~remote & (ports["remote_domid"] != 0),
            "remote_domid",
            "must be zero for this type",
        )
        binding = ports["binding"]
        reject(
            ((kind == EvtchnType.UNBOUND) | (kind == EvtchnType.IPI))
            & (binding != 0),
            "binding",
            "must be zero for this type",
        )
        reject(
            (kind == EvtchnType.INTERDOMAIN)
            & ((binding == 0) | (binding >= EVTCHN_FIFO_NR_CHANNELS)),
            "binding",
            "is not a remote port",
        )
        reject(
            (kind == EvtchnType.VIRQ) & (binding >= NR_VIRQS),
            "binding",
            "is not a VIRQ",
        )

    def summary(self) -> dict[str, Any]:
        counts = {
            t.name.lower(): int(np.count_nonzero(self.ports["type"] == t))
            for t in EvtchnType
        }
        flags = self.ports["flags"]
        return {
            "abi": EvtchnAbi(self.abi).name.lower(),
            "nr_ports": len(self.ports),
            "by_type": counts,
            "pending": int(np.count_nonzero(flags & PORT_PENDING)),
            "masked": int(np.count_nonzero(flags & PORT_MASKED)),
            "fifo_vcpus": [b.vcpu for b in self.fifo_vcpus],
            "event_array_pages": len(self.event_array_gfns),
        }


class EventChannelsCodec:
    """Spec "NCM_EVENT_CHANNELS"."""

    def decode(self, body: memoryview) -> EventChannels:
        r = _Reader(body)
        version, abi, rsv0, rsv1, nports, nfifo, npages, rsv2 = r.unpack(
            EVTCHN_HEADER, "header"
        )
        _check_version(version)
        abi = _check_enum(EvtchnAbi, abi, "abi")
        _check_zero(rsv0, "reserved (octet 5)")
        _check_zero(rsv1, "reserved (octets 6-7)")
        _check_zero(rsv2, "reserved (octets 20-23)")
        limit = (
            EVTCHN_FIFO_NR_CHANNELS
            if abi is EvtchnAbi.FIFO
            else EVTCHN_2L_NR_CHANNELS
        )
        _check_limit(nports, limit - 1, "nr_ports")
        _check_limit(nfifo, HVM_MAX_VCPUS, "nr_fifo_vcpus")
        _check_limit(
            npages, EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES, "nr_event_array_pages"
        )
        blocks = []
        for i in range(nfifo):
            vcpu, offset, gfn, *tails = r.unpack(
                FIFO_VCPU_ENTRY, f"fifo_vcpus[{i}]"
            )
            blocks.append(FifoVcpu(vcpu, gfn, offset, tuple(tails)))
        gfns = r.array(U64_DTYPE, npages, "event_array_gfns")
        ports = r.array(PORT_DTYPE, nports, "ports")
        r.end()
        value = EventChannels(
            abi=abi,
            ports=ports,
            fifo_vcpus=tuple(blocks),
            event_array_gfns=tuple(int(g) for g in gfns),
        )
        value.validate()
        return value

    def encode(self, value: EventChannels) -> Buffers:
        value.validate()
        head = EVTCHN_HEADER.pack(
            RECORD_VERSION,
            value.abi,
            0,
            0,
            len(value.ports),
            len(value.fifo_vcpus),
            len(value.event_array_gfns),
            0,
        )
        blocks = b"".join(
            FIFO_VCPU_ENTRY.pack(b.vcpu, b.offset, b.control_gfn, *b.tails)
            for b in value.fifo_vcpus
        )
        gfns = struct.pack(
            f"<{len(value.event_array_gfns)}Q", *value.event_array_gfns
        )
        return [head + blocks + gfns, _array_bytes(value.ports)]


# -- NCM_GRANT_TABLE (libxc) --------------------------------------------------


def _status_frames(nr_frames: int) -> int:
    return -(-nr_frames * GNTTAB_V2_PER_FRAME // GNTTAB_STATUS_PER_FRAME)


def _empty_status() -> np.ndarray:
    return np.zeros(0, GNT_STATUS_DTYPE)


@dataclasses.dataclass(frozen=True, eq=False)
class GrantTable:
    """The guest's grant table (spec "NCM_GRANT_TABLE").

    ``frame_gfns[i]`` is where grant frame *i* is mapped
    (XENMAPSPACE_grant_table) or INVALID_GFN. ``entries`` holds every entry
    of every frame (GNT_V1_DTYPE or GNT_V2_DTYPE), ``status`` every v2
    status word; both are guest-owned content carried verbatim.
    """

    version: int
    frame_gfns: tuple[int, ...]
    entries: np.ndarray
    status_gfns: tuple[int, ...] = ()
    status: np.ndarray = dataclasses.field(default_factory=_empty_status)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GrantTable):
            return NotImplemented
        return (
            self.version == other.version
            and self.frame_gfns == other.frame_gfns
            and self.status_gfns == other.status_gfns
            and _arrays_equal(self.entries, other.entries)
            and _arrays_equal(self.status, other.status)
        )

    __hash__ = None  # type: ignore[assignment]

    def validate(self) -> None:
        if self.version not in (1, 2):
            raise BodyError(f"gnttab_version: {self.version} is not 1 or 2")
        nframes = len(self.frame_gfns)
        if not nframes:
            raise BodyError("nr_frames: a grant table has at least 1 frame")
        _check_limit(nframes, MAX_GRANT_FRAMES, "nr_frames")
        for i, gfn in enumerate(self.frame_gfns):
            _check_gfn(gfn, f"frame_gfns[{i}]", unmapped_ok=True)
        for i, gfn in enumerate(self.status_gfns):
            _check_gfn(gfn, f"status_gfns[{i}]", unmapped_ok=True)
        if self.version == 1:
            dtype, per_frame, nstatus = GNT_V1_DTYPE, GNTTAB_V1_PER_FRAME, 0
        else:
            dtype, per_frame = GNT_V2_DTYPE, GNTTAB_V2_PER_FRAME
            nstatus = _status_frames(nframes)
        if len(self.status_gfns) != nstatus:
            raise BodyError(
                f"nr_status_frames: {len(self.status_gfns)}, must be "
                f"{nstatus} for {nframes} version {self.version} frames"
            )
        entries = _check_array(self.entries, dtype, "entries")
        if len(entries) != nframes * per_frame:
            raise BodyError(
                f"entries: {len(entries)}, must be {nframes * per_frame}"
            )
        status = _check_array(self.status, GNT_STATUS_DTYPE, "status")
        if len(status) != nstatus * GNTTAB_STATUS_PER_FRAME:
            raise BodyError(
                f"status: {len(status)} words, must be "
                f"{nstatus * GNTTAB_STATUS_PER_FRAME}"
            )

    def summary(self) -> dict[str, Any]:
        in_use = np.count_nonzero(self.entries["flags"] & 0x3)
        return {
            "version": self.version,
            "nr_frames": len(self.frame_gfns),
            "mapped_frames": sum(
                1 for g in self.frame_gfns if g != INVALID_GFN
            ),
            "nr_status_frames": len(self.status_gfns),
            "entries_in_use": int(in_use),
        }


class GrantTableCodec:
    """Spec "NCM_GRANT_TABLE"."""

    def decode(self, body: memoryview) -> GrantTable:
        r = _Reader(body)
        version, gversion, rsv0, rsv1, nframes, nstatus = r.unpack(
            GNTTAB_HEADER, "header"
        )
        _check_version(version)
        _check_zero(rsv0, "reserved (octet 5)")
        _check_zero(rsv1, "reserved (octets 6-7)")
        if gversion not in (1, 2):
            raise BodyError(f"gnttab_version: {gversion} is not 1 or 2")
        _check_range(nframes, 1, MAX_GRANT_FRAMES + 1, "nr_frames")
        expected = _status_frames(nframes) if gversion == 2 else 0
        if nstatus != expected:
            raise BodyError(
                f"nr_status_frames: {nstatus}, must be {expected} for "
                f"{nframes} version {gversion} frames"
            )
        gfns = r.array(U64_DTYPE, nframes, "frame_gfns")
        sgfns = r.array(U64_DTYPE, nstatus, "status_gfns")
        if gversion == 1:
            dtype, per_frame = GNT_V1_DTYPE, GNTTAB_V1_PER_FRAME
        else:
            dtype, per_frame = GNT_V2_DTYPE, GNTTAB_V2_PER_FRAME
        entries = r.array(dtype, nframes * per_frame, "frames")
        status = r.array(
            GNT_STATUS_DTYPE, nstatus * GNTTAB_STATUS_PER_FRAME, "status"
        )
        r.end()
        value = GrantTable(
            version=gversion,
            frame_gfns=tuple(int(g) for g in gfns),
            entries=entries,
            status_gfns=tuple(int(g) for g in sgfns),
            status=status,
        )
        value.validate()
        return value

    def encode(self, value: GrantTable) -> Buffers:
        value.validate()
        nframes, nstatus = len(value.frame_gfns), len(value.status_gfns)
        head = GNTTAB_HEADER.pack(
            RECORD_VERSION, value.version, 0, 0, nframes, nstatus
        )
        gfns = struct.pack(
            f"<{nframes + nstatus}Q", *value.frame_gfns, *value.status_gfns
        )
        buffers: Buffers = [head + gfns, _array_bytes(value.entries)]
        if nstatus:
            buffers.append(_array_bytes(value.status))
        return buffers


# -- NCM_XS_CONNECTION (libxl): xenstore-migration.md CONNECTION_DATA ---------


@dataclasses.dataclass(frozen=True)
class XsConnection:
    """The guest's xenstore ring connection (xenstore-migration.md
    CONNECTION_DATA, conn-type shared ring).

    ``evtchn`` is the guest's store port; the ring GFN travels in
    HVM_PARAM_STORE_PFN and grant entry GNTTAB_RESERVED_XENSTORE.
    ``in_data`` is a request read but not processed, ``out_data`` responses
    and watch events not yet written, the first ``out_resp_len`` octets of
    which are a partly written response.
    """

    conn_id: int
    domid: int
    target_domid: int
    evtchn: int
    in_data: bytes = b""
    out_data: bytes = b""
    out_resp_len: int = 0
    unique_id: int | None = None

    def validate(self) -> None:
        _check_range(self.conn_id, 1, 1 << 32, "conn-id")
        _check_domid(self.domid, "domid", guest=True)
        if self.target_domid != DOMID_INVALID:
            _check_domid(self.target_domid, "tdomid")
        _check_port(self.evtchn, "evtchn")
        _check_bytes(self.in_data, "in_data")
        _check_bytes(self.out_data, "out_data")
        _check_limit(len(self.in_data), MAX_XS_IN_DATA, "in-data-len")
        _check_limit(len(self.out_data), MAX_XS_OUT_DATA, "out-data-len")
        if not 0 <= self.out_resp_len <= len(self.out_data):
            raise BodyError(
                f"out-resp-len: {self.out_resp_len} exceeds out-data-len "
                f"{len(self.out_data)}"
            )
        if self.unique_id is not None:
            _check_range(self.unique_id, 0, 1 << 64, "unique-id")

    def summary(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "domid": self.domid,
            "evtchn": self.evtchn,
            "in_data": len(self.in_data),
            "out_data": len(self.out_data),
        }


class XsConnectionCodec:
    """xenstore-migration.md "CONNECTION_DATA"; spec "NCM_XS_CONNECTION"."""

    def decode(self, body: memoryview) -> XsConnection:
        r = _Reader(body)
        (
            conn_id,
            conn_type,
            fields,
            domid,
            tdomid,
            evtchn,
            in_len,
            resp_len,
            out_len,
        ) = r.unpack(XS_CONNECTION_HEADER, "header")
        if conn_type != XS_CONN_SHARED_RING:
            # Sockets only exist for xenstored live update.
            raise BodyError(
                f"conn-type: {conn_type:#x}, a migrated guest only has a "
                "shared ring connection (0)"
            )
        _check_zero(
            fields & ~XS_CONN_FIELD_UNIQUE_ID, "fields (undefined bits)"
        )
        _check_limit(in_len, MAX_XS_IN_DATA, "in-data-len")
        _check_limit(out_len, MAX_XS_OUT_DATA, "out-data-len")
        in_data = bytes(r.take(in_len, "data (in)"))
        out_data = bytes(r.take(out_len, "data (out)"))
        unique_id = None
        if fields & XS_CONN_FIELD_UNIQUE_ID:
            r.pad("unique-id padding")
            (unique_id,) = r.unpack(U64, "unique-id")
        r.end()
        value = XsConnection(
            conn_id=conn_id,
            domid=domid,
            target_domid=tdomid,
            evtchn=evtchn,
            in_data=in_data,
            out_data=out_data,
            out_resp_len=resp_len,
            unique_id=unique_id,
        )
        value.validate()
        return value

    def encode(self, value: XsConnection) -> Buffers:
        value.validate()
        has_id = value.unique_id is not None
        head = XS_CONNECTION_HEADER.pack(
            value.conn_id,
            XS_CONN_SHARED_RING,
            XS_CONN_FIELD_UNIQUE_ID if has_id else 0,
            value.domid,
            value.target_domid,
            value.evtchn,
            len(value.in_data),
            value.out_resp_len,
            len(value.out_data),
        )
        body = head + value.in_data + value.out_data
        if has_id:
            body += _pad8(len(body)) + U64.pack(value.unique_id)
        return [body]


# -- NCM_XS_WATCH (libxl): xenstore-migration.md WATCH_DATA_EXTENDED ----------


@dataclasses.dataclass(frozen=True)
class XsWatch:
    """A watch the guest registered (WATCH_DATA_EXTENDED).

    ``path`` is as given to WATCH (absolute, relative or ``@special``);
    ``depth`` 0xffff is unlimited.
    """

    conn_id: int
    path: str
    token: bytes
    depth: int = XS_WATCH_DEPTH_UNLIMITED

    def validate(self) -> None:
        _check_range(self.conn_id, 1, 1 << 32, "conn-id")
        _check_xs_path(self.path, "wpath", absolute=False)
        _check_bytes(self.token, "token")
        if 0 in self.token:
            raise BodyError("token: contains a NUL")
        _check_limit(len(self.token) + 1, MAX_XS_TOKEN, "token-len")
        _check_range(self.depth, 0, 1 << 16, "depth")

    def summary(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "path": self.path,
            "token": self.token.decode("ascii", "backslashreplace"),
            "depth": self.depth,
        }


class XsWatchCodec:
    """xenstore-migration.md "WATCH_DATA_EXTENDED"; spec "NCM_XS_WATCH"."""

    def decode(self, body: memoryview) -> XsWatch:
        r = _Reader(body)
        conn_id, wpath_len, token_len, depth, pad = r.unpack(
            XS_WATCH_HEADER, "header"
        )
        _check_zero(pad, "pad")
        _check_limit(wpath_len, XENSTORE_ABS_PATH_MAX + 1, "wpath-len")
        _check_limit(token_len, MAX_XS_TOKEN, "token-len")
        path = _xs_path(r.take(wpath_len, "wpath"), "wpath", absolute=False)
        token = _cstring(r.take(token_len, "token"), "token")
        r.end()
        value = XsWatch(conn_id, path, token, depth)
        value.validate()
        return value

    def encode(self, value: XsWatch) -> Buffers:
        value.validate()
        path = value.path.encode("ascii") + b"\0"
        token = value.token + b"\0"
        head = XS_WATCH_HEADER.pack(
            value.conn_id, len(path), len(token), value.depth, 0
        )
        return [head + path + token]


# -- NCM_XS_TRANSACTION (libxl): xenstore-migration.md TRANSACTION_DATA -------


@dataclasses.dataclass(frozen=True)
class XsTransaction:
    """A transaction open at pause (TRANSACTION_DATA)."""

    conn_id: int
    tx_id: int

    def validate(self) -> None:
        _check_range(self.conn_id, 1, 1 << 32, "conn-id")
        # Transaction id 0 means "no transaction" on the wire (xs_wire.h).
        _check_range(self.tx_id, 1, 1 << 32, "tx-id")

    def summary(self) -> dict[str, Any]:
        return {"conn_id": self.conn_id, "tx_id": self.tx_id}


class XsTransactionCodec:
    """xenstore-migration.md "TRANSACTION_DATA"."""

    def decode(self, body: memoryview) -> XsTransaction:
        r = _Reader(body)
        conn_id, tx_id = r.unpack(XS_TRANSACTION_BODY, "body")
        r.end()
        value = XsTransaction(conn_id, tx_id)
        value.validate()
        return value

    def encode(self, value: XsTransaction) -> Buffers:
        value.validate()
        return [XS_TRANSACTION_BODY.pack(value.conn_id, value.tx_id)]


# -- NCM_XS_NODE (libxl): xenstore-migration.md NODE_DATA ---------------------


@dataclasses.dataclass(frozen=True)
class XsPerm:
    """A node permission specifier: 'w', 'r', 'b' or 'n' for a domid."""

    perm: str
    domid: int
    stale: bool = False


@dataclasses.dataclass(frozen=True)
class XsNode:
    """A xenstore node (NODE_DATA).

    A committed node has ``conn_id`` 0. A node written or deleted inside a
    transaction open at pause has the transaction's ``conn_id`` and
    ``tx_id``; a deleted one has no perms, no value and ``access`` 0.
    ``perms[0]`` names the owner.
    """

    path: str
    value: bytes
    perms: tuple[XsPerm, ...]
    conn_id: int = 0
    tx_id: int = 0
    access: int = 0

    @property
    def deleted(self) -> bool:
        return not self.perms

    def validate(self) -> None:
        _check_xs_path(self.path, "path", absolute=True)
        _check_bytes(self.value, "value")
        _check_limit(len(self.value), MAX_XS_VALUE, "value-len")
        _check_limit(len(self.perms), MAX_XS_PERMS, "perm-count")
        _check_range(self.conn_id, 0, 1 << 32, "conn-id")
        _check_zero(
            self.access & ~(XS_ACCESS_READ | XS_ACCESS_WRITTEN),
            "access (undefined bits)",
        )
        for i, perm in enumerate(self.perms):
            if perm.perm not in tuple(XS_PERM_LETTERS):
                raise BodyError(
                    f"perm{i + 1}.perm: {perm.perm!r} is not one of "
                    f"{XS_PERM_LETTERS!r}"
                )
            _check_domid(perm.domid, f"perm{i + 1}.domid")
        if self.conn_id == 0:
            # Fields the design says to ignore outside a transaction are
            # required to be zero so that a body has one encoding.
            _check_zero(self.tx_id, "tx-id (committed node)")
            _check_zero(self.access, "access (committed node)")
            if not self.perms:
                raise BodyError("perm-count: a committed node has an owner")
        else:
            _check_range(self.tx_id, 1, 1 << 32, "tx-id")
            if not self.perms and (self.value or self.access):
                raise BodyError(
                    "value-len, access: must be 0 for a node deleted in a "
                    "transaction (perm-count 0)"
                )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "value_len": len(self.value),
            "owner": self.perms[0].domid if self.perms else None,
        }
        if self.conn_id:
            out.update(
                conn_id=self.conn_id,
                tx_id=self.tx_id,
                deleted=self.deleted,
            )
        return out


class XsNodeCodec:
    """xenstore-migration.md "NODE_DATA"; spec "NCM_XS_NODE"."""

    def decode(self, body: memoryview) -> XsNode:
        r = _Reader(body)
        conn_id, tx_id, path_len, value_len, access, nperms = r.unpack(
            XS_NODE_HEADER, "header"
        )
        _check_limit(path_len, XENSTORE_ABS_PATH_MAX + 1, "path-len")
        _check_limit(value_len, MAX_XS_VALUE, "value-len")
        _check_limit(nperms, MAX_XS_PERMS, "perm-count")
        perms = []
        for i in range(nperms):
            letter, flags, domid = r.unpack(XS_PERM, f"perm{i + 1}")
            _check_zero(
                flags & ~XS_PERM_STALE, f"perm{i + 1}.flags (undefined bits)"
            )
            perms.append(
                XsPerm(chr(letter), domid, bool(flags & XS_PERM_STALE))
            )
        path = _xs_path(r.take(path_len, "path"), "path", absolute=True)
        value = bytes(r.take(value_len, "value"))
        r.end()
        node = XsNode(path, value, tuple(perms), conn_id, tx_id, access)
        node.validate()
        return node

    def encode(self, value: XsNode) -> Buffers:
        value.validate()
        path = value.path.encode("ascii") + b"\0"
        head = XS_NODE_HEADER.pack(
            value.conn_id,
            value.tx_id,
            len(path),
            len(value.value),
            value.access,
            len(value.perms),
        )
        perms = b"".join(
            XS_PERM.pack(ord(p.perm), XS_PERM_STALE if p.stale else 0, p.domid)
            for p in value.perms
        )
        return [head + perms + path + value.value]


# -- NCM_PV_DEVICE (libxl) ----------------------------------------------------


def ring_size(nr_refs: int, slot_size: int) -> int:
    """Entries of a shared ring of ``nr_refs`` pages (io/ring.h
    __CONST_RING_SIZE: rounded down to a power of two)."""
    slots = (nr_refs * PAGE_SIZE - SRING_HEADER_SIZE) // slot_size
    return 1 << (slots.bit_length() - 1) if slots else 0


def _check_nr_refs(nrefs: int, field: str) -> None:
    # Rings are 2^ring-page-order pages (io/blkif.h "ring-page-order").
    if not 1 <= nrefs <= MAX_RING_REFS or nrefs & (nrefs - 1):
        raise BodyError(
            f"{field}.nr_refs: {nrefs} is not a power of two up to "
            f"{MAX_RING_REFS}"
        )


@dataclasses.dataclass(frozen=True)
class InflightRequest:
    """A request the backend consumed and had not answered at pause.

    ``seq`` is the ring index it was read at, ``id`` its protocol id (also
    inside ``data``), ``data`` the request slot as read from the ring.
    """

    seq: int
    id: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class PvRing:
    """One shared ring of a PV device and its backend's private indices."""

    kind: RingKind
    queue: int
    ring_refs: tuple[int, ...]
    frontend_port: int
    backend_port: int
    slot_size: int = 0
    req_cons: int = 0
    rsp_prod_pvt: int = 0
    inflight: tuple[InflightRequest, ...] = ()

    def validate(self, field: str) -> None:
        kind = _check_enum(RingKind, self.kind, f"{field}.kind")
        _check_range(self.queue, 0, 1 << 16, f"{field}.queue")
        nrefs = len(self.ring_refs)
        _check_nr_refs(nrefs, field)
        for i, ref in enumerate(self.ring_refs):
            _check_range(ref, 0, 1 << 32, f"{field}.ring_refs[{i}]")
        _check_port(self.frontend_port, f"{field}.frontend_port")
        if self.backend_port:
            # 0: the backend closed its end (quiesced by being unbound
            # from its driver), the frontend's port waits unbound.
            _check_port(self.backend_port, f"{field}.backend_port")
        _check_range(self.req_cons, 0, 1 << 32, f"{field}.req_cons")
        _check_range(self.rsp_prod_pvt, 0, 1 << 32, f"{field}.rsp_prod_pvt")
        if kind is RingKind.CONSOLE:
            # xencons_interface keeps its indices in the ring page itself.
            if (
                nrefs != 1
                or self.slot_size
                or self.req_cons
                or self.rsp_prod_pvt
                or self.inflight
            ):
                raise BodyError(
                    f"{field}: a console ring has 1 ref and slot_size, "
                    "req_cons, rsp_prod_pvt and nr_inflight 0"
                )
            return
        _check_range(
            self.slot_size, 4, MAX_SLOT_SIZE + 1, f"{field}.slot_size"
        )
        if self.slot_size % 4:
            raise BodyError(
                f"{field}.slot_size: {self.slot_size} not a multiple of 4"
            )
        size = ring_size(nrefs, self.slot_size)
        # One response per consumed request in every ring protocol here.
        outstanding = (self.req_cons - self.rsp_prod_pvt) % (1 << 32)
        if outstanding > size:
            raise BodyError(
                f"{field}: req_cons - rsp_prod_pvt = {outstanding} exceeds "
                f"the ring size {size}"
            )
        if len(self.inflight) != outstanding:
            raise BodyError(
                f"{field}.nr_inflight: {len(self.inflight)}, must be "
                f"req_cons - rsp_prod_pvt = {outstanding}"
            )
        previous_age = size + 1
        for i, req in enumerate(self.inflight):
            rfield = f"{field}.inflight[{i}]"
            _check_range(req.seq, 0, 1 << 32, f"{rfield}.seq")
            _check_range(req.id, 0, 1 << 64, f"{rfield}.id")
            # Consumed means before req_cons and within one ring of it;
            # oldest first makes the encoding unique.
            age = (self.req_cons - req.seq) % (1 << 32)
            if not 1 <= age <= size:
                raise BodyError(
                    f"{rfield}.seq: {req.seq} was not consumed before "
                    f"req_cons {self.req_cons} within one ring"
                )
            if age >= previous_age:
                raise BodyError(
                    f"{rfield}.seq: {req.seq} not newer than the previous "
                    "request (oldest first, no duplicates)"
                )
            previous_age = age
            _check_bytes(req.data, f"{rfield}.data")
            if len(req.data) != self.slot_size:
                raise BodyError(
                    f"{rfield}.data: {len(req.data)} octets, slot_size is "
                    f"{self.slot_size}"
                )


@dataclasses.dataclass(frozen=True)
class PvDevice:
    """A PV device's backend state (spec "NCM_PV_DEVICE").

    ``rings`` are ordered by (queue, kind) with no duplicate; a device that
    has not connected yet has none.
    """

    kind: DeviceKind
    devid: int
    backend_domid: int
    frontend_domid: int
    backend_state: XenbusState
    frontend_state: XenbusState
    frontend_path: str
    backend_path: str
    rings: tuple[PvRing, ...] = ()

    def validate(self) -> None:
        kind = _check_enum(DeviceKind, self.kind, "kind")
        _check_range(self.devid, 0, 1 << 32, "devid")
        _check_domid(self.backend_domid, "backend_domid")
        _check_domid(self.frontend_domid, "frontend_domid", guest=True)
        if self.backend_domid == self.frontend_domid:
            raise BodyError("backend_domid: is the guest itself")
        _check_enum(XenbusState, self.backend_state, "backend_state")
        _check_enum(XenbusState, self.frontend_state, "frontend_state")
        _check_xs_path(self.frontend_path, "frontend_path", absolute=True)
        _check_xs_path(self.backend_path, "backend_path", absolute=True)
        _check_limit(len(self.rings), MAX_PV_RINGS, "nr_rings")
        allowed = DEVICE_RINGS[kind]
        keys = []
        for i, ring in enumerate(self.rings):
            ring.validate(f"rings[{i}]")
            if ring.kind not in allowed:
                raise BodyError(
                    f"rings[{i}].kind: {RingKind(ring.kind).name} is not a "
                    f"ring of a {kind.name}"
                )
            keys.append(ring.queue << 8 | ring.kind)
        _check_ascending(keys, "rings (queue, kind)")

    def summary(self) -> dict[str, Any]:
        return {
            "kind": DeviceKind(self.kind).name.lower(),
            "devid": self.devid,
            "backend_domid": self.backend_domid,
            "backend_state": XenbusState(self.backend_state).name,
            "frontend_path": self.frontend_path,
            "rings": len(self.rings),
            "inflight": sum(len(r.inflight) for r in self.rings),
        }


class PvDeviceCodec:
    """Spec "NCM_PV_DEVICE"."""

    def decode(self, body: memoryview) -> PvDevice:
        r = _Reader(body)
        (
            version,
            devid,
            bdomid,
            fdomid,
            kind,
            bstate,
            fstate,
            rsv0,
            nrings,
            fpath_len,
            bpath_len,
            rsv1,
        ) = r.unpack(PV_DEVICE_HEADER, "header")
        _check_version(version)
        _check_zero(rsv0, "reserved (octet 15)")
        _check_zero(rsv1, "reserved (octets 22-23)")
        kind = _check_enum(DeviceKind, kind, "kind")
        bstate = _check_enum(XenbusState, bstate, "backend_state")
        fstate = _check_enum(XenbusState, fstate, "frontend_state")
        _check_limit(nrings, MAX_PV_RINGS, "nr_rings")
        _check_limit(fpath_len, XENSTORE_ABS_PATH_MAX + 1, "frontend_path_len")
        _check_limit(bpath_len, XENSTORE_ABS_PATH_MAX + 1, "backend_path_len")
        rings = tuple(self._ring(r, f"rings[{i}]") for i in range(nrings))
        fpath = _xs_path(
            r.take(fpath_len, "frontend_path"), "frontend_path", absolute=True
        )
        bpath = _xs_path(
            r.take(bpath_len, "backend_path"), "backend_path", absolute=True
        )
        r.end()
        value = PvDevice(
            kind, devid, bdomid, fdomid, bstate, fstate, fpath, bpath, rings
        )
        value.validate()
        return value

    @staticmethod
    def _ring(r: _Reader, field: str) -> PvRing:
        (
            kind,
            nrefs,
            queue,
            slot_size,
            rsv0,
            fport,
            bport,
            req_cons,
            rsp_prod_pvt,
            ninflight,
            rsv1,
        ) = r.unpack(PV_RING_HEADER, field)
        kind = _check_enum(RingKind, kind, f"{field}.kind")
        _check_zero(rsv0, f"{field}.reserved (octets 6-7)")
        _check_zero(rsv1, f"{field}.reserved (octets 28-31)")
        _check_nr_refs(nrefs, field)
        refs = r.array(U32_DTYPE, nrefs, f"{field}.ring_refs")
        r.pad(f"{field}.ring_refs padding")
        # Bound the in-flight count by the ring before reading any of it.
        if kind is RingKind.CONSOLE or not 4 <= slot_size <= MAX_SLOT_SIZE:
            limit = 0
        else:
            limit = ring_size(nrefs, slot_size)
        _check_limit(ninflight, limit, f"{field}.nr_inflight")
        inflight = []
        for i in range(ninflight):
            rfield = f"{field}.inflight[{i}]"
            seq, rsv, req_id = r.unpack(PV_INFLIGHT_HEADER, rfield)
            _check_zero(rsv, f"{rfield}.reserved")
            data = bytes(r.take(slot_size, f"{rfield}.data"))
            r.pad(f"{rfield}.data padding")
            inflight.append(InflightRequest(seq, req_id, data))
        return PvRing(
            kind=kind,
            queue=queue,
            ring_refs=tuple(int(x) for x in refs),
            frontend_port=fport,
            backend_port=bport,
            slot_size=slot_size,
            req_cons=req_cons,
            rsp_prod_pvt=rsp_prod_pvt,
            inflight=tuple(inflight),
        )

    def encode(self, value: PvDevice) -> Buffers:
        value.validate()
        fpath = value.frontend_path.encode("ascii") + b"\0"
        bpath = value.backend_path.encode("ascii") + b"\0"
        parts = [
            PV_DEVICE_HEADER.pack(
                RECORD_VERSION,
                value.devid,
                value.backend_domid,
                value.frontend_domid,
                value.kind,
                value.backend_state,
                value.frontend_state,
                0,
                len(value.rings),
                len(fpath),
                len(bpath),
                0,
            )
        ]
        for ring in value.rings:
            refs = struct.pack(f"<{len(ring.ring_refs)}I", *ring.ring_refs)
            parts += [
                PV_RING_HEADER.pack(
                    ring.kind,
                    len(ring.ring_refs),
                    ring.queue,
                    ring.slot_size,
                    0,
                    ring.frontend_port,
                    ring.backend_port,
                    ring.req_cons,
                    ring.rsp_prod_pvt,
                    len(ring.inflight),
                    0,
                ),
                refs + _pad8(len(refs)),
            ]
            for req in ring.inflight:
                parts += [
                    PV_INFLIGHT_HEADER.pack(req.seq, 0, req.id),
                    req.data + _pad8(len(req.data)),
                ]
        parts += [fpath, bpath]
        return [b"".join(parts)]


# -- Record tables -----------------------------------------------------------


def _align8(size: int) -> int:
    return size + (-size % 8)


def _max_ring_length() -> int:
    inflight = max(
        ring_size(MAX_RING_REFS, slot)
        * (PV_INFLIGHT_HEADER.size + _align8(slot))
        for slot in range(4, MAX_SLOT_SIZE + 1, 4)
    )
    refs = _align8(4 * MAX_RING_REFS)
    return PV_RING_HEADER.size + refs + inflight


# Largest valid body of each record: the framing refuses a longer one
# before it allocates (spec "Limits").
MAX_LENGTH = {
    "NCM_SHARED_INFO": SHARED_INFO_HEADER.size
    + PAGE_SIZE
    + VCPU_INFO_ENTRY.size * HVM_MAX_VCPUS,
    "NCM_EVENT_CHANNELS": EVTCHN_HEADER.size
    + FIFO_VCPU_ENTRY.size * HVM_MAX_VCPUS
    + GFN.size * EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES
    + PORT_DTYPE.itemsize * (EVTCHN_FIFO_NR_CHANNELS - 1),
    "NCM_VCPU_PV": VCPU_PV_HEADER.size + VCPU_PV_ENTRY.size * HVM_MAX_VCPUS,
    "NCM_GRANT_TABLE": GNTTAB_HEADER.size
    + (GFN.size + PAGE_SIZE) * (MAX_GRANT_FRAMES + MAX_GRANT_STATUS_FRAMES),
    "NCM_DOMAIN": DOMAIN_HEADER.size + 2 * MAX_BACKEND_DOMAINS,
    "NCM_XS_CONNECTION": _align8(
        XS_CONNECTION_HEADER.size + MAX_XS_IN_DATA + MAX_XS_OUT_DATA
    )
    + U64.size,
    "NCM_XS_WATCH": XS_WATCH_HEADER.size
    + XENSTORE_ABS_PATH_MAX
    + 1
    + MAX_XS_TOKEN,
    "NCM_XS_TRANSACTION": XS_TRANSACTION_BODY.size,
    "NCM_XS_NODE": XS_NODE_HEADER.size
    + XS_PERM.size * MAX_XS_PERMS
    + XENSTORE_ABS_PATH_MAX
    + 1
    + MAX_XS_VALUE,
    "NCM_PV_DEVICE": PV_DEVICE_HEADER.size
    + MAX_PV_RINGS * _max_ring_length()
    + 2 * (XENSTORE_ABS_PATH_MAX + 1),
}

# Value type of each record, for readers of the tables (inspect, tests).
VALUE_TYPES: dict[str, type] = {
    "NCM_SHARED_INFO": SharedInfo,
    "NCM_EVENT_CHANNELS": EventChannels,
    "NCM_GRANT_TABLE": GrantTable,
    "NCM_VCPU_PV": VcpuPv,
    "NCM_DOMAIN": NcmDomain,
    "NCM_XS_CONNECTION": XsConnection,
    "NCM_XS_WATCH": XsWatch,
    "NCM_XS_TRANSACTION": XsTransaction,
    "NCM_XS_NODE": XsNode,
    "NCM_PV_DEVICE": PvDevice,
}


def _row(
    rtype: int, name: str, layer: str, codec: Callable[[], Any]
) -> RecordType:
    return RecordType(rtype, name, layer, codec(), MAX_LENGTH[name])


LIBXC_RECORDS: list[RecordType] = [
    _row(
        REC_TYPE_NCM_SHARED_INFO, "NCM_SHARED_INFO", "libxc", SharedInfoCodec
    ),
    _row(
        REC_TYPE_NCM_EVENT_CHANNELS,
        "NCM_EVENT_CHANNELS",
        "libxc",
        EventChannelsCodec,
    ),
    _row(
        REC_TYPE_NCM_GRANT_TABLE, "NCM_GRANT_TABLE", "libxc", GrantTableCodec
    ),
    _row(REC_TYPE_NCM_VCPU_PV, "NCM_VCPU_PV", "libxc", VcpuPvCodec),
]

LIBXL_RECORDS: list[RecordType] = [
    _row(REC_TYPE_NCM_DOMAIN, "NCM_DOMAIN", "libxl", NcmDomainCodec),
    _row(
        REC_TYPE_NCM_XS_CONNECTION,
        "NCM_XS_CONNECTION",
        "libxl",
        XsConnectionCodec,
    ),
    _row(REC_TYPE_NCM_XS_WATCH, "NCM_XS_WATCH", "libxl", XsWatchCodec),
    _row(
        REC_TYPE_NCM_XS_TRANSACTION,
        "NCM_XS_TRANSACTION",
        "libxl",
        XsTransactionCodec,
    ),
    _row(REC_TYPE_NCM_XS_NODE, "NCM_XS_NODE", "libxl", XsNodeCodec),
    _row(REC_TYPE_NCM_PV_DEVICE, "NCM_PV_DEVICE", "libxl", PvDeviceCodec),
]
