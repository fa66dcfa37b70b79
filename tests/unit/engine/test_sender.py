"""The guest stream and the sender's decisions, on empty simulated
domains (no guest process runs)."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import guest_stream
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.errors import DevicesChanged
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import RetryExhausted
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.guest_stream import GuestStream
from nova_xen_ncm.engine.journal import JournalError
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.stream import decoder
from nova_xen_ncm.stream import encoder
from nova_xen_ncm.stream import libxc

DOMID = 3
PAGE = base.PAGE_SIZE
PFNS = np.array([0, 1, 2, 3, 4], dtype=np.uint64)


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    conf.set_override("listen_address", "127.0.0.1", group="xen_ncm")
    conf.set_override("connect_retry_attempts", 1, group="xen_ncm")
    conf.set_override("io_timeout", 10.0, group="xen_ncm")
    conf.set_override("accept_timeout", 10.0, group="xen_ncm")
    return conf


@pytest.fixture
def host(conf):
    h = SimHost("unit", conf)
    h.create_empty_domain(
        base.DomainConfig(
            name="s", memory_bytes=4 << 20, vcpus=1, pv_drivers=False
        ),
        DOMID,
    )
    h.populate(DOMID, PFNS)
    with h.map_pages(DOMID, PFNS[1:], writable=True) as mapping:
        for i, page in enumerate(mapping.pages):
            page[:] = bytes([i + 1]) * PAGE
    yield h
    h.close()
    h.raise_dom0_errors()


def write_page(host, pfn, fill):
    pfns = np.array([pfn], dtype=np.uint64)
    with host.map_pages(DOMID, pfns, writable=True) as mapping:
        mapping.pages[0][:] = bytes([fill]) * PAGE


def decode_batch(stream, batch):
    out = encoder.join(stream.start() + batch.buffers)
    records = decoder.Decoder("libxl")
    records.feed(out)
    (pages,) = [r.value for r in records.records() if r.name == "PAGE_DATA"]
    return pages


def test_batches_split_and_zero_pages_are_xalloc(host):
    stream = GuestStream(host, DOMID, batch_pages=2)
    batches = []
    for batch in stream.pages(PFNS, copy=True):
        batches.append(
            (batch.pages, batch.zero_pages, decode_batch(stream, batch))
        )
    assert [(n, z) for n, z, _ in batches] == [(2, 1), (2, 0), (1, 0)]
    first = batches[0][2]
    assert first.types.tolist() == [libxc.XALLOC, libxc.NOTAB]
    assert bytes(first.data) == b"\x01" * PAGE


def test_without_copy_the_buffers_are_guest_memory(host):
    stream = GuestStream(host, DOMID)
    for batch in stream.pages(PFNS[1:2]):
        write_page(host, 1, 0x77)
        assert encoder.join(batch.buffers).endswith(b"\x77" * PAGE)


def test_copied_pages_do_not_change_under_the_sender(host):
    # A running guest may write a page between the frame's authentication
    # tag and the write to the socket: live migration sends copies.
    stream = GuestStream(host, DOMID)
    for batch in stream.pages(PFNS[1:2], copy=True):
        write_page(host, 1, 0x77)
        assert encoder.join(batch.buffers).endswith(b"\x01" * PAGE)


def test_xen_compatible_stream_cannot_carry_pv_state(host):
    stream = GuestStream(host, DOMID, xen_compatible=True)
    with pytest.raises(EngineError, match="PV state"):
        stream.finish(object())


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_sender(conf, host, **kwargs):
    return Sender(
        host,
        DOMID,
        ("127.0.0.1", 9),
        "m-1",
        handshake.generate_token(),
        conf=conf,
        **kwargs,
    )


def test_force_complete_decides_stop_and_copy(conf, host):
    sender = make_sender(
        conf, host, policy=lambda s: policy.Decision(policy.Action.CONTINUE)
    )
    assert sender._decide().action is policy.Action.CONTINUE
    assert sender.force_complete() is True
    decision = sender._decide()
    assert decision.action is policy.Action.STOP_AND_COPY
    assert decision.reason == "force-complete"


def test_completion_timeout_aborts(conf, host):
    conf.set_override("completion_timeout_per_gib", 10, group="xen_ncm")
    clock = FakeClock()
    sender = make_sender(
        conf,
        host,
        clock=clock,
        policy=lambda s: policy.Decision(policy.Action.CONTINUE),
    )
    assert sender._decide().action is policy.Action.CONTINUE
    clock.now += 21.0  # 2 GiB counted at least: 20 s
    decision = sender._decide()
    assert decision.action is policy.Action.ABORT
    assert "timeout" in decision.reason


def test_cancel_and_force_complete_are_refused_after_commit(conf, host):
    sender = make_sender(conf, host)
    for old, new in [
        (Phase.SETUP, Phase.PRECOPY),
        (Phase.PRECOPY, Phase.STOP_AND_COPY),
        (Phase.STOP_AND_COPY, Phase.RESTORE),
        (Phase.RESTORE, Phase.COMMIT),
    ]:
        sender.state.transition(old, new)
    assert sender.cancel() is False
    assert sender.force_complete() is False


@pytest.mark.parametrize(
    ("capabilities", "running", "pv_drivers", "copied"),
    [
        ((), True, False, True),
        ((), False, True, True),
        ((), False, False, False),
        ((messages.Capability.TLS_FRAMES.value,), True, True, False),
        (
            (messages.Capability.UNAUTHENTICATED_FRAMES.value,),
            True,
            True,
            False,
        ),
    ],
)
def test_pages_are_copied_only_under_a_frame_tag(
    conf, host, capabilities, running, pv_drivers, copied
):
    # The snapshot keeps a tag true to the octets written; untagged
    # frames (TLS records seal what the write reads) go from the
    # guest's pages themselves.
    sender = make_sender(conf, host)
    sender._running = running
    sender.info = dataclasses.replace(sender.info, pv_drivers=pv_drivers)
    connection = framing.Connection(messages.Role.CLIENT)
    connection.capabilities = frozenset(capabilities)
    sender.data.channels[0] = types.SimpleNamespace(connection=connection)
    assert sender._copy_pages(0) is copied


def test_the_copy_is_decided_by_each_channels_own_frames(conf, host):
    # A channel whose frames carry a tag gets the snapshot whatever the
    # others negotiated; one not connected is taken as tagged.
    sender = make_sender(conf, host)
    sender._running = True
    tls = framing.Connection(messages.Role.CLIENT)
    tls.capabilities = frozenset({messages.Capability.TLS_FRAMES.value})
    sender.data.channels[:] = [
        types.SimpleNamespace(connection=tls),
        types.SimpleNamespace(
            connection=framing.Connection(messages.Role.CLIENT)
        ),
        None,
    ]
    assert [sender._copy_pages(i) for i in range(3)] == [False, True, True]


def test_paused_guest_is_not_unpaused_by_rollback(conf, host):
    # A paused guest may migrate; nothing listens at the endpoint, so the
    # migration fails in SETUP and the guest is left as it was.
    sender = make_sender(conf, host)
    assert sender.run() is Phase.FAILED
    assert "connect to" in str(sender.error)
    assert [p for p, _ in sender.state.history()] == [
        Phase.SETUP,
        Phase.ROLLBACK,
        Phase.FAILED,
    ]
    assert host.domain_info(DOMID).state == base.DomainState.PAUSED


def test_an_unwritable_runtime_path_is_refused_before_the_migration(
    conf, host, monkeypatch, tmp_path
):
    # Without a mark COMMIT would not go: refused before anything runs,
    # not in the pause, with the guest running here.
    (tmp_path / "file").write_text("not a directory")
    conf.set_override(
        "runtime_path", str(tmp_path / "file" / "run"), group="xen_ncm"
    )
    conf.set_override("state_path", str(tmp_path / "state"), group="xen_ncm")
    # The empty simulated domain cannot run: it says it does.
    running = dataclasses.replace(
        host.domain_info(DOMID), state=base.DomainState.RUNNING
    )
    monkeypatch.setattr(host, "domain_info", lambda domid: running)
    paused = []
    for name in ("pause", "pause_for_save"):
        monkeypatch.setattr(host, name, lambda *a, n=name: paused.append(n))
    with pytest.raises(JournalError) as caught:
        make_sender(conf, host)
    assert "[xen_ncm] runtime_path" in str(caught.value)
    assert "Not a directory" in str(caught.value)
    assert paused == []
    assert os.listdir(tmp_path / "state" / "migrations") == []


def test_crashed_guest_is_refused_before_connecting(conf, host, monkeypatch):
    info = host.domain_info(DOMID)
    crashed = dataclasses.replace(info, state=base.DomainState.CRASHED)
    monkeypatch.setattr(host, "domain_info", lambda domid: crashed)
    sender = make_sender(conf, host)
    assert sender.run() is Phase.FAILED
    assert "crashed" in str(sender.error)
    assert "connect to" not in str(sender.error)


class Recorder:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


class CountingChannel:
    """Stands for the connection: counts what would be written; each
    frame takes 3 s of ``clock``."""

    def __init__(self, clock):
        self.clock = clock
        self.connection = framing.Connection(messages.Role.CLIENT)

    def send_data(self, seq, buffers, compress=False, pages=False):
        assert pages
        assert seq == self.connection.last_seq + 1
        self.connection.last_seq = seq
        self.clock.now += 3.0
        return encoder.buffers_size(buffers)


def test_progress_is_reported_while_a_round_runs(conf, host):
    conf.set_override("progress_interval", 5.0, group="xen_ncm")
    sink = Recorder()
    clock = FakeClock()
    sender = make_sender(conf, host, clock=clock, sinks=[sink])
    sender.stream.batch_pages = 1
    sender.data.channels[0] = CountingChannel(clock)
    pages, zero, nbytes = sender._send_pages(PFNS)
    assert (pages, zero) == (5, 1)
    progress = [e for e in sink.events if e.kind.value == "progress"]
    # Every other frame crosses the 5 s interval.
    assert len(progress) == 2
    assert progress[0].memory_total == 4 << 20
    assert progress[0].memory_processed == 2 * PAGE
    assert progress[-1].memory_remaining == 1 * PAGE


def test_pages_never_written_go_as_zero_without_being_read(host, monkeypatch):
    # pfn 0 was populated and never written; pfn 5 is written with
    # zeros (it must still be read to be found zero).
    host.populate(DOMID, np.array([5, 6], dtype=np.uint64))
    write_page(host, 5, 0)
    mapped = []
    real_map = host.map_pages

    def map_pages(domid, pfns, writable=False):
        mapped.append(np.asarray(pfns).tolist())
        return real_map(domid, pfns, writable)

    monkeypatch.setattr(host, "map_pages", map_pages)
    stream = GuestStream(host, DOMID, batch_pages=8)
    pfns = np.array([0, 1, 5, 6, 2], dtype=np.uint64)
    (batch,) = list(stream.pages(pfns))
    pages = decode_batch(stream, batch)
    assert mapped == [[1, 5, 2]]
    assert pages.pfns.tolist() == [0, 1, 5, 6, 2]
    assert pages.types.tolist() == [
        libxc.XALLOC,
        libxc.NOTAB,
        libxc.XALLOC,
        libxc.XALLOC,
        libxc.NOTAB,
    ]
    assert bytes(pages.data) == b"\x01" * PAGE + b"\x02" * PAGE
    assert batch.zero_pages == 3
    # A batch of pages never written maps nothing at all.
    mapped.clear()
    (batch,) = list(stream.pages(np.array([0, 6], dtype=np.uint64)))
    assert mapped == []
    assert decode_batch(stream, batch).types.tolist() == [libxc.XALLOC] * 2


def test_long_stretches_never_written_go_in_large_batches(host, monkeypatch):
    monkeypatch.setattr(guest_stream, "ZERO_BATCH_PAGES", 16)
    host.populate(DOMID, np.arange(10, 101, dtype=np.uint64))
    write_page(host, 50, 7)
    mapped = []
    real_map = host.map_pages

    def map_pages(domid, pfns, writable=False):
        mapped.append(np.asarray(pfns).tolist())
        return real_map(domid, pfns, writable)

    monkeypatch.setattr(host, "map_pages", map_pages)
    stream = GuestStream(host, DOMID, batch_pages=4)
    pfns = np.concatenate((PFNS, np.arange(10, 101, dtype=np.uint64)))
    cut = stream.cut(pfns)
    # pfn 0 alone never written: in a batch of batch_pages; 10-49 and
    # 51-100 in batches of up to 16, the 2 left over in a plain one.
    assert [(int(b[0]), len(b)) for b in cut] == [
        (0, 4),
        (4, 1),
        (10, 16),
        (26, 16),
        (42, 8),
        (50, 1),
        (51, 16),
        (67, 16),
        (83, 16),
        (99, 2),
    ]
    np.testing.assert_array_equal(np.concatenate(cut), pfns)
    decoded = [decode_batch(stream, b) for b in stream.batches(cut)]
    # The large batches are neither asked about again nor mapped.
    assert mapped == [[1, 2, 3], [4], [50]]
    types = np.concatenate([d.types for d in decoded])
    want = np.full(len(pfns), libxc.XALLOC)
    want[[1, 2, 3, 4, 5 + 40]] = libxc.NOTAB
    np.testing.assert_array_equal(types, want)
    assert b"".join(bytes(d.data) for d in decoded) == b"".join(
        bytes([f]) * PAGE for f in (1, 2, 3, 4, 7)
    )
    # Only the batches cut as never written are sent unasked: a long
    # batch cut otherwise is looked at as any other.
    (whole,) = stream.batches([pfns[:5]])
    assert (
        decode_batch(stream, whole).types.tolist()
        == [libxc.XALLOC] + [libxc.NOTAB] * 4
    )
    # A Xen-compatible stream keeps Xen's batch size.
    xen = GuestStream(host, DOMID, batch_pages=4, xen_compatible=True)
    assert max(len(b) for b in xen.cut(pfns)) == 4


@pytest.mark.parametrize("chunk", [8, 16, 1 << 18])
def test_a_guests_runs_are_cut_as_its_pfns_a_chunk_at_a_time(
    host, monkeypatch, chunk
):
    # Chunks that are multiples of both batch sizes: the batches are
    # those of the pfns, held as runs until they are sent.
    monkeypatch.setattr(guest_stream, "ZERO_BATCH_PAGES", 8)
    monkeypatch.setattr(guest_stream, "CUT_CHUNK_PAGES", chunk)
    host.populate(DOMID, np.arange(10, 101, dtype=np.uint64))
    write_page(host, 50, 7)
    pfns = np.concatenate((PFNS, np.arange(10, 101, dtype=np.uint64)))
    for xen_compatible in (False, True):
        stream = GuestStream(
            host, DOMID, batch_pages=4, xen_compatible=xen_compatible
        )
        cut = stream.cut(base.PfnRuns.of(pfns))
        assert all(isinstance(b, guest_stream.RunBatch) for b in cut)
        np.testing.assert_array_equal(
            np.concatenate([b.pfns() for b in cut]), pfns
        )
        if chunk > len(pfns):
            # One chunk: the very batches of the pfns.
            expected = stream.cut(pfns)
            assert [len(b) for b in cut] == [len(b) for b in expected]
            assert [b.never_written for b in cut] == [
                isinstance(b, guest_stream.NeverWritten) for b in expected
            ]
        sent = [decode_batch(stream, b) for b in stream.batches(cut)]
        np.testing.assert_array_equal(
            np.concatenate([d.pfns for d in sent]), pfns
        )
        types = np.concatenate([d.types for d in sent])
        assert (types == libxc.NOTAB).sum() == 5


def test_cutting_a_large_guests_runs_holds_no_list_of_its_pfns(host):
    import tracemalloc

    pages = 1 << 21  # 8 GiB, three runs
    runs = base.PfnRuns(
        np.array([0, 1 << 20, (1 << 20) + 4096], dtype=np.int64),
        np.array([(1 << 20) - 256, (1 << 20) + 1024, pages], dtype=np.int64),
    )
    host.written_pages = lambda domid, pfns: np.zeros(len(pfns), dtype=bool)
    stream = GuestStream(host, DOMID)
    tracemalloc.start()
    try:
        cut = stream.cut(runs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(len(b) for b in cut) == len(runs)
    # A chunk of pfns and its masks (12 octets a pfn of a chunk) and a
    # few hundred octets a batch: the pfns would be 16 MiB.
    chunk = guest_stream.CUT_CHUNK_PAGES
    assert peak <= 12 * chunk + 400 * len(cut) + (64 << 10)


def test_a_full_record_of_pages_never_written_is_no_larger_than_one_with_data(
    host,
):
    """A destination whose max_frame_bytes takes a batch of BATCH_PAGES
    pages with data (earlier releases' too: the codec and the check are
    theirs) takes a record of ZERO_BATCH_PAGES pages never written."""
    stream = GuestStream(host, DOMID)
    pfns = np.arange(guest_stream.ZERO_BATCH_PAGES, dtype=np.uint64)
    (batch,) = stream.batches([pfns.view(guest_stream.NeverWritten)])
    full = guest_stream.BATCH_PAGES * (8 + PAGE) + libxc.PAGE_DATA_HDR.size
    assert batch.nbytes <= full <= framing.DEFAULT_MAX_DATA
    pages = decode_batch(stream, batch)
    np.testing.assert_array_equal(pages.pfns, pfns)
    assert set(pages.types.tolist()) == {libxc.XALLOC}
    assert not len(pages.data)


def test_a_host_that_cannot_tell_says_every_page_may_hold_data(host):
    pfns = np.array([0, 1], dtype=np.uint64)
    assert base.HostDriver.written_pages(host, DOMID, pfns).tolist() == [
        True,
        True,
    ]
    assert host.written_pages(DOMID, pfns).tolist() == [False, True]


def test_dirty_pages_are_looked_up_in_the_populated_ones():
    populated = np.array([2, 5, 9, 40], dtype=np.uint64)
    dirty = np.array([41, 9, 2, 3, 9, 0], dtype=np.uint64)
    runs = base.PfnRuns.of(populated)
    assert runs.members(dirty).tolist() == [2, 9]
    assert base.PfnRuns.of(populated[:0]).members(dirty).tolist() == []
    assert runs.members(dirty[:0]).tolist() == []


def test_a_round_looks_its_harvest_up_without_a_bitmap_of_the_guest():
    # A process of its own: no scratch bitmaps of an earlier call, and
    # no other thread's allocations in the peak traced.
    code = textwrap.dedent(
        """
        import tracemalloc
        import numpy as np
        from nova_xen_ncm.host import base
        # 1 GiB populated, with a hole; a harvest of 4096 pages.
        populated = np.concatenate(
            (np.arange(1 << 17), np.arange((1 << 17) + 64, (1 << 18) + 64))
        ).astype(np.uint64)
        rng = np.random.default_rng(7)
        harvest = np.unique(
            rng.integers(0, (1 << 18) + 128, 5000, dtype=np.uint64)
        )[:4096]
        expected = np.intersect1d(harvest, populated)
        runs = base.PfnRuns.of(populated)
        tracemalloc.start()
        out = runs.members(harvest)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(out, expected)
        print(peak)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The harvest's pfns, their positions and slack: nothing an octet
    # a pfn of the guest (256 KiB here).
    assert int(done.stdout) <= 4096 * 8 * 3 + (64 << 10)


