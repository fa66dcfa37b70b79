"""``nova-xen-ncm save`` and ``nova-xen-ncm restore``: a guest to a file
(``xl save`` format) and back.

On a host driver whose guests live in the command's process (the
simulated host), ``save --create`` boots the guest first, and
``restore`` keeps the restored guest running until interrupted
(``--no-hold`` ends, and destroys it, at once).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "save",
        help="Save a guest to a file (xl save format).",
        description=(
            "Pause DOMAIN (domid, name or uuid), write it to FILE as xl "
            "save does and destroy it (--keep leaves it paused)."
        ),
    )
    parser.add_argument("domain", help="domid, name or uuid")
    parser.add_argument("file", help="the save file to write")
    parser.add_argument(
        "--xen-compatible",
        action="store_true",
        help="write only Xen's record types (refused for a guest with PV "
        "drivers, whose state needs the project's records; with "
        "--create the guest boots without PV drivers)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the guest paused instead of destroying it",
    )
    migrate.add_host_options(parser)
    migrate.add_create_options(parser)
    parser.set_defaults(func=run_save)

    parser = subparsers.add_parser(
        "restore",
        help="Restore a guest from a save file.",
        description=(
            "Restore the guest saved in FILE and unpause it. Fails (status "
            "1) when the guest is not running right after (not paused, "
            "with --paused), naming its state and why it stopped; its "
            "domain is left to be inspected."
        ),
    )
    parser.add_argument("file", help="the save file")
    parser.add_argument(
        "--domid",
        type=int,
        default=None,
        help="restore as this domid (default: the saved one; a guest with "
        "PV drivers always keeps its own)",
    )
    parser.add_argument(
        "--paused", action="store_true", help="leave the guest paused"
    )
    parser.add_argument(
        "--no-hold",
        dest="hold",
        action="store_false",
        help="on a host driver whose guests live in this process: exit "
        "(destroying the guest) once it is restored",
    )
    migrate.add_host_options(parser)
    parser.set_defaults(func=run_restore)


def run_save(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.engine import savefile

    migrate.check_create_options(args)
    directory = os.path.dirname(os.path.abspath(args.file))
    if not os.path.isdir(directory):
        raise CommandError(f"cannot write {args.file}: no such directory")
    with migrate.closing_host(migrate.open_host(args, CONF)) as host:
        if args.create:
            info = migrate.create_guest(args, host)
        else:
            info = migrate.find_domain(host, args.domain)
        try:
            savefile.save_to_path(
                host,
                info.domid,
                args.file,
                xen_compatible=args.xen_compatible,
            )
        except (EngineError, base.HostError) as exc:
            _remove(args.file)
            raise CommandError(
                f"cannot save domain {info.domid}: {exc}"
            ) from None
        except OSError as exc:
            _remove(args.file)
            raise CommandError(f"cannot write {args.file}: {exc}") from None
        if not args.keep:
            host.destroy_domain(info.domid)
        print(
            f"saved domain {info.domid} ({info.name}) to {args.file}: "
            f"{os.path.getsize(args.file)} bytes"
            + (", Xen-compatible" if args.xen_compatible else "")
        )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.engine import savefile

    if not os.path.isfile(args.file):
        raise CommandError(f"no save file {args.file}")
    name = migrate.driver_name(args, CONF)
    with migrate.closing_host(migrate.open_host(args, CONF)) as host:
        try:
            domid = savefile.restore_from_path(
                host, args.file, domid=args.domid, unpause=not args.paused
            )
        except (EngineError, base.HostError) as exc:
            raise CommandError(f"cannot restore {args.file}: {exc}") from None
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc}") from None
        info = host.domain_info(domid)
        state = describe_state(info)
        expected = base.DomainState.RUNNING
        if args.paused:
            expected = base.DomainState.PAUSED
        if info.state != expected:
            # Left as it is, to be inspected (its console, xl dmesg, the
            # device model's log) and destroyed by the operator: the
            # save file is untouched. A guest living in this process
            # cannot outlive it.
            if factory.guests_live_in_process(name):
                left = (
                    f"it ends with this command (the {name} host driver's "
                    "guests live in its process)"
                )
            else:
                left = "it is left as it is (destroy it once inspected)"
            raise CommandFailed(
                f"restored {args.file} as domain {domid} ({info.name}), "
                f"but it is {state}, not {expected.value}, right after the "
                f"restore; {left}"
            )
        print(
            f"restored {args.file} as domain {domid} ({info.name}), {state}",
            flush=True,
        )
        if args.hold and factory.guests_live_in_process(name):
            migrate.hold([domid], name)
    return 0


def describe_state(info: base.DomainInfo) -> str:
    """The domain's state, with why it stopped if it did:
    ``shutdown (reboot)``."""
    if info.shutdown_reason is None:
        return info.state.value
    return f"{info.state.value} ({info.shutdown_reason})"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
