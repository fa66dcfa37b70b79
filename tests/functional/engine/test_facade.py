"""The orchestrator's view: both sides in threads, cancel from a third."""

from __future__ import annotations

import threading
import uuid

import pytest

from nova_xen_ncm.engine import migration
from nova_xen_ncm.engine import policy
from nova_xen_ncm.engine.migration import IncomingMigration
from nova_xen_ncm.engine.migration import OutgoingMigration
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import Recorder
from .conftest import guest_config


def test_both_sides_in_threads(conf, source, destination):
    domid = source.create_domain(guest_config())
    migration_id = str(uuid.uuid4())
    incoming = IncomingMigration(
        destination, migration_id, conf=conf, advertise="127.0.0.1"
    )
    incoming.start()
    outgoing = OutgoingMigration(
        source,
        domid,
        incoming.endpoint,
        migration_id,
        incoming.token,
        conf=conf,
    )
    outgoing.start()
    assert outgoing.wait() is Phase.DONE, outgoing.error
    assert incoming.wait() is Phase.DONE
    assert destination.domain_info(domid).state == base.DomainState.RUNNING
    assert outgoing.stats.to_dict()["pages_sent"] > 0


def test_cancel_from_the_orchestrator(conf, source, destination):
    domid = source.create_domain(guest_config())
    migration_id = str(uuid.uuid4())
    first_round = threading.Event()
    # Set on the first round, or on a failure before it.
    sink = Recorder(
        {
            ("round", "precopy"): lambda e: first_round.set(),
            ("state", "rollback"): lambda e: first_round.set(),
        }
    )
    incoming = IncomingMigration(destination, migration_id, conf=conf)
    incoming.start()
    outgoing = OutgoingMigration(
        source,
        domid,
        incoming.endpoint,
        migration_id,
        incoming.token,
        conf=conf,
        policy=lambda stats: policy.Decision(policy.Action.CONTINUE),
        sinks=[sink],
    )
    outgoing.start()
    first_round.wait()
    assert outgoing.cancel() is True
    assert outgoing.wait() is Phase.CANCELLED
    assert incoming.wait() is Phase.CANCELLED
    assert source.domain_info(domid).state == base.DomainState.RUNNING
    assert destination.list_domains() == []


def test_cancel_an_incoming_migration_nobody_connected_to(conf, destination):
    incoming = IncomingMigration(destination, str(uuid.uuid4()), conf=conf)
    incoming.start()
    assert incoming.cancel("interrupted") is True
    assert incoming.wait(20.0) is Phase.CANCELLED
    assert str(incoming.receiver.error) == "interrupted"
    assert destination.list_domains() == []


def test_a_defect_in_a_side_is_raised_by_wait():
    def broken() -> Phase:
        raise RuntimeError("defect")

    runner = migration._Runner("broken", broken)
    runner.start()
    with pytest.raises(RuntimeError, match="defect"):
        runner.wait(20.0)
