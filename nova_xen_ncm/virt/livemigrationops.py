"""Live migration through Nova's hooks, on the project's engine.

The destination starts an :class:`~nova_xen_ncm.engine.migration.
IncomingMigration` in ``pre_live_migration`` and hands its endpoint and
one-time token back in :class:`XenNCMLiveMigrateData`; the source starts
an :class:`~nova_xen_ncm.engine.migration.OutgoingMigration` from
``live_migration``, writes its progress into the Migration record and
``instance.progress`` every ``[xen_ncm] progress_interval``, and calls
Nova's ``post_method`` or ``recover_method`` by how the engine ended.
Force-complete and abort reach the running migration.

The guest keeps its domid (architecture.rst section 2): the destination
refuses before anything moves when the domid is taken there.
"""

from __future__ import annotations

import threading

import nova.conf
from nova import exception
from nova import objects
from oslo_log import log as logging
from oslo_utils import uuidutils

from nova_xen_ncm import conf as xen_ncm_conf
from nova_xen_ncm.engine import errors as engine_errors
from nova_xen_ncm.engine.migration import IncomingMigration
from nova_xen_ncm.engine.migration import OutgoingMigration
from nova_xen_ncm.engine.state import TERMINAL
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.switchover import SwitchoverHistory
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.tracker import NotificationSink
from nova_xen_ncm.virt import vifops as vifops_module
from nova_xen_ncm.virt import vmops as vmops_module
from nova_xen_ncm.virt.migrate_data import XenNCMLiveMigrateData

LOG = logging.getLogger(__name__)
# Nova's global options, on which nova_xen_ncm.conf registers its own.
CONF = nova.conf.CONF

MiB = 1 << 20
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
# Seconds to wait for a receiver thread that should be ending already.
RECEIVER_JOIN_TIMEOUT = 30.0


def _tls_frames() -> str:
    """How this host carries a migration's frames: ``off`` (no TLS),
    ``encrypted-frames`` or ``tls-records`` inside TLS. The destination
    reports it; the source refuses a difference before Nova prepares
    the destination (the engine would refuse it only when connecting)."""
    opts = xen_ncm_conf.CONF.xen_ncm
    if not opts.tls_enabled:
        return "off"
    return "encrypted-frames" if opts.tls_encrypted_frames else "tls-records"


def _check_tls_frames(theirs: str | None) -> None:
    mine = _tls_frames()
    if theirs is None:
        # A destination of an earlier release: no encrypted-frames.
        if mine == "encrypted-frames":
            raise exception.MigrationPreCheckError(
                reason="the destination runs an earlier release without "
                "encrypted-frames, which this host requires inside TLS "
                "([xen_ncm] tls_encrypted_frames; tls_enabled): upgrade "
                "it, or set tls_encrypted_frames to false here"
            )
        return
    if theirs != mine:
        raise exception.MigrationPreCheckError(
            reason=f"the destination carries migrations as {theirs}, this "
            f"host as {mine}: [xen_ncm] tls_enabled and "
            "tls_encrypted_frames must be the same on both hosts"
        )


def _own_address() -> str:
    """The address this host's engine connects from: its migration
    listen address when one is set, else Nova's my_ip."""
    listen = xen_ncm_conf.CONF.xen_ncm.listen_address
    return CONF.my_ip if listen in WILDCARD_ADDRESSES else listen


def _missing_text(missing: dict) -> str:
    return "; ".join(
        f"{getattr(item, 'value', item)}: {reason}"
        for item, reason in sorted(missing.items(), key=lambda kv: str(kv[0]))
    )


