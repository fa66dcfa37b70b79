"""One live migration as an orchestrator (the Nova driver, a console
command) drives it: each side runs in its own thread.

The destination is prepared first (:class:`IncomingMigration`: a
one-time token and a listening port, handed to the source out of band,
in Nova's migrate_data); the source then starts
(:class:`OutgoingMigration`) and may be cancelled or forced to complete
while it runs. Both ends report through progress sinks and end in a
terminal phase; ``wait`` returns it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Iterable

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine import policy as policies
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.stats import MigrationStats
from nova_xen_ncm.engine.switchover import SwitchoverHistory
from nova_xen_ncm.host import base
from nova_xen_ncm.progress.model import ProgressSink

LOG = logging.getLogger(__name__)


class _Runner:
    """A migration side run in a daemon thread.

    A side ends in a terminal phase even when it fails; an exception
    escaping it is a defect, which :meth:`wait` re-raises in the
    caller's thread rather than reporting an unfinished migration.
    """

    def __init__(self, name: str, target: Callable[[], Phase]) -> None:
        self._result: Phase | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

        def run() -> None:
            try:
                self._result = target()
            except BaseException as exc:
                # Logged here too: nobody may be waiting.
                LOG.exception("Migration thread %s failed", name)
                self._error = exc
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float | None = None) -> Phase | None:
        """The final phase, or None if not finished within ``timeout``."""
        self._done.wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result


class IncomingMigration:
    """The destination of ``migration_id`` on ``host``.

    ``token`` and ``endpoint`` go to the source; ``advertise`` is the
    address it should connect to when the listener is bound to a
    wildcard address.
    """

    def __init__(
        self,
        host: base.HostDriver,
        migration_id: str,
        *,
        conf: cfg.ConfigOpts | None = None,
        sinks: Iterable[ProgressSink] = (),
        advertise: str | None = None,
        source_address: str | None = None,
    ) -> None:
        self.token = handshake.generate_token()
        # ``source_address``: the only address the source may connect
        # from (with [xen_ncm] allowed_sources).
        self.receiver = Receiver(
            host,
            migration_id,
            self.token,
            conf=conf,
            sinks=sinks,
            source_address=source_address,
        )
        address, port = self.receiver.address
        self.endpoint = (advertise or address, port)
        self._runner = _Runner(
            f"migration-{migration_id}-in", self.receiver.run
        )

    @property
    def phase(self) -> Phase:
        return self.receiver.state.phase

    def start(self) -> None:
        self._runner.start()

    def wait(self, timeout: float | None = None) -> Phase | None:
        return self._runner.wait(timeout)

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop waiting for a source that has not connected; False once
        one has (from then on the source decides, and rolls back both
        ends on failure). The migration ends CANCELLED with ``reason``."""
        if self.receiver.state.phase != Phase.SETUP or self.receiver.connected:
            return False
        self.receiver.stop_waiting(reason)
        return True


class OutgoingMigration:
    """The source: migrates ``domid`` of ``host`` to ``endpoint``."""

    def __init__(
        self,
        host: base.HostDriver,
        domid: int,
        endpoint: tuple[str, int],
        migration_id: str,
        token: bytes,
        *,
        conf: cfg.ConfigOpts | None = None,
        policy: policies.Policy | None = None,
        sinks: Iterable[ProgressSink] = (),
        source_address: str | None = None,
        switchover: SwitchoverHistory | None = None,
    ) -> None:
        # ``source_address``: the address this host announced to the
        # destination; every connection leaves from it. ``switchover``:
        # the fixed part of the pause measured on earlier migrations.
        self.sender = Sender(
            host,
            domid,
            endpoint,
            migration_id,
            token,
            conf=conf,
            policy=policy,
            sinks=sinks,
            source_address=source_address,
            switchover=switchover,
        )
        self._runner = _Runner(
            f"migration-{migration_id}-out", self.sender.run
        )

    @property
    def phase(self) -> Phase:
        return self.sender.state.phase

    @property
    def stats(self) -> MigrationStats:
        return self.sender.stats

    @property
    def error(self) -> BaseException | None:
        return self.sender.error

    def start(self) -> None:
        self._runner.start()

    def wait(self, timeout: float | None = None) -> Phase | None:
        return self._runner.wait(timeout)

    def cancel(self, reason: str | None = None) -> bool:
        return self.sender.cancel(reason)

    def force_complete(self) -> bool:
        return self.sender.force_complete()
