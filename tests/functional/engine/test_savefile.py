"""Save a simulated guest to a file and restore it elsewhere."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from nova_xen_ncm.engine import savefile
from nova_xen_ncm.engine.restorer import RestoreError
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .conftest import DEVICES
from .conftest import guest_config

XEN_PYTHON = pathlib.Path("/usr/lib/xen-4.17/lib/python")
VERIFY = pathlib.Path("/usr/lib/xen-4.17/bin/verify-stream-v2")


def test_save_and_restore_keeps_the_guest_intact(
    source, destination, tmp_path, monkeypatch
):
    domid = source.create_domain(guest_config(devices=DEVICES))
    seen = {}
    resume_backends = source.resume_backends

    def at_end_of_save(domid):
        # What was saved: the paused guest, its backends still quiesced.
        seen["paused"] = checker.snapshot(source, domid)
        resume_backends(domid)

    monkeypatch.setattr(source, "resume_backends", at_end_of_save)
    path = tmp_path / "guest.save"
    savefile.save_to_path(source, domid, path)
    assert source.domain_info(domid).state == base.DomainState.PAUSED
    source.destroy_domain(domid)

    restored = savefile.restore_from_path(destination, path, unpause=False)
    assert restored == domid
    report = checker.check(
        seen["paused"], checker.snapshot(destination, domid)
    )
    assert report.passed, str(report)
    destination.unpause(domid)
    assert destination.domain_info(domid).state == base.DomainState.RUNNING


def test_xen_compatible_save_of_a_pv_guest_is_refused(source, tmp_path):
    domid = source.create_domain(guest_config())
    with pytest.raises(savefile.SaveError, match="PV"):
        savefile.save_to_path(
            source, domid, tmp_path / "x.save", xen_compatible=True
        )
    assert source.domain_info(domid).state == base.DomainState.RUNNING


def test_pv_guest_keeps_its_domid(source, destination, tmp_path):
    domid = source.create_domain(guest_config())
    path = tmp_path / "guest.save"
    savefile.save_to_path(source, domid, path)
    with pytest.raises(RestoreError, match="cannot become domain"):
        savefile.restore_from_path(destination, path, domid=domid + 1)
    assert destination.list_domains() == []


@pytest.mark.integration
def test_xen_compatible_save_passes_xen_verifier(source, tmp_path):
    if not VERIFY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VERIFY} is missing (xen-utils-4.17)")
        pytest.skip(f"{VERIFY} is not installed")
    config = base.DomainConfig(
        name="plain", memory_bytes=8 << 20, vcpus=1, pv_drivers=False
    )
    domid = source.create_domain(config)
    path = tmp_path / "plain.save"
    savefile.save_to_path(source, domid, path, xen_compatible=True)
    result = subprocess.run(
        [str(VERIFY), "-f", "xl", "-i", str(path), "-v"],
        env=dict(os.environ, PYTHONPATH=str(XEN_PYTHON)),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HVM params" in result.stdout
    # The same stream with the project's records is refused by Xen.
    pv_path = tmp_path / "pv.save"
    pv_domid = source.create_domain(guest_config("pv"))
    savefile.save_to_path(source, pv_domid, pv_path)
    result = subprocess.run(
        [str(VERIFY), "-f", "xl", "-i", str(pv_path)],
        env=dict(os.environ, PYTHONPATH=str(XEN_PYTHON)),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
