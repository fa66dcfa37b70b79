"""xenstored's core (tools/xenstored/core.c, domain.c): the tree of
nodes and their permissions, quotas, connections (a domain's ring or an
in-process tool) and the requests on nodes and domains.

The daemon as a whole is :class:`nova_xen_ncm.host.sim.xenstore.Xenstore`:
this core, watches (watches.py), transactions (transactions.py) and the
migration of a domain's part of the store (migration.py).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import re
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

from oslo_log import log as logging

from nova_xen_ncm.host.base import DOMID_FIRST_RESERVED
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xs_wire import PERM_READ
from nova_xen_ncm.host.sim.xs_wire import PERM_WRITE
from nova_xen_ncm.host.sim.xs_wire import XENSTORE_ABS_PATH_MAX
from nova_xen_ncm.host.sim.xs_wire import XENSTORE_PAYLOAD_MAX
from nova_xen_ncm.host.sim.xs_wire import XENSTORE_RING_SIZE
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import Perm
from nova_xen_ncm.host.sim.xs_wire import Ring
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsType
from nova_xen_ncm.host.sim.xs_wire import XsWireError

LOG = logging.getLogger(__name__)

# XS_PERM_OWNER of xenstored's core.h: only owners and privileged domains.
PERM_OWNER = 4
PRIVILEGED_DOMID = 0
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# What xenstored advertises in server_features (domain.c new_domain).
SERVER_FEATURES = (
    xs_wire.XENSTORE_SERVER_FEATURE_RECONNECTION
    | xs_wire.XENSTORE_SERVER_FEATURE_ERROR
    | xs_wire.XENSTORE_SERVER_FEATURE_WATCHDEPTH
)

# Exported base generation of a transaction that already conflicts: its
# commit must fail with EAGAIN wherever it is restored.
TX_CONFLICTED = -1

# docs/misc/xenstore.txt: alphanumerics and -/_@.
_PATH_CHARS = re.compile(r"^[A-Za-z0-9/_@-]+$")
_LOCAL_PREFIX = re.compile(r"^/local/domain/[0-9]{1,5}/")


class Match(enum.Enum):
    """watch.c enum watch_match."""

    EXACT = 1
    SUBTREE = 2
    DEPTH = 3
    NODEPTH = 4


@dataclasses.dataclass(frozen=True)
class Quota:
    """Per-domain limits for unprivileged domains (domain.c quotas[])."""

    nodes: int = 1000
    node_size: int = 2048
    watches: int = 128
    transactions: int = 10
    perms: int = 5
    path_len: int = xs_wire.XENSTORE_REL_PATH_MAX
    # Replies queued for a ring connection before xenstored stops reading
    # its requests (ACC_OUTST).
    outstanding: int = 20


@dataclasses.dataclass(frozen=True)
class _Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()
    # Store generation of the node's last change (DIRECTORY_PART gencnt).
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0][1]

    def size(self) -> int:
        # What xenstored's ACC_NODESZ quota weighs: value, permission
        # entries and the child name list.
        return (
            len(self.value)
            + 4 * len(self.perms)
            + sum(len(c) + 1 for c in self.children)
        )


@dataclasses.dataclass
class _Watch:
    path: str  # absolute, or a special @path
    token: str
    depth: int
    given: str  # as the client registered it (maybe relative)

    @property
    def relative(self) -> bool:
        return self.given != self.path


@dataclasses.dataclass
class _Event:
    path: str
    match: Match
    # Permission sets of which one readable one lets a connection see it
    # (the node's, its parent's, its old ones for SET_PERMS).
    perm_sets: tuple[tuple[Perm, ...], ...]


@dataclasses.dataclass
class _Transaction:
    tx_id: int
    base_gen: int
    overlay: dict[str, _Node | None] = dataclasses.field(default_factory=dict)
    accessed: set[str] = dataclasses.field(default_factory=set)
    events: list[_Event] = dataclasses.field(default_factory=list)
    # Imported transactions: the reads made before migration are unknown,
    # so any change under these prefixes after import is a conflict.
    guard_prefixes: tuple[str, ...] = ()
    doomed: bool = False


class Connection:
    """One client of the daemon: a domain's ring, or an in-process tool.

    In-process connections get their replies from :meth:`Xenstore.handle`
    and their watch events from :meth:`pop_events`; ``wakeup`` (if set) is
    called, without the daemon's lock held, whenever events are queued.
    """

    def __init__(
        self,
        conn_id: int,
        domid: int,
        *,
        page: memoryview | None = None,
        notify: Callable[[], None] | None = None,
        wakeup: Callable[[], None] | None = None,
        store_gfn: int = 0,
        store_port: int = 0,
    ) -> None:
        self.conn_id = conn_id
        self.domid = domid
        self.page = page
        self.notify = notify
        self.wakeup = wakeup
        self.store_gfn = store_gfn
        self.store_port = store_port
        self.watches: list[_Watch] = []
        self.transactions: dict[int, _Transaction] = {}
        # While held (hold_output), nothing is written to the ring: what
        # is queued stays in the outbox, which the export carries.
        self.held = False
        self.next_tx_id = 1
        self.target: int | None = None
        # Ring connections: encoded messages waiting for rsp ring space
        # (bytes, is_event), how much of the first one is written, and
        # the reassembly buffer of a streamed request.
        self.outbox: collections.deque[tuple[bytes, bool]] = (
            collections.deque()
        )
        self.out_offset = 0
        self.in_partial = bytearray()
        self.broken: str | None = None
        # In-process connections: (path, token) events.
        self.events: collections.deque[tuple[str, str]] = collections.deque()

    @property
    def privileged(self) -> bool:
        return self.domid == PRIVILEGED_DOMID

    @property
    def home(self) -> str:
        return domain_path(self.domid)

    def pop_events(self) -> list[tuple[str, str]]:
        """Watch events queued for an in-process connection."""
        out = []
        # popleft is atomic: safe against the daemon appending meanwhile.
        while self.events:
            out.append(self.events.popleft())
        return out

    def __repr__(self) -> str:
        return f"<xenstore connection {self.conn_id} dom{self.domid}>"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one request did: the reply to the requester, and the watch
    events it queued, by connection id (already queued for delivery)."""

    reply: Message
    events: Mapping[int, tuple[Message, ...]]


