"""VIFs through os-vif (its plug and unplug are the boundary, replaced
by mocks) and the Neutron events Nova waits for on spawn."""

import contextlib
from unittest import mock

import os_vif
import pytest
from nova import context
from nova import exception
from nova import objects
from nova.network import model as network_model
from nova.tests.unit import fake_instance
from os_vif import objects as osv_objects

from nova_xen_ncm.virt import vifops


def vif(port_id, vif_type="ovs", active=True, host_binding=None):
    return network_model.VIF(
        id=port_id,
        address="fa:16:3e:00:00:01",
        type=vif_type,
        active=active,
        details={"port_filter": True, "ovs_hybrid_plug": False},
        network=network_model.Network(
            id="net-1", bridge="br-int", label="private", subnets=[]
        ),
        devname=f"tap{port_id}"[:14],
        vnic_type="normal",
        profile=host_binding or {},
    )


@pytest.fixture
def instance():
    objects.register_all()
    osv_objects.register_all()
    return fake_instance.fake_instance_obj(context.get_admin_context())


@pytest.fixture
def osvif(monkeypatch):
    plug = mock.Mock()
    unplug = mock.Mock()
    monkeypatch.setattr(os_vif, "plug", plug)
    monkeypatch.setattr(os_vif, "unplug", unplug)
    return plug, unplug


@pytest.fixture
def virtapi():
    api = mock.Mock()
    api.wait_for_instance_event.return_value = contextlib.nullcontext()
    return api


def test_plug_converts_each_vif_with_nova(instance, osvif, virtapi):
    plug, _ = osvif
    ops = vifops.VIFOps(virtapi)
    ops.plug(instance, network_model.NetworkInfo([vif("p1"), vif("p2")]))
    plugged = [call.args[0] for call in plug.call_args_list]
    assert [v.id for v in plugged] == ["p1", "p2"]
    # Nova's own conversion: an OVS port carries the Neutron port id.
    assert isinstance(plugged[0], osv_objects.vif.VIFOpenVSwitch)
    assert plugged[0].port_profile.interface_id == "p1"
    assert plug.call_args.args[1].uuid == instance.uuid


def test_plug_failure_is_nova_s_exception(instance, osvif, virtapi):
    plug, _ = osvif
    plug.side_effect = RuntimeError("ovs-vsctl: no bridge br-int")
    with pytest.raises(
        exception.VirtualInterfacePlugException, match="br-int"
    ):
        vifops.VIFOps(virtapi).plug(instance, [vif("p1")])


def test_unsupported_vif_type_is_named(instance, osvif, virtapi):
    with pytest.raises(
        exception.VirtualInterfacePlugException, match="'macvtap'"
    ):
        vifops.VIFOps(virtapi).plug(instance, [vif("p1", "macvtap")])
    osvif[0].assert_not_called()


def test_unplug_errors_ignored_only_when_asked(instance, osvif, virtapi):
    _, unplug = osvif
    unplug.side_effect = RuntimeError("gone")
    ops = vifops.VIFOps(virtapi)
    ops.unplug(instance, [vif("p1"), vif("p2")], ignore_errors=True)
    assert unplug.call_count == 2
    with pytest.raises(exception.VirtualInterfaceUnplugException):
        ops.unplug(instance, [vif("p1")])


def test_spawn_waits_for_the_vifs_not_active(
    instance, osvif, virtapi, monkeypatch
):
    monkeypatch.setattr(vifops.CONF, "vif_plugging_timeout", 300)
    network_info = [vif("p1", active=False), vif("p2", active=True)]
    with vifops.VIFOps(virtapi).plugged_and_reported(instance, network_info):
        # Planned before anything is plugged, so no event is missed.
        virtapi.wait_for_instance_event.assert_called_once()
        assert osvif[0].call_count == 2
    args = virtapi.wait_for_instance_event.call_args
    assert args.args[1] == [("network-vif-plugged", "p1")]
    assert args.kwargs["timeout"] == 300


def test_no_events_when_turned_off(instance, osvif, virtapi, monkeypatch):
    monkeypatch.setattr(vifops.CONF, "vif_plugging_timeout", 0)
    assert vifops.plug_time_events([vif("p1", active=False)]) == []


@pytest.mark.parametrize("fatal", [True, False])
def test_event_timeout(instance, osvif, virtapi, monkeypatch, fatal):
    monkeypatch.setattr(vifops.CONF, "vif_plugging_timeout", 300)
    monkeypatch.setattr(vifops.CONF, "vif_plugging_is_fatal", fatal)

    @contextlib.contextmanager
    def timing_out(*args, **kwargs):
        yield
        raise exception.InstanceEventTimeout()

    virtapi.wait_for_instance_event.side_effect = timing_out
    ops = vifops.VIFOps(virtapi)
    waiting = ops.plugged_and_reported(instance, [vif("p1", active=False)])
    if fatal:
        with pytest.raises(exception.VirtualInterfaceCreateException):
            with waiting:
                pass
    else:
        with waiting:
            pass


def test_destination_binding_from_migrate_data():
    source = network_model.NetworkInfo([vif("p1")])
    data = objects.LibvirtLiveMigrateData()
    assert vifops.destination_network_info(source, data) is source
    migrate_vif = objects.VIFMigrateData(
        port_id="p1",
        vnic_type="normal",
        vif_type="ovs",
        vif_details={"port_filter": True},
        profile={},
        host="dest",
        source_vif=vif("p1"),
    )
    data.vifs = [migrate_vif]
    dest = vifops.destination_network_info(source, data)
    assert [v["id"] for v in dest] == ["p1"]
    assert dest[0]["details"] == {"port_filter": True}
