"""Live migration of servers with Neutron ports, as a user and an
operator of the minicloud do it: the ``openstack`` client, ``nova-xen-ncm
drain`` and ``nova-xen-ncm watch`` on the cloud's bus; then ``minicloud``
itself, run again and taken down.

Every migrated guest is judged after it resumed and ran, from its own RAM
(guest_ram.py: read through the memfd its guest process maps, sharing
nothing with the product)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import openstack.exceptions
import pytest

_spec = importlib.util.spec_from_file_location(
    "deployment_guest_ram", Path(__file__).with_name("guest_ram.py")
)
guest_ram = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = guest_ram
_spec.loader.exec_module(guest_ram)

ROOT = Path(__file__).resolve().parents[2]
MINICLOUD = ROOT / "tools" / "minicloud" / "minicloud"

# The test's own body; the cloud's ``up`` and ``down`` (module fixture)
# and the server's create and delete are bounded by their commands'
# timeouts, so the first test is not charged with ``up``.
pytestmark = pytest.mark.timeout(600, func_only=True)

WATCH_TIMEOUT = 300
LISTEN_TIMEOUT = 120
# ncm.small's RAM (tools/minicloud/register.py).
SMALL_MB = 512
# How long a resumed guest runs before its later state is read.
RUN_SECONDS = 2.0
# Migration list/show with memory progress (2.23/2.24), force-complete
# (2.22) and abort (2.24), each naming the migration by its UUID (2.59):
# python-openstackclient 10.5 passes a numeric migration id to
# openstacksdk's get_server_migration in the wrong order ("Instance 4
# could not be found"); by UUID it lists the server's migrations instead.
MIGRATION_API = "2.59"
# What makes the source of the slow migrations slow, as an operator
# would: the migration's bandwidth capped ([xen_ncm] max_bandwidth,
# MiB/s) far below what its guest dirties ([xen_ncm_sim]
# dirty_rate_bytes), and nothing that would end the precopy on its own:
# the smallest downtime target (at 8 MiB/s, 84 KB: a guest starved of
# CPU by a loaded machine still dirties more in a round; with the
# default 0.5 s one converged after 54 s), no throttling, no round limit
# within the test; progress reported every second.
SLOW_SOURCE = "ncm-compute1"
SLOW_OPTIONS = {
    "xen_ncm": {
        "max_bandwidth": "8",
        "downtime_target": "0.01",
        "progress_interval": "1.0",
        "max_rounds": "10000",
        "throttle_min": "1.0",
    },
    "xen_ncm_sim": {"dirty_rate_bytes": str(64 << 20)},
}
# The slow migrations' guests: small, so the first round takes seconds.
SLOW_MB = 128
PROGRESS_TIMEOUT = 120
SETTLE_TIMEOUT = 240


def _other(cloud, host: str) -> str:
    (other,) = [h for h in cloud.computes if h != host]
    return other


def _port_host(cloud, server_id: str) -> tuple[str, str]:
    """Where Neutron binds the server's one port, and its status."""
    (port,) = cloud.conn.network.ports(device_id=server_id)
    return port.binding_host_id, port.status


def _create(cloud, flavor: str = "ncm.small", host: str | None = None):
    """``openstack server create --wait``: the server's id."""
    name = f"ncm-{uuid.uuid4().hex[:8]}"
    where = ["--availability-zone", f"nova:{host}"] if host else []
    created = cloud.openstack(
        "server", "create", "--image", "ncm-guest", "--flavor", flavor,
        "--network", "private", *where, "--wait", "-f", "json", name,
    )  # fmt: skip
    return json.loads(created.stdout)["id"]


def _delete(cloud, server_id: str) -> None:
    """Deleted, and gone from Nova (its guest with it): the next
    server's guest is then the only one on its compute."""
    cloud.conn.compute.delete_server(server_id, ignore_missing=True)
    try:
        server = cloud.conn.compute.get_server(server_id)
    except openstack.exceptions.NotFoundException:
        return
    cloud.conn.compute.wait_for_delete(server, interval=1, wait=180)


