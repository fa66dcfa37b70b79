"""Options of the simulated Xen host: group [xen_ncm_sim]."""

from oslo_config import cfg

from nova_xen_ncm.conf.utils import register_group_opts

GROUP = cfg.OptGroup(
    "xen_ncm_sim",
    title="Simulated Xen host",
    help="Knobs of the simulated Xen host embedded in nova-xen-ncm: the "
    "host's size, the default guest and its workload, and injected "
    "faults for testing.",
)

OPTS = [
    cfg.IntOpt(
        "host_memory_mb",
        default=16384,
        min=64,
        max=16 * 1024 * 1024,
        help="Memory of the simulated host that guests may be given, in "
        "MiB. Creating a guest beyond it fails with InsufficientMemory.",
    ),
    cfg.IntOpt(
        "guest_memory_mb",
        default=1024,
        min=4,
        max=1024 * 1024,
        help="Memory of a guest created without an explicit size, in MiB.",
    ),
    cfg.IntOpt(
        "guest_vcpus",
        default=2,
        min=1,
        max=32,
        help="vCPUs of a guest created without an explicit count.",
    ),
    cfg.ListOpt(
        "guest_devices",
        default=["vif:0", "vbd:51712"],
        help="PV devices of a default guest, as kind:devid.",
    ),
    cfg.IntOpt(
        "dirty_rate_bytes",
        default=8 * 1024 * 1024,
        min=0,
        max=16 * 1024 * 1024 * 1024,
        help="Bytes per second the guest's vCPUs write to its RAM (all "
        "vCPUs together). 0 leaves the guest idle.",
    ),
    cfg.StrOpt(
        "dirty_pattern",
        default="hotcold",
        choices=[
            ("uniform", "Any page of the guest's heap, equally likely."),
            ("hotcold", "Mostly a small hot working set, sometimes the rest."),
            ("sequential", "Walk the heap page after page, wrapping."),
        ],
        help="Which pages the guest's writes land on.",
    ),
    cfg.FloatOpt(
        "hot_fraction",
        default=0.05,
        min=0.0001,
        max=1.0,
        help="Size of the hot working set as a fraction of the heap "
        "(pattern hotcold).",
    ),
    cfg.FloatOpt(
        "hot_probability",
        default=0.9,
        min=0.0,
        max=1.0,
        help="Probability that a write lands in the hot set (pattern "
        "hotcold).",
    ),
    cfg.StrOpt(
        "memory_fill",
        default="guestlike",
        choices=[
            ("zero", "Leave RAM zero (nothing touched at boot)."),
            ("random", "Fill every page with random bytes."),
            (
                "guestlike",
                "A mix of zero pages, repeated patterns and "
                "random pages, as an OS's RAM looks.",
            ),
        ],
        help="What the guest's RAM holds when it boots.",
    ),
    cfg.IntOpt(
        "io_rate_requests",
        default=200,
        min=0,
        max=1000000,
        help="Requests per second each PV frontend issues to its backend.",
    ),
    cfg.FloatOpt(
        "call_latency_s",
        default=0.0,
        min=0.0,
        max=60.0,
        help="Latency injected into every host driver call, in seconds.",
    ),
    cfg.FloatOpt(
        "call_failure_probability",
        default=0.0,
        min=0.0,
        max=1.0,
        help="Probability that a host driver call fails with HostError "
        "(fault injection; 0 disables).",
    ),
    cfg.BoolOpt(
        "spare_guest_process",
        default=False,
        help="Keep a guest process started ahead, with its interpreter "
        "and modules loaded, for the next domain: a short migration's "
        "destination then does not wait in its downtime for a Python "
        "process to start (a real hypervisor has nothing to start). "
        "Costs one idle process per host.",
    ),
    cfg.IntOpt(
        "prefault_memory_mb",
        default=0,
        min=0,
        max=16 * 1024 * 1024,
        help="Free memory, in MiB, that the simulated host keeps faulted "
        "in (allocated, zeroed and mapped) for its next domain, as a real "
        "host's RAM is there before a guest is built. The next domain "
        "created or restored takes it, so that the pages of an incoming "
        "migration land in memory that is already mapped; on a virtual "
        "machine, first touching a page costs more than moving it. "
        "Bounded by the host's free memory; the host faults in the next "
        "share once the domain that took it runs. 0: a guest's memory is "
        "faulted in as it is first written.",
    ),
    cfg.StrOpt(
        "disk_dir",
        default=None,
        help="Directory of the guests' vbd disks: one file per disk, "
        "<instance uuid>-<devid>.disk, of the device's size. It stands "
        "for a cloud's shared storage: every simulated host that a guest "
        "may migrate between must see the same directory, since the "
        "destination's backend opens the file the source's wrote (a "
        "missing file makes the migration roll back). A disk is made at "
        "the guest's first boot, kept across reboots, and deleted with "
        "the instance (Nova's destroy_disks) on the host it last ran "
        "on. Unset: $XDG_STATE_HOME/nova-xen-ncm/sim-disks (default "
        "~/.local/state/nova-xen-ncm/sim-disks), made private (0700).",
    ),
    cfg.StrOpt(
        "domid_policy",
        default="xen",
        choices=[
            (
                "xen",
                "The hypervisor's: the next free domid after the last "
                "one given, round-robin (a freshly booted host gives 1 "
                "first).",
            ),
            (
                "random",
                "A random free domid, as xl.conf's domid_policy "
                '"random" chooses.',
            ),
        ],
        help="How a new guest's domid is chosen (xl.conf's domid_policy); "
        "either way never one released less than a minute ago. A live "
        "migration keeps the guest's domid and is refused if the "
        "destination has it taken or released it less than a minute ago "
        'for another guest: with "xen", the first guests of hosts '
        "booted at about the same time have the same domids, so a "
        "cloud whose guests migrate between hosts should use "
        '"random".',
    ),
    cfg.IntOpt(
        "fault_seed",
        default=None,
        min=0,
        help="Seed of the fault injection's random generator, to make a "
        "faulty run repeatable. Unset: a fresh seed per host.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    register_group_opts(conf, GROUP, OPTS)


def list_opts() -> dict:
    return {GROUP: OPTS}
