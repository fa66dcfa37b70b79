"""The simulated Xen host: a :class:`HostDriver` over a simulated
hypervisor, toolstack, dom0 and guest processes, all in this process.

The pieces are split as Xen is:

- hypervisor.py: Xen itself (domains, memory, event channels, grant
  tables, log-dirty, HVM state, the guests' hypercalls);
- toolstack.py: libxl/libxc (create, save, restore);
- dom0.py: dom0's services (xenstored, xenstore/, and the backends,
  devices/, with their disks on storage the hosts share);
- guestproc.py: the guest processes (guest.py runs each domain's vCPUs
  and kernel; a spare one is prepared ahead of the next domain);
- digest.py: the memory digest cache; locks.py: the lock order.

:class:`SimHost` puts them together and adds fault injection and the
observation the transparency checker makes. Several SimHost objects may
live in one process (two compute services in Nova's functional tests);
guests are started with ``subprocess`` and host threads are plain
threads, so eventlet monkey-patching is fine.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import functools
import hashlib
import os
import random
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim.digest import DEFINITION as DIGEST_DEFINITION
from nova_xen_ncm.host.sim.digest import MemoryDigest
from nova_xen_ncm.host.sim.dom0 import Dom0Error
from nova_xen_ncm.host.sim.dom0 import Dom0Services
from nova_xen_ncm.host.sim.guestproc import GuestProcesses
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.hypervisor import SimPageMapping
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.memory import write_tracking_available
from nova_xen_ncm.host.sim.probe import SimGuestProbe
from nova_xen_ncm.host.sim.toolstack import Toolstack
from nova_xen_ncm.host.sim.xs_wire import XenstoreError

__all__ = ["Dom0Error", "SimHost"]

LOG = logging.getLogger(__name__)

MiB = 1 << 20

# The host operations that fault injection may delay or fail.
FAULTY_CALLS = (
    "list_domains domain_info find_domain create_domain "
    "create_empty_domain destroy_domain pause unpause populated_pfns "
    "populated_runs populate map_pages enable_log_dirty harvest_dirty "
    "disable_log_dirty "
    "set_vcpu_throttle get_hvm_context set_hvm_context get_hvm_params "
    "set_hvm_params get_tsc_info set_tsc_info quiesce_backends "
    "resume_backends export_pv_state import_pv_state"
).split()


def _faulty(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: SimHost, *args: object, **kwargs: object) -> object:
        if not getattr(self._observer, "depth", 0):
            self._inject_fault(method.__name__)
        return method(self, *args, **kwargs)

    return wrapper


class SimHost(base.HostDriver):
    """A Xen host simulated in this process (see the module docstring)."""

    #: The optional GuestFeatures this host restores (capabilities()).
    FEATURES: frozenset[base.GuestFeature] = frozenset()

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
        # What the kernel offers for log-dirty is probed once, at boot,
        # not by the first migration's capability report.
        write_tracking_available()
        self.opts = conf.xen_ncm_sim
        self.hv = Hypervisor(hostname, self.opts.host_memory_mb * MiB)
        self.services = Dom0Services(self.hv, self.opts)
        self.guests = GuestProcesses(self.hv, self.opts)
        self.digest = MemoryDigest(self.hv)
        self.toolstack = Toolstack(
            self.hv,
            self.services,
            self.guests,
            self.digest,
            self.opts,
            self.FEATURES,
            prelaunch=prelaunch,
        )
        self._faults = random.Random(self.opts.fault_seed)
        # Threads inside observing(): the checker's calls, not faulted.
        self._observer = threading.local()
        self._closed = False

    # -- the parts, by the names Xen's tools give them --

    @property
    def evtchn(self) -> evtchn.EventChannelOps:
        return self.hv.evtchn

    @property
    def dom0(self) -> object:
        """The control domain (hypervisor.Dom0)."""
        return self.hv.dom0

    @property
    def xenstore(self) -> object:
        """dom0's xenstored (xenstore.Xenstore)."""
        return self.services.xenstore

    def dom0_errors(self) -> list[Exception]:
        """What failed in dom0's services so far (a backend's handler,
        xenstored's watch dispatch, Dom0Error) and in the simulated
        hypervisor (a hypercall handler raising what Xen never returns,
        SimError): logged as it happens, kept here for the host's owner
        (tests fail on them)."""
        return [*self.services.kernel.errors, *self.hv.errors]

    def raise_dom0_errors(self) -> None:
        """Raise the first of dom0_errors() (the others are logged with
        it): for an owner, such as a test, to whom a dom0 service failing
        is a failure and not only a log line."""
        errors = self.dom0_errors()
        if errors:
            raise Dom0Error(
                f"{self.hostname}: {len(errors)} dom0 service failure(s), "
                f"the first: {errors[0]}"
            ) from errors[0]

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

    def _domain(self, domid: int, call: str) -> Domain:
        return self.hv.domain(domid, call)

    def now_ns(self) -> int:
        """The hypervisor's system time (Xen's NOW())."""
        return self.hv.now_ns()

    def disk_path(self, uuid: str, devid: int) -> str:
        """The file of a guest's vbd on the storage the hosts share."""
        return self.services.disk_path(uuid, devid)

    def guest_command(self, domid: int, cmd: str, /, **args: object) -> object:
        """Ask the guest's kernel to act (grant_access, end_access,
        write, hypercall): what its drivers would do on their own."""
        dom = self.hv.domain(domid, cmd)
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
            memory_digest=DIGEST_DEFINITION,
        )

    def guest_features(self, domid: int) -> frozenset[base.GuestFeature]:
        call = "guest_features"
        dom = self.hv.domain(domid, call)
        with self.hv.locked():
            return frozenset(self.toolstack.feature_uses(dom))

    def guest_devices(self, domid: int) -> tuple[base.DeviceConfig, ...]:
        """None to name (this host's streams carry the backends), but a
        device the stream cannot carry is refused by name."""
        call = "guest_devices"
        dom = self.hv.domain(domid, call)
        refusal = self.toolstack.device_refusal(
            dom, self.services.backend_states(dom)
        )
        if refusal is not None:
            raise base.NotSupported(refusal, call=call)
        return ()

    @_faulty
    def list_domains(self) -> list[base.DomainInfo]:
        with self.hv.locked():
            return [
                self.hv.info(d) for _, d in sorted(self.hv.domains.items())
            ]

    @_faulty
    def domain_info(self, domid: int) -> base.DomainInfo:
        with self.hv.locked():
            return self.hv.info(self.hv.domain(domid, "domain_info"))

    @_faulty
    def find_domain(self, name_or_uuid: str) -> base.DomainInfo:
        with self.hv.locked():
            for dom in self.hv.domains.values():
                if name_or_uuid in (dom.name, dom.uuid):
                    return self.hv.info(dom)
        raise base.DomainNotFound(
            f"no domain named {name_or_uuid!r}", call="find_domain"
        )

    @_faulty
    def create_domain(self, config: base.DomainConfig) -> int:
        domid = self.toolstack.create_domain(config)
        # Building the domain freed arrays of its every pfn (8 octets a
        # page); glibc kept them in the main arena: 32 MiB of an 8 GiB
        # guest, held as long as the process.
        base.release_freed_memory()
        return domid

    @_faulty
    def create_empty_domain(
        self, config: base.DomainConfig, domid: int
    ) -> int:
        return self.toolstack.create_empty_domain(config, domid)

    @_faulty
    def destroy_domain(self, domid: int, delete_disks: bool = False) -> None:
        self.toolstack.destroy_domain(domid, delete_disks)

    @_faulty
    def pause(self, domid: int) -> None:
        self.toolstack.pause(domid)

    @_faulty
    def unpause(self, domid: int) -> None:
        self.toolstack.unpause(domid)

    def shutdown(self, domid: int, reboot: bool = False) -> None:
        """libxl_domain_shutdown: "poweroff" in the guest's xenstore
        control/shutdown, for a guest whose PV drivers said they watch
        it (control/feature-poweroff); the guest acts on it, or not."""
        if reboot:
            raise base.NotSupported(
                "the simulated guest has no reboot path", call="shutdown"
            )
        self.hv.domain(domid, "shutdown")
        home = f"/local/domain/{domid}"
        xs = self.services.toolstack_xs
        try:
            feature = xs.read(f"{home}/control/feature-poweroff")
        except XenstoreError:
            feature = b""
        if feature != b"1":
            raise base.NotSupported(
                f"domain {domid} has no PV control interface (no "
                "control/feature-poweroff): it cannot be asked to shut down",
                call="shutdown",
            )
        xs.write(f"{home}/control/shutdown", "poweroff")

    def free_memory(self) -> int:
        with self.hv.locked():
            return self.hv.free_memory()

    def console_output(self, domid: int) -> str:
        dom = self.hv.domain(domid, "console_output")
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
        return self.hv.domain(domid, "populated_pfns").mem.populated()

    @_faulty
    def populated_runs(self, domid: int) -> base.PfnRuns:
        return self.hv.domain(domid, "populated_runs").mem.ram_runs()

    @_faulty
    def populate(self, domid: int, pfns: np.ndarray) -> None:
        dom = self.hv.domain(domid, "populate")
        self.hv.populate(domid, pfns)
        # Their blocks' terms now, rather than by the warming thread
        # after the round or at the pause: a page populated is zero
        # until written (pages carrying data mark their blocks again as
        # their mapping closes).
        self.digest.populated(dom, pfns)

    def written_pages(self, domid: int, pfns: np.ndarray) -> np.ndarray:
        dom = self.hv.domain(domid, "written_pages")
        return dom.mem.written_mask(pfns)

    @_faulty
    def map_pages(
        self, domid: int, pfns: np.ndarray, writable: bool = False
    ) -> base.PageMapping:
        dom = self.hv.domain(domid, "map_pages")
        pfns = dom.mem.check_ram(pfns, "map_pages")
        # The checker's reads (observing()) feed nothing of the host's
        # own digest: the oracle leaves what it checks as it found it.
        observed = getattr(self._observer, "depth", 0) > 0
        return SimPageMapping(
            dom,
            pfns,
            writable,
            self.digest.written,
            on_read=None if observed else self.digest.read,
        )

    @_faulty
    def enable_log_dirty(self, domid: int) -> None:
        dom = self.hv.domain(domid, "enable_log_dirty")
        self.hv.enable_log_dirty(domid)
        if dom.state == DomainState.RUNNING:
            self.digest.warm(dom, lambda: not dom.mem.log_dirty)
        else:
            # A paused guest's digest is taken from the pages as the
            # migration reads them (MemoryDigest.read), in the cache.
            with locks.ordered(locks.DIGEST, self.digest.cache(dom).lock):
                self.digest.refresh(dom, 0)

    @_faulty
    def harvest_dirty(self, domid: int) -> np.ndarray:
        return self.hv.harvest_dirty(domid)

    def settle_digest(self, domid: int) -> None:
        dom = self.hv.domain(domid, "settle_digest")
        self.digest.settle(dom)

    @_faulty
    def disable_log_dirty(self, domid: int) -> None:
        self.hv.domain(domid, "disable_log_dirty").mem.set_log_dirty(False)

    @_faulty
    def set_vcpu_throttle(self, domid: int, fraction: float) -> None:
        self.hv.set_vcpu_throttle(domid, fraction)

    # -- HostDriver: platform state --

    @_faulty
    def get_hvm_context(self, domid: int) -> bytes:
        return self.hv.get_hvm_context(domid)

    @_faulty
    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        self.hv.set_hvm_context(domid, blob)

    @_faulty
    def get_hvm_params(self, domid: int) -> dict[int, int]:
        return dict(self.hv.domain(domid, "get_hvm_params").params)

    @_faulty
    def set_hvm_params(self, domid: int, params: Mapping[int, int]) -> None:
        self.hv.set_hvm_params(domid, params)

    @_faulty
    def get_tsc_info(self, domid: int) -> base.TscInfo:
        return self.hv.domain(domid, "get_tsc_info").tsc

    @_faulty
    def set_tsc_info(self, domid: int, info: base.TscInfo) -> None:
        self.hv.set_tsc_info(domid, info)

    # -- HostDriver: PV state --

    @_faulty
    def quiesce_backends(self, domid: int) -> None:
        self.services.quiesce_backends(domid)

    @_faulty
    def resume_backends(self, domid: int) -> None:
        self.services.resume_backends(domid)

    @_faulty
    def export_pv_state(self, domid: int) -> base.PvState:
        return self.toolstack.export_pv_state(domid)

    @_faulty
    def import_pv_state(self, domid: int, state: base.PvState) -> None:
        self.toolstack.import_pv_state(domid, state)

    # -- observation --

    def memory_digest(self, domid: int) -> str:
        return self.digest.digest(domid)

    def guest_state(
        self,
        domid: int,
        items: Collection[Item] | None = None,
        *,
        guest_records: bool = True,
    ) -> base.GuestState:
        dom = self.hv.domain(domid, "guest_state")
        wanted = set(Item if items is None else items)
        # Only what was asked: the engine asks for its digests' items in
        # the pause (a PV export or the kernel's record read there is
        # time the guest stays paused).
        values: dict[Item, Callable[[], object]] = {
            # The TSC's incarnation counts the restores: it is not kept
            # but grows (the kernel record has it).
            Item.PLATFORM: lambda: (
                hashlib.sha256(hvm.encode(dom.records)).hexdigest(),
                (dom.tsc.mode, dom.tsc.khz, dom.tsc.nsec),
            ),
            Item.DOMID: lambda: (dom.domid, self.hv.backend_domids(dom)),
            Item.HVM_PARAMS: lambda: tuple(sorted(dom.params.items())),
            Item.EVENT_CHANNELS: lambda: (
                base.EvtchnAbi.TWO_LEVEL,
                self.hv.guest_ports(dom),
            ),
            Item.GRANT_TABLE: lambda: self._digest_grants(dom),
            Item.SHARED_INFO: lambda: self._digest_shared_info(dom),
        }
        exports = None
        if Item.PV_DEVICES in wanted:
            exports = self.services.backend_states(dom)
        with self.hv.locked():
            state: dict[Item, object] = {
                item: value()
                for item, value in values.items()
                if item in wanted
            }
            if Item.XENSTORE in wanted and (
                self.services.xenstore.is_introduced(domid)
            ):
                xs = self.services.xenstore.export_domain(domid)
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
            if exports is not None:
                state[Item.PV_DEVICES] = exports
        if Item.MEMORY in wanted:
            # Outside the host lock: hashing all RAM takes a while.
            state = {Item.MEMORY: self.digest.digest(domid), **state}
        if not guest_records:
            return base.GuestState(items=state)
        return base.GuestState(
            items=state,
            frontends=self._frontends(dom),
            kernel=self._kernel_record(dom),
        )

    def _kernel_record(self, dom: Domain) -> dict[str, object]:
        """What the guest's kernel counted in its RAM (kernel.py): events
        per port, and per vCPU its progress and its time info."""
        # Hypercalls change these under the host lock: a copy taken
        # under it, so the walk below sees one consistent table.
        with self.hv.locked():
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
                info = hvm.read_vcpu_time(
                    bytes(area[off : off + evtchn.VCPU_INFO_SIZE])
                )
                vcpus.append(
                    {
                        "progress": kernel.read_vcpu(page, v)["counter"],
                        "system_time": info["system_time"],
                        "tsc_timestamp": info["tsc_timestamp"],
                        "tsc_to_system_mul": info["tsc_to_system_mul"],
                        "tsc_shift": info["tsc_shift"],
                    }
                )
            wallclock = hvm.read_wallclock(
                bytes(dom.mem.xen_pages[XENPAGE_SHARED_INFO])
            )
            # The guest's TSC now, with the host's wall time: what the
            # guest's clock reads and what it should read.
            guest_tsc = dom.guest_tsc()
            wall_ns = time.time_ns()
        return {
            "ports": ports,
            "vcpus": tuple(vcpus),
            "dirty_rate": hdr["dirty_rate"],
            "wallclock_ns": wallclock,
            "guest_tsc": guest_tsc,
            "host_wall_ns": wall_ns,
            "tsc_incarnation": dom.tsc.incarnation,
        }

    def raise_guest_events(self, domid: int) -> tuple[int, ...]:
        return self.hv.raise_guest_events(domid)

    def probe(self, domid: int) -> base.GuestProbe:
        # The checker's own read path (probe.py), apart from guest_state.
        self.hv.domain(domid, "probe")
        return SimGuestProbe(self.hv, self.services, domid)

    def _frontends(self, dom: Domain) -> dict[str, dict[str, object]]:
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

    def _digest_grants(self, dom: Domain) -> tuple:
        gt = self.hv.export_grants(dom)
        h = hashlib.sha256(b"".join(gt.frames)).hexdigest()
        return (gt.version, gt.frame_gfns, h)

    def _digest_shared_info(self, dom: Domain) -> tuple:
        si = self.hv.export_shared_info(dom)
        return (si.gfn, hashlib.sha256(si.content).hexdigest(), si.vcpu_info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.guests.begin_close()
        for domid in list(self.hv.domains):
            with contextlib.suppress(HostError):
                self.destroy_domain(domid)
        self.guests.close()
        self.services.kernel.stop()
