"""The patched domctls as the driver lays them out and reads them back.

``FakeXen`` stands in for libxencall and the patched hypervisor: it reads
and writes the hypercall buffers with ``struct`` at the offsets of
doc/source/specs/xen-ncm-domctl.rst, not through the driver's ctypes
structures, so a layout mistake in either shows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import struct

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import context
from nova_xen_ncm.host.xen import libs
from nova_xen_ncm.host.xen.context import EventChannel
from nova_xen_ncm.host.xen.context import VcpuState

REC = struct.Struct("<IBBHIIII")  # the 24-octet event channel record


class FakeXen:
    """libxencall plus a hypervisor holding ports and vCPU state."""

    def __init__(self, patched: bool = True) -> None:
        self.patched = patched
        self.buffers: dict[int, ctypes.Array] = {}
        self.ports: dict[int, dict[int, tuple]] = {0: {}, 7: {}}
        self.vcpus: dict[tuple[int, int], bytes] = {}
        self.paused = {7}
        self.fifo: set[int] = set()
        self.calls: list[tuple[int, int]] = []

    # libxencall
    def xencall_open(self, logger, flags):
        return 0x1000

    def xencall_close(self, handle):
        return 0

    def xencall_alloc_buffer(self, handle, size):
        buf = ctypes.create_string_buffer(size)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xencall_free_buffer(self, handle, address):
        del self.buffers[address]

    def xencall1(self, handle, op, arg):
        assert op == 36  # __HYPERVISOR_domctl
        head = ctypes.string_at(arg, 16)
        cmd, version, domid = struct.unpack_from("<IIH", head)
        assert version == 0x15
        self.calls.append((cmd, domid))
        err = self.domctl(cmd, domid, arg + 16)
        if err:
            ctypes.set_errno(err)
            return -1
        return 0

    # the hypervisor
    def domctl(self, cmd: int, domid: int, u: int) -> int:
        if not self.patched or cmd not in (20035, 20036):
            return errno.ENOSYS
        if domid not in self.ports:
            return errno.ESRCH
        if cmd == 20036:
            return self.vcpu(domid, u)
        op, nr, flags, abi, recs = struct.unpack_from(
            "<IIIIQ", ctypes.string_at(u, 24)
        )
        assert flags == 0 and abi == 0
        ports = self.ports[domid]
        if op == 0:
            ctypes.memmove(u + 12, struct.pack("<I", domid in self.fifo), 4)
            if domid in self.fifo and nr:
                return errno.EOPNOTSUPP
            for i, port in enumerate(sorted(ports)[:nr]):
                ctypes.memmove(
                    recs + i * 24, REC.pack(port, *ports[port], 0), 24
                )
            ctypes.memmove(u + 4, struct.pack("<I", len(ports)), 4)
            return 0
        if domid not in self.paused:
            return errno.EBUSY
        for i in range(nr):
            port, *rest, pad = REC.unpack(ctypes.string_at(recs + i * 24, 24))
            if port in ports and ports[port][:-1] != tuple(rest[:-1]):
                ctypes.memmove(u + 4, struct.pack("<I", i), 4)
                return errno.EBUSY
            ports[port] = tuple(rest)
        ctypes.memmove(u + 4, struct.pack("<I", nr), 4)
        return 0

    def vcpu(self, domid: int, u: int) -> int:
        raw = ctypes.string_at(u, 72)
        op, vcpu, flags = struct.unpack_from("<III", raw)
        if op == 1:
            if domid not in self.paused:
                return errno.EBUSY
            self.vcpus[domid, vcpu] = raw
            return 0
        stored = bytearray(
            self.vcpus.get((domid, vcpu), struct.pack("<II", 0, vcpu))
        ).ljust(72, b"\0")
        # GET answers with what is, and echoes RELATIVE when asked.
        kept = struct.unpack_from("<I", stored, 8)[0] & 0b111
        if flags & 8 and kept & 2:
            kept |= 8
        struct.pack_into("<I", stored, 8, kept)
        ctypes.memmove(u, bytes(stored), 72)
        return 0


@pytest.fixture
def fake(monkeypatch) -> FakeXen:
    xen = FakeXen()
    monkeypatch.setattr(context, "FN", xen)
    return xen


def test_layouts_follow_the_spec() -> None:
    assert ctypes.sizeof(context.Domctl) == 144
    assert context.Domctl.u.offset == 16
    assert ctypes.sizeof(context.EvtchnRecord) == REC.size == 24
    assert context.EvtchnRecord.vcpu.offset == 16
    assert ctypes.sizeof(context.DomctlNcmEvtchn) == 24
    assert context.DomctlNcmEvtchn.recs.offset == 16
    assert ctypes.sizeof(context.DomctlNcmVcpu) == 72
    assert context.DomctlNcmVcpu.vm_assist.offset == 64
    assert context.DomctlNcmVcpu.vcpu_info_gfn.offset == 16
    assert context.DomctlNcmVcpu.time_va.offset == 48
    assert context.DomctlNcmVcpu.upcall_vector.offset == 56


def test_probe_calls_the_hypervisor(fake: FakeXen) -> None:
    with context.DomainContext() as ctx:
        assert ctx.supported() is True
    assert fake.calls == [(20035, 0)]
    fake.patched = False
    with context.DomainContext() as ctx:
        assert ctx.supported() is False
    assert fake.buffers == {}  # every hypercall buffer freed


def test_probe_asks_the_vcpu_domctl_on_its_own(fake, monkeypatch) -> None:
    with context.DomainContext() as ctx:
        assert ctx.vcpu_supported() is True
    monkeypatch.setattr(fake, "domctl", lambda *a: errno.ENOSYS)
    with context.DomainContext() as ctx:
        assert ctx.vcpu_supported() is False
    monkeypatch.setattr(fake, "domctl", lambda *a: errno.EFAULT)
    with (
        context.DomainContext() as ctx,
        pytest.raises(libs.XenCallError, match="ncm_vcpu probe: EFAULT"),
    ):
        ctx.vcpu_supported()


def test_probe_fails_on_an_unexpected_error(fake, monkeypatch) -> None:
    monkeypatch.setattr(fake, "domctl", lambda *a: errno.EFAULT)
    with (
        context.DomainContext() as ctx,
        pytest.raises(libs.XenCallError, match="EFAULT"),
    ):
        ctx.supported()


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES])
def test_a_denying_xsm_policy_reads_as_absent(fake, monkeypatch, err) -> None:
    monkeypatch.setattr(fake, "domctl", lambda *a: err)
    with context.DomainContext() as ctx:
        assert ctx.supported() is False


def test_event_channels_round_trip(fake: FakeXen) -> None:
    chans = [
        EventChannel(port=3, status=context.EVTCHNSTAT_VIRQ, virq=0, vcpu=1),
        EventChannel(
            port=9,
            status=context.EVTCHNSTAT_INTERDOMAIN,
            remote_dom=4,
            remote_port=12,
        ),
        EventChannel(
            port=11,
            status=context.EVTCHNSTAT_UNBOUND,
            remote_dom=0,
            xen_bound=True,
        ),
    ]
    with context.DomainContext() as ctx:
        ctx.set_event_channels(7, chans)
        assert fake.ports[7][9] == (2, 0, 4, 12, 0, 0)
        assert fake.ports[7][11][1] == context.NCM_EVTCHN_F_XEN
        assert ctx.get_event_channels(7) == chans
    assert fake.buffers == {}


def test_fifo_domains_are_counted_not_listed(fake: FakeXen) -> None:
    fake.fifo.add(0)
    with context.DomainContext() as ctx:
        assert ctx.supported() is True
        assert ctx.event_channel_abi(0) == "fifo"
        assert ctx.event_channel_abi(7) == "2-level"
        with pytest.raises(base.NotSupported, match="domain 0 uses the fifo"):
            ctx.get_event_channels(0)


def test_import_error_names_the_port(fake: FakeXen) -> None:
    fake.ports[7][5] = (context.EVTCHNSTAT_IPI, 0, 0, 0, 0, 0)
    clash = EventChannel(port=5, status=context.EVTCHNSTAT_UNBOUND)
    with context.DomainContext() as ctx:
        with pytest.raises(libs.XenCallError, match="port 5 .unbound") as e:
            ctx.set_event_channels(7, [EventChannel(port=4, status=5), clash])
        assert e.value.errno == errno.EBUSY
        fake.paused.clear()
        with pytest.raises(libs.XenCallError, match="not paused"):
            ctx.set_event_channels(7, [EventChannel(port=6, status=5)])
        with pytest.raises(base.DomainNotFound, match="domain 8"):
            ctx.get_event_channels(8)
    fake.patched = False
    with context.DomainContext() as ctx:
        with pytest.raises(libs.XenCallError, match="lacks xen/patches"):
            ctx.get_event_channels(7)


def test_vcpu_state_round_trip(fake: FakeXen) -> None:
    state = VcpuState(
        vcpu=1,
        vcpu_info=(0x80, 0x40),
        upcall_vector=0xF3,
        singleshot_deadline=123456789,
        periodic_period=10_000_000,
        runstate_va=0xFFFF888000123000,
        time_va=0xFFFF888000124040,
    )
    with context.DomainContext() as ctx:
        ctx.set_vcpu_state(7, state)
        raw = fake.vcpus[7, 1]
        assert struct.unpack_from("<IIIIQQQQQB", raw) == (
            1, 1, 3, 0x40, 0x80, 123456789, 10_000_000,
            0xFFFF888000123000, 0xFFFF888000124040, 0xF3,
        )  # fmt: skip
        # GET always reports the domain's vm_assist bits.
        assert ctx.get_vcpu_state(7, 1) == dataclasses.replace(
            state, vm_assist=0
        )
        assert ctx.get_vcpu_state(7, 0) == VcpuState(vcpu=0, vm_assist=0)


def test_vcpu_state_relative_deadline_and_vm_assist(fake: FakeXen) -> None:
    state = VcpuState(
        vcpu=0,
        singleshot_deadline=4_000_000,
        singleshot_relative=True,
        vm_assist=1 << 5,
    )
    with context.DomainContext() as ctx:
        ctx.set_vcpu_state(7, state)
        raw = fake.vcpus[7, 0]
        # SINGLESHOT | RELATIVE | VM_ASSIST, the bits at offset 64.
        assert struct.unpack_from("<I", raw, 8) == (2 | 8 | 16,)
        assert struct.unpack_from("<Q", raw, 64) == (1 << 5,)
        got = ctx.get_vcpu_state(7, 0, relative=True)
        assert got.singleshot_relative and got.singleshot_deadline == 4_000_000
        assert got.vm_assist == 1 << 5
        assert not ctx.get_vcpu_state(7, 0).singleshot_relative


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="port 0 out of range"):
        EventChannel(port=0, status=1)
    with pytest.raises(ValueError, match="unknown status 9"):
        EventChannel(port=1, status=9)
    with pytest.raises(ValueError, match="not within one page"):
        VcpuState(vcpu=0, vcpu_info=(1, 4090))
    with pytest.raises(ValueError, match="upcall vector 0x5"):
        VcpuState(vcpu=0, upcall_vector=5)
    with (
        pytest.raises(ValueError, match="32-bit"),
        pytest.MonkeyPatch().context() as mp,
    ):
        mp.setattr(context, "FN", FakeXen())
        with context.DomainContext() as ctx:
            ctx.set_vcpu_state(7, VcpuState(vcpu=0, compat=True))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"status": 1, "remote_dom": 0x10029}, "remote domain 0x10029"),
        ({"status": 2, "remote_port": -1}, "remote port"),
        ({"status": 5, "vcpu": 1 << 32}, "vCPU 0x100000000"),
        ({"status": 4, "virq": 24}, "VIRQ 0x18"),
    ],
)
def test_fields_that_do_not_fit_are_refused(fields, match) -> None:
    # ctypes would truncate them silently (0x10029 would become domain 41).
    with pytest.raises(ValueError, match=match):
        EventChannel(port=3, **fields)


def test_a_reserved_remote_domain_is_refused_before_the_import(
    fake: FakeXen,
) -> None:
    chan = EventChannel(port=3, status=context.EVTCHNSTAT_UNBOUND,
                        remote_dom=0x7FF2)  # fmt: skip
    with context.DomainContext() as ctx:
        with pytest.raises(ValueError, match="port 3: remote domain 0x7ff2"):
            ctx.set_event_channels(7, [chan])
    assert 3 not in fake.ports[7]
    assert fake.buffers == {}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"vcpu": 1 << 32}, "out of range"),
        ({"vcpu_info": (1 << 64, 0)}, "vcpu_info GFN"),
        ({"singleshot_deadline": 1 << 63}, "singleshot deadline"),
        ({"singleshot_deadline": -1}, "singleshot deadline"),
        ({"periodic_period": 999_999}, "periodic period 999999"),
        # Xen's STIME_DELTA_MAX, which the domctl takes at most.
        ({"periodic_period": (1 << 62) + 1}, "periodic period"),
        (
            {
                "singleshot_deadline": (1 << 62) + 1,
                "singleshot_relative": True,
            },
            "singleshot deadline",
        ),
        ({"runstate_va": 0x0000800000000000}, "runstate_va .* canonical"),
        ({"time_va": 1 << 64}, "time_va"),
    ],
)
def test_vcpu_fields_that_xen_or_ctypes_would_refuse(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        VcpuState(**{"vcpu": 0, **fields})
