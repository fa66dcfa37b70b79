"""The toolstack: what libxl and libxc do with the hypervisor and dom0's
services to create a domain, save its state and restore it.

Creating a guest builds its memory and special pages, introduces it to
xenstored and connects its backends, then starts its guest process
(xg_dom_x86.c, libxl__build_hvm). Saving exports what Xen and dom0 hold
for it (the PV state); restoring validates all of an incoming state
before it changes anything, then rebuilds it with the same numbers.
"""

from __future__ import annotations

import contextlib
import random
import time

import numpy as np
from oslo_log import log as logging

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.digest import MemoryDigest
from nova_xen_ncm.host.sim.dom0 import Dom0Services
from nova_xen_ncm.host.sim.guestproc import GuestProcesses
from nova_xen_ncm.host.sim.hypervisor import DOM0
from nova_xen_ncm.host.sim.hypervisor import NR_GRANT_FRAMES
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.hypervisor import canonical_uuid
from nova_xen_ncm.host.sim.memory import INVALID_GFN
from nova_xen_ncm.host.sim.memory import MAX_GRANT_FRAMES
from nova_xen_ncm.host.sim.memory import P2M_RAM
from nova_xen_ncm.host.sim.memory import XENPAGE_GRANT_BASE
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.xenstore import ImportPolicy
from nova_xen_ncm.host.sim.xenstore import XenstoreMigrationError
from nova_xen_ncm.host.sim.xs_wire import XenstoreError

LOG = logging.getLogger(__name__)

START_TIMEOUT = 300.0
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


class RecentDomids:
    """libxl's recently used domids (libxl__mark_domid_recent,
    libxl__is_domid_recent): a domid released less than
    DOMID_REUSE_TIMEOUT ago is not given to a new domain, and one asked
    for is refused unless the guest that held it asks (a restore or a
    migration back)."""

    def __init__(self) -> None:
        # When each recently released domid was released, and whose
        # (its uuid) it was.
        self.released: dict[int, float] = {}
        self.released_by: dict[int, str] = {}

    def mark(self, domid: int, uuid: str | None) -> None:
        now = time.monotonic()
        self.released = {
            d: t
            for d, t in self.released.items()
            if now - t < DOMID_REUSE_TIMEOUT
        }
        self.released[domid] = now
        self.released_by[domid] = uuid or ""

    def is_recent(self, domid: int) -> bool:
        released = self.released.get(domid)
        return (
            released is not None
            and time.monotonic() - released < DOMID_REUSE_TIMEOUT
        )

    def check(self, domid: int, uuid: str | None, call: str) -> None:
        """libxl__domain_make: a domid asked for that another guest
        released recently is refused ("domain id recently used"), not
        retried."""
        if not self.is_recent(domid) or _same_guest(
            self.released_by.get(domid), uuid
        ):
            return
        # The guest that held it may have it back: the delay guards
        # against another guest inheriting what named the old one, and
        # the real driver restores with LIBXL_DOMID_REUSE_TIMEOUT=0 for
        # that reason.
        raise base.DomidInUse(
            f"domid {domid}: domain id recently used (released "
            f"{time.monotonic() - self.released[domid]:.0f} s ago; not "
            f"reused for {DOMID_REUSE_TIMEOUT:.0f} s)",
            call=call,
        )


def _same_guest(released_by: str | None, uuid: str | None) -> bool:
    if not released_by or not uuid:
        return False
    try:
        return canonical_uuid(released_by) == canonical_uuid(uuid)
    except ValueError:
        return False


