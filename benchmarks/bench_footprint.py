"""Memory each host uses beyond guest RAM during a live migration, by
guest size, and its growth per GiB of guest RAM.

Not a test: run ``python benchmarks/bench_footprint.py [--sizes
256M,512M,1G,2G] [--runs 3] [--cases paused-plain,...]``.

Each host (source and destination) is a process of its own
(``nova-xen-ncm demo``'s host process); this process only drives them
and samples their memory from ``/proc``. For each process:

- ``extra``: its resident memory that is neither the guest's RAM nor a
  file: private anonymous pages (the interpreter's heap, numpy arrays,
  buffers, thread stacks) plus shared memory other than the guests'
  RAM memfds (the simulated hypervisor's per-domain tables, rings).
  Taken as ``RssAnon`` of ``/proc/PID/status`` (every ``--interval``
  seconds) plus the ``Rss`` of the process's shared mappings that are
  not a guest RAM memfd (``/memfd:*-ram``), from ``/proc/PID/smaps``
  (every ``--smaps-interval``). File-backed pages (the interpreter's
  and libraries' code, shared with every other process) and the guest
  RAM's pages are left out.
- ``baseline``: ``extra`` just before the migration starts (the host
  process up, the source's guest created, the destination listening).
- ``peak``: the highest ``extra`` sampled while the migration runs, up
  to the destination's answer. ``growth`` = peak - baseline.

Sampling misses allocations that live shorter than the interval; the
numbers are a lower bound of the true peak by what a short-lived buffer
holds (``--interval`` 5 ms by default).

The guest processes (the simulated guest's vCPUs, which Xen runs in the
hypervisor) are not counted.

Cases: ``paused`` (a paused guest of random RAM, or zero RAM with
``--fill zero``) and ``dirty`` (a
running guest of random RAM writing ``--dirty-rate`` uniformly), each
over plain TCP and over mutual TLS (``[xen_ncm] tls_enabled``, the
certificates of ``compare_qemu.py``), with the hosts' defaults
otherwise (``--channels``, ``--compression`` to change them). The
sizes go in the order given, reversed every other run.

Prints a table (median and range over the runs), a least-squares fit of
peak and growth against guest GiB per case and side, its value at 8 GiB,
and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import bench_migration  # noqa: E402

from nova_xen_ncm.cmd import demo  # noqa: E402
from nova_xen_ncm.host import base  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
RESULTS = pathlib.Path(__file__).parent / "results"
CASES = ("paused-plain", "paused-tls", "dirty-plain", "dirty-tls")


def _status(pid: int) -> dict[str, int]:
    """``/proc/PID/status`` memory fields, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("Rss", "VmHWM", "VmRSS")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _other_shmem(pid: int) -> int:
    """Resident octets of ``pid``'s shared mappings that are not a guest
    RAM memfd and not a file (``/proc/PID/smaps``)."""
    total = 0
    counting = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                # A mapping's header: address perms offset dev inode name.
                fields = line.split(None, 5)
                name = fields[5].strip() if len(fields) > 5 else ""
                shared = fields[1][3] == "s"
                ram = name.startswith("/memfd:") and "-ram" in name
                is_file = name.startswith("/") and not name.startswith(
                    ("/memfd:", "/dev/zero", "/SYSV")
                )
                counting = shared and not ram and not is_file
            elif counting and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


