"""Optional PV features a guest uses are refused at SETUP, from the
destination's capability report, before anything moves; never in the
downtime."""

from __future__ import annotations

import dataclasses

import pytest

from nova_xen_ncm.engine.errors import DevicesChanged
from nova_xen_ncm.engine.errors import FeaturesChanged
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.xenstore import LocalClient

from .conftest import DEVICES
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


def _guest_default_read(source, domid):
    guest = LocalClient(source.xenstore, domid)
    path = f"/local/domain/{domid}/data/public"
    guest.write(path, b"for everyone")
    guest.set_perms(path, [("r", domid)])


def _unbound_for_third_domain(source, domid):
    # The guest offers a port to domain 7 (a vchan server, say).
    dom = source.hv.domains[domid]
    source.evtchn.alloc_unbound(dom, base.DOMID_SELF, 7)


def _toolstack_node_for_third_domain(source, domid):
    dom0 = LocalClient(source.xenstore)
    path = f"/local/domain/{domid}/shared-with-dom7"
    dom0.write(path, b"")
    dom0.set_perms(path, [("n", 0), ("r", 7)])


def _grant_to_third_domain(source, domid):
    # The guest shares a page of its RAM with domain 7.
    gfn = int(source.populated_pfns(domid)[0x100])
    source.guest_command(
        domid, "grant_access", ref=20, domid=7, gfn=gfn, readonly=True
    )


THIRD_DOMAIN = {
    "grant to a third domain": (
        _grant_to_third_domain,
        base.GuestFeature.GNTTAB_FOREIGN_DOMAIN,
    ),
    "guest node readable by all": (
        _guest_default_read,
        base.GuestFeature.XENSTORE_FOREIGN_PERMS,
    ),
    "unbound port for a third domain": (
        _unbound_for_third_domain,
        base.GuestFeature.EVTCHN_DOMU_PEER,
    ),
    "toolstack node naming a third domain": (
        _toolstack_node_for_third_domain,
        base.GuestFeature.XENSTORE_FOREIGN_PERMS,
    ),
}


@pytest.mark.parametrize("case", sorted(THIRD_DOMAIN))
def test_what_the_import_refuses_is_refused_at_setup(
    source, destination, migration, case
):
    make, feature = THIRD_DOMAIN[case]
    domid = source.create_domain(guest_config())
    make(source, domid)
    assert source.guest_features(domid) == {feature}
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, Refused), m.sender.error
    assert feature.value in str(m.sender.error)
    assert "stop_and_copy" not in m.source_events.phases()
    assert _running(source, domid)
    assert not destination.list_domains()


@pytest.mark.parametrize("case", sorted(THIRD_DOMAIN))
def test_the_import_refuses_by_the_same_predicate(source, destination, case):
    """The destination's import refuses the same state, naming the
    feature SETUP names: one predicate (base.feature_uses)."""
    make, feature = THIRD_DOMAIN[case]
    domid = source.create_domain(guest_config())
    make(source, domid)
    info = source.domain_info(domid)
    source.pause(domid)
    source.quiesce_backends(domid)
    destination.create_empty_domain(
        base.DomainConfig(
            name=info.name,
            memory_bytes=info.memory_bytes,
            vcpus=info.vcpus,
            uuid=info.uuid,
        ),
        domid,
    )
    pfns = source.populated_pfns(domid)
    destination.populate(domid, pfns)
    state = source.export_pv_state(domid)
    with pytest.raises(base.NotSupported, match=feature.value):
        destination.import_pv_state(domid, state)
    assert not destination.xenstore.is_introduced(domid)


