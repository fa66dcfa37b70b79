"""A connection dropped in the middle of a round, and the memory the
stop-and-copy takes: the stream goes on from the last frame the
destination applied, and the final pages are read as they are sent."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import tracemalloc

import pytest

from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine import receiver as receiver_module
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import guest_config

MiB = 1 << 20


def stop_after(rounds):
    def decide(stats):
        if stats.iteration >= rounds:
            return policy.Decision(policy.Action.STOP_AND_COPY, reason="n")
        return policy.Decision(policy.Action.CONTINUE)

    return decide


def running_on(host, domid):
    try:
        return host.domain_info(domid).state == base.DomainState.RUNNING
    except base.DomainNotFound:
        return False


def watch_batches(sender, phase, rounds, seen):
    """Record the first pfn of every batch ``sender`` reads for sending
    in ``phase`` (round ``rounds`` of precopy): what went on the wire,
    seen from outside the data path."""
    batches = sender.stream.batches

    def watched(share, **kwargs):
        def each():
            for batch in share:
                if sender.state.phase is phase and (
                    rounds is None or len(sender.stats.rounds) == rounds
                ):
                    # Round 0's batches are held as runs (RunBatch).
                    pfns = getattr(batch, "runs", batch)
                    first = pfns.first[0] if pfns is not batch else batch[0]
                    seen.append((int(first), len(batch)))
                yield batch

        return batches(each(), **kwargs)

    sender.stream.batches = watched


def before_each_batch(sender, act):
    """Call ``act()`` before each batch ``sender`` reads for sending:
    where a test cuts a connection in the middle of a round."""
    batches = sender.stream.batches

    def acting(share, **kwargs):
        def each():
            for batch in share:
                act()
                yield batch

        return batches(each(), **kwargs)

    sender.stream.batches = acting


def test_a_drop_mid_round_resends_only_the_frames_not_applied(
    conf, source, destination, migration
):
    domid = source.create_domain(guest_config())
    drop = {}

    def drop_mid_round():
        # Called as the data path asks for its next batch: the previous
        # ones are on the wire. Not a progress event, whose interval a
        # fast round can outrun.
        if drop or len(m.sender.stats.rounds) != 0:
            return
        if m.sender.state.phase is not Phase.PRECOPY:
            return
        control = m.sender.data.control
        if control.connection.last_seq < 12:
            return
        # Some frames applied there, some still on their way.
        until = time.monotonic() + 10
        while m.receiver._applied < 4 and time.monotonic() < until:
            time.sleep(0.01)
        drop["applied"] = m.receiver._applied
        drop["sent"] = control.connection.last_seq
        control.sock.shutdown(socket.SHUT_RDWR)

    m = migration(source, domid, destination, policy=stop_after(1))
    m.sender.stream.batch_pages = 32
    sent = []
    watch_batches(m.sender, Phase.PRECOPY, 0, sent)
    before_each_batch(m.sender, drop_mid_round)
    assert m.run() is Phase.DONE, m.sender.error
    assert drop, "the round ended before the drop"
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["precopy round 0"]
    round_batches = {first for first, _ in sent}
    resent = len(sent) - len(round_batches)
    # Only frames sent and not applied when the connection dropped go
    # again (the unacknowledged window), not the round up to the drop.
    # The batch read as the connection broke is read again too (its
    # write failed): one more than the frames in flight.
    window = drop["sent"] - drop["applied"] + 1
    assert resent <= window
    assert resent < drop["sent"] - 1
    assert running_on(destination, domid)
    assert not running_on(source, domid)


@pytest.mark.parametrize(
    "index, round_",
    [(1, 0), (0, 2), (1, 1)],
    ids=["data-0", "control-2", "data-1"],
)
def test_a_drop_in_any_round_on_any_channel_resumes_from_what_was_applied(
    conf, source, destination, migration, index, round_
):
    # Two channels: pages go on both, the control channel carries the
    # stream's records too. A guest writing all of itself keeps later
    # rounds as long as the first.
    conf.set_override("channels", 2, group="xen_ncm")
    domid = source.create_domain(
        guest_config(dirty_rate=256 * MiB, pattern="uniform", hot_fraction=1.0)
    )
    m = migration(source, domid, destination, policy=stop_after(round_ + 1))
    m.sender.stream.batch_pages = 32
    drop = {}

    def applied():
        if index == 0:
            return m.receiver._applied
        return m.receiver._data_applied.get(index, 0)

    def drop_here():
        sender = m.sender
        if drop.get("sent") or sender.data.channel_index() != index:
            return
        if sender.state.phase is not Phase.PRECOPY:
            return
        if len(sender.stats.rounds) != round_:
            return
        channel = sender.data.channels[index]
        if "first" not in drop:
            drop["first"] = channel.connection.last_seq
        if channel.connection.last_seq < drop["first"] + 6:
            return
        until = time.monotonic() + 10
        while applied() < drop["first"] + 2 and time.monotonic() < until:
            time.sleep(0.01)
        drop["applied"] = applied()
        drop["sent"] = channel.connection.last_seq
        channel.sock.shutdown(socket.SHUT_RDWR)

    sent = []
    watch_batches(m.sender, Phase.PRECOPY, round_, sent)
    before_each_batch(m.sender, drop_here)
    assert m.run() is Phase.DONE, m.sender.error
    assert drop.get("sent"), f"round {round_} ended before the drop"
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == [f"precopy round {round_}"]
    resent = len(sent) - len({first for first, _ in sent})
    # Only the dropped channel's frames not applied go again, and the
    # batch each channel had read when the round stopped (the broken
    # write, and the other channel's, halted before its write).
    assert resent <= drop["sent"] - drop["applied"] + 2, (resent, drop)
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_a_lost_ack_of_the_final_flush_resumes_instead_of_rolling_back(
    conf, source, destination, migration
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, policy=stop_after(1))
    data = m.sender.data
    flush = data.flush
    lost = {}

    def ack_lost():
        # The final flush goes out and the destination applies it and
        # acknowledges; the connection breaks before the ACK is read.
        if lost or m.sender.state.phase is not Phase.STOP_AND_COPY:
            return flush()
        control = data.control
        seq = control.connection.last_seq + 1
        control.send_data(seq, [])
        until = time.monotonic() + 10
        while m.receiver._applied < seq and time.monotonic() < until:
            time.sleep(0.005)
        lost["seq"] = seq
        lost["applied"] = m.receiver._applied
        control.sock.shutdown(socket.SHUT_RDWR)
        raise TransportError("the ACK of the final flush was lost")

    data.flush = ack_lost
    final = []
    watch_batches(m.sender, Phase.STOP_AND_COPY, None, final)
    assert m.run() is Phase.DONE, m.sender.error
    assert lost["applied"] == lost["seq"], lost
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["stop-and-copy transfer"]
    # Resumed after the flush: no final page went twice.
    assert len(final) == len({first for first, _ in final})
    assert m.receiver.state.phase is Phase.DONE
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_a_drop_after_the_final_pages_went_out_resends_those_not_applied(
    conf, source, destination, migration, monkeypatch
):
    # The final pages are all written on the control channel, the state
    # records follow; the connection breaks with the last page frame not
    # yet applied there. The retry sends it again before the state, not
    # the state after a hole (refused: the migration would roll back).
    domid = source.create_domain(
        guest_config(dirty_rate=256 * MiB, pattern="uniform", hot_fraction=1.0)
    )
    m = migration(source, domid, destination, policy=stop_after(1))
    m.sender.stream.batch_pages = 32
    shares = m.sender._numbered_shares
    last_page = {}

    def numbered(pfns):
        out = shares(pfns)
        if m.sender.state.phase is Phase.STOP_AND_COPY:
            first, batches = out[0]
            last_page["seq"] = first + len(batches) - 1
        return out

    m.sender._numbered_shares = numbered
    send_numbered = m.sender.data.send_numbered
    pages_written = threading.Event()

    def state_after_pages(index, frames, *, pages):
        pages_written.set()
        return send_numbered(index, frames, pages=pages)

    m.sender.data.send_numbered = state_after_pages
    read_frame = receiver_module._read_frame
    dropped = []

    def drop_before_the_last_page(channel, header, restorer):
        if not dropped and header.seq == last_page.get("seq"):
            # Every final page is on its way: break the connection
            # before this one is read (so, never applied here).
            assert pages_written.wait(10)
            dropped.append(m.receiver._applied)
            channel.sock.shutdown(socket.SHUT_RDWR)
            raise TransportError("the connection broke")
        return read_frame(channel, header, restorer)

    monkeypatch.setattr(
        receiver_module, "_read_frame", drop_before_the_last_page
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert dropped == [last_page["seq"] - 1], (dropped, last_page)
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["stop-and-copy transfer"]
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_a_drop_while_waiting_for_ready_resumes_the_control_channel(
    conf, source, destination, migration
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, policy=stop_after(1))
    ready = m.receiver._ready
    dropped = []

    def drop_then_ready(restorer):
        # The stream is complete and acknowledged; the connection breaks
        # before READY goes out.
        message = ready(restorer)
        if not dropped:
            dropped.append(m.receiver._channel)
            m.receiver._channel.sock.shutdown(socket.SHUT_RDWR)
        return message

    m.receiver._ready = drop_then_ready
    assert m.run() is Phase.DONE, m.sender.error
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["wait for READY"]
    assert running_on(destination, domid)
    assert not running_on(source, domid)


def test_stop_and_copy_memory_is_bounded_by_batches_not_the_guest(
    conf, source, destination, migration
):
    guest = dataclasses.replace(
        guest_config(
            dirty_rate=512 * MiB, pattern="uniform", hot_fraction=1.0
        ),
        memory_bytes=48 * MiB,
    )
    domid = source.create_domain(guest)
    peak = {}

    def start(event):
        tracemalloc.start()
        peak["base"] = tracemalloc.get_traced_memory()[0]

    def end(event):
        peak["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    stop = stop_after(1)

    def stop_late(stats):
        # Round 0 of 48 MiB may end before the guest, starved of a core on
        # a loaded machine, has rewritten half of itself: a second at
        # 512 MiB/s leaves it ten times the time it needs.
        decision = stop(stats)
        if decision.action is policy.Action.STOP_AND_COPY:
            time.sleep(1.0)
        return decision

    m = migration(
        source,
        domid,
        destination,
        policy=stop_late,
        source_hooks={
            ("state", "stop_and_copy"): start,
            ("state", "restore"): end,
        },
    )
    final = []
    watch_batches(m.sender, Phase.STOP_AND_COPY, None, final)
    try:
        assert m.run() is Phase.DONE, m.sender.error
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    final_bytes = sum(n for _, n in final) * base.PAGE_SIZE
    # The guest wrote over most of itself during round 0: copying the
    # final pages first would take that much.
    assert final_bytes >= guest.memory_bytes // 2, final_bytes
    extra = peak["peak"] - peak["base"]
    # A few batches in flight (1024 pages each, on both ends).
    assert extra < guest.memory_bytes // 4, (extra, final_bytes)
    assert running_on(destination, domid)


def test_a_data_channel_resumed_before_the_destination_reads_its_drop(
    conf, source, destination, migration
):
    # The source sees data channel 1 break and reconnects it at once; the
    # destination's thread of that channel reads the break late (a busy
    # host). The RESUME waits for it rather than being refused.
    conf.set_override("channels", 2, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, policy=stop_after(1))
    m.sender.stream.batch_pages = 32
    late = m.receiver._accept_resume
    drop = {}

    def accept_late(index, cause, over=None):
        time.sleep(1.0)
        return late(index, cause, over)

    m.receiver._accept_resume = accept_late

    def drop_here():
        sender = m.sender
        if drop or sender.data.channel_index() != 1:
            return
        channel = sender.data.channels[1]
        if (
            sender.state.phase is Phase.PRECOPY
            and channel.connection.last_seq >= 4
        ):
            drop["sent"] = channel.connection.last_seq
            channel.sock.shutdown(socket.SHUT_RDWR)

    before_each_batch(m.sender, drop_here)
    assert m.run() is Phase.DONE, m.sender.error
    assert drop, "the round ended before the drop"
    assert m.receiver.listener.rejected == []
    assert running_on(destination, domid)
