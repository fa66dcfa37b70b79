"""Non-cooperative migration record bodies
(doc/source/specs/non-cooperative-records.rst)."""

from __future__ import annotations

import dataclasses
import json
import struct
import tracemalloc
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import RecordTable

# Xen's own record types (libxc-migration-stream.pandoc "Records",
# libxl-migration-stream.pandoc "Record Overview") and the xenstore
# migration stream's (xenstore-migration.md "Records").
XEN_LIBXC_TYPES = {
    0x00: "END",
    0x01: "PAGE_DATA",
    0x02: "X86_PV_INFO",
    0x03: "X86_PV_P2M_FRAMES",
    0x04: "X86_PV_VCPU_BASIC",
    0x05: "X86_PV_VCPU_EXTENDED",
    0x06: "X86_PV_VCPU_XSAVE",
    0x07: "SHARED_INFO",
    0x08: "X86_TSC_INFO",
    0x09: "HVM_CONTEXT",
    0x0A: "HVM_PARAMS",
    0x0B: "TOOLSTACK",
    0x0C: "X86_PV_VCPU_MSRS",
    0x0D: "VERIFY",
    0x0E: "CHECKPOINT",
    0x0F: "CHECKPOINT_DIRTY_PFN_LIST",
    0x10: "STATIC_DATA_END",
    0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
}
XEN_LIBXL_TYPES = {
    0x00: "END",
    0x01: "LIBXC_CONTEXT",
    0x02: "EMULATOR_XENSTORE_DATA",
    0x03: "EMULATOR_CONTEXT",
    0x04: "CHECKPOINT_END",
    0x05: "CHECKPOINT_STATE",
}
XENSTORE_TYPES = set(range(0x00, 0x09))

ALL_RECORDS = ncm.LIBXC_RECORDS + ncm.LIBXL_RECORDS
CODECS = {row.name: row.codec for row in ALL_RECORDS}


def encode(name: str, value) -> bytes:
    return b"".join(bytes(b) for b in CODECS[name].encode(value))


def decode(name: str, body: bytes):
    return CODECS[name].decode(memoryview(body))


# -- Record tables ------------------------------------------------------------


def test_every_record_is_mandatory():
    for row in ALL_RECORDS:
        assert row.mandatory, row.name
        assert not row.type & 0x80000000, row.name


def test_layers():
    assert {r.layer for r in ncm.LIBXC_RECORDS} == {"libxc"}
    assert {r.layer for r in ncm.LIBXL_RECORDS} == {"libxl"}
    # Hypervisor state in libxc; domid, xenstore, backends in libxl.
    assert {r.name for r in ncm.LIBXC_RECORDS} == {
        "NCM_SHARED_INFO",
        "NCM_EVENT_CHANNELS",
        "NCM_GRANT_TABLE",
        "NCM_VCPU_PV",
    }
    RecordTable("libxc", ncm.LIBXC_RECORDS)
    RecordTable("libxl", ncm.LIBXL_RECORDS)


def test_type_numbers_do_not_collide_with_xen():
    xc = {r.type for r in ncm.LIBXC_RECORDS}
    xl = {r.type for r in ncm.LIBXL_RECORDS}
    assert not xc & set(XEN_LIBXC_TYPES)
    assert not xl & set(XEN_LIBXL_TYPES)
    assert not (xc | xl) & XENSTORE_TYPES
    # Distinct across layers, so a record in the wrong layer is unknown
    # there rather than misread.
    assert not xc & xl
    assert len(xc | xl) == len(ALL_RECORDS)
    # Far from the numbers Xen allocates next, inside the project's block.
    for rtype in xc | xl:
        assert rtype >> 16 == 0x4E43
        assert rtype > 0x10000 * max(XEN_LIBXC_TYPES)
    assert all(r.type >> 8 & 0xFF == 0x01 for r in ncm.LIBXC_RECORDS)
    assert all(r.type >> 8 & 0xFF == 0x02 for r in ncm.LIBXL_RECORDS)


def test_names_do_not_collide_with_xen():
    names = {r.name for r in ALL_RECORDS}
    assert not names & set(XEN_LIBXC_TYPES.values())
    assert not names & set(XEN_LIBXL_TYPES.values())
    assert all(name.startswith("NCM_") for name in names)
    assert set(ncm.VALUE_TYPES) == names


# -- Layout sizes (spec tables) -----------------------------------------------

DOCUMENTED_SIZES = {
    "DOMAIN_HEADER": (ncm.DOMAIN_HEADER, 32),
    "SHARED_INFO_HEADER": (ncm.SHARED_INFO_HEADER, 16),
    "VCPU_INFO_ENTRY": (ncm.VCPU_INFO_ENTRY, 16),
    "VCPU_PV_HEADER": (ncm.VCPU_PV_HEADER, 16),
    "VCPU_PV_ENTRY": (ncm.VCPU_PV_ENTRY, 40),
    "EVTCHN_HEADER": (ncm.EVTCHN_HEADER, 24),
    "FIFO_VCPU_ENTRY": (ncm.FIFO_VCPU_ENTRY, 80),
    "GNTTAB_HEADER": (ncm.GNTTAB_HEADER, 16),
    "XS_CONNECTION_HEADER": (ncm.XS_CONNECTION_HEADER, 24),
    "XS_WATCH_HEADER": (ncm.XS_WATCH_HEADER, 12),
    "XS_TRANSACTION_BODY": (ncm.XS_TRANSACTION_BODY, 8),
    "XS_NODE_HEADER": (ncm.XS_NODE_HEADER, 16),
    "XS_PERM": (ncm.XS_PERM, 4),
    "PV_DEVICE_HEADER": (ncm.PV_DEVICE_HEADER, 24),
    "PV_RING_HEADER": (ncm.PV_RING_HEADER, 32),
    "PV_INFLIGHT_HEADER": (ncm.PV_INFLIGHT_HEADER, 16),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_SIZES))
def test_struct_sizes(name):
    layout, size = DOCUMENTED_SIZES[name]
    assert struct.calcsize(layout.format) == size
    assert layout.format.startswith("<")


