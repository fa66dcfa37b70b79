"""The transparency checker catches each kind of damage and passes an
undamaged migration."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct

import numpy as np
import pytest

from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import BackendState
from nova_xen_ncm.host.base import EventChannel
from nova_xen_ncm.host.base import EventChannelState
from nova_xen_ncm.host.base import EvtchnAbi
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import GrantTableState
from nova_xen_ncm.host.base import GuestState
from nova_xen_ncm.host.base import InflightRequest
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.base import SharedInfoState
from nova_xen_ncm.host.base import TscInfo
from nova_xen_ncm.host.base import VcpuInfoPlacement
from nova_xen_ncm.host.base import XenstoreNode
from nova_xen_ncm.host.base import XenstoreState
from nova_xen_ncm.host.base import XenstoreTransaction
from nova_xen_ncm.host.base import XenstoreWatch

DOMID = 5
RING_GFN = 0x201
FE = f"/local/domain/{DOMID}/device/vbd/51712"
BE = f"/local/domain/0/backend/vbd/{DOMID}/51712"


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def pages() -> dict[int, bytes]:
    return {
        pfn: bytes([pfn & 0xFF]) * 4096
        for pfn in (*range(0x100, 0x110), RING_GFN)
    }


def grant_frame() -> bytes:
    frame = bytearray(4096)
    # ref 8: the ring page, granted to dom0, mapped writable by it.
    struct.pack_into("<HHI", frame, 8 * 8, 0x1 | 0x8 | 0x10, 0, RING_GFN)
    struct.pack_into("<HHI", frame, 9 * 8, 0x1, 0, 0x300)
    return bytes(frame)


def shared_info_page() -> bytes:
    page = bytearray(4096)
    struct.pack_into("<IIII", page, checker.SHINFO_WC, 2, 1700000000, 5, 0)
    struct.pack_into("<Q", page, checker.SHINFO_MASK, 0x1)  # port 0
    struct.pack_into("<Q", page, checker.SHINFO_PENDING, 1 << 3)
    return bytes(page)


def inflight(id: int, seq: int) -> InflightRequest:
    return InflightRequest("ring", id, struct.pack("<QI", seq, id))


def backend(**changes) -> BackendState:
    state = BackendState(
        kind="vbd",
        devid=51712,
        backend_domid=0,
        frontend_path=FE,
        backend_path=BE,
        state=4,
        ring_refs=(8,),
        event_channels=(6,),
        ring_indices={"ring": (14, 12)},
        inflight=(inflight(0, 13), inflight(1, 14)),
    )
    return dataclasses.replace(state, **changes)


def frontend(**changes) -> dict:
    obs = {
        "states": (
            ("frontend", 1),
            ("backend", 1),
            ("backend", 2),
            ("frontend", 4),
            ("backend", 4),
        ),
        "next_seq": 17,
        "last_rsp_seq": 12,
        "sent": 16,
        "completed": 12,
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "bad_payload": 0,
        "outstanding": (13, 14, 15, 16),
    }
    obs.update(changes)
    return obs


def guest_state(**items) -> GuestState:
    frontends = items.pop("frontends", {"vbd/51712": frontend()})
    base = {
        Item.MEMORY: {pfn: digest(p) for pfn, p in pages().items()},
        Item.PLATFORM: {
            "CPU:0": b"\x01" * 32,
            "LAPIC:0": b"\x02" * 32,
            "tsc": TscInfo(mode=0, khz=2_000_000, nsec=0, incarnation=0),
        },
        Item.DOMID: (DOMID, (0,)),
        Item.XENSTORE: XenstoreState(
            nodes=(
                XenstoreNode(f"{FE}/state", b"4", (("n", DOMID), ("r", 0))),
                XenstoreNode(f"{BE}/state", b"4", (("n", 0), ("r", DOMID))),
            ),
            watches=(XenstoreWatch(f"{BE}/state", "fe:vbd/51712"),),
            transactions=(
                XenstoreTransaction(
                    3, 10, (XenstoreNode("data/x", b"1", (("n", DOMID),)),)
                ),
            ),
            store_port=1,
            store_gfn=0xFEFFC,
        ),
        Item.EVENT_CHANNELS: EventChannelState(
            abi=EvtchnAbi.TWO_LEVEL,
            ports=(
                EventChannel(1, EvtchnType.INTERDOMAIN, 0, 0, 1),
                EventChannel(3, EvtchnType.IPI, vcpu=1, pending=True),
                EventChannel(4, EvtchnType.VIRQ, virq=1),
                EventChannel(6, EvtchnType.INTERDOMAIN, 0, 0, 12),
            ),
        ),
        Item.GRANT_TABLE: GrantTableState(1, (0xF0001,), (grant_frame(),)),
        Item.SHARED_INFO: SharedInfoState(
            gfn=0xF0000,
            content=shared_info_page(),
            vcpu_info=(
                VcpuInfoPlacement(0, 0x102, 0),
                VcpuInfoPlacement(1, 0x102, 64),
            ),
        ),
        Item.PV_DEVICES: (backend(),),
        Item.HVM_PARAMS: {0: (2 << 56) | 0xF3, 1: 0xFEFFC, 2: 1},
    }
    base.update(items)
    return GuestState(items=base, frontends=frontends)


def resumed_state(**items) -> GuestState:
    """The destination after reconnecting, before the guest runs: its
    backends are quiescent, so the rings and the requests in flight are
    as at pause."""
    return guest_state(**items)


def answered_early() -> dict:
    """A destination whose backend answered before the guest ran: the
    two in-flight requests and the two left on the ring taken and
    answered, the answers in the ring page."""
    mem = {pfn: digest(p) for pfn, p in pages().items()}
    mem[RING_GFN] = digest(b"answers")
    return {
        Item.MEMORY: mem,
        Item.PV_DEVICES: (
            backend(ring_indices={"ring": (16, 16)}, inflight=()),
        ),
    }


def failed(report, item: Item) -> str:
    assert not report.results[item].passed, report.to_dict()
    others = [i for i in report.failures() if i is not item]
    assert others == [], report.to_dict()
    return report.results[item].reason


def test_identical_states_pass():
    report = checker.check(guest_state(), guest_state())
    assert report.passed, str(report)
    assert set(report.to_dict()) == {i.value for i in Item}
    assert report.to_dict()["memory"] == {"passed": True, "reason": ""}


def test_a_backend_that_answers_before_the_guest_runs_fails():
    report = checker.check(guest_state(), resumed_state(**answered_early()))
    assert not report.passed
    pv = report.results[Item.PV_DEVICES].reason
    assert "ring ring indices (req_cons, rsp_prod) moved" in pv
    assert "2 of the 2 in flight at pause gone" in pv
    # Its answers in the ring page are not exempt either.
    assert hex(RING_GFN) in report.results[Item.MEMORY].reason


def test_quiescent_reconnect_then_answers_passes():
    later = guest_state(
        frontends={
            "vbd/51712": frontend(
                next_seq=30,
                last_rsp_seq=29,
                sent=29,
                completed=29,
                outstanding=(),
            )
        }
    )
    report = checker.check(guest_state(), resumed_state(), later)
    assert report.passed, str(report)


def test_flipped_memory_byte():
    damaged = pages()
    page = bytearray(damaged[0x105])
    page[100] ^= 1
    mem = {pfn: digest(p) for pfn, p in damaged.items()}
    mem[0x105] = digest(bytes(page))
    reason = failed(
        checker.check(guest_state(), guest_state(**{Item.MEMORY: mem})),
        Item.MEMORY,
    )
    assert "pfn 0x105" in reason


def test_ring_page_is_exempt_only_when_the_backend_answered():
    # Same ring page change without any answer from the backend.
    mem = {pfn: digest(p) for pfn, p in pages().items()}
    mem[RING_GFN] = digest(b"scribbled")
    reason = failed(
        checker.check(guest_state(), guest_state(**{Item.MEMORY: mem})),
        Item.MEMORY,
    )
    assert hex(RING_GFN) in reason


def test_dropped_watch():
    xs = guest_state().items[Item.XENSTORE]
    damaged = dataclasses.replace(xs, watches=())
    reason = failed(
        checker.check(guest_state(), guest_state(**{Item.XENSTORE: damaged})),
        Item.XENSTORE,
    )
    assert f"watch {BE}/state token 'fe:vbd/51712'" in reason
    assert "missing" in reason


def test_transaction_restored_to_fail_with_eagain_passes():
    xs = guest_state().items[Item.XENSTORE]
    eagain = dataclasses.replace(
        xs, transactions=(XenstoreTransaction(3, 99),)
    )
    report = checker.check(
        guest_state(), guest_state(**{Item.XENSTORE: eagain})
    )
    assert report.passed, str(report)


def test_renumbered_port():
    evs = guest_state().items[Item.EVENT_CHANNELS]
    ports = tuple(
        dataclasses.replace(p, port=9) if p.port == 6 else p for p in evs.ports
    )
    damaged = dataclasses.replace(evs, ports=ports)
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.EVENT_CHANNELS: damaged})
        ),
        Item.EVENT_CHANNELS,
    )
    assert "port 6 (interdomain dom0:12 vcpu 0) renumbered to 9" in reason


def test_pending_event_may_arrive_but_not_vanish():
    evs = guest_state().items[Item.EVENT_CHANNELS]
    gained = dataclasses.replace(
        evs,
        ports=tuple(
            dataclasses.replace(p, pending=True) if p.port == 6 else p
            for p in evs.ports
        ),
    )
    assert checker.check(
        guest_state(), guest_state(**{Item.EVENT_CHANNELS: gained})
    ).passed
    lost = dataclasses.replace(
        evs,
        ports=tuple(dataclasses.replace(p, pending=False) for p in evs.ports),
    )
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.EVENT_CHANNELS: lost})
        ),
        Item.EVENT_CHANNELS,
    )
    assert "port 3 lost its pending event" in reason


def test_changed_domid():
    reason = failed(
        checker.check(guest_state(), guest_state(**{Item.DOMID: (6, (0,))})),
        Item.DOMID,
    )
    assert reason == "domid changed from 5 to 6"


def test_lost_grant_entry():
    frame = bytearray(grant_frame())
    frame[9 * 8 : 10 * 8] = bytes(8)
    damaged = GrantTableState(1, (0xF0001,), (bytes(frame),))
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.GRANT_TABLE: damaged})
        ),
        Item.GRANT_TABLE,
    )
    assert reason == "grant ref 9 (flags 0x1, dom0, frame 0x300) lost"


def test_moved_vcpu_info():
    si = guest_state().items[Item.SHARED_INFO]
    damaged = dataclasses.replace(
        si,
        vcpu_info=(
            VcpuInfoPlacement(0, 0x102, 0),
            VcpuInfoPlacement(1, None),
        ),
    )
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.SHARED_INFO: damaged})
        ),
        Item.SHARED_INFO,
    )
    assert "vcpu 1's vcpu_info moved from gfn 0x102+0x40 to the legacy" in (
        reason
    )


def test_shared_info_pending_bit_lost():
    si = guest_state().items[Item.SHARED_INFO]
    page = bytearray(si.content)
    struct.pack_into("<Q", page, checker.SHINFO_PENDING, 0)
    damaged = dataclasses.replace(si, content=bytes(page))
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.SHARED_INFO: damaged})
        ),
        Item.SHARED_INFO,
    )
    assert "pending events of ports 3 lost" in reason


def test_lost_inflight_request():
    # The destination attached at the right indices but dropped the
    # requests that were in flight: nothing answered them.
    damaged = backend(ring_indices={"ring": (16, 12)}, inflight=())
    reason = failed(
        checker.check(
            guest_state(), guest_state(**{Item.PV_DEVICES: (damaged,)})
        ),
        Item.PV_DEVICES,
    )
    assert "ring ring indices (req_cons, rsp_prod) moved" in reason
    assert "2 of the 2 in flight at pause gone, 0 new" in reason


def test_frontend_state_change():
    seen = frontend()["states"] + (("backend", 1),)
    resumed = guest_state(frontends={"vbd/51712": frontend(states=seen)})
    reason = failed(checker.check(guest_state(), resumed), Item.PV_DEVICES)
    assert (
        reason == "vbd/51712: frontend saw a state change after pause: "
        "backend 1"
    )


def test_io_damage_after_resume():
    later = guest_state(
        frontends={
            "vbd/51712": frontend(
                next_seq=30,
                last_rsp_seq=29,
                sent=29,
                completed=28,
                lost=1,
                outstanding=(14,),
            )
        }
    )
    reason = failed(
        checker.check(guest_state(), resumed_state(), later),
        Item.PV_DEVICES,
    )
    assert "vbd/51712: 1 lost responses since pause" in reason
    assert "never answered: seq 14" in reason


def test_backend_state_change():
    reason = failed(
        checker.check(
            guest_state(),
            resumed_state(
                **{
                    Item.PV_DEVICES: (
                        backend(
                            state=1,
                            ring_indices={"ring": (16, 16)},
                            inflight=(),
                        ),
                    )
                }
            ),
        ),
        Item.PV_DEVICES,
    )
    assert "backend state changed from 4 to 1" in reason


@pytest.mark.parametrize(
    "item, value, words",
    [
        (Item.HVM_PARAMS, {0: 0, 1: 0xFEFFC, 2: 1}, "CALLBACK_IRQ"),
        (Item.PLATFORM, {"CPU:0": b"\x09" * 32}, "CPU:0"),
    ],
)
def test_params_and_platform_name_what_changed(item, value, words):
    base = guest_state().items[item]
    reason = failed(
        checker.check(guest_state(), guest_state(**{item: {**base, **value}})),
        item,
    )
    assert words in reason


def test_opaque_values_are_compared_for_equality():
    a = guest_state(**{Item.MEMORY: "abc"})
    b = guest_state(**{Item.MEMORY: "abd"})
    assert checker.check(a, a).passed
    assert failed(checker.check(a, b), Item.MEMORY) == "memory digest differs"


def test_missing_item_fails():
    items = dict(guest_state().items)
    del items[Item.XENSTORE]
    resumed = GuestState(items=items, frontends=guest_state().frontends)
    report = checker.check(guest_state(), resumed)
    assert failed(report, Item.XENSTORE) == "the destination reported no value"


def test_memory_as_digest_arrays():
    pfns = np.array(sorted(pages()), dtype=np.uint64)
    ram = np.stack([np.frombuffer(pages()[int(p)], np.uint8) for p in pfns])
    before = checker.page_digests(pfns, ram)
    ram[3, 4095] ^= 0x80
    after = checker.page_digests(pfns[::-1].copy(), ram[::-1].copy())
    reason = failed(
        checker.check(
            guest_state(**{Item.MEMORY: before}),
            guest_state(**{Item.MEMORY: after}),
        ),
        Item.MEMORY,
    )
    assert reason == f"1 pages differ: pfn {hex(int(pfns[3]))}"
    # The ring page is not exempt: the backends are quiescent.
    ring = int(np.flatnonzero(pfns == RING_GFN)[0])
    ram[3, 4095] ^= 0x80
    ram[ring, 0] ^= 1
    report = checker.check(
        guest_state(**{Item.MEMORY: before}),
        resumed_state(**{Item.MEMORY: checker.page_digests(pfns, ram)}),
    )
    assert hex(RING_GFN) in failed(report, Item.MEMORY)


def test_vcpu_info_page_is_exempt_only_when_an_event_arrived():
    mem = {pfn: digest(p) for pfn, p in pages().items()}
    mem[0x102] = digest(b"upcall pending set")
    reason = failed(
        checker.check(guest_state(), guest_state(**{Item.MEMORY: mem})),
        Item.MEMORY,
    )
    assert reason == "1 pages differ: pfn 0x102"
    evs = guest_state().items[Item.EVENT_CHANNELS]
    notified = dataclasses.replace(
        evs,
        ports=tuple(
            dataclasses.replace(p, pending=True) if p.port == 6 else p
            for p in evs.ports
        ),
    )
    report = checker.check(
        guest_state(),
        guest_state(**{Item.MEMORY: mem, Item.EVENT_CHANNELS: notified}),
    )
    assert report.passed, str(report)


# -- after resume ------------------------------------------------------------


def kernel(ports=None, progress=(100, 200), time=(5_000, 6_000), rate=1):
    return {
        "ports": dict(ports or {1: 10, 3: 4, 4: 0, 6: 30}),
        "vcpus": tuple(
            {"progress": p, "system_time": t}
            for p, t in zip(progress, time, strict=True)
        ),
        "dirty_rate": rate,
    }


# Ports raised by the probe, with the guest's count just before.
RAISED = {1: 10, 3: 4, 4: 0, 6: 39}


def judged(later_frontend=None, later_kernel=None, raised=RAISED, **kw):
    """after_resume of the reference guest: paused as guest_state(),
    resumed identical, later as given (by default: all well)."""
    paused = dataclasses.replace(
        guest_state(frontends={"vbd/51712": frontend(verified_write=5)}),
        kernel=kernel(),
    )
    resumed = dataclasses.replace(paused)
    good_later = frontend(
        next_seq=41,
        last_rsp_seq=40,
        sent=40,
        completed=40,
        outstanding=(),
        verified_write=9,
    )
    good_later.update(later_frontend or {})
    later = dataclasses.replace(
        resumed_state(
            **{
                Item.PV_DEVICES: (
                    backend(ring_indices={"ring": (40, 40)}, inflight=()),
                )
            }
        ),
        frontends={"vbd/51712": good_later},
        kernel=later_kernel
        or kernel(
            ports={1: 11, 3: 5, 4: 1, 6: 40},
            progress=(150, 250),
            time=(9_000, 9_500),
        ),
    )
    return checker.after_resume(paused, resumed, later, raised, **kw)


def test_after_resume_passes_a_guest_that_noticed_nothing():
    verdict = judged()
    assert verdict.passed, verdict.problems
    assert verdict.requests_completed == 28
    # Writes 7 and 9, issued before the pause (next_seq 17), read back.
    assert verdict.vbd_reads_checked == 2
    assert verdict.to_dict()["passed"] is True
    assert verdict.to_dict()["ports_silent"] == []


@pytest.mark.parametrize(
    ("later", "field", "words"),
    [
        ({"duplicated": 1}, "duplicated", "1 duplicated responses"),
        ({"lost": 2}, "lost", "2 lost responses"),
        ({"bad_payload": 1}, "bad_payloads", "1 bad payload"),
        ({"reordered": 1}, "reordered", "1 reordered"),
    ],
)
def test_after_resume_counts_damage(later, field, words):
    verdict = judged(later)
    assert not verdict.passed
    assert getattr(verdict, field) > 0
    assert words in verdict.to_dict()["reason"]


def test_after_resume_finds_a_request_never_answered():
    verdict = judged({"outstanding": (14,)})
    assert verdict.unanswered == ("vbd/51712:14",)
    assert "never answered: seq 14" in verdict.to_dict()["reason"]


def test_after_resume_needs_io_and_continuing_sequences():
    verdict = judged({"completed": 12, "next_seq": 3, "verified_write": 5})
    reason = verdict.to_dict()["reason"]
    assert "no request completed after resume" in reason
    assert "next_seq went back from 17 to 3" in reason
    assert "no read after resume checked data written before" in reason


def test_after_resume_finds_io_stalled_after_the_requests_in_flight():
    """The four requests in flight at pause were answered, then nothing:
    I/O did not go on after resume."""
    verdict = judged(
        {"completed": 16, "sent": 20, "next_seq": 21, "outstanding": (17,)}
    )
    assert (
        "vbd/51712: no request issued after the pause completed (4 "
        "completed, 4 were in flight at pause)" in verdict.problems
    )
    assert judged({"completed": 17, "outstanding": ()}).passed


def test_after_resume_finds_a_silent_port():
    quiet = kernel(ports={1: 11, 3: 4, 4: 1, 6: 40}, progress=(150, 250))
    verdict = judged(later_kernel=quiet)
    assert verdict.ports_silent == (3,)
    # A port the probe could not raise is silent too.
    verdict = judged(raised={1: 10, 4: 0, 6: 39})
    assert verdict.ports_silent == (3,)
    # Port 6's count grew after resume (ordinary traffic) but not after
    # the probe raised it.
    verdict = judged(raised={**RAISED, 6: 40})
    assert verdict.ports_silent == (6,)


def test_after_resume_takes_the_ports_from_the_source_at_pause():
    # Port 3 is bound at pause and gone on the destination: silent.
    paused = dataclasses.replace(
        guest_state(frontends={"vbd/51712": frontend(verified_write=5)}),
        kernel=kernel(),
    )
    dropped = {1: 10, 4: 0, 6: 39}
    later = dataclasses.replace(
        paused,
        frontends={
            "vbd/51712": frontend(
                next_seq=41,
                last_rsp_seq=40,
                sent=40,
                completed=40,
                outstanding=(),
                verified_write=9,
            )
        },
        kernel=kernel(ports={1: 11, 4: 1, 6: 40}, progress=(150, 250)),
    )
    verdict = checker.after_resume(paused, paused, later, dropped)
    assert verdict.ports_silent == (3,)


def test_a_guest_without_kernel_record_is_not_judged():
    bare = guest_state(frontends={})
    verdict = checker.after_resume(bare, bare, bare)
    assert verdict.passed is None
    assert verdict.to_dict()["passed"] is None
    assert "no kernel record" in verdict.to_dict()["reason"]
    no_kernel = guest_state()
    verdict = checker.after_resume(no_kernel, no_kernel, no_kernel)
    assert verdict.passed is None
    assert "no kernel record" in verdict.to_dict()["reason"]


def test_a_guest_without_frontends_is_judged_on_its_ports_and_vcpus():
    """No PV frontend (IPIs, VIRQs only): still judged, so a port gone
    silent (a vCPU whose vector was not asserted again) fails it."""
    paused = dataclasses.replace(guest_state(frontends={}), kernel=kernel())
    later = dataclasses.replace(
        paused,
        kernel=kernel(
            ports={1: 11, 3: 5, 4: 1, 6: 40},
            progress=(150, 250),
            time=(5_500, 6_500),
        ),
    )
    verdict = checker.after_resume(paused, paused, later, RAISED)
    assert verdict.passed is True, verdict.problems
    assert verdict.requests_completed == 0
    quiet = dataclasses.replace(
        later,
        kernel=kernel(
            ports={1: 11, 3: 4, 4: 1, 6: 40},
            progress=(150, 250),
            time=(5_500, 6_500),
        ),
    )
    verdict = checker.after_resume(paused, paused, quiet, RAISED)
    assert verdict.passed is False
    assert verdict.ports_silent == (3,)


def test_after_resume_finds_stalled_vcpus_and_time_going_back():
    stuck = kernel(
        ports={1: 11, 3: 5, 4: 1, 6: 40},
        progress=(100, 250),
        time=(4_000, 9_500),
    )
    verdict = judged(later_kernel=stuck)
    assert verdict.vcpus_stalled == (0,)
    reason = verdict.to_dict()["reason"]
    assert "vCPUs 0 made no progress" in reason
    assert "vcpu 0's system time did not move forward: 5000 at" in reason
    # Standing still fails too, where the host writes time.
    still = kernel(ports={1: 11, 3: 5, 4: 1, 6: 40}, progress=(150, 250))
    reason = judged(later_kernel=still).to_dict()["reason"]
    assert "vcpu 1's system time did not move forward" in reason


def test_time_is_not_judged_when_the_host_writes_none():
    paused = dataclasses.replace(
        guest_state(frontends={"vbd/51712": frontend(verified_write=5)}),
        kernel=kernel(time=(0, 0)),
    )
    later = dataclasses.replace(
        paused,
        frontends={
            "vbd/51712": frontend(
                next_seq=41,
                last_rsp_seq=40,
                sent=40,
                completed=40,
                outstanding=(),
                verified_write=9,
            )
        },
        kernel=kernel(
            ports={1: 11, 3: 5, 4: 1, 6: 40}, progress=(150, 250), time=(0, 0)
        ),
    )
    verdict = checker.after_resume(paused, paused, later, RAISED)
    assert verdict.passed, verdict.problems
    assert verdict.time_judged is False
    assert verdict.to_dict()["reason"] == "time not judged"


def test_after_resume_applies_the_ring_rules_to_the_later_state():
    paused = dataclasses.replace(guest_state(), kernel=kernel())
    later = dataclasses.replace(
        paused,
        # Two requests in flight at pause, none answered, none in flight.
        items={
            **guest_state().items,
            Item.PV_DEVICES: (
                backend(ring_indices={"ring": (14, 12)}, inflight=()),
            ),
        },
    )
    verdict = checker.after_resume(paused, paused, later)
    assert "2 of the 2 requests in flight at pause lost" in " ".join(
        verdict.problems
    )


class _Mapping:
    def __init__(self, ram, pfns):
        self._runs = [(i, memoryview(ram[int(p)])) for i, p in enumerate(pfns)]

    def runs(self):
        return self._runs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _Ram:
    """What read_memory asks of a host: populated pfns, read-only maps."""

    def __init__(self):
        self.ram = {p: bytearray([p]) * 4096 for p in (3, 1, 2)}
        self.maps = []

    def populated_pfns(self, domid):
        return np.array(list(self.ram), dtype=np.uint64)

    def observing(self):
        return contextlib.nullcontext()

    def map_pages(self, domid, pfns, writable=False):
        self.maps.append(writable)
        return _Mapping(self.ram, pfns)


def test_read_memory_digests_every_page_as_it_is_now():
    host = _Ram()
    pfns, digests = checker.read_memory(host, DOMID)
    assert pfns.tolist() == [1, 2, 3]
    assert host.maps == [False]
    before = checker.check(
        guest_state(**{Item.MEMORY: (pfns, digests)}),
        guest_state(**{Item.MEMORY: checker.read_memory(host, DOMID)}),
    )
    assert before.passed
    host.ram[2][7] ^= 1  # no bookkeeping of any kind
    report = checker.check(
        guest_state(**{Item.MEMORY: (pfns, digests)}),
        guest_state(**{Item.MEMORY: checker.read_memory(host, DOMID)}),
    )
    assert "1 pages differ: pfn 0x2" in failed(report, Item.MEMORY)


def test_hvm_param_names_are_params_h():
    """xen/include/public/hvm/params.h, as the reasons name them."""
    expected = {
        9: "VIRIDIAN",
        10: "TIMER_MODE",
        11: "HPET_ENABLED",
        27: "PAGING_RING_PFN",
        28: "MONITOR_RING_PFN",
        29: "SHARING_RING_PFN",
        31: "TRIPLE_FAULT_REASON",
        32: "IOREQ_SERVER_PFN",
        33: "NR_IOREQ_SERVER_PAGES",
    }
    for index, name in expected.items():
        assert checker.HVM_PARAM_NAMES[index] == name, index
    assert 8 not in checker.HVM_PARAM_NAMES
    assert 30 not in checker.HVM_PARAM_NAMES


# -- time as Xen keeps it for an HVM guest -----------------------------------

S = 1_000_000_000


def _timed(wallclock, system_time, stamp, tsc, wall, incarnation=1):
    """A GuestState whose kernel record has one vCPU's time info; the
    TSC ticks once a ns (mul 2^32, shift 0)."""
    return GuestState(
        items={Item.PLATFORM: ("records", (0, 1_000_000, 0))},
        kernel={
            "vcpus": (
                {
                    "progress": 0,
                    "system_time": system_time,
                    "tsc_timestamp": stamp,
                    "tsc_to_system_mul": 1 << 32,
                    "tsc_shift": 0,
                },
            ),
            "wallclock_ns": wallclock,
            "guest_tsc": tsc,
            "host_wall_ns": wall,
            "tsc_incarnation": incarnation,
        },
    )


def _platform(paused, resumed, later):
    return checker.check(paused, resumed, later).results[Item.PLATFORM]


def test_guest_clock_is_wallclock_plus_pvclock():
    state = _timed(1000 * S, 50 * S, 7_000, 7_000 + 3 * S, 0)
    assert checker.guest_clock(state.kernel, 0) == 1053 * S
    assert checker.guest_clock(state.kernel, 1) is None
    assert checker.guest_clock({}, 0) is None


def test_time_rebased_to_the_destination_passes():
    """The source booted at 1000 s wall time, the destination at 2000 s:
    the destination's system time is 1000 s smaller than the source's
    was, and the guest's clock goes on all the same. The guest's TSC
    ran 2 s of the 2 s of wall time (no downtime)."""
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    resumed = dataclasses.replace(
        paused, kernel={**paused.kernel, "tsc_incarnation": 2}
    )
    later = _timed(2000 * S, 101 * S, 1 * S, 2 * S, 2102 * S, 2)
    assert _platform(paused, resumed, later).passed


def test_time_not_rebased_fails_the_platform_item():
    """The destination wrote its own system time but left the source's
    wallclock: the guest's clock is off by the hosts' boot times."""
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    later = _timed(1000 * S, 102 * S, 9 * S, 9 * S, 2102 * S)
    result = _platform(paused, paused, later)
    assert not result.passed
    assert "-1000.000 s off the destination's wall time" in result.reason
    assert "did not move forward" in result.reason


def test_tsc_incarnation_may_grow_not_go_back():
    paused = _timed(0, 1, 0, 0, 0, incarnation=5)
    grown = _timed(0, 1, 0, 0, 0, incarnation=6)
    back = _timed(0, 1, 0, 0, 0, incarnation=4)
    assert _platform(paused, grown, None).passed
    result = _platform(paused, back, None)
    assert "incarnation went back from 5 to 4" in result.reason


def test_pvclock_may_jump_forward_by_the_downtime():
    """The guest's TSC stood still during 3 s of downtime (restored from
    its CPU records); the destination's pvclock, rebased on its own
    system time, reads 3 s more than the source's would at the same TSC:
    a jump forward no longer than the wall time that passed."""
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    later = _timed(2000 * S, 104 * S, 1 * S, 1 * S, 2104 * S, 2)
    assert checker._pvclock_across(paused, later) == []
    assert _platform(paused, paused, later).passed


@pytest.mark.parametrize(
    ("stamp", "later", "words"),
    [
        # 0.5 s behind what the source's clock read at the same TSC.
        (
            0,
            _timed(2000 * S, 100 * S + S // 2, 1 * S, 1 * S, 2101 * S),
            "pvclock went back 0.500 s across the migration",
        ),
        # 5 s ahead with 1 s of wall time passed.
        (
            0,
            _timed(2000 * S, 106 * S, 1 * S, 1 * S, 2101 * S),
            "jumped 5.000 s forward across the migration, 1.000 s",
        ),
        # The guest's TSC went back.
        (
            2 * S,
            _timed(2000 * S, 101 * S, 1 * S, 1 * S, 2101 * S),
            "TSC went back across the migration",
        ),
    ],
)
def test_pvclock_across_the_migration_finds_a_wrong_rebase(
    stamp, later, words
):
    paused = _timed(1000 * S, 1100 * S, stamp, stamp, 2100 * S)
    problems = checker._pvclock_across(paused, later)
    assert any(words in p for p in problems), problems


def test_pvclock_mid_update_is_reported():
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    later = _timed(2000 * S, 101 * S, 1 * S, 1 * S, 2101 * S)
    later.kernel["vcpus"][0]["pvclock_version"] = 7
    problems = checker._pvclock_across(paused, later)
    assert problems == [
        "vcpu 0's time info on the destination is mid-update (version 7 odd)"
    ]


def _view(**changes) -> checker.DeviceView:
    ring = checker.SharedRing(
        ref=8, gfn=RING_GFN, req_prod=10, rsp_prod=8, mapped_by=0
    )
    fields = dict(
        kind="vbd",
        devid=51712,
        frontend_path=FE,
        backend_path=BE,
        backend_domid=0,
        frontend_state=4,
        backend_state=4,
        ports=((7, 0),),
        rings=(("ring", ring),),
    )
    fields.update(changes)
    return checker.DeviceView(**fields)


def _devices(a, b, later=None):
    paused = guest_state(**{Item.PV_DEVICES: (a,)})
    resumed = guest_state(**{Item.PV_DEVICES: (b,)})
    return checker.check(paused, resumed).results[Item.PV_DEVICES]


def test_observed_devices_pass_when_nothing_moved():
    assert _devices(_view(), _view()).passed


@pytest.mark.parametrize(
    ("resumed", "words"),
    [
        (
            _view(ports=((7, None),)),
            "vbd/51712: port 7 not bound to the backend's dom0",
        ),
        (
            _view(ports=((7, 3),)),
            "port 7 not bound to the backend's dom0 (bound to dom3)",
        ),
        (
            _view(
                rings=(("ring", checker.SharedRing(8, RING_GFN, 10, 8, None)),)
            ),
            "ring ring (grant ref 8) not mapped by the backend's dom0",
        ),
        (
            _view(
                rings=(("ring", checker.SharedRing(8, RING_GFN, 10, 10, 0)),)
            ),
            "ring ring indices (req_prod, rsp_prod) moved from (10, 8) to "
            "(10, 10) before the guest ran",
        ),
        (
            _view(rings=(("ring", checker.SharedRing(9, 0x300, 10, 8, 0)),)),
            "ring ring moved from grant ref 8",
        ),
        (_view(backend_state=5), "backend state changed from 4 to 5"),
    ],
)
def test_observed_devices_fail_by_name(resumed, words):
    result = _devices(_view(), resumed)
    assert not result.passed
    assert words in result.reason, result.reason


def test_observed_rings_after_resume():
    paused = guest_state(**{Item.PV_DEVICES: (_view(),)})

    def later(ring):
        return guest_state(
            **{Item.PV_DEVICES: (_view(rings=(("ring", ring),)),)}
        )

    ok = later(checker.SharedRing(8, RING_GFN, 30, 29, 0))
    assert checker._rings_after(paused, ok) == []
    back = later(checker.SharedRing(8, RING_GFN, 5, 5, 0))
    assert "req_prod went back from 10 to 5" in " ".join(
        checker._rings_after(paused, back)
    )
    ahead = later(checker.SharedRing(8, RING_GFN, 12, 13, 0))
    assert "more responses (13) than requests (12)" in " ".join(
        checker._rings_after(paused, ahead)
    )


@pytest.mark.parametrize(
    ("mul", "shift", "ticks", "ns"),
    [
        # Xen's set_time_scale() for a 3 GHz TSC: shift -1, mul_frac
        # 2^32 * 1e9 / 1.5e9; one second of ticks is 1e9 - 1 ns.
        (2863311530, -1, 3_000_000_000, 999_999_999),
        # For 800 MHz: shift +1, mul_frac 2^32 * 1e9 / 1.6e9, exact.
        (2684354560, 1, 800_000_000, 1_000_000_000),
        # A TSC read before the stamp: the delta is signed.
        (2863311530, -1, -3_000_000_000, -999_999_999),
    ],
)
def test_pvclock_scales_as_xen_does(mul, shift, ticks, ns):
    stamp = 10**12
    kernel = {
        "wallclock_ns": 1000 * S,
        "vcpus": (
            {
                "system_time": 5 * S,
                "tsc_timestamp": stamp,
                "tsc_to_system_mul": mul,
                "tsc_shift": shift,
            },
        ),
    }
    got = checker._pvclock_time(kernel, 0, stamp + ticks)
    assert got == 1005 * S + ns


def test_time_info_the_destination_did_not_write_fails():
    """The source kept time info; the destination left system_time 0:
    the guest's clock would read the wallclock alone."""
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    later = _timed(2000 * S, 0, 1 * S, 1 * S, 2101 * S, 2)
    problems = checker._pvclock_across(paused, later)
    assert problems == [
        "vcpu 0's time info was not written on the destination "
        f"(system_time 0, {1100 * S} on the source)"
    ]
    # A host that keeps no time info on either side is not judged.
    none = _timed(1000 * S, 0, 0, 0, 2100 * S)
    assert checker._pvclock_across(none, later) == []


