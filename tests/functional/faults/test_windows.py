"""The windows that matter for exactly one running copy: messages of the
commit lost on the wire, an engine killed with its host and guests left
alive, and partitions that silently stop forwarding (rig.Window).

Each cell ends with the guest running on exactly one host and the
transparency checker passing, or paused on the source with IN_DOUBT
reported and then settled by ``recover`` once the cause is gone. The
options are the rig's, the same on both sides.
"""

from __future__ import annotations

import pytest

from nova_xen_ncm.engine.state import Phase

from .rig import Fault
from .rig import Kind
from .rig import Rig
from .rig import Window
from .rig import guest_config
from .test_matrix import DONE
from .test_matrix import FAILED
from .test_matrix import IN_DOUBT
from .test_matrix import check_outcome

#: The recorded end state of each window (a set where timing decides).
EXPECTED = {
    # The source hears nothing, asks, and the destination, which gave
    # up waiting for COMMIT and destroyed its copy, says so: it resumes.
    Window.COMMIT_LOST: {FAILED},
    # The source asks and learns the guest runs there.
    Window.COMMITTED_LOST: {DONE},
    # Nothing left to decide; the destination keeps its answer.
    Window.FINISHED_LOST: {DONE},
    # The source cannot know until the destination's engine restarts:
    # IN_DOUBT, then settled (the restart completes the commit).
    Window.DEST_ENGINE_BEFORE_UNPAUSE: {DONE},
    Window.DEST_ENGINE_AFTER_UNPAUSE: {DONE},
    # Journalled CLEANUP: the restart destroys the source copy.
    Window.SOURCE_KILLED_CLEANUP: {DONE},
    # A stalled connection is resumed on a new one, or the round's
    # budget runs out and both sides roll back.
    Window.PARTITION_CONTROL: {DONE, FAILED},
    Window.PARTITION_DATA: {DONE, FAILED},
    # COMMIT went into the partition: IN_DOUBT until it heals, then the
    # destination's answer (it never got COMMIT) settles it.
    Window.PARTITION_AT_COMMIT: {FAILED},
}

#: Seconds a restarted destination engine answers commit queries.
ANSWER_FOR = 15.0


@pytest.fixture
def rig(tmp_path):
    rig = Rig(str(tmp_path))
    yield rig
    rig.close()


def test_every_window_has_an_expectation():
    assert set(EXPECTED) == set(Window)


@pytest.mark.parametrize("window", list(Window), ids=lambda w: w.value)
def test_window(rig, window):
    src = rig.source.client
    domid = src.create_domain(guest_config(f"guest-{window.value}"))
    uuid = src.domain_info(domid).uuid
    result = rig.migrate(domid, Fault(window, Phase.COMMIT))
    if window in (
        Window.DEST_ENGINE_BEFORE_UNPAUSE,
        Window.DEST_ENGINE_AFTER_UNPAUSE,
    ):
        assert result.destination == ("killed", ""), result
        # Until the destination engine is back, nobody can tell.
        assert result.end is IN_DOUBT, result
        assert src.state_of(domid).value == "paused"
        restarted = rig.destination.client.restart_engine(ANSWER_FOR)
        assert [o["phase"] for o in restarted] == ["done"], restarted
        result.recovered = rig.recover()
    elif window is Window.PARTITION_AT_COMMIT:
        assert result.end is IN_DOUBT, result
        rig.proxy.heal()
        # Long past its query window, the destination engine, never
        # restarted, still answers: the late source learns the outcome.
        result.recovered = rig.recover()
        assert rig.destination.client.incoming() == [], "not acknowledged"
    elif window is Window.SOURCE_KILLED_CLEANUP:
        assert result.killed, result
    elif window is Window.FINISHED_LOST:
        assert result.end is DONE, result
        # The acknowledgement never came: the destination's answer
        # outlives its engine, and a restart settles it as the running
        # copy without touching the guest (checked just below).
        (restarted,) = rig.destination.client.restart_engine(0.5)
        assert restarted["role"] == "destination", restarted
        assert (restarted["journalled"], restarted["phase"]) == (
            "done",
            "done",
        ), restarted
        # The source recorded the outcome before it sent FINISHED: it
        # has nothing left to settle.
        assert rig.recover() == [], "the source kept an entry"
    end = check_outcome(rig, domid, uuid, result)
    assert end in EXPECTED[window], result
    incoming = rig.destination.client.incoming()
    if window is Window.FINISHED_LOST:
        # Never acknowledged: the destination keeps its answer.
        assert incoming == ["done"], incoming
    elif window is Window.COMMITTED_LOST:
        # Acknowledged on the query path: forgotten.
        assert incoming == [], incoming


def test_source_killed_once_commit_went_out(rig):
    # The source engine dies with COMMIT on the wire and COMMITTED on
    # its way back: the destination runs the guest; the restarted
    # source learns it by the commit query and destroys its copy.
    src = rig.source.client
    domid = src.create_domain(guest_config("guest-killed-after-commit"))
    uuid = src.domain_info(domid).uuid
    result = rig.migrate(
        domid, Fault(Kind.KILL_SOURCE, Phase.COMMIT, after_commit_sent=True)
    )
    assert result.killed, result
    (recovered,) = result.recovered
    assert (recovered["journalled"], recovered["phase"]) == (
        "commit",
        "done",
    ), recovered
    assert check_outcome(rig, domid, uuid, result) is DONE
    # Acknowledged by the restarted source: the destination forgot.
    assert rig.destination.client.incoming() == []


def test_source_killed_with_its_commit_record_not_yet_synced(rig):
    # The source's COMMIT is appended before COMMIT goes and synced while
    # it travels; the engine dies before that sync: the restarted engine
    # reads the append (the kernel kept it), asks, and destroys its copy
    # (one running copy, on the destination). Without the append it
    # would resume its copy after the destination's lease: two copies.
    src = rig.source.client
    domid = src.create_domain(guest_config("guest-killed-commit-unsynced"))
    uuid = src.domain_info(domid).uuid
    result = rig.migrate(
        domid,
        Fault(
            Kind.KILL_SOURCE,
            Phase.COMMIT,
            after_commit_sent=True,
            commit_unsynced=True,
        ),
    )
    assert result.killed, result
    (recovered,) = result.recovered
    assert (recovered["journalled"], recovered["phase"]) == (
        "commit",
        "done",
    ), recovered
    assert check_outcome(rig, domid, uuid, result) is DONE
    assert rig.destination.client.incoming() == []
