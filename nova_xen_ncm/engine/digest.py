"""Digests of a guest's visible state, which both ends compare before
COMMIT (the invariant of architecture.rst section 2)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from nova_xen_ncm.host import base

#: What a guest without PV drivers needs restored; all is digested before
#: a PV import may change memory.
PLATFORM_ITEMS = (
    base.Item.MEMORY,
    base.Item.PLATFORM,
    base.Item.HVM_PARAMS,
)


#: SETUP names the source's memory digest definition
#: (base.Capabilities.memory_digest) among its required names, after this
#: prefix: a destination that digests otherwise refuses at SETUP, not with
#: a mismatch of equal memory in the downtime.
MEMORY_DIGEST = "memory-digest="


def needed_items(pv_drivers: bool) -> tuple[base.Item, ...]:
    """The invariant items a guest needs restored (Capabilities.missing)."""
    return tuple(base.Item) if pv_drivers else PLATFORM_ITEMS


def guest_digests(
    state: base.GuestState, items: Iterable[base.Item]
) -> dict[str, str]:
    """SHA-256 of each item's guest-visible value: the values are plain
    data (tuples, dataclasses, enums), whose repr is canonical."""
    return {
        item.value: hashlib.sha256(
            repr(state.items.get(item)).encode()
        ).hexdigest()
        for item in items
    }


def format_digests(digests: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(digests.items()))


def parse_digests(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        if part:
            name, _, digest = part.partition("=")
            out[name] = digest
    return out
