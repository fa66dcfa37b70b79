"""What one journal version costs to make durable, written four ways.

Not a test: run ``python benchmarks/bench_journal_sync.py [--dir DIR]
[--writes 40] [--sittings 2]``, ``--dir`` on the file system of
``[xen_ncm] state_path``. Each way writes a 340-octet version
``--writes`` times, the ways taking turns write by write (the other
work's I/O moves the device's flush from one moment to the next), 20
ms apart, and prints the median, 10th and 90th percentile in
milliseconds:

- ``append+fdatasync``: the journal's way (``Journal.append``): open
  with ``O_APPEND``, write, ``fdatasync``, close; each append grows the
  file, so its size (metadata) is synced too;
- ``in place+fdatasync``: ``pwrite`` over octets written (and synced)
  ahead, then ``fdatasync``: no allocation, no size change;
- ``in place O_DSYNC``: the same ``pwrite`` on a descriptor opened
  ``O_DSYNC``;
- ``fallocate+fdatasync``: ``pwrite`` into ``fallocate``'s unwritten
  extents (their conversion is metadata);
- ``append, no sync``: what a restarted engine reads without a sync.
"""

from __future__ import annotations

import argparse
import collections.abc
import os
import statistics
import tempfile
import time

LINE = b"%08x %s\n" % (0, b"x" * 330)
AHEAD = 1 << 16


def _timed(
    writes: int, each: dict[str, collections.abc.Callable[[int], None]]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in each}
    for i in range(writes):
        for name, fn in each.items():
            start = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - start) * 1e3)
            time.sleep(0.02)
    return {name: sorted(t) for name, t in times.items()}


def _written_ahead(path: str, flags: int = 0) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
    os.write(fd, b"\0" * AHEAD)
    os.fsync(fd)
    return fd


def ways(directory: str) -> dict[str, collections.abc.Callable[[int], None]]:
    appended = os.path.join(directory, "append")
    unsynced = os.path.join(directory, "nosync")
    in_place = _written_ahead(os.path.join(directory, "inplace"))
    dsync_path = os.path.join(directory, "dsync")
    os.close(_written_ahead(dsync_path))
    dsync = os.open(dsync_path, os.O_RDWR | os.O_DSYNC)
    falloc = os.open(os.path.join(directory, "falloc"), os.O_RDWR | os.O_CREAT)
    os.posix_fallocate(falloc, 0, 1 << 20)
    os.fsync(falloc)

    def append(i: int, sync: bool = True) -> None:
        fd = os.open(
            appended if sync else unsynced,
            os.O_RDWR | os.O_CREAT | os.O_APPEND,
            0o600,
        )
        try:
            os.write(fd, LINE)
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def over(i: int) -> None:
        os.pwrite(in_place, LINE, (i * len(LINE)) % (AHEAD - len(LINE)))
        os.fdatasync(in_place)

    def over_dsync(i: int) -> None:
        os.pwrite(dsync, LINE, (i * len(LINE)) % (AHEAD - len(LINE)))

    def into_falloc(i: int) -> None:
        os.pwrite(falloc, LINE, i * 4096)
        os.fdatasync(falloc)

    append(0)
    return {
        "append+fdatasync": append,
        "in place+fdatasync": over,
        "in place O_DSYNC": over_dsync,
        "fallocate+fdatasync": into_falloc,
        "append, no sync": lambda i: append(i, sync=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--writes", default=40, type=int)
    parser.add_argument("--sittings", default=2, type=int)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        each = ways(directory)
        for sitting in range(args.sittings):
            print(f"sitting {sitting + 1}, load {os.getloadavg()[0]:.2f}")
            for name, t in _timed(args.writes, each).items():
                print(
                    f"  {name:22} median {statistics.median(t):6.2f} "
                    f"p10 {t[len(t) // 10]:6.2f} "
                    f"p90 {t[len(t) * 9 // 10]:6.2f} ms"
                )


if __name__ == "__main__":
    main()
