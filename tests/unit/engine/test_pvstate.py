"""Round trips between host PvState and the non-cooperative records."""

import dataclasses

import pytest

from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import decoder
from nova_xen_ncm.stream import encoder
from nova_xen_ncm.stream import ncm

UUID = "0b3c6d2e-8a51-4e0a-9d43-5c1f0e2a7b11"
DOMID = 7
STORE_PFN = 0xFEFFC


def _grant_frame(seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(base.PAGE_SIZE))


def make_state(**changes) -> base.PvState:
    ports = (
        base.EventChannel(1, base.EvtchnType.INTERDOMAIN, remote_port=3),
        base.EventChannel(
            2, base.EvtchnType.INTERDOMAIN, remote_port=4, pending=True
        ),
        base.EventChannel(3, base.EvtchnType.IPI, vcpu=1, masked=True),
        base.EventChannel(4, base.EvtchnType.VIRQ, virq=1),
        base.EventChannel(5, base.EvtchnType.UNBOUND, remote_domid=0),
        base.EventChannel(6, base.EvtchnType.PIRQ, pirq=9),
        base.EventChannel(9, base.EvtchnType.INTERDOMAIN, remote_port=12),
        base.EventChannel(10, base.EvtchnType.INTERDOMAIN, remote_port=13),
    )
    state = base.PvState(
        domid=DOMID,
        backend_domids=(0,),
        event_channels=base.EventChannelState(base.EvtchnAbi.TWO_LEVEL, ports),
        grant_table=base.GrantTableState(
            version=1,
            frame_gfns=(0xF0001, 0xF0002, ncm.INVALID_GFN),
            frames=tuple(_grant_frame(i) for i in range(3)),
        ),
        shared_info=base.SharedInfoState(
            gfn=0xF0000,
            content=bytes(range(256)) * 16,
            vcpu_info=(
                base.VcpuInfoPlacement(0, 0x102, 0),
                base.VcpuInfoPlacement(1),
            ),
        ),
        xenstore=base.XenstoreState(
            nodes=(
                base.XenstoreNode(
                    f"/local/domain/{DOMID}", b"", (("n", 0), ("r", DOMID))
                ),
                base.XenstoreNode(
                    f"/local/domain/{DOMID}/data/x", b"42", (("b", DOMID),)
                ),
            ),
            watches=(
                base.XenstoreWatch("@releaseDomain", "tok-1"),
                base.XenstoreWatch("device", "tok-2", depth=2),
            ),
            transactions=(
                base.XenstoreTransaction(
                    tx_id=5,
                    base_generation=0,
                    writes=(
                        (f"/local/domain/{DOMID}/data/gone", None),
                        base.XenstoreNode(
                            f"/local/domain/{DOMID}/data/new",
                            b"v",
                            (("n", DOMID),),
                        ),
                    ),
                ),
            ),
            store_port=1,
            store_gfn=STORE_PFN,
        ),
        backends=(
            base.BackendState(
                kind="vif",
                devid=0,
                backend_domid=0,
                frontend_path=f"/local/domain/{DOMID}/device/vif/0",
                backend_path=f"/local/domain/0/backend/vif/{DOMID}/0",
                state=4,
                ring_refs=(8, 9),
                event_channels=(9, 10),
                ring_indices={"tx": (10, 8), "rx": (4, 4)},
                inflight=(
                    base.InflightRequest("tx", 1, bytes(range(12))),
                    base.InflightRequest("tx", 2, bytes(range(1, 13))),
                ),
            ),
        ),
    )
    return dataclasses.replace(state, **changes)


def through_stream(recs: pvstate.PvRecords) -> pvstate.PvRecords:
    enc = encoder.Encoder()
    out = []
    for name, value in recs.libxc_records():
        out += enc.libxc(name, value)
    out += enc.libxc("END")
    # A bare libxc stream cannot hold the libxl records: decode each body
    # with its table row instead.
    data = encoder.join(enc.libxc_headers() + out)
    collector = pvstate.PvRecordCollector()
    for record in decoder.decode(data, "libxc"):
        collector.add(record.name, record.value)
    for name, value in recs.libxl_records():
        row = next(r for r in ncm.LIBXL_RECORDS if r.name == name)
        body = encoder.join(row.codec.encode(value))
        collector.add(name, row.codec.decode(memoryview(body)))
    return collector.result()


