"""Which data-protection rules apply to a request, and which action wins. Pure decisions.

An `LLMDataPolicy` applies to the routes its `hosts` name (all routes when it names none) and,
in Kubernetes, to the requests of workloads in its own namespace; a policy in the control
plane's namespace (and every policy read from files) applies to every workload. All policies
that apply are merged, per route and caller namespace, into one `Guard`, compiled once per
config: one scanner over all their detectors (a built-in used by two rules is scanned once).

Per request the guard scans the prompt's texts and decides: every rule whose detectors found
something (or whose judge said YES) matched; the most severe action among them wins (block >
mask > log). A block names its rule and detector, never what was found; a mask replaces each
value found by a masking rule's detector with that detector's placeholder; a log is counted.

Answers (`responses.check`) are checked by the guard's `answers`: the pattern rules of the
policies that check answers (a judge is asked about prompts only), with the same actions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ...errors import GatewayError
from .detectors import Pattern
from .judge import JudgeSpec
from .scanner import Found, Scanner, masked

CODE = "content_policy_violation"  # OpenAI's own code for a refused prompt
JUDGE_UNAVAILABLE_CODE = "data_policy_judge_unavailable"
JUDGE = "judge"  # the detector name a judge's finding is counted under
# A streamed answer a block ended: the finish reason of its choices (OpenAI's own, for its filters)
CONTENT_FILTER = "content_filter"


class Action(enum.IntEnum):
    """By severity: the highest of the matching rules' actions wins."""

    LOG = 1
    MASK = 2
    BLOCK = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DataRule:
    policy: str  # "namespace/name" of the LLMDataPolicy
    name: str  # the rule's name, or "rules[i]"
    action: Action
    detectors: tuple[str, ...]  # their names, as written (a judge is "judge")
    patterns: tuple[Pattern, ...]  # what its pattern detectors look for
    judge: JudgeSpec | None = None
    answers: bool = False  # its policy also checks answers (`responses.check`)


class Hit(NamedTuple):
    rule: int  # index into the guard's rules
    detector: str
    times: int  # values found (a judge's YES counts one)


@dataclass
class Verdict:
    """What one request's prompt got: the winning action (None: nothing found), the rule that
    decided it (the first rule with that action) and its first detector that found something,
    every rule's hits (for metrics), and what each text had found in it."""

    action: Action | None
    rule: DataRule | None
    detector: str | None
    hits: list[Hit]
    found: list[list[Found]]
    judge_failed: bool = False  # the deciding finding is a judge that could not answer (failOpen: false)

    def refusal(self) -> GatewayError:
        """The answer to a blocked request: names the policy, rule and detector, nothing found."""
        assert self.rule is not None
        where = f"data policy {self.rule.policy}, rule {self.rule.name}"
        if self.judge_failed:
            return GatewayError(503, f"the request was refused by {where}: its judge could not decide in time and "
                                     "the rule fails closed (failOpen: false)", JUDGE_UNAVAILABLE_CODE, "server_error")
        return GatewayError(400, f"the request was refused by {where}: detector {self.detector} found sensitive data "
                                 "in the prompt", CODE, "invalid_request_error")

    def answer_refusal(self) -> GatewayError:
        """What replaces a blocked answer (a JSON answer's whole body, a stream's error event): names
        the policy, rule and detector, nothing found. A 400, as for a prompt: the same request would
        get the same answer again, so a client must not retry it as it is (a 5xx would be retried)."""
        assert self.rule is not None
        return GatewayError(400, f"the answer was withheld by data policy {self.rule.policy}, rule {self.rule.name}: "
                                 f"detector {self.detector} found sensitive data in the answer", CODE,
                            "invalid_request_error")


