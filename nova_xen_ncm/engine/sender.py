"""The source side of a live migration.

:class:`Sender` runs one live migration (architecture.rst section 5):
SETUP, PRECOPY rounds decided by a policy, STOP_AND_COPY, RESTORE (the
destination's digest of the guest-visible state compared with ours) and
the two-phase COMMIT, every phase change through the state machine's one
transition function. Before COMMIT any failure rolls back and the guest
runs on here; after COMMIT the guest is never resumed here on a guess.

The guest's stream is built by :mod:`.guest_stream`, carried by the
channels of :mod:`.datapath`, and committed by :mod:`.commit`'s
coordinator; what is left here is the order of the phases and the undo
list of what this side changed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import datapath
from nova_xen_ncm.engine import digest
from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import policy as policies
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.datapath import expect
from nova_xen_ncm.engine.digest import guest_digests
from nova_xen_ncm.engine.digest import needed_items
from nova_xen_ncm.engine.errors import CancelRequested
from nova_xen_ncm.engine.errors import DevicesChanged
from nova_xen_ncm.engine.errors import DigestMismatch
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import FeaturesChanged
from nova_xen_ncm.engine.errors import MigrationAborted
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import RemoteError
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.guest_stream import GuestStream
from nova_xen_ncm.engine.guest_stream import RunBatch
from nova_xen_ncm.engine.state import MigrationState
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.state import Role
from nova_xen_ncm.engine.stats import MigrationStats
from nova_xen_ncm.engine.switchover import SwitchoverHistory
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressSink
from nova_xen_ncm.stream.records import Buffers

# A batch of a round: pfns, or runs of round 0's (GuestStream.cut).
Batch = np.ndarray | RunBatch

LOG = logging.getLogger(__name__)

_LIFT_THROTTLE = "lift the throttle"


@dataclasses.dataclass(frozen=True)
class _Undo:
    """One change of this side's, and how to undo it."""

    what: str
    action: Callable[[], Any]
    #: The guest's own pause or quiesced backends: undone only once the
    #: destination's copy is fenced off, and left as is in doubt.
    guest: bool = False


