"""`extproc route --body FILE`: which data-policy rules a body would meet, and what would happen
to it, from the same guard, prompt slots and decision the ext_proc uses; and which rules would
check its answer. Says where values were found (the JSON path of each string) and how many,
never what they are."""

from __future__ import annotations

from typing import Any

from ...errors import GatewayError
from ..openai_api import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint, check_body
from .policy import Action, Guard
from .prompts import prompt_slots


def endpoint_of(data: dict[str, Any]) -> Endpoint:
    """The endpoint a body is for, from its required field (the dry run has no path)."""
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS):
        if endpoint.required in data:
            check_body(endpoint, data)
            return endpoint
    raise GatewayError(400, "the body has none of messages (chat), prompt (completions), input (embeddings)",
                       "invalid_body")


def explain(guard: Guard | None, data: dict[str, Any]) -> list[str]:
    """Lines telling, rule by rule, what the detectors found and where, and the verdict."""
    if guard is None:
        return ["data policies: none applies to this route"]
    endpoint = endpoint_of(data)
    slots = prompt_slots(endpoint, data)
    texts = [slot.text.encode("utf-8", "surrogatepass") for slot in slots]
    verdict = guard.inspect(texts)
    where: dict[tuple[int, str], list[str]] = {}  # (rule, detector) -> the paths it found values in
    patterns = guard.scanner.patterns
    for slot, found in zip(slots, verdict.found, strict=True):
        for f in found:
            for r in guard.owners[f.pattern]:
                paths = where.setdefault((r, patterns[f.pattern].detector), [])
                paths.append(slot.path)
    lines = [f"data policies ({endpoint.name}, {len(slots)} prompt strings):"]
    for r, rule in enumerate(guard.rules):
        found_here = [f"{detector} x{len(where[(r, detector)])} in {', '.join(dict.fromkeys(where[(r, detector)]))}"
                      for detector in dict.fromkeys(rule.detectors) if (r, detector) in where]
        what = "; ".join(found_here) or "nothing found"
        lines.append(f"  {rule.policy} rule {rule.name} ({rule.action.label}): {what}")
        if rule.judge is not None:
            j = rule.judge
            lines.append(f"    judge {j.host}: asked per request (timeout {j.timeout_s:g}s, failOpen "
                         f"{str(j.fail_open).lower()}); not asked by a dry run")
    if verdict.action is None:
        lines.append("verdict: nothing found: forwarded as it is")
    elif verdict.action is Action.BLOCK:
        refusal = verdict.refusal()
        lines.append(f"verdict: block: the request gets {refusal.status} {refusal.code} ({refusal.message})")
    elif verdict.action is Action.MASK:
        masked = sum(1 for text in guard.masked_texts(texts, verdict) if text is not None)
        assert verdict.rule is not None
        lines.append(f"verdict: mask (rule {verdict.rule.name} of {verdict.rule.policy}): values in {masked} "
                     "prompt strings replaced by placeholders, then forwarded")
    else:
        lines.append("verdict: log: counted, forwarded as it is")
    answers = guard.answers
    if answers is None or not endpoint.streams:  # chat and completions answers carry a model's text
        lines.append("answers: not checked")
    else:
        rules = ", ".join(f"{rule.name} ({rule.action.label})" for rule in answers.rules)
        lines.append(f"answers: checked (responses.check) by {rules}; streamed ones holding back "
                     f"{answers.scanner.hold} bytes")
    return lines
