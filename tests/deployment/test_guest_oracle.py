"""The deployment tier's guest oracle (guest_ram.py) on RAM made here:
each verdict passes an intact guest and fails the fault it is for, so a
passing migration test says something. No cloud needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "deployment_guest_ram", Path(__file__).with_name("guest_ram.py")
)
guest_ram = sys.modules.get(_spec.name) or importlib.util.module_from_spec(
    _spec
)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = guest_ram
    _spec.loader.exec_module(guest_ram)

WORDS = guest_ram.PAGE // 8
HEAP = guest_ram.HEAP_START_PFN


def _stamp(vcpu: int) -> int:
    return guest_ram.STAMP_MAGIC | vcpu << 32


def _snap(host, counter, events, pages, seed=7, pid=100, at=0.0):
    header = dict.fromkeys(guest_ram.HEADER_NAMES, 0)
    header.update(
        magic=guest_ram.MAGIC, version=1, nr_vcpus=1, seed=seed,
        dirty_rate=1 << 20, pv_drivers=1,
    )  # fmt: skip
    words = np.zeros((len(pages), WORDS), dtype=np.uint64)
    for i, page in enumerate(pages):
        words[i, : len(page)] = page
    return guest_ram.Snapshot(
        host=host,
        process=guest_ram.GuestProcess(pid, 3, f"{host}-d1"),
        header=header,
        vcpus=[dict(counter=counter, events=events)],
        pfns=np.arange(HEAP, HEAP + len(pages), dtype=np.int64),
        words=words,
        taken=at,
    )


# Three heap pages: written by vCPU 0 at counter 5, boot-filled, zero.
BEFORE_PAGES = [[_stamp(0), 5], [0x1234, 0x5678, 9], []]


def _after(**change):
    resumed_pages = [list(p) for p in BEFORE_PAGES]
    resumed_pages[0] = [_stamp(0), 7]
    args = dict(counter=8, events=3, later_counter=9, later_events=4)
    args.update(change.pop("args", {}))
    for index, page in change.pop("pages", {}).items():
        resumed_pages[index] = page
    resumed = _snap("dst", args["counter"], args["events"], resumed_pages,
                    seed=change.pop("seed", 7), at=1.0)  # fmt: skip
    later = _snap("dst", args["later_counter"], args["later_events"], [],
                  at=3.0)  # fmt: skip
    later.pfns, later.words = resumed.pfns, resumed.words
    return resumed, later


def test_an_intact_guest_passes():
    before = _snap("src", 6, 2, BEFORE_PAGES)
    assert guest_ram.judge(before, *_after()) == []


@pytest.mark.parametrize(
    ("fault", "change", "named"),
    [
        ("another guest", {"seed": 8}, "not the same guest"),
        ("a boot page changed", {"pages": {1: [0x1234, 0x5679, 9]}},
         "never wrote differ"),
        ("a write lost", {"pages": {0: [0xDEAD, 5]}}, "lost their write"),
        ("an older write back", {"pages": {0: [_stamp(0), 4]}},
         "older write"),
        ("a write from the future", {"pages": {0: [_stamp(0), 99]}},
         "not reached"),
        ("the vCPU went back", {"args": {"counter": 5}}, "went back"),
        ("the guest did not run", {"args": {"later_counter": 8}},
         "did not run"),
        ("no event taken", {"args": {"later_events": 3}}, "took no event"),
    ],
)  # fmt: skip
def test_each_verdict_fails_its_fault(fault, change, named):
    before = _snap("src", 6, 2, BEFORE_PAGES)
    problems = guest_ram.judge(before, *_after(**change))
    assert any(named in p for p in problems), (fault, problems)
