"""What every ``openstack xen-ncm`` command shares: it ends as
``nova-xen-ncm`` ends (:func:`nova_xen_ncm.cmd.main.run_command`: the
configuration read first, an error as one line on stderr with the exit
status of its kind, 130 and 143 on SIGINT and SIGTERM)."""

from __future__ import annotations

import argparse
import sys
import time

from nova_xen_ncm.cmd import CommandError


class XenNcmCommand:
    """Mixin before a cliff command class (Lister, ShowOne).

    ``take_action`` may set ``self.exit_status`` (0 by default) for a
    command that produced its output and still failed.
    """

    exit_status = 0
    #: The columns of the command's result (``-c`` picks among them).
    columns: tuple[str, ...] = ()

    @property
    def prog(self) -> str:
        """The command's name in its messages."""
        return f"openstack {self.cmd_name or 'xen-ncm'}"

    def config_files(self) -> list[str]:
        from nova_xen_ncm.cmd.osc import plugin

        return plugin.config_files(getattr(self.app, "options", None))

    def say(self, line: str) -> None:
        """One progress line, on stderr: stdout carries the formatted
        result only."""
        print(
            f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True
        )

    def columns_of(self, parsed_args: argparse.Namespace) -> tuple[str, ...]:
        """The columns this run will list or show."""
        return self.columns

    def check_columns(self, parsed_args: argparse.Namespace) -> None:
        """A ``-c`` that names none of the columns is a usage mistake
        found before anything runs: cliff finds it only when it prints,
        after a drain or a recovery has done its work."""
        if not getattr(parsed_args, "columns", None):
            return
        try:
            # cliff's own matching (case and spaces ignored), so that
            # what passes here prints there.
            self._generate_columns_and_selector(
                parsed_args, self.columns_of(parsed_args)
            )
        except ValueError:
            raise CommandError(
                f"-c {', '.join(parsed_args.columns)}: no such column "
                f"(columns: {', '.join(self.columns_of(parsed_args))})"
            ) from None

    def run(self, parsed_args: argparse.Namespace) -> int:
        from nova_xen_ncm.cmd import main

        parsed_args.started = time.monotonic()

        def action() -> int:
            self.check_columns(parsed_args)
            status = super(XenNcmCommand, self).run(parsed_args)
            return status or self.exit_status

        return main.run_command(self.prog, self.config_files(), action)
