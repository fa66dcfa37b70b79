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
(:class:`Answerer`), until the source acknowledges. A :class:`Verdict`
says what the answer means for the source copy:

- the destination runs (or ran) the guest: the source copy is destroyed;
- it never unpaused it (it rolled back: FAILED, CANCELLED): the source
  copy resumes;
- anything else (no answer, or the destination itself in doubt): the
  guest stays paused here, IN_DOUBT, until a later query or an operator.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener

LOG = logging.getLogger(__name__)

#: Destination phases in which it runs (or ran) the guest.
RUNS_THERE = frozenset({Phase.CLEANUP.value, Phase.DONE.value})
#: Destination phases in which it never unpaused the guest and never
#: will: it destroyed its copy.
NEVER_RAN = frozenset({Phase.FAILED.value, Phase.CANCELLED.value})
#: Commit query connections answered at once.
MAX_ANSWERING = 8
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
    ``endpoint``, authenticated with ``token`` (TLS as configured)."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        endpoint: tuple[str, int],
        migration_id: str,
        token: bytes,
    ) -> None:
        self.conf = conf
        self.opts = conf.xen_ncm
        self.endpoint = (endpoint[0], int(endpoint[1]))
        self.migration_id = migration_id
        self.token = token

    def _connect(self) -> Channel:
        channel = Channel.connect(
            *self.endpoint,
            connect_timeout=self.opts.connect_timeout,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
            tls=transport.tls_context(self.conf, server=False),
        )
        try:
            channel.client_handshake(self.migration_id, self.token)
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
        recorded here. Best effort: unacknowledged, the destination keeps
        answering the same."""
        try:
            channel = self._connect()
        except (EngineError, OSError) as exc:
            LOG.info(
                "Migration %s: final acknowledgement not sent: %s",
                self.migration_id,
                exc,
            )
            return False
        try:
            channel.send(messages.Finished())
            # The destination closes once it has forgotten.
            channel.receive()
        except (EngineError, OSError) as exc:
            LOG.debug("Final acknowledgement: %s", exc)
        finally:
            channel.close()
        return True


class Answerer:
    """The destination's side of the commit query: answers QUERY with
    ``status()`` and takes FINISHED (``on_finished``) on connections of
    ``listener``, each in a thread of its own under a handshake deadline,
    so that stray or slow connections delay no other."""

    def __init__(
        self,
        listener: Listener,
        migration_id: str,
        token: bytes,
        conf: cfg.ConfigOpts,
        status: Callable[[], messages.Status],
        on_finished: Callable[[], None],
    ) -> None:
        self.listener = listener
        self.migration_id = migration_id
        self.token = token
        self.opts = conf.xen_ncm
        self.status = status
        self.on_finished = on_finished
        self.finished = threading.Event()

    def _token_for(self, hello: messages.Hello) -> bytes:
        if hello.migration_id != self.migration_id:
            raise Refused(
                messages.RefuseReason.UNKNOWN_MIGRATION,
                f"no migration {hello.migration_id!r} here",
            )
        return self.token

    def _no_resume(self, hello: messages.Hello, resume: object) -> int:
        raise Refused(
            messages.RefuseReason.BAD_REQUEST,
            f"migration {self.migration_id} is over here "
            f"({self.status().phase}): nothing to resume",
        )

    def serve(self, until: float) -> bool:
        """Answer until FINISHED or the monotonic time ``until``; whether
        the source acknowledged."""
        threads: list[threading.Thread] = []
        while not self.finished.is_set():
            left = until - time.monotonic()
            if left <= 0:
                break
            if self.listener.closed:
                break
            # Short waits: FINISHED may come on another thread.
            taken = self.listener.take(min(left, 0.2))
            if taken is None:
                continue
            threads = [t for t in threads if t.is_alive()]
            if len(threads) >= MAX_ANSWERING:
                LOG.warning(
                    "Migration %s: commit query from %s dropped: %d are "
                    "being answered",
                    self.migration_id,
                    taken[1],
                    MAX_ANSWERING,
                )
                taken[0].close()
                continue
            thread = threading.Thread(
                target=self._answer,
                args=taken,
                name=f"migration-{self.migration_id}-query",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(self.opts.connect_timeout)
        return self.finished.is_set()

    def _answer(self, sock: Any, peer: object) -> None:
        try:
            sock = self.listener.secure(sock, peer)
        except TransportError:
            return
        channel = Channel(
            sock,
            framing.Connection(
                messages.Role.SERVER, max_data=self.opts.max_frame_bytes
            ),
            io_timeout=self.opts.connect_timeout,
        )
        with channel:
            try:
                channel.server_handshake(
                    self._token_for,
                    resume_from=self._no_resume,
                    deadline=self.opts.connect_timeout,
                )
                while True:
                    message = channel.receive()
                    if isinstance(message, messages.Query):
                        channel.send(self.status())
                    elif isinstance(message, messages.Finished):
                        if not self.finished.is_set():
                            self.finished.set()
                            self.on_finished()
                        return
                    else:
                        return
            except (EngineError, OSError, ValueError) as exc:
                LOG.debug(
                    "Migration %s: commit query connection: %s",
                    self.migration_id,
                    exc,
                )
