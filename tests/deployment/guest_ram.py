"""The deployment tier's oracle: a simulated guest judged from its own RAM.

A nova-compute of the minicloud runs each guest's vCPUs in a process of
its own that maps the guest's RAM, a memfd the simulated hypervisor
shares with it. This module finds that process on one compute (a child
of the compute's pid, holding the domain's ``-ram`` and ``-ctl`` memfds)
and reads the RAM through ``/proc/<pid>/fd`` with ``pread``, read-only
(a read of a hole allocates nothing, unlike a mapping, so the hypervisor
sees the same populated pages as without this observer).

It shares nothing with the product: no import of nova_xen_ncm, no host
driver call, no Nova record. What it knows is the guest's own ABI, the
records the guest kernel keeps in its RAM (the layout documented in the
simulator's kernel module, written out here again):

* pfn 0x100, the kernel's header: magic ``NCMGUEST``, version, vCPU
  count, the workload's pattern, fill, seed and dirty rate, ...; at byte
  512 one 64-byte slot per vCPU: its counter (the vCPU's program counter:
  how many pages it wrote), its IPI port, its vcpu_info placement, the
  events it took and the IPIs it sent;
* pfns 0x100-0x11f: the kernel's own area (it changes as the guest runs);
* every other RAM page from pfn 0x120 is the workload's heap; a page the
  workload wrote starts with ``0x5741524B | vcpu << 32`` and the vCPU's
  counter at that write. Pages it never wrote keep what the guest's boot
  filled them with.

The verdicts (:func:`judge`), from a snapshot on the source before the
migration and two on the destination after the guest resumed there:

* the same guest: header identical in what the guest never changes;
* it continued: each vCPU's counter on the destination is at least the
  source's, and grows while the guest runs there (it writes memory);
* it takes events there: each vCPU's event count grows after resume (its
  own IPIs go through the destination's hypervisor), when the guest has
  PV drivers;
* its memory came along: every heap page it never wrote holds the bytes
  the source had; every page it had written is still stamped, by the
  same vCPU with a counter no lower, or by another vCPU since; no stamp
  is from a counter the vCPU has not reached (no page from the future).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import time
from pathlib import Path

import numpy as np

PAGE = 4096
KERNEL_PFN = 0x100
KERNEL_PAGES = 32
HEAP_START_PFN = KERNEL_PFN + KERNEL_PAGES
VGA_HOLE = (0xA0, 0xC0)
MAGIC = b"NCMGUEST"
STAMP_MAGIC = 0x5741524B
HEADER = struct.Struct("<8sIIIIQQddIIQQQIIIIQIIIIdQ")
HEADER_NAMES = (
    "magic version nr_vcpus pattern fill seed dirty_rate hot_fraction "
    "hot_probability pv_drivers nr_grant_frames shared_info_gfn grant_gfn "
    "callback_via store_port console_port debug_port nr_frontends upcalls "
    "domid xenbus_ready next_driver_page next_grant_ref io_rate store_pfn"
).split()
# What the guest sets at boot and never changes.
IDENTITY = (
    "magic", "version", "nr_vcpus", "pattern", "fill", "seed",
    "dirty_rate", "pv_drivers",
)  # fmt: skip
VCPU = struct.Struct("<QIIQIIQQ")
VCPU_NAMES = (
    "counter ipi_port pad vcpu_info_gfn vcpu_info_offset pad2 events ipis_sent"
).split()
VCPU_TABLE = 512
VCPU_STRIDE = 64
GUEST_MODULE = b"nova_xen_ncm.host.sim.guest"
_MEMFD = re.compile(
    r"^/memfd:(?P<name>.+)-(?P<kind>ram|ctl)(?: \(deleted\))?$"
)


class NoGuest(AssertionError):
    pass


@dataclasses.dataclass(frozen=True)
class GuestProcess:
    pid: int
    ram_fd: int
    # The ctl memfd's name: "<simulated host>-d<domid>".
    domain: str


@dataclasses.dataclass
class Snapshot:
    """The guest's RAM at one moment, as the guest left it there."""

    host: str
    process: GuestProcess
    header: dict
    vcpus: list[dict]
    # (pfns, 512 uint64 words each) of the heap read.
    pfns: np.ndarray
    words: np.ndarray
    taken: float


def compute_pid(run_dir: Path, service: str) -> int:
    return int((run_dir / f"{service}.pid").read_text().strip())


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def guests_of(compute: int) -> list[GuestProcess]:
    """The guest processes of the compute ``compute`` that hold a
    domain (a spare guest process holds no memfd yet)."""
    found = []
    for pid in _children(compute):
        try:
            if GUEST_MODULE not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            fds = {}
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                match = _MEMFD.match(os.readlink(fd))
                if match:
                    fds[match.group("kind")] = (int(fd.name), match)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "ram" in fds and "ctl" in fds:
            found.append(
                GuestProcess(pid, fds["ram"][0], fds["ctl"][1].group("name"))
            )
    return found


def the_guest(compute: int, host: str, settle: float = 30.0) -> GuestProcess:
    """The one guest on ``host``; waits ``settle`` for it to be one
    (a guest whose migration ended is stopped in the background)."""
    deadline = time.monotonic() + settle
    while True:
        guests = guests_of(compute)
        if len(guests) == 1:
            return guests[0]
        if time.monotonic() > deadline:
            raise NoGuest(
                f"{host}: {len(guests)} guest processes with a domain "
                f"({[g.domain for g in guests]}), not one"
            )
        time.sleep(0.5)


