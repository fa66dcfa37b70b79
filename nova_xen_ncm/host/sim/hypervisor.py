"""The simulated hypervisor: domains, their memory, event channels,
grant tables, log-dirty, HVM state and the hypercalls guests make.

What Xen keeps per domain is :class:`Domain` (struct domain): its RAM
and the hypervisor's tables are shared memory (memory.py), its vCPUs
run in a guest process (guest.py) that reaches :class:`Hypervisor`
through a hypercall channel served by a thread here. Dom0, the control
domain, is :class:`Dom0`: privileged, no RAM here, its event channel
upcalls run handlers on a dom0 thread (the dom0 services, dom0.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errnos
import itertools
import socket
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from oslo_log import log as logging

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import DOMID_FIRST_RESERVED
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import ipc
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim.memory import INVALID_GFN
from nova_xen_ncm.host.sim.memory import MAX_GRANT_FRAMES
from nova_xen_ncm.host.sim.memory import TRACKER_FAILED
from nova_xen_ncm.host.sim.memory import XENPAGE_GRANT_BASE
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.memory import GuestMemory
from nova_xen_ncm.host.sim.memory import SpareRam

if TYPE_CHECKING:
    from nova_xen_ncm.host.sim import devices
    from nova_xen_ncm.host.sim import guestproc

LOG = logging.getLogger(__name__)

DOM0 = 0
CONTROL_TIMEOUT = 30.0
NR_GRANT_FRAMES = 4
# SCHEDOP_shutdown reasons a guest may give (xen/include/public/sched.h).
SHUTDOWN_REASONS = frozenset({"poweroff", "reboot", "suspend", "crash"})
# Xen lets a domain hold its RAM plus the special pages and some slack
# (max_pages is set a little above the target by the toolstack).
EXTRA_PAGES = layout.X86_HVM_NR_SPECIAL_PAGES + 1024
TSC_KHZ = 2994000


class SimError(Exception):
    """The simulator failed where Xen would not (a hypercall handler
    raised something that is not an error Xen returns); kept in
    :attr:`Hypervisor.errors` for the host's owner to raise."""


class Dom0:
    """The control domain as the hypervisor sees it: privileged, no RAM
    of its own here, its event channel bits in a private shared info.
    An event for it marks the bits and calls ``upcall(vcpu)``: the
    callback vector of dom0's kernel (dom0.Dom0Kernel), which reads the
    bits and runs its handlers."""

    domid = DOM0
    vcpus = 1
    privileged = True

    def __init__(self, hostname: str) -> None:
        self.ports: dict[int, evtchn.Channel] = {}
        self.shinfo = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self.bits = evtchn.PendingBits(self.shinfo, self._vcpu_info)
        self._lock = threading.Lock()
        self.upcall: Callable[[int], None] = lambda vcpu: None

    def _vcpu_info(self, vcpu: int) -> np.ndarray:
        return self.shinfo[: evtchn.VCPU_INFO_SIZE]

    @contextlib.contextmanager
    def mem_lock(self):
        with locks.ordered(locks.MEMORY, self._lock):
            yield

    def kick(self, vcpu: int) -> None:
        self.upcall(vcpu)


