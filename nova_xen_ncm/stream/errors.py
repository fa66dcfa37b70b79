"""The one exception a bad stream raises."""

from __future__ import annotations


class StreamError(Exception):
    """A stream that cannot be decoded or a value that cannot be encoded.

    ``offset`` is the byte offset in the stream being decoded (of the
    record, or of the field where the problem was found) and ``record`` the
    name of the record (or header) being read, so an operator can find the
    bad bytes with a hex dump.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        record: str | None = None,
    ) -> None:
        self.message = message
        self.offset = offset
        self.record = record
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.record is not None:
            where.append(self.record)
        if self.offset is not None:
            where.append(f"at offset {self.offset:#x}")
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class BodyError(ValueError):
    """Raised by a record body codec; the decoder adds offset and name."""
