"""Flags shared by several subcommands: where the config comes from, how providers are reached,
keys, metrics, Redis, scaling, shutdown, leader election, and which proxy this process decides
for (see docs/cli.md, docs/scaling.md)."""

from __future__ import annotations

import argparse
import os

from ..envoy.clusters import SYSTEM_CA_BUNDLE, UpstreamOptions
from ..ops.drain import DEFAULT_GRACE_S
from ..ops.leader import DEFAULT_LEASE_DURATION_S, DEFAULT_LEASE_NAME
from ..ops.startup import StartupError
from ..policy.body_memory import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
from ..policy.caller import Caller, local_caller
from ..policy.capacity import DEFAULT_MAX_STREAMS, MAX_LIMIT
from ..policy.gateway_binding import MESH_VIEW, View, default_address, parse_gateway_name
from ..protocol import DEFAULT_BODY_LIMIT
from .argtypes import host_port, ip_port, key_env, labels, namespace, optional_host_port, resolve, seconds, size


def add_upstream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolve", type=resolve, action="append", default=[], metavar="HOST=ADDR:PORT",
                   help="reach provider HOST at ADDR:PORT, keeping SNI and certificate checks for HOST (repeatable)")
    p.add_argument("--upstream-ca", default=SYSTEM_CA_BUNDLE, metavar="FILE",
                   help=f"CA bundle that provider certificates must chain to (default: {SYSTEM_CA_BUNDLE})")
    p.add_argument("--dns-resolver", type=ip_port, default=None, metavar="IP:PORT",
                   help="resolve provider names with this DNS server only (default: the system resolver)")


def add_source_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", action="append", metavar="PATH",
                        help="LLMProvider/LLMRoute YAML file or directory (repeatable); reloaded on change")
    source.add_argument("--kubernetes", action="store_true",
                        help="list and watch LLMProvider/LLMRoute objects (and their Secrets) in Kubernetes")
    p.add_argument("--namespace", metavar="NS", help="with --kubernetes: only this namespace (default: all)")


def add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-env", type=key_env, action="append", default=[], metavar="NAME=HOST",
                   help="with --kubernetes: ${NAME} in an apiKey expands only in an LLMProvider whose spec.host is "
                        "HOST (repeatable; default none: an LLMProvider using ${...} gets Accepted=False, "
                        "reason KeyEnvNotAllowed). Files expand any variable")
    p.add_argument("--control-namespace", metavar="NS",
                   help="with --kubernetes: the control plane's namespace, whose LLMProviders/LLMRoutes every "
                        "namespace may use (default: $POD_NAMESPACE, else the in-cluster ServiceAccount's)")


def add_metrics_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--metrics", type=optional_host_port, default=host_port(default), metavar="HOST:PORT",
                   help=f"serve /metrics (Prometheus), /healthz and /readyz here (default {default}; 'none' for none)")


def add_tracing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry spans (a request's and each provider attempt's) over OTLP gRPC to URL, "
                        "e.g. http://127.0.0.1:4317 (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT; none set: no traces, nothing done per request)")


def add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=os.environ.get("LLM_GATEWAY_REDIS_URL") or None, metavar="URL",
                   help="share LLMTokenRateLimit budgets with every gateway naming this Redis (redis://host:6379/0; "
                        "default $LLM_GATEWAY_REDIS_URL; without it budgets are kept in this process)")
    p.add_argument("--redis-fail-closed", action="store_true",
                   help="while Redis is unreachable, answer requests a budget applies to with 503 "
                        "(default: keep serving, budgets kept per instance)")


def upstream_options(args: argparse.Namespace) -> UpstreamOptions:
    return UpstreamOptions(ca_file=args.upstream_ca, resolve=dict(args.resolve), dns_resolver=args.dns_resolver,
                           body_limit=getattr(args, "body_limit", DEFAULT_BODY_LIMIT))


def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-body-bytes-in-flight", type=size, default=DEFAULT_MAX_BODY_BYTES_IN_FLIGHT, metavar="SIZE",
                   help=f"cap on request-body bytes held at once across all requests (default "
                        f"{DEFAULT_MAX_BODY_BYTES_IN_FLIGHT >> 20}m, fits the manifests' 512Mi limit); a body that "
                        f"would pass it gets a JSON 503 'overloaded' with Retry-After")
    p.add_argument("--drain-grace", type=seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help=f"on SIGTERM, how long requests in flight may take to finish before the process exits "
                        f"(default {DEFAULT_GRACE_S:g}; keep it below the pod's terminationGracePeriodSeconds)")


