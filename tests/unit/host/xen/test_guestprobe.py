"""The checker's probe of a guest on real Xen: each read answered by fakes
of the libraries as Xen, libxenforeignmemory and xenstored would answer,
and each refusal naming what stock Xen does not give dom0."""

from __future__ import annotations

import ast
import ctypes
import errno as errnos
import inspect
import struct
import types

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.xen import guestprobe
from nova_xen_ncm.host.xen import libs

DOMID = 7
SHINFO_GFN = 0xFEFFF


def _fail(err: int) -> int:
    ctypes.set_errno(err)
    return -1


class FakeXen:
    """libxenctrl, libxenforeignmemory, libxencall and libxenstore as a
    stock Xen 4.17 dom0 sees one HVM guest."""

    def __init__(self) -> None:
        self.shared_info_frame = SHINFO_GFN
        self.pages = {SHINFO_GFN: b"\x11" * 4096, 0x100: b"\x22" * 4096}
        self.mapped: list[tuple[int, int]] = []  # (gfn, prot)
        self.unmapped = 0
        # port -> errno or (status, vcpu, union fields)
        self.ports: dict[int, object] = {
            1: (EvtchnType.UNBOUND, 0, {"unbound_dom": 0}),
            2: (EvtchnType.INTERDOMAIN, 0, {"interdomain": (0, 33)}),
            3: errnos.EACCES,
            4: (EvtchnType.VIRQ, 1, {"virq": 0}),
        }
        self.params = {1: 0xFEFFE, 2: 1}
        cpu = bytearray(1032)
        struct.pack_into("<Q", cpu, guestprobe.HVM_CPU_TSC_OFFSET, 123456)
        # (type, instance) -> bytes or errno
        self.records: dict[tuple[int, int], object] = {
            (1, 0): errnos.EINVAL,  # the header: no handler of its own
            (2, 0): bytes(cpu),
            (2, 1): bytes(cpu),
            (13, 0): struct.pack("<II", 5, 0),
        }
        self.introduced = True
        self.xenstore = {
            f"/local/domain/{DOMID}": (b"", ["name"], [(0, 0), (1, DOMID)]),
            f"/local/domain/{DOMID}/name": (b"g", [], [(0, 0)]),
        }
        self.buffers: dict[int, ctypes.Array] = {}
        self.calls: list[str] = []
        self.fn = types.SimpleNamespace(
            xc_domain_getinfolist=self.getinfolist,
            xenforeignmemory_map=self.map,
            xenforeignmemory_unmap=self.unmap,
            xc_evtchn_status=self.evtchn_status,
            xc_hvm_param_get=self.param_get,
            xencall_open=lambda logger, flags: 0xCA11,
            xencall_close=lambda h: 0,
            xencall_alloc_buffer=self.alloc,
            xencall_free_buffer=lambda h, buf: self.buffers.pop(buf),
            xencall1=self.xencall1,
            xs_is_domain_introduced=lambda h, domid: self.introduced,
            xs_read=self.xs_read,
            xs_directory=self.xs_directory,
            xs_get_permissions=self.xs_get_permissions,
        )
        self.libc = types.SimpleNamespace(free=lambda ptr: None)
        # The patched hypervisor's answers; None: stock Xen, whose
        # unknown domctl ends in ``absent``.
        self.patched: dict | None = None
        self.absent = errnos.ENOSYS
        self.gnttab_version = 1
        self.grant_frames = [0xF0000, 2**64 - 1]
        self.gnttab_calls: list[int] = []
        self.fn.xc_gnttab_get_version = lambda xch, domid: self.gnttab_version
        self.fn.xc_gnttab_op = self.gnttab_op

    def probe(
        self, patched_xenstored: bool = False
    ) -> guestprobe.XenGuestProbe:
        return guestprobe.XenGuestProbe(
            DOMID,
            xch=object(),
            fmem=object(),
            xsh=object(),
            fn=self.fn,
            patched_xenstored=patched_xenstored,
            libc=self.libc,
        )

    # libxenctrl
    def getinfolist(self, xch, first, count, ref) -> int:
        info = ref._obj
        info.domain = first
        info.flags = libs.XEN_DOMINF_hvm_guest
        info.shared_info_frame = self.shared_info_frame
        info.max_vcpu_id = 1
        return 1

    def evtchn_status(self, xch, ref) -> int:
        st = ref._obj
        assert st.dom == DOMID
        found = self.ports.get(st.port, errnos.EINVAL)
        if isinstance(found, int):
            return _fail(found)
        status, vcpu, fields = found
        st.status, st.vcpu = int(status), vcpu
        for name, value in fields.items():
            if name == "interdomain":
                st.u.interdomain.dom, st.u.interdomain.port = value
            else:
                setattr(st.u, name, value)
        return 0

    def param_get(self, xch, domid, index, ref) -> int:
        if index >= 39:
            return _fail(errnos.EINVAL)
        ref._obj.value = self.params.get(index, 0)
        return 0

    def gnttab_op(self, xch, cmd, addr, size, count) -> int:
        self.gnttab_calls.append(cmd)
        if cmd == guestprobe.GNTTABOP_QUERY_SIZE:
            op = guestprobe._GnttabQuerySize.from_address(addr)
            assert op.dom == DOMID
            op.nr_frames, op.max_nr_frames = len(self.grant_frames), 64
            return 0
        assert cmd == guestprobe.GNTTABOP_SETUP_TABLE
        op = guestprobe._GnttabSetupTable.from_address(addr)
        # The table's own size: asking for more would grow it.
        assert op.dom == DOMID and op.nr_frames == len(self.grant_frames)
        assert op.frame_list in self.buffers  # a hypercall buffer
        frames = (ctypes.c_uint64 * op.nr_frames).from_address(op.frame_list)
        frames[:] = self.grant_frames
        return 0

    # libxenforeignmemory
    def map(self, fmem, domid, prot, n, pfns, err) -> int:
        assert n == 1 and domid == DOMID
        gfn = pfns[0]
        self.mapped.append((gfn, prot))
        page = self.pages.get(gfn)
        if page is None:
            err[0] = -errnos.EFAULT
            page = b"\xff" * 4096
        buf = ctypes.create_string_buffer(page, 4096)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def unmap(self, fmem, addr, n) -> int:
        self.buffers.pop(addr)
        self.unmapped += 1
        return 0

    # libxencall
    def alloc(self, handle, size) -> int:
        buf = (ctypes.c_uint8 * size)()
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xencall1(self, handle, op, addr) -> int:
        assert op == guestprobe.HYPERVISOR_DOMCTL
        ctl = guestprobe._Domctl.from_address(addr)
        assert ctl.interface_version == 0x15 and ctl.domain == DOMID
        if ctl.cmd == guestprobe.XEN_DOMCTL_NCM_EVTCHN:
            op = ctl.u.ncm_evtchn
            assert (op.op, op.nr, op.recs) == (0, 0, 0)  # GET, count only
            if self.patched is None:
                return _fail(self.absent)
            op.nr, op.abi = 2, self.patched["abi"]
            return 0
        if ctl.cmd == guestprobe.XEN_DOMCTL_NCM_VCPU:
            op = ctl.u.ncm_vcpu
            assert op.op == 0
            placed = self.patched["vcpu_info"].get(op.vcpu, errnos.ENOENT)
            if isinstance(placed, int):
                return _fail(placed)
            if placed:
                op.flags = 1
                op.vcpu_info_gfn, op.offset = placed
            return 0
        assert ctl.cmd == 55
        part = ctl.u.hvmcontext_partial
        self.calls.append(f"{part.type}:{part.instance}:{part.buffer != 0}")
        found = self.records.get(
            (part.type, part.instance),
            errnos.ENODATA if part.type == 2 else errnos.ENOENT,
        )
        if isinstance(found, int):
            return _fail(found)
        if not part.buffer:
            part.bufsz = len(found)
            return 0
        if part.bufsz < len(found):
            return _fail(errnos.ENOBUFS)
        ctypes.memmove(part.buffer, found, len(found))
        part.bufsz = len(found)
        return 0

    # libxenstore
    def _node(self, path: bytes) -> tuple | None:
        node = self.xenstore.get(path.decode())
        if node is None:
            ctypes.set_errno(errnos.ENOENT)
        return node

    def xs_read(self, h, tx, path, length) -> int | None:
        node = self._node(path)
        if node is None:
            return None
        buf = ctypes.create_string_buffer(node[0] or b"\0", len(node[0]) + 1)
        self.buffers[ctypes.addressof(buf)] = buf
        length._obj.value = len(node[0])
        return ctypes.addressof(buf)

    def xs_directory(self, h, tx, path, num):
        node = self._node(path)
        if node is None:
            return ctypes.POINTER(ctypes.c_char_p)()
        names = (ctypes.c_char_p * len(node[1]))(
            *(n.encode() for n in node[1])
        )
        self.buffers[ctypes.addressof(names)] = names
        num._obj.value = len(node[1])
        return ctypes.cast(names, ctypes.POINTER(ctypes.c_char_p))

    def xs_get_permissions(self, h, tx, path, num) -> int | None:
        node = self._node(path)
        if node is None:
            return None
        raw = b"".join(struct.pack("<Ii", who, p) for p, who in node[2])
        buf = ctypes.create_string_buffer(raw, max(1, len(raw)))
        self.buffers[ctypes.addressof(buf)] = buf
        num._obj.value = len(node[2])
        return ctypes.addressof(buf)


