"""The migration's bandwidth cap ([xen_ncm] max_bandwidth) and what the
downtime policy says when it throttles."""

from __future__ import annotations

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import MiB
from .conftest import guest_config
from .test_phases import assert_only_on


def test_the_page_rounds_keep_to_the_bandwidth_cap(
    conf, source, destination, migration
):
    conf.set_override("max_bandwidth", 4, group="xen_ncm")
    domid = source.create_domain(guest_config(fill="random", dirty_rate=0))
    source.pause(domid)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    first = m.sender.stats.rounds[0]
    # An 8 MiB guest of random pages: about 2 s at 4 MiB/s; the pacer
    # lets 50 ms of the rate go ahead of its schedule.
    assert first.bytes_sent > 6 * MiB
    assert first.bandwidth <= 4 * MiB * (1 + 0.05 / first.duration) * 1.01
    assert_only_on(destination, source, domid, base.DomainState.PAUSED)


def test_each_throttle_is_reported_with_its_reason(
    conf, source, destination, migration
):
    for name, value in {
        "precopy_policy": "downtime",
        "downtime_target": 0.01,
        "throttle_trigger_ratio": 0.01,
        "throttle_trigger_rounds": 1,
        "throttle_step": 0.3,
        "max_rounds": 2,
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    domid = source.create_domain(
        guest_config(dirty_rate=256 * MiB, hot_fraction=1.0)
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    throttles = [
        e
        for e in m.source_events.events
        if e.kind.value == "progress" and "throttle" in e.detail
    ]
    assert throttles, "no throttle was reported"
    fractions = [e.detail["throttle"] for e in throttles]
    assert fractions == sorted(fractions, reverse=True)
    assert m.sender.stats.throttle == fractions[-1]
    assert all(e.reason for e in throttles)
    assert_only_on(destination, source, domid)
