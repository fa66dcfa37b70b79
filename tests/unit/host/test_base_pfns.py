"""The pfn set operations of the data path, against numpy's own."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from nova_xen_ncm.host import base


def arrays(seed: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, top, 5000, dtype=np.uint64)
    b = rng.integers(0, top, 3000, dtype=np.uint64)
    return a, b


# A small space goes through the bitmap, a huge one through numpy.
@pytest.mark.parametrize("top", [20_000, base.PFN_BITMAP_LIMIT * 4])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_set_operations_agree_with_numpy(seed: int, top: int) -> None:
    a, b = arrays(seed, top)
    for got, want in (
        (base.pfn_union(a, b), np.union1d(a, b)),
        (base.pfn_difference(a, b), np.setdiff1d(a, b)),
    ):
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, want)


def test_empty_sets() -> None:
    empty = np.zeros(0, dtype=np.uint64)
    some = np.array([3, 1, 3], dtype=np.uint64)
    np.testing.assert_array_equal(base.pfn_union(empty, some), [1, 3])
    np.testing.assert_array_equal(base.pfn_union(empty), empty)
    assert len(base.pfn_union()) == 0
    np.testing.assert_array_equal(base.pfn_difference(some, empty), [1, 3])
    assert len(base.pfn_difference(empty, some)) == 0


def test_memory_hasher_sees_every_octet() -> None:
    page = bytearray(base.PAGE_SIZE)
    first = base.memory_hasher(page).digest()
    page[-1] = 1
    assert base.memory_hasher(page).digest() != first
    assert len(first) == 16


def test_set_operations_leave_no_trace_for_the_next() -> None:
    big = np.arange(0, 1 << 20, 3, dtype=np.uint64)
    small = np.array([5, 9, 12], dtype=np.uint64)
    for _ in range(2):
        np.testing.assert_array_equal(base.pfn_difference(small, big), [5])
        np.testing.assert_array_equal(base.pfn_union(small, small[:1]), small)
        assert len(base.pfn_union(big)) == len(big)


# Sparse maps go eight octets at a time, dense ones octet by octet; the
# lengths leave a tail that is not a whole word.
@pytest.mark.parametrize("length", [0, 7, 8, 9, 4096, 0xFF003])
@pytest.mark.parametrize("density", [0.0, 0.0001, 0.01, 0.5, 1.0])
def test_marked_agrees_with_flatnonzero(length: int, density: float) -> None:
    rng = np.random.default_rng(length)
    mask = (rng.random(length) < density).astype(np.uint8)
    if length:
        mask[-1] = 1  # the tail is looked at
    for m in (mask, mask.astype(bool)):
        got = base.marked(m)
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, np.flatnonzero(mask))


def test_nonzero_pages_reads_whole_pages_that_begin_with_zero() -> None:
    pages = np.zeros((6, base.PAGE_SIZE), dtype=np.uint8)
    pages[1, 0] = 1  # settled by its first word
    pages[3, base.PAGE_SIZE - 1] = 1  # only its last octet is set
    pages[5, 9] = 2
    want = [False, True, False, True, False, True]
    assert base.nonzero_pages(pages).tolist() == want
    assert base.nonzero_pages(memoryview(pages.tobytes())).tolist() == want
    rows = np.array([0, 3, 4, 5])
    assert base.nonzero_pages(pages, rows).tolist() == [want[r] for r in rows]


@pytest.mark.parametrize("layout", ["stretches", "scattered"])
def test_nonzero_pages_agrees_with_a_page_by_page_test(layout: str) -> None:
    rng = np.random.default_rng(3)
    pages = np.zeros((300, base.PAGE_SIZE), dtype=np.uint8)
    if layout == "stretches":
        pages[100:140] = 7  # data; the rest is two zero stretches
        pages[20, base.PAGE_SIZE // 2] = 1  # zero first word, not zero
    else:
        # Every other page begins with a zero word: many short runs.
        pages[::2, 8:] = rng.integers(0, 2, (150, base.PAGE_SIZE - 8))
        pages[1::2, 0] = 9
    want = pages.any(axis=1)
    np.testing.assert_array_equal(base.nonzero_pages(pages), want)
    rows = np.arange(5, 300, 3)
    np.testing.assert_array_equal(base.nonzero_pages(pages, rows), want[rows])


def test_union_of_one_set_is_a_copy_of_it() -> None:
    pfns = np.array([3, 8, 9, 4000], dtype=np.uint64)
    out = base.pfn_union(pfns)
    np.testing.assert_array_equal(out, pfns)
    assert not np.shares_memory(out, pfns)
    # Not a set: sorted and made distinct.
    np.testing.assert_array_equal(
        base.pfn_union(np.array([9, 3, 9], dtype=np.uint64)), [3, 9]
    )


def _sparse(rng: np.random.Generator, top: int) -> np.ndarray:
    return np.flatnonzero(rng.random(top) < rng.random()).astype(np.uint64)


@pytest.mark.parametrize("seed", range(20))
def test_pfn_runs_hold_the_pfns_and_answer_as_the_pfn_sets(seed) -> None:
    rng = np.random.default_rng(seed)
    top = int(rng.integers(1, 3000))
    a, b = _sparse(rng, top), _sparse(rng, top + 50)
    if seed % 5 == 0:
        b = b[:0]
    runs_a, runs_b = base.PfnRuns.of(a), base.PfnRuns.of(b)
    np.testing.assert_array_equal(runs_a.pfns(), a)
    assert runs_a.pfns().dtype == np.uint64
    assert len(runs_a) == len(a)
    # Runs are maximal: none ends where the next begins.
    assert not np.any(runs_a.first[1:] == runs_a.end[:-1])
    diff = runs_a.difference(runs_b)
    np.testing.assert_array_equal(diff.pfns(), np.setdiff1d(a, b))
    assert not np.any(diff.first[1:] == diff.end[:-1])
    np.testing.assert_array_equal(
        runs_b.difference(runs_a).pfns(), np.setdiff1d(b, a)
    )
    probe = rng.integers(0, top + 100, 200, dtype=np.uint64)
    np.testing.assert_array_equal(
        runs_a.members(probe), np.intersect1d(probe, a)
    )
    with pytest.raises(ValueError):
        runs_a.first[:1] = 0


def test_a_host_gives_the_same_runs_while_it_gives_the_same_pfns() -> None:
    class Host:
        populated_runs = base.HostDriver.populated_runs

        def __init__(self) -> None:
            self.pfns = _read_only([1, 2, 3, 9])

        def populated_pfns(self, domid: int) -> np.ndarray:
            return self.pfns

    host = Host()
    runs = host.populated_runs(1)
    assert runs.first.tolist() == [1, 9] and runs.end.tolist() == [4, 10]
    assert host.populated_runs(1) is runs
    host.pfns = _read_only([1, 2])
    changed = host.populated_runs(1)
    assert changed is not runs and changed.pfns().tolist() == [1, 2]
    # An equal array, but another one: read again, the same pfns.
    host.pfns = _read_only([1, 2])
    assert host.populated_runs(1).pfns().tolist() == [1, 2]


@pytest.mark.parametrize(
    "pfns", [[0, 2, 2, 3], [5, 6, 7, 0, 1, 2], [3, 3], [9, 1, 9, 2, 3]]
)
def test_pfn_runs_of_unsorted_or_repeated_pfns_are_their_set(pfns) -> None:
    runs = base.PfnRuns.of(np.array(pfns, dtype=np.uint64))
    expected = sorted(set(pfns))
    assert runs.pfns().tolist() == expected
    assert len(runs) == len(expected)
    assert runs.members(np.array(pfns, dtype=np.uint64)).tolist() == expected


def _read_only(pfns: list[int]) -> np.ndarray:
    out = np.array(pfns, dtype=np.uint64)
    out.flags.writeable = False
    return out


def test_a_host_whose_pfns_change_in_place_gives_their_runs_now() -> None:
    class Host:
        populated_runs = base.HostDriver.populated_runs

        def __init__(self) -> None:
            self.pfns = np.array([1, 2, 3, 9], dtype=np.uint64)

        def populated_pfns(self, domid: int) -> np.ndarray:
            return self.pfns

    host = Host()
    assert host.populated_runs(1).pfns().tolist() == [1, 2, 3, 9]
    # A pfn populated in place (the same, writable, array): the runs
    # kept for it would leave pfn 4 unsent.
    host.pfns[3] = 4
    assert host.populated_runs(1).pfns().tolist() == [1, 2, 3, 4]


def test_the_runs_kept_do_not_keep_the_hosts_pfns() -> None:
    class Host:
        populated_runs = base.HostDriver.populated_runs

        def __init__(self) -> None:
            self.pfns: np.ndarray | None = _read_only([5, 6, 7])

        def populated_pfns(self, domid: int) -> np.ndarray:
            assert self.pfns is not None
            return self.pfns

    host = Host()
    host.populated_runs(1)
    gone = weakref.ref(host.pfns)
    host.pfns = None
    gc.collect()
    assert gone() is None
