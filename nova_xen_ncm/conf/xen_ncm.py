"""Options of the migration itself: group [xen_ncm]."""

from oslo_config import cfg

GROUP = cfg.OptGroup(
    "xen_ncm",
    title="Xen non-cooperative migration",
    help="Options of the nova-xen-ncm migration engine and its tools.",
)

OPTS = [
    cfg.StrOpt(
        "host_driver",
        default="sim",
        choices=[
            ("sim", "The simulated Xen host embedded in the package."),
            ("xen", "Real Xen through libxenctrl, libxenstore and xl."),
        ],
        help="Which host driver the engine runs on.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts() -> dict:
    return {GROUP: OPTS}
