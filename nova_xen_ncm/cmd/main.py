"""The ``nova-xen-ncm`` console script.

Each subcommand is a module in this package with ``register(subparsers)``
that adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning the exit status. Errors the user can act on are
raised as :class:`CommandError` and printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nova_xen_ncm.cmd import CommandError

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = (
    "nova_xen_ncm.cmd.demo",
    "nova_xen_ncm.cmd.migrate",
    "nova_xen_ncm.cmd.save",
    "nova_xen_ncm.cmd.inspect",
    "nova_xen_ncm.cmd.watch",
    "nova_xen_ncm.cmd.recover",
    "nova_xen_ncm.cmd.drain",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-xen-ncm",
        description="Non-cooperative live migration of Xen HVM guests.",
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
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nova_xen_ncm import conf

    conf.CONF(
        [],
        project="nova-xen-ncm",
        default_config_files=args.config_file,
        validate_default_values=True,
    )
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"nova-xen-ncm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nova-xen-ncm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
