"""Options of the migration itself: group [xen_ncm]."""

from oslo_config import cfg

from nova_xen_ncm.conf.utils import register_group_opts

GROUP = cfg.OptGroup(
    "xen_ncm",
    title="Xen non-cooperative migration",
    help="Options of the nova-xen-ncm migration engine and its tools.",
)

HOST_OPTS = [
    cfg.StrOpt(
        "host_driver",
        default="sim",
        choices=[
            ("sim", "The simulated Xen host embedded in the package."),
            ("xen", "Real Xen through libxenctrl, libxenstore and xl."),
        ],
        help="Which host driver the engine runs on.",
    ),
    cfg.StrOpt(
        "state_path",
        default="/var/lib/nova-xen-ncm",
        help="Directory of the journals of the migrations in flight on "
        "this host (source: phase and commit decision; destination: its "
        "outcome until the source acknowledged it). `nova-xen-ncm "
        "recover` and a restarted compute service settle from them what "
        "a crash interrupted. A migration whose journal cannot be "
        "written does not start. The Nova driver uses "
        "<Nova's state_path>/xen_ncm unless this is set.",
    ),
    cfg.StrOpt(
        "runtime_path",
        default="/run/nova-xen-ncm",
        help="Directory on a tmpfs (emptied by a reboot, never written "
        "back to a disk) where the source marks a migration whose COMMIT "
        "may have gone before its journal record was durable; created "
        "0700. If that record's sync fails, a restarted engine of the "
        "same boot finds the mark and asks the destination where the "
        "guest runs instead of resuming it on the lease alone. A "
        "migration whose mark cannot be written here does not start; "
        "a service that does not run as root needs it created for its "
        "user (a tmpfiles.d entry).",
    ),
]

TRANSPORT_OPTS = [
    cfg.HostAddressOpt(
        "listen_address",
        default="0.0.0.0",
        help="Address the destination listens on for incoming migrations.",
    ),
    cfg.PortOpt(
        "port_min",
        default=49152,
        help="Lowest TCP port a destination may listen on; each "
        "incoming migration takes the first free port of "
        "[port_min, port_max].",
    ),
    cfg.PortOpt(
        "port_max",
        default=49215,
        help="Highest TCP port a destination may listen on.",
    ),
    cfg.FloatOpt(
        "connect_timeout",
        default=10.0,
        min=0.1,
        max=600.0,
        help="Seconds one attempt to connect to the destination may "
        "take, handshake included.",
    ),
    cfg.FloatOpt(
        "io_timeout",
        default=60.0,
        min=0.1,
        max=3600.0,
        help="Seconds a send or receive may block before the connection "
        "is declared broken.",
    ),
    cfg.FloatOpt(
        "accept_timeout",
        default=120.0,
        min=1.0,
        max=3600.0,
        help="Seconds the destination waits for the source to connect "
        "before it gives up the incoming migration.",
    ),
    cfg.IntOpt(
        "channels",
        default=1,
        min=1,
        max=16,
        help="TCP connections per migration. The first carries control "
        "messages and data; more spread page data over several "
        "connections.",
    ),
    cfg.StrOpt(
        "compression",
        default="none",
        choices=[
            ("none", "Page data is sent as it is."),
            (
                "lz4",
                "Each data frame is lz4-frame compressed when that "
                "makes it smaller.",
            ),
        ],
        help="Compression of page data on the wire.",
    ),
    cfg.IntOpt(
        "max_frame_bytes",
        default=16 * 1024 * 1024,
        min=64 * 1024,
        max=256 * 1024 * 1024,
        help="Largest data frame payload accepted from the peer, in "
        "bytes (after decompression); bigger frames are a protocol "
        "error.",
    ),
]

