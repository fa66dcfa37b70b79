"""The live-migration hooks around the engine (Sender and Receiver are
replaced; the engine has its own tests)."""

from unittest import mock

import pytest
from nova import context
from nova import exception
from nova import objects
from nova.tests.unit import fake_instance
from oslo_utils import uuidutils
from oslo_utils.fixture import uuidsentinel as uuids

from nova_xen_ncm.engine import errors as engine_errors
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.virt import livemigrationops
from nova_xen_ncm.virt import vifops
from nova_xen_ncm.virt import vmops
from nova_xen_ncm.virt.migrate_data import XenNCMLiveMigrateData

MiB = 1 << 20
ALL = {item: None for item in base.Item}


@pytest.fixture
def instance():
    objects.register_all()
    flavor = objects.Flavor(vcpus=2, memory_mb=64, root_gb=1)
    return fake_instance.fake_instance_obj(
        context.get_admin_context(), flavor=flavor
    )


def make_host(restore=ALL):
    host = mock.create_autospec(base.HostDriver, instance=True)
    host.hostname = "unit"
    host.capabilities.return_value = base.Capabilities(
        host="unit", hypervisor="test", restore=restore, max_vcpus=8
    )
    host.free_memory.return_value = 1024 * MiB
    host.find_domain.return_value = info()
    return host


def info(domid=9, pv=True):
    return base.DomainInfo(
        domid=domid,
        name="instance-00000001",
        uuid="u",
        state=base.DomainState.RUNNING,
        memory_bytes=64 * MiB,
        vcpus=2,
        populated_pages=1,
        pv_drivers=pv,
    )


def make_ops(host, vifs=None):
    vifs = vifs or mock.create_autospec(vifops.VIFOps, instance=True)
    return livemigrationops.LiveMigrationOps(
        host, vmops.VMOps(host, vifs), vifs
    )


def test_checks_pass_between_full_hosts(instance, monkeypatch):
    monkeypatch.setattr(livemigrationops.CONF, "my_ip", "198.51.100.7")
    data = make_ops(make_host()).check_can_live_migrate_destination(instance)
    data = make_ops(make_host()).check_can_live_migrate_source(instance, data)
    # The source says where it connects from (its own address).
    assert data.source_address == "198.51.100.7"
    assert data.source_domid == 9
    assert data.pv_drivers is True
    assert data.is_shared_instance_path is True


def test_destination_without_memory_is_refused(instance):
    host = make_host()
    host.free_memory.return_value = 32 * MiB
    with pytest.raises(exception.MigrationPreCheckError):
        make_ops(host).check_can_live_migrate_destination(instance)


def test_source_refuses_what_the_destination_cannot_restore(instance):
    stock = dict(ALL, event_channels="VIRQ bindings cannot be restored")
    data = make_ops(make_host(stock)).check_can_live_migrate_destination(
        instance
    )
    with pytest.raises(exception.MigrationPreCheckError) as err:
        make_ops(make_host()).check_can_live_migrate_source(instance, data)
    assert "VIRQ" in str(err.value)
    # A guest without PV drivers does not need event channels.
    source = make_host()
    source.find_domain.return_value = info(pv=False)
    make_ops(source).check_can_live_migrate_source(instance, data)


def test_pre_live_migration_refuses_a_taken_domid(instance):
    host = make_host()
    host.domain_info.return_value = info(domid=9)
    data = XenNCMLiveMigrateData(source_domid=9)
    with pytest.raises(base.DomidInUse):
        make_ops(host).pre_live_migration(instance, [], data)


