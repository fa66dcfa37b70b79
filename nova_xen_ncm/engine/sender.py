"""The source side of a live migration, and the stream of one guest.

:class:`GuestStream` turns a guest of a :class:`~nova_xen_ncm.host.base.
HostDriver` into the buffers of a libxl v2 stream with an embedded libxc
v3 stream (Xen's ``docs/specs/libxl-migration-stream.pandoc`` and
``libxc-migration-stream.pandoc``), in the order Xen's save loop writes
them (``tools/libs/guest/xg_sr_save.c``): headers, STATIC_DATA_END, page
batches, then X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS and the project's
non-cooperative records, END. Live migration and save to file use it
alike.

:class:`Sender` runs one live migration (ARCHITECTURE.md section 5):
SETUP, PRECOPY rounds decided by a policy, STOP_AND_COPY, RESTORE (the
destination's digest of the guest-visible state compared with ours) and
the two-phase COMMIT, every phase change through the state machine's one
transition function. Before COMMIT any failure rolls back and the guest
runs on here; after COMMIT the guest is never resumed here on a guess.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import policy as policies
from nova_xen_ncm.engine import protocol
from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.errors import CancelRequested
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import RetryExhausted
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.receiver import guest_digests
from nova_xen_ncm.engine.receiver import needed_items
from nova_xen_ncm.engine.state import TERMINAL
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
        self, pfns: np.ndarray, *, copy: bool = False
    ) -> Iterator[PageBatch]:
        """PAGE_DATA batches of ``pfns``. A zero page goes as XALLOC
        (populate, no data), so it costs 8 octets on the wire.

        Without ``copy`` the buffers are the guest's mapped pages
        themselves, for a guest that cannot write them (paused, saving to
        a file). A running guest's pages are copied first: the frame's
        authentication tag is computed before the bytes are written, and
        the guest may change them in between.
        """
        pfns = np.asarray(pfns, dtype=np.uint64)
        for batch in base.iter_batches(pfns, self.batch_pages):
            with self.host.map_pages(self.domid, batch) as mapping:
                pages = mapping.pages
                # One copy of the batch, tested for zero pages at once: a
                # test per page costs more than the copy.
                snapshot = memoryview(b"".join(pages))
                if copy:
                    pages = [
                        snapshot[i : i + base.PAGE_SIZE]
                        for i in range(0, len(snapshot), base.PAGE_SIZE)
                    ]
                nonzero = (
                    np.frombuffer(snapshot, dtype=np.uint64)
                    .reshape(len(batch), -1)
                    .any(axis=1)
                )
                types = np.where(nonzero, _DATA_TYPE, _ZERO_TYPE).astype(
                    np.uint8
                )
                data = [
                    p for p, keep in zip(pages, nonzero, strict=True) if keep
                ]
                yield PageBatch(
                    buffers=self.encoder.page_data(batch, types, data),
                    pages=len(batch),
                    zero_pages=len(batch) - len(data),
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


class RemoteError(EngineError):
    """The destination reported a failure (ERROR or ABORT)."""


class DigestMismatch(EngineError):
    """The destination's guest-visible state differs from the source's."""


class _NotYetKnown(TransportError):
    """The destination has not decided yet: ask again."""


def _expect(message: Any, kind: type) -> Any:
    if isinstance(message, protocol.Error):
        raise RemoteError(
            f"destination failed: {message.code}: {message.text}"
        )
    if isinstance(message, protocol.Abort):
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
        self.state = MigrationState(migration_id, Role.SOURCE, sinks)
        self.info = host.domain_info(domid)
        self.stats = MigrationStats(
            migration_id, self.info.memory_bytes, clock=clock
        )
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
        self._channel: Channel | None = None
        self._compress = False
        self._acked = 0
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

    # -- control from other threads --

    def cancel(self) -> bool:
        """Ask for a rollback; False once the commit decision was made."""
        return self.state.request_cancel()

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
            self._setup()
            decision, pending = self._precopy()
            self._stop_and_copy(decision, pending)
            self._restore()
            self.state.transition(Phase.RESTORE, Phase.COMMIT)
        except CancelRequested as exc:
            self._rollback(MigrationAborted(f"cancelled before commit: {exc}"))
        except Exception as exc:
            self._rollback(exc)
        else:
            self._commit()
        self.stats.finish()
        return self.state.phase

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
            and protocol.Capability.LZ4.value
            in self._channel.connection.capabilities
        )
        self._channel.send(
            protocol.Setup(
                domid=self.domid,
                name=info.name,
                uuid=info.uuid,
                memory_bytes=info.memory_bytes,
                vcpus=info.vcpus,
                pv_drivers=info.pv_drivers,
                required=tuple(i.value for i in needed_items(info.pv_drivers)),
                running=self._running,
            )
        )
        reply = _expect(self._channel.receive(), protocol.SetupReply)
        if not reply.accepted:
            raise Refused(reply.code, reply.text)
        if reply.domid != self.domid:
            raise ProtocolError(
                f"destination reserved domid {reply.domid}, not {self.domid}"
            )
        # The destination holds an empty domain now: a cancel rolls it
        # back before any page moves.
        self._check_cancel()
        self.state.transition(
            Phase.SETUP, Phase.PRECOPY, detail={"domid": self.domid}
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

    def _connect(self, last_acked: int | None = None) -> Channel:
        """A new authenticated connection; ``last_acked`` resumes the
        migration's channel after a drop (RESUME instead of AUTH)."""
        caps = []
        if self.opts.compression == "lz4":
            caps.append(protocol.Capability.LZ4.value)
        channel = Channel.connect(
            *self.endpoint,
            connect_timeout=self.opts.connect_timeout,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
        )
        try:
            channel.client_handshake(
                self.migration_id,
                self.token,
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
            dirty = np.intersect1d(
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

        def attempt() -> tuple[int, int, int]:
            if self._channel is None:
                # Frames go on after the last one the destination applied
                # (the connection numbers them from its resume_from).
                self._channel = self._connect(last_acked=self._acked)
            try:
                sent = self._send_pages(pfns)
                self._flush()
            except TransportError:
                self._close_channel()
                raise
            return sent

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
        # State first, pages last: what the hypervisor writes to guest
        # memory while the guest is paused (event delivery into a
        # registered vcpu_info) up to the export is in the last harvest.
        platform = self.stream.platform()
        pv = None
        if self.info.pv_drivers:
            pv = self.stream.pv_records(self.info.uuid)
        end = self.stream.finish(pv)
        populated = self.host.populated_pfns(self.domid)
        dirty = np.intersect1d(self.host.harvest_dirty(self.domid), populated)
        # Pages populated since round 0 were never sent.
        added = np.setdiff1d(populated, self._sent_populated)
        final = np.union1d(np.union1d(pending, dirty), added)
        # Numbered up front and kept until acknowledged, so that a resumed
        # connection sends exactly the frames the destination lacks.
        frames: list[Buffers] = []
        for batch in self.stream.pages(final, copy=True):
            frames.append(batch.buffers)
            self._check_cancel()
        frames += [platform, end]
        self._send_final(frames)
        self.state.transition(Phase.STOP_AND_COPY, Phase.RESTORE)

    def _send_final(self, frames: list[Buffers]) -> None:
        """Send the stop-and-copy frames and have them acknowledged,
        resuming a dropped connection until the downtime budget is spent
        (then the migration rolls back)."""
        first = self._channel.connection.last_seq + 1
        numbered = list(enumerate(frames, start=first))
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER)

        def attempt() -> None:
            if self._channel is None:
                self._channel = self._connect(last_acked=self._acked)
            applied = self._channel.connection.last_seq
            try:
                for seq, buffers in numbered:
                    if seq > applied:
                        self._bound_io()
                        self._channel.send_data(
                            seq, buffers, compress=self._compress
                        )
                if self._digests is None:
                    # While the destination applies what it got.
                    self._digests = guest_digests(
                        self.host.guest_state(self.domid),
                        needed_items(self.info.pv_drivers),
                    )
                self._flush()
            except TransportError:
                self._close_channel()
                raise

        retry.call(
            attempt,
            what="stop-and-copy transfer",
            budget=budget,
            deadline=self._deadline,
            on_retry=self._on_retry,
        )

    def _restore(self) -> None:
        ready = _expect(self._receive(), protocol.Ready)
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
            self._channel.send(protocol.Commit())
            _expect(self._channel.receive(), protocol.Committed)
            committed: bool | None = True
            why = "destination acknowledged"
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: no acknowledgement of COMMIT (%s); asking "
                "the destination",
                self.migration_id,
                exc,
            )
            self._close_channel()
            committed, why = self._query_commit()
        if committed:
            self.stats.resumed()
            self.state.transition(Phase.COMMIT, Phase.CLEANUP, reason=why)
            self._cleanup()
            self.state.transition(Phase.CLEANUP, Phase.DONE)
        else:
            # Paused here, backends quiesced: whether it runs there is
            # not known (or it does not and an operator must say where it
            # runs). What only served the migration is undone.
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
            self.state.transition(Phase.COMMIT, Phase.IN_DOUBT, reason=why)
        self._close_channel()

    def _query_commit(self) -> tuple[bool | None, str]:
        budget = retry.RetryBudget.from_conf(
            self.conf, retry.Step.COMMIT_QUERY
        )
        try:
            status = retry.call(
                self._query_once,
                what="commit query",
                budget=budget,
                on_retry=self._on_retry,
            )
        except (RetryExhausted, EngineError) as exc:
            return None, f"destination unreachable after COMMIT: {exc}"
        if status.committed:
            return True, "destination reported the guest running"
        return False, (
            f"destination did not commit (phase {status.phase}); the guest "
            "is paused on the source"
        )

    def _query_once(self) -> protocol.Status:
        channel = self._connect()
        try:
            channel.send(protocol.Query())
            status = _expect(channel.receive(), protocol.Status)
        finally:
            channel.close()
        if not status.committed and status.phase not in {
            p.value for p in TERMINAL
        }:
            raise _NotYetKnown(f"destination is in phase {status.phase}")
        return status

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

    def _rollback(self, error: BaseException) -> None:
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
        self.state.transition(
            self.state.phase, Phase.ROLLBACK, reason=str(error)
        )
        if self._channel is not None:
            if not isinstance(error, (RemoteError, Refused)):
                self._best_effort(
                    "tell the destination",
                    self._channel.send,
                    protocol.Abort(reason=str(error)[: protocol.MAX_TEXT]),
                )
            self._close_channel()
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

    def _check_cancel(self) -> None:
        if self.state.cancel_requested:
            raise MigrationAborted("cancelled")

    def _bound_io(self) -> None:
        """While the guest is paused, no socket call may outlast the
        downtime budget: past it the migration rolls back."""
        if self._deadline is None:
            return
        left = self._deadline - self._clock()
        if left <= 0:
            raise TransportError(
                f"downtime budget of {self.opts.downtime_budget}s spent"
            )
        self._channel.sock.settimeout(min(self.opts.io_timeout, left))

    def _receive(self) -> Any:
        self._bound_io()
        return self._channel.receive()

    def _send(self, buffers: Buffers) -> int:
        self._bound_io()
        seq = self._channel.connection.last_seq + 1
        return self._channel.send_data(seq, buffers, compress=self._compress)

    def _send_pages(self, pfns: np.ndarray) -> tuple[int, int, int]:
        pages = zero = nbytes = 0
        for batch in self.stream.pages(pfns, copy=True):
            nbytes += self._send(batch.buffers)
            pages += batch.pages
            zero += batch.zero_pages
            self._check_cancel()
            now = self._clock()
            if now - self._last_progress >= self.opts.progress_interval:
                self._last_progress = now
                self._emit(
                    EventKind.PROGRESS,
                    {"round": len(self.stats.rounds), "pages_done": pages},
                    done_pages=pages,
                    left_pages=len(pfns) - pages,
                )
        return pages, zero, nbytes

    def _flush(self) -> None:
        """An empty DATA frame asks the destination to acknowledge all it
        applied: the end of a round, measured end to end."""
        self._bound_io()
        seq = self._channel.connection.last_seq + 1
        self._channel.send_data(seq, [])
        ack = _expect(self._receive(), protocol.Ack)
        if ack.seq != seq:
            raise ProtocolError(f"ACK of frame {ack.seq}, expected {seq}")
        self._acked = seq

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
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
