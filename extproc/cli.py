"""The `extproc` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config.problems import ConfigError
from .config.watch import load_config
from .auth import DEFAULT_AUDIENCE, home_namespace
from .envoy_config import (DEFAULT_BODY_LIMIT, DEFAULT_BODY_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, SYSTEM_CA_BUNDLE,
                           BootstrapOptions, HostPort, UpstreamOptions, bootstrap, token_sds)
from .failover import describe_failover
from .gateways import add_gateway_args, forward_of, view_from_args
from .runner import StartupError, UpOptions, config_source, load_initial, run_up
from .scale_args import add_leader_args, add_scale_args, add_worker_args, check_scale_args, leader_for

log = logging.getLogger("extproc")


def _host_port(text: str) -> HostPort:
    try:
        return HostPort.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resolve(text: str) -> tuple[str, HostPort]:
    host, sep, target = text.partition("=")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST=ADDR:PORT")
    return host.lower(), _host_port(target)


def _optional_host_port(text: str) -> HostPort | None:
    return None if text.lower() in ("", "none", "off") else _host_port(text)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with k/m suffix: 8m)") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.001 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0.001 and 3600")
    return value


def _add_upstream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolve", type=_resolve, action="append", default=[], metavar="HOST=ADDR:PORT",
                   help="reach provider HOST at ADDR:PORT, keeping SNI and certificate checks for HOST (repeatable)")
    p.add_argument("--upstream-ca", default=SYSTEM_CA_BUNDLE, metavar="FILE",
                   help=f"CA bundle that provider certificates must chain to (default: {SYSTEM_CA_BUNDLE})")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", action="append", metavar="PATH",
                        help="LLMProvider/LLMRoute YAML file or directory (repeatable); reloaded on change")
    source.add_argument("--kubernetes", action="store_true",
                        help="list and watch LLMProvider/LLMRoute objects (and their Secrets) in Kubernetes")
    p.add_argument("--namespace", metavar="NS", help="with --kubernetes: only this namespace (default: all)")


def _key_env(text: str) -> tuple[str, str]:
    name, sep, host = text.partition("=")
    if not sep or not name or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=HOST")
    return name, host.lower()


def _add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-env", type=_key_env, action="append", default=[], metavar="NAME=HOST",
                   help="with --kubernetes: ${NAME} in an apiKey expands only in an LLMProvider whose spec.host is "
                        "HOST (repeatable; default none: an LLMProvider using ${...} gets Accepted=False, "
                        "reason KeyEnvNotAllowed). Files expand any variable")
    p.add_argument("--control-namespace", metavar="NS",
                   help="with --kubernetes: the control plane's namespace, whose LLMProviders/LLMRoutes every "
                        "namespace may use (default: $POD_NAMESPACE, else the in-cluster ServiceAccount's)")


def _add_metrics_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--metrics", type=_optional_host_port, default=_host_port(default), metavar="HOST:PORT",
                   help=f"serve /metrics (Prometheus), /healthz and /readyz here (default {default}; 'none' for none)")


def _access_log(text: str) -> str | None:
    return None if text.lower() in ("", "none", "off") else text


def _add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=os.environ.get("LLM_GATEWAY_REDIS_URL") or None, metavar="URL",
                   help="share LLMTokenRateLimit budgets with every gateway naming this Redis (redis://host:6379/0; "
                        "default $LLM_GATEWAY_REDIS_URL; without it budgets are kept in this process)")
    p.add_argument("--redis-fail-closed", action="store_true",
                   help="while Redis is unreachable, answer requests a budget applies to with 503 "
                        "(default: keep serving, budgets kept per instance)")


def _upstream(args: argparse.Namespace) -> UpstreamOptions:
    return UpstreamOptions(ca_file=args.upstream_ca, resolve=dict(args.resolve),
                           body_limit=getattr(args, "body_limit", DEFAULT_BODY_LIMIT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="LLM traffic gateway for Envoy (ext_proc + xDS)")
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="info", choices=levels)
    # the same option after the subcommand, without its default overriding one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="run the gateway: the ext_proc/xDS server and a real Envoy, in the foreground")
    _add_source_args(up)
    up.add_argument("--listen", type=_host_port, default=HostPort("127.0.0.1", 10000), metavar="HOST:PORT",
                    help="where Envoy accepts application traffic (default 127.0.0.1:10000)")
    up.add_argument("--admin", type=_host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT",
                    help="Envoy admin address (default 127.0.0.1:9901)")
    up.add_argument("--concurrency", type=int, default=None, metavar="N", help="Envoy worker threads (default: one per core)")
    up.add_argument("--body-limit", type=_size, default=DEFAULT_BODY_LIMIT, metavar="SIZE",
                    help="largest request body accepted (default 8m); larger gets 413")
    up.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                    help="silence allowed while waiting for or reading an answer, e.g. between streamed "
                         f"events (default {DEFAULT_IDLE_TIMEOUT_S:g} s); past it the answer is cut")
    up.add_argument("--body-timeout", type=_seconds, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
                    help="how long a client may take to send its request body (default 30); later gets 408")
    up.add_argument("--envoy-log-level", default="warning", choices=["info", "warning", "error", "critical", "off"],
                    help="Envoy's --log-level (default warning). Not debug or trace: at those levels Envoy "
                         "prints request headers, API keys included")
    _add_metrics_arg(up, "127.0.0.1:9464")
    up.add_argument("--access-log", default="/dev/stdout", metavar="PATH",
                    help="file for Envoy's JSON access log, a line per request (default /dev/stdout; 'none' for none)")
    _add_upstream_args(up)
    _add_key_args(up)
    add_gateway_args(up)
    _add_redis_args(up)
    add_scale_args(up)

    demo = sub.add_parser("demo", parents=[common], help="the embedded default: fake local providers, the seed manifests, ready-to-paste curls")
    demo.add_argument("--listen", type=_host_port, default=HostPort("127.0.0.1", 10000), metavar="HOST:PORT")
    demo.add_argument("--admin", type=_host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT")
    _add_metrics_arg(demo, "127.0.0.1:9464")

    serve = sub.add_parser("serve", parents=[common], help="the ext_proc and xDS server only, for an Envoy run elsewhere")
    _add_source_args(serve)
    serve.add_argument("--socket-dir", metavar="DIR",
                       help="local mode: xds.sock and ext_proc.sock in DIR (made 0700; an existing one must be ours "
                            "and 0700). The default without --kubernetes, --listen or --ext-proc-listen, in "
                            "/tmp/llm-gateway-UID")
    serve.add_argument("--listen", type=_host_port, default=None, metavar="HOST:PORT",
                       help="TCP, authenticated: gRPC address for xDS (default with --kubernetes 0.0.0.0:18000)")
    serve.add_argument("--ext-proc-listen", type=_host_port, default=None, metavar="HOST:PORT",
                       help="TCP: gRPC address for the ext_proc and the access log service (default: --listen's host, on the next port)")
    serve.add_argument("--auth-token-file", metavar="FILE",
                       help="TCP: the bearer token every Envoy must present (at least 16 characters; Envoy: envoy-config "
                            "--token-file). Without it, --kubernetes checks ServiceAccount tokens with the TokenReview API")
    serve.add_argument("--token-audience", default=DEFAULT_AUDIENCE, metavar="AUD",
                       help=f"with --kubernetes over TCP: the audience Envoys' ServiceAccount tokens must be for "
                            f"(default {DEFAULT_AUDIENCE})")
    serve.add_argument("--body-limit", type=_size, default=DEFAULT_BODY_LIMIT, metavar="SIZE")
    _add_metrics_arg(serve, "0.0.0.0:9464")
    _add_upstream_args(serve)
    _add_key_args(serve)
    add_gateway_args(serve)
    _add_redis_args(serve)
    add_scale_args(serve)
    add_leader_args(serve)
    add_worker_args(serve)

    ec = sub.add_parser("envoy-config", parents=[common], help="print the Envoy bootstrap (JSON); it holds no API key")
    ec.add_argument("--control", type=_host_port, default=HostPort("127.0.0.1", 18000), metavar="HOST:PORT",
                    help="xDS address of `extproc serve` (default 127.0.0.1:18000)")
    ec.add_argument("--ext-proc", type=_host_port, default=None, metavar="HOST:PORT",
                    help="ext_proc address of `extproc serve` (default: --control's host, on the next port)")
    ec.add_argument("--listen", type=_host_port, default=HostPort("0.0.0.0", 10000), metavar="HOST:PORT")
    ec.add_argument("--admin", type=_host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT")
    ec.add_argument("--body-limit", type=_size, default=DEFAULT_BODY_LIMIT, metavar="SIZE")
    ec.add_argument("--body-timeout", type=_seconds, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS")
    ec.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                    help=f"silence allowed in an answer, e.g. between streamed events (default {DEFAULT_IDLE_TIMEOUT_S:g} s)")
    ec.add_argument("--access-log", default="/dev/stdout", metavar="PATH",
                    help="file for Envoy's JSON access log (default /dev/stdout; 'none' for none)")
    ec.add_argument("--socket-dir", metavar="DIR",
                    help="local mode: reach `extproc serve --socket-dir DIR` over its Unix sockets (instead of --control)")
    ec.add_argument("--token-file", metavar="PATH",
                    help="TCP: the bearer token Envoy presents to the control plane, re-read when it changes "
                         "(a projected ServiceAccount token); needs the SDS file at --token-sds")
    ec.add_argument("--token-sds", default="/etc/llm-gateway/token-sds.json", metavar="PATH",
                    help="where Envoy finds the SDS file naming --token-file (default /etc/llm-gateway/token-sds.json); "
                         "write it with --print-token-sds")
    ec.add_argument("--print-token-sds", action="store_true",
                    help="print the SDS file for --token-file instead of the bootstrap")
    ec.add_argument("--sidecar", action="store_true",
                    help="for a pod whose port-80 traffic is redirected to --listen: LLM hosts through the gateway "
                         "(routes over RDS), everything else on to its original destination")
    ec.add_argument("--readiness", type=_host_port, default=HostPort("0.0.0.0", 15021), metavar="HOST:PORT",
                    help="with --sidecar: where Envoy answers the readiness probe, GET /ready (default 0.0.0.0:15021)")

    val = sub.add_parser("validate", parents=[common], help="check config files; exit 1 and name file, object and field of each error")
    val.add_argument("paths", nargs="+", metavar="PATH")
    add_gateway_args(val)

    sub.add_parser("crds", parents=[common], help="print the CustomResourceDefinitions (k8s/crds.yaml)")

    route = sub.add_parser("route", parents=[common], help="dry run: which route, rule, provider, model and cluster a request gets")
    route.add_argument("--config", action="append", required=True, metavar="PATH")
    route.add_argument("--host", required=True, help="the request's host (Host header or URL host)")
    route.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="a request header (repeatable)")
    add_gateway_args(route)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "demo", "serve"):
        from .memory import collect_cycles_rarely, keep_body_buffers

        keep_body_buffers()
        collect_cycles_rarely()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = {"up": cmd_up, "demo": cmd_demo, "serve": cmd_serve, "envoy-config": cmd_envoy_config,
               "validate": cmd_validate, "route": cmd_route, "crds": cmd_crds}[args.command]
    try:
        return handler(args)
    except StartupError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_up(args: argparse.Namespace) -> int:
    check_scale_args(args)
    opts = UpOptions(config=args.config or [], listen=args.listen, admin=args.admin, upstream=_upstream(args),
                     body_limit=args.body_limit, body_timeout_s=args.body_timeout, concurrency=args.concurrency,
                     idle_timeout_s=args.idle_timeout,
                     envoy_log_level=args.envoy_log_level,
                     metrics=args.metrics, access_log=_access_log(args.access_log),
                     kubernetes=args.kubernetes, namespace=args.namespace, key_env=dict(args.key_env),
                     home=home_namespace(args.control_namespace), view=view_from_args(args),
                     redis_url=args.redis, redis_fail_closed=args.redis_fail_closed,
                     max_body_bytes_in_flight=args.max_body_bytes_in_flight, drain_grace_s=args.drain_grace)
    return asyncio.run(run_up(opts))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return asyncio.run(run_demo(args.listen, args.admin, args.metrics))


def _serve_transport(args: argparse.Namespace):
    """(socket dir, None) for local mode, or (None, authenticator) for TCP."""
    from .auth import StaticToken, TokenReviewAuthenticator, default_socket_dir, kubernetes_review, private_dir

    tcp = args.socket_dir is None and (args.kubernetes or args.listen is not None or args.ext_proc_listen is not None)
    if not tcp:
        try:
            return private_dir(args.socket_dir or default_socket_dir()), None
        except OSError as exc:
            raise StartupError(f"cannot use the socket directory: {exc}") from None
    if args.auth_token_file:
        try:
            return None, StaticToken.from_file(args.auth_token_file)
        except (OSError, ValueError) as exc:
            raise StartupError(f"--auth-token-file {args.auth_token_file}: {exc}") from None
    if args.kubernetes:
        try:
            return None, TokenReviewAuthenticator(kubernetes_review(), args.token_audience)
        except Exception as exc:
            raise StartupError(f"cannot reach Kubernetes for TokenReviews: {exc}") from None
    raise StartupError("serve over TCP (--listen/--ext-proc-listen) needs --auth-token-file FILE: without it anyone "
                       "who reaches the port could obtain API keys (or use --socket-dir DIR for Unix sockets)")


def worker_auth(args: argparse.Namespace) -> tuple[str, str]:
    """How a worker process (extproc.workers) makes the same authenticator as `_serve_transport`:
    a description it can be handed across processes, not the object (a Kubernetes client is not)."""
    if args.auth_token_file:
        return "static", args.auth_token_file
    return "review", args.token_audience


def cmd_serve(args: argparse.Namespace) -> int:
    from .control import EXT_PROC_SOCKET, XDS_SOCKET, ControlPlane
    from .drain import drain
    from .ops_http import OpsServer
    from .workers import WorkerSetup

    check_scale_args(args)

    async def serve() -> int:
        socket_dir, authenticator = _serve_transport(args)
        control = ControlPlane(_upstream(args), args.body_limit, args.redis, args.redis_fail_closed,
                               max_body_bytes_in_flight=args.max_body_bytes_in_flight)
        # worker processes share a TCP port (SO_REUSEPORT); local mode's Unix socket has one process
        workers = WorkerSetup(control, args.workers if socket_dir is None else 1, args.max_body_bytes_in_flight,
                              args.body_limit, args.log_level, worker_auth(args) if socket_dir is None else None,
                              (args.redis, args.redis_fail_closed))
        source = config_source(args.config or [], args.kubernetes, args.namespace, control.apply,
                               key_env=dict(args.key_env), home=home_namespace(args.control_namespace),
                               view=view_from_args(args))
        elector = leader_for(source, args)  # replicas: one writes status
        await load_initial(source)
        ops = OpsServer(workers.registry, lambda: control.loaded and not control.draining,
                        control.budgets.degraded_reason)
        try:
            listen = args.listen or HostPort("0.0.0.0", 18000)
            await control.start(listen, args.ext_proc_listen, authenticator=authenticator, socket_dir=socket_dir)
            if socket_dir is None:
                await workers.start((args.ext_proc_listen or listen).host)
            if args.metrics is not None:
                await ops.start(args.metrics)
        except OSError as exc:
            raise StartupError(f"cannot listen: {exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(source.run())
        electing = asyncio.create_task(elector.run()) if elector else None
        await stop.wait()
        if elector:
            electing.cancel()
            await elector.release()
        # requests in flight finish, in every process; Envoy goes elsewhere
        await asyncio.gather(drain(control, args.drain_grace), workers.drain(args.drain_grace))
        watcher.cancel()
        await ops.stop()
        await control.stop()
        if socket_dir is not None:
            for name in (XDS_SOCKET, EXT_PROC_SOCKET):
                Path(socket_dir, name).unlink(missing_ok=True)
        return 0

    return asyncio.run(serve())


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
                            access_log=_access_log(args.access_log), sidecar=args.sidecar, socket_dir=args.socket_dir,
                            token_sds=args.token_sds if args.token_file and args.socket_dir is None else None,
                            readiness=args.readiness, idle_timeout_s=args.idle_timeout)
    json.dump(bootstrap(opts), sys.stdout, indent=2)
    print()
    return 0


def _load_or_report(paths: list[str], args: argparse.Namespace | None = None):
    """The compiled config, or None after printing every error."""
    try:
        return load_config(paths, view=view_from_args(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    compiled = _load_or_report(args.paths, args)
    if compiled is None:
        return 1
    for problem in compiled.problems:
        print(f"warning: {problem}", file=sys.stderr)
    kinds = [obj.resource.kind for obj in compiled.accepted]
    budgets = f", {kinds.count('LLMTokenRateLimit')} LLMTokenRateLimit" if "LLMTokenRateLimit" in kinds else ""
    print(f"ok: {kinds.count('LLMProvider')} LLMProvider, {kinds.count('LLMRoute')} LLMRoute{budgets}")
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
    route = compiled.table.route_for(args.host)
    if route is None and forward_of(compiled.table, args.host):
        print(forward_of(compiled.table, args.host))
        return 0
    if route is None:
        print(f"no LLMRoute or LLMProvider serves host {args.host!r}: the request gets 404")
        return 1
    rule = route.select(headers)
    if rule is None:
        print(f"route {route.name}: no rule matches: the request gets 404")
        return 1
    total = rule.cumulative_weights[-1]
    previous = 0
    print(f"route: {route.name}\nrule: {rule.name}")
    for target, cumulative in zip(rule.targets, rule.cumulative_weights):
        share = 100.0 * (cumulative - previous) / total
        previous = cumulative
        stream = "" if target.stream is None else f" stream={str(target.stream).lower()}"
        print(f"  {share:5.1f}%  provider {target.provider} ({target.provider_host}{target.path})"
              f"  model {target.model}{stream}  cluster {target.cluster}")
    print(describe_failover(rule))
    if compiled.table.budgets is not None:
        from .budgets import describe

        for line in describe(compiled.table.budgets, route.name, headers):
            print(line)
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from .config.crds import crds_yaml

    sys.stdout.write(crds_yaml())
    return 0
