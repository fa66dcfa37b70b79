"""What of the real host driver needs no hypervisor: domain states and
the HVM context digest."""

from __future__ import annotations

import struct
import types

import pytest

from nova_xen_ncm.host import base
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


class _Xl:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.runs: list[tuple[str, ...]] = []

    def run(self, *args: str) -> str:
        self.runs.append(args)
        if self.fails:
            raise base.HostError("xl failed", call="xl destroy")
        return ""


@pytest.mark.parametrize("xl_fails", [False, True])
def test_a_destroyed_failed_create_leaves_no_page_map(xl_fails: bool) -> None:
    # A domain created again under the same domid must not be taken for
    # the old one, whose pages it does not have.
    xen = object.__new__(host.XenHost)
    xen._populated = {4: [True], 5: [True]}
    xen._pfn_cache = {4: ((0, 1), [0]), 5: ((0, 1), [0])}
    xen._dm_stopped = {4}
    xen._dirty_bufs = {}
    xen._destroyed_at = {}
    xen._xl = _Xl(xl_fails)
    xen._best_effort_destroy(4)
    assert xen._xl.runs == [("destroy", "4")]
    assert list(xen._populated) == [5] and list(xen._pfn_cache) == [5]
    assert xen._dm_stopped == set()


def test_a_domid_destroyed_this_second_is_asked_for_in_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libxl's history has whole seconds: a create in the same second as
    # the destroy is refused as "recently used" even with no delay.
    clock = [100.25]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(host.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(host.time, "sleep", sleep)
    xen = object.__new__(host.XenHost)
    xen._populated, xen._pfn_cache, xen._dirty_bufs = {}, {}, {}
    xen._dm_stopped = set()
    xen._destroyed_at = {}
    xen._xl = _Xl(False)
    xen._best_effort_destroy(4)
    clock[0] = 100.5
    xen._wait_out_destroy_second(4)
    assert int(clock[0]) == 101 and len(slept) == 1
    # Once waited out, or a second later, nothing more.
    xen._wait_out_destroy_second(4)
    xen._best_effort_destroy(5)
    clock[0] += 1.0
    xen._wait_out_destroy_second(5)
    xen._wait_out_destroy_second(6)
    assert len(slept) == 1


def test_shutdown_is_libxl_asking_the_guest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contextlib

    asked: list[tuple] = []
    answer = [0]

    class FakeFN:
        def __getattr__(self, name: str):
            def fn(*args):
                asked.append((name, *args))
                return answer[0]

            return fn

    monkeypatch.setattr(host, "FN", FakeFN())
    xen = object.__new__(host.XenHost)
    xen.domain_info = lambda domid: None
    xen._libxl = lambda: contextlib.nullcontext("ctx")
    xen.shutdown(7)
    # A request, not a destroy: ao_how NULL, libxl returns once written.
    assert asked == [("libxl_domain_shutdown", "ctx", 7, None)]
    answer[0] = host.LIBXL_ERROR_NOPARAVIRT
    with pytest.raises(base.NotSupported, match="no PV control interface"):
        xen.shutdown(7)
    answer[0] = -3
    with pytest.raises(base.HostError, match="error -3"):
        xen.shutdown(7)
    # Nothing here would restart a guest shutting down to reboot.
    asked.clear()
    with pytest.raises(base.NotSupported, match="restarts"):
        xen.shutdown(7, reboot=True)
    assert asked == []


class _LoadFns:
    """Just what XenHost.__init__ opens."""

    def xc_interface_open(self, *args: object) -> int:
        return 1

    def xenforeignmemory_open(self, *args: object) -> int:
        return 2


@pytest.mark.parametrize("value", [None, "60", "0"])
def test_domid_reuse_is_a_start_up_requirement_never_set_by_the_driver(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.host.xen import probe

    if value is None:
        monkeypatch.delenv(host.DOMID_REUSE_ENV, raising=False)
    else:
        monkeypatch.setenv(host.DOMID_REUSE_ENV, value)
    monkeypatch.setattr(host, "FN", _LoadFns())
    facts = probe.HypervisorFacts(
        4, 17, ".5", probe.PHYSCAP_HVM | probe.PHYSCAP_HAP
    )
    monkeypatch.setattr(host.XenHost, "hypervisor_facts", lambda self: facts)
    monkeypatch.setattr(host.XenHost, "_nr_cpus", lambda self: 2)
    monkeypatch.setattr(host.XenHost, "free_memory", lambda self: 1 << 30)
    before = dict(host.os.environ)
    xen = host.XenHost("h", CONF)
    # The process environment is what the service was started with.
    assert dict(host.os.environ) == before
    caps = xen.capabilities()
    if value == "0":
        assert caps.preserve_domid and caps.restore[base.Item.DOMID] is None
    else:
        assert not caps.preserve_domid
        reason = caps.restore[base.Item.DOMID]
        assert f"{host.DOMID_REUSE_ENV}=0" in reason, reason
        # The receiver refuses every guest at SETUP on preserve_domid.
        assert caps.missing(True)[base.Item.DOMID] == reason


def test_a_kernel_missing_on_this_host_is_named_before_xl_runs(
    tmp_path,
) -> None:
    # QEMU would exit deep inside libxl's create: named here instead.
    xen = object.__new__(host.XenHost)
    xen.opts = types.SimpleNamespace(state_dir=str(tmp_path / "state"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    config = base.DomainConfig(
        name="g",
        memory_bytes=256 << 20,
        boot=base.DirectBoot(str(kernel), str(tmp_path / "initrd.gz")),
    )
    with pytest.raises(base.HostError, match="ramdisk .*initrd.gz.* not a"):
        xen._write_config(config)
    (tmp_path / "initrd.gz").write_bytes(b"i")
    written = xen._write_config(config)
    assert f'kernel = "{kernel}"' in open(written).read()
