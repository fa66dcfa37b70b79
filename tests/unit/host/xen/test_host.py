"""What of the real host driver needs no hypervisor: domain states and
the HVM context digest."""

from __future__ import annotations

import struct
import types

import numpy as np
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


@pytest.mark.parametrize(
    "flags, reason",
    [
        # Not shut down: Xen's code is SHUTDOWN_CODE_INVALID.
        (0xFFFF << libs.XEN_DOMINF_shutdownshift, None),
        (libs.XEN_DOMINF_paused, None),
        (libs.XEN_DOMINF_shutdown, "poweroff"),
        # An HVM guest's triple fault (HVM_PARAM_TRIPLE_FAULT_REASON).
        (libs.XEN_DOMINF_shutdown | 1 << 16, "reboot"),
        (libs.XEN_DOMINF_shutdown | 2 << 16, "suspend"),
        (libs.XEN_DOMINF_shutdown | 3 << 16, "crash"),
        (libs.XEN_DOMINF_shutdown | 4 << 16, "watchdog"),
        (libs.XEN_DOMINF_shutdown | 5 << 16, "soft_reset"),
        (libs.XEN_DOMINF_shutdown | 9 << 16, "code 9"),
    ],
)
def test_shutdown_reason_is_named(flags: int, reason: str | None) -> None:
    assert host._shutdown_name(flags) == reason


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
    xen._init_bookkeeping()
    xen._populated.update({4: [True], 5: [True]})
    xen._built.update({4: [True], 5: [True]})
    xen._pfn_cache.update({4: ((0, 1), [0]), 5: ((0, 1), [0])})
    xen._dm_stopped.add(4)
    xen._xl = _Xl(xl_fails)
    xen._best_effort_destroy(4)
    assert xen._xl.runs == [("destroy", "4")]
    assert list(xen._populated) == [5] and list(xen._pfn_cache) == [5]
    assert list(xen._built) == [5]
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
    xen._init_bookkeeping()
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
    # Stock Xen carries no device: no source is refused for naming none.
    assert not caps.devices_named_at_setup
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


def _suspending_host(
    monkeypatch: pytest.MonkeyPatch,
    states: list[int],
    hvm: bool = True,
    lost: tuple[str, ...] = (),
    qemu_status: str = "running",
) -> tuple[host.XenHost, list[str]]:
    """A host whose domain 7 reports ``states`` (shutdown flags) one
    getinfo after another, recording the calls made, QMP's included."""
    import contextlib
    import threading

    calls: list[str] = []
    flags = libs.XEN_DOMINF_hvm_guest if hvm else 0

    class FakeFN:
        def __getattr__(self, name: str):
            def fn(*args):
                calls.append(name)
                # libxc's success is 0, libxenstore's true.
                return name.startswith("xs_") and name not in lost

            return fn

    class Session:
        def execute(self, command: str, **kwargs: object) -> object:
            calls.append(f"qmp {command}")
            if command in lost:
                raise base.HostError("no answer", call="qmp")
            if command == "query-status":
                return {"status": qemu_status, "running": False}
            return None

    monkeypatch.setattr(host, "FN", FakeFN())
    monkeypatch.setattr(
        host.qmp, "Qmp", lambda *a: contextlib.nullcontext(Session())
    )
    monkeypatch.setattr(host.os.path, "exists", lambda path: True)
    monkeypatch.setattr(host.time, "sleep", lambda s: None)
    xen = object.__new__(host.XenHost)
    xen._lock = threading.RLock()
    xen._xch = 1
    xen._xsh = 2
    xen._init_bookkeeping()
    xen.opts = types.SimpleNamespace(
        command_timeout=5, qmp_dir="/run/qmp", state_dir="/tmp"
    )
    queue = list(states)

    def raw_info(domid: int, call: str) -> types.SimpleNamespace:
        calls.append("getinfo")
        state = queue.pop(0) if len(queue) > 1 else queue[0]
        return types.SimpleNamespace(flags=flags | state)

    xen._raw_info = raw_info
    return xen, calls


def _shut(reason: int) -> int:
    return libs.XEN_DOMINF_shutdown | reason << libs.XEN_DOMINF_shutdownshift


# What Xen reports of a domain not shut down: SHUTDOWN_CODE_INVALID.
RUNNING = 0xFFFF << libs.XEN_DOMINF_shutdownshift