RETRY_OPTS = [
    cfg.IntOpt(
        "connect_retry_attempts",
        default=5,
        min=1,
        max=100,
        help="Attempts to connect to the destination.",
    ),
    cfg.FloatOpt(
        "connect_retry_timeout",
        default=60.0,
        min=0.0,
        max=3600.0,
        help="Seconds all attempts to connect may take together.",
    ),
    cfg.IntOpt(
        "transfer_retry_attempts",
        default=3,
        min=1,
        max=100,
        help="Attempts to finish a precopy round after the connection "
        "dropped (reconnect and resume from the last acknowledged "
        "frame).",
    ),
    cfg.FloatOpt(
        "transfer_retry_timeout",
        default=120.0,
        min=0.0,
        max=3600.0,
        help="Seconds the attempts of one precopy round may take together. "
        "A destination waits as long for the source to resume a dropped "
        "connection. Once the source has announced stop-and-copy "
        "(STOPPING), both ends use the smaller of this and "
        "downtime_budget instead. Each end reads its own configuration: "
        "set it alike on every compute host.",
    ),
    cfg.IntOpt(
        "commit_query_attempts",
        default=10,
        min=1,
        max=1000,
        help="Queries to the destination after COMMIT was sent and no "
        "acknowledgement came, before the migration is reported in "
        "doubt.",
    ),
    cfg.FloatOpt(
        "commit_query_timeout",
        default=120.0,
        min=0.0,
        max=3600.0,
        help="Seconds the commit queries may take together.",
    ),
    cfg.FloatOpt(
        "retry_initial_delay",
        default=0.5,
        min=0.0,
        max=60.0,
        help="Seconds before the first retry; the delay doubles with "
        "each further retry.",
    ),
    cfg.FloatOpt(
        "retry_max_delay",
        default=10.0,
        min=0.0,
        max=600.0,
        help="Longest delay between two retries, in seconds.",
    ),
]

