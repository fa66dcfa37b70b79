#!/usr/bin/env python3
"""Seed dom0's bytecode cache (``PYTHONPYCACHEPREFIX``) with the image's.

With a cache prefix, Python looks for every module's bytecode under the
prefix only, so the ``__pycache__`` files the image's packages already
have would be compiled again by the first command of each boot. They are
linked into the prefix's layout instead (``/a/b/__pycache__/m.*.pyc``
becomes ``PREFIX/a/b/m.*.pyc``, the same file: its header still names
its source's time and size); the project's own are compiled there on
first use.

Usage: dom0_pycache.py PREFIX
"""

from __future__ import annotations

import os
import sys


def seed(prefix: str, tops: list[str]) -> int:
    linked = 0
    for top in tops:
        for dirpath, _, filenames in os.walk(top):
            if os.path.basename(dirpath) != "__pycache__":
                continue
            target = prefix + os.path.dirname(dirpath)
            os.makedirs(target, exist_ok=True)
            for name in filenames:
                if not name.endswith(".pyc"):
                    continue
                try:
                    os.link(
                        os.path.join(dirpath, name), os.path.join(target, name)
                    )
                except FileExistsError:
                    continue
                except OSError:
                    # Another file system (no hard link): that file is
                    # compiled on first use, as without a seed.
                    continue
                linked += 1
    return linked


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    prefix = os.path.abspath(argv[1])
    # The image's own directories (the project's tree is read-only and
    # has no bytecode of dom0's).
    tops = sorted(
        {p for p in sys.path if p.startswith("/usr/") and os.path.isdir(p)}
    )
    seed(prefix, tops)
    with open(os.path.join(prefix, ".seeded"), "w"):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
