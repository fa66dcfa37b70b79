"""Progress notifications over a real RabbitMQ connection.

The broker is ``NOVA_XEN_NCM_RABBIT_URL`` (default
rabbit://guest:guest@127.0.0.1:5672/; ``rabbitmq-server -detached`` starts
a local one). Without a reachable broker the tests are skipped, except
under CI (``CI=true``), where that is a failure.

The bound on the publisher path: one ``emit()`` call, the migration's
cost of reporting, must take less than 50 ms even when the bus is
unreachable (it measures in microseconds: the bus is only touched by the
sink's own thread).
"""

from __future__ import annotations

import logging
import queue
import time
import uuid

import oslo_messaging
import pytest
from oslo_config import cfg

from nova_xen_ncm.progress.bus import BusSink
from nova_xen_ncm.progress.bus import make_notifier
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.tracker import unwrap

from ..conftest import delete_queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

UNREACHABLE_URL = "rabbit://guest:guest@127.0.0.1:1/"
# The bound the issue sets on one publish call from the migration.
EMIT_BOUND = 0.050
# How long a notification may take to come back through the broker.
ARRIVAL_BOUND = 30.0

PAGE = 4096
GIB = 1 << 30


class Collector:
    """A notification listener in a pool of its own, like ``watch``."""

    def __init__(self, conf: cfg.ConfigOpts, url: str, migration_id: str):
        self.url = url
        self.pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
        self.inbox: queue.Queue = queue.Queue()
        self.transport = oslo_messaging.get_notification_transport(
            conf, url=url
        )
        inbox = self.inbox

        class Endpoint:
            filter_rule = oslo_messaging.NotificationFilter(
                event_type=r"^xen_ncm\.migration\."
            )

            def _got(self, ctxt, publisher_id, event_type, payload, meta):
                # Other runs may publish on the same broker.
                if unwrap(payload)["migration_id"] == migration_id:
                    inbox.put((publisher_id, event_type, payload))

            info = warn = error = _got

        self.listener = oslo_messaging.get_notification_listener(
            self.transport,
            [oslo_messaging.Target(topic="notifications")],
            [Endpoint()],
            executor="threading",
            pool=self.pool,
        )

    def __enter__(self) -> Collector:
        self.listener.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.listener.stop()
        self.listener.wait()
        self.transport.cleanup()
        delete_queue(self.url, self.pool)

    def until_end(self) -> list[tuple[str, str, dict]]:
        got = []
        deadline = time.monotonic() + ARRIVAL_BOUND
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no end notification; got {got}"
            publisher_id, event_type, payload = self.inbox.get(timeout=left)
            got.append((publisher_id, event_type, unwrap(payload)))
            if event_type == "xen_ncm.migration.end":
                return got


def a_migration(migration_id: str, rounds: list[tuple[int, int, int]]):
    """Engine events of a migration with precopy ``rounds`` of (pages
    sent, zero pages, dirty pages), one retry and a clean end."""
    now = time.time()

    def event(kind, phase, **kw):
        return ProgressEvent(
            migration_id=migration_id,
            kind=kind,
            phase=phase,
            timestamp=now,
            **kw,
        )

    yield event(EventKind.STATE, "precopy", previous="setup")
    sent = 0
    for number, (pages, zero, dirty) in enumerate(rounds):
        sent += pages * PAGE
        yield event(
            EventKind.ROUND,
            "precopy",
            memory_total=GIB,
            memory_processed=sent,
            memory_remaining=dirty * PAGE,
            detail={
                "round": number,
                "pages_sent": pages,
                "bytes_sent": pages * PAGE,
                "zero_pages": zero,
                "dirty_pages": dirty,
                "bandwidth": 100e6,
                "dirty_rate": 10e6,
            },
        )
        if number == 1:
            yield event(
                EventKind.RETRY,
                "precopy",
                detail={"what": "transfer", "attempt": 1, "delay": 0.5},
            )
    for old, new in (
        ("precopy", "stop_and_copy"),
        ("stop_and_copy", "restore"),
        ("restore", "commit"),
        ("commit", "cleanup"),
    ):
        yield event(EventKind.STATE, new, previous=old)
    yield event(
        EventKind.STATE,
        "done",
        previous="cleanup",
        detail={"statistics": {"actual_downtime": 0.125}},
    )


ROUNDS = [(200000, 62144, 5000), (5000, 0, 800), (800, 0, 40)]


