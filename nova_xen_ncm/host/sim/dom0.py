"""Dom0's kernel and services: xenstored, the backends and their disks.

They run in dom0 (the hypervisor's hypervisor.Dom0): dom0's kernel
(:class:`Dom0Kernel`) takes the event channel upcalls and xenstored's
watch wake-ups on the dom0 thread and runs the services' handlers; the
toolstack (toolstack.py) connects domains to them. The vbd disks are
files on storage the hosts share (``[xen_ncm_sim] disk_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import weakref
from collections.abc import Callable
from collections.abc import Sequence

import numpy as np
from oslo_log import log as logging

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import devices
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim import hvm
from nova_xen_ncm.host.sim import ring as ringmod
from nova_xen_ncm.host.sim.hypervisor import DOM0
from nova_xen_ncm.host.sim.hypervisor import Dom0
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.hypervisor import canonical_uuid
from nova_xen_ncm.host.sim.xenstore import ImportPolicy
from nova_xen_ncm.host.sim.xenstore import LocalClient
from nova_xen_ncm.host.sim.xenstore import Xenstore
from nova_xen_ncm.host.sim.xs_wire import XenstoreError

LOG = logging.getLogger(__name__)

# Where the vbd disks are when [xen_ncm_sim] disk_dir is unset: under
# the user's private state directory (XDG), not a name in /tmp that
# another user could take first.
DEFAULT_DISK_SUBDIR = os.path.join("nova-xen-ncm", "sim-disks")


class Dom0Error(Exception):
    """A dom0 service (a backend, xenstored's watch dispatch) failed on
    the dom0 thread; kept by :class:`Dom0Kernel` for the host's owner."""


class Dom0Kernel:
    """Dom0's kernel, as far as its services need one: the upcall the
    hypervisor raises (Dom0.upcall) wakes its thread, which reads the
    pending ports from dom0's shared info, as Linux's evtchn upcall does,
    and runs each port's handler; xenstored's wake-ups run the watch
    dispatch; work deferred by a handler (:meth:`defer`: a disk's
    completion, as a block device's completion interrupt queues it) runs
    after. Nothing runs on a timer: a port bound wrong stalls what it
    serves. A handler that raises is logged and kept in ``errors``: dom0
    goes on."""

    def __init__(self, hostname: str, dom0: Dom0) -> None:
        self.dom0 = dom0
        # What failed on the dom0 thread (Dom0Error), oldest first.
        self.errors: list[Dom0Error] = []
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._kicks: queue.Queue = queue.Queue()
        self.on_wake: Callable[[], None] = lambda: None
        dom0.upcall = self.kick
        self._thread = threading.Thread(
            target=self._run, name=f"{hostname}-dom0-events", daemon=True
        )
        self._thread.start()

    def kick(self, vcpu: int) -> None:
        self._kicks.put(vcpu)

    def stop(self) -> None:
        self._kicks.put(None)

    def wake(self) -> None:
        """Watch events are queued for dom0's xenstore connection."""
        self._kicks.put("watch")

    def defer(self, what: str, work: Callable[[], object]) -> None:
        """Run ``work`` on the dom0 thread after what it is doing (a
        completion raised by a device, not a timer)."""
        self._kicks.put((what, work))

    def _take_pending(self) -> list[int]:
        ports = []
        dom0 = self.dom0
        with dom0.mem_lock():
            vi = dom0.shinfo[: evtchn.VCPU_INFO_SIZE]
            vi[evtchn.VI_UPCALL_PENDING] = 0
            sel_view = vi[8:16].view(np.uint64)
            sel = int(sel_view[0])
            sel_view[0] = 0
            words = dom0.bits.words
            for w in range(64):
                if not sel >> w & 1:
                    continue
                pi = evtchn.SHINFO_PENDING // 8 + w
                ready = int(words[pi] & ~words[evtchn.SHINFO_MASK // 8 + w])
                words[pi] &= np.uint64(~ready & (2**64 - 1))
                ports += [w * 64 + b for b in range(64) if ready >> b & 1]
        return ports

    def _call(self, what: str, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception as exc:
            # A dom0 service failing does not stop dom0; the host's
            # owner finds it in ``errors`` (tests fail on it).
            LOG.exception("dom0: %s failed", what)
            error = Dom0Error(f"dom0: {what} failed: {exc!r}")
            error.__cause__ = exc
            self.errors.append(error)

    def _run(self) -> None:
        while True:
            item = self._kicks.get()
            if item is None:
                return
            if item == "watch":
                self._call("watch dispatch", self.on_wake)
            elif isinstance(item, tuple):
                self._call(*item)
            else:
                for port in self._take_pending():
                    handler = self.handlers.get(port)
                    if handler is not None:
                        self._call(f"handler of port {port}", handler, port)


@dataclasses.dataclass(eq=False)
class Dom0Domain:
    """What dom0 keeps of one guest (not the hypervisor's Domain): its
    ends of the guest's channels, its backends and disks, and the
    toolstack's state of a restore."""

    # dom0's ports bound to the guest's (closed when the guest goes).
    ports: list[int] = dataclasses.field(default_factory=list)
    backends: dict[str, devices.Backend] = dataclasses.field(
        default_factory=dict
    )
    # xenstored's end of the store channel.
    store_port: int = 0
    # The backends take no request (a stop-and-copy, or a restore
    # before COMMIT).
    quiesced: bool = False
    # Backends an import reconnected, held quiescent until unpause, and
    # the tokens of those an unpause already resumed.
    held: bool = False
    released: set[str] = dataclasses.field(default_factory=set)
    disks: list[devices.BlockStore] = dataclasses.field(default_factory=list)
    # Whether the guest's disks are this host's to delete: it booted or
    # was committed here, and its state has not left since.
    disks_here: bool = False
    # A restored guest's store ring, attached to xenstored at unpause.
    detached_ring: memoryview | None = None
    # dom0's directories above the backend areas an import wrote.
    imported_parents: set[str] = dataclasses.field(default_factory=set)


class Dom0Services:
    """xenstored and the backends of one host's dom0. The backends call
    back here for dom0's event channels (``dom0_*``) and into the
    hypervisor for grant maps."""

    def __init__(self, hv: Hypervisor, opts: object) -> None:
        self.hv = hv
        self.opts = opts
        self.kernel = Dom0Kernel(hv.hostname, hv.dom0)
        self.xenstore = Xenstore()
        self._xs_conn = self.xenstore.connect(DOM0, wakeup=self.kernel.wake)
        self.xs = devices.XenstoreConnectionClient(
            self.xenstore, self._xs_conn
        )
        # The toolstack's own connection (device directories).
        self.toolstack_xs = LocalClient(self.xenstore)
        self.backends: dict[str, devices.Backend] = {}
        # Guest ports an import linked to dom0 for a backend to take over.
        self.prelinked: set[tuple[int, int]] = set()
        self.kernel.on_wake = self.dispatch_watches
        self._records: weakref.WeakKeyDictionary[Domain, Dom0Domain] = (
            weakref.WeakKeyDictionary()
        )
        self._records_lock = threading.Lock()
        hv.dom0_record = self.record

    def record(self, dom: Domain) -> Dom0Domain:
        """dom0's record of ``dom`` (made on first use, gone with it)."""
        with self._records_lock:
            rec = self._records.get(dom)
            if rec is None:
                rec = self._records[dom] = Dom0Domain()
            return rec

    def new_backend(
        self, dom: Domain, dev: base.DeviceConfig
    ) -> devices.Backend:
        """The backend of a new guest's device, with its disk created."""
        return devices.BACKENDS[dev.kind](
            domid=dom.domid,
            devid=dev.devid,
            backend_domid=dev.backend_domid,
            xs=self.xs,
            grants=self.hv,
            evtchn=self,
            **self.backend_extra(
                dom,
                dev.kind,
                dev.devid,
                devices.disk_sectors(dev) * devices.SECTOR_BYTES,
            ),
        )

    def xenstore_connect(
        self,
        dom: Domain,
        xs_state: base.XenstoreState | None = None,
        policy: ImportPolicy | None = None,
    ) -> None:
        """Introduce the domain to xenstored, or import its xenstore
        (which validates everything before it changes anything)."""
        domid = dom.domid
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]
        page = dom.mem.page(store_pfn, writable=True)
        notify = self.store_notify(dom)

        if xs_state is not None:
            # The ring is attached at unpause: the import fires each
            # restored watch once (a legal spurious event), and until the
            # guest runs its memory must stay exactly as at pause.
            self.xenstore.import_domain(domid, xs_state, policy, notify=notify)
            self.record(dom).detached_ring = page
        else:
            self.xenstore.create_domain_home(domid)
            self.xenstore.introduce_domain(
                domid,
                page=page,
                notify=notify,
                store_gfn=store_pfn,
                store_port=dom.params[hvm.HVM_PARAM_STORE_EVTCHN],
            )

    def store_notify(self, dom: Domain) -> Callable[[], None]:
        """xenstored signalling the guest after writing its ring."""
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]

        def notify() -> None:
            # Under the memory lock, as every mark: a harvest or digest
            # reading the maps meanwhile would miss it (or fail).
            with dom.mem_lock():
                dom.mem.mark_dirty(store_pfn)
            if self.record(dom).store_port:
                self.hv.evtchn.send(self.hv.dom0, self.record(dom).store_port)

        return notify

    def bind_services(self, dom: Domain) -> None:
        """Bind xenstored's and the console daemon's ends of the store
        and console channels (an import has linked them already)."""
        domid = dom.domid
        store_pfn = dom.params[hvm.HVM_PARAM_STORE_PFN]

        def serve(port: int) -> None:
            # Under the host lock, which a teardown holds while it
            # releases the domain from the hypervisor and xenstored: an
            # event taken as the domain goes finds it wholly here or
            # wholly gone (its memory is closed only after).
            with self.hv.locked():
                if self.hv.domains.get(domid) is not dom:
                    return
                if self.record(dom).quiesced:
                    return
                self.xenstore.service_ring(domid)
                with dom.mem_lock():
                    dom.mem.mark_dirty(store_pfn)

        for param, handler in (
            (hvm.HVM_PARAM_STORE_EVTCHN, serve),
            (hvm.HVM_PARAM_CONSOLE_EVTCHN, lambda port: None),
        ):
            guest_port = dom.params[param]
            ch = dom.ports[guest_port]
            if ch.type == EvtchnType.INTERDOMAIN:
                local = ch.remote_port
                self.prelinked.discard((domid, guest_port))
            else:
                local = self.dom0_bind(dom, guest_port)
            self.kernel.handlers[local] = handler
            if param == hvm.HVM_PARAM_STORE_EVTCHN:
                self.record(dom).store_port = local

    def disk_dir(self) -> str:
        """The directory of the vbd disks: ``[xen_ncm_sim] disk_dir``, or
        the user's own ``$XDG_STATE_HOME/nova-xen-ncm/sim-disks``."""
        if self.opts.disk_dir:
            return self.opts.disk_dir
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
        return os.path.join(state, DEFAULT_DISK_SUBDIR)

    def disk_path(self, uuid: str, devid: int) -> str:
        """The file of a guest's vbd on the storage the hosts share.
        ``uuid`` must be a UUID (any spelling; the file has its canonical
        form), so it cannot name a file outside the directory."""
        return os.path.join(
            self.disk_dir(), f"{canonical_uuid(uuid)}-{int(devid)}.disk"
        )

    def backend_extra(
        self, dom: Domain, kind: str, devid: int, size: int | None = None
    ) -> dict:
        """A vbd backend's disk: created with ``size`` bytes at the
        guest's first boot and kept as it is on a later one (``size``
        given), the existing file for a guest restored (``size`` None)."""
        if kind != "vbd":
            return {}
        call = "create_domain" if size is not None else "import_pv_state"
        try:
            path = self.disk_path(dom.uuid, devid)
        except ValueError as exc:
            raise HostError(str(exc), call=call) from None
        if size is not None:
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise HostError(
                    f"disk directory {os.path.dirname(path)} cannot be "
                    f"made: {exc.strerror}",
                    call=call,
                ) from None
        try:
            store = devices.BlockStore.open(path, size)
        except devices.BackendError as exc:
            raise HostError(str(exc), call=call) from None
        self.record(dom).disks.append(store)
        return {"store": store}

    def delete_disks(self, dom: Domain) -> None:
        """Remove the files of the guest's vbds (its disks are gone with
        it: Nova's destroy_disks)."""
        for dev in dom.config.devices:
            if dev.kind != "vbd":
                continue
            path = self.disk_path(dom.uuid, dev.devid)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                LOG.warning("Could not delete disk %s: %s", path, exc)

    def backend_states(self, dom: Domain) -> tuple[base.BackendState, ...]:
        """The connections of the guest's backends, in (kind, devid)
        order."""
        states = [
            be.export() for be in list(self.record(dom).backends.values())
        ]
        return tuple(sorted(states, key=lambda b: (b.kind, b.devid)))

    def add_backend(self, dom: Domain, be: devices.Backend) -> None:
        self.record(dom).backends[be.token] = be
        self.backends[be.token] = be

    def dispatch_watches(self) -> None:
        events = self.xs.pop_events()
        for token in devices.dispatch_watch_events(events, self.backends):
            LOG.debug("dom0: watch event for unknown token %s", token)

    def dom0_defer(self, what: str, work: Callable[[], object]) -> None:
        """A backend's disk finished what it took: ``work`` (answering
        it) runs on the dom0 thread, queued as a completion interrupt
        queues its bottom half, never on a timer."""
        self.kernel.defer(what, work)

    def dom0_bind(self, dom: Domain, guest_port: int) -> int:
        port = self.hv.evtchn.bind_interdomain(
            self.hv.dom0, dom.domid, guest_port
        )
        self.record(dom).ports.append(port)
        return port

    def dom0_bind_interdomain(
        self, domid: int, port: int, handler: Callable[[int], None]
    ) -> int:
        """Bind a dom0 port to a guest's unbound port (a backend
        connecting); ``handler(dom0_port)`` runs on the dom0 thread."""
        with self.hv.locked():
            dom = self.hv.domains.get(domid)
            if (domid, port) in self.prelinked and dom is not None:
                # Restored by import_pv_state with dom0's end in place:
                # the reconnecting backend takes that end over.
                self.prelinked.discard((domid, port))
                local = dom.ports[port].remote_port
            else:
                local = self.hv.evtchn.bind_interdomain(
                    self.hv.dom0, domid, port
                )
            self.kernel.handlers[local] = handler
            return local

    def dom0_check_bindable(self, domid: int, port: int) -> None:
        """Raise what :meth:`dom0_bind_interdomain` would for ``port``
        of ``domid``, binding nothing."""
        with self.hv.locked():
            dom = self.hv.domains.get(domid)
            if (domid, port) in self.prelinked and dom is not None:
                return
            self.hv.evtchn.check_bindable(self.hv.dom0, domid, port)

    def dom0_notify(self, port: int) -> None:
        with self.hv.locked():
            self.hv.evtchn.send(self.hv.dom0, port)

    def release_ports(self, dom: Domain) -> None:
        """Close dom0's ends of a released domain's channels (the
        hypervisor left them unbound). Host lock held."""
        for port in self.record(dom).ports:
            self.kernel.handlers.pop(port, None)
            if port in self.hv.dom0.ports:
                with contextlib.suppress(HostError):
                    self.hv.evtchn.close(self.hv.dom0, port)
        self.record(dom).ports.clear()

    def dom0_close(self, port: int) -> None:
        with self.hv.locked():
            self.kernel.handlers.pop(port, None)
            self.hv.evtchn.close(self.hv.dom0, port)

    def reconnect_backends(
        self, dom: Domain, states: Sequence[base.BackendState]
    ) -> None:
        """Backends of a restored guest take over (import_pv_state):
        same grant references, same ports, same indices; held quiescent
        (no storage write, no response) until the guest is unpaused.
        Called without the host lock, which a backend takes with its own
        lock held."""
        self.record(dom).held = True
        self.record(dom).quiesced = True
        for bs in states:
            try:
                be = devices.Backend.reconnect(
                    bs,
                    xs=self.xs,
                    grants=self.hv,
                    evtchn=self,
                    quiesced=True,
                    **self.backend_extra(dom, bs.kind, bs.devid),
                )
            except (
                devices.BackendError,
                ringmod.RingError,
                HostError,
                OSError,
            ) as exc:
                raise HostError(
                    f"backend {bs.kind}/{bs.devid} cannot reconnect: {exc}",
                    call="import_pv_state",
                ) from None
            self.add_backend(dom, be)

    def release_backends(self, dom: Domain) -> None:
        """The guest runs here now (COMMIT): the reconnected backends
        answer the requests in flight and take new ones. A backend counts
        as released only once its own resume succeeded, so a failed
        unpause can be retried and releases the rest; any failure is a
        HostError, which the receiver's commit path handles."""
        if not self.record(dom).held:
            return
        for token, be in list(self.record(dom).backends.items()):
            if token in self.record(dom).released:
                continue
            try:
                be.resume()
            except Exception as exc:
                raise HostError(
                    f"backend {be.key} cannot resume: {exc}", call="unpause"
                ) from None
            self.record(dom).released.add(token)
        self.record(dom).held = False
        self.record(dom).quiesced = False
        self.record(dom).released.clear()

    def xs_exists(self, path: str) -> bool:
        try:
            self.toolstack_xs.read(path)
        except XenstoreError as exc:
            if exc.name == "ENOENT":
                return False
            raise
        return True

    def backend_parents(self, dom: Domain) -> set[str]:
        """dom0's per-domain directories above the backend areas."""
        parents = {
            f"/local/domain/{d.backend_domid}/backend/{d.kind}/{dom.domid}"
            for d in dom.config.devices
        }
        return (
            parents
            | self.record(dom).imported_parents
            | {
                b.backend_path.rsplit("/", 1)[0]
                for b in self.record(dom).backends.values()
            }
        )

    def quiesce_backends(self, domid: int) -> None:
        dom = self.hv.domain(domid, "quiesce_backends")
        self.record(dom).quiesced = True
        for be in list(self.record(dom).backends.values()):
            be.quiesce()
        # xenstored writes nothing more to the guest's ring (its replies
        # and watch events wait in xenstored, which exports them). An
        # event channel is not held: one raised now is pending in the
        # guest's memory (evtchn.set_pending), exported with it or, if it
        # comes after the export, found by the digests before COMMIT.
        with self.hv.locked():
            if self.xenstore.is_introduced(domid):
                self.xenstore.hold_output(domid, True)

    def resume_backends(self, domid: int) -> None:
        dom = self.hv.domain(domid, "resume_backends")
        with self.hv.locked():
            if self.xenstore.is_introduced(domid):
                # The guest stays: its xenstore is its own again.
                self.xenstore.thaw(domid)
                self.xenstore.hold_output(domid, False)
        self.record(dom).quiesced = False
        for be in list(self.record(dom).backends.values()):
            be.resume()
        if self.xenstore.is_introduced(domid):
            self.xenstore.service_ring(domid)

    def import_ports(
        self, dom: Domain, ports: Sequence[base.EventChannel]
    ) -> None:
        """Rebuild the port table with the same numbers. Dom0's end of
        each interdomain channel takes the port number it had when that
        is free here, else the lowest free one (then EVTCHNOP_status
        shows the guest a different remote port)."""
        for p in ports:
            dom.ports[p.port] = evtchn.Channel(
                type=p.type,
                vcpu=p.vcpu,
                remote_domid=p.remote_domid,
                remote_port=p.remote_port,
                virq=p.virq,
                pirq=p.pirq,
            )
        for p in ports:
            if p.type != EvtchnType.INTERDOMAIN or p.remote_domid != DOM0:
                continue
            local = p.remote_port
            if (
                not 0 < local < evtchn.NR_2L_PORTS
                or local in self.hv.dom0.ports
            ):
                local = self.hv.evtchn.free_port(
                    self.hv.dom0, "import_pv_state"
                )
            self.hv.dom0.ports[local] = evtchn.Channel(
                EvtchnType.INTERDOMAIN,
                remote_domid=dom.domid,
                remote_port=p.port,
            )
            dom.ports[p.port].remote_port = local
            self.record(dom).ports.append(local)
            self.prelinked.add((dom.domid, p.port))
