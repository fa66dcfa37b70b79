"""Names of HVM save types and HVM params, for reports.

Save type codes are those of ``DECLARE_HVM_SAVE_TYPE`` in Xen's
``xen/include/public/hvm/save.h`` and ``arch-x86/hvm/save.h``
(``CPU_XSAVE_CODE`` 16 and ``CPU_MSR_CODE`` 20 are declared separately
there); param indices are the ``HVM_PARAM_*`` of
``xen/include/public/hvm/params.h`` (Xen 4.17).
"""

from __future__ import annotations

SAVE_TYPES: dict[int, str] = {
    0: "END",
    1: "HEADER",
    2: "CPU",
    3: "PIC",
    4: "IOAPIC",
    5: "LAPIC",
    6: "LAPIC_REGS",
    7: "PCI_IRQ",
    8: "ISA_IRQ",
    9: "PCI_LINK",
    10: "PIT",
    11: "RTC",
    12: "HPET",
    13: "PMTIMER",
    14: "MTRR",
    15: "VIRIDIAN_DOMAIN",
    16: "CPU_XSAVE",
    17: "VIRIDIAN_VCPU",
    18: "VMCE_VCPU",
    19: "TSC_ADJUST",
    20: "CPU_MSR",
}

SAVE_END = 0
SAVE_HEADER = 1

PARAMS: dict[int, str] = {
    0: "CALLBACK_IRQ",
    1: "STORE_PFN",
    2: "STORE_EVTCHN",
    4: "PAE_ENABLED",
    5: "IOREQ_PFN",
    6: "BUFIOREQ_PFN",
    9: "VIRIDIAN",
    10: "TIMER_MODE",
    11: "HPET_ENABLED",
    12: "IDENT_PT",
    13: "DM_DOMAIN",
    14: "ACPI_S_STATE",
    15: "VM86_TSS",
    16: "VPT_ALIGN",
    17: "CONSOLE_PFN",
    18: "CONSOLE_EVTCHN",
    19: "ACPI_IOPORTS_LOCATION",
    20: "MEMORY_EVENT_CR0",
    21: "MEMORY_EVENT_CR3",
    22: "MEMORY_EVENT_CR4",
    23: "MEMORY_EVENT_INT3",
    24: "NESTEDHVM",
    25: "MEMORY_EVENT_SINGLE_STEP",
    26: "BUFIOREQ_EVTCHN",
    27: "PAGING_RING_PFN",
    28: "MONITOR_RING_PFN",
    29: "SHARING_RING_PFN",
    30: "MEMORY_EVENT_MSR",
    31: "TRIPLE_FAULT_REASON",
    32: "IOREQ_SERVER_PFN",
    33: "NR_IOREQ_SERVER_PAGES",
    34: "VM_GENERATION_ID_ADDR",
    35: "ALTP2M",
    36: "X87_FIP_WIDTH",
    37: "VM86_TSS_SIZED",
    38: "MCA_CAP",
}

NR_PARAMS = 39


def save_type_name(typecode: int) -> str:
    return SAVE_TYPES.get(typecode, f"TYPE_{typecode}")


def param_name(index: int) -> str:
    return PARAMS.get(index, f"PARAM_{index}")
