"""VIFs through os-vif, and the Neutron events Nova waits for.

Xen attaches a guest's vif to dom0's network with its hotplug scripts;
what must exist first (the bridge, the OVS port with the Neutron port's
``iface-id``) is what os-vif plugs, as for every other Nova driver.
Where: on spawn and power on, on the destination in
``pre_live_migration`` (with the destination's port bindings when Neutron
has them, so that its agent there reports the port up and Neutron sends
``network-vif-plugged`` to the source, which waits for it), on the source
after a migration, at destroy, and on the destination when a migration
rolls back.
"""

from __future__ import annotations

import contextlib

import nova.conf
import os_vif
from nova import exception
from nova.network import model as network_model
from nova.network import os_vif_util
from oslo_log import log as logging

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF


def destination_network_info(network_info, migrate_data):
    """The vifs as bound on the destination: with Neutron's multiple
    port bindings the conductor hands them over in ``migrate_data.vifs``;
    without, the instance's own network info applies."""
    if "vifs" in migrate_data and migrate_data.vifs:
        return network_model.NetworkInfo(
            [vif.get_dest_vif() for vif in migrate_data.vifs]
        )
    return network_info


def plug_time_events(network_info) -> list[tuple[str, str]]:
    """``network-vif-plugged`` for each vif Neutron has not reported
    active yet, unless the operator turned the events off
    (``[DEFAULT] vif_plugging_timeout = 0``)."""
    if not CONF.vif_plugging_timeout:
        return []
    return [
        ("network-vif-plugged", vif["id"])
        for vif in network_info or ()
        if vif.get("active", True) is False
    ]


class VIFOps:
    def __init__(self, virtapi) -> None:
        self._virtapi = virtapi

    @staticmethod
    def initialize() -> None:
        # Loads the os-vif plugins once per process, as nova-compute's
        # other drivers do.
        os_vif.initialize()

    def plug(self, instance, network_info) -> None:
        instance_info = os_vif_util.nova_to_osvif_instance(instance)
        for vif in network_info or ():
            osvif = self._to_osvif(vif)
            try:
                os_vif.plug(osvif, instance_info)
            except Exception as error:
                LOG.error(
                    "Plugging vif %s failed: %s",
                    vif["id"],
                    error,
                    instance=instance,
                )
                raise exception.VirtualInterfacePlugException(
                    f"vif {vif['id']} ({vif['type']}): {error}"
                ) from error
            LOG.debug("Plugged vif %s", vif["id"], instance=instance)

    def unplug(
        self, instance, network_info, ignore_errors: bool = False
    ) -> None:
        instance_info = os_vif_util.nova_to_osvif_instance(instance)
        for vif in network_info or ():
            try:
                os_vif.unplug(self._to_osvif(vif), instance_info)
            except Exception as error:
                if not ignore_errors:
                    raise exception.VirtualInterfaceUnplugException(
                        reason=f"vif {vif['id']}: {error}"
                    ) from error
                # Destroying an instance must not stop at its network.
                LOG.warning(
                    "Unplugging vif %s failed: %s",
                    vif["id"],
                    error,
                    instance=instance,
                )
            else:
                LOG.debug("Unplugged vif %s", vif["id"], instance=instance)

    @staticmethod
    def _to_osvif(vif):
        osvif = os_vif_util.nova_to_osvif_vif(vif)
        if osvif is None:
            # Types os-vif does not model (tap, macvtap, hostdev ...) have
            # no Xen backend here.
            raise exception.VirtualInterfacePlugException(
                f"vif {vif['id']}: type {vif['type']!r} is not supported "
                "by the xen_ncm driver (os-vif has no model of it)"
            )
        return osvif

    @contextlib.contextmanager
    def plugged_and_reported(self, instance, network_info):
        """Plug the vifs and, once the body (building the domain) is
        done, wait for Neutron's ``network-vif-plugged`` of those not
        active yet: ``vif_plugging_timeout``, ``vif_plugging_is_fatal``."""
        events = plug_time_events(network_info)
        try:
            with self._virtapi.wait_for_instance_event(
                instance,
                events,
                timeout=CONF.vif_plugging_timeout,
                error_callback=self._neutron_failed,
            ):
                self.plug(instance, network_info)
                yield
        except exception.InstanceEventTimeout:
            LOG.warning(
                "Timed out waiting for %s from Neutron",
                events,
                instance=instance,
            )
            if CONF.vif_plugging_is_fatal:
                raise exception.VirtualInterfaceCreateException() from None

    @staticmethod
    def _neutron_failed(event_name, instance):
        LOG.error(
            "Neutron reported failure on event %s",
            event_name,
            instance=instance,
        )
        if CONF.vif_plugging_is_fatal:
            raise exception.VirtualInterfaceCreateException()
