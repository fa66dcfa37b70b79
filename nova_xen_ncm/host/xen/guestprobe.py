"""The transparency checker's read-only queries of a guest on real Xen
(:class:`~nova_xen_ncm.host.base.GuestProbe`).

Each query is one a dom0 tool makes from outside the guest, issued here
over the library bindings of :mod:`.libs` and nothing else of this
driver: a read-only foreign map of a page (libxenforeignmemory),
``XEN_DOMCTL_getdomaininfo``, ``EVTCHNOP_status``, ``HVMOP_get_param``,
``XEN_DOMCTL_gethvmcontext_partial`` for one record (through libxencall,
as libxenctrl's wrapper drops the record's length), and reads of
xenstored as dom0 (libxenstore). None goes through the migration's
export, save or stream code (:mod:`.context`, :mod:`.pvctx`,
:mod:`.inplace`, :mod:`.xsmig`, the codecs), whose results the checker
judges. Nothing here writes the guest, Xen's tables or xenstored.

What stock Xen 4.17 does not let dom0 read is refused with
:class:`~nova_xen_ncm.host.base.NotSupported` naming what is missing,
so that the checker reports the item it needs as not read instead of
judging a guess.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import os
import struct
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.xen import libs

PROT_READ = 1
# xen/include/public/xen.h, domctl.h (interface version of Xen 4.17)
HYPERVISOR_DOMCTL = 36
DOMCTL_INTERFACE_VERSION = 0x15
XEN_DOMCTL_GETHVMCONTEXT_PARTIAL = 55
# hvm/save.h: struct hvm_hw_cpu's tsc, the guest's TSC when Xen wrote
# the record (hvm_get_guest_tsc of the vCPU).
HVM_SAVE_CPU = 2
HVM_CPU_TSC_OFFSET = 1008
# The largest record Xen's save writes is a vCPU's XSAVE area, a few
# KiB; a record longer than this is refused, not truncated.
RECORD_LIMIT = 1 << 16
# getdomaininfo's shared_info_frame of an HVM guest that has not placed
# its shared info page: the M2P has no entry (INVALID_M2P_ENTRY, in the
# widths Xen and libxc report it).
SHARED_INFO_UNPLACED = frozenset((2**64 - 1, 2**32 - 1, 2**63 - 1))
# hvm/params.h
HVM_PARAM_STORE_PFN = 1
# docs/designs/xenstore-migration.md record types; the largest dump the
# probe reads (a domain's connection: its watches and queued data).
XS_REC_END = 0
XS_REC_CONN = 2
XS_REC_WATCH = 3
XS_REC_TRANSACTION = 4
XS_DUMP_LIMIT = 16 << 20
# xs_perm_type (xenstore_lib.h)
XS_PERM_LETTERS = {0: "n", 1: "r", 2: "w", 3: "b"}

PHYSMAP_LIMIT = (
    "stock Xen 4.17 gives dom0 no read of another domain's vcpu_info "
    "placement (VCPUOP_register_vcpu_info acts on the calling vCPU) nor "
    "of the event channel ABI it chose (EVTCHNOP_init_control is "
    "guest-only); the patched hypervisor's XEN_DOMCTL_ncm_vcpu and "
    "XEN_DOMCTL_ncm_evtchn, which report them, are absent here"
)
# The project's experimental domctls (doc/source/specs/xen-ncm-domctl);
# an unknown domctl ends in ENOSYS or EOPNOTSUPP, another release's
# interface_version in EACCES: all mean "absent".
XEN_DOMCTL_NCM_EVTCHN = 20035
XEN_DOMCTL_NCM_VCPU = 20036
NCM_GET = 0
NCM_VCPU_F_VCPU_INFO = 1
ABSENT_DOMCTL = frozenset((errnos.ENOSYS, errnos.EOPNOTSUPP, errnos.EACCES))
# grant_table.h
GNTTABOP_SETUP_TABLE = 2
GNTTABOP_QUERY_SIZE = 6
STOCK_XENSTORED_LIMIT = (
    "xenstored lists no domain's watches or open transactions to dom0 "
    "(XS_CONTROL offers check, log, memreport, print, quota and "
    "live-update, none per domain)"
)


class _HvmContextPartial(ctypes.Structure):
    """struct xen_domctl_hvmcontext_partial (domctl.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("instance", ctypes.c_uint32),
        ("bufsz", ctypes.c_uint64),
        ("buffer", ctypes.c_uint64),
    ]


