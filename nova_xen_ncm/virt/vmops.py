"""Instance lifecycle on a Xen host: a Nova instance is one domain.

A domain is named after the instance (``instance.name``) and carries the
instance's UUID, so it is found again by UUID after a restart or a live
migration (where its domid stays the same but the host changes). Powering
off destroys the domain, as ``xl shutdown`` does; powering on builds it
again from the flavor. Suspend saves the guest to a file under
``[DEFAULT] instances_path`` with the migration stream (``xl save``) and
destroys the domain; resume restores it with its domid.

The root disk is one raw file on storage every host shares: where the
host driver places it (:meth:`HostDriver.disk_path`), or
``<instances_path>/<uuid>/disk`` handed to the host as the vbd's target.
Spawn writes the Glance image into it once; a later boot, a cold
migration or an evacuation finds it there.
"""

from __future__ import annotations

import contextlib
import os
import time

import nova.conf
from nova import exception
from nova.compute import power_state
from nova.compute import vm_states
from nova.virt import driver as nova_driver
from nova.virt import hardware
from nova.virt import images
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
ROOT_DISK_FILE = "disk"
# A disk whose flavor gives no size gets its image's, in whole MiB (a
# multiple of every sector size), and never less than this.
MIN_DISK_BYTES = 1 * MiB

# How often a guest asked to shut down is looked at (Nova's libvirt
# driver looks every second).
SHUTDOWN_POLL = 0.2
# How often a guest that could not be asked (no PV drivers yet) is
# asked again.
NOT_ASKED_RETRY = 1.0
# A guest in these states has stopped running for good.
STOPPED_STATES = frozenset({base.DomainState.SHUTDOWN, base.DomainState.DYING})

POWER_STATES = {
    base.DomainState.RUNNING: power_state.RUNNING,
    base.DomainState.PAUSED: power_state.PAUSED,
    base.DomainState.SHUTDOWN: power_state.SHUTDOWN,
    base.DomainState.CRASHED: power_state.CRASHED,
    base.DomainState.DYING: power_state.SHUTDOWN,
}


def root_disk_path(host: base.HostDriver, instance) -> str:
    """The file of ``instance``'s root disk on the shared storage."""
    path = host.disk_path(instance.uuid, ROOT_VBD_DEVID)
    if path is None:
        path = os.path.join(CONF.instances_path, instance.uuid, ROOT_DISK_FILE)
    return path


def domain_config(
    instance, network_info, host: base.HostDriver
) -> base.DomainConfig:
    """The domain of ``instance``: its flavor's vCPUs and RAM, a vif per
    port of ``network_info`` (devid in port order, the port's MAC) and
    the root disk as xvda, of the size its file has (spawn made it)."""
    flavor = instance.flavor
    devices = [
        base.DeviceConfig(kind="vif", devid=index, mac=vif["address"])
        for index, vif in enumerate(network_info or ())
    ]
    path = root_disk_path(host, instance)
    try:
        disk_bytes = os.path.getsize(path)
    except FileNotFoundError:
        disk_bytes = flavor.root_gb * GiB or None
    extra = {}
    if host.disk_path(instance.uuid, ROOT_VBD_DEVID) is None:
        extra = {"target": path, "format": "raw"}
    devices.append(
        base.DeviceConfig(
            kind="vbd",
            devid=ROOT_VBD_DEVID,
            disk_bytes=disk_bytes,
            extra=extra,
        )
    )
    return base.DomainConfig(
        name=instance.name,
        uuid=instance.uuid,
        memory_bytes=flavor.memory_mb * MiB,
        vcpus=flavor.vcpus,
        devices=tuple(devices),
    )


