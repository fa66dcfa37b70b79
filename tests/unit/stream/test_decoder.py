"""The decoder on real and encoded streams."""

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.decoder import NEED_DATA
from nova_xen_ncm.stream.decoder import STREAM_END
from nova_xen_ncm.stream.decoder import Decoder
from nova_xen_ncm.stream.decoder import decode
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join
from nova_xen_ncm.stream.errors import StreamError


def _names(records):
    return [(r.layer, r.name) for r in records]


def test_xl_save_image_layout(xl_save_image):
    """The layout the fixture's README describes."""
    records = decode(xl_save_image, "xl")
    counts = collections.Counter(_names(records))
    assert counts.pop(("libxc", "PAGE_DATA")) == 1020
    assert _names(records[:8]) == [
        ("xl", "XL_HEADER"),
        ("libxl", "LIBXL_HEADER"),
        ("libxl", "LIBXC_CONTEXT"),
        ("libxc", "IMAGE_HEADER"),
        ("libxc", "DOMAIN_HEADER"),
        ("libxc", "X86_CPUID_POLICY"),
        ("libxc", "X86_MSR_POLICY"),
        ("libxc", "STATIC_DATA_END"),
    ]
    assert _names(records[-6:]) == [
        ("libxc", "X86_TSC_INFO"),
        ("libxc", "HVM_CONTEXT"),
        ("libxc", "HVM_PARAMS"),
        ("libxc", "END"),
        ("libxl", "EMULATOR_CONTEXT"),
        ("libxl", "END"),
    ]
    assert all(n == 1 for n in counts.values())
    by_name = {r.name: r for r in records}
    assert by_name["XL_HEADER"].value.stream_v2
    assert by_name["XL_HEADER"].value.config.startswith(b"{")
    assert by_name["DOMAIN_HEADER"].value == libxc.DomainHeader(2, 12, 4, 17)
    pfns = np.concatenate(
        [r.value.pfns for r in records if r.name == "PAGE_DATA"]
    )
    assert len(pfns) == 1_044_480
    assert len(np.unique(pfns)) == len(pfns)
    ctx = by_name["HVM_CONTEXT"].value.descriptors
    assert len(ctx) == 18 and ctx[0].type_name == "HEADER"
    assert ctx[-1].typecode == 0 and ctx[-1].length == 0
    assert len(by_name["HVM_PARAMS"].value) == 12
    emu = by_name["EMULATOR_CONTEXT"]
    assert emu.length == 6141 and emu.value.emulator == "qemu-upstream"


def test_xl_save_image_re_encodes_byte_for_byte(xl_save_image):
    """Decoding Xen's output and encoding every record again gives Xen's
    octets back: our layouts are Xen's."""
    enc = Encoder()
    out = []
    for record in decode(xl_save_image):
        if record.rtype.is_header:
            out += record.rtype.codec.encode(record.value)
        else:
            out += enc.record_of(record.rtype, record.value)
    assert join(out) == xl_save_image


@pytest.mark.parametrize("fmt", ["xl", "libxl", "libxc"])
def test_auto_detects_each_format(stream_builder, fmt):
    data = stream_builder(fmt)
    decoder = Decoder("auto")
    decoder.feed(data)
    records = list(decoder.records())
    assert decoder.format == fmt
    assert decoder.done and decoder.next_record() is STREAM_END
    assert records[0].layer == fmt


def test_nesting_switches_layers(stream_builder):
    names = _names(decode(stream_builder("xl")))
    inner = names.index(("libxl", "LIBXC_CONTEXT"))
    end = names.index(("libxc", "END"))
    assert all(layer == "libxc" for layer, _ in names[inner + 1 : end + 1])
    assert names[end + 1 :] == [
        ("libxl", "EMULATOR_XENSTORE_DATA"),
        ("libxl", "EMULATOR_CONTEXT"),
        ("libxl", "END"),
    ]


