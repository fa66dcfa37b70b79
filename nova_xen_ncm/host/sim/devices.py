"""PV devices of the simulated host: frontends in the guest, backends in
dom0, connected through xenbus and a shared ring in guest memory.

Modelled on ``xen/include/public/io/netif.h`` and ``blkif.h``, kept to
what a migration has to carry:

* one ring per device (``io/ring.h``, :mod:`.ring`) of 64-byte entries;
  a request is (seq, id, op, payload), a response (seq, id, status,
  payload); the backend answers with the request's id and seq;
* a ``vbd`` backend serves WRITE and READ of 32-byte sectors from a
  :class:`BlockStore`, a file (shared storage: the source's and the
  destination's backend of one disk open the same file); a ``vif``
  backend delivers every packet on a loopback network and answers with
  a receipt (a digest of the packet);
* the xenbus handshake of ``io/xenbus.h`` (Initialising 1, InitWait 2,
  Initialised 3, Connected 4, Closing 5, Closed 6), the frontend writing
  ``ring-ref`` and ``event-channel`` into its area as netfront does.

The frontend keeps every bit of its state in guest RAM, in a
``FRONTEND_STATE_SIZE`` struct (``FRONTEND_FIELDS``, then the state
history, then the request slots) at a place the guest kernel gives it: its
own and the backend's xenbus state, the ring's page, grant reference,
port and private indices, the next sequence number, the last response
sequence seen, and counters of responses completed, lost, duplicated,
reordered and carrying a bad payload. Every state it set or saw is
appended to the history, so a checker can prove it saw no change across a
migration. A new frontend object over the same RAM (:meth:`Frontend.
attach`) continues where the old one stopped.

Loss, duplication and reordering: the backend answers in ring order, so
requests complete in sequence order. A response that overtakes an
outstanding request marks that request lost; if its response comes later
after all, it counts as reordered instead. A response to a request that is
not outstanding (already answered) is a duplicate.

The backend keeps its private ring indices and the requests it has taken
off the ring but not answered ("in flight", the disk still working) in
dom0. :meth:`Backend.quiesce` stops it and exports them as a
:class:`~nova_xen_ncm.host.base.BackendState` (``ring_indices["ring"] =
(req_cons, rsp_prod_pvt)``, ``ring_refs = (ring grant ref,)``,
``event_channels = (the frontend's port,)``); :meth:`Backend.reconnect`
on the destination maps the same grant reference, binds the same
frontend port, continues from the same indices and answers the in-flight
requests, without writing any xenstore node (a device caught in its
handshake takes the handshake up where it stood).
:func:`validate_backend_state` checks a BackendState without touching
anything, and :func:`observe_frontend` reads a frontend's record from
guest RAM for GuestState.frontends (``nova_xen_ncm.host.checker``).

What the devices need from the host is spelt out as Protocols:
:class:`GuestRam`, :class:`GuestOps` and :class:`XenbusClient` for a
frontend; :class:`GrantMapper`, :class:`Dom0Evtchn` and
:class:`XenbusClient` for a backend; :class:`XenstoreAdmin` for the
toolstack's :func:`add_device`. ``SimHost`` and ``GuestMemory`` satisfy
:class:`GrantMapper`, :class:`Dom0Evtchn` and :class:`GuestRam` as they
are; :class:`XenstoreConnectionClient` turns an in-process connection of
the simulated xenstored into a :class:`XenstoreAdmin`.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from nova_xen_ncm.host.base import BackendState
from nova_xen_ncm.host.base import DeviceConfig
from nova_xen_ncm.host.base import InflightRequest
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.ring import BackRing
from nova_xen_ncm.host.sim.ring import FrontRing
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsType


class XenbusState(enum.IntEnum):
    """enum xenbus_state of io/xenbus.h."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


# -- what the devices need from the host ----------------------------------


class XenbusClient(Protocol):
    """A xenstore connection: the guest's xenbus client, or dom0's.

    ``read`` raises :class:`~.xs_wire.XenstoreError` (ENOENT) for a
    missing node. Watch events are handed to the device by whoever owns
    the connection (``handle_watch``).
    """

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, value: bytes) -> None: ...

    def watch(self, path: str, token: str) -> None: ...

    def unwatch(self, path: str, token: str) -> None: ...