class Domain:
    """A guest domain: the hypervisor's view of it."""

    privileged = False
    max_evtchn_port = evtchn.DEFAULT_MAX_EVTCHN_PORT

    def __init__(
        self,
        hv: Hypervisor,
        domid: int,
        config: base.DomainConfig,
        hvm_layout: layout.HvmLayout,
        spare_ram: SpareRam | None = None,
    ) -> None:
        self.hv = hv
        self.domid = domid
        self.config = config
        self.name = config.name
        self.uuid = config.uuid or str(uuidlib.uuid4())
        self.vcpus = config.vcpus
        self.layout = hvm_layout
        self.mem = GuestMemory.create(
            hvm_layout.max_pfn,
            f"{hv.hostname}-d{domid}",
            spare_ram,
            hvm_layout.ram_ranges,
        )
        self.ports: dict[int, evtchn.Channel] = {}
        self.bits = evtchn.PendingBits(
            self.mem.xen_pages[XENPAGE_SHARED_INFO], self._vcpu_info
        )
        self.vcpu_info_at: dict[int, tuple[int, int]] = {}
        self.grants = grant.GrantTable(self.mem.xen_pages[XENPAGE_GRANT_BASE:])
        self.params: dict[int, int] = {}
        self.records = hvm.default_records(self.vcpus, TSC_KHZ)
        self.tsc = base.TscInfo(mode=0, khz=TSC_KHZ, nsec=0, incarnation=0)
        # Guest TSC = host TSC + tsc_offset: 0 at creation; a restore
        # sets it so that the TSC goes on from the saved CPU records.
        self.tsc_offset = -self._host_tsc()
        self.state = DomainState.PAUSED
        # The reason a guest's SCHEDOP_shutdown gave, or "crash".
        self.shutdown_reason: str | None = None
        self.throttle = 1.0
        # Where the vCPUs run (the guest process layer's, guestproc.py):
        # None while no process runs them.
        self.process: guestproc.GuestProcess | None = None
        self.writable_maps: dict[int, np.ndarray] = {}
        self.booted = False
        self.run_started = 0.0
        self.cpu_time = 0.0

    # -- dom0's records of this domain (kept by dom0, not here) --

    @property
    def backends(self) -> dict[str, devices.Backend]:
        """dom0's backends of this domain (Dom0Services.record(dom)):
        read through the host's dom0, for callers written against the
        layout where the domain carried them."""
        return self.hv.dom0_record(self).backends

    @property
    def disks(self) -> list[devices.BlockStore]:
        """The vbd disks dom0 opened for this domain (as ``backends``)."""
        return self.hv.dom0_record(self).disks

    # -- what evtchn.EventChannelOps needs --

    def mem_lock(self) -> contextlib.AbstractContextManager[None]:
        # GuestMemory.lock is the ordered locks.MEMORY.
        return self.mem.lock()

    def _vcpu_info(self, vcpu: int) -> np.ndarray:
        placed = self.vcpu_info_at.get(vcpu)
        if placed is None:
            if vcpu >= evtchn.XEN_LEGACY_MAX_VCPUS:
                raise HostError(f"vCPU {vcpu} has no vcpu_info registered")
            off = vcpu * evtchn.VCPU_INFO_SIZE
            return self.mem.xen_pages[XENPAGE_SHARED_INFO][
                off : off + evtchn.VCPU_INFO_SIZE
            ]
        gfn, off = placed
        self.mem.mark_dirty(gfn)
        return self.mem.ram[gfn][off : off + evtchn.VCPU_INFO_SIZE]

    def kick(self, vcpu: int) -> None:
        """Inject the callback vector into the vCPU (where it runs)."""
        process = self.process
        if process is not None:
            process.upcall(vcpu)

    def request(self, msg: dict, timeout: float = CONTROL_TIMEOUT) -> object:
        """Ask the process that runs the vCPUs (guestproc.GuestProcess):
        pause, unpause, throttle, start."""
        process = self.process
        if process is None:
            raise HostError(
                f"domain {self.domid} has no running guest", call=msg["cmd"]
            )
        return process.request(msg, timeout)

    def cpu_registers(self) -> list[dict]:
        regs = []
        for rec in self.records:
            if rec.typecode == hvm.CODE_CPU:
                regs.append(hvm.cpu_registers(rec.data))
        return regs

    def _host_tsc(self) -> int:
        """This host's TSC (ticking at the guest's frequency)."""
        return self.hv.now_ns() * self.tsc.khz // 1_000_000

    def guest_tsc(self) -> int:
        return self._host_tsc() + self.tsc_offset

    def restore_tsc(self) -> None:
        """hvm_set_guest_tsc_fixed() at restore: the guest's TSC goes on
        from the value in its CPU records (vCPU 0's)."""
        for rec in self.records:
            if rec.typecode == hvm.CODE_CPU and rec.instance == 0:
                saved = hvm.cpu_registers(rec.data)["tsc"]
                self.tsc_offset = saved - self._host_tsc()
                return

    def update_time(self) -> None:
        """What Xen writes when the vCPUs are scheduled in: each vCPU's
        vcpu_time_info (update_vcpu_system_time) and the wallclock
        (update_domain_wallclock_time). As for an HVM guest on Xen, the
        system time is this host's NOW() and the TSC stamp the guest's
        TSC at that moment; the wallclock is the wall time at this host's
        system time 0. So both are rebased when the guest moves to
        another host (whose NOW() is another), and wallclock + system
        time + the TSC since the stamp, the guest's time of day, goes on.
        The caller holds the memory lock."""
        scale = hvm.TimeScale.for_khz(self.tsc.khz)
        now = self.hv.now_ns()
        tsc = self.guest_tsc()
        for v in range(self.vcpus):
            if v in self.vcpu_info_at or v < evtchn.XEN_LEGACY_MAX_VCPUS:
                hvm.write_vcpu_time(
                    memoryview(self._vcpu_info(v)), tsc, now, scale
                )
        hvm.write_wallclock(
            memoryview(self.mem.xen_pages[XENPAGE_SHARED_INFO]),
            self.hv.wallclock_ns,
        )

    def save_registers(self, regs: Sequence[Mapping[str, int]]) -> None:
        guest_tsc = self.guest_tsc()
        for rec in self.records:
            if rec.typecode == hvm.CODE_CPU and rec.instance < len(regs):
                values = dict(regs[rec.instance], tsc=guest_tsc)
                rec.data = hvm.with_cpu_registers(rec.data, values)


