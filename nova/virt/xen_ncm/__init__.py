"""Nova loads ``compute_driver = xen_ncm.XenNCMDriver`` from here."""

from nova_xen_ncm.virt.driver import XenNCMDriver

__all__ = ["XenNCMDriver"]