class XenstoreAdmin(XenbusClient, Protocol):
    """dom0's connection as the toolstack uses it."""

    def set_perms(
        self, path: str, perms: tuple[tuple[str, int], ...]
    ) -> None: ...


class GuestRam(Protocol):
    """The guest's own memory, from inside the guest (``GuestMemory``).

    Writes happen under :meth:`lock` (ordered with the hypervisor's
    writes of event state); the hypervisor finds them by itself
    (memory.WriteTracker), the guest marks nothing.
    """

    def page(self, pfn: int, writable: bool = False) -> memoryview: ...

    def lock(self) -> AbstractContextManager[None]: ...


class GuestOps(Protocol):
    """What a frontend asks of the guest kernel and of Xen.

    ``alloc_page`` gives a RAM page to the driver for good (its ring);
    ``grant_access`` writes a GTF_permit_access entry for ``gfn`` to
    ``domid`` in a free grant reference and returns it (grant_table.h);
    ``evtchn_alloc_unbound`` and ``evtchn_send`` are the EVTCHNOP_
    hypercalls of event_channel.h. None of them may be called with the
    RAM lock held.
    """

    def alloc_page(self) -> int: ...

    def grant_access(self, domid: int, gfn: int, readonly: bool) -> int: ...

    def evtchn_alloc_unbound(self, remote_domid: int) -> int: ...

    def evtchn_send(self, port: int) -> None: ...


class GrantMapper(Protocol):
    """GNTTABOP_map_grant_ref / unmap_grant_ref for dom0 (``SimHost``).

    The page a writable map returns is the guest's page itself; the host
    counts it dirty at every log-dirty harvest while it is mapped.
    """

    def grant_map(
        self, domid: int, ref: int, readonly: bool = False
    ) -> tuple[int, memoryview]: ...

    def grant_unmap(self, handle: int) -> None: ...


class Dom0Evtchn(Protocol):
    """dom0's event channels (``SimHost``): bind to a guest's port with a
    handler run on every notification, send, close."""

    def dom0_bind_interdomain(
        self, domid: int, port: int, handler: Callable[[int], None]
    ) -> int: ...

    def dom0_notify(self, port: int) -> None: ...

    def dom0_close(self, port: int) -> None: ...


# -- ring entries ---------------------------------------------------------

ENTRY_SIZE = 64
PAYLOAD_SIZE = 48
# seq, id, op, payload length, payload.
REQUEST = struct.Struct("<QIHH48s")
# seq, id, status, payload length, payload.
RESPONSE = struct.Struct("<QIhH48s")
RING_ENTRIES = ringmod.ring_entries(ENTRY_SIZE)
RING_NAME = "ring"

# Operations: blkif.h BLKIF_OP_READ / BLKIF_OP_WRITE; a vif has one.
OP_READ = 0
OP_WRITE = 1
OP_PACKET = 0
# Statuses: BLKIF_RSP_OKAY / BLKIF_RSP_ERROR / NETIF_RSP_DROPPED.
RSP_OKAY = 0
RSP_ERROR = -1

SECTOR_BYTES = 32
SECTOR = struct.Struct("<Q")
DEFAULT_SECTORS = 64

KINDS = {"vif": 1, "vbd": 2}
KIND_NAMES = {v: k for k, v in KINDS.items()}


def _digest(*parts: object) -> bytes:
    text = ":".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=SECTOR_BYTES).digest()


# A vbd's read checks the sector written READ_LAG writes (2 * READ_LAG
# requests) earlier, so that a read after a pause checks data written
# before it: a disk that is not the same one on both sides is found.
READ_LAG = DEFAULT_SECTORS // 2


