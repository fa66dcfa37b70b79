"""The stream decoder: bytes in, records out, no I/O (h11's model).

The caller feeds whatever bytes it has read and asks for records::

    decoder = Decoder("xl")
    while True:
        record = decoder.next_record()
        if record is NEED_DATA:
            data = read()
            if data:
                decoder.feed(data)
            else:
                decoder.close()      # truncation now raises StreamError
        elif record is STREAM_END:
            break
        else:
            handle(record)

Layers nest as Xen writes them: an ``xl`` save-file header, a libxl v2
stream, and inside it after LIBXC_CONTEXT a libxc v3 stream that runs
inline until its END (libxl spec "LIBXC_CONTEXT"), or until CHECKPOINT in a
checkpointed stream, when libxl records follow up to CHECKPOINT_END and the
libxc stream resumes (libxc spec "CHECKPOINT"). The headers come out as
records too, with the header rows of :mod:`nova_xen_ncm.stream.tables`.

Every length is checked against its row's limit as soon as the record
header arrives, before any buffer is allocated for the body. Bodies are
handed out as read-only views of the fed bytes when a record lies within
one fed chunk; a record that straddles chunks is assembled once. Optional
records of unknown type are skipped as they stream past, never buffered.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator
from typing import Any

from nova_xen_ncm.stream import codecs
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.errors import StreamError
from nova_xen_ncm.stream.records import OPTIONAL_BIT
from nova_xen_ncm.stream.records import Record
from nova_xen_ncm.stream.records import RecordTable
from nova_xen_ncm.stream.records import RecordType


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_record()`` needs more input before it can return a record.
NEED_DATA = _Sentinel("NEED_DATA")
#: The outermost END has been returned; nothing more will come.
STREAM_END = _Sentinel("STREAM_END")

FORMATS = ("auto", "xl", "libxl", "libxc")

# The first 8 octets of each format, for "auto".
_SIGNATURES = {
    xl.MAGIC[:8]: "xl",
    libxl.HDR_IDENT.to_bytes(8, "big"): "libxl",
    libxc.IHDR_MARKER.to_bytes(8, "big"): "libxc",
}

DEFAULT_MAX_BUFFER = 2 * libxc.REC_LENGTH_MAX


class _State(enum.Enum):
    DETECT = "format signature"
    XL_FIXED = "xl header"
    XL_OPTIONAL = "xl header optional data"
    LIBXL_HEADER = "libxl header"
    IMAGE_HEADER = "libxc image header"
    DOMAIN_HEADER = "libxc domain header"
    RECORD_HEADER = "record header"
    RECORD_BODY = "record body"
    SKIP = "skipped record"
    DONE = "end of stream"


# Where each format starts.
_START = {
    "auto": _State.DETECT,
    "xl": _State.XL_FIXED,
    "libxl": _State.LIBXL_HEADER,
    "libxc": _State.IMAGE_HEADER,
}


# The fixed size of what each state reads.
_HEADER_SIZES = {
    _State.DETECT: 8,
    _State.XL_FIXED: xl.HDR.size,
    _State.LIBXL_HEADER: libxl.HDR.size,
    _State.IMAGE_HEADER: libxc.IHDR.size,
    _State.DOMAIN_HEADER: libxc.DHDR.size,
    _State.RECORD_HEADER: libxc.RHDR.size,
}


class _Buffer:
    """Fed chunks not yet consumed, as views (no copy on the way in)."""

    def __init__(self) -> None:
        self._chunks: collections.deque[memoryview] = collections.deque()
        self.size = 0

    def append(self, view: memoryview) -> None:
        self._chunks.append(view)
        self.size += len(view)

    def take(self, n: int) -> memoryview:
        """The next n octets as one read-only view; copies only when they
        span chunks."""
        if n == 0:
            return memoryview(b"")
        first = self._chunks[0]
        if len(first) >= n:
            self._advance_first(first, n)
            return first[:n]
        pieces = []
        left = n
        while left:
            chunk = self._chunks[0]
            k = min(len(chunk), left)
            pieces.append(chunk[:k])
            self._advance_first(chunk, k)
            left -= k
        # One pass: join neither zero-fills nor grows its result.
        return memoryview(b"".join(pieces))

    def drop(self, n: int) -> None:
        while n:
            chunk = self._chunks[0]
            k = min(len(chunk), n)
            self._advance_first(chunk, k)
            n -= k

    def peek(self, n: int) -> bytes:
        out = b""
        for chunk in self._chunks:
            out += chunk[: n - len(out)].tobytes()
            if len(out) == n:
                break
        return out

    def _advance_first(self, chunk: memoryview, k: int) -> None:
        self.size -= k
        if k == len(chunk):
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[k:]


class Decoder:
    """Decodes an ``xl`` save file, a libxl stream or a libxc stream.

    ``format`` is one of :data:`FORMATS`; "auto" recognises the three by
    their first 8 octets. ``libxc_table``/``libxl_table`` default to Xen's
    rows plus the project's. ``max_buffer`` bounds the octets fed but not
    yet consumed: drain with :meth:`next_record` before feeding more.
    """

    def __init__(
        self,
        format: str = "auto",
        *,
        libxc_table: RecordTable | None = None,
        libxl_table: RecordTable | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self.format = format
        self._tables = {
            libxc.LAYER: libxc_table or tables.libxc_table(),
            libxl.LAYER: libxl_table or tables.libxl_table(),
        }
        self.max_buffer = max_buffer
        self._buf = _Buffer()
        self._state = _START[format]
        self._need = _HEADER_SIZES[self._state]
        self._layer = libxc.LAYER
        self._nested = False
        self._libxc_paused = False
        self._libxc_version = libxc.IHDR_VERSION
        self._static_data_end = False
        self._offset = 0
        self._eof = False
        self._error: StreamError | None = None
        # What is being read: for error messages and Record offsets.
        self._item_offset = 0
        self._item_name = self._state.value
        self._row: RecordType | None = None
        self._length = 0
        self._xl_fixed = b""
        self._skip_body = 0
        self._skip_pad = 0
        self._generic_rows: dict[tuple[str, int], RecordType] = {}
        self._handlers = {
            _State.XL_FIXED: self._on_xl_fixed,
            _State.XL_OPTIONAL: self._on_xl_optional,
            _State.LIBXL_HEADER: self._on_libxl_header,
            _State.IMAGE_HEADER: self._on_image_header,
            _State.DOMAIN_HEADER: self._on_domain_header,
            _State.RECORD_HEADER: self._on_record_header,
            _State.RECORD_BODY: self._on_record_body,
        }

    # --- input --------------------------------------------------------

    def feed(
        self, data: bytes | bytearray | memoryview, *, transfer: bool = False
    ) -> None:
        """Add input. Read-only buffers (bytes) are kept without copying;
        writable ones are copied, since the caller may reuse them, unless
        ``transfer`` says the caller hands the buffer over for good (e.g. a
        fresh ``bytearray(decoder.bytes_needed)`` filled by ``recv_into``)."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise self._fail(StreamError("feed() after close()"))
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:
            raise self._fail(StreamError(f"cannot feed {exc}")) from None
        if not len(view):
            return
        if self._buf.size + len(view) > self.max_buffer:
            raise self._fail(
                StreamError(
                    f"{self._buf.size + len(view)} octets buffered exceed "
                    f"{self.max_buffer}: drain with next_record() first",
                    offset=self._offset,
                    record=self._item_name,
                )
            )
        if view.readonly or transfer:
            view = view.toreadonly()
        else:
            view = memoryview(view.tobytes())
        self._buf.append(view)

    def close(self) -> None:
        """Mark the end of input: an incomplete stream now raises."""
        self._eof = True

    # --- output -------------------------------------------------------

    def next_record(self) -> Any:
        """The next :class:`Record`, :data:`NEED_DATA` or
        :data:`STREAM_END`. A bad stream raises :class:`StreamError`, and
        the same error again on every later call."""
        if self._error is not None:
            raise self._error
        try:
            return self._step()
        except StreamError as exc:
            raise self._fail(exc) from None
        except Exception as exc:
            # Safety net: a bad stream yields StreamError and nothing else.
            raise self._fail(
                StreamError(
                    f"cannot decode: {exc!r}",
                    offset=self._item_offset,
                    record=self._item_name,
                )
            ) from exc

    def records(self) -> Iterator[Record]:
        """The records that can be decoded from the input fed so far."""
        while True:
            record = self.next_record()
            if record is NEED_DATA or record is STREAM_END:
                return
            yield record

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def offset(self) -> int:
        """Octets of the stream consumed so far."""
        return self._offset

    @property
    def bytes_needed(self) -> int:
        """Octets still missing before the next step can be taken (0 when
        ``next_record()`` can make progress or the stream is done)."""
        if self._state is _State.DONE:
            return 0
        if self._state is _State.SKIP:
            return max(0, self._skip_body + self._skip_pad - self._buf.size)
        return max(0, self._need - self._buf.size)

    @property
    def trailing_data(self) -> bytes:
        """Octets fed after the end of the stream."""
        if not self.done:
            return b""
        return self._buf.peek(self._buf.size)

    # --- the state machine ---------------------------------------------

    def _fail(self, exc: StreamError) -> StreamError:
        self._error = exc
        return exc

    def _enter(self, state: _State, name: str | None = None) -> None:
        self._state = state
        self._item_offset = self._offset
        self._item_name = name or state.value
        if state is _State.RECORD_HEADER:
            self._item_name = f"{self._layer} record header"
        if state in _HEADER_SIZES:
            self._need = _HEADER_SIZES[state]

    def _truncated(self) -> StreamError:
        have = self._buf.size
        if self._state is _State.SKIP:
            need = self._skip_body + self._skip_pad
        else:
            need = self._need
        return StreamError(
            f"truncated: stream ends at offset {self._offset + have:#x}, "
            f"{need - have} of {need} octets missing",
            offset=self._item_offset,
            record=self._item_name,
        )

    def _step(self) -> Any:
        while True:
            state = self._state
            if state is _State.DONE:
                return STREAM_END
            if state is _State.SKIP:
                record = self._skip()
                if record is None:
                    if self._eof:
                        raise self._truncated()
                    return NEED_DATA
                return record
            if self._buf.size < self._need:
                if self._eof:
                    raise self._truncated()
                return NEED_DATA
            if state is _State.DETECT:
                self._detect()
                continue
            data = self._buf.take(self._need)
            self._offset += self._need
            try:
                record = self._handlers[state](data)
            except BodyError as exc:
                raise StreamError(
                    str(exc), offset=self._item_offset, record=self._item_name
                ) from None
            if record is not None:
                return record

    def _detect(self) -> None:
        signature = self._buf.peek(8)
        fmt = _SIGNATURES.get(signature)
        if fmt is None:
            raise StreamError(
                f"not an xl, libxl or libxc stream (starts {signature.hex()})",
                offset=0,
                record="stream",
            )
        self.format = fmt
        self._enter(_START[fmt])

    def _header(self, row: RecordType, data: memoryview) -> Record:
        value = row.codec.decode(data)
        return Record(row, value, self._item_offset, len(data))

    def _on_xl_fixed(self, data: memoryview) -> None:
        _, _, optlen = xl.parse_fixed(data)
        self._xl_fixed = data.tobytes()
        self._state = _State.XL_OPTIONAL
        self._need = optlen

    def _on_xl_optional(self, data: memoryview) -> Record:
        whole = memoryview(self._xl_fixed + data.tobytes())
        record = self._header(tables.XL_HEADER, whole)
        if record.value.stream_v2:
            self._enter(_State.LIBXL_HEADER)
        else:
            # Before libxl had its own stream, xl wrote libxc's directly.
            self._enter(_State.IMAGE_HEADER)
        return record

    def _on_libxl_header(self, data: memoryview) -> Record:
        record = self._header(tables.LIBXL_HEADER, data)
        self._layer = libxl.LAYER
        self._enter(_State.RECORD_HEADER)
        return record

    def _on_image_header(self, data: memoryview) -> Record:
        record = self._header(tables.IMAGE_HEADER, data)
        self._libxc_version = record.value.version
        self._static_data_end = False
        self._enter(_State.DOMAIN_HEADER)
        return record

    def _on_domain_header(self, data: memoryview) -> Record:
        record = self._header(tables.DOMAIN_HEADER, data)
        self._layer = libxc.LAYER
        self._enter(_State.RECORD_HEADER)
        return record

    def _on_record_header(self, data: memoryview) -> None:
        rtype, length = libxc.RHDR.unpack(data)
        table = self._tables[self._layer]
        row = table.by_type(rtype)
        padded = (length + 7) & ~7
        if row is None:
            if not rtype & OPTIONAL_BIT:
                raise StreamError(
                    f"unknown mandatory record type {rtype:#x}",
                    offset=self._item_offset,
                    record=f"{self._layer} record {rtype:#x}",
                )
            self._row = self._generic_row(rtype)
            self._item_name = f"{self._layer} {self._row.name}"
            self._length = length
            self._skip_body = length
            self._skip_pad = padded - length
            self._state = _State.SKIP
            return None
        self._item_name = f"{self._layer} {row.name}"
        if length > row.max_length:
            raise StreamError(
                f"body_length {length} exceeds the limit of {row.max_length}",
                offset=self._item_offset,
                record=self._item_name,
            )
        if self._layer == libxc.LAYER:
            self._check_libxc_order(rtype)
        self._row = row
        self._length = length
        self._state = _State.RECORD_BODY
        self._need = padded
        return None

    def _check_libxc_order(self, rtype: int) -> None:
        """The order rules of the libxc spec ("v3 compat with v2") that
        Xen's restore enforces: one STATIC_DATA_END, before memory."""
        problem = None
        if self._libxc_version < 3 and rtype in libxc.V3_ONLY:
            problem = "record not allowed in a version 2 image"
        elif rtype == libxc.STATIC_DATA_END and self._static_data_end:
            problem = "second STATIC_DATA_END"
        elif rtype in libxc.AFTER_STATIC_DATA and not self._static_data_end:
            if self._libxc_version >= 3:
                problem = "memory record before STATIC_DATA_END"
            self._static_data_end = True  # where a v2 image implies it
        if rtype == libxc.STATIC_DATA_END:
            self._static_data_end = True
        if problem:
            raise StreamError(
                problem, offset=self._item_offset, record=self._item_name
            )

    def _generic_row(self, rtype: int) -> RecordType:
        key = (self._layer, rtype)
        if key not in self._generic_rows:
            self._generic_rows[key] = RecordType(
                rtype,
                f"OPTIONAL_{rtype:#010x}",
                self._layer,
                codecs.Blob(),
                0xFFFFFFFF,
            )
        return self._generic_rows[key]

    def _check_padding(self, padding: memoryview) -> None:
        if any(padding):
            raise StreamError(
                f"padding is not zero: {padding.hex()}",
                offset=self._item_offset,
                record=self._item_name,
            )

    def _on_record_body(self, data: memoryview) -> Record:
        row = self._row
        self._check_padding(data[self._length :])
        value = row.codec.decode(data[: self._length])
        record = Record(row, value, self._item_offset, self._length)
        self._after(record)
        return record

    def _skip(self) -> Record | None:
        if self._skip_body:
            k = min(self._buf.size, self._skip_body)
            self._buf.drop(k)
            self._offset += k
            self._skip_body -= k
            if self._skip_body:
                return None
        if self._buf.size < self._skip_pad:
            return None
        self._check_padding(self._buf.take(self._skip_pad))
        self._offset += self._skip_pad
        self._skip_pad = 0
        record = Record(
            self._row, None, self._item_offset, self._length, skipped=True
        )
        self._enter(_State.RECORD_HEADER)
        return record

    def _after(self, record: Record) -> None:
        """Where the stream goes after a record (the layer transitions)."""
        key = (record.layer, record.rtype.type)
        if key == (libxl.LAYER, libxl.LIBXC_CONTEXT):
            if self._libxc_paused:
                raise StreamError(
                    "LIBXC_CONTEXT while the libxc stream is at a checkpoint",
                    offset=record.offset,
                    record=self._item_name,
                )
            self._nested = True
            self._enter(_State.IMAGE_HEADER)
            return
        if key == (libxl.LAYER, libxl.END):
            self._enter(_State.DONE)
            return
        if key == (libxl.LAYER, libxl.CHECKPOINT_END) and self._libxc_paused:
            self._libxc_paused = False
            self._layer = libxc.LAYER
        elif key == (libxc.LAYER, libxc.END):
            if not self._nested:
                self._enter(_State.DONE)
                return
            self._nested = False
            self._layer = libxl.LAYER
        elif key == (libxc.LAYER, libxc.CHECKPOINT) and self._nested:
            self._libxc_paused = True
            self._layer = libxl.LAYER
        self._enter(_State.RECORD_HEADER)


def decode(
    data: bytes | memoryview, format: str = "auto", **kwargs: Any
) -> list[Record]:
    """All records of a complete stream held in memory; octets after the
    end of the stream are an error."""
    kwargs.setdefault("max_buffer", max(DEFAULT_MAX_BUFFER, len(data)))
    decoder = Decoder(format, **kwargs)
    decoder.feed(data)
    decoder.close()
    records = list(decoder.records())
    if decoder.trailing_data:
        raise StreamError(
            f"{len(decoder.trailing_data)} octets after the end of the stream",
            offset=decoder.offset,
            record="stream",
        )
    return records
