"""A guest's PV state on the patched hypervisor, in the host model's terms.

:meth:`.XenHost.export_pv_state` and :meth:`.XenHost.import_pv_state` (the
engine's save, migrate and receive) and the in-place restore
(:mod:`.inplace`) all go through :func:`export` and :func:`import_`, so a
guest's PV state is read and put back one way whatever carries it.

What comes from where:

- event channels: ``XEN_DOMCTL_ncm_evtchn`` (2-level only), their pending
  and mask bits from the shared_info page;
- shared_info: its GFN (getdomaininfo) and content (mapped at that GFN);
  vcpu_info placement, per-vCPU upcall vector, runstate and time areas,
  timers and the domain's vm_assist: ``XEN_DOMCTL_ncm_vcpu``, with the
  singleshot deadline as the time left, which another host can take;
- grant table v1: its frames' GFNs (GNTTABOP_setup_table for the guest,
  from dom0) and content (mapped at those GFNs); put back with
  XENMEM_add_to_physmap (XENMAPSPACE_grant_table);
- xenstore: the guest's tree with permissions, the store ring's port and
  GFN; its connection (watches with their tokens, open transactions, the
  data xenstored had not yet processed or written) from the patched
  xenstored's ``domain-export`` and, at the destination, its
  ``domain-import`` (:mod:`.xsmig`), once the nodes are written (so that
  writing them fires none of the guest's watches) and the memory with
  the ring's indices is back. Stock xenstored tells no one a domain's
  connection: it is exported as none, and the capability probe reports
  xenstore as not restorable (:data:`.probe.PATCHED_XENSTORE_LIMIT`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errnos
from typing import TYPE_CHECKING

import numpy as np
from oslo_log import log as logging

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import context as ctx_mod
from nova_xen_ncm.host.xen import devices
from nova_xen_ncm.host.xen import libs
from nova_xen_ncm.host.xen import xsmig

if TYPE_CHECKING:
    from nova_xen_ncm.host.xen.host import XenHost

LOG = logging.getLogger(__name__)

PAGE_SIZE = base.PAGE_SIZE
# xen/hvm/params.h
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
# xen/memory.h
XENMAPSPACE_SHARED_INFO = 0
XENMAPSPACE_GRANT_TABLE = 1
# xen/grant_table.h
GNTTABOP_SETUP_TABLE = 2
GNTTABOP_QUERY_SIZE = 6
GNTST_OKAY = 0
# struct shared_info (x86_64): 32 legacy vcpu_info slots of 64 octets,
# then the 2-level pending and mask bitmaps, 512 octets each.
EVTCHN_PENDING = 2048
EVTCHN_MASK = 2560
# getdomaininfo's shared_info_frame before the guest placed it: the M2P
# has no entry for the frame (INVALID_M2P_ENTRY, truncated or not).
UNPLACED = (2**64 - 1, 2**32 - 1, 2**63 - 1)
INVALID_GFN = 2**64 - 1
# xs_perm_type (xenstore_lib.h): access bits and their letters.
XS_PERM_LETTERS = {0: "n", 1: "r", 2: "w", 3: "b"}
XS_PERM_BITS = {v: k for k, v in XS_PERM_LETTERS.items()}


class GnttabQuerySize(ctypes.Structure):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("max_nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabSetupTable(ctypes.Structure):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class XsPermissions(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("perms", ctypes.c_int)]


def _unsupported(domid: int, what: str, call: str) -> base.NotSupported:
    return base.NotSupported(f"domain {domid}: {what}", call=call)


def _bit(content: bytes, offset: int, port: int) -> bool:
    return bool(content[offset + port // 8] >> (port % 8) & 1)


# -- export ---------------------------------------------------------------


def check_exportable(
    host: XenHost, ctx: ctx_mod.DomainContext, domid: int
) -> tuple[int, list[ctx_mod.VcpuState]]:
    """Refuse, naming why, a guest whose PV state :func:`export` could not
    read: called before the guest is paused (and again by the export),
    so that a refusal leaves it running. Returns the shared_info GFN and
    each vCPU's state (singleshot deadline as time left)."""
    call = "export_pv_state"
    info = host.domain_info(domid)
    abi = ctx.event_channel_abi(domid)
    if abi != "2-level":
        raise _unsupported(
            domid, f"{abi} event channels cannot be exported", call
        )
    raw = host._raw_info(domid, call)
    gfn = int(raw.shared_info_frame)
    if gfn in UNPLACED:
        raise _unsupported(domid, "the guest has not mapped shared_info", call)
    states = [
        ctx.get_vcpu_state(domid, v, relative=True) for v in range(info.vcpus)
    ]
    if any(s.compat for s in states):
        raise _unsupported(domid, "a 32-bit guest", call)
    version = libs.check(
        "xc_gnttab_get_version",
        _fn().xc_gnttab_get_version(host._xch, domid),
        domid=domid,
    )
    if version != 1:
        raise _unsupported(
            domid, f"grant table version {version} cannot be exported", call
        )
    for chan in ctx.get_event_channels(domid):
        if chan.xen_bound:
            raise _unsupported(
                domid,
                f"port {chan.port} is Xen's own (an ioreq server's), which "
                "the import cannot bind",
                call,
            )
    return gfn, states


