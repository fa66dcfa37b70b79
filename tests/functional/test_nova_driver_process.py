"""Runs the Nova driver's tests in an interpreter of their own.

Nova's test packages monkey-patch the whole process with eventlet when
imported, which must not leak into the rest of the session (sockets and
threads of every later test would be green), so the tests under
tests/unit/virt and tests/functional/virt run in a child pytest; this test
fails with the child's output when any of them fails or is skipped.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _nova_installed() -> bool:
    return importlib.util.find_spec("nova") is not None


# The child suites, by the id each test reports: the tree and whether
# Nova runs in its native threading mode (nova-compute and
# nova-conductor run so by default in Nova 34: no eventlet patching).
SUITES = {
    "unit": ("tests/unit/virt", False),
    "functional-eventlet": ("tests/functional/virt", False),
    "functional-threads": ("tests/functional/virt", True),
}
# Only bounds a hung child; nothing is asserted about time.
HANG_LIMIT = 1800


class _Child:
    """One child pytest, its output kept in files (a pipe nobody reads
    while the others run would fill and stall it)."""

    def __init__(self, name: str, tree: str, threads: bool, tmp) -> None:
        env = dict(os.environ, NOVA_XEN_NCM_NOVA_PROCESS="1")
        env.pop("OS_NOVA_DISABLE_EVENTLET_PATCHING", None)
        if threads:
            env["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "true"
        self.stdout = (tmp / f"{name}.out").open("w+")
        self.stderr = (tmp / f"{name}.err").open("w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                # The summary names each failure and skip with its
                # message at the end, where the report below looks.
                "-rfEs",
                "-p",
                "no:cacheprovider",
                # Each child its own temporary tree: they run at once.
                f"--basetemp={tmp / name}",
                tree,
            ],
            cwd=ROOT,
            env=env,
            stdout=self.stdout,
            stderr=self.stderr,
            text=True,
        )
        self.started = time.monotonic()

    def result(self) -> tuple[int, str, str]:
        # The bound counts from the start: all run at once.
        left = self.started + HANG_LIMIT - time.monotonic()
        try:
            returncode = self.process.wait(timeout=max(left, 0))
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
            self.stderr.write(f"\nkilled after {HANG_LIMIT} s\n")
        outputs = []
        for f in (self.stdout, self.stderr):
            f.seek(0)
            outputs.append(f.read())
        self.close()
        return returncode, outputs[0], outputs[1]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()


class _Children(dict):
    """The children by suite, a suite not started yet starting when its
    test asks for it."""

    def __init__(self, tmp) -> None:
        super().__init__()
        self.tmp = tmp

    def __missing__(self, name: str) -> _Child:
        tree, threads = SUITES[name]
        self[name] = child = _Child(name, tree, threads, self.tmp)
        return child


@pytest.fixture(scope="module")
def children(request, tmp_path_factory) -> Iterator[_Children]:
    """The child suites, those this session runs all started at once:
    they wait on Nova's services far more than they compute (under half
    a core each), so together they take about as long as the slowest
    alone. A suite deselected (-k) is not started; under xdist each
    starts with its test, as a worker knows not which tests it gets."""
    if not _nova_installed():
        if os.environ.get("CI") == "true":
            pytest.fail("Nova is not installed (test-requirements.txt)")
        pytest.skip("Nova is not installed")
    started = _Children(tmp_path_factory.mktemp("nova-children"))
    if "PYTEST_XDIST_WORKER" not in os.environ:
        for item in request.session.items:
            callspec = getattr(item, "callspec", None)
            if (
                getattr(item, "originalname", None)
                == "test_nova_driver_tests_pass"
                and item.module is request.module
                and callspec is not None
            ):
                started[callspec.params["name"]]
    yield started
    for child in started.values():
        child.close()


@pytest.mark.parametrize("name", list(SUITES))
def test_nova_driver_tests_pass(children, name):
    returncode, stdout, stderr = children[name].result()
    output = _report(stdout, stderr)
    assert returncode == 0, output
    assert stdout.strip(), output
    summary = stdout.strip().splitlines()[-1]
    assert " passed" in summary, output
    assert "skipped" not in summary, output


def _report(stdout: str, stderr: str) -> str:
    """What a failed child printed that says why: the start of its first
    failure (the assertion, before the captured logs that can fill any
    tail) and its tail (the short summary naming every failure)."""
    head = ""
    for banner in ("= FAILURES =", "= ERRORS ="):
        at = stdout.find(banner)
        if at >= 0:
            head = stdout[at : at + 12000] + "\n[...]\n"
            break
    return head + stdout[-12000:] + stderr[-5000:]


# -- the driver as installed: Nova's layouts ------------------------------

# What nova-conductor and then nova-compute do, in one fresh interpreter:
# register Nova's objects (nothing of the driver) and rebuild migrate
# data from an RPC primitive, then load compute_driver the way
# nova.virt.driver.load_compute_driver does.
SERVICE_CHECK = r"""
import json
import sys

