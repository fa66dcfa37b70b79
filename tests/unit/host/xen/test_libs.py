"""Errors of the Xen libraries name the call and errno."""

from __future__ import annotations

import ctypes
import errno

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import libs


def fail_with(err: int) -> None:
    ctypes.set_errno(err)


def test_check_passes_success_through() -> None:
    assert libs.check("xc_domain_pause", 0) == 0
    assert libs.check("xc_domain_hvm_getcontext", 4112) == 4112
    assert libs.check_ptr("xs_open", 1234) == 1234


def test_failure_names_call_and_errno() -> None:
    fail_with(errno.EPERM)
    with pytest.raises(libs.XenCallError) as info:
        libs.check("xc_shadow_control", -1, domid=3)
    assert info.value.call == "xc_shadow_control"
    assert info.value.errno == errno.EPERM
    assert str(info.value).startswith("xc_shadow_control: ")
    assert "(errno 1)" in str(info.value)


@pytest.mark.parametrize("err", [errno.ESRCH, errno.ENOENT])
def test_missing_domain_is_domain_not_found(err: int) -> None:
    fail_with(err)
    with pytest.raises(base.DomainNotFound, match="domain 42") as info:
        libs.check("xc_domain_pause", -1, domid=42)
    assert info.value.errno == err


def test_null_pointer_fails() -> None:
    fail_with(errno.EACCES)
    with pytest.raises(libs.XenCallError, match="xs_open") as info:
        libs.check_ptr("xs_open", None)
    assert info.value.errno == errno.EACCES


def test_unknown_spelling() -> None:
    with pytest.raises(ValueError, match="no ctypes type"):
        libs.ctype("struct nothing *")


def test_structure_sizes_follow_the_headers() -> None:
    # Sizes of the public structs on x86_64 (the headers' layouts).
    assert ctypes.sizeof(libs.XenDomctlGetDomainInfo) == 112
    assert ctypes.sizeof(libs.EvtchnStatus) == 24
    assert ctypes.sizeof(libs.XenSysctlPhysinfo) == 112
    assert ctypes.sizeof(libs.CpuidLeaf) == 24
    assert ctypes.sizeof(libs.MsrEntry) == 16
    assert libs.EvtchnStatus.port.offset == 4
    assert libs.XenDomctlGetDomainInfo.handle.offset == 76


def test_missing_library(monkeypatch) -> None:
    monkeypatch.setitem(
        libs.LIBRARIES, "nosuch", (("libnosuch-xen.so.9",), ("x.h",))
    )
    with pytest.raises(libs.LibraryMissing, match="cannot load libnosuch"):
        libs.library("nosuch")
