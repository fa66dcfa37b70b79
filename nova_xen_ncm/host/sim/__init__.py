"""The simulated Xen host (architecture.rst section 6).

``host.SimHost`` is the HostDriver; the hypervisor model is split by
concern: ``layout`` (HVM physmap), ``memory`` (guest RAM, p2m, log-dirty
and Xen pages in shared memory), ``hvm`` (HVM context and params),
``evtchn`` (event channels, 2-level ABI), ``grant`` (grant tables v1),
``guest`` and ``kernel`` (the guest process and the state it keeps in its
RAM), ``ipc`` (host-guest channels); ``xenstore``, ``xs_wire``,
``xenbus``, ``ring`` and ``devices`` model xenstored and the PV devices.

Nothing is imported here: the guest process imports its modules alone.
"""
