"""The request hook of data protection (`LLMDataPolicy`): a request's prompt checked against
the guard its decision carries, before the body is rewritten and forwarded.

The processor calls it only for a request whose decision has a guard (`Decision.guard`): a
route without a policy costs nothing here. Per request: the prompt's strings are found where
they hide (`extproc.policy.data_protection.prompts`), scanned once (`Guard.inspect`), judged
where a rule has a judge (the processor asks it and answers later: `Judging`), and then
refused (400 `content_policy_violation`, naming the rule and detector), masked in place, or
only counted. The access log gets the deciding rule and its action as metadata; the metrics
count by policy, rule, detector and action (answers have their own series, counted by
`extproc.dataplane.answer_check`). What was found is never logged, counted by value, or put
in an answer.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from .. import protobuf_wire as wire
from ..policy.data_protection.judge import Judgement, JudgeSpec
from ..policy.data_protection.policy import Action, Guard, Verdict
from ..policy.data_protection.prompts import prompt_slots
from ..policy.openai_api import Endpoint
from ..telemetry import fast_series as series


class ProtectionMetrics:
    """`llm_gateway_data_policy_*`: values found, and requests by the action they got."""

    def __init__(self, registry: CollectorRegistry):
        self.found = series.Counter(
            "llm_gateway_data_policy_detections", "Values data-policy detectors found in prompts (a judge's YES "
            "counts one), by the rule that looks for them and its action", ("policy", "rule", "detector", "action"),
            registry=registry)
        self.requests = series.Counter(
            "llm_gateway_data_policy_requests", "Requests a data policy acted on: the deciding rule (the first "
            "with the most severe action among those that found something) and the action taken",
            ("policy", "rule", "action"), registry=registry)
        self.judged = series.Counter(
            "llm_gateway_data_policy_judgements", "A judge's answers: yes, no, garbage, timeout, unavailable",
            ("policy", "rule", "answer"), registry=registry)
        # answers (`responses.check`), counted apart: a prompt's series keep their meaning
        self.answer_found = series.Counter(
            "llm_gateway_data_policy_answer_detections", "Values data-policy detectors found in answers (responses."
            "check), by the rule that looks for them and its action", ("policy", "rule", "detector", "action"),
            registry=registry)
        self.answers = series.Counter(
            "llm_gateway_data_policy_answers", "Answers a data policy acted on (responses.check): the deciding rule "
            "and the action taken", ("policy", "rule", "action"), registry=registry)
        self._series: dict[tuple[str, ...], series.CounterSeries] = {}  # labelled series, looked up once

    def count(self, family: series.Counter, *labels: str, by: float = 1) -> None:
        key = (family.name, *labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = family.labels(*labels)
        found.inc(by)


class PromptCheck:
    """One request's check, in steps, so that a judge's answer can come later: the patterns'
    verdict at once (`__init__`), the judges to ask (`pending`), their answers (`judged`),
    and then `finish`: refuse, mask in place, or count."""

    __slots__ = ("guard", "endpoint", "slots", "texts", "verdict")

    def __init__(self, guard: Guard, endpoint: Endpoint, data: dict[str, Any]):
        self.guard = guard
        self.endpoint = endpoint
        self.slots = prompt_slots(endpoint, data)
        self.texts = [slot.text.encode("utf-8", "surrogatepass") for slot in self.slots]
        self.verdict: Verdict = guard.inspect(self.texts)

    def pending(self) -> list[tuple[int, JudgeSpec]]:
        """The rules whose judge must still be asked (none once the request is blocked anyway)."""
        rules = self.guard.rules
        return [(r, spec) for r in self.guard.needs_judge(self.verdict) if (spec := rules[r].judge) is not None]

    def rebind(self, data: dict[str, Any]) -> None:
        """The same body parsed again (once its judges answered): where its strings are now, for
        `finish` to mask them in place. Its texts, and so the verdict, are the same."""
        self.slots = prompt_slots(self.endpoint, data)

    def prompt_text(self) -> str:
        """What a judge is shown: every prompt string, in order."""
        return "\n\n".join(slot.text for slot in self.slots)

    def judged(self, rule: int, judgement: Judgement, metrics: ProtectionMetrics | None = None) -> None:
        spec = self.guard.rules[rule].judge
        assert spec is not None
        if metrics is not None:
            decided = self.guard.rules[rule]
            metrics.count(metrics.judged, decided.policy, decided.name, judgement.value)
        failed = judgement not in (Judgement.SENSITIVE, Judgement.CLEAN)
        self.verdict = self.guard.judged_by(self.verdict, rule, spec.decides(judgement), failed)

    def finish(self, metrics: ProtectionMetrics) -> bytes:
        """Refuse (raises the refusal), or mask the body's strings in place; count; return the
        metadata entries for the access log (empty when nothing was found)."""
        verdict = self.verdict
        if verdict.action is None:
            return b""
        rules = self.guard.rules
        for hit in verdict.hits:
            rule = rules[hit.rule]
            metrics.count(metrics.found, rule.policy, rule.name, hit.detector, rule.action.label, by=hit.times)
        decided = verdict.rule
        assert decided is not None
        action = verdict.action.label
        metrics.count(metrics.requests, decided.policy, decided.name, action)
        detectors = ",".join(sorted({hit.detector for hit in verdict.hits}))
        entries = (("data_policy", decided.policy), ("data_rule", decided.name), ("data_action", action),
                   ("data_detectors", detectors))
        if verdict.action is Action.BLOCK:
            refusal = verdict.refusal()
            refusal.metadata = entries
            raise refusal
        if verdict.action is Action.MASK:
            for slot, text in zip(self.slots, self.guard.masked_texts(self.texts, verdict), strict=True):
                if text is not None:
                    slot.holder[slot.key] = text.decode("utf-8", "surrogatepass")
        return b"".join(wire.string_entry(key, value) for key, value in entries)


class Judging(Exception):  # noqa: N818 (not an error: the check goes on once its judges answered)
    """Raised out of the body's rewrite where a rule's judge must be asked: the processor asks it
    (`extproc.dataplane.judge_client`, each with its timeout), answers the body's message later
    (`extproc.dataplane.deferred`), and rewrites the body again with the judged check."""

    def __init__(self, check: PromptCheck):
        super().__init__("a data policy's judge is to be asked")
        self.check = check
