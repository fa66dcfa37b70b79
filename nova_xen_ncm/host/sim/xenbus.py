"""The guest's xenbus client: xenstore through the ring in guest RAM.

This is what a guest kernel's xenbus driver does (Linux
drivers/xen/xenbus/xenbus_comms.c, xenbus_xs.c), following
``docs/misc/xenstore.txt`` and ``xen/include/public/io/xs_wire.h``: write a
request into the ``req`` ring of the xenstore page, signal the store event
channel, read the reply matched by ``req_id`` from the ``rsp`` ring, and
hand ``XS_WATCH_EVENT`` messages to handlers by token.

The simulated guest keeps all of its state in its own RAM, so the client
does too: everything it needs to continue after the guest process is
restarted from RAM alone (on the destination of a migration) lives in a
fixed-layout struct in guest memory, given to the client as a
``memoryview`` of ``STATE_SIZE`` bytes. Handlers are code, not state: the
restarted guest registers them again by token.

State struct layout, version 1 (little-endian, ``STATE_SIZE`` = 16384)::

    off    size  field
    0      4     magic            b"XBUS"
    4      2     version          1
    6      2     flags            bit 0: a request is in flight
    8      4     next_req_id      req_id of the next request
    12     4     inflight_req_id  req_id of the request in flight
    16     4     req_len          bytes of the request in flight
    20     4     req_written      bytes of it already in the req ring
    24     4     rsp_have         bytes of a streamed message in rsp_buf
    28     4     watch_used       bytes used in the watch table
    32     4     event_used       bytes used in the event queue
    36     4     tx_count         open transactions in tx_ids
    40     64    tx_ids[16]       u32 ids of open transactions
    104    24    reserved         zero
    128    4112  req_buf          the request in flight (header+payload)
    4240   4112  rsp_buf          a message larger than the ring, so far
    8352   4096  watch table      entries: u16 path_len, u16 token_len,
                                  i16 depth (-1: none), path, token
    12448  3936  event queue      entries: u16 path_len, u16 token_len,
                                  path, token (events not yet handled)

The struct is consistent whenever the client is not inside a ring
operation: between calls, and whenever it calls ``wait()``; the guest is
to be paused only at such points.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from oslo_log import log as logging

from nova_xen_ncm.host.sim import xs_wire
from nova_xen_ncm.host.sim.xs_wire import HEADER_SIZE
from nova_xen_ncm.host.sim.xs_wire import XENSTORE_PAYLOAD_MAX
from nova_xen_ncm.host.sim.xs_wire import XENSTORE_RING_SIZE
from nova_xen_ncm.host.sim.xs_wire import Message
from nova_xen_ncm.host.sim.xs_wire import Ring
from nova_xen_ncm.host.sim.xs_wire import XenstoreError
from nova_xen_ncm.host.sim.xs_wire import XsType

LOG = logging.getLogger(__name__)

MAGIC = b"XBUS"
VERSION = 1
STATE_SIZE = 16384
FLAG_INFLIGHT = 1
MAX_TRANSACTIONS = 16

_FIXED = struct.Struct("<4sHHIIIIIIII")  # magic .. tx_count
_TX_IDS = 40
REQ_BUF = 128
RSP_BUF = REQ_BUF + HEADER_SIZE + XENSTORE_PAYLOAD_MAX  # 4240
WATCH_TABLE = RSP_BUF + HEADER_SIZE + XENSTORE_PAYLOAD_MAX  # 8352
WATCH_TABLE_SIZE = 4096
EVENT_QUEUE = WATCH_TABLE + WATCH_TABLE_SIZE  # 12448
EVENT_QUEUE_SIZE = STATE_SIZE - EVENT_QUEUE  # 3936
_WATCH_ENTRY = struct.Struct("<HHh")
_EVENT_ENTRY = struct.Struct("<HH")

# Field offsets in the fixed header.
_FLAGS = 6
_NEXT_REQ_ID = 8
_INFLIGHT_REQ_ID = 12
_REQ_LEN = 16
_REQ_WRITTEN = 20
_RSP_HAVE = 24
_WATCH_USED = 28
_EVENT_USED = 32
_TX_COUNT = 36

WatchHandler = Callable[[str, str], None]


class XenbusError(Exception):
    """The client cannot do what was asked (no reply, full table, bad
    state struct); xenstore's own errors are XenstoreError."""


