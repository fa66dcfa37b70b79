"""Per-step timeline of an idle running guest's pause, on both hosts.

Not a test: run ``python benchmarks/trace_pause.py [--memory 64M]
[--runs 2] [--min-ms 0.3]``. Migrates an idle running guest between two
simulated hosts (``downtime`` policy, 10 ms target, one channel; the
source in this process, the destination in a child, as
``bench_migration.py`` does) with the engine's, the journal's, the
transport's and the simulated host's calls of the pause wrapped and
timed, ``os.fdatasync`` included. Both processes stamp their calls with
``CLOCK_MONOTONIC`` (one clock on one machine) into files of their own
on tmpfs; at the end it prints, per migration, every call of at least
``--min-ms`` from the source's pause request to its receipt of
COMMITTED, with the side (S: source, D: destination), start, end and
duration in milliseconds from the pause request, and the thread.

The wrapping costs a few microseconds per call: the timeline says where
the pause goes, the downtime figures come from ``bench_migration.py``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import glob
import inspect
import os
import pathlib
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from bench_migration import migrate  # noqa: E402
from bench_migration import parse_size  # noqa: E402

from nova_xen_ncm.engine import commit  # noqa: E402
from nova_xen_ncm.engine import datapath  # noqa: E402
from nova_xen_ncm.engine import guest_stream  # noqa: E402
from nova_xen_ncm.engine import journal  # noqa: E402
from nova_xen_ncm.engine import receiver  # noqa: E402
from nova_xen_ncm.engine import restorer  # noqa: E402
from nova_xen_ncm.engine import sender  # noqa: E402
from nova_xen_ncm.engine import state  # noqa: E402
from nova_xen_ncm.engine import transport  # noqa: E402
from nova_xen_ncm.host.sim import digest as simdigest  # noqa: E402
from nova_xen_ncm.host.sim import guestproc  # noqa: E402
from nova_xen_ncm.host.sim import host as simhost  # noqa: E402
from nova_xen_ncm.host.sim import hypervisor  # noqa: E402
from nova_xen_ncm.host.sim import memory  # noqa: E402
from nova_xen_ncm.host.sim import toolstack  # noqa: E402

#: Where each process writes its calls (inherited by the destination).
TRACE_DIR = "NOVA_XEN_NCM_TRACE_DIR"

#: The calls timed: (owner, method names).
TIMED = [
    (state.MigrationState, ["transition"]),
    (journal.Journal, ["append"]),
    (journal.Record, ["_await_sync"]),
    (
        sender.Sender,
        ["_stop_and_copy", "_send_final", "_restore", "_commit"],
    ),
    (commit.Coordinator, ["commit"]),
    (receiver.Receiver, ["_receive", "_ready", "_await_commit", "_commit"]),
    (transport.Channel, ["send", "receive"]),
    (datapath.DataPath, ["flush", "send_numbered", "on_channels"]),
    (restorer.Restorer, ["apply", "page_record"]),
    (guest_stream.GuestStream, ["platform", "pv_records", "finish"]),
    (
        simhost.SimHost,
        [
            "pause_for_save",
            "quiesce_backends",
            "guest_features",
            "populated_pfns",
            "unpause",
            "harvest_dirty",
            "guest_state",
            "export_pv_state",
            "import_pv_state",
            "_frontends",
            "_kernel_record",
            "_digest_grants",
            "_digest_shared_info",
        ],
    ),
    (simdigest.MemoryDigest, ["digest"]),
    (hypervisor.Domain, ["request"]),
    (memory.GuestMemory, ["hold_tracking"]),
    (toolstack.Toolstack, ["_spawn"]),
    (guestproc.GuestProcesses, ["replenish"]),
]


class Recorder:
    """This process's calls, a line each, to ``<dir>/<pid>.tr``."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, f"{os.getpid()}.tr")
        self._file = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def record(self, name: str, start: float, end: float, extra: str) -> None:
        thread = threading.current_thread().name.replace(" ", "_")
        line = f"{os.getpid()} {thread} {name} {start:.6f} {end:.6f} {extra}"
        with self._lock:
            self._file.write(line + "\n")


