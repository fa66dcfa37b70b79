"""The patched rig test's reading of a guest's death during a live save:
only the emulator's signature, of the guest being saved, during the
save, lets it boot the guest again."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

_TIER = Path(__file__).resolve().parents[3] / "xen"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, _TIER / filename)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        # Its tier's marks are registered by that tier's conftest only.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


patched = _load("_rig_patched", "test_xen_patched.py")
# The rig fixture's class: its judgement of Xen's dump, which the
# patched and the stock tiers share.
XenRig = _load("_rig_conftest", "conftest.py").XenRig

REFUSED = (
    "InPlaceError: domain 5 is crashed during the save: a guest that "
    "stopped running is not saved; it is left as it is"
)


def _dump(vcpu: str, cs: str, rip: str, context: str) -> str:
    return (
        f"(XEN) {vcpu} Triple fault - invoking HVM shutdown action 1\n"
        f"(XEN) *** Dumping {vcpu} state: ***\n"
        "(XEN) ----[ Xen-4.17.0  x86_64  debug=n  Not tainted ]----\n"
        "(XEN) CPU:    1\n"
        f"(XEN) RIP:    {cs}:[<{rip}>]\n"
        f"(XEN) RFLAGS: 0000000000010002   CONTEXT: {context}\n"
        "(XEN) rax: 000000017d21a000   rbx: ffff888003a1c000\n"
    )


HOST_STATE = _dump("d5v0", "e008", "ffff82d040204505", "hvm guest (d5v0)")
GUEST_STATE = _dump("d5v0", "0010", "ffffffff81a0b2c3", "hvm guest (d5v0)")
XEN_WARN = (
    "(XEN) Xen WARN at p2m.c:123\n"
    "(XEN) RIP:    e008:[<ffff82d040301122>] p2m_foo+0x12/0x40\n"
    "(XEN) RFLAGS: 0000000000010202   CONTEXT: hypervisor (d0v1)\n"
)
PANIC = (
    "BUG: #DF stack guard page was hit at 00000000c1a2b3c4\n"
    "RIP: 0010:error_entry+0x12/0x100\n"
    "Kernel panic - not syncing: Fatal exception in interrupt\n"
)
OOPS = (
    "BUG: unable to handle page fault for address: ffff888012345000\n"
    "Kernel panic - not syncing: Fatal exception\n"
)


def _evidence(dmesg: str, console: str = "") -> str:
    return f"== xl list\n== xl dmesg\n{dmesg}== console\n{console}"


@pytest.mark.parametrize(
    ("refusal", "evidence", "emulator"),
    [
        (REFUSED, _evidence(HOST_STATE), True),
        (REFUSED, _evidence("", PANIC), True),
        # Stopped before the save (running after a restore): Xen's dump
        # of host state counts, a panic does not; failing otherwise is
        # the product's.
        (REFUSED.replace("during", "before"), _evidence(HOST_STATE), True),
        (REFUSED.replace("during", "before"), _evidence("", PANIC), False),
        (REFUSED.replace("during", "before"), _evidence(GUEST_STATE), False),
        (
            "HostError: xc_map_foreign_bulk failed",
            _evidence(HOST_STATE),
            False,
        ),
        # Another domain's fault (a guest of an earlier attempt).
        (REFUSED, _evidence(HOST_STATE.replace("d5v0", "d4v0")), False),
        # A triple fault in the guest's own code, then a Xen WARN's dump.
        (REFUSED, _evidence(GUEST_STATE + XEN_WARN), False),
        # A panic of another kind, or a panic before the save began
        # (not in what the console printed since).
        (REFUSED, _evidence("", OOPS), False),
        (REFUSED, PANIC + _evidence(""), False),
    ],
)
def test_only_the_emulators_signature_boots_the_guest_again(
    refusal: str, evidence: str, emulator: bool
) -> None:
    assert patched._emulator_fault(XenRig, refusal, evidence) is emulator


def test_only_whole_verdict_lines_are_ticks() -> None:
    # The pty cuts lines around a restore: a line cut before its
    # verdict is no tick; a whole one keeps its fields.
    log = (
        "NCM tick=1 domid=3 verdict=PASS\r\n"
        "NCM tick=2 domid=3 ver\n"
        "NCM tick=3 domid=3 mem=ok\n"
        "NCM tick=5 domid=3 mem=ok verdict=FAIL reasons=mem bad\n"
        "NCM start vcpus=2\n"
    )
    assert XenRig.whole_ticks(log) == [
        {"tick": "1", "domid": "3", "verdict": "PASS"},
        {"tick": "5", "domid": "3", "mem": "ok", "verdict": "FAIL"},
    ]
