"""The sans-I/O protocol: two Connection objects driven against each
other in memory (h11's testing model)."""

import dataclasses
import json
import os
import struct

import lz4.frame
import pytest

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import handshake as hs
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError

TOKEN = b"t" * 32


def wire(buffers):
    return b"".join(bytes(b) for b in buffers)


def deliver(buffers, conn):
    conn.receive_data(wire(buffers))


def handshake(
    client=None,
    server=None,
    token=TOKEN,
    server_token=TOKEN,
    last_acked=None,
    resume_from=0,
    caps=("lz4", "resume"),
    server_caps=("lz4",),
):
    client = client or framing.Connection(messages.Role.CLIENT)
    server = server or framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("mig-7", 2, caps), server)
    hello = server.next_event()
    assert isinstance(hello, messages.Hello)
    deliver(server.send_challenge(server_token, server_caps), client)
    assert isinstance(client.next_event(), messages.Challenge)
    deliver(client.send_auth(token, last_acked), server)
    proof = server.next_event()
    deliver(server.send_welcome(resume_from), client)
    welcome = client.next_event()
    return client, server, hello, proof, welcome


def test_handshake_establishes_both_ends():
    client, server, hello, proof, welcome = handshake()
    assert client.established and server.established
    assert hello.migration_id == "mig-7" and hello.channel == 2
    assert isinstance(proof, messages.Auth)
    assert welcome.resume_from == 0
    assert client.capabilities == server.capabilities == {"lz4"}
    assert client.version == server.version == messages.PROTOCOL_VERSION


def test_token_never_on_the_wire():
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    sent = wire(client.send_hello("m", 0))
    deliver([sent], server)
    server.next_event()
    challenge = wire(server.send_challenge(TOKEN))
    deliver([challenge], client)
    client.next_event()
    auth = wire(client.send_auth(TOKEN))
    for data in (sent, challenge, auth):
        assert TOKEN not in data
        assert TOKEN.hex().encode() not in data


def test_wrong_token_is_rejected_and_refused():
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("m", 0), server)
    server.next_event()
    deliver(server.send_challenge(TOKEN), client)
    client.next_event()
    deliver(client.send_auth(b"w" * 32), server)
    with pytest.raises(AuthenticationError, match="wrong token proof"):
        server.next_event()
    assert not server.established
    deliver(
        server.refuse(messages.RefuseReason.AUTHENTICATION, "bad token"),
        client,
    )
    refuse = client.next_event()
    assert refuse == messages.Refuse(code="authentication", text="bad token")
    assert client.state is hs.State.CLOSED


def test_server_without_the_token_is_caught_by_the_client():
    # A rogue destination that cannot check the proof and welcomes
    # anyway: its WELCOME proof cannot be right.
    client = framing.Connection(messages.Role.CLIENT)
    rogue = framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("m", 0), rogue)
    rogue.next_event()
    deliver(rogue.send_challenge(b"x" * 32), client)
    client.next_event()
    client.send_auth(TOKEN)
    welcome = messages.Welcome(proof="00" * 32, resume_from=0)
    client.receive_data(
        raw_frame(
            messages.MessageType.WELCOME,
            messages.encode_message(welcome),
            counter=1,
        )
    )
    with pytest.raises(AuthenticationError, match="destination's proof"):
        client.next_event()
    assert not client.established


def test_wrong_token_on_the_server_side_fails_the_proof():
    with pytest.raises(AuthenticationError, match="wrong token proof"):
        handshake(server_token=b"x" * 32)


def test_resume_carries_last_acked_and_resume_point():
    client, server, _, proof, welcome = handshake(last_acked=5, resume_from=7)
    assert proof == server.resume
    assert proof.last_acked == 5
    assert welcome.resume_from == 7 == client.resume_from


def test_no_common_version():
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("m", 0, versions=(99,)), server)
    server.next_event()
    with pytest.raises(ProtocolError, match="no common protocol version"):
        server.send_challenge(TOKEN)
    deliver(server.refuse(messages.RefuseReason.VERSION, "v99"), client)
    assert client.next_event().code == "version"


