"""The bus sink: what it publishes, and that a bad bus cannot hurt."""

import dataclasses
import io
import logging
import threading

import oslo_messaging
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import progress as progress_conf
from nova_xen_ncm.conf import xen_ncm as xen_ncm_conf
from nova_xen_ncm.progress import ProgressSink
from nova_xen_ncm.progress.bus import BusSink
from nova_xen_ncm.progress.bus import from_conf
from nova_xen_ncm.progress.bus import make_notifier
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.tracker import unwrap

# A hang in the sink is a failure, not a stuck test run.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    xen_ncm_conf.register_opts(conf)
    progress_conf.register_opts(conf)
    conf([])
    yield conf
    # The option groups are module objects shared by every ConfigOpts
    # they are registered with, overrides included.
    conf.reset()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Recorder:
    """Records what the Notifier would publish."""

    def __init__(self):
        self.sent = []
        self.threads = set()

    def _record(self, priority, ctxt, event_type, payload):
        self.threads.add(threading.get_ident())
        self.sent.append((priority, event_type, unwrap(payload)))

    def info(self, ctxt, event_type, payload):
        self._record("info", ctxt, event_type, payload)

    def warn(self, ctxt, event_type, payload):
        self._record("warn", ctxt, event_type, payload)

    def error(self, ctxt, event_type, payload):
        self._record("error", ctxt, event_type, payload)

    def types(self):
        return [t.rsplit(".", 1)[1] for _, t, _ in self.sent]


