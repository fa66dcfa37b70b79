"""The real Xen host: :class:`XenHost` on Xen 4.17's libraries and xl.

Guests are ordinary xl domains. ``create_domain`` runs ``xl create`` on a
generated configuration. ``create_empty_domain`` builds the domain that a
stream is restored into with libxl itself, from the JSON ``xl create -n``
makes of the same configuration plus the domid (``c_info.domid``, which
``xl`` has no option for): libxl creates it paused with its device model
running, the stream then overwrites memory, HVM context, params, TSC,
CPU policy and the device model's state, as ``xl restore`` would.

Memory, log-dirty, HVM context and params, TSC and event channel status
go through libxenctrl, guest pages through libxenforeignmemory, names
through libxenstore, and the device model's state over QMP (``qmp``).
What stock Xen cannot restore (PV state) is refused with the capability
probe's reasons (``probe``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import functools
import hashlib
import json
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import numpy as np
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.conf import xen as xen_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import DomainState
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.xen import context
from nova_xen_ncm.host.xen import devices
from nova_xen_ncm.host.xen import dm
from nova_xen_ncm.host.xen import guestprobe
from nova_xen_ncm.host.xen import libs
from nova_xen_ncm.host.xen import memdigest
from nova_xen_ncm.host.xen import probe
from nova_xen_ncm.host.xen import pvctx
from nova_xen_ncm.host.xen import qmp
from nova_xen_ncm.host.xen import xl as xl_mod
from nova_xen_ncm.host.xen import xsmig

LOG = logging.getLogger(__name__)
# The name of memory_digest's definition (base.Capabilities.memory_digest).
MEMORY_DIGEST = memdigest.DEFINITION

# xen/include/public/version.h
XENVER_version = 0
XENVER_extraversion = 1
# xen/include/public/domctl.h
SHADOW_OP_OFF = 0
SHADOW_OP_ENABLE_LOGDIRTY = 2
SHADOW_OP_CLEAN = 11
SHADOW_OP_PEEK = 12
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0
# xen/include/public/sysctl.h
XEN_SCHEDULER_CREDIT = 5
XEN_SCHEDULER_CREDIT2 = 6
CAP_UNCHANGED = 0xFFFF
# xentoollog.h: XTL_ERROR
XTL_ERROR = 8
# libxl_error (_libxl_types.h): the guest has no PV control interface.
LIBXL_ERROR_NOPARAVIRT = -10
PROT_READ = 1
PROT_WRITE = 2
# xen/include/public/memory.h
XENMEM_resource_grant_table = 1
# Pages per foreign mapping (Xen's own save maps 1024 at a time).
MAP_BATCH = 1024
# libxl_types.idl: libxl_device_model_version QEMU_XEN is emulator 2 in
# the stream (libxl-migration-stream EMULATOR_CONTEXT).
EMULATOR_QEMU_UPSTREAM = 2
# The HVM params Xen's save writes (xg_sr_save_x86_hvm.c write_hvm_params)
# and HVM_PARAM_CALLBACK_IRQ, the "PV drivers are installed" signal.
HVM_PARAM_CALLBACK_IRQ = 0
SAVED_HVM_PARAMS = (
    0,  # CALLBACK_IRQ
    1,  # STORE_PFN
    5,  # IOREQ_PFN
    6,  # BUFIOREQ_PFN
    27,  # PAGING_RING_PFN
    28,  # MONITOR_RING_PFN
    29,  # SHARING_RING_PFN
    37,  # VM86_TSS_SIZED
    17,  # CONSOLE_PFN
    19,  # ACPI_IOPORTS_LOCATION
    9,  # VIRIDIAN
    12,  # IDENT_PT
    34,  # VM_GENERATION_ID_ADDR
    32,  # IOREQ_SERVER_PFN
    33,  # NR_IOREQ_SERVER_PAGES
    36,  # X87_FIP_WIDTH
    38,  # MCA_CAP
)
# HVM save record types whose content moves with wall-clock time while
# the guest is paused (the CPU record's TSC, the HPET main counter, the
# PM timer); the PLATFORM digest covers the rest, and their type and
# instance (xen/include/public/arch-x86/hvm/save.h).
# HVM params naming pages shared with dom0's daemons (hvm/params.h):
# STORE_PFN, IOREQ_PFN, BUFIOREQ_PFN, CONSOLE_PFN, PAGING_RING_PFN,
# MONITOR_RING_PFN, SHARING_RING_PFN.
SHARED_PAGE_PARAMS = (1, 5, 6, 17, 27, 28, 29)
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_VIRIDIAN = 9
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
# hvmloader's reserved area (RESERVED_MEMBASE 0xFC000000 up to 4 GiB):
# ACPI tables, the special pages and shared_info sit there.
RESERVED_PFN_FIRST = 0xFC000
HVM_SAVE_CPU = 2
TIME_VARYING_SAVE_TYPES = frozenset({12, 13})  # HPET, PMTIMER
# struct hvm_hw_isa_irq: the asserted ISA lines. IRQ 0 (PIT) and IRQ 8
# (RTC) rise and fall with the timers, so a restored copy taken a moment
# later may differ there; every other line is state.
HVM_SAVE_ISA_IRQ = 8
ISA_TIMER_LINES = ((0, 0x01), (1, 0x01))  # (octet, mask): IRQ 0, IRQ 8
# struct hvm_hw_rtc: cmos_data[14], cmos_index, pad, rtc_offset. The
# clock and date registers (0, 2, 4, 6-9) and register C's interrupt
# flags (12) follow wall-clock time; the alarm, the other status
# registers and the guest's offset from host time are state.
HVM_SAVE_RTC = 11
RTC_TIME_OCTETS = (0, 2, 4, 6, 7, 8, 9, 12)
# struct hvm_hw_cpu: fpu_regs[512], 18 GPRs and flags, 4 CRs, 6 DRs,
# segment selectors, limits, bases and attributes, SYSENTER, shadow_gs,
# 7 MSRs, then tsc.
HVM_CPU_TSC_OFFSET = 1008
# How long a freshly destroyed domid stays unusable for libxl (libxl
# LIBXL_DOMID_REUSE_TIMEOUT, 60 s by default); a restore puts the same
# guest back under its own domid, which is what the delay guards against
# for a different one. libxl reads it with getenv() and has no per-call
# setting, and a threaded service must not change its own environment:
# it is a start-up requirement (the service's unit sets it), checked when
# the driver loads; without it the driver reports that it cannot keep
# domids, and every migration is refused at SETUP.
DOMID_REUSE_ENV = "LIBXL_DOMID_REUSE_TIMEOUT"
DOMID_REUSE_REASON = (
    f"libxl refuses a domid destroyed in the last {DOMID_REUSE_ENV} "
    f"seconds (60 by default): start the service with {DOMID_REUSE_ENV}=0 "
    "in its environment (for example Environment= in its systemd unit)"
)
CONTEXT_LIMIT = 1 << 24


class _Fns(libs.Functions):
    pass


FN = _Fns()


class _ShutDown(base.HostError):
    """The guest shut down by itself while being suspended."""


# getdomaininfo's shutdown code of a domain not shut down (Xen's
# SHUTDOWN_CODE_INVALID, masked).
_NO_SHUTDOWN = libs.XEN_DOMINF_shutdownmask
# Seconds a suspend may wait for the vCPUs' I/O requests, as libxl waits
# for a guest's suspend: the guest is frozen meanwhile, before any
# downtime budget starts.
SUSPEND_TIMEOUT = 60.0


def _shutdown_reason(flags: int) -> int:
    """getdomaininfo's shutdown code (_NO_SHUTDOWN if none)."""
    return (flags >> libs.XEN_DOMINF_shutdownshift) & (
        libs.XEN_DOMINF_shutdownmask
    )


# Xen's SHUTDOWN_* codes (public/sched.h) by name.
SHUTDOWN_NAMES = {
    0: "poweroff",
    1: "reboot",
    libs.SHUTDOWN_suspend: "suspend",
    libs.SHUTDOWN_crash: "crash",
    4: "watchdog",
    5: "soft_reset",
}


def _shutdown_name(flags: int) -> str | None:
    """The shutdown code of a domain shut down, by name; None if it is
    not shut down."""
    if not flags & libs.XEN_DOMINF_shutdown:
        return None
    code = _shutdown_reason(flags)
    return SHUTDOWN_NAMES.get(code, f"code {code}")


def _domain_state(flags: int) -> DomainState:
    if flags & libs.XEN_DOMINF_dying:
        return DomainState.DYING
    if flags & libs.XEN_DOMINF_shutdown:
        if _shutdown_reason(flags) == libs.SHUTDOWN_crash:
            return DomainState.CRASHED
        return DomainState.SHUTDOWN
    if flags & libs.XEN_DOMINF_paused:
        return DomainState.PAUSED
    return DomainState.RUNNING


def normalized_hvm_context(blob: bytes) -> list[tuple[int, int, str]]:
    """(type, instance, SHA-256) per save record of an HVM context, with
    what wall-clock time changes in a paused guest left out: two reads of
    one paused guest, or of a guest and its restored copy, compare
    equal."""
    out = []
    offset = 0
    view = memoryview(blob)
    while offset + 8 <= len(view):
        typecode = int.from_bytes(view[offset : offset + 2], "little")
        instance = int.from_bytes(view[offset + 2 : offset + 4], "little")
        length = int.from_bytes(view[offset + 4 : offset + 8], "little")
        body = bytearray(view[offset + 8 : offset + 8 + length])
        offset += 8 + length
        if typecode == HVM_SAVE_CPU and len(body) >= HVM_CPU_TSC_OFFSET + 8:
            body[HVM_CPU_TSC_OFFSET : HVM_CPU_TSC_OFFSET + 8] = bytes(8)
        if typecode == HVM_SAVE_ISA_IRQ:
            for octet, mask in ISA_TIMER_LINES:
                if octet < len(body):
                    body[octet] &= ~mask & 0xFF
        if typecode == HVM_SAVE_RTC:
            for octet in RTC_TIME_OCTETS:
                if octet < len(body):
                    body[octet] = 0
        if typecode in TIME_VARYING_SAVE_TYPES:
            body = bytearray()
        out.append((typecode, instance, hashlib.sha256(body).hexdigest()))
        if typecode == 0:  # END
            break
    return out


