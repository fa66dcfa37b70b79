"""The rig's hosts run in processes of their own: what fails in their
dom0 services or simulated hypervisor is raised by the rig when it
closes, as the in-process fixtures raise theirs."""

from __future__ import annotations

import pytest

from nova_xen_ncm.host import base

from .rig import Rig
from .rig import RigDom0Error
from .rig import guest_config


def test_a_child_hosts_simulator_error_is_raised_at_close(tmp_path):
    rig = Rig(str(tmp_path))
    closed = False
    try:
        src = rig.source.client
        domid = src.create_domain(guest_config("sim-error"))
        assert rig.source.dom0_errors() == []
        # A malformed hypercall from the guest: the handler raises a
        # TypeError, which the child's hypervisor keeps as a SimError.
        with pytest.raises(base.HostError, match="simulator error"):
            src._request(
                "guest_command",
                domid,
                "hypercall",
                {"op": "evtchn_close", "args": {"prt": 1}},
            )
        (line,) = rig.source.dom0_errors()
        assert "SimError" in line and "evtchn_close" in line
        closed = True
        with pytest.raises(RigDom0Error, match="source: SimError"):
            rig.close()
    finally:
        if not closed:
            rig.close()
