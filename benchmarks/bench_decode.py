"""How fast the decoder gets through the PAGE_DATA of a 1 GiB stream,
as a ratio against a plain memory copy of the same octets.

Not a test: run ``python benchmarks/bench_decode.py [--size-mb N]
[--batch PAGES] [--repeat N]``. It builds a libxc stream in memory
(PAGE_DATA records of ``--batch`` pages, written by the Encoder), then
times, in the same run:

- ``copy``: one memory copy of the whole stream into a preallocated buffer
  (what any receiver pays at least once): the baseline of the ratios;
- ``copy-new``: the same copy into newly allocated memory (the page
  faults of fresh memory included), for reference;
- ``exact``: decoding fed exactly ``bytes_needed`` octets at a time, as a
  receiver that reads each record into its own buffer would (zero-copy:
  page data are views of the fed octets);
- ``16MiB``: decoding fed in 16 MiB chunks (records inside a chunk are
  views, records across chunks are assembled once);
- ``64KiB``: decoding fed in socket-sized 64 KiB chunks (every record is
  assembled from its chunks: one copy).

Each decode touches what a receiver uses: the pfn and type arrays and the
page data view. Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

import numpy as np

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream.decoder import NEED_DATA
from nova_xen_ncm.stream.decoder import STREAM_END
from nova_xen_ncm.stream.decoder import Decoder
from nova_xen_ncm.stream.encoder import Encoder

MIB = 1 << 20
RESULTS = pathlib.Path(__file__).parent / "results"


def build_stream(size: int, batch: int) -> tuple[bytes, int]:
    """A libxc stream whose PAGE_DATA carry ``size`` octets of pages."""
    enc = Encoder()
    rng = np.random.default_rng(1)
    # One batch of page contents, reused: generation is not what we time.
    block = rng.integers(0, 256, size=batch * libxc.PAGE_SIZE, dtype=np.uint8)
    pages = memoryview(block).cast("B")
    types = np.zeros(batch, dtype=np.uint8)
    parts = enc.libxc_headers() + enc.libxc("STATIC_DATA_END")
    records = size // (batch * libxc.PAGE_SIZE)
    for n in range(records):
        pfns = np.arange(n * batch, (n + 1) * batch, dtype=np.uint64)
        parts += enc.page_data(pfns, types, pages)
    parts += enc.libxc("END")
    return b"".join(parts), records


def time_best(func: Callable[[], int], repeat: int) -> tuple[float, int]:
    best = float("inf")
    result = 0
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def _consume(record) -> int:
    value = record.value
    if isinstance(value, libxc.PageData):
        return len(value.pfns) + int(value.types[-1]) + len(value.data)
    return 0


def decode_chunked(stream: bytes, chunk: int) -> int:
    view = memoryview(stream)
    decoder = Decoder("libxc")
    total = 0
    for start in range(0, len(view), chunk):
        decoder.feed(view[start : start + chunk])
        for record in decoder.records():
            total += _consume(record)
    return total


def decode_exact(stream: bytes) -> int:
    view = memoryview(stream)
    decoder = Decoder("libxc")
    pos = 0
    total = 0
    while True:
        record = decoder.next_record()
        if record is STREAM_END:
            return total
        if record is NEED_DATA:
            need = decoder.bytes_needed
            decoder.feed(view[pos : pos + need])
            pos += need
            continue
        total += _consume(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    stream, records = build_stream(args.size_mb * MIB, args.batch)
    target = bytearray(len(stream))

    def copy() -> int:
        memoryview(target)[:] = stream
        return len(target)

    runs = {
        "copy": lambda: copy(),
        "copy-new": lambda: len(bytearray(stream)),
        "exact": lambda: decode_exact(stream),
        "16MiB": lambda: decode_chunked(stream, 16 * MIB),
        "64KiB": lambda: decode_chunked(stream, 64 * 1024),
    }
    timings = {}
    checks = set()
    for name, func in runs.items():
        seconds, result = time_best(func, args.repeat)
        timings[name] = seconds
        if not name.startswith("copy"):
            checks.add(result)
    if len(checks) != 1:
        raise SystemExit(f"decodes disagree: {checks}")

    base = timings["copy"]
    rows = [
        {
            "method": name,
            "seconds": round(sec, 4),
            "gib_per_s": round(len(stream) / sec / (1 << 30), 2),
            "ratio_to_copy": round(sec / base, 3),
        }
        for name, sec in timings.items()
    ]
    print(
        f"stream {len(stream) / MIB:.1f} MiB, {records} PAGE_DATA records "
        f"of {args.batch} pages, best of {args.repeat}"
    )
    print(f"{'method':<8} {'seconds':>9} {'GiB/s':>8} {'x copy':>8}")
    for row in rows:
        print(
            f"{row['method']:<8} {row['seconds']:>9.4f} "
            f"{row['gib_per_s']:>8.2f} {row['ratio_to_copy']:>8.3f}"
        )

    RESULTS.mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = RESULTS / f"bench_decode-{now:%Y%m%dT%H%M%SZ}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_decode",
                "utc": now.isoformat(timespec="seconds"),
                "stream_bytes": len(stream),
                "page_data_records": records,
                "batch_pages": args.batch,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "cpus": os.cpu_count(),
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
