"""Nova compute driver for Xen hosts with non-cooperative live migration.

Thin: every method delegates to an ops module (vmops, hostops,
livemigrationops) working on the host driver chosen by ``[xen_ncm]
host_driver``; host and engine errors are translated to Nova's here,
once, by :func:`nova_xen_ncm.virt.exceptions.translate_all`.
"""

from __future__ import annotations

import os
import threading

import nova.conf
import os_resource_classes as orc
from nova import context as nova_context
from nova import exception
from nova import objects
from nova.compute import power_state
from nova.compute import utils as compute_utils
from nova.compute import vm_states
from nova.network import neutron
from nova.scheduler.client import report
from nova.virt import driver
from nova.virt import node
from oslo_log import log as logging

from nova_xen_ncm import conf as xen_ncm_conf
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory
from nova_xen_ncm.progress import bus
from nova_xen_ncm.virt import exceptions
from nova_xen_ncm.virt import hostops
from nova_xen_ncm.virt import livemigrationops
from nova_xen_ncm.virt import migrationops
from nova_xen_ncm.virt import vifops
from nova_xen_ncm.virt import vmops

LOG = logging.getLogger(__name__)
# nova.conf.CONF is oslo.config's global object; importing
# nova_xen_ncm.conf registered our option groups on it.
CONF = nova.conf.CONF


