"""The `extproc` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections import Counter

from ..config.crds import crds_yaml
from ..config.file_source import load_config
from ..config.problems import ConfigError
from ..dataplane.authentication import DEFAULT_AUDIENCE
from ..dataplane.workload_identity import DEFAULT_GRACE_S as DEFAULT_IDENTITY_GRACE_S
from ..demo.run import run_demo
from ..envoy.addresses import HostPort
from ..envoy.bootstrap import DEFAULT_BODY_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, BootstrapOptions, bootstrap, token_sds
from ..errors import GatewayError
from ..ops.malloc import collect_cycles_rarely, keep_body_buffers
from ..ops.serve import ServeOptions, run_serve
from ..ops.startup import StartupError, home_namespace
from ..ops.up import UpOptions, run_up
from ..policy.budgets import describe as describe_budgets
from ..policy.data_protection.explain import explain as explain_protection
from ..policy.decide import match
from ..policy.failover import describe_failover
from ..policy.gateway_binding import forward_of
from ..protocol import DEFAULT_BODY_LIMIT
from ..telemetry.spans import exporter_problem, tracing_endpoint
from ..telemetry.spend import format_report
from .argtypes import access_log_path, day, host_port, seconds, size
from .flags import (
    add_caller_args,
    add_ext_proc_streams_arg,
    add_gateway_args,
    add_gateway_tls_args,
    add_key_args,
    add_leader_args,
    add_metrics_arg,
    add_redis_args,
    add_scale_args,
    add_source_args,
    add_tracing_arg,
    add_upstream_args,
    add_worker_args,
    check_scale_args,
    source_caller,
    upstream_options,
    view_from_args,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="LLM traffic gateway for Envoy (ext_proc + xDS)")
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="info", choices=levels)
    # the same option after the subcommand, without its default overriding one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common],
                        help="run the gateway: the ext_proc/xDS server and a real Envoy, in the foreground")
    add_source_args(up)
    up.add_argument("--listen", type=host_port, default=HostPort("127.0.0.1", 10000), metavar="HOST:PORT",
                    help="where Envoy accepts application traffic (default 127.0.0.1:10000)")
    up.add_argument("--admin", type=host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT",
                    help="Envoy admin address (default 127.0.0.1:9901)")
    up.add_argument("--concurrency", type=int, default=None, metavar="N",
                    help="Envoy worker threads (default: one per core)")
    up.add_argument("--body-limit", type=size, default=DEFAULT_BODY_LIMIT, metavar="SIZE",
                    help="largest request body accepted (default 8m); larger gets 413")
    up.add_argument("--idle-timeout", type=seconds, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                    help="silence allowed while waiting for or reading an answer, e.g. between streamed "
                         f"events (default {DEFAULT_IDLE_TIMEOUT_S:g} s); past it the answer is cut")
    up.add_argument("--body-timeout", type=seconds, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
                    help="how long a client may take to send its request body (default 30); later gets 408")
    up.add_argument("--envoy-log-level", default="warning", choices=["info", "warning", "error", "critical", "off"],
                    help="Envoy's --log-level (default warning). Not debug or trace: at those levels Envoy "
                         "prints request headers, API keys included")
    add_metrics_arg(up, "127.0.0.1:9464")
    up.add_argument("--access-log", default="/dev/stdout", metavar="PATH",
                    help="file for Envoy's JSON access log, a line per request (default /dev/stdout; 'none' for none)")
    add_upstream_args(up)
    add_key_args(up)
    add_gateway_args(up)
    add_gateway_tls_args(up, "up")
    add_caller_args(up, "the calling workload's identity in local mode")
    add_redis_args(up)
    add_scale_args(up)
    add_tracing_arg(up)
    add_ext_proc_streams_arg(up)

    demo = sub.add_parser("demo", parents=[common],
                          help="the embedded default: fake local providers, the seed manifests, ready-to-paste curls")
    demo.add_argument("--listen", type=host_port, default=HostPort("127.0.0.1", 10000), metavar="HOST:PORT")
    demo.add_argument("--admin", type=host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT")
    demo.add_argument("--config", action="append", default=[], metavar="PATH",
                      help="your own LLMProvider/LLMRoute/LLMTokenRateLimit file or directory, loaded after the seed's "
                           "(repeatable; reloaded on change); providers on the seed's two hosts reach the fakes")
    add_metrics_arg(demo, "127.0.0.1:9464")
    add_tracing_arg(demo)

    serve = sub.add_parser("serve", parents=[common],
                           help="the ext_proc and xDS server only, for an Envoy run elsewhere")
    add_source_args(serve)
    serve.add_argument("--socket-dir", metavar="DIR",
                       help="local mode: xds.sock and ext_proc.sock in DIR (made 0700; an existing one must be ours "
                            "and 0700). The default without --kubernetes, --listen or --ext-proc-listen, in "
                            "/tmp/llm-gateway-UID")
    serve.add_argument("--listen", type=host_port, default=None, metavar="HOST:PORT",
                       help="TCP, authenticated: gRPC address for xDS (default with --kubernetes 0.0.0.0:18000)")
    serve.add_argument("--ext-proc-listen", type=host_port, default=None, metavar="HOST:PORT",
                       help="TCP: gRPC address for the ext_proc and the access log service (default: --listen's host, "
                            "on the next port)")
    serve.add_argument("--auth-token-file", metavar="FILE",
                       help="TCP: the bearer token every Envoy must present (at least 16 characters; Envoy: "
                            "envoy-config --token-file). Without it, --kubernetes checks ServiceAccount tokens with "
                            "the TokenReview API")
    serve.add_argument("--token-audience", default=DEFAULT_AUDIENCE, metavar="AUD",
                       help=f"with --kubernetes over TCP: the audience Envoys' ServiceAccount tokens must be for "
                            f"(default {DEFAULT_AUDIENCE})")
    serve.add_argument("--body-limit", type=size, default=DEFAULT_BODY_LIMIT, metavar="SIZE")
    add_metrics_arg(serve, "0.0.0.0:9464")
    add_upstream_args(serve)
    add_key_args(serve)
    add_gateway_args(serve)
    add_gateway_tls_args(serve, "serve")
    add_caller_args(serve, "local mode or --auth-token-file: the Envoy's workload")
    serve.add_argument("--identity-grace", type=seconds, default=DEFAULT_IDENTITY_GRACE_S, metavar="SECONDS",
                       help=f"with --kubernetes: how long a caller is decided with its pod's last known labels once "
                            f"the pod is gone or the API server out of reach (default {DEFAULT_IDENTITY_GRACE_S:g}); "
                            "after it, what depends on them answers 503")
    add_redis_args(serve)
    add_scale_args(serve)
    add_leader_args(serve)
    add_worker_args(serve)
    add_tracing_arg(serve)

    ec = sub.add_parser("envoy-config", parents=[common], help="print the Envoy bootstrap (JSON); it holds no API key")
    ec.add_argument("--control", type=host_port, default=HostPort("127.0.0.1", 18000), metavar="HOST:PORT",
                    help="xDS address of `extproc serve` (default 127.0.0.1:18000)")
    ec.add_argument("--ext-proc", type=host_port, default=None, metavar="HOST:PORT",
                    help="ext_proc address of `extproc serve` (default: --control's host, on the next port)")
    ec.add_argument("--listen", type=host_port, default=HostPort("0.0.0.0", 10000), metavar="HOST:PORT")
    ec.add_argument("--admin", type=host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT")
    ec.add_argument("--body-limit", type=size, default=DEFAULT_BODY_LIMIT, metavar="SIZE")
    ec.add_argument("--body-timeout", type=seconds, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS")
    ec.add_argument("--idle-timeout", type=seconds, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                    help="silence allowed in an answer, e.g. between streamed events "
                         f"(default {DEFAULT_IDLE_TIMEOUT_S:g} s)")
    ec.add_argument("--access-log", default="/dev/stdout", metavar="PATH",
                    help="file for Envoy's JSON access log (default /dev/stdout; 'none' for none)")
    ec.add_argument("--socket-dir", metavar="DIR",
                    help="local mode: reach `extproc serve --socket-dir DIR` over its Unix sockets "
                         "(instead of --control)")
    ec.add_argument("--token-file", metavar="PATH",
                    help="TCP: the bearer token Envoy presents to the control plane, re-read when it changes "
                         "(a projected ServiceAccount token); needs the SDS file at --token-sds")
    ec.add_argument("--token-sds", default="/etc/llm-gateway/token-sds.json", metavar="PATH",
                    help="where Envoy finds the SDS file naming --token-file "
                         "(default /etc/llm-gateway/token-sds.json); write it with --print-token-sds")
    ec.add_argument("--print-token-sds", action="store_true",
                    help="print the SDS file for --token-file instead of the bootstrap")
    ec.add_argument("--sidecar", action="store_true",
                    help="for a pod whose port-80 traffic is redirected to --listen: LLM hosts through the gateway "
                         "(routes over RDS), everything else on to its original destination")
    ec.add_argument("--readiness", type=host_port, default=HostPort("0.0.0.0", 15021), metavar="HOST:PORT",
                    help="with --sidecar: where Envoy answers the readiness probe, GET /ready (default 0.0.0.0:15021)")
    add_ext_proc_streams_arg(ec)

    val = sub.add_parser("validate", parents=[common],
                         help="check config files; exit 1 and name file, object and field of each error")
    val.add_argument("paths", nargs="+", metavar="PATH")
    add_gateway_args(val)

    sub.add_parser("crds", parents=[common], help="print the CustomResourceDefinitions (k8s/crds.yaml)")

    spend = sub.add_parser("spend", parents=[common],
                           help="who spent what: cost and tokens by caller, model and route, across every instance "
                                "sharing Redis (or since this gateway started)")
    spend.add_argument("--url", default="http://127.0.0.1:9464", metavar="URL",
                       help="the gateway's ops endpoint, its --metrics address (default http://127.0.0.1:9464)")
    spend.add_argument("--by", default="caller,model,route", metavar="GROUPS",
                       help="group by these, comma-separated: caller, route, provider, model (default "
                            "caller,model,route); currencies are always kept apart")
    spend.add_argument("--since", metavar="YYYY-MM-DD", type=day,
                       help="from this UTC day (spend kept in Redis; default: the first day it keeps)")
    spend.add_argument("--source", choices=("redis", "process"),
                       help="redis: every instance sharing the gateway's --redis; process: that gateway process "
                            "since it started (default: redis where the gateway has one)")
    spend.add_argument("--json", action="store_true", help="print the JSON report (as GET /spend answers it)")

    route = sub.add_parser("route", parents=[common],
                           help="dry run: which route, rule, provider, model and cluster a request gets")
    route.add_argument("--config", action="append", required=True, metavar="PATH")
    route.add_argument("--host", required=True, help="the request's host (Host header or URL host)")
    route.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE",
                       help="a request header (repeatable)")
    route.add_argument("--body", metavar="FILE",
                       help="a request body (JSON): which LLMDataPolicy rules it would meet, where they find "
                            "values (never what), and whether it would be refused, masked or logged")
    route.add_argument("--model", metavar="NAME",
                       help="the model the request asks for (a pool of model servers: which hold it as a LoRA adapter)")
    add_caller_args(route, "the calling workload")
    add_gateway_args(route)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "demo", "serve"):
        keep_body_buffers()
        collect_cycles_rarely()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = {"up": cmd_up, "demo": cmd_demo, "serve": cmd_serve, "envoy-config": cmd_envoy_config,
               "validate": cmd_validate, "route": cmd_route, "crds": cmd_crds, "spend": cmd_spend}[args.command]
    try:
        return handler(args)
    except StartupError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def traces_to(args: argparse.Namespace) -> str | None:
    """The OTLP endpoint spans go to, checked at start: an exporter that cannot load stops the start
    with its fix, not a traceback in a worker."""
    endpoint = tracing_endpoint(args.otlp_endpoint)
    if endpoint and (problem := exporter_problem()):
        raise StartupError(problem)
    return endpoint


def cmd_up(args: argparse.Namespace) -> int:
    check_scale_args(args)
    opts = UpOptions(config=args.config or [], listen=args.listen, admin=args.admin, upstream=upstream_options(args),
                     body_limit=args.body_limit, body_timeout_s=args.body_timeout, concurrency=args.concurrency,
                     idle_timeout_s=args.idle_timeout,
                     envoy_log_level=args.envoy_log_level,
                     metrics=args.metrics, access_log=access_log_path(args.access_log),
                     kubernetes=args.kubernetes, namespace=args.namespace, key_env=dict(args.key_env),
                     home=home_namespace(args.control_namespace), view=view_from_args(args),
                     redis_url=args.redis, redis_fail_closed=args.redis_fail_closed,
                     max_body_bytes_in_flight=args.max_body_bytes_in_flight, drain_grace_s=args.drain_grace,
                     caller=source_caller(args), otlp_endpoint=traces_to(args),
                     control_plane=args.control_plane, token_file=args.token_file,
                     insecure_plain_gateway=args.insecure_plain_gateway, identity_grace_s=args.identity_grace,
                     max_ext_proc_streams=args.max_ext_proc_streams)
    return asyncio.run(run_up(opts))


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo(args.listen, args.admin, args.metrics, traces_to(args),
                                args.config))


def cmd_serve(args: argparse.Namespace) -> int:
    check_scale_args(args)
    opts = ServeOptions(config=args.config or [], kubernetes=args.kubernetes, namespace=args.namespace,
                        key_env=dict(args.key_env), home=home_namespace(args.control_namespace),
                        view=view_from_args(args), upstream=upstream_options(args), body_limit=args.body_limit,
                        socket_dir=args.socket_dir, listen=args.listen, ext_proc_listen=args.ext_proc_listen,
                        auth_token_file=args.auth_token_file, token_audience=args.token_audience,
                        metrics=args.metrics, redis_url=args.redis, redis_fail_closed=args.redis_fail_closed,
                        max_body_bytes_in_flight=args.max_body_bytes_in_flight, drain_grace_s=args.drain_grace,
                        workers=args.workers, log_level=args.log_level, lease_namespace=args.lease_namespace,
                        lease_name=args.lease_name, lease_duration_s=args.lease_duration,
                        caller=source_caller(args), identity_grace_s=args.identity_grace,
                        otlp_endpoint=traces_to(args), workload_ca=args.workload_ca,
                        workload_cert_ttl_s=args.workload_cert_ttl,
                        insecure_plain_gateway=args.insecure_plain_gateway)
    return asyncio.run(run_serve(opts))


def cmd_envoy_config(args: argparse.Namespace) -> int:
    if args.print_token_sds:
        if not args.token_file:
            print("error: --print-token-sds needs --token-file", file=sys.stderr)
            return 2
        json.dump(token_sds(args.token_file), sys.stdout, indent=2)
        print()
        return 0
    if args.socket_dir is None and args.token_file is None:
        print("warning: over TCP without --token-file, `extproc serve` refuses this Envoy (UNAUTHENTICATED)",
              file=sys.stderr)
    opts = BootstrapOptions(listen=args.listen, admin=args.admin, control=args.control, ext_proc=args.ext_proc,
                            body_limit=args.body_limit, body_timeout_s=args.body_timeout,
                            access_log=access_log_path(args.access_log), sidecar=args.sidecar,
                            socket_dir=args.socket_dir,
                            token_sds=args.token_sds if args.token_file and args.socket_dir is None else None,
                            readiness=args.readiness, idle_timeout_s=args.idle_timeout,
                            max_ext_proc_streams=args.max_ext_proc_streams)
    json.dump(bootstrap(opts), sys.stdout, indent=2)
    print()
    return 0


def _load_or_report(paths: list[str], args: argparse.Namespace | None = None):
    """The compiled config after printing its warnings, or None after printing every error."""
    try:
        compiled = load_config(paths, view=view_from_args(args), log_warnings=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None
    for problem in compiled.problems:
        if problem.severity == "warning":
            print(f"warning: {problem}", file=sys.stderr)
    return compiled


def cmd_validate(args: argparse.Namespace) -> int:
    compiled = _load_or_report(args.paths, args)
    if compiled is None:
        return 1
    kinds = [obj.resource.kind for obj in compiled.accepted]
    own = "".join(f", {kinds.count(kind)} {kind}" for kind in ("LLMTokenRateLimit", "LLMPriceTable", "LLMDataPolicy")
                  if kind in kinds)
    skipped = [p for p in compiled.problems if p.severity == "note"]
    others = ""
    if skipped:  # Kubernetes' and Istio's own objects kept beside the gateway's (the seed's Service)
        names = Counter(match.group(1) for p in skipped if (match := re.search(r"\((\S+) ", p.obj or "")))
        others = f"; skipped {len(skipped)} Kubernetes/Istio object{'s' if len(skipped) > 1 else ''} (" + \
            ", ".join(f"{n} {kind}" for kind, n in names.items()) + ")"
    print(f"ok: {kinds.count('LLMProvider')} LLMProvider, {kinds.count('LLMRoute')} LLMRoute{own}{others}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    compiled = _load_or_report(args.config, args)
    if compiled is None:
        return 1
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"error: header {item!r} is not NAME:VALUE", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    if forward_of(compiled.table, args.host):
        print(forward_of(compiled.table, args.host))
        return 0
    caller = source_caller(args)
    try:
        route, rule, why = match(compiled.table, args.host, headers, caller)
    except GatewayError as refusal:
        print(f"{refusal.message}: the request gets {refusal.status}")
        return 1
    total = rule.cumulative_weights[-1]
    previous = 0
    print(f"route: {route.name}\nrule: {rule.name}" + (f"\nwhy: {why}" if why else ""))
    for target, cumulative in zip(rule.targets, rule.cumulative_weights, strict=True):
        share = 100.0 * (cumulative - previous) / total
        previous = cumulative
        stream = "" if target.stream is None else f" stream={str(target.stream).lower()}"
        print(f"  {share:5.1f}%  provider {target.provider} ({target.provider_host}{target.path})"
              f"  model {target.model}{stream}  cluster {target.cluster}")
    print(describe_failover(rule))
    for pool in dict.fromkeys(compiled.table.pools[t.pool] for t in rule.targets if t.pool is not None):
        for line in _describe_pool(pool, args.body, args.model):
            print(line)
    for line in describe_budgets(compiled.table.budgets, route.name, headers, caller):
        print(line)
    if args.body is not None:
        return _explain_body(args.body, compiled.table.protection.guard(route.name, None))
    return 0


def _describe_pool(pool, body_file: str | None, model: str | None) -> list[str]:
    """A pool's endpoints, scraped once now, ranked as the picker would rank this request
    (its body's prompt prefix, where given; `--model`: the model asked for, a LoRA adapter)."""
    import asyncio
    import time

    from ..dataplane.endpoint_scraper import scrape_once
    from ..policy.endpoint_picker import prefix_hashes

    lines = [f"pool {pool.kind} {pool.name} ({pool.protocol}): {len(pool.endpoints)} ready endpoint"
             f"{'' if len(pool.endpoints) == 1 else 's'}"]
    if not pool.endpoints:
        return [*lines, "  none ready: its requests get 503 no_ready_endpoint (or fail over, with retries)"]
    state, failures = asyncio.run(scrape_once(pool))
    body = b""
    if body_file is not None:
        try:
            body = open(body_file, "rb").read()
        except OSError:
            body = b""
    ranking = state.rank(pool, time.time(), prefix_hashes(body), model)
    lines.append(f"  candidates, best first (by {ranking.basis}):")
    for scored in ranking.order:
        note = f"  (metrics: {failures[scored.endpoint]})" if scored.endpoint in failures else ""
        lines.append(f"    {scored.endpoint}  score {scored.score:g}  {scored.why}{note}")
    return lines


def _explain_body(path: str, guard) -> int:
    """`route --body FILE`: the data policies' verdict on that body (the same guard and steps)."""
    import orjson

    try:
        data = orjson.loads(open(path, "rb").read())
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError as exc:
        print(f"error: {path} is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"error: {path} is not a JSON object", file=sys.stderr)
        return 2
    try:
        lines = explain_protection(guard, data)
    except GatewayError as refusal:
        print(f"error: {path}: {refusal.message}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    sys.stdout.write(crds_yaml())
    return 0


def cmd_spend(args: argparse.Namespace) -> int:
    """GET /spend of a running gateway, as a table (or its JSON)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    query = {"by": args.by, **({"since": args.since} if args.since else {}),
             **({"source": args.source} if args.source else {})}
    url = f"{args.url.rstrip('/')}/spend?{urllib.parse.urlencode(query)}"
    if "://" not in args.url:
        url = "http://" + url
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            report = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {url}: {exc.code} {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {url}: {exc} (is the gateway running with --metrics there?)", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return 0