class Toolstack:
    """libxl on one host, over its hypervisor, dom0 services, guest
    processes and memory digests."""

    def __init__(
        self,
        hv: Hypervisor,
        services: Dom0Services,
        guests: GuestProcesses,
        digest: MemoryDigest,
        opts: object,
        features: frozenset[base.GuestFeature],
        *,
        prelaunch: bool = True,
    ) -> None:
        self.hv = hv
        self.services = services
        self.guests = guests
        self.digest = digest
        self.opts = opts
        self.features = features
        self.prelaunch = prelaunch
        self.recent = RecentDomids()
        self._random = random.SystemRandom()

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
    ) -> Domain:
        """Check and create the domain record (host lock held)."""
        self.hv.check_domid(domid, call)
        self.recent.check(domid, config.uuid, call)
        self._check_config(config, call)
        if config.uuid is not None:
            try:
                wanted = canonical_uuid(config.uuid)
            except ValueError as exc:
                raise HostError(str(exc), call=call) from None
            for other in self.hv.domains.values():
                if canonical_uuid(other.uuid) == wanted:
                    raise HostError(
                        f"uuid {wanted} is held by domain {other.domid} "
                        f"({other.name!r})",
                        call=call,
                    )
        if config.memory_bytes > self.hv.free_memory():
            raise base.InsufficientMemory(
                f"{config.memory_bytes} bytes asked, "
                f"{self.hv.free_memory()} free",
                call=call,
            )
        hvm_layout = layout.HvmLayout.for_memory(config.memory_bytes)
        spare_ram = self.guests.take_spare_ram(hvm_layout.max_pfn)
        try:
            return self.hv.add_domain(domid, config, hvm_layout, spare_ram)
        except BaseException:
            if spare_ram is not None:
                spare_ram.close()
            raise

    def workload(self, dom: Domain) -> dict:
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

    def _build(self, dom: Domain) -> None:
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
            port = self.hv.evtchn.alloc_unbound(self.hv.dom0, dom.domid, DOM0)
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
        self.services.xenstore_connect(dom)
        self.services.bind_services(dom)
        for dev in dom.config.devices:
            devices.add_device(self.services.xs, dom.domid, dev)
            be = self.services.new_backend(dom, dev)
            # Started by create_domain once the host lock is released: a
            # backend calls into the host with its own lock held.
            self.services.record(dom).backends[be.token] = be

    def _new_domid(self, call: str) -> int:
        """A new guest's domid by ``domid_policy``, never a recently
        released one. Host lock held."""
        if self.opts.domid_policy != "random":
            return self.hv.alloc_domid(call, self.recent.is_recent)
        # libxl's random policy: a migrating guest keeps its domid, so
        # hosts that all gave 1, 2, ... first would clash.
        free = [
            d
            for d in range(1, base.DOMID_FIRST_RESERVED)
            if d not in self.hv.domains and not self.recent.is_recent(d)
        ]
        if not free:
            raise HostError("no domid free", call=call)
        return self._random.choice(free)

    def create_domain(self, config: base.DomainConfig) -> int:
        call = "create_domain"
        with self.hv.locked():
            for d in self.hv.domains.values():
                if d.name == config.name:
                    raise HostError(
                        f"a domain named {config.name!r} exists", call=call
                    )
            domid = self._new_domid(call)
            dom = self._reserve(config, domid, call)
            self.services.record(dom).disks_here = True
            try:
                self._build(dom)
            except BaseException:
                self.teardown(dom)
                raise
        try:
            for be in list(self.services.record(dom).backends.values()):
                self.services.add_backend(dom, be)
                be.start()
            self._spawn(dom, "boot")
        except BaseException:
            self.teardown(dom)
            raise
        self.guests.replenish()
        return domid

    def create_empty_domain(
        self, config: base.DomainConfig, domid: int
    ) -> int:
        with self.hv.locked():
            dom = self._reserve(config, domid, "create_empty_domain")
            # The toolstack's device directories in dom0's backend tree,
            # which the restored backend areas go under.
            for parent in self.services.backend_parents(dom):
                self.services.toolstack_xs.write(parent, b"")
        if self.prelaunch:
            try:
                self.guests.launch(dom, self.workload(dom))
            except BaseException:
                self.teardown(dom)
                raise
        # Its unpause (or teardown) only lets the thread go on.
        self.guests.prepare_replenish()
        self.digest.warm(dom, lambda: dom.booted)
        return domid

    def _spawn(self, dom: Domain, mode: str) -> None:
        """Boot the guest, or resume it from RAM and the HVM context, and
        run it (one request: a restored guest's downtime ends here)."""
        if dom.process is None:
            self.guests.launch(dom, self.workload(dom))
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
        # Once it runs: what it writes from its start stays in its PTEs
        # for the first scan, which is not part of the downtime.
        with dom.mem_lock():
            dom.mem.release_tracking()
        dom.save_registers(regs)
        dom.booted = True
        self.hv.running(dom)
        self.hv.reassert_upcalls(dom)

    def _start_running(self, dom: Domain) -> None:
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
        self.hv.running(dom)
        self.hv.reassert_upcalls(dom)

    def teardown(self, dom: Domain) -> None:
        self.guests.stop(dom, wait=False)
        with self.hv.locked():
            parents = self.services.backend_parents(dom)
            backends = list(self.services.record(dom).backends.items())
            for token, _ in backends:
                self.services.backends.pop(token, None)
            self.services.record(dom).backends.clear()
        for _, be in backends:
            with contextlib.suppress(Exception):
                be.close()
        for disk in self.services.record(dom).disks:
            disk.close()
        # libxl removes the device areas of a destroyed domain (an
        # export's freeze is over: the domain is going).
        self.services.xenstore.thaw(dom.domid)
        for parent in parents:
            with contextlib.suppress(XenstoreError):
                self.services.toolstack_xs.rm(parent)
        with self.hv.locked():
            self.services.prelinked = {
                k for k in self.services.prelinked if k[0] != dom.domid
            }
            released = self.hv.domains.get(dom.domid) is dom
            self.hv.release_domain(dom)
            self.services.release_ports(dom)
            if released:
                self.recent.mark(dom.domid, dom.uuid)
            if self.services.xenstore.is_introduced(dom.domid):
                self.services.xenstore.release_domain(dom.domid)
        self.guests.in_background(dom.mem.free)
        self.guests.replenish()

    def destroy_domain(self, domid: int, delete_disks: bool = False) -> None:
        """Destroy the domain; with ``delete_disks``, its vbd files too,
        unless the guest left (its state was exported: it runs on another
        host or from a save file) or never ran here (a restore rolled
        back: the disks are the source's)."""
        with self.hv.locked():
            dom = self.hv.domain(domid, "destroy_domain")
            dom.state = DomainState.DYING
        self.teardown(dom)
        if delete_disks and self.services.record(dom).disks_here:
            self.services.delete_disks(dom)

    def pause(self, domid: int) -> None:
        dom = self.hv.domain(domid, "pause")
        if dom.state != DomainState.RUNNING:
            return
        regs = dom.request({"cmd": "pause"})
        with dom.mem_lock():
            dom.mem.hold_tracking()
        dom.save_registers(regs)
        dom.state = DomainState.PAUSED
        dom.cpu_time += time.monotonic() - dom.run_started

    def unpause(self, domid: int) -> None:
        dom = self.hv.domain(domid, "unpause")
        # A domain its guest shut down stays so, as in Xen, until it is
        # destroyed.
        if dom.state in (DomainState.RUNNING, DomainState.SHUTDOWN):
            return
        self.services.release_backends(dom)
        rec = self.services.record(dom)
        rec.disks_here = True
        if rec.detached_ring is not None:
            page, rec.detached_ring = rec.detached_ring, None
            self.services.xenstore.attach_ring(
                domid, page, self.services.store_notify(dom)
            )
        if not dom.booted:
            try:
                self._spawn(dom, "resume")
            except BaseException:
                self.guests.stop(dom)
                raise
            self.guests.replenish()
        else:
            self._start_running(dom)

    def feature_uses(self, dom: Domain) -> dict[base.GuestFeature, str]:
        """base.feature_uses of the running guest: the predicate the
        import applies (_validate_pv_state), so SETUP refuses what the
        import would."""
        nodes: list = []
        if self.services.xenstore.is_introduced(dom.domid):
            xs = self.services.xenstore.export_domain(dom.domid, strict=False)
            nodes = list(xs.nodes)
            for tx in xs.transactions:
                nodes += [
                    w for w in tx.writes if isinstance(w, base.XenstoreNode)
                ]
        return base.feature_uses(
            dom.domid,
            base.EvtchnAbi.TWO_LEVEL,
            1,
            self.hv.evtchn.table(dom),
            nodes,
            {d.backend_domid for d in dom.config.devices},
            base.grant_domains(self.hv.export_grants(dom)),
        )

    def device_refusal(
        self, dom: Domain, backends: tuple[base.BackendState, ...]
    ) -> str | None:
        """Why one of the guest's devices cannot be carried now, or
        None: a backend's record holds one ring and one port, so a
        frontend that switched to several queues is refused by name."""
        xs = self.services.toolstack_xs
        for bs in backends:
            try:
                names = xs.directory(bs.frontend_path)
                area = {
                    n: xs.read(f"{bs.frontend_path}/{n}").decode(
                        errors="replace"
                    )
                    for n in names
                }
            except XenstoreError:
                continue  # no frontend (yet): nothing of it to carry
            refusal = base.multi_queue_refusal(bs.kind, bs.devid, area)
            if refusal is not None:
                return f"domain {dom.domid}: {refusal}"
        return None

    def export_pv_state(self, domid: int) -> base.PvState:
        call = "export_pv_state"
        dom = self.hv.domain(domid, call)
        # Backends lock themselves and then the host: ask them first.
        backends = self.services.backend_states(dom)
        refusal = self.device_refusal(dom, backends)
        if refusal is not None:
            raise base.NotSupported(refusal, call=call)
        with self.hv.locked():
            if dom.state == DomainState.RUNNING:
                raise HostError(f"domain {domid} must be paused", call=call)
            rec = self.services.record(dom)
            if rec.backends and not rec.quiesced:
                raise HostError(
                    f"domain {domid}'s backends must be quiesced", call=call
                )
            areas = tuple(b.backend_path for b in backends)
            try:
                xs_state = self.services.xenstore.export_domain(
                    domid, areas, freeze=True
                )
            except XenstoreMigrationError as exc:
                raise HostError(f"xenstore: {exc}", call=call) from None
            # The guest may now run elsewhere on these disks (unpause
            # takes them back if it stays).
            self.services.record(dom).disks_here = False
            return base.PvState(
                domid=domid,
                backend_domids=self.hv.backend_domids(dom),
                event_channels=base.EventChannelState(
                    abi=base.EvtchnAbi.TWO_LEVEL,
                    ports=self.hv.evtchn.table(dom),
                ),
                grant_table=self.hv.export_grants(dom),
                shared_info=self.hv.export_shared_info(dom),
                xenstore=xs_state,
                backends=backends,
            )

    def _check_ring_grant(
        self,
        dom: Domain,
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

    def _validate_pv_state(self, dom: Domain, state: base.PvState) -> None:
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
            if feature not in self.features:
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
            # What the reconnect below requires of the state (its xenbus
            # state, its backend area, its ring), refused now: once the
            # xenstore is imported a refusal would come too late.
            try:
                devices.validate_backend_state(bs)
            except devices.BackendError as exc:
                raise refuse(str(exc)) from None
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
                    path = self.services.disk_path(dom.uuid, bs.devid)
                    devices.BlockStore.open(path).close()
                except (ValueError, devices.BackendError) as exc:
                    raise refuse(f"{where}: {exc}") from None
        for b in state.backend_domids:
            if b != DOM0 and b not in self.hv.domains:
                raise refuse(f"backend domain {b} does not exist here")
        ec = state.event_channels
        if ec.abi != base.EvtchnAbi.TWO_LEVEL:
            raise base.NotSupported(
                "only the 2-level event channel ABI is implemented", call=call
            )
        allowed = {b.backend_domid for b in state.backends}
        self.hv.evtchn.validate_table(
            dom, ec.ports, allowed | {dom.domid, DOM0}
        )
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

    def import_pv_state(self, domid: int, state: base.PvState) -> None:
        call = "import_pv_state"
        with self.hv.locked():
            dom = self.hv.domain(domid, call)
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
            # Validated as this guest's: its teardown removes them even
            # if the import fails after writing them, before a backend
            # that would have named them is recorded.
            self.services.record(dom).imported_parents.update(
                b.backend_path.rsplit("/", 1)[0] for b in state.backends
            )
            for b in state.backends:
                parent = b.backend_path.rsplit("/", 1)[0]
                if parent not in made and not self.services.xs_exists(parent):
                    self.services.toolstack_xs.write(parent, b"")
                    made.append(parent)
            try:
                self.services.xenstore_connect(dom, state.xenstore, policy)
            except XenstoreMigrationError as exc:
                for parent in made:
                    with contextlib.suppress(XenstoreError):
                        self.services.toolstack_xs.rm(parent)
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
            self.services.import_ports(dom, state.event_channels.ports)
            self.services.bind_services(dom)
        # The backends map their rings and bind their ports now, so that
        # one that cannot makes the migration roll back; answering what
        # was in flight writes guest memory and raises ports, and until
        # the commit the guest must look exactly as the source paused
        # it, so they wait for the unpause.
        self.services.reconnect_backends(dom, state.backends)
