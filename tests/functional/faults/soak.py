"""The randomized soak: many migrations between two simulated hosts, each
with a fault of a random kind at a random phase, or in a window of the
commit (or none), and a count of what became of each guest. A guest
running on no host and not paused IN_DOUBT on the source is lost;
running on both at the end, or at any moment by the ledger both hosts
keep of when each copy runs, duplicated. Both counts must be zero, and
every completed migration (and every rollback after a pause) must pass
the transparency checker.

The console mode is ``python tools/soak/soak.py --count N --seed S``;
tests/functional/faults/test_soak.py runs a bounded number in CI.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import tempfile
import time
from collections.abc import Callable

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .rig import PHASES
from .rig import Fault
from .rig import Kind
from .rig import Rig
from .rig import Window
from .rig import guest_config
from .rig import overlaps

RUNNING = base.DomainState.RUNNING
PAUSED = base.DomainState.PAUSED

# Refusals happen in SETUP only (test_matrix.IMPOSSIBLE); the soak does
# the domid refusal, which needs no change of the destination's memory.
_CHOICES: list[Fault | None] = (
    [None]
    + [
        Fault(kind, phase)
        for kind in Kind
        for phase in PHASES
        if kind is not Kind.REFUSE_MEMORY
        and (kind is not Kind.REFUSE_DOMID or phase is Phase.SETUP)
    ]
    + [
        # Windows that need no step of the test's own to settle.
        Fault(window, Phase.COMMIT)
        for window in (
            Window.COMMIT_LOST,
            Window.COMMITTED_LOST,
            Window.FINISHED_LOST,
            Window.SOURCE_KILLED_CLEANUP,
        )
    ]
)


@dataclasses.dataclass
class SoakReport:
    migrations: int = 0
    outcomes: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    faults: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    lost: int = 0
    duplicated: int = 0
    #: Migrations whose guest the checker found changed.
    not_transparent: int = 0
    #: Completed migrations the checker passed.
    checked: int = 0
    elapsed: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    def as_text(self) -> str:
        lines = [
            f"migrations: {self.migrations} in {self.elapsed:.1f}s",
            "outcomes: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            "faults: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())),
            f"lost guests: {self.lost}",
            f"duplicated guests: {self.duplicated}",
            f"transparency: {self.checked} checked, "
            f"{self.not_transparent} failed",
        ]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _state(client, domid: int) -> base.DomainState | None:
    try:
        return client.state_of(domid)
    except (EOFError, OSError):
        return None


def soak(
    count: int,
    seed: int,
    workdir: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        rig = Rig(tmp)
        try:
            for i in range(count):
                fault = rng.choice(_CHOICES)
                _one(rig, i, fault, report)
                if progress is not None:
                    what = (
                        f"{fault.kind.value}@{fault.phase.value}"
                        if fault
                        else "no fault"
                    )
                    progress(f"{i + 1}/{count} {what}: {report.outcomes}")
                if not rig.destination.alive:
                    rig.restart_destination()
        finally:
            rig.close()
    report.elapsed = time.monotonic() - started
    return report


def _check(
    rig: Rig, domid: int, end: Phase | None, report: SoakReport, what: str
) -> None:
    """The transparency checker on the guest as it was paused and as it
    was handed back (to the destination, or to itself by a rollback)."""
    src = rig.source.client
    paused = src.snapshot("paused", domid)
    if paused is None:
        return
    if end is Phase.DONE and rig.destination.alive:
        resumed = rig.destination.client.snapshot("unpause", domid)
    elif end is Phase.FAILED:
        resumed = src.snapshot("unpause", domid)
    else:
        return
    if resumed is None:
        # A guest migrated paused is handed back without an unpause.
        return
    result = checker.check(paused, resumed)
    report.checked += 1
    if not result.passed:
        report.not_transparent += 1
        report.problems.append(f"{what}: not transparent: {result}")


def _one(rig: Rig, i: int, fault: Fault | None, report: SoakReport) -> None:
    src, dst = rig.source.client, rig.destination.client
    domid = src.create_domain(guest_config(f"soak-{i}", memory_mb=8))
    squatter = False
    if fault is not None and fault.kind is Kind.REFUSE_DOMID:
        dst.create_empty_domain(guest_config("squatter", memory_mb=4), domid)
        squatter = True
    result = rig.migrate(domid, fault)
    report.migrations += 1
    report.faults[
        f"{fault.kind.value}@{fault.phase.value}" if fault else "none"
    ] += 1
    end = result.end
    report.outcomes[end.value if end else "unknown"] += 1
    on_source = _state(src, domid)
    on_destination = (
        None if squatter or not rig.destination.alive else _state(dst, domid)
    )
    running = [on_source == RUNNING, on_destination == RUNNING]
    in_doubt = end is Phase.IN_DOUBT and on_source == PAUSED
    what = f"migration {i} ({fault}) ended {end}"
    double = overlaps(rig.source.ledger)
    if all(running) or double:
        report.duplicated += 1
        report.problems.append(
            f"{what}: running on both hosts {'; '.join(double)}"
        )
    elif not any(running) and not in_doubt:
        report.lost += 1
        report.problems.append(
            f"{what}: running nowhere (source {on_source}, destination "
            f"{on_destination})"
        )
    _check(rig, domid, end, report, what)
    # The next migration starts from empty hosts.
    for client in (src, dst):
        if client is dst and not rig.destination.alive:
            continue
        for info in client.list_domains():
            client.destroy_domain(info.domid)
    rig.forget()
