"""Several migrations at once between two simulated hosts: fairness of
the shared bandwidth, and the cost of mutual TLS, each a ratio measured
in the same run.

Not a test: run ``python benchmarks/bench_concurrent.py [--count 4]
[--memory 256M] [--tls]``. It migrates ``--count`` paused guests of
random RAM at once and reports each one's throughput and the fairness
ratio (slowest / fastest; 1.0 is perfectly fair), against one such
migration alone (the aggregate throughput of the concurrent run over the
single one's). With ``--tls`` the same runs go over mutual TLS too, with
certificates generated for the run, and the TLS/plain throughput ratio
is reported. Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import tempfile
import threading
import time
import uuid

from oslo_config import cfg

from nova_xen_ncm.conf import register_opts
from nova_xen_ncm.engine import handshake
from nova_xen_ncm.engine.receiver import Receiver
from nova_xen_ncm.engine.sender import Sender
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.host import base
from nova_xen_ncm.host.sim.host import SimHost

MIB = 1 << 20
RESULTS = pathlib.Path(__file__).parent / "results"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_conf(host_mb: int, tls: dict | None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf([])
    conf.set_override("host_memory_mb", host_mb, group="xen_ncm_sim")
    settings = {
        "listen_address": "127.0.0.1",
        "io_timeout": 300.0,
        "accept_timeout": 300.0,
        "completion_timeout_per_gib": 0,
        "precopy_policy": "xen-simple",
    }
    settings.update(tls or {})
    for name, value in settings.items():
        conf.set_override(name, value, group="xen_ncm")
    return conf


def run(count: int, memory: int, tls: dict | None) -> dict:
    """``count`` paused guests migrated at once; per migration figures."""
    conf = make_conf(count * memory // MIB + 64, tls)
    source = SimHost("source", conf)
    destination = SimHost("destination", conf)
    try:
        pairs = []
        for i in range(count):
            domid = source.create_domain(
                base.DomainConfig(
                    name=f"bench-{i}",
                    memory_bytes=memory,
                    vcpus=1,
                    workload={"fill": "random", "dirty_rate": 0},
                )
            )
            source.pause(domid)
            migration_id = str(uuid.uuid4())
            token = handshake.generate_token()
            receiver = Receiver(destination, migration_id, token, conf=conf)
            sender = Sender(
                source,
                domid,
                receiver.address,
                migration_id,
                token,
                conf=conf,
            )
            pairs.append((receiver, sender))
        times: list[float] = [0.0] * count
        phases: list[Phase | None] = [None] * count

        def send(i: int) -> None:
            start = time.perf_counter()
            phases[i] = pairs[i][1].run()
            times[i] = time.perf_counter() - start

        threads = [
            threading.Thread(target=r.run, daemon=True) for r, _ in pairs
        ]
        threads += [
            threading.Thread(target=send, args=(i,), daemon=True)
            for i in range(count)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        if any(p is not Phase.DONE for p in phases):
            errors = [str(s.error) for _, s in pairs]
            raise RuntimeError(f"a migration failed: {errors}")
        rates = [
            s.stats.to_dict()["bytes_sent"] / t / MIB
            for (_, s), t in zip(pairs, times, strict=True)
        ]
        total = sum(s.stats.to_dict()["bytes_sent"] for _, s in pairs)
        return {
            "count": count,
            "seconds": times,
            "mib_per_s": rates,
            "aggregate_mib_per_s": total / wall / MIB,
            "fairness": min(rates) / max(rates),
        }
    finally:
        source.close()
        destination.close()


def tls_settings(directory: pathlib.Path) -> dict:
    # The test suite's generator of a CA and host certificates.
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
    from conftest import TlsFiles

    files = TlsFiles(directory)
    return {
        "tls_enabled": True,
        "tls_cert_file": files.cert,
        "tls_key_file": files.key,
        "tls_ca_file": files.ca,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args()
    memory = parse_size(args.memory)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "memory": memory,
    }
    variants = {"plain": None}
    tmp = tempfile.TemporaryDirectory()
    if args.tls:
        variants["tls"] = tls_settings(pathlib.Path(tmp.name))
    for name, tls in variants.items():
        single = run(1, memory, tls)
        many = run(args.count, memory, tls)
        report[name] = {
            "single": single,
            "concurrent": many,
            "aggregate_over_single": many["aggregate_mib_per_s"]
            / single["aggregate_mib_per_s"],
        }
        print(
            f"{name:6} single {single['aggregate_mib_per_s']:8.1f} MiB/s  "
            f"{args.count} at once {many['aggregate_mib_per_s']:8.1f} "
            f"MiB/s (x{report[name]['aggregate_over_single']:.2f})  "
            f"fairness slowest/fastest {many['fairness']:.2f}  per "
            f"migration {', '.join(f'{r:.0f}' for r in many['mib_per_s'])}"
        )
    if args.tls:
        report["tls_over_plain"] = (
            report["tls"]["single"]["aggregate_mib_per_s"]
            / report["plain"]["single"]["aggregate_mib_per_s"]
        )
        print(
            f"TLS / plain throughput (single): {report['tls_over_plain']:.2f}"
        )
    tmp.cleanup()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"concurrent-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
