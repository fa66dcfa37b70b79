"""``xl``: domain configuration files, the command and its JSON output.

The real host creates and destroys guests with Xen's own toolstack, so
that they are ordinary ``xl`` domains (device model, console, xenstore
entries): :func:`config_text` writes the ``xl.cfg`` of a
:class:`~nova_xen_ncm.host.base.DomainConfig`, :class:`Xl` runs the
command, and :func:`parse_list_long` reads ``xl list -l``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from nova_xen_ncm.host import base

MiB = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./:+-]+$")
_CFG_STRING = re.compile(r"^[ !#-\[\]-~]*$")
# Linux's xvd major (xen/include/public/io/blkif.h): devid = 202 << 8 |
# disk << 4 | partition.
XVD_MAJOR = 202


class ConfigError(base.HostError):
    """A domain configuration cannot be expressed for xl."""


def _quote(value: str) -> str:
    return json.dumps(value)


def _vdev(devid: int) -> str:
    if devid >> 8 != XVD_MAJOR or devid & 0xF:
        raise ConfigError(
            f"vbd devid {devid} is not a whole xvd disk (202 << 8 | n << 4)",
            call="config_text",
        )
    disk = (devid & 0xFF) >> 4
    return "xvd" + chr(ord("a") + disk)


def _device_spec(dev: base.DeviceConfig) -> str:
    if dev.backend_domid != 0:
        raise ConfigError(
            f"{dev.kind} {dev.devid}: only dom0 backends are supported",
            call="config_text",
        )
    for key, value in dev.extra.items():
        if not _SAFE_VALUE.fullmatch(str(value)):
            raise ConfigError(
                f"{dev.kind} {dev.devid}: {key}={value!r} has characters "
                "xl does not accept unquoted",
                call="config_text",
            )
    if dev.kind == "vif":
        parts = [f"devid={dev.devid}"]
        if dev.mac is not None:
            if not _MAC.fullmatch(dev.mac):
                raise ConfigError(
                    f"vif {dev.devid}: bad MAC {dev.mac!r}", call="config_text"
                )
            parts.append(f"mac={dev.mac}")
        parts += [f"{k}={v}" for k, v in sorted(dev.extra.items())]
        return ",".join(parts)
    if dev.kind == "vbd":
        target = dev.extra.get("target")
        if not target:
            raise ConfigError(
                f"vbd {dev.devid}: extra['target'] (the disk image or "
                "device in dom0) is required on real Xen",
                call="config_text",
            )
        fmt = dev.extra.get("format", "raw")
        return f"format={fmt},vdev={_vdev(dev.devid)},target={target}"
    raise ConfigError(
        f"device kind {dev.kind!r} is not vif or vbd", call="config_text"
    )


def _boot_lines(boot: base.DirectBoot) -> list[str]:
    """xl.cfg's direct kernel boot of an HVM guest: libxl hands these to
    QEMU (``-kernel``, ``-initrd``, ``-append``), whose fw_cfg device
    serves them to the firmware."""
    lines = []
    for key, value in (
        ("kernel", boot.kernel),
        ("ramdisk", boot.ramdisk),
        ("cmdline", boot.cmdline),
    ):
        if value is None:
            continue
        if key != "cmdline" and not value.startswith("/"):
            raise ConfigError(
                f"{key} {value!r} is not an absolute path", call="config_text"
            )
        # xl's parser reads a quoted string up to the next quote and
        # knows no \u escapes: printable ASCII without quotes only.
        if not _CFG_STRING.fullmatch(value):
            raise ConfigError(
                f"{key} {value!r}: only printable ASCII without '\"' or "
                "'\\' can be written in xl.cfg",
                call="config_text",
            )
        lines.append(f'{key} = "{value}"')
    return lines


def config_text(config: base.DomainConfig) -> str:
    """The ``xl.cfg`` of an HVM guest made of ``config``.

    Every guest of the driver gets the same emulated devices (no VGA, a
    serial port, the Xen platform device), so that a restoring domain
    built from the same text can load the device model state of any of
    them; a directly booted kernel is part of the machine too (QEMU's
    fw_cfg device exists only with one). Whether the guest's OS uses PV
    drivers is its own business (HVM_PARAM_CALLBACK_IRQ tells).
    """
    if not _NAME.fullmatch(config.name):
        raise ConfigError(
            f"domain name {config.name!r} must be 1-64 letters, digits, "
            "'_', '.' or '-'",
            call="config_text",
        )
    if config.memory_bytes < 16 * MiB or config.memory_bytes % MiB:
        raise ConfigError(
            f"memory {config.memory_bytes} bytes: an HVM guest needs a "
            "whole number of MiB, at least 16",
            call="config_text",
        )
    if config.vcpus < 1:
        raise ConfigError(
            f"vcpus {config.vcpus}: at least one", call="config_text"
        )
    if config.uuid is not None and not _UUID.fullmatch(config.uuid):
        raise ConfigError(f"bad uuid {config.uuid!r}", call="config_text")
    vifs = [d for d in config.devices if d.kind == "vif"]
    vbds = [d for d in config.devices if d.kind == "vbd"]
    others = [d for d in config.devices if d.kind not in ("vif", "vbd")]
    if others:
        raise ConfigError(
            f"device kind {others[0].kind!r} is not vif or vbd",
            call="config_text",
        )
    lines = [
        f"name = {_quote(config.name)}",
        'type = "hvm"',
        f"memory = {config.memory_bytes // MiB}",
        f"maxmem = {config.memory_bytes // MiB}",
        f"vcpus = {config.vcpus}",
        'vga = "none"',
        'serial = "pty"',
        "vif = [" + ", ".join(_quote(_device_spec(d)) for d in vifs) + "]",
        "disk = [" + ", ".join(_quote(_device_spec(d)) for d in vbds) + "]",
    ]
    if config.boot is not None:
        lines += _boot_lines(config.boot)
    if config.uuid is not None:
        lines.insert(1, f"uuid = {_quote(config.uuid)}")
    return "\n".join(lines) + "\n"


def parse_list_long(text: str) -> dict[int, dict[str, Any]]:
    """``xl list -l`` (JSON output) as domid -> libxl domain config."""
    try:
        entries = json.loads(text) if text.strip() else []
    except ValueError as exc:
        raise base.HostError(
            f"xl list -l printed no JSON: {exc}", call="xl list"
        ) from None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise base.HostError(
            "xl list -l printed JSON that is not a list of domains",
            call="xl list",
        )
    out = {}
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("domid"), int)
            or not isinstance(entry.get("config"), dict)
        ):
            raise base.HostError(
                f"xl list -l entry {entry!r:.80} has no domid and config",
                call="xl list",
            )
        out[entry["domid"]] = entry["config"]
    return out


class Xl:
    """Runs ``xl`` subcommands; a failure raises HostError with xl's own
    message and exit status."""

    def __init__(
        self,
        path: str = "xl",
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.env = dict(env) if env is not None else None

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        ok_status: Sequence[int] = (0,),
    ) -> str:
        call = f"xl {args[0]}" if args else "xl"
        merged = dict(os.environ)
        if self.env:
            merged.update(self.env)
        if env:
            merged.update(env)
        try:
            result = subprocess.run(
                [self.path, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=merged,
                check=False,
            )
        except FileNotFoundError:
            raise base.NotSupported(
                f"{self.path} not found: install xen-utils-4.17", call=call
            ) from None
        except subprocess.TimeoutExpired:
            raise base.HostError(
                f"no answer after {self.timeout:.0f}s", call=call
            ) from None
        if result.returncode not in ok_status:
            message = (result.stderr or result.stdout).strip()
            lines = message.splitlines()
            # The cause first (libxl's cleanup of a failed create logs
            # errors of its own after it), then how it ended.
            if len(lines) > 7:
                lines = [*lines[:3], "...", *lines[-3:]]
            raise base.HostError(
                f"exit status {result.returncode}: "
                + (" | ".join(lines) if lines else "no output"),
                call=call,
            )
        return result.stdout

    def list_long(self, domid: int | None = None) -> dict[int, dict]:
        args = ["list", "-l"] + ([str(domid)] if domid is not None else [])
        return parse_list_long(self.run(*args))
