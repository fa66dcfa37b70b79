"""Faults crossed with phases: whatever breaks, and whenever, the guest
ends up running on exactly one host with the memory it had at its last
pause, or paused on the source with the migration reported IN_DOUBT; the
migration's recorded end state says which.

Each party runs in its own process (rig.py), so that a kill is a real
SIGKILL. Where a fault hits, per phase (the side named does it):

=====================  =================================================
dropped connection     source: after the handshake (SETUP), after round
                       0 (PRECOPY), after the pause and the backends'
                       quiescing (STOP_AND_COPY), on
                       entering RESTORE, on the commit decision (COMMIT,
                       before COMMIT is sent)
destination killed     in creating the empty domain (SETUP), at its
                       second page batch (PRECOPY), on entering
                       STOP_AND_COPY, RESTORE, COMMIT (COMMIT received,
                       the guest not yet unpaused)
source engine killed   as for the dropped connection; the engine is
                       then restarted and recovers from its journal
domid taken,           SETUP only (see IMPOSSIBLE)
not enough memory
slow link              source sends at 8 MiB/s from that moment on
bus gone               the progress notifier's bus is cut at that moment
                       (with no RabbitMQ here: gone from the start)
=====================  =================================================

A source that ends IN_DOUBT is then restarted too (recovery), as an
operator would: the recorded end state is the recovery's.
"""

from __future__ import annotations

import itertools

import pytest

from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .rig import PHASES
from .rig import Fault
from .rig import Kind
from .rig import Rig
from .rig import guest_config
from .rig import overlaps

RUNNING = base.DomainState.RUNNING
PAUSED = base.DomainState.PAUSED

_REFUSAL = (
    "the destination refuses in SETUP, before anything moves "
    "(architecture.rst section 2); from PRECOPY on it holds the domid and "
    "the memory, so a refusal can no longer happen"
)
#: Cells that cannot happen, and why.
IMPOSSIBLE = {
    (kind, phase): _REFUSAL
    for kind in (Kind.REFUSE_DOMID, Kind.REFUSE_MEMORY)
    for phase in PHASES
    if phase is not Phase.SETUP
}

DONE, FAILED, IN_DOUBT = Phase.DONE, Phase.FAILED, Phase.IN_DOUBT

#: The recorded end state of each possible cell.
EXPECTED = {
    # Resumed within the retry budgets in PRECOPY and STOP_AND_COPY;
    # SETUP is not resumable, so it rolls back. In RESTORE the control
    # channel is resumed and READY comes again (DONE), unless READY was
    # read before the drop: then COMMIT goes into it, as on the commit
    # decision. There COMMIT never arrives: the source asks, which ends
    # the destination's wait for a resume; it rolls back and says so,
    # and the source resumes the guest.
    (Kind.DROP, Phase.SETUP): FAILED,
    (Kind.DROP, Phase.PRECOPY): DONE,
    (Kind.DROP, Phase.STOP_AND_COPY): DONE,
    (Kind.DROP, Phase.RESTORE): {DONE, FAILED},
    (Kind.DROP, Phase.COMMIT): FAILED,
    # Before COMMIT the source rolls back. Killed on COMMIT, the
    # destination never acknowledges nor answers: the source cannot know,
    # and stays paused; its restart cannot know either.
    (Kind.KILL_DESTINATION, Phase.SETUP): FAILED,
    (Kind.KILL_DESTINATION, Phase.PRECOPY): FAILED,
    (Kind.KILL_DESTINATION, Phase.STOP_AND_COPY): FAILED,
    (Kind.KILL_DESTINATION, Phase.RESTORE): FAILED,
    (Kind.KILL_DESTINATION, Phase.COMMIT): IN_DOUBT,
    # The restarted engine rolls back what its journal holds (nothing yet
    # in SETUP: the destination's own record says FAILED); on the commit
    # decision it asks the destination, which never got COMMIT.
    (Kind.KILL_SOURCE, Phase.SETUP): FAILED,
    (Kind.KILL_SOURCE, Phase.PRECOPY): FAILED,
    (Kind.KILL_SOURCE, Phase.STOP_AND_COPY): FAILED,
    (Kind.KILL_SOURCE, Phase.RESTORE): FAILED,
    (Kind.KILL_SOURCE, Phase.COMMIT): FAILED,
    (Kind.REFUSE_DOMID, Phase.SETUP): FAILED,
    (Kind.REFUSE_MEMORY, Phase.SETUP): FAILED,
    # Slower, not broken: the downtime budget holds what is left.
    **{(Kind.SLOW_LINK, phase): DONE for phase in PHASES},
    # Progress is best effort: the migration never waits for the bus.
    **{(Kind.BUS_GONE, phase): DONE for phase in PHASES},
}

