"""The ``xl`` save-file header that precedes a libxl stream in a file.

Not covered by a spec document: the layout is ``struct save_file_header``
of Xen's ``tools/xl/xl.h``, written by ``save_domain_core_writeconfig()``
(``tools/xl/xl_saverestore.c``) and read by ``create_domain()``
(``tools/xl/xl_vmcontrol.c``)::

    char     magic[32]           "Xen saved domain, xl format\\n \\0 \\r"
    uint32_t byteorder           0x01020304 in the writer's byte order
    uint32_t mandatory_flags     unknown flags => reject
    uint32_t optional_flags
    uint32_t optional_data_len
    optional data: uint32_t config_len, config_len octets of config, and
    anything after it is skipped by readers that do not know it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Buffers

LAYER = "xl"

MAGIC = b"Xen saved domain, xl format\n \0 \r"
HDR = struct.Struct("<32sIIII")
BYTEORDER = 0x01020304

MANDATORY_JSON = 1 << 0  # config is libxl JSON, not xl.cfg text
MANDATORY_STREAM_V2 = 1 << 1  # a libxl v2 stream follows, not libxc only
MANDATORY_KNOWN = MANDATORY_JSON | MANDATORY_STREAM_V2

CONFIG_LEN = struct.Struct("<I")
# Our limit on the optional data (a domain config is a few KiB).
OPTIONAL_DATA_MAX = 16 << 20


class Header(NamedTuple):
    mandatory_flags: int
    optional_flags: int
    config: bytes
    extra: bytes = b""

    @property
    def json(self) -> bool:
        return bool(self.mandatory_flags & MANDATORY_JSON)

    @property
    def stream_v2(self) -> bool:
        return bool(self.mandatory_flags & MANDATORY_STREAM_V2)


def parse_fixed(data: bytes | memoryview) -> tuple[int, int, int]:
    """Check the fixed part; return (mandatory, optional, optional_len)."""
    magic, byteorder, mandatory, optional, optlen = HDR.unpack(data)
    if magic != MAGIC:
        raise BodyError("bad xl save-file magic")
    if byteorder != BYTEORDER:
        raise BodyError(
            f"byte order {byteorder:#010x} is not little-endian "
            f"({BYTEORDER:#010x})"
        )
    if mandatory & ~MANDATORY_KNOWN:
        raise BodyError(
            f"unknown mandatory flags {mandatory & ~MANDATORY_KNOWN:#x}"
        )
    if optlen > OPTIONAL_DATA_MAX:
        raise BodyError(
            f"optional data of {optlen} octets exceeds {OPTIONAL_DATA_MAX}"
        )
    return mandatory, optional, optlen


def parse_optional(
    mandatory: int, optional: int, data: bytes | memoryview
) -> Header:
    """Split the optional data into the config and what follows it."""
    if not len(data):
        return Header(mandatory, optional, b"")
    if len(data) < CONFIG_LEN.size:
        raise BodyError("optional data too short for the config length")
    (config_len,) = CONFIG_LEN.unpack_from(data)
    end = CONFIG_LEN.size + config_len
    if end > len(data):
        raise BodyError(
            f"config of {config_len} octets overruns the {len(data)} octets "
            "of optional data"
        )
    return Header(
        mandatory,
        optional,
        bytes(data[CONFIG_LEN.size : end]),
        bytes(data[end:]),
    )


class HeaderCodec:
    """The whole header: the fixed part and its optional data."""

    def decode(self, body: memoryview) -> Header:
        mandatory, optional, optlen = parse_fixed(body[: HDR.size])
        if len(body) != HDR.size + optlen:
            raise BodyError(f"header must be {HDR.size + optlen} octets")
        return parse_optional(mandatory, optional, body[HDR.size :])

    def encode(self, value: Header) -> Buffers:
        return [pack(value)]


def pack(header: Header) -> bytes:
    optdata = b""
    if header.config or header.extra:
        optdata = (
            CONFIG_LEN.pack(len(header.config)) + header.config + header.extra
        )
    if header.mandatory_flags & ~MANDATORY_KNOWN:
        raise BodyError("unknown mandatory flags")
    try:
        fixed = HDR.pack(
            MAGIC,
            BYTEORDER,
            header.mandatory_flags,
            header.optional_flags,
            len(optdata),
        )
    except struct.error as exc:
        raise BodyError(str(exc)) from None
    return fixed + optdata
