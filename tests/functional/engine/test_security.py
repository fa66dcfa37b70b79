"""The authenticated data plane between two simulated hosts: mutual TLS,
the allowed source, stray and extra connections, a replayed session."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid

import pytest

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.sim.host import SimHost

from .conftest import guest_config


def running(host, domid):
    try:
        return host.domain_info(domid).state == base.DomainState.RUNNING
    except base.DomainNotFound:
        return False


def closed_by_peer(sock, within=10.0):
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_migration_over_mutual_tls_is_transparent(
    conf, tls_files, source, destination, migration
):
    tls_files.enable(conf)
    domid = source.create_domain(guest_config())
    seen = {}
    m = migration(
        source,
        domid,
        destination,
        source_hooks={
            ("state", "restore"): lambda e: seen.setdefault(
                "paused", checker.snapshot(source, domid)
            )
        },
        destination_hooks={
            ("state", "commit"): lambda e: seen.setdefault(
                "resumed", checker.snapshot(destination, domid)
            )
        },
    )
    assert m.run() is Phase.DONE, m.sender.error
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    assert running(destination, domid)
    assert not running(source, domid)


def test_source_without_tls_cannot_reach_a_tls_destination(
    conf, tls_files, source, destination, migration
):
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    conf.set_override("connect_timeout", 1.0, group="xen_ncm")
    conf.set_override("connect_retry_attempts", 2, group="xen_ncm")
    tls_files.enable(conf)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    conf.set_override("tls_enabled", False, group="xen_ncm")
    assert m.run() is Phase.FAILED
    assert m.receiver.state.phase is Phase.FAILED
    assert any("TLS" in why for _, why in m.receiver.listener.rejected)
    assert running(source, domid)
    assert destination.list_domains() == []


def test_source_from_another_address_is_refused(
    conf, source, destination, migration
):
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    conf.set_override("connect_retry_attempts", 2, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(
        source,
        domid,
        destination,
        receiver_class=lambda *a, **kw: Receiver(
            *a, source_address="192.0.2.10", **kw
        ),
    )
    assert m.run() is Phase.FAILED
    assert m.receiver.state.phase is Phase.FAILED
    rejected = m.receiver.listener.rejected
    assert rejected and "not an allowed source" in rejected[0][1]
    assert running(source, domid)
    assert destination.list_domains() == []


def test_a_multi_homed_source_leaves_from_the_address_it_announced(
    conf, source, destination, migration
):
    # Loopback is multi-homed: 127.0.0.2 is this host too, but a socket
    # not bound to it leaves from 127.0.0.1, which the destination does
    # not admit. Every connection counts: control, data channels.
    conf.set_override("channels", 3, group="xen_ncm")
    conf.set_override("connect_retry_attempts", 2, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, source_address="127.0.0.2")
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.listener.rejected == []
    assert m.receiver.listener.accepted == 3
    # Recovery's commit query leaves from it too.
    assert m.sender.journal.entry.source_address == "127.0.0.2"
    assert running(destination, domid)


def test_the_commit_query_leaves_from_the_announced_address(conf):
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        query = commit.CommitQuery(
            conf, listener.getsockname(), "m", b"k" * 32, "127.0.0.2"
        )
        got = {}

        def take():
            conn, peer = listener.accept()
            got["peer"] = peer[0]
            conn.close()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        with pytest.raises(EngineError):
            query.once()
        taker.join(5)
        assert got["peer"] == "127.0.0.2"
    finally:
        listener.close()


def test_extra_connection_during_a_migration_is_closed(
    conf, source, destination, migration
):
    # The grace of a connection beyond the expected ones.
    conf.set_override("connect_timeout", 0.5, group="xen_ncm")
    domid = source.create_domain(guest_config())
    intruders = []

    def intrude(event):
        if not intruders:
            sock = socket.create_connection(m.receiver.address, timeout=5)
            intruders.append(sock)
            intruders.append(closed_by_peer(sock))

    m = migration(
        source,
        domid,
        destination,
        destination_hooks={("state", "precopy"): intrude},
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert intruders[1] is True
    intruders[0].close()
    # Closed by the acceptor once the handshake deadline passed.
    assert any(
        "handshake not done within 0.5s" in why
        for _, why in m.receiver.listener.rejected
    )
    assert running(destination, domid)


def test_connection_of_another_migration_does_not_spoil_this_one(
    conf, source, destination, migration
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    # A stray source of another migration reaches this listener first.
    stray = Channel.connect(*m.receiver.address, connect_timeout=5)
    worker = threading.Thread(target=m.receiver.run, daemon=True)
    worker.start()
    with pytest.raises(Refused) as caught:
        stray.client_handshake(str(uuid.uuid4()), handshake.generate_token())
    stray.close()
    assert caught.value.code == messages.RefuseReason.UNKNOWN_MIGRATION
    assert m.sender.run() is Phase.DONE, m.sender.error
    worker.join(30)
    assert m.receiver.state.phase is Phase.DONE
    assert running(destination, domid)


class Recorder:
    """A TCP relay in front of ``target`` that keeps what the client
    sent: what an eavesdropper on the path captures. With ``flip``, the
    octet at that offset of what the client sent has its low bit
    flipped on the way (an attacker on the path). With ``cut``, the
    first connection is cut once that many octets of the client's went
    through; later connections (a resume) are relayed as they are."""

    def __init__(self, target, flip=None, cut=None):
        self.target = target
        self.flip = flip
        self.cut = cut
        self.sent = bytearray()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = self._server.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        first = True
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(
                target=self._relay, args=(client, first), daemon=True
            ).start()
            first = False

    def _relay(self, client, first):
        upstream = socket.create_connection(self.target)
        pumps = [
            threading.Thread(target=self._pump, args=(a, b, keep))
            for a, b, keep in (
                (client, upstream, first),
                (upstream, client, False),
            )
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        client.close()
        upstream.close()

    def _pump(self, src, dst, keep):
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                for sock in (dst, src):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if keep:
                start = len(self.sent)
                self.sent.extend(data)
                if self.flip is not None and (
                    start <= self.flip < start + len(data)
                ):
                    data = bytearray(data)
                    data[self.flip - start] ^= 1
                if self.cut is not None and len(self.sent) >= self.cut:
                    with contextlib.suppress(OSError):
                        dst.sendall(data[: self.cut - start])
                    for sock in (dst, src):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self._server.close()


def test_replayed_stream_is_refused_by_a_new_migration(
    conf, source, destination, migration
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    relay = Recorder(m.receiver.address)
    m.sender.data.endpoint = relay.address
    assert m.run() is Phase.DONE, m.sender.error
    relay.close()
    captured = bytes(relay.sent)
    assert len(captured) > 8 << 20 // 2

    # Replay it all into a new migration of the same id and even the same
    # token (a token is one-time: the worst case) on a third host.
    other = SimHost("other", conf)
    # The replay fails its proof; the destination waits on for a source
    # that holds the token until accept_timeout, then names the refusal.
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    try:
        replayed = Receiver(
            other, m.receiver.migration_id, m.sender.token, conf=conf
        )
        worker = threading.Thread(target=replayed.run, daemon=True)
        worker.start()
        with socket.create_connection(replayed.address, timeout=10) as sock:
            try:
                sock.sendall(captured)
            except OSError:
                pass  # refused midway: the destination closed
        worker.join(30)
        assert replayed.state.phase is Phase.FAILED
        assert isinstance(replayed.error, Refused)
        assert replayed.error.code == messages.RefuseReason.AUTHENTICATION
        assert other.list_domains() == []
    finally:
        other.close()
    other.raise_dom0_errors()


@pytest.mark.parametrize(
    "mode",
    [
        "encrypted",
        "encrypted-lz4",
        "encrypted-channels",
        "tls",
        "unauthenticated",
    ],
)
def test_migration_without_frame_tags_is_transparent(
    conf, tls_files, source, destination, migration, mode
):
    if mode != "unauthenticated":
        tls_files.enable(conf)
        conf.set_override(
            "tls_encrypted_frames", mode != "tls", group="xen_ncm"
        )
        if mode == "encrypted-lz4":
            # Compressed frames are decrypted whole, not into place.
            conf.set_override("compression", "lz4", group="xen_ncm")
        if mode == "encrypted-channels":
            # Each data channel runs TLS and derives its own keys.
            conf.set_override("channels", 3, group="xen_ncm")
    else:
        conf.set_override("frame_authentication", False, group="xen_ncm")
    domid = source.create_domain(guest_config())
    seen = {}
    holder = {}

    def paused(event):
        seen.setdefault("paused", source.guest_state(domid))
        connection = holder["m"].sender.data.control.connection
        seen["capabilities"] = connection.capabilities
        seen["tagged"] = connection.frames_tagged

    m = holder["m"] = migration(
        source,
        domid,
        destination,
        source_hooks={
            ("state", "restore"): paused,
            ("round", "precopy"): lambda e: seen.setdefault(
                "encrypted",
                [
                    c.connection.frames_encrypted
                    for c in holder["m"].sender.data.channels
                    if c is not None
                ],
            ),
        },
        destination_hooks={
            ("state", "commit"): lambda e: seen.setdefault(
                "resumed", destination.guest_state(domid)
            )
        },
    )
    assert m.run() is Phase.DONE, m.sender.error
    cap = {
        "encrypted": "encrypted-frames",
        "encrypted-lz4": "encrypted-frames",
        "encrypted-channels": "encrypted-frames",
        "tls": "tls-frames",
        "unauthenticated": "unauthenticated-frames",
    }[mode]
    assert cap in seen["capabilities"] and seen["tagged"] is False
    encrypted = mode.startswith("encrypted")
    assert seen["encrypted"] == [encrypted] * conf.xen_ncm.channels
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    assert running(destination, domid)
    assert not running(source, domid)


def _guest_pages(host, domid, count=64):
    """Up to ``count`` distinct non-zero pages of the guest's memory."""
    pfns = host.populated_pfns(domid)
    pages = []
    with host.map_pages(domid, pfns) as mapping:
        for page in mapping.pages:
            data = bytes(page)
            if any(data) and data not in pages:
                pages.append(data)
                if len(pages) == count:
                    break
    return pages


