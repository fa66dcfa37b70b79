"""``openstack xen-ncm ...``: the OpenStackClient plugin, run as an
operator runs it (python-openstackclient's ``openstack`` console
script), for the commands that need no cloud: cliff's output formats and
the project's exit statuses."""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.parse
import uuid

import pytest

from nova_xen_ncm.cmd import EXIT_CONFIG
from nova_xen_ncm.cmd import EXIT_ENVIRONMENT
from nova_xen_ncm.cmd import EXIT_FAILED
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.engine.journal import INCOMING
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal

from ...conftest import delete_queue
from .conftest import HANG_LIMIT
from .conftest import one_line_error
from .conftest import popen
from .conftest import run

# How long the watches that see no migration wait.
QUIET = 20

# OpenStackClient reads clouds.yaml and the OS_* variables before any
# command runs: none of the machine's or the caller's reach these tests.
pytestmark = pytest.mark.usefixtures("no_cloud")


def openstack(*args: str, **kwargs):
    return run(*args, name="openstack", **kwargs)


@pytest.fixture
def state(tmp_path):
    """A state directory holding one outgoing and one incoming entry."""
    path = tmp_path / "state"
    path.mkdir()
    common = dict(
        host="192.0.2.7",
        token="cd" * 16,
        running=True,
        boot_id="boot",
    )
    Journal(str(path)).write(
        Entry(
            migration_id="out-1",
            domid=3,
            port=4711,
            uuid="u-out",
            phase="precopy",
            **common,
        )
    )
    Journal(str(path), INCOMING, IncomingEntry).write(
        IncomingEntry(
            migration_id="in-1",
            domid=8,
            port=4800,
            uuid="u-in",
            phase="commit",
            **common,
        )
    )
    return path


def test_the_commands_are_listed_in_help():
    result = openstack("help", "xen-ncm")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "xen-ncm host drain",
        "xen-ncm migration list",
        "xen-ncm migration show",
        "xen-ncm migration recover",
        "xen-ncm migration resolve",
        "xen-ncm migration watch",
    ):
        assert name in result.stdout, result.stdout


