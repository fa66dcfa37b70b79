"""base.features_of: the optional PV features named in SETUP."""

from __future__ import annotations

from nova_xen_ncm.host import base


def test_features_of_pv_state():
    ports = (
        base.EventChannel(1, base.EvtchnType.INTERDOMAIN, remote_domid=0),
        base.EventChannel(2, base.EvtchnType.INTERDOMAIN, remote_domid=3),
    )
    nodes = (
        base.XenstoreNode("/local/domain/5/a", b"", (("n", 5), ("r", 0))),
        # dom0's node naming a third domain is the toolstack's doing.
        base.XenstoreNode("/local/domain/5/b", b"", (("n", 0), ("r", 9))),
    )
    assert base.features_of(
        5, base.EvtchnAbi.TWO_LEVEL, 1, ports[:1], nodes, {0}
    ) == frozenset()
    assert base.features_of(
        5, base.EvtchnAbi.FIFO, 2, ports, nodes, {0}
    ) == {
        base.GuestFeature.EVTCHN_FIFO,
        base.GuestFeature.GNTTAB_V2,
        base.GuestFeature.EVTCHN_DOMU_PEER,
    }
    foreign = base.XenstoreNode("/local/domain/5/c", b"", (("n", 5), ("b", 9)))
    assert base.features_of(
        5, base.EvtchnAbi.TWO_LEVEL, 1, (), (foreign,), {0}
    ) == {base.GuestFeature.XENSTORE_FOREIGN_PERMS}
