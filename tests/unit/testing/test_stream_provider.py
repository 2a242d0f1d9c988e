"""The stream provider the concurrency tests and benches stand on: as strict as the real API
(key, path, body), a stream's plan from its request, and the hold the tests release."""

from __future__ import annotations

import asyncio
import json

import pytest

from extproc.testing.stream_provider import Answer, StreamProvider

KEY = "sk-test"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), [
    pytest.param("POST", "/v1/chat/completions", {}, CHAT, 401, "invalid_api_key", id="no-key"),
    pytest.param("POST", "/v1/chat/completions", {"authorization": "Bearer sk-other"}, CHAT, 401, "invalid_api_key",
                 id="wrong-key"),
    pytest.param("POST", "/v1/embeddings", AUTH, CHAT, 404, "unknown_url", id="other-path"),
    pytest.param("GET", "/v1/chat/completions", AUTH, b"", 404, "unknown_url", id="get"),
    pytest.param("POST", "/v1/chat/completions", AUTH, b"{not json", 400, "invalid_json", id="not-json"),
    pytest.param("POST", "/v1/chat/completions", AUTH, b'{"messages": []}', 400, "invalid_request", id="no-model"),
    pytest.param("POST", "/v1/chat/completions", AUTH, b'{"model": "m"}', 400, "invalid_request", id="no-messages"),
])
def test_refuses_as_the_real_api_does(method, path, headers, body, status, code):
    provider = StreamProvider(api_key=KEY)
    answer = provider.answer(method, path, headers, body)
    assert answer.status == status and not answer.stream
    assert json.loads(answer.body)["error"]["code"] == code
    assert provider.counts.refused == 1


def test_a_stream_is_planned_from_the_request():
    answer = StreamProvider(api_key=KEY).answer("POST", "/compatible-mode/v1/chat/completions",
                                                {**AUTH, "x-events": "3", "x-pace-ms": "250", "x-hold-after": "1"},
                                                CHAT)
    assert (answer.status, answer.stream, answer.events, answer.pace_s, answer.hold_after, answer.model) == (
        200, True, 3, 0.25, 1, "m")
    event = StreamProvider.event(0, answer)
    assert json.loads(event[len(b"data: "):])["model"] == "m"
    tail = StreamProvider.tail(answer)
    assert b'"completion_tokens":3' in tail and tail.endswith(b"data: [DONE]\n\n")


def test_without_stream_one_json_completion():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    answer = StreamProvider().answer("POST", "/v1/chat/completions", {}, body)  # no key configured: none checked
    assert answer.status == 200 and not answer.stream
    assert json.loads(answer.body)["choices"][0]["message"]["role"] == "assistant"


def test_a_held_stream_waits_for_release_and_stats_count_it():
    provider = StreamProvider()
    plan = Answer(events=3, pace_s=0, hold_after=1, stream=True, model="m")

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def stream() -> None:
            for i in range(plan.events):
                await provider.pace(i, plan)
                seen.append(f"event {i}")

        task = asyncio.ensure_future(stream())
        await asyncio.sleep(0.05)
        seen.append("held")  # only the first event went out
        assert json.loads(provider.answer("POST", "/release", {}, b"").body) == {}
        await task
        return seen

    assert asyncio.run(scenario()) == ["event 0", "held", "event 1", "event 2"]
    stats = json.loads(provider.answer("GET", "/stats", {}, b"").body)
    assert stats == {"open": 0, "peak": 0, "answered": 0, "refused": 0}  # counted by the servers, per stream
