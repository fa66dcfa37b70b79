"""``nova-xen-ncm watch``: live progress of migrations, from the bus.

Listens to the notifications topics (``[oslo_messaging_notifications]
topics``, ``notifications`` by default) for ``xen_ncm.migration.*`` and
shows a live progress bar per running migration and a line per finished
one (plain lines when stdout is not a terminal). It listens on the
exchange nova-compute publishes on (``[DEFAULT] control_exchange``,
``nova``; ``--exchange``) in its own pool, so it takes copies of the
notifications and steals none from other consumers such as ceilometer;
the pool's queue goes away when the last watch of the pool ends
(:class:`nova_xen_ncm.progress.bus.BusListener`).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.cmd import EnvironmentProblem
from nova_xen_ncm.cmd import bus
from nova_xen_ncm.progress.terminal import Display
from nova_xen_ncm.progress.tracker import unwrap

POOL_PREFIX = "nova-xen-ncm-watch"
# The pool's queue outlives a watch and collects notifications until the
# next one starts; those older than this (seconds before the start, which
# also absorbs clock skew between hosts) are not shown.
STALE_GRACE = 60.0
# How long a watch that ends waits for its listener to stop.
SHUTDOWN_WAIT = 0.5
# How often the main thread wakes up to check the timeout.
_POLL = 0.2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="Show live progress of migrations from the message bus.",
        description=(
            "Listen for xen_ncm.migration.* notifications and show a live "
            "progress bar per running migration and a line per finished "
            "one. Stop with Ctrl-C."
        ),
    )
    parser.add_argument(
        "--transport-url",
        metavar="URL",
        help="transport URL of the bus (default: [oslo_messaging_"
        "notifications] transport_url, else [DEFAULT] transport_url)",
    )
    parser.add_argument(
        "--exchange",
        help="exchange nova-compute publishes on (default: [DEFAULT] "
        "control_exchange, which is Nova's 'nova' unless changed)",
    )
    parser.add_argument(
        "--pool",
        default=default_pool(),
        help="listener pool (a queue on the bus); watchers in the same "
        "pool share the notifications between them, and the broker "
        "deletes the queue when the last of them ends (default: "
        "%(default)s, one per user and host)",
    )
    parser.add_argument(
        "--migration",
        metavar="ID",
        help="show only this migration",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit when the first migration ends on its source; the exit "
        "status is 0 if it is DONE, 1 otherwise",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop this many seconds after the command started watching: "
        "counted from when the command line was read, including the "
        "connection to the bus (with --once, an error when no migration "
        "ended by then)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain lines even on a terminal",
    )
    parser.set_defaults(func=run)


def default_pool() -> str:
    """A pool per user and host: two operators watching do not split the
    notifications between them, and one operator's pool is reused from
    one watch to the next rather than left behind on the broker."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{POOL_PREFIX}.{socket.gethostname()}.{user}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds, got {text!r}"
        )
    return value


