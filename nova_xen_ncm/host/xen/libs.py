"""ctypes bindings to the Xen 4.17 libraries the real host driver uses.

Every function is declared once, in :data:`PROTOTYPES`, with its C return
and argument types spelled as the installed headers spell them; ``CTYPES``
turns those spellings into ctypes types. A unit test parses the headers
(Debian ``libxen-dev``) and checks each prototype against them, so a
declaration here cannot drift from the library's ABI unnoticed.

Failures become :class:`XenCallError` (a ``HostError``) naming the call and
its errno; a domain that does not exist becomes ``DomainNotFound``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errnos
import os
import threading
from collections.abc import Callable
from typing import Any

from nova_xen_ncm.host import base

# -- structures of the public headers --------------------------------------


class XenDomctlGetDomainInfo(ctypes.Structure):
    """struct xen_domctl_getdomaininfo (xen/domctl.h, interface 0x15),
    ``xc_domaininfo_t``; ``arch_config`` is x86's emulation_flags and
    misc_flags."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("emulation_flags", ctypes.c_uint32),
        ("misc_flags", ctypes.c_uint32),
    ]


XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_shutdownshift = 16
XEN_DOMINF_shutdownmask = 255
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3


class EvtchnInterdomain(ctypes.Structure):
    _fields_ = [("dom", ctypes.c_uint16), ("port", ctypes.c_uint32)]


class EvtchnStatusU(ctypes.Union):
    _fields_ = [
        ("unbound_dom", ctypes.c_uint16),
        ("interdomain", EvtchnInterdomain),
        ("pirq", ctypes.c_uint32),
        ("virq", ctypes.c_uint32),
    ]


class EvtchnStatus(ctypes.Structure):
    """struct evtchn_status (xen/event_channel.h), ``xc_evtchn_status_t``."""

    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("port", ctypes.c_uint32),
        ("status", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("u", EvtchnStatusU),
    ]


