import socket
import struct

import pytest

from nova_xen_ncm.host.sim import ipc


def test_round_trip_and_close():
    a, b = socket.socketpair()
    ipc.send(a, {"cmd": "pause", "id": 3})
    assert ipc.recv(b) == {"cmd": "pause", "id": 3}
    a.close()
    with pytest.raises(ipc.ChannelClosed):
        ipc.recv(b)
    b.close()


@pytest.mark.parametrize(
    "raw, message",
    [
        (struct.pack("<I", ipc.MAX_MESSAGE + 1), "exceeds"),
        (struct.pack("<I", 2) + b"[]", "not a JSON object"),
    ],
)
def test_bad_messages_are_refused(raw, message):
    a, b = socket.socketpair()
    a.sendall(raw)
    with pytest.raises(ipc.ChannelClosed, match=message):
        ipc.recv(b)
    a.close()
    b.close()
