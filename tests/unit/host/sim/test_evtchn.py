"""Event channel behaviour against event_channel.h / event_channel.c."""

import errno

import pytest

from nova_xen_ncm.host.base import DOMID_SELF
from nova_xen_ncm.host.base import EvtchnType
from nova_xen_ncm.host.sim import evtchn
from nova_xen_ncm.host.sim.evtchn import HypercallError

from .conftest import empty


def _err(exc_info):
    return exc_info.value.errno


def test_ports_allocated_lowest_free_from_1_and_reused(host):
    d = empty(host, 1)
    ops = host.evtchn
    ports = [ops.bind_ipi(d, 0) for _ in range(4)]
    assert ports == [1, 2, 3, 4]  # port 0 is reserved
    ops.close(d, 2)
    ops.close(d, 3)
    assert ops.bind_ipi(d, 1) == 2
    assert ops.alloc_unbound(d, DOMID_SELF, 0) == 3
    assert ops.bind_virq(d, evtchn.VIRQ_TIMER, 0) == 5


def test_alloc_unbound_for_another_domain_needs_privilege(host):
    d1, d2 = empty(host, 1), empty(host, 2)
    with pytest.raises(HypercallError) as e:
        host.evtchn.alloc_unbound(d1, 2, 0)
    assert _err(e) == errno.EPERM
    # dom0 (the toolstack) may.
    port = host.evtchn.alloc_unbound(host.dom0, 2, 1)
    assert d2.ports[port].remote_domid == 1


def test_bind_interdomain_checks(host):
    d1, d2, d3 = empty(host, 1), empty(host, 2), empty(host, 3)
    ops = host.evtchn
    p2 = ops.alloc_unbound(d2, DOMID_SELF, 1)
    with pytest.raises(HypercallError) as e:
        ops.bind_interdomain(d1, 99, p2)
    assert _err(e) == errno.ESRCH
    with pytest.raises(HypercallError) as e:
        ops.bind_interdomain(d3, 2, p2)  # reserved for domain 1
    assert _err(e) == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        ops.bind_interdomain(d1, 2, p2 + 5)  # not in use
    assert _err(e) == errno.EINVAL
    p1 = ops.bind_interdomain(d1, 2, p2)
    assert d1.ports[p1].type == EvtchnType.INTERDOMAIN
    assert (d2.ports[p2].remote_domid, d2.ports[p2].remote_port) == (1, p1)
    # The new local port is set pending (lost notifications).
    assert ops.status(d1, DOMID_SELF, p1).pending
    with pytest.raises(HypercallError) as e:
        ops.bind_interdomain(d3, 2, p2)  # no longer unbound
    assert _err(e) == errno.EINVAL


def test_check_bindable_refuses_as_bind_interdomain_and_changes_nothing(
    host,
):
    d1, d2, d3 = empty(host, 1), empty(host, 2), empty(host, 3)
    ops = host.evtchn
    p2 = ops.alloc_unbound(d2, DOMID_SELF, 1)
    before = (ops.table(d1), ops.table(d2))
    ops.check_bindable(d1, 2, p2)
    assert (ops.table(d1), ops.table(d2)) == before
    for caller, port in ((d3, p2), (d1, p2 + 5)):
        with pytest.raises(HypercallError) as e:
            ops.check_bindable(caller, 2, port)
        assert _err(e) == errno.EINVAL
    ops.bind_interdomain(d1, 2, p2)
    with pytest.raises(HypercallError, match="not unbound"):
        ops.check_bindable(d1, 2, p2)


def test_bind_virq_checks(host):
    d = empty(host, 1, vcpus=2)
    ops = host.evtchn
    with pytest.raises(HypercallError) as e:
        ops.bind_virq(d, evtchn.NR_VIRQS, 0)
    assert _err(e) == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        ops.bind_virq(d, 3, 1)  # VIRQ_DOM_EXC is global: vCPU 0 only
    assert _err(e) == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        ops.bind_virq(d, evtchn.VIRQ_TIMER, 2)
    assert _err(e) == errno.ENOENT
    ops.bind_virq(d, evtchn.VIRQ_TIMER, 0)
    ops.bind_virq(d, evtchn.VIRQ_TIMER, 1)  # per-vCPU
    with pytest.raises(HypercallError) as e:
        ops.bind_virq(d, evtchn.VIRQ_TIMER, 1)
    assert _err(e) == errno.EEXIST
    with pytest.raises(HypercallError) as e:
        ops.bind_ipi(d, 5)
    assert _err(e) == errno.ENOENT