class XenSysctlPhysinfo(ctypes.Structure):
    """struct xen_sysctl_physinfo (xen/sysctl.h), ``xc_physinfo_t``."""

    _fields_ = [
        ("threads_per_core", ctypes.c_uint32),
        ("cores_per_socket", ctypes.c_uint32),
        ("nr_cpus", ctypes.c_uint32),
        ("max_cpu_id", ctypes.c_uint32),
        ("nr_nodes", ctypes.c_uint32),
        ("max_node_id", ctypes.c_uint32),
        ("cpu_khz", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("arch_capabilities", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("total_pages", ctypes.c_uint64),
        ("free_pages", ctypes.c_uint64),
        ("scrub_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("max_mfn", ctypes.c_uint64),
        ("hw_cap", ctypes.c_uint32 * 8),
    ]


class HypercallBuffer(ctypes.Structure):
    """struct xc_hypercall_buffer (xenctrl.h), ``xc_hypercall_buffer_t``."""

    _fields_ = [
        ("hbuf", ctypes.c_void_p),
        ("param_shadow", ctypes.c_void_p),
        ("dir", ctypes.c_int),
        ("ubuf", ctypes.c_void_p),
        ("sz", ctypes.c_size_t),
    ]


class ShadowOpStats(ctypes.Structure):
    """struct xen_domctl_shadow_op_stats, ``xc_shadow_op_stats_t``."""

    _fields_ = [
        ("fault_count", ctypes.c_uint32),
        ("dirty_count", ctypes.c_uint32),
    ]


class SchedCredit(ctypes.Structure):
    """struct xen_domctl_sched_credit and xen_domctl_sched_credit2."""

    _fields_ = [("weight", ctypes.c_uint16), ("cap", ctypes.c_uint16)]


class CpuidLeaf(ctypes.Structure):
    """xen_cpuid_leaf_t (xen/arch-x86/xen.h): 24 octets, as in the
    X86_CPUID_POLICY record."""

    _fields_ = [
        ("leaf", ctypes.c_uint32),
        ("subleaf", ctypes.c_uint32),
        ("a", ctypes.c_uint32),
        ("b", ctypes.c_uint32),
        ("c", ctypes.c_uint32),
        ("d", ctypes.c_uint32),
    ]


class MsrEntry(ctypes.Structure):
    """xen_msr_entry_t (xen/arch-x86/xen.h): 16 octets, as in the
    X86_MSR_POLICY record."""

    _fields_ = [
        ("idx", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("val", ctypes.c_uint64),
    ]


# -- C spellings to ctypes ---------------------------------------------------

_OPAQUE = ctypes.c_void_p

CTYPES: dict[str, Any] = {
    "void": None,
    "bool": ctypes.c_bool,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "size_t": ctypes.c_size_t,
    "uint16_t": ctypes.c_uint16,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "domid_t": ctypes.c_uint16,
    "xs_transaction_t": ctypes.c_uint32,
    "xentoollog_level": ctypes.c_int,
    # Handles the libraries own: only ever passed back to them.
    "void *": _OPAQUE,
    "xc_interface *": _OPAQUE,
    "xentoollog_logger *": _OPAQUE,
    "xentoollog_logger_stdiostream *": _OPAQUE,
    "FILE *": _OPAQUE,
    "xenforeignmemory_handle *": _OPAQUE,
    "xenforeignmemory_resource_handle *": _OPAQUE,
    "xs_handle *": _OPAQUE,
    # An array of struct xs_permissions, built and read by the caller.
    "xs_permissions *": ctypes.c_void_p,
    "xencall_handle *": _OPAQUE,
    "libxl_ctx *": _OPAQUE,
    "libxl_domain_config *": _OPAQUE,
    "libxl_asyncop_how *": _OPAQUE,
    "libxl_asyncprogress_how *": _OPAQUE,
    "char *": ctypes.c_char_p,
    "void **": ctypes.POINTER(ctypes.c_void_p),
    "libxl_ctx **": ctypes.POINTER(ctypes.c_void_p),
    "char **": ctypes.POINTER(ctypes.c_char_p),
    "int *": ctypes.POINTER(ctypes.c_int),
    "unsigned int *": ctypes.POINTER(ctypes.c_uint),
    "uint8_t *": ctypes.POINTER(ctypes.c_uint8),
    "uint32_t *": ctypes.POINTER(ctypes.c_uint32),
    "uint64_t *": ctypes.POINTER(ctypes.c_uint64),
    "size_t *": ctypes.POINTER(ctypes.c_size_t),
    # xen_pfn_t is unsigned long on x86_64 (xen/arch-x86/xen.h).
    "xen_pfn_t *": ctypes.POINTER(ctypes.c_ulong),
    "xen_pfn_t": ctypes.c_ulong,
    "xc_domaininfo_t *": ctypes.POINTER(XenDomctlGetDomainInfo),
    "xc_evtchn_status_t *": ctypes.POINTER(EvtchnStatus),
    "xc_physinfo_t *": ctypes.POINTER(XenSysctlPhysinfo),
    "xc_hypercall_buffer_t *": ctypes.POINTER(HypercallBuffer),
    "xc_shadow_op_stats_t *": ctypes.POINTER(ShadowOpStats),
    "xen_domctl_sched_credit *": ctypes.POINTER(SchedCredit),
    "xen_domctl_sched_credit2 *": ctypes.POINTER(SchedCredit),
    "xen_cpuid_leaf_t *": ctypes.POINTER(CpuidLeaf),
    "xen_msr_entry_t *": ctypes.POINTER(MsrEntry),
}

# Library name -> (sonames to try, headers that declare its functions).
LIBRARIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "xenctrl": (("libxenctrl.so.4.17",), ("xenctrl.h",)),
    "xenguest": (("libxenguest.so.4.17",), ("xenguest.h",)),
    "xenforeignmemory": (
        ("libxenforeignmemory.so.1",),
        ("xenforeignmemory.h",),
    ),
    "xenstore": (("libxenstore.so.4",), ("xenstore.h",)),
    "xenlight": (("libxenlight.so.4.17",), ("libxl.h", "_libxl_types.h")),
    "xentoollog": (("libxentoollog.so.1",), ("xentoollog.h",)),
    "xencall": (("libxencall.so.1",), ("xencall.h",)),
}

# name -> (library, return type, argument types), as the headers declare
# them (const and parameter names dropped, arrays as pointers).
PROTOTYPES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # libxentoollog
    "xtl_createlogger_stdiostream": (
        "xentoollog",
        "xentoollog_logger_stdiostream *",
        ("FILE *", "xentoollog_level", "unsigned int"),
    ),
    "xtl_logger_destroy": ("xentoollog", "void", ("xentoollog_logger *",)),
    # libxenctrl
    "xc_interface_open": (
        "xenctrl",
        "xc_interface *",
        ("xentoollog_logger *", "xentoollog_logger *", "unsigned int"),
    ),
    "xc_interface_close": ("xenctrl", "int", ("xc_interface *",)),
    "xc_version": ("xenctrl", "int", ("xc_interface *", "int", "void *")),
    "xc_physinfo": ("xenctrl", "int", ("xc_interface *", "xc_physinfo_t *")),
    "xc_sched_id": ("xenctrl", "int", ("xc_interface *", "int *")),
    "xc_domain_getinfolist": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "unsigned int", "xc_domaininfo_t *"),
    ),
    "xc_domain_pause": ("xenctrl", "int", ("xc_interface *", "uint32_t")),
    "xc_domain_unpause": ("xenctrl", "int", ("xc_interface *", "uint32_t")),
    "xc_domain_shutdown": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "int"),
    ),
    "xc_domain_hvm_getcontext": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "uint8_t *", "uint32_t"),
    ),
    "xc_domain_hvm_setcontext": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "uint8_t *", "uint32_t"),
    ),
    "xc_hvm_param_get": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "uint32_t", "uint64_t *"),
    ),
    "xc_hvm_param_set": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "uint32_t", "uint64_t"),
    ),
    "xc_domain_get_tsc_info": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "uint32_t *",
            "uint64_t *",
            "uint32_t *",
            "uint32_t *",
        ),
    ),
    "xc_domain_set_tsc_info": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "uint32_t",
            "uint64_t",
            "uint32_t",
            "uint32_t",
        ),
    ),
    "xc_shadow_control": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "unsigned int",
            "unsigned int *",
            "unsigned int",
        ),
    ),
    "xc_logdirty_control": (
        "xenctrl",
        "long long",
        (
            "xc_interface *",
            "uint32_t",
            "unsigned int",
            "xc_hypercall_buffer_t *",
            "unsigned long",
            "unsigned int",
            "xc_shadow_op_stats_t *",
        ),
    ),
    "xc__hypercall_buffer_alloc_pages": (
        "xenctrl",
        "void *",
        ("xc_interface *", "xc_hypercall_buffer_t *", "int"),
    ),
    "xc__hypercall_buffer_free_pages": (
        "xenctrl",
        "void",
        ("xc_interface *", "xc_hypercall_buffer_t *", "int"),
    ),
    "xc_domain_maximum_gpfn": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "xen_pfn_t *"),
    ),
    "xc_gnttab_get_version": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t"),
    ),
    # The op is bounced by libxenctrl; handles inside it must point to
    # hypercall buffers.
    "xc_gnttab_op": (
        "xenctrl",
        "int",
        ("xc_interface *", "int", "void *", "int", "int"),
    ),
    "xc_domain_add_to_physmap": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "unsigned int",
            "unsigned long",
            "xen_pfn_t",
        ),
    ),
    "xc_domain_decrease_reservation_exact": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "unsigned long",
            "unsigned int",
            "xen_pfn_t *",
        ),
    ),
    "xc_domain_populate_physmap_exact": (
        "xenctrl",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "unsigned long",
            "unsigned int",
            "unsigned int",
            "xen_pfn_t *",
        ),
    ),
    "xc_evtchn_status": (
        "xenctrl",
        "int",
        ("xc_interface *", "xc_evtchn_status_t *"),
    ),
    "xc_sched_credit_domain_set": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "xen_domctl_sched_credit *"),
    ),
    "xc_sched_credit2_domain_set": (
        "xenctrl",
        "int",
        ("xc_interface *", "uint32_t", "xen_domctl_sched_credit2 *"),
    ),
    # libxencall: the patched hypervisor's domctls (host/xen/context.py)
    "xencall_open": (
        "xencall",
        "xencall_handle *",
        ("xentoollog_logger *", "unsigned int"),
    ),
    "xencall_close": ("xencall", "int", ("xencall_handle *",)),
    "xencall_alloc_buffer": (
        "xencall",
        "void *",
        ("xencall_handle *", "size_t"),
    ),
    "xencall_free_buffer": (
        "xencall",
        "void",
        ("xencall_handle *", "void *"),
    ),
    "xencall1": (
        "xencall",
        "int",
        ("xencall_handle *", "unsigned int", "uint64_t"),
    ),
    # libxenguest
    "xc_domain_resume": (
        "xenguest",
        "int",
        ("xc_interface *", "uint32_t", "int"),
    ),
    "xc_set_domain_cpu_policy": (
        "xenguest",
        "int",
        (
            "xc_interface *",
            "uint32_t",
            "uint32_t",
            "xen_cpuid_leaf_t *",
            "uint32_t",
            "xen_msr_entry_t *",
            "uint32_t *",
            "uint32_t *",
            "uint32_t *",
        ),
    ),
    # libxenforeignmemory
    "xenforeignmemory_open": (
        "xenforeignmemory",
        "xenforeignmemory_handle *",
        ("xentoollog_logger *", "unsigned int"),
    ),
    "xenforeignmemory_close": (
        "xenforeignmemory",
        "int",
        ("xenforeignmemory_handle *",),
    ),
    "xenforeignmemory_map": (
        "xenforeignmemory",
        "void *",
        (
            "xenforeignmemory_handle *",
            "uint32_t",
            "int",
            "size_t",
            "xen_pfn_t *",
            "int *",
        ),
    ),
    "xenforeignmemory_unmap": (
        "xenforeignmemory",
        "int",
        ("xenforeignmemory_handle *", "void *", "size_t"),
    ),
    "xenforeignmemory_map_resource": (
        "xenforeignmemory",
        "xenforeignmemory_resource_handle *",
        (
            "xenforeignmemory_handle *",
            "domid_t",
            "unsigned int",
            "unsigned int",
            "unsigned long",
            "unsigned long",
            "void **",
            "int",
            "int",
        ),
    ),
    "xenforeignmemory_unmap_resource": (
        "xenforeignmemory",
        "int",
        ("xenforeignmemory_handle *", "xenforeignmemory_resource_handle *"),
    ),
    # libxenstore
    "xs_open": ("xenstore", "xs_handle *", ("unsigned long",)),
    "xs_close": ("xenstore", "void", ("xs_handle *",)),
    "xs_read": (
        "xenstore",
        "void *",
        ("xs_handle *", "xs_transaction_t", "char *", "unsigned int *"),
    ),
    "xs_write": (
        "xenstore",
        "bool",
        (
            "xs_handle *",
            "xs_transaction_t",
            "char *",
            "void *",
            "unsigned int",
        ),
    ),
    "xs_resume_domain": ("xenstore", "bool", ("xs_handle *", "unsigned int")),
    "xs_is_domain_introduced": (
        "xenstore",
        "bool",
        ("xs_handle *", "unsigned int"),
    ),
    "xs_directory": (
        "xenstore",
        "char **",
        ("xs_handle *", "xs_transaction_t", "char *", "unsigned int *"),
    ),
    # XS_CONTROL: the command, its NUL-separated arguments; the reply
    # is freed by the caller (xsmig binds it returning the pointer).
    "xs_control_command": (
        "xenstore",
        "char *",
        ("xs_handle *", "char *", "void *", "unsigned int"),
    ),
    # Freed by the caller.
    "xs_get_permissions": (
        "xenstore",
        "xs_permissions *",
        ("xs_handle *", "xs_transaction_t", "char *", "unsigned int *"),
    ),
    "xs_set_permissions": (
        "xenstore",
        "bool",
        (
            "xs_handle *",
            "xs_transaction_t",
            "char *",
            "xs_permissions *",
            "unsigned int",
        ),
    ),
    # libxenlight
    "libxl_ctx_alloc": (
        "xenlight",
        "int",
        ("libxl_ctx **", "int", "unsigned int", "xentoollog_logger *"),
    ),
    "libxl_ctx_free": ("xenlight", "int", ("libxl_ctx *",)),
    "libxl_domain_config_init": (
        "xenlight",
        "void",
        ("libxl_domain_config *",),
    ),
    "libxl_domain_config_dispose": (
        "xenlight",
        "void",
        ("libxl_domain_config *",),
    ),
    "libxl_domain_config_from_json": (
        "xenlight",
        "int",
        ("libxl_ctx *", "libxl_domain_config *", "char *"),
    ),
    # Ask the guest (xenstore control/shutdown) and return: ao_how NULL.
    "libxl_domain_shutdown": (
        "xenlight",
        "int",
        ("libxl_ctx *", "uint32_t", "libxl_asyncop_how *"),
    ),
    "libxl_domain_create_new": (
        "xenlight",
        "int",
        (
            "libxl_ctx *",
            "libxl_domain_config *",
            "uint32_t *",
            "libxl_asyncop_how *",
            "libxl_asyncprogress_how *",
        ),
    ),
}


