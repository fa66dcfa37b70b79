"""The driver as Nova loads it: as nova.virt.xen_ncm, on the host
driver [xen_ncm] host_driver names, with Nova's exceptions outside."""

import contextlib
import sys
from unittest import mock

import nova.conf
import os_resource_classes as orc
import pytest
from nova import context
from nova import exception
from nova import objects
from nova.compute import power_state
from nova.compute import provider_tree
from nova.scheduler.client import report
from nova.tests.unit import fake_instance
from nova.virt import driver as nova_driver

from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory
from nova_xen_ncm.virt import driver
from nova_xen_ncm.virt import novahook
from nova_xen_ncm.virt import vmops

CONF = nova.conf.CONF
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"


@pytest.fixture
def shim(monkeypatch):
    """nova.virt.xen_ncm as the installed .pth file provides it."""
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "nova.virt.xen_ncm", raising=False)
    novahook.install()
    yield
    sys.modules.pop("nova.virt.xen_ncm", None)


RAW = objects.ImageMeta.from_dict({"disk_format": "raw"})


@pytest.fixture
def xen_driver(tmp_path, monkeypatch):
    monkeypatch.setattr(CONF, "instances_path", str(tmp_path))
    # The journals go under Nova's state_path, whose default is where
    # Nova is installed.
    CONF.set_override("state_path", str(tmp_path / "nova-state"))
    CONF.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")

    def fetch(ctxt, image_id, path, trusted_certs=None):
        with open(path, "wb") as f:
            f.write(b"raw image")

    monkeypatch.setattr(vmops.images, "fetch", fetch)
    # Nova reads the node identity from its state_path normally.
    monkeypatch.setattr(
        driver.node, "get_local_node_uuid", lambda: "node-uuid-1"
    )
    drv = driver.XenNCMDriver(mock.Mock())
    drv.init_host("unit-host")
    yield drv
    drv.cleanup_host("unit-host")
    CONF.clear_override("disk_dir", "xen_ncm_sim")
    CONF.clear_override("state_path")


def test_nova_loads_the_driver_through_the_shim(shim):
    loaded = nova_driver.load_compute_driver(
        mock.Mock(), "xen_ncm.XenNCMDriver"
    )
    assert type(loaded) is driver.XenNCMDriver
    assert sys.modules["nova.virt.xen_ncm"].XenNCMDriver is (
        driver.XenNCMDriver
    )


def test_unknown_host_driver_is_refused():
    with pytest.raises(
        base.NotSupported, match="'no-such-host'.*available: .*sim"
    ):
        factory.load_host_driver("no-such-host", "h", CONF)


def test_node_and_resources(xen_driver):
    assert xen_driver.get_available_nodes() == ["unit-host"]
    assert xen_driver.get_nodenames_by_uuid() == {"node-uuid-1": "unit-host"}
    node_uuid = "node-uuid-1"
    resources = xen_driver.get_available_resource("unit-host")
    assert resources["uuid"] == node_uuid
    assert resources["memory_mb"] == CONF.xen_ncm_sim.host_memory_mb
    tree = provider_tree.ProviderTree()
    tree.new_root("unit-host", node_uuid)
    xen_driver.update_provider_tree(tree, "unit-host")
    inventory = tree.data("unit-host").inventory
    assert {orc.VCPU, orc.MEMORY_MB} <= set(inventory)
    assert inventory[orc.MEMORY_MB]["total"] == resources["memory_mb"]