def export(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    domid: int,
    quiesced: tuple[devices.Device, ...] = (),
) -> base.PvState:
    """The PV state of the paused guest ``domid``, with the devices
    whose backends were ``quiesced`` (:meth:`.XenHost.quiesce_backends`):
    those a stream carries. The restore in place carries its devices
    itself and quiesces none."""
    gfn, states = check_exportable(host, ctx, domid)
    with host.map_pages(domid, np.array([gfn], dtype=np.uint64)) as mapping:
        content = bytes(mapping.pages[0])
    ports = []
    for chan in ctx.get_event_channels(domid):
        if chan.xen_bound:
            # Bound since the check (an ioreq server of the paused guest).
            raise _unsupported(
                domid, f"port {chan.port} is Xen's own", "export_pv_state"
            )
        kind = base.EvtchnType(chan.status)
        ports.append(
            base.EventChannel(
                port=chan.port,
                type=kind,
                vcpu=chan.vcpu,
                remote_domid=chan.remote_dom,
                remote_port=chan.remote_port,
                virq=chan.virq if kind is base.EvtchnType.VIRQ else 0,
                pirq=chan.virq if kind is base.EvtchnType.PIRQ else 0,
                pending=_bit(content, EVTCHN_PENDING, chan.port),
                masked=_bit(content, EVTCHN_MASK, chan.port),
            )
        )
    grant_table = _export_grant_table(host, ctx, domid)
    xenstore = _export_xenstore(host, domid)
    backends = _export_backends(host, domid, quiesced, grant_table, xenstore)
    return base.PvState(
        domid=domid,
        # The console is xenconsoled's, which libxl connects to the new
        # domain again: not a backend carried.
        backend_domids=tuple(sorted({b.backend_domid for b in backends})),
        event_channels=base.EventChannelState(
            base.EvtchnAbi.TWO_LEVEL, tuple(ports)
        ),
        grant_table=grant_table,
        shared_info=base.SharedInfoState(
            gfn=gfn,
            content=content,
            vcpu_info=tuple(
                base.VcpuInfoPlacement(s.vcpu, *s.vcpu_info)
                if s.vcpu_info is not None
                else base.VcpuInfoPlacement(s.vcpu)
                for s in states
            ),
        ),
        xenstore=xenstore,
        backends=backends,
        vcpus=tuple(
            base.VcpuPvState(
                vcpu=s.vcpu,
                upcall_vector=s.upcall_vector,
                runstate_va=s.runstate_va,
                time_va=s.time_va,
                singleshot_ns=s.singleshot_deadline,
                periodic_ns=s.periodic_period,
            )
            for s in states
        ),
        vm_assist=states[0].vm_assist or 0,
    )


