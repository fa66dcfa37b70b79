"""The stream encoder: values in, buffer lists out, no I/O.

Every method returns a list of buffers ready for a vectored write
(``socket.sendmsg``, ``os.writev``); page contents passed in as views are
placed in the list as they are, never copied. :func:`join` makes bytes of
a list when a single buffer is wanted.

An ``xl`` save file, as ``xl save`` writes it and ``xl restore`` reads it::

    enc = Encoder()
    out = enc.xl_header(config_json)                    # tools/xl/xl.h
    out += enc.libxl_header()                           # libxl "Header"
    out += enc.libxl("LIBXC_CONTEXT")                   # libxc follows
    out += enc.libxc_headers(libxc.DOMAIN_X86_HVM)      # image + domain
    out += enc.libxc("X86_CPUID_POLICY", leaves) ...
    out += enc.libxc("STATIC_DATA_END")                 # before memory
    out += enc.page_data(pfns, types, pages)            # many times
    out += enc.libxc("END")
    out += enc.libxl("EMULATOR_CONTEXT", ctx)
    out += enc.libxl("END")

A live stream is the same without the ``xl`` header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.errors import StreamError
from nova_xen_ncm.stream.records import Buffers
from nova_xen_ncm.stream.records import RecordTable
from nova_xen_ncm.stream.records import RecordType

_ZEROS = bytes(8)


def join(buffers: Buffers) -> bytes:
    return b"".join(buffers)


def buffers_size(buffers: Buffers) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


class Encoder:
    """Encodes headers and records of the libxc, libxl and xl layers."""

    def __init__(
        self,
        *,
        libxc_table: RecordTable | None = None,
        libxl_table: RecordTable | None = None,
    ) -> None:
        self._tables = {
            libxc.LAYER: libxc_table or tables.libxc_table(),
            libxl.LAYER: libxl_table or tables.libxl_table(),
        }

    # --- headers --------------------------------------------------------

    def xl_header(
        self,
        config: bytes,
        *,
        json: bool = True,
        optional_flags: int = 0,
    ) -> Buffers:
        """The ``xl`` save-file header announcing a libxl v2 stream."""
        flags = xl.MANDATORY_STREAM_V2 | (xl.MANDATORY_JSON if json else 0)
        value = xl.Header(flags, optional_flags, bytes(config))
        return self._header(tables.XL_HEADER, value)

    def libxl_header(self) -> Buffers:
        value = libxl.Header(libxl.HDR_VERSION, 0)
        return self._header(tables.LIBXL_HEADER, value)

    def libxc_headers(
        self,
        domain_type: int = libxc.DOMAIN_X86_HVM,
        *,
        xen_major: int = 4,
        xen_minor: int = 17,
    ) -> Buffers:
        """The image header (version 3, little-endian) and domain header."""
        image = libxc.ImageHeader(libxc.IHDR_VERSION, 0)
        domain = libxc.DomainHeader(
            domain_type, libxc.PAGE_SHIFT, xen_major, xen_minor
        )
        return self._header(tables.IMAGE_HEADER, image) + self._header(
            tables.DOMAIN_HEADER, domain
        )

    def _header(self, row: RecordType, value: Any) -> Buffers:
        try:
            return row.codec.encode(value)
        except BodyError as exc:
            raise StreamError(str(exc), record=row.name) from None

    # --- records --------------------------------------------------------

    def record(self, layer: str, name: str, value: Any = None) -> Buffers:
        """A whole record of ``layer`` (header, body buffers, padding)."""
        row = self._tables[layer].by_name(name)
        return self.record_of(row, value)

    def record_of(self, row: RecordType, value: Any = None) -> Buffers:
        try:
            body = row.codec.encode(value)
        except BodyError as exc:
            raise StreamError(
                str(exc), record=f"{row.layer} {row.name}"
            ) from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise StreamError(
                f"cannot encode {type(value).__name__}: {exc}",
                record=f"{row.layer} {row.name}",
            ) from exc
        length = buffers_size(body)
        if length > row.max_length:
            raise StreamError(
                f"body of {length} octets exceeds the limit {row.max_length}",
                record=f"{row.layer} {row.name}",
            )
        out: Buffers = [libxc.RHDR.pack(row.type, length)]
        out += body
        if length % 8:
            out.append(_ZEROS[: 8 - length % 8])
        return out

    def libxc(self, name: str, value: Any = None) -> Buffers:
        return self.record(libxc.LAYER, name, value)

    def libxl(self, name: str, value: Any = None) -> Buffers:
        return self.record(libxl.LAYER, name, value)

    def page_data(
        self,
        pfns: Any,
        types: Any,
        pages: bytes | memoryview | Sequence[Any],
    ) -> Buffers:
        """One PAGE_DATA record; ``pages`` are the contents of the pages
        whose type carries data, as one buffer or one buffer per page."""
        return self.libxc("PAGE_DATA", libxc.PageData(pfns, types, pages))