SETUP = messages.Setup(
    domid=12,
    name="guest",
    uuid="8f0c3a52-6f4e-4d2b-9c1a-3e5d7b9f1a2c",
    memory_bytes=1 << 30,
    vcpus=2,
    pv_drivers=True,
    required=("event_channels", "xenstore"),
)
FROM_CLIENT = [
    SETUP,
    dataclasses.replace(SETUP, running=False),
    dataclasses.replace(
        SETUP, kernel="/boot/vmlinuz", ramdisk="/i.gz", cmdline="nopv"
    ),
    dataclasses.replace(SETUP, kernel="/boot/vmlinuz"),
    messages.Stopping(),
    messages.Commit(),
    messages.Query(),
    messages.Abort(reason="operator"),
    messages.Error(code="io", text="disk"),
]
FROM_SERVER = [
    messages.SetupReply(accepted=True, domid=12, code="", text=""),
    messages.SetupReply(
        accepted=False,
        domid=12,
        code="domid-taken",
        text="domid 12 runs guest-b",
    ),
    messages.Ack(seq=0),
    messages.Ready(digest="ab" * 32),
    messages.Committed(),
    messages.Status(phase="commit", committed=True),
    messages.Abort(reason="restore failed"),
]


@pytest.mark.parametrize("msg", FROM_CLIENT)
def test_client_messages_round_trip(msg):
    client, server, *_ = handshake()
    deliver(client.send(msg), server)
    assert server.next_event() == msg
    assert server.next_event() is messages.NEED_DATA


@pytest.mark.parametrize("msg", FROM_SERVER)
def test_server_messages_round_trip(msg):
    client, server, *_ = handshake()
    deliver(server.send(msg), client)
    assert client.next_event() == msg


@pytest.mark.parametrize("uuid", ["../../etc/x", "u-1", "", None])
def test_setup_refuses_a_uuid_that_is_not_one(uuid):
    with pytest.raises(ValueError, match="is not a UUID"):
        dataclasses.replace(SETUP, uuid=uuid).validate()


def test_setup_refuses_a_ramdisk_or_cmdline_without_a_kernel():
    for fields in ({"ramdisk": "/i.gz"}, {"cmdline": "nopv"}):
        with pytest.raises(ValueError, match="without a kernel"):
            dataclasses.replace(SETUP, **fields).validate()


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"kernel": "vmlinuz"}, "not an absolute path"),
        ({"kernel": "/k", "ramdisk": "../i.gz"}, "not an absolute path"),
        ({"kernel": "/k", "cmdline": "a\nb"}, "control characters"),
        ({"kernel": "/k\x00"}, "control characters"),
        ({"ramdisk": ""}, "without a kernel"),
    ],
)
def test_setup_refuses_boot_fields_no_host_could_use(fields, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SETUP, **fields).validate()


def test_a_version_1_peer_exchanges_setup_without_the_kernel_fields():
    # The previous release speaks only version 1, whose SETUP has no
    # kernel: both ends agree on it and leave the fields out.
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("m", 0, versions=[1]), server)
    server.next_event()
    deliver(server.send_challenge(TOKEN), client)
    client.next_event()
    deliver(client.send_auth(TOKEN), server)
    server.next_event()
    deliver(server.send_welcome(0), client)
    client.next_event()
    assert client.version == server.version == 1
    frame = wire(client.send(SETUP))
    assert b"kernel" not in frame and b"cmdline" not in frame
    deliver([frame], server)
    assert server.next_event() == SETUP
    with pytest.raises(ValueError, match="kernel cannot be sent in proto"):
        client.send(dataclasses.replace(SETUP, kernel="/boot/vmlinuz"))
    # A version 2 SETUP where version 1 was agreed is refused by name.
    v2 = messages.encode_message(SETUP, 2)
    assert set(json.loads(v2)) - set(
        json.loads(messages.encode_message(SETUP, 1))
    ) == {"kernel", "ramdisk", "cmdline"}
    with pytest.raises(ProtocolError, match="protocol version 1"):
        messages.decode_message(messages.MessageType.SETUP, v2, 1)


