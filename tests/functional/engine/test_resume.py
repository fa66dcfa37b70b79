"""A connection dropped in the middle of a round, and the memory the
stop-and-copy takes: the stream goes on from the last frame the
destination applied, and the final pages are read as they are sent."""

from __future__ import annotations

import dataclasses
import socket
import time
import tracemalloc

from nova_xen_ncm.engine import policy
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
                    seen.append((int(batch[0]), len(batch)))
                yield batch

        return batches(each(), **kwargs)

    sender.stream.batches = watched


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
    inner = m.sender.stream.batches

    def dropping(share, **kwargs):
        def each():
            for batch in share:
                drop_mid_round()
                yield batch

        return inner(each(), **kwargs)

    m.sender.stream.batches = dropping
    assert m.run() is Phase.DONE, m.sender.error
    assert drop, "the round ended before the drop"
    retries = [e for e in m.source_events.events if e.kind.value == "retry"]
    assert [e.detail["what"] for e in retries] == ["precopy round 0"]
    round_batches = {first for first, _ in sent}
    resent = len(sent) - len(round_batches)
    # Only frames sent and not applied when the connection dropped go
    # again (the unacknowledged window), not the round up to the drop.
    window = drop["sent"] - drop["applied"]
    assert resent <= window
    assert resent < drop["sent"] - 1
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

    def stop(event):
        peak["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    m = migration(
        source,
        domid,
        destination,
        policy=stop_after(1),
        source_hooks={
            ("state", "stop_and_copy"): start,
            ("state", "restore"): stop,
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
