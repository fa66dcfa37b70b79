"""Guest RAM and the hypervisor's per-domain tables in shared memory.

Two memfds are shared by the host process (hypervisor and dom0) and the
guest process (the guest's vCPUs):

* ``ram``: guest physical memory, one page per pfn up to the layout's
  highest pfn, sparse (a page costs nothing until written), unless it
  was faulted in ahead (SpareRam);
* ``ctl``: hypervisor-owned memory the guest cannot write through its
  physmap: the p2m type of every pfn, the log-dirty map, the changed map
  (pages written since the memory digest last read them, kept whether
  log-dirty is on or not), the table of Xen pages (shared info, grant
  frames) and the GFNs they are mapped at, and the Xen pages themselves.

Log-dirty is the hypervisor's, as EPT dirty bits and PML are Xen's: the
guest tells it nothing. Writes by the guest process are found by
:class:`WriteTracker` (write protection of the guest's mapping of its
RAM, read and re-armed atomically); writes by the hypervisor and dom0
(event channels, xenstored's ring, backends) are marked in the dirty map
by the writer, as Xen's paging_mark_dirty(). Each flush of the tracker
goes into both the dirty map and the changed map, so neither loses a
write; the harvest copies and clears the map under the domain's memory
lock, so a write is either in this harvest or in the next one
(base.HostDriver.harvest_dirty). The lock is a thread lock plus a POSIX
record lock on ``ctl``, which orders the two processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import struct
import sys
import threading
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SHIFT
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.sim import locks

# Standard logging: the guest process imports this module too.
LOG = logging.getLogger(__name__)

P2M_NONE = 0
P2M_RAM = 1
P2M_XEN = 2  # a Xen page (shared info, grant frame) in the physmap
# pfns per block of the p2m changes kept for the memory digest
# (take_p2m_blocks): its blocks are these.
P2M_BLOCK = 64

# Xen pages: index 0 is shared info, 1.. are grant frames.
XENPAGE_SHARED_INFO = 0
XENPAGE_GRANT_BASE = 1
MAX_GRANT_FRAMES = 32
NR_XEN_PAGES = XENPAGE_GRANT_BASE + MAX_GRANT_FRAMES
INVALID_GFN = (1 << 64) - 1

# ctl header: magic, max_pfn, log-dirty enabled, then the write
# tracker's state (armed, the RAM's address in the guest process).
_CTL_MAGIC = 0x4E434D43544C0001
_CTL_HEADER = struct.Struct("<QQQ")
_HDR_TRACKER = 3
_HDR_TRACKER_ADDR = 4
TRACKER_NONE = 0
TRACKER_ARMED = 1
TRACKER_FAILED = 2


_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int


# Linux 5.14's madvise(MADV_POPULATE_WRITE): fault a range in, writable.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# SpareRam faults its pages in by this much at a time, so that a host
# closing meanwhile does not wait for all of it.
_FAULT_IN_STEP = 64 << 20


# userfaultfd(2) and PAGEMAP_SCAN (include/uapi/linux/userfaultfd.h,
# fs.h). x86_64 and arm64 syscall numbers, by the interpreter's target
# (not os.uname(), which Nova's test fixtures forbid in a compute driver).
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(
    getattr(sys.implementation, "_multiarch", "").partition("-")[0]
)
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFD_FEATURES = (
    UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_WP_UNPOPULATED
)
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
_PM_SCAN_ARG = struct.Struct("<12Q")
_SCAN_REGIONS = 4096
# Gaps between RAM pfns the write tracker walks over rather than split
# its walk at: a page table's worth (a walk of it costs less than a call).
_SCAN_GAP = 512

_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MADV_REMOVE = 9
# A scan of at most this many runs is marked a slice a run
# (GuestMemory._mark_runs); more, scattered writes, _MARK_GROUP runs at
# a time as pfn lists of under twice _MARK_CHUNK pfns (a run that long
# as a slice): a guest's first scan lists all it wrote since it was
# created, which in one list would be 8 octets a page.
_MARK_RUNS_MAX = 1024
_MARK_CHUNK = 1 << 16
_MARK_GROUP = 4096
# pfns of the changed map read at a time by take_changed_blocks (an
# octet each), a multiple of every block size it is asked for.
_CHANGED_CHUNK = 1 << 20
# Guest RAM freed per madvise call by GuestMemory.free.
_RELEASE_CHUNK = 64 << 20
# p2m entries compared at a time by equal_runs (an octet each, twice).
_RUNS_CHUNK = 1 << 18
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class WriteTracker:
    """The pages a guest process writes, found without its help.

    userfaultfd write protection in asynchronous mode
    (UFFD_FEATURE_WP_ASYNC, Linux 6.7) on the guest process's shared
    mapping of its RAM: a write to a protected page is resolved by the
    kernel at once, with no fault thread, and leaves the page's PTE
    written; the ``PAGEMAP_SCAN`` ioctl on ``/proc/<pid>/pagemap`` lists
    the written pages and protects them again in one atomic walk, as a
    CPU's dirty bits or PML buffer are read and reset. A write racing the
    walk faults again and is in the next scan.

    :meth:`arm` runs in the guest process before any vCPU (as EPT is set
    up before VM entry) and records the mapping's address in ``ctl``;
    :meth:`scan` runs in the host. Classic userfaultfd write protection
    would need a thread to resolve every fault, and soft-dirty bits
    (``/proc/pid/clear_refs``) cannot be read and cleared atomically.
    """

    def __init__(
        self, pid: int, addr: int, size: int, ram_fd: int | None = None
    ) -> None:
        self.addr = addr
        self.size = size
        if ram_fd is not None:
            _check_mapping(pid, addr, size, ram_fd)
        try:
            self._fd = os.open(
                f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC
            )
        except OSError as exc:
            raise base.HostError(
                f"write tracking of process {pid}: {exc.strerror}",
                call="log_dirty",
            ) from None
        self._vec = np.zeros(3 * _SCAN_REGIONS, dtype=np.uint64)

    @staticmethod
    def arm(mem: GuestMemory) -> int:
        """Write-protect ``mem``'s RAM mapping in this process; returns
        the userfaultfd, which must stay open while the guest runs."""
        if _NR_USERFAULTFD is None:
            raise OSError(errno.ENOSYS, "userfaultfd: unknown architecture")
        fd = _check(
            _syscall(
                _NR_USERFAULTFD,
                os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY,
            ),
            "userfaultfd",
        )
        try:
            api = ctypes.create_string_buffer(
                struct.pack("<QQQ", UFFD_API, _UFFD_FEATURES, 0), 24
            )
            _check(_ioctl(fd, UFFDIO_API, api), "UFFDIO_API")
            features = struct.unpack_from("<QQ", api.raw)[1]
            if features & _UFFD_FEATURES != _UFFD_FEATURES:
                raise OSError(
                    errno.ENOTSUP, "userfaultfd has no asynchronous WP"
                )
            addr = mem.ram.ctypes.data
            reg = ctypes.create_string_buffer(
                struct.pack(
                    "<QQQQ", addr, mem.ram_size, UFFDIO_REGISTER_MODE_WP, 0
                ),
                32,
            )
            _check(_ioctl(fd, UFFDIO_REGISTER, reg), "UFFDIO_REGISTER")
            wp = ctypes.create_string_buffer(
                struct.pack(
                    "<QQQQ", addr, mem.ram_size, UFFDIO_WRITEPROTECT_MODE_WP, 0
                ),
                32,
            )
            _check(_ioctl(fd, UFFDIO_WRITEPROTECT, wp), "UFFDIO_WRITEPROTECT")
        except BaseException:
            os.close(fd)
            raise
        mem.header[_HDR_TRACKER_ADDR] = addr
        mem.header[_HDR_TRACKER] = TRACKER_ARMED
        return fd

    def scan(
        self, spans: Sequence[tuple[int, int]] | None = None
    ) -> np.ndarray:
        """The pfns written since the previous scan (sorted), protected
        again: in ``spans`` ([first, end) pfns, sorted), or all of the
        mapping. A written page outside them stays written in its PTE
        until a scan covers it: nothing is lost by leaving it out."""
        return expand_runs(*self.scan_runs(spans))

    def scan_runs(
        self, spans: Sequence[tuple[int, int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`scan` as runs: ``(first, end)``, int64, the pfns
        ``[first[i], end[i])``, ascending."""
        if spans is None:
            spans = [(0, self.size >> PAGE_SHIFT)]
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for first, last in spans:
            self._walk(
                self.addr + (first << PAGE_SHIFT),
                self.addr + (min(last << PAGE_SHIFT, self.size)),
                starts,
                ends,
            )
        if not starts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        first = (np.concatenate(starts) - np.uint64(self.addr)) >> np.uint64(
            PAGE_SHIFT
        )
        last = (np.concatenate(ends) - np.uint64(self.addr)) >> np.uint64(
            PAGE_SHIFT
        )
        return first.view(np.int64), last.view(np.int64)

    def _walk(
        self,
        start: int,
        end: int,
        starts: list[np.ndarray],
        ends: list[np.ndarray],
    ) -> None:
        """PAGEMAP_SCAN of [start, end): the written regions' bounds
        appended to ``starts`` and ``ends``."""
        vec = self._vec
        while start < end:
            arg = ctypes.create_string_buffer(
                _PM_SCAN_ARG.pack(
                    _PM_SCAN_ARG.size,
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start,
                    end,
                    0,
                    vec.ctypes.data,
                    _SCAN_REGIONS,
                    0,
                    0,
                    PAGE_IS_WRITTEN,
                    0,
                    PAGE_IS_WRITTEN,
                ),
                _PM_SCAN_ARG.size,
            )
            n = _check(_ioctl(self._fd, PAGEMAP_SCAN, arg), "PAGEMAP_SCAN")
            regions = vec[: 3 * n].reshape(n, 3)
            starts.append(regions[:, 0].copy())
            ends.append(regions[:, 1].copy())
            walk_end = _PM_SCAN_ARG.unpack(arg.raw)[4]
            if n < _SCAN_REGIONS or walk_end <= start:
                break
            start = walk_end

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def pfn_spans(pfns: np.ndarray, gap: int = 0) -> list[tuple[int, int]]:
    """The runs ([first, end)) of the sorted ``pfns``, those at most
    ``gap`` pfns apart joined into one."""
    if not len(pfns):
        return []
    p = np.asarray(pfns, dtype=np.int64)
    cuts = np.flatnonzero(np.diff(p) > gap + 1) + 1
    firsts = p[np.concatenate(([0], cuts))]
    lasts = p[np.concatenate((cuts - 1, [len(p) - 1]))] + 1
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def equal_runs(
    values: np.ndarray, value: int, chunk: int = _RUNS_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """The runs ``[first[i], end[i])`` (int64, ascending) of the octets
    of ``values`` equal to ``value``, read ``chunk`` octets at a time:
    what is held at once is two octets a pfn of one chunk and eight
    octets a run, never a list of the matching pfns (8 octets a page of
    the guest's RAM, which is a few runs)."""
    firsts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    inside = False
    total = len(values)
    for lo in range(0, total, chunk):
        part = values[lo : lo + chunk] == value
        # Where a pfn differs from the one before it (the chunk's first
        # from the previous chunk's last).
        changes = np.flatnonzero(part[1:] != part[:-1]) + 1
        if len(part) and bool(part[0]) != inside:
            changes = np.concatenate(([0], changes))
        if len(changes):
            opens = part[changes]
            firsts.append(changes[opens] + lo)
            ends.append(changes[~opens] + lo)
            inside = bool(part[-1])
    if inside:
        ends.append(np.array([total], dtype=np.int64))
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    first = np.concatenate(firsts).astype(np.int64, copy=False)
    end = np.concatenate(ends).astype(np.int64, copy=False)
    return first, end


def bridge_runs(
    first: np.ndarray, end: np.ndarray, gap: int
) -> list[tuple[int, int]]:
    """The runs ``[first[i], end[i])`` (ascending, disjoint) as spans,
    those at most ``gap`` pfns apart joined into one (pfn_spans of the
    runs' pfns)."""
    if not len(first):
        return []
    cuts = np.flatnonzero(first[1:] - end[:-1] > gap) + 1
    firsts = first[np.concatenate(([0], cuts))]
    lasts = end[np.concatenate((cuts - 1, [len(end) - 1]))]
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


expand_runs = base.expand_runs


def _check_mapping(pid: int, addr: int, size: int, ram_fd: int) -> None:
    """The guest process ``pid`` maps the guest's RAM memfd (``ram_fd``
    here) at ``addr`` for ``size`` bytes, as its ``ctl`` header says: the
    scan must walk that mapping and no other."""
    ino = os.fstat(ram_fd).st_ino
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise base.HostError(
            f"write tracking of process {pid}: {exc.strerror}",
            call="log_dirty",
        ) from None
    for line in lines:
        fields = line.split(maxsplit=5)
        span = fields[0].split("-")
        if int(span[0], 16) != addr:
            continue
        if (
            int(span[1], 16) - addr >= size
            and int(fields[4]) == ino
            and fields[5].startswith("/memfd:")
        ):
            return
        break
    raise base.HostError(
        f"write tracking of process {pid}: {addr:#x} is not its mapping "
        f"of the guest's RAM ({size} bytes of memfd inode {ino})",
        call="log_dirty",
    )


def _probe_child() -> None:
    """In a child process (write_tracking_available): arm tracking of a
    scratch memfd, write page 3, report the mapping, wait."""
    import sys

    mem = GuestMemory.create(16, "probe")
    uffd = WriteTracker.arm(mem)
    mem.ram[3, 0] = 1
    print(mem.ram.ctypes.data, mem.ram_size, flush=True)
    sys.stdin.read()
    os.close(uffd)


def write_tracking_available() -> str | None:
    """None if :class:`WriteTracker` works on this kernel, else why not.
    Probed once, as the host uses it: across processes, a child arming
    and writing, this process scanning the child's pagemap."""
    global _TRACKING_PROBE
    if _TRACKING_PROBE is None:
        import subprocess
        import sys

        tracker = None
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from nova_xen_ncm.host.sim import memory; "
                "memory._probe_child()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = child.stdout.readline().split()
            if len(line) != 2:
                child.stdin.close()
                err = child.stderr.read().strip().splitlines()
                raise OSError(
                    errno.ENOTSUP, err[-1] if err else "probe process failed"
                )
            tracker = WriteTracker(child.pid, int(line[0]), int(line[1]))
            found = tracker.scan().tolist()
            again = tracker.scan().tolist()
            _TRACKING_PROBE = (
                ""
                if (found, again) == ([3], [])
                else f"PAGEMAP_SCAN found writes {found} then {again}"
            )
        except (OSError, base.HostError) as exc:
            _TRACKING_PROBE = (
                f"userfaultfd asynchronous write protection and "
                f"PAGEMAP_SCAN (Linux 6.7) are not usable: {exc}"
            )
        finally:
            if tracker is not None:
                tracker.close()
            with contextlib.suppress(OSError):
                child.stdin.close()
            child.wait()
            child.stdout.close()
            child.stderr.close()
    return _TRACKING_PROBE or None


_TRACKING_PROBE: str | None = None


class SpareRamAbandoned(Exception):
    """The host closed while spare RAM was being faulted in."""


class SpareRam:
    """Guest RAM faulted in ahead of the domain that will take it
    ([xen_ncm_sim] prefault_memory_mb).

    A real host's memory is there before a guest is built; a memfd page
    is allocated, zeroed and mapped when first written, which on a
    virtual machine costs more than the octets a migration moves into
    it. This is the memfd of a domain of ``max_pfn`` pages whose first
    ``pages`` are allocated, zero and mapped in the host process.
    """

    def __init__(
        self,
        max_pfn: int,
        pages: int,
        name: str,
        stop: threading.Event | None = None,
    ) -> None:
        self.max_pfn = max_pfn
        self.pages = max(0, min(pages, max_pfn))
        self.fd = os.memfd_create(f"{name}-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max_pfn * PAGE_SIZE)
            self.map = mmap.mmap(self.fd, max_pfn * PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        try:
            self._fault_in(stop)
        except BaseException:
            self.close()
            raise

    def _fault_in(self, stop: threading.Event | None) -> None:
        step = _FAULT_IN_STEP // PAGE_SIZE
        for start in range(0, self.pages, step):
            if stop is not None and stop.is_set():
                raise SpareRamAbandoned("the host closed")
            count = min(step, self.pages - start)
            try:
                self.map.madvise(
                    MADV_POPULATE_WRITE, start * PAGE_SIZE, count * PAGE_SIZE
                )
            except OSError:
                # Before Linux 5.14: write a zero into every page.
                pages = np.frombuffer(
                    self.map,
                    dtype=np.uint8,
                    count=count * PAGE_SIZE,
                    offset=start * PAGE_SIZE,
                )
                pages[::PAGE_SIZE] = 0
                del pages

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# task->flags of a task in do_exit(), set before it gives up its memory.
_PF_EXITING = 0x4


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still has its memory (not gone, not a
    zombie, not exiting)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return _stat_alive(stat)


def _stat_alive(stat: bytes) -> bool:
    """:func:`_alive` of a ``/proc/<pid>/stat`` line. An exiting
    process's mappings are gone from its maps (exit_mm) well before it
    is a zombie; under load that window is long enough for a tracker
    set up then to find no mapping of the guest's RAM."""
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING


def _index(pfns: np.ndarray | int) -> np.ndarray | int:
    """uint64 ``pfns`` as an index of a per-pfn map without a copy
    (numpy would make one in intp, 8 octets a pfn: with every page of
    a guest marked, as its first scan or harvest may, that is 8 octets
    a page at once)."""
    if isinstance(pfns, np.ndarray) and pfns.dtype == np.uint64:
        return pfns.view(np.int64)
    return pfns


def _round_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class _MarkLog:
    """The pfns marked in one of ``ctl``'s maps since it was last read,
    so that reading it costs what was marked, not the map's size (the
    dirty and changed maps are read while the guest is paused). Every
    writer of the maps is this process's, under the memory lock (the
    guest cannot write them). Unknown (``parts`` None) before the first
    read and once more than ``limit`` were marked: the map is then read
    whole, as a bitmap read costs less than sorting that many."""

    def __init__(self, limit: int, size: int) -> None:
        self.limit = limit
        self.size = size
        self.parts: list[np.ndarray] | None = None
        self.count = 0

    def add(self, pfns: np.ndarray | int | slice) -> None:
        """``pfns`` as the map was indexed with them."""
        if self.parts is None:
            return
        if isinstance(pfns, slice):
            span = range(*pfns.indices(self.size))
            if self.count + len(span) > self.limit:
                self.parts = None
                return
            marked = np.array(span, dtype=np.uint64)
        else:
            given = np.asarray(pfns)
            # Counted before any copy: past the limit nothing is copied
            # (every page marked would be 8 octets a page).
            n = (
                int(np.count_nonzero(given))
                if given.dtype == bool
                else given.size
            )
            if self.count + n > self.limit:
                self.parts = None
                return
            # A copy: a caller's array may be a batch buffer used again.
            if given.dtype == bool:
                marked = np.flatnonzero(given).astype(np.uint64)
            else:
                marked = np.array(given, dtype=np.uint64, ndmin=1)
        self.count += len(marked)
        self.parts.append(marked)

    def take(self, mask: np.ndarray) -> np.ndarray:
        """The pfns set in ``mask`` (sorted), which the caller clears;
        the log starts again, empty."""
        if self.parts is None:
            pfns = base.marked(mask)
        elif self.parts:
            pfns = base.pfn_union(*self.parts)
            # A bit cleared since it was marked (the digest clears the
            # ranges it reads) is not set any more.
            pfns = pfns[mask[pfns.astype(np.int64)] != 0]
        else:
            pfns = np.zeros(0, dtype=np.uint64)
        self.clear()
        return pfns

    def clear(self) -> None:
        """The map was cleared whole, or read."""
        self.parts = []
        self.count = 0


class MemoryClosed(base.HostError):
    """The memory of a domain was released (its domain destroyed) while
    a thread of this process still held a reference to it."""


class GuestMemory:
    """The shared memory of one domain, as seen by either process."""

    def __init__(
        self,
        ram_fd: int,
        ctl_fd: int,
        max_pfn: int,
        ram_map: mmap.mmap | None = None,
    ) -> None:
        self.ram_fd = ram_fd
        self.ctl_fd = ctl_fd
        self.max_pfn = max_pfn
        self._p2m_off = PAGE_SIZE
        self._dirty_off = self._p2m_off + _round_up(max_pfn)
        self._changed_off = self._dirty_off + _round_up(max_pfn)
        self._xgfn_off = self._changed_off + _round_up(max_pfn)
        self._xen_off = self._xgfn_off + PAGE_SIZE
        self.ctl_size = self.ctl_bytes(max_pfn)
        self.ram_size = max_pfn * PAGE_SIZE
        if ram_map is None:
            ram_map = mmap.mmap(ram_fd, self.ram_size)
        self.ram_map = ram_map
        self.ctl_map = mmap.mmap(ctl_fd, self.ctl_size)
        self.ram = np.frombuffer(self.ram_map, dtype=np.uint8).reshape(
            max_pfn, PAGE_SIZE
        )
        ctl = np.frombuffer(self.ctl_map, dtype=np.uint8)
        self.header = ctl[:PAGE_SIZE].view(np.uint64)
        self.p2m = ctl[self._p2m_off : self._p2m_off + max_pfn]
        self.dirty = ctl[self._dirty_off : self._dirty_off + max_pfn]
        self.changed = ctl[self._changed_off : self._changed_off + max_pfn]
        self.xen_gfns = ctl[self._xgfn_off : self._xgfn_off + 8 * NR_XEN_PAGES]
        self.xen_gfns = self.xen_gfns.view(np.uint64)
        self.xen_pages = ctl[self._xen_off :].reshape(NR_XEN_PAGES, PAGE_SIZE)
        self._thread_lock = threading.Lock()
        #: Set by :meth:`close` (under the thread lock).
        self.closed = False
        #: Bumped by every change of the p2m (made by the host process
        #: only: the guest cannot write it).
        self.p2m_version = 0
        self._populated: tuple[int, np.ndarray] | None = None
        self._ram_runs: tuple[int, base.PfnRuns] | None = None
        self._ram_spans: tuple[int, list[tuple[int, int]]] | None = None
        #: The blocks of P2M_BLOCK pfns whose p2m changed since the memory
        #: digest last took them (None until it asks: take_p2m_blocks),
        #: so that it never looks at the whole p2m again.
        self._p2m_blocks: set[int] | None = None
        # Marks made in the changed and dirty maps, and how many there
        # were when each was last read: a map nothing marked since is
        # not scanned (all its writers are this process's, under the
        # lock; the guest cannot write them).
        # Each mark stores a number never stored before: a stale store
        # can never bring back the number a reader saw.
        self._mark_seq = itertools.count(1)
        self._marks = 0
        self._changed_read = -1
        self._dirty_read = -1
        # What was marked in each map since it was read (_MarkLog): a
        # few dozen pages of a paused guest are found without reading
        # the map's octet per pfn of the physmap.
        limit = max(256, max_pfn // 512)
        self._changed_log = _MarkLog(limit, max_pfn)
        self._dirty_log = _MarkLog(limit, max_pfn)
        #: RAM pages in the p2m (kept by the host process, as the p2m).
        self.nr_ram = int(np.count_nonzero(self.p2m == P2M_RAM))
        # The host's side of the guest process's write tracking.
        self._tracked_pid: int | None = None
        self._tracker: WriteTracker | None = None
        # The guest process runs no vCPU (hold_tracking): nothing to scan.
        self._held = False
        # Pfns written since the domain was created (host process only:
        # the guest cannot write it), made on the first write.
        self._written_ever: np.ndarray | None = None

    @staticmethod
    def ctl_bytes(max_pfn: int) -> int:
        """Header, p2m types, dirty and changed maps, Xen page GFNs, Xen
        pages."""
        return (
            PAGE_SIZE
            + 3 * _round_up(max_pfn)
            + PAGE_SIZE
            + NR_XEN_PAGES * PAGE_SIZE
        )

    # -- creation (host side) --

    @classmethod
    def create(
        cls,
        max_pfn: int,
        name: str,
        spare: SpareRam | None = None,
        ram_ranges: tuple[tuple[int, int], ...] = (),
    ) -> GuestMemory:
        """The memory of a new domain, in ``spare`` if given (its
        pages outside ``ram_ranges``, [start, end) pfns, are freed)."""
        ctl_fd = os.memfd_create(f"{name}-ctl", os.MFD_CLOEXEC)
        ram_map = None
        try:
            if spare is not None:
                if spare.max_pfn != max_pfn:
                    raise ValueError(
                        f"spare RAM of {spare.max_pfn} pfns for a domain "
                        f"of {max_pfn}"
                    )
                ram_fd, ram_map = spare.fd, spare.map
            else:
                ram_fd = os.memfd_create(f"{name}-ram", os.MFD_CLOEXEC)
                os.ftruncate(ram_fd, max_pfn * PAGE_SIZE)
        except BaseException:
            os.close(ctl_fd)
            raise
        try:
            os.ftruncate(ctl_fd, cls.ctl_bytes(max_pfn))
            mem = cls(ram_fd, ctl_fd, max_pfn, ram_map)
        except BaseException:
            if ram_map is not None:
                ram_map.close()
            os.close(ram_fd)
            os.close(ctl_fd)
            raise
        # A new ctl is zero, and only this process marks it.
        mem._changed_log.clear()
        mem._dirty_log.clear()
        if spare is not None:
            mem._free_outside(ram_ranges, spare.pages)
        mem.header[0] = _CTL_MAGIC
        mem.header[1] = max_pfn
        mem.xen_gfns[:] = INVALID_GFN
        return mem

    def _free_outside(
        self, ranges: tuple[tuple[int, int], ...], end: int
    ) -> None:
        """Free the pages below ``end`` that are not in ``ranges``."""
        pos = 0
        for start, stop in [*sorted(ranges), (end, end)]:
            start = min(start, end)
            if pos < start:
                self.ram_map.madvise(
                    mmap.MADV_REMOVE,
                    pos * PAGE_SIZE,
                    (start - pos) * PAGE_SIZE,
                )
            pos = max(pos, stop)

    @classmethod
    def attach(cls, ram_fd: int, ctl_fd: int) -> GuestMemory:
        """Map the memory of an existing domain (the guest process)."""
        magic, max_pfn, _ = _CTL_HEADER.unpack(os.pread(ctl_fd, 24, 0))
        if magic != _CTL_MAGIC:
            raise ValueError(f"fd {ctl_fd} is not a domain control area")
        return cls(ram_fd, ctl_fd, max_pfn)

    def free(self) -> None:
        """In the host, once the domain is destroyed: free its RAM, then
        :meth:`close`. The pages go a chunk at a time, each by
        ``madvise(MADV_REMOVE)`` (which frees them without the process's
        memory map lock, and through ctypes without the GIL): unmapping
        gigabytes of faulted pages at once holds that lock for a second,
        and every thread of this process that maps memory (a thread's
        stack) or faults waits for it. Each call under the memory lock's
        thread half, as :meth:`close`: no close unmaps the range (whose
        addresses a new mapping may take) while a call is on it, and a
        close between two calls ends the loop; held one chunk at a time,
        so a thread that takes it (innermost of all) waits that long."""
        for start in range(0, self.ram_size, _RELEASE_CHUNK):
            length = min(_RELEASE_CHUNK, self.ram_size - start)
            with self._thread_lock:
                if self.closed:
                    return
                addr = self.ram.ctypes.data
                if _madvise(addr + start, length, _MADV_REMOVE) != 0:
                    err = ctypes.get_errno()
                    # The unmap and the last descriptor's close free
                    # them, as before.
                    LOG.warning(
                        "madvise(MADV_REMOVE) of a destroyed domain's RAM "
                        "at offset %d: %s",
                        start,
                        os.strerror(err),
                    )
                    break
        self.close()

    def close(self) -> None:
        """Unmap and close the memory. Taken under the memory lock's
        thread half: a thread of this process in :meth:`lock` (say, a
        dom0 handler or the digest cache of a domain being destroyed in
        the background) finishes first, and one that comes later gets
        :class:`MemoryClosed`, not a lockf on a closed (or reused)
        descriptor."""
        with self._thread_lock:
            if self.closed:
                return
            self.closed = True
            self.untrack()
            self.ram = self.p2m = self.dirty = None  # type: ignore[assignment]
            self.changed = None  # type: ignore[assignment]
            self.header = self.xen_gfns = self.xen_pages = None  # type: ignore
            for m in (self.ram_map, self.ctl_map):
                with contextlib.suppress(BufferError):
                    m.close()
            for fd in (self.ram_fd, self.ctl_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.ram_fd = self.ctl_fd = -1

    # -- the memory lock --

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The memory lock (locks.MEMORY, checked against locks.ORDER
        in whichever process takes it)."""
        with locks.ordered(locks.MEMORY, self._thread_lock, self):
            if self.closed:
                raise MemoryClosed(
                    "the domain's memory was released", call="memory lock"
                )
            fcntl.lockf(self.ctl_fd, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(self.ctl_fd, fcntl.LOCK_UN, 1, 0)

    # -- write tracking (see WriteTracker) --

    def arm_write_tracking(self) -> int | None:
        """In the guest process, before the guest runs: protect its RAM
        mapping; returns the userfaultfd to keep open, or None (recorded
        in ``ctl``: the host then takes every page as written)."""
        try:
            return WriteTracker.arm(self)
        except OSError:
            self.header[_HDR_TRACKER] = TRACKER_FAILED
            return None

    def reset_tracking(self) -> None:
        """In the host, before a guest process is launched: what ``ctl``
        says of tracking is the next process's, not a previous one's.
        The caller holds :meth:`lock`."""
        self.untrack()
        self.header[_HDR_TRACKER] = TRACKER_NONE
        self.header[_HDR_TRACKER_ADDR] = 0

    @property
    def tracking(self) -> int:
        """TRACKER_NONE (not armed yet), TRACKER_ARMED or TRACKER_FAILED."""
        return int(self.header[_HDR_TRACKER])

    def track(self, pid: int, *, held: bool = False) -> None:
        """In the host: the guest process ``pid`` maps this memory (it
        arms its tracking before it runs the guest). ``held``: it runs
        no vCPU until :meth:`release_tracking` (a guest process launched
        before it is started): until then a flush scans nothing, and
        what it writes stays in its PTEs for the first scan after."""
        self.untrack()
        self._tracked_pid = pid
        self._held = held

    def hold_tracking(self) -> None:
        """In the host, once the guest process runs no vCPU (paused):
        keep what it wrote last; until :meth:`release_tracking`, a flush
        scans nothing, so that the harvests and digests of a paused guest
        cost nothing proportional to its RAM (a paused guest writes
        nothing; the hypervisor's and dom0's writes are marked by their
        writer). The caller holds :meth:`lock`."""
        self._flush_written()
        self._held = True

    def release_tracking(self) -> None:
        """In the host, before the guest process runs its vCPUs again:
        flushes scan again. The caller holds :meth:`lock`."""
        self._held = False

    def flush_and_untrack(self) -> None:
        """In the host, once the guest process runs no vCPU: keep what it
        wrote last, then stop tracking it. The caller holds :meth:`lock`."""
        self._flush_written()
        self.untrack()

    def untrack(self) -> None:
        tracker, self._tracker = self._tracker, None
        self._tracked_pid = None
        if tracker is not None:
            tracker.close()

    def _flush_written(self) -> None:
        """Record the pages the guest process wrote since the previous
        flush in the changed map and, with log-dirty on, the dirty map.
        The caller holds :meth:`lock`."""
        if self._held:
            return
        if self._tracker is None and self._tracked_pid is not None:
            state = int(self.header[_HDR_TRACKER])
            if state == TRACKER_ARMED:
                try:
                    self._tracker = WriteTracker(
                        self._tracked_pid,
                        int(self.header[_HDR_TRACKER_ADDR]),
                        self.ram_size,
                        self.ram_fd,
                    )
                except base.HostError:
                    if _alive(self._tracked_pid):
                        raise
                    return  # the guest process has gone: it writes no more
            elif state == TRACKER_FAILED:
                # Every RAM page, a slice a run: no list of its pfns.
                runs = self.ram_runs()
                first, end = runs.first, runs.end
                if len(first) > _MARK_RUNS_MAX:
                    self._mark_many_runs(first, end)
                elif len(first):
                    self._mark_runs(first.tolist(), end.tolist())
                return
        if self._tracker is None:
            return  # no guest process, or one that has not run yet
        try:
            first, end = self._tracker.scan_runs(self.ram_spans())
        except OSError as exc:
            if self._tracked_pid is None or _alive(self._tracked_pid):
                raise base.HostError(
                    f"write tracking of process {self._tracked_pid}: "
                    f"{exc.strerror}",
                    call="log_dirty",
                ) from None
            return  # the guest process has gone: it writes no more
        if len(first) > _MARK_RUNS_MAX:
            self._mark_many_runs(first, end)
        elif len(first):
            self._mark_runs(first.tolist(), end.tolist())

    def _mark_many_runs(self, first: np.ndarray, end: np.ndarray) -> None:
        """:meth:`mark_dirty` of many runs ``[first[i], end[i])`` (int64,
        ascending), _MARK_GROUP runs at a time: those of at least
        _MARK_CHUNK pfns a slice each, the others expanded into pfns
        under twice _MARK_CHUNK at a time, so that what is held at once
        is bounded, not 8 octets a page written. The caller holds
        :meth:`lock`."""
        for lo in range(0, len(first), _MARK_GROUP):
            # Views: the scan's arrays are not copied.
            starts = first[lo : lo + _MARK_GROUP]
            ends = end[lo : lo + _MARK_GROUP]
            lengths = ends - starts
            long = lengths >= _MARK_CHUNK
            if long.any():
                self._mark_runs(starts[long].tolist(), ends[long].tolist())
                short = ~long
                starts, ends, lengths = (
                    starts[short],
                    ends[short],
                    lengths[short],
                )
            if not len(starts):
                continue
            # Cut where the pfns before a run pass a multiple of
            # _MARK_CHUNK.
            before = np.cumsum(lengths)
            cuts = np.searchsorted(
                before,
                np.arange(_MARK_CHUNK, int(before[-1]), _MARK_CHUNK),
                side="right",
            )
            done = 0
            for cut in [*cuts.tolist(), len(starts)]:
                if cut > done:
                    self.mark_dirty(
                        expand_runs(starts[done:cut], ends[done:cut])
                    )
                done = cut

    def _mark_runs(self, first: list[int], end: list[int]) -> None:
        """:meth:`mark_dirty` of the pfns ``[first[i], end[i])``, a slice
        a run: a guest process's first scan lists all it wrote since it
        was created, often all of its RAM in a few runs, which as a pfn
        list would be 8 octets a page. The caller holds :meth:`lock`."""
        if self._written_ever is None:
            self._written_ever = np.zeros(self.max_pfn, dtype=np.uint8)
        maps = [self._written_ever, self.changed]
        # The maps' logs learn of each run too: a harvest or digest
        # that reads only the log would miss it otherwise.
        logs = [self._changed_log]
        if self.header[2]:
            maps.append(self.dirty)
            logs.append(self._dirty_log)
        for lo, hi in zip(first, end, strict=True):
            for per_pfn in maps:
                per_pfn[lo:hi] = 1
            for log in logs:
                log.add(slice(lo, hi))
        self._marks = next(self._mark_seq)

    # -- log-dirty --

    @property
    def log_dirty(self) -> bool:
        return bool(self.header[2])

    def set_log_dirty(self, enabled: bool) -> None:
        with self.lock():
            # Writes before this are changes, not part of the log.
            self._flush_written()
            self.dirty[:] = 0
            self._dirty_log.clear()
            self.header[2] = 1 if enabled else 0

    def mark_dirty(self, pfns: np.ndarray | int) -> None:
        """Record writes of the hypervisor or dom0 (Xen's
        paging_mark_dirty), never called by the guest; the caller holds
        :meth:`lock`."""
        if self._written_ever is None:
            # calloc'd: a page of it is memory once a pfn in it is marked.
            self._written_ever = np.zeros(self.max_pfn, dtype=np.uint8)
        pfns = _index(pfns)
        self._written_ever[pfns] = 1
        self.changed[pfns] = 1
        self._changed_log.add(pfns)
        if self.header[2]:
            self.dirty[pfns] = 1
            self._dirty_log.add(pfns)
        self._marks = next(self._mark_seq)

    def take_changed(self) -> np.ndarray:
        """The pfns written since the previous call, and forget them: a
        write racing this is in this result or the next (as harvest)."""
        with self.lock():
            self._flush_written()
            marks = self._marks
            if marks == self._changed_read:
                return np.zeros(0, dtype=np.uint64)
            self._changed_read = marks
            pfns = self._changed_log.take(self.changed)
            self.changed[_index(pfns)] = 0
        return pfns

    def take_changed_blocks(
        self, block: int, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`take_changed` as the blocks of ``block`` pfns (a
        divisor of _CHANGED_CHUNK) holding a changed page (sorted
        uint64), each changed page also set in ``mask`` (a bool per pfn)
        if given. A map whose log is unknown (the first read, or a guest
        that wrote more than the log holds) is read a chunk at a time:
        a guest that wrote all its RAM costs no list of its pages (8
        octets a page), an octet per block at most."""
        with self.lock():
            self._flush_written()
            marks = self._marks
            if marks == self._changed_read:
                return np.zeros(0, dtype=np.uint64)
            self._changed_read = marks
            log = self._changed_log
            if log.parts is not None:
                pfns = log.take(self.changed)
                index = _index(pfns)
                self.changed[index] = 0
                if mask is not None:
                    mask[index] = True
                return base.pfn_union(pfns // np.uint64(block))
            found = []
            for lo in range(0, self.max_pfn, _CHANGED_CHUNK):
                part = self.changed[lo : lo + _CHANGED_CHUNK].view(bool)
                if not part.any():
                    continue
                if mask is not None:
                    mask[lo : lo + len(part)] |= part
                pad = -len(part) % block
                rows = (
                    part
                    if not pad
                    else np.concatenate((part, np.zeros(pad, dtype=bool)))
                )
                held = np.flatnonzero(rows.reshape(-1, block).any(axis=1))
                found.append(held.astype(np.uint64) + np.uint64(lo // block))
                # Only the octets set are written: a page of the shared
                # map nothing marked stays unallocated.
                np.copyto(part, False, where=part)
            log.clear()
        if not found:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate(found)

    def written_since_creation(self, start: int, end: int) -> np.ndarray:
        """Which pfns of ``[start, end)`` were written since the domain
        was created (:meth:`written_mask`'s map, as it stands: the
        caller flushed the guest's writes it needs)."""
        ever = self._written_ever
        if ever is None:
            return np.zeros(max(end - start, 0), dtype=bool)
        return ever[start:end] != 0

    def data_mask(self, start: int, end: int) -> np.ndarray:
        """Which pfns of ``[start, end)`` hold data (not holes): reading
        a hole of the shared memory would allocate it.

        mincore() of the range answers in time proportional to the range
        (a written page of the memfd is in its page cache, a hole is
        not); SEEK_HOLE, the fallback, walks the file's pages up to the
        next hole, which for a fully written guest is its end."""
        count = end - start
        if count <= 0:
            return np.zeros(0, dtype=bool)
        vec = np.empty(count, dtype=np.uint8)
        addr = self.ram.ctypes.data + start * PAGE_SIZE
        if _mincore(addr, count * PAGE_SIZE, vec.ctypes.data) == 0:
            return (vec & 1).astype(bool)
        return self._seek_data_mask(start, end)

    def written_mask(self, pfns: np.ndarray) -> np.ndarray:
        """Which of ``pfns`` were written since the domain was created
        (bool, in the order given); the others hold zero (as a real
        host knows the pfns it never populated). Kept by the host as
        every writer marks its writes (:meth:`mark_dirty`, which the
        guest process's write tracking feeds), not read from the memory
        (prefaulted RAM is resident whether written or not). Pages the
        guest wrote since the last scan are in it once scanned: with
        log-dirty on they are harvested and sent again anyway, and a
        paused guest's writes were scanned when it stopped; otherwise
        this scans first."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        if not (self.header[2] or self._held):
            with self.lock():
                self._flush_written()
        ever = self._written_ever
        if ever is None:
            return np.zeros(len(pfns), dtype=bool)
        # Indexed through a view: a copy would be 8 octets a pfn.
        return ever.view(bool)[pfns.view(np.int64)]

    def seek_data_mask(self, start: int, end: int) -> np.ndarray:
        """Which pfns of ``[start, end)`` hold data (not holes), from the
        kernel's SEEK_DATA/SEEK_HOLE on the memfd: one call for a range
        of holes only, whatever its size (unlike :meth:`data_mask`)."""
        return self._seek_data_mask(start, end)

    def _seek_data_mask(self, start: int, end: int) -> np.ndarray:
        mask = np.zeros(end - start, dtype=bool)
        pos = start * PAGE_SIZE
        stop = end * PAGE_SIZE
        while pos < stop:
            try:
                first = os.lseek(self.ram_fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if first >= stop:
                break
            last = min(os.lseek(self.ram_fd, first, os.SEEK_HOLE), stop)
            lo = (first >> PAGE_SHIFT) - start
            hi = (_round_up(last) >> PAGE_SHIFT) - start
            mask[lo:hi] = True
            pos = last
        return mask

    def harvest(self, extra: np.ndarray | None = None) -> np.ndarray:
        with self.lock():
            self._flush_written()
            marks = self._marks
            if marks == self._dirty_read:
                pfns = np.zeros(0, dtype=np.uint64)
            else:
                self._dirty_read = marks
                pfns = self._dirty_log.take(self.dirty)
                self.dirty[_index(pfns)] = 0
        if extra is not None and len(extra):
            pfns = base.pfn_union(pfns, extra)
        return pfns

    # -- physmap --

    def ram_runs(self) -> base.PfnRuns:
        """The RAM pfns as runs (kept until the p2m changes: the same
        object while it stands). Read from the p2m a
        chunk at a time: a guest's RAM is a few runs, and its pfns as a
        list would be 8 octets a page (16 MiB at 8 GiB) each time the p2m
        changes or a guest is paused."""
        # The version read before the p2m: a change racing the read (a
        # thread without the memory lock) leaves the runs stale under
        # the version before it, looked at again next time, never under
        # the version after it (the write tracker walks their spans).
        version = self.p2m_version
        cached = self._ram_runs
        if cached is None or cached[0] != version:
            cached = self._ram_runs = (
                version,
                base.PfnRuns(*equal_runs(self.p2m, P2M_RAM)),
            )
        return cached[1]

    def populated(self) -> np.ndarray:
        """The RAM pfns, sorted (read-only: kept until the p2m changes).
        8 octets a page: the host's answer to populated_pfns, which the
        write tracking does not need (:meth:`ram_runs`)."""
        version = self.p2m_version
        cached = self._populated
        if cached is None or cached[0] != version:
            pfns = self.ram_runs().pfns()
            pfns.flags.writeable = False
            cached = self._populated = (version, pfns)
        return cached[1]

    def ram_spans(self) -> list[tuple[int, int]]:
        """The spans ([first, end) pfns) of the RAM pfns, gaps of up to
        _SCAN_GAP pfns bridged (kept until the p2m changes): what the
        write tracker walks. The mapping spans the whole physmap (about
        4 GiB for any guest up to 3.75 GiB); the guest's writes outside
        its RAM touch nothing the host reads, and stay in their PTEs
        for the first scan after their pfn becomes RAM."""
        version = self.p2m_version
        cached = self._ram_spans
        if cached is None or cached[0] != version:
            runs = self.ram_runs()
            cached = self._ram_spans = (
                version,
                bridge_runs(runs.first, runs.end, _SCAN_GAP),
            )
        return cached[1]

    def check_ram(self, pfns: np.ndarray, call: str) -> np.ndarray:
        from nova_xen_ncm.host.base import HostError

        pfns = np.asarray(pfns, dtype=np.uint64)
        if len(pfns) and int(pfns.max()) >= self.max_pfn:
            raise HostError(
                f"pfn {int(pfns.max()):#x} beyond the guest's physmap "
                f"(max {self.max_pfn:#x})",
                call=call,
            )
        bad = pfns[self.p2m[pfns] != P2M_RAM]
        if len(bad):
            raise HostError(
                f"pfn {int(bad[0]):#x} is not populated RAM "
                f"({len(bad)} such pfns)",
                call=call,
            )
        return pfns

    # A page that leaves RAM is marked as written (the changed map): the
    # memory digest reads its block again. A page populated is zero until
    # written, and zero pages are not in the blocks' digests (the hash of
    # the populated set follows p2m_version). The caller holds
    # :meth:`lock`.

    def take_p2m_blocks(self) -> set[int] | None:
        """The blocks (of P2M_BLOCK pfns) whose p2m changed since the
        previous call, and forget them; None on the first call (from
        then on they are kept). The caller holds :meth:`lock`."""
        blocks = self._p2m_blocks
        self._p2m_blocks = set()
        return blocks

    def forget_p2m_blocks(self, blocks: list[int]) -> None:
        """``blocks`` are read against the p2m as it is now (the caller
        holds :meth:`lock`): their changes so far are taken."""
        if self._p2m_blocks is not None:
            self._p2m_blocks.difference_update(blocks)

    def _p2m_changed(self, pfns: np.ndarray | int) -> None:
        if self._p2m_blocks is None:
            return
        if isinstance(pfns, int):
            self._p2m_blocks.add(pfns // P2M_BLOCK)
        else:
            self._p2m_blocks.update(
                base.pfn_union(pfns // np.uint64(P2M_BLOCK)).tolist()
            )

    def populate(self, pfns: np.ndarray) -> None:
        pfns = np.asarray(pfns, dtype=np.uint64)
        new = pfns[self.p2m[pfns] != P2M_RAM]
        if len(new):
            new = base.pfn_union(new)
            self.p2m[new] = P2M_RAM
            self.nr_ram += len(new)
            self.p2m_version += 1
            self._p2m_changed(new)

    def release(self, pfn: int) -> None:
        """Take a RAM page out of the physmap and free its memory."""
        if self.p2m[pfn] == P2M_RAM:
            self.nr_ram -= 1
        self.p2m[pfn] = P2M_NONE
        self.changed[pfn] = 1
        self._changed_log.add(pfn)
        self._marks = next(self._mark_seq)
        self.p2m_version += 1
        self._p2m_changed(int(pfn))
        self.ram_map.madvise(mmap.MADV_REMOVE, pfn * PAGE_SIZE, PAGE_SIZE)

    def map_xen_page(self, index: int, gfn: int) -> None:
        """XENMEM_add_to_physmap of a Xen page: whatever RAM was at
        ``gfn`` is freed; the page leaves its previous GFN."""
        old = int(self.xen_gfns[index])
        if old != INVALID_GFN:
            self.p2m[old] = P2M_NONE
            self.changed[old] = 1
            self._changed_log.add(old)
            self._marks = next(self._mark_seq)
            self._p2m_changed(old)
        if self.p2m[gfn] == P2M_RAM:
            self.release(gfn)
        elif self.p2m[gfn] == P2M_XEN:
            other = np.flatnonzero(self.xen_gfns == gfn)
            self.xen_gfns[other] = INVALID_GFN
        self.p2m[gfn] = P2M_XEN
        self.changed[gfn] = 1
        self._changed_log.add(gfn)
        self._marks = next(self._mark_seq)
        self.p2m_version += 1
        self._p2m_changed(int(gfn))
        self.xen_gfns[index] = gfn

    def xen_page_at(self, gfn: int) -> int | None:
        hits = np.flatnonzero(self.xen_gfns == gfn)
        return int(hits[0]) if len(hits) else None

    def page(self, pfn: int, writable: bool = False) -> memoryview:
        """A view of a RAM page or of the Xen page mapped at ``pfn``."""
        if self.p2m[pfn] == P2M_XEN:
            index = self.xen_page_at(pfn)
            off = self._xen_off + index * PAGE_SIZE  # type: ignore
            view = memoryview(self.ctl_map)[off : off + PAGE_SIZE]
        else:
            off = pfn << PAGE_SHIFT
            view = memoryview(self.ram_map)[off : off + PAGE_SIZE]
        return view if writable else view.toreadonly()
