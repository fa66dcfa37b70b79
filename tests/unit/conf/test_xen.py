"""The [xen_ncm_xen] options of the real Xen host: the backend waits."""

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import opts
from nova_xen_ncm.conf import xen

WAITS = {
    "backend_connect_timeout": 120.0,
    "backend_unmap_timeout": 30.0,
    "backend_gone_timeout": 60.0,
}


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    xen.register_opts(conf)
    conf([])
    return conf


def test_every_option_has_help():
    for opt in xen.OPTS:
        assert opt.help, opt.name


def test_backend_wait_defaults(conf):
    assert {name: getattr(conf.xen_ncm_xen, name) for name in WAITS} == WAITS


@pytest.mark.parametrize(
    "name,value",
    [
        ("backend_connect_timeout", 0.5),
        ("backend_connect_timeout", 3601.0),
        ("backend_unmap_timeout", 0.0),
        ("backend_unmap_timeout", 601.0),
        ("backend_gone_timeout", -1.0),
        ("backend_gone_timeout", 601.0),
    ],
)
def test_backend_waits_are_bounded(conf, name, value):
    with pytest.raises(ValueError):
        conf.set_override(name, value, group="xen_ncm_xen")


def test_backend_waits_are_listed_for_the_config_generator():
    listed = dict((group.name, names) for group, names in opts.list_opts())
    assert set(WAITS) <= {opt.name for opt in listed["xen_ncm_xen"]}
