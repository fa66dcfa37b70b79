"""``nova-xen-ncm recover``: the journal it reads and what it prints."""

import json

import pytest

from nova_xen_ncm.cmd import main
from nova_xen_ncm.engine.journal import Journal


def run(capsys, *argv):
    status = main.main(["recover", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_without_a_journal_it_says_what_to_set(capsys):
    from nova_xen_ncm.conf import CONF

    CONF.set_override("state_path", "", group="xen_ncm")
    try:
        status, _, err = run(capsys)
    finally:
        CONF.clear_override("state_path", group="xen_ncm")
    assert status == 2
    assert "state_path" in err


def test_an_empty_journal_has_nothing_in_flight(tmp_path, capsys):
    status, out, _ = run(capsys, "--state-path", str(tmp_path))
    assert status == 0
    assert "nothing in flight" in out


def test_settles_and_prints_each_migration(tmp_path, capsys, journalled):
    journalled(tmp_path, "restore", domid=42, uuid="u-1", boot_id="")
    status, out, _ = run(
        capsys, "--state-path", str(tmp_path), "--host-driver", "sim", "--json"
    )
    # The guest is on neither host: an operator must start it.
    assert status == 1
    (outcome,) = json.loads(out)
    assert outcome["migration_id"] == "m-1"
    assert outcome["uuid"] == "u-1"
    assert outcome["role"] == "source" and outcome["skipped"] is False
    assert outcome["journalled"] == "restore"
    # The simulated host of a new process holds no domain 42.
    assert outcome["phase"] == "failed"
    assert outcome["guest"] == "nowhere"
    assert "no longer on" in outcome["reason"]
    assert Journal(str(tmp_path)).entries() == []


def test_a_damaged_journal_is_an_error(tmp_path, capsys):
    (tmp_path / "migrations").mkdir()
    # A whole line that is no version (an append cut short has no
    # newline, and is not an entry: tests/unit/engine/test_journal.py).
    (tmp_path / "migrations" / "m-2.json").write_text("not json\n")
    status, _, err = run(capsys, "--state-path", str(tmp_path))
    assert status == 2
    assert "m-2.json: unreadable" in err


def test_resolve_forgets_an_entry_and_says_so(tmp_path, capsys, journalled):
    journalled(tmp_path, "in_doubt", migration_id="m-3", domid=9)
    status, out, _ = run(
        capsys, "--state-path", str(tmp_path), "--resolve", "m-3", "--json"
    )
    assert status == 0
    assert json.loads(out)["resolved"] is True
    assert Journal(str(tmp_path)).entries() == []
    status, _, err = run(
        capsys, "--state-path", str(tmp_path), "--resolve", "m-3"
    )
    assert status == 2
    assert "no migration m-3" in err


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("nan", "not a number"),
        ("inf", "infinite"),
        ("-inf", "infinite"),
        ("-1", "negative"),
        ("soon", "a number of seconds"),
    ],
)
def test_answer_refuses_what_is_not_a_wait_by_name(capsys, text, named):
    with pytest.raises(SystemExit) as exit_:
        main.build_parser().parse_args(["recover", f"--answer={text}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--answer" in err and named in err and repr(text) in err, err


def test_answer_takes_zero_and_seconds():
    parse = main.build_parser().parse_args
    assert parse(["recover", "--answer", "0"]).answer == 0.0
    assert parse(["recover", "--answer", "2.5"]).answer == 2.5


@pytest.mark.parametrize(
    "guest, says",
    [
        ("", "IN_DOUBT: no answer"),
        ("destination or nowhere", "THE COPY HERE IS GONE"),
    ],
)
def test_an_in_doubt_line_says_where_the_guest_may_be(guest, says):
    from nova_xen_ncm.cmd import recover
    from nova_xen_ncm.engine.recovery import Outcome
    from nova_xen_ncm.engine.state import Phase

    outcome = Outcome(
        "m-1", 5, Phase.RESTORE, Phase.IN_DOUBT, "no answer", guest=guest
    )
    line = recover.outcome_line(outcome)
    assert says in line, line
    assert recover.exit_status([outcome]) == 1
