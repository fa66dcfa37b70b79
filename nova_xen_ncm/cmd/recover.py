"""``nova-xen-ncm recover``: settle the migrations a source engine left in
flight when it died.

Reads the journal under ``[xen_ncm] state_path`` (or ``--state-path``)
and settles each migration (:mod:`nova_xen_ncm.engine.recovery`): rolled
back before the commit decision, else the destination is asked whether
it runs the guest. Exits 0 when everything was settled, 1 when a
migration stays IN_DOUBT (its guest paused here), 2 on an error.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.journal import JournalError
from nova_xen_ncm.engine.state import Phase

# Plain text for --help (the module docstring is reStructuredText).
DESCRIPTION = (
    "Read the journal under [xen_ncm] state_path (or --state-path) and "
    "settle each migration a source engine left in flight when it died: "
    "rolled back if it died before the commit decision, else the "
    "destination is asked whether it runs the guest. Exits 0 when "
    "everything was settled (or nothing was in flight), 1 when a "
    "migration stays IN_DOUBT (its guest paused here), 2 on an error."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="Finish or roll back migrations interrupted by a crash.",
        description=DESCRIPTION,
    )
    migrate.add_host_options(parser)
    parser.add_argument(
        "--state-path",
        default=None,
        metavar="DIR",
        help="the journal's directory (default: [xen_ncm] state_path)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the outcomes as JSON"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF

    path = args.state_path or CONF.xen_ncm.state_path
    if not path:
        raise CommandError(
            "no journal: set [xen_ncm] state_path or give --state-path"
        )
    try:
        journal = Journal(path)
        if not journal.entries():
            if args.json:
                print(json.dumps([]))
            else:
                print(f"nothing in flight in {journal.path}")
            return 0
        host = migrate.open_host(args, CONF)
        outcomes = recovery.recover(host, journal, CONF)
    except JournalError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps([o.as_dict() for o in outcomes], indent=2))
    else:
        for o in outcomes:
            print(
                f"{o.migration_id} (domain {o.domid}, journalled in "
                f"{o.journalled}): {o.phase}: {o.reason}"
            )
    return 1 if any(o.phase is Phase.IN_DOUBT for o in outcomes) else 0
