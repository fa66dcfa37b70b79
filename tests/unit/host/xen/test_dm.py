"""Restarting the device model on saved state, against a stand-in QEMU
that loads ``-incoming fd:N`` and answers QMP as QEMU does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nova_xen_ncm.host.xen import dm

FAKE_QEMU = textwrap.dedent(
    """\
    import json, os, socket, sys, time
    args = sys.argv[1:]
    qmp_path, out = args[0], args[1]
    fd = int(args[args.index("-incoming") + 1].removeprefix("fd:"))
    pidfile = args[args.index("-pidfile") + 1]
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    state = os.read(fd, 1 << 20)
    print("loading", len(state), "octets", flush=True)
    if state.startswith(b"BAD"):
        print("load of migration failed: Invalid argument", flush=True)
        sys.exit(1)
    with open(out, "wb") as f:
        f.write(state)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(qmp_path)
    srv.listen(1)
    srv.settimeout(20)
    conn, _ = srv.accept()
    conn.sendall(b'{"QMP": {}}\\n')
    for line in conn.makefile():
        cmd = json.loads(line)["execute"]
        if cmd == "query-status":
            reply = {"status": "running", "running": True}
        else:
            reply = {}
        conn.sendall(json.dumps({"return": reply}).encode() + b"\\n")
    time.sleep(30)
    """
)


def test_restart_argv_replaces_the_restore_options() -> None:
    argv = [
        "qemu",
        "-xen-domid",
        "7",
        "-incoming",
        "fd:3",
        "-daemonize",
        "-pidfile",
        "/old",
        "-m",
        "32",
    ]
    assert dm.restart_argv(argv, 9, "/new") == [
        "qemu",
        "-xen-domid",
        "7",
        "-m",
        "32",
        "-incoming",
        "fd:9",
        "-pidfile",
        "/new",
    ]


def test_command_line_of_a_process_and_of_none() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "two words"]
    child = subprocess.Popen(argv)
    try:
        # The kernel fills the command line in just after exec.
        deadline = time.monotonic() + 10
        while True:
            try:
                seen = dm.command_line(child.pid)
                break
            except dm.DeviceModelError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert seen == argv
    finally:
        child.kill()
        child.wait()
    with pytest.raises(dm.DeviceModelError, match=f"device model {child.pid}"):
        dm.command_line(child.pid)


def test_alive_is_false_for_a_zombie() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert dm.alive(child.pid)
        child.kill()
        # Not reaped yet: a zombie, which no longer runs.
        deadline = time.monotonic() + 10
        while dm.alive(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.wait()
    assert not dm.alive(child.pid)


def test_stop_kills_a_device_model_that_does_not_answer(tmp_path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        dm.stop(child.pid, str(tmp_path / "no-qmp"), timeout=0.5)
        assert not dm.alive(child.pid)
        assert time.monotonic() - started < 10
    finally:
        child.kill()
        child.wait()


def _fake(tmp_path, blob: bytes) -> tuple[list[str], str, str, str]:
    script = tmp_path / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    state = tmp_path / "state"
    state.write_bytes(blob)
    qmp_path = str(tmp_path / "qmp")
    argv = [sys.executable, str(script), qmp_path, str(tmp_path / "loaded")]
    return argv, str(state), qmp_path, str(tmp_path / "dm.log")


def test_start_incoming_loads_the_state_and_returns_the_pid(tmp_path) -> None:
    argv, state, qmp_path, log = _fake(tmp_path, b"device state")
    pid = dm.start_incoming(
        [*argv, "-incoming", "fd:99"],
        state,
        pidfile=str(tmp_path / "pid"),
        log_path=log,
        qmp_path=qmp_path,
        timeout=30,
    )
    try:
        assert dm.alive(pid)
        assert (tmp_path / "loaded").read_bytes() == b"device state"
        assert "loading 12 octets" in (tmp_path / "dm.log").read_text()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_device_model_that_fails_to_load_is_a_clear_error(tmp_path) -> None:
    argv, state, qmp_path, log = _fake(tmp_path, b"BAD state")
    with pytest.raises(dm.DeviceModelError, match="load of migration failed"):
        dm.start_incoming(
            argv,
            state,
            pidfile=str(tmp_path / "pid"),
            log_path=log,
            qmp_path=qmp_path,
            timeout=30,
        )