POLICY_OPTS = [
    cfg.StrOpt(
        "precopy_policy",
        default="downtime",
        help="Name of the precopy policy (an entry point in the "
        "nova_xen_ncm.policies namespace): 'downtime' stops when the "
        "remaining data fits downtime_target at the measured "
        "bandwidth; 'xen-simple' is Xen's own (under 50 dirty pages "
        "or after 5 rounds).",
    ),
    cfg.FloatOpt(
        "downtime_target",
        default=0.5,
        min=0.01,
        max=60.0,
        help="Pause of the guest, in seconds, the 'downtime' policy aims "
        "for when it decides to stop and copy.",
    ),
    cfg.FloatOpt(
        "switchover_estimate",
        default=0.0,
        min=0.0,
        max=60.0,
        help="The part of the pause, in seconds, that does not depend on "
        "the memory left (pausing, moving the platform and PV state, "
        "restoring, the commit): the 'downtime' policy stops and copies "
        "only when the rest fits downtime_target less this. 0 is QEMU's "
        "rule (remaining data over bandwidth only). The downtime of a "
        "migration of an idle guest between the same hosts is a good "
        "value. A compute host also measures it on each migration it "
        "sends (the downtime less the transfer the policy expected) and "
        "uses the second longest of the last five to the same destination "
        "(and counts each page left at no less than the last pauses' cost "
        "of a page), once "
        "three were measured, when that is more than this.",
    ),
    cfg.IntOpt(
        "max_bandwidth",
        default=0,
        min=0,
        help="Cap, in MiB/s, of what a migration puts on the network, all "
        "its channels together, as Nova's [libvirt] "
        "live_migration_bandwidth: the sender paces its writes to it, and "
        "the 'downtime' policy estimates the pause at no more than it. "
        "0: no cap.",
    ),
    cfg.FloatOpt(
        "downtime_budget",
        default=30.0,
        min=0.1,
        max=600.0,
        help="Longest pause, in seconds, stop-and-copy and restore may "
        "take including retries; past it the migration rolls back and "
        "the guest resumes on the source. It also bounds, from the "
        "source's STOPPING notice on, how long the source retries a "
        "dropped connection and the destination waits for it; each end "
        "reads its own configuration: set it alike on every compute "
        "host.",
    ),
    cfg.IntOpt(
        "max_rounds",
        default=30,
        min=1,
        max=10000,
        help="Precopy rounds after which the 'downtime' policy, if the "
        "rest does not fit downtime_target yet, throttles the guest to the "
        "share of time under which it does (no lower than throttle_min). "
        "Throttled to throttle_min and still not fitting, the target "
        "cannot be met without stopping the guest's progress: a progress "
        "event says so (detail downtime_target_unmet), and rounds go on "
        "while they leave fewer pages, at most twice this many; then "
        "downtime_unmet_action is taken.",
    ),
    cfg.StrOpt(
        "downtime_unmet_action",
        default=None,
        choices=[
            (
                "abort",
                "Roll the migration back with an error that gives the "
                "target and the pause expected; the guest keeps running on "
                "the source.",
            ),
            (
                "force_complete",
                "Stop and copy anyway, with the longer pause expected "
                "(the reason of the stop_and_copy phase gives it).",
            ),
        ],
        help="What the 'downtime' policy does when downtime_target "
        "cannot be met: the guest throttled to throttle_min for "
        "max_rounds rounds or more and the pause expected still over "
        "120 % of the target once rounds no longer leave fewer pages (or "
        "after twice max_rounds), or the fixed part of the pause alone "
        "(switchover_estimate, or what earlier migrations to the same "
        "destination measured) over 120 % of the target. A pause within "
        "120 % of the target is taken. Like Nova's [libvirt] "
        "live_migration_timeout_action, the default keeps the promise "
        "(no pause longer than asked) and leaves the guest where it is; "
        "force_complete trades the target for completion, as Nova's "
        "force-complete does. Unset, it is completion_timeout_action "
        "(abort unless set): a migration the operator asked to complete "
        "at the completion timeout is not cancelled before it for its "
        "target. The completion timeout (completion_timeout_per_gib) "
        "still applies first.",
    ),
    cfg.FloatOpt(
        "throttle_step",
        default=0.2,
        min=0.01,
        max=0.9,
        help="Share of vCPU time taken away each time the 'downtime' "
        "policy throttles the guest.",
    ),
    cfg.FloatOpt(
        "throttle_min",
        default=0.1,
        min=0.01,
        max=1.0,
        help="Smallest share of time the guest's vCPUs are left to run "
        "when throttled; 1.0 disables throttling.",
    ),
    cfg.FloatOpt(
        "throttle_trigger_ratio",
        default=0.5,
        min=0.01,
        max=10.0,
        help="The guest keeps pace with the migration when it dirties "
        "memory at this ratio or more of the measured bandwidth.",
    ),
    cfg.IntOpt(
        "throttle_trigger_rounds",
        default=2,
        min=1,
        max=100,
        help="Consecutive rounds keeping pace after which the guest is "
        "throttled one step further.",
    ),
    cfg.IntOpt(
        "completion_timeout_per_gib",
        default=800,
        min=0,
        help="Seconds per GiB of guest memory (at least 2 GiB counted) "
        "a migration may take before completion_timeout_action is "
        "taken, like Nova's [libvirt] "
        "live_migration_completion_timeout; 0 disables the timeout.",
    ),
    cfg.StrOpt(
        "completion_timeout_action",
        default="abort",
        choices=[
            ("abort", "Cancel the migration; the guest stays on the source."),
            ("force_complete", "Stop and copy now, whatever the downtime."),
        ],
        help="What to do when the completion timeout expires.",
    ),
    cfg.FloatOpt(
        "progress_interval",
        default=5.0,
        min=0.1,
        max=3600.0,
        help="Seconds between two progress reports of a running migration.",
    ),
]

