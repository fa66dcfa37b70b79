"""A simulated host whose domains are made empty (no guest process), so
hypervisor behaviour can be checked fast and deterministically."""

from __future__ import annotations

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 256, group="xen_ncm_sim")
    return conf


@pytest.fixture
def host(conf):
    h = SimHost("unit", conf, prelaunch=False)
    yield h
    h.close()
    h.raise_dom0_errors()


def empty(host: SimHost, domid: int, vcpus: int = 2, mb: int = 16):
    host.create_empty_domain(
        base.DomainConfig(
            name=f"d{domid}", memory_bytes=mb << 20, vcpus=vcpus
        ),
        domid,
    )
    return host.hv.domains[domid]