def check_block_devices(instance, block_device_info) -> None:
    """Refuse, before anything is made, the disks this driver cannot
    give a guest: volumes, ephemeral disks and swap (only the image's
    root disk on the shared storage is supported)."""
    reasons = []
    if nova_driver.block_device_info_get_mapping(block_device_info):
        reasons.append("volumes (boot from volume, attached volumes)")
    if instance.flavor.ephemeral_gb or (
        nova_driver.block_device_info_get_ephemerals(block_device_info)
    ):
        reasons.append("ephemeral disks")
    swap = nova_driver.block_device_info_get_swap(block_device_info)
    if instance.flavor.swap or nova_driver.swap_is_usable(swap):
        reasons.append("swap disks")
    # InvalidInput: Nova aborts the build instead of trying another
    # host, which would refuse it too.
    if not instance.image_ref:
        raise exception.InvalidInput(
            reason=f"instance {instance.uuid}: the xen_ncm driver boots a "
            "guest from its image only (no boot from volume)",
        )
    if reasons:
        raise exception.InvalidInput(
            reason=f"instance {instance.uuid}: the xen_ncm driver gives a "
            "guest only its image's root disk on the shared storage; it "
            "has no " + ", ".join(reasons),
        )


def _round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


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

    def spawn(
        self,
        context,
        instance,
        image_meta,
        network_info,
        block_device_info=None,
        power_on: bool = True,
    ) -> None:
        check_block_devices(instance, block_device_info)
        self.write_image(context, instance, image_meta)
        if not power_on:
            # A stopped instance has no domain; power_on builds it.
            return
        with self._vifs.plugged_and_reported(instance, network_info):
            self.create(instance, network_info)

    def write_image(self, context, instance, image_meta) -> None:
        """Write the instance's raw Glance image into its root disk,
        unless the disk is there already (an evacuation finds the one on
        the shared storage and keeps the guest's data)."""
        path = root_disk_path(self._host, instance)
        if os.path.exists(path):
            LOG.info(
                "Root disk %s exists, keeping it", path, instance=instance
            )
            return
        image_id = instance.image_ref
        disk_format = (
            image_meta.disk_format
            if image_meta.obj_attr_is_set("disk_format")
            else None
        )
        if disk_format != "raw":
            raise exception.ImageUnacceptable(
                image_id=image_id,
                reason=f"disk format {disk_format!r}: the xen_ncm driver "
                "writes only raw images into a root disk",
            )
        disk_bytes = instance.flavor.root_gb * GiB
        # Glance's size, before anything is downloaded: an image the disk
        # cannot hold must not fill the shared storage first.
        listed = image_meta.size if image_meta.obj_attr_is_set("size") else 0
        if disk_bytes and listed > disk_bytes:
            raise exception.FlavorDiskSmallerThanImage(
                flavor_size=disk_bytes, image_size=listed
            )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".part"
        try:
            images.fetch(
                context,
                image_id,
                partial,
                trusted_certs=instance.trusted_certs,
            )
            self._inspect(image_id, partial)
            image_bytes = os.path.getsize(partial)
            if disk_bytes and image_bytes > disk_bytes:
                raise exception.FlavorDiskSmallerThanImage(
                    flavor_size=disk_bytes, image_size=image_bytes
                )
            if not disk_bytes:
                disk_bytes = max(_round_up(image_bytes, MiB), MIN_DISK_BYTES)
            os.truncate(partial, disk_bytes)
            os.rename(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        LOG.info(
            "Wrote image %s (%d bytes) into root disk %s of %d bytes",
            image_id,
            image_bytes,
            path,
            disk_bytes,
            instance=instance,
        )

    @staticmethod
    def _inspect(image_id: str, path: str) -> None:
        """Refuse a file Glance calls raw whose content is another
        format (a qcow2 naming a backing file on the host, a VMDK naming
        extents): the guest would read its header as its disk, and a
        later tool reading it as that format could follow the references.
        Nova's own check, as its fetch_to_raw runs it (raises
        ImageUnacceptable: the build is aborted, not rescheduled)."""
        if CONF.workarounds.disable_deep_image_inspection:
            return
        images.do_image_deep_inspection({"disk_format": "raw"}, image_id, path)

    def grow_root_disk(self, instance, root_gb: int) -> None:
        """Give the root disk ``root_gb`` GiB (resize); it never shrinks."""
        path = root_disk_path(self._host, instance)
        have = os.path.getsize(path)
        want = root_gb * GiB
        if want < have:
            raise exception.ResizeError(
                reason=f"the root disk holds {have} bytes; a disk of "
                f"{want} bytes cannot hold it"
            )
        if want > have:
            os.truncate(path, want)
            LOG.info(
                "Root disk %s grown from %d to %d bytes",
                path,
                have,
                want,
                instance=instance,
            )

    def delete_disks(self, instance) -> None:
        """Remove the root disk from the shared storage (and its
        directory when this driver made one)."""
        path = root_disk_path(self._host, instance)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if self._host.disk_path(instance.uuid, ROOT_VBD_DEVID) is None:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))

    def create(self, instance, network_info) -> int:
        config = domain_config(instance, network_info, self._host)
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
        if destroy_disks:
            # A stopped guest has no domain to take its disk with it.
            self.delete_disks(instance)

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

    def power_off(
        self, instance, timeout: int = 0, retry_interval: int = 0
    ) -> None:
        """Power the guest off as Nova's contract says: with ``timeout``,
        ask the guest to shut down first (again every ``retry_interval``
        seconds: it may have missed the request while booting) and wait
        up to ``timeout`` seconds for it to stop; then, or at once with
        ``timeout`` 0 (a hard power off), destroy the domain. The domain
        is gone afterwards, as with ``xl shutdown`` and libxl's
        on_poweroff=destroy."""
        info = self.find(instance)
        if info is not None:
            if timeout and self._clean_shutdown(
                instance, info.domid, timeout, retry_interval
            ):
                LOG.info("The guest shut itself down", instance=instance)
            # A guest that shut down is freed; one that did not is stopped.
            with contextlib.suppress(base.DomainNotFound):
                self._host.destroy_domain(info.domid)
        self._powered_off.add(instance.uuid)

    def _clean_shutdown(
        self, instance, domid: int, timeout: int, retry_interval: int
    ) -> bool:
        """Whether the guest shut down within ``timeout`` seconds of
        being asked (libvirt driver's _clean_shutdown, on libxl). A guest
        that cannot be asked yet (its PV drivers are not up: it may be
        booting) is asked again every second, one that was asked every
        ``retry_interval``; either way it has the whole ``timeout``, as
        Nova's contract gives it (an image that never has PV drivers
        sets os_shutdown_timeout 0 for an immediate power off)."""
        asked = self._ask_to_shut_down(instance, domid)
        start = asked_at = time.monotonic()
        while True:
            try:
                state = self._host.domain_info(domid).state
            except base.DomainNotFound:
                return True
            if state in STOPPED_STATES:
                return True
            now = time.monotonic()
            if now - start >= timeout:
                LOG.warning(
                    "The guest %s within %d seconds: powering it off",
                    "did not shut down"
                    if asked
                    else "could never be asked to shut down (no PV "
                    "control interface)",
                    timeout,
                    instance=instance,
                )
                return False
            period = retry_interval if asked else NOT_ASKED_RETRY
            if period and now - asked_at >= period:
                if asked:
                    LOG.info(
                        "The guest did not shut down in %d seconds: "
                        "asking again",
                        retry_interval,
                        instance=instance,
                    )
                asked = self._ask_to_shut_down(instance, domid) or asked
                asked_at = now
            time.sleep(min(SHUTDOWN_POLL, timeout - (now - start)))

    def _ask_to_shut_down(self, instance, domid: int) -> bool:
        """Whether the request reached the guest (or it is gone)."""
        try:
            self._host.shutdown(domid)
        except base.DomainNotFound:
            return True
        except base.NotSupported as exc:
            LOG.info(
                "The guest cannot be asked to shut down yet (%s)",
                exc,
                instance=instance,
            )
            return False
        return True

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
        path = self.save_path(instance)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Made for the save file alone when the root disk is where the
        # host driver places it: an empty one would outlive the guest.
        # A directory still holding the root disk (or anything else) is
        # not empty and stays.
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))

    def get_console_output(self, instance) -> str:
        return self._host.console_output(self.domain(instance).domid)