def test_checkpoint_hands_back_to_libxl_and_resumes(stream_builder):
    names = _names(decode(stream_builder("libxl", checkpoint=True)))
    cp = names.index(("libxc", "CHECKPOINT"))
    assert names[cp + 1 : cp + 4] == [
        ("libxl", "EMULATOR_CONTEXT"),
        ("libxl", "CHECKPOINT_END"),
        ("libxc", "PAGE_DATA"),
    ]


def test_bare_libxc_checkpoint_is_just_a_record(stream_builder):
    enc = Encoder()
    data = join(
        enc.libxc_headers()
        + enc.libxc("STATIC_DATA_END")
        + enc.libxc("CHECKPOINT")
        + enc.page_data([1], [0], bytes(4096))
        + enc.libxc("END")
    )
    assert [n for _, n in _names(decode(data, "libxc"))][2:] == [
        "STATIC_DATA_END",
        "CHECKPOINT",
        "PAGE_DATA",
        "END",
    ]


def test_unknown_optional_records_are_skipped_and_reported(stream_builder):
    records = decode(stream_builder("xl", optional=True))
    skipped = [r for r in records if r.skipped]
    assert [(r.layer, r.rtype.type, r.length) for r in skipped] == [
        ("libxc", 0x80000123, 11),
        ("libxl", 0x80000456, 12),
    ]
    assert all(r.value is None and not r.rtype.mandatory for r in skipped)


def test_page_data_is_a_view_of_the_fed_bytes(stream_builder):
    data = stream_builder("libxc")
    decoder = Decoder("libxc")
    decoder.feed(data)
    pages = [r for r in decoder.records() if r.name == "PAGE_DATA"]
    assert pages[0].value.data.obj is data
    assert pages[0].value.data.readonly
    assert pages[0].value.pfns.tolist() == [0, 1, 2, 0xFEFFF]
    assert pages[0].value.types.tolist() == [0, 0xF, 0, 0xE]
    assert [bytes(v[:1]) for _, _, v in pages[0].value.pages()] == [
        b"\xaa",
        b"\xbb",
    ]


def test_writable_input_is_copied(stream_builder):
    data = bytearray(stream_builder("libxc"))
    decoder = Decoder("libxc")
    decoder.feed(data)
    data[:] = bytes(len(data))  # the caller reuses its buffer
    assert decoder.next_record().name == "IMAGE_HEADER"


def test_transferred_buffer_is_kept_without_copy(stream_builder):
    data = stream_builder("libxc")
    decoder = Decoder("libxc")
    pos = 0
    pages = []
    while (record := decoder.next_record()) is not STREAM_END:
        if record is NEED_DATA:
            # A receiver reading exactly what the decoder needs.
            buf = bytearray(data[pos : pos + decoder.bytes_needed])
            pos += len(buf)
            decoder.feed(buf, transfer=True)
        elif record.name == "PAGE_DATA":
            pages.append(record.value)
    assert isinstance(pages[0].data.obj, bytearray)
    assert pages[0].data.readonly
    assert pos == len(data)


def test_need_data_and_bytes_needed(stream_builder):
    data = stream_builder("libxl")
    decoder = Decoder("libxl")
    assert decoder.next_record() is NEED_DATA
    assert decoder.bytes_needed == 16
    decoder.feed(data[:10])
    assert decoder.next_record() is NEED_DATA
    assert decoder.bytes_needed == 6
    decoder.feed(data[10:])
    assert decoder.next_record().name == "LIBXL_HEADER"


def test_trailing_data_after_the_end(stream_builder):
    data = stream_builder("libxc")
    decoder = Decoder("libxc")
    decoder.feed(data + b"commit")
    list(decoder.records())
    assert decoder.done and decoder.trailing_data == b"commit"
    assert decoder.offset == len(data)
    with pytest.raises(StreamError, match="6 octets after the end"):
        decode(data + b"commit")


