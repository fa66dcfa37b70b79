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
