"""``nova-xen-ncm drain HOST``: empty a compute host by live migration.

Through Nova's API (openstacksdk, configured as every OpenStack client
is: clouds.yaml, ``OS_*`` variables, ``--os-cloud``) drain disables the
host's nova-compute service so that nothing new lands there, then
live-migrates every server on it, ``[xen_ncm_drain] concurrency`` at a
time, the scheduler choosing each destination. It follows each migration
through ``GET /servers/{id}/migrations`` while it runs and the
migrations API once it ended, and tries a failed one again (the
project's retry helper, ``[xen_ncm_drain] retries``). It ends with a
table of what happened to each server; the exit status is 0 only when no
server is left on the host.

The plan (what is on the host and what would be done) is pure data, as
are the summary and the exit status; :class:`Drainer` is the loop that
talks to Nova.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import enum
import json
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent import futures
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import ConfigError
from nova_xen_ncm.cmd import EnvironmentProblem
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.errors import RetryExhausted

COMPUTE_BINARY = "nova-compute"
DEFAULT_REASON = "drained by nova-xen-ncm drain"
# Nova live-migrates only servers in these states.
LIVE_MIGRATABLE = ("ACTIVE", "PAUSED")
# Terminal statuses of a live migration in Nova's migrations API.
MIGRATION_COMPLETED = "completed"
MIGRATION_FAILED = ("error", "failed", "cancelled")


class Outcome(str, enum.Enum):
    """What became of one server."""

    MIGRATED = "migrated"  # runs on another host
    FAILED = "failed"  # every attempt failed; still on the host
    SKIPPED = "skipped"  # not in a state Nova live-migrates
    TIMEOUT = "timeout"  # still migrating when server_timeout ran out
    DELETED = "deleted"  # deleted while the drain ran


# -- the plan, the summary and the exit status (pure) -----------------------


@dataclasses.dataclass(frozen=True)
class PlannedServer:
    id: str
    name: str
    status: str

    @property
    def migratable(self) -> bool:
        return self.status in LIVE_MIGRATABLE

    @property
    def action(self) -> str:
        if self.migratable:
            return "live-migrate"
        return f"skip: {self.status} servers cannot be live-migrated"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The host's nova-compute service and servers, before anything
    changes."""

    host: str
    service_id: str
    service_status: str  # enabled / disabled
    service_state: str  # up / down
    current_reason: str | None
    reason: str
    servers: tuple[PlannedServer, ...]

    @property
    def disables_service(self) -> bool:
        # An already disabled service keeps its reason: someone set it.
        return self.service_status != "disabled"

    @property
    def to_migrate(self) -> tuple[PlannedServer, ...]:
        return tuple(s for s in self.servers if s.migratable)

    def describe(self) -> list[str]:
        if self.disables_service:
            service = (
                f"disable {COMPUTE_BINARY} on {self.host} "
                f"(reason: {self.reason})"
            )
        else:
            service = (
                f"{COMPUTE_BINARY} on {self.host} is disabled already "
                f"(reason: {self.current_reason or 'none'}); leave it"
            )
        lines = [service]
        if self.service_state != "up":
            lines.append(
                f"warning: {COMPUTE_BINARY} on {self.host} is "
                f"{self.service_state}; live migrations from it will fail"
            )
        if not self.servers:
            lines.append(f"no servers on {self.host}")
        for server in self.servers:
            lines.append(
                f"{server.id} {server.name or '-'} ({server.status}): "
                f"{server.action}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "service": {
                "id": self.service_id,
                "status": self.service_status,
                "state": self.service_state,
                "disabled_reason": self.current_reason,
                "disable": self.disables_service,
                "reason": self.reason,
            },
            "servers": [
                {
                    "id": s.id,
                    "name": s.name,
                    "status": s.status,
                    "action": "live-migrate" if s.migratable else "skip",
                }
                for s in self.servers
            ],
        }


