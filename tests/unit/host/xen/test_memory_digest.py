"""The real Xen host's memory digest (memdigest): the sum of 64-page
blocks' terms, kept from the start of log-dirty so that the paused
source reads only the blocks written since they were read, and read
whole where log-dirty is off. Runs in well under a second: fake
libxenctrl/libxenforeignmemory over a numpy RAM."""

from __future__ import annotations

import ctypes
import functools
import types

import numpy as np
import xxhash

from nova_xen_ncm.engine import restorer
from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import host as xen_host
from nova_xen_ncm.stream import libxc

WORDS = base.PAGE_SIZE // 8
SHARED = 40  # a page dom0's daemons write (xenstore ring)
VCPU_INFO = 1500  # where the guest registered vCPU 0's vcpu_info


class _FakeXen:
    """xenforeignmemory_map/unmap over ``ram`` (a copy of the pages asked
    for, at an address of this process) and a log-dirty that reports
    only what ``dirty`` holds."""

    def __init__(
        self, ram: np.ndarray, populated: np.ndarray | None = None
    ) -> None:
        self.ram = ram
        #: Which pfns Xen maps (the others are refused, as Xen refuses a
        #: pfn it never populated).
        self.populated = (
            np.ones(len(ram), dtype=bool) if populated is None else populated
        )
        self.dirty: list[int] = []
        self.held: dict[int, ctypes.Array] = {}
        # Writable mappings: their pages go back into ``ram`` at unmap.
        self.writable: dict[int, np.ndarray] = {}
        self.bitmap = ctypes.create_string_buffer(len(ram) // 8 + 1)
        #: The pfns of every mapping made, in order.
        self.mapped: list[int] = []

    def xenforeignmemory_map(self, fmem, domid, prot, n, arr, err):
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        self.mapped.extend(pfns.tolist())
        for i in np.flatnonzero(~self.populated[pfns]).tolist():
            err[i] = -22
        buf = ctypes.create_string_buffer(
            self.ram[pfns].tobytes(), n * base.PAGE_SIZE
        )
        addr = ctypes.addressof(buf)
        self.held[addr] = buf
        if prot & xen_host.PROT_WRITE:
            self.writable[addr] = pfns
        return addr

    def xenforeignmemory_unmap(self, fmem, addr, n):
        buf = self.held.pop(addr)
        pfns = self.writable.pop(addr, None)
        if pfns is not None:
            self.ram[pfns] = np.frombuffer(buf, np.uint64).reshape(-1, WORDS)
        return 0

    def xc_domain_populate_physmap_exact(self, xch, domid, n, order, fl, arr):
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        self.populated[pfns] = True
        return 0

    def xc_domain_unpause(self, xch, domid):
        return 0

    def xc_shadow_control(self, xch, domid, op, buf, n):
        return 0

    def xc_logdirty_control(self, xch, domid, op, buf, bits, flags, stats):
        # Xen marks its write-mapped pages only when asked (FINAL).
        assert flags & xen_host.XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL
        ctypes.memset(self.bitmap, 0, len(self.bitmap))
        for pfn in self.dirty:
            self.bitmap[pfn // 8] = bytes(
                [self.bitmap[pfn // 8][0] | 1 << (pfn % 8)]
            )
        if op != xen_host.SHADOW_OP_PEEK:
            self.dirty.clear()
        return 0


class _Buffer:
    def __init__(self, fake: _FakeXen) -> None:
        self.hbuf = ctypes.addressof(fake.bitmap)


def _driver(ram: np.ndarray, pfns: np.ndarray, monkeypatch):
    fake = _FakeXen(ram)
    monkeypatch.setattr(xen_host, "FN", fake)
    xen = object.__new__(xen_host.XenHost)
    xen._fmem = xen._xch = object()
    xen._init_bookkeeping()
    key = (len(pfns), len(ram) - 1)
    xen._pfn_cache[7] = (key, pfns)
    xen._raw_info = lambda domid, call: types.SimpleNamespace(
        tot_pages=len(pfns), shared_info_frame=2**64 - 1
    )
    xen.populated_pfns = lambda domid: pfns.copy()
    xen._shared_with_dom0 = lambda domid: np.array([SHARED], np.uint64)
    xen._reserved_pfns = lambda domid: np.zeros(0, dtype=np.uint64)
    xen._max_gpfn = lambda domid: len(ram) - 1
    xen._dirty_buffer = lambda domid, bits: _Buffer(fake)
    xen._dm_dirty_log = lambda domid, enable: None
    # A patched hypervisor that tells the vcpu_info placements: vCPU 0's
    # at VCPU_INFO, vCPU 1's in its legacy shared_info slot.
    fake.vcpu_info = {0: (VCPU_INFO, 0x40), 1: None}
    xen._tells_placements = None
    xen.hypervisor_facts = lambda: types.SimpleNamespace(
        ncm_evtchn=True, ncm_vcpu=True
    )
    xen.domain_info = lambda domid: types.SimpleNamespace(
        vcpus=len(fake.vcpu_info)
    )
    fake.abi = "2-level"
    xen._context = lambda: types.SimpleNamespace(
        get_vcpu_state=lambda domid, vcpu: types.SimpleNamespace(
            vcpu_info=fake.vcpu_info[vcpu]
        ),
        event_channel_abi=lambda domid: fake.abi,
    )
    return xen, fake


def _definition(ram: np.ndarray, pfns: np.ndarray) -> str:
    """memdigest.DEFINITION written out page by page, apart from the
    driver: per block of 64 pfns with a counted pfn, the hash of its
    index and counted pfns (a bit each), then of (pfn, content) of its
    non-zero pages; the hash of the sum of those."""
    pfns = [int(p) for p in pfns if p != SHARED]
    total = 0
    for block in sorted({p // 64 for p in pfns}):
        mine = [p for p in pfns if p // 64 == block]
        bits = sum(1 << (p - block * 64) for p in mine)
        h = xxhash.xxh3_128(
            block.to_bytes(8, "little") + bits.to_bytes(8, "little")
        )
        nonzero = [p for p in mine if ram[p].any()]
        if nonzero:
            d = xxhash.xxh3_128(np.array(nonzero, "<u8").tobytes())
            for p in nonzero:
                d.update(ram[p].tobytes())
            h.update(d.digest())
        total += int.from_bytes(h.digest(), "little")
    return xxhash.xxh3_128(
        (total % (1 << 128)).to_bytes(16, "little")
    ).hexdigest()


def _guest(pages: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ram = rng.integers(1, 2**63, size=(pages, WORDS), dtype=np.uint64)
    ram[5:70] = 0
    ram[100] = 0
    ram[100, -1] = 7  # non-zero in its last word only
    ram[1100:1200] = 0
    holes = np.r_[128:192, 200:230, 77]
    pfns = np.setdiff1d(np.arange(pages, dtype=np.uint64), holes)
    return ram, pfns


def test_the_digest_is_its_definition_over_several_mappings(
    monkeypatch,
) -> None:
    ram, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake = _driver(ram, pfns, monkeypatch)
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert not fake.held
    ram[100, -1] = 0  # a page turned zero
    assert xen.memory_digest(7) == _definition(ram, pfns)


def _precopy(xen, pfns: np.ndarray) -> None:
    """Round 0 as the sender makes it: every page mapped read-only, a
    batch at a time."""
    for batch in base.iter_batches(pfns, xen_host.MAP_BATCH):
        with xen.map_pages(7, batch) as mapping:
            assert mapping.array().shape == (len(batch), WORDS)


def _counted_in_blocks(pfns: np.ndarray, *written: int) -> set[int]:
    blocks = {p // 64 for p in written}
    return {int(p) for p in pfns if p // 64 in blocks and p != SHARED}


def test_the_paused_source_reads_only_the_blocks_written_since_the_round(
    monkeypatch,
) -> None:
    ram, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.enable_log_dirty(7)
    _precopy(xen, pfns)
    # As the sender does before it pauses the guest: the blocks the
    # round's batches split are read while it runs.
    xen.settle_digest(7)
    # The last round's pages: harvested (and sent) after the pause.
    for pfn in (300, 2000):
        ram[pfn, 0] += np.uint64(1)
        fake.dirty.append(pfn)
    # With the vcpu_info page Xen writes unlogged, counted every time.
    assert list(xen.harvest_dirty(7)) == [300, VCPU_INFO, 2000]
    fake.mapped.clear()
    paused = xen.memory_digest(7)
    assert set(fake.mapped) == _counted_in_blocks(pfns, 300, 2000, VCPU_INFO)
    assert paused == _definition(ram, pfns)
    # A page written after the last harvest, still in the log: read
    # (and the destination, which did not get it, differs).
    sent = ram.copy()
    ram[900, 1] += np.uint64(1)
    fake.dirty.append(900)
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == _counted_in_blocks(pfns, 900, VCPU_INFO)
    assert _definition(sent, pfns) != _definition(ram, pfns)
    assert not fake.held


def test_settle_digest_reads_what_the_round_left_while_the_guest_runs(
    monkeypatch,
) -> None:
    ram, pfns = _guest(xen_host.MAP_BATCH)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.enable_log_dirty(7)
    # A round that mapped half a block only: that block is left.
    _precopy(xen, pfns[pfns < 600])
    with xen.map_pages(7, pfns[(pfns >= 600) & (pfns < 610)]):
        pass
    fake.mapped.clear()
    xen.settle_digest(7)
    left = {int(p) for p in pfns if p >= 576 and p != SHARED}
    assert set(fake.mapped) == left
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert fake.mapped == []


def test_a_block_harvested_while_its_mapping_was_open_is_read_again(
    monkeypatch,
) -> None:
    ram, pfns = _guest(xen_host.MAP_BATCH)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.enable_log_dirty(7)
    batch = pfns[pfns < 512]
    with xen.map_pages(7, batch):
        # Written after the mapping copied the page, harvested before
        # it closes: what it read of the block is stale.
        ram[400, 0] += np.uint64(1)
        fake.dirty.append(400)
        xen.harvest_dirty(7)
    _precopy(xen, pfns[pfns >= 512])
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == _counted_in_blocks(pfns, 400)


def test_without_log_dirty_every_page_is_read(monkeypatch) -> None:
    ram, pfns = _guest(xen_host.MAP_BATCH)
    xen, fake = _driver(ram, pfns, monkeypatch)
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == {int(p) for p in pfns if p != SHARED}
    xen.enable_log_dirty(7)
    xen.disable_log_dirty(7)
    fake.mapped.clear()
    ram[3, 0] += np.uint64(1)
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert len(fake.mapped) == len(pfns) - 1


def test_a_vcpu_info_xen_writes_unlogged_is_sent_and_read_at_the_pause(
    monkeypatch,
) -> None:
    # Xen 4.17 writes a registered vcpu_info (time record, pending bits)
    # through its own global mapping (map_vcpu_info,
    # __update_vcpu_system_time, vcpu_mark_events_pending) and never
    # marks it in log-dirty: the last round must send it and the paused
    # digest read its block again.
    ram, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake = _driver(ram, pfns, monkeypatch)
    probes = []
    facts = xen.hypervisor_facts
    xen.hypervisor_facts = lambda: probes.append(1) or facts()
    xen.enable_log_dirty(7)
    _precopy(xen, pfns)
    xen.harvest_dirty(7)
    xen.settle_digest(7)
    ram[VCPU_INFO, 9] += np.uint64(1)  # nothing in the log
    assert VCPU_INFO in xen.harvest_dirty(7)
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == _counted_in_blocks(pfns, VCPU_INFO)
    # Written again after the last harvest (an event delivered to the
    # paused vCPU): read again, so the destination, without it, differs.
    ram[VCPU_INFO, 10] += np.uint64(1)
    assert xen.memory_digest(7) == _definition(ram, pfns)
    # The hypervisor is probed once, not at each harvest.
    assert len(probes) == 1


def test_a_xen_that_cannot_tell_the_vcpu_info_pages_is_digested_whole(
    monkeypatch,
) -> None:
    ram, pfns = _guest(xen_host.MAP_BATCH)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.hypervisor_facts = lambda: types.SimpleNamespace(
        ncm_evtchn=False, ncm_vcpu=False
    )
    asked = []
    xen._context = lambda: asked.append(1)
    xen.enable_log_dirty(7)
    _precopy(xen, pfns)
    # A write the log missed, anywhere: the paused digest reads it.
    ram[700, 3] += np.uint64(1)
    xen.harvest_dirty(7)
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == {int(p) for p in pfns if p != SHARED}
    assert asked == []


def test_a_fifo_guest_is_digested_whole_at_the_pause(monkeypatch) -> None:
    # FIFO event channels: Xen writes the control blocks, in guest pages
    # the driver cannot name, without log-dirty (event_fifo.c
    # map_guest_page): the paused source reads every page.
    ram, pfns = _guest(xen_host.MAP_BATCH)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.enable_log_dirty(7)
    _precopy(xen, pfns)
    fake.abi = "fifo"  # the guest switched while it ran
    ram[700, 3] += np.uint64(1)  # a control block, not logged
    xen.harvest_dirty(7)
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert set(fake.mapped) == {int(p) for p in pfns if p != SHARED}


# The destination: a domain libxl built (firmware loaded, its physmap as
# the source's but for pages the source's firmware populated at run
# time), the stream written into it by the restorer.
FIRMWARE = np.r_[300:310, 1100:1110]  # the source has data, then zero
LATE = np.r_[2000:2004]  # populated by the stream


def _destination(monkeypatch, pfns: np.ndarray, pages: int):
    """The Xen host of a destination, its domain 7 built by
    create_empty_domain as a migration's SETUP has it built; and the
    restorer that applies the stream to it."""
    ram = np.zeros((pages, WORDS), dtype=np.uint64)
    ram[FIRMWARE, 3] = 0xF1F1
    populated = np.zeros(pages, dtype=bool)
    populated[np.setdiff1d(pfns, LATE).astype(np.int64)] = True
    xen, fake = _driver(ram, pfns, monkeypatch)
    fake.populated = populated
    fake.shared_info_frame = 2**64 - 1
    del xen.populated_pfns
    xen._pfn_cache.clear()
    xen._raw_info = lambda domid, call: types.SimpleNamespace(
        tot_pages=int(fake.populated.sum()),
        shared_info_frame=fake.shared_info_frame,
    )
    del xen._reserved_pfns

    def absent(*args):
        raise base.DomainNotFound("no", call="domain_info")

    xen.domain_info = xen.find_domain = absent
    xen.free_memory = lambda: 1 << 40
    xen.libxl_json = lambda config, domid: "{}"
    xen._wait_out_destroy_second = lambda domid: None
    xen._libxl_create = lambda text, call: 7
    config = base.DomainConfig(name="g", memory_bytes=pages * base.PAGE_SIZE)
    assert xen.create_empty_domain(config, 7) == 7
    xen.domain_info = lambda domid: types.SimpleNamespace(
        memory_bytes=config.memory_bytes, vcpus=1
    )
    xen.list_domains = lambda: []
    fake.params = {}
    xen._param = lambda domid, index: fake.params.get(index, 0)
    return xen, fake, restorer.Restorer(xen, 7, pv_drivers=False)


def _send(dest: restorer.Restorer, src: np.ndarray, pfns: np.ndarray) -> None:
    """A round's pages as the receiver applies them: page data, zero
    pages as XALLOC, a batch at a time."""
    for batch in base.iter_batches(pfns, 512):
        pages = src[batch.astype(np.int64)]
        data = base.nonzero_pages(pages)
        kinds = np.where(data, libxc.NOTAB, libxc.XALLOC).astype(np.uint32)
        mapping = dest.page_targets(
            batch, kinds, int(data.sum()) * base.PAGE_SIZE
        )
        if mapping is None:
            continue
        with mapping:
            for (_, view), page in zip(
                mapping.runs(), [pages[data].tobytes()], strict=True
            ):
                view[:] = page


def _received(monkeypatch):
    """A destination that received the whole guest's first round."""
    src, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake, dest = _destination(monkeypatch, pfns, len(src))
    _send(dest, src, pfns)
    return src, pfns, xen, fake, dest


def test_the_destination_reads_at_ready_only_the_blocks_written_since_a_settle(
    monkeypatch,
) -> None:
    src, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake, dest = _destination(monkeypatch, pfns, len(src))
    counted = {int(p) for p in pfns if p != SHARED}
    assert len(counted) == 2252
    # Round 0 while the source runs, then the settle its end starts.
    _send(dest, src, pfns)
    xen.settle_digest(7)
    # Nothing of the round is left for the pause.
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(src, pfns)
    assert fake.mapped == []
    # The last round after the pause: three pages, one of them turned
    # zero (XALLOC, cleared).
    last = np.array([70, 1500, 2001], dtype=np.uint64)
    src[70, 0] += np.uint64(1)
    src[1500] = 0
    src[2001, 7] += np.uint64(1)
    _send(dest, src, last)
    fake.mapped.clear()
    ready = xen.memory_digest(7)
    assert set(fake.mapped) == _counted_in_blocks(pfns, *last.tolist())
    # Three blocks, one with a hole (pfn 77): 191 pages, of 2252.
    assert len(fake.mapped) == 191
    assert ready == _definition(src, pfns)
    # The destination's RAM read whole agrees.
    assert (
        xen_host.memdigest.full_digest(
            np.array(sorted(counted), np.uint64),
            functools.partial(xen._read_pages, 7),
        )
        == ready
    )
    assert not fake.held


def test_a_destination_page_written_unmapped_makes_the_digests_differ(
    monkeypatch,
) -> None:
    # Xen writes the shared_info frame, once in the physmap, through its
    # own mapping: read at READY whatever the restorer wrote, so that a
    # page the stream did not make what the source had fails the
    # migration.
    src, pfns, xen, fake, dest = _received(monkeypatch)
    xen.settle_digest(7)
    fake.shared_info_frame = 900
    fake.ram[900, 2] += np.uint64(1)
    fake.mapped.clear()
    ready = xen.memory_digest(7)
    assert set(fake.mapped) == _counted_in_blocks(pfns, 900)
    assert ready == _definition(fake.ram, pfns)
    assert ready != _definition(src, pfns)


def test_a_settle_in_parts_leaves_the_rest_pending_and_a_write_rereads(
    monkeypatch,
) -> None:
    src, pfns, xen, fake, dest = _received(monkeypatch)
    fake.mapped.clear()
    assert xen.settle_digest_part(7, 256)
    assert len(fake.mapped) <= 256
    # A settle under way as a block is written: the write's close comes
    # after the read, and the block is read again.
    first = sorted(fake.mapped)[0]
    src[first, 1] += np.uint64(1)
    _send(dest, src, np.array([first], np.uint64))
    while xen.settle_digest_part(7, 256):
        pass
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(src, pfns)
    assert fake.mapped == []


def test_once_the_domain_runs_its_destination_digest_is_read_whole(
    monkeypatch,
) -> None:
    src, pfns, xen, fake, dest = _received(monkeypatch)
    xen.settle_digest(7)
    xen._dm_left_stopped = lambda domid: False
    xen.unpause(7)
    fake.ram[3, 0] += np.uint64(1)  # the guest ran
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(fake.ram, pfns)
    assert set(fake.mapped) == {int(p) for p in pfns if p != SHARED}


def test_a_viridian_destination_is_digested_whole(monkeypatch) -> None:
    # Xen maps a Viridian guest's VP assist, SynIC and reference TSC
    # pages as it loads their context and writes them through its own
    # mappings: the destination reads every page at READY.
    src, pfns, xen, fake, dest = _received(monkeypatch)
    xen.settle_digest(7)
    fake.params[xen_host.HVM_PARAM_VIRIDIAN] = 1
    fake.ram[900, 2] += np.uint64(1)  # a VP assist page
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(fake.ram, pfns)
    assert set(fake.mapped) == {int(p) for p in pfns if p != SHARED}


def test_a_restored_domain_sent_on_is_digested_as_a_source(
    monkeypatch,
) -> None:
    # A paused guest restored here has neither its PV state imported nor
    # an unpause by this driver: sent on from here under log-dirty, its
    # digest is the source's, the vcpu_info page Xen writes unlogged
    # after the last harvest read at the pause.
    src, pfns, xen, fake, dest = _received(monkeypatch)
    xen.enable_log_dirty(7)
    _precopy(xen, pfns)
    xen.harvest_dirty(7)
    xen.settle_digest(7)
    fake.ram[VCPU_INFO, 9] += np.uint64(1)  # nothing in the log
    fake.mapped.clear()
    assert xen.memory_digest(7) == _definition(fake.ram, pfns)
    assert VCPU_INFO in fake.mapped


def test_the_destination_s_zero_blocks_are_counted_unread(monkeypatch) -> None:
    # Blocks zero at SETUP's read that the stream sends as XALLOC only
    # are never mapped again: their terms, one with a hole, are those of
    # the definition.
    src, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    zero = np.r_[1216:1344]  # blocks 19 and 20
    src[zero] = 0
    pfns = np.setdiff1d(pfns, np.array([1300], np.uint64))
    xen, fake, dest = _destination(monkeypatch, pfns, len(src))
    fake.mapped.clear()
    _send(dest, src, pfns)
    xen.settle_digest(7)
    assert xen.memory_digest(7) == _definition(src, pfns)
    assert not set(fake.mapped) & set(zero.tolist())
    assert xen.memory_digest(7) == xen_host.memdigest.full_digest(
        np.array([p for p in pfns if p != SHARED], np.uint64),
        functools.partial(xen._read_pages, 7),
    )


def test_the_device_model_s_restart_has_its_build_pages_read_again(
    monkeypatch, tmp_path
) -> None:
    # QEMU started on the saved device state writes its option ROMs into
    # the guest's pfns as it realizes its devices, as the one libxl
    # started at SETUP did (the build's non-zero pages): read at READY,
    # so that a ROM unlike the source's fails the migration as reading
    # every page would.
    src, pfns, xen, fake, dest = _received(monkeypatch)
    xen.settle_digest(7)
    assert xen.memory_digest(7) == _definition(src, pfns)

    def start_incoming(argv, state, **kwargs):
        fake.ram[FIRMWARE, 5] = 0x2B2B  # this host's ROM
        return 4321

    monkeypatch.setattr(xen_host.dm, "command_line", lambda pid: ["qemu"])
    monkeypatch.setattr(xen_host.dm, "stop", lambda *args: None)
    monkeypatch.setattr(xen_host.dm, "start_incoming", start_incoming)
    xen.opts = types.SimpleNamespace(
        state_dir=str(tmp_path), command_timeout=1.0
    )
    xen._qmp_path = lambda domid: str(tmp_path / "qmp")
    xen._xs_read = lambda node: "999999999" if node.endswith("-pid") else None
    xen._xs_write = lambda node, value: None
    xen.set_emulator_context(7, xen_host.EMULATOR_QEMU_UPSTREAM, b"state")
    fake.mapped.clear()
    ready = xen.memory_digest(7)
    assert ready == _definition(fake.ram, pfns)
    assert ready != _definition(src, pfns)
    assert set(fake.mapped) == _counted_in_blocks(pfns, *FIRMWARE.tolist())