class Footprint(threading.Thread):
    """Samples ``extra`` (see the module's docstring) of one process."""

    def __init__(
        self, pid: int, interval: float, smaps_interval: float
    ) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.smaps_interval = smaps_interval
        self.shmem = _other_shmem(pid)
        self.peak_anon = 0
        self.baseline = self.now()
        self.peak = self.baseline
        self.samples = 0
        self._done = threading.Event()

    def now(self) -> int:
        anon = _status(self.pid)["RssAnon"]
        self.peak_anon = max(self.peak_anon, anon)
        return anon + self.shmem

    def run(self) -> None:
        next_smaps = time.monotonic() + self.smaps_interval
        while not self._done.wait(self.interval):
            try:
                if time.monotonic() >= next_smaps:
                    self.shmem = _other_shmem(self.pid)
                    next_smaps = time.monotonic() + self.smaps_interval
                self.peak = max(self.peak, self.now())
                self.samples += 1
            except (OSError, KeyError):
                return  # the process went

    def stop(self) -> dict:
        self._done.set()
        self.join()
        try:
            self.shmem = _other_shmem(self.pid)
            self.peak = max(self.peak, self.now())
        except (OSError, KeyError):
            pass
        return {
            "baseline": self.baseline,
            "peak": self.peak,
            "growth": self.peak - self.baseline,
            "peak_anon": self.peak_anon,
            "other_shmem": self.shmem,
            "samples": self.samples,
        }


def host_settings(args: argparse.Namespace, tls: dict | None) -> dict:
    settings: dict = {}
    if args.channels is not None:
        settings["channels"] = args.channels
    if args.compression is not None:
        settings["compression"] = args.compression
    if tls is not None:
        settings.update(
            tls_enabled=True,
            tls_cert_file=tls["cert"],
            tls_key_file=tls["key"],
            tls_ca_file=tls["ca"],
        )
    return settings