def test_send_sets_remote_pending_and_upcall(host):
    d1, d2 = empty(host, 1), empty(host, 2)
    ops = host.evtchn
    p2 = ops.alloc_unbound(d2, DOMID_SELF, 1)
    p1 = ops.bind_interdomain(d1, 2, p2)
    assert not ops.status(d2, DOMID_SELF, p2).pending
    ops.send(d1, p1)
    assert ops.status(d2, DOMID_SELF, p2).pending
    vi = d2._vcpu_info(0)
    assert vi[evtchn.VI_UPCALL_PENDING] == 1
    sel = int(vi[8:16].view("<u8")[0])
    assert sel == 1 << (p2 // 64)


def test_masked_event_stays_pending_and_unmask_raises_it(host):
    d = empty(host, 1)
    ops = host.evtchn
    port = ops.bind_ipi(d, 0)
    with d.mem_lock():
        d.bits.test_and_set(evtchn.SHINFO_MASK, port)
    ops.send(d, port)
    st = ops.status(d, DOMID_SELF, port)
    assert st.pending and st.masked
    vi = d._vcpu_info(0)
    assert vi[evtchn.VI_UPCALL_PENDING] == 0  # masked: no upcall
    assert int(vi[8:16].view("<u8")[0]) == 0
    ops.unmask(d, port)
    assert not ops.status(d, DOMID_SELF, port).masked
    assert vi[evtchn.VI_UPCALL_PENDING] == 1
    assert int(vi[8:16].view("<u8")[0]) == 1 << (port // 64)


def test_second_send_while_pending_does_not_kick_again(host):
    d = empty(host, 1)
    kicks = []
    d.kick = kicks.append
    port = host.evtchn.bind_ipi(d, 1)
    host.evtchn.send(d, port)
    host.evtchn.send(d, port)
    assert kicks == [1]


def test_close_unbinds_peer_and_clears_pending(host):
    d1, d2 = empty(host, 1), empty(host, 2)
    ops = host.evtchn
    p2 = ops.alloc_unbound(d2, DOMID_SELF, 1)
    p1 = ops.bind_interdomain(d1, 2, p2)
    assert ops.status(d1, DOMID_SELF, p1).pending
    ops.close(d1, p1)
    st = ops.status(d1, DOMID_SELF, p1)
    assert st.type == EvtchnType.CLOSED and not st.pending
    peer = ops.status(d2, DOMID_SELF, p2)
    assert peer.type == EvtchnType.UNBOUND and peer.remote_domid == 1
    with pytest.raises(HypercallError) as e:
        ops.close(d1, p1)
    assert _err(e) == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        ops.send(d1, 0)
    assert _err(e) == errno.EINVAL


def test_send_on_unbound_is_dropped_and_virq_refused(host):
    d = empty(host, 1)
    ops = host.evtchn
    unbound = ops.alloc_unbound(d, DOMID_SELF, 0)
    ops.send(d, unbound)
    assert not ops.status(d, DOMID_SELF, unbound).pending
    virq = ops.bind_virq(d, evtchn.VIRQ_DEBUG, 0)
    with pytest.raises(HypercallError) as e:
        ops.send(d, virq)
    assert _err(e) == errno.EINVAL


def test_status_of_other_domain_needs_privilege(host):
    d1, d2 = empty(host, 1), empty(host, 2)
    port = host.evtchn.bind_ipi(d2, 0)
    with pytest.raises(HypercallError) as e:
        host.evtchn.status(d1, 2, port)
    assert _err(e) == errno.EPERM
    assert host.evtchn.status(host.dom0, 2, port).type == EvtchnType.IPI


def test_bind_vcpu(host):
    d = empty(host, 1, vcpus=2)
    ops = host.evtchn
    ipi = ops.bind_ipi(d, 0)
    with pytest.raises(HypercallError) as e:
        ops.bind_vcpu(d, ipi, 1)
    assert _err(e) == errno.EINVAL
    unbound = ops.alloc_unbound(d, DOMID_SELF, 0)
    ops.bind_vcpu(d, unbound, 1)
    assert ops.status(d, DOMID_SELF, unbound).vcpu == 1


def test_ports_end_at_the_domains_max_evtchn_port(host):
    d = empty(host, 1)
    ops = host.evtchn
    ports = [ops.bind_ipi(d, 0) for _ in range(evtchn.DEFAULT_MAX_EVTCHN_PORT)]
    assert ports[-1] == evtchn.DEFAULT_MAX_EVTCHN_PORT
    with pytest.raises(HypercallError) as e:
        ops.bind_ipi(d, 0)
    assert _err(e) == errno.ENOSPC


def test_unmask_of_a_free_port_in_a_valid_bucket(host):
    d = empty(host, 1)
    ops = host.evtchn
    port = ops.bind_ipi(d, 0)
    ops.close(d, port)
    with d.mem_lock():
        d.bits.test_and_set(evtchn.SHINFO_MASK, port)
    ops.unmask(d, port)  # free, but in an allocated bucket: valid
    assert not ops.status(d, DOMID_SELF, port).masked
    with pytest.raises(HypercallError) as e:
        ops.unmask(d, evtchn.EVTCHNS_PER_BUCKET + 1)
    assert _err(e) == errno.EINVAL


def test_a_bucket_stays_valid_after_its_ports_close(host):
    """Xen frees no bucket before the domain: unmask of a free port in
    a bucket allocated once succeeds, whatever port_is_valid saw."""
    d = empty(host, 1)
    ops = host.evtchn
    ports = [ops.bind_ipi(d, 0) for _ in range(evtchn.EVTCHNS_PER_BUCKET + 1)]
    high = ports[-1]
    assert high >= evtchn.EVTCHNS_PER_BUCKET
    for port in ports:
        ops.close(d, port)
    with d.mem_lock():
        d.bits.test_and_set(evtchn.SHINFO_MASK, high)
    ops.unmask(d, high)
    assert not ops.status(d, DOMID_SELF, high).masked
