"""The transparency checker across two hosts, from the command line.

``migrate --check-snapshot FILE`` writes the checker's snapshot of the
guest taken on the source while it is paused for the stop-and-copy
(when the migration enters ``restore``, as ``demo`` takes it);
``receive --check-snapshot FILE`` writes the destination's, taken when
the guest is restored and not yet running (``commit``). Hand both files
to the destination and run ``nova-xen-ncm check DOMAIN --paused FILE
--resumed FILE`` there once the guest has run: it takes a third
snapshot now and prints the checker's verdict per item; the exit status
is 1 when the guest could tell it moved (or an item could not be
judged), 0 when every item passed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.host import base


class CheckSnapshot:
    """A progress sink taking the checker's snapshot of the guest when
    the migration enters ``phase`` (in its downtime: the guest is
    paused); the file is written by :meth:`write` once the migration
    ended, not in the downtime."""

    def __init__(
        self,
        host: base.HostDriver,
        domid: Callable[[], int | None],
        phase: str,
    ) -> None:
        self.host = host
        self.domid = domid
        self.phase = phase
        self.state: base.GuestState | None = None
        self.error: str | None = None
        self.seconds = 0.0

    def emit(self, event: Any) -> None:
        from nova_xen_ncm.host import checker
        from nova_xen_ncm.progress.model import EventKind

        if event.kind is not EventKind.STATE or event.phase != self.phase:
            return
        domid = self.domid()
        if domid is None:
            self.error = (
                f"no guest yet when the migration entered {self.phase}"
            )
            return
        start = time.monotonic()
        try:
            self.state = checker.snapshot(self.host, domid)
        except base.HostError as exc:
            # The migration goes on; the judgement says why it cannot.
            self.error = f"{exc} ({exc.call})" if exc.call else str(exc)
        self.seconds = time.monotonic() - start

    def write(self, path: str) -> None:
        from nova_xen_ncm.host import snapshotfile

        if self.state is None:
            raise CommandFailed(
                f"no checker snapshot for {path}: "
                + (self.error or f"the migration never entered {self.phase}")
            )
        try:
            snapshotfile.write(path, self.state)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc}") from None
        print(
            f"checker snapshot at {self.phase} ({self.seconds * 1000:.1f} ms "
            f"of the downtime) written to {path}",
            flush=True,
        )


def add_snapshot_option(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument(
        "--check-snapshot",
        default=None,
        metavar="FILE",
        help=f"write the transparency checker's snapshot of the guest "
        f"{when} to FILE, for 'nova-xen-ncm check' on the destination",
    )


def register(subparsers: Any) -> None:
    from nova_xen_ncm.cmd import migrate

    parser = subparsers.add_parser(
        "check",
        help="Judge whether a migrated guest could tell it moved.",
        description=(
            "Compare the snapshots 'migrate --check-snapshot' (the source, "
            "guest paused) and 'receive --check-snapshot' (this host, guest "
            "restored) wrote with DOMAIN as it is now, item by item "
            "(memory, platform, domid, xenstore, event channels, grant "
            "table, shared info, PV devices, HVM params). Exits 1 when an "
            "item failed or could not be read."
        ),
    )
    parser.add_argument("domain", help="domid, name or uuid")
    parser.add_argument(
        "--paused",
        required=True,
        metavar="FILE",
        help="the source's snapshot at pause",
    )
    parser.add_argument(
        "--resumed",
        required=True,
        metavar="FILE",
        help="this host's snapshot at resume",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the verdict as JSON"
    )
    migrate.add_host_options(parser)
    parser.set_defaults(func=run_check)


def _load(path: str) -> base.GuestState:
    from nova_xen_ncm.host import snapshotfile

    try:
        return snapshotfile.read(path)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    except snapshotfile.SnapshotFileError as exc:
        raise CommandError(f"{path}: {exc}") from None


def run_check(args: argparse.Namespace) -> int:
    from nova_xen_ncm.cmd import migrate
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.host import checker

    paused = _load(args.paused)
    resumed = _load(args.resumed)
    with migrate.closing_host(migrate.open_host(args, CONF)) as host:
        info = migrate.find_domain(host, args.domain)
        try:
            later = checker.snapshot(host, info.domid)
        except base.HostError as exc:
            raise CommandFailed(
                f"cannot read domain {info.domid}: {exc}"
            ) from None
    report = checker.check(paused, resumed, later)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    if not report.passed:
        raise CommandFailed(
            f"domain {info.domid}: not shown transparent "
            f"({len(report.failures())} of {len(report.results)} items "
            "failed or could not be read)"
        )
    print(f"domain {info.domid}: every item passed", flush=True)
    return 0
