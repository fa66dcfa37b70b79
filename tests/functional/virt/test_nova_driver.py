"""XenNCMDriver inside Nova: two compute services on their own simulated
Xen hosts, with Nova's real API, conductor, scheduler and the placement
fixture (``nova.tests.functional.integrated_helpers``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time
import uuid
import warnings

import fixtures
import openstack.proxy
from keystoneauth1 import noauth
from keystoneauth1 import session as ks_session
from nova import context as nova_context
from nova import objects
from nova.compute import power_state
from nova.objects import base as obj_base
from nova.tests.functional import integrated_helpers
from nova.virt import node
from openstack import connection
from sqlalchemy import exc as sqla_exc

from nova_xen_ncm import conf as xen_ncm_conf  # noqa: F401 - options
from nova_xen_ncm.cmd import drain
from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import receiver as receiver_module
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.journal import INCOMING
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.tracker import unwrap
from nova_xen_ncm.virt import driver as nova_driver
from nova_xen_ncm.virt.migrate_data import XenNCMLiveMigrateData

COMPUTE_DRIVER = "xen_ncm.XenNCMDriver"
HOSTS = ("host1", "host2")
# Nova's OpenStackSDKFixture (in every nova.test.TestCase) replaces this
# with a mock; a real Connection needs the original, taken at import.
REAL_GET_ENDPOINT = openstack.proxy.Proxy.get_endpoint
# Nova's live-migration notifications, by the side that sends them.
LIVE_MIGRATION_EVENTS = "instance.live_migration_"
# Seconds a control test holds its migration in precopy for the request
# (under the [xen_ncm] io_timeout the destination waits for frames).
CONTROL_HOLD_TIMEOUT = 20.0


def guest_processes() -> list[tuple[int, str]]:
    """(pid, state) of this process's children that run a simulated
    guest; a child that was not reaped shows state Z."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        # The command name may hold spaces: fields follow its ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and (
            b"nova_xen_ncm.host.sim.guest" in cmdline or state == "Z"
        ):
            found.append((int(entry), state))
    return found


def wait_until(predicate, timeout: float = 120.0) -> bool:
    """Poll ``predicate``: Nova's rollback to the destination is an RPC
    cast and the engine's destination tears down in its own thread. The
    bound is for a loaded machine; it returns as soon as it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _api_paste_config() -> str:
    """Nova's api-paste.ini: under the prefix a wheel installed Nova
    into (a venv's base interpreter's too), or in Nova's source tree."""
    import nova

    candidates = [
        os.path.join(prefix, "etc", "nova", "api-paste.ini")
        for prefix in (sys.prefix, sys.base_prefix)
    ]
    candidates.append(
        os.path.join(
            os.path.dirname(os.path.dirname(nova.__file__)),
            "etc",
            "nova",
            "api-paste.ini",
        )
    )
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"Nova's api-paste.ini, tried {candidates}")


class BusRecorder:
    """Stands for the oslo.messaging Notifier of a compute's bus sink
    (Nova's functional framework has no broker)."""

    def __init__(self, host: str, published: list) -> None:
        self.host = host
        self.published = published

    def _record(self, ctxt, event_type, payload):
        self.published.append((self.host, event_type, unwrap(payload)))

    info = warn = error = _record


class XenNCMTestBase(integrated_helpers.ProviderUsageBaseTestCase):
    compute_driver = COMPUTE_DRIVER

    def setUp(self):
        self.flags(api_paste_config=_api_paste_config(), group="wsgi")
        super().setUp()
        # nova.test.TestCase restores the object registry after each
        # test; a process registers our class once, at its first import.
        obj_base.NovaObjectRegistry.register(XenNCMLiveMigrateData)
        # SQLAlchemy 2.1 deprecates what Nova 34's DB layer still uses;
        # nova's WarningsFixture makes those errors.
        warnings.filterwarnings(
            "ignore", category=sqla_exc.SADeprecationWarning
        )
        self.flags(instances_path=self.useFixture(fixtures.TempDir()).path)
        # Nova's state_path defaults to where Nova is installed; the
        # driver's journals go under it.
        self.flags(state_path=self.useFixture(fixtures.TempDir()).path)
        # The disks both simulated hosts share, this test's own.
        self.flags(
            group="xen_ncm_sim",
            disk_dir=self.useFixture(fixtures.TempDir()).path,
        )
        self.flags(group="xen_ncm_sim", memory_fill="zero")
        self.flags(group="xen_ncm_sim", dirty_rate_bytes=256 * 1024)
        self.flags(group="xen_ncm_sim", io_rate_requests=20)
        self.flags(group="xen_ncm_sim", host_memory_mb=1024)
        # A compute service's stop waits this long for its manager's
        # graceful shutdown (the driver's cleanup_host, then Nova's
        # shutdown_all_executors). Nova's test default, 0, leaves that
        # running in the background past the service's fixture, whose
        # patch of shutdown_all_executors is gone by then: the real one
        # shuts the process-wide thread pools the next test needs. 20
        # is all reserved for cleanup_host: no wait for tasks in progress.
        self.flags(manager_shutdown_timeout=20)
        for host in HOSTS:
            # One node identity per service, as on separate machines.
            node.LOCAL_NODE_UUID = None
            self._start_compute(host)
            # Before the service stops (cleanups run last-in first-out):
            # its graceful shutdown runs in the background and must find
            # the guests gone already, or it outlives the test.
            self.addCleanup(self.sim_host(host).close)
        # The driver gives a guest its image's root disk only.
        self.flavor_id = self._create_flavor(
            memory_mb=32, vcpu=2, disk=1, ephemeral=0, name="xen-ncm-tiny"
        )
        # os-vif's plugins act on dom0's network (ovs-vsctl as root),
        # which the simulated hosts do not have, so its plug and unplug
        # are recorded instead (Nova's libvirt functional tests stub the
        # same boundary). Each call notes where the guest ran.
        self.vif_calls: list[tuple[str, str, tuple[str, ...]]] = []
        self.neutron_reports_plugs = False
        for op in ("plug", "unplug"):
            self.useFixture(
                fixtures.MonkeyPatch(f"os_vif.{op}", self._vif_recorder(op))
            )

    def _clear_attrs(self):
        # nova.test.TestCase deletes public attributes after each test to
        # save memory under stestr; under pytest that breaks the runner.
        pass

    def sim_host(self, host: str):
        return self.computes[host].manager.driver._host

    def migrations(self, server: dict) -> list:
        ctxt = nova_context.get_admin_context()
        return objects.MigrationList.get_by_filters(
            ctxt, {"instance_uuid": server["id"]}
        ).objects

    def domain_of(self, server: dict) -> base.DomainInfo:
        host = server["OS-EXT-SRV-ATTR:host"]
        return self.sim_host(host).find_domain(server["id"])

    def _vif_recorder(self, op: str):
        def record(vif, instance_info):
            hosts = tuple(
                host
                for host in HOSTS
                if any(
                    info.uuid == instance_info.uuid
                    for info in self.sim_host(host).list_domains()
                )
            )
            self.vif_calls.append((op, vif.id, hosts))
            if op == "plug" and self.neutron_reports_plugs:
                # What Neutron does when its agent sees the port up.
                self.admin_api.api_post(
                    "/os-server-external-events",
                    {
                        "events": [
                            {
                                "name": "network-vif-plugged",
                                "server_uuid": instance_info.uuid,
                                "tag": vif.id,
                                "status": "completed",
                            }
                        ]
                    },
                )

        return record

    def boot(self, networks="none") -> dict:
        return self._create_server(flavor_id=self.flavor_id, networks=networks)

    def _pause_server(self, server: dict) -> dict:
        self.api.post_server_action(server["id"], {"pause": None})
        return self._wait_for_state_change(server, "PAUSED")

    def _unpause_server(self, server: dict) -> dict:
        self.api.post_server_action(server["id"], {"unpause": None})
        return self._wait_for_state_change(server, "ACTIVE")