def test_one_octet_at_a_time(stream_builder, norm):
    data = stream_builder("xl", optional=True, checkpoint=True)
    decoder = Decoder("xl")
    got = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        got += decoder.records()
    assert decoder.done
    assert [norm(r) for r in got] == [norm(r) for r in decode(data)]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cuts=st.lists(st.integers(0, 40000), max_size=12),
    fmt=st.sampled_from(["xl", "libxl", "libxc"]),
)
def test_any_chunking_gives_the_same_records(stream_builder, norm, cuts, fmt):
    data = stream_builder(fmt, optional=True)
    whole = [norm(r) for r in decode(data, fmt)]
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = Decoder("auto")
    got = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        decoder.feed(data[start:end])
        got += [norm(r) for r in decoder.records()]
    decoder.close()
    got += [norm(r) for r in decoder.records()]
    assert got == whole and decoder.done


def test_xl_header_without_stream_v2_carries_libxc(stream_builder):
    header = xl.pack(xl.Header(xl.MANDATORY_JSON, 0, b"{}"))
    records = decode(header + stream_builder("libxc"))
    assert _names(records)[:3] == [
        ("xl", "XL_HEADER"),
        ("libxc", "IMAGE_HEADER"),
        ("libxc", "DOMAIN_HEADER"),
    ]
    assert records[-1].name == "END" and records[-1].layer == "libxc"


def test_xl_header_extra_optional_data_is_kept():
    header = xl.pack(xl.Header(2, 0, b"cfg", b"tail"))
    value = xl.HeaderCodec().decode(memoryview(header))
    assert (value.config, value.extra) == (b"cfg", b"tail")


def test_version_2_image_is_accepted_without_v3_records():
    enc = Encoder()
    headers = bytearray(join(enc.libxc_headers()))
    headers[15] = 2  # image header version, big-endian u32 at 12..15
    data = bytes(headers) + join(enc.libxc("END"))
    assert decode(data, "libxc")[0].value.version == 2
    v3_only = enc.libxc("STATIC_DATA_END") + enc.libxc("END")
    bad = bytes(headers) + join(v3_only)
    with pytest.raises(StreamError, match="version 2"):
        decode(bad, "libxc")


def test_static_data_end_precedes_memory_once():
    """libxc spec "v3 compat with v2", as Xen's restore enforces it."""
    enc = Encoder()
    page = enc.page_data([1], [0], bytes(4096))
    sde = enc.libxc("STATIC_DATA_END")
    end = enc.libxc("END")
    head = enc.libxc_headers()
    with pytest.raises(StreamError, match="before STATIC_DATA_END") as exc:
        decode(join(head + page + sde + end), "libxc")
    assert exc.value.record == "libxc PAGE_DATA"
    with pytest.raises(StreamError, match="second STATIC_DATA_END"):
        decode(join(head + sde + page + sde + end), "libxc")
    assert len(decode(join(head + sde + page + page + end), "libxc")) == 6


def test_version_2_image_infers_static_data_end():
    enc = Encoder()
    headers = bytearray(join(enc.libxc_headers()))
    headers[15] = 2
    page = enc.page_data([1], [0], bytes(4096))
    records = decode(bytes(headers) + join(page + page + enc.libxc("END")))
    assert [r.name for r in records][2:] == ["PAGE_DATA", "PAGE_DATA", "END"]


def test_errors_are_sticky():
    decoder = Decoder("libxc")
    decoder.feed(b"\0" * 24)
    with pytest.raises(StreamError) as first:
        decoder.next_record()
    with pytest.raises(StreamError) as again:
        decoder.next_record()
    assert again.value is first.value
    with pytest.raises(StreamError):
        decoder.feed(b"more")


def test_feed_after_close_and_bad_arguments():
    decoder = Decoder("xl")
    decoder.close()
    with pytest.raises(StreamError, match="after close"):
        decoder.feed(b"x")
    with pytest.raises(ValueError):
        Decoder("qcow2")
    with pytest.raises(StreamError, match="cannot feed"):
        Decoder().feed(12)


def test_buffering_is_bounded(stream_builder):
    decoder = Decoder("xl", max_buffer=4096)
    decoder.feed(b"\0" * 4000)
    with pytest.raises(StreamError, match="drain"):
        decoder.feed(b"\0" * 100)