@exceptions.translate_all
class XenNCMDriver(driver.ComputeDriver):
    capabilities = dict(
        driver.ComputeDriver.capabilities,
        has_imagecache=False,
        # On the shared storage: the new host boots the same root disk.
        supports_evacuate=True,
        supports_migrate_to_same_host=False,
        supports_image_type_raw=True,
    )

    def __init__(self, virtapi, read_only: bool = False) -> None:
        super().__init__(virtapi)
        # The compute service's name is fixed when its manager is built;
        # functional tests run several services in one process.
        self._nodename: str = CONF.host
        self._node_uuid: str | None = None
        self._host: base.HostDriver | None = None
        self._vmops: vmops.VMOps | None = None
        self._hostops: hostops.HostOps | None = None
        self._livemigrationops: livemigrationops.LiveMigrationOps | None = None
        self._migrationops: migrationops.MigrationOps | None = None
        self._vifops = vifops.VIFOps(virtapi)
        self._bus: bus.BusSink | None = None
        # Whether placement held DISK_GB in a sharing provider at the
        # last inventory update, and whether servers still held this
        # node's own (None: not asked yet), to log changes.
        self._disk_shared: tuple[bool, bool] | None = None

    # -- service --

    def init_host(self, host: str) -> None:
        self._nodename = host
        # The journals live under Nova's state_path unless set.
        CONF.set_default(
            "state_path",
            os.path.join(CONF.state_path, "xen_ncm"),
            group="xen_ncm",
        )
        self._host = factory.load_host_driver(
            xen_ncm_conf.CONF.xen_ncm.host_driver, host, CONF
        )
        self._vifops.initialize()
        self._vmops = vmops.VMOps(self._host, self._vifops)
        self._hostops = hostops.HostOps(self._host)
        self._migrationops = migrationops.MigrationOps(
            self._host, self._vmops, self._vifops
        )
        # Nova's CONF: its transport and control_exchange ("nova").
        self._bus = bus.from_conf(CONF, host=host)
        self._livemigrationops = livemigrationops.LiveMigrationOps(
            self._host, self._vmops, self._vifops, self._bus
        )
        LOG.info(
            "Xen host %s: %s",
            host,
            self._host.capabilities().hypervisor,
        )
        self._recover_migrations()

    def _recover_migrations(self) -> None:
        """Settle the migrations a previous run of this service left in
        flight (engine/recovery.py), then tell Nova where each guest
        ended (:func:`reconcile`); a journal that cannot be read is
        reported, and the service starts anyway."""
        try:
            outgoing = Journal.from_conf(CONF)
            incoming = Journal.incoming_from_conf(CONF)
            # Which instance each journalled guest is, taken before
            # recovery destroys the copies that moved.
            entries = list(outgoing.entries())
            owners = {e.domid: e.uuid for e in entries if e.uuid}
            # Whether each guest ran before its migration paused it: a
            # guest the destination committed runs (or stays paused) there.
            running = {e.migration_id: e.running for e in entries}
            running.update(
                {e.migration_id: e.running for e in incoming.entries()}
            )
            outcomes = recovery.recover(
                self._host, outgoing, CONF, others=[incoming]
            )
            # This host as a destination: a guest that committed here runs
            # here, and Nova may still record it on its source.
            outcomes += recovery.recover_incoming(
                self._host, incoming, others=[outgoing]
            )
        except EngineError as exc:
            LOG.error("Interrupted migrations not recovered: %s", exc)
            return
        # A source restarted after any delay still learns the outcome:
        # answered until it acknowledges or an operator resolves it.
        threading.Thread(
            target=recovery.answer_incoming,
            args=(incoming, CONF, None),
            name="xen-ncm-commit-answers",
            daemon=True,
        ).start()
        reconcile(
            self._nodename,
            [o for o in outcomes if not o.skipped],
            owners,
            running,
        )

    def _open_migration(self, instance) -> str | None:
        """Why ``instance`` must not run here, or None: its migration is
        still in the journal (in doubt: paused here, maybe running on the
        destination), so unpausing, restarting or saving it could leave
        two running copies."""
        journal = Journal.from_conf(CONF)
        if journal is None:
            return None
        info = self._vmops.find(instance)
        for entry in journal.entries():
            # By uuid, which holds after a dom0 reboot took the domain
            # away; by domid for entries that did not record it.
            if (entry.uuid and entry.uuid == instance.uuid) or (
                not entry.uuid
                and info is not None
                and entry.domid == info.domid
            ):
                return (
                    f"migration {entry.migration_id} of this guest "
                    f"to {entry.host} is still open ({entry.phase}); "
                    "it may run there: settle it first with "
                    "'nova-xen-ncm recover'"
                )
        return None

    def _refuse_while_journalled(self, instance, failure=None) -> None:
        """Raise ``failure(reason=...)`` (power on's by default) while a
        migration of ``instance`` is open."""
        reason = self._open_migration(instance)
        if reason is not None:
            failure = failure or exception.InstancePowerOnFailure
            raise failure(reason=reason)

    def cleanup_host(self, host: str) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        if self._host is not None:
            self._host.close()

    def get_available_nodes(self, refresh: bool = False) -> list[str]:
        return [self._nodename]

    def get_nodenames_by_uuid(self, refresh: bool = False) -> dict:
        return {self._get_node_uuid(): self._nodename}

    @staticmethod
    def _disk_gb_in_use(rp_uuid: str) -> bool:
        """Whether any consumer holds DISK_GB of provider ``rp_uuid``; True
        when placement cannot say (removing it could be refused)."""
        ctxt = nova_context.get_admin_context()
        try:
            allocations = (
                report.report_client_singleton()
                .get_allocations_for_resource_provider(ctxt, rp_uuid)
                .allocations
            )
        except Exception as exc:  # noqa: BLE001 - kept, and said why
            LOG.warning(
                "Allocations of %s not read from placement (%s): DISK_GB kept",
                rp_uuid,
                exc,
            )
            return True
        return any(
            orc.DISK_GB in allocation.get("resources", {})
            for allocation in allocations.values()
        )

    def _get_node_uuid(self) -> str:
        if self._node_uuid is None:
            self._node_uuid = node.get_local_node_uuid()
        return self._node_uuid

    def node_is_available(self, nodename: str) -> bool:
        return nodename == self._nodename

    def get_host_ip_addr(self) -> str:
        return CONF.my_ip

    def get_available_resource(self, nodename: str) -> dict:
        return self._hostops.get_available_resource(
            nodename, self._get_node_uuid()
        )

    def update_provider_tree(
        self, provider_tree, nodename: str, allocations=None
    ) -> None:
        inventory = provider_tree.data(nodename).inventory
        # The root disks are on storage every compute shares: each
        # reporting the filesystem as its own DISK_GB would count it once
        # per compute. Placement's model for shared storage is a sharing
        # provider (trait MISC_SHARES_VIA_AGGREGATE, in an aggregate with
        # the computes) holding DISK_GB; Nova puts it in this tree, and a
        # compute beside one reports no DISK_GB of its own.
        shared = provider_tree.has_sharing_provider(orc.DISK_GB)
        # Servers booted before the sharing provider hold DISK_GB here:
        # placement refuses to remove an inventory in use (InventoryInUse,
        # which Nova's resource tracker turns into a compute that does
        # not start). Kept until they are moved or deleted.
        in_use = (
            shared
            and orc.DISK_GB in inventory
            and self._disk_gb_in_use(provider_tree.data(nodename).uuid)
        )
        if (shared, in_use) != self._disk_shared:
            self._disk_shared = (shared, in_use)
            if in_use:
                LOG.warning(
                    "DISK_GB is held by a sharing resource provider, but "
                    "servers still hold DISK_GB of %s: it reports the "
                    "shared filesystem until they are moved or deleted",
                    nodename,
                )
            elif shared:
                LOG.info(
                    "DISK_GB is held by a sharing resource provider: "
                    "%s reports none of its own",
                    nodename,
                )
            else:
                LOG.warning(
                    "No sharing resource provider holds DISK_GB: %s "
                    "reports the shared disk filesystem as its own, and "
                    "every other compute on it counts it again (see the "
                    "administration guide, 'Shared storage in placement')",
                    nodename,
                )
        provider_tree.update_inventory(
            nodename,
            self._hostops.inventory(
                self._get_allocation_ratios(inventory),
                self._get_reserved_host_disk_gb_from_config(),
                report_disk=not shared or in_use,
            ),
        )

    # -- instances --

    def get_info(self, instance, use_cache: bool = True):
        return self._vmops.get_info(instance)

    def instance_exists(self, instance) -> bool:
        return self._vmops.instance_exists(instance)

    def list_instances(self) -> list[str]:
        return self._vmops.list_instances()

    def list_instance_uuids(self) -> list[str]:
        return self._vmops.list_instance_uuids()

    def spawn(
        self,
        context,
        instance,
        image_meta,
        injected_files,
        admin_password,
        allocations,
        network_info=None,
        block_device_info=None,
        power_on: bool = True,
        accel_info=None,
    ) -> None:
        self._vmops.spawn(
            context,
            instance,
            image_meta,
            network_info,
            block_device_info,
            power_on=power_on,
        )

    def destroy(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_disks: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        self._vmops.destroy(
            instance, network_info, destroy_disks=destroy_disks
        )

    def cleanup(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_disks: bool = True,
        migrate_data=None,
        destroy_vifs: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        # After a live migration (source) or a failed one (destination)
        # the domain is normally gone already; a leftover goes here.
        self._vmops.cleanup(
            instance, network_info, destroy_vifs, destroy_disks=destroy_disks
        )

    def reboot(
        self,
        context,
        instance,
        network_info,
        reboot_type,
        block_device_info=None,
        bad_volumes_callback=None,
        accel_info=None,
        share_info=None,
    ) -> None:
        self._refuse_while_journalled(
            instance, exception.InstanceRebootFailure
        )
        self._vmops.reboot(instance, network_info, reboot_type)

    def power_off(self, instance, timeout=0, retry_interval=0) -> None:
        self._vmops.power_off(instance, timeout, retry_interval)

    def power_on(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        accel_info=None,
        share_info=None,
    ) -> None:
        self._refuse_while_journalled(instance)
        self._vmops.power_on(instance, network_info)

    def resume_state_on_host_boot(
        self,
        context,
        instance,
        network_info,
        share_info,
        block_device_info=None,
    ) -> None:
        self._refuse_while_journalled(instance)
        self._vmops.power_on(instance, network_info)

    def pause(self, instance) -> None:
        self._vmops.pause(instance)

    def unpause(self, instance) -> None:
        reason = self._open_migration(instance)
        if reason is not None:
            # Nova has no unpause failure of its own.
            raise exception.NovaException(f"Cannot unpause: {reason}")
        self._vmops.unpause(instance)

    def suspend(self, context, instance) -> None:
        # Saving destroys the paused copy; resume would then build one.
        self._refuse_while_journalled(
            instance, exception.InstanceSuspendFailure
        )
        self._vmops.suspend(instance)

    def resume(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        share_info=None,
    ) -> None:
        self._vmops.resume(instance, network_info)

    def get_console_output(self, context, instance) -> str:
        return self._vmops.get_console_output(instance)

    # -- cold migration, resize, evacuation (shared storage) --

    def migrate_disk_and_power_off(
        self,
        context,
        instance,
        dest,
        flavor,
        network_info,
        block_device_info=None,
        timeout=0,
        retry_interval=0,
    ) -> str:
        reason = self._open_migration(instance)
        if reason is not None:
            raise exception.InstanceFaultRollback(
                exception.ResizeError(reason=reason)
            )
        return self._migrationops.migrate_disk_and_power_off(
            instance,
            flavor,
            network_info,
            block_device_info,
            timeout,
            retry_interval,
        )

    def finish_migration(
        self,
        context,
        migration,
        instance,
        disk_info,
        network_info,
        image_meta,
        resize_instance,
        allocations,
        block_device_info=None,
        power_on=True,
        share_info=None,
    ) -> None:
        self._migrationops.finish_migration(
            instance, network_info, resize_instance, power_on
        )

    def confirm_migration(
        self, context, migration, instance, network_info
    ) -> None:
        self._migrationops.confirm_migration(instance, network_info)

    def finish_revert_migration(
        self,
        context,
        instance,
        network_info,
        migration,
        block_device_info=None,
        power_on=True,
        share_info=None,
    ) -> None:
        self._refuse_while_journalled(instance, exception.ResizeError)
        self._migrationops.finish_revert_migration(
            instance, network_info, power_on
        )

    def check_instance_shared_storage_local(self, context, instance) -> dict:
        return self._migrationops.check_shared_storage_local(instance)

    def check_instance_shared_storage_remote(self, context, data) -> bool:
        return self._migrationops.check_shared_storage_remote(data)

    def check_instance_shared_storage_cleanup(self, context, data) -> None:
        self._migrationops.check_shared_storage_cleanup(data)

    def instance_on_disk(self, instance) -> bool:
        return self._migrationops.instance_on_disk(instance)

    # -- live migration --

    def check_can_live_migrate_destination(
        self,
        context,
        instance,
        src_compute_info,
        dst_compute_info,
        block_migration=False,
        disk_over_commit=False,
    ):
        return self._livemigrationops.check_can_live_migrate_destination(
            instance
        )

    def cleanup_live_migration_destination_check(
        self, context, dest_check_data
    ) -> None:
        # The destination check reserves nothing.
        pass

    def check_can_live_migrate_source(
        self, context, instance, dest_check_data, block_device_info=None
    ):
        return self._livemigrationops.check_can_live_migrate_source(
            instance, dest_check_data
        )

    def pre_live_migration(
        self,
        context,
        instance,
        block_device_info,
        network_info,
        disk_info,
        migrate_data,
    ):
        return self._livemigrationops.pre_live_migration(
            instance, network_info, migrate_data, context=context
        )

    def live_migration(
        self,
        context,
        instance,
        dest,
        post_method,
        recover_method,
        block_migration=False,
        migrate_data=None,
    ) -> None:
        self._livemigrationops.live_migration(
            context,
            instance,
            dest,
            post_method,
            recover_method,
            block_migration,
            migrate_data,
        )

    def live_migration_force_complete(self, instance) -> None:
        self._livemigrationops.force_complete(instance)

    def live_migration_abort(self, instance) -> None:
        self._livemigrationops.abort(instance)

    def post_live_migration_at_source(
        self, context, instance, network_info
    ) -> None:
        self._livemigrationops.post_live_migration_at_source(
            instance, network_info
        )

    def post_live_migration_at_destination(
        self,
        context,
        instance,
        network_info,
        block_migration=False,
        block_device_info=None,
    ) -> None:
        self._livemigrationops.post_live_migration_at_destination(instance)

    def rollback_live_migration_at_source(
        self, context, instance, migrate_data
    ) -> None:
        self._livemigrationops.rollback_live_migration_at_source(instance)

    def rollback_live_migration_at_destination(
        self,
        context,
        instance,
        network_info,
        block_device_info,
        destroy_disks=True,
        migrate_data=None,
    ) -> None:
        self._livemigrationops.rollback_live_migration_at_destination(
            instance, network_info, migrate_data
        )


def reconcile(
    hostname: str,
    outcomes,
    owners: dict[int, str],
    running: dict[str, bool] | None = None,
) -> None:
    """Tell Nova how recovery settled each migration, from either end.

    As the source: an instance whose guest the journal proves committed
    to the destination is moved there (host, node, migration record, the
    source's allocation); one whose fate is not known, or whose
    destination Nova's records do not name, goes to ERROR with a fault
    that says why; one rolled back runs here as Nova believes.

    As the destination (``outcome.role``): a guest that committed here
    runs here, and an instance Nova still records on its source is moved
    here the same way; a copy that never committed was destroyed, and an
    instance Nova records here although its guest is not here goes to
    ERROR with a fault naming the source."""
    ctxt = nova_context.get_admin_context()
    running = running or {}
    for outcome in outcomes:
        uuid = outcome.uuid or owners.get(outcome.domid)
        if uuid is None:
            LOG.warning(
                "Migration %s: domain %d was gone before recovery; no "
                "instance to update (%s)",
                outcome.migration_id,
                outcome.domid,
                outcome.reason,
            )
            continue
        was_running = running.get(outcome.migration_id, True)
        if getattr(outcome, "lost", False):
            why = (
                f"live migration {outcome.migration_id} was interrupted "
                f"on {hostname} and its guest runs on no host "
                f"({outcome.reason}). Start it again from its disk (hard "
                "reboot), then reset its state."
            )
            _error_instance(ctxt, outcome, uuid, why)
            continue
        if outcome.role == "destination":
            why = _reconcile_destination(
                ctxt, hostname, outcome, uuid, was_running
            )
            if why is not None:
                _error_instance(ctxt, outcome, uuid, why)
            continue
        if outcome.phase == Phase.FAILED:
            LOG.info(
                "Migration %s rolled back: the guest runs on %s",
                outcome.migration_id,
                hostname,
                instance_uuid=uuid,
            )
            continue
        elif outcome.phase == Phase.DONE:
            if _move_to_destination(
                ctxt, hostname, outcome, uuid, was_running
            ):
                continue
            why = (
                f"live migration {outcome.migration_id} was interrupted "
                f"on {hostname} after the destination committed: the "
                "guest runs on the destination and the copy here was "
                f"destroyed ({outcome.reason}), but Nova has no record of "
                "this migration naming the destination. Point the instance "
                "at the destination host, then reset its state."
            )
        elif getattr(outcome, "guest", "") == recovery.ELSEWHERE:
            why = (
                f"live migration {outcome.migration_id} was interrupted "
                f"by a crash of {hostname}, which took the copy here; "
                "COMMIT may have reached the destination, which could not "
                f"be asked ({outcome.reason}). Do not start the guest "
                "before checking the destination: run 'nova-xen-ncm "
                f"recover' on {hostname} again once the destination is "
                "reachable (it settles this), or look there; then "
                f"'nova-xen-ncm recover --resolve {outcome.migration_id}' "
                "(power on is refused until then) and, if the guest runs "
                "there, point the instance at that host, else start it "
                "again from its disk (hard reboot); then reset its state."
            )
        else:
            why = (
                f"live migration {outcome.migration_id} was interrupted "
                f"on {hostname} and could not be settled: the guest is "
                f"paused here and may run on the destination "
                f"({outcome.reason}). Run 'nova-xen-ncm recover' before "
                "starting it."
            )
        _error_instance(ctxt, outcome, uuid, why)


def _error_instance(ctxt, outcome, uuid: str, why: str) -> None:
    """The instance in ERROR with ``why`` as its fault, and Nova's
    record of the migration ended."""
    try:
        instance = objects.Instance.get_by_uuid(ctxt, uuid)
        instance.vm_state = vm_states.ERROR
        instance.task_state = None
        instance.save()
        compute_utils.add_instance_fault_from_exc(
            ctxt, instance, exception.NovaException(why)
        )
    except exception.InstanceNotFound:
        LOG.warning("%s; the instance is gone from Nova", why)
        return
    _fail_migration(ctxt, outcome.migration_id, uuid)
    LOG.error(why, instance_uuid=uuid)


def _reconcile_destination(
    ctxt, hostname: str, outcome, uuid: str, was_running: bool
) -> str | None:
    """Nova's view of this host after recovery settled an incoming
    migration; the fault to record, or None when Nova is right (or now
    made right)."""
    try:
        instance = objects.Instance.get_by_uuid(ctxt, uuid)
    except exception.InstanceNotFound:
        LOG.warning(
            "Incoming migration %s settled %s, but the instance is gone "
            "from Nova",
            outcome.migration_id,
            outcome.phase,
            instance_uuid=uuid,
        )
        return None
    if outcome.phase == Phase.DONE:
        if _move_to_destination(
            ctxt, hostname, outcome, uuid, was_running, here="destination"
        ):
            return None
        if instance.host == hostname:
            return None
        return (
            f"live migration {outcome.migration_id} committed on "
            f"{hostname}, where the guest now runs ({outcome.reason}), "
            f"but Nova records it on {instance.host} and has no record of "
            f"this migration naming {hostname}. Point the instance at "
            f"{hostname}, then reset its state."
        )
    if instance.host != hostname:
        # The guest is the source's: its own recovery or Nova's rollback
        # there says where it runs.
        LOG.info(
            "Incoming migration %s settled %s here (%s); the instance is "
            "on %s",
            outcome.migration_id,
            outcome.phase,
            outcome.reason,
            instance.host,
            instance_uuid=uuid,
        )
        return None
    if outcome.phase == Phase.FAILED:
        return (
            f"live migration {outcome.migration_id} never committed on "
            f"{hostname} and the copy here was destroyed "
            f"({outcome.reason}), but Nova records the instance here: its "
            "guest runs on the migration's source, if anywhere."
        )
    return (
        f"live migration {outcome.migration_id} to {hostname} could not be "
        f"settled here ({outcome.reason}): whether the guest runs here "
        "cannot be told. Run 'nova-xen-ncm recover' on the source."
    )


def _move_to_destination(
    ctxt,
    hostname: str,
    outcome,
    uuid: str,
    was_running: bool,
    here: str = "source",
) -> bool:
    """Record in Nova that the guest of ``uuid`` runs on the destination
    of Nova's migration ``outcome.migration_id`` (the journal proved it
    committed); ``hostname`` is that migration's ``here`` end. False
    when Nova's records cannot say where that is."""
    try:
        migration = objects.Migration.get_by_uuid(ctxt, outcome.migration_id)
    except exception.MigrationNotFound:
        return False
    end = (
        migration.source_compute
        if here == "source"
        else migration.dest_compute
    )
    if (
        migration.instance_uuid != uuid
        or end != hostname
        or not migration.source_compute
        or not migration.dest_compute
        or not migration.dest_node
    ):
        return False
    try:
        instance = objects.Instance.get_by_uuid(ctxt, uuid)
    except exception.InstanceNotFound:
        LOG.warning(
            "Migration %s committed to %s, but the instance is gone from Nova",
            outcome.migration_id,
            migration.dest_compute,
            instance_uuid=uuid,
        )
        return True
    if instance.host == migration.source_compute:
        try:
            compute_id = migration.get_dest_compute_id()
        except exception.ComputeHostNotFound:
            return False
        network_error = _move_ports(ctxt, instance, migration)
        # As Nova's own post-migration step on the destination does.
        instance.apply_migration_context()
        instance.drop_migration_context()
        instance.host = migration.dest_compute
        instance.node = migration.dest_node
        instance.compute_id = compute_id
        instance.vm_state = (
            vm_states.ACTIVE if was_running else vm_states.PAUSED
        )
        # What the destination runs, as Nova's power-state sync would
        # find it: a stale RUNNING/PAUSED from the source stays otherwise
        # until the next periodic sync on the destination.
        instance.power_state = (
            power_state.RUNNING if was_running else power_state.PAUSED
        )
        if network_error is not None:
            # The guest runs there all the same; its ports do not follow.
            instance.vm_state = vm_states.ERROR
        instance.task_state = None
        instance.save()
        if network_error is not None:
            why = (
                f"live migration {outcome.migration_id} committed to "
                f"{migration.dest_compute}, where the guest runs, but its "
                f"ports could not be bound there: {network_error}"
            )
            compute_utils.add_instance_fault_from_exc(
                ctxt, instance, exception.NovaException(why)
            )
            LOG.error(why, instance_uuid=uuid)
    # What Nova's post-migration step would have set. 'error' included:
    # Nova sets it when the source's live_migration raised, "too late to
    # roll back", the outcome unknown; the journal has settled it, and a
    # record left 'error' would show a failed move that took effect and,
    # once the instance is deleted, have the source's periodic
    # _cleanup_incomplete_migrations treat it as an unfinished one.
    # 'failed' and 'cancelled' are Nova's rollbacks: left as they are.
    ended = migration.status in ("completed", "failed", "cancelled")
    if not ended and instance.host == migration.dest_compute:
        if migration.status == "error":
            LOG.info(
                "Migration %s was left in error by its source; the "
                "destination committed it: completed",
                migration.uuid,
                instance_uuid=uuid,
            )
        migration.status = "completed"
        migration.save()
    # The source's share, held by the migration, released as Nova's own
    # post-migration step releases it: with the consumer generation
    # (force=False), so a concurrent change is refused, not overwritten.
    try:
        report.report_client_singleton().delete_allocation_for_instance(
            ctxt, migration.uuid, consumer_type="migration"
        )
    except Exception as exc:  # noqa: BLE001 - placement is best effort here
        LOG.warning(
            "Allocation of migration %s on %s not released: %s",
            migration.uuid,
            migration.source_compute,
            exc,
            instance_uuid=uuid,
        )
    LOG.warning(
        "Live migration %s was interrupted after the destination "
        "committed (recovered on its %s %s): the instance now runs on %s "
        "(%s)",
        outcome.migration_id,
        here,
        hostname,
        migration.dest_compute,
        outcome.reason,
        instance_uuid=uuid,
    )
    return True


def _move_ports(ctxt, instance, migration) -> Exception | None:
    """Bind the instance's ports on the destination as Nova's source and
    destination do after a live migration (the destination's bindings
    activated, then every port's host set to it); the error, if any."""
    api = neutron.API()
    try:
        api.migrate_instance_start(ctxt, instance, migration)
        api.migrate_instance_finish(
            ctxt, instance, migration, provider_mappings=None
        )
    except Exception as exc:  # noqa: BLE001 - reported as the fault
        return exc
    return None


def _fail_migration(ctxt, migration_uuid: str, instance_uuid: str) -> None:
    """Nova's record of the interrupted migration ends in 'error': the
    compute manager resets only those of instances not in ERROR, so it
    would otherwise stay 'running' for good."""
    try:
        migration = objects.Migration.get_by_uuid(ctxt, migration_uuid)
    except exception.MigrationNotFound:
        # Started without a Nova migration record (the engine's own id).
        return
    if migration.status in ("completed", "error", "failed", "cancelled"):
        return
    migration.status = "error"
    migration.save()
    LOG.info(
        "Migration %s set to error",
        migration_uuid,
        instance_uuid=instance_uuid,
    )
