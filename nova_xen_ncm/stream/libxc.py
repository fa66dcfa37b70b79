"""The libxc domain image format, revision 3, as data.

Follows Xen's ``docs/specs/libxc-migration-stream.pandoc`` (cited below as
"libxc spec" with its section names); struct layouts match
``tools/libs/guest/xg_sr_stream_format.h``. x86 HVM guests are what the
project migrates, but every record type of the spec has a row so that any
x86 stream written by Xen decodes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from nova_xen_ncm.stream import codecs
from nova_xen_ncm.stream import hvm
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Buffers
from nova_xen_ncm.stream.records import RecordType

LAYER = "libxc"

# libxc spec "Image Header": always big-endian.
IHDR = struct.Struct("!QIIHHI")
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_VERSIONS = (2, 3)  # a v3 reader restores v2 ("v3 compat with v2")
IHDR_OPT_BIG_ENDIAN = 0x0001
IHDR_OPT_RESERVED = 0xFFFE

# libxc spec "Domain Header".
DHDR = struct.Struct("<IHHII")
DOMAIN_X86_PV = 1
DOMAIN_X86_HVM = 2
DOMAIN_TYPES = {DOMAIN_X86_PV: "x86 PV", DOMAIN_X86_HVM: "x86 HVM"}
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# libxc spec "Records": the record header, and the restorer's own limit on
# a body (REC_LENGTH_MAX in xg_sr_stream_format.h).
RHDR = struct.Struct("<II")
REC_LENGTH_MAX = 128 << 20

END = 0x00
PAGE_DATA = 0x01
X86_PV_INFO = 0x02
X86_PV_P2M_FRAMES = 0x03
X86_PV_VCPU_BASIC = 0x04
X86_PV_VCPU_EXTENDED = 0x05
X86_PV_VCPU_XSAVE = 0x06
SHARED_INFO = 0x07
X86_TSC_INFO = 0x08
HVM_CONTEXT = 0x09
HVM_PARAMS = 0x0A
TOOLSTACK = 0x0B
X86_PV_VCPU_MSRS = 0x0C
VERIFY = 0x0D
CHECKPOINT = 0x0E
CHECKPOINT_DIRTY_PFN_LIST = 0x0F
STATIC_DATA_END = 0x10
X86_CPUID_POLICY = 0x11
X86_MSR_POLICY = 0x12

# Records a version 2 image cannot contain (libxc spec "v3 compat with v2").
V3_ONLY = frozenset({STATIC_DATA_END, X86_CPUID_POLICY, X86_MSR_POLICY})
# Memory records, which a v3 image must precede with STATIC_DATA_END and
# whose first one marks where it is inferred in a v2 image (same section;
# Xen's restore refuses them otherwise: "No STATIC_DATA_END seen").
AFTER_STATIC_DATA = frozenset({PAGE_DATA, X86_PV_P2M_FRAMES})


class ImageHeader(NamedTuple):
    version: int
    options: int


class DomainHeader(NamedTuple):
    type: int
    page_shift: int
    xen_major: int
    xen_minor: int

    @property
    def type_name(self) -> str:
        return DOMAIN_TYPES.get(self.type, f"type {self.type:#x}")


class ImageHeaderCodec:
    """The image header (libxc spec "Image Header")."""

    def decode(self, body: memoryview) -> ImageHeader:
        marker, ident, version, options, res1, res2 = IHDR.unpack(body)
        if marker != IHDR_MARKER:
            raise BodyError(f"bad marker {marker:#x} (legacy image?)")
        if ident != IHDR_ID:
            raise BodyError(f"bad id {ident:#x}, expected {IHDR_ID:#x}")
        if version not in IHDR_VERSIONS:
            raise BodyError(f"unsupported version {version}")
        if options & IHDR_OPT_RESERVED or res1 or res2:
            raise BodyError("reserved bits set in the image header")
        if options & IHDR_OPT_BIG_ENDIAN:
            raise BodyError("big-endian images are not supported")
        return ImageHeader(version, options)

    def encode(self, value: ImageHeader) -> Buffers:
        if value.version not in IHDR_VERSIONS or value.options:
            raise BodyError(f"cannot write {value}")
        return [IHDR.pack(IHDR_MARKER, IHDR_ID, value.version, 0, 0, 0)]


class DomainHeaderCodec:
    """The domain header (libxc spec "Domain Header"); x86 pages only."""

    def decode(self, body: memoryview) -> DomainHeader:
        dtype, page_shift, res1, major, minor = DHDR.unpack(body)
        if dtype not in DOMAIN_TYPES:
            raise BodyError(f"unknown domain type {dtype:#x}")
        if res1:
            raise BodyError(f"reserved field is {res1:#x}")
        if page_shift != PAGE_SHIFT:
            raise BodyError(f"page_shift {page_shift}, expected {PAGE_SHIFT}")
        return DomainHeader(dtype, page_shift, major, minor)

    def encode(self, value: DomainHeader) -> Buffers:
        if value.type not in DOMAIN_TYPES or value.page_shift != PAGE_SHIFT:
            raise BodyError(f"cannot write {value}")
        try:
            return [DHDR.pack(value.type, PAGE_SHIFT, 0, *value[2:])]
        except struct.error as exc:
            raise BodyError(str(exc)) from None


# --- PAGE_DATA (libxc spec "PAGE_DATA") -----------------------------------

PAGE_DATA_HDR = struct.Struct("<II")
PFN_MASK = (1 << 52) - 1
PFN_RESERVED_MASK = ((1 << 60) - 1) & ~PFN_MASK
TYPE_SHIFT = 60

# XEN_DOMCTL_PFINFO_* page types (libxc spec table "Page Types"), as the
# 4-bit value found in bits 60-63 of a pfn entry.
NOTAB = 0x0
L1TAB = 0x1
L2TAB = 0x2
L3TAB = 0x3
L4TAB = 0x4
L1TAB_PIN = 0x9
L2TAB_PIN = 0xA
L3TAB_PIN = 0xB
L4TAB_PIN = 0xC
BROKEN = 0xD
XALLOC = 0xE
XTAB = 0xF
PAGE_TYPES = {
    NOTAB: "NOTAB",
    L1TAB: "L1TAB",
    L2TAB: "L2TAB",
    L3TAB: "L3TAB",
    L4TAB: "L4TAB",
    L1TAB_PIN: "L1TAB_PIN",
    L2TAB_PIN: "L2TAB_PIN",
    L3TAB_PIN: "L3TAB_PIN",
    L4TAB_PIN: "L4TAB_PIN",
    BROKEN: "BROKEN",
    XALLOC: "XALLOC",
    XTAB: "XTAB",
}
# Lookup tables indexed by the 4-bit type: is it defined, does it carry a
# page of data ("PFNs with type BROKEN, XALLOC, or XTAB do not have any
# corresponding page_data").
_VALID_TYPE = np.array([t in PAGE_TYPES for t in range(16)])
_HAS_DATA = np.array([t in PAGE_TYPES and t < BROKEN for t in range(16)])


def page_type_name(ptype: int) -> str:
    return PAGE_TYPES.get(ptype, f"RESERVED_{ptype:#x}")


def carries_data(types: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries whose page contents are in the record."""
    return _HAS_DATA[np.asarray(types, dtype=np.uint8)]


