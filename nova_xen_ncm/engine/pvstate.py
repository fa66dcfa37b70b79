"""Translation between a host's PV state and the stream's records.

The host boundary (:mod:`nova_xen_ncm.host.base`) describes what the guest
can see in host terms (:class:`~nova_xen_ncm.host.base.PvState`); the
stream (:mod:`nova_xen_ncm.stream.ncm`) carries it as the project's
non-cooperative records. This module is the only place that knows both:
:func:`to_records` turns a PvState into record values, :class:`PvRecords`
collects decoded records and :meth:`PvRecords.to_pv_state` turns them
back.

Where the two models differ, the mapping is chosen so that a round trip
keeps every guest-visible value:

* event channel ABI numbers differ (host: EVTCHNOP 2/3, stream: 0/1);
  2-level ports carry no priority in the stream, and Xen gives every
  port the default priority (EVTCHN_FIFO_PRIORITY_DEFAULT, 7);
* a vcpu_info in the legacy shared info slot is ``gfn None`` on the host
  and LEGACY (vCPU < 32) or NONE in the stream;
* the xenstore ring GFN travels in HVM_PARAM_STORE_PFN, not in the
  xenstore records, so decoding takes the HVM params;
* the xenstore generation a transaction started from is meaningless on
  another host; a restored transaction starts from the destination's;
* per-vCPU state (NCM_VCPU_PV) travels when the host models it (real
  Xen's export does, the simulated host's has none): its runstate and
  time areas are the guest virtual addresses of the VCPUOP_register_*
  _memory_area calls, and the singleshot timer the time left at pause.

What the stream can carry but the host model cannot (FIFO event arrays and
queue tails) is refused here rather than dropped: a guest whose PV state
was dropped is broken (architecture.rst section 4).
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import numpy as np

from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream.errors import BodyError

# HVM_PARAM_STORE_PFN (xen/include/public/hvm/params.h).
HVM_PARAM_STORE_PFN = 1
# Xen gives every new port this priority (event_fifo.h), 2-level too.
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
# The guest's one xenstore connection in the XS_* records.
XS_CONN_ID = 1

_ABI_TO_STREAM = {
    base.EvtchnAbi.TWO_LEVEL: ncm.EvtchnAbi.TWO_LEVEL,
    base.EvtchnAbi.FIFO: ncm.EvtchnAbi.FIFO,
}
_ABI_TO_HOST = {v: k for k, v in _ABI_TO_STREAM.items()}

_DEVICE_KINDS = {
    "vif": ncm.DeviceKind.VIF,
    "vbd": ncm.DeviceKind.VBD,
    "console": ncm.DeviceKind.CONSOLE,
}
_DEVICE_NAMES = {v: k for k, v in _DEVICE_KINDS.items()}

# Ring names of BackendState.ring_indices. A device with one ring calls
# it "ring" and it is the device's primary protocol; netfront's two rings
# are "tx" and "rx" (io/netif.h).
SINGLE_RING = "ring"
_PRIMARY_RING = {
    ncm.DeviceKind.VIF: ncm.RingKind.NETIF_TX,
    ncm.DeviceKind.VBD: ncm.RingKind.BLKIF,
    ncm.DeviceKind.CONSOLE: ncm.RingKind.CONSOLE,
}
_NAMED_RINGS = {
    "tx": ncm.RingKind.NETIF_TX,
    "rx": ncm.RingKind.NETIF_RX,
}
_RING_NAMES = {v: k for k, v in _NAMED_RINGS.items()}
# Size of one ring slot (the request/response union of io/blkif.h and
# io/netif.h on x86-64) when no in-flight request shows it; the console
# ring keeps its indices in its page and has no slots.
_SLOT_SIZES = {
    ncm.RingKind.BLKIF: 112,
    ncm.RingKind.NETIF_TX: 12,
    ncm.RingKind.NETIF_RX: 8,
    ncm.RingKind.CONSOLE: 0,
}

_U32 = 1 << 32

LIBXC_NAMES = frozenset(row.name for row in ncm.LIBXC_RECORDS)
LIBXL_NAMES = frozenset(row.name for row in ncm.LIBXL_RECORDS)
NAMES = LIBXC_NAMES | LIBXL_NAMES


class PvStateError(EngineError):
    """PV state that the stream (or the host model) cannot represent."""


@dataclasses.dataclass
class PvRecords:
    """The non-cooperative record values of one guest."""

    domain: ncm.NcmDomain
    shared_info: ncm.SharedInfo
    event_channels: ncm.EventChannels
    grant_table: ncm.GrantTable
    xs_connection: ncm.XsConnection
    xs_watches: tuple[ncm.XsWatch, ...] = ()
    xs_transactions: tuple[ncm.XsTransaction, ...] = ()
    xs_nodes: tuple[ncm.XsNode, ...] = ()
    pv_devices: tuple[ncm.PvDevice, ...] = ()
    vcpu_pv: ncm.VcpuPv | None = None

    def libxc_records(self) -> list[tuple[str, Any]]:
        """(name, value) of the libxc records, in stream order."""
        out: list[tuple[str, Any]] = [("NCM_SHARED_INFO", self.shared_info)]
        if self.vcpu_pv is not None:
            out.append(("NCM_VCPU_PV", self.vcpu_pv))
        return out + [
            ("NCM_EVENT_CHANNELS", self.event_channels),
            ("NCM_GRANT_TABLE", self.grant_table),
        ]

    def libxl_records(self) -> list[tuple[str, Any]]:
        """(name, value) of the libxl records, in stream order: the
        connection before what refers to it, transactions before their
        nodes."""
        out: list[tuple[str, Any]] = [
            ("NCM_DOMAIN", self.domain),
            ("NCM_XS_CONNECTION", self.xs_connection),
        ]
        out += [("NCM_XS_WATCH", w) for w in self.xs_watches]
        out += [("NCM_XS_TRANSACTION", t) for t in self.xs_transactions]
        out += [("NCM_XS_NODE", n) for n in self.xs_nodes]
        out += [("NCM_PV_DEVICE", d) for d in self.pv_devices]
        return out

    def records(self) -> list[tuple[str, Any]]:
        return self.libxc_records() + self.libxl_records()

    def to_pv_state(self, hvm_params: Mapping[int, int]) -> base.PvState:
        """The host's PvState; ``hvm_params`` give the store ring GFN."""
        try:
            return _to_pv_state(self, hvm_params)
        except (KeyError, ValueError) as exc:
            raise PvStateError(f"cannot rebuild the PV state: {exc}") from exc


