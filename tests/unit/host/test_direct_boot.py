"""A guest's directly booted kernel, as its host's configuration says."""

from __future__ import annotations

import pytest

from nova_xen_ncm.host import base


class _Configured:
    """Only the configuration lookup of a host."""

    direct_boot = base.HostDriver.direct_boot

    def __init__(self, config: dict | None) -> None:
        self.config = config

    def libxl_config(self, domid: int) -> dict | None:
        return self.config


def test_the_kernel_is_read_from_libxl_build_info() -> None:
    host = _Configured(
        {"b_info": {"kernel": "/k", "ramdisk": "/i", "cmdline": "nopv"}}
    )
    assert host.direct_boot(3) == base.DirectBoot("/k", "/i", "nopv")
    # A disk boot, and a host that keeps no libxl configuration.
    assert _Configured({"b_info": {"ramdisk": "/i"}}).direct_boot(3) is None
    assert _Configured(None).direct_boot(3) is None


def test_a_kernel_named_wrongly_is_a_host_error() -> None:
    host = _Configured({"b_info": {"kernel": "/k", "cmdline": 7}})
    with pytest.raises(base.HostError, match="cmdline 7 is not a string"):
        host.direct_boot(3)


def test_a_relative_path_in_build_info_is_a_host_error() -> None:
    host = _Configured({"b_info": {"kernel": "/k", "ramdisk": "i.gz"}})
    with pytest.raises(base.HostError, match="'i.gz' is not an absolute"):
        host.direct_boot(3)


def test_confined_gives_real_paths_under_the_allowed_directories(
    tmp_path,
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1").write_bytes(b"k")
    (boot / "vmlinuz").symlink_to("vmlinuz-6.1")
    (boot / "i.gz").write_bytes(b"i")
    got = base.DirectBoot(f"{boot}/vmlinuz", f"{boot}/i.gz", "nopv").confined(
        [str(tmp_path / "elsewhere"), f"{boot}/"]
    )
    assert got == base.DirectBoot(
        f"{boot}/vmlinuz-6.1", f"{boot}/i.gz", "nopv"
    )
    # A directory whose name begins like an allowed one is another.
    (tmp_path / "boot2").mkdir()
    (tmp_path / "boot2" / "k").write_bytes(b"k")
    with pytest.raises(ValueError, match="outside the directories"):
        base.DirectBoot(f"{tmp_path}/boot2/k").confined([str(boot)])


def test_confined_tells_nothing_of_files_outside(tmp_path) -> None:
    # Refused as outside whether or not the file exists.
    (tmp_path / "there").write_bytes(b"x")
    for name in ("there", "not-there"):
        with pytest.raises(ValueError, match="outside .*\\(none\\)"):
            base.DirectBoot(str(tmp_path / name)).confined([])
    with pytest.raises(ValueError, match="not an absolute path"):
        base.DirectBoot("k").confined(["/"])
