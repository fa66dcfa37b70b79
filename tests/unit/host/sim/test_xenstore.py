"""The xenstored model: permissions, watches, transactions, quotas,
migration export/import."""

import dataclasses
import struct
import threading

import pytest

from nova_xen_ncm.host.base import XenstoreNode
from nova_xen_ncm.host.base import XenstoreTransaction
from nova_xen_ncm.host.base import XenstoreWatch
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xenstore import ImportPolicy
from nova_xen_ncm.host.sim.xenstore import LocalClient
from nova_xen_ncm.host.sim.xenstore import Xenstore
from nova_xen_ncm.host.sim.xenstore import XenstoreMigrationError
from nova_xen_ncm.host.sim.xenstore.core import TX_CONFLICTED
from nova_xen_ncm.host.sim.xenstore.core import Quota
from nova_xen_ncm.host.sim.xenstore.core import is_child
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import XsType

GUEST = 5
OTHER = 6
HOME = "/local/domain/5"


def call(xs, conn, mtype, *args, tx=0, raw=None):
    payload = raw if raw is not None else xs_wire.join_strings(*args)
    return xs.handle(conn, Message(mtype, 1, tx, payload)).reply


def ok(xs, conn, mtype, *args, **kw):
    reply = call(xs, conn, mtype, *args, **kw)
    assert reply.type == mtype, reply.payload
    return reply.payload


def err(xs, conn, mtype, *args, **kw):
    reply = call(xs, conn, mtype, *args, **kw)
    assert reply.type == XsType.ERROR, reply
    return reply.payload.rstrip(b"\0").decode()


def write(xs, conn, path, value=b"", tx=0):
    if isinstance(value, str):
        value = value.encode()
    return ok(xs, conn, XsType.WRITE, raw=path.encode() + b"\0" + value, tx=tx)


def read(xs, conn, path, tx=0):
    return ok(xs, conn, XsType.READ, path, tx=tx)


@pytest.fixture
def store():
    xs = Xenstore()
    xs.create_domain_home(GUEST)
    xs.create_domain_home(OTHER)
    guest = xs.introduce_domain(GUEST)
    other = xs.introduce_domain(OTHER)
    dom0 = xs.connect()
    for conn in (guest, other, dom0):
        conn.pop_events()
    return xs, dom0, guest, other


# -- basics and permissions ---------------------------------------------


def test_relative_paths_and_domain_path(store):
    xs, dom0, guest, _ = store
    write(xs, guest, "data/x", "1")
    assert read(xs, dom0, f"{HOME}/data/x") == b"1"
    assert ok(xs, guest, XsType.GET_DOMAIN_PATH, "7") == (b"/local/domain/7\0")
    assert err(xs, guest, XsType.READ, "data//x") == "EINVAL"
    assert err(xs, guest, XsType.READ, "data/") == "EINVAL"
    assert err(xs, guest, XsType.READ, "data/a b") == "EINVAL"
    assert err(xs, guest, XsType.READ, "@introduceDomain") == "EINVAL"
    # ACC_PATHLEN: 2048 bytes below the domain's home.
    long = "data/" + "x" * 2043
    assert err(xs, guest, XsType.READ, long) == "ENOENT"
    assert err(xs, guest, XsType.READ, long + "y") == "EINVAL"
    assert err(xs, guest, XsType.READ, "/tool/" + "x" * 2043) == "EINVAL"


def test_owner_acl_and_dom0_privilege(store):
    xs, dom0, guest, other = store
    write(xs, guest, "data/secret", "s")
    # The guest owns what it created; nobody else (but dom0) can read it.
    assert ok(xs, guest, XsType.GET_PERMS, "data/secret") == b"n5\0"
    assert err(xs, other, XsType.READ, f"{HOME}/data/secret") == "EACCES"
    assert read(xs, dom0, f"{HOME}/data/secret") == b"s"
    # The owner grants dom6 read through the ACL.
    ok(xs, guest, XsType.SET_PERMS, "data/secret", "n5", "r6")
    assert read(xs, other, f"{HOME}/data/secret") == b"s"
    assert (
        err(xs, other, XsType.WRITE, raw=f"{HOME}/data/secret\0x".encode())
        == "EACCES"
    )
    # Only the owner may set permissions, and not give the node away.
    assert (
        err(xs, other, XsType.SET_PERMS, f"{HOME}/data/secret", "b6")
        == "EACCES"
    )
    assert err(xs, guest, XsType.SET_PERMS, "data/secret", "n6") == "EPERM"
    ok(xs, dom0, XsType.SET_PERMS, f"{HOME}/data/secret", "n6")
    assert read(xs, other, f"{HOME}/data/secret") == b"s"


