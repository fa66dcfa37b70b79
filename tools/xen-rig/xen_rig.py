#!/usr/bin/env python3
"""Xen 4.17 test rig: Xen under QEMU with a Debian dom0.

Subcommands:

  build            build Xen, the dom0 kernel, initramfs and root image
                   from Debian packages (cached outside the repository),
                   and with XEN_RIG_QEMU=backports fetch that QEMU
  build-qemu       fetch QEMU from Debian's backports suite into a private
                   prefix in the cache (the host's QEMU is left alone);
                   XEN_RIG_QEMU=backports boots the rig with it
  build-xen        build the hypervisor and xenstored from Debian's source
                   package of Xen with this repository's patch series
                   (xen/patches)
  build-guest      build the Linux guest's initramfs (busybox and the
                   self-checking workload of tools/xen-rig/guest)
  boot             boot Xen under QEMU (builds first when needed) and wait
                   until dom0 accepts commands; XEN_RIG_XEN=patched boots
                   the patched hypervisor and runs the patched xenstored
                   instead of Debian's; XEN_RIG_NET=LOCAL:REMOTE links
                   it to another rig, XEN_RIG_SHARED_DISK=IMAGE gives
                   dom0 a disk another rig shares (serial ncm-shared)
  run CMD...       run a shell command in dom0; its stdout, stderr and
                   exit status become this command's (125 means the rig
                   itself failed)
  run-script FILE  run a bash script (``-`` for stdin) in dom0
  stop             power dom0 off and make sure QEMU is gone
  status           say whether the rig is running
  log              print the boot log

Build artefacts live in ``${XDG_CACHE_HOME:-/var/cache}/nova-xen-ncm/
xen-rig`` (``XEN_RIG_CACHE`` overrides) under a key derived from the build
inputs, so a second build is a no-op.  The running rig's pid file, boot log
and command share live in ``state/`` there (``XEN_RIG_STATE`` overrides).
dom0 sees the repository read-only at ``/project``, installed there as if
with ``pip install -e`` (see ``dom0_project.py``), and runs commands with
``/project`` as working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOM0_INIT = HERE / "dom0-init"
# What dom0's commands run with: the Xen driver's start-up requirement
# (nova_xen_ncm.host.xen.host.DOMID_REUSE_ENV), as a service's unit sets
# it; kept out of dom0-init so that the image need not be rebuilt. The
# tree at /project is read-only (and dom0-init turns bytecode writing
# off): every command compiled the project's modules again, a good part
# of a short command under emulation. They are cached on dom0's disk,
# once per boot, the cache seeded first with the image's own bytecode
# (dom0_pycache.py says why).
DOM0_PYCACHE = "/var/cache/nova-xen-ncm/pycache"
DOM0_SERVICE_ENV = (
    "export LIBXL_DOMID_REUSE_TIMEOUT=0\n"
    "unset PYTHONDONTWRITEBYTECODE\n"
    f"export PYTHONPYCACHEPREFIX={DOM0_PYCACHE}\n"
    f"[ -e {DOM0_PYCACHE}/.seeded ] || "
    f"python3 /project/tools/xen-rig/dom0_pycache.py {DOM0_PYCACHE}\n"
)
XEN_PATCHES = REPO / "xen" / "patches"
GUEST_DIR = HERE / "guest"

SUITE = "bookworm"
XEN_SERIES = "4.17"
BUILD_FORMAT = 2

DOM0_PACKAGES = (
    "linux-image-amd64",
    f"xen-hypervisor-{XEN_SERIES}-amd64",
    f"xen-utils-{XEN_SERIES}",
    "xenstore-utils",
    "qemu-system-xen",
    "seabios",
    "python3",
    "kmod",
    "iproute2",
    "procps",
    "zstd",
)
EXTRA_PYTHON_REQUIREMENTS = ("pytest", "pytest-timeout")
WHEEL_PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_28_x86_64",
    "linux_x86_64",
)
# Kernel module trees dom0 never needs under QEMU; dropping them halves
# the root image.
PRUNED_MODULE_DIRS = (
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/bluetooth",
    "kernel/drivers/iio",
    "kernel/sound",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/net/bluetooth",
)
NODOC = """\
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
"""

QEMU = "qemu-system-x86_64"
# XEN_RIG_QEMU=backports: Debian's backport of a newer QEMU, unpacked
# into a private prefix (the host's own QEMU stays as it is: benchmarks
# compare against it). Bookworm's QEMU 7.2 emulates SVM with bugs fixed
# since (VMRUN ignoring the interrupt shadow, fixed in 9.1), but under
# 10.0.2 every nested Linux guest, PVH or HVM, dies at its first early
# page fault (it reads CR2 as 0): the host's QEMU stays the default.
QEMU_SUITE = f"{SUITE}-backports"
QEMU_PACKAGES = (
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
)
QEMU_MIN_VERSION = (9, 1)
QEMU_FORMAT = 1
# Where Debian's QEMU looks for firmware and data (its configured
# firmware path, not relocatable): passed with -L so that the prefix's
# own are found before the host's.
QEMU_DATA_DIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
QEMU_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
QEMU_MODULES = "usr/lib/x86_64-linux-gnu/qemu"
# qemu64 plus SVM with nested paging for HVM guests and the x86-64-v2
# features the NumPy wheels in dom0 require.
CPU = "qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+lahf-lm"
XEN_ARGS = (
    "dom0_mem=1536M,max:1536M dom0_max_vcpus=1 console=com1 com1=115200,8n1"
)
DOM0_ARGS = (
    "root=/dev/vda rw console=hvc0 init=/usr/local/sbin/rig-init "
    "net.ifnames=0 panic=10"
)

# The patched hypervisor is built from the suite's own source package
# (the security suite's sources are not on every mirror), with Debian's
# hypervisor configuration (debian/xen-kconfig: upstream defaults, no
# debug).
XEN_SOURCE_PACKAGE = "xen"
XEN_BUILD_FORMAT = 2
# What the patched xenstored is built with: Debian's configure options
# (debian/rules) less what the rig never runs; then tools/include, the
# libraries xenstored links and xenstored alone. dom0 runs it against
# Debian's libraries of the same 4.17 series (same sonames).
XEN_TOOLS_CONFIGURE = (
    "--prefix=/usr",
    "--sysconfdir=/etc",
    "--localstatedir=/var",
    "--disable-stubdom",
    "--disable-docs",
    "--disable-qemu-traditional",
    "--disable-rombios",
    "--disable-ocamltools",
    "--disable-golang",
    "--with-system-qemu=/usr/libexec/xen-qemu-system-i386",
    "--with-system-seabios=/usr/share/seabios/bios-256k.bin",
)
XENSTORED_LIBS = (
    "toolcore", "toollog", "evtchn", "gnttab", "call", "foreignmemory",
    "devicemodel", "ctrl",
)  # fmt: skip
# Build tools the patched xenstored needs beyond the hypervisor's, and
# the package naming each.
XEN_TOOLS_NEEDS = {
    "autoconf": "autoconf",
    "autoheader": "autoconf",
    "iasl": "acpica-tools",
    "/usr/share/misc/config.guess": "autotools-dev",
    "/usr/include/yajl/yajl_version.h": "libyajl-dev",
    "/usr/include/uuid/uuid.h": "uuid-dev",
    "/usr/include/ncurses.h": "libncurses-dev",
    "/usr/include/zlib.h": "zlib1g-dev",
}
XEN_FLAVOURS = ("stock", "patched")

BOOT_TIMEOUT = int(os.environ.get("XEN_RIG_BOOT_TIMEOUT", "900"))
RUN_TIMEOUT = int(os.environ.get("XEN_RIG_RUN_TIMEOUT", "1800"))
LIFETIME = int(os.environ.get("XEN_RIG_LIFETIME", str(4 * 3600)))
# QEMU's TCG threading: "multi" (a host thread per emulated CPU) or
# "single" (one thread for both).
TCG_THREADS = ("multi", "single")
STEP_TIMEOUT = 3600


# Exit status of the rig itself failing, as opposed to the status of a
# command it ran in dom0.
RIG_FAILURE = 125


class RigError(Exception):
    """A failure with a message meant for the user."""


def log(msg: str) -> None:
    print(f"xen-rig: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    explicit = os.environ.get("XEN_RIG_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or "/var/cache"
    return Path(base) / "nova-xen-ncm" / "xen-rig"


def state_dir() -> Path:
    explicit = os.environ.get("XEN_RIG_STATE")
    if explicit:
        return Path(explicit)
    return cache_dir() / "state"


def sh(
    cmd: list[str],
    *,
    timeout: float = STEP_TIMEOUT,
    logfile: Path | None = None,
) -> None:
    """Run a build step, its output going to ``logfile`` when given."""
    log("$ " + shlex.join(cmd))
    if logfile is None:
        result = subprocess.run(cmd, timeout=timeout, check=False)
    else:
        with logfile.open("ab") as out:
            result = subprocess.run(
                cmd,
                timeout=timeout,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
    if result.returncode != 0:
        tail = ""
        if logfile is not None:
            tail = "\n" + log_tail(logfile)
        raise RigError(
            f"{shlex.join(cmd)} failed with status {result.returncode}" + tail
        )


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    text = text.replace("\r", "")
    return f"--- last lines of {path} ---\n" + "\n".join(
        text.splitlines()[-lines:]
    )


# -- Debian sources -------------------------------------------------------


def _apt_source_files() -> list[Path]:
    files = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(parts.glob("*.list")) + sorted(parts.glob("*.sources"))
    return [f for f in files if f.is_file()]


def apt_sources() -> list[tuple[str, str]]:
    """(URI, suite) pairs of the host's Debian sources for ``SUITE``."""
    wanted = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    found: list[tuple[str, str]] = []
    for path in _apt_source_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "main" not in fields.get("components", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        if suite in wanted:
                            found.append((uri.rstrip("/"), suite))
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0])
                words = line.split()
                if len(words) >= 4 and words[0] == "deb":
                    uri, suite, comps = words[1], words[2], words[3:]
                    if suite in wanted and "main" in comps:
                        found.append((uri.rstrip("/"), suite))
    return list(dict.fromkeys(found))


