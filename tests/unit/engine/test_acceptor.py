"""The destination's one acceptor over loopback TCP: control, data,
resumed and commit query connections routed by what they proved, and
everything else refused."""

import contextlib
import socket
import ssl
import threading
import time

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.acceptor import Acceptor
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener

from .test_transport import Background

TOKEN = b"k" * 32
MIGRATION = "m-1"
TIMEOUT = 10.0


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("io_timeout", TIMEOUT, group="xen_ncm")
    conf.set_override("connect_timeout", 2.0, group="xen_ncm")
    return conf


class Destination:
    """What a receiver gives the acceptor: a phase, an acknowledgement
    count, the frames applied per channel."""

    def __init__(self):
        self.phase = "precopy"
        self.finished = 0
        self.applied = {0: 7, 1: 3}

    def status(self):
        return messages.Status(
            phase=self.phase, committed=self.phase == "done"
        )

    def on_finished(self):
        self.finished += 1


@pytest.fixture
def destination():
    return Destination()


@pytest.fixture
def acceptor(conf, destination):
    listener = Listener(
        "127.0.0.1", 0, 0, accept_timeout=TIMEOUT, handshake_timeout=2.0
    )
    acceptor = Acceptor(
        listener,
        MIGRATION,
        TOKEN,
        conf,
        status=destination.status,
        on_finished=destination.on_finished,
        resume_from=destination.applied.__getitem__,
    )
    yield acceptor
    acceptor.close()
    listener.close()


def connect(acceptor, channel=0, token=TOKEN, last_acked=None, mid=MIGRATION):
    ch = Channel.connect(
        *acceptor.listener.address, connect_timeout=TIMEOUT, io_timeout=TIMEOUT
    )
    try:
        welcome = ch.client_handshake(
            mid, token, channel=channel, last_acked=last_acked
        )
    except BaseException:
        ch.close()
        raise
    return ch, welcome


def soon():
    return time.monotonic() + TIMEOUT


def refused(acceptor, code, **kwargs):
    with pytest.raises(Refused) as caught:
        connect(acceptor, **kwargs)
    assert caught.value.code == code.value, caught.value
    return caught.value


def test_the_first_auth_of_channel_0_is_the_control_channel(acceptor):
    client, _ = connect(acceptor)
    server = acceptor.control(soon())
    assert server.connection.hello.channel == 0
    client.send(messages.Commit())
    assert isinstance(server.receive(), messages.Commit)
    client.close()
    server.close()


def test_a_peer_without_the_token_cannot_end_the_wait_for_the_source(
    acceptor,
):
    # The migration id is no secret: a peer that knows it and fails the
    # proof (or names a version nobody speaks) costs its own connection,
    # and the source, which holds the token, still gets in.
    refused(acceptor, messages.RefuseReason.AUTHENTICATION, token=b"x" * 32)
    assert not acceptor.finished.is_set()
    client, _ = connect(acceptor)
    server = acceptor.control(soon())
    assert server.connection.hello.channel == 0
    server.close()
    client.close()


def test_without_the_source_the_wait_ends_naming_the_last_failure(
    acceptor,
):
    refused(acceptor, messages.RefuseReason.AUTHENTICATION, token=b"x" * 32)
    with pytest.raises(Refused, match="wrong token proof"):
        acceptor.control(time.monotonic() + 0.5)


def test_a_failed_tls_handshake_is_recorded_once(conf, destination, tls_files):
    tls_files.enable(conf)
    listener = Listener(
        "127.0.0.1",
        0,
        0,
        accept_timeout=TIMEOUT,
        tls=transport.tls_context(conf, server=True),
        handshake_timeout=2.0,
    )
    acceptor = Acceptor(
        listener,
        MIGRATION,
        TOKEN,
        conf,
        status=destination.status,
        on_finished=destination.on_finished,
    )
    try:
        # Plain TCP speaking no TLS: the server's handshake fails.
        with socket.create_connection(listener.address, timeout=TIMEOUT) as s:
            s.sendall(b"not a TLS client hello" * 4)
            s.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                s.recv(1)
        until = time.monotonic() + TIMEOUT
        while not listener.rejected and time.monotonic() < until:
            time.sleep(0.05)
        time.sleep(0.2)
        assert len(listener.rejected) == 1, listener.rejected
        assert "TLS handshake failed" in listener.rejected[0][1]
    finally:
        acceptor.close()
        listener.close()


def test_another_migration_is_refused_and_the_source_still_awaited(
    acceptor,
):
    refused(acceptor, messages.RefuseReason.UNKNOWN_MIGRATION, mid="m-2")
    client, _ = connect(acceptor)
    acceptor.control(soon()).close()
    client.close()


def test_data_channels_only_once_setup_announced_them(acceptor):
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    refused(acceptor, messages.RefuseReason.TOO_MANY_CONNECTIONS, channel=1)
    acceptor.expect_data(3)
    clients = [connect(acceptor, channel=i)[0] for i in (2, 1)]
    servers = acceptor.data_channels(soon())
    assert sorted(servers) == [1, 2]
    assert all(s.connection.hello.channel == i for i, s in servers.items())
    # Channel 1 is there, channel 3 is beyond the count.
    refused(acceptor, messages.RefuseReason.TOO_MANY_CONNECTIONS, channel=1)
    refused(acceptor, messages.RefuseReason.TOO_MANY_CONNECTIONS, channel=3)
    for ch in [control, *clients, *servers.values()]:
        ch.close()


def test_resume_of_a_channel_that_did_not_drop_is_closed(acceptor):
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    # Closed, not refused: the source tries again.
    with pytest.raises(TransportError):
        connect(acceptor, channel=0, last_acked=5)
    control.close()