def test_children_inherit_perms_and_creator_owns(store):
    xs, dom0, guest, other = store
    ok(xs, guest, XsType.SET_PERMS, "data", "n5", "b6")
    write(xs, other, f"{HOME}/data/from6/leaf", "v")
    # Both created nodes: the parent's ACL, owner the unprivileged creator.
    for path in ("data/from6", "data/from6/leaf"):
        assert ok(xs, dom0, XsType.GET_PERMS, f"{HOME}/{path}") == (
            b"n6\0b6\0"
        )
    # The new owner's node is closed to the guest that owns the parent.
    assert err(xs, guest, XsType.READ, "data/from6") == "EACCES"
    # dom0 creating keeps the parent's owner.
    write(xs, dom0, f"{HOME}/data/by0", "v")
    assert ok(xs, guest, XsType.GET_PERMS, "data/by0") == b"n5\0b6\0"


def test_enoent_only_when_the_parent_would_tell(store):
    xs, dom0, guest, other = store
    assert err(xs, guest, XsType.READ, "data/missing") == "ENOENT"
    # dom6 cannot read dom5's data dir, so it learns nothing.
    assert err(xs, other, XsType.READ, f"{HOME}/data/missing") == "EACCES"
    assert (
        err(xs, other, XsType.WRITE, raw=f"{HOME}/data/new\0x".encode())
        == "EACCES"
    )
    # The guest's home is dom0's; it may not create next to data/.
    assert err(xs, guest, XsType.WRITE, raw=b"newdir\0x") == "EACCES"
    assert err(xs, guest, XsType.MKDIR, "/local/domain/0/x") == "EACCES"


def test_rm_rules(store):
    xs, dom0, guest, _ = store
    write(xs, guest, "data/a/b/c", "1")
    ok(xs, guest, XsType.RM, "data/a/missing")
    assert err(xs, guest, XsType.RM, "data/nope/missing") == "ENOENT"
    ok(xs, guest, XsType.RM, "data/a")
    assert err(xs, guest, XsType.READ, "data/a/b") == "ENOENT"
    assert b"a\0" not in ok(xs, guest, XsType.DIRECTORY, "data")
    assert err(xs, dom0, XsType.RM, "/") == "EINVAL"


def test_directory_part_pages_children(store):
    xs, dom0, guest, _ = store
    names = [f"child-with-a-long-name-{i:04d}" for i in range(200)]
    for name in names:
        ok(xs, dom0, XsType.MKDIR, f"/tool/big/{name}")
    assert err(xs, dom0, XsType.DIRECTORY, "/tool/big") == "E2BIG"
    got, offset = [], 0
    gens = set()
    while True:
        payload = ok(xs, dom0, XsType.DIRECTORY_PART, "/tool/big", str(offset))
        gen, rest = payload.split(b"\0", 1)
        gens.add(gen)
        if rest == b"\0":
            break
        end = rest.endswith(b"\0\0")
        chunk = rest[:-1] if end else rest
        got += chunk.decode().split("\0")[:-1]
        offset += len(chunk)
        if end:
            break
    assert got == names
    assert len(gens) == 1


# -- watches -------------------------------------------------------------


def test_watch_fires_once_on_registration_then_on_changes(store):
    xs, dom0, guest, _ = store
    out = xs.handle(guest, Message(XsType.WATCH, 1, 0, b"data\0tok\0"))
    assert out.reply.payload == b"OK\0"
    assert out.events == {guest.conn_id: (xs_wire.watch_event("data", "tok"),)}
    assert guest.pop_events() == [("data", "tok")]
    write(xs, dom0, f"{HOME}/data", "x")
    write(xs, dom0, f"{HOME}/data/a/b", "y")
    write(xs, dom0, f"{HOME}/datax", "z")
    # Relative watch: relative event paths; datax is not below data.
    assert guest.pop_events() == [("data", "tok"), ("data/a/b", "tok")]
    assert err(xs, guest, XsType.WATCH, "data", "tok") == "EEXIST"
    ok(xs, guest, XsType.UNWATCH, "data", "tok")
    write(xs, dom0, f"{HOME}/data", "x")
    assert guest.pop_events() == []
    assert err(xs, guest, XsType.UNWATCH, "data", "tok") == "ENOENT"


