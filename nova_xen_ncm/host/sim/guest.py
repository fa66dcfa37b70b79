"""The simulated guest: its vCPUs and its kernel, in their own process.

Started by the host with ``python -m nova_xen_ncm.host.sim.guest ARGS``
(works under eventlet, no fork of the host). It maps the domain's memory,
then obeys the control channel: ``start`` (boot, or resume from RAM plus
the vCPU registers of the HVM context), ``pause`` (answered only when no
vCPU writes any more, with the vCPU registers), ``unpause``, ``throttle``,
``upcall`` (an event is pending: the HVM_PARAM_CALLBACK_IRQ vector),
``stop``, and a few guest-kernel actions the host's tests ask for
(``grant_access``, ``end_access``, ``write``, ``hypercall``).

All of the guest's state is in its RAM (kernel.py) and in the registers
the host holds while it is paused; the process keeps nothing else, so a
new process on another host continues where this one stopped.

The guest cooperates with nothing: it never tells the host which pages
it wrote (the hypervisor tracks writes itself, memory.WriteTracker, armed
by this process before the guest runs, as a CPU's EPT is set up before
VM entry), and its drivers act on events only. An upcall that arrives
while the vCPUs are paused is not taken: ``evtchn_upcall_pending`` stays
set in vcpu_info, in RAM, and the hypervisor asserts the vector again
when the vCPUs run (level-triggered, xen/arch/x86/hvm/irq.c).
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time

import numpy as np

from nova_xen_ncm.host.base import DOMID_SELF
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import ipc
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim import xenbus
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.memory import TRACKER_NONE
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.memory import GuestMemory

BATCH_INTERVAL = 0.01
# After a failed xenbus step (say, xenstore not ready at boot), retry in.
XENBUS_RETRY = 0.05
# The token of the watch on control/shutdown.
SHUTDOWN_WATCH = "control-shutdown"
# Unpaused seconds a xenstore request waits for the store port's event.
XENBUS_REPLY_TIMEOUT = 30.0
IPI_INTERVAL = 0.25
FILL_CHUNK = 16384
FILL_POOL_PAGES = 2048


class GuestHypercallError(Exception):
    def __init__(self, op: str, err: int, msg: str) -> None:
        self.err = err
        super().__init__(f"{op}: {msg} ({err})")


class GuestKernel:
    def __init__(
        self,
        mem: GuestMemory,
        hc: socket.socket,
        memory_bytes: int,
        vcpus: int,
    ) -> None:
        self.mem = mem
        self.hc = hc
        self.hc_lock = threading.Lock()
        self.layout = layout.HvmLayout.for_memory(memory_bytes)
        self.heap = kernel.Heap(self.layout.heap_ranges())
        self.nr_vcpus = vcpus
        self.ram64 = mem.ram.view(np.uint64)
        self.cond = threading.Condition()
        self.paused = True
        # This kernel halted its vCPUs for a shutdown its PV drivers were
        # asked for (control/shutdown): they never run again.
        self.halted = False
        self.throttle = 1.0
        self.counters = [0] * vcpus
        # Events counted per port by the upcall handler, and those its
        # driver handled: both in RAM (kernel.py).
        self.counts = mem.ram[kernel.COUNTERS_PFN].view(np.uint32)
        self.handled = mem.ram[kernel.HANDLED_PFN].view(np.uint32)
        # The store port's count last seen by a xenstore request (a
        # stale value after a restart only wakes the request once).
        self._store_seen = 0
        self.header: dict = {}
        self.io_rate = 0.0
        self.xs: xenbus.XenbusClient | None = None
        self.frontends: list[devices.Frontend] = []

    # -- hypercalls --

    def hypercall(self, op: str, **args: object) -> object:
        # Xen serves it under the host lock, then this domain's memory
        # lock: a caller holding the memory lock would deadlock across
        # the two processes, which no thread-local check could see.
        locks.check(locks.HOST)
        with self.hc_lock:
            ipc.send(self.hc, {"op": op, "args": args})
            reply = ipc.recv(self.hc)
        if "err" in reply:
            raise GuestHypercallError(op, reply["err"], reply.get("msg", ""))
        return reply.get("ok")

    # -- memory --

    def header_page(self) -> np.ndarray:
        return self.mem.ram[kernel.HEADER_PFN]

    def store_header(self) -> None:
        kernel.write_header(self.header_page(), self.header)

    def fill(self, mode: int, seed: int) -> None:
        """Give RAM the content an OS's memory has (layout.heap_ranges).

        ``guestlike``: 55% zero pages (left untouched), 25% pages of a
        repeated 8-byte pattern, 20% random pages. Random pages are
        copied from a pool and stamped with their pfn, so that each one
        is distinct and incompressible without generating gigabytes of
        random numbers at boot.
        """
        if mode == kernel.FILLS["zero"]:
            return
        rng = np.random.default_rng(seed)
        pool = rng.integers(
            0, 2**63, size=(FILL_POOL_PAGES, 512), dtype=np.uint64
        )
        for start, end in self.layout.heap_ranges():
            for s in range(start, end, FILL_CHUNK):
                e = min(end, s + FILL_CHUNK)
                pfns = np.arange(s, e, dtype=np.uint64)
                if mode == kernel.FILLS["random"]:
                    pat = pfns[:0]
                    rnd = pfns
                else:
                    kind = rng.random(len(pfns))
                    pat = pfns[(kind >= 0.55) & (kind < 0.8)]
                    rnd = pfns[kind >= 0.8]
                values = rng.integers(
                    0, 2**63, size=(len(pat), 1), dtype=np.uint64
                )
                data = pool[rng.integers(0, FILL_POOL_PAGES, len(rnd))]
                data[:, 0] = rnd ^ np.uint64(seed)
                with self.mem.lock():
                    self.ram64[pat] = values
                    self.ram64[rnd] = data

    # -- boot and resume --

    def boot(self, config: dict) -> None:
        self.header = {
            "magic": kernel.MAGIC,
            "version": kernel.VERSION,
            "nr_vcpus": self.nr_vcpus,
            "pattern": kernel.PATTERNS[config["pattern"]],
            "fill": kernel.FILLS[config["fill"]],
            "seed": config["seed"],
            "dirty_rate": config["dirty_rate"],
            "hot_fraction": config["hot_fraction"],
            "hot_probability": config["hot_probability"],
            "pv_drivers": int(config["pv_drivers"]),
            "nr_grant_frames": config["nr_grant_frames"],
            "shared_info_gfn": 0,
            "grant_gfn": 0,
            "callback_via": 0,
            "store_port": 0,
            "console_port": 0,
            "debug_port": 0,
            "nr_frontends": 0,
            "upcalls": 0,
            "domid": config["domid"],
            "xenbus_ready": 0,
            "next_driver_page": 0,
            "next_grant_ref": kernel.FIRST_GRANT_REF,
            "io_rate": float(config.get("io_rate", 0)),
            "store_pfn": 0,
        }
        self.fill(self.header["fill"], config["seed"])
        with self.mem.lock():
            self.store_header()
            for v in range(self.nr_vcpus):
                self._store_vcpu(
                    v,
                    counter=0,
                    ipi_port=0,
                    vcpu_info_gfn=0,
                    vcpu_info_offset=0,
                )
        if config["pv_drivers"]:
            self.init_pv()

    def _store_vcpu(self, v: int, **fields: int) -> None:
        page = self.header_page()
        slot = kernel.read_vcpu(page, v)
        slot.update(fields)
        kernel.write_vcpu(page, v, slot)

    def init_pv(self) -> None:
        """What Linux's Xen HVM support does at boot: the callback
        vector, shared info and grant frames in the platform device's
        BAR, vcpu_info registered per vCPU, IPIs, and its ports masked
        until bound."""
        via = hvm.CALLBACK_TYPE_VECTOR | hvm.CALLBACK_VECTOR
        self.hypercall(
            "hvm_set_param", index=hvm.HVM_PARAM_CALLBACK_IRQ, value=via
        )
        shinfo_gfn = layout.PLATFORM_BAR_PFN
        self.hypercall(
            "add_to_physmap", space="shared_info", idx=0, gfn=shinfo_gfn
        )
        with self.mem.lock():
            shinfo = self.mem.xen_pages[XENPAGE_SHARED_INFO].view(np.uint64)
            mask = evtchn.SHINFO_MASK // 8
            shinfo[mask : mask + 64] = np.uint64(0xFFFFFFFFFFFFFFFF)
        grant_gfn = shinfo_gfn + 1
        for i in range(self.header["nr_grant_frames"]):
            self.hypercall(
                "add_to_physmap", space="grant_table", idx=i, gfn=grant_gfn + i
            )
        for v in range(self.nr_vcpus):
            off = v * evtchn.VCPU_INFO_SIZE
            self.hypercall(
                "register_vcpu_info",
                vcpu=v,
                gfn=kernel.VCPU_INFO_PFN,
                offset=off,
            )
        ports = []
        ipis = [
            self.hypercall("evtchn_bind_ipi", vcpu=v)
            for v in range(self.nr_vcpus)
        ]
        debug = self.hypercall(
            "evtchn_bind_virq", virq=evtchn.VIRQ_DEBUG, vcpu=0
        )
        store = self.hypercall(
            "hvm_get_param", index=hvm.HVM_PARAM_STORE_EVTCHN
        )
        console = self.hypercall(
            "hvm_get_param", index=hvm.HVM_PARAM_CONSOLE_EVTCHN
        )
        store_pfn = self.hypercall(
            "hvm_get_param", index=hvm.HVM_PARAM_STORE_PFN
        )
        ports = [*ipis, debug, store, console]
        with self.mem.lock():
            self.header.update(
                shared_info_gfn=shinfo_gfn,
                grant_gfn=grant_gfn,
                callback_via=via,
                store_port=store,
                store_pfn=store_pfn,
                console_port=console,
                debug_port=debug,
            )
            self.store_header()
            for v, port in enumerate(ipis):
                self._store_vcpu(
                    v,
                    ipi_port=port,
                    vcpu_info_gfn=kernel.VCPU_INFO_PFN,
                    vcpu_info_offset=v * evtchn.VCPU_INFO_SIZE,
                )
        for port in ports:
            if port:
                self.hypercall("evtchn_unmask", port=port)

    def resume(self, regs: list[dict]) -> None:
        page = bytes(self.header_page())
        self.header = kernel.read_header(page)
        if self.header["magic"] != kernel.MAGIC:
            raise RuntimeError("guest RAM holds no kernel state to resume")
        self.set_registers(regs)

    def set_registers(self, regs: list[dict]) -> None:
        for v, r in enumerate(regs[: self.nr_vcpus]):
            self.counters[v] = int(r["rip"])

    def registers(self) -> list[dict]:
        return [{"rip": c} for c in self.counters]

    # -- vCPUs --

    def vcpu_loop(self, v: int) -> None:
        # Started with the process, before there is a kernel to run: the
        # first unpause finds the vCPUs waiting for it.
        with self.cond:
            while self.paused or self.halted:
                self.cond.wait()
        rate = self.header["dirty_rate"] / max(1, self.nr_vcpus)
        pages_per_s = rate / PAGE_SIZE
        if pages_per_s > 0:
            batch = max(1, math.ceil(pages_per_s * BATCH_INTERVAL))
            period = batch / pages_per_s
        else:
            batch, period = 0, IPI_INTERVAL
        next_ipi = time.monotonic() + IPI_INTERVAL
        deadline = time.monotonic()
        while True:
            with self.cond:
                while self.paused or self.halted:
                    self.cond.wait()
                    deadline = time.monotonic()
                if batch:
                    self._write_batch(v, batch)
                now = time.monotonic()
                if now >= next_ipi and self.header["pv_drivers"]:
                    self._send_ipi(v)
                    next_ipi = now + IPI_INTERVAL
            deadline += period / self.throttle
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                deadline = time.monotonic()

    def _write_batch(self, v: int, n: int) -> None:
        c = self.counters[v]
        counters = np.arange(c + 1, c + 1 + n, dtype=np.uint64)
        pfns = kernel.workload_pages(self.heap, self.header, v, counters)
        stamp = np.uint64(kernel.STAMP_MAGIC | (v << 32))
        with self.mem.lock():
            self.ram64[pfns, 0] = stamp
            self.ram64[pfns, 1] = counters
            self.counters[v] = c + n
            self._store_vcpu(v, counter=c + n)

    def _send_ipi(self, v: int) -> None:
        if self.nr_vcpus < 2:
            return
        target = (v + 1) % self.nr_vcpus
        page = self.header_page()
        port = kernel.read_vcpu(page, target)["ipi_port"]
        if not port:
            return
        self.hypercall("evtchn_send", port=port)
        with self.mem.lock():
            sent = kernel.read_vcpu(page, v)["ipis_sent"]
            self._store_vcpu(v, ipis_sent=sent + 1)

    # -- what PV drivers ask of the kernel (devices.GuestOps) --

    def alloc_page(self) -> int:
        with self.mem.lock():
            n = self.header["next_driver_page"]
            if n >= kernel.DRIVER_PAGES:
                raise RuntimeError("no driver page left")
            self.header["next_driver_page"] = n + 1
            self.store_header()
        return kernel.DRIVER_PFN + n

    def grant_access(self, domid: int, gfn: int, readonly: bool) -> int:
        """gnttab_grant_foreign_access: frame and domid, then flags."""
        flags = grant.GTF_permit_access
        if readonly:
            flags |= grant.GTF_readonly
        with self.mem.lock():
            ref = self.header["next_grant_ref"]
            entry = self.grant_entry(ref)
            self.header["next_grant_ref"] = ref + 1
            self.store_header()
            grant.GRANT_ENTRY_V1.pack_into(entry, 0, 0, domid, gfn)
            entry[0:2] = flags.to_bytes(2, "little")
        return ref

    def evtchn_alloc_unbound(self, remote_domid: int) -> int:
        port = self.hypercall(
            "evtchn_alloc_unbound", dom=DOMID_SELF, remote_dom=remote_domid
        )
        self.hypercall("evtchn_unmask", port=port)
        return port

    def evtchn_send(self, port: int) -> None:
        self.hypercall("evtchn_send", port=port)

    # -- xenbus and the PV frontends --

    def start_xenbus(self) -> None:
        """Connect the xenbus client (its state is in RAM) and, on first
        boot, probe the devices the toolstack gave us; after a restart
        attach to the frontends RAM already holds. A restart (or a retry
        after a failure) in the middle of the probe goes on from where it
        stood: nothing the guest's RAM says was done is done again."""
        off = kernel.XENBUS_STATE_PFN * PAGE_SIZE
        state = memoryview(self.mem.ram_map)[
            off : off + kernel.XENBUS_STATE_PAGES * PAGE_SIZE
        ]
        store_port = self.header["store_port"]
        self.xs = xenbus.XenbusClient(
            self.mem.page(self.header["store_pfn"], writable=True),
            state,
            notify=lambda: self.evtchn_send(store_port),
            wait=self._store_wait,
            timeout=None,
        )
        self.frontends = []
        size = devices.FRONTEND_STATE_SIZE
        if self.header["xenbus_ready"]:
            for i in range(self.header["nr_frontends"]):
                pfn, off = kernel.frontend_place(i, size)
                fe = devices.Frontend.attach(self.mem, pfn, off, self.xs, self)
                self._adopt(fe)
            # The watch came with the guest's xenstore; its handler is
            # this process's.
            self._watch_control(register=False)
            return
        # A request left in flight (a WATCH, say) is finished first, so
        # that the watches in RAM are all those xenstored holds.
        self.xs.recover()
        registered = {(p, t) for p, t, _ in self.xs.watches()}
        domid = self.header["domid"]
        base_path = f"/local/domain/{domid}/device"
        found = []
        for kind in sorted(devices.KINDS):
            try:
                devids = self.xs.directory(f"{base_path}/{kind}")
            except Exception:  # no such device class: ENOENT
                continue
            found += [(kind, int(d)) for d in devids]
        for i, (kind, devid) in enumerate(found[: kernel.MAX_FRONTENDS]):
            pfn, off = kernel.frontend_place(i, size)
            fe = devices.Frontend.probe(
                self.mem,
                pfn,
                off,
                self.xs,
                self,
                domid=domid,
                kind=kind,
                devid=devid,
                registered=registered,
            )
            self._adopt(fe)
        self._watch_control(
            register=(self._control_path("shutdown"), SHUTDOWN_WATCH)
            not in registered
        )
        with self.mem.lock():
            self.header["nr_frontends"] = len(self.frontends)
            self.header["xenbus_ready"] = 1
            self.store_header()

    def _control_path(self, node: str) -> str:
        return f"/local/domain/{self.header['domid']}/control/{node}"

    def _watch_control(self, register: bool) -> None:
        """As Linux's xen/manage.c: say the PV drivers act on a shutdown
        request (control/feature-poweroff) and watch control/shutdown;
        ``register`` False after a restore, whose xenstore carried both,
        or when the watch is registered already."""
        self.xs.set_handler(
            SHUTDOWN_WATCH, lambda path, token: self._shutdown_requested()
        )
        if register:
            self.xs.write(self._control_path("feature-poweroff"), "1")
            self.xs.watch(self._control_path("shutdown"), SHUTDOWN_WATCH)

    def _shutdown_requested(self) -> None:
        """control/shutdown changed (or the watch fired on registration):
        on "poweroff" or "halt", acknowledge it by clearing the node, as
        Linux does, halt this kernel's vCPUs and tell Xen
        (SCHEDOP_shutdown). Other values (empty: our own acknowledgement,
        or nothing asked) change nothing. Runs on the xenbus thread with
        ``cond`` held."""
        path = self._control_path("shutdown")
        try:
            request = self.xs.read(path)
        except xs_wire.XenstoreError:
            return
        if request not in (b"poweroff", b"halt"):
            return
        self.xs.write(path, "")
        self.halted = True
        self.cond.notify_all()
        self.hypercall("sched_shutdown", reason="poweroff")

    def _adopt(self, fe: devices.Frontend) -> None:
        self.frontends.append(fe)
        self.xs.set_handler(
            fe.token, lambda path, token, fe=fe: fe.handle_watch(path)
        )

    def xenbus_loop(self) -> None:
        """The xenbus thread: it acts on events (the counts the upcall
        handler keeps in RAM), and issues the workload's requests at its
        I/O rate; it polls nothing. A kernel without PV drivers (its
        header in RAM says) has none."""
        with self.cond:
            while self.paused:
                self.cond.wait()
            if not self.header["pv_drivers"]:
                return
            self.io_rate = float(self.header["io_rate"])
        credit = 0.0
        last = time.monotonic()
        while True:
            with self.cond:
                while self.paused or self.halted:
                    self.cond.wait()
                    last = time.monotonic()
                try:
                    if self.xs is None or not self.header["xenbus_ready"]:
                        # Again after a failed probe: it goes on.
                        self.start_xenbus()
                    credit = self._xenbus_step(credit, last)
                except Exception as exc:  # the driver retries
                    print(
                        f"xenbus: {type(exc).__name__}: {exc}", file=sys.stderr
                    )
                    self.cond.wait(XENBUS_RETRY)
                    continue
                last = time.monotonic()
                self._wait_for_work(credit)

    def _take_event(self, port: int) -> bool:
        """Whether ``port`` has events its driver has not handled; marks
        them handled (before the driver looks at its ring, so that an
        event counted meanwhile is work for the next step)."""
        if not 0 < port < kernel.NR_COUNTED_PORTS:
            return False
        count = self.counts[port]
        if count == self.handled[port]:
            return False
        self.handled[port] = count
        return True

    def _has_events(self) -> bool:
        ports = [self.header["store_port"]]
        ports += [fe.port for fe in self.frontends]
        return any(
            0 < p < kernel.NR_COUNTED_PORTS
            and self.counts[p] != self.handled[p]
            for p in ports
        )

    def _wait_for_work(self, credit: float) -> None:
        """Sleep (the condition released) until an event is counted for
        a port the drivers serve, or the workload's next request is due;
        the upcall handler notifies the condition."""
        rate = self.io_rate * self.throttle if self.frontends else 0.0
        end = None
        if rate > 0:
            end = time.monotonic() + max(0.0, 1.0 - credit) / rate
        while self.paused or not self._has_events():
            if end is None:
                self.cond.wait()
                continue
            left = end - time.monotonic()
            if left <= 0 and not self.paused:
                return
            self.cond.wait(max(left, 0.001) if not self.paused else None)

    def _store_wait(self) -> None:
        """XenbusClient's wait for a reply: until the store port's event
        is counted and the vCPUs run. A request with no event for
        XENBUS_REPLY_TIMEOUT unpaused seconds fails (it stays in flight
        in RAM and is recovered by the next request)."""
        port = self.header["store_port"]
        waited = 0.0
        while True:
            if not self.paused:
                seen = int(self.counts[port])
                if seen != self._store_seen:
                    self._store_seen = seen
                    return
                if waited >= XENBUS_REPLY_TIMEOUT:
                    raise xenbus.XenbusError(
                        f"no event on the store port {port} for "
                        f"{XENBUS_REPLY_TIMEOUT} s"
                    )
            start = time.monotonic()
            self.cond.wait(1.0)
            if not self.paused:
                waited += time.monotonic() - start

    def _xenbus_step(self, credit: float, last: float) -> float:
        if self._take_event(self.header["store_port"]):
            self.xs.poll()
        now = time.monotonic()
        credit = min(credit + (now - last) * self.io_rate * self.throttle, 8.0)
        for fe in self.frontends:
            if self._take_event(fe.port):
                fe.handle_event()
            if credit >= 1:
                fe.issue(int(credit))
        if credit >= 1:
            credit -= int(credit)
        return credit

    # -- events --

    def _vcpu_info(self, v: int) -> np.ndarray:
        """vCPU ``v``'s vcpu_info where the kernel registered it (the
        legacy slot in shared info until then)."""
        slot = kernel.read_vcpu(self.header_page(), v)
        gfn, off = slot["vcpu_info_gfn"], slot["vcpu_info_offset"]
        if gfn:
            return self.mem.ram[gfn][off : off + evtchn.VCPU_INFO_SIZE]
        off = v * evtchn.VCPU_INFO_SIZE
        shinfo = self.mem.xen_pages[XENPAGE_SHARED_INFO]
        return shinfo[off : off + evtchn.VCPU_INFO_SIZE]

    def _bound_here(self, v: int, w: int, ipis: list[int]) -> int:
        """Linux's cpu_evtchn mask of vCPU ``v`` for word ``w``: its own
        IPI port, and for vCPU 0 every port not bound elsewhere (ports
        are bound to vCPU 0 unless moved; only the IPIs are)."""
        lo, hi = w * 64, w * 64 + 64
        if v:
            port = ipis[v]
            return 1 << (port - lo) if port and lo <= port < hi else 0
        word = (1 << 64) - 1
        for port in ipis[1:]:
            if port and lo <= port < hi:
                word &= ~(1 << (port - lo))
        return word

    def handle_upcall(self, v: int) -> None:
        """Linux's __xen_evtchn_do_upcall on vCPU ``v``, 2-level ABI
        (evtchn_2l_handle_events): its own vcpu_info only. It clears
        evtchn_upcall_pending, takes its pending selector, and counts in
        RAM the ports of the selected words that are pending, unmasked
        and bound to this vCPU; a port of another vCPU stays pending for
        that vCPU's own upcall, and another vCPU's flag is not touched
        (the hypervisor must assert each vCPU's vector itself). The
        caller holds :attr:`cond`."""
        if not self.header.get("shared_info_gfn"):
            return
        if not 0 <= v < self.nr_vcpus:
            raise ValueError(f"upcall for vCPU {v} of {self.nr_vcpus}")
        with self.mem.lock():
            words = self.mem.xen_pages[XENPAGE_SHARED_INFO].view(np.uint64)
            counts = self.mem.ram[kernel.COUNTERS_PFN].view(np.uint32)
            page = self.header_page()
            ipis = [
                kernel.read_vcpu(page, u)["ipi_port"]
                for u in range(self.nr_vcpus)
            ]
            slot = kernel.read_vcpu(page, v)
            vi = self._vcpu_info(v)
            events = 0
            while vi[evtchn.VI_UPCALL_PENDING]:
                vi[evtchn.VI_UPCALL_PENDING] = 0
                sel_view = vi[
                    evtchn.VI_PENDING_SEL : evtchn.VI_PENDING_SEL + 8
                ].view(np.uint64)
                sel = int(sel_view[0])
                sel_view[0] = 0
                for w in range(64):
                    if not sel >> w & 1:
                        continue
                    pi = evtchn.SHINFO_PENDING // 8 + w
                    mi = evtchn.SHINFO_MASK // 8 + w
                    ready = (
                        int(words[pi])
                        & ~int(words[mi])
                        & self._bound_here(v, w, ipis)
                    )
                    words[pi] &= np.uint64(~ready & (2**64 - 1))
                    while ready:
                        bit = (ready & -ready).bit_length() - 1
                        ready &= ready - 1
                        port = w * 64 + bit
                        if port < kernel.NR_COUNTED_PORTS:
                            counts[port] += 1
                        events += 1
            if events:
                self._store_vcpu(v, events=slot["events"] + events)
            self.header["upcalls"] += 1
            self.store_header()
        self.cond.notify_all()

    # -- guest kernel actions the host's tests ask for --

    def grant_entry(self, ref: int) -> memoryview:
        frame, index = divmod(ref, grant.ENTRIES_PER_FRAME)
        if frame >= self.header["nr_grant_frames"]:
            raise ValueError(f"grant reference {ref} beyond the table")
        xen = self.mem.xen_page_at(self.header["grant_gfn"] + frame)
        if xen is None:
            raise ValueError(f"grant frame {frame} is not mapped")
        off = index * grant.GRANT_ENTRY_V1.size
        return memoryview(self.mem.xen_pages[xen])[off : off + 8]

    def action(self, msg: dict) -> object:
        cmd = msg["cmd"]
        if cmd == "grant_access":
            flags = grant.GTF_permit_access
            if msg.get("readonly"):
                flags |= grant.GTF_readonly
            with self.mem.lock():
                entry = self.grant_entry(msg["ref"])
                grant.GRANT_ENTRY_V1.pack_into(
                    entry, 0, 0, msg["domid"], msg["gfn"]
                )
                entry[0:2] = flags.to_bytes(2, "little")
            return True
        if cmd == "end_access":
            with self.mem.lock():
                entry = self.grant_entry(msg["ref"])
                flags = int.from_bytes(entry[0:2], "little")
                if flags & (grant.GTF_reading | grant.GTF_writing):
                    return False
                entry[:] = bytes(8)
            return True
        if cmd == "write":
            data = bytes.fromhex(msg["data"])
            pfn, off = msg["pfn"], msg["offset"]
            if not (0 <= pfn < self.mem.max_pfn and self.mem.p2m[pfn] == 1):
                raise ValueError(f"gfn {pfn:#x} is not RAM")
            if not 0 <= off <= PAGE_SIZE - len(data):
                raise ValueError(
                    f"{len(data)} bytes at offset {off} cross the page"
                )
            with self.mem.lock():
                self.mem.ram[pfn][off : off + len(data)] = np.frombuffer(
                    data, dtype=np.uint8
                )
            return True
        if cmd == "hypercall":
            return self.hypercall(msg["op"], **msg.get("args", {}))
        raise ValueError(f"unknown command {cmd!r}")


