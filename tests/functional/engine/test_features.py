"""Optional PV features a guest uses are refused at SETUP, from the
destination's capability report, before anything moves; never in the
downtime."""

from __future__ import annotations

import dataclasses

from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.xenstore import LocalClient

from .conftest import guest_config


def _running(host, domid):
    return host.domain_info(domid).state == base.DomainState.RUNNING


def test_foreign_xenstore_permission_is_refused_at_setup(
    source, destination, migration
):
    domid = source.create_domain(guest_config())
    # The guest grants domain 7 read access to a node of its own.
    guest = LocalClient(source.xenstore, domid)
    path = f"/local/domain/{domid}/data/shared"
    guest.write(path, b"for dom7")
    guest.set_perms(path, [("n", domid), ("r", 7)])
    assert source.guest_features(domid) == {
        base.GuestFeature.XENSTORE_FOREIGN_PERMS
    }
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, Refused)
    assert m.sender.error.code == "missing-capability"
    assert "xenstore-foreign-perms" in str(m.sender.error)
    assert m.source_events.phases() == ["rollback", "failed"]
    assert _running(source, domid)
    assert not destination.list_domains()


def test_feature_a_destination_can_restore_is_accepted(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    monkeypatch.setattr(
        source,
        "guest_features",
        lambda d: frozenset({base.GuestFeature.GNTTAB_V2}),
    )
    caps = destination.capabilities
    monkeypatch.setattr(
        destination,
        "capabilities",
        lambda: dataclasses.replace(
            caps(), features=frozenset({base.GuestFeature.GNTTAB_V2})
        ),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.DONE, m.sender.error

