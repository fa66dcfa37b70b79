"""The destination's own progress: how much of the guest has arrived."""

from __future__ import annotations

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.progress.model import EventKind

from .conftest import Migration
from .conftest import guest_config


def test_the_destination_reports_what_arrived(conf, source, destination):
    domid = source.create_domain(guest_config())
    migration = Migration(conf, source, domid, destination)
    assert migration.run() is Phase.DONE, migration.sender.error
    progress = [
        e
        for e in migration.destination_events.events
        if e.kind is EventKind.PROGRESS
    ]
    assert progress, "the destination reported no progress"
    total = 8 << 20
    assert {e.memory_total for e in progress} == {total}
    arrived = [e.memory_processed for e in progress]
    # Each page counts once: never more than the guest, never going back.
    assert arrived == sorted(arrived) and arrived[-1] <= total
    assert all(
        e.memory_processed + e.memory_remaining == total for e in progress
    )
    # The last report, at the end of the stream, has nearly all of it
    # (pages the guest never populated do not travel).
    assert arrived[-1] > total // 2
    # None while the guest is paused but that last one.
    phases = [e.phase for e in progress]
    assert set(phases[:-1]) <= {"precopy"}
