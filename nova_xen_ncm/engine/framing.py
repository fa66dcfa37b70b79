"""Framing: one end of one connection, sans-I/O.

As h11: a :class:`Connection` takes bytes in (:meth:`Connection.
receive_data`) and hands events out (:meth:`Connection.next_event`);
sending a message returns the buffers to write. It never touches a socket;
:mod:`nova_xen_ncm.engine.transport` does. The source is the client (it
connects), the destination the server.

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

No tag is sent or expected when the ends negotiated ``tls-frames`` (the
connection is mutual TLS, whose AEAD authenticates every octet inside the
copy it makes anyway: a second MAC pays twice for the same guarantee) or
``unauthenticated-frames`` (both ends allow plain DATA frames on an
isolated network; control frames keep their tag there), nor under
``encrypted-frames``: there every established frame's payload is
encrypted with AES-256-GCM under the direction's key
(:func:`handshake.encrypted_frame_keys`, from both ends' nonces, which
crossed only inside mutual TLS, and the token), the counter as nonce and
the header as associated data; the 16-octet tag that follows the
ciphertext is GCM's, and authentication is fused into the one pass that
encrypts (the transport leaves TLS after WELCOME). The transport
offers and chooses them from the socket and the configuration;
capabilities are part of the transcript both proofs cover, so neither
can be added or stripped on the way.

A DATA payload is the channel sequence number (!Q) and the body (the
stream codec's records), lz4-compressed when flag LZ4 is set (allowed once
both ends negotiated the ``lz4`` capability). Flag PAGES says the body is
exactly one libxc PAGE_DATA record, which a destination may read straight
into guest memory and which may travel on any channel (several channels
share out the page batches of a round). Sequence numbers run 1, 2, ... per
channel; ACK carries the highest one applied. Every length is checked
against a limit before anything is buffered. Messages are
:mod:`.messages`, the handshake's state machine, proofs and keys
:mod:`.handshake`.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Sequence

from nova_xen_ncm.engine import compression
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.handshake import TAG_SIZE
from nova_xen_ncm.engine.handshake import FrameOpener
from nova_xen_ncm.engine.handshake import FrameSealer
from nova_xen_ncm.engine.handshake import FrameTag
from nova_xen_ncm.engine.handshake import State
from nova_xen_ncm.engine.handshake import frame_tag
from nova_xen_ncm.engine.handshake import next_state
from nova_xen_ncm.engine.messages import NEED_DATA
from nova_xen_ncm.engine.messages import PROTOCOL_VERSION
from nova_xen_ncm.engine.messages import SUPPORTED_VERSIONS
from nova_xen_ncm.engine.messages import Ack
from nova_xen_ncm.engine.messages import Auth
from nova_xen_ncm.engine.messages import Buffer
from nova_xen_ncm.engine.messages import Capability
from nova_xen_ncm.engine.messages import Challenge
from nova_xen_ncm.engine.messages import ConnectionClosed
from nova_xen_ncm.engine.messages import Data
from nova_xen_ncm.engine.messages import DataEnd
from nova_xen_ncm.engine.messages import DataHeader
from nova_xen_ncm.engine.messages import Event
from nova_xen_ncm.engine.messages import Hello
from nova_xen_ncm.engine.messages import Message
from nova_xen_ncm.engine.messages import MessageType
from nova_xen_ncm.engine.messages import Refuse
from nova_xen_ncm.engine.messages import RefuseReason
from nova_xen_ncm.engine.messages import Resume
from nova_xen_ncm.engine.messages import Role
from nova_xen_ncm.engine.messages import Welcome
from nova_xen_ncm.engine.messages import _NeedData
from nova_xen_ncm.engine.messages import decode_message
from nova_xen_ncm.engine.messages import encode_message

FRAME_HEADER = struct.Struct("!HBBIQ")
DATA_HEADER = struct.Struct("!Q")

FLAG_LZ4 = 0x01
FLAG_PAGES = 0x02
KNOWN_FLAGS = FLAG_LZ4 | FLAG_PAGES

# Control messages are small; anything bigger is an attack or a bug.
MAX_CONTROL_PAYLOAD = 64 * 1024
DEFAULT_MAX_DATA = 16 * 1024 * 1024

C, S = Role.CLIENT, Role.SERVER

# A direct-mode read at a frame boundary: a tag and the next headers;
# made only after a data frame body of at least _BULK_BODY octets.
_SMALL_READ = 64
_BULK_BODY = 256 * 1024

# Capabilities under which established data frames carry no GMAC over
# their plaintext (encrypted frames carry GCM's tag of their ciphertext).
_UNTAGGED = frozenset(
    {
        Capability.TLS_FRAMES.value,
        Capability.UNAUTHENTICATED_FRAMES.value,
        Capability.ENCRYPTED_FRAMES.value,
    }
)

# Encrypted payloads of at least this many octets are sealed into the
# connection's reused buffer (a page frame, written before the next one
# is built); smaller ones (control) into a buffer of their own.
_SEAL_REUSE = 64 * 1024


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
        self._challenge: Challenge | None = None
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
        # encrypted-frames: payloads encrypted under the keys above.
        self._encrypted = False
        self._seal_buf = bytearray()
        self._send_counter = 0
        self._recv_counter = 0
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None
        # Receiving a frame: where we are, and the frame being read.
        self._recv = _Recv.HEADER
        self._frame_mac: FrameTag | None = None
        self._frame_opener: FrameOpener | None = None
        self._frame_seq = 0
        self._payload_left = 0
        # Octets the frame being read needs in the buffer (0: a header).
        self._wanted = 0
        # The body length of the last direct data frame.
        self._last_body = 0

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
        # Handshake messages are the same in every version.
        payload = encode_message(msg, self.version or PROTOCOL_VERSION)
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
        if self._encrypted:
            out = self._seal(header, parts, length)
        else:
            out = [header, *parts]
            if self._send_key is not None and self._tagged(mtype):
                out.append(
                    frame_tag(
                        self._send_key, self._send_counter, header, *parts
                    )
                )
        self._send_counter += 1
        self._advance(state)
        return out

    def _seal(
        self, header: bytes, parts: list[Buffer], length: int
    ) -> list[Buffer]:
        """The frame with its payload encrypted and GCM's tag after it.
        A large payload is sealed into the reused buffer, valid until the
        next frame is built (the channel writes each frame at once)."""
        assert self._send_key is not None
        if length >= _SEAL_REUSE:
            if len(self._seal_buf) < length:
                self._seal_buf = bytearray(length)
            target = self._seal_buf
        else:
            target = bytearray(length)
        sealer = FrameSealer(self._send_key, self._send_counter, header)
        with memoryview(target) as out:
            offset = 0
            for part in parts:
                offset += sealer.update_into(part, out[offset:])
            sealed = out[:length].toreadonly()
        return [header, sealed, sealer.tag()]

    @property
    def frames_encrypted(self) -> bool:
        """Whether established frames carry their payload encrypted
        (``encrypted-frames``): read with :meth:`decrypt_payload`."""
        return self._encrypted

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
            nonce=handshake.new_nonce(),
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
        handshake.check_token(token)
        self._token = token
        self.version = max(common)
        self.capabilities = frozenset(self.hello.capabilities) & frozenset(
            capabilities
        )
        challenge = Challenge(
            version=self.version,
            capabilities=tuple(sorted(self.capabilities)),
            nonce=handshake.new_nonce(),
        )
        self._challenge = challenge
        self._set_transcript(encode_message(challenge))
        return self.send(challenge)

    def send_auth(
        self, token: bytes, last_acked: int | None = None
    ) -> list[Buffer]:
        """Client: prove the token, as AUTH or (``last_acked`` given) as
        RESUME of a channel that was connected before."""
        handshake.check_token(token)
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
        self._transcript = handshake.transcript(
            self._hello_payload, challenge_payload
        )

    def _client_mac(self, mtype: MessageType, last_acked: int) -> bytes:
        assert self._token is not None
        return handshake.client_proof(
            self._token, self._transcript, mtype, last_acked
        )

    def _server_mac(self, resume_from: int) -> bytes:
        assert self._token is not None
        return handshake.server_proof(
            self._token, self._transcript, self._client_proof, resume_from
        )

    @property
    def frames_tagged(self) -> bool:
        """Whether established DATA frames carry a GMAC tag over their
        plaintext (control frames do unless the connection is TLS;
        ``encrypted-frames`` encrypts and authenticates every frame in
        one pass instead: :attr:`frames_encrypted`)."""
        return not self.capabilities & _UNTAGGED

    def _tagged(self, mtype: MessageType) -> bool:
        """Whether an established frame of ``mtype`` carries a tag."""
        return self.frames_tagged or mtype is not MessageType.DATA

    def _derive_keys(self) -> None:
        assert self._token is not None
        # Without tags on the data, control frames (READY's digests,
        # COMMIT, COMMITTED, REFUSE) stay tagged: they are few, and one
        # forged would run the guest on both hosts or on neither.
        if Capability.TLS_FRAMES.value in self.capabilities:
            return
        if Capability.ENCRYPTED_FRAMES.value in self.capabilities:
            assert self.hello is not None and self._challenge is not None
            self._send_key, self._recv_key = handshake.encrypted_frame_keys(
                self._token,
                self._transcript,
                bytes.fromhex(self.hello.nonce),
                bytes.fromhex(self._challenge.nonce),
                self.role,
            )
            self._encrypted = True
            return
        self._send_key, self._recv_key = handshake.frame_keys(
            self._token, self._transcript, self.role
        )

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

    def read_hint(self, limit: int) -> int:
        """How many octets the next socket read should ask for, at most
        ``limit``. In direct mode a read stops near the frame boundary
        (a header, a tag, or the rest of a frame read whole), so a data
        frame's body is left in the socket for the caller to read
        straight into place instead of being copied out of this buffer:
        only after a large data frame, as each read lets the other
        threads take the GIL; small frames (control, the last dirty
        pages) come in one read for many."""
        if not self.direct_payload or self._last_body < _BULK_BODY:
            return limit
        return max(
            1, min(limit, max(_SMALL_READ, self._wanted - self.buffered))
        )

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
        authenticated = self._recv_key is not None and (
            self._encrypted or self._tagged(mtype)
        )
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
            if self._encrypted:
                payload = self._open(mtype, counter, header, payload, frame)
            elif authenticated:
                expected = frame_tag(
                    self._recv_key, self._recv_counter, header, payload
                )
                if not hmac.compare_digest(expected, frame[-TAG_SIZE:]):
                    raise AuthenticationError(
                        f"{mtype.name} frame {counter}: "
                        "authentication tag mismatch"
                    )
            if not isinstance(payload, bytes):
                payload = bytes(payload)
        finally:
            frame.release()
        self._pos += total
        self._wanted = 0
        self._recv_counter += 1
        if mtype is MessageType.DATA:
            event = self._data(flags, payload)
        else:
            event = self._receive_message(mtype, payload)
        return event

    def _open(
        self,
        mtype: MessageType,
        counter: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> bytes:
        """The plaintext of a whole encrypted frame, once its tag holds."""
        assert self._recv_key is not None
        opener = FrameOpener(self._recv_key, counter, header)
        plain = bytearray(payload.nbytes)
        if payload.nbytes:
            opener.update_into(payload, memoryview(plain))
        if not opener.verify(frame[-TAG_SIZE:]):
            raise AuthenticationError(
                f"{mtype.name} frame {counter}: authentication tag "
                "mismatch (encrypted frame altered, or keys differ)"
            )
        return bytes(plain)

    def _need(self, total: int) -> _NeedData | ConnectionClosed:
        self._wanted = total
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
        msg = decode_message(mtype, payload, self.version or PROTOCOL_VERSION)
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
        self._challenge = msg
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
            self._frame_mac = None
            self._frame_opener = None
            if self._encrypted:
                assert self._recv_key is not None
                self._frame_opener = FrameOpener(
                    self._recv_key,
                    self._recv_counter,
                    header[: FRAME_HEADER.size],
                )
                clear = self._frame_opener.update(header[FRAME_HEADER.size :])
                (seq,) = DATA_HEADER.unpack_from(clear)
                if seq != self.last_seq + 1:
                    # Not yet authenticated: altered, or out of order.
                    raise ProtocolError(
                        f"DATA frame {self._recv_counter}: sequence {seq} "
                        f"does not follow {self.last_seq} (frame altered "
                        "or out of order)"
                    )
            else:
                (seq,) = DATA_HEADER.unpack_from(header, FRAME_HEADER.size)
            self._next_seq(seq)
            if self._recv_key is not None and self.frames_tagged:
                self._frame_mac = FrameTag(self._recv_key, self._recv_counter)
                self._frame_mac.update(header)
        finally:
            header.release()
        self._pos += FRAME_HEADER.size + DATA_HEADER.size
        self._wanted = 0
        self._frame_seq = seq
        self._payload_left = length - DATA_HEADER.size
        self._last_body = self._payload_left
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
                if self._frame_opener is not None:
                    self._frame_opener.update_into(
                        buf[self._pos : self._pos + n], view[:n]
                    )
                else:
                    view[:n] = buf[self._pos : self._pos + n]
            self._consume(view[:n])
            self._pos += n
        return n

    def decrypt_payload(self, ciphertext: Buffer, view: memoryview) -> None:
        """Encrypted frames: the caller read ``ciphertext`` (body octets)
        from the socket; its plaintext goes into ``view`` (as long). It is
        not authenticated until the frame's :class:`DataEnd`: a caller
        uses nothing of it before (a destination discards the restoring
        guest, never run, when a frame fails)."""
        if self._recv is not _Recv.PAYLOAD or self._frame_opener is None:
            raise RuntimeError("no encrypted data frame body is being read")
        n = memoryview(ciphertext).nbytes
        if n != view.nbytes or n > self._payload_left:
            raise ValueError(
                f"{n} octets read into {view.nbytes}, "
                f"{self._payload_left} left in the frame"
            )
        self._frame_opener.update_into(ciphertext, view)
        self._consume(view)

    def payload_received(self, view: memoryview) -> None:
        """The caller read ``view`` (body bytes) from the socket itself."""
        if self._recv is not _Recv.PAYLOAD:
            raise RuntimeError("no data frame body is being read")
        if self._frame_opener is not None:
            raise RuntimeError(
                "an encrypted frame's body is read with decrypt_payload"
            )
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
        if self._frame_opener is not None:
            if self.buffered < TAG_SIZE:
                if self._eof:
                    raise ProtocolError("connection closed before a frame tag")
                return NEED_DATA
            with memoryview(self._buf) as buf:
                held = self._frame_opener.verify(
                    buf[self._pos : self._pos + TAG_SIZE]
                )
            if not held:
                raise AuthenticationError(
                    f"DATA frame {self._recv_counter}: authentication tag "
                    "mismatch (encrypted frame altered, or keys differ)"
                )
            self._pos += TAG_SIZE
            self._frame_opener = None
            self._recv = _Recv.HEADER
            self._recv_counter += 1
            return DataEnd(seq=self._frame_seq)
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
