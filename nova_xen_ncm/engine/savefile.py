"""Save a guest to a file and restore it, with the migration stream.

A save file is what ``xl save`` writes (``tools/xl/xl_saverestore.c``):
the ``xl`` save-file header with the domain's configuration as libxl JSON,
then a libxl v2 stream whose LIBXC_CONTEXT carries the libxc v3 stream.
The records are those of a live migration's stop-and-copy
(:class:`~nova_xen_ncm.engine.guest_stream.GuestStream`), every populated page
once.

A guest without PV drivers can be saved Xen-compatible: only Xen's record
types, accepted by Xen's ``verify-stream-v2 -f xl``. A guest with PV
drivers needs the project's non-cooperative records; saving it
Xen-compatible would drop its PV state, so it is refused.

The ``xl`` header's optional data holds, after the configuration, a JSON
object of the project (``xl`` skips what follows the configuration): the
domid and whether the guest has PV drivers, needed before the first page
is restored.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any
from typing import BinaryIO

from oslo_log import log as logging

from nova_xen_ncm.engine import pvstate
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.guest_stream import GuestStream
from nova_xen_ncm.engine.restorer import RestoreError
from nova_xen_ncm.engine.restorer import Restorer
from nova_xen_ncm.host import base
from nova_xen_ncm.stream import decoder as stream_decoder
from nova_xen_ncm.stream import xl
from nova_xen_ncm.stream.errors import StreamError
from nova_xen_ncm.stream.records import Buffers
from nova_xen_ncm.stream.records import Record

LOG = logging.getLogger(__name__)

# Key of the project's object in the xl header's trailing optional data.
EXTRA_KEY = "nova-xen-ncm"
READ_SIZE = 1 << 20
KiB = 1024


class SaveError(EngineError):
    """The guest cannot be saved as asked."""


def libxl_config(info: base.DomainInfo) -> dict[str, Any]:
    """The domain's configuration as libxl JSON (libxl_types.idl
    libxl_domain_config), as much of it as a restore needs."""
    kib = info.memory_bytes // KiB
    return {
        "c_info": {
            "type": "hvm",
            "name": info.name,
            "uuid": info.uuid,
            # LIBXL_HAVE_CREATEINFO_DOMID: restore with the same domid.
            "domid": info.domid,
        },
        "b_info": {
            "max_vcpus": info.vcpus,
            "max_memkb": kib,
            "target_memkb": kib,
            "type.hvm": {},
        },
    }


def save(
    host: base.HostDriver,
    domid: int,
    out: BinaryIO,
    *,
    xen_compatible: bool = False,
) -> None:
    """Write the guest to ``out``; a running guest is paused first and
    stays paused (the caller destroys or unpauses it)."""
    info = host.domain_info(domid)
    if xen_compatible and info.pv_drivers:
        raise SaveError(
            f"domain {domid} has PV drivers: a Xen-compatible save cannot "
            "carry its PV state"
        )
    if info.pv_drivers:
        # Refused from the host's own report, before the pause: what it
        # cannot put back (xenstore watches on patched Xen) would be
        # silently missing from the file, and the restored guest's
        # xenbus would wait forever.
        missing = host.capabilities().missing(pv_drivers=True)
        if missing:
            raise SaveError(
                f"domain {domid} has PV drivers, and this host cannot "
                "carry PV state: "
                + "; ".join(f"{k.value}: {v}" for k, v in missing.items())
            )
    if info.state == base.DomainState.RUNNING:
        host.pause_for_save(domid)
    stream = GuestStream(host, domid, xen_compatible=xen_compatible)
    # NUL-terminated, as xl writes it (strlen + 1) and reads it back.
    libxl_json = host.libxl_config(domid)
    if libxl_json is None:
        libxl_json = libxl_config(info)
    else:
        # LIBXL_HAVE_CREATEINFO_DOMID: restore with the same domid.
        libxl_json.setdefault("c_info", {})["domid"] = domid
    config = json.dumps(libxl_json, sort_keys=True).encode() + b"\0"
    extra = json.dumps(
        {EXTRA_KEY: {"domid": domid, "pv_drivers": info.pv_drivers}},
        sort_keys=True,
    ).encode()
    header = xl.Header(
        xl.MANDATORY_STREAM_V2 | xl.MANDATORY_JSON, 0, config, extra
    )
    if info.pv_drivers:
        # Quiesced until every page is written: a backend answering a
        # request the saved state lists as in flight would answer it
        # twice after the restore.
        host.quiesce_backends(domid)
    try:
        pv = stream.pv_records(info.uuid) if info.pv_drivers else None
        _write(out, [xl.pack(header)])
        _write(out, stream.start())
        for batch in stream.pages(host.populated_pfns(domid)):
            _write(out, batch.buffers)
        _write(out, stream.platform())
        _write(out, stream.finish(pv))
    finally:
        if info.pv_drivers:
            host.resume_backends(domid)
    out.flush()


def save_to_path(
    host: base.HostDriver,
    domid: int,
    path: str | os.PathLike,
    *,
    xen_compatible: bool = False,
) -> None:
    with open(path, "wb") as out:
        save(host, domid, out, xen_compatible=xen_compatible)


def _write(out: BinaryIO, buffers: Buffers) -> None:
    for buf in buffers:
        out.write(buf)


def _records(source: BinaryIO) -> Iterator[Record]:
    decoder = stream_decoder.Decoder("xl")
    while True:
        record = decoder.next_record()
        if record is stream_decoder.STREAM_END:
            return
        if record is stream_decoder.NEED_DATA:
            data = source.read(READ_SIZE)
            if data:
                decoder.feed(data)
            else:
                decoder.close()
            continue
        yield record


def _domain_config(header: xl.Header) -> tuple[base.DomainConfig, dict]:
    try:
        config = json.loads(header.config.rstrip(b"\0"))
        ours = json.loads(header.extra or b"{}").get(EXTRA_KEY, {})
        c_info, b_info = config["c_info"], config["b_info"]
        uuid = c_info.get("uuid")
        if uuid is not None:
            # The host names files after it (the sim's disks).
            try:
                uuid = str(uuidlib.UUID(str(uuid)))
            except ValueError:
                raise ValueError(f"uuid {uuid!r} is not a UUID") from None
        domain = base.DomainConfig(
            name=str(c_info["name"]),
            uuid=uuid,
            memory_bytes=int(b_info["max_memkb"]) * KiB,
            vcpus=int(b_info["max_vcpus"]),
            pv_drivers=bool(ours.get("pv_drivers", False)),
            # The restored device model is the saved one's machine.
            boot=base.DirectBoot.of_libxl(b_info),
        )
        ours.setdefault("domid", c_info.get("domid"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RestoreError(
            f"the save file's configuration is not usable: {exc!r}"
        ) from exc
    return domain, ours


def restore(
    host: base.HostDriver,
    source: BinaryIO,
    *,
    domid: int | None = None,
    unpause: bool = True,
) -> int:
    """Restore the guest saved in ``source`` into a new domain and return
    its domid: the saved one unless ``domid`` is given (a guest with PV
    drivers keeps its own, which it can see). On failure the new domain
    is destroyed."""
    records = _records(source)
    try:
        first = next(records)
    except StreamError as exc:
        raise RestoreError(f"not a save file: {exc}") from exc
    if first.name != "XL_HEADER":
        raise RestoreError("not an xl save file")
    config, ours = _domain_config(first.value)
    saved = ours.get("domid")
    if domid is None:
        domid = saved
    if domid is None:
        raise RestoreError("the save file does not say its domid: give one")
    if config.pv_drivers and saved is not None and domid != saved:
        raise RestoreError(
            f"the guest has PV drivers and was domain {saved}: it cannot "
            f"become domain {domid}"
        )
    host.create_empty_domain(config, domid)
    try:
        restorer = Restorer(host, domid, pv_drivers=config.pv_drivers)
        try:
            for record in records:
                restorer.apply(record)
        except (StreamError, pvstate.PvStateError) as exc:
            raise RestoreError(f"bad save file: {exc}") from exc
        if not restorer.done:
            raise RestoreError("the save file ends before its END record")
        if unpause:
            host.unpause(domid)
    except BaseException:
        try:
            host.destroy_domain(domid)
        except base.HostError as exc:
            LOG.error(
                "Could not destroy half-restored domain %d: %s", domid, exc
            )
        raise
    return domid


def restore_from_path(
    host: base.HostDriver,
    path: str | os.PathLike,
    *,
    domid: int | None = None,
    unpause: bool = True,
) -> int:
    with open(path, "rb") as source:
        return restore(host, source, domid=domid, unpause=unpause)
