"""Hooks into Nova's imports, in every Python process of the environment.

Two things must work wherever Nova runs, whatever way Nova and this
project were installed (wheels, ``pip install -e`` as DevStack's
``setup_develop`` does, separate ``site-packages``):

* ``compute_driver = xen_ncm.XenNCMDriver``: Nova 34 imports drivers
  only as ``nova.virt.<compute_driver>``. A file under ``nova/virt/``
  is seen only when it sits in the very directory Nova's regular
  ``nova.virt`` package was loaded from, which is not the case for an
  editable Nova (a source tree) or a Nova in another ``site-packages``.
  :class:`NovaFinder` serves ``nova.virt.xen_ncm`` itself, as a module
  that re-exports :class:`nova_xen_ncm.virt.driver.XenNCMDriver`.
* nova-conductor never loads a compute driver, yet it rebuilds the
  driver's ``XenNCMLiveMigrateData`` from RPC primitives, which only
  works for registered classes. :class:`NovaFinder` imports
  :mod:`nova_xen_ncm.virt.migrate_data` right after
  ``nova.objects.migrate_data`` (which ``nova.objects.register_all()``
  imports in every Nova service).

:func:`install` puts the finder on ``sys.meta_path``; the
``nova_xen_ncm_hooks.pth`` file calls it at interpreter start-up. A wheel
ships that file (``nova_xen_ncm/virt/packaging.py``); an editable
install does not, so ``python -m nova_xen_ncm.virt.novahook install``
writes it (DevStack's plugin does after ``setup_develop``). This module
imports nothing of Nova: it runs in every Python process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType

TRIGGER = "nova.objects.migrate_data"
TARGET = "nova_xen_ncm.virt.migrate_data"
SHIM = "nova.virt.xen_ncm"
DRIVER = "nova_xen_ncm.virt.driver"
DRIVER_CLASS = "XenNCMDriver"

PTH_NAME = "nova_xen_ncm_hooks.pth"
# site.py executes a .pth line that starts with "import". A .pth left
# behind by an uninstalled project must not print a traceback in every
# Python process: the hook installs only while the package is there.
PTH_LINE = (
    "import importlib.util as u; u.find_spec('nova_xen_ncm') and "
    "__import__('nova_xen_ncm.virt.novahook').virt.novahook.install()\n"
)


def _register() -> None:
    try:
        importlib.import_module(TARGET)
    except Exception as error:
        # Whatever goes wrong, it must not fail Nova's own import of
        # nova.objects.migrate_data and take every Nova service down
        # with it; the RPC that needs the class will say what is missing.
        warnings.warn(
            f"nova-xen-ncm: could not register its Nova objects: {error}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str):
        # The module's __loader__ is this wrapper: get_source,
        # get_filename, get_resource_reader... are the wrapped loader's.
        return getattr(self._loader, name)


class _ShimLoader(importlib.abc.Loader):
    """``nova.virt.xen_ncm``: ``from nova_xen_ncm.virt.driver import
    XenNCMDriver`` and nothing else."""

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return None

    def exec_module(self, module: ModuleType) -> None:
        driver = importlib.import_module(DRIVER)
        setattr(module, DRIVER_CLASS, getattr(driver, DRIVER_CLASS))
        module.__all__ = [DRIVER_CLASS]


class NovaFinder(importlib.abc.MetaPathFinder):
    """Serves ``nova.virt.xen_ncm``; wraps the loader of
    ``nova.objects.migrate_data``."""

    def find_spec(self, fullname, path, target=None):
        if fullname == SHIM:
            return importlib.util.spec_from_loader(
                SHIM, _ShimLoader(), origin=DRIVER
            )
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Serve the driver shim, and register the objects now if Nova's are
    loaded, else when they are."""
    if not any(isinstance(f, NovaFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, NovaFinder())
    if TRIGGER in sys.modules:
        _register()


def site_dir() -> str:
    """Where this interpreter's packages go (a venv's site-packages)."""
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def write_pth(directory: str) -> str:
    path = os.path.join(directory, PTH_NAME)
    with open(path, "w") as f:
        f.write(PTH_LINE)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m nova_xen_ncm.virt.novahook install|remove``: the hook
    for an editable install, in this interpreter's site-packages."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nova_xen_ncm.virt.novahook",
        description=(
            "Install or remove the .pth file that makes Nova find the "
            "driver (nova.virt.xen_ncm) and its objects."
        ),
    )
    parser.add_argument("action", choices=("install", "remove"))
    parser.add_argument(
        "--site-dir",
        default=None,
        help="directory of the .pth file (default: this interpreter's "
        "site-packages)",
    )
    args = parser.parse_args(argv)
    directory = args.site_dir or site_dir()
    if args.action == "install":
        print(write_pth(directory))
        return 0
    path = os.path.join(directory, PTH_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
