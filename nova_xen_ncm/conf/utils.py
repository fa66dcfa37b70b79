"""What every option module needs to register its group."""

from oslo_config import cfg


def register_group_opts(
    conf: cfg.ConfigOpts, group: cfg.OptGroup, opts: list
) -> None:
    """Register ``opts`` under a copy of ``group`` in ``conf``.

    oslo.config keeps overrides in the group object it was given, so a
    module-level group registered in two ConfigOpts (two simulated hosts
    or two compute services in one process) would share their overrides.
    """
    copy = cfg.OptGroup(group.name, title=group.title, help=group.help)
    conf.register_group(copy)
    conf.register_opts(opts, group=copy)
