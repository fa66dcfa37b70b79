"""What a compute node offers: resources, inventory, identity.

Memory comes from the host driver (what its domains hold plus what a new
domain could still get), disk from the filesystem the root disks are on
(the host driver's disk directory, or ``[DEFAULT] instances_path``),
vCPUs from the physical CPUs the host driver reports.
"""

from __future__ import annotations

import os
import shutil

import nova.conf
import os_resource_classes as orc
from nova.objects import fields
from oslo_serialization import jsonutils

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import vmops

CONF = nova.conf.CONF

MiB = 1 << 20
GiB = 1 << 30
HYPERVISOR_TYPE = fields.HVType.XEN
# Xen 4.17 as Nova encodes versions (major * 1000000 + minor * 1000).
HYPERVISOR_VERSION = 4017000
# A well-formed UUID to ask the host driver where it places disks.
PROBE_UUID = "00000000-0000-0000-0000-000000000000"


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


class HostOps:
    """Resources of the host behind one host driver."""

    def __init__(self, host: base.HostDriver) -> None:
        self._host = host

    def vcpus(self) -> int:
        """The physical CPUs the host driver reports (Xen's nr_cpus),
        not what this dom0 process may run on."""
        pcpus = self._host.capabilities().pcpus
        if pcpus < 1:
            raise base.NotSupported(
                f"the host driver of {self._host.hostname} reports no "
                "physical CPUs",
                call="capabilities",
            )
        return pcpus

    def memory_mb(self) -> tuple[int, int]:
        """(total, used) MiB of guest memory."""
        used = sum(d.memory_bytes for d in self._host.list_domains())
        total = used + self._host.free_memory()
        return total // MiB, used // MiB

    def disk_directory(self) -> str:
        """Where the instances' root disks are (vmops.root_disk_path)."""
        path = self._host.disk_path(PROBE_UUID, vmops.ROOT_VBD_DEVID)
        return os.path.dirname(path) if path else CONF.instances_path

    def disk_gb(self) -> tuple[int, int]:
        """(total, used) GiB of the filesystem the root disks are on."""
        usage = shutil.disk_usage(_existing_parent(self.disk_directory()))
        return usage.total // GiB, (usage.total - usage.free) // GiB

    def get_available_resource(self, nodename: str, node_uuid: str) -> dict:
        memory_total, memory_used = self.memory_mb()
        disk_total, disk_used = self.disk_gb()
        domains = self._host.list_domains()
        capabilities = self._host.capabilities()
        return {
            "uuid": node_uuid,
            "vcpus": self.vcpus(),
            "memory_mb": memory_total,
            "local_gb": disk_total,
            "vcpus_used": sum(d.vcpus for d in domains),
            "memory_mb_used": memory_used,
            "local_gb_used": disk_used,
            "hypervisor_type": HYPERVISOR_TYPE,
            "hypervisor_version": HYPERVISOR_VERSION,
            "hypervisor_hostname": nodename,
            "cpu_info": jsonutils.dumps(
                {
                    "arch": fields.Architecture.X86_64,
                    "hypervisor": capabilities.hypervisor,
                    "max_vcpus_per_domain": capabilities.max_vcpus,
                }
            ),
            "disk_available_least": disk_total - disk_used,
            "supported_instances": [
                (
                    fields.Architecture.X86_64,
                    HYPERVISOR_TYPE,
                    fields.VMMode.HVM,
                )
            ],
            "numa_topology": None,
        }

    def inventory(
        self, ratios: dict, reserved_disk_gb: int, report_disk: bool = True
    ) -> dict:
        """Placement inventory of the node (VCPU, MEMORY_MB, and DISK_GB
        unless ``report_disk`` is False: a sharing provider holds it)."""
        vcpus = self.vcpus()
        memory_total, _ = self.memory_mb()
        inventory = {
            orc.VCPU: {
                "total": vcpus,
                "min_unit": 1,
                "max_unit": min(vcpus, self._host.capabilities().max_vcpus),
                "step_size": 1,
                "allocation_ratio": ratios[orc.VCPU],
                "reserved": CONF.reserved_host_cpus,
            },
            orc.MEMORY_MB: {
                "total": memory_total,
                "min_unit": 1,
                "max_unit": memory_total,
                "step_size": 1,
                "allocation_ratio": ratios[orc.MEMORY_MB],
                "reserved": CONF.reserved_host_memory_mb,
            },
        }
        disk_total = self.disk_gb()[0] if report_disk else 0
        if disk_total:
            inventory[orc.DISK_GB] = {
                "total": disk_total,
                "min_unit": 1,
                "max_unit": disk_total,
                "step_size": 1,
                "allocation_ratio": ratios[orc.DISK_GB],
                "reserved": reserved_disk_gb,
            }
        return inventory
