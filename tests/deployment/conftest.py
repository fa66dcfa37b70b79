"""Deployment tier: a real OpenStack brought up by ``tools/minicloud``.

keystone, glance, placement, neutron-server, nova-api, -conductor,
-scheduler and two nova-compute services with this project's driver, on
the machine's RabbitMQ and MariaDB, installed as DevStack installs them
(the project through ``devstack/plugin.sh``). The tests act as users do:
the ``openstack`` client and openstacksdk against that cloud.

The tier runs when ``NOVA_XEN_NCM_DEPLOYMENT_TESTS=1`` or ``CI=true`` and
is skipped otherwise: it installs OpenStack under /opt/stack and writes
/etc/<service>. Missing prerequisites (root, the MariaDB and RabbitMQ
servers, Open vSwitch's ovsdb-server) skip it
naming them, except under ``CI=true`` where they fail it. The cloud is
brought up once for the tier's module (``minicloud up``, idempotent) and
taken down when that module ends (``minicloud down``), before the tiers
after it run.

Bounded time: ``up`` at most UP_TIMEOUT seconds (a first install on a
cold pip cache included: the whole of OpenStack, and Debian's uWSGI), each
test's body at most 600 s, every client call CLI_TIMEOUT, ``down`` at
most DOWN_TIMEOUT; ``down`` runs whatever happens to ``up`` or the tests.
Measured on two cores loaded to 7-10 by other jobs: the whole tier
11 min 22 s (``up`` with OpenStack installed and the schemas current
and the first server's create 197 s; its migration there and back
122 s, its drain 48 s; the slow source's compute restart and the slow
server's create 75 s, its abort 95 s, its force-complete 99 s; ``down``
27 s). Waits poll Nova and Neutron through openstacksdk in this
process; the commands under test run as the ``openstack`` CLI.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path

import openstack.config
import openstack.connection
import pytest

ROOT = Path(__file__).resolve().parents[2]
MINICLOUD = ROOT / "tools" / "minicloud" / "minicloud"
UP_TIMEOUT = 1500
DOWN_TIMEOUT = 120
CLI_TIMEOUT = 300
COMPUTES = ("ncm-compute1", "ncm-compute2")
# Where ``up`` keeps its services' pids (tools/minicloud: $RUN_DIR).
RUN_DIR = Path("/opt/stack/data/minicloud")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _enabled() -> bool:
    return os.environ.get("NOVA_XEN_NCM_DEPLOYMENT_TESTS") == "1" or _in_ci()


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if _enabled():
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(
        reason="deployment tier: set NOVA_XEN_NCM_DEPLOYMENT_TESTS=1 "
        "(or CI=true)"
    )
    for item in items:
        # Only what needs the cloud: the oracle's own tests run anywhere.
        if here in Path(str(item.path)).resolve().parents and (
            "cloud" in getattr(item, "fixturenames", ())
        ):
            item.add_marker(skip)


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the services write /etc and make bridges)")
    for command, package in (
        ("mariadbd", "mariadb-server"),
        ("mysql", "mariadb-client"),
        ("rabbitmq-server", "rabbitmq-server"),
        ("ovsdb-server", "openvswitch-switch"),
        ("curl", "curl"),
        ("ip", "iproute2"),
    ):
        if (
            shutil.which(command) is None
            and not Path("/usr/sbin", command).exists()
        ):
            missing.append(package)
    return missing


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on loopback ``port``, if any."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"pid=(\d+)", out)
    return int(match.group(1)) if match else None


# The machine's servers ``up`` uses: the database and the bus.
INFRA_PORTS = {"MariaDB": 3306, "RabbitMQ": 5672}


class Cloud:
    """The cloud of ``minicloud up``, used through its clouds.yaml."""

    def __init__(
        self,
        clouds_yaml: Path,
        infra_before: dict[str, int | None],
        up_log: str = "",
        synced_before: Iterable[str] = (),
    ) -> None:
        self.clouds_yaml = clouds_yaml
        # What ``up`` said (stderr), and the services whose schemas an
        # earlier ``up`` of the same release had synced (their stamps in
        # RUN_DIR).
        self.up_log = up_log
        self.synced_before = frozenset(synced_before)
        # The database's and the bus's pids before ``up`` (None: not
        # running then).
        self.infra_before = infra_before
        self.computes = COMPUTES
        self.env = dict(
            os.environ,
            OS_CLIENT_CONFIG_FILE=str(clouds_yaml),
            OS_CLOUD="minicloud",
        )
        for name in list(self.env):
            # Only the clouds.yaml speaks for the cloud.
            if name.startswith("OS_") and name not in (
                "OS_CLIENT_CONFIG_FILE",
                "OS_CLOUD",
            ):
                del self.env[name]

    def run(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}:\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    @staticmethod
    def infra_pid(name: str) -> int | None:
        """The pid of the machine's server ``name`` (INFRA_PORTS)."""
        return listener_pid(INFRA_PORTS[name])

    @staticmethod
    def compute_pid(host: str) -> int:
        """The nova-compute of ``host`` (ncm-computeN runs as n-cpu-N)."""
        n = host.removeprefix("ncm-compute")
        return int((RUN_DIR / f"n-cpu-{n}.pid").read_text().strip())

    def openstack(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("openstack", *args, **kw)

    def json(self, *args: str):
        return json.loads(self.openstack(*args, "-f", "json").stdout)

    @staticmethod
    def host_of(server: dict) -> str:
        return server["OS-EXT-SRV-ATTR:host"]

    @functools.cached_property
    def conn(self):
        """openstacksdk in this process, on the same clouds.yaml: what the
        tests poll with (a subprocess per poll costs seconds of Python
        start-up on a loaded machine); the ``openstack`` commands under
        test stay commands."""
        config = openstack.config.OpenStackConfig(
            config_files=[str(self.clouds_yaml)]
        )
        return openstack.connection.Connection(
            config=config.get_one("minicloud")
        )

    def compute_api(self, path: str, microversion: str = "2.59", **params):
        """GET ``path`` of Nova's API at ``microversion``: its JSON."""
        response = self.conn.compute.get(
            path, params=params, microversion=microversion
        )
        assert response.status_code == 200, (path, response.text)
        return response.json()

    def server_now(self, server_id: str) -> dict:
        """The server as Nova's API shows it (the keys of ``openstack
        server show``'s JSON that the tests read)."""
        return self.compute_api(f"/servers/{server_id}")["server"]

    def wait_status(
        self, server_id: str, status: str, timeout: float = 180
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            server = self.server_now(server_id)
            if server["status"] == status and not server.get(
                "OS-EXT-STS:task_state"
            ):
                return server
            if server["status"] == "ERROR" or time.monotonic() > deadline:
                raise AssertionError(
                    f"{server_id} is {server['status']} "
                    f"(task {server.get('OS-EXT-STS:task_state')}), "
                    f"not {status}: {server.get('fault')}"
                )
            time.sleep(0.5)


# Module scope: a session fixture would keep the whole cloud running (and
# its clouds.yaml in place) until the last tier of the run has finished.
@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    missing = _missing()
    if missing:
        message = "deployment tier needs " + ", ".join(missing)
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    if shutil.which("openstack") is None:
        pytest.fail("python-openstackclient (test-requirements) is missing")
    # Whatever happens to ``up`` (failure, timeout, a half-started
    # cloud) or to the tests, ``down`` runs: no service of the tier is
    # left running into the tiers after it.
    infra_before = {name: listener_pid(p) for name, p in INFRA_PORTS.items()}
    # The services an earlier ``up`` synced, with the release they were
    # synced by (its install stamp).
    installed = RUN_DIR / "installed"
    synced_before = frozenset(
        p.name.removeprefix("schema-") for p in RUN_DIR.glob("schema-*")
    )
    release_before = installed.read_text() if installed.exists() else ""
    try:
        up = subprocess.run(
            [str(MINICLOUD), "up"],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT,
        )
        if up.returncode != 0:
            pytest.fail(
                f"minicloud up exited {up.returncode}:\n{up.stderr[-6000:]}"
            )
        yield Cloud(
            Path(up.stdout.strip().splitlines()[-1]),
            infra_before,
            up.stderr,
            synced_before if release_before == installed.read_text() else (),
        )
    finally:
        down = subprocess.run(
            [str(MINICLOUD), "down"],
            capture_output=True,
            text=True,
            timeout=DOWN_TIMEOUT,
        )
        if down.returncode != 0:
            pytest.fail(
                f"minicloud down exited {down.returncode}:\n"
                f"{down.stderr[-3000:]}"
            )
