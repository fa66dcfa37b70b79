"""Refusals in setup: nothing moves, the guest runs on."""

from __future__ import annotations

import dataclasses

import pytest

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import DEVICES
from .conftest import guest_config


def running(host, domid):
    return host.domain_info(domid).state == base.DomainState.RUNNING


def test_wrong_token_is_refused(conf, source, destination, migration):
    # A wrong proof does not end the destination's wait (anyone may know
    # the migration id): it waits for the source until accept_timeout,
    # then fails naming the refusal.
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    m.sender.data.token = handshake.generate_token()
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, (Refused, AuthenticationError))
    assert m.receiver.state.phase is Phase.FAILED
    assert "wrong token proof" in str(m.receiver.error)
    assert m.source_events.phases() == ["rollback", "failed"]
    assert running(source, domid)
    assert destination.list_domains() == []


def test_missing_capability_is_refused(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    caps = destination.capabilities()
    restore = dict(caps.restore)
    restore[base.Item.EVENT_CHANNELS] = "VIRQ bindings cannot be restored"
    monkeypatch.setattr(
        destination,
        "capabilities",
        lambda: base.Capabilities(
            host=caps.host, hypervisor=caps.hypervisor, restore=restore
        ),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "VIRQ bindings cannot be restored" in m.sender.error.text
    assert running(source, domid)
    assert destination.list_domains() == []


def booted_from(monkeypatch, source, domid, kernel, ramdisk=None):
    """The source's libxl configuration names a directly booted kernel."""
    b_info = {"kernel": kernel, "ramdisk": ramdisk, "cmdline": "nopv"}
    monkeypatch.setattr(
        source,
        "libxl_config",
        lambda d: {"b_info": b_info} if d == domid else None,
    )


@pytest.fixture
def boot_dir(tmp_path, conf):
    """The destination's only directory of boot files, with a kernel."""
    path = tmp_path / "boot"
    path.mkdir()
    (path / "vmlinuz").write_bytes(b"k")
    conf.set_override("direct_boot_dirs", [str(path)], group="xen_ncm")
    return path


@pytest.mark.parametrize(
    "kernel, words",
    [
        # The device model would serve any of these to the guest.
        ("{tmp}/secret", "outside the directories"),
        ("{boot}/../secret", "outside the directories"),
        ("{boot}/link", "outside the directories"),
        # Found at SETUP, not by the device model during the downtime.
        ("{boot}/vmlinuz-gone", "not a file on this host"),
        ("{boot}", "not a file on this host"),
    ],
)
def test_a_boot_file_the_destination_does_not_allow_is_refused(
    monkeypatch,
    tmp_path,
    boot_dir,
    source,
    destination,
    migration,
    kernel,
    words,
):
    (tmp_path / "secret").write_bytes(b"dom0's own")
    (boot_dir / "link").symlink_to(tmp_path / "secret")
    kernel = kernel.format(tmp=tmp_path, boot=boot_dir)
    domid = source.create_domain(guest_config())
    booted_from(monkeypatch, source, domid, kernel)
    created = []
    monkeypatch.setattr(
        destination, "create_empty_domain", lambda *a: created.append(a)
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "bad-request"
    assert words in m.sender.error.text
    assert repr(kernel) in m.sender.error.text
    assert "[xen_ncm] direct_boot_dirs" in m.sender.error.text
    assert created == []
    assert running(source, domid)
    assert destination.list_domains() == []


def test_a_ramdisk_outside_the_allowed_directories_is_refused(
    monkeypatch, tmp_path, boot_dir, source, destination, migration
):
    domid = source.create_domain(guest_config())
    booted_from(
        monkeypatch, source, domid, f"{boot_dir}/vmlinuz", "/etc/shadow"
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert "ramdisk '/etc/shadow' is outside" in m.sender.error.text
    assert running(source, domid)
    assert destination.list_domains() == []


def test_a_previous_release_destination(
    monkeypatch, boot_dir, source, destination, migration
):
    # It speaks protocol version 1 only: a guest booted from its disk
    # migrates to it (hosts are upgraded one by one), a directly booted
    # one is refused before SETUP, naming why.
    monkeypatch.setattr(framing, "SUPPORTED_VERSIONS", (1,))
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error

    other = destination.create_domain(guest_config("booted"))
    booted_from(monkeypatch, destination, other, f"{boot_dir}/vmlinuz")
    back = migration(destination, other, source)
    assert back.run() is Phase.FAILED
    assert back.sender.error.code == "missing-capability"
    assert "protocol version 1" in back.sender.error.text
    assert "upgrade it" in back.sender.error.text
    assert running(destination, other)
    assert [d.domid for d in source.list_domains()] == []


def test_a_previous_release_source(
    monkeypatch, source, destination, migration
):
    # It offers protocol version 1 only, whose SETUP has no kernel.
    hello = framing.Connection.send_hello
    versions = []

    def offering_1(self, *args, **kwargs):
        kwargs["versions"] = (1,)
        return hello(self, *args, **kwargs)

    challenge = framing.Connection.send_challenge

    def recording(self, *args, **kwargs):
        out = challenge(self, *args, **kwargs)
        versions.append(self.version)
        return out

    monkeypatch.setattr(framing.Connection, "send_hello", offering_1)
    monkeypatch.setattr(framing.Connection, "send_challenge", recording)
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    assert versions and set(versions) == {1}
    assert running(destination, domid)


@pytest.mark.parametrize(
    ("side", "definition", "named"),
    [
        # A destination whose memory digest is defined otherwise.
        ("destination", "xxh3-128-of-the-whole-physmap", "destination as"),
        # A source of a release that names no definition.
        ("source", "", "source digests memory as an earlier release"),
        # A Xen source of the release before the block sum (every page
        # read at the pause): named as such.
        (
            "source",
            "xxh3-128-populated-pfns-then-nonzero-pages",
            "source digests memory as "
            "xxh3-128-populated-pfns-then-nonzero-pages does",
        ),
    ],
)
def test_a_peer_that_digests_memory_otherwise_is_refused_at_setup(
    source, destination, migration, monkeypatch, side, definition, named
):
    """Equal memory digested two ways compares unequal: refused at SETUP
    (nothing moved), not a mismatch in the downtime."""
    domid = source.create_domain(guest_config())
    host = source if side == "source" else destination
    caps = host.capabilities
    monkeypatch.setattr(
        host,
        "capabilities",
        lambda: dataclasses.replace(caps(), memory_digest=definition),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "memory-digest" in m.sender.error.text
    assert named in m.sender.error.text
    assert m.source_events.phases() == ["rollback", "failed"]
    assert running(source, domid)
    assert destination.list_domains() == []
    assert m.sender.stats.to_dict()["pages_sent"] == 0


def with_devices(monkeypatch, source, domid, target):
    """The source's host names a disk and a vif for the destination to
    create (the Xen host's guest_devices)."""
    devs = (
        base.DeviceConfig(
            "vbd", 51712, extra={"target": target, "format": "raw"}
        ),
        base.DeviceConfig(
            "vif", 0, mac="00:16:3e:4e:43:4d", extra={"bridge": "xenbr0"}
        ),
    )
    monkeypatch.setattr(
        source, "guest_devices", lambda d: devs if d == domid else ()
    )


def test_the_guests_devices_are_created_with_the_domain_or_refused(
    monkeypatch, tmp_path, conf, source, destination, migration
):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "disk").write_bytes(b"")
    conf.set_override("migration_disk_dirs", [str(shared)], group="xen_ncm")
    domid = source.create_domain(guest_config())
    # A disk outside the shared directories: refused before any domain.
    with_devices(monkeypatch, source, domid, "/etc/shadow")
    created = []
    monkeypatch.setattr(
        destination, "create_empty_domain", lambda *a: created.append(a)
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "bad-request"
    assert "'/etc/shadow' is outside" in m.sender.error.text
    assert "migration_disk_dirs" in m.sender.error.text
    assert created == [] and running(source, domid)

    # One inside: the destination's host gets both devices, and its
    # refusal (no such disk on this host, say) is the SETUP's.
    with_devices(monkeypatch, source, domid, f"{shared}/disk")

    def no_disk(config, domid):
        created.append(config.devices)
        raise base.NotSupported("vbd 51712: its medium is not on this host")

    monkeypatch.setattr(destination, "create_empty_domain", no_disk)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "its medium is not on this host" in m.sender.error.text
    ((vbd, vif),) = created
    assert vbd.extra == {"target": f"{shared}/disk", "format": "raw"}
    assert (vif.mac, vif.extra) == ("00:16:3e:4e:43:4d", {"bridge": "xenbr0"})
    assert running(source, domid)


def test_a_destination_that_cannot_create_devices_is_refused(
    monkeypatch, source, destination, migration
):
    # Protocol version 2 has no room for them in SETUP.
    monkeypatch.setattr(framing, "SUPPORTED_VERSIONS", (1, 2))
    domid = source.create_domain(guest_config())
    with_devices(monkeypatch, source, domid, "/srv/disk")
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "cannot name the guest's PV devices" in m.sender.error.text
    assert running(source, domid)
    assert destination.list_domains() == []


@pytest.mark.parametrize("side", ["destination", "source"])
def test_a_version_2_peer_migrates_a_guest_no_device_record_names(
    monkeypatch, source, destination, migration, side
):
    # Hosts are upgraded one by one: a guest whose devices SETUP need not
    # name (here the simulated host's, carried in the stream; on Xen, one
    # without blkfront and netfront) moves to and from a previous release
    # speaking version 2, which is what is negotiated.
    versions = []
    if side == "destination":
        monkeypatch.setattr(framing, "SUPPORTED_VERSIONS", (1, 2))
    else:
        hello = framing.Connection.send_hello

        def offering_2(self, *args, **kwargs):
            kwargs["versions"] = (1, 2)
            return hello(self, *args, **kwargs)

        monkeypatch.setattr(framing.Connection, "send_hello", offering_2)
    challenge = framing.Connection.send_challenge

    def recording(self, *args, **kwargs):
        out = challenge(self, *args, **kwargs)
        versions.append(self.version)
        return out

    monkeypatch.setattr(framing.Connection, "send_challenge", recording)
    domid = source.create_domain(guest_config(devices=DEVICES))
    assert source.domain_info(domid).pv_drivers
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert m.receiver.state.phase is Phase.DONE, m.receiver.error
    assert versions and set(versions) == {2}
    assert running(destination, domid)


def test_a_version_2_source_is_refused_a_guest_whose_devices_setup_names(
    monkeypatch, source, destination, migration
):
    # A destination whose backends are created from SETUP's device
    # records (patched Xen): a previous release's source names none, so
    # its guest with PV drivers is refused at SETUP, nothing created,
    # rather than failing in the downtime; from a version-3 source the
    # same guest is taken.
    caps = destination.capabilities()
    monkeypatch.setattr(
        destination,
        "capabilities",
        lambda: dataclasses.replace(caps, devices_named_at_setup=True),
    )
    hello = framing.Connection.send_hello

    def offering_2(self, *args, **kwargs):
        kwargs["versions"] = (1, 2)
        return hello(self, *args, **kwargs)

    monkeypatch.setattr(framing.Connection, "send_hello", offering_2)
    domid = source.create_domain(guest_config(devices=DEVICES))
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "protocol version 2" in m.sender.error.text
    assert "cannot name the guest's PV devices" in m.sender.error.text
    assert running(source, domid)
    assert destination.list_domains() == []
    assert m.sender.stats.to_dict()["pages_sent"] == 0

    monkeypatch.setattr(framing.Connection, "send_hello", hello)
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error
    assert running(destination, domid)