class XenbusClient(xs_wire.XenstoreClient):
    """A guest's xenstore client over its ring page.

    ``page``: the xenstore ring page (``struct xenstore_domain_interface``)
    in guest RAM. ``state``: ``STATE_SIZE`` bytes of guest RAM for the
    client's state; all zero means a fresh client, otherwise it must hold a
    version-1 struct and the client continues from it. ``notify``: signal
    the store event channel. ``wait``: block until the event channel fires
    or a short while passes (default: sleep briefly). ``timeout``: seconds
    to wait for a reply before XenbusError; None waits as long as it takes
    (a guest that may be paused mid-request should not count the pause).
    """

    def __init__(
        self,
        page: memoryview,
        state: memoryview,
        notify: Callable[[], None],
        wait: Callable[[], None] | None = None,
        *,
        timeout: float | None = 30.0,
        on_watch: WatchHandler | None = None,
    ) -> None:
        if len(page) < xs_wire.INTERFACE_SIZE:
            raise XenbusError(
                f"ring page of {len(page)} bytes is too small for "
                "struct xenstore_domain_interface"
            )
        if len(state) < STATE_SIZE:
            raise XenbusError(
                f"client state of {len(state)} bytes, {STATE_SIZE} needed"
            )
        if state.readonly or page.readonly:
            raise XenbusError("the ring page and state must be writable")
        self._page = page
        self._st = state[:STATE_SIZE]
        self._notify = notify
        self._wait = wait or (lambda: time.sleep(0.0005))
        self._timeout = timeout
        self._on_watch = on_watch
        self._handlers: dict[str, WatchHandler] = {}
        # The reply to a request left in flight by a previous run of the
        # guest, if poll() read it before recover() was called.
        self._recovered: Message | None = None
        magic = bytes(self._st[0:4])
        if magic == b"\0\0\0\0" and not any(self._st):
            _FIXED.pack_into(self._st, 0, MAGIC, VERSION, 0, 1, *[0] * 7)
        elif magic != MAGIC:
            raise XenbusError(f"client state has bad magic {magic!r}")
        else:
            version = struct.unpack_from("<H", self._st, 4)[0]
            if version != VERSION:
                raise XenbusError(
                    f"client state version {version}, this client "
                    f"speaks {VERSION}"
                )
            self._check_state()

    # -- the struct -----------------------------------------------------

    def _u32(self, off: int) -> int:
        return xs_wire.get_u32(self._st, off)

    def _set(self, off: int, value: int) -> None:
        xs_wire.set_u32(self._st, off, value)

    def _check_state(self) -> None:
        limits = (
            (_REQ_LEN, HEADER_SIZE + XENSTORE_PAYLOAD_MAX),
            (_REQ_WRITTEN, self._u32(_REQ_LEN)),
            (_RSP_HAVE, HEADER_SIZE + XENSTORE_PAYLOAD_MAX),
            (_WATCH_USED, WATCH_TABLE_SIZE),
            (_EVENT_USED, EVENT_QUEUE_SIZE),
            (_TX_COUNT, MAX_TRANSACTIONS),
        )
        for off, limit in limits:
            if self._u32(off) > limit:
                raise XenbusError(
                    f"client state field at offset {off} is "
                    f"{self._u32(off)}, above its limit {limit}"
                )

    @property
    def _flags(self) -> int:
        return struct.unpack_from("<H", self._st, _FLAGS)[0]

    def _set_flags(self, flags: int) -> None:
        struct.pack_into("<H", self._st, _FLAGS, flags)

    def watches(self) -> list[tuple[str, str, int]]:
        """The registered watches (path, token, depth), from RAM."""
        out = []
        off, end = WATCH_TABLE, WATCH_TABLE + self._u32(_WATCH_USED)
        while off < end:
            plen, tlen, depth = _WATCH_ENTRY.unpack_from(self._st, off)
            off += _WATCH_ENTRY.size
            path = bytes(self._st[off : off + plen]).decode("ascii")
            token = bytes(self._st[off + plen : off + plen + tlen]).decode(
                "ascii"
            )
            out.append((path, token, depth))
            off += plen + tlen
        return out

    def _store_watches(self, watches: list[tuple[str, str, int]]) -> None:
        blob = b"".join(
            _WATCH_ENTRY.pack(len(p), len(t), d) + p.encode() + t.encode()
            for p, t, d in watches
        )
        if len(blob) > WATCH_TABLE_SIZE:
            raise XenbusError(
                f"watch table full ({WATCH_TABLE_SIZE} bytes in RAM)"
            )
        self._st[WATCH_TABLE : WATCH_TABLE + len(blob)] = blob
        self._set(_WATCH_USED, len(blob))

    def transactions(self) -> list[int]:
        """Ids of the open transactions, from RAM."""
        return [
            self._u32(_TX_IDS + 4 * i) for i in range(self._u32(_TX_COUNT))
        ]

    def _store_transactions(self, ids: list[int]) -> None:
        if len(ids) > MAX_TRANSACTIONS:
            raise XenbusError(
                f"more than {MAX_TRANSACTIONS} open transactions"
            )
        for i in range(MAX_TRANSACTIONS):
            self._set(_TX_IDS + 4 * i, ids[i] if i < len(ids) else 0)
        self._set(_TX_COUNT, len(ids))

    def _events(self) -> list[tuple[str, str]]:
        out = []
        off, end = EVENT_QUEUE, EVENT_QUEUE + self._u32(_EVENT_USED)
        while off < end:
            plen, tlen = _EVENT_ENTRY.unpack_from(self._st, off)
            off += _EVENT_ENTRY.size
            raw = bytes(self._st[off : off + plen + tlen])
            out.append((raw[:plen].decode(), raw[plen:].decode()))
            off += plen + tlen
        return out

    def _store_events(self, events: list[tuple[str, str]]) -> None:
        blob = b"".join(
            _EVENT_ENTRY.pack(len(p), len(t)) + p.encode() + t.encode()
            for p, t in events
        )
        self._st[EVENT_QUEUE : EVENT_QUEUE + len(blob)] = blob
        self._set(_EVENT_USED, len(blob))

    def _queue_event(self, path: str, token: str) -> None:
        events = self._events()
        if (path, token) in events:
            # Watches may fire spuriously; one pending copy is enough.
            return
        events.append((path, token))
        while events and sum(
            _EVENT_ENTRY.size + len(p) + len(t) for p, t in events
        ) > (EVENT_QUEUE_SIZE):
            dropped = events.pop(0)
            LOG.warning("xenbus: event queue full, dropped %s", dropped)
        self._store_events(events)

    # -- handlers -------------------------------------------------------

    def set_handler(self, token: str, handler: WatchHandler | None) -> None:
        """Run ``handler(path, token)`` for events of ``token``."""
        if handler is None:
            self._handlers.pop(token, None)
        else:
            self._handlers[token] = handler

    def poll(self) -> int:
        """Read what the rsp ring holds and run the handlers of the
        pending watch events; returns how many events were handled. The
        guest calls this when the store event channel fires."""
        reply = self._drain()
        if reply is not None:
            self._recovered = reply
        handled = 0
        while True:
            events = self._events()
            if not events:
                return handled
            path, token = events.pop(0)
            # Taken off the queue before the handler runs: at most once.
            self._store_events(events)
            handler = self._handlers.get(token, self._on_watch)
            if handler is None:
                LOG.debug("xenbus: no handler for token %s", token)
            else:
                handler(path, token)
            handled += 1

    # -- ring I/O -------------------------------------------------------

    def _read_message(self) -> Message | None:
        have = self._u32(_RSP_HAVE)
        partial = bytearray(self._st[RSP_BUF : RSP_BUF + have])
        msg = xs_wire.get_message(self._page, Ring.RSP, partial)
        self._st[RSP_BUF : RSP_BUF + len(partial)] = partial
        self._set(_RSP_HAVE, len(partial))
        return msg

    def _drain(self) -> Message | None:
        """Read every complete message; events go to the RAM queue. The
        reply to the request in flight, if it came, is returned (its
        bookkeeping done)."""
        reply = None
        consumed = False
        while True:
            before = xs_wire.get_u32(self._page, xs_wire.RSP_CONS)
            msg = self._read_message()
            consumed |= xs_wire.get_u32(self._page, xs_wire.RSP_CONS) != before
            if msg is None:
                break
            if msg.type == XsType.WATCH_EVENT:
                self._on_event(msg)
            elif self._flags & FLAG_INFLIGHT and msg.req_id == self._u32(
                _INFLIGHT_REQ_ID
            ):
                self._complete(msg)
                reply = msg
            else:
                LOG.warning(
                    "xenbus: dropping reply %s to unknown req_id %d",
                    msg.type_name,
                    msg.req_id,
                )
        if consumed:
            # The daemon may be waiting for rsp space.
            self._notify()
        return reply

    def _on_event(self, msg: Message) -> None:
        parts = msg.strings()
        if len(parts) < 2:
            LOG.warning("xenbus: malformed watch event %r", msg.payload)
            return
        path, token = parts[0], parts[1]
        known = any(t == token for _, t, _ in self.watches())
        if not known and self._flags & FLAG_INFLIGHT:
            req = self._inflight_request()
            known = req.type == XsType.WATCH and req.strings()[1:2] == [token]
        if known:
            self._queue_event(path, token)
        else:
            LOG.debug("xenbus: event for unknown token %s", token)

    def _inflight_request(self) -> Message:
        n = self._u32(_REQ_LEN)
        return Message.decode(self._st[REQ_BUF : REQ_BUF + n])

    def _push_request(self) -> bool:
        """Write more of the request in flight; True if bytes went in."""
        total = self._u32(_REQ_LEN)
        done = self._u32(_REQ_WRITTEN)
        if done >= total:
            return False
        data = bytes(self._st[REQ_BUF + done : REQ_BUF + total])
        if total <= XENSTORE_RING_SIZE:
            # Whole or nothing, so the daemon never holds half of it.
            if xs_wire.ring_free(self._page, Ring.REQ) < total:
                return False
            n = xs_wire.ring_write(self._page, Ring.REQ, data)
        else:
            n = xs_wire.ring_write(self._page, Ring.REQ, data)
        self._set(_REQ_WRITTEN, done + n)
        return n > 0

    def _complete(self, reply: Message) -> None:
        """Apply what a reply means to the RAM state, then clear the
        in-flight flag."""
        req = self._inflight_request()
        err = reply.error()
        args = req.strings() if req.type != XsType.WRITE else []
        if req.type == XsType.WATCH and err is None:
            depth = int(args[2]) if len(args) > 2 else -1
            watches = self.watches()
            if not any(p == args[0] and t == args[1] for p, t, _ in watches):
                watches.append((args[0], args[1], depth))
                self._store_watches(watches)
        elif req.type == XsType.UNWATCH and (
            err is None or err.name == "ENOENT"
        ):
            self._store_watches(
                [w for w in self.watches() if (w[0], w[1]) != tuple(args)]
            )
        elif req.type == XsType.TRANSACTION_START and err is None:
            self._store_transactions(
                self.transactions() + [int(reply.strings()[0])]
            )
        elif req.type == XsType.TRANSACTION_END and (
            err is None or err.name in ("EAGAIN", "ENOENT", "ENOSPC")
        ):
            self._store_transactions(
                [t for t in self.transactions() if t != req.tx_id]
            )
        elif req.type == XsType.RESET_WATCHES and err is None:
            self._store_watches([])
            self._store_transactions([])
        self._set_flags(self._flags & ~FLAG_INFLIGHT)

    def _await_reply(self) -> Message:
        deadline = None
        if self._timeout is not None:
            deadline = time.monotonic() + self._timeout
        while True:
            if self._push_request():
                self._notify()
            reply = self._drain()
            if reply is not None:
                return reply
            if deadline is not None and time.monotonic() > deadline:
                req = self._inflight_request()
                raise XenbusError(
                    f"no reply to {req.type_name} req_id {req.req_id} "
                    f"within {self._timeout} s"
                )
            self._wait()

    def recover(self) -> Message | None:
        """Finish the request that was in flight when the guest stopped
        (after a restart from RAM): write the rest of it, wait for its
        reply and apply it. Returns that reply (also when :meth:`poll`
        already read it), None if nothing was in flight. A restarted guest
        calls this first."""
        if not self._flags & FLAG_INFLIGHT:
            reply, self._recovered = self._recovered, None
            return reply
        return self._await_reply()

    def request(
        self, mtype: XsType, payload: bytes, tx_id: int = 0
    ) -> Message:
        """Send one request and return its reply (XS_ERROR included)."""
        self.recover()
        self._recovered = None
        req_id = self._u32(_NEXT_REQ_ID)
        msg = Message(mtype, req_id, tx_id, payload)
        data = msg.encode()
        self._st[REQ_BUF : REQ_BUF + len(data)] = data
        self._set(_REQ_LEN, len(data))
        self._set(_REQ_WRITTEN, 0)
        self._set(_INFLIGHT_REQ_ID, req_id)
        self._set(_NEXT_REQ_ID, (req_id + 1) & 0xFFFFFFFF)
        self._set_flags(self._flags | FLAG_INFLIGHT)
        return self._await_reply()

    def _call(self, mtype: XsType, payload: bytes, tx: int = 0) -> bytes:
        reply = self.request(mtype, payload, tx)
        err = reply.error()
        if err is not None:
            raise XenstoreError(err.name, f"{mtype.name} failed")
        if reply.type != mtype:
            raise XenbusError(
                f"reply of type {reply.type_name} to a {mtype.name}"
            )
        return reply.payload

    # -- operations beyond xs_wire.XenstoreClient's (docs/misc/xenstore.txt)

    def reset_watches(self) -> None:
        self._call(XsType.RESET_WATCHES, b"\0")

    def get_domain_path(self, domid: int) -> str:
        raw = self._call(
            XsType.GET_DOMAIN_PATH, xs_wire.join_strings(str(domid))
        )
        return xs_wire.split_strings(raw)[0]
