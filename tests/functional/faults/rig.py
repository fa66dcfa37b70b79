"""Test support for fault injection: each party of a migration in its own
process, so that a fault may be a real SIGKILL.

- :class:`HostServer`: a simulated Xen host (the hypervisor and dom0,
  with the guests it runs) in a process of its own session, serving
  host calls to any number of clients over a Unix socket. It keeps the
  guest-visible state of each guest when it is paused (after its
  backends are quiesced) and when it is handed back (before its backends
  resume or it is unpaused), for the transparency checker. The
  destination's server also runs the migration's :class:`Receiver`.
- The source engine runs in a process of its own (:func:`_source_main`)
  and drives the source host through :class:`RemoteHost`, as a toolstack
  drives Xen: killing the engine leaves the guest, paused or not, in the
  host process. :func:`_recovery_main` is the engine restarted.

A :class:`Fault` names what goes wrong and when (a phase of the side that
does it); the hooks that do it are in this module and are installed only
in the child processes started here. Children are forked from the test
process, which holds no host of its own, so they start at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import Client
from multiprocessing.connection import Listener
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.journal import SUBDIR
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.progress.model import EventKind

MiB = 1 << 20
CTX = multiprocessing.get_context("fork")
AUTHKEY = b"nova-xen-ncm-fault-rig"
RABBIT = ("127.0.0.1", 5672)

# Seconds a party may take before the rig calls it stuck.
PARTY_TIMEOUT = 60.0
#: Seconds a source's hook waits for the proxy to partition.
PARTITION_WAIT = 10.0

#: Engine options of every party, the same on both sides: short
#: budgets, so that a fault costs seconds; the commit query outlasts the
#: destination's wait for COMMIT (io_timeout), as with the defaults.
OVERRIDES = {
    "xen_ncm": {
        "listen_address": "127.0.0.1",
        "precopy_policy": "xen-simple",
        "io_timeout": 5.0,
        "accept_timeout": 10.0,
        "connect_timeout": 2.0,
        "connect_retry_attempts": 3,
        "connect_retry_timeout": 1.0,
        "transfer_retry_attempts": 3,
        "transfer_retry_timeout": 1.0,
        "downtime_budget": 1.0,
        "retry_initial_delay": 0.05,
        "retry_max_delay": 0.2,
        "commit_query_attempts": 60,
        "commit_query_timeout": 10.0,
        "progress_interval": 0.2,
    },
    "xen_ncm_sim": {"host_memory_mb": 96},
    "xen_ncm_progress": {"publish_retry": 0, "close_timeout": 1.0},
}
#: Nothing kinder to one side: both use OVERRIDES.
DESTINATION_OVERRIDES: dict = {}

DEVICES = (
    base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
    base.DeviceConfig("vbd", 51712, disk_bytes=1 * MiB),
)


class Kind(str, enum.Enum):
    DROP = "dropped-connection"
    KILL_DESTINATION = "destination-killed"
    KILL_SOURCE = "source-killed"
    REFUSE_DOMID = "domid-taken"
    REFUSE_MEMORY = "not-enough-memory"
    SLOW_LINK = "slow-link"
    BUS_GONE = "bus-gone"

    @property
    def on_destination(self) -> bool:
        return self is Kind.KILL_DESTINATION


class Window(str, enum.Enum):
    """Faults in the windows of the commit and of the network, each at
    one moment (tests/functional/faults/test_windows.py)."""

    #: COMMIT never reaches the destination (the connection stays up).
    COMMIT_LOST = "commit-lost"
    #: COMMITTED never reaches the source.
    COMMITTED_LOST = "committed-lost"
    #: The source's final acknowledgement never arrives.
    FINISHED_LOST = "finished-lost"
    #: The destination engine dies on COMMIT, before unpausing; its
    #: host and the domain live on.
    DEST_ENGINE_BEFORE_UNPAUSE = "destination-engine-killed-before-unpause"
    #: The destination engine dies after unpausing, before COMMITTED.
    DEST_ENGINE_AFTER_UNPAUSE = "destination-engine-killed-after-unpause"
    #: The source engine dies in CLEANUP (journalled, before FINISHED).
    SOURCE_KILLED_CLEANUP = "source-killed-in-cleanup"
    #: The control connection silently stops forwarding after round 0.
    PARTITION_CONTROL = "partition-control"
    #: A data channel's connection silently stops forwarding after
    #: round 0 (two channels).
    PARTITION_DATA = "partition-data"
    #: Everything between the hosts stops on the commit decision, new
    #: connections included, until the test heals it.
    PARTITION_AT_COMMIT = "partition-at-commit"

    @property
    def on_destination(self) -> bool:
        return self in (
            Window.COMMITTED_LOST,
            Window.DEST_ENGINE_BEFORE_UNPAUSE,
            Window.DEST_ENGINE_AFTER_UNPAUSE,
        )

    @property
    def partition(self) -> bool:
        return self.value.startswith("partition")


#: Phases a fault can be injected in.
PHASES = (
    Phase.SETUP,
    Phase.PRECOPY,
    Phase.STOP_AND_COPY,
    Phase.RESTORE,
    Phase.COMMIT,
)
#: Bytes per second of a slow link.
SLOW_RATE = 8 * MiB


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: Kind | Window
    phase: Phase
    #: KILL_SOURCE in COMMIT only: die once COMMIT went out and COMMITTED
    #: arrived, before reading it (the destination runs the guest).
    after_commit_sent: bool = False
    #: With ``after_commit_sent``: the source's COMMIT record, appended
    #: before COMMIT goes, is never synced before the kill (its sync
    #: runs while COMMIT travels): the restarted engine reads the append.
    commit_unsynced: bool = False


def make_conf(*layers: dict, state_path: str | None = None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    for layer in (OVERRIDES, *layers):
        for group, values in layer.items():
            for name, value in values.items():
                conf.set_override(name, value, group=group)
    if state_path is not None:
        conf.set_override("state_path", state_path, group="xen_ncm")
    return conf


def guest_config(name: str, memory_mb: int = 16) -> base.DomainConfig:
    return base.DomainConfig(
        name=name,
        memory_bytes=memory_mb * MiB,
        vcpus=1,
        devices=DEVICES,
        workload={"dirty_rate": 1 * MiB},
    )


def _start(process: Any) -> None:
    """Start ``process``; a fork refused for a moment (EAGAIN: a machine
    shared with other test runs) is tried again."""
    for attempt in range(20):
        try:
            process.start()
            return
        except BlockingIOError:
            if attempt == 19:
                raise
            time.sleep(0.1 * (attempt + 1))


def _suicide() -> None:
    """The fault itself: the kernel ends this process, nothing runs."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- the host process --------------------------------------------------------