SECURITY_OPTS = [
    cfg.ListOpt(
        "allowed_sources",
        default=[],
        help="Addresses or networks (CIDR) migration connections may come "
        "from. A connection from anywhere else is closed and logged "
        "before it takes a channel of the migration. Empty: any "
        "address; the one-time token still authenticates the source. "
        "The Nova driver adds the source host of each migration.",
    ),
    cfg.BoolOpt(
        "tls_enabled",
        default=False,
        help="Carry migration connections over mutual TLS, as Nova's "
        "[libvirt] live_migration_with_native_tls does: each end "
        "presents tls_cert_file and requires a peer certificate signed "
        "by tls_ca_file. The one-time migration token is checked inside "
        "TLS as without it. Both hosts must agree on this option.",
    ),
    cfg.StrOpt(
        "tls_cert_file",
        help="PEM certificate (chain) this host presents to its migration "
        "peers; it must be valid for both server and client "
        "authentication. Required with tls_enabled.",
    ),
    cfg.StrOpt(
        "tls_key_file",
        help="PEM private key of tls_cert_file. Required with tls_enabled.",
    ),
    cfg.StrOpt(
        "tls_ca_file",
        help="PEM certificate(s) of the authority that signs the "
        "migration peers' certificates; no other is trusted. Required "
        "with tls_enabled.",
    ),
    cfg.BoolOpt(
        "tls_encrypted_frames",
        default=True,
        help="With tls_enabled: mutual TLS authenticates both hosts "
        "(certificates, verified peers) and carries the token handshake "
        "and each end's fresh key contribution; then both ends leave TLS "
        "on that connection and every frame is encrypted and "
        "authenticated with AES-256-GCM under per-connection keys "
        "derived from both contributions and the token, known only to "
        "the two authenticated hosts (a reconnected channel derives new "
        "ones). The protection of the bulk is that of TLS 1.3's "
        "AES-256-GCM records, but frame headers (type, flags, length) "
        "travel in the clear, authenticated, and keys are never "
        "updated; the bulk is not TLS on the wire: a "
        "middlebox that inspects or requires TLS sees a TLS handshake, "
        "then an opaque TCP stream. Both hosts must agree: a peer "
        "without it is refused when the migration connects. False keeps "
        "every octet in TLS records (slower: a system call and a "
        "user-space encryption per 16 KiB record).",
    ),
    cfg.BoolOpt(
        "frame_authentication",
        default=True,
        help="Authenticate every frame of a plain (non-TLS) migration "
        "connection with GMAC under keys derived from the one-time "
        "token. Setting it to false on both hosts drops the per-frame "
        "tag on data frames: the token still authenticates the source "
        "at connection and control frames (the digests compared, "
        "COMMIT) keep their tag, but after the handshake anyone on the "
        "path may alter or inject guest memory and the stream's other "
        "records, as with QEMU's (and Nova's default) plain TCP "
        "migration. The memory digest then catches accidental "
        "corruption only: it is no authenticator. "
        "Only for isolated migration networks. A connection is "
        "authenticated unless both ends set false. With tls_enabled, "
        "every frame is authenticated (TLS records, or encrypted "
        "frames), whatever this option says.",
    ),
    cfg.BoolOpt(
        "tls_check_hostname",
        default=True,
        help="Whether the source checks that the destination's "
        "certificate names the address it connects to (DNS name or IP "
        "address in subjectAltName). Without the check, frames keep "
        "keys of the migration token, as any holder of a certificate of "
        "the CA could otherwise relay the connection and alter it: "
        "encrypted frames (tls_encrypted_frames) always do; with TLS "
        "records, frames then keep their per-frame tag.",
    ),
    cfg.ListOpt(
        "direct_boot_dirs",
        default=["/boot", "/var/lib/nova/instances"],
        help="Directories of this host a directly booted guest's kernel "
        "and ramdisk may be in when it arrives by migration (xl.cfg's "
        "kernel and ramdisk; Nova keeps an instance's under "
        "[DEFAULT] instances_path). The source names these files and "
        "the destination's device model serves their contents to the "
        "guest, so a file elsewhere (after symbolic links are "
        "resolved) is refused at SETUP, as is one that does not exist. "
        "Empty: no directly booted guest is accepted.",
    ),
    cfg.ListOpt(
        "migration_disk_dirs",
        default=["/var/lib/nova/instances"],
        help="Directories of this host (on storage the hosts share) the "
        "disk of a guest's PV block device may be in when the guest "
        "arrives by migration with its devices: the source names the "
        "file or block device and this host's backend opens it for the "
        "guest, so one elsewhere (after symbolic links are resolved) is "
        "refused at SETUP, as is one that does not exist. Empty: no "
        "guest with a PV disk is accepted.",
    ),
    cfg.ListOpt(
        "migration_bridges",
        default=["xenbr0"],
        help="Bridges of this host a migrating guest's PV network "
        "interfaces may be put on (the source names each vif's); another "
        "bridge, or one that does not exist, is refused at SETUP. Empty: "
        "no guest with a PV network interface is accepted.",
    ),
]

OPTS = HOST_OPTS + TRANSPORT_OPTS + SECURITY_OPTS + RETRY_OPTS + POLICY_OPTS


def register_opts(conf: cfg.ConfigOpts) -> None:
    register_group_opts(conf, GROUP, OPTS)


def list_opts() -> dict:
    return {GROUP: OPTS}