# One server for the class's tests, in turn: a test starts from where
# the one before left it (ACTIVE, its guest judged there).
@pytest.fixture(scope="class")
def server(cloud):
    server_id = _create(cloud)
    try:
        yield cloud.wait_status(server_id, "ACTIVE")
    finally:
        _delete(cloud, server_id)


# -- the guest's own verdicts -------------------------------------------------


def _snapshot(cloud, host: str, memory_mb: int = SMALL_MB, heap=True):
    guest = guest_ram.the_guest(cloud.compute_pid(host), host)
    return guest_ram.snapshot(host, guest, memory_mb, heap)


def _after_resume(cloud, before, host: str, memory_mb: int = SMALL_MB):
    """Judge the guest on ``host`` after it resumed there and ran, from
    its RAM, against ``before`` (its RAM on the source before the
    migration); the copy on the other host is gone. The destination's
    snapshot, for the next hop."""
    if host != before.host:
        guest_ram.no_guest(cloud.compute_pid(before.host), before.host)
    guest_ram.no_guest(cloud.compute_pid(_other(cloud, host)), "the other")
    resumed = _snapshot(cloud, host, memory_mb)
    time.sleep(RUN_SECONDS)
    later = _snapshot(cloud, host, memory_mb, heap=False)
    problems = guest_ram.judge(before, resumed, later)
    if later.process.pid != resumed.process.pid:
        problems.append(f"the guest process on {host} was replaced")
    if host == before.host and resumed.process.pid != before.process.pid:
        problems.append(f"the guest on {host} did not resume: restarted")
    assert not problems, (
        f"the guest's after-resume verdicts on {host}:\n" + "\n".join(problems)
    )
    return resumed


# -- live migration -----------------------------------------------------------