def test_disk_gb_of_shared_storage_is_left_to_a_sharing_provider(xen_driver):
    # What Nova hands the driver: the node's own tree plus the sharing
    # providers in an aggregate with it.
    tree = provider_tree.ProviderTree()
    tree.new_root("unit-host", "node-uuid-1")
    tree.new_root("shared-disks", "sharing-uuid-1")
    tree.update_inventory(
        "shared-disks",
        {orc.DISK_GB: {"total": 500, "min_unit": 1, "max_unit": 500}},
    )
    # Not (yet) a sharing provider: the node counts its filesystem.
    xen_driver.update_provider_tree(tree, "unit-host")
    assert orc.DISK_GB in tree.data("unit-host").inventory
    tree.update_traits("shared-disks", ["MISC_SHARES_VIA_AGGREGATE"])
    placement = mock.Mock()
    placement.get_allocations_for_resource_provider.return_value = (
        report.ProviderAllocInfo(
            allocations={
                "server-1": {"resources": {"VCPU": 1, "DISK_GB": 1}},
            }
        )
    )
    with mock.patch.object(
        driver.report, "report_client_singleton", lambda: placement
    ):
        # A server booted before the sharing provider holds DISK_GB
        # here: placement would refuse the inventory's removal.
        xen_driver.update_provider_tree(tree, "unit-host")
        assert orc.DISK_GB in tree.data("unit-host").inventory
        placement.get_allocations_for_resource_provider.assert_called_with(
            mock.ANY, "node-uuid-1"
        )
        # Placement cannot say: kept too.
        placement.get_allocations_for_resource_provider.side_effect = (
            exception.ResourceProviderAllocationRetrievalFailed(
                rp_uuid="node-uuid-1", error="down"
            )
        )
        xen_driver.update_provider_tree(tree, "unit-host")
        assert orc.DISK_GB in tree.data("unit-host").inventory
        # Gone (moved or deleted): DISK_GB is left to the sharing one.
        placement.get_allocations_for_resource_provider.side_effect = None
        placement.get_allocations_for_resource_provider.return_value = (
            report.ProviderAllocInfo(
                allocations={"server-2": {"resources": {"VCPU": 1}}}
            )
        )
        xen_driver.update_provider_tree(tree, "unit-host")
        inventory = tree.data("unit-host").inventory
        # The filesystem is counted once, by the sharing provider.
        assert orc.DISK_GB not in inventory
        # Not asked again once the node holds no DISK_GB.
        calls = placement.get_allocations_for_resource_provider.call_count
        xen_driver.update_provider_tree(tree, "unit-host")
        assert calls == (
            placement.get_allocations_for_resource_provider.call_count
        )
    assert {orc.VCPU, orc.MEMORY_MB} <= set(inventory)
    assert tree.data("shared-disks").inventory[orc.DISK_GB]["total"] == 500


def test_host_errors_leave_as_nova_exceptions(xen_driver):
    objects.register_all()
    instance = fake_instance.fake_instance_obj(context.get_admin_context())
    with pytest.raises(exception.InstanceNotFound):
        xen_driver.get_info(instance)
    with pytest.raises(exception.InstanceNotFound):
        xen_driver.pause(instance)
    assert xen_driver.list_instances() == []
    assert not xen_driver.instance_exists(instance)


def test_capabilities():
    caps = driver.XenNCMDriver.capabilities
    assert set(nova_driver.ComputeDriver.capabilities) <= set(caps)
    # On the shared storage the new host boots the same root disk.
    assert caps["supports_evacuate"] is True
    assert caps["supports_migrate_to_same_host"] is False


def test_init_host_settles_interrupted_migrations(tmp_path, monkeypatch):
    from nova_xen_ncm.engine import recovery
    from nova_xen_ncm.engine.journal import Entry
    from nova_xen_ncm.engine.journal import Journal

    state = tmp_path / "state"
    monkeypatch.setattr(CONF, "instances_path", str(tmp_path))
    monkeypatch.setattr(
        driver.node, "get_local_node_uuid", lambda: "node-uuid-1"
    )
    CONF.set_override("state_path", str(state), group="xen_ncm")
    try:
        # Journalled in PRECOPY: a domain no longer here is reported.
        Journal(str(state)).write(
            Entry("m-9", 42, "192.0.2.1", 1, "00" * 16, True, phase="precopy")
        )
        settled = []
        recover = recovery.recover
        monkeypatch.setattr(
            recovery,
            "recover",
            lambda *a, **k: settled.extend(recover(*a, **k)) or settled,
        )
        drv = driver.XenNCMDriver(mock.Mock())
        drv.init_host("unit-host")
        drv.cleanup_host("unit-host")
    finally:
        CONF.clear_override("state_path", group="xen_ncm")
    assert [(o.migration_id, o.phase.value) for o in settled] == [
        ("m-9", "failed")
    ]
    assert "no longer on" in settled[0].reason
    assert Journal(str(state)).entries() == []


