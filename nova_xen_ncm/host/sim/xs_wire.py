"""The xenstore wire protocol and its shared-memory ring.

Follows ``xen/include/public/io/xs_wire.h`` and ``docs/misc/xenstore.txt``:

* a message is a ``struct xsd_sockmsg`` header (type, req_id, tx_id, len;
  four little-endian u32) followed by ``len`` bytes of payload, at most
  ``XENSTORE_PAYLOAD_MAX`` (4096) in either direction;
* errors travel as the errno *name* (``"EACCES\\0"``), from the
  ``xsd_errors`` table;
* permissions travel as ``<letter><domid>`` strings (``r0``, ``w5``,
  ``b1``, ``n0``);
* a domain talks to xenstored through ``struct xenstore_domain_interface``,
  one page holding a request ring and a response ring of
  ``XENSTORE_RING_SIZE`` (1024) bytes each with free-running u32 indices.

:class:`XenstoreClient` holds the one encoding of each request's payload
and decoding of its reply, over a transport its subclasses provide (the
guest's ring in ``xenbus``, an in-process connection in ``xenstore``).

The ring functions work on a ``memoryview`` of that page, which lives in
guest RAM and is shared between processes: data is written before the
producer index that publishes it, and read before the consumer index that
frees it. A message that fits in the ring is only consumed once it is
complete; a larger one (up to 16 + 4096 bytes) cannot ever be whole in a
1024-byte ring, so it is streamed into the reader's reassembly buffer, as
xenstored and the guest drivers do.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import errno as _errno
import struct

XENSTORE_RING_SIZE = 1024
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

# server_features bits.
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8

# connection field.
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

# error field.
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


# struct xsd_errors xsd_errors[], in table order.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
ERRNO_BY_NAME: dict[str, int] = {n: getattr(_errno, n) for n in XSD_ERRORS}

# struct xsd_sockmsg.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16

# Access bits of a permission entry (xenstore_lib.h XS_PERM_*).
PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_BOTH = PERM_READ | PERM_WRITE
_LETTER_BITS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": 3}
_BITS_LETTER = {v: k for k, v in _LETTER_BITS.items()}
DOMID_MAX = 0xFFFF


class XsWireError(ValueError):
    """A message, permission string or ring violates xs_wire.h."""


class XenstoreError(Exception):
    """An ``XS_ERROR`` reply: ``name`` is the errno name (``"EACCES"``)."""

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in ERRNO_BY_NAME:
            raise XsWireError(f"unknown xenstore error name {name!r}")
        self.name = name
        self.errno = ERRNO_BY_NAME[name]
        self.detail = detail
        super().__init__(f"{name}: {detail}" if detail else name)


# -- messages -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
    """One xsd_sockmsg with its payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise XsWireError(
                f"payload of {len(self.payload)} bytes exceeds "
                f"XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})"
            )
        for name in ("type", "req_id", "tx_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise XsWireError(f"{name} {value} is not a u32")

    def encode(self) -> bytes:
        return (
            HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload))
            + self.payload
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Message:
        """Decode exactly one message; ``data`` must hold nothing else."""
        if len(data) < HEADER_SIZE:
            raise XsWireError(
                f"message of {len(data)} bytes is shorter than the "
                f"{HEADER_SIZE}-byte xsd_sockmsg header"
            )
        mtype, req_id, tx_id, length = HEADER.unpack_from(data)
        check_payload_len(length)
        if len(data) != HEADER_SIZE + length:
            raise XsWireError(
                f"header says {length} payload bytes, "
                f"{len(data) - HEADER_SIZE} present"
            )
        return cls(mtype, req_id, tx_id, bytes(data[HEADER_SIZE:]))

    @property
    def type_name(self) -> str:
        try:
            return XsType(self.type).name
        except ValueError:
            return f"type {self.type}"

    def strings(self) -> list[str]:
        return split_strings(self.payload)

    def error(self) -> XenstoreError | None:
        """The error this reply carries, None if it is not XS_ERROR."""
        if self.type != XsType.ERROR:
            return None
        name = self.payload.rstrip(b"\0").decode("ascii", "replace")
        if name not in ERRNO_BY_NAME:
            raise XsWireError(f"XS_ERROR reply names unknown error {name!r}")
        return XenstoreError(name)


