"""Admission by memory in the ext_proc: a body that would pass the cap on body bytes held at once
is refused before its bytes are held, and every stream gives back what it held."""

from __future__ import annotations

import pytest

from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.body_memory import Inflight
from extproc.policy.table import TableHolder
from support.ext_proc_messages import body_msg, error_of, headers_msg
from support.manifests import DASHSCOPE


@pytest.fixture(scope="module")
def seed_table():
    from support.manifests import load_seed

    return load_seed("01-LLMProvider.yaml").table


def body_of_size(size: int) -> bytes:
    body = b'{"messages": [{"role": "user", "content": ""}]}'
    return body[:-3] + b" " * (size - len(body)) + body[-3:]


def test_a_body_that_would_pass_the_cap_gets_503_before_its_bytes_and_smaller_ones_flow(seed_table):
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: 0.0, body_limit=1000, inflight=Inflight(1000))
    big = proc.exchange()
    assert big.on_request(headers_msg(DASHSCOPE, extra={"content-length": "700"})) == ([], False)
    assert proc.inflight.held == 700

    refused = proc.exchange()
    answers, done = refused.on_request(headers_msg(DASHSCOPE, extra={"content-length": "400"}))
    assert done  # answered at the headers: its body is never held
    status, error, headers, details = error_of(answers[0])
    assert (status, error["error"]["code"], error["error"]["type"]) == (503, "overloaded", "server_error")
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert details == "llm_gateway_overloaded"
    refused.on_close()

    small = proc.exchange()
    assert small.on_request(headers_msg(DASHSCOPE, extra={"content-length": "300"})) == ([], False)
    answers, done = small.on_request(body_msg(body_of_size(300)))
    assert done and answers[0].WhichOneof("response") == "request_headers"
    small.on_close()

    assert (proc.inflight.held, proc.inflight.refused, proc.inflight.streams) == (700, 1, 1)
    big.on_close()
    big.on_close()  # once only, however many times the server says so
    assert (proc.inflight.held, proc.inflight.streams) == (0, 0)


def test_a_body_without_length_is_counted_as_it_arrives(seed_table):
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: 0.0, body_limit=1000, inflight=Inflight(1000))
    holder = proc.exchange()
    holder.on_request(headers_msg(DASHSCOPE))
    holder.on_request(body_msg(b" " * 600, end_of_stream=False))
    assert proc.inflight.held == 600
    chunked = proc.exchange()
    chunked.on_request(headers_msg(DASHSCOPE))
    assert chunked.on_request(body_msg(b" " * 300, end_of_stream=False)) == ([], False)
    answers, done = chunked.on_request(body_msg(b" " * 200, end_of_stream=False))
    assert done and error_of(answers[0])[0] == 503
    chunked.on_close()
    holder.on_close()
    assert proc.inflight.held == 0
