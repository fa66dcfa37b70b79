"""base.grant_domains reads who each grant entry in use names, from the
raw frames, for v1 and v2 tables alike."""

from __future__ import annotations

import struct

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import PAGE_SIZE


def _table(version: int, entries: dict[int, tuple[int, int]]):
    size = 8 if version == 1 else 16
    frame = bytearray(PAGE_SIZE)
    for ref, (flags, domid) in entries.items():
        struct.pack_into("<HH", frame, ref * size, flags, domid)
    return base.GrantTableState(
        version=version, frame_gfns=(0x1000,), frames=(bytes(frame),)
    )


def test_entries_in_use_and_their_domains():
    for version in (1, 2):
        gt = _table(version, {0: (1, 0), 5: (1 | 4, 7), 9: (0, 3), 11: (3, 2)})
        # Entry 9 is GTF_invalid: not in use, whatever domid it holds.
        assert base.grant_domains(gt) == [(0, 0), (5, 7), (11, 2)]


def test_a_grant_to_a_third_domain_is_a_feature_of_the_guest():
    gt = _table(1, {0: (1, 0), 8: (1, 5), 20: (1, 7)})
    uses = base.feature_uses(
        5,
        base.EvtchnAbi.TWO_LEVEL,
        1,
        (),
        (),
        {0},
        base.grant_domains(gt),
    )
    assert set(uses) == {base.GuestFeature.GNTTAB_FOREIGN_DOMAIN}
    assert (
        "grant reference 20" in uses[base.GuestFeature.GNTTAB_FOREIGN_DOMAIN]
    )
    backends = base.feature_uses(
        5,
        base.EvtchnAbi.TWO_LEVEL,
        1,
        (),
        (),
        {0, 7},
        base.grant_domains(gt),
    )
    assert backends == {}