class PvRecordCollector:
    """Gathers the non-cooperative records of a stream as they arrive."""

    def __init__(self) -> None:
        self._single: dict[str, Any] = {}
        self._many: dict[str, list[Any]] = {
            "NCM_XS_WATCH": [],
            "NCM_XS_TRANSACTION": [],
            "NCM_XS_NODE": [],
            "NCM_PV_DEVICE": [],
        }

    def add(self, name: str, value: Any) -> bool:
        """Keep the record if it is one of ours; False if it is not."""
        if name not in NAMES:
            return False
        if name in self._many:
            self._many[name].append(value)
        elif name in self._single:
            raise PvStateError(f"{name} appears twice in the stream")
        else:
            self._single[name] = value
        return True

    @property
    def empty(self) -> bool:
        return not self._single and not any(self._many.values())

    def result(self) -> PvRecords:
        missing = sorted(
            {
                "NCM_DOMAIN",
                "NCM_SHARED_INFO",
                "NCM_EVENT_CHANNELS",
                "NCM_GRANT_TABLE",
                "NCM_XS_CONNECTION",
            }
            - set(self._single)
        )
        if missing:
            raise PvStateError(
                f"the stream lacks {', '.join(missing)}: the guest's PV "
                "state is incomplete"
            )
        return PvRecords(
            domain=self._single["NCM_DOMAIN"],
            shared_info=self._single["NCM_SHARED_INFO"],
            event_channels=self._single["NCM_EVENT_CHANNELS"],
            grant_table=self._single["NCM_GRANT_TABLE"],
            xs_connection=self._single["NCM_XS_CONNECTION"],
            xs_watches=tuple(self._many["NCM_XS_WATCH"]),
            xs_transactions=tuple(self._many["NCM_XS_TRANSACTION"]),
            xs_nodes=tuple(self._many["NCM_XS_NODE"]),
            pv_devices=tuple(self._many["NCM_PV_DEVICE"]),
            vcpu_pv=self._single.get("NCM_VCPU_PV"),
        )