def no_guest(compute: int, host: str, settle: float = 30.0) -> None:
    """No guest left running on ``host`` (its copy went elsewhere)."""
    deadline = time.monotonic() + settle
    while guests := guests_of(compute):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{host} still runs {[g.domain for g in guests]}: the "
                "guest runs on two hosts"
            )
        time.sleep(0.5)


def _read(fd: int, offset: int, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise NoGuest(f"guest RAM ends at {offset + done:#x}")
        done += n
    return bytes(data)


def _header(page: bytes) -> tuple[dict, list[dict]]:
    header = dict(zip(HEADER_NAMES, HEADER.unpack_from(page, 0), strict=True))
    if header["magic"] != MAGIC:
        raise NoGuest(f"no guest kernel header in RAM: {header['magic']!r}")
    vcpus = [
        dict(
            zip(
                VCPU_NAMES,
                VCPU.unpack_from(page, VCPU_TABLE + v * VCPU_STRIDE),
                strict=True,
            )
        )
        for v in range(header["nr_vcpus"])
    ]
    return header, vcpus


def snapshot(
    host: str, guest: GuestProcess, memory_mb: int, heap: bool = True
) -> Snapshot:
    """Read the guest's RAM: the heap first, the header last, so that
    every stamp read was written at a counter the header shows reached."""
    path = f"/proc/{guest.pid}/fd/{guest.ram_fd}"
    fd = os.open(path, os.O_RDONLY)
    try:
        pfns = np.arange(0, 0, dtype=np.int64)
        words = np.zeros((0, PAGE // 8), dtype=np.uint64)
        if heap:
            end = memory_mb * (1 << 20) // PAGE
            raw = _read(
                fd, HEAP_START_PFN * PAGE, (end - HEAP_START_PFN) * PAGE
            )
            words = np.frombuffer(raw, dtype=np.uint64).reshape(-1, PAGE // 8)
            pfns = np.arange(HEAP_START_PFN, end, dtype=np.int64)
        header, vcpus = _header(_read(fd, KERNEL_PFN * PAGE, PAGE))
    finally:
        os.close(fd)
    return Snapshot(host, guest, header, vcpus, pfns, words, time.monotonic())


def _stamps(snap: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stamped mask, vCPU, counter) per heap page."""
    first = snap.words[:, 0]
    stamped = (first & np.uint64(0xFFFFFFFF)) == np.uint64(STAMP_MAGIC)
    vcpu = (first >> np.uint64(32)).astype(np.int64)
    stamped &= vcpu < snap.header["nr_vcpus"]
    return stamped, vcpu, snap.words[:, 1]


def judge(before: Snapshot, resumed: Snapshot, later: Snapshot) -> list[str]:
    """What is wrong with the guest, from its RAM: ``before`` on the
    source before the migration, ``resumed`` on the destination once it
    ran there, ``later`` a while after (header only is enough). Empty
    when every verdict passes."""
    problems = []
    for name in IDENTITY:
        for snap in (resumed, later):
            if snap.header[name] != before.header[name]:
                problems.append(
                    f"header {name} is {snap.header[name]!r} on "
                    f"{snap.host}, was {before.header[name]!r} on "
                    f"{before.host}: not the same guest"
                )
    if problems:
        return problems
    for v, (a, b, c) in enumerate(
        zip(before.vcpus, resumed.vcpus, later.vcpus, strict=True)
    ):
        if b["counter"] < a["counter"]:
            problems.append(
                f"vCPU {v} went back from counter {a['counter']} to "
                f"{b['counter']}"
            )
        if before.header["dirty_rate"] and c["counter"] <= b["counter"]:
            problems.append(
                f"vCPU {v} did not run on {later.host}: counter "
                f"{b['counter']} after {later.taken - resumed.taken:.1f} s"
            )
        if before.header["pv_drivers"] and c["events"] <= b["events"]:
            problems.append(
                f"vCPU {v} took no event on {later.host} in "
                f"{later.taken - resumed.taken:.1f} s (events {c['events']})"
            )
    problems += _memory(before, resumed)
    return problems


def _memory(before: Snapshot, after: Snapshot) -> list[str]:
    problems = []
    if not np.array_equal(before.pfns, after.pfns):
        return ["the snapshots read different RAM"]
    live = (before.pfns < VGA_HOLE[0]) | (before.pfns >= VGA_HOLE[1])
    s_a, v_a, c_a = _stamps(before)
    s_b, v_b, c_b = _stamps(after)
    untouched = live & ~s_b
    # A page the workload never wrote holds its boot content.
    changed = untouched & np.any(before.words != after.words, axis=1)
    if changed.any():
        pfns = before.pfns[changed]
        problems.append(
            f"{int(changed.sum())} pages the guest never wrote differ "
            f"from the source's (first pfns {[hex(p) for p in pfns[:5]]})"
        )
    lost = live & s_a & ~s_b
    if lost.any():
        problems.append(
            f"{int(lost.sum())} pages the guest had written lost their "
            f"write (first pfns {[hex(p) for p in before.pfns[lost][:5]]})"
        )
    back = live & s_a & s_b & (v_a == v_b) & (c_b < c_a)
    if back.any():
        problems.append(
            f"{int(back.sum())} pages went back to an older write "
            f"(first pfns {[hex(p) for p in before.pfns[back][:5]]})"
        )
    reached = np.array([v["counter"] for v in after.vcpus], dtype=np.uint64)
    ahead = live & s_b & (c_b > reached[np.minimum(v_b, len(reached) - 1)])
    if ahead.any():
        problems.append(
            f"{int(ahead.sum())} pages hold writes from counters their "
            f"vCPU has not reached (first pfns "
            f"{[hex(p) for p in before.pfns[ahead][:5]]})"
        )
    if not (s_b & live).any():
        problems.append("the guest wrote no page at all")
    return problems
