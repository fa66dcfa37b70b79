"""``nova-xen-ncm recover``: settle the migrations an engine left in
flight when it died, on either side.

Reads the journals under ``[xen_ncm] state_path`` (or ``--state-path``)
and settles each migration whose engine is gone
(:mod:`nova_xen_ncm.engine.recovery`); a migration still running is left
alone. As a source: rolled back before the commit decision, else the
destination is asked whether it runs the guest. As a destination: a copy
that never got COMMIT is destroyed, and the outcome is then answered to
the source's commit query (``--answer`` seconds) until it acknowledges.
``--resolve ID`` forgets a migration an operator settled by hand. Exits
0 when everything was settled, 1 when a migration stays IN_DOUBT (its
guest paused here, or, after a reboot here, on the destination or
nowhere: ``guest: destination or nowhere``) or could not be
settled, or when its guest runs on no host (``guest: nowhere`` in the
JSON), and otherwise the shared statuses of :mod:`nova_xen_ncm.cmd`
(2 usage, 3 configuration, 4 environment).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from collections.abc import Callable
from typing import Any

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import ConfigError
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.journal import INCOMING
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.journal import JournalError

# Plain text for --help (the module docstring is reStructuredText).
DESCRIPTION = (
    "Read the journals under [xen_ncm] state_path (or --state-path) and "
    "settle each migration an engine left in flight when it died, "
    "leaving alone those a live engine still holds: as a source, rolled "
    "back if it died before the commit decision, else the destination is "
    "asked whether it runs the guest; as a destination, the copy is kept "
    "or destroyed by what was journalled, and the source's commit "
    "queries are answered (--answer). --resolve ID marks an entry "
    "settled once an operator has looked. Exits 0 when everything was "
    "settled (or nothing was in flight), 1 when a migration stays "
    "IN_DOUBT (its guest paused here, or after a reboot here on the "
    "destination or nowhere: check the destination before starting it) "
    "or its guest runs on no host (start "
    "it again from its disk), 2 on a command-line mistake (such "
    "as a --state-path that does not exist), 3 on a configuration that "
    "cannot be used (such as a state_path that does not exist), 4 on an "
    "environment problem."
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
        help="the journals' directory (default: [xen_ncm] state_path)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the outcomes as JSON"
    )
    parser.add_argument(
        "--answer",
        type=answer_type,
        default=None,
        metavar="SECONDS",
        help="how long to answer the sources' commit queries of incoming "
        "migrations (default: [xen_ncm] commit_query_timeout; 0: not)",
    )
    parser.add_argument(
        "--resolve",
        default=None,
        metavar="MIGRATION_ID",
        help="mark an IN_DOUBT migration resolved after checking by hand "
        "where its guest runs: its journal entry is removed, nothing else "
        "is done",
    )
    parser.set_defaults(func=run)


def open_journals(
    state_path: str | None, conf: Any
) -> tuple[str, Journal, Journal]:
    """The journals' directory (``state_path`` given on the command line,
    else ``[xen_ncm] state_path``) and its outgoing and incoming
    journals."""
    path = state_path or conf.xen_ncm.state_path
    if not path:
        raise CommandError(
            "no journal: set [xen_ncm] state_path or give --state-path"
        )
    # Recovery reads what an engine left: a directory that is not there
    # holds nothing, and creating it would hide a mistyped path.
    if not os.path.isdir(path):
        if state_path:
            raise CommandError(f"--state-path {path}: no such directory")
        raise ConfigError(f"[xen_ncm] state_path {path}: no such directory")
    try:
        runtime = conf.xen_ncm.runtime_path
        return (
            path,
            Journal(path, runtime_path=runtime),
            Journal(path, INCOMING, IncomingEntry, runtime_path=runtime),
        )
    except JournalError as exc:
        raise CommandError(str(exc)) from None


def in_flight(journal: Journal, incoming: Journal) -> list[dict[str, Any]]:
    """Every journalled migration, outgoing then incoming, as the rows
    ``migration list`` shows (the token stays out)."""
    try:
        rows = [_entry_row(entry, "source") for entry in journal.entries()] + [
            _entry_row(entry, "destination") for entry in incoming.entries()
        ]
    except JournalError as exc:
        raise CommandError(str(exc)) from None
    return rows


def _entry_row(entry: Any, role: str) -> dict[str, Any]:
    return {
        "migration_id": entry.migration_id,
        "role": role,
        "domid": entry.domid,
        "uuid": entry.uuid,
        "phase": entry.phase,
        "peer": f"{entry.host}:{entry.port}",
        "running": entry.running,
        "updated": _utc(entry.updated),
    }


def _utc(stamp: float) -> str | None:
    """A journal's wall-clock stamp as ISO 8601 UTC; None if unset."""
    if not stamp:
        return None
    return datetime.datetime.fromtimestamp(
        stamp, tz=datetime.timezone.utc
    ).isoformat(timespec="seconds")


