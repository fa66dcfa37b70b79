"""How long a 2 GiB simulated guest takes to start with its workload
running, and what the model costs beyond the guest's RAM.

Not a test: run ``python benchmarks/bench_sim_start.py [--memory-mb N]
[--fill guestlike|zero|random]``. Reports the creation time, the guest's
RAM actually backed (tmpfs pages that hold data), and the memory the
model uses besides: the host process's and the guest process's private
(anonymous) memory growth and the hypervisor control area.
"""

from __future__ import annotations

import argparse
import time

from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost

MB = 1 << 20


def _status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--fill", default="guestlike")
    parser.add_argument("--dirty-rate-mb", type=int, default=8)
    args = parser.parse_args()

    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override(
        "host_memory_mb", args.memory_mb * 2, group="xen_ncm_sim"
    )
    host = SimHost("bench", conf)
    anon0 = _status_kb("self", "RssAnon")
    t0 = time.monotonic()
    domid = host.create_domain(
        base.DomainConfig(
            name="bench",
            memory_bytes=args.memory_mb * MB,
            vcpus=args.vcpus,
            workload={
                "fill": args.fill,
                "dirty_rate": args.dirty_rate_mb * MB,
            },
        )
    )
    started = time.monotonic() - t0
    time.sleep(1.0)
    dom = host.hv.domains[domid]
    before = dom.cpu_registers()
    host.pause(domid)
    after = dom.cpu_registers()
    progressed = sum(
        a["rip"] - b["rip"] for a, b in zip(after, before, strict=True)
    )
    backed = sum(e - s for s, e in dom.mem.data_extents()) * 4096
    guest_anon = _status_kb(dom.process.proc.pid, "RssAnon")
    host_anon = _status_kb("self", "RssAnon") - anon0
    print(
        f"guest: {args.memory_mb} MiB, {args.vcpus} vCPUs, fill "
        f"{args.fill}, dirty rate {args.dirty_rate_mb} MiB/s"
    )
    print(f"create_domain (boot, fill, PV init, running): {started:.2f} s")
    print(f"workload progress since start: {progressed} page writes")
    print(
        f"guest RAM backed by data: {backed / MB:.0f} MiB "
        f"({100 * backed / (args.memory_mb * MB):.0f}% of RAM)"
    )
    print(
        f"model beyond guest RAM: control area {dom.mem.ctl_size / MB:.2f} "
        f"MiB, host process +{host_anon / 1024:.1f} MiB private, guest "
        f"process {guest_anon / 1024:.1f} MiB private"
    )
    host.close()


if __name__ == "__main__":
    main()
