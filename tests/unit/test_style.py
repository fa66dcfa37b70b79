"""The tree stays ruff clean: CI fails on a lint error, not a reviewer."""

import os
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


# A merge resolved by hand can leave its markers on lines of their own,
# which reStructuredText and YAML then read as text or as a heading.
# Scripts and configuration without a text suffix are read too (tox.ini,
# devstack/settings, .ci/run); a file holding a NUL byte is not text.
_PRUNED = {".git", ".tox", ".venv", "venv", "build", "dist", "__pycache__"}


def _is_title(line: str) -> bool:
    # A heading's title fits its underline and names something.
    return (
        0 < len(line) <= 7
        and line == line.strip()
        and any(c.isalnum() for c in line)
    )


def _conflict_markers(text: str) -> list[int]:
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines, 1):
        if line.startswith(("<<<<<<< ", "||||||| ", ">>>>>>> ")):
            found.append(number)
        elif line == "=======":
            before = lines[number - 2] if number > 1 else ""
            after = lines[number] if number < len(lines) else ""
            below = lines[number + 1] if number + 1 < len(lines) else ""
            # An underline follows its title; an overline precedes a
            # title that has the underline too.
            underline = _is_title(before)
            overline = _is_title(after) and below == "======="
            if not (underline or overline):
                found.append(number)
    return found


def _text_files() -> list[pathlib.Path]:
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _PRUNED and not d.endswith(("_cache", ".egg-info"))
        )
        files += [pathlib.Path(top, n) for n in sorted(names)]
    return files


def test_conflict_markers_are_found():
    assert _conflict_markers(
        "ours, resolved\n=======\ntheirs, resolved\n>>>>>>> b\n"
    ) == [2, 4]
    assert _conflict_markers("<<<<<<< a\nx\n||||||| base\n") == [1, 3]
    assert _conflict_markers("Fuzzing\n=======\n") == []
    assert _conflict_markers("=======\nFuzzing\n=======\n") == []
    assert _conflict_markers("a longer line of text\n=======\n") == [2]
    # Short lines of code are no titles.
    assert _conflict_markers("  x = 1\n=======\n}\n") == [2]
    assert _conflict_markers("}\n=======\n") == [2]


def test_no_merge_conflict_markers():
    found = []
    for path in _text_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        lines = _conflict_markers(data.decode(errors="replace"))
        found += [f"{path.relative_to(ROOT)}:{n}" for n in lines]
    assert not found, found
