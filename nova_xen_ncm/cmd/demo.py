"""``nova-xen-ncm demo``: a live migration between two simulated hosts.

Each simulated host runs in its own process (multiprocessing, spawn),
driven from this one over a pipe by :func:`host_agent`: the source boots
a guest with two vifs, a vbd and a memory workload, the destination
listens on loopback, and the guest migrates live while a progress bar
runs. The transparency checker then compares the guest-visible state the
source had at pause with the destination's at resume, item by item
(architecture.rst section 2), reading the guest's memory itself, and
judges the guest from its own RAM after it ran on the destination
(``after_resume``). The vbd's disk is in a directory both host processes
open, as on shared storage. With ``--save`` the guest is saved to a file
instead and restored on the second host, and the same items are checked.

The exit status is 0 only when the migration (or save and restore)
completed, every item passed and the after-resume verdict passed (or, for
a guest that stays paused, could not be taken).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging as std_logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import EnvironmentProblem
from nova_xen_ncm.cmd import Interrupted
from nova_xen_ncm.cmd.check import CheckSnapshot
from nova_xen_ncm.engine import policy as policies
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.model import ProgressSink

MiB = 1 << 20
DEFAULT_MEMORY = "256M"
DEFAULT_DIRTY_RATE = "8M"
HOST_DRIVER = "sim"
# How long the loopback bandwidth is measured for a fractional dirty rate.
MEASURE_SECONDS = 0.25
# Room on each simulated host beyond the guest (special pages, slack).
HOST_HEADROOM = 64 * MiB
# What the demo's processes need besides the guest's RAM on each host:
# three interpreters, the guests' processes, buffers.
PROCESS_OVERHEAD = 384 * MiB
# How often the controlling process looks for an interrupt while it
# waits for a host process.
POLL_SECONDS = 0.2
# The signal that asks a host process to cancel its outgoing migration
# (SIGINT and SIGTERM go to the controlling process, which decides).
CANCEL_SIGNAL = signal.SIGUSR1
GUEST_NAME = "demo-guest"
# xenbus state Connected (xen/include/public/io/xenbus.h).
XENBUS_CONNECTED = 4
BOOT_TIMEOUT = 60.0
BOOT_POLL = 0.1
GUEST_DEVICES = (
    base.DeviceConfig("vif", 0, mac="00:16:3e:5e:00:01"),
    base.DeviceConfig("vif", 1, mac="00:16:3e:5e:00:02"),
    base.DeviceConfig("vbd", 51712, disk_bytes=1 * MiB),
)
# How long the guest runs on the destination before its own verdicts
# are read.
AFTER_RESUME_SECONDS = 1.0
IO_NOTE = (
    "the checker reads every item itself at the source's pause and at "
    "the destination's resume (memory digested from RAM; shared info, "
    "vcpu_info, grant frames and rings from the guest's pages; ports, "
    "HVM params and xenstore by dom0's read-only queries), sharing no "
    "code with the migration's export; after resume the guest ran "
    f"{AFTER_RESUME_SECONDS:g} s on the destination, one event was raised "
    "on each of its bound ports, and the after-resume verdicts were read "
    "from its own RAM"
)
# A cancelled migration's items: not failures, the checker did not run.
CANCELLED = "not checked (cancelled)"
STAYS_PAUSED = "the guest stays paused on the destination: it did not run"
PAUSED_NOTE = (
    "the guest was paused after it booted and migrated paused: it "
    "neither runs nor writes during the migration and stays paused on "
    "the destination, so there is no downtime to measure"
)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


# -- option values ----------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB``, ``65536``; binary units."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give a number with an optional "
            "unit K, M, G or T (binary, e.g. 512M or 2G)"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole byte")
    return int(value)


def parse_memory(text: str) -> int:
    """A guest's memory: a positive whole number of MiB."""
    size = parse_size(text)
    if size <= 0 or size % MiB:
        raise argparse.ArgumentTypeError(
            f"guest memory {text!r} must be a positive whole number of "
            "MiB (e.g. 64M, 512M, 2G, or 65536K)"
            # A bare number is bytes: say so, as 64 meant 64 MiB.
            + (
                "; a number without a unit is bytes"
                if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text)
                else ""
            )
        )
    return size


def needed_memory(guest_bytes: int, hosts: int = 2) -> int:
    """Bytes of free memory a guest of this size needs: its RAM on each
    of the ``hosts`` simulated hosts (the demo runs two), their headroom,
    the processes."""
    return hosts * (guest_bytes + HOST_HEADROOM) + PROCESS_OVERHEAD


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(guest_bytes: int, hosts: int = 2) -> None:
    """Refuse, before anything starts, a guest this machine cannot hold
    on ``hosts`` simulated hosts."""
    from nova_xen_ncm.progress.terminal import human_bytes as _size

    available = available_memory()
    needed = needed_memory(guest_bytes, hosts)
    where = "both simulated hosts" if hosts == 2 else "the simulated host"
    if available is not None and needed > available:
        raise EnvironmentProblem(
            f"a {_size(guest_bytes)} guest needs about {_size(needed)} of "
            f"free memory (its RAM on {where}, plus "
            f"{_size(needed - hosts * guest_bytes)} for the hosts and their "
            f"processes); this machine has {_size(available)} available "
            "(MemAvailable in /proc/meminfo): give a smaller --memory"
        )