def add_ext_proc_streams_arg(p: argparse.ArgumentParser) -> None:
    """The circuit breakers of Envoy's clusters to the control plane (its bootstrap)."""
    def streams(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of streams from 1 to {MAX_LIMIT}")
        return int(text)

    p.add_argument("--max-ext-proc-streams", type=streams, default=DEFAULT_MAX_STREAMS, metavar="N",
                   help=f"streams Envoy keeps open to the control plane at once (ext_proc, access log; the "
                        f"circuit breakers of its clusters; default {DEFAULT_MAX_STREAMS}). A request holds one "
                        f"until its body is answered; past N a request gets a JSON 503 'overloaded' with "
                        f"Retry-After")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="ext_proc processes sharing the ext_proc port (SO_REUSEPORT; a TCP address). Default: one "
                        "per CPU, fewer if the share of --max-body-bytes-in-flight each gets would not hold a "
                        "--body-limit body")


def check_scale_args(args: argparse.Namespace) -> None:
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise StartupError(f"--workers {workers}: must be 1 or more")
    if workers and args.max_body_bytes_in_flight // workers < args.body_limit:
        raise StartupError(f"--workers {workers}: each process would hold at most "
                           f"{args.max_body_bytes_in_flight // workers} bytes of bodies (its share of "
                           f"--max-body-bytes-in-flight), less than --body-limit ({args.body_limit} bytes)")
    if args.max_body_bytes_in_flight < args.body_limit:
        raise StartupError(f"--max-body-bytes-in-flight ({args.max_body_bytes_in_flight} bytes) is below --body-limit "
                           f"({args.body_limit} bytes): a body the limit allows could never be admitted")


def add_leader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-namespace", metavar="NS", default=None,
                   help="with --kubernetes: namespace of the Lease that elects the one replica writing status "
                        "conditions (default: the pod's own namespace, else 'default')")
    p.add_argument("--lease-name", metavar="NAME", default=DEFAULT_LEASE_NAME,
                   help=f"with --kubernetes: the Lease's name (default {DEFAULT_LEASE_NAME})")
    p.add_argument("--lease-duration", type=seconds, default=DEFAULT_LEASE_DURATION_S, metavar="SECONDS",
                   help=f"with --kubernetes: how long a replica waits on a leader that stopped renewing before it "
                        f"takes over (default {DEFAULT_LEASE_DURATION_S:g})")


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    """`--gateway` (be an egress gateway) and `--egress-gateway` (the gateways sidecars send to)."""
    def gateway(text: str) -> str:
        try:
            return parse_gateway_name(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def egress(text: str) -> tuple[str, str]:
        name, sep, address = text.partition("=")
        ref = gateway(name)
        if not sep:
            return ref, default_address(ref)
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT")
        return ref, address

    parser.add_argument("--gateway", type=gateway, default=None, metavar="NAMESPACE/NAME",
                        help="be the egress gateway NAMESPACE/NAME: serve only the LLMRoutes whose spec.gateways "
                             "names it (and the providers they use); Kubernetes status is left to the control plane")
    parser.add_argument("--egress-gateway", type=egress, action="append", default=[],
                        metavar="NAMESPACE/NAME[=HOST:PORT]",
                        help="an egress gateway LLMRoutes may name in spec.gateways: sidecars send those hosts to it, "
                             "at HOST:PORT (default NAME.NAMESPACE.svc.cluster.local:80); repeatable")


def view_from_args(args: argparse.Namespace | None) -> View:
    """The view the command line asks for; the mesh when the command has no such options."""
    if args is None:
        return MESH_VIEW
    return View(gateway=getattr(args, "gateway", None), egress=dict(getattr(args, "egress_gateway", [])))


def add_caller_args(p: argparse.ArgumentParser, what: str) -> None:
    """`--source-labels`, `--source-namespace`: who the calling workload is, where the operator
    states it (local mode; `route`'s dry run)."""
    p.add_argument("--source-labels", type=labels, action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help=f"{what}: the calling workload's pod labels, which LLMRoutes' sourceLabels and "
                        "workloadSelector match (repeatable)")
    p.add_argument("--source-namespace", type=namespace, default=None, metavar="NS",
                   help=f"{what}: the calling workload's namespace: short hosts resolve there, exportTo and "
                        "workloadSelector apply (default: none, which may use every object)")


def source_caller(args: argparse.Namespace) -> Caller:
    """The caller `--source-labels`/`--source-namespace` state (`LOCAL` when neither is given)."""
    merged: dict[str, str] = {}
    for given in getattr(args, "source_labels", []) or []:
        merged.update(given)
    return local_caller(getattr(args, "source_namespace", None), merged)
