"""Ctrl-C and SIGTERM during a migration: the demo, run as a user runs
it, cancels the migration, the guest rolls back and runs on the source,
one line says so, and no process prints a traceback or is left behind."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest

from nova_xen_ncm.cmd import demo as demo_mod
from nova_xen_ncm.host import base

from .conftest import HANG_LIMIT
from .conftest import one_line_error
from .conftest import popen

# How long the processes of an ended demo may take to go (the guests
# notice their host is gone when their sockets close).
EXIT_GRACE = 30.0


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (guests run in sessions of their
    own, so a process group would not find them)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields
        # after its closing parenthesis are state, ppid, ...
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state.rpartition(")")[2].split()[0] != "Z":
            left.add(pid)
    return left


@pytest.mark.parametrize(
    "signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_an_interrupt_mid_migration_rolls_back(signum, status):
    # A guest dirtying 90% of the bandwidth keeps the migration in
    # precopy for a while: the interrupt comes mid-migration.
    demo = popen(
        "demo",
        "--memory",
        "256M",
        "--dirty-rate",
        "90%",
        start_new_session=True,
    )
    processes: set[int] = set()
    try:
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "(source) phase setup -> precopy" in line:
                break
        else:
            pytest.fail("the migration never started: " + "".join(seen))
        processes = descendants(demo.pid)
        if signum == signal.SIGINT:
            # As a terminal sends it: to the whole foreground group.
            os.killpg(demo.pid, signum)
        else:
            # As kill(1) or a service manager sends it: to the command.
            demo.send_signal(signum)
        rest, err = demo.communicate(timeout=HANG_LIMIT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    out = "".join(seen) + rest
    line = one_line_error(demo, status, stdout=out, stderr=err)
    assert line == (
        f"nova-xen-ncm demo: interrupted by {signal.Signals(signum).name}: "
        "the migration was cancelled; the guest rolled back and runs on "
        "the source"
    )
    # The report shows the figures as they were.
    assert "migration: FAILED (cancelled)" in out
    assert "(source) CANCELLED after" in out
    assert "(destination) CANCELLED after" in out
    # A cancel is not a transparency failure: nothing was judged.
    assert out.count("not checked (cancelled)") == len(base.Item) + 2, out
    assert "did not complete" not in out
    assert "=> NOT" not in out
    assert demo_mod.IO_NOTE not in out
    assert "(removed at the end of the run)" in out
    # The host processes and the guests' processes all ended.
    assert processes, "the demo had no host processes"
    deadline = time.monotonic() + EXIT_GRACE
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes), alive(processes)


def test_ctrl_c_on_migrate_rolls_back(tmp_path):
    token = tmp_path / "token.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token),
        "--listen",
        "127.0.0.1",
        "--no-hold",
        start_new_session=True,
    )
    source = None
    try:
        deadline = time.monotonic() + HANG_LIMIT
        while not token.exists():
            assert receiver.poll() is None, receiver.communicate()[1]
            assert time.monotonic() < deadline, "no token file written"
            time.sleep(0.05)
        source = popen(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "256M",
            "--dirty-rate",
            "1G",
            "--token-file",
            str(token),
            start_new_session=True,
        )
        seen = []
        for line in source.stdout:
            seen.append(line)
            if "(source) phase setup -> precopy" in line:
                break
        else:
            pytest.fail("the migration never started: " + "".join(seen))
        # The guest runs in this command's process tree; the terminal's
        # Ctrl-C reaches the command's whole group.
        os.killpg(source.pid, signal.SIGINT)
        rest, err = source.communicate(timeout=HANG_LIMIT)
        received, received_err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        for process in (source, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    out = "".join(seen) + rest
    everything = out + err + received + received_err
    assert "Traceback" not in everything, everything[-4000:]
    line = one_line_error(source, 130, stdout=out, stderr=err)
    assert line == (
        "nova-xen-ncm migrate: interrupted by SIGINT: the migration was "
        "cancelled; domain 1 rolled back and is running on the source"
    )
    # The destination followed the source's rollback and says so.
    assert receiver.returncode == 1
    assert "ended in cancelled" in received_err
    assert not token.exists()


def test_ctrl_c_on_a_waiting_receive_cancels_it(tmp_path):
    receiver = popen(
        "receive",
        "--token-file",
        str(tmp_path / "token.json"),
        "--listen",
        "127.0.0.1",
        "--no-hold",
        start_new_session=True,
    )
    try:
        first = receiver.stdout.readline()
        assert "waiting for the source" in first, first
        # The line comes just before the command starts waiting; an
        # interrupt in between ends it before anything was started.
        time.sleep(1.0)
        os.killpg(receiver.pid, signal.SIGINT)
        out, err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    line = one_line_error(receiver, 130, stdout=out, stderr=err)
    assert line == (
        "nova-xen-ncm receive: interrupted by SIGINT: no source had "
        "connected; nothing was received"
    )
    # Ended as a cancel, not as a failure to set up.
    assert "CANCELLED after" in out and out.rstrip().endswith("interrupted")
    assert "FAILED" not in out and "error in setup" not in out