class XenCallError(base.HostError):
    """A Xen library call failed."""


class LibraryMissing(base.NotSupported):
    """A Xen library is not installed on this machine."""


def ctype(spelling: str) -> Any:
    """The ctypes type of a C type as :data:`PROTOTYPES` spells it."""
    try:
        return CTYPES[spelling]
    except KeyError:
        raise ValueError(f"no ctypes type for C type {spelling!r}") from None


_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def library(name: str) -> ctypes.CDLL:
    """The shared library ``name`` (a :data:`LIBRARIES` key), loaded once
    with errno capture."""
    with _lock:
        lib = _loaded.get(name)
        if lib is not None:
            return lib
        sonames, _ = LIBRARIES[name]
        candidates = list(sonames)
        found = ctypes.util.find_library(name)
        if found and found not in candidates:
            candidates.append(found)
        errors = []
        for soname in candidates:
            try:
                lib = ctypes.CDLL(soname, use_errno=True)
            except OSError as exc:
                errors.append(str(exc))
                continue
            _loaded[name] = lib
            return lib
        raise LibraryMissing(
            f"cannot load lib{name} ({'; '.join(errors)}); install the Xen "
            "4.17 tools (Debian xen-utils-4.17)",
            call="dlopen",
        )


def function(name: str) -> Any:
    """The C function ``name`` with its prototype applied."""
    lib_name, restype, argtypes = PROTOTYPES[name]
    fn = getattr(library(lib_name), name)
    fn.restype = ctype(restype)
    fn.argtypes = [ctype(a) for a in argtypes]
    return fn


class Functions:
    """Attribute access to the bound functions, resolved on first use."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in PROTOTYPES:
            raise AttributeError(name)
        fn = function(name)
        setattr(self, name, fn)
        return fn


def raise_for(call: str, what: str = "", *, domid: int | None = None) -> None:
    """Raise the error of the failed ``call`` from the C errno."""
    err = ctypes.get_errno()
    text = os.strerror(err) if err else "failed"
    if what:
        text = f"{what}: {text}"
    cls: type[base.HostError] = XenCallError
    if domid is not None and err in (errnos.ESRCH, errnos.ENOENT):
        cls = base.DomainNotFound
        text = f"domain {domid}: {text}"
    raise cls(text, call=call, errno=err or None)


def check(call: str, rc: int, *, domid: int | None = None) -> int:
    """``rc`` when it is not negative, else raise for ``call``."""
    if rc < 0:
        raise_for(call, domid=domid)
    return rc


def check_ptr(call: str, ptr: Any, *, domid: int | None = None) -> Any:
    """``ptr`` when it is not NULL, else raise for ``call``."""
    if not ptr:
        raise_for(call, domid=domid)
    return ptr