def test_setup_kernel_must_be_a_string_or_null():
    payload = json.loads(messages.encode_message(SETUP))
    payload["kernel"] = 5
    with pytest.raises(ProtocolError, match="kernel must be str"):
        messages.decode_message(
            messages.MessageType.SETUP, json.dumps(payload).encode()
        )


def test_messages_in_the_wrong_direction_or_state():
    client, server, *_ = handshake()
    with pytest.raises(ProtocolError, match="not allowed"):
        server.send(SETUP)
    with pytest.raises(ProtocolError, match="not allowed"):
        client.send(messages.Ack(seq=1))
    fresh = framing.Connection(messages.Role.CLIENT)
    with pytest.raises(ProtocolError, match="not allowed"):
        fresh.send(messages.Commit())


def test_data_frames_in_order():
    client, server, *_ = handshake()
    for seq in (1, 2, 3):
        deliver(client.send_data(seq, [b"a" * seq, memoryview(b"bc")]), server)
    got = [server.next_event() for _ in range(3)]
    assert [(d.seq, bytes(d.payload)) for d in got] == [
        (1, b"abc"),
        (2, b"aabc"),
        (3, b"aaabc"),
    ]


def test_send_data_hands_back_the_callers_buffers():
    client, _, *_ = handshake()
    page = memoryview(bytearray(4096))
    out = client.send_data(1, [page])
    assert any(b is page for b in out)


def test_replayed_frame_is_rejected():
    client, server, *_ = handshake()
    frame = wire(client.send_data(1, [b"page"]))
    server.receive_data(frame)
    assert server.next_event().seq == 1
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match="replayed"):
        server.next_event()
    # The connection stays failed.
    with pytest.raises(ProtocolError):
        server.next_event()


def test_reordered_frames_are_rejected():
    client, server, *_ = handshake()
    first = wire(client.send_data(1, [b"one"]))
    second = wire(client.send_data(2, [b"two"]))
    server.receive_data(second + first)
    with pytest.raises(ProtocolError, match="skipped"):
        server.next_event()


def test_tampered_frame_is_rejected():
    client, server, *_ = handshake()
    frame = bytearray(wire(client.send_data(1, [b"page-content"])))
    frame[framing.FRAME_HEADER.size + framing.DATA_HEADER.size] ^= 1
    server.receive_data(frame)
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        server.next_event()


def test_frame_of_another_connection_is_rejected():
    # Same token and migration, different nonces: different keys.
    c1, s1, *_ = handshake()
    c2, s2, *_ = handshake()
    s2.receive_data(wire(c1.send_data(1, [b"x"])))
    with pytest.raises(AuthenticationError):
        s2.next_event()


def raw_frame(mtype, payload, flags=0, counter=0, reserved=0, length=None):
    length = len(payload) if length is None else length
    return framing.FRAME_HEADER.pack(
        mtype, flags, reserved, length, counter
    ) + (payload)


def fresh_server():
    return framing.Connection(messages.Role.SERVER, max_data=1 << 20)


@pytest.mark.parametrize(
    "frame,match",
    [
        (raw_frame(0x7777, b"{}"), "unknown message type"),
        (raw_frame(messages.MessageType.HELLO, b"{}", flags=0x80), "flags"),
        (raw_frame(messages.MessageType.HELLO, b"{}", reserved=1), "flags"),
        (
            raw_frame(
                messages.MessageType.HELLO, b"{}", flags=framing.FLAG_LZ4
            ),
            "compressed",
        ),
        (
            raw_frame(
                messages.MessageType.HELLO,
                b"",
                length=framing.MAX_CONTROL_PAYLOAD + 1,
            ),
            "limit",
        ),
        (
            raw_frame(messages.MessageType.HELLO, b"", length=2**32 - 1),
            "limit",
        ),
        (raw_frame(messages.MessageType.HELLO, b"{}", counter=3), "skipped"),
        (raw_frame(messages.MessageType.SETUP, b"{}"), "not allowed"),
        (raw_frame(messages.MessageType.HELLO, b"[1]"), "not an object"),
        (raw_frame(messages.MessageType.HELLO, b"\xff{"), "bad HELLO"),
        (
            raw_frame(messages.MessageType.HELLO, b'{"versions": [1]}'),
            "fields",
        ),
    ],
)
def test_bad_frames(frame, match):
    server = fresh_server()
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match=match):
        server.next_event()


