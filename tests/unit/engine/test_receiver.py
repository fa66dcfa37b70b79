"""The receiver's data frames over a real socket: no octet of a page
frame reaches the restoring guest before the frame is authenticated."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import receiver
from nova_xen_ncm.engine import restorer as restoring
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.stream import encoder
from nova_xen_ncm.stream import libxc

DOMID = 4
PAGE = base.PAGE_SIZE
TOKEN = b"k" * 32
TIMEOUT = 10.0
# A long run of pages: the size at which untagged frames are read
# straight into the guest's pages.
RUN = np.arange(100, 132, dtype=np.uint64)


@pytest.fixture
def host():
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    h = SimHost("unit", conf)
    h.create_empty_domain(
        base.DomainConfig(name="r", memory_bytes=4 << 20, vcpus=1), DOMID
    )
    yield h
    h.close()
    h.raise_dom0_errors()


def established(caps=()):
    """A client and a direct-mode server Channel over a socketpair,
    past the handshake in which both offered ``caps``."""
    a, b = socket.socketpair()
    client = Channel(
        a, framing.Connection(messages.Role.CLIENT), io_timeout=TIMEOUT
    )
    server = Channel(
        b,
        framing.Connection(messages.Role.SERVER, direct_payload=True),
        io_timeout=TIMEOUT,
    )
    # The handshake's messages are small: they fit the socket buffers,
    # so one thread can play both ends.
    client.send_buffers(client.connection.send_hello("mig", 0, caps))
    hello = server.receive()
    server.send_buffers(server.connection.send_challenge(TOKEN, caps))
    assert isinstance(hello, messages.Hello)
    client.receive()
    client.send_buffers(client.connection.send_auth(TOKEN))
    server.receive()
    server.send_buffers(server.connection.send_welcome())
    client.receive()
    assert client.connection.established and server.connection.established
    return client, server


def page_frame(client):
    """The wire octets of a page frame of RUN, each page a byte of its
    own, and the offset of the first page's contents in them."""
    data = [bytes([0x40 + i]) * PAGE for i in range(len(RUN))]
    record = encoder.join(
        encoder.Encoder().page_data(
            RUN, np.full(len(RUN), libxc.NOTAB, dtype=np.uint8), data
        )
    )
    wire = bytearray(
        b"".join(
            bytes(memoryview(b).cast("B"))
            for b in client.connection.send_data(1, [record], pages=True)
        )
    )
    headers = framing.FRAME_HEADER.size + framing.DATA_HEADER.size
    first_page = headers + len(record) - len(RUN) * PAGE
    return wire, first_page, data


def guest_pages(host):
    with host.map_pages(DOMID, RUN) as mapping:
        return [bytes(page) for page in mapping.pages]


def apply_one(server, restorer):
    header = server.receive()
    assert isinstance(header, messages.DataHeader) and header.pages
    return receiver._read_frame(server, header, restorer)


def test_tampered_tagged_page_frame_never_reaches_guest_memory(host):
    client, server = established()
    assert server.connection.frames_tagged
    wire, first_page, _ = page_frame(client)
    # A byte of a page's contents altered on the path: the frame's tag
    # then fails, and nothing of it may have been written to the guest.
    wire[first_page + 5 * PAGE + 7] ^= 0x5A
    # Populated (zero) beforehand, so they can be read whatever happens.
    host.populate(DOMID, RUN)
    before = guest_pages(host)
    client.sock.sendall(wire)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        apply_one(server, restorer)
    assert guest_pages(host) == before
    assert not any(any(page) for page in guest_pages(host))


def test_tagged_page_frame_is_applied_once_authenticated(host):
    client, server = established()
    wire, _, data = page_frame(client)
    client.sock.sendall(wire)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    assert apply_one(server, restorer) is None
    assert guest_pages(host) == data
    assert restorer.pages == len(RUN)


def test_untagged_page_frame_is_read_straight_into_guest_pages(host):
    client, server = established(caps=("tls-frames",))
    assert not server.connection.frames_tagged
    wire, _, data = page_frame(client)
    client.sock.sendall(wire)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    reads = []
    real = restorer.receive_pages

    def spy(length, read_into):
        reads.append(length)
        return real(length, read_into)

    restorer.receive_pages = spy
    assert apply_one(server, restorer) is None
    assert reads and guest_pages(host) == data