def test_watch_depth(store):
    xs, dom0, _, _ = store
    ok(xs, dom0, XsType.WATCH, "/tool/w", "d0", "0")
    ok(xs, dom0, XsType.WATCH, "/tool/w", "d1", "1")
    dom0.pop_events()
    for path in ("/tool/w", "/tool/w/a", "/tool/w/a/b"):
        write(xs, dom0, path, "v")
    assert dom0.pop_events() == [
        ("/tool/w", "d0"),
        ("/tool/w", "d1"),
        ("/tool/w/a", "d1"),
    ]
    assert is_child("/a/b", "/", 2) and not is_child("/a/b", "/", 1)
    assert not is_child("/ab", "/a") and is_child("/a", "/a", 0)
    assert err(xs, dom0, XsType.WATCH, "/tool/w", "bad", "-1") == "EINVAL"


def test_rm_fires_for_every_removed_node(store):
    xs, dom0, guest, _ = store
    write(xs, guest, "data/a/b/c", "1")
    ok(xs, dom0, XsType.WATCH, f"{HOME}/data/a/b/c", "leaf")
    ok(xs, dom0, XsType.WATCH, f"{HOME}/data", "top")
    ok(xs, dom0, XsType.WATCH, f"{HOME}/data/a/b/c/d", "below")
    dom0.pop_events()
    ok(xs, guest, XsType.RM, "data/a")
    events = dom0.pop_events()
    assert (f"{HOME}/data/a/b/c", "leaf") in events
    # The removal root reaches watches on its ancestors.
    assert (f"{HOME}/data/a", "top") in events
    # Children fire exactly (only watches on them), the root by subtree.
    assert (f"{HOME}/data/a/b/c", "top") not in events
    assert all(token != "below" for _, token in events)


def test_events_are_filtered_by_permission(store):
    xs, dom0, guest, other = store
    ok(xs, other, XsType.WATCH, f"{HOME}/data", "spy")
    assert other.pop_events() == [(f"{HOME}/data", "spy")]
    write(xs, guest, "data/private", "1")
    assert other.pop_events() == []
    ok(xs, guest, XsType.SET_PERMS, "data/private", "n5", "r6")
    # A permission change that makes it readable is seen, then writes.
    assert other.pop_events() == [(f"{HOME}/data/private", "spy")]
    write(xs, guest, "data/private", "2")
    assert other.pop_events() == [(f"{HOME}/data/private", "spy")]


def test_special_watches(store):
    xs, dom0, guest, other = store
    ok(xs, dom0, XsType.WATCH, "@introduceDomain", "intro")
    ok(xs, dom0, XsType.WATCH, "@releaseDomain", "rel1", "1")
    ok(xs, dom0, XsType.WATCH, "@releaseDomain/7", "rel7")
    ok(xs, guest, XsType.WATCH, "@releaseDomain", "guest")
    dom0.pop_events()
    guest.pop_events()
    xs.create_domain_home(7)
    xs.introduce_domain(7)
    xs.release_domain(7)
    assert dom0.pop_events() == [
        ("@introduceDomain", "intro"),
        ("@releaseDomain/7", "rel1"),
        ("@releaseDomain/7", "rel7"),
    ]
    # Unprivileged: only once the special node's perms allow it.
    assert guest.pop_events() == []
    ok(xs, dom0, XsType.SET_PERMS, "@releaseDomain", "n0", "r5")
    xs.introduce_domain(8)
    xs.release_domain(8)
    assert guest.pop_events() == [("@releaseDomain", "guest")]


def test_release_removes_owned_nodes(store):
    xs, dom0, guest, _ = store
    write(xs, guest, "data/x", "1")
    xs.release_domain(GUEST)
    assert err(xs, dom0, XsType.READ, f"{HOME}/data") == "ENOENT"
    # The home itself is dom0's and stays for the toolstack to remove.
    assert read(xs, dom0, HOME) == b""
    assert not xs.is_introduced(GUEST)


def test_release_strips_permissions_naming_the_domain(store):
    xs, dom0, guest, other = store
    write(xs, guest, "data/shared", "1")
    ok(xs, guest, XsType.SET_PERMS, f"{HOME}/data/shared", "n5", "r6", "r0")
    ok(xs, dom0, XsType.SET_PERMS, "/local/domain/6", "n6", "b5")
    xs.release_domain(GUEST)
    # What domain 5 was granted is not inherited by the next domain 5.
    perms = ok(xs, dom0, XsType.GET_PERMS, "/local/domain/6")
    assert xs_wire.split_strings(perms) == ["n6"]


# -- transactions --------------------------------------------------------


