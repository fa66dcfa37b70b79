"""PV frontends and backends driven against each other in memory: the
xenbus handshake, I/O, detection of lost, duplicated and reordered
responses, and a migration (quiesce, copy, reconnect) the frontend does
not notice."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import struct

import pytest

from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import DeviceConfig
from nova_xen_ncm.host.base import GuestState
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim.devices import Backend
from nova_xen_ncm.host.sim.devices import BackendError
from nova_xen_ncm.host.sim.devices import BlockStore
from nova_xen_ncm.host.sim.devices import Frontend
from nova_xen_ncm.host.sim.devices import FrontendError
from nova_xen_ncm.host.sim.devices import backend
from nova_xen_ncm.host.sim.devices import frontend
from nova_xen_ncm.host.sim.devices import protocol
from nova_xen_ncm.host.sim.devices.backend import VifBackend
from nova_xen_ncm.host.sim.xs_wire import XenstoreError

DOMID = 7
STATE_PFN = 0x103
FIRST_FREE_PFN = 0x200


class Ram:
    """Guest RAM: one bytearray per page, with a dirty set."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = collections.defaultdict(
            lambda: bytearray(4096)
        )
        self.dirty: set[int] = set()
        self.locked = False

    def page(self, pfn: int, writable: bool = False) -> memoryview:
        view = memoryview(self.pages[pfn])
        return view if writable else view.toreadonly()

    @contextlib.contextmanager
    def lock(self):
        assert not self.locked, "the RAM lock is not reentrant"
        self.locked = True
        try:
            yield
        finally:
            self.locked = False

    def mark_dirty(self, pfns) -> None:
        assert self.locked, "pages are marked dirty under the lock"
        self.dirty.add(int(pfns))


class Store:
    """A xenstore: nodes and watches; events queued per client."""

    def __init__(self) -> None:
        self.nodes: dict[str, bytes] = {}
        self.perms: dict[str, tuple] = {}
        self.watches: list[tuple[Client, str, str]] = []
        self.writes: list[str] = []

    def client(self, domid: int) -> Client:
        return Client(self, domid)