def test_time_read_mid_update_is_reported():
    paused = _timed(1000 * S, 1100 * S, 0, 0, 2100 * S)
    later = _timed(2000 * S, 101 * S, 1 * S, 1 * S, 2101 * S)
    later.kernel["wc_version"] = 9
    later.kernel["vcpus"][0]["pvclock_stable"] = False
    problems = checker._pvclock_across(paused, later)
    assert (
        "the wallclock on the destination is mid-update (wc_version 9 "
        "odd)" in problems
    )
    assert any("never read the same twice" in p for p in problems), problems


# -- real Xen's HVM records: fields driven by time -------------------------

KHZ = 2_000_000  # a 2 GHz TSC


def _cpu(tsc, rax=0):
    raw = bytearray(checker.HVM_CPU_SIZE)
    struct.pack_into("<Q", raw, 8, rax)
    struct.pack_into("<Q", raw, checker.HVM_CPU_TSC, tsc)
    return bytes(raw)


def _rtc(sec, mins=0x30, hour=0x12, reg_a=0x26, reg_c=0, offset=0):
    # BCD, 24-hour: 2026-12-06 12:30:<sec>, Sunday
    cmos = bytes(
        [sec, 0, mins, 0, hour, 0, 1, 0x06, 0x12, 0x26, reg_a, 0x02, reg_c]
    ) + bytes([0x80])
    return cmos + bytes(2) + struct.pack("<q", offset)


