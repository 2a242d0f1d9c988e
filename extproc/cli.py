"""The `extproc` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from .config.problems import ConfigError
from .config.watch import load_config
from .envoy_config import DEFAULT_BODY_LIMIT, DEFAULT_BODY_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, SYSTEM_CA_BUNDLE, BootstrapOptions, HostPort, UpstreamOptions, bootstrap
from .failover import describe_failover
from .runner import StartupError, UpOptions, config_source, load_initial, run_up

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


def _add_metrics_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--metrics", type=_optional_host_port, default=_host_port(default), metavar="HOST:PORT",
                   help=f"serve /metrics (Prometheus), /healthz and /readyz here (default {default}; 'none' for none)")


def _access_log(text: str) -> str | None:
    return None if text.lower() in ("", "none", "off") else text


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

    demo = sub.add_parser("demo", parents=[common], help="the embedded default: fake local providers, the seed manifests, ready-to-paste curls")
    demo.add_argument("--listen", type=_host_port, default=HostPort("127.0.0.1", 10000), metavar="HOST:PORT")
    demo.add_argument("--admin", type=_host_port, default=HostPort("127.0.0.1", 9901), metavar="HOST:PORT")
    _add_metrics_arg(demo, "127.0.0.1:9464")

    serve = sub.add_parser("serve", parents=[common], help="the ext_proc and xDS server only, for an Envoy run elsewhere")
    _add_source_args(serve)
    serve.add_argument("--listen", type=_host_port, default=HostPort("0.0.0.0", 18000), metavar="HOST:PORT",
                       help="gRPC address for xDS (default 0.0.0.0:18000)")
    serve.add_argument("--ext-proc-listen", type=_host_port, default=None, metavar="HOST:PORT",
                       help="gRPC address for the ext_proc and the access log service (default: --listen's host, on the next port)")
    serve.add_argument("--body-limit", type=_size, default=DEFAULT_BODY_LIMIT, metavar="SIZE")
    _add_metrics_arg(serve, "0.0.0.0:9464")
    _add_upstream_args(serve)

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
    ec.add_argument("--sidecar", action="store_true",
                    help="for a pod whose port-80 traffic is redirected to --listen: LLM hosts through the gateway "
                         "(routes over RDS), everything else on to its original destination")

    val = sub.add_parser("validate", parents=[common], help="check config files; exit 1 and name file, object and field of each error")
    val.add_argument("paths", nargs="+", metavar="PATH")

    sub.add_parser("crds", parents=[common], help="print the CustomResourceDefinitions (k8s/crds.yaml)")

    route = sub.add_parser("route", parents=[common], help="dry run: which route, rule, provider, model and cluster a request gets")
    route.add_argument("--config", action="append", required=True, metavar="PATH")
    route.add_argument("--host", required=True, help="the request's host (Host header or URL host)")
    route.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="a request header (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "demo", "serve"):
        from .memory import keep_body_buffers

        keep_body_buffers()
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
    opts = UpOptions(config=args.config or [], listen=args.listen, admin=args.admin, upstream=_upstream(args),
                     body_limit=args.body_limit, body_timeout_s=args.body_timeout, concurrency=args.concurrency,
                     idle_timeout_s=args.idle_timeout,
                     envoy_log_level=args.envoy_log_level,
                     metrics=args.metrics, access_log=_access_log(args.access_log),
                     kubernetes=args.kubernetes, namespace=args.namespace)
    return asyncio.run(run_up(opts))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return asyncio.run(run_demo(args.listen, args.admin, args.metrics))


def cmd_serve(args: argparse.Namespace) -> int:
    from .control import ControlPlane
    from .ops_http import OpsServer

    async def serve() -> int:
        control = ControlPlane(_upstream(args), args.body_limit)
        source = config_source(args.config or [], args.kubernetes, args.namespace, control.apply)
        await load_initial(source)
        ops = OpsServer(control.metrics.registry, lambda: control.loaded)
        try:
            await control.start(args.listen, args.ext_proc_listen)
            if args.metrics is not None:
                await ops.start(args.metrics)
        except OSError as exc:
            raise StartupError(f"cannot listen: {exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(source.run())
        await stop.wait()
        watcher.cancel()
        await ops.stop()
        await control.stop()
        return 0

    return asyncio.run(serve())


def cmd_envoy_config(args: argparse.Namespace) -> int:
    opts = BootstrapOptions(listen=args.listen, admin=args.admin, control=args.control, ext_proc=args.ext_proc,
                            body_limit=args.body_limit, body_timeout_s=args.body_timeout,
                            access_log=_access_log(args.access_log), sidecar=args.sidecar,
                            idle_timeout_s=args.idle_timeout)
    json.dump(bootstrap(opts), sys.stdout, indent=2)
    print()
    return 0


def _load_or_report(paths: list[str]):
    """The compiled config, or None after printing every error."""
    try:
        return load_config(paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    compiled = _load_or_report(args.paths)
    if compiled is None:
        return 1
    for problem in compiled.problems:
        print(f"warning: {problem}", file=sys.stderr)
    kinds = [obj.resource.kind for obj in compiled.accepted]
    print(f"ok: {kinds.count('LLMProvider')} LLMProvider, {kinds.count('LLMRoute')} LLMRoute")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    compiled = _load_or_report(args.config)
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
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from .config.crds import crds_yaml

    sys.stdout.write(crds_yaml())
    return 0
