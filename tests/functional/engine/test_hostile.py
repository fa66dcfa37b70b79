"""A migration completes while hostile peers hold slow handshakes and
flood the destination's port; the handshake deadline holds."""

from __future__ import annotations

import secrets
import socket
import threading
import time

from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base

from .conftest import guest_config

DEADLINE = 1.0
SLOW_PEERS = 10
FLOOD = 20
#: How long a slow peer keeps trickling: the old per-recv timeout kept
#: the handshake open all along.
TRICKLE_FOR = 10.0
#: Tokens a peer that knows the migration id tries.
GUESSES = 3


def trickle(address, cut_after):
    """A peer that sends one byte of a HELLO every 0.1 s and never
    finishes it; records how long until the destination cut it off."""
    start = time.monotonic()
    try:
        sock = socket.create_connection(address, timeout=5)
    except OSError:
        cut_after.append(0.0)
        return
    with sock:
        try:
            while time.monotonic() - start < TRICKLE_FOR:
                sock.sendall(b"\x00")
                time.sleep(0.1)
        except OSError:
            cut_after.append(time.monotonic() - start)


def flood(address, stop):
    """Connections opened and left silent, as fast as they are taken."""
    held = []
    try:
        for _ in range(FLOOD):
            if stop.is_set():
                break
            try:
                held.append(socket.create_connection(address, timeout=2))
            except OSError:
                pass
        stop.wait(5)
    finally:
        for sock in held:
            sock.close()


def guess(address, migration_id, refused):
    """A peer that knows the migration id (it is no secret) and tries
    tokens: each try is refused and costs only its own connection."""
    for _ in range(GUESSES):
        try:
            channel = Channel.connect(
                *address, connect_timeout=5, io_timeout=5
            )
        except EngineError:
            continue
        try:
            channel.client_handshake(migration_id, secrets.token_bytes(32))
        except Refused as exc:
            refused.append(exc.code)
        except (EngineError, OSError):
            pass
        finally:
            channel.close()


def test_a_migration_completes_under_slow_handshakes_and_a_flood(
    source, destination, migration, conf
):
    conf.set_override("connect_timeout", DEADLINE, group="xen_ncm")
    conf.set_override("connect_retry_timeout", 20.0, group="xen_ncm")
    conf.set_override("connect_retry_attempts", 20, group="xen_ncm")
    domid = source.create_domain(guest_config())
    m = migration(source, domid, destination)
    address = m.receiver.address
    stop = threading.Event()
    cut_after: list[float] = []
    refused: list[str] = []
    peers = (
        [
            threading.Thread(
                target=guess,
                args=(address, m.sender.migration_id, refused),
            )
        ]
        + [
            threading.Thread(target=trickle, args=(address, cut_after))
            for _ in range(SLOW_PEERS)
        ]
        + [threading.Thread(target=flood, args=(address, stop))]
    )
    for peer in peers:
        peer.start()
    # The hostile peers are there first.
    time.sleep(0.3)
    try:
        phase = m.run()
    finally:
        stop.set()
        for peer in peers:
            peer.join()
    assert phase is Phase.DONE, m.sender.error
    assert destination.domain_info(domid).state == base.DomainState.RUNNING
    assert source.list_domains() == []
    # Every slow peer was cut off while it still trickled: after the
    # deadline, plus its wait for a handshake slot among the flood's.
    assert len(cut_after) == SLOW_PEERS, cut_after
    assert max(cut_after) < TRICKLE_FOR - 2.0, cut_after
    # Wrong proofs for this migration, queued before the source: refused
    # without ending the destination's wait for it.
    assert refused and set(refused) == {"authentication"}, refused
