"""What data protection (LLMDataPolicy) costs the ext_proc per request, in process
(`python -m benchmarks data-protection`): the ext_proc's two messages (headers, whole body) for
one chat request of a 4 KiB prompt, no Envoy, no network, the best of several repeats of CPU time
(the machine is shared), for:

- `none`: no policy (the route as every route without one is served);
- `builtins-clean`: a policy with every built-in detector (email, phone, china-resident-id,
  bank-card, ipv4, secret; action mask) on a prompt that holds no value;
- `builtins-ten`: the same on a prompt that holds ten values (all masked).

Issue 26's goal: every built-in on a 4 KiB prompt adds at most 40 µs per request, and a route
without a policy is unchanged (compare `none` with `python -m benchmarks work` of the revision before).

Answers (`responses.check`), CPU per streamed event:

- in process (always): the answer exchange's work per event of a checked stream, as Envoy's
  answer filter sends it (one chunk per event, a chat delta of a few bytes), with every built-in,
  on clean text (`stream_clean`) and with a value split over events every 40 (`stream_values`).
  Without `responses.check` no event reaches the ext_proc at all (the request is not marked; the
  bench checks it): 0 µs there.
- `--streams` (whole processes, the streaming benchmark of scripts/bench): the paced provider's
  streams through two `extproc up`, one whose policy checks answers and one whose policy does not;
  CPU per event of all their processes (Envoy and the ext_proc) and each event's delay.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from .measure import best_us

PROVIDER = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-bench}}}
"""
ALL_BUILTINS = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: bench}
spec:
  rules:
  - name: everything
    detectors: [{builtin: email}, {builtin: phone}, {builtin: china-resident-id}, {builtin: bank-card},
                {builtin: ipv4}, {builtin: secret}]
    action: mask
"""
PROMPT_BYTES = 4096
WORDS = ("please summarize the following report about quarterly sales figures and customer feedback in the "
         "north region with attention to churn pricing support tickets delivery times and product quality "
         "issues raised by our largest accounts during the last review meeting version 2 of the plan").split()
VALUES = ["4111 1111 1111 1111", "jane.roe@example.com", "+86 138 0013 8000", "11010519491231002X", "10.20.30.40",
          "sk-live-0123456789abcdefABCDEF012345", "5500000000000004", "li.lei@example.cn", "13912345678",
          "440304199003074510"]
N = 2000  # requests per timed loop


def prompt(values: list[str], size: int = PROMPT_BYTES, seed: int = 26) -> str:
    """English-like text of `size` bytes with `values` spread through it."""
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    for i, value in enumerate(values):
        words[(i + 1) * len(words) // (len(values) + 1)] = value
    text = " ".join(words)
    return text[:size] if not values else text[:size + 64]


def messages(text: str) -> tuple[bytes, bytes]:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    headers = {":method": "POST", ":authority": "dashscope.aliyuncs.com", ":path": "/", "content-type":
               "application/json", "user-agent": "bench", "accept": "*/*"}
    head = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])))
    body = pb.ProcessingRequest(request_body=pb.HttpBody(
        body=json.dumps({"messages": [{"role": "user", "content": text}]}).encode(), end_of_stream=True))
    return head.SerializeToString(), body.SerializeToString()


def variant_us(with_policy: bool, values: list[str], repeats: int = 7) -> tuple[float, bytes]:
    """CPU µs per request of the ext_proc's messages, and the body it forwarded (for checking)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.config.file_source import load_config
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "c.yaml"
        config.write_text(PROVIDER + (ALL_BUILTINS if with_policy else ""))
        holder = TableHolder(load_config([config], {}).table)
    processor = ExternalProcessor(holder)
    head, body = messages(prompt(values))
    ex = processor.exchange()
    ex.on_message(head)
    answers, _ = ex.on_message(body)
    forwarded = pb.ProcessingResponse.FromString(answers[-1]).request_body.response.body_mutation.body

    def exchanges() -> int:
        for _ in range(N):
            ex = processor.exchange()
            ex.on_message(head)
            ex.on_message(body)
            ex.on_close()
        return N

    return best_us(exchanges, repeats=repeats, clock=time.process_time), forwarded


