"""The record tables against Xen's specs and C structs."""

import struct

import pytest

from nova_xen_ncm.stream import codecs
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import libxl
from nova_xen_ncm.stream import ncm
from nova_xen_ncm.stream import tables
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.records import RecordTable
from nova_xen_ncm.stream.records import RecordType

# sizeof() of the C structs, from tools/libs/guest/xg_sr_stream_format.h,
# tools/libs/light/libxl_sr_stream_format.h, tools/xl/xl.h,
# xen/include/public/hvm/save.h and xen/include/public/arch-x86/xen.h.
C_SIZES = [
    ("xc_sr_ihdr", libxc.IHDR.size, 24),
    ("xc_sr_dhdr", libxc.DHDR.size, 16),
    ("xc_sr_rhdr", libxc.RHDR.size, 8),
    ("xc_sr_rec_page_data_header", libxc.PAGE_DATA_HDR.size, 8),
    ("xc_sr_rec_x86_tsc_info", struct.calcsize("<IIQII"), 24),
    ("xc_sr_rec_hvm_params", libxc.HVM_PARAMS_HDR.size, 8),
    ("xc_sr_rec_hvm_params_entry", libxc.HVM_PARAMS_ENTRY.size, 16),
    ("xc_sr_rec_x86_pv_info", struct.calcsize("<BBHI"), 8),
    ("xc_sr_rec_x86_pv_p2m_frames", struct.calcsize("<II"), 8),
    ("xc_sr_rec_x86_pv_vcpu_hdr", struct.calcsize("<II"), 8),
    ("hvm_save_descriptor", libxc.HVM_SAVE_DESCRIPTOR.size, 8),
    ("xen_cpuid_leaf_t", libxc.CPUID_LEAF.itemsize, 24),
    ("xen_msr_entry_t", libxc.MSR_ENTRY.itemsize, 16),
    ("libxl__sr_hdr", libxl.HDR.size, 16),
    ("libxl__sr_rec_hdr", libxl.RHDR.size, 8),
    ("libxl__sr_emulator_hdr", libxl.EMULATOR_HDR.size, 8),
    ("libxl_sr_checkpoint_state", libxl.CHECKPOINT_STATE_HDR.size, 4),
    ("save_file_header", xl.HDR.size, 48),
]


@pytest.mark.parametrize(("name", "ours", "c_size"), C_SIZES)
def test_struct_sizes_match_c(name, ours, c_size):
    assert ours == c_size, name


def _table_rows(rows):
    return {row.name: row.type for row in rows}


def test_libxc_rows_are_the_spec_record_types():
    # libxc-migration-stream.pandoc "Records", type field.
    assert _table_rows(libxc.XEN_ROWS) == {
        "END": 0x0,
        "PAGE_DATA": 0x1,
        "X86_PV_INFO": 0x2,
        "X86_PV_P2M_FRAMES": 0x3,
        "X86_PV_VCPU_BASIC": 0x4,
        "X86_PV_VCPU_EXTENDED": 0x5,
        "X86_PV_VCPU_XSAVE": 0x6,
        "SHARED_INFO": 0x7,
        "X86_TSC_INFO": 0x8,
        "HVM_CONTEXT": 0x9,
        "HVM_PARAMS": 0xA,
        "TOOLSTACK": 0xB,
        "X86_PV_VCPU_MSRS": 0xC,
        "VERIFY": 0xD,
        "CHECKPOINT": 0xE,
        "CHECKPOINT_DIRTY_PFN_LIST": 0xF,
        "STATIC_DATA_END": 0x10,
        "X86_CPUID_POLICY": 0x11,
        "X86_MSR_POLICY": 0x12,
    }


def test_libxl_rows_are_the_spec_record_types():
    # libxl-migration-stream.pandoc "Record Overview", type field.
    assert _table_rows(libxl.XEN_ROWS) == {
        "END": 0,
        "LIBXC_CONTEXT": 1,
        "EMULATOR_XENSTORE_DATA": 2,
        "EMULATOR_CONTEXT": 3,
        "CHECKPOINT_END": 4,
        "CHECKPOINT_STATE": 5,
    }


def test_spec_constants():
    assert libxc.IHDR_ID.to_bytes(4, "big") == b"XENF"
    assert libxl.HDR_IDENT.to_bytes(8, "big") == b"LibxlFmt"
    assert len(xl.MAGIC) == 32
    assert libxc.PAGE_TYPES[libxc.XTAB] == "XTAB"
    assert set(libxc.PAGE_TYPES) == set(range(16)) - {5, 6, 7, 8}


def test_project_rows_are_in_the_default_tables():
    libxc_table = tables.libxc_table()
    libxl_table = tables.libxl_table()
    for row in ncm.LIBXC_RECORDS:
        assert libxc_table.by_type(row.type) is row
    for row in ncm.LIBXL_RECORDS:
        assert libxl_table.by_type(row.type) is row
    assert len(libxc_table) == len(libxc.XEN_ROWS) + len(ncm.LIBXC_RECORDS)
    assert len(libxl_table) == len(libxl.XEN_ROWS) + len(ncm.LIBXL_RECORDS)


def test_limits_fit_the_record_length_field():
    for row in [*tables.libxc_table(), *tables.libxl_table()]:
        assert 0 <= row.max_length <= libxc.REC_LENGTH_MAX, row.name
        assert row.mandatory, row.name
        assert not row.is_header


def test_header_rows_are_headers():
    for row in tables.HEADERS:
        assert row.is_header and row.mandatory


def test_table_rejects_duplicates_and_other_layers():
    row = RecordType(7, "X", "libxc", codecs.Empty(), 0)
    with pytest.raises(ValueError):
        RecordTable("libxc", [row, RecordType(7, "Y", "libxc", row.codec, 0)])
    with pytest.raises(ValueError):
        RecordTable("libxl", [row])
