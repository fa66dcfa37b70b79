"""HVM platform state: HVM params and the HVM context blob.

The context blob uses Xen's save-descriptor framing
(xen/include/public/hvm/save.h, struct hvm_save_descriptor: typecode u16,
instance u16, length u32, then ``length`` bytes) with the x86 record
layouts of xen/include/public/arch-x86/hvm/save.h. Records come in
typecode order, as Xen's hvm_save() emits them: HEADER first, END last.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from collections.abc import Mapping

from nova_xen_ncm.host.base import HostError

DESCRIPTOR = struct.Struct("<HHI")

HVM_FILE_MAGIC = 0x54381286
HVM_FILE_VERSION = 0x00000001

# (typecode, name, length, per-vCPU): arch-x86/hvm/save.h.
CODE_END = 0
CODE_HEADER = 1
CODE_CPU = 2
CODE_PIC = 3
CODE_IOAPIC = 4
CODE_LAPIC = 5
CODE_LAPIC_REGS = 6
CODE_PCI_IRQ = 7
CODE_ISA_IRQ = 8
CODE_PCI_LINK = 9
CODE_PIT = 10
CODE_RTC = 11
CODE_HPET = 12
CODE_PMTIMER = 13
CODE_MTRR = 14
CODE_CPU_XSAVE = 16
CODE_VMCE_VCPU = 18
CODE_TSC_ADJUST = 19

RECORDS = (
    (CODE_HEADER, "HEADER", 24, False),
    (CODE_CPU, "CPU", 1032, True),
    (CODE_PIC, "PIC", 8, False),
    (CODE_IOAPIC, "IOAPIC", 400, False),
    (CODE_LAPIC, "LAPIC", 32, True),
    (CODE_LAPIC_REGS, "LAPIC_REGS", 1024, True),
    (CODE_PCI_IRQ, "PCI_IRQ", 16, False),
    (CODE_ISA_IRQ, "ISA_IRQ", 8, False),
    (CODE_PCI_LINK, "PCI_LINK", 8, False),
    (CODE_PIT, "PIT", 56, False),
    (CODE_RTC, "RTC", 24, False),
    (CODE_HPET, "HPET", 1048, False),
    (CODE_PMTIMER, "PMTIMER", 8, False),
    (CODE_MTRR, "MTRR", 240, True),
    # xcr0 = x87|SSE|AVX: 24 header bytes, legacy area, xsave header, YMM.
    (CODE_CPU_XSAVE, "CPU_XSAVE", 24 + 512 + 64 + 256, True),
    (CODE_VMCE_VCPU, "VMCE_VCPU", 32, True),
    (CODE_TSC_ADJUST, "TSC_ADJUST", 8, True),
)
RECORD_NAMES = {code: name for code, name, _, _ in RECORDS}
RECORD_NAMES[CODE_END] = "END"
_LENGTH = {code: length for code, _, length, _ in RECORDS}
_PER_VCPU = {code: per for code, _, _, per in RECORDS}

# struct hvm_save_header.
HEADER = struct.Struct("<IIQII")
# struct hvm_hw_cpu: offsets of the registers after fpu_regs[512].
CPU_GPRS = (
    "rax rbx rcx rdx rbp rsi rdi rsp r8 r9 r10 r11 r12 r13 r14 r15 rip "
    "rflags cr0 cr2 cr3 cr4"
).split()
CPU_GPR_OFFSET = 512
CPU_TSC_OFFSET = 1032 - 24  # tsc, pending_event, error_code, flags, pad0
LAPIC_BASE = 0xFEE00000

# HVM params (xen/include/public/hvm/params.h).
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_PAE_ENABLED = 4
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_VIRIDIAN = 9
HVM_PARAM_TIMER_MODE = 10
HVM_PARAM_HPET_ENABLED = 11
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_ACPI_S_STATE = 14
HVM_PARAM_VM86_TSS_SIZED = 37
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_PARAM_PAGING_RING_PFN = 27
HVM_PARAM_MONITOR_RING_PFN = 28
HVM_PARAM_SHARING_RING_PFN = 29
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
HVM_PARAM_MCA_CAP = 38
HVM_NR_PARAMS = 39
# HVM_PARAM_CALLBACK_TYPE_VECTOR in bits 63:56, vector in the low byte.
CALLBACK_TYPE_VECTOR = 2 << 56
CALLBACK_VECTOR = 0xF3  # Linux's HYPERVISOR_CALLBACK_VECTOR

# What the guest may set itself (hvm_allow_set_param); the rest only the
# toolstack sets.
GUEST_SETTABLE_PARAMS = frozenset({HVM_PARAM_CALLBACK_IRQ})


@dataclasses.dataclass
class SaveRecord:
    typecode: int
    instance: int
    data: bytes

    @property
    def name(self) -> str:
        return RECORD_NAMES.get(self.typecode, f"type {self.typecode}")


def _record_defaults(code: int, vcpu: int, tsc_khz: int) -> bytes:
    """A plausible record for a freshly booted 64-bit guest."""
    data = bytearray(_LENGTH[code])
    if code == CODE_HEADER:
        # cpuid leaf 1 eax of a Skylake-class CPU; Xen 4.17's changeset.
        HEADER.pack_into(
            data,
            0,
            HVM_FILE_MAGIC,
            HVM_FILE_VERSION,
            0x417,
            0x000506E3,
            tsc_khz,
        )
    elif code == CODE_CPU:
        regs = dict.fromkeys(CPU_GPRS, 0)
        regs.update(
            rflags=0x2,
            cr0=0x80050033,
            cr4=0x3606E0,
            cr3=0x1000 * (0x200 + vcpu),
            rsp=0x7FFF0000 - vcpu * 0x4000,
        )
        struct.pack_into(
            f"<{len(CPU_GPRS)}Q",
            data,
            CPU_GPR_OFFSET,
            *(regs[r] for r in CPU_GPRS),
        )
        # fpu_regs: FCW 0x37f, MXCSR 0x1f80 (fxsave layout).
        struct.pack_into("<H", data, 0, 0x37F)
        struct.pack_into("<I", data, 24, 0x1F80)
        struct.pack_into("<I", data, 1032 - 8, 1)  # XEN_X86_FPU_INITIALISED
    elif code == CODE_PIC:
        data[:] = bytes([0, 0xFF, 0, 0x08, 0, 0x40, 0, 0])
    elif code == CODE_IOAPIC:
        struct.pack_into("<QII", data, 0, 0xFEC00000, 0, 0)
        for pin in range(48):
            struct.pack_into("<Q", data, 16 + pin * 8, 1 << 16)  # masked
    elif code == CODE_LAPIC:
        base = LAPIC_BASE | (1 << 11) | (1 << 8 if vcpu == 0 else 0)
        struct.pack_into("<QIIQI", data, 0, base, 0, 1, 0, 0)
    elif code == CODE_LAPIC_REGS:
        struct.pack_into("<I", data, 0x20, vcpu << 24)  # APIC ID
        struct.pack_into("<I", data, 0x30, 0x50014)  # version
        struct.pack_into("<I", data, 0xF0, 0x1FF)  # SVR enabled
    elif code == CODE_PIT:
        for ch in range(3):
            struct.pack_into(
                "<IHBBBBBBBBBB",
                data,
                ch * 16,
                0x10000,
                0,
                0,
                0,
                0,
                3,
                3,
                0,
                3,
                3 if ch else 2,
                0,
                1 if ch != 2 else 0,
            )
    elif code == CODE_RTC:
        data[10:14] = bytes([0x26, 0x02, 0x00, 0x80])
    elif code == CODE_HPET:
        struct.pack_into("<Q", data, 0, 0x8086A201 | (0x5F5E100 << 32))
    elif code == CODE_MTRR:
        struct.pack_into("<Q", data, 0, 0x0007040600070406)
        struct.pack_into("<Q", data, 224, 0x508)  # cap: WC, fixed, 8 var
        struct.pack_into("<Q", data, 232, 0xC06)  # def type WB, enabled
    elif code == CODE_CPU_XSAVE:
        struct.pack_into("<QQQ", data, 0, 7, 7, 7)
        struct.pack_into("<H", data, 24, 0x37F)
        struct.pack_into("<I", data, 24 + 24, 0x1F80)
        struct.pack_into("<Q", data, 24 + 512, 7)
    elif code == CODE_VMCE_VCPU:
        struct.pack_into("<Q", data, 0, 0x1000802)
    return bytes(data)


def default_records(vcpus: int, tsc_khz: int) -> list[SaveRecord]:
    out = []
    for code, _, _, per_vcpu in RECORDS:
        instances = range(vcpus) if per_vcpu else range(1)
        if code == CODE_PIC:
            instances = range(2)  # master and slave
        for i in instances:
            out.append(SaveRecord(code, i, _record_defaults(code, i, tsc_khz)))
    return out


def encode(records: Iterable[SaveRecord]) -> bytes:
    parts = []
    for rec in records:
        parts.append(
            DESCRIPTOR.pack(rec.typecode, rec.instance, len(rec.data))
        )
        parts.append(rec.data)
    parts.append(DESCRIPTOR.pack(CODE_END, 0, 0))
    return b"".join(parts)


def decode(blob: bytes, vcpus: int) -> list[SaveRecord]:
    """Parse and check a context blob for a guest with ``vcpus`` vCPUs.

    Raises HostError naming the offset and record of the first problem:
    truncation, an unknown typecode, a wrong length, a bad header, an
    instance beyond the vCPUs, a duplicate, a missing END or data after
    it, records out of order, or a per-vCPU record missing.
    """

    def fail(offset: int, what: str) -> HostError:
        return HostError(
            f"HVM context at offset {offset}: {what}", call="set_hvm_context"
        )

    blob = bytes(blob)
    records: list[SaveRecord] = []
    seen: set[tuple[int, int]] = set()
    offset = 0
    last_code = 0
    ended = False
    while offset < len(blob):
        if len(blob) - offset < DESCRIPTOR.size:
            raise fail(offset, "truncated save descriptor")
        code, inst, length = DESCRIPTOR.unpack_from(blob, offset)
        name = RECORD_NAMES.get(code)
        if name is None:
            raise fail(offset, f"unknown record typecode {code}")
        if code == CODE_END:
            if length != 0:
                raise fail(offset, f"END record with length {length}")
            ended = True
            offset += DESCRIPTOR.size
            break
        if not records and code != CODE_HEADER:
            raise fail(offset, f"first record is {name}, not HEADER")
        if length != _LENGTH[code]:
            raise fail(
                offset,
                f"{name} record length {length}, expected {_LENGTH[code]}",
            )
        limit = vcpus if _PER_VCPU[code] else (2 if code == CODE_PIC else 1)
        if inst >= limit:
            raise fail(
                offset, f"{name} instance {inst} out of range (limit {limit})"
            )
        if (code, inst) in seen:
            raise fail(offset, f"duplicate {name} instance {inst}")
        if code < last_code:
            raise fail(offset, f"{name} record out of typecode order")
        start = offset + DESCRIPTOR.size
        if start + length > len(blob):
            raise fail(offset, f"{name} record truncated")
        data = blob[start : start + length]
        if code == CODE_HEADER:
            magic, version, _, _, _ = HEADER.unpack(data)
            if magic != HVM_FILE_MAGIC:
                raise fail(
                    offset,
                    f"HEADER magic {magic:#x}, expected {HVM_FILE_MAGIC:#x}",
                )
            if version != HVM_FILE_VERSION:
                raise fail(offset, f"HEADER version {version} unsupported")
        records.append(SaveRecord(code, inst, data))
        seen.add((code, inst))
        last_code = code
        offset = start + length
    if not ended:
        raise fail(offset, "no END record")
    if offset != len(blob):
        raise fail(offset, f"{len(blob) - offset} bytes after END")
    for vcpu in range(vcpus):
        if (CODE_CPU, vcpu) not in seen:
            raise fail(0, f"no CPU record for vCPU {vcpu}")
    return records


def cpu_registers(data: bytes) -> dict[str, int]:
    values = struct.unpack_from(f"<{len(CPU_GPRS)}Q", data, CPU_GPR_OFFSET)
    regs = dict(zip(CPU_GPRS, values, strict=True))
    regs["tsc"] = struct.unpack_from("<Q", data, CPU_TSC_OFFSET)[0]
    return regs


def with_cpu_registers(data: bytes, regs: Mapping[str, int]) -> bytes:
    out = bytearray(data)
    current = cpu_registers(data)
    current.update(regs)
    struct.pack_into(
        f"<{len(CPU_GPRS)}Q",
        out,
        CPU_GPR_OFFSET,
        *(current[r] for r in CPU_GPRS),
    )
    struct.pack_into("<Q", out, CPU_TSC_OFFSET, current["tsc"])
    return bytes(out)


# -- time, as Xen gives it to an HVM guest with PV drivers -----------------
#
# struct vcpu_time_info (xen/include/public/xen.h) at offset 32 of each
# vcpu_info, and the wallclock of struct shared_info (x86_64 offsets).
# Xen writes them with the version protocol: odd while updating.
VCPU_TIME_OFFSET = 32
VCPU_TIME = struct.Struct("<IIQQIbB2x")
XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0
SHINFO_WC = 3072
WALLCLOCK = struct.Struct("<IIII")  # wc_version, wc_sec, wc_nsec, wc_sec_hi
NSEC_PER_SEC = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class TimeScale:
    """xen/arch/x86/time.c struct time_scale: ns = ticks << shift (or >>
    for a negative shift) times mul_frac / 2^32."""

    mul_frac: int
    shift: int

    @classmethod
    def for_khz(cls, khz: int) -> TimeScale:
        """set_time_scale(): the scale from ticks at ``khz`` to ns."""
        tps = khz * 1000
        shift = 0
        while tps > 2 * NSEC_PER_SEC:
            tps >>= 1
            shift -= 1
        tps &= 0xFFFFFFFF
        while tps <= NSEC_PER_SEC:
            tps <<= 1
            shift += 1
        return cls((NSEC_PER_SEC << 32) // tps, shift)

    def scale(self, ticks: int) -> int:
        """scale_delta()."""
        if self.shift >= 0:
            ticks <<= self.shift
        else:
            ticks >>= -self.shift
        return (ticks * self.mul_frac) >> 32


def _update_begin(version: int) -> int:
    """version_update_begin() (xen/include/xen/time.h): odd while the
    fields change, whatever the version was (a page restored or written
    by the guest may hold an odd one)."""
    return ((version + 1) | 1) & 0xFFFFFFFF


def write_vcpu_time(
    vcpu_info: memoryview | bytearray,
    tsc: int,
    system_time: int,
    scale: TimeScale,
) -> None:
    """update_vcpu_system_time(): a new (tsc_timestamp, system_time)
    pair, the version odd while the fields change."""
    version = _update_begin(
        VCPU_TIME.unpack_from(vcpu_info, VCPU_TIME_OFFSET)[0]
    )
    struct.pack_into("<I", vcpu_info, VCPU_TIME_OFFSET, version)
    VCPU_TIME.pack_into(
        vcpu_info,
        VCPU_TIME_OFFSET,
        version,
        0,
        tsc & (1 << 64) - 1,
        system_time & (1 << 64) - 1,
        scale.mul_frac,
        scale.shift,
        XEN_PVCLOCK_TSC_STABLE_BIT,
    )
    struct.pack_into(
        "<I", vcpu_info, VCPU_TIME_OFFSET, (version + 1) & 0xFFFFFFFF
    )


def read_vcpu_time(vcpu_info: memoryview | bytes) -> dict[str, int]:
    version, _, tsc, system_time, mul, shift, flags = VCPU_TIME.unpack_from(
        vcpu_info, VCPU_TIME_OFFSET
    )
    return {
        "version": version,
        "tsc_timestamp": tsc,
        "system_time": system_time,
        "tsc_to_system_mul": mul,
        "tsc_shift": shift,
        "flags": flags,
    }


def write_wallclock(shared_info: memoryview | bytearray, ns: int) -> None:
    """update_domain_wallclock_time(): the wall time at the guest's system
    time 0, the version odd while the fields change."""
    version = _update_begin(WALLCLOCK.unpack_from(shared_info, SHINFO_WC)[0])
    sec, nsec = divmod(ns, NSEC_PER_SEC)
    struct.pack_into("<I", shared_info, SHINFO_WC, version)
    WALLCLOCK.pack_into(
        shared_info,
        SHINFO_WC,
        version,
        sec & 0xFFFFFFFF,
        nsec,
        (sec >> 32) & 0xFFFFFFFF,
    )
    struct.pack_into("<I", shared_info, SHINFO_WC, (version + 1) & 0xFFFFFFFF)


def read_wallclock(shared_info: memoryview | bytes) -> int:
    """The wallclock in ns since the epoch."""
    _, sec, nsec, sec_hi = WALLCLOCK.unpack_from(shared_info, SHINFO_WC)
    return ((sec_hi << 32) | sec) * NSEC_PER_SEC + nsec