def serve(ctl: socket.socket, gk: GuestKernel, config: dict) -> None:
    threads = [
        threading.Thread(
            target=gk.vcpu_loop, args=(v,), daemon=True, name=f"vcpu{v}"
        )
        for v in range(gk.nr_vcpus)
    ]
    threads.append(
        threading.Thread(target=gk.xenbus_loop, daemon=True, name="xenbus")
    )
    # They wait for the first unpause: started here, they are no part of
    # it (a restored guest's unpause ends its downtime).
    for t in threads:
        t.start()
    started = False

    def run(regs: list[dict], throttle: float) -> None:
        with gk.cond:
            gk.set_registers(regs)
            gk.throttle = throttle
            gk.paused = False
            gk.cond.notify_all()

    while True:
        try:
            msg = ipc.recv(ctl)
        except ipc.ChannelClosed:
            return
        cmd = msg.get("cmd")
        reply: dict = {"id": msg.get("id")}
        try:
            if cmd == "start":
                if gk.mem.tracking == TRACKER_NONE:
                    # The hypervisor must see every write from the first.
                    raise RuntimeError("start: write tracking is not armed")
                if msg["mode"] == "boot":
                    gk.boot(config)
                else:
                    gk.resume(msg["regs"])
                started = True
                reply["ok"] = gk.registers()
                if msg.get("run"):
                    run(reply["ok"], msg.get("throttle", gk.throttle))
            elif cmd == "pause":
                with gk.cond:
                    gk.paused = True
                reply["ok"] = gk.registers()
            elif cmd == "unpause":
                if not started:
                    raise RuntimeError("the guest was not started")
                run(msg["regs"], msg.get("throttle", gk.throttle))
                reply["ok"] = True
            elif cmd == "throttle":
                gk.throttle = float(msg["fraction"])
                reply["ok"] = True
            elif cmd == "upcall":
                # Paused, the vector is not taken: the pending flag stays
                # in vcpu_info and is asserted again at unpause.
                with gk.cond:
                    if not gk.paused:
                        gk.handle_upcall(int(msg["vcpu"]))
                continue
            elif cmd == "stop":
                ipc.send(ctl, {"id": msg.get("id"), "ok": True})
                return
            else:
                with gk.cond:
                    if gk.paused:
                        raise RuntimeError("the guest is paused")
                    reply["ok"] = gk.action(msg)
        except GuestHypercallError as exc:
            reply = {"id": msg.get("id"), "err": exc.err, "msg": str(exc)}
        except Exception as exc:  # reported to the host, not fatal here
            reply = {
                "id": msg.get("id"),
                "err": -1,
                "msg": f"{type(exc).__name__}: {exc}",
            }
        ipc.send(ctl, reply)


