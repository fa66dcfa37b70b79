"""The PV backends, in dom0, their disks (shared storage) and dom0's
xenstore connection (package docstring:
:mod:`nova_xen_ncm.host.sim.devices`)."""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from collections.abc import Mapping

from nova_xen_ncm.host.base import BackendState
from nova_xen_ncm.host.base import InflightRequest
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.devices.frontend import Frontend
from nova_xen_ncm.host.sim.devices.protocol import DEFAULT_SECTORS
from nova_xen_ncm.host.sim.devices.protocol import ENTRY_SIZE
from nova_xen_ncm.host.sim.devices.protocol import OP_PACKET
from nova_xen_ncm.host.sim.devices.protocol import OP_READ
from nova_xen_ncm.host.sim.devices.protocol import OP_WRITE
from nova_xen_ncm.host.sim.devices.protocol import RING_ENTRIES
from nova_xen_ncm.host.sim.devices.protocol import RING_NAME
from nova_xen_ncm.host.sim.devices.protocol import RSP_ERROR
from nova_xen_ncm.host.sim.devices.protocol import RSP_OKAY
from nova_xen_ncm.host.sim.devices.protocol import SECTOR
from nova_xen_ncm.host.sim.devices.protocol import SECTOR_BYTES
from nova_xen_ncm.host.sim.devices.protocol import Dom0Evtchn
from nova_xen_ncm.host.sim.devices.protocol import GrantMapper
from nova_xen_ncm.host.sim.devices.protocol import XenbusClient
from nova_xen_ncm.host.sim.devices.protocol import XenbusState
from nova_xen_ncm.host.sim.devices.protocol import _read_int
from nova_xen_ncm.host.sim.devices.protocol import backend_area
from nova_xen_ncm.host.sim.devices.protocol import decode_request
from nova_xen_ncm.host.sim.devices.protocol import device_key
from nova_xen_ncm.host.sim.devices.protocol import encode_response
from nova_xen_ncm.host.sim.devices.protocol import frontend_area
from nova_xen_ncm.host.sim.devices.protocol import parse_frontend_area
from nova_xen_ncm.host.sim.devices.protocol import receipt
from nova_xen_ncm.host.sim.ring import BackRing
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import XsType

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
    :meth:`complete_requests` when its disk is done (a completion the
    backend queues on dom0's thread when it takes requests, as a block
    device's interrupt does; no timer): it takes requests on events
    only. :meth:`service` first answers what it took earlier and then
    takes the new requests, which stay in flight until answered, as
    requests wait for a disk.
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
        # Taken before the host's (a backend maps grants and binds ports
        # with it held): locks.ORDER.
        self._lock = locks.OrderedLock(
            locks.BACKEND, threading.RLock(), reentrant=True
        )
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

    def _check_published(self) -> None:
        """Check the ring and port the frontend published, if it did (it
        is Initialised or Connected), as the handshake will use them: map
        the ring as :meth:`_attach` does and unmap it again, and ask
        whether the port would bind. A ring or port the handshake could
        not take fails here, before the commit; nothing the guest can see
        is left changed (no status bit, no port bound): until the commit
        it must see what the source paused, and the handshake maps and
        binds them once it goes on (:meth:`resume`)."""
        seen = _read_int(self._xs, self.frontend_path + "/state")
        if seen not in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            return
        ref = _read_int(self._xs, self.frontend_path + "/ring-ref")
        port = _read_int(self._xs, self.frontend_path + "/event-channel")
        if ref is None or port is None:
            raise BackendError(
                f"{self.frontend_path} is {XenbusState(seen).name} without "
                "ring-ref and event-channel"
            )
        handle, page = self._grants.grant_map(self.domid, ref)
        try:
            BackRing.attach(page, ENTRY_SIZE, (0, 0))
        finally:
            self._grants.grant_unmap(handle)
        self._evtchn.dom0_check_bindable(self.domid, port)

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
                    break
            if taken:
                # The disk's completion: answered on dom0's thread after
                # this handler (or at resume, if quiesced before).
                self._evtchn.dom0_defer(
                    f"disk completion of {self.key}", self.complete_requests
                )
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
                # The frontend may have published its ring already: one
                # that cannot be mapped fails the import, not the
                # handshake after the guest runs here.
                with be._lock:
                    be._check_published()
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
