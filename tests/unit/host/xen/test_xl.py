"""xl configuration files and ``xl list -l`` parsing."""

from __future__ import annotations

import json
import subprocess

import pytest

from nova_xen_ncm.host import base
from nova_xen_ncm.host.xen import xl

MiB = 1 << 20


def config(**kw) -> base.DomainConfig:
    kw.setdefault("name", "guest-1")
    kw.setdefault("memory_bytes", 32 * MiB)
    return base.DomainConfig(**kw)


def parse(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" = ")
        out[key] = value
    return out


def test_small_hvm_guest() -> None:
    text = xl.config_text(
        config(vcpus=2, uuid="0d6c2875-837c-4027-9250-a7c8427dd4bb")
    )
    fields = parse(text)
    assert fields["name"] == '"guest-1"'
    assert fields["type"] == '"hvm"'
    assert fields["memory"] == fields["maxmem"] == "32"
    assert fields["vcpus"] == "2"
    assert fields["vga"] == '"none"'
    assert fields["serial"] == '"pty"'
    assert fields["uuid"] == '"0d6c2875-837c-4027-9250-a7c8427dd4bb"'
    assert fields["vif"] == fields["disk"] == "[]"


def test_devices() -> None:
    text = xl.config_text(
        config(
            devices=(
                base.DeviceConfig(
                    "vif", 0, mac="00:16:3e:00:00:01", extra={"bridge": "br0"}
                ),
                base.DeviceConfig(
                    "vbd", 51728, extra={"target": "/srv/disk.img"}
                ),
            )
        )
    )
    fields = parse(text)
    assert json.loads(fields["vif"]) == [
        "devid=0,mac=00:16:3e:00:00:01,bridge=br0"
    ]
    assert json.loads(fields["disk"]) == [
        "format=raw,vdev=xvdb,target=/srv/disk.img"
    ]


def test_direct_kernel_boot() -> None:
    boot = base.DirectBoot(
        "/boot/vmlinuz-6.1.0", "/rig/ncm-guest.gz", "console=ttyS0 nopv"
    )
    fields = parse(xl.config_text(config(boot=boot)))
    assert fields["kernel"] == '"/boot/vmlinuz-6.1.0"'
    assert fields["ramdisk"] == '"/rig/ncm-guest.gz"'
    assert fields["cmdline"] == '"console=ttyS0 nopv"'
    fields = parse(xl.config_text(config(boot=base.DirectBoot("/k"))))
    assert fields["kernel"] == '"/k"'
    assert "ramdisk" not in fields and "cmdline" not in fields
    assert "kernel" not in parse(xl.config_text(config()))


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"boot": base.DirectBoot("vmlinuz")}, "not an absolute path"),
        ({"boot": base.DirectBoot("/k", "initrd")}, "not an absolute path"),
        ({"boot": base.DirectBoot("/k", cmdline='a="b"')}, "printable"),
        ({"boot": base.DirectBoot("/k", cmdline="a\\nb")}, "printable"),
        ({"boot": base.DirectBoot("/k", cmdline="a\tb")}, "printable"),
        ({"boot": base.DirectBoot("/k\u00e9")}, "printable"),
        # A trailing newline would end the line inside xl.cfg's string.
        ({"boot": base.DirectBoot("/k", cmdline="nopv\n")}, "printable"),
        ({"boot": base.DirectBoot("/k\n")}, "printable"),
        ({"name": "guest\n"}, "domain name"),
        ({"uuid": "8f0c3a52-6f4e-4d2b-9c1a-3e5d7b9f1a2c\n"}, "bad uuid"),
        (
            {"devices": (base.DeviceConfig("vif", 0, mac="00:16:3e:0:0:1"),)},
            "bad MAC",
        ),
        (
            {
                "devices": (
                    base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01\n"),
                )
            },
            "bad MAC",
        ),
        (
            {
                "devices": (
                    base.DeviceConfig("vif", 0, extra={"script": "vif\n"}),
                )
            },
            "unquoted",
        ),
        ({"name": "bad name"}, "domain name"),
        ({"memory_bytes": 8 * MiB}, "at least 16"),
        ({"memory_bytes": 32 * MiB + 1}, "whole number of MiB"),
        ({"vcpus": 0}, "at least one"),
        ({"uuid": "nope"}, "bad uuid"),
        ({"devices": (base.DeviceConfig("vbd", 51712),)}, "target"),
        (
            {
                "devices": (
                    base.DeviceConfig("vbd", 51713, extra={"target": "/d"}),
                )
            },
            "whole xvd",
        ),
        ({"devices": (base.DeviceConfig("vif", 0, mac="zz"),)}, "bad MAC"),
        ({"devices": (base.DeviceConfig("vif", 0, backend_domid=3),)}, "dom0"),
        (
            {
                "devices": (
                    base.DeviceConfig("vif", 0, extra={"script": "a b"}),
                )
            },
            "unquoted",
        ),
        ({"devices": (base.DeviceConfig("vkbd", 0),)}, "not vif or vbd"),
    ],
)
def test_bad_config_is_named(kw: dict, words: str) -> None:
    with pytest.raises(xl.ConfigError, match=words) as info:
        xl.config_text(config(**kw))
    assert info.value.call == "config_text"


def test_parse_list_long() -> None:
    text = json.dumps(
        [
            {"domid": 0, "config": {"c_info": {"name": "Domain-0"}}},
            {"domid": 5, "config": {"c_info": {"name": "small"}}},
        ]
    )
    parsed = xl.parse_list_long(text)
    assert sorted(parsed) == [0, 5]
    assert parsed[5]["c_info"]["name"] == "small"
    assert xl.parse_list_long("") == {}


@pytest.mark.parametrize(
    "text", ["not json", '{"x": 1}', "[1]", '[{"domid": "5", "config": {}}]']
)
def test_parse_list_long_rejects(text: str) -> None:
    with pytest.raises(base.HostError, match="xl list"):
        xl.parse_list_long(text)


def test_xl_failure_carries_its_message(tmp_path) -> None:
    fake = tmp_path / "xl"
    fake.write_text(
        "#!/bin/sh\necho 'libxl: error: no such domain' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    with pytest.raises(base.HostError) as info:
        xl.Xl(str(fake)).run("destroy", "9")
    assert info.value.call == "xl destroy"
    assert "exit status 3" in str(info.value)
    assert "no such domain" in str(info.value)


def test_xl_missing_and_slow(tmp_path) -> None:
    with pytest.raises(base.NotSupported, match="not found"):
        xl.Xl(str(tmp_path / "absent")).run("info")
    slow = tmp_path / "xl"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(base.HostError, match="no answer"):
        xl.Xl(str(slow), timeout=0.2).run("info")
    assert subprocess.run(["true"]).returncode == 0


def test_xl_failure_names_its_cause_before_libxls_cleanup(tmp_path) -> None:
    # A create that fails logs its cause, then the errors of destroying
    # the half-made domain: both are kept.
    fake = tmp_path / "xl"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'libxl: error: hotplug script block failed' >&2\n"
        + "".join(f"echo 'libxl: error: cleanup {i}' >&2\n" for i in range(8))
        + "exit 3\n"
    )
    fake.chmod(0o755)
    with pytest.raises(base.HostError) as info:
        xl.Xl(str(fake)).run("create", "cfg")
    assert "hotplug script block failed" in str(info.value)
    assert "cleanup 7" in str(info.value)