class Client:
    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.events: collections.deque = collections.deque()

    def read(self, path: str) -> bytes:
        if path not in self.store.nodes:
            raise XenstoreError("ENOENT", path)
        return self.store.nodes[path]

    def write(self, path: str, value: bytes) -> None:
        assert not self.store.watches or self.store.nodes is not None
        self.store.nodes[path] = bytes(value)
        self.store.writes.append(path)
        for client, wpath, token in self.store.watches:
            if path == wpath or path.startswith(wpath + "/"):
                client.events.append((path, token))

    def set_perms(self, path: str, perms) -> None:
        self.store.perms[path] = tuple(perms)

    def watch(self, path: str, token: str) -> None:
        self.store.watches.append((self, path, token))
        self.events.append((path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.store.watches.remove((self, path, token))

    def pop_events(self):
        out = list(self.events)
        self.events.clear()
        return out


class Host:
    """Xen and dom0 for one guest: grant table, event channels, RAM;
    implements GuestOps for the guest, GrantMapper and Dom0Evtchn for
    dom0. Events are queued and delivered by pump()."""

    def __init__(self) -> None:
        self.ram = Ram()
        self.store = Store()
        self.dom0 = self.store.client(0)
        self.guest_xs = self.store.client(DOMID)
        self.grants: dict[int, tuple[int, int]] = {}
        self.next_pfn = FIRST_FREE_PFN
        # guest port -> [remote_domid, dom0 port]; dom0 port -> handler.
        self.ports: dict[int, list[int]] = {}
        self.handlers: dict[int, object] = {}
        self.dom0_next = 10
        self.pending: collections.deque = collections.deque()
        self.completions: list = []
        self.maps: dict[int, int] = {}
        self.readonly_grants: set[int] = set()

    # GuestOps
    def alloc_page(self) -> int:
        self.next_pfn += 1
        return self.next_pfn - 1

    def grant_access(self, domid: int, gfn: int, readonly: bool) -> int:
        ref = 8 + len(self.grants)  # GNTTAB_NR_RESERVED_ENTRIES
        self.grants[ref] = (domid, gfn)
        if readonly:
            self.readonly_grants.add(ref)
        return ref

    def evtchn_alloc_unbound(self, remote_domid: int) -> int:
        port = 5 + len(self.ports)
        self.ports[port] = [remote_domid, 0]
        return port

    def evtchn_send(self, port: int) -> None:
        self.pending.append(("dom0", self.ports[port][1]))

    # GrantMapper
    def grant_map(self, domid: int, ref: int, readonly: bool = False):
        assert domid == DOMID
        grantee, gfn = self.grants[ref]
        assert grantee == 0
        if not readonly and ref in self.readonly_grants:
            raise PermissionError(f"grant reference {ref} is read-only")
        handle = len(self.maps) + 1
        self.maps[handle] = ref
        return handle, self.ram.page(gfn, writable=True)

    def grant_unmap(self, handle: int) -> None:
        del self.maps[handle]

    # Dom0Evtchn
    def dom0_bind_interdomain(self, domid: int, port: int, handler) -> int:
        binding = self.ports[port]
        assert binding[0] == 0
        local = binding[1] or self.dom0_next
        self.dom0_next += 1
        binding[1] = local
        self.handlers[local] = handler
        self.pending.append(("dom0", local))  # Xen sets it pending
        return local

    def dom0_check_bindable(self, domid: int, port: int) -> None:
        binding = self.ports.get(port)
        if binding is None or binding[0] != 0 or binding[1]:
            raise ValueError(f"port {port} is not unbound for dom0")

    def dom0_notify(self, port: int) -> None:
        guest = next(p for p, b in self.ports.items() if b[1] == port)
        self.pending.append(("guest", guest))

    def dom0_close(self, port: int) -> None:
        self.handlers.pop(port, None)

    def dom0_defer(self, what: str, work) -> None:
        # The disk's completions, run when the test says the disk is done.
        self.completions.append(work)


class Rig:
    """A guest with one device of ``kind`` on a Host."""

    def __init__(
        self, kind: str, backend_cls=None, store=None, pump=True
    ) -> None:
        self.kind = kind
        self.devid = 51712 if kind == "vbd" else 0
        self.host = Host()
        self.disk = store or BlockStore()
        devices.add_device(
            self.host.dom0,
            DOMID,
            DeviceConfig(kind, self.devid, mac="00:16:3e:00:00:01"),
        )
        cls = backend_cls or devices.BACKENDS[kind]
        extra = {"store": self.disk} if kind == "vbd" else {}
        self.backend = cls(
            domid=DOMID,
            devid=self.devid,
            backend_domid=0,
            xs=self.host.dom0,
            grants=self.host,
            evtchn=self.host,
            **extra,
        )
        self.backend.start()
        self.frontend = Frontend.probe(
            self.host.ram,
            STATE_PFN,
            0,
            self.host.guest_xs,
            self.host,
            domid=DOMID,
            kind=kind,
            devid=self.devid,
        )
        if pump:
            self.pump()

    def pump(self) -> None:
        """Deliver watch events and event channel notifications until
        nothing is left (the guest's and dom0's event loops)."""
        host = self.host
        for _ in range(1000):
            moved = False
            for client, device in (
                (host.guest_xs, self.frontend),
                (host.dom0, self.backend),
            ):
                for path, token in client.pop_events():
                    moved = True
                    if device is not None and token == device.token:
                        device.handle_watch(path)
            while host.pending:
                moved = True
                side, port = host.pending.popleft()
                if side == "dom0":
                    if port in host.handlers:
                        host.handlers[port](port)
                elif self.frontend is not None:
                    self.frontend.handle_event()
            if not moved:
                return
        raise AssertionError("events keep coming")

    def run_io(self, rounds: int, per_round: int = 5) -> None:
        for _ in range(rounds):
            self.frontend.issue(per_round)
            self.pump()
            self.finish_disk()
            self.pump()

    def finish_disk(self) -> int:
        """Run the completions the backend queued (its disk is done)."""
        done = 0
        while self.host.completions:
            done += self.host.completions.pop(0)() or 0
        return done


def counters(fe: Frontend) -> dict:
    obs = fe.observation()
    return {k: obs[k] for k in frontend.COUNTERS}


@pytest.mark.parametrize("kind", ["vif", "vbd"])
def test_handshake_reaches_connected(kind):
    rig = Rig(kind)
    fe, be = rig.frontend, rig.backend
    assert fe.state == 4 and fe.connected
    assert be.state == 4
    # blkfront says Initialised (3) and waits for the backend's
    # Connected; netfront says Connected at once.
    steps = (
        (("frontend", 3), ("backend", 4), ("frontend", 4))
        if kind == "vbd"
        else (("frontend", 4), ("backend", 4))
    )
    assert (
        fe.history()
        == (
            ("frontend", 1),
            ("backend", 1),
            ("backend", 2),
        )
        + steps
    )
    nodes = rig.host.store.nodes
    area = protocol.frontend_area(DOMID, kind, rig.devid)
    assert nodes[f"{area}/ring-ref"] == str(be.ring_ref).encode()
    assert nodes[f"{area}/event-channel"] == str(fe.port).encode()
    assert nodes[f"{be.backend_path}/state"] == b"4"
    assert rig.host.store.perms[area] == (("n", DOMID), ("r", 0))
    if kind == "vbd":
        assert nodes[f"{be.backend_path}/sector-size"] == b"32"
    # The guest marks nothing: the hypervisor finds its writes.
    assert not rig.host.ram.dirty


@pytest.mark.parametrize("kind", ["vif", "vbd"])
def test_io_flows_without_loss(kind):
    rig = Rig(kind)
    rig.run_io(40)  # 200 requests: the 32-entry ring wraps six times
    c = counters(rig.frontend)
    assert c["sent"] == c["completed"] == 200
    assert c["next_seq"] == 201 and c["last_rsp_seq"] == 200
    assert c["lost"] == c["duplicated"] == c["reordered"] == 0
    assert c["bad_payload"] == 0
    assert rig.frontend.outstanding() == ()
    assert rig.backend.ring.indices == (200, 200)


class DroppingVif(VifBackend):
    def put_responses(self, answers):
        super().put_responses(
            [a for a in answers if protocol.decode_response(a)[0] != 3]
        )


class SwappingVif(VifBackend):
    def put_responses(self, answers):
        seqs = [protocol.decode_response(a)[0] for a in answers]
        if 3 in seqs and 4 in seqs:
            i, j = seqs.index(3), seqs.index(4)
            answers[i], answers[j] = answers[j], answers[i]
        super().put_responses(answers)


class CorruptingVif(VifBackend):
    def execute(self, op, payload):
        status, data = super().execute(op, payload)
        return status, data[::-1]


def test_lost_response_is_counted():
    rig = Rig("vif", DroppingVif)
    rig.run_io(4)
    c = counters(rig.frontend)
    assert c["lost"] == 1
    assert c["reordered"] == c["duplicated"] == 0
    assert rig.frontend.outstanding() == (3,)


def test_reordered_response_is_counted():
    rig = Rig("vif", SwappingVif)
    rig.run_io(4)
    c = counters(rig.frontend)
    assert c["reordered"] == 1
    assert c["lost"] == c["duplicated"] == 0
    assert c["completed"] == 20


def test_duplicated_response_is_counted():
    rig = Rig("vif")
    rig.run_io(2)
    # A faulty backend writes a response to seq 4 a second time.
    page = rig.host.ram.page(FIRST_FREE_PFN, writable=True)
    prod = struct.unpack_from("<I", page, 8)[0]
    slot = ringmod.SRING_HEADER_SIZE + (prod % protocol.RING_ENTRIES) * 64
    seq4 = protocol.encode_response(
        4, 3, 0, protocol.expected_payload("vif", 0, 4)
    )
    page[slot : slot + 64] = seq4
    struct.pack_into("<I", page, 8, prod + 1)
    rig.frontend.handle_event()
    c = counters(rig.frontend)
    assert c["duplicated"] == 1
    assert c["lost"] == c["reordered"] == 0


def test_bad_payload_is_counted():
    rig = Rig("vif", CorruptingVif)
    rig.run_io(1)
    assert counters(rig.frontend)["bad_payload"] == 5


def test_frontend_restarts_from_its_ram_alone():
    rig = Rig("vbd")
    rig.run_io(3)
    rig.frontend.issue(4)
    before = rig.frontend.observation()
    rig.frontend = Frontend.attach(
        rig.host.ram, STATE_PFN, 0, rig.host.guest_xs, rig.host
    )
    assert rig.frontend.observation() == before
    rig.pump()
    rig.run_io(3)
    c = counters(rig.frontend)
    assert c["sent"] == c["completed"] == 34
    assert c["lost"] == c["bad_payload"] == 0
    assert len(rig.frontend.history()) == (
        6 if rig.frontend.kind == "vbd" else 5
    )


def test_a_probe_restarted_from_ram_registers_nothing_twice():
    # The guest restarted in the middle of its boot probe: the frontend
    # RAM holds is kept and its watch, registered already, is not asked
    # for again (xenstored would refuse it with EEXIST).
    rig = Rig("vbd", pump=False)
    fe = rig.frontend
    watch = (fe.backend_path + "/state", fe.token)
    ram = bytes(fe._mem)
    again = Frontend.probe(
        rig.host.ram,
        STATE_PFN,
        0,
        rig.host.guest_xs,
        rig.host,
        domid=DOMID,
        kind="vbd",
        devid=rig.devid,
        registered={watch},
    )
    assert bytes(again._mem) == ram
    watches = [(p, t) for c, p, t in rig.host.store.watches if c.domid]
    assert watches == [watch]
    # Its RAM, but not its watch: the watch is registered.
    rig.host.store.watches.clear()
    Frontend.probe(
        rig.host.ram,
        STATE_PFN,
        0,
        rig.host.guest_xs,
        rig.host,
        domid=DOMID,
        kind="vbd",
        devid=rig.devid,
    )
    assert [(p, t) for _, p, t in rig.host.store.watches] == [watch]
    assert bytes(again._mem) == ram


def test_attach_refuses_ram_without_a_frontend():
    with pytest.raises(FrontendError):
        Frontend.attach(Ram(), STATE_PFN, 0, Store().client(1), Host())


def copy_guest(rig: Rig) -> Host:
    """What a migration carries to a new host: RAM, grant table, the
    guest's ports, the xenstore with the guest's watches and the watch
    events it had not read yet. The source's backend goes."""
    dst = Host()
    dst.ram.pages.update(
        {pfn: bytearray(p) for pfn, p in rig.host.ram.pages.items()}
    )
    dst.grants = dict(rig.host.grants)
    dst.ports = copy.deepcopy(rig.host.ports)
    dst.next_pfn = rig.host.next_pfn
    dst.store.nodes = dict(rig.host.store.nodes)
    dst.store.perms = dict(rig.host.store.perms)
    for client, path, token in rig.host.store.watches:
        if client.domid == DOMID:
            dst.store.watches.append((dst.guest_xs, path, token))
    dst.guest_xs.events.extend(rig.host.guest_xs.events)
    rig.backend.close()
    rig.host = dst
    rig.frontend = None
    return dst


def migrate(rig: Rig, tamper=None, **backend_kwargs):
    """Pause with requests in flight and on the ring, copy the guest to a
    new host (RAM, grants, ports, xenstore), reconnect a new backend
    from its BackendState and restart the frontend from RAM."""
    rig.frontend.issue(4)
    rig.pump()  # the backend takes them: in flight
    rig.frontend.issue(2)  # on the ring, not taken
    paused = rig.frontend.observation()
    state = rig.backend.quiesce()
    assert len(state.inflight) == 4
    assert state.ring_indices == {
        "ring": (paused["sent"] - 2, paused["completed"])
    }
    dst = copy_guest(rig)
    nodes_before = dict(dst.store.nodes)
    rig.backend = Backend.reconnect(
        tamper(state) if tamper else state,
        xs=dst.dom0,
        grants=dst,
        evtchn=dst,
        **backend_kwargs,
    )
    assert dst.store.writes == [], "reconnect wrote to xenstore"
    assert dst.store.nodes == nodes_before
    rig.frontend = Frontend.attach(dst.ram, STATE_PFN, 0, dst.guest_xs, dst)
    return paused, state


@pytest.mark.parametrize("kind", ["vif", "vbd"])
def test_migration_is_invisible_to_the_frontend(kind):
    rig = Rig(kind)
    rig.run_io(5)
    disk = rig.disk
    extra = {"store": disk} if kind == "vbd" else {}
    paused, state = migrate(rig, **extra)
    assert rig.backend.ring_ref == state.ring_refs[0]
    assert rig.backend.frontend_port == state.event_channels[0]
    # In-flight requests were answered at reconnect.
    assert rig.backend.ring.indices[1] == state.ring_indices["ring"][1] + 4
    rig.pump()
    rig.backend.service()
    rig.pump()
    c = counters(rig.frontend)
    assert c["completed"] == c["sent"] == paused["sent"]
    rig.run_io(10)
    c = counters(rig.frontend)
    assert c["sent"] == c["completed"] == paused["sent"] + 50
    assert c["lost"] == c["duplicated"] == c["reordered"] == 0
    assert c["bad_payload"] == 0
    assert rig.frontend.history() == paused["states"]
    assert rig.host.store.writes == []


def test_reconnect_without_shared_disk_is_caught_by_the_frontend():
    rig = Rig("vbd")
    # Enough I/O that the reads after the migration check sectors
    # written before it (protocol.READ_LAG).
    rig.run_io(14)
    assert counters(rig.frontend)["bad_payload"] == 0
    # The destination's backend has a disk of its own, empty.
    migrate(rig, store=BlockStore())
    rig.pump()
    rig.run_io(2)
    assert counters(rig.frontend)["bad_payload"] > 0


def test_reads_check_data_written_long_before():
    seq = 2 * protocol.READ_LAG + 10
    op, payload = protocol.schedule("vbd", 1, seq)
    write = protocol.written_by(seq)
    wop, wpayload = protocol.schedule("vbd", 1, write)
    assert (op, wop) == (protocol.OP_READ, protocol.OP_WRITE)
    # The read is of the sector that write wrote, and expects its data.
    assert payload == wpayload[: protocol.SECTOR.size]
    assert protocol.expected_payload("vbd", 1, seq) == wpayload[8:]
    # Early reads are of sectors never written: zeros.
    assert protocol.expected_payload("vbd", 1, 2) == bytes(
        devices.SECTOR_BYTES
    )


def test_block_store_file_is_shared_and_sized(tmp_path):
    path = str(tmp_path / "disk")
    a = devices.BlockStore.open(path, 4096)
    b = devices.BlockStore.open(path)
    a.write(3, b"x" * 40)
    assert b.read(3) == b"x" * devices.SECTOR_BYTES
    assert b.sectors == 4096 // devices.SECTOR_BYTES
    with pytest.raises(devices.BackendError, match="holds 4096 bytes"):
        devices.BlockStore.open(path, 8192)
    with pytest.raises(devices.BackendError, match="cannot be opened"):
        devices.BlockStore.open(str(tmp_path / "missing"))
    a.close()
    b.close()


def test_quiesce_then_resume_completes_in_flight():
    rig = Rig("vif")
    rig.frontend.issue(3)
    rig.pump()
    state = rig.backend.quiesce()
    assert [r.id for r in state.inflight] == [0, 1, 2]
    rig.frontend.issue(2)
    rig.pump()
    assert rig.backend.service() == 0  # quiesced: nothing moves
    rig.backend.resume()
    rig.pump()
    rig.backend.service()
    rig.pump()
    assert counters(rig.frontend)["completed"] == 5


def test_reconnect_refuses_inconsistent_state():
    rig = Rig("vif")
    rig.frontend.issue(2)
    rig.pump()
    state = rig.backend.quiesce()
    host = rig.host
    kwargs = dict(xs=host.dom0, grants=host, evtchn=host)
    with pytest.raises(BackendError, match="yet had a ring"):
        Backend.reconnect(dataclasses.replace(state, state=2), **kwargs)
    with pytest.raises(BackendError, match="in flight"):
        Backend.reconnect(dataclasses.replace(state, inflight=()), **kwargs)
    with pytest.raises(BackendError, match="no VbdBackend"):
        backend.VbdBackend.reconnect(state, **kwargs)
    elsewhere = dataclasses.replace(state, backend_path="/local/domain/0/x")
    with pytest.raises(BackendError, match="backend area"):
        backend.validate_backend_state(elsewhere)
    torn = dataclasses.replace(
        state, inflight=(dataclasses.replace(state.inflight[0], request=b""),)
    )
    with pytest.raises(BackendError, match="64-byte entry"):
        backend.validate_backend_state(torn)
    # Nothing was touched by the refusals: no second mapping or binding.
    assert len(host.maps) == 1 and len(host.handlers) == 1


def test_handshake_through_the_simulated_xenstored():
    from nova_xen_ncm.host.sim.xenstore import Xenstore

    xs = Xenstore()
    xs.create_domain_home(DOMID)
    dom0 = devices.XenstoreConnectionClient(xs, xs.connect(0))
    guest = devices.XenstoreConnectionClient(xs, xs.connect(DOMID))
    devices.add_device(dom0, DOMID, DeviceConfig("vif", 0))
    host = Host()
    be = backend.make_backend(
        "vif",
        domid=DOMID,
        devid=0,
        backend_domid=0,
        xs=dom0,
        grants=host,
        evtchn=host,
    )
    be.start()
    fe = Frontend.probe(
        host.ram, STATE_PFN, 0, guest, host, domid=DOMID, kind="vif", devid=0
    )
    by_token = {fe.token: fe, be.token: be}
    for _ in range(20):
        events = dom0.pop_events() + guest.pop_events()
        assert list(devices.dispatch_watch_events(events, by_token)) == []
        while host.pending:
            side, port = host.pending.popleft()
            if side == "dom0":
                host.handlers[port](port)
            else:
                fe.handle_event()
    assert fe.state == be.state == 4
    area = protocol.frontend_area(DOMID, "vif", 0)
    assert guest.read(f"{area}/ring-ref") == str(be.ring_ref).encode()
    # The guest cannot write the backend's area.
    with pytest.raises(XenstoreError):
        guest.write(f"{be.backend_path}/state", b"6")


def pv_state(rig: Rig, backend_state) -> GuestState:
    return GuestState(
        items={Item.PV_DEVICES: (backend_state,)},
        frontends={rig.frontend.key: rig.frontend.observation()},
    )


def pv_verdict(report) -> tuple[bool, str]:
    result = report.results[Item.PV_DEVICES]
    return result.passed, result.reason


def test_checker_passes_a_migration_of_the_devices():
    rig = Rig("vbd")
    rig.run_io(3)
    disk = rig.disk
    paused_obs, state = migrate(rig, store=disk, quiesced=True)
    paused = GuestState(
        items={Item.PV_DEVICES: (state,)},
        frontends={rig.frontend.key: paused_obs},
    )
    # Quiescent until the guest runs: as at pause.
    resumed = pv_state(rig, rig.backend.export())
    rig.backend.resume()
    rig.pump()
    rig.run_io(4)
    later = pv_state(rig, rig.backend.export())
    report = checker.check(paused, resumed, later)
    assert pv_verdict(report) == (True, "")


def forget_two_in_flight(state):
    """What a destination backend that forgot two of the requests in
    flight would reconnect from."""
    req_cons, rsp_prod = state.ring_indices["ring"]
    return dataclasses.replace(
        state,
        inflight=state.inflight[2:],
        ring_indices={"ring": (req_cons, rsp_prod + 2)},
    )


def test_checker_catches_a_backend_that_dropped_in_flight_requests():
    rig = Rig("vif")
    rig.run_io(2)
    paused_obs, state = migrate(
        rig, tamper=forget_two_in_flight, quiesced=True
    )
    paused = GuestState(
        items={Item.PV_DEVICES: (state,)},
        frontends={rig.frontend.key: paused_obs},
    )
    resumed = pv_state(rig, rig.backend.export())
    rig.backend.resume()
    rig.pump()
    rig.run_io(2)
    later = pv_state(rig, rig.backend.export())
    passed, reason = pv_verdict(checker.check(paused, resumed, later))
    assert not passed
    # At resume its ring is not where it was at pause; later the
    # frontend finds its two requests' slots answered with nothing.
    assert "vif/0: ring ring indices (req_cons, rsp_prod) moved" in reason
    assert "2 of the 4 in flight at pause gone" in reason
    assert "vif/0: 2 bad payload responses since pause" in reason


def test_observe_frontend_reads_guest_ram():
    rig = Rig("vbd")
    rig.run_io(2)
    key, obs = frontend.observe_frontend(rig.host.ram, STATE_PFN, 0)
    assert key == "vbd/51712"
    assert obs == rig.frontend.observation()
    assert obs["completed"] == 10
    with pytest.raises(FrontendError):
        frontend.observe_frontend(rig.host.ram, STATE_PFN + 1, 0)


def test_migration_in_the_middle_of_the_handshake():
    rig = Rig("vbd", pump=False)
    # dom0 runs first: the backend reaches InitWait; the guest has not
    # yet seen it when it is paused.
    for path, _ in rig.host.dom0.pop_events():
        rig.backend.handle_watch(path)
    assert rig.backend.state == 2 and rig.frontend.state == 1
    state = rig.backend.quiesce()
    assert (state.state, state.ring_refs, state.ring_indices) == (2, (), {})
    copy_guest(rig)
    rig.backend = Backend.reconnect(
        state,
        xs=rig.host.dom0,
        grants=rig.host,
        evtchn=rig.host,
        store=rig.disk,
    )
    assert rig.host.store.writes == []
    rig.frontend = Frontend.attach(
        rig.host.ram, STATE_PFN, 0, rig.host.guest_xs, rig.host
    )
    rig.pump()
    assert rig.frontend.state == rig.backend.state == 4
    rig.run_io(3)
    c = counters(rig.frontend)
    assert c["sent"] == c["completed"] == 15 and c["bad_payload"] == 0


def test_frontend_state_layout_fits():
    assert frontend.FRONTEND_HEADER_SIZE <= frontend.HISTORY_OFFSET
    assert frontend.HISTORY_OFFSET + 2 * frontend.HISTORY_MAX == (
        frontend.SLOTS_OFFSET
    )
    end = frontend.SLOTS_OFFSET + frontend.NR_SLOTS * frontend.SLOT.size
    assert end <= devices.FRONTEND_STATE_SIZE
    assert frontend._PVT_OFFSET % 4 == 0  # aligned u32 ring indices
    assert protocol.REQUEST.size == protocol.RESPONSE.size == 64


class FlakyXenstore(Client):
    """A guest connection whose first write of event-channel fails."""

    failed = False

    def write(self, path, value):
        if path.endswith("/event-channel") and not self.failed:
            FlakyXenstore.failed = True
            raise XenstoreError("EAGAIN", path)
        super().write(path, value)


def test_a_failed_connect_step_is_retried_without_leaks():
    rig = Rig("vif", pump=False)
    flaky = FlakyXenstore(rig.host.store, DOMID)
    rig.host.store.watches = [
        (flaky if c is rig.host.guest_xs else c, p, t)
        for c, p, t in rig.host.store.watches
    ]
    flaky.events.extend(rig.host.guest_xs.events)
    rig.host.guest_xs = flaky
    rig.frontend = Frontend.attach(rig.host.ram, STATE_PFN, 0, flaky, rig.host)
    with pytest.raises(XenstoreError):
        rig.pump()
    assert rig.frontend.state == 1
    rig.frontend.handle_watch()  # the next watch event retries
    rig.pump()
    assert rig.frontend.state == rig.backend.state == 4
    assert rig.host.next_pfn == FIRST_FREE_PFN + 1  # one ring page
    assert len(rig.host.grants) == 1 and len(rig.host.ports) == 1
    rig.run_io(2)
    assert counters(rig.frontend)["completed"] == 10


def test_a_backend_closes_the_disk_it_made_not_one_it_was_given():
    host = Host()
    devices.add_device(host.dom0, DOMID, DeviceConfig("vbd", 51712))
    given = BlockStore()

    def vbd(**extra):
        return backend.VbdBackend(
            domid=DOMID,
            devid=51712,
            backend_domid=0,
            xs=host.dom0,
            grants=host,
            evtchn=host,
            **extra,
        )

    own = vbd()
    own.close()
    # Its anonymous file is closed with it.
    assert own.store._fd == -1
    shared = vbd(store=given)
    shared.close()
    assert given._fd >= 0
    given.close()


def test_an_early_read_accepts_what_a_kept_disk_holds():
    # A read of a sector this boot has not written finds an earlier
    # boot's data on a disk kept across a reboot; later reads must find
    # this boot's writes.
    early = 2
    assert not protocol.written_by(early)
    old = b"\x5a" * devices.SECTOR_BYTES
    assert protocol._payload_ok("vbd", 1, early, old)
    assert not protocol._payload_ok("vbd", 1, early, old[:-1])
    late = 2 + 2 * protocol.READ_LAG
    assert protocol.written_by(late)
    assert not protocol._payload_ok("vbd", 1, late, old)
    good = protocol.expected_payload("vbd", 1, late)
    assert protocol._payload_ok("vbd", 1, late, good)


def _paused_mid_handshake_with_ring_published():
    """A vbd whose frontend published ring-ref and event-channel while
    the backend, at InitWait, had not yet seen it: paused there."""
    rig = Rig("vbd", pump=False)
    for path, _ in rig.host.dom0.pop_events():
        rig.backend.handle_watch(path)
    for path, token in rig.host.guest_xs.pop_events():
        if token == rig.frontend.token:
            rig.frontend.handle_watch(path)
    front = f"/local/domain/{DOMID}/device/vbd/{rig.devid}"
    assert rig.host.store.nodes.get(f"{front}/ring-ref") is not None
    assert rig.backend.state == 2
    state = rig.backend.quiesce()
    assert state.ring_refs == ()
    copy_guest(rig)
    return rig, state, front


def test_reconnect_checks_a_published_ring_at_import_and_connects_later():
    rig, state, front = _paused_mid_handshake_with_ring_published()
    port = int(rig.host.store.nodes[f"{front}/event-channel"])
    bound_before = list(rig.host.ports[port])
    rig.backend = Backend.reconnect(
        state,
        xs=rig.host.dom0,
        grants=rig.host,
        evtchn=rig.host,
        quiesced=True,
        store=rig.disk,
    )
    # Mapped at import to check it and let go again: until the commit
    # the guest sees what the source paused (no map held, its port not
    # bound), still at InitWait, nothing written.
    assert rig.backend.ring is None and rig.backend.state == 2
    assert rig.host.maps == {}
    assert rig.host.ports[port] == bound_before
    assert rig.host.store.writes == []
    rig.frontend = Frontend.attach(
        rig.host.ram, STATE_PFN, 0, rig.host.guest_xs, rig.host
    )
    rig.backend.resume()
    rig.pump()
    assert rig.frontend.state == rig.backend.state == 4
    # Mapped and bound once the handshake went on.
    assert len(rig.host.maps) == 1
    rig.run_io(3)
    c = counters(rig.frontend)
    assert c["completed"] > 0 and c["bad_payload"] == 0


def _reconnect_quiesced(rig, state):
    return Backend.reconnect(
        state,
        xs=rig.host.dom0,
        grants=rig.host,
        evtchn=rig.host,
        quiesced=True,
        store=rig.disk,
    )


def test_reconnect_of_a_published_ring_granted_read_only_fails():
    # The handshake maps the ring writable after the commit: a grant that
    # refuses that must fail the import, before the commit.
    rig, state, front = _paused_mid_handshake_with_ring_published()
    ref = int(rig.host.store.nodes[f"{front}/ring-ref"])
    rig.host.readonly_grants.add(ref)
    with pytest.raises(PermissionError, match="read-only"):
        _reconnect_quiesced(rig, state)
    assert rig.host.maps == {}


def test_reconnect_of_a_published_port_that_cannot_be_bound_fails():
    # The handshake binds the published port after the commit: a port
    # not unbound for dom0 must fail the import, before the commit.
    rig, state, front = _paused_mid_handshake_with_ring_published()
    port = int(rig.host.store.nodes[f"{front}/event-channel"])
    rig.host.ports[port][0] = 7
    with pytest.raises(ValueError, match=f"port {port} is not unbound"):
        _reconnect_quiesced(rig, state)
    del rig.host.ports[port]
    with pytest.raises(ValueError, match=f"port {port} is not unbound"):
        _reconnect_quiesced(rig, state)
    assert rig.host.maps == {}


def test_reconnect_of_a_published_ring_that_cannot_be_mapped_fails():
    rig, state, front = _paused_mid_handshake_with_ring_published()
    ref = int(rig.host.store.nodes[f"{front}/ring-ref"])
    del rig.host.grants[ref]
    with pytest.raises(KeyError):
        Backend.reconnect(
            state,
            xs=rig.host.dom0,
            grants=rig.host,
            evtchn=rig.host,
            quiesced=True,
            store=rig.disk,
        )
