"""The commit coordinator: how both ends learn, and forget, the outcome.

The source journals its decision, then sends COMMIT on the authenticated
control channel; the destination journals that it got it, unpauses the
guest, journals that it runs it and answers COMMITTED; the source
journals CLEANUP, sends FINISHED (its final acknowledgement) and only then
may the destination forget the migration.

When COMMIT, COMMITTED or FINISHED is lost, the source asks: the commit
query (:class:`CommitQuery`, one path for the live sender and for
recovery, TLS or not) on a new authenticated connection. The destination
answers from its state, or from its journal after a restart
(the acceptor, acceptor.py), until the source acknowledges. A :class:`Verdict`
says what the answer means for the source copy:

- the destination runs (or ran) the guest: the source copy is destroyed;
- it never unpaused it (it rolled back: FAILED, CANCELLED): the source
  copy resumes;
- anything else (no answer, or the destination itself in doubt): the
  guest stays paused here, IN_DOUBT, until a later query or an operator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import datapath
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import RemoteError
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel

LOG = logging.getLogger(__name__)

#: Destination phases in which it runs (or ran) the guest.
RUNS_THERE = frozenset({Phase.CLEANUP.value, Phase.DONE.value})
#: Destination phases in which it never unpaused the guest and never
#: will: it destroyed its copy.
NEVER_RAN = frozenset({Phase.FAILED.value, Phase.CANCELLED.value})
#: Destination phases that are final answers.
FINAL = RUNS_THERE | NEVER_RAN | {Phase.IN_DOUBT.value}


def lease(conf: cfg.ConfigOpts) -> float:
    """Seconds of silence from the source after which a destination
    that did not get COMMIT has destroyed its copy: its wait for the
    next message (``io_timeout``), then for a dropped connection to
    resume (at most ``transfer_retry_timeout``), and ``connect_timeout``
    more for the destroying itself. A source that rolls back without the
    destination's confirmation resumes its copy only after this."""
    opts = conf.xen_ncm
    return opts.io_timeout + opts.transfer_retry_timeout + opts.connect_timeout


class NotYetKnown(TransportError):
    """The destination has not decided yet: ask again."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the destination's answer means for the source copy.

    ``runs_there``: True, the guest runs on the destination (destroy the
    source copy); False, it never ran there (resume it here); None, not
    known (keep it paused, IN_DOUBT).
    """

    runs_there: bool | None
    reason: str
    #: The destination's phase, None without an answer.
    phase: str | None = None


def verdict_of(status: messages.Status) -> Verdict:
    if status.committed or status.phase in RUNS_THERE:
        return Verdict(
            True,
            f"the destination runs the guest ({status.phase})",
            status.phase,
        )
    if status.phase in NEVER_RAN:
        return Verdict(
            False,
            f"the destination never unpaused the guest and destroyed its "
            f"copy ({status.phase})",
            status.phase,
        )
    return Verdict(
        None,
        f"the destination is in {status.phase} and cannot say whether the "
        "guest ran there: check the destination host",
        status.phase,
    )