def test_events_arrive_in_order_with_final_statistics(rabbit_url, sink_conf):
    migration_id = str(uuid.uuid4())
    with Collector(sink_conf, rabbit_url, migration_id) as collector:
        with BusSink(
            sink_conf, host="node-a", url=rabbit_url, interval=0.0
        ) as sink:
            sink.start(
                migration_id,
                instance_uuid="7d3c1c5e-94a4-4f1e-9c9b-1f1a1b2c3d4e",
                destination_host="node-b",
            )
            for event in a_migration(migration_id, ROUNDS):
                sink.emit(event)
            got = collector.until_end()
    kinds = [event_type.rsplit(".", 1)[1] for _, event_type, _ in got]
    assert kinds == (
        ["start", "phase"]
        + ["progress", "progress", "retry", "progress"]
        + ["phase"] * 4
        + ["end"]
    )
    assert {publisher for publisher, _, _ in got} == {"xen-ncm.node-a"}
    datas = [data for _, _, data in got]
    assert [d["sequence"] for d in datas] == list(range(1, len(got) + 1))
    sent = [d["bytes_sent"] for d in datas if d["bytes_sent"] is not None]
    assert sent == sorted(sent)
    assert sent[-1] == sum(r[0] for r in ROUNDS) * PAGE
    rounds = [d["round"] for d in datas if d["round"] is not None]
    assert rounds == sorted(rounds)
    assert [d["retries"] for d in datas] == sorted(d["retries"] for d in datas)
    assert {d["destination_host"] for d in datas} == {"node-b"}
    end = datas[-1]
    assert end["outcome"] == "done"
    stats = end["statistics"]
    assert stats["rounds"] == len(ROUNDS)
    assert stats["pages_sent"] == sum(r[0] for r in ROUNDS)
    assert stats["zero_pages"] == sum(r[1] for r in ROUNDS)
    assert stats["bytes_sent"] == sum(r[0] for r in ROUNDS) * PAGE
    assert stats["dirty_pages"] == ROUNDS[-1][2]
    assert stats["retries"] == 1
    assert stats["actual_downtime"] == 0.125
    assert stats["notifications"] == {
        "published": len(got) - 1,
        "dropped": 0,
        "rate_limited": 0,
    }


class Spy:
    """Passes notifications to the real Notifier and keeps the payloads,
    to read the end notification that never reaches a gone bus."""

    def __init__(self, notifier):
        self.notifier = notifier
        self.payloads = []

    def _send(self, priority, ctxt, event_type, payload):
        self.payloads.append((event_type, unwrap(payload)))
        getattr(self.notifier, priority)(ctxt, event_type, payload)

    def info(self, ctxt, event_type, payload):
        self._send("info", ctxt, event_type, payload)

    def warn(self, ctxt, event_type, payload):
        self._send("warn", ctxt, event_type, payload)

    def error(self, ctxt, event_type, payload):
        self._send("error", ctxt, event_type, payload)


def test_unreachable_bus_neither_blocks_nor_raises(
    caplog, record_property, sink_conf
):
    caplog.set_level(logging.INFO, logger="nova_xen_ncm.progress.bus")
    migration_id = str(uuid.uuid4())
    spy = Spy(make_notifier(sink_conf, "node-a", url=UNREACHABLE_URL))
    costs = []
    with BusSink(
        sink_conf, host="node-a", publisher=spy, interval=0.0
    ) as sink:
        start = time.perf_counter()
        sink.start(migration_id)
        costs.append(time.perf_counter() - start)
        # Many rounds: the queue must absorb what the bus refuses.
        rounds = [(1000, 0, 100)] * 200
        for event in a_migration(migration_id, rounds):
            start = time.perf_counter()
            sink.emit(event)
            costs.append(time.perf_counter() - start)
        assert sink.flush(ARRIVAL_BOUND)
    worst = max(costs)
    mean = sum(costs) / len(costs)
    record_property("emit_worst_ms", round(worst * 1000, 3))
    record_property("emit_mean_ms", round(mean * 1000, 3))
    print(
        f"emit() on an unreachable bus: {len(costs)} calls, mean "
        f"{mean * 1e6:.1f} us, worst {worst * 1e6:.1f} us"
    )
    assert worst < EMIT_BOUND, f"an emit took {worst * 1000:.1f} ms"
    produced = 1 + 1 + len(rounds) + 1 + 4 + 1
    assert sink.dropped_total == produced
    end_type, end = spy.payloads[-1]
    assert end_type == "xen_ncm.migration.end"
    # Everything before the end was dropped; the end was tried too.
    assert end["statistics"]["notifications"]["dropped"] == produced - 1
    assert end["statistics"]["notifications"]["published"] == 0
    assert (
        f"0 of {produced} progress notifications published, {produced} dropped"
    ) in caplog.text
