"""Hostile input: every bad stream gives one StreamError, nothing else."""

import struct
import tracemalloc

import pytest

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.decoder import NEED_DATA
from nova_xen_ncm.stream.decoder import Decoder
from nova_xen_ncm.stream.decoder import decode
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join
from nova_xen_ncm.stream.errors import StreamError


def _boundaries(data):
    """Offsets where each header or record of ``data`` starts and ends."""
    out = {0, len(data)}
    for record in decode(data):
        out.add(record.offset)
        framing = 0 if record.rtype.is_header else 8
        out.add(record.offset + framing + (record.length + 7) // 8 * 8)
    return sorted(out)


@pytest.mark.parametrize("fmt", ["xl", "libxl", "libxc"])
def test_truncation_at_and_inside_every_record(stream_builder, fmt):
    data = stream_builder(fmt, optional=True, checkpoint=fmt != "libxc")
    cuts = set()
    for b in _boundaries(data):
        cuts.update({b, b + 1, b + 5, b + 9, b + 4100})
    cuts = sorted(c for c in cuts if c < len(data))
    assert len(cuts) > 40
    for cut in cuts:
        with pytest.raises(StreamError, match="truncated") as exc:
            decode(data[:cut], fmt)
        assert exc.value.offset is not None and exc.value.record


def test_truncated_error_names_offset_and_record(stream_builder):
    data = stream_builder("libxc")
    records = decode(data, "libxc")
    page = next(r for r in records if r.name == "PAGE_DATA")
    with pytest.raises(StreamError) as exc:
        decode(data[: page.offset + 20], "libxc")
    assert exc.value.offset == page.offset
    assert exc.value.record == "libxc PAGE_DATA"
    assert f"{page.offset:#x}" in str(exc.value)


def _corrupt(data, offset, new):
    return data[:offset] + new + data[offset + len(new) :]


XL_END = xl.HDR.size + len(b'{"c_info": {"type": "hvm"}}') + 4


@pytest.mark.parametrize(
    ("fmt", "offset", "new", "message"),
    [
        ("xl", 0, b"Xen saved domain, XL", "magic"),
        ("xl", 32, b"\x01\x02\x03\x04", "byte order"),
        ("xl", 36, b"\x04\0\0\0", "unknown mandatory flags"),
        ("xl", 44, b"\xff\xff\xff\xff", "exceeds"),
        ("xl", 48, b"\xff\xff\0\0", "overruns"),
        ("libxl", 0, b"LibxlFmx", "bad ident"),
        ("libxl", 8, b"\0\0\0\x03", "version 3"),
        ("libxl", 12, b"\0\0\0\x04", "reserved option"),
        ("libxl", 12, b"\0\0\0\x01", "big-endian"),
        ("libxl", 16, b"\x06\0\0\0", "unknown mandatory record type 0x6"),
        ("libxc", 0, b"\xff\xff\xff\xfe", "marker"),
        ("libxc", 8, b"XENG", "bad id"),
        ("libxc", 12, b"\0\0\0\x04", "version 4"),
        ("libxc", 16, b"\0\x02", "reserved bits"),
        ("libxc", 16, b"\0\x01", "big-endian"),
        ("libxc", 20, b"\0\0\0\x01", "reserved bits"),
        ("libxc", 24, b"\x03\0\0\0", "domain type"),
        ("libxc", 28, b"\x0d\0", "page_shift"),
        ("libxc", 30, b"\x01\0", "reserved field"),
        # The first record (X86_CPUID_POLICY) starts at offset 40.
        ("libxc", 40, b"\x99\0\0\0", "unknown mandatory record type 0x99"),
        ("libxc", 44, b"\x19\0\0\0", "padding is not zero"),
    ],
)
def test_bad_headers_and_fields(stream_builder, fmt, offset, new, message):
    data = _corrupt(stream_builder(fmt), offset, new)
    with pytest.raises(StreamError, match=message):
        decode(data, fmt)


def test_auto_rejects_unknown_signature():
    with pytest.raises(StreamError, match="not an xl, libxl or libxc"):
        decode(b"QFI\xfb" + bytes(60))


def _libxc_with(*records):
    """A libxc stream's headers and STATIC_DATA_END, then ``records``
    (the first of which starts at offset 48)."""
    enc = Encoder()
    head = join(enc.libxc_headers() + enc.libxc("STATIC_DATA_END"))
    return head + b"".join(records)


def _record(rtype, body, pad=None):
    if pad is None:
        pad = bytes(-len(body) % 8)
    return libxc.RHDR.pack(rtype, len(body)) + body + pad


def test_non_zero_padding():
    enc = Encoder()
    good = join(enc.libxc("X86_MSR_POLICY", b"\0" * 16))
    data = _libxc_with(
        _record(libxc.TOOLSTACK, b"abc", pad=b"\0\0\0\0\x01"), good
    )
    with pytest.raises(StreamError, match="padding is not zero") as exc:
        decode(data, "libxc")
    assert exc.value.record == "libxc TOOLSTACK"
    skipped = _libxc_with(_record(0x80000001, b"abc", pad=b"\0\x01\0\0\0"))
    with pytest.raises(StreamError, match="padding"):
        decode(skipped, "libxc")


def _pfn(pfn, ptype, reserved=0):
    return struct.pack("<Q", pfn | reserved << 52 | ptype << 60)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01\0\0\0\0\0\0\0" + _pfn(5, 5), "invalid page type 0x5"),
        (b"\x01\0\0\0\0\0\0\0" + _pfn(5, 8), "invalid page type 0x8"),
        (b"\x01\0\0\0\0\0\0\0" + _pfn(5, 0, reserved=1), "reserved bits"),
        (b"\x01\0\0\0\0\0\0\0" + _pfn(5, 0), "need 4112 octets"),
        (b"\x01\0\0\0\0\0\0\0" + _pfn(5, 0xF) + bytes(4096), "need 16"),
        (b"\x02\0\0\0\0\0\0\0" + _pfn(5, 0xF), "count 2 needs 24"),
        (b"\x01\0\0\0\x01\0\0\0" + _pfn(5, 0xF), "reserved field"),
        (b"\0\0\0\0\0\0\0\0", "count is 0"),
    ],
)
def test_bad_page_data(body, message):
    data = _libxc_with(_record(libxc.PAGE_DATA, body))
    with pytest.raises(StreamError, match=message) as exc:
        decode(data, "libxc")
    assert exc.value.record == "libxc PAGE_DATA"
    assert exc.value.offset == 48


