"""Neutron side of nova-xen-ncm: what a cloud without L2 agents binds
Xen ports with."""