def test_pre_live_migration_starts_a_receiver(instance, monkeypatch):
    host = make_host()
    host.domain_info.side_effect = base.DomainNotFound("free")
    incoming = mock.Mock(endpoint=("192.0.2.1", 49160), token=b"\x01" * 32)
    incoming.phase = Phase.DONE
    incoming.wait.return_value = Phase.DONE
    factory = mock.Mock(return_value=incoming)
    monkeypatch.setattr(livemigrationops, "IncomingMigration", factory)
    monkeypatch.setattr(livemigrationops.CONF, "my_ip", "192.0.2.1")
    vifs = mock.create_autospec(vifops.VIFOps, instance=True)
    vifs.plug.side_effect = lambda *a: factory.assert_not_called()
    ops = make_ops(host, vifs)
    data = ops.pre_live_migration(
        instance,
        ["vif"],
        XenNCMLiveMigrateData(source_domid=9, source_address="198.51.100.7"),
    )
    # The listener admits the source host's address, not this host's.
    assert factory.call_args.kwargs["source_address"] == "198.51.100.7"
    # Plugged before the receiver starts (asserted in the side effect).
    vifs.plug.assert_called_once_with(instance, ["vif"])
    # A wildcard listen address is advertised as my_ip.
    assert factory.call_args.kwargs["advertise"] == "192.0.2.1"
    incoming.start.assert_called_once_with()
    assert data.endpoint == ("192.0.2.1", 49160)
    assert data.dest_domid == 9
    assert data.token_bytes == b"\x01" * 32
    ops.post_live_migration_at_destination(instance)
    incoming.wait.assert_called_once()


def _preparing(uuid, id_, dest="unit"):
    return objects.Migration(uuid=uuid, id=id_, dest_compute=dest)


@pytest.mark.parametrize(
    "records, expected",
    [
        # Nova's record of this migration to this host.
        ([_preparing(uuids.nova_1, 1)], uuids.nova_1),
        # Another instance's move elsewhere is not this one.
        ([_preparing(uuids.elsewhere, 5, dest="other")], None),
        # One left preparing by an attempt that crashed: the newest wins.
        (
            [_preparing(uuids.stale, 3), _preparing(uuids.nova_7, 7)],
            uuids.nova_7,
        ),
        # None preparing (an engine-only caller): an id of its own.
        ([], None),
    ],
)
def test_the_destination_names_the_migration_as_nova_does(
    instance, monkeypatch, records, expected
):
    host = make_host()
    host.domain_info.side_effect = base.DomainNotFound("free")
    incoming = mock.Mock(endpoint=("192.0.2.1", 49160), token=b"\x01" * 32)
    factory = mock.Mock(return_value=incoming)
    monkeypatch.setattr(livemigrationops, "IncomingMigration", factory)
    lookup = mock.Mock(return_value=objects.MigrationList(objects=records))
    monkeypatch.setattr(
        livemigrationops.objects.MigrationList, "get_by_filters", lookup
    )
    ctxt = context.get_admin_context()
    ops = make_ops(host)
    data = ops.pre_live_migration(
        instance, [], XenNCMLiveMigrateData(source_domid=9), context=ctxt
    )
    # The instance's live migration from its host, as Nova left it for
    # pre_live_migration.
    lookup.assert_called_once_with(
        ctxt,
        {
            "instance_uuid": instance.uuid,
            "status": "preparing",
            "migration_type": "live-migration",
            "source_compute": instance.host,
        },
    )
    # The id a restarted compute's recovery looks Nova's record up by,
    # and the one the source reads back.
    assert factory.call_args.args[1] == data.migration_id
    if expected is None:
        assert data.migration_id not in {r.uuid for r in records}
        assert uuidutils.is_uuid_like(data.migration_id)
    else:
        assert data.migration_id == expected


def test_the_migration_handed_in_names_it(instance, monkeypatch):
    host = make_host()
    host.domain_info.side_effect = base.DomainNotFound("free")
    incoming = mock.Mock(endpoint=("192.0.2.1", 49160), token=b"\x01" * 32)
    monkeypatch.setattr(
        livemigrationops, "IncomingMigration", mock.Mock(return_value=incoming)
    )
    lookup = mock.Mock()
    monkeypatch.setattr(
        livemigrationops.objects.MigrationList, "get_by_filters", lookup
    )
    data = XenNCMLiveMigrateData(source_domid=9)
    data.migration = objects.Migration(uuid=uuids.handed_in)
    data = make_ops(host).pre_live_migration(
        instance, [], data, context=context.get_admin_context()
    )
    assert data.migration_id == uuids.handed_in
    lookup.assert_not_called()


