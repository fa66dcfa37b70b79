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


def test_a_failing_registration_does_not_break_nova(tmp_path):
    # Any error of the plugin's objects module (not only ImportError)
    # leaves Nova's own module importable, with a warning.
    (tmp_path / "broken_objects.py").write_text(
        "raise RuntimeError('broken on purpose')\n"
    )
    code = (
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.TARGET = 'broken_objects'\n"
        "novahook.install()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import nova.objects.migrate_data\n"
        "print(any('broken on purpose' in str(w.message) for w in caught))\n"
    )
    assert run(code) == "True"


def test_wrapped_loader_keeps_the_loader_s_interface():
    code = (
        "from nova_xen_ncm.virt import novahook\n"
        "novahook.install()\n"
        "import nova.objects.migrate_data as m\n"
        "loader = m.__spec__.loader\n"
        "print(type(loader).__name__, "
        "'class LiveMigrateData' in loader.get_source(m.__name__), "
        "loader.get_filename(m.__name__) == m.__file__)\n"
    )
    assert run(code) == "_RegisteringLoader True True"


def test_pth_line_is_silent_when_the_package_is_gone():
    # What site.py does with the line of a .pth left after the project
    # was uninstalled: nothing, and no traceback.
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: (\n"
        "    None if name == 'nova_xen_ncm' else real(name, *a))\n"
        f"exec({novahook.PTH_LINE!r}, {{}})\n"
        "print('nova_xen_ncm' in sys.modules, sys.meta_path[0].__class__"
        ".__name__ == 'NovaFinder')\n"
    )
    assert run(code) == "False False"


def test_pth_line_installs_the_hook():
    code = (
        "import sys\n"
        f"exec({novahook.PTH_LINE!r}, {{}})\n"
        "print(type(sys.meta_path[0]).__name__)\n"
    )
    assert run(code) == "NovaFinder"