def _export_backends(
    host: XenHost,
    domid: int,
    devs: tuple[devices.Device, ...],
    gt: base.GrantTableState,
    xs: base.XenstoreState,
) -> tuple[base.BackendState, ...]:
    """The guest's devices of dom0's kernel backends as the stream
    carries them: what the frontend gave its backend (ring references,
    ports: also in its nodes) and where an attaching backend starts on
    each ring (its ``rsp_prod``: a quiesced backend has answered what it
    answers). The destination's own backends attach to them."""
    if not devs:
        return ()
    entries = devices._grant_entries(gt)
    out = []
    for dev in devs:
        try:
            rings = devices.frontend_rings(xs.nodes, dev)
        except devices.DeviceError as exc:
            raise _unsupported(domid, str(exc), "export_pv_state") from exc
        refs: list[int] = []
        indices: dict[str, tuple[int, int]] = {}
        for name, ring_refs in rings.rings.items():
            for ref in ring_refs:
                if not 0 <= ref < len(entries):
                    raise _unsupported(
                        domid,
                        f"{dev.kind} {dev.devid}: ring grant reference "
                        f"{ref} is beyond its grant table",
                        "export_pv_state",
                    )
            first = np.array(
                [int(entries["frame"][ring_refs[0]])], dtype=np.uint64
            )
            with host.map_pages(domid, first) as mapping:
                produced = devices.ring_rsp_prod(mapping.pages[0])
            indices[name] = (produced, produced)
            refs += ring_refs
        state = host._xs_read(f"{dev.backend}/state")
        out.append(
            base.BackendState(
                kind=dev.kind,
                devid=dev.devid,
                backend_domid=dev.backend_domid,
                frontend_path=dev.frontend,
                backend_path=dev.backend,
                state=int(state) if state and state.isdigit() else 0,
                ring_refs=tuple(refs),
                event_channels=rings.ports,
                ring_indices=indices,
            )
        )
    return tuple(out)


def _gnttab_op(host: XenHost, cmd: int, op: ctypes.Structure) -> None:
    fn = _fn()
    libs.check(
        "xc_gnttab_op",
        fn.xc_gnttab_op(
            host._xch, cmd, ctypes.addressof(op), ctypes.sizeof(op), 1
        ),
    )


def _export_grant_table(
    host: XenHost, ctx: ctx_mod.DomainContext, domid: int
) -> base.GrantTableState:
    call = "GNTTABOP_setup_table"
    version = libs.check(
        "xc_gnttab_get_version",
        _fn().xc_gnttab_get_version(host._xch, domid),
        domid=domid,
    )
    if version != 1:
        raise _unsupported(
            domid, f"grant table version {version} cannot be exported", call
        )
    query = GnttabQuerySize(dom=domid)
    _gnttab_op(host, GNTTABOP_QUERY_SIZE, query)
    if query.status != GNTST_OKAY:
        raise libs.XenCallError(
            f"domain {domid}: GNTTABOP_query_size status {query.status}",
            call="xc_gnttab_op",
        )
    nr = query.nr_frames
    gfns: list[int] = []
    if nr:
        with ctx.buffer(nr * 8) as buf:
            # For a translated guest Xen lists where the guest mapped each
            # frame (M2P), not the frames themselves.
            setup = GnttabSetupTable(dom=domid, nr_frames=nr, frame_list=buf)
            _gnttab_op(host, GNTTABOP_SETUP_TABLE, setup)
            if setup.status != GNTST_OKAY:
                raise libs.XenCallError(
                    f"domain {domid}: GNTTABOP_setup_table status "
                    f"{setup.status}",
                    call="xc_gnttab_op",
                )
            gfns = [int(g) for g in (ctypes.c_uint64 * nr).from_address(buf)]
    unplaced = [i for i, g in enumerate(gfns) if g in UNPLACED]
    if unplaced:
        raise _unsupported(
            domid,
            f"grant frames {unplaced} are not mapped in the guest's physmap",
            call,
        )
    frames: tuple[bytes, ...] = ()
    if gfns:
        pfns = np.array(gfns, dtype=np.uint64)
        with host.map_pages(domid, pfns) as mapping:
            frames = tuple(bytes(p) for p in mapping.pages)
    return base.GrantTableState(
        version=1, frame_gfns=tuple(gfns), frames=frames
    )


