"""The memory digest of a domain, kept warm while it migrates.

Block by block (_DIGEST_BLOCK pfns), base.memory_hasher over the block's
populated pfns and (pfn, content) of its populated non-zero pages; the
digest is the hash of the sum of those blocks' hashes (modulo 2**128), so
that a changed block moves the sum by its own term only and the digest
of a paused guest costs its last writes, not its size. Every writer
marks what it writes (memory.GuestMemory.mark_dirty) and every change of
the p2m marks its block (GuestMemory.take_p2m_blocks), so a block that
neither touched since the previous digest is not read again; a thread
keeps the cache warm while the domain migrates. A page is taken as zero
without being read where the host's map of the pages written since the
domain was created (GuestMemory.written_since_creation) says it was
never written, at the source as at the destination: its memory was zero
when the domain was created (a new memfd; spare RAM is a new memfd
faulted in, never a destroyed domain's), and every write since is in
that map, the guest process's by the kernel (userfaultfd write
protection armed before any vCPU runs, read by PAGEMAP_SCAN: a write
cannot land unseen), the host's by its writers' marks (as Xen's
paging_mark_dirty). A guest process that could not arm it makes the
host take every populated page as written. This is the premise every
page read before is under already: a block is read again only if a
write was marked in it since (the changed map, fed by the same
tracking). Where a page is written but a hole of the memfd, it is zero
too and not read (reading it would allocate it). (The transparency
checker does not use this: it reads all of RAM itself,
checker.read_memory.)

What it proves: a copy gone wrong by accident (a page lost, misplaced
between or within blocks, duplicated, torn, zero where unpopulated or
the reverse) moves some block's term to an unrelated value, and the sum
stays put only with probability about 2**-128. It is no authenticator:
whoever chooses pages can make the terms of several blocks cancel (a
generalized birthday search, cheaper than against a chained hash), so
it guards against faults, not against someone altering the stream,
which the frames' tags or TLS do (doc/source/security.rst). Nor does it
catch a write the write tracking missed: such a page is taken as zero
if it was never written before, or keeps the term it was last read
with, and the sender, which goes by the same tracking, does not send it
(a fault of the host's dirty logging, which any migration relies on).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
import xxhash
from oslo_log import log as logging

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.memory import P2M_BLOCK
from nova_xen_ncm.host.sim.memory import P2M_RAM
from nova_xen_ncm.host.sim.memory import GuestMemory

LOG = logging.getLogger(__name__)

# pfns per block (256 KiB: a block a write touched is cheap to read
# again), blocks a warming pass reads at most, and seconds between two
# refreshes of a migrating domain's cache.
_DIGEST_BLOCK = P2M_BLOCK
_DIGEST_CHUNK = 64
# A restore's mapping of at least this many pages is digested as it
# closes (MemoryDigest.written).
_DIGEST_INLINE_MIN = 64
# A restore's populate of at least this many pages is digested as it
# returns (MemoryDigest.populated): more than a batch with data holds
# (guest_stream.BATCH_PAGES).
_DIGEST_POPULATE_MIN = 4096
_TERM_MODULUS = 1 << 128
#: The name of this definition (base.Capabilities.memory_digest): a peer
#: digesting otherwise is refused at SETUP.
DEFINITION = "xxh3-128-sum-mod-2^128-of-64-page-blocks"
DIGEST_WARM_INTERVAL = 0.1
# pfns of the p2m looked at a time by the first look (_ram_blocks): a
# multiple of _DIGEST_BLOCK.
_RAM_CHUNK = 1 << 18
# Blocks a stretch of consecutive blocks is digested in at most
# (_digest_span), 256 Ki pfns.
_SPAN_BLOCKS = 4096


# The terms of wholly populated blocks without data, by block index (16
# octets each, as _Terms keeps them): a function of the index alone,
# kept for the process's later domains.
_whole_table = bytearray()
_whole_lock = threading.Lock()


def _whole_terms(top: int) -> bytearray:
    """The table of wholly populated data-less blocks' terms, at least
    up to block ``top`` (exclusive)."""
    with _whole_lock:
        if len(_whole_table) < 16 * top:
            bits = (1 << _DIGEST_BLOCK) - 1
            tail = bits.to_bytes(_DIGEST_BLOCK // 8, "little")
            _whole_table.extend(
                b"".join(
                    base.memory_hasher(
                        block.to_bytes(8, "little") + tail
                    ).digest()
                    for block in range(len(_whole_table) // 16, top)
                )
            )
        return _whole_table


def _sum128(packed: bytes | bytearray | memoryview) -> int:
    """The sum of the 128-bit little-endian integers of ``packed``, a
    32-bit limb at a time (a limb's sum fits 64 bits below 2**32 terms)."""
    limbs = np.frombuffer(packed, dtype="<u4").reshape(-1, 4)
    sums = limbs.sum(axis=0, dtype=np.uint64).tolist()
    return sum(s << (32 * k) for k, s in enumerate(sums))


def _spans(blocks: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[first, last) of each stretch of consecutive ``blocks`` (sorted)."""
    if not len(blocks):
        return
    marks = np.asarray(blocks, dtype=np.int64)
    cut = np.flatnonzero(np.diff(marks) != 1) + 1
    firsts = marks[np.concatenate(([0], cut))].tolist()
    lasts = (marks[np.concatenate((cut - 1, [len(marks) - 1]))] + 1).tolist()
    yield from zip(firsts, lasts, strict=True)


def _blocks_of(pages: np.ndarray) -> np.ndarray:
    """The blocks (sorted uint64) with a page that ``pages`` (a bool per
    pfn from 0) marks."""
    pad = -len(pages) % _DIGEST_BLOCK
    if pad:
        pages = np.concatenate((pages, np.zeros(pad, dtype=bool)))
    rows = pages.reshape(-1, _DIGEST_BLOCK)
    return np.flatnonzero(rows.any(axis=1)).astype(np.uint64)


def _ram_blocks(
    mem: GuestMemory, pages: Callable[[int, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The blocks (sorted uint64) with a RAM pfn, and those with a RAM
    pfn that ``pages(start, end)`` (a bool per pfn of the range) marks:
    the p2m looked at _RAM_CHUNK pfns at a time, so that no mask of the
    whole physmap is made for it (an octet a pfn each)."""
    every: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for lo in range(0, mem.max_pfn, _RAM_CHUNK):
        hi = min(lo + _RAM_CHUNK, mem.max_pfn)
        ram = mem.p2m[lo:hi] == P2M_RAM
        offset = np.uint64(lo // _DIGEST_BLOCK)
        every.append(_blocks_of(ram) + offset)
        ram &= pages(lo, hi)
        held.append(_blocks_of(ram) + offset)
    if not every:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty
    return np.concatenate(every), np.concatenate(held)


class _PendingBlocks:
    """The blocks to read, a bit each (an octet a block, 32 KiB at 8 GiB),
    with their count: as a set of Python integers they cost about 90
    octets a block (3 MiB at 8 GiB when the guest wrote all of its RAM),
    and a sorted list of them as much again at each look."""

    def __init__(self, blocks: int) -> None:
        self._marks = np.zeros(blocks, dtype=bool)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, blocks: np.ndarray) -> None:
        """Mark ``blocks`` (any integer array, duplicates allowed)."""
        index = np.asarray(blocks).astype(np.int64, copy=False)
        if len(index):
            self._marks[index] = True
            self._count = int(np.count_nonzero(self._marks))

    def discard(self, blocks: np.ndarray) -> None:
        index = np.asarray(blocks).astype(np.int64, copy=False)
        if len(index) and self._count:
            self._marks[index] = False
            self._count = int(np.count_nonzero(self._marks))

    def clear(self) -> None:
        self._marks[:] = False
        self._count = 0

    def sorted(self) -> np.ndarray:
        """The blocks marked, ascending (int64)."""
        if not self._count:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._marks)

    def any_but(self, blocks: np.ndarray) -> bool:
        """Whether a block not in ``blocks`` is marked."""
        if not self._count:
            return False
        index = np.asarray(blocks).astype(np.int64, copy=False)
        if not len(index):
            return True
        return self._count > int(np.count_nonzero(self._marks[index]))


class _Terms:
    """The blocks' terms by block index, 16 octets each (little-endian,
    zero for a block without one) in one buffer of the physmap's blocks:
    as a dict of Python integers they cost about 80 octets a block."""

    def __init__(self, blocks: int) -> None:
        self._blocks = blocks
        self._buf: bytearray | None = None

    def clear(self) -> None:
        self._buf = None

    def _buffer(self, first: int, count: int) -> bytearray:
        # A bytearray's slice past its end is not an error: assigned, it
        # would put the terms at its end, not at their blocks'.
        if not 0 <= first <= first + count <= self._blocks:
            raise IndexError(
                f"digest blocks [{first}, {first + count}) outside the "
                f"physmap's {self._blocks}"
            )
        if self._buf is None:
            self._buf = bytearray(16 * self._blocks)
        return self._buf

    def swap(self, block: int, new: int) -> int:
        """Set ``block``'s term to ``new``; returns the one it had."""
        buf = self._buffer(block, 1)
        at = 16 * block
        old = int.from_bytes(buf[at : at + 16], "little")
        buf[at : at + 16] = new.to_bytes(16, "little")
        return old

    def replace(self, first: int, packed: bytes | bytearray) -> int:
        """Set the terms of blocks ``first`` onwards to ``packed`` (16
        octets each, as kept); returns the sum of those they had."""
        buf = self._buffer(first, len(packed) // 16)
        lo, hi = 16 * first, 16 * first + len(packed)
        old = _sum128(memoryview(buf)[lo:hi])
        buf[lo:hi] = packed
        return old


@dataclasses.dataclass(eq=False)
class DigestCache:
    """The memory digest's cache of one domain, kept by
    :class:`MemoryDigest` (not by the hypervisor's Domain): per block of
    _DIGEST_BLOCK pfns with populated RAM, its term (the block's hash as
    an integer), and their sum. Kept warm while the domain migrates;
    ``lock`` is locks.DIGEST."""

    mem: GuestMemory
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    terms: _Terms = dataclasses.field(init=False)
    total: int = 0
    started: bool = False
    pending: _PendingBlocks = dataclasses.field(init=False)
    mask: np.ndarray | None = None
    warming: bool = False
    #: Pages written at any time without the memory lock nor a mark
    #: (Hypervisor.unlocked_writes: writable grant maps and mappings, the
    #: xenstore ring), as of the last refresh: read as written pages are.
    unlocked: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.uint64)
    )

    def __post_init__(self) -> None:
        blocks = -(-self.mem.max_pfn // _DIGEST_BLOCK)
        self.terms = _Terms(blocks)
        self.pending = _PendingBlocks(blocks)


class MemoryDigest:
    """The digests of one host's domains, each with its
    :class:`DigestCache` (gone with its domain)."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._caches: weakref.WeakKeyDictionary[Domain, DigestCache] = (
            weakref.WeakKeyDictionary()
        )
        self._caches_lock = threading.Lock()

    def cache(self, dom: Domain) -> DigestCache:
        """``dom``'s cache (made on first use)."""
        with self._caches_lock:
            cache = self._caches.get(dom)
            if cache is None:
                cache = self._caches[dom] = DigestCache(dom.mem)
            return cache

    def digest(self, domid: int) -> str:
        """base.memory_hasher of the sum (modulo 2**128) of the blocks'
        terms: each block (_DIGEST_BLOCK pfns) with populated RAM hashed
        over its index, which of its pfns are populated (a bit each) and
        the hash of (pfn, content) of its populated non-zero pages. Equal
        for equal guest memory, however the pages came to be (written
        zeros or never touched).

        Every writer marks what it writes (GuestMemory.mark_dirty) and
        the p2m marks the blocks it changes, so a block that neither
        touched since the previous digest is not read again, and the sum
        moves by the terms of the blocks read: a paused guest is digested
        in the time its last writes take, not its size's."""
        dom = self.hv.domain(domid, "memory_digest")
        cache = self.cache(dom)
        with locks.ordered(locks.DIGEST, cache.lock):
            self.refresh(dom)
            return base.memory_hasher(
                cache.total.to_bytes(16, "little")
            ).hexdigest()

    def refresh(self, dom: Domain, limit: int | None = None) -> bool:
        """Note the blocks written since the previous refresh and read up
        to ``limit`` of those pending (all if None); the caller holds the
        digest lock. Returns whether some remain pending.

        A page leaving RAM is noted as a write of it (GuestMemory.release,
        map_xen_page), so a block is read against the p2m of the moment;
        a page populated is zero until written, and its block is read
        again for its populated pfns (GuestMemory.take_p2m_blocks). Only
        the first look sees all of the p2m."""
        mem = dom.mem
        c = self.cache(dom)
        # By block: the first look takes every page the guest wrote,
        # which as a list of pfns would be 8 octets a page. A page
        # written since the first look holds data now (c.mask).
        changed = mem.take_changed_blocks(_DIGEST_BLOCK, c.mask)
        unlocked = self.hv.unlocked_writes(dom)
        c.unlocked = unlocked
        if c.mask is not None:
            c.mask[unlocked.view(np.int64)] = True
        with mem.lock():
            blocks = mem.take_p2m_blocks()
            first = blocks is None or not c.started
            if first:
                # The first look (the p2m's blocks are kept from now on).
                c.started = True
                c.terms.clear()
                c.total = 0
                c.pending.clear()
                # Pages not written since the domain was created are
                # zero and not read (_digest_span), faulted in ahead or
                # not; which are holes is asked only of the blocks of
                # the others.
                every, held = _ram_blocks(
                    mem, lambda lo, hi: self._written(c, lo, hi)
                )
                c.mask = np.zeros(mem.max_pfn, dtype=bool)
                for lo, hi in _spans(held):
                    start = lo * _DIGEST_BLOCK
                    end = min(hi * _DIGEST_BLOCK, mem.max_pfn)
                    c.mask[start:end] = mem.data_mask(start, end)
        if first:
            # Blocks with data are read as pending ones are; those of
            # populated pages never written get their terms now (nothing
            # is read for them), so that no look at the pause is in the
            # guest's size.
            c.pending.add(held)
            self._digest_blocks(c, base.pfn_difference(every, held), c.mask)
        elif blocks:
            c.pending.add(
                np.fromiter(blocks, dtype=np.int64, count=len(blocks))
            )
        c.pending.add(changed)
        if len(unlocked):
            # Not in place: the cache keeps these pfns (_written).
            c.pending.add(unlocked // np.uint64(_DIGEST_BLOCK))
        todo = c.pending.sorted()
        busy = np.zeros(0, dtype=np.int64)
        if limit is not None:
            if not dom.booted:
                # A restore writes these now; closing the mapping marks
                # them again (and digests them, written()).
                busy = self._blocks_being_written(dom)
                if len(busy):
                    todo = todo[~np.isin(todo, busy)]
            todo = todo[:limit]
        c.pending.discard(todo)
        self._digest_blocks(c, todo, c.mask)
        if not c.pending:
            # Holes found since are found by the blocks' own look-up.
            c.mask = None
        return c.pending.any_but(busy)

    @staticmethod
    def _blocks_being_written(dom: Domain) -> np.ndarray:
        """The blocks (sorted int64) of the pages mapped writable now."""
        maps = list(dom.writable_maps.values())
        if not maps:
            return np.zeros(0, dtype=np.int64)
        blocks = np.concatenate(maps) // _DIGEST_BLOCK
        return base.pfn_union(blocks).view(np.int64)

    @staticmethod
    def _digest_blocks(
        cache: DigestCache, blocks: Sequence[int], mask: np.ndarray | None
    ) -> None:
        """Digest ``blocks`` (sorted). A stretch of consecutive blocks is
        looked at in one go (the p2m, the holes, the zero pages); only
        the hashing goes block by block."""
        for first, last in _spans(blocks):
            # A span's per-pfn arrays are a few octets a pfn: bounded.
            for lo in range(first, last, _SPAN_BLOCKS):
                hi = min(lo + _SPAN_BLOCKS, last)
                MemoryDigest._digest_span(cache, lo, hi, mask)

    @staticmethod
    def _written(cache: DigestCache, start: int, end: int) -> np.ndarray:
        """Which pfns of ``[start, end)`` may hold data: written since the
        domain was created, or written without a mark by an unlocked
        writer (DigestCache.unlocked). The others are zero (see the
        module's docstring)."""
        written = cache.mem.written_since_creation(start, end)
        unlocked = cache.unlocked
        if len(unlocked):
            inside = unlocked[(unlocked >= start) & (unlocked < end)]
            written[(inside - np.uint64(start)).view(np.int64)] = True
        return written

    @staticmethod
    def _data_less_terms(
        cache: DigestCache,
        first: int,
        last: int,
        which: np.ndarray,
        populated: bytes,
    ) -> None:
        """The terms of blocks ``[first, last)`` that hold no data, from
        which of their pfns are populated (``which``, a bool each, and
        ``populated``, the same packed a bit each): the same terms as a
        block hashed on its own, those of wholly populated blocks (all
        of a zero guest's) taken from a table kept by index."""
        per_block = which.reshape(last - first, _DIGEST_BLOCK)
        whole = per_block.all(axis=1)
        some = per_block.any(axis=1)
        blocks = range(first, last)
        if whole.all():
            packed = bytes(_whole_terms(last)[16 * first : 16 * last])
        else:
            table = _whole_terms(last) if whole.any() else bytearray()
            width = _DIGEST_BLOCK // 8
            parts = []
            for k, block in enumerate(blocks):
                if whole[k]:
                    parts.append(table[16 * block : 16 * block + 16])
                elif some[k]:
                    bits = populated[k * width : (k + 1) * width]
                    h = base.memory_hasher(block.to_bytes(8, "little") + bits)
                    parts.append(h.digest())
                else:
                    parts.append(bytes(16))
            packed = b"".join(parts)
        old = cache.terms.replace(first, packed)
        cache.total = (cache.total - old + _sum128(packed)) % _TERM_MODULUS

    @staticmethod
    def _digest_span(
        cache: DigestCache, first: int, last: int, mask: np.ndarray | None
    ) -> None:
        """Digest blocks ``[first, last)``."""
        mem = cache.mem
        start = first * _DIGEST_BLOCK
        end = min(last * _DIGEST_BLOCK, mem.max_pfn)
        ram = mem.p2m[start:end] == P2M_RAM
        # Which pfns of each block are populated, a bit each.
        which = np.zeros((last - first) * _DIGEST_BLOCK, dtype=bool)
        which[: end - start] = ram
        populated = np.packbits(which, bitorder="little").tobytes()
        width = _DIGEST_BLOCK // 8
        rows = np.zeros(0, dtype=np.int64)
        # Zero pages are not in the digest: pages never written since the
        # domain was created are zero and not read, nor are holes
        # (reading one would allocate it).
        wanted = ram & MemoryDigest._written(cache, start, end)
        if wanted.any():
            data = (
                mem.data_mask(start, end) if mask is None else mask[start:end]
            )
            rows = np.flatnonzero(data & wanted)
            rows = rows[base.nonzero_pages(mem.ram[start:end], rows)]
        pfns = rows + start

        if not len(pfns):
            # No block of the span holds data: each term is of its index
            # and populated pfns alone.
            MemoryDigest._data_less_terms(cache, first, last, which, populated)
            return

        def term(k: int, block: int, d: xxhash.xxh3_128 | None) -> None:
            # The block's term replaces its previous one in the sum.
            bits = populated[k * width : (k + 1) * width]
            new = 0
            if any(bits):
                h = base.memory_hasher(block.to_bytes(8, "little") + bits)
                if d is not None:
                    h.update(d.digest())
                new = int.from_bytes(h.digest(), "little")
            old = cache.terms.swap(block, new)
            cache.total = (cache.total - old + new) % _TERM_MODULUS

        # Where each block's pfns begin and end in ``pfns``.
        bounds = np.searchsorted(
            pfns, np.arange(first, last + 1) * _DIGEST_BLOCK
        ).tolist()
        # Runs of consecutive pfns within a block: hashed in place, no
        # copy of the pages, no GIL held.
        cut = (np.diff(pfns) != 1) | (np.diff(pfns // _DIGEST_BLOCK) != 0)
        lo_index = np.concatenate(([0], np.flatnonzero(cut) + 1))
        hi_index = np.concatenate((lo_index[1:], [len(pfns)]))
        run_lo = lo_index.tolist()
        # Each run's pfns [a, b).
        run_a = pfns[lo_index].tolist()
        run_b = (pfns[hi_index - 1] + 1).tolist()
        keys = memoryview(pfns.astype("<u8")).cast("B")
        run = 0
        for k, block in enumerate(range(first, last)):
            lo, hi = bounds[k], bounds[k + 1]
            if lo == hi:
                term(k, block, None)
                continue
            d = base.memory_hasher(keys[lo * 8 : hi * 8])
            while run < len(run_lo) and run_lo[run] < hi:
                d.update(mem.ram[run_a[run] : run_b[run]])
                run += 1
            term(k, block, d)

    def read(self, dom: Domain, pfns: np.ndarray) -> None:
        """Digest the blocks of ``pfns``, just read by a migration of a
        guest that is not running, while they are in the cache."""
        self.written(dom, pfns, read=True)

    def written(
        self, dom: Domain, pfns: np.ndarray, *, read: bool = False
    ) -> None:
        """Digest the blocks of ``pfns``, just written by a restore (or
        ``read`` by a migration), while they are in the cache: the
        warming thread or the digest would read them again later, and
        what is not read when the guest is paused is downtime."""
        c = self.cache(dom)
        if (dom.booted and not read) or not c.started:
            return
        if len(pfns) < _DIGEST_INLINE_MIN:
            # A few pages (the last round of a quiet guest) are left to
            # the digest itself, which reads their blocks once for all
            # the mappings that wrote them.
            return
        blocks = base.pfn_union(pfns // _DIGEST_BLOCK).tolist()
        mem = dom.mem
        # A warming pass holds the lock for _DIGEST_CHUNK blocks at most.
        with locks.ordered(locks.DIGEST, c.lock):
            with mem.lock():
                # Read after the marks are taken: a write racing this is
                # marked again and read again.
                mem.forget_p2m_blocks(blocks)
                for first, last in _spans(blocks):
                    start = first * _DIGEST_BLOCK
                    marks = mem.changed[start : last * _DIGEST_BLOCK]
                    if c.mask is not None:
                        c.mask[start : start + len(marks)] |= marks != 0
                    marks[:] = 0
            c.pending.discard(np.asarray(blocks, dtype=np.int64))
            self._digest_blocks(c, blocks, c.mask)

    def populated(self, dom: Domain, pfns: np.ndarray) -> None:
        """Digest the blocks of ``pfns``, just populated by a restore, if
        they are many (_DIGEST_POPULATE_MIN): a batch that large carries
        no data (pages sent as zero), so their terms are of the
        populated pfns alone, nothing is read, and the warming thread
        would reach them only after the round. A smaller batch's pages
        are written next; their mapping's close digests them."""
        if len(pfns) >= _DIGEST_POPULATE_MIN:
            self.written(dom, np.asarray(pfns, dtype=np.uint64))

    def settle(self, dom: Domain) -> None:
        """Read every block pending now (the guest still runs): the
        warming thread may lag behind a short precopy, and what it left
        would be read while the guest is paused."""
        c = self.cache(dom)
        if not c.started:
            return
        with locks.ordered(locks.DIGEST, c.lock):
            self.refresh(dom)

    def warm(self, dom: Domain, until: Callable[[], bool]) -> None:
        """Keep the memory digest's cache warm while the domain migrates
        (source: log-dirty on; destination: being restored), so that the
        digest taken while it is paused reads only its last writes."""
        c = self.cache(dom)
        if c.warming:
            return
        c.warming = True

        def run() -> None:
            try:
                while self.hv.domains.get(dom.domid) is dom and not until():
                    # A few blocks at a time: a digest asked for while the
                    # guest is paused does not wait for a whole pass.
                    first = not c.started
                    with locks.ordered(locks.DIGEST, c.lock):
                        more = self.refresh(dom, _DIGEST_CHUNK)
                    if first:
                        # The first look's arrays of every block, freed
                        # in this thread's arena, go back to the system.
                        base.release_freed_memory()
                    time.sleep(0.001 if more else DIGEST_WARM_INTERVAL)
            except (
                HostError,
                AttributeError,
                TypeError,
                ValueError,
                OSError,
            ) as exc:
                # The domain was destroyed under the digest.
                LOG.debug(
                    "dom%d: digest cache no longer kept: %s", dom.domid, exc
                )
            finally:
                c.warming = False

        threading.Thread(
            target=run,
            name=f"{self.hv.hostname}-d{dom.domid}-digest",
            daemon=True,
        ).start()
