"""``nova-xen-ncm inspect`` on the real ``xl save`` image and bad input."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import zstandard

from nova_xen_ncm.cmd import inspect
from nova_xen_ncm.cmd import main
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream.encoder import Encoder
from nova_xen_ncm.stream.encoder import join
from nova_xen_ncm.stream.errors import BodyError
from nova_xen_ncm.stream.records import RecordType

FIXTURE = pathlib.Path("/work/shared/fixtures/xen-4.17/xl-save-hvm32m.img.zst")

# The fixture's layout, from its README.
EXPECTED_RECORDS = [
    ("libxl", "LIBXC_CONTEXT", 0x1, 1, 0),
    ("libxc", "X86_CPUID_POLICY", 0x11, 1, 1224),
    ("libxc", "X86_MSR_POLICY", 0x12, 1, 32),
    ("libxc", "STATIC_DATA_END", 0x10, 1, 0),
    ("libxc", "PAGE_DATA", 0x1, 1020, 41_902_048),
    ("libxc", "X86_TSC_INFO", 0x8, 1, 24),
    ("libxc", "HVM_CONTEXT", 0x9, 1, 4112),
    ("libxc", "HVM_PARAMS", 0xA, 1, 200),
    ("libxc", "END", 0x0, 1, 0),
    ("libxl", "EMULATOR_CONTEXT", 0x3, 1, 6141),
    ("libxl", "END", 0x0, 1, 0),
]


def run(capsys, *argv):
    status = main.main(["inspect", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "xl-save-hvm32m.img"
    with FIXTURE.open("rb") as src, path.open("wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    return path


def _check_fixture_report(report):
    assert report["valid"] and report["format"] == "xl"
    assert report["stream_bytes"] == 41_923_224
    assert report["trailing_bytes"] == 0
    assert [
        (r["layer"], r["name"], r["type"], r["count"], r["bytes"])
        for r in report["records"]
    ] == EXPECTED_RECORDS
    headers = report["headers"]
    assert headers["XL_HEADER"]["stream_v2"] and headers["XL_HEADER"]["json"]
    assert headers["LIBXL_HEADER"]["version"] == 2
    assert headers["IMAGE_HEADER"]["version"] == 3
    assert headers["DOMAIN_HEADER"] == {
        "type": "x86 HVM",
        "page_shift": 12,
        "xen": "4.17",
    }
    pages = report["page_data"]
    assert pages["records"] == 1020
    assert pages["pfn_entries"] == 1_044_480
    assert pages["unique_pfns"] == 1_044_480  # each pfn once
    assert pages["pages_with_data"] == sum(
        n for t, n in pages["page_types"].items() if t == "NOTAB"
    )
    assert set(pages["page_types"]) == {"NOTAB", "XTAB"}
    assert pages["pages_with_data"] * 4096 + 8 * 1020 + 8 * 1_044_480 == (
        41_902_048
    )
    (ctx,) = report["hvm_context"]
    assert ctx["descriptors"] == 17
    assert ctx["types"]["HEADER"] == 1 and ctx["types"]["PIC"] == 2
    assert sum(ctx["types"].values()) == 17
    params = {p["name"]: p["value"] for p in report["hvm_params"]}
    assert len(report["hvm_params"]) == len(params) == 12
    assert params["STORE_PFN"] == 0xFEFFC
    assert params["NR_IOREQ_SERVER_PAGES"] == 8
    assert report["tsc_info"][0]["khz"] == 2599997
    (emu,) = report["emulator_context"]
    assert emu["record_bytes"] == 6141 and emu["emulator"] == "qemu-upstream"
    assert report["ncm"] == []


def test_json_report_of_the_compressed_fixture(capsys):
    status, out, err = run(capsys, str(FIXTURE), "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["source"] == str(FIXTURE)
    _check_fixture_report(report)


def test_json_report_of_the_raw_fixture(capsys, raw_image):
    status, out, _ = run(capsys, str(raw_image), "--json", "--format", "xl")
    assert status == 0
    _check_fixture_report(json.loads(out))


def test_text_report_of_the_fixture(capsys, raw_image):
    status, out, _ = run(capsys, str(raw_image))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"{raw_image}: xl stream, 41923224 bytes, valid"
    assert "DOMAIN_HEADER: type x86 HVM, page_shift 12, xen 4.17" in lines
    table = [line.split() for line in lines if line.startswith("lib")]
    assert [
        (t[0], t[1], int(t[2], 16), int(t[3]), int(t[4])) for t in table
    ] == EXPECTED_RECORDS
    assert any(
        line.startswith(
            "PAGE_DATA: 1020 records, 1044480 pfn entries, "
            "1044480 unique pfns,"
        )
        for line in lines
    )
    assert any(
        line.startswith("HVM_CONTEXT: 17 descriptors then END: HEADER 1,")
        for line in lines
    )
    assert "HVM_PARAMS: 12 params" in lines
    assert "  STORE_PFN (1) = 0xfeffc" in lines
    assert (
        "EMULATOR_CONTEXT: qemu-upstream index 0, 6141 bytes "
        "(6133 of emulator state)" in lines
    )
    assert lines[-1] == "trailing bytes: 0"


def test_wrong_format_is_a_one_line_error(capsys, raw_image):
    status, _, err = run(capsys, str(raw_image), "--format", "libxc")
    # The check ran and found a fault: status 1, not a usage mistake.
    assert status == 1
    assert err.count("\n") == 1
    assert err.startswith("nova-xen-ncm inspect: error: invalid stream:")
    assert "IMAGE_HEADER" in err or "image header" in err


def test_truncated_file(capsys, tmp_path, raw_image):
    path = tmp_path / "short.img"
    path.write_bytes(raw_image.read_bytes()[:5_000_000])
    status, out, err = run(capsys, str(path), "--json")
    assert status == 1
    assert "truncated" in err and "libxc PAGE_DATA" in err
    report = json.loads(out)
    assert not report["valid"]
    assert report["error"]["record"] == "libxc PAGE_DATA"
    assert report["error"]["offset"] < 5_000_000


def test_trailing_bytes_are_counted(capsys, tmp_path):
    enc = Encoder()
    stream = join(
        enc.libxc_headers()
        + enc.libxc("STATIC_DATA_END")
        + enc.page_data([5, 6], [libxc.NOTAB, libxc.XTAB], bytes(4096))
        + enc.libxc("END")
    )
    path = tmp_path / "s.libxc"
    path.write_bytes(stream + b"x" * 3_000_000)
    status, out, _ = run(capsys, str(path), "--json")
    assert status == 0
    report = json.loads(out)
    assert report["format"] == "libxc"
    assert report["trailing_bytes"] == 3_000_000
    assert report["page_data"]["page_types"] == {"NOTAB": 1, "XTAB": 1}


def test_missing_file(capsys, tmp_path):
    status, _, err = run(capsys, str(tmp_path / "nope"))
    assert status == 2 and "cannot read" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda z: z[: len(z) // 2],
        lambda z: z[:6] + b"\xff" * 40,
        lambda z: inspect.ZSTD_MAGIC + b"\x00" * 64,
    ],
)
def test_corrupt_zstd(capsys, tmp_path, damage):
    enc = Encoder()
    stream = join(enc.libxl_header() + enc.libxl("END")) + bytes(100_000)
    path = tmp_path / "bad.zst"
    path.write_bytes(damage(zstandard.ZstdCompressor().compress(stream)))
    status, _, err = run(capsys, str(path))
    assert status == 1 and "zstd" in err and err.count("\n") == 1


def test_zstd_of_several_frames(capsys, tmp_path):
    enc = Encoder()
    stream = join(enc.libxl_header() + enc.libxl("END"))
    packer = zstandard.ZstdCompressor()
    path = tmp_path / "frames.zst"
    frames = packer.compress(stream[:10]) + packer.compress(stream[10:])
    path.write_bytes(frames)
    status, out, _ = run(capsys, str(path), "--json")
    assert status == 0 and json.loads(out)["valid"]


@dataclasses.dataclass
class _Marker:
    n: int

    def summary(self):
        return {"n": self.n}


class _MarkerCodec:
    def decode(self, body):
        if len(body) != 1:
            raise BodyError("one octet")
        return _Marker(body[0])

    def encode(self, value):
        return [bytes([value.n])]


def test_project_records_are_summarised(capsys, tmp_path, monkeypatch):
    row = RecordType(0x7FFF0001, "TEST_MARKER", "libxc", _MarkerCodec(), 1)
    monkeypatch.setattr(ncm, "LIBXC_RECORDS", [row])
    enc = Encoder()
    stream = join(
        enc.libxc_headers()
        + enc.libxc("TEST_MARKER", _Marker(7))
        + enc.libxc("END")
    )
    path = tmp_path / "s.libxc"
    path.write_bytes(stream)
    status, out, _ = run(capsys, str(path), "--json")
    assert status == 0
    assert json.loads(out)["ncm"] == [
        {"layer": "libxc", "record": "TEST_MARKER", "summary": {"n": 7}}
    ]
    status, out, _ = run(capsys, str(path))
    assert "libxc TEST_MARKER: {'n': 7}" in out.splitlines()


def test_stdin_compressed_without_traceback(tmp_path):
    enc = Encoder()
    stream = join(enc.libxl_header() + enc.libxl("END"))
    packed = zstandard.ZstdCompressor().compress(stream)
    script = (
        "import sys; from nova_xen_ncm.cmd.main import main; sys.exit(main())"
    )
    cmd = [sys.executable, "-c", script, "inspect", "-"]
    good = subprocess.run(cmd + ["--json"], input=packed, capture_output=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["format"] == "libxl"
    bad = subprocess.run(cmd, input=stream[:20], capture_output=True)
    assert bad.returncode == 1
    assert b"Traceback" not in bad.stderr
    # One line of ours (libraries may warn on stderr before it).
    ours = [
        line
        for line in bad.stderr.decode().splitlines()
        if line.startswith("nova-xen-ncm")
    ]
    assert len(ours) == 1
    assert ours[0].startswith("nova-xen-ncm inspect: error: invalid stream:")
    assert bad.stderr.decode().splitlines()[-1] == ours[0]
