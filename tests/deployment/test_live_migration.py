"""Live migration of servers with Neutron ports, as a user and an
operator of the minicloud do it: the ``openstack`` client, ``nova-xen-ncm
drain`` and ``nova-xen-ncm watch`` on the cloud's bus."""

from __future__ import annotations

import re
import subprocess
import threading
import uuid

import pytest

# The test's own body; the cloud's ``up`` and ``down`` (module fixture)
# and the server's create and delete are bounded by their commands'
# timeouts, so the first test is not charged with ``up``.
pytestmark = pytest.mark.timeout(600, func_only=True)

WATCH_TIMEOUT = 300
LISTEN_TIMEOUT = 120


def _other(cloud, host: str) -> str:
    (other,) = [h for h in cloud.computes if h != host]
    return other


def _port_host(cloud, server_id: str) -> tuple[str, str]:
    (port,) = cloud.json("port", "list", "--server", server_id, "--long")
    shown = cloud.json("port", "show", port["ID"])
    return shown["binding_host_id"], shown["status"]


@pytest.fixture
def server(cloud):
    name = f"ncm-{uuid.uuid4().hex[:8]}"
    cloud.openstack(
        "server", "create", "--image", "ncm-guest", "--flavor", "ncm.small",
        "--network", "private", "--wait", name,
    )  # fmt: skip
    try:
        yield cloud.wait_status(name, "ACTIVE")
    finally:
        cloud.openstack("server", "delete", "--wait", name, check=False)


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


def test_server_with_a_port_migrates_where_the_scheduler_sends_it(
    cloud, server: dict
):
    source = cloud.host_of(server)
    assert source in cloud.computes
    assert _port_host(cloud, server["id"]) == (source, "ACTIVE")
    watch = _Watch(cloud, f"deploy-test-{server['id'][:8]}")
    try:
        cloud.openstack(
            "server", "migrate", "--live-migration", "--wait", server["id"]
        )
        moved = cloud.wait_status(server["id"], "ACTIVE")
    finally:
        shown = watch.stop()
    assert cloud.host_of(moved) == _other(cloud, source)
    # Neutron's binding followed the guest, and the port is up there.
    assert _port_host(cloud, server["id"]) == (_other(cloud, source), "ACTIVE")
    (migration,) = cloud.json(
        "server", "migration", "list", "--server", server["id"]
    )
    assert migration["Status"] == "completed"
    assert migration["Source Compute"] == source
    assert migration["Dest Compute"] == _other(cloud, source)
    # The migration was seen on the bus: its start, naming the
    # instance, then its end on the source.
    started = re.search(
        rf"(\S+) \(source\) start: \S+ -> \S+, instance {server['id']}",
        shown,
    )
    assert started, shown
    assert f"{started.group(1)} (source) DONE after" in shown, shown


def test_live_migration_to_a_named_host_and_back(cloud, server):
    source = cloud.host_of(server)
    target = _other(cloud, source)
    cloud.openstack(
        "server", "migrate", "--live-migration", "--host", target,
        "--wait", server["id"],
    )  # fmt: skip
    assert cloud.host_of(cloud.wait_status(server["id"], "ACTIVE")) == target
    cloud.openstack(
        "server", "migrate", "--live-migration", "--host", source,
        "--wait", server["id"],
    )  # fmt: skip
    assert cloud.host_of(cloud.wait_status(server["id"], "ACTIVE")) == source
    assert _port_host(cloud, server["id"]) == (source, "ACTIVE")
    migrations = cloud.json(
        "server", "migration", "list", "--server", server["id"]
    )
    assert sorted(
        (m["Source Compute"], m["Dest Compute"], m["Status"])
        for m in migrations
    ) == sorted([(source, target, "completed"), (target, source, "completed")])


def test_a_disabled_host_is_drained(cloud, server):
    source = cloud.host_of(server)
    target = _other(cloud, source)
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
        assert cloud.host_of(cloud.wait_status(server["id"], "ACTIVE")) == (
            target
        )
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
