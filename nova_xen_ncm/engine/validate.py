"""Checks of a received stream's content against the restoring guest.

The codec (:mod:`nova_xen_ncm.stream`) checks that each record is well
formed on its own. A well-formed record can still be forged: it may name
memory the guest does not have, xenstore nodes of other domains, event
channels or grants to domains the guest never dealt with. Applied, such a
record would give the guest (or whoever forged the stream) what it never
had on the source. This module is the one place that checks a stream's
content against what the destination knows of the guest: the domain it
created (domid, memory size, vCPUs) and the other guests of the host.
The :class:`~nova_xen_ncm.engine.restorer.Restorer` calls it before it
applies anything of a record: :func:`check_pages` before a PAGE_DATA
batch is populated, :func:`check_pv_records` before the PV state is
imported. A refusal raises :class:`ForgedContent` naming the record, the
field and the rule.

Domids are local to a host: domain 7 on the destination is not domain 7
of the source. So the guest may keep links only to the domains the stream
declares as its service domains (NCM_DOMAIN: backends, store, console),
and none of those may be another guest here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np

from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import ncm

# libxl's default HVM physmap (libxl_dom.c, xg_dom_x86.c meminit_hvm):
# RAM below the 256 MiB MMIO hole under 4 GiB, the rest above 4 GiB; the
# special pages end at X86_HVM_END_SPECIAL_REGION, and the Xen pages PV
# drivers place (shared info, grant frames) sit in the MMIO hole.
MMIO_HOLE_START_PFN = 0xF0000
FOUR_GIB_PFN = 0x100000
X86_HVM_END_SPECIAL_REGION = 0xFF000

# grant_table.h: GTF_type_mask and its values.
GTF_TYPE_MASK = 0x3
GTF_PERMIT_ACCESS = 1
GTF_TRANSITIVE = 3

_DEVICE_NAMES = {
    ncm.DeviceKind.VIF: "vif",
    ncm.DeviceKind.VBD: "vbd",
    ncm.DeviceKind.CONSOLE: "console",
}
_BACKEND_PATH = re.compile(
    r"/local/domain/(\d+)/backend/([a-z]+)/(\d+)/(\d+)\Z"
)


class ForgedContent(EngineError):
    """The stream names something the restoring guest does not own."""


def physmap_pfns(memory_bytes: int) -> int:
    """One past the highest guest frame of an HVM guest of
    ``memory_bytes`` (RAM, the MMIO hole with the Xen pages, the special
    pages)."""
    pages = memory_bytes // base.PAGE_SIZE
    if pages > MMIO_HOLE_START_PFN:
        return FOUR_GIB_PFN + pages - MMIO_HOLE_START_PFN
    return X86_HVM_END_SPECIAL_REGION


@dataclasses.dataclass(frozen=True)
class GuestLimits:
    """What the destination knows of the guest it restores."""

    domid: int
    memory_bytes: int
    vcpus: int
    #: Domids of the host's other guests: never a peer of this one.
    other_guests: frozenset[int] = frozenset()

    @classmethod
    def from_host(cls, host: base.HostDriver, domid: int) -> GuestLimits:
        info = host.domain_info(domid)
        return cls(
            domid=domid,
            memory_bytes=info.memory_bytes,
            vcpus=info.vcpus,
            other_guests=frozenset(
                d.domid for d in host.list_domains() if d.domid != domid
            ),
        )

    @property
    def max_pfn(self) -> int:
        return physmap_pfns(self.memory_bytes)


def check_pages(
    limits: GuestLimits,
    pfns: np.ndarray,
    types: np.ndarray,
    data_pages: int,
    data_bytes: int,
) -> None:
    """A PAGE_DATA batch: every pfn inside the guest's physmap, one type
    per pfn, one page of data per page that has data."""
    if len(types) != len(pfns):
        raise ForgedContent(
            f"PAGE_DATA: {len(pfns)} pfns but {len(types)} types"
        )
    if data_bytes != data_pages * base.PAGE_SIZE:
        raise ForgedContent(
            f"PAGE_DATA: {data_bytes} octets of data for {data_pages} "
            "pages with data"
        )
    if len(pfns):
        top = int(np.max(pfns))
        if top >= limits.max_pfn:
            raise ForgedContent(
                f"PAGE_DATA: pfn {top:#x} is beyond the guest's memory "
                f"(physmap ends at {limits.max_pfn:#x} for "
                f"{limits.memory_bytes} bytes)"
            )


# hvm/params.h: HVM_NR_PARAMS in Xen 4.17, and the params that name a
# guest frame (the pages shared with dom0's daemons, the ioreq server
# pages) or an event channel port.
HVM_NR_PARAMS = 39
_PFN_PARAMS = {
    1: "STORE_PFN",
    5: "IOREQ_PFN",
    6: "BUFIOREQ_PFN",
    17: "CONSOLE_PFN",
    27: "PAGING_RING_PFN",
    28: "MONITOR_RING_PFN",
    29: "SHARING_RING_PFN",
    32: "IOREQ_SERVER_PFN",
}
_PORT_PARAMS = {2: "STORE_EVTCHN", 18: "CONSOLE_EVTCHN"}
# The FIFO ABI's port limit (event_fifo.h EVTCHN_FIFO_NR_CHANNELS).
_MAX_PORTS = 1 << 17
_NR_IOREQ_SERVER_PAGES = 33


def check_hvm_params(limits: GuestLimits, params: dict[int, int]) -> None:
    """HVM_PARAMS: known indices, frames inside the guest's physmap,
    ports within the ABI's limit (the store PFN is where dom0's
    xenstored will write)."""
    for index, value in params.items():
        if not 0 <= index < HVM_NR_PARAMS:
            raise ForgedContent(
                f"HVM_PARAMS: index {index} is not an HVM param (Xen has "
                f"{HVM_NR_PARAMS})"
            )
        if index in _PFN_PARAMS and value >= limits.max_pfn:
            raise ForgedContent(
                f"HVM_PARAMS: {_PFN_PARAMS[index]} {value:#x} is beyond "
                f"the guest's physmap (ends at {limits.max_pfn:#x})"
            )
        if index in _PORT_PARAMS and value >= _MAX_PORTS:
            raise ForgedContent(
                f"HVM_PARAMS: {_PORT_PARAMS[index]} {value} is not an "
                "event channel port"
            )
    first = params.get(32, 0)
    count = params.get(_NR_IOREQ_SERVER_PAGES, 0)
    if count and first + count > limits.max_pfn:
        raise ForgedContent(
            f"HVM_PARAMS: {count} ioreq server pages from {first:#x} run "
            f"beyond the guest's physmap (ends at {limits.max_pfn:#x})"
        )


def check_pv_records(
    limits: GuestLimits, records: object, populated: np.ndarray
) -> None:
    """The non-cooperative records of the stream (a
    :class:`~nova_xen_ncm.engine.pvstate.PvRecords`). ``populated`` is a
    boolean array by pfn of the frames the stream populated: the guest
    owns those and no others."""
    _PvCheck(limits, records, populated).run()


class _PvCheck:
    def __init__(
        self, limits: GuestLimits, recs: object, populated: np.ndarray
    ) -> None:
        self.limits = limits
        self.recs = recs
        self.populated = populated
        self.domid = limits.domid
        dom = recs.domain
        self.backends = frozenset(dom.backend_domids)
        #: Domains the guest may have links to: itself, its services.
        self.peers = self.backends | {
            self.domid,
            dom.store_domid,
            dom.console_domid,
        }

    def run(self) -> None:
        self._domain()
        ports = self._event_channels()
        entries = self._grant_table()
        self._shared_info()
        areas = self._devices(ports, entries)
        self._xenstore(areas, ports)

    # -- helpers --

    def _owned(self, pfn: int) -> bool:
        return 0 <= pfn < len(self.populated) and bool(self.populated[pfn])

    def _in_physmap(self, gfn: int) -> bool:
        return 0 <= gfn < self.limits.max_pfn

    # -- records --

    def _domain(self) -> None:
        dom = self.recs.domain
        if dom.domid != self.domid:
            raise ForgedContent(
                f"NCM_DOMAIN: domid {dom.domid}, restoring domain {self.domid}"
            )
        for field, domid in (
            ("store_domid", dom.store_domid),
            ("console_domid", dom.console_domid),
            *(("backend_domids", d) for d in dom.backend_domids),
        ):
            if domid in self.limits.other_guests:
                raise ForgedContent(
                    f"NCM_DOMAIN: {field} {domid} is another guest on this "
                    "host, not a service domain of this one"
                )

    def _event_channels(self) -> dict[int, tuple[int, int]]:
        """Port -> (type, remote domid) of the guest's table."""
        ports = self.recs.event_channels.ports
        out: dict[int, tuple[int, int]] = {}
        linked = (ncm.EvtchnType.UNBOUND, ncm.EvtchnType.INTERDOMAIN)
        for row in ports:
            port = int(row["port"])
            kind = int(row["type"])
            remote = int(row["remote_domid"])
            vcpu = int(row["vcpu"])
            if vcpu >= self.limits.vcpus:
                raise ForgedContent(
                    f"NCM_EVENT_CHANNELS: port {port} on vCPU {vcpu}, the "
                    f"guest has {self.limits.vcpus}"
                )
            if kind in linked and remote not in self.peers:
                raise ForgedContent(
                    f"NCM_EVENT_CHANNELS: port {port} is bound to domain "
                    f"{remote}, which the guest was not bound to (its "
                    f"domains: {sorted(self.peers)})"
                )
            out[port] = (kind, remote)
        return out

    def _grant_table(self) -> np.ndarray:
        gt = self.recs.grant_table
        per_frame = (
            ncm.GNTTAB_V1_PER_FRAME
            if gt.version == 1
            else ncm.GNTTAB_V2_PER_FRAME
        )
        if len(gt.entries) != len(gt.frame_gfns) * per_frame:
            raise ForgedContent(
                f"NCM_GRANT_TABLE: {len(gt.entries)} entries for "
                f"{len(gt.frame_gfns)} frames of {per_frame}"
            )
        for field, gfns in (
            ("frame_gfns", gt.frame_gfns),
            ("status_gfns", gt.status_gfns),
        ):
            for i, gfn in enumerate(gfns):
                if gfn != ncm.INVALID_GFN and not self._in_physmap(gfn):
                    raise ForgedContent(
                        f"NCM_GRANT_TABLE: {field}[{i}] {gfn:#x} is outside "
                        "the guest's physmap"
                    )
        entries = gt.entries
        kind = entries["flags"] & GTF_TYPE_MASK
        frames = entries["frame"].astype(np.uint64)
        access = np.flatnonzero(kind == GTF_PERMIT_ACCESS)
        if len(access):
            owned = np.zeros(len(access), dtype=bool)
            inside = frames[access] < len(self.populated)
            owned[inside] = self.populated[
                frames[access][inside].astype(np.int64)
            ]
            bad = np.flatnonzero(~owned)
            if len(bad):
                ref = int(access[bad[0]])
                raise ForgedContent(
                    f"NCM_GRANT_TABLE: entry {ref} grants frame "
                    f"{int(frames[ref]):#x}, which the guest does not own"
                )
        used = np.flatnonzero(kind != 0)
        for ref in used:
            domid = int(entries["domid"][ref])
            if domid not in self.peers:
                raise ForgedContent(
                    f"NCM_GRANT_TABLE: entry {int(ref)} grants to domain "
                    f"{domid}, which the guest was not bound to"
                )
            if gt.version == 2 and kind[ref] == GTF_TRANSITIVE:
                trans = int(entries["ext"][ref]) & 0xFFFF
                if trans not in self.peers:
                    raise ForgedContent(
                        f"NCM_GRANT_TABLE: entry {int(ref)} is a "
                        f"transitive grant of domain {trans}'s"
                    )
        return entries

    def _shared_info(self) -> None:
        si = self.recs.shared_info
        if len(si.vcpu_info) != self.limits.vcpus:
            raise ForgedContent(
                f"NCM_SHARED_INFO: {len(si.vcpu_info)} vcpu_info entries, "
                f"the guest has {self.limits.vcpus} vCPUs"
            )
        if si.gfn != ncm.INVALID_GFN and not self._in_physmap(si.gfn):
            raise ForgedContent(
                f"NCM_SHARED_INFO: gfn {si.gfn:#x} is outside the guest's "
                "physmap"
            )
        for entry in si.vcpu_info:
            if entry.kind == ncm.VcpuInfoKind.REGISTERED and not self._owned(
                entry.gfn
            ):
                raise ForgedContent(
                    f"NCM_SHARED_INFO: vcpu_info of vCPU {entry.vcpu} in "
                    f"frame {entry.gfn:#x}, which the guest does not own"
                )

    def _devices(
        self, ports: dict[int, tuple[int, int]], entries: np.ndarray
    ) -> list[str]:
        """Checks each device; returns the xenstore areas of the guest:
        its home and its devices' backend areas."""
        areas = [f"/local/domain/{self.domid}"]
        for dev in self.recs.pv_devices:
            name = _DEVICE_NAMES.get(ncm.DeviceKind(dev.kind), "?")
            where = f"NCM_PV_DEVICE {name}/{dev.devid}"
            if dev.frontend_domid != self.domid:
                raise ForgedContent(
                    f"{where}: frontend domain {dev.frontend_domid}, "
                    f"restoring domain {self.domid}"
                )
            if dev.backend_domid not in self.backends:
                raise ForgedContent(
                    f"{where}: backend domain {dev.backend_domid} is not "
                    "one of the guest's backends in NCM_DOMAIN"
                )
            front = f"/local/domain/{self.domid}/device/{name}/{dev.devid}"
            if dev.frontend_path != front:
                raise ForgedContent(
                    f"{where}: frontend area {dev.frontend_path}, must be "
                    f"{front}"
                )
            match = _BACKEND_PATH.match(dev.backend_path)
            if match is None or (
                int(match[1]),
                match[2],
                int(match[3]),
                int(match[4]),
            ) != (dev.backend_domid, name, self.domid, dev.devid):
                raise ForgedContent(
                    f"{where}: backend area {dev.backend_path} is not "
                    f"domain {dev.backend_domid}'s area of this device"
                )
            areas.append(dev.backend_path)
            for ring in dev.rings:
                self._ring(where, dev.backend_domid, ring, ports, entries)
        return areas

    def _ring(
        self,
        where: str,
        backend: int,
        ring: ncm.PvRing,
        ports: dict[int, tuple[int, int]],
        entries: np.ndarray,
    ) -> None:
        bound = ports.get(ring.frontend_port)
        # Unbound for the backend's domain, with no backend port: a
        # backend quiesced by being unbound from its driver closed its
        # end, and the destination's binds it again.
        kind = (
            ncm.EvtchnType.INTERDOMAIN
            if ring.backend_port
            else ncm.EvtchnType.UNBOUND
        )
        if bound != (int(kind), backend):
            raise ForgedContent(
                f"{where}: port {ring.frontend_port} is not a channel to "
                f"backend domain {backend}"
            )
        for ref in ring.ring_refs:
            if ref >= len(entries):
                raise ForgedContent(
                    f"{where}: grant reference {ref} beyond the table's "
                    f"{len(entries)} entries"
                )
            entry = entries[ref]
            if (
                int(entry["flags"]) & GTF_TYPE_MASK != GTF_PERMIT_ACCESS
                or int(entry["domid"]) != backend
            ):
                raise ForgedContent(
                    f"{where}: grant reference {ref} does not grant a "
                    f"frame to backend domain {backend}"
                )

    def _xenstore(
        self, areas: list[str], ports: dict[int, tuple[int, int]]
    ) -> None:
        conn = self.recs.xs_connection
        if conn.domid != self.domid:
            raise ForgedContent(
                f"NCM_XS_CONNECTION: of domain {conn.domid}, restoring "
                f"domain {self.domid}"
            )
        store = self.recs.domain.store_domid
        if ports.get(conn.evtchn) != (int(ncm.EvtchnType.INTERDOMAIN), store):
            raise ForgedContent(
                f"NCM_XS_CONNECTION: port {conn.evtchn} is not a channel to "
                f"the store domain {store}"
            )
        for node in self.recs.xs_nodes:
            what = "NCM_XS_NODE" + (
                f" (transaction {node.tx_id})" if node.conn_id else ""
            )
            if not any(_in_area(node.path, a) for a in areas):
                raise ForgedContent(
                    f"{what}: {node.path} is outside the guest's areas {areas}"
                )
            self._perms(what, node.path, node.perms)

    def _perms(self, what: str, path: str, perms: Iterable) -> None:
        perms = tuple(perms)
        if not perms:
            return  # removed inside a transaction
        owner = perms[0].domid
        if owner not in self.peers:
            raise ForgedContent(
                f"{what}: {path} owned by domain {owner}, which the guest "
                "was not bound to"
            )
        for perm in perms[1:]:
            if perm.domid not in self.peers:
                raise ForgedContent(
                    f"{what}: {path} grants {perm.perm!r} to domain "
                    f"{perm.domid}, which the guest was not bound to"
                )
        if owner == self.domid:
            return
        # A node of a service domain: toolstacks give the guest read
        # access at most (libxl's roperm), and nothing to everybody.
        if perms[0].perm != "n":
            raise ForgedContent(
                f"{what}: {path} of domain {owner} grants "
                f"{perms[0].perm!r} to every domain"
            )
        for perm in perms[1:]:
            if perm.domid == self.domid and perm.perm not in ("r", "n"):
                raise ForgedContent(
                    f"{what}: {path} of domain {owner} grants the guest "
                    f"{perm.perm!r}, more than read"
                )


def _in_area(path: str, area: str) -> bool:
    return path == area or path.startswith(area + "/")
