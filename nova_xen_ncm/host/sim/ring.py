"""Xen's shared I/O ring over a page of guest memory.

Follows ``xen/include/public/io/ring.h``:

* the shared ring (``struct *_sring``) is one page: ``req_prod``,
  ``req_event``, ``rsp_prod``, ``rsp_event`` (u32 each), 4 bytes of
  ``pvt`` and 44 of ``__pad``, then the entries from offset 64; the
  number of entries is the largest power of two that fits
  (``__RING_SIZE``, ``__RD32``);
* a request and its response share an entry slot (``union
  *_sring_entry``), so the entry size is the larger of the two;
* indices are free-running 32-bit counters; a slot is ``index & (size -
  1)`` and every distance is taken modulo 2**32, so the ring keeps
  working across the wrap of the counters;
* the front end keeps ``req_prod_pvt`` and ``rsp_cons`` private, the back
  end ``req_cons`` and ``rsp_prod_pvt`` (``struct *_front_ring``,
  ``struct *_back_ring``).

The front end's private indices live wherever its caller says: the
simulated guest keeps them in its own RAM, so a :class:`FrontRing` takes
a view of 8 bytes for them. The back end's live in dom0 (plain
attributes) and travel in ``BackendState.ring_indices``.

Ordering: an entry is written before the producer index that publishes
it and read after the producer index is read, which is what ``xen_wmb``
and ``xen_rmb`` order in C. Index words are read and written as single
aligned 32-bit accesses (``memoryview.cast("I")``), so the other process
never sees half of one.
"""

from __future__ import annotations

import struct

from nova_xen_ncm.host.base import PAGE_SIZE

# struct *_sring header: four RING_IDX, pvt[4], __pad[44].
SRING_HEADER_SIZE = 64
_REQ_PROD = 0
_REQ_EVENT = 1
_RSP_PROD = 2
_RSP_EVENT = 3

# The front end's private indices, as stored in its memory.
FRONT_PRIVATE = struct.Struct("<II")
FRONT_PRIVATE_SIZE = FRONT_PRIVATE.size

_MASK = 0xFFFFFFFF


class RingError(Exception):
    """The other end broke the ring protocol (ring.h's *_OVERFLOW)."""


def idx_diff(a: int, b: int) -> int:
    """``(RING_IDX)(a - b)``: the distance of free-running indices."""
    return (a - b) & _MASK


def ring_entries(entry_size: int, page_size: int = PAGE_SIZE) -> int:
    """``__CONST_RING_SIZE``: entries of ``entry_size`` bytes in a page,
    rounded down to a power of two (``__RD32``)."""
    if entry_size <= 0:
        raise ValueError(f"entry size must be positive, got {entry_size}")
    fit = (page_size - SRING_HEADER_SIZE) // entry_size
    if fit < 1:
        raise ValueError(
            f"an entry of {entry_size} bytes does not fit in a "
            f"{page_size}-byte ring page"
        )
    return 1 << (fit.bit_length() - 1)


def init_shared_ring(page: memoryview) -> None:
    """``SHARED_RING_INIT``: producers 0, event thresholds 1, padding
    zero. Only the front end initialises the shared ring."""
    page[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)
    words = page[:16].cast("I")
    words[_REQ_EVENT] = 1
    words[_RSP_EVENT] = 1


class _Ring:
    """What both ends share: the page, its index words, the slots."""

    def __init__(self, page: memoryview, entry_size: int) -> None:
        if len(page) < SRING_HEADER_SIZE + entry_size:
            raise ValueError(f"ring page of {len(page)} bytes is too small")
        self.page = page
        self.entry_size = entry_size
        self.size = ring_entries(entry_size, len(page))
        self._words = page[:16].cast("I")

    # The shared header words (struct *_sring).
    @property
    def req_prod(self) -> int:
        return self._words[_REQ_PROD]

    @property
    def req_event(self) -> int:
        return self._words[_REQ_EVENT]

    @property
    def rsp_prod(self) -> int:
        return self._words[_RSP_PROD]

    @property
    def rsp_event(self) -> int:
        return self._words[_RSP_EVENT]

    def _slot(self, index: int) -> slice:
        off = SRING_HEADER_SIZE + (index & (self.size - 1)) * self.entry_size
        return slice(off, off + self.entry_size)

    def _read(self, index: int) -> bytes:
        # RING_COPY_*: work on a private copy the other end cannot change.
        return bytes(self.page[self._slot(index)])

    def _write(self, index: int, entry: bytes) -> None:
        if len(entry) > self.entry_size:
            raise ValueError(
                f"entry of {len(entry)} bytes exceeds the ring's "
                f"{self.entry_size}"
            )
        slot = self._slot(index)
        self.page[slot] = entry.ljust(self.entry_size, b"\0")