@dataclasses.dataclass(frozen=True)
class DirtyRate:
    """``--dirty-rate``: bytes per second, or a share of the bandwidth."""

    bytes_per_second: int | None = None
    fraction: float | None = None

    def resolve(self, measure: Callable[[], float]) -> tuple[int, str]:
        """Bytes per second and how they were found."""
        if self.fraction is None:
            return int(self.bytes_per_second or 0), "given"
        bandwidth = measure()
        return (
            int(self.fraction * bandwidth),
            f"{self.fraction:g} x loopback bandwidth "
            f"{bandwidth / MiB:.0f} MiB/s measured over "
            f"{MEASURE_SECONDS:g} s",
        )


_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_BYTES_HELP = (
    "give bytes per second with a unit (64M, 512K, or 100B for bytes)"
)
# The demo's --dirty-rate also takes a share of the bandwidth it measures.
_RATE_HELP = (
    f"{_BYTES_HELP}, or a share of the loopback bandwidth in percent (50%)"
)


def parse_rate(text: str) -> int:
    """Bytes per second: a size with a unit (``64M``, ``512K``,
    ``100B``), or ``0``. A bare number is refused: ``2`` reads as
    2 MiB/s as easily as 2 bytes/s."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: {_BYTES_HELP}"
        )
    has_unit = re.search(r"[a-z]", text, re.I) is not None
    if not has_unit and float(match.group(1)) != 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no unit: {_BYTES_HELP}"
        )
    return parse_size(text)


def parse_dirty_rate(text: str) -> DirtyRate:
    """``50%``: that share of the loopback bandwidth; anything else is
    bytes per second (:func:`parse_rate`)."""
    match = _PERCENT_RE.match(text)
    if match is not None:
        percent = float(match.group(1))
        if percent > 100:
            raise argparse.ArgumentTypeError(
                f"dirty rate {text!r} is more than 100% of the bandwidth"
            )
        return DirtyRate(fraction=percent / 100)
    try:
        return DirtyRate(bytes_per_second=parse_rate(text))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(
            str(exc)
            .replace("is not a rate", "is not a dirty rate")
            .replace(_BYTES_HELP, _RATE_HELP)
        ) from None


def parse_channels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(
            f"channels must be a whole number from 1 to 16, got {text!r}"
        )
    return value


def parse_downtime_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 10 <= value <= 60000:
        raise argparse.ArgumentTypeError(
            f"downtime must be 10 to 60000 milliseconds, got {text!r}"
        )
    return value


def measure_loopback_bandwidth(seconds: float = MEASURE_SECONDS) -> float:
    """Bytes per second one TCP connection carries over loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def drain(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                received[0] += len(data)

    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    reader = threading.Thread(target=drain, args=(conn,), daemon=True)
    reader.start()
    chunk = bytes(1 << 20)
    start = time.monotonic()
    with client:
        while time.monotonic() - start < seconds:
            client.sendall(chunk)
        client.shutdown(socket.SHUT_WR)
        reader.join()
    return received[0] / (time.monotonic() - start)


# -- the host process -------------------------------------------------------


def make_conf(
    config_files: list[str], overrides: Mapping[str, Mapping[str, Any]]
) -> cfg.ConfigOpts:
    """A private ConfigOpts: the command's config files, then
    ``{group: {option: value}}`` on top."""
    from nova_xen_ncm.conf import register_opts

    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([], project="nova-xen-ncm", default_config_files=config_files)
    for group, values in overrides.items():
        for name, value in values.items():
            conf.set_override(name, value, group=group)
    return conf


def snapshot_result(snapshot: CheckSnapshot) -> dict[str, Any]:
    """What a host process reports of its checker snapshot: the state
    (None when not taken), the time it took in the downtime, and why it
    was not taken."""
    error = snapshot.error
    if snapshot.state is None and error is None:
        error = f"the migration never entered {snapshot.phase}"
    return {
        "state": snapshot.state,
        "snapshot_seconds": snapshot.seconds,
        "snapshot_error": error,
    }


class _Channel:
    """A host process's end of its pipe. The agent answers from its main
    thread while migration threads forward events: one lock keeps their
    messages whole."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self.conn.send(message)

    def recv(self) -> Any:
        return self.conn.recv()


class _PipeSink:
    """Forwards progress events to the controlling process."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def emit(self, event: ProgressEvent) -> None:
        self.conn.send(("event", event.to_dict()))


def event_from_dict(data: Mapping[str, Any]) -> ProgressEvent:
    """The inverse of ProgressEvent.to_dict (events cross the pipe as
    dicts: their detail is a read-only mapping, which cannot pickle)."""
    return ProgressEvent(
        migration_id=data["migration_id"],
        kind=EventKind(data["kind"]),
        phase=data["phase"],
        timestamp=data["timestamp"],
        role=data["role"],
        previous=data["previous"],
        reason=data["reason"],
        memory_total=data["memory_total"],
        memory_processed=data["memory_processed"],
        memory_remaining=data["memory_remaining"],
        detail=types.MappingProxyType(dict(data["detail"])),
    )


class _Agent:
    """The commands a host process serves; each returns a picklable
    value."""

    def __init__(
        self, conn: Any, hostname: str, config_files: list, overrides: dict
    ) -> None:
        from nova_xen_ncm.host import factory

        self.conn = conn
        self.conf = make_conf(config_files, overrides)
        self.host = factory.load_host_driver(HOST_DRIVER, hostname, self.conf)
        self.incoming: Any = None
        self.snapshot: CheckSnapshot | None = None
        self.sender: Any = None
        self.cancelled = False
        self._cancel_lock = threading.Lock()

    def cancel(self, signum: int = 0, frame: Any = None) -> None:
        """Signal handler (CANCEL_SIGNAL): ask the outgoing migration to
        roll back. The request takes the engine's lock, so it is made
        from a thread of its own, never inside the interrupted code."""

        def request() -> None:
            with self._cancel_lock:
                self.cancelled = True
                if self.sender is not None:
                    self.sender.cancel("interrupted")

        threading.Thread(target=request, name="demo-cancel").start()

    def create(self, config: base.DomainConfig) -> int:
        domid = self.host.create_domain(config)
        if config.devices:
            self._await_devices(domid, len(config.devices))
        return domid

    def _await_devices(self, domid: int, count: int) -> None:
        """Wait until the guest's frontends are connected: its OS brings
        them up after boot, and a demo moves a guest in service."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            frontends = self.host.guest_state(domid).frontends
            connected = [
                key
                for key, seen in frontends.items()
                if seen.get("state") == XENBUS_CONNECTED
            ]
            if len(connected) == count:
                return
            if time.monotonic() > deadline:
                raise base.HostError(
                    f"{len(connected)} of the guest's {count} PV devices "
                    f"connected within {BOOT_TIMEOUT:g} s",
                    call="create",
                )
            time.sleep(BOOT_POLL)

    def pause(self, domid: int) -> None:
        self.host.pause(domid)

    def listen(
        self,
        migration_id: str,
        domid: int,
        snapshot: bool = True,
        events: bool = False,
    ) -> tuple:
        """Wait for migration ``migration_id``; ``snapshot`` takes the
        restored guest's state for the report (in its downtime: a
        benchmark goes without); ``events`` forwards the destination's
        progress events (the caller must then keep reading the pipe)."""
        from nova_xen_ncm.engine.migration import IncomingMigration

        self.snapshot = CheckSnapshot(self.host, lambda: domid, "commit")
        sinks: list[Any] = [self.snapshot] if snapshot else []
        self.incoming = IncomingMigration(
            self.host,
            migration_id,
            conf=self.conf,
            sinks=[*sinks, _PipeSink(self.conn)] if events else sinks,
            advertise="127.0.0.1",
        )
        self.incoming.start()
        return self.incoming.token, self.incoming.endpoint

    def send(
        self,
        domid: int,
        endpoint: tuple,
        migration_id: str,
        token: bytes,
        snapshot: bool = True,
    ) -> dict:
        """Migrate ``domid``; ``snapshot`` takes the guest's state at the
        pause for the report (the checker reads all of its RAM: a
        benchmark of the engine goes without)."""
        from nova_xen_ncm.engine.sender import Sender

        taken = CheckSnapshot(self.host, lambda: domid, "restore")
        if not snapshot:
            # Said as it is, not as a migration that never got that far.
            taken.error = "not asked for"
        sender = Sender(
            self.host,
            domid,
            tuple(endpoint),
            migration_id,
            token,
            conf=self.conf,
            sinks=[taken, _PipeSink(self.conn)]
            if snapshot
            else [_PipeSink(self.conn)],
        )
        with self._cancel_lock:
            self.sender = sender
            if self.cancelled:
                sender.cancel("interrupted")
        try:
            phase = sender.run()
        finally:
            with self._cancel_lock:
                self.sender = None
        return {
            "phase": phase.value,
            "error": _error_text(sender.error),
            "stats": sender.stats.to_dict(),
            **snapshot_result(taken),
            "domains": [d.domid for d in self.host.list_domains()],
            "domain_states": [
                (d.domid, d.state.value) for d in self.host.list_domains()
            ],
        }

    def wait_incoming(self) -> dict:
        phase = self.incoming.wait()
        receiver = self.incoming.receiver
        return {
            "phase": phase.value if phase is not None else None,
            "error": _error_text(receiver.error),
            **snapshot_result(self.snapshot),
            "domains": [
                (d.domid, d.state.value) for d in self.host.list_domains()
            ],
        }

    def after_resume(self, domid: int) -> dict:
        """Let the guest run, raise an event on each of its bound ports,
        and take what its RAM then records (checker.after_resume)."""
        from nova_xen_ncm.host import checker

        later, raised = checker.run_after_resume(
            self.host, domid, AFTER_RESUME_SECONDS
        )
        return {"state": later, "raised": raised}

    def disks(self) -> list[str]:
        """The vbd disk files on the storage the hosts share."""
        where = self.conf.xen_ncm_sim.disk_dir
        return sorted(os.listdir(where)) if where else []

    def save(self, domid: int, path: str, xen_compatible: bool) -> dict:
        from nova_xen_ncm.engine import savefile

        # Paused and with its backends quiet, the guest stays as the
        # snapshot shows it until save has written it (save quiesces
        # again, harmlessly, and resumes the backends when done: after
        # that they may answer requests, so the snapshot is taken now).
        info = self.host.domain_info(domid)
        if info.state == base.DomainState.RUNNING:
            self.host.pause_for_save(domid)
        if info.pv_drivers:
            self.host.quiesce_backends(domid)
        from nova_xen_ncm.host import checker

        state = checker.snapshot(self.host, domid)
        start = time.monotonic()
        savefile.save_to_path(
            self.host, domid, path, xen_compatible=xen_compatible
        )
        seconds = time.monotonic() - start
        self.host.destroy_domain(domid)
        return {"seconds": seconds, "state": state}

    def restore(self, path: str, unpause: bool) -> dict:
        from nova_xen_ncm.engine import savefile

        start = time.monotonic()
        domid = savefile.restore_from_path(self.host, path, unpause=False)
        seconds = time.monotonic() - start
        from nova_xen_ncm.host import checker

        # Restored, not running yet: what the guest will resume with.
        state = checker.snapshot(self.host, domid)
        if unpause:
            self.host.unpause(domid)
        return {"seconds": seconds, "state": state, "domid": domid}


AGENT_COMMANDS = frozenset(
    {
        "create",
        "pause",
        "listen",
        "send",
        "wait_incoming",
        "after_resume",
        "disks",
        "save",
        "restore",
    }
)


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


def host_agent(
    conn: Any, hostname: str, config_files: list, overrides: dict
) -> None:
    """Entry point of a host process: serves ``(command, args)`` from
    ``conn`` and answers ``("ok", value)`` or ``("error", text)``.

    Interrupts are the controlling process's to handle: SIGINT (also
    ignored from the start, see HostProcess) and SIGTERM are ignored
    here, and CANCEL_SIGNAL cancels the outgoing migration."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # What the engine logs as a warning (a rollback and its reason) the
    # demo's report and progress lines already say; errors still show.
    std_logging.getLogger("nova_xen_ncm").setLevel(std_logging.ERROR)
    conn = _Channel(conn)
    try:
        agent = _Agent(conn, hostname, config_files, overrides)
    except Exception as exc:
        conn.send(("error", _error_text(exc)))
        return
    signal.signal(CANCEL_SIGNAL, agent.cancel)
    conn.send(("ok", hostname))
    try:
        while True:
            try:
                command, args = conn.recv()
            except EOFError:
                return
            if command == "close":
                conn.send(("ok", None))
                return
            if command not in AGENT_COMMANDS:
                conn.send(("error", f"unknown command {command!r}"))
                continue
            try:
                conn.send(("ok", getattr(agent, command)(*args)))
            except Exception as exc:
                conn.send(("error", _error_text(exc)))
    finally:
        agent.host.close()


