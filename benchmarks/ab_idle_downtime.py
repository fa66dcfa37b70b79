"""Idle running guest's downtime, this tree against another, alternating.

Not a test: run ``python benchmarks/ab_idle_downtime.py --baseline
/work/main [--baseline-python python3] [--memory 64M,2G] [--pairs 5]``.
Each migration runs in a fresh interpreter (``bench_migration.migrate``
of its own tree: the source in that interpreter, the destination in a
child; ``downtime`` policy, 10 ms target, one channel, no checker):
this tree with the interpreter running this script, the baseline with
``--baseline-python`` (one that imports the baseline's package). Per
pair, and per size in turn, both trees run, the order swapped every
pair; the load average is noted before each pair. Prints each run,
then per size the medians, their ratio, the median of the pairs'
ratios and how many pairs the tree beat.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

CODE = """
import sys
sys.path.insert(0, {bench!r})
from bench_migration import migrate, parse_size
r = migrate(
    parse_size({size!r}),
    {{"dirty_rate": 0}},
    {{"precopy_policy": "downtime", "downtime_target": 0.01, "channels": 1}},
)
print("DOWNTIME", r["downtime"])
"""


def one(python: str, tree: str, size: str) -> float:
    """One migration of ``tree``'s engine; its downtime in ms."""
    bench = str(pathlib.Path(tree) / "benchmarks")
    out = subprocess.run(
        [python, "-c", CODE.format(bench=bench, size=size)],
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in out.stdout.splitlines():
        if line.startswith("DOWNTIME"):
            return float(line.split()[1]) * 1e3
    raise RuntimeError(f"{tree}: no downtime: {out.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--baseline-python", default="python3")
    parser.add_argument("--memory", default="64M,2G")
    parser.add_argument("--pairs", default=5, type=int)
    args = parser.parse_args()
    trees = {
        "before": (args.baseline_python, args.baseline),
        "after": (sys.executable, str(pathlib.Path(__file__).parent.parent)),
    }
    sizes = args.memory.split(",")
    runs = {s: {"before": [], "after": [], "load": []} for s in sizes}
    for pair in range(args.pairs):
        for size in sizes:
            runs[size]["load"].append(os.getloadavg()[0])
            order = ("before", "after")
            for name in order if pair % 2 == 0 else order[::-1]:
                downtime = one(*trees[name], size)
                runs[size][name].append(downtime)
                print(
                    f"{time.strftime('%H:%M:%S')} {size} pair {pair} {name} "
                    f"{downtime:.1f} ms, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    for size in sizes:
        before, after = runs[size]["before"], runs[size]["after"]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        print(
            f"{size}: before {statistics.median(before):.1f} ms "
            f"({' '.join(f'{x:.1f}' for x in before)}), after "
            f"{statistics.median(after):.1f} ms "
            f"({' '.join(f'{x:.1f}' for x in after)}), after/before "
            f"{statistics.median(after) / statistics.median(before):.2f} "
            f"(pairs: median {statistics.median(ratios):.2f}, "
            f"{sum(r < 1 for r in ratios)} of {len(ratios)} lower), load "
            f"{min(runs[size]['load']):.1f} to {max(runs[size]['load']):.1f}"
        )


if __name__ == "__main__":
    main()
