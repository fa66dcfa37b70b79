"""``nova-xen-ncm inspect``: decode, validate and describe a stream.

Reads an ``xl`` save file, a libxl stream or a libxc stream (zstd-compressed
or not, a file or ``-`` for stdin) in chunks, checks every record against
Xen's specs and the project's, and prints its layout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any
from typing import BinaryIO

import numpy as np

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream.decoder import FORMATS
from nova_xen_ncm.stream.decoder import NEED_DATA
from nova_xen_ncm.stream.decoder import STREAM_END
from nova_xen_ncm.stream.decoder import Decoder
from nova_xen_ncm.stream.errors import StreamError
from nova_xen_ncm.stream.records import Record

CHUNK_SIZE = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Deduplicate the collected pfns once this many are pending, so that
# memory stays proportional to the guest's pfns, not to the rounds sent.
_PFN_BATCH = 1 << 22


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="Decode and validate a migration stream or save file.",
        description=(
            "Decode and validate an xl save file, a libxl v2 stream or a "
            "libxc v3 stream (optionally zstd-compressed) and print its "
            "layout. Exits 0 when the stream is valid."
        ),
    )
    parser.add_argument("file", help="the stream, or - for stdin")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="outermost layer of the stream (default: recognise it)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = Report(args.file)
    try:
        with _open(args.file) as raw:
            inspect_stream(_chunks(raw), args.format, report)
    except StreamError as exc:
        report.error = exc
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc}") from None
    except _ZstdError as exc:
        raise CommandFailed(f"bad zstd data in {args.file}: {exc}") from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(report.as_text())
    if report.error is not None:
        raise CommandFailed(f"invalid stream: {report.error}")
    return 0


class _ZstdError(Exception):
    """The compressed input is corrupt."""


def _open(path: str) -> contextlib.AbstractContextManager[BinaryIO]:
    if path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    return open(path, "rb")


def _chunks(raw: BinaryIO) -> Iterator[bytes]:
    """The stream's bytes in chunks, decompressing zstd transparently."""
    head = raw.read(len(ZSTD_MAGIC))
    if head != ZSTD_MAGIC:
        if head:
            yield head
        while chunk := raw.read(CHUNK_SIZE):
            yield chunk
        return
    yield from _zstd_chunks(head, raw)


def _zstd_chunks(head: bytes, raw: BinaryIO) -> Iterator[bytes]:
    # One decompressor per frame, so that a cut-off last frame is seen
    # (a stream reader would just stop early).
    import zstandard

    frames = zstandard.ZstdDecompressor()
    frame = frames.decompressobj()
    pending = head
    try:
        while True:
            data = pending or raw.read(CHUNK_SIZE)
            pending = b""
            if not data:
                break
            if frame.eof:
                frame = frames.decompressobj()
            out = frame.decompress(data)
            if out:
                yield out
            if frame.eof:
                pending = frame.unused_data
    except zstandard.ZstdError as exc:
        raise _ZstdError(str(exc)) from None
    if not frame.eof:
        raise _ZstdError("the last zstd frame is cut off")


def inspect_stream(
    chunks: Iterator[bytes], format: str, report: Report
) -> Report:
    """Decode ``chunks`` into ``report``; StreamError if invalid."""
    decoder = Decoder(format)
    try:
        for chunk in chunks:
            if decoder.done:
                report.trailing_bytes += len(chunk)
                continue
            decoder.feed(chunk)
            _drain(decoder, report)
        if not decoder.done:
            decoder.close()
            _drain(decoder, report)
    finally:
        report.format = decoder.format
        report.stream_bytes = decoder.offset
        report.trailing_bytes += len(decoder.trailing_data)
    return report


def _drain(decoder: Decoder, report: Report) -> None:
    while True:
        record = decoder.next_record()
        if record is NEED_DATA or record is STREAM_END:
            return
        report.add(record)


