"""Recovery next to live migrations: run in any phase it touches
nothing of them; after COMMIT it learns the outcome through TLS as the
sender does."""

from __future__ import annotations

import os
import threading

import pytest

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.journal import SUBDIR
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base

from .conftest import guest_config

PHASES = (
    Phase.PRECOPY,
    Phase.STOP_AND_COPY,
    Phase.RESTORE,
    Phase.COMMIT,
    Phase.CLEANUP,
)


@pytest.mark.parametrize("phase", PHASES, ids=lambda p: p.value)
def test_recover_during_a_live_migration_leaves_it_alone(
    conf, source, destination, migration, phase
):
    domid = source.create_domain(guest_config())
    seen = []

    def recover_now(event):
        # On the migration's own thread, as a concurrent `recover` would
        # run beside it: both journals hold this migration now.
        before = source.domain_info(domid).state
        seen.extend(
            recovery.recover(source, Journal.from_conf(conf), conf)
            + recovery.recover_incoming(
                destination, Journal.incoming_from_conf(conf)
            )
        )
        seen.append((before, source.domain_info(domid).state))

    m = migration(
        source,
        domid,
        destination,
        source_hooks={("state", phase.value): recover_now},
    )
    assert m.run() is Phase.DONE, m.sender.error
    *outcomes, (before, after) = seen
    assert outcomes, "the journals were empty in the migration's phase"
    assert all(o.skipped for o in outcomes), outcomes
    # The guest was left as the migration had it.
    assert before == after
    assert source.list_domains() == []
    assert destination.domain_info(domid).state == base.DomainState.RUNNING


class LosesCommittedAndGoesOn(Receiver):
    """Runs the guest on COMMIT; COMMITTED never reaches the source."""

    def _commit(self):
        self.host.unpause(self.domid)
        self.state.transition(Phase.COMMIT, Phase.CLEANUP)
        self.state.transition(Phase.CLEANUP, Phase.DONE)
        self._close_channel()


def test_recovery_asks_through_tls(
    conf, tls_files, source, destination, migration, monkeypatch
):
    tls_files.enable(conf)
    conf.set_override("commit_query_timeout", 30.0, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(
        source, domid, destination, receiver_class=LosesCommittedAndGoesOn
    )
    # This engine cannot ask (as one that died after COMMIT): IN_DOUBT,
    # its journal kept; the destination goes on answering, over TLS.
    monkeypatch.setattr(
        m.sender.coordinator.query,
        "ask",
        lambda on_retry=None: commit.Verdict(None, "engine gone"),
    )
    m._thread.start()
    try:
        assert m.sender.run() is Phase.IN_DOUBT
        assert source.domain_info(domid).state == base.DomainState.PAUSED
        (outcome,) = recovery.recover(source, Journal.from_conf(conf), conf)
    finally:
        m._thread.join()
    assert outcome.phase is Phase.DONE, outcome
    assert source.list_domains() == []
    assert destination.domain_info(domid).state == base.DomainState.RUNNING
    # Recovery acknowledged: the destination forgot, and ended early.
    assert m.receiver.journal.forgotten


@pytest.mark.parametrize(
    "journalled_in", [Phase.STOP_AND_COPY, Phase.IN_DOUBT, Phase.CLEANUP]
)
def test_a_stale_entry_whose_domid_was_reused_leaves_the_new_guest_alone(
    conf, source, journalled, journalled_in
):
    # A guest whose migration an engine left journalled is gone; its
    # domid now holds another guest, running. Whatever the stale entry
    # says (roll back, ask, destroy), the new guest runs on untouched.
    domid = source.create_domain(guest_config("newcomer"))
    journal = journalled(
        conf.xen_ncm.state_path,
        journalled_in,
        domid=domid,
        uuid="the-guest-that-left",
        boot_id=source.boot_id(),
    )
    (outcome,) = recovery.recover(
        source,
        journal,
        conf,
        query=lambda entry, conf: messages.Status(
            phase="failed", committed=False
        ),
    )
    assert not outcome.skipped
    assert "left alone" in outcome.reason or "is now guest" in outcome.reason
    info = source.domain_info(domid)
    assert info.state == base.DomainState.RUNNING
    assert info.name == "newcomer"


def test_a_source_host_crash_after_commit_went_loses_no_guest(
    conf, source, destination, migration, monkeypatch
):
    # The source's COMMIT record is appended before COMMIT goes and
    # synced while it travels. The source host crashes once COMMIT went,
    # before that sync: the journal keeps what was synced (stop_and_copy;
    # the unsynced tail is dropped), the paused copy is gone, the boot id
    # changes. The destination ran the guest: recovery must say DONE,
    # not "runs nowhere, start it again from its disk" (two copies).
    conf.set_override("commit_query_timeout", 30.0, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(
        source, domid, destination, receiver_class=LosesCommittedAndGoesOn
    )
    # The engine dies with its host: nothing more is learnt or written.
    monkeypatch.setattr(
        m.sender.coordinator.query,
        "ask",
        lambda on_retry=None: commit.Verdict(None, "host crashed"),
    )
    path = os.path.join(conf.xen_ncm.state_path, SUBDIR)
    entry_file = os.path.join(path, m.sender.migration_id + ".json")
    durable = []
    sent = threading.Event()
    append, sync, send = Journal.append, Journal.sync, Channel.send

    def appended(journal, mid, line, *, sync=True):
        append(journal, mid, line, sync=sync)
        if sync and journal.path == path:
            durable.append(os.path.getsize(entry_file))

    def synced(journal, mid):
        if journal.path == path:
            # The COMMIT record's sync: held until COMMIT went.
            assert sent.wait(60)
        sync(journal, mid)
        if journal.path == path:
            durable.append(os.path.getsize(entry_file))

    crash = []

    def sending(channel, message):
        send(channel, message)
        if isinstance(message, messages.Commit):
            # What the disk holds when the host crashes now.
            crash.append(durable[-1])
            sent.set()

    monkeypatch.setattr(Journal, "append", appended)
    monkeypatch.setattr(Journal, "sync", synced)
    monkeypatch.setattr(Channel, "send", sending)
    m._thread.start()
    try:
        assert m.sender.run() is Phase.IN_DOUBT
        # The crash: the unsynced tail, the paused copy and the boot go.
        os.truncate(entry_file, crash[0])
        source.destroy_domain(domid)
        monkeypatch.setattr(source, "_boot_id", "after-the-crash")
        journal = Journal.from_conf(conf)
        assert journal.read(m.sender.migration_id).phase == "stop_and_copy"
        (outcome,) = recovery.recover(source, journal, conf)
    finally:
        m._thread.join()
    assert (outcome.phase, outcome.guest) == (
        Phase.DONE,
        recovery.DESTINATION,
    ), outcome
    assert source.list_domains() == []
    assert destination.domain_info(domid).state == base.DomainState.RUNNING
    assert journal.entries() == []
    # Recovery acknowledged: the destination forgot.
    assert m.receiver.journal.forgotten