def to_records(state: base.PvState, domain_uuid: str) -> PvRecords:
    """The record values of ``state``; ``domain_uuid`` is the domain
    handle (guest-visible through XENVER_guest_handle). Every value is
    validated as the encoder would, so a refusal comes before anything
    is sent."""
    try:
        records = _to_records(state, domain_uuid)
        for _, value in records.records():
            value.validate()
    except (BodyError, KeyError, ValueError) as exc:
        raise PvStateError(
            f"PV state of domain {state.domid} cannot be carried: {exc}"
        ) from exc
    return records


# -- host -> stream -------------------------------------------------------


def _to_records(state: base.PvState, domain_uuid: str) -> PvRecords:
    domid = state.domid
    backends = tuple(sorted(set(state.backend_domids) - {domid}))
    domain = ncm.NcmDomain(
        domid=domid,
        uuid=uuidlib.UUID(domain_uuid),
        store_domid=0,
        console_domid=0,
        backend_domids=backends,
    )
    xs_nodes, xs_txs = _xenstore_nodes(state.xenstore)
    shared_info = _shared_info(state.shared_info)
    return PvRecords(
        domain=domain,
        shared_info=shared_info,
        vcpu_pv=_vcpu_pv(state, len(shared_info.vcpu_info)),
        event_channels=_event_channels(state.event_channels),
        grant_table=_grant_table(state.grant_table),
        xs_connection=ncm.XsConnection(
            conn_id=XS_CONN_ID,
            domid=domid,
            target_domid=ncm.DOMID_INVALID,
            evtchn=state.xenstore.store_port,
            in_data=state.xenstore.pending_input,
            out_data=state.xenstore.pending_output,
            out_resp_len=state.xenstore.pending_resp_len,
        ),
        xs_watches=tuple(
            ncm.XsWatch(
                conn_id=XS_CONN_ID,
                path=w.path,
                token=w.token.encode("utf-8"),
                depth=ncm.XS_WATCH_DEPTH_UNLIMITED if w.depth < 0 else w.depth,
            )
            for w in state.xenstore.watches
        ),
        xs_transactions=xs_txs,
        xs_nodes=xs_nodes,
        pv_devices=tuple(
            _pv_device(b, domid, state.event_channels, state.xenstore)
            for b in state.backends
        ),
    )


def _shared_info(si: base.SharedInfoState) -> ncm.SharedInfo:
    placed = {v.vcpu: v for v in si.vcpu_info}
    if set(placed) != set(range(len(placed))):
        raise ValueError(
            f"vcpu_info placements {sorted(placed)} are not vCPUs 0..n-1"
        )
    entries = []
    for vcpu in range(len(placed)):
        place = placed[vcpu]
        if place.gfn is not None:
            kind = ncm.VcpuInfoKind.REGISTERED
            entries.append(
                ncm.VcpuInfoPlacement(vcpu, kind, place.gfn, place.offset)
            )
        else:
            legacy = vcpu < ncm.XEN_LEGACY_MAX_VCPUS
            kind = ncm.VcpuInfoKind.LEGACY if legacy else ncm.VcpuInfoKind.NONE
            entries.append(ncm.VcpuInfoPlacement(vcpu, kind))
    return ncm.SharedInfo(
        gfn=ncm.INVALID_GFN if si.gfn is None else si.gfn,
        page=bytes(si.content),
        vcpu_info=tuple(entries),
    )


def _area(va: int) -> ncm.GuestAreaKind:
    return ncm.GuestAreaKind.VIRTUAL if va else ncm.GuestAreaKind.NONE


