"""The message bus as the console commands use it: oslo.messaging loaded
only by a command that publishes or listens, and every way a transport
URL can be wrong turned into one line.
"""

from __future__ import annotations

import warnings
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.cmd import CommandError
from nova_xen_ncm.cmd import EnvironmentProblem


def import_messaging() -> Any:
    """``oslo_messaging``, imported without eventlet's deprecation notice.

    oslo.messaging imports oslo.service and futurist, and both import
    eventlet if it is installed, which announces its own deprecation on
    import. The commands never use eventlet (listeners and sinks run in
    threads), so that one notice is silenced for this one import; any
    other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import oslo_messaging

    return oslo_messaging


def notification_transport(conf: cfg.ConfigOpts, url: str | None) -> Any:
    """A notification transport for ``url`` (None: the configured one)."""
    messaging = import_messaging()
    try:
        return messaging.get_notification_transport(conf, url=url)
    except messaging.InvalidTransportURL as exc:
        raise CommandError(
            f"{url or 'the configured transport URL'} is not a transport "
            f"URL ({exc}): give one such as rabbit://USER:PASS@HOST:5672/"
        ) from None
    except (messaging.DriverLoadFailure, ImportError) as exc:
        scheme = (url or "").partition(":")[0] or "the configured"
        cause = getattr(exc, "ex", exc)
        raise EnvironmentProblem(
            f"no message bus driver for {scheme!r} transport URLs can be "
            f"loaded ({type(cause).__name__}: {cause}); rabbit:// is "
            "installed with oslo.messaging, others need their own package"
        ) from None


def configured_url(conf: cfg.ConfigOpts, url: str | None) -> str | None:
    """The transport URL progress should be published on, or None.

    ``url`` (a command's ``--transport-url``) wins; else the URL set in a
    configuration file, ``[oslo_messaging_notifications] transport_url``
    or ``[DEFAULT] transport_url``, unless ``[xen_ncm_progress]
    notifications`` is off. oslo.messaging is loaded only when a
    configuration file was given, so a command without one stays light.
    """
    if url:
        return url
    if not conf.xen_ncm_progress.notifications:
        return None
    if not (conf.default_config_files or conf.config_file):
        return None
    import_messaging()
    from oslo_messaging import opts as messaging_opts

    for group, opts in messaging_opts.list_opts():
        conf.register_opts(opts, group=group)
    configured = conf.oslo_messaging_notifications.transport_url
    if configured:
        return configured
    location = conf.get_location("transport_url")
    if location is not None and location.location in (
        cfg.Locations.user,
        cfg.Locations.command_line,
        cfg.Locations.environment,
    ):
        return conf.transport_url
    return None


def bus_sink(conf: cfg.ConfigOpts, host: str, url: str) -> Any:
    """A BusSink publishing on ``url``, which is checked first (a
    transport connects lazily, so the check costs no connection)."""
    notification_transport(conf, url).cleanup()
    from nova_xen_ncm.progress import bus

    return bus.BusSink(conf, host=host, url=url)
