"""Builds the host driver named by ``[xen_ncm] host_driver``.

Host drivers are stevedore entry points in the ``nova_xen_ncm.host_drivers``
namespace (setup.cfg), so that a driver's dependencies (ctypes bindings
for real Xen) are imported only when it is chosen, and an out-of-tree
driver can be installed beside the project's.
"""

from __future__ import annotations

from oslo_config import cfg
from stevedore import driver as stevedore_driver
from stevedore import exception as stevedore_exception
from stevedore import extension

from nova_xen_ncm.host import base

NAMESPACE = "nova_xen_ncm.host_drivers"

# Drivers whose guests run inside the process that holds the driver
# object: a command that restores or receives a guest on them must stay
# alive for the guest to keep running.
IN_PROCESS_GUESTS = frozenset({"sim"})


def available() -> list[str]:
    """The names of the installed host drivers."""
    return sorted(extension.ExtensionManager(NAMESPACE).names())


def guests_live_in_process(name: str) -> bool:
    """True when guests of driver ``name`` end with the process."""
    return name in IN_PROCESS_GUESTS


def load_host_driver(
    name: str, hostname: str, conf: cfg.ConfigOpts
) -> base.HostDriver:
    """The host driver ``name`` for the host called ``hostname``.

    Raises :class:`~nova_xen_ncm.host.base.NotSupported` when no driver
    of that name is installed.
    """
    try:
        manager = stevedore_driver.DriverManager(
            NAMESPACE,
            name,
            invoke_on_load=True,
            invoke_kwds={"hostname": hostname, "conf": conf},
        )
    except stevedore_exception.NoMatches:
        raise base.NotSupported(
            f"host driver {name!r} is not installed (available: "
            f"{', '.join(available()) or 'none'})",
            call="load_host_driver",
        ) from None
    return manager.driver
