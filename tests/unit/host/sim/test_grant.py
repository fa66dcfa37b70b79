"""Grant table v1 behaviour against grant_table.h / grant_table.c."""

import numpy as np
import pytest

from nova_xen_ncm.host.sim import grant
from nova_xen_ncm.host.sim.grant import GrantError

from .conftest import empty

GFN = 0x2000


@pytest.fixture
def granter(host):
    d = empty(host, 1)
    host.populate(1, np.array([GFN, GFN + 1], dtype=np.uint64))
    return d


def _flags(d, ref):
    return d.grants.read(ref)[0]


def test_map_checks_type_domid_and_readonly(host, granter):
    g = granter.grants
    g.write(1, grant.GTF_invalid, 0, GFN)
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(1, 1)
    assert e.value.status == grant.GNTST_general_error
    g.write(2, grant.GTF_permit_access, 5, GFN)  # for domain 5
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(1, 2)
    assert e.value.status == grant.GNTST_general_error
    g.write(3, grant.GTF_permit_access | grant.GTF_readonly, 0, GFN)
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(1, 3)  # writable map of a read-only grant
    assert e.value.status == grant.GNTST_general_error
    handle, view = host.hv.grant_map(1, 3, readonly=True)
    assert view.readonly
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(1, g.nr_entries)
    assert e.value.status == grant.GNTST_bad_gntref
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(9, 1)
    assert e.value.status == grant.GNTST_bad_domain
    g.write(4, grant.GTF_permit_access, 0, 0x3000)  # not RAM
    with pytest.raises(GrantError) as e:
        host.hv.grant_map(1, 4)
    assert e.value.status == grant.GNTST_bad_page
    assert _flags(granter, 4) == grant.GTF_permit_access  # pin undone


def test_status_flags_follow_reference_counts(host, granter):
    granter.grants.write(7, grant.GTF_permit_access, 0, GFN)
    h_ro, _ = host.hv.grant_map(1, 7, readonly=True)
    assert _flags(granter, 7) == grant.GTF_permit_access | grant.GTF_reading
    h_w1, _ = host.hv.grant_map(1, 7)
    h_w2, _ = host.hv.grant_map(1, 7)
    rw = grant.GTF_permit_access | grant.GTF_reading | grant.GTF_writing
    assert _flags(granter, 7) == rw
    act = granter.grants.active[7]
    assert (act.readonly_pins, act.writable_pins) == (1, 2)
    host.hv.grant_unmap(h_w1)
    assert _flags(granter, 7) == rw
    host.hv.grant_unmap(h_w2)
    assert _flags(granter, 7) == grant.GTF_permit_access | grant.GTF_reading
    host.hv.grant_unmap(h_ro)
    assert _flags(granter, 7) == grant.GTF_permit_access
    assert 7 not in granter.grants.active
    with pytest.raises(GrantError) as e:
        host.hv.grant_unmap(h_ro)
    assert e.value.status == grant.GNTST_bad_handle


def test_mapping_is_the_granted_page_itself(host, granter):
    granter.grants.write(1, grant.GTF_permit_access, 0, GFN + 1)
    handle, view = host.hv.grant_map(1, 1)
    view[100:104] = b"ring"
    assert bytes(granter.mem.ram[GFN + 1][100:104]) == b"ring"
    granter.mem.ram[GFN + 1][0] = 42
    assert view[0] == 42
    host.hv.grant_unmap(handle)


def test_writable_map_is_log_dirty_tracked(host, granter):
    host.enable_log_dirty(1)
    granter.grants.write(1, grant.GTF_permit_access, 0, GFN)
    handle, _ = host.hv.grant_map(1, 1)
    assert GFN in host.harvest_dirty(1)
    # Still mapped writable: reported again, the backend may write.
    assert GFN in host.harvest_dirty(1)
    host.hv.grant_unmap(handle)
    assert GFN in host.harvest_dirty(1)  # marked at unmap
    assert GFN not in host.harvest_dirty(1)


def test_clear_status_bits():
    frames = np.zeros((2, 4096), dtype=np.uint8)
    g = grant.GrantTable(frames)
    g.write(
        0,
        grant.GTF_permit_access
        | grant.GTF_reading
        | grant.GTF_writing
        | grant.GTF_readonly,
        3,
        9,
    )
    g.clear_status_bits()
    assert g.read(0) == (grant.GTF_permit_access | grant.GTF_readonly, 3, 9)