def _xs_directory(host: XenHost, path: str) -> list[str]:
    num = ctypes.c_uint()
    ptr = _fn().xs_directory(host._xs(), 0, path.encode(), ctypes.byref(num))
    if not ptr:
        if ctypes.get_errno() in (errnos.ENOENT, errnos.EACCES):
            return []
        libs.raise_for("xs_directory", path)
    try:
        return [ptr[i].decode() for i in range(num.value)]
    finally:
        host._libc.free(ctypes.cast(ptr, ctypes.c_void_p))


def _xs_perms(host: XenHost, path: str) -> tuple[tuple[str, int], ...]:
    num = ctypes.c_uint()
    ptr = _fn().xs_get_permissions(
        host._xs(), 0, path.encode(), ctypes.byref(num)
    )
    if not ptr:
        libs.raise_for("xs_get_permissions", path)
    try:
        perms = ctypes.cast(ptr, ctypes.POINTER(XsPermissions))
        return tuple(
            (XS_PERM_LETTERS[perms[i].perms & 3], perms[i].id)
            for i in range(num.value)
        )
    finally:
        host._libc.free(ctypes.cast(ptr, ctypes.c_void_p))


def frontend_nodes(
    host: XenHost, dev: devices.Device
) -> list[base.XenstoreNode]:
    """The device's frontend area as nodes (values only), read without
    touching the guest's connection."""
    nodes = []
    todo = [dev.frontend]
    while todo:
        path = todo.pop()
        value = host._xs_read(path)
        if value is None:
            continue
        nodes.append(base.XenstoreNode(path, value, ()))
        todo += [f"{path}/{c}" for c in _xs_directory(host, path)]
    return nodes


def _export_xenstore(host: XenHost, domid: int) -> base.XenstoreState:
    nodes = []
    todo = [f"/local/domain/{domid}"]
    while todo:
        path = todo.pop()
        value = host._xs_read(path)
        if value is None:
            continue  # removed meanwhile
        nodes.append(base.XenstoreNode(path, value, _xs_perms(host, path)))
        todo += [f"{path}/{c}" for c in reversed(_xs_directory(host, path))]
    # Parents before children, as the stream wants them.
    nodes.sort(key=lambda n: n.path.count("/"))
    # Frozen from here (the guest is paused): the memory copied next
    # agrees with it. Rollbacks thaw it (XenHost.resume_backends).
    conn = (
        xsmig.export(host, domid, freeze=True)
        if host.xenstored_migrates()
        else xsmig.DomainConnection(domid=domid, evtchn=0)
    )
    try:
        watches = tuple(
            base.XenstoreWatch(w.path, w.token.decode()) for w in conn.watches
        )
    except UnicodeDecodeError as exc:
        raise _unsupported(
            domid, f"a watch token is not UTF-8 ({exc})", "export_pv_state"
        ) from exc
    return base.XenstoreState(
        nodes=tuple(nodes),
        watches=watches,
        # What a transaction read and wrote stays behind: the destination
        # makes its commit fail with EAGAIN.
        transactions=tuple(
            base.XenstoreTransaction(tx_id=t, base_generation=0)
            for t in conn.transactions
        ),
        store_port=host._param(domid, HVM_PARAM_STORE_EVTCHN),
        store_gfn=host._param(domid, HVM_PARAM_STORE_PFN),
        pending_output=conn.out_data,
        pending_resp_len=conn.out_resp_len,
        pending_input=conn.in_data,
    )


# -- import ---------------------------------------------------------------