@dataclasses.dataclass(frozen=True)
class ServerResult:
    id: str
    name: str
    outcome: Outcome
    destination: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome.value
        data["seconds"] = round(self.seconds, 3)
        return data


def skipped(server: PlannedServer) -> ServerResult:
    return ServerResult(
        server.id,
        server.name,
        Outcome.SKIPPED,
        error=f"status {server.status}: Nova live-migrates only "
        f"{' and '.join(LIVE_MIGRATABLE)} servers",
    )


def exit_status(left_on_host: Sequence[str]) -> int:
    """0 when the host is empty, 1 when servers are left on it."""
    return 1 if left_on_host else 0


def summary_table(results: Sequence[ServerResult]) -> str:
    header = ("SERVER", "NAME", "OUTCOME", "DESTINATION", "ATTEMPTS", "TIME")
    rows = [
        (
            r.id,
            r.name or "-",
            r.outcome.value,
            r.destination or "-",
            str(r.attempts),
            f"{r.seconds:.1f}s",
        )
        for r in results
    ]
    widths = [
        max(len(row[i]) for row in (header, *rows)) for i in range(len(header))
    ]
    return "\n".join(
        "  ".join(
            cell.ljust(w) for cell, w in zip(row, widths, strict=True)
        ).rstrip()
        for row in (header, *rows)
    )


def summary_lines(
    plan: Plan, results: Sequence[ServerResult], left_on_host: Sequence[str]
) -> list[str]:
    counts = collections.Counter(r.outcome for r in results)
    tally = ", ".join(
        f"{counts[outcome]} {outcome.value}"
        for outcome in Outcome
        if counts[outcome]
    )
    lines = [f"{plan.host}: {tally or 'nothing to migrate'}"]
    for result in results:
        if result.error:
            lines.append(f"{result.id}: {result.error}")
    if left_on_host:
        lines.append(
            f"{len(left_on_host)} server(s) left on {plan.host}: "
            f"{', '.join(left_on_host)}"
        )
    else:
        lines.append(f"{plan.host} is empty")
    return lines


def summary_dict(
    plan: Plan,
    results: Sequence[ServerResult],
    left_on_host: Sequence[str],
) -> dict[str, Any]:
    data = plan.to_dict()
    data["dry_run"] = False
    data["servers"] = [r.to_dict() for r in results]
    data["left_on_host"] = list(left_on_host)
    return data


# -- talking to Nova ---------------------------------------------------------


class AttemptFailed(Exception):
    """One live migration attempt failed; the server is still on the
    host and may be tried again."""


class AttemptTimedOut(Exception):
    """server_timeout ran out while a migration still ran."""


class ServerGone(Exception):
    """The server was deleted while the drain ran."""


