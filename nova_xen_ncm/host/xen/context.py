"""The domain-context domctls of the patched hypervisor (``xen/patches``).

Stock Xen has no way for a toolstack to rebuild another domain's event
channels port for port. The project's patch series adds the experimental
``XEN_DOMCTL_ncm_evtchn`` (layout: ``doc/source/specs/xen-ncm-domctl.rst``).
It is issued here through libxencall (``xencall_alloc_buffer`` and
``xencall1(__HYPERVISOR_domctl)``), so the installed libxenctrl needs no
rebuild. On stock Xen the domctl fails with ENOSYS, which
:meth:`DomainContext.supported` reports as absent.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errnos
import threading
from collections.abc import Iterable

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

# A 2-level domain has at most 4096 ports (EVTCHN_2L_NR_CHANNELS).
MAX_PORTS = 4096
# What "the hypercall does not exist" looks like: ENOSYS from the domctl
# dispatcher of stock Xen, EOPNOTSUPP from a sub-operation it lacks.
ABSENT = (errnos.ENOSYS, errnos.EOPNOTSUPP)


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
        ("pad", ctypes.c_uint32),
        ("recs", ctypes.c_uint64),
    ]


class DomctlUnion(ctypes.Union):
    _fields_ = [
        ("ncm_evtchn", DomctlNcmEvtchn),
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

    @property
    def status_name(self) -> str:
        return STATUS_NAMES[self.status]

    def to_record(self) -> EvtchnRecord:
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


class DomainContext:
    """A libxencall handle issuing the patched hypervisor's domctls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle = libs.check_ptr("xencall_open", FN.xencall_open(None, 0))
        self._domctl = self._alloc(ctypes.sizeof(Domctl))

    def close(self) -> None:
        with self._lock:
            if self._handle:
                FN.xencall_free_buffer(self._handle, self._domctl)
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

    def _evtchn(
        self, domid: int, op: int, nr: int, recs: int
    ) -> tuple[int, int]:
        """Issue XEN_DOMCTL_ncm_evtchn; (errno or 0, nr it returned)."""
        if self._handle is None:
            raise libs.XenCallError("handle closed", call="xencall1")
        ctl = Domctl.from_address(self._domctl)
        ctypes.memset(self._domctl, 0, ctypes.sizeof(Domctl))
        ctl.cmd = DOMCTL_NCM_EVTCHN
        ctl.interface_version = DOMCTL_INTERFACE_VERSION
        ctl.domain = domid
        ctl.u.ncm_evtchn.op = op
        ctl.u.ncm_evtchn.nr = nr
        ctl.u.ncm_evtchn.recs = recs
        ctypes.set_errno(0)
        rc = FN.xencall1(self._handle, HYPERVISOR_DOMCTL, self._domctl)
        err = ctypes.get_errno() if rc < 0 else 0
        return err, ctl.u.ncm_evtchn.nr

    def supported(self) -> bool:
        """Whether this hypervisor has XEN_DOMCTL_ncm_evtchn: asked by
        counting dom0's own ports (no buffer), not looked up."""
        with self._lock:
            err, _ = self._evtchn(0, NCM_EVTCHN_GET, 0, 0)
        if err in ABSENT:
            return False
        if err:
            name = errnos.errorcode.get(err, str(err))
            raise libs.XenCallError(
                f"XEN_DOMCTL_ncm_evtchn probe: {name}",
                call="xencall1",
                errno=err,
            )
        return True

    def get_event_channels(self, domid: int) -> list[EventChannel]:
        """Every bound port of ``domid``, in port order."""
        with self._lock:
            err, count = self._evtchn(domid, NCM_EVTCHN_GET, 0, 0)
            self._raise(err, domid, "count event channels")
            # Room for ports bound meanwhile; a paused domain has none.
            room = min(count + 16, MAX_PORTS)
            size = room * ctypes.sizeof(EvtchnRecord)
            buf = self._alloc(size)
            try:
                err, count = self._evtchn(domid, NCM_EVTCHN_GET, room, buf)
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
                err, done = self._evtchn(
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
    def _raise(err: int, domid: int, what: str) -> None:
        if not err:
            return
        if err in (errnos.ESRCH, errnos.ENOENT) and "port" not in what:
            raise base.DomainNotFound(
                f"domain {domid}: {what}: no such domain",
                call="XEN_DOMCTL_ncm_evtchn",
                errno=err,
            )
        name = errnos.errorcode.get(err, str(err))
        hint = ""
        if err in ABSENT:
            hint = " (stock Xen, or a FIFO or PIRQ port)"
        elif err == errnos.EBUSY:
            hint = " (domain not paused, or port bound otherwise)"
        raise libs.XenCallError(
            f"domain {domid}: {what}: {name}{hint}",
            call="XEN_DOMCTL_ncm_evtchn",
            errno=err,
        )
