"""``.. nova-xen-ncm-commands::``: the ``--help`` of the ``nova-xen-ncm``
console script and of each of its commands, from the parser the script
builds, so the CLI reference cannot drift from the code."""

from __future__ import annotations

import argparse
import os
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# argparse wraps its help at the terminal's width: a fixed one here, so
# the page does not depend on where it was built.
WIDTH = "79"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return parser.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _block(text: str) -> list[str]:
    # Help text, not code: no highlighting.
    return (
        [".. code-block:: text", ""]
        + [f"    {line}" for line in text.splitlines()]
        + [""]
    )


class NovaXenNcmCommands(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from nova_xen_ncm.cmd import main

        parser = main.build_parser()
        lines = _block(_help(parser))
        for name, sub in _subparsers(parser).items():
            title = f"nova-xen-ncm {name}"
            lines += [title, "~" * len(title), ""]
            lines += _block(_help(sub))
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(
            self.state, StringList(lines, source="nova-xen-ncm --help"), node
        )
        return node.children


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("nova-xen-ncm-commands", NovaXenNcmCommands)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
