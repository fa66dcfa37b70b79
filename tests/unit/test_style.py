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


# A merge resolved by hand can leave its markers on lines of their own,
# which reStructuredText and YAML then read as text or as a heading.
_MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")
_TEXT = (".py", ".rst", ".md", ".yaml", ".cfg", ".toml", ".txt", ".sh")


def _conflict_markers(text: str) -> list[int]:
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines, 1):
        if line.startswith(("<<<<<<< ", ">>>>>>> ")):
            found.append(number)
        elif line == "=======":
            # A heading's underline (or overline) is as long as its title.
            before = lines[number - 2] if number > 1 else ""
            after = lines[number] if number < len(lines) else ""
            if not any(
                0 < len(t.strip()) <= 7 and t == t.strip()
                for t in (before, after)
            ):
                found.append(number)
    return found


def test_conflict_markers_are_found():
    assert _conflict_markers(
        "ours, resolved\n=======\ntheirs, resolved\n>>>>>>> b\n"
    ) == [2, 4]
    assert _conflict_markers("Fuzzing\n=======\n") == []
    assert _conflict_markers("a longer line of text\n=======\n") == [2]


def test_no_merge_conflict_markers():
    found = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if (
            relative.parts[0] in (".git", ".tox", "build", "dist")
            or any(
                p.startswith(".") or p.endswith(".egg-info")
                for p in relative.parts
            )
            or not path.is_file()
            or path.suffix not in _TEXT
        ):
            continue
        lines = _conflict_markers(path.read_text(errors="replace"))
        found += [f"{relative}:{n}" for n in lines]
    assert not found, found