def run_migration(instance, phase):
    outgoing = mock.Mock(error=None)
    # Still running at the first progress tick, then finished.
    outgoing.wait.side_effect = [None, phase]
    outgoing.phase = Phase.PRECOPY
    data = XenNCMLiveMigrateData(
        migration_id="m",
        receiver_host="h",
        receiver_port=1,
        token="00",
        migration=objects.Migration(),
    )
    post, recover = mock.Mock(), mock.Mock()
    with (
        mock.patch.object(
            livemigrationops, "OutgoingMigration", return_value=outgoing
        ),
        mock.patch.object(
            livemigrationops.LiveMigrationOps, "_report"
        ) as report,
    ):
        make_ops(make_host()).live_migration(
            "ctx", instance, "dest", post, recover, False, data
        )
    assert report.call_count == 2
    return post, recover, data


def test_done_calls_post_method(instance):
    post, recover, data = run_migration(instance, Phase.DONE)
    post.assert_called_once_with("ctx", instance, "dest", False, data)
    recover.assert_not_called()


def test_failure_and_cancel_call_recover_method(instance):
    _, recover, data = run_migration(instance, Phase.FAILED)
    recover.assert_called_once_with("ctx", instance, "dest", data)
    _, recover, data = run_migration(instance, Phase.CANCELLED)
    recover.assert_called_once_with(
        "ctx", instance, "dest", data, migration_status="cancelled"
    )


def test_in_doubt_raises(instance):
    with pytest.raises(engine_errors.EngineError, match="in doubt"):
        run_migration(instance, Phase.IN_DOUBT)


def make_outgoing(rounds):
    outgoing = mock.Mock()
    outgoing.stats.rounds = rounds
    outgoing.stats.memory_progress.return_value = {
        "memory_total": 64 * MiB,
        "memory_processed": 0,
        "memory_remaining": 0,
    }
    return outgoing


def test_report_leaves_unmeasured_fields_none(instance):
    migration = objects.Migration()
    migration.save = mock.Mock()
    instance.save = mock.Mock()
    instance.progress = None
    livemigrationops.LiveMigrationOps._report(
        make_outgoing([]), instance, migration
    )
    assert migration.memory_total == 64 * MiB
    assert "memory_processed" not in migration
    assert "memory_remaining" not in migration
    instance.save.assert_not_called()


def test_report_measured(instance):
    migration = objects.Migration()
    migration.save = mock.Mock()
    instance.save = mock.Mock()
    outgoing = make_outgoing([object()])
    outgoing.stats.memory_progress.return_value = {
        "memory_total": 64 * MiB,
        "memory_processed": 60 * MiB,
        "memory_remaining": 16 * MiB,
    }
    livemigrationops.LiveMigrationOps._report(outgoing, instance, migration)
    assert migration.memory_processed == 60 * MiB
    assert migration.memory_remaining == 16 * MiB
    assert instance.progress == 75
    migration.save.assert_called_once_with()


def test_force_complete_and_abort_reach_the_sender(instance):
    ops = make_ops(make_host())
    with pytest.raises(exception.NoActiveMigrationForInstance):
        ops.abort(instance)
    outgoing = mock.Mock()
    ops._outgoing[instance.uuid] = outgoing
    ops.force_complete(instance)
    outgoing.force_complete.assert_called_once_with()
    outgoing.cancel.return_value = False
    with pytest.raises(exception.MigrationError):
        ops.abort(instance)


