"""The source's data path against the engine's acceptor over loopback:
where a resumed channel goes on."""

import threading
import time

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import datapath
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.acceptor import Acceptor
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.transport import Listener

from .test_transport import Background

TOKEN = b"d" * 32
MIGRATION = "m-dp"
TIMEOUT = 10.0


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("io_timeout", TIMEOUT, group="xen_ncm")
    conf.set_override("connect_timeout", 2.0, group="xen_ncm")
    return conf


def resumed_with(conf, claimed):
    """Send three frames on channel 0, drop it, and resume it against a
    destination that says it applied ``claimed``; the data path's
    channel after the resume."""
    applied = {0: claimed}
    listener = Listener(
        "127.0.0.1", 0, 0, accept_timeout=TIMEOUT, handshake_timeout=2.0
    )
    acceptor = Acceptor(
        listener,
        MIGRATION,
        TOKEN,
        conf,
        status=lambda: messages.Status(phase="precopy", committed=False),
        on_finished=lambda: None,
        resume_from=applied.__getitem__,
    )
    data = datapath.DataPath(
        conf,
        listener.address,
        MIGRATION,
        TOKEN,
        count=1,
        clock=time.monotonic,
    )
    try:
        data.channels[0] = data.connect()
        server = acceptor.control(time.monotonic() + TIMEOUT)
        for _ in range(3):
            data.send([b"records"])
        data.close(0)
        server.close()
        waiting = Background(
            acceptor.resumed, 0, time.monotonic() + TIMEOUT, threading.Event()
        )
        try:
            data.reconnect()
        finally:
            waiting.result().close()
        return data.channels[0]
    finally:
        data.shutdown()
        acceptor.close()
        listener.close()


def test_a_resume_goes_on_from_what_the_destination_applied(conf):
    assert resumed_with(conf, 2).connection.last_seq == 2


def test_a_destination_claiming_more_than_was_sent_is_refused(conf):
    with pytest.raises(ProtocolError, match=r"frame 9, outside 0\.\.3"):
        resumed_with(conf, 9)
