"""The simulated host with running guest processes: log-dirty never
loses a write, a paused guest writes nothing, a guest continues on
another host from its RAM plus its HVM context, events reach the guest,
and PV state round-trips with validation before anything is applied."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.host.sim.memory import INVALID_GFN

MB = 1 << 20


@pytest.fixture(scope="module")
def conf():
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    return conf


@pytest.fixture(scope="module")
def idle(conf):
    """One idle PV guest (2 vCPUs) shared by the tests that only look at
    it: each leaves it running."""
    host = SimHost("idle", conf)
    domid = _guest(host, rate=0, vcpus=2, fill="zero")
    yield host, domid
    host.close()
    host.raise_dom0_errors()


@pytest.fixture
def hosts(conf):
    made = []

    def make(name):
        made.append(SimHost(name, conf))
        return made[-1]

    yield make
    for h in made:
        h.close()
    for h in made:
        h.raise_dom0_errors()


DEVICES = (
    base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
    base.DeviceConfig("vbd", 51712),
)


def _guest(
    host,
    rate=4 * MB,
    pattern="uniform",
    vcpus=2,
    mb=32,
    fill="guestlike",
    devices=(),
):
    return host.create_domain(
        base.DomainConfig(
            name=f"guest-{host.hostname}",
            memory_bytes=mb * MB,
            vcpus=vcpus,
            devices=devices,
            workload={"dirty_rate": rate, "pattern": pattern, "fill": fill},
        )
    )


def _wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _counters(host, domid):
    page = bytes(host.hv.domains[domid].mem.ram[kernel.HEADER_PFN])
    hdr = kernel.read_header(page)
    return [kernel.read_vcpu(page, v) for v in range(hdr["nr_vcpus"])]


def test_log_dirty_hammer_copy_equals_ram(hosts):
    """Harvest and copy while the guest writes as fast as it can; after
    the final pause and harvest, the copy is byte-identical to RAM."""
    host = hosts("hammer")
    domid = _guest(host, rate=64 * MB, pattern="uniform", mb=16)
    host.enable_log_dirty(domid)
    pfns = host.populated_pfns(domid)
    mem = host.hv.domains[domid].mem
    copy = np.zeros((mem.max_pfn, 4096), dtype=np.uint8)
    with host.map_pages(domid, pfns) as m:
        for pfn, page in zip(pfns, m.pages, strict=True):
            copy[pfn] = np.frombuffer(page, dtype=np.uint8)
    rounds = copied = 0
    start = _counters(host, domid)[0]["counter"]
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up and (
        rounds < 20 or _counters(host, domid)[0]["counter"] - start < 2000
    ):
        dirty = host.harvest_dirty(domid)
        with host.map_pages(domid, dirty) as m:
            for pfn, page in zip(dirty, m.pages, strict=True):
                copy[pfn] = np.frombuffer(page, dtype=np.uint8)
        copied += len(dirty)
        rounds += 1
    host.pause(domid)
    dirty = host.harvest_dirty(domid)
    with host.map_pages(domid, dirty) as m:
        for pfn, page in zip(dirty, m.pages, strict=True):
            copy[pfn] = np.frombuffer(page, dtype=np.uint8)
    assert copied > 0
    assert _counters(host, domid)[0]["counter"] - start >= 2000
    populated = host.populated_pfns(domid)
    diff = np.flatnonzero((copy[populated] != mem.ram[populated]).any(1))
    assert len(diff) == 0, (
        f"{len(diff)} pages differ, e.g. {populated[diff[:5]]}"
    )


def test_paused_guest_writes_nothing(hosts):
    host = hosts("pause")
    domid = _guest(host, rate=32 * MB, mb=16)
    host.enable_log_dirty(domid)
    assert _wait_for(lambda: len(host.harvest_dirty(domid)) > 10)
    host.pause(domid)
    # Not the guest's writes: xenstored answering a request in flight at
    # the pause writes the store ring, and the event it raises sets
    # pending bits in the vcpu_info the kernel registered in its RAM.
    dom = host.hv.domains[domid]
    others = {host.get_hvm_params(domid)[hvm.HVM_PARAM_STORE_PFN]}
    others |= {gfn for gfn, _ in dom.vcpu_info_at.values()}
    host.harvest_dirty(domid)
    mem = dom.mem
    pfns = np.array(
        [p for p in host.populated_pfns(domid).tolist() if p not in others],
        dtype=np.uint64,
    )
    before = mem.ram[pfns].copy()
    vi_pages = sorted({gfn for gfn, _ in dom.vcpu_info_at.values()})
    vi_before = mem.ram[vi_pages].copy()
    time.sleep(0.3)
    after_dirty = set(host.harvest_dirty(domid).tolist()) - others
    assert after_dirty == set()
    assert np.array_equal(before, mem.ram[pfns])
    # In the vcpu_info pages Xen only sets pending bits and writes the
    # time; a guest taking an upcall while paused would clear them.
    allowed = np.zeros((len(vi_pages), PAGE_SIZE), dtype=bool)
    for v, (gfn, off) in dom.vcpu_info_at.items():
        i = vi_pages.index(gfn)
        was = vi_before[i, off : off + evtchn.VCPU_INFO_SIZE]
        now = mem.ram[gfn][off : off + evtchn.VCPU_INFO_SIZE]
        for at, size in (
            (evtchn.VI_UPCALL_PENDING, 1),
            (evtchn.VI_PENDING_SEL, 8),
        ):
            cleared = was[at : at + size] & ~now[at : at + size]
            assert not cleared.any(), f"vCPU {v}'s pending bits cleared"
            allowed[i, off + at : off + at + size] = True
        time_area = slice(
            off + hvm.VCPU_TIME_OFFSET, off + evtchn.VCPU_INFO_SIZE
        )
        allowed[i, time_area] = True
    changed = vi_before != mem.ram[vi_pages]
    assert not (changed & ~allowed).any(), "the guest wrote its vcpu_info"
    host.unpause(domid)
    assert _wait_for(lambda: len(host.harvest_dirty(domid)) > 1)


def _migrate_by_hand(src, dst, domid):
    """What the engine does, by hand: memory, context, params, TSC, PV
    state; the guest process on ``dst`` starts at unpause."""
    info = src.domain_info(domid)
    # Like the engine, the destination gets no device list: the devices
    # travel in the PV state.
    config = base.DomainConfig(
        name=info.name,
        memory_bytes=info.memory_bytes,
        vcpus=info.vcpus,
        uuid=info.uuid,
    )
    src.pause(domid)
    src.quiesce_backends(domid)
    dst.create_empty_domain(config, domid)
    pfns = src.populated_pfns(domid)
    dst.populate(domid, pfns)
    with (
        src.map_pages(domid, pfns) as a,
        dst.map_pages(domid, pfns, writable=True) as b,
    ):
        for sp, dp in zip(a.pages, b.pages, strict=True):
            dp[:] = sp
    dst.set_hvm_context(domid, src.get_hvm_context(domid))
    dst.set_hvm_params(domid, src.get_hvm_params(domid))
    dst.set_tsc_info(domid, src.get_tsc_info(domid))
    state = src.export_pv_state(domid)
    dst.import_pv_state(domid, state)
    return state


def _connected_with_io(host, domid, minimum=5):
    fronts = host.guest_state(domid).frontends
    return len(fronts) == len(DEVICES) and all(
        f["state"] == 4 and f["completed"] >= minimum for f in fronts.values()
    )


def test_guest_continues_on_another_host_from_ram_and_context(hosts):
    a, b = hosts("src"), hosts("dst")
    domid = _guest(a, rate=4 * MB, vcpus=2, devices=DEVICES)
    assert _wait_for(lambda: all(s["events"] > 0 for s in _counters(a, domid)))
    assert _wait_for(lambda: _connected_with_io(a, domid))
    _migrate_by_hand(a, b, domid)
    before = a.guest_state(domid)
    after = b.guest_state(domid)
    # Until it is unpaused, the destination guest is exactly the paused
    # source guest: the backends take over (and answer what was in
    # flight) only at unpause.
    for item in Item:
        assert before.items[item] == after.items[item], item
    assert before.frontends == after.frontends
    rips = [r["rip"] for r in b.hv.domains[domid].cpu_registers()]
    assert rips == [s["counter"] for s in _counters(a, domid)]
    events = [s["events"] for s in _counters(a, domid)]
    a.destroy_domain(domid)
    b.unpause(domid)
    assert _wait_for(
        lambda: all(
            s["counter"] > r + 50 and s["events"] > e
            for s, r, e in zip(_counters(b, domid), rips, events, strict=True)
        )
    )
    # The workload went on from the program counters: the page that
    # vCPU 0 writes at counter rip+1 carries a stamp of that counter or
    # a later one (never one from a fresh start).
    b.pause(domid)
    mem = b.hv.domains[domid].mem
    hdr = kernel.read_header(bytes(mem.ram[kernel.HEADER_PFN]))
    heap = kernel.Heap(b.hv.domains[domid].layout.heap_ranges())
    pfn = kernel.workload_pages(
        heap, hdr, 0, np.array([rips[0] + 1], dtype=np.uint64)
    )[0]
    stamp = mem.ram[int(pfn)].view(np.uint64)
    assert int(stamp[0]) & 0xFFFFFFFF == kernel.STAMP_MAGIC
    assert int(stamp[1]) >= rips[0] + 1


def test_events_from_dom0_reach_the_guest(idle):
    host, domid = idle
    store = host.get_hvm_params(domid)[hvm.HVM_PARAM_STORE_EVTCHN]
    dom = host.hv.domains[domid]
    counts = dom.mem.ram[kernel.COUNTERS_PFN].view(np.uint32)
    before = int(counts[store])
    dom0_port = dom.ports[store].remote_port
    for _ in range(3):
        host.services.dom0_notify(dom0_port)
        assert _wait_for(
            lambda: not host.evtchn.status(dom, base.DOMID_SELF, store).pending
        )
    assert _wait_for(lambda: int(counts[store]) >= before + 1)
    # Masked by the guest: the event stays pending, nothing is counted,
    # and the hypervisor's unmask raises it.
    with dom.mem.lock():
        dom.bits.test_and_set(evtchn.SHINFO_MASK, store)
    seen = int(counts[store])
    host.services.dom0_notify(dom0_port)
    time.sleep(0.1)
    assert host.evtchn.status(dom, base.DOMID_SELF, store).pending
    assert int(counts[store]) == seen
    host.guest_command(
        domid, "hypercall", op="evtchn_unmask", args={"port": store}
    )
    assert _wait_for(lambda: int(counts[store]) == seen + 1)


def test_guest_grants_a_page_to_dom0(idle):
    host, domid = idle
    gfn = 0x1800
    host.guest_command(
        domid, "write", pfn=gfn, offset=0, data=b"granted".hex()
    )
    host.guest_command(
        domid, "grant_access", ref=8, domid=0, gfn=gfn, readonly=False
    )
    handle, view = host.hv.grant_map(domid, 8)
    assert bytes(view[:7]) == b"granted"
    assert host.guest_command(domid, "end_access", ref=8) is False
    host.hv.grant_unmap(handle)
    assert host.guest_command(domid, "end_access", ref=8) is True
    with pytest.raises(grant.GrantError):
        host.hv.grant_map(domid, 8)
    with pytest.raises(base.HostError, match="not RAM"):
        host.guest_command(domid, "write", pfn=0x3000, offset=0, data="00")


def test_import_validates_before_applying(idle, hosts):
    (a, domid), b = idle, hosts("vdst")
    a.pause(domid)
    state = a.export_pv_state(domid)
    a.unpause(domid)
    info = a.domain_info(domid)
    b.create_empty_domain(
        base.DomainConfig(name="x", memory_bytes=info.memory_bytes, vcpus=2),
        domid,
    )
    pfns = a.populated_pfns(domid)
    b.populate(domid, pfns)
    b.set_hvm_params(domid, a.get_hvm_params(domid))
    ec = state.event_channels
    rogue = dataclasses.replace(
        ec.ports[0], type=EvtchnType.UNBOUND, remote_domid=77, port=900
    )
    bad_states = {
        "domain 77": dataclasses.replace(
            state,
            event_channels=(
                dataclasses.replace(ec, ports=ec.ports + (rogue,))
            ),
        ),
        "listed twice": dataclasses.replace(
            state,
            event_channels=(
                dataclasses.replace(ec, ports=ec.ports + (ec.ports[0],))
            ),
        ),
        "outside the guest's physmap": dataclasses.replace(
            state,
            grant_table=dataclasses.replace(
                state.grant_table,
                frame_gfns=(1 << 40,) + state.grant_table.frame_gfns[1:],
            ),
        ),
        "populated RAM": dataclasses.replace(
            state,
            shared_info=dataclasses.replace(
                state.shared_info, gfn=int(pfns[5])
            ),
        ),
        "vCPU 7": dataclasses.replace(
            state,
            event_channels=dataclasses.replace(
                ec,
                ports=(dataclasses.replace(ec.ports[0], vcpu=7),)
                + ec.ports[1:],
            ),
        ),
    }
    dom = b.hv.domains[domid]
    for message, bad in bad_states.items():
        with pytest.raises(base.HostError, match=message):
            b.import_pv_state(domid, bad)
        assert dom.ports == {}
        assert (dom.mem.xen_gfns == INVALID_GFN).all()
        assert not b.xenstore.is_introduced(domid)
    with pytest.raises(base.HostError, match="state is of domain"):
        b.import_pv_state(domid, dataclasses.replace(state, domid=domid + 1))
    b.import_pv_state(domid, state)
    assert b.evtchn.table(dom) == ec.ports


def test_pv_drivers_signal_and_placements(idle):
    host, pv = idle
    plain = host.create_domain(
        base.DomainConfig(
            name="plain",
            memory_bytes=16 * MB,
            vcpus=1,
            pv_drivers=False,
            workload={"dirty_rate": 0, "fill": "zero"},
        )
    )
    params = host.get_hvm_params(pv)
    assert params[hvm.HVM_PARAM_CALLBACK_IRQ] == (
        hvm.CALLBACK_TYPE_VECTOR | hvm.CALLBACK_VECTOR
    )
    assert host.get_hvm_params(plain)[hvm.HVM_PARAM_CALLBACK_IRQ] == 0
    host.pause(pv)
    host.pause(plain)
    si = host.export_pv_state(pv).shared_info
    host.unpause(pv)
    assert si.gfn == layout.PLATFORM_BAR_PFN
    assert [(v.vcpu, v.gfn, v.offset) for v in si.vcpu_info] == [
        (0, kernel.VCPU_INFO_PFN, 0),
        (1, kernel.VCPU_INFO_PFN, 64),
    ]
    plain_state = host.export_pv_state(plain)
    assert plain_state.shared_info.gfn is None
    assert [v.gfn for v in plain_state.shared_info.vcpu_info] == [None]
    # Only the toolstack's store and console channels, bound by dom0.
    types = [p.type for p in plain_state.event_channels.ports]
    assert types == [EvtchnType.INTERDOMAIN, EvtchnType.INTERDOMAIN]
    # A guest process that dies is a crashed domain.
    host.unpause(plain)
    proc = host.hv.domains[plain].process.proc
    proc.kill()
    proc.wait()
    assert host.domain_info(plain).state == base.DomainState.CRASHED
    host.destroy_domain(plain)
    with pytest.raises(base.DomainNotFound):
        host.domain_info(plain)


def _vcpu_times(host, domid):
    dom = host.hv.domains[domid]
    with dom.mem.lock():
        return [
            hvm.read_vcpu_time(bytes(dom._vcpu_info(v)))
            for v in range(dom.vcpus)
        ]


def _wallclock(host, domid):
    dom = host.hv.domains[domid]
    return hvm.read_wallclock(bytes(dom.mem.xen_pages[0]))


def test_time_as_xen_rebases_it(hosts):
    """Each vCPU's system time goes on from where it stood at the pause
    (the guest TSC is restored from the CPU records), and the wallclock
    is rebased so that wallclock + system time is the time of day."""
    a, b = hosts("src-time"), hosts("dst-time")
    assert a.now_ns() != b.now_ns()  # hosts booted at different times
    domid = _guest(a, rate=0, vcpus=2, fill="zero")
    assert _wait_for(lambda: _counters(a, domid)[1]["vcpu_info_gfn"])
    time.sleep(0.2)
    start = time.monotonic()
    _migrate_by_hand(a, b, domid)
    at_pause = a.hv.domains[domid].cpu_registers()[0]["tsc"]
    a.destroy_domain(domid)
    b.unpause(domid)
    dom = b.hv.domains[domid]
    tsc = dom.guest_tsc()
    elapsed = time.monotonic() - start
    # Not this host's TSC (it booted hours apart): the saved one, moved
    # on by no more than the time since the pause.
    assert at_pause <= tsc <= at_pause + elapsed * dom.tsc.khz * 1000
    times = _vcpu_times(b, domid)
    scale = hvm.TimeScale.for_khz(dom.tsc.khz)
    for t in times:
        assert t["version"] % 2 == 0
        assert t["flags"] & hvm.XEN_PVCLOCK_TSC_STABLE_BIT
        assert (t["tsc_to_system_mul"], t["tsc_shift"]) == (
            scale.mul_frac,
            scale.shift,
        )
        assert t["system_time"] >= scale.scale(at_pause)
    # What the guest reads now: pvclock extrapolated with its TSC.
    t = times[0]
    now = t["system_time"] + scale.scale(dom.guest_tsc() - t["tsc_timestamp"])
    assert abs(_wallclock(b, domid) + now - time.time_ns()) < 0.05e9


def test_reserved_grant_entries_seeded(idle):
    host, domid = idle
    dom = host.hv.domains[domid]
    params = host.get_hvm_params(domid)
    assert dom.grants.read(grant.GNTTAB_RESERVED_CONSOLE) == (
        grant.GTF_permit_access,
        0,
        params[hvm.HVM_PARAM_CONSOLE_PFN],
    )
    assert dom.grants.read(grant.GNTTAB_RESERVED_XENSTORE) == (
        grant.GTF_permit_access,
        0,
        params[hvm.HVM_PARAM_STORE_PFN],
    )
