"""Who may connect to a destination's listener: allowed sources, the
expected number of connections, idle connections, mutual TLS, and the
one-time token inside TLS."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.acceptor import Acceptor
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener

TOKEN = b"t" * 32
TIMEOUT = 10.0


def run(fn, *args, **kwargs):
    """Run ``fn`` in a thread; the returned callable joins and returns
    its result or raises its exception."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def result():
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "background side hung"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return result


def take(listener, timeout=TIMEOUT):
    """The next connection as the acceptor takes it (engine/acceptor.py:
    the TCP connection, then TLS), counted as established."""
    taken = listener.take(timeout)
    if taken is None:
        raise TransportError(f"no connection within {timeout}s")
    sock = listener.secure(*taken)
    listener.accepted += 1
    return sock


def token_for(hello):
    if hello.migration_id != "mig":
        raise Refused(messages.RefuseReason.UNKNOWN_MIGRATION, "unknown")
    return TOKEN


def closed_by_peer(sock, within=TIMEOUT):
    """Whether the peer closed ``sock`` (EOF or reset) within the time."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connection_from_a_source_not_allowed_is_closed(caplog):
    caplog.set_level(logging.WARNING)
    with Listener(
        "127.0.0.1",
        0,
        0,
        accept_timeout=0.5,
        allowed_sources=["192.0.2.0/24", "198.51.100.7"],
    ) as listener:
        with socket.create_connection(listener.address) as stranger:
            assert closed_by_peer(stranger)
        with pytest.raises(TransportError, match="no connection"):
            take(listener, 0.5)
        assert listener.accepted == 0
    assert "not an allowed source" in caplog.text
    assert listener.rejected[0][1].startswith("not an allowed source")


def test_connection_from_an_allowed_source_is_accepted():
    with Listener(
        "127.0.0.1",
        0,
        0,
        accept_timeout=TIMEOUT,
        allowed_sources=["127.0.0.1"],
    ) as listener:
        with socket.create_connection(listener.address) as client:
            server = take(listener)
            server.sendall(b"x")
            assert client.recv(1) == b"x"
            server.close()
        assert listener.rejected == []


def test_bad_allowed_source_is_a_clear_error():
    with pytest.raises(ValueError, match="bad allowed source"):
        Listener("127.0.0.1", 0, 0, allowed_sources=["not-an-address"])


def test_connection_beyond_the_expected_ones_is_closed_and_logged(caplog):
    caplog.set_level(logging.WARNING)
    with Listener(
        "127.0.0.1", 0, 0, accept_timeout=TIMEOUT, handshake_timeout=0.2
    ) as listener:
        first = socket.create_connection(listener.address)
        accepted = take(listener)
        second = socket.create_connection(listener.address)
        assert closed_by_peer(second)
        # The established connection is untouched.
        first.sendall(b"ok")
        assert accepted.recv(2) == b"ok"
        for sock in (first, second, accepted):
            sock.close()
    assert "expected connections of the migration are established" in (
        caplog.text
    )


def test_a_reconnect_admitted_within_the_grace_is_accepted():
    with Listener(
        "127.0.0.1", 0, 0, accept_timeout=TIMEOUT, handshake_timeout=2.0
    ) as listener:
        first = socket.create_connection(listener.address)
        take(listener).close()
        # The channel broke: the source reconnects before the
        # destination noticed and admitted it.
        again = socket.create_connection(listener.address)
        time.sleep(0.3)
        listener.allow()
        server = take(listener)
        again.sendall(b"r")
        assert server.recv(1) == b"r"
        for sock in (first, again, server):
            sock.close()
        assert listener.rejected == []


def test_idle_connection_times_out(caplog):
    caplog.set_level(logging.WARNING)
    with Listener(
        "127.0.0.1", 0, 0, accept_timeout=TIMEOUT, handshake_timeout=0.2
    ) as listener:
        with socket.create_connection(listener.address):
            channel = Channel(
                take(listener),
                framing.Connection(messages.Role.SERVER),
                io_timeout=TIMEOUT,
            )
            started = time.monotonic()
            with pytest.raises(TransportError, match="no HELLO"):
                channel.server_handshake(
                    token_for, deadline=listener.handshake_timeout
                )
            assert time.monotonic() - started < TIMEOUT / 2
            channel.close()
    assert "without a HELLO" in caplog.text


# -- TLS ---------------------------------------------------------------


def tls_conf(tls_files, **files):
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    tls_files.enable(conf, **files)
    return conf


def tls_listener(tls_files, **kwargs):
    server = transport.tls_context(tls_conf(tls_files), server=True)
    return Listener(
        "127.0.0.1",
        0,
        0,
        accept_timeout=kwargs.pop("accept_timeout", TIMEOUT),
        tls=server,
        handshake_timeout=2.0,
        **kwargs,
    )


def serve(listener, wait=TIMEOUT):
    """The source's authenticated control channel, through the engine's
    acceptor (TLS failures cost their own connection only)."""
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("io_timeout", TIMEOUT, group="xen_ncm")
    acceptor = Acceptor(
        listener,
        "mig",
        TOKEN,
        conf,
        status=lambda: messages.Status(phase="precopy", committed=False),
        on_finished=lambda: None,
    )
    try:
        return acceptor.control(time.monotonic() + wait)
    finally:
        acceptor.close()


def connect(listener, context, token=TOKEN):
    """A source's channel, offering what the data path offers with the
    default settings (encrypted-frames inside TLS)."""
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    channel = Channel.connect(
        "127.0.0.1",
        listener.port,
        connect_timeout=TIMEOUT,
        io_timeout=TIMEOUT,
        tls=context,
    )
    caps = transport.frame_capabilities(conf.xen_ncm, channel.sock)
    try:
        channel.client_handshake("mig", token, capabilities=caps)
    except BaseException:
        channel.close()
        raise
    return channel


def test_mutual_tls_carries_the_authenticated_protocol(tls_files):
    client_ctx = transport.tls_context(tls_conf(tls_files), server=False)
    with tls_listener(tls_files) as listener:
        served = run(serve, listener)
        client = connect(listener, client_ctx)
        server = served()
        # TLS verified both ends, carried the handshake, and was left:
        # the frames are encrypted from there on.
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
        assert not isinstance(client.sock, transport.TlsSocket)
        assert not isinstance(server.sock, transport.TlsSocket)
        assert client.connection.frames_encrypted
        assert server.connection.frames_encrypted
        # Page-sized buffers and a large one, vectored as the data path
        # sends them.
        pages = [bytes([i]) * 4096 for i in range(40)] + [b"z" * 300_000]
        client.send_data(1, pages)
        # The acceptor's channels read page frames straight into place.
        header = server.receive()
        body = bytearray(header.length)
        server.read_payload_into(memoryview(body))
        assert isinstance(server.receive(), messages.DataEnd)
        assert bytes(body) == b"".join(pages)
        server.send(messages.Ack(seq=1))
        assert client.receive() == messages.Ack(seq=1)
        peer = server.tls_peer
        assert dict(x[0] for x in peer["subject"])["commonName"] == "host"
        client.close()
        server.close()


def test_token_is_still_checked_inside_tls(tls_files):
    client_ctx = transport.tls_context(tls_conf(tls_files), server=False)
    with tls_listener(tls_files) as listener:
        served = run(serve, listener, 1.0)
        with pytest.raises(Refused) as caught:
            connect(listener, client_ctx, token=b"w" * 32)
        assert caught.value.code == messages.RefuseReason.AUTHENTICATION
        # Not the source: the wait ends at its time, naming the refusal.
        with pytest.raises(Refused, match="wrong token proof"):
            served()


def test_client_with_a_certificate_of_another_authority_is_refused(
    tls_files, caplog
):
    caplog.set_level(logging.WARNING)
    rogue_conf = tls_conf(
        tls_files, cert=tls_files.rogue_cert, key=tls_files.rogue_key
    )
    rogue = transport.tls_context(rogue_conf, server=False)
    genuine = transport.tls_context(tls_conf(tls_files), server=False)
    with tls_listener(tls_files) as listener:
        served = run(serve, listener)
        with pytest.raises((TransportError, OSError)):
            # The server refuses the handshake (or closes right after it
            # under TLS 1.3, which the first read sees).
            connect(listener, rogue)
        # The slot stayed free: the genuine source gets in.
        client = connect(listener, genuine)
        server = served()
        assert listener.accepted == 1
        # Recorded once, by whoever refused it.
        assert len(listener.rejected) == 1, listener.rejected
        client.close()
        server.close()
    assert "TLS handshake failed" in caplog.text


def test_client_without_a_certificate_is_refused(tls_files):
    import ssl

    bare = ssl.create_default_context(cafile=tls_files.ca)
    with tls_listener(tls_files, accept_timeout=1.0) as listener:
        served = run(serve, listener, 1.0)
        with pytest.raises((TransportError, OSError)):
            connect(listener, bare)
        with pytest.raises(TransportError, match="TLS handshake failed"):
            served()


def test_destination_certificate_must_name_the_address(tls_files):
    client_ctx = transport.tls_context(tls_conf(tls_files), server=False)
    misnamed = tls_conf(
        tls_files, cert=tls_files.misnamed_cert, key=tls_files.misnamed_key
    )
    server_ctx = transport.tls_context(misnamed, server=True)
    with Listener(
        "127.0.0.1", 0, 0, accept_timeout=1.0, tls=server_ctx
    ) as listener:
        served = run(serve, listener, 1.0)
        with pytest.raises(TransportError, match="TLS handshake failed"):
            connect(listener, client_ctx)
        # The destination dropped the connection and waited on.
        with pytest.raises(TransportError):
            served()
        assert listener.accepted == 0


def test_tls_offers_only_aead_suites(tls_files):
    """Every suite either end may agree on is an AEAD one (TLS 1.3's,
    or TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305): no CBC-HMAC."""
    for server in (True, False):
        ctx = transport.tls_context(tls_conf(tls_files), server=server)
        names = [c["name"] for c in ctx.get_ciphers()]
        assert names
        for c in ctx.get_ciphers():
            assert c["aead"], c["name"]
            if c["protocol"] == "TLSv1.2":
                assert c["kea"] == "kx-ecdhe", c["name"]


def test_tls_without_its_files_is_a_clear_error():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    assert transport.tls_context(conf, server=True) is None
    conf.set_override("tls_enabled", True, group="xen_ncm")
    with pytest.raises(TransportError, match="tls_cert_file, tls_key_file"):
        transport.tls_context(conf, server=False)
    conf.set_override("tls_cert_file", "/nonexistent.pem", group="xen_ncm")
    conf.set_override("tls_key_file", "/nonexistent.key", group="xen_ncm")
    conf.set_override("tls_ca_file", "/nonexistent-ca.pem", group="xen_ncm")
    with pytest.raises(TransportError, match="cannot set up TLS"):
        transport.tls_context(conf, server=True)


# -- replay --------------------------------------------------------------


def _session(server_conn):
    """A client's whole session with ``server_conn`` in memory: the
    octets the client sent (what an eavesdropper captures)."""
    client = framing.Connection(messages.Role.CLIENT)
    sent = bytearray()

    def to_server(buffers):
        data = b"".join(bytes(b) for b in buffers)
        sent.extend(data)
        server_conn.receive_data(data)
        return server_conn.next_event()

    def to_client(buffers):
        client.receive_data(b"".join(bytes(b) for b in buffers))
        return client.next_event()

    hello = to_server(client.send_hello("mig", 0))
    to_client(server_conn.send_challenge(token_for(hello)))
    to_server(client.send_auth(TOKEN))
    to_client(server_conn.send_welcome())
    to_server(client.send_data(1, [b"pages"]))
    return bytes(sent)


def test_replayed_session_fails_authentication_on_a_new_connection():
    captured = _session(framing.Connection(messages.Role.SERVER))
    # The same migration id and even the same token: the new server's
    # nonce makes the captured proof worthless.
    server = framing.Connection(messages.Role.SERVER)
    server.receive_data(captured)
    hello = server.next_event()
    assert isinstance(hello, messages.Hello)
    server.send_challenge(token_for(hello))
    with pytest.raises(AuthenticationError, match="wrong token"):
        server.next_event()
    assert not server.established


def _tls_handshake(listener, conf, client_ctx):
    """A source and a destination channel through ``listener``, each
    offering the frame capabilities its own socket and settings give;
    returns them with what each offered."""
    offered = {}

    def serve_tls():
        channel = Channel(
            take(listener),
            framing.Connection(messages.Role.SERVER),
            io_timeout=TIMEOUT,
        )
        caps = transport.frame_capabilities(conf.xen_ncm, channel.sock)
        offered["server"] = caps
        channel.server_handshake(token_for, capabilities=caps)
        return channel

    served = run(serve_tls)
    client = Channel.connect(
        "127.0.0.1",
        listener.port,
        connect_timeout=TIMEOUT,
        io_timeout=TIMEOUT,
        tls=client_ctx,
    )
    caps = transport.frame_capabilities(conf.xen_ncm, client.sock)
    client.client_handshake("mig", TOKEN, capabilities=caps)
    server = served()
    return client, server, caps, offered["server"]


def test_tls_connections_drop_the_frame_tag_and_carry_large_writes(tls_files):
    conf = tls_conf(tls_files)
    conf.set_override("tls_encrypted_frames", False, group="xen_ncm")
    client_ctx = transport.tls_context(conf, server=False)
    with tls_listener(tls_files) as listener:
        client, server, caps, _ = _tls_handshake(listener, conf, client_ctx)
        assert caps == ["tls-frames"]
        assert not client.connection.frames_tagged
        assert not server.connection.frames_tagged
        # Pages, a buffer over the staging size and pages again: order
        # and content survive the gathering into 1 MiB writes.
        pages = [bytes([i % 256]) * 4096 for i in range(300)]
        big = os.urandom(transport.TlsSocket.CHUNK + 5)
        body = [*pages, big, *pages[:7]]
        client.send_data(1, body)
        got = server.receive()
        assert bytes(got.payload) == b"".join(body)
        client.close()
        server.close()


def test_plain_connections_keep_the_tag_unless_configured_off():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    a, b = socket.socketpair()
    try:
        assert transport.frame_capabilities(conf.xen_ncm, a) == []
        conf.set_override("frame_authentication", False, group="xen_ncm")
        assert transport.frame_capabilities(conf.xen_ncm, a) == [
            "unauthenticated-frames"
        ]
    finally:
        a.close()
        b.close()


def test_tls_without_the_hostname_check_keeps_the_frame_tag(tls_files):
    # The token handshake is not bound to the TLS session: a source
    # that did not check the destination's name keeps the tag keyed by
    # the token, or a relay holding any certificate of the CA could
    # alter frames.
    conf = tls_conf(tls_files)
    conf.set_override("tls_check_hostname", False, group="xen_ncm")
    conf.set_override("tls_encrypted_frames", False, group="xen_ncm")
    client_ctx = transport.tls_context(conf, server=False)
    with tls_listener(tls_files) as listener:
        client, server, caps, served_caps = _tls_handshake(
            listener, conf, client_ctx
        )
        assert served_caps == ["tls-frames"]
        assert caps == []
        assert client.connection.frames_tagged
        assert server.connection.frames_tagged
        client.send_data(1, [b"p" * 4096])
        assert bytes(server.receive().payload) == b"p" * 4096
        client.close()
        server.close()


def _mixed_handshake(tls_files, server_encrypts, client_encrypts):
    """A destination and a source whose tls_encrypted_frames differ."""
    server_conf = tls_conf(tls_files)
    server_conf.set_override(
        "tls_encrypted_frames", server_encrypts, group="xen_ncm"
    )
    client_conf = tls_conf(tls_files)
    client_conf.set_override(
        "tls_encrypted_frames", client_encrypts, group="xen_ncm"
    )
    client_ctx = transport.tls_context(client_conf, server=False)
    with tls_listener(tls_files) as listener:

        def serve_tls():
            channel = Channel(
                take(listener),
                framing.Connection(messages.Role.SERVER),
                io_timeout=TIMEOUT,
            )
            caps = transport.frame_capabilities(
                server_conf.xen_ncm, channel.sock
            )
            try:
                channel.server_handshake(token_for, capabilities=caps)
            finally:
                channel.close()

        served = run(serve_tls)
        client = Channel.connect(
            "127.0.0.1",
            listener.port,
            connect_timeout=TIMEOUT,
            io_timeout=TIMEOUT,
            tls=client_ctx,
        )
        caps = transport.frame_capabilities(client_conf.xen_ncm, client.sock)
        try:
            with pytest.raises(Refused) as on_client:
                client.client_handshake("mig", TOKEN, capabilities=caps)
        finally:
            client.close()
        with pytest.raises((Refused, TransportError)) as on_server:
            served()
    return on_client.value, on_server.value


def test_a_source_without_encrypted_frames_is_refused_at_the_handshake(
    tls_files,
):
    client, server = _mixed_handshake(
        tls_files, server_encrypts=True, client_encrypts=False
    )
    assert client.code == messages.RefuseReason.MISSING_CAPABILITY
    assert "source does not offer encrypted-frames" in client.text
    assert "tls_encrypted_frames" in client.text
    assert isinstance(server, Refused)


def test_a_destination_without_encrypted_frames_is_refused_at_the_handshake(
    tls_files,
):
    client, _ = _mixed_handshake(
        tls_files, server_encrypts=False, client_encrypts=True
    )
    assert client.code == messages.RefuseReason.MISSING_CAPABILITY
    assert "destination does not support encrypted-frames" in client.text


def test_encrypted_frames_need_no_hostname_check(tls_files):
    # Their keys need the token as well as what crossed inside TLS: a
    # relay holding a certificate of the CA sees the contributions but
    # cannot derive the keys.
    conf = tls_conf(tls_files)
    conf.set_override("tls_check_hostname", False, group="xen_ncm")
    client_ctx = transport.tls_context(conf, server=False)
    with tls_listener(tls_files) as listener:
        client, server, caps, served_caps = _tls_handshake(
            listener, conf, client_ctx
        )
        assert caps == served_caps == ["encrypted-frames"]
        assert client.connection.frames_encrypted
        assert server.connection.frames_encrypted
        pages = [os.urandom(4096) for _ in range(300)]
        client.send_data(1, pages, pages=True)
        assert bytes(server.receive().payload) == b"".join(pages)
        server.send(messages.Ack(seq=1))
        assert client.receive() == messages.Ack(seq=1)
        client.close()
        server.close()


def _pump(sock, peer, incoming, outgoing, step):
    """Drive ``peer`` (an SSLObject over memory) with ``step`` until it
    no longer wants to read, exchanging octets over ``sock``."""
    while True:
        try:
            return step()
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise
            incoming.write(data)
        finally:
            if outgoing.pending:
                sock.sendall(outgoing.read())


@pytest.mark.parametrize(
    "then, read",
    [(b"", True), (b"ping", True), (b"ping", False)],
    ids=["raw", "record-read+raw", "record-unread"],
)
def test_leaving_tls_keeps_what_the_peer_sent_right_after_close_notify(
    tls_files, then, read
):
    # The peer's close_notify and the first octets it sends on plain
    # TCP arrive in one segment, and with TLS 1.3 its session tickets
    # before them: leave() must stop reading at the close_notify, the
    # rest staying in the socket for the encrypted frames.
    conf = tls_conf(tls_files)
    server_ctx = transport.tls_context(conf, server=True)
    client_ctx = transport.tls_context(conf, server=False)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        ours = socket.create_connection(listening.getsockname())
        theirs, _ = listening.accept()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    with ours, theirs:
        ours.settimeout(TIMEOUT)
        theirs.settimeout(TIMEOUT)
        handshake = run(
            client_ctx.wrap_socket, ours, server_hostname="127.0.0.1"
        )
        _pump(theirs, peer, incoming, outgoing, peer.do_handshake)
        tls = transport.TlsSocket(handshake())
        raw = b"first encrypted frame" * 100
        if then:
            # Application data just before the close_notify: the
            # socket's reader takes it before leaving.
            peer.write(then)
        with contextlib.suppress(ssl.SSLWantReadError):
            peer.unwrap()
        theirs.sendall(outgoing.read() + raw)
        if then and not read:
            # Application data not yet taken from TLS: leaving fails
            # loudly (the channel's handshake then fails), it is never
            # dropped.
            with pytest.raises(ssl.SSLError, match="APPLICATION_DATA"):
                tls.leave()
            return
        if then:
            assert tls.recv(len(then)) == then
        left = run(tls.leave)
        # The peer answers our close_notify.
        _pump(theirs, peer, incoming, outgoing, peer.unwrap)
        plain = left()
        assert not isinstance(plain, ssl.SSLSocket)
        got = b""
        while len(got) < len(raw):
            got += plain.recv(len(raw) - len(got))
        assert got == raw
        plain.close()
