"""Instance lifecycle on a host driver (the host is an autospec mock)."""

import os
from unittest import mock

import pytest
from nova import context
from nova import exception
from nova import objects
from nova.compute import power_state
from nova.tests.unit import fake_instance

from nova_xen_ncm.host import base
from nova_xen_ncm.virt import vifops
from nova_xen_ncm.virt import vmops

MiB = 1 << 20
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
GiB = 1 << 30
NETWORK_INFO = [{"id": "port-1", "address": "fa:16:3e:00:00:01"}]


@pytest.fixture
def instance():
    objects.register_all()
    flavor = objects.Flavor(
        vcpus=2, memory_mb=64, root_gb=3, ephemeral_gb=0, swap=0
    )
    instance = fake_instance.fake_instance_obj(
        context.get_admin_context(), flavor=flavor, image_ref=IMAGE_ID
    )
    # No certificates to verify the image with (else loaded from the DB).
    instance.trusted_certs = None
    return instance


@pytest.fixture
def host():
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.hostname = "unit"
    # As real Xen: the driver names the disk files.
    host.disk_path.return_value = None
    return host


@pytest.fixture
def vifs():
    return mock.create_autospec(vifops.VIFOps, instance=True)


RAW = objects.ImageMeta.from_dict({"disk_format": "raw"})
IMAGE = b"a raw image\n" * 100


@pytest.fixture
def fetched(monkeypatch):
    """What Glance hands out, by image id; the ids fetched."""
    calls = []

    def fetch(ctxt, image_id, path, trusted_certs=None):
        calls.append(image_id)
        with open(path, "wb") as f:
            f.write(IMAGE)

    monkeypatch.setattr(vmops.images, "fetch", fetch)
    return calls


@pytest.fixture
def ops(host, vifs, tmp_path, monkeypatch, fetched):
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
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.disk_path.return_value = None
    config = vmops.domain_config(instance, network_info, host)
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
    # Real Xen is told the file; a host that places disks is not.
    assert config.devices[-1].extra == {
        "target": vmops.root_disk_path(host, instance),
        "format": "raw",
    }
    host.disk_path.return_value = "/shared/disk"
    config = vmops.domain_config(instance, network_info, host)
    assert config.devices[-1].extra == {}


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
    ops.spawn(None, instance, RAW, [], power_on=False)
    host.create_domain.assert_not_called()
    vifs.plugged_and_reported.assert_not_called()
    ops.spawn(None, instance, RAW, NETWORK_INFO)
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