def _outcome(phase, domid=7, reason="asked the destination", guest=""):
    from nova_xen_ncm.engine.recovery import Outcome
    from nova_xen_ncm.engine.state import Phase

    return Outcome(
        "m-1", domid, Phase.PRECOPY, Phase(phase), reason, guest=guest
    )


@pytest.mark.parametrize(
    "phase, says, guest",
    [
        ("done", "runs on the destination", ""),
        ("in_doubt", "nova-xen-ncm recover", ""),
        # The reboot took the copy here: check the destination first.
        ("in_doubt", "Do not start the guest", "destination or nowhere"),
        # Failed, and its copy here is gone too.
        ("failed", "runs on no host", "nowhere"),
    ],
)
def test_recovery_puts_a_moved_or_unknown_guest_in_error(
    monkeypatch, phase, says, guest
):
    instance = mock.Mock(vm_state="active", task_state="migrating")
    get = mock.Mock(return_value=instance)
    fault = mock.Mock()
    monkeypatch.setattr(driver.objects.Instance, "get_by_uuid", get)
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", fault
    )
    migration = mock.Mock(status="running")
    get_migration = mock.Mock(return_value=migration)
    monkeypatch.setattr(driver.objects.Migration, "get_by_uuid", get_migration)
    driver.reconcile("src", [_outcome(phase, guest=guest)], {7: "uuid-7"})
    assert get.call_args.args[1] == "uuid-7"
    # Nova's record of the migration does not stay 'running': the
    # compute manager skips instances in ERROR at start-up.
    assert get_migration.call_args.args[1] == "m-1"
    assert migration.status == "error"
    migration.save.assert_called_once_with()
    assert instance.vm_state == "error"
    assert instance.task_state is None
    instance.save.assert_called_once_with()
    (ctxt, faulted, error), _ = fault.call_args
    assert faulted is instance
    assert "m-1" in str(error) and says in str(error)


def test_recovery_tolerates_a_migration_nova_has_no_record_of(monkeypatch):
    instance = mock.Mock(vm_state="active", task_state="migrating")
    monkeypatch.setattr(
        driver.objects.Instance,
        "get_by_uuid",
        mock.Mock(return_value=instance),
    )
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", mock.Mock()
    )
    monkeypatch.setattr(
        driver.objects.Migration,
        "get_by_uuid",
        mock.Mock(side_effect=exception.MigrationNotFound(migration_id="m-1")),
    )
    driver.reconcile("src", [_outcome("done")], {7: "uuid-7"})
    assert instance.vm_state == "error"


def test_recovery_moves_a_committed_guest_to_the_destination(monkeypatch):
    instance = mock.Mock(
        vm_state="active", task_state="migrating", host="src", node="src"
    )
    monkeypatch.setattr(
        driver.objects.Instance,
        "get_by_uuid",
        mock.Mock(return_value=instance),
    )
    fault = mock.Mock()
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", fault
    )
    migration = mock.Mock(
        uuid="m-1",
        status="running",
        instance_uuid="uuid-7",
        source_compute="src",
        dest_compute="dst",
        dest_node="dst-node",
    )
    monkeypatch.setattr(
        driver.objects.Migration,
        "get_by_uuid",
        mock.Mock(return_value=migration),
    )
    placement = mock.Mock()
    monkeypatch.setattr(
        driver.report, "report_client_singleton", lambda: placement
    )
    network = mock.Mock()
    monkeypatch.setattr(driver.neutron, "API", lambda: network)
    driver.reconcile("src", [_outcome("done")], {7: "uuid-7"}, {"m-1": False})
    # The journal proved the commit and Nova's record names the
    # destination: the instance is where its guest is, paused as it was.
    assert (instance.host, instance.node) == ("dst", "dst-node")
    assert instance.compute_id == migration.get_dest_compute_id.return_value
    instance.drop_migration_context.assert_called_once_with()
    assert instance.vm_state == "paused"
    assert instance.power_state == power_state.PAUSED
    assert instance.task_state is None
    instance.save.assert_called_once_with()
    assert migration.status == "completed"
    fault.assert_not_called()
    # With the consumer generation, as Nova's post-migration step: a
    # concurrent change to the allocation is refused, not overwritten.
    placement.delete_allocation_for_instance.assert_called_once_with(
        mock.ANY, "m-1", consumer_type="migration"
    )
    # Its ports follow it, as after a live migration Nova finished.
    network.migrate_instance_start.assert_called_once_with(
        mock.ANY, instance, migration
    )
    network.migrate_instance_finish.assert_called_once_with(
        mock.ANY, instance, migration, provider_mappings=None
    )