def frame_of(client, seq, pfns, fill, *, tamper=False):
    """The wire octets of page frame ``seq`` of ``pfns``, page i filled
    with byte ``fill + i`` (one page content byte altered if
    ``tamper``), and the pages' contents."""
    data = [bytes([fill + i]) * PAGE for i in range(len(pfns))]
    record = encoder.join(
        encoder.Encoder().page_data(
            pfns, np.full(len(pfns), libxc.NOTAB, dtype=np.uint8), data
        )
    )
    wire = bytearray(
        b"".join(
            bytes(memoryview(b).cast("B"))
            for b in client.connection.send_data(seq, [record], pages=True)
        )
    )
    if tamper:
        wire[-framing.TAG_SIZE - PAGE // 2] ^= 0x5A
    return wire, data


def test_page_frames_share_the_channels_buffer_each_exactly_its_own(host):
    # Tagged page frames are read into one buffer of the channel, reused:
    # a frame smaller than the one before is applied from its own octets
    # only (not the stale tail), a larger one grows the buffer, and a
    # tampered frame read over the previous frame's octets writes none.
    client, server = established()
    host.populate(DOMID, RUN)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)

    def apply(seq, pfns, fill, **kwargs):
        wire, data = frame_of(client, seq, pfns, fill, **kwargs)
        client.sock.sendall(wire)
        apply_one(server, restorer)
        return data

    b = apply(1, RUN[:8], 0x10)
    assert guest_pages(host)[:8] == b
    a = apply(2, RUN, 0x40)
    grown = server.frame_buffer(1).obj
    c = apply(3, RUN[8:24], 0x80)
    assert server.frame_buffer(1).obj is grown
    expected = a[:8] + c + a[24:]
    assert guest_pages(host) == expected
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        apply(4, RUN[24:], 0xC0, tamper=True)
    assert guest_pages(host) == expected


def test_a_frame_buffer_over_the_frame_limit_is_refused():
    client, server = established()
    limit = server.connection.max_data
    assert len(server.frame_buffer(limit)) == limit
    with pytest.raises(ProtocolError, match="over the"):
        server.frame_buffer(limit + 1)
    server.close()
    assert len(server._frame_buf) == 0


ENCRYPTED = (messages.Capability.ENCRYPTED_FRAMES.value,)


def test_encrypted_page_frame_is_decrypted_straight_into_guest_pages(host):
    client, server = established(caps=ENCRYPTED)
    assert server.connection.frames_encrypted
    wire, _, data = page_frame(client)
    client.sock.sendall(wire)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    assert apply_one(server, restorer) is None
    assert guest_pages(host) == data


def test_an_encrypted_frame_cut_before_its_tag_cannot_be_resumed(host):
    # GCM is malleable until its tag is checked: an on-path attacker
    # flips a bit of a pfn, so the first page's contents land on
    # another pfn, then cuts the connection before the tag. A resume
    # would resend this frame's pages, never that other pfn's: the
    # guest would run with it altered. The break must end the
    # migration (rolled back), not be retried as a transport failure.
    client, server = established(caps=ENCRYPTED)
    wire, first_page, _ = page_frame(client)
    entries = (
        framing.FRAME_HEADER.size
        + framing.DATA_HEADER.size
        + libxc.RHDR.size
        + libxc.PAGE_DATA_HDR.size
    )
    wire[entries] ^= 0x80  # pfn 100 becomes pfn 228
    client.sock.sendall(wire[: first_page + 3 * PAGE + 100])
    client.sock.shutdown(socket.SHUT_WR)
    restorer = restoring.Restorer(host, DOMID, pv_drivers=False)
    with pytest.raises(AuthenticationError, match="cannot resume"):
        apply_one(server, restorer)
    # The unauthenticated plaintext did reach the never-run guest, at the
    # attacker's pfn: why nothing of it may be kept.
    with host.map_pages(DOMID, np.array([228], dtype=np.uint64)) as m:
        assert bytes(m.pages[0]) == bytes([0x40]) * PAGE