def test_transaction_sees_its_own_writes_and_commits(store):
    xs, dom0, guest, _ = store
    ok(xs, dom0, XsType.WATCH, f"{HOME}/data", "w")
    dom0.pop_events()
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    write(xs, guest, "data/t", "in-tx", tx=tx)
    assert read(xs, guest, "data/t", tx=tx) == b"in-tx"
    assert err(xs, guest, XsType.READ, "data/t") == "ENOENT"
    assert dom0.pop_events() == []
    ok(xs, guest, XsType.TRANSACTION_END, "T", tx=tx)
    assert read(xs, guest, "data/t") == b"in-tx"
    assert dom0.pop_events() == [(f"{HOME}/data/t", "w")]
    assert err(xs, guest, XsType.READ, "data/t", tx=tx) == "ENOENT"


def test_conflicting_commit_gets_eagain(store):
    xs, dom0, guest, _ = store
    write(xs, guest, "data/n", "0")
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    assert read(xs, guest, "data/n", tx=tx) == b"0"
    write(xs, guest, "data/n2", "x", tx=tx)
    write(xs, dom0, f"{HOME}/data/n", "1")
    assert err(xs, guest, XsType.TRANSACTION_END, "T", tx=tx) == "EAGAIN"
    assert err(xs, guest, XsType.READ, "data/n2") == "ENOENT"
    # A transaction touching nothing that changed commits.
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    write(xs, guest, "data/m", "m", tx=tx)
    write(xs, dom0, "/tool/unrelated", "u")
    ok(xs, guest, XsType.TRANSACTION_END, "T", tx=tx)
    assert read(xs, guest, "data/m") == b"m"


def test_transaction_abort_and_errors(store):
    xs, _, guest, _ = store
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    write(xs, guest, "data/gone", "x", tx=tx)
    assert err(xs, guest, XsType.TRANSACTION_START, "", tx=tx) == "EBUSY"
    assert err(xs, guest, XsType.TRANSACTION_END, "X", tx=tx) == "EINVAL"
    ok(xs, guest, XsType.TRANSACTION_END, "F", tx=tx)
    assert err(xs, guest, XsType.READ, "data/gone") == "ENOENT"
    assert err(xs, guest, XsType.TRANSACTION_END, "T", tx=tx) == "ENOENT"
    assert err(xs, guest, XsType.READ, "data", tx=999) == "ENOENT"


# -- quotas --------------------------------------------------------------


def test_quotas():
    xs = Xenstore(
        Quota(nodes=12, node_size=100, watches=2, transactions=1, perms=2)
    )
    xs.create_domain_home(GUEST)
    guest = xs.introduce_domain(GUEST)
    dom0 = xs.connect()
    assert err(xs, guest, XsType.WRITE, raw=b"data/big\0" + b"x" * 200) == (
        "ENOSPC"
    )
    write(xs, dom0, f"{HOME}/data/big", b"x" * 200)  # dom0 has no quota
    ok(xs, guest, XsType.WATCH, "data", "a")
    ok(xs, guest, XsType.WATCH, "data", "b")
    assert err(xs, guest, XsType.WATCH, "data", "c") == "ENOSPC"
    tx = ok(xs, guest, XsType.TRANSACTION_START, "")
    assert tx == b"1\0"
    assert err(xs, guest, XsType.TRANSACTION_START, "") == "ENOSPC"
    assert (
        err(xs, guest, XsType.SET_PERMS, "data", "n5", "r0", "r6") == "ENOSPC"
    )
    # The home has 7 guest-owned nodes (control/feature-poweroff among
    # them) plus data/big (created by dom0 under data, which the guest
    # owns): 8; 4 more fit, the 5th not.
    for i in range(4):
        write(xs, guest, f"data/n{i}", "v")
    assert err(xs, guest, XsType.WRITE, raw=b"data/n4\0v") == "ENOSPC"