def import_(
    host: XenHost,
    ctx: ctx_mod.DomainContext,
    domid: int,
    state: base.PvState,
) -> None:
    """Put ``state`` into the paused domain ``domid``, created (by libxl)
    for it, whose memory and HVM context are already restored.

    Order: shared_info and grant frames placed, then each vCPU's state
    without its timers (vcpu_info before any port can raise an event
    into it), then the ports, then the shared_info content (the guest's
    pending and mask bits, over those the binds raised), then the timers
    (a deadline that passed during the downtime fires at once, into a
    bound VIRQ_TIMER and over the guest's own bits, not lost), then the
    xenstore nodes, then the xenstore connection (after the nodes: their
    writes fire none of the guest's watches); xenstored serves the
    guest's ring only after that."""
    call = "import_pv_state"
    devs = check_backends(host, domid, state.backends)
    if not state.vcpus:
        raise _unsupported(
            domid,
            "the PV state carries no per-vCPU state (NCM_VCPU_PV): the "
            "guest's timers and vcpu_info would be lost",
            call,
        )
    if state.event_channels.abi != base.EvtchnAbi.TWO_LEVEL:
        raise _unsupported(domid, "FIFO event channels", call)
    si = state.shared_info
    if si.gfn is None:
        raise _unsupported(domid, "no shared_info GFN", call)
    # The ring came back with the memory, holding what the guest left
    # unread in it (the source froze its connection): not served before
    # the nodes and the connection are back, else answered without them.
    # A failure destroys the domain: nothing to thaw then.
    frozen = host.xenstored_migrates()
    if frozen:
        xsmig.freeze(host, domid)
    fn = _fn()
    raw = host._raw_info(domid, call)
    if int(raw.shared_info_frame) != si.gfn:
        libs.check(
            "xc_domain_add_to_physmap",
            fn.xc_domain_add_to_physmap(
                host._xch, domid, XENMAPSPACE_SHARED_INFO, 0, si.gfn
            ),
            domid=domid,
        )
    _import_grant_table(host, domid, state.grant_table)
    placed = {p.vcpu: p for p in si.vcpu_info}
    vcpus = []
    for i, v in enumerate(state.vcpus):
        place = placed.get(v.vcpu)
        vcpus.append(
            ctx_mod.VcpuState(
                vcpu=v.vcpu,
                vcpu_info=(place.gfn, place.offset)
                if place is not None and place.gfn is not None
                else None,
                upcall_vector=v.upcall_vector,
                singleshot_deadline=v.singleshot_ns,
                singleshot_relative=True,
                periodic_period=v.periodic_ns,
                runstate_va=v.runstate_va,
                time_va=v.time_va,
                # Domain-wide: set once.
                vm_assist=state.vm_assist if i == 0 else None,
            )
        )
    # Timers stopped until their VIRQ_TIMER ports and the guest's own
    # pending bits are back: one firing now would be dropped.
    for vs in vcpus:
        ctx.set_vcpu_state(
            domid,
            dataclasses.replace(
                vs, singleshot_deadline=None, periodic_period=0
            ),
        )
    backend_ports = devices.frontend_ports(state.xenstore.nodes, domid)
    _import_event_channels(
        ctx, domid, state.event_channels.ports, backend_ports
    )
    # Each frontend's port raised once: its backend's answers written
    # after the export (the old backend ran on while the guest was paused
    # and its memory copied) had their notification dropped with the old
    # domain, and a frontend that saw none would wait for ever, its
    # backend not notifying again until the frontend moves its event
    # index. A frontend raised finds its ring as it is.
    content = bytearray(devices.raise_ports(si.content, backend_ports))
    for vs in vcpus:
        if vs.vcpu_info is None:  # its legacy slot in shared_info
            devices.mark_all_pending(content, vs.vcpu * devices.VCPU_INFO_SIZE)
    with host.map_pages(
        domid, np.array([si.gfn], dtype=np.uint64), writable=True
    ) as mapping:
        mapping.pages[0][:] = content
    # The placed vcpu_info copies, in guest memory (see all_pending).
    for vs in vcpus:
        if vs.vcpu_info is None:
            continue
        gfn, offset = vs.vcpu_info
        with host.map_pages(
            domid, np.array([gfn], dtype=np.uint64), writable=True
        ) as mapping:
            devices.mark_all_pending(mapping.pages[0], offset)
    # vcpu_info is already placed there: SET finds it so and only arms.
    for vs in vcpus:
        if vs.singleshot_deadline is not None or vs.periodic_period:
            ctx.set_vcpu_state(domid, vs)
    _import_xenstore(host, domid, state.xenstore)
    _import_xenstore_connection(host, domid, state.xenstore)
    if frozen:
        xsmig.thaw(host, domid)
    # The guest runs again only once every backend attached: before, its
    # notifications would go to an unbound port. One that cannot fails
    # the import, before any COMMIT.
    devices.wait_connected(
        host,
        domid,
        devs,
        timeout=host.opts.backend_connect_timeout,
        call=call,
    )


