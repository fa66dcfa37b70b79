"""What every ``openstack xen-ncm`` command shares: the configuration
is read before it runs, and its errors end it as ``nova-xen-ncm`` ends
(one line on stderr, the exit status of the error's kind; 130 and 143
on SIGINT and SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import Interrupted


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


class XenNcmCommand:
    """Mixin before a cliff command class (Lister, ShowOne).

    ``take_action`` may set ``self.exit_status`` (0 by default) for a
    command that produced its output and still failed.
    """

    exit_status = 0

    def config_files(self) -> list[str]:
        from nova_xen_ncm.cmd.osc import plugin

        return plugin.config_files(getattr(self.app, "options", None))

    def say(self, line: str) -> None:
        """One progress line, on stderr: stdout carries the formatted
        result only."""
        print(
            f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True
        )

    def run(self, parsed_args: argparse.Namespace) -> int:
        from nova_xen_ncm.cmd import main

        name = f"openstack {self.cmd_name or 'xen-ncm'}"
        parsed_args.started = time.monotonic()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {
                signum: signal.signal(signum, _interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)
            }
        try:
            main.load_config(self.config_files())
            status = super().run(parsed_args)
            return status or self.exit_status
        except CommandError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return exc.exit_status
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            outcome = getattr(exc, "outcome", None)
            print(
                f"{name}: interrupted by {signal.Signals(signum).name}"
                + (f": {outcome}" if outcome else ""),
                file=sys.stderr,
            )
            return 128 + signum
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
