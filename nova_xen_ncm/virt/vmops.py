"""Instance lifecycle on a Xen host: a Nova instance is one domain.

A domain is named after the instance (``instance.name``) and carries the
instance's UUID, so it is found again by UUID after a restart or a live
migration (where its domid stays the same but the host changes). Powering
off destroys the domain, as ``xl shutdown`` does; powering on builds it
again from the flavor. Suspend saves the guest to a file under
``[DEFAULT] instances_path`` with the migration stream (``xl save``) and
destroys the domain; resume restores it with its domid.
"""

from __future__ import annotations

import contextlib
import os

import nova.conf
from nova.compute import power_state
from nova.compute import vm_states
from nova.virt import hardware
from oslo_log import log as logging

from nova_xen_ncm.engine import savefile
from nova_xen_ncm.host import base
from nova_xen_ncm.virt import vifops as vifops_module

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF

MiB = 1 << 20
GiB = 1 << 30
# xvda: major 202, minor 0 (Xen's vbd numbering, docs/misc/vbd-interface).
ROOT_VBD_DEVID = 51712
SAVE_FILE = "xen_ncm.save"

POWER_STATES = {
    base.DomainState.RUNNING: power_state.RUNNING,
    base.DomainState.PAUSED: power_state.PAUSED,
    base.DomainState.SHUTDOWN: power_state.SHUTDOWN,
    base.DomainState.CRASHED: power_state.CRASHED,
    base.DomainState.DYING: power_state.SHUTDOWN,
}


def domain_config(instance, network_info) -> base.DomainConfig:
    """The domain of ``instance``: its flavor's vCPUs and RAM, a vif per
    port of ``network_info`` (devid in port order, the port's MAC) and
    the root disk as xvda."""
    flavor = instance.flavor
    devices = [
        base.DeviceConfig(kind="vif", devid=index, mac=vif["address"])
        for index, vif in enumerate(network_info or ())
    ]
    devices.append(
        base.DeviceConfig(
            kind="vbd",
            devid=ROOT_VBD_DEVID,
            disk_bytes=flavor.root_gb * GiB or None,
        )
    )
    return base.DomainConfig(
        name=instance.name,
        uuid=instance.uuid,
        memory_bytes=flavor.memory_mb * MiB,
        vcpus=flavor.vcpus,
        devices=tuple(devices),
    )


