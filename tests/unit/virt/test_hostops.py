"""Resources and placement inventory of a host."""

from unittest import mock

import os_resource_classes as orc
import pytest
from oslo_serialization import jsonutils

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import hostops

MiB = 1 << 20


def make_host(pcpus=24):
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.hostname = "unit"
    host.list_domains.return_value = [
        base.DomainInfo(
            domid=1,
            name="a",
            uuid="u",
            state=base.DomainState.RUNNING,
            memory_bytes=512 * MiB,
            vcpus=2,
            populated_pages=1,
            pv_drivers=True,
        )
    ]
    host.free_memory.return_value = 1536 * MiB
    host.disk_path.return_value = None
    host.capabilities.return_value = base.Capabilities(
        host="unit",
        hypervisor="test",
        restore={},
        max_vcpus=4,
        pcpus=pcpus,
    )
    return host


def test_available_resource(tmp_path, monkeypatch):
    monkeypatch.setattr(hostops.CONF, "instances_path", str(tmp_path))
    ops = hostops.HostOps(make_host())
    res = ops.get_available_resource("node1", "uuid-1")
    assert res["memory_mb"] == 2048
    assert res["memory_mb_used"] == 512
    assert res["vcpus_used"] == 2
    # The host driver's report, not what this process may run on.
    assert res["vcpus"] == 24
    assert res["hypervisor_type"] == "xen"
    assert res["hypervisor_hostname"] == "node1"
    assert res["uuid"] == "uuid-1"
    assert res["supported_instances"] == [("x86_64", "xen", "hvm")]
    assert jsonutils.loads(res["cpu_info"])["max_vcpus_per_domain"] == 4


def test_inventory(tmp_path, monkeypatch):
    monkeypatch.setattr(hostops.CONF, "instances_path", str(tmp_path / "x"))
    ops = hostops.HostOps(make_host())
    ratios = {orc.VCPU: 16.0, orc.MEMORY_MB: 1.5, orc.DISK_GB: 1.0}
    inventory = ops.inventory(ratios, reserved_disk_gb=2)
    assert inventory[orc.MEMORY_MB]["total"] == 2048
    assert inventory[orc.MEMORY_MB]["allocation_ratio"] == 1.5
    assert inventory[orc.VCPU]["total"] == 24
    assert inventory[orc.VCPU]["max_unit"] == 4
    assert inventory[orc.DISK_GB]["reserved"] == 2
    shared = ops.inventory(ratios, reserved_disk_gb=2, report_disk=False)
    assert set(shared) == {orc.VCPU, orc.MEMORY_MB}


def test_a_host_that_reports_no_cpus_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hostops.CONF, "instances_path", str(tmp_path))
    ops = hostops.HostOps(make_host(pcpus=0))
    with pytest.raises(base.NotSupported, match="no physical CPUs"):
        ops.get_available_resource("node1", "uuid-1")


def test_disk_is_the_filesystem_the_root_disks_are_on(tmp_path, monkeypatch):
    monkeypatch.setattr(hostops.CONF, "instances_path", str(tmp_path / "i"))
    asked = []

    def disk_usage(path):
        asked.append(path)
        return hostops.shutil._ntuple_diskusage(100 << 30, 40 << 30, 60 << 30)

    monkeypatch.setattr(hostops.shutil, "disk_usage", disk_usage)
    host = make_host()
    assert hostops.HostOps(host).disk_gb() == (100, 40)
    # instances_path does not exist yet: its nearest existing parent.
    assert asked == [str(tmp_path)]
    shared = tmp_path / "shared"
    shared.mkdir()
    host.disk_path.return_value = str(shared / "x-51712.disk")
    assert hostops.HostOps(host).disk_gb() == (100, 40)
    assert asked[-1] == str(shared)
