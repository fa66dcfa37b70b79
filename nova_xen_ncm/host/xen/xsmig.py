"""One domain's xenstored connection, through the patched xenstored.

Stock xenstored tells no toolstack a domain's watches, open transactions
or the data it has not yet written to the domain's ring. The project's
patch series (``xen/patches/0003-xenstored-domain-export-import.patch``)
adds two control commands (XS_CONTROL, dom0 only):

- ``domain-export [-f] <domid> <file>`` writes the domain's connection in
  the records of Xen's ``docs/designs/xenstore-migration.md`` that live
  update writes for the whole daemon (version 1, the daemon's byte
  order): CONNECTION_DATA, a WATCH_DATA per watch, a TRANSACTION_DATA per
  open transaction, END. With ``-f`` it then freezes the connection:
  xenstored neither reads nor writes the domain's ring until
  ``domain-thaw <domid>`` (a rollback) or the domain's end, so that the
  guest's memory copied after the export (the paused guest writes
  nothing) agrees with the file: no request it left in the ring is
  answered into the source's copy only, no event written after it.
- ``domain-import <domid> <file>`` puts them into a domain XS_INTRODUCE
  has just connected: watches without the event a new watch fires,
  transactions under their ids marked to fail (their commit answers
  EAGAIN), the data queued as it was. All or nothing.

The file layout is decoded and encoded here without I/O
(:func:`decode`, :func:`encode`); :func:`export`, :func:`freeze`,
:func:`thaw`, :func:`import_` and :func:`supported` issue the commands.
xenstored must run in dom0, where this service runs: the file is handed
over by path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno as errnos
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import libs

if TYPE_CHECKING:
    from nova_xen_ncm.host.xen.host import XenHost

# include/xenstore_state.h (4.17), little-endian hosts.
IDENT = b"xenstore"
VERSION = 1
FLAGS_LITTLE_ENDIAN = 0
TYPE_END = 0
TYPE_GLOBAL = 1
TYPE_CONN = 2
TYPE_WATCH = 3
TYPE_TA = 4
TYPE_NODE = 5
CONN_TYPE_RING = 0
DOMID_INVALID = 0x7FF4
# The one connection of a domain's file (the patch's MIG_CONN_ID).
CONN_ID = 1

# ident, version (big-endian), flags (the writer's byte order).
PREAMBLE = struct.Struct("<8s4sI")
HEADER = struct.Struct("<II")
# conn_id, conn_type, pad, domid, tdomid, evtchn, in, resp, out lengths.
CONN = struct.Struct("<IHHHHIHHI")
WATCH = struct.Struct("<IHH")
TRANSACTION = struct.Struct("<II")
XSD_SOCKMSG = struct.Struct("<IIII")
XENSTORE_PAYLOAD_MAX = 4096  # io/xs_wire.h
# The patch's MIG_MAX_SIZE.
MAX_FILE = 16 * 1024 * 1024

COMMAND_EXPORT = b"domain-export"
COMMAND_IMPORT = b"domain-import"
COMMAND_THAW = b"domain-thaw"


class FormatError(base.HostError):
    """A domain file that is not what the patched xenstored writes."""


@dataclasses.dataclass(frozen=True)
class Watch:
    #: As registered: absolute, relative to the domain's path, or @special.
    path: str
    token: bytes


@dataclasses.dataclass(frozen=True)
class DomainConnection:
    """A domain's xenstored connection as ``domain-export`` writes it."""

    domid: int
    evtchn: int
    target_domid: int = DOMID_INVALID
    #: Requests read from the ring and not processed; the last may be
    #: partly read.
    in_data: bytes = b""
    #: Responses and watch events not yet written to the ring, the first
    #: ``out_resp_len`` octets being the rest of one partly written.
    out_data: bytes = b""
    out_resp_len: int = 0
    watches: tuple[Watch, ...] = ()
    transactions: tuple[int, ...] = ()

    def validate(self) -> None:
        if not 0 <= self.out_resp_len <= len(self.out_data):
            raise FormatError(
                f"out-resp-len {self.out_resp_len} exceeds out-data-len "
                f"{len(self.out_data)}",
                call="xsmig.encode",
            )
        for name, data, limit in (
            ("in-data", self.in_data, 0xFFFF),
            ("out-data", self.out_data, 0xFFFFFFFF),
        ):
            if len(data) > limit:
                raise FormatError(
                    f"{name} of {len(data)} octets exceeds {limit}",
                    call="xsmig.encode",
                )
        _check_messages(self.out_data[self.out_resp_len :], "out-data")
        for w in self.watches:
            for what, value in (("path", w.path.encode()), ("token", w.token)):
                if b"\0" in value or len(value) + 1 > 0xFFFF:
                    raise FormatError(
                        f"watch {what} {value[:64]!r}: contains NUL or is "
                        "too long",
                        call="xsmig.encode",
                    )
        for tx in self.transactions:
            if not 0 < tx < 1 << 32:
                raise FormatError(
                    f"transaction id {tx} out of range", call="xsmig.encode"
                )