def test_round_trip_through_the_codec():
    state = make_state()
    recs = pvstate.to_records(state, UUID)
    back = through_stream(recs).to_pv_state({1: STORE_PFN})
    assert back == state


def test_queued_watch_events_round_trip():
    event = b"\x0f\0\0\0" + bytes(8) + b"\x08\0\0\0path\0tk\0"
    state = make_state()
    state = make_state(
        xenstore=dataclasses.replace(state.xenstore, pending_output=event)
    )
    recs = pvstate.to_records(state, UUID)
    assert recs.xs_connection.out_data == event
    back = through_stream(recs).to_pv_state({1: STORE_PFN})
    assert back.xenstore.pending_output == event


def test_round_trip_keeps_uuid_and_domid():
    recs = pvstate.to_records(make_state(), UUID)
    assert str(recs.domain.uuid) == UUID
    assert recs.domain.domid == DOMID
    assert recs.xs_connection.evtchn == 1


def test_store_gfn_comes_from_the_hvm_params():
    recs = pvstate.to_records(make_state(), UUID)
    back = recs.to_pv_state({1: 0x1234})
    assert back.xenstore.store_gfn == 0x1234
    with pytest.raises(pvstate.PvStateError):
        recs.to_pv_state({})


def test_ports_map_to_stream_fields():
    recs = pvstate.to_records(make_state(), UUID)
    ports = {int(p["port"]): p for p in recs.event_channels.ports}
    assert recs.event_channels.abi == ncm.EvtchnAbi.TWO_LEVEL
    assert int(ports[1]["binding"]) == 3
    assert int(ports[4]["binding"]) == 1
    assert int(ports[6]["binding"]) == 9
    assert int(ports[2]["flags"]) == ncm.PORT_PENDING
    assert int(ports[3]["flags"]) == ncm.PORT_MASKED


def test_vcpu_info_placement():
    recs = pvstate.to_records(make_state(), UUID)
    kinds = [e.kind for e in recs.shared_info.vcpu_info]
    assert kinds == [ncm.VcpuInfoKind.REGISTERED, ncm.VcpuInfoKind.LEGACY]


def test_transaction_writes_become_nodes():
    recs = pvstate.to_records(make_state(), UUID)
    in_tx = [n for n in recs.xs_nodes if n.conn_id]
    assert [(n.tx_id, n.deleted) for n in in_tx] == [(5, True), (5, False)]


def test_backend_rings_carry_ports_and_inflight():
    recs = pvstate.to_records(make_state(), UUID)
    (dev,) = recs.pv_devices
    tx, rx = dev.rings
    assert (tx.kind, rx.kind) == (ncm.RingKind.NETIF_TX, ncm.RingKind.NETIF_RX)
    assert (tx.frontend_port, tx.backend_port) == (9, 12)
    assert [r.seq for r in tx.inflight] == [8, 9]


def test_fifo_is_refused_not_dropped():
    state = make_state(
        event_channels=base.EventChannelState(
            base.EvtchnAbi.FIFO, (), fifo_control_blocks=((0x100, 0),)
        )
    )
    with pytest.raises(pvstate.PvStateError, match="FIFO"):
        pvstate.to_records(state, UUID)


def test_invalid_state_is_refused_before_sending():
    state = make_state(domid=0x7FF5)
    with pytest.raises(pvstate.PvStateError):
        pvstate.to_records(state, UUID)


def test_collector_requires_every_record():
    recs = pvstate.to_records(make_state(), UUID)
    collector = pvstate.PvRecordCollector()
    for name, value in recs.records():
        if name != "NCM_GRANT_TABLE":
            assert collector.add(name, value)
    assert not collector.add("HVM_PARAMS", [])
    with pytest.raises(pvstate.PvStateError, match="NCM_GRANT_TABLE"):
        collector.result()


def test_collector_refuses_a_repeated_record():
    recs = pvstate.to_records(make_state(), UUID)
    collector = pvstate.PvRecordCollector()
    collector.add("NCM_DOMAIN", recs.domain)
    with pytest.raises(pvstate.PvStateError):
        collector.add("NCM_DOMAIN", recs.domain)


def single_ring_backend(kind: str, inflight=()) -> base.BackendState:
    return base.BackendState(
        kind=kind,
        devid=51712,
        backend_domid=0,
        frontend_path=f"/local/domain/{DOMID}/device/{kind}/51712",
        backend_path=f"/local/domain/0/backend/{kind}/{DOMID}/51712",
        state=4,
        ring_refs=(8,),
        event_channels=(9,),
        ring_indices={"ring": (83, 83 - len(inflight))},
        inflight=tuple(inflight),
    )