def check_backends(
    host: XenHost, domid: int, backends: tuple[base.BackendState, ...]
) -> list[devices.Device]:
    """The carried devices, each of a kind dom0's kernel attaches again
    and whose backend area this host created with the domain (the
    engine's SETUP names them); refused by name otherwise, before
    anything is imported."""
    devs = [
        devices.Device(
            kind=b.kind,
            devid=b.devid,
            backend_domid=b.backend_domid,
            frontend=b.frontend_path,
            backend=b.backend_path,
        )
        for b in backends
    ]
    try:
        devices.check_devices(host, domid, devs)
    except devices.DeviceError as exc:
        raise _unsupported(domid, str(exc), "import_pv_state") from exc
    for dev in devs:
        if host._xs_read(dev.backend) is None:
            raise _unsupported(
                domid,
                f"{dev.kind} {dev.devid} has no backend here ({dev.backend} "
                "does not exist): the domain was not created with it",
                "import_pv_state",
            )
    return devs


def _import_grant_table(
    host: XenHost, domid: int, gt: base.GrantTableState
) -> None:
    if gt.version != 1:
        raise _unsupported(
            domid,
            f"grant table version {gt.version} cannot be imported",
            "import_pv_state",
        )
    if not gt.frame_gfns:
        return
    for idx, gfn in enumerate(gt.frame_gfns):
        # Replaces the RAM page the memory copy put there; Xen grows the
        # table to idx + 1 frames.
        libs.check(
            "xc_domain_add_to_physmap",
            _fn().xc_domain_add_to_physmap(
                host._xch, domid, XENMAPSPACE_GRANT_TABLE, idx, gfn
            ),
            domid=domid,
        )
    pfns = np.array(gt.frame_gfns, dtype=np.uint64)
    with host.map_pages(domid, pfns, writable=True) as mapping:
        for page, frame in zip(mapping.pages, gt.frames, strict=True):
            page[:] = devices.clear_grants_in_use(frame)


def _import_event_channels(
    ctx: ctx_mod.DomainContext,
    domid: int,
    ports: tuple[base.EventChannel, ...],
    backend_ports: dict[int, int] | None = None,
) -> None:
    # Ports the new domain's toolstack bound itself (xenstore, console)
    # must be where the guest had them: the guest will not ask again. A
    # daemon may not have bound its end yet: unbound or interdomain.
    fresh = {c.port: c for c in ctx.get_event_channels(domid)}
    saved = {p.port: p for p in ports}
    linked = {base.EvtchnType.UNBOUND, base.EvtchnType.INTERDOMAIN}
    for port, chan in fresh.items():
        old = saved.get(port)
        if (
            old is None
            or old.remote_domid != chan.remote_dom
            or {old.type, base.EvtchnType(chan.status)} - linked
        ):
            raise base.HostError(
                f"domain {domid}: the new domain's port {port} "
                f"({chan.status_name}) is not the guest's",
                call="import_pv_state",
            )
    # A frontend's port was bound by its backend, whose end went with
    # the old domain: it waits unbound for the new backend, which binds
    # it when it connects (devices).
    backend_ports = backend_ports or {}
    ctx.set_event_channels(
        domid,
        [
            ctx_mod.EventChannel(
                port=p.port,
                status=int(base.EvtchnType.UNBOUND),
                vcpu=p.vcpu,
                remote_dom=p.remote_domid,
            )
            if p.type == base.EvtchnType.INTERDOMAIN
            and backend_ports.get(p.port) == p.remote_domid
            else ctx_mod.EventChannel(
                port=p.port,
                status=int(p.type),
                vcpu=p.vcpu,
                remote_dom=p.remote_domid,
                remote_port=p.remote_port,
                virq=p.virq if p.type == base.EvtchnType.VIRQ else p.pirq,
            )
            for p in ports
            if p.port not in fresh or _same_binding(p, fresh[p.port])
        ],
    )


