"""The transparency oracle on real migrations between simulated hosts.

The checker reads each side itself (:func:`checker.snapshot`: memory
digested from RAM, not from the host's digest or log-dirty), and after
the guest ran on the destination it reads the guest's verdicts from its
RAM (:func:`checker.after_resume`). Each mutation test injects one fault
into the destination of a real migration with a hook that lives here,
and the migration rolls back or the report fails that item by name.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pytest

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import locks
from nova_xen_ncm.host.sim.devices import protocol
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.memory import XENPAGE_SHARED_INFO
from nova_xen_ncm.host.sim.memory import GuestMemory

from .conftest import DEVICES
from .conftest import guest_config

# How long the guest runs on the destination before it is judged.
RUN_SECONDS = 1.0


@pytest.fixture
def disks(conf, tmp_path):
    conf.set_override("disk_dir", str(tmp_path / "disks"), "xen_ncm_sim")
    return tmp_path / "disks"


class Checked:
    """A migration of a guest with PV devices, snapshotted by the
    checker at the source's pause and at the destination's resume;
    ``fault(destination, domid)`` runs on the destination as it enters
    COMMIT (restored, backends reconnected, not running), before its
    snapshot."""

    def __init__(self, source, destination, migration, fault=None, vcpus=2):
        self.source = source
        self.destination = destination
        self.domid = source.create_domain(
            dataclasses.replace(
                guest_config(devices=DEVICES, io_rate=400), vcpus=vcpus
            )
        )
        # The guest's I/O has gone on long enough that reads after the
        # migration check data written before it.
        time.sleep(0.5)
        self.seen = {}

        def at_source_restore(event):
            self.seen["paused"] = checker.snapshot(source, self.domid)

        def at_destination_commit(event):
            if fault is not None:
                fault(destination, self.domid)
            self.seen["resumed"] = checker.snapshot(destination, self.domid)

        self.migration = migration(
            source,
            self.domid,
            destination,
            source_hooks={("state", "restore"): at_source_restore},
            destination_hooks={("state", "commit"): at_destination_commit},
        )
        self.phase = self.migration.run()

    def report(self):
        return checker.check(self.seen["paused"], self.seen["resumed"])

    def after(self):
        later, raised = checker.run_after_resume(
            self.destination, self.domid, RUN_SECONDS
        )
        return checker.after_resume(
            self.seen["paused"], self.seen["resumed"], later, raised
        )


def test_migration_passes_every_item_and_after_resume(
    disks, source, destination, migration
):
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    report = run.report()
    assert report.passed, str(report)
    verdict = run.after()
    assert verdict.passed, verdict.problems
    assert verdict.requests_completed > 0
    assert verdict.vbd_reads_checked > 0
    assert verdict.lost == verdict.duplicated == verdict.bad_payloads == 0
    assert verdict.ports_silent == ()
    # The vbd is on the shared storage, and the destination uses it.
    uuid = destination.domain_info(run.domid).uuid
    assert os.listdir(disks) == [f"{uuid}-51712.disk"]
    paused = run.seen["paused"].items[Item.PV_DEVICES]
    # The devices as the checker read them: xenstore, the port's binding
    # and each ring in guest RAM, mapped by its backend's domain.
    assert {f"{d.kind}/{d.devid}" for d in paused} == {"vif/0", "vbd/51712"}
    for d in paused:
        assert d.backend_state == 4
        assert d.rings and all(r.mapped_by == 0 for _, r in d.rings)
        assert d.ports and all(peer == 0 for _, peer in d.ports)
    # Reconnected before the commit but quiescent: nothing answered,
    # nothing taken, until the guest ran here.
    assert run.seen["resumed"].items[Item.PV_DEVICES] == paused


def _dom(host, domid):
    return host.hv.domains[domid]


def _some_data_page(host, domid):
    pfns, digests = checker.read_memory(host, domid)
    zero = np.frombuffer(
        checker.xxhash.xxh3_128_digest(bytes(base.PAGE_SIZE)), np.uint8
    )
    return int(pfns[np.flatnonzero((digests != zero).any(axis=1))[-1]])


def raw_write(host, domid):
    """A page changed behind every bookkeeping: no mark, no map."""
    pfn = _some_data_page(host, domid)
    _dom(host, domid).mem.ram[pfn][100] ^= 0xFF


def unwritten_page(host, domid):
    """A page that never arrived: zero, as the destination made it."""
    pfn = _some_data_page(host, domid)
    _dom(host, domid).mem.ram[pfn][:] = 0


def mask_port(host, domid):
    dom = _dom(host, domid)
    port = next(
        p for p, ch in dom.ports.items() if ch.type == EvtchnType.INTERDOMAIN
    )
    with dom.mem.lock():
        dom.bits.test_and_set(evtchn.SHINFO_MASK, port)


def change_grant(host, domid):
    dom = _dom(host, domid)
    entry = dom.grants.frames[0][
        grant.GRANT_ENTRY_V1.size * 9 : grant.GRANT_ENTRY_V1.size * 10
    ]
    entry[4] ^= 0x01


def move_vcpu_info(host, domid):
    dom = _dom(host, domid)
    gfn, off = dom.vcpu_info_at[0]
    dom.vcpu_info_at[0] = (gfn, off + 512)


def change_param(host, domid):
    host.set_hvm_params(domid, {hvm.HVM_PARAM_TIMER_MODE: 3})


def drop_watch(host, domid):
    conn = host.xenstore.domain_connection(domid)
    assert conn.watches
    del conn.watches[0]


def change_tsc(host, domid):
    info = host.get_tsc_info(domid)
    host.set_tsc_info(domid, dataclasses.replace(info, khz=info.khz + 1))


def rebind_backend(host, domid):
    """The vif's backend maps another of the guest's grants to dom0 (the
    vbd's ring) instead of the one the vif granted, at the same indices,
    with the same port and requests in flight."""
    backends = {b.kind: b for b in _dom(host, domid).backends.values()}
    vif, vbd = backends["vif"], backends["vbd"]
    with vif._lock:
        indices, port = vif.ring.indices, vif.frontend_port
        inflight = list(vif.inflight)
        vif._disconnect()
        vif._attach(vbd.ring_ref, port, indices)
        vif.inflight = inflight


def move_backend_domain(host, domid):
    """The destination offers the guest a channel to a domain it had no
    dealings with on the source (a driver domain, domid 7)."""
    dom = _dom(host, domid)
    with host.hv.lock:
        host.evtchn.alloc_unbound(host.dom0, domid, 7)
    assert 7 in host.hv.backend_domids(dom)


def widen_permission(host, domid):
    path = f"/local/domain/{domid}/device/vif/0/state"
    host.services.toolstack_xs.set_perms(path, (("b", domid),))


MUTATIONS = [
    (raw_write, {Item.MEMORY}),
    (unwritten_page, {Item.MEMORY}),
    # The mask bit is in the shared info page.
    (mask_port, {Item.EVENT_CHANNELS, Item.SHARED_INFO}),
    # Ref 9 is the vif's ring: the ring the guest sees moved with it.
    (change_grant, {Item.GRANT_TABLE, Item.PV_DEVICES}),
    (move_vcpu_info, {Item.SHARED_INFO}),
    (change_param, {Item.HVM_PARAMS}),
    (widen_permission, {Item.XENSTORE}),
    (drop_watch, {Item.XENSTORE}),
    (change_tsc, {Item.PLATFORM}),
    # Mapping another reference moves GTF_reading/GTF_writing too.
    (rebind_backend, {Item.PV_DEVICES, Item.GRANT_TABLE}),
    # The new port is guest-visible in the event channel table too.
    (move_backend_domain, {Item.DOMID, Item.EVENT_CHANNELS}),
]


@pytest.mark.parametrize(
    ("fault", "items"), MUTATIONS, ids=[f.__name__ for f, _ in MUTATIONS]
)
def test_a_destination_fault_fails_its_item(
    disks, source, destination, migration, fault, items
):
    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE, run.migration.sender.error
    failures = run.report().failures()
    assert set(failures) == items, failures


def test_a_backend_on_another_ring_fails_after_resume(
    disks, source, destination, migration
):
    run = Checked(source, destination, migration, rebind_backend)
    assert run.phase is Phase.DONE, run.migration.sender.error
    # The vif's ring is no longer mapped by dom0, as its grant entry
    # shows (Xen's GTF_reading/GTF_writing).
    assert (
        "vif/0: ring ring (grant ref 9) not mapped by the backend's dom0"
        in run.report().failures()[Item.PV_DEVICES]
    )
    # The vif's requests go unanswered and the vbd's ring gets answers
    # from a backend that is not its own: which one shows first depends
    # on the guest's timing, and the verdict names it. Both backends
    # race for the vbd's requests, so on a loaded host the first window
    # may see neither: the guest runs on (the fault stays) and the
    # checker looks again, a few windows at most.
    for _ in range(5):
        verdict = run.after()
        if not verdict.passed:
            break
    assert verdict.passed is False
    reason = verdict.to_dict()["reason"]
    assert "vif/0" in reason or "vbd/51712" in reason, reason


def test_a_port_left_masked_is_silent_after_resume(
    disks, source, destination, migration
):
    masked = {}

    def fault(host, domid):
        dom = _dom(host, domid)
        port = dom.params[hvm.HVM_PARAM_CONSOLE_EVTCHN]
        with dom.mem.lock():
            dom.bits.test_and_set(evtchn.SHINFO_MASK, port)
        masked["port"] = port

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE
    verdict = run.after()
    assert verdict.ports_silent == (masked["port"],)
    assert not verdict.passed


def _patch_backends(host, domid, change):
    """Wrap each reconnected backend's put_responses with ``change``
    (of the list of answers), once in all, on two answers or more.
    Returns what fills once it fired."""
    done = []
    for be in list(_dom(host, domid).backends.values()):
        original = be.put_responses

        def put(answers, original=original):
            if not done and len(answers) >= 2:
                done.append(True)
                answers = change(answers)
            original(answers)

        be.put_responses = put
    return done


def _fired(patched, timeout=30.0):
    """Whether the patched backends changed an answer within ``timeout``
    of the guest running on the destination."""
    deadline = time.monotonic() + timeout
    while not (patched and patched[0]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_duplicated_response_is_found_after_resume(
    disks, source, destination, migration
):
    patched = []

    def fault(host, domid):
        patched.append(
            _patch_backends(host, domid, lambda a: [a[0], a[0], *a[2:]])
        )

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE
    assert _fired(patched), "no answer was duplicated"
    verdict = run.after()
    assert verdict.duplicated > 0
    assert "duplicated responses after resume" in " ".join(verdict.problems)


def test_a_lost_response_is_found_after_resume(
    disks, source, destination, migration
):
    patched = []

    def fault(host, domid):
        patched.append(_patch_backends(host, domid, lambda a: a[1:]))

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE
    assert _fired(patched), "no answer was dropped"
    verdict = run.after()
    assert verdict.lost > 0 or verdict.unanswered
    assert not verdict.passed


def test_a_disk_not_shared_gives_bad_payloads(
    disks, source, destination, migration
):
    def fault(host, domid):
        # The destination's disk is another one: empty.
        for disk in _dom(host, domid).disks:
            size = os.fstat(disk._fd).st_size
            os.ftruncate(disk._fd, 0)
            os.ftruncate(disk._fd, size)

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE
    verdict = run.after()
    assert verdict.bad_payloads > 0
    assert not verdict.passed


def test_a_backend_that_cannot_map_its_ring_rolls_back(
    disks, source, destination, migration
):
    def refuse(domid, ref, readonly=False, mapper=0):
        raise grant.GrantError(
            "GNTTABOP_map_grant_ref", grant.GNTST_bad_page, "injected"
        )

    destination.hv.grant_map = refuse
    domid = source.create_domain(guest_config(devices=DEVICES))
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "cannot reconnect" in str(m.sender.error)
    # One copy, running where it was; nothing left on the destination.
    assert source.domain_info(domid).state == base.DomainState.RUNNING
    assert destination.list_domains() == []


def test_a_missing_disk_rolls_back(disks, source, destination, migration):
    domid = source.create_domain(guest_config(devices=DEVICES))
    uuid = source.domain_info(domid).uuid
    os.unlink(disks / f"{uuid}-51712.disk")
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "cannot be opened" in str(m.sender.error)
    assert source.domain_info(domid).state == base.DomainState.RUNNING
    assert destination.list_domains() == []


def test_time_not_rebased_on_the_destination_fails_platform(
    disks, source, destination, migration, monkeypatch
):
    """Mutation: the destination writes its own NOW() into the guest's
    vcpu_time_info but leaves the source's wallclock (the wall time at
    the source's boot): the guest's clock is off by the two hosts'
    boot times, and the platform item and after_resume say so."""
    update_time = Domain.update_time

    def keep_wallclock(dom):
        if dom.hv is not destination.hv:
            return update_time(dom)
        page = dom.mem.xen_pages[XENPAGE_SHARED_INFO]
        wc = slice(hvm.SHINFO_WC, hvm.SHINFO_WC + hvm.WALLCLOCK.size)
        kept = page[wc].copy()
        update_time(dom)
        page[wc] = kept
        return None

    monkeypatch.setattr(Domain, "update_time", keep_wallclock)
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    later, raised = checker.run_after_resume(
        destination, run.domid, RUN_SECONDS
    )
    report = checker.check(run.seen["paused"], run.seen["resumed"], later)
    assert Item.PLATFORM in report.failures(), str(report)
    assert (
        "off the destination's wall time" in report.failures()[Item.PLATFORM]
    )
    verdict = checker.after_resume(
        run.seen["paused"], run.seen["resumed"], later, raised
    )
    assert not verdict.passed
    off = [p for p in verdict.problems if "off the destination's wall" in p]
    assert off, verdict.problems


def test_time_is_rebased_as_xen_does(disks, source, destination, migration):
    """After the migration the guest's time info is the destination's:
    system_time its NOW(), the wallclock its boot, the TSC info's
    incarnation one more; the guest's clock agrees with the wall time."""
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    later, _ = checker.run_after_resume(destination, run.domid, RUN_SECONDS)
    report = checker.check(run.seen["paused"], run.seen["resumed"], later)
    assert report.results[Item.PLATFORM].passed, str(report)
    vcpu0 = later.kernel["vcpus"][0]
    # Written at unpause, before the run: NOW() of the destination, whose
    # uptime is not the source's.
    assert 0 < destination.now_ns() - vcpu0["system_time"] < 10**10
    assert abs(source.now_ns() - vcpu0["system_time"]) > 10**10
    assert (
        later.kernel["tsc_incarnation"]
        == run.seen["paused"].kernel["tsc_incarnation"] + 1
    )


def test_system_time_not_offset_corrected_fails_the_pvclock_rule(
    disks, source, destination, migration, monkeypatch
):
    """Mutation: the destination writes each vCPU's vcpu_time_info with
    a system time 2 s behind its NOW() (the rebase not offset-corrected).
    The checker, reading the pvclock pages of the guest's RAM on both
    sides, finds the guest's clock went back across the migration."""
    update_time = Domain.update_time

    def behind(dom):
        update_time(dom)
        if dom.hv is not destination.hv:
            return
        for v in range(dom.vcpus):
            vi = memoryview(dom._vcpu_info(v))
            fields = list(hvm.VCPU_TIME.unpack_from(vi, hvm.VCPU_TIME_OFFSET))
            fields[3] -= 2 * 10**9  # system_time
            hvm.VCPU_TIME.pack_into(vi, hvm.VCPU_TIME_OFFSET, *fields)

    monkeypatch.setattr(Domain, "update_time", behind)
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    later, raised = checker.run_after_resume(
        destination, run.domid, RUN_SECONDS
    )
    report = checker.check(run.seen["paused"], run.seen["resumed"], later)
    assert "pvclock went back" in report.failures()[Item.PLATFORM], str(report)
    verdict = checker.after_resume(
        run.seen["paused"], run.seen["resumed"], later, raised
    )
    assert not verdict.passed
    back = [p for p in verdict.problems if "across the migration" in p]
    assert len(back) == 2, verdict.problems  # both vCPUs


def test_the_checker_reads_nothing_of_what_it_checks(
    disks, source, destination, migration, monkeypatch
):
    """The oracle's reads go through the probe and the guest's pages:
    none of the host's guest_state, the toolstack's export, the
    hypervisor's export functions, the HVM context save and its encoder,
    xenstored's migration export, the backends' exported states or the
    memory digest is called while it reads either side. Only its own
    thread's calls count (it starts none): the other end of the
    migration goes on meanwhile and digests the guest itself."""
    calls = []
    reading = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if threading.get_ident() in reading:
                calls.append(f"{type(owner).__name__}.{name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for host in (source, destination):
        spy(host, "guest_state")
        spy(host, "export_pv_state")
        spy(host, "memory_digest")
        spy(host.toolstack, "export_pv_state")
        spy(host.hv, "export_shared_info")
        spy(host.hv, "export_grants")
        spy(host.hv, "guest_ports")
        spy(host.hv, "backend_domids")
        spy(host.services, "backend_states")
        spy(host.services.xenstore, "export_domain")
        spy(host.digest, "digest")
        # The whole-context save the send path streams.
        spy(host, "get_hvm_context")
        spy(host.hv, "get_hvm_context")
    spy(hvm, "encode")

    snapshot = checker.snapshot

    def watched(host, domid, items=None):
        reading.append(threading.get_ident())
        try:
            return snapshot(host, domid, items)
        finally:
            reading.remove(threading.get_ident())

    monkeypatch.setattr(checker, "snapshot", watched)
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    assert run.report().passed, str(run.report())
    assert set(run.seen["paused"].items) == set(Item)
    assert calls == []


def test_the_engine_digests_no_guest_records(
    disks, source, destination, migration, monkeypatch
):
    """The digests compared before COMMIT read the items only: the
    engine's guest_state calls (the source's, the destination's before
    the PV import and for READY) leave out the guest's records, which
    the pause would wait for and no digest covers."""
    asked = []
    read = []
    for host in (source, destination):
        original = host.guest_state

        def state(domid, items=None, *, _host=host, _original=original, **kw):
            asked.append((_host.hostname, kw.get("guest_records", True)))
            return _original(domid, items, **kw)

        monkeypatch.setattr(host, "guest_state", state)
        for name in ("_frontends", "_kernel_record"):
            original_read = getattr(host, name)

            def reading(*args, _name=name, _read=original_read):
                read.append(_name)
                return _read(*args)

            monkeypatch.setattr(host, name, reading)
    domid = source.create_domain(guest_config(devices=DEVICES, io_rate=400))
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert sorted(asked) == [
        ("destination", False),
        ("destination", False),
        ("source", False),
    ]
    assert read == []


def test_an_upcall_not_reasserted_leaves_ports_silent(
    disks, source, destination, migration, monkeypatch
):
    """Mutation: dom0 signals the guest's console port after the pause
    (the upcall flag in vcpu_info is set, the event not taken) and the
    destination does not re-assert the callback vector at resume, as
    Xen's level-triggered delivery would. The 1-vCPU guest's flag stays
    set, no 0->1 edge kicks it again: after_resume finds its ports
    silent and its I/O stalled."""
    original = Hypervisor.reassert_upcalls

    def not_on_destination(dom):
        if dom.hv is not destination.hv:
            original(dom)

    monkeypatch.setattr(
        Hypervisor, "reassert_upcalls", staticmethod(not_on_destination)
    )
    pause = source.pause
    flagged = []

    def pause_then_event(domid):
        pause(domid)
        dom = source.hv.domains[domid]
        console = dom.params[hvm.HVM_PARAM_CONSOLE_EVTCHN]
        source.services.dom0_notify(dom.ports[console].remote_port)
        with dom.mem_lock():
            flagged.append(dom.bits.upcall_pending(dom.ports[console].vcpu))

    monkeypatch.setattr(source, "pause", pause_then_event)
    run = Checked(source, destination, migration, vcpus=1)
    assert run.phase is Phase.DONE, run.migration.sender.error
    assert flagged == [True]
    verdict = run.after()
    assert not verdict.passed
    console = run.seen["paused"].items[Item.HVM_PARAMS]
    console = dict(console)[hvm.HVM_PARAM_CONSOLE_EVTCHN]
    assert console in verdict.ports_silent, verdict.to_dict()
    assert "bound ports with no event after resume" in " ".join(
        verdict.problems
    )


def test_a_reordered_response_is_found_after_resume(
    disks, source, destination, migration
):
    patched = []

    def fault(host, domid):
        patched.append(
            _patch_backends(host, domid, lambda a: [a[1], a[0], *a[2:]])
        )

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE
    assert _fired(patched), "no answers were swapped"
    verdict = run.after()
    assert verdict.reordered > 0, verdict.to_dict()
    assert "reordered responses after resume" in " ".join(verdict.problems)


def test_backends_that_answer_nothing_after_resume_are_found(
    disks, source, destination, migration, monkeypatch
):
    """Mutation: requests are in flight at pause (the source's backends
    sit on them for a moment before it, as a slow disk would), and the
    destination's backends, reconnected (the nine items pass), answer
    those and nothing the guest issued after the pause: its I/O stalls
    once they are answered, and after_resume names both devices. Before
    this rule the verdict passed (the answers to what was in flight at
    pause made "completed" grow)."""
    pause = source.pause

    def pause_with_requests_in_flight(domid):
        for be in list(_dom(source, domid).backends.values()):
            with be._lock:
                be.quiesced = True
        time.sleep(0.05)
        pause(domid)

    monkeypatch.setattr(source, "pause", pause_with_requests_in_flight)

    def fault(host, domid):
        # Issued before the pause: below each frontend's next_seq, as
        # the guest's RAM shows it (paused here).
        issued = {
            key: int(fe["next_seq"])
            for key, fe in host.probe(domid).guest_records().frontends.items()
        }
        for be in list(_dom(host, domid).backends.values()):

            def put(answers, original=be.put_responses, limit=issued[be.key]):
                original(
                    [
                        a
                        for a in answers
                        if protocol.decode_response(a)[0] < limit
                    ]
                )

            be.put_responses = put

    run = Checked(source, destination, migration, fault)
    assert run.phase is Phase.DONE, run.migration.sender.error
    assert run.report().passed, str(run.report())
    owed = {
        key: fe["outstanding"]
        for key, fe in run.seen["paused"].frontends.items()
    }
    assert all(owed.values()), owed
    verdict = run.after()
    assert not verdict.passed, verdict.to_dict()
    stalled = [
        p
        for p in verdict.problems
        if "no request issued after the pause completed" in p
    ]
    assert {p.split(":")[0] for p in stalled} == {"vif/0", "vbd/51712"}, (
        verdict.problems
    )
    # What was in flight at pause was answered, exactly once.
    assert verdict.lost == verdict.duplicated == 0, verdict.to_dict()


def test_every_write_mark_is_made_under_the_memory_lock(
    disks, source, destination, migration, monkeypatch
):
    """A harvest or digest reads the maps under the memory lock and skips
    them when nothing was marked since its last read: a mark made
    without the lock (xenstored's ring, dom0's store notification) could
    land between its look at the count and its read, and be missed."""
    unlocked = []
    mark = GuestMemory.mark_dirty

    def checked(self, pfns):
        if locks.MEMORY not in locks.held():
            unlocked.append(pfns)
        return mark(self, pfns)

    monkeypatch.setattr(GuestMemory, "mark_dirty", checked)
    run = Checked(source, destination, migration)
    assert run.phase is Phase.DONE, run.migration.sender.error
    assert unlocked == []
