"""Options of ``nova-xen-ncm drain``: group [xen_ncm_drain].

How drain reaches the cloud (auth, endpoints, region) is openstacksdk's
own configuration: clouds.yaml, ``OS_*`` variables or ``--os-cloud``.
"""

from oslo_config import cfg

from nova_xen_ncm.conf.utils import register_group_opts

GROUP = cfg.OptGroup(
    "xen_ncm_drain",
    title="Host drain",
    help="How 'nova-xen-ncm drain' empties a compute host: how many "
    "live migrations run at once, how often a failed one is tried "
    "again, and how long it follows each server.",
)

OPTS = [
    cfg.IntOpt(
        "concurrency",
        default=2,
        min=1,
        max=64,
        help="Live migrations drain runs at the same time. Nova also "
        "limits the migrations per host ([DEFAULT] "
        "max_concurrent_live_migrations on the source compute).",
    ),
    cfg.IntOpt(
        "retries",
        default=2,
        min=0,
        max=20,
        help="Times drain tries a server's live migration again after "
        "it failed (0: one attempt). A failed live migration leaves "
        "the server running on the host being drained.",
    ),
    cfg.FloatOpt(
        "retry_delay",
        default=10.0,
        min=0.0,
        max=3600.0,
        help="Seconds before a server's first retry; the delay doubles "
        "with each further retry, up to retry_max_delay.",
    ),
    cfg.FloatOpt(
        "retry_max_delay",
        default=120.0,
        min=0.0,
        max=3600.0,
        help="Longest wait between two attempts for one server.",
    ),
    cfg.FloatOpt(
        "server_timeout",
        default=3600.0,
        min=1.0,
        max=7 * 86400.0,
        help="Seconds drain spends on one server, all attempts and the "
        "waits between them included. A migration still running then "
        "goes on (Nova and the driver's completion timeout decide how "
        "it ends); drain reports the server as timed out.",
    ),
    cfg.FloatOpt(
        "poll_interval",
        default=2.0,
        min=0.01,
        max=300.0,
        help="Seconds between two looks at a server's migration "
        "(GET /servers/{id}/migrations).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    register_group_opts(conf, GROUP, OPTS)


def list_opts() -> dict:
    return {GROUP: OPTS}
