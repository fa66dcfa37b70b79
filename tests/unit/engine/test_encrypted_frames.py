"""``encrypted-frames``: the keys each connection derives from both
ends' contributions and the token, and frames encrypted and
authenticated with AES-256-GCM (sans-I/O, two Connections in memory)."""

from __future__ import annotations

import os

import pytest

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import handshake as hs
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError

TOKEN = b"t" * 32
ENCRYPTED = messages.Capability.ENCRYPTED_FRAMES.value
C, S = messages.Role.CLIENT, messages.Role.SERVER


def wire(buffers):
    return b"".join(bytes(b) for b in buffers)


def deliver(buffers, conn):
    conn.receive_data(wire(buffers))


def established(direct=False, token=TOKEN, last_acked=None):
    """Both ends of an encrypted-frames connection after WELCOME."""
    client = framing.Connection(C)
    server = framing.Connection(S, direct_payload=direct)
    deliver(client.send_hello("mig-7", 0, [ENCRYPTED, "lz4"]), server)
    assert isinstance(server.next_event(), messages.Hello)
    deliver(server.send_challenge(token, [ENCRYPTED, "lz4"]), client)
    assert isinstance(client.next_event(), messages.Challenge)
    deliver(client.send_auth(token, last_acked), server)
    server.next_event()
    deliver(server.send_welcome(last_acked or 0), client)
    assert isinstance(client.next_event(), messages.Welcome)
    assert client.frames_encrypted and server.frames_encrypted
    return client, server


# -- keys ---------------------------------------------------------------


TRANSCRIPT = hs.transcript(b"hello", b"challenge")
SHARE_C = bytes(range(32))
SHARE_S = bytes(range(32, 64))


def keys(token=TOKEN, transcript=TRANSCRIPT, c=SHARE_C, s=SHARE_S, role=C):
    return hs.encrypted_frame_keys(token, transcript, c, s, role)


def test_both_ends_derive_each_others_keys():
    send, recv = keys(role=C)
    assert keys(role=S) == (recv, send)
    assert send != recv
    assert len(send) == len(recv) == 32  # AES-256


@pytest.mark.parametrize(
    "change",
    [
        {"c": bytes(31) + b"\1"},
        {"s": bytes(31) + b"\1"},
        {"token": b"u" * 32},
        {"transcript": hs.transcript(b"hello", b"other")},
    ],
    ids=["client-share", "server-share", "token", "transcript"],
)
def test_every_input_changes_both_keys(change):
    before = keys()
    after = keys(**change)
    assert before[0] != after[0] and before[1] != after[1]


def test_the_token_alone_does_not_give_the_keys():
    # What a holder of the token (it travels over the message bus) and
    # of the transcript's hash derives without the contributions: the
    # keys of the token-only scheme, which are not these.
    mine = set(keys())
    token_only = set(hs.frame_keys(TOKEN, TRANSCRIPT, C))
    assert not mine & token_only
    # Any other contributions give other keys.
    assert not mine & set(keys(c=os.urandom(32), s=os.urandom(32)))


def test_contributions_are_checked():
    with pytest.raises(ValueError, match="32 octets"):
        keys(c=b"short")


def test_keys_come_from_the_nonces_that_crossed_inside_tls():
    client, server = established()
    expected = hs.encrypted_frame_keys(
        TOKEN,
        client._transcript,
        bytes.fromhex(client.hello.nonce),
        bytes.fromhex(server._challenge.nonce),
        C,
    )
    assert (client._send_key, client._recv_key) == expected
    assert (server._send_key, server._recv_key) == expected[::-1]


def test_a_new_connection_with_the_same_token_gets_new_keys():
    # A resumed channel: the same migration and token, new contributions.
    first, _ = established()
    second, _ = established(last_acked=0)
    assert first._send_key != second._send_key
    assert first._recv_key != second._recv_key


# -- frames -------------------------------------------------------------


PAGES = [os.urandom(4096) for _ in range(20)]


def test_data_and_control_frames_round_trip_encrypted():
    client, server = established()
    frame = wire(client.send_data(1, PAGES, pages=True))
    # The payload on the wire is not the plaintext, nor any page of it.
    assert not any(page[:64] in frame for page in PAGES)
    header = framing.FRAME_HEADER.unpack_from(frame)
    assert header[0] == messages.MessageType.DATA
    body = framing.DATA_HEADER.size + sum(map(len, PAGES))
    assert len(frame) == framing.FRAME_HEADER.size + body + hs.TAG_SIZE
    server.receive_data(frame)
    event = server.next_event()
    assert bytes(event.payload) == b"".join(PAGES) and event.pages
    # Control frames are encrypted too.
    ack = wire(server.send(messages.Ack(seq=1)))
    assert b'"seq"' not in ack
    client.receive_data(ack)
    assert client.next_event() == messages.Ack(seq=1)


def test_compressed_frames_are_encrypted_after_compression():
    client, server = established(direct=True)
    body = [b"a" * 65536]
    frame = wire(client.send_data(1, body, compress=True))
    assert len(frame) < 65536
    server.receive_data(frame)
    # Compressed frames come whole even in direct mode.
    assert bytes(server.next_event().payload) == body[0]


