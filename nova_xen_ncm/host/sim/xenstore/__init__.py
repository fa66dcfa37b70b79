"""The simulated host's xenstored.

A model of Xen's xenstore daemon as ``docs/misc/xenstore.txt`` specifies
it and ``tools/xenstored`` (core.c, watch.c, transaction.c, domain.c)
implements it:

* a tree of nodes, each with a value and permissions (owner with the
  default access for everybody else, then an ACL); new nodes inherit their
  parent's permissions and an unprivileged creator becomes the owner
  (core.c construct_node); dom0 is privileged (core.c perm_for_conn);
* per-domain quotas with xenstored's defaults and errors (domain.c
  ``quotas[]``): entries and transactions and watches ENOSPC, node size
  ENOSPC, permission entries ENOSPC;
* watches with tokens and an optional depth (watch.c is_child), fired on
  the changed path for watches on it or an ancestor, for every node an
  XS_RM removes, once on registration, and for @introduceDomain and
  @releaseDomain; a connection only sees events for nodes it can read, or
  whose parent it can read (watch.c watch_permitted);
* transactions that see their own writes and commit or fail with EAGAIN
  when a node they read or wrote changed since they started;
* one connection per domain through its ring page (xs_wire), plus any
  number of in-process connections for dom0's tools and backends.

Export and import of one domain's part of the store (its nodes, watches and
open transactions) carry a guest's xenstore through a migration, after
``docs/designs/xenstore-migration.md``.

How the host uses it: ``introduce_domain(domid, page=..., notify=...)``
gives a guest its ring connection (``page`` is the xenstore page in guest
RAM, ``notify`` signals the store event channel); call
``service_ring(domid)`` whenever the guest signals that channel. Dom0's
tools and backends use :class:`LocalClient` (or ``connect()`` and
``handle()``). ``export_domain`` / ``import_domain`` move a guest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xenstore.core import PRIVILEGED_DOMID
from nova_xen_ncm.host.sim.xenstore.core import XenstoreCore
from nova_xen_ncm.host.sim.xenstore.migration import ImportPolicy
from nova_xen_ncm.host.sim.xenstore.migration import MigrationOps
from nova_xen_ncm.host.sim.xenstore.migration import XenstoreMigrationError
from nova_xen_ncm.host.sim.xenstore.transactions import TransactionOps
from nova_xen_ncm.host.sim.xenstore.watches import WatchOps
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsType

__all__ = [
    "ImportPolicy",
    "LocalClient",
    "Xenstore",
    "XenstoreMigrationError",
]


class Xenstore(WatchOps, TransactionOps, MigrationOps, XenstoreCore):
    """The daemon: its core, watches, transactions and migration."""

    # The requests by message type: an explicit table (an unknown type
    # is ENOSYS).
    _HANDLERS = {
        XsType.READ: XenstoreCore._do_read,
        XsType.WRITE: XenstoreCore._do_write,
        XsType.MKDIR: XenstoreCore._do_mkdir,
        XsType.RM: XenstoreCore._do_rm,
        XsType.DIRECTORY: XenstoreCore._do_directory,
        XsType.DIRECTORY_PART: XenstoreCore._do_directory_part,
        XsType.GET_PERMS: XenstoreCore._do_get_perms,
        XsType.SET_PERMS: XenstoreCore._do_set_perms,
        XsType.WATCH: WatchOps._do_watch,
        XsType.UNWATCH: WatchOps._do_unwatch,
        XsType.RESET_WATCHES: WatchOps._do_reset_watches,
        XsType.TRANSACTION_START: TransactionOps._do_transaction_start,
        XsType.TRANSACTION_END: TransactionOps._do_transaction_end,
        XsType.GET_DOMAIN_PATH: XenstoreCore._do_get_domain_path,
        XsType.IS_DOMAIN_INTRODUCED: XenstoreCore._do_is_domain_introduced,
        XsType.INTRODUCE: XenstoreCore._do_introduce,
        XsType.RELEASE: XenstoreCore._do_release,
        XsType.RESUME: XenstoreCore._do_resume,
        XsType.SET_TARGET: XenstoreCore._do_set_target,
    }


class LocalClient(xs_wire.XenstoreClient):
    """An in-process client for dom0's tools and backends: the requests
    of docs/misc/xenstore.txt as method calls on a connection of its own.

    Errors raise XenstoreError with xenstored's errno name. Watch events
    are collected from :meth:`events`; ``wakeup`` is called (without the
    daemon's lock) whenever new ones are queued.
    """

    def __init__(
        self,
        store: Xenstore,
        domid: int = PRIVILEGED_DOMID,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.conn = store.connect(domid, wakeup)
        self._req_ids = itertools.count(1)

    def close(self) -> None:
        self.store.disconnect(self.conn)

    def _call(self, mtype: XsType, payload: bytes, tx: int = 0) -> bytes:
        req_id = next(self._req_ids) & 0xFFFFFFFF
        reply = self.store.handle(
            self.conn, Message(mtype, req_id, tx, payload)
        ).reply
        err = reply.error()
        if err is not None:
            raise XenstoreError(err.name, f"{mtype.name} failed")
        return reply.payload

    def events(self) -> list[tuple[str, str]]:
        """(path, token) of the watch events queued since the last call."""
        return self.conn.pop_events()
