"""Several migrations at once between the same two hosts: each completes
transparently, and a connection never reaches another migration's
stream."""

from __future__ import annotations

import threading

import pytest

from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base
from nova_xen_ncm.host import checker

from .conftest import guest_config

COUNT = 4


def test_four_concurrent_migrations_complete_unmixed(
    source, destination, migration
):
    domids = [
        source.create_domain(guest_config(name=f"guest-{i}"))
        for i in range(COUNT)
    ]
    seen = [{} for _ in domids]
    migrations = []
    for i, domid in enumerate(domids):

        def paused(event, domid=domid, box=seen[i]):
            # The checker's own reading, not the host's bookkeeping.
            box["paused"] = checker.snapshot(source, domid)

        def resumed(event, domid=domid, box=seen[i]):
            box["resumed"] = checker.snapshot(destination, domid)

        migrations.append(
            migration(
                source,
                domid,
                destination,
                source_hooks={("state", "restore"): paused},
                destination_hooks={("state", "commit"): resumed},
            )
        )
    # Each destination port serves its own migration only: the identity
    # (id and token) of the next migration is refused at this one's.
    for m, other in zip(
        migrations, migrations[1:] + migrations[:1], strict=True
    ):
        stray = Channel.connect(*m.receiver.address, connect_timeout=5)
        worker = threading.Thread(target=m.receiver.run, daemon=True)
        m._thread = worker
        worker.start()
        with pytest.raises(Refused) as caught:
            stray.client_handshake(
                other.receiver.migration_id, other.sender.token
            )
        stray.close()
        assert caught.value.code == messages.RefuseReason.UNKNOWN_MIGRATION

    results = [None] * COUNT

    def send(i):
        results[i] = migrations[i].sender.run()

    senders = [
        threading.Thread(target=send, args=(i,), daemon=True)
        for i in range(COUNT)
    ]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(120)
    for m in migrations:
        m._thread.join(30)

    for i, m in enumerate(migrations):
        assert results[i] is Phase.DONE, m.sender.error
        assert m.receiver.state.phase is Phase.DONE, m.receiver.error
        report = checker.check(seen[i]["paused"], seen[i]["resumed"])
        assert report.passed, f"guest-{i}: {report}"
        info = destination.domain_info(domids[i])
        assert info.name == f"guest-{i}"
        assert info.state == base.DomainState.RUNNING
    assert source.list_domains() == []
    # Distinct ports, one per migration.
    assert len({m.receiver.address for m in migrations}) == COUNT
