"""Start and reload at scale, whatever DNS does (issue 30): `python -m benchmarks startup`.

Three parts, each printed as a table:
1. the control plane's own work for N providers, in process (best of a few runs): reading the
   files, compiling, building the cluster dicts, converting them to protobuf, the route
   configurations, the CDS response as sent; and the same again for an unchanged config (what
   a reload of thousands of providers redoes);
2. `extproc up` with N providers found by a local DNS server (`--dns-resolver`), all of them
   resolvable, then with a tenth that never answer: the time to ready and where it goes (log
   timestamps: config published, Envoy started, Envoy asks for the clusters, then for the
   routes once it has set the clusters up, ready) and the CPU seconds each process used until
   then (which, unlike times, hold up on a busy machine); then a resolvable provider must
   answer and a silent one must get its 503;
3. a reload that adds N providers (a tenth silent) at once to a running gateway serving one
   provider: the time until the new table is in force, until a new provider answers, and the
   requests to the old provider that failed meanwhile (sent one after the other throughout).

Providers are HTTPS fakes on 443 of a loopback address of their own, found by DNS as a real
provider is (port 443 needs root). Figures from a shared machine vary; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY = "sk-bench-startup"
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
# log lines marking a start's steps, in order
STEPS = (("published", "clusters version 1:"), ("envoy started", "Envoy started"),
         ("clusters asked", "connected for clusters"), ("routes asked", "connected for sidecar routes"),
         ("ready", "ready: proxy on"))


def hosts_for(count: int, domain: str = "bench.test") -> list[str]:
    return [f"p{i}.{domain}" for i in range(count)]


def phases(count: int, runs: int = 3) -> dict[str, float]:
    """Milliseconds per step of the control plane's work for `count` providers (best of `runs`)."""
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    from extproc.config.compile import compile_config
    from extproc.config.loader import load_paths
    from extproc.envoy.addresses import HostPort
    from extproc.envoy.clusters import UpstreamOptions
    from extproc.envoy.routes import any_host_route_configuration, route_configuration, to_route_proto
    from extproc.ops.control_plane import ControlPlane
    from extproc.ops.data_plane import DataPlane
    from extproc.policy.table import EMPTY_TABLE, TableHolder
    from extproc.testing.dns_providers import provider_docs

    best: dict[str, float] = {}

    def timed(label: str, work):
        started = time.perf_counter()
        result = work()
        ms = (time.perf_counter() - started) * 1000
        best[label] = min(best.get(label, ms), ms)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "providers.yaml").write_text(provider_docs(hosts_for(count), KEY))
        for _ in range(runs):
            loaded, _problems = timed("read files (YAML, models)", lambda: load_paths([tmp]))
            table = timed("compile", lambda loaded=loaded: compile_config(loaded)).table
            control = ControlPlane(UpstreamOptions(dns_resolver=HostPort("127.0.0.1", 53)),
                                   DataPlane(TableHolder(EMPTY_TABLE)))
            clusters = timed("cluster dicts", lambda table=table, control=control: control._clusters(table))
            protos = timed("clusters to protobuf",
                           lambda c=clusters, control=control: [control._cluster_proto(x) for x in c.values()])

            def response(protos=protos) -> int:
                packed = []
                for proto in protos:
                    item = any_pb2.Any()
                    item.Pack(proto)
                    packed.append(item)
                return len(discovery_pb2.DiscoveryResponse(resources=packed).SerializeToString())

            timed("CDS response (pack, serialize)", response)
            hosts = sorted(table.routes)
            timed("route configurations (RDS)", lambda hosts=hosts: [to_route_proto(route_configuration(hosts)),
                                                                     to_route_proto(any_host_route_configuration([]))])
            again = timed("reload, unchanged: cluster dicts", lambda table=table, control=control:
                          control._clusters(table))
            timed("reload, unchanged: to protobuf",
                  lambda c=again, control=control: [control._cluster_proto(x) for x in c.values()])
    return best


