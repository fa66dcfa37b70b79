"""Settling journalled migrations: the rule of each phase, on a fake
host and a fake destination."""

from __future__ import annotations

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import protocol
from nova_xen_ncm.engine import recovery
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base


class FakeHost:
    hostname = "src"

    def __init__(self, state=base.DomainState.PAUSED):
        self.state = state
        self.calls = []

    def domain_info(self, domid):
        if self.state is None:
            raise base.DomainNotFound(f"no domain {domid}")
        return base.DomainInfo(
            domid=domid,
            name="g",
            uuid="u",
            state=self.state,
            memory_bytes=1 << 20,
            vcpus=1,
            pv_drivers=True,
            populated_pages=0,
        )

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "unpause":
                self.state = base.DomainState.RUNNING
            if name == "destroy_domain":
                self.state = None

        return call


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("commit_query_attempts", 2, group="xen_ncm")
    conf.set_override("retry_initial_delay", 0.0, group="xen_ncm")
    return conf


def journalled(tmp_path, phase, running=True):
    j = Journal(str(tmp_path))
    j.write(Entry("m-1", 5, "127.0.0.1", 1, "00" * 16, running, phase.value))
    return j


def answer(phase, committed):
    return lambda entry, conf: protocol.Status(
        phase=phase, committed=committed
    )


def test_before_the_commit_decision_the_source_resumes(tmp_path, conf):
    host = FakeHost()
    j = journalled(tmp_path, Phase.STOP_AND_COPY)
    (o,) = recovery.recover(host, j, conf, query=answer("done", True))
    assert o.phase is Phase.FAILED
    assert "unpause" in host.calls and "destroy_domain" not in host.calls
    assert j.entries() == []


def test_a_guest_paused_before_the_migration_stays_paused(tmp_path, conf):
    host = FakeHost()
    j = journalled(tmp_path, Phase.RESTORE, running=False)
    (o,) = recovery.recover(host, j, conf)
    assert o.phase is Phase.FAILED
    assert "unpause" not in host.calls


def test_a_committed_destination_means_the_source_copy_goes(tmp_path, conf):
    host = FakeHost()
    j = journalled(tmp_path, Phase.COMMIT)
    (o,) = recovery.recover(host, j, conf, query=answer("done", True))
    assert o.phase is Phase.DONE
    assert host.calls == ["destroy_domain"]


def test_a_rolled_back_destination_means_the_source_resumes(tmp_path, conf):
    host = FakeHost()
    j = journalled(tmp_path, Phase.IN_DOUBT)
    (o,) = recovery.recover(host, j, conf, query=answer("failed", False))
    assert o.phase is Phase.FAILED
    assert host.state is base.DomainState.RUNNING


def test_no_answer_keeps_the_guest_paused_and_the_entry(tmp_path, conf):
    host = FakeHost()
    j = journalled(tmp_path, Phase.COMMIT)

    def unreachable(entry, conf):
        raise TransportError("connection refused")

    (o,) = recovery.recover(host, j, conf, query=unreachable)
    assert o.phase is Phase.IN_DOUBT
    assert host.calls == []
    assert [e.phase for e in j.entries()] == ["in_doubt"]
