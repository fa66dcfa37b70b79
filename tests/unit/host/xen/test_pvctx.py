"""What the patched-Xen PV export refuses, before the guest is paused.

The fakes answer as the domctls and libxenctrl would; each test changes
one answer and expects the refusal to name it.
"""

from __future__ import annotations

import types

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import context as ctx_mod
from nova_xen_ncm.host.xen import pvctx
from nova_xen_ncm.host.xen import xsmig

DOMID = 7


class FakeCtx:
    def __init__(self) -> None:
        self.abi = "2-level"
        self.compat = False
        self.ports = [
            ctx_mod.EventChannel(port=1, status=5, vcpu=0),  # IPI
            ctx_mod.EventChannel(port=2, status=4, vcpu=1, virq=0),  # VIRQ
        ]

    def event_channel_abi(self, domid: int) -> str:
        return self.abi

    def get_vcpu_state(
        self, domid: int, vcpu: int, *, relative: bool = False
    ) -> ctx_mod.VcpuState:
        assert relative  # what another host can take
        return ctx_mod.VcpuState(vcpu=vcpu, compat=self.compat)

    def get_event_channels(self, domid: int) -> list[ctx_mod.EventChannel]:
        return list(self.ports)


class FakeHost:
    _xch = object()

    def __init__(self) -> None:
        self.shared_info_frame = 0xFEFFF
        self.gnttab_version = 1

    def domain_info(self, domid: int) -> base.DomainInfo:
        return base.DomainInfo(
            domid=domid, name="g", uuid="u", state=base.DomainState.RUNNING,
            memory_bytes=1 << 28, vcpus=2, populated_pages=65536,
            pv_drivers=True,
        )  # fmt: skip

    def _raw_info(self, domid: int, call: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(shared_info_frame=self.shared_info_frame)


@pytest.fixture
def fakes(monkeypatch) -> tuple[FakeHost, FakeCtx]:
    host, ctx = FakeHost(), FakeCtx()
    fn = types.SimpleNamespace(
        xc_gnttab_get_version=lambda xch, domid: host.gnttab_version
    )
    monkeypatch.setattr(pvctx, "_fn", lambda: fn)
    return host, ctx


def test_an_exportable_guest_passes(fakes) -> None:
    host, ctx = fakes
    gfn, states = pvctx.check_exportable(host, ctx, DOMID)
    assert gfn == 0xFEFFF and [s.vcpu for s in states] == [0, 1]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda h, c: setattr(c, "abi", "FIFO"), "FIFO event channels"),
        (
            lambda h, c: setattr(h, "shared_info_frame", 2**64 - 1),
            "not mapped shared_info",
        ),
        (lambda h, c: setattr(c, "compat", True), "32-bit"),
        (lambda h, c: setattr(h, "gnttab_version", 2), "version 2"),
        (
            lambda h, c: c.ports.append(
                ctx_mod.EventChannel(port=9, status=2, xen_bound=True)
            ),
            "port 9 is Xen's own",
        ),
    ],
)
def test_what_the_export_cannot_read_is_refused_by_name(
    fakes, change, named
) -> None:
    host, ctx = fakes
    change(host, ctx)
    with pytest.raises(base.NotSupported, match=named):
        pvctx.check_exportable(host, ctx, DOMID)


class FakeStore:
    """xenstored as the new domain's toolstack left it."""

    def __init__(self, nodes: dict[str, tuple[bytes, tuple]]) -> None:
        self.nodes = dict(nodes)
        self.writes: list[str] = []

    def _xs(self) -> int:
        return 1

    def _xs_read(self, path: str) -> bytes | None:
        node = self.nodes.get(path)
        return None if node is None else node[0]


