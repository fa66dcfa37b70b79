#!/usr/bin/env python3
"""Fuzz the receiver: a mutated stream applied to a restoring domain.

Run by hand for as long as you like (libFuzzer options pass through)::

    python tests/fuzz/fuzz_receiver.py -max_total_time=600 [CORPUS_DIR]

The test suite runs :func:`check` on a seeded mutator for a bounded time
(tests/unit/engine/test_receiver_fuzz.py).

The seed is the stream of a real simulated guest with a vif and a vbd,
as the sender writes it. An input is a list of edits of that stream,
aimed at one record's body (the non-cooperative records most of the time,
where the PV state is), sometimes at a record header or cutting the
stream short. Each stream is decoded and applied by the
:class:`~nova_xen_ncm.engine.restorer.Restorer` to a fresh empty domain of
a simulated destination, as the receiver does. The oracle:

* the only failures are the engine's and the codec's own errors
  (EngineError, StreamError), which name what was wrong;
* whatever is accepted stays inside the guest: the new xenstore nodes
  are under the guest's home or its backend areas, the new dom0 event
  channels lead to the guest;
* once the domain is destroyed (the receiver's rollback) the
  destination is exactly as before: no domain, the same xenstore, the
  same dom0 ports.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import random
import shutil
import struct
import sys
import tempfile

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["nova_xen_ncm"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from oslo_config import cfg

    from nova_xen_ncm.conf import register_opts
    from nova_xen_ncm.engine import savefile
    from nova_xen_ncm.engine.errors import EngineError
    from nova_xen_ncm.engine.restorer import Restorer
    from nova_xen_ncm.host import base
    from nova_xen_ncm.host.sim.host import SimHost
    from nova_xen_ncm.stream.decoder import NEED_DATA
    from nova_xen_ncm.stream.decoder import STREAM_END
    from nova_xen_ncm.stream.decoder import Decoder
    from nova_xen_ncm.stream.errors import StreamError

MiB = 1 << 20
CONFIG = base.DomainConfig(
    name="fuzz",
    memory_bytes=2 * MiB,
    vcpus=2,
    # The restored guest is the same instance: its vbd's disk, on the
    # storage the hosts share, is found by it.
    uuid="5d1d8f4c-2f4e-4a8e-9d6b-6c1a2b3c4d5e",
    devices=(
        base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
        base.DeviceConfig("vbd", 51712, disk_bytes=MiB),
    ),
    workload={"dirty_rate": MiB},
)
RHDR = struct.Struct("<II")
_EDIT = struct.Struct("<HHB")


_DISK_DIR: list[str] = []


def _disk_dir() -> str:
    """The disks of the captured guest and of every restore, shared as
    on a cloud's storage; one private directory per process, removed at
    exit."""
    if not _DISK_DIR:
        _DISK_DIR.append(tempfile.mkdtemp(prefix="nova-xen-ncm-fuzz-disks-"))
        atexit.register(shutil.rmtree, _DISK_DIR[0], True)
    return _DISK_DIR[0]


def _conf() -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 64, group="xen_ncm_sim")
    conf.set_override("disk_dir", _disk_dir(), group="xen_ncm_sim")
    return conf


def capture() -> tuple[int, bytes]:
    """(domid, libxl stream) of a live guest, saved as the sender sends."""
    host = SimHost("source", _conf())
    try:
        domid = host.create_domain(CONFIG)
        out = io.BytesIO()
        savefile.save(host, domid, out)
    finally:
        host.close()
    data = out.getvalue()
    # The xl header (the save file's) is not part of a migration.
    dec = Decoder("xl")
    dec.feed(data)
    first = dec.next_record()
    return domid, data[first.offset + first.length :]


class Target:
    """A destination host and the seed stream; :meth:`check` runs one
    stream through a Restorer and the oracle."""

    def __init__(self) -> None:
        self.domid, self.seed = capture()
        self.records = self._layout(self.seed)
        self.host = SimHost("destination", _conf(), prelaunch=False)
        # The steady state: after one genuine restore and destroy (the
        # host keeps the toolstack's directories of a destroyed domain).
        self.baseline: dict | None = None
        self._start = self._snapshot()
        self.check(self.seed)
        self.baseline = self._snapshot()

    @staticmethod
    def _layout(stream: bytes) -> list[tuple[str, int, int]]:
        """(name, offset, body length) of the seed's records."""
        dec = Decoder("libxl")
        dec.feed(stream)
        dec.close()
        return [
            (r.name, r.offset, r.length)
            for r in dec.records()
            if not r.rtype.is_header
        ]

    def close(self) -> None:
        self.host.close()

    def _snapshot(self) -> dict:
        # The guest's home is the toolstack's to remove at destroy
        # (libxl rm's it whole; the simulated host leaves the nodes dom0
        # owns): it is not compared.
        home = f"/local/domain/{self.domid}"
        return {
            "domains": [d.domid for d in self.host.list_domains()],
            "xenstore": {
                path: (bytes(node.value), node.perms)
                for path, node in self.host.xenstore._tree.items()
                if path != home and not path.startswith(home + "/")
            },
            "dom0_ports": {
                port: (ch.type, ch.remote_domid)
                for port, ch in self.host.dom0.ports.items()
            },
        }

    def _picked(self, data: bytes) -> tuple[str, int, int]:
        """The record an input's first octet picks. The seed's records
        are those of a guest that ran: how many xenstore nodes it has
        depends on how far it got, so one input may pick another record
        in another run (:meth:`describe` names it)."""
        ncm = [r for r in self.records if r[0].startswith("NCM_")]
        pick = data[0]
        if pick & 0x80 or not ncm:
            pool = self.records
        else:
            pool = ncm
        return pool[(pick & 0x7F) % len(pool)]

    def describe(self, data: bytes) -> str:
        """Which record an input edits (its name and rank among the
        records of that name), to replay it with :meth:`edit`."""
        if not data:
            return "the seed"
        record = self._picked(data)
        nth = [r for r in self.records if r[0] == record[0]].index(record)
        return f"{record[0]} #{nth} of {len(self.records)} records"

    def edit(self, name: str, nth: int, at: int, value: int) -> bytes:
        """The seed with octet ``at`` of the body of the ``nth`` record
        called ``name`` set to ``value``: a case that names what it
        edits, whatever the seed's layout."""
        _, offset, length = [r for r in self.records if r[0] == name][nth]
        if not 0 <= at < length:
            raise ValueError(f"{name} #{nth} has {length} octets, not {at}")
        stream = bytearray(self.seed)
        stream[offset + RHDR.size + at] = value
        return bytes(stream)

    def mutate(self, data: bytes) -> bytes:
        """The stream an input stands for: its first octet picks the
        record to edit, then (offset, value) edits inside it."""
        stream = bytearray(self.seed)
        if not data:
            return bytes(stream)
        name, offset, length = self._picked(data)
        for i in range(1, len(data) - _EDIT.size + 1, _EDIT.size):
            where, span, value = _EDIT.unpack_from(data, i)
            if span == 0xFFFF:
                # Cut the stream short inside this record.
                del stream[offset + where % (length + RHDR.size) :]
                break
            if span & 0x8000:
                # The header: type or length.
                at = offset + where % RHDR.size
            else:
                at = offset + RHDR.size + where % max(length, 1)
            if at < len(stream):
                stream[at] = value
        return bytes(stream)

    def check(self, stream: bytes) -> str:
        """Apply ``stream``; returns "accepted" or the error's class.
        Raises AssertionError when the oracle fails."""
        # Each case is a first restore into this domid (the seed's guest
        # and the previous case released it): libxl would refuse a domid
        # released less than a minute ago.
        self.host.toolstack.recent.released.pop(self.domid, None)
        self.host.create_empty_domain(
            base.DomainConfig(
                name="restoring",
                memory_bytes=CONFIG.memory_bytes,
                vcpus=CONFIG.vcpus,
                uuid=CONFIG.uuid,
                pv_drivers=True,
            ),
            self.domid,
        )
        outcome = "accepted"
        try:
            restorer = Restorer(self.host, self.domid, pv_drivers=True)
            decoder = Decoder("libxl")
            decoder.feed(stream)
            decoder.close()
            while True:
                record = decoder.next_record()
                assert record is not NEED_DATA, "NEED_DATA after close()"
                if record is STREAM_END:
                    break
                restorer.apply(record)
            if not restorer.done:
                outcome = "incomplete"
            else:
                self._contained()
        except (EngineError, StreamError) as exc:
            outcome = type(exc).__name__
            assert str(exc), f"{outcome} without a message"
        finally:
            self.host.destroy_domain(self.domid)
        after = self._snapshot()
        if self.baseline is not None:
            assert after == self.baseline, _diff(self.baseline, after)
        return outcome

    def _contained(self) -> None:
        """What an accepted stream applied stays the guest's."""
        known = self.baseline or self._start
        areas = (
            f"/local/domain/{self.domid}",
            *(
                f"/local/domain/0/backend/{kind}/{self.domid}"
                for kind in ("vif", "vbd", "console")
            ),
        )
        for path in self.host.xenstore._tree:
            if path in known["xenstore"]:
                continue
            # The toolstack's directories above the backend areas too.
            assert any(
                path == a
                or path.startswith(a + "/")
                or a.startswith(path + "/")
                for a in areas
            ), f"accepted stream created {path}"
        for port, ch in self.host.dom0.ports.items():
            if port in known["dom0_ports"]:
                continue
            assert ch.remote_domid == self.domid, (
                f"dom0 port {port} leads to domain {ch.remote_domid}"
            )


def _diff(before: dict, after: dict) -> str:
    lines = []
    for key in before:
        if before[key] != after[key]:
            if isinstance(before[key], dict):
                added = sorted(set(after[key]) - set(before[key]))
                gone = sorted(set(before[key]) - set(after[key]))
                lines.append(f"{key}: added {added[:5]}, removed {gone[:5]}")
            else:
                lines.append(f"{key}: {before[key]} -> {after[key]}")
    return "destination changed: " + "; ".join(lines)


def random_input(rng: random.Random) -> bytes:
    """A seeded mutator's input: a record pick and a few edits."""
    edits = b"".join(
        _EDIT.pack(
            rng.randrange(1 << 16),
            rng.choice((0, 0, 0, 0, 0x8000, 0xFFFF)),
            rng.choice((0, 1, 0xFF, rng.randrange(256))),
        )
        for _ in range(rng.randint(1, 4))
    )
    return bytes([rng.randrange(256)]) + edits


def main() -> None:
    import atheris

    target = Target()

    def one_input(data: bytes) -> None:
        target.check(target.mutate(data))

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
