"""The real Xen host's answer to which pages of a domain being restored
may hold data: libxl's build loaded hvmloader and its firmware into its
RAM before the stream came, and a page the guest had zero must not keep
them. Fake libxenforeignmemory over a numpy RAM."""

from __future__ import annotations

import ctypes

import numpy as np

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import host as xen_host
from nova_xen_ncm.host.xen import memdigest

DOMID = 7
WORDS = base.PAGE_SIZE // 8
# Where libxl loads hvmloader (1 MiB) and a module after it.
BUILT = np.arange(256, 300)


class _FakeMemory:
    """xenforeignmemory_map/unmap over a copy of ``ram``'s pages."""

    def __init__(self, ram: np.ndarray) -> None:
        self.ram = ram
        self.held: dict[int, ctypes.Array] = {}

    def xenforeignmemory_map(self, fmem, domid, prot, n, arr, err):
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        buf = ctypes.create_string_buffer(
            self.ram[pfns].tobytes(), n * base.PAGE_SIZE
        )
        self.held[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xenforeignmemory_unmap(self, fmem, addr, n):
        del self.held[addr]
        return 0


def _built_host(monkeypatch) -> xen_host.XenHost:
    ram = np.zeros((8192, WORDS), dtype=np.uint64)
    ram[BUILT, 5] = 0xDEADBEEF
    # A page whose only data is in its last word.
    ram[301, -1] = 1
    monkeypatch.setattr(xen_host, "FN", _FakeMemory(ram))
    xen = object.__new__(xen_host.XenHost)
    xen._fmem = object()
    xen._digests = memdigest.MemoryDigests()
    # What libxl built: the first 4096 pfns (the rest is populated
    # later, by the restore), mapped in batches of MAP_BATCH pages.
    pfns = np.arange(4096, dtype=np.uint64)
    assert len(pfns) > xen_host.MAP_BATCH
    xen._built = {DOMID: xen._nonzero_mask(DOMID, pfns, len(pfns))}
    return xen


def test_the_pages_libxl_loaded_may_hold_data(monkeypatch) -> None:
    xen = _built_host(monkeypatch)
    asked = np.array([256, 299, 301, 0, 300, 4000, 9000], dtype=np.uint64)
    assert xen.written_pages(DOMID, asked).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
        # Beyond what libxl built: populated later, zero from Xen.
        False,
    ]


def test_a_page_mapped_writable_may_hold_data(monkeypatch) -> None:
    xen = _built_host(monkeypatch)
    pfns = np.array([10, 5000], dtype=np.uint64)
    assert not xen.written_pages(DOMID, pfns).any()
    with xen.map_pages(DOMID, np.array([10], dtype=np.uint64), True):
        pass
    # Read-only mappings write nothing.
    with xen.map_pages(DOMID, np.array([11], dtype=np.uint64)):
        pass
    with xen.map_pages(DOMID, np.array([5000], dtype=np.uint64), True):
        pass
    assert xen.written_pages(DOMID, pfns).tolist() == [True, True]
    assert not xen.written_pages(DOMID, np.array([11], np.uint64)).any()


def test_another_domains_pages_all_may_hold_data(monkeypatch) -> None:
    xen = _built_host(monkeypatch)
    pfns = np.array([0, 1, 2], dtype=np.uint64)
    assert xen.written_pages(DOMID + 1, pfns).all()


def test_once_the_pv_state_is_imported_every_page_may_hold_data(
    monkeypatch,
) -> None:
    # The backends answer in-flight requests into the guest's pages and
    # Xen writes its vcpu_info and runstate areas: not through map_pages.
    xen = _built_host(monkeypatch)
    imported = []
    monkeypatch.setattr(
        xen_host.pvctx,
        "import_",
        lambda host, ctx, domid, state: imported.append(domid),
    )
    xen.domain_info = lambda domid: None
    xen.domain_context = lambda: None
    pfns = np.array([0, 300, 4000], dtype=np.uint64)
    assert not xen.written_pages(DOMID, pfns).any()
    xen.import_pv_state(DOMID, object())
    assert imported == [DOMID]
    assert xen.written_pages(DOMID, pfns).all()