class HostProcess:
    """A simulated host in a child process, called like an object.

    While it waits for an answer it also takes the events its ``peers``
    send (the other host's progress), so that neither blocks on a full
    pipe, and calls ``on_poll`` every POLL_SECONDS (the demo looks for
    interrupts there).
    """

    def __init__(
        self, hostname: str, config_files: list[str], overrides: dict
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.hostname = hostname
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=host_agent,
            args=(child, hostname, config_files, overrides),
            name=f"nova-xen-ncm-{hostname}",
            daemon=True,
        )
        # Started with SIGINT ignored (kept through exec), so that a
        # Ctrl-C on the terminal, which reaches the whole process group,
        # never interrupts the host process as it starts: the
        # controlling process handles it and cancels the migration.
        previous = _ignore_sigint()
        try:
            self.process.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()
        self.on_event: Callable[[Mapping[str, Any]], None] = lambda e: None
        self.on_poll: Callable[[], None] = lambda: None
        self.peers: list[HostProcess] = []
        self._held: collections.deque = collections.deque()
        # Set when a peer's wait found this process dead: its pipe is at
        # EOF for good, and its own next call reports it.
        self._died = False
        self._answer()

    def _take(self) -> tuple[str, Any] | None:
        """One message off the pipe: an event is handed on, anything
        else returned."""
        try:
            kind, value = self.conn.recv()
        except EOFError:
            # Killed from outside (the kernel's OOM killer, kill -9): an
            # environment problem, not a mistake of the command line.
            self.process.join(timeout=5)
            raise EnvironmentProblem(
                f"the {self.hostname} host process died "
                f"(exit status {self.process.exitcode})"
            ) from None
        if kind == "event":
            self.on_event(value)
            return None
        return kind, value

    def _answer(self) -> Any:
        while True:
            message = self._held.popleft() if self._held else None
            while message is None:
                peers = [
                    p for p in self.peers if not (p._died or p.conn.closed)
                ]
                ready = multiprocessing.connection.wait(
                    [self.conn, *(p.conn for p in peers)],
                    timeout=POLL_SECONDS,
                )
                self.on_poll()
                for peer in peers:
                    if peer.conn in ready:
                        peer._take_for_later()
                if self.conn in ready:
                    message = self._take()
            kind, value = message
            if kind == "died":
                raise EnvironmentProblem(value)
            if kind == "error":
                raise CommandError(f"{self.hostname}: {value}")
            return value

    def _take_for_later(self) -> None:
        """Take a message while another host's answer is awaited: events
        are handed on, an answer waits for this host's own call, and a
        death is reported by that call too."""
        try:
            held = self._take()
        except CommandError as exc:
            self._died = True
            held = ("died", str(exc))
        if held is not None:
            self._held.append(held)

    def call(self, command: str, *args: Any) -> Any:
        self.conn.send((command, args))
        return self._answer()

    def cancel(self) -> None:
        """Ask the host process to cancel its outgoing migration."""
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, CANCEL_SIGNAL)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("close")
            except (CommandError, OSError):
                pass
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _ignore_sigint() -> Any:
    """Ignore SIGINT; the previous handler, or None where signals cannot
    be set (outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Interrupts:
    """While the demo drives its hosts, SIGINT and SIGTERM are noted
    rather than raised (a KeyboardInterrupt inside a pipe read would
    lose the message): the demo cancels the migration and reports."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self, stage: str) -> None:
        """Raise Interrupted if a signal came (before the migration:
        nothing to cancel, the hosts are closed on the way out)."""
        if self.signum is not None:
            raise Interrupted(self.signum, stage)

    def forward_to(self, source: HostProcess) -> Callable[[], None]:
        """An ``on_poll`` that cancels the source's migration once, when
        a signal came."""
        forwarded = []

        def poll() -> None:
            if self.signum is not None and not forwarded:
                forwarded.append(True)
                source.cancel()

        return poll