def hello_payload(**override):
    fields = dict(
        versions=[1],
        capabilities=[],
        migration_id="m",
        channel=0,
        nonce="00" * 32,
    )
    fields.update(override)
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(channel="0"), "channel must be int"),
        (dict(channel=True), "channel must be int"),
        (dict(channel=99), "channel 99 out of range"),
        (dict(versions=[]), "no protocol version"),
        (dict(versions="1"), "list"),
        (dict(nonce="00"), "nonce"),
        (dict(nonce="zz" * 32), "bad HELLO"),
        (dict(migration_id=""), "empty migration id"),
        (dict(migration_id="m" * 5000), "longer than"),
        (dict(capabilities=["x"] * 1000), "at most"),
        (dict(extra=1), "fields"),
    ],
)
def test_bad_hello_fields(override, match):
    server = fresh_server()
    server.receive_data(
        raw_frame(messages.MessageType.HELLO, hello_payload(**override))
    )
    with pytest.raises(ProtocolError, match=match):
        server.next_event()


def test_oversized_frame_rejected_before_its_payload_arrives():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, max_data=1024)
    )
    header = framing.FRAME_HEADER.pack(
        messages.MessageType.DATA, 0, 0, 10**9, 4
    )
    server.receive_data(header)
    with pytest.raises(ProtocolError, match="limit"):
        server.next_event()


def test_data_frame_shorter_than_its_header():
    client, server, *_ = handshake()
    server.receive_data(
        framing.FRAME_HEADER.pack(messages.MessageType.DATA, 0, 0, 4, 4)
    )
    with pytest.raises(ProtocolError, match="shorter"):
        server.next_event()


def test_truncated_frame_then_eof():
    client, server, *_ = handshake()
    frame = wire(client.send_data(1, [b"x" * 100]))
    server.receive_data(frame[:50])
    assert server.next_event() is messages.NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        server.next_event()


def test_truncated_header_then_eof():
    server = fresh_server()
    server.receive_data(b"\x00\x01\x00")
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        server.next_event()


def test_clean_eof_between_frames():
    client, server, *_ = handshake()
    deliver(client.send(messages.Query()), server)
    server.receive_data(b"")
    assert server.next_event() == messages.Query()
    assert isinstance(server.next_event(), messages.ConnectionClosed)


def test_byte_at_a_time_delivery():
    client, server, *_ = handshake()
    data = wire(client.send(SETUP)) + wire(client.send_data(1, [b"zz"]))
    events = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        event = server.next_event()
        if event is not messages.NEED_DATA:
            events.append(event)
    assert events[0] == SETUP
    assert (events[1].seq, bytes(events[1].payload)) == (1, b"zz")


def test_lz4_compressed_data_round_trip():
    client, server, *_ = handshake()
    pages = [bytes([i]) * 4096 for i in range(8)]
    frame = wire(client.send_data(1, pages, compress=True))
    assert len(frame) < 8 * 4096 // 4
    header = framing.FRAME_HEADER.unpack_from(frame)
    assert header[1] & framing.FLAG_LZ4
    server.receive_data(frame)
    event = server.next_event()
    assert event.seq == 1
    assert bytes(event.payload) == b"".join(pages)


def test_incompressible_data_goes_uncompressed():
    client, server, *_ = handshake()
    page = os.urandom(4096)
    frame = wire(client.send_data(1, [page], compress=True))
    assert not framing.FRAME_HEADER.unpack_from(frame)[1] & framing.FLAG_LZ4
    server.receive_data(frame)
    assert bytes(server.next_event().payload) == page


def test_decompression_bomb_is_refused():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, max_data=64 * 1024)
    )
    # Build a valid compressed frame whose content exceeds the limit, by
    # sending from a client that allows more.
    client.max_data = 1 << 20
    deliver(client.send_data(1, [b"\0" * (1 << 20)], compress=True), server)
    with pytest.raises(ProtocolError, match="limit"):
        server.next_event()


