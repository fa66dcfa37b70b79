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
