"""The messages of the migration protocol and their payload codec.

Control payloads are JSON objects with exactly the fields of their
message, each checked against its type and a size limit before the
message exists; a DATA frame's body is not a message but an event
(:class:`Data`, or :class:`DataHeader` and :class:`DataEnd` when read
straight into guest memory). Framing is :mod:`.framing`, the handshake's
proofs and keys :mod:`.handshake`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import types
import typing
import uuid as uuidlib
from typing import Any
from typing import ClassVar

from nova_xen_ncm.engine.errors import ProtocolError

PROTOCOL_VERSION = 3
#: 2: SETUP carries a directly booted kernel. 3: SETUP carries the
#: guest's PV devices whose backends the destination creates. A field
#: added in a version (metadata ``since``) is neither sent nor expected
#: when an older one was negotiated, so that hosts of two releases
#: migrate guests between them during an upgrade.
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2, 3)

# Sizes of the handshake's fields (handshake.py).
PROOF_SIZE = hashlib.sha256().digest_size
NONCE_SIZE = 32

MAX_CHANNELS = 16
MAX_TEXT = 4096
MAX_LIST = 256

Buffer = bytes | bytearray | memoryview


class Role(str, enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Capability(str, enum.Enum):
    LZ4 = "lz4"
    MULTI_CHANNEL = "multi-channel"
    RESUME = "resume"
    #: Frames travel inside mutual TLS, whose AEAD already authenticates
    #: every octet: no per-frame GMAC. Offered and chosen only by ends
    #: whose connection is TLS.
    TLS_FRAMES = "tls-frames"
    #: No per-frame GMAC on a plain connection (isolated migration
    #: networks, as QEMU's plain TCP): both ends must allow it.
    UNAUTHENTICATED_FRAMES = "unauthenticated-frames"
    #: Inside mutual TLS the handshake runs, then both ends leave TLS
    #: (close_notify both ways) and every established frame's payload
    #: travels encrypted with AES-256-GCM under per-connection keys
    #: derived from both ends' nonces (which crossed only inside TLS)
    #: and the token. Offered and required by ends whose connection is
    #: TLS and whose [xen_ncm] tls_encrypted_frames is true.
    ENCRYPTED_FRAMES = "encrypted-frames"
    #: The source says STOPPING before it pauses the guest for
    #: stop-and-copy, so that the destination's record of that phase is
    #: made durable while the last pages travel, not after them.
    STOP_NOTICE = "stop-notice"


class RefuseReason(str, enum.Enum):
    """Why a destination refuses a connection or a migration."""

    VERSION = "version"
    AUTHENTICATION = "authentication"
    UNKNOWN_MIGRATION = "unknown-migration"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    DOMID_TAKEN = "domid-taken"
    NOT_ENOUGH_MEMORY = "not-enough-memory"
    MISSING_CAPABILITY = "missing-capability"
    BAD_REQUEST = "bad-request"


class MessageType(enum.IntEnum):
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    RESUME = 0x04
    WELCOME = 0x05
    REFUSE = 0x06
    SETUP = 0x10
    SETUP_REPLY = 0x11
    DATA = 0x20
    ACK = 0x21
    STOPPING = 0x22
    READY = 0x30
    COMMIT = 0x31
    COMMITTED = 0x32
    QUERY = 0x33
    STATUS = 0x34
    FINISHED = 0x35
    ABORT = 0x40
    ERROR = 0x41


# -- messages ---------------------------------------------------------


def _hex(value: str, size: int, name: str) -> None:
    if len(value) != 2 * size:
        raise ValueError(f"{name} must be {size} octets in hex")
    bytes.fromhex(value)


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[MessageType]

    def validate(self) -> None:
        """Raise ValueError if a field is out of range."""


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[MessageType] = MessageType.HELLO
    versions: tuple[int, ...]
    capabilities: tuple[str, ...]
    migration_id: str
    channel: int
    nonce: str

    def validate(self) -> None:
        if not self.versions:
            raise ValueError("no protocol version offered")
        if not self.migration_id:
            raise ValueError("empty migration id")
        if not 0 <= self.channel < MAX_CHANNELS:
            raise ValueError(f"channel {self.channel} out of range")
        _hex(self.nonce, NONCE_SIZE, "nonce")


@dataclasses.dataclass(frozen=True)
class Challenge(Message):
    TYPE: ClassVar[MessageType] = MessageType.CHALLENGE
    version: int
    capabilities: tuple[str, ...]
    nonce: str

    def validate(self) -> None:
        _hex(self.nonce, NONCE_SIZE, "nonce")


@dataclasses.dataclass(frozen=True)
class Auth(Message):
    TYPE: ClassVar[MessageType] = MessageType.AUTH
    proof: str

    def validate(self) -> None:
        _hex(self.proof, PROOF_SIZE, "proof")


@dataclasses.dataclass(frozen=True)
class Resume(Message):
    TYPE: ClassVar[MessageType] = MessageType.RESUME
    proof: str
    last_acked: int

    def validate(self) -> None:
        _hex(self.proof, PROOF_SIZE, "proof")
        if self.last_acked < 0:
            raise ValueError("negative sequence number")


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    proof: str
    #: Highest sequence number the server applied on this channel.
    resume_from: int

    def validate(self) -> None:
        _hex(self.proof, PROOF_SIZE, "proof")
        if self.resume_from < 0:
            raise ValueError("negative sequence number")


@dataclasses.dataclass(frozen=True)
class Refuse(Message):
    TYPE: ClassVar[MessageType] = MessageType.REFUSE
    code: str
    text: str

    def validate(self) -> None:
        RefuseReason(self.code)


@dataclasses.dataclass(frozen=True)
class Setup(Message):
    """What the destination must prepare: refused up front if it can't."""

    TYPE: ClassVar[MessageType] = MessageType.SETUP
    domid: int
    name: str
    uuid: str
    memory_bytes: int
    vcpus: int
    pv_drivers: bool
    required: tuple[str, ...]
    #: Whether the guest ran on the source: a paused guest stays paused
    #: on the destination after COMMIT.
    running: bool = True
    #: Connections of the migration: this one, then data channels
    #: 1 .. channels-1, which connect once SETUP is accepted.
    channels: int = 1
    #: A directly booted kernel (absolute paths the destination takes
    #: only under its [xen_ncm] direct_boot_dirs): part of the machine
    #: whose device state the destination's device model loads.
    #: Protocol version 2 and later.
    kernel: str | None = dataclasses.field(default=None, metadata={"since": 2})
    ramdisk: str | None = dataclasses.field(
        default=None, metadata={"since": 2}
    )
    cmdline: str | None = dataclasses.field(
        default=None, metadata={"since": 2}
    )

    #: The guest's PV devices whose backends the destination creates
    #: with the domain (a host whose streams carry its devices' backends
    #: sends none), each a JSON object: ``kind`` ("vbd" or "vif"),
    #: ``devid``, ``mac`` (a vif's, or null) and ``extra`` (strings: a
    #: vbd's ``target`` and ``format``, a vif's ``bridge``). Protocol
    #: version 3 and later.
    devices: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"since": 3}
    )

    def device_fields(self) -> list[dict[str, Any]]:
        """:attr:`devices`, decoded and checked (ValueError)."""
        out = []
        seen = set()
        for text in self.devices:
            dev = json.loads(text)
            if not isinstance(dev, dict) or set(dev) != {
                "kind",
                "devid",
                "mac",
                "extra",
            }:
                raise ValueError(
                    f"device {text!r}: an object of kind, devid, mac, extra"
                )
            if dev["kind"] not in ("vbd", "vif"):
                raise ValueError(f"device kind {dev['kind']!r}")
            devid = dev["devid"]
            if (
                not isinstance(devid, int)
                or isinstance(devid, bool)
                or not 0 <= devid < 2**32
            ):
                raise ValueError(f"device devid {devid!r}")
            if (dev["kind"], devid) in seen:
                raise ValueError(f"{dev['kind']} {devid} named twice")
            seen.add((dev["kind"], devid))
            if dev["mac"] is not None and not isinstance(dev["mac"], str):
                raise ValueError(f"device mac {dev['mac']!r}")
            extra = dev["extra"]
            if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.isprintable()
                for k, v in extra.items()
            ):
                raise ValueError(f"device extra {extra!r}: strings only")
            out.append(dev)
        return out

    def validate(self) -> None:
        self.device_fields()
        # DOMID_FIRST_RESERVED (xen/include/public/xen.h) and above are
        # not guest domids.
        if not 0 < self.domid < 0x7FF0:
            raise ValueError(f"domid {self.domid} is not a guest domid")
        # The destination names files after it (the sim's disks).
        try:
            uuidlib.UUID(self.uuid)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"uuid {self.uuid!r} is not a UUID") from None
        if self.memory_bytes <= 0 or self.vcpus <= 0:
            raise ValueError("memory and vcpus must be positive")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ValueError(
                f"{self.channels} channels: from 1 to {MAX_CHANNELS}"
            )
        if self.kernel is None and (
            self.ramdisk is not None or self.cmdline is not None
        ):
            raise ValueError("a ramdisk or cmdline without a kernel")
        for key in ("kernel", "ramdisk"):
            path = getattr(self, key)
            # Resolved on the destination, never against its cwd.
            if path is not None and not path.startswith("/"):
                raise ValueError(f"{key} {path!r} is not an absolute path")
        for key in ("kernel", "ramdisk", "cmdline"):
            value = getattr(self, key)
            if value is not None and not value.isprintable():
                raise ValueError(f"{key} {value!r} has control characters")


