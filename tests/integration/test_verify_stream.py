"""Streams our Encoder writes with Xen's record types pass Xen's verifier.

``verify-stream-v2`` (Debian ``xen-utils-4.17``) is Xen's own checker of
the libxc and libxl stream formats. Without it the test is skipped, except
under CI (``CI=true``), where a missing verifier is a failure.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import numpy as np
import pytest

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream.decoder import decode
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join

pytestmark = pytest.mark.integration

XEN_LIB = pathlib.Path("/usr/lib/xen-4.17")
VERIFY = XEN_LIB / "bin" / "verify-stream-v2"


@pytest.fixture
def verify(tmp_path):
    if not VERIFY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VERIFY} is missing (install xen-utils-4.17)")
        pytest.skip(f"{VERIFY} is not installed")

    def run(data: bytes, fmt: str) -> subprocess.CompletedProcess:
        # A file, not a pipe: the verifier takes a short read on a pipe
        # for a truncated stream.
        path = tmp_path / f"stream.{fmt}"
        path.write_bytes(data)
        env = dict(os.environ, PYTHONPATH=str(XEN_LIB / "lib" / "python"))
        return subprocess.run(
            [str(VERIFY), "-v", "-f", fmt, "-i", str(path)],
            capture_output=True,
            env=env,
            timeout=120,
        )

    return run


def xen_encoder() -> Encoder:
    """Only Xen's own record types, as stock Xen can restore."""
    return Encoder(
        libxc_table=tables.xen_libxc_table(),
        libxl_table=tables.xen_libxl_table(),
    )


def hvm_libxc(enc: Encoder) -> list:
    """An x86 HVM libxc stream in the layout of the libxc spec's
    "x86 HVM Guest", with full 1024-page batches."""
    rng = np.random.default_rng(7)
    cpuid = np.array(
        [(0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69)],
        dtype=libxc.CPUID_LEAF,
    )
    msr = np.array([(0xCE, 0, 0)], dtype=libxc.MSR_ENTRY)
    out = enc.libxc_headers(libxc.DOMAIN_X86_HVM)
    out += enc.libxc("X86_CPUID_POLICY", cpuid)
    out += enc.libxc("X86_MSR_POLICY", msr)
    out += enc.libxc("STATIC_DATA_END")
    memory = rng.integers(0, 256, size=1536 * 4096, dtype=np.uint8)
    pages = [memoryview(page) for page in memory.reshape(1536, 4096)]
    types = np.zeros(2048, dtype=np.uint8)
    types[1536:] = libxc.XTAB
    for start in (0, 1024):
        batch = slice(start, start + 1024)
        with_data = np.flatnonzero(types[batch] == 0) + start
        out += enc.page_data(
            np.arange(start, start + 1024, dtype=np.uint64),
            types[batch],
            [pages[i] for i in with_data],
        )
    out += enc.page_data(
        [0xFEFF0, 0xFEFF1, 0xFEFF2],
        [libxc.XALLOC, libxc.BROKEN, libxc.NOTAB],
        bytes(4096),
    )
    out += enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 2599997, 10**9, 1))
    out += enc.libxc(
        "HVM_PARAMS",
        [libxc.HvmParam(1, 0xFEFFC), libxc.HvmParam(2, 1)],
    )
    out += enc.libxc(
        "HVM_CONTEXT",
        libxc.HvmContext(
            [
                libxc.HvmSaveDescriptor(1, 0, memoryview(bytes(24))),
                libxc.HvmSaveDescriptor(2, 0, memoryview(bytes(1032))),
                libxc.HvmSaveDescriptor(0, 0, memoryview(b"")),
            ]
        ),
    )
    out += enc.libxc("END")
    return out


def pv_libxc(enc: Encoder) -> list:
    """An x86 PV libxc stream (libxc spec "x86 PV Guest")."""
    out = enc.libxc_headers(libxc.DOMAIN_X86_PV)
    out += enc.libxc("X86_PV_INFO", libxc.X86PvInfo(8, 4))
    out += enc.libxc("STATIC_DATA_END")
    out += enc.libxc(
        "X86_PV_P2M_FRAMES",
        libxc.X86PvP2mFrames(0, 511, np.array([77], dtype=np.uint64)),
    )
    out += enc.page_data([77, 78], [libxc.NOTAB, libxc.L1TAB_PIN], bytes(8192))
    out += enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(1, 1000000, 5, 2))
    out += enc.libxc("SHARED_INFO", memoryview(bytes(4096)))
    for name in ("BASIC", "EXTENDED", "XSAVE", "MSRS"):
        out += enc.libxc(
            f"X86_PV_VCPU_{name}", libxc.X86PvVcpu(0, memoryview(bytes(40)))
        )
    out += enc.libxc("END")
    return out


def libxl_stream(enc: Encoder, libxc_part: list) -> list:
    # No EMULATOR_XENSTORE_DATA: the 4.17 verifier compares a byte of it
    # with a str under Python 3 and refuses every such record.
    out = enc.libxl_header() + enc.libxl("LIBXC_CONTEXT") + libxc_part
    out += enc.libxl(
        "EMULATOR_CONTEXT",
        libxl.EmulatorContext(
            libxl.EMULATOR_QEMU_UPSTREAM, 0, memoryview(b"QEVM" + bytes(99))
        ),
    )
    return out + enc.libxl("END")


def xl_file(enc: Encoder, libxc_part: list) -> list:
    config = b'{"c_info": {"type": "hvm", "name": "guest"}}'
    return enc.xl_header(config) + libxl_stream(enc, libxc_part)


STREAMS = {
    "libxc-hvm": ("libxc", lambda enc: hvm_libxc(enc)),
    "libxc-pv": ("libxc", lambda enc: pv_libxc(enc)),
    "libxl-hvm": ("libxl", lambda enc: libxl_stream(enc, hvm_libxc(enc))),
    "xl-hvm": ("xl", lambda enc: xl_file(enc, hvm_libxc(enc))),
    "xl-pv": ("xl", lambda enc: xl_file(enc, pv_libxc(enc))),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_encoded_stream_passes_verify_stream_v2(verify, name):
    fmt, build = STREAMS[name]
    data = join(build(xen_encoder()))
    result = verify(data, fmt)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"Stream Error" not in result.stderr
    # What Xen accepts, we decode to the same end.
    records = decode(data, fmt)
    assert records[-1].name == "END" and records[0].layer == fmt


@pytest.mark.parametrize("fmt", ["libxc", "xl"])
def test_verifier_rejects_a_damaged_stream(verify, fmt):
    """The check above can fail: damage one pfn's type and Xen refuses."""
    enc = xen_encoder()
    parts = hvm_libxc(enc) if fmt == "libxc" else xl_file(enc, hvm_libxc(enc))
    data = bytearray(join(parts))
    full_batch = 8 + 1024 * (8 + 4096)
    first_pfn = data.index(libxc.RHDR.pack(libxc.PAGE_DATA, full_batch))
    data[first_pfn + 16 + 7] = 0x50  # page type 5 is reserved
    result = verify(bytes(data), fmt)
    assert result.returncode != 0
    assert b"Invalid type" in result.stderr
