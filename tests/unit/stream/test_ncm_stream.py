"""Non-cooperative records inside whole streams: placement per
doc/source/specs/non-cooperative-records.rst "Placement in the stream", and
mandatory semantics against a reader that only knows Xen's records."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream.decoder import decode
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join
from nova_xen_ncm.stream.errors import StreamError

DOMID = 7

VALUES = {
    "NCM_DOMAIN": ncm.NcmDomain(DOMID, uuid.UUID(int=0x1234), 0, 0, (0,)),
    "NCM_SHARED_INFO": ncm.SharedInfo(
        0xFEFFD,
        bytes(range(256)) * 16,
        (ncm.VcpuInfoPlacement(0, ncm.VcpuInfoKind.LEGACY),),
    ),
    "NCM_VCPU_PV": ncm.VcpuPv(0, (ncm.VcpuPvState(0, periodic_ns=10**7),)),
    "NCM_GRANT_TABLE": ncm.GrantTable(
        1, (0xF0000,), np.zeros(ncm.GNTTAB_V1_PER_FRAME, ncm.GNT_V1_DTYPE)
    ),
    "NCM_EVENT_CHANNELS": ncm.EventChannels(
        ncm.EvtchnAbi.TWO_LEVEL,
        ncm.port_array(
            [
                (1, 0, 10, 0, ncm.EvtchnType.INTERDOMAIN, 0, 0, 0, 0, 0),
                (2, 0, 11, 0, ncm.EvtchnType.INTERDOMAIN, 1, 0, 0, 0, 0),
                (3, 0, 0, 0, ncm.EvtchnType.VIRQ, 0, 0, 0, 0, 0),
            ]
        ),
    ),
    "NCM_XS_CONNECTION": ncm.XsConnection(1, DOMID, ncm.DOMID_INVALID, 1),
    "NCM_XS_NODE": ncm.XsNode(
        "/local/domain/7/device/vif/0/state", b"4", (ncm.XsPerm("n", 7),)
    ),
    "NCM_XS_WATCH": ncm.XsWatch(1, "backend/vif", b"be:0", 0xFFFF),
    "NCM_XS_TRANSACTION": ncm.XsTransaction(1, 5),
    "NCM_PV_DEVICE": ncm.PvDevice(
        ncm.DeviceKind.VIF,
        0,
        0,
        DOMID,
        ncm.XenbusState.CONNECTED,
        ncm.XenbusState.CONNECTED,
        "/local/domain/7/device/vif/0",
        "/local/domain/0/backend/vif/7/0",
        (
            ncm.PvRing(ncm.RingKind.NETIF_TX, 0, (8,), 2, 20, 12, 5, 5),
            ncm.PvRing(ncm.RingKind.NETIF_RX, 0, (9,), 2, 20, 8, 3, 3),
        ),
    ),
}


def ncm_stream() -> bytes:
    enc = Encoder()
    out = enc.libxl_header()
    # The domid is known before the domain is created (spec "Placement").
    out += enc.libxl("NCM_DOMAIN", VALUES["NCM_DOMAIN"])
    out += enc.libxl("LIBXC_CONTEXT")
    out += enc.libxc_headers()
    out += enc.libxc("STATIC_DATA_END")
    out += enc.page_data([0], [libxc.NOTAB], bytes(libxc.PAGE_SIZE))
    out += enc.libxc("HVM_PARAMS", [libxc.HvmParam(2, 1)])
    for name in (
        "NCM_SHARED_INFO",
        "NCM_VCPU_PV",
        "NCM_GRANT_TABLE",
        "NCM_EVENT_CHANNELS",
    ):
        out += enc.libxc(name, VALUES[name])
    out += enc.libxc("END")
    for name in (
        "NCM_XS_CONNECTION",
        "NCM_XS_TRANSACTION",
        "NCM_XS_NODE",
        "NCM_XS_WATCH",
        "NCM_PV_DEVICE",
    ):
        out += enc.libxl(name, VALUES[name])
    out += enc.libxl("END")
    return join(out)


def test_ncm_records_decode_in_their_layers():
    records = decode(ncm_stream(), "libxl")
    found = {r.name: r for r in records if r.name.startswith("NCM_")}
    assert set(found) == set(VALUES)
    for name, record in found.items():
        assert record.value == VALUES[name], name
        layer = (
            "libxc"
            if name in {r.name for r in ncm.LIBXC_RECORDS}
            else ("libxl")
        )
        assert record.layer == layer
        assert not record.skipped


def test_reader_without_ncm_rows_refuses_the_stream():
    # A receiver that knows only Xen's records must fail, never skip.
    with pytest.raises(StreamError):
        decode(
            ncm_stream(),
            "libxl",
            libxc_table=tables.xen_libxc_table(),
            libxl_table=tables.xen_libxl_table(),
        )
    with pytest.raises(StreamError):
        decode(
            ncm_stream(),
            "libxl",
            libxl_table=tables.xen_libxl_table(),
        )


def test_bad_ncm_body_is_a_stream_error_naming_the_record():
    data = bytearray(ncm_stream())
    # NCM_DOMAIN follows the 16-octet libxl header and its record header;
    # set its version to 9.
    data[24:28] = (9).to_bytes(4, "little")
    with pytest.raises(StreamError) as info:
        decode(bytes(data), "libxl")
    assert "NCM_DOMAIN" in str(info.value)
    assert "version" in str(info.value)
