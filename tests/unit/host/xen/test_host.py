"""What of the real host driver needs no hypervisor: domain states and
the HVM context digest."""

from __future__ import annotations

import struct

import pytest

from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.xen import host
from nova_xen_ncm.host.xen import libs


def record(typecode: int, instance: int, body: bytes) -> bytes:
    return struct.pack("<HHI", typecode, instance, len(body)) + body


def context(tsc: int, pmtimer: int, rip: int) -> bytes:
    cpu = bytearray(1032)
    cpu[host.HVM_CPU_TSC_OFFSET : host.HVM_CPU_TSC_OFFSET + 8] = struct.pack(
        "<Q", tsc
    )
    cpu[640:648] = struct.pack("<Q", rip)
    return (
        record(1, 0, bytes(24))
        + record(2, 0, bytes(cpu))
        + record(13, 0, struct.pack("<II", pmtimer, 0))
        + record(0, 0, b"")
    )


def test_time_is_not_state() -> None:
    a = host.normalized_hvm_context(context(100, 7, 0x1000))
    b = host.normalized_hvm_context(context(999, 8, 0x1000))
    assert a == b
    assert [r[:2] for r in a] == [(1, 0), (2, 0), (13, 0), (0, 0)]


def test_state_is_state() -> None:
    a = host.normalized_hvm_context(context(100, 7, 0x1000))
    b = host.normalized_hvm_context(context(100, 7, 0x1004))
    assert a != b


def rtc(seconds: int, alarm: int, offset: int = 0) -> bytes:
    cmos = bytearray(14)
    cmos[0], cmos[1], cmos[11] = seconds, alarm, 0x02
    return bytes(cmos) + bytes(2) + struct.pack("<q", offset)


def platform(isa: bytes, clock: bytes) -> list:
    return host.normalized_hvm_context(
        record(host.HVM_SAVE_ISA_IRQ, 0, isa)
        + record(host.HVM_SAVE_RTC, 0, clock)
        + record(0, 0, b"")
    )


def test_timer_lines_and_the_rtc_clock_are_not_state() -> None:
    # Observed on Xen 4.17: saved at 0x24 s with the PIT's line up,
    # restored at 0x19 s with it down.
    a = platform(bytes([0x01, 0x01]) + bytes(6), rtc(0x24, 0))
    b = platform(bytes(8), rtc(0x19, 0))
    assert a == b


@pytest.mark.parametrize(
    "isa, clock",
    [
        (bytes([0x02]) + bytes(7), rtc(0x24, 0)),  # IRQ 1 (keyboard)
        (bytes(8), rtc(0x24, 0x30)),  # the alarm the guest set
        (bytes(8), rtc(0x24, 0, offset=3600)),  # the guest's clock offset
    ],
)
def test_other_lines_and_rtc_settings_are_state(isa, clock) -> None:
    assert platform(bytes(8), rtc(0x24, 0)) != platform(isa, clock)


@pytest.mark.parametrize(
    "flags, state",
    [
        (0, DomainState.RUNNING),
        (libs.XEN_DOMINF_blocked, DomainState.RUNNING),
        (libs.XEN_DOMINF_paused, DomainState.PAUSED),
        (libs.XEN_DOMINF_dying | libs.XEN_DOMINF_paused, DomainState.DYING),
        (libs.XEN_DOMINF_shutdown, DomainState.SHUTDOWN),
        (libs.XEN_DOMINF_shutdown | 3 << 16, DomainState.CRASHED),
    ],
)
def test_domain_state(flags: int, state: DomainState) -> None:
    assert host._domain_state(flags) is state