@dataclasses.dataclass(frozen=True)
class SetupReply(Message):
    TYPE: ClassVar[MessageType] = MessageType.SETUP_REPLY
    accepted: bool
    domid: int
    code: str
    text: str

    def validate(self) -> None:
        if not self.accepted:
            RefuseReason(self.code)


@dataclasses.dataclass(frozen=True)
class Ack(Message):
    TYPE: ClassVar[MessageType] = MessageType.ACK
    #: Highest data sequence number applied on this channel.
    seq: int

    def validate(self) -> None:
        if self.seq < 0:
            raise ValueError("negative sequence number")


@dataclasses.dataclass(frozen=True)
class Stopping(Message):
    """The source recorded its stop-and-copy durably and pauses the
    guest now: the pages and state that follow are the last (capability
    ``stop-notice``)."""

    TYPE: ClassVar[MessageType] = MessageType.STOPPING


@dataclasses.dataclass(frozen=True)
class Ready(Message):
    """The destination restored everything; ``digest`` is its digest of
    the guest-visible state, for the source to compare."""

    TYPE: ClassVar[MessageType] = MessageType.READY
    digest: str


@dataclasses.dataclass(frozen=True)
class Commit(Message):
    TYPE: ClassVar[MessageType] = MessageType.COMMIT


