"""The destination side of a live migration, and restoring a stream.

:class:`Restorer` applies the records of one guest's stream to an empty
domain of a :class:`~nova_xen_ncm.host.base.HostDriver`: pages as they
arrive, then TSC, HVM context and params, and at the end of the stream
the PV state (:mod:`nova_xen_ncm.engine.pvstate`). Live migration and
restore from file use it alike.

:class:`Receiver` serves one incoming migration (ARCHITECTURE.md section
5): it authenticates the source with the one-time token, refuses early
what it cannot restore, reserves the domid, applies the stream, reports a
digest of the guest-visible state (READY) and unpauses the guest only on
COMMIT. Before COMMIT any failure destroys the domain it created.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import protocol
from nova_xen_ncm.engine import pvstate
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
from nova_xen_ncm.progress.model import ProgressSink
from nova_xen_ncm.stream import decoder as stream_decoder
from nova_xen_ncm.stream import encoder as stream_encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream.records import Record

LOG = logging.getLogger(__name__)

_PLATFORM_ITEMS = (base.Item.MEMORY, base.Item.PLATFORM, base.Item.HVM_PARAMS)
# The libxc records a restore must have seen (an HVM guest is not whole
# without them).
_REQUIRED = ("X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS")


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
        pfns = np.asarray(value.pfns, dtype=np.uint64)
        has_data = value.has_data
        alloc = np.asarray(value.types) == libxc.XALLOC
        self.host.populate(self.domid, pfns)
        seen = self._mark(pfns)
        data_pfns = pfns[has_data]
        if len(data_pfns):
            src = memoryview(value.data)
            with self.host.map_pages(
                self.domid, data_pfns, writable=True
            ) as mapping:
                for i, page in enumerate(mapping.pages):
                    off = i * libxc.PAGE_SIZE
                    page[:] = src[off : off + libxc.PAGE_SIZE]
        cleared = pfns[alloc & seen]
        if len(cleared):
            with self.host.map_pages(
                self.domid, cleared, writable=True
            ) as mapping:
                for page in mapping.pages:
                    page[:] = bytes(libxc.PAGE_SIZE)
        self.pages += len(pfns)

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
            state = self._pv.result().to_pv_state(self._params)
            if self._before_pv_import is not None:
                self._before_pv_import()
            self.host.import_pv_state(self.domid, state)
        self.done = True


_HANDLERS = {
    (libxl.LAYER, "LIBXC_CONTEXT"): Restorer._ignore,
    (libxc.LAYER, "STATIC_DATA_END"): Restorer._ignore,
    (libxc.LAYER, "PAGE_DATA"): Restorer._page_data,
    (libxc.LAYER, "X86_TSC_INFO"): Restorer._tsc_info,
    (libxc.LAYER, "HVM_CONTEXT"): Restorer._hvm_context,
    (libxc.LAYER, "HVM_PARAMS"): Restorer._hvm_params,
    (libxc.LAYER, "END"): Restorer._libxc_end,
    (libxl.LAYER, "END"): Restorer._libxl_end,
}


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
    ) -> None:
        if conf is None:
            from nova_xen_ncm.conf import CONF as conf
        self.conf = conf
        self.opts = conf.xen_ncm
        self.host = host
        self.migration_id = migration_id
        self._token = token
        self.listener = listener or Listener.from_conf(conf, expected=1)
        self.state = MigrationState(migration_id, Role.DESTINATION, sinks)
        self.domid: int | None = None
        #: The failure that ended the migration, if any.
        self.error: BaseException | None = None
        self._channel: Channel | None = None
        self._created = False
        # SETUP's word on whether the guest ran on the source.
        self._running = True
        self._ready_sent = False
        self._source_knows = False
        # Highest data frame applied: where a resumed channel goes on.
        self._applied = 0
        # Digests of the items complete before the PV state is imported.
        self._platform_digests: dict[str, str] = {}

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    @property
    def connected(self) -> bool:
        """Whether a source has completed the handshake."""
        return self._channel is not None

    def run(self) -> Phase:
        try:
            self._accept()
            restorer = self._setup()
            self._receive(restorer)
            self._restore(restorer)
            message = self._channel.receive()
            if isinstance(message, protocol.Abort):
                raise MigrationAborted(message.reason)
            if not isinstance(message, protocol.Commit):
                raise ProtocolError(
                    f"expected COMMIT, got {type(message).__name__}"
                )
            self.state.transition(Phase.RESTORE, Phase.COMMIT)
        except Exception as exc:
            self._rollback(exc)
        else:
            self._commit()
        if self._ready_sent and not self._source_knows:
            self._serve_queries()
        self._close_channel()
        self.listener.close()
        return self.state.phase

    # -- phases --

    def _token_for(self, hello: protocol.Hello) -> bytes:
        if hello.migration_id != self.migration_id:
            raise Refused(
                protocol.RefuseReason.UNKNOWN_MIGRATION,
                f"no incoming migration {hello.migration_id!r} here",
            )
        return self._token

    def _handshake(self) -> Channel:
        channel = Channel.accept(
            self.listener,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
        )
        try:
            channel.server_handshake(
                self._token_for,
                capabilities=[protocol.Capability.LZ4.value],
            )
        except BaseException:
            channel.close()
            raise
        return channel

    def _accept(self) -> None:
        self._channel = self._handshake()

    def _setup(self) -> Restorer:
        setup = self._channel.receive()
        if not isinstance(setup, protocol.Setup):
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
            try:
                self.host.create_empty_domain(config, setup.domid)
            except base.DomidInUse as exc:
                raise Refused(
                    protocol.RefuseReason.DOMID_TAKEN, str(exc)
                ) from exc
            except base.InsufficientMemory as exc:
                raise Refused(
                    protocol.RefuseReason.NOT_ENOUGH_MEMORY, str(exc)
                ) from exc
        except Refused as exc:
            self._channel.send(
                protocol.SetupReply(
                    accepted=False,
                    domid=setup.domid,
                    code=exc.code,
                    text=exc.text[: protocol.MAX_TEXT],
                )
            )
            raise
        self._created = True
        self.domid = setup.domid
        self._running = setup.running
        self._channel.send(
            protocol.SetupReply(
                accepted=True, domid=setup.domid, code="", text=""
            )
        )
        self.state.transition(
            Phase.SETUP, Phase.PRECOPY, detail={"domid": setup.domid}
        )
        return Restorer(
            self.host,
            setup.domid,
            pv_drivers=setup.pv_drivers,
            before_pv_import=self._digest_platform,
        )

    def _digest_platform(self) -> None:
        # Memory as the source paused it: a reconnecting backend may then
        # answer in-flight requests into the ring pages.
        self._platform_digests = guest_digests(
            self.host.guest_state(self.domid), _PLATFORM_ITEMS
        )

    def _check(self, setup: protocol.Setup) -> None:
        """Refuse before anything moves (ARCHITECTURE.md section 2)."""
        caps = self.host.capabilities()
        missing = dict(caps.missing(setup.pv_drivers))
        for name in setup.required:
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
            raise Refused(protocol.RefuseReason.MISSING_CAPABILITY, text)
        try:
            holder = self.host.domain_info(setup.domid)
        except base.DomainNotFound:
            pass
        else:
            raise Refused(
                protocol.RefuseReason.DOMID_TAKEN,
                f"domid {setup.domid} is held by {holder.name!r} on "
                f"{self.host.hostname}",
            )
        free = self.host.free_memory()
        if free < setup.memory_bytes:
            raise Refused(
                protocol.RefuseReason.NOT_ENOUGH_MEMORY,
                f"{setup.memory_bytes} bytes needed, {free} free on "
                f"{self.host.hostname}",
            )

    def _receive(self, restorer: Restorer) -> None:
        """Apply the stream until its end and the source's flush after
        it. A dropped connection is resumed: the source sends again what
        came after the last whole frame applied here."""
        decoder = stream_decoder.Decoder("libxl")
        while True:
            try:
                event = self._channel.receive()
                if isinstance(event, protocol.Data) and not len(event.payload):
                    self._channel.send(protocol.Ack(seq=event.seq))
                    self._applied = event.seq
                    if restorer.done:
                        return
                    continue
            except TransportError as exc:
                self._await_resume(exc)
                continue
            if isinstance(event, protocol.Abort):
                raise MigrationAborted(event.reason)
            if isinstance(event, protocol.Error):
                raise EngineError(f"source failed: {event.code}: {event.text}")
            if not isinstance(event, protocol.Data):
                raise ProtocolError(
                    f"unexpected {type(event).__name__} in the stream"
                )
            if restorer.done:
                raise ProtocolError("data after the end of the stream")
            decoder.feed(event.payload)
            for record in decoder.records():
                if restorer.stopped is False and self._stops(record):
                    self.state.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
                restorer.apply(record)
            self._applied = event.seq
            if restorer.done:
                self.state.transition(Phase.STOP_AND_COPY, Phase.RESTORE)

    def _await_resume(self, cause: Exception) -> None:
        """The source reconnects with RESUME after a dropped connection;
        frames are whole or not applied, so the stream goes on."""
        LOG.warning(
            "Migration %s: connection lost in %s (%s); waiting for the "
            "source to resume",
            self.migration_id,
            self.state.phase,
            cause,
        )
        self._close_channel()
        self.listener.allow()
        wait = self.opts.transfer_retry_timeout
        if self.state.phase is not Phase.PRECOPY:
            # The source gives up when its downtime budget is spent.
            wait = min(wait, self.opts.downtime_budget)
        self.listener.accept_timeout = wait
        channel = Channel.accept(
            self.listener,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
        )
        try:
            _, proof = channel.server_handshake(
                self._token_for,
                capabilities=[protocol.Capability.LZ4.value],
                resume_from=lambda hello, resume: self._applied,
            )
            if not isinstance(proof, protocol.Resume):
                raise ProtocolError("expected RESUME of the dropped channel")
        except BaseException:
            channel.close()
            raise
        self._channel = channel

    @staticmethod
    def _stops(record: Record) -> bool:
        return record.layer == libxc.LAYER and record.name in _REQUIRED

    def _restore(self, restorer: Restorer) -> None:
        digests = guest_digests(
            self.host.guest_state(self.domid),
            needed_items(restorer.pv_drivers),
        )
        digests.update(self._platform_digests)
        self._channel.send(protocol.Ready(digest=format_digests(digests)))
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
            self._channel.send(protocol.Committed())
            closed = self._channel.next_event()
            # The source closes once it has COMMITTED.
            self._source_knows = isinstance(closed, protocol.ConnectionClosed)
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: COMMITTED may not have reached the source: %s",
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
        if not isinstance(error, (MigrationAborted, Refused, TransportError)):
            self._tell_source(type(error).__name__, str(error))
        if self._created:
            try:
                self.host.destroy_domain(self.domid)
            except base.HostError as exc:
                LOG.error(
                    "Migration %s: could not destroy domain %s: %s",
                    self.migration_id,
                    self.domid,
                    exc,
                )
        self.state.transition(
            Phase.ROLLBACK,
            Phase.CANCELLED
            if isinstance(error, MigrationAborted)
            else Phase.FAILED,
            reason=str(error),
        )

    def _tell_source(self, code: str, text: str) -> None:
        if self._channel is None:
            return
        try:
            self._channel.send(
                protocol.Error(code=code, text=text[: protocol.MAX_TEXT])
            )
        except (EngineError, OSError, ValueError) as exc:
            LOG.debug("Could not report the failure to the source: %s", exc)

    def _serve_queries(self) -> None:
        """After READY the source may not know the outcome: answer its
        QUERY on new connections for the commit query window."""
        self._close_channel()
        deadline = time.monotonic() + self.opts.commit_query_timeout
        while time.monotonic() < deadline:
            self.listener.allow()
            self.listener.accept_timeout = max(
                0.1, deadline - time.monotonic()
            )
            try:
                channel = self._handshake()
            except (EngineError, OSError) as exc:
                LOG.debug("No commit query: %s", exc)
                return
            with channel:
                try:
                    query = channel.receive()
                    if not isinstance(query, protocol.Query):
                        continue
                    phase = self.state.phase
                    channel.send(
                        protocol.Status(
                            phase=phase.value, committed=phase in _RUNNING
                        )
                    )
                except (EngineError, OSError) as exc:
                    LOG.debug("Commit query failed: %s", exc)
                    continue
            # Answered: the source knows the outcome.
            return

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
