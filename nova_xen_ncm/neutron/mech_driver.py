"""ML2 mechanism driver ``xen_ncm``: binds ports to Open vSwitch with no
L2 agent.

A Xen host attaches a guest's vif to a dom0 switch with its hotplug
script; the switch port, with the Neutron port's ``iface-id``, is what
os-vif's ``ovs`` plugin records in the host's OVSDB when nova-compute
plugs an ``ovs`` vif (Nova dropped the ``bridge`` vif type). With no agent
on the host nothing else would report the port up, so the binding is
committed ACTIVE: Neutron then sends Nova ``network-vif-plugged`` as soon
as the port is bound to a host. A live migration activates the
destination's binding, which ML2 commits with the port DOWN for an agent
to report up; with no agent, the driver reports it up itself once the
activated binding is its own (``update_port_postcommit``). Plain OVS
plugging (no hybrid iptables bridge): there is no agent to program
security groups either, so the binding does not claim port filtering.

Only segments a host's switch carries without an agent are bound:
``local``, ``flat`` and overlay types, whose tunnels a single-host or
flat deployment does not need. Another mechanism driver listed after
this one may bind the rest.
"""

from __future__ import annotations

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins import directory
from neutron_lib.plugins.ml2 import api
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

BINDABLE_TYPES = frozenset(
    {
        constants.TYPE_LOCAL,
        constants.TYPE_FLAT,
        constants.TYPE_VXLAN,
        constants.TYPE_GENEVE,
    }
)

NAME = "xen_ncm"

# The integration bridge, as Nova and Neutron's OVS drivers name it.
BRIDGE = "br-int"

VIF_DETAILS = {
    portbindings.CAP_PORT_FILTER: False,
    portbindings.OVS_HYBRID_PLUG: False,
    portbindings.VIF_DETAILS_BRIDGE_NAME: BRIDGE,
    portbindings.OVS_DATAPATH_TYPE: "system",
    portbindings.VIF_DETAILS_CONNECTIVITY: portbindings.CONNECTIVITY_L2,
}


class XenNCMMechanismDriver(api.MechanismDriver):
    """Binds compute ports as ``ovs`` vifs, ACTIVE at once."""

    def initialize(self) -> None:
        LOG.info("xen_ncm mechanism driver binds %s", sorted(BINDABLE_TYPES))

    @property
    def connectivity(self) -> str:
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context) -> None:
        vnic_type = context.current.get(
            portbindings.VNIC_TYPE, portbindings.VNIC_NORMAL
        )
        if vnic_type != portbindings.VNIC_NORMAL:
            LOG.debug(
                "Port %s: vnic_type %s is not bound by xen_ncm",
                context.current["id"],
                vnic_type,
            )
            return
        for segment in context.segments_to_bind:
            if segment[api.NETWORK_TYPE] in BINDABLE_TYPES:
                context.set_binding(
                    segment[api.ID],
                    portbindings.VIF_TYPE_OVS,
                    dict(VIF_DETAILS),
                    status=constants.PORT_STATUS_ACTIVE,
                )
                LOG.debug(
                    "Bound port %s on host %s to segment %s (%s)",
                    context.current["id"],
                    context.host,
                    segment[api.ID],
                    segment[api.NETWORK_TYPE],
                )
                return
        LOG.debug(
            "Port %s: no segment of types %s to bind",
            context.current["id"],
            sorted(BINDABLE_TYPES),
        )

    def update_port_postcommit(self, context) -> None:
        """A binding of ours made active with the port DOWN (ML2's
        ``activate`` of a live migration's destination binding): no agent
        will report the port up, so it is set ACTIVE here, which also
        sends Nova ``network-vif-plugged``."""
        port = context.current
        if (
            port.get("status") != constants.PORT_STATUS_DOWN
            or not port.get("admin_state_up", True)
            or not context.host
            or context.vif_type != portbindings.VIF_TYPE_OVS
        ):
            return
        levels = context.binding_levels or []
        if not levels or levels[-1].get(api.BOUND_DRIVER) != NAME:
            return
        LOG.debug(
            "Port %s: binding on %s active, reporting the port ACTIVE",
            port["id"],
            context.host,
        )
        directory.get_plugin().update_port_status(
            context.plugin_context,
            port["id"],
            constants.PORT_STATUS_ACTIVE,
            context.host,
        )
