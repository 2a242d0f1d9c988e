"""Which request path a route's chat requests could take (issue 32): the body path (the ext_proc
receives the body, checks it and rewrites it: today's, for every route) or the headers-only path
(the ext_proc decides from the headers, Envoy's transform filter writes `model` and
`stream_options` into the body; see `extproc.envoy.body_transform`). One rule, here: a route may
take the headers-only path only where nothing its config asks for needs the body in Python.

The headers-only path was measured and is not adopted (docs/decisions/0008-headers-only-path.md:
Envoy's transform filter costs more per request than the body's trip to the ext_proc saves), so
nothing routes by this; the experiment behind its switch (`extproc.dataplane.headers_only`) refuses
by it what it cannot serve. It is the rule a future path must follow, kept with its table tests.

Per route, whatever the request: the client can never choose the path (Envoy's route config
would carry it, from this function), and only OpenAI's chat endpoint would be served on it (the
route's other endpoints keep the body path: embeddings and completions keep or replace the
client's model by endpoint, Anthropic's messages are translated)."""

from __future__ import annotations

from .table import OPENAI_API, Route, RoutingTable

# Why a route's chat requests need their body in the ext_proc: the reasons, as `extproc route` would say them
DATA_POLICY = "an LLMDataPolicy checks its prompts"
TRANSLATED = "a provider speaks another API than OpenAI's (the body is translated)"
FORCED_STREAM = "a provider sets `stream` (the answer may be converted for the client)"
CLIENT_MODEL = "a provider names no model (the client's is checked and kept)"
RETRIES = "a rule has retries (each attempt's body is rewritten, answers may be converted)"
POOL = "a rule sends to a pool of model servers (the endpoint picker reads the prompt)"
COST_CAP = "an LLMTokenRateLimit caps its cost (the answer must have a price for the model)"
TRACE_CONTENTS = "traces capture prompts"


def body_needs(route: Route, table: RoutingTable, trace_contents: bool = False) -> tuple[str, ...]:
    """Why `route`'s chat requests need their body in the ext_proc, each reason once, in a fixed
    order; empty: the route could take the headers-only path. `trace_contents`: the process
    puts prompts into spans (`--trace-contents`)."""
    needs: list[str] = []
    if table.protection.by_route.get(route.name) is not None:
        needs.append(DATA_POLICY)
    targets = [t for rule in route.rules for t in rule.targets]
    if any(t.body_api != OPENAI_API for t in targets):
        needs.append(TRANSLATED)
    if any(t.stream is not None for t in targets):
        needs.append(FORCED_STREAM)
    if any(not t.model for t in targets):
        needs.append(CLIENT_MODEL)
    if any(rule.failover is not None for rule in route.rules):
        needs.append(RETRIES)
    if any(t.pool is not None for t in targets):
        needs.append(POOL)
    if any(bucket.currency for budget in table.budgets.by_route.get(route.name, ())
           for rule in budget.rules for bucket in rule.buckets()):
        needs.append(COST_CAP)
    if trace_contents:
        needs.append(TRACE_CONTENTS)
    return tuple(needs)
