"""Non-cooperative live migration of Xen HVM guests for OpenStack Nova."""