def settle(
    args: argparse.Namespace, conf: Any, journal: Journal, incoming: Journal
) -> list[recovery.Outcome]:
    """Settle every migration whose engine is gone, on this host (the
    host options of :func:`migrate.add_host_options` in ``args``)."""
    try:
        if not journal.entries() and not incoming.entries():
            return []
        host = migrate.open_host(args, conf)
        outcomes = recovery.recover(host, journal, conf, others=[incoming])
        outcomes += recovery.recover_incoming(host, incoming, others=[journal])
    except JournalError as exc:
        raise CommandError(str(exc)) from None
    return outcomes


def answer_type(text: str) -> float:
    """``--answer``'s value: seconds, 0 (do not answer) or more. NaN
    would never end the wait, infinity holds the port for good, and a
    negative wait means nothing: each refused by name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, got {text!r}"
        ) from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, got {text!r} (not a number)"
        )
    if math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds, got {text!r} (infinite)"
        )
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or more seconds, got {text!r} (negative)"
        )
    return value


def answer_seconds(answer: float | None, conf: Any) -> float:
    return conf.xen_ncm.commit_query_timeout if answer is None else answer


def answer(
    outcomes: list[recovery.Outcome],
    incoming: Journal,
    conf: Any,
    seconds: float,
    report: Callable[[str], None] = lambda line: None,
) -> list[str]:
    """Answer the sources' commit queries of the incoming migrations just
    settled for up to ``seconds``; the ids whose source acknowledged."""
    waiting = [o for o in outcomes if o.role == "destination"]
    if seconds <= 0 or not waiting:
        return []
    report(
        f"answering the commit queries of {len(waiting)} incoming "
        f"migration(s) for up to {seconds:g}s"
    )
    return list(recovery.answer_incoming(incoming, conf, seconds))


def exit_status(outcomes: list[recovery.Outcome]) -> int:
    """1 while a migration stays IN_DOUBT or its guest runs nowhere (an
    operator must act), else 0."""
    return 1 if any(o.in_doubt or o.lost for o in outcomes) else 0


def resolve(journal: Journal, incoming: Journal, mid: str) -> dict[str, Any]:
    """Forget the journal entry of ``mid`` (outgoing or incoming) once an
    operator settled it by hand; what it held."""
    try:
        where = journal if journal.read(mid) is not None else incoming
        entry = recovery.resolve(where, mid)
    except JournalError as exc:
        raise CommandError(str(exc)) from None
    return {
        "migration_id": mid,
        "domid": entry.domid,
        "uuid": entry.uuid,
        "journalled": entry.phase,
        "resolved": True,
    }


def run(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF

    path, journal, incoming = open_journals(args.state_path, CONF)
    if args.resolve is not None:
        resolved = resolve(journal, incoming, args.resolve)
        if args.json:
            print(json.dumps(resolved, indent=2))
        else:
            print(
                f"{resolved['migration_id']} (domain {resolved['domid']}, "
                f"journalled in {resolved['journalled']}): marked resolved"
            )
        return 0
    outcomes = settle(args, CONF, journal, incoming)
    if not outcomes:
        if args.json:
            print(json.dumps([]))
        else:
            print(f"nothing in flight in {path}")
        return 0
    _print(args, outcomes)
    done = answer(
        outcomes,
        incoming,
        CONF,
        answer_seconds(args.answer, CONF),
        report=(lambda line: None) if args.json else print,
    )
    if not args.json:
        for mid in done:
            print(f"{mid}: the source acknowledged the outcome")
    return exit_status(outcomes)


def _print(args: argparse.Namespace, outcomes: list) -> None:
    if args.json:
        print(json.dumps([o.as_dict() for o in outcomes], indent=2))
        return
    for o in outcomes:
        print(outcome_line(o))


def outcome_line(o: recovery.Outcome) -> str:
    """One settled migration, as a line for an operator."""
    what = "left alone" if o.skipped else str(o.phase)
    if o.lost:
        what = f"{what}, THE GUEST RUNS NOWHERE"
    elif o.in_doubt and o.guest == recovery.ELSEWHERE:
        what = (
            f"{what}, THE COPY HERE IS GONE: the guest runs on the "
            "destination or nowhere; check the destination before starting "
            "it (run recover again, then --resolve)"
        )
    return (
        f"{o.migration_id} ({o.role}, domain {o.domid}, journalled in "
        f"{o.journalled}): {what}: {o.reason}"
    )
