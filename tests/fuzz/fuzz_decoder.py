#!/usr/bin/env python3
"""Fuzz the stream decoder.

Run by hand for as long as you like (libFuzzer options pass through)::

    python tests/fuzz/fuzz_decoder.py -max_total_time=600 [CORPUS_DIR]

The test suite runs it for a few seconds (tests/unit/stream/test_fuzz.py)
and drives :func:`check` with hypothesis too.

Each input either is a stream as it stands or, when its first octet is
odd, a list of edits applied to one of a few valid seed streams (xl, libxl
and libxc layers, optional records, a checkpoint), so that the fuzzer
spends its time deep inside valid streams rather than on the magic. The
oracle: decoding raises StreamError and nothing else, and whatever is
accepted encodes back to the octets it was decoded from.
"""

from __future__ import annotations

import contextlib
import struct
import sys

import numpy as np

if __name__ == "__main__":
    import atheris

    # Coverage feedback from the project's code only (instrumenting every
    # loaded module takes minutes).
    _instrumented = atheris.instrument_imports(include=["nova_xen_ncm"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from nova_xen_ncm.stream import libxc
    from nova_xen_ncm.stream import libxl
    from nova_xen_ncm.stream.decoder import NEED_DATA
    from nova_xen_ncm.stream.decoder import STREAM_END
    from nova_xen_ncm.stream.decoder import Decoder
    from nova_xen_ncm.stream.encoder import Encoder
    from nova_xen_ncm.stream.encoder import join
    from nova_xen_ncm.stream.errors import StreamError


def _seed(fmt: str, *, optional: bool, checkpoint: bool) -> bytes:
    enc = Encoder()
    xc = enc.libxc_headers()
    xc += enc.libxc(
        "X86_CPUID_POLICY",
        np.array([(7, 0, 1, 2, 3, 4)], dtype=libxc.CPUID_LEAF),
    )
    xc += enc.libxc("STATIC_DATA_END")
    xc += enc.page_data(
        [1, 2, 3], [libxc.NOTAB, libxc.XTAB, libxc.L1TAB], bytes(8192)
    )
    if optional:
        xc += [libxc.RHDR.pack(0x80000001, 3), b"abc\0\0\0\0\0"]
    if checkpoint:
        xc += enc.libxc("CHECKPOINT") + enc.libxl("CHECKPOINT_END")
    xc += enc.libxc("X86_TSC_INFO", libxc.X86TscInfo(0, 1, 2, 3))
    xc += enc.libxc(
        "HVM_CONTEXT",
        libxc.HvmContext(
            [
                libxc.HvmSaveDescriptor(1, 0, memoryview(bytes(24))),
                libxc.HvmSaveDescriptor(0, 0, memoryview(b"")),
            ]
        ),
    )
    xc += enc.libxc("HVM_PARAMS", [libxc.HvmParam(1, 2)])
    xc += enc.libxc("END")
    if fmt == "libxc":
        return join(xc)
    xl_ = enc.libxl_header() + enc.libxl("LIBXC_CONTEXT") + xc
    xl_ += enc.libxl(
        "EMULATOR_XENSTORE_DATA",
        libxl.EmulatorXenstoreData(2, 0, [(b"k", b"v")]),
    )
    xl_ += enc.libxl(
        "EMULATOR_CONTEXT", libxl.EmulatorContext(2, 0, memoryview(b"q"))
    )
    xl_ += enc.libxl("END")
    if fmt == "libxl":
        return join(xl_)
    return join(enc.xl_header(b"{}") + xl_)


SEEDS = [
    _seed(fmt, optional=optional, checkpoint=checkpoint and fmt != "libxc")
    for fmt in ("xl", "libxl", "libxc")
    for optional in (False, True)
    for checkpoint in (False, True)
]

_EDIT = struct.Struct("<HB")


def mutate(data: bytes) -> bytes:
    """The stream an input stands for (see the module docstring)."""
    if not data or not data[0] & 1:
        return data[1:]
    stream = bytearray(SEEDS[(data[0] >> 1) % len(SEEDS)])
    edits = data[1:]
    for i in range(0, len(edits) - _EDIT.size + 1, _EDIT.size):
        where, value = _EDIT.unpack_from(edits, i)
        # Mostly overwrite; sometimes cut the stream short there.
        if value == 0xFF and where % 7 == 0:
            del stream[where % (len(stream) + 1) :]
        elif stream:
            stream[where % len(stream)] = value
    return bytes(stream)


def check(data: bytes, chunk: int = 0) -> None:
    """Decode ``data`` fed in ``chunk``-octet pieces (all at once if 0);
    fail on any exception but StreamError, and on an accepted record that
    does not encode back to its octets."""
    decoder = Decoder("auto")
    records = []
    try:
        step = chunk or max(len(data), 1)
        for start in range(0, len(data), step):
            decoder.feed(data[start : start + step])
            records += decoder.records()
        decoder.close()
        while (record := decoder.next_record()) is not STREAM_END:
            assert record is not NEED_DATA, "NEED_DATA after close()"
            records.append(record)
    except StreamError:
        return
    enc = Encoder()
    for record in records:
        if record.skipped or record.name == "XL_HEADER":
            continue
        if record.rtype.is_header:
            out = join(record.rtype.codec.encode(record.value))
            size = len(out)
        else:
            if (record.name, record.length) in _NON_CANONICAL:
                continue
            out = join(enc.record_of(record.rtype, record.value))
            size = 8 + (record.length + 7) // 8 * 8
        original = data[record.offset : record.offset + size]
        assert out == original, f"{record.name} at {record.offset:#x}"


# Bodies the spec allows that we write differently: an empty HVM_PARAMS
# (errata 1) and a CHECKPOINT_STATE padded inside its body.
_NON_CANONICAL = {("HVM_PARAMS", 0), ("CHECKPOINT_STATE", 8)}


def one_input(data: bytes) -> None:
    stream = mutate(data)
    # The last octet picks how the stream is cut into fed chunks.
    check(stream, chunk=data[-1] * 61 if data else 0)


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