class VMOps:
    """Lifecycle operations of instances on one host driver."""

    def __init__(
        self, host: base.HostDriver, vifs: vifops_module.VIFOps
    ) -> None:
        self._host = host
        self._vifs = vifs
        # Instances powered off here: no domain, but SHUTDOWN, not gone.
        # After a restart Nova's vm_state STOPPED says the same.
        self._powered_off: set[str] = set()

    # -- lookups --

    def domain(self, instance) -> base.DomainInfo:
        """The domain of ``instance``; raises DomainNotFound."""
        return self._host.find_domain(instance.uuid)

    def find(self, instance) -> base.DomainInfo | None:
        try:
            return self._host.find_domain(instance.uuid)
        except base.DomainNotFound:
            return None

    def save_path(self, instance) -> str:
        return os.path.join(CONF.instances_path, instance.uuid, SAVE_FILE)

    def get_info(self, instance, use_cache: bool = True):
        info = self.find(instance)
        if info is not None:
            return hardware.InstanceInfo(
                state=POWER_STATES[info.state], internal_id=info.domid
            )
        if os.path.exists(self.save_path(instance)):
            return hardware.InstanceInfo(state=power_state.SUSPENDED)
        if instance.uuid in self._powered_off or (
            instance.obj_attr_is_set("vm_state")
            and instance.vm_state == vm_states.STOPPED
        ):
            return hardware.InstanceInfo(state=power_state.SHUTDOWN)
        raise base.DomainNotFound(
            f"instance {instance.uuid} has no domain on {self._host.hostname}",
            call="find_domain",
        )

    def instance_exists(self, instance) -> bool:
        return self.find(instance) is not None or os.path.exists(
            self.save_path(instance)
        )

    def list_instances(self) -> list[str]:
        return [info.name for info in self._host.list_domains()]

    def list_instance_uuids(self) -> list[str]:
        return [info.uuid for info in self._host.list_domains()]

    # -- lifecycle --

    def spawn(self, instance, network_info, power_on: bool = True) -> None:
        if not power_on:
            # A stopped instance has no domain; power_on builds it.
            return
        with self._vifs.plugged_and_reported(instance, network_info):
            self.create(instance, network_info)

    def create(self, instance, network_info) -> int:
        config = domain_config(instance, network_info)
        domid = self._host.create_domain(config)
        self._powered_off.discard(instance.uuid)
        LOG.info(
            "Created domain %d (%d vCPUs, %d MiB) on %s",
            domid,
            config.vcpus,
            config.memory_bytes // MiB,
            self._host.hostname,
            instance=instance,
        )
        return domid

    def destroy(
        self, instance, network_info, destroy_disks: bool = False
    ) -> None:
        info = self.find(instance)
        if info is None:
            LOG.warning(
                "Instance has no domain on %s, nothing to destroy",
                self._host.hostname,
                instance=instance,
            )
        else:
            self._host.destroy_domain(info.domid, delete_disks=destroy_disks)
            LOG.info("Destroyed domain %d", info.domid, instance=instance)
        self._vifs.unplug(instance, network_info, ignore_errors=True)
        self._powered_off.discard(instance.uuid)
        self._remove_save_file(instance)

    def cleanup(
        self,
        instance,
        network_info=None,
        destroy_vifs: bool = True,
        destroy_disks: bool = False,
    ) -> None:
        """Destroy what is left of ``instance`` here, if anything, and
        unplug its vifs unless ``destroy_vifs`` is False."""
        info = self.find(instance)
        if info is not None:
            self._host.destroy_domain(info.domid, delete_disks=destroy_disks)
            LOG.info(
                "Destroyed leftover domain %d", info.domid, instance=instance
            )
        if destroy_vifs:
            self._vifs.unplug(instance, network_info, ignore_errors=True)
        self._powered_off.discard(instance.uuid)
        self._remove_save_file(instance)

    def reboot(self, instance, network_info, reboot_type: str) -> None:
        info = self.find(instance)
        if info is not None and reboot_type == "SOFT":
            try:
                self._host.shutdown(info.domid, reboot=True)
                return
            except base.NotSupported as error:
                # As the libvirt driver: a failed soft reboot turns hard.
                LOG.info(
                    "Soft reboot not possible (%s), rebooting hard",
                    error,
                    instance=instance,
                )
        if info is not None:
            self._host.destroy_domain(info.domid)
        self._vifs.plug(instance, network_info)
        self.create(instance, network_info)

    def power_off(self, instance, timeout: int = 0) -> None:
        """Shut the guest down (destroy it after ``timeout`` 0, as Nova's
        hard power off); the domain is gone afterwards, as with xl."""
        info = self.find(instance)
        if info is not None:
            if timeout:
                self._host.shutdown(info.domid)
            else:
                self._host.destroy_domain(info.domid)
        self._powered_off.add(instance.uuid)

    def power_on(self, instance, network_info) -> None:
        info = self.find(instance)
        if info is None:
            self._vifs.plug(instance, network_info)
            self.create(instance, network_info)
        elif info.state == base.DomainState.PAUSED:
            self._host.unpause(info.domid)

    def pause(self, instance) -> None:
        self._host.pause(self.domain(instance).domid)

    def unpause(self, instance) -> None:
        self._host.unpause(self.domain(instance).domid)

    def suspend(self, instance) -> None:
        info = self.domain(instance)
        path = self.save_path(instance)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            savefile.save_to_path(self._host, info.domid, path)
        except BaseException:
            self._remove_save_file(instance)
            with contextlib.suppress(base.HostError):
                self._host.unpause(info.domid)
            raise
        self._host.destroy_domain(info.domid)
        LOG.info("Saved domain %d to %s", info.domid, path, instance=instance)

    def resume(self, instance, network_info) -> None:
        path = self.save_path(instance)
        self._vifs.plug(instance, network_info)
        domid = savefile.restore_from_path(self._host, path)
        self._remove_save_file(instance)
        LOG.info("Restored domain %d from %s", domid, path, instance=instance)

    def _remove_save_file(self, instance) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.save_path(instance))

    def get_console_output(self, instance) -> str:
        return self._host.console_output(self.domain(instance).domid)
