"""The listener ``watch`` uses, on a real RabbitMQ: it receives what a
BusSink publishes on Nova's exchange, and its queue goes away with it.

The broker as in test_bus_rabbitmq (``NOVA_XEN_NCM_RABBIT_URL``; skipped
without one, a failure under CI).
"""

from __future__ import annotations

import queue
import time
import urllib.parse
import uuid

import pytest

from nova_xen_ncm.progress.bus import BusListener
from nova_xen_ncm.progress.bus import BusSink
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.tracker import unwrap

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ARRIVAL_BOUND = 30.0


def queue_exists(url: str, name: str) -> bool:
    import amqp
    import kombu

    amqp_url = urllib.parse.urlsplit(url)._replace(scheme="amqp").geturl()
    with kombu.Connection(amqp_url) as connection:
        try:
            connection.channel().queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return False
        except amqp.exceptions.ResourceLocked:
            # Exclusive to the listener's connection: it exists.
            return True
        return True


def publish_one(conf, url: str, migration_id: str) -> None:
    with BusSink(conf, host="h1", url=url, interval=0.0) as sink:
        sink.start(migration_id, instance_uuid="i-1", source_host="h1")
        sink.emit(
            ProgressEvent(
                migration_id=migration_id,
                kind=EventKind.RETRY,
                phase="setup",
                timestamp=time.time(),
                reason="refused",
            )
        )
        assert sink.flush(ARRIVAL_BOUND)


def received(inbox: queue.Queue, migration_id: str) -> list[str]:
    got = []
    while True:
        event_type, payload, metadata = inbox.get(timeout=ARRIVAL_BOUND)
        if unwrap(payload).get("migration_id") != migration_id:
            continue  # other runs on the same broker
        got.append(event_type)
        assert metadata["publisher_id"] == "xen-ncm.h1"
        if event_type == "xen_ncm.migration.retry":
            return got


@pytest.mark.parametrize("pool", [None, "pool"])
def test_receives_on_nova_s_exchange_and_leaves_no_queue(
    rabbit_url, sink_conf, pool
):
    if pool:
        pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
    inbox: queue.Queue = queue.Queue()
    listener = BusListener(
        sink_conf,
        lambda *notification: inbox.put(notification),
        url=rabbit_url,
        pool=pool,
    )
    # The commands publish and listen on Nova's exchange by default.
    assert listener.exchange == "nova"
    listener.start()
    try:
        assert queue_exists(rabbit_url, listener.queue_name)
        migration_id = f"m-{uuid.uuid4().hex}"
        publish_one(sink_conf, rabbit_url, migration_id)
        assert received(inbox, migration_id) == [
            "xen_ncm.migration.start",
            "xen_ncm.migration.retry",
        ]
    finally:
        listener.stop()
        listener.wait()
    assert not queue_exists(rabbit_url, listener.queue_name)


def test_other_exchange_hears_nothing(rabbit_url, sink_conf):
    inbox: queue.Queue = queue.Queue()
    listener = BusListener(
        sink_conf,
        lambda *notification: inbox.put(notification),
        url=rabbit_url,
        exchange=f"nova-xen-ncm-test-{uuid.uuid4().hex}",
    )
    listener.start()
    try:
        publish_one(sink_conf, rabbit_url, f"m-{uuid.uuid4().hex}")
        with pytest.raises(queue.Empty):
            inbox.get(timeout=2.0)
    finally:
        listener.stop()
        listener.wait()


def test_non_rabbit_transport_is_refused(sink_conf):
    with pytest.raises(ValueError, match="RabbitMQ"):
        BusListener(sink_conf, print, url="kafka://127.0.0.1:9092/")


def test_a_queue_left_by_an_old_watch_is_named(rabbit_url, sink_conf):
    import kombu

    pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
    amqp_url = urllib.parse.urlsplit(rabbit_url)._replace(scheme="amqp")
    with kombu.Connection(amqp_url.geturl()) as connection:
        # What oslo.messaging's listener left: not auto-delete.
        connection.channel().queue_declare(pool, auto_delete=False)
        try:
            listener = BusListener(sink_conf, print, url=rabbit_url, pool=pool)
            with pytest.raises(RuntimeError, match="delete_queue " + pool):
                listener.start()
        finally:
            connection.channel().queue_delete(pool)


def test_reconnects_in_its_one_thread(rabbit_url, sink_conf):
    # The broker's side of the connection goes away: the same thread
    # connects again, declares its queue anew and keeps delivering.
    import socket
    import threading

    inbox: queue.Queue = queue.Queue()
    listener = BusListener(
        sink_conf,
        lambda *notification: inbox.put(notification),
        url=rabbit_url,
    )
    listener.start()
    try:
        thread = listener._thread
        lost = listener._connection
        lost.connection.transport.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + ARRIVAL_BOUND
        while listener._connection is lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener._connection is not lost
        assert listener._connection is not None
        migration_id = f"m-{uuid.uuid4().hex}"
        publish_one(sink_conf, rabbit_url, migration_id)
        assert received(inbox, migration_id) == [
            "xen_ncm.migration.start",
            "xen_ncm.migration.retry",
        ]
        assert thread.is_alive() and listener._thread is thread
        assert [
            t
            for t in threading.enumerate()
            if t.name == "xen-ncm-bus-listener"
        ] == [thread]
    finally:
        listener.stop()
        listener.wait()
    assert not thread.is_alive()
    assert not queue_exists(rabbit_url, listener.queue_name)
