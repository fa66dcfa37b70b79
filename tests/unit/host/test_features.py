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
        base.XenstoreNode("/local/domain/5/b", b"", (("n", 0), ("r", 5))),
    )
    assert (
        base.features_of(5, base.EvtchnAbi.TWO_LEVEL, 1, ports[:1], nodes, {0})
        == frozenset()
    )
    assert base.features_of(5, base.EvtchnAbi.FIFO, 2, ports, nodes, {0}) == {
        base.GuestFeature.EVTCHN_FIFO,
        base.GuestFeature.GNTTAB_V2,
        base.GuestFeature.EVTCHN_DOMU_PEER,
    }
    foreign = base.XenstoreNode("/local/domain/5/c", b"", (("n", 5), ("b", 9)))
    assert base.features_of(
        5, base.EvtchnAbi.TWO_LEVEL, 1, (), (foreign,), {0}
    ) == {base.GuestFeature.XENSTORE_FOREIGN_PERMS}


def test_every_third_domain_reach_is_a_feature():
    """What a destination's import refuses for reaching a third domain:
    a guest node readable by every domain, an unbound port offered to a
    third domain, a toolstack node whose ACL names one."""
    cases = {
        "default access": (
            (),
            (base.XenstoreNode("/local/domain/5/a", b"", (("r", 5),)),),
            base.GuestFeature.XENSTORE_FOREIGN_PERMS,
        ),
        "unbound port": (
            (base.EventChannel(3, base.EvtchnType.UNBOUND, remote_domid=7),),
            (),
            base.GuestFeature.EVTCHN_DOMU_PEER,
        ),
        "toolstack node": (
            (),
            (
                base.XenstoreNode(
                    "/local/domain/5/b", b"", (("n", 0), ("r", 9))
                ),
            ),
            base.GuestFeature.XENSTORE_FOREIGN_PERMS,
        ),
        "third owner": (
            (),
            (base.XenstoreNode("/local/domain/5/c", b"", (("n", 9),)),),
            base.GuestFeature.XENSTORE_FOREIGN_PERMS,
        ),
    }
    for name, (ports, nodes, feature) in cases.items():
        uses = base.feature_uses(
            5, base.EvtchnAbi.TWO_LEVEL, 1, ports, nodes, {0}
        )
        assert set(uses) == {feature}, name
    # A backend domain of the guest's devices is no third domain.
    node = base.XenstoreNode("/local/domain/5/d", b"", (("n", 5), ("r", 2)))
    port = base.EventChannel(4, base.EvtchnType.UNBOUND, remote_domid=2)
    assert not base.feature_uses(
        5, base.EvtchnAbi.TWO_LEVEL, 1, (port,), (node,), {0, 2}
    )
