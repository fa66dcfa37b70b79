"""The source's channels to the destination: the multi-channel data path.

Channel 0 carries the control messages and the stream's records; page
batches are shared out over all channels, each with its own frame
sequence and the highest frame the destination acknowledged on it. A
round's shares go out in parallel (:meth:`DataPath.on_channels`): channel
0 on the calling thread, the others on a pool's (hashing and socket
writes release the GIL). A channel whose connection drops is closed and
resumed (:meth:`DataPath.reconnect`, RESUME with the last acknowledged
frame); while the guest is paused no socket call outlasts the downtime
budget (:meth:`DataPath.bound_io`).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import transport
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import RemoteError
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.stream.records import Buffers


class Halted(TransportError):
    """A channel stopped because another channel of the round failed; it
    is not broken itself."""


def expect(message: Any, kind: type) -> Any:
    """``message`` if it is a ``kind``; the destination's ERROR or ABORT
    as :class:`RemoteError`, anything else as a protocol error."""
    if isinstance(message, messages.Error):
        raise RemoteError(
            f"destination failed: {message.code}: {message.text}"
        )
    if isinstance(message, messages.Abort):
        raise RemoteError(f"destination aborted: {message.reason}")
    if not isinstance(message, kind):
        raise ProtocolError(
            f"expected {kind.__name__}, got {type(message).__name__}"
        )
    return message


class DataPath:
    """The ``count`` channels of migration ``migration_id`` to the
    destination at ``endpoint``, authenticated with ``token``."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        endpoint: tuple[str, int],
        migration_id: str,
        token: bytes,
        *,
        count: int,
        clock: Callable[[], float],
        source_address: str | None = None,
    ) -> None:
        self.conf = conf
        self.opts = conf.xen_ncm
        self.endpoint = endpoint
        #: The address every channel connects from (None: any).
        self.source_address = source_address
        self.migration_id = migration_id
        self.token = token
        self._clock = clock
        self.channels: list[Channel | None] = [None] * count
        #: The highest frame the destination acknowledged, per channel.
        self.acked_by = [0] * count
        #: The highest frame sent, per channel, kept across a drop: a
        #: resumed channel's WELCOME cannot claim more.
        self.sent_by = [0] * count
        #: Whether data frames are lz4-compressed (both ends agreed).
        self.compress = False
        #: While the guest is paused: when the downtime budget is spent
        #: (clock time); no socket call outlasts it.
        self.deadline: float | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Set when a channel of a round failed: the others stop too.
        self._halt = threading.Event()
        self._thread_channel = threading.local()
        # The migration's bandwidth cap, shared by all its channels.
        cap = self.opts.max_bandwidth * (1 << 20)
        self.pacer = transport.Pacer(cap) if cap else None

    @property
    def count(self) -> int:
        return len(self.channels)

    @property
    def control(self) -> Channel | None:
        """The control channel (channel 0)."""
        return self.channels[0]

    def connect(
        self, last_acked: int | None = None, index: int = 0
    ) -> Channel:
        """A new authenticated connection of channel ``index``;
        ``last_acked`` resumes the channel after a drop (RESUME instead
        of AUTH)."""
        caps = [messages.Capability.STOP_NOTICE.value]
        if self.opts.compression == "lz4":
            caps.append(messages.Capability.LZ4.value)
        if self.count > 1:
            caps.append(messages.Capability.MULTI_CHANNEL.value)
        channel = Channel.connect(
            *self.endpoint,
            connect_timeout=self.opts.connect_timeout,
            io_timeout=self.opts.io_timeout,
            max_data=self.opts.max_frame_bytes,
            tls=transport.tls_context(self.conf, server=False),
            source_address=self.source_address,
        )
        channel.pacer = self.pacer
        caps += transport.frame_capabilities(self.opts, channel.sock)
        try:
            welcome = channel.client_handshake(
                self.migration_id,
                self.token,
                channel=index,
                capabilities=caps,
                last_acked=last_acked,
            )
            if last_acked is not None:
                self._check_resume(index, last_acked, welcome.resume_from)
        except BaseException:
            channel.close()
            raise
        return channel

    def _check_resume(
        self, index: int, last_acked: int, resume_from: int
    ) -> None:
        """A resumed channel goes on after what the destination applied:
        at least what it acknowledged, at most what was sent. Anything
        else is a destination that lies or lost frames it acknowledged,
        and the migration rolls back rather than leave a hole."""
        sent = self.sent_by[index]
        if not last_acked <= resume_from <= sent:
            raise ProtocolError(
                f"destination resumed channel {index} from frame "
                f"{resume_from}, outside {last_acked}..{sent} (acknowledged"
                f"..sent): refused"
            )

    def bound_io(self, index: int = 0) -> None:
        """While the guest is paused, no socket call may outlast the
        downtime budget: past it the migration rolls back."""
        if self.deadline is None:
            return
        left = self.deadline - self._clock()
        if left <= 0:
            raise TransportError(
                f"downtime budget of {self.opts.downtime_budget}s spent"
            )
        self.channels[index].sock.settimeout(min(self.opts.io_timeout, left))

    def receive(self) -> Any:
        """The next message on the control channel."""
        self.bound_io()
        return self.control.receive()

    def send(self, buffers: Buffers, *, pages: bool = False) -> int:
        """A data frame of stream records on the control channel."""
        self.bound_io()
        seq = self.control.connection.last_seq + 1
        return self.control.send_data(
            seq, buffers, compress=self.compress, pages=pages
        )

    def send_batch(self, index: int, buffers: Buffers) -> int:
        """A page batch on channel ``index``; the bytes written."""
        if self._halt.is_set():
            raise Halted("another channel of the round failed")
        self.bound_io(index)
        channel = self.channels[index]
        seq = channel.connection.last_seq + 1
        return channel.send_data(
            seq, buffers, compress=self.compress, pages=True
        )

    def send_numbered(
        self,
        index: int,
        frames: Sequence[tuple[int, Buffers]],
        *,
        pages: bool,
    ) -> None:
        """Send the numbered frames the destination lacks on channel
        ``index``."""
        channel = self.channels[index]
        applied = channel.connection.last_seq
        for seq, buffers in frames:
            if seq > applied:
                if self._halt.is_set():
                    raise Halted("another channel failed")
                self.bound_io(index)
                channel.send_data(
                    seq, buffers, compress=self.compress, pages=pages
                )

    def channel_index(self) -> int:
        """The channel the calling thread serves (0 off the pool)."""
        return getattr(self._thread_channel, "index", 0)

    def on_channels(self, work: Callable[[int], Any]) -> list[Any]:
        """``work(index)`` for every channel, in parallel. If one fails,
        the others stop at their next frame; a channel whose socket
        failed is closed, to be resumed. Raises the failure (a transport
        one last: it is retried)."""

        def run(index: int) -> Any:
            self._thread_channel.index = index
            try:
                return work(index)
            except Halted:
                raise
            except TransportError:
                self.close(index)
                self._halt.set()
                raise
            except BaseException:
                self._halt.set()
                raise

        if self.count == 1:
            try:
                return [run(0)]
            finally:
                self._halt.clear()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.count - 1,
                thread_name_prefix=f"migration-{self.migration_id}-out",
            )
        futures = [self._pool.submit(run, i) for i in range(1, self.count)]
        results: list[Any] = []
        errors: list[BaseException] = []
        try:
            results.append(run(0))
        except BaseException as exc:
            errors.append(exc)
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:
                errors.append(exc)
        self._halt.clear()
        if errors:
            errors.sort(
                key=lambda e: (
                    isinstance(e, TransportError),
                    isinstance(e, Halted),
                )
            )
            raise errors[0]
        return results

    def reconnect(self) -> None:
        """Resume every channel that dropped: frames go on after the last
        one the destination applied (the connection numbers them from
        its resume_from)."""
        for index, channel in enumerate(self.channels):
            if channel is None:
                self.channels[index] = self.connect(
                    last_acked=self.acked_by[index], index=index
                )

    def flush(self) -> None:
        """An empty DATA frame asks the destination to acknowledge all it
        applied: the end of a round, measured end to end."""
        self.flush_channel(0)

    def flush_channel(self, index: int) -> None:
        self.bound_io(index)
        channel = self.channels[index]
        seq = channel.connection.last_seq + 1
        channel.send_data(seq, [])
        ack = expect(channel.receive(), messages.Ack)
        if ack.seq != seq:
            raise ProtocolError(f"ACK of frame {ack.seq}, expected {seq}")
        self.acked_by[index] = seq

    def close(self, index: int | None = None) -> None:
        """Close channel ``index``, or all of them."""
        which = range(self.count) if index is None else [index]
        for i in which:
            channel, self.channels[i] = self.channels[i], None
            if channel is not None:
                self.sent_by[i] = max(
                    self.sent_by[i], channel.connection.last_seq
                )
                channel.close()

    def shutdown(self) -> None:
        """Close every channel and stop the pool."""
        self.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
