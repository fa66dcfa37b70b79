"""The source side of a live migration, and the stream of one guest.

:class:`GuestStream` turns a guest of a :class:`~nova_xen_ncm.host.base.
HostDriver` into the buffers of a libxl v2 stream with an embedded libxc
v3 stream (Xen's ``docs/specs/libxl-migration-stream.pandoc`` and
``libxc-migration-stream.pandoc``), in the order Xen's save loop writes
them (``tools/libs/guest/xg_sr_save.c``): headers, STATIC_DATA_END, page
batches, then X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS and the project's
non-cooperative records, END. Live migration and save to file use it
alike.

:class:`Sender` runs one live migration (architecture.rst section 5):
SETUP, PRECOPY rounds decided by a policy, STOP_AND_COPY, RESTORE (the
destination's digest of the guest-visible state compared with ours) and
the two-phase COMMIT, every phase change through the state machine's one
transition function. Before COMMIT any failure rolls back and the guest
runs on here; after COMMIT the guest is never resumed here on a guess.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import policy as policies
from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import CancelRequested
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import FeaturesChanged
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.receiver import guest_digests
from nova_xen_ncm.engine.receiver import needed_items
from nova_xen_ncm.engine.state import MigrationState
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.state import Role
from nova_xen_ncm.engine.stats import MigrationStats
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.model import ProgressSink
from nova_xen_ncm.stream import encoder as stream_encoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream.records import Buffers

LOG = logging.getLogger(__name__)

# Pages per PAGE_DATA record: Xen's MAX_BATCH_SIZE (xg_sr_common.h).
BATCH_PAGES = 1024

_ZERO_TYPE = np.uint8(libxc.XALLOC)
_DATA_TYPE = np.uint8(libxc.NOTAB)


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
        themselves, for a guest that cannot write them (paused, saving to
        a file). A running guest's pages are copied first: the frame's
        authentication tag is computed before the bytes are written, and
        the guest may change them in between. ``reuse`` copies every
        batch into the same buffer, for a caller done with a batch
        before it asks for the next.
        """
        pfns = np.asarray(pfns, dtype=np.uint64)
        return self.batches(
            base.iter_batches(pfns, self.batch_pages), copy=copy, reuse=reuse
        )

    def batches(
        self,
        batches: Iterable[np.ndarray],
        *,
        copy: bool = False,
        reuse: bool = False,
    ) -> Iterator[PageBatch]:
        """:meth:`pages` of pfn batches already cut (several threads may
        each send their share of a round)."""
        scratch: bytearray | None = None
        for batch in batches:
            batch = np.asarray(batch, dtype=np.uint64)
            # Host calls one at a time (base.HostDriver); the mapped pages
            # are read by each thread on its own.
            with self._host_lock:
                mapping = self.host.map_pages(self.domid, batch)
            try:
                runs = mapping.runs()
                if copy:
                    size = len(batch) * base.PAGE_SIZE
                    if not reuse or scratch is None or len(scratch) < size:
                        scratch = bytearray(size)
                    snapshot = memoryview(scratch)[:size]
                    pos = 0
                    for _, view in runs:
                        snapshot[pos : pos + view.nbytes] = view
                        pos += view.nbytes
                    runs = [(0, snapshot)]
                yield self._batch(batch, runs)
            finally:
                with self._host_lock:
                    mapping.close()

    def _batch(
        self, batch: np.ndarray, runs: list[tuple[int, memoryview]]
    ) -> PageBatch:
        """The PAGE_DATA record of ``batch`` whose contents are ``runs``
        (base.PageMapping.runs); the data goes as views of the runs, one
        per stretch of non-zero pages, so no page is copied here."""
        # Zero pages found a run at a time: a test per page costs more
        # than reading the batch.
        nonzero = np.concatenate(
            [base.nonzero_pages(view) for _, view in runs]
        )
        types = np.where(nonzero, _DATA_TYPE, _ZERO_TYPE).astype(np.uint8)
        data: list[memoryview] = []
        keep = np.flatnonzero(nonzero)
        if len(keep):
            firsts = np.array([first for first, _ in runs])
            run_start = np.zeros(len(batch), dtype=bool)
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


class MigrationAborted(EngineError):
    """The migration was cancelled, or the policy gave up."""


class _Halted(TransportError):
    """A channel stopped because another channel of the round failed; it
    is not broken itself."""