def test_recovery_moves_a_guest_whose_ports_fail_and_says_why(monkeypatch):
    instance = mock.Mock(
        vm_state="active", task_state="migrating", host="src", node="src"
    )
    monkeypatch.setattr(
        driver.objects.Instance,
        "get_by_uuid",
        mock.Mock(return_value=instance),
    )
    fault = mock.Mock()
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", fault
    )
    migration = mock.Mock(
        uuid="m-1",
        status="running",
        instance_uuid="uuid-7",
        source_compute="src",
        dest_compute="dst",
        dest_node="dst-node",
    )
    monkeypatch.setattr(
        driver.objects.Migration,
        "get_by_uuid",
        mock.Mock(return_value=migration),
    )
    monkeypatch.setattr(
        driver.report, "report_client_singleton", lambda: mock.Mock()
    )
    network = mock.Mock()
    network.migrate_instance_start.side_effect = (
        driver.exception.PortBindingActivationFailed(port_id="p-1", host="dst")
    )
    monkeypatch.setattr(driver.neutron, "API", lambda: network)
    driver.reconcile("src", [_outcome("done")], {7: "uuid-7"}, {"m-1": True})
    # Nova records where the guest runs; the instance is in ERROR with
    # the ports' failure as its fault.
    assert instance.host == "dst"
    assert instance.power_state == power_state.RUNNING
    assert instance.vm_state == "error"
    assert instance.task_state is None
    assert migration.status == "completed"
    message = str(fault.call_args.args[2])
    assert "runs" in message and "p-1" in message


def _incoming(phase, reason="COMMIT was received: the guest runs here"):
    from nova_xen_ncm.engine.recovery import Outcome
    from nova_xen_ncm.engine.state import Phase

    return Outcome(
        "m-1",
        7,
        Phase.COMMIT,
        Phase(phase),
        reason,
        uuid="uuid-7",
        role="destination",
    )


def _nova(monkeypatch, instance, migration=None):
    """Nova's records of the instance and the migration; the fault
    recorder and placement."""
    monkeypatch.setattr(
        driver.objects.Instance,
        "get_by_uuid",
        mock.Mock(return_value=instance),
    )
    fault = mock.Mock()
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", fault
    )
    get = mock.Mock(return_value=migration)
    if migration is None:
        get.side_effect = exception.MigrationNotFound(migration_id="m-1")
    monkeypatch.setattr(driver.objects.Migration, "get_by_uuid", get)
    placement = mock.Mock()
    monkeypatch.setattr(
        driver.report, "report_client_singleton", lambda: placement
    )
    monkeypatch.setattr(driver.neutron, "API", mock.Mock)
    return fault, placement


@pytest.mark.parametrize(
    "status, ends",
    [
        # The source died with its engine: Nova never ended the record.
        ("running", "completed"),
        # The source gave up in doubt: Nova's "too late to roll back".
        ("error", "completed"),
        # Nova's rollbacks stay what they are.
        ("failed", "failed"),
        ("cancelled", "cancelled"),
    ],
)
def test_a_restarted_destination_running_the_guest_records_it_here(
    monkeypatch, status, ends
):
    instance = mock.Mock(
        vm_state="error", task_state="migrating", host="src", node="src"
    )
    migration = mock.Mock(
        uuid="m-1",
        status=status,
        instance_uuid="uuid-7",
        source_compute="src",
        dest_compute="dst",
        dest_node="dst",
    )
    fault, placement = _nova(monkeypatch, instance, migration)
    driver.reconcile("dst", [_incoming("done")], {}, {"m-1": True})
    # Nova's view of this host now holds the guest it runs.
    assert (instance.host, instance.node) == ("dst", "dst")
    assert instance.vm_state == "active"
    assert instance.power_state == power_state.RUNNING
    assert instance.task_state is None
    assert migration.status == ends
    assert migration.save.called == (status != ends)
    placement.delete_allocation_for_instance.assert_called_once_with(
        mock.ANY, "m-1", consumer_type="migration"
    )
    fault.assert_not_called()


