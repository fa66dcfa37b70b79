"""The footprint paths (views and in-place work instead of copies of pfn
arrays) against straightforward references: the run expansion, the
bitmap set operations, and the memory's marks as harvest, take_changed,
take_changed_blocks and written_mask read them, whatever mix of marks,
scans of runs, log-dirty toggles and buffers reused by their caller."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim import memory
from nova_xen_ncm.host.sim.memory import GuestMemory

_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _expand_reference(first: list[int], end: list[int]) -> list[int]:
    out: list[int] = []
    for lo, hi in zip(first, end, strict=True):
        out.extend(range(lo, hi))
    return out


@st.composite
def _sorted_runs(draw) -> tuple[list[int], list[int]]:
    """Ascending, disjoint runs: empty ones, adjacent ones, one at 0."""
    gaps = draw(st.lists(st.integers(0, 40), max_size=30))
    lengths = draw(
        st.lists(st.integers(0, 70), min_size=len(gaps), max_size=len(gaps))
    )
    first, end, at = [], [], 0
    for gap, length in zip(gaps, lengths, strict=True):
        at += gap
        first.append(at)
        end.append(at + length)
        at += length
    return first, end


@_SETTINGS
@given(_sorted_runs(), st.sampled_from([np.int64, np.uint64]))
def test_expand_runs_is_the_runs_pfns(runs, dtype) -> None:
    first, end = runs
    out = memory.expand_runs(
        np.array(first, dtype=dtype), np.array(end, dtype=dtype)
    )
    assert out.dtype == np.uint64
    assert out.tolist() == _expand_reference(first, end)


@_SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 3000), st.integers(-5, 60)), max_size=20)
)
def test_expand_runs_of_runs_in_any_order(pairs) -> None:
    # Not what a scan gives (its runs ascend), but the values must still
    # be each run's pfns in the order given: a negative step is summed
    # as any other.
    first = [f for f, _ in pairs]
    end = [f + n for f, n in pairs]
    out = memory.expand_runs(
        np.array(first, dtype=np.int64), np.array(end, dtype=np.int64)
    )
    assert out.tolist() == _expand_reference(first, end)


def test_expand_runs_single_and_edge_runs() -> None:
    one = memory.expand_runs(np.array([0]), np.array([1]))
    assert one.tolist() == [0]
    assert memory.expand_runs(np.array([7]), np.array([7])).tolist() == []
    adjacent = memory.expand_runs(np.array([0, 3, 6]), np.array([3, 6, 9]))
    assert adjacent.tolist() == list(range(9))
    empty_first = memory.expand_runs(np.array([0, 0]), np.array([0, 2]))
    assert empty_first.tolist() == [0, 1]


@st.composite
def _masks(draw) -> np.ndarray:
    size = draw(st.integers(0, 600))
    density = draw(st.sampled_from([0.0, 0.01, 0.2, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random(size) < density
    return mask if draw(st.booleans()) else mask.astype(np.uint8)


@_SETTINGS
@given(_masks())
def test_marked_is_flatnonzero(mask) -> None:
    out = base.marked(mask)
    assert out.dtype == np.uint64
    assert out.tolist() == np.flatnonzero(mask).tolist()


_pfn_lists = st.lists(st.integers(0, 3000), max_size=700)


@_SETTINGS
@given(st.lists(_pfn_lists, min_size=1, max_size=3), st.booleans())
def test_pfn_union_matches_unique_and_keeps_its_inputs(parts, signed) -> None:
    dtype = np.int64 if signed else np.uint64
    arrays = [np.array(p, dtype=dtype) for p in parts]
    before = [a.copy() for a in arrays]
    out = base.pfn_union(*arrays)
    expect = sorted(set().union(*map(set, parts)))
    assert out.tolist() == expect
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    # The result is the caller's own: writing it changes no input.
    out[:] = 0
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    # The scratch bitmaps were left clear.
    assert base.pfn_union(np.array([5, 3], dtype=np.uint64)).tolist() == [3, 5]


@_SETTINGS
@given(_pfn_lists, _pfn_lists)
def test_difference_and_union_match_sets(a, b) -> None:
    x = np.array(a, dtype=np.uint64)
    y = np.array(b, dtype=np.uint64)
    assert base.pfn_difference(x, y).tolist() == sorted(set(a) - set(b))
    assert base.pfn_union(x).tolist() == sorted(set(a))


# -- the memory's marks against a model --

_MAX_PFN = 2048


class _Tracker:
    """A write tracker whose next scan finds the runs given it."""

    def __init__(self) -> None:
        self.pending: list[tuple[list[int], list[int]]] = []

    def scan_runs(self, spans=None) -> tuple[np.ndarray, np.ndarray]:
        if not self.pending:
            return (np.zeros(0, dtype=np.int64),) * 2
        first, end = self.pending.pop(0)
        return np.array(first, dtype=np.int64), np.array(end, dtype=np.int64)

    def close(self) -> None:
        pass


_pfn = st.integers(0, _MAX_PFN - 1)


@st.composite
def _scan(draw) -> tuple[str, list[int], list[int]]:
    # Runs long enough to pass the logs' limit (256 marks) now and then.
    starts = sorted(set(draw(st.lists(_pfn, max_size=8))))
    first, end = [], []
    for i, lo in enumerate(starts):
        top = starts[i + 1] if i + 1 < len(starts) else _MAX_PFN
        hi = draw(st.integers(lo, min(top, lo + 400)))
        first.append(lo)
        end.append(hi)
    return ("scan", first, end)


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("mark"),
            st.lists(_pfn, max_size=300),
            st.sampled_from(["uint64", "int64", "list", "strided", "mask"]),
        ),
        st.tuples(st.just("mark1"), _pfn),
        _scan(),
        st.tuples(st.just("log_dirty"), st.booleans()),
        st.tuples(st.just("harvest"), st.lists(_pfn, max_size=5)),
        st.just(("take_changed",)),
        st.tuples(
            st.just("take_blocks"), st.sampled_from([1, 4, 64]), st.booleans()
        ),
        st.just(("maps",)),
    ),
    max_size=30,
)


@_SETTINGS
@given(_ops, st.integers(0, 2))
def test_no_mark_is_lost_or_invented(ops, runs_max) -> None:
    mem = GuestMemory.create(_MAX_PFN, "test-marks-model")
    saved = (
        memory._MARK_RUNS_MAX,
        memory._MARK_CHUNK,
        memory._MARK_GROUP,
        memory._CHANGED_CHUNK,
    )
    # Both ways of marking a scan: a slice a run, and pfn lists, in
    # groups of runs and chunks of pfns small enough to be several; the
    # changed map read by blocks in several chunks.
    memory._MARK_RUNS_MAX = runs_max
    memory._MARK_CHUNK = 16
    memory._MARK_GROUP = 3
    memory._CHANGED_CHUNK = 128
    try:
        with mem.lock():
            mem.populate(np.arange(_MAX_PFN, dtype=np.uint64))
        tracker = _Tracker()
        mem._tracker = tracker
        mem._tracked_pid = os.getpid()
        dirty: set[int] = set()
        changed: set[int] = set()
        ever: set[int] = set()
        log_dirty = False

        def marked(pfns) -> None:
            changed.update(pfns)
            ever.update(pfns)
            if log_dirty:
                dirty.update(pfns)

        for op in ops:
            kind = op[0]
            if kind == "mark":
                pfns, form = op[1], op[2]
                buf = np.array(pfns + pfns, dtype=np.uint64)
                given_ = {
                    "uint64": buf[: len(pfns)],
                    "int64": np.array(pfns, dtype=np.int64),
                    "list": list(pfns),
                    "strided": buf[::2] if pfns else buf,
                    "mask": np.isin(np.arange(_MAX_PFN), pfns),
                }[form]
                expect = (
                    buf[::2].tolist() if form == "strided" and pfns else pfns
                )
                with mem.lock():
                    mem.mark_dirty(given_)
                marked(expect)
                # The caller reuses its buffer at once (a batch buffer).
                buf[:] = 0
                if isinstance(given_, np.ndarray):
                    given_[...] = 0
            elif kind == "mark1":
                with mem.lock():
                    mem.mark_dirty(op[1])
                marked([op[1]])
            elif kind == "scan":
                first, end = op[1], op[2]
                tracker.pending.append((first, end))
                with mem.lock():
                    mem._flush_written()
                marked(_expand_reference(first, end))
            elif kind == "log_dirty":
                mem.set_log_dirty(op[1])
                log_dirty = op[1]
                dirty.clear()
            elif kind == "harvest":
                extra = np.array(op[1], dtype=np.uint64)
                got = mem.harvest(extra).tolist()
                assert got == sorted(dirty | set(op[1]))
                dirty.clear()
            elif kind == "take_changed":
                assert mem.take_changed().tolist() == sorted(changed)
                changed.clear()
            elif kind == "take_blocks":
                block, with_mask = op[1], op[2]
                mask = np.zeros(_MAX_PFN, dtype=bool) if with_mask else None
                got = mem.take_changed_blocks(block, mask).tolist()
                assert got == sorted({p // block for p in changed})
                if with_mask:
                    assert np.flatnonzero(mask).tolist() == sorted(changed)
                changed.clear()
            elif kind == "maps":
                # Read both maps whole, as a reader that trusts no log.
                assert sorted(dirty) == np.flatnonzero(mem.dirty).tolist()
                assert sorted(changed) == np.flatnonzero(mem.changed).tolist()
        # Every map, as its reader sees it and as it is.
        assert mem.harvest().tolist() == sorted(dirty)
        assert mem.take_changed().tolist() == sorted(changed)
        assert not mem.dirty.any() and not mem.changed.any()
        every = np.arange(_MAX_PFN, dtype=np.uint64)
        assert np.flatnonzero(mem.written_mask(every)).tolist() == sorted(ever)
    finally:
        (
            memory._MARK_RUNS_MAX,
            memory._MARK_CHUNK,
            memory._MARK_GROUP,
            memory._CHANGED_CHUNK,
        ) = saved
        mem.untrack()
        mem.close()


@_SETTINGS
@given(
    st.integers(1, 700),
    st.data(),
    st.sampled_from([1, 4, 64]),
    st.integers(0, 4),
)
def test_a_physmap_of_any_size_is_taken_by_block(
    max_pfn, data, block, cut
) -> None:
    # A physmap whose last block (and last chunk of the changed map) is
    # partial, a scan marked in several groups and chunks, the map read
    # whole (a log past its limit) or from its log.
    pfn = st.integers(0, max_pfn - 1)
    starts = sorted(set(data.draw(st.lists(pfn, max_size=12))))
    first, end = [], []
    for i, lo in enumerate(starts):
        top = starts[i + 1] if i + 1 < len(starts) else max_pfn
        first.append(lo)
        end.append(data.draw(st.integers(lo, top)))
    singles = data.draw(st.lists(pfn, max_size=20))
    mem = GuestMemory.create(max_pfn, "test-marks-blocks")
    saved = (
        memory._MARK_RUNS_MAX,
        memory._MARK_CHUNK,
        memory._MARK_GROUP,
        memory._CHANGED_CHUNK,
    )
    memory._MARK_RUNS_MAX = 0
    memory._MARK_CHUNK = 8
    memory._MARK_GROUP = 2
    memory._CHANGED_CHUNK = 64 * (cut + 1)
    try:
        with mem.lock():
            mem.populate(np.arange(max_pfn, dtype=np.uint64))
        tracker = _Tracker()
        mem._tracker = tracker
        mem._tracked_pid = os.getpid()
        if cut % 2:
            # The log known empty: what follows is read from it.
            mem.take_changed()
        tracker.pending.append((first, end))
        with mem.lock():
            mem._flush_written()
            mem.mark_dirty(np.array(singles, dtype=np.uint64))
        want = set(_expand_reference(first, end)) | set(singles)
        mask = np.zeros(max_pfn, dtype=bool)
        got = mem.take_changed_blocks(block, mask).tolist()
        assert got == sorted({p // block for p in want})
        assert np.flatnonzero(mask).tolist() == sorted(want)
        assert not mem.changed.any()
        assert mem.take_changed_blocks(block).tolist() == []
    finally:
        (
            memory._MARK_RUNS_MAX,
            memory._MARK_CHUNK,
            memory._MARK_GROUP,
            memory._CHANGED_CHUNK,
        ) = saved
        mem.untrack()
        mem.close()