def test_an_hvm_guest_is_paused_for_a_save_through_a_suspend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Running (a vCPU's I/O request to QEMU outstanding defers the
    # suspend), then suspended: paused, the suspend undone, QEMU stopped.
    xen, calls = _suspending_host(
        monkeypatch, [RUNNING, RUNNING, _shut(libs.SHUTDOWN_suspend)]
    )
    xen.pause_for_save(7)
    assert calls == [
        "getinfo",
        "xc_domain_shutdown",
        "getinfo",
        "getinfo",
        "xc_domain_pause",
        "xc_domain_resume",
        "xs_resume_domain",
        "qmp stop",
    ]
    assert xen._dm_stopped == {7}
    calls.clear()
    xen.unpause(7)
    assert calls == ["qmp cont", "xc_domain_unpause"]


@pytest.mark.parametrize(("timeout", "bound"), [(5, 5), (300, 60)])
def test_a_suspend_that_never_completes_is_cancelled(
    monkeypatch: pytest.MonkeyPatch, timeout: int, bound: int
) -> None:
    xen, calls = _suspending_host(monkeypatch, [RUNNING])
    # No longer than libxl waits for a suspend, whatever QMP may take.
    xen.opts.command_timeout = timeout
    clock = [0.0]

    def monotonic() -> float:
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(host.time, "monotonic", monotonic)
    with pytest.raises(base.HostError, match=f"did not stop within {bound}s"):
        xen.pause_for_save(7)
    # The guest runs on: resumed, never paused, QEMU untouched, and
    # xenstored told the domain is no longer shut down.
    assert calls[-2:] == ["xc_domain_resume", "xs_resume_domain"]
    assert "xc_domain_pause" not in calls and xen._dm_stopped == set()


def test_a_guest_shutting_down_by_itself_is_not_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xen, calls = _suspending_host(monkeypatch, [_shut(0)])
    with pytest.raises(base.HostError, match=r"shut down \(reason 0\)"):
        xen.pause_for_save(7)
    assert "xc_domain_resume" not in calls


def test_a_guest_without_a_device_model_is_paused_plainly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xen, calls = _suspending_host(monkeypatch, [RUNNING], hvm=False)
    xen.pause_for_save(7)
    assert calls == ["getinfo", "xc_domain_pause", "getinfo"]


@pytest.mark.parametrize(
    "state",
    [
        _shut(libs.SHUTDOWN_crash),
        _shut(0),
        RUNNING | libs.XEN_DOMINF_dying,
    ],
)
@pytest.mark.parametrize("paused", [0, libs.XEN_DOMINF_paused])
def test_a_guest_that_stopped_before_a_plain_pause_is_not_saved(
    monkeypatch: pytest.MonkeyPatch, state: int, paused: int
) -> None:
    # Crashed or shut down during a live copy, with no suspend to see
    # it: refused, not migrated dead, and this pause undone.
    xen, calls = _suspending_host(
        monkeypatch, [RUNNING | paused, state | paused], hvm=bool(paused)
    )
    with pytest.raises(base.HostError, match="before its pause"):
        xen.pause_for_save(7)
    assert calls[:3] == ["getinfo", "xc_domain_pause", "getinfo"]
    assert calls[-1] == "xc_domain_unpause"


def test_a_guest_shutdown_xen_took_first_is_not_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The guest's poweroff came first (Xen keeps its reason) and a vCPU
    # still defers it: not yet shut down, never to be resumed.
    reboot = 1 << libs.XEN_DOMINF_shutdownshift
    xen, calls = _suspending_host(monkeypatch, [reboot])
    with pytest.raises(base.HostError, match=r"shut down \(reason 1\)"):
        xen.pause_for_save(7)
    assert "xc_domain_resume" not in calls
    assert "xc_domain_pause" not in calls


def test_a_pause_refused_after_the_suspend_cancels_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xen, calls = _suspending_host(monkeypatch, [_shut(libs.SHUTDOWN_suspend)])

    def pause(domid: int) -> None:
        raise base.HostError("refused", call="xc_domain_pause")

    xen.pause = pause
    with pytest.raises(base.HostError, match="refused"):
        xen.pause_for_save(7)
    assert calls[-2:] == ["xc_domain_resume", "xs_resume_domain"]
    assert xen._dm_stopped == set()


def test_a_qemu_stop_unanswered_is_undone_and_the_guest_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # QEMU may have stopped without answering: it is told to go on, and
    # the guest is unpaused, before the error is raised.
    xen, calls = _suspending_host(
        monkeypatch, [_shut(libs.SHUTDOWN_suspend)], lost=("stop",)
    )
    with pytest.raises(base.HostError, match="no answer"):
        xen.pause_for_save(7)
    assert calls[-4:] == [
        "qmp stop",
        "qmp cont",
        "qmp query-status",
        "xc_domain_unpause",
    ]
    assert xen._dm_stopped == set()


@pytest.mark.parametrize(
    ("status", "cont"), [("paused", True), ("running", False)]
)
def test_a_device_model_another_process_stopped_goes_on_at_unpause(
    monkeypatch: pytest.MonkeyPatch, status: str, cont: bool
) -> None:
    # A service that died in a stop-and-copy left QEMU stopped; the one
    # recovering the guest unpauses it, QEMU too. A QEMU running (a
    # guest paused plainly) is left as it is.
    xen, calls = _suspending_host(monkeypatch, [RUNNING], qemu_status=status)
    xen.unpause(7)
    assert calls == ["qmp query-status"] + (["qmp cont"] if cont else []) + [
        "xc_domain_unpause"
    ]


def test_a_device_model_that_does_not_answer_leaves_the_unpause_to_xen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xen, calls = _suspending_host(
        monkeypatch, [RUNNING], lost=("query-status",)
    )
    xen.unpause(7)
    assert calls == ["qmp query-status", "xc_domain_unpause"]


def test_xenstored_refusing_the_resume_fails_neither_pause_nor_guest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    xen, calls = _suspending_host(
        monkeypatch,
        [_shut(libs.SHUTDOWN_suspend)],
        lost=("xs_resume_domain",),
    )
    xen.pause_for_save(7)
    assert calls[-3:] == ["xc_domain_resume", "xs_resume_domain", "qmp stop"]
    assert xen._dm_stopped == {7}
    assert "still takes domain 7 for shut down" in caplog.text


def test_a_guest_paused_meanwhile_is_paused_plainly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its vCPUs could not run to finish a request: a suspend would only
    # wait out its bound.
    xen, calls = _suspending_host(
        monkeypatch, [RUNNING | libs.XEN_DOMINF_paused]
    )
    xen.pause_for_save(7)
    assert calls == ["getinfo", "xc_domain_pause", "getinfo"]


def test_a_host_whose_backends_attach_again_wants_devices_named_at_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its backends are created from SETUP's device records: a source of
    # an earlier protocol version, which names none, is refused a guest
    # with PV drivers (engine.receiver).
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.host.xen import probe

    monkeypatch.setenv(host.DOMID_REUSE_ENV, "0")
    monkeypatch.setattr(host, "FN", _LoadFns())
    for missing, named in (((), True), ((("vbd", "old"),), False)):
        facts = probe.HypervisorFacts(
            4,
            17,
            ".5",
            probe.PHYSCAP_HVM | probe.PHYSCAP_HAP,
            ncm_evtchn=True,
            ncm_vcpu=True,
            xenstored_migration=True,
            backends_missing=missing,
        )
        monkeypatch.setattr(
            host.XenHost, "hypervisor_facts", lambda self, f=facts: f
        )
        monkeypatch.setattr(host.XenHost, "_nr_cpus", lambda self: 2)
        monkeypatch.setattr(host.XenHost, "free_memory", lambda self: 1 << 30)
        caps = host.XenHost("h", CONF).capabilities()
        assert caps.devices_named_at_setup is named
        assert (caps.restore[base.Item.PV_DEVICES] is None) is named


def test_the_populated_pfns_are_one_read_only_array_while_the_p2m_stands() -> (
    None
):
    xen = object.__new__(host.XenHost)
    xen._pfn_cache = {}
    pages = [3]
    probed = []

    def populated_mask(domid: int) -> np.ndarray:
        probed.append(domid)
        return np.arange(8) < pages[0]

    xen._raw_info = lambda domid, call: types.SimpleNamespace(
        tot_pages=pages[0]
    )
    xen._max_gpfn = lambda domid: 7
    xen._populated_mask = populated_mask
    first = xen.populated_pfns(4)
    assert first.dtype == np.uint64 and first.tolist() == [0, 1, 2]
    # The same array (a migration's rounds compare nothing then), which
    # no caller can change under the others.
    assert xen.populated_pfns(4) is first and probed == [4]
    with pytest.raises(ValueError):
        first[0] = 9
    pages[0] = 4
    assert xen.populated_pfns(4).tolist() == [0, 1, 2, 3]
    assert probed == [4, 4]