class CommitQuery:
    """The commit query of ``migration_id`` to the destination at
    ``endpoint``, authenticated with ``token`` (TLS as configured), from
    ``source_address`` when given."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        endpoint: tuple[str, int],
        migration_id: str,
        token: bytes,
        source_address: str | None = None,
    ) -> None:
        self.conf = conf
        self.opts = conf.xen_ncm
        self.endpoint = (endpoint[0], int(endpoint[1]))
        # From the address the destination admits (the announced one).
        self.source_address = source_address
        self.migration_id = migration_id
        self.token = token

    def _connect(self) -> Channel:
        channel = Channel.connect(
            *self.endpoint,
            connect_timeout=self.opts.connect_timeout,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
            tls=transport.tls_context(self.conf, server=False),
            source_address=self.source_address,
        )
        try:
            # What the data path offers (encrypted-frames inside TLS,
            # which a TLS destination requires of every connection).
            channel.client_handshake(
                self.migration_id,
                self.token,
                capabilities=transport.frame_capabilities(
                    self.opts, channel.sock
                ),
            )
        except BaseException:
            channel.close()
            raise
        return channel

    def once(self) -> messages.Status:
        """Ask once; raises :class:`NotYetKnown` while the destination
        has not decided, :class:`TransportError` if it cannot be asked."""
        channel = self._connect()
        try:
            channel.send(messages.Query())
            status = channel.receive()
        finally:
            channel.close()
        if isinstance(status, messages.Error):
            raise ProtocolError(
                f"destination failed: {status.code}: {status.text}"
            )
        if not isinstance(status, messages.Status):
            raise ProtocolError(
                f"expected STATUS, got {type(status).__name__}"
            )
        if not status.committed and status.phase not in FINAL:
            raise NotYetKnown(f"destination is in phase {status.phase}")
        return status

    def ask(
        self, on_retry: Callable[[retry.RetryEvent], None] | None = None
    ) -> Verdict:
        """Ask within the commit query budget; a Verdict in any case."""
        budget = retry.RetryBudget.from_conf(
            self.conf, retry.Step.COMMIT_QUERY
        )
        try:
            status = retry.call(
                self.once,
                what=f"commit query of migration {self.migration_id}",
                budget=budget,
                on_retry=on_retry,
            )
        except EngineError as exc:
            return Verdict(
                None,
                f"the destination {self.endpoint[0]}:{self.endpoint[1]} "
                f"could not be asked ({exc}): check whether the guest runs "
                "there",
            )
        return verdict_of(status)

    def acknowledge(self) -> bool:
        """FINISHED on a new connection: the outcome is acted on and
        recorded here. Whether the destination confirmed it. Best
        effort: unacknowledged, the destination keeps answering the
        same."""
        try:
            channel = self._connect()
        except (EngineError, OSError) as exc:
            LOG.info(
                "Migration %s: final acknowledgement not sent: %s",
                self.migration_id,
                exc,
            )
            return False
        with channel:
            return finish(channel, self.opts.io_timeout, self.migration_id)


def finish(channel: Channel, timeout: float, migration_id: str) -> bool:
    """FINISHED on ``channel``, and whether the destination confirmed
    it: once it has taken it (and forgotten the migration) it answers
    with its STATUS. Sent and not confirmed, it may have been lost."""
    try:
        channel.send(messages.Finished())
        channel.sock.settimeout(timeout)
        reply = channel.receive()
    except (EngineError, OSError, ValueError) as exc:
        reply = exc
    if isinstance(reply, messages.Status):
        return True
    LOG.info(
        "Migration %s: final acknowledgement not confirmed: %s",
        migration_id,
        reply,
    )
    return False


class Coordinator:
    """The source's side of the commit, and of the fence after a
    rollback, over ``data``'s control channel and ``query`` (the commit
    query) once that is gone."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        data: datapath.DataPath,
        query: CommitQuery,
    ) -> None:
        self.conf = conf
        self.opts = conf.xen_ncm
        self.data = data
        self.query = query
        self.migration_id = query.migration_id

    def commit(
        self, on_retry: Callable[[retry.RetryEvent], None] | None = None
    ) -> Verdict:
        """COMMIT on the control channel and COMMITTED back; without that
        acknowledgement, the destination's answer to the commit query."""
        channel = self.data.control
        try:
            # Past the commit decision the downtime budget no longer
            # bounds the wait: the query settles what is not answered.
            channel.sock.settimeout(self.opts.io_timeout)
            channel.send(messages.Commit())
            datapath.expect(channel.receive(), messages.Committed)
            return Verdict(
                True, "destination acknowledged", Phase.CLEANUP.value
            )
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: no acknowledgement of COMMIT (%s); asking "
                "the destination",
                self.migration_id,
                exc,
            )
            self.data.close()
            return self.query.ask(on_retry=on_retry)

    def acknowledge(self) -> bool:
        """The final acknowledgement: FINISHED on the control channel,
        confirmed by the destination's STATUS; without that
        confirmation, again on a new connection (a lost FINISHED would
        keep the destination answering for nothing). Whether confirmed."""
        channel = self.data.control
        if channel is not None:
            confirmed = finish(
                channel, self.opts.io_timeout, self.migration_id
            )
            self.data.close()
            if confirmed:
                return True
        return self.query.acknowledge()

    def fence(
        self,
        error: BaseException,
        *,
        fence: bool,
        torn_down: bool,
        since: float,
    ) -> bool:
        """Tell the destination of a rollback and, with ``fence`` (the
        guest was paused here: the destination may hold all of it),
        return only once its copy is gone: it confirmed its teardown
        (``torn_down``: it already did), or the lease given it from
        ``since`` ran out. True: the destination confirmed and waits for
        the final acknowledgement (:meth:`acknowledge`, once the rollback
        is recorded here); the guest need not wait for it."""
        confirmed = torn_down
        channel = self.data.control
        if channel is not None:
            if isinstance(error, RemoteError):
                # The destination failed and destroys its copy; its
                # STATUS follows the ERROR.
                confirmed = self._await_teardown(since)
            elif not isinstance(error, Refused):
                told = self._best_effort(
                    "tell the destination",
                    channel.send,
                    messages.Abort(reason=str(error)[: messages.MAX_TEXT]),
                )
                if told and fence and not confirmed:
                    confirmed = self._await_teardown(since)
            if confirmed:
                return True
            self.data.close()
        if confirmed:
            return True
        if fence:
            if self._query_teardown(since):
                # Confirmed on the query path; acknowledged, as on the
                # control channel, once the rollback is recorded here (a
                # crash before that finds the answer still kept).
                return True
            self._await_lease(since)
        return False

    def _await_teardown(self, since: float) -> bool:
        """Whether the destination confirmed it destroyed its copy (a
        STATUS of a rolled back migration) within the lease given it
        from ``since`` (the rollback's start)."""
        deadline = since + lease(self.conf)
        channel = self.data.control
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                channel.sock.settimeout(left)
                message = channel.receive()
                if isinstance(message, messages.Status):
                    return message.phase in NEVER_RAN
        except (EngineError, OSError) as exc:
            LOG.warning(
                "Migration %s: the destination did not confirm its "
                "teardown: %s",
                self.migration_id,
                exc,
            )
            return False

    def _query_teardown(self, since: float) -> bool:
        """Ask the destination (commit query) until it says its copy is
        gone or the lease given it ran out; whether it said so."""
        deadline = since + lease(self.conf)
        while time.monotonic() < deadline:
            try:
                status = self.query.once()
            except (EngineError, OSError) as exc:
                LOG.debug("Teardown query: %s", exc)
                time.sleep(
                    min(
                        self.opts.retry_max_delay,
                        max(0.0, deadline - time.monotonic()),
                    )
                )
                continue
            return status.phase in NEVER_RAN
        return False

    def _await_lease(self, since: float) -> None:
        """Keep the guest paused until a destination that heard nothing
        since ``since`` has destroyed its copy."""
        left = since + lease(self.conf) - time.monotonic()
        if left > 0:
            LOG.warning(
                "Migration %s: teardown not confirmed; the guest resumes "
                "here in %.1fs, once the destination's lease ran out",
                self.migration_id,
                left,
            )
            time.sleep(left)

    def _best_effort(self, what: str, fn: Callable, *args: Any) -> bool:
        try:
            fn(*args)
        except Exception as exc:
            LOG.error(
                "Migration %s: could not %s: %s",
                self.migration_id,
                what,
                exc,
            )
            return False
        return True
