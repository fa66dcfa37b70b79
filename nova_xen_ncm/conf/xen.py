"""Options of the real Xen host driver: group [xen_ncm_xen]."""

from oslo_config import cfg

from nova_xen_ncm.conf.utils import register_group_opts

GROUP = cfg.OptGroup(
    "xen_ncm_xen",
    title="Real Xen host",
    help="Options of the host driver for real Xen 4.17 (host_driver = "
    "xen): where it finds xl and keeps its files.",
)

OPTS = [
    cfg.StrOpt(
        "xl_path",
        default="xl",
        help="The xl command that creates and destroys domains.",
    ),
    cfg.FloatOpt(
        "command_timeout",
        default=300.0,
        min=1.0,
        max=3600.0,
        help="Seconds an xl command or a device model request may take.",
    ),
    cfg.StrOpt(
        "state_dir",
        default="/var/lib/nova-xen-ncm/xen",
        help="Directory for generated domain configurations and the "
        "device model state files moved during a save or restore.",
    ),
    cfg.StrOpt(
        "qmp_dir",
        default="/var/run/xen",
        help="Directory of the device models' QMP sockets "
        "(qmp-libxl-<domid>, where libxl starts QEMU with them).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    register_group_opts(conf, GROUP, OPTS)


def list_opts() -> dict:
    return {GROUP: OPTS}
