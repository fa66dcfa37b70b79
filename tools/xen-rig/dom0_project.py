#!/usr/bin/env python3
"""Install the shared project tree in dom0 as if with ``pip install -e``.

dom0 has no git (which pbr needs) and sees the tree read-only, so the
distribution metadata is written from ``setup.cfg``: a ``.dist-info``
with the entry points (the project loads plugins through them), a ``.pth``
file that puts the tree on ``sys.path``, and the console scripts.

Usage: dom0_project.py PROJECT_DIR VERSION
"""

from __future__ import annotations

import configparser
import sys
import sysconfig
from pathlib import Path


def entry_points(cfg: configparser.ConfigParser) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    if cfg.has_section("entry_points"):
        for group, value in cfg.items("entry_points"):
            lines = [line.strip() for line in value.splitlines()]
            groups[group] = [line for line in lines if line]
    return groups


def install(project: Path, version: str) -> None:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(project / "setup.cfg")
    name = cfg.get("metadata", "name")
    site = Path(sysconfig.get_path("purelib"))
    site.mkdir(parents=True, exist_ok=True)
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    (dist / "INSTALLER").write_text("xen-rig\n")
    groups = entry_points(cfg)
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{line}\n" for line in lines) + "\n"
            for group, lines in groups.items()
        )
    )
    (dist / "RECORD").write_text("")
    (site / f"{name.replace('-', '_')}.pth").write_text(f"{project}\n")
    bindir = Path(sysconfig.get_path("scripts"))
    bindir.mkdir(parents=True, exist_ok=True)
    for line in groups.get("console_scripts", []):
        script, _, target = (part.strip() for part in line.partition("="))
        module, _, func = target.partition(":")
        path = bindir / script
        path.write_text(
            f"#!{sys.executable}\nimport sys\n\nfrom {module} import {func}\n"
            f"\nsys.exit({func}())\n"
        )
        path.chmod(0o755)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    install(Path(argv[1]), argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
