"""``openstack xen-ncm host drain``: ``nova-xen-ncm drain`` as an
OpenStackClient command (:mod:`nova_xen_ncm.cmd.drain` does the work)."""

from __future__ import annotations

import argparse
from typing import Any

from osc_lib.command import command

from nova_xen_ncm.cmd import drain
from nova_xen_ncm.cmd.osc import base

RESULT_COLUMNS = (
    "Server",
    "Name",
    "Outcome",
    "Destination",
    "Attempts",
    "Seconds",
    "Error",
)
PLAN_COLUMNS = ("Server", "Name", "Status", "Action")


def connect(app: Any) -> Any:
    """An openstacksdk connection from OpenStackClient's ``--os-*``
    options, clouds.yaml and ``OS_*`` variables. Made here rather than by
    OpenStackClient before the command runs, so that a cloud that is not
    configured ends the command with the configuration status (3) and
    one that cannot be reached with the environment status (4)."""
    import openstack

    from nova_xen_ncm.cmd import main

    with drain.api_errors("connect to the cloud"):
        region = app.cloud_config.get_one(
            cloud=app.options.cloud,
            argparse=app.options,
            validate=True,
            app_name="nova-xen-ncm",
            app_version=main.version(),
        )
        return openstack.connection.Connection(config=region)


def result_rows(drained: drain.Drained) -> list[tuple[Any, ...]]:
    return [
        (
            r.id,
            r.name,
            r.outcome.value,
            r.destination,
            r.attempts,
            round(r.seconds, 1),
            r.error,
        )
        for r in drained.results
    ]


def plan_rows(plan: drain.Plan) -> list[tuple[Any, ...]]:
    return [(s.id, s.name, s.status, s.action) for s in plan.servers]


class DrainHost(base.XenNcmCommand, command.Lister):
    """Live-migrate every server off a compute host.

    Disables the host's nova-compute service, live-migrates every server
    on it (the scheduler picks each destination), retries failed
    migrations and lists what happened to each server; progress goes to
    stderr. Exits 0 only when no server is left on the host; draining
    needs Nova's admin role.
    """

    # The connection is made by connect(), which says which kind of
    # problem stopped it.
    auth_required = False
    columns = RESULT_COLUMNS

    def columns_of(self, parsed_args: argparse.Namespace) -> tuple[str, ...]:
        return PLAN_COLUMNS if parsed_args.dry_run else RESULT_COLUMNS

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "host", metavar="<host>", help="Compute host to empty"
        )
        parser.add_argument(
            "--reason",
            metavar="<reason>",
            default=drain.DEFAULT_REASON,
            help="Disabled reason of the compute service "
            f"(default: {drain.DEFAULT_REASON!r})",
        )
        parser.add_argument(
            "--concurrency",
            metavar="<count>",
            type=drain._positive,
            default=None,
            help="Live migrations at a time (default: [xen_ncm_drain] "
            "concurrency)",
        )
        parser.add_argument(
            "--retries",
            metavar="<count>",
            type=drain._not_negative,
            default=None,
            help="Times a failed migration is tried again (default: "
            "[xen_ncm_drain] retries)",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List the servers and what would be done to each; change "
            "nothing",
        )
        return parser

    def take_action(
        self, parsed_args: argparse.Namespace
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        from nova_xen_ncm.conf import CONF

        settings = drain.DrainSettings.from_conf(CONF, parsed_args)
        conn = connect(self.app)
        drained = drain.execute(
            conn,
            parsed_args.host,
            parsed_args.reason,
            settings,
            dry_run=parsed_args.dry_run,
            report=self.say,
        )
        self.exit_status = drained.exit_status
        if drained.dry_run:
            self.say("dry run, nothing changes:")
            for line in drained.plan.describe():
                self.say(f"  {line}")
            return PLAN_COLUMNS, plan_rows(drained.plan)
        for line in drain.summary_lines(
            drained.plan, drained.results, drained.left_on_host
        ):
            self.say(line)
        return RESULT_COLUMNS, result_rows(drained)
