"""SimHost operations that need no guest process."""

import dataclasses
import errno
import os
import stat
import threading
import time
import types

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import digest as sim_digest
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import guest as sim_guest
from nova_xen_ncm.host.sim import guestproc as sim_guestproc
from nova_xen_ncm.host.sim import host as sim_host
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim import memory as sim_memory
from nova_xen_ncm.host.sim import toolstack as sim_toolstack
from nova_xen_ncm.host.sim.memory import P2M_XEN

from .conftest import empty


def _config(name="g", mb=16, vcpus=1):
    return base.DomainConfig(name=name, memory_bytes=mb << 20, vcpus=vcpus)


def test_domid_rules(host):
    assert host.create_empty_domain(_config("a"), 5) == 5
    with pytest.raises(base.DomidInUse, match="domid 5"):
        host.create_empty_domain(_config("b"), 5)
    for bad in (0, base.DOMID_FIRST_RESERVED, base.DOMID_INVALID):
        with pytest.raises(base.HostError, match="outside"):
            host.create_empty_domain(_config("c"), bad)
    assert [d.domid for d in host.list_domains()] == [5]


def test_domids_are_given_round_robin_avoiding_recent_ones(host):
    """xen/common/domid.c: after the last one given, wrapping round;
    libxl: not one released less than a minute ago."""

    def alloc():
        return host.hv.alloc_domid("t", host.toolstack.recent.is_recent)

    empty(host, 1)
    with host.hv.lock:
        assert alloc() == 2
        # 2 is free, but the allocator moved on.
        assert alloc() == 3
    host.destroy_domain(1)
    host.hv._domid_last = base.DOMID_FIRST_RESERVED - 1
    with host.hv.lock:
        assert alloc() == 2  # 1 was released just now
    host.toolstack.recent.released[1] -= sim_toolstack.DOMID_REUSE_TIMEOUT
    host.hv._domid_last = base.DOMID_FIRST_RESERVED - 1
    with host.hv.lock:
        assert alloc() == 1


def test_random_domid_policy_gives_any_free_domid_not_recent(conf, host):
    """xl.conf's domid_policy "random": a migrating guest keeps its domid,
    so freshly booted hosts must not all give 1, 2, ... first."""
    conf.set_override("domid_policy", "random", group="xen_ncm_sim")
    with host.hv.lock:
        first = [host.toolstack._new_domid("t") for _ in range(20)]
    assert len(set(first)) > 1 and first[:2] != [1, 2], first
    assert all(0 < d < base.DOMID_FIRST_RESERVED for d in first)
    # Only 7, 9 and 300 are neither recent nor held: 9 is held.
    now = time.monotonic()
    host.toolstack.recent.released = dict.fromkeys(
        range(1, base.DOMID_FIRST_RESERVED), now
    )
    for free in (7, 9, 300):
        del host.toolstack.recent.released[free]
    empty(host, 9)
    with host.hv.lock:
        drawn = {host.toolstack._new_domid("t") for _ in range(64)}
    assert drawn == {7, 300}
    host.toolstack.recent.released[7] = now
    host.toolstack.recent.released[300] = now
    with host.hv.lock, pytest.raises(base.HostError, match="no domid free"):
        host.toolstack._new_domid("t")


def test_xen_domid_policy_is_the_hypervisor_round_robin(host):
    with host.hv.lock:
        assert [host.toolstack._new_domid("t") for _ in range(3)] == [
            1,
            2,
            3,
        ]


def test_a_recently_released_domid_asked_for_is_refused(host):
    """libxl__domain_make: "domain id recently used", not retried."""
    empty(host, 4)
    host.destroy_domain(4)
    with pytest.raises(base.DomidInUse, match="recently used"):
        host.create_empty_domain(_config("again"), 4)
    host.toolstack.recent.released[4] -= sim_toolstack.DOMID_REUSE_TIMEOUT
    host.create_empty_domain(_config("again"), 4)
    assert host.domain_info(4).name == "again"


def test_the_guest_that_released_a_domid_may_have_it_back(host):
    """A restore or a migration back puts the same guest (its uuid) under
    its own domid; the delay guards against another guest taking it."""
    uuid = "0f8b3bfa-3a59-4f4c-9d3e-6d7c1b1f2a10"
    config = dataclasses.replace(_config("back"), uuid=uuid)
    host.create_empty_domain(config, 6)
    host.destroy_domain(6)
    with pytest.raises(base.DomidInUse, match="recently used"):
        host.create_empty_domain(_config("another"), 6)
    host.create_empty_domain(config, 6)
    assert host.domain_info(6).uuid == uuid


def test_domid_in_use_refused_before_anything_is_created(host):
    host.create_empty_domain(_config("a", mb=128), 3)
    free = host.free_memory()
    with pytest.raises(base.DomidInUse):
        host.create_empty_domain(_config("b", mb=64), 3)
    assert host.free_memory() == free
    assert host.domain_info(3).name == "a"


def test_insufficient_memory(host):
    host.create_empty_domain(_config("a", mb=200), 1)
    with pytest.raises(base.InsufficientMemory):
        host.create_empty_domain(_config("b", mb=64), 2)
    with pytest.raises(base.DomainNotFound):
        host.domain_info(2)


def test_capabilities_restore_everything(host):
    caps = host.capabilities()
    assert caps.missing(pv_drivers=True) == {}
    assert set(caps.restore) == set(Item)


def test_populate_and_map_pages_zero_copy(host):
    d = empty(host, 1)
    pfns = np.array([0x10, 0x11, 0x200], dtype=np.uint64)
    host.populate(1, pfns)
    assert list(host.populated_pfns(1)) == [0x10, 0x11, 0x200]
    with host.map_pages(1, pfns, writable=True) as m:
        m.pages[2][:5] = b"hello"
    assert bytes(d.mem.ram[0x200][:5]) == b"hello"
    with host.map_pages(1, pfns[2:]) as m:
        assert m.pages[0].readonly and bytes(m.pages[0][:5]) == b"hello"
    with pytest.raises(base.HostError, match="not populated"):
        host.map_pages(1, np.array([0x12], dtype=np.uint64))
    with pytest.raises(base.HostError, match="beyond"):
        host.populate(1, np.array([1 << 30], dtype=np.uint64))


def test_populate_is_bounded_by_the_allocation(host):
    empty(host, 1, mb=1)
    with pytest.raises(base.InsufficientMemory):
        host.populate(1, np.arange(0, 2000, dtype=np.uint64))


def test_harvest_returns_and_clears(host):
    d = empty(host, 1)
    host.populate(1, np.arange(0x100, 0x110, dtype=np.uint64))
    with pytest.raises(base.HostError, match="not enabled"):
        host.harvest_dirty(1)
    host.enable_log_dirty(1)
    with d.mem.lock():
        d.mem.mark_dirty(np.array([0x105, 0x101]))
    assert list(host.harvest_dirty(1)) == [0x101, 0x105]
    assert len(host.harvest_dirty(1)) == 0


def test_log_dirty_refused_when_the_process_could_not_track(host):
    d = empty(host, 1)
    d.mem.header[sim_memory._HDR_TRACKER] = sim_memory.TRACKER_FAILED
    with pytest.raises(base.NotSupported, match="write tracking"):
        host.enable_log_dirty(1)
    assert not d.mem.log_dirty