class Watch:
    """What ``watch`` shows, fed one notification at a time."""

    def __init__(
        self,
        display: Display,
        *,
        migration: str | None = None,
        once: bool = False,
        not_before: float | None = None,
    ) -> None:
        self.display = display
        self.migration = migration
        self.once = once
        self.not_before = not_before
        #: The outcome that ends a --once watch, when it came.
        self.outcome: str | None = None
        #: The ``end`` notifications shown, in order.
        self.ended: list[Mapping[str, Any]] = []

    def feed(
        self,
        event_type: str,
        payload: Any,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Show one notification; True when the watch is over."""
        try:
            data = unwrap(payload)
        except ValueError as exc:
            print(f"ignored {event_type}: {exc}", file=sys.stderr)
            return False
        if self.migration and data.get("migration_id") != self.migration:
            return False
        if self._stale(metadata or {}):
            return False
        self.display.show(event_type, data)
        if event_type.endswith(".end"):
            self.ended.append(data)
        if (
            self.once
            and event_type.endswith(".end")
            and data.get("role", "source") == "source"
        ):
            self.outcome = str(data.get("outcome"))
            return True
        return False

    def _stale(self, metadata: Mapping[str, Any]) -> bool:
        if self.not_before is None:
            return False
        sent = _parse_time(metadata.get("timestamp"))
        return sent is not None and sent < self.not_before


def _parse_time(text: Any) -> float | None:
    # oslo.messaging stamps str(timeutils.utcnow()): naive UTC.
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


def run(args: argparse.Namespace) -> int:
    from nova_xen_ncm import conf

    watch = Watch(
        Display(sys.stdout, tty=False if args.plain else None),
        migration=args.migration,
        once=args.once,
    )
    return follow(
        conf.CONF,
        watch,
        transport_url=args.transport_url,
        exchange=args.exchange,
        pool=args.pool,
        timeout=args.timeout,
        started=getattr(args, "started", None),
    )


def follow(
    conf: Any,
    watch: Watch,
    *,
    transport_url: str | None = None,
    exchange: str | None = None,
    pool: str,
    timeout: float | None = None,
    started: float | None = None,
    name: str = "nova-xen-ncm watch",
) -> int:
    """Feed ``watch`` the notifications of the bus until it is over
    (``watch.once``), ``timeout`` seconds after ``started`` (a
    time.monotonic() value, by default now), or Ctrl-C. The exit status:
    0, or 1 when a --once watch saw its migration fail."""
    wall_started = time.time()
    # --timeout counts from the command's start, not from here: loading
    # oslo.messaging alone takes a second or more on a busy machine.
    deadline = (
        None
        if timeout is None
        else (time.monotonic() if started is None else started) + timeout
    )
    if watch.not_before is None:
        watch.not_before = wall_started - STALE_GRACE
    # Every way the URL can be wrong is one line, before anything starts.
    bus.notification_transport(conf, transport_url).cleanup()
    bus.import_messaging()
    from nova_xen_ncm.progress import bus as progress_bus

    inbox: queue.Queue = queue.Queue()
    # A queue of its own that the broker deletes when the watch ends.
    try:
        listener = progress_bus.BusListener(
            conf,
            lambda *notification: inbox.put(notification),
            url=transport_url,
            exchange=exchange,
            pool=pool,
        )
    except ValueError as exc:
        raise EnvironmentProblem(f"cannot listen on the bus: {exc}") from None
    # Connecting retries for as long as the bus is away; in a thread of
    # its own so that --timeout and Ctrl-C still work meanwhile.
    listening = threading.Event()
    failed: list[BaseException] = []
    threading.Thread(
        target=_listen,
        args=(
            listener,
            f"{name}: listening in pool {pool}",
            listening,
            failed,
        ),
        name="watch-listener",
        daemon=True,
    ).start()
    try:
        return _loop(watch, inbox, listening, failed, deadline, timeout)
    finally:
        watch.display.close()
        if listening.is_set():
            _shut_down(listener)


def _shut_down(listener: Any) -> None:
    """Stop listening, in a thread of its own: the listener notices a
    stop only at its next poll of the bus (a second or two), which
    --timeout should not wait for. Whatever is left when the process
    exits, the broker sees as a closed connection."""

    def stop() -> None:
        listener.stop()
        listener.wait()

    thread = threading.Thread(target=stop, name="watch-stop", daemon=True)
    thread.start()
    thread.join(SHUTDOWN_WAIT)


def _listen(
    listener: Any,
    announce: str,
    listening: threading.Event,
    failed: list[BaseException],
) -> None:
    try:
        listener.start()
    except Exception as exc:
        failed.append(exc)
        return
    listening.set()
    # On stderr: stdout carries only migrations, and a caller waits for
    # this line before it expects any.
    print(announce, file=sys.stderr, flush=True)


def _loop(
    watch: Watch,
    inbox: queue.Queue,
    listening: threading.Event,
    failed: list[BaseException],
    deadline: float | None,
    timeout: float | None,
) -> int:
    while True:
        if failed:
            raise EnvironmentProblem(f"cannot listen on the bus: {failed[0]}")
        wait = _POLL
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                if not listening.is_set():
                    raise EnvironmentProblem(
                        f"could not listen on the bus within "
                        f"{timeout:g} seconds"
                    )
                if watch.once:
                    raise CommandFailed(
                        f"no migration ended within {timeout:g} seconds"
                    )
                return 0
            wait = min(wait, left)
        try:
            event_type, payload, metadata = inbox.get(timeout=wait)
        except queue.Empty:
            continue
        if watch.feed(event_type, payload, metadata):
            return 0 if watch.outcome == "done" else 1