def _nova_migration_id(context, instance, migrate_data, hostname: str) -> str:
    """The engine's id of the migration: Nova's migration record's uuid,
    so that both ends' journals, the bus and a restarted compute's
    recovery name the record Nova keeps. Nova hands the record to the
    source only; the destination finds it as the instance's live
    migration from its host to ``hostname`` in 'preparing', the status
    Nova gives it for pre_live_migration (the source reads the id back
    from ``migrate_data``, whatever version it speaks). A record left
    'preparing' by an earlier attempt that crashed loses to the newest
    one; with none, the engine's id is its own and a restarted compute
    cannot tell Nova about it."""
    if "migration" in migrate_data and migrate_data.migration:
        return migrate_data.migration.uuid
    if context is None:
        return uuidutils.generate_uuid()
    candidates = [
        migration
        for migration in objects.MigrationList.get_by_filters(
            context,
            {
                "instance_uuid": instance.uuid,
                "status": "preparing",
                "migration_type": "live-migration",
                "source_compute": instance.host,
            },
        )
        if migration.dest_compute == hostname
    ]
    if not candidates:
        LOG.warning(
            "No live migration of this instance from %s to %s is "
            "preparing in Nova: the engine's migration id is its own, and "
            "Nova cannot be told how a crash recovery settled it",
            instance.host,
            hostname,
            instance=instance,
        )
        return uuidutils.generate_uuid()
    newest = max(candidates, key=lambda migration: migration.id)
    if len(candidates) > 1:
        LOG.warning(
            "Live migrations %s of this instance are all preparing in "
            "Nova: %s, the newest, is this one",
            ", ".join(sorted(m.uuid for m in candidates)),
            newest.uuid,
            instance=instance,
        )
    return newest.uuid