def test_send_data_over_limit():
    client, *_ = handshake(
        client=framing.Connection(messages.Role.CLIENT, max_data=10)
    )
    with pytest.raises(ValueError, match="limit"):
        client.send_data(1, [b"x" * 11])


def test_direct_payload_reads_into_caller_memory():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True)
    )
    body = bytes(range(256)) * 64
    deliver(client.send_data(1, [body[:1000], body[1000:]]), server)
    header = server.next_event()
    assert header == messages.DataHeader(seq=1, length=len(body))
    target = memoryview(bytearray(len(body)))
    # All of it is buffered already here; take it in two pieces.
    assert server.take_payload(target[:100]) == 100
    assert server.take_payload(target[100:]) == len(body) - 100
    assert server.next_event() == messages.DataEnd(seq=1)
    assert bytes(target) == body
    deliver(client.send(messages.Commit()), server)
    assert server.next_event() == messages.Commit()


def test_direct_payload_tampered_body_fails_at_the_end():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True)
    )
    frame = bytearray(wire(client.send_data(1, [b"q" * 64])))
    frame[-hs.TAG_SIZE - 1] ^= 0xFF
    server.receive_data(frame)
    server.next_event()
    target = memoryview(bytearray(64))
    server.take_payload(target)
    with pytest.raises(AuthenticationError):
        server.next_event()


def test_direct_payload_must_be_read_before_the_next_event():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True)
    )
    deliver(client.send_data(1, [b"q" * 64]), server)
    server.next_event()
    with pytest.raises(RuntimeError, match="not read"):
        server.next_event()


def test_direct_mode_hands_compressed_frames_whole():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True)
    )
    deliver(client.send_data(1, [b"\0" * 8192], compress=True), server)
    event = server.next_event()
    assert isinstance(event, messages.Data)
    assert bytes(event.payload) == b"\0" * 8192


def test_corrupt_compressed_body_is_protocol_error():
    # An authenticated but corrupt lz4 body (the peer's bug).
    client, server, *_ = handshake()
    bad = lz4.frame.compress(b"a" * 5000)[:-6]
    parts = [framing.DATA_HEADER.pack(1), bad]
    header = framing.FRAME_HEADER.pack(
        messages.MessageType.DATA,
        framing.FLAG_LZ4,
        0,
        sum(map(len, parts)),
        client._send_counter,
    )
    tag = hs.frame_tag(client._send_key, client._send_counter, header, *parts)
    server.receive_data(header + b"".join(parts) + tag)
    with pytest.raises(ProtocolError, match="lz4"):
        server.next_event()


def test_frame_header_layout():
    assert framing.FRAME_HEADER.size == 16
    assert struct.calcsize("!HBBIQ") == framing.FRAME_HEADER.size
    assert hs.TAG_SIZE == 16


def test_short_token_refused():
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    deliver(client.send_hello("m", 0), server)
    server.next_event()
    with pytest.raises(ValueError, match="token"):
        server.send_challenge(b"short")


def test_sequences_and_acks():
    client, server, *_ = handshake()
    with pytest.raises(ValueError, match="does not follow"):
        client.send_data(2, [b"gap"])
    for seq in (1, 2, 3):
        deliver(client.send_data(seq, [b"d"]), server)
        server.next_event()
    assert server.last_seq == client.last_seq == 3
    with pytest.raises(ValueError, match="outside the received range"):
        server.send(messages.Ack(seq=4))
    deliver(server.send(messages.Ack(seq=2)), client)
    assert client.next_event() == messages.Ack(seq=2)
    assert client.acked == server.acked == 2
    with pytest.raises(ValueError, match="outside"):
        server.send(messages.Ack(seq=1))


def test_resumed_channel_continues_after_resume_from():
    client, server, *_ = handshake(last_acked=4, resume_from=6)
    assert client.last_seq == server.last_seq == 6
    with pytest.raises(ValueError):
        client.send_data(1, [b"old round"])
    deliver(client.send_data(7, [b"next"]), server)
    assert server.next_event().seq == 7


