"""``nova-xen-ncm receive`` and ``nova-xen-ncm migrate``: one live
migration between two hosts, outside Nova.

The destination runs ``receive``: it prepares the incoming migration,
writes its endpoint and one-time token to ``--token-file`` and waits for
the source. The file goes to the source host out of band (as Nova's
migrate_data carries it); the source runs ``migrate DOMAIN --to HOST:PORT
--token-file FILE``.

The host driver is ``[xen_ncm] host_driver`` or ``--host-driver``. On a
driver whose guests live in the process holding the driver (the
simulated host), the guest runs inside the command's process: ``migrate
--create`` boots it there first, and ``receive`` keeps the migrated guest
running until interrupted (``--no-hold`` ends, and destroys it, at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging as std_logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import CommandFailed
from nova_xen_ncm.cmd import ConfigError
from nova_xen_ncm.cmd import EnvironmentProblem
from nova_xen_ncm.cmd import bus
from nova_xen_ncm.cmd import check
from nova_xen_ncm.cmd import demo
from nova_xen_ncm.host import base
from nova_xen_ncm.host import factory

TOKEN_FILE_VERSION = 1


# -- helpers shared with save and restore -----------------------------------


def add_host_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host-driver",
        default=None,
        metavar="NAME",
        help="host driver (default: [xen_ncm] host_driver)",
    )
    parser.add_argument(
        "--hostname",
        default=socket.gethostname(),
        help="this host's name in progress reports",
    )


def add_bus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport-url",
        default=None,
        metavar="URL",
        help="also publish progress on this oslo.messaging bus (default: "
        "the transport URL of the configuration file, if it sets one)",
    )


def bus_url(args: argparse.Namespace, conf: cfg.ConfigOpts) -> str | None:
    """The transport URL to publish progress on (``--transport-url`` or
    a configuration file's), checked before anything starts; None when
    no transport is configured."""
    url = bus.configured_url(conf, args.transport_url)
    if url:
        # A transport connects lazily: this checks the URL and driver.
        bus.notification_transport(conf, url).cleanup()
    return url


def progress_sinks(
    url: str | None,
    conf: cfg.ConfigOpts,
    hostname: str,
    stream: Any = None,
) -> list[Any]:
    """The terminal display, and the bus when ``url`` is given."""
    sinks = [terminal_sink(conf, hostname, stream)]
    if url:
        sinks.append(bus.bus_sink(conf, hostname, url))
    return sinks


def close_sinks(sinks: list[Any]) -> None:
    for sink in sinks:
        close = getattr(sink, "close", None)
        if close is not None:
            close()


def add_create_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--create",
        action="store_true",
        help="boot DOMAIN here first, with two vifs and a vbd (the way to "
        "have a guest on the simulated host, whose guests live in this "
        "command's process)",
    )
    parser.add_argument(
        "--memory",
        type=demo.parse_memory,
        default=None,
        metavar="SIZE",
        help="with --create: guest memory, e.g. 256M",
    )
    parser.add_argument(
        "--dirty-rate",
        type=demo.parse_rate,
        default=None,
        metavar="RATE",
        help="with --create: bytes per second the guest writes, e.g. 8M "
        "or 512K",
    )


def driver_name(args: argparse.Namespace, conf: cfg.ConfigOpts) -> str:
    return args.host_driver or conf.xen_ncm.host_driver


def open_host(
    args: argparse.Namespace, conf: cfg.ConfigOpts
) -> base.HostDriver:
    try:
        return factory.load_host_driver(
            driver_name(args, conf), args.hostname, conf
        )
    except base.HostError as exc:
        raise CommandError(str(exc)) from None


def find_domain(host: base.HostDriver, name: str) -> base.DomainInfo:
    """A domain by domid, name or uuid."""
    try:
        if name.isdigit():
            return host.domain_info(int(name))
        return host.find_domain(name)
    except base.DomainNotFound:
        known = ", ".join(f"{d.domid} ({d.name})" for d in host.list_domains())
        raise CommandError(
            f"no domain {name!r} on {host.hostname} (domains: "
            f"{known or 'none'})"
        ) from None


def create_guest(
    args: argparse.Namespace, host: base.HostDriver
) -> base.DomainInfo:
    """Boot ``args.domain`` with two vifs and a vbd."""
    if args.domain.isdigit():
        raise CommandError("--create needs a name, not a domid")
    workload = {}
    if args.dirty_rate is not None:
        workload["dirty_rate"] = args.dirty_rate
    memory = args.memory or demo.parse_memory(demo.DEFAULT_MEMORY)
    from nova_xen_ncm.conf import CONF

    if factory.guests_live_in_process(driver_name(args, CONF)):
        # A simulated guest's RAM is this machine's: refuse what it
        # cannot hold rather than run until the kernel kills the host.
        demo.check_memory(memory, hosts=1)
    config = base.DomainConfig(
        name=args.domain,
        memory_bytes=memory,
        vcpus=2,
        uuid=str(uuid.uuid4()),
        devices=demo.GUEST_DEVICES
        if not getattr(args, "xen_compatible", False)
        else (),
        pv_drivers=not getattr(args, "xen_compatible", False),
        workload=workload,
    )
    try:
        return host.domain_info(host.create_domain(config))
    except base.HostError as exc:
        raise CommandError(f"cannot boot {args.domain}: {exc}") from None


def check_create_options(args: argparse.Namespace) -> None:
    if not args.create and (
        args.memory is not None or args.dirty_rate is not None
    ):
        raise CommandError("--memory and --dirty-rate go with --create")


@contextlib.contextmanager
def closing_host(host: base.HostDriver) -> Iterator[base.HostDriver]:
    try:
        yield host
    finally:
        host.close()


def hold(domids: list[int], name: str) -> None:
    """Keep this process, and so its guests, alive until a signal."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"domain(s) {domids} run in this process on the {name} host "
        "driver; interrupt (Ctrl-C or SIGTERM) to destroy them and exit",
        flush=True,
    )
    stop.wait()


