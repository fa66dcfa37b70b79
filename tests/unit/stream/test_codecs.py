"""Every Xen record type round-trips encode -> decode (property tests)."""

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from nova_xen_ncm.stream import codecs
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream.decoder import Decoder
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.errors import StreamError
from nova_xen_ncm.stream.records import RecordType

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
blob = st.binary(max_size=64).map(memoryview)


@st.composite
def page_data(draw):
    count = draw(st.integers(1, 6))
    pfns = draw(st.lists(st.integers(0, libxc.PFN_MASK), min_size=count,
                         max_size=count))  # fmt: skip
    types = draw(
        st.lists(
            st.sampled_from(sorted(libxc.PAGE_TYPES)),
            min_size=count,
            max_size=count,
        )
    )
    with_data = int(np.count_nonzero(libxc.carries_data(np.array(types))))
    fills = draw(st.lists(st.integers(0, 255), min_size=with_data,
                          max_size=with_data))  # fmt: skip
    pages = [bytes([f]) * libxc.PAGE_SIZE for f in fills]
    return libxc.PageData(np.array(pfns, np.uint64), np.array(types), pages)


def _descriptors(items):
    out = [libxc.HvmSaveDescriptor(t, i, d) for t, i, d in items]
    return libxc.HvmContext(out + [libxc.HvmSaveDescriptor(0, 0, b"")])


def _array(dtype):
    fields = [u64 if dtype[n] == np.dtype("<u8") else u32 for n in dtype.names]
    return st.lists(st.tuples(*fields), min_size=1, max_size=8).map(
        lambda items: np.array(items, dtype=dtype)
    )


xs_text = st.binary(min_size=1, max_size=16).filter(lambda b: b"\0" not in b)

VALUES = {
    ("libxc", "END"): st.none(),
    ("libxc", "PAGE_DATA"): page_data(),
    ("libxc", "X86_PV_INFO"): st.builds(
        libxc.X86PvInfo, st.sampled_from([4, 8]), st.sampled_from([3, 4])
    ),
    ("libxc", "X86_PV_P2M_FRAMES"): st.builds(
        libxc.X86PvP2mFrames,
        u32,
        u32,
        st.lists(u64, max_size=8).map(lambda v: np.array(v, np.uint64)),
    ),
    ("libxc", "X86_PV_VCPU_BASIC"): st.builds(libxc.X86PvVcpu, u32, blob),
    ("libxc", "X86_PV_VCPU_EXTENDED"): st.builds(libxc.X86PvVcpu, u32, blob),
    ("libxc", "X86_PV_VCPU_XSAVE"): st.builds(libxc.X86PvVcpu, u32, blob),
    ("libxc", "X86_PV_VCPU_MSRS"): st.builds(libxc.X86PvVcpu, u32, blob),
    ("libxc", "SHARED_INFO"): st.integers(0, 255).map(
        lambda f: memoryview(bytes([f]) * 4096)
    ),
    ("libxc", "X86_TSC_INFO"): st.builds(libxc.X86TscInfo, u32, u32, u64, u32),
    ("libxc", "HVM_CONTEXT"): st.lists(
        st.tuples(st.integers(1, 40), u16, blob), max_size=6
    ).map(_descriptors),
    ("libxc", "HVM_PARAMS"): st.lists(
        st.builds(libxc.HvmParam, u64, u64), max_size=10
    ),
    ("libxc", "TOOLSTACK"): blob,
    ("libxc", "VERIFY"): st.none(),
    ("libxc", "CHECKPOINT"): st.none(),
    ("libxc", "CHECKPOINT_DIRTY_PFN_LIST"): st.lists(u64, max_size=8).map(
        lambda v: np.array(v, np.uint64)
    ),
    ("libxc", "STATIC_DATA_END"): st.none(),
    ("libxc", "X86_CPUID_POLICY"): _array(libxc.CPUID_LEAF),
    ("libxc", "X86_MSR_POLICY"): _array(libxc.MSR_ENTRY),
    ("libxl", "END"): st.none(),
    ("libxl", "LIBXC_CONTEXT"): st.none(),
    ("libxl", "EMULATOR_XENSTORE_DATA"): st.builds(
        libxl.EmulatorXenstoreData,
        st.sampled_from(sorted(libxl.EMULATORS)),
        u32,
        st.lists(st.tuples(xs_text, xs_text), max_size=4),
    ),
    ("libxl", "EMULATOR_CONTEXT"): st.builds(
        libxl.EmulatorContext,
        st.sampled_from(sorted(libxl.EMULATORS)),
        u32,
        blob,
    ),
    ("libxl", "CHECKPOINT_END"): st.none(),
    ("libxl", "CHECKPOINT_STATE"): st.integers(0, 3),
}