def _pfn_sets(seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted distinct populated pfns with holes, and sorted distinct
    harvests on both sides of the search's threshold, empty, all of
    them, and of pfns in the holes and above the top."""
    rng = np.random.default_rng(seed)
    top = int(rng.integers(1, 1 << 16))
    populated = np.flatnonzero(rng.random(top) < rng.random()).astype(
        np.uint64
    )
    harvests = [np.zeros(0, dtype=np.uint64), populated.copy()]
    share = len(populated) // 16
    for count in (1, share - 1, share, share + 1, 4 * share, top):
        picked = rng.integers(0, top + 64, max(count, 0), dtype=np.uint64)
        harvests.append(np.unique(picked))
    holes = np.setdiff1d(np.arange(top + 64, dtype=np.uint64), populated)
    harvests.append(holes[: max(share, 1)])
    return populated, harvests


@pytest.mark.parametrize("seed", range(12))
def test_a_rounds_lookup_agrees_with_numpy_on_either_side(seed):
    populated, harvests = _pfn_sets(seed)
    runs = base.PfnRuns.of(populated)
    signed = base.PfnRuns.of(populated.astype(np.int64))
    for harvest in harvests:
        expected = np.intersect1d(harvest, populated)
        out = runs.members(harvest)
        assert out.dtype == np.uint64
        np.testing.assert_array_equal(out, expected)
        # A host's populated pfns as another integer type: the same.
        np.testing.assert_array_equal(signed.members(harvest), expected)
    assert len(runs.members(harvests[-1])) == 0
    assert len(base.PfnRuns.of(populated[:0]).members(harvests[2])) == 0


class _DroppedControl:
    """A control channel that negotiated stop-notice and then drops."""

    connection = types.SimpleNamespace(
        capabilities=frozenset({messages.Capability.STOP_NOTICE.value})
    )

    def send(self, message):
        raise TransportError("connection reset")


def test_stopping_retries_end_when_the_destination_stops_waiting(
    conf, host, monkeypatch
):
    """A STOPPING lost with its connection is retried no longer than the
    destination, which may have it, waits for the source: one figure
    (retry.resume_wait), not the precopy round's transfer budget."""
    conf.set_override("downtime_budget", 2.0, group="xen_ncm")
    conf.set_override("transfer_retry_timeout", 120.0, group="xen_ncm")
    conf.set_override("transfer_retry_attempts", 100, group="xen_ncm")
    conf.set_override("retry_initial_delay", 0.1, group="xen_ncm")
    conf.set_override("retry_max_delay", 0.5, group="xen_ncm")
    sender = make_sender(conf, host)
    reconnects = []

    def reconnect():
        reconnects.append(fake.now)
        raise TransportError("refused")

    sender.data = types.SimpleNamespace(
        control=_DroppedControl(),
        close=lambda index=None: None,
        reconnect=reconnect,
    )
    fake = FakeClock()

    def sleep(seconds):
        fake.now += seconds

    monkeypatch.setattr(
        retry, "call", functools.partial(retry.call, clock=fake, sleep=sleep)
    )
    start = fake.now
    with pytest.raises(RetryExhausted):
        sender._notify_stopping()
    wait = retry.resume_wait(conf.xen_ncm, stopping=True)
    assert wait == 2.0
    assert len(reconnects) > 1
    assert reconnects[-1] - start <= wait


def test_the_check_before_the_pause_asks_the_hosts_cheap_check(
    conf, host, monkeypatch
):
    """Right before the pause the sender asks check_devices, not
    guest_devices (on the Xen host an ``xl list -l`` whose time dirties
    pages for the downtime); its refusal is DevicesChanged."""
    sender = make_sender(conf, host)
    sender.info = dataclasses.replace(sender.info, pv_drivers=True)

    def full(domid):
        raise AssertionError("guest_devices asked before the pause")

    def refuse(domid):
        raise base.NotSupported("vif 0: its frontend uses 2 queues")

    monkeypatch.setattr(host, "guest_devices", full)
    monkeypatch.setattr(host, "check_devices", refuse)
    with pytest.raises(DevicesChanged, match="vif 0.*2 queues.*runs on"):
        sender._check_devices()


def test_the_pfns_populated_since_round_0_are_found_once_per_p2m(
    conf, host, monkeypatch
):
    from nova_xen_ncm.engine import sender as sending

    sender = make_sender(conf, host)
    compared = []
    real_difference = sending.base.PfnRuns.difference

    def difference(self, other):
        compared.append(len(self))
        return real_difference(self, other)

    monkeypatch.setattr(sending.base.PfnRuns, "difference", difference)

    def runs(*pfns):
        return base.PfnRuns.of(np.array(pfns, dtype=np.uint64))

    round_0 = runs(1, 2, 3)
    sender._sent_populated = round_0
    assert sender._added_since_round_0(round_0).tolist() == []
    grown = runs(1, 2, 3, 7)
    assert sender._added_since_round_0(grown).tolist() == [7]
    # The same runs again (the pause, the p2m unchanged since the last
    # round): nothing is compared.
    assert sender._added_since_round_0(grown).tolist() == [7]
    assert compared == [4]
    # The p2m changed since: compared again, against round 0's.
    shrunk = runs(2, 3, 9)
    assert sender._added_since_round_0(shrunk).tolist() == [9]
    assert compared == [4, 3]
