"""Every ctypes prototype of the real Xen driver matches the installed
headers (Debian ``libxen-dev``): return and argument types, as the C
declarations spell them, and the ctypes types the bound functions carry.

Skipped without the headers, except under ``CI=true``, where a missing
``libxen-dev`` is a failure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nova_xen_ncm.host.xen import libs

INCLUDE = Path(os.environ.get("XEN_INCLUDE_DIR", "/usr/include"))


def _headers_present() -> bool:
    return (INCLUDE / "xenctrl.h").is_file()


if not _headers_present():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"no Xen headers in {INCLUDE}: apt-get install libxen-dev",
            pytrace=False,
        )
    pytest.skip(
        "Xen headers not installed (apt-get install libxen-dev)",
        allow_module_level=True,
    )

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_PREPROC = re.compile(r"^\s*#.*?(?<!\\)$", re.M | re.S)
_QUALIFIERS = {"const", "volatile", "struct", "extern", "enum"}


def normalize(decl: str, *, drop_name: bool) -> str:
    """A C type (optionally followed by a name) as PROTOTYPES spells it."""
    array = "[" in decl
    decl = re.sub(r"\[[^]]*\]", "", decl).strip()
    tokens = re.findall(r"[A-Za-z_][A-Za-z_0-9]*|\*", decl)
    tokens = [t for t in tokens if t not in _QUALIFIERS]
    words = [t for t in tokens if t != "*"]
    if drop_name and len(words) > 1 and tokens[-1] != "*":
        tokens = tokens[:-1]
    stars = tokens.count("*") + array
    base = " ".join(t for t in tokens if t != "*")
    if base == "unsigned":
        base = "unsigned int"
    return base + (" " + "*" * stars if stars else "")


def declarations(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, argument types) of the functions declared."""
    text = _COMMENT.sub(" ", text)
    text = _PREPROC.sub(" ", text)
    out = {}
    for stmt in re.split(r"[;{}]", text):
        match = re.match(
            r"\s*(?P<ret>[A-Za-z_][\w\s\*]*?[\s\*])"
            r"(?P<name>[A-Za-z_]\w*)\s*\((?P<args>[^()]*)\)\s*"
            r"(?:[A-Z_][A-Z_0-9]*\s*)*$",
            stmt,
            re.S,
        )
        if not match or "typedef" in match.group("ret"):
            continue
        if match.group("ret").split()[0] == "return":
            # A call in a static inline wrapper's body (libxl.h's compat
            # wrappers of older API versions), not a declaration.
            continue
        args = match.group("args").strip()
        arg_types = (
            []
            if args in ("", "void")
            else [normalize(a, drop_name=True) for a in args.split(",")]
        )
        ret = normalize(match.group("ret"), drop_name=False)
        out[match.group("name")] = (ret, arg_types)
    return out


def _declared(lib: str) -> dict[str, tuple[str, list[str]]]:
    found: dict[str, tuple[str, list[str]]] = {}
    for header in libs.LIBRARIES[lib][1]:
        found.update(declarations((INCLUDE / header).read_text()))
    return found


def test_normalize_spellings() -> None:
    assert normalize("xc_interface *xch", drop_name=True) == "xc_interface *"
    assert normalize("unsigned open_flags", drop_name=True) == "unsigned int"
    assert (
        normalize("const xen_pfn_t arr[/*pages*/]", drop_name=True)
        == "xen_pfn_t *"
    )
    assert normalize("void **paddr", drop_name=True) == "void **"
    assert normalize("struct xs_handle *", drop_name=False) == "xs_handle *"


@pytest.mark.parametrize("name", sorted(libs.PROTOTYPES))
def test_prototype_matches_header(name: str) -> None:
    lib, restype, argtypes = libs.PROTOTYPES[name]
    declared = _declared(lib)
    assert name in declared, (
        f"{name} is not declared in {libs.LIBRARIES[lib][1]}"
    )
    header_ret, header_args = declared[name]
    assert header_ret == restype, f"{name} returns {header_ret}"
    assert header_args == list(argtypes), f"{name} takes {header_args}"


@pytest.mark.parametrize("name", sorted(libs.PROTOTYPES))
def test_bound_function_carries_header_types(name: str) -> None:
    lib, _, _ = libs.PROTOTYPES[name]
    try:
        fn = libs.function(name)
    except libs.LibraryMissing as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(str(exc))
    header_ret, header_args = _declared(lib)[name]
    assert fn.restype is libs.ctype(header_ret)
    assert list(fn.argtypes) == [libs.ctype(a) for a in header_args]