def _no_dom0(dom: Domain) -> object:
    raise HostError(f"no dom0 services on this host for domain {dom.domid}")


def canonical_uuid(text: str) -> str:
    """``text`` as a canonical UUID; ValueError naming it otherwise."""
    try:
        return str(uuidlib.UUID(str(text)))
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID") from None


class Hypervisor:
    """Xen on one simulated host: the domain table and what the
    hypercalls, domctls and grant and event channel operations do to
    it. ``lock`` (locks.HOST) guards the table and the port tables."""

    def __init__(self, hostname: str, memory_bytes: int) -> None:
        self.hostname = hostname
        self.memory_bytes = memory_bytes
        self.lock = locks.OrderedLock(
            locks.HOST, threading.RLock(), reentrant=True
        )
        self.domains: dict[int, Domain] = {}
        # The domid allocator's state: the last domid it gave.
        self._domid_last = 0
        # Xen's NOW() here: ns since this host booted (hosts booted at
        # different times, so a migrating guest's host time jumps).
        uptime = zlib.crc32(hostname.encode()) % 86_400 + 60
        self._boot_ns = time.monotonic_ns() - uptime * 1_000_000_000
        # Xen's wc_sec/wc_nsec: the wall time at NOW() 0, set at boot
        # (and by a settime, which nothing here does), the same for
        # every update of every domain's wallclock.
        self.wallclock_ns = time.time_ns() - self.now_ns()
        self.dom0 = Dom0(hostname)
        # What failed in the simulator itself (SimError), oldest first.
        self.errors: list[SimError] = []
        # dom0's record of a domain (set by dom0.Dom0Services, which
        # keeps them): only for Domain.backends and Domain.disks.
        self.dom0_record: Callable[[Domain], object] = _no_dom0
        self.evtchn = evtchn.EventChannelOps(self.lookup)
        self._maptrack: dict[int, tuple[int, int, bool]] = {}
        self._next_handle = 1
        # The hypercalls a guest may make, by the name its request
        # carries: an explicit table, so that no name a guest sends is
        # looked up as an attribute.
        ev = self.evtchn
        self._hypercalls: dict[str, Callable[..., object]] = {
            "evtchn_alloc_unbound": ev.alloc_unbound,
            "evtchn_bind_interdomain": ev.bind_interdomain,
            "evtchn_bind_virq": ev.bind_virq,
            "evtchn_bind_ipi": ev.bind_ipi,
            "evtchn_bind_vcpu": ev.bind_vcpu,
            "evtchn_close": ev.close,
            "evtchn_send": ev.send,
            "evtchn_status": ev.status,
            "evtchn_unmask": ev.unmask,
            "hvm_set_param": self._hc_hvm_set_param,
            "hvm_get_param": self._hc_hvm_get_param,
            "add_to_physmap": self._hc_add_to_physmap,
            "register_vcpu_info": self._hc_register_vcpu_info,
            "sched_shutdown": self._hc_sched_shutdown,
        }

    def locked(self) -> locks.OrderedLock:
        """The hypervisor's lock (checked against locks.ORDER)."""
        return self.lock

    def add_domain(
        self,
        domid: int,
        config: base.DomainConfig,
        hvm_layout: layout.HvmLayout,
        spare_ram: SpareRam | None,
    ) -> Domain:
        """The domain record (domain_create); the caller checked the
        domid and the configuration and holds the lock."""
        dom = Domain(self, domid, config, hvm_layout, spare_ram)
        self.domains[domid] = dom
        return dom

    def check_domid(self, domid: int, call: str) -> None:
        """A domid asked for: in range and free (domain_create). Lock
        held."""
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise HostError(
                f"domid {domid} is outside 1..{DOMID_FIRST_RESERVED - 1}",
                call=call,
            )
        if domid in self.domains:
            raise base.DomidInUse(
                f"domid {domid} is held by {self.domains[domid].name!r}",
                call=call,
            )

    def release_domain(self, dom: Domain) -> None:
        """domain_kill: its grant maps and its ports go (dom0's ends of
        them are left unbound, for dom0 to close), its domid is
        released. Lock held."""
        for handle, (domid, _, _) in list(self._maptrack.items()):
            if domid == dom.domid:
                del self._maptrack[handle]
        for port in sorted(dom.ports):
            with contextlib.suppress(HostError):
                self.evtchn.close(dom, port)
        self.domains.pop(dom.domid, None)

    def now_ns(self) -> int:
        """The hypervisor's system time (Xen's NOW())."""
        return time.monotonic_ns() - self._boot_ns

    def lookup(self, domid: int) -> object:
        if domid == DOM0:
            return self.dom0
        dom = self.domains.get(domid)
        if dom is None:
            raise evtchn.HypercallError(
                "domain lookup", errnos.ESRCH, f"no domain {domid}"
            )
        return dom

    def domain(self, domid: int, call: str) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise base.DomainNotFound(
                f"no domain {domid} on {self.hostname}", call=call
            )
        return dom

    def alloc_domid(
        self, call: str, avoid: Callable[[int], bool] = lambda domid: False
    ) -> int:
        """Xen's allocator (xen/common/domid.c): the next free domid after
        the last one allocated, round-robin over 1..DOMID_FIRST_RESERVED-1,
        skipping those ``avoid`` names (the toolstack's recently used
        ones). Host lock held."""
        last = self._domid_last
        for domid in itertools.chain(
            range(last + 1, DOMID_FIRST_RESERVED), range(1, last + 1)
        ):
            if domid not in self.domains and not avoid(domid):
                self._domid_last = domid
                return domid
        raise HostError("no domid free", call=call)

    def free_memory(self) -> int:
        used = sum(d.config.memory_bytes for d in self.domains.values())
        return self.memory_bytes - used

    def serve_hypercalls(self, dom: Domain, sock: socket.socket) -> None:
        """Serve the hypercalls ``dom``'s vCPUs make on ``sock``."""
        while True:
            try:
                msg = ipc.recv(sock)
            except (OSError, ipc.ChannelClosed):
                return
            try:
                reply = {
                    "ok": self.hypercall(dom, msg["op"], msg.get("args", {}))
                }
            except evtchn.HypercallError as exc:
                reply = {"err": -(exc.errno or errnos.EINVAL), "msg": str(exc)}
            except grant.GrantError as exc:
                reply = {"err": exc.status, "msg": str(exc)}
            except Exception as exc:
                # Not an error Xen returns: a bug of the simulator (or a
                # malformed request of the simulated guest's). Kept for
                # the host's owner, who raises it (tests fail on it);
                # the guest gets no errno that would pass for Xen's.
                LOG.exception("dom%d: hypercall %r failed", dom.domid, msg)
                error = SimError(
                    f"dom{dom.domid}: hypercall {msg.get('op')!r} raised "
                    f"{exc!r}"
                )
                error.__cause__ = exc
                self.errors.append(error)
                reply = {"err": 0, "msg": f"simulator error: {exc!r}"}
            try:
                ipc.send(sock, reply)
            except OSError:
                return

    def hypercall(self, dom: Domain, op: str, args: dict) -> object:
        with self.locked():
            if dom.domid not in self.domains:
                raise evtchn.HypercallError(op, errnos.ESRCH, "domain gone")
            handler = self._hypercalls.get(op)
            if handler is None:
                raise evtchn.HypercallError(
                    str(op), errnos.ENOSYS, f"no hypercall {op!r}"
                )
            result = handler(dom, **args)
            if isinstance(result, base.EventChannel):
                return dataclasses.asdict(result)
            return result

    def _hc_sched_shutdown(self, dom: Domain, reason: str) -> None:
        """SCHEDOP_shutdown from the guest: it stopped its vCPUs and asks
        to be shut down. The domain is kept, in the shutdown state, until
        the toolstack destroys it (libxl's on_poweroff action)."""
        if reason not in SHUTDOWN_REASONS:
            raise evtchn.HypercallError(
                "sched_shutdown", errnos.EINVAL, f"reason {reason!r}"
            )
        if dom.state == DomainState.RUNNING:
            dom.cpu_time += time.monotonic() - dom.run_started
        dom.state = DomainState.SHUTDOWN
        dom.shutdown_reason = reason
        LOG.info("dom%d: shut down by the guest (%s)", dom.domid, reason)

    def _hc_hvm_set_param(self, dom: Domain, index: int, value: int) -> None:
        """HVMOP_set_param from the guest (hvm_allow_set_param)."""
        if index not in hvm.GUEST_SETTABLE_PARAMS:
            raise evtchn.HypercallError(
                "HVMOP_set_param",
                errnos.EPERM,
                f"param {index} is not settable by the guest",
            )
        dom.params[index] = int(value)
        if index == hvm.HVM_PARAM_CALLBACK_IRQ:
            # hvm_set_callback_via(): the vector is asserted on every
            # vCPU whose upcall flag is already set.
            self.reassert_upcalls(dom)

    def _hc_hvm_get_param(self, dom: Domain, index: int) -> int:
        if not 0 <= index < hvm.HVM_NR_PARAMS:
            raise evtchn.HypercallError(
                "HVMOP_get_param", errnos.EINVAL, f"no param {index}"
            )
        return dom.params.get(index, 0)

    def _hc_add_to_physmap(
        self, dom: Domain, space: str, idx: int, gfn: int
    ) -> None:
        """XENMEM_add_to_physmap, XENMAPSPACE_shared_info/grant_table."""
        call = "XENMEM_add_to_physmap"
        if not 0 <= gfn < dom.mem.max_pfn:
            raise evtchn.HypercallError(
                call, errnos.EINVAL, f"gfn {gfn:#x} out of range"
            )
        with dom.mem_lock():
            if space == "shared_info":
                if idx != 0:
                    raise evtchn.HypercallError(
                        call, errnos.EINVAL, "shared info idx must be 0"
                    )
                dom.mem.map_xen_page(XENPAGE_SHARED_INFO, gfn)
            elif space == "grant_table":
                if not 0 <= idx < MAX_GRANT_FRAMES:
                    raise evtchn.HypercallError(
                        call,
                        errnos.EINVAL,
                        f"grant frame {idx} beyond {MAX_GRANT_FRAMES}",
                    )
                dom.grants.grow(idx + 1)
                dom.mem.map_xen_page(XENPAGE_GRANT_BASE + idx, gfn)
            else:
                raise evtchn.HypercallError(
                    call, errnos.EINVAL, f"no map space {space!r}"
                )

    def _hc_register_vcpu_info(
        self, dom: Domain, vcpu: int, gfn: int, offset: int
    ) -> None:
        """VCPUOP_register_vcpu_info: the legacy slot's content moves."""
        call = "VCPUOP_register_vcpu_info"
        if not 0 <= vcpu < dom.vcpus:
            raise evtchn.HypercallError(call, errnos.ENOENT, f"no vCPU {vcpu}")
        if vcpu in dom.vcpu_info_at:
            raise evtchn.HypercallError(
                call, errnos.EINVAL, f"vCPU {vcpu} already registered"
            )
        if not 0 <= offset <= PAGE_SIZE - evtchn.VCPU_INFO_SIZE:
            raise evtchn.HypercallError(
                call, errnos.EINVAL, f"offset {offset} crosses the page"
            )
        if not 0 <= gfn < dom.mem.max_pfn or dom.mem.p2m[gfn] != 1:
            raise evtchn.HypercallError(
                call, errnos.EINVAL, f"gfn {gfn:#x} is not RAM"
            )
        with dom.mem_lock():
            old = bytes(dom._vcpu_info(vcpu))
            dom.vcpu_info_at[vcpu] = (gfn, offset)
            vi = dom._vcpu_info(vcpu)
            vi[:] = np.frombuffer(old, dtype=np.uint8)
            # As map_guest_area()'s caller does: every selector bit set
            # so that nothing is lost; the guest takes a spurious upcall.
            vi[evtchn.VI_PENDING_SEL : evtchn.VI_PENDING_SEL + 8] = 0xFF
            kick = dom.bits.mark_upcall(vcpu)
            dom.update_time()
        if kick:
            dom.kick(vcpu)

    def grant_map(
        self, domid: int, ref: int, readonly: bool = False, mapper: int = DOM0
    ) -> tuple[int, memoryview]:
        """GNTTABOP_map_grant_ref by ``mapper``: a handle and the granted
        page itself (read-only view for a read-only map)."""
        call = "GNTTABOP_map_grant_ref"
        with self.locked():
            dom = self.domains.get(domid)
            if dom is None:
                raise grant.GrantError(
                    call, grant.GNTST_bad_domain, f"no domain {domid}"
                )
            with dom.mem_lock():
                gfn = dom.grants.pin(ref, mapper, readonly)
                if not (0 <= gfn < dom.mem.max_pfn and dom.mem.p2m[gfn] == 1):
                    dom.grants.unpin(ref, readonly)
                    raise grant.GrantError(
                        call,
                        grant.GNTST_bad_page,
                        f"grant reference {ref} names gfn {gfn:#x}, not RAM",
                    )
                if not readonly:
                    dom.mem.mark_dirty(gfn)
            handle = self._next_handle
            self._next_handle += 1
            self._maptrack[handle] = (domid, ref, readonly)
            return handle, dom.mem.page(gfn, writable=not readonly)

    def grant_unmap(self, handle: int) -> None:
        """GNTTABOP_unmap_grant_ref: the page is marked dirty if it was
        mapped writable (gnttab_mark_dirty)."""
        with self.locked():
            entry = self._maptrack.pop(handle, None)
            if entry is None:
                raise grant.GrantError(
                    "GNTTABOP_unmap_grant_ref",
                    grant.GNTST_bad_handle,
                    f"no grant handle {handle}",
                )
            domid, ref, readonly = entry
            dom = self.domains.get(domid)
            if dom is None:
                return
            with dom.mem_lock():
                gfn = dom.grants.unpin(ref, readonly)
                if not readonly:
                    dom.mem.mark_dirty(gfn)

    @staticmethod
    def reassert_upcalls(dom: Domain) -> None:
        """The callback vector is level-triggered: asserted while a
        vCPU's evtchn_upcall_pending is set (xen/arch/x86/hvm/irq.c,
        hvm_vcpu_has_pending_irq). A kick sent while the vCPUs were
        paused was not taken; the flag, in vcpu_info, says it all."""
        if not dom.params.get(hvm.HVM_PARAM_CALLBACK_IRQ):
            return  # no callback vector: events are not delivered
        with dom.mem_lock():
            pending = [
                v
                for v in range(dom.vcpus)
                if (v in dom.vcpu_info_at or v < evtchn.XEN_LEGACY_MAX_VCPUS)
                and dom.bits.upcall_pending(v)
            ]
        for v in pending:
            dom.kick(v)

    @staticmethod
    def running(dom: Domain) -> None:
        dom.state = DomainState.RUNNING
        dom.run_started = time.monotonic()

    def populate(self, domid: int, pfns: np.ndarray) -> None:
        call = "populate"
        dom = self.domain(domid, call)
        if dom.booted:
            raise HostError(f"domain {domid} is not being restored", call=call)
        pfns = np.asarray(pfns, dtype=np.uint64)
        if len(pfns) and int(pfns.max()) >= dom.mem.max_pfn:
            raise HostError(
                f"pfn {int(pfns.max()):#x} beyond the guest's "
                f"physmap (max {dom.mem.max_pfn:#x})",
                call=call,
            )
        pfns = base.pfn_union(pfns)
        with dom.mem_lock():
            if np.any(dom.mem.p2m[pfns] == 2):
                raise HostError(
                    "pfns overlap a Xen page in the physmap", call=call
                )
            new = int(np.count_nonzero(dom.mem.p2m[pfns] == 0))
            have = dom.mem.nr_ram
            limit = dom.config.memory_bytes // PAGE_SIZE + EXTRA_PAGES
            if have + new > limit:
                raise base.InsufficientMemory(
                    f"{have + new} pages exceed domain {domid}'s "
                    f"allocation of {limit}",
                    call=call,
                )
            dom.mem.populate(pfns)

    def enable_log_dirty(self, domid: int) -> None:
        dom = self.domain(domid, "enable_log_dirty")
        if dom.mem.tracking == TRACKER_FAILED:
            raise base.NotSupported(
                f"domain {domid}: its process could not arm write "
                "tracking (userfaultfd WP_ASYNC), so no write log is kept",
                call="enable_log_dirty",
            )
        dom.mem.set_log_dirty(True)

    def harvest_dirty(self, domid: int) -> np.ndarray:
        call = "harvest_dirty"
        dom = self.domain(domid, call)
        if not dom.mem.log_dirty:
            raise HostError(
                f"log-dirty is not enabled for domain {domid}", call=call
            )
        return dom.mem.harvest(self.unlocked_writes(dom))

    def unlocked_writes(self, dom: Domain) -> np.ndarray:
        """Pages others may write at any time without the memory lock:
        writable grant maps and mappings, and the xenstore ring."""
        with self.locked():
            extra = [
                dom.grants.writably_mapped_gfns(),
                *dom.writable_maps.values(),
            ]
            store = dom.params.get(hvm.HVM_PARAM_STORE_PFN)
            if store:
                extra.append(np.array([store], dtype=np.uint64))
        return np.concatenate(extra).astype(np.uint64)

    def set_vcpu_throttle(self, domid: int, fraction: float) -> None:
        call = "set_vcpu_throttle"
        dom = self.domain(domid, call)
        if not 0.0 < fraction <= 1.0:
            raise HostError(
                f"throttle fraction must be in (0, 1], got {fraction}",
                call=call,
            )
        dom.throttle = float(fraction)
        if dom.process is not None:
            dom.request({"cmd": "throttle", "fraction": dom.throttle})

    def get_hvm_context(self, domid: int) -> bytes:
        dom = self.domain(domid, "get_hvm_context")
        if dom.state == DomainState.RUNNING:
            # Xen pauses the domain around the copy (hvm_save).
            dom.save_registers(dom.request({"cmd": "pause"}))
            dom.request(
                {
                    "cmd": "unpause",
                    "regs": dom.cpu_registers(),
                    "throttle": dom.throttle,
                }
            )
        return hvm.encode(dom.records)

    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        call = "set_hvm_context"
        dom = self.domain(domid, call)
        if dom.state == DomainState.RUNNING:
            raise HostError(f"domain {domid} must be paused", call=call)
        dom.records = hvm.decode(blob, dom.vcpus)
        dom.restore_tsc()

    def set_hvm_params(self, domid: int, params: Mapping[int, int]) -> None:
        call = "set_hvm_params"
        dom = self.domain(domid, call)
        for index, value in params.items():
            if not 0 <= int(index) < hvm.HVM_NR_PARAMS:
                raise HostError(f"HVM param {index} does not exist", call=call)
            if not 0 <= int(value) < 1 << 64:
                raise HostError(
                    f"HVM param {index} value {value} is not a u64", call=call
                )
        dom.params.update({int(k): int(v) for k, v in params.items()})

    def set_tsc_info(self, domid: int, info: base.TscInfo) -> None:
        call = "set_tsc_info"
        dom = self.domain(domid, call)
        if info.mode not in (0, 1, 2, 3):
            raise HostError(
                f"TSC mode {info.mode} is not a TSC_MODE_*", call=call
            )
        if not 0 < info.khz < 1 << 32:
            raise HostError(
                f"TSC frequency {info.khz} kHz out of range", call=call
            )
        if info.nsec < 0 or not 0 <= info.incarnation < 1 << 32:
            raise HostError("TSC nsec/incarnation out of range", call=call)
        # The guest's TSC goes on at the new frequency from where it is.
        tsc = dom.guest_tsc()
        # tsc_set_info(): the incarnation counts the restores (a guest
        # reads it in CPUID leaf 0x40000003 to see it was migrated).
        dom.tsc = dataclasses.replace(
            info, incarnation=(info.incarnation + 1) & 0xFFFFFFFF
        )
        dom.tsc_offset = tsc - dom._host_tsc()

    def export_shared_info(self, dom: Domain) -> base.SharedInfoState:
        gfn = int(dom.mem.xen_gfns[XENPAGE_SHARED_INFO])
        placements = []
        for v in range(dom.vcpus):
            placed = dom.vcpu_info_at.get(v)
            if placed is None:
                placements.append(base.VcpuInfoPlacement(v))
            else:
                placements.append(base.VcpuInfoPlacement(v, *placed))
        return base.SharedInfoState(
            gfn=None if gfn == INVALID_GFN else gfn,
            content=bytes(dom.mem.xen_pages[XENPAGE_SHARED_INFO]),
            vcpu_info=tuple(placements),
        )

    def export_grants(self, dom: Domain) -> base.GrantTableState:
        n = dom.grants.nr_frames
        gfns = tuple(
            int(g)
            for g in dom.mem.xen_gfns[
                XENPAGE_GRANT_BASE : XENPAGE_GRANT_BASE + n
            ]
        )
        return base.GrantTableState(
            version=1,
            frame_gfns=gfns,
            frames=tuple(bytes(dom.grants.frames[i]) for i in range(n)),
        )

    def backend_domids(self, dom: Domain) -> tuple[int, ...]:
        ids = {d.backend_domid for d in dom.config.devices}
        ids |= {
            ch.remote_domid
            for ch in dom.ports.values()
            if ch.type in (EvtchnType.INTERDOMAIN, EvtchnType.UNBOUND)
            and ch.remote_domid != dom.domid
        }
        return tuple(sorted(ids))

    def guest_ports(self, dom: Domain) -> tuple[base.EventChannel, ...]:
        """The guest's port table as the invariant has it: the guest's
        port numbers are kept; the port at a backend domain's end is that
        domain's to number (a restore may renumber dom0's end when its
        number is taken), so it is left out (0)."""
        peers = set(self.backend_domids(dom)) - {dom.domid}
        return tuple(
            dataclasses.replace(p, remote_port=0)
            if p.type == EvtchnType.INTERDOMAIN and p.remote_domid in peers
            else p
            for p in self.evtchn.table(dom)
        )

    def info(self, dom: Domain) -> base.DomainInfo:
        if (
            dom.state == DomainState.RUNNING
            and dom.process is not None
            and dom.process.exited() is not None
        ):
            LOG.error(
                "dom%d: guest process exited with %s",
                dom.domid,
                dom.process.exited(),
            )
            dom.cpu_time += time.monotonic() - dom.run_started
            dom.state = DomainState.CRASHED
            dom.shutdown_reason = "crash"
        cpu = dom.cpu_time
        if dom.state == DomainState.RUNNING:
            cpu += time.monotonic() - dom.run_started
        return base.DomainInfo(
            domid=dom.domid,
            name=dom.name,
            uuid=dom.uuid,
            state=dom.state,
            memory_bytes=dom.config.memory_bytes,
            vcpus=dom.vcpus,
            populated_pages=dom.mem.nr_ram,
            pv_drivers=dom.config.pv_drivers,
            cpu_time_ns=int(cpu * 1e9 * dom.vcpus),
            shutdown_reason=(
                dom.shutdown_reason
                if dom.state in (DomainState.SHUTDOWN, DomainState.CRASHED)
                else None
            ),
        )

    def raise_guest_events(self, domid: int) -> tuple[int, ...]:
        dom = self.domain(domid, "raise_guest_events")
        raised = []
        with self.locked():
            for port, ch in sorted(dom.ports.items()):
                if ch.type == EvtchnType.INTERDOMAIN:
                    # The peer notifies, as a backend or daemon does.
                    peer = self.lookup(ch.remote_domid)
                    self.evtchn.send(peer, ch.remote_port)
                elif ch.type in (
                    EvtchnType.VIRQ,
                    EvtchnType.IPI,
                    EvtchnType.PIRQ,
                ):
                    # Xen raising the VIRQ or interrupt, another vCPU
                    # its IPI.
                    self.evtchn.set_pending(dom, port)
                else:
                    continue
                raised.append(port)
        return tuple(raised)


