"""``nova-xen-ncm watch``: what it shows and when it stops.

The tests marked ``integration`` run the real command as a subprocess
against RabbitMQ (``NOVA_XEN_NCM_RABBIT_URL``, default
rabbit://guest:guest@127.0.0.1:5672/) and publish through the bus sink;
they skip when the broker is unreachable, except under CI (``CI=true``),
where that is a failure.
"""

from __future__ import annotations

import datetime
import io
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest

from nova_xen_ncm.cmd import main
from nova_xen_ncm.cmd import watch
from nova_xen_ncm.progress.bus import BusSink
from nova_xen_ncm.progress.model import EventKind
from nova_xen_ncm.progress.model import ProgressEvent
from nova_xen_ncm.progress.terminal import Display
from nova_xen_ncm.progress.tracker import envelope

from ...conftest import delete_queue

# Bounds on the subprocess, so that a broken watch fails the test rather
# than hanging it.
READY_BOUND = 60.0
EXIT_BOUND = 60.0


def payload(mid="m-1", role="source", **data):
    return envelope(
        "MigrationPayload",
        dict({"migration_id": mid, "role": role, "phase": "precopy"}, **data),
    )


def make_watch(**kw):
    out = io.StringIO()
    return watch.Watch(Display(out, tty=False), **kw), out


def stamp(seconds_ago: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).replace(
        tzinfo=None
    ) - datetime.timedelta(seconds=seconds_ago)
    return str(when)


def test_registered_with_its_options():
    args = main.build_parser().parse_args(
        [
            "watch",
            "--transport-url",
            "rabbit://h//",
            "--once",
            "--timeout",
            "2.5",
        ]
    )
    assert args.func is watch.run
    assert args.transport_url == "rabbit://h//"
    assert args.once and args.timeout == 2.5
    assert args.pool == watch.default_pool()
    assert args.pool.startswith("nova-xen-ncm-watch.")


def test_default_pool_is_per_user_and_host(monkeypatch):
    monkeypatch.setattr(watch.socket, "gethostname", lambda: "ops-1")
    monkeypatch.setattr(watch.getpass, "getuser", lambda: "alice")
    assert watch.default_pool() == "nova-xen-ncm-watch.ops-1.alice"

    def no_user():
        raise KeyError("uid not in passwd")

    monkeypatch.setattr(watch.getpass, "getuser", no_user)
    assert watch.default_pool() == f"nova-xen-ncm-watch.ops-1.{os.getuid()}"
    assert "nova_xen_ncm.cmd.watch" in main.SUBCOMMANDS


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeout_must_be_positive(value, capsys):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["watch", "--timeout", value])


def test_shows_every_notification_until_an_end_with_once():
    w, out = make_watch(once=True)
    assert not w.feed("xen_ncm.migration.progress", payload(percent=5.0))
    # The destination's end does not end a --once watch; the source's does.
    assert not w.feed(
        "xen_ncm.migration.end",
        payload(role="destination", outcome="done", statistics={}),
    )
    assert w.feed(
        "xen_ncm.migration.end",
        payload(outcome="failed", statistics={"rounds": 2}),
    )
    assert w.outcome == "failed"
    assert len(out.getvalue().splitlines()) == 3


def test_without_once_an_end_does_not_stop():
    w, _ = make_watch()
    assert not w.feed(
        "xen_ncm.migration.end", payload(outcome="done", statistics={})
    )


def test_filters_by_migration():
    w, out = make_watch(migration="m-2")
    w.feed("xen_ncm.migration.progress", payload("m-1"))
    w.feed("xen_ncm.migration.progress", payload("m-2"))
    assert out.getvalue().count("m-2 (source)") == 1
    assert "m-1" not in out.getvalue()


def test_skips_a_stale_backlog():
    w, out = make_watch(not_before=time.time() - 60)
    w.feed(
        "xen_ncm.migration.progress",
        payload("old"),
        {"timestamp": stamp(3600)},
    )
    w.feed(
        "xen_ncm.migration.progress", payload("new"), {"timestamp": stamp(1)}
    )
    w.feed("xen_ncm.migration.progress", payload("unstamped"), {})
    shown = out.getvalue()
    assert "old" not in shown
    assert "new (source)" in shown and "unstamped (source)" in shown


def test_ignores_payloads_it_does_not_understand(capsys):
    w, out = make_watch()
    bad = payload()
    bad["nova_xen_ncm_object.version"] = "2.0"
    assert not w.feed("xen_ncm.migration.progress", bad)
    assert not w.feed("xen_ncm.migration.progress", {"x": 1})
    assert out.getvalue() == ""
    assert "version 2.0" in capsys.readouterr().err


def test_gives_up_when_the_bus_cannot_be_reached_in_time():
    result = subprocess.run(
        command(
            "--transport-url",
            "rabbit://guest:guest@127.0.0.1:1/",
            "--timeout",
            "1",
        ),
        capture_output=True,
        text=True,
        timeout=EXIT_BOUND,
    )
    # An environment problem, not a usage mistake.
    assert result.returncode == 4
    assert "could not listen on the bus within 1 seconds" in result.stderr
    assert result.stdout == ""


# -- the real command against RabbitMQ --


def command(*args: str) -> list[str]:
    script = pathlib.Path(sys.executable).with_name("nova-xen-ncm")
    if script.exists():
        return [str(script), "watch", *args]
    return [sys.executable, "-m", "nova_xen_ncm.cmd.main", "watch", *args]


