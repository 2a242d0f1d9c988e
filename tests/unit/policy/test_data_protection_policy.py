"""Which rules match, which action wins, what a block says and what a mask writes, where a
prompt can hide, and how a judge's answer (or its failure) changes the verdict."""

from __future__ import annotations

import pytest

from extproc.policy.data_protection.detectors import BUILTINS, regex_pattern
from extproc.policy.data_protection.judge import Judgement, JudgeSpec
from extproc.policy.data_protection.policy import Action, DataRule, Guard
from extproc.policy.data_protection.prompts import prompt_slots
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES

EMAIL, CARD, SECRET = "jane@example.com", "4111 1111 1111 1111", "sk-0123456789abcdef0123456789abcdef"


def rule(name: str, action: Action, *detectors: str, policy: str = "default/p", judge: JudgeSpec | None = None):
    patterns = tuple(p for d in detectors if d in BUILTINS for p in BUILTINS[d])
    patterns += tuple(regex_pattern(d, "ACME-[0-9]{6}") for d in detectors if d == "acme")
    names = tuple(detectors) + (("judge",) if judge else ())
    return DataRule(policy, name, action, names, patterns, judge)


@pytest.mark.parametrize(("rules", "text", "action", "decided", "detector"), [
    # nothing found
    ([rule("r", Action.BLOCK, "secret")], "hello", None, None, None),
    # one rule
    ([rule("r", Action.MASK, "email")], f"mail {EMAIL}", Action.MASK, "r", "email"),
    # the most severe action of all matching rules wins, whatever their order
    ([rule("log", Action.LOG, "email"), rule("mask", Action.MASK, "bank-card"), rule("block", Action.BLOCK, "secret")],
     f"{EMAIL} {CARD} {SECRET}", Action.BLOCK, "block", "secret"),
    ([rule("block", Action.BLOCK, "secret"), rule("mask", Action.MASK, "bank-card"), rule("log", Action.LOG, "email")],
     f"{EMAIL} {CARD}", Action.MASK, "mask", "bank-card"),
    ([rule("log", Action.LOG, "email"), rule("mask", Action.MASK, "bank-card")], f"{EMAIL}", Action.LOG, "log",
     "email"),
    # among rules of the winning action, the first; its first detector (as written) that found something
    ([rule("a", Action.MASK, "email", "bank-card"), rule("b", Action.MASK, "bank-card")], f"{CARD} {EMAIL}",
     Action.MASK, "a", "email"),
    ([rule("a", Action.MASK, "ipv4"), rule("b", Action.MASK, "bank-card", "email")], f"{EMAIL} {CARD}",
     Action.MASK, "b", "bank-card"),
])
def test_the_most_severe_action_wins(rules, text, action, decided, detector):
    verdict = Guard(tuple(rules)).inspect([text.encode()])
    assert verdict.action is action
    assert (verdict.rule.name if verdict.rule else None) == decided
    assert verdict.detector == detector


def test_a_block_names_policy_rule_and_detector_never_the_value():
    guard = Guard((rule("credentials", Action.BLOCK, "secret", "acme", policy="team-a/no-secrets-out"),))
    verdict = guard.inspect([f"use {SECRET} for ACME-123456".encode()])
    refusal = verdict.refusal()
    assert (refusal.status, refusal.code, refusal.kind) == (400, "content_policy_violation", "invalid_request_error")
    assert refusal.message == ("the request was refused by data policy team-a/no-secrets-out, rule credentials: "
                               "detector secret found sensitive data in the prompt")
    body = refusal.body().decode()
    assert SECRET not in body and "ACME-123456" not in body and "0123456789" not in body


def test_a_mask_replaces_only_what_masking_rules_found():
    guard = Guard((rule("mask", Action.MASK, "bank-card"), rule("log", Action.LOG, "email")))
    texts = [f"{CARD} / {EMAIL}".encode(), b"nothing here", EMAIL.encode()]
    verdict = guard.inspect(texts)
    assert verdict.action is Action.MASK
    assert guard.masked_texts(texts, verdict) == [f"[BANK-CARD] / {EMAIL}".encode(), None, None]


