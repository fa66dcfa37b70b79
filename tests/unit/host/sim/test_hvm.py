import struct

import pytest

from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import hvm


def _blob(vcpus=2):
    return hvm.encode(hvm.default_records(vcpus, 3000000))


def test_record_sizes_match_save_h():
    # hvm_hw_cpu: fpu 512, 22 u64 regs, 6 dr, 18 u32 selectors/limits,
    # 10 u64 bases, 8 u32 arbytes, 3+1+7 u64 msrs, tsc, 4 u32.
    cpu = 512 + 22 * 8 + 6 * 8 + 18 * 4 + 10 * 8 + 8 * 4 + 11 * 8 + 8 + 16
    lengths = {code: length for code, _, length, _ in hvm.RECORDS}
    assert lengths[hvm.CODE_CPU] == cpu == 1032
    assert lengths[hvm.CODE_HEADER] == hvm.HEADER.size == 24
    assert lengths[hvm.CODE_IOAPIC] == 8 + 4 + 4 + 48 * 8
    assert lengths[hvm.CODE_MTRR] == 8 * (1 + 16 + 11 + 2)
    assert lengths[hvm.CODE_PIT] == 3 * 16 + 8


def test_framing_header_first_end_last_round_trip():
    blob = _blob()
    code, inst, length = hvm.DESCRIPTOR.unpack_from(blob, 0)
    assert (code, inst, length) == (hvm.CODE_HEADER, 0, 24)
    assert blob[-8:] == hvm.DESCRIPTOR.pack(hvm.CODE_END, 0, 0)
    records = hvm.decode(blob, 2)
    assert [r.typecode for r in records] == sorted(r.typecode for r in records)
    assert sum(r.typecode == hvm.CODE_CPU for r in records) == 2
    assert hvm.encode(records) == blob


def test_cpu_registers_round_trip():
    rec = hvm.default_records(1, 1000)[1]
    data = hvm.with_cpu_registers(rec.data, {"rip": 12345, "tsc": 99})
    regs = hvm.cpu_registers(data)
    assert regs["rip"] == 12345 and regs["tsc"] == 99
    assert len(data) == len(rec.data)


def _corrupt(blob, offset, fmt, value):
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-8], "no END"),
        (lambda b: b + b"\0", "after END"),
        (lambda b: b[:-4], "truncated"),
        (lambda b: _corrupt(b, 8, "<I", 0xDEAD), "magic"),
        (lambda b: _corrupt(b, 0, "<H", 77), "unknown record typecode 77"),
        (lambda b: _corrupt(b, 4, "<I", 25), "length 25"),
        (lambda b: _corrupt(b, 0, "<H", hvm.CODE_CPU), "not HEADER"),
        (lambda b: _corrupt(b, 32 + 2, "<H", 5), "instance 5 out of range"),
        (lambda b: _corrupt(b, 32 + 2, "<H", 1), "duplicate CPU"),
    ],
)
def test_malformed_blobs_are_refused(mutate, message):
    with pytest.raises(HostError, match=message):
        hvm.decode(mutate(_blob()), 2)


def test_missing_vcpu_record_is_refused():
    blob = _blob(vcpus=1)
    with pytest.raises(HostError, match="no CPU record for vCPU 1"):
        hvm.decode(blob, 2)


def test_out_of_order_records_are_refused():
    recs = hvm.default_records(1, 1000)
    recs[1], recs[2] = recs[2], recs[1]
    with pytest.raises(HostError, match="out of typecode order"):
        hvm.decode(hvm.encode(recs), 1)


@pytest.mark.parametrize("start", [0, 1, 6, 7, 0xFFFFFFFF])
def test_time_versions_end_even_whatever_they_were(start):
    """version_update_begin/end: odd while the fields change, even after,
    also from an odd version left in a restored page."""
    vi = bytearray(64)
    struct.pack_into("<I", vi, hvm.VCPU_TIME_OFFSET, start)
    hvm.write_vcpu_time(vi, 5, 9, hvm.TimeScale.for_khz(1_000_000))
    info = hvm.read_vcpu_time(bytes(vi))
    assert info["version"] % 2 == 0 and info["version"] != start
    assert (info["tsc_timestamp"], info["system_time"]) == (5, 9)
    si = bytearray(4096)
    struct.pack_into("<I", si, hvm.SHINFO_WC, start)
    hvm.write_wallclock(si, 3 * hvm.NSEC_PER_SEC + 4)
    version = struct.unpack_from("<I", si, hvm.SHINFO_WC)[0]
    assert version % 2 == 0 and version != start
    assert hvm.read_wallclock(bytes(si)) == 3 * hvm.NSEC_PER_SEC + 4