@pytest.mark.parametrize(
    "kind, ring",
    [("vbd", ncm.RingKind.BLKIF), ("vif", ncm.RingKind.NETIF_TX)],
)
def test_single_ring_devices_round_trip(kind, ring):
    request = bytes(range(64))
    backend = single_ring_backend(
        kind, [base.InflightRequest("ring", 3, request)]
    )
    state = make_state(backends=(backend,))
    recs = pvstate.to_records(state, UUID)
    (dev,) = recs.pv_devices
    (only,) = dev.rings
    assert only.kind == ring
    # The slot is as wide as the requests the backend read.
    assert only.slot_size == 64
    assert [r.seq for r in only.inflight] == [82]
    assert through_stream(recs).to_pv_state({1: STORE_PFN}) == state


def test_frontend_state_comes_from_its_xenstore_node():
    backend = single_ring_backend("vbd")
    state = make_state(backends=(backend,))
    node = base.XenstoreNode(
        f"{backend.frontend_path}/state", b"3", (("b", DOMID),)
    )
    xs = dataclasses.replace(
        state.xenstore, nodes=state.xenstore.nodes + (node,)
    )
    recs = pvstate.to_records(dataclasses.replace(state, xenstore=xs), UUID)
    (dev,) = recs.pv_devices
    assert dev.frontend_state == ncm.XenbusState.INITIALISED
    assert dev.backend_state == ncm.XenbusState.CONNECTED


VCPUS = (
    base.VcpuPvState(
        0,
        upcall_vector=0xF3,
        runstate_va=0xFFFF888000101000,
        time_va=0xFFFF888000102000,
        singleshot_ns=4_000_000,
        periodic_ns=0,
    ),
    base.VcpuPvState(1, upcall_vector=0xF3, periodic_ns=10_000_000),
)


def test_per_vcpu_state_round_trips_through_the_codec():
    state = make_state(vcpus=VCPUS, vm_assist=1 << 5)
    recs = pvstate.to_records(state, UUID)
    assert [name for name, _ in recs.libxc_records()][:2] == [
        "NCM_SHARED_INFO",
        "NCM_VCPU_PV",
    ]
    back = through_stream(recs).to_pv_state({1: STORE_PFN})
    assert back == state
    assert back.vcpus[0].singleshot_ns == 4_000_000
    assert back.vcpus[1].singleshot_ns is None


def test_no_per_vcpu_state_sends_no_record():
    recs = pvstate.to_records(make_state(), UUID)
    assert "NCM_VCPU_PV" not in [n for n, _ in recs.libxc_records()]
    assert through_stream(recs).to_pv_state({1: STORE_PFN}).vcpus == ()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # One entry per vCPU of the vcpu_info placements, in order.
        ({"vcpus": VCPUS[:1]}, "vCPUs [0]"),
        ({"vcpus": VCPUS[::-1]}, "vCPUs [1, 0]"),
        # What HVMOP_set_evtchn_upcall_vector would refuse.
        (
            {
                "vcpus": (dataclasses.replace(VCPUS[0], upcall_vector=5),)
                + VCPUS[1:]
            },
            "upcall_vector",
        ),
        # Only VMASST_TYPE_runstate_update_flag is valid for HVM.
        ({"vcpus": VCPUS, "vm_assist": 1}, "vm_assist"),
    ],
)
def test_bad_per_vcpu_state_is_refused_before_sending(change, words):
    with pytest.raises(pvstate.PvStateError, match=words.replace("[", r"\[")):
        pvstate.to_records(make_state(**change), UUID)


def test_physical_areas_are_refused_on_the_way_back():
    recs = pvstate.to_records(make_state(vcpus=VCPUS), UUID)
    entry = dataclasses.replace(
        recs.vcpu_pv.vcpus[1],
        runstate_kind=ncm.GuestAreaKind.PHYSICAL,
        runstate_addr=0x1234 << 12,
    )
    recs.vcpu_pv = dataclasses.replace(
        recs.vcpu_pv, vcpus=(recs.vcpu_pv.vcpus[0], entry)
    )
    with pytest.raises(pvstate.PvStateError, match="vCPU 1: a runstate area"):
        through_stream(recs).to_pv_state({1: STORE_PFN})
