"""Layout of the simulated guest kernel's own state in guest RAM.

The guest keeps everything it knows in its RAM, so that the guest process
can be restarted from RAM plus the HVM context alone (the vCPUs' program
counters are the CPU records' rip). The area starts at pfn
``layout.KERNEL_AREA_PFN``:

* page 0: the header (``HEADER_FIELDS``) then one ``VCPU_FIELDS`` slot per
  vCPU at ``VCPU_TABLE + vcpu * VCPU_STRIDE``;
* page 1: u32 event counters per port, ports 0..1023;
* page 2: the vcpu_info areas the guest registers with
  VCPUOP_register_vcpu_info, 64 bytes per vCPU;
* page 3: u32 per port, the events of page 1 its driver has handled
  (an event counted but not handled yet is work for the driver, also
  after a restart from RAM);
* pages 4-7: the xenbus client's state (xenbus.STATE_SIZE);
* pages 8-15: PV frontend states, two per page (devices.Frontend);
* pages 16-31: pages given to drivers for good (their rings).

Every page the workload writes starts with ``PAGE_STAMP``: a magic, the
vCPU, and the vCPU's counter at the write.
"""

from __future__ import annotations

import struct

import numpy as np

from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.sim import layout

MAGIC = b"NCMGUEST"
VERSION = 1

PATTERNS = {"uniform": 0, "hotcold": 1, "sequential": 2}
FILLS = {"zero": 0, "random": 1, "guestlike": 2}

HEADER_FIELDS = (
    ("magic", "8s"),
    ("version", "I"),
    ("nr_vcpus", "I"),
    ("pattern", "I"),
    ("fill", "I"),
    ("seed", "Q"),
    ("dirty_rate", "Q"),
    ("hot_fraction", "d"),
    ("hot_probability", "d"),
    ("pv_drivers", "I"),
    ("nr_grant_frames", "I"),
    ("shared_info_gfn", "Q"),
    ("grant_gfn", "Q"),
    ("callback_via", "Q"),
    ("store_port", "I"),
    ("console_port", "I"),
    ("debug_port", "I"),
    ("nr_frontends", "I"),
    ("upcalls", "Q"),
    ("domid", "I"),
    ("xenbus_ready", "I"),
    ("next_driver_page", "I"),
    ("next_grant_ref", "I"),
    # The workload's I/O requests per second (its configuration, in RAM
    # like the rest: a restarted guest reads it here).
    ("io_rate", "d"),
    # HVM_PARAM_STORE_PFN as read at boot (Linux's xen_store_gfn).
    ("store_pfn", "Q"),
)
VCPU_FIELDS = (
    ("counter", "Q"),
    ("ipi_port", "I"),
    ("pad", "I"),
    ("vcpu_info_gfn", "Q"),
    ("vcpu_info_offset", "I"),
    ("pad2", "I"),
    ("events", "Q"),
    ("ipis_sent", "Q"),
)
HEADER = struct.Struct("<" + "".join(f for _, f in HEADER_FIELDS))
VCPU = struct.Struct("<" + "".join(f for _, f in VCPU_FIELDS))
VCPU_TABLE = 512
VCPU_STRIDE = 64
MAX_VCPUS = (PAGE_SIZE - VCPU_TABLE) // VCPU_STRIDE
HEADER_PFN = layout.KERNEL_AREA_PFN
COUNTERS_PFN = layout.KERNEL_AREA_PFN + 1
VCPU_INFO_PFN = layout.KERNEL_AREA_PFN + 2
HANDLED_PFN = layout.KERNEL_AREA_PFN + 3
NR_COUNTED_PORTS = PAGE_SIZE // 4
XENBUS_STATE_PFN = layout.KERNEL_AREA_PFN + 4
XENBUS_STATE_PAGES = 4
FRONTEND_PFN = layout.KERNEL_AREA_PFN + 8
FRONTENDS_PER_PAGE = 2
MAX_FRONTENDS = 8 * FRONTENDS_PER_PAGE
DRIVER_PFN = layout.KERNEL_AREA_PFN + 16
DRIVER_PAGES = 16
# Linux keeps the first grant references for the toolstack
# (GNTTAB_NR_RESERVED_ENTRIES).
FIRST_GRANT_REF = 8


def frontend_place(index: int, size: int) -> tuple[int, int]:
    """(pfn, offset) of the ``index``-th frontend's state."""
    page, slot = divmod(index, FRONTENDS_PER_PAGE)
    return FRONTEND_PFN + page, slot * size


PAGE_STAMP = struct.Struct("<IIQ")
STAMP_MAGIC = 0x5741524B  # "KRAW"


def read_header(page: bytes | memoryview) -> dict:
    values = HEADER.unpack_from(page, 0)
    return dict(zip((n for n, _ in HEADER_FIELDS), values, strict=True))


def write_header(page: np.ndarray, fields: dict) -> None:
    values = [fields[n] for n, _ in HEADER_FIELDS]
    HEADER.pack_into(memoryview(page), 0, *values)


def read_vcpu(page: bytes | memoryview, vcpu: int) -> dict:
    values = VCPU.unpack_from(page, VCPU_TABLE + vcpu * VCPU_STRIDE)
    return dict(zip((n for n, _ in VCPU_FIELDS), values, strict=True))


def write_vcpu(page: np.ndarray, vcpu: int, fields: dict) -> None:
    values = [fields[n] for n, _ in VCPU_FIELDS]
    VCPU.pack_into(memoryview(page), VCPU_TABLE + vcpu * VCPU_STRIDE, *values)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of each element: the workload's counter-based PRNG, so
    that a vCPU's whole random state is its counter."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Heap:
    """The RAM the workload writes, addressed by a dense index."""

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.starts = np.array([s for s, _ in ranges], dtype=np.uint64)
        sizes = np.array([e - s for s, e in ranges], dtype=np.uint64)
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.offsets = self.offsets.astype(np.uint64)
        self.size = int(self.offsets[-1])

    def pfns(self, index: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, index, side="right") - 1
        return self.starts[which] + (index - self.offsets[which])


def workload_pages(
    heap: Heap,
    header: dict,
    vcpu: int,
    counters: np.ndarray,
) -> np.ndarray:
    """The pfns vCPU ``vcpu`` writes at ``counters`` (deterministic)."""
    pattern = header["pattern"]
    n = np.uint64(heap.size)
    if pattern == PATTERNS["sequential"]:
        start = np.uint64(heap.size * vcpu // max(1, header["nr_vcpus"]))
        index = (start + counters) % n
    else:
        salt = np.uint64(header["seed"] ^ (vcpu << 56))
        h = splitmix64(counters ^ salt)
        if pattern == PATTERNS["hotcold"]:
            hot_n = np.uint64(max(1, int(heap.size * header["hot_fraction"])))
            u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            h2 = splitmix64(h)
            index = np.where(u < header["hot_probability"], h2 % hot_n, h2 % n)
        else:
            index = h % n
    return heap.pfns(index.astype(np.uint64))
