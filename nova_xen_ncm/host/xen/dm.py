"""Restarting an HVM guest's device model on saved device state.

libxl restores QEMU's device state by starting QEMU with ``-incoming
fd:N`` on the EMULATOR_CONTEXT record's blob (``libxl_dm.c``). The
project builds the restoring domain with libxl's create, which starts a
fresh QEMU, and restores memory and CPU state itself. QMP's
``xen-load-devices-state`` into that QEMU would be the direct way, but
QEMU 7.2 (Debian bookworm's ``qemu-system-xen``) aborts in it
(``yank_unregister_instance: Assertion `entry' failed``: nothing
registered the incoming migration it tears down). So the fresh device
model, which has not run the guest, is replaced by one started as libxl
starts it on restore: the same command line, plus ``-incoming``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import qmp

POLL = 0.05
# Options of the old command line that the restarted one sets itself.
_REPLACED = ("-incoming", "-pidfile", "-daemonize")


class DeviceModelError(base.HostError):
    """The device model could not be restarted on the saved state."""


def command_line(pid: int) -> list[str]:
    """The argv of the running device model ``pid``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DeviceModelError(
            f"device model {pid} is gone: {exc}",
            call="read device model command line",
            errno=exc.errno,
        ) from None
    argv = [a.decode() for a in raw.split(b"\0")[:-1]]
    if not argv:
        raise DeviceModelError(
            f"device model {pid} has no command line (exited)",
            call="read device model command line",
        )
    return argv


def restart_argv(argv: Sequence[str], fd: int, pidfile: str) -> list[str]:
    """``argv`` with ``-incoming fd:<fd>`` and ``-pidfile``, without the
    old values of those options."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _REPLACED:
            skip = arg != "-daemonize"
            continue
        out.append(arg)
    return [*out, "-incoming", f"fd:{fd}", "-pidfile", pidfile]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the parenthesised command name.
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def stop(pid: int, qmp_path: str, timeout: float) -> None:
    """Ask device model ``pid`` to quit (QMP), kill it if it does not."""
    with contextlib.suppress(qmp.QmpError), qmp.Qmp(qmp_path, timeout) as s:
        s.execute("quit")
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            deadline = time.monotonic() + timeout
        time.sleep(POLL)


def _tail(path: str | None, lines: int = 5) -> str:
    if not path:
        return ""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        text = f.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])
    return ""


def start_incoming(
    argv: Sequence[str],
    state_path: str,
    *,
    pidfile: str,
    log_path: str | None,
    qmp_path: str,
    timeout: float,
) -> int:
    """Start the device model ``argv`` loading ``state_path``; returns
    its pid once the state is loaded. The process is detached (``setsid
    -f``) so that it outlives the caller, as libxl's does."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(pidfile)
    state_fd = os.open(state_path, os.O_RDONLY)
    try:
        out = (
            open(log_path, "ab") if log_path else open(os.devnull, "wb")  # noqa: SIM115
        )
        with out:
            full = restart_argv(argv, state_fd, pidfile)
            launched = subprocess.run(
                ["setsid", "-f", *full],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(state_fd,),
                check=False,
            )
    finally:
        os.close(state_fd)
    if launched.returncode != 0:
        raise DeviceModelError(
            f"could not start {argv[0]} (status {launched.returncode})",
            call="start device model",
        )
    deadline = time.monotonic() + timeout
    pid = None
    while True:
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                with open(pidfile) as f:
                    pid = int(f.read().strip())
        if pid is not None and not alive(pid):
            raise DeviceModelError(
                f"the device model exited while loading the saved state: "
                f"{_tail(log_path)}",
                call="start device model",
            )
        if pid is not None and os.path.exists(qmp_path):
            with contextlib.suppress(qmp.QmpError):
                with qmp.Qmp(qmp_path, timeout) as session:
                    status = session.execute("query-status")["status"]
                if status != "inmigrate":
                    return pid
        if time.monotonic() > deadline:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            raise DeviceModelError(
                f"the device model did not load the saved state within "
                f"{timeout:.0f}s: {_tail(log_path)}",
                call="start device model",
            )
        time.sleep(POLL)
