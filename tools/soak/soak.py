"""Randomized fault soak of the migration engine.

Run from the source tree: ``python tools/soak/soak.py --count 200
--seed 7``. Each migration moves a fresh guest between two simulated
hosts in separate processes with a fault of a random kind at a random
phase or in a window of the commit (or none); prints the seed, the
count of each outcome and fault, of lost and duplicated guests (a double
run is caught while it happens, from the ledger both hosts keep) and of
migrations the transparency checker failed, and exits 1 unless all
three are 0. See
doc/source/faults.rst.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=100, help="migrations to run"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the fault choices (default: a fresh one, printed)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no line per migration"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    # The rig is test support: it lives with the fault tests.
    sys.path.insert(0, str(ROOT))
    from tests.functional.faults.soak import soak

    print(f"seed: {seed}")
    report = soak(
        args.count,
        seed,
        progress=None if args.quiet else print,
    )
    print(report.as_text())
    ok = report.lost == 0 and report.duplicated == 0
    return 0 if ok and report.not_transparent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
