"""The C allocator's free pages given back to the system."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

from nova_xen_ncm.host import base


def test_glibcs_trim_is_found_on_glibc_and_nothing_elsewhere() -> None:
    found = base._malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert found is not None
    else:
        assert found is None


@pytest.mark.parametrize("error", [OSError, TypeError])
def test_a_c_library_that_cannot_be_opened_is_no_trim(monkeypatch, error):
    def refuse(name):
        raise error("no C library")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert base._malloc_trim() is None


def test_a_c_library_without_the_trim_is_no_trim(monkeypatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert base._malloc_trim() is None
    monkeypatch.setattr(base, "_MALLOC_TRIM", None)
    base.release_freed_memory()  # nothing to call: no error


def test_the_pages_freed_below_a_live_array_go_back() -> None:
    if platform.libc_ver()[0] != "glibc":
        assert base._MALLOC_TRIM is None
        return
    # A process of its own: its heap holds nothing of another test's.
    code = textwrap.dedent(
        """
        import numpy as np
        from nova_xen_ncm.host import base

        def anon():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) << 10

        # 64 KiB arrays come from the heap, not mappings of their own;
        # the last one kept stops glibc trimming the heap's top itself.
        arrays = [np.ones(8192) for _ in range(512)]
        last = arrays.pop()
        del arrays
        before = anon()
        base.release_freed_memory()
        print(before - anon(), last[0])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    given_back = int(done.stdout.split()[0])
    # 32 MiB were freed; most of it goes back.
    assert given_back >= 24 << 20
