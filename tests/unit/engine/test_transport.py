"""Listener and Channel over real sockets: a socketpair, or loopback TCP,
with the two protocol ends in two threads."""

import hashlib
import socket
import threading

import pytest

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener

TOKEN = b"k" * 32
TIMEOUT = 10.0


class Background:
    """Run ``fn`` in a thread; ``result()`` returns or re-raises."""

    def __init__(self, fn, *args, **kwargs):
        self._value = None
        self._error = None

        def run():
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the test thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "background side hung"
        if self._error is not None:
            raise self._error
        return self._value


def pair(direct_payload=False, max_data=framing.DEFAULT_MAX_DATA):
    a, b = socket.socketpair()
    client = Channel(
        a,
        framing.Connection(messages.Role.CLIENT, max_data=max_data),
        io_timeout=TIMEOUT,
    )
    server = Channel(
        b,
        framing.Connection(
            messages.Role.SERVER,
            max_data=max_data,
            direct_payload=direct_payload,
        ),
        io_timeout=TIMEOUT,
    )
    return client, server


def token_for(expected_id="mig"):
    def lookup(hello):
        if hello.migration_id != expected_id:
            raise Refused(
                messages.RefuseReason.UNKNOWN_MIGRATION,
                f"no migration {hello.migration_id}",
            )
        return TOKEN

    return lookup


def established_pair(**kwargs):
    client, server = pair(**kwargs)
    bg = Background(server.server_handshake, token_for(), capabilities=["lz4"])
    client.client_handshake("mig", TOKEN, capabilities=["lz4", "resume"])
    bg.result()
    return client, server


def test_vectored_send_and_recv_into_deliver_exact_bytes():
    client, server = pair()
    # Many small buffers (more than one sendmsg's iovec limit) and big
    # ones (bigger than the socket buffer: partial writes).
    small = [
        bytes([i % 251]) * (i % 7 + 1)
        for i in range(2 * transport.IOV_MAX + 5)
    ]
    big = [
        memoryview(bytearray(hashlib.sha256(bytes([i])).digest() * 65536))
        for i in range(3)
    ]
    buffers = small + big + [b""]
    expected = b"".join(bytes(b) for b in buffers)
    target = memoryview(bytearray(len(expected)))
    reader = Background(server.recv_into_exact, target)
    assert client.send_buffers(buffers) == len(expected)
    reader.result()
    assert bytes(target) == expected


def test_send_waits_for_room_on_a_non_blocking_socket():
    # eventlet's green socket hands sendmsg to a non-blocking socket:
    # a batch bigger than the socket buffer must wait, not fail.
    client, server = pair()
    client.sock.setblocking(False)
    data = bytes(range(256)) * (16 << 12)
    target = memoryview(bytearray(len(data)))
    reader = Background(server.recv_into_exact, target)
    assert client.send_buffers([data]) == len(data)
    reader.result()
    assert bytes(target) == data


def test_send_times_out_when_the_peer_never_reads():
    client, server = pair()
    client.sock.setblocking(False)
    client.io_timeout = 0.2
    with pytest.raises(TransportError, match="send timed out"):
        client.send_buffers([bytes(64 << 20)])
    server.sock.close()


def test_recv_into_exact_reports_early_close():
    client, server = pair()
    client.send_buffers([b"abc"])
    client.close()
    with pytest.raises(TransportError, match="outstanding"):
        server.recv_into_exact(memoryview(bytearray(10)))


def test_handshake_and_messages_over_a_socketpair():
    client, server = established_pair()
    assert client.connection.established and server.connection.established
    assert client.connection.capabilities == {"lz4"}
    client.send(
        messages.Setup(
            domid=3,
            name="g",
            uuid="8f0c3a52-6f4e-4d2b-9c1a-3e5d7b9f1a2c",
            memory_bytes=4096,
            vcpus=1,
            pv_drivers=False,
            required=(),
        )
    )
    assert server.receive().domid == 3
    server.send(messages.SetupReply(accepted=True, domid=3, code="", text=""))
    assert client.receive().accepted


def test_page_payload_read_straight_into_caller_memory():
    client, server = established_pair(direct_payload=True)
    pages = [memoryview(bytearray(bytes([n]) * 4096)) for n in range(64)]
    sender = Background(client.send_data, 1, pages)
    header = server.next_event()
    assert header == messages.DataHeader(seq=1, length=64 * 4096)
    guest = memoryview(bytearray(64 * 4096))
    # Page by page, as into mapped destination pages.
    for n in range(64):
        server.read_payload_into(guest[n * 4096 : (n + 1) * 4096])
    assert server.next_event() == messages.DataEnd(seq=1)
    sender.result()
    assert bytes(guest) == b"".join(bytes(pg) for pg in pages)
    server.send(messages.Ack(seq=1))
    assert client.receive() == messages.Ack(seq=1)


