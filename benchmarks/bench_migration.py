"""Live migration between two simulated hosts over loopback TCP, each
figure a ratio or a comparison measured in the same run.

Not a test: run ``python benchmarks/bench_migration.py [--memory 512M]
[--workload-memory 64M] [--runs 3] [--channels 1]
[--downtime-target 0.01]``. It measures:

- ``throughput``: a paused guest of incompressible (random) RAM against a
  plain socket transfer of the same octets (``sendall`` of 1 MiB buffers
  to a ``recv_into`` loop) on the same loopback: the throughput ratio, end
  to end and for the page round alone;
- ``workloads``: downtime, total time and octets sent of a guest that is
  idle, writes a hot working set, or dirties memory at 10, 50, 90 and 150
  percent of the bandwidth measured by the throughput run, with the
  ``downtime`` policy against ``xen-simple`` on the same workload, and
  the share of runs whose downtime stayed within ``downtime_target``;
- ``zero``: a guest whose RAM is all zero, total time against the random
  guest of the same size;
- ``rss``: the growth of the two hosts' resident memory during the
  throughput run. Both hold the guest's RAM before it starts (the
  source its guest's, the destination the RAM it faulted in ahead,
  ``[xen_ncm_sim] prefault_memory_mb``), so the growth is the engine's
  own memory beyond guest RAM.

The ``downtime`` policy of the workloads other than ``idle`` is told the
switch-over time measured on the idle guest in the same run (the median
of its ``downtime`` runs, ``[xen_ncm] switchover_estimate``) unless
``--switchover`` gives one.

The source host runs in this process, the destination in a child
process (``nova-xen-ncm demo``'s host process), as on two machines.

Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import threading
import time
import uuid

from nova_xen_ncm.cmd import demo
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost

MIB = 1 << 20
RESULTS = pathlib.Path(__file__).parent / "results"
CHUNK = MIB


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def overrides(host_mb: int, settings: dict) -> dict:
    """``{group: {option: value}}`` of a host of this benchmark."""
    xen_ncm = {
        "listen_address": "127.0.0.1",
        "io_timeout": 120.0,
        "accept_timeout": 120.0,
        "completion_timeout_per_gib": 0,
    }
    xen_ncm.update(settings)
    return {
        "xen_ncm": xen_ncm,
        "xen_ncm_sim": {
            "host_memory_mb": host_mb,
            "spare_guest_process": True,
            "prefault_memory_mb": host_mb,
        },
    }


def rss(pid: str | int = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """The peak resident memory of the processes ``pids`` together
    while it runs."""

    def __init__(self, pids: list[str | int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = self.now()
        self._done = threading.Event()

    def now(self) -> int:
        return sum(rss(pid) for pid in self.pids)

    def run(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.now())


def migrate(
    memory: int,
    workload: dict,
    settings: dict,
    *,
    paused: bool = False,
    sample_rss: bool = False,
) -> dict:
    """One migration between two fresh hosts; its figures. The source
    runs in this process, the destination in its own, as two hosts do:
    neither waits for the other's share of one interpreter."""
    host_mb = memory // MIB + 64
    conf = demo.make_conf([], overrides(host_mb, settings))
    destination = demo.HostProcess(
        "destination", [], overrides(host_mb, settings)
    )
    source = SimHost("source", conf)
    try:
        domid = source.create_domain(
            base.DomainConfig(
                name="bench",
                memory_bytes=memory,
                vcpus=2,
                workload=workload,
            )
        )
        if paused:
            source.pause(domid)
        migration_id = str(uuid.uuid4())
        token, endpoint = destination.call(
            "listen", migration_id, domid, False
        )
        sender = Sender(
            source, domid, tuple(endpoint), migration_id, token, conf=conf
        )
        sampler = None
        if sample_rss:
            sampler = RssSampler(["self", destination.process.pid])
        before = sampler.now() if sampler is not None else 0
        if sampler is not None:
            sampler.start()
        start = time.perf_counter()
        phase = sender.run()
        elapsed = time.perf_counter() - start
        incoming = destination.call("wait_incoming")
        peak = sampler.stop() if sampler is not None else None
        if phase is not Phase.DONE:
            raise RuntimeError(f"migration ended {phase}: {sender.error}")
        if incoming["phase"] != Phase.DONE.value:
            raise RuntimeError(f"destination ended {incoming}")
        stats = sender.stats.to_dict()
        out = {
            "seconds": elapsed,
            "rounds": len(sender.stats.rounds),
            "bytes_sent": stats["bytes_sent"],
            "downtime": stats["actual_downtime"],
            "bandwidth": sender.stats.rounds[0].bandwidth,
            "throttle": stats["throttle"],
        }
        if peak is not None:
            out["rss_growth"] = peak - before
        return out
    finally:
        source.close()
        destination.close()


