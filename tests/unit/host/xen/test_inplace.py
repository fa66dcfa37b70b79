"""In-place restore when Xen fails after the old domain was destroyed.

``FakeXen`` keeps domains as the hypervisor would: a domid, a state and
its pages. The guest's image is judged by what the new domain holds, not
by the snapshot object the restore was given.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.xen import inplace
from nova_xen_ncm.host.xen.context import EventChannel
from nova_xen_ncm.host.xen.context import VcpuState

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
        self.domains[domid]["state"] = base.DomainState.RUNNING


class FakeContext:
    def __init__(self, xen: FakeXen) -> None:
        self.xen = xen

    def get_event_channels(self, domid: int) -> list[EventChannel]:
        # The xenstore port the toolstack binds, where the guest had it.
        return [EventChannel(port=1, status=1, remote_dom=0)]

    def set_event_channels(self, domid, chans) -> None:
        self.xen.domains[domid]["ports"] = list(chans)

    def get_vcpu_state(self, domid: int, vcpu: int) -> VcpuState:
        return VcpuState(vcpu=vcpu, compat=True)

    def set_vcpu_state(self, domid: int, state: VcpuState) -> None:
        self.xen.domains[domid].setdefault("vcpus", []).append(state)


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
        shared_info_gfn=None,
        event_channels=[
            EventChannel(port=1, status=1, remote_dom=0),
            EventChannel(port=5, status=4, vcpu=1, virq=0),
            EventChannel(port=6, status=5, vcpu=1),
        ],
        vcpus=[
            VcpuState(vcpu=0, vcpu_info=(0x1234, 64), upcall_vector=243),
            VcpuState(vcpu=1, vcpu_info=(0x1234, 128), upcall_vector=243),
        ],
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
    assert [c.port for c in dom["ports"]] == [5, 6]
    assert [v.vcpu_info for v in dom["vcpus"]] == [(0x1234, 64), (0x1234, 128)]
    assert len([d for d in xen.domains if d == DOMID]) == 1


def test_failure_after_destroy_is_retried_from_the_image(
    xen: FakeXen, tmp_path: Path
) -> None:
    xen.fail_set_context = 1
    inplace.restore(xen, FakeContext(xen), _snapshot(), image_dir=tmp_path)
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
        inplace.restore(
            xen, FakeContext(xen), _snapshot(), image_dir=tmp_path, attempts=3
        )
    image = inplace.image_path(DOMID, tmp_path)
    assert str(image) in str(err.value) and "3 attempts" in str(err.value)
    assert DOMID not in xen.domains and xen.created == [DOMID] * 3
    # The guest comes back from its image alone (a new process would
    # have nothing else).
    inplace.restore_image(xen, FakeContext(xen), image)
    _assert_guest_back(xen)
    assert not image.exists()


def test_restore_image_refuses_a_domain_that_still_exists(
    xen: FakeXen, tmp_path: Path
) -> None:
    image = inplace.image_path(DOMID, tmp_path)
    inplace.write_image(_snapshot(), image)
    with pytest.raises(inplace.InPlaceError, match="exists"):
        inplace.restore_image(xen, FakeContext(xen), image)
    assert xen.destroyed == [] and image.exists()


def test_image_not_written_leaves_the_domain_running(
    xen: FakeXen, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(inplace.InPlaceError, match="left in place"):
        inplace.restore(
            xen, FakeContext(xen), _snapshot(), image_dir=blocked / "sub"
        )
    assert xen.destroyed == [] and xen.created == []
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING


def test_image_round_trip(tmp_path: Path) -> None:
    snap = _snapshot()
    path = tmp_path / "img.npz"
    inplace.write_image(snap, path)
    back = inplace.read_image(path)
    assert back.pfns.tolist() == snap.pfns.tolist()
    assert back.memory == snap.memory
    fields = ("domid", "libxl_config", "hvm_context", "hvm_params", "tsc",
              "shared_info_gfn", "event_channels", "vcpus")  # fmt: skip
    for field in fields:
        assert getattr(back, field) == getattr(snap, field), field
    assert not (tmp_path / "img.npz.tmp").exists()
    assert path.stat().st_mode & 0o077 == 0


def test_bad_attempts_refused_before_anything(xen: FakeXen) -> None:
    with pytest.raises(ValueError, match="attempts"):
        inplace.restore(xen, FakeContext(xen), _snapshot(), attempts=0)
    assert xen.destroyed == []


def test_save_refused_after_the_pause_unpauses_the_guest(
    xen: FakeXen,
) -> None:
    xen.domains[DOMID]["state"] = base.DomainState.RUNNING
    with pytest.raises(inplace.InPlaceError, match="32-bit"):
        inplace.save(xen, FakeContext(xen), DOMID)
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING


def test_destroy_failing_leaves_the_guest_running(
    xen: FakeXen, tmp_path: Path
) -> None:
    xen.fail_destroy = True
    with pytest.raises(base.HostError, match="xl destroy"):
        inplace.restore(xen, FakeContext(xen), _snapshot(), image_dir=tmp_path)
    assert xen.created == [] and list(tmp_path.iterdir()) == []
    assert xen.domains[DOMID]["state"] == base.DomainState.RUNNING


def test_a_bug_after_destroy_is_not_retried_and_keeps_the_image(
    xen: FakeXen, tmp_path: Path, monkeypatch
) -> None:
    def broken(self, domid, state):
        raise ValueError("not a vCPU state")

    monkeypatch.setattr(FakeContext, "set_vcpu_state", broken)
    with pytest.raises(inplace.InPlaceError, match="1 attempts; ValueError"):
        inplace.restore(xen, FakeContext(xen), _snapshot(), image_dir=tmp_path)
    assert xen.created == [DOMID] and DOMID not in xen.domains
    assert inplace.read_image(inplace.image_path(DOMID, tmp_path)).memory == (
        _guest_pages()
    )
