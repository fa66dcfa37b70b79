"""A transparency checker snapshot (:class:`~.base.GuestState`) as a file.

The source's snapshot taken while the guest is paused must reach the
destination's judgement, on another host and later: it is written as
JSON with every value tagged by its type, so that what is read back
compares equal to what was written (bytes stay bytes, tuples tuples,
NumPy digests arrays of the same dtype and shape, dataclasses and enums
of the checker's own types). Only those types are accepted, both ways:
a file cannot make the reader build anything else. The memory item is
a digest per page (16 octets each), never the RAM: 1 GiB of guest is
about 8 MiB of file.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

FORMAT = "nova-xen-ncm-guest-state"
VERSION = 1
# A file larger than this is refused before it is parsed (a snapshot of
# a 64 GiB guest is about 0.5 GiB).
MAX_FILE = 1 << 30

_DATACLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        base.EventChannel,
        base.EventChannelState,
        base.GrantTableState,
        base.SharedInfoState,
        base.VcpuInfoPlacement,
        base.XenstoreNode,
        base.XenstoreWatch,
        base.XenstoreTransaction,
        base.XenstoreState,
        base.InflightRequest,
        base.BackendState,
        checker.SharedRing,
        checker.DeviceView,
    )
}
_ENUMS: dict[str, type[enum.Enum]] = {
    cls.__name__: cls for cls in (base.Item, base.EvtchnAbi, base.EvtchnType)
}
_DTYPES = frozenset(("uint8", "uint32", "uint64", "int64"))


class SnapshotFileError(ValueError):
    """The file is not a snapshot this version reads; says why."""


def dumps(state: base.GuestState) -> bytes:
    """``state`` as the file's bytes."""
    return json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "items": _enc(dict(state.items)),
            "frontends": _enc(dict(state.frontends)),
            "kernel": _enc(dict(state.kernel)),
            "unread": _enc(dict(state.unread)),
        },
        separators=(",", ":"),
    ).encode()


def loads(data: bytes) -> base.GuestState:
    """The GuestState of a file :func:`dumps` wrote."""
    if len(data) > MAX_FILE:
        raise SnapshotFileError(
            f"{len(data)} octets, more than a snapshot ({MAX_FILE})"
        )
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # RecursionError: nested deeper than any snapshot is.
        raise SnapshotFileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotFileError("not a guest state snapshot")
    if doc.get("version") != VERSION:
        raise SnapshotFileError(
            f"snapshot version {doc.get('version')!r}, this reads {VERSION}"
        )
    try:
        items = _dec(doc["items"])
        state = base.GuestState(
            items=items,
            frontends=_dec(doc["frontends"]),
            kernel=_dec(doc["kernel"]),
            unread=_dec(doc["unread"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotFileError(f"malformed snapshot: {exc!r}") from None
    for key in (*state.items, *state.unread):
        if not isinstance(key, base.Item):
            raise SnapshotFileError(f"{key!r} is not an item")
    return state


def write(path: str, state: base.GuestState) -> None:
    with open(path, "wb") as f:
        f.write(dumps(state))


def read(path: str) -> base.GuestState:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    return loads(data)


def _enc(v: Any) -> Any:
    # Exact types first: bool is an int, IntEnum an int, and so on.
    if v is None or type(v) in (bool, str):
        return v
    if isinstance(v, enum.Enum):
        name = type(v).__name__
        if _ENUMS.get(name) is not type(v):
            raise TypeError(f"cannot write enum {type(v)!r}")
        return {"e": name, "v": v.value}
    if type(v) is int:
        return v
    if type(v) is float:
        return {"f": v.hex()}
    if isinstance(v, np.ndarray):
        if v.dtype.name not in _DTYPES:
            raise TypeError(f"cannot write an array of {v.dtype}")
        return {
            "a": v.dtype.name,
            "s": list(v.shape),
            "b": base64.b64encode(
                np.ascontiguousarray(v)
                .astype(v.dtype.newbyteorder("<"))
                .tobytes()
            ).decode(),
        }
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(v)).decode()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = type(v).__name__
        if _DATACLASSES.get(name) is not type(v):
            raise TypeError(f"cannot write {type(v)!r}")
        return {
            "d": name,
            "f": {
                f.name: _enc(getattr(v, f.name)) for f in dataclasses.fields(v)
            },
        }
    if isinstance(v, tuple):
        return {"t": [_enc(x) for x in v]}
    if isinstance(v, list):
        return {"l": [_enc(x) for x in v]}
    if isinstance(v, Mapping):
        return {"m": [[_enc(k), _enc(x)] for k, x in v.items()]}
    raise TypeError(f"cannot write {type(v)!r}")


def _dec(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if not isinstance(v, dict) or len(v) not in (1, 2, 3):
        raise ValueError(f"untagged value {v!r:.60}")
    if "e" in v:
        cls = _ENUMS[v["e"]]
        return cls(v["v"])
    if "f" in v and len(v) == 1:
        return float.fromhex(v["f"])
    if "a" in v:
        if v["a"] not in _DTYPES:
            raise ValueError(f"array of {v['a']!r}")
        dtype = np.dtype(v["a"]).newbyteorder("<")
        shape = tuple(int(n) for n in v["s"])
        raw = base64.b64decode(v["b"], validate=True)
        return (
            np.frombuffer(raw, dtype=dtype)
            .reshape(shape)
            .astype(np.dtype(v["a"]))
        )
    if "b" in v:
        return base64.b64decode(v["b"], validate=True)
    if "d" in v:
        cls = _DATACLASSES[v["d"]]
        return cls(**{k: _dec(x) for k, x in v["f"].items()})
    if "t" in v:
        return tuple(_dec(x) for x in v["t"])
    if "l" in v:
        return [_dec(x) for x in v["l"]]
    if "m" in v:
        return {_dec(k): _dec(x) for k, x in v["m"]}
    raise ValueError(f"unknown tag in {v!r:.60}")
