"""Xen tier: real Xen 4.17 booted under QEMU by ``tools/xen-rig``.

The tier runs when ``NOVA_XEN_NCM_XEN_TESTS=1`` or ``CI=true`` and is
skipped otherwise.  The rig is built (cached outside the repository) and
booted once per session; its dom0 sees this tree at ``/project``.

When the tier is enabled, a failure to build or boot the rig fails the
tests.  Missing prerequisites (root, QEMU, debootstrap) skip them, except
under ``CI=true`` where they fail too.

Tests marked ``patched_xen`` run last, on a rig booted with the
hypervisor built from Debian's Xen source and ``xen/patches``
(``XEN_RIG_XEN=patched``); the stock rigs are stopped before it boots so
that the two cores are not shared with an idle one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RIG = Path(__file__).resolve().parents[2] / "tools" / "xen-rig" / "xen-rig"
BUILD_TIMEOUT = 3600
BOOT_TIMEOUT = 1200
STOP_TIMEOUT = 120
OUTPUT_TAIL = 6000


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _enabled() -> bool:
    return os.environ.get("NOVA_XEN_NCM_XEN_TESTS") == "1" or _in_ci()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "patched_xen: needs Xen built with xen/patches, booted under QEMU "
        "(runs after the stock xen tests)",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if _enabled():
        # The patched tier after the stock one (sort is stable).
        items.sort(key=lambda item: item.get_closest_marker("patched_xen")
                   is not None)  # fmt: skip
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(
        reason="Xen tier: set NOVA_XEN_NCM_XEN_TESTS=1 (or CI=true)"
    )
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


# The rig's build (Debian's root file system and, for the patched tier,
# Xen compiled from Debian's source) started as soon as the session
# knows it will boot a rig, so that it runs beside the tiers before this
# one (the deployment tier mostly waits on its services) instead of
# after them. The fixtures wait for it, then build as before: a build
# already cached returns at once, a failed one fails there with its own
# output.
_EARLY_BUILD: list[tuple[subprocess.Popen[bytes], Path]] = []


def _rig_items(items: list[pytest.Item]) -> list[pytest.Item]:
    here = Path(__file__).resolve().parent
    return [
        item
        for item in items
        if here in Path(str(item.path)).resolve().parents
        and not item.get_closest_marker("skip")
    ]


# What the stock rig and the patched one need besides root; a session
# missing one skips (or fails) in the fixtures, before any build.
_RIG_TOOLS = ("qemu-system-x86_64", "debootstrap", "mke2fs")
_XEN_BUILD_TOOLS = ("gcc", "make", "dpkg-source", "patch")


def _have(tools: tuple[str, ...]) -> bool:
    return all(shutil.which(tool) is not None for tool in tools)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not _enabled() or session.config.option.collectonly:
        return
    # xdist workers would each start one in the same cache.
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    rig_items = _rig_items(session.items)
    if not rig_items or os.geteuid() != 0 or not _have(_RIG_TOOLS):
        return
    rig = shlex.quote(str(RIG))
    steps = [f"{rig} build"]
    if _have(_XEN_BUILD_TOOLS) and any(
        item.get_closest_marker("patched_xen") for item in rig_items
    ):
        steps.append(f"{rig} build-xen")
    env = dict(os.environ)
    env.pop("XEN_RIG_XEN", None)
    fd, name = tempfile.mkstemp(prefix="xen-rig-build-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        build = subprocess.Popen(
            ["sh", "-c", " && ".join(steps)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    _EARLY_BUILD.append((build, Path(name)))


def _end_build(build: subprocess.Popen[bytes]) -> None:
    # Its own session: ^C does not reach it. xen-rig unwinds its mounts
    # on SIGTERM.
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        if build.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, sig)
        try:
            build.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def _early_build_done() -> None:
    """Waits for the build started at collection (if any)."""
    while _EARLY_BUILD:
        # Listed until it ended: a ^C while waiting leaves it to
        # pytest_unconfigure.
        build, log = _EARLY_BUILD[0]
        try:
            build.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            _end_build(build)
        if build.returncode != 0:
            # The fixture's own build says why; this is what ran first.
            print(f"early xen-rig build failed ({build.returncode}):")
            print(log.read_text(errors="replace")[-OUTPUT_TAIL:])
        log.unlink(missing_ok=True)
        _EARLY_BUILD.pop(0)


def pytest_unconfigure(config: pytest.Config) -> None:
    # A session ended early (a failure with -x, ^C) does not leave a
    # build running behind it.
    while _EARLY_BUILD:
        build, log = _EARLY_BUILD.pop()
        _end_build(build)
        log.unlink(missing_ok=True)


class XenRig:
    """A booted rig; ``run`` executes a bash script in dom0."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    @property
    def share(self) -> Path:
        """The host side of dom0's ``/rig``."""
        return Path(self.env["XEN_RIG_STATE"]) / "share"

    def rig(
        self, *args: str, timeout: float, script: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RIG), *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def run(
        self, script: str, timeout: int = 600
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = self.rig(
            "run-script",
            "--timeout",
            str(timeout),
            "-",
            script=script,
            timeout=timeout + 120,
        )
        took = time.monotonic() - started
        print(f"dom0 ({took:.1f}s, rc={result.returncode}): {script.strip()}")
        return result

    @staticmethod
    def whole_ticks(log: str) -> list[dict[str, str]]:
        """The fields of the guest workload's whole verdict lines. A line
        the pty cut short or ran into the next (it drops what nobody
        reads, around a restore or a move) is no tick: a whole one ends
        with its verdict."""
        ticks = []
        for line in log.replace("\r", "").splitlines():
            words = line.split(" reasons=")[0].split()[1:]
            if (
                line.startswith("NCM tick=")
                and all("=" in w for w in words)
                and words[-1].startswith("verdict=")
            ):
                ticks.append(dict(w.split("=", 1) for w in words))
        return ticks

    @staticmethod
    def host_state_triple_fault(domid: int, dmesg: str) -> bool:
        """Whether Xen's log ``dmesg`` holds a triple fault of one of
        ``domid``'s vCPUs whose dump shows Xen's own code segment and
        RIP in Xen's text as the guest's: the rig's emulator (QEMU's TCG
        emulating SVM for the nested Xen) at fault, as a real CPU never
        saves the host's state into a guest's (a VM exit saves the
        guest's). Only the dump of that vCPU counts, up to its CONTEXT
        line: a Xen warning's own "RIP: e008" does not, nor another
        domain's fault."""
        return any(
            re.search(r"RIP:\s+e008:\[<ffff82d0", dump.group(2))
            for dump in re.finditer(
                rf"\b(d{domid}v\d+) Triple fault[^\n]*\n"
                r"((?:(?![^\n]*Triple fault)[^\n]*\n)*?)"
                r"[^\n]*CONTEXT: hvm guest \(\1\)",
                dmesg,
            )
        )


def _problem(message: str) -> None:
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr)[-OUTPUT_TAIL:]


