"""Event channels with Xen's semantics (2-level ABI).

Follows xen/include/public/event_channel.h (the EVTCHNOP_* operations and
their errors) and xen/common/event_channel.c / event_2l.c: ports are
allocated lowest-free from 1 (port 0 is reserved), a closed port's
pending bit is cleared, closing one end of an interdomain channel leaves
the other end unbound to the closer, binding an interdomain channel sets
the new local port pending (notifications may have been lost on the
unbound port), and the 2-level pending/mask words live in the shared info
page with the per-vCPU selector and ``evtchn_upcall_pending`` in
``vcpu_info``, a domain's ports go up to its max_evtchn_port (libxl's
default 1023 for a guest). The FIFO ABI is not implemented (the host's
capabilities say so, base.GuestFeature).
"""

from __future__ import annotations

import dataclasses
import errno as errnos
from collections.abc import Callable
from collections.abc import Iterable

import numpy as np

from nova_xen_ncm.host.base import DOMID_SELF
from nova_xen_ncm.host.base import EventChannel
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import HostError

# 2-level: BITS_PER_EVTCHN_WORD squared (64-bit guests).
NR_2L_PORTS = 64 * 64
# libxl's default max_event_channels for a guest (the highest port).
DEFAULT_MAX_EVTCHN_PORT = 1023
# Ports come in buckets; a free port in an allocated bucket is valid
# (port_is_valid), so it can be unmasked.
EVTCHNS_PER_BUCKET = 64
NR_VIRQS = 24
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_XENOPROF = 7
VIRQ_XENPMU = 13
_PER_VCPU_VIRQS = frozenset(
    {VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU}
)

# Byte offsets in struct shared_info (xen.h, x86_64) and vcpu_info.
SHINFO_PENDING = 2048
SHINFO_MASK = 2560
VCPU_INFO_SIZE = 64
XEN_LEGACY_MAX_VCPUS = 32
VI_UPCALL_PENDING = 0
VI_UPCALL_MASK = 1
VI_PENDING_SEL = 8


class HypercallError(HostError):
    """A hypercall failed with a negative errno, as Xen returns it."""

    def __init__(self, call: str, err: int, message: str) -> None:
        super().__init__(message, call=call, errno=err)


def virq_is_global(virq: int) -> bool:
    return virq not in _PER_VCPU_VIRQS


@dataclasses.dataclass
class Channel:
    type: EvtchnType
    vcpu: int = 0
    remote_domid: int = 0
    remote_port: int = 0
    virq: int = 0
    pirq: int = 0


