"""The real Xen host's memory digest, kept by block while log-dirty is on.

Definition (:data:`DEFINITION`, advertised in the host's capabilities):
the guest's populated pfns less those shared with dom0's daemons are cut
into blocks of :data:`BLOCK` pfns (block ``b`` holds pfns ``64b`` to
``64b + 63``); a block holding at least one of them has the term
``base.memory_hasher(b, its bitmap, H(pfns of its non-zero pages, their
content))`` read as a little-endian integer, and the digest is
``base.memory_hasher`` of the sum of the terms modulo 2**128 (16 octets,
little-endian). A changed block moves the sum by its own term only.

While log-dirty is on, a block's term is taken again only when a
harvest (or, when the digest is asked for, a peek at Xen's bitmap)
reports one of its pages written after the term was taken; a block read
whole for the stream gets its term from that read. At the pause the
digest then reads the blocks of the last dirty pages, not all of RAM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from nova_xen_ncm.host import base

#: The name of this definition (base.Capabilities.memory_digest).
DEFINITION = "xxh3-128-sum-mod-2^128-of-64-page-blocks-less-dom0-shared"
BLOCK = 64
_MODULUS = 1 << 128
_WORDS = base.PAGE_SIZE // 8
# Pages read a mapping at a time by refresh().
READ_BATCH = 1024

#: read(pfns) -> a context manager giving the pages of ``pfns`` (sorted)
#: as a (len(pfns), PAGE_SIZE // 8) uint64 array.
Reader = Callable[[np.ndarray], AbstractContextManager[np.ndarray]]


class BlockTerms:
    """The terms of one domain's blocks over the digested pfns ``pfns``
    (sorted, distinct), which blocks are stale, and their sum."""

    def __init__(self, pfns: np.ndarray) -> None:
        self.pfns = np.asarray(pfns, dtype=np.uint64)
        ids = self.pfns // BLOCK
        #: The blocks holding digested pfns, and where each one's pfns
        #: begin and end in ``pfns``.
        self.blocks, self.first = np.unique(ids, return_index=True)
        self.end = np.append(self.first[1:], len(self.pfns))
        n = len(self.blocks)
        self.terms = [0] * n
        self.total = 0
        self.stale = np.ones(n, dtype=bool)
        # The mark count when each block was last marked stale.
        self.marked_at = np.zeros(n, dtype=np.int64)
        self.marks = 0
        self.lock = threading.Lock()

    def same_set(self, pfns: np.ndarray) -> bool:
        return len(pfns) == len(self.pfns) and bool(
            np.array_equal(pfns, self.pfns)
        )

    def _indices(self, pfns: np.ndarray) -> np.ndarray:
        """Indices in ``blocks`` of the blocks of ``pfns`` that have
        digested pfns (sorted, distinct)."""
        ids = np.unique(np.asarray(pfns, dtype=np.uint64) // BLOCK)
        at = np.searchsorted(self.blocks, ids)
        ok = at < len(self.blocks)
        at = at[ok]
        return at[self.blocks[at] == ids[ok]]

    def mark(self, pfns: np.ndarray) -> None:
        """Pages ``pfns`` were written: their blocks' terms are stale."""
        if not len(pfns):
            return
        with self.lock:
            at = self._indices(pfns)
            self.marks += 1
            self.stale[at] = True
            self.marked_at[at] = self.marks

    def mark_count(self) -> int:
        with self.lock:
            return self.marks

    def _set_term(self, k: int, rows: np.ndarray, pages: np.ndarray) -> None:
        """Block ``k``'s term from ``pages``, the content of its digested
        pfns (rows in order)."""
        pfns = self.pfns[self.first[k] : self.end[k]]
        block = int(self.blocks[k])
        which = np.zeros(BLOCK, dtype=bool)
        which[(pfns - block * BLOCK).astype(np.int64)] = True
        bits = np.packbits(which, bitorder="little").tobytes()
        h = base.memory_hasher(block.to_bytes(8, "little") + bits)
        nonzero = np.flatnonzero(base.nonzero_pages(pages, rows))
        if len(nonzero):
            d = base.memory_hasher(pfns[nonzero].astype("<u8").tobytes())
            chosen = rows[nonzero]
            # Runs of adjacent rows hashed in place, without a copy.
            cuts = np.flatnonzero(np.diff(chosen) != 1) + 1
            for run in np.split(chosen, cuts):
                a, b = int(run[0]), int(run[-1]) + 1
                d.update(pages[a:b])
            h.update(d.digest())
        new = int.from_bytes(h.digest(), "little")
        self.total = (self.total - self.terms[k] + new) % _MODULUS
        self.terms[k] = new

    def note_read(
        self, pfns: np.ndarray, pages: np.ndarray, marks_before: int
    ) -> None:
        """``pages`` (rows of ``pfns``, sorted) were read for the stream,
        mapped when the mark count was ``marks_before``: the blocks all
        of whose digested pfns are among them get their terms from this
        read, and are no longer stale unless marked since."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        if not len(pfns) or not len(self.pfns):
            return
        with self.lock:
            at = np.searchsorted(self.pfns, pfns)
            inside = at < len(self.pfns)
            inside[inside] = self.pfns[at[inside]] == pfns[inside]
            rows = np.flatnonzero(inside)
            if not len(rows):
                return
            where = at[rows]
            k_of = np.searchsorted(self.first, where, side="right") - 1
            ks, starts, counts = np.unique(
                k_of, return_index=True, return_counts=True
            )
            whole = counts == (self.end[ks] - self.first[ks])
            for k, start, count in zip(
                ks[whole].tolist(),
                starts[whole].tolist(),
                counts[whole].tolist(),
                strict=True,
            ):
                self._set_term(k, rows[start : start + count], pages)
                if self.marked_at[k] <= marks_before:
                    self.stale[k] = False

    def refresh(self, read: Reader) -> int:
        """Take again the terms of the stale blocks (all of them at
        first); returns how many blocks were read."""
        with self.lock:
            todo = np.flatnonzero(self.stale)
            self.stale[todo] = False
            done = 0
            i = 0
            while i < len(todo):
                # Whole blocks, up to READ_BATCH pages a mapping.
                j = i
                size = 0
                while j < len(todo):
                    k = todo[j]
                    n = int(self.end[k] - self.first[k])
                    if size and size + n > READ_BATCH:
                        break
                    size += n
                    j += 1
                chunk = todo[i:j]
                parts = [
                    np.arange(self.first[k], self.end[k]) for k in chunk
                ]
                index = np.concatenate(parts)
                with read(self.pfns[index]) as pages:
                    row = 0
                    for k, part in zip(chunk.tolist(), parts, strict=True):
                        rows = np.arange(row, row + len(part))
                        self._set_term(k, rows, pages)
                        row += len(part)
                done += len(chunk)
                i = j
            return done

    def hexdigest(self) -> str:
        with self.lock:
            total = self.total
        return base.memory_hasher(total.to_bytes(16, "little")).hexdigest()


def full_digest(pfns: np.ndarray, read: Reader) -> str:
    """The digest of ``pfns`` with every block read now."""
    terms = BlockTerms(pfns)
    terms.refresh(read)
    return terms.hexdigest()