def socket_baseline(size: int) -> float:
    """Seconds to move ``size`` octets over loopback TCP, plainly."""
    listener = socket.create_server(("127.0.0.1", 0))
    buf = bytearray(CHUNK)
    payload = memoryview(os.urandom(CHUNK))

    def receive() -> None:
        conn, _ = listener.accept()
        view = memoryview(buf)
        left = size
        with conn:
            while left:
                n = conn.recv_into(view[: min(left, CHUNK)])
                if not n:
                    break
                left -= n

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as conn:
        left = size
        while left:
            n = min(left, CHUNK)
            conn.sendall(payload[:n])
            left -= n
    thread.join()
    elapsed = time.perf_counter() - start
    listener.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", default="512M", type=parse_size)
    parser.add_argument("--workload-memory", default="64M", type=parse_size)
    parser.add_argument("--runs", default=3, type=int)
    parser.add_argument("--downtime-target", default=0.5, type=float)
    parser.add_argument("--channels", default=1, type=int)
    parser.add_argument(
        "--switchover",
        default=None,
        type=float,
        help="[xen_ncm] switchover_estimate of the downtime policy "
        "(default: the idle guest's median downtime in this run)",
    )
    args = parser.parse_args()
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "memory": args.memory,
        "workload_memory": args.workload_memory,
        "runs": args.runs,
        "channels": args.channels,
        "downtime_target": args.downtime_target,
    }

    # (a) and (d): the data path against a plain socket, same octets.
    plain = socket_baseline(args.memory)
    mig = migrate(
        args.memory,
        {"fill": "random", "dirty_rate": 0},
        {"precopy_policy": "xen-simple", "channels": args.channels},
        paused=True,
        sample_rss=True,
    )
    results["throughput"] = {
        "socket_seconds": plain,
        "migration_seconds": mig["seconds"],
        "socket_mib_s": args.memory / MIB / plain,
        "migration_mib_s": args.memory / MIB / mig["seconds"],
        "ratio": plain / mig["seconds"],
        # The page round alone, without setup, digests and commit.
        "round_mib_s": mig["bandwidth"] / MIB,
        "round_ratio": mig["bandwidth"] * plain / args.memory,
    }
    # Each host maps its guest's RAM: the source's becomes resident as
    # it is read, the destination's as it is written.
    results["rss"] = {"beyond_guest_ram": mig["rss_growth"]}

    # (c): zero RAM, same size.
    zero = migrate(
        args.memory,
        {"fill": "zero", "dirty_rate": 0},
        {"precopy_policy": "xen-simple", "channels": args.channels},
        paused=True,
    )
    results["zero"] = {
        "seconds": zero["seconds"],
        "bytes_sent": zero["bytes_sent"],
        "against_random": zero["seconds"] / mig["seconds"],
    }

    # (b): workloads, each policy, several runs.
    bandwidth = mig["bandwidth"]
    workloads = {
        "idle": {"dirty_rate": 0},
        "hot-working-set": {
            "dirty_rate": int(0.5 * bandwidth),
            "pattern": "hotcold",
            "hot_fraction": 0.05,
            "hot_probability": 0.99,
        },
    }
    for pct in (10, 50, 90, 150):
        workloads[f"dirty-{pct}%"] = {
            "dirty_rate": int(pct / 100 * bandwidth),
            "pattern": "uniform",
        }
    results["bandwidth"] = bandwidth
    table = {}
    switchover = args.switchover
    for name, workload in workloads.items():
        for pol in ("downtime", "xen-simple"):
            settings = {
                "precopy_policy": pol,
                "downtime_target": args.downtime_target,
                "channels": args.channels,
            }
            if pol == "downtime" and name != "idle" and switchover:
                settings["switchover_estimate"] = min(
                    switchover, args.downtime_target
                )
            runs = [
                migrate(args.workload_memory, dict(workload), settings)
                for _ in range(args.runs)
            ]
            downtimes = [r["downtime"] for r in runs]
            table[(name, pol)] = {
                "downtime_median": statistics.median(downtimes),
                "downtime_max": max(downtimes),
                "within_target": sum(
                    d <= args.downtime_target for d in downtimes
                )
                / len(downtimes),
                "seconds_median": statistics.median(
                    r["seconds"] for r in runs
                ),
                "bytes_median": statistics.median(
                    r["bytes_sent"] for r in runs
                ),
                "rounds_median": statistics.median(r["rounds"] for r in runs),
                "min_throttle": min(r["throttle"] for r in runs),
            }
            if name == "idle" and pol == "downtime" and switchover is None:
                switchover = statistics.median(downtimes)
    results["switchover_estimate"] = switchover
    results["workloads"] = {f"{n}/{p}": v for (n, p), v in table.items()}

    t = results["throughput"]
    print(
        f"throughput: migration {t['migration_mib_s']:.0f} MiB/s, plain "
        f"socket {t['socket_mib_s']:.0f} MiB/s, ratio {t['ratio']:.2f}; "
        f"page round alone {t['round_mib_s']:.0f} MiB/s, ratio "
        f"{t['round_ratio']:.2f}"
    )
    print(
        f"zero RAM: {zero['seconds']:.2f}s, "
        f"{results['zero']['against_random']:.2f} of the random guest's"
    )
    print(
        f"resident memory beyond guest RAM (both hosts) "
        f"{results['rss']['beyond_guest_ram'] / MIB:.0f} MiB"
    )
    print(f"measured bandwidth {bandwidth / MIB:.0f} MiB/s")
    print(
        f"downtime policy: target {args.downtime_target * 1e3:.0f} ms, "
        f"switch-over estimate {(switchover or 0) * 1e3:.1f} ms"
    )
    header = (
        f"{'workload':<18}{'policy':<12}{'downtime':>10}{'max':>8}"
        f"{'in target':>10}{'total s':>9}{'MiB sent':>10}{'rounds':>7}"
        f"{'throttle':>9}"
    )
    print(header)
    for (name, pol), v in table.items():
        print(
            f"{name:<18}{pol:<12}{v['downtime_median']:>10.3f}"
            f"{v['downtime_max']:>8.3f}{v['within_target']:>10.0%}"
            f"{v['seconds_median']:>9.2f}"
            f"{v['bytes_median'] / MIB:>10.1f}{v['rounds_median']:>7.0f}"
            f"{v['min_throttle']:>9.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"migration-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
