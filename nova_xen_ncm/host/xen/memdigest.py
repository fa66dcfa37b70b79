"""The real Xen host's memory digest, kept while a migration runs.

Block by block (BLOCK pfns), base.memory_hasher over the block's index,
which of its pfns are counted (a bit each) and, if any is non-zero, the
hash of (pfn, content) of its counted non-zero pages; the digest is the
hash of the sum of the blocks' terms modulo 2**128 (DEFINITION). The
counted pfns are the populated ones less the pages dom0's daemons write
(XenHost._shared_with_dom0). A changed block moves the sum by its own
term only, so a digest kept from the start of log-dirty costs at the
pause the blocks written since they were read, not the guest's size:

* :meth:`MemoryDigests.start` (log-dirty just enabled) leaves every block
  pending; every write from then on is in Xen's log-dirty bitmap.
* A read-only mapping of the guest's pages (the pre-copy sending them)
  gives the terms of the pending blocks it covers as it closes
  (:meth:`MemoryDigests.read`), unless a harvest marked the block after
  the mapping was made (its pages may have changed since they were
  read).
* Each harvest (:meth:`MemoryDigests.harvested`) marks its pages' blocks
  pending again; so does a change of the populated pfns.
* The digest reads the blocks still pending and those of the pages the
  log holds now (a peek, which leaves the log as it is): what was
  written after the last harvest and not sent makes it differ.

What it rests on: Xen's log-dirty reporting every write made after it
was enabled, as the sending of pages does, except on the pages the
driver knows Xen writes through a mapping of its own without marking
them: the firmware's reserved area (XenHost._reserved_pfns) and each
vCPU's registered vcpu_info and the shared_info frame
(XenHost._xen_written, read from XEN_DOMCTL_ncm_vcpu). Every harvest
counts those dirty (the last round sends them) and the paused digest
reads their blocks as they are then. So the digest proves the
destination equal to the source on every page logged or so named; a
write Xen or a dom0 tool makes elsewhere without logging it goes
unnoticed, by the sending and by this digest alike. Where the driver
cannot name those pages (a Xen without XEN_DOMCTL_ncm_vcpu, a guest
with FIFO event channels, whose control blocks Xen writes unlogged)
nothing is kept and the paused source reads every page.

A domain being restored (a migration's destination) has its digest kept
the same way, over the same pfns, from the moment its build was read
(XenHost.create_empty_domain, which reads every page to learn what the
build loaded): :meth:`MemoryDigests.start_restoring` gives the blocks of
zero pages their terms without reading them again and leaves the others
pending. Nothing logs the writes there: the driver's own writable
mappings mark their blocks as they close, their writes done
(:meth:`MemoryDigests.written`: a settle that read a block before gives
way to the mark), a change of the populated pfns marks the blocks it
changes (:meth:`MemoryDigests.recount`), the receiver settles the
pending blocks a part at a time between pre-copy rounds, and the digest
at READY reads what is still pending plus the pages Xen may write
through a mapping of its own (the firmware's reserved area, the
shared_info frame if placed). What it rests on: until the digest, no
one else writes the domain's RAM. It never ran; no vcpu_info or
runstate area is registered and no backend connected before its PV
state is imported, which comes after the digest (and stops keeping it,
as does the unpause); the device model loads its state without writing
guest RAM (no emulated display: the xl configuration has vga none), but
QEMU, restarted on that state, writes its option ROMs into the guest's
pfns again as it realizes its devices: the pages that held data at the
build's read (where the first QEMU wrote them) are read again at READY
(:meth:`MemoryDigests.build_rewritten`).
A Viridian guest (HVM_PARAM_VIRIDIAN set) is read whole at READY: Xen
maps its VP assist, SynIC and reference TSC pages as it loads their
context and writes them through those mappings.
The same premise already decides which pages a zero page in the stream
must clear (XenHost.written_pages). A write elsewhere after the build
was read goes unnoticed by this digest, as by that clearing, where a
full read at READY would have found it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np
import xxhash

from nova_xen_ncm.host import base

#: pfns per block (256 KiB).
BLOCK = 64
#: The name of this definition (base.Capabilities.memory_digest).
DEFINITION = "xxh3-128-sum-mod-2^128-of-64-page-blocks-less-dom0-rings"
_MODULUS = 1 << 128

#: Reads the pages of sorted ``pfns`` and calls back with them as a
#: (pages, PAGE_SIZE // 8) uint64 array: XenHost maps them.
Reader = Callable[[np.ndarray, Callable[[np.ndarray], None]], None]


def block_terms(
    pfns: np.ndarray, pages: np.ndarray
) -> Iterator[tuple[int, int]]:
    """``(block, term)`` of each block that ``pfns`` (sorted uint64, every
    counted pfn of those blocks) covers, ``pages`` their content."""
    if not len(pfns):
        return
    blocks = pfns // np.uint64(BLOCK)
    cuts = np.flatnonzero(np.diff(blocks)) + 1
    starts = np.concatenate(([0], cuts)).tolist()
    ends = np.concatenate((cuts, [len(pfns)])).tolist()
    nonzero = base.nonzero_pages(pages)
    masks = _block_masks(pfns, blocks, starts)
    for lo, hi, mask in zip(starts, ends, masks, strict=True):
        block = int(blocks[lo])
        h = _head(block, mask)
        rows = np.flatnonzero(nonzero[lo:hi]) + lo
        if len(rows):
            d = base.memory_hasher(pfns[rows].astype("<u8").tobytes())
            for row in rows.tolist():
                d.update(pages[row])
            h.update(d.digest())
        yield block, int.from_bytes(h.digest(), "little")


def zero_terms(pfns: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(block, term)`` of each block that ``pfns`` (sorted uint64, every
    counted pfn of those blocks) covers, those pages all zero: no page is
    read (:func:`block_terms` of zero pages)."""
    if not len(pfns):
        return
    blocks = pfns // np.uint64(BLOCK)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(blocks)) + 1))
    masks = _block_masks(pfns, blocks, starts.tolist())
    for lo, mask in zip(starts.tolist(), masks, strict=True):
        block = int(blocks[lo])
        yield block, int.from_bytes(_head(block, mask).digest(), "little")