class _Watch:
    """``nova-xen-ncm watch`` on the cloud's bus, with nova.conf's
    transport and Nova's exchange, as an operator on the controller runs
    it; started once its listener is on the bus (the line it prints on
    stderr says so), so that no notification of the migration after it is
    missed."""

    def __init__(self, cloud, pool: str) -> None:
        self.proc = subprocess.Popen(
            [
                "nova-xen-ncm", "--config-file", "/etc/nova/nova.conf",
                "watch", "--plain", "--pool", pool,
                "--timeout", str(WATCH_TIMEOUT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cloud.env,
        )  # fmt: skip
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.listening.wait(LISTEN_TIMEOUT):
            self.stop()
            raise AssertionError(
                "nova-xen-ncm watch did not listen on the bus within "
                f"{LISTEN_TIMEOUT} s:\n{''.join(self.lines)}"
            )

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "nova-xen-ncm watch: listening in pool" in line:
                self.listening.set()

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        return "".join(self.lines)


class TestOneServer:
    """One server with a port, created once: migrated where the scheduler
    sends it and back by name, then drained off the host it came back
    to."""

    def test_server_migrates_where_the_scheduler_sends_it_and_back_by_name(
        self, cloud, server: dict
    ):
        source = cloud.host_of(server)
        assert source in cloud.computes
        target = _other(cloud, source)
        assert _port_host(cloud, server["id"]) == (source, "ACTIVE")
        before = _snapshot(cloud, source)
        watch = _Watch(cloud, f"deploy-test-{server['id'][:8]}")
        try:
            cloud.openstack(
                "server", "migrate", "--live-migration", "--wait", server["id"]
            )
            moved = cloud.wait_status(server["id"], "ACTIVE")
        finally:
            shown = watch.stop()
        assert cloud.host_of(moved) == target
        there = _after_resume(cloud, before, target)
        # Neutron's binding followed the guest, and the port is up there.
        assert _port_host(cloud, server["id"]) == (target, "ACTIVE")
        (migration,) = cloud.json(
            "server", "migration", "list", "--server", server["id"]
        )
        assert migration["Status"] == "completed"
        assert migration["Source Compute"] == source
        assert migration["Dest Compute"] == target
        # The migration was seen on the bus: its start, naming the
        # instance, then its end on the source.
        started = re.search(
            rf"(\S+) \(source\) start: \S+ -> \S+, instance {server['id']}",
            shown,
        )
        assert started, shown
        assert f"{started.group(1)} (source) DONE after" in shown, shown

        # Back, to the host named.
        cloud.openstack(
            "server", "migrate", "--live-migration", "--host", source,
            "--wait", server["id"],
        )  # fmt: skip
        assert (
            cloud.host_of(cloud.wait_status(server["id"], "ACTIVE")) == source
        )
        _after_resume(cloud, there, source)
        assert _port_host(cloud, server["id"]) == (source, "ACTIVE")
        migrations = cloud.json(
            "server", "migration", "list", "--server", server["id"]
        )
        assert sorted(
            (m["Source Compute"], m["Dest Compute"], m["Status"])
            for m in migrations
        ) == sorted(
            [(source, target, "completed"), (target, source, "completed")]
        )

    def test_a_disabled_host_is_drained(self, cloud, server):
        # Where the test before left it (on the host it came back to).
        source = cloud.host_of(cloud.wait_status(server["id"], "ACTIVE"))
        target = _other(cloud, source)
        before = _snapshot(cloud, source)
        cloud.openstack(
            "compute", "service", "set", "--disable",
            "--disable-reason", "deployment test", source, "nova-compute",
        )  # fmt: skip
        try:
            drain = cloud.run(
                "nova-xen-ncm", "drain", "--json", "--os-cloud", "minicloud",
                source,
            )  # fmt: skip
            assert server["id"] in drain.stdout, drain.stdout
            assert cloud.host_of(
                cloud.wait_status(server["id"], "ACTIVE")
            ) == (target)
            _after_resume(cloud, before, target)
            services = cloud.json(
                "compute", "service", "list", "--service", "nova-compute"
            )
            assert {s["Host"]: s["Status"] for s in services}[source] == (
                "disabled"
            )
        finally:
            cloud.openstack(
                "compute", "service", "set", "--enable", source, "nova-compute"
            )


# -- a slow migration: progress, abort, force-complete ------------------------


def _with_options(text: str, options: dict[str, dict[str, str]]) -> str:
    """``text`` (an oslo.config file) with ``options`` set after it: a
    section named again later overrides what it set before."""
    extra = ["", "# deployment test: a slow migration source"]
    for section, values in options.items():
        extra.append(f"[{section}]")
        extra += [f"{k} = {v}" for k, v in values.items()]
    return text + "\n".join(extra) + "\n"


@pytest.fixture(scope="class")
def slow_source(cloud):
    """SLOW_SOURCE's compute restarted with SLOW_OPTIONS in its
    nova-cpu-N.conf, as an operator edits and restarts it: once, for
    both slow tests. The file is put back after them without another
    restart: the module's cloud fixture takes the whole cloud down at
    the module's end (no test after these migrates), and the next ``up``
    starts the compute from the file as it was."""
    n = SLOW_SOURCE.removeprefix("ncm-compute")
    conf = Path(f"/etc/nova/nova-cpu-{n}.conf")
    original = conf.read_text()
    conf.write_text(_with_options(original, SLOW_OPTIONS))
    try:
        cloud.run(str(MINICLOUD), "restart", f"n-cpu-{n}", timeout=600)
        yield SLOW_SOURCE
    finally:
        conf.write_text(original)


@pytest.fixture(scope="class")
def slow_flavor(cloud):
    name = f"ncm.slow-{uuid.uuid4().hex[:6]}"
    cloud.openstack(
        "flavor", "create", "--ram", str(SLOW_MB), "--vcpus", "1",
        "--disk", "1", name,
    )  # fmt: skip
    try:
        yield name
    finally:
        cloud.openstack("flavor", "delete", name, check=False)


@pytest.fixture(scope="class")
def slow_server(cloud, slow_source, slow_flavor):
    """One small server on the slow source for both slow tests: the
    abort leaves it running there, where the force-complete starts."""
    server_id = _create(cloud, slow_flavor, host=slow_source)
    try:
        server = cloud.wait_status(server_id, "ACTIVE")
        assert cloud.host_of(server) == slow_source
        yield server
    finally:
        _delete(cloud, server_id)


def _migration_api(cloud, *args: str):
    return cloud.json("--os-compute-api-version", MIGRATION_API, *args)


def _migrations(cloud, server_id: str) -> list[dict]:
    """The server's migrations, from Nova's API in this process."""
    return cloud.compute_api(
        "/os-migrations", MIGRATION_API, instance_uuid=server_id
    )["migrations"]


def _in_progress(cloud, server_id: str, migration: dict) -> dict:
    """GET /servers/{id}/migrations/{id}: a running migration with its
    memory progress."""
    return cloud.compute_api(
        f"/servers/{server_id}/migrations/{migration['id']}", MIGRATION_API
    )["migration"]


def _running_migration(cloud, server_id: str) -> tuple[dict, dict]:
    """The server's live migration once it runs and has reported memory
    progress (polled in this process): Nova's record of it, and what
    ``openstack server migration list`` and ``show`` show of it then."""
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    while True:
        listed = _migrations(cloud, server_id)
        running = [m for m in listed if m["status"] == "running"]
        if running:
            record = _in_progress(cloud, server_id, running[0])
            if record["memory_processed_bytes"]:
                break
        assert time.monotonic() < deadline, (
            f"no running migration with memory progress in "
            f"{PROGRESS_TIMEOUT} s: {listed}"
        )
        time.sleep(0.5)
    # What a user sees of it: listed as running, shown with its memory.
    listed = _migration_api(
        cloud, "server", "migration", "list", "--server", server_id
    )
    assert [m["Status"] for m in listed if m["UUID"] == record["uuid"]] == [
        "running"
    ], listed
    shown = _migration_api(
        cloud, "server", "migration", "show", server_id, record["uuid"]
    )
    assert shown["Status"] == "running", shown
    assert shown["Memory Processed Bytes"] > 0, shown
    return record, shown


def _progress_moves(cloud, server_id: str, first: dict) -> dict:
    """A later record of the migration whose memory processed grew: the
    numbers come from the running migration, not from its end."""
    total = first["memory_total_bytes"]
    assert total and total > 0, first
    assert 0 < first["memory_processed_bytes"], first
    assert 0 <= first["memory_remaining_bytes"] <= total, first
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    while True:
        record = _in_progress(cloud, server_id, first)
        assert record["status"] == "running", record
        if record["memory_processed_bytes"] > first["memory_processed_bytes"]:
            assert record["memory_total_bytes"] == total, record
            return record
        assert time.monotonic() < deadline, f"no progress after {first}"
        time.sleep(0.5)


def _migration_ended(cloud, server_id: str, migration_id: str) -> dict:
    """The migration once it ended (polled in this process), as
    ``openstack server migration list`` lists it then."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        (migration,) = [
            m
            for m in _migrations(cloud, server_id)
            if m["uuid"] == migration_id
        ]
        if migration["status"] not in ("running", "preparing", "cancelling"):
            break
        assert time.monotonic() < deadline, migration
        time.sleep(0.5)
    (listed,) = [
        m
        for m in _migration_api(
            cloud, "server", "migration", "list", "--server", server_id
        )
        if m["UUID"] == migration_id
    ]
    return listed


class TestSlowMigration:
    """A migration whose source cannot converge: its progress shown, then
    aborted; and again, forced to complete. One compute restart and one
    server for both."""

    def test_a_slow_migration_shows_progress_and_is_aborted(
        self, cloud, slow_server: dict
    ):
        server_id = slow_server["id"]
        source = cloud.host_of(cloud.wait_status(server_id, "ACTIVE"))
        assert source == SLOW_SOURCE
        target = _other(cloud, source)
        before = _snapshot(cloud, source, SLOW_MB)
        cloud.openstack("server", "migrate", "--live-migration", server_id)
        first, shown = _running_migration(cloud, server_id)
        assert (shown["Source Compute"], shown["Dest Compute"]) == (
            source,
            target,
        )
        _progress_moves(cloud, server_id, first)
        cloud.openstack(
            "--os-compute-api-version", MIGRATION_API, "server", "migration",
            "abort", server_id, first["uuid"],
        )  # fmt: skip
        ended = _migration_ended(cloud, server_id, first["uuid"])
        assert ended["Status"] == "cancelled", ended
        server = cloud.wait_status(server_id, "ACTIVE")
        assert cloud.host_of(server) == source
        _after_resume(cloud, before, source, SLOW_MB)
        assert _port_host(cloud, server_id) == (source, "ACTIVE")

    def test_a_slow_migration_is_forced_to_complete(
        self, cloud, slow_server: dict
    ):
        server_id = slow_server["id"]
        # Where the abort left it: still on the slow source.
        source = cloud.host_of(cloud.wait_status(server_id, "ACTIVE"))
        assert source == SLOW_SOURCE
        target = _other(cloud, source)
        before = _snapshot(cloud, source, SLOW_MB)
        cloud.openstack("server", "migrate", "--live-migration", server_id)
        first, _ = _running_migration(cloud, server_id)
        # It does not end on its own: the guest dirties faster than the
        # cap.
        later = _progress_moves(cloud, server_id, first)
        assert later["memory_remaining_bytes"] > 0, later
        cloud.openstack(
            "--os-compute-api-version", MIGRATION_API, "server", "migration",
            "force", "complete", server_id, first["uuid"],
        )  # fmt: skip
        ended = _migration_ended(cloud, server_id, first["uuid"])
        assert ended["Status"] == "completed", ended
        server = cloud.wait_status(server_id, "ACTIVE")
        assert cloud.host_of(server) == target
        _after_resume(cloud, before, target, SLOW_MB)
        assert _port_host(cloud, server_id) == (target, "ACTIVE")


# -- minicloud itself: run again, then down -----------------------------------


SCHEMAS = ("keystone", "placement", "glance", "neutron", "nova")


def test_up_syncs_a_schema_only_when_it_is_not_current(cloud):
    """The module's ``up``: a service whose databases an earlier ``up``
    of the same release synced is not synced again (its stamp matched
    the databases' alembic revisions); one never synced here is synced
    and stamped. On a machine that ran the tier before, as CI's has,
    this ``up`` is a second one; on a running cloud it goes the same
    way (the stamps do not depend on the services running)."""
    for service in SCHEMAS:
        skipped = re.search(
            rf"minicloud: {service}: schemas? current, .* skipped",
            cloud.up_log,
        )
        if service in cloud.synced_before:
            assert skipped, (service, cloud.up_log[-3000:])
        else:
            assert not skipped, (service, cloud.up_log[-3000:])
        assert (_run_dir() / f"schema-{service}").exists(), service


def _run_dir() -> Path:
    return Path("/opt/stack/data/minicloud")


def _pid_files() -> list[Path]:
    return sorted(_run_dir().glob("*.pid"))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_down_stops_what_up_started_and_only_that(cloud):
    """Last in the module: ``down`` ends every process ``up`` started
    (the APIs, the computes and their guests, Open vSwitch's servers it
    ran, the watch service) and leaves the machine's MariaDB and RabbitMQ
    as it found them: running if they ran before ``up``, stopped if
    ``up`` started them."""
    started = {p.stem: int(p.read_text()) for p in _pid_files()}
    assert {"ovsdb-server", "n-cpu-1", "n-api", "keystone"} <= set(started)
    guests = [
        g.pid
        for host in cloud.computes
        for g in guest_ram.guests_of(cloud.compute_pid(host))
    ]
    down = cloud.run(str(MINICLOUD), "down", timeout=180)
    still = {name: pid for name, pid in started.items() if _alive(pid)}
    assert not still, f"running after down: {still}\n{down.stderr}"
    assert not [g for g in guests if _alive(g)], down.stderr
    assert not _pid_files()
    assert not cloud.clouds_yaml.exists()
    for name, before in cloud.infra_before.items():
        now = cloud.infra_pid(name)
        if before is None:
            assert now is None, f"{name} left running: pid {now}"
            assert f"{name}: stopping it" in down.stderr, down.stderr
        else:
            assert now == before, f"{name} was pid {before}, now {now}"
            assert f"{name}: left running" in down.stderr, down.stderr
