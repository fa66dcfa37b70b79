"""xenstored's transactions (tools/xenstored/transaction.c): a
transaction sees its own writes and commits, or fails with EAGAIN when a
node it read or wrote changed since it started."""

from __future__ import annotations

from nova_xen_ncm.host.sim.xenstore.core import Connection
from nova_xen_ncm.host.sim.xenstore.core import _in_area
from nova_xen_ncm.host.sim.xenstore.core import _Transaction
from nova_xen_ncm.host.sim.xs_wire import XenstoreError


class TransactionOps:
    """The transaction requests (a part of :class:`Xenstore`)."""

    def _do_transaction_start(self, conn, tx, msg) -> bytes:
        if msg.tx_id:
            raise XenstoreError("EBUSY", "already in a transaction")
        if (
            not conn.privileged
            and len(conn.transactions) >= self.quota.transactions
        ):
            raise XenstoreError("ENOSPC", "transaction quota")
        tx_id = self._alloc_tx_id(conn)
        conn.transactions[tx_id] = _Transaction(tx_id, self._gen)
        return f"{tx_id}\0".encode()

    @staticmethod
    def _alloc_tx_id(conn: Connection) -> int:
        tx_id = conn.next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        return tx_id

    def _do_transaction_end(self, conn, tx, msg) -> bytes:
        if tx is None:
            raise XenstoreError("ENOENT", "no transaction")
        arg = self._args(msg, 1)[0]
        if arg not in ("T", "F"):
            raise XenstoreError("EINVAL", f"TRANSACTION_END {arg!r}")
        del conn.transactions[tx.tx_id]
        try:
            if arg == "T":
                self._commit(conn, tx)
        finally:
            self._prune_changed()
        return b"OK\0"

    def _conflicts(self, tx: _Transaction) -> bool:
        if tx.doomed:
            return True
        for path in tx.accessed | tx.overlay.keys():
            if self._changed.get(path, 0) > tx.base_gen:
                return True
        for path, gen in self._changed.items():
            if gen > tx.base_gen and any(
                _in_area(path, g) for g in tx.guard_prefixes
            ):
                return True
        return False

    def _commit(self, conn: Connection, tx: _Transaction) -> None:
        if self._conflicts(tx):
            raise XenstoreError("EAGAIN", f"transaction {tx.tx_id}")
        if not conn.privileged:
            if self._owned_count(tx, conn.domid) > self.quota.nodes:
                raise XenstoreError("ENOSPC", "node quota at commit")
        self._gen += 1
        for path, node in tx.overlay.items():
            self._put(None, path, node)
        for event in tx.events:
            self._dispatch(event)

    def _prune_changed(self) -> None:
        bases = [
            t.base_gen
            for c in self._conns.values()
            for t in c.transactions.values()
        ]
        if not bases:
            self._changed.clear()
            self._gen += 1
            return
        low = min(bases)
        self._changed = {p: g for p, g in self._changed.items() if g > low}
