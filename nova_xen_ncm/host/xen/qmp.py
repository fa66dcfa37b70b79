"""The device model's state over QMP, as libxl moves it.

An HVM guest's emulated devices (the UART, the PCI host bridge, the
platform device ...) live in its QEMU, not in Xen; libxl saves them with
``xen-save-devices-state`` into the libxl stream's EMULATOR_CONTEXT record
and restores them with ``xen-load-devices-state``
(``tools/libs/light/libxl_qmp.c``, ``libxl_dom_suspend.c``). QEMU listens
on ``/var/run/xen/qmp-libxl-<domid>`` for that.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from nova_xen_ncm.host import base

RECV_SIZE = 65536


class QmpError(base.HostError):
    """QEMU refused a command or its QMP socket is not answering."""


class Qmp:
    """One QMP session with the device model of a domain."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> Qmp:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise QmpError(
                f"cannot connect to {self.path}: {exc}",
                call="qmp connect",
                errno=exc.errno,
            ) from None
        self._sock = sock
        greeting = self._message()
        if "QMP" not in greeting:
            self.close()
            raise QmpError(
                f"{self.path} did not greet with QMP", call="qmp connect"
            )
        self.execute("qmp_capabilities")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(RECV_SIZE)
            except OSError as exc:
                raise QmpError(
                    f"reading {self.path}: {exc}", call="qmp", errno=exc.errno
                ) from None
            if not chunk:
                raise QmpError(f"{self.path} closed", call="qmp")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise QmpError(
                f"{self.path} sent non-JSON {line[:80]!r}", call="qmp"
            ) from None

    def execute(self, command: str, **arguments: Any) -> Any:
        assert self._sock is not None
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QmpError(
                f"writing {self.path}: {exc}", call=command, errno=exc.errno
            ) from None
        while True:
            reply = self._message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise QmpError(
                    f"{err.get('class', 'Error')}: {err.get('desc', '')}",
                    call=f"qmp {command}",
                )
            # Asynchronous events (STOP, RESUME ...) are not answers.


def socket_path(run_dir: str, domid: int) -> str:
    return os.path.join(run_dir, f"qmp-libxl-{domid}")
