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
from nova.virt import driver
from nova.virt import node
from oslo_log import log as logging

from nova_xen_ncm import conf as xen_ncm_conf
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory
from nova_xen_ncm.virt import exceptions
from nova_xen_ncm.virt import hostops
from nova_xen_ncm.virt import livemigrationops
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
        supports_evacuate=False,
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
        self._vmops = vmops.VMOps(self._host)
        self._hostops = hostops.HostOps(self._host)
        self._livemigrationops = livemigrationops.LiveMigrationOps(
            self._host, self._vmops
        )
        LOG.info(
            "Xen host %s: %s",
            host,
            self._host.capabilities().hypervisor,
        )
        self._recover_migrations()

    def _recover_migrations(self) -> None:
        """Settle the migrations a previous run of this service left in
        flight (engine/recovery.py); a journal that cannot be read is
        reported, and the service starts anyway."""
        try:
            outgoing = Journal.from_conf(CONF)
            incoming = Journal.incoming_from_conf(CONF)
            recovery.recover(self._host, outgoing, CONF, others=[incoming])
            recovery.recover_incoming(self._host, incoming, others=[outgoing])
        except EngineError as exc:
            LOG.error("Interrupted migrations not recovered: %s", exc)
            return
        # A source restarted after any delay still learns the outcome.
        threading.Thread(
            target=recovery.answer_incoming,
            args=(incoming, CONF, CONF.xen_ncm.commit_query_timeout),
            name="xen-ncm-commit-answers",
            daemon=True,
        ).start()

    def cleanup_host(self, host: str) -> None:
        if self._host is not None:
            self._host.close()

    def get_available_nodes(self, refresh: bool = False) -> list[str]:
        return [self._nodename]

    def get_nodenames_by_uuid(self, refresh: bool = False) -> dict:
        return {self._get_node_uuid(): self._nodename}

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
        provider_tree.update_inventory(
            nodename,
            self._hostops.inventory(
                self._get_allocation_ratios(inventory),
                self._get_reserved_host_disk_gb_from_config(),
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
        self._vmops.spawn(instance, network_info, power_on=power_on)

    def destroy(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_disks: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        self._vmops.destroy(instance)

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
        self._vmops.cleanup(instance)

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
        self._vmops.reboot(instance, network_info, reboot_type)

    def power_off(self, instance, timeout=0, retry_interval=0) -> None:
        self._vmops.power_off(instance, timeout)

    def power_on(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        accel_info=None,
        share_info=None,
    ) -> None:
        self._vmops.power_on(instance, network_info)

    def resume_state_on_host_boot(
        self,
        context,
        instance,
        network_info,
        share_info,
        block_device_info=None,
    ) -> None:
        self._vmops.power_on(instance, network_info)

    def pause(self, instance) -> None:
        self._vmops.pause(instance)

    def unpause(self, instance) -> None:
        self._vmops.unpause(instance)

    def suspend(self, context, instance) -> None:
        self._vmops.suspend(instance)

    def resume(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        share_info=None,
    ) -> None:
        self._vmops.resume(instance)

    def get_console_output(self, context, instance) -> str:
        return self._vmops.get_console_output(instance)

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
            instance, migrate_data
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
        self._livemigrationops.post_live_migration_at_source(instance)

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
        self._livemigrationops.rollback_live_migration_at_destination(instance)