def test_read_payload_into_more_than_the_frame():
    client, server = established_pair(direct_payload=True)
    client.send_data(1, [b"x" * 10])
    server.next_event()
    with pytest.raises(ValueError, match="left in the frame"):
        server.read_payload_into(memoryview(bytearray(11)))


def test_lz4_frames_over_the_wire():
    client, server = established_pair()
    body = b"".join(bytes([i]) * 4096 for i in range(16))
    wire_bytes = client.send_data(1, [body], compress=True)
    assert wire_bytes < len(body) // 4
    event = server.receive()
    assert (event.seq, bytes(event.payload)) == (1, body)


def test_wrong_token_refused_on_both_ends():
    client, server = pair()
    bg = Background(server.server_handshake, token_for())
    with pytest.raises(Refused) as info:
        client.client_handshake("mig", b"w" * 32)
    assert info.value.code == "authentication"
    with pytest.raises(Refused):
        bg.result()


def test_unknown_migration_refused():
    client, server = pair()
    bg = Background(server.server_handshake, token_for("other"))
    with pytest.raises(Refused) as info:
        client.client_handshake("mig", TOKEN)
    assert info.value.code == "unknown-migration"
    with pytest.raises(Refused):
        bg.result()


def test_resume_without_a_resume_handler_is_refused():
    client, server = pair()
    bg = Background(server.server_handshake, token_for())
    with pytest.raises(Refused, match="bad-request"):
        client.client_handshake("mig", TOKEN, last_acked=3)
    with pytest.raises(Refused):
        bg.result()


def test_resume_reports_where_to_continue():
    client, server = pair()
    seen = []

    def resume_from(hello, resume):
        seen.append(resume.last_acked)
        return 12

    bg = Background(
        server.server_handshake, token_for(), resume_from=resume_from
    )
    welcome = client.client_handshake("mig", TOKEN, channel=1, last_acked=9)
    hello, proof = bg.result()
    assert welcome.resume_from == 12
    assert seen == [9]
    assert hello.channel == 1
    assert isinstance(proof, messages.Resume)


def test_peer_close_is_a_transport_error():
    client, server = established_pair()
    client.close()
    with pytest.raises(TransportError, match="closed"):
        server.receive()


def loopback_listener(**kwargs):
    # Ports 0..0 let the kernel pick one: tests never collide.
    return Listener("127.0.0.1", 0, 0, **kwargs)


def test_listener_accepts_the_expected_channels_only():
    with loopback_listener(
        expected=2, accept_timeout=TIMEOUT, handshake_timeout=0.2
    ) as listener:
        port = listener.port
        assert port > 0

        def serve():
            # As the acceptor does: take the connection, then TLS (none
            # here) and the handshake.
            channels = []
            for _ in range(2):
                sock, peer = listener.take(TIMEOUT)
                ch = Channel(
                    listener.secure(sock, peer),
                    framing.Connection(messages.Role.SERVER),
                    io_timeout=TIMEOUT,
                )
                ch.server_handshake(token_for(), capabilities=["lz4"])
                listener.accepted += 1
                channels.append(ch)
            return channels

        bg = Background(serve)
        clients = []
        for index in range(2):
            ch = Channel.connect(
                "127.0.0.1", port, connect_timeout=TIMEOUT, io_timeout=TIMEOUT
            )
            ch.client_handshake("mig", TOKEN, channel=index)
            clients.append(ch)
        servers = bg.result()
        # A third is beyond the expected ones: closed after the grace.
        with socket.create_connection(listener.address) as third:
            third.settimeout(TIMEOUT)
            assert third.recv(1) == b""
        assert "expected connections" in listener.rejected[0][1]
        for index, ch in enumerate(clients):
            ch.send_data(1, [b"chan%d" % index])
        got = sorted(bytes(s.receive().payload) for s in servers)
        assert got == [b"chan0", b"chan1"]
        listener.allow()
        assert listener.accepted == 2
        for ch in clients + servers:
            ch.close()


def test_listener_take_gives_up_after_its_timeout():
    with loopback_listener(accept_timeout=0.05) as listener:
        assert listener.take(0.05) is None


def test_listener_port_range_exhausted():
    with loopback_listener() as first:
        with pytest.raises(TransportError, match="no free port"):
            Listener("127.0.0.1", first.port, first.port)


def test_listener_rejects_bad_range():
    with pytest.raises(ValueError):
        Listener("127.0.0.1", 5000, 4000)


