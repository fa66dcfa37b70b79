"""xenstored's watches (tools/xenstored/watch.c): registration, the
events a change fires, who may see them, and their queueing."""

from __future__ import annotations

from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xenstore.core import Connection
from nova_xen_ncm.host.sim.xenstore.core import Match
from nova_xen_ncm.host.sim.xenstore.core import _Event
from nova_xen_ncm.host.sim.xenstore.core import _Transaction
from nova_xen_ncm.host.sim.xenstore.core import _Watch
from nova_xen_ncm.host.sim.xenstore.core import is_child
from nova_xen_ncm.host.sim.xs_wire import PERM_READ
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import Perm
from nova_xen_ncm.host.sim.xs_wire import XenstoreError


class WatchOps:
    """The watch requests and the firing of events (a part of
    :class:`Xenstore`, over the state of :class:`XenstoreCore`)."""

    # -- watches --------------------------------------------------------

    def _fire(
        self,
        tx: _Transaction | None,
        path: str,
        match: Match,
        perm_sets: list[tuple[Perm, ...]],
    ) -> None:
        event = _Event(path, match, tuple(perm_sets))
        if tx is not None:
            # Changes in a transaction fire only when it commits.
            tx.events.append(event)
        else:
            self._dispatch(event)

    def _dispatch(self, event: _Event) -> None:
        """watch.c fire_watches()."""
        path = event.path
        for conn in list(self._conns.values()):
            if not conn.privileged and not any(
                self._perm(conn, perms) & PERM_READ
                for perms in event.perm_sets
            ):
                continue
            for w in conn.watches:
                if event.match is Match.EXACT:
                    send = path == w.path
                elif event.match is Match.SUBTREE:
                    send = is_child(path, w.path, w.depth)
                elif event.match is Match.DEPTH:
                    send = path == w.path or (
                        w.depth > 0 and is_child(path, w.path, w.depth)
                    )
                else:
                    send = path == w.path and w.depth < 0
                if send:
                    epath = path
                    if w.relative and path.startswith(conn.home + "/"):
                        epath = path[len(conn.home) + 1 :]
                    self._queue_event(
                        conn, xs_wire.watch_event(epath, w.token)
                    )

    def _queue_event(self, conn: Connection, event: Message) -> None:
        self._touched.setdefault(conn.conn_id, []).append(event)
        if conn.page is not None:
            conn.outbox.append((event.encode(), True))
        else:
            path, token = event.strings()[:2]
            conn.events.append((path, token))

    def _fire_special(self, name: str, domid: int) -> None:
        """domain.c fire_special_watches(): the plain name for watches
        without depth, <name>/<domid> for depth-1 and per-domain ones."""
        perms = [self._special[name].perms]
        self._dispatch(_Event(name, Match.NODEPTH, tuple(perms)))
        self._dispatch(_Event(f"{name}/{domid}", Match.DEPTH, tuple(perms)))

    def _do_watch(self, conn, tx, msg) -> bytes:
        args = self._args(msg)
        if len(args) not in (2, 3):
            raise XenstoreError("EINVAL", "WATCH takes <path>|<token>|")
        given, token = args[0], args[1]
        depth = -1
        if len(args) == 3:
            if not args[2].isdigit():
                raise XenstoreError("EINVAL", f"bad depth {args[2]!r}")
            depth = int(args[2])
        path = self._canon(conn, given, allow_special=True)
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XenstoreError("EEXIST", f"watch {given} {token}")
        if not conn.privileged and len(conn.watches) >= self.quota.watches:
            raise XenstoreError("ENOSPC", "watch quota")
        conn.watches.append(_Watch(path, token, depth, given))
        # watch.c do_watch: "We fire once up front".
        self._after_reply.append(xs_wire.watch_event(given, token))
        return b"OK\0"

    def _do_unwatch(self, conn, tx, msg) -> bytes:
        args = self._args(msg)
        if len(args) != 2:
            raise XenstoreError("EINVAL", "UNWATCH takes <path>|<token>|")
        path = self._canon(conn, args[0], allow_special=True)
        for i, w in enumerate(conn.watches):
            if w.path == path and w.token == args[1]:
                del conn.watches[i]
                return b"OK\0"
        raise XenstoreError("ENOENT", f"no watch {args[0]} {args[1]}")

    def _do_reset_watches(self, conn, tx, msg) -> bytes:
        conn.watches.clear()
        conn.transactions.clear()
        return b"OK\0"