def test_a_late_rollback_leaves_a_retry_s_domain_alone(instance):
    host = make_host()
    ops = make_ops(host)
    first, retry = mock.Mock(), mock.Mock()
    first.phase = Phase.FAILED

    def retry_arrives(timeout):
        # The retry's pre_live_migration runs while the cast rollback of
        # the first attempt waits for its receiver.
        ops._incoming[instance.uuid] = retry
        return Phase.FAILED

    first.wait.side_effect = retry_arrives
    ops._incoming[instance.uuid] = first
    ops.rollback_live_migration_at_destination(instance, ["vif"])
    first.cancel.assert_called_with()
    host.destroy_domain.assert_not_called()
    ops._vifs.unplug.assert_not_called()
    assert ops._incoming[instance.uuid] is retry


def test_rollback_at_destination_keeps_a_committed_guest(instance):
    host = make_host()
    ops = make_ops(host)
    incoming = mock.Mock()
    incoming.phase = Phase.DONE
    ops._incoming[instance.uuid] = incoming
    ops.rollback_live_migration_at_destination(instance, ["vif"])
    host.destroy_domain.assert_not_called()
    # The guest runs here: its vifs stay plugged.
    ops._vifs.unplug.assert_not_called()
    # Not committed: the listener closes and the leftover domain goes.
    incoming.phase = Phase.SETUP
    ops._incoming[instance.uuid] = incoming
    ops.rollback_live_migration_at_destination(instance, ["vif"])
    incoming.cancel.assert_called_with()
    ops._vifs.unplug.assert_called_once_with(
        instance, ["vif"], ignore_errors=True
    )
    host.destroy_domain.assert_called_once_with(9, delete_disks=False)


def test_source_address_is_left_out_for_an_older_peer():
    data = XenNCMLiveMigrateData(source_domid=9, source_address="192.0.2.9")
    primitive = data.obj_to_primitive(target_version="1.0")
    assert "source_address" not in primitive["nova_object.data"]
    assert data.obj_to_primitive()["nova_object.data"]["source_address"] == (
        "192.0.2.9"
    )


@pytest.fixture
def tls_settings():
    """Set this test's [xen_ncm] tls_enabled, tls_encrypted_frames."""
    conf = livemigrationops.xen_ncm_conf.CONF

    def setting(enabled, encrypted=True):
        conf.set_override("tls_enabled", enabled, group="xen_ncm")
        conf.set_override("tls_encrypted_frames", encrypted, group="xen_ncm")

    yield setting
    conf.clear_override("tls_enabled", group="xen_ncm")
    conf.clear_override("tls_encrypted_frames", group="xen_ncm")


@pytest.mark.parametrize(
    "dest, source",
    [
        ((True, True), (True, False)),
        ((True, False), (True, True)),
        ((False, True), (True, True)),
    ],
)
def test_tls_frame_settings_that_differ_are_refused_before_migrating(
    instance, tls_settings, dest, source
):
    # Refused when Nova checks the hosts, not when the migration
    # connects (after the destination was prepared).
    tls_settings(*dest)
    data = make_ops(make_host()).check_can_live_migrate_destination(instance)
    tls_settings(*source)
    with pytest.raises(exception.MigrationPreCheckError) as err:
        make_ops(make_host()).check_can_live_migrate_source(instance, data)
    assert "tls_encrypted_frames" in str(err.value)
    assert "tls_enabled" in str(err.value)


def test_an_earlier_destination_is_refused_by_an_encrypting_source(
    instance, tls_settings
):
    tls_settings(True, True)
    data = make_ops(make_host()).check_can_live_migrate_destination(instance)
    del data.options["tls_frames"]
    with pytest.raises(exception.MigrationPreCheckError) as err:
        make_ops(make_host()).check_can_live_migrate_source(instance, data)
    assert "earlier release" in str(err.value)
    # Without encrypted frames, such a destination is still accepted.
    tls_settings(True, False)
    make_ops(make_host()).check_can_live_migrate_source(instance, data)


@pytest.mark.parametrize(
    "setting", [(False, True), (True, True), (True, False)]
)
def test_tls_frame_settings_that_agree_pass(instance, tls_settings, setting):
    tls_settings(*setting)
    data = make_ops(make_host()).check_can_live_migrate_destination(instance)
    make_ops(make_host()).check_can_live_migrate_source(instance, data)