def test_entry_dtypes_match_structs():
    assert ncm.PORT_DTYPE.itemsize == struct.calcsize(ncm.PORT_ENTRY_FORMAT)
    assert ncm.PORT_DTYPE.itemsize == 24
    # grant_entry_v1_t, grant_entry_v2_t, grant_status_t (grant_table.h).
    assert ncm.GNT_V1_DTYPE.itemsize == 8
    assert ncm.GNT_V2_DTYPE.itemsize == 16
    assert ncm.GNT_STATUS_DTYPE.itemsize == 2
    assert ncm.GNTTAB_V1_PER_FRAME == 512
    assert ncm.GNTTAB_STATUS_PER_FRAME == 2048


def test_fixed_parts_keep_8_octet_alignment():
    # Every project-defined array starts 8-aligned because each fixed part
    # before it is a multiple of 8 (spec "Alignment").
    for layout in (
        ncm.DOMAIN_HEADER,
        ncm.SHARED_INFO_HEADER,
        ncm.VCPU_INFO_ENTRY,
        ncm.VCPU_PV_HEADER,
        ncm.VCPU_PV_ENTRY,
        ncm.EVTCHN_HEADER,
        ncm.FIFO_VCPU_ENTRY,
        ncm.GNTTAB_HEADER,
        ncm.PV_DEVICE_HEADER,
        ncm.PV_RING_HEADER,
        ncm.PV_INFLIGHT_HEADER,
    ):
        assert layout.size % 8 == 0, layout.format


def test_ring_size_matches_io_ring_h():
    # One page: blkif (112-octet slots) has 32 entries, netif tx 256,
    # netif rx 256 (8-octet slots: 504 rounded down).
    assert ncm.ring_size(1, 112) == 32
    assert ncm.ring_size(1, 12) == 256
    assert ncm.ring_size(1, 8) == 256
    assert ncm.ring_size(16, 112) == 512


def test_max_lengths_hold_the_largest_valid_body():
    domain = ncm.NcmDomain(
        1,
        uuid.UUID(int=0),
        0,
        0,
        tuple(range(2, 2 + ncm.MAX_BACKEND_DOMAINS)),
    )
    body = encode("NCM_DOMAIN", domain)
    assert len(body) == ncm.MAX_LENGTH["NCM_DOMAIN"]
    frames = ncm.MAX_GRANT_FRAMES
    table = ncm.GrantTable(
        2,
        (ncm.INVALID_GFN,) * frames,
        np.zeros(frames * ncm.GNTTAB_V2_PER_FRAME, ncm.GNT_V2_DTYPE),
        (7,) * ncm.MAX_GRANT_STATUS_FRAMES,
        np.zeros(
            ncm.MAX_GRANT_STATUS_FRAMES * ncm.GNTTAB_STATUS_PER_FRAME,
            ncm.GNT_STATUS_DTYPE,
        ),
    )
    assert (
        len(encode("NCM_GRANT_TABLE", table))
        == (ncm.MAX_LENGTH["NCM_GRANT_TABLE"])
    )
    for row in ALL_RECORDS:
        assert 0 < row.max_length < 1 << 32


# -- Strategies ---------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
guest_domid = st.integers(1, ncm.DOMID_FIRST_RESERVED - 1)
any_domid = st.integers(0, ncm.DOMID_FIRST_RESERVED - 1)
gfn = st.integers(0, ncm.MAX_GFN)
port = st.integers(1, ncm.EVTCHN_FIFO_NR_CHANNELS - 1)
xs_chars = "abcXYZ019-_@"
xs_abs_path = st.lists(
    st.text(xs_chars, min_size=1, max_size=12), min_size=1, max_size=6
).map(lambda parts: "/" + "/".join(parts))
xs_rel_path = st.lists(
    st.text(xs_chars, min_size=1, max_size=12), min_size=1, max_size=4
).map("/".join)
xs_any_path = xs_abs_path | xs_rel_path
cbytes = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))


@st.composite
def ncm_domains(draw):
    domid = draw(guest_domid)
    backends = draw(st.sets(any_domid, max_size=8))
    backends.discard(domid)
    return ncm.NcmDomain(
        domid=domid,
        uuid=draw(st.uuids()),
        store_domid=draw(any_domid),
        console_domid=draw(any_domid),
        backend_domids=tuple(sorted(backends)),
    )


