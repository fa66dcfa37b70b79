"""The patched xenstored's domain file (xenstore-migration.md records) and
what the probe makes of xenstored's answer to domain-export.

The expected bytes are laid out here by hand from
``include/xenstore_state.h``, not through the codec's own structs.
"""

from __future__ import annotations

import ctypes
import errno
import types
from pathlib import Path

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.base import Item
from nova_xen_ncm.host.xen import devices
from nova_xen_ncm.host.xen import probe
from nova_xen_ncm.host.xen import pvctx
from nova_xen_ncm.host.xen import xsmig

HVM_HAP = probe.PHYSCAP_HVM | probe.PHYSCAP_HAP


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def rec(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 8)
    return u32(kind) + u32(len(body)) + body


# What the daemon writes for a domain 9 on port 3 with one queued watch
# event, a watch on a relative path and one on @releaseDomain, and one
# open transaction (id 4).
EVENT = u32(15) + u32(0) + u32(0) + u32(8) + b"data/x\0t"
DAEMON_FILE = (
    b"xenstore" + b"\x00\x00\x00\x01" + u32(0)
    + rec(
        2,
        u32(1) + u16(0) + u16(0)  # conn-id, ring, pad
        + u16(9) + u16(0x7FF4) + u32(3)  # domid, tdomid, evtchn
        + u16(0) + u16(0) + u32(len(EVENT))
        + EVENT,
    )
    + rec(3, u32(1) + u16(7) + u16(4) + b"data/x\0" + b"tok\0")
    + rec(3, u32(1) + u16(15) + u16(2) + b"@releaseDomain\0" + b"r\0")
    + rec(4, u32(1) + u32(4))
    + u32(0) + u32(0)
)  # fmt: skip


def test_the_daemons_file_decodes() -> None:
    conn = xsmig.decode(DAEMON_FILE)
    assert (conn.domid, conn.evtchn, conn.target_domid) == (9, 3, 0x7FF4)
    assert conn.out_data == EVENT and conn.out_resp_len == 0
    assert conn.in_data == b""
    assert conn.watches == (
        xsmig.Watch("data/x", b"tok"),
        xsmig.Watch("@releaseDomain", b"r"),
    )
    assert conn.transactions == (4,)


def test_encode_writes_what_the_daemon_reads() -> None:
    # The same content encodes to the daemon's bytes (records padded to
    # 8 octets, version big-endian, conn-id 1).
    assert xsmig.encode(xsmig.decode(DAEMON_FILE)) == DAEMON_FILE


def test_partial_data_round_trips() -> None:
    conn = xsmig.DomainConnection(
        domid=5,
        evtchn=2,
        in_data=u32(2) + u32(1),  # a request whose header is half read
        out_data=b"K\0" + EVENT,  # the rest of a response, then an event
        out_resp_len=2,
        watches=(xsmig.Watch("/local/domain/5/a", b""),),
        transactions=(1, 0xFFFFFFFF),
    )
    assert xsmig.decode(xsmig.encode(conn)) == conn


@pytest.mark.parametrize(
    ("blob", "named"),
    [
        (b"xenstorf" + DAEMON_FILE[8:], "preamble"),
        (DAEMON_FILE[:12] + u32(1) + DAEMON_FILE[16:], "little-endian"),
        (DAEMON_FILE[:-8], "no END"),
        (DAEMON_FILE + b"\0" * 8, "after END"),
        (DAEMON_FILE[:16] + rec(1, u32(5) + u32(6)) + u32(0) * 2, "type 1"),
        (DAEMON_FILE[:16] + rec(4, u32(1) + u32(4)) + u32(0) * 2, "before"),
        (DAEMON_FILE[:16] + u32(0) + u32(0), "no connection"),
    ],
)
def test_what_is_not_one_domains_file_is_refused(
    blob: bytes, named: str
) -> None:
    with pytest.raises(xsmig.FormatError, match=named):
        xsmig.decode(blob)


def test_records_are_checked_field_by_field() -> None:
    conn = xsmig.encode(xsmig.DomainConnection(domid=1, evtchn=1))
    watch_at = len(conn) - 8
    bad_conn_id = (
        conn[:watch_at]
        + rec(3, u32(2) + u16(2) + u16(2) + b"a\0b\0")
        + conn[watch_at:]
    )
    with pytest.raises(xsmig.FormatError, match="conn-id 2"):
        xsmig.decode(bad_conn_id)
    unterminated = (
        conn[:watch_at]
        + rec(3, u32(1) + u16(2) + u16(2) + b"a\0bb")
        + conn[watch_at:]
    )
    with pytest.raises(xsmig.FormatError, match="unterminated"):
        xsmig.decode(unterminated)
    # A queued message claiming more than it has.
    with pytest.raises(xsmig.FormatError, match="claims"):
        xsmig.encode(
            xsmig.DomainConnection(
                domid=1, evtchn=1, out_data=u32(15) + u32(0) * 2 + u32(99)
            )
        )
    with pytest.raises(xsmig.FormatError, match="NUL"):
        xsmig.encode(
            xsmig.DomainConnection(
                domid=1, evtchn=1, watches=(xsmig.Watch("a\0b", b"t"),)
            )
        )


# -- xenstored's answer -------------------------------------------------------


