"""``openstack xen-ncm migration ...``: the migrations of this host's
journals (list, show, recover, resolve) and of the message bus (watch),
as OpenStackClient commands. The work is done by
:mod:`nova_xen_ncm.cmd.recover` and :mod:`nova_xen_ncm.cmd.watch`, as
for ``nova-xen-ncm recover`` and ``nova-xen-ncm watch``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from osc_lib.command import command

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.cmd import recover
from nova_xen_ncm.cmd import watch
from nova_xen_ncm.cmd.osc import base
from nova_xen_ncm.progress.terminal import Display

# Lists in Title Case with an "ID" column, show commands with snake_case
# fields and an "id" field, as OpenStackClient's own commands.
JOURNAL_COLUMNS = (
    "ID",
    "Role",
    "Domain",
    "Server UUID",
    "Phase",
    "Peer",
    "Running",
    "Updated",
)
JOURNAL_FIELDS = (
    "id",
    "role",
    "domain",
    "server_uuid",
    "phase",
    "peer",
    "running",
    "updated",
)
_JOURNAL_KEYS = (
    "migration_id",
    "role",
    "domid",
    "uuid",
    "phase",
    "peer",
    "running",
    "updated",
)
OUTCOME_COLUMNS = (
    "ID",
    "Role",
    "Domain",
    "Server UUID",
    "Journalled",
    "Phase",
    "Skipped",
    "Reason",
)
_OUTCOME_KEYS = (
    "migration_id",
    "role",
    "domid",
    "uuid",
    "journalled",
    "phase",
    "skipped",
    "reason",
)
RESOLVED_FIELDS = ("id", "domain", "server_uuid", "journalled", "resolved")
_RESOLVED_KEYS = ("migration_id", "domid", "uuid", "journalled", "resolved")
ENDED_COLUMNS = (
    "ID",
    "Role",
    "Outcome",
    "Server UUID",
    "Source",
    "Destination",
    "Total Time",
    "Downtime",
    "Retries",
    "Reason",
)


def _row(data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple:
    return tuple(data.get(key) for key in keys)


def ended_row(data: Mapping[str, Any]) -> tuple:
    """One finished migration, from its ``end`` notification."""
    stats = data.get("statistics") or {}
    return (
        data.get("migration_id"),
        data.get("role", "source"),
        data.get("outcome"),
        data.get("instance_uuid"),
        data.get("source_host"),
        data.get("destination_host"),
        stats.get("total_time"),
        stats.get("actual_downtime"),
        stats.get("retries", data.get("retries", 0)),
        data.get("reason"),
    )


def _add_state_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-path",
        metavar="<dir>",
        default=None,
        help="Directory of the journals (default: [xen_ncm] state_path)",
    )


class _Local(base.XenNcmCommand):
    """A command that works on this host and needs no cloud."""

    auth_required = False


class ListMigrations(_Local, command.Lister):
    """List the migrations in flight in this host's journals.

    An entry stays while its engine runs and after an engine died before
    settling it (``openstack xen-ncm migration recover`` settles those).
    """

    columns = JOURNAL_COLUMNS

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _add_state_path(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple:
        from nova_xen_ncm.conf import CONF

        _, journal, incoming = recover.open_journals(
            parsed_args.state_path, CONF
        )
        rows = recover.in_flight(journal, incoming)
        return JOURNAL_COLUMNS, [_row(r, _JOURNAL_KEYS) for r in rows]


class _OneMigration(_Local):
    """A command on one migration of this host's journals."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "migration", metavar="<migration>", help="Migration ID"
        )
        _add_state_path(parser)
        return parser


class ShowMigration(_OneMigration, command.ShowOne):
    """Show one migration of this host's journals."""

    columns = JOURNAL_FIELDS

    def take_action(self, parsed_args: argparse.Namespace) -> tuple:
        from nova_xen_ncm.conf import CONF

        path, journal, incoming = recover.open_journals(
            parsed_args.state_path, CONF
        )
        for row in recover.in_flight(journal, incoming):
            if row["migration_id"] == parsed_args.migration:
                return JOURNAL_FIELDS, _row(row, _JOURNAL_KEYS)
        raise CommandError(
            f"no migration {parsed_args.migration!r} in the journals of {path}"
        )