def terminal_sink(
    conf: cfg.ConfigOpts, hostname: str, stream: Any = None
) -> Any:
    from nova_xen_ncm.progress.terminal import TerminalSink

    return TerminalSink(stream or sys.stdout, conf=conf, host=hostname)


# -- token file -------------------------------------------------------------


def write_token_file(
    path: str, migration_id: str, token: bytes, endpoint: tuple[str, int]
) -> None:
    """Written to a temporary name, then renamed: a reader never sees
    half a file. Mode 0600: the token lets anyone migrate to us."""
    data = {
        "version": TOKEN_FILE_VERSION,
        "migration_id": migration_id,
        "token": token.hex(),
        "endpoint": [endpoint[0], endpoint[1]],
    }
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def read_token_file(path: str) -> tuple[str, bytes, tuple[str, int]]:
    try:
        with open(path) as source:
            data = json.load(source)
        if data.get("version") != TOKEN_FILE_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        host, port = data["endpoint"]
        return (
            str(data["migration_id"]),
            bytes.fromhex(data["token"]),
            (str(host), int(port)),
        )
    except OSError as exc:
        raise CommandError(f"cannot read token file {path}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(
            f"{path} is not a token file written by receive: {exc}"
        ) from None


def remove_token_file(path: str) -> None:
    """A token serves one migration: once it was presented, the file is
    useless and is removed, so that it is not tried again."""
    for name in (path, f"{path}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def check_listen_address(address: str) -> None:
    """A usage error for what cannot be an address; whether it is one of
    this host's is found when the listener binds."""
    try:
        socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise CommandError(
            f"--listen {address!r} is not an address or a name that "
            f"resolves ({exc})"
        ) from None


def _check_configured_listen_address(conf: cfg.ConfigOpts) -> None:
    """``[xen_ncm] listen_address`` from a file, checked as --listen is,
    as a configuration error naming the file."""
    address = conf.xen_ncm.listen_address
    location = conf.get_location("listen_address", "xen_ncm")
    if location is None or location.location is cfg.Locations.opt_default:
        return
    try:
        socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        where = f"{location.detail}: " if location.detail else ""
        raise ConfigError(
            f"bad value in the configuration: {where}[xen_ncm] "
            f"listen_address: {address!r} is not an address or a name "
            f"that resolves ({exc})"
        ) from None


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (e.g. 192.0.2.10:49152)"
        )
    return host.strip("[]"), int(port)


