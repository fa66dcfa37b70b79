"""The guest's xenbus client against the daemon, over a ring in memory."""

import multiprocessing
import struct
import threading
from multiprocessing import shared_memory

import pytest

from nova_xen_ncm.host.sim import xenbus
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xenbus import STATE_SIZE
from nova_xen_ncm.host.sim.xenbus import XenbusClient
from nova_xen_ncm.host.sim.xenbus import XenbusError
from nova_xen_ncm.host.sim.xenstore import Xenstore
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsType

DOMID = 3
HOME = "/local/domain/3"
RAM_SIZE = 4096 + STATE_SIZE


class Stopped(Exception):
    """The guest process stops here (it is paused and never resumed)."""


def _guest_ram():
    ram = bytearray(RAM_SIZE)
    view = memoryview(ram)
    return ram, view[:4096], view[4096:]


def _host(page):
    xs = Xenstore()
    xs.create_domain_home(DOMID)
    xs_wire.init_interface(page)
    xs.introduce_domain(DOMID, page=page, notify=lambda: None)
    return xs


def _client(xs, page, state, **kw):
    def serve():
        xs.service_ring(DOMID)

    return XenbusClient(page, state, notify=serve, wait=serve, timeout=5, **kw)


@pytest.fixture
def guest():
    ram, page, state = _guest_ram()
    xs = _host(page)
    return xs, _client(xs, page, state), ram


def test_state_layout():
    assert xenbus.RSP_BUF == 4240
    assert xenbus.WATCH_TABLE == 8352
    assert xenbus.EVENT_QUEUE == 12448
    assert xenbus.EVENT_QUEUE + xenbus.EVENT_QUEUE_SIZE == STATE_SIZE


def test_operations_over_the_ring(guest):
    xs, client, ram = guest
    assert bytes(ram[4096:4100]) == b"XBUS"
    client.write("data/a", "1")
    client.mkdir("data/dir")
    assert client.read("data/a") == b"1"
    assert client.directory("data") == ["a", "dir"]
    assert client.get_perms("data/a") == [("n", DOMID)]
    client.set_perms("data/a", [("n", DOMID), ("r", 0)])
    assert client.get_perms("data/a") == [("n", DOMID), ("r", 0)]
    assert client.get_domain_path(DOMID) == HOME
    client.rm("data/dir")
    with pytest.raises(XenstoreError) as exc:
        client.read("data/dir")
    assert exc.value.name == "ENOENT"
    with pytest.raises(XenstoreError) as exc:
        client.write("/local/domain/0/x", "no")
    assert exc.value.name == "EACCES"
    # Each of the 11 requests used a new req_id (from 1), kept in RAM.
    assert struct.unpack_from("<I", ram, 4096 + 8)[0] == 12


def test_values_larger_than_the_ring(guest):
    xs, client, _ = guest
    value = bytes(range(256)) * 7 + b"end"
    client.write("data/big", value)
    assert client.read("data/big") == value
    dom0 = xs.connect()
    reply = xs.handle(
        dom0, Message(XsType.READ, 1, 0, f"{HOME}/data/big\0".encode())
    )
    assert reply.reply.payload == value


def test_watches_dispatch_by_token(guest):
    xs, client, _ = guest
    seen = []
    client.set_handler("a", lambda path, token: seen.append((path, token)))
    client.set_handler("b", lambda path, token: seen.append((path, token)))
    client.watch("data", "a")
    client.watch(f"{HOME}/control", "b", depth=0)
    assert client.poll() == 2
    assert seen == [("data", "a"), (f"{HOME}/control", "b")]
    seen.clear()
    dom0 = xs.connect()
    for path in (f"{HOME}/data/x", f"{HOME}/control/shutdown"):
        xs.handle(dom0, Message(XsType.WRITE, 1, 0, f"{path}\0v".encode()))
    # MKDIR of an existing node changes nothing and fires nothing.
    xs.handle(dom0, Message(XsType.MKDIR, 1, 0, f"{HOME}/control\0".encode()))
    xs.handle(dom0, Message(XsType.WRITE, 1, 0, f"{HOME}/control\0".encode()))
    client.poll()
    assert seen == [("data/x", "a"), (f"{HOME}/control", "b")]
    client.unwatch("data", "a")
    assert [w[1] for w in client.watches()] == ["b"]
    seen.clear()
    xs.handle(dom0, Message(XsType.WRITE, 1, 0, f"{HOME}/data/x\0w".encode()))
    client.poll()
    assert seen == []


