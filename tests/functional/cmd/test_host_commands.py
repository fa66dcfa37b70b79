"""``receive``/``migrate`` and ``save``/``restore`` on the simulated host,
run as a user runs them, and the host driver factory."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import pytest

from nova_xen_ncm.cmd import EXIT_FAILED
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.cmd import demo
from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory

from .conftest import HANG_LIMIT
from .conftest import one_line_error
from .conftest import popen
from .conftest import run


def wait_for_file(path: pathlib.Path, process: subprocess.Popen) -> None:
    """Until ``receive`` wrote the token file (or died)."""
    deadline = time.monotonic() + HANG_LIMIT
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"receive exited {process.returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("receive never wrote its token file")
        time.sleep(0.05)


def test_receive_and_migrate(tmp_path):
    token_file = tmp_path / "token.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token_file),
        "--listen",
        "127.0.0.1",
        "--no-hold",
    )
    try:
        wait_for_file(token_file, receiver)
        data = json.loads(token_file.read_text())
        assert token_file.stat().st_mode & 0o077 == 0
        host, port = data["endpoint"]
        source = run(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "32M",
            "--token-file",
            str(token_file),
            "--to",
            f"{host}:{port}",
            "--json",
        )
        out, err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert source.returncode == 0, source.stderr[-3000:]
    stats = json.loads(source.stdout)
    assert stats["migration_id"] == data["migration_id"]
    assert stats["pages_sent"] > 0
    assert receiver.returncode == 0, err[-3000:]
    assert "domain(s) [1] now run on" in out


def test_migrate_with_a_wrong_token_fails(tmp_path):
    token_file = tmp_path / "token.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token_file),
        "--listen",
        "127.0.0.1",
        "--no-hold",
    )
    try:
        wait_for_file(token_file, receiver)
        data = json.loads(token_file.read_text())
        data["token"] = "00" * (len(data["token"]) // 2)
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps(data))
        source = run(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "32M",
            "--token-file",
            str(forged),
        )
    finally:
        receiver.kill()
        receiver.wait()
    # The migration ran and failed: 1, not a usage mistake's 2.
    one_line_error(
        source, EXIT_FAILED, "nova-xen-ncm migrate: error: migration of domain"
    )


@pytest.mark.parametrize("xen_compatible", [False, True])
def test_save_inspect_restore(tmp_path, xen_compatible):
    path = tmp_path / "guest.xl"
    extra = ["--xen-compatible"] if xen_compatible else []
    saved = run(
        "save", "guest", str(path), "--create", "--memory", "32M", *extra
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert f"to {path}: {path.stat().st_size} bytes" in saved.stdout

    inspected = run("inspect", "--json", str(path))
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    names = {r["name"] for r in json.loads(inspected.stdout)["records"]}
    assert "PAGE_DATA" in names
    assert any(n.startswith("NCM_") for n in names) != xen_compatible

    restored = run("restore", str(path), "--no-hold")
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert "as domain 1 (guest), running" in restored.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["save", "nosuch", "/tmp/x.xl"], "no domain 'nosuch'"),
        (["save", "g", "/nonexistent/dir/x.xl", "--create"], "no such dir"),
        (["save", "g", "/tmp/x.xl", "--memory", "32M"], "go with --create"),
        (["restore", "/nonexistent.xl"], "no save file"),
        (["restore", "/etc/hostname"], "not a save file"),
        (
            ["save", "g", "/tmp/x.xl", "--host-driver", "nope"],
            "host driver 'nope' is not installed",
        ),
        (["migrate", "g", "--token-file", "/nonexistent"], "cannot read"),
        (["migrate", "g", "--token-file", "/etc/hostname"], "not a token"),
        (["migrate", "g", "--token-file", "f", "--to", "x"], "not HOST:PORT"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    one_line_error(run(*args), EXIT_USAGE, message)


def test_factory_loads_the_simulated_host():
    assert "sim" in factory.available()
    assert factory.guests_live_in_process("sim")
    host = factory.load_host_driver(
        "sim", "factory-test", demo.make_conf([], {})
    )
    try:
        assert isinstance(host, base.HostDriver)
        assert host.hostname == "factory-test"
        assert host.list_domains() == []
    finally:
        host.close()


def test_factory_refuses_an_unknown_driver():
    with pytest.raises(
        base.NotSupported, match="'no-such-host' is not installed"
    ):
        factory.load_host_driver("no-such-host", "h", demo.make_conf([], {}))


def test_restore_holds_the_guest_until_terminated(tmp_path):
    path = tmp_path / "guest.xl"
    saved = run("save", "guest", str(path), "--create", "--memory", "32M")
    assert saved.returncode == 0, saved.stderr[-3000:]
    process = popen("restore", str(path), stderr=subprocess.DEVNULL)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "interrupt" in line:
                # The guest lives in this process: it runs until told.
                assert process.poll() is None
                process.send_signal(signal.SIGTERM)
                break
        status = process.wait(timeout=HANG_LIMIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "as domain 1 (guest), running" in lines[0]
    assert "domain(s) [1] run in this process" in lines[1]
    assert status == 0


def test_the_checkers_snapshots_cross_hosts_as_files(tmp_path):
    """``--check-snapshot`` on both ends writes the checker's snapshot of
    the paused source and of the restored destination; read back, the
    checker judges the simulated guest transparent."""
    from nova_xen_ncm.host import checker
    from nova_xen_ncm.host import snapshotfile

    token_file = tmp_path / "token.json"
    paused, resumed = tmp_path / "paused.json", tmp_path / "resumed.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token_file),
        "--listen",
        "127.0.0.1",
        "--no-hold",
        "--check-snapshot",
        str(resumed),
    )
    try:
        wait_for_file(token_file, receiver)
        source = run(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "32M",
            "--token-file",
            str(token_file),
            "--check-snapshot",
            str(paused),
        )
        out, err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert source.returncode == 0, source.stderr[-3000:]
    assert receiver.returncode == 0, err[-3000:]
    assert "checker snapshot at restore" in source.stdout
    assert f"written to {resumed}" in out
    a, b = snapshotfile.read(str(paused)), snapshotfile.read(str(resumed))
    report = checker.check(a, b)
    assert report.passed, report
    assert not a.unread and not b.unread