def test_feature_started_during_precopy_rolls_back_before_export(
    source, destination, migration, monkeypatch
):
    domid = source.create_domain(guest_config())
    harvest = source.harvest_dirty
    exported = []

    def harvest_then_use(d):
        if not exported:
            # The guest starts using a feature while pre-copy runs.
            _unbound_for_third_domain(source, d)
            exported.append(False)
        return harvest(d)

    export = source.export_pv_state
    monkeypatch.setattr(source, "harvest_dirty", harvest_then_use)
    monkeypatch.setattr(
        source,
        "export_pv_state",
        lambda d: exported.append(True) or export(d),
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, FeaturesChanged), m.sender.error
    assert "evtchn-domu-peer" in str(m.sender.error)
    assert True not in exported
    assert _running(source, domid)
    assert not destination.list_domains()


def test_a_domid_the_destination_released_recently_is_refused_at_setup(
    source, destination, migration
):
    domid = source.create_domain(guest_config())
    destination.create_empty_domain(guest_config("earlier"), domid)
    destination.destroy_domain(domid)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, Refused), m.sender.error
    assert m.sender.error.code == "domid-taken"
    assert "recently used" in str(m.sender.error)
    assert _running(source, domid)


def test_multi_queue_switch_during_precopy_abandons_before_the_pause(
    source, destination, migration, monkeypatch
):
    """A frontend that reconnects with several queues while pre-copy
    runs is found before the pause: the guest is never paused, runs on
    the source, and the error names the device and why."""
    domid = source.create_domain(guest_config(devices=DEVICES))
    harvest = source.harvest_dirty
    switched = []

    def harvest_then_switch(d):
        if not switched:
            # netfront reconnects with two queues (the guest's doing).
            guest = LocalClient(source.xenstore, d)
            guest.write(
                f"/local/domain/{d}/device/vif/0/multi-queue-num-queues", b"2"
            )
            switched.append(True)
        return harvest(d)

    paused = []
    pause = source.pause_for_save
    monkeypatch.setattr(source, "harvest_dirty", harvest_then_switch)
    monkeypatch.setattr(
        source, "pause_for_save", lambda d: paused.append(d) or pause(d)
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert switched
    assert isinstance(m.sender.error, DevicesChanged), m.sender.error
    assert "vif 0" in str(m.sender.error)
    assert "2 queues" in str(m.sender.error)
    assert not paused
    assert "stop_and_copy" not in m.source_events.phases()
    assert _running(source, domid)
    assert not destination.list_domains()


def test_multi_queue_frontend_is_refused_at_setup(
    conf, source, destination, migration
):
    # Refused before it connects: the destination waits no longer.
    conf.set_override("accept_timeout", 2.0, group="xen_ncm")
    domid = source.create_domain(guest_config(devices=DEVICES))
    guest = LocalClient(source.xenstore, domid)
    guest.write(
        f"/local/domain/{domid}/device/vif/0/multi-queue-num-queues", b"4"
    )
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, Refused), m.sender.error
    assert m.sender.error.code == "missing-capability"
    assert "vif 0: its frontend uses 4 queues" in str(m.sender.error)
    assert _running(source, domid)
    assert not destination.list_domains()


def test_a_switch_after_the_check_rolls_back_with_the_guest_running(
    source, destination, migration, monkeypatch
):
    """A frontend that switches between the pre-pause check and the
    pause is refused by the export in the downtime: the migration rolls
    back, the guest runs on the source again and the destination keeps
    nothing."""
    domid = source.create_domain(guest_config(devices=DEVICES))
    pause = source.pause_for_save

    def switch_then_pause(d):
        guest = LocalClient(source.xenstore, d)
        guest.write(
            f"/local/domain/{d}/device/vif/0/multi-queue-num-queues", b"2"
        )
        pause(d)

    monkeypatch.setattr(source, "pause_for_save", switch_then_pause)
    m = migration(source, domid, destination)
    assert m.run() is Phase.FAILED
    assert isinstance(m.sender.error, base.NotSupported), m.sender.error
    assert "vif 0: its frontend uses 2 queues" in str(m.sender.error)
    assert "stop_and_copy" in m.source_events.phases()
    assert _running(source, domid)
    assert not destination.list_domains()