class TestLifecycle(XenNCMTestBase):
    def test_concurrency_mode_is_the_one_asked_for(self):
        # The process runner sets OS_NOVA_DISABLE_EVENTLET_PATCHING for
        # the native threading run; Nova must have honoured it.
        from nova import monkey_patch

        threads = os.environ.get("OS_NOVA_DISABLE_EVENTLET_PATCHING") in (
            "1",
            "true",
            "yes",
        )
        self.assertEqual(not threads, monkey_patch.is_patched())
        self.assertEqual(threads, "eventlet" not in sys.modules)

    def test_boot_pause_stop_start_delete(self):
        server = self.boot()
        self.assertEqual("ACTIVE", server["status"])
        host = server["OS-EXT-SRV-ATTR:host"]
        info = self.domain_of(server)
        self.assertEqual(base.DomainState.RUNNING, info.state)
        self.assertEqual(2, info.vcpus)
        self.assertEqual(32 << 20, info.memory_bytes)
        other = [h for h in HOSTS if h != host][0]
        self.assertEqual([], self.sim_host(other).list_domains())
        # One guest process per domain (its vCPUs run in it).
        self.assertEqual(1, len(guest_processes()))

        server = self._pause_server(server)
        self.assertEqual(base.DomainState.PAUSED, self.domain_of(server).state)
        server = self._unpause_server(server)
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )

        domid = self.domain_of(server).domid
        server = self._reboot_server(server)
        # A reboot builds the domain anew, as xl does: Xen's allocator
        # hands out the next domid after the last one, not the old one.
        rebooted = self.domain_of(server)
        self.assertNotEqual(domid, rebooted.domid)
        self.assertEqual(base.DomainState.RUNNING, rebooted.state)
        server = self._reboot_server(server, hard=True)
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )

        # Nova's stop asks the guest to shut down before the domain goes
        # (its power_off timeout): the guest's own PV drivers took the
        # request from xenstore and shut it down.
        sim = self.sim_host(host)
        states_destroyed = []
        real_destroy = sim.destroy_domain

        def destroy_domain(domid, *args, **kwargs):
            states_destroyed.append(sim.domain_info(domid).state)
            return real_destroy(domid, *args, **kwargs)

        with fixtures.MockPatchObject(sim, "destroy_domain", destroy_domain):
            server = self._stop_server(server)
        self.assertEqual([base.DomainState.SHUTDOWN], states_destroyed)
        self.assertEqual([], self.sim_host(host).list_domains())
        # Stopped means the guest process is gone and reaped, not a zombie.
        self.assertTrue(
            wait_until(lambda: guest_processes() == []), guest_processes()
        )
        self.assertEqual(
            power_state.SHUTDOWN, server["OS-EXT-STS:power_state"]
        )
        server = self._start_server(server)
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )

        self._delete_server(server)
        self.assertEqual([], self.sim_host(host).list_domains())
        self.assertTrue(
            wait_until(lambda: guest_processes() == []), guest_processes()
        )
        ctxt = nova_context.get_admin_context()
        self.assertEqual(0, len(objects.InstanceList.get_by_host(ctxt, host)))

    def test_suspend_resume_console(self):
        server = self.boot()
        host = server["OS-EXT-SRV-ATTR:host"]
        domid = self.domain_of(server).domid
        output = self.api.post_server_action(
            server["id"], {"os-getConsoleOutput": {"length": None}}
        )
        self.assertIn("vcpu0", output["output"])

        server = self._suspend_server(server)
        self.assertEqual([], self.sim_host(host).list_domains())
        server = self._resume_server(server)
        info = self.domain_of(server)
        self.assertEqual(domid, info.domid)
        self.assertEqual(base.DomainState.RUNNING, info.state)
        self._delete_server(server)
        self.assertEqual([], self.sim_host(host).list_domains())


ROOT_VBD = 51712
IMAGE_DATA = b"raw image of the guest\n" * 1000
# The simulated guest's block I/O writes the first sectors of its disk
# (64 of 32 bytes); the image beyond them stays as written.
GUEST_AREA = 4096