# -- the commands -----------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="Live-migrate a guest to a host running 'receive'.",
        description=(
            "Migrate DOMAIN (domid, name or uuid) live to the destination "
            "that wrote --token-file with 'nova-xen-ncm receive'. Exits 0 "
            "when the guest runs on the destination."
        ),
    )
    parser.add_argument("domain", help="domid, name or uuid")
    parser.add_argument(
        "--to",
        type=parse_endpoint,
        default=None,
        metavar="HOST:PORT",
        help="the destination (default: the endpoint in the token file)",
    )
    parser.add_argument(
        "--token-file",
        required=True,
        metavar="FILE",
        help="the file 'receive' wrote; removed once the destination "
        "took its token",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the statistics as JSON"
    )
    check.add_snapshot_option(
        parser, "on this host while it is paused for the stop-and-copy"
    )
    add_host_options(parser)
    add_bus_options(parser)
    add_create_options(parser)
    parser.set_defaults(func=run_migrate)

    parser = subparsers.add_parser(
        "receive",
        help="Wait for one incoming live migration.",
        description=(
            "Prepare an incoming migration, write its endpoint and one-time "
            "token to --token-file (hand it to the source) and wait for "
            "the source. Exits 0 when the guest runs here."
        ),
    )
    parser.add_argument(
        "--token-file",
        required=True,
        metavar="FILE",
        help="where to write the endpoint and token (mode 0600); removed "
        "once the migration ended, as the token serves once",
    )
    parser.add_argument(
        "--listen",
        default=None,
        metavar="ADDRESS",
        help="address to listen on (default: [xen_ncm] listen_address)",
    )
    parser.add_argument(
        "--advertise",
        default=None,
        metavar="ADDRESS",
        help="address the source should connect to, when listening on a "
        "wildcard address (default: this host's name)",
    )
    parser.add_argument(
        "--no-hold",
        dest="hold",
        action="store_false",
        help="on a host driver whose guests live in this process: exit "
        "(destroying the guest) once the migration ended",
    )
    check.add_snapshot_option(
        parser, "on this host once restored, before it runs"
    )
    add_host_options(parser)
    add_bus_options(parser)
    parser.set_defaults(func=run_receive)


