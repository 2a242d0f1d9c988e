"""Start and stay up whatever DNS does (docs/reliability.md#dns): a local DNS server that
answers some names, answers NXDOMAIN for others and never answers a third set; Envoy and the
gateway pointed at it with `extproc up --dns-resolver`; the seed's route through the session's
fake providers (at fixed addresses), and providers found by DNS on 127.x.y.z:443."""

from __future__ import annotations

import secrets
import time

import pytest

from extproc.testing.dns_providers import loopback_provider, provider_docs, write
from extproc.testing.dns_server import DnsServer
from support.helpers import CHAT, seed_dir, wait_until

KEY = "sk-test-dns-" + secrets.token_hex(6)
RESOLVED = "llm_gateway_provider_address_resolved"


@pytest.fixture
def dns():
    with DnsServer() as server:
        yield server


def address_resolved(gw, host: str) -> float | None:
    return gw.metrics().get((RESOLVED, frozenset({("provider", host)})))


def unknown_address(response, host: str) -> None:
    assert response.status == 503, response.body
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("provider_address_unknown", "server_error"), error
    assert host in error["message"], error


def test_ready_and_serving_while_200_provider_names_never_answer(gateway_factory, tmp_path, dns):
    """The issue's case: the seed's route plus 200 providers whose DNS never answers. `up` is
    ready (it was not, within 30 s) and the seed's route serves; a silent provider answers a
    clear 503, and the gateway says so once per host."""
    config = seed_dir(tmp_path, "01", "02")
    silent = [f"p{i}.silent.test" for i in range(200)]
    for host in silent:
        dns.drop(host)
    write(config, "silent.yaml", provider_docs(silent, KEY))
    started = time.monotonic()
    gw = gateway_factory(config, ["--dns-resolver", dns.address])
    print(f"\nready in {time.monotonic() - started:.2f}s with 200 provider names that never answer")
    answer = gw.request("dashscope.aliyuncs.com", CHAT)
    assert answer.status == 200, answer.body
    unknown_address(gw.request(silent[7], CHAT), silent[7])
    assert dns.queries[silent[7]] > 0  # Envoy and the gateway asked, and got nothing
    wait_until(lambda: address_resolved(gw, silent[7]) == 0.0, 30, lambda: f"no verdict:\n{gw.log()[-3000:]}")
    wait_until(lambda: sum(f"provider {h}: its host name" in gw.log() for h in silent[:20]) == 20, 30)
    assert gw.log().count(f"provider {silent[7]}: its host name") == 1  # once, not at every retry
    assert gw.request("dashscope.aliyuncs.com", CHAT).status == 200


def test_a_name_that_starts_resolving_serves_without_a_restart(gateway_factory, tmp_path, dns, ca):
    late = "late.dns.test"
    fake = loopback_provider(ca, [late], "late", KEY)
    try:
        config = seed_dir(tmp_path, "01", "02")
        write(config, "late.yaml", provider_docs([late], KEY))
        gw = gateway_factory(config, ["--dns-resolver", dns.address])
        unknown_address(gw.request(late, CHAT), late)
        wait_until(lambda: address_resolved(gw, late) == 0.0, 15)
        wait_until(lambda: "provider late.dns.test: its host name does not exist in DNS (NXDOMAIN)" in gw.log(), 5)
        dns.answer(late, fake.host)
        wait_until(lambda: gw.request(late, CHAT).status == 200, 40,
                   lambda: f"{late} never served:\n{gw.log()[-3000:]}", interval=0.5)
        assert fake.requests[-1].sni == late  # reached by its name's address, TLS to its name
        wait_until(lambda: address_resolved(gw, late) == 1.0, 70)
        wait_until(lambda: f"provider {late}: its host name resolves again" in gw.log(), 5)
        assert gw.log().count(f"provider {late}: its host name does not") == 1
        assert gw.process.poll() is None
    finally:
        fake.stop()


def failover_route(primary: str) -> str:
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: moving
spec:
  host: moving.test
  rules:
  - name: main
    backendRefs:
    - providerHost: {primary}
    fallbackRefs:
    - providerHost: dashscope.aliyuncs.com
    retries:
      attempts: 1
"""


@pytest.mark.parametrize("dns_does", ["nxdomain", "never-answers"])
def test_failover_from_a_primary_whose_name_does_not_resolve(gateway_factory, tmp_path, dns, fresh_providers,
                                                            dns_does):
    """Envoy answers a cluster without an address itself and does not retry that; the gateway
    knows the name does not resolve and sends the request to the fallback at once."""
    primary = "gone.dns.test"
    if dns_does == "never-answers":
        dns.drop(primary)
    config = seed_dir(tmp_path, "01")
    write(config, "route.yaml", provider_docs([primary], KEY) + "---\n" + failover_route(primary))
    gw = gateway_factory(config, ["--dns-resolver", dns.address])
    wait_until(lambda: address_resolved(gw, primary) == 0.0, 20, lambda: gw.log()[-3000:])
    wait_until(lambda: f"provider {primary}: its host name" in gw.log(), 5)  # said when failover is told
    fake = fresh_providers["dashscope.aliyuncs.com"]
    before = len(fake.requests)
    for _ in range(3):
        answer = gw.request("moving.test", CHAT)
        assert answer.status == 200, answer.body
        assert answer.json()["model"] == "qwen1.5-72b-chat"  # rewritten for the fallback
    assert len(fake.requests) == before + 3
    # the fallback went first: no attempt at the primary, which Envoy could not have retried
    wait_until(lambda: len([e for e in gw.access_entries() if e.get("host") == "moving.test"]) == 3, 10)
    entries = [e for e in gw.access_entries() if e.get("host") == "moving.test"]
    assert [(e["provider"], e["status"], str(e["attempts"])) for e in entries] == [
        ("default/dashscope-qwen", 200, "1")] * 3, entries


def test_2000_providers_ready_and_serving_with_200_that_never_answer(gateway_factory, tmp_path, dns, ca):
    """Scale: 2,000 providers found by DNS, all resolvable, then 2,000 of which 200 never
    answer. Prints both times to ready (no time limit asserted: this machine is shared); the
    gateway is ready and the resolvable ones serve."""
    fake = loopback_provider(ca, ["*.scale.test"], "scale", KEY)
    figures = []
    try:
        for silent_count in (0, 200):
            hosts = [f"p{i}.scale.test" for i in range(2000)]
            for i, host in enumerate(hosts):
                if i % 10 == 3 and silent_count:
                    dns.drop(host)
                else:
                    dns.answer(host, fake.host)
            config = write(tmp_path / f"scale-{silent_count}", "providers.yaml", provider_docs(hosts, KEY)).parent
            started = time.monotonic()
            gw = gateway_factory(config, ["--dns-resolver", dns.address])
            ready = time.monotonic() - started
            figures.append(f"2000 providers, {silent_count} never answering: ready in {ready:.2f}s")
            for host in (hosts[0], hosts[1999], hosts[1000]):
                assert gw.request(host, CHAT).status == 200, host
            if silent_count:
                unknown_address(gw.request(hosts[3], CHAT), hosts[3])
            gw.stop()
    finally:
        fake.stop()
    print("\n" + "\n".join(figures))