def test_xenstore_import_keeps_the_toolstacks_nodes(monkeypatch) -> None:
    g = DOMID
    base_path = f"/local/domain/{g}"
    # The new device model's pty, read-only to the guest; the guest's
    # own node; a node only the saved guest had; an unchanged one.
    store = FakeStore(
        {
            f"{base_path}/serial/0/tty": (b"/dev/pts/9", (("n", 0), ("r", g))),
            f"{base_path}/data/x": (b"libxl", (("n", g),)),
            f"{base_path}/name": (b"guest", (("n", 0), ("r", g))),
        }
    )

    def xs_write(h, t, path, value, n):
        store.writes.append(path.decode())
        store.nodes[path.decode()] = (bytes(value[:n]), ())
        return True

    fn = types.SimpleNamespace(
        xs_write=xs_write, xs_set_permissions=lambda *a: True
    )
    monkeypatch.setattr(pvctx, "_fn", lambda: fn)
    monkeypatch.setattr(
        pvctx, "_xs_perms", lambda host, path: store.nodes[path][1]
    )
    saved = base.XenstoreState(
        nodes=(
            base.XenstoreNode(
                f"{base_path}/serial/0/tty",
                b"/dev/pts/3",
                (("n", 0), ("r", g)),
            ),
            base.XenstoreNode(f"{base_path}/data/x", b"guest", (("n", g),)),
            base.XenstoreNode(
                f"{base_path}/data/new", b"1", (("n", 0), ("b", g))
            ),
            base.XenstoreNode(
                f"{base_path}/name", b"guest", (("n", 0), ("r", g))
            ),
        ),
        watches=(),
        transactions=(),
        store_port=1,
        store_gfn=0xFEFFC,
    )
    pvctx._import_xenstore(store, g, saved)
    assert store.writes == [f"{base_path}/data/x", f"{base_path}/data/new"]
    assert store.nodes[f"{base_path}/serial/0/tty"][0] == b"/dev/pts/9"


@pytest.mark.parametrize(
    ("perms", "writes"),
    [
        ((("n", DOMID),), True),  # the owner
        ((("n", 0), ("w", DOMID)), True),
        ((("n", 0), ("b", DOMID)), True),
        ((("n", 0), ("r", DOMID)), False),
        ((("b", 0),), True),  # everybody's default
        ((("b", 0), ("r", DOMID)), False),  # its entry wins
        ((), False),
    ],
)
def test_guest_writes_follows_xenstoreds_rule(perms, writes) -> None:
    assert pvctx._guest_writes(perms, DOMID) is writes


def test_a_toolstack_port_the_guest_moved_gets_its_vcpu_back() -> None:
    ctx = FakeCtx()
    # The new domain's xenstore and console ports, bound by the
    # toolstack on vCPU 0; the console daemon has not bound yet.
    ctx.ports = [
        ctx_mod.EventChannel(port=1, status=2, remote_dom=0, remote_port=40),
        ctx_mod.EventChannel(port=2, status=1, remote_dom=0),
    ]
    sent: list[list[ctx_mod.EventChannel]] = []
    ctx.set_event_channels = lambda domid, recs: sent.append(recs)
    interdomain = base.EvtchnType.INTERDOMAIN
    saved = (
        # The guest moved its xenstore port to vCPU 1.
        base.EventChannel(1, interdomain, 1, remote_domid=0, remote_port=40),
        # Bound to the old console daemon's port: left to the new one.
        base.EventChannel(2, interdomain, 1, remote_domid=0, remote_port=7),
        base.EventChannel(3, base.EvtchnType.IPI, 1),
    )
    pvctx._import_event_channels(ctx, DOMID, saved)
    # Port 2 (fresh, unbound) is not sent: it stays for the new daemon.
    assert [(r.port, r.status, r.vcpu) for r in sent[0]] == [
        (1, int(interdomain), 1),
        (3, int(base.EvtchnType.IPI), 1),
    ]