@dataclasses.dataclass
class PageData:
    """A batch of pages: one PAGE_DATA record.

    ``pfns`` (uint64) and ``types`` (uint8, the XEN_DOMCTL_PFINFO_* value)
    are parallel arrays. ``data`` holds the contents of the pages whose type
    carries data, in pfn order: after decoding it is one read-only view of
    the record body; for encoding it may also be a sequence of buffers
    (e.g. one view per mapped guest page), which are not copied.
    """

    pfns: np.ndarray
    types: np.ndarray
    data: Any

    @property
    def count(self) -> int:
        return len(self.pfns)

    @property
    def has_data(self) -> np.ndarray:
        return carries_data(self.types)

    def pages(self) -> Iterator[tuple[int, int, memoryview]]:
        """(pfn, type, contents) of each page that carries data."""
        view = memoryview(self.data)
        index = 0
        entries = zip(self.pfns, self.types, self.has_data, strict=True)
        for pfn, ptype, present in entries:
            if present:
                yield int(pfn), int(ptype), view[index : index + PAGE_SIZE]
                index += PAGE_SIZE


class PageDataCodec:
    """PAGE_DATA: count, reserved, pfn[count], page_data[N]."""

    @staticmethod
    def head_size(body: memoryview, length: int) -> int:
        """Octets of header and pfns of a body of ``length`` octets that
        begins with ``body`` (at least the PAGE_DATA header)."""
        if length < PAGE_DATA_HDR.size or len(body) < PAGE_DATA_HDR.size:
            raise BodyError("shorter than the PAGE_DATA header")
        count, reserved = PAGE_DATA_HDR.unpack_from(body)
        if reserved:
            raise BodyError(f"reserved field is {reserved:#x}")
        if count == 0:
            raise BodyError("count is 0 (it is strictly > 0)")
        pfn_end = PAGE_DATA_HDR.size + 8 * count
        if pfn_end > length:
            raise BodyError(
                f"count {count} needs {pfn_end} octets of header and pfns, "
                f"body has {length}"
            )
        return pfn_end

    def decode_head(
        self, head: memoryview, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """pfns and types of a body of ``length`` octets from its header
        and pfns alone (``head_size`` octets), checked as :meth:`decode`
        does: the page contents can then be read straight into place."""
        pfn_end = self.head_size(head, length)
        raw = np.frombuffer(head[PAGE_DATA_HDR.size : pfn_end], dtype="<u8")
        return self._entries(raw, pfn_end, length)

    def decode(self, body: memoryview) -> PageData:
        pfn_end = self.head_size(body, len(body))
        raw = np.frombuffer(body[PAGE_DATA_HDR.size : pfn_end], dtype="<u8")
        pfns, types = self._entries(raw, pfn_end, len(body))
        return PageData(pfns, types, body[pfn_end:])

    @staticmethod
    def _entries(
        raw: np.ndarray, pfn_end: int, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        count = len(raw)
        if (raw & PFN_RESERVED_MASK).any():
            index = int(np.flatnonzero(raw & PFN_RESERVED_MASK)[0])
            raise BodyError(
                f"reserved bits set in pfn[{index}]: {int(raw[index]):#018x}"
            )
        types = (raw >> TYPE_SHIFT).astype(np.uint8)
        invalid = ~_VALID_TYPE[types]
        if invalid.any():
            index = int(np.flatnonzero(invalid)[0])
            raise BodyError(
                f"pfn[{index}] has invalid page type {int(types[index]):#x}"
            )
        with_data = int(np.count_nonzero(_HAS_DATA[types]))
        expected = pfn_end + with_data * PAGE_SIZE
        if length != expected:
            raise BodyError(
                f"{count} pfns with {with_data} pages of data need "
                f"{expected} octets, body has {length}"
            )
        return raw & PFN_MASK, types

    def encode(self, value: PageData) -> Buffers:
        pfns = np.asarray(value.pfns, dtype=np.uint64)
        types = np.asarray(value.types, dtype=np.uint64)
        if pfns.ndim != 1 or pfns.shape != types.shape or not len(pfns):
            raise BodyError("needs equal, non-empty pfn and type arrays")
        if (pfns & ~np.uint64(PFN_MASK)).any():
            raise BodyError("a pfn does not fit in 52 bits")
        if (types > 15).any() or not _VALID_TYPE[types.astype(np.uint8)].all():
            raise BodyError("invalid page type")
        data = value.data
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = [data]
        views = [memoryview(b).cast("B") for b in data]
        size = sum(v.nbytes for v in views)
        with_data = int(np.count_nonzero(_HAS_DATA[types.astype(np.uint8)]))
        if size != with_data * PAGE_SIZE:
            raise BodyError(
                f"{with_data} pages carry data, got {size} octets of data"
            )
        entries = (pfns | (types << np.uint64(TYPE_SHIFT))).astype("<u8")
        head = PAGE_DATA_HDR.pack(len(pfns), 0) + entries.tobytes()
        return [head, *(v for v in views if v.nbytes)]


# --- HVM_CONTEXT (libxc spec "HVM_CONTEXT"; xen/include/public/hvm/save.h) -

HVM_SAVE_DESCRIPTOR = struct.Struct("<HHI")


class HvmSaveDescriptor(NamedTuple):
    """One ``struct hvm_save_descriptor`` and the payload that follows it."""

    typecode: int
    instance: int
    data: memoryview

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def type_name(self) -> str:
        return hvm.save_type_name(self.typecode)


@dataclasses.dataclass
class HvmContext:
    """The HVM context blob, split into its save descriptors.

    ``descriptors`` ends with the END descriptor (typecode 0, length 0)
    that terminates the blob in Xen's own format.
    """

    descriptors: Sequence[HvmSaveDescriptor]

    def summary(self) -> dict[str, Any]:
        names: dict[str, int] = {}
        for desc in self.descriptors[:-1]:
            names[desc.type_name] = names.get(desc.type_name, 0) + 1
        return {"descriptors": len(self.descriptors) - 1, "types": names}


class HvmContextCodec:
    """HVM_CONTEXT: a sequence of save descriptors ending with END."""

    def decode(self, body: memoryview) -> HvmContext:
        if not len(body):
            raise BodyError("HVM context is empty")
        descriptors = []
        offset = 0
        while True:
            if offset + HVM_SAVE_DESCRIPTOR.size > len(body):
                raise BodyError(
                    f"save descriptor at {offset} runs past the body "
                    "(no END descriptor)"
                )
            typecode, instance, length = HVM_SAVE_DESCRIPTOR.unpack_from(
                body, offset
            )
            offset += HVM_SAVE_DESCRIPTOR.size
            if length > len(body) - offset:
                raise BodyError(
                    f"save descriptor {hvm.save_type_name(typecode)} claims "
                    f"{length} octets, {len(body) - offset} left"
                )
            descriptors.append(
                HvmSaveDescriptor(
                    typecode, instance, body[offset : offset + length]
                )
            )
            offset += length
            if typecode == hvm.SAVE_END:
                break
        if length or instance:
            raise BodyError("END save descriptor is not all zero")
        if offset != len(body):
            raise BodyError(
                f"{len(body) - offset} octets after the END save descriptor"
            )
        return HvmContext(descriptors)

    def encode(self, value: HvmContext) -> Buffers:
        descriptors = list(value.descriptors)
        if not descriptors or descriptors[-1][:2] != (hvm.SAVE_END, 0):
            raise BodyError("save descriptors must end with END")
        out: Buffers = []
        for typecode, instance, data in descriptors:
            view = memoryview(data).cast("B")
            if typecode == hvm.SAVE_END and view.nbytes:
                raise BodyError("END save descriptor has a payload")
            try:
                out.append(
                    HVM_SAVE_DESCRIPTOR.pack(typecode, instance, view.nbytes)
                )
            except struct.error as exc:
                raise BodyError(f"bad save descriptor: {exc}") from None
            if view.nbytes:
                out.append(view)
        return out


# --- HVM_PARAMS (libxc spec "HVM_PARAMS") ---------------------------------

HVM_PARAMS_HDR = struct.Struct("<II")
HVM_PARAMS_ENTRY = struct.Struct("<QQ")


class HvmParam(NamedTuple):
    index: int
    value: int

    @property
    def name(self) -> str:
        return hvm.param_name(self.index)


class HvmParamsCodec:
    """HVM_PARAMS: count, reserved, then (index, value) pairs.

    A body of zero octets is accepted as no params (libxc spec "Errata" 1:
    Xen 4.6 to 4.8 wrote empty variable-sized records).
    """

    def decode(self, body: memoryview) -> list[HvmParam]:
        if not len(body):
            return []
        if len(body) < HVM_PARAMS_HDR.size:
            raise BodyError("shorter than the HVM_PARAMS header")
        count, reserved = HVM_PARAMS_HDR.unpack_from(body)
        if reserved:
            raise BodyError(f"reserved field is {reserved:#x}")
        expected = HVM_PARAMS_HDR.size + count * HVM_PARAMS_ENTRY.size
        if len(body) != expected:
            raise BodyError(
                f"count {count} needs {expected} octets, body has {len(body)}"
            )
        return [
            HvmParam(*entry)
            for entry in HVM_PARAMS_ENTRY.iter_unpack(
                body[HVM_PARAMS_HDR.size :]
            )
        ]

    def encode(self, value: Sequence[tuple[int, int]]) -> Buffers:
        params = list(value)
        try:
            parts = [HVM_PARAMS_HDR.pack(len(params), 0)]
            parts += [HVM_PARAMS_ENTRY.pack(i, v) for i, v in params]
        except (struct.error, TypeError, ValueError) as exc:
            raise BodyError(f"bad HVM param: {exc}") from None
        return [b"".join(parts)]


# --- x86 PV records and the fixed structs ---------------------------------


class X86PvInfo(NamedTuple):
    guest_width: int
    pt_levels: int


class _X86PvInfoCodec(codecs.Struct):
    """X86_PV_INFO (libxc spec "X86_PV_INFO")."""

    def decode(self, body: memoryview) -> X86PvInfo:
        info = super().decode(body)
        if info.guest_width not in (4, 8) or info.pt_levels not in (3, 4):
            raise BodyError(f"unsupported {info}")
        return info


@dataclasses.dataclass
class X86PvP2mFrames:
    start_pfn: int
    end_pfn: int
    p2m_pfns: np.ndarray


class X86PvP2mFramesCodec:
    """X86_PV_P2M_FRAMES (libxc spec "X86_PV_P2M_FRAMES")."""

    _hdr = struct.Struct("<II")

    def decode(self, body: memoryview) -> X86PvP2mFrames:
        if len(body) < self._hdr.size or len(body) % 8:
            raise BodyError(f"length {len(body)} is not 8 + 8 * n")
        start, end = self._hdr.unpack_from(body)
        pfns = np.frombuffer(body[self._hdr.size :], dtype="<u8")
        return X86PvP2mFrames(start, end, pfns)

    def encode(self, value: X86PvP2mFrames) -> Buffers:
        pfns = np.ascontiguousarray(value.p2m_pfns, dtype="<u8")
        try:
            head = self._hdr.pack(value.start_pfn, value.end_pfn)
        except struct.error as exc:
            raise BodyError(str(exc)) from None
        return [head, memoryview(pfns).cast("B")]


class X86PvVcpu(NamedTuple):
    vcpu_id: int
    context: memoryview


class X86PvVcpuCodec:
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: vcpu_id, reserved, blob."""

    _hdr = struct.Struct("<II")

    def decode(self, body: memoryview) -> X86PvVcpu:
        if len(body) < self._hdr.size:
            raise BodyError("shorter than the vcpu header")
        vcpu_id, reserved = self._hdr.unpack_from(body)
        if reserved:
            raise BodyError(f"reserved field is {reserved:#x}")
        return X86PvVcpu(vcpu_id, body[self._hdr.size :])

    def encode(self, value: X86PvVcpu) -> Buffers:
        try:
            head = self._hdr.pack(value.vcpu_id, 0)
        except struct.error as exc:
            raise BodyError(str(exc)) from None
        return [head, memoryview(value.context).cast("B")]


class X86TscInfo(NamedTuple):
    mode: int
    khz: int
    nsec: int
    incarnation: int


# xen_cpuid_leaf_t and xen_msr_entry_t (xen/include/public/arch-x86/xen.h).
CPUID_LEAF = np.dtype(
    [
        ("leaf", "<u4"),
        ("subleaf", "<u4"),
        ("a", "<u4"),
        ("b", "<u4"),
        ("c", "<u4"),
        ("d", "<u4"),
    ]
)
MSR_ENTRY = np.dtype([("idx", "<u4"), ("flags", "<u4"), ("val", "<u8")])

_MIB = 1 << 20


def _row(rtype: int, name: str, codec: Any, max_length: int) -> RecordType:
    return RecordType(rtype, name, LAYER, codec, max_length)


_PV_VCPU = X86PvVcpuCodec()

XEN_ROWS: list[RecordType] = [
    _row(END, "END", codecs.Empty(), 0),
    _row(PAGE_DATA, "PAGE_DATA", PageDataCodec(), REC_LENGTH_MAX),
    _row(
        X86_PV_INFO,
        "X86_PV_INFO",
        _X86PvInfoCodec(
            "BBHI", X86PvInfo, ("guest_width", "pt_levels", "_res1", "_res2")
        ),
        8,
    ),
    _row(
        X86_PV_P2M_FRAMES,
        "X86_PV_P2M_FRAMES",
        X86PvP2mFramesCodec(),
        16 * _MIB,
    ),
    _row(X86_PV_VCPU_BASIC, "X86_PV_VCPU_BASIC", _PV_VCPU, _MIB),
    _row(X86_PV_VCPU_EXTENDED, "X86_PV_VCPU_EXTENDED", _PV_VCPU, _MIB),
    _row(X86_PV_VCPU_XSAVE, "X86_PV_VCPU_XSAVE", _PV_VCPU, _MIB),
    _row(SHARED_INFO, "SHARED_INFO", codecs.Blob(exact=PAGE_SIZE), PAGE_SIZE),
    _row(
        X86_TSC_INFO,
        "X86_TSC_INFO",
        codecs.Struct(
            "IIQII",
            X86TscInfo,
            ("mode", "khz", "nsec", "incarnation", "_res1"),
        ),
        24,
    ),
    _row(HVM_CONTEXT, "HVM_CONTEXT", HvmContextCodec(), 16 * _MIB),
    _row(
        HVM_PARAMS,
        "HVM_PARAMS",
        HvmParamsCodec(),
        HVM_PARAMS_HDR.size + 4096 * HVM_PARAMS_ENTRY.size,
    ),
    _row(TOOLSTACK, "TOOLSTACK", codecs.Blob(), 16 * _MIB),
    _row(X86_PV_VCPU_MSRS, "X86_PV_VCPU_MSRS", _PV_VCPU, _MIB),
    _row(VERIFY, "VERIFY", codecs.Empty(), 0),
    _row(CHECKPOINT, "CHECKPOINT", codecs.Empty(), 0),
    _row(
        CHECKPOINT_DIRTY_PFN_LIST,
        "CHECKPOINT_DIRTY_PFN_LIST",
        codecs.Array("<u8"),
        REC_LENGTH_MAX,
    ),
    _row(STATIC_DATA_END, "STATIC_DATA_END", codecs.Empty(), 0),
    _row(
        X86_CPUID_POLICY,
        "X86_CPUID_POLICY",
        codecs.Array(CPUID_LEAF, min_count=1),
        _MIB,
    ),
    _row(
        X86_MSR_POLICY,
        "X86_MSR_POLICY",
        codecs.Array(MSR_ENTRY, min_count=1),
        _MIB,
    ),
]