class RemoteError(EngineError):
    """The destination reported a failure (ERROR or ABORT)."""


class DigestMismatch(EngineError):
    """The destination's guest-visible state differs from the source's."""


def _expect(message: Any, kind: type) -> Any:
    if isinstance(message, messages.Error):
        raise RemoteError(
            f"destination failed: {message.code}: {message.text}"
        )
    if isinstance(message, messages.Abort):
        raise RemoteError(f"destination aborted: {message.reason}")
    if not isinstance(message, kind):
        raise ProtocolError(
            f"expected {kind.__name__}, got {type(message).__name__}"
        )
    return message


class Sender:
    """Migrates guest ``domid`` of ``host`` to the destination listening at
    ``endpoint``, authenticated with the one-time ``token``.

    :meth:`run` does the whole migration in the calling thread and returns
    the final phase; :meth:`cancel` and :meth:`force_complete` may be
    called from any other thread and take effect within one round.
    """

    def __init__(
        self,
        host: base.HostDriver,
        domid: int,
        endpoint: tuple[str, int],
        migration_id: str,
        token: bytes,
        *,
        conf: cfg.ConfigOpts | None = None,
        policy: policies.Policy | None = None,
        sinks: Iterable[ProgressSink] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if conf is None:
            from nova_xen_ncm.conf import CONF as conf
        self.conf = conf
        self.opts = conf.xen_ncm
        self.host = host
        self.domid = domid
        self.endpoint = endpoint
        self.migration_id = migration_id
        self.token = token
        self._clock = clock
        self.policy = policy or policies.load_policy(
            self.opts.precopy_policy, policies.PolicyParams.from_conf(conf)
        )
        self.info = host.domain_info(domid)
        # What a restarted engine needs to settle this migration
        # (recovery.py), written as part of every transition.
        store = journal.Journal.from_conf(conf)
        store.check_id(migration_id)
        self.journal = journal.Record(
            store,
            journal.Entry(
                migration_id=migration_id,
                domid=domid,
                host=endpoint[0],
                port=int(endpoint[1]),
                token=token.hex(),
                running=True,
                uuid=self.info.uuid,
                boot_id=host.boot_id(),
            ),
        )
        self.state = MigrationState(
            migration_id,
            Role.SOURCE,
            sinks,
            journal=self.journal.on_transition,
        )
        self.coordinator = commit.CommitQuery(
            conf, endpoint, migration_id, token
        )
        self.stats = MigrationStats(
            migration_id, self.info.memory_bytes, clock=clock
        )
        self.state.statistics = self.stats.to_dict
        self.stream = GuestStream(host, domid)
        # A paused guest is migrated paused and stays so: SETUP tells the
        # destination not to unpause it on COMMIT.
        self._running = True
        self.timeout = policies.completion_timeout(
            self.info.memory_bytes, self.opts.completion_timeout_per_gib
        )
        #: The failure that ended the migration, if any.
        self.error: BaseException | None = None
        self._force = threading.Event()
        # Channel 0 carries control messages and the stream's records;
        # page batches are shared out over all channels, each with its
        # own frame sequence and the highest frame acknowledged on it.
        self._channels: list[Channel | None] = [None] * self.opts.channels
        self._acked_by = [0] * self.opts.channels
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Set when a channel of a round failed: the others stop too.
        self._halt = threading.Event()
        self._thread_channel = threading.local()
        self._progress_lock = threading.Lock()
        self._compress = False
        self._log_dirty = False
        self._throttled = False
        self._paused = False
        self._quiesced = False
        self._sent_populated = np.zeros(0, dtype=np.uint64)
        # While paused: when the downtime budget is spent (clock time).
        self._deadline: float | None = None
        self._last_progress = clock()
        # Digests of the paused guest's visible state, for READY's.
        self._digests: dict[str, str] | None = None
        # The optional PV features SETUP named (None: not reported).
        self._features: frozenset[base.GuestFeature] | None = None

    @property
    def _channel(self) -> Channel | None:
        """The control channel (channel 0)."""
        return self._channels[0]

    @_channel.setter
    def _channel(self, channel: Channel | None) -> None:
        self._channels[0] = channel

    @property
    def _acked(self) -> int:
        return self._acked_by[0]

    @_acked.setter
    def _acked(self, seq: int) -> None:
        self._acked_by[0] = seq

    @property
    def _copy_pages(self) -> bool:
        """Whether pages must be copied before they are sent: unless the
        guest is paused and nothing else writes its memory (no PV
        backends), it may change a page between its authentication tag
        and the socket write."""
        return self._running or self.info.pv_drivers

    # -- control from other threads --

    def cancel(self, reason: str | None = None) -> bool:
        """Ask for a rollback; False once the commit decision was made.
        ``reason`` (say "interrupted by SIGINT") is what the rollback
        reports."""
        return self.state.request_cancel(reason)

    def force_complete(self) -> bool:
        """Stop and copy after the current round, whatever the downtime;
        False if precopy is already over."""
        if self.state.phase not in (Phase.SETUP, Phase.PRECOPY):
            return False
        self._force.set()
        return True

    # -- the migration --

    def run(self) -> Phase:
        try:
            try:
                # Held for the migration's life: recovery leaves it alone.
                self.journal.open()
                self._setup()
                decision, pending = self._precopy()
                self._stop_and_copy(decision, pending)
                self._restore()
                # Journalled as part of the transition: durable before
                # COMMIT goes out, or no COMMIT at all.
                self.state.transition(Phase.RESTORE, Phase.COMMIT)
            except CancelRequested:
                # The state machine's conflict is how the cancel was
                # noticed, not why: report the canceller's reason.
                self._rollback(self._cancelled())
            except Exception as exc:
                self._rollback(exc)
            else:
                self._commit()
        finally:
            self.journal.close()
        if self._pool is not None:
            self._pool.shutdown()
        self.stats.finish()
        return self.state.phase

    def _required(self, pv_drivers: bool) -> tuple[str, ...]:
        """The items the guest needs, and the optional PV features it
        uses (base.GuestFeature), for the destination to refuse what it
        cannot restore at SETUP rather than in the downtime."""
        names = [i.value for i in needed_items(pv_drivers)]
        if pv_drivers:
            try:
                features = self.host.guest_features(self.domid)
            except base.NotSupported as exc:
                LOG.info(
                    "Migration %s: %s; the destination's import checks them",
                    self.migration_id,
                    exc,
                )
            else:
                self._features = frozenset(features)
                names += sorted(f.value for f in features)
        return tuple(names)

    def _check_features(self) -> None:
        """Xen refuses a guest no hypercall because it is migrating, so a
        guest may start using an optional feature (FIFO events, grant v2,
        a third-domain channel or permission) during pre-copy. Checked
        again once paused, before anything of its state is exported: a
        feature SETUP did not name rolls the migration back and the guest
        resumes here."""
        if self._features is None:
            return
        added = self.host.guest_features(self.domid) - self._features
        if added:
            raise FeaturesChanged(
                "the guest started using "
                f"{', '.join(sorted(f.value for f in added))} after SETUP; "
                "rolled back before its state was exported"
            )

    def _setup(self) -> None:
        self._check_source()
        info = self.info
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.CONNECT)
        self._channel = retry.call(
            self._connect,
            what=f"connect to {self.endpoint[0]}:{self.endpoint[1]}",
            budget=budget,
            on_retry=self._on_retry,
        )
        self._compress = (
            self.opts.compression == "lz4"
            and messages.Capability.LZ4.value
            in self._channel.connection.capabilities
        )
        self._channel.send(
            messages.Setup(
                domid=self.domid,
                name=info.name,
                uuid=info.uuid,
                memory_bytes=info.memory_bytes,
                vcpus=info.vcpus,
                pv_drivers=info.pv_drivers,
                required=self._required(info.pv_drivers),
                running=self._running,
                channels=len(self._channels),
            )
        )
        reply = _expect(self._channel.receive(), messages.SetupReply)
        if not reply.accepted:
            raise Refused(reply.code, reply.text)
        if reply.domid != self.domid:
            raise ProtocolError(
                f"destination reserved domid {reply.domid}, not {self.domid}"
            )
        for index in range(1, len(self._channels)):
            self._channels[index] = retry.call(
                functools.partial(self._connect, index=index),
                what=f"connect data channel {index}",
                budget=budget,
                on_retry=self._on_retry,
            )
        # The destination holds an empty domain now: a cancel rolls it
        # back before any page moves.
        self._check_cancel()
        self.state.transition(
            Phase.SETUP,
            Phase.PRECOPY,
            detail={"domid": self.domid, "running": self._running},
        )

    def _check_source(self) -> None:
        """Refuse here what cannot work whatever the destination."""
        self.info = self.host.domain_info(self.domid)
        self._running = self.info.state == base.DomainState.RUNNING
        if self.info.state not in (
            base.DomainState.RUNNING,
            base.DomainState.PAUSED,
        ):
            raise EngineError(
                f"domain {self.domid} is {self.info.state.value}: live "
                "migration moves running or paused guests"
            )
        if not self.host.capabilities().log_dirty:
            raise EngineError(
                f"{self.host.hostname} cannot track dirty pages (log-dirty)"
            )

    def _connect(
        self, last_acked: int | None = None, index: int = 0
    ) -> Channel:
        """A new authenticated connection of channel ``index``;
        ``last_acked`` resumes the channel after a drop (RESUME instead
        of AUTH)."""
        caps = []
        if self.opts.compression == "lz4":
            caps.append(messages.Capability.LZ4.value)
        if len(self._channels) > 1:
            caps.append(messages.Capability.MULTI_CHANNEL.value)
        channel = Channel.connect(
            *self.endpoint,
            connect_timeout=self.opts.connect_timeout,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
            tls=transport.tls_context(self.conf, server=False),
        )
        try:
            channel.client_handshake(
                self.migration_id,
                self.token,
                channel=index,
                capabilities=caps,
                last_acked=last_acked,
            )
        except BaseException:
            channel.close()
            raise
        return channel

    def _precopy(self) -> tuple[policies.Decision, np.ndarray]:
        """Rounds until the policy says stop; returns its decision and
        the pages dirtied in the last round, not sent yet."""
        self._send(self.stream.start())
        self.host.enable_log_dirty(self.domid)
        self._log_dirty = True
        pfns = self.host.populated_pfns(self.domid)
        self._sent_populated = pfns
        while True:
            start = self._clock()
            pages, zero, nbytes = self._transfer_round(pfns)
            populated = self.host.populated_pfns(self.domid)
            dirty = base.pfn_intersection(
                self.host.harvest_dirty(self.domid), populated
            )
            rnd = self.stats.record_round(
                pages_sent=pages - zero,
                bytes_sent=nbytes,
                zero_pages=zero,
                dirty_pages=len(dirty),
                duration=self._clock() - start,
            )
            self._emit(EventKind.ROUND, rnd.to_dict())
            self._check_cancel()
            decision = self._decide()
            LOG.debug(
                "Migration %s round %d: %s %s",
                self.migration_id,
                rnd.round,
                decision.action.value,
                decision.reason,
            )
            if decision.action is policies.Action.ABORT:
                raise MigrationAborted(decision.reason)
            if decision.action is policies.Action.STOP_AND_COPY:
                return decision, dirty
            if decision.action is policies.Action.THROTTLE:
                self.host.set_vcpu_throttle(self.domid, decision.throttle)
                self._throttled = True
                self.stats.record_throttle(decision.throttle)
            pfns = dirty

    def _transfer_round(self, pfns: np.ndarray) -> tuple[int, int, int]:
        """Send a precopy round and have it acknowledged. A dropped
        connection is resumed and the round sent again: page data is
        idempotent, and the destination applies whole frames only."""
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER)

        batches = list(base.iter_batches(pfns, self.stream.batch_pages))
        count = len(self._channels)
        done = [0]

        def share(index: int) -> tuple[int, int, int]:
            sent = self._send_pages(
                pfns, share=batches[index::count], done=done
            )
            self._flush_channel(index)
            return sent

        def attempt() -> tuple[int, int, int]:
            self._reconnect()
            done[0] = 0
            sent = self._on_channels(share)
            return (
                sum(s[0] for s in sent),
                sum(s[1] for s in sent),
                sum(s[2] for s in sent),
            )

        return retry.call(
            attempt,
            what=f"precopy round {len(self.stats.rounds)}",
            budget=budget,
            on_retry=self._on_retry,
        )

    def _decide(self) -> policies.Decision:
        if self._force.is_set():
            return policies.Decision(
                policies.Action.STOP_AND_COPY, reason="force-complete"
            )
        stats = self.stats.precopy_stats()
        forced = policies.timeout_decision(
            stats,
            self.timeout,
            policies.TimeoutAction(self.opts.completion_timeout_action),
        )
        return forced or self.policy(stats)

    def _stop_and_copy(
        self, decision: policies.Decision, pending: np.ndarray
    ) -> None:
        self.state.transition(
            Phase.PRECOPY, Phase.STOP_AND_COPY, reason=decision.reason
        )
        if self._running:
            self.host.pause(self.domid)
            # Only what was paused here is unpaused on rollback.
            self._paused = True
            self.stats.paused()
        self._deadline = self._clock() + self.opts.downtime_budget
        if self.info.pv_drivers:
            self.host.quiesce_backends(self.domid)
            self._quiesced = True
            self._check_features()
        # State first, pages last: what the hypervisor writes to guest
        # memory while the guest is paused (event delivery into a
        # registered vcpu_info) up to the export is in the last harvest.
        platform = self.stream.platform()
        pv = None
        if self.info.pv_drivers:
            pv = self.stream.pv_records(self.info.uuid)
        end = self.stream.finish(pv)
        populated = self.host.populated_pfns(self.domid)
        dirty = base.pfn_intersection(
            self.host.harvest_dirty(self.domid), populated
        )
        # Pages populated since round 0 were never sent.
        added = base.pfn_difference(populated, self._sent_populated)
        final = base.pfn_union(pending, dirty, added)
        frames: list[Buffers] = []
        for batch in self.stream.pages(final, copy=True):
            frames.append(batch.buffers)
            self._check_cancel()
        self._send_final(frames, [platform, end])
        # Page data is all there: the data channels are done.
        for index in range(1, len(self._channels)):
            self._close_channel(index)
        self.state.transition(Phase.STOP_AND_COPY, Phase.RESTORE)

    def _send_final(
        self, pages: list[Buffers], records: list[Buffers]
    ) -> None:
        """Send the stop-and-copy page batches over all channels, then
        (all of them acknowledged) the state ``records`` on channel 0,
        resuming a dropped connection until the downtime budget is spent
        (then the migration rolls back)."""
        count = len(self._channels)
        # Numbered up front and kept until acknowledged, so that a resumed
        # connection sends exactly the frames the destination lacks.
        numbered = [
            list(
                enumerate(
                    pages[index::count],
                    start=self._channels[index].connection.last_seq + 1,
                )
            )
            for index in range(count)
        ]
        first = numbered[0][-1][0] + 1 if numbered[0] else None
        if first is None:
            first = self._channel.connection.last_seq + 1
        state = list(enumerate(records, start=first))
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER)

        def share(index: int) -> None:
            self._send_numbered(index, numbered[index], pages=True)
            if index:
                self._flush_channel(index)

        def attempt() -> None:
            self._reconnect()
            # The PV state is imported at the stream's end: every page
            # must be in place by then, whichever channel carried it.
            self._on_channels(share)
            try:
                self._send_numbered(0, state, pages=False)
                if self._digests is None:
                    # While the destination applies what it got.
                    items = needed_items(self.info.pv_drivers)
                    self._digests = guest_digests(
                        self.host.guest_state(self.domid, items), items
                    )
                self._flush()
            except TransportError:
                self._close_channel(0)
                raise

        retry.call(
            attempt,
            what="stop-and-copy transfer",
            budget=budget,
            deadline=self._deadline,
            on_retry=self._on_retry,
        )

    def _restore(self) -> None:
        ready = _expect(self._receive(), messages.Ready)
        theirs = _parse_digests(ready.digest)
        mine = self._digests
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ:
            raise DigestMismatch(
                f"guest-visible state differs on the destination: "
                f"{', '.join(differ)}"
            )

    # -- commit --

    def _commit(self) -> None:
        try:
            # Past the commit decision the downtime budget no longer
            # bounds the wait: the query settles what is not answered.
            self._channel.sock.settimeout(self.opts.io_timeout)
            self._channel.send(messages.Commit())
            _expect(self._channel.receive(), messages.Committed)
            verdict = commit.Verdict(
                True, "destination acknowledged", Phase.CLEANUP.value
            )
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: no acknowledgement of COMMIT (%s); asking "
                "the destination",
                self.migration_id,
                exc,
            )
            self._close_channel()
            verdict = self.coordinator.ask(on_retry=self._on_retry)
        if verdict.runs_there:
            self.stats.resumed()
            self.state.transition(
                Phase.COMMIT, Phase.CLEANUP, reason=verdict.reason
            )
            if self.journal.written is Phase.CLEANUP:
                # Recorded here: the destination may forget.
                self._acknowledge()
            self._cleanup()
            self.state.transition(Phase.CLEANUP, Phase.DONE)
        elif verdict.runs_there is False:
            # The destination's authenticated word that the guest never
            # ran there and its copy is gone: it runs on here.
            self._rollback(RemoteError(verdict.reason), torn_down=True)
            if self.journal.forgotten:
                self._acknowledge()
        else:
            # Paused here, backends quiesced: whether it runs there is
            # not known; recovery asks again, or an operator settles it.
            # What only served the migration is undone.
            if self._throttled:
                self._best_effort(
                    "lift the throttle",
                    self.host.set_vcpu_throttle,
                    self.domid,
                    1.0,
                )
            if self._log_dirty:
                self._best_effort(
                    "stop log-dirty", self.host.disable_log_dirty, self.domid
                )
            self.state.transition(
                Phase.COMMIT, Phase.IN_DOUBT, reason=verdict.reason
            )
        self._close_channel()

    def _acknowledge(self) -> None:
        """The final acknowledgement: FINISHED on the control channel, or
        on a new connection once it is gone."""
        channel = self._channel
        if channel is not None:
            try:
                channel.send(messages.Finished())
                return
            except (EngineError, OSError) as exc:
                LOG.info(
                    "Migration %s: FINISHED on the control channel: %s",
                    self.migration_id,
                    exc,
                )
                self._close_channel()
        self.coordinator.acknowledge()

    def _cleanup(self) -> None:
        try:
            self.host.destroy_domain(self.domid)
        except base.HostError as exc:
            LOG.error(
                "Migration %s: the source copy of domain %d could not be "
                "destroyed: %s",
                self.migration_id,
                self.domid,
                exc,
            )

    # -- rollback --

    def _rollback(
        self, error: BaseException, *, torn_down: bool = False
    ) -> None:
        """Undo on this side; ``torn_down``: the destination already
        said its copy is gone."""
        self.error = error
        cancelled = isinstance(error, MigrationAborted) or (
            self.state.cancel_requested
        )
        LOG.warning(
            "Migration %s rolls back in %s: %s",
            self.migration_id,
            self.state.phase,
            error,
        )
        started = time.monotonic()
        self.state.transition(
            self.state.phase, Phase.ROLLBACK, reason=str(error)
        )
        # Past the pause the destination may hold the whole guest, its
        # backends connected: this copy resumes only once that one is
        # gone (fencing).
        fence = self._paused or self._quiesced
        confirmed = torn_down
        if self._channel is not None:
            if isinstance(error, RemoteError):
                # The destination failed and destroys its copy; its
                # STATUS follows the ERROR.
                confirmed = self._await_teardown()
            elif not isinstance(error, Refused):
                told = self._best_effort(
                    "tell the destination",
                    self._channel.send,
                    messages.Abort(reason=str(error)[: messages.MAX_TEXT]),
                )
                if told and fence and not confirmed:
                    confirmed = self._await_teardown()
            if confirmed:
                self._best_effort(
                    "acknowledge the teardown",
                    self._channel.send,
                    messages.Finished(),
                )
            self._close_channel()
        if fence and not confirmed:
            confirmed = self._query_teardown(started)
        if fence and not confirmed:
            self._await_lease(started)
        if self._throttled:
            self._best_effort(
                "lift the throttle",
                self.host.set_vcpu_throttle,
                self.domid,
                1.0,
            )
            self.stats.record_throttle(1.0)
        if self._quiesced:
            self._best_effort(
                "resume backends", self.host.resume_backends, self.domid
            )
        if self._paused:
            if self._best_effort("unpause", self.host.unpause, self.domid):
                self.stats.resumed()
        if self._log_dirty:
            self._best_effort(
                "stop log-dirty", self.host.disable_log_dirty, self.domid
            )
        self.state.transition(
            Phase.ROLLBACK,
            Phase.CANCELLED if cancelled else Phase.FAILED,
            reason=str(error),
        )

    def _await_teardown(self) -> bool:
        """Whether the destination confirmed it destroyed its copy (a
        STATUS of a rolled back migration) within the lease."""
        deadline = time.monotonic() + commit.lease(self.conf)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._channel.sock.settimeout(left)
                message = self._channel.receive()
                if isinstance(message, messages.Status):
                    return message.phase in commit.NEVER_RAN
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: the destination did not confirm its "
                "teardown: %s",
                self.migration_id,
                exc,
            )
            return False

    def _query_teardown(self, since: float) -> bool:
        """Ask the destination (commit query) until it says its copy is
        gone or the lease given it ran out; acknowledges the answer."""
        deadline = since + commit.lease(self.conf)
        while time.monotonic() < deadline:
            try:
                status = self.coordinator.once()
            except (EngineError, OSError) as exc:
                LOG.debug("Teardown query: %s", exc)
                time.sleep(
                    min(
                        self.opts.retry_max_delay,
                        max(0.0, deadline - time.monotonic()),
                    )
                )
                continue
            if status.phase in commit.NEVER_RAN:
                self.coordinator.acknowledge()
                return True
            return False
        return False

    def _await_lease(self, since: float) -> None:
        """Keep the guest paused until a destination that heard nothing
        since ``since`` has destroyed its copy."""
        left = since + commit.lease(self.conf) - time.monotonic()
        if left > 0:
            LOG.warning(
                "Migration %s: teardown not confirmed; the guest resumes "
                "here in %.1fs, once the destination's lease ran out",
                self.migration_id,
                left,
            )
            time.sleep(left)

    def _best_effort(self, what: str, fn: Callable, *args: Any) -> bool:
        try:
            fn(*args)
        except Exception as exc:
            LOG.error(
                "Migration %s: could not %s: %s",
                self.migration_id,
                what,
                exc,
            )
            return False
        return True

    # -- data path --

    def _cancelled(self) -> MigrationAborted:
        reason = self.state.cancel_reason
        return MigrationAborted(
            f"cancelled: {reason}" if reason else "cancelled"
        )

    def _check_cancel(self) -> None:
        if self.state.cancel_requested:
            raise self._cancelled()

    def _bound_io(self, index: int = 0) -> None:
        """While the guest is paused, no socket call may outlast the
        downtime budget: past it the migration rolls back."""
        if self._deadline is None:
            return
        left = self._deadline - self._clock()
        if left <= 0:
            raise TransportError(
                f"downtime budget of {self.opts.downtime_budget}s spent"
            )
        self._channels[index].sock.settimeout(min(self.opts.io_timeout, left))

    def _receive(self) -> Any:
        self._bound_io()
        return self._channel.receive()

    def _send(self, buffers: Buffers, *, pages: bool = False) -> int:
        self._bound_io()
        seq = self._channel.connection.last_seq + 1
        return self._channel.send_data(
            seq, buffers, compress=self._compress, pages=pages
        )

    def _send_pages(
        self,
        pfns: np.ndarray,
        *,
        share: list[np.ndarray] | None = None,
        done: list[int] | None = None,
    ) -> tuple[int, int, int]:
        """Send the round of ``pfns``, or the ``share`` of its batches
        that falls to the calling thread's channel (the thread of channel
        0 reports progress; ``done`` counts the round's pages sent on all
        channels)."""
        if share is None:
            share = list(base.iter_batches(pfns, self.stream.batch_pages))
        if done is None:
            done = [0]
        total = len(pfns)
        index = self._channel_index()
        channel = self._channels[index]
        pages = zero = nbytes = 0
        for batch in self.stream.batches(
            share, copy=self._copy_pages, reuse=True
        ):
            if self._halt.is_set():
                raise _Halted("another channel of the round failed")
            self._bound_io(index)
            seq = channel.connection.last_seq + 1
            nbytes_batch = channel.send_data(
                seq, batch.buffers, compress=self._compress, pages=True
            )
            nbytes += nbytes_batch
            pages += batch.pages
            zero += batch.zero_pages
            self.stats.record_sent(
                pages=batch.pages - batch.zero_pages, nbytes=nbytes_batch
            )
            with self._progress_lock:
                done[0] += batch.pages
                so_far = done[0]
            self._check_cancel()
            now = self._clock()
            if (
                index == 0
                and now - self._last_progress >= self.opts.progress_interval
            ):
                self._last_progress = now
                self._emit(
                    EventKind.PROGRESS,
                    {"round": len(self.stats.rounds), "pages_done": so_far},
                    done_pages=so_far,
                    left_pages=total - so_far,
                )
        return pages, zero, nbytes

    def _send_numbered(
        self, index: int, frames: list[tuple[int, Buffers]], *, pages: bool
    ) -> None:
        """Send the numbered frames the destination lacks on channel
        ``index``."""
        channel = self._channels[index]
        applied = channel.connection.last_seq
        for seq, buffers in frames:
            if seq > applied:
                if self._halt.is_set():
                    raise _Halted("another channel failed")
                self._bound_io(index)
                channel.send_data(
                    seq, buffers, compress=self._compress, pages=pages
                )

    def _channel_index(self) -> int:
        return getattr(self._thread_channel, "index", 0)

    def _on_channels(self, work: Callable[[int], Any]) -> list[Any]:
        """``work(index)`` for every channel, in parallel: channel 0 on
        this thread, the others on the pool's (hashing and socket writes
        release the GIL). If one fails, the others stop at their next
        frame; a channel whose socket failed is closed, to be resumed.
        Raises the failure (a transport one last: it is retried)."""
        count = len(self._channels)

        def run(index: int) -> Any:
            self._thread_channel.index = index
            try:
                return work(index)
            except _Halted:
                raise
            except TransportError:
                self._close_channel(index)
                self._halt.set()
                raise
            except BaseException:
                self._halt.set()
                raise

        if count == 1:
            try:
                return [run(0)]
            finally:
                self._halt.clear()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=count - 1,
                thread_name_prefix=f"migration-{self.migration_id}-out",
            )
        futures = [self._pool.submit(run, i) for i in range(1, count)]
        results: list[Any] = []
        errors: list[BaseException] = []
        try:
            results.append(run(0))
        except BaseException as exc:
            errors.append(exc)
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:
                errors.append(exc)
        self._halt.clear()
        if errors:
            errors.sort(
                key=lambda e: (
                    isinstance(e, TransportError),
                    isinstance(e, _Halted),
                )
            )
            raise errors[0]
        return results

    def _reconnect(self) -> None:
        """Resume every channel that dropped: frames go on after the last
        one the destination applied (the connection numbers them from
        its resume_from)."""
        for index, channel in enumerate(self._channels):
            if channel is None:
                self._channels[index] = self._connect(
                    last_acked=self._acked_by[index], index=index
                )

    def _flush(self) -> None:
        """An empty DATA frame asks the destination to acknowledge all it
        applied: the end of a round, measured end to end."""
        self._flush_channel(0)

    def _flush_channel(self, index: int) -> None:
        self._bound_io(index)
        channel = self._channels[index]
        seq = channel.connection.last_seq + 1
        channel.send_data(seq, [])
        ack = _expect(channel.receive(), messages.Ack)
        if ack.seq != seq:
            raise ProtocolError(f"ACK of frame {ack.seq}, expected {seq}")
        self._acked_by[index] = seq

    def _close_channel(self, index: int | None = None) -> None:
        """Close channel ``index``, or all of them."""
        which = range(len(self._channels)) if index is None else [index]
        for i in which:
            channel, self._channels[i] = self._channels[i], None
            if channel is not None:
                channel.close()

    # -- reporting --

    def _on_retry(self, event: retry.RetryEvent) -> None:
        self.stats.record_retry()
        self._emit(
            EventKind.RETRY,
            {
                "what": event.what,
                "attempt": event.attempt,
                "delay": event.delay,
                "error": str(event.error),
            },
        )

    def _emit(
        self,
        kind: EventKind,
        detail: dict[str, Any],
        *,
        done_pages: int = 0,
        left_pages: int | None = None,
    ) -> None:
        """A progress event in Nova's memory terms (stats.memory_progress);
        inside a round, ``done_pages`` of it were sent, ``left_pages``
        remain."""
        memory = self.stats.memory_progress()
        remaining = memory["memory_remaining"]
        if left_pages is not None:
            remaining = left_pages * base.PAGE_SIZE
        self.state.progress.emit(
            ProgressEvent(
                migration_id=self.migration_id,
                kind=kind,
                phase=self.state.phase.value,
                timestamp=time.time(),
                role=Role.SOURCE.value,
                memory_total=memory["memory_total"],
                memory_processed=memory["memory_processed"]
                + done_pages * base.PAGE_SIZE,
                memory_remaining=remaining,
                detail=detail,
            )
        )


def _parse_digests(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        if part:
            name, _, digest = part.partition("=")
            out[name] = digest
    return out