def domain_path(domid: int) -> str:
    """GET_DOMAIN_PATH: /local/domain/<domid>."""
    return f"/local/domain/{domid}"


def is_child(child: str, parent: str, depth: int = -1) -> bool:
    """watch.c is_child(): ``child`` is ``parent`` or below it, at most
    ``depth`` levels down (-1: any)."""
    if not child.startswith(parent):
        return False
    rest = child[len(parent) :]
    if parent != "/" and rest and rest[0] != "/":
        return False
    if depth < 0 or not rest:
        return True
    return rest.count("/") + (1 if parent == "/" else 0) <= depth


def _in_area(path: str, area: str) -> bool:
    return path == area or path.startswith(area.rstrip("/") + "/")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _join(parent: str, child: str) -> str:
    return f"/{child}" if parent == "/" else f"{parent}/{child}"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


class XenstoreCore:
    """The daemon's state and what every request goes through. Thread-
    safe: one lock serialises every request, as xenstored's single
    thread does; callbacks run outside the lock."""

    def __init__(
        self,
        quota: Quota | None = None,
        ring_mapper: Callable[
            [int, int, int],
            tuple[memoryview, Callable[[], None]],
        ]
        | None = None,
    ) -> None:
        """``ring_mapper(domid, gfn, port)`` maps a ring page and binds
        its event channel for XS_INTRODUCE sent over the wire."""
        self.quota = quota or Quota()
        self._ring_mapper = ring_mapper
        # xenstored's lock: locks.XENSTORE, in the host's lock order.
        self._lock = locks.OrderedLock(
            locks.XENSTORE, threading.RLock(), reentrant=True
        )
        self._gen = 1
        self._tree: dict[str, _Node] = {
            "/": _Node(b"", ((0, PRIVILEGED_DOMID),), gen=0)
        }
        self._special: dict[str, _Node] = {
            p: _Node(b"", ((0, PRIVILEGED_DOMID),)) for p in SPECIAL_PATHS
        }
        self._owned: collections.Counter[int] = collections.Counter(
            {PRIVILEGED_DOMID: 1}
        )
        # path -> generation of its last committed change (transactions).
        self._changed: dict[str, int] = {}
        self._conn_ids = itertools.count(1)
        self._conns: dict[int, Connection] = {}
        self._domains: dict[int, Connection] = {}
        # Per request: connections with newly queued events, and the
        # events queued for the requester after its reply.
        self._touched: dict[int, list[Message]] = {}
        self._after_reply: list[Message] = []
        # domid -> the subtrees its export took (export_domain): until
        # :meth:`thaw`, a change there would not reach the copy that
        # goes on elsewhere, so it is refused (EAGAIN) instead of lost.
        self._frozen: dict[int, tuple[str, ...]] = {}
        for path in ("/local", "/local/domain", "/tool"):
            self._create(None, path, b"", PRIVILEGED_DOMID, fire=False)

    # -- connections and domains ----------------------------------------

    def connect(
        self,
        domid: int = PRIVILEGED_DOMID,
        wakeup: Callable[[], None] | None = None,
    ) -> Connection:
        """An in-process connection (dom0's tools and backends)."""
        self._check_domid(domid, allow_dom0=True)
        with self._lock:
            conn = Connection(next(self._conn_ids), domid, wakeup=wakeup)
            self._conns[conn.conn_id] = conn
            return conn

    def disconnect(self, conn: Connection) -> None:
        """Close an in-process connection: its watches and transactions
        go with it."""
        with self._lock:
            self._conns.pop(conn.conn_id, None)

    def introduce_domain(
        self,
        domid: int,
        *,
        page: memoryview | None = None,
        notify: Callable[[], None] | None = None,
        store_gfn: int = 0,
        store_port: int = 0,
        restore: bool = False,
    ) -> Connection:
        """XS_INTRODUCE: open the domain's ring connection.

        ``page`` is the guest's ring page, ``notify`` signals the store
        event channel. The ring's indices are left alone: a restored
        guest continues where it was; server_features is set unless
        ``restore`` (domain.c introduce_domain).
        """
        self._check_domid(domid, allow_dom0=False)
        with self._lock:
            if domid in self._domains:
                raise XenstoreError("EEXIST", f"domain {domid} introduced")
            conn = Connection(
                next(self._conn_ids),
                domid,
                page=page,
                notify=notify,
                store_gfn=store_gfn,
                store_port=store_port,
            )
            if page is not None and not restore:
                xs_wire.set_u32(page, xs_wire.SERVER_FEATURES, SERVER_FEATURES)
            self._conns[conn.conn_id] = conn
            self._domains[domid] = conn
            self._fire_special(INTRODUCE_DOMAIN, domid)
            calls = self._deliver_touched()
        self._run(calls)
        return conn

    def attach_ring(
        self, domid: int, page: memoryview, notify: Callable[[], None]
    ) -> None:
        """(Re)attach the ring page and notify callback of a domain."""
        with self._lock:
            conn = self._domain_conn(domid)
            conn.page = page
            conn.notify = notify
        self.service_ring(domid)

    def release_domain(self, domid: int) -> None:
        """XS_RELEASE / domain destruction: drop the domain's connection
        and the nodes it owns with their children (xenstore.txt), strip
        the permission entries naming it from every other node, fire
        @releaseDomain."""
        with self._lock:
            conn = self._domain_conn(domid)
            del self._domains[domid]
            self._frozen.pop(domid, None)
            self._conns.pop(conn.conn_id, None)
            for path in self._owned_tops(domid):
                if path in self._tree:
                    self._remove(None, path)
            # A later domain given this domid must not inherit access to
            # what others granted this one (XSA-322).
            for path, node in list(self._tree.items()):
                acl = [e for e in node.perms[1:] if e[1] != domid]
                if len(acl) != len(node.perms) - 1:
                    self._put(
                        None,
                        path,
                        dataclasses.replace(node, perms=(node.perms[0], *acl)),
                    )
            self._fire_special(RELEASE_DOMAIN, domid)
            calls = self._deliver_touched()
        self._run(calls)

    def freeze(self, domid: int, roots: tuple[str, ...]) -> None:
        """The domain's xenstore under ``roots`` was exported: refuse a
        change there (EAGAIN, as for a transaction to retry) until
        :meth:`thaw` (the migration rolled back, or the domain goes)."""
        with self._lock:
            self._frozen[domid] = tuple(roots)

    def thaw(self, domid: int) -> None:
        with self._lock:
            self._frozen.pop(domid, None)

    def _check_frozen(
        self, paths: Iterable[str], subtree: bool = False
    ) -> None:
        """EAGAIN if a change at ``paths`` touches an exported area; with
        ``subtree`` (an rm) also if an area lies under one of them."""
        for path in paths:
            for domid, roots in self._frozen.items():
                if any(
                    _in_area(path, r) or (subtree and _in_area(r, path))
                    for r in roots
                ):
                    raise XenstoreError(
                        "EAGAIN",
                        f"{path}: dom{domid}'s xenstore was exported for "
                        "migration; a change now would be lost",
                    )

    def hold_output(self, domid: int, held: bool) -> None:
        """Hold (or release) what xenstored writes to a domain's ring:
        from the quiesce of a stop-and-copy its queued watch events are
        exported, not written into pages already harvested. Release
        with :meth:`service_ring`."""
        with self._lock:
            self._domain_conn(domid).held = held

    def is_introduced(self, domid: int) -> bool:
        with self._lock:
            return domid in self._domains

    def domain_connection(self, domid: int) -> Connection:
        with self._lock:
            return self._domain_conn(domid)

    def create_domain_home(self, domid: int) -> None:
        """What libxl__domain_make writes for a new guest: its home,
        readable by it and owned by dom0, with the directories the guest
        owns (data, drivers, feature, attr, error, control/shutdown and
        control/feature-poweroff, where its PV drivers say they act on a
        shutdown request)."""
        self._check_domid(domid, allow_dom0=False)
        ro = ((0, PRIVILEGED_DOMID), (PERM_READ, domid))
        rw = ((0, domid),)
        home = domain_path(domid)
        with self._lock:
            for path, perms in (
                (home, ro),
                (f"{home}/device", ro),
                (f"{home}/control", ro),
                (f"{home}/control/shutdown", rw),
                (f"{home}/control/feature-poweroff", rw),
                (f"{home}/data", rw),
                (f"{home}/drivers", rw),
                (f"{home}/feature", rw),
                (f"{home}/attr", rw),
                (f"{home}/error", rw),
            ):
                self._set_node(None, path, b"", perms)
            calls = self._deliver_touched()
        self._run(calls)

    # -- requests --------------------------------------------------------

    def handle(self, conn: Connection, msg: Message) -> Outcome:
        """Process one request of an in-process connection."""
        with self._lock:
            if self._conns.get(conn.conn_id) is not conn:
                raise XenstoreError("EINVAL", f"{conn!r} is closed")
            reply = self._process(conn, msg)
            for event in self._after_reply:
                self._queue_event(conn, event)
            self._after_reply = []
            events = {k: tuple(v) for k, v in self._touched.items()}
            calls = self._deliver_touched()
        self._run(calls)
        return Outcome(reply, events)

    def service_ring(self, domid: int) -> bool:
        """Serve a domain's ring: take its complete requests, answer them
        and write replies and queued watch events into the rsp ring as
        space allows (what does not fit waits). Calls the connection's
        notify and returns True when the guest must be notified."""
        with self._lock:
            conn = self._domain_conn(domid)
            need = self._serve(conn)
            calls = self._deliver_touched()
            if need and conn.notify is not None:
                calls.append(conn.notify)
        self._run(calls)
        return need

    def _serve(self, conn: Connection) -> bool:
        page = conn.page
        if page is None or conn.broken:
            return False
        req_cons = xs_wire.get_u32(page, xs_wire.REQ_CONS)
        rsp_prod = xs_wire.get_u32(page, xs_wire.RSP_PROD)
        while self._pending_replies(conn) < self.quota.outstanding:
            try:
                msg = xs_wire.get_message(page, Ring.REQ, conn.in_partial)
            except XsWireError as exc:
                # xenstored drops a connection that breaks the protocol.
                conn.broken = str(exc)
                xs_wire.set_u32(
                    page, xs_wire.ERROR, xs_wire.XENSTORE_ERROR_PROTO
                )
                LOG.error(
                    "xenstore: dom%d violated the ring protocol: %s",
                    conn.domid,
                    exc,
                )
                break
            if msg is None:
                break
            reply = self._process(conn, msg)
            conn.outbox.append((reply.encode(), False))
            for event in self._after_reply:
                conn.outbox.append((event.encode(), True))
            self._after_reply = []
        self._flush(conn)
        return (
            xs_wire.get_u32(page, xs_wire.REQ_CONS) != req_cons
            or xs_wire.get_u32(page, xs_wire.RSP_PROD) != rsp_prod
        )

    @staticmethod
    def _pending_replies(conn: Connection) -> int:
        return sum(1 for _, is_event in conn.outbox if not is_event)

    @staticmethod
    def _flush(conn: Connection) -> None:
        page = conn.page
        if page is None or conn.held:
            return
        while conn.outbox:
            data = conn.outbox[0][0]
            if len(data) <= XENSTORE_RING_SIZE and not conn.out_offset:
                # Whole or not at all: a reader never waits on half a
                # message that could have fitted.
                if xs_wire.ring_free(page, Ring.RSP) < len(data):
                    return
                xs_wire.ring_write(page, Ring.RSP, data)
            else:
                conn.out_offset += xs_wire.ring_write(
                    page, Ring.RSP, data[conn.out_offset :]
                )
                if conn.out_offset < len(data):
                    return
                conn.out_offset = 0
            conn.outbox.popleft()

    def _deliver_touched(self) -> list[Callable[[], None]]:
        """Push queued events out; the callbacks to run unlocked."""
        calls: list[Callable[[], None]] = []
        for conn_id in self._touched:
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            if conn.page is not None:
                before = xs_wire.get_u32(conn.page, xs_wire.RSP_PROD)
                self._flush(conn)
                after = xs_wire.get_u32(conn.page, xs_wire.RSP_PROD)
                if after != before and conn.notify is not None:
                    calls.append(conn.notify)
            elif conn.wakeup is not None:
                calls.append(conn.wakeup)
        self._touched = {}
        return calls

    @staticmethod
    def _run(calls: Iterable[Callable[[], None]]) -> None:
        done: list[Callable[[], None]] = []
        for call in calls:
            if call not in done:
                done.append(call)
                call()

    def _process(self, conn: Connection, msg: Message) -> Message:
        try:
            handler = self._HANDLERS.get(msg.type)
            if handler is None:
                if msg.type in (XsType.WATCH_EVENT, XsType.ERROR):
                    raise XenstoreError("EINVAL", "reply type in a request")
                raise XenstoreError("ENOSYS", f"type {msg.type}")
            tx = None
            if msg.tx_id and msg.type not in (
                XsType.WATCH,
                XsType.UNWATCH,
                XsType.TRANSACTION_START,
                XsType.RESET_WATCHES,
            ):
                tx = conn.transactions.get(msg.tx_id)
                if tx is None:
                    raise XenstoreError("ENOENT", f"transaction {msg.tx_id}")
            if self._frozen:
                self._refuse_frozen(conn, tx, msg)
            payload = handler(self, conn, tx, msg)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise XenstoreError("E2BIG", "reply too long")
            return Message(msg.type, msg.req_id, msg.tx_id, payload)
        except XenstoreError as exc:
            self._after_reply = []
            LOG.debug("xenstore: dom%d %s: %s", conn.domid, msg.type, exc)
            return xs_wire.error_reply(msg, exc.name)
        except (XsWireError, UnicodeDecodeError) as exc:
            self._after_reply = []
            LOG.debug("xenstore: dom%d bad request: %s", conn.domid, exc)
            return xs_wire.error_reply(msg, "EINVAL")

    def _refuse_frozen(
        self, conn: Connection, tx: _Transaction | None, msg: Message
    ) -> None:
        """EAGAIN for a change under an exported domain's subtrees: a
        write, mkdir, rm or set_perms outside a transaction, or the
        commit of a transaction that changes one."""
        if msg.type == XsType.TRANSACTION_END:
            if tx is not None and msg.payload[:1] == b"T":
                self._check_frozen(tx.overlay)
            return
        if tx is not None or msg.type not in (
            XsType.WRITE,
            XsType.MKDIR,
            XsType.RM,
            XsType.SET_PERMS,
        ):
            return
        name = msg.payload.split(b"\0", 1)[0].decode("ascii", "replace")
        if name.startswith("@"):
            return
        self._check_frozen(
            [self._canon(conn, name)], subtree=msg.type == XsType.RM
        )

    # -- paths and permissions ------------------------------------------

    def _canon(
        self, conn: Connection, path: str, allow_special: bool = False
    ) -> str:
        if path.startswith("@"):
            if not allow_special or not _PATH_CHARS.match(path):
                raise XenstoreError("EINVAL", f"bad special path {path!r}")
            return path
        if not path.startswith("/"):
            path = f"{conn.home}/{path}"
        if (
            len(path) > XENSTORE_ABS_PATH_MAX
            or not _PATH_CHARS.match(path)
            or "//" in path
            or (path.endswith("/") and path != "/")
        ):
            raise XenstoreError("EINVAL", f"bad path {path[:80]!r}")
        if not conn.privileged:
            # ACC_PATHLEN counts what follows /local/domain/<domid>/.
            local = _LOCAL_PREFIX.match(path)
            rel = len(path) - (local.end() if local else 0)
            if rel > self.quota.path_len:
                raise XenstoreError("EINVAL", "path length quota")
        return path

    def _perm(self, conn: Connection, perms: tuple[Perm, ...]) -> int:
        """core.c perm_for_conn()."""
        full = PERM_READ | PERM_WRITE | PERM_OWNER
        ids = (
            (conn.domid,) if conn.target is None else (conn.domid, conn.target)
        )
        if conn.privileged or perms[0][1] in ids:
            return full
        for bits, domid in perms[1:]:
            if domid in ids:
                return bits
        return perms[0][0]

    def _get(self, tx: _Transaction | None, path: str) -> _Node | None:
        if path in self._special:
            return self._special[path]
        if tx is None:
            return self._tree.get(path)
        tx.accessed.add(path)
        if path in tx.overlay:
            return tx.overlay[path]
        return self._tree.get(path)

    def _lookup(
        self, conn: Connection, tx: _Transaction | None, path: str, perm: int
    ) -> _Node:
        """core.c get_node(): the node if ``conn`` has ``perm`` on it;
        EACCES rather than ENOENT when the parents would not tell."""
        node = self._get(tx, path)
        if node is None:
            raise XenstoreError(self._errno_from_parents(conn, tx, path, perm))
        if self._perm(conn, node.perms) & perm != perm:
            raise XenstoreError("EACCES", path)
        return node

    def _errno_from_parents(
        self, conn: Connection, tx: _Transaction | None, path: str, perm: int
    ) -> str:
        anc = self._nearest_ancestor(tx, path)
        if self._perm(conn, anc[1].perms) & perm:
            return "ENOENT"
        return "EACCES"

    def _nearest_ancestor(
        self, tx: _Transaction | None, path: str
    ) -> tuple[str, _Node]:
        while path != "/":
            path = _parent(path)
            node = self._get(tx, path)
            if node is not None:
                return path, node
        raise AssertionError("the root node always exists")

    # -- tree changes ---------------------------------------------------

    def _put(
        self, tx: _Transaction | None, path: str, node: _Node | None
    ) -> None:
        if tx is not None:
            tx.overlay[path] = node
            tx.accessed.add(path)
            return
        # Every committed change gets its own generation, so that a
        # transaction started before it sees it as newer than its base.
        self._gen += 1
        old = self._tree.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
        if node is None:
            self._tree.pop(path, None)
        else:
            node = dataclasses.replace(node, gen=self._gen)
            self._tree[path] = node
            self._owned[node.owner] += 1
        # Only open transactions need to know what changed after them.
        if any(c.transactions for c in self._conns.values()):
            self._changed[path] = self._gen

    def _owned_count(self, tx: _Transaction | None, domid: int) -> int:
        count = self._owned[domid]
        if tx is not None:
            for path, node in tx.overlay.items():
                live = self._tree.get(path)
                count -= live is not None and live.owner == domid
                count += node is not None and node.owner == domid
        return count

    def _check_size(self, conn: Connection | None, node: _Node) -> None:
        if conn is not None and not conn.privileged:
            if node.size() > self.quota.node_size:
                raise XenstoreError("ENOSPC", "node size quota")

    def _create(
        self,
        conn: Connection | None,
        path: str,
        value: bytes,
        owner: int,
        tx: _Transaction | None = None,
        fire: bool = True,
    ) -> None:
        """Create ``path`` and its missing parents; parents inherit
        their parent's permissions with ``owner`` as owner (core.c
        construct_node). Checks come before any change."""
        missing = [path]
        anc = _parent(path)
        while self._get(tx, anc) is None:
            missing.append(anc)
            anc = _parent(anc)
        missing.reverse()
        unpriv = conn is not None and not conn.privileged
        if unpriv:
            if (
                self._owned_count(tx, conn.domid) + len(missing)
                > self.quota.nodes
            ):
                raise XenstoreError("ENOSPC", "node quota")
        parent = self._get(tx, anc)
        new = []
        for p in missing:
            perms = parent.perms
            if unpriv or conn is None:
                perms = ((perms[0][0], owner),) + perms[1:]
            node = _Node(value if p == path else b"", perms)
            self._check_size(conn, node)
            new.append((p, node))
            parent = node
        # Now apply, parents first.
        for p, node in new:
            pnode = self._get(tx, _parent(p))
            self._put(
                tx,
                _parent(p),
                dataclasses.replace(
                    pnode, children=pnode.children + (_basename(p),)
                ),
            )
            self._put(tx, p, node)
        if fire:
            self._fire(tx, path, Match.SUBTREE, [new[-1][1].perms])

    def _set_node(
        self,
        tx: _Transaction | None,
        path: str,
        value: bytes,
        perms: tuple[Perm, ...],
    ) -> None:
        """Privileged write of a node with explicit permissions."""
        old = self._get(tx, path)
        if old is None:
            self._create(None, path, value, perms[0][1], tx=tx, fire=False)
            old = self._get(tx, path)
        self._put(tx, path, dataclasses.replace(old, value=value, perms=perms))
        self._fire(tx, path, Match.SUBTREE, [perms, old.perms])

    def _remove(self, tx: _Transaction | None, path: str) -> None:
        """core.c rm_node(): children first, each firing its watches
        while its permissions are still visible."""
        # Reversed pre-order: every node after all of its descendants.
        order = self._subtree(tx, path)[::-1]
        parent_path = _parent(path)
        parent = self._get(tx, parent_path)
        for p in order:
            node = self._get(tx, p)
            pnode = self._get(tx, _parent(p))
            sets = [node.perms] + ([pnode.perms] if pnode else [])
            match = Match.SUBTREE if p == path else Match.EXACT
            self._fire(tx, p, match, sets)
            self._put(tx, p, None)
        name = _basename(path)
        self._put(
            tx,
            parent_path,
            dataclasses.replace(
                parent, children=tuple(c for c in parent.children if c != name)
            ),
        )

    def _subtree(self, tx: _Transaction | None, path: str) -> list[str]:
        """Pre-order paths of ``path``'s subtree (parents first)."""
        if self._get(tx, path) is None:
            return []
        # Iterative: a guest may nest nodes deeper than Python recurses.
        out = []
        stack = [path]
        while stack:
            p = stack.pop()
            out.append(p)
            children = self._get(tx, p).children
            stack.extend(_join(p, c) for c in reversed(children))
        return out

    def _owned_tops(self, domid: int) -> list[str]:
        tops = []
        for path in self._subtree(None, "/"):
            if self._tree[path].owner == domid and not any(
                _in_area(path, t) for t in tops
            ):
                tops.append(path)
        return tops

    # -- request handlers -----------------------------------------------

    @staticmethod
    def _args(msg: Message, count: int | None = None) -> list[str]:
        args = msg.strings()
        if count is not None and len(args) != count:
            raise XenstoreError(
                "EINVAL", f"{msg.type_name} takes {count} arguments"
            )
        return args

    @staticmethod
    def _domid_arg(text: str) -> int:
        if not text.isdigit() or int(text) > xs_wire.DOMID_MAX:
            raise XenstoreError("EINVAL", f"bad domid {text!r}")
        return int(text)

    def _require_priv(self, conn: Connection) -> None:
        if not conn.privileged:
            raise XenstoreError("EACCES", "privileged operation")

    def _do_read(self, conn, tx, msg) -> bytes:
        path = self._canon(conn, self._args(msg, 1)[0])
        return self._lookup(conn, tx, path, PERM_READ).value

    def _do_write(self, conn, tx, msg) -> bytes:
        raw = msg.payload
        if b"\0" not in raw:
            raise XenstoreError("EINVAL", "WRITE needs <path>|<value>")
        name, value = raw.split(b"\0", 1)
        path = self._canon(conn, name.decode("ascii"))
        node = self._get(tx, path)
        if node is None:
            self._create_checked(conn, tx, path, value)
        else:
            self._lookup(conn, tx, path, PERM_WRITE)
            new = dataclasses.replace(node, value=value)
            self._check_size(conn, new)
            self._put(tx, path, new)
            self._fire(tx, path, Match.SUBTREE, [new.perms])
        return b"OK\0"

    def _create_checked(self, conn, tx, path: str, value: bytes) -> None:
        _, anc = self._nearest_ancestor(tx, path)
        if not self._perm(conn, anc.perms) & PERM_WRITE:
            raise XenstoreError("EACCES", path)
        self._create(conn, path, value, conn.domid, tx=tx)

    def _do_mkdir(self, conn, tx, msg) -> bytes:
        path = self._canon(conn, self._args(msg, 1)[0])
        if self._get(tx, path) is None:
            self._create_checked(conn, tx, path, b"")
        else:
            self._lookup(conn, tx, path, PERM_WRITE)
        return b"OK\0"

    def _do_rm(self, conn, tx, msg) -> bytes:
        path = self._canon(conn, self._args(msg, 1)[0])
        if path == "/":
            raise XenstoreError("EINVAL", "cannot remove /")
        try:
            self._lookup(conn, tx, path, PERM_WRITE)
        except XenstoreError as exc:
            # Removing what is not there is fine if its parent is.
            if exc.name == "ENOENT" and self._get(tx, _parent(path)):
                return b"OK\0"
            raise
        self._remove(tx, path)
        return b"OK\0"

    def _do_directory(self, conn, tx, msg) -> bytes:
        path = self._canon(conn, self._args(msg, 1)[0])
        node = self._lookup(conn, tx, path, PERM_READ)
        return xs_wire.join_strings(*node.children) if node.children else b""

    def _do_directory_part(self, conn, tx, msg) -> bytes:
        name, offset = self._args(msg, 2)
        if not offset.isdigit():
            raise XenstoreError("EINVAL", f"bad offset {offset!r}")
        node = self._lookup(conn, tx, self._canon(conn, name), PERM_READ)
        gen = f"{node.gen}\0".encode()
        children = b"".join(c.encode() + b"\0" for c in node.children)
        off = int(offset)
        if off >= len(children):
            return gen + b"\0"
        maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        end = off
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - off >= maxlen:
                break
            end = nxt
        chunk = children[off:end]
        if end == len(children):
            chunk += b"\0"
        return gen + chunk

    def _do_get_perms(self, conn, tx, msg) -> bytes:
        path = self._canon(conn, self._args(msg, 1)[0], allow_special=True)
        return xs_wire.encode_perms(
            self._lookup(conn, tx, path, PERM_READ).perms
        )

    def _do_set_perms(self, conn, tx, msg) -> bytes:
        args = self._args(msg)
        if len(args) < 2:
            raise XenstoreError("EINVAL", "SET_PERMS needs perms")
        perms = xs_wire.decode_perms(args[1:])
        if not conn.privileged and len(perms) > self.quota.perms:
            raise XenstoreError("ENOSPC", "permission quota")
        path = self._canon(conn, args[0], allow_special=True)
        node = self._lookup(conn, tx, path, PERM_WRITE | PERM_OWNER)
        if not conn.privileged and perms[0][1] != node.owner:
            # Only the control domain may give a node away.
            raise XenstoreError("EPERM", "cannot change the owner")
        new = dataclasses.replace(node, perms=perms)
        if path in self._special:
            self._special[path] = new
            return b"OK\0"
        self._put(tx, path, new)
        self._fire(tx, path, Match.SUBTREE, [perms, node.perms])
        return b"OK\0"

    def _do_get_domain_path(self, conn, tx, msg) -> bytes:
        domid = self._domid_arg(self._args(msg, 1)[0])
        return f"{domain_path(domid)}\0".encode()

    def _do_is_domain_introduced(self, conn, tx, msg) -> bytes:
        self._require_priv(conn)
        domid = self._domid_arg(self._args(msg, 1)[0])
        return b"T\0" if domid in self._domains else b"F\0"

    def _do_introduce(self, conn, tx, msg) -> bytes:
        self._require_priv(conn)
        args = self._args(msg)
        if len(args) < 3:
            raise XenstoreError("EINVAL", "INTRODUCE <domid>|<gfn>|<port>|")
        domid = self._domid_arg(args[0])
        try:
            gfn, port = int(args[1]), int(args[2])
        except ValueError:
            raise XenstoreError("EINVAL", "bad gfn or port") from None
        if domid == PRIVILEGED_DOMID or domid >= DOMID_FIRST_RESERVED:
            raise XenstoreError("EINVAL", f"domid {domid}")
        if domid in self._domains:
            raise XenstoreError("EEXIST", f"domain {domid}")
        if self._ring_mapper is None:
            raise XenstoreError("ENOSYS", "no ring mapper")
        page, notify = self._ring_mapper(domid, gfn, port)
        new = Connection(
            next(self._conn_ids),
            domid,
            page=page,
            notify=notify,
            store_gfn=gfn,
            store_port=port,
        )
        xs_wire.set_u32(page, xs_wire.SERVER_FEATURES, SERVER_FEATURES)
        self._conns[new.conn_id] = new
        self._domains[domid] = new
        self._fire_special(INTRODUCE_DOMAIN, domid)
        return b"OK\0"

    def _do_release(self, conn, tx, msg) -> bytes:
        self._require_priv(conn)
        domid = self._domid_arg(self._args(msg, 1)[0])
        target = self._domains.pop(domid, None)
        if target is None:
            raise XenstoreError("ENOENT", f"domain {domid}")
        self._conns.pop(target.conn_id, None)
        for path in self._owned_tops(domid):
            if path in self._tree:
                self._remove(None, path)
        self._fire_special(RELEASE_DOMAIN, domid)
        return b"OK\0"

    def _do_resume(self, conn, tx, msg) -> bytes:
        self._require_priv(conn)
        domid = self._domid_arg(self._args(msg, 1)[0])
        if domid not in self._domains:
            raise XenstoreError("ENOENT", f"domain {domid}")
        return b"OK\0"

    def _do_set_target(self, conn, tx, msg) -> bytes:
        self._require_priv(conn)
        domid, target = (self._domid_arg(a) for a in self._args(msg, 2))
        dom = self._domains.get(domid)
        if dom is None or target not in self._domains:
            raise XenstoreError("ENOENT", f"domain {domid} or {target}")
        dom.target = target
        return b"OK\0"

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _check_domid(domid: int, allow_dom0: bool) -> None:
        if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid!r} is not a real domain id")
        if domid == PRIVILEGED_DOMID and not allow_dom0:
            raise ValueError("dom0 has no ring connection to introduce")

    def _domain_conn(self, domid: int) -> Connection:
        conn = self._domains.get(domid)
        if conn is None:
            raise XenstoreError("ENOENT", f"domain {domid} not introduced")
        return conn
