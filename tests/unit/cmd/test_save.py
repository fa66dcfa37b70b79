"""``nova-xen-ncm restore``: what it says of the guest it restored."""

from __future__ import annotations

import dataclasses

import pytest

from nova_xen_ncm.cmd import EXIT_FAILED
from nova_xen_ncm.cmd import main
from nova_xen_ncm.cmd import migrate
from nova_xen_ncm.engine import savefile
from nova_xen_ncm.host import base

INFO = base.DomainInfo(
    domid=6,
    name="guest",
    uuid="00000000-0000-0000-0000-000000000006",
    state=base.DomainState.RUNNING,
    memory_bytes=1 << 28,
    vcpus=2,
    populated_pages=65536,
    pv_drivers=False,
)


class Host:
    """A host whose restored guest is found in ``info`` afterwards."""

    def __init__(self, info: base.DomainInfo) -> None:
        self.info = info
        self.closed = False
        self.destroyed: list[int] = []

    def domain_info(self, domid: int) -> base.DomainInfo:
        assert domid == self.info.domid
        return self.info

    def destroy_domain(self, domid: int) -> None:
        self.destroyed.append(domid)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def restore(tmp_path, monkeypatch, capsys):
    path = tmp_path / "guest.save"
    path.write_bytes(b"saved")
    unpaused = []

    def run(info: base.DomainInfo, *argv: str, driver: str = "xen"):
        host = Host(info)
        monkeypatch.setattr(migrate, "open_host", lambda args, conf: host)

        def restore_from_path(host, file, *, domid, unpause):
            unpaused.append(unpause)
            return info.domid

        monkeypatch.setattr(savefile, "restore_from_path", restore_from_path)
        status = main.main(
            ["restore", str(path), "--host-driver", driver, *argv]
        )
        out, err = capsys.readouterr()
        return status, out, err, host

    run.unpaused = unpaused
    return run


def test_a_running_guest_is_reported_running(restore):
    status, out, err, host = restore(INFO)
    assert status == 0, err
    assert out.endswith("as domain 6 (guest), running\n"), out
    assert host.closed


def test_a_guest_paused_as_asked_is_reported_paused(restore):
    paused = dataclasses.replace(INFO, state=base.DomainState.PAUSED)
    status, out, err, _ = restore(paused, "--paused")
    assert status == 0, err
    assert out.endswith("as domain 6 (guest), paused\n"), out
    assert restore.unpaused == [False]


@pytest.mark.parametrize(
    ("state", "reason", "argv", "named"),
    [
        (base.DomainState.SHUTDOWN, "reboot", (), "shutdown (reboot)"),
        (base.DomainState.CRASHED, "crash", (), "crashed (crash)"),
        (base.DomainState.PAUSED, None, (), "paused, not running"),
        (
            base.DomainState.SHUTDOWN,
            "poweroff",
            ("--paused",),
            "shutdown (poweroff), not paused",
        ),
    ],
)
def test_a_guest_not_in_the_state_asked_fails_naming_it(
    restore, state, reason, argv, named
):
    stopped = dataclasses.replace(INFO, state=state, shutdown_reason=reason)
    status, out, err, host = restore(stopped, *argv)
    assert status == EXIT_FAILED
    assert out == ""
    assert err.startswith("nova-xen-ncm restore: error: restored "), err
    assert "as domain 6 (guest)" in err
    assert named in err
    # Left for the operator to inspect (its console, Xen's log).
    assert "left as it is" in err
    assert host.destroyed == []
    assert host.closed


def test_a_guest_of_an_in_process_host_is_not_said_to_be_left(restore):
    # The simulated host's guests end with the command: nothing is left
    # to inspect, and the error does not say there is.
    stopped = dataclasses.replace(
        INFO, state=base.DomainState.CRASHED, shutdown_reason="crash"
    )
    status, _, err, host = restore(stopped, driver="sim")
    assert status == EXIT_FAILED
    assert "crashed (crash), not running" in err, err
    assert "left as it is" not in err
    assert "ends with this command" in err
    assert host.destroyed == []
    assert host.closed
