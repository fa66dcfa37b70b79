"""The OpenStackClient plugin module of nova-xen-ncm.

OpenStackClient loads it through the ``openstack.cli.extension`` entry
point ``xen_ncm`` and registers the commands of the entry point group
``openstack.xen_ncm.v1``.
"""

from __future__ import annotations

import argparse
from typing import Any

from osc_lib import utils

API_NAME = "xen_ncm"
API_VERSION_OPTION = "os_xen_ncm_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = ("1",)


def make_client(instance: Any) -> Any:
    """``client_manager.xen_ncm``: the commands talk to Nova through
    openstacksdk, so this is the connection OpenStackClient built from
    the ``--os-*`` options."""
    return instance.sdk_connection


def check_api_version(check_version: str) -> bool:
    """OpenStackClient calls this with ``--os-xen-ncm-api-version``
    before it loads the commands: a version without commands would
    otherwise leave only "Unknown command" to the operator."""
    from osc_lib import exceptions

    if check_version not in API_VERSIONS:
        raise exceptions.CommandError(
            f"--os-xen-ncm-api-version {check_version}: no such xen-ncm "
            f"command set (versions: {', '.join(API_VERSIONS)})"
        )
    # Checked: OpenStackClient's own check of API_VERSIONS is not needed.
    return True


def build_option_parser(
    parser: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The global options of the plugin."""
    parser.add_argument(
        "--os-xen-ncm-api-version",
        metavar="<xen-ncm-api-version>",
        default=utils.env("OS_XEN_NCM_API_VERSION"),
        help="xen-ncm command set version, default="
        f"{DEFAULT_API_VERSION} (Env: OS_XEN_NCM_API_VERSION)",
    )
    parser.add_argument(
        "--os-xen-ncm-config-file",
        metavar="<path>",
        action="append",
        default=None,
        help="nova-xen-ncm configuration file (oslo.config) the xen-ncm "
        "commands read; may be repeated (Env: OS_XEN_NCM_CONFIG_FILE, "
        "comma-separated, when the option is not given)",
    )
    return parser


def config_files(options: Any) -> list[str]:
    """The configuration files of the command line, else of
    OS_XEN_NCM_CONFIG_FILE."""
    given = getattr(options, "os_xen_ncm_config_file", None)
    if given:
        return list(given)
    value = utils.env("OS_XEN_NCM_CONFIG_FILE", default="")
    return [path for path in value.split(",") if path]
