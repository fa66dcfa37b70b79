"""A bounded soak in CI: 50 migrations with random faults (seeded), no
guest lost or duplicated."""

from __future__ import annotations

from .soak import soak

COUNT = 50
SEED = 20261125


def test_soak_loses_and_duplicates_nothing(tmp_path):
    report = soak(COUNT, SEED, workdir=str(tmp_path))
    print(report.as_text())
    assert report.migrations == COUNT
    assert report.lost == 0, report.as_text()
    assert report.duplicated == 0, report.as_text()
    # The faults did happen: not every migration simply completed.
    assert report.outcomes["done"] < COUNT, report.as_text()
