"""The Nova driver's functional tests need Nova (not a requirement of the
package; see doc/source/nova.rst for the environment).

Nova's in-process services need eventlet's monkey patching before
anything else imports threading or sockets, so Nova's functional package
is imported first, as Nova's own test runner does. Run this directory in
a process of its own: the patching is global. The main test session
runs it that way through tests/functional/test_nova_driver_process.py,
which sets NOVA_XEN_NCM_NOVA_PROCESS=1 for the child.

This tree's nova/virt/xen_ncm shim makes ``nova`` a namespace package
when Nova is absent; only a regular package (with an origin) is Nova."""

import importlib.util
import os

_nova = importlib.util.find_spec("nova")
if (
    _nova is None
    or _nova.origin is None
    or os.environ.get("NOVA_XEN_NCM_NOVA_PROCESS") != "1"
):
    collect_ignore_glob = ["test_*.py"]
else:
    import nova.tests.functional  # noqa: F401