@dataclass(frozen=True, eq=False)
class Guard:
    """The rules that apply to one route for one caller namespace, with their scanner."""

    rules: tuple[DataRule, ...]
    scanner: Scanner = field(init=False)
    owners: tuple[tuple[int, ...], ...] = field(init=False)  # per pattern: the rules looking for it
    judged: tuple[int, ...] = field(init=False)  # rules with a judge
    masking: frozenset[int] = field(init=False)  # patterns a masking rule looks for
    blocking: frozenset[int] = field(init=False)  # patterns a blocking rule looks for
    answers: Guard | None = field(init=False)  # what answers are checked against (None: they are not)

    def __post_init__(self) -> None:
        patterns: list[Pattern] = []
        index: dict[Pattern, int] = {}
        owners: list[list[int]] = []
        for r, rule in enumerate(self.rules):
            for pattern in rule.patterns:
                if pattern not in index:
                    index[pattern] = len(patterns)
                    patterns.append(pattern)
                    owners.append([])
                if r not in owners[index[pattern]]:
                    owners[index[pattern]].append(r)
        object.__setattr__(self, "scanner", Scanner(patterns))
        object.__setattr__(self, "owners", tuple(tuple(o) for o in owners))
        object.__setattr__(self, "judged", tuple(r for r, rule in enumerate(self.rules) if rule.judge is not None))
        object.__setattr__(self, "masking", frozenset(i for i, rules in enumerate(owners)
                                                      if any(self.rules[r].action is Action.MASK for r in rules)))
        object.__setattr__(self, "blocking", frozenset(i for i, rules in enumerate(owners)
                                                       if any(self.rules[r].action is Action.BLOCK for r in rules)))
        checked = tuple(rule for rule in self.rules if rule.answers and rule.patterns)
        answers = None if not checked else self if checked == self.rules else Guard(checked)
        object.__setattr__(self, "answers", answers)

    def inspect(self, texts: Sequence[bytes]) -> Verdict:
        """The verdict of the pattern detectors on the prompt's texts (judges are asked apart)."""
        find = self.scanner.find
        found = [find(text) for text in texts]
        counts: dict[tuple[int, str], int] = {}
        patterns = self.scanner.patterns
        for per_text in found:
            for f in per_text:
                detector = patterns[f.pattern].detector
                for r in self.owners[f.pattern]:
                    counts[(r, detector)] = counts.get((r, detector), 0) + 1
        hits = [Hit(r, d, n) for (r, d), n in counts.items()]
        return self._decided(hits, found)

    def judged_by(self, verdict: Verdict, rule: int, sensitive: bool, failed: bool) -> Verdict:
        """The verdict once the judge of `rule` answered (`sensitive`: its rule's action applies,
        a YES or a failure that fails closed; `failed`: it could not answer)."""
        if not sensitive:
            return verdict
        decided = self._decided([*verdict.hits, Hit(rule, JUDGE, 1)], verdict.found)
        if failed and decided.rule is self.rules[rule] and decided.detector == JUDGE:
            decided.judge_failed = True
        return decided

    def needs_judge(self, verdict: Verdict) -> tuple[int, ...]:
        """The rules whose judge must be asked: none once the request is blocked anyway."""
        if verdict.action is Action.BLOCK:
            return ()
        return self.judged

    def verdict(self, hits: list[Hit]) -> Verdict:
        """The verdict on what was found in all (an answer's stream, counted as it comes)."""
        return self._decided(hits, [])

    def _decided(self, hits: list[Hit], found: list[list[Found]]) -> Verdict:
        if not hits:
            return Verdict(None, None, None, hits, found)
        action = max(self.rules[h.rule].action for h in hits)
        matched = {h.rule for h in hits}
        first = next(r for r, rule in enumerate(self.rules) if r in matched and rule.action is action)
        rule = self.rules[first]
        by_detector = {h.detector for h in hits if h.rule == first}
        detector = next(d for d in rule.detectors if d in by_detector)
        return Verdict(action, rule, detector, hits, found)

    def masked_texts(self, texts: Sequence[bytes], verdict: Verdict) -> list[bytes | None]:
        """Each text with the values masking rules found replaced by their placeholders; None
        where nothing in it is masked (the text goes on as it was)."""
        masking = self.masking
        placeholders = [p.placeholder for p in self.scanner.patterns]
        out: list[bytes | None] = []
        for text, per_text in zip(texts, verdict.found, strict=True):
            masks = [f for f in per_text if f.pattern in masking]
            out.append(masked(text, masks, placeholders) if masks else None)
        return out


@dataclass(frozen=True)
class RouteGuards:
    """One route's guards: for a caller of any namespace (`everyone`: files' policies and those in
    the control plane's namespace), and per namespace with policies of its own (merged with those)."""

    everyone: Guard | None
    by_namespace: Mapping[str, Guard] = field(default_factory=dict)
    local: Guard | None = None  # the gateway's own Envoy (no namespace): every policy of the route


@dataclass(frozen=True)
class ProtectionTable:
    by_route: Mapping[str, RouteGuards] = field(default_factory=dict)

    def guard(self, route: str, namespace: str | None) -> Guard | None:
        guards = self.by_route.get(route)
        if guards is None:
            return None
        if namespace is None:
            return guards.local
        return guards.by_namespace.get(namespace, guards.everyone)


EMPTY_PROTECTION = ProtectionTable()