import nova.conf
import nova.virt
from nova import context
from nova import objects
from nova.objects import base

nova.conf.CONF([], project="nova", default_config_files=[])
objects.register_all()
primitive = {
    "nova_object.name": "XenNCMLiveMigrateData",
    "nova_object.namespace": "nova",
    "nova_object.version": "1.0",
    "nova_object.data": {"migration_id": "m-1", "receiver_port": 49152},
}
data = base.NovaObjectSerializer().deserialize_entity(
    context.RequestContext(is_admin=True), primitive
)
conductor_loaded_driver = "nova_xen_ncm.virt.driver" in sys.modules
from nova.virt import driver as virt_driver

compute = virt_driver.load_compute_driver(None, "xen_ncm.XenNCMDriver")
import nova_xen_ncm

print(json.dumps({
    "migrate_data": [type(data).__name__, data.migration_id],
    "conductor_loaded_driver": conductor_loaded_driver,
    "driver": type(compute).__module__ + "." + type(compute).__name__,
    "nova_virt": nova.virt.__path__[0],
    "nova_xen_ncm": nova_xen_ncm.__file__,
}))
"""


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    assert result.returncode == 0, "\n".join(
        [
            " ".join(map(str, args)),
            result.stdout[-3000:],
            result.stderr[-6000:],
        ]
    )
    return result


def _site_dirs() -> list[pathlib.Path]:
    """This interpreter's site-packages, its own first: a venv's (the
    README's test command runs in one), then the base interpreter's when
    the venv sees them (or when this is no venv)."""
    import site

    return [pathlib.Path(p) for p in site.getsitepackages()]


def _venv(path: pathlib.Path, system_site: bool) -> pathlib.Path:
    """A venv; with ``system_site`` it sees every package this
    interpreter sees (``--system-site-packages`` alone would give it the
    base interpreter's, not those of a venv the tests run in)."""
    _run(sys.executable, "-m", "venv", path)
    python = path / "bin" / "python"
    if system_site:
        site = _run(
            python,
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ).stdout.strip()
        lines = "".join(
            f"import site; site.addsitedir({str(d)!r})\n" for d in _site_dirs()
        )
        pathlib.Path(site, "zz_outer_site.pth").write_text(lines)
    return python


BUILD_TOOLS = {
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "distutils",
    "pip",
    "wheel",
}


def _site_without_nova(venv_python: pathlib.Path, shadow: pathlib.Path):
    """Gives a venv of its own every package of this interpreter except
    Nova, as DevStack's venv has them: a directory of links to them,
    added as a site directory (its .pth files run too)."""
    shadow.mkdir()
    entries = {}
    for directory in _site_dirs():
        for entry in directory.iterdir():
            # The first site directory that has it wins, as on sys.path.
            entries.setdefault(entry.name, entry)
    for entry in entries.values():
        name = entry.name.lower()
        if name == "nova" or name.startswith("nova-"):
            continue
        if name.startswith(("nova_xen_ncm", "__editable__.nova_xen_ncm")):
            continue
        # The venv has its own build tools; these would shadow the ones
        # pip's isolated builds install.
        if name.split("-")[0] in BUILD_TOOLS:
            continue
        (shadow / entry.name).symlink_to(entry)
    site = _run(
        venv_python,
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ).stdout.strip()
    # Named to sort after the editable installs' .pth files.
    pathlib.Path(site, "zz_system_site.pth").write_text(
        f"import site; site.addsitedir({str(shadow)!r})\n"
    )


def _pip(python: pathlib.Path, *args) -> None:
    _run(python, "-m", "pip", "install", "-q", "--no-deps", *args)


@pytest.fixture(scope="module")
def layouts_dir(tmp_path_factory):
    if not _nova_installed():
        if os.environ.get("CI") == "true":
            pytest.fail("Nova is not installed (test-requirements.txt)")
        pytest.skip("Nova is not installed")
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def this_wheel(layouts_dir) -> pathlib.Path:
    out = layouts_dir / "wheels"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "-w",
        out,
        ROOT,
    )
    (wheel,) = out.glob("nova_xen_ncm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def nova_sdist(layouts_dir) -> pathlib.Path:
    """The sdist of the installed Nova's release, from the package index
    (what DevStack clones from git)."""
    from importlib import metadata

    version = metadata.version("nova")
    out = layouts_dir / "sdist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        "nova",
        "-d",
        out,
        f"nova=={version}",
    )
    (archive,) = out.glob(f"nova-{version}.tar.gz")
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / f"nova-{version}"


def _check(python: pathlib.Path) -> dict:
    import json

    out = _run(python, "-c", SERVICE_CHECK, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_loaded(found: dict, nova_virt: pathlib.Path) -> None:
    assert found["migrate_data"] == ["XenNCMLiveMigrateData", "m-1"]
    # The conductor rebuilt the object without loading the driver.
    assert found["conductor_loaded_driver"] is False
    assert found["driver"] == "nova_xen_ncm.virt.driver.XenNCMDriver"
    assert pathlib.Path(found["nova_virt"]) == nova_virt


def test_editable_nova_devstack_layout(layouts_dir, nova_sdist, this_wheel):
    # DevStack's layout: Nova from its source tree (setup_develop) in a
    # venv that has no other Nova.
    python = _venv(layouts_dir / "devstack", system_site=False)
    _site_without_nova(python, layouts_dir / "devstack-site")
    _pip(python, "-e", nova_sdist)
    nova_virt = nova_sdist / "nova" / "virt"

    # This project from a wheel: its .pth does everything.
    _pip(python, this_wheel)
    _assert_loaded(_check(python), nova_virt)
    _run(python, "-m", "pip", "uninstall", "-q", "-y", "nova-xen-ncm")

    # The plugin's way: setup_develop, which installs no .pth, then
    # "python -m nova_xen_ncm.virt.novahook install".
    _pip(python, "-e", ROOT)
    without = subprocess.run(
        [python, "-c", SERVICE_CHECK], capture_output=True, text=True
    )
    assert without.returncode != 0
    assert "XenNCMLiveMigrateData" in without.stderr, without.stderr[-3000:]
    _run(python, "-m", "nova_xen_ncm.virt.novahook", "install")
    found = _check(python)
    _assert_loaded(found, nova_virt)
    assert found["nova_xen_ncm"] == str(ROOT / "nova_xen_ncm/__init__.py")


def test_nova_wheel_and_wheel_in_another_site(layouts_dir, this_wheel):
    # Nova from a wheel in this interpreter's site-packages, the driver
    # from a wheel in a venv's: two site-packages.
    import nova.virt

    python = _venv(layouts_dir / "wheels-venv", system_site=True)
    _pip(python, this_wheel)
    _assert_loaded(_check(python), pathlib.Path(nova.virt.__path__[0]))


def test_a_failed_childs_report_keeps_its_assertion_past_long_logs():
    # A failure's captured logs can be far longer than any tail kept:
    # the report still shows the assertion and the summary's name.
    stdout = (
        "tests/functional/virt/test_x.py F\n"
        "=================== FAILURES ===================\n"
        "E   AssertionError: ('host2', 'active') != ('host2', 'error')\n"
        + "INFO a captured log line\n"
        * 5000
        + "FAILED tests/functional/virt/test_x.py::T::test_y - Assert\n"
        "1 failed in 1.00s\n"
    )
    report = _report(stdout, "")
    assert "('host2', 'active') != ('host2', 'error')" in report
    assert "FAILED tests/functional/virt/test_x.py::T::test_y" in report
    assert len(report) < len(stdout) / 2