def _block_masks(
    pfns: np.ndarray, blocks: np.ndarray, starts: list[int]
) -> list[int]:
    """Each block's counted pfns as a 64-bit mask (bit i: the block's
    pfn i), the blocks starting at ``starts`` in ``pfns``."""
    bits = np.left_shift(
        np.uint64(1), pfns - blocks * np.uint64(BLOCK), dtype=np.uint64
    )
    return np.bitwise_or.reduceat(bits, starts).tolist()


def _head(block: int, mask: int) -> xxhash.xxh3_128:
    """A block's hash before its pages: its index and counted pfns."""
    return base.memory_hasher(
        block.to_bytes(8, "little") + mask.to_bytes(8, "little")
    )


def _blocks(pfns: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(pfns, dtype=np.uint64) // np.uint64(BLOCK))


def _pfns_of(counted: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The counted pfns (sorted) of ``blocks`` (sorted, distinct): found
    by bisection, in the blocks' number rather than the guest's size."""
    blocks = np.asarray(blocks, dtype=np.uint64)
    lo = np.searchsorted(counted, blocks * np.uint64(BLOCK))
    hi = np.searchsorted(counted, (blocks + np.uint64(1)) * np.uint64(BLOCK))
    n = hi - lo
    idx = np.arange(int(n.sum())) + np.repeat(lo - (np.cumsum(n) - n), n)
    return counted[idx]


def full_digest(counted: np.ndarray, reader: Reader) -> str:
    """The digest of a domain read whole: every counted page read now."""
    total = 0

    def add(pfns: np.ndarray, pages: np.ndarray) -> None:
        nonlocal total
        total += sum(term for _, term in block_terms(pfns, pages))

    _read_blocks(counted, reader, add)
    return _hexdigest(total)


def _hexdigest(total: int) -> str:
    return base.memory_hasher(
        (total % _MODULUS).to_bytes(16, "little")
    ).hexdigest()


def _read_blocks(
    pfns: np.ndarray,
    reader: Reader,
    use: Callable[[np.ndarray, np.ndarray], None],
) -> None:
    """Read ``pfns`` (sorted, whole blocks) in batches of whole blocks."""
    if not len(pfns):
        return
    blocks = pfns // np.uint64(BLOCK)
    # Batches of about 1024 pages cut at a block's first pfn.
    first_of_block = np.concatenate(([0], np.flatnonzero(np.diff(blocks)) + 1))
    cuts = [0]
    for start in first_of_block.tolist():
        if start - cuts[-1] >= 1024:
            cuts.append(start)
    cuts.append(len(pfns))
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        batch = pfns[lo:hi]
        reader(batch, lambda pages, batch=batch: use(batch, pages))


@dataclasses.dataclass(eq=False)
class _Kept:
    """One domain's digest while log-dirty is on."""

    counted: np.ndarray
    key: object
    terms: dict[int, int] = dataclasses.field(default_factory=dict)
    total: int = 0
    #: Pending blocks, each with the number of the harvest that marked it
    #: last (0: since the start).
    pending: dict[int, int] = dataclasses.field(default_factory=dict)
    harvests: int = 0
    #: Kept by start_restoring (no log: the writes are marked), not by
    #: log-dirty's start.
    restoring: bool = False
    #: A restoring domain's pages that held data at its build's read.
    loaded: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.uint64)
    )

    def set_terms(self, terms: Iterator[tuple[int, int]]) -> None:
        for block, term in terms:
            old = self.terms.pop(block, 0)
            self.terms[block] = term
            self.total = (self.total - old + term) % _MODULUS


