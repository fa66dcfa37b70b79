"""The import hook registers the driver's Nova objects in a process
that never loads the driver (nova-conductor)."""

import subprocess
import sys

from nova_xen_ncm.virt import objhook


def run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip().splitlines()[-1]


def test_conductor_process_registers_without_the_driver():
    # What nova-conductor does: register Nova's objects and nothing of
    # ours; the import hook (the .pth file's job) brings our class in.
    code = (
        "import sys\n"
        "from nova_xen_ncm.virt import objhook\n"
        "objhook.install()\n"
        "from nova import objects\n"
        "objects.register_all()\n"
        "from nova.objects import base\n"
        "print('XenNCMLiveMigrateData' in "
        "base.NovaObjectRegistry.obj_classes())\n"
    )
    assert run(code) == "True"


def test_registers_at_once_when_nova_objects_are_loaded():
    code = (
        "from nova import objects\n"
        "objects.register_all()\n"
        "from nova_xen_ncm.virt import objhook\n"
        "objhook.install()\n"
        "from nova.objects import base\n"
        "print('XenNCMLiveMigrateData' in "
        "base.NovaObjectRegistry.obj_classes())\n"
    )
    assert run(code) == "True"


def test_pth_file_installs_the_hook():
    with open(
        objhook.__file__.replace("objhook.py", "nova_xen_ncm_objects.pth")
    ) as f:
        line = f.read().strip()
    # site.py executes .pth lines that start with "import".
    assert line.startswith("import ")
    assert "objhook.install()" in line