class _Pages(base.PageMapping):
    """A read-only PageMapping of pages copied over the rig's socket, in
    one run."""

    def __init__(self, pfns: Any, blob: bytes) -> None:
        self.pfns = pfns
        self._view = memoryview(blob)
        self.pages = [
            self._view[i : i + base.PAGE_SIZE]
            for i in range(0, len(blob), base.PAGE_SIZE)
        ]

    def runs(self) -> list[tuple[int, memoryview]]:
        return [(0, self._view)] if self.pages else []

    def close(self) -> None:
        self.pages = []


class RemoteHost:
    """The host of a :class:`HostServer`, as the engine sees a host."""

    def __init__(self, address: str) -> None:
        self._conn = Client(address, authkey=AUTHKEY)
        self._lock = threading.Lock()
        self.hostname = self._request("attr", "hostname")

    def _request(self, op: str, *args: Any) -> Any:
        with self._lock:
            self._conn.send((op, args))
            status, value = self._conn.recv()
        if status == "ok":
            return value
        name, text = value
        cls = getattr(base, name, None)
        if isinstance(cls, type) and issubclass(cls, base.HostError):
            raise cls(text)
        raise base.HostError(f"{name}: {text}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        # Keywords too: the engine passes some (guest_state's records).
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._request("call", name, args, kwargs)

        return call

    def map_pages(self, domid: int, pfns: Any, writable: bool = False):
        if writable:
            raise base.NotSupported("the rig maps source pages read-only")
        return _Pages(pfns, self._request("read_pages", domid, pfns))

    def state_of(self, domid: int) -> base.DomainState | None:
        try:
            return self.domain_info(domid).state
        except base.DomainNotFound:
            return None

    def snapshot(self, kind: str, domid: int) -> base.GuestState | None:
        """The guest's state the server kept at ``kind`` ("paused",
        "unpause"), or the checker's reading of it now ("now")."""
        return self._request("snapshot", kind, domid)

    def receive(self, migration_id: str, token: bytes, fault: Fault | None):
        return tuple(
            self._request("receive", migration_id, token.hex(), fault)
        )

    def receiver_result(self, timeout: float) -> tuple[str, str] | None:
        return self._request("receiver_result", timeout)

    def restart_engine(self, answer_for: float) -> list[dict]:
        return self._request("restart_engine", answer_for)

    def incoming(self) -> list[str]:
        """The phases of the destination journal's entries."""
        return self._request("incoming")

    def forget_incoming(self) -> None:
        """Drop the destination journal's entries, as an operator's
        resolve does: the answers they kept up end."""
        return self._request("forget_incoming")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()


LEDGER = "ledger.jsonl"


class _Ledger:
    """Appends the moments a guest's copy starts and stops running on
    this host to the ledger both hosts share (one line each, O_APPEND,
    monotonic time, which all processes of the machine share)."""

    def __init__(self, path: str | None, hostname: str) -> None:
        self.path = path
        self.hostname = hostname

    def record(self, uuid: str, running: bool) -> None:
        if self.path is None:
            return
        line = json.dumps(
            {
                "host": self.hostname,
                "uuid": uuid,
                "running": running,
                "t": time.monotonic(),
            }
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def overlaps(path: str) -> list[str]:
    """Every time span in which one guest ran on both hosts at once."""
    spans: dict[tuple[str, str], list[list[float]]] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            event = json.loads(line)
            runs = spans.setdefault((event["uuid"], event["host"]), [])
            if event["running"]:
                if not runs or runs[-1][1] is not None:
                    runs.append([event["t"], None])
            elif runs and runs[-1][1] is None:
                runs[-1][1] = event["t"]
    found = []
    by_guest: dict[str, dict[str, list]] = {}
    for (uuid, host), runs in spans.items():
        by_guest.setdefault(uuid, {})[host] = runs
    for uuid, hosts in by_guest.items():
        names = sorted(hosts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for s1, e1 in hosts[a]:
                    for s2, e2 in hosts[b]:
                        end1 = math.inf if e1 is None else e1
                        end2 = math.inf if e2 is None else e2
                        if s1 < end2 and s2 < end1:
                            found.append(
                                f"guest {uuid} ran on {a} and {b} at once "
                                f"from {max(s1, s2):.3f}"
                            )
    return found


class _HostService:
    """What runs in a host process."""

    def __init__(
        self, name: str, conf: cfg.ConfigOpts, ledger: str | None = None
    ) -> None:
        from nova_xen_ncm.host.sim.host import SimHost

        self.conf = conf
        self.host = SimHost(name, conf)
        self.ledger = _Ledger(ledger, name)
        self.snapshots: dict[tuple[str, int], base.GuestState] = {}
        self.receiver: Receiver | None = None
        self.receiver_done = threading.Event()
        self.engine_dead = False
        self._wrap()

    def _wrap(self) -> None:
        host = self.host
        pause, unpause = host.pause, host.unpause
        quiesce, resume = host.quiesce_backends, host.resume_backends
        create, destroy = host.create_domain, host.destroy_domain
        ledger = self.ledger

        def created(config: base.DomainConfig) -> int:
            domid = create(config)
            ledger.record(host.domain_info(domid).uuid, True)
            return domid

        def destroyed(domid: int) -> None:
            info = host.domain_info(domid)
            destroy(domid)
            if info.state == base.DomainState.RUNNING:
                ledger.record(info.uuid, False)

        def paused(domid: int) -> None:
            ledger.record(host.domain_info(domid).uuid, False)
            pause(domid)
            self.snapshots.pop(("unpause", domid), None)
            self.snapshots["paused", domid] = checker.snapshot(host, domid)

        def resumed(domid: int) -> None:
            # A rollback resumes the backends first; they may then answer
            # requests in flight, which the guest sees as I/O, not as a
            # change made by the migration. The guest as handed back is
            # the state before that.
            if host.domain_info(domid).state == base.DomainState.PAUSED:
                self.snapshots["unpause", domid] = checker.snapshot(
                    host, domid
                )
            resume(domid)

        def quiesced(domid: int) -> None:
            quiesce(domid)
            # Backends stopped: what the guest saw at its pause is final.
            self.snapshots["paused", domid] = checker.snapshot(host, domid)

        def unpaused(domid: int) -> None:
            key = ("unpause", domid)
            if (
                key not in self.snapshots
                and host.domain_info(domid).state == base.DomainState.PAUSED
            ):
                self.snapshots[key] = checker.snapshot(host, domid)
            unpause(domid)
            ledger.record(host.domain_info(domid).uuid, True)

        host.pause, host.unpause = paused, unpaused
        host.create_domain, host.destroy_domain = created, destroyed
        host.quiesce_backends = quiesced
        host.resume_backends = resumed

    def _arm(self, fault: Fault | None) -> list:
        """Install a destination fault; the receiver's sinks."""
        if fault is None or not fault.kind.on_destination:
            return []
        if fault.kind is Window.COMMITTED_LOST:
            _drop_sends(messages.Committed)
            return []
        if fault.kind is Window.DEST_ENGINE_BEFORE_UNPAUSE:
            return [_PhaseHook(Phase.COMMIT, self._engine_dies)]
        if fault.kind is Window.DEST_ENGINE_AFTER_UNPAUSE:
            return [_PhaseHook(Phase.CLEANUP, self._engine_dies)]
        host = self.host
        if fault.phase is Phase.SETUP:
            create = host.create_empty_domain

            def create_then_die(*args: Any) -> None:
                create(*args)
                _suicide()

            host.create_empty_domain = create_then_die
            return []
        if fault.phase is Phase.PRECOPY:
            populate, calls = host.populate, []

            def populate_then_die(*args: Any) -> None:
                populate(*args)
                calls.append(1)
                if len(calls) == 2:
                    _suicide()

            host.populate = populate_then_die
            return []
        return [_PhaseHook(fault.phase, _suicide)]

    def _engine_dies(self) -> None:
        """The destination engine dies as a process would: its sockets
        and its journal lock go, nothing of it runs again; the host and
        its domains live on."""
        receiver = self.receiver
        receiver.journal.close()
        receiver.listener.close()
        for channel in (receiver._channel, *receiver._data.values()):
            if channel is not None:
                channel.close()
        self.engine_dead = True
        threading.Event().wait()

    def handle(self, op: str, args: tuple) -> Any:
        if op == "attr":
            return getattr(self.host, args[0])
        if op == "call":
            name, positional, keywords = args
            return getattr(self.host, name)(*positional, **keywords)
        if op == "read_pages":
            domid, pfns = args
            with self.host.map_pages(domid, pfns) as mapping:
                return b"".join(mapping.pages)
        if op == "snapshot":
            if args[0] == "now":
                # The checker's own reading of the guest as it is now.
                return checker.snapshot(self.host, args[1])
            return self.snapshots.get(tuple(args))
        if op == "receive":
            migration_id, token, fault = args
            self.snapshots.clear()
            self.receiver = Receiver(
                self.host,
                migration_id,
                bytes.fromhex(token),
                conf=self.conf,
                sinks=self._arm(fault),
            )

            def serve() -> None:
                try:
                    self.receiver.run()
                finally:
                    self.receiver_done.set()

            threading.Thread(target=serve, daemon=True).start()
            return self.receiver.address
        if op == "receiver_result":
            # Terminal is enough: a receiver whose source may not know
            # the outcome goes on answering commit queries after it.
            deadline = time.monotonic() + args[0]
            while True:
                # A dead engine's thread holds the state's lock forever.
                if self.engine_dead:
                    return ("killed", "")
                if self.receiver.state.terminal:
                    break
                if time.monotonic() > deadline:
                    return None
                self.receiver_done.wait(0.02)
            return (
                self.receiver.state.phase.value,
                str(self.receiver.error or ""),
            )
        if op == "restart_engine":
            # The destination engine restarted: what the old one still
            # ran (its answers after a migration) is gone; the new one
            # settles its journal and answers the sources' commit
            # queries for a while.
            if self.receiver is not None and not self.engine_dead:
                self.receiver.close()
            journal = Journal.incoming_from_conf(self.conf)
            outcomes = recovery.recover_incoming(self.host, journal)
            threading.Thread(
                target=recovery.answer_incoming,
                args=(journal, self.conf, args[0]),
                daemon=True,
            ).start()
            return [o.as_dict() for o in outcomes]
        if op == "incoming":
            journal = Journal.incoming_from_conf(self.conf)
            return [e.phase for e in journal.entries()]
        if op == "guest_command":
            domid, cmd, kwargs = args
            return self.host.guest_command(domid, cmd, **kwargs)
        if op == "dom0_errors":
            return [
                f"{type(e).__name__}: {e} (cause: {e.__cause__!r})"
                for e in self.host.dom0_errors()
            ]
        if op == "forget_incoming":
            journal = Journal.incoming_from_conf(self.conf)
            for entry in journal.entries():
                journal.remove(entry.migration_id)
            return None
        raise ValueError(f"unknown rig request {op!r}")

    def serve(self, conn: Any) -> None:
        with conn:
            while True:
                try:
                    op, args = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply = ("ok", self.handle(op, args))
                except Exception as exc:
                    reply = ("err", (type(exc).__name__, str(exc)))
                try:
                    conn.send(reply)
                except (OSError, ValueError):
                    return


def _host_main(
    name: str, address: str, layers: tuple, ledger: str, ready: Any
) -> None:
    # A session of its own: its guests' processes end with it.
    os.setsid()
    try:
        with contextlib.suppress(FileNotFoundError):
            # Left by a predecessor that was killed.
            os.unlink(address)
        service = _HostService(name, make_conf(*layers), ledger)
        listener = Listener(address, authkey=AUTHKEY)
    except BaseException:
        ready.send(traceback.format_exc())
        raise
    ready.send("ready")
    while True:
        conn = listener.accept()
        threading.Thread(
            target=service.serve, args=(conn,), daemon=True
        ).start()


class HostServer:
    """A simulated host named ``name`` in its own process."""

    def __init__(self, name: str, workdir: str, *layers: dict) -> None:
        self.name = name
        self.address = os.path.join(workdir, f"{name}.sock")
        parent, child = CTX.Pipe()
        #: Where both hosts of the rig record when a guest runs.
        self.ledger = os.path.join(workdir, LEDGER)
        self.process = CTX.Process(
            target=_host_main,
            args=(name, self.address, layers, self.ledger, child),
            name=f"rig-{name}",
        )
        _start(self.process)
        if not parent.poll(PARTY_TIMEOUT):
            self.kill()
            raise RuntimeError(f"host {name} did not start")
        message = parent.recv()
        if message != "ready":
            self.kill()
            raise RuntimeError(f"host {name} failed to start:\n{message}")
        self.client = RemoteHost(self.address)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        """End the host's process and its session (its guests)."""
        pid = self.process.pid
        if pid is not None and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.process.join(10)
        # Guests of a host that died on its own end with their control
        # channel; the group is ended in any case.
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(pid, signal.SIGKILL)

    def dom0_errors(self) -> list[str]:
        """What failed in this host's dom0 services and simulated
        hypervisor (SimHost.dom0_errors), if its process still answers:
        a host the fault killed has nothing more to say."""
        if not self.alive or not hasattr(self, "client"):
            return []
        try:
            return list(self.client._request("dom0_errors"))
        except (EOFError, OSError):
            return []

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self.kill()


class RigDom0Error(AssertionError):
    """A host of the rig had a dom0 service or simulator failure: raised
    by :meth:`Rig.close`, as the in-process fixtures raise theirs."""


# -- the source engine process -------------------------------------------


class _PhaseHook:
    """A sink running ``action`` once, when ``phase`` is entered (or, for
    PRECOPY, after its first round)."""

    def __init__(self, phase: Phase, action: Any) -> None:
        self.phase = phase
        self.action = action
        self.fired = False

    def emit(self, event: Any) -> None:
        if self.fired:
            return
        if self.phase is Phase.PRECOPY:
            hit = event.kind is EventKind.ROUND
        else:
            hit = event.kind is EventKind.STATE and event.phase == (
                self.phase.value
            )
        if hit:
            self.fired = True
            self.action()


class _BusProxy:
    """The message bus as the source reaches it: forwarded to RabbitMQ
    until :meth:`cut`, then gone (connections reset, port closed). With
    no RabbitMQ here, the bus is gone from the start."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._cut:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(RABBIT, timeout=1.0)
            except OSError:
                conn.close()
                continue
            self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(
                    target=self._pipe, args=(a, b), daemon=True
                ).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._cut = True
        with contextlib.suppress(OSError):
            self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()


def _drop_sends(kind: type) -> None:
    """Messages of ``kind`` this process sends are lost on the wire; the
    connection stays up."""
    send = Channel.send

    def lossy(conn: Channel, msg: Any) -> None:
        if not isinstance(msg, kind):
            send(conn, msg)

    Channel.send = lossy


class Proxy:
    """The network between the hosts: forwards each connection to
    ``upstream`` until told to partition it, after which it silently
    stops forwarding (bytes read and dropped, nothing closed); with
    :meth:`partition_all` new connections stall the same way until
    :meth:`heal`. Runs in the test process; ``trigger`` (an event shared
    with the source's process) partitions ``scope`` when set."""

    def __init__(self, upstream: tuple[str, int], scope: str) -> None:
        self.upstream = upstream
        self.scope = scope
        self.trigger = CTX.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = self._sock.getsockname()[:2]
        self._conns: list[list] = []
        self._all = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._closed:
            if self.trigger.wait(0.05):
                if self.scope == "all":
                    self.partition_all()
                else:
                    index = 0 if self.scope == "control" else 1
                    if index < len(self._conns):
                        self._conns[index][0] = True
                # Cleared once in place: the source, waiting for it in
                # its hook, sends nothing more before the partition.
                self.trigger.clear()
                return

    def partition_all(self) -> None:
        self._all = True
        for conn in self._conns:
            conn[0] = True

    def heal(self) -> None:
        """New connections go through again (stalled ones stay so)."""
        self._all = False

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            state = [self._all, conn, None]
            self._conns.append(state)
            if not state[0]:
                try:
                    state[2] = socket.create_connection(
                        self.upstream, timeout=2.0
                    )
                except OSError:
                    conn.close()
                    continue
            threading.Thread(
                target=self._pipe, args=(state, 1, 2), daemon=True
            ).start()
            if state[2] is not None:
                threading.Thread(
                    target=self._pipe, args=(state, 2, 1), daemon=True
                ).start()

    @staticmethod
    def _pipe(state: list, a: int, b: int) -> None:
        with contextlib.suppress(OSError):
            while data := state[a].recv(65536):
                if not state[0] and state[b] is not None:
                    state[b].sendall(data)
        if not state[0] and state[b] is not None:
            with contextlib.suppress(OSError):
                state[b].shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        for state in self._conns:
            for sock in state[1:]:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


class _SourceFaults:
    """Installs a source-side fault into this (child) process."""

    def __init__(
        self, fault: Fault | None, sender_ref: list, trigger: Any = None
    ) -> None:
        self.fault = fault
        self.sender_ref = sender_ref
        self.trigger = trigger
        self.slow = False
        self.bus: _BusProxy | None = None
        if fault is not None and fault.kind is Kind.BUS_GONE:
            self.bus = _BusProxy()

    def _partition(self) -> None:
        """Asks the test process's proxy to partition and waits until it
        has: its watcher may wake late on a loaded machine, and COMMIT
        sent meanwhile would get through the partition it is meant for."""
        self.trigger.set()
        deadline = time.monotonic() + PARTITION_WAIT
        # Bounded: a proxy that never answers leaves the fault late, and
        # the window's expected outcome says so.
        while self.trigger.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)

    def action(self) -> None:
        kind = self.fault.kind
        if kind is Kind.KILL_SOURCE:
            _suicide()
        elif kind is Kind.DROP:
            sender = self.sender_ref[0]
            channel = sender.data.control
            if channel is not None:
                with contextlib.suppress(OSError):
                    channel.sock.shutdown(socket.SHUT_RDWR)
        elif kind is Kind.SLOW_LINK:
            self.slow = True
        elif kind is Kind.BUS_GONE:
            self.bus.cut()

    def install(self, host: RemoteHost) -> list:
        """Patch this process for the fault; the sender's extra sinks."""
        fault = self.fault
        if fault is None or fault.kind.on_destination:
            return []
        if isinstance(fault.kind, Window):
            return self._install_window(fault.kind)
        if fault.kind in (Kind.REFUSE_DOMID, Kind.REFUSE_MEMORY):
            return []
        if fault.kind is Kind.SLOW_LINK:
            send_buffers = Channel.send_buffers
            faults = self

            def slow_send(conn: Channel, buffers: Any, *a: Any) -> int:
                sent = send_buffers(conn, buffers, *a)
                if faults.slow:
                    time.sleep(sent / SLOW_RATE)
                return sent

            Channel.send_buffers = slow_send
        return self._install_kind(host)

    def _install_window(self, window: Window) -> list:
        if window is Window.COMMIT_LOST:
            _drop_sends(messages.Commit)
        elif window is Window.FINISHED_LOST:
            _drop_sends(messages.Finished)
        elif window is Window.SOURCE_KILLED_CLEANUP:
            return [_PhaseHook(Phase.CLEANUP, _suicide)]
        elif window is Window.PARTITION_AT_COMMIT:
            return [_PhaseHook(Phase.COMMIT, self._partition)]
        elif window.partition:
            return [_PhaseHook(Phase.PRECOPY, self._partition)]
        return []

    def _install_kind(self, host: RemoteHost) -> list:
        fault = self.fault
        if fault.after_commit_sent:
            if fault.commit_unsynced:
                never = threading.Event()
                sync = Journal.sync

                def sync_never(journal: Journal, migration_id: str) -> None:
                    if os.path.basename(journal.path) == SUBDIR:
                        # Held until the kill: the append is all there is.
                        never.wait()
                    sync(journal, migration_id)

                Journal.sync = sync_never
            send = Channel.send

            def send_then_die(conn: Channel, msg: Any) -> None:
                send(conn, msg)
                if isinstance(msg, messages.Commit):
                    wait_readable(conn.sock, PARTY_TIMEOUT)
                    _suicide()

            Channel.send = send_then_die
            return []
        if fault.phase is Phase.SETUP:
            handshake = Channel.client_handshake
            faults = self

            def handshake_then_fault(conn: Channel, *a: Any, **k: Any):
                result = handshake(conn, *a, **k)
                faults.sender_ref[0].data.channels[0] = conn
                faults.action()
                Channel.client_handshake = handshake
                return result

            Channel.client_handshake = handshake_then_fault
            return []
        if fault.phase is Phase.STOP_AND_COPY:
            # Guest paused and backends quiesced: the most there is to
            # undo when the fault hits.
            quiesce = host.quiesce_backends
            faults = self

            def quiesce_then_fault(domid: int) -> None:
                quiesce(domid)
                faults.action()

            host.quiesce_backends = quiesce_then_fault
            return []
        return [_PhaseHook(fault.phase, self.action)]


def _source_main(
    host_address: str,
    domid: int,
    endpoint: tuple[str, int],
    migration_id: str,
    token: bytes,
    state_path: str,
    fault: Fault | None,
    trigger: Any,
    layers: tuple,
    result: Any,
) -> None:
    conf = make_conf(*layers, state_path=state_path)
    host = RemoteHost(host_address)
    sender_ref: list = [None]
    faults = _SourceFaults(fault, sender_ref, trigger)
    sinks = faults.install(host)
    bus = None
    if faults.bus is not None:
        from nova_xen_ncm.progress import bus as bus_sink

        bus = bus_sink.BusSink(
            conf,
            host="rig-source",
            url=f"rabbit://guest:guest@127.0.0.1:{faults.bus.port}/",
        )
        sinks.append(bus)
    sender = Sender(
        host,
        domid,
        endpoint,
        migration_id,
        token,
        conf=conf,
        sinks=sinks,
    )
    sender_ref[0] = sender
    started = time.monotonic()
    phase = sender.run()
    elapsed = time.monotonic() - started
    if bus is not None:
        bus.close(1.0)
    result.send(
        {
            "phase": phase.value,
            "error": str(sender.error or ""),
            "reason": sender.state.reason(phase) or "",
            "elapsed": elapsed,
        }
    )
    # Not waiting for the messaging library's threads: the engine's
    # work is done, as a killed one's is.
    os._exit(0)


def _recovery_main(host_address: str, state_path: str, result: Any) -> None:
    conf = make_conf(state_path=state_path)
    host = RemoteHost(host_address)
    outcomes = recovery.recover(host, Journal(state_path), conf)
    result.send([o.as_dict() for o in outcomes])


def _run_child(target: Any, *args: Any) -> tuple[Any, int]:
    """Run ``target`` in a forked child; its result (None if it died)
    and its exit code."""
    parent, child = CTX.Pipe(duplex=False)
    process = CTX.Process(target=target, args=(*args, child))
    _start(process)
    child.close()
    value = None
    if parent.poll(PARTY_TIMEOUT):
        with contextlib.suppress(EOFError):
            value = parent.recv()
    process.join(PARTY_TIMEOUT)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise RuntimeError(f"{target.__name__} is stuck")
    return value, process.exitcode


@dataclasses.dataclass
class Result:
    """What became of one migration, by every party's record."""

    migration_id: str
    source: dict | None
    source_exit: int
    destination: tuple[str, str] | None
    recovered: list[dict] | None = None

    @property
    def killed(self) -> bool:
        return self.source_exit == -signal.SIGKILL

    @property
    def end(self) -> Phase:
        """The recorded end state: the recovery's when the source was
        restarted, else the source's own."""
        mine = [
            o
            for o in self.recovered or ()
            if o["migration_id"] == self.migration_id
        ]
        if mine:
            return Phase(mine[-1]["phase"])
        if self.source is not None:
            return Phase(self.source["phase"])
        # Killed before its journal held the migration: nothing of it
        # was left to settle; the destination's record says it failed.
        return Phase(self.destination[0]) if self.destination else None


class Rig:
    """A source host, a destination host, and migrations between them."""

    def __init__(self, workdir: str, *destination_layers: dict) -> None:
        self.workdir = workdir
        self.state_path = os.path.join(workdir, "state")
        #: The network of the last partition fault, if any.
        self.proxy: Proxy | None = None
        #: The dom0 failures of the hosts, as "host: error" lines.
        self.dom0_errors: list[str] = []
        self.source = HostServer("source", workdir)
        # Ports of this rig's own (runs of the suite may share a machine):
        # a port a dead engine freed must not go to another's migration.
        low = 20000 + (os.getpid() % 800) * 50
        self.ports = {"xen_ncm": {"port_min": low, "port_max": low + 49}}
        try:
            self.destination = HostServer(
                "destination",
                workdir,
                DESTINATION_OVERRIDES,
                self.ports,
                *destination_layers,
            )
        except BaseException:
            self.source.close()
            raise

    def close(self) -> None:
        """Stop both hosts; then raise RigDom0Error if either (or a
        destination restarted before) had a dom0 or simulator error."""
        if self.proxy is not None:
            self.proxy.close()
        try:
            self._collect_dom0_errors(self.source)
            self._collect_dom0_errors(self.destination)
        finally:
            self.source.close()
            self.destination.close()
        if self.dom0_errors:
            raise RigDom0Error(
                f"{len(self.dom0_errors)} dom0 failure(s) in the rig's "
                f"hosts, the first: {self.dom0_errors[0]}"
            )

    def _collect_dom0_errors(self, host: HostServer) -> None:
        self.dom0_errors += [
            f"{host.name}: {e}"
            for e in host.dom0_errors()
            if f"{host.name}: {e}" not in self.dom0_errors
        ]

    def restart_destination(self) -> None:
        self._collect_dom0_errors(self.destination)
        self.destination.close()
        self.destination = HostServer(
            "destination", self.workdir, DESTINATION_OVERRIDES, self.ports
        )

    def forget(self) -> None:
        """Drop the journals' entries (their guests were destroyed): the
        destination's too, whose answers would otherwise go on (each on
        a port of the rig's) until a source that never will
        acknowledges."""
        journal = Journal(self.state_path)
        for entry in journal.entries():
            journal.remove(entry.migration_id)
        if self.destination.alive:
            self.destination.client.forget_incoming()

    def migrate(self, domid: int, fault: Fault | None) -> Result:
        migration_id = f"rig-{domid}-{time.monotonic_ns()}"
        token = handshake.generate_token()
        endpoint = self.destination.client.receive(migration_id, token, fault)
        trigger = None
        layers: tuple = ()
        if fault is not None and isinstance(fault.kind, Window):
            if fault.kind.partition:
                scope = {
                    Window.PARTITION_CONTROL: "control",
                    Window.PARTITION_DATA: "data",
                    Window.PARTITION_AT_COMMIT: "all",
                }[fault.kind]
                self.proxy = Proxy(tuple(endpoint), scope)
                endpoint = self.proxy.address
                trigger = self.proxy.trigger
                layers = ({"xen_ncm": {"channels": 2}},)
        source, code = _run_child(
            _source_main,
            self.source.address,
            domid,
            endpoint,
            migration_id,
            token,
            self.state_path,
            fault,
            trigger,
            layers,
        )
        result = Result(migration_id, source, code, None)
        if result.killed:
            result.recovered = self.recover()
        elif source is not None and source["phase"] == Phase.IN_DOUBT.value:
            # The restarted engine settles what the source could not.
            result.recovered = self.recover()
        result.destination = self.destination_result()
        return result

    def recover(self) -> list[dict]:
        outcomes, code = _run_child(
            _recovery_main, self.source.address, self.state_path
        )
        if code != 0:
            raise RuntimeError(f"recovery exited with {code}")
        return outcomes

    def destination_result(self) -> tuple[str, str] | None:
        if not self.destination.alive:
            return None
        try:
            return self.destination.client.receiver_result(PARTY_TIMEOUT)
        except (EOFError, OSError):
            return None


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])