@st.composite
def shared_infos(draw):
    compat = draw(st.booleans())
    align = 4 if compat else 8
    n = draw(st.integers(1, 40))
    entries = []
    for i in range(n):
        base = ncm.VcpuInfoKind.LEGACY if i < 32 else ncm.VcpuInfoKind.NONE
        if draw(st.booleans()):
            offset = align * draw(st.integers(0, (4096 - 64) // align))
            entries.append(
                ncm.VcpuInfoPlacement(
                    i, ncm.VcpuInfoKind.REGISTERED, draw(gfn), offset
                )
            )
        else:
            entries.append(ncm.VcpuInfoPlacement(i, base))
    return ncm.SharedInfo(
        gfn=draw(gfn | st.just(ncm.INVALID_GFN)),
        page=draw(st.binary(min_size=64, max_size=64)) * 64,
        vcpu_info=tuple(entries),
        compat_layout=compat,
    )


@st.composite
def guest_areas(draw, size: int):
    kind = draw(st.sampled_from(list(ncm.GuestAreaKind)))
    if kind is ncm.GuestAreaKind.NONE:
        return kind, 0
    if kind is ncm.GuestAreaKind.VIRTUAL:
        return kind, draw(st.integers(0, 2**64 - 1))
    offset = 4 * draw(st.integers(0, (4096 - size) // 4))
    return kind, draw(gfn) << 12 | offset


@st.composite
def vcpu_pvs(draw):
    states = []
    for i in range(draw(st.integers(1, 8))):
        rkind, raddr = draw(guest_areas(44))
        tkind, taddr = draw(guest_areas(32))
        states.append(
            ncm.VcpuPvState(
                i,
                rkind,
                raddr,
                tkind,
                taddr,
                draw(st.none() | st.integers(0, ncm.STIME_DELTA_MAX)),
                draw(st.just(0) | st.integers(10**6, ncm.STIME_DELTA_MAX)),
                draw(st.just(0) | st.integers(0x10, 0xFF)),
            )
        )
    return ncm.VcpuPv(draw(st.sampled_from([0, 1 << 5])), tuple(states))


@st.composite
def port_rows(draw, fifo: bool):
    limit = ncm.EVTCHN_FIFO_NR_CHANNELS if fifo else ncm.EVTCHN_2L_NR_CHANNELS
    numbers = sorted(draw(st.sets(st.integers(1, limit - 1), max_size=40)))
    rows = []
    for number in numbers:
        kind = draw(st.sampled_from(list(ncm.EvtchnType)))
        remote, binding = 0, 0
        if kind in (ncm.EvtchnType.UNBOUND, ncm.EvtchnType.INTERDOMAIN):
            remote = draw(any_domid)
        if kind is ncm.EvtchnType.INTERDOMAIN:
            binding = draw(port)
        elif kind is ncm.EvtchnType.VIRQ:
            binding = draw(st.integers(0, ncm.NR_VIRQS - 1))
        elif kind is ncm.EvtchnType.PIRQ:
            binding = draw(u32)
        flags = draw(st.integers(0, 7 if fifo else 3))
        prio = draw(st.integers(0, 15)) if fifo else 0
        last_prio = draw(st.integers(0, 15)) if fifo else 0
        last_vcpu = draw(st.integers(0, 127)) if fifo else 0
        vcpu = draw(st.integers(0, 127))
        rows.append(
            (
                number,
                vcpu,
                binding,
                remote,
                kind,
                flags,
                prio,
                last_prio,
                0,
                last_vcpu,
            )
        )
    return ncm.port_array(rows)


@st.composite
def event_channels(draw):
    abi = draw(st.sampled_from(list(ncm.EvtchnAbi)))
    fifo = abi is ncm.EvtchnAbi.FIFO
    blocks, pages = (), ()
    tails = st.lists(st.integers(0, 2**17 - 1), min_size=16, max_size=16)
    if fifo:
        vcpu_ids = st.sets(st.integers(0, 127), min_size=1, max_size=4)
        vcpus = sorted(draw(vcpu_ids))
        blocks = tuple(
            ncm.FifoVcpu(
                v,
                draw(gfn),
                8 * draw(st.integers(0, (4096 - 72) // 8)),
                tuple(draw(tails)),
            )
            for v in vcpus
        )
        pages = tuple(draw(st.lists(gfn, max_size=4)))
    return ncm.EventChannels(abi, draw(port_rows(fifo)), blocks, pages)


@st.composite
def grant_tables(draw):
    version = draw(st.sampled_from([1, 2]))
    nframes = draw(st.integers(1, 3))
    gfns = tuple(
        draw(
            st.lists(
                gfn | st.just(ncm.INVALID_GFN),
                min_size=nframes,
                max_size=nframes,
            )
        )
    )
    raw = draw(st.binary(min_size=64, max_size=64)) * (nframes * 64)
    dtype = ncm.GNT_V1_DTYPE if version == 1 else ncm.GNT_V2_DTYPE
    entries = np.frombuffer(raw, dtype)
    if version == 1:
        return ncm.GrantTable(1, gfns, entries)
    nstatus = -(-nframes // 8)
    sgfns = tuple(draw(st.lists(gfn, min_size=nstatus, max_size=nstatus)))
    status = np.frombuffer(
        draw(st.binary(min_size=16, max_size=16)) * (nstatus * 256),
        ncm.GNT_STATUS_DTYPE,
    )
    return ncm.GrantTable(2, gfns, entries, sgfns, status)


@st.composite
def xs_connections(draw):
    out = draw(st.binary(max_size=200))
    return ncm.XsConnection(
        conn_id=draw(st.integers(1, 0xFFFFFFFF)),
        domid=draw(guest_domid),
        target_domid=draw(any_domid | st.just(ncm.DOMID_INVALID)),
        evtchn=draw(port),
        in_data=draw(st.binary(max_size=100)),
        out_data=out,
        out_resp_len=draw(st.integers(0, len(out))),
        unique_id=draw(st.none() | st.integers(0, 2**64 - 1)),
    )


xs_watches = st.builds(
    ncm.XsWatch,
    conn_id=st.integers(1, 0xFFFFFFFF),
    path=xs_any_path,
    token=cbytes,
    depth=st.integers(0, 0xFFFF),
)
xs_transactions = st.builds(
    ncm.XsTransaction,
    conn_id=st.integers(1, 0xFFFFFFFF),
    tx_id=st.integers(1, 0xFFFFFFFF),
)
xs_perms = st.builds(
    ncm.XsPerm,
    perm=st.sampled_from("wrbn"),
    domid=any_domid,
    stale=st.booleans(),
)


@st.composite
def xs_nodes(draw):
    path = draw(xs_abs_path)
    if draw(st.booleans()):
        return ncm.XsNode(
            path,
            draw(st.binary(max_size=100)),
            tuple(draw(st.lists(xs_perms, min_size=1, max_size=5))),
        )
    conn, tx = draw(st.integers(1, 2**32 - 1)), draw(st.integers(1, 2**32 - 1))
    if draw(st.booleans()):
        return ncm.XsNode(path, b"", (), conn, tx, 0)
    return ncm.XsNode(
        path,
        draw(st.binary(max_size=100)),
        tuple(draw(st.lists(xs_perms, min_size=1, max_size=5))),
        conn,
        tx,
        draw(st.integers(0, 3)),
    )


@st.composite
def pv_rings(draw, kind: ncm.RingKind, queue: int):
    if kind is ncm.RingKind.CONSOLE:
        return ncm.PvRing(kind, queue, (draw(u32),), draw(port), draw(port))
    nrefs = draw(st.sampled_from([1, 2, 4, 8, 16]))
    slot = 4 * draw(st.integers(1, 128))
    size = ncm.ring_size(nrefs, slot)
    outstanding = draw(st.integers(0, min(size, 6)))
    req_cons = draw(u32)
    ages = sorted(
        draw(
            st.sets(
                st.integers(1, size),
                min_size=outstanding,
                max_size=outstanding,
            )
        ),
        reverse=True,
    )
    inflight = tuple(
        ncm.InflightRequest(
            (req_cons - age) % 2**32,
            draw(st.integers(0, 2**64 - 1)),
            draw(st.binary(min_size=slot, max_size=slot)),
        )
        for age in ages
    )
    return ncm.PvRing(
        kind=kind,
        queue=queue,
        ring_refs=tuple(draw(st.lists(u32, min_size=nrefs, max_size=nrefs))),
        frontend_port=draw(port),
        backend_port=draw(port),
        slot_size=slot,
        req_cons=req_cons,
        rsp_prod_pvt=(req_cons - outstanding) % 2**32,
        inflight=inflight,
    )


@st.composite
def pv_devices(draw):
    kind = draw(st.sampled_from(list(ncm.DeviceKind)))
    fdomid = draw(guest_domid)
    bdomid = draw(any_domid.filter(lambda d: d != fdomid))
    kinds = sorted(ncm.DEVICE_RINGS[kind])
    rings = []
    for queue in range(draw(st.integers(0, 2))):
        for rkind in kinds:
            rings.append(draw(pv_rings(rkind, queue)))
    return ncm.PvDevice(
        kind=kind,
        devid=draw(u32),
        backend_domid=bdomid,
        frontend_domid=fdomid,
        backend_state=draw(st.sampled_from(list(ncm.XenbusState))),
        frontend_state=draw(st.sampled_from(list(ncm.XenbusState))),
        frontend_path=draw(xs_abs_path),
        backend_path=draw(xs_abs_path),
        rings=tuple(rings),
    )


STRATEGIES = {
    "NCM_DOMAIN": ncm_domains(),
    "NCM_SHARED_INFO": shared_infos(),
    "NCM_VCPU_PV": vcpu_pvs(),
    "NCM_EVENT_CHANNELS": event_channels(),
    "NCM_GRANT_TABLE": grant_tables(),
    "NCM_XS_CONNECTION": xs_connections(),
    "NCM_XS_WATCH": xs_watches,
    "NCM_XS_TRANSACTION": xs_transactions,
    "NCM_XS_NODE": xs_nodes(),
    "NCM_PV_DEVICE": pv_devices(),
}

FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_every_record_has_a_strategy():
    assert set(STRATEGIES) == {r.name for r in ALL_RECORDS}


# -- Round trips --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@FAST
@given(data=st.data())
def test_round_trip(name, data):
    value = data.draw(STRATEGIES[name])
    body = encode(name, value)
    assert len(body) <= ncm.MAX_LENGTH[name]
    decoded = decode(name, body)
    assert type(decoded) is ncm.VALUE_TYPES[name]
    assert decoded == value
    assert encode(name, decoded) == body
    json.dumps(decoded.summary())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@FAST
@given(data=st.data())
def test_mutated_body_is_refused_or_round_trips(name, data):
    """Any octet change either fails with BodyError or still decodes to a
    value that encodes back to the very same octets: no other exception,
    no silent normalisation."""
    body = bytearray(encode(name, data.draw(STRATEGIES[name])))
    if not body:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    try:
        value = decode(name, bytes(body))
    except BodyError:
        return
    assert encode(name, value) == bytes(body)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@FAST
@given(body=st.binary(max_size=300))
def test_random_body_is_refused_or_round_trips(name, body):
    try:
        value = decode(name, body)
    except BodyError:
        return
    assert encode(name, value) == body


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@FAST
@given(data=st.data())
def test_truncated_or_extended_body_is_refused(name, data):
    body = encode(name, data.draw(STRATEGIES[name]))
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(BodyError):
        decode(name, body[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=9))
    with pytest.raises(BodyError):
        decode(name, body + extra)


def test_decoded_arrays_are_views_not_copies():
    value = ncm.GrantTable(
        1, (5,), np.zeros(ncm.GNTTAB_V1_PER_FRAME, ncm.GNT_V1_DTYPE)
    )
    body = encode("NCM_GRANT_TABLE", value)
    decoded = decode("NCM_GRANT_TABLE", body)
    assert not decoded.entries.flags.owndata
    assert not decoded.entries.flags.writeable


# -- Hostile bodies -----------------------------------------------------------


def _domain() -> ncm.NcmDomain:
    return ncm.NcmDomain(7, uuid.UUID(int=1), 0, 0, (0, 3))


def _shared_info() -> ncm.SharedInfo:
    return ncm.SharedInfo(
        0xFEFFF,
        bytes(4096),
        (
            ncm.VcpuInfoPlacement(0, ncm.VcpuInfoKind.LEGACY),
            ncm.VcpuInfoPlacement(1, ncm.VcpuInfoKind.REGISTERED, 0x1234, 64),
        ),
    )


def _evtchn(fifo: bool = False) -> ncm.EventChannels:
    T = ncm.EvtchnType
    rows = [
        (1, 0, 0, 0, T.UNBOUND, 0, 0, 0, 0, 0),
        (2, 0, 9, 0, T.INTERDOMAIN, 1, 0, 0, 0, 0),
        (3, 1, 0, 0, T.VIRQ, 2, 0, 0, 0, 0),
        (4, 1, 0, 0, T.IPI, 0, 0, 0, 0, 0),
        (5, 0, 17, 0, T.PIRQ, 3, 0, 0, 0, 0),
    ]
    if not fifo:
        return ncm.EventChannels(ncm.EvtchnAbi.TWO_LEVEL, ncm.port_array(rows))
    rows = [r[:6] + (7, 7, 0, 1) for r in rows]
    return ncm.EventChannels(
        ncm.EvtchnAbi.FIFO,
        ncm.port_array(rows),
        (ncm.FifoVcpu(0, 0x100, 0), ncm.FifoVcpu(1, 0x100, 72)),
        (0x200,),
    )


def _device() -> ncm.PvDevice:
    ring = ncm.PvRing(
        ncm.RingKind.BLKIF,
        0,
        (8, 9),
        5,
        40,
        112,
        req_cons=10,
        rsp_prod_pvt=8,
        inflight=(
            ncm.InflightRequest(8, 0xAA, b"\1" * 112),
            ncm.InflightRequest(9, 0xBB, b"\2" * 112),
        ),
    )
    return ncm.PvDevice(
        ncm.DeviceKind.VBD,
        51712,
        0,
        7,
        ncm.XenbusState.CONNECTED,
        ncm.XenbusState.CONNECTED,
        "/local/domain/7/device/vbd/51712",
        "/local/domain/0/backend/vbd/7/51712",
        (ring,),
    )


def _patch(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(body)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def _refused(name: str, body: bytes, *words: str) -> str:
    with pytest.raises(BodyError) as info:
        decode(name, body)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def test_huge_counts_are_refused_before_allocating():
    one_frame = ncm.GrantTable(1, (1,), np.zeros(512, ncm.GNT_V1_DTYPE))
    # (record, value, offset of a count, its format)
    cases = [
        ("NCM_DOMAIN", _domain(), 14, "H"),
        ("NCM_SHARED_INFO", _shared_info(), 6, "H"),
        ("NCM_VCPU_PV", ncm.VcpuPv(0, (ncm.VcpuPvState(0),)), 4, "I"),
        ("NCM_EVENT_CHANNELS", _evtchn(), 8, "I"),
        ("NCM_EVENT_CHANNELS", _evtchn(True), 12, "I"),
        ("NCM_EVENT_CHANNELS", _evtchn(True), 16, "I"),
        ("NCM_GRANT_TABLE", one_frame, 8, "I"),
        ("NCM_GRANT_TABLE", one_frame, 12, "I"),
        ("NCM_PV_DEVICE", _device(), 16, "H"),
        ("NCM_PV_DEVICE", _device(), 24 + 24, "I"),
    ]
    all_ones = {"H": 0xFFFF, "I": 0xFFFFFFFF}
    bodies = [
        (name, _patch(encode(name, value), offset, fmt, all_ones[fmt]))
        for name, value, offset, fmt in cases
    ]
    tracemalloc.start()
    try:
        for name, body in bodies:
            with pytest.raises(BodyError):
                decode(name, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_count_within_limit_but_beyond_body_is_refused():
    body = encode("NCM_EVENT_CHANNELS", _evtchn())
    _refused(
        "NCM_EVENT_CHANNELS", _patch(body, 8, "I", 4000), "ports", "needs"
    )
    body = encode("NCM_EVENT_CHANNELS", _evtchn())
    _refused("NCM_EVENT_CHANNELS", _patch(body, 8, "I", 4), "after the last")
    body = encode("NCM_DOMAIN", _domain())
    _refused("NCM_DOMAIN", _patch(body, 14, "H", 3), "backend_domids")


@pytest.mark.parametrize(
    "name, value, offset, fmt, words",
    [
        ("NCM_DOMAIN", _domain(), 0, "I", ("version",)),
        ("NCM_SHARED_INFO", _shared_info(), 0, "I", ("version",)),
        ("NCM_EVENT_CHANNELS", _evtchn(), 0, "I", ("version",)),
        ("NCM_PV_DEVICE", _device(), 0, "I", ("version",)),
    ],
)
def test_unknown_version_is_refused(name, value, offset, fmt, words):
    body = _patch(encode(name, value), offset, fmt, 2)
    _refused(name, body, *words)


@pytest.mark.parametrize(
    "name, value, offset, fmt, field",
    [
        ("NCM_SHARED_INFO", _shared_info(), 4, "H", "flags"),
        ("NCM_EVENT_CHANNELS", _evtchn(), 5, "B", "reserved"),
        ("NCM_EVENT_CHANNELS", _evtchn(), 6, "H", "reserved"),
        ("NCM_EVENT_CHANNELS", _evtchn(), 20, "I", "reserved"),
        # ports[0].reserved (octets 20-21 of the first port entry).
        ("NCM_EVENT_CHANNELS", _evtchn(), 24 + 18, "H", "reserved"),
        ("NCM_PV_DEVICE", _device(), 15, "B", "reserved"),
        ("NCM_PV_DEVICE", _device(), 22, "H", "reserved"),
        ("NCM_PV_DEVICE", _device(), 24 + 6, "H", "reserved"),
        ("NCM_PV_DEVICE", _device(), 24 + 28, "I", "reserved"),
        # rings[0].inflight[0].reserved
        ("NCM_PV_DEVICE", _device(), 24 + 32 + 8 + 4, "I", "reserved"),
    ],
)
def test_reserved_fields_must_be_zero(name, value, offset, fmt, field):
    body = _patch(encode(name, value), offset, fmt, 0x40)
    _refused(name, body, field)


def test_grant_table_reserved_and_version():
    value = ncm.GrantTable(1, (1,), np.zeros(512, ncm.GNT_V1_DTYPE))
    body = encode("NCM_GRANT_TABLE", value)
    _refused("NCM_GRANT_TABLE", _patch(body, 5, "B", 1), "reserved")
    _refused("NCM_GRANT_TABLE", _patch(body, 4, "B", 3), "gnttab_version")
    _refused("NCM_GRANT_TABLE", _patch(body, 8, "I", 0), "nr_frames")
    # v1 has no status frames.
    _refused("NCM_GRANT_TABLE", _patch(body, 12, "I", 1), "status")


def test_grant_table_v2_status_frame_count():
    with pytest.raises(BodyError, match="nr_status_frames"):
        ncm.GrantTable(
            2,
            (1,) * 9,
            np.zeros(9 * 256, ncm.GNT_V2_DTYPE),
            (3,),
            np.zeros(2048, ncm.GNT_STATUS_DTYPE),
        ).validate()


def test_grant_entries_are_carried_verbatim():
    # Grant entries are guest-written: any content is valid.
    raw = bytes(range(256)) * 16
    value = ncm.GrantTable(1, (2,), np.frombuffer(raw, ncm.GNT_V1_DTYPE))
    assert decode("NCM_GRANT_TABLE", encode("NCM_GRANT_TABLE", value)) == value


@pytest.mark.parametrize(
    "row, field",
    [
        ((0, 0, 0, 0, 1, 0, 0, 0, 0, 0), "port"),
        ((4096, 0, 0, 0, 1, 0, 0, 0, 0, 0), "port"),
        ((1, 0, 0, 0, 0, 0, 0, 0, 0, 0), "type"),
        ((1, 0, 0, 0, 6, 0, 0, 0, 0, 0), "type"),
        ((1, 0, 0, 0, 1, 8, 0, 0, 0, 0), "flags"),
        ((1, 0, 0, 0, 1, ncm.PORT_LINKED, 0, 0, 0, 0), "flags"),
        ((1, 128, 0, 0, 1, 0, 0, 0, 0, 0), "vcpu"),
        ((1, 0, 0, 0x7FF0, 1, 0, 0, 0, 0, 0), "remote_domid"),
        ((1, 0, 0, 3, 4, 0, 0, 0, 0, 0), "remote_domid"),
        ((1, 0, 5, 0, 1, 0, 0, 0, 0, 0), "binding"),
        ((1, 0, 0, 0, 2, 0, 0, 0, 0, 0), "binding"),
        ((1, 0, 24, 0, 4, 0, 0, 0, 0, 0), "binding"),
        ((1, 0, 0, 0, 5, 0, 7, 0, 0, 0), "priority"),
    ],
)
def test_bad_two_level_port_is_refused(row, field):
    value = ncm.EventChannels(ncm.EvtchnAbi.TWO_LEVEL, ncm.port_array([row]))
    good = ncm.EventChannels(
        ncm.EvtchnAbi.TWO_LEVEL,
        ncm.port_array([(1, 0, 0, 0, 1, 0, 0, 0, 0, 0)]),
    )
    body = bytearray(encode("NCM_EVENT_CHANNELS", good))
    body[24:48] = ncm.port_array([row]).tobytes()
    _refused("NCM_EVENT_CHANNELS", bytes(body), f"ports[0].{field}")
    with pytest.raises(BodyError, match=rf"ports\[0\]\.{field}"):
        CODECS["NCM_EVENT_CHANNELS"].encode(value)


def test_ports_must_ascend():
    rows = [(3, 0, 0, 0, 1, 0, 0, 0, 0, 0), (3, 0, 0, 0, 1, 0, 0, 0, 0, 0)]
    value = ncm.EventChannels(ncm.EvtchnAbi.TWO_LEVEL, ncm.port_array(rows))
    with pytest.raises(BodyError, match=r"ports\[1\]\.port"):
        value.validate()


def test_fifo_rules():
    good = _evtchn(fifo=True)
    body = encode("NCM_EVENT_CHANNELS", good)
    assert decode("NCM_EVENT_CHANNELS", body) == good
    # Control block offset must be 8-aligned and leave room for the block.
    _refused("NCM_EVENT_CHANNELS", _patch(body, 24 + 4, "I", 4), "offset")
    _refused("NCM_EVENT_CHANNELS", _patch(body, 24 + 4, "I", 4032), "offset")
    # vCPUs ascend.
    _refused("NCM_EVENT_CHANNELS", _patch(body, 24 + 80, "I", 0), "fifo_vcpus")
    # Queue tails are ports.
    _refused(
        "NCM_EVENT_CHANNELS", _patch(body, 24 + 16, "I", 1 << 17), "tails[0]"
    )
    # Unknown ABI.
    _refused("NCM_EVENT_CHANNELS", _patch(body, 4, "B", 2), "abi")
    with pytest.raises(BodyError, match="nr_fifo_vcpus"):
        ncm.EventChannels(ncm.EvtchnAbi.FIFO, ncm.port_array()).validate()
    with pytest.raises(BodyError, match="2-level"):
        ncm.EventChannels(
            ncm.EvtchnAbi.TWO_LEVEL, ncm.port_array(), (), (5,)
        ).validate()


def test_shared_info_rules():
    body = encode("NCM_SHARED_INFO", _shared_info())
    entry1 = 16 + 4096 + 16
    _refused("NCM_SHARED_INFO", _patch(body, entry1, "I", 5), "vcpu_info[1]")
    _refused("NCM_SHARED_INFO", _patch(body, entry1 + 4, "H", 3), "kind")
    _refused("NCM_SHARED_INFO", _patch(body, entry1 + 6, "H", 4033), "offset")
    _refused("NCM_SHARED_INFO", _patch(body, entry1 + 6, "H", 4), "aligned")
    _refused("NCM_SHARED_INFO", _patch(body, entry1 + 8, "Q", 1 << 52), "gfn")
    # A legacy slot has no gfn; vCPU 0 always has its legacy slot.
    _refused("NCM_SHARED_INFO", _patch(body, 16 + 4096 + 8, "Q", 1), "gfn")
    _refused("NCM_SHARED_INFO", _patch(body, 16 + 4096 + 4, "H", 0), "NONE")
    _refused("NCM_SHARED_INFO", _patch(body, 6, "H", 0), "nr_vcpus")
    with pytest.raises(BodyError, match="LEGACY"):
        ncm.SharedInfo(
            1,
            bytes(4096),
            tuple(
                ncm.VcpuInfoPlacement(i, ncm.VcpuInfoKind.LEGACY)
                for i in range(33)
            ),
        ).validate()
    with pytest.raises(BodyError, match="page"):
        ncm.SharedInfo(1, bytes(10), _shared_info().vcpu_info).validate()


def test_vcpu_pv_rules():
    value = ncm.VcpuPv(
        1 << 5,
        (
            ncm.VcpuPvState(
                0,
                ncm.GuestAreaKind.PHYSICAL,
                0x1234 << 12 | 64,
                ncm.GuestAreaKind.VIRTUAL,
                0xFFFF8000_00001000,
                singleshot_ns=5000,
                periodic_ns=10**7,
                upcall_vector=0xF3,
            ),
            ncm.VcpuPvState(1),
        ),
    )
    body = encode("NCM_VCPU_PV", value)
    assert decode("NCM_VCPU_PV", body) == value
    e0, e1 = 16, 56
    _refused("NCM_VCPU_PV", _patch(body, 8, "Q", 1), "vm_assist")
    _refused("NCM_VCPU_PV", _patch(body, 4, "I", 0), "nr_vcpus")
    _refused("NCM_VCPU_PV", _patch(body, 4, "I", 0xFFFFFFFF), "nr_vcpus")
    _refused("NCM_VCPU_PV", _patch(body, e1, "I", 0), "vcpus[1].vcpu")
    _refused("NCM_VCPU_PV", _patch(body, e0 + 4, "B", 3), "runstate_kind")
    _refused("NCM_VCPU_PV", _patch(body, e0 + 6, "B", 2), "flags")
    # Vectors below 0x10 are refused by HVMOP_set_evtchn_upcall_vector.
    _refused("NCM_VCPU_PV", _patch(body, e0 + 7, "B", 1), "upcall_vector")
    assert decode("NCM_VCPU_PV", body).vcpus[0].upcall_vector == 0xF3
    # A body cut short or with octets left over names what is wrong.
    _refused("NCM_VCPU_PV", body[: e1 + 20], "vcpus[1]")
    _refused("NCM_VCPU_PV", body[:12], "header")
    _refused("NCM_VCPU_PV", body + b"\0" * 8, "after the last field")
    # A physical runstate area must not cross its page.
    crossing = 0x1234 << 12 | 4064
    _refused("NCM_VCPU_PV", _patch(body, e0 + 8, "Q", crossing), "crosses")
    unaligned = 0x1234 << 12 | 2
    _refused("NCM_VCPU_PV", _patch(body, e0 + 8, "Q", unaligned), "unaligned")
    # An unregistered area has no address; a stopped timer has no time.
    _refused("NCM_VCPU_PV", _patch(body, e1 + 8, "Q", 8), "runstate_addr")
    _refused("NCM_VCPU_PV", _patch(body, e1 + 24, "Q", 8), "not armed")
    # Periods below 1 ms are refused by VCPUOP_set_periodic_timer.
    _refused("NCM_VCPU_PV", _patch(body, e0 + 32, "Q", 999_999), "periodic")


def test_domain_rules():
    body = encode("NCM_DOMAIN", _domain())
    _refused("NCM_DOMAIN", _patch(body, 4, "I", 1), "xenstore_version")
    _refused("NCM_DOMAIN", _patch(body, 8, "H", 0), "domid")
    _refused("NCM_DOMAIN", _patch(body, 8, "H", 0x7FF0), "domid")
    _refused("NCM_DOMAIN", _patch(body, 10, "H", 0x7FF1), "store_domid")
    _refused("NCM_DOMAIN", _patch(body, 32, "H", 3), "ascending")
    _refused("NCM_DOMAIN", _patch(body, 34, "H", 7), "guest itself")


# -- Xenstore bodies: xenstore-migration.md, byte for byte --------------------


def test_node_data_layout_is_xenstores():
    node = ncm.XsNode(
        "/local/domain/7/name",
        b"guest\0x",
        (ncm.XsPerm("n", 7), ncm.XsPerm("r", 0, stale=True)),
    )
    expected = (
        struct.pack("<IIHHHH", 0, 0, 21, 7, 0, 2)
        + b"n\x00\x07\x00"
        + b"r\x01\x00\x00"
        + b"/local/domain/7/name\0"
        + b"guest\0x"
    )
    assert encode("NCM_XS_NODE", node) == expected
    assert decode("NCM_XS_NODE", expected) == node


def test_watch_data_extended_layout_is_xenstores():
    watch = ncm.XsWatch(3, "device", b"tok", 0xFFFF)
    expected = struct.pack("<IHHHH", 3, 7, 4, 0xFFFF, 0) + b"device\0tok\0"
    assert encode("NCM_XS_WATCH", watch) == expected


def test_transaction_and_connection_layouts_are_xenstores():
    assert encode("NCM_XS_TRANSACTION", ncm.XsTransaction(3, 9)) == (
        struct.pack("<II", 3, 9)
    )
    conn = ncm.XsConnection(3, 7, ncm.DOMID_INVALID, 2, b"ab", b"xyz", 1, 5)
    expected = (
        struct.pack("<IHH", 3, 0, 1)
        + struct.pack("<HHI", 7, ncm.DOMID_INVALID, 2)
        + struct.pack("<HHI", 2, 1, 3)
        + b"abxyz"
        + bytes(3)
        + struct.pack("<Q", 5)
    )
    assert encode("NCM_XS_CONNECTION", conn) == expected
    assert decode("NCM_XS_CONNECTION", expected) == conn


def test_xenstore_hostile_bodies():
    node = encode("NCM_XS_NODE", ncm.XsNode("/a", b"v", (ncm.XsPerm("w", 0),)))
    # Path not NUL-terminated: value-len shrunk, path-len grown.
    bad = _patch(_patch(node, 8, "H", 4), 10, "H", 0)
    _refused("NCM_XS_NODE", bad, "path", "NUL")
    _refused("NCM_XS_NODE", node[:16] + b"x\0\0\0" + node[20:], "perm1.perm")
    _refused("NCM_XS_NODE", _patch(node, 17, "B", 2), "perm1.flags")
    _refused("NCM_XS_NODE", _patch(node, 4, "I", 1), "tx-id")
    _refused("NCM_XS_NODE", _patch(node, 12, "H", 4), "access")
    ownerless = _patch(node, 14, "H", 0)[:16] + node[20:]
    _refused("NCM_XS_NODE", ownerless, "owner")
    _refused("NCM_XS_NODE", _patch(node, 14, "H", 0xFFFF), "perm-count")
    _refused("NCM_XS_NODE", _patch(node, 18, "H", 0x7FF0), "perm1.domid")
    rel = node[:20] + b"a\0" + node[22:]
    _refused("NCM_XS_NODE", _patch(rel, 8, "H", 2), "absolute")
    _refused("NCM_XS_NODE", node[:20] + b"/\xff\0v", "character")
    _refused("NCM_XS_NODE", node[:20] + b"a/\0v", "absolute")
    # Paths xenstored's canonicalize() refuses.
    for path, why in ((b"/a//b", "empty element"), (b"/a/", "ends with")):
        body = struct.pack("<IIHHHH", 0, 0, len(path) + 1, 0, 0, 1)
        _refused("NCM_XS_NODE", body + b"w\0\0\0" + path + b"\0", why)
    assert decode(
        "NCM_XS_NODE", struct.pack("<IIHHHH", 0, 0, 2, 0, 0, 1) + b"w\0\0\0/\0"
    ) == ncm.XsNode("/", b"", (ncm.XsPerm("w", 0),))
    # Embedded NUL inside the path.
    _refused(
        "NCM_XS_NODE",
        _patch(node, 8, "H", 3)[:20] + b"/\0\0" + node[23:],
        "NUL at position",
    )

    watch = encode("NCM_XS_WATCH", ncm.XsWatch(1, "/a", b"t"))
    _refused("NCM_XS_WATCH", _patch(watch, 10, "H", 1), "pad")
    _refused("NCM_XS_WATCH", _patch(watch, 0, "I", 0), "conn-id")
    _refused("NCM_XS_WATCH", watch[:-1] + b"x", "token", "NUL")
    _refused("NCM_XS_WATCH", _patch(watch, 4, "H", 0xFFFF), "wpath-len")

    conn = encode("NCM_XS_CONNECTION", ncm.XsConnection(1, 7, 0, 2))
    _refused("NCM_XS_CONNECTION", _patch(conn, 4, "H", 1), "conn-type")
    _refused("NCM_XS_CONNECTION", _patch(conn, 6, "H", 2), "fields")
    _refused("NCM_XS_CONNECTION", _patch(conn, 18, "H", 1), "out-resp-len")
    _refused("NCM_XS_CONNECTION", _patch(conn, 12, "I", 0), "evtchn")
    _refused(
        "NCM_XS_CONNECTION", _patch(conn, 20, "I", 0xFFFFFFFF), "out-data-len"
    )
    with_id = encode(
        "NCM_XS_CONNECTION", ncm.XsConnection(1, 7, 0, 2, b"a", unique_id=9)
    )
    _refused("NCM_XS_CONNECTION", _patch(with_id, 25, "B", 1), "padding")

    _refused("NCM_XS_TRANSACTION", struct.pack("<II", 1, 0), "tx-id")
    _refused("NCM_XS_TRANSACTION", struct.pack("<II", 0, 1), "conn-id")


# -- PV devices ---------------------------------------------------------------


def test_pv_device_rules():
    body = encode("NCM_PV_DEVICE", _device())
    assert decode("NCM_PV_DEVICE", body) == _device()
    ring = 24
    _refused("NCM_PV_DEVICE", _patch(body, 12, "B", 4), "kind")
    _refused("NCM_PV_DEVICE", _patch(body, 13, "B", 9), "backend_state")
    _refused("NCM_PV_DEVICE", _patch(body, 8, "H", 7), "guest itself")
    _refused("NCM_PV_DEVICE", _patch(body, ring, "B", 2), "NETIF_TX")
    _refused("NCM_PV_DEVICE", _patch(body, ring + 1, "B", 3), "nr_refs")
    _refused("NCM_PV_DEVICE", _patch(body, ring + 8, "I", 0), "frontend_port")
    # Two requests in flight need req_cons - rsp_prod_pvt == 2.
    _refused("NCM_PV_DEVICE", _patch(body, ring + 20, "I", 9), "nr_inflight")
    # Requests oldest first, consumed before req_cons.
    first = ring + 32 + 8
    _refused("NCM_PV_DEVICE", _patch(body, first, "I", 9), "oldest first")
    _refused("NCM_PV_DEVICE", _patch(body, first, "I", 10), "not consumed")
    # More in flight than the ring holds.
    _refused("NCM_PV_DEVICE", _patch(body, ring + 24, "I", 65), "nr_inflight")
    # Backend path not NUL-terminated.
    _refused("NCM_PV_DEVICE", body[:-1] + b"x", "backend_path", "NUL")


def test_pv_padding_must_be_zero():
    tx = ncm.PvRing(
        ncm.RingKind.NETIF_TX,
        0,
        (11,),
        3,
        4,
        12,
        req_cons=1,
        rsp_prod_pvt=0,
        inflight=(ncm.InflightRequest(0, 1, bytes(12)),),
    )
    vif = dataclasses.replace(_device(), kind=ncm.DeviceKind.VIF, rings=(tx,))
    body = encode("NCM_PV_DEVICE", vif)
    assert decode("NCM_PV_DEVICE", body) == vif
    ring = 24
    # 4 octets of padding after the single ring ref ...
    _refused("NCM_PV_DEVICE", _patch(body, ring + 36, "B", 1), "padding")
    # ... and 4 after the 12-octet request.
    request_end = ring + 32 + 8 + 16 + 12
    _refused("NCM_PV_DEVICE", _patch(body, request_end, "B", 1), "padding")


def test_console_ring_has_nothing_in_flight():
    console = ncm.PvRing(ncm.RingKind.CONSOLE, 0, (0xFEFFE,), 3, 7)
    device = ncm.PvDevice(
        ncm.DeviceKind.CONSOLE,
        0,
        0,
        7,
        ncm.XenbusState.CONNECTED,
        ncm.XenbusState.CONNECTED,
        "/local/domain/7/device/console/0",
        "/local/domain/0/backend/console/7/0",
        (console,),
    )
    body = encode("NCM_PV_DEVICE", device)
    assert decode("NCM_PV_DEVICE", body) == device
    _refused("NCM_PV_DEVICE", _patch(body, 24 + 4, "H", 8), "console ring")
    _refused("NCM_PV_DEVICE", _patch(body, 24 + 24, "I", 1), "nr_inflight")


def test_rings_ordered_by_queue_and_kind():
    tx = ncm.PvRing(ncm.RingKind.NETIF_TX, 0, (1,), 3, 4, 12)
    rx = ncm.PvRing(ncm.RingKind.NETIF_RX, 0, (2,), 3, 4, 8)
    vif = dataclasses.replace(_device(), kind=ncm.DeviceKind.VIF)
    dataclasses.replace(vif, rings=(tx, rx)).validate()
    with pytest.raises(BodyError, match="ascending"):
        dataclasses.replace(vif, rings=(rx, tx)).validate()
    with pytest.raises(BodyError, match="ascending"):
        dataclasses.replace(vif, rings=(tx, tx)).validate()
    # A vif has no blkif ring.
    with pytest.raises(BodyError, match="BLKIF is not a ring of a VIF"):
        vif.validate()