def _vcpu_pv(state: base.PvState, nr_vcpus: int) -> ncm.VcpuPv | None:
    if not state.vcpus:
        return None
    if [v.vcpu for v in state.vcpus] != list(range(nr_vcpus)):
        raise ValueError(
            f"per-vCPU state of vCPUs {[v.vcpu for v in state.vcpus]}, "
            f"not of the {nr_vcpus} vCPUs of the vcpu_info placements"
        )
    return ncm.VcpuPv(
        vm_assist=state.vm_assist,
        vcpus=tuple(
            ncm.VcpuPvState(
                vcpu=v.vcpu,
                runstate_kind=_area(v.runstate_va),
                runstate_addr=v.runstate_va,
                time_kind=_area(v.time_va),
                time_addr=v.time_va,
                singleshot_ns=v.singleshot_ns,
                periodic_ns=v.periodic_ns,
                upcall_vector=v.upcall_vector,
            )
            for v in state.vcpus
        ),
    )


def _host_vcpus(
    vp: ncm.VcpuPv | None, nr_vcpus: int
) -> tuple[base.VcpuPvState, ...]:
    if vp is None:
        return ()
    if len(vp.vcpus) != nr_vcpus:
        raise ValueError(
            f"NCM_VCPU_PV has {len(vp.vcpus)} vCPUs, NCM_SHARED_INFO "
            f"{nr_vcpus}"
        )
    out = []
    for v in vp.vcpus:
        areas = (("runstate", v.runstate_kind), ("time", v.time_kind))
        for what, kind in areas:
            # The host model keeps the VCPUOP_register_*_memory_area form.
            if kind == ncm.GuestAreaKind.PHYSICAL:
                raise ValueError(
                    f"vCPU {v.vcpu}: a {what} area registered by guest "
                    "physical address cannot be restored"
                )
        out.append(
            base.VcpuPvState(
                vcpu=v.vcpu,
                upcall_vector=v.upcall_vector,
                runstate_va=v.runstate_addr,
                time_va=v.time_addr,
                singleshot_ns=v.singleshot_ns,
                periodic_ns=v.periodic_ns,
            )
        )
    return tuple(out)


def _binding(port: base.EventChannel) -> int:
    if port.type == base.EvtchnType.INTERDOMAIN:
        return port.remote_port
    if port.type == base.EvtchnType.VIRQ:
        return port.virq
    if port.type == base.EvtchnType.PIRQ:
        return port.pirq
    return 0


def _event_channels(ec: base.EventChannelState) -> ncm.EventChannels:
    abi = _ABI_TO_STREAM[base.EvtchnAbi(ec.abi)]
    if abi is ncm.EvtchnAbi.FIFO:
        # The host model has no event array pages or queue tails to carry.
        raise ValueError(
            "the FIFO event channel ABI cannot be carried: the host's "
            "EventChannelState has no event array pages or queue tails"
        )
    rows = []
    for p in sorted(ec.ports, key=lambda p: p.port):
        if p.type == base.EvtchnType.CLOSED:
            continue
        remote = p.type in (
            base.EvtchnType.UNBOUND,
            base.EvtchnType.INTERDOMAIN,
        )
        flags = (ncm.PORT_PENDING if p.pending else 0) | (
            ncm.PORT_MASKED if p.masked else 0
        )
        rows.append(
            (
                p.port,
                p.vcpu,
                _binding(p),
                p.remote_domid if remote else 0,
                int(p.type),
                flags,
                0,
                0,
                0,
                0,
            )
        )
    return ncm.EventChannels(abi=abi, ports=ncm.port_array(rows))


def _grant_table(gt: base.GrantTableState) -> ncm.GrantTable:
    if gt.version == 1:
        dtype = ncm.GNT_V1_DTYPE
    elif gt.version == 2:
        dtype = ncm.GNT_V2_DTYPE
    else:
        raise ValueError(f"grant table version {gt.version}")
    if len(gt.frames) != len(gt.frame_gfns):
        raise ValueError(
            f"{len(gt.frames)} grant frames but {len(gt.frame_gfns)} GFNs"
        )
    for frame in (*gt.frames, *gt.status_frames):
        if len(frame) != base.PAGE_SIZE:
            raise ValueError(f"a grant frame of {len(frame)} octets")
    entries = np.frombuffer(b"".join(gt.frames), dtype=dtype)
    status = np.frombuffer(
        b"".join(gt.status_frames), dtype=ncm.GNT_STATUS_DTYPE
    )
    return ncm.GrantTable(
        version=gt.version,
        frame_gfns=tuple(int(g) for g in gt.frame_gfns),
        entries=entries,
        status_gfns=tuple(int(g) for g in gt.status_gfns),
        status=status,
    )


