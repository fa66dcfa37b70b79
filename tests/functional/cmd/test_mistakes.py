"""The mistakes a new operator makes, each run through the console script
as a subprocess: one line on stderr naming what was wrong, the exit
status of its kind (2 usage, 3 configuration file, 4 environment) and no
traceback from any process."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from nova_xen_ncm.cmd import EXIT_CONFIG
from nova_xen_ncm.cmd import EXIT_ENVIRONMENT
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.cmd import demo
from nova_xen_ncm.cmd import main

from .conftest import HANG_LIMIT
from .conftest import one_line_error
from .conftest import popen
from .conftest import run

# Only bounds a hung command; nothing is asserted about it.

COMMANDS = [name.rsplit(".", 1)[1] for name in main.SUBCOMMANDS]
COMMANDS.insert(COMMANDS.index("migrate") + 1, "receive")
COMMANDS.insert(COMMANDS.index("save") + 1, "restore")


# -- addresses --------------------------------------------------------------


def test_listen_on_what_is_not_an_address(tmp_path):
    result = run(
        "receive",
        "--token-file",
        str(tmp_path / "token"),
        "--listen",
        "notanaddress",
        "--no-hold",
    )
    one_line_error(result, EXIT_USAGE, "'notanaddress' is not an address")
    assert not (tmp_path / "token").exists()


def test_listen_on_an_address_this_host_does_not_have(tmp_path):
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never a local address.
    result = run(
        "receive",
        "--token-file",
        str(tmp_path / "token"),
        "--listen",
        "192.0.2.77",
        "--no-hold",
    )
    line = one_line_error(
        result, EXIT_ENVIRONMENT, "cannot listen", "192.0.2.77"
    )
    assert line.count("cannot listen") == 1, line
    assert not (tmp_path / "token").exists()


def test_a_listen_address_in_a_file_that_is_not_one(tmp_path):
    path = tmp_path / "listen.conf"
    path.write_text("[xen_ncm]\nlisten_address = notanaddr\n")
    result = run(
        "--config-file",
        str(path),
        "receive",
        "--token-file",
        str(tmp_path / "token"),
        "--no-hold",
    )
    one_line_error(
        result, EXIT_CONFIG, str(path), "[xen_ncm] listen_address", "notanaddr"
    )
    assert not (tmp_path / "token").exists()


# -- transport URLs ---------------------------------------------------------


@pytest.mark.parametrize("command", ["watch", "demo"])
def test_what_is_not_a_transport_url(command):
    result = run(command, "--transport-url", "notaurl")
    one_line_error(result, EXIT_USAGE, "notaurl is not a transport URL")


def test_a_transport_without_a_driver():
    result = run("watch", "--transport-url", "nosuchbus://h:1/")
    one_line_error(
        result, EXIT_ENVIRONMENT, "no message bus driver for 'nosuchbus'"
    )


def test_a_transport_whose_driver_is_not_installed():
    if importlib.util.find_spec("confluent_kafka") is not None:
        pytest.skip("confluent_kafka is installed: kafka:// has a driver")
    result = run("watch", "--transport-url", "kafka://h:9092/")
    one_line_error(result, EXIT_ENVIRONMENT, "'kafka'", "No module named")


def test_demo_uses_the_transport_of_its_configuration_file(tmp_path):
    # Checked before any host starts, as --transport-url is: the demo
    # read the file's URL.
    conf = tmp_path / "bus.conf"
    conf.write_text(
        "[oslo_messaging_notifications]\ntransport_url = nosuchbus://h:1/\n"
    )
    result = run("--config-file", str(conf), "demo")
    one_line_error(
        result, EXIT_ENVIRONMENT, "no message bus driver for 'nosuchbus'"
    )


def test_receive_refuses_a_bad_transport_url_before_listening(tmp_path):
    token = tmp_path / "token"
    result = run(
        "receive",
        "--token-file",
        str(token),
        "--listen",
        "127.0.0.1",
        "--no-hold",
        "--transport-url",
        "notaurl",
    )
    one_line_error(result, EXIT_USAGE, "not a transport URL")
    assert not token.exists()


# -- configuration files ----------------------------------------------------


def test_a_missing_configuration_file():
    result = run("--config-file", "/nonexistent/x.conf", "recover")
    one_line_error(result, EXIT_CONFIG, "cannot read", "/nonexistent/x.conf")


def test_a_configuration_file_with_a_bad_value(tmp_path):
    path = tmp_path / "bad-value.conf"
    path.write_text("[xen_ncm]\nchannels = many\n")
    result = run("--config-file", str(path), "recover")
    one_line_error(
        result, EXIT_CONFIG, str(path), "[xen_ncm] channels", "'many'"
    )


@pytest.mark.parametrize(
    "command",
    [["demo"], ["migrate", "1", "--token-file", "t"], ["recover"]],
)
def test_a_precopy_policy_that_is_not_installed(tmp_path, command):
    # Found before anything starts, not inside a host process.
    path = tmp_path / "policy.conf"
    path.write_text("[xen_ncm]\nprecopy_policy = nonsense\n")
    result = run("--config-file", str(path), *command)
    one_line_error(
        result,
        EXIT_CONFIG,
        str(path),
        "[xen_ncm] precopy_policy",
        "'nonsense'",
        "downtime",
    )


def test_a_configuration_file_with_bad_syntax(tmp_path):
    path = tmp_path / "bad-syntax.conf"
    path.write_text("[xen_ncm\nchannels = 2\n")
    result = run("--config-file", str(path), "recover")
    one_line_error(result, EXIT_CONFIG, str(path), "cannot be parsed")


# -- sizes and rates --------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--memory", "12x"], ["'12x' is not a size"]),
        (["--memory", "1K"], ["'1K'", "whole number of MiB"]),
        (["--memory", "64"], ["'64'", "without a unit is bytes"]),
        (["--dirty-rate", "2"], ["'2' has no unit", "50%"]),
        (["--dirty-rate", "1.5"], ["'1.5' has no unit"]),
        (["--dirty-rate", "150%"], ["more than 100%"]),
    ],
)
def test_bad_sizes_and_rates(args, words):
    result = run("demo", *args)
    line = one_line_error(result, EXIT_USAGE, *words)
    assert line.startswith("nova-xen-ncm demo: error: argument")


@pytest.mark.parametrize("command", ["save", "migrate"])
def test_a_percent_rate_outside_the_demo(tmp_path, command):
    # Only the demo measures a bandwidth to take a share of.
    tail = ["--token-file", "t"]
    if command == "save":
        tail = [str(tmp_path / "s")]
    result = run(command, "g", "--create", "--dirty-rate", "50%", *tail)
    line = one_line_error(result, EXIT_USAGE, "'50%' is not a rate", "64M")
    assert "percent" not in line


def test_demo_save_to_a_directory_is_refused_up_front(tmp_path):
    result = run("demo", "--save", str(tmp_path))
    one_line_error(result, EXIT_USAGE, str(tmp_path), "is a directory")
    assert result.stdout == ""


def test_sizes_take_k():
    # 1K is a rate of 1024 bytes per second; 65536K is a 64 MiB guest.
    result = run("demo", "--memory", "65536K", "--dirty-rate", "1K", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["completed"] and report["transparent"]
    assert report["settings"]["guest"].startswith("64 MiB")
    assert report["settings"]["workload"].startswith("0.0 MiB/s (given)")


def test_a_guest_larger_than_free_memory_is_refused_up_front():
    available = demo.available_memory()
    if available is None:
        pytest.skip("no MemAvailable in /proc/meminfo on this system")
    if available >= demo.needed_memory(10 << 40):
        pytest.skip("this machine can hold a 10 TiB guest twice")
    result = run("demo", "--memory", "10T")
    line = one_line_error(
        result,
        EXIT_ENVIRONMENT,
        "a 10.0 TiB guest needs about 20.0 TiB of free memory",
        "available",
        "give a smaller --memory",
    )
    # Refused before any host started: nothing but the line.
    assert result.stdout == ""
    assert line.startswith("nova-xen-ncm demo: error:")


def test_save_create_checks_memory_up_front(tmp_path):
    available = demo.available_memory()
    if available is None:
        pytest.skip("no MemAvailable in /proc/meminfo on this system")
    if available >= demo.needed_memory(10 << 40, hosts=1):
        pytest.skip("this machine can hold a 10 TiB guest")
    result = run(
        "save", "big", "--create", "--memory", "10T", str(tmp_path / "s")
    )
    one_line_error(
        result,
        EXIT_ENVIRONMENT,
        "a 10.0 TiB guest needs about 10.0 TiB of free memory",
        "the simulated host",
        "give a smaller --memory",
    )
    assert result.stdout == ""
    assert not (tmp_path / "s").exists()


# -- files ------------------------------------------------------------------


def test_a_truncated_save_file_is_called_truncated(tmp_path):
    path = tmp_path / "guest.xl"
    saved = run("save", "g", str(path), "--create", "--memory", "32M")
    assert saved.returncode == 0, saved.stderr[-3000:]
    data = path.read_bytes()
    for cut in (100, len(data) // 2):
        path.write_bytes(data[:cut])
        result = run("restore", str(path), "--no-hold")
        one_line_error(result, EXIT_USAGE, "truncated")


def test_a_token_file_is_removed_once_used(tmp_path):
    token = tmp_path / "token.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token),
        "--listen",
        "127.0.0.1",
        "--no-hold",
    )
    try:
        deadline = time.monotonic() + HANG_LIMIT
        while not token.exists():
            assert receiver.poll() is None, receiver.communicate()[1]
            assert time.monotonic() < deadline, "no token file written"
            time.sleep(0.05)
        copy = tmp_path / "copied-to-the-source.json"
        copy.write_bytes(token.read_bytes())
        source = run(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "32M",
            "--token-file",
            str(copy),
        )
        _, err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert source.returncode == 0, source.stderr[-3000:]
    assert receiver.returncode == 0, err[-3000:]
    # Both ends removed their copy of the spent token.
    assert not token.exists() and not copy.exists()
    again = run("migrate", "guest", "--create", "--token-file", str(copy))
    one_line_error(again, EXIT_USAGE, "cannot read token file")


# -- commands ---------------------------------------------------------------


def test_recover_json_with_nothing_in_flight(tmp_path):
    result = run("recover", "--json", "--state-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == []


def test_recover_refuses_a_state_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nonexistent"
    result = run("recover", "--state-path", str(missing))
    one_line_error(result, EXIT_USAGE, str(missing), "no such directory")
    assert not missing.exists()
    conf = tmp_path / "x.conf"
    conf.write_text(f"[xen_ncm]\nstate_path = {missing}\n")
    result = run("--config-file", str(conf), "recover")
    one_line_error(
        result, EXIT_CONFIG, "state_path", str(missing), "no such directory"
    )
    assert not missing.exists()


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("nova-xen-ncm ")
    assert result.stdout.split()[1][0].isdigit(), result.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_quiet_plain_text(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0
    # No deprecation notice from a dependency, nothing else either.
    assert result.stderr == ""
    for markup in ("``", ":mod:", ":class:", ":func:", ".. "):
        assert markup not in result.stdout, markup
    if command is None:
        for name in COMMANDS:
            assert f"    {name} " in result.stdout, name
        assert "exit status:" in result.stdout


@pytest.mark.integration
def test_watch_timeout_is_honoured(rabbit_url, tmp_path):
    from ...conftest import delete_queue

    pool = f"nova-xen-ncm-test-{tmp_path.name}"
    # Long enough to start and connect on a loaded machine.
    timeout = 10.0
    started = time.monotonic()
    try:
        result = run(
            "watch",
            "--transport-url",
            rabbit_url,
            "--pool",
            pool,
            "--migration",
            "none",
            "--timeout",
            f"{timeout:g}",
        )
    finally:
        delete_queue(rabbit_url, pool)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"nova-xen-ncm watch: listening in pool {pool}"
    ]
    # The timeout counts from the start; what is allowed beyond it is
    # the interpreter's start and the bounded wait for the listener.
    assert elapsed < timeout + 4.0, elapsed
