"""A checker snapshot written to a file reads back equal, and a file the
reader does not know is refused naming why."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker
from nova_xen_ncm.host import snapshotfile
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.sim import layout

from .conftest import empty


@pytest.fixture
def state(host) -> base.GuestState:
    dom = empty(host, 1)
    host.populate(1, np.arange(0x100, 0x140, dtype=np.uint64))
    host.hv.hypercall(
        dom,
        "add_to_physmap",
        {"space": "shared_info", "idx": 0, "gfn": layout.PLATFORM_BAR_PFN},
    )
    host.hv.hypercall(dom, "hvm_set_param", {"index": 0, "value": 1 << 56})
    return checker.snapshot(host, 1)


def _rich() -> base.GuestState:
    backend = base.BackendState(
        kind="vbd", devid=51712, backend_domid=0,
        frontend_path="/local/domain/1/device/vbd/51712",
        backend_path="/local/domain/0/backend/vbd/1/51712", state=4,
        ring_refs=(8,), event_channels=(5,),
        ring_indices=types.MappingProxyType({"ring": (3, 3)}),
        inflight=(base.InflightRequest("ring", 2, b"\x00\x01"),),
    )  # fmt: skip
    view = checker.DeviceView(
        "vif", 0, "/fe", "/be", 0, 4, 4, ((6, 0), (7, None)),
        (("tx-ring", checker.SharedRing(9, 0x120, 5, 5, 0)),),
    )  # fmt: skip
    return base.GuestState(
        items={
            Item.MEMORY: {1: b"a" * 16, 2: "digest"},
            Item.PV_DEVICES: (backend, view),
            Item.DOMID: (1, (0,)),
        },
        frontends={"vbd/51712": {"states": (("frontend", 4),), "lost": 0}},
        kernel={"vcpus": ({"progress": 7, "pvclock_stable": True},),
                "ratio": 0.5, "big": 2**70},
        unread={Item.XENSTORE: "no listing"},
    )  # fmt: skip


def _equal(a: object, b: object) -> bool:
    if isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
        return all(
            x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in zip(a, b, strict=True)
        )
    return a == b


def test_a_simulated_guests_snapshot_reads_back_equal(state) -> None:
    back = snapshotfile.loads(snapshotfile.dumps(state))
    assert set(back.items) == set(state.items)
    for item, value in state.items.items():
        assert _equal(back.items[item], value), item
    assert back.kernel == state.kernel
    assert back.frontends == state.frontends
    # The same verdict as the snapshot itself gives (this empty domain
    # has no xenstore connection: that item is missing either way).
    assert checker.check(state, back) == checker.check(state, state)
    assert checker.check(state, back).results[Item.MEMORY].passed


def test_every_type_the_checker_uses_reads_back_as_itself() -> None:
    rich = _rich()
    back = snapshotfile.loads(snapshotfile.dumps(rich))
    assert back == rich
    assert type(back.items[Item.PV_DEVICES][0].inflight) is tuple
    assert type(back.items[Item.MEMORY][1]) is bytes


def test_memory_is_digests_not_ram(state) -> None:
    pfns, digests = state.items[Item.MEMORY]
    data = snapshotfile.dumps(state)
    assert len(data) < 4096 * len(pfns)
    assert len(data) < 64 * len(pfns) + 64 * 1024


def test_a_changed_page_digest_is_still_found(state) -> None:
    pfns, digests = state.items[Item.MEMORY]
    changed = digests.copy()
    changed[3, 0] ^= 1
    other = base.GuestState(
        items={**state.items, Item.MEMORY: (pfns, changed)},
        kernel=state.kernel,
    )
    back = snapshotfile.loads(snapshotfile.dumps(other))
    report = checker.check(state, back)
    assert not report.results[Item.MEMORY].passed
    assert hex(int(pfns[3])) in report.results[Item.MEMORY].reason


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"{", "not JSON"),
        (b'{"format": "other"}', "not a guest state snapshot"),
        (
            json.dumps({"format": snapshotfile.FORMAT, "version": 9}).encode(),
            "snapshot version 9",
        ),
        (
            json.dumps({
                "format": snapshotfile.FORMAT, "version": 1,
                "items": {"m": [["memory", 1]]}, "frontends": {"m": []},
                "kernel": {"m": []}, "unread": {"m": []},
            }).encode(),
            "is not an item",
        ),
        (
            json.dumps({
                "format": snapshotfile.FORMAT, "version": 1,
                "items": {"d": "DomainConfig", "f": {}},
                "frontends": {"m": []}, "kernel": {"m": []},
                "unread": {"m": []},
            }).encode(),
            "DomainConfig",
        ),
    ],
)  # fmt: skip
def test_a_file_this_version_does_not_read_is_refused(data, named) -> None:
    with pytest.raises(snapshotfile.SnapshotFileError, match=named):
        snapshotfile.loads(data)


def test_only_the_checkers_types_are_written() -> None:
    with pytest.raises(TypeError, match="cannot write"):
        snapshotfile.dumps(base.GuestState(items={Item.DOMID: object()}))
    with pytest.raises(TypeError, match="float32"):
        snapshotfile.dumps(
            base.GuestState(items={Item.MEMORY: np.zeros(2, np.float32)})
        )


def test_an_oversized_file_is_refused_unparsed(monkeypatch) -> None:
    monkeypatch.setattr(snapshotfile, "MAX_FILE", 10)
    with pytest.raises(snapshotfile.SnapshotFileError, match="octets"):
        snapshotfile.loads(b"x" * 11)


def test_a_file_nested_too_deep_is_refused():
    """JSON deeper than the parser recurses: refused, not a traceback."""
    data = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(snapshotfile.SnapshotFileError, match="not JSON"):
        snapshotfile.loads(data)
