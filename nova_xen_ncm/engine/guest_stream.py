"""The stream of one guest, as buffers to write.

:class:`GuestStream` turns a guest of a :class:`~nova_xen_ncm.host.base.
HostDriver` into the buffers of a libxl v2 stream with an embedded libxc
v3 stream (Xen's ``docs/specs/libxl-migration-stream.pandoc`` and
``libxc-migration-stream.pandoc``), in the order Xen's save loop writes
them (``tools/libs/guest/xg_sr_save.c``): headers, STATIC_DATA_END, page
batches, then X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS and the project's
non-cooperative records, END. Live migration and save to file use it
alike.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np

from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import encoder as stream_encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream.records import Buffers

# Pages per PAGE_DATA record: Xen's MAX_BATCH_SIZE (xg_sr_common.h).
BATCH_PAGES = 1024
# Pages per PAGE_DATA record of pages never written (XALLOC only: 8
# octets each, so 512 KiB, less than a batch of BATCH_PAGES with data).
ZERO_BATCH_PAGES = 65536

# Pfns of a guest's runs expanded at a time by GuestStream.cut (8 octets
# each): a multiple of both batch sizes, so that Xen's batches are cut
# as from the whole list.
CUT_CHUNK_PAGES = 1 << 18

_ZERO_TYPE = np.uint8(libxc.XALLOC)
_DATA_TYPE = np.uint8(libxc.NOTAB)


class NeverWritten(np.ndarray):
    """A batch of pfns that the host said were never written when
    :meth:`GuestStream.cut` cut it: :meth:`GuestStream.batches` sends
    it as zero without asking again. Marked by its type, not its size,
    so that no other batch is ever taken for one."""


class RunBatch:
    """A batch cut from a guest's runs (:meth:`GuestStream.cut`), held
    as its runs, a few words, until it is sent: a round 0 cut into
    batches of pfns holds every populated pfn at once, 8 octets a page
    (16 MiB at 8 GiB)."""

    __slots__ = ("runs", "never_written")

    def __init__(self, batch: np.ndarray) -> None:
        self.runs = base.PfnRuns.of(batch)
        self.never_written = isinstance(batch, NeverWritten)

    def __len__(self) -> int:
        return len(self.runs)

    def pfns(self) -> np.ndarray:
        """The batch as :meth:`GuestStream.cut` cut it from the pfns."""
        pfns = self.runs.pfns()
        return pfns.view(NeverWritten) if self.never_written else pfns


@dataclasses.dataclass
class PageBatch:
    """One PAGE_DATA record ready to write, and what it holds.

    ``buffers`` include views of the guest's mapped pages: valid until the
    iterator that produced the batch moves on.
    """

    buffers: Buffers
    pages: int
    zero_pages: int

    @property
    def nbytes(self) -> int:
        return stream_encoder.buffers_size(self.buffers)


class GuestStream:
    """The stream of one guest of ``host``, as buffers to write.

    ``xen_compatible`` writes only Xen's record types (a guest without PV
    drivers; the result passes Xen's verify-stream-v2); otherwise the
    project's record tables are used and PV state may be added.
    """

    def __init__(
        self,
        host: base.HostDriver,
        domid: int,
        *,
        xen_compatible: bool = False,
        batch_pages: int = BATCH_PAGES,
    ) -> None:
        self.host = host
        self.domid = domid
        self.xen_compatible = xen_compatible
        self.batch_pages = batch_pages
        self._host_lock = threading.Lock()
        if xen_compatible:
            self.encoder = stream_encoder.Encoder(
                libxc_table=tables.xen_libxc_table(),
                libxl_table=tables.xen_libxl_table(),
            )
        else:
            self.encoder = stream_encoder.Encoder()

    def start(self) -> Buffers:
        """libxl header, LIBXC_CONTEXT, libxc headers, STATIC_DATA_END."""
        enc = self.encoder
        out = enc.libxl_header()
        out += enc.libxl("LIBXC_CONTEXT")
        out += enc.libxc_headers(libxc.DOMAIN_X86_HVM)
        out += enc.libxc("STATIC_DATA_END")
        return out

    def pages(
        self, pfns: np.ndarray, *, copy: bool = False, reuse: bool = False
    ) -> Iterator[PageBatch]:
        """PAGE_DATA batches of ``pfns``. A zero page goes as XALLOC
        (populate, no data), so it costs 8 octets on the wire.

        Without ``copy`` the buffers are the guest's mapped pages
        themselves: for a guest that cannot write them (paused, saving to
        a file), or for frames without a tag of their own (inside TLS, or
        unauthenticated), where a page written while it goes is marked
        dirty and goes again. With a frame tag a page that may change
        (running guest, PV backends) is copied first: the tag is
        computed before the bytes are written, and a change in between
        would fail the frame. ``reuse`` copies every batch into the same
        buffer, for a caller done with a batch before it asks for the
        next.
        """
        pfns = np.asarray(pfns, dtype=np.uint64)
        return self.batches(
            base.iter_batches(pfns, self.batch_pages), copy=copy, reuse=reuse
        )

    def cut(
        self, pfns: np.ndarray | base.PfnRuns
    ) -> list[np.ndarray] | list[RunBatch]:
        """``pfns`` cut into batches for :meth:`batches`; given as runs
        (a guest's populated pfns, base.HostDriver.populated_runs), into
        :class:`RunBatch` es, expanded CUT_CHUNK_PAGES at a time: what is
        held is a few words a batch, and a chunk at once."""
        if isinstance(pfns, base.PfnRuns):
            return self._cut_runs(pfns)
        return self._cut(pfns)

    def _cut_runs(self, runs: base.PfnRuns) -> list[RunBatch]:
        out: list[RunBatch] = []
        lengths = runs.end - runs.first
        # The position of each run's first pfn among all of them.
        before = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        for lo in range(0, total, CUT_CHUNK_PAGES):
            hi = min(lo + CUT_CHUNK_PAGES, total)
            # The runs holding positions [lo, hi), clipped to them.
            a = int(np.searchsorted(before, lo, side="right")) - 1
            b = int(np.searchsorted(before, hi, side="left"))
            first = runs.first[a:b] + np.maximum(lo - before[a:b], 0)
            end = runs.first[a:b] + np.minimum(hi - before[a:b], lengths[a:b])
            chunk = base.expand_runs(first, end)
            out.extend(RunBatch(batch) for batch in self._cut(chunk))
            # Freed before the next is made: one chunk at a time.
            del chunk
        return out

    def _cut(self, pfns: np.ndarray) -> list[np.ndarray]:
        """``pfns`` cut into batches for :meth:`batches`: of at most
        ``batch_pages``, but for stretches of more than that which the
        host knows were never written since the domain was created
        (base.HostDriver.written_pages), cut into batches of up to
        ZERO_BATCH_PAGES: a per-record cost at each end for 8 octets a
        page is most of a zero guest's migration. Only for pages of a
        paused guest or one whose writes log-dirty tracks: a page of
        such a batch written after this is sent as zero, and log-dirty
        sends it again. A Xen-compatible stream keeps Xen's batch size
        (MAX_BATCH_SIZE)."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        size = self.batch_pages
        if self.xen_compatible or len(pfns) <= size:
            return list(base.iter_batches(pfns, size))
        with self._host_lock:
            written = np.asarray(
                self.host.written_pages(self.domid, pfns), dtype=bool
            )
        if written.all():
            return list(base.iter_batches(pfns, size))
        # [lo, hi) of each stretch of never-written pages in ``pfns``.
        edges = np.flatnonzero(np.diff(written.astype(np.int8))) + 1
        bounds = np.concatenate(([0], edges, [len(pfns)]))
        lo, hi = bounds[:-1], bounds[1:]
        keep = ~written[lo] & (hi - lo > size)
        out: list[np.ndarray] = []
        done = 0
        for a, b in zip(lo[keep].tolist(), hi[keep].tolist(), strict=True):
            out.extend(base.iter_batches(pfns[done:a], size))
            out.extend(
                part.view(NeverWritten)
                for part in base.iter_batches(pfns[a:b], ZERO_BATCH_PAGES)
            )
            done = b
        out.extend(base.iter_batches(pfns[done:], size))
        return out

    def batches(
        self,
        batches: Iterable[np.ndarray | RunBatch],
        *,
        copy: bool = False,
        reuse: bool = False,
    ) -> Iterator[PageBatch]:
        """:meth:`pages` of pfn batches already cut (several threads may
        each send their share of a round). A :class:`NeverWritten` batch
        (:meth:`cut`) is sent as zero, without asking the host again or
        mapping its pages."""
        scratch: bytearray | None = None
        for batch in batches:
            if isinstance(batch, RunBatch):
                batch = batch.pfns()
            if isinstance(batch, NeverWritten):
                batch = batch.view(np.ndarray)
                yield self._batch(batch, [], np.zeros(len(batch), bool))
                continue
            batch = np.asarray(batch, dtype=np.uint64)
            # Host calls one at a time (base.HostDriver); the mapped pages
            # are read by each thread on its own. Pages never written
            # since the guest was created go as zero without being
            # mapped or read (the destination's fresh memory is zero).
            with self._host_lock:
                written = self.host.written_pages(self.domid, batch)
                mapped = batch if written.all() else batch[written]
                mapping = None
                if len(mapped):
                    mapping = self.host.map_pages(self.domid, mapped)
            try:
                runs = mapping.runs() if mapping is not None else []
                if copy and runs:
                    size = len(mapped) * base.PAGE_SIZE
                    if not reuse or scratch is None or len(scratch) < size:
                        scratch = bytearray(size)
                    snapshot = memoryview(scratch)[:size]
                    pos = 0
                    for _, view in runs:
                        snapshot[pos : pos + view.nbytes] = view
                        pos += view.nbytes
                    runs = [(0, snapshot)]
                yield self._batch(batch, runs, written)
            finally:
                if mapping is not None:
                    with self._host_lock:
                        mapping.close()

    def _batch(
        self,
        batch: np.ndarray,
        runs: list[tuple[int, memoryview]],
        written: np.ndarray | None = None,
    ) -> PageBatch:
        """The PAGE_DATA record of ``batch`` whose contents are ``runs``
        (base.PageMapping.runs of the pages of ``batch`` that ``written``
        marks, all of them if None; the others are zero); the data goes
        as views of the runs, one per stretch of non-zero pages, so no
        page is copied here."""
        # Zero pages found a run at a time: a test per page costs more
        # than reading the batch.
        if runs:
            mapped_nonzero = np.concatenate(
                [base.nonzero_pages(view) for _, view in runs]
            )
        else:
            mapped_nonzero = np.zeros(0, dtype=bool)
        if written is None or len(mapped_nonzero) == len(batch):
            nonzero = mapped_nonzero
        else:
            nonzero = np.zeros(len(batch), dtype=bool)
            nonzero[np.flatnonzero(written)] = mapped_nonzero
        types = np.where(nonzero, _DATA_TYPE, _ZERO_TYPE).astype(np.uint8)
        data: list[memoryview] = []
        # Positions among the mapped pages, where the runs are.
        keep = np.flatnonzero(mapped_nonzero)
        if len(keep):
            firsts = np.array([first for first, _ in runs])
            run_start = np.zeros(len(mapped_nonzero), dtype=bool)
            run_start[firsts] = True
            cut = np.flatnonzero((np.diff(keep) != 1) | run_start[keep[1:]])
            lo = keep[np.concatenate(([0], cut + 1))]
            hi = keep[np.concatenate((cut, [len(keep) - 1]))] + 1
            which = np.searchsorted(firsts, lo, side="right") - 1
            for a, b, r in zip(
                lo.tolist(), hi.tolist(), which.tolist(), strict=True
            ):
                first, view = runs[r]
                lo_off = (a - first) * base.PAGE_SIZE
                data.append(view[lo_off : (b - first) * base.PAGE_SIZE])
        return PageBatch(
            buffers=self.encoder.page_data(batch, types, data),
            pages=len(batch),
            zero_pages=len(batch) - len(keep),
        )

    def platform(self) -> Buffers:
        """X86_TSC_INFO, HVM_CONTEXT and HVM_PARAMS of the paused guest."""
        enc = self.encoder
        tsc = self.host.get_tsc_info(self.domid)
        blob = self.host.get_hvm_context(self.domid)
        context = libxc.HvmContextCodec().decode(memoryview(blob))
        params = sorted(self.host.get_hvm_params(self.domid).items())
        out = enc.libxc(
            "X86_TSC_INFO",
            libxc.X86TscInfo(tsc.mode, tsc.khz, tsc.nsec, tsc.incarnation),
        )
        out += enc.libxc("HVM_CONTEXT", context)
        out += enc.libxc(
            "HVM_PARAMS", [libxc.HvmParam(i, v) for i, v in params]
        )
        return out

    def finish(self, pv: pvstate.PvRecords | None) -> Buffers:
        """The PV records (if any), libxc END, libxl END."""
        enc = self.encoder
        if pv is not None and self.xen_compatible:
            raise EngineError("a Xen-compatible stream cannot carry PV state")
        out: Buffers = []
        if pv is not None:
            for name, value in pv.libxc_records():
                out += enc.libxc(name, value)
        out += enc.libxc("END")
        # The device model's state, where libxl writes it (after libxc).
        emulator = self.host.get_emulator_context(self.domid)
        if emulator is not None:
            out += enc.libxl(
                "EMULATOR_CONTEXT",
                libxl.EmulatorContext(emulator[0], 0, memoryview(emulator[1])),
            )
        if pv is not None:
            for name, value in pv.libxl_records():
                out += enc.libxl(name, value)
        out += enc.libxl("END")
        return out

    def pv_records(self, uuid: str) -> pvstate.PvRecords:
        """Export the PV state (guest paused, backends quiesced)."""
        state = self.host.export_pv_state(self.domid)
        return pvstate.to_records(state, uuid)
