"""The real Xen host's memory digest reads the guest's RAM itself: it is
the proof that the destination's memory equals the source's, so a write
Xen's log-dirty never reported must change it (a digest kept from
log-dirty would share that blind spot with the send path). Runs in well
under a second: fake libxenctrl/libxenforeignmemory over a numpy RAM."""

from __future__ import annotations

import ctypes

import numpy as np
import xxhash

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import host as xen_host

WORDS = base.PAGE_SIZE // 8
SHARED = 40  # a page dom0's daemons write (xenstore ring)


class _FakeXen:
    """xenforeignmemory_map/unmap over ``ram`` (a copy of the pages asked
    for, at an address of this process) and a log-dirty that reports
    only what ``dirty`` holds."""

    def __init__(self, ram: np.ndarray) -> None:
        self.ram = ram
        self.dirty: list[int] = []
        self.held: dict[int, ctypes.Array] = {}
        self.bitmap = ctypes.create_string_buffer(len(ram) // 8 + 1)

    def xenforeignmemory_map(self, fmem, domid, prot, n, arr, err):
        pfns = np.ctypeslib.as_array(arr, shape=(n,)).astype(np.int64)
        buf = ctypes.create_string_buffer(
            self.ram[pfns].tobytes(), n * base.PAGE_SIZE
        )
        addr = ctypes.addressof(buf)
        self.held[addr] = buf
        return addr

    def xenforeignmemory_unmap(self, fmem, addr, n):
        del self.held[addr]
        return 0

    def xc_shadow_control(self, xch, domid, op, buf, n):
        return 0

    def xc_logdirty_control(self, xch, domid, op, buf, bits, flags, stats):
        ctypes.memset(self.bitmap, 0, len(self.bitmap))
        for pfn in self.dirty:
            self.bitmap[pfn // 8] = bytes(
                [self.bitmap[pfn // 8][0] | 1 << (pfn % 8)]
            )
        self.dirty.clear()
        return 0


class _Buffer:
    def __init__(self, fake: _FakeXen) -> None:
        self.hbuf = ctypes.addressof(fake.bitmap)


def _driver(ram: np.ndarray, pfns: np.ndarray, monkeypatch):
    fake = _FakeXen(ram)
    monkeypatch.setattr(xen_host, "FN", fake)
    xen = object.__new__(xen_host.XenHost)
    xen._fmem = xen._xch = object()
    xen.populated_pfns = lambda domid: pfns.copy()
    xen._shared_with_dom0 = lambda domid: np.array([SHARED], np.uint64)
    xen._reserved_pfns = lambda domid: np.zeros(0, dtype=np.uint64)
    xen._max_gpfn = lambda domid: len(ram) - 1
    xen._dirty_buffer = lambda domid, bits: _Buffer(fake)
    xen._dm_dirty_log = lambda domid, enable: None
    return xen, fake


def _definition(ram: np.ndarray, pfns: np.ndarray) -> str:
    """MEMORY_DIGEST written out page by page, apart from the driver."""
    pfns = pfns[pfns != SHARED]
    nonzero = [int(p) for p in pfns if ram[int(p)].any()]
    h = xxhash.xxh3_128(pfns.astype("<u8").tobytes())
    h.update(xxhash.xxh3_128(np.array(nonzero, "<u8").tobytes()).digest())
    data = xxhash.xxh3_128()
    for pfn in nonzero:
        data.update(ram[pfn].tobytes())
    h.update(data.digest())
    return h.hexdigest()


def _guest(pages: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ram = rng.integers(1, 2**63, size=(pages, WORDS), dtype=np.uint64)
    ram[5:70] = 0
    ram[100] = 0
    ram[100, -1] = 7  # non-zero in its last word only
    ram[1100:1200] = 0
    holes = np.r_[128:192, 200:230, 77]
    pfns = np.setdiff1d(np.arange(pages, dtype=np.uint64), holes)
    return ram, pfns


def test_the_digest_is_its_definition_over_several_mappings(
    monkeypatch,
) -> None:
    ram, pfns = _guest(2 * xen_host.MAP_BATCH + 300)
    xen, fake = _driver(ram, pfns, monkeypatch)
    assert xen.memory_digest(7) == _definition(ram, pfns)
    assert not fake.held
    ram[100, -1] = 0  # a page turned zero
    assert xen.memory_digest(7) == _definition(ram, pfns)


def test_a_write_log_dirty_never_reported_changes_the_digest(
    monkeypatch,
) -> None:
    """Pages Xen writes itself (a registered vcpu_info, grant frames)
    need not be in the log-dirty bitmap: under log-dirty, with the
    pre-copy's reads done and harvested, the paused source's digest
    still sees such a write, and so differs from a destination that
    never got it."""
    ram, pfns = _guest(1024)
    xen, fake = _driver(ram, pfns, monkeypatch)
    xen.enable_log_dirty(7)
    before = xen.memory_digest(7)
    with xen.map_pages(7, pfns) as mapping:  # the pre-copy's round 0
        assert len(mapping.runs()) == 1
        assert mapping.array().shape == (len(pfns), WORDS)
    fake.dirty.append(300)
    ram[300, 0] += np.uint64(1)
    assert list(xen.harvest_dirty(7)) == [300]
    sent = ram.copy()  # what the destination holds
    ram[900, 2] += np.uint64(1)  # not in the bitmap
    paused = xen.memory_digest(7)
    assert paused != before
    # As RAM read whole digests (a destination holding this RAM), and
    # not as the RAM that was sent does.
    assert paused == _driver(ram, pfns, monkeypatch)[0].memory_digest(7)
    assert paused != _driver(sent, pfns, monkeypatch)[0].memory_digest(7)
