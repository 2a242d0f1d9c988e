"""Which requests need their answer processed (the client's format may differ from what a provider
sends), and which conversion an answer needs: table tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extproc.policy.answer_format import (
    CHECK_STREAM,
    CHECK_WHOLE,
    EVENTS_TO_JSON,
    JSON_TO_EVENTS,
    AnswerPlan,
    answer_plan,
    check_mode,
    conversion,
)
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS
from extproc.policy.table import Failover, RetryPolicy
from support.table_parts import target

FREE, STREAMS, JSON_ONLY = target("free"), replace(target("sse"), stream=True), replace(target("json"), stream=False)


def failover(*order):
    return Failover(RetryPolicy(1, None, ("5xx",), ()), (tuple(order),))


@pytest.mark.parametrize(("endpoint", "first", "retry", "client_stream", "planned"), [
    pytest.param(CHAT, FREE, None, True, False, id="no-config-stream"),
    pytest.param(CHAT, FREE, None, False, False, id="no-config-stream-json"),
    pytest.param(CHAT, JSON_ONLY, None, False, False, id="forced-as-asked-json"),
    pytest.param(CHAT, STREAMS, None, True, False, id="forced-as-asked-stream"),
    pytest.param(CHAT, JSON_ONLY, None, True, True, id="stream-asked-json-forced"),
    pytest.param(CHAT, STREAMS, None, False, True, id="json-asked-stream-forced"),
    pytest.param(CHAT, FREE, failover(FREE, JSON_ONLY), True, True, id="a-retry-may-answer-json"),
    pytest.param(CHAT, FREE, failover(FREE, STREAMS), False, True, id="a-retry-may-stream"),
    pytest.param(CHAT, FREE, failover(FREE, JSON_ONLY), False, False, id="retries-all-answer-as-asked"),
    pytest.param(CHAT, STREAMS, failover(STREAMS, FREE), True, False, id="retries-stream-as-asked"),
    pytest.param(COMPLETIONS, JSON_ONLY, None, True, False, id="completions-keep-the-clients-stream"),
    pytest.param(COMPLETIONS, FREE, failover(FREE, STREAMS), False, False, id="completions-retries-too"),
    pytest.param(EMBEDDINGS, STREAMS, None, False, False, id="embeddings-never-stream"),
])
def test_answer_plan(endpoint, first, retry, client_stream, planned):
    plan = answer_plan(endpoint, first, retry, client_stream, include_usage=client_stream)
    assert plan == (AnswerPlan(client_stream, client_stream) if planned else None)


@pytest.mark.parametrize(("client_stream", "status", "content_type", "expected"), [
    pytest.param(True, 200, "application/json", JSON_TO_EVENTS, id="json-to-a-streaming-client"),
    pytest.param(True, 200, "application/json; charset=utf-8", JSON_TO_EVENTS, id="json-with-parameters"),
    pytest.param(False, 200, "text/event-stream", EVENTS_TO_JSON, id="events-to-a-json-client"),
    pytest.param(False, 200, "Text/Event-Stream;charset=UTF-8", EVENTS_TO_JSON, id="events-any-case"),
    pytest.param(True, 200, "text/event-stream", None, id="already-a-stream"),
    pytest.param(False, 200, "application/json", None, id="already-json"),
    pytest.param(True, 429, "application/json", None, id="an-error-stays-json"),
    pytest.param(True, 500, "application/json", None, id="a-5xx-stays-json"),
    pytest.param(False, 404, "text/event-stream", None, id="no-conversion-of-errors"),
    pytest.param(True, 200, "text/plain", None, id="another-kind-passes"),
    pytest.param(True, 200, "", None, id="no-content-type-passes"),
])
def test_conversion(client_stream, status, content_type, expected):
    assert conversion(client_stream, status, content_type) == expected


@pytest.mark.parametrize(("endpoint", "first", "retry", "client_stream", "planned"), [
    pytest.param(CHAT, FREE, None, True, True, id="chat-stream"),
    pytest.param(CHAT, FREE, None, False, True, id="chat-json"),
    pytest.param(CHAT, JSON_ONLY, None, True, True, id="converted-and-checked"),
    pytest.param(CHAT, FREE, failover(FREE, STREAMS), False, True, id="with-retries"),
    pytest.param(COMPLETIONS, FREE, None, True, True, id="completions"),
    pytest.param(EMBEDDINGS, FREE, None, False, False, id="embeddings-carry-no-text"),
])
def test_answer_plan_of_a_checked_answer(endpoint, first, retry, client_stream, planned):
    """A data policy checks the answer (`responses.check`): planned, whatever the formats."""
    plan = answer_plan(endpoint, first, retry, client_stream, include_usage=False, check=True)
    assert plan == (AnswerPlan(client_stream, False, True) if planned else None)


@pytest.mark.parametrize(("client_stream", "status", "content_type", "expected"), [
    pytest.param(True, 200, "text/event-stream; charset=utf-8", CHECK_STREAM, id="a-stream-read-as-one"),
    pytest.param(False, 200, "application/json", CHECK_WHOLE, id="json"),
    pytest.param(True, 200, "application/json", CHECK_WHOLE, id="json-converted-to-events"),
    pytest.param(False, 200, "text/event-stream", CHECK_WHOLE, id="events-converted-to-json"),
    pytest.param(True, 400, "application/json", None, id="an-error-passes"),
    pytest.param(True, 200, "text/plain", None, id="not-a-models-answer"),
])
def test_check_mode(client_stream, status, content_type, expected):
    assert check_mode(client_stream, status, content_type, conversion(client_stream, status, content_type)) == expected
