import numpy as np

from nova_xen_ncm.host.sim import kernel
from nova_xen_ncm.host.sim import layout


def _header(pattern, **kw):
    hdr = {
        "pattern": kernel.PATTERNS[pattern],
        "seed": 1234,
        "nr_vcpus": 2,
        "hot_fraction": 0.05,
        "hot_probability": 0.9,
    }
    hdr.update(kw)
    return hdr


def _heap():
    return kernel.Heap(layout.HvmLayout.for_memory(64 << 20).heap_ranges())


def test_pages_are_heap_pages_and_deterministic():
    heap = _heap()
    counters = np.arange(1, 5001, dtype=np.uint64)
    for pattern in kernel.PATTERNS:
        a = kernel.workload_pages(heap, _header(pattern), 0, counters)
        b = kernel.workload_pages(heap, _header(pattern), 0, counters)
        assert np.array_equal(a, b)
        start = layout.KERNEL_AREA_PFN + layout.KERNEL_AREA_PAGES
        assert a.min() >= start and a.max() < 64 << 20 >> 12
        assert not np.isin(a, np.arange(0xA0, 0xC0)).any()


def test_sequential_walks_the_heap():
    heap = _heap()
    pages = kernel.workload_pages(
        heap,
        _header("sequential", nr_vcpus=1),
        0,
        np.arange(0, 3, dtype=np.uint64),
    )
    assert list(np.diff(pages)) == [1, 1]


def test_hotcold_mostly_hits_the_hot_set():
    heap = _heap()
    pages = kernel.workload_pages(
        heap, _header("hotcold"), 1, np.arange(1, 20001, dtype=np.uint64)
    )
    hot = heap.pfns(np.arange(int(heap.size * 0.05), dtype=np.uint64))
    share = np.isin(pages, hot).mean()
    assert 0.85 < share < 0.95
    uniform = kernel.workload_pages(
        heap, _header("uniform"), 1, np.arange(1, 20001, dtype=np.uint64)
    )
    assert np.isin(uniform, hot).mean() < 0.1


def test_header_round_trip():
    page = np.zeros(4096, dtype=np.uint8)
    fields = {name: 0 for name, _ in kernel.HEADER_FIELDS}
    fields.update(magic=kernel.MAGIC, hot_fraction=0.5, seed=2**63, domid=7)
    kernel.write_header(page, fields)
    assert kernel.read_header(page.tobytes()) == fields
    slot = {name: i for i, (name, _) in enumerate(kernel.VCPU_FIELDS)}
    kernel.write_vcpu(page, 3, slot)
    assert kernel.read_vcpu(page.tobytes(), 3) == slot
    assert kernel.read_header(page.tobytes()) == fields
