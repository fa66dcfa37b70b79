"""The ``nova-xen-ncm`` console script.

Each subcommand is a module in this package with ``register(subparsers)``
that adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning the exit status. Errors the user can act on are
raised as :class:`CommandError` (or one of its kinds) and printed as one
line without a traceback, with the exit status of their kind; SIGINT and
SIGTERM end a command as :class:`Interrupted`.

Nothing here imports a command's heavy dependencies (oslo.messaging and,
through it, eventlet): each command imports what it needs when it runs,
so ``--help`` and the commands that need no bus start quickly and
quietly.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NoReturn

from nova_xen_ncm.cmd import EXIT_CONFIG
from nova_xen_ncm.cmd import EXIT_ENVIRONMENT
from nova_xen_ncm.cmd import EXIT_FAILED
from nova_xen_ncm.cmd import EXIT_USAGE
from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import ConfigError
from nova_xen_ncm.cmd import Interrupted

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = (
    "nova_xen_ncm.cmd.demo",
    "nova_xen_ncm.cmd.migrate",
    "nova_xen_ncm.cmd.check",
    "nova_xen_ncm.cmd.save",
    "nova_xen_ncm.cmd.inspect",
    "nova_xen_ncm.cmd.watch",
    "nova_xen_ncm.cmd.recover",
    "nova_xen_ncm.cmd.drain",
)

# The commands each module registers: a command line naming one imports
# only its module, not all of them (their imports were most of a short
# command's start-up in a Xen dom0); --help and unknown names import all.
COMMAND_MODULES = {
    "demo": "nova_xen_ncm.cmd.demo",
    "migrate": "nova_xen_ncm.cmd.migrate",
    "receive": "nova_xen_ncm.cmd.migrate",
    "check": "nova_xen_ncm.cmd.check",
    "save": "nova_xen_ncm.cmd.save",
    "restore": "nova_xen_ncm.cmd.save",
    "inspect": "nova_xen_ncm.cmd.inspect",
    "watch": "nova_xen_ncm.cmd.watch",
    "recover": "nova_xen_ncm.cmd.recover",
    "drain": "nova_xen_ncm.cmd.drain",
}

EPILOG = f"""\
exit status: 0 success; {EXIT_FAILED} the operation ran and failed \
(for example a migration rolled back); {EXIT_USAGE} a mistake on the \
command line; {EXIT_CONFIG} a configuration file that cannot be used; \
{EXIT_ENVIRONMENT} an environment problem (an address that cannot be \
bound, a missing message bus driver, not enough memory); 130 and 143 \
interrupted by SIGINT (Ctrl-C) or SIGTERM.
"""


def version() -> str:
    """The installed distribution's version (pbr derives it from git)."""
    from importlib import metadata

    try:
        return metadata.version("nova-xen-ncm")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage it would
    print first is one ``--help`` away); subcommands' parsers are of
    this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message} (see {self.prog} --help)\n",
        )