class XenHost(base.HostDriver):
    """The host driver of a real Xen 4.17 dom0 (``host_driver = xen``)."""

    def __init__(self, hostname: str, conf: cfg.ConfigOpts) -> None:
        self.hostname = hostname
        if xen_conf.GROUP.name not in conf:
            xen_conf.register_opts(conf)
        self.opts = getattr(conf, xen_conf.GROUP.name)
        self._xl = xl_mod.Xl(self.opts.xl_path, self.opts.command_timeout)
        self._lock = threading.RLock()
        self._xch = libs.check_ptr(
            "xc_interface_open", FN.xc_interface_open(None, None, 0)
        )
        try:
            self._fmem = libs.check_ptr(
                "xenforeignmemory_open", FN.xenforeignmemory_open(None, 0)
            )
        except BaseException:
            FN.xc_interface_close(self._xch)
            raise
        self._xsh: int | None = None
        self._ctx: context.DomainContext | None = None
        # Whether this Xen tells vcpu_info placements (XEN_DOMCTL_ncm_*):
        # asked once, not at every harvest (None: not yet).
        self._tells_placements: bool | None = None
        self._caps: base.Capabilities | None = None
        # Whether xenstored has domain-export (xsmig), asked once.
        self._xs_migrates: bool | None = None
        self._init_bookkeeping()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._libc.free.restype = None
        self._libc.fdopen.restype = ctypes.c_void_p
        self._libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self._libc.fclose.argtypes = [ctypes.c_void_p]
        # Read once, never written: see DOMID_REUSE_ENV.
        self.reuses_domids = os.environ.get(DOMID_REUSE_ENV) == "0"
        if not self.reuses_domids:
            LOG.error(
                "%s is %r in this service's environment; this host will "
                "refuse every migration: %s",
                DOMID_REUSE_ENV,
                os.environ.get(DOMID_REUSE_ENV),
                DOMID_REUSE_REASON,
            )

    def _init_bookkeeping(self) -> None:
        """What this driver keeps of each domain (no Xen call): empty."""
        # domid -> bool array of the pfns populated in a restoring domain.
        self._populated: dict[int, np.ndarray] = {}
        # domid -> bool array of the pfns of a restoring domain that may
        # hold data (written_pages): what libxl's build loaded, and the
        # pages mapped writable since.
        self._built: dict[int, np.ndarray] = {}
        # domid -> ((tot_pages, max gpfn), populated pfns).
        self._pfn_cache: dict[int, tuple[tuple[int, int], np.ndarray]] = {}
        # domid -> hypercall buffer of the log-dirty bitmap.
        self._dirty_bufs: dict[int, tuple[libs.HypercallBuffer, int]] = {}
        # The memory digests kept while log-dirty is on (memdigest).
        self._digests = memdigest.MemoryDigests()
        # domids whose device model this driver stopped.
        self._dm_stopped: set[int] = set()
        # Guests whose backends quiesce_backends unbound, until resumed.
        self._quiesced: dict[int, tuple[devices.Device, ...]] = {}
        # domid -> CLOCK_MONOTONIC time this driver destroyed it.
        self._destroyed_at: dict[int, float] = {}

    # -- helpers --

    def _xs(self) -> int:
        if self._xsh is None:
            self._xsh = libs.check_ptr("xs_open", FN.xs_open(0))
        return self._xsh

    def _xs_read(self, path: str) -> bytes | None:
        length = ctypes.c_uint()
        ptr = FN.xs_read(self._xs(), 0, path.encode(), ctypes.byref(length))
        if not ptr:
            err = ctypes.get_errno()
            if err in (errnos.ENOENT, errnos.EACCES, 0):
                return None
            libs.raise_for("xs_read", path)
        try:
            return ctypes.string_at(ptr, length.value)
        finally:
            self._libc.free(ptr)

    def _xs_write(self, path: str, value: str) -> None:
        data = value.encode()
        if not FN.xs_write(self._xs(), 0, path.encode(), data, len(data)):
            libs.raise_for("xs_write", path)

    def _getinfo(self, first: int, count: int) -> list[Any]:
        infos = (libs.XenDomctlGetDomainInfo * count)()
        n = libs.check(
            "xc_domain_getinfolist",
            FN.xc_domain_getinfolist(self._xch, first, count, infos),
        )
        return list(infos[:n])

    def _raw_info(self, domid: int, call: str) -> Any:
        found = self._getinfo(domid, 1)
        if not found or found[0].domain != domid:
            raise base.DomainNotFound(f"no domain {domid}", call=call)
        return found[0]

    def _param(self, domid: int, index: int) -> int:
        value = ctypes.c_uint64()
        libs.check(
            "xc_hvm_param_get",
            FN.xc_hvm_param_get(self._xch, domid, index, ctypes.byref(value)),
            domid=domid,
        )
        return value.value

    def _info(self, raw: Any) -> base.DomainInfo:
        domid = raw.domain
        name = self._xs_read(f"/local/domain/{domid}/name")
        target = self._xs_read(f"/local/domain/{domid}/memory/target")
        memory = int(target) * 1024 if target else raw.tot_pages * PAGE_SIZE
        pv = False
        if raw.flags & libs.XEN_DOMINF_hvm_guest and not (
            raw.flags & libs.XEN_DOMINF_dying
        ):
            with contextlib.suppress(base.HostError):
                pv = self._param(
                    domid, HVM_PARAM_CALLBACK_IRQ
                ) != 0 or self._guest_bound_ports(domid)
        return base.DomainInfo(
            domid=domid,
            name=name.decode(errors="replace") if name else f"domain-{domid}",
            uuid=str(uuidlib.UUID(bytes=bytes(raw.handle))),
            state=_domain_state(raw.flags),
            memory_bytes=memory,
            vcpus=raw.max_vcpu_id + 1,
            populated_pages=raw.tot_pages,
            pv_drivers=pv,
            cpu_time_ns=raw.cpu_time,
            shutdown_reason=_shutdown_name(raw.flags),
        )

    def _guest_bound_ports(self, domid: int) -> bool:
        """Whether the guest bound a VIRQ or an IPI: only the guest itself
        binds those in its domain, so it runs PV code even before it
        sets HVM_PARAM_CALLBACK_IRQ (or with a per-vCPU upcall vector,
        which does not set it)."""
        return any(
            chan.type in (base.EvtchnType.VIRQ, base.EvtchnType.IPI)
            for chan in self.event_channels(domid)
        )

    def _config_path(self, name: str) -> str:
        os.makedirs(self.opts.state_dir, exist_ok=True)
        return os.path.join(self.opts.state_dir, f"{name}.cfg")

    def _write_config(self, config: base.DomainConfig) -> str:
        boot = config.boot
        for key, file in (
            ("kernel", boot.kernel if boot else None),
            ("ramdisk", boot.ramdisk if boot else None),
        ):
            # Named here rather than by QEMU's exit deep in libxl's log.
            if file is not None and not os.path.isfile(file):
                raise base.HostError(
                    f"{key} {file!r} of domain {config.name!r} is not a "
                    "file on this host",
                    call="create domain",
                )
        path = self._config_path(config.name)
        with open(path, "w") as out:
            out.write(xl_mod.config_text(config))
        return path

    def hypervisor_facts(self) -> probe.HypervisorFacts:
        version = FN.xc_version(self._xch, XENVER_version, None)
        libs.check("xc_version", version)
        extra = ctypes.create_string_buffer(16)
        libs.check(
            "xc_version",
            FN.xc_version(self._xch, XENVER_extraversion, extra),
        )
        phys = libs.XenSysctlPhysinfo()
        libs.check("xc_physinfo", FN.xc_physinfo(self._xch, phys))
        # The patched interface is detected by calling it.
        with context.DomainContext() as ctx:
            ncm_evtchn = ctx.supported()
            ncm_vcpu = ctx.vcpu_supported()
        return probe.HypervisorFacts(
            major=version >> 16,
            minor=version & 0xFFFF,
            extra=extra.value.decode(errors="replace"),
            physcaps=phys.capabilities,
            ncm_evtchn=ncm_evtchn,
            ncm_vcpu=ncm_vcpu,
            xenstored_migration=self.xenstored_migrates(),
            backends_missing=tuple(sorted(devices.backends_missing().items())),
        )

    def xenstored_migrates(self) -> bool:
        """Whether this host's xenstored exports and imports a domain's
        connection (the patched one's ``domain-export``, :mod:`.xsmig`):
        asked of it once, by calling the command."""
        if self._xs_migrates is None:
            self._xs_migrates = xsmig.supported(self)
        return self._xs_migrates

    # -- lifecycle --

    def boot_id(self) -> str:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return f.read().strip()
        except OSError as exc:
            raise base.HostError(f"cannot read the boot id: {exc}") from exc

    def capabilities(self) -> base.Capabilities:
        if self._caps is None:
            facts = self.hypervisor_facts()
            restore = probe.restore_items(facts)
            if not self.reuses_domids and restore[Item.DOMID] is None:
                restore[Item.DOMID] = DOMID_REUSE_REASON
            self._caps = base.Capabilities(
                host=self.hostname,
                hypervisor=f"Xen {facts.version}",
                restore=restore,
                log_dirty=bool(facts.physcaps & probe.PHYSCAP_HAP),
                preserve_domid=restore[Item.DOMID] is None,
                max_vcpus=128,
                pcpus=self._nr_cpus(),
                memory_digest=MEMORY_DIGEST,
                # The destination's backends are created from SETUP's
                # device records, not from the stream.
                devices_named_at_setup=restore[Item.PV_DEVICES] is None,
            )
        return base.Capabilities(
            **{
                **self._caps.__dict__,
                "free_memory_bytes": self.free_memory(),
            }
        )

    def list_domains(self) -> list[base.DomainInfo]:
        with self._lock:
            return [
                self._info(raw)
                for raw in self._getinfo(1, 1024)
                if raw.domain < base.DOMID_FIRST_RESERVED
            ]

    def domain_info(self, domid: int) -> base.DomainInfo:
        if domid == 0 or not 0 < domid < base.DOMID_FIRST_RESERVED:
            raise base.DomainNotFound(
                f"{domid} is not a guest domid", call="domain_info"
            )
        with self._lock:
            return self._info(self._raw_info(domid, "domain_info"))

    def find_domain(self, name_or_uuid: str) -> base.DomainInfo:
        for info in self.list_domains():
            if name_or_uuid in (info.name, info.uuid):
                return info
        raise base.DomainNotFound(
            f"no domain named {name_or_uuid!r}", call="find_domain"
        )

    def create_domain(self, config: base.DomainConfig) -> int:
        with contextlib.suppress(base.DomainNotFound):
            self.find_domain(config.name)
            raise base.HostError(
                f"a domain named {config.name!r} exists", call="create_domain"
            )
        path = self._write_config(config)
        self._xl.run("create", path)
        return self.find_domain(config.name).domid

    def libxl_json(self, config: base.DomainConfig, domid: int) -> str:
        """The libxl domain configuration xl makes of ``config``, with
        ``domid`` as the domain's id."""
        path = self._write_config(config)
        try:
            parsed = json.loads(self._xl.run("create", "-n", path))
        except ValueError as exc:
            raise base.HostError(
                f"xl create -n printed no JSON: {exc}", call="xl create"
            ) from None
        parsed.setdefault("c_info", {})["domid"] = domid
        return json.dumps(parsed)

    def create_empty_domain(
        self, config: base.DomainConfig, domid: int
    ) -> int:
        call = "create_empty_domain"
        if not 0 < domid < base.DOMID_FIRST_RESERVED:
            raise base.HostError(f"{domid} is not a guest domid", call=call)
        try:
            holder = self.domain_info(domid)
        except base.DomainNotFound:
            pass
        else:
            raise base.DomidInUse(
                f"domid {domid} is held by {holder.name!r}", call=call
            )
        with contextlib.suppress(base.DomainNotFound):
            other = self.find_domain(config.name)
            raise base.HostError(
                f"a domain named {config.name!r} exists (domid {other.domid})",
                call=call,
            )
        free = self.free_memory()
        if free < config.memory_bytes:
            raise base.InsufficientMemory(
                f"{config.memory_bytes} bytes needed, {free} free", call=call
            )
        # A migrating guest's backends are created with the domain, in
        # InitWait until its frontends' nodes come (devices): what each
        # opens must be here, checked before anything is created.
        devices.check_configs(config.devices)
        text = self.libxl_json(config, domid)
        self._wait_out_destroy_second(domid)
        created = self._libxl_create(text, call)
        if created != domid:
            self._best_effort_destroy(created)
            raise base.HostError(
                f"libxl created domain {created}, not {domid}", call=call
            )
        # libxl's build loaded hvmloader and its firmware modules into
        # the new domain's RAM (a restore's libxl skips the build; this
        # one cannot): the guest's own content, which the stream brings,
        # may have zero there, sent without data (XALLOC), and the
        # restorer clears what written_pages says may hold data. Read in
        # the same pass as the populated pfns are probed: mapping every
        # pfn is most of its cost, proportional to the guest's RAM, in
        # SETUP.
        try:
            key = self._pfn_key(domid, call)
            mask, built = self._probe_pages(domid, read=True)
            shared = self._shared_with_dom0(domid)
        except BaseException:
            # Not restorable without them: nor left behind.
            self._best_effort_destroy(domid)
            raise
        pfns = self._keep_pfns(domid, key, mask)
        self._populated[domid] = mask
        self._built[domid] = built
        # The memory digest is kept from this read on, as a source's is
        # from log-dirty's start: the blocks of zero pages have their
        # terms now, the others (what the build loaded) are read before
        # the pause, and each writable mapping marks the blocks it wrote
        # (_XenPageMapping.close): at READY only what was written since
        # the last settle_digest is read.
        self._digests.start_restoring(
            domid,
            base.pfn_difference(pfns, shared),
            (key, shared.tobytes()),
            np.flatnonzero(built).astype(np.uint64),
        )
        return domid

    def written_pages(self, domid: int, pfns: np.ndarray) -> np.ndarray:
        """For a domain being restored: the pages libxl's build loaded
        something into and those mapped writable since; the others are
        zero as Xen populated them. For any other domain every page (a
        guest's writes are not known without log-dirty)."""
        built = self._built.get(domid)
        if built is None:
            return super().written_pages(domid, pfns)
        idx = np.asarray(pfns, dtype=np.int64)
        out = np.zeros(len(idx), dtype=bool)
        inside = idx < len(built)
        out[inside] = built[idx[inside]]
        return out

    @contextlib.contextmanager
    def _libxl(self) -> Iterator[ctypes.c_void_p]:
        """A libxl context logging to stderr, freed afterwards."""
        stream = self._stderr()
        try:
            lib_log = libs.check_ptr(
                "xtl_createlogger_stdiostream",
                FN.xtl_createlogger_stdiostream(stream, XTL_ERROR, 0),
            )
        except BaseException:
            self._libc.fclose(stream)
            raise
        ctx = ctypes.c_void_p()
        try:
            if FN.libxl_ctx_alloc(ctypes.byref(ctx), 0, 0, lib_log) != 0:
                libs.raise_for("libxl_ctx_alloc")
            yield ctx
        finally:
            FN.libxl_ctx_free(ctx)
            FN.xtl_logger_destroy(lib_log)
            # The logger flushes its stream but leaves it open: one
            # descriptor a call otherwise.
            self._libc.fclose(stream)

    def shutdown(self, domid: int, reboot: bool = False) -> None:
        """libxl's shutdown request, as ``xl shutdown`` without ``-w``:
        "poweroff" in the guest's xenstore control/shutdown, then back;
        the guest's PV drivers act on it. A guest without them cannot be
        asked (libxl's NOPARAVIRT). No reboot: domains here are created
        through libxl without xl's monitoring process, so nothing would
        build again a guest that shut down to reboot (Nova's soft reboot
        becomes a hard one)."""
        call = "libxl_domain_shutdown"
        if reboot:
            raise base.NotSupported(
                "no toolstack process here restarts a guest that shuts "
                "down to reboot",
                call=call,
            )
        self.domain_info(domid)
        with self._libxl() as ctx:
            rc = FN.libxl_domain_shutdown(ctx, domid, None)
        if rc == LIBXL_ERROR_NOPARAVIRT:
            raise base.NotSupported(
                f"domain {domid} has no PV control interface (no PV "
                "drivers): it cannot be asked to shut down",
                call=call,
            )
        if rc != 0:
            raise base.HostError(
                f"libxl could not ask domain {domid} to shut down "
                f"(error {rc})",
                call=call,
            )

    def _libxl_create(self, config_json: str, call: str) -> int:
        # Large enough for libxl_domain_config, which libxl fills in.
        d_config = ctypes.create_string_buffer(1 << 16)
        with self._libxl() as ctx:
            FN.libxl_domain_config_init(d_config)
            try:
                rc = FN.libxl_domain_config_from_json(
                    ctx, d_config, config_json.encode()
                )
                if rc != 0:
                    raise base.HostError(
                        f"libxl rejected the configuration (error {rc})",
                        call="libxl_domain_config_from_json",
                    )
                domid = ctypes.c_uint32(0)
                rc = FN.libxl_domain_create_new(
                    ctx, d_config, ctypes.byref(domid), None, None
                )
                if rc != 0:
                    raise base.HostError(
                        f"libxl could not create the domain (error {rc}; "
                        "its log is on stderr)",
                        call="libxl_domain_create_new",
                    )
                return domid.value
            finally:
                FN.libxl_domain_config_dispose(d_config)

    def _stderr(self) -> int:
        fd = os.dup(2)
        stream = self._libc.fdopen(fd, b"w")
        if not stream:
            os.close(fd)
        return libs.check_ptr("fdopen", stream)

    def _best_effort_destroy(self, domid: int) -> None:
        # Whatever xl says, nothing known of this domain may outlive it: a
        # domain created again under the domid would otherwise inherit
        # its populated-page map.
        self._forget(domid)
        try:
            self._xl.run("destroy", str(domid))
        except base.HostError as exc:
            LOG.error("Could not destroy domain %d: %s", domid, exc)
        self._destroyed_at[domid] = time.monotonic()

    def destroy_domain(self, domid: int, delete_disks: bool = False) -> None:
        # The disks are Nova's images and volumes: this host makes none.
        self.domain_info(domid)
        self._forget(domid)
        self._xl.run("destroy", str(domid))
        self._destroyed_at[domid] = time.monotonic()

    def _wait_out_destroy_second(self, domid: int) -> None:
        # libxl's domid history keeps whole CLOCK_MONOTONIC seconds: even
        # with no reuse delay it takes a domid destroyed in the current
        # second for a recent one. A restore under the same domid right
        # after a destroy (the same guest) waits for the next second.
        at = self._destroyed_at.pop(domid, None)
        if at is None:
            return
        wait = int(at) + 1 - time.monotonic()
        if wait > 0:
            time.sleep(wait + 0.01)

    def _forget(self, domid: int) -> None:
        self._digests.stop(domid)
        self._populated.pop(domid, None)
        self._built.pop(domid, None)
        self._pfn_cache.pop(domid, None)
        self._dm_stopped.discard(domid)
        buf = self._dirty_bufs.pop(domid, None)
        if buf is not None:
            FN.xc__hypercall_buffer_free_pages(self._xch, buf[0], buf[1])

    def pause(self, domid: int) -> None:
        libs.check(
            "xc_domain_pause",
            FN.xc_domain_pause(self._xch, domid),
            domid=domid,
        )

    def pause_for_save(self, domid: int) -> None:
        """Pause an HVM guest with a device model as libxl suspends one
        without PV drivers: a plain pause can stop a vCPU with an I/O
        request to QEMU outstanding, which the restored QEMU never
        answers. Xen defers a suspend's stop of each vCPU until its
        request completes; once all are stopped the domain is paused
        and the suspend undone (the guest sees nothing of it), and QEMU
        is stopped before any state is read, as libxl does."""
        with self._lock:
            raw = self._raw_info(domid, "pause_for_save")
        # Paused already (by another caller since the guest was seen
        # running), no vCPU could finish its request for a suspend.
        if not (
            raw.flags & libs.XEN_DOMINF_hvm_guest
            and not raw.flags & libs.XEN_DOMINF_paused
            and os.path.exists(self._qmp_path(domid))
        ):
            self.pause(domid)
            self._refuse_shut_down(domid)
            return
        libs.check(
            "xc_domain_shutdown",
            FN.xc_domain_shutdown(self._xch, domid, libs.SHUTDOWN_suspend),
            domid=domid,
        )
        try:
            self._wait_suspended(domid)
            self.pause(domid)
        except _ShutDown:
            raise
        except BaseException:
            self._cancel_suspend(domid)
            raise
        self._cancel_suspend(domid)
        try:
            with qmp.Qmp(
                self._qmp_path(domid), self.opts.command_timeout
            ) as session:
                session.execute("stop")
        except BaseException:
            # A stop whose answer was lost may have stopped QEMU all the
            # same: the guest must not run on with its devices stopped.
            with (
                contextlib.suppress(Exception),
                qmp.Qmp(
                    self._qmp_path(domid), self.opts.command_timeout
                ) as session,
            ):
                session.execute("cont")
            self.unpause(domid)
            raise
        self._dm_stopped.add(domid)

    def _refuse_shut_down(self, domid: int) -> None:
        """After a plain pause: a guest that shut down or crashed by
        itself while its memory was copied is not saved or migrated (its
        vCPUs would start again where it stopped), and is left as Xen
        keeps it, without this pause."""
        with self._lock:
            flags = self._raw_info(domid, "pause_for_save").flags
        if not flags & (libs.XEN_DOMINF_shutdown | libs.XEN_DOMINF_dying):
            return
        with contextlib.suppress(base.HostError):
            self.unpause(domid)
        raise _ShutDown(
            f"domain {domid} shut down (reason {_shutdown_reason(flags)}) "
            "before its pause",
            call="pause_for_save",
        )

    def _dm_left_stopped(self, domid: int) -> bool:
        """Whether the guest's QEMU is stopped though this process did
        not stop it: a save or a migration's stop-and-copy stops it, and
        the process that did may have died since (recovery unpauses the
        guest from another). Nothing else stops it while the guest is
        paused; a QEMU that does not answer is left to the unpause."""
        path = self._qmp_path(domid)
        if not os.path.exists(path):
            return False
        try:
            with qmp.Qmp(path, self.opts.command_timeout) as session:
                status = session.execute("query-status")
        except base.HostError:
            return False
        return isinstance(status, dict) and status.get("status") == "paused"

    def _cancel_suspend(self, domid: int) -> None:
        # As libxl cancels a suspend: the vCPUs stopped for it go on
        # (unless the domain is paused), the domain no longer shut down.
        libs.check(
            "xc_domain_resume",
            FN.xc_domain_resume(self._xch, domid, 0),
            domid=domid,
        )
        # xenstored marked the domain shut down when Xen told it of the
        # suspend, and until told otherwise fires @releaseDomain for it
        # no more: the guest's own shutdown or crash later would go
        # unnoticed by xl and every other watcher. Not worth the guest's
        # pause or failing the save, which run on without it.
        with self._lock:
            try:
                if not FN.xs_resume_domain(self._xs(), domid):
                    libs.raise_for("xs_resume_domain", domid=domid)
            except base.HostError as exc:
                LOG.error(
                    "xenstored still takes domain %d for shut down (its "
                    "own shutdown will fire no @releaseDomain): %s",
                    domid,
                    exc,
                )

    def _wait_suspended(self, domid: int) -> None:
        bound = min(self.opts.command_timeout, SUSPEND_TIMEOUT)
        deadline = time.monotonic() + bound
        delay = 0.001
        while True:
            with self._lock:
                flags = self._raw_info(domid, "pause_for_save").flags
            reason = _shutdown_reason(flags)
            if reason not in (libs.SHUTDOWN_suspend, _NO_SHUTDOWN):
                # The guest's own shutdown, which Xen took before the
                # suspend (it keeps the first reason): not to be undone,
                # even while a vCPU still defers it.
                raise _ShutDown(
                    f"domain {domid} shut down (reason {reason}) while "
                    "being suspended",
                    call="pause_for_save",
                )
            if flags & libs.XEN_DOMINF_shutdown:
                return
            if time.monotonic() > deadline:
                raise base.HostError(
                    f"domain {domid}'s vCPUs did not stop within "
                    f"{bound:g}s of the suspend (an I/O "
                    "request its device model does not answer)",
                    call="pause_for_save",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def unpause(self, domid: int) -> None:
        if domid in self._dm_stopped or self._dm_left_stopped(domid):
            with qmp.Qmp(self._qmp_path(domid)) as session:
                session.execute("cont")
            self._dm_stopped.discard(domid)
        libs.check(
            "xc_domain_unpause",
            FN.xc_domain_unpause(self._xch, domid),
            domid=domid,
        )
        self._populated.pop(domid, None)
        # Running, it writes where it will.
        self._stop_restoring(domid)

    def _stop_restoring(self, domid: int) -> None:
        """Nothing more is known of what writes the restored domain's
        memory: neither which pages may hold data nor its digest."""
        if self._built.pop(domid, None) is not None:
            self._digests.stop(domid)

    def _nr_cpus(self) -> int:
        phys = libs.XenSysctlPhysinfo()
        libs.check("xc_physinfo", FN.xc_physinfo(self._xch, phys))
        return phys.nr_cpus

    def free_memory(self) -> int:
        phys = libs.XenSysctlPhysinfo()
        libs.check("xc_physinfo", FN.xc_physinfo(self._xch, phys))
        return phys.free_pages * PAGE_SIZE

    def console_output(self, domid: int) -> str:
        info = self.domain_info(domid)
        path = f"/var/log/xen/console/guest-{info.name}.log"
        try:
            with open(path, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            raise base.NotSupported(
                f"no console log {path}: start xenconsoled with --log=guest",
                call="console_output",
            ) from None

    def libxl_config(self, domid: int) -> dict[str, Any] | None:
        """The domain's libxl configuration (``xl list -l``), for the
        ``xl`` header of a save file."""
        self.domain_info(domid)
        configs = self._xl.list_long(domid)
        if domid not in configs:
            # xl keeps no configuration for domains it did not create
            # (or lost it): the save file then describes the guest from
            # its domain info.
            LOG.warning("xl list -l has no configuration of domain %d", domid)
            return None
        return configs[domid]

    # -- memory --

    def _max_gpfn(self, domid: int) -> int:
        gpfn = ctypes.c_ulong()
        libs.check(
            "xc_domain_maximum_gpfn",
            FN.xc_domain_maximum_gpfn(self._xch, domid, ctypes.byref(gpfn)),
            domid=domid,
        )
        return gpfn.value

    def _populated_mask(self, domid: int) -> np.ndarray:
        """Which pfns up to the maximum gpfn are populated: Xen maps
        those and refuses the others."""
        return self._probe_pages(domid, read=False)[0]

    def _probe_pages(
        self, domid: int, *, read: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which pfns up to the maximum gpfn are populated and, with
        ``read``, which of those hold a non-zero octet, read while they
        are mapped (only those: a pfn Xen refused faults if touched)."""
        top = self._max_gpfn(domid) + 1
        mask = np.zeros(top, dtype=bool)
        nonzero = np.zeros(top if read else 0, dtype=bool)
        for start in range(0, top, MAP_BATCH):
            n = min(MAP_BATCH, top - start)
            pfns = np.arange(start, start + n, dtype=np.uint64)
            arr = (ctypes.c_ulong * n).from_buffer(pfns)
            err = (ctypes.c_int * n)()
            addr = FN.xenforeignmemory_map(
                self._fmem, domid, PROT_READ, n, arr, err
            )
            if not addr:
                libs.raise_for("xenforeignmemory_map", domid=domid)
            try:
                ok = np.frombuffer(err, dtype=np.int32) == 0
                rows = np.flatnonzero(ok)
                if read and len(rows):
                    region = (ctypes.c_char * (n * PAGE_SIZE)).from_address(
                        addr
                    )
                    found = base.nonzero_pages(memoryview(region), rows)
                    nonzero[start + rows[found]] = True
            finally:
                FN.xenforeignmemory_unmap(self._fmem, addr, n)
            mask[start : start + n] = ok
        return mask, nonzero

    def _pfn_key(self, domid: int, call: str) -> tuple[int, int]:
        raw = self._raw_info(domid, call)
        return (raw.tot_pages, self._max_gpfn(domid))

    def populated_pfns(self, domid: int) -> np.ndarray:
        # Probing every pfn costs a hypercall each, so the answer is kept
        # while the domain's page count and top gpfn stay the same: an HVM
        # guest without a balloon driver never changes its physmap.
        key = self._pfn_key(domid, "populated_pfns")
        cached = self._pfn_cache.get(domid)
        if cached is None or cached[0] != key:
            return self._keep_pfns(domid, key, self._populated_mask(domid))
        return cached[1]

    def _keep_pfns(
        self, domid: int, key: tuple[int, int], mask: np.ndarray
    ) -> np.ndarray:
        """Keeps the populated pfns of ``mask`` under ``key`` (see
        populated_pfns) and returns them."""
        return self._keep_pfns_sorted(
            domid, key, np.flatnonzero(mask).astype(np.uint64)
        )

    def _keep_pfns_sorted(
        self, domid: int, key: tuple[int, int], pfns: np.ndarray
    ) -> np.ndarray:
        # Given as is, read-only, not copied: a migration's rounds then
        # know the p2m unchanged by the array's identity and compare
        # nothing in the guest's size (8 octets a page for the copy, a
        # bitmap of the physmap for the comparison).
        pfns.flags.writeable = False
        self._pfn_cache[domid] = (key, pfns)
        return pfns

    def populate(self, domid: int, pfns: np.ndarray) -> None:
        pfns = np.asarray(pfns, dtype=np.uint64)
        if not len(pfns):
            return
        mask = self._populated.get(domid)
        if mask is None:
            mask = self._populated_mask(domid)
            self._populated[domid] = mask
        top = int(pfns.max()) + 1
        if top > len(mask):
            grown = np.zeros(top, dtype=bool)
            grown[: len(mask)] = mask
            mask = self._populated[domid] = grown
        new = np.unique(pfns[~mask[pfns.astype(np.int64)]])
        if not len(new):
            return
        cached = self._pfn_cache.pop(domid, None)
        added = []
        for start in range(0, len(new), MAP_BATCH):
            chunk = new[start : start + MAP_BATCH]
            arr = (ctypes.c_ulong * len(chunk))(*chunk.tolist())
            rc = FN.xc_domain_populate_physmap_exact(
                self._xch, domid, len(chunk), 0, 0, arr
            )
            if rc < 0 and ctypes.get_errno() == errnos.EBUSY:
                # Some of them already have a p2m entry that a foreign
                # mapping does not show (Xen-owned pages): one at a time,
                # keeping those.
                for pfn in chunk.tolist():
                    one = (ctypes.c_ulong * 1)(pfn)
                    rc = FN.xc_domain_populate_physmap_exact(
                        self._xch, domid, 1, 0, 0, one
                    )
                    if rc >= 0:
                        added.append(pfn)
                    elif ctypes.get_errno() != errnos.EBUSY:
                        libs.raise_for(
                            "xc_domain_populate_physmap_exact",
                            f"pfn {pfn:#x}",
                            domid=domid,
                        )
                rc = 0
            else:
                libs.check("xc_domain_populate_physmap_exact", rc, domid=domid)
                added.extend(chunk.tolist())
            mask[chunk.astype(np.int64)] = True
        self._populated_more(domid, cached, np.array(added, np.uint64))

    def _populated_more(
        self,
        domid: int,
        cached: tuple[tuple[int, int], np.ndarray] | None,
        added: np.ndarray,
    ) -> None:
        """``added`` (sorted) were populated in a restoring domain whose
        populated pfns were ``cached``: kept as the answer of
        populated_pfns, and the counted pfns of its digest, if the
        domain's page count and top gpfn say nothing else changed;
        otherwise populated_pfns probes them again."""
        if cached is None or domid not in self._built:
            return
        (tot_pages, top), before = cached
        key = self._pfn_key(domid, "populate")
        expected = (
            tot_pages + len(added),
            max(top, int(added.max()) if len(added) else top),
        )
        if key != expected:
            LOG.debug(
                "dom%d: %s pages and top gpfn after populating, %s "
                "expected: its populated pfns are probed again",
                domid,
                key,
                expected,
            )
            return
        pfns = np.union1d(before, added)
        self._keep_pfns_sorted(domid, key, pfns)
        shared = self._shared_with_dom0(domid)
        self._digests.recount(
            domid, (key, shared.tobytes()), base.pfn_difference(pfns, shared)
        )

    def map_pages(
        self, domid: int, pfns: np.ndarray, writable: bool = False
    ) -> base.PageMapping:
        built = self._built.get(domid)
        if writable and built is not None and len(pfns):
            idx = np.asarray(pfns, dtype=np.int64)
            top = int(idx.max()) + 1
            if top > len(built):
                grown = np.zeros(top, dtype=bool)
                grown[: len(built)] = built
                built = self._built[domid] = grown
            built[idx] = True
        return _XenPageMapping(self, domid, pfns, writable)

    def enable_log_dirty(self, domid: int) -> None:
        rc = FN.xc_shadow_control(
            self._xch, domid, SHADOW_OP_ENABLE_LOGDIRTY, None, 0
        )
        if rc < 0:
            # Already on (there is no query): off and on again, as Xen's
            # own save does (xg_sr_save.c enable_logdirty).
            libs.check(
                "xc_shadow_control",
                FN.xc_shadow_control(self._xch, domid, SHADOW_OP_OFF, None, 0),
                domid=domid,
            )
            libs.check(
                "xc_shadow_control",
                FN.xc_shadow_control(
                    self._xch, domid, SHADOW_OP_ENABLE_LOGDIRTY, None, 0
                ),
                domid=domid,
            )
        self._dm_dirty_log(domid, True)
        # Every write from now on is in the log, or on a page
        # _xen_written names: the digest is kept from here, each block
        # read once unless a harvest marks it again. Where this Xen cannot
        # name those pages the paused digest reads every page instead.
        if self._xen_written(domid) is not None:
            key, counted = self._counted(domid)
            self._digests.start(domid, counted, key)

    def _dm_dirty_log(self, domid: int, enable: bool) -> None:
        """Have the device model report its DMA writes into guest memory
        to Xen's log-dirty (QEMU does only while told to), as libxl does
        around a live migration (libxl__qmp_set_global_dirty_log)."""
        path = self._qmp_path(domid)
        if not os.path.exists(path):
            return
        with qmp.Qmp(path, self.opts.command_timeout) as session:
            session.execute("xen-set-global-dirty-log", enable=enable)

    def _dirty_buffer(self, domid: int, bits: int) -> libs.HypercallBuffer:
        pages = max(1, -(-bits // (8 * PAGE_SIZE)))
        held = self._dirty_bufs.get(domid)
        if held is not None and held[1] >= pages:
            return held[0]
        if held is not None:
            FN.xc__hypercall_buffer_free_pages(self._xch, held[0], held[1])
            del self._dirty_bufs[domid]
        buf = libs.HypercallBuffer()
        buf.ubuf = ctypes.c_void_p(-1 & (2**64 - 1))
        libs.check_ptr(
            "xc__hypercall_buffer_alloc_pages",
            FN.xc__hypercall_buffer_alloc_pages(self._xch, buf, pages),
        )
        self._dirty_bufs[domid] = (buf, pages)
        return buf

    def harvest_dirty(self, domid: int) -> np.ndarray:
        written = self._xen_written(domid)
        dirty = base.pfn_union(
            self._dirty_log(domid, SHADOW_OP_CLEAN),
            self._reserved_pfns(domid),
            np.zeros(0, np.uint64) if written is None else written,
        )
        self._digests.harvested(domid, dirty)
        return dirty

    def _xen_written(self, domid: int) -> np.ndarray | None:
        """The guest pages Xen writes through a global mapping of its own
        without marking them in log-dirty (Xen 4.17): each vCPU's
        registered vcpu_info (map_vcpu_info, vcpu_mark_events_pending,
        __update_vcpu_system_time) and the shared_info frame. Every
        harvest counts them dirty, so that the last round sends them and
        the paused digest reads their blocks. None where this Xen cannot
        tell the placements (no XEN_DOMCTL_ncm_vcpu) or the guest uses
        FIFO event channels (Xen writes their control blocks, whose GFNs
        no domctl tells, through event_fifo.c's global mappings)."""
        if self._tells_placements is None:
            facts = self.hypervisor_facts()
            self._tells_placements = facts.ncm_evtchn and facts.ncm_vcpu
        if not self._tells_placements:
            return None
        ctx = self._context()
        if ctx.event_channel_abi(domid) != "2-level":
            return None
        gfns = []
        for vcpu in range(self.domain_info(domid).vcpus):
            placed = ctx.get_vcpu_state(domid, vcpu).vcpu_info
            if placed is not None:
                gfns.append(placed[0])
        frame = int(self._raw_info(domid, "harvest_dirty").shared_info_frame)
        if frame not in pvctx.UNPLACED:
            gfns.append(frame)
        return np.unique(np.array(gfns, dtype=np.uint64))

    def _dirty_log(self, domid: int, op: int) -> np.ndarray:
        """The pfns in Xen's log-dirty bitmap (sorted uint64), cleared
        (SHADOW_OP_CLEAN) or left as they are (SHADOW_OP_PEEK)."""
        bits = self._max_gpfn(domid) + 1
        buf = self._dirty_buffer(domid, bits)
        stats = libs.ShadowOpStats()
        # FINAL has Xen mark the pages it holds write-mapped for an HVM
        # guest (hvm_map_guest_frame_rw, permanent) as libxc's last round
        # does: asked each time, as this driver cannot tell the last one.
        rc = FN.xc_logdirty_control(
            self._xch,
            domid,
            op,
            buf,
            bits,
            XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
            stats,
        )
        libs.check("xc_logdirty_control", rc, domid=domid)
        raw = ctypes.string_at(buf.hbuf, -(-bits // 8))
        bitmap = np.unpackbits(
            np.frombuffer(raw, dtype=np.uint8), bitorder="little"
        )[:bits]
        return np.flatnonzero(bitmap).astype(np.uint64)

    def _reserved_pfns(self, domid: int) -> np.ndarray:
        """The populated pfns of the firmware's reserved area below 4 GiB.
        Xen writes pages it maps there (the shared_info page hvmloader
        puts at the top of the hole, whose vcpu time records move while
        the guest runs) without marking them in the log-dirty bitmap;
        they are a handful, so every harvest counts them dirty (seen on
        Xen 4.17: pfn 0xfdfff differed after a migration)."""
        populated = self.populated_pfns(domid)
        lo, hi = np.searchsorted(populated, [RESERVED_PFN_FIRST, 1 << 20])
        return populated[lo:hi]

    def disable_log_dirty(self, domid: int) -> None:
        self._digests.stop(domid)
        libs.check(
            "xc_shadow_control",
            FN.xc_shadow_control(self._xch, domid, SHADOW_OP_OFF, None, 0),
            domid=domid,
        )
        try:
            self._dm_dirty_log(domid, False)
        except qmp.QmpError as exc:
            # Xen's log-dirty is off: the device model's reports go
            # nowhere, and a device model that is gone has none to make.
            LOG.warning(
                "dom%d: device model dirty log stays on: %s", domid, exc
            )
        buf = self._dirty_bufs.pop(domid, None)
        if buf is not None:
            FN.xc__hypercall_buffer_free_pages(self._xch, buf[0], buf[1])

    def set_vcpu_throttle(self, domid: int, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise base.HostError(
                f"throttle {fraction} is not in (0, 1]",
                call="set_vcpu_throttle",
            )
        info = self.domain_info(domid)
        # The cap is in percent of one physical CPU, for all vCPUs.
        cap = (
            0 if fraction >= 1 else max(1, round(fraction * 100 * info.vcpus))
        )
        sched = ctypes.c_int()
        libs.check(
            "xc_sched_id", FN.xc_sched_id(self._xch, ctypes.byref(sched))
        )
        params = libs.SchedCredit(weight=0, cap=cap)
        if sched.value == XEN_SCHEDULER_CREDIT:
            rc = FN.xc_sched_credit_domain_set(self._xch, domid, params)
            libs.check("xc_sched_credit_domain_set", rc, domid=domid)
        elif sched.value == XEN_SCHEDULER_CREDIT2:
            rc = FN.xc_sched_credit2_domain_set(self._xch, domid, params)
            libs.check("xc_sched_credit2_domain_set", rc, domid=domid)
        else:
            raise base.NotSupported(
                f"scheduler {sched.value} has no cap (credit or credit2 "
                "needed)",
                call="set_vcpu_throttle",
            )

    # -- platform state --

    def get_hvm_context(self, domid: int) -> bytes:
        size = FN.xc_domain_hvm_getcontext(self._xch, domid, None, 0)
        libs.check("xc_domain_hvm_getcontext", size, domid=domid)
        buf = (ctypes.c_uint8 * size)()
        used = FN.xc_domain_hvm_getcontext(self._xch, domid, buf, size)
        libs.check("xc_domain_hvm_getcontext", used, domid=domid)
        return bytes(buf)[:used]

    def set_hvm_context(self, domid: int, blob: bytes) -> None:
        if not 0 < len(blob) <= CONTEXT_LIMIT:
            raise base.HostError(
                f"HVM context of {len(blob)} octets", call="set_hvm_context"
            )
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        libs.check(
            "xc_domain_hvm_setcontext",
            FN.xc_domain_hvm_setcontext(self._xch, domid, buf, len(blob)),
            domid=domid,
        )

    def get_hvm_params(self, domid: int) -> dict[int, int]:
        params = {}
        for index in SAVED_HVM_PARAMS:
            value = self._param(domid, index)
            if value:
                params[index] = value
        return params

    def set_hvm_params(self, domid: int, params: Mapping[int, int]) -> None:
        for index, value in sorted(params.items()):
            rc = FN.xc_hvm_param_set(self._xch, domid, index, value)
            if rc < 0:
                libs.raise_for(
                    "xc_hvm_param_set", f"param {index} = {value:#x}"
                )

    def get_tsc_info(self, domid: int) -> base.TscInfo:
        mode = ctypes.c_uint32()
        nsec = ctypes.c_uint64()
        khz = ctypes.c_uint32()
        incarnation = ctypes.c_uint32()
        libs.check(
            "xc_domain_get_tsc_info",
            FN.xc_domain_get_tsc_info(
                self._xch,
                domid,
                ctypes.byref(mode),
                ctypes.byref(nsec),
                ctypes.byref(khz),
                ctypes.byref(incarnation),
            ),
            domid=domid,
        )
        return base.TscInfo(
            mode.value, khz.value, nsec.value, incarnation.value
        )

    def set_tsc_info(self, domid: int, info: base.TscInfo) -> None:
        # The saved incarnation, as libxc's restore passes it: Xen stores
        # it plus one (tsc_set_info), so a guest reading CPUID leaf
        # 0x40000003 sees that it runs in a new incarnation, as after any
        # Xen restore.
        incarnation = info.incarnation
        libs.check(
            "xc_domain_set_tsc_info",
            FN.xc_domain_set_tsc_info(
                self._xch, domid, info.mode, info.nsec, info.khz,
                incarnation,
            ),
            domid=domid,
        )  # fmt: skip

    def set_cpu_policy(self, domid: int, leaves: bytes, msrs: bytes) -> None:
        nl = len(leaves) // ctypes.sizeof(libs.CpuidLeaf)
        nm = len(msrs) // ctypes.sizeof(libs.MsrEntry)
        if nl * ctypes.sizeof(libs.CpuidLeaf) != len(leaves) or (
            nm * ctypes.sizeof(libs.MsrEntry) != len(msrs)
        ):
            raise base.HostError(
                "CPU policy arrays are not whole leaves and MSR entries",
                call="set_cpu_policy",
            )
        leaf_arr = (libs.CpuidLeaf * max(nl, 1)).from_buffer_copy(
            leaves or bytes(ctypes.sizeof(libs.CpuidLeaf))
        )
        msr_arr = (libs.MsrEntry * max(nm, 1)).from_buffer_copy(
            msrs or bytes(ctypes.sizeof(libs.MsrEntry))
        )
        err_leaf = ctypes.c_uint32(~0 & 0xFFFFFFFF)
        err_sub = ctypes.c_uint32(~0 & 0xFFFFFFFF)
        err_msr = ctypes.c_uint32(~0 & 0xFFFFFFFF)
        rc = FN.xc_set_domain_cpu_policy(
            self._xch, domid, nl, leaf_arr, nm, msr_arr,
            ctypes.byref(err_leaf), ctypes.byref(err_sub),
            ctypes.byref(err_msr),
        )  # fmt: skip
        if rc < 0:
            libs.raise_for(
                "xc_set_domain_cpu_policy",
                f"rejected leaf {err_leaf.value:#x}/{err_sub.value:#x}, "
                f"msr {err_msr.value:#x}",
            )

    # -- the device model --

    def _qmp_path(self, domid: int) -> str:
        return qmp.socket_path(self.opts.qmp_dir, domid)

    def get_emulator_context(self, domid: int) -> tuple[int, bytes] | None:
        """The device model's state of the paused guest (emulator id,
        blob), None when the domain has no device model. The device model
        stays stopped until :meth:`unpause`."""
        path = self._qmp_path(domid)
        if not os.path.exists(path):
            return None
        os.makedirs(self.opts.state_dir, exist_ok=True)
        state = os.path.join(self.opts.state_dir, f"qemu-save.{domid}")
        with qmp.Qmp(path, self.opts.command_timeout) as session:
            session.execute("stop")
            self._dm_stopped.add(domid)
            session.execute(
                "xen-save-devices-state", filename=state, live=False
            )
        try:
            with open(state, "rb") as saved:
                return EMULATOR_QEMU_UPSTREAM, saved.read()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(state)

    def set_emulator_context(
        self, domid: int, emulator_id: int, blob: bytes
    ) -> None:
        """Load the device model's saved state: its QEMU is restarted
        with ``-incoming``, as libxl starts it on restore (dm.py says why
        not ``xen-load-devices-state``)."""
        call = "set_emulator_context"
        if emulator_id != EMULATOR_QEMU_UPSTREAM:
            raise base.NotSupported(
                f"emulator {emulator_id}: only QEMU upstream (2) is supported",
                call=call,
            )
        pid_node = f"/local/domain/{domid}/image/device-model-pid"
        raw = self._xs_read(pid_node)
        if raw is None:
            raise base.HostError(
                f"domain {domid} has no device model to restore", call=call
            )
        old = int(raw)
        argv = dm.command_line(old)
        try:
            log_path: str | None = os.readlink(f"/proc/{old}/fd/2")
        except OSError:
            log_path = None
        if log_path is not None and not log_path.startswith("/"):
            log_path = None
        os.makedirs(self.opts.state_dir, exist_ok=True)
        state = os.path.join(self.opts.state_dir, f"qemu-resume.{domid}")
        with open(state, "wb") as out:
            out.write(blob)
        qmp_path = self._qmp_path(domid)
        try:
            dm.stop(old, qmp_path, self.opts.command_timeout)
            pid = dm.start_incoming(
                argv,
                state,
                pidfile=os.path.join(self.opts.state_dir, f"qemu.{domid}.pid"),
                log_path=log_path,
                qmp_path=qmp_path,
                timeout=self.opts.command_timeout,
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(state)
            # Started on the saved state, QEMU still realizes its devices
            # and writes their option ROMs into the guest's pfns, not
            # through map_pages, as the one libxl started at SETUP did.
            self._digests.build_rewritten(domid)
        # libxl finds the device model to kill on destroy here.
        self._xs_write(pid_node, str(pid))
        # QEMU resumes the run state it was saved in: a device model
        # stopped for the save stays stopped until unpause says cont.
        self._dm_stopped.add(domid)
        self._record_serial(domid)

    def _record_serial(self, domid: int) -> None:
        """Point xenstore's serial tty (``xl console``) at the new
        device model's pty, as libxl does after starting it."""
        node = f"/local/domain/{domid}/serial/0/tty"
        if self._xs_read(node) is None:
            return
        with qmp.Qmp(
            self._qmp_path(domid), self.opts.command_timeout
        ) as session:
            for dev in session.execute("query-chardev"):
                name = dev.get("filename", "")
                if dev.get("label") == "serial0" and name.startswith("pty:"):
                    self._xs_write(node, name[4:])

    # -- PV state --

    def _backends(self, domid: int) -> list[str]:
        """The backend areas dom0 serves for the guest."""
        found = []
        for kind in ("vif", "vbd", "qdisk", "console", "vkbd"):
            base_path = f"/local/domain/0/backend/{kind}/{domid}"
            if self._xs_read(base_path) is not None:
                found.append(base_path)
        return found

    def _refuse_pv(self, call: str) -> base.NotSupported:
        reasons = {
            k: v
            for k, v in self.capabilities().restore.items()
            if v is not None
        }
        text = "; ".join(f"{k.value}: {v}" for k, v in reasons.items())
        return base.NotSupported(
            f"{self.capabilities().hypervisor} cannot carry PV state: {text}",
            call=call,
        )

    def guest_devices(self, domid: int) -> tuple[base.DeviceConfig, ...]:
        """The guest's devices whose backends a stream carries (dom0's
        blkback and netback), as a destination creates them again: the
        vbd's disk (``target``, which the destination must reach: shared
        storage), the vif's MAC and bridge. Refused by name, at SETUP,
        when this host's backends cannot be carried (the probe's
        PV_DEVICES reason) or a device cannot (another backend, another
        backend domain, a multi-queue frontend)."""
        devs = self._carried_devices(domid, "guest_devices")
        if not devs:
            return ()
        config = self.libxl_config(domid) or {}
        disks = {
            d.get("vdev"): d
            for d in config.get("disks") or ()
            if d.get("vdev")
        }
        nics = {int(n.get("devid", -1)): n for n in config.get("nics") or ()}
        out = []
        for dev in devs:
            if dev.kind == "vbd":
                vdev = self._xs_read(f"{dev.backend}/dev")
                disk = disks.get(vdev.decode() if vdev else None, {})
                fmt = disk.get("format") or "raw"
                out.append(
                    base.DeviceConfig(
                        kind="vbd",
                        devid=dev.devid,
                        extra={
                            "target": disk.get("pdev_path")
                            or dev.medium
                            or "",
                            "format": fmt,
                        },
                    )
                )
            else:
                nic = nics.get(dev.devid, {})
                mac = self._xs_read(f"{dev.backend}/mac")
                extra = {"bridge": dev.medium} if dev.medium else {}
                out.append(
                    base.DeviceConfig(
                        kind="vif",
                        devid=dev.devid,
                        mac=(mac.decode() if mac else None) or nic.get("mac"),
                        extra=extra,
                    )
                )
        return tuple(out)

    def check_devices(self, domid: int) -> None:
        """guest_devices' refusals from xenstore alone: no ``xl list -l``
        between the last round and the pause (its pages dirtied meanwhile
        go in the downtime), nor an xl failure there."""
        self._carried_devices(domid, "check_devices")

    def _carried_devices(self, domid: int, call: str) -> list[devices.Device]:
        """The reattaching devices, refused by name if a frontend's rings
        cannot be carried (several queues)."""
        devs = self._reattaching_devices(domid, call)
        for dev in devs:
            try:
                devices.frontend_rings(pvctx.frontend_nodes(self, dev), dev)
            except devices.DeviceError as exc:
                raise base.NotSupported(
                    f"domain {domid}: {exc}", call=call
                ) from exc
        return devs

    def _reattaching_devices(
        self, domid: int, call: str
    ) -> list[devices.Device]:
        """The guest's devices but its console (xenconsoled's, which
        libxl connects to a new domain again), refused unless dom0's
        backends of each attach again to rings in use."""
        devs = [
            d for d in devices.list_devices(self, domid) if d.kind != "console"
        ]
        if not devs:
            return []
        reason = self.capabilities().restore.get(Item.PV_DEVICES)
        if reason is not None:
            names = ", ".join(d.backend for d in devs)
            raise base.NotSupported(
                f"domain {domid} has PV devices ({names}): {reason}",
                call=call,
            )
        try:
            devices.check_devices(self, domid, devs)
        except devices.DeviceError as exc:
            raise base.NotSupported(str(exc), call=call) from exc
        return devs

    def quiesce_backends(self, domid: int) -> None:
        """Unbind the paused guest's backends from their drivers and wait
        until they mapped none of its grants (:func:`.devices.unbind`):
        from then on nothing but Xen writes its memory, and the next
        harvest holds what they wrote. Undone here if it fails half way."""
        devs = self._reattaching_devices(domid, "quiesce_backends")
        if not devs:
            return
        unbound: list[devices.Device] = []
        try:
            devices.unbind(domid, devs, unbound)
            self._quiesced[domid] = tuple(unbound)
            ctx = self.domain_context()
            devices.wait_unmapped(
                lambda: pvctx._export_grant_table(self, ctx, domid),
                domid,
                unbound,
                timeout=self.opts.backend_unmap_timeout,
            )
        except BaseException:
            # What was unbound is bound again as a rollback does (a vif
            # back on its bridge, every one Connected): the engine's
            # rollback resumes only a quiesce that returned.
            self._quiesced[domid] = tuple(unbound)
            with contextlib.suppress(base.HostError):
                self.resume_backends(domid)
            raise

    def resume_backends(self, domid: int) -> None:
        """Bind the guest's backends to their drivers again (a rollback
        on the source): they attach to the rings in use as a
        destination's do, a vif is put back on its bridge, and this
        returns once every one is Connected. After a restart of the
        service, the guest's devices left without a driver are bound."""
        # The xenstore connection the PV export froze is served again
        # first (a no-op if it was not frozen).
        self.thaw_xenstore(domid)
        devs = self._quiesced.pop(domid, None)
        if devs is None:
            devs = tuple(
                d
                for d in devices.list_devices(self, domid)
                if d.kind in devices.REATTACHING
                and d.backend_domid == 0
                and not devices.bound(domid, d)
            )
        if not devs:
            return
        devices.bind(domid, devs)
        for dev in devs:
            script = self._xs_read(f"{dev.backend}/script")
            devices.run_hotplug(
                domid, dev, script.decode() if script else None
            )
        devices.wait_connected(
            self,
            domid,
            devs,
            timeout=self.opts.backend_connect_timeout,
            call="resume_backends",
        )

    def thaw_xenstore(self, domid: int) -> None:
        """Undo the freeze of ``domid``'s xenstore connection that
        :meth:`export_pv_state` leaves (the patched xenstored's; nothing
        with stock xenstored, which never froze it)."""
        if self.xenstored_migrates():
            xsmig.thaw(self, domid)

    def domain_context(self) -> context.DomainContext:
        """The patched hypervisor's domctls (:mod:`.context`), or
        NotSupported naming what this Xen lacks."""
        facts = self.hypervisor_facts()
        if not (facts.ncm_evtchn and facts.ncm_vcpu):
            raise self._refuse_pv("domain_context")
        return self._context()

    def _context(self) -> context.DomainContext:
        with self._lock:
            if self._ctx is None:
                self._ctx = context.DomainContext()
            return self._ctx

    def check_pv_exportable(self, domid: int) -> None:
        """Refuse, naming why, a guest whose PV state cannot be exported
        (FIFO event channels, grant table v2, a 32-bit guest, a port of
        Xen's own), while it still runs: before any pause."""
        self.domain_info(domid)
        pvctx.check_exportable(self, self.domain_context(), domid)

    def export_pv_state(self, domid: int) -> base.PvState:
        self.domain_info(domid)
        return pvctx.export(
            self,
            self.domain_context(),
            domid,
            self._quiesced.get(domid, ()),
        )

    def import_pv_state(self, domid: int, state: base.PvState) -> None:
        self.domain_info(domid)
        # From here the backends (in-flight requests answered) and Xen
        # (vcpu_info, runstate areas) write into the guest's pages, not
        # through map_pages: written_pages no longer knows them, nor can
        # the memory digest be kept (the engine took it just before).
        self._stop_restoring(domid)
        pvctx.import_(self, self.domain_context(), domid, state)

    def event_channels(self, domid: int) -> tuple[base.EventChannel, ...]:
        """The guest's open ports as EVTCHNOP_status reports them."""
        ports = []
        port = 1
        while True:
            status = libs.EvtchnStatus(dom=domid, port=port)
            if FN.xc_evtchn_status(self._xch, status) < 0:
                err = ctypes.get_errno()
                if err == errnos.EINVAL:
                    break  # past the last allocated port
                if err == errnos.EACCES:
                    # A port Xen itself consumes (an ioreq server's).
                    port += 1
                    continue
                libs.raise_for("xc_evtchn_status", domid=domid)
            if status.status != base.EvtchnType.CLOSED:
                kind = base.EvtchnType(status.status)
                ports.append(
                    base.EventChannel(
                        port=port,
                        type=kind,
                        vcpu=status.vcpu,
                        remote_domid=(
                            status.u.unbound_dom
                            if kind is base.EvtchnType.UNBOUND
                            else status.u.interdomain.dom
                            if kind is base.EvtchnType.INTERDOMAIN
                            else 0
                        ),
                        remote_port=(
                            status.u.interdomain.port
                            if kind is base.EvtchnType.INTERDOMAIN
                            else 0
                        ),
                        virq=status.u.virq
                        if kind is base.EvtchnType.VIRQ
                        else 0,
                        pirq=status.u.pirq
                        if kind is base.EvtchnType.PIRQ
                        else 0,
                    )
                )
            port += 1
        return tuple(ports)

    # -- observation --

    def probe(self, domid: int) -> base.GuestProbe:
        """The transparency checker's reads of the guest as a dom0 tool
        makes them (:mod:`.guestprobe`), apart from this driver's export
        and save paths."""
        self._raw_info(domid, "probe")
        return guestprobe.XenGuestProbe(
            domid,
            xch=self._xch,
            fmem=self._fmem,
            xsh=self._xs(),
            fn=FN,
            patched_xenstored=self.xenstored_migrates(),
            libc=self._libc,
        )

    def _shared_with_dom0(self, domid: int) -> np.ndarray:
        """The special pages dom0's daemons write at any time: the
        xenstore and console rings (xenstored, xenconsoled), the device
        model's ioreq pages (in the physmap only while its server is
        off) and the paging, monitor and sharing rings. They move, but
        not as guest memory: the digest leaves them out."""
        pfns = []
        for index in SHARED_PAGE_PARAMS:
            pfn = self._param(domid, index)
            if pfn:
                pfns.append(pfn)
        first = self._param(domid, HVM_PARAM_IOREQ_SERVER_PFN)
        count = self._param(domid, HVM_PARAM_NR_IOREQ_SERVER_PAGES)
        if first:
            pfns.extend(range(first, first + count))
        return np.array(pfns, dtype=np.uint64)

    def _counted(self, domid: int) -> tuple[object, np.ndarray]:
        """The pfns the memory digest counts (the populated ones less the
        pages dom0's daemons write), with a key that changes when they
        may have (the domain's page count, its top gpfn, those pages)."""
        shared = self._shared_with_dom0(domid)
        populated = self.populated_pfns(domid)
        cached = self._pfn_cache.get(domid)
        key = (None if cached is None else cached[0], shared.tobytes())
        return key, base.pfn_difference(populated, shared)

    def _counted_key(self, domid: int) -> object:
        """:meth:`_counted`'s key without listing the pfns."""
        raw = self._raw_info(domid, "memory_digest")
        return (
            (raw.tot_pages, self._max_gpfn(domid)),
            self._shared_with_dom0(domid).tobytes(),
        )

    def _read_pages(
        self,
        domid: int,
        pfns: np.ndarray,
        use: Callable[[np.ndarray], None],
    ) -> None:
        """memdigest.Reader: ``pfns`` mapped read-only, apart from the
        pre-copy's mappings (which feed the kept digest)."""
        with _XenPageMapping(self, domid, pfns, False, kept=False) as m:
            use(m.array())

    def settle_digest(self, domid: int) -> None:
        self._digests.settle(domid, functools.partial(self._read_pages, domid))

    def settle_digest_part(self, domid: int, pages: int) -> bool:
        return self._digests.settle(
            domid, functools.partial(self._read_pages, domid), pages
        )

    def memory_digest(self, domid: int) -> str:
        """memdigest.DEFINITION over the populated pfns less the pages
        shared with dom0's daemons. Under log-dirty (a migration's
        source) the digest kept since log-dirty was enabled, the blocks
        written since they were read (the harvests, and what the log
        holds now) read again (memdigest); of a domain being restored
        (a destination before its PV import or unpause) the digest kept
        since its build was read, the blocks its writable mappings wrote
        since the last settle read again, with those of the pages Xen
        may write unmapped; otherwise every page read now."""
        reader = functools.partial(self._read_pages, domid)
        # Chosen by the digest kept, not by _built: a domain restored
        # here and sent on (log-dirty enabled) is a source.
        restoring = self._digests.restoring(domid)
        if restoring and self._param(domid, HVM_PARAM_VIRIDIAN):
            # Loading a Viridian guest's context has Xen map its VP
            # assist, SynIC and reference TSC pages, which it writes
            # through mappings of its own: read whole, as they are now.
            self._digests.stop(domid)
        elif restoring:
            found = self._digests.digest(
                domid,
                self._counted_key(domid),
                functools.partial(self._counted, domid),
                self._unmapped_writes(domid),
                reader,
            )
            if found is not None:
                return found
        elif self._digests.keeps(domid):
            key = self._counted_key(domid)
            # Xen may write those pages after the last harvest (an event
            # delivered to the paused vCPU): read as they are now.
            written = self._xen_written(domid)
            if written is None:
                self._digests.stop(domid)
            else:
                found = self._digests.digest(
                    domid,
                    key,
                    functools.partial(self._counted, domid),
                    base.pfn_union(
                        self._dirty_log(domid, SHADOW_OP_PEEK), written
                    ),
                    reader,
                )
                if found is not None:
                    return found
        return memdigest.full_digest(self._counted(domid)[1], reader)

    def _unmapped_writes(self, domid: int) -> np.ndarray:
        """The pages of a domain being restored that Xen may write other
        than through this driver's mappings, read whenever its digest
        is: the firmware's reserved area (as a source harvests it every
        round) and the shared_info frame if it is in the physmap. No
        vcpu_info or runstate area is registered in a domain that never
        ran until its PV state is imported, after the digest."""
        pfns = [self._reserved_pfns(domid)]
        frame = int(self._raw_info(domid, "memory_digest").shared_info_frame)
        if frame not in pvctx.UNPLACED:
            pfns.append(np.array([frame], dtype=np.uint64))
        return base.pfn_union(*pfns)

    def guest_state(
        self,
        domid: int,
        items: Collection[Item] | None = None,
        *,
        guest_records: bool = True,
    ) -> base.GuestState:
        # The guest's records are not read here (guest_records or not).
        wanted = set(Item if items is None else items)
        out: dict[Item, object] = {}
        if Item.MEMORY in wanted:
            out[Item.MEMORY] = self.memory_digest(domid)
        if Item.PLATFORM in wanted:
            tsc = self.get_tsc_info(domid)
            out[Item.PLATFORM] = (
                tuple(normalized_hvm_context(self.get_hvm_context(domid))),
                # Not the incarnation: every restore adds one, by design.
                (tsc.mode, tsc.khz),
            )
        if Item.HVM_PARAMS in wanted:
            out[Item.HVM_PARAMS] = tuple(
                sorted(self.get_hvm_params(domid).items())
            )
        if Item.DOMID in wanted:
            out[Item.DOMID] = (domid, ())
        if Item.EVENT_CHANNELS in wanted:
            out[Item.EVENT_CHANNELS] = self.event_channels(domid)
        return base.GuestState(items=out)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        for domid in list(self._dirty_bufs):
            buf = self._dirty_bufs.pop(domid)
            FN.xc__hypercall_buffer_free_pages(self._xch, buf[0], buf[1])
        if self._xsh is not None:
            FN.xs_close(self._xsh)
            self._xsh = None
        if self._fmem is not None:
            FN.xenforeignmemory_close(self._fmem)
            self._fmem = None
        if self._xch is not None:
            FN.xc_interface_close(self._xch)
            self._xch = None


class _XenPageMapping(base.PageMapping):
    """Guest pages mapped with xenforeignmemory_map, one view each."""

    def __init__(
        self,
        host: XenHost,
        domid: int,
        pfns: np.ndarray,
        writable: bool,
        *,
        kept: bool = True,
    ) -> None:
        self._host = host
        self._domid = domid
        self.pfns = np.asarray(pfns, dtype=np.uint64)
        n = len(self.pfns)
        self._n = n
        self._addr: int | None = None
        self._region: memoryview | None = None
        # A read-only mapping of a domain whose digest is kept gives it
        # the terms of the blocks it holds as it closes (memdigest); a
        # writable one marks them to be read again.
        self._opened = (
            host._digests.opened(domid) if kept and not writable else None
        )
        self._writable = writable
        if not n:
            self.pages = []
            return
        arr = (ctypes.c_ulong * n)(*self.pfns.tolist())
        err = (ctypes.c_int * n)()
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        addr = FN.xenforeignmemory_map(host._fmem, domid, prot, n, arr, err)
        if not addr:
            libs.raise_for("xenforeignmemory_map", f"{n} pages", domid=domid)
        self._addr = addr
        errs = np.frombuffer(err, dtype=np.int32)
        bad = np.flatnonzero(errs)
        if len(bad):
            self.close()
            first = int(bad[0])
            raise libs.XenCallError(
                f"domain {domid}: {len(bad)} of {n} pages not mapped, "
                f"first pfn {int(self.pfns[first]):#x}: "
                f"{os.strerror(-int(errs[first]))}",
                call="xenforeignmemory_map",
                errno=-int(errs[first]),
            )
        region = (ctypes.c_char * (n * PAGE_SIZE)).from_address(addr)
        view = memoryview(region).cast("B")
        if not writable:
            view = view.toreadonly()
        self._region = view
        self.pages = [
            view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(n)
        ]

    def runs(self) -> list[tuple[int, memoryview]]:
        # One mapping is one stretch of this process's memory: a zero
        # scan, a hash or a socket write covers it in one call.
        return [(0, self._region)] if self._region is not None else []

    def array(self) -> np.ndarray:
        """The pages as a (pages, PAGE_SIZE // 8) uint64 array (a view)."""
        if self._region is None:
            return np.zeros((0, PAGE_SIZE // 8), dtype=np.uint64)
        return np.frombuffer(self._region, dtype=np.uint64).reshape(
            self._n, PAGE_SIZE // 8
        )

    def close(self) -> None:
        if self._addr is not None and self._opened is not None:
            opened, self._opened = self._opened, None
            self._host._digests.read(
                self._domid, self.pfns, self.array(), opened
            )
        if self._addr is not None and self._writable:
            # Its writes are done: a settle from now reads them, and
            # one under way (or a mapping made before) gives no term of
            # these blocks.
            self._host._digests.written(self._domid, self.pfns)
        if self._addr is not None:
            self.pages = []
            self._region = None
            FN.xenforeignmemory_unmap(self._host._fmem, self._addr, self._n)
            self._addr = None
