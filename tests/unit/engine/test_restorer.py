"""The Restorer on empty simulated domains, and the state digests."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.engine import digest
from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine import restorer as restoring
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.stream import decoder
from nova_xen_ncm.stream import encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream import tables

DOMID = 4
PAGE = base.PAGE_SIZE
TIMEOUT = 10.0


@pytest.fixture
def host():
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    h = SimHost("unit", conf)
    h.create_empty_domain(
        base.DomainConfig(name="r", memory_bytes=4 << 20, vcpus=1), DOMID
    )
    yield h
    h.close()
    h.raise_dom0_errors()


def stream(*parts, xen_only=False) -> list:
    """Decoded records of a libxl stream built from ``parts``, each a
    function of the encoder returning buffers of libxc records."""
    kwargs = {}
    if xen_only:
        kwargs = dict(
            libxc_table=tables.xen_libxc_table(),
            libxl_table=tables.xen_libxl_table(),
        )
    enc = encoder.Encoder(**kwargs)
    out = enc.libxl_header() + enc.libxl("LIBXC_CONTEXT")
    out += enc.libxc_headers() + enc.libxc("STATIC_DATA_END")
    for part in parts:
        out += part(enc)
    dec = decoder.Decoder("libxl")
    dec.feed(encoder.join(out))
    # Partial streams too: what has arrived so far.
    return list(dec.records())


def pages(pfns, types, data):
    return lambda enc: enc.page_data(
        np.array(pfns, dtype=np.uint64), np.array(types, dtype=np.uint8), data
    )


def platform(host):
    """TSC, the host's own HVM context of the domain, and params."""
    blob = host.get_hvm_context(DOMID)
    ctx = libxc.HvmContextCodec().decode(memoryview(blob))

    def records(enc):
        out = enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 1000, 0, 0))
        out += enc.libxc("HVM_CONTEXT", ctx)
        out += enc.libxc("HVM_PARAMS", [libxc.HvmParam(1, 0x10)])
        return out

    return records


def end(enc):
    return enc.libxc("END") + enc.libxl("END")


def read_page(host, pfn) -> bytes:
    pfns = np.array([pfn], dtype=np.uint64)
    with host.map_pages(DOMID, pfns) as mapping:
        return bytes(mapping.pages[0])


def apply_all(restorer, records):
    for record in records:
        restorer.apply(record)