def _perms(perms: Iterable[tuple[str, int]]) -> tuple[ncm.XsPerm, ...]:
    return tuple(ncm.XsPerm(letter, domid) for letter, domid in perms)


def _xenstore_nodes(
    xs: base.XenstoreState,
) -> tuple[tuple[ncm.XsNode, ...], tuple[ncm.XsTransaction, ...]]:
    nodes = [
        ncm.XsNode(n.path, bytes(n.value), _perms(n.perms)) for n in xs.nodes
    ]
    txs = []
    for tx in xs.transactions:
        txs.append(ncm.XsTransaction(XS_CONN_ID, tx.tx_id))
        for write in tx.writes:
            if isinstance(write, base.XenstoreNode):
                nodes.append(
                    ncm.XsNode(
                        write.path,
                        bytes(write.value),
                        _perms(write.perms),
                        conn_id=XS_CONN_ID,
                        tx_id=tx.tx_id,
                        access=ncm.XS_ACCESS_WRITTEN,
                    )
                )
            else:
                path, _ = write
                nodes.append(
                    ncm.XsNode(
                        path, b"", (), conn_id=XS_CONN_ID, tx_id=tx.tx_id
                    )
                )
    return tuple(nodes), tuple(txs)


def _pv_device(
    backend: base.BackendState,
    domid: int,
    ec: base.EventChannelState,
    xs: base.XenstoreState,
) -> ncm.PvDevice:
    kind = _DEVICE_KINDS[backend.kind]
    names = list(backend.ring_indices)
    if names == [SINGLE_RING]:
        kinds = {SINGLE_RING: _PRIMARY_RING[kind]}
    else:
        kinds = {name: _NAMED_RINGS[name] for name in names}
        names.sort(key=lambda n: kinds[n])
    rings = _rings(backend, names, kinds, ec) if names else ()
    state = ncm.XenbusState(backend.state)
    # The frontend's state is its own xenstore node; the backend's copy
    # stands in when the area was not exported.
    values = {n.path: n.value for n in xs.nodes}
    frontend = values.get(f"{backend.frontend_path}/state", b"")
    return ncm.PvDevice(
        kind=kind,
        devid=backend.devid,
        backend_domid=backend.backend_domid,
        frontend_domid=domid,
        backend_state=state,
        frontend_state=ncm.XenbusState(int(frontend))
        if frontend.isdigit()
        else state,
        frontend_path=backend.frontend_path,
        backend_path=backend.backend_path,
        rings=rings,
    )


