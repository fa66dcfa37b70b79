"""What tests of several tiers share: the RabbitMQ broker the progress
notifications go through, and the options of the sinks that publish them.

Every test gets a journal directory of its own (``[xen_ncm]
state_path``, whose default is a system directory), so that no test
settles another's migrations.

The broker is ``NOVA_XEN_NCM_RABBIT_URL`` (default
rabbit://guest:guest@127.0.0.1:5672/). A test that asks for
``rabbit_url`` is skipped when the broker is unreachable, except under CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.parse

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import progress as progress_conf
from nova_xen_ncm.conf import xen_ncm as xen_ncm_conf
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import IncomingEntry
from nova_xen_ncm.engine.journal import Journal

RABBIT_URL = os.environ.get(
    "NOVA_XEN_NCM_RABBIT_URL", "rabbit://guest:guest@127.0.0.1:5672/"
)


@pytest.fixture(autouse=True)
def private_sim_disks(tmp_path, monkeypatch) -> None:
    """The simulated hosts' default disk directory is under
    ``$XDG_STATE_HOME``: every test gets its own, so no test leaves disk
    files behind or finds another's (guest processes and the demo's
    hosts inherit it)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture(autouse=True)
def restored_signal_handlers():
    """The console commands install SIGINT and SIGTERM handlers while
    they run; whatever a test leaves behind is put back, so a later test
    that interrupts itself gets Python's KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture(autouse=True, scope="session")
def runtime_path(tmp_path_factory) -> str:
    """The marks' directory of this run (not the host's /run): the
    option's default for every ConfigOpts, the global one's, and that of
    a Journal made without it. Once for the session: a function-scoped
    fixture here would take ``monkeypatch`` before every test's own
    fixtures, which changes their order."""
    from nova_xen_ncm.conf import CONF
    from nova_xen_ncm.engine import journal

    path = str(tmp_path_factory.mktemp("run"))
    (opt,) = [o for o in xen_ncm_conf.HOST_OPTS if o.name == "runtime_path"]
    saved = opt.default, journal.RUNTIME_PATH
    opt.default = path
    journal.RUNTIME_PATH = path
    if "xen_ncm" in CONF:
        CONF.set_default("runtime_path", path, group="xen_ncm")
    yield path
    opt.default, journal.RUNTIME_PATH = saved
    if "xen_ncm" in CONF:
        CONF.set_default("runtime_path", saved[0], group="xen_ncm")


@pytest.fixture
def no_cloud(tmp_path, monkeypatch) -> None:
    """No OpenStack cloud configured, whatever the machine has: no OS_*
    variable, and empty clouds.yaml and secure.yaml found first
    (openstacksdk reads the first it finds, ``./clouds.yaml`` and the
    machine's /etc/openstack/clouds.yaml too)."""
    for name in list(os.environ):
        if name.startswith("OS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "openstack-config"
    config.mkdir()
    for name in ("clouds.yaml", "secure.yaml"):
        (config / name).write_text("clouds: {}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(config / "clouds.yaml"))
    monkeypatch.setenv("OS_CLIENT_SECURE_FILE", str(config / "secure.yaml"))
    monkeypatch.setenv("HOME", str(config))
    monkeypatch.chdir(config)


@pytest.fixture(autouse=True)
def state_path(tmp_path_factory, monkeypatch) -> str:
    """The journals' directory of this test: the option's default for
    every ConfigOpts, and the global one's."""
    from nova_xen_ncm.conf import CONF

    path = str(tmp_path_factory.mktemp("state"))
    (opt,) = [o for o in xen_ncm_conf.HOST_OPTS if o.name == "state_path"]
    monkeypatch.setattr(opt, "default", path)
    if "xen_ncm" in CONF:
        CONF.set_default("state_path", path, group="xen_ncm")
    yield path
    if "xen_ncm" in CONF:
        CONF.set_default(
            "state_path", "/var/lib/nova-xen-ncm", group="xen_ncm"
        )


@pytest.fixture
def journalled():
    """Writes one migration's journal entry under a state path and
    returns that journal: ``journalled(path, phase, **fields)``; an
    IncomingEntry (``cls``) goes to the destination's journal."""

    def write(path, phase, *, cls=Entry, **fields):
        values = {
            "migration_id": "m-1",
            "domid": 5,
            "host": "127.0.0.1",
            "port": 1,
            "token": "00" * 16,
            "running": True,
            "uuid": "u",
            "boot_id": "boot-1",
            "phase": getattr(phase, "value", phase),
        }
        values.update(fields)
        journal = Journal(
            str(path),
            "incoming" if cls is IncomingEntry else "migrations",
            cls,
        )
        journal.write(cls(**values))
        return journal

    return write


@pytest.fixture
def rabbit_url() -> str:
    """The broker's URL, once a connection to it was made."""
    parts = urllib.parse.urlsplit(RABBIT_URL)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or 5672), timeout=5
        ).close()
    except OSError as exc:
        message = f"RabbitMQ is not reachable at {RABBIT_URL}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return RABBIT_URL


@pytest.fixture
def sink_conf() -> cfg.ConfigOpts:
    """Options of the progress sinks, at their defaults."""
    conf = cfg.ConfigOpts()
    xen_ncm_conf.register_opts(conf)
    progress_conf.register_opts(conf)
    conf([])
    return conf


def delete_queue(url: str, name: str) -> None:
    """Pool queues outlive their listener; a test removes its own."""
    # Imported here: only the tests that talk to the broker need kombu.
    import kombu

    amqp = urllib.parse.urlsplit(url)._replace(scheme="amqp").geturl()
    with kombu.Connection(amqp) as connection:
        connection.default_channel.queue_delete(name)


class TlsFiles:
    """PEM files of a test certificate authority and of certificates it
    signed for 127.0.0.1 (server and client use), plus a stranger's."""

    def __init__(self, directory) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)

        def write(name, data):
            path = directory / name
            path.write_bytes(data)
            return str(path)

        def key_pem(key):
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        def authority(cn):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(
                    x509.BasicConstraints(ca=True, path_length=None), True
                )
                .sign(key, hashes.SHA256())
            )
            return key, cert

        def leaf(ca_key, ca_cert, cn, san):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
                )
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), False)
                .add_extension(
                    x509.ExtendedKeyUsage(
                        [
                            ExtendedKeyUsageOID.SERVER_AUTH,
                            ExtendedKeyUsageOID.CLIENT_AUTH,
                        ]
                    ),
                    False,
                )
                .sign(ca_key, hashes.SHA256())
            )
            return key, cert

        pem = serialization.Encoding.PEM
        ca_key, ca_cert = authority("migration CA")
        self.ca = write("ca.pem", ca_cert.public_bytes(pem))
        loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        key, cert = leaf(ca_key, ca_cert, "host", loopback)
        self.cert = write("host.pem", cert.public_bytes(pem))
        self.key = write("host.key", key_pem(key))
        other = [x509.DNSName("elsewhere.example")]
        key, cert = leaf(ca_key, ca_cert, "elsewhere", other)
        self.misnamed_cert = write("elsewhere.pem", cert.public_bytes(pem))
        self.misnamed_key = write("elsewhere.key", key_pem(key))
        rogue_key, rogue_ca = authority("rogue CA")
        key, cert = leaf(rogue_key, rogue_ca, "rogue", loopback)
        self.rogue_cert = write("rogue.pem", cert.public_bytes(pem))
        self.rogue_key = write("rogue.key", key_pem(key))

    def enable(self, conf, cert=None, key=None) -> None:
        """Turn on mutual TLS in ``conf`` with this host's files."""
        for name, value in {
            "tls_enabled": True,
            "tls_cert_file": cert or self.cert,
            "tls_key_file": key or self.key,
            "tls_ca_file": self.ca,
        }.items():
            conf.set_override(name, value, group="xen_ncm")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    """A CA and certificates generated for this test run."""
    return TlsFiles(tmp_path_factory.mktemp("tls"))
