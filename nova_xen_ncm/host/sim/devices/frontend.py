"""The PV frontend, in the guest: all its state in guest RAM (package
docstring: :mod:`nova_xen_ncm.host.sim.devices`)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Collection
from collections.abc import Iterator

from nova_xen_ncm.host.sim.devices.protocol import ENTRY_SIZE
from nova_xen_ncm.host.sim.devices.protocol import KIND_NAMES
from nova_xen_ncm.host.sim.devices.protocol import KINDS
from nova_xen_ncm.host.sim.devices.protocol import RING_ENTRIES
from nova_xen_ncm.host.sim.devices.protocol import RSP_OKAY
from nova_xen_ncm.host.sim.devices.protocol import GuestOps
from nova_xen_ncm.host.sim.devices.protocol import GuestRam
from nova_xen_ncm.host.sim.devices.protocol import XenbusClient
from nova_xen_ncm.host.sim.devices.protocol import XenbusState
from nova_xen_ncm.host.sim.devices.protocol import _payload_ok
from nova_xen_ncm.host.sim.devices.protocol import _read_int
from nova_xen_ncm.host.sim.devices.protocol import decode_response
from nova_xen_ncm.host.sim.devices.protocol import device_key
from nova_xen_ncm.host.sim.devices.protocol import encode_request
from nova_xen_ncm.host.sim.devices.protocol import frontend_area
from nova_xen_ncm.host.sim.devices.protocol import schedule
from nova_xen_ncm.host.sim.devices.protocol import written_by
from nova_xen_ncm.host.sim.ring import FrontRing

# -- the frontend ---------------------------------------------------------

FRONTEND_MAGIC = b"NCMPVFE1"
FRONTEND_FIELDS = (
    ("magic", "8s"),
    ("kind", "B"),
    ("state", "B"),
    ("backend_state", "B"),
    ("connected", "B"),
    ("devid", "I"),
    ("backend_id", "H"),
    ("history_len", "H"),
    ("ring_ref", "I"),
    ("port", "I"),
    ("ring_pfn", "Q"),
    # FrontRing's private indices: req_prod_pvt, rsp_cons.
    ("req_prod_pvt", "I"),
    ("rsp_cons", "I"),
    ("next_seq", "Q"),
    ("last_rsp_seq", "Q"),
    ("sent", "Q"),
    ("completed", "Q"),
    ("lost", "Q"),
    ("duplicated", "Q"),
    ("reordered", "Q"),
    ("bad_payload", "Q"),
    ("backend_path", "96s"),
    ("area_path", "64s"),
    # vbd: the latest write request whose data a read found intact.
    ("verified_write", "Q"),
)
_FE_OFFSETS: dict[str, tuple[int, struct.Struct]] = {}
_off = 0
for _name, _fmt in FRONTEND_FIELDS:
    _FE_OFFSETS[_name] = (_off, struct.Struct("<" + _fmt))
    _off += struct.calcsize("<" + _fmt)
FRONTEND_HEADER_SIZE = _off
del _off, _name, _fmt

# History: (who, state) byte pairs; who 0 the frontend set it, 1 the
# backend's state was seen.
HISTORY_OFFSET = 320
HISTORY_MAX = 64
WHO = ("frontend", "backend")
# Request slots, indexed by request id: seq, flags.
SLOTS_OFFSET = HISTORY_OFFSET + 2 * HISTORY_MAX
SLOT = struct.Struct("<QI4x")
NR_SLOTS = 2 * RING_ENTRIES
SLOT_FREE = 0
SLOT_OUTSTANDING = 1
SLOT_LOST = 2
FRONTEND_STATE_SIZE = 2048
_PVT_OFFSET = _FE_OFFSETS["req_prod_pvt"][0]

COUNTERS = (
    "next_seq",
    "last_rsp_seq",
    "sent",
    "completed",
    "lost",
    "duplicated",
    "reordered",
    "bad_payload",
)


class FrontendError(Exception):
    """The frontend's RAM holds no frontend, or the device is unusable."""