class LiveMigrationOps:
    """Both ends of live migrations of one host driver."""

    def __init__(
        self,
        host: base.HostDriver,
        vmops: vmops_module.VMOps,
        vifs: vifops_module.VIFOps,
        bus: NotificationSink | None = None,
    ) -> None:
        self._host = host
        self._vmops = vmops
        self._vifs = vifs
        # xen_ncm.migration.* on Nova's transport and exchange (None:
        # [xen_ncm_progress] notifications is off).
        self._bus = bus
        self._sinks = () if bus is None else (bus,)
        self._incoming: dict[str, IncomingMigration] = {}
        self._outgoing: dict[str, OutgoingMigration] = {}
        self._lock = threading.Lock()
        # The fixed part of the pause to each destination, measured on
        # the migrations that left this host.
        self._switchover = SwitchoverHistory()

    # -- checks (destination, then source) --

    def check_can_live_migrate_destination(
        self, instance
    ) -> XenNCMLiveMigrateData:
        caps = self._host.capabilities()
        flavor = instance.flavor
        if flavor.vcpus > caps.max_vcpus:
            raise exception.MigrationPreCheckError(
                reason=f"{flavor.vcpus} vCPUs, {self._host.hostname} "
                f"allows {caps.max_vcpus} per domain"
            )
        free = self._host.free_memory()
        if flavor.memory_mb * MiB > free:
            raise exception.MigrationPreCheckError(
                reason=f"{flavor.memory_mb} MiB needed, {free // MiB} MiB "
                f"free on {self._host.hostname}"
            )
        # The source knows whether the guest has PV drivers: it picks.
        options = {
            "missing_pv": _missing_text(caps.missing(pv_drivers=True)),
            "missing_hvm": _missing_text(caps.missing(pv_drivers=False)),
            "preserve_domid": str(caps.preserve_domid),
            "tls_frames": _tls_frames(),
        }
        return XenNCMLiveMigrateData(
            is_shared_instance_path=True, options=options
        )

    def check_can_live_migrate_source(
        self, instance, dest_check_data: XenNCMLiveMigrateData
    ) -> XenNCMLiveMigrateData:
        if not isinstance(dest_check_data, XenNCMLiveMigrateData):
            raise exception.MigrationPreCheckError(
                reason="the destination does not run the xen_ncm driver"
            )
        info = self._vmops.domain(instance)
        options = dest_check_data.options
        missing = options["missing_pv" if info.pv_drivers else "missing_hvm"]
        if info.pv_drivers and options["preserve_domid"] != "True":
            missing = "; ".join(
                filter(None, [missing, "domid: cannot be preserved"])
            )
        if missing:
            raise exception.MigrationPreCheckError(
                reason="the destination cannot restore what the guest "
                f"can see: {missing}"
            )
        _check_tls_frames(options.get("tls_frames"))
        dest_check_data.source_domid = info.domid
        dest_check_data.pv_drivers = info.pv_drivers
        dest_check_data.source_address = _own_address()
        return dest_check_data

    # -- destination --

    def pre_live_migration(
        self,
        instance,
        network_info,
        migrate_data: XenNCMLiveMigrateData,
        context=None,
    ) -> XenNCMLiveMigrateData:
        domid = migrate_data.source_domid
        try:
            holder = self._host.domain_info(domid)
        except base.DomainNotFound:
            pass
        else:
            raise base.DomidInUse(
                f"domid {domid} of the guest is held by {holder.name!r} on "
                f"{self._host.hostname}",
                call="pre_live_migration",
            )
        # Plugged before the guest arrives: Neutron's agent here reports
        # the port up, and the source waits for network-vif-plugged.
        self._vifs.plug(
            instance,
            vifops_module.destination_network_info(network_info, migrate_data),
        )
        migration_id = _nova_migration_id(
            context, instance, migrate_data, self._host.hostname
        )
        advertise = None
        if xen_ncm_conf.CONF.xen_ncm.listen_address in WILDCARD_ADDRESSES:
            advertise = CONF.my_ip
        # The source host said where it connects from (not this host's
        # my_ip): the listener admits that address only.
        source_address = None
        if migrate_data.obj_attr_is_set("source_address"):
            source_address = migrate_data.source_address
        incoming = IncomingMigration(
            self._host,
            migration_id,
            conf=CONF,
            advertise=advertise,
            sinks=self._sinks,
            source_address=source_address,
        )
        with self._lock:
            self._incoming[instance.uuid] = incoming
        if self._bus is not None:
            # Announced once there is a receiver that will end it.
            self._bus.start(
                migration_id,
                role="destination",
                instance_uuid=instance.uuid,
                destination_host=self._host.hostname,
            )
        incoming.start()
        address, port = incoming.endpoint
        migrate_data.migration_id = migration_id
        migrate_data.receiver_host = address
        migrate_data.receiver_port = port
        migrate_data.token = incoming.token.hex()
        migrate_data.dest_domid = domid
        LOG.info(
            "Receiving migration %s at %s:%d into domid %d",
            migration_id,
            address,
            port,
            domid,
            instance=instance,
        )
        return migrate_data

    def _finish_incoming(self, instance) -> IncomingMigration | None:
        with self._lock:
            incoming = self._incoming.pop(instance.uuid, None)
        if incoming is None:
            return None
        # Still waiting for the source: stop listening.
        incoming.cancel()
        phase = incoming.wait(RECEIVER_JOIN_TIMEOUT)
        if phase is None:
            LOG.warning(
                "Receiver of migration %s still runs after %ds",
                incoming.receiver.migration_id,
                RECEIVER_JOIN_TIMEOUT,
                instance=instance,
            )
        else:
            LOG.info(
                "Incoming migration %s ended %s%s",
                incoming.receiver.migration_id,
                phase.value,
                f": {incoming.receiver.error}"
                if incoming.receiver.error
                else "",
                instance=instance,
            )
        return incoming

    def post_live_migration_at_destination(self, instance) -> None:
        incoming = self._finish_incoming(instance)
        info = self._vmops.domain(instance)
        LOG.info(
            "Instance runs here as domain %d (%s)%s",
            info.domid,
            info.state.value,
            f" after migration {incoming.receiver.migration_id}"
            if incoming
            else "",
            instance=instance,
        )

    def rollback_live_migration_at_destination(
        self, instance, network_info, migrate_data=None
    ) -> None:
        incoming = self._finish_incoming(instance)
        if incoming is not None and incoming.phase in (
            Phase.CLEANUP,
            Phase.DONE,
        ):
            # The guest committed here: destroying it would leave none.
            LOG.error(
                "Rollback asked, but migration %s committed here: the "
                "guest runs on this host, not destroying it",
                incoming.receiver.migration_id,
                instance=instance,
            )
            return
        with self._lock:
            newer = self._incoming.get(instance.uuid)
        if newer is not None:
            # Nova casts this rollback: a retry of the migration may have
            # started here meanwhile, and the domain is now that one's.
            LOG.info(
                "Rollback of an earlier attempt: migration %s of this "
                "instance now holds its domain here; nothing destroyed",
                newer.receiver.migration_id,
                instance=instance,
            )
            return
        if migrate_data is not None:
            network_info = vifops_module.destination_network_info(
                network_info, migrate_data
            )
        self._vmops.cleanup(instance, network_info)

    # -- source --

    def live_migration(
        self,
        context,
        instance,
        dest: str,
        post_method,
        recover_method,
        block_migration: bool,
        migrate_data: XenNCMLiveMigrateData,
    ) -> None:
        info = self._vmops.domain(instance)
        # Leave from the address announced to the destination, which
        # admits that one only.
        source_address = None
        if migrate_data.obj_attr_is_set("source_address"):
            source_address = migrate_data.source_address
        outgoing = OutgoingMigration(
            self._host,
            info.domid,
            migrate_data.endpoint,
            migrate_data.migration_id,
            migrate_data.token_bytes,
            conf=CONF,
            sinks=self._sinks,
            source_address=source_address,
            switchover=self._switchover,
        )
        if self._bus is not None:
            self._bus.start(
                migrate_data.migration_id,
                role="source",
                instance_uuid=instance.uuid,
                source_host=self._host.hostname,
                destination_host=dest,
            )
        migration = None
        if "migration" in migrate_data:
            migration = migrate_data.migration
        with self._lock:
            self._outgoing[instance.uuid] = outgoing
        try:
            outgoing.start()
            interval = xen_ncm_conf.CONF.xen_ncm.progress_interval
            phase = None
            while phase is None:
                phase = outgoing.wait(interval)
                self._report(outgoing, instance, migration)
                if phase is None and outgoing.phase in TERMINAL:
                    # The engine finished but its thread failed after.
                    phase = outgoing.phase
        finally:
            with self._lock:
                self._outgoing.pop(instance.uuid, None)
        LOG.info(
            "Migration %s to %s ended %s%s",
            migrate_data.migration_id,
            dest,
            phase.value,
            f": {outgoing.error}" if outgoing.error else "",
            instance=instance,
        )
        if phase == Phase.DONE:
            post_method(context, instance, dest, block_migration, migrate_data)
        elif phase == Phase.CANCELLED:
            recover_method(
                context,
                instance,
                dest,
                migrate_data,
                migration_status="cancelled",
            )
        elif phase == Phase.FAILED:
            recover_method(context, instance, dest, migrate_data)
        else:
            # IN_DOUBT: paused here, maybe running there. Neither Nova
            # callback is true; the compute manager errors the instance.
            raise engine_errors.EngineError(
                f"migration {migrate_data.migration_id} is in doubt "
                f"({phase.value}): "
                f"{outgoing.error or 'the destination did not answer'}; "
                f"the guest is paused on {self._host.hostname}"
            )

    @staticmethod
    def _report(outgoing: OutgoingMigration, instance, migration) -> None:
        """Memory progress into the Migration record and
        instance.progress; what is not known yet stays None."""
        memory = outgoing.stats.memory_progress()
        total = memory["memory_total"]
        # Before the first round ends nothing is measured: no zeros.
        measured = bool(outgoing.stats.rounds)
        if migration is not None:
            migration.memory_total = total
            if measured:
                migration.memory_processed = memory["memory_processed"]
                migration.memory_remaining = memory["memory_remaining"]
            migration.save()
        if measured and total:
            remaining = memory["memory_remaining"]
            instance.progress = max(
                0, min(100, 100 - remaining * 100 // total)
            )
            instance.save()

    def force_complete(self, instance) -> None:
        if not self._outgoing_of(instance).force_complete():
            LOG.info(
                "The migration is past precopy already", instance=instance
            )

    def abort(self, instance) -> None:
        if not self._outgoing_of(instance).cancel():
            raise exception.MigrationError(
                reason="the migration has decided to commit: it can no "
                "longer be aborted"
            )

    def _outgoing_of(self, instance) -> OutgoingMigration:
        with self._lock:
            outgoing = self._outgoing.get(instance.uuid)
        if outgoing is None:
            raise exception.NoActiveMigrationForInstance(
                instance_id=instance.uuid
            )
        return outgoing

    def post_live_migration_at_source(self, instance, network_info) -> None:
        # The engine destroyed the source copy at COMMIT; one left by a
        # failed destroy must not run beside the migrated guest. The
        # vifs here go with it.
        self._vmops.cleanup(instance, network_info)

    def rollback_live_migration_at_source(self, instance) -> None:
        info = self._vmops.find(instance)
        if info is None:
            LOG.error(
                "Migration rolled back but the instance has no domain on %s",
                self._host.hostname,
                instance=instance,
            )
        else:
            LOG.info(
                "Migration rolled back; domain %d is %s here",
                info.domid,
                info.state.value,
                instance=instance,
            )
