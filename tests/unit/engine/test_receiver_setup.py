"""The destination's SETUP refusal names the host's own reasons."""

from __future__ import annotations

import types

import pytest

from nova_xen_ncm.engine import receiver
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.host import base

REASON = "start the service with LIBXL_DOMID_REUSE_TIMEOUT=0"


def _check(restore: dict, preserve_domid: bool) -> None:
    caps = base.Capabilities(
        host="h",
        hypervisor="Xen 4.17",
        restore=restore,
        preserve_domid=preserve_domid,
    )
    rx = object.__new__(receiver.Receiver)
    rx.host = types.SimpleNamespace(capabilities=lambda: caps)
    setup = types.SimpleNamespace(pv_drivers=False, required=())
    rx._check(setup)


@pytest.mark.parametrize(
    ("reason", "named"),
    [(REASON, REASON), (None, "this host cannot choose domids")],
)
def test_a_host_that_cannot_keep_domids_says_why(reason, named) -> None:
    restore = {item: None for item in base.Item}
    restore[base.Item.DOMID] = reason
    with pytest.raises(Refused, match=f"domid: {named}"):
        _check(restore, preserve_domid=False)


def _devices(tmp_path, *devices, bridges=("xenbr0",)):
    import json

    from nova_xen_ncm.engine import messages

    rx = object.__new__(receiver.Receiver)
    rx.host = types.SimpleNamespace(hostname="dest")
    rx.opts = types.SimpleNamespace(
        migration_disk_dirs=[str(tmp_path / "shared")],
        migration_bridges=list(bridges),
    )
    setup = types.SimpleNamespace(
        device_fields=lambda: [json.loads(json.dumps(d)) for d in devices]
    )
    return rx._devices(setup), messages


def vbd(target):
    return {"kind": "vbd", "devid": 51712, "mac": None,
            "extra": {"target": target, "format": "raw"}}  # fmt: skip


def test_a_migrating_disk_is_taken_only_under_the_shared_dirs(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "disk").write_bytes(b"")
    (shared / "link").symlink_to(tmp_path / "elsewhere")
    vif = {"kind": "vif", "devid": 0, "mac": "00:16:3e:00:00:01",
           "extra": {"bridge": "xenbr0"}}  # fmt: skip
    (disk, net), _ = _devices(tmp_path, vbd(str(shared / "disk")), vif)
    assert disk == base.DeviceConfig(
        kind="vbd",
        devid=51712,
        extra={"target": str(shared / "disk"), "format": "raw"},
    )
    assert net.mac == "00:16:3e:00:00:01" and net.extra == {"bridge": "xenbr0"}
    # Outside, through a link, relative: refused by name.
    for target in ("/etc/shadow", str(shared / "link"), "shared/disk"):
        with pytest.raises(Refused, match="migration_disk_dirs"):
            _devices(tmp_path, vbd(target))
    with pytest.raises(Refused, match="bridge 'xenbr0' .*migration_bridges"):
        _devices(tmp_path, vif, bridges=("ncmbr0",))


@pytest.mark.parametrize(
    ("version", "pv_drivers", "named"),
    [(2, True, True), (1, True, True), (3, True, False), (2, False, False)],
)
def test_a_source_that_cannot_name_devices_is_refused_a_pv_guest(
    version, pv_drivers, named
) -> None:
    # A host whose backends are created from SETUP's device records: a
    # source speaking an earlier version sends none, so a guest with PV
    # drivers is refused there, as a previous release's destination did.
    caps = base.Capabilities(
        host="h",
        hypervisor="Xen 4.17",
        restore={item: None for item in base.Item},
        devices_named_at_setup=True,
    )
    rx = object.__new__(receiver.Receiver)
    rx.host = types.SimpleNamespace(capabilities=lambda: caps)
    rx._channel = types.SimpleNamespace(
        connection=types.SimpleNamespace(version=version)
    )
    setup = types.SimpleNamespace(pv_drivers=pv_drivers, required=())
    if named:
        with pytest.raises(
            Refused, match=f"pv_devices: .* protocol version {version}, "
        ):
            rx._check(setup)
    else:
        with pytest.raises(AttributeError, match="domain_info"):
            # Past the capability check, to the domid's (not faked here).
            rx._check(setup)


@pytest.mark.parametrize(
    ("kind", "extra", "named"),
    [
        # A hotplug script of the source's would run as root here.
        ("vif", {"bridge": "xenbr0", "script": "/tmp/x"}, "script is not"),
        ("vif", {"bridge": "xenbr0", "backend": "1", "ip": "1"}, "are not"),
        # Another format: another backend (QEMU) opens the file.
        ("vbd", {"format": "qcow2"}, "format is not"),
        ("vbd", {"backendtype": "qdisk"}, "backendtype is not"),
    ],
)
def test_a_device_names_nothing_but_its_disk_or_bridge(
    tmp_path, kind, extra, named
):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "disk").write_bytes(b"")
    if kind == "vbd":
        dev = vbd(str(shared / "disk"))
        dev["extra"].update(extra)
    else:
        dev = {"kind": "vif", "devid": 0, "mac": None, "extra": extra}
    with pytest.raises(Refused, match=named):
        _devices(tmp_path, dev)
