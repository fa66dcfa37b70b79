"""Settling journalled migrations: the rule of each phase, on a fake
host and a fake destination."""

from __future__ import annotations

import os
import time

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.journal import JournalError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base


class FakeHost:
    hostname = "src"

    def __init__(self, state=base.DomainState.PAUSED, uuid="u"):
        self.state = state
        self.uuid = uuid
        self.calls = []

    def boot_id(self):
        return "boot-1"

    def domain_info(self, domid):
        if self.state is None:
            raise base.DomainNotFound(f"no domain {domid}")
        return base.DomainInfo(
            domid=domid,
            name="g",
            uuid=self.uuid,
            state=self.state,
            memory_bytes=1 << 20,
            vcpus=1,
            pv_drivers=True,
            populated_pages=0,
        )

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "unpause":
                self.state = base.DomainState.RUNNING
            if name == "destroy_domain":
                self.state = None

        return call


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("commit_query_attempts", 2, group="xen_ncm")
    conf.set_override("retry_initial_delay", 0.0, group="xen_ncm")
    # A lease of 0.3s: a fence with no answer is waited out quickly.
    for name in ("io_timeout", "transfer_retry_timeout", "connect_timeout"):
        conf.set_override(name, 0.1, group="xen_ncm")
    conf.set_override("retry_max_delay", 0.05, group="xen_ncm")
    return conf


def answer(phase, committed):
    return lambda entry, conf: messages.Status(
        phase=phase, committed=committed
    )