@pytest.mark.parametrize("mode", ["plain", "encrypted"])
def test_encrypted_frames_carry_no_guest_memory_in_the_clear(
    conf, tls_files, source, destination, migration, mode
):
    if mode == "encrypted":
        tls_files.enable(conf)
    domid = source.create_domain(guest_config(dirty_rate=0))
    m = migration(source, domid, destination)
    relay = Recorder(m.receiver.address)
    m.sender.data.endpoint = relay.address
    assert m.run() is Phase.DONE, m.sender.error
    relay.close()
    captured = bytes(relay.sent)
    pages = _guest_pages(destination, domid)
    assert len(pages) == 64
    found = [page for page in pages if page in captured]
    if mode == "plain":
        # The same search finds the pages of an authenticated but
        # unencrypted plain TCP migration (all but those the guest wrote
        # since it runs on the destination: its own counters).
        assert len(found) >= len(pages) - 4
        return
    assert found == []
    # TLS carried the handshake (a TLS handshake record first), and
    # SETUP, the first frame after it, is not in the clear either.
    assert captured[0] == 0x16
    assert b'"memory_bytes"' not in captured


def test_a_flipped_bit_of_an_encrypted_frame_fails_the_migration(
    conf, tls_files, source, destination, migration
):
    tls_files.enable(conf)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    # Well inside the page round (8 MiB guest), after TLS was left.
    relay = Recorder(m.receiver.address, flip=3 << 20)
    m.sender.data.endpoint = relay.address
    assert m.run() is Phase.FAILED
    relay.close()
    assert "authentication tag mismatch" in str(m.receiver.error)
    assert "DATA frame" in str(m.receiver.error)
    # One running copy, the source's; the destination's, never run on
    # the unauthenticated pages, is gone.
    assert running(source, domid)
    assert destination.list_domains() == []


