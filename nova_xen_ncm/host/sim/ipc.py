"""Messages between the host process and a guest process.

Two socketpairs per guest: the hypercall channel (the guest asks, the
hypervisor answers) and the control channel (the host asks: pause,
unpause, throttle, stop; and sends upcalls, which get no answer). A
message is a little-endian u32 length and a JSON object.
"""

from __future__ import annotations

import json
import socket
import struct

_LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 20


class ChannelClosed(ConnectionError):
    """The other end went away."""


def send(sock: socket.socket, message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ChannelClosed("peer closed the channel")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > MAX_MESSAGE:
        raise ChannelClosed(f"message of {length} bytes exceeds the limit")
    message = json.loads(_recv_exact(sock, length))
    if not isinstance(message, dict):
        raise ChannelClosed("message is not a JSON object")
    return message
