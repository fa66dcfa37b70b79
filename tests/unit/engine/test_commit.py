"""The source's commit coordinator: the fence after a rollback."""

from __future__ import annotations

import socket
import time

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import datapath
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.transport import Channel


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    for name, value in {
        "io_timeout": 0.5,
        "connect_timeout": 0.5,
        "transfer_retry_timeout": 1.0,
        "retry_max_delay": 0.05,
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    return conf


def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_the_fence_ends_a_lease_after_the_rollback_started(conf):
    """A destination that says nothing: the source copy waits for the
    lease counted from the rollback's start, not from each wait."""
    endpoint = ("127.0.0.1", closed_port())
    data = datapath.DataPath(
        conf, endpoint, "m-1", b"k" * 32, count=1, clock=time.monotonic
    )
    mine, silent = socket.socketpair()
    data.channels[0] = Channel(
        mine, framing.Connection(messages.Role.CLIENT), io_timeout=5.0
    )
    coordinator = commit.Coordinator(
        conf, data, commit.CommitQuery(conf, endpoint, "m-1", b"k" * 32)
    )
    lease = commit.lease(conf)
    since = time.monotonic() - lease / 2
    try:
        coordinator.fence(
            EngineError("gave up"), fence=True, torn_down=False, since=since
        )
    finally:
        silent.close()
    ended = time.monotonic()
    # Not before the destination's lease ran out, not a lease later.
    assert ended >= since + lease
    assert ended < since + 1.5 * lease
    assert data.control is None


def test_a_teardown_confirmed_by_query_is_acknowledged_after_the_rollback(
    conf,
):
    """The control channel is gone; the commit query says the copy is
    destroyed. The guest may resume at once, but the destination keeps
    its answer until the source recorded the rollback and acknowledges
    (a source dying in between still finds it)."""
    endpoint = ("127.0.0.1", closed_port())
    data = datapath.DataPath(
        conf, endpoint, "m-1", b"k" * 32, count=1, clock=time.monotonic
    )
    query = commit.CommitQuery(conf, endpoint, "m-1", b"k" * 32)
    acknowledged = []
    query.once = lambda: messages.Status(phase="failed", committed=False)
    query.acknowledge = lambda: acknowledged.append(True) or True
    coordinator = commit.Coordinator(conf, data, query)
    started = time.monotonic()
    assert coordinator.fence(
        EngineError("gave up"), fence=True, torn_down=False, since=started
    )
    # Not the lease: the destination's word.
    assert time.monotonic() - started < commit.lease(conf) / 2
    assert acknowledged == []
    assert coordinator.acknowledge()
    assert acknowledged == [True]
