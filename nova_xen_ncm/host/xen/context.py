"""The domain-context domctls of the patched hypervisor (``xen/patches``).

Stock Xen has no way for a toolstack to rebuild another domain's event
channels port for port, nor what a guest registered per vCPU. The
project's patch series adds the experimental ``XEN_DOMCTL_ncm_evtchn``
and ``XEN_DOMCTL_ncm_vcpu`` (layouts:
``doc/source/specs/xen-ncm-domctl.rst``). They are issued here through
libxencall (``xencall_alloc_buffer`` and
``xencall1(__HYPERVISOR_domctl)``), so the installed libxenctrl needs no
rebuild. On stock Xen they fail with ENOSYS, or EOPNOTSUPP when dom0 has
no IOMMU (unknown domctls end in ``iommu_do_domctl()``), which
:meth:`DomainContext.supported` reports as absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno as errnos
import threading
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import libs

FN = libs.Functions()

# xen/xen.h and xen/domctl.h (4.17).
HYPERVISOR_DOMCTL = 36
DOMCTL_INTERFACE_VERSION = 0x15
# The patch series' experimental domctl and its operations.
DOMCTL_NCM_EVTCHN = 20035
NCM_EVTCHN_GET = 0
NCM_EVTCHN_SET = 1
NCM_EVTCHN_F_XEN = 1 << 0
NCM_EVTCHN_ABI_2L = 0
NCM_EVTCHN_ABI_FIFO = 1
ABI_NAMES = {NCM_EVTCHN_ABI_2L: "2-level", NCM_EVTCHN_ABI_FIFO: "fifo"}
DOMCTL_NCM_VCPU = 20036
NCM_VCPU_GET = 0
NCM_VCPU_SET = 1
NCM_VCPU_F_VCPU_INFO = 1 << 0
NCM_VCPU_F_SINGLESHOT = 1 << 1
NCM_VCPU_F_COMPAT = 1 << 2
# singleshot_deadline is the time left (ns), not the host's system time.
NCM_VCPU_F_RELATIVE = 1 << 3
# SET: set the domain's vm_assist bits too.
NCM_VCPU_F_VM_ASSIST = 1 << 4
# sizeof(struct vcpu_info) on x86_64; its offset must keep it in a page.
VCPU_INFO_SIZE = 64
PAGE_SIZE = 4096

# EVTCHNSTAT_* (xen/event_channel.h).
EVTCHNSTAT_CLOSED = 0
EVTCHNSTAT_UNBOUND = 1
EVTCHNSTAT_INTERDOMAIN = 2
EVTCHNSTAT_PIRQ = 3
EVTCHNSTAT_VIRQ = 4
EVTCHNSTAT_IPI = 5
STATUS_NAMES = {
    EVTCHNSTAT_CLOSED: "closed",
    EVTCHNSTAT_UNBOUND: "unbound",
    EVTCHNSTAT_INTERDOMAIN: "interdomain",
    EVTCHNSTAT_PIRQ: "pirq",
    EVTCHNSTAT_VIRQ: "virq",
    EVTCHNSTAT_IPI: "ipi",
}

DOMCTL_NAMES = {
    DOMCTL_NCM_EVTCHN: "XEN_DOMCTL_ncm_evtchn",
    DOMCTL_NCM_VCPU: "XEN_DOMCTL_ncm_vcpu",
}

# A 2-level domain has at most 4096 ports (EVTCHN_2L_NR_CHANNELS).
MAX_PORTS = 4096
# NR_VIRQS (xen.h); DOMID_FIRST_RESERVED (xen.h).
NR_VIRQS = 24
DOMID_FIRST_RESERVED = 0x7FF0
# s_time_t is signed: STIME_MAX; MILLISECS(1), the shortest period.
STIME_MAX = (1 << 63) - 1
MIN_PERIOD_NS = 1_000_000
# STIME_DELTA_MAX (xen/time.h): the longest period and time left the
# patched domctl takes (EINVAL beyond).
STIME_DELTA_MAX = 1 << 62
U32 = 1 << 32
U64 = 1 << 64


def _in_range(what: str, value: int, limit: int) -> None:
    # ctypes truncates an integer that does not fit its field silently:
    # a domid of 0x10029 would bind to domain 41.
    if not 0 <= value < limit:
        raise ValueError(f"{what} {value:#x} out of range (0..{limit - 1:#x})")


def _canonical(va: int) -> bool:
    # x86_64 with 4-level paging: bits 63..47 all equal.
    return (va >> 47) in (0, (1 << 17) - 1)


# What "the hypercall does not exist" looks like on stock Xen: an unknown
# domctl falls through to iommu_do_domctl(), which answers EOPNOTSUPP
# for a domain without an IOMMU and ENOSYS otherwise.
ABSENT = (errnos.ENOSYS, errnos.EOPNOTSUPP)
# What an XSM policy that does not grant the experimental domctl answers:
# present or not, it cannot be used.
DENIED = (errnos.EPERM, errnos.EACCES)


class EvtchnRecord(ctypes.Structure):
    """struct xen_domctl_ncm_evtchn_rec: 24 octets."""

    _fields_ = [
        ("port", ctypes.c_uint32),
        ("status", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("remote_dom", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint32),
        ("virq", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class DomctlNcmEvtchn(ctypes.Structure):
    """struct xen_domctl_ncm_evtchn; ``recs`` is a 64-bit guest handle."""

    _fields_ = [
        ("op", ctypes.c_uint32),
        ("nr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("abi", ctypes.c_uint32),
        ("recs", ctypes.c_uint64),
    ]


class DomctlNcmVcpu(ctypes.Structure):
    """struct xen_domctl_ncm_vcpu (x86): 72 octets."""

    _fields_ = [
        ("op", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vcpu_info_offset", ctypes.c_uint32),
        ("vcpu_info_gfn", ctypes.c_uint64),
        ("singleshot_deadline", ctypes.c_uint64),
        ("periodic_period", ctypes.c_uint64),
        ("runstate_va", ctypes.c_uint64),
        ("time_va", ctypes.c_uint64),
        ("upcall_vector", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
        ("vm_assist", ctypes.c_uint64),
    ]


class DomctlUnion(ctypes.Union):
    _fields_ = [
        ("ncm_evtchn", DomctlNcmEvtchn),
        ("ncm_vcpu", DomctlNcmVcpu),
        ("pad", ctypes.c_uint8 * 128),
        # uint64_aligned_t members align the union to 8.
        ("align", ctypes.c_uint64),
    ]


class Domctl(ctypes.Structure):
    """struct xen_domctl (xen/domctl.h): 144 octets."""

    _fields_ = [
        ("cmd", ctypes.c_uint32),
        ("interface_version", ctypes.c_uint32),
        ("domain", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16 * 3),
        ("u", DomctlUnion),
    ]


@dataclasses.dataclass(frozen=True)
class EventChannel:
    """One bound port of a domain, as the patched hypervisor reports it.

    ``remote_dom``/``remote_port`` bind unbound and interdomain ports,
    ``virq`` is the VIRQ (or PIRQ) number, ``vcpu`` the vCPU notified;
    ``xen_bound`` marks a port Xen consumes itself (an ioreq server's).
    """

    port: int
    status: int
    vcpu: int = 0
    remote_dom: int = 0
    remote_port: int = 0
    virq: int = 0
    xen_bound: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < MAX_PORTS:
            raise ValueError(f"event channel port {self.port} out of range")
        if self.status not in STATUS_NAMES:
            raise ValueError(f"port {self.port}: unknown status {self.status}")
        where = f"port {self.port}:"
        _in_range(f"{where} vCPU", self.vcpu, U32)
        _in_range(f"{where} remote port", self.remote_port, U32)
        _in_range(f"{where} VIRQ", self.virq, U32)
        _in_range(f"{where} remote domain", self.remote_dom, 1 << 16)
        if self.status == EVTCHNSTAT_VIRQ:
            _in_range(f"{where} VIRQ", self.virq, NR_VIRQS)

    @property
    def status_name(self) -> str:
        return STATUS_NAMES[self.status]

    def to_record(self) -> EvtchnRecord:
        # A guest may name a reserved domid in its own unbound port; Xen
        # refuses to import it (EINVAL), so say which port before asking.
        if (
            self.status in (EVTCHNSTAT_UNBOUND, EVTCHNSTAT_INTERDOMAIN)
            and self.remote_dom >= DOMID_FIRST_RESERVED
        ):
            raise ValueError(
                f"port {self.port}: remote domain {self.remote_dom:#x} is "
                "reserved and cannot be imported"
            )
        return EvtchnRecord(
            port=self.port,
            status=self.status,
            flags=NCM_EVTCHN_F_XEN if self.xen_bound else 0,
            remote_dom=self.remote_dom,
            remote_port=self.remote_port,
            virq=self.virq,
            vcpu=self.vcpu,
        )

    @classmethod
    def from_record(cls, rec: EvtchnRecord) -> EventChannel:
        return cls(
            port=rec.port,
            status=rec.status,
            vcpu=rec.vcpu,
            remote_dom=rec.remote_dom,
            remote_port=rec.remote_port,
            virq=rec.virq,
            xen_bound=bool(rec.flags & NCM_EVTCHN_F_XEN),
        )


@dataclasses.dataclass(frozen=True)
class VcpuState:
    """What a guest registered for one vCPU, beyond its HVM context.

    ``vcpu_info`` is (GFN, offset) when the guest placed its vcpu_info
    (VCPUOP_register_vcpu_info), else None (it lives in shared_info).
    ``singleshot_deadline`` is the armed singleshot timer's deadline in
    the host's Xen system time (ns), else None; ``periodic_period`` the
    periodic timer's period (ns, 0 stopped); ``runstate_va`` and
    ``time_va`` the guest linear addresses of the runstate and time
    areas (0 none); ``upcall_vector`` the per-vCPU upcall vector (0 none).
    ``compat`` (export only) marks a 32-bit guest, which cannot be put
    back. With ``singleshot_relative`` the deadline is the time left
    (ns) instead, which another host can take. ``vm_assist`` is the
    domain's HYPERVISOR_vm_assist bits (the same for every vCPU; None on
    import leaves them as they are).
    """

    vcpu: int
    vcpu_info: tuple[int, int] | None = None
    upcall_vector: int = 0
    singleshot_deadline: int | None = None
    periodic_period: int = 0
    runstate_va: int = 0
    time_va: int = 0
    compat: bool = False
    singleshot_relative: bool = False
    vm_assist: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.vcpu < U32:
            raise ValueError(f"vCPU {self.vcpu} out of range")
        where = f"vCPU {self.vcpu}:"
        if self.vcpu_info is not None:
            gfn, offset = self.vcpu_info
            _in_range(f"{where} vcpu_info GFN", gfn, U64)
            if not 0 <= offset <= PAGE_SIZE - VCPU_INFO_SIZE:
                raise ValueError(
                    f"vCPU {self.vcpu}: vcpu_info at GFN {gfn:#x} offset "
                    f"{offset:#x} is not within one page"
                )
        if self.upcall_vector and not 0x10 <= self.upcall_vector <= 0xFF:
            raise ValueError(
                f"vCPU {self.vcpu}: upcall vector {self.upcall_vector:#x} "
                "is not 0 or 0x10-0xff"
            )
        if self.singleshot_deadline is not None:
            _in_range(
                f"{where} singleshot deadline",
                self.singleshot_deadline,
                (STIME_DELTA_MAX if self.singleshot_relative else STIME_MAX)
                + 1,
            )
        if self.periodic_period and not (
            MIN_PERIOD_NS <= self.periodic_period <= STIME_DELTA_MAX
        ):
            raise ValueError(
                f"{where} periodic period {self.periodic_period} ns is not "
                f"0 or {MIN_PERIOD_NS}..{STIME_DELTA_MAX}"
            )
        if self.vm_assist is not None:
            _in_range(f"{where} vm_assist", self.vm_assist, U64)
        for name in ("runstate_va", "time_va"):
            va = getattr(self, name)
            _in_range(f"{where} {name}", va, U64)
            if not _canonical(va):
                raise ValueError(
                    f"{where} {name} {va:#x} is not a canonical address"
                )

    def fill(self, op: DomctlNcmVcpu) -> None:
        op.vcpu = self.vcpu
        op.flags = 0
        if self.vcpu_info is not None:
            op.flags |= NCM_VCPU_F_VCPU_INFO
            op.vcpu_info_gfn, op.vcpu_info_offset = self.vcpu_info
        if self.singleshot_deadline is not None:
            op.flags |= NCM_VCPU_F_SINGLESHOT
            op.singleshot_deadline = self.singleshot_deadline
        if self.singleshot_relative:
            op.flags |= NCM_VCPU_F_RELATIVE
        if self.vm_assist is not None:
            op.flags |= NCM_VCPU_F_VM_ASSIST
            op.vm_assist = self.vm_assist
        op.periodic_period = self.periodic_period
        op.runstate_va = self.runstate_va
        op.time_va = self.time_va
        op.upcall_vector = self.upcall_vector

    @classmethod
    def from_domctl(cls, op: DomctlNcmVcpu) -> VcpuState:
        return cls(
            vcpu=op.vcpu,
            vcpu_info=(op.vcpu_info_gfn, op.vcpu_info_offset)
            if op.flags & NCM_VCPU_F_VCPU_INFO
            else None,
            upcall_vector=op.upcall_vector,
            singleshot_deadline=op.singleshot_deadline
            if op.flags & NCM_VCPU_F_SINGLESHOT
            else None,
            periodic_period=op.periodic_period,
            runstate_va=op.runstate_va,
            time_va=op.time_va,
            compat=bool(op.flags & NCM_VCPU_F_COMPAT),
            singleshot_relative=bool(op.flags & NCM_VCPU_F_RELATIVE),
            vm_assist=op.vm_assist,
        )


class DomainContext:
    """A libxencall handle issuing the patched hypervisor's domctls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle = libs.check_ptr("xencall_open", FN.xencall_open(None, 0))
        self._ctl_buf = self._alloc(ctypes.sizeof(Domctl))

    def close(self) -> None:
        with self._lock:
            if self._handle:
                FN.xencall_free_buffer(self._handle, self._ctl_buf)
                FN.xencall_close(self._handle)
                self._handle = None

    def __enter__(self) -> DomainContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _alloc(self, size: int) -> int:
        # Hypercall buffers: locked pages Xen can copy to and from.
        return libs.check_ptr(
            "xencall_alloc_buffer", FN.xencall_alloc_buffer(self._handle, size)
        )

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[int]:
        """A hypercall buffer of ``size`` octets (its address), for the
        guest handles of other hypercalls made by this process."""
        with self._lock:
            if self._handle is None:
                raise libs.XenCallError("handle closed", call="xencall1")
            buf = self._alloc(size)
        try:
            yield buf
        finally:
            with self._lock:
                if self._handle is not None:
                    FN.xencall_free_buffer(self._handle, buf)

    def _domctl(self, cmd: int, domid: int) -> tuple[Domctl, Any]:
        """A zeroed struct xen_domctl in the hypercall buffer, and the
        call that issues it (returning the errno, 0 on success)."""
        if self._handle is None:
            raise libs.XenCallError("handle closed", call="xencall1")
        ctypes.memset(self._ctl_buf, 0, ctypes.sizeof(Domctl))
        ctl = Domctl.from_address(self._ctl_buf)
        ctl.cmd = cmd
        ctl.interface_version = DOMCTL_INTERFACE_VERSION
        ctl.domain = domid

        def issue() -> int:
            ctypes.set_errno(0)
            rc = FN.xencall1(self._handle, HYPERVISOR_DOMCTL, self._ctl_buf)
            return ctypes.get_errno() if rc < 0 else 0

        return ctl, issue

    def _evtchn(
        self, domid: int, op: int, nr: int, recs: int
    ) -> tuple[int, int, int]:
        """Issue XEN_DOMCTL_ncm_evtchn; (errno or 0, nr and abi it
        returned)."""
        ctl, issue = self._domctl(DOMCTL_NCM_EVTCHN, domid)
        ctl.u.ncm_evtchn.op = op
        ctl.u.ncm_evtchn.nr = nr
        ctl.u.ncm_evtchn.recs = recs
        err = issue()
        return err, ctl.u.ncm_evtchn.nr, ctl.u.ncm_evtchn.abi

    def event_channel_abi(self, domid: int) -> str:
        """``"2-level"`` or ``"fifo"``: the ABI ``domid`` uses. Only
        2-level ports can be exported, so a FIFO guest is refused at
        setup from this answer."""
        with self._lock:
            err, _, abi = self._evtchn(domid, NCM_EVTCHN_GET, 0, 0)
        self._raise(err, domid, "count event channels")
        return ABI_NAMES.get(abi, f"unknown ABI {abi}")

    def get_vcpu_state(
        self, domid: int, vcpu: int, *, relative: bool = False
    ) -> VcpuState:
        """What the guest registered for ``vcpu`` (XEN_DOMCTL_ncm_vcpu);
        with ``relative`` the singleshot deadline as the time left."""
        with self._lock:
            ctl, issue = self._domctl(DOMCTL_NCM_VCPU, domid)
            ctl.u.ncm_vcpu.op = NCM_VCPU_GET
            ctl.u.ncm_vcpu.vcpu = vcpu
            ctl.u.ncm_vcpu.flags = NCM_VCPU_F_RELATIVE if relative else 0
            err = issue()
            self._raise(err, domid, f"export vCPU {vcpu}", DOMCTL_NCM_VCPU)
            return VcpuState.from_domctl(ctl.u.ncm_vcpu)

    def set_vcpu_state(self, domid: int, state: VcpuState) -> None:
        """Put ``state`` back into the paused domain ``domid``; its
        vcpu_info page is left as it is (it holds the guest's copy)."""
        if state.compat:
            raise ValueError(
                f"vCPU {state.vcpu}: a 32-bit guest's state cannot be "
                "put back (XEN_DOMCTL_ncm_vcpu refuses compat guests)"
            )
        with self._lock:
            ctl, issue = self._domctl(DOMCTL_NCM_VCPU, domid)
            ctl.u.ncm_vcpu.op = NCM_VCPU_SET
            state.fill(ctl.u.ncm_vcpu)
            err = issue()
            self._raise(
                err, domid, f"import vCPU {state.vcpu}", DOMCTL_NCM_VCPU
            )

    def supported(self) -> bool:
        """Whether this hypervisor has XEN_DOMCTL_ncm_evtchn and lets this
        domain use it: asked by counting dom0's own ports (no buffer,
        whatever their ABI), not looked up."""
        with self._lock:
            err, _, _ = self._evtchn(0, NCM_EVTCHN_GET, 0, 0)
        if err in ABSENT or err in DENIED:
            return False
        if err:
            name = errnos.errorcode.get(err, str(err))
            raise libs.XenCallError(
                f"XEN_DOMCTL_ncm_evtchn probe: {name}",
                call="xencall1",
                errno=err,
            )
        return True

    def vcpu_supported(self) -> bool:
        """Whether this hypervisor has XEN_DOMCTL_ncm_vcpu and lets this
        domain use it: asked by reading dom0's vCPU 0, like
        :meth:`supported` for XEN_DOMCTL_ncm_evtchn."""
        with self._lock:
            ctl, issue = self._domctl(DOMCTL_NCM_VCPU, 0)
            ctl.u.ncm_vcpu.op = NCM_VCPU_GET
            err = issue()
        if err in ABSENT or err in DENIED:
            return False
        if err:
            name = errnos.errorcode.get(err, str(err))
            raise libs.XenCallError(
                f"XEN_DOMCTL_ncm_vcpu probe: {name}",
                call="xencall1",
                errno=err,
            )
        return True

    def get_event_channels(self, domid: int) -> list[EventChannel]:
        """Every bound port of ``domid``, in port order."""
        with self._lock:
            err, count, abi = self._evtchn(domid, NCM_EVTCHN_GET, 0, 0)
            self._raise(err, domid, "count event channels")
            if abi != NCM_EVTCHN_ABI_2L:
                raise base.NotSupported(
                    f"domain {domid} uses the "
                    f"{ABI_NAMES.get(abi, abi)} event channel ABI; only "
                    "2-level ports can be exported",
                    call="XEN_DOMCTL_ncm_evtchn",
                )
            # Room for ports bound meanwhile; a paused domain has none.
            room = min(count + 16, MAX_PORTS)
            size = room * ctypes.sizeof(EvtchnRecord)
            buf = self._alloc(size)
            try:
                err, count, _ = self._evtchn(domid, NCM_EVTCHN_GET, room, buf)
                self._raise(err, domid, "export event channels")
                if count > room:
                    raise libs.XenCallError(
                        f"domain {domid}: {count} event channels, more than "
                        f"the {room} just counted (is it running?)",
                        call="XEN_DOMCTL_ncm_evtchn",
                    )
                recs = (EvtchnRecord * count).from_address(buf)
                return [EventChannel.from_record(r) for r in recs]
            finally:
                FN.xencall_free_buffer(self._handle, buf)

    def set_event_channels(
        self, domid: int, channels: Iterable[EventChannel]
    ) -> None:
        """Bind ``channels`` in the paused domain ``domid``, port for port."""
        chans = list(channels)
        if not chans:
            return
        if len(chans) > MAX_PORTS:
            raise ValueError(
                f"{len(chans)} event channels: at most {MAX_PORTS}"
            )
        with self._lock:
            size = len(chans) * ctypes.sizeof(EvtchnRecord)
            buf = self._alloc(size)
            try:
                recs = (EvtchnRecord * len(chans)).from_address(buf)
                for i, chan in enumerate(chans):
                    recs[i] = chan.to_record()
                err, done, _ = self._evtchn(
                    domid, NCM_EVTCHN_SET, len(chans), buf
                )
                if err:
                    bad = chans[done] if done < len(chans) else None
                    what = (
                        f"import port {bad.port} ({bad.status_name})"
                        if bad is not None
                        else "import event channels"
                    )
                    self._raise(err, domid, what)
            finally:
                FN.xencall_free_buffer(self._handle, buf)

    @staticmethod
    def _raise(
        err: int, domid: int, what: str, cmd: int = DOMCTL_NCM_EVTCHN
    ) -> None:
        if not err:
            return
        call = DOMCTL_NAMES[cmd]
        if err == errnos.ESRCH and " port " not in what:
            raise base.DomainNotFound(
                f"domain {domid}: {what}: no such domain",
                call=call,
                errno=err,
            )
        name = errnos.errorcode.get(err, str(err))
        hint = ""
        if err == errnos.ESRCH:
            hint = " (the remote domain does not exist)"
        elif err == errnos.ENOSYS:
            hint = " (stock Xen: the hypervisor lacks xen/patches)"
        elif err == errnos.EOPNOTSUPP:
            hint = (
                " (a FIFO or PIRQ port)"
                if cmd == DOMCTL_NCM_EVTCHN
                else " (a 32-bit guest)"
            )
        elif err == errnos.EBUSY:
            hint = (
                " (domain not paused, or port bound otherwise)"
                if cmd == DOMCTL_NCM_EVTCHN
                else " (domain not paused)"
            )
        elif err == errnos.EEXIST:
            hint = " (vcpu_info already placed elsewhere)"
        elif err == errnos.ENOENT:
            hint = " (no such vCPU)"
        raise libs.XenCallError(
            f"domain {domid}: {what}: {name}{hint}", call=call, errno=err
        )
