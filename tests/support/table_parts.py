"""Parts of a routing table built by hand, without a config: targets named after their provider,
header conditions, and a rule of weighted targets."""

from __future__ import annotations

import re

from extproc.policy.matching import HeaderCondition
from extproc.policy.table import Rule, Target


def target(name: str) -> Target:
    return Target(route="ns/r", rule="r0", provider=f"ns/{name}", provider_host=f"{name}.example.com",
                  cluster=f"llm_provider_{name}", path="/v1/chat/completions", model=name, stream=None, api_key=None)


def cond(name: str, kind: str, value: str = "") -> HeaderCondition:
    return HeaderCondition(name, kind, value, re.compile(value) if kind == "regex" else None)


def weighted(*weights: int) -> Rule:
    cumulative, running = [], 0
    for w in weights:
        running += w
        cumulative.append(running)
    return Rule("w", (), tuple(target(f"t{i}") for i in range(len(weights))), tuple(cumulative))