def _rings(
    backend: base.BackendState,
    names: list[str],
    kinds: Mapping[str, ncm.RingKind],
    ec: base.EventChannelState,
) -> tuple[ncm.PvRing, ...]:
    # ring_refs are the rings' pages in ring order, split evenly; a device
    # has one port per ring or one shared by all (io/netif.h
    # "feature-split-event-channels").
    if len(backend.ring_refs) % len(names):
        raise ValueError(
            f"{backend.kind} {backend.devid}: {len(backend.ring_refs)} ring "
            f"refs do not split over rings {names}"
        )
    per_ring = len(backend.ring_refs) // len(names)
    if len(backend.event_channels) not in (1, len(names)):
        raise ValueError(
            f"{backend.kind} {backend.devid}: {len(backend.event_channels)} "
            f"event channels for {len(names)} rings"
        )
    peers = {p.port: p.remote_port for p in ec.ports}
    inflight_by_ring: dict[str, list[base.InflightRequest]] = {}
    for req in backend.inflight:
        inflight_by_ring.setdefault(req.ring, []).append(req)
    unknown = set(inflight_by_ring) - set(names)
    if unknown:
        raise ValueError(f"in-flight requests on unknown rings {unknown}")
    rings = []
    for i, name in enumerate(names):
        kind = kinds[name]
        port = backend.event_channels[
            i if len(backend.event_channels) > 1 else 0
        ]
        req_cons, rsp_prod_pvt = backend.ring_indices[name]
        pending = inflight_by_ring.get(name, [])
        # A request is one whole slot as read from the ring.
        sizes = {len(r.request) for r in pending}
        if len(sizes) > 1:
            raise ValueError(
                f"{backend.kind} {backend.devid} ring {name}: in-flight "
                f"requests of different sizes {sorted(sizes)}"
            )
        slot = sizes.pop() if sizes else _SLOT_SIZES[kind]
        # Unanswered requests are the last ones consumed, oldest first.
        first = (req_cons - len(pending)) % _U32
        inflight = tuple(
            ncm.InflightRequest((first + n) % _U32, r.id, bytes(r.request))
            for n, r in enumerate(pending)
        )
        rings.append(
            ncm.PvRing(
                kind=kind,
                queue=0,
                ring_refs=tuple(
                    backend.ring_refs[i * per_ring : (i + 1) * per_ring]
                ),
                frontend_port=port,
                backend_port=peers.get(port, 0),
                slot_size=slot,
                req_cons=req_cons,
                rsp_prod_pvt=rsp_prod_pvt,
                inflight=inflight,
            )
        )
    return tuple(rings)


# -- stream -> host -------------------------------------------------------


def _to_pv_state(
    recs: PvRecords, hvm_params: Mapping[int, int]
) -> base.PvState:
    domid = recs.domain.domid
    conn = recs.xs_connection
    if conn.domid != domid:
        raise ValueError(
            f"xenstore connection of domain {conn.domid}, not {domid}"
        )
    if HVM_PARAM_STORE_PFN not in hvm_params:
        raise ValueError("HVM_PARAM_STORE_PFN was not restored")
    nodes, txs = _host_xenstore(recs)
    backends = set(recs.domain.backend_domids)
    return base.PvState(
        domid=domid,
        backend_domids=tuple(sorted(backends)),
        event_channels=_host_event_channels(recs.event_channels),
        grant_table=_host_grant_table(recs.grant_table),
        shared_info=_host_shared_info(recs.shared_info),
        xenstore=base.XenstoreState(
            nodes=nodes,
            watches=tuple(
                base.XenstoreWatch(
                    path=w.path,
                    token=w.token.decode("utf-8"),
                    depth=-1
                    if w.depth == ncm.XS_WATCH_DEPTH_UNLIMITED
                    else w.depth,
                )
                for w in recs.xs_watches
            ),
            transactions=txs,
            pending_output=bytes(conn.out_data),
            pending_resp_len=conn.out_resp_len,
            pending_input=bytes(conn.in_data),
            store_port=conn.evtchn,
            store_gfn=int(hvm_params[HVM_PARAM_STORE_PFN]),
        ),
        backends=tuple(_host_backend(d) for d in recs.pv_devices),
        vcpus=_host_vcpus(recs.vcpu_pv, len(recs.shared_info.vcpu_info)),
        vm_assist=recs.vcpu_pv.vm_assist if recs.vcpu_pv is not None else 0,
    )


def _host_shared_info(si: ncm.SharedInfo) -> base.SharedInfoState:
    return base.SharedInfoState(
        gfn=None if si.gfn == ncm.INVALID_GFN else si.gfn,
        content=bytes(si.page),
        vcpu_info=tuple(
            base.VcpuInfoPlacement(e.vcpu, e.gfn, e.offset)
            if e.kind == ncm.VcpuInfoKind.REGISTERED
            else base.VcpuInfoPlacement(e.vcpu)
            for e in si.vcpu_info
        ),
    )


