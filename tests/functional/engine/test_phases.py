"""Each phase of a migration between two simulated hosts, ended every way
an orchestrator or the policy can end it: the guest is always on exactly
one host afterwards."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.sim import digest as sim_digest
from nova_xen_ncm.host.sim.xenstore import Xenstore
from nova_xen_ncm.host.sim.xs_wire import XsType

from .conftest import DEVICES
from .conftest import MiB
from .conftest import guest_config


def never_stop(stats):
    """Precopy forever: only cancel, force-complete or a timeout end it."""
    return policy.Decision(policy.Action.CONTINUE)


def state_of(host, domid):
    try:
        return host.domain_info(domid).state
    except base.DomainNotFound:
        return None


def assert_only_on(host, other, domid, state=base.DomainState.RUNNING):
    assert state_of(host, domid) == state
    assert state_of(other, domid) is None


def snapshots(source, destination, domid):
    """Hooks keeping the source's guest state at pause and the
    destination's before it runs, for the transparency checker."""
    seen = {}

    def at_source_restore(event):
        seen["paused"] = checker.snapshot(source, domid)

    def at_destination_commit(event):
        seen["resumed"] = checker.snapshot(destination, domid)

    return (
        seen,
        {("state", "restore"): at_source_restore},
        {("state", "commit"): at_destination_commit},
    )


def migrate_transparently(source, destination, domid, migration):
    """Migrate ``domid`` to the end and assert the checker finds nothing
    the guest could tell between the source's pause and the destination's
    resume; the migration is returned for further checks."""
    seen, src_hooks, dst_hooks = snapshots(source, destination, domid)
    m = migration(
        source,
        domid,
        destination,
        source_hooks=src_hooks,
        destination_hooks=dst_hooks,
    )
    assert m.run() is Phase.DONE, m.sender.error
    report = checker.check(seen["paused"], seen["resumed"])
    assert report.passed, str(report)
    return m


def test_downtime_policy_completes_transparently(
    conf, source, destination, migration
):
    # xen-simple: test_migration.test_completed_migration_is_transparent.
    conf.set_override("precopy_policy", "downtime", group="xen_ncm")
    domid = source.create_domain(guest_config(devices=DEVICES))
    m = migrate_transparently(source, destination, domid, migration)
    assert_only_on(destination, source, domid)
    assert m.sender.stats.to_dict()["actual_downtime"] is not None


def test_a_backend_behind_its_frontend_at_the_pause_is_restored_so(
    source, destination, migration
):
    # A loaded dom0 had not yet acted on the vbd frontend's Initialised
    # (ring-ref and event-channel published) when the guest was paused:
    # its backend is at InitWait with no ring. The destination shows the
    # guest exactly that until COMMIT (the digests compare it), then the
    # handshake goes on there.
    domid = source.create_domain(guest_config(devices=DEVICES))
    dom = source.hv.domain(domid, "test")
    (vbd,) = [
        be
        for be in source.services.record(dom).backends.values()
        if be.kind == "vbd"
    ]
    behind = []
    vbd._connect = lambda: behind.append(True)
    front = f"/local/domain/{domid}/device/vbd/{vbd.devid}"
    deadline = time.monotonic() + 30
    while not behind:
        assert time.monotonic() < deadline, "the frontend never published"
        time.sleep(0.01)
    assert source.services.toolstack_xs.read(f"{front}/state") == b"3"
    assert vbd.state == 2 and vbd.ring is None
    migrate_transparently(source, destination, domid, migration)
    assert_only_on(destination, source, domid)
    # Taken up there: the vbd connects and serves the guest's requests.
    dest = destination.hv.domain(domid, "test")
    (there,) = [
        be
        for be in destination.services.record(dest).backends.values()
        if be.kind == "vbd"
    ]
    deadline = time.monotonic() + 30
    while there.state != 4 or there.ring is None:
        assert time.monotonic() < deadline, "the vbd never connected"
        time.sleep(0.01)


