"""Memory the per-page paths of the data path allocate for a guest's
every page at once: the result and bounded scratch, no copy of the pfns
(a copy is 8 octets a page: 16 MiB for an 8 GiB guest).

The bounds are on the peak traced by tracemalloc (numpy reports its
arrays to it), not on time.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim import digest
from nova_xen_ncm.host.sim import memory
from nova_xen_ncm.host.sim.memory import GuestMemory

# 1 GiB of 4 KiB pages.
PAGES = 1 << 18
# Interpreter objects of a call (frames, small arrays' headers).
SLACK = 64 << 10


def peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the most memory it held at once beyond what was
    allocated before it (its result included)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()


def test_marked_holds_its_result_and_no_copy_of_it() -> None:
    mask = np.ones(PAGES, dtype=np.uint8)
    out, used = peak(lambda: base.marked(mask))
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, np.arange(PAGES))
    # The result, the non-zero words (at most one per 8 pfns) and slack.
    assert used <= out.nbytes + PAGES + SLACK


def test_a_union_of_one_array_does_not_copy_it() -> None:
    # The block index of every page of a guest: many repeats.
    blocks = np.repeat(np.arange(PAGES // 64, dtype=np.uint64), 64)
    base.pfn_union(blocks[:1000])  # this thread's scratch bitmaps
    out, used = peak(lambda: base.pfn_union(blocks))
    np.testing.assert_array_equal(out, np.arange(PAGES // 64))
    # The result and a bool per entry (whether they are sorted).
    assert used <= out.nbytes + PAGES + SLACK


def test_a_difference_on_every_page_copies_no_operand() -> None:
    operation = base.pfn_difference
    a = np.arange(PAGES, dtype=np.uint64)
    b = np.arange(0, PAGES, 2, dtype=np.uint64)
    operation(a[:1000], b[:1000])  # this thread's scratch bitmaps
    out, used = peak(lambda: operation(a, b))
    assert len(out) == PAGES // 2
    # a's selection and the sorted result (each half of a), a bool per
    # pfn of a and the result's words: no operand copied into intp.
    assert used <= a.nbytes + 3 * PAGES + SLACK


def test_expand_runs_builds_only_its_result() -> None:
    first = np.arange(0, 4 * PAGES, 4096, dtype=np.int64)
    end = first + 1024
    out, used = peak(lambda: memory.expand_runs(first, end))
    assert len(out) == PAGES
    np.testing.assert_array_equal(out[:3], [0, 1, 2])
    np.testing.assert_array_equal(out[1023:1026], [1023, 4096, 4097])
    assert out[-1] == 4 * PAGES - 4096 + 1023
    assert used <= out.nbytes + 4 * first.nbytes + SLACK


def test_expand_runs_skips_empty_runs() -> None:
    out = memory.expand_runs(
        np.array([0, 5, 5, 9], dtype=np.int64),
        np.array([2, 5, 8, 10], dtype=np.int64),
    )
    assert out.dtype == np.uint64
    assert out.tolist() == [0, 1, 5, 6, 7, 9]
    assert len(memory.expand_runs(*[np.zeros(0, dtype=np.int64)] * 2)) == 0


@pytest.fixture
def mem():
    mem = GuestMemory.create(PAGES, "test-footprint")
    yield mem
    mem.close()


def test_marking_every_page_copies_no_pfns(mem) -> None:
    pfns = np.arange(PAGES, dtype=np.uint64)
    with mem.lock():
        _, used = peak(lambda: mem.mark_dirty(pfns))
    # The map of pages written since creation: an octet a pfn.
    assert used <= PAGES + SLACK
    assert mem.written_mask(pfns).all()


def test_taking_every_changed_page_holds_the_pfns_once(mem) -> None:
    pfns = np.arange(PAGES, dtype=np.uint64)
    with mem.lock():
        mem.mark_dirty(pfns)
    out, used = peak(mem.take_changed)
    np.testing.assert_array_equal(out, pfns)
    assert used <= out.nbytes + PAGES + SLACK
    assert not mem.changed.any()


def test_written_mask_of_every_page_is_an_octet_a_page(mem) -> None:
    pfns = np.arange(PAGES, dtype=np.uint64)
    with mem.lock():
        mem.mark_dirty(pfns[::2])
    mem.set_log_dirty(True)  # no scan for the mask
    out, used = peak(lambda: mem.written_mask(pfns))
    assert out.dtype == bool
    assert out[::2].all() and not out[1::2].any()
    assert used <= PAGES + SLACK


class _Runs:
    """A write tracker whose scan finds ``runs`` once."""

    def __init__(self, first: list[int], end: list[int]) -> None:
        self.runs = (
            np.array(first, dtype=np.int64),
            np.array(end, dtype=np.int64),
        )

    def scan_runs(self, spans=None) -> tuple[np.ndarray, np.ndarray]:
        runs, self.runs = self.runs, (np.zeros(0, np.int64),) * 2
        return runs

    def close(self) -> None:
        pass


@pytest.mark.parametrize("scattered", [False, True])
def test_a_scan_of_every_page_is_marked_without_a_pfn_list(
    mem, scattered
) -> None:
    if scattered:
        # More runs than are marked a slice each: a pfn list, of the
        # size of the pages written.
        first = list(range(0, PAGES, 4))
        end = [f + 1 for f in first]
    else:
        first, end = [0, PAGES // 2 + 1], [PAGES // 2, PAGES]
    mem._tracker = _Runs(first, end)
    mem._tracked_pid = os.getpid()
    mem.set_log_dirty(True)  # its flush takes what was written before
    mem._tracker = _Runs(first, end)
    with mem.lock():
        _, used = peak(mem._flush_written)
    written = np.zeros(PAGES, dtype=bool)
    for lo, hi in zip(first, end, strict=True):
        written[lo:hi] = True
    np.testing.assert_array_equal(mem.dirty.astype(bool), written)
    np.testing.assert_array_equal(mem.changed.astype(bool), written)
    count = int(written.sum())
    if scattered:
        # The pfns and the expansion's work, a few words a run: of the
        # size of what was written, not of the guest.
        assert used <= 8 * count + 32 * len(first) + SLACK
    else:
        # The map of pages written since creation (an octet a pfn).
        assert used <= PAGES + SLACK


def test_a_scan_of_scattered_pages_is_marked_in_bounded_chunks(mem) -> None:
    # Every other page: more runs than are marked a slice each, and as
    # one pfn list (with the expansion's arrays) 40 octets a page written.
    first = np.arange(0, PAGES, 2, dtype=np.int64)
    end = first + 1
    mem._tracker = _Runs([], [])
    mem._tracked_pid = os.getpid()
    mem._tracker = _Runs(first.tolist(), end.tolist())
    with mem.lock():
        _, used = peak(mem._flush_written)
    np.testing.assert_array_equal(
        np.flatnonzero(mem.changed), np.arange(0, PAGES, 2)
    )
    # The map of pages written since creation, and a group of runs and
    # a chunk of pfns at a time: nothing in the pages written.
    bound = PAGES + 40 * memory._MARK_GROUP + 16 * memory._MARK_CHUNK
    assert used <= bound + SLACK


def test_the_ram_runs_take_no_list_of_the_pfns(mem) -> None:
    # Two runs of RAM around a hole: the write tracker's spans and a
    # failed tracker's marks come from them.
    with mem.lock():
        mem.populate(np.arange(0, PAGES // 2, dtype=np.uint64))
        mem.populate(np.arange(PAGES // 2 + 4096, PAGES, dtype=np.uint64))
    runs, used = peak(mem.ram_runs)
    assert [runs.first.tolist(), runs.end.tolist()] == [
        [0, PAGES // 2 + 4096],
        [PAGES // 2, PAGES],
    ]
    # Two octets a pfn of one chunk of the p2m at a time: nothing of
    # the guest's size (8 octets a page would be 2 MiB here).
    assert used <= 2 * memory._RUNS_CHUNK + SLACK
    spans, used = peak(mem.ram_spans)
    assert spans == [(0, PAGES // 2), (PAGES // 2 + 4096, PAGES)]
    assert used <= SLACK


def test_a_failed_trackers_flush_marks_the_ram_without_a_pfn_list(
    mem,
) -> None:
    mem.set_log_dirty(True)
    with mem.lock():
        mem.populate(np.arange(PAGES, dtype=np.uint64))
    mem._tracked_pid = os.getpid()
    mem.header[memory._HDR_TRACKER] = memory.TRACKER_FAILED
    with mem.lock():
        _, used = peak(mem._flush_written)
    assert mem.dirty.all() and mem.changed.all()
    # The map of pages written since creation and a chunk of the p2m:
    # no list of every pfn (8 octets a page).
    assert used <= PAGES + 2 * memory._RUNS_CHUNK + SLACK


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_equal_runs_are_the_runs_of_the_matching_octets(chunk) -> None:
    rng = np.random.default_rng(chunk)
    for density in (0.0, 0.1, 0.5, 0.9, 1.0):
        values = (rng.random(500) < density).astype(np.uint8)
        first, end = memory.equal_runs(values, 1, chunk=chunk)
        assert first.dtype == end.dtype == np.int64
        np.testing.assert_array_equal(
            memory.expand_runs(first, end), np.flatnonzero(values)
        )
        for gap in (0, 2, 50):
            assert memory.bridge_runs(first, end, gap) == memory.pfn_spans(
                np.flatnonzero(values), gap
            )


@pytest.fixture
def sim_host():
    from oslo_config import cfg

    from nova_xen_ncm.conf import sim as sim_conf
    from nova_xen_ncm.host.sim.host import SimHost

    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 4096, group="xen_ncm_sim")
    host = SimHost("footprint", conf, prelaunch=False)
    yield host
    host.close()
    host.raise_dom0_errors()


def test_the_digests_first_look_takes_no_list_of_the_pages(sim_host) -> None:
    pages = PAGES // 4  # 256 MiB written: the test's RAM stays small
    sim_host.create_empty_domain(
        base.DomainConfig(name="d1", memory_bytes=pages << 12, vcpus=1), 1
    )
    dom = sim_host.hv.domains[1]
    pfns = np.arange(pages, dtype=np.uint64)
    sim_host.populate(1, pfns)
    dom.booted = True  # a domain that ran: no restore's warming
    with dom.mem.lock():
        dom.mem.ram[:pages] = 7
        dom.mem.mark_dirty(pfns)
    del pfns
    cache = sim_host.digest.cache(dom)
    with cache.lock:
        _, used = peak(lambda: sim_host.digest.refresh(dom, limit=0))
    blocks = pages // 64
    assert len(cache.pending) == blocks
    assert not dom.mem.changed.any()
    # The kernel's mask the first look keeps (an octet a pfn of the
    # physmap), a chunk of the p2m's and a few words a block (the blocks
    # with RAM, those with data, their difference): no pfn list (8 octets
    # a page) nor mask of the physmap beyond it, nor a Python integer a
    # block pending (about 90 octets each in a set).
    assert used <= dom.mem.max_pfn + digest._RAM_CHUNK + 32 * blocks + SLACK


def test_a_digest_of_a_large_guest_holds_16_octets_a_block(
    sim_host, monkeypatch
) -> None:
    # 2 GiB populated, never written: every block gets a term, and the
    # whole guest is one stretch of consecutive blocks, 4 pieces long.
    monkeypatch.setattr(digest, "_SPAN_BLOCKS", 2048)
    pages = 2 << 18
    sim_host.create_empty_domain(
        base.DomainConfig(name="d1", memory_bytes=pages << 12, vcpus=1), 1
    )
    dom = sim_host.hv.domains[1]
    sim_host.populate(1, np.arange(pages, dtype=np.uint64))
    dom.booted = True
    expected = sim_host.memory_digest(1)
    blocks = -(-dom.mem.max_pfn // 64)
    cache = sim_host.digest.cache(dom)
    with cache.lock:
        # Looked at again from the start, all of its terms made anew.
        cache.started = False
        cache.terms.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        assert sim_host.memory_digest(1) == expected
        held, top = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The terms, 16 octets a block of the physmap (as Python integers in
    # a dict about 80 a block), and a bool a block for the holes.
    assert held - before <= 17 * blocks + SLACK
    # Beyond them, the kernel's mask of the first look (an octet a pfn
    # of the physmap) and a bounded stretch's arrays: not a few octets
    # a pfn of the guest's one stretch.
    span = 64 * digest._SPAN_BLOCKS
    assert top - before <= 17 * blocks + dom.mem.max_pfn + 9 * span + SLACK


def test_the_digests_terms_are_kept_by_block_or_refused() -> None:
    terms = digest._Terms(3)
    assert terms.swap(2, 5) == 0
    assert terms.swap(2, (1 << 128) - 1) == 5
    packed = (7).to_bytes(16, "little") + (9).to_bytes(16, "little")
    assert terms.replace(0, packed) == 0
    assert terms.replace(1, packed) == 9 + (1 << 128) - 1
    # Past the physmap's blocks: refused, not kept at the wrong block.
    with pytest.raises(IndexError, match=r"\[3, 4\) outside"):
        terms.swap(3, 1)
    with pytest.raises(IndexError, match=r"\[2, 4\) outside"):
        terms.replace(2, packed)
    assert terms.swap(2, 0) == 9


def test_pausing_a_large_sparse_guest_takes_no_list_of_its_pfns(
    sim_host,
) -> None:
    # 2 GiB of RAM, never written: a pause flushes the guest process's
    # last writes over the RAM's spans, which must not cost a list of
    # the pfns (16 MiB at 2 GiB with its sorting and spans' arrays).
    pages = 2 << 18
    domid = sim_host.create_domain(
        base.DomainConfig(
            name="d1",
            memory_bytes=pages << 12,
            vcpus=1,
            workload={"fill": "zero", "dirty_rate": 0},
        )
    )
    dom = sim_host.hv.domains[domid]
    assert dom.mem.nr_ram >= pages - 4096
    _, used = peak(lambda: sim_host.pause(domid))
    # A chunk of the p2m and the pause's own objects.
    assert used <= 2 * memory._RUNS_CHUNK + 4 * SLACK


def test_the_pending_blocks_are_an_octet_a_block_and_act_as_a_set() -> None:
    blocks = 1 << 15  # an 8 GiB physmap's
    pending, used = peak(lambda: digest._PendingBlocks(blocks))
    assert used <= blocks + SLACK
    model: set[int] = set()
    rng = np.random.default_rng(5)
    for _ in range(50):
        add = rng.integers(0, blocks, int(rng.integers(0, 300)))
        gone = rng.integers(0, blocks, int(rng.integers(0, 300)))
        pending.add(add.astype(np.uint64))
        model.update(add.tolist())
        pending.discard(gone)
        model.difference_update(gone.tolist())
        assert len(pending) == len(model)
        assert pending.sorted().tolist() == sorted(model)
        busy = np.unique(rng.integers(0, blocks, 5))
        assert pending.any_but(busy) == bool(model - set(busy.tolist()))
    # Every block pending (a guest that wrote all of its RAM): nothing
    # held beyond the octet a block.
    _, used = peak(lambda: pending.add(np.arange(blocks)))
    assert len(pending) == blocks
    assert used <= 8 * blocks + SLACK  # the index array given, converted
    pending.clear()
    assert not pending and not pending.any_but(np.zeros(0, dtype=np.int64))


def test_a_union_of_a_few_pfns_of_a_large_space_takes_no_bitmap() -> None:
    # A round's harvest of a large guest: 4096 pfns of an 8 GiB space.
    import threading

    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 1 << 21, 2048, dtype=np.uint64) for _ in "ab"]
    seen = {}

    def run() -> None:
        out, used = peak(lambda: base.pfn_union(*parts))
        seen.update(
            out=out, used=used, masks=getattr(base._scratch, "masks", None)
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    np.testing.assert_array_equal(seen["out"], np.union1d(*parts))
    # The thread keeps no bitmap of the space (2 MiB each), and what the
    # union held is a few copies of the pfns given.
    assert seen["masks"] is None
    assert seen["used"] <= 4 * 8 * 4096 + SLACK
