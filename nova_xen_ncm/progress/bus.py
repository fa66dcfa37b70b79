"""Migration progress as versioned notifications on the message bus.

:class:`BusSink` is a :class:`~nova_xen_ncm.progress.model.ProgressSink`
that publishes ``xen_ncm.migration.{start,phase,progress,retry,error,end}``
with an oslo.messaging Notifier (publisher ``xen-ncm.<host>``, topics of
``[oslo_messaging_notifications]``, ``notifications`` by default). The
payloads are described in ``doc/source/progress.rst``.

A bus that is slow or gone must never slow or fail a migration, so
:meth:`BusSink.emit` only translates the event and appends it to a
bounded queue; one background thread publishes. When the queue is full a
progress notification is dropped; when the bus refuses one, it is
dropped too. Drops are counted per migration and reported in its end
notification and in the log.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging as std_logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from typing import Protocol

import oslo_messaging
from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.progress.tracker import MigrationTracker
from nova_xen_ncm.progress.tracker import Notice
from nova_xen_ncm.progress.tracker import Notification
from nova_xen_ncm.progress.tracker import NotificationSink
from nova_xen_ncm.progress.tracker import ProgressTranslator

LOG = logging.getLogger(__name__)

# Nova's exchange (nova.config sets the same default): progress is
# published and listened for where nova-compute publishes, unless
# [DEFAULT] control_exchange says otherwise.
oslo_messaging.set_transport_defaults(control_exchange="nova")

PUBLISHER_PREFIX = "xen-ncm"
DEFAULT_DRIVER = "messagingv2"

# After the bus refused a notification, progress is dropped without
# trying for a while (doubling up to the maximum), so that a bus that is
# gone costs one failed attempt per backoff, not one per notification.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0

# An oslo.messaging Notifier never raises: the messaging driver logs and
# swallows a failed send, the Notifier any other driver error. These are
# the loggers they do that on (oslo_messaging/notify/{messaging,
# notifier}.py).
_FAILURE_LOGGERS = (
    "oslo_messaging.notify.messaging",
    "oslo_messaging.notify.notifier",
)


class Publisher(Protocol):
    """The part of ``oslo_messaging.Notifier`` the sink uses."""

    def info(self, ctxt: Any, event_type: str, payload: Any) -> None: ...

    def warn(self, ctxt: Any, event_type: str, payload: Any) -> None: ...

    def error(self, ctxt: Any, event_type: str, payload: Any) -> None: ...


class _DeliveryFailures(std_logging.Filter):
    """Learns that the Notifier failed to deliver in a given thread.

    The Notifier does not raise when a send fails; it logs the error with
    a traceback and the whole payload. The publishing thread needs to
    know, to count the notification as dropped, and one concise warning
    from the sink replaces that record.
    """

    def __init__(self, thread_id: int) -> None:
        super().__init__()
        self.thread_id = thread_id
        self.failed: str | None = None

    def filter(self, record: std_logging.LogRecord) -> bool:
        if (
            record.thread == self.thread_id
            and record.levelno >= std_logging.ERROR
        ):
            error = record.exc_info[1] if record.exc_info else None
            self.failed = str(error if error is not None else record.msg)
            return False
        return True


def make_notifier(
    conf: cfg.ConfigOpts,
    host: str,
    *,
    url: str | None = None,
    transport: Any = None,
) -> oslo_messaging.Notifier:
    """An oslo.messaging Notifier for progress notifications.

    Transport, topics and driver come from ``[oslo_messaging_notifications]``
    (``url`` overrides the transport URL); with no driver configured the
    ``messagingv2`` driver is used, so progress is published out of the
    box. ``[xen_ncm_progress] publish_retry`` bounds the retries.
    """
    if transport is None:
        transport = oslo_messaging.get_notification_transport(conf, url=url)
    # None: the drivers configured in [oslo_messaging_notifications].
    driver = (
        None if conf.oslo_messaging_notifications.driver else (DEFAULT_DRIVER)
    )
    return oslo_messaging.Notifier(
        transport,
        publisher_id=f"{PUBLISHER_PREFIX}.{host}",
        driver=driver,
        retry=conf.xen_ncm_progress.publish_retry,
    )


class BusSink(NotificationSink):
    """A ProgressSink publishing migration progress on the bus.

    ``publisher`` is an oslo.messaging Notifier (built from ``conf`` by
    :func:`make_notifier` when not given). ``interval`` defaults to
    ``[xen_ncm] progress_interval`` and ``queue_size`` to
    ``[xen_ncm_progress] queue_size``. Call :meth:`start` when a
    migration begins to give its instance and hosts (otherwise the first
    event starts it with what the event says), and :meth:`close` at
    shutdown.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        *,
        host: str | None = None,
        publisher: Publisher | None = None,
        url: str | None = None,
        interval: float | None = None,
        queue_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host or socket.gethostname()
        self.publisher_id = f"{PUBLISHER_PREFIX}.{self.host}"
        # A transport the sink made is the sink's to clean up.
        self._transport = None
        if publisher is None:
            self._transport = oslo_messaging.get_notification_transport(
                conf, url=url
            )
            publisher = make_notifier(
                conf, self.host, transport=self._transport
            )
        self.publisher = publisher
        self.queue_size = (
            queue_size
            if queue_size is not None
            else conf.xen_ncm_progress.queue_size
        )
        if self.queue_size < 1:
            raise ValueError("the notification queue holds at least one")
        self.close_timeout = conf.xen_ncm_progress.close_timeout
        self._clock = clock
        super().__init__(
            ProgressTranslator(
                self.host,
                (
                    interval
                    if interval is not None
                    else conf.xen_ncm.progress_interval
                ),
                clock=clock,
                wallclock=wallclock,
            )
        )
        # Two conditions on one lock: the publishing thread waits for
        # work, flush() waits for the thread to be idle.
        self._work = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._queue: collections.deque[Notification] = collections.deque()
        self._closing = False
        self._idle = True
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        #: Notifications dropped by all migrations, since the sink started.
        self.dropped_total = 0
        self._thread = threading.Thread(
            target=self._run, name="xen-ncm-progress-bus", daemon=True
        )
        self._thread.start()
        self._failures = _DeliveryFailures(self._thread.ident or 0)
        for name in _FAILURE_LOGGERS:
            std_logging.getLogger(name).addFilter(self._failures)

    # -- the migration's side: never blocks on the bus --

    def _deliver(self, notifications: list[Notification]) -> None:
        for note in notifications:
            if self._closing:
                self._drop(note, "the sink is closed")
                continue
            if len(self._queue) >= self.queue_size:
                if not note.final:
                    self._drop(note, "the queue is full")
                    continue
                self._evict_oldest_progress()
            self._queue.append(note)
            self._work.notify()

    def _evict_oldest_progress(self) -> None:
        for index, queued in enumerate(self._queue):
            if not queued.final:
                del self._queue[index]
                self._drop(queued, "the queue is full")
                return

    def _drop(self, note: Notification, why: str) -> None:
        # Called with the lock held.
        note.tracker.dropped += 1
        self.dropped_total += 1
        LOG.debug(
            "Dropped %s of migration %s: %s",
            note.event_type,
            note.tracker.migration_id,
            why,
        )
        if note.notice is Notice.END:
            self._log_summary(
                note.tracker, "; the end notification was dropped"
            )

    # -- the publishing thread --

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle = not self._queue
                if self._idle:
                    self._drained.notify_all()
                while not self._queue and not self._closing:
                    self._work.wait()
                if not self._queue:
                    return
                self._idle = False
                note = self._queue.popleft()
                if note.notice is Notice.END:
                    # Counted now: everything before it was attempted.
                    note.data["statistics"]["notifications"] = _counts(
                        note.tracker
                    )
                skip = not note.final and self._clock() < self._retry_at
                if skip:
                    self._drop(note, "the bus failed recently")
                    continue
            delivered = self._publish(note)
            with self._lock:
                if delivered:
                    note.tracker.published += 1
                    self._retry_at = 0.0
                    self._backoff = BACKOFF_INITIAL
                else:
                    self._drop(note, "the bus refused it")
                    self._retry_at = self._clock() + self._backoff
                    self._backoff = min(BACKOFF_MAX, self._backoff * 2)
                if delivered and note.notice is Notice.END:
                    self._log_summary(note.tracker)

    def _publish(self, note: Notification) -> bool:
        self._failures.failed = None
        try:
            getattr(self.publisher, note.priority)(
                {}, note.event_type, note.payload()
            )
        except Exception as exc:
            # The Notifier swallows driver errors; a publisher that raises
            # must not end the thread either.
            self._failures.failed = str(exc)
        if self._failures.failed is None:
            return True
        LOG.warning(
            "Could not publish %s of migration %s: %s",
            note.event_type,
            note.tracker.migration_id,
            self._failures.failed,
        )
        return False

    def _log_summary(self, tracker: MigrationTracker, note: str = "") -> None:
        produced = tracker.sequence
        log = LOG.warning if tracker.dropped else LOG.info
        log(
            "Migration %s (%s): %d of %d progress notifications published, "
            "%d dropped (bus slow or unreachable), %d merged by the rate "
            "limit%s",
            tracker.migration_id,
            tracker.role,
            tracker.published,
            produced,
            tracker.dropped,
            tracker.rate_limited,
            note,
        )

    # -- lifecycle --

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued notification was handled; True if so."""
        # Real time: the injected clock drives rate limit and back-off only.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or not self._idle:
                if not self._thread.is_alive():
                    return False
                if deadline is None:
                    self._drained.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(remaining)
            return True

    def close(self, timeout: float | None = None) -> None:
        """Publish what is queued (at most ``timeout`` seconds, by default
        ``[xen_ncm_progress] close_timeout``), then stop; what is left is
        dropped and logged."""
        timeout = self.close_timeout if timeout is None else timeout
        with self._lock:
            self._closing = True
            self._work.notify_all()
        self._thread.join(timeout)
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
            for note in left:
                self._drop(note, "the sink closed before it was published")
            for tracker in self._translator.active:
                if tracker.dropped:
                    self._log_summary(tracker, "; the migration had not ended")
        for name in _FAILURE_LOGGERS:
            std_logging.getLogger(name).removeFilter(self._failures)
        if self._transport is not None and not self._thread.is_alive():
            self._transport.cleanup()
            self._transport = None

    def __enter__(self) -> BusSink:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _counts(tracker: MigrationTracker) -> dict[str, int]:
    return {
        "published": tracker.published,
        "dropped": tracker.dropped,
        "rate_limited": tracker.rate_limited,
    }


def from_conf(
    conf: cfg.ConfigOpts, *, host: str | None = None
) -> BusSink | None:
    """The bus sink a service attaches to its migrations, or None when
    ``[xen_ncm_progress] notifications`` is off."""
    if not conf.xen_ncm_progress.notifications:
        return None
    return BusSink(conf, host=host)


# -- listening: a queue that goes away with its listener -------------------

EVENT_PREFIX = "xen_ncm.migration."
WATCH_QUEUE_PREFIX = "nova-xen-ncm-watch"
# How long one wait for the broker lasts, so that stop() is seen.
_DRAIN_TICK = 0.5
# Between two attempts to reach a broker that went away.
_RECONNECT_PAUSE = 1.0


def _kombu_urls(url: oslo_messaging.TransportURL) -> list[str]:
    from urllib.parse import quote

    if url.transport not in ("rabbit", "kombu"):
        raise ValueError(
            f"listening for progress needs a RabbitMQ transport "
            f"(rabbit://), not {url.transport}://"
        )
    vhost = quote(url.virtual_host or "", safe="")
    urls = []
    for host in url.hosts:
        auth = ""
        if host.username:
            auth = quote(host.username, safe="")
            if host.password:
                auth += ":" + quote(host.password, safe="")
            auth += "@"
        urls.append(
            f"amqp://{auth}{host.hostname}:{host.port or 5672}/{vhost}"
        )
    if not urls:
        raise ValueError("the transport URL names no RabbitMQ host")
    return urls


class BusListener:
    """Receives ``xen_ncm.migration.*`` notifications from the exchange
    Nova publishes on, on a queue that goes away with the listener.

    oslo.messaging's notification listener leaves its queue on the broker
    when it stops (it could only make the queue auto-delete together with
    the exchange it binds to, which Nova declared otherwise), and that
    queue then collects notifications for good. This one declares its own
    queue with kombu, bound to ``<topic>.*`` on ``exchange``: without a
    ``pool`` an exclusive queue of its own; with one, a queue of that name
    shared by the listeners of the pool and deleted by the broker when
    the last of them goes (auto-delete).

    ``deliver(event_type, payload, metadata)`` is called in the
    listener's thread. The interface is that of an oslo.messaging
    listener: :meth:`start` (retries until the broker answers),
    :meth:`stop`, :meth:`wait`.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        deliver: Callable[[str, Any, dict], None],
        *,
        url: str | None = None,
        exchange: str | None = None,
        pool: str | None = None,
    ) -> None:
        if url is not None:
            # Refused before oslo.messaging loads a driver for it.
            _kombu_urls(oslo_messaging.TransportURL.parse(conf, url))
        # Registers the transport options and checks the URL.
        oslo_messaging.get_notification_transport(conf, url=url).cleanup()
        transport_url = oslo_messaging.TransportURL.parse(
            conf,
            url
            or conf.oslo_messaging_notifications.transport_url
            or conf.transport_url,
        )
        self.urls = _kombu_urls(transport_url)
        self.exchange = exchange or conf.control_exchange
        self.topics = list(conf.oslo_messaging_notifications.topics)
        self.pool = pool
        self.queue_name = pool or (
            f"{WATCH_QUEUE_PREFIX}.{socket.gethostname()}."
            f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        )
        self._deliver = deliver
        self._stopping = threading.Event()
        self._connection = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._connection = self._connect()
        self._thread = threading.Thread(
            target=self._drain, name="xen-ncm-bus-listener", daemon=True
        )
        self._thread.start()

    def _connect(self, max_retries: int | None = None):
        """A connection consuming from the listener's queue (declared
        anew: after a reconnection too)."""
        import amqp
        import kombu

        connection = kombu.Connection(";".join(self.urls))
        try:
            connection.ensure_connection(
                max_retries=max_retries, interval_max=5
            )
        except Exception:
            connection.release()
            raise
        exchange = self._declare_exchange(connection)
        queue = kombu.Queue(
            self.queue_name,
            bindings=[
                kombu.binding(exchange, routing_key=f"{topic}.*")
                for topic in self.topics
            ],
            durable=False,
            auto_delete=True,
            exclusive=self.pool is None,
        )
        try:
            consumer = connection.Consumer(
                [queue], callbacks=[self._on_message], accept=["json"]
            )
            consumer.consume()
        except amqp.exceptions.PreconditionFailed as exc:
            connection.release()
            # A queue of that name left by a listener that declared it
            # durable (an earlier watch): it must go first.
            raise RuntimeError(
                f"queue {self.queue_name!r} exists on the broker with "
                f"other properties ({exc}); delete it (rabbitmqctl "
                f"delete_queue {self.queue_name}) or choose another pool"
            ) from exc
        return connection

    def _declare_exchange(self, connection):
        """The exchange as whoever declared it first (Nova) did; a new
        one as oslo.messaging declares it (not durable, not auto-delete)."""
        import amqp
        import kombu

        channel = connection.channel()
        try:
            exchange = kombu.Exchange(
                self.exchange, type="topic", passive=True
            )
            exchange(channel).declare()
            return exchange
        except amqp.exceptions.NotFound:
            exchange = kombu.Exchange(
                self.exchange,
                type="topic",
                durable=False,
                auto_delete=False,
            )
            exchange(connection.channel()).declare()
            return exchange

    def _drain(self) -> None:
        # One thread for the listener's life: a lost connection is
        # replaced here, in the same loop.
        while not self._stopping.is_set():
            try:
                self._connection.drain_events(timeout=_DRAIN_TICK)
            except TimeoutError:
                continue
            except Exception as exc:
                if self._stopping.is_set():
                    return
                LOG.warning("Lost the bus (%s); reconnecting", exc)
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = self._reconnect()
                if self._connection is None:
                    return

    def _reconnect(self):
        """A new connection, or None once stop() was called or the queue
        cannot be declared again. One attempt at a time, so that stop()
        ends a listener whose broker is gone."""
        while not self._stopping.is_set():
            try:
                return self._connect(max_retries=1)
            except RuntimeError as again:
                LOG.error("Cannot listen on the bus again: %s", again)
                return None
            except Exception as again:
                LOG.warning("The bus is still away (%s)", again)
                self._stopping.wait(_RECONNECT_PAUSE)
        return None

    def _on_message(self, body: Any, message: Any) -> None:
        try:
            if isinstance(body, dict) and "oslo.message" in body:
                body = json.loads(body["oslo.message"])
            event_type = body.get("event_type", "")
            if event_type.startswith(EVENT_PREFIX):
                self._deliver(
                    event_type,
                    body.get("payload"),
                    {
                        "message_id": body.get("message_id"),
                        "timestamp": body.get("timestamp"),
                        "publisher_id": body.get("publisher_id"),
                    },
                )
        except (AttributeError, TypeError, ValueError) as exc:
            LOG.warning("Ignored a malformed notification: %s", exc)
        finally:
            message.ack()

    def stop(self) -> None:
        self._stopping.set()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._connection is not None:
            # Closing the channel ends the consumer: the broker deletes
            # the queue (exclusive, or auto-delete with no consumer left).
            self._connection.release()
            self._connection = None