def debian_mirror(sources: list[tuple[str, str]]) -> str:
    explicit = os.environ.get("XEN_RIG_MIRROR")
    if explicit:
        return explicit.rstrip("/")
    for uri, suite in sources:
        if suite == SUITE:
            return uri
    raise RigError(
        f"no Debian {SUITE} 'main' source in /etc/apt/sources.list*; "
        "set XEN_RIG_MIRROR"
    )


# -- build ----------------------------------------------------------------


def python_requirements() -> list[str]:
    reqs = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs + list(EXTRA_PYTHON_REQUIREMENTS)


def build_key(mirror: str) -> str:
    inputs = {
        "format": BUILD_FORMAT,
        "suite": SUITE,
        "mirror": mirror,
        "packages": DOM0_PACKAGES,
        "pruned": PRUNED_MODULE_DIRS,
        "requirements": python_requirements(),
        "platforms": WHEEL_PLATFORMS,
        "init": DOM0_INIT.read_text(),
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def image_dir() -> Path:
    sources = apt_sources()
    return cache_dir() / "images" / build_key(debian_mirror(sources))


ARTEFACTS = ("xen", "vmlinuz", "initrd.img", "rootfs.img", "build.json")


def is_built(images: Path) -> bool:
    return all((images / name).is_file() for name in ARTEFACTS)


def mounts_under(path: Path) -> list[Path]:
    prefix = str(path.resolve()) + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that first detaches what a failed build left mounted."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", str(point)], timeout=60)
    if mounts_under(path):
        raise RigError(f"cannot unmount everything under {path}")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def chroot_mounts(root: Path, archives: Path) -> Iterator[None]:
    targets: list[Path] = []
    try:
        for fstype, src, sub, opts in (
            ("proc", "proc", "proc", None),
            ("sysfs", "sysfs", "sys", None),
            (None, "/dev", "dev", "bind"),
            (None, "/dev/pts", "dev/pts", "bind"),
            (None, str(archives), "var/cache/apt/archives", "bind"),
        ):
            target = root / sub
            target.mkdir(parents=True, exist_ok=True)
            cmd = ["mount"]
            if fstype:
                cmd += ["-t", fstype]
            if opts:
                cmd += ["--" + opts]
            subprocess.run(cmd + [src, str(target)], check=True, timeout=60)
            targets.append(target)
        yield
    finally:
        for target in reversed(targets):
            subprocess.run(["umount", "-l", str(target)], timeout=60)


