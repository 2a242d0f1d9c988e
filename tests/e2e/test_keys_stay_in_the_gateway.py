"""Issue 15: only the gateway's own Envoys get anything that carries a key. The issue's ext_proc
client (tests/support/ext_proc_client.py) tries `extproc up` (Unix sockets in a private directory) as
another local user, and `extproc serve` over TCP without, with a wrong and with the right token;
xDS and the access-log service refuse callers without a token too."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2

from support.auth_helpers import ext_proc_client, token_files
from support.helpers import free_port, seed_dir, upstream_args, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"


def socket_dir_of(gw) -> Path:
    """Where Envoy reaches the control plane: the `pipe` address in its config dump."""
    paths = set(re.findall(r'"path": "([^"]+\.sock)"', gw.admin("/config_dump")))
    assert paths, "Envoy has no Unix-socket cluster"
    (directory,) = {str(Path(p).parent) for p in paths}
    return Path(directory)


def test_up_talks_over_a_private_unix_socket_another_user_cannot_open(gateway_factory, tmp_path, keys):
    gw = gateway_factory(seed_dir(tmp_path, "01"))
    assert gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "hi"}]}).status == 200
    directory = socket_dir_of(gw)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.getuid()
    for name in ("xds.sock", "ext_proc.sock"):
        info = (directory / name).stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, name
    target = f"unix:{directory}/ext_proc.sock"
    # the gateway's own user can (the positive control: the client is able to get a key)
    own = ext_proc_client(target, DASHSCOPE)
    assert own["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}", own
    # another local user cannot even connect, so gets nothing
    other = ext_proc_client(target, DASHSCOPE, prefix=["setpriv", "--reuid=nobody", "--regid=nogroup",
                                                       "--clear-groups"])
    assert other == {"code": "UNAVAILABLE", "authorization": None, "status": None, "connected": False}, other
    # no TCP port of the control plane: only Envoy's listener and admin, and the metrics
    assert gw.stop() == 0
    assert not directory.exists(), "up must remove its socket directory on exit"


def envoy_beside_serve(tmp_path, boot: bytes, listen: int, admin: int, metrics: int = 0):
    """A separately run Envoy on `boot` (the bootstrap `envoy-config` printed), beside a `serve`."""
    from extproc.ops.up import envoy_binary
    from support.helpers import Gateway

    (tmp_path / "envoy.json").write_bytes(boot)
    envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart",
                              "--concurrency", "1", "--log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "envoy.log").open("wb"))
    return Gateway(envoy, listen, admin, tmp_path / "envoy.log", metrics_port=metrics)


def wait_answering(gw, tmp_path) -> None:
    """Until a chat request goes through the Envoy and the `serve` beside it (`serve.log`)."""
    def answered() -> bool:
        try:
            return gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "hi"}]}).status == 200
        except OSError:
            return False

    wait_until(answered, 20, lambda: (tmp_path / "serve.log").read_text() + gw.log())


@pytest.fixture
def tcp_serve(tmp_path, ca, fresh_providers, keys):
    """`extproc serve` over TCP with a static token, and a separately run Envoy presenting it."""
    creds = token_files(tmp_path)
    control, ext_proc, listen, admin, metrics = free_port(), free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, **keys}
    serve = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")),
                              "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
                              "--auth-token-file", str(creds.token_file), "--metrics", f"127.0.0.1:{metrics}",
                              *upstream_args(ca, fresh_providers)],
                             stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--control", f"127.0.0.1:{control}",
                           "--ext-proc", f"127.0.0.1:{ext_proc}", *creds.envoy_config_args(),
                           "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", "--access-log", "none"],
                          capture_output=True, check=True).stdout
    assert creds.token.encode() not in boot
    gw = envoy_beside_serve(tmp_path, boot, listen, admin, metrics)
    try:
        wait_answering(gw, tmp_path)
        yield gw, creds, control, ext_proc
    finally:
        gw.stop()
        serve.terminate()
        serve.wait(10)


def test_serve_over_tcp_answers_only_the_right_token(tcp_serve, keys):
    gw, creds, control, ext_proc = tcp_serve
    target = f"127.0.0.1:{ext_proc}"
    for token in (None, "x" * 43, creds.token[:-1]):
        refused = ext_proc_client(target, DASHSCOPE, token)
        assert refused == {"code": "UNAUTHENTICATED", "authorization": None, "status": None, "connected": True}, token
    accepted = ext_proc_client(target, DASHSCOPE, creds.token)
    assert accepted["code"] == "OK" and accepted["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
    # Envoy's access log reached the metrics: its access-log stream carried the token too
    wait_until(lambda: sum(v for (name, _), v in gw.metrics().items() if name == "llm_gateway_requests_total") >= 1, 10)
    # Envoy's own token never shows in its config dump (nor the key)
    dump = gw.admin("/config_dump?include_eds")
    assert creds.token not in dump and keys["YOUR_DASHSCOPE_API_KEY"] not in dump


def test_xds_and_access_log_service_refuse_callers_without_the_token(tcp_serve):
    gw, creds, control, ext_proc = tcp_serve
    with grpc.insecure_channel(f"127.0.0.1:{control}") as channel:
        clusters = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).StreamClusters(
            iter([discovery_pb2.DiscoveryRequest()]), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(clusters))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).StreamClusters(
            iter([discovery_pb2.DiscoveryRequest()]), timeout=10, metadata=[("authorization", f"Bearer {creds.token}")])
        assert any(c.type_url.endswith("Cluster") for c in next(iter(ok)).resources)
        ok.cancel()
    forged = als_pb2.StreamAccessLogsMessage()
    forged.http_logs.log_entry.add()
    with grpc.insecure_channel(f"127.0.0.1:{ext_proc}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter([forged]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_serve_refuses_tcp_without_a_token_and_a_socket_dir_it_does_not_own(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")),
                               "--metrics", "none", *a], capture_output=True, text=True, timeout=60)

    tcp = run("--listen", f"127.0.0.1:{free_port()}")
    assert tcp.returncode == 1 and "needs --auth-token-file" in tcp.stderr
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    opened = run("--socket-dir", str(loose))
    assert opened.returncode == 1 and "must be 700" in opened.stderr


def test_envoy_rereads_its_token_when_it_changes_on_disk(tcp_serve):
    """As the kubelet rotates a projected token: a new file moved into the watched directory.
    Envoy's next streams carry the new token (without a restart): a wrong one fails closed (500,
    nothing forwarded), the right one serves again."""
    gw, creds, control, ext_proc = tcp_serve

    def rotate(token: str) -> None:
        staged = creds.token_file.parent / ".token.new"
        staged.write_text(token)
        os.replace(staged, creds.token_file)

    def status() -> int:
        return gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "hi"}]}).status

    rotate("w" * 43)
    wait_until(lambda: status() == 500, 15, gw.log)
    rotate(creds.token)
    wait_until(lambda: status() == 200, 15, gw.log)


def test_serve_and_a_separate_envoy_over_unix_sockets(tmp_path, ca, fresh_providers, keys):
    """`serve` without TCP flags listens on Unix sockets in --socket-dir; `envoy-config --socket-dir`
    points a separately run Envoy there; both sockets 0600 in a 0700 directory, removed on exit."""
    socks = tmp_path / "socks"
    listen, admin = free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")),
                              "--socket-dir", str(socks), "--metrics", "none", *upstream_args(ca, fresh_providers)],
                             stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT,
                             env={**os.environ, **keys})
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--socket-dir", str(socks),
                           "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", "--access-log", "none"],
                          capture_output=True, check=True)
    assert boot.stderr == b""  # no warning: local mode needs no token
    gw = envoy_beside_serve(tmp_path, boot.stdout, listen, admin)
    try:
        wait_answering(gw, tmp_path)
        assert stat.S_IMODE(socks.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in socks.iterdir()} == {"xds.sock": 0o600,
                                                                                    "ext_proc.sock": 0o600}
    finally:
        gw.stop()
        serve.terminate()
        serve.wait(10)
    assert list(socks.iterdir()) == []