def forged_data(client, seq, body=b"x", flags=0):
    # A correctly authenticated frame with an arbitrary sequence number,
    # as a buggy peer would send it.
    parts = [framing.DATA_HEADER.pack(seq), body]
    header = framing.FRAME_HEADER.pack(
        messages.MessageType.DATA,
        flags,
        0,
        sum(map(len, parts)),
        client._send_counter,
    )
    tag = hs.frame_tag(client._send_key, client._send_counter, header, *parts)
    client._send_counter += 1
    return header + b"".join(parts) + tag


@pytest.mark.parametrize("direct", [False, True])
def test_data_sequence_gap_or_repeat_is_refused(direct):
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=direct)
    )
    deliver(client.send_data(1, [b"a"]), server)
    server.next_event()
    if direct:
        server.take_payload(memoryview(bytearray(1)))
        server.next_event()
    server.receive_data(forged_data(client, 1))
    with pytest.raises(ProtocolError, match="does not follow 1"):
        server.next_event()


def test_ack_beyond_what_was_sent_is_refused():
    client, server, *_ = handshake()
    deliver(client.send_data(1, [b"a"]), server)
    server.next_event()
    # The server acknowledges more than it got (its bug, forged here).
    server.last_seq = 5
    deliver(server.send(messages.Ack(seq=5)), client)
    with pytest.raises(ProtocolError, match="outside the sent range"):
        client.next_event()


def test_deeply_nested_json_is_a_protocol_error():
    server = fresh_server()
    server.receive_data(raw_frame(messages.MessageType.HELLO, b"[" * 60000))
    with pytest.raises(ProtocolError):
        server.next_event()


def valid_client_stream():
    client, server = framing.Connection(messages.Role.CLIENT), fresh_server()
    data = wire(client.send_hello("m", 0, ["lz4"]))
    deliver([data], server)
    server.next_event()
    deliver(server.send_challenge(TOKEN, ["lz4"]), client)
    client.next_event()
    return data + wire(client.send_auth(TOKEN))


@pytest.mark.parametrize("seed", range(40))
def test_mutated_streams_fail_only_with_protocol_error(seed):
    import random

    rng = random.Random(seed)
    data = bytearray(valid_client_stream())
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    server = fresh_server()
    server.receive_data(bytes(data))
    server.receive_data(b"")
    try:
        for _ in range(4):
            event = server.next_event()
            if isinstance(event, messages.Hello):
                server.send_challenge(TOKEN)
    except ProtocolError:
        pass


def test_lz4_only_when_negotiated():
    client, server, *_ = handshake(server_caps=())
    assert client.capabilities == server.capabilities == frozenset()
    with pytest.raises(ValueError, match="not negotiated"):
        client.send_data(1, [b"\0" * 4096], compress=True)
    packed = lz4.frame.compress(b"\0" * 4096)
    server.receive_data(forged_data(client, 1, packed, flags=framing.FLAG_LZ4))
    with pytest.raises(ProtocolError, match="not negotiated"):
        server.next_event()


def test_setup_says_whether_the_guest_runs():
    paused = dataclasses.replace(SETUP, running=False)
    payload = messages.encode_message(paused)
    assert (
        messages.decode_message(messages.MessageType.SETUP, payload).running
        is False
    )
    assert SETUP.running is True
    with pytest.raises(ProtocolError, match="running must be bool"):
        messages.decode_message(
            messages.MessageType.SETUP, payload.replace(b"false", b"0")
        )


# -- frames without a tag (tls-frames, unauthenticated-frames) --


@pytest.mark.parametrize("cap", ["tls-frames", "unauthenticated-frames"])
def test_frames_carry_no_tag_when_both_ends_drop_it(cap):
    client, server, *_ = handshake(caps=("lz4", cap), server_caps=(cap,))
    assert not client.frames_tagged and not server.frames_tagged
    frame = wire(client.send_data(1, [b"page-content"]))
    assert len(frame) == (
        framing.FRAME_HEADER.size + framing.DATA_HEADER.size + 12
    )
    server.receive_data(frame)
    assert bytes(server.next_event().payload) == b"page-content"
    # Counters still catch a replayed frame.
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match="replayed"):
        server.next_event()


