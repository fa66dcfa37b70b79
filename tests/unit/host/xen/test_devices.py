"""What the in-place restore does for a guest's PV devices (the
sequence itself is judged on the patched rig, tests/xen)."""

from __future__ import annotations

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import devices

D = 7
FRONT = f"/local/domain/{D}/device"


def node(path: str, value: str) -> base.XenstoreNode:
    return base.XenstoreNode(path, value.encode(), (("n", D),))


NODES = [
    node(f"{FRONT}/vbd/51712/backend-id", "0"),
    node(f"{FRONT}/vbd/51712/event-channel", "15"),
    node(f"{FRONT}/vbd/51712/state", "4"),
    node(f"{FRONT}/vif/0/backend-id", "0"),
    node(f"{FRONT}/vif/0/event-channel-tx", "16"),
    node(f"{FRONT}/vif/0/event-channel-rx", "17"),
    node(f"{FRONT}/vif/1/backend-id", "3"),
    node(f"{FRONT}/vif/1/queue-0/event-channel-tx", "20"),
    node(f"{FRONT}/vif/1/state", "4"),
    node(f"/local/domain/{D}/data/event-channel", "30"),
    node(f"{FRONT}/suspend/event-channel", ""),
]


def test_frontend_ports_name_their_backend() -> None:
    assert devices.frontend_ports(NODES, D) == {
        15: 0,
        16: 0,
        17: 0,
        20: 3,
    }


def test_only_frontends_state_nodes_are_written_last() -> None:
    last = [n.path for n in NODES if devices.is_frontend_state(n.path, D)]
    assert last == [f"{FRONT}/vbd/51712/state", f"{FRONT}/vif/1/state"]
    assert not devices.is_frontend_state(f"/local/domain/{D}/state", D)


def test_grant_entries_lose_only_their_in_use_bits() -> None:
    # flags (GTF_permit_access | reading | writing | readonly), domid 0,
    # frame; then an entry with only permit_access.
    entry = bytes([1 | 8 | 16 | 4, 0, 0, 0, 0x34, 0x12, 0, 0])
    plain = bytes([1, 0, 0, 0, 0x78, 0x56, 0, 0])
    cleared = devices.clear_grants_in_use(entry + plain)
    assert cleared == bytes([1 | 4, 0, 0, 0, 0x34, 0x12, 0, 0]) + plain


