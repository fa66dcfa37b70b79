"""The real Xen host's memory digest, kept by block while log-dirty is on:
equal to the digest read whole, and at the pause reading only the blocks
of the pages written since their terms were taken."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import digest
from nova_xen_ncm.host.xen import host as xen_host

WORDS = base.PAGE_SIZE // 8


class Memory:
    """Guest RAM as an array of pages, counting the pages read."""

    def __init__(self, pages: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.ram = rng.integers(1, 2**63, size=(pages, WORDS), dtype=np.uint64)
        # Some zero pages, one page non-zero only in its last word.
        self.ram[5:40] = 0
        self.ram[300:330] = 0
        self.ram[100] = 0
        self.ram[100, -1] = 7
        self.read: list[int] = []

    @contextlib.contextmanager
    def reader(self, pfns: np.ndarray) -> Iterator[np.ndarray]:
        self.read.extend(pfns.tolist())
        yield self.ram[pfns.astype(np.int64)]


def populated(pages: int) -> np.ndarray:
    # Holes: a whole block, part of a block, a single pfn.
    pfns = np.arange(pages, dtype=np.uint64)
    holes = np.r_[128:192, 200:230, 77]
    return np.setdiff1d(pfns, holes.astype(np.uint64))


def full(mem: Memory, pfns: np.ndarray) -> str:
    return digest.full_digest(pfns, mem.reader)


def test_the_digest_sees_content_placement_and_population() -> None:
    mem = Memory(512)
    pfns = populated(512)
    first = full(mem, pfns)
    assert first == full(mem, pfns)
    mem.ram[400, 3] ^= 1
    assert full(mem, pfns) != first
    mem.ram[400, 3] ^= 1
    # A zero page populated differs from an unpopulated pfn.
    assert full(mem, np.setdiff1d(pfns, [np.uint64(10)])) != first
    # The same content one pfn further is another memory.
    moved = Memory(512)
    moved.ram[401], moved.ram[400] = mem.ram[400], mem.ram[401]
    assert full(moved, pfns) != full(mem, pfns)


def test_kept_terms_read_only_the_blocks_marked_equal_a_full_read() -> None:
    mem = Memory(1024)
    pfns = populated(1024)
    terms = digest.BlockTerms(pfns)
    terms.refresh(mem.reader)
    assert terms.hexdigest() == full(mem, pfns)
    mem.read.clear()
    # Written (and harvested): two pages of one block, one of another,
    # a page that was zero; a pfn not digested (a hole) changes nothing.
    for pfn in (520, 530, 900, 310):
        mem.ram[pfn, 0] += np.uint64(1)
    terms.mark(np.array([520, 530, 900, 310, 150], dtype=np.uint64))
    assert terms.refresh(mem.reader) == 3
    assert sorted({p // digest.BLOCK for p in mem.read}) == [4, 8, 14]
    assert len(mem.read) <= 3 * digest.BLOCK
    assert terms.hexdigest() == full(mem, pfns)


def test_a_write_never_marked_is_not_read_again() -> None:
    """What the kept terms trust: Xen's log-dirty (a write it does not
    report is seen only by a digest read whole)."""
    mem = Memory(256)
    pfns = populated(256)
    terms = digest.BlockTerms(pfns)
    terms.refresh(mem.reader)
    mem.ram[250, 0] += np.uint64(1)
    assert terms.refresh(mem.reader) == 0
    assert terms.hexdigest() != full(mem, pfns)


def test_blocks_read_whole_for_the_stream_are_not_read_again() -> None:
    mem = Memory(1024)
    pfns = populated(1024)
    terms = digest.BlockTerms(pfns)
    # A stream batch of the first 300 populated pfns: the blocks it
    # covers whole get their terms from it; the last one is partial.
    batch = pfns[:300]
    terms.note_read(batch, mem.ram[batch.astype(np.int64)], terms.mark_count())
    mem.read.clear()
    terms.refresh(mem.reader)
    read_blocks = {p // digest.BLOCK for p in mem.read}
    covered = {int(p) // digest.BLOCK for p in batch}
    partial = int(batch[-1]) // digest.BLOCK
    assert read_blocks & covered == {partial}
    assert terms.hexdigest() == full(mem, pfns)


def test_a_block_marked_while_it_was_mapped_stays_stale() -> None:
    mem = Memory(256)
    pfns = populated(256)
    terms = digest.BlockTerms(pfns)
    terms.refresh(mem.reader)
    batch = pfns[pfns < 64]
    before = terms.mark_count()
    stale = mem.ram[batch.astype(np.int64)].copy()
    # The guest writes a page of the block after the stream mapped it;
    # the harvest reports it before the mapping closes.
    mem.ram[3, 0] += np.uint64(1)
    terms.mark(np.array([3], dtype=np.uint64))
    terms.note_read(batch, stale, before)
    mem.read.clear()
    assert terms.refresh(mem.reader) == 1
    assert terms.hexdigest() == full(mem, pfns)


class _FakeForeignMemory:
    """xenforeignmemory_map/unmap over ``mem``: a copy of the pages
    asked for, at an address of this process."""

    def __init__(self, mem: Memory) -> None:
        self.mem = mem
        self.held: dict[int, ctypes.Array] = {}

    def xenforeignmemory_map(self, fmem, domid, prot, n, arr, err):
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        self.mem.read.extend(pfns.tolist())
        buf = ctypes.create_string_buffer(
            self.mem.ram[pfns].tobytes(), n * base.PAGE_SIZE
        )
        addr = ctypes.addressof(buf)
        self.held[addr] = buf
        return addr

    def xenforeignmemory_unmap(self, fmem, addr, n):
        del self.held[addr]
        return 0


def _host(
    mem: Memory, pfns: np.ndarray, dirty: list, monkeypatch
) -> xen_host.XenHost:
    """A driver over ``mem`` (foreign mappings copy its pages), whose
    log-dirty bitmap reports ``dirty``."""
    monkeypatch.setattr(xen_host, "FN", _FakeForeignMemory(mem))
    xen = object.__new__(xen_host.XenHost)
    xen._fmem = object()
    xen._digests = {}
    xen.populated_pfns = lambda domid: pfns.copy()
    xen._shared_with_dom0 = lambda domid: np.array([40], dtype=np.uint64)
    xen._reserved_pfns = lambda domid: np.zeros(0, dtype=np.uint64)

    def bitmap(domid: int, op: int) -> np.ndarray:
        out = np.array(sorted(dirty), dtype=np.uint64)
        if op == xen_host.SHADOW_OP_CLEAN:
            dirty.clear()
        return out

    xen._dirty_bitmap = bitmap
    return xen


def test_at_the_pause_the_xen_host_reads_only_the_blocks_written(
    monkeypatch,
) -> None:
    mem = Memory(2048)
    pfns = populated(2048)
    dirty: list[int] = []
    xen = _host(mem, pfns, dirty, monkeypatch)
    xen._digests[7] = digest.BlockTerms(xen._digested_pfns(7))
    xen.settle_digest(7)  # the guest still runs
    # Written after the settle: one harvested, one only in the bitmap.
    for pfn in (1500, 1800):
        mem.ram[pfn, 9] += np.uint64(1)
    dirty.extend([1500])
    xen.harvest_dirty = xen_host.XenHost.harvest_dirty.__get__(xen)
    assert list(xen.harvest_dirty(7)) == [1500]
    dirty.extend([1800])
    mem.read.clear()
    paused = xen.memory_digest(7)
    assert sorted({p // digest.BLOCK for p in mem.read}) == [23, 28]
    # As a host keeping nothing digests the same memory, reading it all.
    fresh = _host(mem, pfns, [], monkeypatch)
    mem.read.clear()
    assert fresh.memory_digest(7) == paused
    assert len(mem.read) == len(pfns) - 1


@pytest.mark.parametrize("changed", [True, False])
def test_kept_terms_are_dropped_when_the_p2m_changes(
    changed: bool, monkeypatch
) -> None:
    mem = Memory(512)
    pfns = populated(512)
    xen = _host(mem, pfns, [], monkeypatch)
    xen._digests[7] = digest.BlockTerms(xen._digested_pfns(7))
    xen.memory_digest(7)
    if changed:
        more = np.union1d(pfns, [np.uint64(77)])
        xen.populated_pfns = lambda domid: more.copy()
    mem.read.clear()
    again = xen.memory_digest(7)
    assert bool(mem.read) == changed
    more = xen.populated_pfns(7)
    assert again == _host(mem, more, [], monkeypatch).memory_digest(7)


def test_the_xen_host_digest_with_its_own_mappings(monkeypatch) -> None:
    """The stream's mappings note their reads; the digest's own do not
    (it holds the terms meanwhile)."""
    mem = Memory(1024)
    pfns = populated(1024)
    xen = _host(mem, pfns, [], monkeypatch)
    fake = xen_host.FN
    xen._digests[7] = digest.BlockTerms(xen._digested_pfns(7))
    with xen.map_pages(7, pfns[:512]) as mapping:
        assert len(mapping.runs()) == 1
    result: list[str] = []
    worker = threading.Thread(
        target=lambda: result.append(xen.memory_digest(7)), daemon=True
    )
    mem.read.clear()
    worker.start()
    worker.join(60)
    assert result, "the digest did not finish"
    assert not fake.held
    # The blocks the stream read whole are not read again.
    assert min(mem.read) >= (int(pfns[511]) // digest.BLOCK) * digest.BLOCK
    assert result[0] == full(mem, pfns[pfns != 40])
