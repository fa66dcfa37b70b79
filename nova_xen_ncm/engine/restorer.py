"""The restorer: a decoded stream applied to an empty, paused domain.

Every record's content is checked (:mod:`.validate`) against the guest's
limits before it reaches the domain; a page batch is written straight into
guest memory; the PV state is imported last, once memory and platform
are complete. Live migration (:mod:`.receiver`) and restore from a file
(:mod:`.savefile`) use it alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from oslo_log import log as logging

from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine import validate
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import encoder as stream_encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Record

LOG = logging.getLogger(__name__)
# Pages of the memory digest settled at a time while pages arrive.
SETTLE_PAGES = 1024
# The libxc records a restore must have seen (an HVM guest is not whole
# without them); the first of them marks the stopped guest.
REQUIRED = ("X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS")


class RestoreError(EngineError):
    """The stream cannot be applied to the restoring domain."""


class Restorer:
    """Applies a decoded stream to the empty, paused domain ``domid``.

    ``pv_drivers`` says whether the guest's PV state must be in the stream.
    Feed every record to :meth:`apply`; :attr:`done` turns True after the
    libxl END, when everything has been applied. ``before_pv_import`` is
    called when memory and platform state are complete, just before the
    PV state is imported and the backends reconnect (which may answer
    in-flight requests into guest memory).
    """

    def __init__(
        self,
        host: base.HostDriver,
        domid: int,
        *,
        pv_drivers: bool,
        before_pv_import: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self._before_pv_import = before_pv_import
        self.domid = domid
        self.pv_drivers = pv_drivers
        self.done = False
        #: True once the first record of the stopped guest arrived.
        self.stopped = False
        self.pages = 0
        self._seen: set[str] = set()
        self._params: dict[int, int] = {}
        self._pv = pvstate.PvRecordCollector()
        self._lock = threading.Lock()
        # What the stream's content is checked against before it is
        # applied (forged memory, xenstore, ports, grants).
        self.limits = validate.GuestLimits.from_host(host, domid)
        # Pfns populated so far: a later XALLOC of one of them means the
        # page became zero and must be cleared (as must one the host
        # says may hold data from before the stream).
        self._populated = np.zeros(0, dtype=bool)
        # The thread settling the host's memory digest (settle_digest).
        self._settle_guard = threading.Lock()
        self._settle_wake = threading.Event()
        self._settle_stop = threading.Event()
        self._settler: threading.Thread | None = None

    def apply(self, record: Record) -> None:
        if self.done:
            raise RestoreError(f"{record.name} after the end of the stream")
        name = record.name
        try:
            if record.rtype.is_header or record.skipped:
                return
            if self._pv.add(name, record.value):
                if name == "NCM_DOMAIN":
                    self._check_domain(record.value)
                return
            handler = _HANDLERS.get((record.layer, name))
            if handler is None:
                raise RestoreError(
                    f"{record.layer} record {name} cannot be applied by "
                    "this host"
                )
            handler(self, record.value)
            self._seen.add(name)
        except base.HostError as exc:
            raise RestoreError(f"applying {name}: {exc}") from exc

    def _check_domain(self, value: Any) -> None:
        if value.domid != self.domid:
            raise RestoreError(
                f"the stream is of domain {value.domid}, restoring into "
                f"{self.domid}: the domid is guest-visible"
            )

    def _ignore(self, value: Any) -> None:
        """Markers whose only effect is their place in the stream."""

    def _page_data(self, value: libxc.PageData) -> None:
        data = memoryview(value.data).cast("B")
        mapping = self.page_targets(value.pfns, value.types, data.nbytes)
        if mapping is None:
            return
        with mapping:
            pos = 0
            for _, view in mapping.runs():
                view[:] = data[pos : pos + view.nbytes]
                pos += view.nbytes

    def page_record(self, record: bytes | memoryview) -> None:
        """Apply a frame that holds exactly one PAGE_DATA record (flag
        PAGES, compressed: it was not read into place)."""
        view = memoryview(record)
        if len(view) < libxc.RHDR.size:
            raise ProtocolError("page frame shorter than a record header")
        rtype, rlen = libxc.RHDR.unpack_from(view)
        if rtype != libxc.PAGE_DATA or libxc.RHDR.size + rlen != len(view):
            raise ProtocolError(
                f"a page frame of {len(view)} octets holds record type "
                f"{rtype:#x} of {rlen} octets, not one PAGE_DATA record"
            )
        try:
            value = _PAGE_CODEC.decode(view[libxc.RHDR.size :])
        except BodyError as exc:
            raise ProtocolError(f"PAGE_DATA frame: {exc}") from exc
        self._page_data(value)

    def receive_pages(
        self, length: int, read_into: Callable[[memoryview], None]
    ) -> None:
        """Apply a frame body of ``length`` octets holding exactly one
        PAGE_DATA record, read by ``read_into`` (which fills the view it
        is given from the connection) a part at a time: the record's
        header and pfns into a buffer of their own, then each run of
        page contents straight into the mapped guest pages, so the
        octets are copied once, by the socket read. The pfns are checked
        before any page is mapped. Only for frames that were
        authenticated before their octets are handed over (records of a
        mutual TLS connection, ``tls-frames``), that carry no tag by
        both ends' choice (``unauthenticated-frames``), or that are
        decrypted into place (``encrypted-frames``: checked at the
        frame's end, a failure destroys this never-run domain): a frame
        with a GMAC tag goes through :meth:`page_record` once its tag is
        checked, so no unauthenticated octet reaches guest memory."""
        fixed = libxc.RHDR.size + libxc.PAGE_DATA_HDR.size
        if length < fixed:
            raise ProtocolError(
                f"a page frame of {length} octets is shorter than a "
                "PAGE_DATA record's headers"
            )
        head = bytearray(fixed)
        read_into(memoryview(head))
        rtype, rlen = libxc.RHDR.unpack_from(head)
        if rtype != libxc.PAGE_DATA or libxc.RHDR.size + rlen != length:
            raise ProtocolError(
                f"a page frame of {length} octets holds record type "
                f"{rtype:#x} of {rlen} octets, not one PAGE_DATA record"
            )
        body = memoryview(head)[libxc.RHDR.size :]
        try:
            # Bounded by rlen, itself bounded by the frame limit.
            pfn_end = _PAGE_CODEC.head_size(body, rlen)
            entries = bytearray(pfn_end)
            entries[: len(body)] = body
            read_into(memoryview(entries)[len(body) :])
            pfns, types = _PAGE_CODEC.decode_head(memoryview(entries), rlen)
        except BodyError as exc:
            raise ProtocolError(f"PAGE_DATA frame: {exc}") from exc
        mapping = self.page_targets(pfns, types, rlen - pfn_end)
        if mapping is None:
            return
        with mapping:
            runs = mapping.runs()
            if (rlen - pfn_end) >= _DIRECT_RUN * len(runs):
                for _, view in runs:
                    read_into(view)
                return
            # Scattered pages (the last dirty ones): one read for all
            # and a copy each, not a socket read per page (each lets the
            # other threads take the GIL, in the downtime).
            body = bytearray(rlen - pfn_end)
            read_into(memoryview(body))
            pos = 0
            for _, view in runs:
                view[:] = body[pos : pos + view.nbytes]
                pos += view.nbytes

    def page_targets(
        self, pfns: np.ndarray, types: np.ndarray, data_bytes: int
    ) -> base.PageMapping | None:
        """Apply a PAGE_DATA batch but for its page contents: checked,
        populated, pages that became zero cleared. Returns the pages that
        carry data mapped writable, to be filled in pfn order (straight
        from the socket) and closed by the caller, or None. Several
        channels may call this at once."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        types = np.asarray(types)
        has_data = libxc.carries_data(types)
        alloc = types == libxc.XALLOC
        # Host calls one at a time (base.HostDriver); the filling of the
        # mapped pages runs in parallel.
        with self._lock:
            validate.check_pages(
                self.limits,
                pfns,
                types,
                int(np.count_nonzero(has_data)),
                data_bytes,
            )
            # XTAB and BROKEN entries name pfns the guest does not have
            # (xg_sr_restore.c populates only the others).
            real = (types != libxc.XTAB) & (types != libxc.BROKEN)
            self.host.populate(self.domid, pfns[real])
            seen = self._mark(pfns)
            # A zero page arrived: cleared if it held data, from an
            # earlier batch or from before the stream (what the host's
            # build of the new domain loaded, firmware for one).
            clear = alloc & seen
            fresh = np.flatnonzero(alloc & ~seen)
            if len(fresh):
                clear[fresh] = np.asarray(
                    self.host.written_pages(self.domid, pfns[fresh]),
                    dtype=bool,
                )
            cleared = pfns[clear]
            if len(cleared):
                with self.host.map_pages(
                    self.domid, cleared, writable=True
                ) as mapping:
                    for _, view in mapping.runs():
                        view[:] = bytes(view.nbytes)
            self.pages += len(pfns)
            data_pfns = pfns[has_data]
            if not len(data_pfns):
                return None
            return self.host.map_pages(self.domid, data_pfns, writable=True)

    def settle_digest(self) -> None:
        """Have the host bring what it keeps of the memory digest up to
        date with the pages written so far (a pre-copy round ended), so
        that the digest taken in the pause reads only those written
        since. Done in a thread of its own, a part at a time between
        the batches still applied (pages filled meanwhile are read
        again), until :meth:`stop_settling`; returns at once."""
        with self._settle_guard:
            if self._settle_stop.is_set():
                return
            if self._settler is None:
                self._settler = threading.Thread(
                    target=self._settle,
                    name=f"restore-{self.domid}-digest",
                    daemon=True,
                )
                self._settler.start()
            self._settle_wake.set()

    def stop_settling(self) -> None:
        """No more settling (the source pauses the guest: the last pages
        come), once the part under way is read."""
        with self._settle_guard:
            self._settle_stop.set()
            self._settle_wake.set()
            thread = self._settler
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _settle(self) -> None:
        try:
            while not self._settle_stop.is_set():
                self._settle_wake.wait()
                self._settle_wake.clear()
                more = True
                while more and not self._settle_stop.is_set():
                    # One part at a time: the batches of the round go on
                    # between them, and the pause waits for one part at
                    # most.
                    with self._lock:
                        more = self.host.settle_digest_part(
                            self.domid, SETTLE_PAGES
                        )
        except Exception as exc:
            # What is left is read when the digest is taken, in the pause.
            LOG.warning(
                "Domain %d: the memory digest is no longer settled while "
                "pages arrive: %s: %s",
                self.domid,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, base.HostError),
            )

    def arrived(self) -> int:
        """Distinct pages that arrived so far (each counted once, however
        often precopy sent it again)."""
        with self._lock:
            return int(np.count_nonzero(self._populated))

    def _mark(self, pfns: np.ndarray) -> np.ndarray:
        """Record ``pfns`` as populated; which of them already were."""
        top = int(pfns.max()) + 1 if len(pfns) else 0
        if top > len(self._populated):
            grown = np.zeros(max(top, 2 * len(self._populated)), dtype=bool)
            grown[: len(self._populated)] = self._populated
            self._populated = grown
        idx = pfns.astype(np.int64)
        seen = self._populated[idx].copy()
        self._populated[idx] = True
        return seen

    def _cpu_policy(self, value: np.ndarray) -> None:
        if value.dtype == libxc.MSR_ENTRY:
            self.host.set_cpu_policy(self.domid, b"", value.tobytes())
        else:
            self.host.set_cpu_policy(self.domid, value.tobytes(), b"")

    def _emulator_context(self, value: libxl.EmulatorContext) -> None:
        self.host.set_emulator_context(
            self.domid, value.emulator_id, bytes(value.context)
        )

    def _tsc_info(self, value: libxc.X86TscInfo) -> None:
        self.stopped = True
        self.host.set_tsc_info(
            self.domid,
            base.TscInfo(value.mode, value.khz, value.nsec, value.incarnation),
        )

    def _hvm_context(self, value: libxc.HvmContext) -> None:
        self.stopped = True
        blob = stream_encoder.join(libxc.HvmContextCodec().encode(value))
        self.host.set_hvm_context(self.domid, blob)

    def _hvm_params(self, value: list[libxc.HvmParam]) -> None:
        self.stopped = True
        params = {int(p.index): int(p.value) for p in value}
        validate.check_hvm_params(self.limits, params)
        self.host.set_hvm_params(self.domid, params)
        self._params.update(params)

    def _libxc_end(self, value: None) -> None:
        missing = [n for n in REQUIRED if n not in self._seen]
        if missing:
            raise RestoreError(
                f"the libxc stream ended without {', '.join(missing)}"
            )

    def _libxl_end(self, value: None) -> None:
        if "END" not in self._seen:
            raise RestoreError("the libxl stream ended inside libxc")
        if self._pv.empty:
            if self.pv_drivers:
                raise RestoreError(
                    "the guest has PV drivers but the stream carries no "
                    "PV state"
                )
        else:
            records = self._pv.result()
            # The host's other guests as they are now, not at SETUP.
            self.limits = validate.GuestLimits.from_host(self.host, self.domid)
            validate.check_pv_records(self.limits, records, self._populated)
            state = records.to_pv_state(self._params)
            self.stop_settling()
            if self._before_pv_import is not None:
                self._before_pv_import()
            self.host.import_pv_state(self.domid, state)
        self.done = True


_HANDLERS = {
    (libxl.LAYER, "LIBXC_CONTEXT"): Restorer._ignore,
    (libxc.LAYER, "X86_CPUID_POLICY"): Restorer._cpu_policy,
    (libxc.LAYER, "X86_MSR_POLICY"): Restorer._cpu_policy,
    (libxc.LAYER, "STATIC_DATA_END"): Restorer._ignore,
    (libxl.LAYER, "EMULATOR_CONTEXT"): Restorer._emulator_context,
    (libxc.LAYER, "PAGE_DATA"): Restorer._page_data,
    (libxc.LAYER, "X86_TSC_INFO"): Restorer._tsc_info,
    (libxc.LAYER, "HVM_CONTEXT"): Restorer._hvm_context,
    (libxc.LAYER, "HVM_PARAMS"): Restorer._hvm_params,
    (libxc.LAYER, "END"): Restorer._libxc_end,
    (libxl.LAYER, "END"): Restorer._libxl_end,
}


_PAGE_CODEC = libxc.PageDataCodec()
# Runs of guest pages at least this long on average are read straight
# from the socket into place.
_DIRECT_RUN = 64 * 1024
