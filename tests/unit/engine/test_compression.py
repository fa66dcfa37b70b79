"""lz4 frame compression of data frame bodies."""

import os

import lz4.frame
import pytest

from nova_xen_ncm.engine import compression
from nova_xen_ncm.engine.errors import ProtocolError


def test_round_trip_of_several_buffers():
    parts = [b"a" * 4096, memoryview(bytearray(b"b" * 4096)), os.urandom(17)]
    packed = compression.compress(parts)
    assert compression.decompress(packed, 10_000) == b"".join(
        bytes(p) for p in parts
    )


def test_output_is_a_standard_lz4_frame():
    packed = compression.compress([b"xyz" * 1000])
    assert lz4.frame.decompress(packed) == b"xyz" * 1000


def test_exact_limit_is_allowed():
    packed = compression.compress([b"\0" * 5000])
    assert len(compression.decompress(packed, 5000)) == 5000
    with pytest.raises(ProtocolError, match="limit"):
        compression.decompress(packed, 4999)


@pytest.mark.parametrize(
    "mangle,match",
    [
        (lambda d: d[:-4], "truncated"),
        (lambda d: d + b"\0", "after the lz4 frame"),
        (lambda d: b"not lz4 at all!!", "corrupt"),
    ],
)
def test_bad_input(mangle, match):
    packed = compression.compress([b"page" * 1024])
    with pytest.raises(ProtocolError, match=match):
        compression.decompress(mangle(packed), 1 << 20)