class MemoryDigests:
    """The kept digests of one host's domains (those under log-dirty)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[int, _Kept] = {}

    def start(self, domid: int, counted: np.ndarray, key: object) -> None:
        """Log-dirty was just enabled: every block is pending."""
        kept = _Kept(counted=counted, key=key)
        kept.pending = dict.fromkeys(_blocks(counted).tolist(), 0)
        with self._lock:
            self._kept[domid] = kept

    def start_restoring(
        self,
        domid: int,
        counted: np.ndarray,
        key: object,
        nonzero: np.ndarray,
    ) -> None:
        """A domain to be restored was just built and read whole
        (``nonzero``: its pages that held a non-zero octet): the terms of
        its blocks of zero pages are known without reading them again,
        the others are pending. From here every write to its memory is
        to be marked (:meth:`written`)."""
        kept = _Kept(
            counted=counted,
            key=key,
            restoring=True,
            loaded=np.asarray(nonzero, dtype=np.uint64),
        )
        dirty = np.intersect1d(_blocks(nonzero), _blocks(counted))
        zero = ~np.isin(counted // np.uint64(BLOCK), dirty)
        kept.set_terms(zero_terms(counted[zero]))
        kept.pending = dict.fromkeys(dirty.tolist(), 0)
        with self._lock:
            self._kept[domid] = kept

    def stop(self, domid: int) -> None:
        with self._lock:
            self._kept.pop(domid, None)

    def keeps(self, domid: int) -> bool:
        return domid in self._kept

    def restoring(self, domid: int) -> bool:
        """Whether the digest kept is a restoring domain's
        (:meth:`start_restoring`), which no log-dirty replaced since."""
        kept = self._kept.get(domid)
        return kept is not None and kept.restoring

    def harvested(self, domid: int, pfns: np.ndarray) -> None:
        """The pages of a harvest: their blocks are read again."""
        self.written(domid, pfns)

    def written(self, domid: int, pfns: np.ndarray) -> None:
        """``pfns`` were written (a harvest's pages, or a writable mapping
        of a domain being restored as it closes, its writes done): their
        blocks are read again, and a mapping made before now gives none
        of their terms."""
        with self._lock:
            kept = self._kept.get(domid)
            if kept is None:
                return
            kept.harvests += 1
            mark = kept.harvests
            for block in _blocks(pfns).tolist():
                kept.pending[block] = mark

    def build_rewritten(self, domid: int) -> None:
        """What wrote a restoring domain's build (the device model's
        option ROMs) wrote it again: the blocks that held data at the
        build's read are read again."""
        kept = self._kept.get(domid)
        if kept is not None and kept.restoring:
            self.written(domid, kept.loaded)

    def opened(self, domid: int) -> int | None:
        """A read-only mapping is made: the harvest number to give
        :meth:`read` as it closes (None: nothing kept)."""
        with self._lock:
            kept = self._kept.get(domid)
            return None if kept is None else kept.harvests

    def read(
        self, domid: int, pfns: np.ndarray, pages: np.ndarray, opened: int
    ) -> None:
        """A read-only mapping of ``pfns`` (``pages``) made at harvest
        number ``opened`` closes: the pending blocks whose counted pfns it
        all holds and that no harvest marked since get their terms."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        if not len(pfns) or np.any(np.diff(pfns.view(np.int64)) <= 0):
            return
        with self._lock:
            kept = self._kept.get(domid)
            if kept is None:
                return
            wanted = [
                b
                for b in _blocks(pfns).tolist()
                if kept.pending.get(b, opened + 1) <= opened
            ]
            if not wanted:
                return
            counted = _pfns_of(kept.counted, np.array(wanted, np.uint64))
            # Whole blocks only: every counted pfn of the block is here.
            where = np.searchsorted(pfns, counted)
            held = (where < len(pfns)) & (
                pfns[np.minimum(where, len(pfns) - 1)] == counted
            )
            missing = set((counted[~held] // np.uint64(BLOCK)).tolist())
            whole = [b for b in wanted if b not in missing]
            if not whole:
                return
            take = _pfns_of(counted, np.array(whole, np.uint64))
            rows = np.searchsorted(pfns, take)
            kept.set_terms(block_terms(take, pages[rows]))
            for block in whole:
                del kept.pending[block]

    def digest(
        self,
        domid: int,
        key: object,
        counted: Callable[[], tuple[object, np.ndarray]],
        logged: np.ndarray,
        reader: Reader,
    ) -> str | None:
        """The digest of a domain under log-dirty (None if nothing is kept
        of it): the blocks pending, those whose counted pfns changed
        (``key`` differs from the one kept: ``counted()`` then gives the
        key and the pfns)
        and those of the pages the log holds now (``logged``) read
        again."""
        with self._lock:
            kept = self._kept.get(domid)
            if kept is None:
                return None
            if key != kept.key:
                self._recount(kept, *counted())
            for block in _blocks(logged).tolist():
                kept.pending[block] = kept.harvests
            blocks = np.array(sorted(kept.pending), dtype=np.uint64)
            self._read_pending(kept, blocks, reader)
            return _hexdigest(kept.total)

    def recount(self, domid: int, key: object, counted: np.ndarray) -> None:
        """The counted pfns changed (pages populated): those of the blocks
        that gained or lost one are read again."""
        with self._lock:
            kept = self._kept.get(domid)
            if kept is not None:
                kept.harvests += 1
                self._recount(kept, key, counted)

    @staticmethod
    def _recount(kept: _Kept, key: object, counted: np.ndarray) -> None:
        changed = np.setxor1d(kept.counted, counted)
        kept.counted, kept.key = counted, key
        for block in _blocks(changed).tolist():
            kept.pending[block] = kept.harvests

    def settle(
        self, domid: int, reader: Reader, pages: int | None = None
    ) -> bool:
        """Read the blocks pending now (the guest still runs), or about
        ``pages`` pages' worth of them; whether any is left."""
        with self._lock:
            kept = self._kept.get(domid)
            if kept is None:
                return False
            which = (
                kept.pending
                if pages is None
                else itertools.islice(kept.pending, max(1, pages // BLOCK))
            )
            blocks = np.array(sorted(which), dtype=np.uint64)
            self._read_pending(kept, blocks, reader)
            return bool(kept.pending)

    def _read_pending(
        self, kept: _Kept, blocks: np.ndarray, reader: Reader
    ) -> None:
        if not len(blocks):
            return
        pfns = _pfns_of(kept.counted, blocks)
        # Blocks left without a counted pfn have no term.
        for block in np.setdiff1d(
            blocks, _blocks(pfns), assume_unique=True
        ).tolist():
            kept.total = (kept.total - kept.terms.pop(block, 0)) % _MODULUS

        def use(batch: np.ndarray, pages: np.ndarray) -> None:
            kept.set_terms(block_terms(batch, pages))

        _read_blocks(pfns, reader, use)
        for block in blocks.tolist():
            kept.pending.pop(block, None)
