"""Running the console scripts as a user runs them, and judging the one
line a failed command prints: shared by the tests of this directory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

# Only bounds a hung command; nothing is asserted about time.
HANG_LIMIT = 300


def script(name: str = "nova-xen-ncm") -> str:
    """The path of the installed console script ``name``."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"the {name} console script is not installed")
    return path


def command(*args: str, name: str = "nova-xen-ncm") -> list[str]:
    """The command line of console script ``name`` with ``args``."""
    return [script(name), *args]


def run(
    *args: str,
    name: str = "nova-xen-ncm",
    timeout: float = HANG_LIMIT,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """Run console script ``name`` to its end; output captured as text."""
    return subprocess.run(
        command(*args, name=name),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def popen(*args: str, name: str = "nova-xen-ncm", **kwargs: Any):
    """Start console script ``name``; stdout and stderr piped as text
    unless ``kwargs`` says otherwise."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(command(*args, name=name), **kwargs)


def one_line_error(
    result: Any,
    status: int,
    *words: str,
    stdout: str | None = None,
    stderr: str | None = None,
    allow: Sequence[str] = (),
) -> str:
    """The stderr of ``result`` (a CompletedProcess or a Popen whose
    output was read: pass it as ``stdout``/``stderr``), checked to be
    exactly one line holding ``words``, with exit status ``status`` and
    no traceback or warning anywhere; lines starting with one of
    ``allow`` are not counted."""
    out = result.stdout if stdout is None else stdout
    err = result.stderr if stderr is None else stderr
    output = (out or "") + err
    assert "Traceback" not in output, output[-3000:]
    assert "Warning" not in err, err[-3000:]
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.startswith(tuple(allow))
    ]
    assert len(lines) == 1, err[-3000:]
    assert result.returncode == status, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