def command_named(argv: Sequence[str]) -> str | None:
    """The command an ``nova-xen-ncm`` command line names before any
    other option than ``--config-file``, None if it names none."""
    args = iter(argv)
    for arg in args:
        if arg == "--config-file":
            next(args, None)
        elif arg.startswith("--config-file="):
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``command`` (a key of
    COMMAND_MODULES), only that command's module is imported."""
    parser = Parser(
        prog="nova-xen-ncm",
        description="Non-cooperative live migration of Xen HVM guests.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {version()}",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="PATH",
        help="oslo.config file to read (may be repeated).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    modules = SUBCOMMANDS
    if command in COMMAND_MODULES:
        modules = (COMMAND_MODULES[command],)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def load_config(config_files: list[str]) -> None:
    """Read the configuration files into the global CONF and check every
    value now, so that a bad file is one line before anything starts
    rather than a traceback when an option is first used."""
    from oslo_config import cfg

    from nova_xen_ncm import conf

    try:
        conf.CONF(
            [],
            project="nova-xen-ncm",
            default_config_files=config_files,
            validate_default_values=True,
        )
        for _ in _option_values(conf.CONF):
            pass
    except cfg.ConfigFilesNotFoundError as exc:
        raise ConfigError(
            "cannot read configuration file(s): " + ", ".join(exc.config_files)
        ) from None
    except cfg.ConfigFilesPermissionDeniedError as exc:
        raise ConfigError(
            "no permission to read configuration file(s): "
            + ", ".join(exc.config_files)
        ) from None
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(
            f"configuration file {exc.config_file} cannot be parsed: {exc.msg}"
        ) from None
    except (cfg.Error, ValueError) as exc:
        raise ConfigError(
            f"bad value in the configuration: {_one_line(exc)}"
        ) from None
    _check_policy(conf.CONF)


def _check_policy(conf: Any) -> None:
    """``[xen_ncm] precopy_policy`` names an installed policy: checked
    here, or a bad name is found only inside a host process."""
    from oslo_config import cfg

    from nova_xen_ncm.engine import policy

    location = conf.get_location("precopy_policy", "xen_ncm")
    if location is None or location.location is cfg.Locations.opt_default:
        # The default is an installed policy; not worth a scan.
        return
    name = conf.xen_ncm.precopy_policy
    names = policy.available_policies()
    if name in names:
        return
    where = getattr(location, "detail", None)
    source = f"{where}: " if where else ""
    raise ConfigError(
        f"bad value in the configuration: {source}[xen_ncm] "
        f"precopy_policy: no policy {name!r} (installed: "
        f"{', '.join(names)})"
    )


def _option_values(conf: Any) -> Iterator[Any]:
    """Every option's value, each group in turn (reading one validates
    it against the option's type); a bad one raises ValueError naming
    its file, group and option."""
    for name in list(conf):
        value = getattr(conf, name)
        if not isinstance(value, conf.GroupAttr):
            yield value
            continue
        for option in list(value):
            try:
                yield getattr(value, option)
            except ValueError as exc:
                # oslo.config names the file only inside its message
                # ("... from LocationInfo(..., detail='FILE') is not
                # valid: REASON").
                text = _one_line(exc)
                found = re.search(r"detail='([^']*)'", text)
                source = f"{found.group(1)}: " if found else ""
                reason = text.rpartition("is not valid: ")[2]
                raise ValueError(
                    f"{source}[{name}] {option}: {reason}"
                ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def interrupted_line(name: str, exc: KeyboardInterrupt) -> tuple[str, int]:
    """The one line a command interrupted by ``exc`` prints, and its
    exit status (128 + the signal's number)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    outcome = getattr(exc, "outcome", None)
    line = f"{name}: interrupted by {signal.Signals(signum).name}" + (
        f": {outcome}" if outcome else ""
    )
    return line, 128 + signum


def run_command(
    name: str, config_files: list[str], action: Callable[[], int | None]
) -> int:
    """Read the configuration, then run ``action``: its exit status, or
    an error's one line on stderr and the status of its kind. Every
    command line of the project (``nova-xen-ncm`` and ``openstack
    xen-ncm``) ends through here."""
    # SIGTERM ends a command as Ctrl-C does: whatever runs is cancelled
    # and cleaned up, rather than the process vanishing mid-migration.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            signum: signal.signal(signum, _interrupt)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        load_config(config_files)
        return int(action() or 0)
    except CommandError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        line, status = interrupted_line(name, exc)
        print(line, file=sys.stderr)
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    parser = build_parser(
        command_named(sys.argv[1:] if argv is None else argv)
    )
    args = parser.parse_args(argv)
    # For options that bound a command's running time (watch --timeout).
    args.started = started
    return run_command(
        f"nova-xen-ncm {args.command}",
        args.config_file,
        lambda: args.func(args),
    )


if __name__ == "__main__":
    sys.exit(main())