class _NcmEvtchn(ctypes.Structure):
    """XEN_DOMCTL_ncm_evtchn's member (doc/source/specs/xen-ncm-domctl)."""

    _fields_ = [
        ("op", ctypes.c_uint32),
        ("nr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("abi", ctypes.c_uint32),
        ("recs", ctypes.c_uint64),
    ]


class _NcmVcpu(ctypes.Structure):
    """XEN_DOMCTL_ncm_vcpu's member (doc/source/specs/xen-ncm-domctl)."""

    _fields_ = [
        ("op", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("vcpu_info_gfn", ctypes.c_uint64),
        ("singleshot_deadline", ctypes.c_uint64),
        ("periodic_period", ctypes.c_uint64),
        ("runstate_va", ctypes.c_uint64),
        ("time_va", ctypes.c_uint64),
        ("upcall_vector", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
        ("vm_assist", ctypes.c_uint64),
    ]


class _GnttabQuerySize(ctypes.Structure):
    """struct gnttab_query_size (grant_table.h)."""

    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("max_nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class _GnttabSetupTable(ctypes.Structure):
    """struct gnttab_setup_table (grant_table.h)."""

    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class _DomctlUnion(ctypes.Union):
    _fields_ = [
        ("hvmcontext_partial", _HvmContextPartial),
        ("ncm_evtchn", _NcmEvtchn),
        ("ncm_vcpu", _NcmVcpu),
        ("pad", ctypes.c_uint8 * 128),
        ("align", ctypes.c_uint64),
    ]


class _Domctl(ctypes.Structure):
    """struct xen_domctl (domctl.h)."""

    _fields_ = [
        ("cmd", ctypes.c_uint32),
        ("interface_version", ctypes.c_uint32),
        ("domain", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16 * 3),
        ("u", _DomctlUnion),
    ]


class XenGuestProbe(base.GuestProbe):
    """Read-only queries about domain ``domid`` of this Xen host.

    ``xch``, ``fmem`` and ``xsh`` are open libxenctrl, libxenforeignmemory
    and libxenstore handles (the host driver's: a handle is a binding,
    not logic); ``fn`` the bound C functions (:class:`.libs.Functions`);
    ``patched_xenstored`` whether xenstored answers the project's
    ``domain-export`` control command.
    """

    def __init__(
        self,
        domid: int,
        *,
        xch: Any,
        fmem: Any,
        xsh: Any,
        fn: Any,
        patched_xenstored: bool,
        libc: Any = None,
        xs_control: Any = None,
    ) -> None:
        self._domid = domid
        self._xch = xch
        self._fmem = fmem
        self._xsh = xsh
        self._fn = fn
        self._patched_xenstored = patched_xenstored
        self._libc = libc if libc is not None else _libc()
        self._xs_control = xs_control

    # -- what Xen reports of the domain --

    def _domaininfo(self, call: str) -> libs.XenDomctlGetDomainInfo:
        info = libs.XenDomctlGetDomainInfo()
        n = self._fn.xc_domain_getinfolist(
            self._xch, self._domid, 1, ctypes.byref(info)
        )
        if n < 0:
            libs.raise_for("xc_domain_getinfolist", domid=self._domid)
        if n == 0 or info.domain != self._domid:
            raise base.DomainNotFound(f"no domain {self._domid}", call=call)
        return info

    def _shared_info_gfn(self) -> int | None:
        frame = int(self._domaininfo("probe.physmap").shared_info_frame)
        return None if frame in SHARED_INFO_UNPLACED else frame

    def physmap(self) -> base.GuestPhysmap:
        # Xen reports the shared info GFN (getdomaininfo) and the grant
        # table's version and frames; the vCPUs' placements and the ABI
        # only the patched hypervisor's domctls do: on stock 4.17 the
        # physmap is refused whole, naming what lacks.
        info = self._domaininfo("probe.physmap")
        frame = int(info.shared_info_frame)
        with self._hypercall(XEN_DOMCTL_NCM_EVTCHN) as (ctl, _, issue):
            ctl.u.ncm_evtchn.op = NCM_GET  # nr 0, no buffer: counts only
            err = issue()
            abi = int(ctl.u.ncm_evtchn.abi)
        if err in ABSENT_DOMCTL:
            raise base.NotSupported(
                f"domain {self._domid}: {PHYSMAP_LIMIT}",
                call="probe.physmap",
            )
        if err:
            raise self._domctl_error("XEN_DOMCTL_ncm_evtchn", err)
        placements = []
        for vcpu in range(int(info.max_vcpu_id) + 1):
            with self._hypercall(XEN_DOMCTL_NCM_VCPU) as (ctl, _, issue):
                op = ctl.u.ncm_vcpu
                op.op, op.vcpu = NCM_GET, vcpu
                err = issue()
                flags, gfn, offset = op.flags, op.vcpu_info_gfn, op.offset
            if err == errnos.ENOENT:
                continue  # no such vCPU
            if err:
                raise self._domctl_error("XEN_DOMCTL_ncm_vcpu", err)
            placements.append(
                base.VcpuInfoPlacement(vcpu, int(gfn), int(offset))
                if flags & NCM_VCPU_F_VCPU_INFO
                else base.VcpuInfoPlacement(vcpu)
            )
        version = self._fn.xc_gnttab_get_version(self._xch, self._domid)
        if version < 0:
            libs.raise_for("xc_gnttab_get_version", domid=self._domid)
        return base.GuestPhysmap(
            shared_info_gfn=None if frame in SHARED_INFO_UNPLACED else frame,
            grant_version=int(version),
            grant_frame_gfns=self._grant_frame_gfns(version),
            vcpu_info=tuple(placements),
            evtchn_abi=base.EvtchnAbi.FIFO
            if abi == 1
            else base.EvtchnAbi.TWO_LEVEL,
        )

    def _grant_frame_gfns(self, version: int) -> tuple[int | None, ...]:
        """Where the guest placed each grant frame (GNTTABOP_setup_table
        lists the M2P's GFN of each for a translated guest); none for a
        guest that never chose a version (setup_table would set v1)."""
        if version == 0:
            return ()
        query = _GnttabQuerySize(dom=self._domid)
        self._gnttab_op(GNTTABOP_QUERY_SIZE, query)
        nr = int(query.nr_frames)
        if not nr:
            return ()
        with self._hypercall(0) as (_, alloc, _issue):
            buf = alloc(8 * nr)
            # The table's own size: nothing grows.
            setup = _GnttabSetupTable(
                dom=self._domid, nr_frames=nr, frame_list=buf
            )
            self._gnttab_op(GNTTABOP_SETUP_TABLE, setup)
            gfns = list((ctypes.c_uint64 * nr).from_address(buf))
        return tuple(
            None if g in SHARED_INFO_UNPLACED else int(g) for g in gfns
        )

    def _gnttab_op(self, cmd: int, op: ctypes.Structure) -> None:
        rc = self._fn.xc_gnttab_op(
            self._xch, cmd, ctypes.addressof(op), ctypes.sizeof(op), 1
        )
        if rc < 0:
            libs.raise_for(
                "xc_gnttab_op", f"GNTTABOP {cmd}", domid=self._domid
            )
        if op.status:
            raise base.HostError(
                f"domain {self._domid}: GNTTABOP {cmd} status {op.status}",
                call="xc_gnttab_op",
            )

    def _domctl_error(self, name: str, err: int) -> base.HostError:
        return base.HostError(
            f"domain {self._domid}: {name}: {os.strerror(err)}",
            call=name,
            errno=err,
        )

    def frame(self, gfn: int) -> bytes:
        pfns = (ctypes.c_ulong * 1)(gfn)
        err = (ctypes.c_int * 1)()
        addr = self._fn.xenforeignmemory_map(
            self._fmem, self._domid, PROT_READ, 1, pfns, err
        )
        if not addr:
            libs.raise_for(
                "xenforeignmemory_map", f"gfn {gfn:#x}", domid=self._domid
            )
        try:
            if err[0]:
                raise base.HostError(
                    f"gfn {gfn:#x} is not in dom{self._domid}'s physmap "
                    f"({errnos.errorcode.get(-err[0], -err[0])})",
                    call="probe.frame",
                    errno=-err[0],
                )
            return ctypes.string_at(addr, PAGE_SIZE)
        finally:
            self._fn.xenforeignmemory_unmap(self._fmem, addr, 1)

    def shared_info(self) -> bytes:
        gfn = self._shared_info_gfn()
        if gfn is None:
            # Xen keeps the page, but for an HVM guest dom0 maps guest
            # frames by GFN only, and the guest placed it nowhere.
            raise base.NotSupported(
                f"domain {self._domid} has not placed its shared info page "
                "in its physmap (getdomaininfo: no GFN); dom0 cannot map "
                "it, and the guest cannot see it",
                call="probe.shared_info",
            )
        return self.frame(gfn)

    def evtchn_status(self, port: int) -> base.EventChannel | None:
        if port <= 0:
            return None
        st = libs.EvtchnStatus(dom=self._domid, port=port)
        if self._fn.xc_evtchn_status(self._xch, ctypes.byref(st)) < 0:
            err = ctypes.get_errno()
            if err == errnos.EINVAL:
                return None  # beyond the domain's ports
            if err == errnos.EACCES:
                # A port Xen consumes (an ioreq server's): refused to
                # every caller, the guest included, which cannot bind,
                # raise or close it; as no binding of the guest's.
                return base.EventChannel(
                    port=port, type=base.EvtchnType.CLOSED
                )
            libs.raise_for(
                "xc_evtchn_status", f"port {port}", domid=self._domid
            )
        kind = base.EvtchnType(st.status)
        return base.EventChannel(
            port=port,
            type=kind,
            vcpu=st.vcpu,
            remote_domid=(
                st.u.unbound_dom
                if kind is base.EvtchnType.UNBOUND
                else st.u.interdomain.dom
                if kind is base.EvtchnType.INTERDOMAIN
                else 0
            ),
            remote_port=(
                st.u.interdomain.port
                if kind is base.EvtchnType.INTERDOMAIN
                else 0
            ),
            virq=st.u.virq if kind is base.EvtchnType.VIRQ else 0,
            pirq=st.u.pirq if kind is base.EvtchnType.PIRQ else 0,
        )

    def hvm_param(self, index: int) -> int:
        value = ctypes.c_uint64()
        rc = self._fn.xc_hvm_param_get(
            self._xch, self._domid, index, ctypes.byref(value)
        )
        if rc < 0:
            if ctypes.get_errno() == errnos.EINVAL:
                # A param this Xen does not know reads as unset.
                return 0
            libs.raise_for(
                "xc_hvm_param_get", f"param {index}", domid=self._domid
            )
        return int(value.value)

    def hvm_record(self, typecode: int, instance: int) -> bytes | None:
        # hvm_save_one pauses the vCPU (or the domain) for the read, so a
        # running guest is read as well; ENODATA (a vCPU record) and
        # ENOENT (a domain record) say the domain has no such record.
        size = self._partial(typecode, instance, None)
        if size is None:
            return None
        if size > RECORD_LIMIT:
            raise base.HostError(
                f"HVM record {typecode}:{instance} of {size} octets",
                call="probe.hvm_record",
            )
        return self._partial(typecode, instance, size)

    def _partial(self, typecode: int, instance: int, size: int | None) -> Any:
        """XEN_DOMCTL_gethvmcontext_partial: with ``size`` None the
        record's length (a null buffer asks for it), else its bytes; None
        when the domain has no such record."""
        with self._hypercall(XEN_DOMCTL_GETHVMCONTEXT_PARTIAL) as (
            ctl,
            alloc,
            issue,
        ):
            part = ctl.u.hvmcontext_partial
            part.type = typecode
            part.instance = instance
            data = 0
            if size is not None:
                data = alloc(max(size, 1))
                part.bufsz = size
                part.buffer = data
            err = issue()
            # EINVAL: this Xen saves no such type by itself (the header);
            # ENODATA, ENOENT: the domain has no such record.
            if err in (errnos.EINVAL, errnos.ENODATA, errnos.ENOENT):
                return None
            if err:
                ctypes.set_errno(err)
                libs.raise_for(
                    "XEN_DOMCTL_gethvmcontext_partial",
                    f"record {typecode}:{instance}",
                    domid=self._domid,
                )
            if size is None:
                return int(part.bufsz)
            return ctypes.string_at(data, int(part.bufsz))

    @contextlib.contextmanager
    def _hypercall(
        self, cmd: int
    ) -> Iterator[tuple[_Domctl, Callable[[int], int], Callable[[], int]]]:
        """A zeroed struct xen_domctl for ``cmd`` in a hypercall buffer,
        an allocator of more such buffers, and the call issuing it
        (returning the errno, 0 on success); all freed on exit."""
        handle = self._fn.xencall_open(None, 0)
        if not handle:
            libs.raise_for("xencall_open")
        bufs: list[int] = []

        def alloc(size: int) -> int:
            buf = self._fn.xencall_alloc_buffer(handle, size)
            if not buf:
                libs.raise_for("xencall_alloc_buffer")
            bufs.append(buf)
            return buf

        try:
            ctl_addr = alloc(ctypes.sizeof(_Domctl))
            ctypes.memset(ctl_addr, 0, ctypes.sizeof(_Domctl))
            ctl = _Domctl.from_address(ctl_addr)
            ctl.cmd = cmd
            ctl.interface_version = DOMCTL_INTERFACE_VERSION
            ctl.domain = self._domid

            def issue() -> int:
                ctypes.set_errno(0)
                rc = self._fn.xencall1(handle, HYPERVISOR_DOMCTL, ctl_addr)
                return ctypes.get_errno() or errnos.EIO if rc < 0 else 0

            yield ctl, alloc, issue
        finally:
            for buf in bufs:
                self._fn.xencall_free_buffer(handle, buf)
            self._fn.xencall_close(handle)

    def guest_tsc(self) -> int:
        # What RDTSC in the guest returns now, as Xen computes it for the
        # CPU record (the host TSC scaled and offset for the guest): read
        # from outside, never from the guest.
        record = self.hvm_record(HVM_SAVE_CPU, 0)
        if record is None or len(record) < HVM_CPU_TSC_OFFSET + 8:
            raise base.HostError(
                f"domain {self._domid} has no CPU record for vCPU 0",
                call="probe.guest_tsc",
            )
        return struct.unpack_from("<Q", record, HVM_CPU_TSC_OFFSET)[0]

    # -- xenstored, as dom0 --

    def xenstore(self) -> base.XenstoreReader:
        return XenstoreReader(self._xsh, self._fn, self._libc)

    def xenstore_connection(
        self,
    ) -> tuple[tuple[base.XenstoreWatch, ...], tuple[int, ...], int, int]:
        if not self._fn.xs_is_domain_introduced(self._xsh, self._domid):
            raise base.HostError(
                f"dom{self._domid} is not introduced to xenstored",
                call="probe.xenstore_connection",
            )
        if not self._patched_xenstored:
            raise base.NotSupported(
                f"domain {self._domid}: {STOCK_XENSTORED_LIMIT}",
                call="probe.xenstore_connection",
            )
        # The patched xenstored dumps the connection in
        # xenstore-migration.md's records when asked (domain-export,
        # without -f: nothing frozen); decoded here, by this module.
        with tempfile.TemporaryDirectory(prefix="ncm-probe-") as d:
            os.chmod(d, 0o700)
            path = os.path.join(d, f"domain-{self._domid}")
            self._control(b"domain-export", str(self._domid), path)
            with open(path, "rb") as f:
                data = f.read(XS_DUMP_LIMIT + 1)
        evtchn, watches, txs = parse_connection(data, self._domid)
        # The ring's GFN is not in the connection's record: the one the
        # toolstack introduced the domain with, which the guest reads.
        gfn = self.hvm_param(HVM_PARAM_STORE_PFN)
        return watches, txs, evtchn, gfn

    def _control(self, command: bytes, *args: str) -> None:
        data = b"".join(a.encode() + b"\0" for a in args)
        if self._xs_control is None:
            self._xs_control = _xs_control_ptr()
        ptr = self._xs_control(self._xsh, command, data, len(data))
        if not ptr:
            err = ctypes.get_errno()
            raise base.HostError(
                f"xenstored {command.decode()} {' '.join(args)}: "
                f"{os.strerror(err) if err else 'failed'}",
                call="xs_control_command",
                errno=err or None,
            )
        self._libc.free(ptr)

    def guest_records(self) -> base.GuestRecords:
        # A guest on real Xen keeps no records in a layout the host knows
        # (the simulated guest's header is the simulator's): none.
        self._domaininfo("probe.guest_records")
        return base.GuestRecords({}, (), (), 0)


class XenstoreReader(base.XenstoreReader):
    """xs_read, xs_directory and xs_get_permissions as dom0."""

    def __init__(self, xsh: Any, fn: Any, libc: Any) -> None:
        self._xsh = xsh
        self._fn = fn
        self._libc = libc

    def _fail(self, call: str, path: str) -> None:
        err = ctypes.get_errno()
        name = errnos.errorcode.get(err, str(err))
        # The checker's walk tells a node removed meanwhile by ENOENT.
        raise base.HostError(f"{path}: {name}", call=call, errno=err or None)

    def read(self, path: str, tx: int = 0) -> bytes:
        length = ctypes.c_uint()
        ptr = self._fn.xs_read(
            self._xsh, tx, path.encode(), ctypes.byref(length)
        )
        if not ptr:
            self._fail("xs_read", path)
        try:
            return ctypes.string_at(ptr, length.value)
        finally:
            self._libc.free(ptr)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        num = ctypes.c_uint()
        ptr = self._fn.xs_directory(
            self._xsh, tx, path.encode(), ctypes.byref(num)
        )
        if not ptr:
            self._fail("xs_directory", path)
        try:
            names = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_char_p))
            return sorted(names[i].decode() for i in range(num.value))
        finally:
            self._libc.free(ptr)

    def get_perms(self, path: str, tx: int = 0) -> list[tuple[str, int]]:
        num = ctypes.c_uint()
        ptr = self._fn.xs_get_permissions(
            self._xsh, tx, path.encode(), ctypes.byref(num)
        )
        if not ptr:
            self._fail("xs_get_permissions", path)
        try:
            # struct xs_permissions { unsigned int id; int perms; }
            raw = ctypes.string_at(ptr, 8 * num.value)
            out = []
            for i in range(num.value):
                who, perms = struct.unpack_from("<Ii", raw, 8 * i)
                out.append((XS_PERM_LETTERS.get(perms & 3, "n"), who))
            return out
        finally:
            self._libc.free(ptr)


def parse_connection(
    data: bytes, domid: int
) -> tuple[int, tuple[base.XenstoreWatch, ...], tuple[int, ...]]:
    """The store port, watches and open transactions of ``domid`` in the
    patched xenstored's ``domain-export`` file (xenstore-migration.md:
    preamble, CONNECTION_DATA, WATCH_DATA and TRANSACTION_DATA records,
    END; little-endian). Anything else is refused, naming it."""

    def bad(what: str) -> base.HostError:
        return base.HostError(
            f"xenstored's dump of domain {domid}: {what}",
            call="probe.xenstore_connection",
        )

    if len(data) > XS_DUMP_LIMIT:
        raise bad(f"more than {XS_DUMP_LIMIT} octets")
    if data[:8] != b"xenstore" or len(data) < 16:
        raise bad("no xenstore-migration preamble")
    version, flags = struct.unpack_from(">I", data, 8)[0], data[12:16]
    if version != 1 or flags != bytes(4):
        raise bad(f"version {version}, flags {flags.hex()}")
    at = 16
    evtchn = None
    watches = []
    txs = []
    while True:
        if at + 8 > len(data):
            raise bad("no END record")
        kind, length = struct.unpack_from("<II", data, at)
        body = data[at + 8 : at + 8 + length]
        if len(body) != length:
            raise bad(f"record {kind} at octet {at} runs past the end")
        at += 8 + length
        if kind == XS_REC_END:
            break
        if kind == XS_REC_CONN and length >= 24:
            conn_type, rec_domid, port = struct.unpack_from(
                "<H2xH2xI", body, 4
            )
            if conn_type != 0 or rec_domid != domid or evtchn is not None:
                raise bad(
                    f"connection of type {conn_type} for domain {rec_domid}"
                )
            evtchn = port
        elif kind == XS_REC_WATCH and length >= 8:
            plen, tlen = struct.unpack_from("<HH", body, 4)
            path = body[8 : 8 + plen]
            token = body[8 + plen : 8 + plen + tlen]
            if not path.endswith(b"\0") or not token.endswith(b"\0"):
                raise bad("a watch's path or token is not terminated")
            watches.append(
                base.XenstoreWatch(
                    path[:-1].decode(errors="replace"),
                    token[:-1].decode(errors="replace"),
                )
            )
        elif kind == XS_REC_TRANSACTION and length >= 8:
            txs.append(struct.unpack_from("<I", body, 4)[0])
        else:
            raise bad(f"record type {kind} of {length} octets")
    if evtchn is None:
        raise bad("no connection record")
    return evtchn, tuple(watches), tuple(sorted(txs))


def _xs_control_ptr() -> Any:
    # xs_control_command returning the reply's pointer, to free it (the
    # shared prototype returns a copy as bytes).
    fn = libs.library("xenstore")["xs_control_command"]
    fn.restype = ctypes.c_void_p
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_uint,
    ]
    return fn


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return libc