def test_a_guest_paused_in_its_boot_probe_goes_on_with_it_there(
    source, destination, migration, monkeypatch
):
    # Paused as its first frontend's watch was registered and before the
    # guest had its reply: restarted from RAM on the destination it goes
    # on with its probe, and must not register that watch again (the
    # carried one is there: xenstored would say EEXIST, and the guest
    # would notice it moved).
    handlers = Xenstore._HANDLERS
    do_watch = handlers[XsType.WATCH]
    xs = source.services.xenstore
    held = threading.Event()

    def watch_and_hold(xs_, conn, tx, msg):
        reply = do_watch(xs_, conn, tx, msg)
        token = msg.payload.split(b"\0")[1]
        if (
            xs_ is xs
            and conn.domid
            and token.startswith(b"fe:")
            and not held.is_set()
        ):
            # Its reply (and the guest's probe) wait in xenstored until
            # the guest is paused. Not paused from here: xenstored serves
            # a guest under the host's lock, which the guest's
            # notification of this request may be waiting for when
            # xenstored took it first, and the guest answers a pause
            # only after that hypercall. Nor before create_domain
            # returns: until then the host does not count the guest as
            # running, and a pause is none.
            xs.hold_output(conn.domid, True)
            held.set()
        return reply

    monkeypatch.setitem(handlers, XsType.WATCH, watch_and_hold)
    domid = source.create_domain(guest_config(devices=DEVICES))
    assert held.wait(30), "the guest never watched its first frontend"
    monkeypatch.setitem(handlers, XsType.WATCH, do_watch)
    source.pause(domid)
    assert state_of(source, domid) == base.DomainState.PAUSED
    # The guest never had its reply: xenstored writes it now into the
    # paused guest's ring, as after a pause that came before it did.
    assert xs.domain_connection(domid).outbox
    xs.hold_output(domid, False)
    xs.service_ring(domid)
    migrate_transparently(source, destination, domid, migration)
    assert_only_on(destination, source, domid, base.DomainState.PAUSED)
    destination.unpause(domid)
    dest = destination.hv.domain(domid, "test")
    backends = destination.services.record(dest).backends.values()
    assert {be.kind for be in backends} == {"vbd", "vif"}
    deadline = time.monotonic() + 30
    while any(be.state != 4 or be.ring is None for be in backends):
        assert time.monotonic() < deadline, "a device never connected: " + (
            ", ".join(f"{be.kind} {be.state}" for be in backends)
        )
        time.sleep(0.01)


def test_paused_guest_stays_paused(source, destination, migration):
    domid = source.create_domain(guest_config(devices=DEVICES))
    source.pause(domid)
    m = migrate_transparently(source, destination, domid, migration)
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    # Committed, not unpaused: the guest is where it was, as it was.
    assert_only_on(destination, source, domid, base.DomainState.PAUSED)
    destination.unpause(domid)
    assert state_of(destination, domid) == base.DomainState.RUNNING


def test_cancel_in_setup(source, destination, migration, monkeypatch):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    created = []
    create = destination.create_empty_domain

    def create_then_cancel(config, domid):
        # The destination reserved the domain; the orchestrator cancels.
        create(config, domid)
        created.append(m.sender.cancel())

    monkeypatch.setattr(destination, "create_empty_domain", create_then_cancel)
    assert m.run() is Phase.CANCELLED
    assert created == [True]
    assert m.receiver.state.phase is Phase.CANCELLED
    assert "precopy" not in m.source_events.phases()
    assert_only_on(source, destination, domid)


def test_cancel_in_stop_and_copy(source, destination, migration):
    domid = source.create_domain(guest_config(devices=DEVICES))
    accepted = []
    m = migration(source, domid, destination)
    m.source_events.hooks[("state", "stop_and_copy")] = lambda e: (
        accepted.append(m.sender.cancel())
    )
    assert m.run() is Phase.CANCELLED
    assert accepted == [True]
    assert m.receiver.state.phase is Phase.CANCELLED
    assert m.source_events.phases()[-3:] == [
        "stop_and_copy",
        "rollback",
        "cancelled",
    ]
    # Paused for stop-and-copy, running again after the rollback.
    assert m.sender.stats.actual_downtime is not None
    assert_only_on(source, destination, domid)


def test_cancel_in_restore(source, destination, migration):
    domid = source.create_domain(guest_config())
    accepted = []
    m = migration(source, domid, destination)
    m.source_events.hooks[("state", "restore")] = lambda e: accepted.append(
        m.sender.cancel()
    )
    assert m.run() is Phase.CANCELLED
    assert accepted == [True]
    assert m.receiver.state.phase is Phase.CANCELLED
    assert "commit" not in m.source_events.phases()
    assert_only_on(source, destination, domid)


def test_cancel_after_commit_is_refused(source, destination, migration):
    domid = source.create_domain(guest_config())
    accepted = []
    m = migration(source, domid, destination)
    m.source_events.hooks[("state", "commit")] = lambda e: accepted.append(
        m.sender.cancel()
    )
    assert m.run() is Phase.DONE, m.sender.error
    assert accepted == [False]
    assert_only_on(destination, source, domid)