def _wait_for_domain(fd: int) -> dict | None:
    """A spare guest process: its interpreter and modules are loaded;
    the host sends the domain (the arguments, then the four descriptors)
    when it needs a guest, or closes the channel."""
    chan = socket.socket(fileno=fd)
    chan.setblocking(True)
    with chan:
        msg, fds, _, _ = socket.recv_fds(chan, 1 << 20, 4)
    if not msg or len(fds) != 4:
        return None
    args = json.loads(msg)
    args.update(ram_fd=fds[0], ctl_fd=fds[1], hc_fd=fds[2], ctl_sock_fd=fds[3])
    return args


def main(argv: list[str]) -> int:
    if argv[1] == "--spare":
        spare = _wait_for_domain(int(argv[2]))
        if spare is None:
            return 0
        args = spare
    else:
        args = json.loads(argv[1])
    mem = GuestMemory.attach(args["ram_fd"], args["ctl_fd"])
    # The hypervisor's write tracking of this process's mapping (the
    # simulated MMU's part, before any vCPU runs); kept open until exit.
    tracking = mem.arm_write_tracking()
    if tracking is None:
        print(
            "guest: write tracking unavailable: the host takes every "
            "page as written",
            file=sys.stderr,
        )
    hc = socket.socket(fileno=args["hc_fd"])
    ctl = socket.socket(fileno=args["ctl_sock_fd"])
    # A host under eventlet made its sockets non-blocking, and the flag
    # is shared with the descriptors we inherited.
    hc.setblocking(True)
    ctl.setblocking(True)
    config = args["config"]
    gk = GuestKernel(mem, hc, config["memory_bytes"], config["vcpus"])
    serve(ctl, gk, config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