class Report:
    """What inspect found in a stream."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.format = "auto"
        self.stream_bytes = 0
        self.trailing_bytes = 0
        self.error: StreamError | None = None
        self.headers: dict[str, dict[str, Any]] = {}
        self.records: dict[tuple[str, str], list[int]] = {}
        self.page_records = 0
        self.pfn_entries = 0
        self.pages_with_data = 0
        self.page_types: collections.Counter[str] = collections.Counter()
        self._pfns: list[np.ndarray] = []
        self._pending_pfns = 0
        self.hvm_contexts: list[dict[str, Any]] = []
        self.hvm_params: list[dict[str, Any]] = []
        self.tsc_info: list[dict[str, int]] = []
        self.emulator_contexts: list[dict[str, Any]] = []
        self.ncm: list[dict[str, Any]] = []
        self._ncm_names = {
            (row.layer, row.name)
            for row in [*ncm.LIBXC_RECORDS, *ncm.LIBXL_RECORDS]
        }

    def add(self, record: Record) -> None:
        if record.rtype.is_header:
            self.headers[record.name] = _header_summary(record)
            return
        key = (record.layer, record.name)
        entry = self.records.setdefault(key, [record.rtype.type, 0, 0])
        entry[1] += 1
        entry[2] += record.length
        if record.skipped:
            return
        value = record.value
        if key == (libxc.LAYER, "PAGE_DATA"):
            self._add_pages(value)
        elif key == (libxc.LAYER, "HVM_CONTEXT"):
            self.hvm_contexts.append(value.summary())
        elif key == (libxc.LAYER, "HVM_PARAMS"):
            self.hvm_params += [
                {"index": p.index, "name": p.name, "value": p.value}
                for p in value
            ]
        elif key == (libxc.LAYER, "X86_TSC_INFO"):
            self.tsc_info.append(value._asdict())
        elif key == (libxl.LAYER, "EMULATOR_CONTEXT"):
            self.emulator_contexts.append(
                {**value.summary(), "record_bytes": record.length}
            )
        elif key in self._ncm_names:
            summary = getattr(value, "summary", None)
            self.ncm.append(
                {
                    "layer": record.layer,
                    "record": record.name,
                    "summary": summary() if callable(summary) else repr(value),
                }
            )

    def _add_pages(self, value: libxc.PageData) -> None:
        self.page_records += 1
        self.pfn_entries += value.count
        self.pages_with_data += int(np.count_nonzero(value.has_data))
        types, counts = np.unique(value.types, return_counts=True)
        for ptype, count in zip(types, counts, strict=True):
            self.page_types[libxc.page_type_name(int(ptype))] += int(count)
        self._pfns.append(np.array(value.pfns))
        self._pending_pfns += value.count
        if self._pending_pfns >= _PFN_BATCH:
            self._pfns = [np.unique(np.concatenate(self._pfns))]
            self._pending_pfns = len(self._pfns[0])

    @property
    def unique_pfns(self) -> int:
        if not self._pfns:
            return 0
        return len(np.unique(np.concatenate(self._pfns)))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "format": self.format,
            "valid": self.error is None,
            "stream_bytes": self.stream_bytes,
            "trailing_bytes": self.trailing_bytes,
            "headers": self.headers,
            "records": [
                {
                    "layer": layer,
                    "name": name,
                    "type": rtype,
                    "count": count,
                    "bytes": size,
                }
                for (layer, name), (rtype, count, size) in self.records.items()
            ],
            "page_data": {
                "records": self.page_records,
                "pfn_entries": self.pfn_entries,
                "unique_pfns": self.unique_pfns,
                "pages_with_data": self.pages_with_data,
                "page_types": dict(sorted(self.page_types.items())),
            },
            "hvm_context": self.hvm_contexts,
            "hvm_params": self.hvm_params,
            "tsc_info": self.tsc_info,
            "emulator_context": self.emulator_contexts,
            "ncm": self.ncm,
        }
        if self.error is not None:
            out["error"] = {
                "message": self.error.message,
                "offset": self.error.offset,
                "record": self.error.record,
            }
        return out

    def as_text(self) -> str:
        d = self.as_dict()
        state = "valid" if self.error is None else "INVALID"
        lines = [
            f"{self.source}: {self.format} stream, "
            f"{self.stream_bytes} bytes, {state}"
        ]
        for name, summary in self.headers.items():
            fields = ", ".join(f"{k} {v}" for k, v in summary.items())
            lines.append(f"{name}: {fields}")
        lines.append("")
        lines.append(
            f"{'layer':<6} {'record':<26} {'type':>10} "
            f"{'count':>8} {'bytes':>12}"
        )
        for rec in d["records"]:
            rtype = f"{rec['type']:#x}"
            lines.append(
                f"{rec['layer']:<6} {rec['name']:<26} {rtype:>10} "
                f"{rec['count']:>8} {rec['bytes']:>12}"
            )
        pages = d["page_data"]
        if pages["records"]:
            lines.append("")
            lines.append(
                f"PAGE_DATA: {pages['records']} records, "
                f"{pages['pfn_entries']} pfn entries, "
                f"{pages['unique_pfns']} unique pfns, "
                f"{pages['pages_with_data']} pages with data"
            )
            types = ", ".join(
                f"{name} {n}" for name, n in pages["page_types"].items()
            )
            lines.append(f"  page types: {types}")
        for ctx in self.hvm_contexts:
            types = ", ".join(f"{k} {v}" for k, v in ctx["types"].items())
            lines.append(
                f"HVM_CONTEXT: {ctx['descriptors']} descriptors then END: "
                f"{types}"
            )
        if self.hvm_params:
            lines.append(f"HVM_PARAMS: {len(self.hvm_params)} params")
            for p in self.hvm_params:
                lines.append(f"  {p['name']} ({p['index']}) = {p['value']:#x}")
        for tsc in self.tsc_info:
            lines.append(
                "X86_TSC_INFO: "
                + ", ".join(f"{k} {v}" for k, v in tsc.items())
            )
        for emu in self.emulator_contexts:
            lines.append(
                f"EMULATOR_CONTEXT: {emu['emulator']} index {emu['index']}, "
                f"{emu['record_bytes']} bytes ({emu['bytes']} of emulator "
                "state)"
            )
        for item in self.ncm:
            lines.append(
                f"{item['layer']} {item['record']}: {item['summary']}"
            )
        lines.append(f"trailing bytes: {self.trailing_bytes}")
        if self.error is not None:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def _header_summary(record: Record) -> dict[str, Any]:
    value = record.value
    if record.name == "XL_HEADER":
        return {
            "mandatory_flags": value.mandatory_flags,
            "optional_flags": value.optional_flags,
            "json": value.json,
            "stream_v2": value.stream_v2,
            "config_bytes": len(value.config),
        }
    if record.name == "DOMAIN_HEADER":
        return {
            "type": value.type_name,
            "page_shift": value.page_shift,
            "xen": f"{value.xen_major}.{value.xen_minor}",
        }
    return dict(value._asdict())
