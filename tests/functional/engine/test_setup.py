"""Refusals in setup: nothing moves, the guest runs on."""

from __future__ import annotations

import dataclasses

import pytest

from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base

from .conftest import guest_config


def running(host, domid):
    return host.domain_info(domid).state == base.DomainState.RUNNING


def test_wrong_token_is_refused(conf, source, destination, migration):
    # A wrong proof does not end the destination's wait (anyone may know
    # the migration id): it waits for the source until accept_timeout,
    # then fails naming the refusal.
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    m.sender.data.token = handshake.generate_token()
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, (Refused, AuthenticationError))
    assert m.receiver.state.phase is Phase.FAILED
    assert "wrong token proof" in str(m.receiver.error)
    assert m.source_events.phases() == ["rollback", "failed"]
    assert running(source, domid)
    assert destination.list_domains() == []


def test_missing_capability_is_refused(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    caps = destination.capabilities()
    restore = dict(caps.restore)
    restore[base.Item.EVENT_CHANNELS] = "VIRQ bindings cannot be restored"
    monkeypatch.setattr(
        destination,
        "capabilities",
        lambda: base.Capabilities(
            host=caps.host, hypervisor=caps.hypervisor, restore=restore
        ),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "VIRQ bindings cannot be restored" in m.sender.error.text
    assert running(source, domid)
    assert destination.list_domains() == []


@pytest.mark.parametrize(
    ("side", "definition", "named"),
    [
        # A destination whose memory digest is defined otherwise.
        ("destination", "xxh3-128-of-the-whole-physmap", "destination as"),
        # A source of a release that names no definition.
        ("source", "", "source digests memory as an earlier release"),
    ],
)
def test_a_peer_that_digests_memory_otherwise_is_refused_at_setup(
    source, destination, migration, monkeypatch, side, definition, named
):
    """Equal memory digested two ways compares unequal: refused at SETUP
    (nothing moved), not a mismatch in the downtime."""
    domid = source.create_domain(guest_config())
    host = source if side == "source" else destination
    caps = host.capabilities
    monkeypatch.setattr(
        host,
        "capabilities",
        lambda: dataclasses.replace(caps(), memory_digest=definition),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert m.sender.error.code == "missing-capability"
    assert "memory-digest" in m.sender.error.text
    assert named in m.sender.error.text
    assert m.source_events.phases() == ["rollback", "failed"]
    assert running(source, domid)
    assert destination.list_domains() == []
    assert m.sender.stats.to_dict()["pages_sent"] == 0
