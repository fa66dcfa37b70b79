# shellcheck shell=bash
# DevStack plugin of nova-xen-ncm: installs the package, makes it Nova's
# compute driver, and optionally runs "nova-xen-ncm watch" as a service
# (xen-ncm-watch) that logs the progress of every migration.
#
# Dispatched by DevStack as: plugin.sh stack install|post-config|extra,
# plugin.sh unstack, plugin.sh clean.

_XEN_NCM_XTRACE=$(set +o | grep xtrace)
set +o xtrace

function install_xen_ncm {
    if [[ "$XEN_NCM_HOST_DRIVER" == "xen" ]]; then
        # xl and the Xen 4.17 libraries the real host driver binds to.
        install_package xen-utils-4.17
    fi
    # Not setup_develop: an editable install ships neither the
    # nova.virt.xen_ncm shim Nova loads the driver through nor the .pth
    # that registers the driver's objects in nova-conductor
    # (doc/source/nova.rst).
    pip_install "$XEN_NCM_DIR"
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
    fi
}

function cleanup_xen_ncm {
    # The watch pool's queue outlives the service and would collect
    # notifications on the broker for good.
    if is_service_enabled xen-ncm-watch && is_service_enabled rabbit; then
        sudo rabbitmqctl delete_queue "$XEN_NCM_WATCH_POOL" || true
    fi
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
        esac
    elif [[ "$1" == "unstack" ]]; then
        stop_xen_ncm
    elif [[ "$1" == "clean" ]]; then
        cleanup_xen_ncm
    fi
fi

$_XEN_NCM_XTRACE