def test_xen_page_replaces_ram_at_its_gfn(host):
    d = empty(host, 1)
    host.populate(1, np.array([0x500], dtype=np.uint64))
    host.hv._hc_add_to_physmap(d, "shared_info", 0, 0x500)
    assert d.mem.p2m[0x500] == P2M_XEN
    assert 0x500 not in host.populated_pfns(1)
    host.hv._hc_add_to_physmap(d, "shared_info", 0, layout.PLATFORM_BAR_PFN)
    assert d.mem.p2m[0x500] == 0


def test_hvm_context_and_params(host):
    empty(host, 1, vcpus=2)
    blob = host.get_hvm_context(1)
    records = hvm.decode(blob, 2)
    records[1].data = hvm.with_cpu_registers(records[1].data, {"rip": 77})
    host.set_hvm_context(1, hvm.encode(records))
    assert host.get_hvm_context(1) == hvm.encode(records)
    with pytest.raises(base.HostError, match="set_hvm_context"):
        host.set_hvm_context(1, blob[:-8])
    host.set_hvm_params(1, {hvm.HVM_PARAM_CALLBACK_IRQ: 1 << 57})
    assert host.get_hvm_params(1)[hvm.HVM_PARAM_CALLBACK_IRQ] == 1 << 57
    with pytest.raises(base.HostError, match="param 99"):
        host.set_hvm_params(1, {99: 1})
    info = base.TscInfo(mode=2, khz=1000000, nsec=5, incarnation=3)
    host.set_tsc_info(1, info)
    # tsc_set_info(): the incarnation counts the restores.
    assert host.get_tsc_info(1) == dataclasses.replace(info, incarnation=4)
    with pytest.raises(base.HostError, match="TSC mode"):
        host.set_tsc_info(1, base.TscInfo(9, 1, 0, 0))


def test_guest_cannot_set_toolstack_params(host):
    import errno

    from nova_xen_ncm.host.sim.evtchn import HypercallError

    d = empty(host, 1)
    with pytest.raises(HypercallError) as e:
        host.hv._hc_hvm_set_param(d, hvm.HVM_PARAM_STORE_PFN, 5)
    assert e.value.errno == errno.EPERM


def test_vcpu_throttle_bounds(host):
    empty(host, 1)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(base.HostError, match="throttle"):
            host.set_vcpu_throttle(1, bad)
    host.set_vcpu_throttle(1, 0.25)
    assert host.hv.domains[1].throttle == 0.25


def test_injected_failures(conf):
    from nova_xen_ncm.host.sim.host import SimHost

    conf.set_override("call_failure_probability", 1.0, group="xen_ncm_sim")
    h = SimHost("faulty", conf)
    try:
        with pytest.raises(base.HostError, match="injected failure"):
            h.list_domains()
    finally:
        h.close()


def test_injected_latency(conf, monkeypatch):
    from nova_xen_ncm.host.sim import host as host_mod

    slept = []
    caller = threading.get_ident()
    real_sleep = time.sleep

    def sleep(seconds):
        # time.sleep is the time module's: threads left by earlier tests
        # (a digest warming its cache) sleep through it too.
        if threading.get_ident() == caller:
            slept.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(host_mod.time, "sleep", sleep)
    conf.set_override("call_latency_s", 0.25, group="xen_ncm_sim")
    h = host_mod.SimHost("slow", conf)
    try:
        h.list_domains()
        h.free_memory()  # not a faulty call
    finally:
        h.close()
    assert slept == [0.25]


def test_default_config_from_options(host):
    cfg = host.default_config("demo")
    assert cfg.memory_bytes == 1024 << 20 and cfg.vcpus == 2
    assert [(d.kind, d.devid) for d in cfg.devices] == [
        ("vif", 0),
        ("vbd", 51712),
    ]


def write(dom, pfns, value):
    """Write guest RAM as every writer does: marked under the lock."""
    with dom.mem.lock():
        dom.mem.ram[pfns] = value
        dom.mem.mark_dirty(pfns)


def test_guest_state_reads_only_what_was_asked(host, monkeypatch):
    """The engine's digests in the pause: the items asked, nothing of
    the PV export, the xenstore or the guest's RAM records besides."""
    empty(host, 1)
    whole = host.guest_state(1)

    def unasked(*args, **kwargs):
        raise AssertionError("read though not asked for")

    for owner, name in (
        (host.services, "backend_states"),
        (host.services.xenstore, "export_domain"),
        (host, "_digest_grants"),
        (host, "_digest_shared_info"),
        (host, "_frontends"),
        (host, "_kernel_record"),
    ):
        monkeypatch.setattr(owner, name, unasked)
    items = (Item.MEMORY, Item.PLATFORM, Item.HVM_PARAMS)
    state = host.guest_state(1, items, guest_records=False)
    assert set(state.items) == set(items)
    assert {i: state.items[i] for i in items} == {
        i: whole.items[i] for i in items
    }
    assert state.frontends == {} and state.kernel == {}


def test_memory_digest_sees_content_not_how_it_is_stored(host):
    a, b = empty(host, 1, mb=80), empty(host, 2, mb=80)
    pfns = np.arange(0x100, 0x4100, dtype=np.uint64)
    host.populate(1, pfns)
    host.populate(2, pfns)
    write(a, 0x3000, np.arange(4096) % 5)
    write(b, 0x3000, np.arange(4096) % 5)
    # Written zeros on one side, never-touched pages on the other.
    write(a, slice(0x200, 0x2200), 0)
    assert host.memory_digest(1) == host.memory_digest(2)
    write(b, 0x3001, 9)
    assert host.memory_digest(1) != host.memory_digest(2)
    write(b, 0x3001, 0)
    assert host.memory_digest(1) == host.memory_digest(2)
    host.populate(2, np.array([0x5000], dtype=np.uint64))
    assert host.memory_digest(1) != host.memory_digest(2)


def _digest_reads(host, monkeypatch) -> list[int]:
    """The blocks the host's memory digest reads from now on."""
    read: list[int] = []
    blocks = type(host.digest)._digest_blocks

    def spy(cache, indices, mask):
        read.extend(indices)
        return blocks(cache, indices, mask)

    monkeypatch.setattr(type(host.digest), "_digest_blocks", staticmethod(spy))
    return read


def populated_and_left_alone(host):
    """Domain 1 (80 MB) with pfns 0x100-0x40ff populated, marked as
    restored so that its digest's cache is no longer kept warm behind the
    test's back, once the warming thread has stopped."""
    a = empty(host, 1, mb=80)
    host.populate(1, np.arange(0x100, 0x4100, dtype=np.uint64))
    a.booted = True
    while host.digest.cache(a).warming:
        time.sleep(0.01)
    return a


