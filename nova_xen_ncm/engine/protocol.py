"""The control and data protocol between a source and a destination.

Sans-I/O, as h11: a :class:`Connection` takes bytes in
(:meth:`Connection.receive_data`) and hands messages out
(:meth:`Connection.next_event`); sending a message returns the buffers to
write. It never touches a socket; :mod:`nova_xen_ncm.engine.transport`
does. The source is the client (it connects), the destination the server.

Frames. Every message travels in one frame::

    header   !HBBIQ  type, flags, reserved (0), payload length, counter
    payload  length octets
    tag      16 octets GMAC, once the connection is established

``counter`` numbers the frames of each direction from 0; a frame whose
counter is not the next one is refused, so a replayed or reordered frame
is caught. The tag is GMAC (AES-256-GCM with no plaintext and the frame,
header and payload, as additional data) under the direction's key, with
the counter as nonce: each key serves one connection and its counters
never repeat, and GMAC costs a small fraction of the socket copy it
guards (HMAC-SHA256 cost more than the copy).

Control payloads are JSON objects with exactly the fields of
their message; a DATA payload is the channel sequence number (!Q) and the
body (the stream codec's records), lz4-compressed when flag LZ4 is set
(allowed once both ends negotiated the ``lz4`` capability). Flag PAGES
says the body is exactly one libxc PAGE_DATA record, which a destination
may read straight into guest memory and which may travel on any channel
(several channels share out the page batches of a round). Sequence
numbers run 1, 2, ... per channel; ACK carries the highest one applied.
Every length is checked against a limit before anything is buffered.

Handshake (one per connection, data channels included)::

    client HELLO      versions, capabilities, migration id, channel, nonce
    server CHALLENGE  version, capabilities, nonce    (or REFUSE)
    client AUTH       proof                 | RESUME  proof, last acked seq
    server WELCOME    proof, resume_from                 (or REFUSE)

The one-time migration token never crosses the wire: the proofs are
HMAC-SHA256 under the token over a hash of HELLO and CHALLENGE (both
nonces, the migration id, the channel), the server's proof covers the
client's so each side knows the other holds the token. Frame keys, one per
direction, are derived the same way, so frames of another connection or
migration fail their tag. A client reconnecting a channel that broke
sends RESUME instead of AUTH, with the last ACK it got; WELCOME answers
with the highest sequence the server applied, and the client sends on
from there without repeating completed rounds.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import secrets
import struct
import typing
import uuid as uuidlib
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes

from nova_xen_ncm.engine import compression
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

FRAME_HEADER = struct.Struct("!HBBIQ")
DATA_HEADER = struct.Struct("!Q")
TAG_SIZE = 16
PROOF_SIZE = hashlib.sha256().digest_size
NONCE_SIZE = 32
TOKEN_MIN_SIZE = 16

FLAG_LZ4 = 0x01
FLAG_PAGES = 0x02
KNOWN_FLAGS = FLAG_LZ4 | FLAG_PAGES

# Control messages are small; anything bigger is an attack or a bug.
MAX_CONTROL_PAYLOAD = 64 * 1024
DEFAULT_MAX_DATA = 16 * 1024 * 1024
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

    def validate(self) -> None:
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


# -- the connection state machine -------------------------------------


class State(str, enum.Enum):
    START = "start"
    HELLO = "hello"
    CHALLENGE = "challenge"
    PROOF = "proof"
    ESTABLISHED = "established"
    CLOSED = "closed"


C, S = Role.CLIENT, Role.SERVER
M = MessageType

# (state, sender, message) -> next state. Both ends of a connection walk
# this table, one on sending and the other on receiving.
HANDSHAKE: dict[tuple[State, Role, MessageType], State] = {
    (State.START, C, M.HELLO): State.HELLO,
    (State.HELLO, S, M.CHALLENGE): State.CHALLENGE,
    (State.HELLO, S, M.REFUSE): State.CLOSED,
    (State.CHALLENGE, C, M.AUTH): State.PROOF,
    (State.CHALLENGE, C, M.RESUME): State.PROOF,
    (State.PROOF, S, M.WELCOME): State.ESTABLISHED,
    (State.PROOF, S, M.REFUSE): State.CLOSED,
}

# Who may send what once established (the state stays ESTABLISHED).
ESTABLISHED: dict[MessageType, frozenset[Role]] = {
    M.SETUP: frozenset({C}),
    M.SETUP_REPLY: frozenset({S}),
    M.DATA: frozenset({C}),
    M.ACK: frozenset({S}),
    M.READY: frozenset({S}),
    M.COMMIT: frozenset({C}),
    M.COMMITTED: frozenset({S}),
    M.QUERY: frozenset({C}),
    M.STATUS: frozenset({S}),
    M.FINISHED: frozenset({C}),
    M.ABORT: frozenset({C, S}),
    M.ERROR: frozenset({C, S}),
}


def next_state(state: State, sender: Role, mtype: MessageType) -> State:
    """The state after ``sender`` sent ``mtype`` in ``state``."""
    if state is State.ESTABLISHED:
        if sender in ESTABLISHED.get(mtype, ()):
            return state
    else:
        target = HANDSHAKE.get((state, sender, mtype))
        if target is not None:
            return target
    raise ProtocolError(
        f"{mtype.name} from the {sender.value} is not allowed in state "
        f"{state.value}"
    )


def generate_token() -> bytes:
    """A fresh one-time migration token."""
    return secrets.token_bytes(32)


def _mac(key: bytes, *parts: Buffer) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


class FrameTag:
    """The GMAC of one frame under a direction's key, fed incrementally
    (a page frame's body arrives a run of pages at a time)."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, counter: int) -> None:
        nonce = _NONCE_PREFIX + counter.to_bytes(8, "big")
        self._ctx = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()

    def update(self, data: Buffer) -> None:
        self._ctx.authenticate_additional_data(data)

    def digest(self) -> bytes:
        self._ctx.finalize()
        return self._ctx.tag


_NONCE_PREFIX = bytes(4)


def frame_tag(key: bytes, counter: int, *parts: Buffer) -> bytes:
    """The tag of the frame numbered ``counter`` made of ``parts``."""
    tag = FrameTag(key, counter)
    for part in parts:
        tag.update(part)
    return tag.digest()


# -- payload codec ----------------------------------------------------


def _check_field(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
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


_HINTS: dict[type[Message], dict[str, Any]] = {
    cls: {
        f.name: typing.get_type_hints(cls)[f.name]
        for f in dataclasses.fields(cls)
    }
    for cls in MESSAGES.values()
}


def encode_message(msg: Message) -> bytes:
    return json.dumps(
        dataclasses.asdict(msg), separators=(",", ":"), sort_keys=True
    ).encode()


def decode_message(mtype: MessageType, payload: Buffer) -> Message:
    cls = MESSAGES[mtype]
    try:
        obj = json.loads(bytes(payload))
        if not isinstance(obj, dict):
            raise ValueError("payload is not an object")
        hints = _HINTS[cls]
        if set(obj) != set(hints):
            raise ValueError(
                f"fields {sorted(obj)} instead of {sorted(hints)}"
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


# -- the connection ---------------------------------------------------


class _Recv(enum.Enum):
    HEADER = "header"
    PAYLOAD = "payload"
    TAG = "tag"


class Connection:
    """One end of one connection (control or data channel).

    ``max_data`` bounds a data frame's body (after decompression).
    ``direct_payload`` makes uncompressed DATA frames come out as
    :class:`DataHeader`, body read by the caller straight into its own
    memory (:meth:`take_payload`, :meth:`payload_received`), then
    :class:`DataEnd`; otherwise they come out whole as :class:`Data`.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_data: int = DEFAULT_MAX_DATA,
        direct_payload: bool = False,
    ) -> None:
        self.role = Role(role)
        self.peer_role = S if self.role is C else C
        self.max_data = max_data
        self.direct_payload = direct_payload
        self.state = State.START
        self.version: int | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.hello: Hello | None = None
        self.resume: Resume | None = None
        self.resume_from: int | None = None
        #: Client: the last DATA sequence sent; server: the last received.
        #: Sequences run 1, 2, ... per channel and go on from
        #: ``resume_from`` after a RESUME.
        self.last_seq = 0
        #: The highest sequence acknowledged (received or sent).
        self.acked = 0
        self._token: bytes | None = None
        self._hello_payload = b""
        self._transcript = b""
        self._client_proof = b""
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._send_counter = 0
        self._recv_counter = 0
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None
        # Receiving a frame: where we are, and the frame being read.
        self._recv = _Recv.HEADER
        self._frame_mac: FrameTag | None = None
        self._frame_seq = 0
        self._payload_left = 0

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    # -- sending --

    def send(self, msg: Message) -> list[Buffer]:
        """The frame of a control message, as buffers to write."""
        msg.validate()
        next_state(self.state, self.role, msg.TYPE)
        if isinstance(msg, Ack):
            if not self.acked <= msg.seq <= self.last_seq:
                raise ValueError(
                    f"ACK {msg.seq} outside the received range "
                    f"{self.acked}..{self.last_seq}"
                )
        payload = encode_message(msg)
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"{msg.TYPE.name} message too large")
        out = self._frame_out(msg.TYPE, 0, [payload])
        if isinstance(msg, Ack):
            self.acked = msg.seq
        return out

    def send_data(
        self,
        seq: int,
        buffers: Sequence[Buffer],
        *,
        compress: bool = False,
        pages: bool = False,
    ) -> list[Buffer]:
        """A DATA frame of sequence ``seq`` carrying ``buffers``, which
        are handed back in the result uncopied unless compressed.
        ``seq`` must follow the previous frame's (or ``resume_from``);
        ``pages`` flags a body of exactly one PAGE_DATA record."""
        if seq != self.last_seq + 1:
            raise ValueError(
                f"DATA sequence {seq} does not follow {self.last_seq}"
            )
        length = sum(memoryview(b).nbytes for b in buffers)
        if length > self.max_data:
            raise ValueError(
                f"data frame of {length} bytes over the {self.max_data} limit"
            )
        if compress and Capability.LZ4.value not in self.capabilities:
            raise ValueError("lz4 was not negotiated on this connection")
        flags = FLAG_PAGES if pages else 0
        body: list[Buffer] = list(buffers)
        if compress:
            packed = compression.compress(buffers)
            # Incompressible pages go as they are.
            if len(packed) < length:
                body, flags = [packed], flags | FLAG_LZ4
        out = self._frame_out(
            MessageType.DATA, flags, [DATA_HEADER.pack(seq), *body]
        )
        self.last_seq = seq
        return out

    def _frame_out(
        self, mtype: MessageType, flags: int, parts: list[Buffer]
    ) -> list[Buffer]:
        if self._error is not None and mtype is not MessageType.REFUSE:
            raise self._error
        state = next_state(self.state, self.role, mtype)
        length = sum(memoryview(p).nbytes for p in parts)
        header = FRAME_HEADER.pack(mtype, flags, 0, length, self._send_counter)
        out: list[Buffer] = [header, *parts]
        if self._send_key is not None:
            out.append(
                frame_tag(self._send_key, self._send_counter, header, *parts)
            )
        self._send_counter += 1
        self._advance(state)
        return out

    # Handshake helpers: they build the messages whose fields are proofs.

    def send_hello(
        self,
        migration_id: str,
        channel: int = 0,
        capabilities: Sequence[str] = (),
        versions: Sequence[int] = SUPPORTED_VERSIONS,
    ) -> list[Buffer]:
        hello = Hello(
            versions=tuple(versions),
            capabilities=tuple(capabilities),
            migration_id=migration_id,
            channel=channel,
            nonce=secrets.token_hex(NONCE_SIZE),
        )
        self.hello = hello
        self._hello_payload = encode_message(hello)
        return self.send(hello)

    def send_challenge(
        self, token: bytes, capabilities: Sequence[str] = ()
    ) -> list[Buffer]:
        """Server: challenge the HELLO received. Raises ProtocolError if
        no version is common (then send REFUSE with VERSION)."""
        if self.hello is None or self.state is not State.HELLO:
            raise RuntimeError("a challenge answers a HELLO received")
        common = set(self.hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                f"no common protocol version: peer offers "
                f"{list(self.hello.versions)}, this end "
                f"{list(SUPPORTED_VERSIONS)}"
            )
        _check_token(token)
        self._token = token
        self.version = max(common)
        self.capabilities = frozenset(self.hello.capabilities) & frozenset(
            capabilities
        )
        challenge = Challenge(
            version=self.version,
            capabilities=tuple(sorted(self.capabilities)),
            nonce=secrets.token_hex(NONCE_SIZE),
        )
        self._set_transcript(encode_message(challenge))
        return self.send(challenge)

    def send_auth(
        self, token: bytes, last_acked: int | None = None
    ) -> list[Buffer]:
        """Client: prove the token, as AUTH or (``last_acked`` given) as
        RESUME of a channel that was connected before."""
        _check_token(token)
        self._token = token
        if last_acked is None:
            self._client_proof = self._client_mac(MessageType.AUTH, 0)
            return self.send(Auth(proof=self._client_proof.hex()))
        self._client_proof = self._client_mac(MessageType.RESUME, last_acked)
        return self.send(
            Resume(proof=self._client_proof.hex(), last_acked=last_acked)
        )

    def send_welcome(self, resume_from: int = 0) -> list[Buffer]:
        """Server: accept the proven client; ``resume_from`` is the highest
        sequence applied on this channel (0 for a new one)."""
        proof = self._server_mac(resume_from)
        out = self.send(Welcome(proof=proof.hex(), resume_from=resume_from))
        self.last_seq = self.acked = resume_from
        return out

    def refuse(self, code: RefuseReason, text: str) -> list[Buffer]:
        return self.send(Refuse(code=RefuseReason(code).value, text=text))

    def _set_transcript(self, challenge_payload: bytes) -> None:
        self._transcript = hashlib.sha256(
            b"nova-xen-ncm/1\0"
            + self._hello_payload
            + b"\0"
            + challenge_payload
        ).digest()

    def _client_mac(self, mtype: MessageType, last_acked: int) -> bytes:
        assert self._token is not None
        return _mac(
            self._token,
            b"client proof\0",
            self._transcript,
            struct.pack("!BQ", mtype, last_acked),
        )

    def _server_mac(self, resume_from: int) -> bytes:
        assert self._token is not None
        return _mac(
            self._token,
            b"server proof\0",
            self._transcript,
            self._client_proof,
            struct.pack("!Q", resume_from),
        )

    def _derive_keys(self) -> None:
        assert self._token is not None
        c2s = _mac(self._token, b"frame key c2s\0", self._transcript)
        s2c = _mac(self._token, b"frame key s2c\0", self._transcript)
        if self.role is C:
            self._send_key, self._recv_key = c2s, s2c
        else:
            self._send_key, self._recv_key = s2c, c2s

    def _advance(self, state: State) -> None:
        # WELCOME is the last plain frame; both ends key up after it.
        if state is State.ESTABLISHED and self.state is State.PROOF:
            self._derive_keys()
        self.state = state

    # -- receiving --

    def receive_data(self, data: Buffer) -> None:
        """Bytes from the peer; empty means the peer closed."""
        if not data:
            self._eof = True
            return
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Event:
        """The next event, :data:`NEED_DATA`, or raise ProtocolError."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        if self._recv is _Recv.PAYLOAD:
            raise RuntimeError(
                f"{self._payload_left} body bytes of data frame "
                f"{self._frame_seq} not read yet"
            )
        if self._recv is _Recv.TAG:
            return self._finish_direct()
        if self.buffered < FRAME_HEADER.size:
            return self._need(0)
        mtype, flags, length, counter = self._read_header()
        authenticated = self._recv_key is not None
        tag = TAG_SIZE if authenticated else 0
        if (
            mtype is MessageType.DATA
            and self.direct_payload
            and not flags & FLAG_LZ4
        ):
            if self.buffered < FRAME_HEADER.size + DATA_HEADER.size:
                return self._need(FRAME_HEADER.size + DATA_HEADER.size)
            return self._start_direct(length, flags)
        total = FRAME_HEADER.size + length + tag
        if self.buffered < total:
            return self._need(total)
        start = self._pos
        frame = memoryview(self._buf)[start : start + total]
        try:
            header = frame[: FRAME_HEADER.size]
            payload = frame[FRAME_HEADER.size : FRAME_HEADER.size + length]
            if authenticated:
                expected = frame_tag(
                    self._recv_key, self._recv_counter, header, payload
                )
                if not hmac.compare_digest(expected, frame[-TAG_SIZE:]):
                    raise AuthenticationError(
                        f"{mtype.name} frame {counter}: "
                        "authentication tag mismatch"
                    )
            payload = bytes(payload)
        finally:
            frame.release()
        self._pos += total
        self._recv_counter += 1
        if mtype is MessageType.DATA:
            event = self._data(flags, payload)
        else:
            event = self._receive_message(mtype, payload)
        return event

    def _need(self, total: int) -> _NeedData | ConnectionClosed:
        if self._eof:
            if self.buffered == 0 and total == 0:
                return ConnectionClosed()
            raise ProtocolError(
                f"connection closed inside a frame ({self.buffered} of "
                f"{max(total, FRAME_HEADER.size)} bytes)"
            )
        return NEED_DATA

    def _read_header(self) -> tuple[MessageType, int, int, int]:
        raw_type, flags, reserved, length, counter = FRAME_HEADER.unpack_from(
            self._buf, self._pos
        )
        try:
            mtype = MessageType(raw_type)
        except ValueError:
            raise ProtocolError(
                f"unknown message type {raw_type:#06x} in frame "
                f"{self._recv_counter}"
            ) from None
        if reserved or flags & ~KNOWN_FLAGS:
            raise ProtocolError(
                f"{mtype.name} frame: unknown flags {flags:#x}/{reserved:#x}"
            )
        if flags & FLAG_LZ4 and mtype is not MessageType.DATA:
            raise ProtocolError(f"{mtype.name} frame marked compressed")
        if flags & FLAG_PAGES and mtype is not MessageType.DATA:
            raise ProtocolError(f"{mtype.name} frame marked as page data")
        if flags & FLAG_LZ4 and Capability.LZ4.value not in self.capabilities:
            raise ProtocolError("lz4 frame, but lz4 was not negotiated")
        limit = (
            DATA_HEADER.size + self.max_data
            if mtype is MessageType.DATA
            else MAX_CONTROL_PAYLOAD
        )
        if length > limit:
            raise ProtocolError(
                f"{mtype.name} frame of {length} bytes over the {limit} "
                "byte limit"
            )
        if mtype is MessageType.DATA and length < DATA_HEADER.size:
            raise ProtocolError("DATA frame shorter than its header")
        if counter != self._recv_counter:
            what = "replayed" if counter < self._recv_counter else "skipped"
            raise ProtocolError(
                f"{mtype.name} frame {counter} {what}: expected frame "
                f"{self._recv_counter}"
            )
        # Refuse a message the state does not allow before reading it.
        next_state(self.state, self.peer_role, mtype)
        return mtype, flags, length, counter

    def _next_seq(self, seq: int) -> None:
        if seq != self.last_seq + 1:
            raise ProtocolError(
                f"DATA sequence {seq} does not follow {self.last_seq}"
            )
        self.last_seq = seq

    def _data(self, flags: int, payload: bytes) -> Data:
        (seq,) = DATA_HEADER.unpack_from(payload)
        self._next_seq(seq)
        body = memoryview(payload)[DATA_HEADER.size :]
        if flags & FLAG_LZ4:
            body = compression.decompress(body, self.max_data)
        return Data(seq=seq, payload=body, pages=bool(flags & FLAG_PAGES))

    def _receive_message(self, mtype: MessageType, payload: bytes) -> Event:
        msg = decode_message(mtype, payload)
        state = next_state(self.state, self.peer_role, mtype)
        if isinstance(msg, Hello):
            self.hello = msg
            self._hello_payload = payload
        elif isinstance(msg, Challenge):
            self._receive_challenge(msg, payload)
        elif isinstance(msg, (Auth, Resume)):
            # Advance first: a server whose client failed the proof is in
            # PROOF, where it may still send REFUSE.
            self._advance(state)
            self._verify_client(msg)
            return msg
        elif isinstance(msg, Welcome):
            self._verify_server(msg)
        elif isinstance(msg, Ack):
            if not self.acked <= msg.seq <= self.last_seq:
                raise ProtocolError(
                    f"ACK {msg.seq} outside the sent range "
                    f"{self.acked}..{self.last_seq}"
                )
            self.acked = msg.seq
        self._advance(state)
        return msg

    def _receive_challenge(self, msg: Challenge, payload: bytes) -> None:
        assert self.hello is not None
        if msg.version not in self.hello.versions:
            raise ProtocolError(
                f"server chose version {msg.version}, not offered"
            )
        extra = set(msg.capabilities) - set(self.hello.capabilities)
        if extra:
            raise ProtocolError(
                f"server chose capabilities not offered: {sorted(extra)}"
            )
        self.version = msg.version
        self.capabilities = frozenset(msg.capabilities)
        self._set_transcript(payload)

    def _verify_client(self, msg: Auth | Resume) -> None:
        if isinstance(msg, Resume):
            expected = self._client_mac(MessageType.RESUME, msg.last_acked)
            self.resume = msg
        else:
            expected = self._client_mac(MessageType.AUTH, 0)
        if not hmac.compare_digest(expected.hex(), msg.proof):
            raise AuthenticationError(
                f"wrong token proof for migration "
                f"{self.hello.migration_id if self.hello else '?'}"
            )
        self._client_proof = expected

    def _verify_server(self, msg: Welcome) -> None:
        expected = self._server_mac(msg.resume_from)
        if not hmac.compare_digest(expected.hex(), msg.proof):
            raise AuthenticationError(
                "the destination's proof is wrong: it does not hold the "
                "migration token"
            )
        self.resume_from = msg.resume_from
        self.last_seq = self.acked = msg.resume_from

    # -- direct payload --

    def _start_direct(self, length: int, flags: int) -> DataHeader:
        header = memoryview(self._buf)[
            self._pos : self._pos + FRAME_HEADER.size + DATA_HEADER.size
        ]
        try:
            (seq,) = DATA_HEADER.unpack_from(header, FRAME_HEADER.size)
            self._next_seq(seq)
            self._frame_mac = None
            if self._recv_key is not None:
                self._frame_mac = FrameTag(self._recv_key, self._recv_counter)
                self._frame_mac.update(header)
        finally:
            header.release()
        self._pos += FRAME_HEADER.size + DATA_HEADER.size
        self._frame_seq = seq
        self._payload_left = length - DATA_HEADER.size
        self._recv = _Recv.PAYLOAD if self._payload_left else _Recv.TAG
        return DataHeader(
            seq=seq,
            length=self._payload_left,
            pages=bool(flags & FLAG_PAGES),
        )

    @property
    def payload_left(self) -> int:
        """Body bytes of the current direct data frame still to read."""
        return self._payload_left

    def take_payload(self, view: memoryview) -> int:
        """Copy body bytes already buffered here into ``view``; returns
        how many. The caller reads the rest from the socket."""
        if self._recv is not _Recv.PAYLOAD:
            raise RuntimeError("no data frame body is being read")
        n = min(len(view), self._payload_left, self.buffered)
        if n:
            with memoryview(self._buf) as buf:
                view[:n] = buf[self._pos : self._pos + n]
            self._consume(view[:n])
            self._pos += n
        return n

    def payload_received(self, view: memoryview) -> None:
        """The caller read ``view`` (body bytes) from the socket itself."""
        if self._recv is not _Recv.PAYLOAD:
            raise RuntimeError("no data frame body is being read")
        if len(view) > self._payload_left:
            raise ValueError(
                f"{len(view)} bytes read, {self._payload_left} left in frame"
            )
        self._consume(view)

    def _consume(self, view: memoryview) -> None:
        if self._frame_mac is not None:
            self._frame_mac.update(view)
        self._payload_left -= len(view)
        if not self._payload_left:
            self._recv = _Recv.TAG

    def _finish_direct(self) -> Event:
        if self._frame_mac is None:
            self._recv = _Recv.HEADER
            self._recv_counter += 1
            return DataEnd(seq=self._frame_seq)
        if self.buffered < TAG_SIZE:
            if self._eof:
                raise ProtocolError("connection closed before a frame tag")
            return NEED_DATA
        tag = bytes(self._buf[self._pos : self._pos + TAG_SIZE])
        if not hmac.compare_digest(self._frame_mac.digest(), tag):
            raise AuthenticationError(
                f"DATA frame {self._recv_counter}: authentication tag mismatch"
            )
        self._pos += TAG_SIZE
        self._frame_mac = None
        self._recv = _Recv.HEADER
        self._recv_counter += 1
        return DataEnd(seq=self._frame_seq)


def _check_token(token: bytes) -> None:
    if not isinstance(token, bytes) or len(token) < TOKEN_MIN_SIZE:
        raise ValueError(
            f"a migration token is at least {TOKEN_MIN_SIZE} random bytes"
        )
