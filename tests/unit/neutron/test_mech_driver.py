"""The agentless ML2 mechanism driver: which ports it binds, and how."""

from __future__ import annotations

import importlib.metadata

import pytest
from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api

from nova_xen_ncm.neutron import mech_driver


class PortContext:
    """What ML2 hands bind_port: the port, its host and the segments
    left to bind; records the binding the driver sets."""

    def __init__(self, segments, vnic_type=portbindings.VNIC_NORMAL):
        self.current = {"id": "port-1", portbindings.VNIC_TYPE: vnic_type}
        self.host = "ncm-compute1"
        self.segments_to_bind = segments
        self.bindings = []

    def set_binding(self, segment_id, vif_type, vif_details, status=None):
        self.bindings.append((segment_id, vif_type, vif_details, status))


def _segment(seg_id, network_type):
    return {
        api.ID: seg_id,
        api.NETWORK_TYPE: network_type,
        api.PHYSICAL_NETWORK: None,
        api.SEGMENTATION_ID: 7,
    }


@pytest.fixture
def driver():
    d = mech_driver.XenNCMMechanismDriver()
    d.initialize()
    return d


@pytest.mark.parametrize("network_type", ["local", "flat", "vxlan", "geneve"])
def test_binds_an_ovs_vif_active(driver, network_type):
    context = PortContext([_segment("seg-a", network_type)])
    driver.bind_port(context)
    assert context.bindings == [
        (
            "seg-a",
            portbindings.VIF_TYPE_OVS,
            {
                "port_filter": False,
                "ovs_hybrid_plug": False,
                "bridge_name": "br-int",
                "datapath_type": "system",
                "connectivity": "l2",
            },
            constants.PORT_STATUS_ACTIVE,
        )
    ]


def test_binds_the_first_segment_it_can_carry(driver):
    context = PortContext(
        [_segment("seg-v", "vlan"), _segment("seg-f", "flat")]
    )
    driver.bind_port(context)
    assert [b[0] for b in context.bindings] == ["seg-f"]


def test_leaves_vlan_and_direct_ports_to_other_drivers(driver):
    vlan = PortContext([_segment("seg-v", "vlan")])
    driver.bind_port(vlan)
    direct = PortContext(
        [_segment("seg-f", "flat")], vnic_type=portbindings.VNIC_DIRECT
    )
    driver.bind_port(direct)
    assert vlan.bindings == [] and direct.bindings == []


def test_bindings_do_not_share_details(driver):
    first = PortContext([_segment("a", "flat")])
    second = PortContext([_segment("b", "flat")])
    driver.bind_port(first)
    first.bindings[0][2]["bridge_name"] = "br-other"
    driver.bind_port(second)
    assert second.bindings[0][2]["bridge_name"] == "br-int"


def test_registered_for_ml2():
    (entry,) = [
        e
        for e in importlib.metadata.entry_points(
            group="neutron.ml2.mechanism_drivers"
        )
        if e.name == "xen_ncm"
    ]
    assert entry.load() is mech_driver.XenNCMMechanismDriver


class Plugin:
    """The core plugin's update_port_status, recorded."""

    def __init__(self):
        self.updates = []

    def update_port_status(self, context, port_id, status, host=None):
        self.updates.append((context, port_id, status, host))


class UpdateContext:
    """What ML2 hands update_port_postcommit after committing a
    binding."""

    def __init__(
        self,
        status="DOWN",
        vif_type=portbindings.VIF_TYPE_OVS,
        driver="xen_ncm",
        host="ncm-compute2",
        admin_state_up=True,
    ):
        self.current = {
            "id": "port-1",
            "status": status,
            "admin_state_up": admin_state_up,
        }
        self.host = host
        self.vif_type = vif_type
        self.binding_levels = (
            [{api.BOUND_DRIVER: driver, api.BOUND_SEGMENT: {}}]
            if driver
            else None
        )
        self.plugin_context = object()


@pytest.fixture
def plugin(monkeypatch):
    plugin = Plugin()
    monkeypatch.setattr(mech_driver.directory, "get_plugin", lambda *a: plugin)
    return plugin


def test_an_activated_binding_reports_the_port_active(driver, plugin):
    # ML2's activate() of a live migration's destination binding leaves
    # the port DOWN for an agent; none will come.
    context = UpdateContext()
    driver.update_port_postcommit(context)
    assert plugin.updates == [
        (context.plugin_context, "port-1", "ACTIVE", "ncm-compute2")
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"status": "ACTIVE"},
        {"admin_state_up": False},
        {"host": ""},
        {"vif_type": portbindings.VIF_TYPE_UNBOUND},
        {"driver": "openvswitch"},
        {"driver": None},
    ],
)
def test_other_port_updates_are_left_alone(driver, plugin, kw):
    driver.update_port_postcommit(UpdateContext(**kw))
    assert plugin.updates == []