def _records(read_ns, **records):
    return GuestState(
        items={
            Item.PLATFORM: {
                **records,
                "tsc": (0, KHZ, 0),
                checker.PLATFORM_READ_NS: read_ns,
            }
        }
    )


def _judge(a, b):
    return checker.check(a, b).results[Item.PLATFORM]


def test_platform_time_fields_moving_with_the_wall_time_pass():
    """Real Xen computes the TSC, PM timer, RTC and HPET counter when
    asked: between snapshots 2 s apart they move, by no more than 2 s."""
    hpet = bytearray(checker.HVM_HPET_SIZE)
    struct.pack_into("<Q", hpet, 0, 10_000_000 << 32)  # 10 ns a tick
    hpet_b = bytearray(hpet)
    struct.pack_into("<Q", hpet_b, checker.HVM_HPET_MC64, 150_000_000)
    a = _records(
        (10 * S, 10 * S + 1000),
        **{
            "CPU:0": _cpu(1_000),
            "PMTIMER:0": struct.pack("<IHH", 0xFFFF_FF00, 0, 1),
            "RTC:0": _rtc(0x58),
            "HPET:0": bytes(hpet),
        },
    )
    b = _records(
        (12 * S, 12 * S + 1000),
        **{
            "CPU:0": _cpu(1_000 + 4 * 10**9),
            # wrapped, with the carry's status bit set
            "PMTIMER:0": struct.pack("<IHH", 5_000_000, 1, 1),
            "RTC:0": _rtc(0x00, mins=0x31, reg_a=0xA6, reg_c=0x10),
            "HPET:0": bytes(hpet_b),
        },
    )
    result = _judge(a, b)
    assert result.passed, result.reason


