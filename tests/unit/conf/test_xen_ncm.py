"""The [xen_ncm] options: registered, typed, bounded, listed."""

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import opts
from nova_xen_ncm.conf import xen_ncm


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    return conf


def test_every_option_has_help():
    for opt in xen_ncm.OPTS:
        assert opt.help, opt.name


def test_defaults(conf):
    group = conf.xen_ncm
    assert group.host_driver == "sim"
    assert group.precopy_policy == "downtime"
    assert group.compression == "none"
    assert group.channels == 1
    assert group.completion_timeout_action == "abort"
    assert group.port_min <= group.port_max


@pytest.mark.parametrize(
    "name,value",
    [
        ("channels", 0),
        ("channels", 17),
        ("downtime_target", 0.0),
        ("connect_retry_attempts", 0),
        ("completion_timeout_per_gib", -1),
        ("compression", "zip"),
        ("completion_timeout_action", "pause"),
        ("port_max", 70000),
        ("throttle_step", 0.95),
    ],
)
def test_bounds_and_choices(conf, name, value):
    with pytest.raises(ValueError):
        conf.set_override(name, value, group="xen_ncm")


def test_listed_for_the_config_generator():
    listed = dict((group.name, names) for group, names in opts.list_opts())
    names = {opt.name for opt in listed["xen_ncm"]}
    assert {
        "host_driver",
        "precopy_policy",
        "downtime_target",
        "channels",
        "compression",
        "progress_interval",
        "completion_timeout_per_gib",
        "transfer_retry_attempts",
        "commit_query_timeout",
    } <= names