@dataclass
class Gateway:
    process: subprocess.Popen
    listen: int
    log_file: Path
    started: float  # wall clock, as the log's timestamps
    out: object = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def request(self, host: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=30)
        try:
            conn.request("POST", f"http://{host}/v1/chat/completions", body=CHAT,
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def steps(self) -> dict[str, float]:
        """Seconds from the start to each step's first log line."""
        found: dict[str, float] = {}
        for line in self.log().splitlines():
            stamp = LOG_TIME.match(line)
            if stamp is None:
                continue
            for label, text in STEPS:
                if label not in found and text in line:
                    when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
                    found[label] = when - self.started
        return found

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the control plane (this process) and of Envoy (its descendants)."""
        from .measure import cpu_seconds, process_tree

        own = cpu_seconds(self.process.pid)
        return own, sum(cpu_seconds(pid) for pid in process_tree(self.process.pid)[1:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_up(config: Path, ca_file: str, dns_address: str, work: Path, timeout: float = 60) -> tuple[Gateway, float]:
    """`extproc up` on free ports; (the gateway, seconds to its "ready:" line)."""
    from extproc.testing.ports import free_port

    listen, admin = free_port(), free_port()
    log_file = work / f"up-{listen}.log"
    out = log_file.open("wb")
    args = [sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{listen}",
            "--admin", f"127.0.0.1:{admin}", "--metrics", "none", "--access-log", "none",
            "--upstream-ca", ca_file, "--dns-resolver", dns_address]
    started_wall, started = time.time(), time.monotonic()
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(process, listen, log_file, started_wall, out)
    while process.poll() is None and "ready: proxy on" not in gw.log():
        if time.monotonic() - started > timeout:
            gw.stop()
            raise RuntimeError(f"not ready within {timeout:.0f}s:\n{gw.log()[-3000:]}")
        time.sleep(0.02)
    if process.poll() is not None:
        raise RuntimeError(f"extproc up exited with {process.returncode}:\n{gw.log()[-3000:]}")
    return gw, time.monotonic() - started


def system_ca_with(ca_file: Path, work: Path) -> str:
    """The system's CA bundle plus the throwaway CA: as many roots as a real gateway trusts
    (Envoy parses the bundle once per cluster: a large part of its work per provider)."""
    bundle = work / "trust.pem"
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    bundle.write_text((system.read_text() if system.exists() else "") + ca_file.read_text())
    return str(bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=2000, help="providers in each part (default 2000)")
    parser.add_argument("--silent-every", type=int, default=10,
                        help="one provider in this many never gets a DNS answer (default 10: 200 of 2,000)")
    parser.add_argument("--small-ca", action="store_true",
                        help="trust only the throwaway CA (default: the system bundle too, as in production)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: the fake providers listen on port 443 of loopback addresses", file=sys.stderr)
        return 2
    from extproc.demo.ca import ThrowawayCA
    from extproc.testing.dns_providers import loopback_provider, provider_docs
    from extproc.testing.dns_server import DnsServer

    n = args.providers
    print(f"1. the control plane's work for {n} providers, in process (best of 3, ms)")
    for label, ms in phases(n).items():
        print(f"   {label:36s} {ms:8.1f}")

    with tempfile.TemporaryDirectory() as tmp, DnsServer() as dns:
        work = Path(tmp)
        ca = ThrowawayCA(work / "pki")
        fake = loopback_provider(ca, ["*.bench.test", "seed.test"], "bench", KEY)
        ca_file = str(ca.cert_file) if args.small_ca else system_ca_with(ca.cert_file, work)
        hosts = hosts_for(n)
        silent = {h for i, h in enumerate(hosts) if args.silent_every and i % args.silent_every == 3}
        try:
            print(f"\n2. `extproc up` with {n} providers found by DNS "
                  f"({'the throwaway CA only' if args.small_ca else 'the system CA bundle'}; seconds from start)")
            print(f"   {'providers':26s} {'ready':>6s}" + "".join(f"{label:>15s}" for label, _ in STEPS[:-1])
                  + f"{'CPU: python':>13s}{'envoy':>7s}")
            for never in (set(), silent):
                for host in hosts:
                    if host in never:
                        dns.drop(host)
                    else:
                        dns.answer(host, fake.host)
                config = work / f"start-{len(never)}"
                config.mkdir()
                (config / "providers.yaml").write_text(provider_docs(hosts, KEY))
                gw, ready = start_up(config, ca_file, dns.address, work)
                try:
                    python_cpu, envoy_cpu = gw.cpu()
                    steps = gw.steps()
                    label = "all resolvable" if not never else f"{len(never)} never answering"
                    print(f"   {label:26s} {ready:6.2f}" + "".join(
                        f"{steps.get(step, float('nan')):15.2f}" for step, _ in STEPS[:-1])
                        + f"{python_cpu:13.2f}{envoy_cpu:7.2f}")
                    good = next(h for h in hosts if h not in never)
                    status, body = gw.request(good)
                    assert status == 200, (good, status, body[:300])
                    if never:
                        status, body = gw.request(sorted(never)[0])
                        assert status == 503 and b"provider_address_unknown" in body, (status, body[:300])
                finally:
                    gw.stop()
            print(f"\n3. a reload adding {n} providers at once ({len(silent)} never answering) "
                  "to a gateway serving one")
            reload(work, ca_file, dns, fake.host, hosts, silent)
        finally:
            fake.stop()
    return 0


def reload(work: Path, ca_file: str, dns, address: str, hosts: list[str], silent: set[str]) -> None:
    from extproc.testing.dns_providers import provider_docs

    dns.answer("seed.test", address)
    config = work / "reload"
    config.mkdir()
    (config / "seed.yaml").write_text(provider_docs(["seed.test"], KEY).replace("name: p-0", "name: seed"))
    gw, _ready = start_up(config, ca_file, dns.address, work)
    results: list[int] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            try:
                results.append(gw.request("seed.test")[0])
            except OSError:
                results.append(0)

    sender = threading.Thread(target=steady, daemon=True)
    try:
        sender.start()
        time.sleep(1)
        good = next(h for h in reversed(hosts) if h not in silent)
        before = len(results)
        changed = time.monotonic()
        (config / "many.yaml").write_text(provider_docs(hosts, KEY))
        in_force = serving = None
        marker = f"{len(hosts) + 1} providers"
        while time.monotonic() - changed < 120 and (in_force is None or serving is None):
            if in_force is None and marker in gw.log():
                in_force = time.monotonic() - changed
            if serving is None and gw.request(good)[0] == 200:
                serving = time.monotonic() - changed
            time.sleep(0.05)
        time.sleep(1)
        stop.set()
        sender.join(35)
        during = results[before:]
        failed = sum(1 for status in during if status != 200)
        print(f"   new table in force after {in_force:.2f}s (the file source looks every second), "
              f"a new provider served after {serving:.2f}s;")
        print(f"   requests to the old provider meanwhile: {len(during)}, failed: {failed}"
              + ("; Envoy answered the new clusters late (see the log)" if "not every Envoy answered" in gw.log()
                 else ""))
    finally:
        stop.set()
        gw.stop()


if __name__ == "__main__":
    sys.exit(main())