def test_before_the_commit_decision_the_source_resumes(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert o.phase is Phase.FAILED
    assert "confirmed its copy is gone" in o.reason
    assert "unpause" in host.calls and "destroy_domain" not in host.calls
    assert j.entries() == []


def test_past_the_pause_the_source_resumes_after_the_teardown(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.RESTORE)
    asked = []

    def query(entry, conf):
        # Still waiting for the source, then rolled back.
        asked.append(list(host.calls))
        if len(asked) < 3:
            return messages.Status(phase="restore", committed=False)
        return messages.Status(phase="failed", committed=False)

    (o,) = recovery.recover(host, j, conf, query=query)
    assert o.phase is Phase.FAILED, o
    assert asked == [[], [], []]
    assert host.calls[-1] == "unpause"


@pytest.mark.parametrize(
    "phase", [Phase.STOP_AND_COPY, Phase.RESTORE, Phase.ROLLBACK]
)
def test_past_the_pause_with_no_answer_the_lease_is_waited(
    tmp_path, conf, journalled, phase
):
    # No COMMIT record: COMMIT, synced before it is sent, never went.
    # The destination, unreachable, gives up its copy when its lease
    # runs out; then the copy here resumes (one running copy).
    host = FakeHost()
    j = journalled(tmp_path, phase)

    def unreachable(entry, conf):
        raise TransportError("connection refused")

    started = time.monotonic()
    (o,) = recovery.recover(host, j, conf, query=unreachable)
    assert time.monotonic() - started >= 0.3
    assert o.phase is Phase.FAILED and "lease" in o.reason
    assert "unpause" in host.calls


def test_stop_and_copy_before_the_pause_rolls_back_without_asking(
    tmp_path, conf, journalled
):
    # The guest still runs (the engine died between its STOP_AND_COPY
    # record, or STOPPING, and the pause): nothing to fence.
    host = FakeHost(state=base.DomainState.RUNNING)
    j = journalled(tmp_path, Phase.STOP_AND_COPY)

    def never(entry, conf):
        raise AssertionError("asked")

    (o,) = recovery.recover(host, j, conf, query=never)
    assert o.phase is Phase.FAILED, o
    assert "unpause" not in host.calls
    assert j.entries() == []


def test_a_destination_running_a_guest_never_committed_keeps_it_paused(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    (o,) = recovery.recover(host, j, conf, query=answer("done", True))
    assert o.phase is Phase.IN_DOUBT
    assert host.calls == []
    assert [e.phase for e in j.entries()] == ["in_doubt"]


def test_a_guest_paused_before_the_migration_stays_paused(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.RESTORE, running=False)
    (o,) = recovery.recover(host, j, conf)
    assert o.phase is Phase.FAILED
    assert "unpause" not in host.calls


def test_a_committed_destination_means_the_source_copy_goes(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.COMMIT)
    (o,) = recovery.recover(host, j, conf, query=answer("done", True))
    assert o.phase is Phase.DONE
    assert host.calls == ["destroy_domain"]


def test_a_rolled_back_destination_means_the_source_resumes(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.IN_DOUBT)
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert o.phase is Phase.FAILED
    assert host.state is base.DomainState.RUNNING


def test_no_answer_keeps_the_guest_paused_and_the_entry(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.COMMIT)

    def unreachable(entry, conf):
        raise TransportError("connection refused")

    (o,) = recovery.recover(host, j, conf, query=unreachable)
    assert o.phase is Phase.IN_DOUBT
    assert host.calls == []
    assert [e.phase for e in j.entries()] == ["in_doubt"]


def test_a_held_entry_is_a_live_migration_and_left_alone(
    tmp_path, conf, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    with j.hold("m-1"):
        (o,) = recovery.recover(host, j, conf, query=answer("done", True))
        assert o.skipped and o.phase is Phase.STOP_AND_COPY
        assert host.calls == []
        assert [e.phase for e in j.entries()] == ["stop_and_copy"]
        with pytest.raises(JournalError, match="running"):
            recovery.resolve(j, "m-1")
    # Released (the engine died): now it is settled.
    (o,) = recovery.recover(host, j, conf)
    assert not o.skipped and o.phase is Phase.FAILED
    assert "unpause" in host.calls


def test_a_reused_domid_is_another_guest_and_left_alone(
    tmp_path, conf, journalled
):
    host = FakeHost(uuid="someone-else")
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    (o,) = recovery.recover(host, j, conf)
    assert o.phase is Phase.FAILED
    assert "someone-else" in o.reason
    assert host.calls == []
    j = journalled(tmp_path, Phase.COMMIT)
    (o,) = recovery.recover(host, j, conf, query=answer("done", True))
    assert o.phase is Phase.DONE
    assert host.calls == []


def test_after_a_reboot_no_domain_is_touched(tmp_path, conf, journalled):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY, boot_id="boot-0")
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert o.phase is Phase.FAILED
    assert "rebooted" in o.reason
    assert host.calls == []


@pytest.mark.parametrize("phase", [Phase.STOP_AND_COPY, Phase.RESTORE])
def test_after_a_reboot_past_the_pause_the_destination_is_asked(
    tmp_path, conf, journalled, phase
):
    # The source's COMMIT is appended before COMMIT goes and synced while
    # it travels: a crash of the source host may lose it, so a
    # STOP_AND_COPY or RESTORE entry after a reboot does not mean that
    # COMMIT never went. The guest runs on the destination: DONE there,
    # not "runs nowhere, start it again" (which would make two copies).
    host = FakeHost(state=None)
    j = journalled(tmp_path, phase, boot_id="boot-0")
    (o,) = recovery.recover(host, j, conf, query=answer("cleanup", True))
    assert (o.phase, o.guest) == (Phase.DONE, recovery.DESTINATION), o
    assert "rebooted" in o.reason
    assert host.calls == []
    assert j.entries() == []


def test_after_a_reboot_past_the_pause_no_answer_is_in_doubt(
    tmp_path, conf, journalled
):
    # Whether COMMIT went before the crash cannot be told: kept, and
    # not said to run nowhere.
    host = FakeHost(state=None)
    j = journalled(tmp_path, Phase.RESTORE, boot_id="boot-0")

    def unreachable(entry, conf):
        raise TransportError("connection refused")

    (o,) = recovery.recover(host, j, conf, query=unreachable)
    assert o.phase is Phase.IN_DOUBT, o
    assert o.guest == recovery.ELSEWHERE
    assert host.calls == []
    assert [e.phase for e in j.entries()] == ["in_doubt"]


def test_a_later_recovery_of_that_in_doubt_entry_asks_again(
    tmp_path, conf, journalled
):
    # Kept IN_DOUBT after the reboot, it is asked the commit query on
    # the next run: still no answer, it says the copy here is gone (not
    # "paused here"); the destination's rollback, the guest runs nowhere.
    host = FakeHost(state=None)
    j = journalled(tmp_path, Phase.IN_DOUBT, boot_id="boot-0")

    def unreachable(entry, conf):
        raise TransportError("connection refused")

    (o,) = recovery.recover(host, j, conf, query=unreachable)
    assert (o.phase, o.guest) == (Phase.IN_DOUBT, recovery.ELSEWHERE), o
    assert "paused here" not in o.reason and "rebooted" in o.reason
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert (o.phase, o.guest) == (Phase.FAILED, recovery.NOWHERE), o
    assert j.entries() == []
    assert host.calls == []


@pytest.mark.parametrize(
    "phase, query",
    [
        # The destination says it never unpaused its copy.
        (Phase.STOP_AND_COPY, answer("failed", False)),
        (Phase.COMMIT, answer("failed", False)),
    ],
)
def test_a_failed_migration_whose_copy_the_reboot_took_runs_nowhere(
    tmp_path, conf, journalled, phase, query
):
    # Failed, and no copy here to run again: said as such, not as a
    # rollback with a guest running here.
    host = FakeHost()
    j = journalled(tmp_path, phase, boot_id="boot-0")
    (o,) = recovery.recover(host, j, conf, query=query)
    assert o.phase is Phase.FAILED
    assert o.lost and o.guest == recovery.NOWHERE
    assert o.reason.startswith("the guest runs nowhere")
    assert o.as_dict()["guest"] == "nowhere"
    assert host.calls == []


def test_a_rolled_back_guest_runs_on_the_source(tmp_path, conf, journalled):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert (o.phase, o.guest, o.lost) == (Phase.FAILED, "source", False)


def test_a_destination_rebooted_after_running_the_guest_says_it_is_lost(
    tmp_path, journalled
):
    host = FakeHost(state=None)
    j = journalled(tmp_path, Phase.DONE, cls=IncomingEntry, boot_id="boot-0")
    (o,) = recovery.recover_incoming(host, j)
    # The source's answer stands: the guest ran here, its copy there
    # must not run. But it runs nowhere now.
    assert o.phase is Phase.DONE
    assert o.lost
    (kept,) = j.entries()
    assert kept.phase == "done"


def test_an_operator_resolves_an_in_doubt_entry(tmp_path, conf, journalled):
    j = journalled(tmp_path, Phase.IN_DOUBT)
    entry = recovery.resolve(j, "m-1")
    assert entry.domid == 5
    assert j.entries() == []
    with pytest.raises(JournalError, match="no migration m-1"):
        recovery.resolve(j, "m-1")


@pytest.mark.parametrize(
    "phase, state, calls, answer_phase",
    [
        # Never got COMMIT: the copy goes, the answer is FAILED (kept
        # from STOP_AND_COPY on, whose record covers READY's).
        (Phase.RESTORE, base.DomainState.PAUSED, ["destroy_domain"], "failed"),
        (
            Phase.STOP_AND_COPY,
            base.DomainState.PAUSED,
            ["destroy_domain"],
            "failed",
        ),
        # Got COMMIT, died before unpausing: the commit is completed.
        (Phase.COMMIT, base.DomainState.PAUSED, ["unpause"], "done"),
        (Phase.COMMIT, base.DomainState.RUNNING, [], "done"),
        (Phase.CLEANUP, base.DomainState.RUNNING, [], "done"),
        (Phase.FAILED, None, [], "failed"),
    ],
)
def test_a_restarted_destination_settles_and_keeps_its_answer(
    tmp_path, phase, state, calls, answer_phase, journalled
):
    host = FakeHost(state=state)
    j = journalled(tmp_path, phase, cls=IncomingEntry)
    (o,) = recovery.recover_incoming(host, j)
    assert o.role == "destination"
    assert o.phase.value == answer_phase, o
    assert host.calls == calls
    (kept,) = j.entries()
    assert kept.phase == answer_phase


def test_a_destination_before_ready_forgets_after_destroying(
    tmp_path, journalled
):
    host = FakeHost()
    j = journalled(tmp_path, Phase.PRECOPY, cls=IncomingEntry)
    (o,) = recovery.recover_incoming(host, j)
    assert o.phase is Phase.FAILED
    assert host.calls == ["destroy_domain"]
    assert j.entries() == []


def test_a_destination_entry_settled_before_touches_no_later_copy(
    tmp_path, journalled
):
    # Recovered once (FAILED, copy destroyed), then the same guest came
    # in again by another migration: same domid, same uuid, running.
    host = FakeHost(state=base.DomainState.RUNNING)
    j = journalled(tmp_path, Phase.RESTORE, cls=IncomingEntry)
    (first,) = recovery.recover_incoming(host, j)
    assert first.phase is Phase.FAILED
    (again,) = recovery.recover_incoming(host, j)
    assert again.phase is Phase.FAILED
    assert host.calls == []
    assert host.state is base.DomainState.RUNNING


@pytest.mark.parametrize("phase", [Phase.FAILED, Phase.CANCELLED])
def test_a_rolled_back_destination_entry_destroys_nothing(
    tmp_path, phase, journalled
):
    host = FakeHost(state=base.DomainState.PAUSED)
    j = journalled(tmp_path, phase, cls=IncomingEntry)
    (o,) = recovery.recover_incoming(host, j)
    assert o.phase is phase
    assert host.calls == []


def test_a_stale_entry_of_a_guest_migrating_again_is_left_alone(
    tmp_path, conf, journalled
):
    # IN_DOUBT entry of an old migration; the guest (same domid and
    # uuid) is now paused by a live migration under another id.
    host = FakeHost()
    j = journalled(tmp_path, Phase.IN_DOUBT)
    live = Entry(
        migration_id="m-2",
        domid=5,
        host="127.0.0.1",
        port=2,
        token="11" * 16,
        running=True,
        uuid="u",
        boot_id="boot-1",
        phase=Phase.STOP_AND_COPY.value,
    )
    j.write(live)
    with j.hold("m-2"):
        outcomes = recovery.recover(
            host, j, conf, query=answer("failed", False)
        )
        assert sorted((o.migration_id, o.skipped) for o in outcomes) == [
            ("m-1", True),
            ("m-2", True),
        ]
        assert host.calls == []
        assert host.state is base.DomainState.PAUSED
    # That engine gone, the old entry is settled.
    outcomes = recovery.recover(host, j, conf, query=answer("failed", False))
    assert all(not o.skipped for o in outcomes)


def test_a_live_source_migration_shields_the_guest_from_incoming(
    tmp_path, journalled
):
    # A stale incoming entry (never got COMMIT) of a guest this host
    # now migrates out: its paused copy is the live source's.
    host = FakeHost()
    incoming = journalled(tmp_path, Phase.RESTORE, cls=IncomingEntry)
    outgoing = Journal(str(tmp_path))
    outgoing.write(
        Entry(
            migration_id="m-2",
            domid=5,
            host="127.0.0.1",
            port=2,
            token="11" * 16,
            running=True,
            uuid="u",
            boot_id="boot-1",
            phase=Phase.STOP_AND_COPY.value,
        )
    )
    with outgoing.hold("m-2"):
        (o,) = recovery.recover_incoming(host, incoming, others=[outgoing])
    assert o.skipped and "another migration" in o.reason
    assert host.calls == []


@pytest.mark.parametrize(
    "boot_id, state",
    [
        # After the reboot: the guest runs nowhere.
        ("boot-0", None),
        # The same boot, the copy paused past the pause: it resumes.
        ("boot-1", base.DomainState.PAUSED),
    ],
)
def test_a_confirmed_teardown_is_acknowledged_once_recorded(
    tmp_path, conf, journalled, monkeypatch, boot_id, state
):
    # FINISHED lets the destination forget its answer: sent before the
    # outcome is recorded here, a crash between the two would leave an
    # entry that nobody can answer any more (IN_DOUBT for nothing).
    host = FakeHost(state=state)
    j = journalled(tmp_path, Phase.STOP_AND_COPY, boot_id=boot_id)
    acknowledged = []

    class Destination:
        def once(self):
            return messages.Status(phase="failed", committed=False)

        def acknowledge(self):
            acknowledged.append([e.migration_id for e in j.entries()])
            return True

    monkeypatch.setattr(
        recovery, "_coordinator", lambda entry, conf: Destination()
    )
    (o,) = recovery.recover(host, j, conf)
    assert o.phase is Phase.FAILED, o
    assert acknowledged == [[]]


def _commit_record_lost(tmp_path, monkeypatch):
    """A source engine that sent COMMIT, whose COMMIT record's sync (and
    its rewrite's) failed with EIO and whose page the page cache then
    dropped (the file reads as before COMMIT), and which died: the
    journal a restarted engine of the same boot reads."""
    import errno
    import os

    from nova_xen_ncm.engine.journal import Record

    journal = Journal(
        str(tmp_path / "state"), runtime_path=str(tmp_path / "run")
    )
    record = Record(
        journal,
        Entry(
            migration_id="m-1",
            domid=5,
            host="127.0.0.1",
            port=1,
            token="00" * 16,
            running=True,
            uuid="u",
            boot_id="boot-1",
        ),
        lazy={Phase.RESTORE: Phase.STOP_AND_COPY},
        sync_behind=frozenset({Phase.COMMIT}),
    )
    record.open()
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    record._drain()
    path = journal._file("m-1")
    before = os.path.getsize(path)

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    record.close()
    monkeypatch.undo()
    # The failed writeback left the pages clean; dropped, they read as
    # what the disk had.
    os.truncate(path, before)
    assert journal.read("m-1").phase == Phase.RESTORE.value
    return journal


@pytest.mark.parametrize(
    ("said", "phase", "guest", "calls"),
    [
        (
            ("cleanup", True),
            Phase.DONE,
            recovery.DESTINATION,
            ["destroy_domain"],
        ),
        (("failed", False), Phase.FAILED, recovery.SOURCE, ["unpause"]),
        (None, Phase.IN_DOUBT, "", []),
    ],
)
def test_a_commit_record_lost_to_a_failed_sync_asks_the_destination(
    tmp_path, conf, monkeypatch, said, phase, guest, calls
):
    # Same boot, the copy here paused, the entry says RESTORE: without
    # the mark it would resume once the lease ran out, while the
    # destination, which got COMMIT, runs the guest (two copies).
    journal = _commit_record_lost(tmp_path, monkeypatch)
    host = FakeHost()

    def query(entry, conf):
        if said is None:
            raise TransportError("unreachable")
        return messages.Status(phase=said[0], committed=said[1])

    (o,) = recovery.recover(host, journal, conf, query=query)
    assert (o.phase, o.guest) == (phase, guest), o
    assert [c for c in host.calls if c in ("unpause", "destroy_domain")] == (
        calls
    )
    mark = tmp_path / "run" / os.path.basename(journal.runtime) / "m-1.sent"
    if phase is Phase.IN_DOUBT:
        assert "lease" in o.reason and "COMMIT may have gone" in o.reason
        assert journal.read("m-1").phase == Phase.IN_DOUBT.value
        assert mark.exists()
    else:
        assert journal.entries() == [] and not mark.exists()
