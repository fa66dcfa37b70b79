"""What a running guest writes between the last precopy round and the
pause is on the destination, the marks of the pause read from the maps'
logs (memory._MarkLog) and the checker reading RAM itself."""

from __future__ import annotations

import threading
import time

import numpy as np

from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import checker

from .conftest import guest_config


def _rounds(count):
    """Precopy ``count`` rounds, then stop and copy."""

    def decide(stats):
        if len(stats.rounds) < count:
            return policy.Decision(policy.Action.CONTINUE)
        return policy.Decision(policy.Action.STOP_AND_COPY, reason="test")

    return decide


def _migrate(source, destination, migration, domid, acts):
    """Migrate ``domid``, running ``acts(phase)`` in the guest at the
    first round's end and just before the pause; the snapshots and the
    physmaps either side."""
    seen = {}

    def after_round(event):
        if "round" not in seen:
            seen["round"] = True
            acts("round")

    def before_pause(event):
        acts("pause")

    def at_source_restore(event):
        seen["paused"] = checker.snapshot(source, domid)
        seen["source_ram"] = source.populated_pfns(domid).copy()

    def at_destination_commit(event):
        seen["resumed"] = checker.snapshot(destination, domid)
        seen["destination_ram"] = destination.populated_pfns(domid).copy()

    m = migration(
        source,
        domid,
        destination,
        policy=_rounds(3),
        source_hooks={
            ("round", "precopy"): after_round,
            ("state", "stop_and_copy"): before_pause,
            ("state", "restore"): at_source_restore,
        },
        destination_hooks={("state", "commit"): at_destination_commit},
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    return seen


def test_a_write_just_before_the_pause_is_on_the_destination(
    source, destination, migration
):
    domid = source.create_domain(guest_config(dirty_rate=0))
    ram = source.populated_pfns(domid)
    pfns = [int(ram[0x120]), int(ram[0x121]), int(ram[-1])]
    early, late = bytes(range(1, 65)), bytes(range(101, 165))

    def acts(phase):
        # Written in round 1 (sent in round 2), then two of them again
        # after the last round: those must not arrive as they were.
        data, which = (early, pfns) if phase == "round" else (late, pfns[:2])
        for pfn in which:
            source.guest_command(
                domid, "write", pfn=pfn, offset=64, data=data.hex()
            )

    seen = _migrate(source, destination, migration, domid, acts)
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    assert seen["destination_ram"].tolist() == seen["source_ram"].tolist()
    with destination.map_pages(
        domid, np.array(pfns, dtype=np.uint64)
    ) as mapping:
        got = [bytes(page[64:128]) for page in mapping.pages]
    assert got == [late, late, early]


def test_the_destination_settles_its_digest_between_rounds_not_in_the_pause(
    source, destination, migration, monkeypatch
):
    # What the rounds wrote is digested on the destination while the
    # guest still runs on the source: the digest in the pause reads only
    # the last pages.
    domid = source.create_domain(guest_config(dirty_rate=0))
    phases = []
    running = {}
    settled = threading.Event()
    settle = destination.settle_digest_part

    def part(dom, pages):
        phases.append(running["m"].receiver.state.phase)
        settled.set()
        return settle(dom, pages)

    def after_round(event):
        # The source goes on once the destination settled (a thread of
        # its own, which a short round may otherwise outrun).
        assert settled.wait(10)

    monkeypatch.setattr(destination, "settle_digest_part", part)
    m = running["m"] = migration(
        source,
        domid,
        destination,
        policy=_rounds(3),
        source_hooks={("round", "precopy"): after_round},
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    assert phases
    assert set(phases) == {Phase.PRECOPY}


def _settlers():
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("restore-") and t.name.endswith("-digest")
    ]


def test_a_migration_cancelled_in_precopy_stops_the_settling(
    source, destination, migration, monkeypatch
):
    # The settle thread ends with the transfer however it ends, here a
    # cancel between rounds while a settle still has parts.
    domid = source.create_domain(guest_config(dirty_rate=0))
    started = threading.Event()
    holder = {}

    def part(dom, pages):
        started.set()
        time.sleep(0.005)
        return True  # never all settled: only a stop ends it

    def cancel_from_elsewhere():
        if started.wait(10):
            holder["accepted"] = holder["m"].sender.cancel()

    monkeypatch.setattr(destination, "settle_digest_part", part)
    m = holder["m"] = migration(
        source, domid, destination, policy=_rounds(1000)
    )
    canceller = threading.Thread(target=cancel_from_elsewhere)
    canceller.start()
    try:
        assert m.run() is Phase.CANCELLED
    finally:
        started.set()
        canceller.join()
    assert holder["accepted"] is True
    assert m.receiver.state.phase is Phase.CANCELLED
    assert _settlers() == []


def test_each_round_reads_the_physmap_after_its_harvest(
    source, destination, migration, monkeypatch
):
    """A page populated again and written between the two reads is in
    the physmap read after the harvest (or in the next harvest): read
    before it, the write would be harvested and dropped as a page not
    populated, and the page never sent again."""
    domid = source.create_domain(guest_config(dirty_rate=0))
    calls = []

    def recorded(name):
        real = getattr(source, name)

        def record(domid):
            calls.append(name)
            return real(domid)

        return record

    for name in ("harvest_dirty", "populated_runs"):
        monkeypatch.setattr(source, name, recorded(name))
    m = migration(source, domid, destination, policy=_rounds(2))
    assert m.run() is Phase.DONE, m.sender.error
    # Round 0's runs, then a harvest and the physmap after each round
    # and at the pause.
    assert calls[0] == "populated_runs"
    assert len(calls) >= 7
    assert calls[1:] == ["harvest_dirty", "populated_runs"] * (
        (len(calls) - 1) // 2
    )