def test_threads_serialise(store):
    xs, dom0, guest, _ = store

    def worker(n):
        conn = xs.connect()
        for i in range(50):
            write(xs, conn, f"/tool/t{n}/k{i}", str(i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(4):
        names = ok(xs, dom0, XsType.DIRECTORY, f"/tool/t{n}").split(b"\0")
        assert len(names) - 1 == 50


# -- migration -----------------------------------------------------------


def _guest_with_state(xs, guest, dom0):
    write(xs, guest, "data/a", "1")
    write(xs, guest, "data/b/c", b"\x00bin")
    ok(xs, guest, XsType.SET_PERMS, "data/a", "n5", "r0")
    ok(xs, guest, XsType.WATCH, "data", "rel")
    ok(xs, guest, XsType.WATCH, f"{HOME}/control", "abs", "1")
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    write(xs, guest, "data/pending", "p", tx=tx)
    ok(xs, guest, XsType.RM, "data/b", tx=tx)
    guest.pop_events()
    return tx


def test_export_import_round_trip(store):
    xs, dom0, guest, _ = store
    tx = _guest_with_state(xs, guest, dom0)
    state = xs.export_domain(GUEST)
    assert {w.token for w in state.watches} == {"rel", "abs"}
    (xtx,) = state.transactions
    assert xtx.tx_id == tx
    assert (f"{HOME}/data/b", None) in xtx.writes
    assert any(
        isinstance(w, XenstoreNode) and w.path == f"{HOME}/data/pending"
        for w in xtx.writes
    )
    dest = Xenstore()
    d0 = dest.connect()
    ok(dest, d0, XsType.WATCH, f"{HOME}/data", "backend")
    d0.pop_events()
    conn = dest.import_domain(GUEST, state)
    again = dest.export_domain(GUEST)
    assert again.nodes == state.nodes
    assert again.watches == state.watches
    assert [t.tx_id for t in again.transactions] == [tx]
    assert set(again.transactions[0].writes) == set(xtx.writes)
    # Restored watches fire once; dom0's watch saw the nodes arrive.
    assert sorted(conn.pop_events()) == [
        (f"{HOME}/control", "abs"),
        ("data", "rel"),
    ]
    assert (f"{HOME}/data/a", "backend") in d0.pop_events()
    # The transaction still sees its writes and commits.
    assert read(dest, conn, "data/pending", tx=tx) == b"p"
    ok(dest, conn, XsType.TRANSACTION_END, "T", tx=tx)
    assert sorted(conn.pop_events()) == [
        ("data/b", "rel"),
        ("data/pending", "rel"),
    ]
    assert read(dest, conn, "data/pending") == b"p"
    assert err(dest, conn, XsType.READ, "data/b/c") == "ENOENT"
    assert ok(dest, conn, XsType.GET_PERMS, "data/a") == b"n5\0r0\0"
    write(dest, d0, f"{HOME}/data/a", "2")
    assert conn.pop_events() == [("data/a", "rel")]
    # New transactions do not reuse the restored id.
    assert (
        ok(dest, conn, XsType.TRANSACTION_START, "") == f"{tx + 1}\0".encode()
    )


def test_queued_watch_events_travel():
    """Events xenstored queued for a guest whose ring is full are in the
    export and reach the ring on the destination, in order."""
    xs = Xenstore()
    xs.create_domain_home(9)
    page = memoryview(bytearray(4096))
    xs_wire.init_interface(page)
    xs.introduce_domain(9, page=page, notify=lambda: None)
    # The guest reads nothing: the ring fills, the rest waits in xenstored.
    for i in range(40):
        xs._queue_event(
            xs.domain_connection(9),
            xs_wire.watch_event(f"/local/domain/9/n{i:02d}", "tok"),
        )
    xs.service_ring(9)
    state = xs.export_domain(9)
    in_ring = xs_wire.ring_read(page, xs_wire.Ring.RSP, 4096)
    assert state.pending_output
    stream = in_ring + state.pending_output
    events = []
    while stream:
        end = xs_wire.HEADER_SIZE + struct.unpack_from("<I", stream, 12)[0]
        events.append(xs_wire.Message.decode(stream[:end]).strings()[0])
        stream = stream[end:]
    assert events == [f"/local/domain/9/n{i:02d}" for i in range(40)]
    dest = Xenstore()
    dest.create_domain_home(9)
    page2 = memoryview(bytearray(4096))
    xs_wire.init_interface(page2)
    dest.import_domain(
        9, state, page=page2, notify=lambda: None, fire_watches=False
    )
    assert len(state.pending_output) < 1024  # fits the empty ring
    assert xs_wire.ring_read(page2, xs_wire.Ring.RSP, 4096) == bytes(
        state.pending_output
    )


def test_imported_transaction_eagain_when_the_area_changed(store):
    xs, dom0, guest, _ = store
    tx = _guest_with_state(xs, guest, dom0)
    state = xs.export_domain(GUEST)
    dest = Xenstore()
    conn = dest.import_domain(GUEST, state)
    write(dest, dest.connect(), f"{HOME}/data/a", "changed")
    assert err(dest, conn, XsType.TRANSACTION_END, "T", tx=tx) == "EAGAIN"


def test_already_conflicting_transaction_travels_as_eagain(store):
    xs, dom0, guest, _ = store
    tx = _guest_with_state(xs, guest, dom0)
    assert read(xs, guest, "data/a", tx=tx) == b"1"
    write(xs, dom0, f"{HOME}/data/a", "2")
    state = xs.export_domain(GUEST)
    assert state.transactions[0].base_generation == TX_CONFLICTED
    dest = Xenstore()
    conn = dest.import_domain(GUEST, state)
    assert err(dest, conn, XsType.TRANSACTION_END, "T", tx=tx) == "EAGAIN"


def test_export_with_backend_area(store):
    xs, dom0, guest, _ = store
    back = f"/local/domain/0/backend/vif/{GUEST}/0"
    write(xs, dom0, f"{back}/state", "4")
    ok(xs, dom0, XsType.SET_PERMS, back, "n0", "r5")
    ok(xs, dom0, XsType.SET_PERMS, f"{back}/state", "n0", "r5")
    state = xs.export_domain(GUEST, areas=[back])
    assert state.nodes[-1].path == f"{back}/state"
    dest = Xenstore()
    d0 = dest.connect()
    for p in (
        "/local/domain/0/backend/vif",
        f"/local/domain/0/backend/vif/{GUEST}",
    ):
        ok(dest, d0, XsType.MKDIR, p)
    with pytest.raises(XenstoreMigrationError, match="outside"):
        dest.import_domain(GUEST, state)
    conn = dest.import_domain(GUEST, state, ImportPolicy(areas=(back,)))
    assert read(dest, conn, f"{back}/state") == b"4"


def _refused(state, match, policy=None):
    dest = Xenstore()
    d0 = dest.connect()
    write(dest, d0, "/tool/marker", "before")
    with pytest.raises(XenstoreMigrationError, match=match):
        dest.import_domain(GUEST, state, policy)
    # Nothing was applied.
    assert not dest.is_introduced(GUEST)
    assert err(dest, d0, XsType.READ, HOME) == "ENOENT"
    assert read(dest, d0, "/tool/marker") == b"before"


def test_import_refuses_forged_paths_and_escalation(store):
    xs, dom0, guest, _ = store
    _guest_with_state(xs, guest, dom0)
    state = xs.export_domain(GUEST)

    def with_node(node):
        return dataclasses.replace(state, nodes=state.nodes + (node,))

    _refused(
        with_node(XenstoreNode("/local/domain/0/evil", b"x", (("n", 5),))),
        "/local/domain/0/evil",
    )
    _refused(
        with_node(XenstoreNode("/local/domain/55/x", b"x", (("n", 5),))),
        "outside",
    )
    _refused(
        with_node(XenstoreNode(f"{HOME}/data/x", b"", (("n", 5), ("b", 6)))),
        "b6 grants more",
    )
    _refused(
        with_node(XenstoreNode(f"{HOME}/data/x", b"", (("n", 6),))),
        "owner dom6",
    )
    _refused(
        with_node(XenstoreNode(f"{HOME}/data/x", b"", (("r", 5),))),
        "default access",
    )
    _refused(
        with_node(XenstoreNode(f"{HOME}/data/x", b"v" * 3000, (("n", 5),))),
        "node size quota",
    )
    _refused(
        with_node(XenstoreNode(f"{HOME}/nope/x", b"", (("n", 5),))),
        "parent",
    )
    _refused(
        dataclasses.replace(
            state,
            transactions=(
                XenstoreTransaction(
                    3, 1, (XenstoreNode("/tool/x", b"", (("n", 5),)),)
                ),
            ),
        ),
        "/tool/x",
    )
    _refused(
        dataclasses.replace(
            state, watches=state.watches + (XenstoreWatch("a//b", "t"),)
        ),
        "a//b",
    )
    # What the caller allows goes through.
    granted = with_node(
        XenstoreNode(f"{HOME}/data/x", b"", (("n", 5), ("r", 6)))
    )
    dest = Xenstore()
    dest.import_domain(GUEST, granted, ImportPolicy(max_access={6: "r"}))
    assert dest.is_introduced(GUEST)


def test_export_refuses_undelivered_reply():
    xs = Xenstore()
    xs.create_domain_home(GUEST)
    page = memoryview(bytearray(4096))
    xs.introduce_domain(GUEST, page=page, notify=lambda: None)
    # Fill the guest's rsp ring so that a reply must wait.
    xs_wire.set_u32(page, xs_wire.RSP_PROD, 1020)
    req = Message(XsType.READ, 1, 0, b"data\0")
    assert xs_wire.put_message(page, xs_wire.Ring.REQ, req)
    xs.service_ring(GUEST)
    with pytest.raises(XenstoreMigrationError, match="not yet delivered"):
        xs.export_domain(GUEST)
    assert xs.export_domain(GUEST, strict=False).nodes
    # Once the guest reads, the reply goes out and export succeeds.
    xs_wire.set_u32(page, xs_wire.RSP_CONS, 1020)
    assert xs.service_ring(GUEST)
    assert xs.export_domain(GUEST).nodes


def test_local_client(store):
    xs, _, _, _ = store
    woken = []
    backend = LocalClient(xs, wakeup=lambda: woken.append(1))
    backend.write(f"{HOME}/data/v", "1")
    assert backend.read(f"{HOME}/data/v") == b"1"
    backend.watch(f"{HOME}/data", "be", depth=1)
    assert backend.events() == [(f"{HOME}/data", "be")]
    assert woken
    tx = backend.transaction_start()
    backend.write(f"{HOME}/data/w", "2", tx)
    assert backend.transaction_end(tx)
    assert backend.events() == [(f"{HOME}/data/w", "be")]
    assert backend.directory(f"{HOME}/data") == ["v", "w"]
    backend.set_perms(f"{HOME}/data/w", [("n", 0), ("r", GUEST)])
    assert backend.get_perms(f"{HOME}/data/w") == [("n", 0), ("r", GUEST)]
    backend.rm(f"{HOME}/data/w")
    with pytest.raises(xs_wire.XenstoreError) as exc:
        backend.read(f"{HOME}/data/w")
    assert exc.value.name == "ENOENT"
    backend.close()
    with pytest.raises(xs_wire.XenstoreError):
        backend.read(f"{HOME}/data/v")


def test_domain_management_over_the_wire(store):
    xs, dom0, guest, other = store
    pages = {}

    def mapper(domid, gfn, port):
        pages[domid] = (gfn, port)
        return memoryview(bytearray(4096)), lambda: None

    xs2 = Xenstore(ring_mapper=mapper)
    d0 = xs2.connect()
    ok(xs2, d0, XsType.WATCH, "@introduceDomain", "i")
    assert ok(xs2, d0, XsType.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    ok(xs2, d0, XsType.INTRODUCE, "9", "4660", "3")
    assert pages == {9: (4660, 3)}
    assert ok(xs2, d0, XsType.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
    assert err(xs2, d0, XsType.INTRODUCE, "9", "1", "1") == "EEXIST"
    assert d0.pop_events() == [("@introduceDomain", "i")] * 2
    page = xs2.domain_connection(9).page
    assert xs_wire.get_u32(page, xs_wire.SERVER_FEATURES) & (
        xs_wire.XENSTORE_SERVER_FEATURE_WATCHDEPTH
    )
    ok(xs2, d0, XsType.RELEASE, "9")
    assert err(xs2, d0, XsType.RELEASE, "9") == "ENOENT"
    # Unprivileged domains may not manage domains; no mapper, no ring.
    assert err(xs, guest, XsType.IS_DOMAIN_INTRODUCED, "6") == "EACCES"
    assert err(xs, dom0, XsType.INTRODUCE, "9", "1", "1") == "ENOSYS"
    assert err(xs, guest, XsType.WATCH_EVENT, "x", "y") == "EINVAL"
    assert err(xs, guest, XsType.CONTROL, "x") == "ENOSYS"


def test_set_target_grants_the_target_domains_access(store):
    xs, dom0, guest, other = store
    write(xs, guest, "data/x", "1")
    assert err(xs, other, XsType.READ, f"{HOME}/data/x") == "EACCES"
    ok(xs, dom0, XsType.SET_TARGET, str(OTHER), str(GUEST))
    assert read(xs, other, f"{HOME}/data/x") == b"1"


def test_reset_watches_drops_watches_and_transactions(store):
    xs, dom0, guest, _ = store
    ok(xs, guest, XsType.WATCH, "data", "t")
    tx = int(ok(xs, guest, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    ok(xs, guest, XsType.RESET_WATCHES, "")
    guest.pop_events()
    write(xs, dom0, f"{HOME}/data/x", "1")
    assert guest.pop_events() == []
    assert err(xs, guest, XsType.TRANSACTION_END, "T", tx=tx) == "ENOENT"


def test_protocol_violation_breaks_the_connection():
    xs = Xenstore()
    xs.create_domain_home(GUEST)
    page = memoryview(bytearray(4096))
    xs.introduce_domain(GUEST, page=page, notify=lambda: None)
    xs_wire.ring_write(
        page, xs_wire.Ring.REQ, struct.pack("<4I", 2, 1, 0, 5000)
    )
    assert not xs.service_ring(GUEST)
    assert xs_wire.get_u32(page, xs_wire.ERROR) == (
        xs_wire.XENSTORE_ERROR_PROTO
    )
    assert xs.domain_connection(GUEST).broken
    # Nothing more is served on it.
    req = Message(XsType.READ, 2, 0, b"data\0")
    xs_wire.set_u32(page, xs_wire.REQ_CONS, 16)
    assert xs_wire.put_message(page, xs_wire.Ring.REQ, req)
    assert not xs.service_ring(GUEST)
    assert xs_wire.ring_used(page, xs_wire.Ring.RSP) == 0


def test_deep_trees_are_handled(store):
    xs, dom0, guest, _ = store
    # Deeper than Python's default recursion limit.
    deep = "data/" + "/".join(["d"] * 1400)
    write(xs, dom0, f"{HOME}/{deep}", "bottom")
    state = xs.export_domain(GUEST)
    paths = [n.path for n in state.nodes]
    assert paths.index(f"{HOME}/{deep}") == paths.index(f"{HOME}/data") + 1400
    ok(xs, guest, XsType.RM, "data/d")
    assert err(xs, dom0, XsType.READ, f"{HOME}/{deep}") == "ENOENT"


def test_held_output_is_exported_not_written_then_released():
    """From the quiesce of a stop-and-copy, xenstored writes nothing to
    the guest's ring (a page that may be harvested already): what it
    queues is in the export, and reaches the ring when released."""
    xs = Xenstore()
    xs.create_domain_home(9)
    page = memoryview(bytearray(4096))
    xs_wire.init_interface(page)
    notified = []
    xs.introduce_domain(9, page=page, notify=lambda: notified.append(1))
    xs.hold_output(9, True)
    xs._queue_event(
        xs.domain_connection(9),
        xs_wire.watch_event("/local/domain/9/held", "tok"),
    )
    xs.service_ring(9)
    assert xs_wire.get_u32(page, xs_wire.RSP_PROD) == 0
    assert not notified
    event = xs_wire.watch_event("/local/domain/9/held", "tok").encode()
    assert xs.export_domain(9).pending_output == event
    xs.hold_output(9, False)
    xs.service_ring(9)
    assert xs_wire.ring_read(page, xs_wire.Ring.RSP, 4096) == event
    assert notified


def test_a_change_after_a_migrations_export_is_refused_not_lost(store):
    """After the export a migration carries, a change to what it took
    (the guest's home, its backend areas) would be lost when the copy
    elsewhere is committed: xenstored refuses it with EAGAIN, outside a
    transaction or at a transaction's commit, until thawed (rollback or
    the domain going). Elsewhere writes go on; reads too."""
    xs, dom0, guest, other = store
    back = f"/local/domain/0/backend/vbd/{GUEST}/51712"
    write(xs, dom0, f"{back}/state", "4")
    write(xs, dom0, f"{HOME}/data/x", "1")
    xs.export_domain(GUEST, areas=[back], freeze=True)
    # A backend writing during the downtime, the toolstack, a relative
    # path of the guest's own.
    assert err(xs, dom0, XsType.WRITE, raw=f"{back}/state\x005".encode()) == (
        "EAGAIN"
    )
    assert err(xs, dom0, XsType.MKDIR, f"{HOME}/new") == "EAGAIN"
    assert err(xs, dom0, XsType.RM, f"{HOME}/data/x") == "EAGAIN"
    assert err(xs, dom0, XsType.SET_PERMS, f"{HOME}/data", "n0") == "EAGAIN"
    assert err(xs, guest, XsType.WRITE, raw=b"data/x\x002") == "EAGAIN"
    tx = int(ok(xs, dom0, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    write(xs, dom0, f"{HOME}/data/y", "1", tx=tx)
    assert err(xs, dom0, XsType.TRANSACTION_END, "T", tx=tx) == "EAGAIN"
    # Removing a parent would remove what was exported with it.
    assert err(xs, dom0, XsType.RM, "/local/domain/0/backend/vbd") == (
        "EAGAIN"
    )
    tx = int(ok(xs, dom0, XsType.TRANSACTION_START, "").rstrip(b"\0"))
    ok(xs, dom0, XsType.RM, f"/local/domain/0/backend/vbd/{GUEST}", tx=tx)
    assert err(xs, dom0, XsType.TRANSACTION_END, "T", tx=tx) == "EAGAIN"
    # Nothing changed; other domains' nodes and reads are untouched.
    assert read(xs, dom0, f"{back}/state") == b"4"
    assert read(xs, dom0, f"{HOME}/data/x") == b"1"
    write(xs, other, "data/z", "1")
    # A migration export without freeze (observing) does not freeze.
    xs.thaw(GUEST)
    xs.export_domain(GUEST, areas=[back])
    write(xs, dom0, f"{back}/state", "5")
    assert read(xs, dom0, f"{back}/state") == b"5"