def _check_messages(data: bytes, what: str) -> None:
    """``data`` must be whole xsd_sockmsg messages."""
    at = 0
    while at < len(data):
        if len(data) - at < XSD_SOCKMSG.size:
            raise FormatError(
                f"{what}: a partial message header at octet {at}",
                call="xsmig",
            )
        length = XSD_SOCKMSG.unpack_from(data, at)[3]
        if length > XENSTORE_PAYLOAD_MAX or (
            length > len(data) - at - XSD_SOCKMSG.size
        ):
            raise FormatError(
                f"{what}: message at octet {at} claims {length} octets",
                call="xsmig",
            )
        at += XSD_SOCKMSG.size + length


def _pad(body: bytes) -> bytes:
    return body + b"\0" * (-len(body) % 8)


def _record(kind: int, body: bytes) -> bytes:
    body = _pad(body)
    return HEADER.pack(kind, len(body)) + body


def encode(conn: DomainConnection) -> bytes:
    """The file ``domain-import`` reads for ``conn``."""
    conn.validate()
    out = [
        PREAMBLE.pack(IDENT, VERSION.to_bytes(4, "big"), FLAGS_LITTLE_ENDIAN),
        _record(
            TYPE_CONN,
            CONN.pack(
                CONN_ID,
                CONN_TYPE_RING,
                0,
                conn.domid,
                conn.target_domid,
                conn.evtchn,
                len(conn.in_data),
                conn.out_resp_len,
                len(conn.out_data),
            )
            + conn.in_data
            + conn.out_data,
        ),
    ]
    for w in conn.watches:
        path = w.path.encode() + b"\0"
        token = w.token + b"\0"
        out.append(
            _record(
                TYPE_WATCH,
                WATCH.pack(CONN_ID, len(path), len(token)) + path + token,
            )
        )
    for tx in conn.transactions:
        out.append(_record(TYPE_TA, TRANSACTION.pack(CONN_ID, tx)))
    out.append(HEADER.pack(TYPE_END, 0))
    return b"".join(out)


def decode(data: bytes) -> DomainConnection:
    """The connection of the file ``domain-export`` wrote."""
    if len(data) > MAX_FILE:
        raise FormatError(
            f"{len(data)} octets exceed {MAX_FILE}", call="xsmig.decode"
        )
    if len(data) < PREAMBLE.size:
        raise FormatError("no preamble", call="xsmig.decode")
    ident, raw_version, flags = PREAMBLE.unpack_from(data)
    version = int.from_bytes(raw_version, "big")
    if (ident, version, flags) != (IDENT, VERSION, FLAGS_LITTLE_ENDIAN):
        raise FormatError(
            f"preamble {ident!r} version {version} flags {flags}: not a "
            f"little-endian version {VERSION} xenstore state file",
            call="xsmig.decode",
        )
    at = PREAMBLE.size
    conn: DomainConnection | None = None
    watches: list[Watch] = []
    txs: list[int] = []
    while True:
        if len(data) - at < HEADER.size:
            raise FormatError(f"no END record (octet {at})", call="xsmig")
        kind, length = HEADER.unpack_from(data, at)
        at += HEADER.size
        body = data[at : at + length]
        if len(body) != length or length % 8:
            raise FormatError(
                f"record type {kind} at octet {at - HEADER.size}: length "
                f"{length} (not a multiple of 8, or past the end)",
                call="xsmig.decode",
            )
        at += length
        if kind == TYPE_END:
            break
        if kind == TYPE_CONN:
            if conn is not None:
                raise FormatError("a second connection", call="xsmig")
            conn = _decode_conn(body)
        elif kind in (TYPE_WATCH, TYPE_TA):
            if conn is None:
                raise FormatError(
                    f"record type {kind} before the connection",
                    call="xsmig.decode",
                )
            if kind == TYPE_WATCH:
                watches.append(_decode_watch(body))
            else:
                if len(body) < TRANSACTION.size:
                    raise FormatError("short transaction", call="xsmig")
                conn_id, tx = TRANSACTION.unpack_from(body)
                _check_conn_id(conn_id)
                txs.append(tx)
        else:
            raise FormatError(
                f"record type {kind}: not one domain's connection",
                call="xsmig.decode",
            )
    if conn is None:
        raise FormatError("no connection record", call="xsmig.decode")
    if at != len(data):
        raise FormatError(
            f"{len(data) - at} octets after END", call="xsmig.decode"
        )
    return dataclasses.replace(
        conn, watches=tuple(watches), transactions=tuple(txs)
    )


def _check_conn_id(conn_id: int) -> None:
    if conn_id != CONN_ID:
        raise FormatError(
            f"conn-id {conn_id}, not {CONN_ID}", call="xsmig.decode"
        )


