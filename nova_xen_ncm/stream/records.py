"""Record tables: what a record type is, independent of its layer.

Every record of both stream layers (libxc v3 and libxl v2) is framed the
same way: a type, a body length, the body, and padding to 8 octets
(libxc-migration-stream.pandoc "Record Format"). What differs per type is
only the body, so a record type is a row of data: its number, its name, the
layer it belongs to, the largest body it may have, and a *body codec* that
turns body bytes into a value and back. The decoder and encoder are driven
by the tables of these rows and know no record by name.

Type bit 31 marks an optional record that a reader may skip; every other
type is mandatory, and an unknown mandatory record is an error.

The stream headers (the ``xl`` save-file header, the libxl header, the libxc
image and domain headers) are not records, but the decoder hands them out in
the same shape so that a reader sees one sequence of events. Their rows carry
negative pseudo-types, outside the 32-bit space of record types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import Protocol

from nova_xen_ncm.stream.errors import StreamError

OPTIONAL_BIT = 0x80000000

# A body codec returns its encoding as a list of buffers so that page data
# can go out by vectored write without being copied.
Buffers = list  # list[bytes | bytearray | memoryview]


class BodyCodec(Protocol):
    """Turns a record body into a value and back.

    ``decode`` receives a read-only memoryview of exactly the body (no
    padding) and raises :class:`~nova_xen_ncm.stream.errors.BodyError` on bad
    content; it must not copy large payloads (hand out views). ``encode``
    returns the body as a list of buffers without padding.
    """

    def decode(self, body: memoryview) -> Any: ...

    def encode(self, value: Any) -> Buffers: ...


@dataclasses.dataclass(frozen=True)
class RecordType:
    """One row of a record table."""

    type: int
    name: str
    layer: str
    codec: BodyCodec
    max_length: int

    @property
    def mandatory(self) -> bool:
        return self.is_header or not self.type & OPTIONAL_BIT

    @property
    def is_header(self) -> bool:
        return self.type < 0


@dataclasses.dataclass
class Record:
    """A decoded record: its type row, its value, where it was found.

    ``offset`` is the stream offset of the record header and ``length`` the
    body length (without padding); for a header, its offset and whole size.
    An optional record of a type the table
    does not know is ``skipped``: its body was discarded unread and its value
    is None.
    """

    rtype: RecordType
    value: Any
    offset: int = 0
    length: int = 0
    skipped: bool = False

    @property
    def name(self) -> str:
        return self.rtype.name

    @property
    def layer(self) -> str:
        return self.rtype.layer


class RecordTable:
    """The record types of one layer, by number and by name."""

    def __init__(self, layer: str, rows: Iterable[RecordType]) -> None:
        self.layer = layer
        self._by_type: dict[int, RecordType] = {}
        self._by_name: dict[str, RecordType] = {}
        for row in rows:
            if row.layer != layer:
                raise ValueError(f"{row.name} is a {row.layer} record")
            if row.type in self._by_type or row.name in self._by_name:
                raise ValueError(f"duplicate record {row.name} {row.type:#x}")
            self._by_type[row.type] = row
            self._by_name[row.name] = row

    def by_type(self, rtype: int) -> RecordType | None:
        return self._by_type.get(rtype)

    def by_name(self, name: str) -> RecordType:
        try:
            return self._by_name[name]
        except KeyError:
            raise StreamError(f"no {self.layer} record named {name}") from None

    def __iter__(self):
        return iter(self._by_type.values())

    def __len__(self) -> int:
        return len(self._by_type)

    def names(self) -> Sequence[str]:
        return list(self._by_name)
