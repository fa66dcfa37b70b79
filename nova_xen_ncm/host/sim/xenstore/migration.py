"""Export and import of one domain's part of the store (its nodes,
watches and open transactions, the events queued for it), after
docs/designs/xenstore-migration.md: an import validates all of it
before it changes anything."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping

from nova_xen_ncm.host.base import XenstoreNode
from nova_xen_ncm.host.base import XenstoreState
from nova_xen_ncm.host.base import XenstoreTransaction
from nova_xen_ncm.host.base import XenstoreWatch
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xenstore.core import PRIVILEGED_DOMID
from nova_xen_ncm.host.sim.xenstore.core import TX_CONFLICTED
from nova_xen_ncm.host.sim.xenstore.core import Connection
from nova_xen_ncm.host.sim.xenstore.core import _in_area
from nova_xen_ncm.host.sim.xenstore.core import _parent
from nova_xen_ncm.host.sim.xenstore.core import _Transaction
from nova_xen_ncm.host.sim.xenstore.core import _Watch
from nova_xen_ncm.host.sim.xenstore.core import domain_path
from nova_xen_ncm.host.sim.xs_wire import PERM_READ
from nova_xen_ncm.host.sim.xs_wire import PERM_WRITE
from nova_xen_ncm.host.sim.xs_wire import Perm
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsWireError


class XenstoreMigrationError(Exception):
    """Export or import of a domain's xenstore was refused; the message
    names the path or item at fault."""


@dataclasses.dataclass(frozen=True)
class ImportPolicy:
    """What an imported domain's xenstore may contain.

    ``areas`` are subtrees besides ``/local/domain/<domid>`` the import
    may write (the backend areas of the guest's devices). ``owners`` are
    the domids besides the guest that may own imported nodes.
    ``max_access`` is, per domid, the most an ACL entry may grant it
    ("r", "w", "b"); the guest itself and dom0 may always be granted "b",
    other domids nothing. ``default_access`` is the most a node may grant to
    every domain without an entry of its own.
    """

    areas: tuple[str, ...] = ()
    owners: frozenset[int] = frozenset({PRIVILEGED_DOMID})
    max_access: Mapping[int, str] = dataclasses.field(default_factory=dict)
    default_access: str = "n"


class MigrationOps:
    """export_domain and import_domain (a part of :class:`Xenstore`)."""

    # -- migration --------------------------------------------------------

    def export_domain(
        self,
        domid: int,
        areas: Collection[str] = (),
        *,
        strict: bool = True,
        freeze: bool = False,
    ) -> XenstoreState:
        """The domain's xenstore for migration: its home subtree and the
        ``areas`` subtrees (parents first, with permissions), the watches
        its connection registered (paths as given), its open
        transactions and the store gfn/port given at introduction.

        A transaction that already conflicts is exported with
        ``base_generation`` TX_CONFLICTED. Raises XenstoreMigrationError
        if a reply or a streamed request is still on its way (carrying it
        is not part of XenstoreState); the guest must be paused with its
        ring served. ``strict=False`` skips that check, for observing a
        running guest. ``freeze``: the export is the one a migration
        carries; changes to what it took are refused until
        :meth:`thaw`.
        """
        with self._lock:
            conn = self._domain_conn(domid)
            if strict and conn.in_partial:
                raise XenstoreMigrationError(
                    f"dom{domid}: a request is half-way through the ring "
                    f"({len(conn.in_partial)} bytes read)"
                )
            if strict and self._pending_replies(conn):
                raise XenstoreMigrationError(
                    f"dom{domid}: {self._pending_replies(conn)} replies not "
                    "yet delivered to the guest's ring"
                )
            nodes = []
            seen = set()
            for root in (conn.home, *areas):
                for path in self._subtree(None, root):
                    if path in seen:
                        continue
                    seen.add(path)
                    node = self._tree[path]
                    nodes.append(
                        XenstoreNode(
                            path, node.value, xs_wire.letter_perms(node.perms)
                        )
                    )
            watches = tuple(
                XenstoreWatch(w.given, w.token, w.depth) for w in conn.watches
            )
            txs = tuple(
                self._export_tx(tx) for tx in conn.transactions.values()
            )
            # Queued watch events travel (docs/designs/xenstore-migration.md):
            # the guest receives them on the destination.
            pending = b"".join(
                data for data, is_event in conn.outbox if is_event
            )
            if conn.outbox and conn.outbox[0][1]:
                pending = pending[conn.out_offset :]
            if freeze:
                # What changes there from now on would not go with it.
                self.freeze(domid, (conn.home, *areas))
            return XenstoreState(
                nodes=tuple(nodes),
                watches=watches,
                transactions=txs,
                store_port=conn.store_port,
                store_gfn=conn.store_gfn,
                pending_output=pending,
            )

    def _export_tx(self, tx: _Transaction) -> XenstoreTransaction:
        removed: list[tuple[str, None]] = []
        written: list[XenstoreNode] = []
        for path in sorted(tx.overlay, key=lambda p: (p.count("/"), p)):
            node = tx.overlay[path]
            live = self._tree.get(path)
            if node is None:
                if live is not None and not any(
                    _in_area(path, r[0]) for r in removed
                ):
                    removed.append((path, None))
            elif (
                live is None
                or live.value != node.value
                or live.perms != node.perms
            ):
                written.append(
                    XenstoreNode(
                        path, node.value, xs_wire.letter_perms(node.perms)
                    )
                )
        base = TX_CONFLICTED if self._conflicts(tx) else tx.base_gen
        return XenstoreTransaction(
            tx_id=tx.tx_id,
            base_generation=base,
            writes=tuple(removed) + tuple(written),
        )

    def import_domain(
        self,
        domid: int,
        state: XenstoreState,
        policy: ImportPolicy | None = None,
        *,
        page: memoryview | None = None,
        notify: Callable[[], None] | None = None,
        fire_watches: bool = True,
    ) -> Connection:
        """Restore a domain's xenstore exported by :meth:`export_domain`.

        Everything is validated before anything changes; a refusal raises
        XenstoreMigrationError naming the path. The domain's home subtree
        (and each area whose root is in ``state``) is replaced by exactly
        what ``state`` holds. Open transactions get their ids and writes
        back; since the reads they made before migration are not carried,
        any later change in the domain's areas makes their commit EAGAIN.
        With ``fire_watches`` each restored watch fires once, as a legal
        spurious event standing in for any event lost in transit.
        """
        policy = policy or ImportPolicy()
        self._check_domid(domid, allow_dom0=False)
        home = domain_path(domid)
        areas = (home, *policy.areas)
        with self._lock:
            existing = self._domains.get(domid)
            if existing is not None and (
                existing.watches or existing.transactions
            ):
                raise XenstoreMigrationError(
                    f"dom{domid} already has a live xenstore connection"
                )
            nodes = self._validate_nodes(domid, state.nodes, areas, policy)
            self._validate_watches(domid, state.watches)
            self._validate_transactions(domid, state, areas, policy)
            # Apply.
            given = {n.path for n in state.nodes}
            for root in areas:
                if root not in given:
                    continue
                for path in reversed(self._subtree(None, root)):
                    if path not in given and path in self._tree:
                        self._remove(None, path)
            for path, value, perms in nodes:
                self._set_node(None, path, value, perms)
            conn = existing
            if conn is None:
                conn = Connection(next(self._conn_ids), domid)
                self._conns[conn.conn_id] = conn
                self._domains[domid] = conn
            if page is not None:
                conn.page = page
            if notify is not None:
                conn.notify = notify
            conn.store_gfn = state.store_gfn
            conn.store_port = state.store_port
            for w in state.watches:
                path = self._canon(conn, w.path, allow_special=True)
                conn.watches.append(_Watch(path, w.token, w.depth, w.path))
            for t in state.transactions:
                tx = _Transaction(
                    t.tx_id,
                    self._gen,
                    guard_prefixes=areas,
                    doomed=t.base_generation == TX_CONFLICTED,
                )
                for write in t.writes:
                    if isinstance(write, XenstoreNode):
                        perms = xs_wire.bit_perms(write.perms)
                        self._set_node(tx, write.path, write.value, perms)
                    elif self._get(tx, write[0]) is not None:
                        self._remove(tx, write[0])
                conn.transactions[t.tx_id] = tx
            if state.transactions:
                conn.next_tx_id = (
                    max(t.tx_id for t in state.transactions) + 1
                ) & 0xFFFFFFFF
            if state.pending_output:
                # Written to the ring before anything new, as one stream.
                conn.outbox.append((bytes(state.pending_output), True))
                self._touched.setdefault(conn.conn_id, [])
            if fire_watches:
                for w in conn.watches:
                    self._queue_event(
                        conn, xs_wire.watch_event(w.given, w.token)
                    )
            self._gen += 1
            calls = self._deliver_touched()
            notify_now = False
            if conn.page is not None:
                notify_now = self._serve(conn)
            if notify_now and conn.notify is not None:
                calls.append(conn.notify)
        self._run(calls)
        return conn

    def _check_path(
        self, domid: int, path: str, areas: tuple[str, ...]
    ) -> None:
        conn = Connection(0, domid)
        try:
            canon = self._canon(conn, path)
        except XenstoreError:
            raise XenstoreMigrationError(
                f"dom{domid}: invalid xenstore path {path!r}"
            ) from None
        if canon != path or not any(_in_area(path, a) for a in areas):
            raise XenstoreMigrationError(
                f"dom{domid}: path {path!r} is outside the domain's areas "
                f"{list(areas)}"
            )

    def _check_perms(
        self,
        domid: int,
        path: str,
        perms: tuple[tuple[str, int], ...],
        policy: ImportPolicy,
    ) -> tuple[Perm, ...]:
        try:
            bits = xs_wire.bit_perms(perms)
        except XsWireError as exc:
            raise XenstoreMigrationError(f"{path}: {exc}") from None
        owner = bits[0][1]
        if owner != domid and owner not in policy.owners:
            raise XenstoreMigrationError(
                f"{path}: owner dom{owner} is not allowed (owners: "
                f"dom{domid}, {sorted(policy.owners)})"
            )
        default_max = xs_wire.parse_perm(f"{policy.default_access}0")[0]
        if bits[0][0] & ~default_max:
            raise XenstoreMigrationError(
                f"{path}: default access {perms[0][0]!r} grants more than "
                f"{policy.default_access!r}"
            )
        for access, who in bits[1:]:
            if who in (domid, PRIVILEGED_DOMID):
                # The guest's own access, and dom0's, which is
                # privileged anyway, grant nothing new.
                allowed = PERM_READ | PERM_WRITE
            elif who in policy.max_access:
                allowed = xs_wire.parse_perm(f"{policy.max_access[who]}0")[0]
            else:
                allowed = 0
            if access & ~allowed:
                raise XenstoreMigrationError(
                    f"{path}: permission {xs_wire.format_perm((access, who))}"
                    " grants more than allowed"
                )
        if owner == domid and len(bits) > self.quota.perms:
            raise XenstoreMigrationError(
                f"{path}: {len(bits)} permission entries exceed the quota "
                f"of {self.quota.perms}"
            )
        return bits

    def _validate_nodes(
        self,
        domid: int,
        nodes: Iterable[XenstoreNode],
        areas: tuple[str, ...],
        policy: ImportPolicy,
    ) -> list[tuple[str, bytes, tuple[Perm, ...]]]:
        out = []
        known: set[str] = set()
        owned = 0
        nodes = list(nodes)
        # Roots whose subtree the import replaces: what is under them on
        # this host now does not count as a known parent.
        replaced = [a for a in areas if a in {n.path for n in nodes}]
        for node in nodes:
            path = node.path
            self._check_path(domid, path, areas)
            if path in known:
                raise XenstoreMigrationError(f"{path}: appears twice")
            parent = _parent(path)
            if parent not in known and (
                parent not in self._tree
                or any(_in_area(parent, r) for r in replaced)
            ):
                raise XenstoreMigrationError(
                    f"{path}: parent {parent} is neither on this host nor "
                    "earlier in the state"
                )
            if not isinstance(node.value, bytes | bytearray):
                raise XenstoreMigrationError(f"{path}: value is not bytes")
            perms = self._check_perms(domid, path, node.perms, policy)
            if perms[0][1] == domid:
                owned += 1
                if len(node.value) > self.quota.node_size:
                    raise XenstoreMigrationError(
                        f"{path}: value of {len(node.value)} bytes exceeds "
                        f"the node size quota ({self.quota.node_size})"
                    )
            known.add(path)
            out.append((path, bytes(node.value), perms))
        if owned > self.quota.nodes:
            raise XenstoreMigrationError(
                f"dom{domid}: {owned} nodes exceed the quota of "
                f"{self.quota.nodes}"
            )
        return out

    def _validate_watches(
        self, domid: int, watches: Iterable[XenstoreWatch]
    ) -> None:
        conn = Connection(0, domid)
        seen = set()
        count = 0
        for w in watches:
            try:
                path = self._canon(conn, w.path, allow_special=True)
            except XenstoreError:
                raise XenstoreMigrationError(
                    f"dom{domid}: watch path {w.path!r} is invalid"
                ) from None
            if not w.token or "\0" in w.token or not w.token.isascii():
                raise XenstoreMigrationError(
                    f"dom{domid}: watch on {w.path!r} has a bad token"
                )
            if not isinstance(w.depth, int) or w.depth < -1:
                raise XenstoreMigrationError(
                    f"dom{domid}: watch on {w.path!r} has depth {w.depth!r}"
                )
            if (path, w.token) in seen:
                raise XenstoreMigrationError(
                    f"dom{domid}: watch {w.path!r} {w.token!r} twice"
                )
            seen.add((path, w.token))
            count += 1
        if count > self.quota.watches:
            raise XenstoreMigrationError(
                f"dom{domid}: {count} watches exceed the quota of "
                f"{self.quota.watches}"
            )

    def _validate_transactions(
        self,
        domid: int,
        state: XenstoreState,
        areas: tuple[str, ...],
        policy: ImportPolicy,
    ) -> None:
        txs = state.transactions
        if len(txs) > self.quota.transactions:
            raise XenstoreMigrationError(
                f"dom{domid}: {len(txs)} transactions exceed the quota of "
                f"{self.quota.transactions}"
            )
        ids = set()
        for t in txs:
            if not 0 < t.tx_id <= 0xFFFFFFFF or t.tx_id in ids:
                raise XenstoreMigrationError(
                    f"dom{domid}: transaction id {t.tx_id!r} is invalid "
                    "or repeated"
                )
            ids.add(t.tx_id)
            for write in t.writes:
                if isinstance(write, XenstoreNode):
                    self._check_path(domid, write.path, areas)
                    perms = self._check_perms(
                        domid, write.path, write.perms, policy
                    )
                    if (
                        perms[0][1] == domid
                        and len(write.value) > self.quota.node_size
                    ):
                        raise XenstoreMigrationError(
                            f"{write.path}: value exceeds the node size quota"
                        )
                elif (
                    isinstance(write, tuple)
                    and len(write) == 2
                    and isinstance(write[0], str)
                    and write[1] is None
                ):
                    self._check_path(domid, write[0], areas)
                    if write[0] in areas:
                        raise XenstoreMigrationError(
                            f"{write[0]}: a transaction may not remove "
                            "the root of an area"
                        )
                else:
                    raise XenstoreMigrationError(
                        f"dom{domid}: transaction {t.tx_id} has a "
                        f"malformed write {write!r}"
                    )