@pytest.mark.parametrize(
    "caps, server_caps",
    [
        (("unauthenticated-frames",), ()),
        ((), ("unauthenticated-frames",)),
        (("tls-frames",), ("unauthenticated-frames",)),
    ],
)
def test_frames_are_tagged_unless_both_ends_offer_the_same_cap(
    caps, server_caps
):
    client, server, *_ = handshake(caps=caps, server_caps=server_caps)
    assert client.frames_tagged and server.frames_tagged
    frame = bytearray(wire(client.send_data(1, [b"page-content"])))
    assert len(frame) == (
        framing.FRAME_HEADER.size + framing.DATA_HEADER.size + 12 + hs.TAG_SIZE
    )
    frame[framing.FRAME_HEADER.size + framing.DATA_HEADER.size] ^= 1
    server.receive_data(frame)
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        server.next_event()


def test_untagged_direct_payload_round_trip():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True),
        caps=("tls-frames",),
        server_caps=("tls-frames",),
    )
    deliver(client.send_data(1, [b"q" * 64]), server)
    assert server.next_event() == messages.DataHeader(seq=1, length=64)
    target = memoryview(bytearray(64))
    assert server.take_payload(target) == 64
    assert server.next_event() == messages.DataEnd(seq=1)
    assert bytes(target) == b"q" * 64


def test_direct_mode_reads_stop_at_the_frame_boundary_after_bulk():
    client, server, *_ = handshake(
        server=framing.Connection(messages.Role.SERVER, direct_payload=True)
    )
    # Before any bulk frame: reads as large as allowed (small frames
    # come in one read for many).
    assert server.read_hint(256 * 1024) == 256 * 1024
    body = b"q" * (framing._BULK_BODY + 100)
    frame = wire(client.send_data(1, [body]))
    headers = framing.FRAME_HEADER.size + framing.DATA_HEADER.size
    server.receive_data(frame[:headers])
    assert server.next_event() == messages.DataHeader(seq=1, length=len(body))
    # After a bulk frame's header: a small read, the tag and the next
    # headers, not the next body.
    assert server.read_hint(256 * 1024) < 128
    target = memoryview(bytearray(len(body)))
    server.receive_data(frame[headers:])
    assert server.take_payload(target) == len(body)
    assert server.next_event() == messages.DataEnd(seq=1)
    assert server.read_hint(256 * 1024) < 128
    # A control frame whose header came asks for the rest of it at once.
    hello = wire(client.send(messages.Commit()))
    server.receive_data(hello[: framing.FRAME_HEADER.size])
    assert server.next_event() is messages.NEED_DATA
    rest = len(hello) - framing.FRAME_HEADER.size
    assert server.read_hint(1 << 20) == max(rest, framing._SMALL_READ)
    # Without direct mode, reads fill the buffer.
    assert client.read_hint(256 * 1024) == 256 * 1024


def test_control_frames_keep_their_tag_without_tls():
    # Untagged DATA on an isolated network: a forged COMMIT would still
    # run the guest on both hosts, so control frames stay tagged.
    cap = "unauthenticated-frames"
    client, server, *_ = handshake(caps=(cap,), server_caps=(cap,))
    assert not server.frames_tagged
    commit = bytearray(wire(client.send(messages.Commit())))
    body = len(messages.encode_message(messages.Commit()))
    assert len(commit) == framing.FRAME_HEADER.size + body + hs.TAG_SIZE
    server.receive_data(bytes(commit))
    assert server.next_event() == messages.Commit()
    ack = bytearray(wire(server.send(messages.Ack(seq=0))))
    ack[framing.FRAME_HEADER.size] ^= 1
    client.receive_data(bytes(ack))
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        client.next_event()


