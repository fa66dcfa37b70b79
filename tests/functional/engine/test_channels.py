"""Migrations over several data channels between two simulated hosts:
page batches shared out over the channels, each authenticated, with
compression, and a dropped channel resumed. About 15 s in all."""

from __future__ import annotations

import socket

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import checker

from .conftest import DEVICES
from .conftest import guest_config
from .test_phases import assert_only_on
from .test_phases import snapshots


def rounds(count):
    def decide(stats):
        if stats.iteration >= count:
            return policy.Decision(policy.Action.STOP_AND_COPY, reason="n")
        return policy.Decision(policy.Action.CONTINUE)

    return decide


def test_three_channels_migrate_transparently(
    conf, source, destination, migration
):
    conf.set_override("channels", 3, group="xen_ncm")
    domid = source.create_domain(guest_config(devices=DEVICES))
    seen, at_source, at_destination = snapshots(source, destination, domid)
    m = migration(
        source,
        domid,
        destination,
        policy=rounds(3),
        source_hooks=at_source,
        destination_hooks=at_destination,
    )
    # Small batches: a round of this small guest has many to share out.
    m.sender.stream.batch_pages = 64
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    # Both data channels carried page batches (a third of round 0's 32
    # at least), not only the flushes that end each round (4).
    applied = m.receiver._data_applied
    assert sorted(applied) == [1, 2]
    assert all(seq >= 4 + 10 for seq in applied.values()), applied
    assert_only_on(destination, source, domid)


def test_compression_over_three_channels(conf, source, destination, migration):
    conf.set_override("channels", 3, group="xen_ncm")
    conf.set_override("compression", "lz4", group="xen_ncm")
    domid = source.create_domain(guest_config())
    seen, at_source, at_destination = snapshots(source, destination, domid)
    m = migration(
        source,
        domid,
        destination,
        source_hooks=at_source,
        destination_hooks=at_destination,
    )
    assert m.run() is Phase.DONE, m.sender.error
    stats = m.sender.stats.to_dict()
    # The guest's pages compress: fewer octets than pages on the wire.
    assert stats["bytes_sent"] < stats["pages_sent"] * 4096
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    assert all(seq > 0 for seq in m.receiver._data_applied.values())
    assert_only_on(destination, source, domid)


def test_dropped_data_channel_is_resumed(conf, source, destination, migration):
    conf.set_override("channels", 3, group="xen_ncm")
    domid = source.create_domain(guest_config(devices=DEVICES))
    seen, at_source, at_destination = snapshots(source, destination, domid)
    m = migration(
        source,
        domid,
        destination,
        policy=rounds(3),
        source_hooks=at_source,
        destination_hooks=at_destination,
    )
    m.sender.stream.batch_pages = 64
    dropped = []

    def drop_data_channel(event):
        if event.detail["round"] == 0:
            # The network breaks under data channel 2 between rounds.
            channel = m.sender.data.channels[2]
            dropped.append(channel.connection.last_seq)
            channel.sock.shutdown(socket.SHUT_RDWR)

    m.source_events.hooks[("round", "precopy")] = drop_data_channel
    assert m.run() is Phase.DONE, m.sender.error
    assert dropped and dropped[0] > 0
    assert m.sender.stats.retries == 1
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert "precopy round 1" in retries[0].detail["what"]
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    # The resumed channel went on numbering after what it had applied.
    assert m.receiver._data_applied[2] > dropped[0]
    assert_only_on(destination, source, domid)


def test_tampered_page_frame_on_a_data_channel_rolls_back(
    conf, source, destination, migration, monkeypatch
):
    conf.set_override("channels", 2, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    frame_out = framing.Connection._frame_out

    def corrupt(self, mtype, flags, parts):
        out = frame_out(self, mtype, flags, parts)
        if flags & framing.FLAG_PAGES and self.hello.channel == 1:
            # One flipped bit in the last octet of the tag.
            tag = bytearray(out[-1])
            tag[-1] ^= 1
            out[-1] = bytes(tag)
        return out

    monkeypatch.setattr(framing.Connection, "_frame_out", corrupt)
    assert m.run() is Phase.FAILED
    assert m.receiver.state.phase is Phase.FAILED
    assert isinstance(m.receiver.error, AuthenticationError)
    assert "authentication tag" in str(m.receiver.error)
    assert_only_on(source, destination, domid)
