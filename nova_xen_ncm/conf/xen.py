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
    cfg.FloatOpt(
        "backend_connect_timeout",
        default=120.0,
        min=1.0,
        max=3600.0,
        help="Seconds dom0's backends of a guest may take to reach "
        "Connected (state 4) after a restore, a device import or a "
        "rollback bound them again; the guest stays paused meanwhile "
        "and [xen_ncm] downtime_budget does not cut this wait short. "
        "One whose hotplug script failed is reported at once.",
    ),
    cfg.FloatOpt(
        "backend_unmap_timeout",
        default=30.0,
        min=1.0,
        max=600.0,
        help="Seconds a backend unbound from its driver at the pause may "
        "take to end its requests in flight and unmap the guest's "
        "grants; past it the migration rolls back. The guest is paused "
        "meanwhile and [xen_ncm] downtime_budget is checked only once "
        "this wait ended: a pause may last this long whatever that "
        "budget.",
    ),
    cfg.FloatOpt(
        "backend_gone_timeout",
        default=60.0,
        min=1.0,
        max=600.0,
        help="Seconds dom0's kernel may take to remove a destroyed "
        "domain's backend devices before the domain is created again "
        "under the same domid (an in-place restore).",
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