XEN_ROWS = [*libxc.XEN_ROWS, *libxl.XEN_ROWS]


def test_every_xen_row_has_a_strategy():
    assert {(r.layer, r.name) for r in XEN_ROWS} == set(VALUES)


@pytest.mark.parametrize("row", XEN_ROWS, ids=lambda r: f"{r.layer}-{r.name}")
@SETTINGS
@given(data=st.data())
def test_body_round_trip(row, data, norm):
    value = data.draw(VALUES[(row.layer, row.name)])
    body = join(row.codec.encode(value))
    assert len(body) <= row.max_length
    decoded = row.codec.decode(memoryview(body).toreadonly())
    assert norm(decoded) == norm(value)
    # Encoding what was decoded gives the same octets.
    assert join(row.codec.encode(decoded)) == body


# Records that switch layers cannot sit in the middle of a bare stream.
_SWITCHING = {("libxc", "END"), ("libxl", "END"), ("libxl", "LIBXC_CONTEXT")}


@pytest.mark.parametrize(
    "row",
    [r for r in XEN_ROWS if (r.layer, r.name) not in _SWITCHING],
    ids=lambda r: f"{r.layer}-{r.name}",
)
@SETTINGS
@given(data=st.data())
def test_record_round_trip_in_a_stream(row, data, norm):
    value = data.draw(VALUES[(row.layer, row.name)])
    enc = Encoder()
    if row.layer == "libxc":
        parts = enc.libxc_headers()
        if row.name != "STATIC_DATA_END":
            parts += enc.libxc("STATIC_DATA_END")
        parts += enc.record_of(row, value) + enc.libxc("END")
    else:
        parts = enc.libxl_header() + enc.record_of(row, value)
        parts += enc.libxl("END")
    stream = join(parts)
    assert len(stream) % 8 == 0
    decoder = Decoder(row.layer)
    decoder.feed(stream)
    decoder.close()
    found = [r for r in decoder.records() if not r.rtype.is_header]
    assert [r.name for r in found[-2:]] == [row.name, "END"]
    assert norm(found[-2].value) == norm(value)
    assert decoder.done and decoder.offset == len(stream)


def test_page_data_views_and_pages():
    pages = [b"\x01" * 4096, b"\x02" * 4096]
    value = libxc.PageData([7, 8, 9], [libxc.NOTAB, libxc.XTAB, 0x1], pages)
    body = join(libxc.PageDataCodec().encode(value))
    decoded = libxc.PageDataCodec().decode(memoryview(body))
    assert decoded.pfns.dtype == np.uint64
    assert decoded.has_data.tolist() == [True, False, True]
    assert [(p, t, bytes(v)[:1]) for p, t, v in decoded.pages()] == [
        (7, 0, b"\x01"),
        (9, 1, b"\x02"),
    ]
    assert decoded.data.obj is body  # a view of the body, not a copy


@pytest.mark.parametrize(
    ("pfns", "types", "pages", "message"),
    [
        ([], [], [], "non-empty"),
        ([1], [5], [], "invalid page type"),
        ([1 << 52], [0], [b"\0" * 4096], "52 bits"),
        ([1], [0], [], "1 pages carry data"),
        ([1], [libxc.XTAB], [b"\0" * 4096], "0 pages carry data"),
        ([1, 2], [0], [b"\0" * 4096], "non-empty"),
    ],
)
def test_page_data_encode_rejects(pfns, types, pages, message):
    with pytest.raises(BodyError, match=message):
        libxc.PageDataCodec().encode(libxc.PageData(pfns, types, pages))