@pytest.mark.parametrize(
    "action, outcome",
    [("abort", Phase.CANCELLED), ("force_complete", Phase.DONE)],
)
def test_completion_timeout(
    conf, source, destination, migration, action, outcome
):
    conf.set_override("completion_timeout_per_gib", 1, group="xen_ncm")
    conf.set_override("completion_timeout_action", action, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, policy=never_stop)
    # At least 2 GiB are counted, as by Nova.
    assert m.sender.timeout == 2.0
    # Shortened so that it expires in the first round.
    m.sender.timeout = 1e-3
    assert m.run() is outcome, m.sender.error
    assert len(m.sender.stats.rounds) == 1
    if outcome is Phase.DONE:
        assert "completion timeout" in m.sender.state.reason(
            Phase.STOP_AND_COPY
        )
        assert_only_on(destination, source, domid)
    else:
        assert "completion timeout" in str(m.sender.error)
        assert m.receiver.state.phase is Phase.CANCELLED
        assert_only_on(source, destination, domid)


def test_dropped_connection_resumes_without_resending_rounds(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())

    def three_rounds(stats):
        if stats.iteration >= 3:
            return policy.Decision(policy.Action.STOP_AND_COPY, reason="3")
        return policy.Decision(policy.Action.CONTINUE)

    m = migration(source, domid, destination, policy=three_rounds)
    source_pfns = source.populated_pfns(domid)
    applied = []

    def drop_after_round_0(event):
        if event.detail["round"] == 0:
            # Round 0 was acknowledged (end-of-round flush); then the
            # network breaks.
            applied.append(m.sender.data.acked_by[0])
            m.sender.data.control.sock.shutdown(socket.SHUT_RDWR)

    received = []
    populate = destination.populate

    def count(domid, pfns):
        # The destination's restorer populates every page batch it gets.
        received.append(len(pfns))
        populate(domid, pfns)

    monkeypatch.setattr(destination, "populate", count)
    m.source_events.hooks[("round", "precopy")] = drop_after_round_0
    assert m.run() is Phase.DONE, m.sender.error
    assert m.sender.stats.retries == 1
    rounds = m.sender.stats.rounds
    assert len(rounds) == 3
    first = rounds[0].pages_sent + rounds[0].zero_pages
    assert first == len(source_pfns)
    # Round 0 arrived once; after it only dirtied pages.
    assert first < sum(received) < 2 * first
    # The resumed connection went on after the acknowledged frames.
    assert applied and applied[0] > 0
    assert_only_on(destination, source, domid)


