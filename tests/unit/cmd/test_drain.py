"""``nova-xen-ncm drain``: the plan, the loop, the summary and the exit
status, against an in-memory compute API that behaves as Nova's does for
what drain uses (services, servers by host, live migration, the server
migrations and migrations APIs)."""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import threading
import time
import types

import pytest
from keystoneauth1 import exceptions as ksa_exc
from openstack import exceptions as sdk_exc
from oslo_config import cfg

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import drain
from nova_xen_ncm.cmd import main
from nova_xen_ncm.conf import drain as drain_conf


class FakeCompute:
    """Nova's compute API as drain sees it. A live migration is queued,
    runs (with memory progress) at the next look, and ends at the one
    after: failed while ``failures`` has attempts left for its server,
    else completed with the server on ``dest``."""

    def __init__(
        self,
        servers,
        *,
        failures=None,
        stuck=(),
        dest="host2",
        service_status="enabled",
    ):
        self.service_list = [
            types.SimpleNamespace(
                id="svc-1",
                host="host1",
                binary="nova-compute",
                status=service_status,
                state="up",
                disabled_reason="old"
                if service_status == "disabled"
                else None,
            ),
            types.SimpleNamespace(
                id="svc-2",
                host="host2",
                binary="nova-compute",
                status="enabled",
                state="up",
                disabled_reason=None,
            ),
            types.SimpleNamespace(
                id="svc-3",
                host="controller",
                binary="nova-conductor",
                status="enabled",
                state="up",
                disabled_reason=None,
            ),
        ]
        self.server_map = {
            sid: types.SimpleNamespace(
                id=sid,
                name=f"vm-{sid}",
                status=status,
                task_state=None,
                compute_host="host1",
            )
            for sid, status in servers
        }
        self.failures = dict(failures or {})
        self.stuck = set(stuck)
        self.dest = dest
        self.migration_list = []
        self.disabled = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- services --

    def services(self):
        return list(self.service_list)

    def disable_service(self, service, host, binary, disabled_reason):
        self.disabled.append((service, host, binary, disabled_reason))
        for svc in self.service_list:
            if svc.id == service:
                svc.status = "disabled"
                svc.disabled_reason = disabled_reason

    # -- servers --

    def servers(self, details, all_projects, compute_host):
        assert details and all_projects
        return [
            s
            for s in self.server_map.values()
            if s.compute_host == compute_host
        ]

    def get_server(self, server_id):
        try:
            return self.server_map[server_id]
        except KeyError:
            raise sdk_exc.NotFoundException(f"server {server_id}") from None

    def live_migrate_server(self, server_id, host, block_migration):
        assert host is None and block_migration == "auto"
        with self._lock:
            server = self.get_server(server_id)
            server.task_state = "migrating"
            self.migration_list.append(
                types.SimpleNamespace(
                    id=next(self._ids),
                    server_id=server_id,
                    status="queued",
                    looks=0,
                    dest_compute=self.dest,
                    memory_total_bytes=32 << 20,
                    memory_processed_bytes=None,
                )
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    # -- migrations --

    def server_migrations(self, server_id):
        with self._lock:
            running = []
            for m in self.migration_list:
                if m.server_id != server_id or m.status in (
                    "completed",
                    "failed",
                ):
                    continue
                m.looks += 1
                if m.looks == 1 or m.server_id in self.stuck:
                    m.status = "running"
                    m.memory_processed_bytes = 16 << 20
                    running.append(m)
                else:
                    self._end(m)
            return running

    def _end(self, migration):
        server = self.server_map[migration.server_id]
        server.task_state = None
        self.in_flight -= 1
        if self.failures.get(server.id, 0) > 0:
            self.failures[server.id] -= 1
            migration.status = "failed"
        else:
            migration.status = "completed"
            server.compute_host = self.dest

    def migrations(self, server_id, migration_type):
        assert migration_type == "live-migration"
        with self._lock:
            return [m for m in self.migration_list if m.server_id == server_id]


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            return self.now

    def sleep(self, seconds):
        with self._lock:
            self.now += max(seconds, 0.001)


def settings(**overrides):
    values = dict(
        concurrency=1,
        retries=1,
        retry_delay=1.0,
        retry_max_delay=2.0,
        server_timeout=600.0,
        poll_interval=1.0,
    )
    values.update(overrides)
    return drain.DrainSettings(**values)


def conn_of(compute):
    return types.SimpleNamespace(compute=compute)


def drainer(compute, plan, **overrides):
    clock = FakeClock()
    lines = []
    return (
        drain.Drainer(
            conn_of(compute),
            plan,
            settings(**overrides),
            report=lines.append,
            clock=clock,
            sleep=clock.sleep,
        ),
        lines,
    )


def args(**overrides):
    values = dict(
        host="host1",
        reason="maintenance",
        concurrency=1,
        retries=1,
        dry_run=False,
        json=False,
        os_cloud=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def fast_conf(monkeypatch):
    """[xen_ncm_drain] with no waiting, on the CONF run() reads."""
    conf = cfg.ConfigOpts()
    drain_conf.register_opts(conf)
    conf([])
    conf.set_override("poll_interval", 0.01, "xen_ncm_drain")
    conf.set_override("retry_delay", 0.0, "xen_ncm_drain")
    monkeypatch.setattr("nova_xen_ncm.conf.CONF", conf)
    return conf


# -- the plan ----------------------------------------------------------------


def test_plan_migrates_active_and_paused_and_skips_the_rest():
    compute = FakeCompute([("a", "ACTIVE"), ("b", "SHUTOFF"), ("c", "PAUSED")])
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    assert [s.id for s in plan.to_migrate] == ["a", "c"]
    assert plan.disables_service
    lines = plan.describe()
    assert lines[0] == "disable nova-compute on host1 (reason: maintenance)"
    assert "b vm-b (SHUTOFF): skip: SHUTOFF servers cannot be " in lines[2]
    data = plan.to_dict()
    assert [s["action"] for s in data["servers"]] == [
        "live-migrate",
        "skip",
        "live-migrate",
    ]
    assert data["service"]["id"] == "svc-1"
    # Planning changes nothing.
    assert compute.disabled == [] and compute.migration_list == []


def test_plan_keeps_the_reason_of_a_service_disabled_already():
    compute = FakeCompute([("a", "ACTIVE")], service_status="disabled")
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    assert not plan.disables_service
    assert "disabled already (reason: old)" in plan.describe()[0]
    d, _ = drainer(compute, plan)
    d.run()
    assert compute.disabled == []


def test_unknown_host_names_the_compute_hosts():
    compute = FakeCompute([])
    with pytest.raises(CommandError) as exc:
        drain.make_plan(conn_of(compute), "hots1", "maintenance")
    assert str(exc.value) == (
        "unknown host 'hots1': no Nova service runs there (compute hosts: "
        "host1, host2)"
    )


def test_host_without_a_compute_service():
    compute = FakeCompute([])
    with pytest.raises(CommandError) as exc:
        drain.make_plan(conn_of(compute), "controller", "maintenance")
    assert "runs no nova-compute service (it runs nova-conductor)" in str(
        exc.value
    )


def test_empty_reason_is_refused():
    with pytest.raises(CommandError, match="--reason must not be empty"):
        drain.make_plan(conn_of(FakeCompute([])), "host1", " ")


@pytest.mark.parametrize(
    ("error", "message", "status"),
    [
        (
            sdk_exc.HttpException("no token", http_status=401),
            "cannot look up host1: authentication failed",
            3,
        ),
        (
            # keystoneauth's answer to a wrong password.
            ksa_exc.Unauthorized("The request you have made requires "),
            "cannot look up host1: authentication failed",
            3,
        ),
        (
            sdk_exc.ForbiddenException("policy", http_status=403),
            "not allowed (draining a host needs Nova's admin role)",
            4,
        ),
        (
            sdk_exc.ConfigException("Cloud prod was not found."),
            "the cloud connection is not configured",
            3,
        ),
        (
            ksa_exc.ConnectFailure("refused"),
            "cannot reach the cloud",
            4,
        ),
    ],
)
def test_api_errors_name_what_was_wrong(error, message, status):
    compute = FakeCompute([])

    def services():
        raise error

    compute.services = services
    with pytest.raises(CommandError) as exc:
        drain.make_plan(conn_of(compute), "host1", "maintenance")
    assert message in str(exc.value)
    assert exc.value.exit_status == status


# -- the loop ----------------------------------------------------------------


def test_drain_disables_migrates_and_retries_a_failure():
    compute = FakeCompute(
        [("a", "ACTIVE"), ("b", "ACTIVE"), ("c", "PAUSED")],
        failures={"b": 1},
    )
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, lines = drainer(compute, plan, concurrency=2)
    results = d.run()

    assert compute.disabled == [
        ("svc-1", "host1", "nova-compute", "maintenance")
    ]
    assert [(r.id, r.outcome, r.destination, r.attempts) for r in results] == [
        ("a", drain.Outcome.MIGRATED, "host2", 1),
        ("b", drain.Outcome.MIGRATED, "host2", 2),
        ("c", drain.Outcome.MIGRATED, "host2", 1),
    ]
    assert all(r.seconds > 0 for r in results)
    assert compute.max_in_flight <= 2
    assert d.left_on_host() == []
    assert drain.exit_status(d.left_on_host()) == 0
    text = "\n".join(lines)
    assert "b vm-b: attempt 1 failed (migration 2 ended failed)" in text
    assert "memory 16.0 of 32.0 MiB" in text


def test_a_server_that_keeps_failing_is_left_and_the_exit_status_says_so():
    compute = FakeCompute(
        [("a", "ACTIVE"), ("b", "ACTIVE")], failures={"b": 5}
    )
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, _ = drainer(compute, plan, retries=2)
    results = d.run()
    left = d.left_on_host()

    failed = results[1]
    assert failed.outcome == drain.Outcome.FAILED
    assert failed.attempts == 3
    assert failed.destination is None
    assert "ended failed" in failed.error
    assert left == ["b"]
    assert drain.exit_status(left) == 1
    lines = drain.summary_lines(plan, results, left)
    assert lines[0] == "host1: 1 migrated, 1 failed"
    assert lines[-1] == "1 server(s) left on host1: b"


def test_concurrency_bounds_the_migrations_in_flight():
    compute = FakeCompute([(str(i), "ACTIVE") for i in range(6)])
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, _ = drainer(compute, plan, concurrency=1)
    d.run()
    assert compute.max_in_flight == 1
    assert len(compute.migration_list) == 6


def test_a_migration_still_running_at_the_timeout_is_reported():
    compute = FakeCompute([("a", "ACTIVE")], stuck={"a"})
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, _ = drainer(compute, plan, server_timeout=30.0, poll_interval=5.0)
    (result,) = d.run()
    assert result.outcome == drain.Outcome.TIMEOUT
    assert result.attempts == 1
    assert result.error == "still migrating after 30s"
    assert d.left_on_host() == ["a"]


def test_a_refusal_by_nova_is_retried_a_forbidden_one_is_not():
    compute = FakeCompute([("a", "ACTIVE"), ("b", "ACTIVE")])
    real = compute.live_migrate_server
    refusals = {
        "a": [sdk_exc.ConflictException("task state", http_status=409)]
    }

    def live_migrate_server(server_id, host, block_migration):
        if server_id == "b":
            raise sdk_exc.ForbiddenException("policy", http_status=403)
        if refusals[server_id]:
            raise refusals[server_id].pop()
        return real(server_id, host, block_migration)

    compute.live_migrate_server = live_migrate_server
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, _ = drainer(compute, plan, retries=1)
    a, b = d.run()
    assert (a.outcome, a.attempts) == (drain.Outcome.MIGRATED, 2)
    assert (b.outcome, b.attempts) == (drain.Outcome.FAILED, 1)
    assert "admin role" in b.error


def test_a_server_deleted_meanwhile_is_not_left_on_the_host():
    compute = FakeCompute([("a", "ACTIVE"), ("b", "ACTIVE")])
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    del compute.server_map["a"]
    d, _ = drainer(compute, plan)
    a, b = d.run()
    assert a.outcome == drain.Outcome.DELETED
    assert b.outcome == drain.Outcome.MIGRATED
    assert drain.exit_status(d.left_on_host()) == 0


def test_skipped_servers_stay_and_fail_the_drain():
    compute = FakeCompute([("a", "ACTIVE"), ("b", "SHUTOFF")])
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    d, _ = drainer(compute, plan)
    a, b = d.run()
    assert a.outcome == drain.Outcome.MIGRATED
    assert (b.outcome, b.attempts) == (drain.Outcome.SKIPPED, 0)
    assert [m.server_id for m in compute.migration_list] == ["a"]
    assert drain.exit_status(d.left_on_host()) == 1


# -- the summary and the command ---------------------------------------------


def test_summary_table_aligns_its_columns():
    results = [
        drain.ServerResult(
            "a", "web", drain.Outcome.MIGRATED, "host2", 1, 3.21
        ),
        drain.ServerResult("bb", "", drain.Outcome.FAILED, None, 3, 40.0),
    ]
    assert drain.summary_table(results).splitlines() == [
        "SERVER  NAME  OUTCOME   DESTINATION  ATTEMPTS  TIME",
        "a       web   migrated  host2        1         3.2s",
        "bb      -     failed    -            3         40.0s",
    ]


def test_run_prints_the_table_and_returns_the_exit_status(fast_conf, capsys):
    compute = FakeCompute(
        [("a", "ACTIVE"), ("b", "ACTIVE")], failures={"b": 9}
    )
    status = drain.run(args(retries=0), conn=conn_of(compute))
    out = capsys.readouterr().out
    assert status == 1
    assert "a       vm-a  migrated  host2        1" in out
    assert "b       vm-b  failed    -            1" in out
    assert "1 server(s) left on host1: b" in out


def test_run_json_is_one_document_on_stdout(fast_conf, capsys):
    compute = FakeCompute([("a", "ACTIVE")])
    status = drain.run(args(json=True), conn=conn_of(compute))
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert status == 0
    assert data["dry_run"] is False
    assert data["left_on_host"] == []
    assert data["service"]["reason"] == "maintenance"
    (server,) = data["servers"]
    assert server["outcome"] == "migrated"
    assert server["destination"] == "host2"
    assert "attempt 1: starting" in captured.err


def test_dry_run_changes_nothing(fast_conf, capsys):
    compute = FakeCompute([("a", "ACTIVE"), ("b", "SHUTOFF")])
    status = drain.run(args(dry_run=True), conn=conn_of(compute))
    out = capsys.readouterr().out
    assert compute.disabled == [] and compute.migration_list == []
    assert out.startswith("dry run, nothing changes:\n")
    assert "a vm-a (ACTIVE): live-migrate" in out
    # A server the drain would leave behind shows in the status.
    assert status == 1

    compute = FakeCompute([("a", "ACTIVE")])
    status = drain.run(args(dry_run=True, json=True), conn=conn_of(compute))
    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert data["dry_run"] is True
    assert data["servers"][0]["action"] == "live-migrate"


def test_command_line_overrides_the_options():
    conf = cfg.ConfigOpts()
    drain_conf.register_opts(conf)
    conf([])
    conf.set_override("concurrency", 4, "xen_ncm_drain")
    parsed = main.build_parser().parse_args(["drain", "host1"])
    assert parsed.reason == drain.DEFAULT_REASON
    assert drain.DrainSettings.from_conf(conf, parsed).concurrency == 4
    assert drain.DrainSettings.from_conf(conf, parsed).retries == 2
    parsed = main.build_parser().parse_args(
        ["drain", "host1", "--concurrency", "3", "--retries", "0"]
    )
    settings_ = drain.DrainSettings.from_conf(conf, parsed)
    assert (settings_.concurrency, settings_.retries) == (3, 0)


def test_bad_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["drain", "h", "--concurrency", "0"])
    assert "--concurrency: must be at least 1" in capsys.readouterr().err


def test_missing_cloud_configuration_is_one_clear_line(
    monkeypatch, capsys, tmp_path
):
    for name in list(__import__("os").environ):
        if name.startswith("OS_"):
            monkeypatch.delenv(name)
    # openstacksdk reads the first clouds.yaml it finds, the machine's
    # /etc/openstack/clouds.yaml too: one with no cloud goes first.
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds: {}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    monkeypatch.setenv("HOME", "/nonexistent")
    status = main.main(["drain", "host1"])
    err = capsys.readouterr().err
    assert status == 3
    assert err.startswith(
        "nova-xen-ncm drain: error: cannot connect to the cloud: the cloud "
        "connection is not configured"
    )


def test_an_interrupt_stops_following_at_once():
    compute = FakeCompute([("a", "ACTIVE"), ("b", "ACTIVE")], stuck={"a"})
    plan = drain.make_plan(conn_of(compute), "host1", "maintenance")
    clock = FakeClock()

    def report(line):
        # Ctrl-C (SIGINT to the main thread, waiting for the results)
        # while the stuck migration is followed.
        if line.startswith("b vm-b: attempt 1"):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def sleep(seconds):
        clock.sleep(seconds)
        time.sleep(0.001)

    d = drain.Drainer(
        conn_of(compute),
        plan,
        settings(concurrency=2, server_timeout=1e4),
        report=report,
        clock=clock,
        sleep=sleep,
    )
    with pytest.raises(KeyboardInterrupt):
        d.run()
    # Without the stop, following "a" would go on for 10000 looks, until
    # server_timeout.
    (stuck,) = [m for m in compute.migration_list if m.server_id == "a"]
    assert stuck.looks < 5000
