"""Shared material for the stream tests: the real ``xl save`` image and a
builder of small streams written by our Encoder."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import zstandard

from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import records
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join

FIXTURE = pathlib.Path("/work/shared/fixtures/xen-4.17/xl-save-hvm32m.img.zst")
FIXTURE_SIZE = 41_923_224


@pytest.fixture(scope="session")
def xl_save_image() -> bytes:
    """The decompressed ``xl save`` image of Xen 4.17 (see its README)."""
    if not FIXTURE.exists():
        pytest.fail(f"fixture {FIXTURE} is missing")
    with FIXTURE.open("rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        data = reader.read()
    assert len(data) == FIXTURE_SIZE
    return data


def page(fill: int) -> bytes:
    return bytes([fill]) * libxc.PAGE_SIZE


def hvm_context() -> libxc.HvmContext:
    mv = memoryview
    return libxc.HvmContext(
        [
            libxc.HvmSaveDescriptor(1, 0, mv(bytes(range(24)))),
            libxc.HvmSaveDescriptor(2, 0, mv(b"\x11" * 1032)),
            libxc.HvmSaveDescriptor(3, 1, mv(b"\x22" * 8)),
            libxc.HvmSaveDescriptor(0, 0, mv(b"")),
        ]
    )


def build_stream(
    fmt: str = "xl",
    *,
    optional: bool = False,
    checkpoint: bool = False,
    encoder: Encoder | None = None,
) -> bytes:
    """A small x86 HVM stream in the layout ``xl save`` writes.

    ``optional`` adds an unknown optional record to each layer;
    ``checkpoint`` splits the libxc part with a CHECKPOINT (libxl records up
    to CHECKPOINT_END, then libxc resumes), as a checkpointed stream does.
    """
    enc = encoder or Encoder()
    cpuid = np.array([(0, 0xFFFFFFFF, 0xD, 1, 2, 3)], dtype=libxc.CPUID_LEAF)
    msr = np.array([(0xCE, 0, 0x80000000)], dtype=libxc.MSR_ENTRY)
    xc = enc.libxc_headers()
    xc += enc.libxc("X86_CPUID_POLICY", cpuid)
    xc += enc.libxc("X86_MSR_POLICY", msr)
    xc += enc.libxc("STATIC_DATA_END")
    xc += enc.page_data(
        [0, 1, 2, 0xFEFFF],
        [libxc.NOTAB, libxc.XTAB, libxc.NOTAB, libxc.XALLOC],
        [page(0xAA), page(0xBB)],
    )
    if optional:
        xc += _optional_record(0x80000123, b"libxc extra")
    if checkpoint:
        xc += enc.libxc("CHECKPOINT")
        xc += enc.libxl(
            "EMULATOR_CONTEXT",
            libxl.EmulatorContext(2, 0, memoryview(b"qemu-cp")),
        )
        xc += enc.libxl("CHECKPOINT_END")
    xc += enc.page_data([3], [libxc.NOTAB], page(0xCC))
    xc += enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 2599997, 123, 1))
    xc += enc.libxc("HVM_CONTEXT", hvm_context())
    xc += enc.libxc(
        "HVM_PARAMS", [libxc.HvmParam(1, 0xFEFFC), libxc.HvmParam(2, 5)]
    )
    xc += enc.libxc("END")
    if fmt == "libxc":
        return join(xc)
    xl_ = enc.libxl_header() + enc.libxl("LIBXC_CONTEXT") + xc
    if optional:
        xl_ += _optional_record(0x80000456, b"libxl extra!")
    xl_ += enc.libxl(
        "EMULATOR_XENSTORE_DATA",
        libxl.EmulatorXenstoreData(2, 0, [(b"physmap/1", b"ff")]),
    )
    xl_ += enc.libxl(
        "EMULATOR_CONTEXT",
        libxl.EmulatorContext(2, 0, memoryview(b"QEVM" + bytes(6137))),
    )
    xl_ += enc.libxl("END")
    if fmt == "libxl":
        return join(xl_)
    return join(enc.xl_header(b'{"c_info": {"type": "hvm"}}') + xl_)


def _optional_record(rtype: int, body: bytes) -> list[bytes]:
    assert rtype & records.OPTIONAL_BIT
    pad = bytes(-len(body) % 8)
    return [libxc.RHDR.pack(rtype, len(body)), body, pad]


def normalize(value):
    """A value with views and arrays replaced by bytes and lists, so that a
    decoded value compares equal to the value it was encoded from."""
    if isinstance(value, records.Record):
        return (value.layer, value.name, value.length, value.skipped,
                normalize(value.value))  # fmt: skip
    if isinstance(value, libxc.PageData):
        data = value.data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = b"".join(bytes(memoryview(b)) for b in data)
        return (
            np.asarray(value.pfns, dtype=np.uint64).tolist(),
            np.asarray(value.types, dtype=np.uint8).tolist(),
            bytes(data),
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, libxc.HvmContext):
        return normalize(list(value.descriptors))
    if isinstance(value, libxc.X86PvP2mFrames):
        return (value.start_pfn, value.end_pfn, normalize(value.p2m_pfns))
    if isinstance(value, (tuple, list)):
        return [normalize(v) for v in value]
    return value


@pytest.fixture(scope="session")
def stream_builder():
    return build_stream


@pytest.fixture(scope="session")
def norm():
    return normalize