def check_payload_len(length: int) -> None:
    if length > XENSTORE_PAYLOAD_MAX:
        raise XsWireError(
            f"header announces {length} payload bytes, more than "
            f"XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})"
        )


def join_strings(*parts: str | bytes, terminate: bool = True) -> bytes:
    """``a|b|`` payloads: each part nul-terminated (the last one only if
    ``terminate``)."""
    out = bytearray()
    for i, part in enumerate(parts):
        out += part.encode("ascii") if isinstance(part, str) else part
        if terminate or i < len(parts) - 1:
            out += b"\0"
    return bytes(out)


def split_strings(payload: bytes) -> list[str]:
    """The nul-terminated strings of a payload (``<foo>|*``)."""
    if not payload:
        return []
    text = payload.decode("ascii", "strict")
    parts = text.split("\0")
    if parts[-1] == "":
        parts.pop()
    return parts


def error_reply(request: Message, name: str) -> Message:
    """The XS_ERROR reply to ``request`` (req_id and tx_id copied)."""
    if name not in ERRNO_BY_NAME:
        raise XsWireError(f"unknown xenstore error name {name!r}")
    return Message(
        XsType.ERROR, request.req_id, request.tx_id, join_strings(name)
    )


def watch_event(path: str, token: str) -> Message:
    """An XS_WATCH_EVENT ``<epath>|<token>|`` (req_id and tx_id 0)."""
    return Message(XsType.WATCH_EVENT, 0, 0, join_strings(path, token))


# -- permissions ----------------------------------------------------------

Perm = tuple[int, int]  # (access bits, domid)


def parse_perm(text: str) -> Perm:
    """``"r5"`` -> (PERM_READ, 5)."""
    if len(text) < 2 or text[0] not in _LETTER_BITS:
        raise XsWireError(
            f"permission {text!r} is not <n|r|w|b><domid> (docs/misc/"
            "xenstore.txt SET_PERMS)"
        )
    digits = text[1:]
    if not digits.isdigit():
        raise XsWireError(f"permission {text!r} has a bad domid")
    domid = int(digits)
    if domid > DOMID_MAX:
        raise XsWireError(f"permission {text!r}: domid above {DOMID_MAX}")
    return _LETTER_BITS[text[0]], domid


def format_perm(perm: Perm) -> str:
    bits, domid = perm
    if bits not in _BITS_LETTER:
        raise XsWireError(f"permission bits {bits} are not n, r, w or b")
    return f"{_BITS_LETTER[bits]}{domid}"


def letter_perms(perms: tuple[Perm, ...]) -> tuple[tuple[str, int], ...]:
    """Internal (bits, domid) entries -> host/base.py ("r", domid)."""
    return tuple((_BITS_LETTER[b], d) for b, d in perms)


def bit_perms(perms: tuple[tuple[str, int], ...]) -> tuple[Perm, ...]:
    """host/base.py ("r", domid) entries -> (bits, domid), validated."""
    out = []
    for entry in perms:
        if (
            len(entry) != 2
            or entry[0] not in _LETTER_BITS
            or not isinstance(entry[1], int)
            or not 0 <= entry[1] <= DOMID_MAX
        ):
            raise XsWireError(f"permission entry {entry!r} is malformed")
        out.append((_LETTER_BITS[entry[0]], entry[1]))
    if not out:
        raise XsWireError("a node needs at least its owner permission")
    return tuple(out)


def encode_perms(perms: tuple[Perm, ...]) -> bytes:
    return join_strings(*(format_perm(p) for p in perms))


def decode_perms(strings: list[str]) -> tuple[Perm, ...]:
    if not strings:
        raise XsWireError("a permission list needs at least the owner")
    return tuple(parse_perm(s) for s in strings)


# -- requests (docs/misc/xenstore.txt) ------------------------------------