class FrontRing(_Ring):
    """``struct *_front_ring``: the guest's end.

    ``private`` is an 8-byte view holding ``req_prod_pvt`` and
    ``rsp_cons`` (in the guest's RAM); :meth:`attach` keeps what it holds,
    :meth:`init` resets it and the shared ring.
    """

    def __init__(
        self, page: memoryview, entry_size: int, private: memoryview
    ) -> None:
        super().__init__(page, entry_size)
        if len(private) != FRONT_PRIVATE_SIZE:
            raise ValueError("front ring private area must be 8 bytes")
        self._pvt = private.cast("I")

    @classmethod
    def init(
        cls, page: memoryview, entry_size: int, private: memoryview
    ) -> FrontRing:
        """``XEN_FRONT_RING_INIT``."""
        init_shared_ring(page)
        ring = cls(page, entry_size, private)
        ring.req_prod_pvt = 0
        ring.rsp_cons = 0
        return ring

    @classmethod
    def attach(
        cls, page: memoryview, entry_size: int, private: memoryview
    ) -> FrontRing:
        """Pick up a ring whose private indices are already in memory."""
        return cls(page, entry_size, private)

    @property
    def req_prod_pvt(self) -> int:
        return self._pvt[0]

    @req_prod_pvt.setter
    def req_prod_pvt(self, value: int) -> None:
        self._pvt[0] = value & _MASK

    @property
    def rsp_cons(self) -> int:
        return self._pvt[1]

    @rsp_cons.setter
    def rsp_cons(self, value: int) -> None:
        self._pvt[1] = value & _MASK

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``."""
        return self.size - idx_diff(self.req_prod_pvt, self.rsp_cons)

    def full(self) -> bool:
        """``RING_FULL``."""
        return self.free_requests() == 0

    def put_request(self, entry: bytes) -> int:
        """Write a request at ``req_prod_pvt`` (not yet visible to the
        back end) and return the index it took."""
        if self.full():
            raise RingError("front ring full")
        index = self.req_prod_pvt
        self._write(index, entry)
        self.req_prod_pvt = index + 1
        return index

    def push_requests(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish the private
        requests; True if the back end asked to be notified of them."""
        old = self.req_prod
        new = self.req_prod_pvt
        self._words[_REQ_PROD] = new
        return idx_diff(new, self.req_event) < idx_diff(new, old)

    def unconsumed_responses(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_RESPONSES``, after checking the back
        end did not produce more than it could (RESPONSE_PROD_OVERFLOW)."""
        n = idx_diff(self.rsp_prod, self.rsp_cons)
        if n > self.size:
            raise RingError(
                f"back end produced {n} responses on a ring of {self.size}"
            )
        return n

    def get_response(self) -> bytes:
        """Copy out the response at ``rsp_cons`` and consume it."""
        if not self.unconsumed_responses():
            raise RingError("no unconsumed response")
        index = self.rsp_cons
        entry = self._read(index)
        self.rsp_cons = index + 1
        return entry

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: ask for a notification on
        the next response and say whether one slipped in meanwhile."""
        if self.unconsumed_responses():
            return True
        self._words[_RSP_EVENT] = (self.rsp_cons + 1) & _MASK
        return bool(self.unconsumed_responses())


class BackRing(_Ring):
    """``struct *_back_ring``: the backend's end; its private indices are
    plain attributes, exported through :attr:`indices`."""

    def __init__(
        self,
        page: memoryview,
        entry_size: int,
        req_cons: int = 0,
        rsp_prod_pvt: int = 0,
    ) -> None:
        super().__init__(page, entry_size)
        self.req_cons = req_cons & _MASK
        self.rsp_prod_pvt = rsp_prod_pvt & _MASK

    @classmethod
    def attach(
        cls,
        page: memoryview,
        entry_size: int,
        indices: tuple[int, int] = (0, 0),
    ) -> BackRing:
        """``BACK_RING_ATTACH`` at (req_cons, rsp_prod_pvt); a fresh
        connection is ``BACK_RING_INIT``, indices (0, 0)."""
        req_cons, rsp_prod_pvt = indices
        if idx_diff(req_cons, rsp_prod_pvt) > ring_entries(
            entry_size, len(page)
        ):
            raise RingError(
                f"indices {indices} leave more requests outstanding than "
                f"the ring holds"
            )
        return cls(page, entry_size, req_cons, rsp_prod_pvt)

    @property
    def indices(self) -> tuple[int, int]:
        """(req_cons, rsp_prod_pvt), as BackendState.ring_indices has it."""
        return (self.req_cons, self.rsp_prod_pvt)

    def unconsumed_requests(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_REQUESTS``: requests published and
        not taken, never more than free response slots; an ill-behaved
        front end (REQUEST_PROD_OVERFLOW) is refused."""
        prod = self.req_prod
        if idx_diff(prod, self.rsp_prod_pvt) > self.size:
            raise RingError(
                f"front end produced up to {prod} with responses at "
                f"{self.rsp_prod_pvt} on a ring of {self.size}"
            )
        req = idx_diff(prod, self.req_cons)
        rsp = self.size - idx_diff(self.req_cons, self.rsp_prod_pvt)
        return min(req, rsp)

    def get_request(self) -> bytes:
        """Copy out the request at ``req_cons`` and consume it."""
        if not self.unconsumed_requests():
            raise RingError("no unconsumed request")
        index = self.req_cons
        entry = self._read(index)
        self.req_cons = (index + 1) & _MASK
        return entry

    def put_response(self, entry: bytes) -> int:
        """Write a response at ``rsp_prod_pvt`` (not yet visible)."""
        if idx_diff(self.req_cons, self.rsp_prod_pvt) == 0:
            raise RingError("no request taken that a response could answer")
        index = self.rsp_prod_pvt
        self._write(index, entry)
        self.rsp_prod_pvt = (index + 1) & _MASK
        return index

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``."""
        old = self.rsp_prod
        new = self.rsp_prod_pvt
        self._words[_RSP_PROD] = new
        return idx_diff(new, self.rsp_event) < idx_diff(new, old)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``."""
        if self.unconsumed_requests():
            return True
        self._words[_REQ_EVENT] = (self.req_cons + 1) & _MASK
        return bool(self.unconsumed_requests())
