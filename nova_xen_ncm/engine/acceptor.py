"""The destination's one acceptor: every connection on a migration's port.

Each connection is authenticated on a thread of its own (at most
:data:`MAX_HANDSHAKES` at once) under the handshake deadline, so a peer
that never completes a HELLO delays nobody, then routed by what it
proved:

- AUTH of channel 0, the first one: the source's control channel;
- AUTH of channel n, once SETUP announced the channels: data channel n;
- RESUME of a channel the receiver waits for (it dropped): its new
  connection, the frames going on after the last one applied here;
- any later AUTH of channel 0: a commit query (commit.py), answered on
  its thread for at most ``connect_timeout``: QUERY gets the STATUS
  once final (or as it is when that time is up), FINISHED (the source's
  final acknowledgement, taken once the outcome is final) lets the
  destination forget.

Anything else is refused in the handshake and closed: another
migration's connection, a channel not expected, a RESUME of a channel that
did not drop. A failed handshake costs its own connection only, before
the control channel as after it: the migration id is no secret, so a
peer that did not prove it holds the token (a wrong proof, a version
nobody speaks, TLS that fails) cannot end the wait for the source. The
wait ends at ``accept_timeout`` naming the last such failure.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.engine.transport import Listener

LOG = logging.getLogger(__name__)

#: Connections authenticated (or answered) at once.
MAX_HANDSHAKES = 8
#: Seconds between two looks at what the waiters wait for.
_POLL = 0.05
_CAPABILITIES = (
    messages.Capability.LZ4.value,
    messages.Capability.MULTI_CHANNEL.value,
    messages.Capability.STOP_NOTICE.value,
)


def _shut(sock: object) -> None:
    """Wake whatever reads ``sock`` (a TLS handshake included)."""
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)


class Acceptor:
    """Accepts, authenticates and routes the connections of ``listener``
    for migration ``migration_id`` (token ``token``) until :meth:`close`.

    ``status`` answers commit queries; ``on_finished`` is called once,
    on the source's final acknowledgement; ``resume_from(index)`` is the
    highest frame applied on channel ``index``, where a RESUME goes on.
    ``source=False``: no source connects any more (a restarted engine
    answering from its journal), every AUTH is a commit query.
    """

    def __init__(
        self,
        listener: Listener,
        migration_id: str,
        token: bytes,
        conf: cfg.ConfigOpts,
        *,
        status: Callable[[], messages.Status],
        on_finished: Callable[[], None],
        resume_from: Callable[[int], int] | None = None,
        source: bool = True,
    ) -> None:
        self.listener = listener
        self.migration_id = migration_id
        self.token = token
        self.opts = conf.xen_ncm
        self.status = status
        self.on_finished = on_finished
        self._resume_seq = resume_from
        #: Set once the source acknowledged the outcome.
        self.finished = threading.Event()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(MAX_HANDSHAKES)
        self._closed = False
        # The control channel: None, then the channel until taken.
        self._control: Channel | None = None
        self._control_routed = not source
        # The last failed handshake while the source is awaited.
        self._stray: Exception | None = None
        # Data channels: how many SETUP announced, those connected, and
        # whether the receiver took them.
        self._data_count = 0
        self._data: dict[int, Channel] = {}
        self._data_taken = False
        # Dropped channels waiting for their RESUME, and the resumed
        # connections not yet taken.
        self._dropped: set[int] = set()
        self._resumed: dict[int, Channel] = {}
        # Set on the first commit query: the source asks for the outcome
        # (it sent COMMIT, or rolled back) and resumes nothing any more.
        self._queried = False
        self._thread = threading.Thread(
            target=self._loop,
            name=f"migration-{migration_id}-accept",
            daemon=True,
        )
        self._thread.start()

    # -- what the receiver waits for --

    def control(self, until: float) -> Channel | None:
        """The source's control channel; None once the listener is
        closed. Raises, at the monotonic time ``until``, the last failed
        handshake or a transport error."""
        with self._cond:
            while True:
                if self._control is not None:
                    channel, self._control = self._control, None
                    return channel
                if self.listener.closed or self._closed:
                    return None
                left = until - time.monotonic()
                if left <= 0:
                    if self._stray is not None:
                        raise self._stray
                    raise TransportError(
                        f"no source connected on port {self.listener.port} "
                        f"within {self.listener.accept_timeout}s"
                    )
                self._cond.wait(min(left, _POLL))

    def expect_data(self, count: int) -> None:
        """SETUP announced ``count`` channels: 1..count-1 may connect."""
        with self._cond:
            self._data_count = count
        self.listener.allow(count - 1)

    def data_channels(self, until: float) -> dict[int, Channel]:
        """Data channels 1..count-1, once all connected (in any order)."""
        with self._cond:
            while len(self._data) < self._data_count - 1:
                left = until - time.monotonic()
                if left <= 0 or self._closed or self.listener.closed:
                    raise TransportError(
                        f"{len(self._data)} of {self._data_count - 1} data "
                        f"channels connected on port {self.listener.port} "
                        f"within {self.listener.accept_timeout}s"
                    )
                self._cond.wait(min(left, _POLL))
            self._data_taken = True
            return dict(self._data)

    def resumed(
        self, index: int, until: float, over: threading.Event
    ) -> Channel:
        """The new connection of channel ``index``, which dropped: its
        RESUME, before the monotonic time ``until`` and while ``over``
        is not set."""
        self.listener.allow()
        with self._cond:
            self._dropped.add(index)
            self._cond.notify_all()
            try:
                while True:
                    channel = self._resumed.pop(index, None)
                    if channel is not None:
                        return channel
                    left = until - time.monotonic()
                    if self._queried:
                        raise TransportError(
                            f"channel {index} will not be resumed: the "
                            "source asks for the outcome instead"
                        )
                    if left <= 0 or over.is_set() or self._closed:
                        raise TransportError(
                            f"channel {index} was not resumed in time"
                        )
                    self._cond.wait(min(left, _POLL))
            finally:
                self._dropped.discard(index)

    def close(self) -> None:
        """Stop accepting; close what was routed and not taken."""
        with self._cond:
            self._closed = True
            left = [*self._resumed.values()]
            self._resumed.clear()
            if self._control is not None:
                left.append(self._control)
                self._control = None
            if not self._data_taken:
                left += self._data.values()
            self._cond.notify_all()
        for channel in left:
            channel.close()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the accept loop --

    def _loop(self) -> None:
        while not self._closed and not self.listener.closed:
            if not self._slots.acquire(timeout=_POLL):
                continue
            taken = self.listener.take(_POLL)
            if taken is None:
                self._slots.release()
                continue
            threading.Thread(
                target=self._serve,
                args=taken,
                name=f"migration-{self.migration_id}-handshake",
                daemon=True,
            ).start()

    def _serve(self, sock: socket.socket, peer: object) -> None:
        deadline = min(self.opts.io_timeout, self.listener.handshake_timeout)
        # One deadline for TLS and the handshake together, from when the
        # connection is taken: a socket timeout bounds each read only,
        # and TLS then the handshake would each have had their own.
        expired = threading.Event()
        # The socket to wake: TLS takes over the TCP one.
        current = [sock]

        def cut_off() -> None:
            expired.set()
            _shut(current[0])

        watchdog = threading.Timer(deadline, cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            # Room left for the WELCOME after a wait in resume_from.
            until = time.monotonic() + 0.8 * deadline
            try:
                secured = self.listener.secure(sock, peer)
            except TransportError as exc:
                self._failed(peer, self._late(expired, deadline, exc))
                return
            current[0] = secured
            if expired.is_set():
                _shut(secured)
            channel = Channel(
                secured,
                framing.Connection(
                    messages.Role.SERVER,
                    max_data=self.opts.max_frame_bytes,
                    direct_payload=True,
                ),
                io_timeout=self.opts.io_timeout,
            )
            try:
                hello, proof = channel.server_handshake(
                    functools.partial(self._token_for, until),
                    capabilities=[
                        *_CAPABILITIES,
                        *transport.frame_capabilities(self.opts, secured),
                    ],
                    resume_from=functools.partial(self._resume_from, until),
                    deadline=deadline,
                )
            except Exception as exc:
                channel.close()
                self._failed(peer, self._late(expired, deadline, exc))
                return
            watchdog.cancel()
            if expired.is_set():
                # Cut off between the WELCOME and here: not for routing.
                channel.close()
                self._failed(peer, self._late(expired, deadline, None))
                return
            if not self._route(channel, hello, proof):
                self._answer(channel)
        finally:
            watchdog.cancel()
            self._slots.release()

    @staticmethod
    def _late(
        expired: threading.Event, deadline: float, exc: Exception | None
    ) -> Exception:
        """``exc``, or the deadline's error if it is what ended it."""
        if not expired.is_set() or (
            # The handshake's own watchdog named the deadline already.
            exc is not None and str(exc).startswith("handshake not done")
        ):
            return exc
        cause = f": {exc}" if exc is not None else ""
        return TransportError(f"handshake not done within {deadline}s{cause}")

    def _token_for(self, until: float, hello: messages.Hello) -> bytes:
        if hello.migration_id != self.migration_id:
            raise Refused(
                messages.RefuseReason.UNKNOWN_MIGRATION,
                f"no incoming migration {hello.migration_id!r} here",
            )
        index = hello.channel
        if index:
            with self._cond:
                # A connected data channel may be the source resuming it
                # before its thread here read the drop (the source saw
                # it first): wait for that as _resume_from does, not a
                # refusal, which the source does not retry.
                while (
                    index in self._data
                    and index not in self._dropped
                    and not self._closed
                    and time.monotonic() < until
                ):
                    self._cond.wait(_POLL)
                expected = index in self._dropped or (
                    index < self._data_count and index not in self._data
                )
                count = self._data_count
            if not expected:
                raise Refused(
                    messages.RefuseReason.TOO_MANY_CONNECTIONS,
                    f"channel {index} of {count} is not expected",
                )
        return self.token

    def _resume_from(
        self, until: float, hello: messages.Hello, resume: messages.Resume
    ) -> int:
        """Where channel ``hello.channel`` goes on. The source may resume
        before this side saw the connection drop: the handshake waits for
        that until the monotonic time ``until``, then closes without a
        refusal (the source tries again)."""
        index = hello.channel
        while True:
            with self._cond:
                waiting = index in self._dropped
                if (
                    waiting
                    or self._resume_seq is None
                    or self._closed
                    or time.monotonic() >= until
                ):
                    break
                self._cond.wait(_POLL)
            if self.status().phase in commit.FINAL:
                break
        if waiting and self._resume_seq is not None:
            return self._resume_seq(index)
        phase = self.status().phase
        if self._resume_seq is None or phase in commit.FINAL:
            raise Refused(
                messages.RefuseReason.BAD_REQUEST,
                f"migration {self.migration_id} is over here ({phase}): "
                "nothing to resume",
            )
        raise TransportError(
            f"channel {index} of migration {self.migration_id} did not "
            "drop here within the handshake"
        )

    def _failed(self, peer: object, exc: Exception) -> None:
        # Recorded once, here (TLS failures included).
        self.listener.rejected.append((str(peer), str(exc)))
        with self._cond:
            waiting = not self._control_routed
            if waiting:
                # Not authenticated: it cannot end the wait.
                self._stray = exc
            self._cond.notify_all()
        LOG.warning(
            "Migration %s: dropped a connection (%s)%s",
            self.migration_id,
            exc,
            "; still waiting for the source" if waiting else "",
        )

    def _route(
        self,
        channel: Channel,
        hello: messages.Hello,
        proof: messages.Auth | messages.Resume,
    ) -> bool:
        """Hand ``channel`` to whoever waits for it; False: a commit
        query, answered on this thread."""
        index = hello.channel
        with self._cond:
            if self._closed:
                routed = None
            elif isinstance(proof, messages.Resume):
                routed = index in self._dropped and index not in self._resumed
                if routed:
                    self._resumed[index] = channel
            elif index == 0:
                if self._control_routed:
                    # A commit query: no waiter for a resume waits on.
                    self._queried = True
                    self._cond.notify_all()
                    return False
                self._control_routed = True
                self._control = channel
                routed = True
            else:
                routed = index not in self._data
                if routed:
                    self._data[index] = channel
            if routed:
                self.listener.accepted += 1
                self._cond.notify_all()
        if not routed:
            LOG.info(
                "Migration %s: channel %d connected when not awaited",
                self.migration_id,
                index,
            )
            channel.close()
        return True

    def _answer(self, channel: Channel) -> None:
        """Answer a commit query connection, for ``connect_timeout`` at
        most: an authenticated peer cannot hold a slot for longer."""
        deadline = time.monotonic() + self.opts.connect_timeout
        with channel:
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    channel.sock.settimeout(left)
                    message = channel.receive()
                    if isinstance(message, messages.Query):
                        channel.send(self._settled(deadline))
                    elif isinstance(message, messages.Finished):
                        self._finish()
                        if self.finished.is_set():
                            # Taken: confirmed, so the source knows it
                            # was not lost.
                            channel.send(self.status())
                        return
                    else:
                        return
            except (EngineError, OSError, ValueError) as exc:
                LOG.debug(
                    "Migration %s: commit query connection: %s",
                    self.migration_id,
                    exc,
                )

    def _settled(self, deadline: float) -> messages.Status:
        """The status once final, or as it is at ``deadline``: a source
        asking while this side still decides gets the decision, not an
        answer that only spends its attempts."""
        until = min(deadline, time.monotonic() + self.opts.io_timeout)
        while True:
            status = self.status()
            if status.committed or status.phase in commit.FINAL:
                return status
            if time.monotonic() >= until or self._closed:
                return status
            time.sleep(_POLL)

    def _finish(self) -> None:
        # An acknowledgement of an outcome this side has not reached
        # yet acknowledges nothing.
        if self.status().phase not in commit.FINAL:
            return
        with self._cond:
            if self.finished.is_set():
                return
            self.finished.set()
        self.on_finished()