def test_a_record_is_completed_only_where_the_instance_is(monkeypatch):
    # Something else moved the instance on meanwhile: not this record's
    # doing, it stays as Nova left it.
    instance = mock.Mock(vm_state="active", task_state=None, host="third")
    migration = mock.Mock(
        uuid="m-1",
        status="error",
        instance_uuid="uuid-7",
        source_compute="src",
        dest_compute="dst",
        dest_node="dst",
    )
    _nova(monkeypatch, instance, migration)
    driver.reconcile("dst", [_incoming("done")], {}, {"m-1": True})
    assert migration.status == "error"
    migration.save.assert_not_called()


def test_a_restarted_destination_whose_migration_nova_lost_says_so(
    monkeypatch,
):
    instance = mock.Mock(vm_state="active", task_state=None, host="src")
    fault, _ = _nova(monkeypatch, instance)
    driver.reconcile("dst", [_incoming("done")], {}, {"m-1": True})
    assert instance.vm_state == "error"
    message = str(fault.call_args.args[2])
    assert "dst, where the guest now runs" in message
    assert "records it on src" in message


def test_a_destroyed_copy_is_an_error_only_where_nova_records_it(
    monkeypatch,
):
    failed = _incoming(
        "failed", "no COMMIT received: the copy here was destroyed"
    )
    # Nova has it on its source: the source's side, nothing to do here.
    instance = mock.Mock(vm_state="active", task_state=None, host="src")
    fault, _ = _nova(monkeypatch, instance)
    driver.reconcile("dst", [failed], {}, {})
    assert instance.vm_state == "active"
    fault.assert_not_called()
    # Nova records it here, where no copy runs any more.
    instance = mock.Mock(vm_state="active", task_state=None, host="dst")
    fault, _ = _nova(monkeypatch, instance)
    driver.reconcile("dst", [failed], {}, {})
    assert instance.vm_state == "error"
    message = str(fault.call_args.args[2])
    assert "never committed on dst" in message
    assert "copy here was destroyed" in message


def test_recovery_errors_a_guest_whose_destination_nova_does_not_name(
    monkeypatch,
):
    instance = mock.Mock(vm_state="active", task_state="migrating", host="src")
    monkeypatch.setattr(
        driver.objects.Instance,
        "get_by_uuid",
        mock.Mock(return_value=instance),
    )
    fault = mock.Mock()
    monkeypatch.setattr(
        driver.compute_utils, "add_instance_fault_from_exc", fault
    )
    # Another host's migration of the instance: not proof of this one.
    migration = mock.Mock(
        status="running",
        instance_uuid="uuid-7",
        source_compute="elsewhere",
        dest_compute="dst",
        dest_node="dst",
    )
    monkeypatch.setattr(
        driver.objects.Migration,
        "get_by_uuid",
        mock.Mock(return_value=migration),
    )
    driver.reconcile("src", [_outcome("done")], {7: "uuid-7"})
    assert instance.host == "src"
    assert instance.vm_state == "error"
    assert "no record of this migration" in str(fault.call_args.args[2])


def test_recovery_leaves_a_rolled_back_or_unknown_guest_alone(monkeypatch):
    get = mock.Mock()
    monkeypatch.setattr(driver.objects.Instance, "get_by_uuid", get)
    driver.reconcile(
        "src",
        [_outcome("failed"), _outcome("done", domid=8)],
        {7: "uuid-7"},
    )
    # Rolled back: it runs here as Nova believes; domain 8: no instance
    # could be known for it.
    get.assert_not_called()


