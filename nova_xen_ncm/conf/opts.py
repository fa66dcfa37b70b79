"""Aggregates every option group for oslo-config-generator."""

from nova_xen_ncm import conf


def list_opts() -> list:
    """Return [(group, opts)] for every module in nova_xen_ncm.conf."""
    result = []
    for module in conf._MODULES:
        for group, opts in module.list_opts().items():
            result.append((group, opts))
    return result