@pytest.fixture
def xen() -> FakeXen:
    return FakeXen()


def test_the_probe_shares_no_code_with_the_migrations_paths() -> None:
    tree = ast.parse(inspect.getsource(guestprobe))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert not imported & {"context", "pvctx", "inplace", "xsmig", "host"}
    assert "libs" in imported


def test_frames_are_mapped_read_only_and_unmapped(xen) -> None:
    probe = xen.probe()
    assert probe.frame(0x100) == b"\x22" * 4096
    with pytest.raises(base.HostError, match="gfn 0x200 is not in dom7"):
        probe.frame(0x200)
    assert [prot for _, prot in xen.mapped] == [guestprobe.PROT_READ] * 2
    assert xen.unmapped == 2 and not xen.buffers


def test_the_shared_info_page_is_read_where_the_guest_placed_it(xen) -> None:
    assert xen.probe().shared_info() == b"\x11" * 4096
    assert xen.mapped == [(SHINFO_GFN, guestprobe.PROT_READ)]


@pytest.mark.parametrize("frame", sorted(guestprobe.SHARED_INFO_UNPLACED))
def test_an_unplaced_shared_info_page_is_refused(xen, frame) -> None:
    xen.shared_info_frame = frame
    with pytest.raises(base.NotSupported, match="has not placed its shared"):
        xen.probe().shared_info()
    assert not xen.mapped