CELLS = [
    pytest.param(kind, phase, id=f"{kind.value}-{phase.value}")
    for kind, phase in itertools.product(Kind, PHASES)
    if (kind, phase) not in IMPOSSIBLE
]


def test_every_cell_is_run_or_documented():
    every = set(itertools.product(Kind, PHASES))
    assert set(EXPECTED) | set(IMPOSSIBLE) == every
    assert not set(EXPECTED) & set(IMPOSSIBLE)
    assert len(CELLS) == len(EXPECTED)


@pytest.fixture
def rig(tmp_path):
    rig = Rig(str(tmp_path))
    yield rig
    rig.close()


def check_outcome(rig, domid, uuid, result):
    """The invariant, by the hosts themselves, and the end state that
    says which way it went; returns the end state."""
    end = result.end
    src = rig.source.client
    on_source = src.state_of(domid)
    on_destination = None
    if rig.destination.alive:
        try:
            info = rig.destination.client.domain_info(domid)
        except base.DomainNotFound:
            pass
        else:
            # A squatter of the domid is not the guest.
            if info.uuid == uuid:
                on_destination = info.state
    paused = src.snapshot("paused", domid)
    # Never two running copies, not even for a moment.
    assert overlaps(rig.source.ledger) == []
    if end is DONE:
        assert (on_source, on_destination) == (None, RUNNING)
        resumed = rig.destination.client.snapshot("unpause", domid)
        report = checker.check(paused, resumed)
        assert report.passed, str(report)
    elif end is FAILED:
        assert (on_source, on_destination) == (RUNNING, None)
        if paused is not None:
            # Paused for stop-and-copy, resumed by the rollback as it was.
            report = checker.check(paused, src.snapshot("unpause", domid))
            assert report.passed, str(report)
    else:
        assert end is IN_DOUBT, result
        assert on_source == PAUSED
        assert on_destination != RUNNING
        report = checker.check(paused, src.snapshot("now", domid))
        assert report.passed, str(report)
    return end


@pytest.mark.parametrize("kind, phase", CELLS)
def test_fault(rig, kind, phase):
    src = rig.source.client
    domid = src.create_domain(guest_config(f"guest-{kind.value}"))
    uuid = src.domain_info(domid).uuid
    if kind is Kind.REFUSE_DOMID:
        rig.destination.client.create_empty_domain(
            guest_config("squatter", memory_mb=4), domid
        )
    elif kind is Kind.REFUSE_MEMORY:
        rig.destination.client.create_empty_domain(
            guest_config("hog", memory_mb=84), domid + 1
        )
    result = rig.migrate(domid, Fault(kind, phase))
    assert result.killed is (kind is Kind.KILL_SOURCE), result
    end = check_outcome(rig, domid, uuid, result)
    expected = EXPECTED[kind, phase]
    assert end in (expected if isinstance(expected, set) else {expected}), (
        result
    )
    if result.source is not None and result.source["phase"] == "in_doubt":
        # The source's own record; its restart settled it or kept it.
        assert result.recovered, result
    if kind in (Kind.REFUSE_DOMID, Kind.REFUSE_MEMORY):
        code = "domid-taken" if kind is Kind.REFUSE_DOMID else "memory"
        assert code in result.source["error"].replace("_", "-"), result
