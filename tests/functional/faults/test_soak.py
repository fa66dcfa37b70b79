"""A bounded soak in CI: 50 migrations with random faults, no guest lost
or duplicated (at the end or at any moment by the hosts' ledger), every
completed migration transparent. A fresh seed every run, printed (and
taken from NOVA_XEN_NCM_SOAK_SEED to replay one)."""

from __future__ import annotations

import os
import random

from .soak import soak

COUNT = 50


def test_soak_loses_and_duplicates_nothing(tmp_path):
    seed = int(
        os.environ.get("NOVA_XEN_NCM_SOAK_SEED") or random.randrange(2**32)
    )
    print(f"soak seed: {seed}")
    report = soak(COUNT, seed, workdir=str(tmp_path))
    text = f"seed {seed}\n{report.as_text()}"
    print(text)
    assert report.migrations == COUNT
    assert report.lost == 0, text
    assert report.duplicated == 0, text
    assert report.not_transparent == 0, text
    assert report.checked > 0, text
    # The faults did happen: not every migration simply completed.
    assert report.outcomes["done"] < COUNT, text
