"""Forged stream content is refused before anything of it is applied.

Each test takes the stream of a real simulated guest with PV devices,
forges one record, feeds the stream to a Restorer on a fresh destination
and checks the refusal names the rule, and that the destination host did
not change: no xenstore node, no event channel, no populated page came of
the forged record.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
import types

import numpy as np
import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import restorer as restoring
from nova_xen_ncm.engine import savefile
from nova_xen_ncm.engine import validate
from nova_xen_ncm.engine.restorer import RestoreError
from nova_xen_ncm.engine.validate import ForgedContent
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.stream import decoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import ncm

MiB = 1 << 20
CONFIG = base.DomainConfig(
    name="guest",
    memory_bytes=8 * MiB,
    vcpus=2,
    # The same instance on both hosts: its vbd's disk is found by uuid.
    uuid="0b9c6f0e-7d1a-4c3e-9a51-2f0e8d7c6b5a",
    devices=(
        base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
        base.DeviceConfig("vbd", 51712, disk_bytes=1 * MiB),
    ),
    workload={"dirty_rate": MiB},
)


def _conf(disk_dir):
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    # Shared by the module's hosts, as the saved guest's storage.
    conf.set_override("disk_dir", str(disk_dir), group="xen_ncm_sim")
    return conf


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("disks")


@pytest.fixture(scope="module")
def saved(disk_dir):
    """(domid, stream bytes) of a guest with a vif and a vbd."""
    host = SimHost("source", _conf(disk_dir))
    try:
        domid = host.create_domain(CONFIG)
        # The frontends connected: their grants and ports are in the save.
        deadline = time.monotonic() + 30
        while not _connected(host, domid):
            assert time.monotonic() < deadline, "frontends never connected"
            time.sleep(0.01)
        out = io.BytesIO()
        savefile.save(host, domid, out)
    finally:
        host.close()
    host.raise_dom0_errors()
    return domid, out.getvalue()


def _connected(host, domid):
    fronts = host.guest_state(domid).frontends
    return len(fronts) == len(CONFIG.devices) and all(
        f["state"] == 4 for f in fronts.values()
    )


def records(data):
    dec = decoder.Decoder("xl")
    dec.feed(data)
    dec.close()
    return [r for r in dec.records() if r.name != "XL_HEADER"]


@pytest.fixture
def destination(saved, disk_dir):
    host = SimHost("destination", _conf(disk_dir), prelaunch=False)
    host.create_empty_domain(
        dataclasses.replace(CONFIG, devices=(), workload={}), saved[0]
    )
    yield host
    host.close()
    host.raise_dom0_errors()


def snapshot(host, domid):
    """What a forged record could have changed on the destination."""
    dom = host.hv.domains[domid]
    return {
        "xenstore": {
            path: (bytes(node.value), node.perms)
            for path, node in host.xenstore._tree.items()
        },
        "dom0_ports": sorted(host.dom0.ports),
        "guest_ports": sorted(dom.ports),
        "populated": host.populated_pfns(domid).tolist(),
        "grant_frames": dom.grants.nr_frames,
    }


def forge(recs, name, change, index=0):
    """Replace the value of the ``index``-th record ``name``."""
    hits = [i for i, r in enumerate(recs) if r.name == name]
    at = hits[index]
    recs[at] = dataclasses.replace(recs[at], value=change(recs[at].value))
    return at


def refused(saved, host, name, change, match, *, index=0):
    """Apply the stream with one record forged; assert the refusal and
    that the destination stayed as it was just before that record."""
    domid, data = saved
    recs = records(data)
    at = forge(recs, name, change, index)
    restorer = restoring.Restorer(host, domid, pv_drivers=True)
    # PV records are gathered as they come and applied at the end.
    stop = at if name == "PAGE_DATA" else len(recs) - 1
    for record in recs[:stop]:
        restorer.apply(record)
    before = snapshot(host, domid)
    with pytest.raises(ForgedContent, match=match):
        for record in recs[stop:]:
            restorer.apply(record)
    assert snapshot(host, domid) == before
    assert not restorer.done


def test_the_genuine_stream_is_accepted(saved, destination):
    domid, data = saved
    restorer = restoring.Restorer(destination, domid, pv_drivers=True)
    for record in records(data):
        restorer.apply(record)
    assert restorer.done
    assert destination.hv.domains[domid].ports


def test_pfn_beyond_the_guests_memory(saved, destination):
    def change(value):
        pfns = value.pfns.copy()
        pfns[-1] = 0x200000
        return dataclasses.replace(value, pfns=pfns)

    refused(saved, destination, "PAGE_DATA", change, "beyond the guest's")


def test_page_data_counts_that_do_not_match():
    limits = validate.GuestLimits(4, 8 * MiB, 1)
    pfns = np.arange(4, dtype=np.uint64)
    with pytest.raises(ForgedContent, match="4 pfns but 3 types"):
        validate.check_pages(limits, pfns, np.zeros(3, np.uint8), 0, 0)
    with pytest.raises(ForgedContent, match="for 4 pages"):
        validate.check_pages(limits, pfns, np.zeros(4, np.uint8), 4, 4096)
    validate.check_pages(limits, pfns, np.zeros(4, np.uint8), 4, 4 * 4096)


def test_physmap_bound_follows_xen_layout():
    assert validate.physmap_pfns(8 * MiB) == 0xFF000
    # 4 GiB of RAM: 256 MiB of it above 4 GiB.
    assert validate.physmap_pfns(4 << 30) == 0x100000 + 0x10000


def _node_path(path):
    def change(node):
        return dataclasses.replace(node, path=path)

    return change


def test_xenstore_node_outside_the_guests_areas(saved, destination):
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _node_path("/local/domain/0/backend/vif/9/0"),
        "outside the guest's areas",
    )


def test_xenstore_node_in_another_guests_home(saved, destination):
    domid = saved[0]
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _node_path(f"/local/domain/{domid + 1}"),
        "outside the guest's areas",
    )


def _perms(*perms):
    def change(node):
        return dataclasses.replace(
            node, perms=tuple(ncm.XsPerm(p, d) for p, d in perms)
        )

    return change


def test_backend_node_granting_the_guest_write(saved, destination):
    domid = saved[0]
    recs = records(saved[1])
    index = [r.value.path for r in recs if r.name == "NCM_XS_NODE"].index(
        f"/local/domain/0/backend/vif/{domid}/0/state"
    )
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _perms(("n", 0), ("b", domid)),
        "more than read",
        index=index,
    )


def test_node_granting_everybody_access(saved, destination):
    # /local/domain/<domid> is the toolstack's (dom0), read-only for all.
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _perms(("r", 0), ("r", saved[0])),
        "to every domain",
    )


def test_node_granting_an_unrelated_domain(saved, destination):
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _perms(("n", saved[0]), ("r", 9)),
        "grants 'r' to domain 9",
        index=5,
    )


def test_node_owned_by_an_unrelated_domain(saved, destination):
    refused(
        saved,
        destination,
        "NCM_XS_NODE",
        _perms(("n", 9)),
        "owned by domain 9",
        index=5,
    )


def _port_remote(domid, port_type=ncm.EvtchnType.INTERDOMAIN):
    def change(ec):
        ports = ec.ports.copy()
        row = np.flatnonzero(ports["type"] == port_type)[0]
        ports["remote_domid"][row] = domid
        return dataclasses.replace(ec, ports=ports)

    return change


def test_event_channel_bound_to_a_domain_never_bound(saved, destination):
    refused(
        saved,
        destination,
        "NCM_EVENT_CHANNELS",
        _port_remote(9),
        "bound to domain 9, which the guest was not bound to",
    )


def test_event_channel_on_a_vcpu_the_guest_lacks(saved, destination):
    def change(ec):
        ports = ec.ports.copy()
        ports["vcpu"][0] = 5
        return dataclasses.replace(ec, ports=ports)

    refused(saved, destination, "NCM_EVENT_CHANNELS", change, "on vCPU 5")


def test_backend_that_is_another_guest_here(saved, destination):
    other = destination.create_empty_domain(
        dataclasses.replace(
            CONFIG, name="other", uuid=None, devices=(), workload={}
        ),
        saved[0] + 1,
    )

    def change(dom):
        return dataclasses.replace(
            dom, backend_domids=tuple(sorted({*dom.backend_domids, other}))
        )

    refused(
        saved,
        destination,
        "NCM_DOMAIN",
        change,
        f"{other} is another guest on this host",
    )


def test_grant_entry_naming_a_frame_the_guest_does_not_own(saved, destination):
    def change(gt):
        entries = gt.entries.copy()
        used = np.flatnonzero(entries["flags"] & validate.GTF_TYPE_MASK)[0]
        # The first RAM page of the MMIO hole: never populated.
        entries["frame"][used] = validate.MMIO_HOLE_START_PFN + 0x100
        return dataclasses.replace(gt, entries=entries)

    refused(
        saved,
        destination,
        "NCM_GRANT_TABLE",
        change,
        "which the guest does not own",
    )


def test_grant_entry_to_an_unrelated_domain(saved, destination):
    def change(gt):
        entries = gt.entries.copy()
        free = np.flatnonzero(entries["flags"] == 0)[-1]
        entries[free] = (validate.GTF_PERMIT_ACCESS, 9, 0x110)
        return dataclasses.replace(gt, entries=entries)

    refused(saved, destination, "NCM_GRANT_TABLE", change, "to domain 9")


def test_grant_entries_that_do_not_fill_the_frames(saved, destination):
    def change(gt):
        return dataclasses.replace(gt, entries=gt.entries[:-1])

    refused(saved, destination, "NCM_GRANT_TABLE", change, "entries for")


def test_vcpu_info_count_that_does_not_match_the_vcpus(saved, destination):
    def change(si):
        return dataclasses.replace(si, vcpu_info=si.vcpu_info[:1])

    refused(saved, destination, "NCM_SHARED_INFO", change, "2 vCPUs")


def test_vcpu_info_in_a_frame_the_guest_does_not_own(saved, destination):
    def change(si):
        first = dataclasses.replace(si.vcpu_info[0], gfn=0xF0100)
        return dataclasses.replace(si, vcpu_info=(first, *si.vcpu_info[1:]))

    refused(saved, destination, "NCM_SHARED_INFO", change, "does not own")


def test_device_ring_on_a_port_of_another_binding(saved, destination):
    recs = records(saved[1])
    (ec,) = [r.value for r in recs if r.name == "NCM_EVENT_CHANNELS"]
    virq = int(ec.ports["port"][ec.ports["type"] == ncm.EvtchnType.VIRQ][0])

    def change(dev):
        ring = dataclasses.replace(dev.rings[0], frontend_port=virq)
        return dataclasses.replace(dev, rings=(ring, *dev.rings[1:]))

    refused(
        saved,
        destination,
        "NCM_PV_DEVICE",
        change,
        f"port {virq} is not a channel to backend domain 0",
    )


def test_device_backend_area_of_another_domain(saved, destination):
    def change(dev):
        path = dev.backend_path.replace(f"/{saved[0]}/", f"/{saved[0] + 1}/")
        return dataclasses.replace(dev, backend_path=path)

    refused(saved, destination, "NCM_PV_DEVICE", change, "backend area")


def test_xenstore_connection_of_another_domain(saved, destination):
    def change(conn):
        return dataclasses.replace(conn, domid=saved[0] + 1)

    refused(saved, destination, "NCM_XS_CONNECTION", change, "of domain")


def test_page_data_limits_from_the_host(destination, saved):
    limits = validate.GuestLimits.from_host(destination, saved[0])
    assert limits.vcpus == 2
    assert limits.max_pfn == 0xFF000
    pfns = np.array([0xFF000], dtype=np.uint64)
    types = np.full(1, libxc.XALLOC, dtype=np.uint8)
    with pytest.raises(ForgedContent, match="0xff000"):
        validate.check_pages(limits, pfns, types, 0, 0)


def _refused_by_the_host(saved, host, recs, match):
    """The host refuses the PV state before it applies any of it."""
    domid, _ = saved
    restorer = restoring.Restorer(host, domid, pv_drivers=True)
    for record in recs[:-1]:
        restorer.apply(record)
    before = snapshot(host, domid)
    with pytest.raises(RestoreError, match=match):
        restorer.apply(recs[-1])
    assert snapshot(host, domid) == before
    assert not restorer.done


def test_a_ring_grant_not_in_use_is_refused_before_anything(
    saved, destination, monkeypatch
):
    # The stream's validation refuses it too: the host's own check is
    # what is tested here.
    monkeypatch.setattr(
        restoring.validate, "check_pv_records", lambda *args: None
    )
    recs = records(saved[1])

    def change(gt):
        # The frontends' grants to dom0 (their rings) revoked.
        entries = gt.entries.copy()
        entries["flags"][entries["domid"] == 0] = 0
        return dataclasses.replace(gt, entries=entries)

    forge(recs, "NCM_GRANT_TABLE", change)
    _refused_by_the_host(saved, destination, recs, "is not in use")


def test_a_vbd_whose_disk_is_missing_is_refused_before_anything(
    saved, destination, disk_dir
):
    recs = records(saved[1])
    disk = disk_dir / f"{CONFIG.uuid}-51712.disk"
    hidden = disk_dir / "hidden"
    os.rename(disk, hidden)
    try:
        _refused_by_the_host(saved, destination, recs, "cannot be opened")
    finally:
        os.rename(hidden, disk)


@pytest.mark.parametrize(
    "params, match",
    [
        ({39: 0}, "index 39 is not an HVM param"),
        ({1: 0xFF000}, "STORE_PFN 0xff000 is beyond"),
        ({17: 1 << 40}, "CONSOLE_PFN"),
        ({2: 1 << 17}, "STORE_EVTCHN 131072 is not an event channel"),
        ({32: 0xFEFF0, 33: 32}, "32 ioreq server pages"),
    ],
)
def test_hvm_params_naming_what_the_guest_cannot_have(params, match):
    limits = validate.GuestLimits(4, 8 * MiB, 1)
    with pytest.raises(ForgedContent, match=match):
        validate.check_hvm_params(limits, params)


def test_genuine_hvm_params_pass():
    limits = validate.GuestLimits(4, 8 * MiB, 1)
    validate.check_hvm_params(
        limits, {0: 1 << 56 | 0xF3, 1: 0xFEFFF, 2: 3, 32: 0xFEFF0, 33: 8}
    )


def _ring_check(port_binding, backend_port=0):
    """The device ring check alone: ring on port 5, grant ref 0 to dom0."""
    check = object.__new__(validate._PvCheck)
    ring = types.SimpleNamespace(
        frontend_port=5, backend_port=backend_port, ring_refs=(0,)
    )
    entries = np.zeros(
        1, dtype=[("flags", "<u2"), ("domid", "<u2"), ("frame", "<u4")]
    )
    entries[0] = (validate.GTF_PERMIT_ACCESS, 0, 0x100)
    check._ring("NCM_PV_DEVICE vbd/51712", 0, ring, {5: port_binding}, entries)


def test_a_quiesced_backends_port_is_unbound_for_its_domain():
    # A backend quiesced by being unbound from its driver closed its end:
    # the frontend's port waits, unbound for the backend's domain.
    _ring_check((int(ncm.EvtchnType.INTERDOMAIN), 0), backend_port=9)
    _ring_check((int(ncm.EvtchnType.UNBOUND), 0))
    for other, backend_port in (
        ((int(ncm.EvtchnType.UNBOUND), 3), 0),
        ((int(ncm.EvtchnType.VIRQ), 0), 0),
        # A backend port named, but the guest's port is not linked to it.
        ((int(ncm.EvtchnType.UNBOUND), 0), 9),
        # None named for a port the backend holds.
        ((int(ncm.EvtchnType.INTERDOMAIN), 0), 0),
    ):
        with pytest.raises(validate.ForgedContent, match="not a channel to"):
            _ring_check(other, backend_port)
