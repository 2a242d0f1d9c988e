"""A checked answer (`responses.check`), fed as Envoy's answer filter sends it: JSON whole, and
server-sent events chunk by chunk however the chunks cut them. Values split across events are
caught, the text comes out as it is released (never more than the longest match held back),
what was held comes out with its choice's end, a block ends the stream with `content_filter` and
an error event, and nothing found is ever in an answer's error, its metadata or a metric."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from extproc.dataplane import answer_check
from extproc.dataplane.answer_check import AnswerCheck
from extproc.dataplane.data_protection import ProtectionMetrics
from extproc.errors import GatewayError
from extproc.policy.data_protection.detectors import BUILTINS
from extproc.policy.data_protection.policy import Action, DataRule, Guard

CARD, EMAIL, SECRET = "4111 1111 1111 1111", "jane.roe@example.com", "sk-live-0123456789abcdefABCDEF0123"
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def guard(block: bool = True) -> Guard:
    rules = [DataRule("default/p", "cards-and-mail", Action.MASK, ("bank-card", "email"),
                      BUILTINS["bank-card"] + BUILTINS["email"], answers=True),
             DataRule("default/p", "addresses", Action.LOG, ("ipv4",), BUILTINS["ipv4"], answers=True)]
    if block:
        rules.insert(1, DataRule("default/p", "credentials", Action.BLOCK, ("secret",), BUILTINS["secret"],
                                 answers=True))
    return Guard(tuple(rules))


def check(block: bool = True) -> tuple[AnswerCheck, CollectorRegistry]:
    registry = CollectorRegistry()
    return AnswerCheck(guard(block), ProtectionMetrics(registry)), registry


def event(content: str | None = None, finish: str | None = None, index: int = 0, **delta) -> bytes:
    if content is not None:
        delta["content"] = content
    return b"data: " + json.dumps({**HEAD, "choices": [{"index": index, "delta": delta,
                                                          "finish_reason": finish}]}).encode() + b"\n\n"


def words(text: str) -> list[bytes]:
    """A reply streamed as the fake provider does: a word (and its space) per event."""
    return [event(word + " ") for word in text.split()]


def parse(out: bytes) -> list:
    blocks = [b for b in out.decode().split("\n\n") if b]
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


def content(events: list, index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict)
                   for c in e.get("choices", []) if c["index"] == index)


def samples(registry, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in registry.collect() for s in f.samples
            if s.name == name}


def test_a_card_split_across_events_is_masked_and_the_text_comes_as_it_is_released():
    checked, _ = check()
    reply = "x " * 200 + f"pay {CARD} now, or mail {EMAIL} later"
    hold = checked.guard.scanner.hold
    out, fed = b"", 0
    for piece in words(reply):
        out += checked.feed(piece, False)
        fed += len(json.loads(piece[6:])["choices"][0]["delta"]["content"])
        released = len(content(parse(out)))
        # incremental: everything but the last `hold` bytes is out (a masked value counts as its placeholder)
        assert fed - hold - len(CARD) - len(EMAIL) <= released <= fed
    out += checked.feed(event(finish="stop") + b"data: [DONE]\n\n", True)
    events = parse(out)
    assert content(events) == "x " * 200 + "pay [BANK-CARD] now, or mail [EMAIL] later "
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(e["id"] == "chatcmpl-1" for e in events[:-1])  # each event went on, with its own head
    assert len(events) == len(words(reply)) + 2  # one event out per event in


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_however_envoy_cuts_the_chunks_the_answer_is_the_same(size):
    reply = f"the card {CARD} and the address 10.1.2.3, mail {EMAIL}, 中文字符 as well"
    stream = b"".join([*words(reply), event(finish="stop"), b"data: [DONE]\n\n"])
    whole, _ = check()
    expected = parse(whole.feed(stream, True))
    cut, _ = check()
    pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
    out = b"".join(cut.feed(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))
    assert content(parse(out)) == content(expected) == "the card [BANK-CARD] and the address 10.1.2.3, mail " \
                                                         "[EMAIL], 中文字符 as well "


def test_a_character_the_hold_cuts_in_two_comes_out_whole():
    checked, _ = check()
    text = "数据保护" * 200  # 3 bytes each: the scanner's cut falls inside characters
    out = b"".join(checked.feed(event(text[i:i + 5]), False) for i in range(0, len(text), 5))
    out += checked.feed(event(finish="stop"), True)
    assert content(parse(out)) == text


def test_a_secret_mid_stream_ends_it_with_content_filter_and_the_error_event():
    checked, registry = check()
    reply = "x " * 100 + f"the key {SECRET} is yours " + "y " * 150
    out = b"".join(checked.feed(piece, False) for piece in words(reply))
    assert checked.ended
    events = parse(out)
    assert SECRET.encode() not in out and b"sk-live" not in out and b"is yours" not in out
    assert events[-2] == {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "content_policy_violation")
    assert error["message"] == ("the answer was withheld by data policy default/p, rule credentials: detector "
                                "secret found sensitive data in the answer")
    assert content(events).startswith("x x x")
    # the provider goes on: nothing more reaches the client
    assert checked.feed(event("more text"), False) == b""
    assert checked.feed(b"data: [DONE]\n\n", True) == b""
    checked.finish()
    checked.finish()  # counted once, however often it is told
    assert samples(registry, "llm_gateway_data_policy_answers_total") == {
        (("action", "block"), ("policy", "default/p"), ("rule", "credentials")): 1.0}


def test_held_text_comes_out_with_its_choice_end_and_each_choice_and_tool_call_is_its_own_text():
    checked, _ = check()
    out = checked.feed(event("card 4111 1111 ", index=0) + event("mail jane.roe@", index=1), False)
    out += checked.feed(event("1111 1111 ok", index=0) + event(tool_calls=[
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "send", "arguments": '{"to": "jane'}}],
        index=1), False)
    out += checked.feed(event(tool_calls=[{"index": 0, "function": {"arguments": '.roe@example.com"}'}}], index=1),
                        False)
    out += checked.feed(event(finish="stop", index=0) + event("example.com", finish="tool_calls", index=1), True)
    events = parse(out)
    assert content(events, 0) == "card [BANK-CARD] ok"
    assert content(events, 1) == "mail [EMAIL]"
    arguments = "".join(call["function"].get("arguments", "") for e in events for c in e["choices"]
                        if c["index"] == 1 for call in c["delta"].get("tool_calls", []))
    assert json.loads(arguments) == {"to": "[EMAIL]"}
    finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == [(0, "stop"), (1, "tool_calls")]


def test_a_completions_stream_and_a_stream_that_ends_without_done():
    checked, _ = check()
    pieces = [b"data: " + json.dumps({"object": "text_completion", "choices": [
        {"index": 0, "text": word + " ", "finish_reason": None}]}).encode() + b"\n\n"
        for word in f"write to {EMAIL} today".split()]
    out = b"".join(checked.feed(p, False) for p in pieces) + checked.feed(b"", True)
    text = "".join(c["text"] for e in parse(out) for c in e["choices"])
    assert text == "write to [EMAIL] today "


def test_what_carries_no_text_passes_as_it_came():
    checked, _ = check()
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n'
    comment, not_json = b": keep-alive\n\n", b"data: not json\n\n"
    named = b"event: message\nid: 7\n" + event("hi")[:-2] + b"\n\n"
    out = checked.feed(usage + comment + not_json + named, True)
    assert out.startswith(usage + comment + not_json)
    assert b"event: message\nid: 7\ndata: " in out and content(parse(out.split(b"id: 7\n", 1)[1])) == "hi"


def test_an_event_without_end_past_the_bound_ends_the_stream(monkeypatch):
    monkeypatch.setattr(answer_check, "MAX_EVENT_BYTES", 1000)
    checked, _ = check()
    out = checked.feed(b"data: {" + b"x" * 2000, False)
    assert checked.ended and parse(out)[-1]["error"]["code"] == answer_check.UNREADABLE_CODE
    assert parse(out)[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert checked.feed(b"more", True) == b""


def test_the_access_log_is_told_when_the_verdict_changes_never_what_was_found():
    checked, _ = check()
    assert checked.metadata() == b""
    checked.feed(event(f"mail {EMAIL} and 10.0.0.1 "), False)
    checked.feed(event("x " * 200), False)
    told = checked.metadata()
    response = pb.ProcessingResponse.FromString(told)
    entry = json_format.MessageToDict(response.dynamic_metadata)["llm_gateway"]["data_answer"]
    assert entry == {"policy": "default/p", "rule": "cards-and-mail", "action": "mask", "detectors": "email,ipv4"}
    assert checked.metadata() == b""  # unchanged: not told again
    assert EMAIL.encode() not in told


@pytest.mark.parametrize(("reply", "outcome"), [
    pytest.param(f"pay {CARD}", "pay [BANK-CARD]", id="masked"),
    pytest.param(f"use {SECRET}", 400, id="withheld"),
    pytest.param("ping 10.0.0.1", None, id="logged-unchanged"),
    pytest.param("nothing here", None, id="clean"),
])
def test_a_json_answer(reply, outcome):
    checked, registry = check()
    answer = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": reply,
                                 "tool_calls": [{"id": "t", "type": "function",
                                                 "function": {"name": "f", "arguments": json.dumps({"r": reply})}}]},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    result = checked.json(json.dumps(answer).encode())
    if outcome is None:
        assert result is None
    elif isinstance(outcome, int):
        assert isinstance(result, GatewayError) and result.status == outcome
        assert SECRET not in result.body().decode() and result.code == "content_policy_violation"
    else:
        assert isinstance(result, bytes)
        masked = json.loads(result)
        assert masked["choices"][0]["message"]["content"] == outcome
        assert json.loads(masked["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"r": outcome}
        assert masked["usage"] == answer["usage"]
    checked.finish()
    assert all(reply.split()[-1] not in str(labels) for labels in samples(
        registry, "llm_gateway_data_policy_answer_detections_total"))


def test_a_json_answer_that_is_not_one_passes():
    checked, _ = check()
    assert checked.json(b"not json") is None
    assert checked.json(b"[1, 2]") is None
    assert checked.json(b'{"object": "list", "data": []}') is None


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_events_ended_by_crlf_lines(size):
    stream = b"".join(piece.replace(b"\n\n", b"\r\n\r\n") for piece in words(f"mail {EMAIL} now"))
    stream += b"data: [DONE]\r\n\r\n"
    checked, _ = check()
    pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
    out = b"".join(checked.feed(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))
    assert content(parse(out.replace(b"\r\n", b"\n"))) == "mail [EMAIL] now "
    assert out.endswith(b"data: [DONE]\r\n\r\n")
