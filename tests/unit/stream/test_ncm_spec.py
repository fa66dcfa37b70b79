"""The spec page and the code agree: type numbers, layers, record sizes."""

from __future__ import annotations

import pathlib
import re

from nova_xen_ncm.stream import ncm

SPEC = (
    pathlib.Path(__file__).resolve().parents[3]
    / "doc/source/specs/non-cooperative-records.rst"
)


def _spec() -> str:
    return SPEC.read_text()


def test_type_number_table_matches_the_code():
    # Rows of the "Type numbers" table: type, layer, name.
    rows = re.findall(
        r"\* - ``(0x4E43[0-9A-F]{4})``\n\s+- (libx[cl])\n\s+- ``(NCM_\w+)``",
        _spec(),
    )
    documented = {name: (int(t, 16), layer) for t, layer, name in rows}
    in_code = {
        r.name: (r.type, r.layer)
        for r in ncm.LIBXC_RECORDS + ncm.LIBXL_RECORDS
    }
    assert documented == in_code


def test_max_length_table_matches_the_code():
    section = _spec().split("Largest body of each record")[1]
    section = section.split("Validation\n==========")[0]
    rows = re.findall(r"\* - ``(NCM_\w+)``\n\s+- (\d+)", section)
    assert {name: int(size) for name, size in rows} == ncm.MAX_LENGTH


def test_every_record_has_a_section():
    text = _spec()
    for row in ncm.LIBXC_RECORDS + ncm.LIBXL_RECORDS:
        heading = f"\n{row.name}\n{'-' * len(row.name)}\n"
        assert heading in text, row.name