def test_encoder_wraps_body_errors_and_limits():
    enc = Encoder()
    with pytest.raises(StreamError, match="libxc X86_TSC_INFO"):
        enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(-1, 0, 0, 0))
    small = RecordType(0x7, "SMALL", "libxc", codecs.Blob(), 16)
    with pytest.raises(StreamError, match="exceeds the limit 16"):
        enc.record_of(small, memoryview(bytes(17)))
    assert len(join(enc.record_of(small, memoryview(bytes(16))))) == 24
    with pytest.raises(StreamError, match="no libxl record named"):
        enc.libxl("PAGE_DATA")
    with pytest.raises(StreamError):
        enc.libxl("EMULATOR_CONTEXT", libxl.EmulatorContext(9, 0, b""))
    with pytest.raises(StreamError, match="needs 4 fields"):
        enc.libxc("X86_TSC_INFO", (1, 2))
    with pytest.raises(StreamError, match="cannot encode"):
        enc.page_data([-1], [0], bytes(4096))
    with pytest.raises(StreamError, match="cannot encode"):
        enc.libxc("HVM_CONTEXT", 42)


def test_struct_reserved_fields_must_be_zero():
    row = tables.libxc_table().by_name("X86_TSC_INFO")
    body = bytearray(join(row.codec.encode(libxc.X86TscInfo(1, 2, 3, 4))))
    body[20] = 1
    with pytest.raises(BodyError, match="reserved"):
        row.codec.decode(memoryview(body))


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("END", b"\0", "empty"),
        ("HVM_PARAMS", b"\x01\0\0\0\0\0\0\0", "needs 24"),
        ("HVM_PARAMS", b"\0\0\0\0\x01\0\0\0", "reserved"),
        ("HVM_CONTEXT", b"", "empty"),
        ("HVM_CONTEXT", b"\x01\0\0\0\xff\0\0\0", "claims 255"),
        ("HVM_CONTEXT", b"\x01\0\0\0\0\0\0\0", "no END"),
        ("HVM_CONTEXT", b"\0\0\0\0\0\0\0\0junk", "after the END"),
        ("HVM_CONTEXT", b"\0\0\x01\0\0\0\0\0", "not all zero"),
        ("X86_CPUID_POLICY", b"", "at least 1"),
        ("X86_CPUID_POLICY", b"\0" * 25, "whole number"),
        ("SHARED_INFO", b"\0" * 4095, "4096"),
        ("X86_PV_INFO", b"\x02\x03\0\0\0\0\0\0", "unsupported"),
        ("X86_PV_P2M_FRAMES", b"\0" * 12, "not 8"),
        ("X86_PV_VCPU_BASIC", b"\0\0\0\0\x01\0\0\0", "reserved"),
        ("PAGE_DATA", b"\x01\0\0\0", "shorter"),
        ("PAGE_DATA", b"\0" * 8, "count is 0"),
        ("PAGE_DATA", b"\x01\0\0\0\0\0\0\x01" + bytes(8), "reserved"),
        ("PAGE_DATA", b"\x02\0\0\0\0\0\0\0" + bytes(8), "count 2"),
    ],
)
def test_libxc_body_errors(name, body, message):
    row = tables.libxc_table().by_name(name)
    with pytest.raises(BodyError, match=message):
        row.codec.decode(memoryview(body))


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("EMULATOR_CONTEXT", b"\x02\0\0", "shorter"),
        ("EMULATOR_CONTEXT", b"\x07\0\0\0\0\0\0\0", "unknown emulator"),
        ("EMULATOR_XENSTORE_DATA", b"\x02" + bytes(7) + b"k", "NUL"),
        ("EMULATOR_XENSTORE_DATA", b"\x02" + bytes(7) + b"k\0", "without"),
        ("CHECKPOINT_STATE", b"\x04\0\0\0", "unknown control_id"),
        ("CHECKPOINT_STATE", b"\0\0\0\0\0\0\0\x01", "padding"),
        ("CHECKPOINT_STATE", b"\0\0", "4 octets"),
    ],
)
def test_libxl_body_errors(name, body, message):
    row = tables.libxl_table().by_name(name)
    with pytest.raises(BodyError, match=message):
        row.codec.decode(memoryview(body))
