"""The import hook: Nova finds the driver as ``nova.virt.xen_ncm`` and
registers the driver's Nova objects in a process that never loads the
driver (nova-conductor)."""

import os
import subprocess
import sys

from nova_xen_ncm.virt import novahook


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
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.install()\n"
        "from nova import objects\n"
        "objects.register_all()\n"
        "from nova.objects import base\n"
        "print('XenNCMLiveMigrateData' in "
        "base.NovaObjectRegistry.obj_classes(), "
        "'nova_xen_ncm.virt.driver' in sys.modules)\n"
    )
    assert run(code) == "True False"


def test_registers_at_once_when_nova_objects_are_loaded():
    code = (
        "from nova import objects\n"
        "objects.register_all()\n"
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.install()\n"
        "from nova.objects import base\n"
        "print('XenNCMLiveMigrateData' in "
        "base.NovaObjectRegistry.obj_classes())\n"
    )
    assert run(code) == "True"


def test_nova_loads_the_driver_through_the_hook():
    code = (
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.install()\n"
        "import nova.virt.xen_ncm as shim\n"
        "from nova_xen_ncm.virt import driver\n"
        "print(shim.XenNCMDriver is driver.XenNCMDriver, shim.__all__)\n"
    )
    assert run(code) == "True ['XenNCMDriver']"


def test_without_the_hook_nova_does_not_find_the_driver():
    # The failure the hook exists for: nothing of this project is in
    # Nova's nova/virt directory.
    code = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('nova.virt.xen_ncm'))\n"
    )
    assert run(code) == "None"


def test_install_is_idempotent():
    code = (
        "import sys\n"
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.install(); novahook.install()\n"
        "print(sum(isinstance(f, novahook.NovaFinder) "
        "for f in sys.meta_path))\n"
    )
    assert run(code) == "1"


def test_main_writes_and_removes_the_pth(tmp_path, capsys):
    assert novahook.main(["install", "--site-dir", str(tmp_path)]) == 0
    path = tmp_path / novahook.PTH_NAME
    line = path.read_text()
    # site.py executes .pth lines that start with "import"; the line
    # must run as-is.
    assert line.startswith("import ")
    exec(line, {})  # noqa: S102 - what site.py does with the line
    assert novahook.main(["remove", "--site-dir", str(tmp_path)]) == 0
    assert not os.path.exists(path)
    # Removing twice is not an error (DevStack's clean runs after unstack).
    assert novahook.main(["remove", "--site-dir", str(tmp_path)]) == 0