def _free_udp_ports(count: int) -> list[int]:
    socks = [
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)
    ]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# The two rigs' ends of their loopback-only UDP link (XEN_RIG_NET): the
# first rig has its NIC from the start, the second boots only for the
# test that migrates between them.
_LINK = _free_udp_ports(2)


def _boot(rig: XenRig) -> None:
    started = time.monotonic()
    _early_build_done()
    built = rig.rig("build", timeout=BUILD_TIMEOUT)
    if built.returncode != 0:
        pytest.fail(f"xen-rig build failed:\n{_tail(built)}", pytrace=False)
    print(f"xen-rig build: {time.monotonic() - started:.0f}s")
    started = time.monotonic()
    booted = rig.rig("boot", timeout=BOOT_TIMEOUT)
    if booted.returncode != 0:
        pytest.fail(f"xen-rig boot failed:\n{_tail(booted)}", pytrace=False)
    _BOOTED.append(rig)
    print(f"xen-rig boot: {time.monotonic() - started:.0f}s")


# Rigs this session booted, so the patched one can stop the stock ones.
_BOOTED: list[XenRig] = []


def _stop(rig: XenRig) -> None:
    if rig in _BOOTED:
        _BOOTED.remove(rig)
    stopped = rig.rig("stop", timeout=STOP_TIMEOUT)
    if stopped.returncode != 0:
        print(f"xen-rig stop failed:\n{_tail(stopped)}")


@pytest.fixture(scope="session")
def second_xen_rig(
    xen_rig: XenRig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[XenRig]:
    """Another Xen host, linked to ``xen_rig`` by a loopback-only UDP
    network (dom0 eth0 on both)."""
    env = dict(xen_rig.env)
    env["XEN_RIG_STATE"] = str(tmp_path_factory.mktemp("xen-rig-2"))
    env["XEN_RIG_NET"] = f"{_LINK[1]}:{_LINK[0]}"
    rig = XenRig(env)
    try:
        _boot(rig)
        yield rig
    finally:
        _stop(rig)


def _prerequisites() -> None:
    if not _enabled():
        pytest.skip("Xen tier: set NOVA_XEN_NCM_XEN_TESTS=1 (or CI=true)")
    if os.geteuid() != 0:
        _problem("the Xen rig needs root (debootstrap, chroot, mount)")
    for tool in _RIG_TOOLS:
        if shutil.which(tool) is None:
            _problem(
                f"{tool} not found; apt-get install qemu-system-x86 "
                "debootstrap e2fsprogs"
            )


@pytest.fixture(scope="session")
def xen_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenRig]:
    _prerequisites()
    env = dict(os.environ)
    env.pop("XEN_RIG_XEN", None)
    env["XEN_RIG_STATE"] = str(tmp_path_factory.mktemp("xen-rig"))
    env["XEN_RIG_NET"] = f"{_LINK[0]}:{_LINK[1]}"
    rig = XenRig(env)
    try:
        _boot(rig)
        yield rig
    finally:
        _stop(rig)


@pytest.fixture(scope="session")
def patched_xen_rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[XenRig]:
    """A rig running the hypervisor built with ``xen/patches``."""
    _prerequisites()
    for tool in _XEN_BUILD_TOOLS:
        if shutil.which(tool) is None:
            _problem(
                f"{tool} not found; apt-get install build-essential "
                "dpkg-dev bison flex"
            )
    for other in list(_BOOTED):
        _stop(other)
    env = dict(os.environ)
    env["XEN_RIG_STATE"] = str(tmp_path_factory.mktemp("xen-rig-patched"))
    env["XEN_RIG_XEN"] = "patched"
    env.pop("XEN_RIG_NET", None)
    rig = XenRig(env)
    started = time.monotonic()
    _early_build_done()
    built = rig.rig("build-xen", timeout=BUILD_TIMEOUT)
    if built.returncode != 0:
        pytest.fail(
            f"xen-rig build-xen failed:\n{_tail(built)}", pytrace=False
        )
    print(f"xen-rig build-xen: {time.monotonic() - started:.0f}s")
    try:
        _boot(rig)
        yield rig
    finally:
        _stop(rig)
