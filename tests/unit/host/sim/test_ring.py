"""The shared ring of io/ring.h: sizes, notification hold-off, final
checks, wrap-around of the free-running indices, overflow refusal."""

import struct

import pytest

from nova_xen_ncm.host.sim import ring
from nova_xen_ncm.host.sim.ring import BackRing
from nova_xen_ncm.host.sim.ring import FrontRing
from nova_xen_ncm.host.sim.ring import RingError

ENTRY = 64


def make(start: int = 0):
    page = memoryview(bytearray(4096))
    pvt = memoryview(bytearray(8))
    front = FrontRing.init(page, ENTRY, pvt)
    if start:
        # Both ends agree on a starting point, as after a long uptime.
        struct.pack_into("<IIII", page, 0, start, 1, start, 1)
        front.req_prod_pvt = start
        front.rsp_cons = start
    back = BackRing.attach(page, ENTRY, (start, start))
    return page, pvt, front, back


def test_ring_entries_is_a_power_of_two_that_fits():
    assert ring.ring_entries(64) == 32  # 63 fit
    assert ring.ring_entries(112) == 32  # netif tx: 36 fit
    assert ring.ring_entries(32) == 64  # 126 fit
    with pytest.raises(ValueError):
        ring.ring_entries(4096)


def test_shared_ring_init_sets_event_thresholds():
    page, _, _, _ = make()
    assert struct.unpack_from("<IIII", page) == (0, 1, 0, 1)
    assert bytes(page[16:64]) == bytes(48)


def test_front_private_indices_live_in_the_given_memory():
    _, pvt, front, back = make()
    front.put_request(b"a")
    front.put_request(b"b")
    front.push_requests()
    back.get_request()
    back.put_response(b"x")
    back.push_responses()
    front.get_response()
    assert struct.unpack("<II", pvt) == (2, 1)
    # A new front ring over the same memory continues from there.
    again = FrontRing.attach(front.page, ENTRY, pvt)
    assert (again.req_prod_pvt, again.rsp_cons) == (2, 1)
    assert back.indices == (1, 1)


def test_notify_only_when_the_other_end_asked():
    _, _, front, back = make()
    front.put_request(b"1")
    assert front.push_requests() is True  # req_event 1 from init
    front.put_request(b"2")
    assert front.push_requests() is False  # back has not slept since
    assert back.get_request().startswith(b"1")
    assert back.get_request().startswith(b"2")
    assert back.final_check_for_requests() is False
    assert back.req_event == 3
    front.put_request(b"3")
    assert front.push_requests() is True


def test_final_check_sees_a_request_that_slipped_in():
    page, _, front, back = make()
    front.put_request(b"1")
    front.push_requests()
    back.get_request()
    front.put_request(b"2")
    front.push_requests()
    assert back.final_check_for_requests() is True
    assert back.get_request().startswith(b"2")


def test_responses_notify_and_final_check():
    _, _, front, back = make()
    for i in range(3):
        front.put_request(bytes([i]))
    front.push_requests()
    for _ in range(3):
        back.get_request()
    back.put_response(b"r0")
    assert back.push_responses() is True  # rsp_event 1 from init
    back.put_response(b"r1")
    assert back.push_responses() is False
    assert front.get_response().startswith(b"r0")
    assert front.get_response().startswith(b"r1")
    assert front.final_check_for_responses() is False
    assert front.rsp_event == 3
    back.put_response(b"r2")
    assert back.push_responses() is True


def test_full_ring_refuses_requests():
    _, _, front, back = make()
    for i in range(32):
        front.put_request(bytes([i]))
    assert front.full()
    with pytest.raises(RingError):
        front.put_request(b"x")
    front.push_requests()
    assert back.unconsumed_requests() == 32


def test_indices_wrap_around_2_to_the_32():
    start = 2**32 - 5
    _, pvt, front, back = make(start)
    received = []
    for batch in range(4):
        for i in range(8):
            front.put_request(struct.pack("<I", batch * 8 + i))
        front.push_requests()
        while back.unconsumed_requests():
            req = back.get_request()
            back.put_response(req[:4] + b"ok")
        back.push_responses()
        while front.unconsumed_responses():
            received.append(struct.unpack_from("<I", front.get_response())[0])
    assert received == list(range(32))
    assert back.indices == ((start + 32) % 2**32,) * 2
    assert struct.unpack("<II", pvt) == ((start + 32) % 2**32,) * 2


def test_back_end_refuses_an_overflowing_front_end():
    page, _, _, back = make()
    struct.pack_into("<I", page, 0, 33)  # req_prod beyond the ring
    with pytest.raises(RingError):
        back.unconsumed_requests()


def test_front_end_refuses_an_overflowing_back_end():
    page, _, front, _ = make()
    struct.pack_into("<I", page, 8, 40)  # rsp_prod beyond the ring
    with pytest.raises(RingError):
        front.unconsumed_responses()


def test_back_ring_attach_checks_indices():
    page, _, _, _ = make()
    with pytest.raises(RingError):
        BackRing.attach(page, ENTRY, (100, 10))
    back = BackRing.attach(page, ENTRY, (12, 10))
    # Two requests were taken and not answered: room for two responses.
    back.put_response(b"a")
    back.put_response(b"b")
    with pytest.raises(RingError):
        back.put_response(b"c")