# -- the run ----------------------------------------------------------------


@dataclasses.dataclass
class DemoReport:
    """What the demo found; ``as_dict`` is the ``--json`` output."""

    mode: str
    completed: bool
    checks: dict[str, dict[str, Any]]
    policy: str
    downtime_ms: float | None = None
    total_ms: float | None = None
    bytes_sent: int = 0
    rounds: int = 0
    phase: str | None = None
    error: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # checker.AfterResume.to_dict(); "passed" None when the guest did
    # not run on the destination (it stays paused there).
    after_resume: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "passed": False,
            "reason": "the guest was not judged after resume",
        }
    )

    @property
    def cancelled(self) -> bool:
        return self.phase == "cancelled"

    @property
    def transparent(self) -> bool:
        items = bool(self.checks) and all(
            c["passed"] for c in self.checks.values()
        )
        return items and self.after_resume.get("passed") is not False

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "completed": self.completed,
            # Not judged when cancelled: null, not false.
            "transparent": None if self.cancelled else self.transparent,
            "checks": self.checks,
            "after_resume": self.after_resume,
            "downtime_ms": self.downtime_ms,
            "total_ms": self.total_ms,
            "bytes_sent": self.bytes_sent,
            "rounds": self.rounds,
            "policy": self.policy,
            "phase": self.phase,
            "error": self.error,
            "settings": self.settings,
            "notes": self.notes,
            **self.extra,
        }

    def as_text(self) -> str:
        verb = "migration" if self.mode == "migrate" else "save and restore"
        lines = [
            "",
            f"{verb}: "
            + ("completed" if self.completed else f"FAILED ({self.phase})"),
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append("transparency (doc/source/architecture.rst section 2):")
        for item, result in self.checks.items():
            if result["passed"] is None:
                lines.append(f"  {item:<15} {result['reason']}")
                continue
            verdict = "passed" if result["passed"] else "FAILED"
            reason = f": {result['reason']}" if result["reason"] else ""
            lines.append(f"  {item:<15} {verdict}{reason}")
        if self.cancelled:
            lines.append(f"  {'after resume':<15} {CANCELLED}")
            lines.append(f"  => {CANCELLED}")
        else:
            lines += _after_resume_lines(self.after_resume)
            lines.append(
                f"  => {'transparent' if self.transparent else 'NOT'}"
            )
        downtime = _ms(self.downtime_ms)
        snapshots = self.extra.get("checker_snapshot_ms")
        if snapshots is not None and self.downtime_ms is not None:
            downtime += (
                f" (includes {snapshots:.1f} ms the checker took to "
                "snapshot the paused guest; without it "
                f"{_ms(self.extra['downtime_without_checker_ms'])})"
            )
        lines += [
            f"policy:       {self.policy}",
            f"downtime:     {downtime}",
            f"total time:   {_ms(self.total_ms)}",
            f"bytes sent:   {self.bytes_sent} "
            f"({self.bytes_sent / MiB:.1f} MiB)",
            f"rounds:       {self.rounds}",
        ]
        stats = self.extra.get("stats")
        if stats:
            lines.append(
                f"measured:     bandwidth {stats['bandwidth'] / MiB:.1f} "
                f"MiB/s, guest dirtying {stats['dirty_rate'] / MiB:.1f} "
                "MiB/s (last round)"
            )
        for key, value in self.settings.items():
            lines.append(f"{key + ':':<13} {value}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _after_resume_lines(verdict: Mapping[str, Any]) -> list[str]:
    passed = verdict.get("passed")
    head = {True: "passed", False: "FAILED", None: "not run"}[passed]
    lines = [f"  {'after resume':<15} {head}"]
    if "requests_completed" in verdict:
        lines.append(
            f"    {verdict['requests_completed']} requests completed, "
            f"{verdict['lost']} lost, {verdict['duplicated']} duplicated, "
            f"{verdict['bad_payloads']} bad payloads, "
            f"{verdict['vbd_reads_checked']} vbd reads of data written "
            f"before the pause, silent ports: "
            f"{', '.join(map(str, verdict['ports_silent'])) or 'none'}"
        )
    steps = verdict.get("clock_steps_ms")
    if steps:
        lines.append(
            "    each vCPU's clock (its pvclock in RAM) stepped across "
            "the migration by " + ", ".join(f"{s:+.1f}" for s in steps) + " ms"
        )
    if verdict.get("reason"):
        lines.append(f"    {verdict['reason']}")
    return lines


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def exit_status(report: DemoReport) -> int:
    """0 only for a completed run whose every item passed."""
    return 0 if report.completed and report.transparent else 1


def not_checked(
    reason: str, passed: bool | None = False
) -> dict[str, dict[str, Any]]:
    """Every item with the same verdict: False (failed for ``reason``)
    or None (not judged, as for a cancelled migration)."""
    return {
        item.value: {"passed": passed, "reason": reason} for item in base.Item
    }


def compare(
    paused: base.GuestState | None,
    resumed: base.GuestState | None,
    items: tuple[base.Item, ...] = tuple(base.Item),
    why: tuple[str | None, str | None] = (None, None),
) -> dict[str, dict[str, Any]]:
    """The checker's verdict on ``items``, as a dict; ``why`` says why
    the state at pause and at resume could not be captured."""
    from nova_xen_ncm.host import checker

    if paused is None or resumed is None:
        return not_checked(_not_captured(paused, resumed, why))
    result = checker.check(paused, resumed).to_dict()
    return {i.value: result[i.value] for i in items}


def _not_captured(
    paused: base.GuestState | None,
    resumed: base.GuestState | None,
    why: tuple[str | None, str | None],
) -> str:
    # Each side missing says its own reason: both when both failed.
    texts = []
    for state, side, reason in (
        (paused, "source at pause", why[0]),
        (resumed, "destination", why[1]),
    ):
        if state is None:
            text = f"no state was captured on the {side}"
            texts.append(f"{text}: {reason}" if reason else text)
    return "; ".join(texts)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Live-migrate a guest between two simulated hosts.",
        description=(
            "Start two simulated Xen hosts in separate processes, boot a "
            "guest with two vifs, a vbd and a memory workload on the "
            "first, migrate it live to the second over loopback and "
            "check that nothing the guest can see changed. Exits 0 only "
            "when the migration completed and every item passed."
        ),
    )
    parser.add_argument(
        "--memory",
        type=parse_memory,
        default=parse_memory(DEFAULT_MEMORY),
        metavar="SIZE",
        help="guest memory, a whole number of MiB: e.g. 512M, 2G or "
        f"65536K (default {DEFAULT_MEMORY}); refused when the machine's "
        "free memory cannot hold it on both hosts",
    )
    parser.add_argument(
        "--dirty-rate",
        type=parse_dirty_rate,
        default=parse_dirty_rate(DEFAULT_DIRTY_RATE),
        metavar="RATE",
        help=(
            "bytes per second the guest writes, with a unit: e.g. 64M, "
            "512K or 100B; or a share of the loopback bandwidth in "
            "percent, e.g. 50%%, measured for "
            f"{MEASURE_SECONDS:g} s before the guest boots "
            f"(default {DEFAULT_DIRTY_RATE})"
        ),
    )
    parser.add_argument(
        "--pattern",
        choices=("uniform", "hotcold", "sequential"),
        default="hotcold",
        help="which pages the workload writes (default hotcold)",
    )
    parser.add_argument(
        "--fill",
        choices=("zero", "random", "guestlike"),
        default="guestlike",
        help="what the guest's RAM holds at boot (default guestlike)",
    )
    parser.add_argument(
        "--paused",
        action="store_true",
        help="pause the guest once it booted and migrate it paused; it "
        "stays paused on the destination",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="precopy policy (default: [xen_ncm] precopy_policy)",
    )
    parser.add_argument(
        "--downtime-ms",
        type=parse_downtime_ms,
        default=None,
        metavar="MS",
        help="downtime target of the 'downtime' policy, in milliseconds",
    )
    parser.add_argument(
        "--channels",
        type=parse_channels,
        default=None,
        help="TCP connections per migration (1-16)",
    )
    parser.add_argument(
        "--compress",
        action="store_true",
        help="lz4-compress page data on the wire",
    )
    parser.add_argument(
        "--transport-url",
        default=None,
        metavar="URL",
        help="also publish progress on this oslo.messaging bus",
    )
    parser.add_argument(
        "--save",
        default=None,
        metavar="FILE",
        help="save the guest to FILE instead of migrating it, then "
        "restore it on the second host and check it",
    )
    parser.add_argument(
        "--xen-compatible",
        action="store_true",
        help="with --save: write only Xen's record types (the guest then "
        "boots without PV drivers and devices, since their state needs "
        "the project's records)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON"
    )
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    if args.xen_compatible and not args.save:
        raise CommandError("--xen-compatible goes with --save FILE")
    if args.policy is not None:
        names = policies.available_policies()
        if args.policy not in names:
            raise CommandError(
                f"unknown policy {args.policy!r} (available: "
                f"{', '.join(names)})"
            )
    if args.save:
        directory = os.path.dirname(os.path.abspath(args.save))
        if not os.path.isdir(directory):
            raise CommandError(f"cannot save to {args.save}: no directory")
        if os.path.isdir(args.save):
            raise CommandError(
                f"cannot save to {args.save}: it is a directory; give a "
                "file name"
            )
    from nova_xen_ncm.cmd import bus
    from nova_xen_ncm.conf import CONF

    # --transport-url, else a configuration file's, as migrate does.
    args.transport_url = bus.configured_url(CONF, args.transport_url)
    if args.transport_url:
        # A transport connects lazily: this checks the URL and its
        # driver, before any host starts.
        bus.notification_transport(CONF, args.transport_url).cleanup()


def run(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF

    _validate(args)
    check_memory(args.memory)
    notes = []
    dirty_rate, how = args.dirty_rate.resolve(measure_loopback_bandwidth)
    if args.paused:
        notes.append(PAUSED_NOTE)
    policy = args.policy or CONF.xen_ncm.precopy_policy
    overrides = _overrides(args, policy, CONF)
    # The vbd's disk, on storage both hosts open (as a cloud's shared
    # storage), for this run only.
    disk_dir = tempfile.mkdtemp(prefix="nova-xen-ncm-demo-disks-")
    overrides["xen_ncm_sim"]["disk_dir"] = disk_dir
    settings = {
        "guest": f"{args.memory // MiB} MiB, 2 vCPUs, "
        + (
            "no PV drivers or devices"
            if args.xen_compatible
            else "vif 0, vif 1, vbd 51712"
        ),
        "workload": f"{dirty_rate / MiB:.1f} MiB/s ({how}), "
        f"{args.pattern}, fill {args.fill}"
        + (", paused" if args.paused else ""),
        "transport": f"{overrides['xen_ncm'].get('channels', 1)} channel(s)"
        + (", lz4" if args.compress else ""),
        # Printed after the run, once the directory is gone.
        "storage": f"vbd disks shared by both hosts under {disk_dir} "
        "(removed at the end of the run)",
    }
    out = sys.stderr if args.json else sys.stdout
    hosts: list[HostProcess] = []
    with _Interrupts() as interrupts:
        try:
            for name in ("source", "destination"):
                interrupts.check("before the hosts started")
                hosts.append(
                    HostProcess(
                        f"demo-{name}",
                        list(CONF.default_config_files or []),
                        overrides,
                    )
                )
            source, destination = hosts
            source.peers, destination.peers = [destination], [source]
            source.on_poll = destination.on_poll = interrupts.forward_to(
                source
            )
            config = _guest_config(args, dirty_rate)
            domid = source.call("create", config)
            interrupts.check("before the migration started: nothing moved")
            if args.paused:
                source.call("pause", domid)
            if args.save:
                report = _save_and_restore(args, source, destination, domid)
            else:
                report = _migrate(
                    args, source, destination, domid, config, out
                )
        finally:
            for host in hosts:
                host.close()
            shutil.rmtree(disk_dir, ignore_errors=True)
    report.policy = policy
    report.settings = settings
    report.notes = notes
    if not args.xen_compatible and not args.paused and not report.cancelled:
        report.notes.append(IO_NOTE)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(report.as_text(), file=out)
    if interrupts.signum is not None:
        raise Interrupted(interrupts.signum, _interrupted(report))
    return exit_status(report)


def _interrupted(report: DemoReport) -> str:
    """The one line an interrupted run ends with: where the guest is."""
    if report.mode != "migrate":
        return (
            "a save and restore is not cancelled midway; it ran to its "
            "end (see the report)"
        )
    if report.completed:
        return (
            "too late to cancel (the commit decision was made): the "
            "migration completed and the guest runs on the destination"
        )
    states = dict(report.extra.get("source_domain_states") or [])
    where = {
        "running": "rolled back and runs on the source",
        "paused": "rolled back and is paused on the source, as it was",
    }.get(str(next(iter(states.values()), "")), "")
    if not where:
        return (
            f"the {report.mode} ended in {report.phase}; the guest is not "
            "on the source (see the report)"
        )
    return f"the migration was cancelled; the guest {where}"


def _overrides(
    args: argparse.Namespace, policy: str, conf: cfg.ConfigOpts
) -> dict[str, dict[str, Any]]:
    xen_ncm: dict[str, Any] = {
        "listen_address": "127.0.0.1",
        "precopy_policy": policy,
    }
    if args.downtime_ms is not None:
        xen_ncm["downtime_target"] = args.downtime_ms / 1000.0
    if args.channels is not None:
        xen_ncm["channels"] = args.channels
    if args.compress:
        xen_ncm["compression"] = "lz4"
    host_mb = (args.memory + HOST_HEADROOM) // MiB
    return {
        "xen_ncm": xen_ncm,
        "xen_ncm_sim": {
            "host_memory_mb": max(host_mb, 128),
            # The destination's guest process is ready before the guest
            # arrives, as a real host has nothing to start.
            "spare_guest_process": True,
            # And its memory is there, as a real host's is.
            "prefault_memory_mb": args.memory // MiB,
        },
    }


def _guest_config(
    args: argparse.Namespace, dirty_rate: int
) -> base.DomainConfig:
    workload: dict[str, Any] = {
        "dirty_rate": dirty_rate,
        "pattern": args.pattern,
        "fill": args.fill,
    }
    pv = not args.xen_compatible
    return base.DomainConfig(
        name=GUEST_NAME,
        memory_bytes=args.memory,
        vcpus=2,
        uuid=str(uuid.uuid4()),
        devices=GUEST_DEVICES if pv else (),
        pv_drivers=pv,
        workload=workload,
    )


def _progress_sinks(
    args: argparse.Namespace, out: Any
) -> tuple[list[ProgressSink], Any]:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.progress.terminal import TerminalSink

    sinks: list[ProgressSink] = [TerminalSink(out, conf=CONF, host="demo")]
    bus = None
    if args.transport_url:
        from nova_xen_ncm.cmd import bus as cmd_bus

        bus = cmd_bus.bus_sink(CONF, "demo", args.transport_url)
        sinks.append(bus)
    return sinks, bus


def _migrate(
    args: argparse.Namespace,
    source: HostProcess,
    destination: HostProcess,
    domid: int,
    config: base.DomainConfig,
    out: Any,
) -> DemoReport:
    migration_id = str(uuid.uuid4())
    sinks, bus = _progress_sinks(args, out)
    for sink in sinks:
        sink.start(
            migration_id,
            instance_uuid=config.uuid,
            source_host=source.hostname,
            destination_host=destination.hostname,
        )

    def show(data: Mapping[str, Any]) -> None:
        event = event_from_dict(data)
        for sink in sinks:
            sink.emit(event)

    for sink in sinks:
        sink.start(
            migration_id,
            role="destination",
            instance_uuid=config.uuid,
            source_host=source.hostname,
            destination_host=destination.hostname,
        )
    source.on_event = destination.on_event = show
    try:
        token, endpoint = destination.call(
            "listen", migration_id, domid, True, True
        )
        sent = source.call("send", domid, endpoint, migration_id, token)
        received = destination.call("wait_incoming")
    finally:
        if bus is not None:
            bus.close()
    stats = sent["stats"]
    completed = (
        sent["phase"] == "done"
        and received["phase"] == "done"
        and sent["domains"] == []
        and received["domains"]
        == [(domid, "paused" if args.paused else "running")]
    )
    cancelled = sent["phase"] == "cancelled"
    why = (sent["snapshot_error"], received["snapshot_error"])
    if cancelled:
        checks = not_checked(CANCELLED, passed=None)
    elif completed:
        checks = compare(sent["state"], received["state"], why=why)
    else:
        checks = not_checked("the migration did not complete")
    if cancelled:
        verdict = {"passed": None, "reason": CANCELLED}
    elif not completed:
        verdict = {"passed": False, "reason": "the migration did not complete"}
    elif args.paused:
        verdict = {"passed": None, "reason": STAYS_PAUSED}
    else:
        verdict = judge_after_resume(
            destination, domid, sent["state"], received["state"], why
        )
    downtime = stats["actual_downtime"]
    # The checker's snapshots are taken while the guest is paused, so the
    # measured downtime includes them; what a migration without the
    # checker would cost is reported too.
    snapshot_ms = 1000 * (
        sent["snapshot_seconds"] + received["snapshot_seconds"]
    )
    report = DemoReport(
        mode="migrate",
        completed=completed,
        checks=checks,
        policy="",
        downtime_ms=None if downtime is None else downtime * 1000,
        total_ms=stats["total_time"] * 1000,
        bytes_sent=stats["bytes_sent"],
        rounds=len(stats["rounds"]),
        phase=sent["phase"],
        error=sent["error"] or received["error"],
        after_resume=verdict,
        extra={
            "stats": stats,
            "instance_uuid": config.uuid,
            "vbd_disks": destination.call("disks"),
            "checker_snapshot_ms": snapshot_ms,
            "downtime_without_checker_ms": None
            if downtime is None
            else max(0.0, downtime * 1000 - snapshot_ms),
            "source_domains": sent["domains"],
            "source_domain_states": sent["domain_states"],
            "destination_domains": received["domains"],
        },
    )
    return report


def judge_after_resume(
    destination: HostProcess,
    domid: int,
    paused: base.GuestState | None,
    resumed: base.GuestState | None,
    why: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Run the guest on the destination for a while and judge it from
    its own RAM (checker.after_resume)."""
    from nova_xen_ncm.host import checker

    if paused is None or resumed is None:
        return {
            "passed": False,
            "reason": _not_captured(paused, resumed, why),
        }
    later = destination.call("after_resume", domid)
    return checker.after_resume(
        paused, resumed, later["state"], later["raised"]
    ).to_dict()


def _save_and_restore(
    args: argparse.Namespace,
    source: HostProcess,
    destination: HostProcess,
    domid: int,
) -> DemoReport:
    from nova_xen_ncm.engine.digest import needed_items

    saved = source.call("save", domid, args.save, args.xen_compatible)
    restored = destination.call("restore", args.save, not args.paused)
    items = needed_items(not args.xen_compatible)
    size = os.path.getsize(args.save)
    if args.paused:
        verdict = {"passed": None, "reason": STAYS_PAUSED}
    elif args.xen_compatible:
        verdict = {
            "passed": None,
            "reason": "a guest without PV drivers has no I/O to judge",
        }
    else:
        verdict = judge_after_resume(
            destination, domid, saved["state"], restored["state"]
        )
    return DemoReport(
        mode="save",
        completed=restored["domid"] == domid,
        checks=compare(saved["state"], restored["state"], items),
        policy="",
        downtime_ms=(saved["seconds"] + restored["seconds"]) * 1000,
        total_ms=(saved["seconds"] + restored["seconds"]) * 1000,
        bytes_sent=size,
        rounds=1,
        phase="done",
        after_resume=verdict,
        extra={
            "save_file": os.path.abspath(args.save),
            "xen_compatible": args.xen_compatible,
            "save_ms": saved["seconds"] * 1000,
            "restore_ms": restored["seconds"] * 1000,
        },
    )
