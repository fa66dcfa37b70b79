"""The command line imports only the module of the command it names."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from nova_xen_ncm.cmd import main


def _registered(module: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    return set(sub.choices)


def test_every_command_is_mapped_to_the_module_registering_it() -> None:
    expected = {
        name: module
        for module in main.SUBCOMMANDS
        for name in _registered(module)
    }
    assert main.COMMAND_MODULES == expected


@pytest.mark.parametrize(
    "argv, command",
    [
        (["save", "g", "f"], "save"),
        (["--config-file", "a.conf", "restore", "f"], "restore"),
        (["--config-file=a.conf", "watch"], "watch"),
        (["--help"], None),
        (["--version"], None),
        ([], None),
    ],
)
def test_the_command_named(argv: list[str], command: str | None) -> None:
    assert main.command_named(argv) == command


def test_a_command_line_parses_alike_with_its_module_only() -> None:
    argv = ["save", "g", "/tmp/g.save", "--keep", "--xen-compatible"]
    alone = vars(main.build_parser("save").parse_args(argv))
    every = vars(main.build_parser().parse_args(argv))
    assert alone.keys() == every.keys()
    assert {k: v for k, v in alone.items() if k != "func"} == {
        k: v for k, v in every.items() if k != "func"
    }


def test_save_does_not_import_the_other_commands() -> None:
    # A fresh interpreter: this one has imported them all already.
    code = (
        "import sys\n"
        "from nova_xen_ncm.cmd import main\n"
        "main.build_parser(main.command_named(['save', 'g', 'f']))\n"
        "print(sorted(m for m in main.SUBCOMMANDS if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    # save's options come from migrate's (which needs demo's parsers and
    # check's --check-snapshot option).
    assert out.strip() == str(
        [
            "nova_xen_ncm.cmd.check",
            "nova_xen_ncm.cmd.demo",
            "nova_xen_ncm.cmd.migrate",
            "nova_xen_ncm.cmd.save",
        ]
    )
