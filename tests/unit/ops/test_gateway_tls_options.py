"""Where mutual TLS between the sidecars and an egress gateway is switched on: the control plane
issues certificates where there are gateways to reach (its CA from files, the Kubernetes Secret,
or made at start), an egress gateway needs its certificate source and token, and the plain hop
only as stated; the gateway's token is read where the kubelet rotates it."""

from __future__ import annotations

import pytest

from extproc.ops.workload_ca import CA_CERT_FILE


def test_which_control_plane_issues_certificates_and_which_gateway_takes_mutual_tls(tmp_path):
    from extproc.envoy.addresses import HostPort
    from extproc.ops.serve import ServeOptions, workload_issuer
    from extproc.ops.startup import StartupError
    from extproc.ops.up import UpOptions, gateway_tls_problem
    from extproc.policy.caller import local_caller
    from extproc.policy.gateway_binding import View

    egress = View(egress={"llm-gateway/egress": "10.0.0.7:80"})
    # the control plane of the sidecars: certificates where there are egress gateways to reach
    assert workload_issuer(ServeOptions()) is None  # none to reach: nothing issued, nothing served
    assert workload_issuer(ServeOptions(view=egress, insecure_plain_gateway=True)) is None
    made = workload_issuer(ServeOptions(view=egress, workload_cert_ttl_s=600))
    assert made is not None and made.ttl_s == 600  # a CA made at start, in memory
    kept = workload_issuer(ServeOptions(view=egress, workload_ca=str(tmp_path / "ca")))
    assert kept.ca.ca_pem == (tmp_path / "ca" / CA_CERT_FILE).read_bytes()
    with pytest.raises(StartupError, match="Secret of the control plane's namespace"):
        workload_issuer(ServeOptions(view=egress, kubernetes=True))
    # `serve --gateway`: its Envoy is run elsewhere, with a plain listener; only as stated
    with pytest.raises(StartupError, match="--insecure-plain-gateway"):
        workload_issuer(ServeOptions(view=View(gateway="llm-gateway/egress")))
    assert workload_issuer(ServeOptions(view=View(gateway="llm-gateway/egress"), insecure_plain_gateway=True)) is None

    # an egress gateway: its certificate from the sidecars' control plane, with its token
    token = tmp_path / "token"
    token.write_text("t" * 40)
    gateway = View(gateway="llm-gateway/egress")
    assert gateway_tls_problem(UpOptions(config=[])) is None  # not a gateway
    assert "--control-plane HOST:PORT and --token-file PATH" in gateway_tls_problem(UpOptions(config=[], view=gateway))
    assert gateway_tls_problem(UpOptions(config=[], view=gateway, insecure_plain_gateway=True)) is None
    ready = UpOptions(config=[], view=gateway, control_plane=HostPort("127.0.0.1", 18000), token_file=str(token))
    assert gateway_tls_problem(ready) is None
    assert "cannot be read" in gateway_tls_problem(UpOptions(config=[], view=gateway, token_file=str(tmp_path / "x"),
                                                             control_plane=HostPort("127.0.0.1", 18000)))
    stated = UpOptions(config=[], view=gateway, control_plane=HostPort("127.0.0.1", 18000), token_file=str(token),
                       caller=local_caller("shop"))
    assert "client certificates name" in gateway_tls_problem(stated)


def test_the_gateways_token_is_read_where_the_kubelet_rotates_it(tmp_path):
    """A projected token is a link (`token` -> `..data/token`) the kubelet swaps: Envoy must watch
    the link's own directory, so the path is kept as given."""
    import json
    import os

    from extproc.ops.up import certificates_token_sds

    mounted = tmp_path / "secrets"
    (mounted / "..2026_01").mkdir(parents=True)
    (mounted / "..2026_01" / "token").write_text("t" * 40)
    os.symlink("..2026_01", mounted / "..data")
    os.symlink("..data/token", mounted / "token")
    sds = json.loads(open(certificates_token_sds(tmp_path, str(mounted / "token"))).read())
    secret = sds["resources"][0]["generic_secret"]["secret"]
    assert secret == {"filename": str(mounted / "token"), "watched_directory": {"path": str(mounted)}}
