"""Two simulated hosts in one process, and a migration between them over
TCP on loopback."""

from __future__ import annotations

import threading
import uuid

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost

MiB = 1 << 20


@pytest.fixture
def conf():
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", 128, group="xen_ncm_sim")
    for name, value in {
        "listen_address": "127.0.0.1",
        "precopy_policy": "xen-simple",
        "io_timeout": 20.0,
        "accept_timeout": 20.0,
        "retry_initial_delay": 0.01,
        "retry_max_delay": 0.05,
        "commit_query_timeout": 2.0,
    }.items():
        conf.set_override(name, value, group="xen_ncm")
    return conf


@pytest.fixture
def source(conf):
    host = SimHost("source", conf)
    yield host
    host.close()
    host.raise_dom0_errors()


@pytest.fixture
def destination(conf):
    host = SimHost("destination", conf)
    yield host
    host.close()
    host.raise_dom0_errors()


DEVICES = (
    base.DeviceConfig("vif", 0, mac="00:16:3e:00:00:01"),
    base.DeviceConfig("vbd", 51712, disk_bytes=1 * MiB),
)


def guest_config(
    name: str = "guest", devices=(), **workload
) -> base.DomainConfig:
    workload.setdefault("dirty_rate", 1 * MiB)
    return base.DomainConfig(
        name=name,
        memory_bytes=8 * MiB,
        vcpus=2,
        devices=tuple(devices),
        workload=workload,
    )


class Recorder:
    """A progress sink that keeps every event and runs hooks on phases."""

    def __init__(self, hooks=None):
        self.events = []
        self.hooks = dict(hooks or {})

    def emit(self, event):
        self.events.append(event)
        hook = self.hooks.get((event.kind.value, event.phase))
        if hook is not None:
            hook(event)

    def phases(self):
        return [e.phase for e in self.events if e.kind.value == "state"]


class Migration:
    """A receiver serving in a thread and the sender that runs here."""

    def __init__(
        self,
        conf,
        source,
        domid,
        destination,
        *,
        policy=None,
        source_hooks=None,
        destination_hooks=None,
        receiver_class=Receiver,
        source_address=None,
        switchover=None,
    ):
        migration_id = str(uuid.uuid4())
        token = handshake.generate_token()
        self.source_events = Recorder(source_hooks)
        self.destination_events = Recorder(destination_hooks)
        self.receiver = receiver_class(
            destination,
            migration_id,
            token,
            conf=conf,
            sinks=[self.destination_events],
            **({"source_address": source_address} if source_address else {}),
        )
        self.sender = Sender(
            source,
            domid,
            self.receiver.address,
            migration_id,
            token,
            conf=conf,
            policy=policy,
            sinks=[self.source_events],
            source_address=source_address,
            switchover=switchover,
        )
        self._thread = threading.Thread(
            target=self.receiver.run, name="receiver", daemon=True
        )

    def run(self):
        self._thread.start()
        try:
            return self.sender.run()
        finally:
            self._thread.join()


@pytest.fixture
def migration(conf):
    made = []

    def make(source, domid, destination, **kwargs):
        made.append(Migration(conf, source, domid, destination, **kwargs))
        return made[-1]

    yield make
    # A destination whose source never acknowledged answers on after
    # run(): the engine stops with the test.
    for m in made:
        m.receiver.close()