def _decode_conn(body: bytes) -> DomainConnection:
    if len(body) < CONN.size:
        raise FormatError("short connection record", call="xsmig.decode")
    (
        conn_id, conn_type, _pad_, domid, tdomid, evtchn,
        in_len, resp_len, out_len,
    ) = CONN.unpack_from(body)  # fmt: skip
    _check_conn_id(conn_id)
    if conn_type != CONN_TYPE_RING:
        raise FormatError(
            f"conn-type {conn_type}: not a shared ring", call="xsmig.decode"
        )
    if CONN.size + in_len + out_len > len(body):
        raise FormatError(
            f"in-data-len {in_len} and out-data-len {out_len} exceed the "
            "record",
            call="xsmig.decode",
        )
    in_data = body[CONN.size : CONN.size + in_len]
    out_data = body[CONN.size + in_len : CONN.size + in_len + out_len]
    conn = DomainConnection(
        domid=domid,
        evtchn=evtchn,
        target_domid=tdomid,
        in_data=in_data,
        out_data=out_data,
        out_resp_len=resp_len,
    )
    conn.validate()
    return conn


def _decode_watch(body: bytes) -> Watch:
    if len(body) < WATCH.size:
        raise FormatError("short watch record", call="xsmig.decode")
    conn_id, path_len, token_len = WATCH.unpack_from(body)
    _check_conn_id(conn_id)
    end = WATCH.size + path_len + token_len
    if not path_len or not token_len or end > len(body):
        raise FormatError(
            f"watch path-length {path_len} token-length {token_len} do not "
            "fit the record",
            call="xsmig.decode",
        )
    path = body[WATCH.size : WATCH.size + path_len]
    token = body[WATCH.size + path_len : end]
    if path[-1:] != b"\0" or token[-1:] != b"\0":
        raise FormatError("watch path or token unterminated", call="xsmig")
    try:
        text = path[:-1].decode()
    except UnicodeDecodeError as exc:
        raise FormatError(f"watch path: {exc}", call="xsmig") from exc
    return Watch(path=text, token=token[:-1])


# -- xenstored ---------------------------------------------------------------


def _control(host: XenHost, command: bytes, *args: str) -> None:
    """XS_CONTROL ``command`` with ``args``; raises with the errno."""
    data = b"".join(a.encode() + b"\0" for a in args)
    ptr = _control_fn()(host._xs(), command, data, len(data))
    if not ptr:
        err = ctypes.get_errno()
        raise libs.XenCallError(
            f"xenstored {command.decode()} {' '.join(args)}: "
            f"{os.strerror(err) if err else 'failed'}",
            call="xs_control_command",
            errno=err or None,
        )
    host._libc.free(ptr)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    # The guest's watches and pending data: for root's eyes only.
    with tempfile.TemporaryDirectory(prefix="ncm-xenstored-") as d:
        os.chmod(d, 0o700)
        yield Path(d)


def export(
    host: XenHost, domid: int, *, freeze: bool = False
) -> DomainConnection:
    """``domid``'s connection, read from xenstored; ``freeze`` leaves it
    frozen (the guest paused, its memory to be copied next): undone by
    :func:`thaw`."""
    with _workdir() as d:
        path = d / f"domain-{domid}"
        args = ("-f",) if freeze else ()
        _control(host, COMMAND_EXPORT, *args, str(domid), str(path))
        return decode(path.read_bytes())


def freeze(host: XenHost, domid: int) -> None:
    """xenstored leaves ``domid``'s ring alone until :func:`thaw` (a
    destination's, until its connection is imported): an export with
    ``-f`` whose file is not needed."""
    export(host, domid, freeze=True)


def thaw(host: XenHost, domid: int) -> None:
    """xenstored serves ``domid``'s ring again (nothing if not frozen)."""
    _control(host, COMMAND_THAW, str(domid))


def import_(host: XenHost, domid: int, conn: DomainConnection) -> None:
    """Give ``conn`` to xenstored for ``domid``, which XS_INTRODUCE has
    connected (libxl's domain creation) and whose ring page holds the
    guest's own indices (its memory is restored)."""
    blob = encode(dataclasses.replace(conn, domid=domid))
    with _workdir() as d:
        path = d / f"domain-{domid}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(blob)
        _control(host, COMMAND_IMPORT, str(domid), str(path))


def supported(host: XenHost) -> bool:
    """Whether the running xenstored has the patch's commands: asked by
    exporting dom0's own connection (not frozen) and decoding it, then
    thawing it (nothing to undo: the command's answer is the question).
    Stock xenstored answers EINVAL (an unknown control command)."""
    try:
        export(host, 0)
        thaw(host, 0)
    except libs.XenCallError as exc:
        if exc.errno in (errnos.EINVAL, errnos.ENOSYS):
            return False
        raise
    return True


def _control_fn():  # noqa: ANN202 - a ctypes function
    """xs_control_command returning the reply's pointer, so that it can
    be freed (the shared binding, as the header has it, returns a copy)."""
    from nova_xen_ncm.host.xen import host as host_mod

    raw = libs.library("xenstore")["xs_control_command"]
    raw.argtypes = host_mod.FN.xs_control_command.argtypes
    raw.restype = ctypes.c_void_p
    return raw
