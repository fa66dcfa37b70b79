"""The build step pbr's ``[files] packages`` cannot express (setup.cfg
``[global] commands``; used at build time only).

The wheel carries ``nova_xen_ncm_hooks.pth`` at its root, so it lands in
``site-packages``: it makes every Python process of the environment find
the driver as ``nova.virt.xen_ncm`` and register its Nova objects
(:mod:`nova_xen_ncm.virt.novahook`). Nothing is written into Nova's own
package directory.
"""

import os

from setuptools.command import build_py

from nova_xen_ncm.virt import novahook


class BuildPy(build_py.build_py):
    command_name = "build_py"

    def run(self) -> None:
        super().run()
        self.mkpath(self.build_lib)
        novahook.write_pth(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, novahook.PTH_NAME)
        ]
