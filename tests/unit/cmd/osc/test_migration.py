"""``openstack xen-ncm migration ...``: parsers, the rows made of the
journals and of the bus's end notifications, and the exit statuses."""

from __future__ import annotations

import datetime
import json
import signal

import pytest

from nova_xen_ncm.cmd import EXIT_CONFIG
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.cmd import Interrupted
from nova_xen_ncm.cmd import watch
from nova_xen_ncm.cmd.osc import migration
from nova_xen_ncm.engine.journal import INCOMING
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.progress import tracker

from .conftest import App
from .conftest import invoke


def entry(cls, mid, domid, phase, port=4711):
    return cls(
        migration_id=mid,
        domid=domid,
        host="192.0.2.7",
        port=port,
        token="ab" * 16,
        running=True,
        uuid=f"uuid-{mid}",
        boot_id="boot",
        phase=phase,
    )


@pytest.fixture
def journals(tmp_path):
    """A state directory with two outgoing and one incoming entry; the
    journal stamps each with the time it was written."""
    outgoing = Journal(str(tmp_path))
    outgoing.write(entry(Entry, "m-1", 5, "precopy"))
    outgoing.write(entry(Entry, "m-2", 7, "stop_and_copy"))
    Journal(str(tmp_path), INCOMING, IncomingEntry).write(
        entry(IncomingEntry, "m-3", 9, "commit", port=4800)
    )
    return tmp_path


def test_list_shows_every_entry_oldest_first_sources_then_destinations(
    journals,
):
    status, out = invoke(
        migration.ListMigrations,
        ["--state-path", str(journals), "-f", "json"],
    )
    rows = json.loads(out)
    assert status == 0
    assert [(r["ID"], r["Role"]) for r in rows] == [
        ("m-1", "source"),
        ("m-2", "source"),
        ("m-3", "destination"),
    ]
    written = datetime.datetime.fromtimestamp(
        Journal(str(journals)).read("m-1").updated, tz=datetime.timezone.utc
    )
    assert rows[0] == {
        "ID": "m-1",
        "Role": "source",
        "Domain": 5,
        "Server UUID": "uuid-m-1",
        "Phase": "precopy",
        "Peer": "192.0.2.7:4711",
        "Running": True,
        "Updated": written.isoformat(timespec="seconds"),
    }
    # The one-time token is a secret: never shown.
    assert "ab" * 16 not in out


def test_show_one_entry_and_a_missing_one(journals, capsys):
    status, out = invoke(
        migration.ShowMigration,
        ["m-3", "--state-path", str(journals), "-f", "value", "-c", "peer"],
    )
    assert (status, out) == (0, "192.0.2.7:4800\n")
    # snake_case fields and an id, as OpenStackClient's show commands.
    status, out = invoke(
        migration.ShowMigration,
        ["m-3", "--state-path", str(journals), "-f", "json"],
    )
    assert status == 0
    assert list(json.loads(out)) == [
        "id",
        "role",
        "domain",
        "server_uuid",
        "phase",
        "peer",
        "running",
        "updated",
    ]
    assert json.loads(out)["id"] == "m-3"
    status, out = invoke(
        migration.ShowMigration,
        ["m-9", "--state-path", str(journals)],
        name="xen-ncm migration show",
    )
    assert status == EXIT_USAGE
    assert capsys.readouterr().err == (
        "openstack xen-ncm migration show: error: no migration 'm-9' in "
        f"the journals of {journals}\n"
    )


def test_resolve_forgets_the_entry_and_shows_what_it_held(journals):
    status, out = invoke(
        migration.ResolveMigration,
        ["m-2", "--state-path", str(journals), "-f", "json"],
    )
    assert status == 0
    assert json.loads(out) == {
        "id": "m-2",
        "domain": 7,
        "server_uuid": "uuid-m-2",
        "journalled": "stop_and_copy",
        "resolved": True,
    }
    assert Journal(str(journals)).read("m-2") is None
    assert Journal(str(journals)).read("m-1") is not None


def test_recover_with_nothing_in_flight(tmp_path, capsys):
    status, out = invoke(
        migration.RecoverMigrations,
        ["--state-path", str(tmp_path), "-f", "json"],
    )
    assert (status, json.loads(out)) == (0, [])
    assert f"nothing in flight in {tmp_path}" in capsys.readouterr().err


def test_recover_settles_says_each_outcome_and_lists_them(tmp_path, capsys):
    # Before the pause: COMMIT cannot have followed, nothing to ask.
    Journal(str(tmp_path)).write(entry(Entry, "m-1", 42, "precopy"))
    status, out = invoke(
        migration.RecoverMigrations,
        [
            "--state-path",
            str(tmp_path),
            "--host-driver",
            "sim",
            "--answer",
            "0",
            "-f",
            "json",
        ],
    )
    # Its guest runs on neither host: an operator must act.
    assert status == 1
    (row,) = json.loads(out)
    assert (row["ID"], row["Role"], row["Journalled"]) == (
        "m-1",
        "source",
        "precopy",
    )
    # Journalled by another boot of the host: its domain 42 is gone.
    assert row["Phase"] == "failed"
    assert "domain 42 is gone" in row["Reason"]
    assert row["Reason"].startswith("the guest runs nowhere")
    # Said on stderr as settled, before any wait for commit queries.
    (said,) = capsys.readouterr().err.splitlines()
    assert said.endswith(
        "m-1 (source, domain 42, journalled in PRECOPY): FAILED, THE GUEST "
        "RUNS NOWHERE: " + row["Reason"]
    ), said
    assert Journal(str(tmp_path)).entries() == []


