"""PV devices of the simulated host: frontends in the guest, backends in
dom0, connected through xenbus and a shared ring in guest memory.

Modelled on ``xen/include/public/io/netif.h`` and ``blkif.h``, kept to
what a migration has to carry:

* one ring per device (``io/ring.h``, :mod:`.ring`) of 64-byte entries;
  a request is (seq, id, op, payload), a response (seq, id, status,
  payload); the backend answers with the request's id and seq;
* a ``vbd`` backend serves WRITE and READ of 32-byte sectors from a
  :class:`BlockStore`, a file (shared storage: the source's and the
  destination's backend of one disk open the same file); a ``vif``
  backend delivers every packet on a loopback network and answers with
  a receipt (a digest of the packet);
* the xenbus handshake of ``io/xenbus.h`` (Initialising 1, InitWait 2,
  Initialised 3, Connected 4, Closing 5, Closed 6), the frontend writing
  ``ring-ref`` and ``event-channel`` into its area as netfront does.

The frontend keeps every bit of its state in guest RAM, in a
``FRONTEND_STATE_SIZE`` struct (``FRONTEND_FIELDS``, then the state
history, then the request slots) at a place the guest kernel gives it: its
own and the backend's xenbus state, the ring's page, grant reference,
port and private indices, the next sequence number, the last response
sequence seen, and counters of responses completed, lost, duplicated,
reordered and carrying a bad payload. Every state it set or saw is
appended to the history, so a checker can prove it saw no change across a
migration. A new frontend object over the same RAM (:meth:`Frontend.
attach`) continues where the old one stopped.

Loss, duplication and reordering: the backend answers in ring order, so
requests complete in sequence order. A response that overtakes an
outstanding request marks that request lost; if its response comes later
after all, it counts as reordered instead. A response to a request that is
not outstanding (already answered) is a duplicate.

The backend keeps its private ring indices and the requests it has taken
off the ring but not answered ("in flight", the disk still working) in
dom0. :meth:`Backend.quiesce` stops it and exports them as a
:class:`~nova_xen_ncm.host.base.BackendState` (``ring_indices["ring"] =
(req_cons, rsp_prod_pvt)``, ``ring_refs = (ring grant ref,)``,
``event_channels = (the frontend's port,)``); :meth:`Backend.reconnect`
on the destination maps the same grant reference, binds the same
frontend port, continues from the same indices and answers the in-flight
requests, without writing any xenstore node (a device caught in its
handshake takes the handshake up where it stood).
:func:`.backend.validate_backend_state` checks a BackendState without touching
anything, and :func:`.frontend.observe_frontend` reads a frontend's record from
guest RAM for GuestState.frontends (``nova_xen_ncm.host.checker``).

What the devices need from the host is spelt out as Protocols:
:class:`GuestRam`, :class:`GuestOps` and :class:`XenbusClient` for a
frontend; :class:`GrantMapper`, :class:`Dom0Evtchn` and
:class:`XenbusClient` for a backend; :class:`XenstoreAdmin` for the
toolstack's :func:`add_device`. The hypervisor (``Hypervisor``), dom0's
services (``Dom0Services``) and ``GuestMemory`` satisfy
:class:`GrantMapper`, :class:`Dom0Evtchn` and :class:`GuestRam` as they
are; :class:`XenstoreConnectionClient` turns an in-process connection of
the simulated xenstored into a :class:`XenstoreAdmin`.

The package is split as the protocol (protocol.py: xenbus states, ring
entries, xenstore areas, what a device needs from the host), the
frontend (frontend.py) and the backends (backend.py).
"""

from __future__ import annotations

from nova_xen_ncm.host.sim.devices.backend import BACKENDS
from nova_xen_ncm.host.sim.devices.backend import Backend
from nova_xen_ncm.host.sim.devices.backend import BackendError
from nova_xen_ncm.host.sim.devices.backend import BlockStore
from nova_xen_ncm.host.sim.devices.backend import XenstoreConnectionClient
from nova_xen_ncm.host.sim.devices.backend import dispatch_watch_events
from nova_xen_ncm.host.sim.devices.backend import validate_backend_state
from nova_xen_ncm.host.sim.devices.frontend import FRONTEND_STATE_SIZE
from nova_xen_ncm.host.sim.devices.frontend import Frontend
from nova_xen_ncm.host.sim.devices.frontend import FrontendError
from nova_xen_ncm.host.sim.devices.protocol import DEFAULT_SECTORS
from nova_xen_ncm.host.sim.devices.protocol import KINDS
from nova_xen_ncm.host.sim.devices.protocol import SECTOR_BYTES
from nova_xen_ncm.host.sim.devices.protocol import GuestOps
from nova_xen_ncm.host.sim.devices.protocol import add_device
from nova_xen_ncm.host.sim.devices.protocol import disk_sectors
from nova_xen_ncm.host.sim.devices.protocol import parse_frontend_area

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BlockStore",
    "DEFAULT_SECTORS",
    "FRONTEND_STATE_SIZE",
    "Frontend",
    "FrontendError",
    "GuestOps",
    "KINDS",
    "SECTOR_BYTES",
    "XenstoreConnectionClient",
    "add_device",
    "disk_sectors",
    "dispatch_watch_events",
    "parse_frontend_area",
    "validate_backend_state",
]