class Blocking(Recorder):
    """A bus that hangs until released."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def _record(self, *args):
        self.entered.set()
        self.release.wait()
        super()._record(*args)


class Refusing(Recorder):
    """A bus that is gone, failing the way the Notifier's messaging
    driver does: it logs the error and returns."""

    def _record(self, priority, ctxt, event_type, payload):
        self.threads.add(threading.get_ident())
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            logging.getLogger("oslo_messaging.notify.messaging").exception(
                "Could not send notification to %(topic)s.",
                {"topic": "notifications"},
            )


def ev(kind, phase, **kw):
    kw.setdefault("timestamp", 1000.0)
    return ProgressEvent(migration_id="m-1", kind=kind, phase=phase, **kw)


def rnd(n, sent):
    return ev(
        EventKind.ROUND,
        "precopy",
        memory_total=1 << 30,
        memory_processed=sent * (n + 1),
        memory_remaining=1 << 20,
        detail={"round": n, "bytes_sent": sent, "pages_sent": sent // 4096},
    )


def migration():
    yield ev(EventKind.STATE, "precopy", previous="setup")
    for n in range(3):
        yield rnd(n, 4096 * (100 - n))
    yield ev(EventKind.STATE, "stop_and_copy", previous="precopy")
    yield ev(EventKind.STATE, "restore", previous="stop_and_copy")
    yield ev(EventKind.STATE, "commit", previous="restore")
    yield ev(EventKind.STATE, "cleanup", previous="commit")
    yield ev(EventKind.STATE, "done", previous="cleanup")


def test_is_a_progress_sink(conf):
    with BusSink(conf, host="h", publisher=Recorder()) as sink:
        assert isinstance(sink, ProgressSink)


def test_publishes_in_order_from_its_own_thread(conf):
    bus = Recorder()
    with BusSink(conf, host="h", publisher=bus, interval=0.0) as sink:
        sink.start("m-1", instance_uuid="u-1", destination_host="d")
        for event in migration():
            sink.emit(event)
        assert sink.flush(30)
    assert bus.types() == [
        "start",
        "phase",
        "progress",
        "progress",
        "progress",
        "phase",
        "phase",
        "phase",
        "phase",
        "end",
    ]
    assert threading.get_ident() not in bus.threads
    seqs = [data["sequence"] for _, _, data in bus.sent]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {data["instance_uuid"] for _, _, data in bus.sent} == {"u-1"}
    assert {data["source_host"] for _, _, data in bus.sent} == {"h"}
    end = bus.sent[-1][2]
    assert end["outcome"] == "done"
    assert end["statistics"]["bytes_sent"] == 4096 * (100 + 99 + 98)
    assert end["statistics"]["notifications"] == {
        "published": 9,
        "dropped": 0,
        "rate_limited": 0,
    }


def test_progress_interval_limits_progress_only(conf):
    conf.set_override("progress_interval", 60.0, group="xen_ncm")
    bus = Recorder()
    clock = Clock()
    with BusSink(conf, host="h", publisher=bus, clock=clock) as sink:
        for event in migration():
            sink.emit(event)
        assert sink.flush(30)
    assert bus.types().count("progress") == 1
    assert bus.types().count("phase") == 5
    end = bus.sent[-1][2]
    assert end["statistics"]["notifications"]["rate_limited"] == 2
    # Statistics count every round, sent or merged.
    assert end["statistics"]["rounds"] == 3


def test_priorities(conf):
    bus = Recorder()
    with BusSink(conf, host="h", publisher=bus) as sink:
        sink.emit(ev(EventKind.RETRY, "setup", detail={"what": "connect"}))
        sink.emit(ev(EventKind.STATE, "rollback", previous="setup"))
        sink.emit(ev(EventKind.STATE, "failed", previous="rollback"))
        assert sink.flush(30)
    assert [(p, t.rsplit(".", 1)[1]) for p, t, _ in bus.sent] == [
        ("info", "start"),
        ("warn", "retry"),
        ("info", "phase"),
        ("error", "error"),
        ("info", "end"),
    ]


def test_a_hung_bus_never_blocks_emit_and_drops_are_reported(conf, caplog):
    caplog.set_level(logging.INFO, logger="nova_xen_ncm.progress.bus")
    bus = Blocking()
    sink = BusSink(conf, host="h", publisher=bus, interval=0.0, queue_size=2)
    try:
        sink.start("m-1")
        assert bus.entered.wait(30)
        # The start is being published (and hangs); the queue takes two.
        events = list(migration())
        for event in events:
            sink.emit(event)
        # Nine notifications: two wait, six are refused, and the end
        # displaces the oldest waiting one.
        assert sink.dropped_total == 7
        bus.release.set()
        assert sink.flush(30)
    finally:
        bus.release.set()
        sink.close()
    assert bus.types() == ["start", "progress", "end"]
    end = bus.sent[-1][2]
    counts = end["statistics"]["notifications"]
    assert counts["published"] == 2
    assert counts["dropped"] == 7
    assert end["sequence"] == 10
    assert "3 of 10 progress notifications published, 7 dropped" in (
        caplog.text
    )


def test_a_gone_bus_is_counted_and_logged_briefly(conf, caplog):
    caplog.set_level(logging.INFO)
    bus = Refusing()
    clock = Clock()
    sink = BusSink(conf, host="h", publisher=bus, interval=0.0, clock=clock)
    with sink:
        for event in migration():
            sink.emit(event)
        assert sink.flush(30)
    # One attempt, then the backoff drops progress without trying; the
    # end is always tried.
    assert len(bus.threads) == 1
    assert sink.dropped_total == 10
    assert "Could not send notification" not in caplog.text
    assert "0 of 10 progress notifications published, 10 dropped" in (
        caplog.text
    )


def test_the_bus_is_tried_again_after_the_backoff(conf):
    clock = Clock()

    class Flaky(Recorder):
        fail = True

        def _record(self, *args):
            if self.fail:
                raise OSError("down")
            super()._record(*args)

    bus = Flaky()
    with BusSink(
        conf, host="h", publisher=bus, interval=0.0, clock=clock
    ) as sink:
        sink.start("m-1")
        assert sink.flush(30)
        sink.emit(rnd(0, 4096))
        assert sink.flush(30)
        assert bus.sent == []
        bus.fail = False
        clock.now += 1.0
        sink.emit(rnd(1, 4096))
        assert sink.flush(30)
    assert bus.types() == ["progress"]
    assert bus.sent[0][2]["sequence"] == 3


def test_close_drops_what_it_could_not_publish(conf, caplog):
    bus = Blocking()
    sink = BusSink(conf, host="h", publisher=bus, interval=0.0)
    sink.start("m-1")
    assert bus.entered.wait(30)
    sink.emit(ev(EventKind.STATE, "precopy", previous="setup"))
    sink.close(timeout=0.01)
    bus.release.set()
    assert sink.dropped_total == 1
    assert "1 dropped" in caplog.text
    sink.emit(ev(EventKind.STATE, "stop_and_copy", previous="precopy"))
    assert sink.dropped_total == 2


def test_make_notifier_defaults(conf):
    transport = oslo_messaging.get_notification_transport(conf, url="fake:/")
    notifier = make_notifier(conf, "node-1", transport=transport)
    assert notifier.publisher_id == "xen-ncm.node-1"
    assert notifier.retry == 0
    assert notifier.is_enabled()
    transport.cleanup()


def test_from_conf_honours_the_switch(conf):
    # Registers oslo.messaging's options, then points them at the fake
    # in-memory driver.
    oslo_messaging.get_notification_transport(conf, url="fake:/").cleanup()
    conf.set_override("transport_url", "fake:/")
    sink = from_conf(conf, host="h")
    assert isinstance(sink, BusSink)
    assert sink.publisher_id == "xen-ncm.h"
    sink.close()
    conf.set_override("notifications", False, group="xen_ncm_progress")
    assert from_conf(conf, host="h") is None


def test_reports_the_engines_own_events(conf):
    """The sinks read what MigrationState and MigrationStats emit."""
    from nova_xen_ncm.engine.state import MigrationState
    from nova_xen_ncm.engine.state import Phase
    from nova_xen_ncm.engine.stats import MigrationStats
    from nova_xen_ncm.progress.terminal import TerminalSink

    bus = Recorder()
    out = io.StringIO()
    stats = MigrationStats("m-9", memory_bytes=64 << 20)
    with BusSink(conf, host="h", publisher=bus, interval=0.0) as sink:
        screen = TerminalSink(out, host="h", interval=0.0)
        state = MigrationState("m-9", sinks=[sink, screen])
        state.transition(Phase.SETUP, Phase.PRECOPY)
        for pages, dirty in ((16384, 512), (512, 8)):
            rnd_stats = stats.record_round(
                pages_sent=pages,
                bytes_sent=pages * 4096,
                zero_pages=0,
                dirty_pages=dirty,
                duration=0.5,
            )
            state.report(
                EventKind.ROUND,
                detail=rnd_stats.to_dict(),
                memory=stats.memory_progress(),
            )
        for old, new in (
            (Phase.PRECOPY, Phase.STOP_AND_COPY),
            (Phase.STOP_AND_COPY, Phase.RESTORE),
            (Phase.RESTORE, Phase.COMMIT),
            (Phase.COMMIT, Phase.CLEANUP),
            (Phase.CLEANUP, Phase.DONE),
        ):
            state.transition(old, new)
        assert sink.flush(30)
    assert bus.types() == ["start", "phase", "progress", "progress"] + [
        "phase"
    ] * 4 + ["end"]
    progress = bus.sent[3][2]
    assert progress["round"] == 1
    assert progress["bytes_remaining"] == 8 * 4096
    assert progress["bandwidth"] == 512 * 4096 / 0.5
    end = bus.sent[-1][2]
    assert end["statistics"]["pages_sent"] == 16384 + 512
    assert end["statistics"]["rounds"] == 2
    assert "m-9 (source) DONE" in out.getvalue().splitlines()[-1]


def test_concurrent_migrations_keep_their_own_order(conf):
    bus = Recorder()
    ids = [f"m-{n}" for n in range(8)]

    def run(mid):
        for event in migration():
            sink.emit(dataclasses.replace(event, migration_id=mid))

    with BusSink(conf, host="h", publisher=bus, interval=0.0) as sink:
        threads = [threading.Thread(target=run, args=(m,)) for m in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sink.flush(30)
    for mid in ids:
        mine = [d for _, _, d in bus.sent if d["migration_id"] == mid]
        assert [d["sequence"] for d in mine] == list(range(1, 11))
        assert mine[-1]["statistics"]["notifications"]["published"] == 9


def test_listener_stops_while_the_broker_stays_away(conf, monkeypatch):
    # The connection drops and the broker does not come back: the one
    # draining thread keeps trying, one attempt at a time, and stop()
    # still ends it.
    from nova_xen_ncm.progress import bus

    monkeypatch.setattr(bus, "_RECONNECT_PAUSE", 0.01)
    listener = bus.BusListener(
        conf, print, url="rabbit://guest:guest@192.0.2.1:5672/"
    )

    class Lost:
        closed = False

        def drain_events(self, timeout):
            raise ConnectionResetError("gone")

        def close(self):
            self.closed = True

    attempts = []
    tried_twice = threading.Event()

    def connect(max_retries=None):
        attempts.append(max_retries)
        if len(attempts) >= 2:
            tried_twice.set()
        raise ConnectionRefusedError("still gone")

    lost = Lost()
    listener._connection = lost
    monkeypatch.setattr(listener, "_connect", connect)
    listener._thread = threading.Thread(target=listener._drain, daemon=True)
    listener._thread.start()
    assert tried_twice.wait(10)
    listener.stop()
    listener._thread.join(10)
    assert not listener._thread.is_alive()
    assert lost.closed
    assert set(attempts) == {1}
    listener.wait()