def migrate(
    memory: int,
    case: str,
    args: argparse.Namespace,
    tls: dict | None,
) -> dict:
    """One migration between two fresh host processes; each one's
    memory beyond guest RAM."""
    paused = case.startswith("paused")
    host_mb = memory // MIB + 64
    conf = bench_migration.overrides(host_mb, host_settings(args, tls))
    if not args.prefault:
        # A guest of zero RAM stays sparse on both hosts: nothing of
        # its size is faulted in ahead.
        conf["xen_ncm_sim"]["prefault_memory_mb"] = 0
    source = demo.HostProcess("source", [], conf)
    destination = demo.HostProcess("destination", [], conf)
    source.peers = [destination]
    destination.peers = [source]
    try:
        workload = {"fill": args.fill, "dirty_rate": 0}
        if not paused:
            workload.update(dirty_rate=args.dirty_rate, pattern="uniform")
        domid = source.call(
            "create",
            base.DomainConfig(
                name="bench",
                memory_bytes=memory,
                vcpus=2,
                workload=workload,
            ),
        )
        if paused:
            source.call("pause", domid)
        migration_id = str(uuid.uuid4())
        token, endpoint = destination.call(
            "listen", migration_id, domid, False
        )
        samplers = {
            side: Footprint(
                host.process.pid, args.interval, args.smaps_interval
            )
            for side, host in (
                ("source", source),
                ("destination", destination),
            )
        }
        for sampler in samplers.values():
            sampler.start()
        start = time.perf_counter()
        # Neither host takes the checker's snapshot (it reads all of the
        # guest's RAM for the demo's report): the engine alone is measured.
        sent = source.call("send", domid, endpoint, migration_id, token, False)
        received = destination.call("wait_incoming")
        elapsed = time.perf_counter() - start
        out = {side: s.stop() for side, s in samplers.items()}
        if sent["phase"] != "done" or received["phase"] != "done":
            raise RuntimeError(
                f"migration ended {sent['phase']}/{received['phase']}: "
                f"{sent['error'] or received['error']}"
            )
        out["seconds"] = elapsed
        out["rounds"] = len(sent["stats"]["rounds"])
        out["bytes_sent"] = sent["stats"]["bytes_sent"]
        return out
    finally:
        source.close()
        destination.close()


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through ``points`` (x, y): (intercept, slope)."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--sizes", default="256M,512M,1G,2G")
    parser.add_argument("--runs", default=3, type=int)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--dirty-rate", default="32M", type=bench_migration.parse_size
    )
    parser.add_argument("--channels", default=None, type=int)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--interval", default=0.005, type=float)
    parser.add_argument("--fill", default="random", choices=("random", "zero"))
    parser.add_argument(
        "--no-prefault",
        dest="prefault",
        action="store_false",
        help="no host faults its free memory in ahead (with --fill zero, "
        "guests larger than the machine's free memory)",
    )
    parser.add_argument("--smaps-interval", default=0.1, type=float)
    args = parser.parse_args()
    sizes = [bench_migration.parse_size(s) for s in args.sizes.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {CASES}")
    tls = None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    if any(c.endswith("tls") for c in cases):
        import compare_qemu

        tls = compare_qemu.make_certificates(workdir)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "sizes": sizes,
        "runs": args.runs,
        "dirty_rate": args.dirty_rate,
        "channels": args.channels,
        "compression": args.compression,
        "fill": args.fill,
        "prefault": args.prefault,
        "interval": args.interval,
        "loadavg_start": os.getloadavg(),
        "raw": [],
    }
    for run in range(args.runs):
        for case in cases:
            # Alternate the order of sizes run by run.
            order = sizes if run % 2 == 0 else sizes[::-1]
            for size in order:
                out = migrate(
                    size,
                    case,
                    args,
                    tls if case.endswith("tls") else None,
                )
                out.update(case=case, size=size, run=run)
                results["raw"].append(out)
                print(
                    f"run {run} {case:<13} {size / MIB:>6.0f} MiB  "
                    f"source {out['source']['peak'] / MIB:6.1f} "
                    f"(+{out['source']['growth'] / MIB:5.1f})  destination "
                    f"{out['destination']['peak'] / MIB:6.1f} "
                    f"(+{out['destination']['growth'] / MIB:5.1f}) MiB  "
                    f"{out['seconds']:.1f} s",
                    flush=True,
                )
    results["loadavg_end"] = os.getloadavg()

    summary: dict = {}
    print()
    print(
        f"{'case':<13}{'guest':>7}  {'side':<12}{'baseline':>10}"
        f"{'peak (range)':>22}{'growth (range)':>22}"
    )
    for case in cases:
        for side in ("source", "destination"):
            for size in sizes:
                rows = [
                    r[side]
                    for r in results["raw"]
                    if r["case"] == case and r["size"] == size
                ]
                entry = {
                    key: {
                        "median": statistics.median(r[key] for r in rows),
                        "min": min(r[key] for r in rows),
                        "max": max(r[key] for r in rows),
                    }
                    for key in ("baseline", "peak", "growth")
                }
                summary[f"{case}/{side}/{size}"] = entry
                p, g = entry["peak"], entry["growth"]
                print(
                    f"{case:<13}{size / MIB:>6.0f}M  {side:<12}"
                    f"{entry['baseline']['median'] / MIB:>10.1f}"
                    f"{p['median'] / MIB:>10.1f} ({p['min'] / MIB:.1f}-"
                    f"{p['max'] / MIB:.1f})"
                    f"{g['median'] / MIB:>10.1f} ({g['min'] / MIB:.1f}-"
                    f"{g['max'] / MIB:.1f})"
                )
    results["summary"] = summary
    fits: dict = {}
    print()
    # A line through one guest size has no slope to extrapolate by.
    fitted = cases if len(set(sizes)) > 1 else []
    print(
        "least squares over every run, MiB = a + b * guest GiB:"
        if fitted
        else "no least squares: it needs two guest sizes or more"
    )
    for case in fitted:
        for side in ("source", "destination"):
            for key in ("peak", "growth"):
                points = [
                    (r["size"] / GIB, r[side][key] / MIB)
                    for r in results["raw"]
                    if r["case"] == case
                ]
                a, b = fit(points)
                fits[f"{case}/{side}/{key}"] = {
                    "intercept_mib": a,
                    "slope_mib_per_gib": b,
                    "at_8g_mib": a + 8 * b,
                }
                print(
                    f"{case:<13}{side:<12}{key:<7} a {a:6.1f}  b "
                    f"{b:6.2f} MiB/GiB  at 8 GiB {a + 8 * b:6.1f} MiB"
                )
    results["fits"] = fits
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"footprint-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