def _extra(name: str, args: tuple, kwargs: dict) -> str:
    if name == "MigrationState.transition" and len(args) >= 3:
        return f"{args[1].value}->{args[2].value}"
    if name == "Journal.append":
        # ``sync`` is keyword-only: the positional arguments never say.
        return "sync" if kwargs.get("sync", True) else "append"
    if name in ("Channel.send", "Domain.request") and len(args) > 1:
        msg = args[1]
        return (
            msg.get("cmd", "") if isinstance(msg, dict) else type(msg).__name__
        )
    return ""


def _timed(recorder: Recorder, name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            recorder.record(
                name, start, time.monotonic(), _extra(name, args, kwargs)
            )

    return call


_installed: list[str] = []


def install(directory: str) -> None:
    """Wrap the calls of :data:`TIMED` and ``os.fdatasync`` (once)."""
    if _installed:
        return
    _installed.append(directory)
    recorder = Recorder(directory)
    for owner, names in TIMED:
        for attr in names:
            fn = getattr(owner, attr)
            wrapped = _timed(recorder, f"{owner.__name__}.{attr}", fn)
            if isinstance(inspect.getattr_static(owner, attr), staticmethod):
                wrapped = staticmethod(wrapped)
            setattr(owner, attr, wrapped)
    os.fdatasync = _timed(recorder, "os.fdatasync", os.fdatasync)
    started: list[float] = []

    def collected(phase: str, info: dict) -> None:
        # The collector's passes, which stop every thread of the process.
        if phase == "start":
            started[:] = [time.monotonic()]
        elif started:
            recorder.record(
                "gc.collect",
                started[0],
                time.monotonic(),
                f"gen{info.get('generation')}",
            )

    gc.callbacks.append(collected)


def timeline(directory: str, min_ms: float) -> list[str]:
    """The pauses found in ``directory``'s files, as printable lines."""
    calls = []
    for path in glob.glob(os.path.join(directory, "*.tr")):
        with open(path) as f:
            for line in f:
                pid, thread, name, start, end, *extra = line.split(" ", 5)
                extra = extra[0].strip() if extra else ""
                calls.append(
                    (float(start), float(end), pid, thread, name, extra)
                )
    calls.sort()
    lines = []
    for pause in (c for c in calls if c[4] == "SimHost.pause_for_save"):
        at, source = pause[0], pause[2]
        ends = [
            c[1] for c in calls if c[4] == "Coordinator.commit" and c[0] > at
        ]
        end = ends[0] if ends else at
        lines.append(f"pause: {(end - at) * 1e3:.1f} ms")
        for start, stop, pid, thread, name, extra in calls:
            if not at <= start <= end:
                continue
            if (stop - start) * 1e3 < min_ms and name != "os.fdatasync":
                continue
            side = "S" if pid == source else "D"
            lines.append(
                f"{side} {(start - at) * 1e3:8.2f} {(stop - at) * 1e3:8.2f} "
                f"{(stop - start) * 1e3:7.2f}  {thread[:20]:20} {name} {extra}"
            )
    return lines


if os.environ.get(TRACE_DIR):
    # The destination process imports this module again (spawn): its
    # calls are timed too.
    install(os.environ[TRACE_DIR])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", default="64M", type=parse_size)
    parser.add_argument("--runs", default=2, type=int)
    parser.add_argument("--min-ms", default=0.3, type=float)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        os.environ[TRACE_DIR] = directory
        install(directory)
        for _ in range(args.runs):
            result = migrate(
                args.memory,
                {"dirty_rate": 0},
                {
                    "precopy_policy": "downtime",
                    "downtime_target": 0.01,
                    "channels": 1,
                },
            )
            print(f"downtime {result['downtime'] * 1e3:.1f} ms")
        print("\n".join(timeline(directory, args.min_ms)))


if __name__ == "__main__":
    main()