STREAM_EVENTS = 400  # events per checked stream in process
ANSWERS_CHECKED = "  responses: {check: true}\n"


def _stream_chunks(values: bool) -> list[bytes]:
    """A chat answer's events as Envoy's answer filter sends them (ProcessingRequest, one per
    event): a word each, and with `values` a card number over four events every 40."""
    import orjson
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    rng = random.Random(26)
    words = [rng.choice(WORDS) + " " for _ in range(STREAM_EVENTS)]
    if values:
        for at in range(20, STREAM_EVENTS - 4, 40):
            words[at:at + 4] = ["4111 ", "1111 ", "1111 ", "1111 "]
    events = [b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                        "model": "qwen-max", "choices": [{"index": 0, "delta": {"content": w},
                                                                          "finish_reason": None}]}) + b"\n\n"
              for w in words]
    events.append(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    return [pb.ProcessingRequest(response_body=pb.HttpBody(body=e, end_of_stream=i == len(events) - 1))
            .SerializeToString() for i, e in enumerate(events)]


def streamed_us(values: bool, repeats: int = 7) -> float:
    """CPU µs per event of the answer exchange on a checked stream (every built-in, mask)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from prometheus_client import CollectorRegistry

    from extproc.config.file_source import load_config
    from extproc.dataplane.answer_check import AnswerGuards
    from extproc.dataplane.answer_exchange import AnswerProcessor
    from extproc.dataplane.data_protection import ProtectionMetrics
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    tables = {}
    for checked in (False, True):
        with tempfile.TemporaryDirectory() as work:
            config = Path(work) / "c.yaml"
            config.write_text(PROVIDER + ALL_BUILTINS + (ANSWERS_CHECKED if checked else ""))
            tables[checked] = load_config([config], {}).table
    # without responses.check the request is not marked: its answer never reaches the ext_proc
    head, body = messages(prompt([]))
    for checked, table in tables.items():
        ex = ExternalProcessor(TableHolder(table)).exchange()
        ex.on_message(head)
        answers, _ = ex.on_message(body)
        marked = b"check_answer" in answers[0]
        if marked is not checked:
            raise RuntimeError(f"a request {'with' if checked else 'without'} responses.check was "
                               f"{'not ' if checked else ''}marked for its answer to be checked")
    headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream")])))
    headers.metadata_context.filter_metadata["llm_gateway"].update(
        {"route": "default/p", "client_stream": True, "check_answer": True})
    head_message = headers.SerializeToString()
    chunks = _stream_chunks(values)
    answer = AnswerProcessor(guards=AnswerGuards(TableHolder(tables[True]), ProtectionMetrics(CollectorRegistry())))
    out = b""
    ex = answer.exchange()
    ex.on_message(head_message)
    for chunk in chunks:
        out += pb.ProcessingResponse.FromString(ex.on_message(chunk)[0][0]).response_body.response.body_mutation.body
    if (b"[BANK-CARD]" in out) is not values or b"4111" in out or not out.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError("the bench's stream was not checked as expected")

    def streams() -> int:
        for _ in range(5):
            ex = answer.exchange()
            ex.on_message(head_message)
            for chunk in chunks:
                ex.on_message(chunk)
            ex.on_close()
        return 5 * len(chunks)

    return best_us(streams, repeats=repeats, clock=time.process_time)


def measure(repeats: int = 7) -> dict[str, float]:
    none, plain = variant_us(False, [], repeats)
    clean, clean_body = variant_us(True, [], repeats)
    ten, ten_body = variant_us(True, VALUES, repeats)
    if clean_body != plain or b"[BANK-CARD]" not in ten_body or any(v.encode() in ten_body for v in VALUES):
        raise RuntimeError("the bench's requests were not checked as expected (clean unchanged, ten values masked)")
    return {"none_us": none, "builtins_clean_us": clean, "builtins_ten_us": ten,
            "added_clean_us": clean - none, "added_ten_us": ten - none,
            "stream_clean_us_per_event": streamed_us(False, repeats),
            "stream_values_us_per_event": streamed_us(True, repeats),
            "stream_unchecked_us_per_event": 0.0}


CHECKED_PACED_POLICY = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: bench}
spec:
  hosts: [PACED]
  rules:
  - name: everything
    detectors: [{builtin: email}, {builtin: phone}, {builtin: china-resident-id}, {builtin: bank-card},
                {builtin: ipv4}, {builtin: secret}]
    action: mask
"""


def streams_under_load(rounds: int, repeats: int, streams: int, events: int, pace_ms: int) -> dict:
    """Whole processes: the paced provider's streams through a gateway whose policy checks answers
    and one whose policy does not (the same rules, on prompts only); CPU per event of each."""
    from . import streams as streaming
    from .contenders import HOST, PACED_HOST, PACED_PROVIDER_YAML, Stage, start_gateway, start_paced_provider

    with Stage("llm-gateway-bench-data-protection-") as stage:
        paced = start_paced_provider(stage)
        policy = CHECKED_PACED_POLICY.replace("PACED", PACED_HOST)
        contenders = {}
        for name, text in (("unchecked", policy), ("checked", policy + ANSWERS_CHECKED)):
            config = stage.config_dir(f"config-{name}", ("02-paced.yaml", PACED_PROVIDER_YAML),
                                      ("10-policy.yaml", text))
            contenders[name] = start_gateway(stage, name, config, resolve={HOST: stage.fake_port, PACED_HOST: paced})
        for c in contenders.values():
            stage.wait_serving(c)
        return streaming.streaming_benchmark(contenders, PACED_HOST, rounds, repeats, streams, events, pace_ms)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks data-protection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per variant, the best counts (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--streams", action="store_true",
                        help="also whole processes: CPU per streamed event through two gateways, answers checked "
                             "and not (the streaming benchmark's paced provider)")
    parser.add_argument("--stream-rounds", type=int, default=3, help="with --streams: rounds (default 3)")
    parser.add_argument("--streams-at-once", type=int, default=20, help="with --streams: concurrent streams (20)")
    parser.add_argument("--events", type=int, default=200, help="with --streams: events per stream (default 200)")
    parser.add_argument("--pace-ms", type=int, default=5, help="with --streams: ms between events (default 5)")
    args = parser.parse_args(argv)
    figures = measure(args.repeats)
    if args.streams:
        under_load = streams_under_load(args.stream_rounds, 1, args.streams_at_once, args.events, args.pace_ms)
        for name, c in under_load["contenders"].items():
            figures[f"streams_{name}_cpu_us_per_event"] = c["cpu_us_per_event"]
            figures[f"streams_{name}_delay_p50_ms"] = c["delay_p50_ms"]
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"CPU per request of the ext_proc, a {PROMPT_BYTES} B prompt: no policy {figures['none_us']:.1f} us; "
          f"every built-in, nothing found {figures['builtins_clean_us']:.1f} us (+{figures['added_clean_us']:.1f}); "
          f"ten values masked {figures['builtins_ten_us']:.1f} us (+{figures['added_ten_us']:.1f}). "
          "Goal: +40 us at most with every built-in")
    print(f"CPU per streamed event of the ext_proc, answers checked (every built-in): clean text "
          f"{figures['stream_clean_us_per_event']:.1f} us, a card over four events every 40 "
          f"{figures['stream_values_us_per_event']:.1f} us; without responses.check no event reaches the ext_proc")
    if args.streams:
        print("CPU per streamed event, all processes (Envoy and the ext_proc): "
              f"unchecked {figures['streams_unchecked_cpu_us_per_event']:.1f} us "
              f"(p50 delay {figures['streams_unchecked_delay_p50_ms']:.2f} ms), "
              f"checked {figures['streams_checked_cpu_us_per_event']:.1f} us "
              f"(p50 delay {figures['streams_checked_delay_p50_ms']:.2f} ms)")
    return 0