@pytest.mark.parametrize(
    ("record", "before", "after", "words"),
    [
        ("CPU:0", _cpu(10), _cpu(20, rax=1), "changed outside its TSC"),
        ("CPU:0", _cpu(10**9), _cpu(10), "TSC went back"),
        ("CPU:0", _cpu(0), _cpu(6 * 10**9), "more than the 2.250 s"),
        (
            "PMTIMER:0",
            struct.pack("<IHH", 100, 0, 1),
            struct.pack("<IHH", 200, 0, 0),
            "PM1a_EN changed",
        ),
        (
            "PMTIMER:0",
            struct.pack("<IHH", 100, 1, 1),
            struct.pack("<IHH", 200, 0, 1),
            "PM1a_STS changed",
        ),
        (
            "PMTIMER:0",
            struct.pack("<IHH", 100_000_000, 0, 1),
            struct.pack("<IHH", 100, 0, 1),
            "counter went back",
        ),
        ("RTC:0", _rtc(0x10), _rtc(0x10, offset=3), "CMOS octet 16"),
        ("RTC:0", _rtc(0x10), _rtc(0x10, hour=0x13), "moved 3600 s"),
        ("RTC:0", _rtc(0x10), _rtc(0x05), "went back by 5 s"),
        ("RTC:0", _rtc(0x10, reg_c=0x10), _rtc(0x11), "register C lost"),
        (
            "ISA_IRQ:0",
            bytes(8),
            struct.pack("<Q", 1 << 1),
            "ISA IRQ 1 line changed",
        ),
        (
            "PIT:0",
            bytes(56),
            bytes(9) + b"\x01" + bytes(46),
            "channel 0 read_state changed from 0 to 1",
        ),
    ],
)
def test_platform_record_changed_beyond_time_fails(
    record, before, after, words
):
    a = _records((10 * S, 10 * S), **{record: before})
    b = _records((12 * S, 12 * S), **{record: after})
    result = _judge(a, b)
    assert not result.passed
    assert words in result.reason, result.reason