def test_downtime_policy_throttles_a_fast_dirtying_guest(
    conf, source, destination, migration, monkeypatch
):
    for name, value in {
        "precopy_policy": "downtime",
        "downtime_target": 0.01,
        # The whole target goes to the switch-over, so only an empty
        # dirty set fits it: a guest starved of a core on a loaded
        # machine, dirtying slowly, is still throttled.
        "switchover_estimate": 0.01,
        "throttle_trigger_ratio": 0.01,
        "throttle_trigger_rounds": 1,
        "throttle_step": 0.3,
        "max_rounds": 6,
        "downtime_unmet_action": "force_complete",
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    domid = source.create_domain(
        guest_config(dirty_rate=256 * MiB, hot_fraction=1.0)
    )
    applied = []
    throttle = source.set_vcpu_throttle

    def record(domid, fraction):
        applied.append(fraction)
        throttle(domid, fraction)

    monkeypatch.setattr(source, "set_vcpu_throttle", record)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    # The fixed part alone takes the whole target: no throttle makes it
    # fit, so the guest goes to its floor at once (not a throttle_step
    # per round), whatever pace a loaded machine leaves it.
    assert applied == [0.1], applied
    assert m.sender.stats.throttle == 0.1
    rounds = [e for e in m.source_events.events if e.kind.value == "round"]
    assert 2 <= len(rounds) <= 2 * 6
    # The operator is told from the first round, each report with the
    # pause expected.
    unmet = [
        e
        for e in m.source_events.events
        if e.detail.get("downtime_target_unmet")
    ]
    assert unmet and unmet[0].detail["round"] == 0
    assert all(e.detail["expected_pause"] > 0.01 for e in unmet)
    assert_only_on(destination, source, domid)


def test_rollback_lifts_the_throttle(
    conf, source, destination, migration, monkeypatch
):
    for name, value in {
        "precopy_policy": "downtime",
        "downtime_target": 0.01,
        # The whole target goes to the switch-over, so only an empty
        # dirty set fits it: a guest starved of a core on a loaded
        # machine, dirtying slowly, is still throttled.
        "switchover_estimate": 0.01,
        "throttle_trigger_ratio": 0.01,
        "throttle_trigger_rounds": 1,
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    domid = source.create_domain(guest_config(dirty_rate=1024 * MiB))
    applied = []
    throttle = source.set_vcpu_throttle

    def record(domid, fraction):
        applied.append(fraction)
        throttle(domid, fraction)

    monkeypatch.setattr(source, "set_vcpu_throttle", record)
    m = migration(source, domid, destination)

    def cancel_once_throttled(event):
        if applied and applied[-1] < 1:
            m.sender.cancel()

    m.source_events.hooks[("round", "precopy")] = cancel_once_throttled
    assert m.run() is Phase.CANCELLED
    assert applied[0] < 1
    assert applied[-1] == 1.0
    assert m.sender.stats.throttle == 1.0
    assert_only_on(source, destination, domid)


def test_a_rollback_after_the_pause_lifts_the_throttle_before_unpausing(
    conf, source, destination, migration, monkeypatch
):
    for name, value in {
        "precopy_policy": "downtime",
        "downtime_target": 0.01,
        # The whole target goes to the switch-over, so only an empty
        # dirty set fits it: a guest starved of a core on a loaded
        # machine, dirtying slowly, is still throttled.
        "switchover_estimate": 0.01,
        "throttle_trigger_ratio": 0.01,
        "throttle_trigger_rounds": 1,
        "max_rounds": 3,
        # The pause this test needs, however long.
        "downtime_unmet_action": "force_complete",
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    domid = source.create_domain(guest_config(dirty_rate=1024 * MiB))
    calls = []
    throttle, unpause = source.set_vcpu_throttle, source.unpause

    def record_throttle(domid, fraction):
        calls.append(("throttle", fraction))
        throttle(domid, fraction)

    def record_unpause(domid):
        calls.append(("unpause", None))
        unpause(domid)

    monkeypatch.setattr(source, "set_vcpu_throttle", record_throttle)
    monkeypatch.setattr(source, "unpause", record_unpause)
    m = migration(source, domid, destination)

    def cancel_once_paused(event):
        m.sender.cancel()

    m.source_events.hooks[("state", "stop_and_copy")] = cancel_once_paused
    assert m.run() is Phase.CANCELLED
    assert ("unpause", None) in calls
    assert any(c == "throttle" and f < 1 for c, f in calls)
    # The throttle is gone before the guest runs again.
    assert calls[-1] == ("unpause", None), calls
    assert ("throttle", 1.0) in calls
    assert_only_on(source, destination, domid)


def test_cancel_mid_round_reports_what_was_sent(
    source, destination, migration
):
    # Cancelled inside round 0: no round finished, yet pages went out.
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    record_sent = m.sender.stats.record_sent

    def sent_then_cancel(**kwargs):
        record_sent(**kwargs)
        m.sender.cancel("interrupted by SIGTERM")

    m.sender.stats.record_sent = sent_then_cancel
    assert m.run() is Phase.CANCELLED
    stats = m.sender.stats.to_dict()
    assert stats["rounds"] == []
    assert stats["bytes_sent"] > 0
    assert stats["pages_sent"] > 0
    # The reason is the canceller's, not the state machine's.
    assert str(m.sender.error) == "cancelled: interrupted by SIGTERM"


def test_cancel_in_restore_names_the_cause(source, destination, migration):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    m.source_events.hooks[("state", "restore")] = lambda e: m.sender.cancel(
        "interrupted by SIGINT"
    )
    assert m.run() is Phase.CANCELLED
    assert str(m.sender.error) == "cancelled: interrupted by SIGINT"
    assert_only_on(source, destination, domid)


def test_a_write_the_tracking_missed_in_a_block_read_again_fails_it(
    source, destination, migration, monkeypatch
):
    """A write no writer marked is not sent; the memory digest reads the
    pages written since creation of every block a marked write sends
    back to be read, so such a write on one of them makes the copy
    differ, and the guest stays where it was. (On a page never written
    since creation, or in a block nothing marked, the digest goes by the
    tracking as the sender does: doc/source/xen-driver.rst.)"""
    domid = source.create_domain(guest_config(dirty_rate=0))
    mem = source.hv.domains[domid].mem
    pfns = mem.populated()
    written = pfns[mem.written_mask(pfns)]
    assert len(written) > 1
    pfn = int(written[len(written) // 2])
    size = sim_digest._DIGEST_BLOCK
    block = [int(p) for p in written if p // size == pfn // size and p != pfn]
    assert block
    pause = source.pause_for_save

    def missed_write_then_pause(d):
        with mem.lock():
            mem.ram[pfn][:] = 0x5A  # no mark: the tracking missed it
            mem.ram[block[0]][:] = 0x3C
            mem.mark_dirty(block[0])
        pause(d)

    monkeypatch.setattr(source, "pause_for_save", missed_write_then_pause)
    m = migration(source, domid, destination)
    assert m.run() is not Phase.DONE
    assert type(m.sender.error).__name__ == "DigestMismatch"
    assert str(m.sender.error).endswith(": memory"), m.sender.error
    assert_only_on(source, destination, domid)
