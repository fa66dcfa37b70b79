"""``demo``, ``receive`` and ``migrate`` with a transport URL publish
both sides of each migration on the bus, as ``watch`` shows them.

Needs RabbitMQ (``NOVA_XEN_NCM_RABBIT_URL``, default
rabbit://guest:guest@127.0.0.1:5672/): skipped when it is unreachable,
except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from ...conftest import delete_queue
from .conftest import HANG_LIMIT
from .conftest import popen
from .conftest import run

pytestmark = pytest.mark.integration


@pytest.fixture
def watcher(rabbit_url, tmp_path):
    """``watch`` in a pool of its own, listening before the test goes
    on; yields a function that stops it and returns its lines."""
    pool = f"nova-xen-ncm-test-{uuid.uuid4().hex}"
    errors = tmp_path / "watch.err"
    with errors.open("w") as stderr:
        proc = popen(
            "watch",
            "--transport-url",
            rabbit_url,
            "--pool",
            pool,
            "--plain",
            # Ends the watch, and the reading of its output, should
            # a notification never come.
            "--timeout",
            str(HANG_LIMIT),
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + HANG_LIMIT
            while "listening in pool" not in errors.read_text():
                assert proc.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, "watch never listened"
                time.sleep(0.1)

            def finish(wanted: int) -> list[str]:
                """Lines once ``wanted`` end lines came (or the bound)."""
                lines: list[str] = []
                for line in proc.stdout:
                    lines.append(line)
                    ends = sum(" DONE after " in x for x in lines)
                    if ends >= wanted:
                        break
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=HANG_LIMIT)
                return lines

            yield finish
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            delete_queue(rabbit_url, pool)


def sides(lines: list[str], migration_id: str) -> set[str]:
    """The roles whose end notification of ``migration_id`` came."""
    return {
        role
        for role in ("source", "destination")
        for line in lines
        if f"{migration_id} ({role}) DONE after " in line
    }


def test_demo_publishes_both_sides(rabbit_url, watcher):
    result = run(
        "demo",
        "--memory",
        "64M",
        "--transport-url",
        rabbit_url,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    migration_id = json.loads(result.stdout)["stats"]["migration_id"]
    lines = watcher(2)
    assert sides(lines, migration_id) == {"source", "destination"}, lines


def test_receive_and_migrate_publish_their_sides(
    rabbit_url, watcher, tmp_path
):
    token = tmp_path / "token.json"
    receiver = popen(
        "receive",
        "--token-file",
        str(token),
        "--listen",
        "127.0.0.1",
        "--no-hold",
        "--transport-url",
        rabbit_url,
    )
    try:
        deadline = time.monotonic() + HANG_LIMIT
        while not token.exists():
            assert receiver.poll() is None, receiver.communicate()[1]
            assert time.monotonic() < deadline, "no token file written"
            time.sleep(0.05)
        migration_id = json.loads(token.read_text())["migration_id"]
        source = run(
            "migrate",
            "guest",
            "--create",
            "--memory",
            "32M",
            "--token-file",
            str(token),
            "--transport-url",
            rabbit_url,
        )
        _, err = receiver.communicate(timeout=HANG_LIMIT)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert source.returncode == 0, source.stderr[-3000:]
    assert receiver.returncode == 0, err[-3000:]
    lines = watcher(2)
    assert sides(lines, migration_id) == {"source", "destination"}, lines