class Stopped(Exception):
    """The drain was interrupted; workers stop following at once."""


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Nova's and keystone's errors as CommandErrors naming ``what``:
    a connection that is not configured, or whose credentials are
    refused, is a configuration problem (3); any other failure to reach
    or use the cloud an environment problem (4)."""
    from keystoneauth1 import exceptions as ksa_exc
    from openstack import exceptions as sdk_exc

    try:
        yield
    except (sdk_exc.ConfigException, ksa_exc.MissingRequiredOptions) as exc:
        raise ConfigError(
            f"cannot {what}: the cloud connection is not configured "
            f"(clouds.yaml, OS_* variables or --os-cloud): {exc}"
        ) from None
    except ksa_exc.Unauthorized as exc:
        # Credentials the cloud refuses are the configuration's fault
        # (clouds.yaml, OS_PASSWORD, --os-password), not the machine's.
        raise ConfigError(
            f"cannot {what}: authentication failed: {exc}"
        ) from None
    except ksa_exc.ConnectionError as exc:
        raise EnvironmentProblem(
            f"cannot {what}: cannot reach the cloud: {exc}"
        ) from None
    except ksa_exc.EndpointNotFound as exc:
        raise EnvironmentProblem(
            f"cannot {what}: no compute endpoint in the catalog: {exc}"
        ) from None
    except sdk_exc.HttpException as exc:
        if exc.status_code == 401:
            raise ConfigError(
                f"cannot {what}: authentication failed: {exc}"
            ) from None
        if exc.status_code == 403:
            raise EnvironmentProblem(
                f"cannot {what}: not allowed (draining a host needs Nova's "
                f"admin role): {exc}"
            ) from None
        raise EnvironmentProblem(f"cannot {what}: {exc}") from None
    except sdk_exc.SDKException as exc:
        raise EnvironmentProblem(f"cannot {what}: {exc}") from None


def find_service(conn: Any, host: str) -> Any:
    """The nova-compute service of ``host``; a clear error when the host
    is unknown or runs no compute service."""
    services = list(conn.compute.services())
    on_host = [s for s in services if s.host == host]
    compute = [s for s in on_host if s.binary == COMPUTE_BINARY]
    if compute:
        return compute[0]
    if on_host:
        binaries = ", ".join(sorted({s.binary for s in on_host}))
        raise CommandError(
            f"host {host!r} runs no {COMPUTE_BINARY} service (it runs "
            f"{binaries})"
        )
    hosts = sorted({s.host for s in services if s.binary == COMPUTE_BINARY})
    raise CommandError(
        f"unknown host {host!r}: no Nova service runs there (compute "
        f"hosts: {', '.join(hosts) or 'none'})"
    )


def servers_on(conn: Any, host: str) -> list[Any]:
    return list(
        conn.compute.servers(
            details=True, all_projects=True, compute_host=host
        )
    )


def make_plan(conn: Any, host: str, reason: str) -> Plan:
    if not reason.strip():
        raise CommandError("--reason must not be empty")
    with api_errors(f"look up {host}"):
        service = find_service(conn, host)
        servers = servers_on(conn, host)
    return Plan(
        host=host,
        service_id=str(service.id),
        service_status=str(service.status),
        service_state=str(service.state),
        current_reason=service.disabled_reason,
        reason=reason,
        servers=tuple(
            PlannedServer(str(s.id), s.name or "", str(s.status))
            for s in sorted(servers, key=lambda s: (s.name or "", s.id))
        ),
    )


@dataclasses.dataclass(frozen=True)
class DrainSettings:
    concurrency: int
    retries: int
    retry_delay: float
    retry_max_delay: float
    server_timeout: float
    poll_interval: float

    @classmethod
    def from_conf(
        cls, conf: cfg.ConfigOpts, args: argparse.Namespace | None = None
    ) -> DrainSettings:
        group = conf.xen_ncm_drain

        def given(name: str) -> Any:
            # The command line wins over the option.
            value = getattr(args, name, None)
            return getattr(group, name) if value is None else value

        return cls(
            concurrency=given("concurrency"),
            retries=given("retries"),
            retry_delay=group.retry_delay,
            retry_max_delay=group.retry_max_delay,
            server_timeout=group.server_timeout,
            poll_interval=group.poll_interval,
        )


class Drainer:
    """Runs a plan: disables the service, migrates the servers
    ``settings.concurrency`` at a time, retries failed attempts."""

    def __init__(
        self,
        conn: Any,
        plan: Plan,
        settings: DrainSettings,
        *,
        report: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.plan = plan
        self.settings = settings
        self.report = report
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def say(self, line: str) -> None:
        with self._lock:
            self.report(line)

    def disable_service(self) -> None:
        if not self.plan.disables_service:
            return
        with api_errors(f"disable {COMPUTE_BINARY} on {self.plan.host}"):
            self.conn.compute.disable_service(
                self.plan.service_id,
                host=self.plan.host,
                binary=COMPUTE_BINARY,
                disabled_reason=self.plan.reason,
            )
        self.say(
            f"disabled {COMPUTE_BINARY} on {self.plan.host}: "
            f"{self.plan.reason}"
        )

    def run(self) -> list[ServerResult]:
        """Disable the service and migrate; results in plan order."""
        self.disable_service()
        results: dict[str, ServerResult] = {
            s.id: skipped(s) for s in self.plan.servers if not s.migratable
        }
        to_migrate = self.plan.to_migrate
        if to_migrate:
            pool = futures.ThreadPoolExecutor(
                max_workers=self.settings.concurrency,
                thread_name_prefix="drain",
            )
            try:
                for result in pool.map(self.migrate, to_migrate):
                    results[result.id] = result
            except BaseException:
                # Ctrl-C: start nothing more and stop following; what
                # Nova runs already goes on.
                self._stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown()
        return [results[s.id] for s in self.plan.servers]

    def left_on_host(self) -> list[str]:
        with api_errors(f"list the servers on {self.plan.host}"):
            servers = servers_on(self.conn, self.plan.host)
        return sorted(str(s.id) for s in servers)

    # -- one server --

    def migrate(self, server: PlannedServer) -> ServerResult:
        start = self.clock()
        deadline = start + self.settings.server_timeout
        attempts = 0

        def started() -> int:
            nonlocal attempts
            attempts += 1
            return attempts

        def attempt() -> str:
            return self._attempt(server, started, deadline)

        def on_retry(event: retry.RetryEvent) -> None:
            self.say(
                f"{server.id} {server.name}: attempt {event.attempt} "
                f"failed ({event.error}); trying again in "
                f"{event.delay:.1f}s"
            )

        budget = retry.RetryBudget(
            attempts=self.settings.retries + 1,
            seconds=self.settings.server_timeout,
            initial_delay=self.settings.retry_delay,
            max_delay=max(
                self.settings.retry_delay, self.settings.retry_max_delay
            ),
        )

        def result(outcome: Outcome, **kwargs: Any) -> ServerResult:
            return ServerResult(
                server.id,
                server.name,
                outcome,
                attempts=attempts,
                seconds=self.clock() - start,
                **kwargs,
            )

        try:
            destination = retry.call(
                attempt,
                what=f"live migration of {server.id}",
                budget=budget,
                retry_on=(AttemptFailed,),
                on_retry=on_retry,
                clock=self.clock,
                sleep=self.sleep,
            )
        except RetryExhausted as exc:
            return result(Outcome.FAILED, error=str(exc.__cause__ or exc))
        except AttemptTimedOut as exc:
            return result(Outcome.TIMEOUT, error=str(exc))
        except ServerGone:
            return result(Outcome.DELETED)
        except CommandError as exc:
            return result(Outcome.FAILED, error=str(exc))
        self.say(f"{server.id} {server.name}: migrated to {destination}")
        return result(Outcome.MIGRATED, destination=destination)

    def _attempt(
        self,
        server: PlannedServer,
        started: Callable[[], int],
        deadline: float,
    ) -> str:
        """One live migration; the destination host, or AttemptFailed
        with the server back in a state to try again. ``started`` counts
        the live migrations asked of Nova."""
        from openstack import exceptions as sdk_exc

        current = self._settled(server, deadline)
        if current.compute_host != self.plan.host:
            # Moved off the host already (by someone else, or by an
            # attempt whose end we did not see).
            return str(current.compute_host)
        if current.status not in LIVE_MIGRATABLE:
            raise CommandError(
                f"status {current.status}: Nova live-migrates only "
                f"{' and '.join(LIVE_MIGRATABLE)} servers"
            )
        with api_errors(f"list the migrations of {server.id}"):
            known = self._migration_ids(server.id)
        attempt = started()
        self.say(f"{server.id} {server.name}: attempt {attempt}: starting")
        with api_errors(f"live-migrate {server.id}"):
            try:
                self.conn.compute.live_migrate_server(
                    server.id, host=None, block_migration="auto"
                )
            except sdk_exc.NotFoundException:
                raise ServerGone(server.id) from None
            except sdk_exc.HttpException as exc:
                # No valid host, a task in the way, a hiccup of the API:
                # the server stays where it is and may be tried again.
                # Auth and policy errors are not going to change.
                if exc.status_code in (401, 403):
                    raise
                raise AttemptFailed(
                    f"Nova refused the live migration: {exc}"
                ) from None
        status, migration_id = self._follow(server, known, deadline)
        current = self._settled(server, deadline)
        if status == MIGRATION_COMPLETED:
            if current.compute_host == self.plan.host:
                raise AttemptFailed(
                    f"migration {migration_id} completed but the server "
                    f"is still on {self.plan.host}"
                )
            return str(current.compute_host)
        raise AttemptFailed(f"migration {migration_id} ended {status}")

    def _migration_ids(self, server_id: str) -> set[str]:
        return {
            str(m.id)
            for m in self.conn.compute.migrations(
                server_id=server_id, migration_type="live-migration"
            )
        }

    def _follow(
        self, server: PlannedServer, known: set[str], deadline: float
    ) -> tuple[str, str]:
        """Poll until the migration this attempt started ended: its
        (status, id)."""
        last = None
        while True:
            with api_errors(f"follow the migration of {server.id}"):
                running = [
                    m
                    for m in self.conn.compute.server_migrations(server.id)
                    if str(m.id) not in known
                ]
                for migration in running:
                    shown = (
                        migration.status,
                        _progress(migration),
                    )
                    if shown != last:
                        last = shown
                        self.say(
                            f"{server.id} {server.name}: migration "
                            f"{migration.id} to "
                            f"{migration.dest_compute or '?'} "
                            f"{migration.status}{shown[1]}"
                        )
                if not running:
                    # GET /servers/{id}/migrations lists only running
                    # ones: the end is in the migrations API.
                    ended = [
                        m
                        for m in self.conn.compute.migrations(
                            server_id=server.id,
                            migration_type="live-migration",
                        )
                        if str(m.id) not in known
                        and (
                            m.status == MIGRATION_COMPLETED
                            or m.status in MIGRATION_FAILED
                        )
                    ]
                    if ended:
                        newest = max(ended, key=lambda m: int(m.id))
                        return str(newest.status), str(newest.id)
            self._wait(deadline, "still migrating")

    def _settled(self, server: PlannedServer, deadline: float) -> Any:
        """The server once Nova has no task running on it (a rollback or
        post-migration step still finishing)."""
        from openstack import exceptions as sdk_exc

        while True:
            with api_errors(f"look up server {server.id}"):
                try:
                    current = self.conn.compute.get_server(server.id)
                except sdk_exc.NotFoundException:
                    raise ServerGone(server.id) from None
            if current.task_state is None:
                return current
            self._wait(deadline, f"task {current.task_state} still running")

    def _wait(self, deadline: float, what: str) -> None:
        """One poll interval, unless the server's time is up or the
        drain was stopped."""
        if self._stop.is_set():
            raise Stopped()
        if self.clock() >= deadline:
            raise AttemptTimedOut(
                f"{what} after {self.settings.server_timeout:g}s"
            )
        self.sleep(self.settings.poll_interval)


def _progress(migration: Any) -> str:
    total = migration.memory_total_bytes
    processed = migration.memory_processed_bytes
    if not total or processed is None:
        return ""
    return (
        f", memory {processed / (1 << 20):.1f} of {total / (1 << 20):.1f} MiB"
    )


# -- the command -------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "drain",
        help="Live-migrate every server off a compute host.",
        description=(
            "Disable HOST's nova-compute service, live-migrate every "
            "server on it (the scheduler picks each destination), retry "
            "failed migrations and print what happened to each server. "
            "Exits 0 only when no server is left on HOST. The cloud is "
            "configured as for every OpenStack client (clouds.yaml, OS_* "
            "variables, --os-cloud); draining needs Nova's admin role."
        ),
    )
    parser.add_argument("host", help="the compute host to empty")
    parser.add_argument(
        "--reason",
        default=DEFAULT_REASON,
        help="disabled reason of the compute service (default: %(default)r)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="live migrations at a time (default: [xen_ncm_drain] "
        "concurrency)",
    )
    parser.add_argument(
        "--retries",
        type=_not_negative,
        default=None,
        metavar="N",
        help="times a failed migration is tried again (default: "
        "[xen_ncm_drain] retries)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would be done and change nothing",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the plan or the summary as JSON (progress goes to stderr)",
    )
    parser.add_argument(
        "--os-cloud",
        default=None,
        metavar="NAME",
        help="cloud in clouds.yaml (default: env OS_CLOUD, else the OS_* "
        "variables)",
    )
    parser.set_defaults(func=run)


def connect(args: argparse.Namespace) -> Any:
    """An openstacksdk Connection configured as every OpenStack client."""
    import openstack

    with api_errors("connect to the cloud"):
        return openstack.connect(
            cloud=args.os_cloud, app_name="nova-xen-ncm-drain"
        )


@dataclasses.dataclass(frozen=True)
class Drained:
    """What a drain did: the plan, each server's result (in plan order)
    and the servers left on the host; for a dry run, no results and the
    servers that would stay."""

    plan: Plan
    results: tuple[ServerResult, ...]
    left_on_host: tuple[str, ...]
    dry_run: bool = False

    @property
    def exit_status(self) -> int:
        return exit_status(self.left_on_host)

    def to_dict(self) -> dict[str, Any]:
        if self.dry_run:
            data = self.plan.to_dict()
            data["dry_run"] = True
            return data
        return summary_dict(self.plan, self.results, self.left_on_host)


def execute(
    conn: Any,
    host: str,
    reason: str,
    settings: DrainSettings,
    *,
    dry_run: bool = False,
    report: Callable[[str], None] = lambda line: None,
    report_plan: bool = True,
) -> Drained:
    """Plan the drain of ``host`` and, unless ``dry_run``, run it;
    progress goes to ``report`` a line at a time, starting with the
    plan's lines when ``report_plan``."""
    plan = make_plan(conn, host, reason)
    if dry_run:
        return Drained(
            plan,
            (),
            tuple(s.id for s in plan.servers if not s.migratable),
            dry_run=True,
        )
    if report_plan:
        for line in plan.describe():
            report(line)
    drainer = Drainer(conn, plan, settings, report=report)
    results = drainer.run()
    return Drained(plan, tuple(results), tuple(drainer.left_on_host()))


def run(args: argparse.Namespace, conn: Any = None) -> int:
    from nova_xen_ncm.conf import CONF

    settings = DrainSettings.from_conf(CONF, args)
    conn = conn if conn is not None else connect(args)
    out = sys.stdout

    def report(line: str) -> None:
        # Progress on stderr under --json, so stdout stays one document.
        stream = sys.stderr if args.json else out
        print(f"{time.strftime('%H:%M:%S')} {line}", file=stream, flush=True)

    drained = execute(
        conn,
        args.host,
        args.reason,
        settings,
        dry_run=args.dry_run,
        report=report,
        # The plan is part of the JSON document, not of the progress.
        report_plan=not args.json,
    )
    if args.json:
        print(json.dumps(drained.to_dict(), indent=2), file=out)
    elif drained.dry_run:
        print("dry run, nothing changes:", file=out)
        for line in drained.plan.describe():
            print(f"  {line}", file=out)
    else:
        print(file=out)
        print(summary_table(drained.results), file=out)
        print(file=out)
        for line in summary_lines(
            drained.plan, drained.results, drained.left_on_host
        ):
            print(line, file=out)
    return drained.exit_status
