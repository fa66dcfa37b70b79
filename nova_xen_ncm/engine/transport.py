"""Sockets for the migration protocol: the destination's listener and the
channels both ends talk over.

The protocol itself is :mod:`nova_xen_ncm.engine.framing` (sans-I/O);
this module only moves its bytes. Page data goes out by ``sendmsg`` of
the caller's buffers (the guest's mapped pages) without joining them, and
comes in by ``recv_into`` straight into a caller's buffer (the restoring
guest's pages), as architecture.rst section 5 asks of the data path. Socket
failures and timeouts become :class:`TransportError`, which the retry
helper retries; protocol violations stay :class:`ProtocolError`, which it
does not.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import framing
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine.errors import AuthenticationError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import Refused
from nova_xen_ncm.engine.errors import TransportError

LOG = logging.getLogger(__name__)

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024

RECV_SIZE = 256 * 1024
#: Ciphertext read per call before it is decrypted into place
#: (encrypted-frames): small enough to stay in the cache.
CIPHER_CHUNK = 256 * 1024

Buffer = bytes | bytearray | memoryview


class TlsSocket:
    """A TLS connection that a :class:`Channel` uses like its socket.

    ``ssl.SSLSocket`` has no ``sendmsg``: this wrapper gives the Channel
    one that gathers the buffers (guest pages) into one staging buffer
    and hands TLS up to :attr:`CHUNK` octets per write, so one call into
    OpenSSL seals many records (TLS copies while it encrypts anyway; the
    gathering copy is the only other one). Everything else
    (``recv_into``, timeouts, ``shutdown``) is the SSLSocket's own.
    """

    #: Octets handed to one TLS write (many 16 KiB records).
    CHUNK = 1 << 20

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._stage: bytearray | None = None
        # Called once per TLS record (16 KiB) read: not through
        # __getattr__ each time.
        self.recv_into = sock.recv_into

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)

    @property
    def tls(self) -> ssl.SSLSocket:
        return self._sock

    def leave(self) -> socket.socket:
        """End TLS on this connection (close_notify sent and received,
        under the socket's timeout) and return the TCP socket to go on
        with; this wrapper is done. Only after a handshake that leaves
        nothing unread: OpenSSL reads record by record, so what the peer
        sends after its close_notify stays in the socket."""
        family, kind, proto = (
            self._sock.family,
            self._sock.type,
            self._sock.proto,
        )
        timeout = self._sock.gettimeout()
        raw = self._sock.unwrap()
        plain = socket.socket(family, kind, proto, fileno=raw.detach())
        plain.settimeout(timeout)
        return plain

    def sendmsg(self, buffers: Sequence[Buffer]) -> int:
        if self._stage is None:
            self._stage = bytearray(self.CHUNK)
        with memoryview(self._stage) as stage:
            size = total = 0
            for buf in buffers:
                view = memoryview(buf).cast("B")
                n = view.nbytes
                total += n
                if n >= self.CHUNK:
                    if size:
                        self._sock.sendall(stage[:size])
                        size = 0
                    self._sock.sendall(view)
                    continue
                if size + n > self.CHUNK:
                    self._sock.sendall(stage[:size])
                    size = 0
                stage[size : size + n] = view
                size += n
            if size:
                self._sock.sendall(stage[:size])
        return total


def frame_capabilities(
    opts: cfg.ConfigOpts.GroupAttr, sock: socket.socket | TlsSocket
) -> list[str]:
    """The capabilities about frame tags this end offers (a client) or
    accepts (a server) on ``sock``. On a TLS connection
    ``encrypted-frames`` (``[xen_ncm] tls_encrypted_frames``, the
    default), which both ends then require: TLS authenticates the peers
    and carries the handshake, then both leave it and every frame is
    encrypted and authenticated with AES-256-GCM under keys of the
    nonces that crossed inside TLS and the token (a relay holding a
    certificate of the CA sees the nonces but not the token, so no
    hostname check is needed for it). Otherwise ``tls-frames`` on a TLS
    connection, whose records already authenticate every octet;
    ``unauthenticated-frames`` on a plain one only where ``[xen_ncm]
    frame_authentication`` is false. A tag is dropped only when both
    ends offer the same one.

    A source whose TLS did not check that the certificate names the
    destination offers nothing: the token handshake is not bound to the
    TLS session, so a holder of any certificate of the migration CA on
    the path could terminate TLS on both sides and relay the handshake;
    only the frame tags, keyed by the token, then stop it altering
    frames."""
    if isinstance(sock, TlsSocket):
        if opts.tls_encrypted_frames:
            return [messages.Capability.ENCRYPTED_FRAMES.value]
        if not sock.server_side and not sock.context.check_hostname:
            return []
        return [messages.Capability.TLS_FRAMES.value]
    if not opts.frame_authentication:
        return [messages.Capability.UNAUTHENTICATED_FRAMES.value]
    return []


#: OpenSSL's names of the TLS 1.2 suites allowed: ECDHE key exchange,
#: AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def tls_context(
    conf: cfg.ConfigOpts, *, server: bool
) -> ssl.SSLContext | None:
    """The mutual TLS context of ``[xen_ncm] tls_*``, None when TLS is
    off. Both ends present a certificate and require the peer's, signed
    by ``tls_ca_file``; TLS 1.2 at least, AEAD suites only."""
    group = conf.xen_ncm
    if not group.tls_enabled:
        return None
    missing = [
        name
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file")
        if not getattr(group, name)
    ]
    if missing:
        raise TransportError(
            f"[xen_ncm] tls_enabled needs {', '.join(missing)}"
        )
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    try:
        context = ssl.create_default_context(purpose, cafile=group.tls_ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2 too only with AEAD suites and forward secrecy: the
        # security model counts on the records' AEAD authenticating every
        # octet (doc/source/security.rst), which CBC-HMAC suites do not
        # give in the same way. TLS 1.3's suites are all AEAD.
        context.set_ciphers(TLS12_CIPHERS)
        context.load_cert_chain(group.tls_cert_file, group.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot set up TLS: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = not server and group.tls_check_hostname
    return context


def _wrap_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
) -> TlsSocket:
    """Run the TLS handshake on a connected socket (under its timeout)."""
    server = server_hostname is None
    try:
        tls = context.wrap_socket(
            sock, server_side=server, server_hostname=server_hostname
        )
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise TransportError(f"TLS handshake failed: {exc}") from exc
    return TlsSocket(tls)


def _source_networks(
    sources: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(
            ipaddress.ip_network(s.strip(), strict=False)
            for s in sources
            if s.strip()
        )
    except ValueError as exc:
        raise ValueError(f"bad allowed source address: {exc}") from exc


def _address(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(peer[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped or addr


#: Connections a listener keeps waiting to be handled; more are refused
#: on arrival.
MAX_WAITING = 16


def _connect(
    host: str, port: int, timeout: float, source_address: str | None
) -> socket.socket:
    """A TCP connection to ``host``:``port``, leaving from
    ``source_address`` when given. Failing to leave from that address
    (not one of this host's, or of no family the destination has) is
    said as such: this host's configuration is wrong, not the
    destination."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(
            f"cannot connect to {host}:{port}: {exc}"
        ) from exc
    last: OSError | None = None
    unbound: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                try:
                    sock.bind((source_address, 0))
                except OSError as exc:
                    # Perhaps of the other family: the next one may do.
                    unbound = exc
                    sock.close()
                    continue
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    if last is None and unbound is not None:
        raise TransportError(
            f"cannot leave from source address {source_address} to reach "
            f"{host}:{port}: {unbound} (the address this host announced "
            "to the destination: [xen_ncm] listen_address, or Nova's "
            "my_ip when that is a wildcard)"
        ) from unbound
    raise TransportError(f"cannot connect to {host}:{port}: {last}") from last


def _peer(sock: socket.socket | TlsSocket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, TypeError, ValueError):
        return "an unknown peer"
    return f"{host}:{port}"


class Listener:
    """The destination's listening socket for one incoming migration.

    Binds the first free port of ``[port_min, port_max]`` and admits at
    most ``expected`` connections (the migration's channels); a reconnect
    is admitted only after :meth:`allow`. A thread of the listener takes
    every connection as it comes, so one the migration does not expect is
    closed and logged, never left waiting: one from an address outside
    ``allowed_sources`` (addresses or networks; empty admits any) at
    once, one beyond the admitted connections after ``handshake_timeout``
    seconds (the grace a reconnecting channel has to be admitted), one
    that fails the TLS handshake when ``tls`` is given. The acceptor
    (acceptor.py) takes each connection (:meth:`take`), secures it
    (:meth:`secure`) and authenticates it; ``accept_timeout`` is how long
    it waits for the source.
    """

    def __init__(
        self,
        host: str,
        port_min: int,
        port_max: int,
        *,
        expected: int = 1,
        accept_timeout: float = 120.0,
        allowed_sources: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        if not 0 <= port_min <= port_max <= 65535:
            raise ValueError(f"bad port range {port_min}-{port_max}")
        if expected < 1:
            raise ValueError("a listener expects at least one connection")
        self.accept_timeout = accept_timeout
        self.handshake_timeout = handshake_timeout
        self.max_waiting = max_waiting
        self.allowed_sources = _source_networks(allowed_sources)
        self.tls = tls
        self._admitted = expected
        self.accepted = 0
        #: Connections closed on arrival, with the reason.
        self.rejected: list[tuple[str, str]] = []
        # Connections taken by the thread, not yet accepted or refused:
        # (socket, peer, arrival time), oldest first.
        self._waiting: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._sock = self._bind(host, port_min, port_max, expected)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, name=f"listener-{self.port}", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_conf(
        cls,
        conf: cfg.ConfigOpts,
        expected: int,
        *,
        allowed_sources: Sequence[str] = (),
    ) -> Listener:
        """``allowed_sources`` add to ``[xen_ncm] allowed_sources`` (the
        source host of this migration, where the caller knows it)."""
        group = conf.xen_ncm
        return cls(
            group.listen_address,
            group.port_min,
            group.port_max,
            expected=expected,
            accept_timeout=group.accept_timeout,
            allowed_sources=[*group.allowed_sources, *allowed_sources],
            tls=tls_context(conf, server=True),
            handshake_timeout=group.connect_timeout,
        )

    @staticmethod
    def _bind(
        host: str, port_min: int, port_max: int, backlog: int
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        last: OSError | None = None
        for port in range(port_min, port_max + 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise TransportError(
                        f"cannot listen on {host}:{port}: {exc}"
                    ) from exc
                last = exc
        raise TransportError(
            f"no free port in {port_min}-{port_max} on {host}"
        ) from last

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def closed(self) -> bool:
        return self._closed

    def allow(self, count: int = 1) -> None:
        """Admit ``count`` more connections (a channel reconnecting)."""
        with self._cond:
            self._admitted += count

    def _refuse(self, sock: socket.socket, peer: object, why: str) -> None:
        LOG.warning(
            "Refusing migration connection from %s on port %d: %s",
            peer,
            self.port,
            why,
        )
        self.rejected.append((str(peer), why))
        with contextlib.suppress(OSError):
            sock.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.1)
                if ready:
                    self._take()
            except (OSError, ValueError) as exc:
                if not self._closed:
                    LOG.error("Listener on port %d failed: %s", self.port, exc)
                return
            self._expire()

    def _take(self) -> None:
        sock, peer = self._sock.accept()
        if self.allowed_sources and not any(
            _address(peer) in net for net in self.allowed_sources
        ):
            self._refuse(
                sock,
                peer,
                "not an allowed source of this migration "
                f"({', '.join(map(str, self.allowed_sources))})",
            )
            return
        with self._cond:
            full = len(self._waiting) >= self.max_waiting
            if not full:
                self._waiting.append((sock, peer, time.monotonic()))
                self._cond.notify_all()
        if full:
            # A flood costs the peers, not the memory of this host.
            self._refuse(
                sock, peer, f"{self.max_waiting} connections already wait"
            )

    def _expire(self) -> None:
        """Refuse connections beyond the free slots that waited longer
        than the grace."""
        now = time.monotonic()
        late = []
        with self._cond:
            free = max(0, self._admitted - self.accepted)
            keep = collections.deque()
            for index, entry in enumerate(self._waiting):
                if index >= free and now - entry[2] > self.handshake_timeout:
                    late.append(entry)
                else:
                    keep.append(entry)
            self._waiting = keep
            admitted = self._admitted
        for sock, peer, _ in late:
            self._refuse(
                sock,
                peer,
                f"all {admitted} expected connections of the migration "
                "are established",
            )

    def take(self, timeout: float) -> tuple[socket.socket, object] | None:
        """The next waiting connection, TCP only, whatever the free
        slots (for an acceptor that authenticates several at once), or
        None after ``timeout`` seconds. :meth:`secure` adds TLS."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._waiting:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)
            sock, peer, _ = self._waiting.popleft()
        return sock, peer

    def secure(
        self, sock: socket.socket, peer: object
    ) -> socket.socket | TlsSocket:
        """``sock`` through TLS when the listener has it (closed if that
        fails; the caller records the refusal, once)."""
        if self.tls is None:
            return sock
        sock.settimeout(self.handshake_timeout)
        return _wrap_tls(sock, self.tls)

    def close(self) -> None:
        self._closed = True
        # shutdown wakes a thread blocked in accept(); close alone does
        # not on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._sock.close()
        with self._cond:
            waiting, self._waiting = self._waiting, collections.deque()
            self._cond.notify_all()
        for sock, _, _ in waiting:
            sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a Pacer lets go ahead of its schedule, in seconds of its rate:
# writes are frames of up to a page batch, so a smaller burst would
# make every frame wait.
PACE_BURST = 0.05
# A wait shorter than this is not worth a sleep (and is rounding).
PACE_SLACK = 1e-6


class Pacer:
    """Paces the writes of a migration's channels, together, to ``rate``
    octets per second (the generic cell rate algorithm: each write is
    scheduled after the previous ones at the rate, and waits for its
    time less ``burst`` seconds). Shared by the channels' threads."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float = PACE_BURST,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"pacing rate {rate} B/s is not positive")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._due = clock()

    def take(self, nbytes: int, limit: float | None = None) -> float:
        """Wait until ``nbytes`` more may go; returns the seconds waited.

        A wait longer than ``limit`` seconds (the caller's I/O bound:
        what is left of the downtime budget while the guest is paused)
        is not started, and the octets are not scheduled: a
        TransportError, as a socket call past its timeout."""
        with self._lock:
            now = self._clock()
            due = max(self._due, now) + nbytes / self.rate
            wait = due - now - self.burst
            if limit is not None and wait > limit:
                raise TransportError(
                    f"bandwidth cap of {self.rate / (1 << 20):g} MiB/s: "
                    f"{nbytes} octets would wait {wait:.3f}s, past the "
                    f"{limit:.3f}s the write may take"
                )
            self._due = due
        if wait > PACE_SLACK:
            self._sleep(wait)
            return wait
        return 0.0


class Channel:
    """One connection of a migration: a socket and its protocol state.

    Used by one thread at a time (several channels: one thread each).
    After a :class:`TransportError` a frame may be half written or half
    read, so the channel is closed and replaced by a new connection that
    RESUMEs.
    """

    def __init__(
        self,
        sock: socket.socket,
        connection: framing.Connection,
        *,
        io_timeout: float = 60.0,
    ) -> None:
        self.sock = sock
        self.connection = connection
        self.io_timeout = io_timeout
        self._recv_buf = bytearray(RECV_SIZE)
        self._frame_buf = bytearray()
        self._cipher_buf: bytearray | None = None
        #: The TLS version and the peer's verified certificate of an
        #: ``encrypted-frames`` connection, from before it left TLS.
        self.tls_version: str | None = None
        self.tls_peer: dict | None = None
        #: Paces this channel's writes (the migration's bandwidth cap).
        self.pacer: Pacer | None = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Control messages are small and latency counts in downtime.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(io_timeout)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        max_data: int = framing.DEFAULT_MAX_DATA,
        tls: ssl.SSLContext | None = None,
        source_address: str | None = None,
    ) -> Channel:
        """Connect as the client (source), through TLS when ``tls`` is
        given, from ``source_address`` when given (the address the source
        announced: a multi-homed host would otherwise leave by whichever
        address its routes pick). The handshake follows."""
        sock = _connect(host, port, connect_timeout, source_address)
        if tls is not None:
            sock = _wrap_tls(sock, tls, server_hostname=host)
        conn = framing.Connection(messages.Role.CLIENT, max_data=max_data)
        channel = cls(sock, conn, io_timeout=io_timeout)
        # The handshake runs under the connect timeout.
        sock.settimeout(connect_timeout)
        return channel

    # -- writing --

    def send_buffers(self, buffers: Sequence[Buffer]) -> int:
        """Write every buffer, in order, with vectored writes; returns the
        byte count. Partial writes resume mid-buffer without copying."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        total = sum(v.nbytes for v in views)
        bound = self.sock.gettimeout()
        waited = 0.0
        if self.pacer is not None:
            # The pacer's wait counts against the socket's bound (the
            # downtime budget while the guest is paused), as the
            # write's own wait for room does.
            waited = self.pacer.take(total, limit=bound)
            if waited and bound is not None:
                self.sock.settimeout(max(bound - waited, PACE_SLACK))
        i = 0
        try:
            while i < len(views):
                try:
                    sent = self.sock.sendmsg(views[i : i + IOV_MAX])
                except BlockingIOError:
                    # eventlet's green socket (Nova's compute service)
                    # passes sendmsg straight to the non-blocking socket
                    # underneath; wait for room as a blocking socket would.
                    self._wait_writable()
                    continue
                while sent:
                    if sent >= views[i].nbytes:
                        sent -= views[i].nbytes
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0
        except OSError as exc:
            raise TransportError(f"send failed: {exc}") from exc
        finally:
            if waited and bound is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(bound)
        return total

    def _wait_writable(self) -> None:
        _, ready, _ = select.select([], [self.sock], [], self.io_timeout)
        if not ready:
            raise TransportError(f"send timed out after {self.io_timeout}s")

    def send(self, msg: messages.Message) -> None:
        self.send_buffers(self.connection.send(msg))

    def send_data(
        self,
        seq: int,
        buffers: Sequence[Buffer],
        *,
        compress: bool = False,
        pages: bool = False,
    ) -> int:
        """Send one DATA frame (``pages``: one PAGE_DATA record); returns
        the bytes put on the wire."""
        return self.send_buffers(
            self.connection.send_data(
                seq, buffers, compress=compress, pages=pages
            )
        )

    # -- reading --

    def frame_buffer(self, size: int) -> memoryview:
        """``size`` octets to read one frame body into, the same memory
        frame after frame (grown when a frame is larger, never beyond
        the connection's frame limit): valid until the next call, so
        for a body used up before the next frame is read."""
        if size > self.connection.max_data:
            raise ProtocolError(
                f"a frame body of {size} octets is over the "
                f"{self.connection.max_data} octet limit"
            )
        if len(self._frame_buf) < size:
            self._frame_buf = bytearray(size)
        return memoryview(self._frame_buf)[:size]

    def _fill(self) -> None:
        try:
            n = self.sock.recv_into(
                self._recv_buf, self.connection.read_hint(RECV_SIZE)
            )
        except OSError as exc:
            raise TransportError(f"receive failed: {exc}") from exc
        self.connection.receive_data(memoryview(self._recv_buf)[:n])

    def next_event(self) -> messages.Event:
        """The next protocol event, reading as needed (never NEED_DATA)."""
        while True:
            event = self.connection.next_event()
            if event is not messages.NEED_DATA:
                return event
            self._fill()

    def receive(
        self,
    ) -> (
        messages.Message
        | messages.Data
        | messages.DataHeader
        | (messages.DataEnd)
    ):
        """The next event; a closed connection is a TransportError."""
        event = self.next_event()
        if isinstance(event, messages.ConnectionClosed):
            raise TransportError("the peer closed the connection")
        return event

    def recv_into_exact(self, view: memoryview) -> None:
        """Fill ``view`` from the socket, straight, or raise."""
        got = 0
        size = view.nbytes
        recv_into = self.sock.recv_into
        try:
            while got < size:
                n = recv_into(view[got:])
                if n == 0:
                    raise TransportError(
                        f"connection closed with {size - got} of {size} "
                        "bytes outstanding"
                    )
                got += n
        except OSError as exc:
            raise TransportError(f"receive failed: {exc}") from exc

    def read_payload_into(self, view: memoryview) -> None:
        """Direct mode: read the next ``len(view)`` body bytes of the
        current data frame into ``view`` (e.g. a mapped guest page)."""
        view = view.cast("B")
        if view.nbytes > self.connection.payload_left:
            raise ValueError(
                f"{view.nbytes} bytes asked, "
                f"{self.connection.payload_left} left in the frame"
            )
        n = self.connection.take_payload(view)
        rest = view[n:]
        if not rest.nbytes:
            return
        if self.connection.frames_encrypted:
            self._recv_decrypt(rest)
        else:
            self.recv_into_exact(rest)
            self.connection.payload_received(rest)

    def _recv_decrypt(self, view: memoryview) -> None:
        """Read ciphertext into a small buffer of the channel (it stays
        in the cache) and decrypt it into ``view``: the decryption is
        the one copy into place. Authenticated at the frame's end."""
        if self._cipher_buf is None:
            self._cipher_buf = bytearray(CIPHER_CHUNK)
        got = 0
        size = view.nbytes
        recv_into = self.sock.recv_into
        with memoryview(self._cipher_buf) as chunk:
            try:
                while got < size:
                    n = recv_into(chunk, min(size - got, CIPHER_CHUNK))
                    if n == 0:
                        raise TransportError(
                            f"connection closed with {size - got} of "
                            f"{size} bytes outstanding"
                        )
                    self.connection.decrypt_payload(
                        chunk[:n], view[got : got + n]
                    )
                    got += n
            except OSError as exc:
                raise TransportError(f"receive failed: {exc}") from exc

    # -- handshake --

    def client_handshake(
        self,
        migration_id: str,
        token: bytes,
        *,
        channel: int = 0,
        capabilities: Sequence[str] = (),
        last_acked: int | None = None,
    ) -> messages.Welcome:
        """Authenticate to the destination (RESUME if ``last_acked``).

        Raises :class:`Refused` with the destination's reason code,
        :class:`AuthenticationError` if the destination cannot prove the
        token, :class:`TransportError` on a socket failure.
        """
        self.send_buffers(
            self.connection.send_hello(migration_id, channel, capabilities)
        )
        reply = self.receive()
        if isinstance(reply, messages.Refuse):
            raise Refused(reply.code, reply.text)
        encrypted = messages.Capability.ENCRYPTED_FRAMES.value
        if encrypted in capabilities and (
            encrypted not in self.connection.capabilities
        ):
            # Refused before AUTH: the guest's memory never goes other
            # than this end was told to send it.
            raise Refused(
                messages.RefuseReason.MISSING_CAPABILITY.value,
                "the destination does not support encrypted-frames, which "
                "this host requires inside TLS ([xen_ncm] "
                "tls_encrypted_frames): upgrade it to this release, or set "
                "the option to the same value on both hosts",
            )
        self.send_buffers(self.connection.send_auth(token, last_acked))
        reply = self.receive()
        if isinstance(reply, messages.Refuse):
            raise Refused(reply.code, reply.text)
        # The protocol's table lets only WELCOME or REFUSE through here.
        self._after_handshake()
        self.sock.settimeout(self.io_timeout)
        return reply

    def server_handshake(
        self,
        token_for: Callable[[messages.Hello], bytes],
        *,
        capabilities: Sequence[str] = (),
        resume_from: Callable[[messages.Hello, messages.Resume], int]
        | None = None,
        deadline: float | None = None,
    ) -> tuple[messages.Hello, messages.Auth | messages.Resume]:
        """Authenticate the source.

        ``token_for`` returns the token of the HELLO's migration or raises
        :class:`Refused` (unknown migration, too many channels);
        ``resume_from`` gives the highest sequence applied on a resumed
        channel. A refusal is sent to the peer and raised here.
        ``deadline``: seconds the whole handshake may take (default: the
        socket's timeout); a peer trickling bytes is cut off then.
        """
        if deadline is None:
            deadline = self.sock.gettimeout() or self.io_timeout
        expired = threading.Event()

        def cut_off() -> None:
            expired.set()
            with contextlib.suppress(OSError, ValueError):
                self.sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(deadline, cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._server_handshake(token_for, capabilities, resume_from)
        except TransportError as exc:
            if expired.is_set():
                raise TransportError(
                    f"handshake not done within {deadline}s: {exc}"
                ) from exc
            raise
        finally:
            watchdog.cancel()

    def _server_handshake(
        self,
        token_for: Callable[[messages.Hello], bytes],
        capabilities: Sequence[str],
        resume_from: Callable[[messages.Hello, messages.Resume], int] | None,
    ) -> tuple[messages.Hello, messages.Auth | messages.Resume]:
        try:
            hello = self.receive()
        except TransportError as exc:
            timeout = self.sock.gettimeout()
            LOG.warning(
                "Dropping migration connection from %s without a HELLO "
                "(timeout %ss): %s",
                _peer(self.sock),
                timeout,
                exc,
            )
            raise TransportError(
                f"no HELLO from {_peer(self.sock)} within {timeout}s: {exc}"
            ) from exc
        if not isinstance(hello, messages.Hello):
            raise ProtocolError(f"expected HELLO, got {hello!r}")
        try:
            encrypted = messages.Capability.ENCRYPTED_FRAMES.value
            if encrypted in capabilities and (
                encrypted not in hello.capabilities
            ):
                raise Refused(
                    messages.RefuseReason.MISSING_CAPABILITY,
                    "the source does not offer encrypted-frames, which this "
                    "host requires inside TLS ([xen_ncm] "
                    "tls_encrypted_frames): upgrade it to this release, or "
                    "set the option to the same value on both hosts",
                )
            token = token_for(hello)
            try:
                self.send_buffers(
                    self.connection.send_challenge(token, capabilities)
                )
            except ProtocolError as exc:
                raise Refused(messages.RefuseReason.VERSION, str(exc)) from exc
            try:
                proof = self.receive()
            except AuthenticationError as exc:
                raise Refused(
                    messages.RefuseReason.AUTHENTICATION, str(exc)
                ) from exc
            # The protocol's table lets only AUTH or RESUME through here.
            if isinstance(proof, messages.Resume):
                if resume_from is None:
                    raise Refused(
                        messages.RefuseReason.BAD_REQUEST,
                        "nothing to resume on this connection",
                    )
                start = resume_from(hello, proof)
            else:
                start = 0
        except Refused as exc:
            LOG.warning(
                "Refusing migration %s channel %d: %s",
                hello.migration_id,
                hello.channel,
                exc,
            )
            try:
                self.send_buffers(
                    self.connection.refuse(
                        messages.RefuseReason(exc.code), exc.text
                    )
                )
            except TransportError as gone:
                # The refusal stands whether or not the peer hears it.
                LOG.debug("Could not send the refusal: %s", gone)
            raise
        self.send_buffers(self.connection.send_welcome(start))
        self._after_handshake()
        self.sock.settimeout(self.io_timeout)
        return hello, proof

    def _after_handshake(self) -> None:
        """With ``encrypted-frames``, leave TLS: it authenticated the
        peers and carried the key contributions; the frames encrypt and
        authenticate every octet from here on."""
        if not self.connection.frames_encrypted:
            return
        if not isinstance(self.sock, TlsSocket):
            raise ProtocolError(
                "encrypted-frames negotiated on a connection that is not TLS"
            )
        if self.connection.buffered:
            raise ProtocolError(
                f"{self.connection.buffered} octets after WELCOME inside TLS"
            )
        tls = self.sock.tls
        # What TLS verified, kept for logs and checks once it is left.
        self.tls_version = tls.version()
        self.tls_peer = tls.getpeercert()
        try:
            self.sock = self.sock.leave()
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(
                f"leaving TLS after the handshake failed: {exc}"
            ) from exc

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            # Already reset by the peer; closing is all that is left.
            pass
        self.sock.close()
        # A closed channel is kept by its receiver until the source
        # acknowledges the outcome: not its frame buffer (MiBs).
        self._frame_buf = bytearray()
        self._cipher_buf = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
