"""The gateway's benchmarks: measured by hand, never part of the tests' verdict nor of the package.

Where: a package at the repository root, beside `extproc/` and not in it. It is not installed
(pyproject's package list names only `extproc*`) and `extproc` never imports it; it imports
`extproc` like any user. At the root, `python -m benchmarks` runs from a checkout with no path set
up (scripts/_venv.sh runs every script from the root), the benches' own helper processes start
the same way, and the tests in tests/bench import it by name (the root is on pytest's
`pythonpath`). scripts/ keeps the entry points people type: scripts/bench, scripts/bench-workers,
scripts/soak, and the old paths the docs show for the in-process measures.

Commands (`python -m benchmarks` lists them; see docs/performance.md):
  scripts/bench [flags]            python -m benchmarks requests [flags]   (--budgets, --h2-library,
                                                                           --concurrent-streams)
  scripts/bench-workers [flags]    python -m benchmarks workers [flags]
  scripts/soak [MINUTES]           python -m benchmarks soak [MINUTES]
  python scripts/bench_auth.py     python -m benchmarks auth [flags]
  python scripts/bench_work.py     python -m benchmarks work
  python scripts/budget_cpu.py     python -m benchmarks budget-hook

Modules, shared first:
  measure      CPU time and RSS from /proc (a process, or a process and its descendants),
               percentiles, the best of timed loops, timed HTTP requests, free ports, waiting
  contenders   the world of a run (`Stage`: work directory, CA, fake provider, every process) and
               starting what is measured: bare Envoy, the gateway (`up`, another checkout, the
               h2-library copy, `serve --workers`), the floor, the paced provider, LiteLLM, Redis
  rounds       the round loop: contenders rotated round by round, CPU read around every run
  charts       scripts/bench's PNG
then one module per bench:
  requests     scripts/bench (the requests benchmark, its report and JSON)
  streams      the streaming benchmark and its paced provider
  floor        the floor contender's ext_proc server and Envoy bootstrap
  work         the ext_proc's own work per request, in process
  budgets      what token budgets cost: under load (scripts/bench --budgets), the hook in process
  concurrency  thousands of long streams at once (scripts/bench --concurrent-streams)
  auth         how Envoy reaches the control plane (issue 15)
  workers      scripts/bench-workers
  soak         scripts/soak
  h2_library_server  our gRPC handling on python-hyper's h2 (scripts/bench --h2-library)
"""