class SimPageMapping(base.PageMapping):
    """Views onto the domain's shared RAM itself."""

    def __init__(
        self,
        dom: Domain,
        pfns: np.ndarray,
        writable: bool,
        on_written: Callable[[Domain, np.ndarray], None] | None = None,
        on_read: Callable[[Domain, np.ndarray], None] | None = None,
    ) -> None:
        """``on_written(dom, pfns)`` runs when a writable mapping that
        log-dirty follows closes (the digest cache reads them then);
        ``on_read(dom, pfns)`` when a read-only one of a guest that is
        not running closes."""
        self.pfns = pfns
        self._on_written = on_written
        self._on_read = on_read
        self._dom = dom
        self._writable = writable
        self._views: list[memoryview] = []
        self._pages: list[memoryview] | None = None
        if writable:
            self._key = id(self)
            with dom.mem_lock():
                dom.mem.mark_dirty(pfns)
            dom.writable_maps[self._key] = pfns

    def _view(self) -> memoryview:
        view = memoryview(self._dom.mem.ram_map)
        return view if self._writable else view.toreadonly()

    @property
    def pages(self) -> list[memoryview]:  # type: ignore[override]
        # Built on demand: the engine's data path uses runs().
        if self._pages is None:
            whole = self._view()
            self._pages = [
                whole[int(p) * PAGE_SIZE : (int(p) + 1) * PAGE_SIZE]
                for p in self.pfns
            ]
            self._views += self._pages
            whole.release()
        return self._pages

    def runs(self) -> list[tuple[int, memoryview]]:
        pfns = self.pfns
        if not len(pfns):
            return []
        starts = np.flatnonzero(np.diff(pfns.astype(np.int64)) != 1) + 1
        starts = np.concatenate(([0], starts))
        ends = np.concatenate((starts[1:], [len(pfns)]))
        whole = self._view()
        out = []
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            first = int(pfns[start]) * PAGE_SIZE
            view = whole[first : first + (end - start) * PAGE_SIZE]
            self._views.append(view)
            out.append((start, view))
        whole.release()
        return out

    def close(self) -> None:
        views, self._views = self._views, []
        self._pages = []
        for view in views:
            # A view still exported (a numpy array over it) is left to
            # the garbage collector.
            with contextlib.suppress(BufferError):
                view.release()
        if (
            self._writable
            and self._dom.writable_maps.pop(self._key, None) is not None
        ):
            if self._dom.mem.dirty is not None:
                with self._dom.mem.lock():
                    self._dom.mem.mark_dirty(self.pfns)
                if self._on_written is not None:
                    self._on_written(self._dom, self.pfns)
        elif (
            not self._writable
            and self._on_read is not None
            and self._dom.mem.log_dirty
            # A running guest's cache is the warming thread's: its
            # rounds are not slowed by whole blocks hashed per batch.
            and self._dom.state != DomainState.RUNNING
        ):
            self._on_read(self._dom, self.pfns)