class Watcher:
    """``nova-xen-ncm watch`` running in a pool of its own."""

    def __init__(self, url: str, tmp_path: pathlib.Path, *args: str):
        self.url = url
        self.pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
        self.stderr_path = tmp_path / f"{self.pool}.err"
        self.stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            command("--transport-url", url, "--pool", self.pool, *args),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_BOUND
        while "listening in pool" not in self.stderr_path.read_text():
            assert self.proc.poll() is None, self.stderr_path.read_text()
            assert time.monotonic() < deadline, "watch never listened"
            time.sleep(0.1)

    def finish(self) -> tuple[int, list[str]]:
        out, _ = self.proc.communicate(timeout=EXIT_BOUND)
        return self.proc.returncode, out.splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        delete_queue(self.url, self.pool)


def publish(conf, url, migration_id, outcome):
    now = time.time()

    def event(kind, phase, **kw):
        return ProgressEvent(migration_id, kind, phase, now, **kw)

    with BusSink(conf, host="node-a", url=url, interval=0.0) as sink:
        sink.start(migration_id, destination_host="node-b")
        sink.emit(event(EventKind.STATE, "precopy", previous="setup"))
        for number, remaining in enumerate((256, 16)):
            sink.emit(
                event(
                    EventKind.ROUND,
                    "precopy",
                    memory_total=1024 << 20,
                    memory_processed=(1024 + 256 * number) << 20,
                    memory_remaining=remaining << 20,
                    detail={
                        "round": number,
                        "bytes_sent": (1024 if number == 0 else 256) << 20,
                        "bandwidth": 512.0 * (1 << 20),
                        "dirty_rate": 64.0 * (1 << 20),
                    },
                )
            )
        if outcome == "done":
            path = ["stop_and_copy", "restore", "commit", "cleanup", "done"]
        else:
            path = ["rollback", "failed"]
        previous = "precopy"
        for phase in path:
            sink.emit(
                event(
                    EventKind.STATE,
                    phase,
                    previous=previous,
                    reason="link down" if outcome != "done" else None,
                )
            )
            previous = phase
        assert sink.flush(EXIT_BOUND)


@pytest.mark.integration
def test_watch_shows_a_migration_from_the_bus(rabbit_url, sink_conf, tmp_path):
    migration_id = str(uuid.uuid4())
    watcher = Watcher(
        rabbit_url,
        tmp_path,
        "--once",
        "--migration",
        migration_id,
        "--timeout",
        str(EXIT_BOUND),
    )
    try:
        watcher.wait_ready()
        publish(sink_conf, rabbit_url, migration_id, "done")
        status, lines = watcher.finish()
    finally:
        watcher.close()
    assert status == 0, watcher.stderr_path.read_text()
    label = f"{migration_id} (source)"
    assert all(label in line for line in lines), lines
    assert lines[0].endswith("start: node-a -> node-b, instance -")
    assert "phase setup -> precopy" in lines[1]
    assert "progress precopy round 0 75.0%" in lines[2]
    assert "progress precopy round 1 98.4%" in lines[3]
    assert [line.split(label, 1)[1].split()[1] for line in lines[4:8]] == [
        "precopy",
        "stop_and_copy",
        "restore",
        "commit",
    ]
    assert len(lines) == 9
    assert "DONE after" in lines[8]
    assert "2 rounds, 1.2 GiB sent" in lines[8]
    assert "0 notifications dropped" in lines[8]


@pytest.mark.integration
def test_watch_once_exits_1_on_a_failed_migration(
    rabbit_url, sink_conf, tmp_path
):
    migration_id = str(uuid.uuid4())
    watcher = Watcher(
        rabbit_url,
        tmp_path,
        "--once",
        "--migration",
        migration_id,
        "--timeout",
        str(EXIT_BOUND),
    )
    try:
        watcher.wait_ready()
        publish(sink_conf, rabbit_url, migration_id, "failed")
        status, lines = watcher.finish()
    finally:
        watcher.close()
    assert status == 1
    assert lines[-2].endswith("error in precopy: link down")
    assert "FAILED after" in lines[-1] and lines[-1].endswith("link down")


@pytest.mark.integration
def test_watch_timeout_bounds_an_idle_watch(rabbit_url, tmp_path):
    # Long enough to start and connect to a local broker even on a
    # loaded machine (the timeout counts from the command's start).
    idle = "10"
    plain = Watcher(
        rabbit_url, tmp_path, "--migration", "none", "--timeout", idle
    )
    once = Watcher(
        rabbit_url,
        tmp_path,
        "--once",
        "--migration",
        "none",
        "--timeout",
        idle,
    )
    try:
        status, lines = plain.finish()
        once_status, once_lines = once.finish()
    finally:
        plain.close()
        once.close()
    assert (status, lines) == (0, [])
    # The wait ran and no migration ended: failed, not a usage mistake.
    assert (once_status, once_lines) == (1, [])
    assert f"no migration ended within {idle} seconds" in (
        once.stderr_path.read_text()
    )


@pytest.mark.integration
def test_watch_exits_on_ctrl_c(rabbit_url, tmp_path):
    watcher = Watcher(rabbit_url, tmp_path)
    try:
        watcher.wait_ready()
        watcher.proc.send_signal(signal.SIGINT)
        status, lines = watcher.finish()
    finally:
        watcher.close()
    assert status == 130
    assert lines == []
    assert "interrupted" in watcher.stderr_path.read_text()
