"""The destination side of a live migration, and restoring a stream.

:class:`Restorer` applies the records of one guest's stream to an empty
domain of a :class:`~nova_xen_ncm.host.base.HostDriver`: pages as they
arrive, then TSC, HVM context and params, and at the end of the stream
the PV state (:mod:`nova_xen_ncm.engine.pvstate`). Live migration and
restore from file use it alike.

:class:`Receiver` serves one incoming migration (architecture.rst section
5): it authenticates the source with the one-time token, refuses early
what it cannot restore, reserves the domid, applies the stream, reports a
digest of the guest-visible state (READY) and unpauses the guest only on
COMMIT. Before COMMIT any failure destroys the domain it created.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine import validate
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.state import MigrationState
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.state import Role
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressSink
from nova_xen_ncm.stream import decoder as stream_decoder
from nova_xen_ncm.stream import encoder as stream_encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import Record

LOG = logging.getLogger(__name__)

# Seconds between two reports of how much of the guest arrived; the
# sinks rate-limit again, this only keeps a fast stream from building
# events nobody shows.
RECEIVE_REPORT_INTERVAL = 0.1

_PLATFORM_ITEMS = (base.Item.MEMORY, base.Item.PLATFORM, base.Item.HVM_PARAMS)
# The libxc records a restore must have seen (an HVM guest is not whole
# without them).
_REQUIRED = ("X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS")


#: Connections authenticated at once while the source is awaited.
MAX_HANDSHAKES = 8


def _close_results(results: queue.Queue, count: int) -> None:
    """Close the channels of ``count`` handshakes still to report."""
    for _ in range(count):
        ok, value = results.get()
        if ok:
            value.close()


def needed_items(pv_drivers: bool) -> tuple[base.Item, ...]:
    """The invariant items a guest needs restored (Capabilities.missing)."""
    return tuple(base.Item) if pv_drivers else _PLATFORM_ITEMS


def guest_digests(
    state: base.GuestState, items: Iterable[base.Item]
) -> dict[str, str]:
    """SHA-256 of each item's guest-visible value: the values are plain
    data (tuples, dataclasses, enums), whose repr is canonical."""
    return {
        item.value: hashlib.sha256(
            repr(state.items.get(item)).encode()
        ).hexdigest()
        for item in items
    }


def format_digests(digests: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(digests.items()))


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
        # page became zero and must be cleared.
        self._populated = np.zeros(0, dtype=bool)

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
            cleared = pfns[alloc & seen]
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
        missing = [n for n in _REQUIRED if n not in self._seen]
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
_DATA_CAPABILITIES = (
    messages.Capability.LZ4.value,
    messages.Capability.MULTI_CHANNEL.value,
)


def _read_frame(
    channel: Channel, header: messages.DataHeader, restorer: Restorer
) -> messages.Data | None:
    """Read the body of a data frame whose header came (direct mode).

    A page batch (flag PAGES) is applied to the restoring guest once the
    frame's tag is checked (nothing of a forged frame reaches the guest)
    and None returned; any other body comes back as Data.
    """
    body = bytearray(header.length)
    if header.length:
        channel.read_payload_into(memoryview(body))
    end = channel.receive()
    if not isinstance(end, messages.DataEnd):
        raise ProtocolError(
            f"{type(end).__name__} inside data frame {header.seq}"
        )
    if header.pages:
        restorer.page_record(body)
        return None
    return messages.Data(seq=header.seq, payload=body)


class MigrationAborted(EngineError):
    """The source aborted the migration."""


# Phases in which the destination runs the guest.
_RUNNING = frozenset({Phase.CLEANUP, Phase.DONE})


class Receiver:
    """Receives migration ``migration_id`` into ``host``.

    The listener is bound on construction (:attr:`address` is where the
    source connects); :meth:`run` serves the migration in the calling
    thread and returns the final phase.
    """

    def __init__(
        self,
        host: base.HostDriver,
        migration_id: str,
        token: bytes,
        *,
        conf: cfg.ConfigOpts | None = None,
        sinks: Iterable[ProgressSink] = (),
        listener: Listener | None = None,
        source_address: str | None = None,
    ) -> None:
        if conf is None:
            from nova_xen_ncm.conf import CONF as conf
        self.conf = conf
        self.opts = conf.xen_ncm
        self.host = host
        self.migration_id = migration_id
        self._token = token
        # ``source_address``: the only address the source may connect
        # from (with [xen_ncm] allowed_sources), where the caller knows.
        self.listener = listener or Listener.from_conf(
            conf,
            expected=1,
            allowed_sources=[source_address] if source_address else (),
        )
        # This side's outcome, kept until the source acknowledged it.
        store = journal.Journal.incoming_from_conf(conf)
        store.check_id(migration_id)
        self.journal = journal.Record(
            store,
            journal.IncomingEntry(
                migration_id=migration_id,
                domid=-1,
                host=self.listener.address[0],
                port=self.listener.port,
                token=token.hex(),
                running=True,
                boot_id=host.boot_id(),
            ),
            keep_settled=True,
        )
        self.state = MigrationState(
            migration_id,
            Role.DESTINATION,
            sinks,
            journal=self.journal.on_transition,
        )
        self.domid: int | None = None
        #: The failure that ended the migration, if any.
        self.error: BaseException | None = None
        # Set by stop_waiting: the listener was closed on purpose.
        self._stop_reason: str | None = None
        self._channel: Channel | None = None
        self._created = False
        # SETUP's word on whether the guest ran on the source.
        self._running = True
        self._ready_sent = False
        self._source_knows = False
        # Highest data frame applied: where a resumed channel goes on.
        self._applied = 0
        # Data channels 1..n-1 (SETUP's channels), each served by its
        # own thread; the highest frame each applied.
        self._data: dict[int, Channel] = {}
        self._data_applied: dict[int, int] = {}
        self._data_threads: list[threading.Thread] = []
        self._data_error: BaseException | None = None
        # Set once no channel may resume any more (stream done or over).
        self._transfer_over = threading.Event()
        # Dropped channels waiting for the source to resume them, and
        # resumed connections not yet taken by their channel's thread;
        # one thread at a time accepts for all of them.
        self._resume = threading.Condition()
        self._dropped: set[int] = set()
        self._resumed: dict[int, Channel] = {}
        self._accepting = False
        # Digests of the items complete before the PV state is imported.
        self._platform_digests: dict[str, str] = {}
        # The destination's own progress: the guest's size (from SETUP)
        # and when the arrived share was last reported.
        self._memory_bytes = 0
        self._reported_at = 0.0

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    @property
    def connected(self) -> bool:
        """Whether a source has completed the handshake."""
        return self._channel is not None

    def stop_waiting(self, reason: str) -> None:
        """Close the listener while no source has connected: the
        migration ends CANCELLED with ``reason``."""
        self._stop_reason = reason
        self.listener.close()

    def run(self) -> Phase:
        try:
            self._serve()
        finally:
            self.journal.close()
            self._close_channel()
            self.listener.close()
        return self.state.phase

    def _serve(self) -> None:
        try:
            # Held for the migration's life: recovery leaves it alone.
            self.journal.open()
            self._accept()
            restorer = self._setup()
            try:
                self._receive(restorer)
            finally:
                self._end_transfer()
            self._restore(restorer)
            message = self._channel.receive()
            if isinstance(message, messages.Abort):
                raise MigrationAborted(message.reason)
            if not isinstance(message, messages.Commit):
                raise ProtocolError(
                    f"expected COMMIT, got {type(message).__name__}"
                )
            self.state.transition(Phase.RESTORE, Phase.COMMIT)
        except Exception as exc:
            self._rollback(exc)
        else:
            self._commit()
        if not self._source_knows and (self._ready_sent or self._created):
            # It may ask for the outcome, or for the teardown before it
            # resumes its copy.
            self._serve_queries()
        else:
            # The source cannot be in doubt: nothing was created here, or
            # it said it knows.
            self.journal.forget()

    # -- phases --

    def _token_for(self, hello: messages.Hello) -> bytes:
        if hello.migration_id != self.migration_id:
            raise Refused(
                messages.RefuseReason.UNKNOWN_MIGRATION,
                f"no incoming migration {hello.migration_id!r} here",
            )
        return self._token

    def _accept_channel(
        self,
        token_for: Callable[[messages.Hello], bytes],
        capabilities: Sequence[str],
        resume_from: Callable[[messages.Hello, messages.Resume], int]
        | None = None,
    ) -> tuple[Channel, messages.Hello, messages.Auth | messages.Resume]:
        """The next connection, authenticated (closed if it fails)."""
        channel = Channel.accept(
            self.listener,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
            direct_payload=True,
        )
        try:
            hello, proof = channel.server_handshake(
                token_for, capabilities=capabilities, resume_from=resume_from
            )
        except BaseException:
            channel.close()
            raise
        return channel, hello, proof

    def _accept(self) -> None:
        """The source's first connection. Every connection is
        authenticated on a thread of its own (at most
        ``MAX_HANDSHAKES`` at once) under the handshake deadline, so a
        peer that never completes a HELLO delays nobody; a stray one
        (another migration's, or one that fails its handshake) is
        dropped and the source still awaited; a wrong token for this
        migration ends it, the token being good for one attempt."""
        until = time.monotonic() + self.listener.accept_timeout
        results: queue.Queue = queue.Queue()
        inflight = 0
        stray: Exception | None = None
        try:
            while True:
                try:
                    ok, value = results.get(timeout=0.05 if inflight else 0)
                except queue.Empty:
                    pass
                else:
                    inflight -= 1
                    if ok:
                        self._channel = value
                        self.listener.accepted += 1
                        return
                    if (
                        isinstance(value, Refused)
                        and value.code
                        != messages.RefuseReason.UNKNOWN_MIGRATION
                    ):
                        raise value
                    stray = value
                    LOG.warning(
                        "Migration %s: dropped a stray connection (%s); "
                        "still waiting for the source",
                        self.migration_id,
                        value,
                    )
                    continue
                left = until - time.monotonic()
                if self.listener.closed:
                    if self._stop_reason is not None:
                        # Cancelled before any source connected.
                        raise MigrationAborted(self._stop_reason)
                    raise TransportError("the listener was closed")
                if left <= 0:
                    if stray is not None:
                        raise stray
                    raise TransportError(
                        f"no source connected on port {self.listener.port} "
                        f"within {self.listener.accept_timeout}s"
                    )
                if inflight >= MAX_HANDSHAKES:
                    continue
                taken = self.listener.take(min(left, 0.05))
                if taken is None:
                    continue
                inflight += 1
                threading.Thread(
                    target=self._handshake_one,
                    args=(*taken, results),
                    name=f"migration-{self.migration_id}-handshake",
                    daemon=True,
                ).start()
        finally:
            if inflight:
                # Handshakes still running: whatever they yield is closed.
                threading.Thread(
                    target=_close_results,
                    args=(results, inflight),
                    daemon=True,
                ).start()

    def _handshake_one(
        self, sock: socket.socket, peer: object, results: queue.Queue
    ) -> None:
        try:
            sock = self.listener.secure(sock, peer)
            channel = Channel(
                sock,
                framing.Connection(
                    messages.Role.SERVER,
                    max_data=self.opts.max_frame_bytes,
                    direct_payload=True,
                ),
                io_timeout=self.opts.io_timeout,
            )
        except Exception as exc:
            results.put((False, exc))
            return
        try:
            channel.server_handshake(
                self._token_for,
                capabilities=[messages.Capability.LZ4.value],
                deadline=min(
                    self.opts.io_timeout, self.listener.handshake_timeout
                ),
            )
        except Exception as exc:
            channel.close()
            results.put((False, exc))
            return
        results.put((True, channel))

    def _setup(self) -> Restorer:
        setup = self._channel.receive()
        if not isinstance(setup, messages.Setup):
            raise ProtocolError(f"expected SETUP, got {type(setup).__name__}")
        try:
            self._check(setup)
            config = base.DomainConfig(
                name=setup.name,
                memory_bytes=setup.memory_bytes,
                vcpus=setup.vcpus,
                uuid=setup.uuid,
                pv_drivers=setup.pv_drivers,
            )
            # Recorded before the domain exists: a restart destroys
            # what a dead engine left paused here.
            entry = self.journal.entry
            entry.domid, entry.uuid = setup.domid, setup.uuid
            entry.running = setup.running
            self.journal.write(Phase.SETUP)
            try:
                self.host.create_empty_domain(config, setup.domid)
            except base.DomidInUse as exc:
                raise Refused(
                    messages.RefuseReason.DOMID_TAKEN, str(exc)
                ) from exc
            except base.InsufficientMemory as exc:
                raise Refused(
                    messages.RefuseReason.NOT_ENOUGH_MEMORY, str(exc)
                ) from exc
        except Refused as exc:
            self._channel.send(
                messages.SetupReply(
                    accepted=False,
                    domid=setup.domid,
                    code=exc.code,
                    text=exc.text[: messages.MAX_TEXT],
                )
            )
            raise
        self._created = True
        self.domid = setup.domid
        self._memory_bytes = setup.memory_bytes
        self._running = setup.running
        # The data channels connect once the source has this reply.
        self.listener.allow(setup.channels - 1)
        self._channel.send(
            messages.SetupReply(
                accepted=True, domid=setup.domid, code="", text=""
            )
        )
        self.state.transition(
            Phase.SETUP, Phase.PRECOPY, detail={"domid": setup.domid}
        )
        restorer = Restorer(
            self.host,
            setup.domid,
            pv_drivers=setup.pv_drivers,
            before_pv_import=self._digest_platform,
        )
        self._open_data_channels(setup.channels, restorer)
        return restorer

    def _open_data_channels(self, count: int, restorer: Restorer) -> None:
        """Accept data channels 1..count-1 (in any order) and serve each
        in its own thread."""

        def token_for(hello: messages.Hello) -> bytes:
            if not 0 < hello.channel < count or hello.channel in self._data:
                raise Refused(
                    messages.RefuseReason.TOO_MANY_CONNECTIONS,
                    f"channel {hello.channel} of {count} is not expected",
                )
            return self._token_for(hello)

        while len(self._data) < count - 1:
            channel, hello, _ = self._accept_channel(
                token_for, _DATA_CAPABILITIES
            )
            self._data[hello.channel] = channel
            self._data_applied[hello.channel] = 0
        for index in sorted(self._data):
            thread = threading.Thread(
                target=self._serve_data,
                args=(index, restorer),
                name=f"migration-{self.migration_id}-in-{index}",
                daemon=True,
            )
            thread.start()
            self._data_threads.append(thread)

    def _digest_platform(self) -> None:
        # Memory as the source paused it: a reconnecting backend may then
        # answer in-flight requests into the ring pages.
        self._platform_digests = guest_digests(
            self.host.guest_state(self.domid, _PLATFORM_ITEMS),
            _PLATFORM_ITEMS,
        )

    def _check(self, setup: messages.Setup) -> None:
        """Refuse before anything moves (architecture.rst section 2)."""
        caps = self.host.capabilities()
        missing = dict(caps.missing(setup.pv_drivers))
        features = {f.value for f in base.GuestFeature}
        for name in setup.required:
            if name in features:
                if name not in caps.features:
                    missing[name] = "used by the guest, not restorable here"
                continue
            try:
                item = base.Item(name)
            except ValueError:
                missing[name] = "unknown to this destination"
                continue
            if caps.restore.get(item) is not None:
                missing[item] = caps.restore[item]
        if not caps.preserve_domid:
            missing[base.Item.DOMID] = "this host cannot choose domids"
        if missing:
            text = "; ".join(
                f"{getattr(k, 'value', k)}: {v}" for k, v in missing.items()
            )
            raise Refused(messages.RefuseReason.MISSING_CAPABILITY, text)
        try:
            holder = self.host.domain_info(setup.domid)
        except base.DomainNotFound:
            pass
        else:
            raise Refused(
                messages.RefuseReason.DOMID_TAKEN,
                f"domid {setup.domid} is held by {holder.name!r} on "
                f"{self.host.hostname}",
            )
        free = self.host.free_memory()
        if free < setup.memory_bytes:
            raise Refused(
                messages.RefuseReason.NOT_ENOUGH_MEMORY,
                f"{setup.memory_bytes} bytes needed, {free} free on "
                f"{self.host.hostname}",
            )

    def _report_arrived(self, restorer: Restorer, final: bool = False) -> None:
        """A PROGRESS event with how much of the guest's memory has
        arrived, at most every RECEIVE_REPORT_INTERVAL (and once at the
        end of the stream): the destination's side of the progress
        display. Channel threads race here harmlessly: at worst one
        report too many."""
        now = time.monotonic()
        if not self._memory_bytes or (
            not final
            and (
                now - self._reported_at < RECEIVE_REPORT_INTERVAL
                # Nothing that is not needed while the guest is paused.
                or self.state.phase is not Phase.PRECOPY
            )
        ):
            return
        self._reported_at = now
        total = self._memory_bytes
        arrived = min(total, restorer.arrived() * libxc.PAGE_SIZE)
        self.state.report(
            EventKind.PROGRESS,
            memory={
                "memory_total": total,
                "memory_processed": arrived,
                "memory_remaining": total - arrived,
            },
        )

    def _receive(self, restorer: Restorer) -> None:
        """Apply the stream until its end and the source's flush after
        it. A dropped connection is resumed: the source sends again what
        came after the last whole frame applied here."""
        decoder = stream_decoder.Decoder("libxl")
        while True:
            try:
                event = self._channel.receive()
                if isinstance(event, messages.DataHeader):
                    seq = event.seq
                    event = _read_frame(self._channel, event, restorer)
                    if event is None:
                        self._applied = seq
                        self._report_arrived(restorer)
                        continue
                if isinstance(event, messages.Data) and not len(event.payload):
                    self._channel.send(messages.Ack(seq=event.seq))
                    self._applied = event.seq
                    if restorer.done:
                        return
                    continue
            except TransportError as exc:
                if self._data_error is not None:
                    raise self._data_error from exc
                self._await_resume(exc)
                continue
            if isinstance(event, messages.Abort):
                raise MigrationAborted(event.reason)
            if isinstance(event, messages.Error):
                raise EngineError(f"source failed: {event.code}: {event.text}")
            if not isinstance(event, messages.Data):
                raise ProtocolError(
                    f"unexpected {type(event).__name__} in the stream"
                )
            if restorer.done:
                raise ProtocolError("data after the end of the stream")
            if event.pages:
                restorer.page_record(event.payload)
                self._applied = event.seq
                self._report_arrived(restorer)
                continue
            decoder.feed(event.payload)
            for record in decoder.records():
                if restorer.stopped is False and self._stops(record):
                    self.state.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
                restorer.apply(record)
            self._applied = event.seq
            if restorer.done:
                self._report_arrived(restorer, final=True)
                self.state.transition(Phase.STOP_AND_COPY, Phase.RESTORE)

    def _serve_data(self, index: int, restorer: Restorer) -> None:
        """Data channel ``index``: page batches, each applied as it comes
        (a round's pages are distinct, so channels never race for a
        page), and the flush that ends each round, acknowledged once all
        before it is applied."""
        channel = self._data[index]
        while True:
            try:
                event = channel.receive()
                seq = getattr(event, "seq", None)
                if isinstance(event, messages.DataHeader):
                    event = _read_frame(channel, event, restorer)
                if event is None:
                    # A page batch, read straight into guest memory.
                    self._data_applied[index] = seq
                    self._report_arrived(restorer)
                    continue
                if not isinstance(event, messages.Data):
                    raise ProtocolError(
                        f"{type(event).__name__} on data channel {index}"
                    )
                if not len(event.payload):
                    channel.send(messages.Ack(seq=event.seq))
                elif not event.pages:
                    raise ProtocolError(
                        f"stream records on data channel {index}: only "
                        "page batches travel there"
                    )
                else:
                    restorer.page_record(event.payload)
                    self._report_arrived(restorer)
                self._data_applied[index] = event.seq
            except TransportError as exc:
                channel.close()
                if self._transfer_over.is_set() or self.state.phase not in (
                    Phase.PRECOPY,
                    Phase.STOP_AND_COPY,
                ):
                    # The stream is complete: the source closed it.
                    return
                try:
                    channel = self._accept_resume(index, exc)
                except (EngineError, OSError) as again:
                    LOG.debug("Data channel %d ends: %s", index, again)
                    return
                self._data[index] = channel
            except Exception as exc:
                # The control channel's thread raises it: waking it with
                # a shut-down socket is the one way to reach it promptly.
                LOG.error(
                    "Migration %s: data channel %d failed: %s",
                    self.migration_id,
                    index,
                    exc,
                )
                self._data_error = exc
                channel.close()
                control = self._channel
                if control is not None:
                    with contextlib.suppress(OSError):
                        control.sock.shutdown(socket.SHUT_RD)
                return

    def _await_resume(self, cause: Exception) -> None:
        """The source reconnects with RESUME after a dropped connection;
        frames are whole or not applied, so the stream goes on."""
        self._close_channel()
        self._channel = self._accept_resume(0, cause)

    def _accept_resume(self, index: int, cause: Exception) -> Channel:
        """The new connection of channel ``index``, which dropped.

        One thread at a time accepts, for every dropped channel: a
        connection resuming another channel is handed to that channel's
        thread.
        """
        LOG.warning(
            "Migration %s: channel %d lost in %s (%s); waiting for the "
            "source to resume",
            self.migration_id,
            index,
            self.state.phase,
            cause,
        )
        wait = self.opts.transfer_retry_timeout
        if self.state.phase is not Phase.PRECOPY:
            # The source gives up when its downtime budget is spent.
            wait = min(wait, self.opts.downtime_budget)
        deadline = time.monotonic() + wait
        with self._resume:
            self._dropped.add(index)
            self.listener.allow()
            while True:
                channel = self._resumed.pop(index, None)
                if channel is not None:
                    return channel
                left = deadline - time.monotonic()
                if left <= 0 or self._transfer_over.is_set():
                    self._dropped.discard(index)
                    raise TransportError(
                        f"channel {index} was not resumed within {wait}s"
                    )
                if not self._accepting:
                    self._accepting = True
                    break
                self._resume.wait(left)
        try:
            while True:
                if self._transfer_over.is_set():
                    raise TransportError("the transfer is over")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"channel {index} was not resumed within {wait}s"
                    )
                # Short waits: the stream may end while this one waits.
                self.listener.accept_timeout = min(left, 0.2)
                try:
                    channel = self._accept_resumed()
                except TransportError:
                    if time.monotonic() < deadline:
                        continue
                    raise
                except Refused:
                    # Refused and told (a channel that is not waiting
                    # yet): the source tries again.
                    continue
                with self._resume:
                    self._dropped.discard(channel.connection.hello.channel)
                    if channel.connection.hello.channel == index:
                        return channel
                    self._resumed[channel.connection.hello.channel] = channel
                    self._resume.notify_all()
        finally:
            with self._resume:
                self._accepting = False
                self._dropped.discard(index)
                self._resume.notify_all()

    def _accept_resumed(self) -> Channel:
        """Accept a connection that RESUMEs a dropped channel."""

        def token_for(hello: messages.Hello) -> bytes:
            if hello.channel not in self._dropped:
                raise Refused(
                    messages.RefuseReason.BAD_REQUEST,
                    f"channel {hello.channel} is not waiting to resume",
                )
            return self._token_for(hello)

        def resume_from(hello: messages.Hello, resume: messages.Resume) -> int:
            if hello.channel == 0:
                return self._applied
            return self._data_applied[hello.channel]

        channel, _, proof = self._accept_channel(
            token_for, _DATA_CAPABILITIES, resume_from
        )
        if not isinstance(proof, messages.Resume):
            channel.close()
            raise ProtocolError("expected RESUME of the dropped channel")
        return channel

    def _end_transfer(self) -> None:
        """No channel resumes any more; the data channels close."""
        self._transfer_over.set()
        with self._resume:
            self._resume.notify_all()
        for channel in list(self._data.values()):
            channel.close()
        for thread in self._data_threads:
            # Each wakes within a short accept wait or a closed socket.
            thread.join(timeout=5.0)
        with self._resume:
            resumed, self._resumed = self._resumed, {}
        for channel in resumed.values():
            channel.close()

    @staticmethod
    def _stops(record: Record) -> bool:
        return record.layer == libxc.LAYER and record.name in _REQUIRED

    def _restore(self, restorer: Restorer) -> None:
        # Memory and platform were digested before the PV import (if
        # there was one): all RAM is hashed once in the downtime.
        items = [
            i
            for i in needed_items(restorer.pv_drivers)
            if i.value not in self._platform_digests
        ]
        digests = guest_digests(
            self.host.guest_state(self.domid, items), items
        )
        digests.update(self._platform_digests)
        self._channel.send(messages.Ready(digest=format_digests(digests)))
        self._ready_sent = True

    def _commit(self) -> None:
        try:
            if self._running:
                self.host.unpause(self.domid)
        except base.HostError as exc:
            self.error = exc
            LOG.error(
                "Migration %s: the guest cannot run here after COMMIT: %s",
                self.migration_id,
                exc,
            )
            self.state.transition(
                Phase.COMMIT, Phase.IN_DOUBT, reason=f"unpause failed: {exc}"
            )
            self._tell_source("unpause", str(exc))
            return
        self.state.transition(Phase.COMMIT, Phase.CLEANUP)
        try:
            self._channel.send(messages.Committed())
            # The source's final acknowledgement, once it recorded the
            # outcome; without it, it may ask (commit query).
            self._channel.sock.settimeout(self.opts.io_timeout)
            reply = self._channel.receive()
            self._source_knows = isinstance(reply, messages.Finished)
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: no acknowledgement of COMMITTED: %s",
                self.migration_id,
                exc,
            )
        self.state.transition(Phase.CLEANUP, Phase.DONE)

    # -- rollback and queries --

    def _rollback(self, error: BaseException) -> None:
        self.error = error
        # An abort is the source's own decision: it needs no answer.
        self._source_knows = isinstance(error, MigrationAborted)
        LOG.warning(
            "Migration %s: destination rolls back in %s: %s",
            self.migration_id,
            self.state.phase,
            error,
        )
        self.state.transition(
            self.state.phase, Phase.ROLLBACK, reason=str(error)
        )
        torn_down = not self._created
        if self._created:
            try:
                self.host.destroy_domain(self.domid)
                torn_down = True
            except base.HostError as exc:
                LOG.error(
                    "Migration %s: could not destroy domain %s: %s",
                    self.migration_id,
                    self.domid,
                    exc,
                )
        if not isinstance(error, (MigrationAborted, Refused, TransportError)):
            self._tell_source(type(error).__name__, str(error))
        self.state.transition(
            Phase.ROLLBACK,
            Phase.CANCELLED
            if isinstance(error, MigrationAborted)
            else Phase.FAILED,
            reason=str(error),
        )
        if torn_down and self._channel is not None:
            # The fence: the source resumes its copy once it has this
            # (or once the lease it gave this side ran out), and says so.
            try:
                self._channel.send(self._status())
                if not self._source_knows:
                    self._channel.sock.settimeout(self.opts.io_timeout)
                    reply = self._channel.receive()
                    self._source_knows = isinstance(reply, messages.Finished)
            except (EngineError, OSError, ValueError) as exc:
                LOG.debug("Teardown not confirmed to the source: %s", exc)

    def _tell_source(self, code: str, text: str) -> None:
        if self._channel is None:
            return
        try:
            self._channel.send(
                messages.Error(code=code, text=text[: messages.MAX_TEXT])
            )
        except (EngineError, OSError, ValueError) as exc:
            LOG.debug("Could not report the failure to the source: %s", exc)

    def _serve_queries(self) -> None:
        """After READY the source may not know the outcome: answer its
        commit query (commit.py) on new connections, each on a thread of
        its own, until it acknowledges or the commit query window ends;
        the journal keeps the answer for a restarted source after that."""
        self._close_channel()
        answerer = commit.Answerer(
            self.listener,
            self.migration_id,
            self._token,
            self.conf,
            self._status,
            self.journal.forget,
        )
        answerer.serve(time.monotonic() + self.opts.commit_query_timeout)

    def _status(self) -> messages.Status:
        phase = self.state.phase
        return messages.Status(phase=phase.value, committed=phase in _RUNNING)

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
