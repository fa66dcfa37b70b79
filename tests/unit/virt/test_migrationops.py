"""Cold migration and resize on the shared storage (the host is an
autospec mock, the disks real files)."""

import json
import os
from unittest import mock

import pytest
from nova import context
from nova import exception
from nova import objects
from nova.tests.unit import fake_instance

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import migrationops
from nova_xen_ncm.virt import vifops
from nova_xen_ncm.virt import vmops

GiB = 1 << 30
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"


def flavor(root_gb=1, **kw):
    fields = dict(
        name=f"f{root_gb}",
        vcpus=1,
        memory_mb=32,
        root_gb=root_gb,
        ephemeral_gb=0,
        swap=0,
    )
    fields.update(kw)
    return objects.Flavor(**fields)


@pytest.fixture
def instance():
    objects.register_all()
    return fake_instance.fake_instance_obj(
        context.get_admin_context(), flavor=flavor(), image_ref=IMAGE_ID
    )


@pytest.fixture
def host(tmp_path):
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.hostname = "unit"
    # A host that places the disks itself, in one directory both see.
    host.disk_path.side_effect = lambda uuid, devid: str(
        tmp_path / "shared" / f"{uuid}-{devid}.disk"
    )
    return host


@pytest.fixture
def vifs():
    return mock.create_autospec(vifops.VIFOps, instance=True)


@pytest.fixture
def ops(host, vifs):
    return migrationops.MigrationOps(host, vmops.VMOps(host, vifs), vifs)


@pytest.fixture
def disk(host, instance):
    path = vmops.root_disk_path(host, instance)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"guest")
        f.truncate(GiB)
    return path


def running(domid=7):
    return base.DomainInfo(
        domid=domid,
        name="instance-00000001",
        uuid="u",
        state=base.DomainState.RUNNING,
        memory_bytes=32 << 20,
        vcpus=1,
        populated_pages=1,
        pv_drivers=True,
    )


def test_migrate_powers_off_and_keeps_the_disk(
    ops, host, vifs, instance, disk, monkeypatch
):
    # The guest ignores the shutdown request: asked again every
    # retry_interval, its domain is destroyed at the timeout, before the
    # destination may boot the disk.
    now = [0.0]
    monkeypatch.setattr(vmops.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(
        vmops.time, "sleep", lambda s: now.__setitem__(0, now[0] + s)
    )
    host.find_domain.return_value = running()
    host.domain_info.return_value = running()
    info = ops.migrate_disk_and_power_off(
        instance, flavor(2), [], None, 30, 20
    )
    assert json.loads(info) == {"root_disk": disk}
    assert host.shutdown.call_args_list == [mock.call(7), mock.call(7)]
    assert round(now[0]) == 30
    host.destroy_domain.assert_called_once_with(7)
    vifs.unplug.assert_called_once_with(instance, [], ignore_errors=True)
    assert os.path.getsize(disk) == GiB


@pytest.mark.parametrize(
    "new, says",
    [
        (flavor(0, ephemeral_gb=1), "ephemeral"),
        (flavor(0, swap=64), "swap"),
    ],
)
def test_migrate_refuses_what_the_new_flavor_cannot_have(
    ops, host, instance, disk, new, says
):
    host.find_domain.return_value = running()
    with pytest.raises(exception.InstanceFaultRollback, match=says):
        ops.migrate_disk_and_power_off(instance, new, [], None, 0)
    host.shutdown.assert_not_called()
    host.destroy_domain.assert_not_called()


def test_migrate_refuses_a_smaller_disk_or_none_shared(
    ops, host, instance, disk
):
    host.find_domain.return_value = running()
    with open(disk, "r+b") as f:
        f.truncate(2 * GiB)
    with pytest.raises(exception.InstanceFaultRollback, match="never shrunk"):
        ops.migrate_disk_and_power_off(instance, flavor(1), [], None, 0)
    os.unlink(disk)
    with pytest.raises(exception.InstanceFaultRollback, match="shared"):
        ops.migrate_disk_and_power_off(instance, flavor(1), [], None, 0)
    host.destroy_domain.assert_not_called()


def test_finish_migration_grows_the_disk_and_boots_it(
    ops, host, vifs, instance, disk
):
    instance.flavor = flavor(3)
    ops.finish_migration(instance, [], resize_instance=True, power_on=True)
    assert os.path.getsize(disk) == 3 * GiB
    with open(disk, "rb") as f:
        assert f.read(5) == b"guest"
    config = host.create_domain.call_args.args[0]
    assert config.devices[-1].disk_bytes == 3 * GiB
    vifs.plugged_and_reported.assert_called_once_with(instance, [])


def test_finish_migration_powered_off_builds_nothing(
    ops, host, instance, disk
):
    ops.finish_migration(instance, [], resize_instance=False, power_on=False)
    host.create_domain.assert_not_called()


def test_finish_migration_without_the_disk_fails(ops, host, instance):
    with pytest.raises(exception.ResizeError, match="do not share"):
        ops.finish_migration(instance, [], False, True)
    host.create_domain.assert_not_called()


def test_revert_boots_the_same_disk(ops, host, instance, disk):
    ops.finish_revert_migration(instance, [], power_on=True)
    config = host.create_domain.call_args.args[0]
    assert config.devices[-1].disk_bytes == GiB


def test_confirm_removes_a_leftover_domain_but_not_the_disk(
    ops, host, instance, disk
):
    host.find_domain.return_value = running()
    ops.confirm_migration(instance, [])
    host.destroy_domain.assert_called_once_with(7, delete_disks=False)
    assert os.path.exists(disk)


def test_shared_storage_checks(ops, host, instance, disk, tmp_path):
    data = ops.check_shared_storage_local(instance)
    assert os.path.dirname(data["filename"]) == os.path.dirname(disk)
    assert ops.check_shared_storage_remote(data)
    ops.check_shared_storage_cleanup(data)
    assert not ops.check_shared_storage_remote(data)
    assert ops.instance_on_disk(instance)
    os.unlink(disk)
    assert not ops.instance_on_disk(instance)
