"""The Nova driver's functional tests need Nova (not a requirement of the
package; see doc/source/nova.rst for the environment).

Nova's in-process services need eventlet's monkey patching before
anything else imports threading or sockets, so Nova's functional package
is imported first, as Nova's own test runner does. Run this directory in
a process of its own: the patching is global. The main test session
runs it that way through tests/functional/test_nova_driver_process.py,
which sets NOVA_XEN_NCM_NOVA_PROCESS=1 for the child."""

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

    from nova_xen_ncm.virt import novahook

    # What the nova_xen_ncm_hooks.pth file of an installed package does
    # at start-up (an editable install has none; test_nova_driver_process
    # checks the file in real installs).
    novahook.install()
