"""The two-phase commit when the destination's answer goes missing, and
rollback when the destination fails before COMMIT."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from nova_xen_ncm.engine import acceptor
from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.journal import INCOMING
from nova_xen_ncm.engine.journal import SUBDIR
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.receiver import ANSWER_POLL
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import guest_config


class LosesCommitted(Receiver):
    """Acts on COMMIT, but its COMMITTED never reaches the source."""

    def _commit(self):
        self.host.unpause(self.domid)
        self.state.transition(Phase.COMMIT, Phase.CLEANUP)
        self.state.transition(Phase.CLEANUP, Phase.DONE)
        self._close_channel()


class VanishesAtCommit(Receiver):
    """Goes away when COMMIT arrives, without acting on it."""

    def _commit(self):
        # Unreachable before the source can notice: it asks on a new
        # connection as soon as its channel drops.
        self.listener.close()
        self._close_channel()
        self._source_knows = True
        self.state.transition(Phase.COMMIT, Phase.IN_DOUBT, reason="went away")


def state_of(host, domid):
    try:
        return host.domain_info(domid).state
    except base.DomainNotFound:
        return None


def test_lost_acknowledgement_is_settled_by_query(
    source, destination, migration, conf
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, receiver_class=LosesCommitted)
    assert m.run() is Phase.DONE, m.sender.error
    assert m.sender.state.reason(Phase.CLEANUP) == (
        "the destination runs the guest (done)"
    )
    assert state_of(source, domid) is None
    assert state_of(destination, domid) == base.DomainState.RUNNING
    # The source acknowledged on the query path: both journals are empty
    # (run() joined the receiver, which answered until then).
    assert journals_empty(conf)


def journals_empty(conf):
    path = conf.xen_ncm.state_path
    return (
        Journal(path).entries() == []
        and Journal(path, INCOMING, IncomingEntry).entries() == []
    )


class RollsBackAtCommit(Receiver):
    """Gets COMMIT, but cannot unpause and says so only to a query: it
    destroys its copy without a word on the control channel."""

    def _commit(self):
        self._close_channel()
        self.state.transition(Phase.COMMIT, Phase.ROLLBACK, reason="test")
        self.host.destroy_domain(self.domid)
        self.state.transition(Phase.ROLLBACK, Phase.FAILED, reason="test")


def test_a_destination_that_never_unpaused_lets_the_source_resume(
    source, destination, migration, conf
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, receiver_class=RollsBackAtCommit)
    assert m.run() is Phase.FAILED, m.sender.state.reason(Phase.IN_DOUBT)
    assert "never unpaused" in m.sender.state.reason(Phase.FAILED)
    assert state_of(source, domid) == base.DomainState.RUNNING
    assert state_of(destination, domid) is None
    assert journals_empty(conf)


def test_a_normal_commit_ends_with_both_journals_empty(
    source, destination, migration, conf
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE
    assert m.receiver._source_knows
    assert journals_empty(conf)


def test_unreachable_destination_after_commit_is_in_doubt(
    source, destination, migration
):
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination, receiver_class=VanishesAtCommit)
    assert m.run() is Phase.IN_DOUBT
    assert "could not be asked" in m.sender.state.reason(Phase.IN_DOUBT)
    assert m.sender.stats.retries > 0
    # Never resumed on a guess, never two running copies.
    assert state_of(source, domid) == base.DomainState.PAUSED
    assert state_of(destination, domid) == base.DomainState.PAUSED
    with pytest.raises(base.HostError, match="log-dirty"):
        source.harvest_dirty(domid)


def test_destination_failure_before_commit_rolls_back(
    source, destination, migration, monkeypatch, conf
):
    domid = source.create_domain(guest_config())

    def refuse(domid, state):
        raise base.HostError("no room for the ports", call="import_pv_state")

    monkeypatch.setattr(destination, "import_pv_state", refuse)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "no room for the ports" in str(m.sender.error)
    assert m.receiver.state.phase is Phase.FAILED
    assert state_of(source, domid) == base.DomainState.RUNNING
    assert destination.list_domains() == []
    assert m.sender.stats.actual_downtime is not None
    # The teardown was confirmed, the rollback recorded here, and the
    # acknowledgement taken and confirmed (on the control channel, or on
    # the query path when frames in flight stood before it there):
    # nothing answers on.
    assert m.receiver.acceptor.finished.is_set() or m.receiver._source_knows
    assert m.receiver.answering is None
    assert journals_empty(conf)


def lost_finished(conf, source, destination, migration):
    """A migration whose final acknowledgement never arrives: run() has
    returned on both sides and the commit query window is over."""
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    m.sender.coordinator.acknowledge = lambda: None
    assert m.run() is Phase.DONE, m.sender.error
    assert not m.receiver._source_knows
    query = commit.CommitQuery(
        conf, m.receiver.address, m.sender.migration_id, m.sender.token
    )
    return m, query


def test_a_late_source_learns_the_outcome_after_the_window(
    source, destination, migration, conf
):
    m, query = lost_finished(conf, source, destination, migration)
    # Well past the window, no engine restart: still answered.
    time.sleep(conf.xen_ncm.commit_query_timeout)
    assert m.receiver.answering.is_alive()
    status = query.once()
    assert (status.phase, status.committed) == ("done", True)
    assert not journals_empty(conf)
    # The acknowledgement ends it: the entry goes, the port closes.
    assert query.acknowledge()
    m.receiver.answering.join(5 * ANSWER_POLL)
    assert not m.receiver.answering.is_alive()
    assert journals_empty(conf)
    with pytest.raises(EngineError):
        query.once()


def test_answers_end_once_an_operator_resolved_the_entry(
    source, destination, migration, conf
):
    m, query = lost_finished(conf, source, destination, migration)
    assert query.once().phase == "done"
    incoming = Journal(conf.xen_ncm.state_path, INCOMING, IncomingEntry)
    recovery.resolve(incoming, m.sender.migration_id)
    m.receiver.answering.join(5 * ANSWER_POLL)
    assert not m.receiver.answering.is_alive()
    with pytest.raises(EngineError):
        query.once()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_commit_lost_in_a_drop_lets_the_source_resume_at_once(
    source, destination, migration, conf, tls_files, tls
):
    # The destination waits for a resume of the control channel until
    # COMMIT; a source that lost COMMIT in the drop asks instead, and
    # that ends the wait: the destination rolls back and says so within
    # the source's query window (2 s here), not after its own waits.
    # Over TLS the query offers what the data path does.
    if tls:
        tls_files.enable(conf)
    conf.set_override("downtime_budget", 30.0, group="xen_ncm")
    conf.set_override("transfer_retry_timeout", 30.0, group="xen_ncm")
    domid = source.create_domain(guest_config())

    def drop(event):
        m.sender.data.control.sock.shutdown(socket.SHUT_RDWR)

    m = migration(
        source, domid, destination, source_hooks={("state", "commit"): drop}
    )
    assert m.run() is Phase.FAILED, m.sender.state.reason(Phase.IN_DOUBT)
    assert "never unpaused" in m.sender.state.reason(Phase.FAILED)
    assert "asks for the outcome" in str(m.receiver.error)
    assert state_of(source, domid) == base.DomainState.RUNNING
    assert state_of(destination, domid) is None


def test_the_destination_records_stop_and_copy_before_the_pause(
    source, destination, migration, conf, monkeypatch
):
    # STOPPING comes once the source's own record is durable, before it
    # pauses: the destination's record of the phase is synced while the
    # guest is paused and the last pages travel, not after them.
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    entered = threading.Event()
    m.destination_events.hooks[("state", "stop_and_copy")] = lambda e: (
        entered.set()
    )
    seen = []
    pause = source.pause_for_save

    def pause_for_save(domid):
        seen.append(entered.wait(5.0))
        pause(domid)

    monkeypatch.setattr(source, "pause_for_save", pause_for_save)
    assert m.run() is Phase.DONE
    assert seen == [True]
    assert journals_empty(conf)


def test_the_source_commit_record_is_written_before_commit_goes(
    source, destination, migration, conf, monkeypatch
):
    # A restarted source that finds no COMMIT record knows COMMIT never
    # went: it resumes its copy once the destination's lease ran out,
    # reachable or not. That holds only if the record is in the file
    # (which a restarted engine of this host reads) before COMMIT goes;
    # its sync runs while COMMIT travels, and is done before the source
    # copy is destroyed (CLEANUP).
    written = []
    append = Journal.append
    sync = Journal.sync

    def logged(self, migration_id, line, *, sync=True):
        append(self, migration_id, line, sync=sync)
        if os.path.basename(self.path) == SUBDIR:
            phase = json.loads(line.split(b" ", 1)[1])["phase"]
            written.append((phase, "synced" if sync else "appended"))

    def synced(self, migration_id):
        sync(self, migration_id)
        if os.path.basename(self.path) == SUBDIR:
            written.append(
                (
                    Journal(conf.xen_ncm.state_path).read(migration_id).phase,
                    "synced",
                )
            )

    monkeypatch.setattr(Journal, "append", logged)
    monkeypatch.setattr(Journal, "sync", synced)
    at_commit = []
    at_destroy = []
    send = commit.Coordinator.commit

    def committing(self, *args, **kwargs):
        at_commit.append(list(written))
        return send(self, *args, **kwargs)

    monkeypatch.setattr(commit.Coordinator, "commit", committing)
    destroy = source.destroy_domain

    def destroying(domid, *args, **kwargs):
        at_destroy.append(list(written))
        return destroy(domid, *args, **kwargs)

    monkeypatch.setattr(source, "destroy_domain", destroying)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE
    (before,) = at_commit
    assert before[-1] == ("commit", "appended"), before
    assert ("stop_and_copy", "synced") in before
    assert ("commit", "synced") in at_destroy[0], at_destroy


def test_a_destination_without_stop_notice_gets_no_stopping(
    source, destination, migration, conf, monkeypatch
):
    # A destination of an earlier release does not offer the capability:
    # STOPPING is not sent (it would be a protocol error there), and the
    # destination records STOP_AND_COPY on the stopped guest's records.
    monkeypatch.setattr(
        acceptor,
        "_CAPABILITIES",
        tuple(
            c
            for c in acceptor._CAPABILITIES
            if c != messages.Capability.STOP_NOTICE.value
        ),
    )
    sent = []
    send = transport.Channel.send

    def logged(self, msg, *args, **kwargs):
        sent.append(type(msg).__name__)
        return send(self, msg, *args, **kwargs)

    monkeypatch.setattr(transport.Channel, "send", logged)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    phases = []
    m.destination_events.hooks[("state", "stop_and_copy")] = lambda e: (
        phases.append(state_of(source, domid))
    )
    assert m.run() is Phase.DONE
    assert "Stopping" not in sent and "Commit" in sent
    assert phases == [base.DomainState.PAUSED]
    assert journals_empty(conf)
