"""Does the ``downtime`` policy keep the pause within its target?

Not a test: run ``python benchmarks/bench_downtime.py [--memory 256M]
[--runs 1] [--targets 10,50,100,500] [--rates 10,50,90,150]
[--patterns uniform,hotcold,sequential] [--configs plain,lz4x4]``.

For each configuration (``plain``: one channel, no compression;
``lz4x4``: four channels, lz4) the bandwidth is first measured in the
same run on a paused guest of the same size and fill (its first round),
then ``--warmup`` idle guests are migrated: the fixed part of their
pauses is what the sender's switch-over history (``engine/switchover.py``,
shared by every migration of the run, as a compute host's are) starts
from (``--no-history``: none, only ``[xen_ncm] switchover_estimate``).
Then, for every dirty rate (a share of that bandwidth), dirty pattern and
downtime target, a running guest is migrated between two simulated hosts
over loopback TCP with the ``downtime`` policy and its defaults otherwise
(``--set downtime_unmet_action=force_complete`` and the like: options for
every migration). Per case it prints the target, the downtime (no checker
runs here, so nothing is to be subtracted from it) or ``aborted`` (the
policy's ``downtime_unmet_action = abort``: the guest must still run on
the source), downtime over target, the pause the policy expected when it
stopped, the pages it left, rounds, the throttle decisions, the throttle
reached, the events that said the target could not be met, the fixed part
and the cost of a page in the pause it was given (the switch-over
history's; 0: none, the policy counts its prior), and at the end the
share of runs whose pause kept within 120 % of their target (an
aborted run paused nothing), overall and by target, rate, pattern
and configuration, and how many misses and aborts were announced.

The source host runs in this process, the destination in a child process
(``nova-xen-ncm demo``'s host process), as in ``bench_migration.py``.
Writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import sys
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from bench_migration import overrides  # noqa: E402
from bench_migration import parse_size  # noqa: E402

from nova_xen_ncm.cmd import demo  # noqa: E402
from nova_xen_ncm.engine.sender import Sender  # noqa: E402
from nova_xen_ncm.engine.state import Phase  # noqa: E402
from nova_xen_ncm.engine.switchover import SwitchoverHistory  # noqa: E402
from nova_xen_ncm.host import base  # noqa: E402
from nova_xen_ncm.host.sim.host import SimHost  # noqa: E402
from nova_xen_ncm.progress.model import EventKind  # noqa: E402

MIB = 1 << 20
RESULTS = pathlib.Path(__file__).parent / "results"
#: Within this share of the target a pause counts as keeping it.
TOLERANCE = 1.2

CONFIGS = {
    "plain": {"channels": 1, "compression": "none"},
    "lz4x4": {"channels": 4, "compression": "lz4"},
}


class Events:
    """Collects the sender's throttle decisions and its announcements
    that the target could not be met."""

    def __init__(self) -> None:
        self.throttles: list[float] = []
        self.unmet: list[str] = []

    def emit(self, event) -> None:
        if event.kind is not EventKind.PROGRESS:
            return
        if "throttle" in event.detail:
            self.throttles.append(event.detail["throttle"])
        if event.detail.get("downtime_target_unmet"):
            self.unmet.append(event.reason or "")


def migrate(
    memory: int,
    workload: dict,
    settings: dict,
    *,
    paused: bool = False,
    history: SwitchoverHistory | None = None,
) -> dict:
    host_mb = memory // MIB + 64
    conf = demo.make_conf([], overrides(host_mb, settings))
    destination = demo.HostProcess(
        "destination", [], overrides(host_mb, settings)
    )
    source = SimHost("source", conf)
    events = Events()
    try:
        domid = source.create_domain(
            base.DomainConfig(
                name="bench", memory_bytes=memory, vcpus=2, workload=workload
            )
        )
        if paused:
            source.pause(domid)
        migration_id = str(uuid.uuid4())
        token, endpoint = destination.call(
            "listen", migration_id, domid, False
        )
        sender = Sender(
            source,
            domid,
            tuple(endpoint),
            migration_id,
            token,
            conf=conf,
            sinks=[events],
            switchover=history,
        )
        start = time.perf_counter()
        phase = sender.run()
        elapsed = time.perf_counter() - start
        incoming = destination.call("wait_incoming")
        # The policy's own abort (downtime_unmet_action = abort) is an
        # outcome to count: the guest must still run on the source.
        aborted = phase is Phase.CANCELLED and sender.stop_decision is None
        if aborted:
            state = source.domain_info(domid).state
            if state is not base.DomainState.RUNNING:
                raise RuntimeError(f"aborted, yet the source guest is {state}")
        elif phase is not Phase.DONE:
            raise RuntimeError(f"migration ended {phase}: {sender.error}")
        elif incoming["phase"] != Phase.DONE.value:
            raise RuntimeError(f"destination ended {incoming}")
        stats = sender.stats.to_dict()
        stop = sender.stop_decision
        return {
            "seconds": elapsed,
            "outcome": "aborted" if aborted else "done",
            "error": str(sender.error) if aborted else None,
            "rounds": len(sender.stats.rounds),
            "switchover": sender.switchover_estimate,
            "page_cost": sender.pause_page_cost,
            "downtime": stats["actual_downtime"],
            "expected": stats["expected_downtime"],
            "policy_expected": stop.expected_pause if stop else None,
            # The pause expected by part: fixed, transfer.
            "policy_parts": (
                stop.parts.to_dict() if stop and stop.parts else None
            ),
            "pages_left": sender.stats.remaining_pages,
            "bandwidth": sender.stats.rounds[0].bandwidth,
            "throttle": stats["throttle"],
            "throttle_events": len(events.throttles),
            "unmet_events": len(events.unmet),
            "unmet_reason": events.unmet[-1] if events.unmet else None,
        }
    finally:
        source.close()
        destination.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", default="256M", type=parse_size)
    parser.add_argument("--runs", default=1, type=int)
    parser.add_argument("--targets", default="10,50,100,500")
    parser.add_argument("--rates", default="10,50,90,150")
    parser.add_argument("--patterns", default="uniform,hotcold,sequential")
    parser.add_argument("--configs", default="plain,lz4x4")
    parser.add_argument("--warmup", default=3, type=int)
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="an extra [xen_ncm] option for every migration (repeatable)",
    )
    args = parser.parse_args()
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = float(value) if "." in value else int(value)
        except ValueError:
            extra[key] = value
    targets = [int(t) for t in args.targets.split(",")]
    rates = [int(r) for r in args.rates.split(",")]
    patterns = args.patterns.split(",")
    configs = args.configs.split(",")
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "memory": args.memory,
        "runs": args.runs,
        "extra": extra,
        "bandwidth": {},
        "cases": [],
    }
    print(
        f"{'config':<7}{'pattern':<11}{'rate':>5}{'target':>7}"
        f"{'downtime':>9}{'ratio':>7}{'est.':>7}{'pages':>7}{'rounds':>7}"
        f"{'thr.ev':>7}{'floor':>6}{'unmet':>6}{'fixed':>7}{'us/pg':>6}",
        flush=True,
    )
    for name in configs:
        settings = dict(CONFIGS[name], **extra)
        probe = migrate(
            args.memory,
            {"dirty_rate": 0},
            dict(settings, precopy_policy="xen-simple"),
            paused=True,
        )
        bandwidth = probe["bandwidth"]
        results["bandwidth"][name] = bandwidth
        history = None if args.no_history else SwitchoverHistory()
        for _ in range(args.warmup):
            migrate(
                args.memory,
                {"dirty_rate": 0},
                dict(settings, precopy_policy="downtime"),
                history=history,
            )
        fixed = history.estimate("127.0.0.1") if history else 0.0
        print(
            f"# {name}: measured bandwidth {bandwidth / MIB:.0f} MiB/s, "
            f"fixed part of the pause {fixed * 1000:.1f} ms",
            flush=True,
        )
        for pattern in patterns:
            for rate in rates:
                for target in targets:
                    for _ in range(args.runs):
                        workload = {
                            "dirty_rate": int(rate / 100 * bandwidth),
                            "pattern": pattern,
                        }
                        run = migrate(
                            args.memory,
                            workload,
                            dict(
                                settings,
                                precopy_policy="downtime",
                                downtime_target=target / 1000,
                            ),
                            history=history,
                        )
                        ratio = (
                            run["downtime"] * 1000 / target
                            if run["outcome"] == "done"
                            else None
                        )
                        case = dict(
                            run,
                            config=name,
                            pattern=pattern,
                            rate=rate,
                            target=target,
                            ratio=ratio,
                        )
                        results["cases"].append(case)
                        if ratio is None:
                            shown = f"{'aborted':>9}{'-':>7}{'-':>7}"
                        else:
                            est = run["policy_expected"]
                            shown = (
                                f"{run['downtime'] * 1000:>7.1f}ms"
                                f"{ratio:>7.2f}"
                                + (
                                    f"{est * 1000:>5.0f}ms"
                                    if est is not None
                                    else f"{'-':>7}"
                                )
                            )
                        print(
                            f"{name:<7}{pattern:<11}{rate:>4}%{target:>5}ms"
                            f"{shown}{run['pages_left']:>7}"
                            f"{run['rounds']:>7}{run['throttle_events']:>7}"
                            f"{run['throttle']:>6.2f}"
                            f"{run['unmet_events']:>6}"
                            f"{run['switchover'] * 1000:>5.0f}ms"
                            f"{run['page_cost'] * 1e6:>6.1f}",
                            flush=True,
                        )
    cases = results["cases"]

    def kept(case: dict) -> bool:
        # An aborted migration never paused the guest: it kept the target.
        return case["ratio"] is None or case["ratio"] <= TOLERANCE

    within = [c for c in cases if kept(c)]
    missed = [c for c in cases if not kept(c)]
    aborted = [c for c in cases if c["ratio"] is None]
    announced = [c for c in missed + aborted if c["unmet_events"]]
    print(
        f"pause within +{(TOLERANCE - 1) * 100:.0f}% of target (or none: "
        f"aborted): {len(within)}/{len(cases)} = "
        f"{len(within) / len(cases):.0%}; aborted {len(aborted)}; "
        f"misses and aborts announced as unmet: {len(announced)}/"
        f"{len(missed) + len(aborted)}"
    )
    by = collections.defaultdict(list)
    for c in cases:
        for kind in ("target", "rate", "pattern", "config"):
            by[(kind, c[kind])].append(c)
    for (kind, value), group in by.items():
        done = [c for c in group if c["ratio"] is not None]
        print(
            f"  {kind} {value}: {sum(kept(c) for c in group)}/{len(group)} "
            f"kept, {len(group) - len(done)} aborted, "
            f"{sum(c['ratio'] <= TOLERANCE for c in done)}/{len(done)} "
            "completed within"
        )
    results["within_share"] = len(within) / len(cases)
    results["aborted"] = len(aborted)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"downtime-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
