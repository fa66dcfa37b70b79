"""The tree stays ruff clean: CI fails on a lint error, not a reviewer."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_ruff_clean():
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed (test-requirements.txt has it)")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
