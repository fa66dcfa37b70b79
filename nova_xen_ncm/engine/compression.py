"""lz4 frame compression of data frame bodies (the ``lz4`` option).

One lz4 frame per data frame, so each frame decompresses on its own and a
resumed transfer needs no shared dictionary state (QEMU multifd compresses
per packet for the same reason). Decompression is bounded: a frame that
would expand past the limit is refused before the memory is spent.
"""

from __future__ import annotations

from collections.abc import Sequence

import lz4.frame

from nova_xen_ncm.engine.errors import ProtocolError

Buffer = bytes | bytearray | memoryview


def compress(buffers: Sequence[Buffer]) -> bytes:
    """One lz4 frame of the buffers, in order, without joining them."""
    compressor = lz4.frame.LZ4FrameCompressor(
        block_linked=False, content_checksum=False
    )
    parts = [compressor.begin()]
    parts.extend(compressor.compress(buf) for buf in buffers)
    parts.append(compressor.flush())
    return b"".join(parts)


def decompress(data: Buffer, limit: int) -> bytes:
    """The content of one lz4 frame of at most ``limit`` bytes.

    Raises :class:`ProtocolError` on corrupt, truncated or oversized
    input, or on bytes after the frame.
    """
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        result = decompressor.decompress(data, max_length=limit + 1)
    except RuntimeError as exc:
        raise ProtocolError(f"corrupt lz4 frame: {exc}") from exc
    if len(result) > limit:
        raise ProtocolError(f"lz4 frame expands past the {limit} byte limit")
    if not decompressor.eof:
        raise ProtocolError("truncated lz4 frame")
    if decompressor.unused_data:
        raise ProtocolError(
            f"{len(decompressor.unused_data)} bytes after the lz4 frame"
        )
    return result
