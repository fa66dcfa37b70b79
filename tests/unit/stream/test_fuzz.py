"""Bounded fuzzing of the decoder (tests/fuzz/fuzz_decoder.py).

Hypothesis drives the fuzz target's oracle in-process with random bytes
and edits of valid streams; atheris, when installed, runs the target as a
libFuzzer process for a few seconds. Longer runs are by hand.
"""

import importlib.util
import pathlib
import resource
import subprocess
import sys

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from nova_xen_ncm.stream import libxc

pytestmark = pytest.mark.fuzz

TARGET = pathlib.Path(__file__).parents[2] / "fuzz" / "fuzz_decoder.py"
ATHERIS_SECONDS = 2


def _load_target():
    spec = importlib.util.spec_from_file_location("fuzz_decoder", TARGET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_target()

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ_SETTINGS
@given(st.binary(max_size=256), st.integers(0, 300))
def test_random_bytes(data, chunk):
    fuzz.check(data, chunk)


@FUZZ_SETTINGS
@given(
    seed=st.integers(0, len(fuzz.SEEDS) - 1),
    edits=st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255)), max_size=6
    ),
    chunk=st.integers(0, 5000),
)
def test_edited_valid_streams(seed, edits, chunk):
    stream = bytearray(fuzz.SEEDS[seed])
    for where, value in edits:
        stream[where % len(stream)] = value
    fuzz.check(bytes(stream), chunk)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, len(fuzz.SEEDS) - 1), cut=st.integers(0, 10**6))
def test_truncated_valid_streams(seed, cut):
    stream = fuzz.SEEDS[seed]
    fuzz.check(stream[: cut % len(stream)], 977)


def test_seeds_are_valid_and_the_oracle_can_fail(monkeypatch):
    for seed in fuzz.SEEDS:
        fuzz.check(seed)
    # A codec that does not write back what it read is caught.
    codec = libxc.HvmParamsCodec
    monkeypatch.setattr(codec, "encode", lambda self, v: [bytes(24)])
    with pytest.raises(AssertionError, match="HVM_PARAMS"):
        fuzz.check(fuzz.SEEDS[0])


def _rss_limit_mb() -> int:
    """libFuzzer's 2 GB limit counted from this process's own peak: a
    child's peak RSS starts at its parent's at fork, and Linux keeps it
    across execve, so a test session grown large would trip it before
    the target ran one input."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return peak_mb + 2048


def test_atheris_bounded_run(tmp_path):
    pytest.importorskip("atheris")
    result = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-max_total_time={ATHERIS_SECONDS}",
            f"-rss_limit_mb={_rss_limit_mb()}",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