class PendingBits:
    """Where a domain's pending/mask bits live (the 2-level ABI).

    ``words`` is the shared info page as uint64 (pending words at
    SHINFO_PENDING, mask words at SHINFO_MASK); ``vcpu_info(v)`` returns
    the uint8 view of vCPU v's vcpu_info and marks its page dirty when it
    is guest RAM. Callers hold the domain's memory lock.
    """

    def __init__(
        self,
        shared_info: np.ndarray,
        vcpu_info: Callable[[int], np.ndarray],
    ) -> None:
        self.words = shared_info.view(np.uint64)
        self.vcpu_info = vcpu_info

    def _bit(self, base: int, port: int) -> tuple[int, np.uint64]:
        return base // 8 + port // 64, np.uint64(1 << (port % 64))

    def test(self, base: int, port: int) -> bool:
        i, bit = self._bit(base, port)
        return bool(self.words[i] & bit)

    def test_and_set(self, base: int, port: int) -> bool:
        i, bit = self._bit(base, port)
        was = bool(self.words[i] & bit)
        self.words[i] |= bit
        return was

    def test_and_clear(self, base: int, port: int) -> bool:
        i, bit = self._bit(base, port)
        was = bool(self.words[i] & bit)
        self.words[i] &= ~bit
        return was

    def set_selector(self, vcpu: int, port: int) -> bool:
        """Set the selector bit of ``port``'s word; True if it was set."""
        vi = self.vcpu_info(vcpu)
        sel = vi[VI_PENDING_SEL : VI_PENDING_SEL + 8].view(np.uint64)
        bit = np.uint64(1 << (port // 64))
        was = bool(sel[0] & bit)
        sel[0] |= bit
        return was

    def upcall_pending(self, vcpu: int) -> bool:
        return bool(self.vcpu_info(vcpu)[VI_UPCALL_PENDING])

    def mark_upcall(self, vcpu: int) -> bool:
        """vcpu_mark_events_pending(): True if the vCPU needs a kick."""
        vi = self.vcpu_info(vcpu)
        was = vi[VI_UPCALL_PENDING]
        vi[VI_UPCALL_PENDING] = 1
        return not was


class EventChannelOps:
    """The EVTCHNOP_* operations over every domain of a host.

    ``domain(domid)`` returns the domain or raises HypercallError ESRCH;
    a domain has ``domid``, ``vcpus``, ``privileged``, ``ports`` (dict
    port -> Channel), ``bits`` (PendingBits), ``mem_lock()`` and
    ``kick(vcpu)``. ``call`` is used under the hypervisor's lock.
    """

    def __init__(self, domain: Callable[[int], object]) -> None:
        self._domain = domain

    # -- helpers --

    @staticmethod
    def _err(call: str, err: int, message: str) -> HypercallError:
        return HypercallError(call, err, message)

    def _resolve(self, caller: object, dom: int, call: str) -> object:
        if dom == DOMID_SELF or dom == caller.domid:
            return caller
        if not caller.privileged:
            raise self._err(
                call,
                errnos.EPERM,
                f"domain {caller.domid} may not act on domain {dom}",
            )
        return self._domain(dom)

    def _channel(self, d: object, port: int, call: str) -> Channel:
        ch = d.ports.get(port) if port > 0 else None
        if ch is None:
            raise self._err(
                call,
                errnos.EINVAL,
                f"port {port} of domain {d.domid} is not in use",
            )
        return ch

    @staticmethod
    def max_port(d: object) -> int:
        """get_free_port()'s limit: the domain's max_evtchn_port, within
        the 2-level ABI's ports."""
        limit = getattr(d, "max_evtchn_port", NR_2L_PORTS - 1)
        return min(limit, NR_2L_PORTS - 1)

    @staticmethod
    def _grow_buckets(d: object, port: int) -> None:
        """get_free_port() allocates the bucket of ``port``; Xen frees
        buckets only with the domain (d->valid_evtchns only grows)."""
        d.valid_ports = max(
            getattr(d, "valid_ports", EVTCHNS_PER_BUCKET),
            (port // EVTCHNS_PER_BUCKET + 1) * EVTCHNS_PER_BUCKET,
        )

    @classmethod
    def port_is_valid(cls, d: object, port: int) -> bool:
        """Within a bucket allocated so far (buckets are not freed)."""
        # Ports a restore put in place count as allocated.
        cls._grow_buckets(d, max(d.ports, default=0))
        return 0 <= port < d.valid_ports

    def free_port(self, d: object, call: str) -> int:
        for port in range(1, self.max_port(d) + 1):
            if port not in d.ports:
                self._grow_buckets(d, port)
                return port
        raise self._err(
            call, errnos.ENOSPC, f"domain {d.domid} has no free event channel"
        )

    def _check_vcpu(self, d: object, vcpu: int, call: str) -> None:
        if not 0 <= vcpu < d.vcpus:
            raise self._err(
                call, errnos.ENOENT, f"domain {d.domid} has no vCPU {vcpu}"
            )

    def set_pending(self, d: object, port: int) -> None:
        """evtchn_2l_set_pending(); kicks the vCPU when it must. Whatever
        the domain's state (paused, quiesced for a stop-and-copy): the
        pending bit in shared info, the selector and
        ``evtchn_upcall_pending`` in vcpu_info are all there is of the
        event, so it goes wherever that memory goes, and a vCPU that did
        not take the kick has the vector asserted again when it runs
        (level-triggered)."""
        ch = d.ports[port]
        kick = False
        with d.mem_lock():
            bits = d.bits
            if bits.test_and_set(SHINFO_PENDING, port):
                return
            if not bits.test(SHINFO_MASK, port) and not bits.set_selector(
                ch.vcpu, port
            ):
                kick = bits.mark_upcall(ch.vcpu)
        if kick:
            d.kick(ch.vcpu)

    # -- operations --

    def alloc_unbound(self, caller: object, dom: int, remote_dom: int) -> int:
        call = "EVTCHNOP_alloc_unbound"
        d = self._resolve(caller, dom, call)
        if remote_dom == DOMID_SELF:
            remote_dom = caller.domid
        port = self.free_port(d, call)
        d.ports[port] = Channel(EvtchnType.UNBOUND, remote_domid=remote_dom)
        return port

    def bind_interdomain(
        self, caller: object, remote_dom: int, remote_port: int
    ) -> int:
        call = "EVTCHNOP_bind_interdomain"
        ld = caller
        rd, rch = self._bindable(ld, remote_dom, remote_port, call)
        lport = self.free_port(ld, call)
        ld.ports[lport] = Channel(
            EvtchnType.INTERDOMAIN,
            remote_domid=rd.domid,
            remote_port=remote_port,
        )
        rch.type = EvtchnType.INTERDOMAIN
        rch.remote_domid = ld.domid
        rch.remote_port = lport
        self.set_pending(ld, lport)
        return lport

    def check_bindable(
        self, caller: object, remote_dom: int, remote_port: int
    ) -> None:
        """Whether EVTCHNOP_bind_interdomain by ``caller`` would take
        ``remote_port`` of ``remote_dom``, changing nothing: a backend
        checks a port before it may bind it."""
        self._bindable(
            caller, remote_dom, remote_port, "EVTCHNOP_bind_interdomain"
        )

    def _bindable(
        self, ld: object, remote_dom: int, remote_port: int, call: str
    ) -> tuple[object, Channel]:
        rd = ld if remote_dom == DOMID_SELF else self._domain(remote_dom)
        rch = rd.ports.get(remote_port) if remote_port > 0 else None
        if rch is None or rch.type != EvtchnType.UNBOUND:
            raise self._err(
                call,
                errnos.EINVAL,
                f"port {remote_port} of domain {rd.domid} is not unbound",
            )
        if rch.remote_domid != ld.domid:
            raise self._err(
                call,
                errnos.EINVAL,
                f"port {remote_port} of domain {rd.domid} is "
                f"reserved for domain {rch.remote_domid}, not "
                f"{ld.domid}",
            )
        return rd, rch

    def bind_virq(self, caller: object, virq: int, vcpu: int) -> int:
        call = "EVTCHNOP_bind_virq"
        d = caller
        if not 0 <= virq < NR_VIRQS:
            raise self._err(call, errnos.EINVAL, f"no VIRQ {virq}")
        if virq_is_global(virq) and vcpu != 0:
            raise self._err(
                call, errnos.EINVAL, f"global VIRQ {virq} binds to vCPU 0 only"
            )
        self._check_vcpu(d, vcpu, call)
        for ch in d.ports.values():
            if (
                ch.type == EvtchnType.VIRQ
                and ch.virq == virq
                and (ch.vcpu == vcpu or virq_is_global(virq))
            ):
                raise self._err(
                    call, errnos.EEXIST, f"VIRQ {virq} of vCPU {vcpu} is bound"
                )
        port = self.free_port(d, call)
        d.ports[port] = Channel(EvtchnType.VIRQ, vcpu=vcpu, virq=virq)
        return port

    def bind_ipi(self, caller: object, vcpu: int) -> int:
        call = "EVTCHNOP_bind_ipi"
        self._check_vcpu(caller, vcpu, call)
        port = self.free_port(caller, call)
        caller.ports[port] = Channel(EvtchnType.IPI, vcpu=vcpu)
        return port

    def close(self, caller: object, port: int) -> None:
        call = "EVTCHNOP_close"
        ch = self._channel(caller, port, call)
        if ch.type == EvtchnType.INTERDOMAIN:
            try:
                rd = self._domain(ch.remote_domid)
            except HostError:
                rd = None
            rch = rd.ports.get(ch.remote_port) if rd is not None else None
            if rch is not None and rch.type == EvtchnType.INTERDOMAIN:
                rch.type = EvtchnType.UNBOUND
                rch.remote_domid = caller.domid
                rch.remote_port = 0
        del caller.ports[port]
        with caller.mem_lock():
            caller.bits.test_and_clear(SHINFO_PENDING, port)

    def send(self, caller: object, port: int) -> None:
        call = "EVTCHNOP_send"
        ch = self._channel(caller, port, call)
        if ch.type == EvtchnType.INTERDOMAIN:
            rd = self._domain(ch.remote_domid)
            if ch.remote_port in rd.ports:
                self.set_pending(rd, ch.remote_port)
        elif ch.type == EvtchnType.IPI:
            self.set_pending(caller, port)
        elif ch.type == EvtchnType.UNBOUND:
            return  # silently dropped, as Xen does
        else:
            raise self._err(
                call,
                errnos.EINVAL,
                f"port {port} is {ch.type.name}, not sendable",
            )

    def unmask(self, caller: object, port: int) -> None:
        """evtchn_2l_unmask(): an event pending while masked is raised.
        A free port is unmasked too, if valid (port_is_valid)."""
        call = "EVTCHNOP_unmask"
        if not self.port_is_valid(caller, port):
            raise self._err(
                call,
                errnos.EINVAL,
                f"port {port} of domain {caller.domid} is not valid",
            )
        ch = caller.ports.get(port)
        vcpu = ch.vcpu if ch is not None else 0
        kick = False
        with caller.mem_lock():
            bits = caller.bits
            if (
                bits.test_and_clear(SHINFO_MASK, port)
                and bits.test(SHINFO_PENDING, port)
                and not bits.set_selector(vcpu, port)
            ):
                kick = bits.mark_upcall(vcpu)
        if kick:
            caller.kick(vcpu)

    def bind_vcpu(self, caller: object, port: int, vcpu: int) -> None:
        call = "EVTCHNOP_bind_vcpu"
        ch = self._channel(caller, port, call)
        self._check_vcpu(caller, vcpu, call)
        if ch.type == EvtchnType.IPI or (
            ch.type == EvtchnType.VIRQ and not virq_is_global(ch.virq)
        ):
            raise self._err(
                call, errnos.EINVAL, f"port {port} is bound to its vCPU"
            )
        ch.vcpu = vcpu

    def status(self, caller: object, dom: int, port: int) -> EventChannel:
        call = "EVTCHNOP_status"
        d = self._resolve(caller, dom, call)
        if not 0 <= port < NR_2L_PORTS:
            raise self._err(call, errnos.EINVAL, f"port {port} out of range")
        return self.describe(d, port)

    def describe(self, d: object, port: int) -> EventChannel:
        ch = d.ports.get(port) if port > 0 else None
        with d.mem_lock():
            pending = d.bits.test(SHINFO_PENDING, port)
            masked = d.bits.test(SHINFO_MASK, port)
        if ch is None:
            return EventChannel(
                port, EvtchnType.CLOSED, pending=pending, masked=masked
            )
        return EventChannel(
            port=port,
            type=ch.type,
            vcpu=ch.vcpu,
            remote_domid=ch.remote_domid,
            remote_port=ch.remote_port,
            virq=ch.virq,
            pirq=ch.pirq,
            pending=pending,
            masked=masked,
        )

    def table(self, d: object) -> tuple[EventChannel, ...]:
        return tuple(self.describe(d, p) for p in sorted(d.ports))

    # -- restore --

    def validate_table(
        self,
        d: object,
        ports: Iterable[EventChannel],
        allowed_remotes: set[int],
    ) -> None:
        call = "import_pv_state"
        seen: set[int] = set()
        virqs: set[tuple[int, int]] = set()
        for p in ports:
            where = f"event channel port {p.port}"
            if not 0 < p.port <= self.max_port(d):
                raise HostError(
                    f"{where}: out of the domain's range "
                    f"1..{self.max_port(d)}",
                    call=call,
                )
            if p.port in seen:
                raise HostError(f"{where}: listed twice", call=call)
            seen.add(p.port)
            if p.type == EvtchnType.CLOSED:
                raise HostError(
                    f"{where}: a closed port cannot be restored", call=call
                )
            if not 0 <= p.vcpu < d.vcpus:
                raise HostError(
                    f"{where}: vCPU {p.vcpu} but the guest has {d.vcpus}",
                    call=call,
                )
            if p.type in (EvtchnType.UNBOUND, EvtchnType.INTERDOMAIN):
                if p.remote_domid not in allowed_remotes:
                    raise HostError(
                        f"{where}: bound to domain {p.remote_domid}, which "
                        f"is neither the guest nor one of its backend "
                        f"domains {sorted(allowed_remotes - {d.domid})}",
                        call=call,
                    )
            if p.type == EvtchnType.INTERDOMAIN:
                try:
                    self._domain(p.remote_domid)
                except HostError:
                    if p.remote_domid != d.domid:
                        raise HostError(
                            f"{where}: remote domain {p.remote_domid} does "
                            f"not exist on this host",
                            call=call,
                        ) from None
            if p.type == EvtchnType.VIRQ:
                if not 0 <= p.virq < NR_VIRQS:
                    raise HostError(f"{where}: no VIRQ {p.virq}", call=call)
                key = (p.virq, 0 if virq_is_global(p.virq) else p.vcpu)
                if key in virqs:
                    raise HostError(
                        f"{where}: VIRQ {p.virq} bound twice", call=call
                    )
                virqs.add(key)