def _same_binding(saved: base.EventChannel, now: ctx_mod.EventChannel) -> bool:
    """A port the new domain's toolstack bound as the guest had it, but
    notifying another vCPU (the guest moved it): the import, finding it
    bound so, sets only that vCPU. One its daemon has not bound yet
    stays as it is."""
    return saved.vcpu != now.vcpu and (
        int(saved.type),
        saved.remote_domid,
        saved.remote_port,
    ) == (now.status, now.remote_dom, now.remote_port)


def _guest_writes(perms: tuple[tuple[str, int], ...], domid: int) -> bool:
    """Whether ``domid`` may write a node of permissions ``perms``
    (xenstored's rule: the owner may; otherwise its ACL entry, else the
    default access of the first entry)."""
    if not perms:
        return False
    (default, owner), acl = perms[0], perms[1:]
    if owner == domid:
        return True
    access = next((a for a, d in acl if d == domid), default)
    return access in ("w", "b")


def _import_xenstore(
    host: XenHost, domid: int, xs: base.XenstoreState
) -> None:
    fn = _fn()
    # Each frontend's state last: a backend connects when it sees it
    # Connected, and reads the rest of the frontend's area then.
    nodes = sorted(
        xs.nodes, key=lambda n: devices.is_frontend_state(n.path, domid)
    )
    for node in nodes:
        current = host._xs_read(node.path)
        if current is not None:
            # libxl wrote the new domain's own nodes; only what differs
            # is written again, firing fewer watches.
            if current == node.value and (
                _xs_perms(host, node.path) == node.perms
            ):
                continue
            # A node the guest cannot write is the toolstack's, whose
            # value now is the current one (the new device model's and
            # console's ptys): the saved one would be stale.
            if not _guest_writes(node.perms, domid):
                continue
        if not fn.xs_write(
            host._xs(), 0, node.path.encode(), node.value, len(node.value)
        ):
            libs.raise_for("xs_write", node.path)
        perms = (XsPermissions * len(node.perms))(
            *(XsPermissions(d, XS_PERM_BITS[a]) for a, d in node.perms)
        )
        if not fn.xs_set_permissions(
            host._xs(), 0, node.path.encode(), perms, len(node.perms)
        ):
            libs.raise_for("xs_set_permissions", node.path)


def _import_xenstore_connection(
    host: XenHost, domid: int, xs: base.XenstoreState
) -> None:
    """The guest's watches, open transactions and pending data, given to
    the patched xenstored for the connection libxl introduced."""
    carried = (
        xs.watches or xs.transactions or xs.pending_output or xs.pending_input
    )
    if not carried:
        return
    if not host.xenstored_migrates():
        raise _unsupported(
            domid,
            f"{len(xs.watches)} xenstore watches, {len(xs.transactions)} "
            "open transactions and pending data cannot be given to this "
            "host's xenstored (no domain-import)",
            "import_pv_state",
        )
    deep = [w.path for w in xs.watches if w.depth >= 0]
    if deep:
        raise _unsupported(
            domid,
            f"watches with a depth limit ({', '.join(deep)}): xenstored "
            "4.17 has none",
            "import_pv_state",
        )
    if any(t.writes for t in xs.transactions):
        # Only this host's own records carry none; a stream's writes are
        # dropped knowingly: the transaction's commit fails all the same.
        LOG.info(
            "Domain %d: the writes of open xenstore transactions are "
            "dropped; their commits will answer EAGAIN",
            domid,
        )
    xsmig.import_(
        host,
        domid,
        xsmig.DomainConnection(
            domid=domid,
            evtchn=xs.store_port,
            in_data=xs.pending_input,
            out_data=xs.pending_output,
            out_resp_len=xs.pending_resp_len,
            watches=tuple(
                xsmig.Watch(w.path, w.token.encode()) for w in xs.watches
            ),
            transactions=tuple(t.tx_id for t in xs.transactions),
        ),
    )


def _fn():  # noqa: ANN202 - the host module's bound functions
    from nova_xen_ncm.host.xen import host as host_mod

    return host_mod.FN