def _peak_while(func):
    tracemalloc.start()
    try:
        func()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    ("layer", "rtype"),
    [
        ("libxc", libxc.PAGE_DATA),
        ("libxc", libxc.HVM_CONTEXT),
        ("libxc", libxc.END),
        ("libxl", libxl.EMULATOR_CONTEXT),
    ],
)
def test_record_claiming_4_gib_allocates_nothing(layer, rtype):
    enc = Encoder()
    head = enc.libxc_headers() if layer == "libxc" else enc.libxl_header()
    data = join(head) + libxc.RHDR.pack(rtype, 0xFFFFFFF8) + bytes(64)

    def run():
        decoder = Decoder(layer)
        decoder.feed(data)
        with pytest.raises(StreamError, match="exceeds the limit") as exc:
            list(decoder.records())
        assert exc.value.offset == len(join(head))

    assert _peak_while(run) < 1 << 20


def test_unknown_optional_record_of_4_gib_is_skipped_unbuffered():
    data = _libxc_with(libxc.RHDR.pack(0x80000042, 0xFFFFFFFF))
    chunk = bytes(1 << 20)

    def run():
        decoder = Decoder("libxc")
        decoder.feed(data)
        assert decoder.next_record().name == "IMAGE_HEADER"
        assert decoder.next_record().name == "DOMAIN_HEADER"
        assert decoder.next_record().name == "STATIC_DATA_END"
        for _ in range(64):  # 64 MiB of the 4 GiB body stream past
            decoder.feed(chunk)
            assert decoder.next_record() is NEED_DATA
        assert decoder.bytes_needed == 0xFFFFFFFF + 1 - 64 * len(chunk)
        decoder.close()
        with pytest.raises(StreamError, match="truncated"):
            decoder.next_record()

    assert _peak_while(run) < 4 << 20


