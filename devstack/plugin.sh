# shellcheck shell=bash
# DevStack plugin of nova-xen-ncm: installs the package, makes it Nova's
# compute driver, and optionally runs "nova-xen-ncm watch" as a service
# (xen-ncm-watch) that logs the progress of every migration.
#
# Dispatched by DevStack as:
# plugin.sh stack install|post-config|extra|test-config,
# plugin.sh unstack, plugin.sh clean.

_XEN_NCM_XTRACE=$(set +o | grep xtrace)
set +o xtrace

function install_xen_ncm {
    if [[ "$XEN_NCM_HOST_DRIVER" == "xen" ]]; then
        # xl and the Xen 4.17 libraries the real host driver binds to.
        install_package xen-utils-4.17
    fi
    # Editable, with the requirements held to upper-constraints, as
    # every service DevStack installs from git.
    setup_develop "$XEN_NCM_DIR"
    # An editable install ships no .pth; this one makes every Nova
    # service of the environment find the driver (nova.virt.xen_ncm)
    # and its objects, wherever Nova itself is installed.
    _xen_ncm_hook install
}

# Installs or removes the import hook (nova_xen_ncm.virt.novahook) in the
# site-packages of the Python DevStack installs services into.
function _xen_ncm_hook {
    local python site
    python="$(get_python_exec_prefix)/python3"
    site=$("$python" -c \
        'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [[ -w "$site" ]]; then
        "$python" -m nova_xen_ncm.virt.novahook "$1"
    else
        sudo "$python" -m nova_xen_ncm.virt.novahook "$1"
    fi
}

function configure_xen_ncm {
    iniset "$NOVA_CONF" DEFAULT compute_driver "$XEN_NCM_COMPUTE_DRIVER"
    iniset "$NOVA_CONF" xen_ncm host_driver "$XEN_NCM_HOST_DRIVER"
    iniset "$NOVA_CONF" xen_ncm precopy_policy "$XEN_NCM_PRECOPY_POLICY"
    iniset "$NOVA_CONF" xen_ncm downtime_target "$XEN_NCM_DOWNTIME_TARGET"
    iniset "$NOVA_CONF" xen_ncm downtime_budget "$XEN_NCM_DOWNTIME_BUDGET"
    iniset "$NOVA_CONF" xen_ncm completion_timeout_action \
        "$XEN_NCM_COMPLETION_TIMEOUT_ACTION"
    iniset "$NOVA_CONF" xen_ncm progress_interval \
        "$XEN_NCM_PROGRESS_INTERVAL"
    iniset "$NOVA_CONF" xen_ncm_progress notifications \
        "$XEN_NCM_NOTIFICATIONS"
    if [[ "$XEN_NCM_HOST_DRIVER" == sim ]]; then
        iniset "$NOVA_CONF" xen_ncm_sim domid_policy \
            "$XEN_NCM_SIM_DOMID_POLICY"
    fi
    # [xen_ncm] runtime_path, left at its default on tmpfs: nova-compute
    # runs as $STACK_USER, who cannot create it under /run, and a
    # migration that cannot write its COMMIT mark there does not start.
    sudo install -d -o "$STACK_USER" -m 0700 /run/nova-xen-ncm
}

function start_xen_ncm {
    if is_service_enabled xen-ncm-watch; then
        local bin_dir
        bin_dir=$(get_python_exec_prefix)
        # --plain: the service log is not a terminal.
        run_process xen-ncm-watch "$bin_dir/nova-xen-ncm --config-file $NOVA_CONF watch --plain --pool $XEN_NCM_WATCH_POOL"
    fi
}

function stop_xen_ncm {
    if is_service_enabled xen-ncm-watch; then
        stop_process xen-ncm-watch
        _xen_ncm_delete_watch_queue
    fi
}

# The watch pool's queue is auto-delete and goes with the service; one
# that a service killed mid-declaration or an earlier release left
# (durable) would collect notifications for good, and would make the
# next watch fail to declare its own. At unstack RabbitMQ still runs.
function _xen_ncm_delete_watch_queue {
    if ! is_service_enabled rabbit; then
        return 0
    fi
    if sudo rabbitmqctl -q list_queues name | grep -qx "$XEN_NCM_WATCH_POOL"; then
        sudo rabbitmqctl delete_queue "$XEN_NCM_WATCH_POOL"
    fi
}

# Tempest: live migration between the two compute nodes on shared
# storage; what the driver does not do is off.
function configure_tempest_xen_ncm {
    iniset "$TEMPEST_CONFIG" compute min_compute_nodes 2
    iniset "$TEMPEST_CONFIG" compute-feature-enabled live_migration True
    iniset "$TEMPEST_CONFIG" compute-feature-enabled \
        block_migration_for_live_migration False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled \
        volume_backed_live_migration False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled cold_migration False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled resize False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled evacuate False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled shelve False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled snapshot False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled vnc_console False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled serial_console False
    iniset "$TEMPEST_CONFIG" compute-feature-enabled console_output True
}

function cleanup_xen_ncm {
    _xen_ncm_hook remove
}

if is_service_enabled xen-ncm; then
    if [[ "$1" == "stack" ]]; then
        case "$2" in
            install)
                echo_summary "Installing nova-xen-ncm"
                install_xen_ncm
                ;;
            post-config)
                echo_summary "Configuring nova-xen-ncm"
                configure_xen_ncm
                ;;
            extra)
                start_xen_ncm
                ;;
            test-config)
                if is_service_enabled tempest; then
                    configure_tempest_xen_ncm
                fi
                ;;
        esac
    elif [[ "$1" == "unstack" ]]; then
        stop_xen_ncm
    elif [[ "$1" == "clean" ]]; then
        cleanup_xen_ncm
    fi
fi

$_XEN_NCM_XTRACE