def test_inside_tls_control_frames_carry_no_tag_either():
    client, server, *_ = handshake(
        caps=("tls-frames",), server_caps=("tls-frames",)
    )
    commit = wire(client.send(messages.Commit()))
    body = len(messages.encode_message(messages.Commit()))
    assert len(commit) == framing.FRAME_HEADER.size + body
    server.receive_data(commit)
    assert server.next_event() == messages.Commit()


@pytest.mark.parametrize("cap", ["unauthenticated-frames", "tls-frames"])
def test_a_frame_capability_added_on_the_path_fails_the_handshake(cap):
    # The source offers no untagged frames; someone on the path adds
    # the capability to its HELLO, to a destination that would accept.
    client = framing.Connection(messages.Role.CLIENT)
    server = framing.Connection(messages.Role.SERVER)
    real = wire(client.send_hello("mig-7", 2, ("lz4",)))
    hello = messages.decode_message(
        messages.MessageType.HELLO, real[framing.FRAME_HEADER.size :]
    )
    forged = messages.encode_message(
        dataclasses.replace(hello, capabilities=("lz4", cap))
    )
    server.receive_data(
        framing.FRAME_HEADER.pack(
            messages.MessageType.HELLO, 0, 0, len(forged), 0
        )
        + forged
    )
    server.next_event()
    challenge = wire(server.send_challenge(TOKEN, ("lz4", cap)))
    assert cap in server.capabilities
    # Passed on as it is: the source refuses what it did not offer.
    naive = framing.Connection(messages.Role.CLIENT)
    naive.hello, naive._hello_payload = client.hello, client._hello_payload
    naive.state = client.state
    naive.receive_data(challenge)
    with pytest.raises(ProtocolError, match="not offered"):
        naive.next_event()
    # Stripped again on its way back: the transcripts differ, and the
    # destination refuses the source's proof before any frame goes
    # untagged.
    sent = messages.decode_message(
        messages.MessageType.CHALLENGE, challenge[framing.FRAME_HEADER.size :]
    )
    stripped = messages.encode_message(
        dataclasses.replace(sent, capabilities=("lz4",))
    )
    client.receive_data(
        framing.FRAME_HEADER.pack(
            messages.MessageType.CHALLENGE, 0, 0, len(stripped), 0
        )
        + stripped
    )
    client.next_event()
    assert client.capabilities == {"lz4"}
    deliver(client.send_auth(TOKEN), server)
    with pytest.raises(AuthenticationError, match="wrong token proof"):
        server.next_event()
    assert not server.established


VBD = json.dumps(
    {
        "kind": "vbd",
        "devid": 51712,
        "mac": None,
        "extra": {"target": "/srv/shared/disk", "format": "raw"},
    }
)
VIF = json.dumps(
    {
        "kind": "vif",
        "devid": 0,
        "mac": "00:16:3e:4e:43:4d",
        "extra": {"bridge": "xenbr0"},
    }
)


def test_setup_names_the_guests_devices_from_version_3():
    msg = dataclasses.replace(SETUP, devices=(VBD, VIF))
    client, server, *_ = handshake()
    deliver(client.send(msg), server)
    got = server.next_event()
    assert got == msg
    assert [(d["kind"], d["devid"]) for d in got.device_fields()] == [
        ("vbd", 51712),
        ("vif", 0),
    ]
    # Not in version 2, whose peers cannot create them.
    with pytest.raises(ValueError, match="devices cannot be sent"):
        messages.encode_message(msg, 2)
    assert "devices" not in json.loads(messages.encode_message(SETUP, 2))


@pytest.mark.parametrize(
    "device, match",
    [
        ("[]", "an object of kind, devid, mac, extra"),
        (VBD.replace('"vbd"', '"qdisk"'), "device kind 'qdisk'"),
        (VBD.replace("51712", "-1"), "devid -1"),
        (VBD.replace('"raw"', "5"), "strings only"),
        (VIF.replace('"xenbr0"', '"br\\n0"'), "strings only"),
        ("{", "Expecting"),
    ],
)
def test_setup_refuses_devices_no_host_could_create(device, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SETUP, devices=(device,)).validate()
    with pytest.raises(ValueError, match="named twice"):
        dataclasses.replace(SETUP, devices=(VBD, VBD)).validate()