def test_power_on_is_refused_while_a_migration_is_open(
    xen_driver, tmp_path, monkeypatch
):
    from nova_xen_ncm.engine.journal import Entry
    from nova_xen_ncm.engine.journal import Journal

    instance = fake_instance.fake_instance_obj(
        context.get_admin_context(),
        flavor=objects.Flavor(
            vcpus=1, memory_mb=16, root_gb=0, ephemeral_gb=0, swap=0
        ),
        image_ref=IMAGE_ID,
    )
    instance.trusted_certs = None
    virtapi = xen_driver._vifops._virtapi
    virtapi.wait_for_instance_event.return_value = contextlib.nullcontext()
    xen_driver.spawn(None, instance, RAW, [], None, {}, [])
    domid = xen_driver.get_info(instance).internal_id
    xen_driver.pause(instance)
    state = tmp_path / "state"
    CONF.set_override("state_path", str(state), group="xen_ncm")
    try:
        Journal(str(state)).write(
            Entry(
                "m-2",
                domid,
                "192.0.2.1",
                1,
                "00" * 16,
                True,
                phase="in_doubt",
            )
        )
        with pytest.raises(exception.InstancePowerOnFailure, match="m-2"):
            xen_driver.power_on(None, instance, [])
        # Every other way of running the paused copy (or of destroying it
        # and building another) is refused too.
        refused = [
            (exception.NovaException, lambda: xen_driver.unpause(instance)),
            (
                exception.InstanceRebootFailure,
                lambda: xen_driver.reboot(None, instance, [], "HARD"),
            ),
            (
                exception.InstancePowerOnFailure,
                lambda: xen_driver.resume_state_on_host_boot(
                    None, instance, [], None
                ),
            ),
            (
                exception.InstanceSuspendFailure,
                lambda: xen_driver.suspend(None, instance),
            ),
            # A cold migration would boot the disk of a guest that may
            # run on the live migration's destination.
            (
                exception.InstanceFaultRollback,
                lambda: xen_driver.migrate_disk_and_power_off(
                    None, instance, "192.0.2.9", instance.flavor, []
                ),
            ),
            (
                exception.ResizeError,
                lambda: xen_driver.finish_revert_migration(
                    None, instance, [], None
                ),
            ),
        ]
        for error, call in refused:
            with pytest.raises(error, match="m-2"):
                call()
            assert xen_driver.get_info(instance).state == 3  # PAUSED
            assert xen_driver.get_info(instance).internal_id == domid
        Journal(str(state)).remove("m-2")
        xen_driver.power_on(None, instance, [])
    finally:
        CONF.clear_override("state_path", group="xen_ncm")
    assert xen_driver.get_info(instance).state == 1  # RUNNING
    xen_driver.destroy(None, instance, [])


def test_start_is_refused_by_uuid_once_the_domain_is_gone(
    xen_driver, tmp_path
):
    # A dom0 reboot took the paused copy away: the entry still names the
    # guest by uuid, and the restart at host boot must not build one.
    from nova_xen_ncm.engine.journal import Entry
    from nova_xen_ncm.engine.journal import Journal

    instance = fake_instance.fake_instance_obj(
        context.get_admin_context(),
        flavor=objects.Flavor(
            vcpus=1, memory_mb=16, root_gb=0, ephemeral_gb=0, swap=0
        ),
        image_ref=IMAGE_ID,
    )
    instance.trusted_certs = None
    state = tmp_path / "state"
    CONF.set_override("state_path", str(state), group="xen_ncm")
    try:
        Journal(str(state)).write(
            Entry(
                "m-4",
                99,
                "192.0.2.1",
                1,
                "00" * 16,
                True,
                phase="in_doubt",
                uuid=instance.uuid,
            )
        )
        with pytest.raises(exception.InstancePowerOnFailure, match="m-4"):
            xen_driver.resume_state_on_host_boot(None, instance, [], None)
        with pytest.raises(exception.InstancePowerOnFailure, match="m-4"):
            xen_driver.power_on(None, instance, [])
        assert not xen_driver.instance_exists(instance)
        # Another guest's entry does not refuse this one.
        Journal(str(state)).remove("m-4")
        Journal(str(state)).write(
            Entry(
                "m-5",
                99,
                "192.0.2.1",
                1,
                "00" * 16,
                True,
                phase="in_doubt",
                uuid="another-guest",
            )
        )
        virtapi = xen_driver._vifops._virtapi
        virtapi.wait_for_instance_event.return_value = contextlib.nullcontext()
        xen_driver.power_on(None, instance, [])
        assert xen_driver.instance_exists(instance)
        xen_driver.destroy(None, instance, [])
    finally:
        CONF.clear_override("state_path", group="xen_ncm")


def test_journals_are_kept_under_nova_state_path(xen_driver, tmp_path):
    # Not where Nova is installed (its state_path's default): the
    # fixture's Nova state_path holds them.
    assert CONF.xen_ncm.state_path == str(tmp_path / "nova-state" / "xen_ncm")
