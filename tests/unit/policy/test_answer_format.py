"""Which requests need their answer processed (the client's format may differ from what a provider
sends), and which conversion an answer needs: table tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extproc.policy.answer_format import (
    CHECK_REFUSED,
    CHECK_STREAM,
    CHECK_WHOLE,
    EVENTS_TO_JSON,
    JSON_TO_EVENTS,
    OBSERVE_STREAM,
    OBSERVE_WHOLE,
    TRANSLATE_STREAM,
    TRANSLATE_WHOLE,
    AnswerPlan,
    answer_plan,
    check_mode,
    conversion,
    per_attempt,
)
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES
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
    assert plan == (AnswerPlan(client_stream, False, check=True) if planned else None)


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


# --- across APIs (docs/translation.md) ---------------------------------------------------------------

CLAUDE = replace(target("claude"), api="anthropic")
AZURE = replace(target("azure"), api="azure")


def mixed(*order):
    return Failover(RetryPolicy(1, None, ("5xx",), ()), (tuple(order),), frozenset(t.body_api for t in order))


@pytest.mark.parametrize(("endpoint", "first", "retry", "planned"), [
    pytest.param(CHAT, CLAUDE, None, AnswerPlan(False, False), id="a-provider-of-another-api"),
    pytest.param(MESSAGES, FREE, None, AnswerPlan(False, False, "anthropic"), id="a-client-of-another-api"),
    pytest.param(MESSAGES, CLAUDE, None, AnswerPlan(False, False, "anthropic"), id="anthropic-both-ends-usage-read"),
    pytest.param(CHAT, AZURE, None, None, id="azure-speaks-openai"),
    pytest.param(CHAT, FREE, mixed(FREE, CLAUDE), AnswerPlan(False, False), id="a-fallback-of-another-api"),
    pytest.param(CHAT, FREE, mixed(FREE, AZURE), None, id="an-azure-fallback"),
])
def test_answer_plan_across_apis(endpoint, first, retry, planned):
    assert answer_plan(endpoint, first, retry, False, False) == planned


@pytest.mark.parametrize(("endpoint", "order", "each"), [
    (CHAT, (FREE, AZURE), False), (CHAT, (FREE, CLAUDE), True), (CHAT, (CLAUDE, CLAUDE), True),
    (MESSAGES, (FREE, FREE), True), (MESSAGES, (CLAUDE,), True),
])
def test_which_requests_translate_every_attempt(endpoint, order, each):
    assert per_attempt(endpoint, mixed(*order)) is each


@pytest.mark.parametrize(("client_stream", "status", "content_type", "client", "provider", "expected"), [
    (True, 200, "text/event-stream", "openai", "anthropic", TRANSLATE_STREAM),
    (True, 200, "application/vnd.amazon.eventstream", "openai", "bedrock", TRANSLATE_STREAM),
    (False, 200, "text/event-stream", "openai", "gemini", TRANSLATE_WHOLE),  # a stream into one answer
    (True, 200, "application/json", "anthropic", "openai", TRANSLATE_WHOLE),  # one answer into a stream
    (False, 200, "application/json; charset=utf-8", "openai", "anthropic", TRANSLATE_WHOLE),
    (True, 429, "application/json", "openai", "anthropic", TRANSLATE_WHOLE),  # its error, into OpenAI's
    (True, 200, "text/event-stream", "anthropic", "anthropic", OBSERVE_STREAM),
    (False, 200, "application/json", "anthropic", "anthropic", OBSERVE_WHOLE),
    (False, 529, "application/json", "anthropic", "anthropic", None),  # already the client's error
    (False, 200, "text/event-stream", "openai", "openai", EVENTS_TO_JSON),
])
def test_conversion_across_apis(client_stream, status, content_type, client, provider, expected):
    assert conversion(client_stream, status, content_type, client, provider) == expected


@pytest.mark.parametrize(("endpoint", "first", "planned"), [
    pytest.param(CHAT, CLAUDE, AnswerPlan(False, False, "openai", True), id="a-provider-of-another-api-checked"),
    pytest.param(EMBEDDINGS, CLAUDE, AnswerPlan(False, False, "openai", False), id="embeddings-carry-no-text"),
])
def test_a_checked_answer_across_apis_is_checked_in_openais_shape(endpoint, first, planned):
    assert answer_plan(endpoint, first, None, False, False, check=True) == planned


def test_a_client_of_another_api_is_refused_where_answers_are_checked():
    """Its answer would be in Anthropic's shape, which the check does not read: never unchecked."""
    with pytest.raises(type(CHECK_REFUSED)) as refused:
        answer_plan(MESSAGES, FREE, None, False, False, check=True)
    assert refused.value is CHECK_REFUSED and refused.value.status == 400