@pytest.mark.parametrize(
    "absent", [errnos.ENOSYS, errnos.EOPNOTSUPP, errnos.EACCES]
)
def test_the_physmap_is_refused_naming_what_stock_xen_lacks(xen, absent):
    xen.absent = absent
    with pytest.raises(base.NotSupported) as exc:
        xen.probe().physmap()
    assert "vcpu_info placement" in str(exc.value)
    assert "event channel ABI" in str(exc.value)
    assert not xen.gnttab_calls and not xen.buffers


def test_the_patched_hypervisor_gives_the_physmap(xen) -> None:
    xen.patched = {"abi": 0, "vcpu_info": {0: None, 1: (0x120, 64)}}
    pm = xen.probe().physmap()
    assert pm == base.GuestPhysmap(
        shared_info_gfn=SHINFO_GFN,
        grant_version=1,
        grant_frame_gfns=(0xF0000, None),
        vcpu_info=(
            base.VcpuInfoPlacement(0),
            base.VcpuInfoPlacement(1, 0x120, 64),
        ),
        evtchn_abi=base.EvtchnAbi.TWO_LEVEL,
    )
    assert not xen.buffers
    xen.patched["abi"] = 1
    assert xen.probe().physmap().evtchn_abi is base.EvtchnAbi.FIFO


def test_a_grant_table_the_guest_never_set_up_is_left_alone(xen) -> None:
    xen.patched = {"abi": 0, "vcpu_info": {0: None, 1: None}}
    xen.gnttab_version = 0
    xen.shared_info_frame = 2**64 - 1
    pm = xen.probe().physmap()
    # GNTTABOP_setup_table would set version 1 for the guest: not called.
    assert pm.grant_frame_gfns == () and xen.gnttab_calls == []
    assert pm.shared_info_gfn is None


def test_a_failing_vcpu_read_is_an_error(xen) -> None:
    xen.patched = {"abi": 0, "vcpu_info": {0: errnos.EFAULT}}
    with pytest.raises(base.HostError, match="ncm_vcpu: Bad address"):
        xen.probe().physmap()


