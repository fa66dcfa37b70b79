"""The PV device protocol of the simulated host: xenbus states, what a
device needs from the host (Protocols), the ring's entries and what a
request carries, and the xenstore areas of a device (package docstring:
:mod:`nova_xen_ncm.host.sim.devices`)."""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from nova_xen_ncm.host.base import DeviceConfig
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim.xs_wire import XenstoreError


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
    handler run on every notification, send, close; and dom0's deferred
    work (a disk's completion)."""

    def dom0_bind_interdomain(
        self, domid: int, port: int, handler: Callable[[int], None]
    ) -> int: ...

    def dom0_check_bindable(self, domid: int, port: int) -> None:
        """Raise what :meth:`dom0_bind_interdomain` would, binding
        nothing."""

    def dom0_notify(self, port: int) -> None: ...

    def dom0_close(self, port: int) -> None: ...

    def dom0_defer(self, what: str, work: Callable[[], object]) -> None:
        """Run ``work`` on dom0's event thread after the current handler
        (a disk's completion)."""


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
