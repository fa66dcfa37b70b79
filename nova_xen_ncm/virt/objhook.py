"""Registers the driver's Nova objects in any process that loads Nova's.

nova-conductor never loads a compute driver, yet it rebuilds the
driver's ``XenNCMLiveMigrateData`` from RPC primitives, which only works
for registered classes. :func:`install` puts a finder on ``sys.meta_path``
that imports :mod:`nova_xen_ncm.virt.migrate_data` right after
``nova.objects.migrate_data`` (which ``nova.objects.register_all()``
imports in every Nova service). The ``nova_xen_ncm_objects.pth`` file
calls :func:`install` at interpreter start-up, so no configuration is
needed. This module imports nothing of Nova itself: it runs in every
Python process of the environment.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

TRIGGER = "nova.objects.migrate_data"
TARGET = "nova_xen_ncm.virt.migrate_data"


def _register() -> None:
    try:
        importlib.import_module(TARGET)
    except ImportError as error:
        # A broken plugin must not take the Nova service down with it;
        # the RPC that needs the class will say what is missing.
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


class ObjectFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``nova.objects.migrate_data``."""

    def find_spec(self, fullname, path, target=None):
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
    """Register now if Nova's objects are loaded, else when they are."""
    if TRIGGER in sys.modules:
        _register()
        return
    if not any(isinstance(f, ObjectFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, ObjectFinder())