def test_xl_optional_data_of_4_gib_allocates_nothing():
    header = xl.HDR.pack(xl.MAGIC, xl.BYTEORDER, 2, 0, 0xFFFFFFFF)

    def run():
        decoder = Decoder("xl")
        decoder.feed(header)
        with pytest.raises(StreamError, match="exceeds"):
            decoder.next_record()

    assert _peak_while(run) < 1 << 20


def test_libxc_context_with_a_body_is_refused(stream_builder):
    enc = Encoder()
    data = join(enc.libxl_header()) + _record(libxl.LIBXC_CONTEXT, b"\0" * 8)
    with pytest.raises(StreamError, match="exceeds the limit of 0"):
        decode(data, "libxl")


def test_nested_libxc_stream_that_runs_short(stream_builder):
    """A libxc stream that ends (END) before the records it framed: what
    follows is read as libxl records and refused."""
    enc = Encoder()
    data = join(
        enc.libxl_header()
        + enc.libxl("LIBXC_CONTEXT")
        + enc.libxc_headers()
        + enc.libxc("STATIC_DATA_END")
        + enc.libxc("END")
        + enc.page_data([1], [0], bytes(4096))
        + enc.libxl("END")
    )
    with pytest.raises(StreamError, match="exceeds the limit of 0") as exc:
        decode(data, "libxl")
    # PAGE_DATA's type number is LIBXC_CONTEXT's in the libxl table.
    assert exc.value.record == "libxl LIBXC_CONTEXT"


def test_nested_libxc_stream_without_end(stream_builder):
    """The outer stream ends while the libxc stream is still open: its END
    closes the libxc stream, and the libxl stream has none left."""
    enc = Encoder()
    data = join(
        enc.libxl_header()
        + enc.libxl("LIBXC_CONTEXT")
        + enc.libxc_headers()
        + enc.libxc("STATIC_DATA_END")
        + enc.page_data([1], [0], bytes(4096))
        + enc.libxl("END")
    )
    with pytest.raises(StreamError, match="truncated") as exc:
        decode(data, "libxl")
    assert exc.value.record == "libxl record header"
    assert exc.value.offset == len(data)


def test_hvm_context_descriptor_overruns_the_record():
    body = struct.pack("<HHI", 1, 0, 100) + bytes(16)
    data = _libxc_with(_record(libxc.HVM_CONTEXT, body))
    with pytest.raises(StreamError, match="claims 100 octets, 16 left"):
        decode(data, "libxc")


def test_libxc_context_during_a_checkpoint():
    enc = Encoder()
    data = join(
        enc.libxl_header()
        + enc.libxl("LIBXC_CONTEXT")
        + enc.libxc_headers()
        + enc.libxc("CHECKPOINT")
        + enc.libxl("LIBXC_CONTEXT")
    )
    with pytest.raises(StreamError, match="at a checkpoint"):
        decode(data, "libxl")


def test_unexpected_exceptions_become_stream_errors(monkeypatch):
    """The safety net: a codec bug still surfaces as StreamError."""
    decoder = Decoder("libxc")
    row = decoder._tables["libxc"].by_name("X86_TSC_INFO")

    def broken(body):
        raise KeyError("bug")

    monkeypatch.setattr(row.codec, "decode", broken)
    decoder.feed(
        join(Encoder().libxc_headers())
        + _record(libxc.X86_TSC_INFO, bytes(24))
    )
    with pytest.raises(StreamError, match="cannot decode") as exc:
        list(decoder.records())
    assert exc.value.record == "libxc X86_TSC_INFO"
    assert isinstance(exc.value.__cause__, KeyError)


def test_empty_input():
    with pytest.raises(StreamError, match="truncated"):
        decode(b"")