def test_a_page_that_became_zero_is_cleared(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    records = stream(
        pages([7, 8], [libxc.NOTAB, libxc.NOTAB], [b"\x11" * PAGE] * 2),
        pages([7, 9], [libxc.XALLOC, libxc.XALLOC], []),
    )
    apply_all(restorer, records)
    assert read_page(host, 7) == bytes(PAGE)
    assert read_page(host, 8) == b"\x11" * PAGE
    assert read_page(host, 9) == bytes(PAGE)
    assert restorer.pages == 4
    assert not restorer.done


def test_a_zero_page_clears_what_the_domain_held_before_the_stream(host):
    # As libxl's build loads hvmloader into a Xen domain's RAM: the
    # host says the page may hold data; the guest's page is zero.
    host.populate(DOMID, np.array([5], dtype=np.uint64))
    with host.map_pages(
        DOMID, np.array([5], dtype=np.uint64), writable=True
    ) as mapping:
        mapping.pages[0][:] = b"\x5a" * PAGE
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    apply_all(restorer, stream(pages([5, 6], [libxc.XALLOC] * 2, [])))
    assert read_page(host, 5) == bytes(PAGE)
    assert read_page(host, 6) == bytes(PAGE)


def test_platform_records_mark_the_stop(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    records = stream(pages([1], [libxc.NOTAB], b"\x01" * PAGE), platform(host))
    apply_all(restorer, records[:-3])
    assert not restorer.stopped
    apply_all(restorer, records[-3:])
    assert restorer.stopped
    assert host.get_hvm_params(DOMID)[1] == 0x10


def test_complete_stream_without_pv_state(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    apply_all(restorer, stream(platform(host), end, xen_only=True))
    assert restorer.done
    with pytest.raises(restoring.RestoreError, match="after the end"):
        restorer.apply(stream(platform(host), end)[-1])


def test_missing_platform_record_is_refused(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    with pytest.raises(restoring.RestoreError, match="HVM_CONTEXT"):
        apply_all(
            restorer,
            stream(
                lambda enc: (
                    enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 1000, 0, 0))
                    + enc.libxc("HVM_PARAMS", [])
                ),
                end,
            ),
        )


def test_pv_guest_without_pv_state_is_refused(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=True)
    with pytest.raises(restoring.RestoreError, match="no PV state"):
        apply_all(restorer, stream(platform(host), end))


def test_record_the_host_cannot_apply_is_refused(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    cpuid = np.array([(0, 0, 1, 2, 3, 4)], dtype=libxc.CPUID_LEAF)
    with pytest.raises(restoring.RestoreError, match="X86_CPUID_POLICY"):
        apply_all(
            restorer,
            stream(lambda enc: enc.libxc("X86_CPUID_POLICY", cpuid)),
        )


def test_stream_of_another_domid_is_refused(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=True)
    other = ncm.NcmDomain(DOMID + 1, uuid.uuid4(), 0, 0, (0,))
    records = stream(
        platform(host),
        lambda enc: enc.libxc("END") + enc.libxl("NCM_DOMAIN", other),
    )
    with pytest.raises(restoring.RestoreError, match="guest-visible"):
        apply_all(restorer, records)


def test_digests_name_each_item():
    state = base.GuestState(
        items={base.Item.MEMORY: "m", base.Item.HVM_PARAMS: ((1, 2),)}
    )
    changed = base.GuestState(
        items={base.Item.MEMORY: "m", base.Item.HVM_PARAMS: ((1, 3),)}
    )
    items = digest.needed_items(pv_drivers=False)
    a = digest.guest_digests(state, items)
    b = digest.guest_digests(changed, items)
    assert set(a) == {"memory", "platform", "hvm_params"}
    assert a["memory"] == b["memory"]
    assert a["hvm_params"] != b["hvm_params"]
    assert digest.needed_items(pv_drivers=True) == tuple(base.Item)


def test_hook_runs_before_the_pv_state_is_imported(host, monkeypatch):
    calls = []
    monkeypatch.setattr(
        host, "import_pv_state", lambda domid, state: calls.append("import")
    )
    restorer = restoring.Restorer(
        host,
        DOMID,
        pv_drivers=True,
        before_pv_import=lambda: calls.append("hook"),
    )
    state = make_pv_state()
    recs = pvstate.to_records(state, str(uuid.uuid4()))

    def pv_records(enc):
        out = []
        for name, value in recs.libxc_records():
            out += enc.libxc(name, value)
        out += enc.libxc("END")
        for name, value in recs.libxl_records():
            out += enc.libxl(name, value)
        return out + enc.libxl("END")

    apply_all(restorer, stream(platform(host), pv_records))
    assert calls == ["hook", "import"]
    assert restorer.done


def make_pv_state() -> base.PvState:
    return base.PvState(
        domid=DOMID,
        backend_domids=(0,),
        event_channels=base.EventChannelState(
            base.EvtchnAbi.TWO_LEVEL,
            (
                base.EventChannel(
                    1, base.EvtchnType.INTERDOMAIN, remote_port=2
                ),
            ),
        ),
        grant_table=base.GrantTableState(
            version=1, frame_gfns=(0xF0001,), frames=(bytes(PAGE),)
        ),
        shared_info=base.SharedInfoState(
            gfn=0xF0000,
            content=bytes(PAGE),
            vcpu_info=(base.VcpuInfoPlacement(0),),
        ),
        xenstore=base.XenstoreState(
            nodes=(
                base.XenstoreNode(
                    f"/local/domain/{DOMID}", b"", (("n", 0), ("r", DOMID))
                ),
            ),
            watches=(),
            transactions=(),
            store_port=1,
            store_gfn=0x10,
        ),
        backends=(),
    )


def reader(octets):
    """A ``read_into`` over ``octets`` that records what it filled."""
    pos = [0]
    filled = []

    def read_into(view):
        n = view.nbytes
        view[:] = octets[pos[0] : pos[0] + n]
        pos[0] += n
        filled.append(n)

    read_into.filled = filled
    read_into.left = lambda: len(octets) - pos[0]
    return read_into


def test_page_frame_is_read_straight_into_guest_pages(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    enc = encoder.Encoder()
    data = [bytes([0x20 + i]) * PAGE for i in range(3)]
    record = encoder.join(
        enc.page_data(
            np.array([5, 6, 9, 3], dtype=np.uint64),
            np.array([libxc.NOTAB] * 3 + [libxc.XALLOC], dtype=np.uint8),
            data,
        )
    )
    read_into = reader(bytes(record))
    restorer.receive_pages(len(record), read_into)
    assert read_into.left() == 0
    assert [read_page(host, p) for p in (5, 6, 9)] == data
    assert restorer.pages == 4
    # Scattered pages: the headers, then their contents in one read.
    assert read_into.filled[2:] == [3 * PAGE]
    assert max(read_into.filled[:2]) < PAGE
    # Long runs go from the socket straight into the mapped pages, a
    # read per run.
    long_run = np.arange(100, 132, dtype=np.uint64)
    data = [bytes([i]) * PAGE for i in range(32)]
    record = encoder.join(
        enc.page_data(long_run, np.full(32, libxc.NOTAB, dtype=np.uint8), data)
    )
    read_into = reader(bytes(record))
    restorer.receive_pages(len(record), read_into)
    assert read_into.filled[2:] == [32 * PAGE]
    assert read_page(host, 131) == data[31]


def test_page_frame_of_another_record_is_refused_before_mapping(host):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    enc = encoder.Encoder()
    record = encoder.join(
        enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 1, 0, 0))
    )
    with pytest.raises(restoring.ProtocolError, match="not one PAGE_DATA"):
        restorer.receive_pages(len(record), reader(bytes(record)))
    bad = bytearray(
        encoder.join(
            enc.page_data(
                np.array([5], dtype=np.uint64),
                np.array([libxc.NOTAB], dtype=np.uint8),
                [b"\x01" * PAGE],
            )
        )
    )
    # Reserved bits in the pfn entry: refused before anything is
    # populated or written.
    bad[libxc.RHDR.size + libxc.PAGE_DATA_HDR.size + 6] = 0xF0
    with pytest.raises(restoring.ProtocolError, match="reserved bits"):
        restorer.receive_pages(len(bad), reader(bytes(bad)))
    assert restorer.pages == 0


def test_the_digest_is_settled_in_parts_beside_the_stream(host, monkeypatch):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    parts = []
    left = [3]
    done = threading.Event()

    def part(domid, pages):
        # One host call at a time: the batches wait between parts.
        assert restorer._lock.locked()
        parts.append((domid, pages))
        left[0] -= 1
        if not left[0]:
            done.set()
        return left[0] > 0

    monkeypatch.setattr(host, "settle_digest_part", part)
    restorer.settle_digest()
    assert done.wait(TIMEOUT)
    assert parts == [(DOMID, restoring.SETTLE_PAGES)] * 3
    # The next round's end: settled again, by the same thread.
    thread = restorer._settler
    left[0] = 1
    done.clear()
    restorer.settle_digest()
    assert done.wait(TIMEOUT)
    assert restorer._settler is thread
    restorer.stop_settling()
    assert not thread.is_alive()
    restorer.settle_digest()
    assert len(parts) == 4
    assert restorer._settler is thread


def test_a_settle_that_fails_leaves_the_rest_to_the_digest(
    host, monkeypatch, caplog
):
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)

    def part(domid, pages):
        raise base.HostError("mapping refused", call="map")

    monkeypatch.setattr(host, "settle_digest_part", part)
    restorer.settle_digest()
    restorer._settler.join(TIMEOUT)
    assert not restorer._settler.is_alive()
    assert "no longer settled" in caplog.text
    # The stream goes on.
    restorer.apply(stream(pages([1], [libxc.NOTAB], b"\x07" * PAGE))[-1])
    restorer.stop_settling()
