"""Options of progress reporting on the message bus: [xen_ncm_progress].

How often progress is reported is ``[xen_ncm] progress_interval``; where
notifications go (transport URL, topics, driver) is oslo.messaging's own
``[oslo_messaging_notifications]`` group, as for every OpenStack service.
"""

from oslo_config import cfg

from nova_xen_ncm.conf.utils import register_group_opts

GROUP = cfg.OptGroup(
    "xen_ncm_progress",
    title="Migration progress notifications",
    help="Publishing of migration progress as versioned notifications "
    "(event types xen_ncm.migration.*) on the message bus. Publishing "
    "happens in a background thread behind a bounded queue, so a slow "
    "or unreachable bus never slows or fails a migration.",
)

OPTS = [
    cfg.BoolOpt(
        "notifications",
        default=True,
        help="Publish migration progress notifications on the bus.",
    ),
    cfg.IntOpt(
        "queue_size",
        default=1000,
        min=1,
        max=1000000,
        help="Notifications that may wait for the bus. When the queue is "
        "full a new progress notification is dropped (counted and "
        "reported in the migration's end notification and the log); "
        "error and end notifications displace the oldest waiting one.",
    ),
    cfg.IntOpt(
        "publish_retry",
        default=0,
        min=0,
        max=10,
        help="Times the publishing thread retries a notification when "
        "the bus cannot be reached (0: one attempt). Only the "
        "publishing thread waits for these, never a migration.",
    ),
    cfg.FloatOpt(
        "close_timeout",
        default=5.0,
        min=0.0,
        max=600.0,
        help="Seconds the service waits at shutdown for queued "
        "notifications to be published; what is left is counted as "
        "dropped.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    register_group_opts(conf, GROUP, OPTS)


def list_opts() -> dict:
    return {GROUP: OPTS}