class Sender:
    """Migrates guest ``domid`` of ``host`` to the destination listening at
    ``endpoint``, authenticated with the one-time ``token``.

    ``source_address``: the address this host announced to the
    destination (which admits it only); every connection leaves from it.

    :meth:`run` does the whole migration in the calling thread and returns
    the final phase; :meth:`cancel` and :meth:`force_complete` may be
    called from any other thread and take effect within one round.

    ``switchover``: the fixed part of the pause measured on earlier
    migrations (its owner's); the policy loaded from ``conf`` takes the
    larger of it and ``[xen_ncm] switchover_estimate`` off its target,
    and a migration that ends here adds its own.
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
        source_address: str | None = None,
        switchover: SwitchoverHistory | None = None,
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
        self._history = switchover
        params = policies.PolicyParams.from_conf(conf)
        if switchover is not None:
            params = dataclasses.replace(
                params,
                switchover_estimate=max(
                    params.switchover_estimate,
                    switchover.estimate(endpoint[0], params.downtime_target),
                ),
                pause_page_cost=switchover.page_cost(endpoint[0]),
            )
        #: The fixed part of the pause the policy was told.
        self.switchover_estimate = params.switchover_estimate
        #: The cost of a page in the pause the policy was told (seconds).
        self.pause_page_cost = params.pause_page_cost
        # The target a refusal is told to the history for (its own and
        # shorter ones then forget the longest fixed part).
        self._downtime_target = params.downtime_target
        self.policy = policy or policies.load_policy(
            self.opts.precopy_policy, params
        )
        #: The decision that ended precopy, and the pages it left.
        self.stop_decision: policies.Decision | None = None
        self._stop_pages = 0
        #: The policy refused the pause it expected (an ABORT decision).
        self._refused = False
        self._warned_unmet = False
        self.info = host.domain_info(domid)
        # What a restarted engine needs to settle this migration
        # (recovery.py), written as part of every transition.
        store = journal.Journal.from_conf(conf)
        store.check_id(migration_id)
        # COMMIT is not sent unmarked: refused here, not in the pause.
        store.check_marks(migration_id)
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
                source_address=source_address or "",
            ),
            # Durable before the pause, STOP_AND_COPY covers RESTORE:
            # recovery settles both alike. COMMIT is appended before the
            # COMMIT message goes: a restarted engine that finds no
            # COMMIT knows COMMIT never went, and resumes its copy once
            # the destination's lease ran out, reachable or not. Its
            # sync runs while COMMIT travels (not in the pause): only a
            # crash of this host loses an append, and it takes the copy
            # here with it, so nothing resumes on that entry (recovery
            # asks the destination, recovery._after_reboot). A failed
            # sync may let the page cache drop it: the mark written on
            # tmpfs before it (Journal.mark) makes a restart of this
            # boot ask the destination too.
            lazy={Phase.RESTORE: Phase.STOP_AND_COPY},
            sync_behind=frozenset({Phase.COMMIT}),
        )
        self.state = MigrationState(
            migration_id,
            Role.SOURCE,
            sinks,
            journal=self.journal.on_transition,
        )
        # Channel 0 carries control messages and the stream's records;
        # page batches are shared out over all channels.
        self.data = datapath.DataPath(
            conf,
            endpoint,
            migration_id,
            token,
            count=self.opts.channels,
            clock=clock,
            source_address=source_address,
        )
        self.coordinator = commit.Coordinator(
            conf,
            self.data,
            commit.CommitQuery(
                conf, endpoint, migration_id, token, source_address
            ),
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
        self._progress_lock = threading.Lock()
        # What this side changed for the migration, undone in reverse on
        # rollback (the one undo list).
        self._undo: list[_Undo] = []
        # Round 0's populated pfns as runs (a few words, where the pfns
        # are 8 octets a page: 16 MiB at 8 GiB, held for the migration).
        self._sent_populated = base.PfnRuns.of(np.zeros(0, dtype=np.uint64))
        # The host's populated runs last looked at, and its pfns not in
        # round 0's (_added_since_round_0).
        self._seen_populated: base.PfnRuns | None = None
        self._added = np.zeros(0, dtype=np.uint64)
        # Numbered stream records on channel 0 not acknowledged yet.
        self._unacked: list[tuple[int, Buffers]] = []
        self._last_progress = clock()
        # Digests of the paused guest's visible state, for READY's.
        self._digests: dict[str, str] | None = None
        # The optional PV features SETUP named (None: not reported).
        self._features: frozenset[base.GuestFeature] | None = None

    def _copy_pages(self, index: int) -> bool:
        """Whether pages sent on channel ``index`` must be copied first:
        when its frames carry a tag, and unless the guest is paused and
        nothing else writes its memory (no PV backends), a page may
        change between its tag and the socket write. Untagged frames
        (inside TLS, whose records seal what the write reads, or
        unauthenticated ones) need no snapshot: a page written meanwhile
        goes as the write read it and is marked dirty, to go again (or,
        at the pause, to fail the memory digest's proof). Decided per
        channel, from what that connection negotiated."""
        channel = self.data.channels[index]
        tagged = channel is None or channel.connection.frames_tagged
        return (self._running or self.info.pv_drivers) and tagged

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
                self.stop_decision = decision
                self._stop_pages = len(pending)
                self._stop_and_copy(decision, pending)
                self._restore()
                # Journalled as part of the transition: written before
                # COMMIT goes out (synced while it travels), or no
                # COMMIT at all.
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
        self.data.shutdown()
        self.stats.finish()
        self._learn_switchover()
        return self.state.phase

    def _learn_switchover(self) -> None:
        """Add this migration's fixed part of the pause to the history:
        the downtime less the transfer its policy expected."""
        stop, downtime = self.stop_decision, self.stats.actual_downtime
        if self._history is not None and self._refused:
            # Refused for what earlier pauses measured: no pause here
            # to measure, so the history is told, lest it refuse for good.
            self._history.refused(self.endpoint[0], self._downtime_target)
            return
        if (
            self._history is None
            or self.state.phase is not Phase.DONE
            or stop is None
            or stop.expected_pause is None
            or downtime is None
        ):
            return
        transfer = (
            stop.parts.measured_transfer
            if stop.parts is not None
            else max(0.0, stop.expected_pause - self.switchover_estimate)
        )
        fixed = self._history.record(
            self.endpoint[0],
            downtime,
            transfer,
            pages=self._stop_pages,
            fixed_floor=self.switchover_estimate,
        )
        LOG.debug(
            "Migration %s: paused %.3fs, %s of it fixed",
            self.migration_id,
            downtime,
            "unknown" if fixed is None else f"{fixed:.3f}s",
        )

    def _required(self, pv_drivers: bool) -> tuple[str, ...]:
        """The items the guest needs, and the optional PV features it
        uses (base.GuestFeature), for the destination to refuse what it
        cannot restore at SETUP rather than in the downtime."""
        names = [i.value for i in needed_items(pv_drivers)]
        definition = self.host.capabilities().memory_digest
        if definition:
            names.append(digest.MEMORY_DIGEST + definition)
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

    def _check_devices(self) -> None:
        """A guest's frontend may reconnect with several queues during
        pre-copy (netfront and blkfront do so on their own), which the
        export would refuse inside the downtime. Asked again right
        before the pause, by the predicate SETUP applied: the migration
        is abandoned with the guest still running here."""
        if not self.info.pv_drivers:
            return
        try:
            self.host.check_devices(self.domid)
        except base.NotSupported as exc:
            raise DevicesChanged(
                f"{exc}: the guest changed the device during pre-copy; "
                "abandoned before the pause, the guest runs on here"
            ) from exc

    def _setup(self) -> None:
        self._check_source()
        info = self.info
        # The destination's device model needs the kernel again.
        boot = self.host.direct_boot(self.domid)
        # And its backends the guest's devices, created with the domain.
        try:
            devs = (
                self.host.guest_devices(self.domid) if info.pv_drivers else ()
            )
        except base.NotSupported as exc:
            raise Refused(
                messages.RefuseReason.MISSING_CAPABILITY.value, str(exc)
            ) from exc
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.CONNECT)
        self.data.channels[0] = retry.call(
            self.data.connect,
            what=f"connect to {self.endpoint[0]}:{self.endpoint[1]}",
            budget=budget,
            on_retry=self._on_retry,
        )
        control = self.data.control
        self.data.compress = (
            self.opts.compression == "lz4"
            and messages.Capability.LZ4.value
            in control.connection.capabilities
        )
        if boot is not None and (control.connection.version or 0) < 2:
            # Its SETUP has no room for the kernel, without which its
            # device model could not load the guest's.
            raise Refused(
                messages.RefuseReason.MISSING_CAPABILITY.value,
                f"the destination speaks migration protocol version "
                f"{control.connection.version}, which cannot carry the "
                f"guest's directly booted kernel {boot.kernel!r}: upgrade "
                "it to this release",
            )
        if devs and (control.connection.version or 0) < 3:
            raise Refused(
                messages.RefuseReason.MISSING_CAPABILITY.value,
                f"the destination speaks migration protocol version "
                f"{control.connection.version}, which cannot name the "
                f"guest's PV devices ({len(devs)}): upgrade it to this "
                "release",
            )
        control.send(
            messages.Setup(
                domid=self.domid,
                name=info.name,
                uuid=info.uuid,
                memory_bytes=info.memory_bytes,
                vcpus=info.vcpus,
                pv_drivers=info.pv_drivers,
                required=self._required(info.pv_drivers),
                running=self._running,
                channels=self.data.count,
                kernel=boot.kernel if boot else None,
                ramdisk=boot.ramdisk if boot else None,
                cmdline=boot.cmdline if boot else None,
                devices=tuple(
                    json.dumps(
                        {
                            "kind": d.kind,
                            "devid": d.devid,
                            "mac": d.mac,
                            "extra": dict(d.extra),
                        },
                        sort_keys=True,
                    )
                    for d in devs
                ),
            )
        )
        reply = expect(control.receive(), messages.SetupReply)
        if not reply.accepted:
            raise Refused(reply.code, reply.text)
        if reply.domid != self.domid:
            raise ProtocolError(
                f"destination reserved domid {reply.domid}, not {self.domid}"
            )
        for index in range(1, self.data.count):
            self.data.channels[index] = retry.call(
                functools.partial(self.data.connect, index=index),
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

    def _precopy(self) -> tuple[policies.Decision, np.ndarray]:
        """Rounds until the policy says stop; returns its decision and
        the pages dirtied in the last round, not sent yet."""
        # Kept until a round's flush acknowledged it: a resumed control
        # channel may need it again.
        start = self.data.control.connection.last_seq + 1
        self._unacked = [(start, self.stream.start())]
        self.data.send_numbered(0, self._unacked, pages=False)
        self.host.enable_log_dirty(self.domid)
        self._push(
            "stop log-dirty",
            functools.partial(self.host.disable_log_dirty, self.domid),
        )
        # Round 0 goes by runs, cut into batches a chunk at a time
        # (GuestStream.cut): no list of every populated pfn.
        pfns: np.ndarray | base.PfnRuns = self.host.populated_runs(self.domid)
        self._sent_populated = pfns
        while True:
            start = self._clock()
            pages, zero, nbytes = self._transfer_round(pfns)
            # The harvest before the physmap: a page populated (again)
            # and written between the two is then in the physmap read,
            # or written after the harvest and in the next one. Read
            # the other way, its write was harvested and dropped as not
            # populated, and it is not new since round 0 if it was
            # there then: never sent again.
            harvest = self.host.harvest_dirty(self.domid)
            populated = self.host.populated_runs(self.domid)
            self._added_since_round_0(populated)
            dirty = populated.members(harvest)
            rnd = self.stats.record_round(
                pages_sent=pages - zero,
                bytes_sent=nbytes,
                zero_pages=zero,
                dirty_pages=len(dirty),
                duration=self._clock() - start,
            )
            # The round's arrays are freed: their pages go back before
            # the next round allocates its own. Not in the round's
            # duration, which the policy reads as the link's rate (the
            # first trim after much was freed takes tens of ms).
            base.release_freed_memory()
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
            if decision.target_unmet:
                self._report_unmet(rnd.round, decision)
            if decision.action is policies.Action.ABORT:
                self._refused = decision.target_unmet
                raise MigrationAborted(decision.reason)
            if decision.action is policies.Action.STOP_AND_COPY:
                return decision, dirty
            if decision.action is policies.Action.THROTTLE:
                self.host.set_vcpu_throttle(self.domid, decision.throttle)
                if not any(u.what == _LIFT_THROTTLE for u in self._undo):
                    self._push(_LIFT_THROTTLE, self._lift_throttle)
                self.stats.record_throttle(decision.throttle)
                self._emit(
                    EventKind.PROGRESS,
                    {"round": rnd.round, "throttle": decision.throttle},
                    reason=decision.reason,
                )
            pfns = dirty

    def _report_unmet(self, round_: int, decision: policies.Decision) -> None:
        """Tell the operator the downtime target cannot be met without
        stopping the guest's progress, with the pause expected. Warned
        once in the log (it is said on every round until the pause);
        every round's event carries the pause expected then."""
        if not self._warned_unmet:
            self._warned_unmet = True
            LOG.warning("Migration %s: %s", self.migration_id, decision.reason)
        self._emit(
            EventKind.PROGRESS,
            {
                "round": round_,
                "downtime_target_unmet": True,
                "expected_pause": decision.expected_pause,
                "expected_pause_parts": (
                    decision.parts.to_dict() if decision.parts else None
                ),
                "at_throttle": self.stats.throttle,
            },
            reason=decision.reason,
        )

    def _transfer_round(
        self, pfns: np.ndarray | base.PfnRuns
    ) -> tuple[int, int, int]:
        """Send a precopy round and have it acknowledged. A dropped
        connection is resumed from the last frame the destination
        applied (its WELCOME): the frames of the round are numbered up
        front, and only those after it go again."""
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER)
        count = self.data.count
        shares = self._numbered_shares(pfns)
        # What each frame carried (pages, zero pages, bytes), by channel
        # and sequence: a frame sent again counts once.
        carried: list[dict[int, tuple[int, int, int]]] = [
            {} for _ in range(count)
        ]
        done = [0]

        def share(index: int) -> None:
            if index == 0 and self._unacked:
                self.data.send_numbered(0, self._unacked, pages=False)
            first, batches = shares[index]
            missing = self._missing(index, first, batches)
            with self._progress_lock:
                done[0] += sum(len(b) for b in batches) - sum(
                    len(b) for b in missing
                )
            self._send_pages(
                pfns, share=missing, done=done, carried=carried[index]
            )
            self.data.flush_channel(index)

        def attempt() -> tuple[int, int, int]:
            self.data.reconnect()
            done[0] = 0
            self.data.on_channels(share)
            self._unacked = []
            sent = [v for frames in carried for v in frames.values()]
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

    def _numbered_shares(
        self, pfns: np.ndarray | base.PfnRuns
    ) -> list[tuple[int, list[Batch]]]:
        """The batches of ``pfns`` shared out over the channels, each
        share with the sequence of its first frame."""
        batches = self.stream.cut(pfns)
        count = self.data.count
        return [
            (
                self.data.channels[index].connection.last_seq + 1,
                batches[index::count],
            )
            for index in range(count)
        ]

    def _missing(
        self, index: int, first: int, batches: list[Batch]
    ) -> list[Batch]:
        """The batches of channel ``index``'s share (numbered from
        ``first``) that the destination has not applied: after a RESUME
        the connection goes on from what it applied."""
        applied = self.data.channels[index].connection.last_seq
        return batches[max(0, applied + 1 - first) :]

    def _decide(self) -> policies.Decision:
        return policies.decide(
            self.stats.precopy_stats(),
            self.policy,
            self.timeout,
            policies.TimeoutAction(self.opts.completion_timeout_action),
            force=self._force.is_set(),
        )

    def _stop_and_copy(
        self, decision: policies.Decision, pending: np.ndarray
    ) -> None:
        if self._running:
            # Outside the downtime still: no switch-over that the
            # export would refuse.
            self._check_devices()
        self.state.transition(
            Phase.PRECOPY, Phase.STOP_AND_COPY, reason=decision.reason
        )
        self._notify_stopping()
        if self._running:
            # What the host keeps of the digest is brought up to date
            # while the guest runs: at the pause only its last writes.
            self.host.settle_digest(self.domid)
            asked = self.stats.clock()
            self.host.pause_for_save(self.domid)
            # Only what was paused here is unpaused on rollback.
            self._push("unpause", self._unpause, guest=True)
            self.stats.paused(at=asked)
        self.data.deadline = self._clock() + self.opts.downtime_budget
        if self.info.pv_drivers:
            self.host.quiesce_backends(self.domid)
            self._push(
                "resume backends",
                functools.partial(self.host.resume_backends, self.domid),
                guest=True,
            )
            self._check_features()
        # State first, pages last: what the hypervisor writes to guest
        # memory while the guest is paused (event delivery into a
        # registered vcpu_info) up to the export is in the last harvest.
        platform = self.stream.platform()
        pv = None
        if self.info.pv_drivers:
            pv = self.stream.pv_records(self.info.uuid)
        end = self.stream.finish(pv)
        # The harvest before the physmap, as in a round.
        harvest = self.host.harvest_dirty(self.domid)
        populated = self.host.populated_runs(self.domid)
        # Nothing here in the guest's size while it is paused: the dirty
        # pages are looked up in the populated runs, and the pfns
        # populated since round 0 (never sent) were looked for by the
        # rounds, unless the p2m changed since the last one.
        dirty = populated.members(harvest)
        added = self._added_since_round_0(populated)
        final = base.pfn_union(pending, dirty, added)
        self._check_cancel()
        self._send_final(final, [platform, end])
        # Page data is all there: the data channels are done.
        for index in range(1, self.data.count):
            self.data.close(index)
        self.state.transition(Phase.STOP_AND_COPY, Phase.RESTORE)

    def _added_since_round_0(self, populated: base.PfnRuns) -> np.ndarray:
        """The pfns of ``populated`` (the host's runs) that round 0's
        lacked, found once per runs the host gives: each round looks
        while the guest runs, so that the pause compares nothing unless
        the p2m changed since the last round; the runs are compared, in
        time of their count, not of the guest's size."""
        if populated is self._sent_populated:
            return np.zeros(0, dtype=np.uint64)
        if populated is not self._seen_populated:
            self._added = populated.difference(self._sent_populated).pfns()
            self._seen_populated = populated
        return self._added

    def _notify_stopping(self) -> None:
        """STOPPING, once this side's stop-and-copy is durable: the
        destination syncs its own record of it while the guest is paused
        and the last pages travel, instead of after them. Not repeated
        on a dropped channel, which is resumed here (the round before is
        all acknowledged): a destination that did not get it records the
        phase on the stopped guest's first record."""
        control = self.data.control
        if (
            control is None
            or messages.Capability.STOP_NOTICE.value
            not in control.connection.capabilities
        ):
            return
        try:
            control.send(messages.Stopping())
        except TransportError as exc:
            LOG.info(
                "Migration %s: STOPPING not sent: %s",
                self.migration_id,
                exc,
            )
            self.data.close(0)
            # The destination may have the notice and then waits only
            # the stop-and-copy's resume_wait: no retry beyond it.
            budget = dataclasses.replace(
                retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER),
                seconds=retry.resume_wait(self.opts, stopping=True),
            )
            retry.call(
                self.data.reconnect,
                what="resume the control channel",
                budget=budget,
                on_retry=self._on_retry,
            )

    def _send_final(self, pfns: np.ndarray, records: list[Buffers]) -> None:
        """Send the stop-and-copy pages ``pfns`` over all channels, read
        from the paused guest a batch at a time as they go (no copy of
        them all: memory stays bounded however many there are), then
        (all of them acknowledged) the state ``records`` on channel 0,
        resuming a dropped connection from the last frame applied until
        the downtime budget is spent (then the migration rolls back)."""
        data = self.data
        shares = self._numbered_shares(pfns)
        first, batches = shares[0]
        state = list(enumerate(records, start=first + len(batches)))
        budget = retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER)

        def share(index: int) -> None:
            first, batches = shares[index]
            for batch in self.stream.batches(
                self._missing(index, first, batches),
                copy=self._copy_pages(index),
                reuse=True,
            ):
                data.send_batch(index, batch.buffers)
                self._check_cancel()
            if index:
                data.flush_channel(index)

        # Once every channel's share went out (the data channels' ones
        # acknowledged), a retry resumes channel 0 only: its own pages
        # not applied there go again (they are not acknowledged: frames
        # in flight when it dropped), then the state. The final flush's
        # sequence once sent.
        pages_done = [False]
        final_flush: list[int | None] = [None]

        def attempt() -> None:
            data.reconnect()
            # The PV state is imported at the stream's end: every page
            # must be in place by then, whichever channel carried it.
            again = pages_done[0]
            if not again:
                data.on_channels(share)
                pages_done[0] = True
            try:
                if again:
                    share(0)
                data.send_numbered(0, state, pages=False)
                if self._digests is None:
                    # While the destination applies what it got.
                    items = needed_items(self.info.pv_drivers)
                    self._digests = guest_digests(
                        self.host.guest_state(
                            self.domid, items, guest_records=False
                        ),
                        items,
                    )
                if self._flush_applied(final_flush[0]):
                    return
                final_flush[0] = data.control.connection.last_seq + 1
                data.flush()
            except TransportError:
                data.close(0)
                raise

        retry.call(
            attempt,
            what="stop-and-copy transfer",
            budget=budget,
            deadline=data.deadline,
            on_retry=self._on_retry,
        )

    def _flush_applied(self, seq: int | None) -> bool:
        """Whether the destination applied the final flush ``seq`` (its
        ACK was lost with the connection): the resumed channel goes on
        after it, and READY comes on the new connection."""
        if seq is None or self.data.control.connection.last_seq < seq:
            return False
        LOG.info(
            "Migration %s: the final flush was applied; its "
            "acknowledgement was lost with the connection",
            self.migration_id,
        )
        self.data.acked_by[0] = seq
        return True

    def _restore(self) -> None:
        ready = self._await_ready()
        theirs = digest.parse_digests(ready.digest)
        mine = self._digests
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ:
            raise DigestMismatch(
                f"guest-visible state differs on the destination: "
                f"{', '.join(differ)}"
            )

    def _await_ready(self) -> messages.Ready:
        """The destination's READY. A control channel that drops before
        it is resumed (RESUME, within the downtime budget): the
        destination, which waits for COMMIT until then, sends READY
        again on the new connection."""
        data = self.data

        def attempt() -> messages.Ready:
            if data.control is None:
                data.channels[0] = data.connect(
                    last_acked=data.acked_by[0], index=0
                )
            try:
                return expect(data.receive(), messages.Ready)
            except TransportError:
                data.close(0)
                raise

        return retry.call(
            attempt,
            what="wait for READY",
            budget=retry.RetryBudget.from_conf(self.conf, retry.Step.TRANSFER),
            deadline=data.deadline,
            on_retry=self._on_retry,
        )

    # -- commit --

    def _commit(self) -> None:
        verdict = self.coordinator.commit(on_retry=self._on_retry)
        if verdict.runs_there:
            self.stats.resumed()
            self.state.transition(
                Phase.COMMIT, Phase.CLEANUP, reason=verdict.reason
            )
            self._cleanup()
            if self.journal.written is Phase.CLEANUP:
                # Recorded here: the destination may forget.
                self.coordinator.acknowledge()
            self.state.transition(Phase.CLEANUP, Phase.DONE)
        elif verdict.runs_there is False:
            # The destination's authenticated word that the guest never
            # ran there and its copy is gone: it runs on here.
            self._rollback(RemoteError(verdict.reason), torn_down=True)
        else:
            # Paused here, backends quiesced: whether it runs there is
            # not known; recovery asks again, or an operator settles it.
            # What only served the migration is undone.
            self._run_undo(guest=False)
            self.state.transition(
                Phase.COMMIT, Phase.IN_DOUBT, reason=verdict.reason
            )
        self.data.close()

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
        acknowledge = self.coordinator.fence(
            error,
            fence=any(u.guest for u in self._undo),
            torn_down=torn_down,
            since=started,
        )
        # What only served the migration (the throttle, log-dirty) is
        # undone while the guest is still paused: it runs on here as it
        # ran before, not throttled for a moment.
        self._run_undo(guest=False)
        self._run_undo(guest=True)
        self.state.transition(
            Phase.ROLLBACK,
            Phase.CANCELLED if cancelled else Phase.FAILED,
            reason=str(error),
        )
        if acknowledge and self.journal.forgotten:
            # Recorded here, the guest running again: the destination,
            # which confirmed its teardown, may forget.
            self.coordinator.acknowledge()

    def _push(
        self, what: str, action: Callable[[], Any], *, guest: bool = False
    ) -> None:
        self._undo.append(_Undo(what, action, guest))

    def _run_undo(self, *, guest: bool) -> None:
        """Undo, last first, what this side changed; without ``guest``
        the guest's own pause and quiesced backends stay (in doubt)."""
        keep = []
        for undo in reversed(self._undo):
            if undo.guest and not guest:
                keep.append(undo)
                continue
            try:
                undo.action()
            except Exception as exc:
                LOG.error(
                    "Migration %s: could not %s: %s",
                    self.migration_id,
                    undo.what,
                    exc,
                )
        self._undo = keep[::-1]

    def _unpause(self) -> None:
        self.host.unpause(self.domid)
        self.stats.resumed()

    def _lift_throttle(self) -> None:
        self.stats.record_throttle(1.0)
        self.host.set_vcpu_throttle(self.domid, 1.0)

    # -- data path --

    def _cancelled(self) -> MigrationAborted:
        reason = self.state.cancel_reason
        return MigrationAborted(
            f"cancelled: {reason}" if reason else "cancelled"
        )

    def _check_cancel(self) -> None:
        if self.state.cancel_requested:
            raise self._cancelled()

    def _send_pages(
        self,
        pfns: np.ndarray | base.PfnRuns,
        *,
        share: list[Batch] | None = None,
        done: list[int] | None = None,
        carried: dict[int, tuple[int, int, int]] | None = None,
    ) -> tuple[int, int, int]:
        """Send the round of ``pfns``, or the ``share`` of its batches
        that falls to the calling thread's channel (the thread of channel
        0 reports progress; ``done`` counts the round's pages sent on all
        channels)."""
        if share is None:
            share = self.stream.cut(pfns)
        if done is None:
            done = [0]
        total = len(pfns)
        index = self.data.channel_index()
        pages = zero = nbytes = 0
        for batch in self.stream.batches(
            share, copy=self._copy_pages(index), reuse=True
        ):
            nbytes_batch = self.data.send_batch(index, batch.buffers)
            if carried is not None:
                seq = self.data.channels[index].connection.last_seq
                carried[seq] = (batch.pages, batch.zero_pages, nbytes_batch)
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
        reason: str | None = None,
    ) -> None:
        """A progress event in Nova's memory terms (stats.memory_progress);
        inside a round, ``done_pages`` of it were sent, ``left_pages``
        remain."""
        memory = self.stats.memory_progress()
        remaining = memory["memory_remaining"]
        if left_pages is not None:
            remaining = left_pages * base.PAGE_SIZE
        self.state.report(
            kind,
            reason=reason,
            detail=detail,
            memory={
                "memory_total": memory["memory_total"],
                "memory_processed": memory["memory_processed"]
                + done_pages * base.PAGE_SIZE,
                "memory_remaining": remaining,
            },
        )
