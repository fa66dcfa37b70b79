"""Migration progress for people: a live bar per migration, or plain lines.

:class:`Display` renders the notifications of migrations (their payload
data, see ``doc/source/progress.rst``) on a text stream. On a terminal
each running migration has one line that is redrawn in place (phase,
round, percent, rate, ETA, expected downtime) and a migration that ends
leaves one summary line above them; anywhere else (a pipe, a log file)
every notification is one plain line. ``nova-xen-ncm watch`` feeds it
from the bus; :class:`TerminalSink` feeds it straight from the engine.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Mapping
from typing import Any
from typing import TextIO

from oslo_config import cfg

from nova_xen_ncm.conf import CONF as GLOBAL_CONF
from nova_xen_ncm.progress.tracker import Notification
from nova_xen_ncm.progress.tracker import NotificationSink
from nova_xen_ncm.progress.tracker import ProgressTranslator

BAR_WIDTH = 24
# Narrower than this, the bar is left out rather than squeezed.
MIN_BAR_WIDTH = 5
# A live bar may redraw this often: fast enough to look alive, slow
# enough not to flood a remote terminal.
TTY_INTERVAL = 0.5

_CLEAR_LINE = "\x1b[2K"
_CLEAR_BELOW = "\x1b[J"


def human_bytes(value: float | None) -> str:
    if value is None:
        return "?"
    value = float(value)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def human_rate(value: float | None) -> str:
    return "?/s" if value is None else f"{human_bytes(value)}/s"


def human_duration(value: float | None) -> str:
    """An ETA or an elapsed time: 0:07, 12:30, 1:02:03."""
    if value is None:
        return "?"
    seconds = int(round(value))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


def human_seconds(value: float | None) -> str:
    """A short time such as a downtime: 0.312s."""
    return "?" if value is None else f"{value:.3f}s"


def _label(data: Mapping[str, Any]) -> str:
    return f"{data.get('migration_id')} ({data.get('role', 'source')})"


def bar_line(data: Mapping[str, Any], columns: int | None = None) -> str:
    """The live line of a running migration, at most ``columns - 1``
    characters wide: a line that wraps would break the redraw. The bar
    takes what room is left, up to BAR_WIDTH; the id is shortened like a
    git hash (the full one is on the start and end lines)."""
    percent = data.get("percent")
    rnd = data.get("round")
    role = "dst" if data.get("role") == "destination" else "src"
    left = (
        f"{str(data.get('migration_id'))[:8]} {role} "
        f"{data.get('phase', '?')} r{'-' if rnd is None else rnd} "
    )
    right = f" {'  ?' if percent is None else f'{percent:5.1f}'}% "
    if role == "dst":
        # The destination measures what arrived, not rates or times.
        right += f"arrived {human_bytes(data.get('bytes_sent'))}"
    else:
        right += (
            f"{human_rate(data.get('bandwidth'))} "
            f"ETA {human_duration(data.get('eta'))} "
            f"downtime {human_seconds(data.get('expected_downtime'))}"
        )
        if data.get("downtime_target_unmet"):
            right += " (target unmet)"
    width = BAR_WIDTH
    if columns is not None:
        width = min(BAR_WIDTH, columns - 1 - len(left) - len(right) - 2)
    if width < MIN_BAR_WIDTH:
        line = left.rstrip() + right
    else:
        filled = 0 if percent is None else int(width * percent / 100)
        line = f"{left}[{'#' * filled}{'.' * (width - filled)}]{right}"
    return line if columns is None else line[: columns - 1]


def end_line(data: Mapping[str, Any]) -> str:
    """The one line a finished migration leaves. The destination counts
    what arrived (it sends nothing and has no rounds); a migration that
    did not complete says how far its copy had got."""
    stats = data.get("statistics") or {}
    outcome = str(data.get("outcome") or data.get("phase") or "?")
    retries = f"{stats.get('retries', data.get('retries', 0))} retries"
    if data.get("role") == "destination":
        arrived = (
            f"{human_bytes(data.get('bytes_sent'))} of "
            f"{human_bytes(data.get('bytes_total'))} guest memory arrived"
            if data.get("bytes_total")
            else "no guest memory arrived"
        )
        parts = [arrived, retries]
    else:
        parts = [
            f"{stats.get('rounds', 0)} rounds",
            f"{human_bytes(stats.get('bytes_sent'))} sent",
            f"downtime {human_seconds(stats.get('actual_downtime'))}",
            retries,
        ]
    percent = data.get("percent")
    if outcome != "done" and percent is not None:
        parts.insert(0, f"{percent:.1f}% copied when it stopped")
    counts = stats.get("notifications")
    if counts:
        parts.append(f"{counts.get('dropped', 0)} notifications dropped")
    line = (
        f"{_label(data)} {outcome.upper()} after "
        f"{human_duration(stats.get('total_time'))}: {', '.join(parts)}"
    )
    if data.get("reason") and outcome != "done":
        line += f" - {data['reason']}"
    return line


def plain_line(notice: str, data: Mapping[str, Any]) -> str:
    """One notification as a log-like line."""
    head = f"{data.get('emitted_at', '')} {_label(data)}".lstrip()
    if notice == "start":
        return (
            f"{head} start: {data.get('source_host') or '?'} -> "
            f"{data.get('destination_host') or '?'}, instance "
            f"{data.get('instance_uuid') or '-'}"
        )
    if notice == "phase":
        reason = f": {data['reason']}" if data.get("reason") else ""
        return (
            f"{head} phase {data.get('previous_phase')} -> "
            f"{data.get('phase')}{reason}"
        )
    if notice == "retry":
        return (
            f"{head} retry {data.get('retry_what')} attempt "
            f"{data.get('retry_attempt')} in "
            f"{human_seconds(data.get('retry_delay'))}: "
            f"{data.get('retry_error')}"
        )
    if notice == "error":
        fault = data.get("fault") or {}
        return f"{head} error in {fault.get('phase')}: {fault.get('message')}"
    if notice == "end":
        return f"{data.get('emitted_at', '')} {end_line(data)}".lstrip()
    percent = data.get("percent")
    if data.get("role") == "destination":
        return (
            f"{head} progress {data.get('phase')} "
            f"{'?' if percent is None else f'{percent:.1f}'}% arrived "
            f"{human_bytes(data.get('bytes_sent'))} of "
            f"{human_bytes(data.get('bytes_total'))}"
        )
    return (
        f"{head} progress {data.get('phase')} round {data.get('round')} "
        f"{'?' if percent is None else f'{percent:.1f}'}% "
        f"sent {human_bytes(data.get('bytes_sent'))} of "
        f"{human_bytes(data.get('bytes_total'))}, "
        f"remaining {human_bytes(data.get('bytes_remaining'))}, "
        f"{human_rate(data.get('bandwidth'))}, dirty "
        f"{human_rate(data.get('dirty_rate'))}, "
        f"ETA {human_duration(data.get('eta'))}, expected downtime "
        f"{human_seconds(data.get('expected_downtime'))}"
        + (
            " (downtime target unmet)"
            if data.get("downtime_target_unmet")
            else ""
        )
    )


class Display:
    """Shows migrations' notifications on ``stream``.

    ``tty`` chooses live bars (True) or plain lines (False); by default
    whether ``stream`` is a terminal. Not thread-safe: callers serialise.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        columns: int | None = None,
    ) -> None:
        self.stream = stream
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        #: Width of the terminal; None: asked at each redraw (it resizes).
        self.columns = columns
        self._live: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._drawn = 0

    def show(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Render one notification (``xen_ncm.migration.<notice>``)."""
        notice = event_type.rsplit(".", 1)[-1]
        if not self.tty:
            self._write(plain_line(notice, data) + "\n")
            return
        key = (str(data.get("migration_id")), str(data.get("role")))
        done: list[str | Mapping[str, Any]] = []
        if notice == "end":
            self._live.pop(key, None)
            # The bar stays, as it ended (100 % for a completed
            # migration), above the summary line.
            done += [data, end_line(data)]
        else:
            if notice == "error":
                done.append(plain_line(notice, data))
            self._live[key] = data
        self._redraw(done)

    def close(self) -> None:
        """Leave the cursor below the live lines."""
        self._live.clear()
        self._drawn = 0

    def _redraw(self, done: list[str | Mapping[str, Any]]) -> None:
        out = []
        if self._drawn:
            # Back to the first live line: finished lines take its place
            # and the live block is drawn again below them.
            out.append(f"\x1b[{self._drawn}F")
        columns = self.columns or shutil.get_terminal_size().columns
        for line in done:
            if not isinstance(line, str):
                line = bar_line(line, columns)
            out.append(f"{_CLEAR_LINE}{line}\n")
        for data in self._live.values():
            out.append(f"{_CLEAR_LINE}{bar_line(data, columns)}\n")
        out.append(_CLEAR_BELOW)
        self._drawn = len(self._live)
        self._write("".join(out))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class TerminalSink(NotificationSink):
    """A ProgressSink showing migrations of this process on a terminal.

    Progress is shown at most every ``interval`` seconds per migration
    (default: twice a second on a terminal, ``[xen_ncm]
    progress_interval`` otherwise); phase changes, retries, errors and
    ends always. It writes in the engine's thread, so it is meant for a
    command's own terminal; services report on the bus (``BusSink``).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        conf: cfg.ConfigOpts | None = None,
        host: str | None = None,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.display = Display(stream or sys.stdout, tty=tty)
        if interval is None:
            if self.display.tty:
                interval = TTY_INTERVAL
            else:
                interval = (conf or GLOBAL_CONF).xen_ncm.progress_interval
        super().__init__(
            ProgressTranslator(host or socket.gethostname(), interval)
        )

    @property
    def interval(self) -> float:
        """Seconds between two progress lines of one migration."""
        return self._translator.limiter.interval

    def _deliver(self, notifications: list[Notification]) -> None:
        for note in notifications:
            self.display.show(note.event_type, note.data)