def _host_event_channels(ec: ncm.EventChannels) -> base.EventChannelState:
    ports = []
    for row in ec.ports:
        kind = base.EvtchnType(int(row["type"]))
        binding = int(row["binding"])
        flags = int(row["flags"])
        ports.append(
            base.EventChannel(
                port=int(row["port"]),
                type=kind,
                vcpu=int(row["vcpu"]),
                remote_domid=int(row["remote_domid"]),
                remote_port=binding
                if kind == base.EvtchnType.INTERDOMAIN
                else 0,
                virq=binding if kind == base.EvtchnType.VIRQ else 0,
                pirq=binding if kind == base.EvtchnType.PIRQ else 0,
                pending=bool(flags & ncm.PORT_PENDING),
                masked=bool(flags & ncm.PORT_MASKED),
                priority=EVTCHN_FIFO_PRIORITY_DEFAULT,
            )
        )
    return base.EventChannelState(
        abi=_ABI_TO_HOST[ncm.EvtchnAbi(ec.abi)], ports=tuple(ports)
    )


def _frames(array: np.ndarray) -> tuple[bytes, ...]:
    raw = np.ascontiguousarray(array).tobytes()
    return tuple(
        raw[i : i + base.PAGE_SIZE] for i in range(0, len(raw), base.PAGE_SIZE)
    )


def _host_grant_table(gt: ncm.GrantTable) -> base.GrantTableState:
    return base.GrantTableState(
        version=gt.version,
        frame_gfns=tuple(gt.frame_gfns),
        frames=_frames(gt.entries),
        status_gfns=tuple(gt.status_gfns),
        status_frames=_frames(gt.status),
    )


def _letter_perms(perms: Iterable[ncm.XsPerm]) -> tuple[tuple[str, int], ...]:
    return tuple((p.perm, p.domid) for p in perms)


def _host_xenstore(
    recs: PvRecords,
) -> tuple[
    tuple[base.XenstoreNode, ...], tuple[base.XenstoreTransaction, ...]
]:
    conn_id = recs.xs_connection.conn_id
    writes: dict[int, list[Any]] = {t.tx_id: [] for t in recs.xs_transactions}
    for t in recs.xs_transactions:
        if t.conn_id != conn_id:
            raise ValueError(f"transaction {t.tx_id} of unknown connection")
    nodes = []
    for node in recs.xs_nodes:
        if node.conn_id == 0:
            nodes.append(
                base.XenstoreNode(
                    node.path, node.value, _letter_perms(node.perms)
                )
            )
            continue
        if node.conn_id != conn_id or node.tx_id not in writes:
            raise ValueError(
                f"node {node.path} belongs to no open transaction "
                f"(connection {node.conn_id}, transaction {node.tx_id})"
            )
        if node.deleted:
            writes[node.tx_id].append((node.path, None))
        else:
            writes[node.tx_id].append(
                base.XenstoreNode(
                    node.path, node.value, _letter_perms(node.perms)
                )
            )
    for watch in recs.xs_watches:
        if watch.conn_id != conn_id:
            raise ValueError(f"watch {watch.path} of unknown connection")
    txs = tuple(
        base.XenstoreTransaction(
            tx_id=t.tx_id, base_generation=0, writes=tuple(writes[t.tx_id])
        )
        for t in recs.xs_transactions
    )
    return tuple(nodes), txs


def _host_backend(dev: ncm.PvDevice) -> base.BackendState:
    refs: list[int] = []
    ports: list[int] = []
    indices: dict[str, tuple[int, int]] = {}
    inflight: list[base.InflightRequest] = []
    single = len(dev.rings) == 1
    for ring in dev.rings:
        name = SINGLE_RING if single else _RING_NAMES[ncm.RingKind(ring.kind)]
        refs += ring.ring_refs
        if ring.frontend_port not in ports:
            ports.append(ring.frontend_port)
        indices[name] = (ring.req_cons, ring.rsp_prod_pvt)
        inflight += [
            base.InflightRequest(name, r.id, r.data) for r in ring.inflight
        ]
    return base.BackendState(
        kind=_DEVICE_NAMES[ncm.DeviceKind(dev.kind)],
        devid=dev.devid,
        backend_domid=dev.backend_domid,
        frontend_path=dev.frontend_path,
        backend_path=dev.backend_path,
        state=int(dev.backend_state),
        ring_refs=tuple(refs),
        event_channels=tuple(ports),
        ring_indices=indices,
        inflight=tuple(inflight),
    )