class TestDisksAndMoves(XenNCMTestBase):
    """The root disk on the storage both hosts share (the simulated
    hosts' disk directory): the image written into it, and the cold
    moves that boot it on the other host."""

    def setUp(self):
        super().setUp()
        self.image_id = str(uuid.uuid4())
        self.glance.create(
            nova_context.get_admin_context(),
            {
                "id": self.image_id,
                "name": "xen-ncm-raw",
                "disk_format": "raw",
                "container_format": "bare",
                "size": len(IMAGE_DATA),
            },
            data=io.BytesIO(IMAGE_DATA),
        )

    def boot_image(self, **kwargs) -> dict:
        return self._create_server(
            flavor_id=self.flavor_id,
            image_uuid=self.image_id,
            networks="none",
            **kwargs,
        )

    def disk(self, server: dict) -> str:
        # Every simulated host sees the same directory.
        return self.sim_host(HOSTS[0]).disk_path(server["id"], ROOT_VBD)

    def assertImage(self, disk) -> None:
        disk.seek(GUEST_AREA)
        self.assertEqual(
            IMAGE_DATA[GUEST_AREA:], disk.read(len(IMAGE_DATA) - GUEST_AREA)
        )

    def hosts_running(self, server: dict) -> list[str]:
        return [
            host
            for host in HOSTS
            if any(
                info.uuid == server["id"]
                for info in self.sim_host(host).list_domains()
            )
        ]

    @contextlib.contextmanager
    def never_on_both_hosts(self, server: dict):
        """Watch both hosts for the guest while the block runs: it must
        never have a domain on both."""
        both = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                running = self.hosts_running(server)
                if len(running) > 1:
                    both.append(running)
                stop.wait(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
        self.assertEqual([], both)

    def test_boot_writes_the_raw_image_into_the_root_disk(self):
        server = self.boot_image()
        with open(self.disk(server), "rb") as f:
            self.assertImage(f)
        # The flavor's 1 GiB root disk, as the domain's vbd sees it.
        self.assertEqual(1 << 30, os.path.getsize(self.disk(server)))
        self._delete_server(server)
        self.assertFalse(os.path.exists(self.disk(server)))

    def test_boot_refuses_an_image_that_is_not_raw(self):
        vhd = "a440c04b-79fa-479c-bed1-0b816eaec379"
        self.assertEqual("vhd", self.glance.show(None, vhd)["disk_format"])
        server = self._create_server(
            flavor_id=self.flavor_id,
            image_uuid=vhd,
            networks="none",
            expected_state="ERROR",
        )
        self.assertIn("raw", server["fault"]["message"])
        self.assertEqual([], self.hosts_running(server))
        self.assertFalse(os.path.exists(self.disk(server)))

    def test_boot_refuses_an_ephemeral_disk_without_trying_another_host(self):
        with_ephemeral = self._create_flavor(
            memory_mb=32, vcpu=2, disk=1, ephemeral=1, name="xen-ncm-eph"
        )
        server = self._create_server(
            flavor_id=with_ephemeral,
            image_uuid=self.image_id,
            networks="none",
            expected_state="ERROR",
        )
        self.assertIn("ephemeral disks", server["fault"]["message"])
        self.assertEqual([], self.hosts_running(server))
        self.assertFalse(os.path.exists(self.disk(server)))

    def test_cold_migrate_and_confirm(self):
        server = self.boot_image()
        source = server["OS-EXT-SRV-ATTR:host"]
        target = [h for h in HOSTS if h != source][0]
        with self.never_on_both_hosts(server):
            server = self._migrate_server(server)
        self.assertEqual(target, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([target], self.hosts_running(server))
        # The source's guest process is reaped in the background.
        self.assertTrue(
            wait_until(lambda: len(guest_processes()) == 1),
            guest_processes(),
        )
        info = self.domain_of(server)
        self.assertEqual(base.DomainState.RUNNING, info.state)
        with open(self.disk(server), "rb") as f:
            self.assertImage(f)
        server = self._confirm_resize(server)
        self.assertEqual(target, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([target], self.hosts_running(server))
        self.assertEqual(
            ["confirmed"], [m.status for m in self.migrations(server)]
        )
        self.assertTrue(os.path.exists(self.disk(server)))
        self._delete_server(server)
        self.assertFalse(os.path.exists(self.disk(server)))
        # A destroyed guest's process is reaped in the background.
        self.assertTrue(
            wait_until(lambda: guest_processes() == []), guest_processes()
        )

    def test_resize_and_revert(self):
        server = self.boot_image()
        source = server["OS-EXT-SRV-ATTR:host"]
        target = [h for h in HOSTS if h != source][0]
        bigger = self._create_flavor(
            memory_mb=64, vcpu=1, disk=2, ephemeral=0, name="xen-ncm-big"
        )
        with self.never_on_both_hosts(server):
            server = self._resize_server(server, bigger)
        self.assertEqual(target, server["OS-EXT-SRV-ATTR:host"])
        info = self.domain_of(server)
        self.assertEqual((1, 64 << 20), (info.vcpus, info.memory_bytes))
        self.assertEqual(2 << 30, os.path.getsize(self.disk(server)))
        with self.never_on_both_hosts(server):
            server = self._revert_resize(server)
        self.assertEqual(source, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([source], self.hosts_running(server))
        info = self.domain_of(server)
        self.assertEqual((2, 32 << 20), (info.vcpus, info.memory_bytes))
        # The grown disk keeps its size: the guest may have written there.
        self.assertEqual(2 << 30, os.path.getsize(self.disk(server)))
        with open(self.disk(server), "rb") as f:
            self.assertImage(f)
        self._delete_server(server)
        # A destroyed guest's process is reaped in the background.
        self.assertTrue(
            wait_until(lambda: guest_processes() == []), guest_processes()
        )

    def test_resize_the_driver_cannot_do_is_refused_before_the_guest_stops(
        self,
    ):
        server = self.boot_image()
        source = server["OS-EXT-SRV-ATTR:host"]
        domid = self.domain_of(server).domid
        with_ephemeral = self._create_flavor(
            memory_mb=32, vcpu=2, disk=1, ephemeral=1, name="xen-ncm-eph"
        )
        self.api.post_server_action(
            server["id"], {"resize": {"flavorRef": with_ephemeral}}
        )
        self._wait_for_migration_status(server, ["error"])
        server = self._wait_for_state_change(server, "ACTIVE")
        # Refused on the source before the guest stopped: the same
        # domain runs on, and nothing was booted elsewhere.
        self.assertEqual(source, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([source], self.hosts_running(server))
        self.assertEqual(domid, self.domain_of(server).domid)
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )
        self.assertEqual("xen-ncm-tiny", server["flavor"]["original_name"])

    def test_evacuate_from_a_forced_down_compute(self):
        server = self.boot_image()
        source = server["OS-EXT-SRV-ATTR:host"]
        target = [h for h in HOSTS if h != source][0]
        # The source host fails: its guest is gone with it (the fencing
        # an operator does before forcing a compute down) and its
        # compute service stops.
        domid = self.domain_of(server).domid
        self.computes[source].stop()
        with contextlib.suppress(base.DomainNotFound):
            self.sim_host(source).destroy_domain(domid)
        self.assertEqual([], self.sim_host(source).list_domains())
        self.admin_api.put_service_force_down(
            self.computes[source].service_ref.uuid, forced_down=True
        )
        # What the guest wrote before the failure.
        with open(self.disk(server), "r+b") as f:
            f.seek(len(IMAGE_DATA))
            f.write(b"written by the guest")
        # Nova's API stops an evacuated server by default (2.95).
        server = self._evacuate_server(server, expected_host=target)
        self.assertEqual([], self.hosts_running(server))
        server = self._start_server(server)
        self.assertEqual(target, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([target], self.hosts_running(server))
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )
        # The new host booted the same disk, not the image afresh.
        with open(self.disk(server), "rb") as f:
            f.seek(len(IMAGE_DATA))
            self.assertEqual(b"written by the guest", f.read(20))
        self._delete_server(server)
        self.assertEqual([], self.hosts_running(server))


class LiveMigrationBase(XenNCMTestBase):
    def setUp(self):
        super().setUp()
        for name, value in {
            "listen_address": "127.0.0.1",
            "precopy_policy": "xen-simple",
            "progress_interval": 0.2,
            "io_timeout": 30.0,
            "accept_timeout": 30.0,
            "retry_initial_delay": 0.01,
            "retry_max_delay": 0.05,
            "commit_query_timeout": 2.0,
        }.items():
            self.flags(group="xen_ncm", **{name: value})

    def migrations(self, server: dict) -> list:
        ctxt = nova_context.get_admin_context()
        return objects.MigrationList.get_by_filters(
            ctxt, {"instance_uuid": server["id"]}
        ).objects

    def api_progress(self, server: dict, timeout: float = 30.0) -> dict:
        """The running migration as ``GET /servers/{id}/migrations``
        shows it, once it shows memory processed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for migration in self.api.get_active_migrations(server["id"]):
                if migration["memory_processed_bytes"]:
                    return migration
            time.sleep(0.05)
        self.fail("GET /servers/{id}/migrations showed no memory progress")

    def live_migration_events(self) -> list[tuple[str, str]]:
        """(event type, sending host) of Nova's versioned live-migration
        notifications so far, in the order they were sent."""
        return [
            (n["event_type"], n["publisher_id"].split(":", 1)[1])
            for n in self.notifier.versioned_notifications
            if n["event_type"].startswith(LIVE_MIGRATION_EVENTS)
        ]


class TestLiveMigration(LiveMigrationBase):
    def test_live_migrate_with_a_port(self):
        port = self.neutron.port_1
        server = self.boot(networks=[{"port": port["id"]}])
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        # Plugged at spawn, before the domain existed.
        self.assertEqual([("plug", port["id"], ())], self.vif_calls)

        # What nova-compute publishes on the bus, host by host.
        published = []
        for host in HOSTS:
            sink = self.computes[host].manager.driver._bus
            self.assertIsNotNone(sink)
            self.useFixture(
                fixtures.MockPatchObject(
                    sink, "publisher", BusRecorder(host, published)
                )
            )

        # The source waits for network-vif-plugged from the destination
        # (NeutronFixture turns the waits off; Neutron's extended port
        # binding is on, so Nova waits for the plug on the destination).
        self.flags(vif_plugging_timeout=60)
        self.neutron_reports_plugs = True
        self.vif_calls.clear()
        server = self._live_migrate(server, "completed")
        self.neutron_reports_plugs = False
        self.assertNotIn(
            "Timed out waiting for events", self.stdlog.logger.output
        )
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(
            [
                # The destination plugs while the guest runs on the
                # source only (pre_live_migration) ...
                ("plug", port["id"], (source,)),
                # ... and the source unplugs once it runs on the
                # destination only.
                ("unplug", port["id"], (dest,)),
            ],
            # Nova's cleanup on the source unplugs again (idempotent).
            list(dict.fromkeys(self.vif_calls)),
        )
        # Neutron's binding moved with the guest.
        self.assertEqual(
            dest,
            self.neutron.show_port(port["id"])["port"]["binding:host_id"],
        )

        for host in HOSTS:
            self.computes[host].manager.driver._bus.flush(10)
        # One migration, under the one id both sides use.
        self.assertEqual(
            1, len({data["migration_id"] for *_, data in published})
        )
        mine = [
            (host, event_type, data["role"])
            for host, event_type, data in published
        ]
        # Each side announces and ends the migration from its own host.
        self.assertIn((source, "xen_ncm.migration.start", "source"), mine)
        self.assertIn((source, "xen_ncm.migration.end", "source"), mine)
        self.assertIn((dest, "xen_ncm.migration.start", "destination"), mine)
        self.assertIn((dest, "xen_ncm.migration.end", "destination"), mine)
        ends = [
            data
            for _, event_type, data in published
            if event_type == "xen_ncm.migration.end"
            and data["role"] == "source"
        ]
        self.assertEqual("done", ends[-1]["outcome"])

        self.vif_calls.clear()
        self._delete_server(server)
        self.assertEqual([("unplug", port["id"], ())], self.vif_calls)

    def test_live_migrate(self):
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        before = self.domain_of(server)
        source_driver = self.computes[source].manager.driver
        # Nova runs the source's cleanup only for migrate data it knows
        # (XenNCMLiveMigrateData is a HyperVLiveMigrateData for that).
        cleanup = self.useFixture(
            fixtures.MockPatchObject(
                source_driver, "cleanup", wraps=source_driver.cleanup
            )
        ).mock
        # Precopy is over in a moment: the source pauses the guest for
        # stop-and-copy only once the API has shown memory progress
        # (before the pause, so the downtime budget is not spent).
        seen = threading.Event()
        source_host = self.sim_host(source)
        real_pause = source_host.pause

        def pause(domid):
            seen.wait(30)
            return real_pause(domid)

        self.useFixture(
            fixtures.MockPatchObject(source_host, "pause", side_effect=pause)
        )

        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        progress = self.api_progress(server)
        seen.set()
        self.assertEqual("running", progress["status"])
        self.assertEqual(32 << 20, progress["memory_total_bytes"])
        self.assertGreater(progress["memory_processed_bytes"], 0)
        self.assertIsNotNone(progress["memory_remaining_bytes"])
        self.assertEqual(dest, progress["dest_compute"])
        self._wait_for_migration_status(server, ["completed"])
        server = self._wait_for_state_change(server, "ACTIVE")
        cleanup.assert_called_once()
        # Nova's notifications of the phases, each from the side that
        # runs it; the destination's post step is a call from the source.
        self.assertEqual(
            [
                ("instance.live_migration_pre.start", dest),
                ("instance.live_migration_pre.end", dest),
                ("instance.live_migration_post.start", source),
                ("instance.live_migration_post_dest.start", dest),
                ("instance.live_migration_post_dest.end", dest),
                ("instance.live_migration_post.end", source),
            ],
            self.live_migration_events(),
        )

        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        after = self.domain_of(server)
        self.assertEqual(base.DomainState.RUNNING, after.state)
        self.assertEqual(before.domid, after.domid)
        self.assertEqual([], self.sim_host(source).list_domains())
        # The source's guest process ended and was reaped.
        self.assertTrue(
            wait_until(lambda: len(guest_processes()) == 1),
            guest_processes(),
        )
        (migration,) = self.migrations(server)
        self.assertEqual("completed", migration.status)
        self.assertEqual(progress["id"], migration.id)
        self.assertEqual(32 << 20, migration.memory_total)
        self.assertGreater(migration.memory_processed, 0)
        self.assertIsNotNone(migration.memory_remaining)

        # The migrated guest is managed from its new host.
        server = self._pause_server(server)
        server = self._unpause_server(server)
        self._delete_server(server)
        self.assertEqual([], self.sim_host(dest).list_domains())

    def test_live_migrate_refused_when_domid_taken(self):
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        domid = self.domain_of(server).domid
        # Another guest holds the domid on the destination.
        self.sim_host(dest).create_empty_domain(
            base.DomainConfig(name="squatter", memory_bytes=16 << 20),
            domid,
        )
        dest_driver = self.computes[dest].manager.driver
        rollback = self.useFixture(
            fixtures.MockPatchObject(
                dest_driver,
                "rollback_live_migration_at_destination",
                wraps=dest_driver.rollback_live_migration_at_destination,
            )
        ).mock
        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        self._wait_for_migration_status(server, ["error", "failed"])
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(source, server["OS-EXT-SRV-ATTR:host"])
        info = self.domain_of(server)
        self.assertEqual(base.DomainState.RUNNING, info.state)
        self.assertEqual(
            ["squatter"],
            [d.name for d in self.sim_host(dest).list_domains()],
        )
        # Nova asks the destination to roll back (see migrate_data.py).
        self.assertTrue(wait_until(lambda: rollback.called))
        rollback.assert_called_once()

    def test_failed_restore_rolls_back_to_the_source(self):
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        domid = self.domain_of(server).domid
        # The destination cannot rebuild the guest's PV state.
        self.useFixture(
            fixtures.MockPatchObject(
                self.sim_host(dest),
                "import_pv_state",
                side_effect=base.HostError("injected", call="import"),
            )
        )
        server = self._live_migrate(
            server,
            host=dest,
            migration_expected_state="failed",
            server_expected_state="ACTIVE",
        )
        self.assertEqual(source, server["OS-EXT-SRV-ATTR:host"])
        info = self.domain_of(server)
        self.assertEqual(domid, info.domid)
        self.assertEqual(base.DomainState.RUNNING, info.state)
        self.assertTrue(
            wait_until(lambda: not self.sim_host(dest).list_domains())
        )
        (migration,) = self.migrations(server)
        self.assertEqual("failed", migration.status)
        # The source rolls back and casts the destination's rollback:
        # each side's notifications are in order, the two interleave.
        self.notifier.wait_for_versioned_notifications(
            "instance.live_migration_rollback_dest.end", timeout=30.0
        )
        events = self.live_migration_events()
        self.assertEqual(
            [
                "instance.live_migration_rollback.start",
                "instance.live_migration_rollback.end",
            ],
            [event for event, host in events if host == source],
        )
        self.assertEqual(
            [
                "instance.live_migration_pre.start",
                "instance.live_migration_pre.end",
                "instance.live_migration_rollback_dest.start",
                "instance.live_migration_rollback_dest.end",
            ],
            [event for event, host in events if host == dest],
        )
        self.assertEqual(
            ("instance.live_migration_rollback.start", source), events[2]
        )


class RecoveryBase(LiveMigrationBase):
    """Computes that crash and start again: the helpers, no tests."""

    def setUp(self):
        super().setUp()
        # A restarted end answers or asks on the journalled port: one
        # outside the default range, which other test processes on this
        # machine take first, and outside Linux's ephemeral ports.
        self.flags(group="xen_ncm", port_min=27300, port_max=27399)

    def _watch_running_copies(self, server: dict, hypervisors: dict) -> list:
        """Watch, until the test ends, for the guest RUNNING on more than
        one host; what was seen (the test asserts it stays empty)."""
        both: list = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                running = [
                    host
                    for host, hv in hypervisors.items()
                    if any(
                        d.uuid == server["id"]
                        and d.state == base.DomainState.RUNNING
                        for d in hv.list_domains()
                    )
                ]
                if len(running) > 1:
                    both.append(running)
                stop.wait(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        self.addCleanup(watcher.join)
        self.addCleanup(stop.set)
        return both

    def _restart(self, host: str, hypervisors: dict, **journals) -> None:
        """Start nova-compute of ``host`` again after a crash: no
        graceful clean-up, the hypervisor outlived it. Both computes of
        this process share one [xen_ncm] state_path; on two machines
        each journal is the machine's own: ``journals`` gives the other
        side's journal of this machine (``outgoing``, ``incoming``) as
        an empty one."""
        manager = self.computes[host].manager
        old_driver = manager.driver
        self.useFixture(fixtures.MockPatchObject(old_driver, "cleanup_host"))
        # A dead process has no tasks in progress: an incoming live
        # migration Nova never ended would hold the old service's
        # graceful stop past the test's end.
        for instance_uuid in list(manager._pending_dest_live_migrations):
            manager._end_pending_dest_live_migration_task(instance_uuid)
        node.LOCAL_NODE_UUID = old_driver._get_node_uuid()
        empty = self.useFixture(fixtures.TempDir()).path
        patches = [
            fixtures.MockPatchObject(
                nova_driver.factory,
                "load_host_driver",
                lambda name, hostname, conf: hypervisors[hostname],
            )
        ]
        if journals.get("outgoing"):
            patches.append(
                fixtures.MockPatchObject(
                    nova_driver.Journal,
                    "from_conf",
                    lambda conf: Journal(empty),
                )
            )
        if journals.get("incoming"):
            patches.append(
                fixtures.MockPatchObject(
                    nova_driver.Journal,
                    "incoming_from_conf",
                    lambda conf: Journal(empty, INCOMING, IncomingEntry),
                )
            )
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            self.computes[host] = self.restart_compute_service(
                self.computes[host], keep_hypervisor_state=False
            )
        self.assertIsNot(old_driver, self.computes[host].manager.driver)

    def _hosts_running(self, server: dict) -> list[str]:
        return [
            host
            for host in HOSTS
            if any(
                info.uuid == server["id"]
                for info in self.sim_host(host).list_domains()
            )
        ]


class TestRecoveryReconcilesNova(RecoveryBase):
    def test_a_committed_guest_is_recorded_on_its_destination(self):
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        server = self._live_migrate(server, host=dest)
        self.assertEqual([dest], self._hosts_running(server))
        # What a source that crashed once the destination committed
        # leaves in Nova: the instance still on the source, migrating,
        # and the migration running.
        ctxt = nova_context.get_admin_context()
        instance = objects.Instance.get_by_uuid(ctxt, server["id"])
        instance.host = instance.node = source
        instance.compute_id = objects.ComputeNode.get_by_host_and_nodename(
            ctxt, source, source
        ).id
        instance.task_state = "migrating"
        instance.save()
        (migration,) = self.migrations(server)
        migration.status = "running"
        migration.save()
        # The source's share, held by the migration during the move.
        source_rp = self._get_provider_uuid_by_host(source)
        dest_rp = self._get_provider_uuid_by_host(dest)
        response = self.placement.put(
            f"/allocations/{migration.uuid}",
            {
                "allocations": {
                    source_rp: {
                        "resources": {"VCPU": 2, "MEMORY_MB": 32, "DISK_GB": 1}
                    }
                },
                "project_id": instance.project_id,
                "user_id": instance.user_id,
                "consumer_generation": None,
                "consumer_type": "MIGRATION",
            },
            version="1.38",
        )
        self.assertEqual(204, response.status, response.body)
        self.assertEqual(2, self._get_provider_usages(source_rp)["VCPU"])
        # Recovery on the restarted source proved the commit.
        outcome = recovery.Outcome(
            migration.uuid,
            self.domain_of({**server, "OS-EXT-SRV-ATTR:host": dest}).domid,
            Phase.COMMIT,
            Phase.DONE,
            "the destination answered: committed",
            uuid=server["id"],
        )
        nova_driver.reconcile(source, [outcome], {}, {migration.uuid: True})
        server = self.api.get_server(server["id"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:hypervisor_hostname"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertIsNone(server["OS-EXT-STS:task_state"])
        self.assertNotIn("fault", server)
        self.assertEqual(
            ["completed"], [m.status for m in self.migrations(server)]
        )
        # The source's share is released; the instance's is the
        # destination's.
        self.assertEqual(
            {}, self._get_allocations_by_server_uuid(migration.uuid)
        )
        self.assertEqual(0, self._get_provider_usages(source_rp)["VCPU"])
        self.assertEqual(
            [dest_rp],
            list(self._get_allocations_by_server_uuid(server["id"])),
        )
        # Nova now acts on the destination: a stop reaches the guest.
        server = self._stop_server(server)
        self.assertEqual([], self._hosts_running(server))

    def test_a_source_killed_after_commit_is_reconciled_at_restart(self):
        # The destination answers the restarted source's commit query
        # from its live receiver for this long (then from its journal).
        self.flags(group="xen_ncm", commit_query_timeout=120.0)
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        source_rp = self._get_provider_uuid_by_host(source)
        dest_rp = self._get_provider_uuid_by_host(dest)
        hypervisors = {host: self.sim_host(host) for host in HOSTS}
        old_driver = self.computes[source].manager.driver
        ctxt = nova_context.get_admin_context()

        # The source's engine dies once the destination committed (its
        # COMMITTED received), before it journals CLEANUP: as a killed
        # process, it does nothing more, and the kernel closes its
        # sockets and its journal lock.
        class Killed(BaseException):
            pass

        real_commit = commit.Coordinator.commit

        def commit_then_die(coordinator, on_retry=None):
            real_commit(coordinator, on_retry=on_retry)
            coordinator.data.close()
            raise Killed()

        self.useFixture(
            fixtures.MockPatchObject(
                commit.Coordinator, "commit", commit_then_die
            )
        )
        dead = threading.Event()
        ops = old_driver._livemigrationops
        real_live_migration = ops.live_migration

        def live_migration(*args, **kwargs):
            # nova-compute dies with its engine: neither of Nova's
            # callbacks runs, nothing is rolled back.
            try:
                real_live_migration(*args, **kwargs)
            except Killed:
                dead.set()

        self.useFixture(
            fixtures.MockPatchObject(ops, "live_migration", live_migration)
        )

        # Two running copies must never exist, whatever happens below.
        both = self._watch_running_copies(server, hypervisors)

        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        self.assertTrue(dead.wait(120), "the source's engine never died")
        # The guest runs on the destination; its paused copy is left on
        # the source, and Nova still has it there, migrating.
        self.assertTrue(
            wait_until(
                lambda: (
                    [d.state for d in hypervisors[dest].list_domains()]
                    == [base.DomainState.RUNNING]
                )
            )
        )
        self.assertEqual(
            [base.DomainState.PAUSED],
            [d.state for d in hypervisors[source].list_domains()],
        )
        instance = objects.Instance.get_by_uuid(ctxt, server["id"])
        self.assertEqual(source, instance.host)
        self.assertEqual("migrating", instance.task_state)
        (migration,) = self.migrations(server)
        self.assertEqual("running", migration.status)
        # While the journal entry is open the source refuses to start the
        # guest: a second copy would run beside the destination's.
        self.assertRaisesRegex(
            Exception,
            f"migration {migration.uuid} of this guest .* is still open",
            old_driver.power_on,
            ctxt,
            instance,
            [],
        )
        self.assertEqual(
            [base.DomainState.PAUSED],
            [d.state for d in hypervisors[source].list_domains()],
        )

        # nova-compute on the source starts again; the hypervisor and
        # its journals outlived it. The source machine's incoming journal
        # does not hold the destination's live entry for this guest.
        self._restart(source, hypervisors, incoming=True)

        # Recovery asked the destination, destroyed the paused copy and
        # told Nova where the guest runs.
        self.assertEqual([], hypervisors[source].list_domains())
        self.assertEqual(
            [base.DomainState.RUNNING],
            [d.state for d in hypervisors[dest].list_domains()],
        )
        server = self.api.get_server(server["id"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:hypervisor_hostname"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertEqual(power_state.RUNNING, server["OS-EXT-STS:power_state"])
        self.assertIsNone(server["OS-EXT-STS:task_state"])
        self.assertNotIn("fault", server)
        self.assertEqual(
            ["completed"], [m.status for m in self.migrations(server)]
        )
        # The migration's share on the source is released; the
        # instance's is the destination's.
        self.assertEqual(
            {}, self._get_allocations_by_server_uuid(migration.uuid)
        )
        self.assertEqual(0, self._get_provider_usages(source_rp)["VCPU"])
        self.assertEqual(
            [dest_rp],
            list(self._get_allocations_by_server_uuid(server["id"])),
        )
        # Nova now acts on the destination: a stop reaches the guest
        # there, a start boots it there only.
        server = self._stop_server(server)
        self.assertEqual([], self._hosts_running(server))
        server = self._start_server(server)
        self.assertEqual([dest], self._hosts_running(server))
        self.assertEqual([], both)


class TestLiveMigrationControl(LiveMigrationBase):
    """Force-complete and abort reach a migration held in precopy: the
    source's engine waits at its first harvest of the dirty log, before
    its policy decides anything, until the request reached the driver.
    A guest that dirties faster than precopy converges is not enough on
    a loaded machine: starved of CPU it dirties next to nothing, the
    rest fits the downtime target, and the engine commits before the
    request arrives (an abort is then refused, rightly)."""

    def setUp(self):
        super().setUp()
        self.flags(group="xen_ncm_sim", dirty_rate_bytes=512 << 20)
        self.flags(group="xen_ncm_sim", dirty_pattern="uniform")
        for name, value in {
            "precopy_policy": "downtime",
            "downtime_target": 0.01,
            "max_rounds": 10000,
            "throttle_min": 1.0,
            "completion_timeout_per_gib": 0,
        }.items():
            self.flags(group="xen_ncm", **{name: value})

    def hold_precopy(
        self,
        source: str,
        at: str = "harvest_dirty",
        released_by: tuple[str, ...] = ("abort", "force_complete"),
    ) -> tuple[threading.Event, list]:
        """Hold the next migration leaving ``source`` at its first call of
        the host's ``at`` (by default its first harvest of the dirty log)
        until one of the driver's ``released_by`` returned. The event is
        set once held; the list gets True if the hold ran out before a
        request came."""
        ops = self.computes[source].manager.driver._livemigrationops
        sim = self.sim_host(source)
        call_host = getattr(sim, at)
        held, release = threading.Event(), threading.Event()
        ran_out: list[bool] = []

        def gated(*args, **kwargs):
            if not release.is_set():
                held.set()
                # Under the receiver's io_timeout: a hold that runs out
                # lets the migration go on, and the test fails on it.
                if not release.wait(CONTROL_HOLD_TIMEOUT):
                    ran_out.append(True)
            return call_host(*args, **kwargs)

        def releasing(call):
            def control(instance):
                try:
                    return call(instance)
                finally:
                    release.set()

            return control

        self.useFixture(fixtures.MockPatchObject(sim, at, gated))
        for name in released_by:
            self.useFixture(
                fixtures.MockPatchObject(
                    ops, name, releasing(getattr(ops, name))
                )
            )
        # Before the hosts close (cleanups run last-in first-out): an
        # engine still held must not wait out the hold.
        self.addCleanup(release.set)
        return held, ran_out

    def start_migration(self) -> tuple[dict, str, str, int, object, list]:
        """A migration in precopy, held there (:meth:`hold_precopy`):
        the server, its source and destination, Nova's migration id,
        the source's OutgoingMigration and the hold's ran-out list."""
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        held, ran_out = self.hold_precopy(source)
        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        self._wait_for_migration_status(server, ["running"])
        self.assertTrue(
            held.wait(CONTROL_HOLD_TIMEOUT), "the migration did not start"
        )
        ops = self.computes[source].manager.driver._livemigrationops
        with ops._lock:
            outgoing = ops._outgoing[server["id"]]
        # Held after round 0, before the policy saw it: nothing decided.
        self.assertEqual(Phase.PRECOPY, outgoing.phase)
        self.assertIsNone(outgoing.sender.stop_decision)
        (migration,) = self.migrations(server)
        self.assertEqual("running", migration.status)
        return server, source, dest, migration.id, outgoing, ran_out

    def test_force_complete(self):
        server, source, dest, migration_id, outgoing, ran_out = (
            self.start_migration()
        )
        self.api.force_complete_migration(server["id"], migration_id)
        self._wait_for_migration_status(server, ["completed"])
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual([], ran_out)
        # Stopped because it was asked to, not because it converged.
        self.assertEqual(
            "force-complete", outgoing.sender.stop_decision.reason
        )
        self.assertEqual(Phase.DONE, outgoing.phase)
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )
        self.assertEqual([], self.sim_host(source).list_domains())

    def test_abort(self):
        server, source, dest, migration_id, outgoing, ran_out = (
            self.start_migration()
        )
        self.api.delete_migration(server["id"], migration_id)
        self._wait_for_migration_status(server, ["cancelled"])
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual([], ran_out)
        self.assertEqual(Phase.CANCELLED, outgoing.phase)
        self.assertIsNone(outgoing.sender.stop_decision)
        self.assertEqual(source, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(
            base.DomainState.RUNNING, self.domain_of(server).state
        )
        # The destination tears its copy down in the engine's thread.
        self.assertTrue(
            wait_until(lambda: self.sim_host(dest).list_domains() == []),
            self.sim_host(dest).list_domains(),
        )

    def test_abort_after_the_commit_decision_is_refused(self):
        # Held where the source destroys its copy, after COMMIT: as
        # libvirt's abortJob past the switch-over, the abort fails, the
        # migration completes, and the API user finds the abort's event
        # failed in the instance's actions.
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        held, ran_out = self.hold_precopy(
            source, at="destroy_domain", released_by=("abort",)
        )
        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        self._wait_for_migration_status(server, ["running"])
        (migration,) = self.migrations(server)
        self.api.force_complete_migration(server["id"], migration.id)
        self.assertTrue(
            held.wait(CONTROL_HOLD_TIMEOUT), "the migration did not commit"
        )
        ops = self.computes[source].manager.driver._livemigrationops
        with ops._lock:
            outgoing = ops._outgoing[server["id"]]
        # Past the point of no return: COMMIT was entered.
        self.assertEqual(Phase.CLEANUP, outgoing.phase)
        self.api.delete_migration(server["id"], migration.id)
        self._wait_for_migration_status(server, ["completed"])
        self._wait_for_instance_action_event(
            server,
            "live_migration_cancel",
            "compute_live_migration_abort",
            "Error",
        )
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual([], ran_out)
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([], self.sim_host(source).list_domains())


class TestDrain(LiveMigrationBase):
    """``nova-xen-ncm drain`` through openstacksdk on the in-process API:
    three servers leave host1 for host2, two migrations at a time, and
    the one whose first attempt fails at the destination is retried."""

    def setUp(self):
        super().setUp()
        for name, value in {
            "poll_interval": 0.05,
            "retry_delay": 0.1,
            "retry_max_delay": 0.2,
            "server_timeout": 120.0,
        }.items():
            self.flags(group="xen_ncm_drain", **{name: value})

    def sdk_connection(self) -> connection.Connection:
        """An admin Connection to the wsgi-intercepted API; the headers
        are what Nova's stubbed keystone middleware reads."""
        self.useFixture(
            fixtures.MonkeyPatch(
                "openstack.proxy.Proxy.get_endpoint", REAL_GET_ENDPOINT
            )
        )
        session = ks_session.Session(
            auth=noauth.NoAuth(endpoint=self.api_fixture.base_url),
            additional_headers={
                "X-Auth-User": "admin",
                "X-Auth-Project-Id": self.api_fixture.project_id,
                "X-Roles": "reader,member,admin",
            },
        )
        return connection.Connection(session=session)

    def test_drain_host(self):
        servers = [
            self._create_server(
                flavor_id=self.flavor_id, networks="none", host="host1"
            )
            for _ in range(3)
        ]
        self.assertEqual(
            ["host1"] * 3, [s["OS-EXT-SRV-ATTR:host"] for s in servers]
        )
        domids = {s["id"]: self.domain_of(s).domid for s in servers}
        # The destination cannot rebuild one guest's PV state, once.
        unlucky = servers[1]["id"]
        dest_host = self.sim_host("host2")
        real_import = dest_host.import_pv_state
        failed = []

        def import_pv_state(domid, state):
            if domid == domids[unlucky] and not failed:
                failed.append(domid)
                raise base.HostError("injected", call="import_pv_state")
            return real_import(domid, state)

        self.useFixture(
            fixtures.MockPatchObject(
                dest_host, "import_pv_state", side_effect=import_pv_state
            )
        )
        args = argparse.Namespace(
            host="host1",
            reason="firmware upgrade",
            concurrency=2,
            retries=1,
            dry_run=False,
            json=True,
            os_cloud=None,
        )
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = drain.run(args, conn=self.sdk_connection())

        self.assertEqual(0, status, out.getvalue() + err.getvalue())
        self.assertEqual([domids[unlucky]], failed)
        summary = json.loads(out.getvalue())
        self.assertEqual([], summary["left_on_host"])
        self.assertEqual("firmware upgrade", summary["service"]["reason"])
        by_id = {s["id"]: s for s in summary["servers"]}
        self.assertEqual(sorted(domids), sorted(by_id))
        for server_id, result in by_id.items():
            self.assertEqual("migrated", result["outcome"], result)
            self.assertEqual("host2", result["destination"])
            self.assertEqual(
                2 if server_id == unlucky else 1, result["attempts"]
            )
            self.assertGreater(result["seconds"], 0)
        # The progress on stderr came from GET /servers/{id}/migrations.
        self.assertIn(f"{unlucky} ", err.getvalue())
        self.assertIn("memory ", err.getvalue())
        self.assertIn("ended failed", err.getvalue())

        for server in servers:
            server = self.api.get_server(server["id"])
            self.assertEqual("ACTIVE", server["status"])
            self.assertEqual("host2", server["OS-EXT-SRV-ATTR:host"])
            info = self.domain_of(server)
            self.assertEqual(base.DomainState.RUNNING, info.state)
            self.assertEqual(domids[server["id"]], info.domid)
        self.assertEqual([], self.sim_host("host1").list_domains())
        (service,) = self.admin_api.get_services(
            host="host1", binary="nova-compute"
        )
        self.assertEqual("disabled", service["status"])
        self.assertEqual("firmware upgrade", service["disabled_reason"])
        statuses = sorted(m.status for m in self.migrations({"id": unlucky}))
        self.assertEqual(["completed", "failed"], statuses)


class TestRecoveryOfADestination(RecoveryBase):
    def test_a_destination_killed_after_commit_reports_its_guest(self):
        # The source gives up asking soon; the restarted ends answer
        # each other for longer.
        self.flags(group="xen_ncm", commit_query_timeout=3.0)
        server = self.boot()
        source = server["OS-EXT-SRV-ATTR:host"]
        dest = [h for h in HOSTS if h != source][0]
        source_rp = self._get_provider_uuid_by_host(source)
        dest_rp = self._get_provider_uuid_by_host(dest)
        hypervisors = {host: self.sim_host(host) for host in HOSTS}
        ctxt = nova_context.get_admin_context()

        # The destination's engine dies right after COMMIT unpaused the
        # guest there, before it answers: the kernel closes its sockets
        # and its journal lock (the receiver's own clean-up here).
        class Killed(BaseException):
            pass

        def commit_then_die(receiver):
            if receiver._running:
                receiver.host.unpause(receiver.domid)
            raise Killed()

        self.useFixture(
            fixtures.MockPatchObject(
                receiver_module.Receiver, "_commit", commit_then_die
            )
        )
        both = self._watch_running_copies(server, hypervisors)

        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": dest, "block_migration": "auto"}},
        )
        # No answer to the source's commit query: in doubt, its copy
        # stays paused, and Nova errors the instance on the source (the
        # migration's status first, then the instance's state).
        self._wait_for_migration_status(server, ["error"])
        self._wait_for_state_change(
            server, "ERROR", max_retries=240, wait_for_fault_key=False
        )
        self.assertEqual(
            [base.DomainState.RUNNING],
            [d.state for d in hypervisors[dest].list_domains()],
        )
        self.assertEqual(
            [base.DomainState.PAUSED],
            [d.state for d in hypervisors[source].list_domains()],
        )
        instance = objects.Instance.get_by_uuid(ctxt, server["id"])
        self.assertEqual((source, "error"), (instance.host, instance.vm_state))

        # The destination starts again: its guest runs there, and Nova's
        # view of that host now holds it.
        self.flags(group="xen_ncm", commit_query_timeout=120.0)
        self._restart(dest, hypervisors, outgoing=True)
        server = self.api.get_server(server["id"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertEqual(power_state.RUNNING, server["OS-EXT-STS:power_state"])
        # The record the source left in error (outcome unknown there) is
        # what happened: completed.
        (migration,) = self.migrations(server)
        self.assertEqual("completed", migration.status)
        self.assertEqual(
            {}, self._get_allocations_by_server_uuid(migration.uuid)
        )
        self.assertEqual(0, self._get_provider_usages(source_rp)["VCPU"])
        self.assertEqual(
            [dest_rp],
            list(self._get_allocations_by_server_uuid(server["id"])),
        )
        # The source's paused copy waits for its own recovery, which
        # asks the restarted destination and destroys it.
        self.assertEqual(
            [base.DomainState.PAUSED],
            [d.state for d in hypervisors[source].list_domains()],
        )
        self._restart(source, hypervisors, incoming=True)
        self.assertEqual([], hypervisors[source].list_domains())
        self.assertEqual([dest], self._hosts_running(server))
        server = self.api.get_server(server["id"])
        self.assertEqual(dest, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertEqual(
            ["completed"], [m.status for m in self.migrations(server)]
        )
        self.assertEqual([], both)