def test_event_channels_are_evtchnop_status_port_by_port(xen) -> None:
    probe = xen.probe()
    assert probe.evtchn_status(0) is None
    assert probe.evtchn_status(1) == base.EventChannel(
        1, EvtchnType.UNBOUND, remote_domid=0
    )
    assert probe.evtchn_status(2) == base.EventChannel(
        2, EvtchnType.INTERDOMAIN, remote_domid=0, remote_port=33
    )
    # Xen's own port (an ioreq server's) is no binding of the guest's.
    assert probe.evtchn_status(3).type is EvtchnType.CLOSED
    assert probe.evtchn_status(4) == base.EventChannel(
        4, EvtchnType.VIRQ, vcpu=1, virq=0
    )
    assert probe.evtchn_status(5) is None
    xen.ports[5] = errnos.EPERM
    with pytest.raises(base.HostError, match="port 5"):
        probe.evtchn_status(5)


def test_hvm_params_are_hvmop_get_param(xen) -> None:
    probe = xen.probe()
    assert probe.hvm_param(1) == 0xFEFFE
    assert probe.hvm_param(9) == 0
    assert probe.hvm_param(40) == 0  # unknown to this Xen: unset
    xen.fn.xc_hvm_param_get = lambda *a: _fail(errnos.EPERM)
    with pytest.raises(base.HostError, match="param 1"):
        probe.hvm_param(1)


def test_one_hvm_record_is_asked_its_size_then_read(xen) -> None:
    probe = xen.probe()
    assert probe.hvm_record(13, 0) == struct.pack("<II", 5, 0)
    assert xen.calls == ["13:0:False", "13:0:True"]
    assert not xen.buffers  # every hypercall buffer freed
    assert probe.hvm_record(2, 5) is None  # no such vCPU
    assert probe.hvm_record(12, 0) is None  # no HPET record
    assert probe.hvm_record(1, 0) is None  # no such record type
    xen.records[(11, 0)] = errnos.EPERM
    with pytest.raises(base.HostError, match="record 11:0"):
        probe.hvm_record(11, 0)
    xen.records[(16, 0)] = bytes(guestprobe.RECORD_LIMIT + 1)
    with pytest.raises(base.HostError, match="octets"):
        probe.hvm_record(16, 0)


def test_the_guest_tsc_is_xens_in_the_cpu_record(xen) -> None:
    assert xen.probe().guest_tsc() == 123456
    del xen.records[(2, 0)]
    with pytest.raises(base.HostError, match="no CPU record"):
        xen.probe().guest_tsc()


def test_xenstore_is_read_as_dom0(xen) -> None:
    xs = xen.probe().xenstore()
    home = f"/local/domain/{DOMID}"
    assert xs.read(f"{home}/name") == b"g"
    assert xs.directory(home) == ["name"]
    assert xs.get_perms(home) == [("n", 0), ("r", DOMID)]
    with pytest.raises(base.HostError, match="ENOENT"):
        xs.read(f"{home}/gone")


def _dump(*records: tuple[int, bytes]) -> bytes:
    out = [b"xenstore" + struct.pack(">I", 1) + bytes(4)]
    for kind, body in (*records, (0, b"")):
        body += bytes(-len(body) % 8)
        out.append(struct.pack("<II", kind, len(body)) + body)
    return b"".join(out)


CONNECTION = _dump(
    (2, struct.pack("<IHHHHIHHI", 1, 0, 0, DOMID, 0x7FF4, 3, 0, 0, 0)),
    (3, struct.pack("<IHH", 1, 13, 4) + b"device/vbd/1\0tok\0"),
    (3, struct.pack("<IHH", 1, 6, 3) + b"@xsrc\0ab\0"),
    (4, struct.pack("<II", 1, 9)),
)


def test_the_connection_is_refused_on_stock_xenstored(xen) -> None:
    with pytest.raises(base.NotSupported, match="watches or open trans"):
        xen.probe().xenstore_connection()
    xen.introduced = False
    with pytest.raises(base.HostError, match="not introduced") as exc:
        xen.probe().xenstore_connection()
    assert not isinstance(exc.value, base.NotSupported)


def _control(xen: FakeXen, dump: bytes, seen: list):
    def control(xsh, command, data, length) -> int:
        args = data[:length].split(b"\0")[:-1]
        seen.append((command, args))
        if dump is None:  # NULL with the errno, as libxenstore answers
            ctypes.set_errno(errnos.EINVAL)
            return 0
        with open(args[-1], "wb") as f:
            f.write(dump)
        buf = ctypes.create_string_buffer(b"OK")
        xen.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    return control


def _patched_probe(xen: FakeXen, dump: bytes | None, seen: list):
    return guestprobe.XenGuestProbe(
        DOMID, xch=object(), fmem=object(), xsh=object(), fn=xen.fn,
        patched_xenstored=True, libc=xen.libc,
        xs_control=_control(xen, dump, seen),
    )  # fmt: skip