def test_events_wait_when_the_rsp_ring_is_full(guest):
    xs, client, _ = guest
    seen = []
    client.set_handler("t", lambda path, token: seen.append(path))
    client.watch("data", "t")
    client.poll()
    seen.clear()
    dom0 = xs.connect()
    paths = [f"data/node-number-{i:03d}" for i in range(60)]
    for path in paths:
        xs.handle(
            dom0, Message(XsType.WRITE, 1, 0, f"{HOME}/{path}\0v".encode())
        )
    conn = xs.domain_connection(DOMID)
    # Far more than 1024 bytes of events: some wait in the daemon.
    assert conn.outbox
    while conn.outbox or xs_wire.ring_used(conn.page, xs_wire.Ring.RSP):
        client.poll()
        xs.service_ring(DOMID)
    assert seen == paths


def test_transactions(guest):
    xs, client, _ = guest
    tx = client.transaction_start()
    assert client.transactions() == [tx]
    client.write("data/t", "1", tx)
    assert client.read("data/t", tx) == b"1"
    assert client.transaction_end(tx)
    assert client.read("data/t") == b"1"
    assert client.transactions() == []
    tx = client.transaction_start()
    client.read("data/t", tx)
    dom0 = xs.connect()
    xs.handle(dom0, Message(XsType.WRITE, 1, 0, f"{HOME}/data/t\0x".encode()))
    assert not client.transaction_end(tx)
    assert client.transactions() == []


def test_bad_state_is_refused():
    ram, page, state = _guest_ram()
    state[0:4] = b"JUNK"
    with pytest.raises(XenbusError, match="magic"):
        XenbusClient(page, state, notify=lambda: None)
    with pytest.raises(XenbusError, match="needed"):
        XenbusClient(page, state[:100], notify=lambda: None)


def _migrate(xs, ram):
    """Export the guest's xenstore, copy its RAM, import on a new host."""
    state = xs.export_domain(DOMID)
    new_ram = bytearray(ram)
    view = memoryview(new_ram)
    dest = Xenstore()
    dest.import_domain(DOMID, state, page=view[:4096], notify=lambda: None)
    return dest, new_ram, view[:4096], view[4096:]


def test_restarted_client_continues_from_ram(guest):
    xs, client, ram = guest
    client.watch("data", "tok")
    tx = client.transaction_start()
    client.write("data/in-tx", "v", tx)
    client.poll()
    dest, new_ram, page, state = _migrate(xs, ram)
    seen = []
    # A new process: nothing but RAM; handlers are code, given again.
    restarted = _client(dest, page, state)
    restarted.set_handler("tok", lambda path, token: seen.append(path))
    assert restarted.watches() == [("data", "tok", -1)]
    assert restarted.transactions() == [tx]
    assert restarted.read("data/in-tx", tx) == b"v"
    assert restarted.transaction_end(tx)
    restarted.poll()
    seen.clear()
    dom0 = dest.connect()
    dest.handle(
        dom0, Message(XsType.WRITE, 1, 0, f"{HOME}/data/z\0v".encode())
    )
    restarted.poll()
    assert seen == ["data/z"]
    assert (
        dest.handle(
            dom0, Message(XsType.READ, 1, 0, f"{HOME}/data/in-tx\0".encode())
        ).reply.payload
        == b"v"
    )


