"""Instance lifecycle on a host driver (the host is an autospec mock)."""

from unittest import mock

import pytest
from nova import context
from nova import objects
from nova.compute import power_state
from nova.tests.unit import fake_instance

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import vifops
from nova_xen_ncm.virt import vmops

MiB = 1 << 20
GiB = 1 << 30
NETWORK_INFO = [{"id": "port-1", "address": "fa:16:3e:00:00:01"}]


@pytest.fixture
def instance():
    objects.register_all()
    flavor = objects.Flavor(vcpus=2, memory_mb=64, root_gb=3)
    return fake_instance.fake_instance_obj(
        context.get_admin_context(), flavor=flavor
    )


@pytest.fixture
def host():
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.hostname = "unit"
    return host


@pytest.fixture
def vifs():
    return mock.create_autospec(vifops.VIFOps, instance=True)


@pytest.fixture
def ops(host, vifs, tmp_path, monkeypatch):
    monkeypatch.setattr(vmops.CONF, "instances_path", str(tmp_path))
    return vmops.VMOps(host, vifs)


def info(state=base.DomainState.RUNNING, domid=7):
    return base.DomainInfo(
        domid=domid,
        name="instance-00000001",
        uuid="u",
        state=state,
        memory_bytes=64 * MiB,
        vcpus=2,
        populated_pages=1,
        pv_drivers=True,
    )


def test_domain_config_from_flavor_and_ports(instance):
    network_info = [{"address": "fa:16:3e:00:00:01"}, {"address": "m2"}]
    config = vmops.domain_config(instance, network_info)
    assert config.name == instance.name
    assert config.uuid == instance.uuid
    assert config.vcpus == 2
    assert config.memory_bytes == 64 * MiB
    assert [(d.kind, d.devid, d.mac) for d in config.devices] == [
        ("vif", 0, "fa:16:3e:00:00:01"),
        ("vif", 1, "m2"),
        ("vbd", vmops.ROOT_VBD_DEVID, None),
    ]
    assert config.devices[-1].disk_bytes == 3 * GiB


def test_get_info_maps_state(ops, host, instance):
    host.find_domain.return_value = info(base.DomainState.PAUSED)
    result = ops.get_info(instance)
    assert result.state == power_state.PAUSED
    assert result.internal_id == 7
    host.find_domain.assert_called_once_with(instance.uuid)


def test_get_info_without_domain(ops, host, instance):
    host.find_domain.side_effect = base.DomainNotFound("no")
    with pytest.raises(base.DomainNotFound):
        ops.get_info(instance)
    assert not ops.instance_exists(instance)


def test_stopped_instance_is_shut_down(ops, host, instance):
    host.find_domain.side_effect = base.DomainNotFound("no")
    instance.vm_state = "stopped"
    assert ops.get_info(instance).state == power_state.SHUTDOWN


def test_spawn_powered_off_creates_nothing(ops, host, vifs, instance):
    ops.spawn(instance, [], power_on=False)
    host.create_domain.assert_not_called()
    vifs.plugged_and_reported.assert_not_called()
    ops.spawn(instance, NETWORK_INFO)
    host.create_domain.assert_called_once()
    # The domain is built while Nova waits for Neutron's events.
    vifs.plugged_and_reported.assert_called_once_with(instance, NETWORK_INFO)
    vifs.plugged_and_reported.return_value.__enter__.assert_called_once()


def test_soft_reboot_falls_back_to_hard(ops, host, instance):
    host.find_domain.return_value = info()
    host.shutdown.side_effect = base.NotSupported("no reboot")
    ops.reboot(instance, [], "SOFT")
    host.shutdown.assert_called_once_with(7, reboot=True)
    host.destroy_domain.assert_called_once_with(7)
    host.create_domain.assert_called_once()


def test_power_on(ops, host, instance):
    host.find_domain.return_value = info(base.DomainState.PAUSED)
    ops.power_on(instance, [])
    host.unpause.assert_called_once_with(7)
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.power_on(instance, [])
    host.create_domain.assert_called_once()


def test_destroy_deletes_disks_only_when_nova_says_so(ops, host, instance):
    host.find_domain.return_value = info()
    ops.destroy(instance, [], destroy_disks=True)
    host.destroy_domain.assert_called_once_with(7, delete_disks=True)
    host.destroy_domain.reset_mock()
    ops.cleanup(instance)
    host.destroy_domain.assert_called_once_with(7, delete_disks=False)
    host.destroy_domain.reset_mock()
    # A hard reboot keeps the disks.
    ops.reboot(instance, [], "HARD")
    host.destroy_domain.assert_called_once_with(7)


def test_power_off_destroys(ops, host, instance):
    host.find_domain.return_value = info()
    ops.power_off(instance)
    host.destroy_domain.assert_called_once_with(7)
    ops.power_off(instance, timeout=30)
    host.shutdown.assert_called_once_with(7)


def test_suspend_and_resume_use_a_save_file(ops, host, instance):
    host.find_domain.return_value = info()
    with mock.patch.object(vmops.savefile, "save_to_path") as save:
        save.side_effect = lambda h, d, p: open(p, "wb").close()
        ops.suspend(instance)
    save.assert_called_once_with(host, 7, ops.save_path(instance))
    host.destroy_domain.assert_called_once_with(7)
    host.find_domain.side_effect = base.DomainNotFound("no")
    assert ops.get_info(instance).state == power_state.SUSPENDED
    with mock.patch.object(
        vmops.savefile, "restore_from_path", return_value=7
    ) as restore:
        ops.resume(instance, NETWORK_INFO)
    restore.assert_called_once_with(host, ops.save_path(instance))
    assert not ops.instance_exists(instance)


def test_failed_suspend_resumes_the_guest(ops, host, instance):
    host.find_domain.return_value = info()
    with mock.patch.object(
        vmops.savefile, "save_to_path", side_effect=OSError("disk full")
    ):
        with pytest.raises(OSError):
            ops.suspend(instance)
    host.unpause.assert_called_once_with(7)
    host.destroy_domain.assert_not_called()


def test_destroy_and_cleanup_tolerate_a_missing_domain(
    ops, host, vifs, instance
):
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.destroy(instance, NETWORK_INFO)
    ops.cleanup(instance, NETWORK_INFO)
    host.destroy_domain.assert_not_called()
    # The vifs go all the same; their failures do not stop a destroy.
    assert vifs.unplug.call_args_list == [
        mock.call(instance, NETWORK_INFO, ignore_errors=True),
        mock.call(instance, NETWORK_INFO, ignore_errors=True),
    ]
    vifs.unplug.reset_mock()
    ops.cleanup(instance, NETWORK_INFO, destroy_vifs=False)
    vifs.unplug.assert_not_called()


def test_power_on_and_hard_reboot_plug_first(ops, host, vifs, instance):
    order = []
    vifs.plug.side_effect = lambda *a: order.append("plug")
    host.create_domain.side_effect = lambda c: order.append("create") or 7
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.power_on(instance, NETWORK_INFO)
    ops.reboot(instance, NETWORK_INFO, "HARD")
    assert order == ["plug", "create", "plug", "create"]
