"""The plugin module OpenStackClient loads: its global options and the
configuration files the commands read."""

from __future__ import annotations

import argparse
import types
from importlib import metadata

import pytest

from nova_xen_ncm.cmd.osc import plugin


def test_the_entry_points_name_the_plugin_and_every_command():
    (extension,) = [
        ep
        for ep in metadata.entry_points(group="openstack.cli.extension")
        if ep.name == "xen_ncm"
    ]
    assert extension.load() is plugin
    commands = {
        ep.name: ep.load()
        for ep in metadata.entry_points(group="openstack.xen_ncm.v1")
    }
    assert set(commands) == {
        "xen-ncm_host_drain",
        "xen-ncm_migration_list",
        "xen-ncm_migration_show",
        "xen-ncm_migration_recover",
        "xen-ncm_migration_resolve",
        "xen-ncm_migration_watch",
    }
    # OpenStackClient finds the group from API_NAME and the version.
    assert plugin.API_NAME == "xen_ncm"
    assert plugin.DEFAULT_API_VERSION in plugin.API_VERSIONS


def test_global_options(monkeypatch):
    monkeypatch.delenv("OS_XEN_NCM_API_VERSION", raising=False)
    parser = plugin.build_option_parser(argparse.ArgumentParser())
    options = parser.parse_args(
        [
            "--os-xen-ncm-config-file",
            "/etc/a.conf",
            "--os-xen-ncm-config-file",
            "/etc/b.conf",
        ]
    )
    assert options.os_xen_ncm_config_file == ["/etc/a.conf", "/etc/b.conf"]
    assert options.os_xen_ncm_api_version is None
    assert plugin.config_files(options) == ["/etc/a.conf", "/etc/b.conf"]


def test_config_files_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("OS_XEN_NCM_CONFIG_FILE", "/etc/x.conf,/etc/y.conf")
    unset = types.SimpleNamespace(os_xen_ncm_config_file=None)
    given = types.SimpleNamespace(os_xen_ncm_config_file=["/etc/z.conf"])
    assert plugin.config_files(unset) == ["/etc/x.conf", "/etc/y.conf"]
    assert plugin.config_files(given) == ["/etc/z.conf"]
    monkeypatch.delenv("OS_XEN_NCM_CONFIG_FILE")
    assert plugin.config_files(unset) == []


def test_the_client_is_the_connection_openstackclient_built():
    connection = object()
    instance = types.SimpleNamespace(sdk_connection=connection)
    assert plugin.make_client(instance) is connection


def test_an_api_version_without_commands_is_refused_by_name():
    from osc_lib import exceptions

    assert plugin.check_api_version("1") is True
    with pytest.raises(exceptions.CommandError) as exc:
        plugin.check_api_version("2")
    assert str(exc.value) == (
        "--os-xen-ncm-api-version 2: no such xen-ncm command set (versions: 1)"
    )