def read_direct(server, frame, split=1000):
    """Feed ``frame`` as a destination does: a first chunk, then the
    rest of the body read "from the socket" and decrypted into place."""
    server.receive_data(frame[:split])
    header = server.next_event()
    assert isinstance(header, messages.DataHeader)
    out = bytearray(header.length)
    view = memoryview(out)
    n = server.take_payload(view)
    rest = frame[split : split + header.length - n]
    server.decrypt_payload(rest, view[n:])
    server.receive_data(frame[split + header.length - n :])
    return out, server.next_event


def test_direct_mode_decrypts_into_the_callers_memory():
    client, server = established(direct=True)
    frame = wire(client.send_data(1, PAGES, pages=True))
    out, end = read_direct(server, frame)
    assert isinstance(end(), messages.DataEnd)
    assert bytes(out) == b"".join(PAGES)


def flipped(frame, offset):
    data = bytearray(frame)
    data[offset] ^= 1
    return bytes(data)


FLAG_OFFSET = 2  # the flags octet of the frame header


@pytest.mark.parametrize("direct", [False, True], ids=["whole", "direct"])
@pytest.mark.parametrize(
    "where",
    ["header-flags", "ciphertext", "last-ciphertext", "tag"],
)
def test_a_flipped_bit_fails_naming_the_frame(direct, where):
    client, server = established(direct=direct)
    frame = wire(client.send_data(1, PAGES, pages=True))
    offset = {
        # PAGES off: still valid flags, so only the tag can tell.
        "header-flags": FLAG_OFFSET,
        "ciphertext": framing.FRAME_HEADER.size + 5000,
        "last-ciphertext": len(frame) - hs.TAG_SIZE - 1,
        "tag": len(frame) - 1,
    }[where]
    bad = flipped(frame, offset)
    if where == "header-flags" and direct:
        # Without PAGES the destination takes the frame whole.
        server.receive_data(bad)
        with pytest.raises(AuthenticationError, match="DATA frame 2"):
            server.next_event()
        return
    if direct:
        out, end = read_direct(server, bad)
        with pytest.raises(AuthenticationError, match="DATA frame 2"):
            end()
    else:
        server.receive_data(bad)
        with pytest.raises(AuthenticationError, match="DATA frame 2"):
            server.next_event()
    # The connection stays failed.
    with pytest.raises(ProtocolError):
        server.next_event()


def test_a_flipped_sequence_fails_naming_the_frame():
    client, server = established(direct=True)
    frame = wire(client.send_data(1, PAGES, pages=True))
    server.receive_data(flipped(frame, framing.FRAME_HEADER.size + 7))
    with pytest.raises(ProtocolError, match="DATA frame 2: sequence"):
        server.next_event()


def test_a_flipped_control_frame_fails():
    client, server = established()
    ack = wire(server.send(messages.Ack(seq=0)))
    client.receive_data(flipped(ack, framing.FRAME_HEADER.size + 2))
    with pytest.raises(AuthenticationError, match="ACK frame 2"):
        client.next_event()


def test_replayed_and_reordered_frames_are_refused():
    client, server = established()
    first = wire(client.send_data(1, [b"one"]))
    second = wire(client.send_data(2, [b"two"]))
    server.receive_data(first)
    server.next_event()
    server.receive_data(first)
    with pytest.raises(ProtocolError, match="frame 2 replayed"):
        server.next_event()
    client, server = established()
    first = wire(client.send_data(1, [b"one"]))
    second = wire(client.send_data(2, [b"two"]))
    server.receive_data(second)
    with pytest.raises(ProtocolError, match="frame 3 skipped"):
        server.next_event()


def test_a_replayed_frame_renumbered_fails_its_tag():
    client, server = established()
    first = wire(client.send_data(1, [b"one"]))
    client.send_data(2, [b"two"])
    server.receive_data(first)
    server.next_event()
    # The counter is the nonce and in the associated data: a frame
    # renumbered to pass the order check does not authenticate.
    header = list(framing.FRAME_HEADER.unpack_from(first))
    header[4] = 3
    forged = framing.FRAME_HEADER.pack(*header) + first[16:]
    server.receive_data(forged)
    with pytest.raises(AuthenticationError, match="DATA frame 3"):
        server.next_event()


def test_a_frame_of_another_connection_fails_its_tag():
    client, _ = established()
    _, server = established()
    server.receive_data(wire(client.send_data(1, [b"x" * 100])))
    with pytest.raises(AuthenticationError, match="DATA frame 2"):
        server.next_event()


def test_a_large_frame_sealed_in_the_reused_buffer_goes_intact():
    client, server = established()
    big = [os.urandom(1 << 20) for _ in range(3)]
    one = wire(client.send_data(1, big, pages=True))
    two = wire(client.send_data(2, big[::-1], pages=True))
    server.receive_data(one + two)
    assert bytes(server.next_event().payload) == b"".join(big)
    assert bytes(server.next_event().payload) == b"".join(big[::-1])


def test_without_the_capability_on_both_ends_frames_are_not_encrypted():
    client = framing.Connection(C)
    server = framing.Connection(S)
    deliver(client.send_hello("mig-7", 0, [ENCRYPTED]), server)
    server.next_event()
    deliver(server.send_challenge(TOKEN, []), client)
    client.next_event()
    deliver(client.send_auth(TOKEN), server)
    server.next_event()
    deliver(server.send_welcome(), client)
    client.next_event()
    assert not client.frames_encrypted and not server.frames_encrypted
    assert client.frames_tagged