def test_platform_without_read_times_compares_records_byte_for_byte():
    """A host whose platform item carries no read times (the simulated
    host's): nothing bounds time, so a moved TSC is a difference."""
    a = GuestState(items={Item.PLATFORM: {"CPU:0": _cpu(1)}})
    b = GuestState(items={Item.PLATFORM: {"CPU:0": _cpu(2)}})
    assert "platform record CPU:0 changed" in _judge(a, b).reason
    c = GuestState(
        items={
            Item.PLATFORM: {
                "CPU:0": _cpu(1),
                checker.PLATFORM_READ_NS: (0, 0),
            }
        }
    )
    assert _judge(a, c).passed


def test_platform_timer_lines_and_tsc_info_follow_time():
    a = _records((10 * S, 10 * S), **{"ISA_IRQ:0": bytes(8)})
    b = _records(
        (12 * S, 12 * S), **{"ISA_IRQ:0": struct.pack("<Q", 1 | 1 << 8)}
    )
    a.items[Item.PLATFORM]["tsc"] = (0, KHZ, 5 * S)
    b.items[Item.PLATFORM]["tsc"] = (0, KHZ, 7 * S)
    assert _judge(a, b).passed
    b.items[Item.PLATFORM]["tsc"] = (0, KHZ, 4 * S)
    assert "TSC elapsed ns went back" in _judge(a, b).reason
    b.items[Item.PLATFORM]["tsc"] = (1, KHZ, 6 * S)
    assert "TSC mode changed from 0 to 1" in _judge(a, b).reason
    b.items[Item.PLATFORM]["tsc"] = (0, KHZ, 9 * S)
    assert "more than the 2.250 s" in _judge(a, b).reason