class FakeXenstored:
    """xs_control_command as stock or patched xenstored answers it."""

    def __init__(self, patched: bool, err: int = errno.EINVAL) -> None:
        self.patched = patched
        self.err = err
        self.calls: list[tuple[bytes, list[bytes]]] = []
        self.imported: bytes | None = None
        # The domids whose ring the daemon no longer serves.
        self.frozen: set[int] = set()

    def xs_control_command(self, xsh, cmd, data, length):  # noqa: ANN001
        args = data[:length].split(b"\0")[:-1]
        self.calls.append((cmd, args))
        if not self.patched:
            ctypes.set_errno(self.err)
            return None
        if cmd == b"domain-export":
            freeze = args[0] == b"-f"
            domid, path = args[1:] if freeze else args
            Path(path.decode()).write_bytes(DAEMON_FILE)
            if freeze:
                self.frozen.add(int(domid))
        elif cmd == b"domain-thaw":
            self.frozen.discard(int(args[0]))
        else:
            self.imported = Path(args[1].decode()).read_bytes()
        return 1


@pytest.fixture
def xenstored(monkeypatch):  # noqa: ANN201
    def make(patched: bool, err: int = errno.EINVAL) -> types.SimpleNamespace:
        fake = FakeXenstored(patched, err)
        monkeypatch.setattr(
            xsmig, "_control_fn", lambda: fake.xs_control_command
        )
        host = types.SimpleNamespace(
            _xs=lambda: 1,
            _libc=types.SimpleNamespace(free=lambda ptr: None),
            xenstored_migrates=lambda: patched,
        )
        return types.SimpleNamespace(fake=fake, host=host)

    return make


def test_stock_xenstored_is_detected_by_its_answer(xenstored) -> None:
    x = xenstored(patched=False)
    assert xsmig.supported(x.host) is False
    # Asked by calling the command, for dom0's own connection.
    assert x.fake.calls[0][0] == b"domain-export"
    assert x.fake.calls[0][1][0] == b"0"


def test_patched_xenstored_is_detected_by_its_answer(xenstored) -> None:
    x = xenstored(patched=True)
    assert xsmig.supported(x.host) is True
    # dom0's own ring (its kernel's xenbus) is never left frozen.
    assert x.fake.frozen == set()
    assert [c for c, _ in x.fake.calls] == [b"domain-export", b"domain-thaw"]


def test_the_pv_export_freezes_the_guests_connection(xenstored) -> None:
    # The paused guest's ring is left alone from the export on: the
    # memory copied next agrees with the file.
    x = xenstored(patched=True)
    host = types.SimpleNamespace(
        **vars(x.host), _xs_read=lambda path: None, _param=lambda d, i: 0
    )
    state = pvctx._export_xenstore(host, 7)
    assert x.fake.frozen == {7}
    assert [w.path for w in state.watches] == ["data/x", "@releaseDomain"]


def test_a_rollback_serves_the_frozen_connection_again(
    xenstored, monkeypatch
) -> None:
    from nova_xen_ncm.host.xen import host as host_mod

    x = xenstored(patched=True)
    xsmig.export(x.host, 7, freeze=True)
    assert x.fake.frozen == {7}
    xen = host_mod.XenHost.__new__(host_mod.XenHost)
    xen._xs_migrates = True
    xen._quiesced = {}
    monkeypatch.setattr(devices, "list_devices", lambda host, domid: [])
    monkeypatch.setattr(xen, "_xs", x.host._xs, raising=False)
    monkeypatch.setattr(xen, "_libc", x.host._libc, raising=False)
    xen.resume_backends(7)
    assert x.fake.frozen == set()


def test_another_failure_is_not_taken_for_stock(xenstored) -> None:
    with pytest.raises(base.HostError, match="Permission denied"):
        xsmig.supported(xenstored(patched=False, err=errno.EACCES).host)


def test_the_probe_reports_what_xenstored_answered() -> None:
    def facts(xs: bool) -> dict[Item, str | None]:
        return probe.restore_items(
            probe.HypervisorFacts(
                4, 17, "", HVM_HAP, ncm_evtchn=True, ncm_vcpu=True,
                xenstored_migration=xs,
            )
        )  # fmt: skip

    assert facts(True)[Item.XENSTORE] is None
    reason = facts(False)[Item.XENSTORE]
    assert reason is not None and "domain-export" in reason
    # PV devices are another matter.
    assert facts(True)[Item.PV_DEVICES] is not None
    # Stock Xen keeps its reason whatever xenstored answers.
    stock = probe.restore_items(
        probe.HypervisorFacts(4, 17, "", HVM_HAP, xenstored_migration=True)
    )
    assert "watches" in stock[Item.XENSTORE]


def xs_state(**kw: object) -> base.XenstoreState:
    fields = {
        "nodes": (),
        "watches": (),
        "transactions": (),
        "store_port": 3,
        "store_gfn": 0xFEFFC,
    }
    fields.update(kw)
    return base.XenstoreState(**fields)  # type: ignore[arg-type]


def test_the_import_gives_xenstored_the_guests_connection(xenstored) -> None:
    x = xenstored(patched=True)
    pvctx._import_xenstore_connection(
        x.host,
        9,
        xs_state(
            watches=(
                base.XenstoreWatch("data/x", "tok"),
                base.XenstoreWatch("@releaseDomain", "r"),
            ),
            transactions=(base.XenstoreTransaction(4, 0),),
            pending_output=EVENT,
        ),
    )
    ((cmd, args),) = x.fake.calls
    assert cmd == b"domain-import" and args[0] == b"9"
    assert x.fake.imported == DAEMON_FILE


def test_nothing_to_carry_asks_nothing(xenstored) -> None:
    x = xenstored(patched=False)
    pvctx._import_xenstore_connection(x.host, 9, xs_state())
    assert x.fake.calls == []


def test_watches_for_a_stock_xenstored_are_refused(xenstored) -> None:
    x = xenstored(patched=False)
    with pytest.raises(base.NotSupported, match="1 xenstore watches"):
        pvctx._import_xenstore_connection(
            x.host, 9, xs_state(watches=(base.XenstoreWatch("a", "t"),))
        )
    assert x.fake.calls == []
