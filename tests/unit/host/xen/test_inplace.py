"""In-place restore when Xen fails after the old domain was destroyed.

``FakeXen`` keeps domains as the hypervisor would: a domid, a state and
its pages. The guest's image is judged by what the new domain holds, not
by the snapshot object the restore was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.xen import devices as devices_mod
from nova_xen_ncm.host.xen import inplace

DOMID = 5
PFNS = np.array([0, 1, 2, 7], dtype=np.uint64)


class _Mapping:
    def __init__(self, pages: list[bytearray]) -> None:
        self.pages = [memoryview(p) for p in pages]


class FakeXen:
    """The host calls inplace makes, over a table of domains."""

    def __init__(self, fail_set_context: int = 0) -> None:
        self.domains: dict[int, dict] = {}
        self.fail_set_context = fail_set_context
        self.fail_destroy = False
        self.created: list[int] = []
        self.destroyed: list[int] = []
        self.params: dict[int, dict[int, int]] = {}
        self.reuses_domids = True
        self.export_fails = False
        self.frozen: set[int] = set()
        self.check_fails = False
        self.checked: list[tuple[int, base.DomainState]] = []
        # The live guest: a write it makes between two host calls.
        self.guest_writes: list[tuple[int, bytes]] = []
        self.log_dirty: set[int] | None = None
        self.paused_for_save: list[int] = []
        self.opts = types.SimpleNamespace(
            backend_connect_timeout=120.0, backend_gone_timeout=60.0
        )

    def domain_info(self, domid: int) -> base.DomainInfo:
        if domid not in self.domains:
            raise base.DomainNotFound(f"no domain {domid}", call="info")
        d = self.domains[domid]
        return base.DomainInfo(
            domid=domid, name="guest", uuid="u", state=d["state"],
            memory_bytes=len(d["pages"]) * PAGE_SIZE, vcpus=2,
            populated_pages=len(d["pages"]), pv_drivers=True,
        )  # fmt: skip

    def _backends(self, domid: int) -> list[str]:
        return [f"/local/domain/0/backend/console/{domid}/0"]

    def libxl_config(self, domid: int) -> dict:
        return {"c_info": {"name": "guest"}}

    def pause(self, domid: int) -> None:
        self.domain_info(domid)
        self.domains[domid]["state"] = base.DomainState.PAUSED

    def pause_for_save(self, domid: int) -> None:
        self.pause(domid)
        self.paused_for_save.append(domid)

    def destroy_domain(self, domid: int) -> None:
        self.domain_info(domid)
        if self.fail_destroy:
            raise base.HostError("xl destroy failed", call="xl destroy")
        del self.domains[domid]
        self.destroyed.append(domid)

    def _best_effort_destroy(self, domid: int) -> None:
        if self.domains.pop(domid, None) is not None:
            self.destroyed.append(domid)

    def _libxl_create(self, config_json: str, call: str) -> int:
        domid = json.loads(config_json)["c_info"]["domid"]
        assert domid not in self.domains
        # libxl's build: pages where the guest had none, none where it had.
        self.domains[domid] = {
            "state": base.DomainState.PAUSED,
            "pages": {0: bytearray(PAGE_SIZE), 1: bytearray(PAGE_SIZE)},
        }
        self.created.append(domid)
        return domid

    def populated_pfns(self, domid: int) -> np.ndarray:
        return np.array(sorted(self.domains[domid]["pages"]), dtype=np.uint64)

    def populate(self, domid: int, pfns: np.ndarray) -> None:
        for pfn in pfns.tolist():
            self.domains[domid]["pages"][pfn] = bytearray(PAGE_SIZE)

    @contextlib.contextmanager
    def _map(self, domid, pfns, writable=False):
        pages = self.domains[domid]["pages"]
        yield _Mapping([pages[p] for p in pfns.tolist()])

    def map_pages(self, domid, pfns, writable=False):
        return self._map(domid, pfns, writable)

    def set_tsc_info(self, domid: int, tsc: base.TscInfo) -> None:
        self.domains[domid]["tsc"] = tsc

    def set_hvm_params(self, domid: int, params: dict[int, int]) -> None:
        self.domains[domid]["params"] = dict(params)

    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        if self.fail_set_context:
            self.fail_set_context -= 1
            raise base.HostError("refused", call="xc_domain_hvm_setcontext")
        self.domains[domid]["context"] = bytes(blob)

    def unpause(self, domid: int) -> None:
        self.domain_info(domid)
        # As Xen: a domain that shut down stays so, paused or not.
        if self.domains[domid]["state"] not in (
            base.DomainState.SHUTDOWN,
            base.DomainState.CRASHED,
            base.DomainState.DYING,
        ):
            self.domains[domid]["state"] = base.DomainState.RUNNING

    def check_pv_exportable(self, domid: int) -> None:
        self.domain_info(domid)
        self.checked.append((domid, self.domains[domid]["state"]))
        if self.check_fails:
            raise base.NotSupported("FIFO event channels", call="check")

    def export_pv_state(self, domid: int) -> base.PvState:
        self.domain_info(domid)
        # The patched xenstored's export leaves the connection frozen,
        # also when a later part of the export fails.
        self.frozen.add(domid)
        if self.export_fails:
            raise base.NotSupported("a 32-bit guest", call="export")
        return _pv_state()

    def thaw_xenstore(self, domid: int) -> None:
        self.frozen.discard(domid)

    def import_pv_state(self, domid: int, state: base.PvState) -> None:
        self.domains[domid]["pv"] = state

    # Log-dirty: the guest runs between the host's calls.
    def _run_guest(self, domid: int) -> None:
        if self.guest_writes and self.domains[domid]["state"] == (
            base.DomainState.RUNNING
        ):
            pfn, data = self.guest_writes.pop(0)
            self.domains[domid]["pages"][pfn][:] = data
            if self.log_dirty is not None:
                self.log_dirty.add(pfn)

    def enable_log_dirty(self, domid: int) -> None:
        self.log_dirty = set()

    def harvest_dirty(self, domid: int) -> np.ndarray:
        self._run_guest(domid)
        dirty, self.log_dirty = self.log_dirty, set()
        return np.array(sorted(dirty), dtype=np.uint64)

    def disable_log_dirty(self, domid: int) -> None:
        self.log_dirty = None

    def get_hvm_context(self, domid: int) -> bytes:
        return b"\x01context"

    def get_hvm_params(self, domid: int) -> dict[int, int]:
        return {12: 0xFEFFF, 2: 3}

    def get_tsc_info(self, domid: int) -> base.TscInfo:
        return base.TscInfo(mode=0, khz=2000000, nsec=5, incarnation=3)


def _pv_state() -> base.PvState:
    return base.PvState(
        domid=DOMID,
        backend_domids=(),
        event_channels=base.EventChannelState(
            base.EvtchnAbi.TWO_LEVEL,
            (
                base.EventChannel(1, base.EvtchnType.UNBOUND, pending=True),
                base.EventChannel(5, base.EvtchnType.VIRQ, vcpu=1),
                base.EventChannel(6, base.EvtchnType.IPI, vcpu=1, masked=True),
            ),
        ),
        grant_table=base.GrantTableState(
            1, (0xF000,), (bytes(range(256)) * 16,)
        ),
        shared_info=base.SharedInfoState(
            0xFEFFE,
            bytes(4095) + b"\x01",
            (
                base.VcpuInfoPlacement(0, 0x1234, 64),
                base.VcpuInfoPlacement(1, 0x1234, 128),
            ),
        ),
        xenstore=base.XenstoreState(
            nodes=(
                base.XenstoreNode(f"/local/domain/{DOMID}", b"", (("n", 0),)),
                base.XenstoreNode(
                    f"/local/domain/{DOMID}/data/x", b"1", (("b", DOMID),)
                ),
            ),
            watches=(base.XenstoreWatch("data/x", "tok"),),
            # The patched xenstored's connection: carried in the image.
            transactions=(base.XenstoreTransaction(4, 0),),
            store_port=1,
            store_gfn=0xFEFFC,
            pending_output=b"K\0" + bytes(16),
            pending_resp_len=2,
            pending_input=b"\x02\0",
        ),
        backends=(),
        vcpus=(
            base.VcpuPvState(0, 0xF3, singleshot_ns=123),
            base.VcpuPvState(1, 0xF3, runstate_va=0xFFFF888000001000),
        ),
        vm_assist=1 << 5,
    )


def _guest_pages() -> bytearray:
    rng = np.random.default_rng(7)
    return bytearray(rng.bytes(len(PFNS) * PAGE_SIZE))


def _snapshot() -> inplace.Snapshot:
    return inplace.Snapshot(
        domid=DOMID,
        libxl_config={"c_info": {"name": "guest"}},
        pfns=PFNS.copy(),
        memory=_guest_pages(),
        hvm_context=b"\x01context",
        hvm_params={12: 0xFEFFF, 2: 3},
        tsc=base.TscInfo(mode=0, khz=2000000, nsec=5, incarnation=3),
        pv=_pv_state(),
    )


@pytest.fixture
def xen(monkeypatch) -> FakeXen:
    monkeypatch.setattr(inplace.time, "sleep", lambda s: None)
    xen = FakeXen()
    xen.domains[DOMID] = {
        "state": base.DomainState.PAUSED,
        "pages": {int(p): bytearray(PAGE_SIZE) for p in PFNS},
    }
    return xen


def _assert_guest_back(xen: FakeXen) -> None:
    dom = xen.domains[DOMID]
    assert dom["state"] == base.DomainState.RUNNING
    assert sorted(dom["pages"]) == PFNS.tolist()
    held = b"".join(bytes(dom["pages"][p]) for p in PFNS.tolist())
    assert held == bytes(_guest_pages())
    assert dom["context"] == b"\x01context"
    assert dom["tsc"].incarnation == 3
    # The PV state went back through the host's import, as exported.
    assert dom["pv"] == _pv_state()
    assert len([d for d in xen.domains if d == DOMID]) == 1


def test_failure_after_destroy_is_retried_from_the_image(
    xen: FakeXen, tmp_path: Path
) -> None:
    xen.fail_set_context = 1
    inplace.restore(xen, _snapshot(), image_dir=tmp_path)
    # The old domain, then the half-built one; the second creation runs.
    assert xen.destroyed == [DOMID, DOMID]
    assert xen.created == [DOMID, DOMID]
    _assert_guest_back(xen)
    assert list(tmp_path.iterdir()) == []


def test_every_attempt_failing_keeps_the_image_for_restore_image(
    xen: FakeXen, tmp_path: Path
) -> None:
    xen.fail_set_context = 3
    with pytest.raises(inplace.InPlaceError) as err:
        inplace.restore(xen, _snapshot(), image_dir=tmp_path, attempts=3)
    image = inplace.image_path(DOMID, tmp_path)
    assert str(image) in str(err.value) and "3 attempts" in str(err.value)
    assert DOMID not in xen.domains and xen.created == [DOMID] * 3
    # The guest comes back from its image alone (a new process would
    # have nothing else).
    inplace.restore_image(xen, image)
    _assert_guest_back(xen)
    assert not image.exists()


def test_restore_image_refuses_a_domain_that_still_exists(
    xen: FakeXen, tmp_path: Path
) -> None:
    image = inplace.image_path(DOMID, tmp_path)
    inplace.write_image(_snapshot(), image)
    with pytest.raises(inplace.InPlaceError, match="exists"):
        inplace.restore_image(xen, image)
    assert xen.destroyed == [] and image.exists()


def test_image_not_written_leaves_the_domain_running(
    xen: FakeXen, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    xen.frozen.add(DOMID)  # as the save's export left it
    with pytest.raises(inplace.InPlaceError, match="left in place"):
        inplace.restore(xen, _snapshot(), image_dir=blocked / "sub")
    assert xen.destroyed == [] and xen.created == []
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING
    # Its xenstore ring is served again.
    assert xen.frozen == set()


@pytest.mark.parametrize("unpause", [True, False])
def test_a_medium_missing_leaves_the_guest_in_place(
    xen: FakeXen, tmp_path: Path, unpause: bool
) -> None:
    # The vbd's new backend could not open its medium: nothing is undone.
    snap = dataclasses.replace(
        _snapshot(),
        devices=(
            devices_mod.Device(
                "vbd", 51712, 0, "f", "b", str(tmp_path / "gone.img")
            ),
        ),
    )
    xen.frozen.add(DOMID)
    with pytest.raises(inplace.InPlaceError, match="left running in place"):
        inplace.restore(xen, snap, image_dir=tmp_path, unpause=unpause)
    assert xen.destroyed == [] and xen.created == []
    assert list(tmp_path.iterdir()) == []
    assert xen.domains[DOMID]["state"] == (
        base.DomainState.RUNNING if unpause else base.DomainState.PAUSED
    )
    # Served again even when left paused: no later unpause would thaw it.
    assert xen.frozen == set()


def test_image_round_trip(tmp_path: Path) -> None:
    snap = dataclasses.replace(
        _snapshot(),
        devices=(devices_mod.Device("vif", 0, 0, "f", "b", "br0"),),
    )
    path = tmp_path / "img.npz"
    inplace.write_image(snap, path)
    back = inplace.read_image(path)
    assert back.pfns.tolist() == snap.pfns.tolist()
    assert back.memory == snap.memory
    fields = ("domid", "libxl_config", "hvm_context", "hvm_params", "tsc",
              "pv", "devices")  # fmt: skip
    for field in fields:
        assert getattr(back, field) == getattr(snap, field), field
    assert not (tmp_path / "img.npz.tmp").exists()
    assert path.stat().st_mode & 0o077 == 0


def test_bad_attempts_refused_before_anything(xen: FakeXen) -> None:
    with pytest.raises(ValueError, match="attempts"):
        inplace.restore(xen, _snapshot(), attempts=0)
    assert xen.destroyed == []


def test_save_refused_after_the_pause_unpauses_the_guest(
    xen: FakeXen,
) -> None:
    xen.domains[DOMID]["state"] = base.DomainState.RUNNING
    xen.export_fails = True
    with pytest.raises(base.NotSupported, match="32-bit"):
        inplace.save(xen, DOMID)
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING
    # And its xenstore ring is served again.
    assert xen.frozen == set()


@pytest.mark.parametrize("live", [False, True])
def test_save_refuses_what_the_export_cannot_read_before_any_pause(
    xen: FakeXen, live: bool
) -> None:
    xen.domains[DOMID]["state"] = base.DomainState.RUNNING
    xen.check_fails = True
    # A pause or a live copy first would make it a refusal in the
    # downtime, or after a whole copy: neither may be called.
    xen.pause = xen.pause_for_save = xen.enable_log_dirty = None
    with pytest.raises(base.NotSupported, match="FIFO"):
        inplace.save(xen, DOMID, live=live)
    assert xen.checked == [(DOMID, base.DomainState.RUNNING)]
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING


def test_save_checks_while_the_guest_runs(xen: FakeXen) -> None:
    xen.domains[DOMID]["state"] = base.DomainState.RUNNING
    inplace.save(xen, DOMID)
    assert xen.checked == [(DOMID, base.DomainState.RUNNING)]


def test_destroy_failing_leaves_the_guest_running(
    xen: FakeXen, tmp_path: Path
) -> None:
    xen.fail_destroy = True
    xen.frozen.add(DOMID)
    with pytest.raises(base.HostError, match="xl destroy"):
        inplace.restore(xen, _snapshot(), image_dir=tmp_path)
    assert xen.created == [] and list(tmp_path.iterdir()) == []
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING
    assert xen.frozen == set()


def test_a_bug_after_destroy_is_not_retried_and_keeps_the_image(
    xen: FakeXen, tmp_path: Path, monkeypatch
) -> None:
    def broken(self, domid, state):
        raise ValueError("not a vCPU state")

    monkeypatch.setattr(FakeXen, "import_pv_state", broken)
    with pytest.raises(inplace.InPlaceError, match="1 attempts; ValueError"):
        inplace.restore(xen, _snapshot(), image_dir=tmp_path)
    assert xen.created == [DOMID] and DOMID not in xen.domains
    assert inplace.read_image(inplace.image_path(DOMID, tmp_path)).memory == (
        _guest_pages()
    )


def test_without_domid_reuse_nothing_is_touched(xen: FakeXen) -> None:
    xen.reuses_domids = False
    xen.domains[DOMID]["state"] = base.DomainState.RUNNING
    with pytest.raises(inplace.InPlaceError, match="LIBXL_DOMID_REUSE"):
        inplace.save(xen, DOMID)
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING


def _page(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def _running(xen: FakeXen) -> dict:
    """The guest running, each page filled with its pfn + 1."""
    dom = xen.domains[DOMID]
    dom["state"] = base.DomainState.RUNNING
    for pfn in PFNS.tolist():
        dom["pages"][pfn][:] = _page(pfn + 1)
    return dom


def _held(snap: inplace.Snapshot) -> dict[int, bytes]:
    """The image's pages by pfn."""
    return {
        p: bytes(snap.memory[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        for i, p in enumerate(snap.pfns.tolist())
    }


@pytest.mark.parametrize("live", [False, True])
def test_save_holds_the_guest_as_it_was_when_paused(
    xen: FakeXen, live: bool, monkeypatch
) -> None:
    # The oracle: the pages the fake hypervisor holds at the pause.
    monkeypatch.setattr(inplace, "STOP_PAGES", 0)
    monkeypatch.setattr(inplace, "LIVE_ROUNDS", 3)
    dom = _running(xen)
    # Written during the first copy, the next round, and the last one.
    xen.guest_writes = [(1, _page(0xA1)), (2, _page(0xA2)), (7, _page(0xA7)),
                        (1, _page(0xB1))]  # fmt: skip
    real_pause = xen.pause
    at_pause = {}

    def pause(domid: int) -> None:
        real_pause(domid)
        at_pause.update({p: bytes(b) for p, b in dom["pages"].items()})

    xen.pause = pause
    snap = inplace.save(xen, DOMID, live=live)
    assert dom["state"] == base.DomainState.PAUSED
    held = _held(snap)
    assert held == at_pause
    if live:
        # Copied while running, then only what it wrote last while paused.
        assert snap.rounds == (len(PFNS), 1, 1)
        assert snap.paused_pages == 1
        assert at_pause[1] == _page(0xB1)
        assert xen.log_dirty is None  # log-dirty off again
    else:
        assert snap.rounds == () and snap.paused_pages == len(PFNS)
    assert snap.pv == _pv_state()
    # A plain pause: the suspend of a save is not used in place.
    assert xen.paused_for_save == []


def _granted(*entries: tuple[int, int]) -> bytes:
    """A v1 grant frame: (flags, frame) per entry, domid 0, the rest
    zero."""
    out = b"".join(
        flags.to_bytes(2, "little") + bytes(2) + frame.to_bytes(4, "little")
        for flags, frame in entries
    )
    return out + bytes(PAGE_SIZE - len(out))


def test_live_save_copies_again_what_a_backend_maps_writable(
    xen: FakeXen, monkeypatch
) -> None:
    # pfn 2 is a ring (grant 0, its frontend's ring-ref), pfn 7 a
    # persistent grant (grant 1): both mapped writable by the backend
    # (GTF_permit_access | GTF_writing), whose writes the log misses.
    monkeypatch.setattr(inplace, "STOP_PAGES", 0)
    monkeypatch.setattr(inplace, "LIVE_ROUNDS", 2)
    dom = _running(xen)
    pv = _pv_state()
    front = f"/local/domain/{DOMID}/device/vbd/51712"
    pv = dataclasses.replace(
        pv,
        grant_table=base.GrantTableState(
            1, (0xF000,), (_granted((1 | 16, 2), (1 | 16, 7), (1, 1)),)
        ),
        xenstore=dataclasses.replace(
            pv.xenstore,
            nodes=pv.xenstore.nodes
            + (base.XenstoreNode(f"{front}/ring-ref", b"0", (("n", 0),)),),
        ),
    )
    xen.export_pv_state = lambda domid: pv
    real_harvest = xen.harvest_dirty
    harvests = []

    def harvest(domid: int) -> np.ndarray:
        # The backend writes, unlogged, after the first copy.
        dirty = real_harvest(domid)
        harvests.append(domid)
        if len(harvests) == 2:
            dom["pages"][2][:] = _page(0xC2)
            dom["pages"][7][:] = _page(0xC7)
        return dirty

    xen.harvest_dirty = harvest
    copied: list[list[int]] = []
    real_map = xen.map_pages

    def map_pages(domid, pfns, writable=False):
        if dom["state"] == base.DomainState.PAUSED:
            copied.append(pfns.tolist())
        return real_map(domid, pfns, writable)

    xen.map_pages = map_pages
    snap = inplace.save(xen, DOMID, live=True)
    held = _held(snap)
    assert held[2] == _page(0xC2) and held[7] == _page(0xC7)
    assert held[1] == _page(2)  # granted read-only: kept from the copy
    # With it paused: the kept pages read to check the log, then the
    # ring first, then the rest.
    assert copied == [[0, 1], [2], [7]], copied
    assert snap.paused_pages == 2


def test_live_save_whose_log_missed_writes_copies_all_with_it_paused(
    xen: FakeXen, monkeypatch
) -> None:
    # Xen's log loses the guest's writes: the sample read at the pause
    # finds a page that changed, and every page is copied paused.
    monkeypatch.setattr(inplace, "STOP_PAGES", 0)
    monkeypatch.setattr(inplace, "LIVE_ROUNDS", 2)
    dom = _running(xen)
    real_harvest = xen.harvest_dirty
    harvests = []

    def harvest(domid: int) -> np.ndarray:
        real_harvest(domid)
        harvests.append(domid)
        if len(harvests) == 2:
            for pfn in PFNS.tolist():
                dom["pages"][pfn][:] = _page(0xD0 + pfn)
        return np.zeros(0, dtype=np.uint64)  # nothing logged

    xen.harvest_dirty = harvest
    snap = inplace.save(xen, DOMID, live=True)
    held = _held(snap)
    assert held == {p: _page(0xD0 + p) for p in PFNS.tolist()}
    assert snap.paused_pages == len(PFNS)


def test_live_save_copies_again_the_pages_xen_writes_itself(
    xen: FakeXen, monkeypatch
) -> None:
    # pfn 1 holds both vCPUs' vcpu_info, pfn 7 the shared_info page: Xen
    # writes them (pending bits, time records) through its own mapping,
    # which the log never sees. The sample check reads nothing here, so
    # only knowing these pages keeps their live copies out of the image.
    monkeypatch.setattr(inplace, "STOP_PAGES", 0)
    monkeypatch.setattr(inplace, "LIVE_ROUNDS", 2)
    monkeypatch.setattr(inplace, "LOG_CHECK_PAGES", 0)
    dom = _running(xen)
    pv = _pv_state()
    pv = dataclasses.replace(
        pv,
        shared_info=base.SharedInfoState(
            7,
            pv.shared_info.content,
            (
                base.VcpuInfoPlacement(0, 1, 64),
                base.VcpuInfoPlacement(1, 1, 128),
            ),
        ),
    )
    xen.export_pv_state = lambda domid: pv
    real_harvest = xen.harvest_dirty
    harvests = []

    def harvest(domid: int) -> np.ndarray:
        dirty = real_harvest(domid)
        harvests.append(domid)
        if len(harvests) == 2:
            # Xen's own writes, unlogged, after the first copy.
            dom["pages"][1][:] = _page(0xE1)
            dom["pages"][7][:] = _page(0xE7)
        return dirty

    xen.harvest_dirty = harvest
    snap = inplace.save(xen, DOMID, live=True)
    held = _held(snap)
    assert held == {0: _page(1), 1: _page(0xE1), 2: _page(3), 7: _page(0xE7)}
    assert snap.paused_pages == 2


def test_live_save_copies_again_the_xenstore_ring_xenstored_writes(
    xen: FakeXen, monkeypatch
) -> None:
    # pfn 2 is the xenstore ring: xenstored's answer, written through its
    # own mapping after the first copy, is unlogged. A stale ring would
    # lose an answer xenstored counts as given.
    monkeypatch.setattr(inplace, "STOP_PAGES", 0)
    monkeypatch.setattr(inplace, "LIVE_ROUNDS", 2)
    monkeypatch.setattr(inplace, "LOG_CHECK_PAGES", 0)
    dom = _running(xen)
    pv = _pv_state()
    pv = dataclasses.replace(
        pv, xenstore=dataclasses.replace(pv.xenstore, store_gfn=2)
    )
    xen.export_pv_state = lambda domid: pv
    real_harvest = xen.harvest_dirty
    harvests = []

    def harvest(domid: int) -> np.ndarray:
        dirty = real_harvest(domid)
        harvests.append(domid)
        if len(harvests) == 2:
            dom["pages"][2][:] = _page(0xE2)
        return dirty

    xen.harvest_dirty = harvest
    snap = inplace.save(xen, DOMID, live=True)
    assert _held(snap)[2] == _page(0xE2)


@pytest.mark.parametrize(
    "stopped",
    [
        base.DomainState.SHUTDOWN,
        base.DomainState.CRASHED,
        base.DomainState.DYING,
    ],
)
def test_save_refuses_a_guest_that_stopped_before(
    xen: FakeXen, stopped: base.DomainState
) -> None:
    xen.domains[DOMID]["state"] = stopped
    xen.pause = xen.enable_log_dirty = None
    with pytest.raises(inplace.InPlaceError, match=f"is {stopped.value} "):
        inplace.save(xen, DOMID, live=True)
    assert xen.destroyed == []


def test_live_save_refuses_a_guest_that_stopped_during_the_copy(
    xen: FakeXen,
) -> None:
    # The guest crashes (Xen's reboot answer to a triple fault) while
    # its memory is copied: its context is where it stopped, and put
    # back it would stop again at once.
    dom = _running(xen)
    real_harvest = xen.harvest_dirty

    def harvest(domid: int) -> np.ndarray:
        dom["state"] = base.DomainState.SHUTDOWN
        return real_harvest(domid)

    real_pause = xen.pause

    def pause(domid: int) -> None:
        stopped = dom["state"]
        real_pause(domid)
        if stopped is base.DomainState.SHUTDOWN:
            # Xen reports shut down first, paused or not.
            dom["state"] = stopped

    xen.harvest_dirty = harvest
    xen.pause = pause
    with pytest.raises(inplace.InPlaceError, match="during the save"):
        inplace.save(xen, DOMID, live=True)
    assert xen.destroyed == []
    assert dom["state"] is base.DomainState.SHUTDOWN
    assert xen.log_dirty is None