@dataclasses.dataclass(frozen=True)
class Committed(Message):
    TYPE: ClassVar[MessageType] = MessageType.COMMITTED


@dataclasses.dataclass(frozen=True)
class Query(Message):
    TYPE: ClassVar[MessageType] = MessageType.QUERY


@dataclasses.dataclass(frozen=True)
class Status(Message):
    """The destination's answer to QUERY: its phase, and whether the guest
    runs there (COMMIT was received and acted on)."""

    TYPE: ClassVar[MessageType] = MessageType.STATUS
    phase: str
    committed: bool


@dataclasses.dataclass(frozen=True)
class Finished(Message):
    """The source's final acknowledgement: it knows the outcome and has
    acted on it and recorded it; the destination may forget."""

    TYPE: ClassVar[MessageType] = MessageType.FINISHED


@dataclasses.dataclass(frozen=True)
class Abort(Message):
    TYPE: ClassVar[MessageType] = MessageType.ABORT
    reason: str


@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: str
    text: str


MESSAGES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Resume,
        Welcome,
        Refuse,
        Setup,
        SetupReply,
        Ack,
        Stopping,
        Ready,
        Commit,
        Committed,
        Query,
        Status,
        Finished,
        Abort,
        Error,
    )
}


# -- events that are not control messages -----------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """A whole data frame: its channel sequence number and body;
    ``pages``: the body is one PAGE_DATA record (flag PAGES)."""

    seq: int
    payload: bytes | memoryview
    pages: bool = False


@dataclasses.dataclass(frozen=True)
class DataHeader:
    """Direct mode: a data frame of ``length`` body octets begins; read
    them with take_payload/payload_received, then DataEnd follows."""

    seq: int
    length: int
    pages: bool = False


@dataclasses.dataclass(frozen=True)
class DataEnd:
    """Direct mode: the body of frame ``seq`` was read and its tag holds."""

    seq: int


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection between two frames."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = Message | Data | DataHeader | DataEnd | ConnectionClosed | _NeedData


# -- payload codec ----------------------------------------------------


def _check_field(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        # ``X | None``: absent as null.
        (arm,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _check_field(name, arm, value)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise ValueError(f"{name} must be a list of at most {MAX_LIST}")
        return tuple(_check_field(name, item, v) for v in value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not 0 <= value < 2**64:
            raise ValueError(f"{name} out of range")
    elif hint is str:
        ok = isinstance(value, str)
        if ok and len(value) > MAX_TEXT:
            raise ValueError(f"{name} longer than {MAX_TEXT}")
    else:
        raise TypeError(f"unsupported field type {hint!r}")
    if not ok:
        raise ValueError(f"{name} must be {hint.__name__}")
    return value


_HINTS: dict[type[Message], dict[str, tuple[Any, int]]] = {
    cls: {
        f.name: (
            typing.get_type_hints(cls)[f.name],
            f.metadata.get("since", 1),
        )
        for f in dataclasses.fields(cls)
    }
    for cls in MESSAGES.values()
}


def encode_message(msg: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """The payload of ``msg`` in protocol ``version``: its fields of that
    version. Raises ValueError for a field that version cannot carry."""
    obj = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.metadata.get("since", 1) > version:
            if value != f.default:
                raise ValueError(
                    f"{msg.TYPE.name} {f.name} cannot be sent in protocol "
                    f"version {version}"
                )
            continue
        obj[f.name] = value
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_message(
    mtype: MessageType, payload: Buffer, version: int = PROTOCOL_VERSION
) -> Message:
    """The message of ``payload``, which has exactly the fields of
    protocol ``version`` (later ones take their defaults)."""
    cls = MESSAGES[mtype]
    try:
        obj = json.loads(bytes(payload))
        if not isinstance(obj, dict):
            raise ValueError("payload is not an object")
        hints = {
            name: hint
            for name, (hint, since) in _HINTS[cls].items()
            if since <= version
        }
        if set(obj) != set(hints):
            raise ValueError(
                f"fields {sorted(obj)} instead of {sorted(hints)} "
                f"(protocol version {version})"
            )
        msg = cls(
            **{
                name: _check_field(name, hint, obj[name])
                for name, hint in hints.items()
            }
        )
        msg.validate()
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser can follow.
        raise ProtocolError(f"bad {mtype.name} message: {exc}") from exc
    return msg
