"""Guest physical memory layout of an HVM guest, as Xen's toolstack builds it.

Follows tools/libs/guest/xg_dom_x86.c (meminit_hvm, bootlate_hvm) and
libxl's defaults: RAM from pfn 0 with the VGA hole (0xA0000-0xBFFFF)
left unpopulated, RAM below the MMIO hole that starts at 0xF0000000, the
rest of RAM above 4 GiB, and eight special pages just below
X86_HVM_END_SPECIAL_REGION (pfn 0xff000) for the paging/access/sharing
rings, buffered ioreq, xenstore, ioreq, identity page table and console.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nova_xen_ncm.host.base import PAGE_SHIFT

VGA_HOLE_START_PFN = 0xA0
VGA_HOLE_END_PFN = 0xC0
# libxl's default MMIO hole: 256 MiB below 4 GiB (HVM_BELOW_4G_MMIO_START).
MMIO_HOLE_START_PFN = 0xF0000000 >> PAGE_SHIFT
FOUR_GIB_PFN = 0x100000

X86_HVM_END_SPECIAL_REGION = 0xFF000
X86_HVM_NR_SPECIAL_PAGES = 8
SPECIALPAGE_PAGING = 0
SPECIALPAGE_ACCESS = 1
SPECIALPAGE_SHARING = 2
SPECIALPAGE_BUFIOREQ = 3
SPECIALPAGE_XENSTORE = 4
SPECIALPAGE_IOREQ = 5
SPECIALPAGE_IDENT_PT = 6
SPECIALPAGE_CONSOLE = 7

# The Xen platform PCI device's MMIO BAR (hvmloader puts it at the start
# of the hole); PV drivers map shared info and grant frames there.
PLATFORM_BAR_PFN = MMIO_HOLE_START_PFN
PLATFORM_BAR_PAGES = 0x1000

# Where the simulated guest kernel keeps its own state (1 MiB upwards, as
# a kernel image would sit), and how many pages it reserves.
KERNEL_AREA_PFN = 0x100
KERNEL_AREA_PAGES = 32


def special_pfn(index: int) -> int:
    """xg_dom_x86.c special_pfn()."""
    return X86_HVM_END_SPECIAL_REGION - X86_HVM_NR_SPECIAL_PAGES + index


@dataclasses.dataclass(frozen=True)
class HvmLayout:
    """Where a guest of ``memory_bytes`` has RAM."""

    memory_bytes: int
    # [start, end) pfn ranges of RAM, in order.
    ram_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def for_memory(cls, memory_bytes: int) -> HvmLayout:
        if memory_bytes <= 0 or memory_bytes % (1 << PAGE_SHIFT):
            raise ValueError(
                f"guest memory must be a positive multiple of the page "
                f"size, got {memory_bytes}"
            )
        pages = memory_bytes >> PAGE_SHIFT
        minimum = VGA_HOLE_END_PFN + KERNEL_AREA_PAGES + 16
        if pages < minimum:
            raise ValueError(
                f"guest memory must be at least {minimum << PAGE_SHIFT} "
                f"bytes, got {memory_bytes}"
            )
        low_end = min(pages, MMIO_HOLE_START_PFN)
        ranges = [(0, VGA_HOLE_START_PFN), (VGA_HOLE_END_PFN, low_end)]
        if pages > MMIO_HOLE_START_PFN:
            high = pages - MMIO_HOLE_START_PFN
            ranges.append((FOUR_GIB_PFN, FOUR_GIB_PFN + high))
        return cls(memory_bytes, tuple(ranges))

    @property
    def special_pfns(self) -> tuple[int, ...]:
        return tuple(special_pfn(i) for i in range(X86_HVM_NR_SPECIAL_PAGES))

    @property
    def max_pfn(self) -> int:
        """One past the highest pfn the guest can have populated."""
        return max(self.ram_ranges[-1][1], X86_HVM_END_SPECIAL_REGION)

    def ram_pfns(self) -> np.ndarray:
        return np.concatenate(
            [np.arange(s, e, dtype=np.uint64) for s, e in self.ram_ranges]
        )

    def initial_pfns(self) -> np.ndarray:
        """RAM plus special pages: what a freshly built guest has."""
        return np.concatenate(
            [
                self.ram_pfns(),
                np.array(self.special_pfns, dtype=np.uint64),
            ]
        )

    def heap_ranges(self) -> tuple[tuple[int, int], ...]:
        """RAM the guest's workload may write: all RAM but the low
        megabyte and the kernel area."""
        start = KERNEL_AREA_PFN + KERNEL_AREA_PAGES
        out = []
        for s, e in self.ram_ranges:
            s = max(s, start)
            if s < e:
                out.append((s, e))
        return tuple(out)