def test_request_in_flight_survives_restart(guest):
    xs, client, ram = guest
    tx = client.transaction_start()
    client.write("data/late", "v", tx)
    # The guest writes TRANSACTION_END into the ring and is paused
    # before the daemon sees it.
    page = memoryview(ram)[:4096]
    with pytest.raises(Stopped):
        _stopping_client(ram).transaction_end(tx)
    assert xs_wire.ring_used(page, xs_wire.Ring.REQ) > 0
    dest, _, page, state = _migrate(xs, ram)
    restarted = _client(dest, page, state)
    reply = restarted.recover()
    assert reply.type == XsType.TRANSACTION_END and reply.tx_id == tx
    assert restarted.transactions() == []
    assert restarted.read("data/late") == b"v"
    assert restarted.recover() is None


def _stopping_client(ram):
    """The same guest, in a run that stops when it waits for a reply."""

    def stop():
        raise Stopped()

    view = memoryview(ram)
    return XenbusClient(view[:4096], view[4096:], lambda: None, stop)


def test_reply_waiting_in_ram_is_recovered(guest):
    xs, client, ram = guest
    client.watch("data", "t")
    with pytest.raises(Stopped):
        _stopping_client(ram).write("data/w", "v")
    # The daemon answers; the reply sits in the rsp ring in guest RAM.
    assert xs.service_ring(DOMID)
    dest, _, page, state = _migrate(xs, ram)
    restarted = _client(dest, page, state)
    restarted.poll()
    reply = restarted.recover()
    assert (reply.type, reply.payload) == (XsType.WRITE, b"OK\0")
    assert restarted.recover() is None
    assert restarted.read("data/w") == b"v"


def _guest_process(shm_name, queue):
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        view = shm.buf
        client = XenbusClient(
            view[:4096], view[4096:RAM_SIZE], notify=lambda: None, timeout=10
        )
        seen = []
        client.set_handler("w", lambda path, token: seen.append(path))
        client.watch("data", "w")
        client.write("data/from-guest", "hello")
        big = b"x" * 1500
        client.write("data/big", big)
        tx = client.transaction_start()
        client.write("data/tx", "t", tx)
        ok = client.transaction_end(tx)
        client.poll()
        queue.put((client.read("data/big") == big, ok, seen, client.watches()))
        del client, view
    finally:
        shm.close()


def test_client_and_daemon_in_two_processes():
    shm = shared_memory.SharedMemory(create=True, size=RAM_SIZE)
    try:
        shm.buf[:RAM_SIZE] = bytes(RAM_SIZE)
        page = shm.buf[:4096]
        xs = _host(page)
        done = threading.Event()

        def serve():
            while not done.is_set():
                xs.service_ring(DOMID)
                done.wait(0.0005)

        server = threading.Thread(target=serve)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_guest_process, args=(shm.name, queue))
        proc.start()
        server.start()
        try:
            big_ok, tx_ok, seen, watches = queue.get(timeout=60)
        finally:
            proc.join(60)
            done.set()
            server.join()
        assert proc.exitcode == 0
        assert big_ok and tx_ok
        assert seen[0] == "data"
        assert set(seen[1:]) <= {"data/from-guest", "data/big", "data/tx"}
        assert watches == [("data", "w", -1)]
        dom0 = xs.connect()
        reply = xs.handle(
            dom0, Message(XsType.READ, 1, 0, f"{HOME}/data/tx\0".encode())
        ).reply
        assert reply.payload == b"t"
        xs.release_domain(DOMID)
        page.release()
    finally:
        shm.close()
        shm.unlink()


def test_no_reply_is_an_error_naming_the_request():
    _, page, state = _guest_ram()
    client = XenbusClient(page, state, notify=lambda: None, timeout=0)
    with pytest.raises(XenbusError, match="READ req_id 1"):
        client.read("data")