def test_resume_waits_for_the_drop_and_goes_on_from_what_was_applied(
    acceptor, destination
):
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    # The source resumes before this side noticed the drop.
    client = Background(connect, acceptor, channel=0, last_acked=5)
    time.sleep(0.3)
    server = acceptor.resumed(0, soon(), threading.Event())
    _, welcome = client.result()
    assert welcome.resume_from == destination.applied[0]
    assert server.connection.resume.last_acked == 5
    control.close()
    server.close()


def test_a_data_channel_resumed_before_its_drop_is_read_goes_on(
    acceptor, destination
):
    # The source saw data channel 1 break and resumes it while the
    # thread here still holds the old connection: not refused as a
    # channel connected twice (the source does not retry a refusal).
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    acceptor.expect_data(2)
    data, _ = connect(acceptor, channel=1)
    old = acceptor.data_channels(soon())[1]
    client = Background(connect, acceptor, channel=1, last_acked=2)
    time.sleep(0.3)
    server = acceptor.resumed(1, soon(), threading.Event())
    _, welcome = client.result()
    assert welcome.resume_from == destination.applied[1]
    assert server.connection.resume.last_acked == 2
    for ch in (control, data, old, server):
        ch.close()


def test_resume_after_the_outcome_is_refused(acceptor, destination):
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    destination.phase = "failed"
    error = refused(
        acceptor, messages.RefuseReason.BAD_REQUEST, channel=0, last_acked=5
    )
    assert "is over here (failed): nothing to resume" in str(error)
    control.close()


def test_later_auth_of_channel_0_is_a_commit_query(acceptor, destination):
    control, _ = connect(acceptor)
    acceptor.control(soon()).close()
    destination.phase = "done"
    query, _ = connect(acceptor)
    query.send(messages.Query())
    status = query.receive()
    assert (status.phase, status.committed) == ("done", True)
    query.send(messages.Finished())
    # Taken, and confirmed: the source knows it was not lost.
    assert query.receive().phase == "done"
    assert acceptor.finished.is_set()
    # The second acknowledgement is confirmed too and changes nothing.
    again, _ = connect(acceptor)
    again.send(messages.Finished())
    assert again.receive().phase == "done"
    with pytest.raises(TransportError, match="closed"):
        again.receive()
    assert destination.finished == 1
    for ch in (control, query, again):
        ch.close()


def test_a_query_is_answered_once_the_outcome_is_final(acceptor, destination):
    connect(acceptor)[0].close()
    acceptor.control(soon()).close()
    destination.phase = "rollback"
    threading.Timer(0.3, setattr, (destination, "phase", "failed")).start()
    query, _ = connect(acceptor)
    query.send(messages.Query())
    assert query.receive().phase == "failed"
    query.close()


def test_an_acknowledgement_before_the_outcome_acknowledges_nothing(
    acceptor, destination
):
    connect(acceptor)[0].close()
    acceptor.control(soon()).close()
    query, _ = connect(acceptor)
    query.send(messages.Finished())
    # Not taken, not confirmed: closed without a STATUS.
    with pytest.raises(TransportError, match="closed"):
        query.receive()
    query.close()
    assert not acceptor.finished.is_set()
    assert destination.finished == 0


def test_an_authenticated_query_holds_its_slot_for_a_bounded_time(
    conf, acceptor, destination
):
    connect(acceptor)[0].close()
    acceptor.control(soon()).close()
    destination.phase = "done"
    query, _ = connect(acceptor)
    start = time.monotonic()
    with pytest.raises(TransportError):
        # Asked again and again, it is still closed at the deadline.
        while time.monotonic() - start < 3 * conf.xen_ncm.connect_timeout:
            query.send(messages.Query())
            query.receive()
            time.sleep(0.2)
    assert time.monotonic() - start < 2 * conf.xen_ncm.connect_timeout
    query.close()


def test_tls_and_the_handshake_share_one_deadline(
    conf, destination, tls_files
):
    # A peer that spends most of the deadline on TLS, then trickles its
    # HELLO, is cut off at the deadline, not a second one after TLS.
    tls_files.enable(conf)
    deadline = 1.0
    listener = Listener(
        "127.0.0.1",
        0,
        0,
        accept_timeout=TIMEOUT,
        tls=transport.tls_context(conf, server=True),
        handshake_timeout=deadline,
    )
    acceptor = Acceptor(
        listener,
        MIGRATION,
        TOKEN,
        conf,
        status=destination.status,
        on_finished=destination.on_finished,
    )
    client = transport.tls_context(conf, server=False)
    client.check_hostname = False
    try:
        raw = socket.create_connection(listener.address, timeout=TIMEOUT)
        start = time.monotonic()
        time.sleep(0.7 * deadline)
        peer = client.wrap_socket(raw)
        closed = False
        # A byte of a HELLO frame now and then, each well within the
        # per-read timeout.
        for _ in range(int(3 * deadline / 0.1)):
            try:
                peer.sendall(b"\x00")
                peer.settimeout(0.1)
                if peer.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                closed = True
                break
        took = time.monotonic() - start
        peer.close()
        assert closed, "the trickling peer was never cut off"
        assert took < 1.5 * deadline, took
    finally:
        acceptor.close()
        listener.close()


def test_an_unconfirmed_acknowledgement_is_reported_as_such(
    conf, acceptor, destination
):
    # commit.finish says whether FINISHED was taken: a STATUS comes back
    # only once it was; a close or silence is no confirmation.
    connect(acceptor)[0].close()
    acceptor.control(soon()).close()
    early, _ = connect(acceptor)
    assert not commit.finish(early, TIMEOUT, MIGRATION)
    early.close()
    destination.phase = "done"
    late, _ = connect(acceptor)
    assert commit.finish(late, TIMEOUT, MIGRATION)
    late.close()
    assert destination.finished == 1
