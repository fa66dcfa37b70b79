"""XenNCMLiveMigrateData: registered, survives RPC serialisation, and
makes the compute manager run cleanup after success and the destination
rollback after failure."""

from nova.compute import manager
from nova.objects import base as obj_base
from nova.objects import migrate_data as nova_migrate_data

from nova_xen_ncm.virt.migrate_data import XenNCMLiveMigrateData


def make() -> XenNCMLiveMigrateData:
    return XenNCMLiveMigrateData(
        is_shared_instance_path=True,
        migration_id="m-1",
        receiver_host="192.0.2.7",
        receiver_port=49152,
        token="ab" * 32,
        source_domid=5,
        dest_domid=5,
        pv_drivers=True,
        options={"missing_pv": "", "missing_hvm": ""},
    )


def test_registered():
    classes = obj_base.NovaObjectRegistry.obj_classes()
    assert XenNCMLiveMigrateData in classes["XenNCMLiveMigrateData"]


def test_rpc_round_trip():
    serializer = obj_base.NovaObjectSerializer()
    primitive = serializer.serialize_entity(None, make())
    assert primitive["nova_object.name"] == "XenNCMLiveMigrateData"
    data = serializer.deserialize_entity(None, primitive)
    assert isinstance(data, XenNCMLiveMigrateData)
    assert data.endpoint == ("192.0.2.7", 49152)
    assert data.token_bytes == bytes.fromhex("ab" * 32)
    assert data.source_domid == data.dest_domid == 5


def test_token_is_masked_in_repr():
    text = repr(make())
    assert "abab" not in text
    assert "token='***'" in text


def test_compute_manager_cleans_up_both_ends():
    # Only libvirt and Hyper-V objects get cleanup (see migrate_data.py).
    flags = manager.ComputeManager._live_migration_cleanup_flags
    do_cleanup, destroy_disks = flags(None, make())
    assert do_cleanup is True
    assert destroy_disks is False
    assert isinstance(make(), nova_migrate_data.HyperVLiveMigrateData)


def test_own_versions_keep_fields_on_backport():
    primitive = {"vifs": [], "wait_for_vif_plugged": True}
    make().obj_make_compatible(primitive, "1.0")
    assert primitive == {"vifs": [], "wait_for_vif_plugged": True}


# The fingerprint of each version (oslo.versionedobjects' hash of the
# fields and remotable methods), as Nova's test_objects keeps its own:
# changing the fields without a new VERSION (and obj_make_compatible)
# breaks a conductor or compute that still runs the previous release.
OBJECT_DATA = {
    "XenNCMLiveMigrateData": "1.1-c70f398ab07dbe2efb80f4e9e5bef4a2",
}


def test_object_fingerprint():
    from oslo_versionedobjects import fixture

    checker = fixture.ObjectVersionChecker(
        {"XenNCMLiveMigrateData": [XenNCMLiveMigrateData]}
    )
    expected, actual = checker.test_hashes(OBJECT_DATA)
    assert expected == actual, (
        "XenNCMLiveMigrateData changed: bump its VERSION, extend "
        "obj_make_compatible, then update OBJECT_DATA"
    )
