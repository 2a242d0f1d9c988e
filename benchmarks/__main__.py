"""`python -m benchmarks COMMAND [ARGS]`, from the repository root (scripts/bench, scripts/bench-workers
and scripts/soak run it so, in the project's virtual environment). `python -m benchmarks` alone
lists the commands; `COMMAND --help` tells a bench's flags."""

from __future__ import annotations

import importlib
import sys

# command -> (module, its entry point, what it is); the last two are the bench's own processes
COMMANDS = {
    "requests": ("requests", "main", "scripts/bench: the gateway against bare Envoy, the floor and LiteLLM, "
                                     "then streams (--budgets: what token budgets cost under load)"),
    "concurrency": ("concurrency", "main", "scripts/bench --concurrent-streams: thousands of long streams at once, "
                                           "memory per stream and CPU per event"),
    "workers": ("workers", "main", "scripts/bench-workers: `serve --workers 1` against `--workers 2`"),
    "soak": ("soak", "main", "scripts/soak [MINUTES]: a steady load with config changes, memory before and after"),
    "auth": ("auth", "main", "how Envoy reaches the control plane: CPU per request of each way (issue 15)"),
    "gateway-hop": ("gateway_hop", "main", "a gateway-bound request (mutual TLS to the egress gateway) against a "
                                           "sidecar's decision, in one run (issue 33)"),
    "work": ("work", "main", "the ext_proc's own work per request, in process"),
    "startup": ("startup", "main", "start and reload with thousands of providers, some never answering DNS (issue 30)"),
    "translation": ("translation", "main", "CPU per event of a translated stream beside an untranslated one "
                                          "(issue 27)"),
    "budget-hook": ("budgets", "hook_main", "the budget hook's CPU per request, in process"),
    "data-protection": ("data_protection", "main", "LLMDataPolicy's CPU per request on a 4 KiB prompt, in process"),
    "answer-reader": ("answer_reader", "main", "what reading a sampled answer's finish reason costs Envoy per "
                                               "streamed event (traces on, sampled or not, against off)"),
    "dashboard": ("dashboard", "main", "docs/images/dashboard.png: the dashboard's panels from a real run's /metrics"),
    "endpoint-picking": ("endpoint_picking", "main", "load-aware endpoint picking against Envoy's round robin and "
                                                     "least request, four simulated model servers (issue 25)"),
    "model-servers": ("endpoint_picking", "serve_main", "(started by the bench) simulated model servers"),
    "paced-provider": ("streams", "main", "(started by the bench) the streaming benchmark's paced provider"),
    "floor-server": ("floor", "main", "(started by the bench) the floor's ext_proc server"),
    "headers-floor-server": ("headers_floor", "main", "(started by the bench) the headers-only floor's ext_proc "
                                                      "server (issue 32)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command: {argv[0]}", file=sys.stderr)
        listing = "\n".join(f"  {name:15s} {what}" for name, (_, _, what) in COMMANDS.items())
        print(f"{__doc__}\n\ncommands:\n{listing}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, entry, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(f"{__package__}.{module}"), entry)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