def test_list_in_every_format(state):
    where = ("migration", "list", "--state-path", str(state))
    as_json = openstack("xen-ncm", *where, "-f", "json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    rows = json.loads(as_json.stdout)
    assert [(r["ID"], r["Role"], r["Phase"], r["Peer"]) for r in rows] == [
        ("out-1", "source", "precopy", "192.0.2.7:4711"),
        ("in-1", "destination", "commit", "192.0.2.7:4800"),
    ]
    as_csv = openstack(
        "xen-ncm", *where, "-f", "csv", "-c", "ID", "-c", "Domain"
    )
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [
        ["ID", "Domain"],
        ["out-1", "3"],
        ["in-1", "8"],
    ]
    as_value = openstack("xen-ncm", *where, "-f", "value", "-c", "Server UUID")
    assert as_value.stdout == "u-out\nu-in\n"
    table = openstack("xen-ncm", *where, "-c", "ID", "-c", "Role")
    assert "| ID    | Role        |" in table.stdout, table.stdout
    assert "| in-1  | destination |" in table.stdout, table.stdout
    # The one-time token is a secret: in no format.
    for result in (as_json, as_csv, as_value, table):
        assert "cd" * 16 not in result.stdout
        assert result.stderr == ""


def test_show_and_resolve(state):
    shown = openstack(
        "xen-ncm",
        "migration",
        "show",
        "in-1",
        "--state-path",
        str(state),
        "-f",
        "json",
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout)["domain"] == 8
    assert json.loads(shown.stdout)["id"] == "in-1"
    resolved = openstack(
        "xen-ncm",
        "migration",
        "resolve",
        "out-1",
        "--state-path",
        str(state),
        "-f",
        "value",
        "-c",
        "resolved",
        "-c",
        "journalled",
    )
    assert (resolved.returncode, resolved.stdout) == (0, "precopy\nTrue\n")
    left = openstack(
        "xen-ncm",
        "migration",
        "list",
        "--state-path",
        str(state),
        "-f",
        "value",
        "-c",
        "ID",
    )
    assert left.stdout == "in-1\n"


def test_recover_with_nothing_in_flight(tmp_path):
    result = openstack(
        "xen-ncm",
        "migration",
        "recover",
        "--state-path",
        str(tmp_path),
        "-f",
        "json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == []
    assert result.stderr.endswith(f"nothing in flight in {tmp_path}\n")


def test_mistakes_have_the_projects_statuses(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    one_line_error(
        openstack(
            "xen-ncm",
            "migration",
            "show",
            "nosuch",
            "--state-path",
            str(tmp_path),
        ),
        EXIT_USAGE,
        "openstack xen-ncm migration show: error: no migration 'nosuch'",
    )
    one_line_error(
        openstack(
            "xen-ncm", "migration", "recover", "--state-path", str(missing)
        ),
        EXIT_USAGE,
        f"--state-path {missing}: no such directory",
    )
    one_line_error(
        openstack(
            "--os-xen-ncm-config-file",
            str(missing / "x.conf"),
            "xen-ncm",
            "migration",
            "list",
        ),
        EXIT_CONFIG,
        "cannot read configuration file(s)",
    )
    conf = tmp_path / "nova-xen-ncm.conf"
    conf.write_text(f"[xen_ncm]\nstate_path = {missing}\n")
    monkeypatch.setenv("OS_XEN_NCM_CONFIG_FILE", str(conf))
    one_line_error(
        openstack("xen-ncm", "migration", "list"),
        EXIT_CONFIG,
        f"[xen_ncm] state_path {missing}: no such directory",
    )
    # cliff's parser: the usage, then the error; argparse's status.
    bad = openstack("xen-ncm", "migration", "list", "--no-such-option")
    assert bad.returncode == EXIT_USAGE
    assert bad.stderr.splitlines()[-1].endswith(
        "error: unrecognized arguments: --no-such-option"
    )
    # A bus driver that is not installed: the environment.
    one_line_error(
        openstack(
            "xen-ncm",
            "migration",
            "watch",
            "--transport-url",
            "kafka://127.0.0.1:9092/",
            "--timeout",
            "5",
        ),
        EXIT_ENVIRONMENT,
        "'kafka'",
    )


def test_drain_without_a_cloud_or_with_one_out_of_reach():
    one_line_error(
        openstack("xen-ncm", "host", "drain", "compute-1"),
        EXIT_CONFIG,
        "the cloud connection is not configured",
    )
    # Port 9 (discard) on loopback: nothing listens there.
    one_line_error(
        openstack(
            "--os-auth-url",
            "http://127.0.0.1:9/v3",
            "--os-username",
            "admin",
            "--os-password",
            "secret",
            "--os-project-name",
            "admin",
            "--os-user-domain-name",
            "Default",
            "--os-project-domain-name",
            "Default",
            "xen-ncm",
            "host",
            "drain",
            "compute-1",
        ),
        EXIT_ENVIRONMENT,
        "cannot reach the cloud",
        # keystoneauth's own warning as it falls back to the URL's version.
        allow=("Failed to discover available identity versions",),
    )


def test_a_cloud_missing_from_clouds_yaml_stops_openstackclient_first(
    tmp_path,
):
    # OpenStackClient looks the cloud up before any command runs, even
    # one that needs no cloud: its own message and status, not ours.
    result = openstack(
        "--os-cloud",
        "nosuch",
        "xen-ncm",
        "migration",
        "list",
        "--state-path",
        str(tmp_path),
    )
    assert result.returncode == EXIT_FAILED, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["Cloud nosuch was not found."]


def delete_exchange(url: str, name: str) -> None:
    import kombu

    amqp = urllib.parse.urlsplit(url)._replace(scheme="amqp").geturl()
    with kombu.Connection(amqp) as connection:
        connection.default_channel.exchange_delete(name)


@pytest.mark.integration
def test_watch_on_the_bus(rabbit_url, tmp_path):
    pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
    # An exchange of the test's own: other migrations published on the
    # same broker (Nova's exchange) are not this test's.
    exchange = pool
    conf = tmp_path / "bus.conf"
    conf.write_text(f"[DEFAULT]\ncontrol_exchange = {exchange}\n")
    try:
        # Nothing ends within the bound: an empty list, or with --once
        # a failure. The bound counts from the command's start and must
        # cover connecting to the broker on a busy machine.
        quiet = openstack(
            "xen-ncm",
            "migration",
            "watch",
            "--transport-url",
            rabbit_url,
            "--exchange",
            exchange,
            "--pool",
            pool,
            "--timeout",
            str(QUIET),
            "-f",
            "json",
        )
        assert quiet.returncode == 0, quiet.stderr[-3000:]
        assert json.loads(quiet.stdout) == []
        assert f"listening in pool {pool}" in quiet.stderr
        once = openstack(
            "xen-ncm",
            "migration",
            "watch",
            "--transport-url",
            rabbit_url,
            "--exchange",
            exchange,
            "--pool",
            pool,
            "--once",
            "--timeout",
            str(QUIET),
        )
        one_line_error(
            once,
            EXIT_FAILED,
            f"no migration ended within {QUIET} seconds",
            allow=("openstack xen-ncm migration watch: listening in pool",),
        )
        # A migration the demo publishes: its end is the one row.
        errors = tmp_path / "watch.err"
        with errors.open("w") as stderr:
            watcher = popen(
                "xen-ncm",
                "migration",
                "watch",
                "--transport-url",
                rabbit_url,
                "--exchange",
                exchange,
                "--pool",
                pool,
                "--once",
                "--timeout",
                str(HANG_LIMIT),
                "-f",
                "json",
                name="openstack",
                stderr=stderr,
            )
            try:
                deadline = time.monotonic() + HANG_LIMIT
                while "listening in pool" not in errors.read_text():
                    assert watcher.poll() is None, errors.read_text()
                    assert time.monotonic() < deadline, "never listened"
                    time.sleep(0.1)
                demo = run(
                    "--config-file",
                    str(conf),
                    "demo",
                    "--memory",
                    "64M",
                    "--transport-url",
                    rabbit_url,
                    "--json",
                )
                assert demo.returncode == 0, demo.stderr[-3000:]
                out, _ = watcher.communicate(timeout=HANG_LIMIT)
            finally:
                if watcher.poll() is None:
                    watcher.kill()
                    watcher.wait()
        assert watcher.returncode == 0, errors.read_text()[-3000:]
        migration_id = json.loads(demo.stdout)["stats"]["migration_id"]
        rows = json.loads(out)
        source = [r for r in rows if r["Role"] == "source"]
        assert [(r["ID"], r["Outcome"]) for r in source] == [
            (migration_id, "done")
        ], rows
        # The progress went to stderr as it came.
        assert f"{migration_id} (source)" in errors.read_text()
    finally:
        delete_queue(rabbit_url, pool)
        delete_exchange(rabbit_url, exchange)
