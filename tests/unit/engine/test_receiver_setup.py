"""The destination's SETUP refusal names the host's own reasons."""

from __future__ import annotations

import types

import pytest

from nova_xen_ncm.engine import receiver
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.host import base

REASON = "start the service with LIBXL_DOMID_REUSE_TIMEOUT=0"


def _check(restore: dict, preserve_domid: bool) -> None:
    caps = base.Capabilities(
        host="h",
        hypervisor="Xen 4.17",
        restore=restore,
        preserve_domid=preserve_domid,
    )
    rx = object.__new__(receiver.Receiver)
    rx.host = types.SimpleNamespace(capabilities=lambda: caps)
    setup = types.SimpleNamespace(pv_drivers=False, required=())
    rx._check(setup)


@pytest.mark.parametrize(
    ("reason", "named"),
    [(REASON, REASON), (None, "this host cannot choose domids")],
)
def test_a_host_that_cannot_keep_domids_says_why(reason, named) -> None:
    restore = {item: None for item in base.Item}
    restore[base.Item.DOMID] = reason
    with pytest.raises(Refused, match=f"domid: {named}"):
        _check(restore, preserve_domid=False)
