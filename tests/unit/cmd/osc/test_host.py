"""``openstack xen-ncm host drain``: its parser, and its table, JSON and
exit status against the in-memory compute API of drain's own tests."""

from __future__ import annotations

import json

import pytest

from nova_xen_ncm.cmd import EXIT_CONFIG
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.cmd.osc import host

from ..test_drain import FakeCompute
from ..test_drain import conn_of
from .conftest import App
from .conftest import invoke

NAME = "xen-ncm host drain"
# The command's own connect(), before the tests replace it.
REAL_CONNECT = host.connect


@pytest.fixture
def fast(tmp_path):
    """A configuration file with no waiting between polls and retries."""
    path = tmp_path / "nova-xen-ncm.conf"
    path.write_text("[xen_ncm_drain]\npoll_interval = 0.01\nretry_delay = 0\n")
    return [str(path)]


@pytest.fixture(autouse=True)
def cloud(monkeypatch):
    """The compute API the command connects to, for this test."""
    connected = {}

    def connect(app):
        return connected["conn"]

    monkeypatch.setattr(host, "connect", connect)
    return connected


@pytest.fixture
def drain(cloud):
    def drain(compute, argv, config_files):
        cloud["conn"] = conn_of(compute)
        app = App(config_files=config_files)
        return invoke(host.DrainHost, argv, app=app, name=NAME)

    return drain


def parser():
    return host.DrainHost(App(), None, cmd_name=NAME).get_parser(
        f"openstack {NAME}"
    )


def test_parser_defaults_and_options():
    parsed = parser().parse_args(["compute-1"])
    assert parsed.host == "compute-1"
    assert parsed.reason == "drained by nova-xen-ncm drain"
    assert parsed.concurrency is None and parsed.retries is None
    assert not parsed.dry_run
    parsed = parser().parse_args(
        ["compute-1", "--concurrency", "3", "--retries", "0", "--dry-run"]
    )
    assert (parsed.concurrency, parsed.retries, parsed.dry_run) == (
        3,
        0,
        True,
    )


@pytest.mark.parametrize(
    "argv", [["h", "--concurrency", "0"], ["h", "--retries", "-1"], []]
)
def test_parser_refuses_bad_counts_as_a_usage_mistake(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == EXIT_USAGE


def test_json_lists_each_server_and_the_status_says_one_was_left(
    fast, capsys, drain
):
    compute = FakeCompute(
        [("a", "ACTIVE"), ("b", "ACTIVE"), ("c", "SHUTOFF")],
        failures={"b": 9},
    )
    status, out = drain(
        compute, ["host1", "--retries", "0", "-f", "json"], fast
    )
    rows = {row["Server"]: row for row in json.loads(out)}
    assert status == 1
    assert rows["a"]["Outcome"] == "migrated"
    assert rows["a"]["Destination"] == "host2"
    assert rows["b"]["Outcome"] == "failed"
    assert rows["b"]["Attempts"] == 1
    assert rows["c"]["Outcome"] == "skipped"
    assert "SHUTOFF" in rows["c"]["Error"]
    assert list(rows["a"]) == list(host.RESULT_COLUMNS)
    # Progress and the summary are on stderr, never in the document.
    err = capsys.readouterr().err
    assert "a vm-a: migrated to host2" in err
    assert "2 server(s) left on host1: b, c" in err
    assert compute.disabled, "the service was not disabled"


def test_value_and_columns_print_the_chosen_cells(fast, drain):
    compute = FakeCompute([("a", "ACTIVE")])
    status, out = drain(
        compute,
        ["host1", "-f", "value", "-c", "Server", "-c", "Destination"],
        fast,
    )
    assert status == 0
    assert out == "a host2\n"


def test_dry_run_lists_the_plan_and_changes_nothing(fast, drain):
    compute = FakeCompute([("a", "ACTIVE"), ("b", "PAUSED"), ("c", "ERROR")])
    status, out = drain(compute, ["host1", "--dry-run", "-f", "csv"], fast)
    assert out.splitlines() == [
        '"Server","Name","Status","Action"',
        '"a","vm-a","ACTIVE","live-migrate"',
        '"b","vm-b","PAUSED","live-migrate"',
        '"c","vm-c","ERROR","skip: ERROR servers cannot be live-migrated"',
    ]
    # c would stay on the host.
    assert status == 1
    assert not compute.disabled
    assert not compute.migration_list


def test_a_mistake_is_one_line_with_its_status(fast, capsys, drain):
    status, out = drain(FakeCompute([]), ["nosuch"], fast)
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert out == ""
    assert err == (
        "openstack xen-ncm host drain: error: unknown host 'nosuch': no "
        "Nova service runs there (compute hosts: host1, host2)\n"
    )


def test_a_configuration_file_that_cannot_be_read(tmp_path, capsys, drain):
    missing = str(tmp_path / "missing.conf")
    status, out = drain(FakeCompute([]), ["host1"], [missing])
    assert status == EXIT_CONFIG
    assert missing in capsys.readouterr().err


def test_a_cloud_that_is_not_configured_is_a_configuration_problem(
    monkeypatch, capsys
):
    # The real connect(), with OpenStackClient's own configuration
    # loader and no cloud configured anywhere (the no_cloud fixture).
    from openstack import config as os_config

    monkeypatch.setattr(host, "connect", REAL_CONNECT)
    app = App()
    app.cloud_config = os_config.OpenStackConfig()
    app.options.cloud = None
    status, out = invoke(host.DrainHost, ["host1"], app=app, name=NAME)
    err = capsys.readouterr().err
    assert status == EXIT_CONFIG, err
    assert err.startswith(
        "openstack xen-ncm host drain: error: cannot connect to the cloud: "
        "the cloud connection is not configured"
    ), err
    assert len(err.splitlines()) == 1, err


def test_a_column_that_is_not_there_stops_the_drain_before_it_starts(
    fast, capsys, drain
):
    compute = FakeCompute([("a", "ACTIVE")])
    status, out = drain(compute, ["host1", "-c", "Sever"], fast)
    assert (status, out) == (EXIT_USAGE, "")
    assert capsys.readouterr().err == (
        "openstack xen-ncm host drain: error: -c Sever: no such column "
        f"(columns: {', '.join(host.RESULT_COLUMNS)})\n"
    )
    assert not compute.disabled
    assert not compute.migration_list
    # cliff's matching: case and spaces do not matter; a dry run has
    # the plan's columns.
    status, out = drain(
        compute, ["host1", "--dry-run", "-c", "action", "-f", "value"], fast
    )
    assert (status, out) == (0, "live-migrate\n")
    status, _ = drain(compute, ["host1", "--dry-run", "-c", "Outcome"], fast)
    assert status == EXIT_USAGE
