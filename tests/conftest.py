"""What tests of several tiers share: the RabbitMQ broker the progress
notifications go through, and the options of the sinks that publish them.

The broker is ``NOVA_XEN_NCM_RABBIT_URL`` (default
rabbit://guest:guest@127.0.0.1:5672/). A test that asks for
``rabbit_url`` is skipped when the broker is unreachable, except under CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import progress as progress_conf
from nova_xen_ncm.conf import xen_ncm as xen_ncm_conf

RABBIT_URL = os.environ.get(
    "NOVA_XEN_NCM_RABBIT_URL", "rabbit://guest:guest@127.0.0.1:5672/"
)


@pytest.fixture
def rabbit_url() -> str:
    """The broker's URL, once a connection to it was made."""
    parts = urllib.parse.urlsplit(RABBIT_URL)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or 5672), timeout=5
        ).close()
    except OSError as exc:
        message = f"RabbitMQ is not reachable at {RABBIT_URL}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return RABBIT_URL


@pytest.fixture
def sink_conf() -> cfg.ConfigOpts:
    """Options of the progress sinks, at their defaults."""
    conf = cfg.ConfigOpts()
    xen_ncm_conf.register_opts(conf)
    progress_conf.register_opts(conf)
    conf([])
    return conf


def delete_queue(url: str, name: str) -> None:
    """Pool queues outlive their listener; a test removes its own."""
    # Imported here: only the tests that talk to the broker need kombu.
    import kombu

    amqp = urllib.parse.urlsplit(url)._replace(scheme="amqp").geturl()
    with kombu.Connection(amqp) as connection:
        connection.default_channel.queue_delete(name)
