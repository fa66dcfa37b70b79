"""What the hypervisor's write tracking costs (memory.WriteTracker).

Not a test: run ``python benchmarks/bench_write_tracking.py
[--memory-mb N] [--repeat N]``. In this process, a memfd of guest RAM
is written one store per page (as a dirtying workload does) without
tracking, then with every page write-protected (each store takes the
asynchronous write-protect fault), and ``PAGEMAP_SCAN`` reads and
re-arms the written bits with every page written and with none. The
figures are ratios to the untracked stores of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.sim import memory
from nova_xen_ncm.host.sim.memory import GuestMemory

MB = 1 << 20


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    reason = memory.write_tracking_available()
    if reason is not None:
        raise SystemExit(reason)
    pages = args.memory_mb * MB // PAGE_SIZE
    plain = GuestMemory.create(pages, "bench-plain")
    tracked = GuestMemory.create(pages, "bench-tracked")
    # Both backed first, so that neither measures page allocation.
    plain.ram[:, 0] = 1
    tracked.ram[:, 0] = 1
    uffd = tracked.arm_write_tracking()
    assert uffd is not None
    tracker = memory.WriteTracker(
        os.getpid(), tracked.ram.ctypes.data, tracked.ram_size
    )
    tracker.scan()
    value = np.uint8(2)

    def store_plain() -> None:
        plain.ram[:, 8] = value

    def store_tracked() -> None:
        tracked.ram[:, 8] = value

    def scan_after_stores() -> float:
        tracked.ram[:, 8] = value  # every page written, protected again
        t0 = time.perf_counter()
        found = tracker.scan()
        assert len(found) == pages
        return time.perf_counter() - t0

    untracked = _best(store_plain, args.repeat)
    faulting = []
    for _ in range(args.repeat):
        tracker.scan()  # protect every page again
        t0 = time.perf_counter()
        store_tracked()
        faulting.append(time.perf_counter() - t0)
    scan_full = min(scan_after_stores() for _ in range(args.repeat))
    scan_empty = _best(tracker.scan, args.repeat)
    figures = {
        "memory_mb": args.memory_mb,
        "pages": pages,
        "store_per_page_untracked_ns": untracked / pages * 1e9,
        "store_per_page_first_after_scan_ns": min(faulting) / pages * 1e9,
        "fault_ratio": min(faulting) / untracked,
        "scan_all_written_ms": scan_full * 1e3,
        "scan_none_written_ms": scan_empty * 1e3,
        "scan_all_written_per_gib_ms": scan_full * 1e3 * 1024 / args.memory_mb,
        "scan_ratio_to_untracked_stores": scan_full / untracked,
    }
    for key, value_ in figures.items():
        print(f"{key:40s} {value_:.3f}")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/write_tracking.json", "w") as f:
        json.dump(figures, f, indent=2)
    tracker.close()
    os.close(uffd)
    plain.close()
    tracked.close()


if __name__ == "__main__":
    main()