def test_a_detector_two_rules_use_is_scanned_once_and_counted_for_both():
    guard = Guard((rule("a", Action.LOG, "email"), rule("b", Action.MASK, "email", "ipv4")))
    assert len(guard.scanner.patterns) == len(BUILTINS["email"]) + len(BUILTINS["ipv4"])
    verdict = guard.inspect([f"{EMAIL} and {EMAIL}".encode()])
    assert sorted((guard.rules[h.rule].name, h.detector, h.times) for h in verdict.hits) == [
        ("a", "email", 2), ("b", "email", 2)]


JUDGE_CLOSED = JudgeSpec("private-llm", None, 1.0, fail_open=False)
JUDGE_OPEN = JudgeSpec("private-llm", None, 1.0, fail_open=True)


@pytest.mark.parametrize(("judge", "judgement", "action", "status"), [
    (JUDGE_CLOSED, Judgement.SENSITIVE, Action.BLOCK, 400),
    (JUDGE_CLOSED, Judgement.CLEAN, Action.MASK, None),
    (JUDGE_CLOSED, Judgement.GARBAGE, Action.BLOCK, 503),
    (JUDGE_CLOSED, Judgement.TIMEOUT, Action.BLOCK, 503),
    (JUDGE_CLOSED, Judgement.UNAVAILABLE, Action.BLOCK, 503),
    (JUDGE_OPEN, Judgement.SENSITIVE, Action.BLOCK, 400),
    (JUDGE_OPEN, Judgement.GARBAGE, Action.MASK, None),
    (JUDGE_OPEN, Judgement.TIMEOUT, Action.MASK, None),
])
def test_a_judges_answer_and_its_failure_mode(judge, judgement, action, status):
    guard = Guard((rule("cards", Action.MASK, "bank-card"), rule("judged", Action.BLOCK, judge=judge)))
    verdict = guard.inspect([CARD.encode()])
    assert verdict.action is Action.MASK
    assert guard.needs_judge(verdict) == (1,)
    after = guard.judged_by(verdict, 1, judge.decides(judgement), judgement not in (Judgement.SENSITIVE,
                                                                                    Judgement.CLEAN))
    assert after.action is action
    if status is not None:
        refusal = after.refusal()
        assert refusal.status == status
        assert refusal.code == ("content_policy_violation" if status == 400 else "data_policy_judge_unavailable")
        assert "rule judged" in refusal.message


def test_no_judge_is_asked_once_the_request_is_blocked():
    guard = Guard((rule("block", Action.BLOCK, "secret"), rule("judged", Action.LOG, judge=JUDGE_CLOSED)))
    assert guard.needs_judge(guard.inspect([SECRET.encode()])) == ()
    assert guard.needs_judge(guard.inspect([b"clean"])) == (1,)


@pytest.mark.parametrize(("endpoint", "body", "paths"), [
    (CHAT, {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}},
                                     {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "assistant", "function_call": {"name": "g", "arguments": "{}"}},
        {"role": "tool", "tool_call_id": "1", "content": "result"}, "not a message"]},
     ["messages[0].content", "messages[1].content[0].text", "messages[1].content[2].text",
      "messages[2].tool_calls[0].function.arguments", "messages[3].function_call.arguments", "messages[4].content"]),
    (MESSAGES, {"system": [{"type": "text", "text": "be brief"}], "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                           "input": {"q": "card", "n": 1, "more": [{"k": "v"}]}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": [{"type": "text", "text": "result"}]},
                                     {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]},
     ["system[0].text", "messages[0].content", "messages[1].content[0].input.q",
      "messages[1].content[0].input.more[0].k", "messages[2].content[0].content[0].text"]),
    (MESSAGES, {"system": "be brief", "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "4111"}]}]},
     ["system", "messages[0].content[0].content"]),
    (COMPLETIONS, {"prompt": "say hi"}, ["prompt"]),
    (COMPLETIONS, {"prompt": ["a", "b", [1, 2]]}, ["prompt[0]", "prompt[1]"]),
    (COMPLETIONS, {"prompt": [[1, 2, 3]]}, []),
    (EMBEDDINGS, {"input": "text"}, ["input"]),
    (EMBEDDINGS, {"input": ["a", "b"]}, ["input[0]", "input[1]"]),
])
def test_every_place_a_prompt_can_hide(endpoint, body, paths):
    slots = prompt_slots(endpoint, body)
    assert [s.path for s in slots] == paths
    for slot in slots:  # a masked text is written back in place
        slot.holder[slot.key] = "[X]"
    assert all(s.text == "[X]" for s in prompt_slots(endpoint, body))
