"""Running an ``openstack xen-ncm`` command in this process as
OpenStackClient runs it: the command object, its parser and cliff's
formatters, with stdout captured."""

from __future__ import annotations

import io
import types

import pytest

from nova_xen_ncm.cmd import main


class App:
    """What a cliff command reads of its application."""

    def __init__(self, *, config_files=None) -> None:
        self.stdout = io.StringIO()
        self.stdin = io.StringIO()
        self.stderr = io.StringIO()
        # Where cliff looks for hooks: none are installed there.
        self.command_manager = types.SimpleNamespace(
            namespace="nova_xen_ncm.tests"
        )
        self.options = types.SimpleNamespace(
            os_xen_ncm_config_file=config_files, debug=False
        )


def invoke(command_class, argv, *, app=None, name="xen-ncm command"):
    """Parse ``argv`` as the command's parser does and run it: the exit
    status and what it printed on stdout."""
    app = app or App()
    command = command_class(app, None, cmd_name=name)
    parsed = command.get_parser(f"openstack {name}").parse_args(argv)
    status = command.run(parsed)
    return status, app.stdout.getvalue()


@pytest.fixture(autouse=True)
def isolated_cloud_config(no_cloud):
    """No clouds.yaml or OS_* variable of the machine reaches a test."""


@pytest.fixture(autouse=True)
def default_config():
    """The commands read their configuration into the global CONF: back
    to the defaults after each test."""
    yield
    main.load_config([])
