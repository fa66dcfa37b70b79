"""The source's journal of migrations in flight."""

from __future__ import annotations

import json
import os

import pytest

from nova_xen_ncm.engine import journal
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent


def entry(mid="m-1"):
    return journal.Entry(
        migration_id=mid,
        domid=7,
        host="192.0.2.1",
        port=49152,
        token="ab" * 32,
        running=True,
    )


def state(phase, **detail):
    return ProgressEvent(
        migration_id="m-1",
        kind=EventKind.STATE,
        phase=phase.value,
        timestamp=0.0,
        detail=detail,
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


def test_sink_follows_phases_and_forgets_settled_migrations(tmp_path):
    j = journal.Journal(str(tmp_path))
    sink = journal.JournalSink(j, entry())
    sink.emit(state(Phase.PRECOPY, running=False))
    assert j.entries()[0].phase == "precopy"
    assert j.entries()[0].running is False
    sink.decide_commit()
    assert j.entries()[0].phase == "commit"
    sink.emit(state(Phase.IN_DOUBT))
    assert j.entries()[0].phase == "in_doubt"
    sink.emit(state(Phase.DONE))
    assert j.entries() == []


@pytest.mark.parametrize("mid", ["../escape", "", "a/b"])
def test_migration_ids_cannot_leave_the_directory(tmp_path, mid):
    with pytest.raises(journal.JournalError, match="cannot name"):
        journal.Journal(str(tmp_path)).write(entry(mid))


def test_an_entry_without_the_guest_s_uuid_is_read(tmp_path):
    # Written before the uuid was recorded: still settled by domid.
    j = journal.Journal(str(tmp_path))
    j.write(entry())
    path = os.path.join(j.path, "m-1.json")
    with open(path) as f:
        data = json.load(f)
    assert data.pop("uuid") == ""
    with open(path, "w") as f:
        json.dump(data, f)
    (got,) = j.entries()
    assert got.uuid == "" and got.domid == 7


def test_the_sink_records_the_guest_s_uuid(tmp_path):
    from oslo_config import cfg

    from nova_xen_ncm.conf import register_opts

    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("state_path", str(tmp_path), group="xen_ncm")
    sink = journal.sink_from_conf(
        conf, "m-3", 9, ("192.0.2.1", 1), b"\x01" * 32, uuid="guest-uuid"
    )
    sink.emit(state(Phase.PRECOPY))
    (got,) = journal.Journal(str(tmp_path)).entries()
    assert got.uuid == "guest-uuid" and got.domid == 9


def test_a_damaged_entry_is_named(tmp_path):
    j = journal.Journal(str(tmp_path))
    with open(os.path.join(j.path, "m-2.json"), "w") as f:
        f.write('{"version": 1, "migration_id": "m-2"}')
    with pytest.raises(journal.JournalError, match="m-2.json: missing"):
        j.entries()


def test_a_journal_that_cannot_be_written_blocks_the_commit(tmp_path):
    j = journal.Journal(str(tmp_path))
    sink = journal.JournalSink(j, entry())
    # The entry's name is taken by a directory: the rename fails.
    os.mkdir(os.path.join(j.path, "m-1.json"))
    with pytest.raises(journal.JournalError, match="cannot write"):
        sink.decide_commit()
