"""A source engine killed after COMMIT went out: its restart asks the
destination and destroys the source copy, since the guest runs there;
and one that cannot ask keeps the guest paused, IN_DOUBT, until it can."""

from __future__ import annotations

from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .rig import Fault
from .rig import Kind
from .rig import Rig
from .rig import guest_config


def test_restart_after_commit_destroys_the_source_copy(tmp_path):
    rig = Rig(str(tmp_path))
    try:
        src, dst = rig.source.client, rig.destination.client
        domid = src.create_domain(guest_config("committed"))
        result = rig.migrate(
            domid, Fault(Kind.KILL_SOURCE, Phase.COMMIT, True)
        )
        assert result.killed
        assert result.destination[0] == Phase.DONE.value, result
        (outcome,) = result.recovered
        assert outcome["journalled"] == Phase.COMMIT.value
        assert outcome["phase"] == Phase.DONE.value, outcome
        assert "destroyed" in outcome["reason"]
        assert src.state_of(domid) is None
        assert dst.state_of(domid) == base.DomainState.RUNNING
        report = checker.check(
            src.snapshot("paused", domid), dst.snapshot("unpause", domid)
        )
        assert report.passed, str(report)
        assert Journal(rig.state_path).entries() == []
    finally:
        rig.close()


def test_restart_without_an_answer_keeps_the_guest_paused(tmp_path):
    rig = Rig(str(tmp_path))
    try:
        src = rig.source.client
        domid = src.create_domain(guest_config("in-doubt"))
        result = rig.migrate(domid, Fault(Kind.KILL_DESTINATION, Phase.COMMIT))
        assert result.source["phase"] == Phase.IN_DOUBT.value
        assert result.end is Phase.IN_DOUBT
        assert src.state_of(domid) == base.DomainState.PAUSED
        # Kept for a later attempt, which still cannot know.
        (entry,) = Journal(rig.state_path).entries()
        assert entry.phase == Phase.IN_DOUBT.value
        # Who the guest is, for when its domain is gone (dom0 reboot).
        assert entry.uuid and entry.uuid == src.domain_info(domid).uuid
        (again,) = rig.recover()
        assert again["phase"] == Phase.IN_DOUBT.value
        assert src.state_of(domid) == base.DomainState.PAUSED
    finally:
        rig.close()