def test_the_patched_xenstored_lists_the_connection(xen) -> None:
    seen: list = []
    probe = _patched_probe(xen, CONNECTION, seen)
    watches, txs, port, gfn = probe.xenstore_connection()
    # Exported, never frozen (no -f): the guest's ring is left alone.
    [(command, args)] = seen
    assert command == b"domain-export" and args[0] == str(DOMID).encode()
    assert len(args) == 2 and b"-f" not in args
    assert watches == (
        base.XenstoreWatch("device/vbd/1", "tok"),
        base.XenstoreWatch("@xsrc", "ab"),
    )
    assert txs == (9,) and port == 3 and gfn == 0xFEFFE


@pytest.mark.parametrize(
    ("dump", "named"),
    [
        (b"garbage", "no xenstore-migration preamble"),
        (CONNECTION[:-8], "no END record"),
        (_dump((4, struct.pack("<II", 1, 9))), "no connection record"),
        (_dump((5, bytes(8))), "record type 5"),
        (
            _dump((2, struct.pack("<IHHHHIHHI", 1, 0, 0, 9, 0, 3, 0, 0, 0))),
            "for domain 9",
        ),
        (
            _dump((3, struct.pack("<IHH", 1, 3, 2) + b"abcde")),
            "not terminated",
        ),
    ],
)
def test_a_dump_that_is_not_one_connection_is_refused(xen, dump, named):
    probe = _patched_probe(xen, dump, [])
    with pytest.raises(base.HostError, match=named):
        probe.xenstore_connection()


def test_xenstored_refusing_the_export_is_an_error(xen) -> None:
    probe = _patched_probe(xen, None, [])
    with pytest.raises(base.HostError, match="domain-export") as exc:
        probe.xenstore_connection()
    assert exc.value.errno == errnos.EINVAL


def test_a_guest_without_the_simulators_records_has_none(xen) -> None:
    assert xen.probe().guest_records() == base.GuestRecords({}, (), (), 0)


class _Host:
    """What checker.observe asks of a host besides its probe."""

    def __init__(self, xen: FakeXen) -> None:
        self.xen = xen

    def observing(self):
        import contextlib

        return contextlib.nullcontext()

    def probe(self, domid: int) -> guestprobe.XenGuestProbe:
        return self.xen.probe()

    def get_tsc_info(self, domid: int) -> base.TscInfo:
        return base.TscInfo(0, 2_000_000, 0, 1)

    def domain_info(self, domid: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(vcpus=2)


def test_on_patched_xen_the_checker_reads_the_physmap_items(xen) -> None:
    xen.patched = {"abi": 0, "vcpu_info": {0: None, 1: (0x100, 0)}}
    xen.pages[0xF0000] = bytes(4096)  # the guest's grant frame 0
    state = checker.observe(_Host(xen), DOMID)
    assert set(state.unread) == {Item.XENSTORE}
    assert state.items[Item.SHARED_INFO].content == b"\x11" * 4096
    ports = state.items[Item.EVENT_CHANNELS].ports
    assert [p.port for p in ports] == [1, 2, 4]
    assert state.items[Item.GRANT_TABLE].frame_gfns == (0xF0000, -1)


def test_the_checker_judges_what_stock_xen_lets_it_read(xen) -> None:
    state = checker.observe(_Host(xen), DOMID)
    assert set(state.items) == {
        Item.PLATFORM, Item.DOMID, Item.HVM_PARAMS, Item.PV_DEVICES,
    }  # fmt: skip
    assert set(state.unread) == {
        Item.SHARED_INFO, Item.EVENT_CHANNELS, Item.GRANT_TABLE,
        Item.XENSTORE,
    }  # fmt: skip
    assert "vcpu_info placement" in state.unread[Item.SHARED_INFO]
    assert "watches" in state.unread[Item.XENSTORE]
    # Both vCPUs' records, counted from the domain without placements.
    assert {"CPU:0", "CPU:1", "PMTIMER:0"} <= set(state.items[Item.PLATFORM])
    assert state.items[Item.DOMID] == (DOMID, (0,))
    assert state.items[Item.HVM_PARAMS] == ((1, 0xFEFFE), (2, 1))
    report = checker.check(state, state, state)
    assert not report.passed
    assert report.results[Item.HVM_PARAMS].passed
    assert "not readable there" in report.results[Item.XENSTORE].reason
