"""A guest's blkback and netback devices in a live migration between two
patched Xen hosts: what the source's quiesce and rollback, the PV export
and import and the destination's domain creation do without a
hypervisor (dom0's sysfs, xenstore and grant frames are fakes). The
sequence itself is judged on two patched rigs (tests/xen)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import types

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import xen as xen_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.xen import devices
from nova_xen_ncm.host.xen import host as host_mod
from nova_xen_ncm.host.xen import pvctx

D = 7
FRONT = f"/local/domain/{D}/device"
BACK = "/local/domain/0/backend"
VBD = devices.Device(
    "vbd", 51712, 0, f"{FRONT}/vbd/51712", f"{BACK}/vbd/{D}/51712", "/d"
)
VIF = devices.Device("vif", 0, 0, f"{FRONT}/vif/0", f"{BACK}/vif/{D}/0", "br0")


# -- dom0's sysfs -----------------------------------------------------------


class Sysfs:
    """The xen-backend bus: devices with a ``driver`` link while bound,
    and each driver's bind and unbind files, as the driver core acts on
    them."""

    def __init__(self, root, names=("vbd-7-51712", "vif-7-0")) -> None:
        self.devices = root / "devices"
        self.drivers = root / "drivers"
        self.written: list[tuple[str, str]] = []
        self.refuse: set[tuple[str, str]] = set()
        for name in names:
            (self.devices / name).mkdir(parents=True)
            kind = name.split("-")[0]
            (self.drivers / kind).mkdir(parents=True, exist_ok=True)
            (self.devices / name / "driver").symlink_to(self.drivers / kind)

    def install(self, monkeypatch) -> None:
        real = devices._write_sysfs

        def write(path: str, value: str) -> None:
            what = os.path.basename(path)
            if (what, value) in self.refuse:
                raise OSError(16, "Device or resource busy")
            self.written.append((what, value))
            link = self.devices / value / "driver"
            if what == "unbind":
                link.unlink()
            else:
                link.symlink_to(os.path.dirname(path))
            real(path, value)

        monkeypatch.setattr(devices, "_write_sysfs", write)
        monkeypatch.setattr(devices, "XEN_BACKEND_DEVICES", str(self.devices))
        monkeypatch.setattr(devices, "XEN_BACKEND_DRIVERS", str(self.drivers))

    def kw(self) -> dict[str, str]:
        return {
            "drivers": str(self.drivers),
            "devices_root": str(self.devices),
        }


def test_quiesce_unbinds_each_backend_from_its_driver(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    assert devices.unbind(D, [VBD, VIF], [], **fs.kw()) == [VBD, VIF]
    assert fs.written == [("unbind", "vbd-7-51712"), ("unbind", "vif-7-0")]
    assert not devices.bound(D, VBD, str(fs.devices))
    devices.bind(D, [VBD, VIF], **fs.kw())
    assert fs.written[2:] == [("bind", "vbd-7-51712"), ("bind", "vif-7-0")]
    # Bound already: left alone.
    devices.bind(D, [VBD], **fs.kw())
    assert len(fs.written) == 4


def test_a_backend_that_cannot_be_unbound_is_named_the_others_kept(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    fs.refuse.add(("unbind", "vif-7-0"))
    done: list[devices.Device] = []
    with pytest.raises(devices.DeviceError, match="vif 0's backend could"):
        devices.unbind(D, [VBD, VIF], done, **fs.kw())
    # Left for the caller's rollback, which binds them as it binds all.
    assert fs.written == [("unbind", "vbd-7-51712")] and done == [VBD]
    # One already without a driver is quiesced as well.
    fs.refuse.clear()
    assert devices.unbind(D, [VBD, VIF], [], **fs.kw()) == [VBD, VIF]


def test_a_quiesce_failing_half_way_puts_an_unbound_vif_back(
    tmp_path, monkeypatch
) -> None:
    # The vif unbound before the disk's unbind fails: netback freed its
    # network device, so the rollback runs its hotplug script (back on
    # its bridge) and waits until it is Connected, as resume_backends.
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    fs.refuse.add(("unbind", "vbd-7-51712"))
    store = Store({f"{VIF.backend}/script": "vif-bridge"})
    xen = xen_host(monkeypatch, store, [VIF, VBD])
    hotplug, connected = [], []
    monkeypatch.setattr(
        devices, "run_hotplug", lambda d, dev, s: hotplug.append((dev, s))
    )
    monkeypatch.setattr(
        devices,
        "wait_connected",
        lambda h, d, devs, timeout, call: connected.append(
            (tuple(devs), timeout)
        ),
    )
    with pytest.raises(devices.DeviceError, match="vbd 51712's backend"):
        xen.quiesce_backends(D)
    assert fs.written == [("unbind", "vif-7-0"), ("bind", "vif-7-0")]
    assert hotplug == [(VIF, "vif-bridge")]
    assert connected == [((VIF,), CONNECT_TIMEOUT)]
    assert xen._quiesced == {}


def test_a_backend_not_bound_again_is_named_after_trying_all(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    devices.unbind(D, [VBD, VIF], [], **fs.kw())
    fs.refuse.add(("bind", "vbd-7-51712"))
    with pytest.raises(devices.DeviceError, match="vbd 51712"):
        devices.bind(D, [VBD, VIF], **fs.kw())
    assert devices.bound(D, VIF, str(fs.devices))


# -- grants and rings -------------------------------------------------------


def grant_table(*entries: tuple[int, int, int]) -> base.GrantTableState:
    frame = bytearray(4096)
    for i, (flags, domid, gfn) in enumerate(entries):
        frame[i * 8 : i * 8 + 8] = (
            flags.to_bytes(2, "little")
            + domid.to_bytes(2, "little")
            + gfn.to_bytes(4, "little")
        )
    return base.GrantTableState(1, (0xF0000,), (bytes(frame),))


PERMIT, READING, WRITING = 1, 1 << 3, 1 << 4
# The toolstack's reserved entries, the console's and xenstore's rings
# mapped by their daemons.
TOOLSTACK = [(PERMIT | READING | WRITING, 0, 0xFEFFF)] * 2 + [(0, 0, 0)] * 6


def test_the_quiesce_waits_until_no_grant_is_mapped(monkeypatch) -> None:
    tables = [
        grant_table(
            *TOOLSTACK,
            (PERMIT | WRITING, 0, 0x100),
            (PERMIT | READING, 0, 0x101),
        ),
        grant_table(
            *TOOLSTACK, (PERMIT | WRITING, 0, 0x100), (PERMIT, 0, 0x101)
        ),
        # Mapped by another domain's backend: not this guest's devices'.
        grant_table(
            *TOOLSTACK, (PERMIT, 0, 0x100), (PERMIT | READING, 5, 0x101)
        ),
    ]
    assert devices.grants_in_use(tables[0], {0}) == 2
    monkeypatch.setattr(devices.time, "sleep", lambda s: None)
    devices.wait_unmapped(lambda: tables.pop(0), D, [VBD, VIF], timeout=30)
    assert tables == []


def test_the_toolstacks_reserved_grants_are_not_waited_for() -> None:
    # Refs 0 and 1 (the console's and xenstore's rings) stay mapped by
    # xenconsoled and xenstored, which are not quiesced.
    assert devices.grants_in_use(grant_table(*TOOLSTACK), {0}) == 0
    gt = grant_table(*TOOLSTACK, (PERMIT | WRITING, 0, 0x100))
    assert devices.grants_in_use(gt, {0}) == 1


def test_grants_still_mapped_are_counted_in_the_error(monkeypatch) -> None:
    clock = iter(range(100))
    monkeypatch.setattr(devices.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(devices.time, "sleep", lambda s: None)
    gt = grant_table(*TOOLSTACK, (PERMIT | WRITING, 0, 0x100))
    with pytest.raises(devices.DeviceError, match="1 grants are still"):
        devices.wait_unmapped(lambda: gt, D, [VBD], timeout=3)


def test_an_attaching_backend_starts_at_the_rings_rsp_prod() -> None:
    page = (9).to_bytes(4, "little") + bytes(4) + (7).to_bytes(4, "little")
    assert devices.ring_rsp_prod(page + bytes(4084)) == 7


def nodes(front: str, **values: str) -> list[base.XenstoreNode]:
    return [
        base.XenstoreNode(f"{front}/{k.replace('_', '-')}", v.encode(), ())
        for k, v in values.items()
    ]


def test_a_frontends_rings_and_ports_come_from_its_nodes() -> None:
    one = devices.frontend_rings(
        nodes(VBD.frontend, ring_ref="8", event_channel="15"), VBD
    )
    assert one == devices.FrontendRings({"ring": (8,)}, (15,))
    pages = devices.frontend_rings(
        nodes(
            VBD.frontend,
            ring_page_order="1",
            ring_ref0="8",
            ring_ref1="9",
            event_channel="15",
        ),
        VBD,
    )
    assert pages.rings == {"ring": (8, 9)}
    split = devices.frontend_rings(
        nodes(
            VIF.frontend,
            tx_ring_ref="10",
            rx_ring_ref="11",
            event_channel_tx="16",
            event_channel_rx="17",
        ),
        VIF,
    )
    assert split == devices.FrontendRings({"tx": (10,), "rx": (11,)}, (16, 17))


def test_a_multi_queue_frontend_is_refused_by_name() -> None:
    front = nodes(VIF.frontend, multi_queue_num_queues="2")
    with pytest.raises(devices.DeviceError, match="uses 2 queues"):
        devices.frontend_rings(front, VIF)
    with pytest.raises(devices.DeviceError, match="ring-ref is 'x'"):
        devices.frontend_rings(
            nodes(VBD.frontend, ring_ref="x", event_channel="1"), VBD
        )


# -- the vif's hotplug script ----------------------------------------------


def script(tmp_path, body: str) -> str:
    path = tmp_path / "vif-bridge"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_vif_bound_again_is_put_on_its_bridge_by_its_script(
    tmp_path,
) -> None:
    out = tmp_path / "env"
    path = script(tmp_path, f'echo "$1 $vif $XENBUS_PATH" > {out}')
    devices.run_hotplug(D, VIF, path)
    assert out.read_text().split() == ["online", "vif7.0", VIF.backend]
    # A vbd's backend needs no script again (its physical-device stays).
    devices.run_hotplug(D, VBD, path)
    failing = script(tmp_path, "echo no bridge >&2; exit 3")
    with pytest.raises(devices.DeviceError, match="failed .3.: no bridge"):
        devices.run_hotplug(D, VIF, failing)


# -- the destination's domain ----------------------------------------------


def test_a_disk_or_bridge_missing_here_is_refused_before_creation(
    tmp_path,
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    ok = base.DeviceConfig("vbd", 51712, extra={"target": str(disk)})
    devices.check_configs([ok])
    gone = base.DeviceConfig("vbd", 51712, extra={"target": "/nowhere/d"})
    with pytest.raises(base.NotSupported, match="'/nowhere/d' is not on"):
        devices.check_configs([gone])
    net = base.DeviceConfig("vif", 0, extra={"bridge": "no-such-br9"})
    with pytest.raises(base.NotSupported, match="no-such-br9"):
        devices.check_configs([net])
    with pytest.raises(base.NotSupported, match="vkbd 0"):
        devices.check_configs([base.DeviceConfig("vkbd", 0)])


def test_create_empty_domain_checks_the_devices_before_libxl(
    monkeypatch,
) -> None:
    xen = object.__new__(host_mod.XenHost)
    monkeypatch.setattr(
        xen, "domain_info", lambda d: (_ for _ in ()).throw(
            base.DomainNotFound("no")
        ), raising=False,
    )  # fmt: skip
    monkeypatch.setattr(
        xen, "find_domain", lambda n: (_ for _ in ()).throw(
            base.DomainNotFound("no")
        ), raising=False,
    )  # fmt: skip
    monkeypatch.setattr(xen, "free_memory", lambda: 1 << 40, raising=False)
    created = []
    monkeypatch.setattr(
        xen, "libxl_json", lambda c, d: created.append(c), raising=False
    )
    config = base.DomainConfig(
        name="g",
        memory_bytes=1 << 28,
        devices=(base.DeviceConfig("vbd", 51712, extra={"target": "/no/d"}),),
    )
    with pytest.raises(base.NotSupported, match="/no/d"):
        xen.create_empty_domain(config, D)
    assert created == []


# -- the Xen host's quiesce, rollback and device list ----------------------


class Store:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def read(self, path: str) -> bytes | None:
        value = self.values.get(path)
        return None if value is None else value.encode()


# Set apart from the defaults: what the host passes on is the option's.
CONNECT_TIMEOUT = 75.0
UNMAP_TIMEOUT = 12.5


def xen_host(monkeypatch, store: Store, devs, *, pv_devices=None):
    xen = object.__new__(host_mod.XenHost)
    conf = cfg.ConfigOpts()
    xen_conf.register_opts(conf)
    conf([])
    conf.set_override(
        "backend_connect_timeout", CONNECT_TIMEOUT, "xen_ncm_xen"
    )
    conf.set_override("backend_unmap_timeout", UNMAP_TIMEOUT, "xen_ncm_xen")
    xen.opts = conf.xen_ncm_xen
    xen._quiesced = {}
    xen._xs_migrates = False
    monkeypatch.setattr(xen, "_xs_read", store.read, raising=False)
    caps = types.SimpleNamespace(restore={Item.PV_DEVICES: pv_devices})
    monkeypatch.setattr(xen, "capabilities", lambda: caps, raising=False)
    monkeypatch.setattr(devices, "list_devices", lambda host, domid: devs)
    monkeypatch.setattr(devices, "backends_missing", dict)
    return xen


def test_quiesce_unbinds_then_waits_and_the_rollback_binds_again(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    console = devices.Device("console", 0, 0, "f", "b")
    store = Store({f"{VIF.backend}/script": "/etc/xen/scripts/vif-bridge"})
    xen = xen_host(monkeypatch, store, [VBD, VIF, console])
    waited, hotplug, connected = [], [], []
    monkeypatch.setattr(xen, "domain_context", lambda: None, raising=False)
    monkeypatch.setattr(
        devices,
        "wait_unmapped",
        lambda read, d, devs, timeout: waited.append((devs, timeout)),
    )
    monkeypatch.setattr(
        devices, "run_hotplug", lambda d, dev, s: hotplug.append((dev, s))
    )
    monkeypatch.setattr(
        devices,
        "wait_connected",
        lambda h, d, devs, timeout, call: connected.append(
            (tuple(devs), timeout)
        ),
    )
    xen.quiesce_backends(D)
    # The console is xenconsoled's: never unbound.
    assert fs.written == [("unbind", "vbd-7-51712"), ("unbind", "vif-7-0")]
    assert waited == [([VBD, VIF], UNMAP_TIMEOUT)]
    assert xen._quiesced == {D: (VBD, VIF)}
    xen.resume_backends(D)
    assert fs.written[2:] == [("bind", "vbd-7-51712"), ("bind", "vif-7-0")]
    assert hotplug == [(VBD, None), (VIF, "/etc/xen/scripts/vif-bridge")]
    assert connected == [((VBD, VIF), CONNECT_TIMEOUT)]
    assert xen._quiesced == {}


def test_a_quiesce_that_cannot_finish_binds_the_backends_again(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    xen = xen_host(monkeypatch, Store({}), [VBD, VIF])
    monkeypatch.setattr(xen, "domain_context", lambda: None, raising=False)

    def still_mapped(read, d, devs, timeout):
        raise devices.DeviceError("2 grants are still mapped")

    monkeypatch.setattr(devices, "wait_unmapped", still_mapped)
    monkeypatch.setattr(devices, "wait_connected", lambda *a, **k: None)
    monkeypatch.setattr(devices, "run_hotplug", lambda *a: None)
    with pytest.raises(devices.DeviceError, match="still mapped"):
        xen.quiesce_backends(D)
    assert devices.bound(D, VBD, str(fs.devices))
    assert devices.bound(D, VIF, str(fs.devices))
    assert xen._quiesced == {}


def test_after_a_restart_the_rollback_binds_what_has_no_driver(
    tmp_path, monkeypatch
) -> None:
    fs = Sysfs(tmp_path)
    fs.install(monkeypatch)
    devices.unbind(D, [VIF], [], **fs.kw())
    xen = xen_host(monkeypatch, Store({}), [VBD, VIF])
    monkeypatch.setattr(devices, "run_hotplug", lambda *a: None)
    monkeypatch.setattr(devices, "wait_connected", lambda *a, **k: None)
    xen.resume_backends(D)
    assert fs.written[-1] == ("bind", "vif-7-0")
    assert len(fs.written) == 2


def test_devices_a_host_cannot_carry_are_refused_by_name(monkeypatch) -> None:
    xen = xen_host(monkeypatch, Store({}), [VBD], pv_devices="too old")
    with pytest.raises(base.NotSupported, match=f"{VBD.backend}.*too old"):
        xen.quiesce_backends(D)
    qdisk = devices.Device("qdisk", 51712, 0, "f", "b")
    xen = xen_host(monkeypatch, Store({}), [qdisk])
    with pytest.raises(base.NotSupported, match="qdisk"):
        xen.guest_devices(D)
    # No device but the console: nothing to do.
    xen = xen_host(monkeypatch, Store({}), [])
    xen.quiesce_backends(D)
    assert xen.guest_devices(D) == ()


def test_the_guests_devices_as_a_destination_creates_them(
    monkeypatch,
) -> None:
    store = Store(
        {
            f"{VBD.backend}/dev": "xvda",
            f"{VIF.backend}/mac": "00:16:3e:4e:43:4d",
            f"{VBD.frontend}/ring-ref": "8",
            f"{VBD.frontend}/event-channel": "15",
            f"{VIF.frontend}/tx-ring-ref": "10",
            f"{VIF.frontend}/rx-ring-ref": "11",
            f"{VIF.frontend}/event-channel": "16",
        }
    )
    xen = xen_host(monkeypatch, store, [VBD, VIF])
    config = {
        "disks": [
            {"vdev": "xvda", "pdev_path": "/srv/d.img", "format": "raw"}
        ],
        "nics": [{"devid": 0, "mac": "00:16:3e:4e:43:4d", "bridge": "br0"}],
    }
    monkeypatch.setattr(xen, "libxl_config", lambda d: config, raising=False)

    def front(host, dev):
        return [
            base.XenstoreNode(p, v.encode(), ())
            for p, v in store.values.items()
            if p.startswith(dev.frontend + "/")
        ]

    monkeypatch.setattr(pvctx, "frontend_nodes", front)
    assert xen.guest_devices(D) == (
        base.DeviceConfig(
            "vbd", 51712, extra={"target": "/srv/d.img", "format": "raw"}
        ),
        base.DeviceConfig(
            "vif", 0, mac="00:16:3e:4e:43:4d", extra={"bridge": "br0"}
        ),
    )
    # A multi-queue frontend is refused here, at SETUP.
    store.values[f"{VIF.frontend}/multi-queue-num-queues"] = "2"
    with pytest.raises(base.NotSupported, match="uses 2 queues"):
        xen.guest_devices(D)


# -- the PV export and import ----------------------------------------------


class Mapping:
    def __init__(self, pages) -> None:
        self.pages = pages


def test_the_export_carries_the_quiesced_devices(monkeypatch) -> None:
    gt = grant_table(
        (PERMIT, 0, 0x100), (PERMIT, 0, 0x101), (PERMIT, 0, 0x102)
    )
    rings = {
        0x100: (5).to_bytes(4, "little") * 4,
        0x101: (6).to_bytes(4, "little") * 4,
        0x102: (9).to_bytes(4, "little") * 4,
    }

    @contextlib.contextmanager
    def map_pages(domid, pfns, writable=False):
        yield Mapping([rings[int(p)] for p in pfns])

    host = types.SimpleNamespace(
        map_pages=map_pages,
        _xs_read=lambda p: b"4" if p.endswith("/state") else None,
    )
    xs = base.XenstoreState(
        nodes=tuple(
            nodes(VBD.frontend, ring_ref="2", event_channel="15")
            + nodes(
                VIF.frontend,
                tx_ring_ref="0",
                rx_ring_ref="1",
                event_channel_tx="16",
                event_channel_rx="17",
            )
        ),
        watches=(),
        transactions=(),
        store_port=1,
        store_gfn=2,
    )
    vbd, vif = pvctx._export_backends(host, D, (VBD, VIF), gt, xs)
    assert (vbd.ring_refs, vbd.event_channels) == ((2,), (15,))
    assert vbd.ring_indices == {"ring": (9, 9)} and vbd.state == 4
    assert (vif.ring_refs, vif.event_channels) == ((0, 1), (16, 17))
    assert vif.ring_indices == {"tx": (5, 5), "rx": (6, 6)}
    # The restore in place quiesces none: it carries its devices itself.
    assert pvctx._export_backends(host, D, (), gt, xs) == ()


def backend_state(dev: devices.Device) -> base.BackendState:
    return base.BackendState(
        kind=dev.kind,
        devid=dev.devid,
        backend_domid=0,
        frontend_path=dev.frontend,
        backend_path=dev.backend,
        state=4,
        ring_refs=(8,),
        event_channels=(15,),
        ring_indices={"ring": (1, 1)},
    )


def test_the_import_refuses_a_device_this_host_did_not_create(
    monkeypatch,
) -> None:
    monkeypatch.setattr(devices, "backends_missing", dict)
    here = Store({VBD.backend: ""})
    host = types.SimpleNamespace(_xs_read=here.read)
    (dev,) = pvctx.check_backends(host, D, (backend_state(VBD),))
    assert (dev.kind, dev.backend) == ("vbd", VBD.backend)
    with pytest.raises(base.NotSupported, match="vif 0 has no backend here"):
        pvctx.check_backends(host, D, (backend_state(VBD), backend_state(VIF)))
    monkeypatch.setattr(devices, "backends_missing", lambda: {"vbd": "old"})
    with pytest.raises(base.NotSupported, match="vbd 51712: old"):
        pvctx.check_backends(host, D, (backend_state(VBD),))


def test_a_backend_that_does_not_attach_fails_the_import(monkeypatch) -> None:
    clock = iter(np.arange(0, 1000, 50.0))
    monkeypatch.setattr(devices.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(devices.time, "sleep", lambda s: None)
    store = Store({f"{VBD.backend}/state": "2"})
    host = types.SimpleNamespace(_xs_read=store.read)
    with pytest.raises(devices.DeviceError, match="state 2 .*not Connected"):
        devices.wait_connected(
            host, D, [VBD], timeout=120.0, call="import_pv_state"
        )


def test_a_backend_whose_hotplug_script_failed_fails_at_once(
    monkeypatch,
) -> None:
    # Not after the whole wait: it would not connect, and the guest is
    # paused at its source meanwhile.
    clock = iter(np.arange(0, 1000, 50.0))
    monkeypatch.setattr(devices.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(devices.time, "sleep", lambda s: None)
    store = Store(
        {
            f"{VBD.backend}/state": "2",
            f"{VBD.backend}/hotplug-status": "error",
            f"{VBD.backend}/hotplug-error": "/dev/vdb does not exist",
        }
    )
    host = types.SimpleNamespace(_xs_read=store.read)
    with pytest.raises(devices.DeviceError, match="hotplug script failed"):
        devices.wait_connected(
            host, D, [VBD], timeout=120.0, call="import_pv_state"
        )


def test_the_stream_carries_the_quiesced_backends_as_they_are() -> None:
    # Unbound from their drivers, the backends closed their ends: the
    # guest's ports wait unbound for dom0, and the records say so (no
    # backend port) and come back as exported.
    from nova_xen_ncm.engine import pvstate
    from nova_xen_ncm.stream import ncm

    vif = dataclasses.replace(
        backend_state(VIF),
        ring_refs=(10, 11),
        event_channels=(16, 17),
        ring_indices={"tx": (5, 5), "rx": (6, 6)},
    )
    ports = base.EventChannelState(
        base.EvtchnAbi.TWO_LEVEL,
        tuple(
            base.EventChannel(p, base.EvtchnType.UNBOUND, 0, remote_domid=0)
            for p in (15, 16, 17)
        ),
    )
    xs = base.XenstoreState((), (), (), store_port=1, store_gfn=2)
    codec = ncm.PvDeviceCodec()
    for backend in (backend_state(VBD), vif):
        record = pvstate._pv_device(backend, D, ports, xs)
        record.validate()
        assert {r.backend_port for r in record.rings} == {0}
        back = codec.decode(memoryview(b"".join(codec.encode(record))))
        assert pvstate._host_backend(back) == backend


def test_the_check_before_the_pause_reads_xenstore_only(monkeypatch) -> None:
    """The re-check right before the pause refuses what guest_devices
    refuses, but runs no ``xl list -l``: its time would dirty pages that
    go in the downtime, and an xl failure would end a sound migration."""
    store = Store(
        {
            f"{VIF.frontend}/tx-ring-ref": "10",
            f"{VIF.frontend}/rx-ring-ref": "11",
            f"{VIF.frontend}/event-channel": "16",
        }
    )
    xen = xen_host(monkeypatch, store, [VIF])

    def no_xl(domid):
        raise AssertionError("xl list -l run before the pause")

    monkeypatch.setattr(xen, "libxl_config", no_xl, raising=False)

    def front(host, dev):
        return [
            base.XenstoreNode(p, v.encode(), ())
            for p, v in store.values.items()
            if p.startswith(dev.frontend + "/")
        ]

    monkeypatch.setattr(pvctx, "frontend_nodes", front)
    xen.check_devices(D)
    store.values[f"{VIF.frontend}/multi-queue-num-queues"] = "2"
    with pytest.raises(base.NotSupported, match="vif 0.*uses 2 queues"):
        xen.check_devices(D)
