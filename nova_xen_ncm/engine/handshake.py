"""The handshake: who may send what when, and the proofs and keys.

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
migration fail their tag (GMAC, :class:`FrameTag`). A client reconnecting
a channel that broke sends RESUME instead of AUTH, with the last ACK it
got; WELCOME answers with the highest sequence the server applied, and the
client sends on from there without repeating completed rounds.

With ``encrypted-frames`` (a mutual TLS connection) the frame keys are
instead :func:`encrypted_frame_keys`: HKDF-SHA256 over a secret of the
token and the transcript, salted with both ends' fresh 32-octet nonces
(the key contributions, which crossed the wire only inside TLS), so that
neither the token (which travels over the message bus) nor a view of the
TLS-protected handshake alone gives them; frames then carry their
payload encrypted with AES-256-GCM (:class:`FrameSealer`,
:class:`FrameOpener`), the counter as nonce, the header as associated
data.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.messages import NONCE_SIZE
from nova_xen_ncm.engine.messages import Buffer
from nova_xen_ncm.engine.messages import MessageType
from nova_xen_ncm.engine.messages import Role

TAG_SIZE = 16
TOKEN_MIN_SIZE = 16


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
    M.STOPPING: frozenset({C}),
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


def check_token(token: bytes) -> None:
    if not isinstance(token, bytes) or len(token) < TOKEN_MIN_SIZE:
        raise ValueError(
            f"a migration token is at least {TOKEN_MIN_SIZE} random bytes"
        )


def new_nonce() -> str:
    return secrets.token_hex(NONCE_SIZE)


def transcript(hello_payload: bytes, challenge_payload: bytes) -> bytes:
    """What both proofs and both frame keys cover: HELLO and CHALLENGE
    as they travelled."""
    return hashlib.sha256(
        b"nova-xen-ncm/1\0" + hello_payload + b"\0" + challenge_payload
    ).digest()


def client_proof(
    token: bytes, transcript: bytes, mtype: MessageType, last_acked: int
) -> bytes:
    """The client's proof, in AUTH or (with its ``last_acked``) RESUME."""
    return _mac(
        token,
        b"client proof\0",
        transcript,
        struct.pack("!BQ", mtype, last_acked),
    )


def server_proof(
    token: bytes, transcript: bytes, client: bytes, resume_from: int
) -> bytes:
    """The server's proof in WELCOME: it covers the client's."""
    return _mac(
        token,
        b"server proof\0",
        transcript,
        client,
        struct.pack("!Q", resume_from),
    )


def frame_keys(
    token: bytes, transcript: bytes, role: Role
) -> tuple[bytes, bytes]:
    """(send key, receive key) of ``role``'s end."""
    c2s = _mac(token, b"frame key c2s\0", transcript)
    s2c = _mac(token, b"frame key s2c\0", transcript)
    return (c2s, s2c) if role is Role.CLIENT else (s2c, c2s)


#: The AES-256-GCM nonce of frame ``counter``: unique per key, as each
#: key serves one direction of one connection and counters never repeat.
def frame_nonce(counter: int) -> bytes:
    return _NONCE_PREFIX + counter.to_bytes(8, "big")


def encrypted_frame_keys(
    token: bytes,
    transcript: bytes,
    client_share: bytes,
    server_share: bytes,
    role: Role,
) -> tuple[bytes, bytes]:
    """(send key, receive key) of ``role``'s end of an
    ``encrypted-frames`` connection.

    ``client_share`` and ``server_share`` are the HELLO's and the
    CHALLENGE's nonces: fresh random octets of each end that crossed the
    wire only inside the mutual TLS both ends verified. Changing either
    changes both keys; the token alone (the message bus carries it)
    does not give them, nor do the shares without the token.
    """
    if len(client_share) != NONCE_SIZE or len(server_share) != NONCE_SIZE:
        raise ValueError(
            f"key contributions are {NONCE_SIZE} octets each, got "
            f"{len(client_share)} and {len(server_share)}"
        )
    secret = _mac(token, b"encrypted frames secret\0", transcript)
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=client_share + server_share,
        info=b"nova-xen-ncm encrypted frames c2s|s2c\0" + transcript,
    ).derive(secret)
    c2s, s2c = okm[:32], okm[32:]
    return (c2s, s2c) if role is Role.CLIENT else (s2c, c2s)


class FrameSealer:
    """AES-256-GCM of one frame's payload, parts at a time, into the
    caller's buffer: the encryption is the frame's one pass over its
    octets (no snapshot copy, no separate MAC)."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, counter: int, header: Buffer) -> None:
        self._ctx = Cipher(
            algorithms.AES(key), modes.GCM(frame_nonce(counter))
        ).encryptor()
        self._ctx.authenticate_additional_data(header)

    def update_into(self, data: Buffer, out: memoryview) -> int:
        return self._ctx.update_into(data, out)

    def tag(self) -> bytes:
        self._ctx.finalize()
        return self._ctx.tag


class FrameOpener:
    """The receiving side of :class:`FrameSealer`: decrypts a frame's
    payload as it arrives; :meth:`verify` checks the tag at the end,
    before anything the frame carried may be used."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, counter: int, header: Buffer) -> None:
        self._ctx = Cipher(
            algorithms.AES(key), modes.GCM(frame_nonce(counter))
        ).decryptor()
        self._ctx.authenticate_additional_data(header)

    def update(self, data: Buffer) -> bytes:
        return self._ctx.update(data)

    def update_into(self, data: Buffer, out: memoryview) -> int:
        return self._ctx.update_into(data, out)

    def verify(self, tag: Buffer) -> bool:
        """False if the frame was altered (its tag does not hold)."""
        try:
            self._ctx.finalize_with_tag(bytes(tag))
        except InvalidTag:
            return False
        return True