@pytest.fixture
def clock(monkeypatch):
    """vmops' time: sleeping moves it on."""
    now = [1000.0]

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(vmops.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(vmops.time, "sleep", sleep)
    return now


def test_a_hard_power_off_destroys_without_asking(ops, host, instance):
    host.find_domain.return_value = info()
    ops.power_off(instance)
    host.shutdown.assert_not_called()
    host.destroy_domain.assert_called_once_with(7)


def test_power_off_asks_the_guest_first_and_frees_what_shut_down(
    ops, host, instance, clock
):
    host.find_domain.return_value = info()
    calls = []
    host.shutdown.side_effect = lambda domid: calls.append("asked")
    # The guest shuts down 3 s after it was asked.
    asked_at = clock[0]
    host.domain_info.side_effect = lambda domid: info(
        base.DomainState.SHUTDOWN
        if clock[0] - asked_at >= 3
        else base.DomainState.RUNNING
    )
    host.destroy_domain.side_effect = lambda domid: calls.append("destroy")
    ops.power_off(instance, timeout=60, retry_interval=10)
    # Asked before the domain went (Nova's contract), once: it obeyed
    # before the retry interval.
    assert calls == ["asked", "destroy"]
    assert clock[0] - asked_at < 4


def test_power_off_asks_again_then_destroys_a_guest_that_ignores_it(
    ops, host, instance, clock
):
    host.find_domain.return_value = info()
    host.domain_info.return_value = info()
    start = clock[0]
    asked = []
    host.shutdown.side_effect = lambda domid: asked.append(clock[0] - start)
    ops.power_off(instance, timeout=25, retry_interval=10)
    # At 0, then every retry_interval, until timeout; then destroyed.
    assert [round(t) for t in asked] == [0, 10, 20]
    assert round(clock[0] - start) == 25
    host.destroy_domain.assert_called_once_with(7)


def test_power_off_gives_a_guest_that_cannot_be_asked_its_timeout(
    ops, host, instance, clock
):
    host.find_domain.return_value = info()
    host.domain_info.return_value = info()
    start = clock[0]
    tried = []

    def shutdown(domid):
        tried.append(round(clock[0] - start, 1))
        raise base.NotSupported("no PV control")

    host.shutdown.side_effect = shutdown
    ops.power_off(instance, timeout=5, retry_interval=10)
    # Tried every second (its PV drivers may come up), never destroyed
    # before the timeout Nova gave it.
    assert tried == [0, 1, 2, 3, 4]
    assert round(clock[0] - start) == 5
    host.destroy_domain.assert_called_once_with(7)


def test_power_off_asks_a_booting_guest_once_its_pv_drivers_are_up(
    ops, host, instance, clock
):
    host.find_domain.return_value = info()
    start = clock[0]
    asked = []

    def shutdown(domid):
        # The guest's PV drivers come up 2 s in.
        if clock[0] - start < 2:
            raise base.NotSupported("no PV control yet")
        asked.append(clock[0] - start)

    host.shutdown.side_effect = shutdown
    # It shuts down 1 s after it was asked.
    host.domain_info.side_effect = lambda domid: info(
        base.DomainState.SHUTDOWN
        if asked and clock[0] - start - asked[0] >= 1
        else base.DomainState.RUNNING
    )
    ops.power_off(instance, timeout=60, retry_interval=10)
    assert [round(t) for t in asked] == [2]
    assert round(clock[0] - start) == 3
    host.destroy_domain.assert_called_once_with(7)


def test_power_off_of_a_guest_gone_while_asked_again(
    ops, host, instance, clock
):
    host.find_domain.return_value = info()
    gone = []

    def domain_info(domid):
        if gone:
            raise base.DomainNotFound("gone")
        return info()

    def shutdown(domid):
        if host.shutdown.call_count == 2:
            # Destroyed by someone else between two looks.
            gone.append(True)
            raise base.DomainNotFound("gone")

    host.domain_info.side_effect = domain_info
    host.shutdown.side_effect = shutdown
    host.destroy_domain.side_effect = base.DomainNotFound("gone")
    ops.power_off(instance, timeout=60, retry_interval=10)
    # The second request found no domain: not an error, it is off.
    assert host.shutdown.call_count == 2
    assert instance.uuid in ops._powered_off


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


def test_a_resumed_guest_leaves_no_empty_instance_directory(
    ops, host, instance, tmp_path
):
    # The host driver places the root disk (a host whose instances_path
    # is its own): the directory was made for the save file alone.
    host.disk_path.return_value = str(tmp_path / "shared" / "disk")
    host.find_domain.return_value = info()
    directory = os.path.dirname(ops.save_path(instance))
    with mock.patch.object(vmops.savefile, "save_to_path") as save:
        save.side_effect = lambda h, d, p: open(p, "wb").close()
        ops.suspend(instance)
    assert os.path.isdir(directory)
    with mock.patch.object(
        vmops.savefile, "restore_from_path", return_value=7
    ):
        ops.resume(instance, NETWORK_INFO)
    assert not os.path.exists(directory)


def test_a_destroyed_suspended_guest_leaves_no_empty_directory(
    ops, host, instance, tmp_path
):
    host.disk_path.return_value = str(tmp_path / "shared" / "disk")
    directory = os.path.dirname(ops.save_path(instance))
    os.makedirs(directory)
    open(ops.save_path(instance), "wb").close()
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.destroy(instance, NETWORK_INFO, destroy_disks=False)
    assert not os.path.exists(directory)


def test_the_instance_directory_holding_the_disk_stays(ops, host, instance):
    # instances_path holds the root disk (the shared path): cleaning the
    # save file up must not take the guest's disk directory with it.
    path = vmops.root_disk_path(host, instance)
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()
    open(ops.save_path(instance), "wb").close()
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.cleanup(instance, NETWORK_INFO)
    assert os.path.exists(path)
    assert not os.path.exists(ops.save_path(instance))


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


def test_spawn_writes_the_image_into_the_root_disk(
    ops, host, instance, fetched
):
    ops.spawn(None, instance, RAW, [])
    path = vmops.root_disk_path(host, instance)
    with open(path, "rb") as f:
        assert f.read(len(IMAGE)) == IMAGE
    # The flavor's root disk, the rest of it zeros (sparse).
    assert os.path.getsize(path) == 3 * GiB
    assert fetched == [instance.image_ref]
    config = host.create_domain.call_args.args[0]
    assert config.devices[-1].disk_bytes == 3 * GiB
    assert config.devices[-1].extra["target"] == path
    # A disk already there (an evacuation on shared storage) is kept.
    with open(path, "r+b") as f:
        f.write(b"guest data")
    ops.spawn(None, instance, RAW, [], power_on=False)
    assert fetched == [instance.image_ref]
    with open(path, "rb") as f:
        assert f.read(10) == b"guest data"


def test_spawn_sizes_a_disk_without_a_flavor_size_from_the_image(
    ops, host, instance
):
    instance.flavor.root_gb = 0
    ops.spawn(None, instance, RAW, [], power_on=False)
    assert os.path.getsize(vmops.root_disk_path(host, instance)) == MiB


# The header "qemu-img create -f qcow2 <file> 1M" writes (version 3).
QCOW2_HEADER = bytes.fromhex(
    "514649fb00000003000000000000000000000000000000100000000000100000"
    "0000000000000001000000000003000000000000000100000000000100000000"
    "0000000000000000000000000000000000000000000000000000000000000004"
    "0000007000000000"
)


def test_spawn_refuses_a_qcow2_image_glance_calls_raw(
    ops, host, instance, monkeypatch
):
    def fetch(ctxt, image_id, path, trusted_certs=None):
        with open(path, "wb") as f:
            f.write(QCOW2_HEADER)
            f.truncate(MiB)

    monkeypatch.setattr(vmops.images, "fetch", fetch)
    with pytest.raises(exception.ImageUnacceptable, match="unacceptable"):
        ops.spawn(None, instance, RAW, [])
    path = vmops.root_disk_path(host, instance)
    assert os.listdir(os.path.dirname(path)) == []
    host.create_domain.assert_not_called()


def test_spawn_refuses_before_downloading_an_image_glance_lists_larger(
    ops, host, instance, fetched
):
    instance.flavor.root_gb = 1
    meta = objects.ImageMeta.from_dict({"disk_format": "raw", "size": GiB + 1})
    with pytest.raises(exception.FlavorDiskSmallerThanImage):
        ops.spawn(None, instance, meta, [])
    assert fetched == []
    assert not os.path.exists(vmops.root_disk_path(host, instance))


def test_spawn_passes_the_instance_trusted_certs_to_glance(
    ops, instance, monkeypatch
):
    seen = []

    def fetch(ctxt, image_id, path, trusted_certs=None):
        seen.append(trusted_certs)
        with open(path, "wb") as f:
            f.write(IMAGE)

    monkeypatch.setattr(vmops.images, "fetch", fetch)
    certs = objects.TrustedCerts(ids=["cert-1"])
    instance.trusted_certs = certs
    ops.spawn(None, instance, RAW, [], power_on=False)
    assert seen == [certs]


@pytest.mark.parametrize(
    "disk_format, error",
    [("qcow2", "qcow2"), (None, "None")],
)
def test_spawn_refuses_an_image_that_is_not_raw(
    ops, host, instance, fetched, disk_format, error
):
    meta = objects.ImageMeta.from_dict(
        {"disk_format": disk_format} if disk_format else {}
    )
    with pytest.raises(exception.ImageUnacceptable, match=error):
        ops.spawn(None, instance, meta, [])
    assert fetched == []
    assert not os.path.exists(vmops.root_disk_path(host, instance))
    host.create_domain.assert_not_called()


def test_spawn_refuses_an_image_larger_than_the_flavor_disk(
    ops, host, instance, monkeypatch
):
    instance.flavor.root_gb = 1

    def fetch(ctxt, image_id, path, trusted_certs=None):
        with open(path, "wb") as f:
            f.truncate(GiB + 1)

    monkeypatch.setattr(vmops.images, "fetch", fetch)
    with pytest.raises(exception.FlavorDiskSmallerThanImage):
        ops.spawn(None, instance, RAW, [])
    path = vmops.root_disk_path(host, instance)
    assert os.listdir(os.path.dirname(path)) == []
    host.create_domain.assert_not_called()


@pytest.mark.parametrize(
    "flavor_field, bdi, says",
    [
        (
            None,
            {"block_device_mapping": [{"mount_device": "/dev/xvdb"}]},
            "volumes",
        ),
        (("ephemeral_gb", 1), None, "ephemeral"),
        (None, {"ephemerals": [{"size": 1}]}, "ephemeral"),
        (("swap", 512), None, "swap"),
        (None, {"swap": {"device_name": "/dev/xvdc", "swap_size": 1}}, "swap"),
    ],
)
def test_spawn_refuses_disks_it_cannot_give(
    ops, host, instance, fetched, flavor_field, bdi, says
):
    if flavor_field:
        setattr(instance.flavor, *flavor_field)
    with pytest.raises(exception.InvalidInput, match=says):
        ops.spawn(None, instance, RAW, [], bdi)
    assert fetched == []
    host.create_domain.assert_not_called()


def test_destroy_deletes_the_disk_of_a_stopped_guest(ops, host, instance):
    ops.spawn(None, instance, RAW, [], power_on=False)
    path = vmops.root_disk_path(host, instance)
    host.find_domain.side_effect = base.DomainNotFound("no")
    ops.destroy(instance, [], destroy_disks=False)
    assert os.path.exists(path)
    ops.destroy(instance, [], destroy_disks=True)
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))


def test_spawn_refuses_an_instance_without_an_image(ops, host, instance):
    instance.image_ref = ""
    with pytest.raises(exception.InvalidInput, match="from volume"):
        ops.spawn(None, instance, RAW, [])
    host.create_domain.assert_not_called()