class XenstoreClient(abc.ABC):
    """The requests of docs/misc/xenstore.txt as method calls.

    Subclasses provide the transport, :meth:`_call`. Errors raise
    XenstoreError with xenstored's errno name.
    """

    @abc.abstractmethod
    def _call(self, mtype: XsType, payload: bytes, tx: int = 0) -> bytes:
        """Send one request in transaction ``tx`` (0: none) and return
        the payload of its reply; raise XenstoreError on XS_ERROR."""

    def read(self, path: str, tx: int = 0) -> bytes:
        return self._call(XsType.READ, join_strings(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        if isinstance(value, str):
            value = value.encode()
        self._call(
            XsType.WRITE, join_strings(path, value, terminate=False), tx
        )

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._call(XsType.MKDIR, join_strings(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self._call(XsType.RM, join_strings(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return split_strings(
            self._call(XsType.DIRECTORY, join_strings(path), tx)
        )

    def get_perms(self, path: str, tx: int = 0) -> list[tuple[str, int]]:
        raw = self._call(XsType.GET_PERMS, join_strings(path), tx)
        return list(letter_perms(decode_perms(split_strings(raw))))

    def set_perms(
        self, path: str, perms: list[tuple[str, int]], tx: int = 0
    ) -> None:
        bits = bit_perms(tuple(perms))
        self._call(
            XsType.SET_PERMS, join_strings(path) + encode_perms(bits), tx
        )

    def watch(self, path: str, token: str, depth: int | None = None) -> None:
        args = [path, token] + ([] if depth is None else [str(depth)])
        self._call(XsType.WATCH, join_strings(*args))

    def unwatch(self, path: str, token: str) -> None:
        self._call(XsType.UNWATCH, join_strings(path, token))

    def transaction_start(self) -> int:
        raw = self._call(XsType.TRANSACTION_START, b"\0")
        return int(split_strings(raw)[0])

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """End ``tx``; False when the commit met a conflict (EAGAIN) and
        the caller should run the transaction again."""
        try:
            self._call(
                XsType.TRANSACTION_END,
                join_strings("T" if commit else "F"),
                tx,
            )
        except XenstoreError as exc:
            if exc.name == "EAGAIN":
                return False
            raise
        return True


# -- the ring page --------------------------------------------------------

REQ_OFFSET = 0
RSP_OFFSET = XENSTORE_RING_SIZE
_IDX = struct.Struct("<I")
REQ_CONS = 2048
REQ_PROD = 2052
RSP_CONS = 2056
RSP_PROD = 2060
SERVER_FEATURES = 2064
CONNECTION = 2068
ERROR = 2072
EVTCHN_PORT = 2076
INTERFACE_SIZE = 2080  # sizeof(struct xenstore_domain_interface)


class Ring(enum.Enum):
    """The two rings of the page: (data offset, cons offset, prod offset)."""

    REQ = (REQ_OFFSET, REQ_CONS, REQ_PROD)
    RSP = (RSP_OFFSET, RSP_CONS, RSP_PROD)


def _check_page(page: memoryview) -> None:
    if len(page) < INTERFACE_SIZE:
        raise XsWireError(
            f"ring page view of {len(page)} bytes is smaller than "
            f"struct xenstore_domain_interface ({INTERFACE_SIZE})"
        )


def get_u32(page: memoryview, offset: int) -> int:
    return _IDX.unpack_from(page, offset)[0]


def set_u32(page: memoryview, offset: int, value: int) -> None:
    _IDX.pack_into(page, offset, value & 0xFFFFFFFF)


def init_interface(page: memoryview, features: int = 0) -> None:
    """Zero the interface and advertise ``features`` (domain build)."""
    _check_page(page)
    page[:INTERFACE_SIZE] = bytes(INTERFACE_SIZE)
    set_u32(page, SERVER_FEATURES, features)


def _indices(page: memoryview, ring: Ring) -> tuple[int, int]:
    _check_page(page)
    _, cons_off, prod_off = ring.value
    cons = get_u32(page, cons_off)
    prod = get_u32(page, prod_off)
    used = (prod - cons) & 0xFFFFFFFF
    if used > XENSTORE_RING_SIZE:
        raise XsWireError(
            f"{ring.name} ring indices prod={prod} cons={cons} are "
            f"{used} apart, more than the ring size"
        )
    return cons, prod


def ring_used(page: memoryview, ring: Ring) -> int:
    cons, prod = _indices(page, ring)
    return (prod - cons) & 0xFFFFFFFF


def ring_free(page: memoryview, ring: Ring) -> int:
    return XENSTORE_RING_SIZE - ring_used(page, ring)


def _copy_out(page: memoryview, ring: Ring, start: int, n: int) -> bytes:
    base = ring.value[0]
    pos = start & (XENSTORE_RING_SIZE - 1)
    first = min(n, XENSTORE_RING_SIZE - pos)
    data = bytes(page[base + pos : base + pos + first])
    if first < n:
        data += bytes(page[base : base + n - first])
    return data


def ring_write(page: memoryview, ring: Ring, data: bytes) -> int:
    """Produce as many bytes of ``data`` as fit; returns how many."""
    cons, prod = _indices(page, ring)
    n = min(len(data), XENSTORE_RING_SIZE - ((prod - cons) & 0xFFFFFFFF))
    if n == 0:
        return 0
    base = ring.value[0]
    pos = prod & (XENSTORE_RING_SIZE - 1)
    first = min(n, XENSTORE_RING_SIZE - pos)
    page[base + pos : base + pos + first] = data[:first]
    if first < n:
        page[base : base + n - first] = data[first:n]
    # Publish only after the bytes are in place (the reader is another
    # process).
    set_u32(page, ring.value[2], prod + n)
    return n


def ring_read(page: memoryview, ring: Ring, limit: int) -> bytes:
    """Consume up to ``limit`` bytes."""
    cons, prod = _indices(page, ring)
    n = min(limit, (prod - cons) & 0xFFFFFFFF)
    if n <= 0:
        return b""
    data = _copy_out(page, ring, cons, n)
    set_u32(page, ring.value[1], cons + n)
    return data


def put_message(page: memoryview, ring: Ring, msg: Message) -> bool:
    """Write a whole message that fits the ring at once, or nothing.

    Returns False when there is not yet room; a message larger than the
    ring must be streamed with :func:`ring_write`.
    """
    data = msg.encode()
    if len(data) > XENSTORE_RING_SIZE:
        raise XsWireError(
            f"{msg.type_name} message of {len(data)} bytes cannot be "
            f"written whole into a {XENSTORE_RING_SIZE}-byte ring"
        )
    if ring_free(page, ring) < len(data):
        return False
    ring_write(page, ring, data)
    return True


def get_message(
    page: memoryview, ring: Ring, partial: bytearray
) -> Message | None:
    """Take the next complete message out of ``ring``, or None.

    ``partial`` is the reader's reassembly buffer: empty unless a message
    larger than the ring is being streamed, in which case its bytes so far
    live there. A message that fits the ring is left in the ring until it
    is complete. A header announcing more than XENSTORE_PAYLOAD_MAX raises
    :class:`XsWireError` (xenstored kills such a connection).
    """
    if partial:
        total = HEADER_SIZE + HEADER.unpack_from(partial)[3]
        partial += ring_read(page, ring, total - len(partial))
        if len(partial) < total:
            return None
        msg = Message.decode(partial)
        del partial[:]
        return msg
    cons, prod = _indices(page, ring)
    avail = (prod - cons) & 0xFFFFFFFF
    if avail < HEADER_SIZE:
        return None
    header = _copy_out(page, ring, cons, HEADER_SIZE)
    length = HEADER.unpack(header)[3]
    check_payload_len(length)
    total = HEADER_SIZE + length
    if total <= avail:
        return Message.decode(ring_read(page, ring, total))
    if total > XENSTORE_RING_SIZE:
        partial += ring_read(page, ring, avail)
    return None