def test_recover_after_a_reboot_past_the_pause_keeps_it_in_doubt(
    tmp_path, capsys
):
    # COMMIT may have gone with its record unsynced when the host
    # crashed: the destination (unreachable here) is asked for its
    # lease, and the operator is told the copy here is gone and to
    # check the destination, not to start the guest from its disk.
    Journal(str(tmp_path)).write(entry(Entry, "m-1", 42, "restore", port=1))
    conf = tmp_path / "nova-xen-ncm.conf"
    conf.write_text(
        "[xen_ncm]\nio_timeout = 0.2\ntransfer_retry_timeout = 0.2\n"
        "connect_timeout = 0.2\nretry_max_delay = 0.05\n"
    )
    status, out = invoke(
        migration.RecoverMigrations,
        [
            "--state-path",
            str(tmp_path),
            "--host-driver",
            "sim",
            "--answer",
            "0",
            "-f",
            "json",
        ],
        app=App(config_files=[str(conf)]),
    )
    assert status == 1
    (row,) = json.loads(out)
    assert (row["Journalled"], row["Phase"]) == ("restore", "in_doubt")
    assert "the guest may run on the destination" in row["Reason"]
    (said,) = capsys.readouterr().err.splitlines()
    assert "IN_DOUBT, THE COPY HERE IS GONE" in said, said
    (kept,) = Journal(str(tmp_path)).entries()
    assert kept.phase == "in_doubt"


def test_a_state_path_that_is_not_there(tmp_path, capsys):
    missing = tmp_path / "missing"
    status, _ = invoke(
        migration.RecoverMigrations, ["--state-path", str(missing)]
    )
    assert status == EXIT_USAGE
    conf = tmp_path / "nova-xen-ncm.conf"
    conf.write_text(f"[xen_ncm]\nstate_path = {missing}\n")
    status, _ = invoke(
        migration.ListMigrations,
        [],
        app=App(config_files=[str(conf)]),
        name="xen-ncm migration list",
    )
    assert status == EXIT_CONFIG
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"openstack xen-ncm command: error: --state-path {missing}: no "
        "such directory",
        "openstack xen-ncm migration list: error: [xen_ncm] state_path "
        f"{missing}: no such directory",
    ]


def test_watch_parser():
    parser = migration.WatchMigrations(App(), None).get_parser("watch")
    parsed = parser.parse_args(
        ["--once", "--timeout", "2.5", "--exchange", "nova", "--pool", "p"]
    )
    assert (parsed.once, parsed.timeout, parsed.exchange, parsed.pool) == (
        True,
        2.5,
        "nova",
        "p",
    )
    assert parser.parse_args([]).pool.startswith("nova-xen-ncm-watch.")
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--timeout", bad])
        assert exc.value.code == EXIT_USAGE


def test_an_end_notification_is_one_row():
    data = {
        "migration_id": "m-1",
        "role": "source",
        "outcome": "done",
        "instance_uuid": "inst",
        "source_host": "cmp1",
        "destination_host": "cmp2",
        "statistics": {
            "total_time": 12.5,
            "actual_downtime": 0.08,
            "retries": 1,
        },
    }
    row = dict(
        zip(migration.ENDED_COLUMNS, migration.ended_row(data), strict=True)
    )
    assert row == {
        "ID": "m-1",
        "Role": "source",
        "Outcome": "done",
        "Server UUID": "inst",
        "Source": "cmp1",
        "Destination": "cmp2",
        "Total Time": 12.5,
        "Downtime": 0.08,
        "Retries": 1,
        "Reason": None,
    }
    # A destination's end may carry no statistics.
    bare = migration.ended_row(
        {"migration_id": "m-2", "role": "destination", "outcome": "failed"}
    )
    assert bare[:3] == ("m-2", "destination", "failed")
    assert bare[6:9] == (None, None, 0)


@pytest.mark.parametrize("once", [False, True])
def test_an_interrupted_watch(monkeypatch, capsys, once):
    # The bus is replaced: one migration ends, then Ctrl-C comes.
    def follow(conf, watching, **kwargs):
        watching.feed(
            "xen_ncm.migration.end",
            tracker.envelope(
                "MigrationEndPayload",
                {"migration_id": "m-1", "role": "source", "outcome": "done"},
            ),
        )
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(watch, "follow", follow)
    argv = ["-f", "value", "-c", "ID", "-c", "Outcome"]
    status, out = invoke(
        migration.WatchMigrations,
        argv + (["--once"] if once else []),
        name="xen-ncm migration watch",
    )
    err = capsys.readouterr().err.splitlines()
    assert status == 128 + signal.SIGINT
    assert err[-1] == (
        "openstack xen-ncm migration watch: interrupted by SIGINT"
    ), err
    # Without --once, Ctrl-C is how a watch ends: what it saw is listed.
    # With --once it was waiting for an outcome: nothing is.
    assert out == ("" if once else "m-1 done\n")


@pytest.mark.parametrize("text", ["nan", "inf", "-3"])
def test_recover_answer_refuses_what_is_not_a_wait(text, capsys):
    with pytest.raises(SystemExit):
        invoke(migration.RecoverMigrations, [f"--answer={text}"])
    assert "argument --answer: must be" in capsys.readouterr().err