class RecoverMigrations(_Local, command.Lister):
    """Finish or roll back the migrations a crash left in flight.

    Settles each migration of this host's journals whose engine is gone
    and lists the outcomes; as a destination, then answers the sources'
    commit queries (``--answer``). Exits 0 when everything was settled,
    1 when a migration stays IN_DOUBT (its guest paused here) or its
    guest runs on no host.
    """

    columns = OUTCOME_COLUMNS

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        migrate.add_host_options(parser)
        _add_state_path(parser)
        parser.add_argument(
            "--answer",
            metavar="<seconds>",
            type=recover.answer_type,
            default=None,
            help="How long to answer the sources' commit queries of "
            "incoming migrations (default: [xen_ncm] commit_query_timeout; "
            "0: not)",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple:
        from nova_xen_ncm.conf import CONF

        path, journal, incoming = recover.open_journals(
            parsed_args.state_path, CONF
        )
        outcomes = recover.settle(parsed_args, CONF, journal, incoming)
        if not outcomes:
            self.say(f"nothing in flight in {path}")
        # Answering may take [xen_ncm] commit_query_timeout: what was
        # settled is said now, the table comes after.
        for outcome in outcomes:
            self.say(recover.outcome_line(outcome))
        self.exit_status = recover.exit_status(outcomes)
        done = recover.answer(
            outcomes,
            incoming,
            CONF,
            recover.answer_seconds(parsed_args.answer, CONF),
            report=self.say,
        )
        for mid in done:
            self.say(f"{mid}: the source acknowledged the outcome")
        return OUTCOME_COLUMNS, [
            _row(o.as_dict(), _OUTCOME_KEYS) for o in outcomes
        ]


class ResolveMigration(_OneMigration, command.ShowOne):
    """Mark an IN_DOUBT migration resolved.

    After checking by hand where its guest runs: the journal entry is
    removed, nothing else is done.
    """

    columns = RESOLVED_FIELDS

    def take_action(self, parsed_args: argparse.Namespace) -> tuple:
        from nova_xen_ncm.conf import CONF

        _, journal, incoming = recover.open_journals(
            parsed_args.state_path, CONF
        )
        resolved = recover.resolve(journal, incoming, parsed_args.migration)
        return RESOLVED_FIELDS, _row(resolved, _RESOLVED_KEYS)


class WatchMigrations(_Local, command.Lister):
    """Follow migrations' progress on the message bus.

    Shows each xen_ncm.migration.* notification on stderr as it comes
    and lists the migrations that ended once the watch is over
    (``--once``, ``--timeout`` or Ctrl-C).
    """

    columns = ENDED_COLUMNS

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--transport-url",
            metavar="<url>",
            default=None,
            help="Transport URL of the bus (default: [oslo_messaging_"
            "notifications] transport_url, else [DEFAULT] transport_url)",
        )
        parser.add_argument(
            "--exchange",
            metavar="<exchange>",
            default=None,
            help="Exchange nova-compute publishes on (default: [DEFAULT] "
            "control_exchange, Nova's 'nova' unless changed)",
        )
        parser.add_argument(
            "--pool",
            metavar="<pool>",
            default=watch.default_pool(),
            help="Listener pool, a queue the broker deletes when its last "
            f"watcher ends (default: {watch.POOL_PREFIX}.<host>.<user>)",
        )
        parser.add_argument(
            "--migration",
            metavar="<migration>",
            default=None,
            help="Show only this migration",
        )
        parser.add_argument(
            "--once",
            action="store_true",
            help="End when the first migration ends on its source; exit "
            "status 0 if it is DONE, 1 otherwise",
        )
        parser.add_argument(
            "--timeout",
            metavar="<seconds>",
            type=watch._seconds,
            default=None,
            help="Stop this many seconds after the command started "
            "watching: counted from when this command's own code starts, "
            "after OpenStackClient loaded, and including the connection "
            "to the bus (with --once, an error when no migration ended by "
            "then)",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple:
        from nova_xen_ncm.cmd import main
        from nova_xen_ncm.conf import CONF

        watching = watch.Watch(
            Display(sys.stderr, tty=False),
            migration=parsed_args.migration,
            once=parsed_args.once,
        )
        try:
            self.exit_status = watch.follow(
                CONF,
                watching,
                transport_url=parsed_args.transport_url,
                exchange=parsed_args.exchange,
                pool=parsed_args.pool,
                timeout=parsed_args.timeout,
                started=getattr(parsed_args, "started", None),
                name=self.prog,
            )
        except KeyboardInterrupt as exc:
            # Ctrl-C is how a watch without --timeout ends: what it saw
            # is still listed, and the status says it was interrupted.
            if parsed_args.once:
                raise
            line, self.exit_status = main.interrupted_line(self.prog, exc)
            print(line, file=sys.stderr)
        return ENDED_COLUMNS, [ended_row(d) for d in watching.ended]