def schedule(kind: str, devid: int, seq: int) -> tuple[int, bytes]:
    """The request the frontend sends as ``seq`` (1, 2, ...): a vif sends
    a packet; a vbd writes a sector (odd seq) and reads (even seq) the
    sector it wrote READ_LAG writes earlier."""
    if kind == "vif":
        return OP_PACKET, _digest("pkt", devid, seq)
    if seq % 2:
        sector = (seq - 1) // 2 % DEFAULT_SECTORS
        return OP_WRITE, SECTOR.pack(sector) + _digest("blk", devid, seq)
    sector = ((seq - 2) // 2 - READ_LAG) % DEFAULT_SECTORS
    return OP_READ, SECTOR.pack(sector)


def written_by(seq: int) -> int:
    """The write request whose data the vbd read ``seq`` (even) reads:
    0 for none (the sector was never written)."""
    write = seq - 1 - 2 * READ_LAG
    return max(write, 0)


def receipt(packet: bytes) -> bytes:
    """What a vif backend answers for a packet it delivered: a digest of
    it, so that a response slot still holding its request (requests and
    responses share slots) never passes for an answer."""
    return hashlib.blake2b(b"rx" + packet, digest_size=SECTOR_BYTES).digest()


def expected_payload(kind: str, devid: int, seq: int) -> bytes:
    """What a correct backend answers to request ``seq``."""
    if kind == "vif":
        return receipt(_digest("pkt", devid, seq))
    if seq % 2:
        return b""
    write = written_by(seq)
    if not write:
        return bytes(SECTOR_BYTES)
    return _digest("blk", devid, write)


def _payload_ok(kind: str, devid: int, seq: int, payload: bytes) -> bool:
    """Whether ``payload`` answers request ``seq``. A read of a sector
    not written since this boot finds what the disk held (zeros on a new
    disk, an earlier boot's data after a reboot): any whole sector."""
    if kind == "vbd" and not seq % 2 and not written_by(seq):
        return len(payload) == SECTOR_BYTES
    return payload == expected_payload(kind, devid, seq)


def encode_request(seq: int, id: int, op: int, payload: bytes) -> bytes:
    return REQUEST.pack(seq, id, op, len(payload), payload)


def decode_request(entry: bytes) -> tuple[int, int, int, bytes]:
    seq, id, op, length, payload = REQUEST.unpack(entry[:ENTRY_SIZE])
    return seq, id, op, payload[: min(length, PAYLOAD_SIZE)]


def encode_response(seq: int, id: int, status: int, payload: bytes) -> bytes:
    return RESPONSE.pack(seq, id, status, len(payload), payload)


def decode_response(entry: bytes) -> tuple[int, int, int, bytes]:
    seq, id, status, length, payload = RESPONSE.unpack(entry[:ENTRY_SIZE])
    return seq, id, status, payload[: min(length, PAYLOAD_SIZE)]


# -- xenstore paths -------------------------------------------------------


def frontend_area(domid: int, kind: str, devid: int) -> str:
    return f"/local/domain/{domid}/device/{kind}/{devid}"


def backend_area(backend_domid: int, domid: int, kind: str, devid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{domid}/{devid}"


def parse_frontend_area(path: str) -> tuple[int, str, int]:
    """/local/domain/<domid>/device/<kind>/<devid> -> the three."""
    parts = path.strip("/").split("/")
    if (
        len(parts) != 6
        or parts[:2] != ["local", "domain"]
        or parts[3] != "device"
        or parts[4] not in KINDS
        or not parts[2].isdigit()
        or not parts[5].isdigit()
    ):
        raise ValueError(f"{path!r} is not a frontend device area")
    return int(parts[2]), parts[4], int(parts[5])


def disk_sectors(config: DeviceConfig) -> int:
    """The sectors of a vbd's disk: ``disk_bytes`` of it, or the default
    disk's."""
    if config.disk_bytes is None:
        return DEFAULT_SECTORS
    return config.disk_bytes // SECTOR_BYTES


def device_key(kind: str, devid: int) -> str:
    """The name of a device in GuestState.frontends: ``vbd/51712``."""
    return f"{kind}/{devid}"


def add_device(xs: XenstoreAdmin, domid: int, config: DeviceConfig) -> None:
    """What libxl's device_add writes: the frontend area owned by the
    guest and readable by the backend domain, the backend area owned by
    the backend domain and readable by the guest, both Initialising."""
    fe = frontend_area(domid, config.kind, config.devid)
    be = backend_area(config.backend_domid, domid, config.kind, config.devid)
    bdom = config.backend_domid
    fe_nodes = {
        "backend": be.encode(),
        "backend-id": str(bdom).encode(),
        "state": b"1",
    }
    be_nodes = {
        "frontend": fe.encode(),
        "frontend-id": str(domid).encode(),
        "online": b"1",
        "state": b"1",
    }
    if config.kind == "vif" and config.mac:
        fe_nodes["mac"] = config.mac.encode()
        be_nodes["mac"] = config.mac.encode()
    if config.kind == "vbd":
        be_nodes["sectors"] = str(disk_sectors(config)).encode()
    for key, value in config.extra.items():
        be_nodes[key] = value.encode()
    for area, nodes, perms in (
        (fe, fe_nodes, (("n", domid), ("r", bdom))),
        (be, be_nodes, (("n", bdom), ("r", domid))),
    ):
        xs.write(area, b"")
        xs.set_perms(area, perms)
        for key, value in nodes.items():
            xs.write(f"{area}/{key}", value)
            xs.set_perms(f"{area}/{key}", perms)


def _read_int(xs: XenbusClient, path: str) -> int | None:
    try:
        text = xs.read(path)
    except XenstoreError as exc:
        if exc.name == "ENOENT":
            return None
        raise
    try:
        return int(text.rstrip(b"\0") or b"0")
    except ValueError:
        return None


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
    ) -> Frontend:
        """Boot: the driver finds its device area, records the states it
        finds and watches the backend's state (the watch fires once at
        once, which drives the handshake)."""
        if kind not in KINDS:
            raise ValueError(f"unknown device kind {kind!r}")
        fe = cls(ram, state_pfn, state_offset, xs, ops)
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
        xs.watch(fe.backend_path + "/state", fe.token)
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


# -- the backend ----------------------------------------------------------


class BlockStore:
    """A disk of ``sectors`` 32-byte sectors in a file: shared storage
    when every host opens the same file (:meth:`open`), private when
    made without one (an anonymous temporary file)."""

    def __init__(
        self, sectors: int = DEFAULT_SECTORS, *, fd: int | None = None
    ) -> None:
        if sectors <= 0:
            raise ValueError(f"a disk of {sectors} sectors")
        self.sectors = sectors
        self.path: str | None = None
        if fd is None:
            fd, name = tempfile.mkstemp(prefix="nova-xen-ncm-disk-")
            os.unlink(name)
            os.ftruncate(fd, sectors * SECTOR_BYTES)
        self._fd = fd

    @classmethod
    def open(cls, path: str, size: int | None = None) -> BlockStore:
        """The disk in file ``path``. With ``size``: created with ``size``
        bytes if it does not exist (a guest's first boot), kept as it is
        if it does (a reboot: a disk outlives its domain), and then it
        must be of ``size`` bytes. Without: it must exist, as on a host
        that takes over a disk from another. A symbolic link is refused."""
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0)
        created = False
        try:
            if size is None:
                fd = os.open(path, flags)
            else:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(path, flags)
        except OSError as exc:
            raise BackendError(
                f"disk {path} cannot be opened: {exc.strerror}"
            ) from None
        try:
            if created:
                os.ftruncate(fd, size)
            have = os.fstat(fd).st_size
            if size is not None and have != size:
                raise BackendError(
                    f"disk {path} holds {have} bytes, the device has {size}"
                )
            if have < SECTOR_BYTES or have % SECTOR_BYTES:
                raise BackendError(
                    f"disk {path} of {have} bytes is not a whole number "
                    f"of {SECTOR_BYTES}-byte sectors"
                )
        except BaseException:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        store = cls(have // SECTOR_BYTES, fd=fd)
        store.path = path
        return store

    def read(self, sector: int) -> bytes:
        return os.pread(self._fd, SECTOR_BYTES, sector * SECTOR_BYTES).ljust(
            SECTOR_BYTES, b"\0"
        )

    def write(self, sector: int, data: bytes) -> None:
        data = bytes(data[:SECTOR_BYTES]).ljust(SECTOR_BYTES, b"\0")
        os.pwrite(self._fd, data, sector * SECTOR_BYTES)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BackendError(Exception):
    """The backend cannot connect or reconnect; the message says why."""


class Backend(abc.ABC):
    """A PV backend (netback/blkback) in dom0, for one frontend.

    Driven by dom0: :meth:`start` once after :func:`add_device`,
    :meth:`handle_watch` on a watch event of :attr:`token`, and
    :meth:`service` on every notification of its port (its handler), and
    :meth:`complete_requests` when its disk is done (dom0's tick): it
    takes requests on events only. :meth:`service` first answers what it
    took earlier and then takes the new requests, which stay in flight
    until answered, as requests wait for a disk.
    """

    kind: str = ""

    def __init__(
        self,
        *,
        domid: int,
        devid: int,
        backend_domid: int,
        xs: XenbusClient,
        grants: GrantMapper,
        evtchn: Dom0Evtchn,
    ) -> None:
        self.domid = domid
        self.devid = devid
        self.backend_domid = backend_domid
        self.frontend_path = frontend_area(domid, self.kind, devid)
        self.backend_path = backend_area(
            backend_domid, domid, self.kind, devid
        )
        self._xs = xs
        self._grants = grants
        self._evtchn = evtchn
        self._lock = threading.RLock()
        self.state = XenbusState.INITIALISING
        self.ring: BackRing | None = None
        self.ring_ref = 0
        self.frontend_port = 0
        self.local_port = 0
        self._handle: int | None = None
        self.inflight: list[bytes] = []
        self.quiesced = False
        self.watching = False

    @property
    def key(self) -> str:
        return device_key(self.kind, self.devid)

    @property
    def token(self) -> str:
        """The token of its watch on the frontend's state."""
        return f"be:{self.domid}:{self.key}"

    # -- kind-specific --

    @abc.abstractmethod
    def details(self) -> Mapping[str, bytes]:
        """Nodes written into the backend area before InitWait."""

    @abc.abstractmethod
    def execute(self, op: int, payload: bytes) -> tuple[int, bytes]:
        """Carry out one request: (status, response payload)."""

    # -- xenbus --

    def start(self) -> None:
        """Watch the frontend's state (fires once at once)."""
        with self._lock:
            if not self.watching:
                self._xs.watch(self.frontend_path + "/state", self.token)
                self.watching = True

    def _set_state(self, state: XenbusState) -> None:
        self._xs.write(f"{self.backend_path}/state", str(int(state)).encode())
        self.state = state

    def handle_watch(self, path: str | None = None) -> None:
        """The frontend's state changed: the backend's half of the
        handshake (xenbus.h; blkback's frontend_changed)."""
        with self._lock:
            if self.quiesced:
                return
            seen = _read_int(self._xs, self.frontend_path + "/state")
            if seen is None:
                return
            if (
                seen == XenbusState.INITIALISING
                and self.state == XenbusState.INITIALISING
            ):
                for key, value in self.details().items():
                    self._xs.write(f"{self.backend_path}/{key}", value)
                self._set_state(XenbusState.INIT_WAIT)
            elif (
                seen in (XenbusState.INITIALISED, XenbusState.CONNECTED)
                and self.state == XenbusState.INIT_WAIT
            ):
                self._connect()
            elif seen == XenbusState.CLOSING and self.state not in (
                XenbusState.CLOSING,
                XenbusState.CLOSED,
            ):
                self._disconnect()
                self._set_state(XenbusState.CLOSING)
            elif (
                seen == XenbusState.CLOSED and self.state != XenbusState.CLOSED
            ):
                self._disconnect()
                self._set_state(XenbusState.CLOSED)

    def _connect(self) -> None:
        ref = _read_int(self._xs, self.frontend_path + "/ring-ref")
        port = _read_int(self._xs, self.frontend_path + "/event-channel")
        if ref is None or port is None:
            raise BackendError(
                f"{self.frontend_path} is Connected without ring-ref and "
                f"event-channel"
            )
        if self.ring is not None and (self.ring_ref, self.frontend_port) != (
            ref,
            port,
        ):
            self._disconnect()
        if self.ring is None:
            self._attach(ref, port, (0, 0))
        self._set_state(XenbusState.CONNECTED)
        self.service()

    def _attach_published(self) -> None:
        """Map and bind the ring and port the frontend published, if it
        did (it is Initialised or Connected): what :meth:`_connect` does
        but the step to Connected."""
        seen = _read_int(self._xs, self.frontend_path + "/state")
        if seen not in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            return
        ref = _read_int(self._xs, self.frontend_path + "/ring-ref")
        port = _read_int(self._xs, self.frontend_path + "/event-channel")
        if ref is not None and port is not None:
            self._attach(ref, port, (0, 0))

    def _attach(self, ref: int, port: int, indices: tuple[int, int]) -> None:
        handle, page = self._grants.grant_map(self.domid, ref)
        try:
            self.ring = BackRing.attach(page, ENTRY_SIZE, indices)
        except ringmod.RingError:
            self._grants.grant_unmap(handle)
            raise
        self._handle = handle
        self.ring_ref = ref
        self.frontend_port = port
        self.local_port = self._evtchn.dom0_bind_interdomain(
            self.domid, port, self._on_event
        )

    def _disconnect(self) -> None:
        if self.local_port:
            self._evtchn.dom0_close(self.local_port)
            self.local_port = 0
        if self._handle is not None:
            self._grants.grant_unmap(self._handle)
            self._handle = None
        self.ring = None
        self.inflight = []

    def close(self) -> None:
        """Let go of the guest (its domain is going): unbind, unmap,
        unwatch; no xenstore node is written."""
        with self._lock:
            self._disconnect()
            if self.watching:
                self._xs.unwatch(self.frontend_path + "/state", self.token)
                self.watching = False

    # -- I/O --

    def _on_event(self, port: int) -> None:
        self.service()

    def take_requests(self) -> int:
        """Take the requests on the ring into flight."""
        with self._lock:
            ring = self.ring
            if ring is None or self.quiesced:
                return 0
            taken = 0
            while True:
                while ring.unconsumed_requests():
                    self.inflight.append(ring.get_request())
                    taken += 1
                if not ring.final_check_for_requests():
                    return taken

    def complete_requests(self) -> int:
        """Answer every request in flight, in order; notify the frontend
        if it asked for it."""
        with self._lock:
            ring = self.ring
            if ring is None or self.quiesced or not self.inflight:
                return 0
            answers = []
            for entry in self.inflight:
                seq, id, op, payload = decode_request(entry)
                status, data = self.execute(op, payload)
                answers.append(encode_response(seq, id, status, data))
            self.inflight = []
            self.put_responses(answers)
            if ring.push_responses():
                self._evtchn.dom0_notify(self.local_port)
            return len(answers)

    def put_responses(self, answers: list[bytes]) -> None:
        """Write the answers on the ring in order."""
        for answer in answers:
            self.ring.put_response(answer)

    def service(self) -> int:
        """Answer what is in flight, then take what is new."""
        with self._lock:
            done = self.complete_requests()
            self.take_requests()
            return done

    # -- migration --

    def quiesce(self) -> BackendState:
        """Stop taking and answering requests (the guest is paused) and
        export the connection with what is in flight."""
        with self._lock:
            self.quiesced = True
            return self.export()

    def resume(self) -> None:
        """Undo :meth:`quiesce` (the migration rolled back, or the guest
        now runs here): answer what is in flight, and take up a
        handshake a watch event found quiesced."""
        with self._lock:
            self.quiesced = False
        self.service()
        if self.ring is None or self.state != XenbusState.CONNECTED:
            self.handle_watch()

    def export(self) -> BackendState:
        with self._lock:
            connected = self.ring is not None
            return BackendState(
                kind=self.kind,
                devid=self.devid,
                backend_domid=self.backend_domid,
                frontend_path=self.frontend_path,
                backend_path=self.backend_path,
                state=int(self.state),
                ring_refs=(self.ring_ref,) if connected else (),
                event_channels=(self.frontend_port,) if connected else (),
                ring_indices=(
                    {RING_NAME: self.ring.indices} if connected else {}
                ),
                inflight=tuple(
                    InflightRequest(RING_NAME, decode_request(e)[1], e)
                    for e in self.inflight
                ),
            )

    @classmethod
    def reconnect(
        cls,
        state: BackendState,
        *,
        xs: XenbusClient,
        grants: GrantMapper,
        evtchn: Dom0Evtchn,
        quiesced: bool = False,
        **kwargs: object,
    ) -> Backend:
        """The destination's backend: take over a device from ``state``
        without the frontend noticing; writes no xenstore node (the
        restored backend area already holds its state).

        A Connected device: map the same grant reference, bind the
        frontend's same port, continue from the same ring indices and
        answer the in-flight requests. A device still in its handshake
        (Initialising, InitWait) or closed: take up the handshake where
        it stood, by watching the frontend's state again. ``quiesced``:
        map and bind, but answer nothing and take no step of the
        handshake until :meth:`resume` (the guest is not ours yet)."""
        validate_backend_state(state)
        backend_cls = BACKENDS[state.kind]
        if cls is not Backend and cls is not backend_cls:
            raise BackendError(
                f"no {cls.__name__} for a {state.kind!r} device"
            )
        if state.state != XenbusState.CONNECTED:
            be = backend_cls._for_state(
                state, xs=xs, grants=grants, evtchn=evtchn, **kwargs
            )
            be.state = XenbusState(state.state)
            be.quiesced = quiesced
            if be.state == XenbusState.INIT_WAIT:
                # The frontend may have published its ring and port
                # already: map and bind them now, so that a ring that
                # cannot be mapped fails the import, not the handshake
                # after the guest runs here.
                with be._lock:
                    be._attach_published()
            be.start()
            return be
        req_cons, rsp_prod_pvt = state.ring_indices[RING_NAME]
        be = backend_cls._for_state(
            state, xs=xs, grants=grants, evtchn=evtchn, **kwargs
        )
        with be._lock:
            be._attach(
                state.ring_refs[0],
                state.event_channels[0],
                (req_cons, rsp_prod_pvt),
            )
            be.state = XenbusState.CONNECTED
            be.inflight = [bytes(r.request) for r in state.inflight]
            be.quiesced = quiesced
            be.complete_requests()
            be.take_requests()
        be.start()
        return be

    @classmethod
    def _for_state(
        cls,
        state: BackendState,
        *,
        xs: XenbusClient,
        grants: GrantMapper,
        evtchn: Dom0Evtchn,
        **kwargs: object,
    ) -> Backend:
        domid, _, devid = parse_frontend_area(state.frontend_path)
        be = cls(
            domid=domid,
            devid=devid,
            backend_domid=state.backend_domid,
            xs=xs,
            grants=grants,
            evtchn=evtchn,
            **kwargs,
        )
        return be


def validate_backend_state(state: BackendState) -> None:
    """Everything :meth:`Backend.reconnect` requires of ``state``,
    checked without touching anything (an import validates first);
    raises :class:`BackendError` naming what is wrong."""
    where = f"{state.kind}/{state.devid}"
    try:
        domid, kind, devid = parse_frontend_area(state.frontend_path)
    except ValueError as exc:
        raise BackendError(f"{where}: {exc}") from None
    if kind not in BACKENDS:
        raise BackendError(f"{where}: no backend for {kind!r} devices")
    if (kind, devid) != (state.kind, state.devid):
        raise BackendError(f"{where}: state names {state.frontend_path}")
    area = backend_area(state.backend_domid, domid, kind, devid)
    if state.backend_path != area:
        raise BackendError(
            f"{where}: backend area {state.backend_path} is not {area}"
        )
    if state.state != XenbusState.CONNECTED:
        if state.state not in (
            XenbusState.INITIALISING,
            XenbusState.INIT_WAIT,
            XenbusState.CLOSING,
            XenbusState.CLOSED,
        ):
            raise BackendError(
                f"{where} was in state {state.state}, which a backend "
                f"never takes"
            )
        if state.ring_refs or state.event_channels or state.inflight:
            raise BackendError(
                f"{where} was in state {state.state} yet had a ring"
            )
        return
    if (
        len(state.ring_refs) != 1
        or len(state.event_channels) != 1
        or set(state.ring_indices) != {RING_NAME}
    ):
        raise BackendError(
            f"{where}: expected one ring {RING_NAME!r} with one grant "
            f"reference and one port"
        )
    for r in state.inflight:
        if r.ring != RING_NAME or len(r.request) != ENTRY_SIZE:
            raise BackendError(
                f"{where}: in-flight request {r.id} is not a "
                f"{ENTRY_SIZE}-byte entry of ring {RING_NAME!r}"
            )
    req_cons, rsp_prod_pvt = state.ring_indices[RING_NAME]
    unanswered = ringmod.idx_diff(req_cons, rsp_prod_pvt)
    if unanswered != len(state.inflight) or unanswered > RING_ENTRIES:
        raise BackendError(
            f"{where}: ring indices {req_cons}/{rsp_prod_pvt} leave "
            f"{unanswered} requests unanswered, {len(state.inflight)} in "
            f"flight"
        )


class VbdBackend(Backend):
    """blkback over a :class:`BlockStore`."""

    kind = "vbd"

    def __init__(
        self, *, store: BlockStore | None = None, **kw: object
    ) -> None:
        super().__init__(**kw)
        # A store made here is this backend's to close; one given is the
        # host's (it may outlive the backend).
        self._own_store = store is None
        self.store = store if store is not None else BlockStore()

    def close(self) -> None:
        super().close()
        if self._own_store:
            self.store.close()

    def details(self) -> Mapping[str, bytes]:
        return {
            "sectors": str(self.store.sectors).encode(),
            "sector-size": str(SECTOR_BYTES).encode(),
            "info": b"0",
            "feature-flush-cache": b"1",
        }

    def execute(self, op: int, payload: bytes) -> tuple[int, bytes]:
        if len(payload) < SECTOR.size:
            return RSP_ERROR, b""
        (sector,) = SECTOR.unpack_from(payload)
        if sector >= self.store.sectors:
            return RSP_ERROR, b""
        if op == OP_WRITE:
            self.store.write(sector, payload[SECTOR.size :])
            return RSP_OKAY, b""
        if op == OP_READ:
            return RSP_OKAY, self.store.read(sector)
        return RSP_ERROR, b""


class VifBackend(Backend):
    """netback on a loopback network: every packet is delivered and
    answered with its receipt."""

    kind = "vif"

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.packets = 0

    def details(self) -> Mapping[str, bytes]:
        return {"feature-rx-copy": b"1", "feature-sg": b"0"}

    def execute(self, op: int, payload: bytes) -> tuple[int, bytes]:
        if op != OP_PACKET:
            return RSP_ERROR, b""
        self.packets += 1
        return RSP_OKAY, receipt(payload)


BACKENDS: dict[str, type[Backend]] = {"vbd": VbdBackend, "vif": VifBackend}


def make_backend(
    kind: str,
    *,
    domid: int,
    devid: int,
    backend_domid: int,
    xs: XenbusClient,
    grants: GrantMapper,
    evtchn: Dom0Evtchn,
    **kwargs: object,
) -> Backend:
    """A new backend of ``kind`` for a freshly added device."""
    if kind not in BACKENDS:
        raise BackendError(f"no backend for device kind {kind!r}")
    return BACKENDS[kind](
        domid=domid,
        devid=devid,
        backend_domid=backend_domid,
        xs=xs,
        grants=grants,
        evtchn=evtchn,
        **kwargs,
    )


# -- dom0's connection to the simulated xenstored ---------------------------


class XenstoreConnectionClient:
    """:class:`XenstoreAdmin` over an in-process connection of the
    simulated xenstored (xenstore.Xenstore.connect()); watch events are
    read with :meth:`pop_events`."""

    def __init__(self, store: object, conn: object) -> None:
        self._store = store
        self._conn = conn
        self._req_id = 0
        self._lock = threading.Lock()

    def _call(
        self, mtype: XsType, *parts: str | bytes, term: bool = True
    ) -> bytes:
        with self._lock:
            self._req_id += 1
            msg = Message(
                mtype,
                self._req_id,
                0,
                xs_wire.join_strings(*parts, terminate=term),
            )
            reply = self._store.handle(self._conn, msg).reply
        err = reply.error()
        if err is not None:
            raise err
        return reply.payload

    def read(self, path: str) -> bytes:
        return self._call(XsType.READ, path)

    def write(self, path: str, value: bytes) -> None:
        self._call(XsType.WRITE, path, value, term=False)

    def set_perms(self, path: str, perms: tuple[tuple[str, int], ...]) -> None:
        bits = xs_wire.bit_perms(perms)
        self._call(
            XsType.SET_PERMS, path, *(xs_wire.format_perm(p) for p in bits)
        )

    def watch(self, path: str, token: str) -> None:
        self._call(XsType.WATCH, path, token)

    def unwatch(self, path: str, token: str) -> None:
        self._call(XsType.UNWATCH, path, token)

    def pop_events(self) -> list[tuple[str, str]]:
        return self._conn.pop_events()


def dispatch_watch_events(
    events: list[tuple[str, str]],
    devices: Mapping[str, Frontend | Backend],
) -> Iterator[str]:
    """Hand (path, token) watch events to the devices by token; yields
    the tokens no device claimed (they belong to someone else)."""
    for path, token in events:
        device = devices.get(token)
        if device is None:
            yield token
        else:
            device.handle_watch(path)