def test_memory_digest_reads_again_only_what_was_written(host, monkeypatch):
    a = populated_and_left_alone(host)
    write(a, slice(0x100, 0x4100), 7)
    first = host.memory_digest(1)
    read = _digest_reads(host, monkeypatch)
    write(a, 0x2345, 8)
    second = host.memory_digest(1)
    assert second != first
    # One block read again, not the 16384 pages.
    assert read == [0x2345 // sim_digest._DIGEST_BLOCK]
    # The same as a digest that reads everything.
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == second


def test_a_populate_moves_the_digest_by_its_blocks_only(host, monkeypatch):
    a = populated_and_left_alone(host)
    write(a, slice(0x100, 0x200), 7)
    first = host.memory_digest(1)
    read = _digest_reads(host, monkeypatch)
    # A zero page populated changes the digest (the populated set is in
    # it) and is looked at through its block alone.
    a.booted = False
    host.populate(1, np.array([0x5001], dtype=np.uint64))
    second = host.memory_digest(1)
    assert second != first
    assert read == [0x5001 // sim_digest._DIGEST_BLOCK]
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == second


def test_settle_digest_leaves_nothing_for_the_pause(host, monkeypatch):
    a = populated_and_left_alone(host)
    host.memory_digest(1)
    write(a, slice(0x1000, 0x1400), 9)
    host.settle_digest(1)
    read = _digest_reads(host, monkeypatch)
    host.memory_digest(1)
    assert read == []


def test_pages_a_restore_writes_are_digested_as_their_mapping_closes(
    host, monkeypatch
):
    a = empty(host, 1, mb=80)
    while not host.digest.cache(a).started:
        time.sleep(0.01)
    # The warming thread stopped, so that only the closing thread reads.
    a.booted = True
    while host.digest.cache(a).warming:
        time.sleep(0.01)
    a.booted = False
    read = _digest_reads(host, monkeypatch)
    size = max(sim_digest._DIGEST_INLINE_MIN, 2 * sim_digest._DIGEST_BLOCK)
    pfns = np.arange(0x1000, 0x1000 + 4 * size)
    for batch in np.split(pfns.astype(np.uint64), 4):
        host.populate(1, batch)
        with host.map_pages(1, batch, writable=True) as m:
            for _, view in m.runs():
                view[:] = b"\x5a" * view.nbytes
            assert read == []
        # In the closing thread: the blocks the batch is in, once each.
        assert read == sorted(
            {int(p) // sim_digest._DIGEST_BLOCK for p in batch}
        )
        read.clear()
    digest = host.memory_digest(1)
    assert read == []
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == digest


def test_a_paused_guest_is_digested_as_a_migration_reads_it(host, monkeypatch):
    a = populated_and_left_alone(host)
    pfns = np.arange(0x100, 0x4100, dtype=np.uint64)
    write(a, slice(0x100, 0x4100), np.arange(4096) % 251)
    write(a, slice(0x800, 0x900), 0)
    assert a.state != sim_host.DomainState.RUNNING
    host.enable_log_dirty(1)
    read = _digest_reads(host, monkeypatch)
    for batch in base.iter_batches(pfns, 1024):
        with host.map_pages(1, batch) as m:
            m.runs()
    # Every block was read as its pages were, none is left to the digest.
    assert sorted(set(read)) == sorted(
        {int(p) // sim_digest._DIGEST_BLOCK for p in pfns}
    )
    read.clear()
    first = host.memory_digest(1)
    assert read == []
    # A write after the migration read its page: that block again.
    write(a, 0x2345, 9)
    second = host.memory_digest(1)
    assert second != first
    assert read == [0x2345 // sim_digest._DIGEST_BLOCK]
    # The same as a digest that reads everything.
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == second
    # A running guest's reads are left to the warming thread.
    read.clear()
    a.state = sim_host.DomainState.RUNNING
    try:
        with host.map_pages(1, pfns[:1024]) as m:
            m.runs()
    finally:
        a.state = sim_host.DomainState.PAUSED
    assert read == []


def test_the_checkers_reads_leave_the_digest_as_it_was(host, monkeypatch):
    a = populated_and_left_alone(host)
    pfns = np.arange(0x100, 0x4100, dtype=np.uint64)
    write(a, slice(0x100, 0x4100), np.arange(4096) % 251)
    host.enable_log_dirty(1)
    read = _digest_reads(host, monkeypatch)
    with host.observing():
        for batch in base.iter_batches(pfns, 1024):
            with host.map_pages(1, batch) as m:
                m.runs()
    assert read == []
    # The blocks written are still the digest's to read.
    host.memory_digest(1)
    assert sorted(set(read)) == sorted(
        {int(p) // sim_digest._DIGEST_BLOCK for p in pfns}
    )


def test_memory_digest_of_a_pass_in_parts_sees_later_writes(host):
    a = populated_and_left_alone(host)
    # Pages in two blocks, so that a pass of one block leaves one.
    write(a, slice(0x100, 0x100 + 2 * sim_digest._DIGEST_BLOCK), 3)
    host.digest.cache(a).started = False
    # Part of a first pass, as the warming thread does it; then a page
    # that was a hole is written in a block not read yet.
    with host.digest.cache(a).lock:
        assert host.digest.refresh(a, limit=1)
    write(a, 0x3FFF, 5)
    parts = host.memory_digest(1)
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == parts


def test_data_mask_finds_written_pages_and_holes() -> None:
    from nova_xen_ncm.host.sim.memory import GuestMemory

    mem = GuestMemory.create(4096, "mask-test")
    try:
        written = [0, 1, 2, 700, 2048, 4095]
        for pfn in written:
            mem.ram[pfn, 0] = 1
        want = np.zeros(4096, dtype=bool)
        want[written] = True
        np.testing.assert_array_equal(mem.data_mask(0, 4096), want)
        np.testing.assert_array_equal(mem.data_mask(600, 2100), want[600:2100])
        # The SEEK_HOLE fallback answers the same.
        np.testing.assert_array_equal(
            mem._seek_data_mask(600, 2100), want[600:2100]
        )
        assert len(mem.data_mask(5, 5)) == 0
        # Written since creation: what the writers marked, whatever
        # the memory holds, in the order asked.
        with mem.lock():
            mem.mark_dirty(np.array([2, 700, 4095], dtype=np.uint64))
        ask = np.array([4095, 3, 700, 2, 0], dtype=np.uint64)
        assert mem.written_mask(ask).tolist() == [
            True,
            False,
            True,
            True,
            False,
        ]
        assert len(mem.written_mask(np.zeros(0, dtype=np.uint64))) == 0
    finally:
        mem.close()


def test_a_spare_guest_process_becomes_the_next_domain(conf) -> None:
    conf.set_override("spare_guest_process", True, group="xen_ncm_sim")
    h = sim_host.SimHost("spare", conf)
    try:
        first_spare = h.guests.spare[0]
        domid = h.create_domain(
            base.DomainConfig(name="g", memory_bytes=16 << 20, vcpus=1)
        )
        dom = h.hv.domains[domid]
        # The guest runs in the process started ahead, and another one
        # is started for the next domain once this one runs.
        assert dom.process.proc is first_spare
        _replenished(h)
        spare = h.guests.spare
        assert spare is not None and spare[0] is not first_spare
        assert h.domain_info(domid).state is base.DomainState.RUNNING
        h.pause(domid)
        h.unpause(domid)
        assert "--spare" in first_spare.args
        spare = h.guests.spare[0]
    finally:
        h.close()
    # Closing the host ends the spare that never got a domain.
    assert spare.wait(timeout=10) == 0
    assert first_spare.poll() is not None


def test_a_dead_spare_is_replaced_by_a_fresh_process(conf) -> None:
    conf.set_override("spare_guest_process", True, group="xen_ncm_sim")
    h = sim_host.SimHost("spare", conf)
    try:
        dead = h.guests.spare[0]
        dead.kill()
        dead.wait()
        domid = h.create_domain(
            base.DomainConfig(name="g", memory_bytes=16 << 20, vcpus=1)
        )
        assert h.hv.domains[domid].process.proc is not dead
        assert h.domain_info(domid).state is base.DomainState.RUNNING
    finally:
        h.close()


def _replenished(h: sim_host.SimHost) -> None:
    """Wait for the host's spare guest process and RAM to be prepared."""
    thread = h.guests.replenish_thread
    if thread is not None:
        thread.join(timeout=60)
        assert not thread.is_alive()


def _ram_mask(lay: layout.HvmLayout, end: int) -> np.ndarray:
    mask = np.zeros(end, dtype=bool)
    for start, stop in lay.ram_ranges:
        mask[min(start, end) : min(stop, end)] = True
    return mask


def test_a_domain_takes_the_ram_faulted_in_ahead(conf, host) -> None:
    conf.set_override("prefault_memory_mb", 32, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    try:
        spare = h.guests.spare_ram
        assert spare is not None
        assert spare.pages == (32 << 20) // base.PAGE_SIZE
        dom = empty(h, 1, mb=16)
        assert h.guests.spare_ram is None
        assert dom.mem.ram_fd == spare.fd
        # Faulted in where the layout has RAM; the VGA hole and what lies
        # beyond the guest's 16 MiB were given back.
        np.testing.assert_array_equal(
            dom.mem.data_mask(0, spare.pages),
            _ram_mask(dom.layout, spare.pages),
        )
        assert not dom.mem.ram[: (16 << 20) // base.PAGE_SIZE].any()
        # The same writes digest the same as in memory faulted in as it
        # is written.
        other = empty(host, 1, mb=16)
        pfns = np.arange(0x100, 0x900, dtype=np.uint64)
        for h_, d in ((h, dom), (host, other)):
            h_.populate(1, pfns)
            write(d, slice(0x100, 0x900, 3), 0x5A)
            d.booted = True
        assert h.memory_digest(1) == host.memory_digest(1)
    finally:
        h.close()


def test_spare_ram_is_bounded_by_free_memory_and_comes_back(
    conf, monkeypatch
) -> None:
    monkeypatch.setattr(sim_guestproc, "REPLENISH_DELAY", 0.0)
    conf.set_override("prefault_memory_mb", 4096, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    try:
        assert h.guests.spare_ram.pages == (256 << 20) // base.PAGE_SIZE
        empty(h, 1, mb=200)
        # A restoring domain leaves the host's CPU to its migration: the
        # thread that will replenish is started, and waits.
        assert h.guests.spare_ram is None
        assert h.guests.replenish_thread.is_alive()
        assert not h.guests._replenish_go.is_set()
        h.destroy_domain(1)
        _replenished(h)
        spare = h.guests.spare_ram
        assert spare.pages == (256 << 20) // base.PAGE_SIZE
        assert empty(h, 2, mb=16).mem.ram_fd == spare.fd
    finally:
        h.close()
    assert h.guests.spare_ram is None


def test_the_unpause_of_a_restored_domain_starts_no_thread(
    conf, monkeypatch
) -> None:
    monkeypatch.setattr(sim_guestproc, "REPLENISH_DELAY", 0.0)
    conf.set_override("prefault_memory_mb", 64, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    try:
        empty(h, 1, mb=16)
        waiting = h.guests.replenish_thread
        assert waiting.is_alive() and h.guests.spare_ram is None
        started = []
        real_start = threading.Thread.start

        def start(thread):
            started.append(thread.name)
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", start)
        # What the domain's unpause asks for (Toolstack.unpause), while
        # its guest's hypercalls may hold the host lock.
        held, done = threading.Event(), threading.Event()

        def hold() -> None:
            with h.hv.lock:
                held.set()
                done.wait(timeout=30)

        holder = threading.Thread(target=hold, daemon=True)
        real_start(holder)
        assert held.wait(timeout=10)
        asker = threading.Thread(target=h.guests.replenish, daemon=True)
        real_start(asker)
        try:
            asker.join(timeout=10)
            assert not asker.is_alive()
        finally:
            done.set()
        holder.join(timeout=10)
        assert started == []
        _replenished(h)
        assert h.guests.spare_ram is not None
        # With none waiting, the request starts one (as before).
        h.guests.spare_ram.close()
        h.guests.spare_ram = None
        h.guests.replenish()
        assert started == ["spare-ram-replenish"]
        _replenished(h)
        assert h.guests.spare_ram is not None
    finally:
        h.close()


def test_closing_the_host_ends_a_thread_waiting_to_replenish(conf) -> None:
    conf.set_override("prefault_memory_mb", 32, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    empty(h, 1, mb=16)
    waiting = h.guests.replenish_thread
    assert waiting.is_alive()
    closer = threading.Thread(target=h.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive() and not waiting.is_alive()
    assert h.guests.spare_ram is None


def test_a_close_racing_the_start_of_a_waiting_thread_ends_it(conf) -> None:
    # The host closes as a restoring domain's creation starts the thread
    # that waits to replenish: the close's request must not be wiped by
    # the start's (the thread would wait for ever, and the close with it
    # once no domain is left to let it go).
    conf.set_override("prefault_memory_mb", 32, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    guests = h.guests
    closer = threading.Thread(target=guests.begin_close, daemon=True)

    class Go(threading.Event):
        def clear(self) -> None:
            # The close comes between the start's look and its clear.
            if not closer.is_alive() and not guests.closed:
                closer.start()
                closer.join(timeout=0.5)
            super().clear()

    guests._replenish_go = Go()
    try:
        guests.prepare_replenish()
        closer.join(timeout=10)
        waiting = guests.replenish_thread
        if waiting is not None:
            waiting.join(timeout=10)
            assert not waiting.is_alive()
        assert guests.closed
    finally:
        guests._replenish_go.set()
        h.close()


def test_a_guest_above_the_mmio_hole_gets_memory_of_its_own(conf) -> None:
    conf.set_override("host_memory_mb", 5120, group="xen_ncm_sim")
    conf.set_override("prefault_memory_mb", 16, group="xen_ncm_sim")
    h = sim_host.SimHost("spare-ram", conf, prelaunch=False)
    try:
        spare = h.guests.spare_ram
        # 4 GiB of RAM reaches above 4 GiB: a physmap spare RAM lacks.
        big = empty(h, 1, mb=4096)
        assert big.mem.max_pfn > spare.max_pfn
        assert big.mem.ram_fd != spare.fd
        assert h.guests.spare_ram is spare
        assert empty(h, 2, mb=16).mem.ram_fd == spare.fd
    finally:
        h.close()


def test_spare_ram_stops_faulting_in_when_the_host_closes() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(sim_memory.SpareRamAbandoned):
        sim_memory.SpareRam(0x1000, 0x800, "stopped", stop)


def test_spare_ram_without_madv_populate_writes_every_page(
    monkeypatch,
) -> None:
    # An unknown advice fails as MADV_POPULATE_WRITE does before 5.14.
    monkeypatch.setattr(sim_memory, "MADV_POPULATE_WRITE", 0x7FFF)
    spare = sim_memory.SpareRam(0x1000, 0x300, "old-kernel")
    mem = sim_memory.GuestMemory.create(
        0x1000, "old-kernel", spare, ((0, 0x200),)
    )
    try:
        want = np.zeros(0x1000, dtype=bool)
        want[:0x200] = True
        np.testing.assert_array_equal(mem.data_mask(0, 0x1000), want)
    finally:
        mem.close()


def _reference_digest(dom) -> str:
    """memory_digest's definition, page by page (SimHost.memory_digest)."""
    mem = dom.mem
    ram = np.flatnonzero(mem.p2m == 1)
    block = sim_digest._DIGEST_BLOCK
    total = 0
    for b in sorted(set((ram // block).tolist())):
        inside = (ram >= b * block) & (ram < (b + 1) * block)
        mine = [int(p) for p in ram[inside]]
        bits = 0
        for p in mine:
            bits |= 1 << (p - b * block)
        h = base.memory_hasher(
            b.to_bytes(8, "little") + bits.to_bytes(block // 8, "little")
        )
        pfns = [p for p in mine if mem.ram[p].any()]
        if pfns:
            d = base.memory_hasher(np.array(pfns, dtype="<u8"))
            for p in pfns:
                d.update(mem.ram[p])
            h.update(d.digest())
        total += int.from_bytes(h.digest(), "little")
    return base.memory_hasher(
        (total % (1 << 128)).to_bytes(16, "little")
    ).hexdigest()


def test_memory_digest_matches_its_page_by_page_definition(host):
    a = empty(host, 1, mb=16)
    rng = np.random.default_rng(7)
    pfns = np.unique(rng.integers(0x100, 0x1000, 600)).astype(np.uint64)
    host.populate(1, pfns)
    a.booted = True
    while host.digest.cache(a).warming:
        time.sleep(0.01)
    # Runs, single pages, zero pages among them, several blocks apart.
    write(a, pfns[::2], 0x11)
    write(a, pfns[1::7], 0)
    assert host.memory_digest(1) == _reference_digest(a)
    write(a, pfns[5:40], 0x22)
    assert host.memory_digest(1) == _reference_digest(a)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("restored", [False, True])
def test_the_digest_in_small_chunks_matches_its_definition(
    host, monkeypatch, seed, restored
):
    # Chunks of the p2m (3 blocks), of a stretch (3 blocks) and of the
    # changed map (5 blocks) small enough that runs of RAM, of writes
    # and of Xen pages cross their boundaries; whatever the chunks, the
    # digest is the page-by-page one.
    monkeypatch.setattr(sim_digest, "_RAM_CHUNK", 3 * 64)
    monkeypatch.setattr(sim_digest, "_SPAN_BLOCKS", 3)
    monkeypatch.setattr(sim_memory, "_CHANGED_CHUNK", 5 * 64)
    a = empty(host, 1, mb=16)
    rng = np.random.default_rng(seed)
    runs = [(0x2C0 - 7, 0x3C0 + 5), (0x500 + 1, 0x5FF)]
    runs += [
        (int(s), int(s) + int(n))
        for s, n in zip(
            rng.integers(0x100, 0xF00, 6), rng.integers(1, 200, 6), strict=True
        )
    ]
    pfns = np.unique(
        np.concatenate(
            [np.arange(s, e) for s, e in runs]
            + [rng.integers(0x100, 0x1000, 300)]
        )
    ).astype(np.uint64)
    host.populate(1, pfns)
    a.booted = True  # the warming thread stops: the test looks alone
    while host.digest.cache(a).warming:
        time.sleep(0.01)
    a.booted = not restored
    write(a, pfns[rng.random(len(pfns)) < 0.5], 0x5A)
    write(a, pfns[rng.random(len(pfns)) < 0.1], 0)
    with a.mem.lock():
        # Xen pages over RAM, one at the edge of a chunk of the p2m.
        a.mem.map_xen_page(0, 3 * 64 * 5 - 1)
        a.mem.map_xen_page(1, int(pfns[len(pfns) // 2]))
    cache = host.digest.cache(a)
    with cache.lock:
        cache.started = False  # a first look, in chunks
    assert host.memory_digest(1) == _reference_digest(a)
    # Then by what changed: writes across chunk and block boundaries.
    write(a, pfns[(pfns >= 0x2C0 - 3) & (pfns < 0x300 + 2)], 0x77)
    write(a, pfns[rng.random(len(pfns)) < 0.05], 0x11)
    assert host.memory_digest(1) == _reference_digest(a)


def test_a_large_populate_leaves_nothing_for_the_pause(host, monkeypatch):
    a = empty(host, 1, mb=80)
    while not host.digest.cache(a).started:
        time.sleep(0.01)
    a.booted = True
    while host.digest.cache(a).warming:
        time.sleep(0.01)
    a.booted = False
    # Whole blocks and a part of one, as a batch of pages sent as zero.
    size = sim_digest._DIGEST_POPULATE_MIN + sim_digest._DIGEST_BLOCK // 2
    host.populate(1, np.arange(0x100, 0x100 + size, dtype=np.uint64))
    # Fewer: left to their mapping's close, or to the digest.
    host.populate(1, np.array([0x4000, 0x4002, 0x4100], dtype=np.uint64))
    read = _digest_reads(host, monkeypatch)
    digest = host.memory_digest(1)
    block = sim_digest._DIGEST_BLOCK
    assert read == [0x4000 // block, 0x4100 // block]
    assert digest == _reference_digest(a)


def test_the_first_look_asks_for_holes_only_where_pages_were_written(
    host, monkeypatch
):
    a = populated_and_left_alone(host)
    asked = []
    data_mask = sim_memory.GuestMemory.data_mask

    def spy(mem, start, end):
        asked.append((start, end))
        return data_mask(mem, start, end)

    monkeypatch.setattr(sim_memory.GuestMemory, "data_mask", spy)
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == _reference_digest(a)
    assert asked == []
    write(a, slice(0x2010, 0x2012), 3)
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == _reference_digest(a)
    block = sim_digest._DIGEST_BLOCK
    assert asked[0] == (0x2010 // block * block, (0x2010 // block + 1) * block)


def _fault_in(dom) -> None:
    """Fault the domain's RAM in without writing it as a guest (spare
    RAM, prefault_memory_mb): every page is data to the kernel, zero,
    and never written since the domain was created."""
    mem = dom.mem
    ret = sim_memory._madvise(
        mem.ram.ctypes.data, mem.ram_size, sim_memory.MADV_POPULATE_WRITE
    )
    assert ret == 0
    assert mem.data_mask(0x100, 0x4100).all()


def _pages_read(monkeypatch) -> list[int]:
    """How many pages the digest tests for zero (and hashes) per call."""
    read: list[int] = []
    nonzero = base.nonzero_pages

    def spy(pages, rows=None):
        read.append(len(pages) if rows is None else len(rows))
        return nonzero(pages, rows)

    monkeypatch.setattr(sim_digest.base, "nonzero_pages", spy)
    return read


def test_a_guest_that_ran_is_digested_without_its_never_written_pages(
    host, monkeypatch
):
    """The source of a migration (a domain that ran) with its RAM faulted
    in ahead: the pages never written since the domain was created are
    zero by construction and not read; those written are."""
    a = populated_and_left_alone(host)
    _fault_in(a)
    write(a, slice(0x2010, 0x2013), 3)
    write(a, 0x3000, 0)
    read = _pages_read(monkeypatch)
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == _reference_digest(a)
    assert sum(read) == 4
    read.clear()
    write(a, 0x3001, 4)
    assert host.memory_digest(1) == _reference_digest(a)
    assert sum(read) == 2  # the written pages of the block written


def _unmarked_write(dom, pfn, value):
    """A write no writer marks: a gap in the write tracking (a device
    path, a missed fault), which the sender's choice of pages to send
    (harvest_dirty, written_pages) misses too."""
    with dom.mem.lock():
        dom.mem.ram[pfn] = value
        assert not dom.mem.changed[pfn]


def test_a_write_the_tracking_missed_is_in_the_digest_where_it_is_read(host):
    """What the digest still proves of a write the tracking missed: on a
    page written since creation whose block is read again (another write
    marked in it), it is in the digest, so a copy without it fails; on a
    page never written since creation, or in a block no marked write
    touches, it is not (the digest goes by the tracking, as the sender
    does)."""
    a = populated_and_left_alone(host)
    write(a, slice(0x2010, 0x2013), 3)
    host.memory_digest(1)
    _unmarked_write(a, 0x2011, 7)
    write(a, 0x2012, 4)
    assert host.memory_digest(1) == _reference_digest(a)
    _unmarked_write(a, 0x3456, 6)  # never written since creation
    never = np.array([0x3456], dtype=np.uint64)
    assert not a.mem.written_mask(never)[0]
    assert host.memory_digest(1) != _reference_digest(a)


def test_a_page_written_without_the_lock_is_read_as_written(host, monkeypatch):
    """Pages others write at any time without a mark (grant maps, the
    xenstore ring: Hypervisor.unlocked_writes) are read, never written
    since creation or not."""
    a = populated_and_left_alone(host)
    _fault_in(a)
    a.mem.ram[0x1234] = 5  # as through a writable grant map
    assert not a.mem.written_mask(np.array([0x1234], dtype=np.uint64))[0]
    unlocked = np.array([0x1234], dtype=np.uint64)
    monkeypatch.setattr(host.hv, "unlocked_writes", lambda dom: unlocked)
    host.digest.cache(a).started = False
    assert host.memory_digest(1) == _reference_digest(a)
    a.mem.ram[0x1234] = 6
    assert host.memory_digest(1) == _reference_digest(a)


VBD = 51712


def _vbd_guest(uuid: str, name: str = "g") -> base.DomainConfig:
    return base.DomainConfig(
        name=name,
        memory_bytes=16 << 20,
        vcpus=1,
        uuid=uuid,
        devices=(base.DeviceConfig("vbd", VBD, disk_bytes=4096),),
    )


def test_a_disk_is_made_at_first_boot_and_kept_on_reboot(
    conf, host, tmp_path
) -> None:
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    uuid = "0B9C6F0E-7D1A-4C3E-9A51-2F0E8D7C6B5A"
    domid = host.create_domain(_vbd_guest(uuid))
    path = host.disk_path(uuid, VBD)
    # The file has the canonical spelling of the uuid.
    assert os.path.basename(path) == f"{uuid.lower()}-{VBD}.disk"
    assert os.path.getsize(path) == 4096
    inode = os.stat(path).st_ino
    with open(path, "r+b") as f:
        f.seek(4000)
        f.write(b"written before the reboot")
    host.destroy_domain(domid)
    # A reboot (Nova's destroy without destroy_disks, then create).
    domid = host.create_domain(_vbd_guest(uuid))
    assert os.stat(path).st_ino == inode
    with open(path, "rb") as f:
        f.seek(4000)
        assert f.read(25) == b"written before the reboot"
    host.destroy_domain(domid, delete_disks=True)
    assert not os.path.exists(path)


def test_disks_of_a_guest_that_left_are_not_deleted(
    conf, host, tmp_path
) -> None:
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    uuid = "5d3f4b0e-1c2a-4f6e-8a9b-0c1d2e3f4a5b"
    domid = host.create_domain(_vbd_guest(uuid))
    path = host.disk_path(uuid, VBD)
    host.pause(domid)
    host.quiesce_backends(domid)
    host.export_pv_state(domid)
    # Its state went to another host (or a save file): the disk is now
    # that copy's.
    host.destroy_domain(domid, delete_disks=True)
    assert os.path.exists(path)


def test_the_default_disk_directory_is_private(host, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    uuid = "5d3f4b0e-1c2a-4f6e-8a9b-0c1d2e3f4a5b"
    domid = host.create_domain(_vbd_guest(uuid))
    where = tmp_path / "state" / "nova-xen-ncm" / "sim-disks"
    assert host.disk_path(uuid, VBD).startswith(str(where) + os.sep)
    assert os.path.exists(host.disk_path(uuid, VBD))
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    host.destroy_domain(domid, delete_disks=True)


def test_disk_uuid_and_path_errors_name_what_was_wrong(
    conf, host, tmp_path
) -> None:
    with pytest.raises(ValueError, match="'../x' is not a UUID"):
        host.disk_path("../x", VBD)
    conf.set_override("disk_dir", str(tmp_path / "file"), "xen_ncm_sim")
    (tmp_path / "file").write_bytes(b"")
    uuid = "5d3f4b0e-1c2a-4f6e-8a9b-0c1d2e3f4a5b"
    with pytest.raises(base.HostError, match=f"{tmp_path / 'file'}"):
        host.create_domain(_vbd_guest(uuid))
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    os.makedirs(tmp_path / "disks")
    # A symbolic link where the disk goes is not followed.
    os.symlink(tmp_path / "elsewhere", host.disk_path(uuid, VBD))
    with pytest.raises(base.HostError, match="cannot be opened"):
        host.create_domain(_vbd_guest(uuid))
    assert not (tmp_path / "elsewhere").exists()
    os.unlink(host.disk_path(uuid, VBD))
    domid = host.create_domain(_vbd_guest(uuid))
    with pytest.raises(base.HostError, match=f"uuid {uuid} is held"):
        host.create_domain(_vbd_guest(uuid.upper(), name="other"))
    host.destroy_domain(domid, delete_disks=True)


def test_an_unpause_that_failed_on_one_backend_releases_the_rest_after(
    conf, host, tmp_path
) -> None:
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    config = base.DomainConfig(
        name="g",
        memory_bytes=16 << 20,
        vcpus=1,
        devices=(
            base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
            base.DeviceConfig("vbd", VBD, disk_bytes=4096),
        ),
    )
    domid = host.create_domain(config)
    host.pause(domid)
    host.quiesce_backends(domid)
    dom = host.hv.domains[domid]
    # As after an import: the backends are held until the guest runs.
    host.services.record(dom).held = True
    first, second = list(dom.backends.values())
    calls = []
    real = first.resume

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ring gone")
        real()

    first.resume = flaky
    with pytest.raises(base.HostError, match=f"{first.key} cannot resume"):
        host.unpause(domid)
    assert second.quiesced and host.services.record(dom).held
    host.unpause(domid)
    assert len(calls) == 2
    assert not first.quiesced and not second.quiesced
    assert not host.services.record(dom).held
    assert host.domain_info(domid).state is base.DomainState.RUNNING
    host.destroy_domain(domid, delete_disks=True)


def test_the_checkers_reads_meet_no_injected_fault(conf, host) -> None:
    from nova_xen_ncm.host import checker

    empty(host, 1)
    host.populate(1, np.arange(16, dtype=np.uint64))
    conf.set_override("call_failure_probability", 1.0, "xen_ncm_sim")
    with pytest.raises(base.HostError, match="injected failure"):
        host.populated_pfns(1)
    draws = host._faults.getstate()
    pfns, _ = checker.read_memory(host, 1)
    state = checker.snapshot(host, 1)
    assert len(pfns) == 16 and len(state.items[Item.MEMORY][0]) == 16
    # The oracle drew nothing from the migration's sequence of faults.
    assert host._faults.getstate() == draws
    with pytest.raises(base.HostError, match="injected failure"):
        host.populated_pfns(1)


def test_a_dom0_service_failing_is_kept_for_the_owner(host):
    """A handler raising on the dom0 thread does not stop dom0, and the
    failure is not only a log line: the host keeps it and raises it."""
    hv = host.hv
    with hv.lock:
        port = hv.evtchn.bind_ipi(hv.dom0, 0)
    seen = threading.Event()

    def broken(port: int) -> None:
        seen.set()
        raise RuntimeError("backend bug")

    host.services.kernel.handlers[port] = broken
    with hv.lock:
        hv.evtchn.send(hv.dom0, port)
    assert seen.wait(5)
    deadline = time.monotonic() + 5
    while not host.dom0_errors() and time.monotonic() < deadline:
        time.sleep(0.01)
    (error,) = host.dom0_errors()
    assert "backend bug" in str(error) and f"port {port}" in str(error)
    with pytest.raises(sim_host.Dom0Error, match="backend bug"):
        host.raise_dom0_errors()
    host.services.kernel.errors.clear()  # seen: the fixture's own check passes


def test_hypercalls_are_a_table_not_attribute_names(host):
    """A guest's hypercall name is looked up in the table of hypercalls:
    a name of any other attribute of the hypervisor or the event channel
    operations (set_pending, table, ...) is ENOSYS."""
    a = empty(host, 1)
    for op in (
        "evtchn_set_pending",
        "evtchn_table",
        "evtchn_validate_table",
        "release_domain",
        "__init__",
    ):
        with pytest.raises(evtchn.HypercallError) as e:
            host.hv.hypercall(a, op, {})
        assert e.value.errno == errno.ENOSYS, op
    assert host.hv.hypercall(a, "hvm_get_param", {"index": 1}) == 0


def test_hypercall_handler_bugs_are_not_errnos(host):
    """Only the errors Xen returns reach the guest as errnos: a handler
    raising anything else (here a malformed request, a TypeError) is a
    simulator error kept for the host's owner, not an EINVAL that would
    pass for Xen's answer."""
    import socket

    from nova_xen_ncm.host.sim import ipc
    from nova_xen_ncm.host.sim.hypervisor import SimError

    a = empty(host, 1)
    mine, theirs = socket.socketpair()
    server = threading.Thread(
        target=host.hv.serve_hypercalls, args=(a, theirs)
    )
    server.start()
    try:
        # An error of Xen's: closing a port not in use is -EINVAL.
        ipc.send(mine, {"op": "evtchn_close", "args": {"port": 9}})
        assert ipc.recv(mine)["err"] == -errno.EINVAL
        assert host.dom0_errors() == []
        # A handler that raises TypeError: no errno, kept as a SimError.
        ipc.send(mine, {"op": "evtchn_close", "args": {"prt": 9}})
        reply = ipc.recv(mine)
        assert reply["err"] == 0 and "simulator error" in reply["msg"]
        (error,) = host.dom0_errors()
        assert isinstance(error, SimError)
        assert isinstance(error.__cause__, TypeError)
        with pytest.raises(sim_host.Dom0Error, match="evtchn_close"):
            host.raise_dom0_errors()
    finally:
        mine.close()
        server.join(5)
        theirs.close()
    host.hv.errors.clear()  # seen: the fixture's own check passes


def test_the_hypervisors_domain_keeps_only_the_hypervisors_state(host):
    """struct domain's part only: dom0's records (ports, backends,
    disks, restore state), the guest process's channels and the digest
    cache are kept by the layers that own them."""
    a = empty(host, 1)
    kept = set(vars(a))
    for moved in (
        "backends",
        "backends_quiesced",
        "backends_held",
        "released_backends",
        "dom0_ports",
        "dom0_store_port",
        "disks",
        "disks_here",
        "detached_ring",
        "held_ports",
        "proc",
        "ctl",
        "hc",
        "send_lock",
        "request_lock",
        "next_id",
        "digest_lock",
        "digest_blocks",
        "digest_started",
        "digest_pending",
        "digest_mask",
        "warming",
    ):
        assert moved not in kept, moved
    rec = host.services.record(a)
    assert rec is host.services.record(a) and not rec.held
    # The old spelling reads dom0's record.
    assert a.backends is rec.backends and a.disks is rec.disks
    assert host.digest.cache(a) is host.digest.cache(a)
    assert a.process is None


def test_locks_taken_out_of_order_are_found():
    """The lock order is checked where two are taken: the memory lock
    then the host lock is an inversion, raised before it can deadlock."""
    host_lock, mem_lock = threading.RLock(), threading.Lock()
    with locks.ordered(locks.HOST, host_lock, reentrant=True):
        with locks.ordered(locks.MEMORY, mem_lock):
            # Re-entering the host lock it holds is not an inversion.
            with locks.ordered(locks.HOST, host_lock, reentrant=True):
                assert locks.held() == (locks.HOST, locks.MEMORY, locks.HOST)
    with locks.ordered(locks.MEMORY, mem_lock):
        with pytest.raises(locks.LockOrderError, match="'host'"):
            with locks.ordered(locks.HOST, host_lock):
                pass
    assert locks.held() == ()


def test_the_host_lock_under_a_memory_lock_is_refused(host):
    """The hypervisor's lock is an ordered lock: taken while a domain's
    memory lock is held (an inversion of locks.ORDER), it raises."""
    a = empty(host, 1)
    with host.hv.lock, a.mem_lock():
        pass  # the order
    with a.mem_lock():
        with pytest.raises(locks.LockOrderError, match="'host'.*'memory'"):
            with host.hv.lock:
                pass


def test_xenstored_and_raw_memory_locks_are_ordered(host):
    """xenstored's lock and a domain's memory lock taken directly
    (GuestMemory.lock, as the guest process and the devices take it)
    are checked against locks.ORDER too."""
    a = empty(host, 1)
    with host.hv.lock, host.xenstore._lock, a.mem.lock():
        assert locks.held() == (locks.HOST, locks.XENSTORE, locks.MEMORY)
    with a.mem.lock():
        with pytest.raises(locks.LockOrderError, match="'xenstore'"):
            with host.xenstore._lock:
                pass
    with host.xenstore._lock:
        with pytest.raises(locks.LockOrderError, match="'host'"):
            with host.hv.lock:
                pass
    assert locks.held() == ()


def test_a_hypercall_under_the_memory_lock_is_refused(monkeypatch):
    """The hypervisor serves a hypercall under its lock, then the
    caller's memory lock: a guest calling with its memory lock held
    would deadlock across processes, so the order check refuses it."""
    sent = []
    kernel = types.SimpleNamespace(hc_lock=threading.Lock(), hc=object())
    monkeypatch.setattr(sim_guest.ipc, "send", lambda s, m: sent.append(m))
    monkeypatch.setattr(sim_guest.ipc, "recv", lambda s: {"ok": 7})
    with locks.ordered(locks.MEMORY, threading.Lock()):
        with pytest.raises(locks.LockOrderError, match="'host'"):
            sim_guest.GuestKernel.hypercall(kernel, "evtchn_send", port=3)
    assert sent == []
    assert sim_guest.GuestKernel.hypercall(kernel, "evtchn_send", port=3) == 7
    assert sent == [{"op": "evtchn_send", "args": {"port": 3}}]


def test_dom0_closes_its_ends_of_a_destroyed_domains_channels(host):
    """domain_kill leaves dom0's end of an interdomain channel unbound;
    dom0 closes it and drops its handler (the hypervisor does not reach
    into dom0's kernel)."""
    dom = empty(host, 3)
    with host.hv.lock:
        guest_port = host.hv.evtchn.alloc_unbound(dom, 3, 0)
        local = host.services.dom0_bind(dom, guest_port)
    host.services.kernel.handlers[local] = print
    assert local in host.hv.dom0.ports
    assert local in host.services.kernel.handlers
    host.destroy_domain(3)
    assert local not in host.hv.dom0.ports
    assert local not in host.services.kernel.handlers


def test_the_wallclock_is_the_hosts_boot_for_every_update(host):
    """update_domain_wallclock_time writes the host's wc_sec/wc_nsec
    (the wall time at its NOW() 0), which only a settime changes: every
    update writes the same value, and wallclock + NOW() is the time of
    day."""
    dom = empty(host, 1)
    page = dom.mem.xen_pages[sim_memory.XENPAGE_SHARED_INFO]
    seen = []
    for _ in range(2):
        with dom.mem_lock():
            dom.update_time()
        seen.append(hvm.read_wallclock(bytes(page)))
        time.sleep(0.01)
    assert seen[0] == seen[1] == host.hv.wallclock_ns
    assert abs(seen[0] + host.hv.now_ns() - time.time_ns()) < 10**9


def test_reentry_does_not_depend_on_the_rlock_type():
    """A process monkey-patched by eventlet after the locks module was
    imported (Nova's tests and services) makes RLocks of another type;
    the locks said to be re-entrant stay so, and the others still refuse
    re-entry."""
    patched_rlock = threading._PyRLock()  # not the C RLock's type
    lock = locks.OrderedLock(locks.XENSTORE, patched_rlock, reentrant=True)
    with lock, lock:
        assert locks.held() == (locks.XENSTORE, locks.XENSTORE)
    plain = locks.OrderedLock(locks.XENSTORE, threading._PyRLock())
    with plain:
        with pytest.raises(locks.LockOrderError, match="not re-entrant"):
            with plain:
                pass
    assert locks.held() == ()


def test_a_lock_that_is_not_reentrant_taken_twice_is_refused(host):
    """Re-entry is allowed for the re-entrant locks only: taking a
    domain's memory lock again would deadlock, so the check refuses it."""
    a = empty(host, 1)
    with host.hv.lock, host.hv.lock:
        pass
    with a.mem_lock():
        with pytest.raises(locks.LockOrderError, match="not re-entrant"):
            with a.mem.lock():
                pass
    assert locks.held() == ()


@pytest.mark.parametrize("fill", ["random", "zero"])
def test_every_page_the_guest_wrote_is_said_written(conf, fill) -> None:
    # Prefaulted spare RAM: every page is resident, written or not.
    conf.set_override("spare_guest_process", True, group="xen_ncm_sim")
    conf.set_override("prefault_memory_mb", 64, group="xen_ncm_sim")
    h = sim_host.SimHost("written", conf)
    try:
        domid = h.create_domain(
            base.DomainConfig(
                name="g",
                memory_bytes=16 << 20,
                vcpus=1,
                workload={"fill": fill, "dirty_rate": 0},
            )
        )
        h.pause(domid)
        pfns = h.populated_pfns(domid)
        written = h.written_pages(domid, pfns)
        ram = h.hv.domains[domid].mem.ram
        # The guest's RAM, read here: a page holding anything but zero
        # is never said unwritten.
        nonzero = ram[pfns.astype(np.int64)].any(axis=1)
        assert not (nonzero & ~written).any()
        if fill == "zero":
            assert written.sum() < len(pfns) // 2
        else:
            assert written.sum() > len(pfns) // 2
    finally:
        h.close()


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_guest_asked_to_shut_down_through_xenstore_shuts_itself_down(
    conf, host, tmp_path
) -> None:
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    domid = host.create_domain(
        _vbd_guest("5d1c9a0e-3b7f-4e2a-8c61-0f9e8d7c6b5a")
    )
    xs = host.services.toolstack_xs
    control = f"/local/domain/{domid}/control"
    # The guest's PV drivers say they watch control/shutdown.
    assert _wait_for(lambda: xs.read(f"{control}/feature-poweroff") == b"1")
    host.shutdown(domid)
    # The request is in the guest's xenstore until the guest takes it.
    assert _wait_for(
        lambda: host.domain_info(domid).state == base.DomainState.SHUTDOWN
    ), host.domain_info(domid)
    # Acknowledged by the guest (Linux clears the node), not the host.
    assert xs.read(f"{control}/shutdown") == b""
    assert host.domain_info(domid).shutdown_reason == "poweroff"
    # A shut-down domain does not run again; it is only destroyed.
    host.unpause(domid)
    assert host.domain_info(domid).state == base.DomainState.SHUTDOWN
    host.destroy_domain(domid)
    with pytest.raises(base.DomainNotFound):
        host.domain_info(domid)


def test_a_guest_without_pv_drivers_cannot_be_asked_to_shut_down(
    host,
) -> None:
    domid = host.create_domain(
        base.DomainConfig(name="hvm", memory_bytes=16 << 20, pv_drivers=False)
    )
    with pytest.raises(base.NotSupported, match="no PV control interface"):
        host.shutdown(domid)
    assert host.domain_info(domid).state == base.DomainState.RUNNING
    host.destroy_domain(domid)


def test_the_arrays_a_build_freed_go_back_once_the_domain_runs(
    host, monkeypatch
) -> None:
    released = []

    def release() -> None:
        released.append([d.domid for d in host.list_domains()])

    monkeypatch.setattr(base, "release_freed_memory", release)
    domid = host.create_domain(
        base.DomainConfig(name="g", memory_bytes=16 << 20, vcpus=1)
    )
    # Once, with the domain built: its arrays of every pfn are freed.
    assert released == [[domid]]