def test_a_missing_medium_or_bridge_is_named(tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    ok = devices.Device("vbd", 51712, 0, "f", "b", str(disk))
    devices.check_media([ok])
    gone = devices.Device("vbd", 51712, 0, "f", "b", str(tmp_path / "no"))
    with pytest.raises(devices.DeviceError, match="medium .*no"):
        devices.check_media([gone])
    bridge = devices.Device("vif", 0, 0, "f", "b", "no-such-bridge0")
    with pytest.raises(devices.DeviceError, match="no-such-bridge0"):
        devices.check_media([bridge])


def test_devices_of_other_backends_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(devices, "backends_missing", dict)
    qdisk = devices.Device("qdisk", 51712, 0, "f", "b", None)
    with pytest.raises(devices.DeviceError, match="qdisk"):
        devices.check_devices(None, D, [qdisk])  # type: ignore[arg-type]
    domu = devices.Device("vif", 0, 3, "f", "b", None)
    with pytest.raises(devices.DeviceError, match="domain 3"):
        devices.check_devices(None, D, [domu])  # type: ignore[arg-type]
    monkeypatch.setattr(
        devices, "backends_missing", lambda: {"vbd": "too old"}
    )
    vbd = devices.Device("vbd", 51712, 0, "f", "b", None)
    with pytest.raises(devices.DeviceError, match="too old"):
        devices.check_devices(None, D, [vbd])  # type: ignore[arg-type]


def test_device_round_trips_through_json() -> None:
    dev = devices.Device("vif", 0, 0, "f", "b", "br0")
    assert devices.Device.from_json(dev.to_json()) == dev


def _frame(*entries: tuple[int, int]) -> bytes:
    out = b"".join(
        flags.to_bytes(2, "little") + bytes(2) + frame.to_bytes(4, "little")
        for flags, frame in entries
    )
    return out + bytes(4096 - len(out))


def test_pages_mapped_writable_are_the_granted_ones_with_writing() -> None:
    # permit_access + writing; + reading only; writing on an unused
    # entry (type 0); a transfer entry (type 2) with the bit.
    gt = base.GrantTableState(
        1,
        (0xF000,),
        (_frame((1 | 16, 9), (1 | 8, 10), (16, 11), (2 | 16, 12)),),
    )
    assert devices.mapped_writable(gt).tolist() == [9]
    assert devices.mapped_writable(base.GrantTableState(2, (), ())).size == 0


def test_ring_pages_are_found_through_the_frontends_grant_refs() -> None:
    gt = base.GrantTableState(
        1, (0xF000,), (_frame((1, 100), (1, 101), (1, 102), (1, 103)),)
    )
    nodes = [
        node(f"{FRONT}/vbd/51712/ring-ref", "0"),
        node(f"{FRONT}/vif/0/tx-ring-ref", "1"),
        node(f"{FRONT}/vif/1/queue-0/rx-ring-ref", "2"),
        node(f"{FRONT}/vbd/51728/ring-ref1", "3"),
        # The console's ring-ref is a frame, not a grant reference.
        node(f"{FRONT}/console/0/ring-ref", "1"),
        node(f"{FRONT}/vbd/51744/ring-ref", "4096"),  # past the table
        node(f"/local/domain/{D}/data/ring-ref", "0"),
    ]
    assert devices.ring_gfns(nodes, gt, D).tolist() == [100, 101, 102, 103]


def test_frontend_ports_are_raised_in_the_shared_info_content() -> None:
    content = bytes(4096)
    raised = devices.raise_ports(content, [15, 17, 64])
    pending = raised[2048 : 2048 + 512]
    assert (pending[1], pending[2]) == (1 << 7, 1 << 1)  # ports 15, 17
    assert pending[8] == 1  # port 64: the second word
    assert raised[:2048] == content[:2048] and raised[2560:] == content[2560:]


def test_a_vcpu_info_made_to_scan_every_word_keeps_the_rest() -> None:
    info = bytes(range(128))
    marked = bytearray(info)
    devices.mark_all_pending(marked, 64)
    assert marked[64] == 1 and marked[72:80] == b"\xff" * 8
    assert marked[:64] == info[:64]
    assert marked[65:72] == info[65:72] and marked[80:] == info[80:]


BACK = "/local/domain/0/backend"


def test_a_restore_waits_for_the_old_backend_devices_to_go(
    tmp_path, monkeypatch
) -> None:
    vif = devices.Device("vif", 0, 0, "f", f"{BACK}/vif/{D}/0", "br0")
    vbd = devices.Device("vbd", 51712, 0, "f", f"{BACK}/vbd/{D}/51712", "/d")
    (tmp_path / "vif-7-0").mkdir()
    (tmp_path / "vbd-8-51712").mkdir()  # another domain's: not waited for
    sleeps = []

    def removed_by_xenwatch(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            (tmp_path / "vif-7-0").rmdir()

    monkeypatch.setattr(devices.time, "sleep", removed_by_xenwatch)
    devices.wait_backends_gone(D, [vif, vbd], timeout=60.0, root=str(tmp_path))
    assert len(sleeps) == 3


def test_the_old_backend_devices_that_stay_are_named(tmp_path) -> None:
    # A vbd served by QEMU: its backend area, and device, are qdisk's.
    (tmp_path / "qdisk-7-51712").mkdir()
    (tmp_path / "vif-7-0").mkdir()
    vbd = devices.Device("vbd", 51712, 0, "f", f"{BACK}/qdisk/{D}/51712")
    vif = devices.Device("vif", 0, 0, "f", f"{BACK}/vif/{D}/0", "br0")
    with pytest.raises(
        devices.DeviceError, match="qdisk-7-51712, vif-7-0 after"
    ):
        devices.wait_backends_gone(
            D, [vbd, vif], timeout=0.3, root=str(tmp_path)
        )
