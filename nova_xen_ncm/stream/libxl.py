"""The libxl domain image format, revision 2, as data.

Follows Xen's ``docs/specs/libxl-migration-stream.pandoc`` (cited below as
"libxl spec"); struct layouts match
``tools/libs/light/libxl_sr_stream_format.h``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

from nova_xen_ncm.stream import codecs
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Buffers
from nova_xen_ncm.stream.records import RecordType

LAYER = "libxl"

# libxl spec "Header": always big-endian.
HDR = struct.Struct("!QII")
HDR_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
HDR_VERSION = 2
HDR_OPT_BIG_ENDIAN = 0x1
HDR_OPT_LEGACY = 0x2
HDR_OPT_RESERVED = 0xFFFFFFFC

RHDR = struct.Struct("<II")
# libxl reads records up to the same limit as libxc.
REC_LENGTH_MAX = 128 << 20

END = 0x00
LIBXC_CONTEXT = 0x01
EMULATOR_XENSTORE_DATA = 0x02
EMULATOR_CONTEXT = 0x03
CHECKPOINT_END = 0x04
CHECKPOINT_STATE = 0x05

# libxl spec "Emulator Records".
EMULATOR_HDR = struct.Struct("<II")
EMULATOR_UNKNOWN = 0
EMULATOR_QEMU_TRADITIONAL = 1
EMULATOR_QEMU_UPSTREAM = 2
EMULATORS = {
    EMULATOR_UNKNOWN: "unknown",
    EMULATOR_QEMU_TRADITIONAL: "qemu-traditional",
    EMULATOR_QEMU_UPSTREAM: "qemu-upstream",
}

# libxl spec "CHECKPOINT_STATE" (COLO control ids).
CHECKPOINT_STATE_HDR = struct.Struct("<I")
CHECKPOINT_NEW = 0
CHECKPOINT_SVM_SUSPENDED = 1
CHECKPOINT_SVM_READY = 2
CHECKPOINT_SVM_RESUMED = 3


class Header(NamedTuple):
    version: int
    options: int

    @property
    def legacy(self) -> bool:
        return bool(self.options & HDR_OPT_LEGACY)


class EmulatorContext(NamedTuple):
    emulator_id: int
    index: int
    context: memoryview

    @property
    def emulator(self) -> str:
        return EMULATORS[self.emulator_id]

    def summary(self) -> dict[str, Any]:
        return {
            "emulator": self.emulator,
            "index": self.index,
            "bytes": len(self.context),
        }


class EmulatorXenstoreData(NamedTuple):
    emulator_id: int
    index: int
    pairs: Sequence[tuple[bytes, bytes]]

    @property
    def emulator(self) -> str:
        return EMULATORS[self.emulator_id]

    def summary(self) -> dict[str, Any]:
        return {
            "emulator": self.emulator,
            "index": self.index,
            "keys": len(self.pairs),
        }


class HeaderCodec:
    """The stream header (libxl spec "Header")."""

    def decode(self, body: memoryview) -> Header:
        ident, version, options = HDR.unpack(body)
        if ident != HDR_IDENT:
            raise BodyError(f"bad ident {ident:#x}, expected {HDR_IDENT:#x}")
        if version != HDR_VERSION:
            raise BodyError(f"unsupported version {version}")
        if options & HDR_OPT_RESERVED:
            raise BodyError(f"reserved option bits {options:#x}")
        if options & HDR_OPT_BIG_ENDIAN:
            raise BodyError("big-endian streams are not supported")
        return Header(version, options)

    def encode(self, value: Header) -> Buffers:
        if value.version != HDR_VERSION or value.options & ~HDR_OPT_LEGACY:
            raise BodyError(f"cannot write {value}")
        return [HDR.pack(HDR_IDENT, HDR_VERSION, value.options)]


def _emulator_header(body: memoryview) -> tuple[int, int]:
    if len(body) < EMULATOR_HDR.size:
        raise BodyError("shorter than the emulator header")
    emulator_id, index = EMULATOR_HDR.unpack_from(body)
    if emulator_id not in EMULATORS:
        raise BodyError(f"unknown emulator id {emulator_id:#x}")
    return emulator_id, index


def _pack_emulator_header(emulator_id: int, index: int) -> bytes:
    if emulator_id not in EMULATORS:
        raise BodyError(f"unknown emulator id {emulator_id!r}")
    try:
        return EMULATOR_HDR.pack(emulator_id, index)
    except struct.error as exc:
        raise BodyError(str(exc)) from None


class EmulatorContextCodec:
    """EMULATOR_CONTEXT: emulator header then an opaque blob."""

    def decode(self, body: memoryview) -> EmulatorContext:
        emulator_id, index = _emulator_header(body)
        return EmulatorContext(emulator_id, index, body[EMULATOR_HDR.size :])

    def encode(self, value: EmulatorContext) -> Buffers:
        head = _pack_emulator_header(value.emulator_id, value.index)
        return [head, memoryview(value.context).cast("B")]


class EmulatorXenstoreDataCodec:
    """EMULATOR_XENSTORE_DATA: emulator header, then NUL-terminated
    (key, value) string pairs."""

    def decode(self, body: memoryview) -> EmulatorXenstoreData:
        emulator_id, index = _emulator_header(body)
        data = bytes(body[EMULATOR_HDR.size :])
        pairs: list[tuple[bytes, bytes]] = []
        if data:
            if data[-1] != 0:
                raise BodyError("xenstore data is not NUL terminated")
            parts = data[:-1].split(b"\0")
            if len(parts) % 2:
                raise BodyError("xenstore data has a key without a value")
            pairs = list(zip(parts[0::2], parts[1::2], strict=True))
        return EmulatorXenstoreData(emulator_id, index, pairs)

    def encode(self, value: EmulatorXenstoreData) -> Buffers:
        head = _pack_emulator_header(value.emulator_id, value.index)
        parts = [head]
        for key, val in value.pairs:
            if not isinstance(key, bytes) or not isinstance(val, bytes):
                raise BodyError("xenstore keys and values are bytes")
            if b"\0" in key or b"\0" in val:
                raise BodyError("xenstore keys and values cannot hold NUL")
            parts += [key, b"\0", val, b"\0"]
        return [b"".join(parts)]


class CheckpointStateCodec:
    """CHECKPOINT_STATE: a control id (libxl writes the 4-octet struct;
    the spec draws it padded to 8, so trailing zero padding is accepted)."""

    def decode(self, body: memoryview) -> int:
        if len(body) not in (4, 8):
            raise BodyError(f"body must be 4 octets, has {len(body)}")
        if any(body[4:]):
            raise BodyError("padding after control_id is not zero")
        (control_id,) = CHECKPOINT_STATE_HDR.unpack_from(body)
        if control_id > CHECKPOINT_SVM_RESUMED:
            raise BodyError(f"unknown control_id {control_id:#x}")
        return control_id

    def encode(self, value: int) -> Buffers:
        if value not in range(CHECKPOINT_SVM_RESUMED + 1):
            raise BodyError(f"unknown control_id {value!r}")
        return [CHECKPOINT_STATE_HDR.pack(value)]


def _row(rtype: int, name: str, codec: Any, max_length: int) -> RecordType:
    return RecordType(rtype, name, LAYER, codec, max_length)


XEN_ROWS: list[RecordType] = [
    _row(END, "END", codecs.Empty(), 0),
    # Empty: the libxc stream follows inline (libxl spec "LIBXC_CONTEXT").
    _row(LIBXC_CONTEXT, "LIBXC_CONTEXT", codecs.Empty(), 0),
    _row(
        EMULATOR_XENSTORE_DATA,
        "EMULATOR_XENSTORE_DATA",
        EmulatorXenstoreDataCodec(),
        1 << 20,
    ),
    _row(
        EMULATOR_CONTEXT,
        "EMULATOR_CONTEXT",
        EmulatorContextCodec(),
        REC_LENGTH_MAX,
    ),
    _row(CHECKPOINT_END, "CHECKPOINT_END", codecs.Empty(), 0),
    _row(CHECKPOINT_STATE, "CHECKPOINT_STATE", CheckpointStateCodec(), 8),
]