class Frontend:
    """A PV frontend (netfront/blkfront) running in the guest.

    Driven by the guest kernel: :meth:`handle_watch` on a watch event of
    its token, :meth:`handle_event` when its port fired, :meth:`issue` to
    send I/O. The object holds only references to its environment;
    everything else is read from and written to guest RAM.
    """

    def __init__(
        self,
        ram: GuestRam,
        state_pfn: int,
        state_offset: int,
        xs: XenbusClient | None,
        ops: GuestOps | None,
    ) -> None:
        room = len(ram.page(state_pfn)) - FRONTEND_STATE_SIZE
        if not 0 <= state_offset <= room:
            raise ValueError(
                f"frontend state at offset {state_offset} does not fit "
                f"in a page"
            )
        self._ram = ram
        self._pfn = state_pfn
        self._xs = xs
        self._ops = ops
        page = ram.page(state_pfn, writable=True)
        self._mem = page[state_offset : state_offset + FRONTEND_STATE_SIZE]
        self._ring: FrontRing | None = None

    # -- life cycle --

    @classmethod
    def probe(
        cls,
        ram: GuestRam,
        state_pfn: int,
        state_offset: int,
        xs: XenbusClient,
        ops: GuestOps,
        *,
        domid: int,
        kind: str,
        devid: int,
        registered: Collection[tuple[str, str]] = (),
    ) -> Frontend:
        """Boot: the driver finds its device area, records the states it
        finds and watches the backend's state (the watch fires once at
        once, which drives the handshake).

        A guest restarted from its RAM in the middle of its boot probe
        (a migration paused it there) goes on from where it stood: a
        frontend RAM already holds for this device is kept, and a watch
        in ``registered`` (the (path, token) pairs the guest's xenbus
        client has in RAM) is not registered again; xenstored would
        refuse it with EEXIST."""
        if kind not in KINDS:
            raise ValueError(f"unknown device kind {kind!r}")
        fe = cls(ram, state_pfn, state_offset, xs, ops)
        if not (
            fe._get("magic") == FRONTEND_MAGIC
            and fe._get("kind") == KINDS[kind]
            and fe._get("devid") == devid
        ):
            area = frontend_area(domid, kind, devid)
            backend = xs.read(f"{area}/backend").rstrip(b"\0")
            backend_id = _read_int(xs, f"{area}/backend-id")
            own = _read_int(xs, f"{area}/state")
            if (
                backend_id is None
                or own is None
                or len(backend) > 96
                or len(area) > 64
            ):
                raise FrontendError(f"device area {area} is incomplete")
            with fe._writing():
                fe._mem[:] = bytes(FRONTEND_STATE_SIZE)
                fe._set("magic", FRONTEND_MAGIC)
                fe._set("kind", KINDS[kind])
                fe._set("devid", devid)
                fe._set("backend_id", backend_id)
                fe._set("backend_path", backend)
                fe._set("area_path", area.encode())
                fe._set("state", own)
                fe._set("next_seq", 1)
                fe._record(0, own)
        path = fe.backend_path + "/state"
        if (path, fe.token) not in registered:
            xs.watch(path, fe.token)
        return fe

    @classmethod
    def attach(
        cls,
        ram: GuestRam,
        state_pfn: int,
        state_offset: int,
        xs: XenbusClient | None = None,
        ops: GuestOps | None = None,
    ) -> Frontend:
        """A new driver object over an existing frontend's RAM (the guest
        restarted from its RAM): nothing is re-registered or rewritten.
        Without ``xs`` and ``ops`` it can only be observed."""
        fe = cls(ram, state_pfn, state_offset, xs, ops)
        if fe._get("magic") != FRONTEND_MAGIC:
            raise FrontendError(
                f"no frontend state at pfn {state_pfn:#x}+{state_offset}"
            )
        if fe._get("kind") not in KIND_NAMES:
            raise FrontendError("frontend state names no device kind")
        return fe

    # -- RAM fields --

    def _get(self, name: str) -> object:
        off, st = _FE_OFFSETS[name]
        (value,) = st.unpack_from(self._mem, off)
        return value

    def _set(self, name: str, value: object) -> None:
        off, st = _FE_OFFSETS[name]
        st.pack_into(self._mem, off, value)

    def _add(self, name: str, delta: int) -> None:
        self._set(name, self._get(name) + delta)

    def _slot(self, id: int) -> tuple[int, int]:
        return SLOT.unpack_from(self._mem, SLOTS_OFFSET + id * SLOT.size)

    def _set_slot(self, id: int, seq: int, flags: int) -> None:
        SLOT.pack_into(self._mem, SLOTS_OFFSET + id * SLOT.size, seq, flags)

    def _record(self, who: int, state: int) -> None:
        n = self._get("history_len")
        if n >= HISTORY_MAX:
            # Keep the latest change visible: the last entry is replaced.
            n = HISTORY_MAX - 1
        off = HISTORY_OFFSET + 2 * n
        self._mem[off : off + 2] = bytes((who, state))
        self._set("history_len", n + 1)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the RAM lock while the state and ring pages change."""
        with self._ram.lock():
            yield

    def _front_ring(self) -> FrontRing | None:
        if self._ring is None and self._get("ring_pfn"):
            page = self._ram.page(self._get("ring_pfn"), writable=True)
            pvt = self._mem[_PVT_OFFSET : _PVT_OFFSET + 8]
            self._ring = FrontRing.attach(page, ENTRY_SIZE, pvt)
        return self._ring

    # -- what it is --

    @property
    def kind(self) -> str:
        return KIND_NAMES[self._get("kind")]

    @property
    def devid(self) -> int:
        return self._get("devid")

    @property
    def key(self) -> str:
        return device_key(self.kind, self.devid)

    @property
    def token(self) -> str:
        """The token of its watch on the backend's state."""
        return f"fe:{self.key}"

    @property
    def backend_path(self) -> str:
        return self._get("backend_path").rstrip(b"\0").decode()

    @property
    def state(self) -> int:
        return self._get("state")

    @property
    def port(self) -> int:
        return self._get("port")

    @property
    def connected(self) -> bool:
        return bool(self._get("connected"))

    def history(self) -> tuple[tuple[str, int], ...]:
        n = self._get("history_len")
        raw = bytes(self._mem[HISTORY_OFFSET : HISTORY_OFFSET + 2 * n])
        return tuple((WHO[raw[i]], raw[i + 1]) for i in range(0, len(raw), 2))

    def outstanding(self) -> tuple[int, ...]:
        """Sequence numbers sent and not answered (lost ones included)."""
        seqs = []
        for id in range(NR_SLOTS):
            seq, flags = self._slot(id)
            if flags != SLOT_FREE:
                seqs.append(seq)
        return tuple(sorted(seqs))

    def observation(self) -> dict[str, object]:
        """What GuestState.frontends holds for this device (checker.py)."""
        out: dict[str, object] = {name: self._get(name) for name in COUNTERS}
        out["states"] = self.history()
        if self.kind == "vbd":
            out["verified_write"] = self._get("verified_write")
        out["outstanding"] = self.outstanding()
        out["state"] = self.state
        out["port"] = self.port
        out["ring_ref"] = self._get("ring_ref")
        return out

    # -- xenbus --

    def _switch_state(self, state: XenbusState) -> None:
        self._xs.write(f"{self._area_path()}/state", str(int(state)).encode())
        with self._writing():
            self._set("state", int(state))
            self._record(0, int(state))

    def _area_path(self) -> str:
        return self._get("area_path").rstrip(b"\0").decode()

    def handle_watch(self, path: str | None = None) -> None:
        """The backend's state node changed (or the watch fired on
        registration): record it and take the handshake a step on."""
        seen = _read_int(self._xs, self.backend_path + "/state")
        if seen is None:
            return
        with self._writing():
            if seen != self._get("backend_state"):
                self._set("backend_state", seen)
                self._record(1, seen)
        own = self.state
        if seen == XenbusState.INIT_WAIT and own == XenbusState.INITIALISING:
            self._connect()
        elif seen == XenbusState.CONNECTED and own == XenbusState.INITIALISED:
            # blkfront's blkfront_connect(), on the backend's Connected.
            self._switch_state(XenbusState.CONNECTED)
            with self._writing():
                self._set("connected", 1)
        elif seen == XenbusState.CONNECTED and own == XenbusState.CONNECTED:
            with self._writing():
                self._set("connected", 1)
        elif seen in (XenbusState.CLOSING, XenbusState.CLOSED):
            if own != XenbusState.CLOSED:
                with self._writing():
                    self._set("connected", 0)
                self._switch_state(XenbusState.CLOSED)

    def _connect(self) -> None:
        """netfront's talk_to_netback (blkfront's talk_to_blkback): ring
        page, grant, port, then the details and Connected (Initialised)
        in the frontend area. Each step is recorded
        in RAM as it is taken, so a step that failed is retried on the
        next watch event without leaking what came before."""
        backend_id = self._get("backend_id")
        pfn = self._get("ring_pfn")
        if not pfn:
            pfn = self._ops.alloc_page()
            with self._writing():
                page = self._ram.page(pfn, writable=True)
                page[:] = bytes(len(page))
                pvt = self._mem[_PVT_OFFSET : _PVT_OFFSET + 8]
                self._ring = FrontRing.init(page, ENTRY_SIZE, pvt)
                self._set("ring_pfn", pfn)
                for id in range(NR_SLOTS):
                    self._set_slot(id, 0, SLOT_FREE)
        # Grant references below GNTTAB_NR_RESERVED_ENTRIES and port 0
        # are never handed out, so 0 means "not yet".
        ref = self._get("ring_ref")
        if not ref:
            ref = self._ops.grant_access(backend_id, pfn, readonly=False)
            with self._writing():
                self._set("ring_ref", ref)
        port = self._get("port")
        if not port:
            port = self._ops.evtchn_alloc_unbound(backend_id)
            with self._writing():
                self._set("port", port)
        area = self._area_path()
        self._xs.write(f"{area}/ring-ref", str(ref).encode())
        self._xs.write(f"{area}/event-channel", str(port).encode())
        # blkfront's talk_to_blkback() says Initialised and waits for
        # the backend's Connected; netfront says Connected at once.
        self._switch_state(
            XenbusState.INITIALISED
            if self.kind == "vbd"
            else XenbusState.CONNECTED
        )

    # -- I/O --

    def issue(self, count: int = 1) -> int:
        """Put up to ``count`` requests on the ring (fewer if it is
        full); notify the backend if it asked for it."""
        ring = self._front_ring()
        if ring is None or not self.connected or count <= 0:
            return 0
        kind, devid = self.kind, self.devid
        sent = 0
        with self._writing():
            free = [
                id for id in range(NR_SLOTS) if self._slot(id)[1] == SLOT_FREE
            ]
            while sent < count and free and not ring.full():
                seq = self._get("next_seq")
                id = free.pop(0)
                op, payload = schedule(kind, devid, seq)
                ring.put_request(encode_request(seq, id, op, payload))
                self._set_slot(id, seq, SLOT_OUTSTANDING)
                self._set("next_seq", seq + 1)
                self._add("sent", 1)
                sent += 1
            notify = ring.push_requests() if sent else False
        if notify:
            self._ops.evtchn_send(self.port)
        return sent

    def handle_event(self) -> int:
        """Consume the responses on the ring (RING_FINAL_CHECK loop);
        returns how many."""
        ring = self._front_ring()
        if ring is None:
            return 0
        done = 0
        with self._writing():
            while True:
                while ring.unconsumed_responses():
                    self._account(ring.get_response())
                    done += 1
                if not ring.final_check_for_responses():
                    break
        return done

    def _account(self, entry: bytes) -> None:
        seq, id, status, payload = decode_response(entry)
        if id >= NR_SLOTS:
            self._add("duplicated", 1)
            return
        slot_seq, flags = self._slot(id)
        if flags == SLOT_FREE or slot_seq != seq:
            # Nothing outstanding under that id and seq: answered before.
            self._add("duplicated", 1)
            return
        if flags == SLOT_LOST:
            self._add("lost", -1)
            self._add("reordered", 1)
        for other in range(NR_SLOTS):
            other_seq, other_flags = self._slot(other)
            if other_flags == SLOT_OUTSTANDING and other_seq < seq:
                self._set_slot(other, other_seq, SLOT_LOST)
                self._add("lost", 1)
        if status != RSP_OKAY or not _payload_ok(
            self.kind, self.devid, seq, payload
        ):
            self._add("bad_payload", 1)
        elif self.kind == "vbd" and not seq % 2:
            write = written_by(seq)
            if write > self._get("verified_write"):
                self._set("verified_write", write)
        self._set_slot(id, 0, SLOT_FREE)
        self._add("completed", 1)
        if seq > self._get("last_rsp_seq"):
            self._set("last_rsp_seq", seq)


def observe_frontend(
    ram: GuestRam, state_pfn: int, state_offset: int
) -> tuple[str, dict[str, object]]:
    """(device key, :meth:`Frontend.observation`) of the frontend whose
    state is at ``state_pfn``/``state_offset``, read from guest RAM under
    the RAM lock (so never half-updated): how the host fills
    GuestState.frontends without asking the guest."""
    with ram.lock():
        fe = Frontend.attach(ram, state_pfn, state_offset)
        return fe.key, fe.observation()
