"""Grant tables, version 1 (xen/include/public/grant_table.h).

The guest writes ``grant_entry_v1`` {u16 flags, u16 domid, u32 frame}
into its grant frames (Xen pages it maps with XENMAPSPACE_grant_table);
a backend maps a granted page with GNTTABOP_map_grant_ref semantics: the
entry must be GTF_permit_access for the mapping domain, a writable map of
a GTF_readonly entry is refused, and while mapped the entry carries
GTF_reading (and GTF_writing for a writable map), cleared when the last
such mapping goes (xen/common/grant_table.c). Version 2 is not
implemented.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from nova_xen_ncm.host.base import PAGE_SIZE
from nova_xen_ncm.host.base import HostError

GRANT_ENTRY_V1 = struct.Struct("<HHI")
# grant_table.h: entries the toolstack seeds for the console and xenstore.
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY_V1.size

GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_no_space = -13

MAX_MAPTRACK = 65536


class GrantError(HostError):
    """A grant operation failed; ``status`` is its GNTST_* code."""

    def __init__(self, call: str, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{message} (GNTST {status})", call=call)


@dataclasses.dataclass
class Active:
    """Xen's active grant entry: pins by readonly and writable maps."""

    domid: int
    gfn: int
    readonly_pins: int = 0
    writable_pins: int = 0


class GrantTable:
    """The grant table of one domain; ``frames`` are its Xen pages."""

    def __init__(self, frames: np.ndarray) -> None:
        # frames: (MAX_GRANT_FRAMES, PAGE_SIZE) uint8 of the Xen pages.
        self.frames = frames
        self.nr_frames = 1
        self.active: dict[int, Active] = {}

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * ENTRIES_PER_FRAME

    def grow(self, nr_frames: int) -> None:
        if nr_frames > len(self.frames):
            raise GrantError(
                "XENMEM_add_to_physmap",
                GNTST_no_space,
                f"grant table limited to {len(self.frames)} frames",
            )
        self.nr_frames = max(self.nr_frames, nr_frames)

    def _entry_bytes(self, ref: int) -> memoryview:
        frame, index = divmod(ref, ENTRIES_PER_FRAME)
        off = index * GRANT_ENTRY_V1.size
        return memoryview(self.frames[frame])[off : off + 8]

    def read(self, ref: int) -> tuple[int, int, int]:
        return GRANT_ENTRY_V1.unpack(self._entry_bytes(ref))

    def set_flags(self, ref: int, flags: int) -> None:
        struct.pack_into("<H", self._entry_bytes(ref), 0, flags)

    def write(self, ref: int, flags: int, domid: int, gfn: int) -> None:
        """As the guest does: frame and domid first, then flags."""
        entry = self._entry_bytes(ref)
        struct.pack_into("<HI", entry, 2, domid, gfn)
        struct.pack_into("<H", entry, 0, flags)

    def pin(self, ref: int, mapper: int, readonly: bool) -> int:
        """Check the entry and take a pin; returns the granted gfn.

        The caller holds the granting domain's memory lock.
        """
        call = "GNTTABOP_map_grant_ref"
        if not 0 <= ref < self.nr_entries:
            raise GrantError(
                call,
                GNTST_bad_gntref,
                f"grant reference {ref} beyond the table's "
                f"{self.nr_entries} entries",
            )
        flags, domid, gfn = self.read(ref)
        # Xen's _set_status_v1() fails a bad entry with
        # GNTST_general_error ("Bad flags or dom", "write-pin a r/o
        # grant entry"), not GNTST_permission_denied.
        if flags & GTF_type_mask != GTF_permit_access:
            raise GrantError(
                call,
                GNTST_general_error,
                f"grant reference {ref} does not permit "
                f"access (flags {flags:#x})",
            )
        if domid != mapper:
            raise GrantError(
                call,
                GNTST_general_error,
                f"grant reference {ref} is for domain {domid}, not {mapper}",
            )
        if not readonly and flags & GTF_readonly:
            raise GrantError(
                call,
                GNTST_general_error,
                f"grant reference {ref} is read-only",
            )
        act = self.active.get(ref)
        if act is not None and (act.domid != domid or act.gfn != gfn):
            raise GrantError(
                call,
                GNTST_general_error,
                f"grant reference {ref} changed while mapped",
            )
        if act is None:
            act = self.active[ref] = Active(domid, gfn)
        new = flags | GTF_reading
        if readonly:
            act.readonly_pins += 1
        else:
            act.writable_pins += 1
            new |= GTF_writing
        self.set_flags(ref, new)
        return gfn

    def unpin(self, ref: int, readonly: bool) -> int:
        act = self.active[ref]
        if readonly:
            act.readonly_pins -= 1
        else:
            act.writable_pins -= 1
        flags, _, _ = self.read(ref)
        if act.writable_pins == 0:
            flags &= ~GTF_writing
        if act.writable_pins + act.readonly_pins == 0:
            flags &= ~(GTF_reading | GTF_writing)
            del self.active[ref]
        self.set_flags(ref, flags)
        return act.gfn

    def writably_mapped_gfns(self) -> np.ndarray:
        return np.array(
            sorted({a.gfn for a in self.active.values() if a.writable_pins}),
            dtype=np.uint64,
        )

    def clear_status_bits(self, keep: set[int] = frozenset()) -> None:
        """Drop GTF_reading/GTF_writing from every entry but ``keep``
        (after a restore: nothing maps them here, except the backends
        that will map exactly the ``keep`` references again)."""
        entries = self.frames[: self.nr_frames].reshape(-1, 8)
        flags = entries[:, 0:2].copy().view(np.uint16).reshape(-1)
        cleared = flags & np.uint16(~(GTF_reading | GTF_writing) & 0xFFFF)
        kept = [r for r in keep if 0 <= r < len(flags)]
        cleared[kept] = flags[kept]
        entries[:, 0:2] = cleared.view(np.uint8).reshape(-1, 2)
