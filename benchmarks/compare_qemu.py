"""This project's migration of a paused guest against QEMU's, in one run.

Not a test: run ``python benchmarks/compare_qemu.py [--memory 2G]
[--runs 3] [--modes plain,tls,zero]``. Needs Debian's qemu-system-x86
(``qemu-system-x86_64``, QEMU 7.2 on Debian 12).

Both sides move the same guest between two processes over loopback TCP,
alternating run by run (each side first in turn):

- QEMU with TCG, the source started paused (``-S``) on RAM read from a
  file of random octets (a private mapping: the guest sees the file's
  content), the destination started with ``-incoming defer`` on
  preallocated RAM; ``max-bandwidth`` lifted so that QEMU is not held to
  its default cap. Timed from the ``migrate`` command to both ends
  reporting ``completed`` (``query-migrate``, polled every millisecond);
  QEMU's own ``total-time`` is printed beside it.
- this project's simulated hosts (``bench_migration.py``'s set-up:
  source in this process, destination in a child process with its RAM
  faulted in ahead), the guest paused, ``xen-simple`` policy, defaults
  otherwise (every frame authenticated, memory digest-verified at both
  ends). Timed around the source's whole migration (handshake, set-up,
  pages, device state, digests, commit). The set-up includes the
  destination building the domain, which QEMU does before its clock
  starts (process, preallocated RAM): the ratio is also printed with
  ours' SETUP phase left out (which leaves out our connection
  handshakes too, a few milliseconds QEMU's figure keeps).

Modes: ``plain`` is TCP (QEMU: neither encrypted nor authenticated;
ours: authenticated and digest-verified); ``tls`` is QEMU's
``tls-creds-x509`` with verified peers as Nova's native TLS sets it,
against ours with ``[xen_ncm] tls_enabled``, both with certificates made
here by one authority (``cryptography``); ``open`` is plain TCP against
ours with ``[xen_ncm] frame_authentication = false`` on both hosts (no
per-frame tag: equal to QEMU's plain TCP, for isolated migration
networks; the digest proof still on; a ``--baseline`` tree without the
option runs its default there); ``zero`` is plain TCP with a guest whose
RAM is all zero: on QEMU's side untouched anonymous memory (``-S``, no
``prealloc``), on ours RAM the guest never wrote, faulted in ahead by
the host (``prefault_memory_mb``) unless ``--source-holes``. Prints the
median seconds of each side and the ratio QEMU/ours (above 1: ours is
faster), and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import bench_migration  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from nova_xen_ncm.cmd import demo  # noqa: E402
from nova_xen_ncm.engine.sender import Sender  # noqa: E402
from nova_xen_ncm.engine.state import Phase  # noqa: E402
from nova_xen_ncm.host import base  # noqa: E402
from nova_xen_ncm.host.sim.host import SimHost  # noqa: E402

MIB = 1 << 20
QEMU = "qemu-system-x86_64"
# QEMU's max-bandwidth is in octets per second; this is no limit.
UNLIMITED = 1 << 40
QMP_TIMEOUT = 600.0
MODES = ("plain", "tls", "open", "zero")


# -- certificates --------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: pathlib.Path) -> dict[str, str]:
    """A CA and one host certificate it signs (valid for server and
    client authentication, for ``localhost`` and 127.0.0.1), written
    under the names QEMU's ``tls-creds-x509`` reads; the paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("benchmark CA"))
        .issuer_name(_name("benchmark CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                ]
            ),
            False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    files = {
        "ca-cert.pem": ca.public_bytes(pem),
        "server-cert.pem": cert.public_bytes(pem),
        "server-key.pem": key_pem,
        "client-cert.pem": cert.public_bytes(pem),
        "client-key.pem": key_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    os.chmod(directory / "server-key.pem", 0o600)
    os.chmod(directory / "client-key.pem", 0o600)
    return {
        "dir": str(directory),
        "ca": str(directory / "ca-cert.pem"),
        "cert": str(directory / "server-cert.pem"),
        "key": str(directory / "server-key.pem"),
    }


# -- QEMU ------------------------------------------------------------------


class Qmp:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"QEMU's QMP socket {path} never came"
                    ) from exc
                time.sleep(0.05)
        self.sock.settimeout(QMP_TIMEOUT)
        self.file = self.sock.makefile("rb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QEMU closed its QMP socket")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name: str, **arguments: object) -> object:
        req: dict = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qemu(
    workdir: pathlib.Path,
    name: str,
    memory: int,
    backend: str,
    tls: dict | None,
    endpoint: str,
    extra: list[str],
) -> tuple[subprocess.Popen, Qmp]:
    qmp = str(workdir / f"{name}.qmp")
    args = [
        QEMU,
        "-machine", "pc,accel=tcg,memory-backend=ram0",
        "-m", f"{memory // MIB}M",
        "-object", backend,
        "-nodefaults", "-nographic", "-display", "none",
        "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    if tls is not None:
        args += [
            "-object",
            f"tls-creds-x509,id=tls0,dir={tls['dir']},"
            f"endpoint={endpoint},verify-peer=on",
        ]
    args += extra
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"{name}.log", "wb"),
    )  # fmt: skip
    try:
        return proc, Qmp(qmp, timeout=120.0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def qemu_migrate(
    workdir: pathlib.Path,
    memory: int,
    image: pathlib.Path | None,
    tls: dict | None,
) -> dict:
    """One QEMU migration of a paused guest; its figures."""
    if image is not None:
        src_backend = (
            f"memory-backend-file,id=ram0,size={memory},"
            f"mem-path={image},share=off,prealloc=on"
        )
    else:
        src_backend = f"memory-backend-ram,id=ram0,size={memory}"
    dst_backend = f"memory-backend-ram,id=ram0,size={memory},prealloc=on"
    procs = []
    try:
        dst, dqmp = _qemu(
            workdir, "dst", memory, dst_backend, tls, "server",
            ["-incoming", "defer"],
        )  # fmt: skip
        procs.append((dst, dqmp))
        src, sqmp = _qemu(
            workdir, "src", memory, src_backend, tls, "client", []
        )
        procs.append((src, sqmp))
        params: dict = {"max-bandwidth": UNLIMITED}
        if tls is not None:
            dqmp.command("migrate-set-parameters", **{"tls-creds": "tls0"})
            params["tls-creds"] = "tls0"
            params["tls-hostname"] = "localhost"
        sqmp.command("migrate-set-parameters", **params)
        port = _free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dqmp.command("migrate-incoming", uri=uri)
        start = time.perf_counter()
        sqmp.command("migrate", uri=uri)
        info = _wait_completed(sqmp, "source")
        _wait_completed(dqmp, "destination")
        elapsed = time.perf_counter() - start
        return {
            "seconds": elapsed,
            "qemu_total_ms": info.get("total-time"),
            "bytes_sent": info.get("ram", {}).get("transferred"),
        }
    finally:
        for proc, qmp in procs:
            with contextlib.suppress(Exception):
                qmp.command("quit")
            qmp.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_completed(qmp: Qmp, which: str) -> dict:
    deadline = time.monotonic() + QMP_TIMEOUT
    while time.monotonic() < deadline:
        info = qmp.command("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU {which}: migration {status}: {info}")
        time.sleep(0.001)
    raise RuntimeError(f"QEMU {which}: migration did not complete")


# -- this project ----------------------------------------------------------


def ours_migrate(
    memory: int,
    fill: str,
    tls: dict | None,
    *,
    authenticated: bool = True,
    source_prefault: bool = True,
) -> dict:
    """One migration of a paused guest between two simulated hosts
    (``source_prefault``: the source's guest RAM faulted in ahead, as
    the destination's; if not, RAM its guest never wrote is holes)."""
    settings: dict = {"precopy_policy": "xen-simple"}
    if not authenticated and _has_option("frame_authentication"):
        settings["frame_authentication"] = False
    if tls is not None:
        settings.update(
            tls_enabled=True,
            tls_cert_file=tls["cert"],
            tls_key_file=tls["key"],
            tls_ca_file=tls["ca"],
        )
    host_mb = memory // MIB + 64
    settings_conf = bench_migration.overrides(host_mb, settings)
    source_conf = settings_conf
    if not source_prefault:
        sim = dict(settings_conf["xen_ncm_sim"], prefault_memory_mb=0)
        source_conf = dict(settings_conf, xen_ncm_sim=sim)
    conf = demo.make_conf([], source_conf)
    destination = demo.HostProcess("destination", [], settings_conf)
    source = SimHost("source", conf)
    try:
        domid = source.create_domain(
            base.DomainConfig(
                name="bench",
                memory_bytes=memory,
                vcpus=2,
                workload={"fill": fill, "dirty_rate": 0},
            )
        )
        source.pause(domid)
        migration_id = str(uuid.uuid4())
        token, endpoint = destination.call(
            "listen", migration_id, domid, False
        )
        sender = Sender(
            source, domid, tuple(endpoint), migration_id, token, conf=conf
        )
        start = time.perf_counter()
        phase = sender.run()
        elapsed = time.perf_counter() - start
        incoming = destination.call("wait_incoming")
        if phase is not Phase.DONE:
            raise RuntimeError(f"migration ended {phase}: {sender.error}")
        if incoming["phase"] != Phase.DONE.value:
            raise RuntimeError(f"destination ended {incoming}")
        return {
            "seconds": elapsed,
            "bytes_sent": sender.stats.to_dict()["bytes_sent"],
            "round_seconds": sender.stats.rounds[0].duration,
            # The destination building the domain is in it: QEMU's
            # destination process and RAM are made before its clock.
            "setup_seconds": sender.state.durations()[Phase.SETUP.value],
        }
    finally:
        source.close()
        destination.close()


def _has_option(name: str) -> bool:
    from nova_xen_ncm.conf import xen_ncm

    return any(opt.name == name for opt in xen_ncm.OPTS)


def baseline_migrate(
    tree: str,
    memory: int,
    mode: str,
    tls: dict | None,
    source_prefault: bool = True,
) -> dict:
    """:func:`ours_migrate` of the checkout ``tree``, in a child
    interpreter that imports that tree's nova_xen_ncm."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [tree, env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    spec = f"{mode}:{tls['dir'] if tls else ''}"
    out = subprocess.run(
        [sys.executable, __file__, "--memory", str(memory)]
        + ([] if source_prefault else ["--source-holes"])
        + ["--ours-only", spec],
        env=env,
        capture_output=True,
        text=True,
        timeout=QMP_TIMEOUT,
    )
    if out.returncode:
        raise RuntimeError(f"baseline migration failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--memory", default="2G", type=bench_migration.parse_size
    )
    parser.add_argument("--runs", default=3, type=int)
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join(MODES)}",
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="another checkout of this project (e.g. a git worktree of "
        "an earlier commit), migrated too in each run from a child "
        "interpreter whose nova_xen_ncm is that tree's",
    )
    parser.add_argument(
        "--source-holes",
        action="store_true",
        help="the source host does not fault in its guest's RAM ahead "
        "(prefault_memory_mb 0 there): RAM a zero guest never wrote is "
        "holes; by default both hosts fault in. Either way the source "
        "neither sends nor digests the pages its guest never wrote "
        "(zero since the domain was created)",
    )
    parser.add_argument("--ours-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_only:
        # The child of --baseline: one migration, its figures on stdout.
        mode, tls_dir = args.ours_only.split(":", 1)
        tls = None
        if tls_dir:
            tls = {
                "dir": tls_dir,
                "ca": f"{tls_dir}/ca-cert.pem",
                "cert": f"{tls_dir}/server-cert.pem",
                "key": f"{tls_dir}/server-key.pem",
            }
        fill = "zero" if mode == "zero" else "random"
        print(
            json.dumps(
                ours_migrate(
                    args.memory,
                    fill,
                    tls,
                    authenticated=mode != "open",
                    source_prefault=not args.source_holes,
                )
            )
        )
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}")
    if shutil.which(QEMU) is None:
        parser.error(f"{QEMU} not found: install Debian's qemu-system-x86")
    version = subprocess.run(
        [QEMU, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]

    sides = ["qemu", "ours"] + (["baseline"] if args.baseline else [])
    figures: dict[str, dict[str, list[dict]]] = {
        m: {side: [] for side in sides} for m in modes
    }
    with tempfile.TemporaryDirectory(
        prefix="compare-qemu-", dir="/dev/shm"
    ) as tmp:
        workdir = pathlib.Path(tmp)
        tls = make_certificates(workdir)
        image = None
        if {"plain", "tls", "open"} & set(modes):
            image = workdir / "random.img"
            with open(image, "wb") as f:
                for _ in range(args.memory // (64 * MIB)):
                    f.write(os.urandom(64 * MIB))
                f.write(os.urandom(args.memory % (64 * MIB)))
        for run in range(args.runs):
            for mode in modes:
                creds = tls if mode == "tls" else None
                fill = "zero" if mode == "zero" else "random"
                migrate = {
                    "qemu": lambda fill=fill, creds=creds: qemu_migrate(
                        workdir, args.memory,
                        None if fill == "zero" else image, creds,
                    ),
                    "ours": lambda fill=fill, creds=creds, mode=mode: (
                        ours_migrate(
                            args.memory, fill, creds,
                            authenticated=mode != "open",
                            source_prefault=not args.source_holes,
                        )
                    ),
                    "baseline": lambda mode=mode, creds=creds: (
                        baseline_migrate(
                            args.baseline, args.memory, mode, creds,
                            not args.source_holes,
                        )
                    ),
                }  # fmt: skip
                # Each side goes first in turn: none always follows the
                # other's teardown or finds the caches the other left.
                k = run % len(sides)
                for side in sides[k:] + sides[:k]:
                    figures[mode][side].append(migrate[side]())
                q = figures[mode]["qemu"][-1]
                o = figures[mode]["ours"][-1]
                if args.baseline:
                    b = figures[mode]["baseline"][-1]
                    print(
                        f"run {run + 1} {mode:<5} baseline "
                        f"{b['seconds'] * 1e3:7.0f} ms  baseline/ours "
                        f"{b['seconds'] / o['seconds']:.2f}",
                        flush=True,
                    )
                print(
                    f"run {run + 1} {mode:<5} QEMU "
                    f"{q['seconds'] * 1e3:7.0f} ms (its total-time "
                    f"{q['qemu_total_ms']} ms)  ours "
                    f"{o['seconds'] * 1e3:7.0f} ms  QEMU/ours "
                    f"{q['seconds'] / o['seconds']:.2f}",
                    flush=True,
                )

    summary = {}
    print(f"\n{version}; guest {args.memory / MIB:.0f} MiB, paused; "
          f"median of {args.runs}")  # fmt: skip
    print(f"{'mode':<7}{'QEMU ms':>9}{'ours ms':>9}{'QEMU/ours':>11}"
          f"{'ratio range':>15}{'w/o set-up':>12}")  # fmt: skip
    for mode in modes:
        qs = [r["seconds"] for r in figures[mode]["qemu"]]
        os_ = [r["seconds"] for r in figures[mode]["ours"]]
        ratios = [q / o for q, o in zip(qs, os_, strict=True)]
        summary[mode] = {
            "qemu_seconds_median": statistics.median(qs),
            "ours_seconds_median": statistics.median(os_),
            "ratio_median": statistics.median(ratios),
            "ratio_median_without_setup": statistics.median(
                q / (r["seconds"] - r["setup_seconds"])
                for q, r in zip(qs, figures[mode]["ours"], strict=True)
            ),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        if args.baseline:
            bs = [r["seconds"] for r in figures[mode]["baseline"]]
            summary[mode]["baseline_seconds_median"] = statistics.median(bs)
            summary[mode]["qemu_baseline_ratio_median"] = statistics.median(
                q / b for q, b in zip(qs, bs, strict=True)
            )
        s = summary[mode]
        print(
            f"{mode:<7}{s['qemu_seconds_median'] * 1e3:>9.0f}"
            f"{s['ours_seconds_median'] * 1e3:>9.0f}"
            f"{s['ratio_median']:>11.2f}"
            f"{s['ratio_min']:>8.2f}-{s['ratio_max']:.2f}"
            f"{s['ratio_median_without_setup']:>12.2f}"
        )
    if args.baseline:
        print(f"baseline {args.baseline}: QEMU/baseline, median")
        for mode in modes:
            s = summary[mode]
            print(
                f"{mode:<7}{s['baseline_seconds_median'] * 1e3:>9.0f} ms"
                f"{s['qemu_baseline_ratio_median']:>11.2f}"
            )
    results = {
        "baseline": args.baseline,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "qemu": version,
        "memory": args.memory,
        "runs": args.runs,
        "figures": figures,
        "summary": summary,
    }
    bench_migration.RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = bench_migration.RESULTS / f"compare-qemu-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