def run_migrate(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.engine.migration import OutgoingMigration

    check_create_options(args)
    migration_id, token, endpoint = read_token_file(args.token_file)
    endpoint = args.to or endpoint
    url = bus_url(args, CONF)
    with closing_host(open_host(args, CONF)) as host:
        if args.create:
            info = create_guest(args, host)
        else:
            info = find_domain(host, args.domain)
        # --json keeps stdout for the statistics.
        sinks = progress_sinks(
            url, CONF, host.hostname, sys.stderr if args.json else None
        )
        try:
            for sink in sinks:
                sink.start(
                    migration_id,
                    instance_uuid=info.uuid,
                    source_host=host.hostname,
                    destination_host=f"{endpoint[0]}:{endpoint[1]}",
                )
            # The checker's snapshot when the paused source enters
            # restore, as the demo takes it.
            snap = (
                check.CheckSnapshot(host, lambda: info.domid, "restore")
                if args.check_snapshot
                else None
            )
            try:
                outgoing = OutgoingMigration(
                    host,
                    info.domid,
                    endpoint,
                    migration_id,
                    token,
                    conf=CONF,
                    sinks=[*sinks, snap] if snap else sinks,
                )
            except Exception as exc:
                raise EnvironmentProblem(f"cannot migrate: {exc}") from None
            outgoing.start()
            with quiet_engine_warnings():
                phase = wait_or_cancel(outgoing, host, info.domid)
        finally:
            close_sinks(sinks)
        if _token_presented(outgoing):
            remove_token_file(args.token_file)
        stats = outgoing.stats.to_dict()
        if args.json:
            print(json.dumps(stats, indent=2, default=str))
        if phase is None or phase.value != "done":
            raise FailedMigration(
                f"migration of domain {info.domid} ended in "
                f"{getattr(phase, 'value', phase)}: {outgoing.error}"
            )
        if snap is not None:
            snap.write(args.check_snapshot)
    return 0


class FailedMigration(CommandFailed):
    """The migration ran and did not complete: exit status 1."""


@contextlib.contextmanager
def quiet_engine_warnings() -> Iterator[None]:
    """While a progress display shows the migration, the engine's
    warnings (a rollback and its reason) would say it twice: only its
    errors go to the console meanwhile."""
    logger = std_logging.getLogger("nova_xen_ncm.engine")
    level = logger.level
    logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def wait_or_cancel(outgoing: Any, host: base.HostDriver, domid: int) -> Any:
    """The migration's final phase; an interrupt cancels it, waits for
    the rollback and says where the guest is."""
    from nova_xen_ncm.cmd import Interrupted

    try:
        return outgoing.wait()
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        outgoing.cancel(f"interrupted by {signal.Signals(signum).name}")
        phase = _wait_through(outgoing)
        raise Interrupted(signum, _outcome(phase, host, domid)) from None


def _wait_through(outgoing: Any) -> Any:
    """Wait for the end, ignoring further interrupts: the engine's
    rollback is bounded, and leaving during it would leave the guest
    paused."""
    while True:
        try:
            return outgoing.wait()
        except KeyboardInterrupt:
            continue


def _outcome(phase: Any, host: base.HostDriver, domid: int) -> str:
    """Where the guest is after an interrupted migration, as the host
    says (not as the phase suggests)."""
    value = getattr(phase, "value", phase)
    if value == "done":
        return (
            f"too late to cancel (the commit decision was made): domain "
            f"{domid} completed its migration and runs on the destination"
        )
    try:
        state = host.domain_info(domid).state.value
    except base.HostError:
        return (
            f"the migration ended in {value} and domain {domid} is no "
            "longer on this host"
        )
    if value == "cancelled":
        return (
            f"the migration was cancelled; domain {domid} rolled back "
            f"and is {state} on the source"
        )
    return f"the migration ended in {value}; domain {domid} is {state} here"


def _token_presented(outgoing: Any) -> bool:
    """Whether the destination saw the token: the migration got past
    SETUP, or ended there after connecting."""
    from nova_xen_ncm.engine.state import Phase

    phases = {phase for phase, _ in outgoing.sender.state.history()}
    return bool(phases - {Phase.SETUP, Phase.FAILED, Phase.ROLLBACK})


def run_receive(args: argparse.Namespace) -> int:
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.engine.errors import EngineError
    from nova_xen_ncm.engine.migration import IncomingMigration

    if args.listen:
        check_listen_address(args.listen)
        CONF.set_override("listen_address", args.listen, group="xen_ncm")
    else:
        _check_configured_listen_address(CONF)
    name = driver_name(args, CONF)
    migration_id = str(uuid.uuid4())
    url = bus_url(args, CONF)
    with closing_host(open_host(args, CONF)) as host:
        sinks = progress_sinks(url, CONF, host.hostname)
        # The checker's snapshot when the restored guest enters commit,
        # not yet running, as the demo takes it.
        snap = None
        if args.check_snapshot:
            snap = check.CheckSnapshot(
                host, lambda: incoming.receiver.domid, "commit"
            )
        try:
            try:
                incoming = IncomingMigration(
                    host,
                    migration_id,
                    conf=CONF,
                    sinks=[*sinks, snap] if snap else sinks,
                    advertise=args.advertise or _advertise(args),
                )
            except (OSError, EngineError, base.HostError) as exc:
                text = str(exc)
                # The transport's own message already says so.
                if not text.startswith("cannot listen"):
                    text = f"cannot listen: {text}"
                raise EnvironmentProblem(text) from None
            try:
                # The listener is bound: a source that connects now waits
                # in its backlog until the receiver runs.
                try:
                    write_token_file(
                        args.token_file,
                        migration_id,
                        incoming.token,
                        incoming.endpoint,
                    )
                except OSError as exc:
                    incoming.cancel()
                    raise CommandError(
                        f"cannot write {args.token_file}: {exc}"
                    ) from None
                # Before the progress display starts: a line printed
                # under a live bar would be drawn over.
                print(
                    f"waiting for the source on "
                    f"{incoming.endpoint[0]}:{incoming.endpoint[1]}",
                    flush=True,
                )
                for sink in sinks:
                    sink.start(migration_id, role="destination")
                incoming.start()
                with quiet_engine_warnings():
                    phase = _receive_or_cancel(incoming)
            finally:
                remove_token_file(args.token_file)
        finally:
            close_sinks(sinks)
        if phase is None or phase.value != "done":
            raise FailedMigration(
                f"incoming migration ended in "
                f"{getattr(phase, 'value', phase)}: "
                f"{incoming.receiver.error}"
            )
        if snap is not None:
            snap.write(args.check_snapshot)
        domids = [d.domid for d in host.list_domains()]
        print(f"domain(s) {domids} now run on {host.hostname}", flush=True)
        if args.hold and factory.guests_live_in_process(name):
            hold(domids, name)
    return 0


def _receive_or_cancel(incoming: Any) -> Any:
    """The incoming migration's final phase. An interrupt before the
    source connected stops waiting; once it has, the source decides and
    this end follows it to the end (a rollback destroys the copy here)."""
    from nova_xen_ncm.cmd import Interrupted

    try:
        return incoming.wait()
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if incoming.cancel("interrupted"):
            incoming.wait()
            raise Interrupted(
                signum, "no source had connected; nothing was received"
            ) from None
        while True:
            try:
                phase = incoming.wait()
                break
            except KeyboardInterrupt:
                continue
        value = getattr(phase, "value", phase)
        raise Interrupted(
            signum,
            "the source had connected, so the migration went on; it "
            f"ended in {value}"
            + (" and the guest runs here" if value == "done" else ""),
        ) from None


def _advertise(args: argparse.Namespace) -> str | None:
    # A wildcard listener is reached by the host's name; a specific
    # address is advertised as it is.
    if args.listen in (None, "0.0.0.0", "::"):
        from nova_xen_ncm.conf import CONF

        if CONF.xen_ncm.listen_address in ("0.0.0.0", "::"):
            return socket.getfqdn()
    return None
