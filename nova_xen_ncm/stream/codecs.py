"""Body codecs shared by the record tables.

Each class here implements :class:`~nova_xen_ncm.stream.records.BodyCodec`
for one *shape* of record body that recurs in the specs: empty marker
records, opaque blobs, fixed structs with reserved fields, and arrays of
fixed-size entries. Record-specific codecs (PAGE_DATA, HVM_CONTEXT ...) live
with their layer's table.

All integers are little-endian: x86 streams are always written so
(libxc-migration-stream.pandoc "Image Header"), and the decoder refuses the
big-endian option bit before any body is decoded.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Buffers


class Empty:
    """A marker record with no fields: its body_length is 0."""

    def decode(self, body: memoryview) -> None:
        if len(body):
            raise BodyError(f"body must be empty, has {len(body)} octets")
        return None

    def encode(self, value: Any) -> Buffers:
        if value is not None:
            raise BodyError("a marker record carries no value")
        return []


class Blob:
    """An opaque body, handed out as a read-only view (never copied).

    ``exact`` fixes the length (SHARED_INFO is one page); ``min_length``
    rejects bodies too short to be meaningful (HVM_CONTEXT is never empty).
    """

    def __init__(self, *, min_length: int = 0, exact: int | None = None):
        self.min_length = min_length
        self.exact = exact

    def _check(self, size: int) -> None:
        if self.exact is not None and size != self.exact:
            raise BodyError(f"body must be {self.exact} octets, has {size}")
        if size < self.min_length:
            raise BodyError(
                f"body must be at least {self.min_length} octets, has {size}"
            )

    def decode(self, body: memoryview) -> memoryview:
        self._check(len(body))
        return body

    def encode(self, value: Any) -> Buffers:
        view = memoryview(value)
        self._check(view.nbytes)
        return [view]


class Struct:
    """A fixed struct whose fields become a named tuple.

    ``fmt`` is the struct format of the whole body, without byte order;
    ``fields`` names each member in order, and a name starting with ``_``
    is a reserved field: it must be zero, is left out of the value and is
    written as zero (libxc-migration-stream.pandoc "Fields": "Padding and
    reserved fields are set to zero on save").
    """

    def __init__(self, fmt: str, value_type: type, fields: tuple[str, ...]):
        self.struct = struct.Struct("<" + fmt)
        self.value_type = value_type
        self.fields = fields
        if len(fields) != len(self.struct.unpack(bytes(self.struct.size))):
            raise ValueError(f"{fmt} does not have {len(fields)} fields")
        self._public = tuple(n for n in fields if not n.startswith("_"))
        if tuple(value_type._fields) != self._public:
            raise ValueError(f"{value_type.__name__} fields != {fields}")

    @property
    def size(self) -> int:
        return self.struct.size

    def decode(self, body: memoryview) -> Any:
        if len(body) != self.struct.size:
            raise BodyError(
                f"body must be {self.struct.size} octets, has {len(body)}"
            )
        values = self.struct.unpack(body)
        public = []
        for name, value in zip(self.fields, values, strict=True):
            if name.startswith("_"):
                if value:
                    raise BodyError(f"reserved field {name[1:]} is {value:#x}")
            else:
                public.append(value)
        return self.value_type(*public)

    def encode(self, value: Any) -> Buffers:
        items = list(value)
        if len(items) != len(self._public):
            raise BodyError(f"needs {len(self._public)} fields: {value!r}")
        items.reverse()
        values = [0 if n.startswith("_") else items.pop() for n in self.fields]
        try:
            return [self.struct.pack(*values)]
        except struct.error as exc:
            raise BodyError(f"cannot pack {value!r}: {exc}") from None


class Array:
    """A body that is an array of fixed-size entries, as a numpy array.

    The array is a read-only view of the body (no copy). ``min_count``
    rejects empty arrays where the spec requires entries.
    """

    def __init__(self, dtype: np.dtype | str, *, min_count: int = 0):
        self.dtype = np.dtype(dtype)
        self.min_count = min_count

    def decode(self, body: memoryview) -> np.ndarray:
        size = self.dtype.itemsize
        if len(body) % size:
            raise BodyError(
                f"body of {len(body)} octets is not a whole number of "
                f"{size}-octet entries"
            )
        if len(body) // size < self.min_count:
            raise BodyError(f"needs at least {self.min_count} entries")
        return np.frombuffer(body, dtype=self.dtype)

    def encode(self, value: Any) -> Buffers:
        if isinstance(value, (bytes, bytearray, memoryview)):
            # Raw entries as the hypervisor returned them.
            value = self.decode(memoryview(value).cast("B"))
        array = np.ascontiguousarray(value, dtype=self.dtype)
        if array.ndim != 1 or len(array) < self.min_count:
            raise BodyError(f"needs a 1-D array of >= {self.min_count}")
        return [memoryview(array).cast("B")]
