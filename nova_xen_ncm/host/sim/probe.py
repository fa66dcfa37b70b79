"""The transparency checker's read-only queries of a simulated guest
(:class:`~nova_xen_ncm.host.base.GuestProbe`).

Each answer is what a tool in dom0 would get from Xen or xenstored for
the same query, read here from the hypervisor's own tables and the
guest's pages: none goes through the toolstack's export
(``export_pv_state``), the hypervisor's ``export_*``/``guest_ports``, the
memory digest or :meth:`SimHost.guest_state`, the code the checker judges.
Nothing here writes the guest or any host state.
"""

from __future__ import annotations

import numpy as np

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim.memory import INVALID_GFN
from nova_xen_ncm.host.sim.memory import P2M_NONE
from nova_xen_ncm.host.sim.memory import XENPAGE_GRANT_BASE
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO


class SimGuestProbe(base.GuestProbe):
    """Read-only queries about one domain of a simulated host."""

    def __init__(self, hv: object, services: object, domid: int) -> None:
        self._hv = hv
        self._services = services
        self._domid = domid

    def _dom(self, call: str) -> object:
        return self._hv.domain(self._domid, call)

    def physmap(self) -> base.GuestPhysmap:
        dom = self._dom("probe.physmap")
        with self._hv.locked():
            gfns = [int(g) for g in dom.mem.xen_gfns]
            nr_frames = dom.grants.nr_frames
            placed = dict(dom.vcpu_info_at)
            vcpus = dom.vcpus
        shinfo = gfns[XENPAGE_SHARED_INFO]
        frames = gfns[XENPAGE_GRANT_BASE : XENPAGE_GRANT_BASE + nr_frames]
        return base.GuestPhysmap(
            shared_info_gfn=None if shinfo == INVALID_GFN else shinfo,
            grant_version=1,
            grant_frame_gfns=tuple(
                None if g == INVALID_GFN else g for g in frames
            ),
            vcpu_info=tuple(
                base.VcpuInfoPlacement(v, *placed[v])
                if v in placed
                else base.VcpuInfoPlacement(v)
                for v in range(vcpus)
            ),
        )

    def frame(self, gfn: int) -> bytes:
        dom = self._dom("probe.frame")
        mem = dom.mem
        if not 0 <= gfn < mem.max_pfn or mem.p2m[gfn] == P2M_NONE:
            raise HostError(
                f"gfn {gfn:#x} is not in dom{self._domid}'s physmap",
                call="probe.frame",
            )
        with mem.lock():
            return bytes(mem.page(gfn))

    def shared_info(self) -> bytes:
        dom = self._dom("probe.shared_info")
        with dom.mem.lock():
            return bytes(dom.mem.xen_pages[XENPAGE_SHARED_INFO])

    def evtchn_status(self, port: int) -> base.EventChannel | None:
        dom = self._dom("probe.evtchn_status")
        ops = self._hv.evtchn
        with self._hv.locked():
            # lsevtchn's walk: EVTCHNOP_status until the port is invalid.
            if port <= 0 or not ops.port_is_valid(dom, port):
                return None
            return ops.status(self._hv.dom0, self._domid, port)

    def hvm_param(self, index: int) -> int:
        # The guest's own HVMOP_get_param, as if the guest asked.
        dom = self._dom("probe.hvm_param")
        return int(self._hv.hypercall(dom, "hvm_get_param", {"index": index}))

    def hvm_record(self, typecode: int, instance: int) -> bytes | None:
        # hvm_save_one: the hypervisor's own record, not hvm.encode's
        # whole-context blob that the send path streams.
        dom = self._dom("probe.hvm_record")
        with self._hv.locked():
            if dom.state == DomainState.RUNNING:
                raise HostError(
                    f"dom{self._domid} is running: its vCPU state is in "
                    "its vCPUs, read it paused",
                    call="probe.hvm_record",
                )
            for rec in dom.records:
                if rec.typecode == typecode and rec.instance == instance:
                    return bytes(rec.data)
        return None

    def guest_tsc(self) -> int:
        return int(self._dom("probe.guest_tsc").guest_tsc())

    def xenstore(self) -> base.XenstoreReader:
        return self._services.toolstack_xs

    def xenstore_connection(
        self,
    ) -> tuple[tuple[base.XenstoreWatch, ...], tuple[int, ...], int, int]:
        store = self._services.xenstore
        if not store.is_introduced(self._domid):
            raise HostError(
                f"dom{self._domid} is not introduced to xenstored",
                call="probe.xenstore_connection",
            )
        with store._lock:
            conn = store.domain_connection(self._domid)
            return (
                tuple(
                    base.XenstoreWatch(w.given, w.token, w.depth)
                    for w in conn.watches
                ),
                tuple(sorted(conn.transactions)),
                int(conn.store_port),
                int(conn.store_gfn),
            )

    def guest_records(self) -> base.GuestRecords:
        dom = self._dom("probe.guest_records")
        mem = dom.mem
        page = bytes(mem.ram[kernel.HEADER_PFN])
        hdr = kernel.read_header(page)
        if hdr["magic"] != kernel.MAGIC:
            return base.GuestRecords({}, (), (), 0)
        frontends = {}
        for i in range(min(hdr["nr_frontends"], kernel.MAX_FRONTENDS)):
            pfn, off = kernel.frontend_place(i, devices.FRONTEND_STATE_SIZE)
            try:
                fe = devices.Frontend.attach(mem, pfn, off, None, None)
            except devices.FrontendError:
                continue
            frontends[fe.key] = fe.observation()
        counts = np.frombuffer(
            bytes(mem.ram[kernel.COUNTERS_PFN]), dtype="<u4"
        )
        progress = tuple(
            kernel.read_vcpu(page, v)["counter"]
            for v in range(min(hdr["nr_vcpus"], dom.vcpus))
        )
        return base.GuestRecords(
            frontends=frontends,
            port_counts=tuple(int(c) for c in counts),
            vcpu_progress=progress,
            dirty_rate=int(hdr["dirty_rate"]),
        )