def download_wheels(dest: Path, logfile: Path) -> None:
    reqs = python_requirements()
    key = hashlib.sha256(
        json.dumps([reqs, WHEEL_PLATFORMS]).encode()
    ).hexdigest()[:16]
    cached = cache_dir() / "wheels" / key
    if not (cached / ".complete").exists():
        tmp = cached.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet",
            "--dest", str(tmp), "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311",
        ]  # fmt: skip
        for platform in WHEEL_PLATFORMS:
            cmd += ["--platform", platform]
        sh(cmd + reqs, logfile=logfile)
        (tmp / ".complete").touch()
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    shutil.copytree(cached, dest)
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")


def build(force: bool = False) -> Path:
    for tool in ("debootstrap", "mke2fs", "mount", "chroot"):
        if shutil.which(tool) is None:
            raise RigError(f"{tool} not found (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise RigError("build needs root (debootstrap, chroot, mount)")
    sources = apt_sources()
    mirror = debian_mirror(sources)
    images = cache_dir() / "images" / build_key(mirror)
    if os.environ.get("XEN_RIG_QEMU", "") == "backports":
        build_qemu(force=force)
    if is_built(images) and not force:
        log(f"up to date: {images}")
        return images
    started = time.monotonic()
    work = cache_dir() / "work"
    remove_tree(work)
    work.mkdir(parents=True)
    logfile = work / "build.log"
    log(f"building in {work} (log: {logfile}), mirror {mirror}")
    root = work / "root"
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    sh(
        [
            "debootstrap", "--variant=minbase",
            f"--cache-dir={debs}", SUITE, str(root), mirror,
        ],
        logfile=logfile,
    )  # fmt: skip

    lines = [f"deb {uri} {suite} main" for uri, suite in sources]
    if not any(suite == SUITE for _, suite in sources):
        lines.insert(0, f"deb {mirror} {SUITE} main")
    (root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/dpkg/dpkg.cfg.d/01-xen-rig-nodoc").write_text(NODOC)
    modules = root / "etc/initramfs-tools/modules"
    modules.parent.mkdir(parents=True, exist_ok=True)
    modules.write_text("virtio_pci\nvirtio_blk\next4\n")
    # Only those modules: dom0 boots faster when udev in the initramfs
    # has less to load.
    conf = modules.parent / "conf.d"
    conf.mkdir(exist_ok=True)
    (conf / "xen-rig").write_text("MODULES=list\n")
    download_wheels(root / "tmp/wheels", logfile)

    apt = (
        "export DEBIAN_FRONTEND=noninteractive; set -e; "
        "apt-get update -q; "
        "apt-get install -y -q --no-install-recommends "
        "-o Dpkg::Options::=--force-confold " + " ".join(DOM0_PACKAGES)
    )
    with chroot_mounts(root, debs):
        sh(["chroot", str(root), "sh", "-c", apt], logfile=logfile)
        kvers = sorted(p.name for p in (root / "lib/modules").iterdir())
        for kver in kvers:
            for sub in PRUNED_MODULE_DIRS:
                shutil.rmtree(
                    root / "lib/modules" / kver / sub, ignore_errors=True
                )
            sh(["chroot", str(root), "depmod", "-a", kver], logfile=logfile)
        sh(
            [
                "chroot", str(root), "sh", "-c",
                "apt-get install -y -q --no-install-recommends python3-pip "
                "&& python3 -m pip install --quiet --no-index "
                "--break-system-packages --find-links /tmp/wheels "
                "-r /tmp/wheels/requirements.txt",
            ],
            logfile=logfile,
        )  # fmt: skip
    if len(kvers) != 1:
        raise RigError(f"expected one dom0 kernel, found {kvers}")
    kver = kvers[0]

    init = root / "usr/local/sbin/rig-init"
    shutil.copyfile(DOM0_INIT, init)
    init.chmod(0o755)
    (root / "etc/hostname").write_text("rig-dom0\n")
    (root / "etc/fstab").write_text("")
    for sub in ("project", "rig"):
        (root / sub).mkdir(exist_ok=True)
    for junk in ("tmp/wheels", "var/lib/apt/lists", "root/.cache"):
        shutil.rmtree(root / junk, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for pkgcache in (root / "var/cache/apt").glob("*.bin"):
        pkgcache.unlink()
    policy.unlink()

    out = work / "out"
    out.mkdir()
    with gzip.open(root / f"boot/xen-{XEN_SERIES}-amd64.gz") as src:
        with (out / "xen").open("wb") as dst:
            shutil.copyfileobj(src, dst)
    shutil.copyfile(root / f"boot/vmlinuz-{kver}", out / "vmlinuz")
    shutil.copyfile(root / f"boot/initrd.img-{kver}", out / "initrd.img")
    versions = subprocess.run(
        [
            "chroot", str(root), "dpkg-query", "-W",
            "-f", "${Package} ${Version}\\n",
        ] + list(DOM0_PACKAGES),
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    used = int(
        subprocess.run(
            ["du", "-sxm", str(root)],
            capture_output=True, text=True, check=True, timeout=600,
        ).stdout.split()[0]
    )  # fmt: skip
    size_mb = used + used // 3 + 1024
    sh(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "rig-root",
            "-E", "lazy_itable_init=1,root_owner=0:0",
            "-d", str(root), str(out / "rootfs.img"), f"{size_mb}M",
        ],
        logfile=logfile,
    )  # fmt: skip
    (out / "build.json").write_text(
        json.dumps(
            {
                "mirror": mirror,
                "suite": SUITE,
                "kernel": kver,
                "packages": versions.splitlines(),
                "seconds": round(time.monotonic() - started),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(images, ignore_errors=True)
    images.parent.mkdir(parents=True, exist_ok=True)
    out.rename(images)
    shutil.copyfile(logfile, images / "build.log")
    remove_tree(work)
    for old in images.parent.iterdir():
        if old != images:
            shutil.rmtree(old, ignore_errors=True)
    log(f"built {images} in {time.monotonic() - started:.0f}s")
    return images


# -- the patched hypervisor ------------------------------------------------


def patch_series() -> list[Path]:
    """The patches of ``xen/patches/series``, in order (quilt's format:
    one file name a line, ``#`` comments)."""
    series = XEN_PATCHES / "series"
    patches = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = XEN_PATCHES / name.split()[0]
        if not path.is_file():
            raise RigError(f"{series}: no patch {path.name}")
        patches.append(path)
    if not patches:
        raise RigError(f"{series} names no patch")
    return patches


def xen_key(mirror: str) -> str:
    """Hash of what the patched hypervisor is built from."""
    inputs = {
        "format": XEN_BUILD_FORMAT,
        "suite": SUITE,
        "mirror": mirror,
        "package": XEN_SOURCE_PACKAGE,
        "series": [
            [p.name, hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in patch_series()
        ],
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def patched_xen_dir(mirror: str) -> Path:
    return cache_dir() / "xen-patched" / xen_key(mirror)


def private_apt(apt: Path, lines: list[str], logfile: Path) -> list[str]:
    """apt-get options for a private sources list and apt state under
    ``apt`` (the host's apt configuration is left alone), the lists
    updated; ``lines`` are the sources list's lines."""
    for sub in ("parts", "lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text("\n".join(lines) + "\n")
    opts = [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", f"Dir::Etc::SourceParts={apt / 'parts'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip
    sh(["apt-get", *opts, "update", "-q"], logfile=logfile)
    return opts


def apt_source(mirror: str, dest: Path, logfile: Path) -> Path:
    """``apt-get source`` of Xen from ``mirror``'s ``SUITE`` through a
    private deb-src list, leaving the host's apt configuration alone;
    returns the unpacked tree (Debian's own patches applied)."""
    opts = private_apt(
        cache_dir() / "apt-src", [f"deb-src {mirror} {SUITE} main"], logfile
    )
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(dest):
        sh(
            ["apt-get", *opts, "source", "-q", XEN_SOURCE_PACKAGE],
            logfile=logfile,
        )
    trees = [p for p in dest.iterdir() if p.is_dir()]
    if len(trees) != 1:
        raise RigError(f"apt-get source left {trees} in {dest}")
    return trees[0]


def check_tools_needs() -> None:
    missing = sorted(
        {
            pkg
            for need, pkg in XEN_TOOLS_NEEDS.items()
            if not (
                Path(need).is_file()
                if need.startswith("/")
                else shutil.which(need)
            )
        }
    )
    if missing:
        raise RigError(
            "building the patched xenstored needs "
            + ", ".join(missing)
            + " (apt-get install "
            + " ".join(missing)
            + " python3-dev pkg-config)"
        )


def build_xenstored(tree: Path, logfile: Path) -> Path:
    """Configure the tools of the patched ``tree`` as Debian does (less
    what the rig never runs) and build xenstored with the libraries it
    links; returns the binary."""
    for script in ("config.guess", "config.sub"):
        shutil.copyfile(f"/usr/share/misc/{script}", tree / script)
    # Debian's source package carries no configure output.
    with contextlib.chdir(tree):
        sh(["autoconf", "-f"], logfile=logfile)
    with contextlib.chdir(tree / "tools"):
        sh(["autoconf", "-f"], logfile=logfile)
        sh(["autoheader"], logfile=logfile)
    env = [
        "env", "--unset=CFLAGS", "--unset=CXXFLAGS", "--unset=CPPFLAGS",
        "--unset=LDFLAGS", "WGET=/bin/false", "GIT=/bin/false",
    ]  # fmt: skip
    with contextlib.chdir(tree):
        sh(env + ["./configure", *XEN_TOOLS_CONFIGURE], logfile=logfile)
    make = env + ["make", f"-j{os.cpu_count() or 1}", "-C"]
    sh(make + [str(tree / "tools/include")], logfile=logfile)
    for lib in XENSTORED_LIBS:
        sh(make + [str(tree / "tools/libs" / lib)], logfile=logfile)
    sh(make + [str(tree / "tools/xenstore"), "xenstored"], logfile=logfile)
    return tree / "tools/xenstore/xenstored"


def build_xen(force: bool = False) -> Path:
    """Build the hypervisor and xenstored from Debian's source package
    with the patch series applied; returns the directory holding
    ``xen.gz`` and ``xenstored``."""
    for tool in ("apt-get", "dpkg-source", "patch", "make", "gcc"):
        if shutil.which(tool) is None:
            raise RigError(
                f"{tool} not found (apt-get install dpkg-dev patch "
                "build-essential bison flex python3)"
            )
    check_tools_needs()
    mirror = debian_mirror(apt_sources())
    out = patched_xen_dir(mirror)
    if (
        (out / "xen.gz").is_file()
        and (out / "xenstored").is_file()
        and not force
    ):
        log(f"up to date: {out}")
        return out
    started = time.monotonic()
    work = cache_dir() / "xen-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logfile = work / "build.log"
    log(f"building patched Xen in {work} (log: {logfile})")
    tree = apt_source(mirror, work / "src", logfile)
    fetched = time.monotonic()
    for patch in patch_series():
        sh(
            ["patch", "-p1", "--batch", "--forward", "-d", str(tree),
             "-i", str(patch)],
            logfile=logfile,
        )  # fmt: skip
    shutil.copyfile(tree / "debian/xen-kconfig", tree / "xen/.config")
    env_unset = ["CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS"]
    make = ["env", *(f"--unset={v}" for v in env_unset)]
    # The Xen build must not download anything.
    make += ["WGET=/bin/false", "GIT=/bin/false", "make", "-C",
             str(tree / "xen")]  # fmt: skip
    sh(make + ["olddefconfig"], logfile=logfile)
    # The default target: the hypervisor alone, xen/xen.gz among it.
    sh(make + [f"-j{os.cpu_count() or 1}"], logfile=logfile)
    built = time.monotonic()
    xenstored = build_xenstored(tree, logfile)
    tools_built = time.monotonic()
    version = tree.name.removeprefix(f"{XEN_SOURCE_PACKAGE}-")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(tree / "xen/xen.gz", tmp / "xen.gz")
    shutil.copyfile(xenstored, tmp / "xenstored")
    (tmp / "xenstored").chmod(0o755)
    (tmp / "build.json").write_text(
        json.dumps(
            {
                "mirror": mirror,
                "suite": SUITE,
                "source": f"{XEN_SOURCE_PACKAGE} {version}",
                "series": [p.name for p in patch_series()],
                "fetch_seconds": round(fetched - started),
                "make_seconds": round(built - fetched),
                "xenstored_seconds": round(tools_built - built),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.copyfile(logfile, tmp / "build.log")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    for old in out.parent.iterdir():
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    log(
        f"built {out / 'xen.gz'} and xenstored in "
        f"{time.monotonic() - started:.0f}s (hypervisor make "
        f"{built - fetched:.0f}s, xenstored configure and make "
        f"{tools_built - built:.0f}s)"
    )
    return out


# -- the rig's QEMU ----------------------------------------------------------


def qemu_key(mirror: str) -> str:
    """Hash of where the private QEMU comes from."""
    inputs = {
        "format": QEMU_FORMAT,
        "suite": QEMU_SUITE,
        "mirror": mirror,
        "packages": QEMU_PACKAGES,
        "min": QEMU_MIN_VERSION,
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def installed(package: str) -> bool:
    """Whether the host has ``package`` installed (dpkg's database)."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status}", package],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    return result.returncode == 0 and result.stdout.strip() == "installed"


def deb_depends(debs: list[Path]) -> set[str]:
    """The packages ``debs`` depend on (an alternative's first choice)."""
    names = set()
    for deb in debs:
        for field in ("Pre-Depends", "Depends"):
            for group in deb_field(deb, field).split(","):
                first = group.split("|")[0].strip()
                name = re.split(r"[\s(:]", first, maxsplit=1)[0]
                if name:
                    names.add(name)
    return names


def qemu_release(version: str) -> tuple[int, int]:
    """QEMU's major and minor release from a Debian version
    (``1:10.0.2+ds-2+deb13u1~bpo12+1`` is 10.0)."""
    match = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
    if match is None:
        raise RigError(f"cannot read QEMU's release from version {version!r}")
    return int(match[1]), int(match[2])


def qemu_env(root: Path, library_path: list[str]) -> dict[str, str]:
    """What the private QEMU runs with: its own modules (the host's QEMU
    modules are of another build and refused) and the libraries fetched
    beside it, when the host lacked any."""
    env = {"QEMU_MODULE_DIR": str(root / QEMU_MODULES)}
    if library_path:
        env["LD_LIBRARY_PATH"] = ":".join(str(root / d) for d in library_path)
    return env


def build_qemu(force: bool = False) -> Path:
    """Fetch QEMU from ``QEMU_SUITE`` with ``apt-get download`` (through
    a private sources list) and unpack it with ``dpkg -x`` into a prefix
    in the cache, with whatever libraries it needs that the host lacks;
    returns the directory holding ``root/`` and ``build.json``."""
    for tool in ("apt-get", "dpkg-deb", "dpkg-query", "ldd"):
        if shutil.which(tool) is None:
            raise RigError(f"{tool} not found (apt-get install apt dpkg)")
    sources = apt_sources()
    mirror = debian_mirror(sources)
    out = cache_dir() / "qemu" / qemu_key(mirror)
    if (out / "build.json").is_file() and not force:
        log(f"up to date: {out}")
        return out
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    logfile = tmp / "build.log"
    log(f"fetching QEMU from {mirror} {QEMU_SUITE} into {tmp}")
    lines = [f"deb {uri} {suite} main" for uri, suite in sources]
    if not any(suite == SUITE for _, suite in sources):
        lines.insert(0, f"deb {mirror} {SUITE} main")
    lines.append(f"deb {mirror} {QEMU_SUITE} main")
    opts = private_apt(cache_dir() / "apt-qemu", lines, logfile)
    debs_dir = tmp / "debs"
    debs_dir.mkdir()
    with contextlib.chdir(debs_dir):
        sh(
            ["apt-get", *opts, "download", "-q"]
            + [f"{name}/{QEMU_SUITE}" for name in QEMU_PACKAGES],
            logfile=logfile,
        )
    debs = sorted(debs_dir.glob("*.deb"))
    versions = {deb_field(d, "Package"): deb_field(d, "Version") for d in debs}
    version = versions.get("qemu-system-x86", "")
    if qemu_release(version) < QEMU_MIN_VERSION:
        raise RigError(
            f"{QEMU_SUITE} has qemu-system-x86 {version}; the rig needs "
            + ".".join(map(str, QEMU_MIN_VERSION))
            + " or later"
        )
    # The libraries (and what they need) the host has not installed.
    fetched: set[str] = set(versions)
    extra: list[str] = []
    wanted = deb_depends(debs)
    while True:
        missing = sorted(
            n for n in wanted - fetched if n != "libc6" and not installed(n)
        )
        if not missing:
            break
        with contextlib.chdir(debs_dir):
            sh(["apt-get", *opts, "download", "-q", *missing], logfile=logfile)
        fetched.update(missing)
        extra += missing
        new = [
            d for d in debs_dir.glob("*.deb")
            if deb_field(d, "Package") in missing
        ]  # fmt: skip
        wanted = deb_depends(new)
    root = tmp / "root"
    for deb in sorted(debs_dir.glob("*.deb")):
        sh(["dpkg", "-x", str(deb), str(root)], logfile=logfile)
    shutil.rmtree(debs_dir)
    library_path = [d for d in QEMU_LIB_DIRS if extra and (root / d).is_dir()]
    binary = root / "usr/bin" / QEMU
    env = os.environ | qemu_env(root, library_path)
    ldd = subprocess.run(
        ["ldd", str(binary)],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    unresolved = [
        ln.strip() for ln in ldd.stdout.splitlines() if "not found" in ln
    ]
    if ldd.returncode != 0 or unresolved:
        raise RigError(
            f"{binary}: libraries not resolved: "
            + ("; ".join(unresolved) or ldd.stderr.strip())
        )
    smoke = subprocess.run(
        [str(binary), "-version"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    if smoke.returncode != 0 or "QEMU emulator version" not in smoke.stdout:
        raise RigError(
            f"{binary} -version failed with status {smoke.returncode}: "
            + (smoke.stdout + smoke.stderr).strip()[-2000:]
        )
    (tmp / "build.json").write_text(
        json.dumps(
            {
                "mirror": mirror,
                "suite": QEMU_SUITE,
                "version": version,
                "emulator": smoke.stdout.splitlines()[0],
                "packages": versions,
                "libraries_fetched": extra,
                "library_path": library_path,
                "seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for old in out.parent.iterdir():
        if old != out and (old / "build.json").is_file():
            shutil.rmtree(old, ignore_errors=True)
    log(f"QEMU {version} in {out} after {time.monotonic() - started:.0f}s")
    return out


QEMU_CHOICES = ("system", "backports")


def qemu_command() -> tuple[list[str], dict[str, str], str]:
    """The QEMU that boots the rig (XEN_RIG_QEMU: unset or ``system`` for
    the host's, ``backports`` for the private one, fetched first when
    missing, or a path): its command line's start, its environment and a
    description."""
    choice = os.environ.get("XEN_RIG_QEMU", "") or "system"
    if choice not in QEMU_CHOICES:
        path = Path(choice)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RigError(
                f"XEN_RIG_QEMU={choice!r}: not an executable file "
                f"(expected 'system', 'backports' or the path of a {QEMU})"
            )
        return [str(path)], {}, str(path)
    if choice == "backports":
        prefix = build_qemu()
        built = json.loads((prefix / "build.json").read_text())
        root = prefix / "root"
        cmd = [str(root / "usr/bin" / QEMU)]
        for data in QEMU_DATA_DIRS:
            if (root / data).is_dir():
                cmd += ["-L", str(root / data)]
        env = qemu_env(root, built["library_path"])
        return cmd, env, f"QEMU {built['version']} ({prefix})"
    path = shutil.which(QEMU)
    if path is None:
        raise RigError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    return [path], {}, f"the host's {path}"


# -- the Linux guest's initramfs --------------------------------------------

# Debian's busybox-static: the guest's shell and tools, one static binary.
BUSYBOX = Path("/bin/busybox")
GUEST_FORMAT = 2
# The PV frontends the guest loads, from the dom0 image's kernel (the
# guest boots that kernel): its disk and its network interface.
GUEST_MODULES = (
    "kernel/drivers/block/xen-blkfront.ko",
    "kernel/drivers/net/xen-netfront.ko",
)
WORKLOAD_CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-static", "-pthread")


def _cpio_entry(
    name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]
) -> bytes:
    """One record of the kernel's initramfs format (cpio "newc")."""
    fields = [
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0,
    ]  # fmt: skip
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    body = b"".join(
        _cpio_entry(name, mode, data, ino, (0, 0))
        for ino, (name, mode, data) in enumerate(entries, start=1)
    )
    # The console init's output goes to, opened before /dev is mounted.
    body += _cpio_entry("dev/console", 0o020600, b"", len(entries) + 1, (5, 1))
    return body + _cpio_entry("TRAILER!!!", 0, b"", 0, (0, 0))


def guest_kernel() -> str:
    """The dom0 image's kernel release, which the guest boots."""
    images = image_dir()
    if not is_built(images):
        raise RigError(f"no dom0 image in {images}: run 'build' first")
    return json.loads((images / "build.json").read_text())["kernel"]


def guest_modules(logfile: Path | None = None) -> list[tuple[str, bytes]]:
    """GUEST_MODULES read out of the dom0 image's root file system
    (debugfs: no mount needed)."""
    if shutil.which("debugfs") is None:
        raise RigError("debugfs not found (apt-get install e2fsprogs)")
    rootfs = image_dir() / "rootfs.img"
    kver = guest_kernel()
    out = []
    for rel in GUEST_MODULES:
        result = subprocess.run(
            ["debugfs", "-R", f"cat /lib/modules/{kver}/{rel}", str(rootfs)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0 or not result.stdout.startswith(b"\x7fELF"):
            raise RigError(
                f"{rel} of kernel {kver} not found in {rootfs}: "
                + result.stderr.decode(errors="replace")[-500:]
            )
        out.append((Path(rel).name, result.stdout))
    return out


def guest_dir() -> Path:
    inputs = {
        "format": GUEST_FORMAT,
        "kernel": guest_kernel(),
        "modules": GUEST_MODULES,
        "cflags": WORKLOAD_CFLAGS,
        "files": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(GUEST_DIR.iterdir())
            if p.is_file()
        },
        "busybox": hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
        if BUSYBOX.is_file() else None,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    return cache_dir() / "guest" / key.hexdigest()[:16]


def build_guest(force: bool = False) -> Path:
    """The guest's initramfs: busybox, an init that mounts /proc, /sys and
    /dev, and the workload compiled static here; returns the directory
    holding ``initrd.gz``. The kernel is dom0's (the same Debian
    package, which has Xen's PVH entry point)."""
    if not BUSYBOX.is_file():
        raise RigError(f"{BUSYBOX} not found (apt-get install busybox-static)")
    if shutil.which("gcc") is None:
        raise RigError("gcc not found (apt-get install gcc libc6-dev)")
    out = guest_dir()
    if (out / "initrd.gz").is_file() and not force:
        log(f"up to date: {out}")
        return out
    started = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workload = tmp / "ncm-workload"
    sh(
        ["gcc", *WORKLOAD_CFLAGS, "-o", str(workload),
         str(GUEST_DIR / "ncm-workload.c")],
    )  # fmt: skip
    entries = [
        (d, 0o040755, b"")
        for d in ("bin", "dev", "proc", "sys", "tmp", "sbin", "usr",
                  "usr/bin", "usr/sbin", "lib", "lib/modules")
    ]  # fmt: skip
    entries += [
        (f"lib/modules/{name}", 0o100644, data)
        for name, data in guest_modules()
    ]
    entries += [
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        ("bin/ncm-workload", 0o100755, workload.read_bytes()),
        ("init", 0o100755, (GUEST_DIR / "init").read_bytes()),
    ]
    with gzip.open(tmp / "initrd.gz", "wb", compresslevel=6) as dst:
        dst.write(cpio_newc(entries))
    (tmp / "build.json").write_text(
        json.dumps({"seconds": round(time.monotonic() - started, 1)}) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for old in out.parent.iterdir():
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    log(f"built {out / 'initrd.gz'} in {time.monotonic() - started:.1f}s")
    return out


def tcg_thread() -> str:
    thread = os.environ.get("XEN_RIG_TCG_THREAD", "multi")
    if thread not in TCG_THREADS:
        raise RigError(
            f"XEN_RIG_TCG_THREAD={thread!r}: expected one of "
            + ", ".join(TCG_THREADS)
        )
    return thread


def xen_flavour() -> str:
    flavour = os.environ.get("XEN_RIG_XEN", "stock")
    if flavour not in XEN_FLAVOURS:
        raise RigError(
            f"XEN_RIG_XEN={flavour!r}: expected one of "
            + ", ".join(XEN_FLAVOURS)
        )
    return flavour


def hypervisor_image(images: Path) -> Path:
    """The multiboot image QEMU boots: Debian's, or the patched one
    (built when missing), unpacked next to its ``xen.gz``."""
    if xen_flavour() == "stock":
        return images / "xen"
    built = build_xen()
    image = built / "xen"
    if not image.is_file():
        tmp = built / "xen.tmp"
        with gzip.open(built / "xen.gz") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(image)
    return image


# -- running QEMU ---------------------------------------------------------


def qemu_pid() -> int | None:
    """PID of the rig's QEMU when it is running."""
    try:
        pid = int((state_dir() / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if QEMU.encode() not in cmdline or b"xen-rig" not in cmdline:
        return None
    return pid


def share_dir() -> Path:
    return state_dir() / "share"


def project_version() -> str:
    """The version pbr gave the project installed on the host."""
    try:
        return importlib.metadata.version("nova-xen-ncm")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def network_args() -> list[str]:
    """A NIC on a loopback-only UDP link to another rig, when
    XEN_RIG_NET is ``LOCAL_PORT:REMOTE_PORT`` (two rigs give each other's
    ports; dom0 sees it as eth0, virtio-net)."""
    spec = os.environ.get("XEN_RIG_NET")
    if not spec:
        return []
    try:
        local, remote = (int(p) for p in spec.split(":"))
    except ValueError:
        raise RigError(
            f"XEN_RIG_NET={spec!r}: expected LOCAL_PORT:REMOTE_PORT"
        ) from None
    mac = f"52:54:00:4e:{(local >> 8) & 0xFF:02x}:{local & 0xFF:02x}"
    return [
        "-netdev",
        f"dgram,id=net0,local.type=inet,local.host=127.0.0.1,"
        f"local.port={local},remote.type=inet,remote.host=127.0.0.1,"
        f"remote.port={remote}",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
    ]  # fmt: skip


# The serial dom0 sees on the shared disk (/sys/block/vdX/serial).
SHARED_DISK_SERIAL = "ncm-shared"


def shared_disk_args() -> list[str]:
    """A disk two rigs share, when XEN_RIG_SHARED_DISK names a raw image
    file: both QEMUs open it with no host cache (cache=none: O_DIRECT, so
    each rig reads what the other wrote) and no image locking, and dom0
    sees it as a virtio disk of serial SHARED_DISK_SERIAL. dom0's blkback
    submits a guest's requests to it directly, with no page cache of
    dom0's: the two hosts see one disk, as on a SAN."""
    path = os.environ.get("XEN_RIG_SHARED_DISK")
    if not path:
        return []
    if not Path(path).is_file():
        raise RigError(f"XEN_RIG_SHARED_DISK={path!r}: not a file")
    return [
        "-drive",
        f"file={path},format=raw,if=none,id=shared,cache=none,"
        "file.locking=off",
        # A slot after the root disk's (which QEMU puts in the first
        # free one): dom0's root=/dev/vda stays the root.
        "-device",
        f"virtio-blk-pci,drive=shared,share-rw=on,addr=0x18,"
        f"serial={SHARED_DISK_SERIAL}",
    ]


def boot() -> None:
    if qemu_pid() is not None:
        if (share_dir() / "ready").exists():
            log("already running")
            return
        raise RigError("QEMU is running but dom0 is not ready; run 'stop'")
    images = build()
    qemu, qemu_env_add, qemu_what = qemu_command()
    thread = tcg_thread()  # before anything starts
    hypervisor = hypervisor_image(images)
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(share_dir(), ignore_errors=True)
    (share_dir() / "jobs").mkdir(parents=True)
    if xen_flavour() == "patched":
        # dom0-init starts it in place of Debian's, before any other
        # daemon uses xenstore.
        shutil.copyfile(
            hypervisor.parent / "xenstored", share_dir() / "xenstored"
        )
        (share_dir() / "xenstored").chmod(0o755)
    (share_dir() / "project-version").write_text(project_version() + "\n")
    bootlog = state / "boot.log"
    bootlog.unlink(missing_ok=True)
    pidfile = state / "qemu.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [
        "timeout", "--kill-after=10", str(LIFETIME),
        *qemu, "-name", "xen-rig",
        "-machine", "q35", "-accel", f"tcg,thread={thread}",
        "-smp", "2", "-m", "4096", "-cpu", CPU,
        "-nodefaults", "-display", "none", "-no-reboot",
        "-monitor", "none", "-serial", f"file:{bootlog}",
        "-pidfile", str(pidfile),
        "-kernel", str(hypervisor),
        "-append", XEN_ARGS,
        "-initrd",
        f"{images / 'vmlinuz'} {DOM0_ARGS},{images / 'initrd.img'}",
        "-drive",
        f"file={images / 'rootfs.img'},format=raw,if=virtio,snapshot=on",
        "-virtfs",
        f"local,path={REPO},mount_tag=project,security_model=none,"
        "readonly=on",
        "-virtfs",
        f"local,path={share_dir()},mount_tag=rig,security_model=none",
    ]  # fmt: skip
    cmd += network_args()
    cmd += shared_disk_args()
    log(
        f"booting {xen_flavour()} Xen {hypervisor} with {qemu_what} "
        f"(log: {bootlog})"
    )
    started = time.monotonic()
    with (state / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            env=os.environ | qemu_env_add,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, started + BOOT_TIMEOUT)
    except BaseException:
        abort_boot(proc)
        raise
    log(f"dom0 ready after {time.monotonic() - started:.0f}s")


def wait_ready(proc: subprocess.Popen[bytes], deadline: float) -> None:
    bootlog = state_dir() / "boot.log"
    while not (share_dir() / "ready").exists():
        failed = share_dir() / "failed"
        if failed.exists():
            raise RigError(
                f"dom0 init failed: {failed.read_text().strip()}\n"
                + log_tail(bootlog)
            )
        if proc.poll() is not None:
            qemu_out = (state_dir() / "qemu.out").read_text(errors="replace")
            raise RigError(
                f"QEMU exited with status {proc.returncode} during boot\n"
                + qemu_out
                + log_tail(bootlog)
            )
        if time.monotonic() > deadline:
            raise RigError(
                f"dom0 not ready after {BOOT_TIMEOUT}s\n" + log_tail(bootlog)
            )
        time.sleep(0.5)


def abort_boot(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU (and its lifetime wrapper) after a failed boot."""
    stop()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run(script: str, timeout: int = RUN_TIMEOUT) -> int:
    """Run ``script`` with bash in dom0, relaying its output and status."""
    if qemu_pid() is None or not (share_dir() / "ready").exists():
        raise RigError("the rig is not running; run 'boot' first")
    jobs = share_dir() / "jobs"
    job_id = f"{time.time_ns()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=jobs))
    (tmp / "cmd").write_text(DOM0_SERVICE_ENV + script)
    (tmp / "timeout").write_text(f"{timeout}\n")
    tmp.chmod(0o755)
    job = jobs / job_id
    tmp.rename(job)
    deadline = time.monotonic() + timeout + 60
    while not (job / "rc").exists():
        if qemu_pid() is None:
            raise RigError(
                "QEMU exited while the command ran\n"
                + log_tail(state_dir() / "boot.log")
            )
        if time.monotonic() > deadline:
            raise RigError(
                f"no result from dom0 after {timeout + 60}s\n"
                + log_tail(state_dir() / "boot.log")
            )
        time.sleep(0.1)
    rc = int((job / "rc").read_text().strip())
    sys.stdout.buffer.write((job / "stdout").read_bytes())
    sys.stdout.flush()
    sys.stderr.buffer.write((job / "stderr").read_bytes())
    sys.stderr.flush()
    shutil.rmtree(job, ignore_errors=True)
    return rc


def stop(grace: float = 30.0) -> None:
    pid = qemu_pid()
    if pid is None:
        log("not running")
        return
    if (share_dir() / "ready").exists():
        (share_dir() / "poweroff").touch()
    else:
        grace = 0.0  # dom0 is not listening
    deadline = time.monotonic() + grace
    sig = None
    while qemu_pid() is not None:
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                raise RigError(f"QEMU {pid} does not die")
            sig = signal.SIGTERM if sig is None else signal.SIGKILL
            log(f"sending {sig.name} to QEMU {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 10
        time.sleep(0.2)
    (state_dir() / "qemu.pid").unlink(missing_ok=True)
    log("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xen-rig",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the images")
    p_build.add_argument("--force", action="store_true")
    p_qemu = sub.add_parser("build-qemu", help="fetch the rig's QEMU")
    p_qemu.add_argument("--force", action="store_true")
    p_xen = sub.add_parser("build-xen", help="build the patched hypervisor")
    p_xen.add_argument("--force", action="store_true")
    p_guest = sub.add_parser("build-guest", help="build the Linux guest")
    p_guest.add_argument("--force", action="store_true")
    sub.add_parser("boot", help="boot Xen and wait for dom0")
    p_run = sub.add_parser("run", help="run a command in dom0")
    p_run.add_argument("--timeout", type=int, default=RUN_TIMEOUT)
    p_run.add_argument("argv", nargs=argparse.REMAINDER)
    p_script = sub.add_parser("run-script", help="run a script in dom0")
    p_script.add_argument("--timeout", type=int, default=RUN_TIMEOUT)
    p_script.add_argument("file")
    sub.add_parser("stop", help="power off and kill QEMU")
    sub.add_parser("status", help="is the rig running")
    sub.add_parser("log", help="print the boot log")
    args = parser.parse_args(argv)
    # Unwind (and so kill a QEMU that is still booting) on SIGTERM too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.command == "build":
            print(build(force=args.force))
        elif args.command == "build-qemu":
            print(build_qemu(force=args.force) / "root/usr/bin" / QEMU)
        elif args.command == "build-xen":
            print(build_xen(force=args.force) / "xen.gz")
        elif args.command == "build-guest":
            print(build_guest(force=args.force) / "initrd.gz")
        elif args.command == "boot":
            boot()
        elif args.command == "run":
            if not args.argv:
                parser.error("run needs a command")
            if len(args.argv) == 1:
                script = args.argv[0]
            else:
                script = shlex.join(args.argv)
            return run(script + "\n", args.timeout)
        elif args.command == "run-script":
            if args.file == "-":
                script = sys.stdin.read()
            else:
                script = Path(args.file).read_text()
            return run(script, args.timeout)
        elif args.command == "stop":
            stop()
        elif args.command == "status":
            running = qemu_pid() is not None
            ready = (share_dir() / "ready").exists()
            print("running" if running and ready else "stopped")
            return 0 if running and ready else 3
        elif args.command == "log":
            sys.stdout.write(
                (state_dir() / "boot.log").read_text(errors="replace")
            )
    except RigError as exc:
        log(f"error: {exc}")
        return RIG_FAILURE
    except subprocess.TimeoutExpired as exc:
        log(f"error: timed out: {exc}")
        return RIG_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
