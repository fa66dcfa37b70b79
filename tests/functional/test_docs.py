"""The documentation builds, as ``tox -e docs`` builds it: Sphinx with
warnings as errors, the configuration and command-line references
generated from the installed code."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Only bounds a hung build; nothing is asserted about time.
HANG_LIMIT = 600


def test_sphinx_builds_without_a_warning(tmp_path):
    out = tmp_path / "html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "doc" / "source"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT,
        cwd=ROOT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    # The generated references hold what the code defines.
    options = (out / "configuration.html").read_text()
    assert "state_path" in options and "xen_ncm_drain" in options
    osc = (out / "cli" / "openstack.html").read_text()
    for command in ("host-drain", "migration-watch", "migration-recover"):
        assert f'<section id="xen-ncm-{command}">' in osc
    assert "cmdoption-openstack-xen-ncm-host-drain-dry-run" in osc
    script = (out / "cli" / "nova-xen-ncm.html").read_text()
    assert '<section id="nova-xen-ncm-drain">' in script
    assert "usage: nova-xen-ncm drain" in script


def test_doc_requirements_are_bounded_above():
    # A new major Sphinx or theme release changes what warns, and the
    # build treats warnings as errors: each tool is capped, as
    # OpenStack's doc requirements are, and the cap admits what runs.
    from importlib import metadata

    from packaging.requirements import Requirement

    lines = (ROOT / "doc" / "requirements.txt").read_text().splitlines()
    requirements = [
        Requirement(line.split("#", 1)[0])
        for line in lines
        if line.split("#", 1)[0].strip()
    ]
    assert {r.name for r in requirements} >= {"sphinx", "openstackdocstheme"}
    for requirement in requirements:
        assert any(s.operator in ("<", "<=") for s in requirement.specifier), (
            f"{requirement} has no upper bound"
        )
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), (
            f"{requirement.name} {installed} is outside {requirement}"
        )


def test_the_readmes_parse_without_an_error():
    # The READMEs are read on the forge and by hand, outside Sphinx: a
    # malformed table there shows as raw text, which no build catches.
    import io

    import docutils.core

    for path in (ROOT / "README.rst", ROOT / "benchmarks" / "README.rst"):
        warnings = io.StringIO()
        docutils.core.publish_doctree(
            path.read_text(),
            source_path=str(path),
            settings_overrides={
                "warning_stream": warnings,
                "report_level": 2,
                "halt_level": 5,
            },
        )
        assert warnings.getvalue() == "", warnings.getvalue()