def test_connect_refused_is_a_transport_error():
    with loopback_listener() as listener:
        port = listener.port
    with pytest.raises(TransportError, match="cannot connect"):
        Channel.connect("127.0.0.1", port, connect_timeout=TIMEOUT)


def test_listener_from_conf():
    from oslo_config import cfg

    from nova_xen_ncm.conf import xen_ncm

    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    conf.set_override("listen_address", "127.0.0.1", group="xen_ncm")
    conf.set_override("port_min", 0, group="xen_ncm")
    conf.set_override("port_max", 0, group="xen_ncm")
    conf.set_override("accept_timeout", 3.0, group="xen_ncm")
    with Listener.from_conf(conf, expected=3) as listener:
        assert listener.accept_timeout == 3.0
        assert listener.address[0] == "127.0.0.1"


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_pacer_holds_writes_to_its_rate_after_the_burst():
    t = FakeTime()
    pacer = transport.Pacer(
        1_000_000, burst=0.05, clock=t.clock, sleep=t.sleep
    )
    # 50 ms of the rate go at once, then each write waits its turn.
    assert pacer.take(50_000) == 0.0
    for _ in range(20):
        pacer.take(100_000)
    # 2.05 MB at 1 MB/s: 2.05 s, less the 50 ms it may run ahead.
    assert t.now - 100.0 == pytest.approx(2.0)
    assert all(s == pytest.approx(0.1) for s in t.slept[1:])


def test_pacer_gives_no_credit_for_idle_time_beyond_the_burst():
    t = FakeTime()
    pacer = transport.Pacer(
        1_000_000, burst=0.05, clock=t.clock, sleep=t.sleep
    )
    t.now += 60.0  # idle a minute
    pacer.take(50_000)
    pacer.take(1_000_000)
    assert t.slept == [pytest.approx(1.0)]


def test_pacer_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="not positive"):
        transport.Pacer(0)


def test_a_paced_channel_has_every_frame_wait_for_its_octets():
    client, server = established_pair()
    taken = []

    class Recorder:
        def take(self, nbytes, limit=None):
            taken.append(nbytes)
            return 0.0

    client.pacer = Recorder()
    reader = Background(server.receive)
    sent = client.send_data(1, [b"x" * 5000])
    reader.result()
    assert taken == [sent]
    assert sent > 5000  # the frame's header and tag are paced too


def test_pacer_refuses_a_wait_past_its_limit_and_schedules_nothing():
    t = FakeTime()
    pacer = transport.Pacer(
        1_000_000, burst=0.05, clock=t.clock, sleep=t.sleep
    )
    pacer.take(50_000)
    with pytest.raises(TransportError, match="would wait 0.500s"):
        pacer.take(500_000, limit=0.4)
    assert t.slept == []
    # The refused octets took no place in the schedule.
    assert pacer.take(350_000, limit=0.4) == pytest.approx(0.35)


def test_a_paced_write_waits_within_the_sockets_bound():
    client, server = established_pair()
    bounds = []

    class Slow:
        def take(self, nbytes, limit=None):
            bounds.append(limit)
            return 0.25

    timeouts = []

    class Watched:
        """The socket, its timeout noted at each write."""

        def __init__(self, sock):
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def sendmsg(self, views):
            timeouts.append(self._sock.gettimeout())
            return self._sock.sendmsg(views)

    client.sock.settimeout(2.0)
    client.sock = Watched(client.sock)
    client.pacer = Slow()
    reader = Background(server.receive)
    client.send_data(1, [b"x" * 100])
    reader.result()
    # The pacer is told the bound; the write has what its wait left.
    assert bounds == [2.0]
    assert timeouts == [pytest.approx(1.75)]
    assert client.sock.gettimeout() == 2.0


def test_a_connection_leaves_from_the_source_address_given():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        channel = Channel.connect(
            *server.getsockname(),
            connect_timeout=TIMEOUT,
            source_address="127.0.0.2",
        )
        with channel:
            conn, peer = server.accept()
            conn.close()
    assert peer[0] == "127.0.0.2"


def test_a_source_address_not_of_this_host_is_named():
    # 192.0.2.1 (TEST-NET-1) is no address of this host: the connection
    # cannot leave from it, and the error says so, not that the
    # destination cannot be reached.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        host, port = server.getsockname()
        with pytest.raises(TransportError) as caught:
            Channel.connect(
                host,
                port,
                connect_timeout=TIMEOUT,
                source_address="192.0.2.1",
            )
    text = str(caught.value)
    assert text.startswith("cannot leave from source address 192.0.2.1")
    assert "listen_address" in text and "my_ip" in text
