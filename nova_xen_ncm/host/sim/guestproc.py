"""The guest processes: each domain's vCPUs and kernel (guest.py) run
in a process of their own, started here; a spare process and spare RAM
are prepared ahead of the next domain, so that starting one is not part
of a restore's downtime.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from oslo_log import log as logging

from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import HostError
from nova_xen_ncm.host.sim import ipc
from nova_xen_ncm.host.sim import layout
from nova_xen_ncm.host.sim.hypervisor import CONTROL_TIMEOUT
from nova_xen_ncm.host.sim.hypervisor import Domain
from nova_xen_ncm.host.sim.hypervisor import Hypervisor
from nova_xen_ncm.host.sim.memory import SpareRam
from nova_xen_ncm.host.sim.memory import SpareRamAbandoned

LOG = logging.getLogger(__name__)

MiB = 1 << 20
# The next spare guest process and spare RAM are prepared this long after
# the domain that took the previous ones runs, so that preparing them does
# not compete with the migration that brought the domain.
REPLENISH_DELAY = 1.0


class GuestProcess:
    """A guest's vCPUs running in a process of their own (guest.py):
    the process, its control channel (start, pause, unpause, throttle,
    the callback vector) and its hypercall channel. The guest process
    layer's, referenced by the hypervisor's Domain as where its vCPUs
    run (``Domain.process``)."""

    def __init__(
        self,
        domid: int,
        proc: subprocess.Popen,
        ctl: socket.socket,
        hc: socket.socket,
    ) -> None:
        self.domid = domid
        self.proc = proc
        self.ctl = ctl
        self.hc = hc
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()
        self._next_id = 0

    def exited(self) -> int | None:
        """The process's exit status, None while it runs."""
        return self.proc.poll()

    def upcall(self, vcpu: int) -> None:
        """The callback vector for ``vcpu`` (not taken while paused: the
        flag in vcpu_info stays, see Hypervisor.reassert_upcalls)."""
        try:
            with self._send_lock:
                ipc.send(self.ctl, {"cmd": "upcall", "vcpu": vcpu})
        except OSError:
            LOG.debug("dom%d: upcall not delivered, guest gone", self.domid)

    def request(self, msg: dict, timeout: float = CONTROL_TIMEOUT) -> object:
        """Send a control request and wait for its answer."""
        call = msg["cmd"]
        with self._request_lock:
            self._next_id += 1
            msg = dict(msg, id=self._next_id)
            try:
                with self._send_lock:
                    ipc.send(self.ctl, msg)
                self.ctl.settimeout(timeout)
                while True:
                    reply = ipc.recv(self.ctl)
                    if reply.get("id") == self._next_id:
                        break
            except (OSError, ipc.ChannelClosed) as exc:
                raise HostError(
                    f"guest of domain {self.domid} did not answer: {exc}",
                    call=call,
                ) from exc
            finally:
                with contextlib.suppress(OSError):
                    self.ctl.settimeout(None)
        if "err" in reply:
            raise HostError(
                f"guest of domain {self.domid}: {reply.get('msg')}",
                call=call,
                errno=reply["err"],
            )
        return reply.get("ok")


