import numpy as np
import pytest

from nova_xen_ncm.host.sim import layout


def test_small_guest_has_vga_hole_and_special_pages():
    lay = layout.HvmLayout.for_memory(64 << 20)
    assert lay.ram_ranges == ((0, 0xA0), (0xC0, 0x4000))
    # xg_dom_x86.c special_pfn(): 8 pages ending at 0xff000.
    assert lay.special_pfns == tuple(range(0xFEFF8, 0xFF000))
    pfns = lay.initial_pfns()
    assert 0xA0 not in pfns and 0xBF not in pfns and 0xC0 in pfns
    assert len(pfns) == 0x4000 - 0x20 + 8


def test_big_guest_continues_above_4g():
    lay = layout.HvmLayout.for_memory(5 << 30)
    low_end = 0xF0000000 >> 12
    assert lay.ram_ranges[1] == (0xC0, low_end)
    high = (5 << 30 >> 12) - low_end
    assert lay.ram_ranges[2] == (0x100000, 0x100000 + high)
    assert lay.max_pfn == 0x100000 + high


def test_heap_excludes_kernel_area():
    lay = layout.HvmLayout.for_memory(64 << 20)
    start = layout.KERNEL_AREA_PFN + layout.KERNEL_AREA_PAGES
    assert lay.heap_ranges()[0][0] == start
    assert not np.isin(
        np.arange(layout.KERNEL_AREA_PFN, start),
        np.concatenate([np.arange(s, e) for s, e in lay.heap_ranges()]),
    ).any()


@pytest.mark.parametrize("size", [0, 4095, 512 << 10])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="guest memory"):
        layout.HvmLayout.for_memory(size)
