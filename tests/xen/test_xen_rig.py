"""The rig's dom0 runs Xen 4.17 and can create, save and restore an HVM
guest with ``xl``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import XenRig

pytestmark = [pytest.mark.xen, pytest.mark.timeout(3600)]

# The smallest HVM guest: hvmloader and SeaBIOS only, no disk, no network.
SMALL_GUEST = """\
name = "small"
type = "hvm"
memory = 32
vcpus = 1
vga = "none"
serial = "pty"
vif = []
disk = []
"""


def xl_info(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def domains(xl_list: str) -> list[str]:
    return [line.split()[0] for line in xl_list.splitlines()[1:] if line]


def test_xen_417_create_save_restore(xen_rig: XenRig) -> None:
    info = xen_rig.run("xl info")
    assert info.returncode == 0, info.stderr
    fields = xl_info(info.stdout)
    assert (fields["xen_major"], fields["xen_minor"]) == ("4", "17")
    assert "hvm" in fields["virt_caps"].split()

    config = xen_rig.run(
        f"cat > /tmp/small.cfg <<'CFG'\n{SMALL_GUEST}CFG\n"
        "xl destroy small 2>/dev/null; rm -f /tmp/small.save; true"
    )
    assert config.returncode == 0, config.stderr
    try:
        created = xen_rig.run("xl create /tmp/small.cfg")
        assert created.returncode == 0, created.stderr
        listed = xen_rig.run("xl list")
        assert "small" in domains(listed.stdout), listed.stdout

        saved = xen_rig.run("xl save small /tmp/small.save")
        assert saved.returncode == 0, saved.stderr
        listed = xen_rig.run("xl list")
        assert "small" not in domains(listed.stdout), listed.stdout

        restored = xen_rig.run("xl restore /tmp/small.save")
        assert restored.returncode == 0, restored.stderr
        assert "Restore successful" in restored.stderr
        listed = xen_rig.run("xl list")
        assert listed.returncode == 0, listed.stderr
        assert "small" in domains(listed.stdout), listed.stdout
    finally:
        xen_rig.run("xl destroy small 2>/dev/null; rm -f /tmp/small.save")
