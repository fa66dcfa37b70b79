"""The Nova driver's unit tests need Nova (not a requirement of the
package; see doc/source/nova.rst for the environment).

Importing Nova's test packages (``nova.tests.unit``) monkey-patches the
whole process with eventlet, which must not leak into the rest of the
session: the main session runs this directory in a child pytest through
tests/functional/test_nova_driver_process.py, which sets
NOVA_XEN_NCM_NOVA_PROCESS=1 for the child.

Only a regular package (with an origin) is Nova: a stray ``nova``
directory on the path would be a namespace package."""

import importlib.util
import os

_nova = importlib.util.find_spec("nova")
if (
    _nova is None
    or _nova.origin is None
    or os.environ.get("NOVA_XEN_NCM_NOVA_PROCESS") != "1"
):
    collect_ignore_glob = ["test_*.py"]
