"""The committed sample configuration is what the options generate.

When this fails, regenerate the sample and commit it with the option
change::

    oslo-config-generator \
        --config-file etc/nova-xen-ncm/nova-xen-ncm-config-generator.conf

(``tox -e genconfig`` runs the same.)
"""

import configparser
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATOR_CONF = ROOT / "etc/nova-xen-ncm/nova-xen-ncm-config-generator.conf"
SAMPLE = ROOT / "etc/nova-xen-ncm/nova-xen-ncm.conf.sample"
COMMAND = (
    "oslo-config-generator --config-file "
    "etc/nova-xen-ncm/nova-xen-ncm-config-generator.conf"
)


def generate(tmp_path: pathlib.Path) -> str:
    out = tmp_path / "nova-xen-ncm.conf.sample"
    # The generator's own settings, with the output moved to tmp_path.
    settings = configparser.ConfigParser()
    settings.read(GENERATOR_CONF)
    settings["DEFAULT"]["output_file"] = str(out)
    conf = tmp_path / "generator.conf"
    with conf.open("w") as f:
        settings.write(f)
    # This interpreter, not an oslo-config-generator found on PATH that
    # may belong to another environment and import another checkout.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "oslo_config.generator",
            "--config-file",
            str(conf),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out.read_text()


def test_sample_is_up_to_date(tmp_path):
    assert SAMPLE.exists(), f"no {SAMPLE.name}; run: {COMMAND}"
    expected = generate(tmp_path)
    assert SAMPLE.read_text() == expected, (
        f"{SAMPLE.relative_to(ROOT)} is out of date with the options; "
        f"regenerate it and commit the result:\n    {COMMAND}"
    )
