"""xs_wire: messages, permission strings and the shared ring page."""

import struct

import pytest

from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import Ring
from nova_xen_ncm.host.sim.xs_wire import XsType
from nova_xen_ncm.host.sim.xs_wire import XsWireError


def _page() -> memoryview:
    return memoryview(bytearray(4096))


def test_layouts_match_the_c_structs():
    # struct xsd_sockmsg: four uint32_t.
    assert xs_wire.HEADER_SIZE == struct.calcsize("<4I") == 16
    # struct xenstore_domain_interface: two 1024-byte rings, 8 u32.
    assert xs_wire.INTERFACE_SIZE == 2 * 1024 + 8 * 4
    assert xs_wire.REQ_CONS == 2048 and xs_wire.EVTCHN_PORT == 2076


def test_type_numbers_follow_xs_wire_h():
    assert XsType.DIRECTORY == 1
    assert XsType.WATCH_EVENT == 15
    assert XsType.ERROR == 16
    assert XsType.RESET_WATCHES == 21
    assert XsType.DIRECTORY_PART == 22
    assert XsType.SET_QUOTA == 26
    assert xs_wire.XSD_ERRORS[0] == "EINVAL"
    assert xs_wire.XSD_ERRORS[-1] == "EPERM"


def test_message_round_trip():
    msg = Message(XsType.WRITE, 7, 3, b"a/b\0value\0with nul")
    data = msg.encode()
    assert struct.unpack_from("<4I", data) == (11, 7, 3, 18)
    assert Message.decode(data) == msg


def test_payload_limit_is_enforced_both_ways():
    with pytest.raises(XsWireError, match="XENSTORE_PAYLOAD_MAX"):
        Message(XsType.WRITE, 1, 0, b"x" * 4097)
    header = struct.pack("<4I", XsType.READ, 1, 0, 5000)
    with pytest.raises(XsWireError, match="5000"):
        Message.decode(header + b"x" * 5000)
    with pytest.raises(XsWireError, match="shorter"):
        Message.decode(b"abc")


def test_error_reply_and_parsing():
    req = Message(XsType.READ, 9, 4, b"x\0")
    reply = xs_wire.error_reply(req, "EACCES")
    assert (reply.type, reply.req_id, reply.tx_id) == (XsType.ERROR, 9, 4)
    assert reply.payload == b"EACCES\0"
    assert reply.error().name == "EACCES"
    assert reply.error().errno == 13
    with pytest.raises(XsWireError, match="EWHAT"):
        xs_wire.error_reply(req, "EWHAT")


def test_perm_strings():
    assert xs_wire.parse_perm("r0") == (xs_wire.PERM_READ, 0)
    assert xs_wire.parse_perm("b5") == (xs_wire.PERM_BOTH, 5)
    assert xs_wire.format_perm((xs_wire.PERM_WRITE, 12)) == "w12"
    assert xs_wire.encode_perms(((0, 1), (3, 2))) == b"n1\0b2\0"
    assert xs_wire.letter_perms(((0, 1), (1, 0))) == (("n", 1), ("r", 0))
    for bad in ("x1", "r", "rr", "r70000", ""):
        with pytest.raises(XsWireError):
            xs_wire.parse_perm(bad)


def test_whole_message_waits_for_room_and_wraps():
    page = _page()
    # Free-running indices just below 2**32 and near the ring's end.
    start = 0xFFFFFFFF - 5
    for off in (xs_wire.RSP_CONS, xs_wire.RSP_PROD):
        xs_wire.set_u32(page, off, start)
    msg = Message(XsType.WATCH_EVENT, 0, 0, b"p" * 600 + b"\0t\0")
    assert xs_wire.put_message(page, Ring.RSP, msg)
    # 619 bytes used: a second one does not fit and is not written.
    assert not xs_wire.put_message(page, Ring.RSP, msg)
    assert xs_wire.ring_used(page, Ring.RSP) == len(msg.encode())
    partial = bytearray()
    assert xs_wire.get_message(page, Ring.RSP, partial) == msg
    assert (
        xs_wire.get_u32(page, xs_wire.RSP_CONS)
        == (start + len(msg.encode())) & 0xFFFFFFFF
    )
    assert xs_wire.put_message(page, Ring.RSP, msg)
    assert xs_wire.get_message(page, Ring.RSP, partial) == msg
    assert not partial


def test_partial_message_is_not_consumed():
    page = _page()
    data = Message(XsType.READ, 1, 0, b"some/path\0").encode()
    xs_wire.ring_write(page, Ring.REQ, data[:10])
    partial = bytearray()
    assert xs_wire.get_message(page, Ring.REQ, partial) is None
    xs_wire.ring_write(page, Ring.REQ, data[10:-1])
    assert xs_wire.get_message(page, Ring.REQ, partial) is None
    assert xs_wire.get_u32(page, xs_wire.REQ_CONS) == 0
    assert not partial
    xs_wire.ring_write(page, Ring.REQ, data[-1:])
    assert xs_wire.get_message(page, Ring.REQ, partial).payload == (
        b"some/path\0"
    )


def test_message_larger_than_the_ring_is_streamed():
    page = _page()
    msg = Message(XsType.WRITE, 2, 0, b"k\0" + bytes(range(256)) * 10)
    data = msg.encode()
    assert len(data) > xs_wire.XENSTORE_RING_SIZE
    partial = bytearray()
    sent = 0
    got = None
    while got is None:
        sent += xs_wire.ring_write(page, Ring.REQ, data[sent:])
        got = xs_wire.get_message(page, Ring.REQ, partial)
    assert got == msg
    assert sent == len(data)
    assert not partial


def test_oversized_header_in_ring_is_refused():
    page = _page()
    xs_wire.ring_write(page, Ring.REQ, struct.pack("<4I", 2, 1, 0, 9999))
    with pytest.raises(XsWireError, match="9999"):
        xs_wire.get_message(page, Ring.REQ, bytearray())


def test_corrupt_indices_are_refused():
    page = _page()
    xs_wire.set_u32(page, xs_wire.REQ_PROD, 5000)
    with pytest.raises(XsWireError, match="REQ ring indices"):
        xs_wire.ring_used(page, Ring.REQ)
    with pytest.raises(XsWireError, match="smaller"):
        xs_wire.ring_used(memoryview(bytearray(100)), Ring.REQ)
    with pytest.raises(XsWireError, match="cannot be written whole"):
        xs_wire.put_message(
            page, Ring.RSP, Message(XsType.READ, 1, 0, b"x" * 2000)
        )
