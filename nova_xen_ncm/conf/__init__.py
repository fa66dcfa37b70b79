"""oslo.config options of nova-xen-ncm, one module per option group.

Every option lives in a named group; nothing is registered in [DEFAULT].
``CONF`` is the global ConfigOpts the console commands and the Nova driver
share (inside Nova it is ``nova.conf.CONF``'s underlying object).
"""

from oslo_config import cfg

from nova_xen_ncm.conf import drain
from nova_xen_ncm.conf import progress
from nova_xen_ncm.conf import sim
from nova_xen_ncm.conf import xen
from nova_xen_ncm.conf import xen_ncm

CONF = cfg.CONF

_MODULES = (xen_ncm, sim, xen, progress, drain)


def register_opts(conf: cfg.ConfigOpts) -> None:
    for module in _MODULES:
        module.register_opts(conf)


register_opts(CONF)
