"""The destination side of a live migration.

:class:`Receiver` serves one incoming migration (architecture.rst section
5): it authenticates the source with the one-time token, refuses early
what it cannot restore, reserves the domid, applies the stream
(:class:`~nova_xen_ncm.engine.restorer.Restorer`), reports a digest of the
guest-visible state (READY) and unpauses the guest only on COMMIT. Before
COMMIT any failure destroys the domain it created."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterable

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import digest
from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.acceptor import Acceptor
from nova_xen_ncm.engine.digest import guest_digests
from nova_xen_ncm.engine.digest import needed_items
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import MigrationAborted
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.restorer import REQUIRED
from nova_xen_ncm.engine.restorer import Restorer
from nova_xen_ncm.engine.state import MigrationState
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.state import Role
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressSink
from nova_xen_ncm.stream import decoder as stream_decoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream.records import Record

LOG = logging.getLogger(__name__)

# Seconds between two reports of how much of the guest arrived; the
# sinks rate-limit again, this only keeps a fast stream from building
# events nobody shows.
RECEIVE_REPORT_INTERVAL = 0.1


def _read_frame(
    channel: Channel, header: messages.DataHeader, restorer: Restorer
) -> messages.Data | None:
    """Read the body of a data frame whose header came (direct mode).

    A page batch (flag PAGES) is applied to the restoring guest and None
    returned; any other body comes back as Data. Nothing of a frame
    reaches the guest before the frame is authenticated: a frame with a
    GMAC tag is read into a buffer of its own, its tag checked, and only
    then are its pages written (:meth:`Restorer.page_record`); only on a
    connection whose records TLS authenticated before handing them over
    (``tls-frames``), or where both ends chose untagged frames for an
    isolated network, are the pages read straight into the guest's
    (:meth:`Restorer.receive_pages`). Encrypted frames
    (``encrypted-frames``) are decrypted straight into the guest's pages
    too (:func:`_decrypt_frame`), their tag checked at the frame's end:
    a failure, or a break before the tag, raises before the next frame,
    the migration rolls back before COMMIT and the restoring domain,
    never run, is destroyed with what it got.
    """
    direct = header.pages and not channel.connection.frames_tagged
    if direct and channel.connection.frames_encrypted:
        _decrypt_frame(channel, header, restorer)
        return None
    if direct:
        restorer.receive_pages(header.length, channel.read_payload_into)
        body = None
    else:
        # A page frame is applied before the next one is read: its body
        # goes to the channel's buffer, reused (a fresh one of megabytes
        # costs a pass of page faults or zeroing before the read).
        body = (
            channel.frame_buffer(header.length)
            if header.pages
            else bytearray(header.length)
        )
        if header.length:
            channel.read_payload_into(memoryview(body))
    # Checks the tag, if the frame has one.
    end = channel.receive()
    if not isinstance(end, messages.DataEnd):
        raise ProtocolError(
            f"{type(end).__name__} inside data frame {header.seq}"
        )
    if direct:
        return None
    if header.pages:
        restorer.page_record(body)
        return None
    return messages.Data(seq=header.seq, payload=body)


def _decrypt_frame(
    channel: Channel, header: messages.DataHeader, restorer: Restorer
) -> None:
    """An encrypted page frame, decrypted into the guest's pages and then
    authenticated. Its pfns and contents were used before its tag: a
    frame altered on the path (GCM is malleable until then) wrote to
    pfns of the attacker's choosing. A connection that breaks before the
    tag holds may therefore not be resumed (a resume sends this frame's
    pages again, not the pfns it was made to write): the migration ends
    and the restoring domain, never run, is destroyed."""
    try:
        restorer.receive_pages(header.length, channel.read_payload_into)
        end = channel.receive()
    except TransportError as exc:
        raise AuthenticationError(
            f"DATA frame {header.seq}: the connection broke before its "
            "tag was checked, after its unauthenticated plaintext was "
            "decrypted into the restoring guest: an encrypted frame "
            f"cannot resume ({exc})"
        ) from exc
    if not isinstance(end, messages.DataEnd):
        raise ProtocolError(
            f"{type(end).__name__} inside data frame {header.seq}"
        )


# Phases in which the destination runs the guest.
_RUNNING = frozenset({Phase.CLEANUP, Phase.DONE})
# Seconds between two looks, while answering in the background, at
# whether an operator resolved the entry.
ANSWER_POLL = 1.0


#: What a migrating guest's device may name in SETUP, per kind.
DEVICE_EXTRA = {"vbd": ("target", "format"), "vif": ("bridge",)}


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
            # STOP_AND_COPY is synced while the last pages arrive and
            # keeps the answer from then on, so READY waits for no sync
            # of its own; CLEANUP's is made while COMMITTED goes (the
            # running guest tells a recovery as much).
            lazy={Phase.RESTORE: Phase.STOP_AND_COPY},
            background=frozenset({Phase.STOP_AND_COPY, Phase.CLEANUP}),
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
        # Set by close(): the answers in the background end.
        self._closing = threading.Event()
        #: Answers commit queries once run() returned, until the source
        #: acknowledges (None: nothing left to answer).
        self.answering: threading.Thread | None = None
        # Every connection of the port, authenticated and routed.
        self.acceptor: Acceptor | None = None
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
        """Serve the migration; returns its phase here once final and
        either the source acknowledged it or the commit query window
        (``commit_query_timeout``) passed. In the second case the port
        goes on answering in the background (:attr:`answering`) until
        the source acknowledges, an operator resolves the entry, or
        :meth:`close`."""
        self.acceptor = Acceptor(
            self.listener,
            self.migration_id,
            self._token,
            self.conf,
            status=self._status,
            on_finished=self.journal.forget,
            resume_from=self._resume_from,
        )
        answering = False
        try:
            answering = self._serve()
        finally:
            self.journal.close()
            self._close_channel()
            if answering:
                # Port and threads held until then: said, so that an
                # operator knows what keeps them.
                LOG.warning(
                    "Migration %s: the source has not acknowledged the "
                    "outcome (%s); port %d answers its commit queries "
                    "until it does or 'nova-xen-ncm recover --resolve %s'",
                    self.migration_id,
                    self.state.phase,
                    self.listener.port,
                    self.migration_id,
                )
                self.answering = threading.Thread(
                    target=self._answer_until_acknowledged,
                    name=f"migration-{self.migration_id}-answers",
                    daemon=True,
                )
                self.answering.start()
            else:
                self.acceptor.close()
                self.listener.close()
        return self.state.phase

    def close(self) -> None:
        """Stop answering commit queries (the engine stops; a restart
        answers from the journal)."""
        self._closing.set()
        self.listener.close()
        thread = self.answering
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _answer_until_acknowledged(self) -> None:
        """The outcome stays asked for (a source restarted after any
        delay, or one cut off longer than the window): answered on this
        port until the source's FINISHED, or until the entry is gone (an
        operator resolved it)."""
        store = self.journal.journal
        unreadable = False
        try:
            while not (self._closing.is_set() or self.listener.closed):
                if self.acceptor.finished.wait(ANSWER_POLL):
                    return
                try:
                    if store.read(self.migration_id) is None:
                        LOG.info(
                            "Migration %s: resolved; no more answers",
                            self.migration_id,
                        )
                        return
                except EngineError as exc:
                    # Said once, not at every look: the answer comes
                    # from memory meanwhile.
                    if not unreadable:
                        LOG.error(
                            "Migration %s: journal entry unreadable: %s",
                            self.migration_id,
                            exc,
                        )
                    unreadable = True
        finally:
            self.acceptor.close()
            self.listener.close()

    def _serve(self) -> bool:
        """The migration; True if the source may still ask (the answers
        go on after run())."""
        try:
            # Held for the migration's life: recovery leaves it alone.
            self.journal.open()
            self._accept()
            restorer = self._setup()
            try:
                self._receive(restorer)
            finally:
                restorer.stop_settling()
                self._end_transfer()
            message = self._await_commit(self._ready(restorer))
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
            return not (
                self.acceptor.finished.is_set() or self._closing.is_set()
            )
        # The source cannot be in doubt: nothing was created here, or it
        # said it knows.
        self.journal.forget()
        return False

    # -- phases --

    def _accept(self) -> None:
        """The source's control channel (acceptor.py)."""
        channel = self.acceptor.control(
            time.monotonic() + self.listener.accept_timeout
        )
        if channel is None:
            if self._stop_reason is not None:
                # Cancelled before any source connected.
                raise MigrationAborted(self._stop_reason)
            raise TransportError("the listener was closed")
        self._channel = channel

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
                boot=self._boot(setup),
                devices=self._devices(setup),
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
            except base.NotSupported as exc:
                # A device whose backend could not be created here.
                raise Refused(
                    messages.RefuseReason.MISSING_CAPABILITY,
                    f"{exc} on {self.host.hostname}",
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
        self.acceptor.expect_data(setup.channels)
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
        """Data channels 1..count-1 (in any order), each served in its
        own thread."""
        if count > 1:
            self._data = self.acceptor.data_channels(
                time.monotonic() + self.listener.accept_timeout
            )
            self._data_applied = dict.fromkeys(self._data, 0)
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
            self.host.guest_state(
                self.domid, digest.PLATFORM_ITEMS, guest_records=False
            ),
            digest.PLATFORM_ITEMS,
        )

    def _check(self, setup: messages.Setup) -> None:
        """Refuse before anything moves (architecture.rst section 2)."""
        caps = self.host.capabilities()
        missing = dict(caps.missing(setup.pv_drivers))
        features = {f.value for f in base.GuestFeature}
        theirs = None
        for name in setup.required:
            if name.startswith(digest.MEMORY_DIGEST):
                theirs = name[len(digest.MEMORY_DIGEST) :]
                continue
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
        ours = caps.memory_digest or None
        if theirs != ours:
            earlier = "an earlier release"
            missing["memory-digest"] = (
                f"the source digests memory as {theirs or earlier} does,"
                f" this destination as {ours or earlier} does: equal"
                " memory would compare unequal (both hosts must run"
                " releases that digest alike)"
            )
        version = (
            self._channel.connection.version or 0
            if setup.pv_drivers and caps.devices_named_at_setup
            else messages.PROTOCOL_VERSION
        )
        if version < 3:
            # What a previous release's destination refused the same
            # guest for: its devices would come with no backend here.
            missing[base.Item.PV_DEVICES] = (
                f"the source speaks migration protocol version {version},"
                " whose SETUP cannot name the guest's PV devices this"
                f" host's backends are created for: upgrade it to this"
                " release"
            )
        if not caps.preserve_domid:
            # The host's own reason (the Xen driver names the setting).
            missing[base.Item.DOMID] = (
                caps.restore.get(base.Item.DOMID)
                or "this host cannot choose domids"
            )
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

    def _boot(self, setup: messages.Setup) -> base.DirectBoot | None:
        """The directly booted kernel SETUP names, by its real paths on
        this host: the source chooses them and the device model serves
        their contents to the guest, so only files under
        ``[xen_ncm] direct_boot_dirs`` are taken."""
        if setup.kernel is None:
            return None
        boot = base.DirectBoot(setup.kernel, setup.ramdisk, setup.cmdline)
        try:
            return boot.confined(self.opts.direct_boot_dirs)
        except ValueError as exc:
            raise Refused(
                messages.RefuseReason.BAD_REQUEST,
                f"{exc} on {self.host.hostname} ([xen_ncm] "
                "direct_boot_dirs lists the directories allowed)",
            ) from None

    def _devices(self, setup: messages.Setup) -> tuple[base.DeviceConfig, ...]:
        """The PV devices SETUP names, whose backends this host creates
        with the domain: a disk only under ``[xen_ncm]
        migration_disk_dirs`` (by its real path: the source names it and
        the backend opens it for the guest), a vif only on a bridge of
        ``[xen_ncm] migration_bridges``. Whether each exists is the host
        driver's check (create_empty_domain)."""
        out = []
        roots = [os.path.realpath(d) for d in self.opts.migration_disk_dirs]
        for dev in setup.device_fields():
            extra = dict(dev["extra"])
            where = f"{dev['kind']} {dev['devid']}"
            # Nothing else of the source's reaches this host's device
            # configuration: a vif's own hotplug script, say, would run
            # as root here, a disk format other than raw would have
            # another backend open the file (and what it refers to).
            allowed = DEVICE_EXTRA[dev["kind"]]
            unknown = sorted(set(extra) - set(allowed))
            if unknown or extra.get("format", "raw") != "raw":
                raise Refused(
                    messages.RefuseReason.BAD_REQUEST,
                    f"{where}: {', '.join(unknown) or 'format'} "
                    f"{'is' if len(unknown) < 2 else 'are'} not taken "
                    f"from a source (a {dev['kind']} names only "
                    f"{' and '.join(allowed)}"
                    + (", format raw" if dev["kind"] == "vbd" else "")
                    + ")",
                )
            if dev["kind"] == "vbd":
                target = extra.get("target", "")
                real = os.path.realpath(target) if target else ""
                if not os.path.isabs(target) or not any(
                    os.path.commonpath([real, r]) == r for r in roots
                ):
                    raise Refused(
                        messages.RefuseReason.BAD_REQUEST,
                        f"{where}: disk {target!r} is outside the "
                        f"directories migrating disks may be in on "
                        f"{self.host.hostname} ([xen_ncm] "
                        f"migration_disk_dirs: {', '.join(roots) or 'none'})",
                    )
                extra["target"] = real
            else:
                bridge = extra.get("bridge")
                if bridge not in self.opts.migration_bridges:
                    raise Refused(
                        messages.RefuseReason.BAD_REQUEST,
                        f"{where}: bridge {bridge!r} is not one a migrating "
                        f"guest may join on {self.host.hostname} "
                        "([xen_ncm] migration_bridges: "
                        f"{', '.join(self.opts.migration_bridges) or 'none'})",
                    )
            out.append(
                base.DeviceConfig(
                    kind=dev["kind"],
                    devid=dev["devid"],
                    mac=dev["mac"],
                    extra=extra,
                )
            )
        return tuple(out)

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
                    if self._running and self.state.phase is Phase.PRECOPY:
                        # A round ended and the guest still runs there:
                        # what the round wrote is digested while the
                        # source harvests and sends the next, not in the
                        # pause.
                        restorer.settle_digest()
                    continue
            except TransportError as exc:
                if self._data_error is not None:
                    raise self._data_error from exc
                self._await_resume(exc)
                continue
            if isinstance(event, messages.Stopping):
                # The source pauses now: this side's record of it is
                # synced while the last pages come (the record's thread).
                # Nothing settled from here: the last pages come.
                restorer.stop_settling()
                if self.state.phase is Phase.PRECOPY:
                    self.state.transition(Phase.PRECOPY, Phase.STOP_AND_COPY)
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
                if (
                    self.state.phase is Phase.PRECOPY
                    and restorer.stopped is False
                    and self._stops(record)
                ):
                    restorer.stop_settling()
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
                # With its type and traceback: some exceptions have no
                # message (a bare AssertionError, MemoryError).
                LOG.error(
                    "Migration %s: data channel %d failed: %s: %s",
                    self.migration_id,
                    index,
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                )
                self._data_error = exc
                channel.close()
                control = self._channel
                if control is not None:
                    with contextlib.suppress(OSError):
                        control.sock.shutdown(socket.SHUT_RD)
                return

    def _await_resume(
        self, cause: Exception, over: threading.Event | None = None
    ) -> None:
        """The source reconnects with RESUME after a dropped connection;
        frames are whole or not applied, so the stream goes on."""
        self._close_channel()
        self._channel = self._accept_resume(0, cause, over)

    def _accept_resume(
        self,
        index: int,
        cause: Exception,
        over: threading.Event | None = None,
    ) -> Channel:
        """The new connection of channel ``index``, which dropped."""
        LOG.warning(
            "Migration %s: channel %d lost in %s (%s); waiting for the "
            "source to resume",
            self.migration_id,
            index,
            self.state.phase,
            cause,
        )
        # As long as the source's retries may last (retry.resume_wait).
        wait = retry.resume_wait(
            self.opts, stopping=self.state.phase is not Phase.PRECOPY
        )
        return self.acceptor.resumed(
            index,
            time.monotonic() + wait,
            self._transfer_over if over is None else over,
        )

    def _resume_from(self, index: int) -> int:
        """The highest frame applied on channel ``index``."""
        if index == 0:
            return self._applied
        return self._data_applied[index]

    def _end_transfer(self) -> None:
        """No channel resumes any more; the data channels close."""
        self._transfer_over.set()
        for channel in list(self._data.values()):
            channel.close()
        for thread in self._data_threads:
            # Each wakes within a short accept wait or a closed socket.
            thread.join(timeout=5.0)

    @staticmethod
    def _stops(record: Record) -> bool:
        return record.layer == libxc.LAYER and record.name in REQUIRED

    def _await_commit(self, ready: messages.Ready) -> messages.Message:
        """READY, then the source's next message (COMMIT, or ABORT).
        Until then the control channel may drop (the ACK of the final
        flush or READY lost): the source resumes it from the last frame
        applied here, within its downtime budget, and READY goes again on
        the new connection."""
        # Whether or not it arrives, the source may ask from now on.
        self._ready_sent = True
        while True:
            try:
                self._channel.send(ready)
                return self._channel.receive()
            except TransportError as exc:
                # The stream is complete: only channel 0 comes back.
                self._await_resume(exc, over=self._closing)

    def _ready(self, restorer: Restorer) -> messages.Ready:
        # Memory and platform were digested before the PV import (if
        # there was one): all RAM is hashed once in the downtime.
        items = [
            i
            for i in needed_items(restorer.pv_drivers)
            if i.value not in self._platform_digests
        ]
        digests = guest_digests(
            self.host.guest_state(self.domid, items, guest_records=False),
            items,
        )
        digests.update(self._platform_digests)
        return messages.Ready(digest=digest.format_digests(digests))

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
            if self._source_knows:
                self._confirm_finished()
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
                    if self._source_knows:
                        self._confirm_finished()
            except (EngineError, OSError, ValueError) as exc:
                LOG.debug("Teardown not confirmed to the source: %s", exc)

    def _confirm_finished(self) -> None:
        """The source's FINISHED is taken: the entry goes, and the STATUS
        tells the source it was not lost (commit.finish)."""
        self.journal.forget()
        self._channel.send(self._status())

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
        commit query (commit.py; the acceptor answers), until it
        acknowledges or the commit query window ends;
        the journal keeps the answer for a restarted source after that."""
        self._close_channel()
        until = time.monotonic() + self.opts.commit_query_timeout
        while not self.listener.closed:
            left = until - time.monotonic()
            if left <= 0 or self.acceptor.finished.wait(min(left, 0.2)):
                return

    def _status(self) -> messages.Status:
        phase = self.state.phase
        return messages.Status(phase=phase.value, committed=phase in _RUNNING)

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
