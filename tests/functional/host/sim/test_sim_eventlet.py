"""Two simulated hosts in one eventlet-monkey-patched process, as Nova's
functional tests run compute services: guests start, run, pause."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    import time
    from oslo_config import cfg
    from nova_xen_ncm.conf import sim as sim_conf
    from nova_xen_ncm.host import base
    from nova_xen_ncm.host.sim.host import SimHost
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    hosts = [SimHost("a", conf), SimHost("b", conf)]
    doms = []
    for h in hosts:
        doms.append(h.create_domain(base.DomainConfig(
            name="g", memory_bytes=16 << 20, vcpus=2,
            workload={"dirty_rate": 4 << 20, "fill": "zero"})))
        h.enable_log_dirty(doms[-1])
    for _ in range(500):
        if all(len(h.harvest_dirty(d)) > 1 for h, d in zip(hosts, doms)):
            break
        time.sleep(0.02)
    else:
        raise SystemExit("guests did not run")
    for h, d in zip(hosts, doms):
        h.pause(d)
        assert h.domain_info(d).state == base.DomainState.PAUSED
        h.close()
        h.raise_dom0_errors()
    print("OK", doms)
    """
)


def test_two_hosts_under_eventlet():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OK [1, 1]"
