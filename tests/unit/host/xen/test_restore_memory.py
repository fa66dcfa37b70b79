"""The real Xen host's answer to which pages of a domain being restored
may hold data: libxl's build loaded hvmloader and its firmware into its
RAM before the stream came, and a page the guest had zero must not keep
them. Fake libxenforeignmemory over a numpy RAM."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import host as xen_host

DOMID = 7
WORDS = base.PAGE_SIZE // 8
# Where libxl loads hvmloader (1 MiB) and a module after it.
BUILT = np.arange(256, 300)


class _FakeMemory:
    """xenforeignmemory_map/unmap over a copy of ``ram``'s pages; a pfn
    not in ``populated`` is refused, and its page reads 0xff (Xen's
    would fault if touched)."""

    def __init__(self, ram: np.ndarray, populated: np.ndarray) -> None:
        self.ram = ram
        self.populated = populated
        self.held: dict[int, ctypes.Array] = {}
        self.maps = 0

    def xenforeignmemory_map(self, fmem, domid, prot, n, arr, err):
        self.maps += 1
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        pages = self.ram[pfns].copy()
        refused = ~self.populated[pfns]
        pages[refused] = ~np.uint64(0)
        for i in np.flatnonzero(refused).tolist():
            err[i] = -22
        buf = ctypes.create_string_buffer(pages.tobytes(), n * base.PAGE_SIZE)
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
    # What libxl built: the first 4096 pfns (the rest is populated
    # later, by the restore), probed in batches of MAP_BATCH pages.
    populated = np.zeros(len(ram), dtype=bool)
    populated[:4096] = True
    assert 4096 > xen_host.MAP_BATCH
    memory = _FakeMemory(ram, populated)
    monkeypatch.setattr(xen_host, "FN", memory)
    xen = object.__new__(xen_host.XenHost)
    xen._fmem = object()
    xen._init_bookkeeping()
    xen._max_gpfn = lambda domid: len(ram) - 1
    mask, built = xen._probe_pages(DOMID, read=True)
    # One mapping of each batch tells both.
    assert memory.maps == len(ram) // xen_host.MAP_BATCH
    assert mask.tolist() == populated.tolist()
    xen._built[DOMID] = built
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
    # Populated by the restore.
    xen_host.FN.populated[5000] = True
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


def test_a_new_domain_whose_pages_cannot_be_read_is_destroyed(
    monkeypatch,
) -> None:
    # Created by libxl, then not restorable: nothing is left behind.
    xen = object.__new__(xen_host.XenHost)

    def absent(*args):
        raise base.DomainNotFound("no", call="domain_info")

    xen.domain_info = xen.find_domain = absent
    xen.free_memory = lambda: 1 << 40
    xen.libxl_json = lambda config, domid: "{}"
    xen._wait_out_destroy_second = lambda domid: None
    xen._libxl_create = lambda text, call: DOMID
    xen._pfn_key = lambda domid, call: (1, 2)

    def refused(domid, *, read):
        raise base.HostError("xenforeignmemory_map refused", call="map")

    xen._probe_pages = refused
    destroyed = []
    xen._best_effort_destroy = destroyed.append
    config = base.DomainConfig(name="g", memory_bytes=1 << 28)
    with pytest.raises(base.HostError, match="refused"):
        xen.create_empty_domain(config, DOMID)
    assert destroyed == [DOMID]