class GuestProcesses:
    """Start and stop the guest processes of one host's domains; they
    share the hypervisor's lock (``hv.lock``)."""

    def __init__(self, hv: Hypervisor, opts: object) -> None:
        self.hv = hv
        self.opts = opts
        self.closed = False
        self.spare: tuple[subprocess.Popen, socket.socket] | None = None
        self.spare_ram: SpareRam | None = None
        self.stop_event = threading.Event()
        self.replenish_thread: threading.Thread | None = None
        # Set by replenish: the thread started ahead (prepare_replenish)
        # goes on.
        self._replenish_go = threading.Event()
        self.reaping: list[threading.Thread] = []
        if self.opts.spare_guest_process:
            self.spare = self._start_spare()
        self.spare_ram = self._new_spare_ram()

    def take_spare_ram(self, max_pfn: int) -> SpareRam | None:
        """The spare RAM, if it fits a domain of ``max_pfn`` (lock
        held)."""
        spare_ram = self.spare_ram
        if spare_ram is not None and spare_ram.max_pfn == max_pfn:
            self.spare_ram = None
            return spare_ram
        return None

    def _new_spare_ram(self) -> SpareRam | None:
        """Free memory faulted in for the next domain ([xen_ncm_sim]
        prefault_memory_mb), if the option and the free memory allow."""
        with self.hv.lock:
            size = min(
                self.opts.prefault_memory_mb * MiB, self.hv.free_memory()
            )
        # Spare RAM fits guests of up to 3.75 GiB: their RAM below the
        # MMIO hole starts at pfn 0, and they share one max_pfn.
        pages = min(size // PAGE_SIZE, layout.MMIO_HOLE_START_PFN)
        if pages <= 0:
            return None
        return SpareRam(
            layout.X86_HVM_END_SPECIAL_REGION,
            pages,
            f"{self.hv.hostname}-spare",
            self.stop_event,
        )

    def replenish(self) -> None:
        """Prepare the next spare guest process and spare RAM, after
        REPLENISH_DELAY and in the background (by the thread
        :meth:`prepare_replenish` started, if one waits)."""
        # Not under the host lock: a domain's unpause asks this as its
        # guest starts, whose hypercalls take that lock (3 ms waited for
        # it once). A thread past its work drops the request, as one
        # working always did; a thread prepared later clears it.
        if self.replenish_thread is not None:
            self._replenish_go.set()
            return
        self.prepare_replenish()
        self._replenish_go.set()

    def prepare_replenish(self) -> None:
        """Start the thread that the next :meth:`replenish` lets go on:
        a thread's start waits for a core and for the interpreter's lock
        (up to 18 ms measured under load), which a restored domain's
        unpause, the end of its downtime, should not."""
        wanted = self.opts.spare_guest_process or self.opts.prefault_memory_mb
        with self.hv.lock:
            if not wanted or self.closed or self.replenish_thread:
                return
            # What was asked of a thread gone since is not this one's.
            self._replenish_go.clear()
            self.replenish_thread = threading.Thread(
                target=self._run_replenish,
                name=f"{self.hv.hostname}-replenish",
                daemon=True,
            )
        self.replenish_thread.start()

    def begin_close(self) -> None:
        """The host closes: no spare is prepared any more, and a thread
        waiting to prepare them ends."""
        # Under the host lock, as prepare_replenish looks and clears
        # the request: a thread it starts sees the close, or is let go
        # by it; none waits for a request no one will make.
        with self.hv.lock:
            self.closed = True
            self.stop_event.set()
            self._replenish_go.set()

    def _run_replenish(self) -> None:
        try:
            self._replenish_go.wait()
            if self.stop_event.wait(REPLENISH_DELAY):
                return
            if self.opts.spare_guest_process and self.spare is None:
                spare = self._start_spare()
                with self.hv.lock:
                    if self.spare is None and not self.closed:
                        spare, self.spare = None, spare
                if spare is not None:
                    self._end_spare(spare)
            if self.spare_ram is None:
                ram = self._new_spare_ram()
                with self.hv.lock:
                    if self.spare_ram is None and not self.closed:
                        ram, self.spare_ram = None, ram
                if ram is not None:
                    ram.close()
        except SpareRamAbandoned:
            pass
        except OSError as exc:
            LOG.warning(
                "%s: spare guest resources not prepared: %s",
                self.hv.hostname,
                exc,
            )
        finally:
            with self.hv.lock:
                self.replenish_thread = None

    def _start_spare(self) -> tuple[subprocess.Popen, socket.socket]:
        """Start the guest process of the next domain ahead of it
        ([xen_ncm_sim] spare_guest_process)."""
        host_end, guest_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET
        )
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nova_xen_ncm.host.sim.guest",
                    "--spare",
                    str(guest_end.fileno()),
                ],
                pass_fds=(guest_end.fileno(),),
                close_fds=True,
                # A guest is not part of the toolstack's terminal job:
                # Ctrl-C on the command that runs the host must not
                # reach it (the command cancels and rolls back instead).
                start_new_session=True,
            )
        except OSError:
            host_end.close()
            raise
        finally:
            guest_end.close()
        return proc, host_end

    def _take_spare(
        self, args: dict, fds: tuple[int, ...]
    ) -> subprocess.Popen | None:
        """Hand the domain to the spare guest process, if there is one
        alive (the next one is started by replenish)."""
        with self.hv.lock:
            spare, self.spare = self.spare, None
        proc = None
        if spare is not None:
            candidate, chan = spare
            try:
                if candidate.poll() is None:
                    socket.send_fds(chan, [json.dumps(args).encode()], fds)
                    proc = candidate
            except OSError:
                candidate.kill()
            finally:
                chan.close()
            if proc is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    candidate.wait(timeout=5)
        return proc

    def stop_spare(self) -> None:
        with self.hv.lock:
            spare, self.spare = self.spare, None
            ram, self.spare_ram = self.spare_ram, None
        if ram is not None:
            ram.close()
        if spare is not None:
            self._end_spare(spare)

    @staticmethod
    def _end_spare(spare: tuple[subprocess.Popen, socket.socket]) -> None:
        proc, chan = spare
        chan.close()  # the spare exits when its channel closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def launch(self, dom: Domain, workload: dict) -> None:
        """Start the guest process; it maps the domain's memory and waits
        for ``start``. A restoring domain gets it at creation, so that
        the interpreter's start-up is not part of the downtime."""
        hc_host, hc_guest = socket.socketpair()
        ctl_host, ctl_guest = socket.socketpair()
        fds = (
            dom.mem.ram_fd,
            dom.mem.ctl_fd,
            hc_guest.fileno(),
            ctl_guest.fileno(),
        )
        args = {
            "ram_fd": fds[0],
            "ctl_fd": fds[1],
            "hc_fd": fds[2],
            "ctl_sock_fd": fds[3],
            "config": workload,
        }
        with dom.mem.lock():
            # ctl's tracking state is the process's about to start.
            dom.mem.reset_tracking()
        try:
            config = {"config": args["config"]}
            proc = self._take_spare(config, fds)
            if proc is None:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "nova_xen_ncm.host.sim.guest",
                        json.dumps(args),
                    ],
                    pass_fds=fds,
                    close_fds=True,
                    start_new_session=True,
                )
        finally:
            hc_guest.close()
            ctl_guest.close()
        # It runs no vCPU until Toolstack._spawn starts it: a restore's
        # flushes scan nothing of the RAM it never wrote.
        dom.mem.track(proc.pid, held=True)
        dom.process = GuestProcess(dom.domid, proc, ctl_host, hc_host)
        threading.Thread(
            target=self.hv.serve_hypercalls,
            args=(dom, hc_host),
            name=f"{self.hv.hostname}-d{dom.domid}-hypercalls",
            daemon=True,
        ).start()

    def stop(self, dom: Domain, *, wait: bool = True) -> None:
        """Stop the guest process. Without ``wait`` its exit (which
        unmaps all of guest RAM) is awaited in the background: the
        process runs no vCPU once it answered ``stop``."""
        process, dom.process = dom.process, None
        if process is None:
            return
        proc = process.proc
        with contextlib.suppress(HostError):
            process.request({"cmd": "stop"}, timeout=5.0)
        with dom.mem.lock():
            # What it wrote up to its stop is in the maps before the
            # tracker goes.
            dom.mem.flush_and_untrack()
        socks = (process.ctl, process.hc)

        def reap() -> None:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for sock in socks:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

        if wait:
            reap()
        else:
            self.in_background(reap)

    def in_background(self, work: Callable[[], None]) -> None:
        """Run the slow end of a destroyed domain (its process's exit,
        the release of its memory) in a thread of its own, as Xen frees a
        dead domain's memory after ``destroy`` returns; close() waits for
        it."""

        def run() -> None:
            try:
                work()
            except Exception:  # nothing is left to tell
                LOG.exception(
                    "%s: releasing a destroyed domain", self.hv.hostname
                )

        thread = threading.Thread(
            target=run, name=f"{self.hv.hostname}-reap", daemon=True
        )
        with self.hv.lock:
            self.reaping = [t for t in self.reaping if t.is_alive()]
            self.reaping.append(thread)
        thread.start()

    def close(self) -> None:
        """Wait for the background work (preparing spares, reaping the
        destroyed domains' processes) and stop the spares; ``closed`` and
        ``stop_event`` are set first."""
        thread = self.replenish_thread
        if thread is not None:
            thread.join()
        with self.hv.lock:
            reaping, self.reaping = self.reaping, []
        for thread in reaping:
            thread.join()
        self.stop_spare()
