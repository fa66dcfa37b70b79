"""Save files of domains built by hand on a simulated host (no guest
process runs, so these are fast and deterministic)."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib

import numpy as np
import pytest
import zstandard
from oslo_config import cfg

from nova_xen_ncm.conf import sim as sim_conf
from nova_xen_ncm.engine import savefile
from nova_xen_ncm.engine.restorer import RestoreError
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost
from nova_xen_ncm.stream import decoder
from nova_xen_ncm.stream import libxc
from nova_xen_ncm.stream import xl

DOMID = 9
PFNS = np.array([0, 1, 2, 5, 300], dtype=np.uint64)
PARAMS = {0: 0, 1: 0xFEFFC, 4: 1, 10: 1}


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    sim_conf.register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    return conf


@pytest.fixture
def hosts(conf):
    a, b = SimHost("a", conf), SimHost("b", conf)
    yield a, b
    a.close()
    b.close()
    a.raise_dom0_errors()
    b.raise_dom0_errors()


def build(host: SimHost) -> None:
    """A paused guest without PV drivers: some pages, one of them zero."""
    config = base.DomainConfig(
        name="hand-made",
        memory_bytes=4 << 20,
        vcpus=1,
        pv_drivers=False,
        uuid="5d3f4b0e-1c2a-4f6e-8a9b-0c1d2e3f4a5b",
    )
    host.create_empty_domain(config, DOMID)
    host.populate(DOMID, PFNS)
    with host.map_pages(DOMID, PFNS, writable=True) as mapping:
        for i, page in enumerate(mapping.pages):
            if int(PFNS[i]) != 2:
                page[:] = bytes([i + 1]) * base.PAGE_SIZE
    host.set_hvm_params(DOMID, PARAMS)
    host.set_tsc_info(DOMID, base.TscInfo(2, 1_000_000, 5, 3))


def saved(host: SimHost, **kwargs) -> bytes:
    out = io.BytesIO()
    savefile.save(host, DOMID, out, **kwargs)
    return out.getvalue()


def test_layout_is_what_xl_save_writes(hosts):
    a, _ = hosts
    build(a)
    records = decoder.decode(saved(a, xen_compatible=True), "xl")
    names = [r.name for r in records]
    assert names[:5] == [
        "XL_HEADER",
        "LIBXL_HEADER",
        "LIBXC_CONTEXT",
        "IMAGE_HEADER",
        "DOMAIN_HEADER",
    ]
    assert names[5:] == [
        "STATIC_DATA_END",
        "PAGE_DATA",
        "X86_TSC_INFO",
        "HVM_CONTEXT",
        "HVM_PARAMS",
        "END",
        "END",
    ]
    header = records[0].value
    assert header.stream_v2 and header.json
    assert header.config.endswith(b"}\0")
    config = json.loads(header.config[:-1])
    assert config["c_info"]["name"] == "hand-made"
    assert config["c_info"]["domid"] == DOMID
    assert config["b_info"]["max_memkb"] == 4096
    extra = json.loads(header.extra)[savefile.EXTRA_KEY]
    assert extra == {"domid": DOMID, "pv_drivers": False}


def test_zero_pages_are_allocated_not_sent(hosts):
    a, _ = hosts
    build(a)
    records = decoder.decode(saved(a), "xl")
    (pages,) = [r.value for r in records if r.name == "PAGE_DATA"]
    types = dict(zip(pages.pfns.tolist(), pages.types.tolist(), strict=True))
    assert types[2] == libxc.XALLOC
    assert {t for p, t in types.items() if p != 2} == {libxc.NOTAB}
    contents = {pfn: bytes(data) for pfn, _, data in pages.pages()}
    assert contents[300] == bytes([5]) * base.PAGE_SIZE
    assert set(contents) == {0, 1, 5, 300}


def test_restore_rebuilds_the_domain(hosts):
    a, b = hosts
    build(a)
    image = saved(a)
    domid = savefile.restore(b, io.BytesIO(image), unpause=False)
    assert domid == DOMID
    before, after = a.guest_state(DOMID), b.guest_state(DOMID)
    for item in (base.Item.MEMORY, base.Item.PLATFORM, base.Item.HVM_PARAMS):
        assert before.items[item] == after.items[item], item
    # Set on the source (incarnation 3 + 1), saved, restored here (+ 1):
    # Xen counts the restores.
    assert b.get_tsc_info(DOMID) == base.TscInfo(2, 1_000_000, 5, 5)
    info = b.domain_info(DOMID)
    assert (info.name, info.memory_bytes, info.pv_drivers) == (
        "hand-made",
        4 << 20,
        False,
    )


def test_restore_into_another_domid(hosts):
    a, b = hosts
    build(a)
    domid = savefile.restore(b, io.BytesIO(saved(a)), domid=12, unpause=False)
    assert domid == 12
    assert (
        a.guest_state(DOMID).items[base.Item.MEMORY]
        == b.guest_state(12).items[base.Item.MEMORY]
    )


def test_truncated_file_leaves_nothing_behind(hosts):
    a, b = hosts
    build(a)
    image = saved(a)
    with pytest.raises(RestoreError, match="truncated"):
        savefile.restore(b, io.BytesIO(image[:-24]), unpause=False)
    assert b.list_domains() == []


def test_taken_domid_is_refused(hosts):
    a, b = hosts
    build(a)
    b.create_empty_domain(
        base.DomainConfig(name="occupant", memory_bytes=4 << 20), DOMID
    )
    with pytest.raises(base.DomidInUse):
        savefile.restore(b, io.BytesIO(saved(a)), unpause=False)
    assert b.domain_info(DOMID).name == "occupant"


def test_not_a_save_file(hosts):
    _, b = hosts
    with pytest.raises(RestoreError):
        savefile.restore(b, io.BytesIO(b"\0" * 64))


FIXTURE = pathlib.Path("/work/shared/fixtures/xen-4.17/xl-save-hvm32m.img.zst")


def test_xl_save_image_is_refused_not_half_restored(hosts):
    # Xen's own image carries CPUID/MSR policies this host has no call
    # to apply: the restore says so and leaves nothing behind.
    if not FIXTURE.exists():
        pytest.fail(f"fixture {FIXTURE} is missing")
    _, b = hosts
    with FIXTURE.open("rb") as raw:
        image = zstandard.ZstdDecompressor().stream_reader(raw)
        with pytest.raises(RestoreError, match="X86_CPUID_POLICY"):
            savefile.restore(b, image, domid=5, unpause=False)
    assert b.list_domains() == []


@pytest.mark.parametrize("uuid", ["../../etc/passwd", "not-a-uuid"])
def test_a_save_file_uuid_that_is_not_one_is_refused(uuid):
    # The host names files after the uuid: it is checked before use.
    config = {
        "c_info": {"name": "g", "uuid": uuid},
        "b_info": {"max_memkb": 4096, "max_vcpus": 1},
    }
    header = xl.Header(0, 0, json.dumps(config).encode())
    with pytest.raises(RestoreError, match="is not a UUID"):
        savefile._domain_config(header)
    config["c_info"]["uuid"] = "5D3F4B0E-1C2A-4F6E-8A9B-0C1D2E3F4A5B"
    header = xl.Header(0, 0, json.dumps(config).encode())
    domain, _ = savefile._domain_config(header)
    assert domain.uuid == "5d3f4b0e-1c2a-4f6e-8a9b-0c1d2e3f4a5b"


def test_a_pv_guest_the_host_cannot_restore_is_refused_before_the_pause(
    hosts, monkeypatch
):
    a, _ = hosts
    build(a)
    real_info, caps = a.domain_info, a.capabilities()
    # A running guest with PV drivers, as the host reports it.
    monkeypatch.setattr(
        a,
        "domain_info",
        lambda domid: dataclasses.replace(
            real_info(domid),
            pv_drivers=True,
            state=base.DomainState.RUNNING,
        ),
    )
    restore = dict(caps.restore)
    restore[base.Item.XENSTORE] = "xenstored tells no one the watches"
    monkeypatch.setattr(
        a, "capabilities", lambda: dataclasses.replace(caps, restore=restore)
    )

    def no_pause(domid):
        raise AssertionError("paused before the refusal")

    monkeypatch.setattr(a, "pause", no_pause)
    with pytest.raises(
        savefile.SaveError,
        match="cannot carry PV state: xenstore: xenstored tells",
    ):
        saved(a)


def test_a_directly_booted_kernel_is_part_of_the_restored_machine():
    # libxl starts QEMU with -kernel/-initrd/-append from b_info; the
    # saved device state has the fw_cfg device that only exists then.
    config = {
        "c_info": {"name": "g"},
        "b_info": {
            "max_memkb": 262144,
            "max_vcpus": 2,
            "kernel": "/boot/vmlinuz",
            "ramdisk": "/rig/initrd.gz",
            "cmdline": "console=ttyS0 nopv",
        },
    }
    header = xl.Header(0, 0, json.dumps(config).encode())
    domain, _ = savefile._domain_config(header)
    assert domain.boot == base.DirectBoot(
        "/boot/vmlinuz", "/rig/initrd.gz", "console=ttyS0 nopv"
    )
    del config["b_info"]["kernel"]
    header = xl.Header(0, 0, json.dumps(config).encode())
    assert savefile._domain_config(header)[0].boot is None
    config["b_info"]["kernel"] = ["/boot/vmlinuz"]
    header = xl.Header(0, 0, json.dumps(config).encode())
    with pytest.raises(RestoreError, match="kernel .* is not a string"):
        savefile._domain_config(header)


def test_a_running_guest_is_paused_as_for_a_save(hosts, monkeypatch):
    a, _ = hosts
    build(a)
    real_info = a.domain_info
    # Running, as the host reports it (the hand-made guest has no kernel
    # to run; it stays paused underneath).
    monkeypatch.setattr(
        a,
        "domain_info",
        lambda domid: dataclasses.replace(
            real_info(domid), state=base.DomainState.RUNNING
        ),
    )
    paused = []

    def plain_pause(domid):
        raise AssertionError("paused plainly for a save")

    # Not a plain pause: on a Xen host that could leave a vCPU's I/O
    # request to the device model in flight.
    monkeypatch.setattr(a, "pause", plain_pause)
    monkeypatch.setattr(a, "pause_for_save", paused.append)
    assert saved(a)
    assert paused == [DOMID]