def test_an_encrypted_frame_cut_before_its_tag_fails_the_migration(
    conf, tls_files, source, destination, migration
):
    # Its plaintext was decrypted into the restoring guest before its
    # tag: a resume would keep whatever an altered frame wrote.
    tls_files.enable(conf)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    relay = Recorder(m.receiver.address, cut=3 << 20)
    m.sender.data.endpoint = relay.address
    assert m.run() is Phase.FAILED
    relay.close()
    assert "cannot resume" in str(m.receiver.error)
    assert running(source, domid)
    assert destination.list_domains() == []


def test_a_dropped_encrypted_connection_resumes_under_new_keys(
    conf, tls_files, source, destination, migration
):
    from nova_xen_ncm.engine import policy

    tls_files.enable(conf)
    domid = source.create_domain(guest_config())
    holder = {"keys": []}

    def two_rounds(stats):
        if stats.iteration >= 2:
            return policy.Decision(policy.Action.STOP_AND_COPY, reason="2")
        return policy.Decision(policy.Action.CONTINUE)

    def keys(event):
        connection = holder["m"].sender.data.control.connection
        holder["keys"].append(
            (connection.frames_encrypted, connection._send_key)
        )
        if event.detail["round"] == 0:
            holder["m"].sender.data.control.sock.shutdown(socket.SHUT_RDWR)

    m = holder["m"] = migration(
        source,
        domid,
        destination,
        policy=two_rounds,
        source_hooks={("round", "precopy"): keys},
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert m.sender.stats.retries == 1
    (enc0, key0), (enc1, key1) = holder["keys"][:2]
    # The reconnection ran TLS and the key exchange again.
    assert enc0 and enc1
    assert key0 != key1
    assert running(destination, domid)
    assert not running(source, domid)
