"""Bounded fuzzing of the receiver (tests/fuzz/fuzz_receiver.py).

A seeded mutator edits the stream of a real guest, record by record, and
each stream goes through the Restorer of a simulated destination under
the target's oracle: only the engine's and the codec's errors, nothing
outside the guest applied, the destination clean after rollback. The run
covers MIN_CASES inputs on any machine and then as many more as
FUZZ_SECONDS allow, so the cases past MIN_CASES depend on the machine's
speed; and the seed is a running guest's stream, whose records (how many
xenstore nodes) vary from run to run, so an input may edit another record
in another run. What a run found is therefore kept as a test of its own
that names the record and octet it edits (the tests after the loop);
longer runs are by hand with atheris.
"""

import collections
import importlib.util
import pathlib
import random
import resource
import struct
import subprocess
import sys
import time

import pytest

from nova_xen_ncm.host.sim import devices

pytestmark = pytest.mark.fuzz

TARGET = pathlib.Path(__file__).parents[2] / "fuzz" / "fuzz_receiver.py"
FUZZ_SECONDS = 25.0
# Run whatever the machine's load: the time only adds cases beyond these.
MIN_CASES = 50
MAX_CASES = 2000
ATHERIS_SECONDS = 3


def _load_target():
    spec = importlib.util.spec_from_file_location("fuzz_receiver", TARGET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_target()


@pytest.fixture(scope="module")
def target():
    t = fuzz.Target()
    yield t
    t.close()


def test_seed_is_accepted_and_the_oracle_can_fail(target, monkeypatch):
    assert target.check(target.seed) == "accepted"
    # A rollback that leaves the domain behind is caught.
    destroy = target.host.destroy_domain
    monkeypatch.setattr(target.host, "destroy_domain", lambda domid: None)
    with pytest.raises(AssertionError, match="destination changed"):
        target.check(target.seed)
    destroy(target.domid)
    assert target.host.list_domains() == []


def test_seeded_mutations_of_a_real_stream(target):
    rng = random.Random(20261125)
    outcomes = collections.Counter()
    deadline = time.monotonic() + FUZZ_SECONDS
    cases = 0
    while cases < MAX_CASES and (
        cases < MIN_CASES or time.monotonic() < deadline
    ):
        data = fuzz.random_input(rng)
        try:
            outcomes[target.check(target.mutate(data))] += 1
        except AssertionError as exc:
            raise AssertionError(
                f"input {data.hex()} ({target.describe(data)}): {exc}"
            ) from exc
        cases += 1
    # The run reached deep enough to be refused for content, not only
    # for framing.
    assert sum(outcomes.values()) == cases
    assert len(outcomes) >= 2, outcomes


# The octet of an NCM_PV_DEVICE body holding the backend's xenbus state:
# after version, devid, backend and frontend domids and the kind
# (stream.ncm.PV_DEVICE_HEADER).
BACKEND_STATE_OCTET = struct.calcsize("<IIHHB")


@pytest.mark.parametrize("nth", [0, 1])
def test_a_backend_state_no_backend_takes_is_refused_leaving_nothing(
    target, nth, monkeypatch
):
    # XenbusState Unknown (0) decodes, but no backend reconnects in it:
    # refused before the import writes the guest's backend areas, which
    # its rollback would not have removed.
    stream = target.edit("NCM_PV_DEVICE", nth, BACKEND_STATE_OCTET, 0)
    reconnected = []
    reconnect = devices.Backend.reconnect.__func__

    def recorded(cls, state, **kwargs):
        reconnected.append(f"{state.kind}/{state.devid}")
        return reconnect(cls, state, **kwargs)

    monkeypatch.setattr(devices.Backend, "reconnect", classmethod(recorded))
    assert target.check(stream) == "RestoreError"
    # Refused with the stream, before the import: no backend (of the
    # ones before it either) came to reconnect.
    assert reconnected == []


def test_a_backend_failing_after_the_xenstore_import_leaves_nothing(
    target, monkeypatch
):
    # A backend that cannot take over once the import wrote the backend
    # areas (its disk or ring gone meanwhile): the rollback removes the
    # areas of the backends that never reconnected too.
    def refuse(cls, state, **kwargs):
        raise devices.BackendError(f"{state.kind}/{state.devid}: refused")

    monkeypatch.setattr(devices.Backend, "reconnect", classmethod(refuse))
    assert target.check(target.seed) == "RestoreError"


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
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
