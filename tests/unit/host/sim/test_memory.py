"""The hypervisor's write tracking (memory.WriteTracker): writes that a
guest process makes through a raw mapping of its RAM, calling nothing,
are found by the host, in the dirty map only while log-dirty is on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim import memory
from nova_xen_ncm.host.sim.memory import GuestMemory

# The guest: arms the tracking, then writes what it reads on stdin
# ("pfn offset") with a bare store into its mmap of the RAM memfd,
# calling nothing of the host's, and says "ok".
_WRITER = textwrap.dedent(
    """
    import sys
    from nova_xen_ncm.host.sim.memory import GuestMemory
    mem = GuestMemory.attach(int(sys.argv[1]), int(sys.argv[2]))
    fd = mem.arm_write_tracking()
    print("armed" if fd is not None else "failed", flush=True)
    for line in sys.stdin:
        pfn, off = map(int, line.split())
        mem.ram_map[pfn * 4096 + off] = 0x5A
        print("ok", flush=True)
    """
)


@pytest.fixture
def guest():
    reason = memory.write_tracking_available()
    if reason is not None:
        pytest.skip(f"this kernel cannot track writes: {reason}")
    mem = GuestMemory.create(64, "test-tracker")
    mem.populate(np.arange(64, dtype=np.uint64))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(mem.ram_fd), str(mem.ctl_fd)],
        pass_fds=(mem.ram_fd, mem.ctl_fd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "armed"
    mem.track(proc.pid)

    def write(pfn, offset=0):
        proc.stdin.write(f"{pfn} {offset}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"

    yield mem, write
    proc.stdin.close()
    proc.wait(timeout=10)
    mem.close()


def test_raw_writes_are_found_without_the_guest(guest):
    mem, write = guest
    assert mem.take_changed().tolist() == []
    write(5)
    write(9, 100)
    write(9, 4000)
    assert mem.take_changed().tolist() == [5, 9]
    # Found once: the pages were protected again by the scan.
    assert mem.take_changed().tolist() == []
    # Log-dirty off: nothing is logged, though the write is a change.
    write(7)
    mem.set_log_dirty(True)
    assert mem.harvest().tolist() == []
    assert mem.take_changed().tolist() == [7]
    write(3)
    write(63, 4095)
    assert mem.harvest().tolist() == [3, 63]
    assert mem.harvest().tolist() == []
    # Each flush feeds both maps.
    assert mem.take_changed().tolist() == [3, 63]


def test_a_hole_punched_and_written_again_is_found(guest):
    mem, write = guest
    write(11)
    mem.set_log_dirty(True)
    with mem.lock():
        mem.release(11)
        mem.populate(np.array([11], dtype=np.uint64))
    mem.harvest()
    write(11)
    assert mem.harvest().tolist() == [11]


def test_a_write_outside_ram_is_found_once_its_pfn_is_ram(guest, monkeypatch):
    mem, write = guest
    # No gap bridged: the walk leaves pfn 40 out.
    monkeypatch.setattr(memory, "_SCAN_GAP", 0)
    with mem.lock():
        mem.release(40)
    # The release is a change of its own.
    assert mem.take_changed().tolist() == [40]
    assert mem.ram_spans() == [(0, 40), (41, 64)]
    write(40)
    write(41)
    # Not RAM: nothing the host reads; the write stays in its PTE.
    assert mem.take_changed().tolist() == [41]
    with mem.lock():
        mem.populate(np.array([40], dtype=np.uint64))
    assert mem.take_changed().tolist() == [40]
    assert mem.take_changed().tolist() == []


def test_the_tracker_walks_the_ram_spans_only(guest, monkeypatch):
    mem, write = guest
    walked = []
    real_walk = memory.WriteTracker._walk

    def walk(self, start, end, starts, ends):
        walked.append(((start - self.addr) >> 12, (end - self.addr) >> 12))
        return real_walk(self, start, end, starts, ends)

    monkeypatch.setattr(memory.WriteTracker, "_walk", walk)
    write(3)
    assert mem.take_changed().tolist() == [3]
    assert walked == [(0, 64)]
    with mem.lock():
        for pfn in range(20, 64):
            mem.release(pfn)
    walked.clear()
    mem.take_changed()
    assert walked == [(0, 20)]


def test_pfn_spans_bridge_small_gaps():
    pfns = np.array([0, 1, 2, 5, 6, 700, 701, 2000], dtype=np.uint64)
    assert memory.pfn_spans(pfns) == [(0, 3), (5, 7), (700, 702), (2000, 2001)]
    assert memory.pfn_spans(pfns, 2) == [(0, 7), (700, 702), (2000, 2001)]
    assert memory.pfn_spans(pfns, 1000) == [(0, 702), (2000, 2001)]
    assert memory.pfn_spans(np.zeros(0, dtype=np.uint64), 512) == []


def test_a_guest_that_could_not_arm_has_every_page_taken(guest):
    mem, _ = guest
    mem.set_log_dirty(True)
    mem.untrack()
    mem.header[memory._HDR_TRACKER] = memory.TRACKER_FAILED
    mem.track(12345)
    assert len(mem.harvest()) == 64
    # And as written since creation: the digest reads every page.
    assert mem.written_since_creation(0, mem.max_pfn)[
        mem.populated().astype(np.int64)
    ].all()


def test_what_the_guest_wrote_before_it_stopped_is_kept(guest):
    mem, write = guest
    write(21)
    with mem.lock():
        mem.flush_and_untrack()
    assert mem.take_changed().tolist() == [21]


def test_a_held_tracker_is_not_scanned_and_loses_nothing(guest, monkeypatch):
    mem, write = guest
    scans = []
    real_scan = memory.WriteTracker.scan_runs

    def scan(self, *args):
        scans.append(1)
        return real_scan(self, *args)

    monkeypatch.setattr(memory.WriteTracker, "scan_runs", scan)
    mem.set_log_dirty(True)
    write(21)
    with mem.lock():
        mem.hold_tracking()
    held_at = len(scans)
    # What was written before the hold is kept.
    assert mem.harvest().tolist() == [21]
    assert mem.take_changed().tolist() == [21]
    write(30)
    assert mem.harvest().tolist() == []
    assert len(scans) == held_at
    with mem.lock():
        mem.release_tracking()
    # The page stayed written in the page tables: the next scan has it.
    assert mem.harvest().tolist() == [30]
    assert len(scans) > held_at


def test_a_mapping_that_is_not_the_guest_ram_is_refused(guest):
    mem, write = guest
    write(1)
    addr = int(mem.header[memory._HDR_TRACKER_ADDR])
    pid = mem._tracked_pid
    mem.untrack()
    mem.header[memory._HDR_TRACKER_ADDR] = addr + memory.PAGE_SIZE
    mem.track(pid)
    with pytest.raises(base.HostError, match="is not its mapping"):
        mem.take_changed()


def test_a_process_that_has_gone_is_a_host_error():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(base.HostError, match=f"process {proc.pid}"):
        memory.WriteTracker(proc.pid, 0, memory.PAGE_SIZE)


def test_a_previous_process_armed_state_is_reset():
    mem = GuestMemory.create(16, "test-reset")
    try:
        mem.header[memory._HDR_TRACKER] = memory.TRACKER_ARMED
        mem.header[memory._HDR_TRACKER_ADDR] = 0x7F0000000000
        with mem.lock():
            mem.reset_tracking()
        assert mem.tracking == memory.TRACKER_NONE
        assert int(mem.header[memory._HDR_TRACKER_ADDR]) == 0
    finally:
        mem.close()


def test_close_waits_for_a_lock_holder_and_later_lockers_are_refused():
    """A domain's memory closed in the background while a thread of the
    host holds its lock (a dom0 handler, the digest cache): the close
    waits for it, so the holder's unlock is not a lockf on a closed
    descriptor (EBADF), and a later locker gets MemoryClosed, not a
    lockf on a descriptor number another file may have taken since."""
    import threading

    mem = GuestMemory.create(16, "test-close-race")
    entered = threading.Event()
    release = threading.Event()
    failures = []

    def hold():
        try:
            with mem.lock():
                entered.set()
                release.wait(10)
        except BaseException as exc:  # reported below
            failures.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(10)
    closer = threading.Thread(target=mem.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close did not wait for the lock holder"
    release.set()
    holder.join(10)
    closer.join(10)
    assert not closer.is_alive()
    assert failures == []
    assert mem.closed and mem.ctl_fd == -1
    with pytest.raises(memory.MemoryClosed):
        with mem.lock():
            pass
    mem.close()  # a second close does nothing


def test_free_gives_the_ram_back_before_it_closes():
    """A destroyed domain's RAM is freed (the memfd's pages punched out)
    and its memory closed; a second free does nothing."""
    mem = GuestMemory.create(1024, "test-free")
    mem.ram[:, 0] = 1
    other = os.dup(mem.ram_fd)  # keeps the file past the close
    try:
        assert os.fstat(other).st_blocks * 512 >= 1024 * memory.PAGE_SIZE
        mem.free()
        assert mem.closed and mem.ram_fd == -1
        assert os.fstat(other).st_blocks == 0
        mem.free()
    finally:
        os.close(other)


def test_free_holds_off_a_close_while_it_punches_the_ram(monkeypatch):
    """No close unmaps the RAM while a madvise of free() is on it (a new
    mapping could take those addresses), and one that came meanwhile
    ends the loop. Takes about 0.2 s (the wait for a close that must not
    come)."""
    mem = GuestMemory.create(1024, "test-free-race")
    monkeypatch.setattr(memory, "_RELEASE_CHUNK", 256 * memory.PAGE_SIZE)
    real = memory._madvise
    seen = []
    closers = []

    def madvise(addr, length, advice):
        if not closers:
            closers.append(threading.Thread(target=mem.close))
            closers[0].start()
            closers[0].join(0.2)
        seen.append(mem.closed)
        return real(addr, length, advice)

    monkeypatch.setattr(memory, "_madvise", madvise)
    mem.free()
    closers[0].join()
    assert seen and not any(seen)
    assert mem.closed


def test_a_page_written_only_through_the_raw_mapping_is_never_missed(guest):
    # written_mask lets a migration send a page as zero without reading
    # it: a bare store by the guest must make it written, or (log-dirty
    # on, not scanned yet) be in the next harvest, which resends it.
    mem, write = guest
    write(5, 17)
    assert mem.written_mask(np.array([6, 5], dtype=np.uint64)).tolist() == [
        False,
        True,
    ]
    # The scan it made leaves the write in the changed map (the digest's).
    assert mem.take_changed().tolist() == [5]
    mem.set_log_dirty(True)
    write(40, 4095)
    said = bool(mem.written_mask(np.array([40], dtype=np.uint64))[0])
    harvested = mem.harvest().tolist()
    assert harvested == [40], (said, harvested)
    assert mem.written_mask(np.array([40], dtype=np.uint64)).tolist() == [True]
    # The guest's RAM itself, read here: every page holding data is
    # said written.
    ram = np.frombuffer(mem.ram_map, dtype=np.uint8).reshape(64, -1)
    nonzero = np.flatnonzero(ram.any(axis=1))
    assert nonzero.tolist() == [5, 40]
    assert mem.written_mask(nonzero.astype(np.uint64)).all()


@pytest.fixture
def ctl_only():
    mem = GuestMemory.create(8192, "test-marks")
    with mem.lock():
        mem.populate(np.arange(8192, dtype=np.uint64))
    mem.set_log_dirty(True)
    yield mem
    mem.close()


def test_a_few_marks_are_read_without_reading_the_maps(ctl_only, monkeypatch):
    mem = ctl_only
    reads = []
    real_marked = base.marked

    def marked(mask):
        reads.append(len(mask))
        return real_marked(mask)

    monkeypatch.setattr(base, "marked", marked)
    batch = np.array([700, 5, 9], dtype=np.uint64)
    with mem.lock():
        mem.mark_dirty(batch)
        mem.mark_dirty(5)
        mem.mark_dirty(slice(30, 33))
        mem.mark_dirty(np.arange(8192) == 41)
        # The caller's buffer used again: what was marked stays.
        batch[:] = 1
        mem.release(8000)
    assert mem.harvest().tolist() == [5, 9, 30, 31, 32, 41, 700]
    assert mem.harvest().tolist() == []
    # The digest clears the changed ranges it reads itself.
    mem.changed[0:8] = 0
    assert mem.take_changed().tolist() == [9, 30, 31, 32, 41, 700, 8000]
    assert reads == []
    # Beyond the log's limit the map is read whole, and nothing is lost.
    many = np.arange(0, 8192, 2, dtype=np.uint64)
    with mem.lock():
        mem.mark_dirty(many)
    assert mem.harvest().tolist() == many.tolist()
    assert reads == [8192]
    with mem.lock():
        mem.mark_dirty(3)
    assert mem.harvest().tolist() == [3]
    assert reads == [8192]


def test_the_marks_logged_are_the_maps_bits(ctl_only):
    mem = ctl_only
    rng = np.random.default_rng(7)
    dirty: set[int] = set()
    changed: set[int] = set()
    for _ in range(60):
        n = int(rng.choice([1, 5, 40, 700]))
        pfns = rng.integers(0, 8192, n).astype(np.uint64)
        with mem.lock():
            mem.mark_dirty(pfns)
        dirty.update(pfns.tolist())
        changed.update(pfns.tolist())
        if rng.random() < 0.4:
            assert mem.harvest().tolist() == sorted(dirty)
            dirty.clear()
        if rng.random() < 0.4:
            assert mem.take_changed().tolist() == sorted(changed)
            changed.clear()
    assert mem.harvest().tolist() == sorted(dirty)
    assert mem.take_changed().tolist() == sorted(changed)


def test_a_p2m_change_racing_the_populated_read_is_not_cached(monkeypatch):
    # A thread without the memory lock (the sender's populated_pfns)
    # reads the p2m while a populate changes it: the array it made
    # must not stand for the p2m after the change, or the write
    # tracker's spans leave the new RAM out and its writes are lost to
    # the dirty and the changed maps alike.
    mem = GuestMemory.create(2048, "test-p2m-race")
    try:
        with mem.lock():
            mem.populate(np.arange(512, dtype=np.uint64))
        real_runs = memory.equal_runs
        raced = []

        def equal_runs(values, value):
            runs = real_runs(values, value)
            if not raced:
                raced.append(1)
                mem.populate(np.array([1800], dtype=np.uint64))
            return runs

        monkeypatch.setattr(memory, "equal_runs", equal_runs)
        first = mem.populated()
        assert 1800 not in first.tolist()
        assert mem.populated()[-1] == 1800
        assert mem.ram_spans()[-1] == (1800, 1801)
    finally:
        mem.close()


def test_the_mark_log_falls_back_past_its_limit_exactly(ctl_only, monkeypatch):
    mem = ctl_only
    limit = mem._dirty_log.limit
    reads = []
    real_marked = base.marked

    def marked(mask):
        reads.append(len(mask))
        return real_marked(mask)

    monkeypatch.setattr(base, "marked", marked)
    # As many marks as the limit (one pfn marked twice counts twice):
    # still logged.
    pfns = np.arange(limit - 1, dtype=np.uint64)
    with mem.lock():
        mem.mark_dirty(pfns)
        mem.mark_dirty(0)
    assert mem.harvest().tolist() == pfns.tolist()
    assert reads == []
    # One more, by a slice: the map is read whole, and the log starts
    # again after it.
    with mem.lock():
        mem.mark_dirty(pfns)
        mem.mark_dirty(slice(limit - 1, limit + 1))
    assert mem.harvest().tolist() == list(range(limit + 1))
    assert reads == [mem.max_pfn]
    # The changed map overflowed alike; a pfn the digest cleared then
    # marked again is read once.
    assert mem.take_changed().tolist() == list(range(limit + 1))
    with mem.lock():
        mem.mark_dirty(7)
        mem.changed[0:64] = 0
        mem.mark_dirty(7)
    assert mem.take_changed().tolist() == [7]
    assert mem.harvest().tolist() == [7]
    assert reads == [mem.max_pfn, mem.max_pfn]


def test_runs_a_scan_marks_reach_the_logged_reads(ctl_only):
    # A guest process's scan marks its runs a slice a run; the dirty and
    # changed maps are read from their logs once read before: the runs
    # must be in them, or the harvest at the pause misses the writes.
    mem = ctl_only
    assert mem.harvest().tolist() == []
    assert mem.take_changed().tolist() == []
    with mem.lock():
        mem._mark_runs([10, 4000], [13, 4001])
    assert mem.harvest().tolist() == [10, 11, 12, 4000]
    assert mem.take_changed().tolist() == [10, 11, 12, 4000]


def test_a_process_without_its_mappings_is_not_alive_to_the_tracker():
    # The write tracker asks _alive whether a process whose mapping it
    # did not find still runs: one that is exiting has no mappings
    # (exit_mm) well before it is a zombie, and writes no more.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; held = b'x' * (256 << 20); "
            "print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        child.stdout.readline()
        assert memory._alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        while True:
            try:
                with open(f"/proc/{child.pid}/maps", encoding="utf-8") as f:
                    maps = f.read()
            except OSError:
                break
            alive = memory._alive(child.pid)
            if not maps.strip():
                # Its maps were empty before _alive looked.
                assert not alive
            if not alive:
                break
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
