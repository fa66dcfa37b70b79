"""The build step pbr's ``[files] packages`` cannot express (setup.cfg
``[global] commands``; used at build time only).

* The Nova shim ``nova/virt/xen_ncm``: Nova imports compute drivers as
  ``nova.virt.<compute_driver>``, so the wheel carries
  ``nova/virt/xen_ncm/__init__.py`` and nothing else of ``nova``. It lands
  inside the installed Nova's own ``nova/virt`` (both packages in the
  same site-packages); shipping ``nova/__init__.py`` would overwrite
  Nova's.
* ``nova_xen_ncm_objects.pth``: registers the driver's Nova objects in
  every Nova service of the environment (:mod:`nova_xen_ncm.virt.objhook`).
"""

import os

from setuptools.command import build_py


class BuildPy(build_py.build_py):
    command_name = "build_py"

    # Installed path -> source path, relative to the project root.
    EXTRA = {
        "nova/virt/xen_ncm/__init__.py": "nova/virt/xen_ncm/__init__.py",
        "nova_xen_ncm_objects.pth": (
            "nova_xen_ncm/virt/nova_xen_ncm_objects.pth"
        ),
    }

    def run(self) -> None:
        super().run()
        for target, source in self.EXTRA.items():
            path = os.path.join(self.build_lib, target)
            self.mkpath(os.path.dirname(path))
            self.copy_file(source, path)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, target) for target in self.EXTRA
        ]
