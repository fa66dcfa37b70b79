"""The simulated Xen host: hypervisor model and dom0 in this process.

``SimHost`` implements :class:`nova_xen_ncm.host.base.HostDriver`. Each
guest's RAM and the hypervisor's tables for it are shared memory
(memory.py); its vCPUs and kernel run in a separate process (guest.py)
that reaches the hypervisor through a hypercall channel served by a
plain thread here. Dom0 (xenstored, the console daemon, backends) lives
in this process: its event channel handlers run on a dom0 thread.

Several SimHost objects may live in one process (two compute services
in Nova's functional tests); guests are started with ``subprocess`` and
host threads are plain threads, so eventlet monkey-patching is fine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errnos
import functools
import hashlib
import itertools
import json
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import DOMID_FIRST_RESERVED
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import ipc
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.memory import INVALID_GFN
from nova_xen_ncm.host.sim.memory import MAX_GRANT_FRAMES
from nova_xen_ncm.host.sim.memory import P2M_RAM
from nova_xen_ncm.host.sim.memory import TRACKER_FAILED
from nova_xen_ncm.host.sim.memory import XENPAGE_GRANT_BASE
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.memory import GuestMemory
from nova_xen_ncm.host.sim.memory import SpareRam
from nova_xen_ncm.host.sim.memory import SpareRamAbandoned
from nova_xen_ncm.host.sim.memory import write_tracking_available
from nova_xen_ncm.host.sim.xenstore import ImportPolicy
from nova_xen_ncm.host.sim.xenstore import LocalClient
from nova_xen_ncm.host.sim.xenstore import Xenstore
from nova_xen_ncm.host.sim.xenstore import XenstoreMigrationError
from nova_xen_ncm.host.sim.xs_wire import XenstoreError

LOG = logging.getLogger(__name__)

MiB = 1 << 20
DOM0 = 0
START_TIMEOUT = 300.0
CONTROL_TIMEOUT = 30.0
# The memory digest's cache: pfns per block (256 KiB: a block a write
# touched is cheap to read again), blocks a warming pass reads at most,
# and seconds between two refreshes of a migrating domain's cache.
_DIGEST_BLOCK = 64
_DIGEST_CHUNK = 64
# A restore's mapping of at least this many pages is digested as it
# closes (SimHost._digest_written).
_DIGEST_INLINE_MIN = 64
_DIGEST_P2M_INTERVAL = 0.2
DIGEST_WARM_INTERVAL = 0.1
# The next spare guest process and spare RAM are prepared this long after
# the domain that took the previous ones runs, so that preparing them does
# not compete with the migration that brought the domain.
REPLENISH_DELAY = 1.0
NR_GRANT_FRAMES = 4
# Xen lets a domain hold its RAM plus the special pages and some slack
# (max_pages is set a little above the target by the toolstack).
EXTRA_PAGES = layout.X86_HVM_NR_SPECIAL_PAGES + 1024
TSC_KHZ = 2994000
DOM0_TICK = 0.01
# Where the vbd disks are when [xen_ncm_sim] disk_dir is unset: under
# the user's private state directory (XDG), not a name in /tmp that
# another user could take first.
DEFAULT_DISK_SUBDIR = os.path.join("nova-xen-ncm", "sim-disks")
# vcpu_time_info.system_time in a vcpu_info (xen.h, x86_64).
_SYSTEM_TIME = 32 + 16
# libxl's LIBXL_DOMID_REUSE_TIMEOUT: a released domid is not given to a
# new domain for this long.
DOMID_REUSE_TIMEOUT = 60.0
DEFAULT_PARAMS_FLAGS = {
    hvm.HVM_PARAM_PAE_ENABLED: 1,
    hvm.HVM_PARAM_TIMER_MODE: 1,  # HVMPTM_no_delay_for_missed_ticks
    hvm.HVM_PARAM_HPET_ENABLED: 1,
    hvm.HVM_PARAM_NR_IOREQ_SERVER_PAGES: 0,
    hvm.HVM_PARAM_VM86_TSS_SIZED: 0,
}

# The host operations that fault injection may delay or fail.
FAULTY_CALLS = (
    "list_domains domain_info find_domain create_domain "
    "create_empty_domain destroy_domain pause unpause populated_pfns "
    "populate map_pages enable_log_dirty harvest_dirty disable_log_dirty "
    "set_vcpu_throttle get_hvm_context set_hvm_context get_hvm_params "
    "set_hvm_params get_tsc_info set_tsc_info quiesce_backends "
    "resume_backends export_pv_state import_pv_state"
).split()


class _Dom0:
    """The control domain: privileged, no RAM of its own here; its event
    channel bits are private arrays and its upcalls run handlers."""

    domid = DOM0
    vcpus = 1
    privileged = True

    def __init__(self, hostname: str) -> None:
        self.ports: dict[int, evtchn.Channel] = {}
        self._shinfo = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self.bits = evtchn.PendingBits(self._shinfo, self._vcpu_info)
        self._lock = threading.Lock()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._kicks: queue.Queue = queue.Queue()
        self.on_tick: Callable[[], None] = lambda: None
        self.on_wake: Callable[[], None] = lambda: None
        self._thread = threading.Thread(
            target=self._run, name=f"{hostname}-dom0-events", daemon=True
        )
        self._thread.start()

    def _vcpu_info(self, vcpu: int) -> np.ndarray:
        return self._shinfo[: evtchn.VCPU_INFO_SIZE]

    @contextlib.contextmanager
    def mem_lock(self):
        with self._lock:
            yield

    def kick(self, vcpu: int) -> None:
        self._kicks.put(vcpu)

    def stop(self) -> None:
        self._kicks.put(None)

    def wake(self) -> None:
        """Watch events are queued for dom0's xenstore connection."""
        self._kicks.put("watch")

    def _take_pending(self) -> list[int]:
        ports = []
        with self._lock:
            vi = self._vcpu_info(0)
            vi[evtchn.VI_UPCALL_PENDING] = 0
            sel_view = vi[8:16].view(np.uint64)
            sel = int(sel_view[0])
            sel_view[0] = 0
            words = self.bits.words
            for w in range(64):
                if not sel >> w & 1:
                    continue
                pi = evtchn.SHINFO_PENDING // 8 + w
                ready = int(words[pi] & ~words[evtchn.SHINFO_MASK // 8 + w])
                words[pi] &= np.uint64(~ready & (2**64 - 1))
                ports += [w * 64 + b for b in range(64) if ready >> b & 1]
        return ports

    def _call(self, what: str, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # a dom0 service failing is not fatal
            LOG.exception("dom0: %s failed", what)

    def _run(self) -> None:
        next_tick = time.monotonic() + DOM0_TICK
        while True:
            try:
                item = self._kicks.get(
                    timeout=max(0.0, next_tick - time.monotonic())
                )
            except queue.Empty:
                item = "tick"
            if item is None:
                return
            if item == "watch":
                self._call("watch dispatch", self.on_wake)
            elif item != "tick":
                for port in self._take_pending():
                    handler = self.handlers.get(port)
                    if handler is not None:
                        self._call(f"handler of port {port}", handler, port)
            if time.monotonic() >= next_tick:
                self._call("tick", self.on_tick)
                next_tick = time.monotonic() + DOM0_TICK


class _Domain:
    """A guest domain: the hypervisor's view of it."""

    privileged = False
    max_evtchn_port = evtchn.DEFAULT_MAX_EVTCHN_PORT

    def __init__(
        self,
        host: SimHost,
        domid: int,
        config: base.DomainConfig,
        hvm_layout: layout.HvmLayout,
        spare_ram: SpareRam | None = None,
    ) -> None:
        self.host = host
        self.domid = domid
        self.config = config
        self.name = config.name
        self.uuid = config.uuid or str(uuidlib.uuid4())
        self.vcpus = config.vcpus
        self.layout = hvm_layout
        self.mem = GuestMemory.create(
            hvm_layout.max_pfn,
            f"{host.hostname}-d{domid}",
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
        self.throttle = 1.0
        self.backends_quiesced = False
        # Ports made pending while quiesced (evtchn.set_pending), raised
        # on resume_backends; None when events are delivered.
        self.held_ports: set[int] | None = None
        self.proc: subprocess.Popen | None = None
        self.ctl: socket.socket | None = None
        self.hc: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.request_lock = threading.Lock()
        self.next_id = 0
        self.writable_maps: dict[int, np.ndarray] = {}
        self.dom0_ports: list[int] = []
        self.backends: dict[str, devices.Backend] = {}
        self.dom0_store_port = 0
        # Backends an import reconnected, held quiescent until unpause.
        self.backends_held = False
        # Tokens of the held backends an unpause already resumed.
        self.released_backends: set[str] = set()
        self.disks: list[devices.BlockStore] = []
        # Whether the guest's disks are this host's to delete: it booted
        # or was committed here, and its state has not left since.
        self.disks_here = False
        self.detached_ring: memoryview | None = None
        self.booted = False
        self.run_started = 0.0
        self.cpu_time = 0.0
        # The memory digest's cache: per block of _DIGEST_BLOCK pfns with
        # non-zero RAM, the digest of those pages; the hash of the
        # populated set and the p2m version it was taken at. Kept warm
        # while the domain migrates (SimHost._warm, _digest_written).
        self.digest_lock = threading.Lock()
        self.digest_blocks: dict[int, bytes] = {}
        self.digest_started = False
        self.digest_populated = b""
        self.digest_version = -1
        self.digest_p2m_at = 0.0
        self.digest_pending: set[int] = set()
        self.digest_mask: np.ndarray | None = None
        self.warming = False

    # -- what evtchn.EventChannelOps needs --

    def mem_lock(self):
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
        """Inject the callback vector: tell the guest process."""
        if self.ctl is None:
            return
        try:
            with self.send_lock:
                ipc.send(self.ctl, {"cmd": "upcall", "vcpu": vcpu})
        except OSError:
            LOG.debug("dom%d: upcall not delivered, guest gone", self.domid)

    # -- the guest process --

    def request(self, msg: dict, timeout: float = CONTROL_TIMEOUT) -> object:
        call = msg["cmd"]
        if self.ctl is None:
            raise HostError(
                f"domain {self.domid} has no running guest", call=call
            )
        with self.request_lock:
            self.next_id += 1
            msg = dict(msg, id=self.next_id)
            try:
                with self.send_lock:
                    ipc.send(self.ctl, msg)
                self.ctl.settimeout(timeout)
                while True:
                    reply = ipc.recv(self.ctl)
                    if reply.get("id") == self.next_id:
                        break
            except (OSError, ipc.ChannelClosed) as exc:
                raise HostError(
                    f"guest of domain {self.domid} did not answer: {exc}",
                    call=call,
                ) from exc
            finally:
                with contextlib.suppress(OSError):
                    self.ctl.settimeout(None)
        if "err" in reply:
            raise HostError(
                f"guest of domain {self.domid}: {reply.get('msg')}",
                call=call,
                errno=reply["err"],
            )
        return reply.get("ok")

    def cpu_registers(self) -> list[dict]:
        regs = []
        for rec in self.records:
            if rec.typecode == hvm.CODE_CPU:
                regs.append(hvm.cpu_registers(rec.data))
        return regs

    def _host_tsc(self) -> int:
        """This host's TSC (ticking at the guest's frequency)."""
        return self.host.now_ns() * self.tsc.khz // 1_000_000

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
        (update_domain_wallclock_time). The guest's system time follows
        its TSC, so it is monotonic across a migration (it stands still
        while the guest is in transit); the wallclock, the wall time at
        system time 0, is rebased on this host's clock, so that
        wallclock + system time is the time of day here. The caller
        holds the memory lock."""
        scale = hvm.TimeScale.for_khz(self.tsc.khz)
        tsc = self.guest_tsc()
        system_time = scale.scale(max(tsc, 0))
        for v in range(self.vcpus):
            if v in self.vcpu_info_at or v < evtchn.XEN_LEGACY_MAX_VCPUS:
                hvm.write_vcpu_time(
                    memoryview(self._vcpu_info(v)), tsc, system_time, scale
                )
        hvm.write_wallclock(
            memoryview(self.mem.xen_pages[XENPAGE_SHARED_INFO]),
            time.time_ns() - system_time,
        )

    def save_registers(self, regs: Sequence[Mapping[str, int]]) -> None:
        guest_tsc = self.guest_tsc()
        for rec in self.records:
            if rec.typecode == hvm.CODE_CPU and rec.instance < len(regs):
                values = dict(regs[rec.instance], tsc=guest_tsc)
                rec.data = hvm.with_cpu_registers(rec.data, values)


def _spans(blocks: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[first, last) of each stretch of consecutive ``blocks`` (sorted)."""
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        yield blocks[i], blocks[j] + 1
        i = j + 1


def canonical_uuid(text: str) -> str:
    """``text`` as a canonical UUID; ValueError naming it otherwise."""
    try:
        return str(uuidlib.UUID(str(text)))
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID") from None


def _faulty(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: SimHost, *args: object, **kwargs: object) -> object:
        if not getattr(self._observer, "depth", 0):
            self._inject_fault(method.__name__)
        return method(self, *args, **kwargs)

    return wrapper


class SimHost(base.HostDriver):
    """A Xen host simulated in this process (see the module docstring)."""

    def __init__(
        self,
        hostname: str = "sim",
        conf: cfg.ConfigOpts | None = None,
        *,
        prelaunch: bool = True,
    ) -> None:
        """``prelaunch``: start a restoring domain's guest process when
        the domain is created, so that its start-up is not downtime
        (tests of the hypervisor model alone turn it off)."""
        if conf is None:
            from nova_xen_ncm.conf import CONF as conf
        if "xen_ncm_sim" not in conf:
            sim_conf.register_opts(conf)
        self.hostname = hostname
        # A simulated host boots when it is built.
        self._boot_id = str(uuidlib.uuid4())
        self.opts = conf.xen_ncm_sim
        self.memory_bytes = self.opts.host_memory_mb * MiB
        self._lock = threading.RLock()
        self._domains: dict[int, _Domain] = {}
        # The domid allocator's state: the last domid it gave, and when
        # each recently destroyed domain's domid was released.
        self._domid_last = 0
        self._domid_released: dict[int, float] = {}
        # Whose each released domid was (its uuid).
        self._domid_released_by: dict[int, str] = {}
        # Xen's NOW() here: ns since this host booted (hosts booted at
        # different times, so a migrating guest's host time jumps).
        uptime = zlib.crc32(hostname.encode()) % 86_400 + 60
        self._boot_ns = time.monotonic_ns() - uptime * 1_000_000_000
        self.dom0 = _Dom0(hostname)
        self.evtchn = evtchn.EventChannelOps(self._lookup)
        self.xenstore = Xenstore()
        self._xs_conn = self.xenstore.connect(DOM0, wakeup=self.dom0.wake)
        self.dom0_xs = devices.XenstoreConnectionClient(
            self.xenstore, self._xs_conn
        )
        # The toolstack's own connection (device directories).
        self._toolstack_xs = LocalClient(self.xenstore)
        self._backends: dict[str, devices.Backend] = {}
        # Guest ports an import linked to dom0 for a backend to take over.
        self._prelinked: set[tuple[int, int]] = set()
        self.dom0.on_wake = self._dispatch_watches
        self.dom0.on_tick = self._service_backends
        self._maptrack: dict[int, tuple[int, int, bool]] = {}
        self._next_handle = 1
        self._faults = random.Random(self.opts.fault_seed)
        # Threads inside observing(): the checker's calls, not faulted.
        self._observer = threading.local()
        self._prelaunch = prelaunch
        self._closed = False
        self._spare: tuple[subprocess.Popen, socket.socket] | None = None
        self._spare_ram: SpareRam | None = None
        self._replenish_stop = threading.Event()
        self._replenish_thread: threading.Thread | None = None
        self._reaping: list[threading.Thread] = []
        if self.opts.spare_guest_process:
            self._spare = self._start_spare()
        self._spare_ram = self._new_spare_ram()

    # -- internals --

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        self._observer.depth = getattr(self._observer, "depth", 0) + 1
        try:
            yield
        finally:
            self._observer.depth -= 1

    def _inject_fault(self, call: str) -> None:
        if self.opts.call_latency_s:
            time.sleep(self.opts.call_latency_s)
        p = self.opts.call_failure_probability
        if p and self._faults.random() < p:
            raise HostError("injected failure", call=call, errno=errnos.EIO)

    def _lookup(self, domid: int) -> object:
        if domid == DOM0:
            return self.dom0
        dom = self._domains.get(domid)
        if dom is None:
            raise evtchn.HypercallError(
                "domain lookup", errnos.ESRCH, f"no domain {domid}"
            )
        return dom

    def _domain(self, domid: int, call: str) -> _Domain:
        dom = self._domains.get(domid)
        if dom is None:
            raise base.DomainNotFound(
                f"no domain {domid} on {self.hostname}", call=call
            )
        return dom

    def _check_config(self, config: base.DomainConfig, call: str) -> None:
        if not 1 <= config.vcpus <= kernel.MAX_VCPUS:
            raise HostError(
                f"vcpus must be 1..{kernel.MAX_VCPUS}, got {config.vcpus}",
                call=call,
            )
        try:
            layout.HvmLayout.for_memory(config.memory_bytes)
        except ValueError as exc:
            raise HostError(str(exc), call=call) from None
        workload = dict(config.workload)
        pattern = workload.get("pattern", self.opts.dirty_pattern)
        if pattern not in kernel.PATTERNS:
            raise HostError(
                f"workload pattern {pattern!r} is not one of "
                f"{sorted(kernel.PATTERNS)}",
                call=call,
            )
        fill = workload.get("fill", self.opts.memory_fill)
        if fill not in kernel.FILLS:
            raise HostError(
                f"workload fill {fill!r} is not one of {sorted(kernel.FILLS)}",
                call=call,
            )
        for dev in config.devices:
            if dev.kind not in devices.BACKENDS:
                raise HostError(
                    f"device kind {dev.kind!r} is not one of "
                    f"{sorted(devices.BACKENDS)}",
                    call=call,
                )
            if dev.backend_domid != DOM0:
                raise HostError(
                    f"{dev.kind} {dev.devid}: backend domain "
                    f"{dev.backend_domid} does not exist (only "
                    f"dom0 runs backends here)",
                    call=call,
                )
            if dev.kind == "vbd" and dev.disk_bytes is not None:
                least = devices.DEFAULT_SECTORS * devices.SECTOR_BYTES
                if (
                    dev.disk_bytes < least
                    or dev.disk_bytes % devices.SECTOR_BYTES
                ):
                    raise HostError(
                        f"vbd {dev.devid}: disk_bytes {dev.disk_bytes} must "
                        f"be a multiple of {devices.SECTOR_BYTES} of at "
                        f"least {least}",
                        call=call,
                    )
        keys = [(d.kind, d.devid) for d in config.devices]
        if len(set(keys)) != len(keys):
            raise HostError("two devices share a kind and devid", call=call)
        rate = workload.get("dirty_rate", self.opts.dirty_rate_bytes)
        if not isinstance(rate, int) or rate < 0:
            raise HostError(
                f"workload dirty_rate must be a non-negative "
                f"integer, got {rate!r}",
                call=call,
            )

    def _reserve(
        self, config: base.DomainConfig, domid: int, call: str
    ) -> _Domain:
        """Check and create the domain record (host lock held)."""
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise HostError(
                f"domid {domid} is outside 1..{DOMID_FIRST_RESERVED - 1}",
                call=call,
            )
        if domid in self._domains:
            raise base.DomidInUse(
                f"domid {domid} is held by {self._domains[domid].name!r}",
                call=call,
            )
        released = self._domid_released.get(domid)
        if (
            released is not None
            and time.monotonic() - released < DOMID_REUSE_TIMEOUT
            and not self._same_guest(
                self._domid_released_by.get(domid), config.uuid
            )
        ):
            # libxl__domain_make: a domid asked for is not retried. The
            # guest that held it may have it back (a restore or a
            # migration back): the delay guards against another guest
            # inheriting what named the old one, and the real driver
            # restores with LIBXL_DOMID_REUSE_TIMEOUT=0 for that reason.
            raise base.DomidInUse(
                f"domid {domid}: domain id recently used (released "
                f"{time.monotonic() - released:.0f} s ago; not reused for "
                f"{DOMID_REUSE_TIMEOUT:.0f} s)",
                call=call,
            )
        self._check_config(config, call)
        if config.uuid is not None:
            try:
                wanted = canonical_uuid(config.uuid)
            except ValueError as exc:
                raise HostError(str(exc), call=call) from None
            for other in self._domains.values():
                if canonical_uuid(other.uuid) == wanted:
                    raise HostError(
                        f"uuid {wanted} is held by domain {other.domid} "
                        f"({other.name!r})",
                        call=call,
                    )
        if config.memory_bytes > self._free_memory():
            raise base.InsufficientMemory(
                f"{config.memory_bytes} bytes asked, "
                f"{self._free_memory()} free",
                call=call,
            )
        hvm_layout = layout.HvmLayout.for_memory(config.memory_bytes)
        spare_ram = self._spare_ram
        if spare_ram is not None and spare_ram.max_pfn == hvm_layout.max_pfn:
            self._spare_ram = None
        else:
            spare_ram = None
        try:
            dom = _Domain(self, domid, config, hvm_layout, spare_ram)
        except BaseException:
            if spare_ram is not None:
                spare_ram.close()
            raise
        self._domains[domid] = dom
        return dom

    def now_ns(self) -> int:
        """The hypervisor's system time (Xen's NOW())."""
        return time.monotonic_ns() - self._boot_ns

    @staticmethod
    def _same_guest(released_by: str | None, uuid: str | None) -> bool:
        if not released_by or not uuid:
            return False
        try:
            return canonical_uuid(released_by) == canonical_uuid(uuid)
        except ValueError:
            return False

    def _alloc_domid(self, call: str) -> int:
        """Xen's allocator (xen/common/domid.c): the next free domid after
        the last one allocated, round-robin over 1..DOMID_FIRST_RESERVED-1;
        as libxl does (libxl__is_domid_recent), skipping domids released
        less than DOMID_REUSE_TIMEOUT ago. Host lock held."""
        now = time.monotonic()
        self._domid_released = {
            d: t
            for d, t in self._domid_released.items()
            if now - t < DOMID_REUSE_TIMEOUT
        }
        last = self._domid_last
        for domid in itertools.chain(
            range(last + 1, DOMID_FIRST_RESERVED), range(1, last + 1)
        ):
            taken = domid in self._domains or domid in self._domid_released
            if not taken:
                self._domid_last = domid
                return domid
        raise HostError(
            "no domid free (recently released ones are not reused for "
            f"{DOMID_REUSE_TIMEOUT:.0f} s)",
            call=call,
        )

    def _free_memory(self) -> int:
        used = sum(d.config.memory_bytes for d in self._domains.values())
        return self.memory_bytes - used

    def _workload(self, dom: _Domain) -> dict:
        w = dict(dom.config.workload)
        o = self.opts
        return {
            "memory_bytes": dom.config.memory_bytes,
            "vcpus": dom.vcpus,
            "pv_drivers": dom.config.pv_drivers,
            "dirty_rate": int(w.get("dirty_rate", o.dirty_rate_bytes)),
            "pattern": w.get("pattern", o.dirty_pattern),
            "fill": w.get("fill", o.memory_fill),
            "seed": int(w.get("seed", dom.domid * 7919 + 17)),
            "hot_fraction": float(w.get("hot_fraction", o.hot_fraction)),
            "hot_probability": float(
                w.get("hot_probability", o.hot_probability)
            ),
            "nr_grant_frames": NR_GRANT_FRAMES,
            "domid": dom.domid,
            "io_rate": float(w.get("io_rate", o.io_rate_requests)),
        }

    def _build(self, dom: _Domain) -> None:
        """What the toolstack does for a new HVM guest (xg_dom_x86.c
        meminit_hvm/bootlate_hvm, libxl__build_hvm): populate RAM and
        special pages, set the params, allocate the store and console
        event channels for dom0, introduce the domain to xenstored."""
        mem = dom.mem
        mem.populate(dom.layout.initial_pfns())
        sp = layout.special_pfn
        dom.params = {
            hvm.HVM_PARAM_STORE_PFN: sp(layout.SPECIALPAGE_XENSTORE),
            hvm.HVM_PARAM_CONSOLE_PFN: sp(layout.SPECIALPAGE_CONSOLE),
            hvm.HVM_PARAM_IOREQ_PFN: sp(layout.SPECIALPAGE_IOREQ),
            hvm.HVM_PARAM_BUFIOREQ_PFN: sp(layout.SPECIALPAGE_BUFIOREQ),
            hvm.HVM_PARAM_PAGING_RING_PFN: sp(layout.SPECIALPAGE_PAGING),
            hvm.HVM_PARAM_MONITOR_RING_PFN: sp(layout.SPECIALPAGE_ACCESS),
            hvm.HVM_PARAM_SHARING_RING_PFN: sp(layout.SPECIALPAGE_SHARING),
            hvm.HVM_PARAM_IDENT_PT: sp(layout.SPECIALPAGE_IDENT_PT)
            << base.PAGE_SHIFT,
            hvm.HVM_PARAM_CALLBACK_IRQ: 0,
            **DEFAULT_PARAMS_FLAGS,
        }
        for param in (
            hvm.HVM_PARAM_STORE_EVTCHN,
            hvm.HVM_PARAM_CONSOLE_EVTCHN,
        ):
            port = self.evtchn.alloc_unbound(self.dom0, dom.domid, DOM0)
            dom.params[param] = port
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]
        xs_wire.init_interface(mem.page(store_pfn, writable=True))
        # xc_dom_gnttab_seed(): the reserved entries give the console
        # and xenstore rings to the domains serving them (dom0 here).
        for ref, param in (
            (grant.GNTTAB_RESERVED_CONSOLE, hvm.HVM_PARAM_CONSOLE_PFN),
            (grant.GNTTAB_RESERVED_XENSTORE, hvm.HVM_PARAM_STORE_PFN),
        ):
            dom.grants.write(
                ref, grant.GTF_permit_access, DOM0, dom.params[param]
            )
        self._xenstore_connect(dom)
        self._bind_dom0_services(dom)
        for dev in dom.config.devices:
            devices.add_device(self.dom0_xs, dom.domid, dev)
            be = devices.BACKENDS[dev.kind](
                domid=dom.domid,
                devid=dev.devid,
                backend_domid=dev.backend_domid,
                xs=self.dom0_xs,
                grants=self,
                evtchn=self,
                **self._backend_extra(
                    dom,
                    dev.kind,
                    dev.devid,
                    devices.disk_sectors(dev) * devices.SECTOR_BYTES,
                ),
            )
            # Started by create_domain once the host lock is released: a
            # backend calls into the host with its own lock held.
            dom.backends[be.token] = be

    def _xenstore_connect(
        self,
        dom: _Domain,
        xs_state: base.XenstoreState | None = None,
        policy: ImportPolicy | None = None,
    ) -> None:
        """Introduce the domain to xenstored, or import its xenstore
        (which validates everything before it changes anything)."""
        domid = dom.domid
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]
        page = dom.mem.page(store_pfn, writable=True)
        notify = self._store_notify(dom)

        if xs_state is not None:
            # The ring is attached at unpause: the import fires each
            # restored watch once (a legal spurious event), and until the
            # guest runs its memory must stay exactly as at pause.
            self.xenstore.import_domain(domid, xs_state, policy, notify=notify)
            dom.detached_ring = page
        else:
            self.xenstore.create_domain_home(domid)
            self.xenstore.introduce_domain(
                domid,
                page=page,
                notify=notify,
                store_gfn=store_pfn,
                store_port=dom.params[hvm.HVM_PARAM_STORE_EVTCHN],
            )

    def _store_notify(self, dom: _Domain) -> Callable[[], None]:
        """xenstored signalling the guest after writing its ring."""
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]

        def notify() -> None:
            dom.mem.mark_dirty(store_pfn)
            if dom.dom0_store_port:
                self.evtchn.send(self.dom0, dom.dom0_store_port)

        return notify

    def _bind_dom0_services(self, dom: _Domain) -> None:
        """Bind xenstored's and the console daemon's ends of the store
        and console channels (an import has linked them already)."""
        domid = dom.domid
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]

        def serve(port: int) -> None:
            if domid in self._domains and not dom.backends_quiesced:
                self.xenstore.service_ring(domid)
                dom.mem.mark_dirty(store_pfn)

        for param, handler in (
            (hvm.HVM_PARAM_STORE_EVTCHN, serve),
            (hvm.HVM_PARAM_CONSOLE_EVTCHN, lambda port: None),
        ):
            guest_port = dom.params[param]
            ch = dom.ports[guest_port]
            if ch.type == EvtchnType.INTERDOMAIN:
                local = ch.remote_port
                self._prelinked.discard((domid, guest_port))
            else:
                local = self._dom0_bind(dom, guest_port)
            self.dom0.handlers[local] = handler
            if param == hvm.HVM_PARAM_STORE_EVTCHN:
                dom.dom0_store_port = local

    def disk_dir(self) -> str:
        """The directory of the vbd disks: ``[xen_ncm_sim] disk_dir``, or
        the user's own ``$XDG_STATE_HOME/nova-xen-ncm/sim-disks``."""
        if self.opts.disk_dir:
            return self.opts.disk_dir
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
        return os.path.join(state, DEFAULT_DISK_SUBDIR)

    def disk_path(self, uuid: str, devid: int) -> str:
        """The file of a guest's vbd on the storage the hosts share.
        ``uuid`` must be a UUID (any spelling; the file has its canonical
        form), so it cannot name a file outside the directory."""
        return os.path.join(
            self.disk_dir(), f"{canonical_uuid(uuid)}-{int(devid)}.disk"
        )

    def _backend_extra(
        self, dom: _Domain, kind: str, devid: int, size: int | None = None
    ) -> dict:
        """A vbd backend's disk: created with ``size`` bytes at the
        guest's first boot and kept as it is on a later one (``size``
        given), the existing file for a guest restored (``size`` None)."""
        if kind != "vbd":
            return {}
        call = "create_domain" if size is not None else "import_pv_state"
        try:
            path = self.disk_path(dom.uuid, devid)
        except ValueError as exc:
            raise HostError(str(exc), call=call) from None
        if size is not None:
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise HostError(
                    f"disk directory {os.path.dirname(path)} cannot be "
                    f"made: {exc.strerror}",
                    call=call,
                ) from None
        try:
            store = devices.BlockStore.open(path, size)
        except devices.BackendError as exc:
            raise HostError(str(exc), call=call) from None
        dom.disks.append(store)
        return {"store": store}

    def _delete_disks(self, dom: _Domain) -> None:
        """Remove the files of the guest's vbds (its disks are gone with
        it: Nova's destroy_disks)."""
        for dev in dom.config.devices:
            if dev.kind != "vbd":
                continue
            path = self.disk_path(dom.uuid, dev.devid)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                LOG.warning("Could not delete disk %s: %s", path, exc)

    def _backend_states(self, dom: _Domain) -> tuple[base.BackendState, ...]:
        """The connections of the guest's backends, in (kind, devid)
        order."""
        states = [be.export() for be in list(dom.backends.values())]
        return tuple(sorted(states, key=lambda b: (b.kind, b.devid)))

    def _add_backend(self, dom: _Domain, be: devices.Backend) -> None:
        dom.backends[be.token] = be
        self._backends[be.token] = be

    def _dispatch_watches(self) -> None:
        events = self.dom0_xs.pop_events()
        for token in devices.dispatch_watch_events(events, self._backends):
            LOG.debug("dom0: watch event for unknown token %s", token)

    def _service_backends(self) -> None:
        """The disks finish what the backends took: requests are taken
        only on their port's event (a port bound wrong stalls I/O)."""
        for be in list(self._backends.values()):
            if not be.quiesced:
                be.complete_requests()

    def _dom0_bind(self, dom: _Domain, guest_port: int) -> int:
        port = self.evtchn.bind_interdomain(self.dom0, dom.domid, guest_port)
        dom.dom0_ports.append(port)
        return port

    def _new_spare_ram(self) -> SpareRam | None:
        """Free memory faulted in for the next domain ([xen_ncm_sim]
        prefault_memory_mb), if the option and the free memory allow."""
        with self._lock:
            size = min(
                self.opts.prefault_memory_mb * MiB, self._free_memory()
            )
        # Spare RAM fits guests of up to 3.75 GiB: their RAM below the
        # MMIO hole starts at pfn 0, and they share one max_pfn.
        pages = min(size // PAGE_SIZE, layout.MMIO_HOLE_START_PFN)
        if pages <= 0:
            return None
        return SpareRam(
            layout.X86_HVM_END_SPECIAL_REGION,
            pages,
            f"{self.hostname}-spare",
            self._replenish_stop,
        )

    def _replenish(self) -> None:
        """Prepare the next spare guest process and spare RAM, after
        REPLENISH_DELAY and in the background."""
        wanted = self.opts.spare_guest_process or self.opts.prefault_memory_mb
        with self._lock:
            if not wanted or self._closed or self._replenish_thread:
                return
            self._replenish_thread = threading.Thread(
                target=self._run_replenish,
                name=f"{self.hostname}-replenish",
                daemon=True,
            )
        self._replenish_thread.start()

    def _run_replenish(self) -> None:
        try:
            if self._replenish_stop.wait(REPLENISH_DELAY):
                return
            if self.opts.spare_guest_process and self._spare is None:
                spare = self._start_spare()
                with self._lock:
                    if self._spare is None and not self._closed:
                        spare, self._spare = None, spare
                if spare is not None:
                    self._end_spare(spare)
            if self._spare_ram is None:
                ram = self._new_spare_ram()
                with self._lock:
                    if self._spare_ram is None and not self._closed:
                        ram, self._spare_ram = None, ram
                if ram is not None:
                    ram.close()
        except SpareRamAbandoned:
            pass
        except OSError as exc:
            LOG.warning(
                "%s: spare guest resources not prepared: %s",
                self.hostname,
                exc,
            )
        finally:
            with self._lock:
                self._replenish_thread = None

    def _start_spare(self) -> tuple[subprocess.Popen, socket.socket]:
        """Start the guest process of the next domain ahead of it
        ([xen_ncm_sim] spare_guest_process)."""
        host_end, guest_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET
        )
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nova_xen_ncm.host.sim.guest",
                    "--spare",
                    str(guest_end.fileno()),
                ],
                pass_fds=(guest_end.fileno(),),
                close_fds=True,
                # A guest is not part of the toolstack's terminal job:
                # Ctrl-C on the command that runs the host must not
                # reach it (the command cancels and rolls back instead).
                start_new_session=True,
            )
        except OSError:
            host_end.close()
            raise
        finally:
            guest_end.close()
        return proc, host_end

    def _take_spare(
        self, args: dict, fds: tuple[int, ...]
    ) -> subprocess.Popen | None:
        """Hand the domain to the spare guest process, if there is one
        alive (the next one is started by _replenish)."""
        with self._lock:
            spare, self._spare = self._spare, None
        proc = None
        if spare is not None:
            candidate, chan = spare
            try:
                if candidate.poll() is None:
                    socket.send_fds(chan, [json.dumps(args).encode()], fds)
                    proc = candidate
            except OSError:
                candidate.kill()
            finally:
                chan.close()
            if proc is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    candidate.wait(timeout=5)
        return proc

    def _stop_spare(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
            ram, self._spare_ram = self._spare_ram, None
        if ram is not None:
            ram.close()
        if spare is not None:
            self._end_spare(spare)

    @staticmethod
    def _end_spare(spare: tuple[subprocess.Popen, socket.socket]) -> None:
        proc, chan = spare
        chan.close()  # the spare exits when its channel closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _launch(self, dom: _Domain) -> None:
        """Start the guest process; it maps the domain's memory and waits
        for ``start``. A restoring domain gets it at creation, so that
        the interpreter's start-up is not part of the downtime."""
        hc_host, hc_guest = socket.socketpair()
        ctl_host, ctl_guest = socket.socketpair()
        fds = (
            dom.mem.ram_fd,
            dom.mem.ctl_fd,
            hc_guest.fileno(),
            ctl_guest.fileno(),
        )
        args = {
            "ram_fd": fds[0],
            "ctl_fd": fds[1],
            "hc_fd": fds[2],
            "ctl_sock_fd": fds[3],
            "config": self._workload(dom),
        }
        with dom.mem.lock():
            # ctl's tracking state is the process's about to start.
            dom.mem.reset_tracking()
        try:
            config = {"config": args["config"]}
            dom.proc = self._take_spare(config, fds)
            if dom.proc is None:
                dom.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "nova_xen_ncm.host.sim.guest",
                        json.dumps(args),
                    ],
                    pass_fds=fds,
                    close_fds=True,
                    start_new_session=True,
                )
        finally:
            hc_guest.close()
            ctl_guest.close()
        dom.mem.track(dom.proc.pid)
        dom.ctl, dom.hc = ctl_host, hc_host
        threading.Thread(
            target=self._serve_hypercalls,
            args=(dom,),
            name=f"{self.hostname}-d{dom.domid}-hypercalls",
            daemon=True,
        ).start()

    def _spawn(self, dom: _Domain, mode: str) -> None:
        """Boot the guest, or resume it from RAM and the HVM context, and
        run it (one request: a restored guest's downtime ends here)."""
        if dom.proc is None:
            self._launch(dom)
        with dom.mem_lock():
            dom.update_time()
        regs = dom.request(
            {
                "cmd": "start",
                "mode": mode,
                "regs": dom.cpu_registers(),
                "run": True,
                "throttle": dom.throttle,
            },
            timeout=START_TIMEOUT,
        )
        dom.save_registers(regs)
        dom.booted = True
        self._running(dom)
        self._reassert_upcalls(dom)

    def _stop_guest(self, dom: _Domain, *, wait: bool = True) -> None:
        """Stop the guest process. Without ``wait`` its exit (which
        unmaps all of guest RAM) is awaited in the background: the
        process runs no vCPU once it answered ``stop``."""
        proc, dom.proc = dom.proc, None
        if proc is None:
            return
        with contextlib.suppress(HostError):
            dom.request({"cmd": "stop"}, timeout=5.0)
        with dom.mem.lock():
            # What it wrote up to its stop is in the maps before the
            # tracker goes.
            dom.mem.flush_and_untrack()
        socks = (dom.ctl, dom.hc)
        dom.ctl = dom.hc = None

        def reap() -> None:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for sock in socks:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

        if wait:
            reap()
        else:
            self._in_background(reap)

    def _in_background(self, work: Callable[[], None]) -> None:
        """Run the slow end of a destroyed domain (its process's exit,
        the release of its memory) in a thread of its own, as Xen frees a
        dead domain's memory after ``destroy`` returns; close() waits for
        it."""

        def run() -> None:
            try:
                work()
            except Exception:  # nothing is left to tell
                LOG.exception(
                    "%s: releasing a destroyed domain", self.hostname
                )

        thread = threading.Thread(
            target=run, name=f"{self.hostname}-reap", daemon=True
        )
        with self._lock:
            self._reaping = [t for t in self._reaping if t.is_alive()]
            self._reaping.append(thread)
        thread.start()

    # -- hypercalls from guests --

    def _serve_hypercalls(self, dom: _Domain) -> None:
        sock = dom.hc
        while True:
            try:
                msg = ipc.recv(sock)
            except (OSError, ipc.ChannelClosed):
                return
            try:
                reply = {
                    "ok": self._hypercall(dom, msg["op"], msg.get("args", {}))
                }
            except evtchn.HypercallError as exc:
                reply = {"err": -(exc.errno or errnos.EINVAL), "msg": str(exc)}
            except grant.GrantError as exc:
                reply = {"err": exc.status, "msg": str(exc)}
            except (HostError, KeyError, TypeError, ValueError) as exc:
                reply = {"err": -errnos.EINVAL, "msg": str(exc)}
            try:
                ipc.send(sock, reply)
            except OSError:
                return

    def _hypercall(self, dom: _Domain, op: str, args: dict) -> object:
        with self._lock:
            if dom.domid not in self._domains:
                raise evtchn.HypercallError(op, errnos.ESRCH, "domain gone")
            if op.startswith("evtchn_"):
                result = getattr(self.evtchn, op[len("evtchn_") :])(
                    dom, **args
                )
                if isinstance(result, base.EventChannel):
                    return dataclasses.asdict(result)
                return result
            handler = getattr(self, f"_hc_{op}", None)
            if handler is None:
                raise evtchn.HypercallError(
                    op, errnos.ENOSYS, f"no hypercall {op}"
                )
            return handler(dom, **args)

    def _hc_hvm_set_param(self, dom: _Domain, index: int, value: int) -> None:
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
            self._reassert_upcalls(dom)

    def _hc_hvm_get_param(self, dom: _Domain, index: int) -> int:
        if not 0 <= index < hvm.HVM_NR_PARAMS:
            raise evtchn.HypercallError(
                "HVMOP_get_param", errnos.EINVAL, f"no param {index}"
            )
        return dom.params.get(index, 0)

    def _hc_add_to_physmap(
        self, dom: _Domain, space: str, idx: int, gfn: int
    ) -> None:
        """XENMEM_add_to_physmap, XENMAPSPACE_shared_info/grant_table."""
        call = "XENMEM_add_to_physmap"
        if not 0 <= gfn < dom.mem.max_pfn:
            raise evtchn.HypercallError(
                call, errnos.EINVAL, f"gfn {gfn:#x} out of range"
            )
        with dom.mem.lock():
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
        self, dom: _Domain, vcpu: int, gfn: int, offset: int
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
        with dom.mem.lock():
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

    # -- dom0 services for other parts of the simulated host --

    def dom0_bind_interdomain(
        self, domid: int, port: int, handler: Callable[[int], None]
    ) -> int:
        """Bind a dom0 port to a guest's unbound port (a backend
        connecting); ``handler(dom0_port)`` runs on the dom0 thread."""
        with self._lock:
            dom = self._domains.get(domid)
            if (domid, port) in self._prelinked and dom is not None:
                # Restored by import_pv_state with dom0's end in place:
                # the reconnecting backend takes that end over.
                self._prelinked.discard((domid, port))
                local = dom.ports[port].remote_port
            else:
                local = self.evtchn.bind_interdomain(self.dom0, domid, port)
            self.dom0.handlers[local] = handler
            return local

    def dom0_notify(self, port: int) -> None:
        with self._lock:
            self.evtchn.send(self.dom0, port)

    def dom0_close(self, port: int) -> None:
        with self._lock:
            self.dom0.handlers.pop(port, None)
            self.evtchn.close(self.dom0, port)

    def grant_map(
        self, domid: int, ref: int, readonly: bool = False, mapper: int = DOM0
    ) -> tuple[int, memoryview]:
        """GNTTABOP_map_grant_ref by ``mapper``: a handle and the granted
        page itself (read-only view for a read-only map)."""
        call = "GNTTABOP_map_grant_ref"
        with self._lock:
            dom = self._domains.get(domid)
            if dom is None:
                raise grant.GrantError(
                    call, grant.GNTST_bad_domain, f"no domain {domid}"
                )
            with dom.mem.lock():
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
        with self._lock:
            entry = self._maptrack.pop(handle, None)
            if entry is None:
                raise grant.GrantError(
                    "GNTTABOP_unmap_grant_ref",
                    grant.GNTST_bad_handle,
                    f"no grant handle {handle}",
                )
            domid, ref, readonly = entry
            dom = self._domains.get(domid)
            if dom is None:
                return
            with dom.mem.lock():
                gfn = dom.grants.unpin(ref, readonly)
                if not readonly:
                    dom.mem.mark_dirty(gfn)

    def guest_command(self, domid: int, cmd: str, /, **args: object) -> object:
        """Ask the guest's kernel to act (grant_access, end_access,
        write, hypercall): what its drivers would do on their own."""
        dom = self._domain(domid, cmd)
        return dom.request(dict(args, cmd=cmd))

    def default_config(self, name: str) -> base.DomainConfig:
        """A guest made of the [xen_ncm_sim] defaults (for demos)."""
        devs = []
        for spec in self.opts.guest_devices:
            kind, _, devid = spec.partition(":")
            if kind not in devices.BACKENDS or not devid.isdigit():
                raise HostError(
                    f"guest_devices entry {spec!r} is not "
                    f"kind:devid with kind one of "
                    f"{sorted(devices.BACKENDS)}"
                )
            devs.append(base.DeviceConfig(kind, int(devid)))
        return base.DomainConfig(
            name=name,
            memory_bytes=self.opts.guest_memory_mb * MiB,
            vcpus=self.opts.guest_vcpus,
            devices=tuple(devs),
        )

    # -- HostDriver: lifecycle --

    #: The optional GuestFeatures this host restores (capabilities()).
    FEATURES: frozenset[base.GuestFeature] = frozenset()
    def boot_id(self) -> str:
        return self._boot_id

    def capabilities(self) -> base.Capabilities:
        """What this host can do, probed: log-dirty needs the kernel's
        write tracking (memory.WriteTracker). The 2-level event channel
        ABI and grant table v1 are what is implemented; interdomain
        channels are rebound to dom0 only, and guest-set xenstore
        permissions naming a third domain are not carried (that domain
        is another one here): no optional GuestFeature is restorable."""
        return base.Capabilities(
            host=self.hostname,
            hypervisor="nova-xen-ncm simulated Xen 4.17",
            restore={item: None for item in Item},
            log_dirty=write_tracking_available() is None,
            max_vcpus=kernel.MAX_VCPUS,
            free_memory_bytes=self.free_memory(),
            # The simulated guests' vCPUs run on this machine's CPUs.
            pcpus=os.cpu_count() or 1,
            features=self.FEATURES,
        )

    def guest_features(self, domid: int) -> frozenset[base.GuestFeature]:
        call = "guest_features"
        dom = self._domain(domid, call)
        with self._lock:
            return frozenset(self._feature_uses(dom))

    def _feature_uses(self, dom: _Domain) -> dict[base.GuestFeature, str]:
        """base.feature_uses of the running guest: the predicate the
        import applies (_validate_pv_state), so SETUP refuses what the
        import would."""
        nodes: list = []
        if self.xenstore.is_introduced(dom.domid):
            xs = self.xenstore.export_domain(dom.domid, strict=False)
            nodes = list(xs.nodes)
            for tx in xs.transactions:
                nodes += [
                    w for w in tx.writes if isinstance(w, base.XenstoreNode)
                ]
        return base.feature_uses(
            dom.domid,
            base.EvtchnAbi.TWO_LEVEL,
            1,
            self.evtchn.table(dom),
            nodes,
            {d.backend_domid for d in dom.config.devices},
        )

    def _info(self, dom: _Domain) -> base.DomainInfo:
        if (
            dom.state == DomainState.RUNNING
            and dom.proc is not None
            and dom.proc.poll() is not None
        ):
            LOG.error(
                "dom%d: guest process exited with %s",
                dom.domid,
                dom.proc.returncode,
            )
            dom.cpu_time += time.monotonic() - dom.run_started
            dom.state = DomainState.CRASHED
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
        )

    @_faulty
    def list_domains(self) -> list[base.DomainInfo]:
        with self._lock:
            return [self._info(d) for _, d in sorted(self._domains.items())]

    @_faulty
    def domain_info(self, domid: int) -> base.DomainInfo:
        with self._lock:
            return self._info(self._domain(domid, "domain_info"))

    @_faulty
    def find_domain(self, name_or_uuid: str) -> base.DomainInfo:
        with self._lock:
            for dom in self._domains.values():
                if name_or_uuid in (dom.name, dom.uuid):
                    return self._info(dom)
        raise base.DomainNotFound(
            f"no domain named {name_or_uuid!r}", call="find_domain"
        )

    @_faulty
    def create_domain(self, config: base.DomainConfig) -> int:
        call = "create_domain"
        with self._lock:
            for d in self._domains.values():
                if d.name == config.name:
                    raise HostError(
                        f"a domain named {config.name!r} exists", call=call
                    )
            domid = self._alloc_domid(call)
            dom = self._reserve(config, domid, call)
            dom.disks_here = True
            try:
                self._build(dom)
            except BaseException:
                self._teardown(dom)
                raise
        try:
            for be in list(dom.backends.values()):
                self._add_backend(dom, be)
                be.start()
            self._spawn(dom, "boot")
        except BaseException:
            self._teardown(dom)
            raise
        self._replenish()
        return domid

    @_faulty
    def create_empty_domain(
        self, config: base.DomainConfig, domid: int
    ) -> int:
        with self._lock:
            dom = self._reserve(config, domid, "create_empty_domain")
            # The toolstack's device directories in dom0's backend tree,
            # which the restored backend areas go under.
            for parent in self._backend_parents(dom):
                self._toolstack_xs.write(parent, b"")
        if self._prelaunch:
            try:
                self._launch(dom)
            except BaseException:
                self._teardown(dom)
                raise
        self._warm(dom, lambda: dom.booted)
        return domid

    def _xs_exists(self, path: str) -> bool:
        try:
            self._toolstack_xs.read(path)
        except XenstoreError as exc:
            if exc.name == "ENOENT":
                return False
            raise
        return True

    def _backend_parents(self, dom: _Domain) -> set[str]:
        """dom0's per-domain directories above the backend areas."""
        parents = {
            f"/local/domain/{d.backend_domid}/backend/{d.kind}/{dom.domid}"
            for d in dom.config.devices
        }
        return parents | {
            b.backend_path.rsplit("/", 1)[0]
            for b in dom.backends.values()
        }

    def _start_running(self, dom: _Domain) -> None:
        with dom.mem_lock():
            dom.update_time()
            dom.mem.release_tracking()
        dom.request(
            {
                "cmd": "unpause",
                "regs": dom.cpu_registers(),
                "throttle": dom.throttle,
            }
        )
        self._running(dom)
        self._reassert_upcalls(dom)

    @staticmethod
    def _reassert_upcalls(dom: _Domain) -> None:
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
                if (
                    v in dom.vcpu_info_at
                    or v < evtchn.XEN_LEGACY_MAX_VCPUS
                )
                and dom.bits.upcall_pending(v)
            ]
        for v in pending:
            dom.kick(v)

    @staticmethod
    def _running(dom: _Domain) -> None:
        dom.state = DomainState.RUNNING
        dom.run_started = time.monotonic()

    def _teardown(self, dom: _Domain) -> None:
        self._stop_guest(dom, wait=False)
        with self._lock:
            parents = self._backend_parents(dom)
            backends = list(dom.backends.items())
            for token, _ in backends:
                self._backends.pop(token, None)
            dom.backends.clear()
        for _, be in backends:
            with contextlib.suppress(Exception):
                be.close()
        for disk in dom.disks:
            disk.close()
        # libxl removes the device areas of a destroyed domain.
        for parent in parents:
            with contextlib.suppress(XenstoreError):
                self._toolstack_xs.rm(parent)
        with self._lock:
            self._prelinked = {k for k in self._prelinked if k[0] != dom.domid}
            for handle, (domid, _, _) in list(self._maptrack.items()):
                if domid == dom.domid:
                    del self._maptrack[handle]
            for port in sorted(dom.ports):
                with contextlib.suppress(HostError):
                    self.evtchn.close(dom, port)
            for port in dom.dom0_ports:
                self.dom0.handlers.pop(port, None)
                with contextlib.suppress(HostError):
                    self.evtchn.close(self.dom0, port)
            if self.xenstore.is_introduced(dom.domid):
                self.xenstore.release_domain(dom.domid)
            if self._domains.pop(dom.domid, None) is not None:
                self._domid_released[dom.domid] = time.monotonic()
                self._domid_released_by[dom.domid] = dom.uuid or ""
        self._in_background(dom.mem.close)
        self._replenish()

    @_faulty
    def destroy_domain(self, domid: int, delete_disks: bool = False) -> None:
        """Destroy the domain; with ``delete_disks``, its vbd files too,
        unless the guest left (its state was exported: it runs on another
        host or from a save file) or never ran here (a restore rolled
        back: the disks are the source's)."""
        with self._lock:
            dom = self._domain(domid, "destroy_domain")
            dom.state = DomainState.DYING
        self._teardown(dom)
        if delete_disks and dom.disks_here:
            self._delete_disks(dom)

    @_faulty
    def pause(self, domid: int) -> None:
        dom = self._domain(domid, "pause")
        if dom.state != DomainState.RUNNING:
            return
        regs = dom.request({"cmd": "pause"})
        with dom.mem_lock():
            dom.mem.hold_tracking()
        dom.save_registers(regs)
        dom.state = DomainState.PAUSED
        dom.cpu_time += time.monotonic() - dom.run_started

    @_faulty
    def unpause(self, domid: int) -> None:
        dom = self._domain(domid, "unpause")
        if dom.state == DomainState.RUNNING:
            return
        self._release_backends(dom)
        dom.disks_here = True
        if dom.detached_ring is not None:
            page, dom.detached_ring = dom.detached_ring, None
            self.xenstore.attach_ring(domid, page, self._store_notify(dom))
        if not dom.booted:
            try:
                self._spawn(dom, "resume")
            except BaseException:
                self._stop_guest(dom)
                raise
            self._replenish()
        else:
            self._start_running(dom)

    def _reconnect_backends(
        self, dom: _Domain, states: Sequence[base.BackendState]
    ) -> None:
        """Backends of a restored guest take over (import_pv_state):
        same grant references, same ports, same indices; held quiescent
        (no storage write, no response) until the guest is unpaused.
        Called without the host lock, which a backend takes with its own
        lock held."""
        dom.backends_held = True
        dom.backends_quiesced = True
        for bs in states:
            try:
                be = devices.Backend.reconnect(
                    bs,
                    xs=self.dom0_xs,
                    grants=self,
                    evtchn=self,
                    quiesced=True,
                    **self._backend_extra(dom, bs.kind, bs.devid),
                )
            except (
                devices.BackendError,
                ringmod.RingError,
                HostError,
                OSError,
            ) as exc:
                raise HostError(
                    f"backend {bs.kind}/{bs.devid} cannot reconnect: {exc}",
                    call="import_pv_state",
                ) from None
            self._add_backend(dom, be)

    def _release_backends(self, dom: _Domain) -> None:
        """The guest runs here now (COMMIT): the reconnected backends
        answer the requests in flight and take new ones. A backend counts
        as released only once its own resume succeeded, so a failed
        unpause can be retried and releases the rest; any failure is a
        HostError, which the receiver's commit path handles."""
        if not dom.backends_held:
            return
        for token, be in list(dom.backends.items()):
            if token in dom.released_backends:
                continue
            try:
                be.resume()
            except Exception as exc:
                raise HostError(
                    f"backend {be.key} cannot resume: {exc}", call="unpause"
                ) from None
            dom.released_backends.add(token)
        dom.backends_held = False
        dom.backends_quiesced = False
        dom.released_backends.clear()

    def shutdown(self, domid: int, reboot: bool = False) -> None:
        if reboot:
            raise base.NotSupported(
                "the simulated guest has no reboot path", call="shutdown"
            )
        self.destroy_domain(domid)

    def free_memory(self) -> int:
        with self._lock:
            return self._free_memory()

    def console_output(self, domid: int) -> str:
        dom = self._domain(domid, "console_output")
        page = bytes(dom.mem.ram[kernel.HEADER_PFN])
        hdr = kernel.read_header(page)
        if hdr["magic"] != kernel.MAGIC:
            return ""
        lines = [
            f"simulated guest {dom.name}: {hdr['nr_vcpus']} vCPUs, "
            f"pattern {hdr['pattern']}, {hdr['upcalls']} upcalls"
        ]
        for v in range(hdr["nr_vcpus"]):
            slot = kernel.read_vcpu(page, v)
            lines.append(
                f"vcpu{v}: counter {slot['counter']} events "
                f"{slot['events']} ipis {slot['ipis_sent']}"
            )
        return "\n".join(lines) + "\n"

    # -- HostDriver: memory --

    @_faulty
    def populated_pfns(self, domid: int) -> np.ndarray:
        return self._domain(domid, "populated_pfns").mem.populated()

    @_faulty
    def populate(self, domid: int, pfns: np.ndarray) -> None:
        call = "populate"
        dom = self._domain(domid, call)
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
        with dom.mem.lock():
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

    @_faulty
    def map_pages(
        self, domid: int, pfns: np.ndarray, writable: bool = False
    ) -> base.PageMapping:
        dom = self._domain(domid, "map_pages")
        pfns = dom.mem.check_ram(pfns, "map_pages")
        return _SimPageMapping(dom, pfns, writable)

    @_faulty
    def enable_log_dirty(self, domid: int) -> None:
        dom = self._domain(domid, "enable_log_dirty")
        if dom.mem.tracking == TRACKER_FAILED:
            raise base.NotSupported(
                f"domain {domid}: its process could not arm write "
                "tracking (userfaultfd WP_ASYNC), so no write log is kept",
                call="enable_log_dirty",
            )
        dom.mem.set_log_dirty(True)
        if dom.state == DomainState.RUNNING:
            self._warm(dom, lambda: not dom.mem.log_dirty)
        else:
            # A paused guest's digest is taken from the pages as the
            # migration reads them (_digest_written), in the cache.
            with dom.digest_lock:
                self._digest_refresh(dom, 0)

    @_faulty
    def harvest_dirty(self, domid: int) -> np.ndarray:
        call = "harvest_dirty"
        dom = self._domain(domid, call)
        if not dom.mem.log_dirty:
            raise HostError(
                f"log-dirty is not enabled for domain {domid}", call=call
            )
        return dom.mem.harvest(self._unlocked_writes(dom))

    def _unlocked_writes(self, dom: _Domain) -> np.ndarray:
        """Pages others may write at any time without the memory lock:
        writable grant maps and mappings, and the xenstore ring."""
        with self._lock:
            extra = [
                dom.grants.writably_mapped_gfns(),
                *dom.writable_maps.values(),
            ]
            store = dom.params.get(hvm.HVM_PARAM_STORE_PFN)
            if store:
                extra.append(np.array([store], dtype=np.uint64))
        return np.concatenate(extra).astype(np.uint64)

    @_faulty
    def disable_log_dirty(self, domid: int) -> None:
        self._domain(domid, "disable_log_dirty").mem.set_log_dirty(False)

    @_faulty
    def set_vcpu_throttle(self, domid: int, fraction: float) -> None:
        call = "set_vcpu_throttle"
        dom = self._domain(domid, call)
        if not 0.0 < fraction <= 1.0:
            raise HostError(
                f"throttle fraction must be in (0, 1], got {fraction}",
                call=call,
            )
        dom.throttle = float(fraction)
        if dom.ctl is not None:
            dom.request({"cmd": "throttle", "fraction": dom.throttle})

    # -- HostDriver: platform state --

    @_faulty
    def get_hvm_context(self, domid: int) -> bytes:
        dom = self._domain(domid, "get_hvm_context")
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

    @_faulty
    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        call = "set_hvm_context"
        dom = self._domain(domid, call)
        if dom.state == DomainState.RUNNING:
            raise HostError(f"domain {domid} must be paused", call=call)
        dom.records = hvm.decode(blob, dom.vcpus)
        dom.restore_tsc()

    @_faulty
    def get_hvm_params(self, domid: int) -> dict[int, int]:
        return dict(self._domain(domid, "get_hvm_params").params)

    @_faulty
    def set_hvm_params(self, domid: int, params: Mapping[int, int]) -> None:
        call = "set_hvm_params"
        dom = self._domain(domid, call)
        for index, value in params.items():
            if not 0 <= int(index) < hvm.HVM_NR_PARAMS:
                raise HostError(f"HVM param {index} does not exist", call=call)
            if not 0 <= int(value) < 1 << 64:
                raise HostError(
                    f"HVM param {index} value {value} is not a u64", call=call
                )
        dom.params.update({int(k): int(v) for k, v in params.items()})

    @_faulty
    def get_tsc_info(self, domid: int) -> base.TscInfo:
        return self._domain(domid, "get_tsc_info").tsc

    @_faulty
    def set_tsc_info(self, domid: int, info: base.TscInfo) -> None:
        call = "set_tsc_info"
        dom = self._domain(domid, call)
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
        dom.tsc = info
        dom.tsc_offset = tsc - dom._host_tsc()

    # -- HostDriver: PV state --

    @_faulty
    def quiesce_backends(self, domid: int) -> None:
        dom = self._domain(domid, "quiesce_backends")
        dom.backends_quiesced = True
        for be in list(dom.backends.values()):
            be.quiesce()
        # From here to the end of the downtime the guest's visible state
        # is exported, digested and harvested: nothing dom0 raises may
        # change it in between (rollback releases it to the guest).
        with self._lock:
            with dom.mem_lock():
                if dom.held_ports is None:
                    dom.held_ports = set()
            if self.xenstore.is_introduced(domid):
                self.xenstore.hold_output(domid, True)

    @_faulty
    def resume_backends(self, domid: int) -> None:
        dom = self._domain(domid, "resume_backends")
        with self._lock:
            with dom.mem_lock():
                held, dom.held_ports = dom.held_ports, None
            for port in sorted(held or ()):
                if port in dom.ports:
                    self.evtchn.set_pending(dom, port)
            if self.xenstore.is_introduced(domid):
                self.xenstore.hold_output(domid, False)
        dom.backends_quiesced = False
        for be in list(dom.backends.values()):
            be.resume()
        if self.xenstore.is_introduced(domid):
            self.xenstore.service_ring(domid)

    def _export_shared_info(self, dom: _Domain) -> base.SharedInfoState:
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

    def _export_grants(self, dom: _Domain) -> base.GrantTableState:
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

    def _backend_domids(self, dom: _Domain) -> tuple[int, ...]:
        ids = {d.backend_domid for d in dom.config.devices}
        ids |= {
            ch.remote_domid
            for ch in dom.ports.values()
            if ch.type in (EvtchnType.INTERDOMAIN, EvtchnType.UNBOUND)
            and ch.remote_domid != dom.domid
        }
        return tuple(sorted(ids))

    @_faulty
    def export_pv_state(self, domid: int) -> base.PvState:
        call = "export_pv_state"
        dom = self._domain(domid, call)
        # Backends lock themselves and then the host: ask them first.
        backends = self._backend_states(dom)
        with self._lock:
            if dom.state == DomainState.RUNNING:
                raise HostError(f"domain {domid} must be paused", call=call)
            if dom.backends and not dom.backends_quiesced:
                raise HostError(
                    f"domain {domid}'s backends must be quiesced", call=call
                )
            areas = tuple(b.backend_path for b in backends)
            try:
                xs_state = self.xenstore.export_domain(domid, areas)
            except XenstoreMigrationError as exc:
                raise HostError(f"xenstore: {exc}", call=call) from None
            # The guest may now run elsewhere on these disks (unpause
            # takes them back if it stays).
            dom.disks_here = False
            return base.PvState(
                domid=domid,
                backend_domids=self._backend_domids(dom),
                event_channels=base.EventChannelState(
                    abi=base.EvtchnAbi.TWO_LEVEL, ports=self.evtchn.table(dom)
                ),
                grant_table=self._export_grants(dom),
                shared_info=self._export_shared_info(dom),
                xenstore=xs_state,
                backends=backends,
            )

    def _check_ring_grant(
        self,
        dom: _Domain,
        state: base.PvState,
        bs: base.BackendState,
        ref: int,
        where: str,
    ) -> None:
        """A ring's grant entry in the incoming table: in use, for the
        backend's domain, of a page the guest has (what the backend's
        map will need)."""
        gt = state.grant_table
        if gt.version != 1:
            return  # refused with the table's version below
        frame, index = divmod(ref, grant.ENTRIES_PER_FRAME)
        off = index * grant.GRANT_ENTRY_V1.size
        flags, domid, gfn = grant.GRANT_ENTRY_V1.unpack(
            bytes(gt.frames[frame][off : off + grant.GRANT_ENTRY_V1.size])
        )
        if flags & grant.GTF_type_mask != grant.GTF_permit_access:
            raise HostError(
                f"{where}: ring grant reference {ref} is not in use "
                f"(flags {flags:#x})",
                call="import_pv_state",
            )
        if domid != bs.backend_domid:
            raise HostError(
                f"{where}: ring grant reference {ref} is for domain "
                f"{domid}, not the backend's {bs.backend_domid}",
                call="import_pv_state",
            )
        p2m = dom.mem.p2m
        if not 0 <= gfn < len(p2m) or p2m[gfn] != P2M_RAM:
            raise HostError(
                f"{where}: ring grant reference {ref} grants gfn "
                f"{gfn:#x}, which the guest has not populated",
                call="import_pv_state",
            )

    def _validate_pv_state(self, dom: _Domain, state: base.PvState) -> None:
        call = "import_pv_state"

        def refuse(what: str) -> HostError:
            return HostError(what, call=call)

        if state.domid != dom.domid:
            raise refuse(f"state is of domain {state.domid}, not {dom.domid}")
        if dom.booted or dom.ports:
            raise refuse(
                f"domain {dom.domid} is not an empty restoring domain"
            )
        # The optional features first, by the predicate SETUP applied:
        # a guest that passed SETUP is not refused below for them.
        for feature, use in base.state_feature_uses(state).items():
            if feature not in self.FEATURES:
                raise base.NotSupported(
                    f"{feature.value} ({use}) cannot be restored here",
                    call=call,
                )
        ports_by_number = {p.port: p for p in state.event_channels.ports}
        seen_devices = set()
        for bs in state.backends:
            where = f"backend {bs.kind}/{bs.devid}"
            if bs.kind not in devices.BACKENDS:
                raise refuse(f"{where}: unknown device kind")
            if bs.backend_domid != DOM0:
                raise refuse(
                    f"{where}: backend domain {bs.backend_domid} "
                    f"does not exist here"
                )
            try:
                fe_domid, kind, devid = devices.parse_frontend_area(
                    bs.frontend_path
                )
            except Exception as exc:
                raise refuse(f"{where}: {exc}") from None
            if (fe_domid, kind, devid) != (dom.domid, bs.kind, bs.devid):
                raise refuse(
                    f"{where}: frontend area {bs.frontend_path} "
                    f"is not this guest's"
                )
            if (kind, devid) in seen_devices:
                raise refuse(f"{where}: listed twice")
            seen_devices.add((kind, devid))
            for port in bs.event_channels:
                p = ports_by_number.get(port)
                if (
                    p is None
                    or p.type != EvtchnType.INTERDOMAIN
                    or p.remote_domid != bs.backend_domid
                ):
                    raise refuse(
                        f"{where}: port {port} is not a channel to "
                        f"domain {bs.backend_domid}"
                    )
            limit = len(state.grant_table.frames) * grant.ENTRIES_PER_FRAME
            for ref in bs.ring_refs:
                if not 0 <= ref < limit:
                    raise refuse(
                        f"{where}: grant reference {ref} beyond "
                        f"the table's {limit} entries"
                    )
                self._check_ring_grant(dom, state, bs, ref, where)
            if bs.kind == "vbd":
                # The reconnect below opens it: found missing now, before
                # anything is applied.
                try:
                    path = self.disk_path(dom.uuid, bs.devid)
                    devices.BlockStore.open(path).close()
                except (ValueError, devices.BackendError) as exc:
                    raise refuse(f"{where}: {exc}") from None
        for b in state.backend_domids:
            if b != DOM0 and b not in self._domains:
                raise refuse(f"backend domain {b} does not exist here")
        ec = state.event_channels
        if ec.abi != base.EvtchnAbi.TWO_LEVEL:
            raise base.NotSupported(
                "only the 2-level event channel ABI is implemented", call=call
            )
        allowed = {b.backend_domid for b in state.backends}
        self.evtchn.validate_table(dom, ec.ports, allowed | {dom.domid, DOM0})
        for p in ec.ports:
            if p.type == EvtchnType.INTERDOMAIN and p.remote_domid != DOM0:
                raise base.NotSupported(
                    f"port {p.port}: interdomain channels to domain "
                    f"{p.remote_domid} (not dom0) cannot be rebound",
                    call=call,
                )
        gt = state.grant_table
        if gt.version != 1:
            raise base.NotSupported(
                f"grant table v{gt.version}: only v1 is implemented", call=call
            )
        if not 1 <= len(gt.frames) <= MAX_GRANT_FRAMES:
            raise refuse(
                f"{len(gt.frames)} grant frames, limit {MAX_GRANT_FRAMES}"
            )
        if len(gt.frame_gfns) != len(gt.frames) or gt.status_frames:
            raise refuse("grant frame GFNs do not match the frames")
        gfns = [g for g in gt.frame_gfns if g != INVALID_GFN]
        si = state.shared_info
        if si.gfn is not None:
            gfns.append(si.gfn)
        if len(set(gfns)) != len(gfns):
            raise refuse("two Xen pages share one GFN")
        for g in gfns:
            if not 0 <= g < dom.mem.max_pfn:
                raise refuse(
                    f"Xen page GFN {g:#x} is outside the guest's "
                    f"physmap (max {dom.mem.max_pfn:#x})"
                )
            if dom.mem.p2m[g] == 1:
                raise refuse(f"Xen page GFN {g:#x} is populated RAM")
        for f in gt.frames:
            if len(f) != PAGE_SIZE:
                raise refuse(f"grant frame of {len(f)} bytes")
        if len(si.content) != PAGE_SIZE:
            raise refuse(f"shared info of {len(si.content)} bytes")
        seen = set()
        for vi in si.vcpu_info:
            if not 0 <= vi.vcpu < dom.vcpus or vi.vcpu in seen:
                raise refuse(
                    f"vcpu_info of vCPU {vi.vcpu} invalid or repeated"
                )
            seen.add(vi.vcpu)
            if vi.gfn is not None:
                if (
                    not 0 <= vi.gfn < dom.mem.max_pfn
                    or dom.mem.p2m[vi.gfn] != 1
                ):
                    raise refuse(
                        f"vcpu_info of vCPU {vi.vcpu} at gfn "
                        f"{vi.gfn:#x}, not populated RAM"
                    )
                if not 0 <= vi.offset <= PAGE_SIZE - evtchn.VCPU_INFO_SIZE:
                    raise refuse(
                        f"vcpu_info offset {vi.offset} crosses the page"
                    )
            elif vi.vcpu >= evtchn.XEN_LEGACY_MAX_VCPUS:
                raise refuse(f"vCPU {vi.vcpu} has no legacy vcpu_info slot")
        for param in (
            hvm.HVM_PARAM_STORE_EVTCHN,
            hvm.HVM_PARAM_CONSOLE_EVTCHN,
            hvm.HVM_PARAM_STORE_PFN,
        ):
            if param not in dom.params:
                raise refuse(
                    f"HVM param {param} must be restored before the PV state"
                )
        xs = state.xenstore
        if xs.store_port != dom.params[hvm.HVM_PARAM_STORE_EVTCHN]:
            raise refuse(
                f"xenstore port {xs.store_port} is not the "
                f"HVM_PARAM_STORE_EVTCHN port"
            )
        by_port = {p.port: p for p in ec.ports}
        for param in (
            hvm.HVM_PARAM_STORE_EVTCHN,
            hvm.HVM_PARAM_CONSOLE_EVTCHN,
        ):
            p = by_port.get(dom.params[param])
            if (
                p is None
                or p.type != EvtchnType.INTERDOMAIN
                or p.remote_domid != DOM0
            ):
                raise refuse(
                    f"HVM param {param} names port "
                    f"{dom.params[param]}, not a channel to dom0"
                )

    @_faulty
    def import_pv_state(self, domid: int, state: base.PvState) -> None:
        call = "import_pv_state"
        with self._lock:
            dom = self._domain(domid, call)
            self._validate_pv_state(dom, state)
            # What base.feature_uses lets through: owners and ACL
            # entries among the guest, dom0 and the backend domains.
            backends = {b.backend_domid for b in state.backends} | {DOM0}
            policy = ImportPolicy(
                areas=tuple(b.backend_path for b in state.backends),
                owners=frozenset(backends),
                max_access=dict.fromkeys(backends, "b"),
            )
            # xenstored validates the whole store state before it changes
            # anything; ours is validated above and cannot fail below.
            # The toolstack's directories above the backend areas.
            made = []
            for b in state.backends:
                parent = b.backend_path.rsplit("/", 1)[0]
                if parent not in made and not self._xs_exists(parent):
                    self._toolstack_xs.write(parent, b"")
                    made.append(parent)
            try:
                self._xenstore_connect(dom, state.xenstore, policy)
            except XenstoreMigrationError as exc:
                for parent in made:
                    with contextlib.suppress(XenstoreError):
                        self._toolstack_xs.rm(parent)
                raise HostError(f"xenstore: {exc}", call=call) from None
            mem = dom.mem
            # The Xen pages first, then the event channels whose bits
            # live in them, then dom0's ends, then the backends.
            with mem.lock():
                si = state.shared_info
                page = mem.xen_pages[XENPAGE_SHARED_INFO]
                page[:] = np.frombuffer(si.content, dtype=np.uint8)
                if si.gfn is not None:
                    mem.map_xen_page(XENPAGE_SHARED_INFO, si.gfn)
                gt = state.grant_table
                dom.grants.nr_frames = len(gt.frames)
                for i, (g, f) in enumerate(
                    zip(gt.frame_gfns, gt.frames, strict=True)
                ):
                    dom.grants.frames[i] = np.frombuffer(f, dtype=np.uint8)
                    if g != INVALID_GFN:
                        mem.map_xen_page(XENPAGE_GRANT_BASE + i, g)
                # Only the incoming backends' maps stay (they map again).
                dom.grants.clear_status_bits(
                    keep={r for b in state.backends for r in b.ring_refs}
                )
                for vi in si.vcpu_info:
                    if vi.gfn is not None:
                        dom.vcpu_info_at[vi.vcpu] = (vi.gfn, vi.offset)
            self._import_ports(dom, state.event_channels.ports)
            self._bind_dom0_services(dom)
        # The backends map their rings and bind their ports now, so that
        # one that cannot makes the migration roll back; answering what
        # was in flight writes guest memory and raises ports, and until
        # the commit the guest must look exactly as the source paused
        # it, so they wait for the unpause.
        self._reconnect_backends(dom, state.backends)

    def _import_ports(
        self, dom: _Domain, ports: Sequence[base.EventChannel]
    ) -> None:
        """Rebuild the port table with the same numbers. Dom0's end of
        each interdomain channel takes the port number it had when that
        is free here, else the lowest free one (then EVTCHNOP_status
        shows the guest a different remote port)."""
        for p in ports:
            dom.ports[p.port] = evtchn.Channel(
                type=p.type,
                vcpu=p.vcpu,
                remote_domid=p.remote_domid,
                remote_port=p.remote_port,
                virq=p.virq,
                pirq=p.pirq,
            )
        for p in ports:
            if p.type != EvtchnType.INTERDOMAIN or p.remote_domid != DOM0:
                continue
            local = p.remote_port
            if not 0 < local < evtchn.NR_2L_PORTS or local in self.dom0.ports:
                local = self.evtchn.free_port(self.dom0, "import_pv_state")
            self.dom0.ports[local] = evtchn.Channel(
                EvtchnType.INTERDOMAIN,
                remote_domid=dom.domid,
                remote_port=p.port,
            )
            dom.ports[p.port].remote_port = local
            dom.dom0_ports.append(local)
            self._prelinked.add((dom.domid, p.port))

    # -- observation --

    def memory_digest(self, domid: int) -> str:
        """base.memory_hasher over the set of populated pfns and, block by
        block (_DIGEST_BLOCK pfns), over (pfn, content) of every populated
        non-zero page: equal for equal guest memory, however the pages
        came to be (written zeros or never touched).

        Every writer marks what it writes (GuestMemory.mark_dirty), so a
        block that no write touched since the previous digest is not read
        again: a paused guest is digested in the time its last writes
        take, not its size's."""
        dom = self._domain(domid, "memory_digest")
        with dom.digest_lock:
            self._digest_refresh(dom)
            h = base.memory_hasher(dom.digest_populated)
            blocks = dom.digest_blocks
            h.update(b"".join([blocks[b] for b in sorted(blocks)]))
            return h.hexdigest()

    def _digest_refresh(self, dom: _Domain, limit: int | None = None) -> bool:
        """Note the blocks written since the previous refresh and read up
        to ``limit`` of those pending (all if None); the caller holds the
        digest lock. Returns whether some remain pending.

        A page leaving RAM is noted as a write of it (GuestMemory.release,
        map_xen_page), so a block is read against the p2m of the moment;
        a page populated is zero until written. Only the hash of the
        populated set looks at all of the p2m, which a warming pass does
        at most every _DIGEST_P2M_INTERVAL while a restore populates
        batch after batch (the digest itself, no limit, always does)."""
        mem = dom.mem
        pfns = np.concatenate(
            (mem.take_changed(), self._unlocked_writes(dom))
        ).astype(np.int64)
        if dom.digest_mask is not None:
            # A page written since the first look holds data now.
            dom.digest_mask[pfns] = True
        if not dom.digest_started:
            # The first look: every block with data in RAM.
            dom.digest_started = True
            dom.digest_mask = np.zeros(mem.max_pfn, dtype=bool)
            for start, end in mem.data_extents():
                dom.digest_mask[start:end] = True
            dom.digest_blocks.clear()
            dom.digest_pending.clear()
            # A page populated later is zero until written (and marked).
            held = dom.digest_mask & (mem.p2m == P2M_RAM)
            pfns = np.concatenate((pfns, np.flatnonzero(held)))
        version = mem.p2m_version
        now = time.monotonic()
        if version != dom.digest_version and (
            limit is None or now - dom.digest_p2m_at >= _DIGEST_P2M_INTERVAL
        ):
            dom.digest_p2m_at = now
            dom.digest_populated = base.memory_hasher(
                np.flatnonzero(mem.p2m == P2M_RAM).astype("<u8")
            ).digest()
            dom.digest_version = version
        if len(pfns):
            dom.digest_pending.update(
                base.pfn_union(pfns // _DIGEST_BLOCK).tolist()
            )
        todo = sorted(dom.digest_pending)
        busy: set[int] = set()
        if limit is not None:
            if not dom.booted:
                # A restore writes these now; closing the mapping marks
                # them again (and digests them, _digest_written).
                busy = self._blocks_being_written(dom)
                todo = [b for b in todo if b not in busy]
            todo = todo[:limit]
        dom.digest_pending.difference_update(todo)
        self._digest_blocks(dom, todo, dom.digest_mask)
        if not dom.digest_pending:
            # Holes found since are found by the blocks' own look-up.
            dom.digest_mask = None
        return bool(dom.digest_pending - busy)

    @staticmethod
    def _blocks_being_written(dom: _Domain) -> set[int]:
        maps = list(dom.writable_maps.values())
        if not maps:
            return set()
        blocks = np.concatenate(maps) // _DIGEST_BLOCK
        return set(base.pfn_union(blocks).tolist())

    @staticmethod
    def _digest_blocks(
        dom: _Domain, blocks: Sequence[int], mask: np.ndarray | None
    ) -> None:
        """Digest ``blocks`` (sorted). A stretch of consecutive blocks is
        looked at in one go (the p2m, the holes, the zero pages); only
        the hashing goes block by block."""
        for first, last in _spans(blocks):
            SimHost._digest_span(dom, first, last, mask)

    @staticmethod
    def _digest_span(
        dom: _Domain, first: int, last: int, mask: np.ndarray | None
    ) -> None:
        """Digest blocks ``[first, last)``."""
        mem = dom.mem
        start = first * _DIGEST_BLOCK
        end = min(last * _DIGEST_BLOCK, mem.max_pfn)
        ram = mem.p2m[start:end] == P2M_RAM
        rows = np.zeros(0, dtype=np.int64)
        if ram.any():
            data = (
                mem.data_mask(start, end) if mask is None else mask[start:end]
            )
            # Holes are not read (reading one would allocate it).
            rows = np.flatnonzero(data & ram)
            rows = rows[base.nonzero_pages(mem.ram[start:end], rows)]
        pfns = rows + start
        digests = dom.digest_blocks
        if not len(pfns):
            for block in range(first, last):
                digests.pop(block, None)
            return
        # Where each block's pfns begin and end in ``pfns``.
        bounds = np.searchsorted(
            pfns, np.arange(first, last + 1) * _DIGEST_BLOCK
        ).tolist()
        # Runs of consecutive pfns within a block: hashed in place, no
        # copy of the pages, no GIL held.
        cut = (np.diff(pfns) != 1) | (
            np.diff(pfns // _DIGEST_BLOCK) != 0
        )
        lo_index = np.concatenate(([0], np.flatnonzero(cut) + 1))
        hi_index = np.concatenate((lo_index[1:], [len(pfns)]))
        run_lo = lo_index.tolist()
        # Each run's pfns [a, b).
        run_a = pfns[lo_index].tolist()
        run_b = (pfns[hi_index - 1] + 1).tolist()
        keys = memoryview(pfns.astype("<u8")).cast("B")
        run = 0
        for k, block in enumerate(range(first, last)):
            lo, hi = bounds[k], bounds[k + 1]
            if lo == hi:
                digests.pop(block, None)
                continue
            d = base.memory_hasher(keys[lo * 8 : hi * 8])
            while run < len(run_lo) and run_lo[run] < hi:
                d.update(mem.ram[run_a[run] : run_b[run]])
                run += 1
            digests[block] = d.digest()

    def _digest_written(
        self, dom: _Domain, pfns: np.ndarray, *, read: bool = False
    ) -> None:
        """Digest the blocks of ``pfns``, just written by a restore (or
        ``read`` by a migration), while they are in the cache: the
        warming thread or the digest would read them again later, and
        what is not read when the guest is paused is downtime."""
        if (dom.booted and not read) or not dom.digest_started:
            return
        if len(pfns) < _DIGEST_INLINE_MIN:
            # A few pages (the last round of a quiet guest) are left to
            # the digest itself, which reads their blocks once for all
            # the mappings that wrote them.
            return
        blocks = base.pfn_union(pfns // _DIGEST_BLOCK).tolist()
        mem = dom.mem
        # A warming pass holds the lock for _DIGEST_CHUNK blocks at most.
        with dom.digest_lock:
            with mem.lock():
                # Read after the marks are taken: a write racing this is
                # marked again and read again.
                for first, last in _spans(blocks):
                    start = first * _DIGEST_BLOCK
                    marks = mem.changed[start : last * _DIGEST_BLOCK]
                    if dom.digest_mask is not None:
                        dom.digest_mask[start : start + len(marks)] |= (
                            marks != 0
                        )
                    marks[:] = 0
            dom.digest_pending.difference_update(blocks)
            self._digest_blocks(dom, blocks, dom.digest_mask)

    def _warm(self, dom: _Domain, until: Callable[[], bool]) -> None:
        """Keep the memory digest's cache warm while the domain migrates
        (source: log-dirty on; destination: being restored), so that the
        digest taken while it is paused reads only its last writes."""
        if dom.warming:
            return
        dom.warming = True

        def run() -> None:
            try:
                while self._domains.get(dom.domid) is dom and not until():
                    # A few blocks at a time: a digest asked for while the
                    # guest is paused does not wait for a whole pass.
                    with dom.digest_lock:
                        more = self._digest_refresh(dom, _DIGEST_CHUNK)
                    time.sleep(0.001 if more else DIGEST_WARM_INTERVAL)
            except (
                HostError,
                AttributeError,
                TypeError,
                ValueError,
                OSError,
            ) as exc:
                # The domain was destroyed under the digest.
                LOG.debug(
                    "dom%d: digest cache no longer kept: %s", dom.domid, exc
                )
            finally:
                dom.warming = False

        threading.Thread(
            target=run,
            name=f"{self.hostname}-d{dom.domid}-digest",
            daemon=True,
        ).start()

    def _guest_ports(self, dom: _Domain) -> tuple[base.EventChannel, ...]:
        """The guest's port table as the invariant has it: the guest's
        port numbers are kept; the port at a backend domain's end is that
        domain's to number (a restore may renumber dom0's end when its
        number is taken), so it is left out (0)."""
        peers = set(self._backend_domids(dom)) - {dom.domid}
        return tuple(
            dataclasses.replace(p, remote_port=0)
            if p.type == EvtchnType.INTERDOMAIN and p.remote_domid in peers
            else p
            for p in self.evtchn.table(dom)
        )

    def guest_state(
        self, domid: int, items: Collection[Item] | None = None
    ) -> base.GuestState:
        dom = self._domain(domid, "guest_state")
        exports = self._backend_states(dom)
        with self._lock:
            state: dict[Item, object] = {
                Item.PLATFORM: (
                    hashlib.sha256(hvm.encode(dom.records)).hexdigest(),
                    dataclasses.astuple(dom.tsc),
                ),
                Item.DOMID: (dom.domid, self._backend_domids(dom)),
                Item.HVM_PARAMS: tuple(sorted(dom.params.items())),
                Item.EVENT_CHANNELS: (
                    base.EvtchnAbi.TWO_LEVEL,
                    self._guest_ports(dom),
                ),
                Item.GRANT_TABLE: self._digest_grants(dom),
                Item.SHARED_INFO: self._digest_shared_info(dom),
            }
            if self.xenstore.is_introduced(domid):
                xs = self.xenstore.export_domain(domid)
                state[Item.XENSTORE] = (
                    tuple(
                        sorted((n.path, n.value, n.perms) for n in xs.nodes)
                    ),
                    tuple(
                        sorted((w.path, w.token, w.depth) for w in xs.watches)
                    ),
                    tuple(sorted(t.tx_id for t in xs.transactions)),
                    xs.store_port,
                    xs.store_gfn,
                )
            state[Item.PV_DEVICES] = exports
            if items is not None:
                state = {k: v for k, v in state.items() if k in items}
        if items is None or Item.MEMORY in items:
            # Outside the host lock: hashing all RAM takes a while.
            state = {Item.MEMORY: self.memory_digest(domid), **state}
        return base.GuestState(
            items=state,
            frontends=self._frontends(dom),
            kernel=self._kernel_record(dom),
        )

    def _kernel_record(self, dom: _Domain) -> dict[str, object]:
        """What the guest's kernel counted in its RAM (kernel.py): events
        per port, and per vCPU its progress and its time info."""
        # Hypercalls change these under the host lock: a copy taken
        # under it, so the walk below sees one consistent table.
        with self._lock:
            bound = sorted(dom.ports)
            placements = dict(dom.vcpu_info_at)
        with dom.mem.lock():
            page = bytes(dom.mem.ram[kernel.HEADER_PFN])
            hdr = kernel.read_header(page)
            if hdr["magic"] != kernel.MAGIC:
                return {}
            counts = dom.mem.ram[kernel.COUNTERS_PFN].view(np.uint32)
            ports = {
                int(p): int(counts[p])
                for p in bound
                if p < kernel.NR_COUNTED_PORTS
            }
            vcpus = []
            for v in range(min(hdr["nr_vcpus"], dom.vcpus)):
                placed = placements.get(v)
                if placed is None:
                    area = dom.mem.xen_pages[XENPAGE_SHARED_INFO]
                    off = v * evtchn.VCPU_INFO_SIZE
                else:
                    area, off = dom.mem.ram[placed[0]], placed[1]
                at = off + _SYSTEM_TIME
                (system_time,) = struct.unpack("<Q", bytes(area[at : at + 8]))
                vcpus.append(
                    {
                        "progress": kernel.read_vcpu(page, v)["counter"],
                        "system_time": system_time,
                    }
                )
        return {
            "ports": ports,
            "vcpus": tuple(vcpus),
            "dirty_rate": hdr["dirty_rate"],
        }

    def raise_guest_events(self, domid: int) -> tuple[int, ...]:
        dom = self._domain(domid, "raise_guest_events")
        raised = []
        with self._lock:
            for port, ch in sorted(dom.ports.items()):
                if ch.type == EvtchnType.INTERDOMAIN:
                    # The peer notifies, as a backend or daemon does.
                    peer = self._lookup(ch.remote_domid)
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

    def _frontends(self, dom: _Domain) -> dict[str, dict[str, object]]:
        """What each PV frontend observed, read from guest RAM."""
        hdr = kernel.read_header(bytes(dom.mem.ram[kernel.HEADER_PFN]))
        if hdr["magic"] != kernel.MAGIC:
            return {}
        out = {}
        for i in range(min(hdr["nr_frontends"], kernel.MAX_FRONTENDS)):
            pfn, off = kernel.frontend_place(i, devices.FRONTEND_STATE_SIZE)
            try:
                fe = devices.Frontend.attach(dom.mem, pfn, off, None, None)
            except devices.FrontendError:
                continue
            out[fe.key] = fe.observation()
        return out

    def _digest_grants(self, dom: _Domain) -> tuple:
        gt = self._export_grants(dom)
        h = hashlib.sha256(b"".join(gt.frames)).hexdigest()
        return (gt.version, gt.frame_gfns, h)

    def _digest_shared_info(self, dom: _Domain) -> tuple:
        si = self._export_shared_info(dom)
        return (si.gfn, hashlib.sha256(si.content).hexdigest(), si.vcpu_info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._replenish_stop.set()
        for domid in list(self._domains):
            with contextlib.suppress(HostError):
                self.destroy_domain(domid)
        thread = self._replenish_thread
        if thread is not None:
            thread.join()
        with self._lock:
            reaping, self._reaping = self._reaping, []
        for thread in reaping:
            thread.join()
        self._stop_spare()
        self.dom0.stop()


class _SimPageMapping(base.PageMapping):
    """Views onto the domain's shared RAM itself."""

    def __init__(self, dom: _Domain, pfns: np.ndarray, writable: bool) -> None:
        self.pfns = pfns
        self._dom = dom
        self._writable = writable
        self._views: list[memoryview] = []
        self._pages: list[memoryview] | None = None
        # The checker's reads (observing()) feed nothing of the host's
        # own digest: the oracle leaves what it checks as it found it.
        self._observed = getattr(dom.host._observer, "depth", 0) > 0
        if writable:
            self._key = id(self)
            with dom.mem.lock():
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
                self._dom.host._digest_written(self._dom, self.pfns)
        elif (
            not self._writable
            and not self._observed
            and self._dom.mem.log_dirty
            # A running guest's cache is the warming thread's: its
            # rounds are not slowed by whole blocks hashed per batch.
            and self._dom.state != DomainState.RUNNING
        ):
            self._dom.host._digest_written(self._dom, self.pfns, read=True)
