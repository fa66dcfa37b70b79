"""Release notes pass ``reno lint`` (the releasenotes tox env runs it too).

A note with an unknown section or broken YAML fails here, before it
breaks the release notes build.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_reno_lint():
    reno = shutil.which("reno")
    if reno is None:
        pytest.fail("reno is not installed (test-requirements.txt has it)")
    result = subprocess.run(
        [reno, "lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        "reno lint failed; fix the notes in releasenotes/notes/:\n"
        + result.stdout
        + result.stderr
    )


def test_every_note_is_in_the_notes_directory_with_a_unique_suffix():
    notes = sorted((ROOT / "releasenotes" / "notes").glob("*.yaml"))
    assert notes, "releasenotes/notes/ has no notes"
    suffixes = [note.stem.rsplit("-", 1)[-1] for note in notes]
    # reno new names notes <slug>-<16 hex digits>; the suffix is the id.
    for note, suffix in zip(notes, suffixes, strict=True):
        assert len(suffix) == 16 and int(suffix, 16) >= 0, note.name
    assert len(set(suffixes)) == len(suffixes)
