"""Cold migration, resize and evacuation on shared storage.

The root disk is one file every host sees (vmops), so nothing is copied:
the source powers the guest off and destroys its domain before Nova casts
to the destination, which boots the same disk; a revert destroys the
destination's domain before the source boots it again. At no point do
two hosts run the guest. Evacuation is Nova's default rebuild: spawn on
the new host finds the disk and keeps it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from nova import exception
from oslo_log import log as logging
from oslo_serialization import jsonutils

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import vifops as vifops_module
from nova_xen_ncm.virt import vmops as vmops_module

LOG = logging.getLogger(__name__)

GiB = 1 << 30


class MigrationOps:
    """Both ends of cold migrations and resizes of one host driver."""

    def __init__(
        self,
        host: base.HostDriver,
        vmops: vmops_module.VMOps,
        vifs: vifops_module.VIFOps,
    ) -> None:
        self._host = host
        self._vmops = vmops
        self._vifs = vifs

    # -- source --

    def check_resize(self, instance, flavor, block_device_info) -> str:
        """The root disk's file, once the move to ``flavor`` is known
        possible; raises InstanceFaultRollback (Nova puts the instance
        back as it was) with the reason otherwise, before the guest
        stops."""
        path = vmops_module.root_disk_path(self._host, instance)
        try:
            new = instance.obj_clone()
            new.flavor = flavor
            vmops_module.check_block_devices(new, block_device_info)
            if not os.path.exists(path):
                raise exception.ResizeError(
                    reason=f"the root disk {path} is not on this host's "
                    "storage; a cold migration needs it on the storage "
                    "the hosts share"
                )
            have = os.path.getsize(path)
            if flavor.root_gb and flavor.root_gb * GiB < have:
                raise exception.ResizeError(
                    reason=f"flavor {flavor.name} has a root disk of "
                    f"{flavor.root_gb} GiB, the guest's holds {have} "
                    "bytes: a disk is never shrunk"
                )
        except exception.InvalidInput as exc:
            raise exception.InstanceFaultRollback(
                exception.ResizeError(reason=str(exc))
            ) from exc
        except exception.ResizeError as exc:
            raise exception.InstanceFaultRollback(exc) from exc
        return path

    def migrate_disk_and_power_off(
        self,
        instance,
        flavor,
        network_info,
        block_device_info,
        timeout: int,
        retry_interval: int = 0,
    ) -> str:
        """Stop the guest here for good, asking it to shut down first
        (``timeout``, ``retry_interval`` as for power_off): its disk
        stays on the shared storage for the destination to boot, written
        to the end by a guest that shut down cleanly. Returns Nova's
        disk_info."""
        path = self.check_resize(instance, flavor, block_device_info)
        # Destroys a guest that ignored the request: the destination
        # must not boot its disk while it runs here.
        self._vmops.power_off(instance, timeout, retry_interval)
        self._vifs.unplug(instance, network_info, ignore_errors=True)
        LOG.info(
            "Powered off for a move; root disk %s stays on the shared storage",
            path,
            instance=instance,
        )
        return jsonutils.dumps({"root_disk": path})

    def confirm_migration(self, instance, network_info) -> None:
        """The guest runs on the destination: nothing of it stays here
        but a leftover domain (destroyed without its disk) or vifs."""
        self._vmops.cleanup(
            instance, network_info, destroy_vifs=True, destroy_disks=False
        )

    def finish_revert_migration(
        self, instance, network_info, power_on: bool
    ) -> None:
        """Boot the guest here again from the same disk (Nova destroyed
        the destination's domain before it cast here). A disk a resize
        grew keeps its size: the guest may have written there."""
        self._boot(instance, network_info, power_on)

    # -- destination --

    def finish_migration(
        self, instance, network_info, resize_instance: bool, power_on: bool
    ) -> None:
        path = vmops_module.root_disk_path(self._host, instance)
        if not os.path.exists(path):
            raise exception.ResizeError(
                reason=f"the root disk {path} is not on this host's storage; "
                "the source and this host do not share it"
            )
        if resize_instance and instance.flavor.root_gb:
            self._vmops.grow_root_disk(instance, instance.flavor.root_gb)
        self._boot(instance, network_info, power_on)

    def _boot(self, instance, network_info, power_on: bool) -> None:
        if power_on:
            with self._vifs.plugged_and_reported(instance, network_info):
                self._vmops.create(instance, network_info)
        else:
            self._vifs.plug(instance, network_info)
            self._vmops.power_off(instance)

    # -- shared storage --

    def check_shared_storage_local(self, instance) -> dict:
        """A file made next to the root disk, for the other host to look
        for (Nova's check that both hosts see the instance's files)."""
        directory = os.path.dirname(
            vmops_module.root_disk_path(self._host, instance)
        )
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".xen-ncm-shared-", dir=directory)
        os.close(fd)
        return {"filename": path}

    @staticmethod
    def check_shared_storage_remote(data: dict) -> bool:
        return os.path.exists(data["filename"])

    @staticmethod
    def check_shared_storage_cleanup(data: dict) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data["filename"])

    def instance_on_disk(self, instance) -> bool:
        return os.path.exists(
            vmops_module.root_disk_path(self._host, instance)
        )
