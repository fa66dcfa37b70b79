"""The record tables the decoder and encoder use by default.

Each layer's table is Xen's rows plus the project's non-cooperative rows
(:mod:`nova_xen_ncm.stream.ncm`). The headers have rows of their own, with
negative pseudo-types (see :mod:`nova_xen_ncm.stream.records`).
"""

from __future__ import annotations

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.records import RecordTable
from nova_xen_ncm.stream.records import RecordType

XL_HEADER = RecordType(
    -1,
    "XL_HEADER",
    xl.LAYER,
    xl.HeaderCodec(),
    xl.HDR.size + xl.OPTIONAL_DATA_MAX,
)
LIBXL_HEADER = RecordType(
    -2, "LIBXL_HEADER", libxl.LAYER, libxl.HeaderCodec(), libxl.HDR.size
)
IMAGE_HEADER = RecordType(
    -3, "IMAGE_HEADER", libxc.LAYER, libxc.ImageHeaderCodec(), libxc.IHDR.size
)
DOMAIN_HEADER = RecordType(
    -4,
    "DOMAIN_HEADER",
    libxc.LAYER,
    libxc.DomainHeaderCodec(),
    libxc.DHDR.size,
)

HEADERS = (XL_HEADER, LIBXL_HEADER, IMAGE_HEADER, DOMAIN_HEADER)


def libxc_table() -> RecordTable:
    return RecordTable(libxc.LAYER, libxc.XEN_ROWS + list(ncm.LIBXC_RECORDS))


def libxl_table() -> RecordTable:
    return RecordTable(libxl.LAYER, libxl.XEN_ROWS + list(ncm.LIBXL_RECORDS))


def xen_libxc_table() -> RecordTable:
    """Xen's own libxc rows only (what stock Xen can restore)."""
    return RecordTable(libxc.LAYER, libxc.XEN_ROWS)


def xen_libxl_table() -> RecordTable:
    return RecordTable(libxl.LAYER, libxl.XEN_ROWS)
