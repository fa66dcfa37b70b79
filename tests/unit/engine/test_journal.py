"""The journals of migrations in flight."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine.state import Phase


def entry(mid="m-1"):
    return journal.Entry(
        migration_id=mid,
        domid=7,
        host="192.0.2.1",
        port=49152,
        token="ab" * 32,
        running=True,
        uuid="u-1",
        boot_id="b-1",
    )


def test_entries_round_trip_and_are_private(tmp_path):
    j = journal.Journal(str(tmp_path))
    j.write(entry())
    (got,) = j.entries()
    assert got.domid == 7 and got.token_bytes == bytes([0xAB]) * 32
    mode = os.stat(os.path.join(j.path, "m-1.json")).st_mode & 0o777
    assert mode == 0o600
    j.remove("m-1")
    assert j.entries() == []


def test_record_follows_phases_and_forgets_settled_migrations(tmp_path):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(j, entry())
    # Nothing to settle before PRECOPY: no entry for a failed SETUP.
    record.on_transition(Phase.SETUP, Phase.ROLLBACK, {})
    assert j.entries() == []
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {"running": False})
    (got,) = j.entries()
    assert got.phase == "precopy" and got.running is False
    assert got.uuid == "u-1" and got.boot_id == "b-1"
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    assert j.entries()[0].phase == "commit"
    record.on_transition(Phase.COMMIT, Phase.IN_DOUBT, {})
    assert j.entries()[0].phase == "in_doubt"
    record.on_transition(Phase.CLEANUP, Phase.DONE, {})
    assert j.entries() == [] and record.forgotten


def test_a_destination_record_keeps_its_outcome(tmp_path):
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(j, entry(), keep_settled=True)
    record.write(Phase.SETUP)
    record.on_transition(Phase.ROLLBACK, Phase.FAILED, {})
    assert [e.phase for e in j.entries()] == ["failed"]
    record.forget()
    assert j.entries() == []


def test_a_transition_after_the_outcome_was_acknowledged_writes_nothing(
    tmp_path,
):
    # The destination: the source's FINISHED (on the acceptor's thread)
    # comes while CLEANUP is not yet DONE; DONE must not bring the entry
    # back, or a settled migration stays in the journal for ever.
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(j, entry(), keep_settled=True)
    record.write(Phase.SETUP)
    record.on_transition(Phase.COMMIT, Phase.CLEANUP, {})
    record.forget()
    record.on_transition(Phase.CLEANUP, Phase.DONE, {})
    assert j.entries() == []
    assert record.forgotten


def test_the_hold_is_exclusive_until_released(tmp_path):
    j = journal.Journal(str(tmp_path))
    held = j.hold("m-1")
    assert j.try_hold("m-1") is None
    with pytest.raises(journal.JournalError, match="held"):
        j.hold("m-1")
    held.release()
    again = j.try_hold("m-1")
    assert again is not None
    again.release()


@pytest.mark.parametrize("mid", ["../escape", "", "a/b"])
def test_migration_ids_cannot_leave_the_directory(tmp_path, mid):
    with pytest.raises(journal.JournalError, match="cannot name"):
        journal.Journal(str(tmp_path)).write(entry(mid))


def test_a_damaged_entry_is_named(tmp_path):
    j = journal.Journal(str(tmp_path))
    with open(os.path.join(j.path, "m-2.json"), "w") as f:
        f.write('{"version": 2, "migration_id": "m-2"}')
    with pytest.raises(journal.JournalError, match="m-2.json: missing"):
        j.entries()


@pytest.mark.parametrize(
    "new, raises",
    [
        (Phase.PRECOPY, True),
        (Phase.STOP_AND_COPY, True),
        (Phase.COMMIT, True),
        # Undoing or stopping goes on, the failure logged.
        (Phase.ROLLBACK, False),
        (Phase.IN_DOUBT, False),
    ],
)
def test_a_journal_that_cannot_be_written_stops_forward_transitions(
    tmp_path, new, raises
):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(j, entry())
    record.started = True
    # The entry's name is taken by a directory: the rename fails.
    os.mkdir(os.path.join(j.path, "m-1.json"))
    if raises:
        with pytest.raises(journal.JournalError, match="cannot write"):
            record.on_transition(Phase.SETUP, new, {})
    else:
        record.on_transition(Phase.SETUP, new, {})


def test_a_migration_leaves_no_lock_file_once_nothing_is_journalled(
    tmp_path,
):
    j = journal.Journal(str(tmp_path))
    # Refused at SETUP: never written.
    refused = journal.Record(j, entry("m-1"))
    refused.open()
    refused.close()
    # Settled and forgotten while held.
    done = journal.Record(j, entry("m-2"))
    done.open()
    done.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    done.on_transition(Phase.CLEANUP, Phase.DONE, {})
    done.close()
    # In doubt: its entry and lock stay for recovery.
    doubt = journal.Record(j, entry("m-3"))
    doubt.open()
    doubt.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    doubt.on_transition(Phase.COMMIT, Phase.IN_DOUBT, {})
    doubt.close()
    assert sorted(os.listdir(j.path)) == ["m-3.json", "m-3.lock"]


def test_each_version_is_one_sync_and_the_first_syncs_the_directory(
    tmp_path, monkeypatch
):
    j = journal.Journal(str(tmp_path))
    syncs = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: syncs.append("data") or real_fdatasync(fd)
    )
    monkeypatch.setattr(
        os, "fsync", lambda fd: syncs.append("dir") or real_fsync(fd)
    )
    record = journal.Record(j, entry())
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    assert syncs == ["data", "dir"]
    syncs.clear()
    # While the guest is paused: one sync per transition, each before
    # the transition's side effect (the write returns after it).
    for old, new in [
        (Phase.PRECOPY, Phase.STOP_AND_COPY),
        (Phase.RESTORE, Phase.COMMIT),
    ]:
        record.on_transition(old, new, {})
    assert syncs == ["data", "data"]
    assert j.read("m-1").phase == "commit"


def _count_syncs(monkeypatch):
    syncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(
        os,
        "fdatasync",
        lambda fd: (
            syncs.append(threading.current_thread().name) or real_fdatasync(fd)
        ),
    )
    return syncs


def test_a_phase_its_predecessor_covers_is_appended_without_a_sync(
    tmp_path, monkeypatch
):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j, entry(), lazy={Phase.RESTORE: Phase.STOP_AND_COPY}
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    syncs = _count_syncs(monkeypatch)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    # The decision is durable before its side effect, after the
    # unsynced version (appended in the background meanwhile).
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    assert syncs == [threading.current_thread().name]
    with open(os.path.join(j.path, "m-1.json"), "rb") as f:
        phases = [
            json.loads(line.split(b" ", 1)[1])["phase"]
            for line in f.read().splitlines()
        ]
    assert phases == ["precopy", "stop_and_copy", "restore", "commit"]
    record.close()


def test_covered_phases_wait_for_neither_a_sync_nor_the_writer(
    tmp_path, monkeypatch
):
    # A chain of covers: the second covered version does not wait for
    # the first one's append, which the writer thread holds, and both
    # land in order, neither synced.
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j,
        entry(),
        lazy={
            Phase.RESTORE: Phase.STOP_AND_COPY,
            Phase.COMMIT: Phase.RESTORE,
        },
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    syncs = _count_syncs(monkeypatch)
    release = threading.Event()
    append = j.append

    def held(*args, **kwargs):
        assert release.wait(60)
        append(*args, **kwargs)

    monkeypatch.setattr(j, "append", held)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    assert not release.is_set() and syncs == []
    release.set()
    record.close()
    with open(os.path.join(j.path, "m-1.json"), "rb") as f:
        phases = [
            json.loads(line.split(b" ", 1)[1])["phase"]
            for line in f.read().splitlines()
        ]
    assert phases == ["precopy", "stop_and_copy", "restore", "commit"]
    assert syncs == []


def test_a_lazy_phase_not_entered_from_its_cover_is_synced(
    tmp_path, monkeypatch
):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j, entry(), lazy={Phase.RESTORE: Phase.STOP_AND_COPY}
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    # STOP_AND_COPY's own write failed to be recorded: nothing covers.
    record.written = Phase.PRECOPY
    syncs = _count_syncs(monkeypatch)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    assert len(syncs) == 1


def test_a_background_sync_is_done_before_the_next_transition(
    tmp_path, monkeypatch
):
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(
        j,
        journal.IncomingEntry(**vars(entry())),
        keep_settled=True,
        background=frozenset({Phase.STOP_AND_COPY}),
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    syncs = _count_syncs(monkeypatch)
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    # Synced by another thread while this one goes on.
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    assert syncs[0] != threading.current_thread().name
    assert len(syncs) == 2
    assert j.read("m-1").phase == "restore"


def test_a_sync_behind_phase_is_readable_at_once_and_synced_after(
    tmp_path, monkeypatch
):
    # The source's COMMIT: written to the file before the transition
    # returns (a restarted engine reads it, before COMMIT goes), made
    # durable by the record's thread, and the next transition waits for
    # that sync.
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j,
        entry(),
        lazy={Phase.RESTORE: Phase.STOP_AND_COPY},
        sync_behind=frozenset({Phase.COMMIT}),
    )
    for old, new in [
        (Phase.SETUP, Phase.PRECOPY),
        (Phase.PRECOPY, Phase.STOP_AND_COPY),
        (Phase.STOP_AND_COPY, Phase.RESTORE),
    ]:
        record.on_transition(old, new, {})
    release = threading.Event()
    synced = []
    sync = j.sync

    def held(mid):
        assert release.wait(60)
        sync(mid)
        synced.append(threading.current_thread().name)

    monkeypatch.setattr(j, "sync", held)
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    # Read as a restarted engine would: there, not yet synced.
    assert journal.Journal(str(tmp_path)).read("m-1").phase == "commit"
    assert synced == []
    done = threading.Event()

    def cleanup():
        record.on_transition(Phase.COMMIT, Phase.CLEANUP, {})
        done.set()

    waiter = threading.Thread(target=cleanup)
    waiter.start()
    assert not done.wait(0.2), "CLEANUP went on before COMMIT's sync"
    release.set()
    waiter.join(5)
    assert done.is_set()
    assert synced and synced[0] != threading.current_thread().name
    assert j.read("m-1").phase == "cleanup"
    record.close()


def _committing(j):
    record = journal.Record(
        j,
        entry(),
        lazy={Phase.RESTORE: Phase.STOP_AND_COPY},
        sync_behind=frozenset({Phase.COMMIT}),
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    return record


def test_a_failed_sync_of_a_sync_behind_record_writes_it_again(
    tmp_path, monkeypatch
):
    # COMMIT went before its sync failed: the record must not be left
    # to a failed writeback, which marks its pages clean but not on
    # disk (once dropped, a restarted engine would read STOP_AND_COPY,
    # "COMMIT never went", and resume its copy after the lease). Here
    # the failed sync drops the unsynced tail, as the disk has it.
    j = journal.Journal(str(tmp_path))
    record = _committing(j)
    path = os.path.join(j.path, "m-1.json")
    on_disk = os.path.getsize(path)
    sync = j.sync
    failed = []

    def eio_once(mid):
        if not failed:
            failed.append(mid)
            os.truncate(path, on_disk)
            raise journal.JournalError("cannot sync: [Errno 5] EIO")
        sync(mid)

    monkeypatch.setattr(j, "sync", eio_once)
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    record.on_transition(Phase.COMMIT, Phase.CLEANUP, {})
    assert failed == ["m-1"]
    # Written again, synced: the CLEANUP after it is on top of it.
    phases = [
        json.loads(line.split(b" ", 1)[1])["phase"]
        for line in open(path, "rb").read().splitlines()
    ]
    assert phases[-2:] == ["commit", "cleanup"], phases
    record.close()


def test_a_sync_behind_record_not_durable_at_all_is_said_not_raised(
    tmp_path, monkeypatch, caplog
):
    # Past COMMIT the migration goes on (the destination may run the
    # guest): the failure is logged with what to check, not raised.
    j = journal.Journal(str(tmp_path))
    record = _committing(j)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})

    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", broken)
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    record.on_transition(Phase.COMMIT, Phase.IN_DOUBT, {})
    assert "the commit record is not durable" in caplog.text
    assert "check on the destination" in caplog.text
    record.close()


def test_a_failed_background_sync_stops_the_next_must_record_transition(
    tmp_path, monkeypatch
):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j, entry(), background=frozenset({Phase.STOP_AND_COPY})
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})

    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", broken)
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    with pytest.raises(journal.JournalError, match="I/O error"):
        record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})


def test_an_unexpected_failure_of_the_writer_fails_the_transition(
    tmp_path, monkeypatch
):
    """A write that fails with anything else is still counted done: the
    next transition fails instead of waiting for ever (the guest paused).
    Takes well under a second (5 s when it hangs)."""
    j = journal.Journal(str(tmp_path))
    record = journal.Record(
        j, entry(), background=frozenset({Phase.STOP_AND_COPY})
    )
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})

    def broken(*args, **kwargs):
        raise RuntimeError("no more threads")

    monkeypatch.setattr(j, "append", broken)
    record.on_transition(Phase.PRECOPY, Phase.STOP_AND_COPY, {})
    raised = []

    def restore():
        try:
            record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
        except journal.JournalError as exc:
            raised.append(exc)

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    thread.join(5.0)
    assert not thread.is_alive()
    assert raised and "no more threads" in str(raised[0])
    record.close()


def test_a_version_cut_short_by_a_crash_leaves_the_one_before(tmp_path):
    j = journal.Journal(str(tmp_path))
    record = journal.Record(j, entry())
    record.write(Phase.PRECOPY)
    record.write(Phase.COMMIT)
    path = os.path.join(j.path, "m-1.json")
    with open(path, "rb") as f:
        whole = f.read()
    lines = whole.split(b"\n")
    assert len(lines) == 3 and lines[2] == b""
    # The last append cut short: the version before it stands.
    with open(path, "wb") as f:
        f.write(whole[: len(lines[0]) + 1 + len(lines[1]) // 2])
    assert j.read("m-1").phase == "precopy"
    # A later version after the torn one is read.
    record.write(Phase.IN_DOUBT)
    assert j.read("m-1").phase == "in_doubt"
    # A line whose CRC does not match is not a version.
    with open(path, "rb") as f:
        torn = f.read()
    with open(path, "wb") as f:
        f.write(torn.replace(b'"in_doubt"', b'"in_dOubt"'))
    assert j.read("m-1").phase == "precopy"


@pytest.mark.parametrize("torn", [b"", b'3a4f01c2 {"migration_id": "m-'])
def test_a_first_version_cut_short_is_no_entry_and_blocks_no_recovery(
    tmp_path, torn
):
    j = journal.Journal(str(tmp_path))
    journal.Record(j, entry("m-2")).write(Phase.COMMIT)
    # A crash during the first append of m-1: the file, but no version
    # whose sync returned (nothing acted on it).
    path = os.path.join(j.path, "m-1.json")
    with open(path, "wb") as f:
        f.write(torn)
    assert j.read("m-1") is None
    assert [e.migration_id for e in j.entries()] == ["m-2"]
    # Written again, its first whole version is the entry.
    journal.Record(j, entry()).write(Phase.PRECOPY)
    assert j.read("m-1").phase == "precopy"
    # A file that held whole lines, none of them right, is corrupt:
    # said so, not taken as absent.
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole.replace(b'"precopy"', b'"precOpy"'))
    with pytest.raises(journal.JournalError, match="no whole entry"):
        j.read("m-1")


def test_an_unheld_entry_answered_after_its_migration_goes_under_its_lock(
    tmp_path,
):
    # The destination answers after run() (its hold released); the
    # source's FINISHED comes while a recovery settles the same entry
    # (read, then written back in its final phase). Removed under the
    # lock, it stays gone: not written back to be answered for ever.
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(j, entry(), keep_settled=True)
    record.open()
    record.write(Phase.DONE)
    record.close()
    recovering = j.try_hold("m-1")
    assert recovering is not None
    settled = j.read("m-1")
    finished = threading.Thread(target=record.forget)
    finished.start()
    finished.join(0.3)
    # The removal waits for the recovery.
    assert finished.is_alive()
    j.write(settled)
    recovering.release()
    finished.join(10)
    assert not finished.is_alive()
    assert j.entries() == [] and record.forgotten


def test_an_entry_held_too_long_is_kept_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "FORGET_WAIT", 0.2)
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(j, entry(), keep_settled=True)
    record.open()
    record.write(Phase.DONE)
    record.close()
    with j.hold("m-1"):
        record.forget()
    assert [e.phase for e in j.entries()] == ["done"]
    assert not record.forgotten


def test_a_version_queued_before_the_entry_was_forgotten_is_not_written(
    tmp_path,
):
    j = journal.Journal(str(tmp_path), journal.INCOMING, journal.IncomingEntry)
    record = journal.Record(
        j,
        journal.IncomingEntry(**vars(entry())),
        keep_settled=True,
        background=frozenset({Phase.CLEANUP}),
    )
    record.open()
    record.on_transition(Phase.SETUP, Phase.PRECOPY, {})
    # The thread cannot take the queued version until the source's
    # FINISHED made this side forget the migration.
    with record._sync_cond:
        record.on_transition(Phase.COMMIT, Phase.CLEANUP, {})
        record.forget()
    record.close()
    assert j.entries() == []
    assert not os.path.exists(os.path.join(j.path, "m-1.json"))


def test_a_sync_behind_record_is_marked_before_it_is_written(
    tmp_path, monkeypatch
):
    # The mark (tmpfs: no writeback to fail) says COMMIT may have gone
    # even once a failed sync let the page cache drop the record; it
    # goes with the entry.
    j = journal.Journal(str(tmp_path), runtime_path=str(tmp_path / "run"))
    record = _committing(j)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    assert not j.marked("m-1", "b-1")
    append = j.append

    def seen(mid, line, **kwargs):
        assert j.marked("m-1", "b-1"), "appended before it was marked"
        append(mid, line, **kwargs)

    monkeypatch.setattr(j, "append", seen)
    record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    mark = os.path.join(j.runtime, "m-1.sent")
    assert os.stat(j.runtime).st_mode & 0o777 == 0o700
    assert j.marked("m-1", "b-1") and not j.marked("m-1", "b-2")
    record.on_transition(Phase.COMMIT, Phase.DONE, {})
    record.close()
    assert not os.path.exists(mark) and j.entries() == []


def test_a_mark_that_cannot_be_written_stops_commit(tmp_path):
    # Without the mark a lost record could let a restart resume the
    # copy here: COMMIT does not go (the transition fails, rollback).
    (tmp_path / "run").write_text("not a directory")
    j = journal.Journal(str(tmp_path), runtime_path=str(tmp_path / "run"))
    record = _committing(j)
    record.on_transition(Phase.STOP_AND_COPY, Phase.RESTORE, {})
    with pytest.raises(journal.JournalError, match="cannot write mark"):
        record.on_transition(Phase.RESTORE, Phase.COMMIT, {})
    record.close()
    assert j.read("m-1").phase == "restore"
