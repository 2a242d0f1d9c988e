"""Command-line flags of scaling and shutdown, shared by `up` and `serve` (see docs/scaling.md)."""

from __future__ import annotations

import argparse

from .admission import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
from .drain import DEFAULT_GRACE_S
from .runner import StartupError


def add_scale_args(p: argparse.ArgumentParser) -> None:
    from .cli import _seconds, _size

    p.add_argument("--max-body-bytes-in-flight", type=_size, default=DEFAULT_MAX_BODY_BYTES_IN_FLIGHT, metavar="SIZE",
                   help=f"cap on request-body bytes held at once across all requests (default "
                        f"{DEFAULT_MAX_BODY_BYTES_IN_FLIGHT >> 20}m, fits the manifests' 512Mi limit); a body that "
                        f"would pass it gets a JSON 503 'overloaded' with Retry-After")
    p.add_argument("--drain-grace", type=_seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help=f"on SIGTERM, how long requests in flight may take to finish before the process exits "
                        f"(default {DEFAULT_GRACE_S:g}; keep it below the pod's terminationGracePeriodSeconds)")


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
    from .cli import _seconds
    from .leader import DEFAULT_LEASE_DURATION_S, DEFAULT_LEASE_NAME

    p.add_argument("--lease-namespace", metavar="NS", default=None,
                   help="with --kubernetes: namespace of the Lease that elects the one replica writing status "
                        "conditions (default: the pod's own namespace, else 'default')")
    p.add_argument("--lease-name", metavar="NAME", default=DEFAULT_LEASE_NAME,
                   help=f"with --kubernetes: the Lease's name (default {DEFAULT_LEASE_NAME})")
    p.add_argument("--lease-duration", type=_seconds, default=DEFAULT_LEASE_DURATION_S, metavar="SECONDS",
                   help=f"with --kubernetes: how long a replica waits on a leader that stopped renewing before it "
                        f"takes over (default {DEFAULT_LEASE_DURATION_S:g})")


def leader_for(source, args: argparse.Namespace):
    """With --kubernetes: a LeaderElector that lets `source` write status only while elected."""
    if not args.kubernetes:
        return None
    from .leader import LeaderElector, default_namespace

    elector = LeaderElector(args.lease_namespace or default_namespace(), args.lease_name, args.lease_duration,
                            on_elected=source.refresh)
    source.may_write_status = elector.is_leader
    return elector