@pytest.mark.parametrize("patched_xenstored", [False, True])
def test_timers_are_armed_after_their_ports_and_the_guests_bits(
    monkeypatch, patched_xenstored: bool
) -> None:
    """A deadline that passed during the downtime fires at once: before
    VIRQ_TIMER is bound, or under the shared_info content written after
    it, that event would be lost and a tickless vCPU would wait on it.
    With the patched xenstored, the guest's ring (restored with the
    memory) is not served before its nodes and connection are back."""
    calls: list[tuple] = []
    gfn = 0xFEFFF
    for name in ("freeze", "thaw"):
        monkeypatch.setattr(
            xsmig, name, lambda host, domid, name=name: calls.append((name,))
        )
    monkeypatch.setattr(
        pvctx, "_import_xenstore", lambda *a: calls.append(("nodes",))
    )
    monkeypatch.setattr(
        pvctx,
        "_import_xenstore_connection",
        lambda *a: calls.append(("connection",)),
    )

    pages = {gfn: bytearray(4096), 0x1000: bytearray(4096)}

    class Mapping:
        def __init__(self, pfn: int) -> None:
            self.pfn = pfn
            self.pages = [pages[pfn]]

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            what = "shared_info" if self.pfn == gfn else "vcpu_info page"
            calls.append((f"{what} content",))

    class Host:
        opts = types.SimpleNamespace(backend_connect_timeout=120.0)

        def _raw_info(self, domid, call):
            return types.SimpleNamespace(shared_info_frame=gfn)

        def map_pages(self, domid, pfns, writable=False):
            assert writable and len(pfns) == 1
            return Mapping(int(pfns[0]))

        def _xs_read(self, path):
            return None

        def xenstored_migrates(self):
            return patched_xenstored

    ctx = FakeCtx()
    ctx.ports = []
    ctx.set_vcpu_state = lambda domid, vs: calls.append(
        ("vcpu", vs.vcpu, vs.vcpu_info, vs.singleshot_deadline,
         vs.periodic_period)
    )  # fmt: skip
    ctx.set_event_channels = lambda domid, recs: calls.append(
        ("ports", [r.port for r in recs])
    )
    state = base.PvState(
        domid=DOMID,
        backend_domids=(),
        event_channels=base.EventChannelState(
            base.EvtchnAbi.TWO_LEVEL,
            (base.EventChannel(3, base.EvtchnType.VIRQ, 1, virq=0),),
        ),
        grant_table=base.GrantTableState(1, (), ()),
        shared_info=base.SharedInfoState(
            gfn,
            bytes(4096),
            (
                base.VcpuInfoPlacement(0, 0x1000, 0),
                base.VcpuInfoPlacement(1, 0x1000, 64),
            ),
        ),
        xenstore=base.XenstoreState((), (), (), 1, 0xFEFFC),
        backends=(),
        vcpus=(
            base.VcpuPvState(0),
            base.VcpuPvState(1, singleshot_ns=0, periodic_ns=10**7),
        ),
    )
    pvctx.import_(Host(), ctx, DOMID, state)
    frozen = [("freeze",)] if patched_xenstored else []
    thawed = [("thaw",)] if patched_xenstored else []
    assert calls == [
        *frozen,
        # vcpu_info placed, no timer running...
        ("vcpu", 0, (0x1000, 0), None, 0),
        ("vcpu", 1, (0x1000, 64), None, 0),
        # ...while the ports and the guest's own bits go back...
        ("ports", [3]),
        ("shared_info content",),
        # Each vCPU's vcpu_info scans every word once (both in one page).
        ("vcpu_info page content",),
        ("vcpu_info page content",),
        # ...then armed: the deadline passed, it fires into port 3.
        ("vcpu", 1, (0x1000, 64), 0, 10**7),
        ("nodes",),
        ("connection",),
        *thawed,
    ]
    for at in (0, 64):
        assert pages[0x1000][at] == 1  # evtchn_upcall_pending
        assert pages[0x1000][at + 8 : at + 16] == b"\xff" * 8
    assert pages[0x1000][128:] == bytes(4096 - 128)
